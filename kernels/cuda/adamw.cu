// Multi-tensor AdamW with global-norm clipping; contract and costs in adamw.h.
#include "kernels/cuda/adamw.h"

#include <cmath>
#include <string>

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

// Σ g² per chunk: float4 loads, four in flight per thread, when the tensor's gradient is 16-byte
// aligned (chunk starts are multiples of kChunk, so every chunk then is); a scalar loop otherwise
// and for the last < 4 elements. (Version 2; the all-scalar version 1 was removed in session 5:
// bitwise-equal results, v2 as fast or faster, bench/RESULTS.md "helper llamastep".)
__global__ void __launch_bounds__(kThreads)
adamw_norm_kernel2(const AdamWTensor* tensors, const int32_t* chunk_tensor,
                   const int32_t* chunk_index, double* partials) {
  const AdamWTensor t = tensors[chunk_tensor[blockIdx.x]];
  const int64_t begin = static_cast<int64_t>(chunk_index[blockIdx.x]) * kChunk;
  const int64_t end = min(t.numel, begin + kChunk);
  float acc = 0.f;
  int64_t scalar_from = begin;
  if ((reinterpret_cast<uintptr_t>(t.grad) & 15u) == 0) {
    const int64_t end4 = begin + ((end - begin) & ~int64_t{3});
    constexpr int kUnroll = 4;
    for (int64_t i0 = begin + 4 * threadIdx.x; i0 < end4; i0 += int64_t{4} * kThreads * kUnroll) {
      float4 g[kUnroll];
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) {
        const int64_t i = i0 + int64_t{4} * kThreads * k;
        g[k] = i < end4 ? *reinterpret_cast<const float4*>(t.grad + i) : make_float4(0.f, 0.f, 0.f, 0.f);
      }
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) acc += g[k].x * g[k].x + g[k].y * g[k].y + g[k].z * g[k].z + g[k].w * g[k].w;
    }
    scalar_from = end4;
  }
  for (int64_t i = scalar_from + threadIdx.x; i < end; i += kThreads) {
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

__device__ __forceinline__ void AdamWElement(const UpdateScalars& s, float decay, float scale, float g, float& m,
                                             float& v, float& p) {
  const float gk = g * scale;
  m = s.beta1 * m + s.one_minus_beta1 * gk;
  v = s.beta2 * v + s.one_minus_beta2 * gk * gk;
  p = p * decay - s.lr * (m * s.inv_bc1) / (sqrtf(v) * s.inv_sqrt_bc2 + s.eps);
}

// The update (version 2): when grad, m, v and master are 16-byte aligned and the bf16 copy 8-byte
// aligned, each thread moves float4s (two groups in flight: 8 loads of 16 bytes before any store)
// and writes the bf16 copy as 8 bytes; a scalar loop (four elements in flight, all loads before
// any store) otherwise and for the chunk's last < 4 elements. Both use AdamWElement, so aligned
// and misaligned tensors get bitwise the same update.
__global__ void __launch_bounds__(kThreads)
adamw_update_kernel2(const AdamWTensor* tensors, const int32_t* chunk_tensor,
                     const int32_t* chunk_index, const AdamWStepState* state, UpdateScalars s) {
  if (state->skipped) return;
  const float scale = state->clip_scale;
  const AdamWTensor t = tensors[chunk_tensor[blockIdx.x]];
  const int64_t begin = static_cast<int64_t>(chunk_index[blockIdx.x]) * kChunk;
  const int64_t end = min(t.numel, begin + kChunk);
  const float decay = t.decay ? s.decay_factor : 1.f;
  const uintptr_t a16 = reinterpret_cast<uintptr_t>(t.grad) | reinterpret_cast<uintptr_t>(t.m) |
                        reinterpret_cast<uintptr_t>(t.v) | reinterpret_cast<uintptr_t>(t.master);
  const bool vec = (a16 & 15u) == 0 && (reinterpret_cast<uintptr_t>(t.compute) & 7u) == 0;
  int64_t scalar_from = begin;
  if (vec) {
    const int64_t end4 = begin + ((end - begin) & ~int64_t{3});
    constexpr int kUnroll = 2;
    for (int64_t i0 = begin + 4 * threadIdx.x; i0 < end4; i0 += int64_t{4} * kThreads * kUnroll) {
      float4 g[kUnroll], m[kUnroll], v[kUnroll], p[kUnroll];
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) {
        const int64_t i = i0 + int64_t{4} * kThreads * k;
        if (i < end4) {
          g[k] = *reinterpret_cast<const float4*>(t.grad + i);
          m[k] = *reinterpret_cast<const float4*>(t.m + i);
          v[k] = *reinterpret_cast<const float4*>(t.v + i);
          p[k] = *reinterpret_cast<const float4*>(t.master + i);
        }
      }
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) {
        const int64_t i = i0 + int64_t{4} * kThreads * k;
        if (i >= end4) continue;
        AdamWElement(s, decay, scale, g[k].x, m[k].x, v[k].x, p[k].x);
        AdamWElement(s, decay, scale, g[k].y, m[k].y, v[k].y, p[k].y);
        AdamWElement(s, decay, scale, g[k].z, m[k].z, v[k].z, p[k].z);
        AdamWElement(s, decay, scale, g[k].w, m[k].w, v[k].w, p[k].w);
        *reinterpret_cast<float4*>(t.m + i) = m[k];
        *reinterpret_cast<float4*>(t.v + i) = v[k];
        *reinterpret_cast<float4*>(t.master + i) = p[k];
        if (t.compute != nullptr) {
          __nv_bfloat162 lo = __floats2bfloat162_rn(p[k].x, p[k].y);
          __nv_bfloat162 hi = __floats2bfloat162_rn(p[k].z, p[k].w);
          uint2 raw;
          raw.x = *reinterpret_cast<uint32_t*>(&lo);
          raw.y = *reinterpret_cast<uint32_t*>(&hi);
          *reinterpret_cast<uint2*>(t.compute + i) = raw;
        }
      }
    }
    scalar_from = end4;
  }
  constexpr int kUnroll = 4;
  for (int64_t i0 = scalar_from + threadIdx.x; i0 < end; i0 += static_cast<int64_t>(kThreads) * kUnroll) {
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
    for (int k = 0; k < kUnroll; ++k) AdamWElement(s, decay, scale, g[k], m[k], v[k], p[k]);
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
  adamw_norm_kernel2<<<static_cast<unsigned>(chunks_), kThreads, 0, stream>>>(
      tensors, chunk_tensor, chunk_index, partials_.as<double>());
  CUDA_RETURN_IF_LAUNCH_ERROR("adamw_norm_kernel");
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
  adamw_update_kernel2<<<static_cast<unsigned>(chunks_), kThreads, 0, stream>>>(
      tensors, chunk_tensor, chunk_index, state, s);
  CUDA_RETURN_IF_LAUNCH_ERROR("adamw_update_kernel");
  return {};
}

}  // namespace gyre::cuda
