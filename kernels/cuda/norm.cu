// RMSNorm / LayerNorm (+ residual) forward and backward; the contract is in norm.h.
//
// Kernels:
//   norm_fwd_kernel1      one warp per row; pass 1 forms s (x + residual, rounded to bf16 and
//                         stored) and Σs (Layer) or Σs²; LayerNorm re-reads s for Σ(s - mean)²
//                         (two-pass variance, no cancellation); the last pass writes y. Re-reads
//                         of a row (d·2 bytes, 1.5-4 KB) hit L1.
//   rms_fwd_kernel2       RMSNorm forward, d % 8 == 0, d <= 2048, aligned: one warp per row,
//                         the row's x (and residual) loaded once into registers (all 16-byte
//                         loads in flight together), s kept packed for the y pass.
//   norm_bwd_dx_kernel1   one warp per row: Σg and Σg·xhat, then ds.
//   norm_bwd_dw_kernel1   column partial sums of dy·xhat and dy over a chunk of rows; block
//                         (32, 8) covers 64 columns, each thread 2 adjacent columns.
//   rms_bwd_strided_kernel  RMSNorm backward in one pass (d % 8 == 0, d <= 2048, aligned): blocks
//                         of 4 warps, 32 or 64 rows each, taken as 4-row groups strided across
//                         the grid (a wave reads one contiguous band of rows); a warp one row at
//                         a time; each lane loads its row slice of dy, s and dresidual once
//                         (16-byte loads, all issued before the first use), reduces Σ g·xhat
//                         with shuffles, writes dx, and adds dy·xhat into its warp's column sums
//                         in shared memory. The 4 warps' sums meet in shared memory and one
//                         [blocks, d] partial row per block goes out. 8 bytes per element (dy, s,
//                         dresidual read once, dx written) instead of the 12 of the three-kernel
//                         path, whose dw kernel re-read dy and s with 2-byte accesses.
//   norm_bwd_dw_reduce2/3 fixed-order column sums of the partials: 32 columns x 32 chunk lanes
//                         per block, then the 32 lanes in order through shared memory; reduce3 is
//                         the same body launched as a programmatic dependent of the fused kernel.
//
// Measurements and what was tried: kernels/cuda/norm_notes.md.
#include "kernels/cuda/norm.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/vec_util.cuh"

namespace gyre::cuda {
namespace {

constexpr int kWarpsPerBlock = 4;

__device__ __forceinline__ void UnpackBf16x8(const uint4& raw, float (&out)[8]) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

// w = weight[c, c + 8), or ones when the norm has no scale.
__device__ __forceinline__ void LoadScale8(const __nv_bfloat16* weight, int64_t c, float (&w)[8]) {
  if (weight) {
    LoadBf16<8>(weight + c, w);
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) w[i] = 1.f;
  }
}

template <int V>
__global__ void norm_fwd_kernel1(NormForwardArgs a) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (row >= a.rows) return;
  const int lane = threadIdx.x % 32;
  const int64_t d = a.dim;
  const __nv_bfloat16* x = a.x + row * d;
  const __nv_bfloat16* res = a.residual ? a.residual + row * d : nullptr;
  __nv_bfloat16* s_out = a.residual ? a.residual_out + row * d : nullptr;
  const __nv_bfloat16* s_in = s_out ? s_out : x;  // where later passes read s from
  const bool layer = a.kind == NormKind::kLayer;

  // Pass 1: s, and Σs (Layer) or Σs² (RMS).
  float acc = 0.f;
  for (int64_t c = lane * V; c < d; c += 32 * V) {
    float v[V];
    LoadBf16<V>(x + c, v);
    if (res) {
      float r[V];
      LoadBf16<V>(res + c, r);
#pragma unroll
      for (int i = 0; i < V; ++i) v[i] = RoundToBf16(v[i] + r[i]);
      StoreBf16<V>(s_out + c, v);
    }
#pragma unroll
    for (int i = 0; i < V; ++i) acc += layer ? v[i] : v[i] * v[i];
  }
  acc = WarpSum(acc);
  float mean = 0.f, rstd;
  if (layer) {
    mean = acc / static_cast<float>(d);
    float var = 0.f;
    for (int64_t c = lane * V; c < d; c += 32 * V) {
      float v[V];
      LoadBf16<V>(s_in + c, v);
#pragma unroll
      for (int i = 0; i < V; ++i) var += (v[i] - mean) * (v[i] - mean);
    }
    var = WarpSum(var);
    rstd = rsqrtf(var / static_cast<float>(d) + a.eps);
  } else {
    rstd = rsqrtf(acc / static_cast<float>(d) + a.eps);
  }
  if (lane == 0) {
    a.rstd[row] = rstd;
    if (layer) a.mean[row] = mean;
  }
  // Last pass: y.
  for (int64_t c = lane * V; c < d; c += 32 * V) {
    float v[V];
    LoadBf16<V>(s_in + c, v);
    float w[V], b[V];
    if (a.weight) {
      LoadBf16<V>(a.weight + c, w);
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) w[i] = 1.f;
    }
    if (a.bias) {
      LoadBf16<V>(a.bias + c, b);
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) b[i] = 0.f;
    }
#pragma unroll
    for (int i = 0; i < V; ++i) v[i] = (v[i] - mean) * rstd * w[i] + b[i];
    StoreBf16<V>(a.y + row * d + c, v);
  }
}

template <int V>
__global__ void norm_bwd_dx_kernel1(NormBackwardArgs a) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (row >= a.rows) return;
  const int lane = threadIdx.x % 32;
  const int64_t d = a.dim;
  const bool layer = a.kind == NormKind::kLayer;
  const float mean = layer ? a.mean[row] : 0.f;
  const float rstd = a.rstd[row];
  const __nv_bfloat16* dy = a.dy + row * d;
  const __nv_bfloat16* s = a.s + row * d;
  float sum_g = 0.f, sum_gx = 0.f;
  for (int64_t c = lane * V; c < d; c += 32 * V) {
    float g[V], v[V], w[V];
    LoadBf16<V>(dy + c, g);
    LoadBf16<V>(s + c, v);
    if (a.weight) {
      LoadBf16<V>(a.weight + c, w);
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) w[i] = 1.f;
    }
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const float gi = g[i] * w[i];
      sum_g += gi;
      sum_gx += gi * (v[i] - mean) * rstd;
    }
  }
  sum_g = WarpSum(sum_g);
  sum_gx = WarpSum(sum_gx);
  const float m1 = layer ? sum_g / static_cast<float>(d) : 0.f;
  const float m2 = sum_gx / static_cast<float>(d);
  for (int64_t c = lane * V; c < d; c += 32 * V) {
    float g[V], v[V], w[V], out[V];
    LoadBf16<V>(dy + c, g);
    LoadBf16<V>(s + c, v);
    if (a.weight) {
      LoadBf16<V>(a.weight + c, w);
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) w[i] = 1.f;
    }
    float r[V];
    if (a.dresidual) {
      LoadBf16<V>(a.dresidual + row * d + c, r);
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) r[i] = 0.f;
    }
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const float xhat = (v[i] - mean) * rstd;
      out[i] = rstd * (g[i] * w[i] - m1 - xhat * m2) + r[i];
    }
    StoreBf16<V>(a.dx + row * d + c, out);
  }
}

constexpr int kDwCols = 64;     // columns per block (32 threads x 2)
constexpr int kDwRowsLanes = 8; // threadIdx.y

// partial_w/partial_b [chunks, d]: column sums of dy·xhat and dy over rows of chunk blockIdx.y.
__global__ void norm_bwd_dw_kernel1(NormBackwardArgs a, int64_t rows_per_chunk,
                                    float* partial_w, float* partial_b) {
  const int64_t d = a.dim;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kDwCols + threadIdx.x * 2;
  const int64_t r_begin = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t r_end = min(a.rows, r_begin + rows_per_chunk);
  const bool layer = a.kind == NormKind::kLayer;
  float acc_w[2] = {0.f, 0.f}, acc_b[2] = {0.f, 0.f};
  for (int64_t r = r_begin + threadIdx.y; r < r_end; r += kDwRowsLanes) {
    const float mean = layer ? a.mean[r] : 0.f;
    const float rstd = a.rstd[r];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int64_t c = c0 + j;
      if (c < d) {
        const float g = __bfloat162float(a.dy[r * d + c]);
        const float xhat = (__bfloat162float(a.s[r * d + c]) - mean) * rstd;
        acc_w[j] += g * xhat;
        acc_b[j] += g;
      }
    }
  }
  __shared__ float sw[kDwRowsLanes][kDwCols];
  __shared__ float sb[kDwRowsLanes][kDwCols];
  sw[threadIdx.y][threadIdx.x * 2] = acc_w[0];
  sw[threadIdx.y][threadIdx.x * 2 + 1] = acc_w[1];
  sb[threadIdx.y][threadIdx.x * 2] = acc_b[0];
  sb[threadIdx.y][threadIdx.x * 2 + 1] = acc_b[1];
  __syncthreads();
  if (threadIdx.y == 0) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int64_t c = c0 + j;
      if (c < d) {
        float tw = 0.f, tb = 0.f;
        for (int y = 0; y < kDwRowsLanes; ++y) {
          tw += sw[y][threadIdx.x * 2 + j];
          tb += sb[y][threadIdx.x * 2 + j];
        }
        partial_w[static_cast<int64_t>(blockIdx.y) * d + c] = tw;
        partial_b[static_cast<int64_t>(blockIdx.y) * d + c] = tb;
      }
    }
  }
}

// RMSNorm forward with the row in registers (d % 8 == 0, d <= 2048, aligned): one warp per row,
// every 16-byte load of x (and residual) issued before the first use, s kept packed in
// registers for the y pass (the three-pass kernel re-read it from L1/L2 and issued one 16-byte
// load per lane per loop trip).
template <int NV>
__global__ void __launch_bounds__(32 * kWarpsPerBlock) rms_fwd_kernel2(NormForwardArgs a) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (row >= a.rows) return;
  const int lane = threadIdx.x % 32;
  const int64_t d = a.dim;
  const __nv_bfloat16* x = a.x + row * d;
  const __nv_bfloat16* res = a.residual ? a.residual + row * d : nullptr;
  uint4 s_raw[NV], r_raw[NV];
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int64_t c = (lane + 32 * k) * 8;
    if (c < d) {
      s_raw[k] = *reinterpret_cast<const uint4*>(x + c);
      if (res) r_raw[k] = *reinterpret_cast<const uint4*>(res + c);
    }
  }
  float acc = 0.f;
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int64_t c = (lane + 32 * k) * 8;
    if (c < d) {
      float v[8];
      UnpackBf16x8(s_raw[k], v);
      if (res) {
        float r[8];
        UnpackBf16x8(r_raw[k], r);
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = RoundToBf16(v[i] + r[i]);
        // v is bf16-representable: the packed copy kept for the y pass and the stored s are exact.
        __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&s_raw[k]);
#pragma unroll
        for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
        *reinterpret_cast<uint4*>(a.residual_out + row * d + c) = s_raw[k];
      }
#pragma unroll
      for (int i = 0; i < 8; ++i) acc += v[i] * v[i];
    }
  }
  const float rstd = rsqrtf(WarpSum(acc) / static_cast<float>(d) + a.eps);
  if (lane == 0) a.rstd[row] = rstd;
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int64_t c = (lane + 32 * k) * 8;
    if (c < d) {
      float v[8], w[8];
      UnpackBf16x8(s_raw[k], v);
      LoadScale8(a.weight, c, w);
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = v[i] * rstd * w[i];
      StoreBf16<8>(a.y + row * d + c, v);
    }
  }
}

// Rows per block: 64, or 32 when 64 would leave fewer than 512 blocks (4 per SM on a 132-SM
// card: llama-1.3b's 16,384 rows made 256 blocks, 2 per SM, at ~62% of the copy rate). A
// function of rows only, so the summation order (hence the bits) is the same on every device.
int64_t FusedRowsPerBlock(int64_t rows) { return CeilDiv(rows, 64) >= 512 ? 64 : 32; }

// RMSNorm backward in one pass (d % 8 == 0, d <= 2048, aligned rows). Each lane loads its slice
// of a row's dy, s and dresidual once (16-byte loads, all issued before the first use), the warp
// reduces Σ g·xhat with shuffles, writes dx (+ dresidual) and adds dy·xhat into its own column
// sums in shared memory, one [d] row per warp (each lane owns its columns: no races, no barriers
// until the block's final sum; registers hold only the row's packed inputs, so 4 blocks fit per
// SM). The 4 warps' sums meet in shared memory and one [blocks, d] partial row per block goes out;
// norm_bwd_dw_reduce3 sums those in block order.
//
// Row order (normbwd22, norm_notes.md): block b owns the 4-row groups b, b + blocks,
// b + 2·blocks, ..., warp w row 4·group + w, so at any moment the warps of all blocks read one
// contiguous band of rows instead of 512 places 32 rows apart (the contiguous order of the
// session-7 kernel: 2-5% slower at d 768-1536, 0.7% at 2048 on an H100). Blocks are a function
// of rows only: the grouping of rows into partials, hence dw's bits, is the same on every device.
// __restrict__ pointers and, when d = 256·NV with NV <= 4 (768, 1024: every lane owns NV full
// vectors), no per-vector bounds branches, so a pass's weight loads (L1 hits) issue together
// ahead of the dx stores (the old kernel's PTX did ld w, math, st dx, ld/st shared per vector);
// the branch-free form stops at NV 4 because ptxas spills it above (90-700 bytes at NV 6-8, where
// the three packed rows already take 96 of the 128 registers). griddepcontrol.launch_dependents
// at the start lets the reduce (a programmatic dependent launch) be set up while this grid runs.
template <int NV, bool kFull>
__global__ void __launch_bounds__(32 * kWarpsPerBlock, 4)
    rms_bwd_strided_kernel(NormBackwardArgs a, float* __restrict__ partial_w) {
  asm volatile("griddepcontrol.launch_dependents;");
  extern __shared__ float4 sums4[];  // [kWarpsPerBlock][d / 4]
  float* sums = reinterpret_cast<float*>(sums4);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t d = a.dim;
  const __nv_bfloat16* __restrict__ dy_base = a.dy;
  const __nv_bfloat16* __restrict__ s_base = a.s;
  const __nv_bfloat16* __restrict__ dres_base = a.dresidual;
  const __nv_bfloat16* __restrict__ weight = a.weight;
  const float* __restrict__ rstd_all = a.rstd;
  __nv_bfloat16* __restrict__ dx_base = a.dx;
  const float inv_d = 1.f / static_cast<float>(d);
  float* my_sums = sums + warp * d;
  const auto in_row = [&](int k) { return kFull || (lane + 32 * k) * 8 < d; };
  if (partial_w) {
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int64_t c = (lane + 32 * k) * 8;
      if (in_row(k)) {
        reinterpret_cast<float4*>(my_sums + c)[0] = make_float4(0.f, 0.f, 0.f, 0.f);
        reinterpret_cast<float4*>(my_sums + c)[1] = make_float4(0.f, 0.f, 0.f, 0.f);
      }
    }
  }
  const int64_t step = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp; row < a.rows; row += step) {
    const float rstd = rstd_all[row];
    const __nv_bfloat16* __restrict__ dy = dy_base + row * d;
    const __nv_bfloat16* __restrict__ s = s_base + row * d;
    const __nv_bfloat16* __restrict__ dres = dres_base ? dres_base + row * d : nullptr;
    uint4 dy_raw[NV], s_raw[NV], r_raw[NV];
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int64_t c = (lane + 32 * k) * 8;
      if (in_row(k)) {
        dy_raw[k] = *reinterpret_cast<const uint4*>(dy + c);
        s_raw[k] = *reinterpret_cast<const uint4*>(s + c);
        if (dres) r_raw[k] = *reinterpret_cast<const uint4*>(dres + c);
      }
    }
    float sum_gx = 0.f;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int64_t c = (lane + 32 * k) * 8;
      if (in_row(k)) {
        float g[8], v[8], w[8];
        UnpackBf16x8(dy_raw[k], g);
        UnpackBf16x8(s_raw[k], v);
        LoadScale8(weight, c, w);
#pragma unroll
        for (int i = 0; i < 8; ++i) sum_gx += g[i] * w[i] * (v[i] * rstd);
      }
    }
    const float m2 = WarpSum(sum_gx) * inv_d;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int64_t c = (lane + 32 * k) * 8;
      if (in_row(k)) {
        float g[8], v[8], w[8], r[8], out[8];
        UnpackBf16x8(dy_raw[k], g);
        UnpackBf16x8(s_raw[k], v);
        LoadScale8(weight, c, w);
        if (dres) {
          UnpackBf16x8(r_raw[k], r);
        } else {
#pragma unroll
          for (int i = 0; i < 8; ++i) r[i] = 0.f;
        }
        float gx[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const float xhat = v[i] * rstd;
          out[i] = rstd * (g[i] * w[i] - xhat * m2) + r[i];
          gx[i] = g[i] * xhat;
        }
        StoreBf16<8>(dx_base + row * d + c, out);
        if (partial_w) {
          float4* acc = reinterpret_cast<float4*>(my_sums + c);
          float4 lo = acc[0], hi = acc[1];
          lo.x += gx[0]; lo.y += gx[1]; lo.z += gx[2]; lo.w += gx[3];
          hi.x += gx[4]; hi.y += gx[5]; hi.z += gx[6]; hi.w += gx[7];
          acc[0] = lo;
          acc[1] = hi;
        }
      }
    }
  }
  if (!partial_w) return;  // uniform across the block: no barrier skipped
  __syncthreads();
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
    float t = 0.f;
#pragma unroll
    for (int w = 0; w < kWarpsPerBlock; ++w) t += sums[w * d + c];
    partial_w[static_cast<int64_t>(blockIdx.x) * d + c] = t;
  }
}

// out[c] += Σ_k partial[k, c] (out[c] = Σ_k ... without `accumulate`) in a fixed order (lane ty
// takes k ≡ ty mod kReduceLanes, then lanes 0.. in order): 32 columns x 32 chunk lanes per block,
// so a thread sums chunks / 32.
constexpr int kReduceLanes = 32;

// The reduce's body, shared by the default launch (reduce2) and the PDL one (reduce3: launched
// while the fused kernel drains, it waits for it with griddepcontrol.wait before any read).
__device__ __forceinline__ void DwReduceBody(const float* partial_w, const float* partial_b, int64_t chunks,
                                             int64_t d, float* dweight, float* dbias, bool accumulate) {
  __shared__ float sw[kReduceLanes][33];
  __shared__ float sb[kReduceLanes][33];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  float tw = 0.f, tb = 0.f;
  if (c < d) {
    // Four partials' loads issued before their adds (the adds keep the one-at-a-time order, so
    // the bits are those of the plain loop, whose compiled form issued each load right before
    // its add: one memory latency per chunk, 16 chunks per lane at 512 blocks).
    int64_t k = threadIdx.y;
    for (; k + 3 * kReduceLanes < chunks; k += 4 * kReduceLanes) {
      float w[4] = {0.f, 0.f, 0.f, 0.f}, b[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (dweight) w[j] = partial_w[(k + j * kReduceLanes) * d + c];
        if (dbias) b[j] = partial_b[(k + j * kReduceLanes) * d + c];
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        tw += w[j];
        tb += b[j];
      }
    }
    for (; k < chunks; k += kReduceLanes) {
      if (dweight) tw += partial_w[k * d + c];
      if (dbias) tb += partial_b[k * d + c];
    }
  }
  sw[threadIdx.y][threadIdx.x] = tw;
  sb[threadIdx.y][threadIdx.x] = tb;
  __syncthreads();
  if (threadIdx.y == 0 && c < d) {
    float w = 0.f, b = 0.f;
#pragma unroll
    for (int y = 0; y < kReduceLanes; ++y) {
      w += sw[y][threadIdx.x];
      b += sb[y][threadIdx.x];
    }
    if (dweight) dweight[c] = accumulate ? dweight[c] + w : w;
    if (dbias) dbias[c] = accumulate ? dbias[c] + b : b;
  }
}

__global__ void __launch_bounds__(32 * kReduceLanes)
    norm_bwd_dw_reduce2(const float* partial_w, const float* partial_b, int64_t chunks, int64_t d,
                        float* dweight, float* dbias, bool accumulate) {
  DwReduceBody(partial_w, partial_b, chunks, d, dweight, dbias, accumulate);
}

// Programmatic dependent launch (sm_90): the launch attribute lets this grid be set up while
// the fused kernel still runs; griddepcontrol.wait returns once that grid has finished and its
// writes are visible. Same body, same order: the same bits as reduce2.
__global__ void __launch_bounds__(32 * kReduceLanes)
    norm_bwd_dw_reduce3(const float* partial_w, const float* partial_b, int64_t chunks, int64_t d,
                        float* dweight, float* dbias, bool accumulate) {
  asm volatile("griddepcontrol.wait;" ::: "memory");
  DwReduceBody(partial_w, partial_b, chunks, d, dweight, dbias, accumulate);
}

bool Vectorizable(int64_t dim, std::initializer_list<const void*> ptrs) {
  if (dim % 8 != 0) return false;
  for (const void* p : ptrs) {
    if (p != nullptr && !Aligned16(p)) return false;
  }
  return true;
}

template <int NV, bool kFull>
CudaResult LaunchRmsBackwardStrided(const NormBackwardArgs& a, float* partial_w, int64_t blocks,
                                    cudaStream_t stream) {
  const size_t smem = partial_w ? sizeof(float) * kWarpsPerBlock * a.dim : 0;
  rms_bwd_strided_kernel<NV, kFull><<<static_cast<unsigned>(blocks), 32 * kWarpsPerBlock, smem, stream>>>(
      a, partial_w);
  CUDA_RETURN_IF_LAUNCH_ERROR("rms_bwd_strided_kernel");
  return {};
}

bool Overlaps(const void* p, const void* q, int64_t bytes) {
  if (p == nullptr || q == nullptr) return false;
  const auto a = reinterpret_cast<uintptr_t>(p), b = reinterpret_cast<uintptr_t>(q);
  return a < b + bytes && b < a + bytes;
}

CudaResult RmsBackwardFused(const NormBackwardArgs& a, DeviceAllocator* scratch, cudaStream_t stream) {
  const int64_t bytes = 2 * a.rows * a.dim;  // the kernel's __restrict__ pointers (norm.h)
  if (Overlaps(a.dx, a.dy, bytes) || Overlaps(a.dx, a.s, bytes) || Overlaps(a.dx, a.dresidual, bytes)) {
    return InvalidArgument("NormBackward: dx overlaps dy, s or dresidual");
  }
  // Blocks are a function of rows only: the grouping of rows into partials (hence the bits) is
  // the same on every device.
  const int64_t blocks = CeilDiv(a.rows, FusedRowsPerBlock(a.rows));
  if (blocks > 0x7fffffff) return InvalidArgument("NormBackward: too many rows");
  DeviceBuffer partial;
  float* partial_w = nullptr;
  if (a.dweight) {
    CUDA_RETURN_IF_NOT_OK(scratch->Allocate(sizeof(float) * blocks * a.dim, &partial));
    partial_w = partial.as<float>();
  }
  // Vectors of 8 per lane: NV = ceil(d / 256); the branch-free form up to NV 4 (see the kernel).
  const int nv = static_cast<int>(CeilDiv(a.dim, 256));
  const bool full = a.dim == 256 * nv;
  CudaResult r;
  switch (nv) {
    case 1: r = full ? LaunchRmsBackwardStrided<1, true>(a, partial_w, blocks, stream)
                     : LaunchRmsBackwardStrided<1, false>(a, partial_w, blocks, stream); break;
    case 2: r = full ? LaunchRmsBackwardStrided<2, true>(a, partial_w, blocks, stream)
                     : LaunchRmsBackwardStrided<2, false>(a, partial_w, blocks, stream); break;
    case 3: r = full ? LaunchRmsBackwardStrided<3, true>(a, partial_w, blocks, stream)
                     : LaunchRmsBackwardStrided<3, false>(a, partial_w, blocks, stream); break;
    case 4: r = full ? LaunchRmsBackwardStrided<4, true>(a, partial_w, blocks, stream)
                     : LaunchRmsBackwardStrided<4, false>(a, partial_w, blocks, stream); break;
    case 5: r = LaunchRmsBackwardStrided<5, false>(a, partial_w, blocks, stream); break;
    case 6: r = LaunchRmsBackwardStrided<6, false>(a, partial_w, blocks, stream); break;
    case 7: r = LaunchRmsBackwardStrided<7, false>(a, partial_w, blocks, stream); break;
    default: r = LaunchRmsBackwardStrided<8, false>(a, partial_w, blocks, stream); break;
  }
  if (!r.ok() || !a.dweight) return r;
  // The reduce as a programmatic dependent launch (its griddepcontrol.wait orders it after the
  // fused grid): 1.2-1.6 µs a call less than a plain launch (norm_notes.md, normbwd22).
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(CeilDiv(a.dim, 32)));
  cfg.blockDim = dim3(32, kReduceLanes);
  cfg.dynamicSmemBytes = 0;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  CUDA_RETURN_IF_ERROR(cudaLaunchKernelEx(&cfg, norm_bwd_dw_reduce3, static_cast<const float*>(partial_w),
                                          static_cast<const float*>(nullptr), blocks, a.dim, a.dweight,
                                          static_cast<float*>(nullptr), a.accumulate));
  return {};
}

}  // namespace

CudaResult NormForward(const NormForwardArgs& a, cudaStream_t stream) {
  if (a.rows < 0 || a.dim <= 0 || !a.x || !a.y || !a.rstd) {
    return InvalidArgument("NormForward: need rows >= 0, dim > 0, x, y, rstd");
  }
  if ((a.residual != nullptr) != (a.residual_out != nullptr)) {
    return InvalidArgument("NormForward: residual and residual_out go together");
  }
  if (a.kind == NormKind::kLayer && !a.mean) return InvalidArgument("NormForward: LayerNorm needs mean");
  if (a.kind == NormKind::kRms && a.bias) return InvalidArgument("NormForward: RMSNorm has no bias");
  if (a.rows == 0) return {};
  const dim3 grid(static_cast<unsigned>(CeilDiv(a.rows, kWarpsPerBlock)));
  const dim3 block(32 * kWarpsPerBlock);
  const bool vectorizable = Vectorizable(a.dim, {a.x, a.residual, a.residual_out, a.weight, a.bias, a.y});
  if (vectorizable && a.kind == NormKind::kRms && a.dim <= 2048) {
    switch (CeilDiv(a.dim, 256)) {
      case 1: rms_fwd_kernel2<1><<<grid, block, 0, stream>>>(a); break;
      case 2: rms_fwd_kernel2<2><<<grid, block, 0, stream>>>(a); break;
      case 3: rms_fwd_kernel2<3><<<grid, block, 0, stream>>>(a); break;
      case 4: rms_fwd_kernel2<4><<<grid, block, 0, stream>>>(a); break;
      case 5: rms_fwd_kernel2<5><<<grid, block, 0, stream>>>(a); break;
      case 6: rms_fwd_kernel2<6><<<grid, block, 0, stream>>>(a); break;
      case 7: rms_fwd_kernel2<7><<<grid, block, 0, stream>>>(a); break;
      default: rms_fwd_kernel2<8><<<grid, block, 0, stream>>>(a); break;
    }
    CUDA_RETURN_IF_LAUNCH_ERROR("rms_fwd_kernel2");
    return {};
  }
  if (vectorizable) {
    norm_fwd_kernel1<8><<<grid, block, 0, stream>>>(a);
  } else {
    norm_fwd_kernel1<1><<<grid, block, 0, stream>>>(a);
  }
  CUDA_RETURN_IF_LAUNCH_ERROR("norm_fwd_kernel1");
  return {};
}

CudaResult NormBackward(const NormBackwardArgs& a, DeviceAllocator* scratch, cudaStream_t stream) {
  if (a.rows < 0 || a.dim <= 0 || !a.dy || !a.s || !a.rstd || !a.dx) {
    return InvalidArgument("NormBackward: need rows >= 0, dim > 0, dy, s, rstd, dx");
  }
  if (a.kind == NormKind::kLayer && !a.mean) return InvalidArgument("NormBackward: LayerNorm needs mean");
  if (a.rows == 0) {  // the empty sums
    if (!a.accumulate && a.dweight) CUDA_RETURN_IF_ERROR(cudaMemsetAsync(a.dweight, 0, sizeof(float) * a.dim, stream));
    if (!a.accumulate && a.dbias) CUDA_RETURN_IF_ERROR(cudaMemsetAsync(a.dbias, 0, sizeof(float) * a.dim, stream));
    return {};
  }
  if (a.kind == NormKind::kRms && a.dbias == nullptr && a.dim <= 2048 &&
      Vectorizable(a.dim, {a.dy, a.s, a.weight, a.dresidual, a.dx})) {
    return RmsBackwardFused(a, scratch, stream);
  }
  const dim3 grid(static_cast<unsigned>(CeilDiv(a.rows, kWarpsPerBlock)));
  const dim3 block(32 * kWarpsPerBlock);
  if (Vectorizable(a.dim, {a.dy, a.s, a.weight, a.dresidual, a.dx})) {
    norm_bwd_dx_kernel1<8><<<grid, block, 0, stream>>>(a);
  } else {
    norm_bwd_dx_kernel1<1><<<grid, block, 0, stream>>>(a);
  }
  CUDA_RETURN_IF_LAUNCH_ERROR("norm_bwd_dx_kernel1");
  if (!a.dweight && !a.dbias) return {};
  // Fixed chunking (a function of rows only) keeps the summation order, hence the bits, the same
  // on every device.
  const int64_t chunks = std::min<int64_t>(std::max<int64_t>(CeilDiv(a.rows, 64), 1), 128);
  const int64_t rows_per_chunk = CeilDiv(a.rows, chunks);
  DeviceBuffer partial;
  CUDA_RETURN_IF_NOT_OK(scratch->Allocate(sizeof(float) * 2 * chunks * a.dim, &partial));
  float* partial_w = partial.as<float>();
  float* partial_b = partial_w + chunks * a.dim;
  const dim3 grid_dw(static_cast<unsigned>(CeilDiv(a.dim, kDwCols)), static_cast<unsigned>(chunks));
  norm_bwd_dw_kernel1<<<grid_dw, dim3(32, kDwRowsLanes), 0, stream>>>(a, rows_per_chunk, partial_w,
                                                                     partial_b);
  CUDA_RETURN_IF_LAUNCH_ERROR("norm_bwd_dw_kernel1");
  norm_bwd_dw_reduce2<<<static_cast<unsigned>(CeilDiv(a.dim, 32)), dim3(32, kReduceLanes), 0, stream>>>(
      partial_w, partial_b, chunks, a.dim, a.dweight, a.dbias, a.accumulate);
  CUDA_RETURN_IF_LAUNCH_ERROR("norm_bwd_dw_reduce2");
  // `partial` returns to the cache here; the stream-ordered reuse rule (device_allocator.h)
  // makes that safe for later work on the same stream.
  return {};
}

}  // namespace gyre::cuda
