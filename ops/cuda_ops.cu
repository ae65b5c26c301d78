// Kernels of ops/cuda_ops.h. Attention math (scale s = 1/sqrt(D), causal j <= i, GQA hk = h / (H/Hk)):
//   forward   l_ij = s q_i·k_j;  lse_i = log Σ_j exp(l_ij);  o_i = Σ_j exp(l_ij - lse_i) v_j
//   backward  p_ij = exp(l_ij - lse_i);  Δ_i = do_i·o_i;  ds_ij = p_ij (do_i·v_j - Δ_i)
//             dq_i = s Σ_j ds_ij k_j;  dk_j = s Σ_i ds_ij q_i;  dv_j = Σ_i p_ij do_i
#include "ops/cuda_ops.h"

#include <cuda_bf16.h>

#include "kernels/cuda/cuda_check.h"

namespace gyre::ops::cuda_ops {
namespace {

using bf16 = __nv_bfloat16;
constexpr int kMaxPerLane = 8;  // head_dim <= 256

__device__ inline float Load(const void* p, bool is_bf16, int64_t i) {
  return is_bf16 ? __bfloat162float(static_cast<const bf16*>(p)[i]) : static_cast<const float*>(p)[i];
}
__device__ inline void Store(void* p, bool is_bf16, int64_t i, float v) {
  if (is_bf16) static_cast<bf16*>(p)[i] = __float2bfloat16(v);
  else static_cast<float*>(p)[i] = v;
}

__global__ void convert_kernel(const void* src, void* dst, int64_t n, int kind) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    if (kind == 0) static_cast<bf16*>(dst)[i] = __float2bfloat16(static_cast<const float*>(src)[i]);
    else static_cast<float*>(dst)[i] = __bfloat162float(static_cast<const bf16*>(src)[i]);
  }
}

// Row-strided form (a column block of a wider matrix on either side): i runs over rows x cols.
__global__ void convert_rows_kernel(const void* src, int64_t src_ld, void* dst, int64_t dst_ld, int64_t rows,
                                    int64_t cols, int kind) {
  const int64_t n = rows * cols;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = i / cols, c = i - r * cols;
    if (kind == 0) static_cast<bf16*>(dst)[r * dst_ld + c] = __float2bfloat16(static_cast<const float*>(src)[r * src_ld + c]);
    else static_cast<float*>(dst)[r * dst_ld + c] = __bfloat162float(static_cast<const bf16*>(src)[r * src_ld + c]);
  }
}

__global__ void axpy_kernel(void* y, const void* x, bool is_bf16, float alpha, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    Store(y, is_bf16, i, Load(y, is_bf16, i) + alpha * Load(x, is_bf16, i));
}

__global__ void add_kernel(void* out, const void* a, const void* b, bool is_bf16, int64_t n) {
  if (is_bf16) {
    // 8 bf16 per 16-byte access when aligned (the residual stream always is).
    const int64_t n8 = n / 8;
    const uint4* a4 = static_cast<const uint4*>(a);
    const uint4* b4 = static_cast<const uint4*>(b);
    uint4* o4 = static_cast<uint4*>(out);
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n8; i += (int64_t)gridDim.x * blockDim.x) {
      uint4 x = a4[i], y = b4[i], z;
      const __nv_bfloat162* xs = reinterpret_cast<const __nv_bfloat162*>(&x);
      const __nv_bfloat162* ys = reinterpret_cast<const __nv_bfloat162*>(&y);
      __nv_bfloat162* zs = reinterpret_cast<__nv_bfloat162*>(&z);
      for (int k = 0; k < 4; ++k) {
        const float2 fx = __bfloat1622float2(xs[k]), fy = __bfloat1622float2(ys[k]);
        zs[k] = __floats2bfloat162_rn(fx.x + fy.x, fx.y + fy.y);
      }
      o4[i] = z;
    }
    for (int64_t i = n8 * 8 + blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
      Store(out, true, i, Load(a, true, i) + Load(b, true, i));
    return;
  }
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    Store(out, false, i, Load(a, false, i) + Load(b, false, i));
}

__global__ void scale_kernel(void* y, bool is_bf16, float s, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    Store(y, is_bf16, i, s * Load(y, is_bf16, i));
}

__global__ void sumsq_kernel(const void* x, bool is_bf16, int64_t n, double* partials) {
  double acc = 0;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const double v = Load(x, is_bf16, i);
    acc += v * v;
  }
  __shared__ double s[256];
  s[threadIdx.x] = acc;
  __syncthreads();
  for (int w = blockDim.x / 2; w > 0; w /= 2) {
    if ((int)threadIdx.x < w) s[threadIdx.x] += s[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) partials[blockIdx.x] = s[0];
}

int Blocks(int64_t n) {
  const int64_t b = (n + 255) / 256;
  return static_cast<int>(b < 4096 ? (b < 1 ? 1 : b) : 4096);
}

__device__ inline float WarpSum(float v) {
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// One warp per (query row i, head h, batch b).
__global__ void attn_fwd_kernel(PlainAttentionArgs a, float scale) {
  const int64_t i = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int lane = threadIdx.x;
  const int64_t D = a.head_dim, T = a.seq, hk = h / (a.heads / a.kv_heads);
  const bf16* q = static_cast<const bf16*>(a.q) + (b * T + i) * a.q_row_stride + h * D;
  float qr[kMaxPerLane], acc[kMaxPerLane];
  for (int e = 0; e < kMaxPerLane; ++e) {
    const int64_t d = lane + 32 * e;
    qr[e] = d < D ? __bfloat162float(q[d]) : 0.f;
    acc[e] = 0.f;
  }
  float m = -INFINITY, l = 0.f;
  for (int64_t j = 0; j <= i; ++j) {
    const bf16* k = static_cast<const bf16*>(a.k) + (b * T + j) * a.kv_row_stride + hk * D;
    const bf16* v = static_cast<const bf16*>(a.v) + (b * T + j) * a.kv_row_stride + hk * D;
    float dot = 0.f;
    for (int e = 0; e < kMaxPerLane; ++e) {
      const int64_t d = lane + 32 * e;
      if (d < D) dot += qr[e] * __bfloat162float(k[d]);
    }
    const float s = WarpSum(dot) * scale;
    const float m_new = fmaxf(m, s);
    const float corr = __expf(m - m_new), p = __expf(s - m_new);
    l = l * corr + p;
    for (int e = 0; e < kMaxPerLane; ++e) {
      const int64_t d = lane + 32 * e;
      acc[e] = acc[e] * corr + (d < D ? p * __bfloat162float(v[d]) : 0.f);
    }
    m = m_new;
  }
  bf16* o = static_cast<bf16*>(a.out) + ((b * T + i) * a.heads + h) * D;
  for (int e = 0; e < kMaxPerLane; ++e) {
    const int64_t d = lane + 32 * e;
    if (d < D) o[d] = __float2bfloat16(acc[e] / l);
  }
  if (lane == 0 && a.lse != nullptr) a.lse[(b * a.heads + h) * T + i] = m + logf(l);
}

__global__ void attn_bwd_kernel(PlainAttentionArgs a, float scale, float* dk32, float* dv32) {
  const int64_t i = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int lane = threadIdx.x;
  const int64_t D = a.head_dim, T = a.seq, Hk = a.kv_heads, hk = h / (a.heads / Hk);
  const bf16* q = static_cast<const bf16*>(a.q) + (b * T + i) * a.q_row_stride + h * D;
  const bf16* o = static_cast<const bf16*>(a.out) + ((b * T + i) * a.heads + h) * D;
  const bf16* dout = static_cast<const bf16*>(a.dout) + ((b * T + i) * a.heads + h) * D;
  float qr[kMaxPerLane], dor[kMaxPerLane], dq[kMaxPerLane];
  float delta = 0.f;
  for (int e = 0; e < kMaxPerLane; ++e) {
    const int64_t d = lane + 32 * e;
    qr[e] = d < D ? __bfloat162float(q[d]) : 0.f;
    dor[e] = d < D ? __bfloat162float(dout[d]) : 0.f;
    delta += d < D ? dor[e] * __bfloat162float(o[d]) : 0.f;
    dq[e] = 0.f;
  }
  delta = WarpSum(delta);
  const float lse = a.lse[(b * a.heads + h) * T + i];
  for (int64_t j = 0; j <= i; ++j) {
    const bf16* k = static_cast<const bf16*>(a.k) + (b * T + j) * a.kv_row_stride + hk * D;
    const bf16* v = static_cast<const bf16*>(a.v) + (b * T + j) * a.kv_row_stride + hk * D;
    float dot = 0.f, dpv = 0.f;
    for (int e = 0; e < kMaxPerLane; ++e) {
      const int64_t d = lane + 32 * e;
      if (d < D) {
        dot += qr[e] * __bfloat162float(k[d]);
        dpv += dor[e] * __bfloat162float(v[d]);
      }
    }
    const float p = __expf(WarpSum(dot) * scale - lse);
    const float ds = p * (WarpSum(dpv) - delta);
    float* dkr = dk32 + ((b * T + j) * Hk + hk) * D;
    float* dvr = dv32 + ((b * T + j) * Hk + hk) * D;
    for (int e = 0; e < kMaxPerLane; ++e) {
      const int64_t d = lane + 32 * e;
      if (d < D) {
        dq[e] += ds * __bfloat162float(k[d]);
        atomicAdd(dkr + d, scale * ds * qr[e]);
        atomicAdd(dvr + d, p * dor[e]);
      }
    }
  }
  bf16* dqr = static_cast<bf16*>(a.dq) + (b * T + i) * a.q_row_stride + h * D;
  for (int e = 0; e < kMaxPerLane; ++e) {
    const int64_t d = lane + 32 * e;
    if (d < D) dqr[d] = __float2bfloat16(scale * dq[e]);
  }
}

// Packed fp32 [rows, Hk*D] -> strided bf16.
__global__ void store_kv_kernel(const float* src, void* dst, int64_t rows, int64_t width, int64_t stride) {
  const int64_t n = rows * width;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = i / width, c = i % width;
    static_cast<bf16*>(dst)[r * stride + c] = __float2bfloat16(src[i]);
  }
}

}  // namespace

CudaResult Convert(const void* src, void* dst, int64_t n, int kind, cudaStream_t stream) {
  if (n == 0) return {};
  convert_kernel<<<Blocks(n), 256, 0, stream>>>(src, dst, n, kind);
  CUDA_RETURN_IF_LAUNCH_ERROR("convert_kernel");
  return {};
}

CudaResult ConvertRows(const void* src, int64_t src_ld, void* dst, int64_t dst_ld, int64_t rows, int64_t cols,
                       int kind, cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return {};
  convert_rows_kernel<<<Blocks(rows * cols), 256, 0, stream>>>(src, src_ld, dst, dst_ld, rows, cols, kind);
  CUDA_RETURN_IF_LAUNCH_ERROR("convert_rows_kernel");
  return {};
}

CudaResult Axpy(void* y, const void* x, bool is_bf16, float alpha, int64_t n, cudaStream_t stream) {
  if (n == 0) return {};
  axpy_kernel<<<Blocks(n), 256, 0, stream>>>(y, x, is_bf16, alpha, n);
  CUDA_RETURN_IF_LAUNCH_ERROR("axpy_kernel");
  return {};
}

CudaResult Add(void* out, const void* a, const void* b, bool is_bf16, int64_t n, cudaStream_t stream) {
  if (n == 0) return {};
  const bool aligned = ((reinterpret_cast<uintptr_t>(out) | reinterpret_cast<uintptr_t>(a) | reinterpret_cast<uintptr_t>(b)) & 15) == 0;
  if (is_bf16 && !aligned) {
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(out, a, n * 2, cudaMemcpyDeviceToDevice, stream));
    return Axpy(out, b, true, 1.f, n, stream);
  }
  add_kernel<<<Blocks(is_bf16 ? (n + 7) / 8 : n), 256, 0, stream>>>(out, a, b, is_bf16, n);
  CUDA_RETURN_IF_LAUNCH_ERROR("add_kernel");
  return {};
}

CudaResult Scale(void* y, bool is_bf16, float s, int64_t n, cudaStream_t stream) {
  if (n == 0) return {};
  scale_kernel<<<Blocks(n), 256, 0, stream>>>(y, is_bf16, s, n);
  CUDA_RETURN_IF_LAUNCH_ERROR("scale_kernel");
  return {};
}

CudaResult SumSquaresPartials(const void* x, bool is_bf16, int64_t n, double* partials, int max_blocks, int* blocks,
                              cudaStream_t stream) {
  int nb = Blocks(n);
  if (nb > max_blocks) nb = max_blocks;
  *blocks = nb;
  sumsq_kernel<<<nb, 256, 0, stream>>>(x, is_bf16, n, partials);
  CUDA_RETURN_IF_LAUNCH_ERROR("sumsq_kernel");
  return {};
}

CudaResult PlainAttentionForward(const PlainAttentionArgs& a, cudaStream_t stream) {
  if (a.head_dim > 32 * kMaxPerLane || a.heads % a.kv_heads != 0)
    return gyre::cuda::InvalidArgument("plain attention: head_dim <= 256 and heads % kv_heads == 0");
  if (a.batch * a.seq == 0) return {};
  const float scale = 1.f / sqrtf(static_cast<float>(a.head_dim));
  attn_fwd_kernel<<<dim3(a.seq, a.heads, a.batch), 32, 0, stream>>>(a, scale);
  CUDA_RETURN_IF_LAUNCH_ERROR("attn_fwd_kernel");
  return {};
}

CudaResult PlainAttentionBackward(const PlainAttentionArgs& a, gyre::cuda::DeviceAllocator* alloc, cudaStream_t stream) {
  if (a.head_dim > 32 * kMaxPerLane || a.heads % a.kv_heads != 0)
    return gyre::cuda::InvalidArgument("plain attention: head_dim <= 256 and heads % kv_heads == 0");
  const int64_t rows = a.batch * a.seq, width = a.kv_heads * a.head_dim;
  if (rows == 0) return {};
  gyre::cuda::DeviceBuffer dk32, dv32;
  CUDA_RETURN_IF_NOT_OK(alloc->Allocate(rows * width * sizeof(float), &dk32));
  CUDA_RETURN_IF_NOT_OK(alloc->Allocate(rows * width * sizeof(float), &dv32));
  CUDA_RETURN_IF_ERROR(cudaMemsetAsync(dk32.get(), 0, rows * width * sizeof(float), stream));
  CUDA_RETURN_IF_ERROR(cudaMemsetAsync(dv32.get(), 0, rows * width * sizeof(float), stream));
  const float scale = 1.f / sqrtf(static_cast<float>(a.head_dim));
  attn_bwd_kernel<<<dim3(a.seq, a.heads, a.batch), 32, 0, stream>>>(a, scale, dk32.as<float>(), dv32.as<float>());
  CUDA_RETURN_IF_LAUNCH_ERROR("attn_bwd_kernel");
  store_kv_kernel<<<Blocks(rows * width), 256, 0, stream>>>(dk32.as<float>(), a.dk, rows, width, a.kv_row_stride);
  CUDA_RETURN_IF_LAUNCH_ERROR("store_kv_kernel");
  store_kv_kernel<<<Blocks(rows * width), 256, 0, stream>>>(dv32.as<float>(), a.dv, rows, width, a.kv_row_stride);
  CUDA_RETURN_IF_LAUNCH_ERROR("store_kv_kernel");
  // The scratch returns to the cache here; the stream orders its reuse after these kernels.
  return {};
}

}  // namespace gyre::ops::cuda_ops
