#include "ops/xlstm_large_cuda.h"

#include <cuda_bf16.h>

#include <cstdint>

namespace gyre::ops::cuda_ops {
namespace {

using bf16 = __nv_bfloat16;

__device__ __forceinline__ float Cap(float x, float cap) { return cap > 0.f ? cap * tanhf(x / cap) : x; }
// d Cap / dx = sech²(x / cap) = 4e / (1 + e)², e = exp(−2|x / cap|): no cancellation at saturation.
__device__ __forceinline__ float CapSlope(float x, float cap) {
  if (cap <= 0.f) return 1.f;
  const float e = expf(-2.f * fabsf(x / cap));
  return 4.f * e / ((1.f + e) * (1.f + e));
}

__global__ void xl_gates_fwd(int64_t rows, int heads, float cap, float* pre, const float* bi, const float* bf,
                             float* ig, float* fg) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int cols = 2 * heads;
  if (i >= rows * cols) return;
  const int64_t r = i / cols;
  const int c = static_cast<int>(i % cols);
  const bool input = c < heads;
  const int h = input ? c : c - heads;
  const float p = pre[i] + (input ? bi[h] : bf[h]);
  pre[i] = p;
  (input ? ig : fg)[r * heads + h] = Cap(p, cap);
}

constexpr int kBwdThreads = 256;

__global__ void __launch_bounds__(kBwdThreads)
xl_gates_bwd(int64_t rows, int heads, float cap, const float* pre, const float* dig, const float* dfg, bf16* dpre,
             float* dbi, float* dbf, bool overwrite) {
  const int c = blockIdx.x;  // gate column
  const int cols = 2 * heads;
  const bool input = c < heads;
  const int h = input ? c : c - heads;
  const float* dgate = input ? dig : dfg;
  float sum = 0.f;
  for (int64_t r = threadIdx.x; r < rows; r += kBwdThreads) {
    const float d = dgate[r * heads + h] * CapSlope(pre[r * cols + c], cap);
    dpre[r * cols + c] = __float2bfloat16_rn(d);
    sum += d;
  }
  __shared__ float part[kBwdThreads];
  part[threadIdx.x] = sum;
  __syncthreads();
  for (int s = kBwdThreads / 2; s > 0; s >>= 1) {  // fixed tree order: deterministic
    if (threadIdx.x < s) part[threadIdx.x] += part[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    float* db = input ? dbi + h : dbf + h;
    *db = overwrite ? part[0] : *db + part[0];
  }
}

__global__ void xl_out_gate_fwd(int64_t n, const bf16* hn, const bf16* o, bf16* y) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float s = 1.f / (1.f + expf(-__bfloat162float(o[i])));
  y[i] = __float2bfloat16_rn(__bfloat162float(hn[i]) * s);
}

__global__ void xl_out_gate_bwd(int64_t n, const bf16* hn, const bf16* o, const bf16* dy, bf16* dhn, bf16* d_o) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float s = 1.f / (1.f + expf(-__bfloat162float(o[i])));
  const float g = __bfloat162float(dy[i]);
  dhn[i] = __float2bfloat16_rn(g * s);
  d_o[i] = __float2bfloat16_rn(g * __bfloat162float(hn[i]) * s * (1.f - s));
}

unsigned Blocks(int64_t n, int threads) { return static_cast<unsigned>((n + threads - 1) / threads); }

}  // namespace

CudaResult XlstmLargeGatesForward(const XlstmLargeGateArgs& a, cudaStream_t stream) {
  if (a.rows < 0 || a.heads <= 0 || a.cap < 0.f || a.pre == nullptr || a.bi == nullptr || a.bf == nullptr ||
      a.ig == nullptr || a.fg == nullptr)
    return gyre::cuda::InvalidArgument("XlstmLargeGatesForward: bad shape or missing pointer");
  const int64_t n = a.rows * 2 * a.heads;
  if (n == 0) return {};
  xl_gates_fwd<<<Blocks(n, 256), 256, 0, stream>>>(a.rows, static_cast<int>(a.heads), a.cap, a.pre, a.bi, a.bf, a.ig,
                                                   a.fg);
  CUDA_RETURN_IF_LAUNCH_ERROR("xl_gates_fwd");
  return {};
}

CudaResult XlstmLargeGatesBackward(const XlstmLargeGateArgs& a, cudaStream_t stream) {
  if (a.rows < 0 || a.heads <= 0 || a.cap < 0.f || a.pre == nullptr || a.dig == nullptr || a.dfg == nullptr ||
      a.dpre == nullptr || a.dbi == nullptr || a.dbf == nullptr)
    return gyre::cuda::InvalidArgument("XlstmLargeGatesBackward: bad shape or missing pointer");
  xl_gates_bwd<<<static_cast<unsigned>(2 * a.heads), kBwdThreads, 0, stream>>>(
      a.rows, static_cast<int>(a.heads), a.cap, a.pre, a.dig, a.dfg, static_cast<bf16*>(a.dpre), a.dbi, a.dbf,
      a.overwrite_db);
  CUDA_RETURN_IF_LAUNCH_ERROR("xl_gates_bwd");
  return {};
}

CudaResult XlstmLargeOutGateForward(const XlstmLargeOutGateArgs& a, cudaStream_t stream) {
  if (a.n < 0 || (a.n > 0 && (a.hn == nullptr || a.o == nullptr || a.y == nullptr)))
    return gyre::cuda::InvalidArgument("XlstmLargeOutGateForward: bad shape or missing pointer");
  if (a.n == 0) return {};
  xl_out_gate_fwd<<<Blocks(a.n, 256), 256, 0, stream>>>(a.n, static_cast<const bf16*>(a.hn),
                                                        static_cast<const bf16*>(a.o), static_cast<bf16*>(a.y));
  CUDA_RETURN_IF_LAUNCH_ERROR("xl_out_gate_fwd");
  return {};
}

CudaResult XlstmLargeOutGateBackward(const XlstmLargeOutGateArgs& a, cudaStream_t stream) {
  if (a.n < 0 || (a.n > 0 && (a.hn == nullptr || a.o == nullptr || a.dy == nullptr || a.dhn == nullptr ||
                              a.d_o == nullptr)))
    return gyre::cuda::InvalidArgument("XlstmLargeOutGateBackward: bad shape or missing pointer");
  if (a.n == 0) return {};
  xl_out_gate_bwd<<<Blocks(a.n, 256), 256, 0, stream>>>(
      a.n, static_cast<const bf16*>(a.hn), static_cast<const bf16*>(a.o), static_cast<const bf16*>(a.dy),
      static_cast<bf16*>(a.dhn), static_cast<bf16*>(a.d_o));
  CUDA_RETURN_IF_LAUNCH_ERROR("xl_out_gate_bwd");
  return {};
}

}  // namespace gyre::ops::cuda_ops
