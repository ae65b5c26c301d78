// Multi-tensor AdamW with global-norm clipping; contract and costs in adamw.h.
#include "kernels/cuda/adamw.h"

#include <cmath>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/vec_util.cuh"

namespace gyre::cuda {
namespace {

constexpr int64_t kChunk = 65536;  // elements per block
constexpr int kThreads = 512;

struct UpdateScalars {
  float lr, beta1, beta2, one_minus_beta1, one_minus_beta2, eps, decay_factor;
  float inv_bc1, inv_sqrt_bc2;  // 1 / (1 - b1^t), 1 / sqrt(1 - b2^t)
};

__device__ double BlockSumDouble(double v, double* shared /* [kThreads / 32] */) {
  v = WarpSumDouble(v);
  if (threadIdx.x % 32 == 0) shared[threadIdx.x / 32] = v;
  __syncthreads();
  double total = 0.0;
  if (threadIdx.x == 0) {
    for (int w = 0; w < kThreads / 32; ++w) total += shared[w];
  }
  return total;  // valid in thread 0
}

__global__ void __launch_bounds__(kThreads)
adamw_norm_kernel1(const AdamWTensor* tensors, const int32_t* chunk_tensor,
                   const int32_t* chunk_index, double* partials) {
  const AdamWTensor t = tensors[chunk_tensor[blockIdx.x]];
  const int64_t begin = static_cast<int64_t>(chunk_index[blockIdx.x]) * kChunk;
  const int64_t end = min(t.numel, begin + kChunk);
  float acc = 0.f;
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const float g = t.grad[i];
    acc += g * g;
  }
  __shared__ double shared[kThreads / 32];
  const double total = BlockSumDouble(static_cast<double>(acc), shared);
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

__global__ void adamw_clip_kernel1(const double* partials, int64_t chunks, float max_norm,
                                   AdamWStepState* state) {
  __shared__ double shared[kThreads / 32];
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < chunks; i += kThreads) acc += partials[i];
  const double total = BlockSumDouble(acc, shared);
  if (threadIdx.x == 0) {
    const double norm = sqrt(total);
    state->grad_norm = norm;
    const bool finite = isfinite(norm);
    state->skipped = finite ? 0 : 1;
    state->clip_scale = (finite && max_norm > 0.f && norm > max_norm)
                            ? static_cast<float>(max_norm / norm)
                            : 1.f;
  }
}

__global__ void __launch_bounds__(kThreads)
adamw_update_kernel1(const AdamWTensor* tensors, const int32_t* chunk_tensor,
                     const int32_t* chunk_index, const AdamWStepState* state, UpdateScalars s) {
  if (state->skipped) return;
  const float scale = state->clip_scale;
  const AdamWTensor t = tensors[chunk_tensor[blockIdx.x]];
  const int64_t begin = static_cast<int64_t>(chunk_index[blockIdx.x]) * kChunk;
  const int64_t end = min(t.numel, begin + kChunk);
  const float decay = t.decay ? s.decay_factor : 1.f;
  // kUnroll elements per thread per iteration, all loads issued before any store: the buffers
  // could alias as far as the compiler knows, so without this it would serialise each
  // element's loads behind the previous element's stores (little memory parallelism).
  constexpr int kUnroll = 4;
  for (int64_t i0 = begin + threadIdx.x; i0 < end; i0 += static_cast<int64_t>(kThreads) * kUnroll) {
    float g[kUnroll], m[kUnroll], v[kUnroll], p[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const int64_t i = i0 + static_cast<int64_t>(k) * kThreads;
      const bool in = i < end;
      g[k] = in ? t.grad[i] : 0.f;
      m[k] = in ? t.m[i] : 0.f;
      v[k] = in ? t.v[i] : 0.f;
      p[k] = in ? t.master[i] : 0.f;
    }
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const float gk = g[k] * scale;
      m[k] = s.beta1 * m[k] + s.one_minus_beta1 * gk;
      v[k] = s.beta2 * v[k] + s.one_minus_beta2 * gk * gk;
      p[k] = p[k] * decay - s.lr * (m[k] * s.inv_bc1) / (sqrtf(v[k]) * s.inv_sqrt_bc2 + s.eps);
    }
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const int64_t i = i0 + static_cast<int64_t>(k) * kThreads;
      if (i < end) {
        t.m[i] = m[k];
        t.v[i] = v[k];
        t.master[i] = p[k];
        if (t.compute != nullptr) t.compute[i] = __float2bfloat16_rn(p[k]);
      }
    }
  }
}

}  // namespace

CudaResult FusedAdamW::Init(const std::vector<AdamWTensor>& tensors, const AdamWHyper& hyper,
                            DeviceAllocator* alloc, cudaStream_t stream) {
  hyper_ = hyper;
  t_ = 0;
  std::vector<int32_t> chunk_tensor, chunk_index;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const AdamWTensor& t = tensors[i];
    if (t.numel < 0 || (t.numel > 0 && (!t.master || !t.grad || !t.m || !t.v))) {
      return InvalidArgument("FusedAdamW: tensor " + std::to_string(i) + " lacks a buffer");
    }
    const int64_t n_chunks = CeilDiv(t.numel, kChunk);
    if (n_chunks > 0x7fffffff) return InvalidArgument("FusedAdamW: tensor too large");
    for (int64_t c = 0; c < n_chunks; ++c) {
      chunk_tensor.push_back(static_cast<int32_t>(i));
      chunk_index.push_back(static_cast<int32_t>(c));
    }
  }
  chunks_ = static_cast<int64_t>(chunk_tensor.size());
  if (chunks_ > 0x7fffffff) return InvalidArgument("FusedAdamW: too many chunks");
  CUDA_RETURN_IF_NOT_OK(alloc->Allocate(sizeof(AdamWTensor) * std::max<size_t>(tensors.size(), 1), &tensors_));
  CUDA_RETURN_IF_NOT_OK(alloc->Allocate(sizeof(int32_t) * 2 * std::max<int64_t>(chunks_, 1), &chunk_of_));
  CUDA_RETURN_IF_NOT_OK(alloc->Allocate(sizeof(double) * std::max<int64_t>(chunks_, 1), &partials_));
  CUDA_RETURN_IF_NOT_OK(alloc->Allocate(sizeof(AdamWStepState), &state_));
  if (!tensors.empty()) {
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(tensors_.get(), tensors.data(),
                                         sizeof(AdamWTensor) * tensors.size(),
                                         cudaMemcpyHostToDevice, stream));
  }
  if (chunks_ > 0) {
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(chunk_of_.get(), chunk_tensor.data(),
                                         sizeof(int32_t) * chunks_, cudaMemcpyHostToDevice, stream));
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(chunk_of_.as<int32_t>() + chunks_, chunk_index.data(),
                                         sizeof(int32_t) * chunks_, cudaMemcpyHostToDevice, stream));
  }
  // Pageable sources: the copies above are staged before they return; sync so the host vectors
  // can go (Init is not in the step loop).
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  return {};
}

CudaResult FusedAdamW::Step(double lr, double max_grad_norm, cudaStream_t stream) {
  if (!state_) return InvalidArgument("FusedAdamW::Step before Init");
  ++t_;
  if (chunks_ == 0) return {};
  const AdamWTensor* tensors = tensors_.as<AdamWTensor>();
  const int32_t* chunk_tensor = chunk_of_.as<int32_t>();
  const int32_t* chunk_index = chunk_tensor + chunks_;
  AdamWStepState* state = state_.as<AdamWStepState>();
  adamw_norm_kernel1<<<static_cast<unsigned>(chunks_), kThreads, 0, stream>>>(
      tensors, chunk_tensor, chunk_index, partials_.as<double>());
  CUDA_RETURN_IF_LAUNCH_ERROR("adamw_norm_kernel1");
  adamw_clip_kernel1<<<1, kThreads, 0, stream>>>(partials_.as<double>(), chunks_,
                                                 static_cast<float>(max_grad_norm), state);
  CUDA_RETURN_IF_LAUNCH_ERROR("adamw_clip_kernel1");
  const double t = static_cast<double>(t_);
  UpdateScalars s;
  s.lr = static_cast<float>(lr);
  s.beta1 = static_cast<float>(hyper_.beta1);
  s.beta2 = static_cast<float>(hyper_.beta2);
  s.one_minus_beta1 = static_cast<float>(1.0 - hyper_.beta1);
  s.one_minus_beta2 = static_cast<float>(1.0 - hyper_.beta2);
  s.eps = static_cast<float>(hyper_.eps);
  s.decay_factor = static_cast<float>(1.0 - lr * hyper_.weight_decay);
  s.inv_bc1 = static_cast<float>(1.0 / (1.0 - std::pow(hyper_.beta1, t)));
  s.inv_sqrt_bc2 = static_cast<float>(1.0 / std::sqrt(1.0 - std::pow(hyper_.beta2, t)));
  adamw_update_kernel1<<<static_cast<unsigned>(chunks_), kThreads, 0, stream>>>(
      tensors, chunk_tensor, chunk_index, state, s);
  CUDA_RETURN_IF_LAUNCH_ERROR("adamw_update_kernel1");
  return {};
}

}  // namespace gyre::cuda
