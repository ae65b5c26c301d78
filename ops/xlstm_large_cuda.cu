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

// Gate backward: block = 256 rows (kXlstmLargeGateTileRows), a thread per row; per gate column the 8 warps reduce by shuffles (a fixed xor pattern) and thread c
// adds the 8 warp sums in order into partial[tile, c]. Then xl_gates_bias_sum: a block per column,
// thread t adding tiles t, t + 256, ... in order, then a fixed tree. (It replaced one block per gate
// column walking all rows: 8 blocks at the 125m, 1.46 ms a step; dpre has that kernel's bits.)
constexpr int kGateTileThreads = static_cast<int>(kXlstmLargeGateTileRows);
constexpr int kMaxGateCols = 64;  // 2·heads; the 7B has 16

__global__ void __launch_bounds__(kGateTileThreads)
xl_gates_bwd_tiles(int64_t rows, int heads, float cap, const float* pre, const float* dig, const float* dfg,
                   bf16* dpre, int64_t ldpre, float* partial) {
  __shared__ float warp_sums[kGateTileThreads / 32][kMaxGateCols];
  const int cols = 2 * heads, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kGateTileThreads + threadIdx.x;
  for (int c = 0; c < cols; ++c) {
    const bool input = c < heads;
    const int h = input ? c : c - heads;
    float d = 0.f;
    if (r < rows) {
      d = (input ? dig : dfg)[r * heads + h] * CapSlope(pre[r * cols + c], cap);
      dpre[r * ldpre + c] = __float2bfloat16_rn(d);
    }
    for (int o = 16; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
    if (lane == 0) warp_sums[warp][c] = d;
  }
  __syncthreads();
  if (threadIdx.x < cols) {
    float t = 0.f;
#pragma unroll
    for (int w = 0; w < kGateTileThreads / 32; ++w) t += warp_sums[w][threadIdx.x];  // fixed order
    partial[blockIdx.x * cols + threadIdx.x] = t;
  }
}

__global__ void __launch_bounds__(kBwdThreads)
xl_gates_bias_sum(int heads, int64_t tiles, const float* partial, float* dbi, float* dbf, bool overwrite) {
  const int c = blockIdx.x, cols = 2 * heads;
  float sum = 0.f;
  for (int64_t i = threadIdx.x; i < tiles; i += kBwdThreads) sum += partial[i * cols + c];
  __shared__ float part[kBwdThreads];
  part[threadIdx.x] = sum;
  __syncthreads();
  for (int s = kBwdThreads / 2; s > 0; s >>= 1) {  // fixed tree order: deterministic
    if (threadIdx.x < s) part[threadIdx.x] += part[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const bool input = c < heads;
    float* db = input ? dbi + c : dbf + (c - heads);
    *db = overwrite ? part[0] : *db + part[0];
  }
}

// ---------------------------------------------------------------- norm + out gate (fused)
//
// One warp per (row, head). Lane `lane` owns columns k·256 + 8·lane .. +8 of the head for
// k < kChunks = ceil(dv / 256), held in registers: the head's values are loaded from memory once
// (16-byte loads of 8 bf16), the two warp sums (mean, then Σ(x − mean)², the two-pass form of the
// plain GroupNorm kernel) run on registers, and the outputs are written once. Memory-bound:
// forward reads h, o and writes y (6 bytes an element); backward reads h, o, dy and writes dh, d_o
// (10 bytes an element) and nothing else but the [rows, heads] statistics and dweight's partials.

constexpr int kNormGateWarps = 8;  // warps (rows) per block

__device__ __forceinline__ float WarpSum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ void LoadBf16x8(const void* base, int64_t i, float* v) {
  const uint4 raw = *reinterpret_cast<const uint4*>(static_cast<const bf16*>(base) + i);
  const __nv_bfloat162* p = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const float2 f = __bfloat1622float2(p[k]);
    v[2 * k] = f.x;
    v[2 * k + 1] = f.y;
  }
}
__device__ __forceinline__ void StoreBf16x8(void* base, int64_t i, const float* v) {
  uint4 raw;
  __nv_bfloat162* p = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
  for (int k = 0; k < 4; ++k) p[k] = __floats2bfloat162_rn(v[2 * k], v[2 * k + 1]);
  *reinterpret_cast<uint4*>(static_cast<bf16*>(base) + i) = raw;
}
__device__ __forceinline__ void LoadF32x8(const float* p, float* v) {
  const float4 a = *reinterpret_cast<const float4*>(p), b = *reinterpret_cast<const float4*>(p + 4);
  v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
  v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}
__device__ __forceinline__ float Sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

template <int kChunks>
__global__ void __launch_bounds__(32 * kNormGateWarps) xl_norm_gate_fwd(XlstmLargeNormGateArgs a) {
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kNormGateWarps + (threadIdx.x >> 5);
  const int head = blockIdx.y;
  if (r >= a.rows) return;
  const int64_t dv = a.dim / a.heads, base = r * a.dim + head * dv;
  float x[kChunks][8];
  float s = 0.f;
#pragma unroll
  for (int k = 0; k < kChunks; ++k) {
    const int64_t c = k * 256 + lane * 8;
    if (c < dv) {
      LoadBf16x8(a.h, base + c, x[k]);
#pragma unroll
      for (int e = 0; e < 8; ++e) s += x[k][e];
    }
  }
  const float mean = WarpSum(s) / dv;
  float q = 0.f;
#pragma unroll
  for (int k = 0; k < kChunks; ++k) {
    if (k * 256 + lane * 8 < dv) {
#pragma unroll
      for (int e = 0; e < 8; ++e) q += (x[k][e] - mean) * (x[k][e] - mean);
    }
  }
  const float rstd = rsqrtf(WarpSum(q) / dv + a.eps);
  if (lane == 0) {
    a.mean[r * a.heads + head] = mean;
    a.rstd[r * a.heads + head] = rstd;
  }
#pragma unroll
  for (int k = 0; k < kChunks; ++k) {
    const int64_t c = k * 256 + lane * 8;
    if (c >= dv) continue;
    float o[8], w[8], y[8];
    LoadBf16x8(a.o, base + c, o);
    LoadF32x8(a.weight + head * dv + c, w);
#pragma unroll
    for (int e = 0; e < 8; ++e) y[e] = (x[k][e] - mean) * rstd * w[e] * Sigmoid(o[e]);
    StoreBf16x8(a.y, base + c, y);
  }
}

// Block (tile, head): 8 warps over the tile's 64 rows (warp w: rows w, w + 8, ...). Per row, with
// xhat = (h − mean)·rstd, s = σ(o), dn = dy·s, g = dn·w:
//   dh = rstd·(g − mean(g) − xhat·mean(g·xhat)),  d_o = dy·(xhat·w)·s(1 − s);
// each lane accumulates Σ dn·xhat for its columns over its rows; the block adds its 8 warps in
// order into partial[tile, head·dv + c].
template <int kChunks>
__global__ void __launch_bounds__(32 * kNormGateWarps) xl_norm_gate_bwd(XlstmLargeNormGateArgs a) {
  __shared__ float warp_dw[kNormGateWarps][kChunks * 256];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int head = blockIdx.y;
  const int64_t dv = a.dim / a.heads;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * a.tile_rows;
  const int64_t ld_do = a.ld_do != 0 ? a.ld_do : a.dim;
  float w[kChunks][8], dw[kChunks][8];
#pragma unroll
  for (int k = 0; k < kChunks; ++k) {
    const int64_t c = k * 256 + lane * 8;
#pragma unroll
    for (int e = 0; e < 8; ++e) dw[k][e] = 0.f;
    if (c < dv) LoadF32x8(a.weight + head * dv + c, w[k]);
  }
  for (int64_t r = r0 + warp; r < min(r0 + a.tile_rows, a.rows); r += kNormGateWarps) {
    const int64_t base = r * a.dim + head * dv;
    const float mean = a.mean[r * a.heads + head], rstd = a.rstd[r * a.heads + head];
    float xhat[kChunks][8], g[kChunks][8];
    float s1 = 0.f, s2 = 0.f;
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
      const int64_t c = k * 256 + lane * 8;
      if (c >= dv) continue;
      float x[8], o[8], dy[8], d_o[8];
      LoadBf16x8(a.h, base + c, x);
      LoadBf16x8(a.o, base + c, o);
      LoadBf16x8(a.dy, base + c, dy);
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const float xh = (x[e] - mean) * rstd, s = Sigmoid(o[e]), dn = dy[e] * s;
        xhat[k][e] = xh;
        g[k][e] = dn * w[k][e];
        s1 += g[k][e];
        s2 += g[k][e] * xh;
        dw[k][e] += dn * xh;
        d_o[e] = dy[e] * xh * w[k][e] * s * (1.f - s);
      }
      StoreBf16x8(a.d_o, r * ld_do + head * dv + c, d_o);
    }
    s1 = WarpSum(s1) / dv;
    s2 = WarpSum(s2) / dv;
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
      const int64_t c = k * 256 + lane * 8;
      if (c >= dv) continue;
      float dh[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) dh[e] = rstd * (g[k][e] - s1 - xhat[k][e] * s2);
      StoreBf16x8(a.dh, base + c, dh);
    }
  }
#pragma unroll
  for (int k = 0; k < kChunks; ++k) {
    const int64_t c = k * 256 + lane * 8;
    if (c >= dv) continue;
#pragma unroll
    for (int e = 0; e < 8; ++e) warp_dw[warp][c + e] = dw[k][e];
  }
  __syncthreads();
  for (int64_t c = threadIdx.x; c < dv; c += blockDim.x) {
    float t = 0.f;
#pragma unroll
    for (int v = 0; v < kNormGateWarps; ++v) t += warp_dw[v][c];  // fixed order
    a.partial[blockIdx.x * a.dim + head * dv + c] = t;
  }
}

// dweight[c] (+)= Σ over tiles of partial[tile, c], split over warps: block = 32 columns x 8 warps; warp w adds tiles w, w + 8, ... in
// order (each a coalesced 128-byte row of partial), then thread (0, lane) adds the 8 warp sums in
// warp order. 8 dependent chains a column instead of one: at the 125m (32768 rows, 512 tiles) 64
// dependent L2 reads a warp instead of 512 a thread (the one-thread-a-column pass it replaced:
// norm + out gate backward 2.03 -> 1.36 ms a step, session 21). Fixed order: the same bits every run.
__global__ void __launch_bounds__(32 * kNormGateWarps) xl_norm_gate_dweight_warps(XlstmLargeNormGateArgs a,
                                                                                  int64_t tiles) {
  __shared__ float warp_sum[kNormGateWarps][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + lane;
  float t = 0.f;
  if (c < a.dim)
    for (int64_t i = warp; i < tiles; i += kNormGateWarps) t += a.partial[i * a.dim + c];
  warp_sum[warp][lane] = t;
  __syncthreads();
  if (warp != 0 || c >= a.dim) return;
  float s = 0.f;
#pragma unroll
  for (int w = 0; w < kNormGateWarps; ++w) s += warp_sum[w][lane];
  a.dweight[c] = a.overwrite_dweight ? s : a.dweight[c] + s;
}

unsigned Blocks(int64_t n, int threads) { return static_cast<unsigned>((n + threads - 1) / threads); }

// ceil(dv / 256) for a shape the fused kernels take, else 0.
int NormGateChunks(const XlstmLargeNormGateArgs& a) {
  if (a.heads <= 0 || a.dim <= 0 || a.dim % a.heads != 0) return 0;
  const int64_t dv = a.dim / a.heads;
  if (dv % 8 != 0 || dv > 1024) return 0;
  return static_cast<int>((dv + 255) / 256);
}

// ---------------------------------------------------------------- per-head width (pad / cut)

__global__ void xl_head_width(int64_t vectors, int src_vecs, int dst_vecs, const uint4* src, uint4* dst) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= vectors) return;
  const int64_t row_head = i / dst_vecs;
  const int j = static_cast<int>(i % dst_vecs);
  dst[i] = j < src_vecs ? src[row_head * src_vecs + j] : make_uint4(0u, 0u, 0u, 0u);
}

}  // namespace

CudaResult XlstmLargeHeadWidth(const XlstmLargeHeadWidthArgs& a, cudaStream_t stream) {
  if (a.rows < 0 || a.heads <= 0 || a.src_width <= 0 || a.dst_width <= 0 || a.src_width % 8 != 0 ||
      a.dst_width % 8 != 0 || a.src == nullptr || a.dst == nullptr ||
      reinterpret_cast<uintptr_t>(a.src) % 16 != 0 || reinterpret_cast<uintptr_t>(a.dst) % 16 != 0)
    return gyre::cuda::InvalidArgument("XlstmLargeHeadWidth: widths must be positive multiples of 8 and the "
                                       "pointers 16-byte aligned");
  const int64_t vectors = a.rows * a.heads * (a.dst_width / 8);
  if (vectors == 0) return {};
  xl_head_width<<<Blocks(vectors, 256), 256, 0, stream>>>(vectors, static_cast<int>(a.src_width / 8),
                                                          static_cast<int>(a.dst_width / 8),
                                                          static_cast<const uint4*>(a.src), static_cast<uint4*>(a.dst));
  CUDA_RETURN_IF_LAUNCH_ERROR("xl_head_width");
  return {};
}

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
      a.dpre == nullptr || a.dbi == nullptr || a.dbf == nullptr || a.partial == nullptr)
    return gyre::cuda::InvalidArgument("XlstmLargeGatesBackward: bad shape or missing pointer (partial included)");
  const int64_t ldpre = a.ldpre != 0 ? a.ldpre : 2 * a.heads;
  if (ldpre < 2 * a.heads) return gyre::cuda::InvalidArgument("XlstmLargeGatesBackward: ldpre < 2·heads");
  if (2 * a.heads > kMaxGateCols) return gyre::cuda::InvalidArgument("XlstmLargeGatesBackward: more than 32 heads");
  const int64_t tiles = (a.rows + kXlstmLargeGateTileRows - 1) / kXlstmLargeGateTileRows;
  if (tiles > 0) {
    xl_gates_bwd_tiles<<<static_cast<unsigned>(tiles), kGateTileThreads, 0, stream>>>(
        a.rows, static_cast<int>(a.heads), a.cap, a.pre, a.dig, a.dfg, static_cast<bf16*>(a.dpre), ldpre, a.partial);
    CUDA_RETURN_IF_LAUNCH_ERROR("xl_gates_bwd_tiles");
  }
  xl_gates_bias_sum<<<static_cast<unsigned>(2 * a.heads), kBwdThreads, 0, stream>>>(
      static_cast<int>(a.heads), tiles, a.partial, a.dbi, a.dbf, a.overwrite_db);
  CUDA_RETURN_IF_LAUNCH_ERROR("xl_gates_bias_sum");
  return {};
}

CudaResult XlstmLargeNormGateForward(const XlstmLargeNormGateArgs& a, cudaStream_t stream) {
  const int chunks = NormGateChunks(a);
  if (a.rows < 0 || chunks == 0 || a.h == nullptr || a.o == nullptr || a.weight == nullptr || a.y == nullptr ||
      a.mean == nullptr || a.rstd == nullptr)
    return gyre::cuda::InvalidArgument("XlstmLargeNormGateForward: bad shape (dv a multiple of 8, <= 1024) or "
                                       "missing pointer");
  if (a.rows == 0) return {};
  const dim3 grid(Blocks(a.rows, kNormGateWarps), static_cast<unsigned>(a.heads));
  const unsigned threads = 32 * kNormGateWarps;
  switch (chunks) {
    case 1: xl_norm_gate_fwd<1><<<grid, threads, 0, stream>>>(a); break;
    case 2: xl_norm_gate_fwd<2><<<grid, threads, 0, stream>>>(a); break;
    case 3: xl_norm_gate_fwd<3><<<grid, threads, 0, stream>>>(a); break;
    default: xl_norm_gate_fwd<4><<<grid, threads, 0, stream>>>(a); break;
  }
  CUDA_RETURN_IF_LAUNCH_ERROR("xl_norm_gate_fwd");
  return {};
}

CudaResult XlstmLargeNormGateBackward(const XlstmLargeNormGateArgs& a, cudaStream_t stream) {
  const int chunks = NormGateChunks(a);
  if (a.rows < 0 || chunks == 0 || a.h == nullptr || a.o == nullptr || a.weight == nullptr || a.mean == nullptr ||
      a.rstd == nullptr || a.dy == nullptr || a.dh == nullptr || a.d_o == nullptr || a.dweight == nullptr ||
      a.partial == nullptr || a.tile_rows < kNormGateWarps || a.tile_rows % kNormGateWarps != 0 ||
      a.ld_do % 8 != 0 || (a.ld_do != 0 && a.ld_do < a.dim))
    return gyre::cuda::InvalidArgument("XlstmLargeNormGateBackward: bad shape (dv a multiple of 8, <= 1024; "
                                       "tile_rows a multiple of 8; ld_do 0 or a multiple of 8 >= dim) or missing pointer");
  if (a.rows == 0) return {};
  const int64_t tiles = (a.rows + a.tile_rows - 1) / a.tile_rows;
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(a.heads));
  const unsigned threads = 32 * kNormGateWarps;
  switch (chunks) {
    case 1: xl_norm_gate_bwd<1><<<grid, threads, 0, stream>>>(a); break;
    case 2: xl_norm_gate_bwd<2><<<grid, threads, 0, stream>>>(a); break;
    case 3: xl_norm_gate_bwd<3><<<grid, threads, 0, stream>>>(a); break;
    default: xl_norm_gate_bwd<4><<<grid, threads, 0, stream>>>(a); break;
  }
  CUDA_RETURN_IF_LAUNCH_ERROR("xl_norm_gate_bwd");
  xl_norm_gate_dweight_warps<<<Blocks(a.dim, 32), threads, 0, stream>>>(a, tiles);
  CUDA_RETURN_IF_LAUNCH_ERROR("xl_norm_gate_dweight_warps");
  return {};
}

}  // namespace gyre::ops::cuda_ops
