// Embedding gather / deterministic scatter-add; contract in embedding.h.
//
//   embedding_fwd_kernel1  one block-row per token row; threads copy V-element vectors.
//   embedding_bwd_kernel1  block (distinct id u, column slice): for V columns per thread, sums
//                          dy over the id's rows (in row order), then dW[id] += sum (or = sum).
//   embedding_zero_unseen_kernel1  block per vocabulary row: zeros the rows of ids no token holds
//                          (the overwrite mode; disjoint from the rows the kernel above writes).
#include "kernels/cuda/embedding.h"

#include <string>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/vec_util.cuh"

namespace gyre::cuda {
namespace {

template <int V>
__global__ void embedding_fwd_kernel1(const int32_t* ids, const __nv_bfloat16* table,
                                      __nv_bfloat16* out, int64_t rows, int64_t vocab,
                                      int64_t dim, int* bad_ids) {
  const int64_t r = blockIdx.x;
  const int32_t id = ids[r];
  const bool valid = id >= 0 && id < vocab;
  if (!valid && threadIdx.x == 0 && bad_ids != nullptr) atomicAdd(bad_ids, 1);
  for (int64_t c = static_cast<int64_t>(threadIdx.x) * V; c < dim;
       c += static_cast<int64_t>(blockDim.x) * V) {
    float v[V];
    if (valid) {
      LoadBf16<V>(table + static_cast<int64_t>(id) * dim + c, v);
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) v[i] = 0.f;
    }
    StoreBf16<V>(out + r * dim + c, v);
  }
}

template <int V>
__global__ void embedding_bwd_kernel1(const int32_t* unique, const int32_t* offsets,
                                      const int32_t* sorted_rows, const __nv_bfloat16* dy,
                                      float* dweight, int64_t dim, bool overwrite) {
  const int64_t u = blockIdx.x;
  const int64_t c = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * V;
  if (c >= dim) return;
  const int32_t begin = offsets[u], end = offsets[u + 1];
  float acc[V];
#pragma unroll
  for (int i = 0; i < V; ++i) acc[i] = 0.f;
  for (int32_t k = begin; k < end; ++k) {
    float v[V];
    LoadBf16<V>(dy + static_cast<int64_t>(sorted_rows[k]) * dim + c, v);
#pragma unroll
    for (int i = 0; i < V; ++i) acc[i] += v[i];
  }
  float* w = dweight + static_cast<int64_t>(unique[u]) * dim + c;
#pragma unroll
  for (int i = 0; i < V; ++i) w[i] = overwrite ? acc[i] : w[i] + acc[i];
}

template <int V>
__global__ void embedding_zero_unseen_kernel1(const uint32_t* seen, float* dweight, int64_t dim) {
  const int64_t v = blockIdx.x;
  if ((seen[v / 32] >> (v % 32)) & 1u) return;
  float* w = dweight + v * dim;
  for (int64_t c = static_cast<int64_t>(threadIdx.x) * V; c < dim; c += static_cast<int64_t>(blockDim.x) * V) {
    if constexpr (V == 4) {
      *reinterpret_cast<float4*>(w + c) = make_float4(0.f, 0.f, 0.f, 0.f);
    } else {
      w[c] = 0.f;
    }
  }
}

}  // namespace

CudaResult EmbeddingForward(const int32_t* ids, const __nv_bfloat16* table, __nv_bfloat16* out,
                            int64_t rows, int64_t vocab, int64_t dim, int* bad_ids,
                            cudaStream_t stream) {
  if (rows < 0 || dim <= 0 || vocab <= 0 || !ids || !table || !out) {
    return InvalidArgument("EmbeddingForward: bad arguments");
  }
  if (rows == 0) return {};
  if (rows > 0x7fffffff) return InvalidArgument("EmbeddingForward: too many rows for one launch");
  const bool vec = dim % 8 == 0 && Aligned16(table) && Aligned16(out);
  const int threads = static_cast<int>(std::min<int64_t>(256, std::max<int64_t>(32, CeilDiv(dim, vec ? 8 : 1))));
  if (vec) {
    embedding_fwd_kernel1<8><<<static_cast<unsigned>(rows), threads, 0, stream>>>(ids, table, out, rows, vocab, dim, bad_ids);
  } else {
    embedding_fwd_kernel1<1><<<static_cast<unsigned>(rows), threads, 0, stream>>>(ids, table, out, rows, vocab, dim, bad_ids);
  }
  CUDA_RETURN_IF_LAUNCH_ERROR("embedding_fwd_kernel1");
  return {};
}

CudaResult EmbeddingBackwardPlan::Build(const int32_t* host_ids, int64_t rows, int64_t vocab,
                                        DeviceAllocator* alloc, cudaStream_t stream, PinnedUploads* uploads) {
  if (rows < 0 || vocab <= 0 || rows > 0x7fffffff) {
    return InvalidArgument("EmbeddingBackwardPlan: bad rows/vocab");
  }
  std::vector<int32_t> count(vocab, 0);
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t id = host_ids[r];
    if (id < 0 || id >= vocab) {
      return InvalidArgument("EmbeddingBackwardPlan: token id " + std::to_string(id) + " at row " +
                             std::to_string(r) + " is outside the vocabulary of " +
                             std::to_string(vocab));
    }
    ++count[id];
  }
  rows_ = rows;
  vocab_ = vocab;
  seen_.assign(CeilDiv(vocab, 32), 0u);
  for (int64_t v = 0; v < vocab; ++v) {
    if (count[v] != 0) seen_[v / 32] |= 1u << (v % 32);
  }
  unique_.clear();
  offsets_.assign(1, 0);
  std::vector<int32_t> start(vocab, 0);
  for (int64_t v = 0; v < vocab; ++v) {
    if (count[v] == 0) continue;
    start[v] = offsets_.back();
    unique_.push_back(static_cast<int32_t>(v));
    offsets_.push_back(offsets_.back() + count[v]);
  }
  sorted_rows_.assign(rows, 0);
  for (int64_t r = 0; r < rows; ++r) sorted_rows_[start[host_ids[r]]++] = static_cast<int32_t>(r);
  // One extra element so zero-row plans still get valid (non-null) buffers.
  CUDA_RETURN_IF_NOT_OK(alloc->Allocate(sizeof(int32_t) * (unique_.size() + 1), &d_unique_));
  CUDA_RETURN_IF_NOT_OK(alloc->Allocate(sizeof(int32_t) * offsets_.size(), &d_offsets_));
  CUDA_RETURN_IF_NOT_OK(alloc->Allocate(sizeof(int32_t) * (rows + 1), &d_rows_));
  CUDA_RETURN_IF_NOT_OK(alloc->Allocate(sizeof(uint32_t) * seen_.size(), &d_seen_));
  const auto upload = [&](void* dst, const void* src, size_t bytes) -> CudaResult {
    if (uploads != nullptr) return uploads->Upload(dst, src, bytes, stream);
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream));
    return {};
  };
  CUDA_RETURN_IF_NOT_OK(upload(d_seen_.get(), seen_.data(), sizeof(uint32_t) * seen_.size()));
  CUDA_RETURN_IF_NOT_OK(upload(d_unique_.get(), unique_.data(), sizeof(int32_t) * unique_.size()));
  CUDA_RETURN_IF_NOT_OK(upload(d_offsets_.get(), offsets_.data(), sizeof(int32_t) * offsets_.size()));
  CUDA_RETURN_IF_NOT_OK(upload(d_rows_.get(), sorted_rows_.data(), sizeof(int32_t) * rows));
  return {};
}

CudaResult EmbeddingBackward(const EmbeddingBackwardPlan& plan, const __nv_bfloat16* dy,
                             float* dweight, int64_t dim, bool overwrite, cudaStream_t stream) {
  if (dim <= 0 || !dy || !dweight) return InvalidArgument("EmbeddingBackward: bad arguments");
  if (overwrite) {
    if (plan.vocab() <= 0 || plan.vocab() > 0x7fffffff) return InvalidArgument("EmbeddingBackward: plan not built");
    const bool vec4 = dim % 4 == 0 && Aligned16(dweight);
    const int zthreads = static_cast<int>(std::min<int64_t>(256, CeilDiv(CeilDiv(dim, vec4 ? 4 : 1), 32) * 32));
    if (vec4) {
      embedding_zero_unseen_kernel1<4><<<static_cast<unsigned>(plan.vocab()), zthreads, 0, stream>>>(
          plan.device_seen(), dweight, dim);
    } else {
      embedding_zero_unseen_kernel1<1><<<static_cast<unsigned>(plan.vocab()), zthreads, 0, stream>>>(
          plan.device_seen(), dweight, dim);
    }
    CUDA_RETURN_IF_LAUNCH_ERROR("embedding_zero_unseen_kernel1");
  }
  if (plan.distinct() == 0) return {};
  const bool vec = dim % 8 == 0 && Aligned16(dy) && Aligned16(dweight);
  const int V = vec ? 8 : 1;
  const int64_t threads_needed = CeilDiv(dim, V);
  const int threads = static_cast<int>(std::min<int64_t>(256, CeilDiv(threads_needed, 32) * 32));
  const dim3 grid(static_cast<unsigned>(plan.distinct()),
                  static_cast<unsigned>(CeilDiv(threads_needed, threads)));
  if (vec) {
    embedding_bwd_kernel1<8><<<grid, threads, 0, stream>>>(plan.device_unique(), plan.device_offsets(),
                                                           plan.device_rows(), dy, dweight, dim, overwrite);
  } else {
    embedding_bwd_kernel1<1><<<grid, threads, 0, stream>>>(plan.device_unique(), plan.device_offsets(),
                                                           plan.device_rows(), dy, dweight, dim, overwrite);
  }
  CUDA_RETURN_IF_LAUNCH_ERROR("embedding_bwd_kernel1");
  return {};
}

}  // namespace gyre::cuda
