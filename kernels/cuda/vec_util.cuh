// Device helpers shared by the kernels in this folder: 16-byte vector loads/stores of bf16
// (8 elements) and fp32 (4 elements) converted to/from float registers, and warp/block sums.
//
// A kernel templated on V (elements per access: 8 for bf16 rows whose length is a multiple of 8
// on 16-byte-aligned pointers, else 1) calls LoadBf16<V>/StoreBf16<V>; the launcher picks V with
// CanVectorize, so odd shapes take the scalar path instead of reading out of bounds.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace gyre::cuda {

inline bool Aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <int V>
__device__ __forceinline__ void LoadBf16(const __nv_bfloat16* p, float (&out)[V]) {
  if constexpr (V == 8) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __bfloat1622float2(h[i]);
      out[2 * i] = f.x;
      out[2 * i + 1] = f.y;
    }
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) out[i] = __bfloat162float(p[i]);
  }
}

template <int V>
__device__ __forceinline__ void StoreBf16(__nv_bfloat16* p, const float (&in)[V]) {
  if constexpr (V == 8) {
    uint4 raw;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(in[2 * i], in[2 * i + 1]);
    *reinterpret_cast<uint4*>(p) = raw;
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) p[i] = __float2bfloat16_rn(in[i]);
  }
}

__device__ __forceinline__ float RoundToBf16(float x) {
  return __bfloat162float(__float2bfloat16_rn(x));
}

__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ double WarpSumDouble(double v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

inline int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace gyre::cuda
