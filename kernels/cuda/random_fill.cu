// Counter-based random fills; see random_fill.h.
#include "kernels/cuda/random_fill.h"

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/vec_util.cuh"

namespace gyre::cuda {
namespace {

__device__ __forceinline__ uint64_t SplitMix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

__device__ __forceinline__ float ApproxNormal(uint64_t seed, int64_t i) {
  const uint64_t a = SplitMix64(seed ^ (static_cast<uint64_t>(i) * 2 + 1));
  const uint64_t b = SplitMix64(a);
  float s = 0.f;
  s += static_cast<float>(a & 0xffffffffu) * 2.3283064e-10f;
  s += static_cast<float>(a >> 32) * 2.3283064e-10f;
  s += static_cast<float>(b & 0xffffffffu) * 2.3283064e-10f;
  s += static_cast<float>(b >> 32) * 2.3283064e-10f;
  return (s - 2.f) * 1.7320508f;  // variance of a sum of 4 U(0,1) is 1/3
}

template <typename T>
__global__ void fill_normal_kernel1(T* out, int64_t n, float mean, float stddev, uint64_t seed) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float v = mean + stddev * ApproxNormal(seed, i);
    if constexpr (sizeof(T) == 2) {
      out[i] = __float2bfloat16_rn(v);
    } else {
      out[i] = v;
    }
  }
}

__global__ void fill_int_kernel1(int32_t* out, int64_t n, int32_t range, uint64_t seed) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = static_cast<int32_t>(SplitMix64(seed ^ static_cast<uint64_t>(i)) % static_cast<uint64_t>(range));
  }
}

unsigned Blocks(int64_t n) {
  return static_cast<unsigned>(std::min<int64_t>(std::max<int64_t>(CeilDiv(n, 256), 1), 16384));
}

}  // namespace

CudaResult FillRandomF32(float* out, int64_t n, float mean, float stddev, uint64_t seed,
                         cudaStream_t stream) {
  if (n <= 0) return {};
  fill_normal_kernel1<float><<<Blocks(n), 256, 0, stream>>>(out, n, mean, stddev, seed);
  CUDA_RETURN_IF_LAUNCH_ERROR("fill_normal_kernel1<float>");
  return {};
}

CudaResult FillRandomBf16(__nv_bfloat16* out, int64_t n, float mean, float stddev, uint64_t seed,
                          cudaStream_t stream) {
  if (n <= 0) return {};
  fill_normal_kernel1<__nv_bfloat16><<<Blocks(n), 256, 0, stream>>>(out, n, mean, stddev, seed);
  CUDA_RETURN_IF_LAUNCH_ERROR("fill_normal_kernel1<bf16>");
  return {};
}

CudaResult FillRandomInt32(int32_t* out, int64_t n, int32_t range, uint64_t seed,
                           cudaStream_t stream) {
  if (n <= 0) return {};
  if (range <= 0) return InvalidArgument("FillRandomInt32: range must be positive");
  fill_int_kernel1<<<Blocks(n), 256, 0, stream>>>(out, n, range, seed);
  CUDA_RETURN_IF_LAUNCH_ERROR("fill_int_kernel1");
  return {};
}

}  // namespace gyre::cuda
