// Kernels of ops/recurrent_cuda.h. All memory-bound; layouts and contracts in the header.
// Deterministic column reductions (parameter gradients, the fused mLSTM gate sums): a block sums
// its rows (or its columns) in a fixed order through shared memory and writes one partial row
// to scratch ([chunks, n]; the scalar kernels use blocks of 32 columns x 8 row lanes over
// chunks of kRowsPerBlock rows); reduce_partials then sums the chunks in a fixed order into the
// output (= or +=). No float atomics in this file: the same inputs give the same bits.
#include "ops/recurrent_cuda.h"

#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>
#include <type_traits>

#include "kernels/cuda/cuda_check.h"

namespace gyre::ops::cuda_ops {
namespace {

using bf16 = __nv_bfloat16;
constexpr int kRowsPerBlock = 256;
constexpr int kMaxGates = 16;  // 2 x heads of the mLSTM gates (heads <= 8)

__device__ inline float F(const void* p, int64_t i) { return __bfloat162float(static_cast<const bf16*>(p)[i]); }
__device__ inline void St(void* p, int64_t i, float v) { static_cast<bf16*>(p)[i] = __float2bfloat16(v); }
// __fdividef (MUFU reciprocal + multiply, 2 ulp; 1 + e^-z >= 1, 0 above 2^126 = the true limit)
// instead of an IEEE division: the norms recompute SiLU(z) per element in both passes. Mamba-2's
// gated norm on an H200 (rglue9 call 1, ms per 16 x 2048 step): backward 5.78 -> 4.18, forward
// 3.08 -> 2.49.
__device__ inline float Sigmoid(float z) { return __fdividef(1.f, 1.f + __expf(-z)); }
__device__ inline float Silu(float z) { return z * Sigmoid(z); }
__device__ inline float DSilu(float z) {
  const float s = Sigmoid(z);
  return s * (1.f + z * (1.f - s));
}
__device__ inline float WarpSum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
// Sum over each aligned group of kLanes lanes (the whole warp takes part).
template <int kLanes>
__device__ inline float LaneGroupSum(float v) {
#pragma unroll
  for (int o = kLanes / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// 8 (4) consecutive bf16 <-> fp32 through one 16-byte (8-byte) access; the callers check alignment.
__device__ inline void Load8(const void* p, int64_t i, float* v) {
  const uint4 u = *reinterpret_cast<const uint4*>(static_cast<const bf16*>(p) + i);
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const float2 f = __bfloat1622float2(h[k]);
    v[2 * k] = f.x;
    v[2 * k + 1] = f.y;
  }
}
__device__ inline void Store8(void* p, int64_t i, const float* v) {
  uint4 u;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&u);
#pragma unroll
  for (int k = 0; k < 4; ++k) h[k] = __floats2bfloat162_rn(v[2 * k], v[2 * k + 1]);
  *reinterpret_cast<uint4*>(static_cast<bf16*>(p) + i) = u;
}
__device__ inline void Load4(const void* p, int64_t i, float* v) {
  const uint2 u = *reinterpret_cast<const uint2*>(static_cast<const bf16*>(p) + i);
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    const float2 f = __bfloat1622float2(h[k]);
    v[2 * k] = f.x;
    v[2 * k + 1] = f.y;
  }
}
__device__ inline void Store4(void* p, int64_t i, const float* v) {
  uint2 u;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&u);
#pragma unroll
  for (int k = 0; k < 2; ++k) h[k] = __floats2bfloat162_rn(v[2 * k], v[2 * k + 1]);
  *reinterpret_cast<uint2*>(static_cast<bf16*>(p) + i) = u;
}
// 8 consecutive fp32 (32-byte aligned by the callers' checks) through the read-only path.
__device__ inline void LoadF8(const float* p, float* v) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(p)), b = __ldg(reinterpret_cast<const float4*>(p) + 1);
  v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}

bool Aligned(const void* p, int bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

int Blocks(int64_t n, int threads) {
  return static_cast<int>(std::min<int64_t>((n + threads - 1) / threads, 65535 * 8));
}

CudaResult Launched(const char* what) { return gyre::cuda::CudaError(cudaGetLastError(), what, __FILE__, __LINE__); }

// ---------------------------------------------------------------- group norm

// dz's row stride in elements (GroupNormArgs::lddz; 0 = dim): the mLSTM block's fused up
// projection backward (GYRE_MLSTM_UP=fused) has the output norm write dz into its columns of the
// one [rows, 2p] gradient dxm | dz.
__device__ inline int64_t DzLd(const GroupNormArgs& a) { return a.lddz != 0 ? static_cast<int64_t>(a.lddz) : a.dim; }

template <int kMode>
__device__ inline float NormInput(const GroupNormArgs& a, int64_t r, int64_t c) {
  float v = F(a.x, r * a.dim + c);
  if (kMode == 1) v *= Silu(F(a.z, r * a.ldz + c));
  return v;
}

template <int kMode>
__global__ void group_norm_fwd(GroupNormArgs a) {
  const int64_t warp = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (warp >= a.rows * a.groups) return;
  const int64_t r = warp / a.groups, g = warp % a.groups, gs = a.dim / a.groups, c0 = g * gs;
  float s = 0.f;
  if (a.layer) {
    for (int64_t i = lane; i < gs; i += 32) s += NormInput<kMode>(a, r, c0 + i);
    s = WarpSum(s) / gs;
  }
  const float mean = s;
  float q = 0.f;
  for (int64_t i = lane; i < gs; i += 32) {
    const float d = NormInput<kMode>(a, r, c0 + i) - mean;
    q += d * d;
  }
  const float rstd = rsqrtf(WarpSum(q) / gs + a.eps);
  if (lane == 0) {
    if (a.mean) a.mean[warp] = mean;
    a.rstd[warp] = rstd;
  }
  for (int64_t i = lane; i < gs; i += 32) {
    const int64_t c = c0 + i;
    float n = (NormInput<kMode>(a, r, c) - mean) * rstd;
    if (a.weight) n *= a.weight[c] + a.weight_offset;
    if (kMode == 2) {
      const float hs = n + a.skip[c] * F(a.xc, r * a.dim + c);
      n = hs * Silu(F(a.z, r * a.ldz + c));
    }
    St(a.y, r * a.dim + c, n);
  }
}

// The gradient arriving at the norm's output N (before the skip / gate of mode 2).
template <int kMode>
__device__ inline float NormOutGrad(const GroupNormArgs& a, int64_t r, int64_t c) {
  float g = F(a.dy, r * a.dim + c);
  if (kMode == 2) g *= Silu(F(a.z, r * a.ldz + c));
  return g;
}

// GroupNormArgs::dresidual at (r, c), or 0.
__device__ inline float Residual(const GroupNormArgs& a, int64_t r, int64_t c) {
  return a.dresidual != nullptr ? F(a.dresidual, r * a.dim + c) : 0.f;
}

template <int kMode>
__global__ void group_norm_bwd(GroupNormArgs a) {
  const int64_t warp = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (warp >= a.rows * a.groups) return;
  const int64_t r = warp / a.groups, g = warp % a.groups, gs = a.dim / a.groups, c0 = g * gs;
  const float mean = a.layer ? a.mean[warp] : 0.f, rstd = a.rstd[warp];
  float s1 = 0.f, s2 = 0.f;
  for (int64_t i = lane; i < gs; i += 32) {
    const int64_t c = c0 + i;
    const float scale = a.weight ? a.weight[c] + a.weight_offset : 1.f;
    const float xhat = (NormInput<kMode>(a, r, c) - mean) * rstd;
    const float gout = NormOutGrad<kMode>(a, r, c);
    const float dxhat = gout * scale;
    s1 += dxhat;
    s2 += dxhat * xhat;
    if (kMode == 2) {
      const float zc = F(a.z, r * a.ldz + c), xcv = F(a.xc, r * a.dim + c);
      const float hs = xhat * scale + a.skip[c] * xcv;
      St(a.dz, r * DzLd(a) + c, F(a.dy, r * a.dim + c) * hs * DSilu(zc));
      St(a.dxc, r * a.dim + c, gout * a.skip[c]);
    }
  }
  s1 = WarpSum(s1) / gs;
  s2 = WarpSum(s2) / gs;
  const float m1 = a.layer ? s1 : 0.f;
  for (int64_t i = lane; i < gs; i += 32) {
    const int64_t c = c0 + i;
    const float scale = a.weight ? a.weight[c] + a.weight_offset : 1.f;
    const float xhat = (NormInput<kMode>(a, r, c) - mean) * rstd;
    const float dxa = rstd * (NormOutGrad<kMode>(a, r, c) * scale - m1 - xhat * s2);
    if (kMode == 1) {
      const float zc = F(a.z, r * a.ldz + c), xv = F(a.x, r * a.dim + c);
      St(a.dx, r * a.dim + c, dxa * Silu(zc));
      St(a.dz, r * a.dim + c, dxa * xv * DSilu(zc));
    } else {
      St(a.dx, r * a.dim + c, dxa + Residual(a, r, c));
    }
  }
}

// Partial sums over row chunk blockIdx.y: pw[chunk, c] = Σ_r gout·xhat; ps[chunk, c] = Σ_r gout·xc
// (mode 2).
template <int kMode>
__global__ void group_norm_param_grads(GroupNormArgs a, float* pw, float* ps) {
  __shared__ float sw[8][33], ss[8][33];
  const int64_t c = blockIdx.x * 32 + threadIdx.x;
  const int64_t r0 = blockIdx.y * (int64_t)kRowsPerBlock;
  const int64_t r1 = min(r0 + kRowsPerBlock, a.rows);
  float accw = 0.f, accs = 0.f;
  if (c < a.dim) {
    const int64_t gs = a.dim / a.groups, g = c / gs;
    for (int64_t r = r0 + threadIdx.y; r < r1; r += 8) {
      const int64_t st = r * a.groups + g;
      const float mean = a.layer ? a.mean[st] : 0.f;
      const float xhat = (NormInput<kMode>(a, r, c) - mean) * a.rstd[st];
      const float gout = NormOutGrad<kMode>(a, r, c);
      accw += gout * xhat;
      if (kMode == 2) accs += gout * F(a.xc, r * a.dim + c);
    }
  }
  sw[threadIdx.y][threadIdx.x] = accw;
  ss[threadIdx.y][threadIdx.x] = accs;
  __syncthreads();
  if (threadIdx.y == 0 && c < a.dim) {
    float tw = 0.f, ts = 0.f;
    for (int k = 0; k < 8; ++k) {
      tw += sw[k][threadIdx.x];
      ts += ss[k][threadIdx.x];
    }
    if (a.dweight) pw[blockIdx.y * a.dim + c] = tw;
    if (kMode == 2 && a.dskip) ps[blockIdx.y * a.dim + c] = ts;
  }
}

// ---------------------------------------------------------------- block-diagonal

__global__ void block_diag_fwd(BlockDiagArgs a) {
  const int64_t cols = a.blocks * a.block_out, n = a.rows * cols;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = e / cols, c = e % cols, b = c / a.block_out;
    const float* w = a.w + c * a.block_in;
    const int64_t xo = r * a.ldx + b * a.block_in;
    float s = 0.f;
    for (int64_t i = 0; i < a.block_in; ++i) s += F(a.x, xo + i) * w[i];
    St(a.y, r * a.ldy + c, s);
  }
}

// The mLSTM gates fused into the block-diagonal maps (BlockDiagArgs::gates), as the kernels take
// them: map m's gate weight columns already offset to its first column.
struct FusedGates {
  int heads = 0;  // 0: no gates
  int64_t ldg = 0;
  float* ig = nullptr;  // forward
  float* fg = nullptr;
  const float* dig = nullptr;  // backward
  const float* dfg = nullptr;
  const float* wi[2] = {nullptr, nullptr};
  const float* wf[2] = {nullptr, nullptr};
  float* dwi[2] = {nullptr, nullptr};
  float* dwf[2] = {nullptr, nullptr};
  float* dbi = nullptr;
  float* dbf = nullptr;
  bool overwrite_db = false;
};

// Scratch of the block-diagonal kernels' per-block sums: chunk k (a row chunk; a column block for
// `fwd`) at k · (row length), reduced by reduce_partials.
struct BdPartials {
  float* dw = nullptr;     // [chunks, blocks · block_out · block_in]
  float* dw2 = nullptr;
  float* gate0 = nullptr;  // map 0's gate weight columns: [chunks, 2 heads, cols]
  float* gate1 = nullptr;  // map 1's
  float* db = nullptr;     // [chunks, 2 heads]
  float* fwd = nullptr;    // forward gate sums: [column blocks, 2 (i, f), rows, heads]
};

__device__ inline float GateGrad(const FusedGates& g, int64_t r, int t) {
  return t < g.heads ? g.dig[r * g.heads + t] : g.dfg[r * g.heads + t - g.heads];
}
// (m selects with a branch, not an index: a dynamically indexed kernel parameter array would
// be copied to local memory.)
__device__ inline const float* GateW(const FusedGates& g, int m, int t) {
  return t < g.heads ? (m == 0 ? g.wi[0] : g.wi[1]) + t * g.ldg : (m == 0 ? g.wf[0] : g.wf[1]) + (t - g.heads) * g.ldg;
}
// dy of map m at (r, output column c) with the gate term added.
__device__ inline float DyTotal(const BlockDiagArgs& a, const FusedGates& g, int m, int64_t r, int64_t c) {
  float d = F(a.dy, r * a.ldy + c);
  for (int t = 0; t < 2 * g.heads; ++t) d += GateGrad(g, r, t) * GateW(g, m, t)[c];
  return d;
}

// ig = bi, fg = bf: the start of the gate sums the fused forward launches add to.
__global__ void gate_fwd_init(FusedGates g, const float* bi, const float* bf, int64_t rows) {
  const int64_t n = rows * g.heads;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x) {
    g.ig[e] = bi[e % g.heads];
    g.fg[e] = bf[e % g.heads];
  }
}

// Scalar fused forward, after block_diag_fwd wrote map m's y (ld ldy): one warp per row adds
// Σ_c y[r, c] wg[t, c] to the row's gates (the only writer of that row in this launch).
__global__ void gate_fwd(BlockDiagArgs a, FusedGates g, int m, const void* y) {
  const int64_t r = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (r >= a.rows) return;
  const int64_t cols = a.blocks * a.block_out;
  for (int t = 0; t < 2 * g.heads; ++t) {
    const float* w = GateW(g, m, t);
    float s = 0.f;
    for (int64_t c = lane; c < cols; c += 32) s += F(y, r * a.ldy + c) * w[c];
    s = WarpSum(s);
    if (lane == 0) {
      float* dst = t < g.heads ? g.ig + r * g.heads + t : g.fg + r * g.heads + t - g.heads;
      *dst += s;
    }
  }
}

__global__ void block_diag_bwd_dx(BlockDiagArgs a, FusedGates g, int m) {
  const int64_t cols = a.blocks * a.block_in, n = a.rows * cols;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = e / cols, c = e % cols, b = c / a.block_in, i = c % a.block_in;
    float s = 0.f;
    for (int64_t o = 0; o < a.block_out; ++o)
      s += DyTotal(a, g, m, r, b * a.block_out + o) * a.w[(b * a.block_out + o) * a.block_in + i];
    if (a.accumulate_dx) s += F(a.dx, r * a.ldx + c);
    St(a.dx, r * a.ldx + c, s);
  }
}

// Partial dw of row chunk blockIdx.y into part [chunks, cols · block_in].
__global__ void block_diag_bwd_dw(BlockDiagArgs a, FusedGates g, int m, float* part) {
  __shared__ float sm[8][33];
  const int64_t cols = a.blocks * a.block_out;
  const int64_t c = blockIdx.x * 32 + threadIdx.x;
  const int64_t r0 = blockIdx.y * (int64_t)kRowsPerBlock;
  const int64_t r1 = min(r0 + kRowsPerBlock, a.rows);
  float acc[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) acc[i] = 0.f;
  if (c < cols) {
    const int64_t b = c / a.block_out;
    for (int64_t r = r0 + threadIdx.y; r < r1; r += 8) {
      const float d = DyTotal(a, g, m, r, c);
#pragma unroll
      for (int i = 0; i < 8; ++i)
        if (i < a.block_in) acc[i] += d * F(a.x, r * a.ldx + b * a.block_in + i);
    }
  }
  for (int i = 0; i < a.block_in; ++i) {
    float v = 0.f;
#pragma unroll
    for (int k = 0; k < 8; ++k)
      if (k == i) v = acc[k];
    sm[threadIdx.y][threadIdx.x] = v;
    __syncthreads();
    if (threadIdx.y == 0 && c < cols) {
      float t = 0.f;
      for (int k = 0; k < 8; ++k) t += sm[k][threadIdx.x];
      part[blockIdx.y * cols * a.block_in + c * a.block_in + i] = t;
    }
    __syncthreads();
  }
}

// Gate weight gradients of map m's columns, partial over row chunk blockIdx.y:
// part[chunk, t, c] = Σ_r dgate[r, t] y[r, c], y recomputed from x (blockIdx.z = gate t).
__global__ void gate_bwd_dw(BlockDiagArgs a, FusedGates g, int m, float* part) {
  __shared__ float sm[8][33];
  const int t = blockIdx.z;
  const int64_t cols = a.blocks * a.block_out;
  const int64_t c = blockIdx.x * 32 + threadIdx.x;
  const int64_t r0 = blockIdx.y * (int64_t)kRowsPerBlock;
  const int64_t r1 = min(r0 + kRowsPerBlock, a.rows);
  float acc = 0.f;
  if (c < cols) {
    const int64_t b = c / a.block_out;
    const float* w = a.w + c * a.block_in;
    for (int64_t r = r0 + threadIdx.y; r < r1; r += 8) {
      float y = 0.f;
      for (int64_t i = 0; i < a.block_in; ++i) y += F(a.x, r * a.ldx + b * a.block_in + i) * w[i];
      acc += GateGrad(g, r, t) * y;
    }
  }
  sm[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    float s = 0.f;
    for (int k = 0; k < 8; ++k) s += sm[k][threadIdx.x];
    part[(blockIdx.y * (int64_t)(2 * g.heads) + t) * cols + c] = s;
  }
}

// One block per gate (the only writer): the bias gradients Σ_r dgate[r, t].
__global__ void gate_bwd_db(FusedGates g, int64_t rows) {
  __shared__ float sm[256];
  const int t = blockIdx.x;
  float s = 0.f;
  for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) s += GateGrad(g, r, t);
  sm[threadIdx.x] = s;
  __syncthreads();
  for (int o = blockDim.x / 2; o > 0; o >>= 1) {
    if (threadIdx.x < o) sm[threadIdx.x] += sm[threadIdx.x + o];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    float* o = t < g.heads ? g.dbi + t : g.dbf + t - g.heads;
    *o = g.overwrite_db ? sm[0] : *o + sm[0];
  }
}

// ---------------------------------------------------------------- columns

__global__ void add_column_bias(void* y, int64_t rows, int64_t cols, int64_t ld, const float* bias) {
  const int64_t n = rows * cols;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = e / cols, c = e % cols;
    St(y, r * ld + c, F(y, r * ld + c) + bias[c]);
  }
}

// part[chunk, c] = Σ_r x[r, c] over row chunk blockIdx.y.
__global__ void column_sum(const void* x, int64_t rows, int64_t cols, int64_t ld, float* part) {
  __shared__ float sm[8][33];
  const int64_t c = blockIdx.x * 32 + threadIdx.x;
  const int64_t r0 = blockIdx.y * (int64_t)kRowsPerBlock;
  const int64_t r1 = min(r0 + kRowsPerBlock, rows);
  float acc = 0.f;
  if (c < cols)
    for (int64_t r = r0 + threadIdx.y; r < r1; r += 8) acc += F(x, r * ld + c);
  sm[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    float t = 0.f;
    for (int k = 0; k < 8; ++k) t += sm[k][threadIdx.x];
    part[blockIdx.y * cols + c] = t;
  }
}

dim3 ColumnGrid(int64_t cols, int64_t rows) {
  return dim3(static_cast<unsigned>((cols + 31) / 32), static_cast<unsigned>((rows + kRowsPerBlock - 1) / kRowsPerBlock));
}

// ---------------------------------------------------------------- fixed-order reduce

// One output of reduce_partials: out column c (< n) gets Σ_k partial[k · chunk_stride + c] for
// k = 0 .. chunks - 1, at out[(c / seg) · out_stride + c % seg] (seg 0: out[c]).
enum ReduceMode : int { kReduceAdd = 0, kReduceSet = 1, kReduceSetBias = 2 };
struct ReduceJob {
  const float* partial = nullptr;
  int64_t chunks = 0, chunk_stride = 0, n = 0;
  float* out = nullptr;
  int64_t seg = 0, out_stride = 0;
  int mode = kReduceAdd;        // +=, =, or = bias[c % bias_period] + Σ
  const float* bias = nullptr;
  int64_t bias_period = 1;
};
constexpr int kMaxReduceJobs = 8;
struct ReduceJobs {
  ReduceJob job[kMaxReduceJobs];
  int count = 0;
  void Add(const ReduceJob& j) { job[count++] = j; }
};

// Block (32, kLanes), job blockIdx.y: lane ty sums chunks k ≡ ty (mod kLanes) in order, then lane
// 0 sums the lanes in order. The lane count depends only on the shapes, so the order is fixed.
template <int kLanes>
__global__ void __launch_bounds__(32 * kLanes) reduce_partials(ReduceJobs jobs) {
  __shared__ float sm[kLanes][33];
  ReduceJob j;
#pragma unroll
  for (int i = 0; i < kMaxReduceJobs; ++i)  // (constant indices: a dynamically indexed kernel
    if (i == static_cast<int>(blockIdx.y)) j = jobs.job[i];  // parameter would go to local memory)
  if (blockIdx.x * 32 >= j.n) return;  // uniform over the block
  const int64_t c = blockIdx.x * 32 + threadIdx.x;
  float t = 0.f;
  if (c < j.n)
    for (int64_t k = threadIdx.y; k < j.chunks; k += kLanes) t += j.partial[k * j.chunk_stride + c];
  if (kLanes > 1) {
    sm[threadIdx.y][threadIdx.x] = t;
    __syncthreads();
    if (threadIdx.y != 0) return;
    t = 0.f;
#pragma unroll
    for (int y = 0; y < kLanes; ++y) t += sm[y][threadIdx.x];
  }
  if (c >= j.n) return;
  float* o = j.out + (j.seg > 0 ? (c / j.seg) * j.out_stride + c % j.seg : c);
  if (j.mode == kReduceAdd) *o += t;
  else if (j.mode == kReduceSet) *o = t;
  else *o = j.bias[c % j.bias_period] + t;
}

ReduceJob Job(const float* partial, int64_t chunks, int64_t chunk_stride, int64_t n, float* out, bool overwrite) {
  ReduceJob j;
  j.partial = partial;
  j.chunks = chunks;
  j.chunk_stride = chunk_stride;
  j.n = n;
  j.out = out;
  j.mode = overwrite ? kReduceSet : kReduceAdd;
  return j;
}

CudaResult LaunchReduce(const ReduceJobs& jobs, cudaStream_t stream) {
  if (jobs.count == 0) return {};
  int64_t chunks = 0, n = 0;
  for (int i = 0; i < jobs.count; ++i) {
    chunks = std::max(chunks, jobs.job[i].chunks);
    n = std::max(n, jobs.job[i].n);
  }
  const dim3 grid(static_cast<unsigned>((n + 31) / 32), static_cast<unsigned>(jobs.count));
  if (chunks >= 128) reduce_partials<32><<<grid, dim3(32, 32), 0, stream>>>(jobs);
  else if (chunks >= 16) reduce_partials<8><<<grid, dim3(32, 8), 0, stream>>>(jobs);
  else reduce_partials<1><<<grid, dim3(32, 1), 0, stream>>>(jobs);
  return gyre::cuda::CudaError(cudaGetLastError(), "reduce_partials", __FILE__, __LINE__);
}

// Scratch for `floats` partial sums from the caching allocator (held until the caller returns:
// later work on the stream may reuse it, in stream order).
CudaResult Scratch(DeviceAllocator* alloc, int64_t floats, gyre::cuda::DeviceBuffer* buf) {
  if (alloc == nullptr) return gyre::cuda::InvalidArgument("recurrent glue: no scratch allocator");
  return alloc->Allocate(std::max<size_t>(1, static_cast<size_t>(floats) * sizeof(float)), buf);
}


// ---------------------------------------------------------------- vectorised fast paths
// Taken when the shapes and pointers allow 16-byte (norms, gates) or 8-byte (4x4 block-diagonal)
// accesses; the scalar kernels above remain the path for every other shape.

// cp.async of 8 (4) bytes global -> shared, through L1 (.ca: 16 bytes is the .cg minimum).
__device__ __forceinline__ void CpAsync8(void* dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(static_cast<uint32_t>(__cvta_generic_to_shared(dst))),
               "l"(src));
}
__device__ __forceinline__ void CpAsync4(void* dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(static_cast<uint32_t>(__cvta_generic_to_shared(dst))),
               "l"(src));
}
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }
// A gate row folded through both maps' 4x4 blocks: u·W + u2·W2 (w, w2 row-major [in][out]), the
// gate terms' dx contribution of one lane's block, precomputed once per lane.
__device__ __forceinline__ float4 FoldGateRow(float4 u, float4 u2, const float (&w)[16], const float (&w2)[16]) {
  float v[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    v[i] = u.x * w[i] + u.y * w[4 + i] + u.z * w[8 + i] + u.w * w[12 + i] + u2.x * w2[i] + u2.y * w2[4 + i] +
           u2.z * w2[8 + i] + u2.w * w2[12 + i];
  }
  return make_float4(v[0], v[1], v[2], v[3]);
}
template <int kPending>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}
__device__ inline void Bf16x4ToFloat(uint2 u, float* v) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
  const float2 a = __bfloat1622float2(h[0]), b = __bfloat1622float2(h[1]);
  v[0] = a.x; v[1] = a.y; v[2] = b.x; v[3] = b.y;
}

constexpr int kBdRows = 256;         // rows per block of the 4x4 block-diagonal kernels (8 lanes)
constexpr int kBdFwdAhead = 4;       // rows in flight per thread in their forward (no gates)
constexpr int kBdBwdRows = 512;      // rows per block of their backward (fewer partial rows)
// Rows of their backward in flight per thread (a cp.async ring of kStages rows, kStages - 1
// ahead): 3 rows ahead (48 KiB of loads in flight per SM at 2 blocks) where the ring fits the
// 48 KiB of static shared memory beside the gate weights (<= 4 heads); 1 with 16 gates.
// (An 8-row ring in dynamic shared memory, GYRE_BD_BWD=ring8, was no faster on an H100 in 2026-11-27:
// 2 maps 6.83 / 6.74 -> 6.69 / 7.03, 1 map 4.57 / 4.50 -> 4.76 / 5.01 ms an xlstm[1:0]-125m step; deleted.)
template <int kG>
constexpr int kBdBwdStages = kG <= 8 ? 4 : 2;
constexpr int kNormBwdRows = 64;     // rows per block of the group-norm backward (8 per warp)

// 4x4 blocks: thread (tx, ty) owns block b = 32·blockIdx.x + tx, its weights in registers, and
// rows r0 + ty, r0 + ty + 8, ... (a warp reads 32 neighbouring blocks of one row: 256 bytes).
// No gates (the fused-gate launches take block_diag4_fwd_gates below).
template <bool kTwo>
__global__ void __launch_bounds__(256) block_diag4_fwd(BlockDiagArgs a) {
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t b = blockIdx.x * 32 + tx;
  if (b >= a.blocks) return;
  float w[16], w2[16];
#pragma unroll
  for (int k = 0; k < 16; k += 8) {
    LoadF8(a.w + b * 16 + k, w + k);
    if (kTwo) LoadF8(a.w2 + b * 16 + k, w2 + k);
  }
  // x is the only load of a row (8 bytes a thread): one row at a time leaves too few bytes in
  // flight, so the loads run kBdFwdAhead rows ahead of the arithmetic (a register ring).
  const int64_t r0 = blockIdx.y * (int64_t)kBdRows, r1 = min(r0 + kBdRows, a.rows);
  float ring[kBdFwdAhead][4];
#pragma unroll
  for (int u = 0; u < kBdFwdAhead; ++u) {
    const int64_t r = r0 + ty + 8 * u;
    if (r < r1) {
      Load4(a.x, r * a.ldx + b * 4, ring[u]);
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i) ring[u][i] = 0.f;
    }
  }
#pragma unroll 1
  for (int64_t r = r0 + ty; r < r1; r += 8) {
    float x[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) x[i] = ring[0][i];
#pragma unroll
    for (int u = 0; u + 1 < kBdFwdAhead; ++u)
#pragma unroll
      for (int i = 0; i < 4; ++i) ring[u][i] = ring[u + 1][i];
    const int64_t rn = r + 8 * kBdFwdAhead;
    if (rn < r1) Load4(a.x, rn * a.ldx + b * 4, ring[kBdFwdAhead - 1]);
    float y[4], y2[4];
#pragma unroll
    for (int o = 0; o < 4; ++o) y[o] = w[o * 4] * x[0] + w[o * 4 + 1] * x[1] + w[o * 4 + 2] * x[2] + w[o * 4 + 3] * x[3];
    Store4(a.y, r * a.ldy + b * 4, y);
    if (kTwo) {
#pragma unroll
      for (int o = 0; o < 4; ++o)
        y2[o] = w2[o * 4] * x[0] + w2[o * 4 + 1] * x[1] + w2[o * 4 + 2] * x[2] + w2[o * 4 + 3] * x[3];
      Store4(a.y2, r * a.ldy + b * 4, y2);
    }
  }
}

// bf16x2 of (lo, hi) as one 32-bit register (lo in the low half: the mma fragments' order).
__device__ __forceinline__ uint32_t PackBf16(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}
// Four fp32 gate weights as an A fragment of hi + lo bf16 planes: x = hi + lo, hi = bf16(x),
// lo = bf16(x - hi); (hi0 hi1, hi2 hi3, lo0 lo1, lo2 lo3).
__device__ __forceinline__ uint4 SplitHiLoBf16(const float (&v)[4]) {
  float hi[4], lo[4];
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    hi[c] = __bfloat162float(__float2bfloat16_rn(v[c]));
    lo[c] = v[c] - hi[c];
  }
  return make_uint4(PackBf16(hi[0], hi[1]), PackBf16(hi[2], hi[3]), PackBf16(lo[0], lo[1]), PackBf16(lo[2], lo[3]));
}
// D += A·B, m16n8k16, bf16 inputs, fp32 accumulators (mma.sync: every lane takes part).
__device__ __forceinline__ void MmaBf16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                        uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// The 4x4 maps with the mLSTM gate sums fused in (FusedGates; gates G = 2·heads <= kG, kG 8 or
// 16). y as block_diag4_fwd (thread = block, weights in registers), but each warp takes tiles of
// 8 consecutive rows: the 8 rows' loads are issued together, each row's y is stored (bf16) and
// also kept in a per-warp shared tile; then the tile's gate sums over the warp's 128 columns
// (both maps) are tensor-core products
//   Σ[t, row] = Σ_k Wg[t, k] · y[row, k]      (m16n8k16: M = gates, N = the 8 rows, K = columns)
// with the fp32 gate weights split hi + lo into two bf16 operands (y is bf16 already, so the
// products are exact and the sums fp32: the old per-lane FMA sums of bf16 y times fp32 weights
// to ~2^-16 relative). K order inside a 16-column step is free as long as A and B agree: step j
// holds blocks 4j..4j+3, lane (g, q) = (lane / 4, lane % 4) supplying block 4j + q's columns 0,1
// (fragment k 2q, 2q+1) and 2,3 (k 2q+8, 2q+9). The old kernel spent ~110 of its ~200
// instructions per thread-row on these sums (64 FMAs, 16 shared loads, a 9-shuffle butterfly).
// Partial sums per column block to `part` [column blocks, 2, rows, heads], reduced as before.
constexpr int kBdTileRows = 8;
constexpr int kBdTileLd = 36;  // uint2 per tile row: 32 lanes + 4 (fragment reads free of bank conflicts)
template <bool kTwo, int kG>
struct BdFwdSmem {
  static constexpr int kMaps = kTwo ? 2 : 1;
  uint2 tile[8][kMaps][kBdTileRows][kBdTileLd];  // [warp][map][row][block]: the row's y, bf16
  uint4 afrag[kMaps][8][kG / 8][32];             // [map][k step][gate half][lane]: hi a0a1, a4a5, lo a0a1, a4a5
};
// The kernel's pieces, which block_diag4_qkv_rows (the decode step's one launch, below) runs too,
// so that the two have the same arithmetic, and so the same bits, by construction:
//   - BdGateFragments: the A fragments of kMaps maps' gate weights (gate_w(m, t): map m's weight
//     column of gate t, offset to the block's first column), built by the block's kThreads threads;
//   - BdLoadWeights / BdLoadTileRows: a lane's 4x4 weights, and its 8 bytes of each of a tile's rows;
//   - BdGatesTile: one warp's tile of kBdTileRows rows: the 4x4 products, their bf16 stores and
//     the shared tile, the gate mma over it, and the partials of column-block chunk `chunk`
//     ([chunk, 2 (i, f), rows, heads] of `part`).
// The kernel computes the lane's coordinates and the gate count where it did before they were
// pieces and hands them in (BdLane, G): recomputed inside, they moved in its PTX; as they are, the
// four block_diag4_fwd_gates entries have the PTX of b316d98 (tools/ptx/diff_rev.sh).
struct BdLane {
  int64_t b;   // the lane's 4x4 block, 32·blockIdx.x + threadIdx.x
  bool live;   // b < blocks: a dead lane loads zeros and stores nothing, but takes part in the mma
  int gq, qq;  // its mma fragment coordinates, lane / 4 and lane % 4
};
template <int kMaps, int kG, int kThreads, typename GateWeights>
__device__ __forceinline__ void BdGateFragments(uint4 (*afrag)[8][kG / 8][32], int64_t blocks, int G, int tid,
                                                GateWeights gate_w) {
  for (int e = tid; e < kMaps * 8 * (kG / 8) * 32; e += kThreads) {
    const int lane = e % 32, h = (e / 32) % (kG / 8), j = (e / (32 * (kG / 8))) % 8, m = e / (32 * (kG / 8) * 8);
    const int t = lane / 4 + 8 * h;
    const int64_t bb = blockIdx.x * 32 + 4 * j + lane % 4;
    float v[4] = {0.f, 0.f, 0.f, 0.f};
    if (bb < blocks && t < G) {
      const float4 f = __ldg(reinterpret_cast<const float4*>(gate_w(m, t) + bb * 4));
      v[0] = f.x; v[1] = f.y; v[2] = f.z; v[3] = f.w;
    }
    afrag[m][j][h][lane] = SplitHiLoBf16(v);
  }
}
template <bool kTwo>
__device__ __forceinline__ void BdLoadWeights(const BlockDiagArgs& a, int64_t b, bool live, float (&w)[16],
                                              float (&w2)[16]) {
#pragma unroll
  for (int k = 0; k < 16; k += 8) {
    if (live) {
      LoadF8(a.w + b * 16 + k, w + k);
      if (kTwo) LoadF8(a.w2 + b * 16 + k, w2 + k);
    } else {
#pragma unroll
      for (int c = 0; c < 8; ++c) w[k + c] = w2[k + c] = 0.f;
    }
  }
}
// Rows rt .. rt + kBdTileRows - 1 of x (those >= r1 as zeros).
__device__ __forceinline__ void BdLoadTileRows(const BlockDiagArgs& a, const BdLane& lane, int64_t rt, int64_t r1,
                                               uint2 (&raw)[kBdTileRows]) {
  const int64_t b = lane.b;
  const bool live = lane.live;
#pragma unroll
  for (int k = 0; k < kBdTileRows; ++k) {
    const int64_t r = rt + k;
    raw[k] = live && r < r1 ? *reinterpret_cast<const uint2*>(static_cast<const bf16*>(a.x) + r * a.ldx + b * 4)
                            : make_uint2(0u, 0u);
  }
}
// `tile`: the warp's [map][row][block] tile; `afrag`: the first map's fragments [map][k step][gate
// half][lane]. Ends with a __syncwarp, so the caller may rewrite the tile next.
template <bool kTwo, int kG>
__device__ __forceinline__ void BdGatesTile(const BlockDiagArgs& a, const FusedGates& g, int G, const BdLane& lane,
                                            const float (&w)[16], const float (&w2)[16],
                                            const uint2 (&raw)[kBdTileRows], uint2 (*tile)[kBdTileRows][kBdTileLd],
                                            const uint4 (*afrag)[8][kG / 8][32], int64_t rt, int64_t r1,
                                            unsigned chunk, float* part) {
  constexpr int kMaps = kTwo ? 2 : 1;
  const int tx = threadIdx.x, gq = lane.gq, qq = lane.qq;
  const int64_t b = lane.b;
  const bool live = lane.live;
#pragma unroll
  for (int k = 0; k < kBdTileRows; ++k) {
    const int64_t r = rt + k;
    float x[4];
    Bf16x4ToFloat(raw[k], x);
#pragma unroll
    for (int m = 0; m < kMaps; ++m) {
      const float* wm = m == 0 ? w : w2;
      float y[4];
#pragma unroll
      for (int o = 0; o < 4; ++o)
        y[o] = wm[o * 4] * x[0] + wm[o * 4 + 1] * x[1] + wm[o * 4 + 2] * x[2] + wm[o * 4 + 3] * x[3];
      const uint2 packed = make_uint2(PackBf16(y[0], y[1]), PackBf16(y[2], y[3]));
      if (live && r < r1) *reinterpret_cast<uint2*>(static_cast<bf16*>(m == 0 ? a.y : a.y2) + r * a.ldy + b * 4) = packed;
      tile[m][k][tx] = packed;
    }
  }
  __syncwarp();
  // acc[0..1]: gate gq, rows rt + 2qq, + 1; acc[2..3]: gate gq + 8 (kG 16; zero padding at 8).
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int m = 0; m < kMaps; ++m)
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const uint2 bf = tile[m][gq][4 * j + qq];
      const uint4 a0 = afrag[m][j][0][tx];
      uint4 a1 = make_uint4(0u, 0u, 0u, 0u);
      if constexpr (kG > 8) a1 = afrag[m][j][kG / 8 - 1][tx];
      MmaBf16(acc, a0.x, a1.x, a0.y, a1.y, bf.x, bf.y);  // hi
      MmaBf16(acc, a0.z, a1.z, a0.w, a1.w, bf.x, bf.y);  // lo
    }
  __syncwarp();  // the tile may be rewritten after this
#pragma unroll
  for (int half = 0; half < (kG > 8 ? 2 : 1); ++half) {
    const int t = gq + 8 * half;
    if (t >= G) continue;
    const int f = t < g.heads ? 0 : 1;
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int64_t r = rt + 2 * qq + c;
      if (r < r1) part[((chunk * 2 + f) * a.rows + r) * g.heads + t - f * g.heads] = acc[2 * half + c];
    }
  }
}
// (Prefetching each warp's next x tile by cp.async, GYRE_BD_FWD=pf, gained too little on an H100 in
// 2026-11-27: 2 maps 3.31 -> 3.13, 1 map 2.22 -> 2.23 ms an xlstm[1:0]-125m step; deleted.)
template <bool kTwo, int kG>
__global__ void __launch_bounds__(256, kTwo ? 2 : 3) block_diag4_fwd_gates(BlockDiagArgs a, FusedGates g, float* part) {
  constexpr int kMaps = kTwo ? 2 : 1;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  BdFwdSmem<kTwo, kG>& sm = *reinterpret_cast<BdFwdSmem<kTwo, kG>*>(smem_raw);
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * 32 + tx;
  const int64_t b = blockIdx.x * 32 + tx;
  const bool live = b < a.blocks;
  const int G = 2 * g.heads;
  // A fragments of the gate weights, shared by the block's 8 warps (same 128 columns).
  BdGateFragments<kMaps, kG, 256>(sm.afrag, a.blocks, G, tid, [&](int m, int t) { return GateW(g, m, t); });
  __syncthreads();
  float w[16], w2[16];
  BdLoadWeights<kTwo>(a, b, live, w, w2);
  const BdLane lane{b, live, tx / 4, tx % 4};
  const int64_t r0 = blockIdx.y * (int64_t)kBdRows, r1 = min(r0 + kBdRows, a.rows);
  for (int64_t rt = r0 + ty * kBdTileRows; rt < r1; rt += 8 * kBdTileRows) {  // uniform over the warp
    uint2 raw[kBdTileRows];
    BdLoadTileRows(a, lane, rt, r1, raw);
    BdGatesTile<kTwo, kG>(a, g, G, lane, w, w2, raw, sm.tile[ty], sm.afrag, rt, r1, blockIdx.x, part);
  }
}

// ---------------------------------------------------------------- decode: q, k, v and the gates in one launch
// The mLSTM decode step (m <= kQkvRowsMax rows: one token, or a speculative chunk of k tokens, at
// small batch) used to run BlockDiagForward twice (q, k from x_c; v from x_m), each launch a
// block_diag4_fwd_gates and a reduce_partials: four kernels of ~2-5 µs whose work at one row is a
// few KB (DECODE_GRAPHS.md: 16.9 µs a layer under the decode graph). block_diag4_qkv_rows does
// the same arithmetic in one launch, bit for bit:
//   - grid: the column blocks of block_diag4_fwd_gates (32 4x4 blocks = 128 channels each);
//     4 warps a block: warp (pass, tile) = (ty & 1, ty >> 1) runs pass 0 (q, k from x_c, both
//     maps in one accumulator) or pass 1 (v from x_m) over row tile rt = 8·tile, which is what
//     warp `tile` of the old q/k launch (of the v launch) did, through the same pieces
//     (BdLoadWeights, BdLoadTileRows, BdGateFragments, BdGatesTile): the same row loads, the same
//     4x4 products and bf16 stores, the same mma sequence over the same A fragments and B tiles
//     (its weight and row loads issued before the block-wide fragment phase, to overlap it), so
//     every y and every per-column-block gate partial has the old bits (the partial of a row does
//     not depend on the other rows of its tile: the mma forms each output from its own column).
//   - the partials go to scratch [pass, column block, 2 (i, f), rows, heads]; each block then
//     fences and takes a ticket; the last block to arrive loads them all into shared memory at
//     once (where they fit; else it reads them from L2 in the loop), sums the column blocks of
//     each pass in reduce_partials' order (FixedOrderPartialSum below) and writes
//       ig = (bi + Σ_qk) + Σ_v,   fg = (bf + Σ_qk) + Σ_v
//     which is the old pair of reductions (= bias + Σ, then += Σ) in the same fp32 order. So the
//     outputs carry the bits of the two-launch path at every row count (greedy == speculative and
//     graph == eager keep holding); decode_gpu_test compares them bit for bit and to float64.
//   - the ticket counter is one device word, reset by the last block: launches of this kernel must
//     not overlap (they do not: every caller enqueues on the backend's one compute stream).
constexpr int kQkvRowsMax = 16;
template <int kG>
struct QkvRowsSmem {
  uint2 tile[4][2][kBdTileRows][kBdTileLd];  // [warp][map][row][block]: the row's y, bf16
  uint4 afrag[3][8][kG / 8][32];             // [q, k, v][k step][gate half][lane], as BdFwdSmem
};
__device__ unsigned int g_qkv_rows_ticket = 0;

// Σ_k p[k · stride], k < chunks, in reduce_partials' order for that chunk count (LaunchReduce's
// lane choice; lane y sums k ≡ y mod lanes in order from 0, then the lanes in order from 0).
template <typename Read>
__device__ inline float FixedOrderPartialSum(Read read, int64_t chunks) {
  const int lanes = chunks >= 128 ? 32 : chunks >= 16 ? 8 : 1;
  float t = 0.f;
  if (lanes == 1) {
    for (int64_t k = 0; k < chunks; ++k) t += read(k);
    return t;
  }
  for (int y = 0; y < lanes; ++y) {
    float s = 0.f;
    for (int64_t k = y; k < chunks; k += lanes) s += read(k);
    t += s;
  }
  return t;
}

template <int kG>
__global__ void __launch_bounds__(128) block_diag4_qkv_rows(BlockDiagArgs qk, BlockDiagArgs v, FusedGates gqk,
                                                            FusedGates gv, const float* bi, const float* bf,
                                                            float* part) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  QkvRowsSmem<kG>& sm = *reinterpret_cast<QkvRowsSmem<kG>*>(smem_raw);
  __shared__ unsigned int ticket;
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * 32 + tx;
  const int64_t b = blockIdx.x * 32 + tx;
  const BdLane lane_qk{b, b < qk.blocks, tx / 4, tx % 4}, lane_v{b, b < v.blocks, tx / 4, tx % 4};
  const int G = 2 * gqk.heads;
  const int64_t rows = qk.rows, n = rows * gqk.heads, rt = (ty >> 1) * kBdTileRows;
  const bool active = rt < rows, pass_qk = (ty & 1) == 0;  // uniform over the warp
  // The warp's weights and rows first (block_diag4_fwd_gates' loads at r0 = 0, r1 = rows), so
  // their latency overlaps the fragment phase.
  float w[16], w2[16];
  uint2 raw[kBdTileRows];
  if (active) {
    if (pass_qk) {
      BdLoadWeights<true>(qk, lane_qk.b, lane_qk.live, w, w2);
      BdLoadTileRows(qk, lane_qk, rt, rows, raw);
    } else {
      BdLoadWeights<false>(v, lane_v.b, lane_v.live, w, w2);
      BdLoadTileRows(v, lane_v, rt, rows, raw);
    }
  }
  // A fragments of the three maps' gate weights (block_diag4_fwd_gates' loop over maps 0..2).
  BdGateFragments<3, kG, 128>(sm.afrag, qk.blocks, G, tid,
                              [&](int m, int t) { return m == 2 ? GateW(gv, 0, t) : GateW(gqk, m, t); });
  __syncthreads();
  // The partials as chunks [pass, column block] of [2, rows, heads]: chunk blockIdx.x of pass 0 is
  // at blockIdx.x · 2n, of pass 1 at (gridDim.x + blockIdx.x) · 2n.
  if (active) {
    if (pass_qk) {
      BdGatesTile<true, kG>(qk, gqk, G, lane_qk, w, w2, raw, sm.tile[ty], &sm.afrag[0], rt, rows, blockIdx.x,
                            part);
    } else {
      BdGatesTile<false, kG>(v, gv, 2 * gv.heads, lane_v, w, w2, raw, sm.tile[ty], &sm.afrag[2], rt, rows,
                             gridDim.x + blockIdx.x, part);
    }
  }
  // The last block to finish sums every block's partials (the threadFenceReduction pattern).
  __threadfence();
  __syncthreads();
  if (tid == 0) ticket = atomicAdd(&g_qkv_rows_ticket, 1u);
  __syncthreads();
  if (ticket != gridDim.x - 1) return;
  __threadfence();
  // The partials [2 passes, chunks, 2n] into shared memory first (all loads in flight at once;
  // the tiles and fragments are dead by now) where they fit, then the fixed-order sums.
  const int64_t chunks = gridDim.x, total = 2 * chunks * 2 * n;
  float* staged = reinterpret_cast<float*>(smem_raw);
  const bool stage = total * static_cast<int64_t>(sizeof(float)) <= static_cast<int64_t>(sizeof(QkvRowsSmem<kG>));
  if (stage) {
    for (int64_t e = tid; e < total; e += 128) staged[e] = __ldcg(part + e);
    __syncthreads();
  }
  const float* src = stage ? staged : part;
  for (int64_t e = tid; e < 2 * n; e += 128) {
    const int f = static_cast<int>(e / n);
    const int64_t c = e % n;
    const float* p0 = src + f * n + c;
    const float* p1 = src + chunks * 2 * n + f * n + c;
    const float s_qk = stage ? FixedOrderPartialSum([&](int64_t k) { return p0[k * 2 * n]; }, chunks)
                             : FixedOrderPartialSum([&](int64_t k) { return __ldcg(p0 + k * 2 * n); }, chunks);
    const float s_v = stage ? FixedOrderPartialSum([&](int64_t k) { return p1[k * 2 * n]; }, chunks)
                            : FixedOrderPartialSum([&](int64_t k) { return __ldcg(p1 + k * 2 * n); }, chunks);
    float o = (f == 0 ? bi : bf)[c % gqk.heads] + s_qk;  // reduce_partials' kReduceSetBias, stored
    o += s_v;                                             // then its kReduceAdd
    (f == 0 ? gqk.ig : gqk.fg)[c] = o;
  }
  if (tid == 0) g_qkv_rows_ticket = 0;
}

// The mLSTM block's conv1d forward, its three 4x4 block-diagonal maps and the gate sums in one
// pass (MlstmConvQkvForward; the default since session 14, GYRE_MLSTM_CONV_QKV=separate for the
// three launches; ops/XLSTM_GLUE.md). The separate path runs conv1d_fwd (xm -> xc),
// block_diag4_fwd_gates<true> (xc -> q, k) and <false> (xm -> v):
// xc is written and read back, and xm is read twice. Here each warp takes 8 consecutive rows of
// 4 channels a lane (one 4x4 block, as block_diag4_fwd_gates) and loads the K - 1 rows before them
// too (the conv's causal window; mostly L1 / L2 hits: the neighbouring warp loads them as its
// own rows); per row: xc = SiLU(bias + Σ_j w_j xm_{r-(K-1)+j}) (taps before the row's sequence
// start are zero, as conv1d_fwd with no state), rounded to bf16 and stored; q, k from the rounded
// xc, v from xm (the arithmetic of the separate kernels, so xc, q, k, v are the same bits); the
// gate sums as block_diag4_fwd_gates over the three maps' bf16 tiles (one accumulator, so the
// partials [column blocks, 2, rows, heads] hold q + k + v; the separate path sums q + k and v in
// two launches: same terms, another fp32 order). Heads <= 4 (8 gates).
// xm may be the first columns of wider rows (ldxm >= channels: the block's fused up projection,
// GYRE_MLSTM_UP=fused, writes x_m | z as one [rows, 2p] GEMM output).
struct ConvQkvParams {
  int64_t rows = 0, blocks = 0, ld = 0;  // ld: row stride of xc, q, k, v (= channels)
  int64_t ldxm = 0;                      // row stride of xm (>= channels)
  int64_t seq = 0;
  bool silu = false;
  const bf16* xm = nullptr;
  bf16* xc = nullptr;
  bf16* y0 = nullptr;  // q
  bf16* y1 = nullptr;  // k
  bf16* y2 = nullptr;  // v
  const float* cw = nullptr;  // [channels, K]
  const float* cb = nullptr;  // [channels] or null
  const float* w0 = nullptr;  // [blocks, 4, 4]: q, k, v
  const float* w1 = nullptr;
  const float* w2 = nullptr;
  const float* wi[3] = {nullptr, nullptr, nullptr};  // map m's gate weight columns (rows of ldg)
  const float* wf[3] = {nullptr, nullptr, nullptr};
  int64_t ldg = 0;
  int heads = 0;
};
struct ConvQkvSmem {
  uint2 tile[8][3][kBdTileRows][kBdTileLd];  // [warp][map][row][block]: the row's q / k / v, bf16
  uint4 afrag[3][8][32];                     // [map][k step][lane]: hi a0a1, a4a5, lo a0a1, a4a5
};
template <int K>
__global__ void __launch_bounds__(256, 2) mlstm_conv_qkv_fwd(ConvQkvParams a, float* part) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  ConvQkvSmem& sm = *reinterpret_cast<ConvQkvSmem*>(smem_raw);
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * 32 + tx;
  const int64_t b = blockIdx.x * 32 + tx;
  const bool live = b < a.blocks;
  const int G = 2 * a.heads;
  for (int e = tid; e < 3 * 8 * 32; e += 256) {
    const int lane = e % 32, j = (e / 32) % 8, m = e / (32 * 8);
    const int t = lane / 4;
    const int64_t bb = blockIdx.x * 32 + 4 * j + lane % 4;
    float v[4] = {0.f, 0.f, 0.f, 0.f};
    if (bb < a.blocks && t < G) {
      const float* base = t < a.heads ? (m == 0 ? a.wi[0] : m == 1 ? a.wi[1] : a.wi[2]) + t * a.ldg
                                      : (m == 0 ? a.wf[0] : m == 1 ? a.wf[1] : a.wf[2]) + (t - a.heads) * a.ldg;
      const float4 f = __ldg(reinterpret_cast<const float4*>(base + bb * 4));
      v[0] = f.x; v[1] = f.y; v[2] = f.z; v[3] = f.w;
    }
    sm.afrag[m][j][lane] = SplitHiLoBf16(v);
  }
  __syncthreads();
  float w[3][16], ck[K][4], cb[4];
#pragma unroll
  for (int k = 0; k < 16; k += 8) {
    if (live) {
      LoadF8(a.w0 + b * 16 + k, w[0] + k);
      LoadF8(a.w1 + b * 16 + k, w[1] + k);
      LoadF8(a.w2 + b * 16 + k, w[2] + k);
    } else {
#pragma unroll
      for (int c = 0; c < 8; ++c) w[0][k + c] = w[1][k + c] = w[2][k + c] = 0.f;
    }
  }
#pragma unroll
  for (int v = 0; v < 4; ++v) {
#pragma unroll
    for (int j = 0; j < K; ++j) ck[j][v] = live ? a.cw[(b * 4 + v) * K + j] : 0.f;
    cb[v] = live && a.cb != nullptr ? a.cb[b * 4 + v] : 0.f;
  }
  const int gq = tx / 4, qq = tx % 4;
  const int64_t r0 = blockIdx.y * (int64_t)kBdRows, r1 = min(r0 + kBdRows, a.rows);
  constexpr int kIn = kBdTileRows + K - 1;  // the tile's rows and the K - 1 before them
  for (int64_t rt = r0 + ty * kBdTileRows; rt < r1; rt += 8 * kBdTileRows) {  // uniform over the warp
    uint2 raw[kIn];
#pragma unroll
    for (int i = 0; i < kIn; ++i) {
      const int64_t r = rt - (K - 1) + i;
      raw[i] = live && r >= 0 && r < r1 ? *reinterpret_cast<const uint2*>(a.xm + r * a.ldxm + b * 4) : make_uint2(0u, 0u);
    }
    int pos = static_cast<int>(rt % a.seq);  // row rt's position in its sequence
#pragma unroll
    for (int k = 0; k < kBdTileRows; ++k) {
      const int64_t r = rt + k;
      // xc: taps j with pos - (K - 1) + j < 0 lie before the sequence start (zeros).
      float u[4] = {cb[0], cb[1], cb[2], cb[3]};
#pragma unroll
      for (int j = 0; j < K; ++j) {
        float xv[4];
        Bf16x4ToFloat(raw[k + j], xv);
        const bool in_seq = pos + j >= K - 1;
#pragma unroll
        for (int v = 0; v < 4; ++v) u[v] += ck[j][v] * (in_seq ? xv[v] : 0.f);
      }
      float xc[4];
#pragma unroll
      for (int v = 0; v < 4; ++v) xc[v] = a.silu ? u[v] * Sigmoid(u[v]) : u[v];
      const uint2 xcp = make_uint2(PackBf16(xc[0], xc[1]), PackBf16(xc[2], xc[3]));
      const bool store = live && r < r1;
      if (store) *reinterpret_cast<uint2*>(a.xc + r * a.ld + b * 4) = xcp;
      float xr[4], xm[4];
      Bf16x4ToFloat(xcp, xr);  // q and k read the stored (rounded) xc, as the separate kernels
      Bf16x4ToFloat(raw[k + K - 1], xm);
#pragma unroll
      for (int m = 0; m < 3; ++m) {
        const float* x = m == 2 ? xm : xr;
        float y[4];
#pragma unroll
        for (int o = 0; o < 4; ++o)
          y[o] = w[m][o * 4] * x[0] + w[m][o * 4 + 1] * x[1] + w[m][o * 4 + 2] * x[2] + w[m][o * 4 + 3] * x[3];
        const uint2 packed = make_uint2(PackBf16(y[0], y[1]), PackBf16(y[2], y[3]));
        if (store) *reinterpret_cast<uint2*>((m == 0 ? a.y0 : m == 1 ? a.y1 : a.y2) + r * a.ld + b * 4) = packed;
        sm.tile[ty][m][k][tx] = packed;
      }
      pos = pos + 1 == static_cast<int>(a.seq) ? 0 : pos + 1;
    }
    __syncwarp();
    float acc[4] = {0.f, 0.f, 0.f, 0.f};  // gate gq, rows rt + 2qq, + 1 (acc[2..3]: zero padding)
#pragma unroll
    for (int m = 0; m < 3; ++m)
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const uint2 bf = sm.tile[ty][m][gq][4 * j + qq];
        const uint4 a0 = sm.afrag[m][j][tx];
        MmaBf16(acc, a0.x, 0u, a0.y, 0u, bf.x, bf.y);  // hi
        MmaBf16(acc, a0.z, 0u, a0.w, 0u, bf.x, bf.y);  // lo
      }
    __syncwarp();  // the tile is rewritten by the next iteration
    if (gq < G) {
      const int f = gq < a.heads ? 0 : 1;
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int64_t r = rt + 2 * qq + c;
        if (r < r1) part[((blockIdx.x * 2 + f) * a.rows + r) * a.heads + gq - f * a.heads] = acc[c];
      }
    }
  }
}

// dx = dy·w (+ dy2·w2) (+ dx), and the partial dw (dw2) of row chunk blockIdx.y: a shared-memory
// sum over the 8 row lanes in order, one partial row per block (BdPartials).
// kG > 0 (>= 2·heads): the mLSTM gate backward fused in (FusedGates). The maps' dy get
// Σ_t dgate[r, t] wg[t, c], but that sum is never formed: with S[t, i] = Σ_r dgate[r, t] x[r, i]
// (one S serves both maps: same x) and U[t, i] = Σ_o (wg[t, o] w[o, i] + wg2[t, o] w2[o, i]),
//   dx[r, i] = Σ_o (dy w + dy2 w2)[o, i] + Σ_t dgate[r, t] U[t, i]     (per row: 4 FMAs a gate)
//   dw[o, i] = Σ_r dy[r, o] x[r, i] + Σ_t wg[t, o] S[t, i]            (the second term once, at the end)
//   dwg[t, o] = Σ_r dgate[r, t] y[r, o] = Σ_i w[o, i] S[t, i]          (y = x wᵀ, not re-read)
// — per row 32 FMAs for the gates instead of 64 + 32 (and 8 shared float4 loads, not 16): the
// kernel was issue/latency-bound at ~215 instructions per thread-row (1.8-2.0 TB/s on an H200).
// That is for two maps (q, k); with one (v) the fold saves nothing, so dy gets the gate term
// directly (dy += Σ_t dgate wg, then dx and dw from it) and S only feeds the gate weights.
template <bool kTwo, int kG>
__global__ void __launch_bounds__(256, kG <= 8 ? 2 : 1) block_diag4_bwd(BlockDiagArgs a, FusedGates g, BdPartials p) {
  constexpr int kMaps = kTwo ? 2 : 1;
  constexpr int kGs = kG > 0 ? kG : 1;
  constexpr int kS = kBdBwdStages<kG>;
  // The row inputs (x, dy, dy2, old dx: 4 bf16 each) and the row's gate gradients travel by
  // cp.async through a per-warp ring of kS rows, kS - 1 rows ahead of the arithmetic: bytes in
  // flight without registers (the accumulators leave none). After the loop the ring's memory
  // holds the column-sum scratch `red`.
  struct Ring {
    uint2 in[8][kS][4][32];
    float dg[8][kS][kGs];
  };
  constexpr int kRedBytes = 8 * (32 * 16 + 8) * 4;
  __shared__ __align__(16) unsigned char raw[sizeof(Ring) > kRedBytes ? sizeof(Ring) : kRedBytes];
  __shared__ float4 wg[kMaps * kGs][32];
  __shared__ float4 U[kTwo ? kGs : 1][32];  // each thread's own block's U[t, 0..3] (two maps)
  Ring& ring = *reinterpret_cast<Ring*>(raw);
  auto red = reinterpret_cast<float (*)[32 * 16 + 8]>(raw);
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * 32 + tx;
  const int64_t b = blockIdx.x * 32 + tx;
  const bool live = b < a.blocks;
  const int G = 2 * g.heads;
  if constexpr (kG > 0) {
    for (int e = tid; e < kMaps * kG * 32; e += 256) {
      const int m = e / (kG * 32), t = (e / 32) % kG, bx = e % 32;
      const int64_t bb = blockIdx.x * 32 + bx;
      float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
      if (bb < a.blocks && t < G) v = __ldg(reinterpret_cast<const float4*>(GateW(g, m, t) + bb * 4));
      wg[m * kG + t][bx] = v;
    }
    __syncthreads();
  }
  float w[16], w2[16], acc[16], acc2[16], S[kGs][4];
#pragma unroll
  for (int k = 0; k < 16; ++k) acc[k] = acc2[k] = 0.f;
#pragma unroll
  for (int t = 0; t < kGs; ++t)
#pragma unroll
    for (int i = 0; i < 4; ++i) S[t][i] = 0.f;
  const int64_t r0 = blockIdx.y * (int64_t)kBdBwdRows, r1 = min(r0 + kBdBwdRows, a.rows);
  if (live) {
#pragma unroll
    for (int k = 0; k < 16; k += 8) {
      LoadF8(a.w + b * 16 + k, w + k);
      if (kTwo) LoadF8(a.w2 + b * 16 + k, w2 + k);
    }
  } else {
#pragma unroll
    for (int k = 0; k < 16; ++k) w[k] = w2[k] = 0.f;
  }
  if constexpr (kG > 0 && kTwo) {
#pragma unroll
    for (int t = 0; t < kG; ++t) {
      U[t][tx] = FoldGateRow(wg[t][tx], wg[kG + t][tx], w, w2);  // read back by this thread only
    }
  }
  // Row r's copies into slot `slot` (one commit group per row, empty past the end).
  auto issue = [&](int slot, int64_t r) {
    if (r < r1) {
      if (live) {
        CpAsync8(&ring.in[ty][slot][0][tx], static_cast<const bf16*>(a.x) + r * a.ldx + b * 4);
        CpAsync8(&ring.in[ty][slot][1][tx], static_cast<const bf16*>(a.dy) + r * a.ldy + b * 4);
        if (kTwo) CpAsync8(&ring.in[ty][slot][2][tx], static_cast<const bf16*>(a.dy2) + r * a.ldy + b * 4);
        if (a.accumulate_dx) CpAsync8(&ring.in[ty][slot][3][tx], static_cast<const bf16*>(a.dx) + r * a.ldx + b * 4);
      }
      if (kG > 0 && tx < G)
        CpAsync4(&ring.dg[ty][slot][tx], tx < g.heads ? g.dig + r * g.heads + tx : g.dfg + r * g.heads + tx - g.heads);
    }
    CpAsyncCommit();
  };
#pragma unroll
  for (int u = 0; u < kS - 1; ++u) issue(u, r0 + ty + 8 * u);
  int slot = 0;
  for (int64_t r = r0 + ty; r < r1; r += 8) {  // rows uniform over the warp
    __syncwarp();  // every lane is done with the slot the next copy overwrites
    issue(slot == 0 ? kS - 1 : slot - 1, r + 8 * (kS - 1));
    CpAsyncWait<kS - 1>();
    __syncwarp();  // the gate gradients came by other lanes' copies
    if (live) {
      float x[4], d[4], d2[4], old[4], dx[4];
      Bf16x4ToFloat(ring.in[ty][slot][0][tx], x);
      Bf16x4ToFloat(ring.in[ty][slot][1][tx], d);
      if (kTwo) Bf16x4ToFloat(ring.in[ty][slot][2][tx], d2);
      if (a.accumulate_dx) Bf16x4ToFloat(ring.in[ty][slot][3][tx], old);
      if constexpr (kG > 0 && !kTwo) {
#pragma unroll
        for (int t = 0; t < kG; ++t) {
          const float dg = t < G ? ring.dg[ty][slot][t] : 0.f;
          const float4 u = wg[t][tx];
          d[0] += dg * u.x; d[1] += dg * u.y; d[2] += dg * u.z; d[3] += dg * u.w;
#pragma unroll
          for (int i = 0; i < 4; ++i) S[t][i] += dg * x[i];
        }
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) dx[i] = d[0] * w[i] + d[1] * w[4 + i] + d[2] * w[8 + i] + d[3] * w[12 + i];
      if constexpr (kG > 0 && kTwo) {
#pragma unroll
        for (int t = 0; t < kG; ++t) {
          const float dg = t < G ? ring.dg[ty][slot][t] : 0.f;
          const float4 u = U[t][tx];
          dx[0] += dg * u.x; dx[1] += dg * u.y; dx[2] += dg * u.z; dx[3] += dg * u.w;
#pragma unroll
          for (int i = 0; i < 4; ++i) S[t][i] += dg * x[i];
        }
      }
#pragma unroll
      for (int o = 0; o < 4; ++o)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[o * 4 + i] += d[o] * x[i];
      if (kTwo) {
#pragma unroll
        for (int i = 0; i < 4; ++i)
          dx[i] += d2[0] * w2[i] + d2[1] * w2[4 + i] + d2[2] * w2[8 + i] + d2[3] * w2[12 + i];
#pragma unroll
        for (int o = 0; o < 4; ++o)
#pragma unroll
          for (int i = 0; i < 4; ++i) acc2[o * 4 + i] += d2[o] * x[i];
      }
      if (a.accumulate_dx) {
#pragma unroll
        for (int i = 0; i < 4; ++i) dx[i] += old[i];
      }
      Store4(a.dx, r * a.ldx + b * 4, dx);
    }
    slot = slot + 1 == kS ? 0 : slot + 1;
  }
  CpAsyncWait<0>();
  if constexpr (kG > 0 && kTwo) {
    // dw's gate term: acc[o, i] += Σ_t wg[t, o] S[t, i] (wg = 0 for t >= G and dead lanes).
#pragma unroll
    for (int t = 0; t < kG; ++t) {
      const float4 u = wg[t][tx], u2 = wg[kG + t][tx];
      const float uo[4] = {u.x, u.y, u.z, u.w}, u2o[4] = {u2.x, u2.y, u2.z, u2.w};
#pragma unroll
      for (int o = 0; o < 4; ++o)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          acc[o * 4 + i] += uo[o] * S[t][i];
          acc2[o * 4 + i] += u2o[o] * S[t][i];
        }
    }
  }
  __syncthreads();  // the ring's memory becomes `red`
#pragma unroll
  for (int round = 0; round < kMaps; ++round) {
    float* dw = round == 0 ? p.dw : p.dw2;
    if (dw == nullptr) continue;  // uniform over the block
#pragma unroll
    for (int k = 0; k < 16; ++k) red[ty][tx * 16 + k] = round == 0 ? acc[k] : acc2[k];
    __syncthreads();
    for (int v = tid; v < 32 * 16; v += 256) {
      const int64_t bb = blockIdx.x * 32 + v / 16;
      if (bb < a.blocks) {
        float t = 0.f;
#pragma unroll
        for (int y = 0; y < 8; ++y) t += red[y][v];
        dw[blockIdx.y * a.blocks * 16 + bb * 16 + v % 16] = t;
      }
    }
    __syncthreads();
  }
  if constexpr (kG > 0) {
    // Gate weight gradients, four gates per round: column (block, o) of gate t gets
    // Σ_i w[o, i] S[t, i] (w = 0 on dead lanes: their S is 0 too).
#pragma unroll
    for (int m = 0; m < kMaps; ++m) {
#pragma unroll
      for (int t0 = 0; t0 < kG; t0 += 4) {
        if (t0 >= G) break;  // uniform over the block
#pragma unroll
        for (int tt = 0; tt < 4; ++tt)
#pragma unroll
          for (int o = 0; o < 4; ++o) {
            const float* wm = m == 0 ? w : w2;
            red[ty][tx * 16 + tt * 4 + o] = live ? wm[o * 4] * S[t0 + tt][0] + wm[o * 4 + 1] * S[t0 + tt][1] +
                                                       wm[o * 4 + 2] * S[t0 + tt][2] + wm[o * 4 + 3] * S[t0 + tt][3]
                                                 : 0.f;
          }
        __syncthreads();
        for (int v = tid; v < 32 * 16; v += 256) {
          const int64_t bb = blockIdx.x * 32 + v / 16;
          const int t = t0 + (v % 16) / 4;
          if (bb < a.blocks && t < G) {
            float s = 0.f;
#pragma unroll
            for (int y = 0; y < 8; ++y) s += red[y][v];
            (m == 0 ? p.gate0 : p.gate1)[(blockIdx.y * (int64_t)G + t) * (a.blocks * 4) + bb * 4 + v % 4] = s;
          }
        }
        __syncthreads();
      }
    }
    // Bias gradients Σ_r dgate over this block's rows, on the first column block only: 16 row
    // lanes per gate, summed in lane order.
    if (p.db != nullptr && blockIdx.x == 0) {
      float* bsum = &red[0][0];  // [16 lanes][16 gates]
      const int t = tid % 16, lane = tid / 16;
      float s = 0.f;
      if (t < G)
        for (int64_t r = r0 + lane; r < r1; r += 16) s += GateGrad(g, r, t);
      bsum[lane * 16 + t] = s;
      __syncthreads();
      if (tid < G) {
        float tot = 0.f;
        for (int l = 0; l < 16; ++l) tot += bsum[l * 16 + tid];
        p.db[blockIdx.y * (int64_t)G + tid] = tot;
      }
    }
  }
}

// The mLSTM block's conv1d backward and its v map's backward (with the gate backward of v's
// columns) in one pass (MlstmConvVBackward; fusion C of ops/XLSTM_GLUE.md, the default since
// session 15; GYRE_MLSTM_CONV_V_BWD=separate keeps the two launches). The separate path runs conv1d_bwd (xm, dxc -> dxm) and then
// block_diag4_bwd<false> (xm, dv, dgate, old dxm -> dxm += dv·Wv): dxm is written, read back and
// written again, and xm is read twice — 7 passes of [rows, p] bf16 where this kernel makes 4
// (reads xm, dxc, dv; writes dxm once).
// Layout: a lane owns one 4x4 block of v = 4 channels, which are also 4 channels of the
// depthwise conv, so both backward maps of a row are the lane's own arithmetic; a warp owns a run
// of kCvRun consecutive rows of one sequence (the conv's sliding window, as conv1d_bwd), a block
// kCvWarps consecutive runs of one sequence and 32 column blocks. Per token t (s0 <= t < s1 + K - 1):
//   u_t = cb + Σ_j cw_j xm[t - (K-1) + j] (zero before the sequence start),  du_t = dxc[t]·SiLU'(u_t)
//   (zero at t >= S: the lookahead of the run's last K - 1 rows), conv dw += du_t·window for
//   t < s1 (each token once over the runs); then row r = t - (K - 1) >= s0 is complete:
//   dxm[r] = Σ_j cw_j du_{r+K-1-j} + (dv[r] + Σ_g dgate[r, g] wg[g])·Wv     (one bf16 rounding)
//   dWv += (dv + gate term) ⊗ xm[r],  S[g] += dgate[r, g]·xm[r]           (xm[r] = window[0])
// and at the end the v gate weight gradients dwg[g, o] = Σ_i Wv[o, i] S[g, i] (as block_diag4_bwd).
// xm[t], dxc[t], dv[r] and dgate[r] travel by cp.async through a per-warp ring kCvAhead - 1 tokens
// ahead (zero-filled past the sequence end), so loads are in flight without registers: the
// accumulators (conv dw 16 + db 4, dWv 16, S 32) and weights (conv 16 + 4, Wv 16) hold ~120.
// Partial sums per block (the kCvWarps runs summed in warp order through shared memory) to
// [chunks = batch x row blocks, ...], reduced by reduce_partials in a fixed order.
// Measured on an H100 (xglue15 call 2, xlstm[1:0]-125m B16 x 2048): 6.29 ms a step against
// conv1d_bwd + block_diag4_bwd<false> 3.34 + 4.51; step 134.7-134.9 -> 133.3-133.6 ms. 232 µs a
// layer at 72% of the issue slots (ncu): issue-limited; 64 of the ~144 FMA a thread-row are the
// gates (dv's term and S), which tensor cores could take (ops/XLSTM_GLUE.md).
constexpr int kCvRun = 64;    // rows per warp
constexpr int kCvWarps = 4;   // runs per block
constexpr int kCvAhead = 16;  // ring slots per warp (a power of 2)
// xm and dxm may be the first columns of wider rows (ldm >= channels, the same for both: the
// block's fused up projection, GYRE_MLSTM_UP=fused, reads x_m from and writes dx_m into the
// [rows, 2p] tensors x_m | z and dx_m | dz).
struct ConvVBwdParams {
  int64_t rows = 0, blocks = 0, ld = 0;  // ld: row stride of dxc, dv (= channels)
  int64_t ldm = 0;                       // row stride of xm, dxm (>= channels)
  int seq = 0, heads = 0;
  bool silu = false;
  const bf16* xm = nullptr;
  const bf16* dxc = nullptr;
  const bf16* dv = nullptr;
  bf16* dxm = nullptr;
  const float* cw = nullptr;  // [channels, K]
  const float* cb = nullptr;  // [channels] or null
  const float* wv = nullptr;  // [blocks, 4, 4]
  const float* wi = nullptr;  // v's gate weight columns (rows of ldg)
  const float* wf = nullptr;
  int64_t ldg = 0;
  const float* dig = nullptr;  // [rows, heads]
  const float* dfg = nullptr;
  float* pcw = nullptr;    // [chunks, channels · K]
  float* pcb = nullptr;    // [chunks, channels]
  float* pdw = nullptr;    // [chunks, blocks · 16]
  float* pgate = nullptr;  // [chunks, 2 heads, channels]
  float* pdb = nullptr;    // [chunks, 2 heads] or null
};
// cp.async of 8 (4) bytes with zero fill: src_bytes 0 writes zeros and reads nothing.
__device__ __forceinline__ void CpAsync8Z(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(static_cast<uint32_t>(__cvta_generic_to_shared(dst))),
               "l"(src), "r"(valid ? 8 : 0));
}
__device__ __forceinline__ void CpAsync4Z(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(static_cast<uint32_t>(__cvta_generic_to_shared(dst))),
               "l"(src), "r"(valid ? 4 : 0));
}
template <int K>
__global__ void __launch_bounds__(32 * kCvWarps, 3) mlstm_conv_v_bwd(ConvVBwdParams a) {
  struct Ring {
    uint2 in[kCvWarps][kCvAhead][3][32];  // xm[t], dxc[t], dv[t - (K - 1)]
    float dg[kCvWarps][kCvAhead][32];     // lane g < 2 heads: dgate[t - (K - 1), g]; zeros above
  };
  constexpr int kRedLd = 32 * 16 + 8;
  static_assert(sizeof(Ring) >= kCvWarps * kRedLd * 4, "the reduction scratch reuses the ring");
  extern __shared__ __align__(16) unsigned char cv_smem[];
  __shared__ float4 wg[8][32];
  Ring& ring = *reinterpret_cast<Ring*>(cv_smem);
  auto red = reinterpret_cast<float (*)[kRedLd]>(cv_smem);
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * 32 + tx;
  const int64_t b = blockIdx.x * 32 + tx;
  const bool live = b < a.blocks;
  const int64_t bc = live ? b : 0;  // dead lanes copy nothing (size 0) from a valid address
  const int G = 2 * a.heads;
  for (int e = tid; e < 8 * 32; e += 32 * kCvWarps) {
    const int t = e / 32, bx = e % 32;
    const int64_t bb = blockIdx.x * 32 + bx;
    float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
    if (bb < a.blocks && t < G)
      v = __ldg(reinterpret_cast<const float4*>((t < a.heads ? a.wi + t * a.ldg : a.wf + (t - a.heads) * a.ldg) + bb * 4));
    wg[t][bx] = v;
  }
  float w[16], cw[K][4], cb[4];
  if (live) {
    LoadF8(a.wv + b * 16, w);
    LoadF8(a.wv + b * 16 + 8, w + 8);
  } else {
#pragma unroll
    for (int k = 0; k < 16; ++k) w[k] = 0.f;
  }
#pragma unroll
  for (int v = 0; v < 4; ++v) {
#pragma unroll
    for (int j = 0; j < K; ++j) cw[j][v] = live ? a.cw[(b * 4 + v) * K + j] : 0.f;
    cb[v] = live && a.cb != nullptr ? a.cb[b * 4 + v] : 0.f;
  }
  float acc[16], S[8][4], cdw[K][4], cdb[4], dbs = 0.f;
#pragma unroll
  for (int k = 0; k < 16; ++k) acc[k] = 0.f;
#pragma unroll
  for (int t = 0; t < 8; ++t)
#pragma unroll
    for (int i = 0; i < 4; ++i) S[t][i] = 0.f;
#pragma unroll
  for (int v = 0; v < 4; ++v) {
    cdb[v] = 0.f;
#pragma unroll
    for (int j = 0; j < K; ++j) cdw[j][v] = 0.f;
  }
  __syncthreads();  // wg
  const int S_len = a.seq;
  const int64_t row0 = static_cast<int64_t>(blockIdx.z) * S_len;  // the sequence's first row
  const int s0 = (blockIdx.y * kCvWarps + ty) * kCvRun, s1 = min(s0 + kCvRun, S_len);
  if (s0 < s1) {  // uniform over the warp
    float win[K][4], du[K][4];  // win[j] = xm[t - (K-1) + j], du[j] = du_{t - (K-1) + j}
#pragma unroll
    for (int j = 0; j < K; ++j)
#pragma unroll
      for (int v = 0; v < 4; ++v) win[j][v] = du[j][v] = 0.f;
    if (live) {
#pragma unroll
      for (int j = 1; j < K; ++j) {  // the K - 1 rows before s0 (zeros before the sequence start)
        const int pos = s0 - K + j;
        if (pos >= 0) Load4(a.xm, (row0 + pos) * a.ldm + b * 4, win[j]);
      }
    }
    // Token i (row t = s0 + i) reads xm, dxc at t and dv, dgate at r = t - (K - 1): pointers at
    // row s0, offsets bumped per token; rows past the sequence and r < s0 copy zeros.
    const int n = s1 - s0 + K - 1, last = S_len - 1 - s0;
    const int64_t base = (row0 + s0) * a.ld + bc * 4;  // (the tensors' pointers stay kernel parameters)
    const int64_t base_m = (row0 + s0) * a.ldm + bc * 4;  // xm, dxm
    const int gsel = min(tx, G - 1);
    const int64_t gbase = (row0 + s0) * a.heads + (gsel < a.heads ? gsel : gsel - a.heads);
    auto issue = [&](int i) {  // one commit group per token (empty past the run)
      if (i < n) {
        const int slot = i & (kCvAhead - 1);
        const int64_t to = static_cast<int64_t>(min(i, last)) * a.ld;
        const int ro = max(i - (K - 1), 0);
        const bool tok = i <= last, out = i >= K - 1;
        CpAsync8Z(&ring.in[ty][slot][0][tx], a.xm + base_m + static_cast<int64_t>(min(i, last)) * a.ldm, live && tok);
        CpAsync8Z(&ring.in[ty][slot][1][tx], a.dxc + base + to, live && tok);
        CpAsync8Z(&ring.in[ty][slot][2][tx], a.dv + base + static_cast<int64_t>(ro) * a.ld, live && out);
        CpAsync4Z(&ring.dg[ty][slot][tx], (gsel < a.heads ? a.dig : a.dfg) + gbase + static_cast<int64_t>(ro) * a.heads,
                  out && tx < G);
      }
      CpAsyncCommit();
    };
    // One token: slide the window, du_t, the conv weight terms of tokens t < s1 (each token once
    // over the runs), and with kOut row r = t - (K - 1) >= s0 (complete now).
    auto token = [&](int i, auto out_c) {
      constexpr bool kOut = decltype(out_c)::value;
      __syncwarp();  // every lane is done with the slot the next copy overwrites
      issue(i + kCvAhead - 1);
      CpAsyncWait<kCvAhead - 1>();
      __syncwarp();  // the gate gradients came by other lanes' copies
      const int slot = i & (kCvAhead - 1);
      float xn[4], gy[4];
      Bf16x4ToFloat(ring.in[ty][slot][0][tx], xn);
      Bf16x4ToFloat(ring.in[ty][slot][1][tx], gy);
#pragma unroll
      for (int j = 0; j + 1 < K; ++j)
#pragma unroll
        for (int v = 0; v < 4; ++v) {
          win[j][v] = win[j + 1][v];
          du[j][v] = du[j + 1][v];
        }
      const bool own = s0 + i < s1;
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        win[K - 1][v] = xn[v];
        // SiLU' always computed and selected: a branch here (uniform as it is) splits the token
        // into one basic block per channel, and the four channels' MUFU chains no longer overlap.
        float u = cb[v];
#pragma unroll
        for (int j = 0; j < K; ++j) u += cw[j][v] * win[j][v];
        const float ds = DSilu(u);
        const float g = gy[v] * (a.silu ? ds : 1.f);
        du[K - 1][v] = g;
        const float gm = own ? g : 0.f;
#pragma unroll
        for (int j = 0; j < K; ++j) cdw[j][v] += gm * win[j][v];
        cdb[v] += gm;
      }
      if constexpr (kOut) {
        float d[4], dgs[8], dx[4];
        Bf16x4ToFloat(ring.in[ty][slot][2][tx], d);
        const float4 g0 = *reinterpret_cast<const float4*>(&ring.dg[ty][slot][0]);
        const float4 g1 = *reinterpret_cast<const float4*>(&ring.dg[ty][slot][4]);
        dgs[0] = g0.x; dgs[1] = g0.y; dgs[2] = g0.z; dgs[3] = g0.w;
        dgs[4] = g1.x; dgs[5] = g1.y; dgs[6] = g1.z; dgs[7] = g1.w;
        dbs += ring.dg[ty][slot][tx];
#pragma unroll
        for (int gt = 0; gt < 8; ++gt) {
          const float4 u = wg[gt][tx];
          d[0] += dgs[gt] * u.x; d[1] += dgs[gt] * u.y; d[2] += dgs[gt] * u.z; d[3] += dgs[gt] * u.w;
#pragma unroll
          for (int i2 = 0; i2 < 4; ++i2) S[gt][i2] += dgs[gt] * win[0][i2];
        }
#pragma unroll
        for (int v = 0; v < 4; ++v) {
          float o = 0.f;
#pragma unroll
          for (int j = 0; j < K; ++j) o += cw[j][v] * du[K - 1 - j][v];
          dx[v] = o + (d[0] * w[v] + d[1] * w[4 + v] + d[2] * w[8 + v] + d[3] * w[12 + v]);
        }
#pragma unroll
        for (int o = 0; o < 4; ++o)
#pragma unroll
          for (int i2 = 0; i2 < 4; ++i2) acc[o * 4 + i2] += d[o] * win[0][i2];
        if (live) Store4(a.dxm, base_m + static_cast<int64_t>(i - (K - 1)) * a.ldm, dx);
      }
    };
#pragma unroll
    for (int i = 0; i < kCvAhead - 1; ++i) issue(i);
#pragma unroll
    for (int i = 0; i < K - 1; ++i) token(i, std::false_type{});  // the window's first rows: no output yet
    // (Not unrolled: 4x, which renames the window instead of moving it, spilled 64 B at 168
    // registers; one iteration is ~330 PTX instructions, 25 of them the window's moves.)
#pragma unroll 1
    for (int i = K - 1; i < n; ++i) token(i, std::true_type{});
    CpAsyncWait<0>();
  }
  __syncthreads();  // the ring's memory becomes `red`
  const int64_t chunk = static_cast<int64_t>(blockIdx.z) * gridDim.y + blockIdx.y;
  // 16 values a lane, summed over the kCvWarps runs in warp order; write(lane, k, sum).
  auto reduce16 = [&](const float (&v)[16], auto&& write) {
#pragma unroll
    for (int k = 0; k < 16; ++k) red[ty][tx * 16 + k] = v[k];
    __syncthreads();
    for (int e = tid; e < 32 * 16; e += 32 * kCvWarps) {
      float s = 0.f;
#pragma unroll
      for (int y = 0; y < kCvWarps; ++y) s += red[y][e];
      write(e / 16, e % 16, s);
    }
    __syncthreads();
  };
  reduce16(acc, [&](int bx, int k, float s) {
    const int64_t bb = blockIdx.x * 32 + bx;
    if (bb < a.blocks) a.pdw[chunk * a.blocks * 16 + bb * 16 + k] = s;
  });
#pragma unroll
  for (int t0 = 0; t0 < 8; t0 += 4) {
    if (t0 >= G) break;  // uniform over the block
    float v[16];
#pragma unroll
    for (int tt = 0; tt < 4; ++tt)
#pragma unroll
      for (int o = 0; o < 4; ++o)
        v[tt * 4 + o] = w[o * 4] * S[t0 + tt][0] + w[o * 4 + 1] * S[t0 + tt][1] + w[o * 4 + 2] * S[t0 + tt][2] +
                        w[o * 4 + 3] * S[t0 + tt][3];
    reduce16(v, [&](int bx, int k, float s) {
      const int64_t bb = blockIdx.x * 32 + bx;
      const int t = t0 + k / 4;
      if (bb < a.blocks && t < G) a.pgate[(chunk * G + t) * a.ld + bb * 4 + k % 4] = s;
    });
  }
  {
    float v[16];
#pragma unroll
    for (int k = 0; k < 16; ++k) v[k] = 0.f;
#pragma unroll
    for (int j = 0; j < K; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) v[c * 4 + j] = cdw[j][c];
    reduce16(v, [&](int bx, int k, float s) {
      const int64_t bb = blockIdx.x * 32 + bx;
      if (bb < a.blocks && k % 4 < K) a.pcw[chunk * a.ld * K + (bb * 4 + k / 4) * K + k % 4] = s;
    });
  }
  {
    float v[16];
#pragma unroll
    for (int k = 0; k < 16; ++k) v[k] = k < 4 ? cdb[k] : 0.f;
    v[4] = dbs;  // lane tx < 8: the sums of gate tx over the warp's rows
    reduce16(v, [&](int bx, int k, float s) {
      const int64_t bb = blockIdx.x * 32 + bx;
      if (k < 4 && bb < a.blocks) a.pcb[chunk * a.ld + bb * 4 + k] = s;
      if (k == 4 && bx < G && a.pdb != nullptr && blockIdx.x == 0) a.pdb[chunk * G + bx] = s;
    });
  }
}

// The 2-map (q, k) block-diagonal backward with the mLSTM gates (heads <= 4), its row sums on
// tensor cores (BlockDiagBackwardTc; the default since session 15, GYRE_MLSTM_QK_BWD=fma keeps
// block_diag4_bwd; ops/XLSTM_GLUE.md "Tensor-core row sums"). Same outputs as block_diag4_bwd<true, 8>: per row
//   dx[r, i] = Σ_o (dq w + dk w2)[o, i] + Σ_t dgate[r, t] U[t, i] (+ old dx)    (the same fp32
//   expression, so the same bits), and over the rows
//   dWq[b] = Σ_r dq[r, b]ᵀ x[r, b] + Σ_t wgq[t, b]ᵀ S[t, b],  dWk likewise,  S[t, i] = Σ_r dgate[r, t] x[r, i]
//   dwg[t, (b, o)] = Σ_i W[b, o, i] S[t, (b, i)]                                  (as block_diag4_bwd).
// block_diag4_bwd spends 96 of its ~128 FMA a thread-row on those row sums (dWq, dWk: 32; S: 32;
// and the gate term of dx: 32) and ~40 PTX instructions on per-gate branches; it runs at ~59%
// of the issue slots and ~1.8 TB/s. Here the two row sums are m16n8k8 bf16 mma over tiles of 8
// of the warp's rows, fed by ldmatrix.trans straight from the cp.async ring (the ring is the
// tile: it holds kBtTile + kBtAhead rows):
//   S   (per 16-column group c): A = xᵀ [16 columns x 8 rows], B = dgate [8 rows x 8 gates] split
//       hi + lo bf16 (x is bf16, so the products are exact; dgate to ~2^-17), D = S[col, gate];
//   dW  (per pair of 4x4 blocks j = 2b', 2b'+1): A = [dq_b | dk_b | dq_b+1 | dk_b+1]ᵀ [16 x 8 rows]
//       (the ring stores each lane's dq and dk 4-column pieces side by side, so these 16 are 32
//       contiguous bytes of a ring row), B = x of the two blocks [8 rows x 8 columns]; of the
//       16 x 8 products the diagonal blocks are wanted: lane (g, q) keeps (c0, c1) if q < 2 (block
//       2j', rows g) and (c2, c3) otherwise (block 2j'+1, rows g + 8) — two a lane a pair, the
//       32 registers of the FMA kernel's two dW accumulators, in another order.
// The x fragments serve both products (the S A-fragment of columns 16c.. is the dW B-fragment of
// blocks 4c.. and 4c+2..). Per tile of 8 rows a warp issues 4 + 8 ldmatrix.x4 and 16 + 16 mma.
// At the end the warps' S and dW go through shared memory (summed over the block's 4 warps in warp
// order), the gate terms of dW and dwg come from the summed S once a block, and the partials land
// in the layout of block_diag4_bwd (BdPartials), reduced by the same jobs.
// Measured on an H100 (xglue15b call 1, xlstm[1:0]-125m B16 x 2048): 5.70 ms a step against
// block_diag4_bwd<true, 8>'s 6.62 (237 µs a call, 2.1 TB/s), step −0.5 to −0.7 ms. ~231 PTX
// instructions a thread-row (was ~331) leave the issue slots ~40% busy: it waits on memory with
// ~50 KB in flight an SM, so more rows in flight, not fewer instructions, is the next lever.
constexpr int kBtTile = 8;        // rows a tile (the mma K)
constexpr int kBtWarps = 4;       // warps a block
constexpr int kBtXLd = 32 * 4 + 8;  // bf16 a ring row of x (+16 B: ldmatrix rows on distinct banks)
constexpr int kBtDLd = 32 * 8 + 8;  // bf16 a ring row of dq|dk
constexpr int kBtAhead = 4;                   // rows in flight ahead of the arithmetic (<= ring - tile)
constexpr int kBtRing = kBtTile + kBtAhead;   // ring slots of x, dq|dk, dgate
constexpr int kBtOld = kBtAhead + 1;          // ring slots of the old dx
// One warp's ring (the tile's rows kept until its mma) and its S: the gates' S accumulates in
// shared memory ([128 columns][8 gates]: one LDS.64 pair and STS.64 pair per mma pair), not in 32
// registers a lane — with them in registers ptxas needs ~200 and spilled 124 B at the 168 of 3
// blocks an SM; so 168 registers, 8 B spilled. 15 KiB a warp, 64 KiB a block with U: 3 blocks of 4
// warps an SM. (Builds with 6 ahead at 12 warps, 8 or 12 ahead at 8 warps with S in registers were
// compiled, never measured: ops/XLSTM_GLUE.md.)
struct alignas(16) BtRing {
  bf16 x[kBtRing][kBtXLd];
  bf16 dqk[kBtRing][kBtDLd];
  float dg[kBtRing][8];
  uint2 old[kBtOld][32];
  float s[128 * 8];
};
constexpr int kBtRedFloats = kBtWarps * (8 * 128 + 2 * 32 * 16) + 8 * 128;  // S and dW of the warps, summed S
static_assert(kBtWarps * sizeof(BtRing) >= kBtRedFloats * sizeof(float), "the reduction scratch reuses the rings");
constexpr size_t kBtSmem = kBtWarps * sizeof(BtRing);

__device__ __forceinline__ void LdMatrixX4Trans(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}
// D = A·B + C, m16n8k8, bf16 inputs, fp32 accumulators (C and D separate registers).
__device__ __forceinline__ void MmaBf16K8(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t b0, float c0, float c1,
                                          float c2, float c3) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%7,%8,%9,%10};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a0), "r"(a1), "r"(b0), "f"(c0), "f"(c1), "f"(c2), "f"(c3));
}
__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__global__ void __launch_bounds__(32 * kBtWarps, 3) block_diag4_bwd_tc(BlockDiagArgs a, FusedGates g, BdPartials p) {
  extern __shared__ __align__(16) unsigned char bt_smem[];
  __shared__ float4 U[8][32];  // each thread's own block's U[t, 0..3]
  BtRing& ring = reinterpret_cast<BtRing*>(bt_smem)[threadIdx.y];
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * 32 + tx;
  const int gq = tx / 4, qq = tx % 4;  // the lane's mma fragment coordinates
  const int64_t b = blockIdx.x * 32 + tx;
  const bool live = b < a.blocks;
  const int G = 2 * g.heads;
  float w[16], w2[16];
  if (live) {
#pragma unroll
    for (int k = 0; k < 16; k += 8) {
      LoadF8(a.w + b * 16 + k, w + k);
      LoadF8(a.w2 + b * 16 + k, w2 + k);
    }
  } else {
#pragma unroll
    for (int k = 0; k < 16; ++k) w[k] = w2[k] = 0.f;
  }
  // U as block_diag4_bwd (the same expression: the same bits).
#pragma unroll
  for (int t = 0; t < 8; ++t) {
    float4 u = make_float4(0.f, 0.f, 0.f, 0.f), u2 = u;
    if (live && t < G) {
      u = __ldg(reinterpret_cast<const float4*>(GateW(g, 0, t) + b * 4));
      u2 = __ldg(reinterpret_cast<const float4*>(GateW(g, 1, t) + b * 4));
    }
    U[t][tx] = FoldGateRow(u, u2, w, w2);  // read back by this thread only
  }
  const int64_t r0 = blockIdx.y * (int64_t)kBdBwdRows, r1 = min(r0 + kBdBwdRows, a.rows);
  // The warp's rows r0 + ty + kBtWarps·u, u < n; the loop runs whole tiles (the rows past r1 zero-filled).
  const int64_t first = r0 + ty;
  const int n = first < r1 ? static_cast<int>((r1 - first + kBtWarps - 1) / kBtWarps) : 0;
  const int tiles_u = (n + kBtTile - 1) / kBtTile * kBtTile;
  // 32-bit element offsets (BlockDiagBackwardTcCovers: rows · ldx < 2^31).
  const int step = kBtWarps * static_cast<int>(a.ldx);  // elements between the warp's rows (ldx == ldy)
  const int off0 = static_cast<int>(first * a.ldx + b * 4);
  const int gstep = kBtWarps * g.heads, goff0 = static_cast<int>(first * g.heads);
  const bf16* x = static_cast<const bf16*>(a.x);
  const bf16* dq = static_cast<const bf16*>(a.dy);
  const bf16* dk = static_cast<const bf16*>(a.dy2);
  // Lane t < G copies gate t's gradient: ig's heads, then fg's.
  const float* gsrc = tx < g.heads ? g.dig + tx : g.dfg + (tx - g.heads);
  // Row u's copies into ring slot s (old dx into slot os): zero-filled past the warp's rows, on
  // dead lanes, and for gates t >= G, so the mma never meets stale bits.
  auto issue = [&](int s, int os, int u) {
    const bool in = u < n;
    const bool v = in && live;
    const int off = v ? off0 + u * step : 0;
    CpAsync8Z(&ring.x[s][4 * tx], x + off, v);
    CpAsync8Z(&ring.dqk[s][8 * tx], dq + off, v);
    CpAsync8Z(&ring.dqk[s][8 * tx + 4], dk + off, v);
    if (a.accumulate_dx && v) CpAsync8(&ring.old[os][tx], static_cast<const bf16*>(a.dx) + off);
    if (tx < 8) {
      const bool gv = in && tx < G;
      CpAsync4Z(&ring.dg[s][tx], gv ? gsrc + goff0 + u * gstep : g.dig, gv);
    }
    CpAsyncCommit();
  };
#pragma unroll
  for (int u = 0; u < kBtAhead; ++u) issue(u, u, u);
  float acc_w[16][2];  // dW[block pair][kept pair]
#pragma unroll
  for (int j = 0; j < 16; ++j) acc_w[j][0] = acc_w[j][1] = 0.f;
  // Lane (gq, qq)'s S fragment of column group c at s_frag + 128 c (columns 16c + gq and
  // 16c + 8 + gq, gates 2qq, 2qq + 1).
  float* s_frag = &ring.s[gq * 8 + 2 * qq];
#pragma unroll
  for (int c = 0; c < 8; ++c) {
    *reinterpret_cast<float2*>(s_frag + 128 * c) = make_float2(0.f, 0.f);
    *reinterpret_cast<float2*>(s_frag + 128 * c + 64) = make_float2(0.f, 0.f);
  }
  const bool upper = qq >= 2;  // this lane keeps the block-(2j'+1) half of each dW product
  int slot = 0, oslot = 0;
  int off = off0;  // row u's element offset
  for (int u = 0; u < tiles_u; ++u) {  // uniform over the warp
    __syncwarp();  // every lane is done with the slots the next copies overwrite
    issue(slot + kBtAhead >= kBtRing ? slot + kBtAhead - kBtRing : slot + kBtAhead,
          oslot + kBtAhead >= kBtOld ? oslot + kBtAhead - kBtOld : oslot + kBtAhead, u + kBtAhead);
    CpAsyncWait<kBtAhead>();
    __syncwarp();  // the zero-filled and gate slots came by other lanes' copies
    if (u < n && live) {
      const uint4 dd = *reinterpret_cast<const uint4*>(&ring.dqk[slot][8 * tx]);
      float d[4], d2[4], dx[4];
      Bf16x4ToFloat(make_uint2(dd.x, dd.y), d);
      Bf16x4ToFloat(make_uint2(dd.z, dd.w), d2);
      const float4 ga = *reinterpret_cast<const float4*>(&ring.dg[slot][0]);
      const float4 gb = *reinterpret_cast<const float4*>(&ring.dg[slot][4]);
      const float dg[8] = {ga.x, ga.y, ga.z, ga.w, gb.x, gb.y, gb.z, gb.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) dx[i] = d[0] * w[i] + d[1] * w[4 + i] + d[2] * w[8 + i] + d[3] * w[12 + i];
#pragma unroll
      for (int t = 0; t < 8; ++t) {
        const float4 uu = U[t][tx];
        dx[0] += dg[t] * uu.x; dx[1] += dg[t] * uu.y; dx[2] += dg[t] * uu.z; dx[3] += dg[t] * uu.w;
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) dx[i] += d2[0] * w2[i] + d2[1] * w2[4 + i] + d2[2] * w2[8 + i] + d2[3] * w2[12 + i];
      if (a.accumulate_dx) {
        float old[4];
        Bf16x4ToFloat(ring.old[oslot][tx], old);
#pragma unroll
        for (int i = 0; i < 4; ++i) dx[i] += old[i];
      }
      Store4(a.dx, off, dx);
    }
    if (u % kBtTile == kBtTile - 1) {
      // The tile: rows u - 7 .. u in slots slot - 7 .. slot (mod kBtRing). ldmatrix lane l gives
      // the address of row l % 8 of 8x8 matrix l / 8.
      int rs = slot - (kBtTile - 1) + tx % 8;
      rs = rs < 0 ? rs + kBtRing : rs;
      const uint32_t xa = SmemAddr(&ring.x[rs][8 * (tx / 8)]);
      const uint32_t da = SmemAddr(&ring.dqk[rs][8 * (tx / 8)]);
      // B of S: dgate rows 2qq, 2qq + 1 (tile order), gate gq; hi + lo bf16.
      int s0 = slot - (kBtTile - 1) + 2 * qq, s1 = s0 + 1;
      s0 = s0 < 0 ? s0 + kBtRing : s0;
      s1 = s1 < 0 ? s1 + kBtRing : s1;
      const float g0 = ring.dg[s0][gq], g1 = ring.dg[s1][gq];
      const float h0 = __bfloat162float(__float2bfloat16_rn(g0)), h1 = __bfloat162float(__float2bfloat16_rn(g1));
      const uint32_t bhi = PackBf16(h0, h1), blo = PackBf16(g0 - h0, g1 - h1);
#pragma unroll
      for (int cc = 0; cc < 4; ++cc) {
        uint32_t xf[4];  // columns 32cc + 0..7, 8..15 (group 2cc), 16..23, 24..31 (group 2cc + 1)
        LdMatrixX4Trans(xa + 64 * cc, xf);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          float e[4], d[4];
          float* sp = s_frag + 128 * (2 * cc + h);
          const float2 c01 = *reinterpret_cast<const float2*>(sp), c23 = *reinterpret_cast<const float2*>(sp + 64);
          MmaBf16K8(e, xf[2 * h], xf[2 * h + 1], bhi, c01.x, c01.y, c23.x, c23.y);
          MmaBf16K8(d, xf[2 * h], xf[2 * h + 1], blo, e[0], e[1], e[2], e[3]);
          *reinterpret_cast<float2*>(sp) = make_float2(d[0], d[1]);
          *reinterpret_cast<float2*>(sp + 64) = make_float2(d[2], d[3]);
        }
#pragma unroll
        for (int jj = 0; jj < 2; ++jj) {
          uint32_t df[4];  // dq|dk of blocks 8cc + 4jj .. + 3: pairs j = 4cc + 2jj, + 1
          LdMatrixX4Trans(da + 64 * (2 * cc + jj), df);
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int j = 4 * cc + 2 * jj + h;
            float (&k)[2] = acc_w[j];
            float e[4];
            MmaBf16K8(e, df[2 * h], df[2 * h + 1], xf[j % 4], k[0], k[1], k[0], k[1]);
            k[0] = upper ? e[2] : e[0];
            k[1] = upper ? e[3] : e[1];
          }
        }
      }
    }
    off += step;
    slot = slot + 1 == kBtRing ? 0 : slot + 1;
    oslot = oslot + 1 == kBtOld ? 0 : oslot + 1;
  }
  CpAsyncWait<0>();
  float acc_s[8][4];  // this lane's S fragments, out of the ring before it becomes the scratch
  __syncwarp();
#pragma unroll
  for (int c = 0; c < 8; ++c) {
    const float2 c01 = *reinterpret_cast<const float2*>(s_frag + 128 * c),
                 c23 = *reinterpret_cast<const float2*>(s_frag + 128 * c + 64);
    acc_s[c][0] = c01.x; acc_s[c][1] = c01.y; acc_s[c][2] = c23.x; acc_s[c][3] = c23.y;
  }
  __syncthreads();  // the rings' memory becomes the reduction scratch
  float* sw = reinterpret_cast<float*>(bt_smem);  // [warps][8 gates][128 columns]
  float* dw = sw + kBtWarps * 8 * 128;            // [warps][2 maps][32 blocks][16]
  float* ssum = dw + kBtWarps * 2 * 32 * 16;      // [8 gates][128 columns]
#pragma unroll
  for (int c = 0; c < 8; ++c) {
    float* o = sw + ty * 1024 + 16 * c + gq;
    o[(2 * qq) * 128] = acc_s[c][0];
    o[(2 * qq + 1) * 128] = acc_s[c][1];
    o[(2 * qq) * 128 + 8] = acc_s[c][2];
    o[(2 * qq + 1) * 128 + 8] = acc_s[c][3];
  }
  // dW pair j: map gq / 4 (q, k), output row gq % 4, block 2j + upper, inputs 2(qq % 2), + 1.
#pragma unroll
  for (int j = 0; j < 16; ++j) {
    float* o = dw + ty * 1024 + (gq / 4) * 512 + (2 * j + (upper ? 1 : 0)) * 16 + (gq % 4) * 4 + 2 * (qq % 2);
    o[0] = acc_w[j][0];
    o[1] = acc_w[j][1];
  }
  __syncthreads();
  constexpr int kPer = 1024 / (32 * kBtWarps);
  float dws[kPer];
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    const int v = tid + 32 * kBtWarps * k;
    float s = 0.f, t = 0.f;
#pragma unroll
    for (int y = 0; y < kBtWarps; ++y) {
      s += sw[y * 1024 + v];
      t += dw[y * 1024 + v];
    }
    ssum[v] = s;
    dws[k] = t;
  }
  __syncthreads();
  // dW's gate term from the block's S: dW[m][b, o, i] += Σ_t wg_m[t, (b, o)] S[t, (b, i)].
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    const int v = tid + 32 * kBtWarps * k, m = v / 512, blk = (v / 16) % 32, o = (v % 16) / 4, i = v % 4;
    const int64_t bb = blockIdx.x * 32 + blk;
    float* out = m == 0 ? p.dw : p.dw2;
    if (bb >= a.blocks || out == nullptr) continue;
    float t = dws[k];
    for (int gt = 0; gt < G; ++gt) t += __ldg(GateW(g, m, gt) + bb * 4 + o) * ssum[gt * 128 + blk * 4 + i];
    out[blockIdx.y * a.blocks * 16 + bb * 16 + o * 4 + i] = t;
  }
  // Gate weight gradients: column (b, o) of gate t gets Σ_i w[b, o, i] S[t, (b, i)].
  for (int v = tid; v < 2 * 8 * 128; v += 32 * kBtWarps) {
    const int m = v / 1024, gt = (v / 128) % 8, c = v % 128, blk = c / 4, o = c % 4;
    const int64_t bb = blockIdx.x * 32 + blk;
    if (bb >= a.blocks || gt >= G) continue;
    const float* wm = (m == 0 ? a.w : a.w2) + bb * 16 + o * 4;
    const float* sv = ssum + gt * 128 + blk * 4;
    const float s = __ldg(wm) * sv[0] + __ldg(wm + 1) * sv[1] + __ldg(wm + 2) * sv[2] + __ldg(wm + 3) * sv[3];
    (m == 0 ? p.gate0 : p.gate1)[(blockIdx.y * (int64_t)G + gt) * (a.blocks * 4) + bb * 4 + o] = s;
  }
  // Bias gradients Σ_r dgate over this block's rows (first column block), as block_diag4_bwd.
  if (p.db != nullptr && blockIdx.x == 0) {
    __syncthreads();  // ssum's readers are done (bsum reuses the scratch's start)
    constexpr int kLanes = 32 * kBtWarps / 16;
    float* bsum = sw;  // [kLanes row lanes][16 gates]
    const int t = tid % 16, lane = tid / 16;
    float s = 0.f;
    if (t < G)
      for (int64_t r = r0 + lane; r < r1; r += kLanes) s += GateGrad(g, r, t);
    bsum[lane * 16 + t] = s;
    __syncthreads();
    if (tid < G) {
      float tot = 0.f;
      for (int l = 0; l < kLanes; ++l) tot += bsum[l * 16 + tid];
      p.db[blockIdx.y * (int64_t)G + tid] = tot;
    }
  }
}

// Group norms, 8 columns per access (group size % 8 == 0): the warp-per-(row, group) kernels
// above with 16-byte loads; passes re-read the (L1-resident) row.
template <int kMode>
__device__ inline void NormIn8(const GroupNormArgs& a, int64_t r, int64_t c, float* v) {
  Load8(a.x, r * a.dim + c, v);
  if (kMode == 1) {
    float z[8];
    Load8(a.z, r * a.ldz + c, z);
#pragma unroll
    for (int k = 0; k < 8; ++k) v[k] *= Silu(z[k]);
  }
}
__device__ inline void Scale8(const GroupNormArgs& a, int64_t c, float* s) {
  if (a.weight) {
    LoadF8(a.weight + c, s);
#pragma unroll
    for (int k = 0; k < 8; ++k) s[k] += a.weight_offset;
  } else {
#pragma unroll
    for (int k = 0; k < 8; ++k) s[k] = 1.f;
  }
}

// The per-chunk math shared by the streaming (_vec) and register-resident (_reg) group-norm
// kernels; the callers differ only in where a chunk's x, z, dy come from.

// Forward: y for one chunk of 8 columns from the norm's input v (load_z(z) fetches z in mode 2).
template <int kMode, typename LoadZ, typename LoadXc>
__device__ __forceinline__ void GroupNormFwdChunk(const GroupNormArgs& a, int64_t r, int64_t c, const float* v,
                                                  float mean, float rstd, LoadZ load_z, LoadXc load_xc) {
  float sc[8], n[8];
  Scale8(a, c, sc);
#pragma unroll
  for (int k = 0; k < 8; ++k) n[k] = (v[k] - mean) * rstd * sc[k];
  if (kMode == 2) {
    float sk[8], xc[8], z[8];
    LoadF8(a.skip + c, sk);
    load_xc(xc);
    load_z(z);
#pragma unroll
    for (int k = 0; k < 8; ++k) n[k] = (n[k] + sk[k] * xc[k]) * Silu(z[k]);
  }
  Store8(a.y, r * a.dim + c, n);
}

// Backward, first pass over one chunk (v = the norm's input): s1 += Σ dxhat, s2 += Σ dxhat·xhat,
// the warp's own dweight (and dskip) column sums at `slot`, and in mode 2 the dz / dxc outputs.
template <int kMode, int kLanes = 32>
__device__ __forceinline__ void GroupNormBwdChunkSums(const GroupNormArgs& a, int64_t r, int64_t c, const float* v,
                                                      const float* sc, const float* dy, const float* z, float mean,
                                                      float rstd, bool params, float* mine, int span, int slot,
                                                      float& s1, float& s2) {
  float dz[8], dxc[8], sk[8], xc[8];
  if (kMode == 2) {
    LoadF8(a.skip + c, sk);
    Load8(a.xc, r * a.dim + c, xc);
  }
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    const float xhat = (v[k] - mean) * rstd;
    const float gout = kMode == 2 ? dy[k] * Silu(z[k]) : dy[k];
    const float dxhat = gout * sc[k];
    s1 += dxhat;
    s2 += dxhat * xhat;
    if (params) {
      mine[slot + k * kLanes] += gout * xhat;
      if (kMode == 2) mine[8 * span + slot + k * kLanes] += gout * xc[k];
    }
    if (kMode == 2) {
      const float hs = xhat * sc[k] + sk[k] * xc[k];
      dz[k] = dy[k] * hs * DSilu(z[k]);
      dxc[k] = gout * sk[k];
    }
  }
  if (kMode == 2) {
    Store8(a.dz, r * DzLd(a) + c, dz);
    Store8(a.dxc, r * a.dim + c, dxc);
  }
}

// Backward, second pass over one chunk (xv = x as stored): dx (and dz in mode 1).
// kLdDz: dz rows of a.lddz (the Mamba-2 fused in_proj backward's dz columns), else of a.dim.
// dx_out (optional): the chunk's dx in fp32 as well, before the bf16 store rounds it.
template <int kMode, bool kLdDz = false>
__device__ __forceinline__ void GroupNormBwdChunkDx(const GroupNormArgs& a, int64_t r, int64_t c, const float* xv,
                                                    const float* sc, const float* dy, const float* z, float mean,
                                                    float rstd, float m1, float s2, float* dx_out = nullptr) {
  float dx[8], dz[8];
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    const float in = kMode == 1 ? xv[k] * Silu(z[k]) : xv[k];
    const float xhat = (in - mean) * rstd;
    const float gout = kMode == 2 ? dy[k] * Silu(z[k]) : dy[k];
    const float dxa = rstd * (gout * sc[k] - m1 - xhat * s2);
    if (kMode == 1) {
      dx[k] = dxa * Silu(z[k]);
      dz[k] = dxa * xv[k] * DSilu(z[k]);
    } else {
      dx[k] = dxa;
    }
  }
  if (kMode == 0 && a.dresidual != nullptr) {
    float res[8];
    Load8(a.dresidual, r * a.dim + c, res);
#pragma unroll
    for (int k = 0; k < 8; ++k) dx[k] += res[k];
  }
  Store8(a.dx, r * a.dim + c, dx);
  if (kMode == 1) Store8(a.dz, r * (kLdDz ? static_cast<int64_t>(a.lddz) : a.dim) + c, dz);
  if (dx_out != nullptr) {
#pragma unroll
    for (int k = 0; k < 8; ++k) dx_out[k] = dx[k];
  }
}

// The block's column sums ([kMode == 2 ? 2 : 1][8 warps][span] in shared memory): zeroed before
// the rows, and at the end the 8 warps' sums added in warp order into the partial rows pw / ps.
// A warp's span holds 32 / kLanes regions, one per lane group (the row it takes), each
// NormRegion floats: element k of lane l's chunk j at (8j + k)·kLanes + l; two regions sit 16
// words apart modulo 32, so one add instruction of the whole warp is free of bank conflicts.
__host__ __device__ constexpr int NormRegion(int64_t gs, int lanes) {
  return static_cast<int>((gs + 8 * lanes - 1) / (8 * lanes) * (8 * lanes)) + (lanes < 32 ? 16 : 0);
}
__host__ __device__ constexpr int NormSpan(int64_t gs, int lanes) { return 32 / lanes * NormRegion(gs, lanes); }
template <int kMode>
__device__ __forceinline__ void ZeroColumnSums(float* psum, int span) {
  for (int e = threadIdx.x; e < (kMode == 2 ? 2 : 1) * 8 * span; e += blockDim.x) psum[e] = 0.f;
  __syncthreads();
}
template <int kMode, int kLanes = 32>
__device__ __forceinline__ void WriteColumnSums(const GroupNormArgs& a, const float* psum, int span, int64_t gs,
                                                int64_t c0, float* pw, float* ps) {
  __syncthreads();
  const int region = NormRegion(gs, kLanes);
  for (int e = threadIdx.x; e < region; e += blockDim.x) {
    // inverse of the slot map (the pad words of two-region spans give col >= gs)
    const int64_t col = e / (8 * kLanes) * (8 * kLanes) + (e % kLanes) * 8 + (e / kLanes) % 8;
    if (col < gs && e < region - (kLanes < 32 ? 16 : 0)) {
      float tw = 0.f, ts = 0.f;
#pragma unroll
      for (int w = 0; w < 8; ++w)
#pragma unroll
        for (int h = 0; h < 32 / kLanes; ++h) {
          tw += psum[w * span + h * region + e];
          if (kMode == 2) ts += psum[(8 + w) * span + h * region + e];
        }
      const int64_t o = blockIdx.x * a.dim + c0 + col;
      if (a.dweight) pw[o] = tw;
      if (kMode == 2 && a.dskip) ps[o] = ts;
    }
  }
}

template <int kMode>
__global__ void group_norm_fwd_vec(GroupNormArgs a) {
  const int64_t warp = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (warp >= a.rows * a.groups) return;
  const int64_t r = warp / a.groups, g = warp % a.groups, gs = a.dim / a.groups, c0 = g * gs;
  float v[8];
  float s = 0.f;
  if (a.layer) {
    for (int64_t i = lane * 8; i < gs; i += 256) {
      NormIn8<kMode>(a, r, c0 + i, v);
#pragma unroll
      for (int k = 0; k < 8; ++k) s += v[k];
    }
    s = WarpSum(s) / gs;
  }
  const float mean = s;
  float q = 0.f;
  for (int64_t i = lane * 8; i < gs; i += 256) {
    NormIn8<kMode>(a, r, c0 + i, v);
#pragma unroll
    for (int k = 0; k < 8; ++k) q += (v[k] - mean) * (v[k] - mean);
  }
  const float rstd = rsqrtf(WarpSum(q) / gs + a.eps);
  if (lane == 0) {
    if (a.mean) a.mean[warp] = mean;
    a.rstd[warp] = rstd;
  }
  for (int64_t i = lane * 8; i < gs; i += 256) {
    const int64_t c = c0 + i;
    NormIn8<kMode>(a, r, c, v);
    GroupNormFwdChunk<kMode>(a, r, c, v, mean, rstd, [&](float* z) { Load8(a.z, r * a.ldz + c, z); },
                             [&](float* xc) { Load8(a.xc, r * a.dim + c, xc); });
  }
}

// Backward, warp per (row, group) as the forward; a block's 8 warps take kNormBwdRows rows of
// one group (blockIdx.y). dweight / dskip ride along: each warp adds its rows' terms into its own
// shared column sums (lane-interleaved: element k of lane l's chunk j at (8j + k)·32 + l, so one
// add instruction touches 32 consecutive words; every word has one owner, no atomics), then the
// 8 warps' sums are added in warp order into the block's partial row pw / ps [row blocks, dim]
// — no second pass over x, z, x_c and dy for the parameter gradients.
// (256, 3): mode 2 needs 93 registers unbounded, which left 2 blocks (16 warps) per SM; 80 fit
// 3 (xlstm[1:0]-125m on an H200, rglue8 call 1: GroupNorm backward 11.02 -> 9.33 ms per step,
// the plain norms now adding their residual gradient too, so >= 1.7 ms from this bound). Mode 0
// keeps its 48 registers (5 blocks).
// kLanes 16: each half-warp takes a row of its own (two rows per warp at a time, 16-lane sums),
// for groups of an odd number of 128-column passes: at 384 columns (the xLSTM-125m mLSTM output
// norm, 4 heads of 384) 32 lanes take 1.5 chunks each, so lanes 16-31 idled on the second pass
// of every row; 16 lanes take exactly 3.
// (The body is GroupNormBwdVecRun, shared with group_norm_bwd_vec_lddz below.)
template <int kMode, int kLanes, bool kLdDz>
__device__ __forceinline__ void GroupNormBwdVecRun(const GroupNormArgs& a, float* pw, float* ps) {
  constexpr int kRows = 32 / kLanes;  // rows a warp takes at a time
  extern __shared__ float psum[];  // [kMode == 2 ? 2 : 1][8 warps][span]
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, h = lane / kLanes, hl = lane % kLanes;
  const int64_t g = blockIdx.y, gs = a.dim / a.groups, c0 = g * gs;
  const int span = NormSpan(gs, kLanes);
  const bool params = a.dweight != nullptr || (kMode == 2 && a.dskip != nullptr);
  // this lane group's dweight sums; its dskip sums at + 8·span
  float* const mine = psum + wid * span + h * NormRegion(gs, kLanes);
  if (params) ZeroColumnSums<kMode>(psum, span);
  const int64_t rb0 = blockIdx.x * (int64_t)kNormBwdRows, rb1 = min(rb0 + kNormBwdRows, a.rows);
  for (int64_t rw = rb0 + wid * kRows; rw < rb1; rw += 8 * kRows) {  // uniform over the warp
    const int64_t r = rw + h;
    const bool ok = r < rb1;  // (the lane-group sums below need every lane)
    const int64_t st = r * a.groups + g;
    const float mean = a.layer && ok ? a.mean[st] : 0.f, rstd = ok ? a.rstd[st] : 0.f;
    float s1 = 0.f, s2 = 0.f;
    float v[8], sc[8], dy[8], z[8];
    if (ok) {
      for (int64_t i = hl * 8; i < gs; i += 8 * kLanes) {
        const int64_t c = c0 + i;
        const int slot = static_cast<int>((i - hl * 8) / (8 * kLanes)) * 8 * kLanes + hl;  // (8j + k)·kLanes + l at k = 0
        NormIn8<kMode>(a, r, c, v);
        Scale8(a, c, sc);
        Load8(a.dy, r * a.dim + c, dy);
        if (kMode == 2) Load8(a.z, r * a.ldz + c, z);
        GroupNormBwdChunkSums<kMode, kLanes>(a, r, c, v, sc, dy, z, mean, rstd, params, mine, span, slot, s1, s2);
      }
    }
    s1 = LaneGroupSum<kLanes>(s1) / gs;
    s2 = LaneGroupSum<kLanes>(s2) / gs;
    const float m1 = a.layer ? s1 : 0.f;
    if (ok) {
      for (int64_t i = hl * 8; i < gs; i += 8 * kLanes) {
        const int64_t c = c0 + i;
        float xv[8];
        Load8(a.x, r * a.dim + c, xv);
        Scale8(a, c, sc);
        Load8(a.dy, r * a.dim + c, dy);
        if (kMode != 0) Load8(a.z, r * a.ldz + c, z);
        GroupNormBwdChunkDx<kMode, kLdDz>(a, r, c, xv, sc, dy, z, mean, rstd, m1, s2);
      }
    }
  }
  if (params) WriteColumnSums<kMode, kLanes>(a, psum, span, gs, c0, pw, ps);
}

template <int kMode, int kLanes>
__global__ void __launch_bounds__(256, kMode == 0 ? 5 : 3) group_norm_bwd_vec(GroupNormArgs a, float* pw, float* ps) {
  GroupNormBwdVecRun<kMode, kLanes, false>(a, pw, ps);
}

// The gated mode with dz rows of a.lddz (GroupNormArgs::lddz: Mamba-2's fused in_proj backward).
template <int kLanes>
__global__ void __launch_bounds__(256, 3) group_norm_bwd_vec_lddz(GroupNormArgs a, float* pw, float* ps) {
  GroupNormBwdVecRun<1, kLanes, true>(a, pw, ps);
}

// Register-resident variants for groups of at most 256·kIters columns (kIters 16-byte chunks per
// lane): each row's x, dy, z (bf16, 16 bytes per chunk) are loaded once, all chunks' loads issued
// before any is used, and kept in registers for the second pass. group_norm_bwd_vec re-read the
// row in its second pass; 8 warps x 4 blocks x 9 KiB rows (d_inner 1536) overflow the L1 left
// beside 48 KiB of column sums per block, so those reads went to L2 (6.9 ms per mamba2-130m
// step, 1.75 TB/s of the 3-read 2-write floor). Same arithmetic, same per-lane order.
__device__ __forceinline__ uint4 LdRaw(const void* p, int64_t i) {
  return *reinterpret_cast<const uint4*>(static_cast<const bf16*>(p) + i);
}
__device__ __forceinline__ void Unpack8(const uint4& u, float* v) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const float2 f = __bfloat1622float2(h[k]);
    v[2 * k] = f.x;
    v[2 * k + 1] = f.y;
  }
}

// kLanes 16: a half-warp per (row, group), two at a time per warp (see group_norm_bwd_vec: at
// 384 columns 16 lanes take 3 chunks each where 32 took 1.5, the upper half idle on the second).
template <int kMode, int kIters, int kLanes>
__global__ void __launch_bounds__(256) group_norm_fwd_reg(GroupNormArgs a) {
  constexpr int kRows = 32 / kLanes;
  const int lane = threadIdx.x & 31, hl = lane % kLanes;
  const int64_t warp0 = ((blockIdx.x * (int64_t)blockDim.x + threadIdx.x) >> 5) * kRows;
  if (warp0 >= a.rows * a.groups) return;  // uniform over the warp
  const int64_t warp = warp0 + lane / kLanes;  // this lane group's (row, group)
  const bool ok = warp < a.rows * a.groups;   // (the lane-group sums below need every lane)
  const int64_t r = ok ? warp / a.groups : 0, g = warp % a.groups, gs = a.dim / a.groups, c0 = g * gs;
  // Mode 2's x_c too is loaded with the row (it is read only after the statistics: loaded there,
  // its latency was exposed once per row).
  uint4 xr[kIters], zr[kIters], xcr[kIters];
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int64_t i = hl * 8 + it * 8 * kLanes;
    if (ok && i < gs) {
      xr[it] = LdRaw(a.x, r * a.dim + c0 + i);
      if (kMode != 0) zr[it] = LdRaw(a.z, r * a.ldz + c0 + i);
      if (kMode == 2) xcr[it] = LdRaw(a.xc, r * a.dim + c0 + i);
    }
  }
  // The norm's input chunk it (x, or x ⊙ SiLU(z) in mode 1).
  auto input = [&](int it, float* v) {
    Unpack8(xr[it], v);
    if (kMode == 1) {
      float z[8];
      Unpack8(zr[it], z);
#pragma unroll
      for (int k = 0; k < 8; ++k) v[k] *= Silu(z[k]);
    }
  };
  float v[8];
  float s = 0.f;
  if (a.layer) {
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      if (ok && hl * 8 + it * 8 * kLanes < gs) {
        input(it, v);
#pragma unroll
        for (int k = 0; k < 8; ++k) s += v[k];
      }
    }
    s = LaneGroupSum<kLanes>(s) / gs;
  }
  const float mean = s;
  float q = 0.f;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    if (ok && hl * 8 + it * 8 * kLanes < gs) {
      input(it, v);
#pragma unroll
      for (int k = 0; k < 8; ++k) q += (v[k] - mean) * (v[k] - mean);
    }
  }
  const float rstd = rsqrtf(LaneGroupSum<kLanes>(q) / gs + a.eps);
  if (ok && hl == 0) {
    if (a.mean) a.mean[warp] = mean;
    a.rstd[warp] = rstd;
  }
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int64_t i = hl * 8 + it * 8 * kLanes;
    if (!ok || i >= gs) continue;
    const int64_t c = c0 + i;
    input(it, v);
    GroupNormFwdChunk<kMode>(a, r, c, v, mean, rstd, [&](float* z) { Unpack8(zr[it], z); },
                             [&](float* xc) { Unpack8(xcr[it], xc); });
  }
}

// group_norm_bwd_vec with the row in registers (see above); column sums as there. Two blocks
// per SM (16 warps, 2 x 48 KiB of column sums at d_inner 1536).
// (The body is GroupNormBwdRegRun, shared with group_norm_bwd_reg_lddz below.)
template <int kMode, int kIters, bool kLdDz>
__device__ __forceinline__ void GroupNormBwdRegRun(const GroupNormArgs& a, float* pw, float* ps) {
  extern __shared__ float psum[];  // [kMode == 2 ? 2 : 1][8 warps][span]
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  const int64_t g = blockIdx.y, gs = a.dim / a.groups, c0 = g * gs;
  const int span = static_cast<int>((gs + 255) / 256) * 256;
  const bool params = a.dweight != nullptr || (kMode == 2 && a.dskip != nullptr);
  float* const mine = psum + wid * span;
  if (params) ZeroColumnSums<kMode>(psum, span);
  const int64_t rb0 = blockIdx.x * (int64_t)kNormBwdRows, rb1 = min(rb0 + kNormBwdRows, a.rows);
  for (int64_t r = rb0 + wid; r < rb1; r += 8) {
    const int64_t st = r * a.groups + g;
    const float mean = a.layer ? a.mean[st] : 0.f, rstd = a.rstd[st];
    uint4 xr[kIters], dyr[kIters], zr[kIters];
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int64_t i = lane * 8 + it * 256;
      if (i < gs) {
        xr[it] = LdRaw(a.x, r * a.dim + c0 + i);
        dyr[it] = LdRaw(a.dy, r * a.dim + c0 + i);
        if (kMode != 0) zr[it] = LdRaw(a.z, r * a.ldz + c0 + i);
      }
    }
    float s1 = 0.f, s2 = 0.f;
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int64_t i = lane * 8 + it * 256;
      if (i >= gs) continue;
      const int64_t c = c0 + i;
      const int slot = it * 256 + lane;  // (8j + k)·32 + l at k = 0
      float v[8], sc[8], dy[8], z[8];
      Unpack8(xr[it], v);
      if (kMode != 0) Unpack8(zr[it], z);
      if (kMode == 1) {
#pragma unroll
        for (int k = 0; k < 8; ++k) v[k] *= Silu(z[k]);
      }
      Scale8(a, c, sc);
      Unpack8(dyr[it], dy);
      GroupNormBwdChunkSums<kMode>(a, r, c, v, sc, dy, z, mean, rstd, params, mine, span, slot, s1, s2);
    }
    s1 = WarpSum(s1) / gs;
    s2 = WarpSum(s2) / gs;
    const float m1 = a.layer ? s1 : 0.f;
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int64_t i = lane * 8 + it * 256;
      if (i >= gs) continue;
      const int64_t c = c0 + i;
      float xv[8], sc[8], dy[8], z[8];
      Unpack8(xr[it], xv);
      Scale8(a, c, sc);
      Unpack8(dyr[it], dy);
      if (kMode != 0) Unpack8(zr[it], z);
      GroupNormBwdChunkDx<kMode, kLdDz>(a, r, c, xv, sc, dy, z, mean, rstd, m1, s2);
    }
  }
  if (params) WriteColumnSums<kMode>(a, psum, span, gs, c0, pw, ps);
}

template <int kMode, int kIters>
__global__ void __launch_bounds__(256, 2) group_norm_bwd_reg(GroupNormArgs a, float* pw, float* ps) {
  GroupNormBwdRegRun<kMode, kIters, false>(a, pw, ps);
}

// The gated mode with dz rows of a.lddz (GroupNormArgs::lddz: Mamba-2's fused in_proj backward).
template <int kIters>
__global__ void __launch_bounds__(256, 2) group_norm_bwd_reg_lddz(GroupNormArgs a, float* pw, float* ps) {
  GroupNormBwdRegRun<1, kIters, true>(a, pw, ps);
}

__device__ __forceinline__ void CpAsync16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n"
               ::"r"(static_cast<uint32_t>(__cvta_generic_to_shared(dst))), "l"(src));
}

// GYRE_NORM_FWD=pf (the default since session 8; see PfOrUnset): Mamba-2's gated norm forward (mode 1) for groups
// of exactly kChunks x 256 columns (130m: one group of 1536, 6 chunks a lane). A warp per (row,
// group) as group_norm_fwd_vec, but each lane first cp.asyncs all its chunks of x and z (2 x
// kChunks x 16 B) into its own shared-memory stash, waits once, and takes the statistics and the
// output pass from there. _vec re-reads x, z from L1 in every pass (9 KiB rows x 40 warps
// overflow it: the re-reads go to L2) and has one chunk's loads in flight a lane at a time.
// 48 KiB of static stash a block (6 KiB a warp), 4 blocks (32 warps) a SM. Same arithmetic and
// order as _vec (expected: the same bits). Prediction (counts, H200, mamba2-130m B16 x 2048): 6 B
// an element (x, z in, y out), floor 1.7 ms a step; _vec 2.49; this ~2.0 if L2 re-reads and
// per-pass latency were the gap.
template <int kChunks>
__global__ void __launch_bounds__(256) group_norm_fwd_gated_pf(GroupNormArgs a) {
  constexpr int kMode = 1;
  __shared__ uint4 stash[8][2][kChunks][32];  // [warp][x, z][chunk][lane]
  const int64_t warp = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  if (warp >= a.rows * a.groups) return;  // (no block-wide synchronisation below)
  const int64_t r = warp / a.groups, g = warp % a.groups, gs = a.dim / a.groups, c0 = g * gs;
#pragma unroll
  for (int j = 0; j < kChunks; ++j) {
    const int64_t i = lane * 8 + j * 256;
    CpAsync16(&stash[wid][0][j][lane], static_cast<const bf16*>(a.x) + r * a.dim + c0 + i);
    CpAsync16(&stash[wid][1][j][lane], static_cast<const bf16*>(a.z) + r * a.ldz + c0 + i);
  }
  CpAsyncCommit();
  CpAsyncWait<0>();  // this lane's own entries only
  auto in = [&](int j, float* v) {  // NormIn8<1>: x ⊙ SiLU(z)
    float z[8];
    Unpack8(stash[wid][0][j][lane], v);
    Unpack8(stash[wid][1][j][lane], z);
#pragma unroll
    for (int k = 0; k < 8; ++k) v[k] *= Silu(z[k]);
  };
  float v[8];
  float s = 0.f;
  if (a.layer) {
#pragma unroll 1
    for (int j = 0; j < kChunks; ++j) {
      in(j, v);
#pragma unroll
      for (int k = 0; k < 8; ++k) s += v[k];
    }
    s = WarpSum(s) / gs;
  }
  const float mean = s;
  float q = 0.f;
#pragma unroll 1
  for (int j = 0; j < kChunks; ++j) {
    in(j, v);
#pragma unroll
    for (int k = 0; k < 8; ++k) q += (v[k] - mean) * (v[k] - mean);
  }
  const float rstd = rsqrtf(WarpSum(q) / gs + a.eps);
  if (lane == 0) {
    if (a.mean) a.mean[warp] = mean;
    a.rstd[warp] = rstd;
  }
#pragma unroll 1
  for (int j = 0; j < kChunks; ++j) {
    const int64_t c = c0 + lane * 8 + j * 256;
    in(j, v);
    GroupNormFwdChunk<kMode>(a, r, c, v, mean, rstd, [&](float*) {}, [&](float*) {});
  }
}

// GYRE_NORM_BWD=pf (the default since session 8; see PfOrUnset): the mLSTM output norm's backward (mode 2) for
// groups of exactly kPasses 128-column passes at 16 lanes (the 125m / 1.3b layouts: 4 x 384, 3
// passes). Each lane first issues cp.async copies of all its chunks of x, dy, z, x_c (4 x kPasses
// x 16 B) into its own stash in shared memory, waits once, and runs both passes from there.
// group_norm_bwd_vec<2, 16> issues a chunk's loads after the previous chunk's dz / dxc stores
// (no __restrict__: the compiler may not hoist them), so each warp had ~1 chunk (4 loads a lane)
// in flight and paid the memory latency kPasses times per row pair, and its second pass re-read
// the row from L1. Here a warp has 12 copies a lane in flight; 2 blocks a SM (48 KiB of stash +
// 50 KiB of column sums each; 16 warps instead of 24): bytes in flight per SM 48 -> 96 KiB.
// ptxas: 92 registers, no spill (the chunks in registers instead: 128 and 16 B spilled; x_c
// alone in shared memory: 4 B). Same arithmetic and per-lane order as _vec (expected: the same
// bits). Prediction (counts, H200, xlstm[1:0]-125m B16 x 2048): 14 B an element, floor 3.9 ms a
// step; _vec runs 5.74 (2.9 TB/s); this ~4.4 if the latency-bound share goes, no better than
// _vec if 16 warps that each wait for their whole row pair cannot cover the rest.
__device__ __forceinline__ void MlstmOutBwdChunkSums(const GroupNormArgs& a, int64_t r, int64_t c, const float* v,
                                                     const float* sc, const float* dy, const float* z,
                                                     const float* xc, float mean, float rstd, bool params,
                                                     float* mine, int span, int slot, float& s1, float& s2) {
  constexpr int kLanes = 16;
  float dz[8], dxc[8], sk[8];
  LoadF8(a.skip + c, sk);
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    const float xhat = (v[k] - mean) * rstd;
    const float gout = dy[k] * Silu(z[k]);
    const float dxhat = gout * sc[k];
    s1 += dxhat;
    s2 += dxhat * xhat;
    if (params) {
      mine[slot + k * kLanes] += gout * xhat;
      mine[8 * span + slot + k * kLanes] += gout * xc[k];
    }
    const float hs = xhat * sc[k] + sk[k] * xc[k];
    dz[k] = dy[k] * hs * DSilu(z[k]);
    dxc[k] = gout * sk[k];
  }
  Store8(a.dz, r * DzLd(a) + c, dz);
  Store8(a.dxc, r * a.dim + c, dxc);
}
// [8 warps][2 halves][x_c, z, dy, x (, h lo)][kPasses][16 lanes] x 16 B
template <int kPasses, bool kDots = false>
constexpr int kNormPfStashBytes = 8 * 2 * (kDots ? 5 : 4) * kPasses * 16 * 16;
// The body of group_norm_bwd_mlstm_pf and, with kDots, of group_norm_bwd_mlstm_pf_dots: the latter
// also copies the row's h lo (h_lo, [rows, dim] bf16, the mLSTM cell's saved lo part of its output
// x = h; null = 0) into a fifth stash array and writes, per (row, group),
//   dots[r·groups + g] = Σ_c float(bf16(dx[r, c])) · (x[r, c] + h_lo[r, c])
// (dx = the cell's dh as stored; kernels/cuda/mlstm.h MlstmChunkwiseBackwardWithDots): each lane
// sums its 8-column chunks in pass order in the second pass, then the 16 lanes' sums by
// LaneGroupSum (a fixed butterfly), so the bits are the same run to run.
template <int kPasses, bool kDots>
__device__ __forceinline__ void GroupNormBwdMlstmPfRun(const GroupNormArgs& a, float* pw, float* ps, const bf16* h_lo,
                                                       float* dots) {
  constexpr int kMode = 2, kLanes = 16, kRows = 2, kArrays = kDots ? 5 : 4;
  extern __shared__ __align__(16) float pf_dyn[];  // the stash, then [2][8 warps][span] column sums
  float* const psum = pf_dyn + kNormPfStashBytes<kPasses, kDots> / 4;
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, h = lane / kLanes, hl = lane % kLanes;
  uint4* const stash = reinterpret_cast<uint4*>(pf_dyn) + (wid * 2 + h) * kArrays * kPasses * kLanes + hl;  // x_c + 16 j
  uint4* const zstash = stash + kPasses * kLanes;                                                           // z + 16 j
  uint4* const dystash = zstash + kPasses * kLanes;                                                         // dy + 16 j
  uint4* const xstash = dystash + kPasses * kLanes;                                                         // x + 16 j
  uint4* const lostash = xstash + kPasses * kLanes;  // h lo + 16 j (kDots only)
  const int64_t g = blockIdx.y, gs = a.dim / a.groups, c0 = g * gs;
  const int span = NormSpan(gs, kLanes);
  const bool params = a.dweight != nullptr || a.dskip != nullptr;
  float* const mine = psum + wid * span + h * NormRegion(gs, kLanes);
  if (params) ZeroColumnSums<kMode>(psum, span);
  const int64_t rb0 = blockIdx.x * (int64_t)kNormBwdRows, rb1 = min(rb0 + kNormBwdRows, a.rows);
  for (int64_t rw = rb0 + wid * kRows; rw < rb1; rw += 8 * kRows) {  // uniform over the warp
    const int64_t r = rw + h;
    const bool ok = r < rb1;  // (the lane-group sums below need every lane)
    const int64_t st = r * a.groups + g;
    const float mean = a.layer && ok ? a.mean[st] : 0.f, rstd = ok ? a.rstd[st] : 0.f;
    if (ok) {
      const int64_t o = r * a.dim + c0 + hl * 8, oz = r * a.ldz + c0 + hl * 8;
#pragma unroll
      for (int j = 0; j < kPasses; ++j) {
        CpAsync16(stash + j * kLanes, static_cast<const bf16*>(a.xc) + o + j * 8 * kLanes);
        CpAsync16(zstash + j * kLanes, static_cast<const bf16*>(a.z) + oz + j * 8 * kLanes);
        CpAsync16(dystash + j * kLanes, static_cast<const bf16*>(a.dy) + o + j * 8 * kLanes);
        CpAsync16(xstash + j * kLanes, static_cast<const bf16*>(a.x) + o + j * 8 * kLanes);
        if (kDots && h_lo != nullptr) CpAsync16(lostash + j * kLanes, h_lo + o + j * 8 * kLanes);
      }
    }
    CpAsyncCommit();
    CpAsyncWait<0>();  // this lane's own stash entries (no other lane reads them; the next row
                       // pair's copies are issued after this lane's last read of them)
    float s1 = 0.f, s2 = 0.f;
    if (ok) {
#pragma unroll 1
      for (int j = 0; j < kPasses; ++j) {
        const int64_t c = c0 + hl * 8 + j * 8 * kLanes;
        const int slot = j * 8 * kLanes + hl;  // (8j + k)·kLanes + l at k = 0
        float v[8], sc[8], dy[8], z[8], xc[8];
        Unpack8(xstash[j * kLanes], v);
        Scale8(a, c, sc);
        Unpack8(dystash[j * kLanes], dy);
        Unpack8(zstash[j * kLanes], z);
        Unpack8(stash[j * kLanes], xc);
        MlstmOutBwdChunkSums(a, r, c, v, sc, dy, z, xc, mean, rstd, params, mine, span, slot, s1, s2);
      }
    }
    s1 = LaneGroupSum<kLanes>(s1) / gs;
    s2 = LaneGroupSum<kLanes>(s2) / gs;
    const float m1 = a.layer ? s1 : 0.f;
    float dot = 0.f;
    if (ok) {
#pragma unroll 1
      for (int j = 0; j < kPasses; ++j) {
        const int64_t c = c0 + hl * 8 + j * 8 * kLanes;
        float xv[8], sc[8], dy[8], z[8];
        Unpack8(xstash[j * kLanes], xv);
        Scale8(a, c, sc);
        Unpack8(dystash[j * kLanes], dy);
        Unpack8(zstash[j * kLanes], z);
        if constexpr (kDots) {
          float dx[8], lo[8];
          GroupNormBwdChunkDx<kMode>(a, r, c, xv, sc, dy, z, mean, rstd, m1, s2, dx);
          if (h_lo != nullptr) {
            Unpack8(lostash[j * kLanes], lo);
          } else {
#pragma unroll
            for (int k = 0; k < 8; ++k) lo[k] = 0.f;
          }
#pragma unroll
          for (int k = 0; k < 8; ++k) dot += __bfloat162float(__float2bfloat16_rn(dx[k])) * (xv[k] + lo[k]);
        } else {
          GroupNormBwdChunkDx<kMode>(a, r, c, xv, sc, dy, z, mean, rstd, m1, s2);
        }
      }
    }
    if constexpr (kDots) {
      dot = LaneGroupSum<kLanes>(dot);
      if (ok && hl == 0) dots[st] = dot;
    }
  }
  if (params) WriteColumnSums<kMode, kLanes>(a, psum, span, gs, c0, pw, ps);
}
template <int kPasses>
__global__ void __launch_bounds__(256, 2) group_norm_bwd_mlstm_pf(GroupNormArgs a, float* pw, float* ps) {
  GroupNormBwdMlstmPfRun<kPasses, false>(a, pw, ps, nullptr, nullptr);
}
// GYRE_MLSTM_DH_DOT=norm (ops/recurrent_blocks.h; MlstmOutNormBackwardWithDots): + one [rows, dim]
// read (h lo) and [rows, groups] fp32 written, so the cell's bwd_prep need not read dh, h, h lo
// again (ops/XLSTM_GLUE.md). 60 KiB of stash + 50 KiB of column sums: still 2 blocks an SM.
template <int kPasses>
__global__ void __launch_bounds__(256, 2) group_norm_bwd_mlstm_pf_dots(GroupNormArgs a, float* pw, float* ps,
                                                                       const bf16* h_lo, float* dots) {
  GroupNormBwdMlstmPfRun<kPasses, true>(a, pw, ps, h_lo, dots);
}

// GYRE_GATED_NORM=row (the default since session 19; ops/MAMBA2_NORM.md): Mamba-2's gated RMSNorm (mode 1) for groups
// wider than the 130m width's 1536 columns (mamba2-1.3b: ONE group of 4096, ssm_groups 1), which
// otherwise take the warp-per-(row, group) _vec kernels. There, a warp walks a 4096-column row
// with about one 16-byte chunk a lane in flight and re-reads the row in its second pass (from L2:
// the rows of 64 warps overflow L1); the backward also keeps one row of dweight sums per warp in
// shared memory, 8 x 16 KiB = 128 KiB a block, so one block (8 warps) fits an SM: 12 KiB of loads
// in flight a SM, 1.4 TB/s (46% of the byte floor on an H100; the forward 1.7 TB/s, 58%).
//
// Here a CTA of kRowThreads threads takes a (row, group): thread t owns the 8-column chunks
// i = 8t + 2048·it (it < kIters: a CTA's 16-byte loads of one `it` are 4 KiB contiguous), issues
// the loads of all its chunks before using any, and keeps them in registers (the row is read
// once). A row's sums: 32-lane butterfly (WarpSum), the 8 warps' sums through shared memory,
// added by every thread in warp order (RowSum; fixed order, so the same bits every run, though not
// the old kernels' bits: their per-lane order was over 16 chunks).
// Backward: a CTA takes kRowBwdRows consecutive rows of one group; since thread t owns the same
// columns in every row, its dweight terms accumulate in registers (8·kIters floats) over the
// CTA's rows, in row order, and go out once as the CTA's partial row (then reduce_partials, as
// everywhere in this file) — no shared-memory column sums, so occupancy is set by registers.
constexpr int kRowThreads = 256;
constexpr int kRowChunkCols = 8 * kRowThreads;  // columns of one `it` (2048)
constexpr int kRowBwdRows = 32;                 // rows of a backward CTA (its partial row)
// Groups up to 4096 columns (mamba2-370m / 780m / 1.3b: 2048 / 3072 / 4096). kIters 3 (6144,
// mamba2-2.7b's 5120) compiled to 80 registers and 56 B of spills at (256, 3) and was never run on
// a device: left out (2.7b keeps the warp kernels).
constexpr int kRowMaxIters = 2;

// v[n] := Σ over the CTA of each thread's v[n]; red: kN x 8 floats of shared memory that no thread
// reads or writes between this call's barrier and its last read (callers alternate two buffers).
template <int kN>
__device__ __forceinline__ void RowSum(float (&v)[kN], float* red) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
#pragma unroll
  for (int n = 0; n < kN; ++n) v[n] = WarpSum(v[n]);
  if (lane == 0) {
#pragma unroll
    for (int n = 0; n < kN; ++n) red[n * 8 + wid] = v[n];
  }
  __syncthreads();
#pragma unroll
  for (int n = 0; n < kN; ++n) {
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < kRowThreads / 32; ++w) s += red[n * 8 + w];
    v[n] = s;
  }
}

// Row r's x and z (with kDy also dy) in the group at column c0, as raw bf16 x 8: thread t's
// chunk it holds the 8 columns 8t + it·kRowChunkCols (those < gs).
template <int kIters, bool kDy>
__device__ __forceinline__ void LdGatedRowChunks(const GroupNormArgs& a, int64_t r, int64_t c0, int64_t gs, int t,
                                                 uint4* xr, uint4* zr, uint4* dyr) {
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int64_t i = 8 * t + it * kRowChunkCols;
    if (i < gs) {
      xr[it] = LdRaw(a.x, r * a.dim + c0 + i);
      zr[it] = LdRaw(a.z, r * a.ldz + c0 + i);
      if constexpr (kDy) dyr[it] = LdRaw(a.dy, r * a.dim + c0 + i);
    }
  }
}

// Forward: CTA blockIdx.x = the (row, group) r·groups + g. Same per-element arithmetic as
// group_norm_fwd_vec<1> (GroupNormFwdChunk).
template <int kIters>
__global__ void __launch_bounds__(kRowThreads) group_norm_fwd_gated_row(GroupNormArgs a) {
  __shared__ float red[2][8];  // [mean, sum of squares][warp]
  const int t = threadIdx.x;
  const int64_t st = blockIdx.x, r = st / a.groups, g = st % a.groups, gs = a.dim / a.groups, c0 = g * gs;
  uint4 xr[kIters], zr[kIters];
  LdGatedRowChunks<kIters, false>(a, r, c0, gs, t, xr, zr, nullptr);
  float v[kIters][8];
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    if (8 * t + it * kRowChunkCols >= gs) continue;
    float z[8];
    Unpack8(xr[it], v[it]);
    Unpack8(zr[it], z);
#pragma unroll
    for (int k = 0; k < 8; ++k) v[it][k] *= Silu(z[k]);
  }
  float mean[1] = {0.f};
  if (a.layer) {
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      if (8 * t + it * kRowChunkCols >= gs) continue;
#pragma unroll
      for (int k = 0; k < 8; ++k) mean[0] += v[it][k];
    }
    RowSum<1>(mean, red[0]);
    mean[0] /= gs;
  }
  float q[1] = {0.f};
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    if (8 * t + it * kRowChunkCols >= gs) continue;
#pragma unroll
    for (int k = 0; k < 8; ++k) q[0] += (v[it][k] - mean[0]) * (v[it][k] - mean[0]);
  }
  RowSum<1>(q, red[1]);
  const float rstd = rsqrtf(q[0] / gs + a.eps);
  if (t == 0) {
    if (a.mean) a.mean[st] = mean[0];
    a.rstd[st] = rstd;
  }
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int64_t i = 8 * t + it * kRowChunkCols;
    if (i >= gs) continue;
    GroupNormFwdChunk<1>(a, r, c0 + i, v[it], mean[0], rstd, [&](float*) {}, [&](float*) {});
  }
}

// A staged chunk of 8 columns at c as floats: x, z, dy, and the norm's scale there (Scale8).
__device__ __forceinline__ void UnpackGatedChunk(const GroupNormArgs& a, int64_t c, const uint4& xr, const uint4& zr,
                                                 const uint4& dyr, float* x, float* z, float* dy, float* sc) {
  Unpack8(xr, x);
  Unpack8(zr, z);
  Unpack8(dyr, dy);
  Scale8(a, c, sc);
}

// Backward: CTA (blockIdx.x, blockIdx.y) = rows [32·blockIdx.x, +32) of group blockIdx.y; its
// dweight partial row at pw[blockIdx.x, group's columns]. Same per-element arithmetic as
// group_norm_bwd_vec<1> (GroupNormBwdChunkSums / GroupNormBwdChunkDx, mode 1). (256, 4): 64
// registers, 32 warps a SM, and 4 x 132 = 528 CTAs hold the 512 of a mamba2-1.3b B8 layer (16384
// rows / 32) in one wave; ptxas spills 12 B (24 with lddz) at kIters 2 (no bound: 112 registers,
// 16 warps). (A variant with per-row pointers instead of the (a, r, c) index helpers spilled
// more: 44-52 B.)
template <int kIters, bool kLdDz>
__global__ void __launch_bounds__(kRowThreads, 4) group_norm_bwd_gated_row(GroupNormArgs a, float* pw) {
  __shared__ float red[2][2][8];  // [row parity][s1, s2][warp]
  const int t = threadIdx.x;
  const int64_t g = blockIdx.y, gs = a.dim / a.groups, c0 = g * gs;
  const int64_t rb0 = blockIdx.x * (int64_t)kRowBwdRows, rb1 = min(rb0 + kRowBwdRows, a.rows);
  float dw[kIters][8];
#pragma unroll
  for (int it = 0; it < kIters; ++it)
#pragma unroll
    for (int k = 0; k < 8; ++k) dw[it][k] = 0.f;
  for (int64_t r = rb0; r < rb1; ++r) {
    const int64_t st = r * a.groups + g;
    const float mean = a.layer ? a.mean[st] : 0.f, rstd = a.rstd[st];
    uint4 xr[kIters], zr[kIters], dyr[kIters];
    LdGatedRowChunks<kIters, true>(a, r, c0, gs, t, xr, zr, dyr);
    float s[2] = {0.f, 0.f};  // Σ dxhat, Σ dxhat·xhat
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int64_t i = 8 * t + it * kRowChunkCols;
      if (i >= gs) continue;
      float v[8], z[8], dy[8], sc[8];
      UnpackGatedChunk(a, c0 + i, xr[it], zr[it], dyr[it], v, z, dy, sc);
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const float xhat = (v[k] * Silu(z[k]) - mean) * rstd;
        const float dxhat = dy[k] * sc[k];
        s[0] += dxhat;
        s[1] += dxhat * xhat;
        dw[it][k] += dy[k] * xhat;
      }
    }
    RowSum<2>(s, &red[(r - rb0) & 1][0][0]);
    const float m1 = a.layer ? s[0] / gs : 0.f, s2 = s[1] / gs;
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int64_t i = 8 * t + it * kRowChunkCols;
      if (i >= gs) continue;
      float xv[8], z[8], dy[8], sc[8];
      UnpackGatedChunk(a, c0 + i, xr[it], zr[it], dyr[it], xv, z, dy, sc);
      GroupNormBwdChunkDx<1, kLdDz>(a, r, c0 + i, xv, sc, dy, z, mean, rstd, m1, s2);
    }
  }
  if (a.dweight == nullptr) return;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int64_t i = 8 * t + it * kRowChunkCols;
    if (i >= gs) continue;
    float4* o = reinterpret_cast<float4*>(pw + blockIdx.x * a.dim + c0 + i);
    o[0] = make_float4(dw[it][0], dw[it][1], dw[it][2], dw[it][3]);
    o[1] = make_float4(dw[it][4], dw[it][5], dw[it][6], dw[it][7]);
  }
}

// GYRE_MLSTM_OUT_NORM=row (the default since session 19; ops/XLSTM_GLUE.md "Session 19 (helper xnorm19)"):
// the mLSTM output norm's backward (mode 2) for heads of 512..1024 columns (% 256; xlstm[1:0]-1.3b:
// 4 heads of 1024), which otherwise take group_norm_bwd_vec<2, 32>: a warp per (row, head) that
// re-reads its 8 KiB row in the second pass (from L2: 24 warps' rows beside 3 x 64 KiB of
// shared-memory column sums overflow L1) and has about one chunk's 4 loads a lane in flight
// (1.76 TB/s of the 14 B floor on an H100, 59%). With GYRE_MLSTM_DH_DOT=norm (the default) the
// same kernel also forms the cell's dots, as group_norm_bwd_mlstm_pf_dots does at 384.
//
// A CTA of gs / 8 threads (4 warps at 1024) takes kMoRows consecutive rows of one head; thread t
// owns the 8 columns 8t of the head in every row, so its dweight and dskip terms accumulate in 16
// registers over the CTA's rows (in row order) and go out once as the CTA's partial rows (then
// reduce_partials, as everywhere in this file): no shared-memory column sums. A row's x, z, dy,
// x_c (and h lo) arrive by cp.async into a 2-row ring in shared memory, thread t's own entries
// only (no barrier for the ring): row i + 1's copies fly while row i is used. A row's two sums:
// 32-lane butterfly, the warps' sums through shared memory, added by every thread in warp order
// (fixed order: the same bits every run, not group_norm_bwd_vec's bits for dx, dweight, dskip;
// dz and dx_c do not depend on the row sums: the same arithmetic as there). The dots: thread t
// sums its 8 products, then the butterfly, then the warps in order at the end of the CTA.
// Statistics of the CTA's rows are loaded once into shared memory.
// Measured (H100, session 19, one xlstm[1:0]-1.3b B4 layer, 8192 x 4 x 1024): _vec 0.2635 ms (1.78
// TB/s of the 14 B floor) -> 0.2097 (2.24), with the dots 0.2147 (2.50 of 16 B); in the step the
// norm 12.70 -> 10.26 ms with the dots, the cell's backward 93.1 -> 90.1.
constexpr int kMoRows = 32;       // rows of a CTA (its partial rows of dweight / dskip)
constexpr int kMoMaxWarps = 4;    // heads of up to 1024 columns
// The cp.async ring: kStages rows, kStages - 1 ahead; 2 is the one instantiated. 3 (2 rows ahead:
// 24 KiB a CTA, 30 with the dots, then 7 CTAs an SM) was measured in the lead's session-19 call F
// and lost (0.2221 vs 0.2090 ms plain, 0.2806 vs 0.2149 with the dots), so it was dropped.
template <bool kDots, int kStages>
constexpr int kMoStashBytes(int threads) {
  return kStages * (kDots ? 5 : 4) * threads * 16;
}

// v[n] := Σ over the CTA's `warps` warps of each thread's v[n]; red: kN x kMoMaxWarps floats that no
// thread touches between this call's barrier and its last read (callers alternate two buffers).
template <int kN>
__device__ __forceinline__ void MoRowSum(float (&v)[kN], float* red, int warps) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
#pragma unroll
  for (int n = 0; n < kN; ++n) v[n] = WarpSum(v[n]);
  if (lane == 0) {
#pragma unroll
    for (int n = 0; n < kN; ++n) red[n * kMoMaxWarps + wid] = v[n];
  }
  __syncthreads();
#pragma unroll
  for (int n = 0; n < kN; ++n) {
    float s = 0.f;
    for (int w = 0; w < warps; ++w) s += red[n * kMoMaxWarps + w];
    v[n] = s;
  }
}

// CTA (blockIdx.x, blockIdx.y) = rows [32·blockIdx.x, +32) of head blockIdx.y; blockDim.x = gs / 8.
// Partial rows pw / ps [row blocks, dim] (dweight, dskip; each written only where a.dweight /
// a.dskip is set). (128, 8): 64 registers, 32 warps a SM; an xlstm[1:0]-1.3b B4 layer's 256 x 4
// CTAs fill 1024 of the 1056 slots (one wave).
template <bool kDots, int kStages>
__global__ void __launch_bounds__(32 * kMoMaxWarps, 8)
    group_norm_bwd_mlstm_row(GroupNormArgs a, float* pw, float* ps, const bf16* h_lo, float* dots) {
  constexpr int kArrays = kDots ? 5 : 4;
  extern __shared__ __align__(16) uint4 mo_stash[];  // [kStages][x, z, dy, x_c (, h lo)][threads]
  __shared__ float stats[2][kMoRows];                // mean, rstd of the CTA's rows
  __shared__ float red[2][2][kMoMaxWarps];           // [row parity][s1, s2][warp]
  __shared__ float dot_part[kDots ? kMoRows : 1][kMoMaxWarps];
  const int t = threadIdx.x, threads = blockDim.x, warps = threads >> 5;
  const int64_t g = blockIdx.y, gs = a.dim / a.groups, c = g * gs + 8 * t;
  const int64_t rb0 = blockIdx.x * static_cast<int64_t>(kMoRows);
  const int rows = static_cast<int>(min(static_cast<int64_t>(kMoRows), a.rows - rb0));
  auto issue = [&](int i) {
    if (i < rows) {
      const int64_t r = rb0 + i, o = r * a.dim + c;
      uint4* s = mo_stash + (i % kStages) * kArrays * threads + t;
      CpAsync16(s, static_cast<const bf16*>(a.x) + o);
      CpAsync16(s + threads, static_cast<const bf16*>(a.z) + r * a.ldz + c);
      CpAsync16(s + 2 * threads, static_cast<const bf16*>(a.dy) + o);
      CpAsync16(s + 3 * threads, static_cast<const bf16*>(a.xc) + o);
      if (kDots && h_lo != nullptr) CpAsync16(s + 4 * threads, h_lo + o);
    }
    CpAsyncCommit();  // (an empty group past the last row keeps the wait count below uniform)
  };
#pragma unroll
  for (int i = 0; i < kStages - 1; ++i) issue(i);
  if (t < rows) {
    const int64_t st = (rb0 + t) * a.groups + g;
    stats[0][t] = a.layer ? a.mean[st] : 0.f;
    stats[1][t] = a.rstd[st];
  }
  // (The scale and skip rows are read again each row, from L1: kept in registers they spilled.)
  float dw[8], dsk[8];
#pragma unroll
  for (int k = 0; k < 8; ++k) dw[k] = dsk[k] = 0.f;
  __syncthreads();  // stats
  for (int i = 0; i < rows; ++i) {
    issue(i + kStages - 1);
    CpAsyncWait<kStages - 1>();  // row i's copies (this thread's own entries)
    const int64_t r = rb0 + i;
    const float mean = stats[0][i], rstd = stats[1][i];
    const uint4* s = mo_stash + (i % kStages) * kArrays * threads + t;
    float sums[2] = {0.f, 0.f};  // Σ dxhat, Σ dxhat·xhat
    float sc[8];
    Scale8(a, c, sc);
    {
      float v[8], z[8], dy[8], xc[8], dz[8], dxc[8], sk[8];
      LoadF8(a.skip + c, sk);
      Unpack8(s[0], v);
      Unpack8(s[threads], z);
      Unpack8(s[2 * threads], dy);
      Unpack8(s[3 * threads], xc);
#pragma unroll
      for (int k = 0; k < 8; ++k) {  // MlstmOutBwdChunkSums' arithmetic
        const float xhat = (v[k] - mean) * rstd;
        const float gout = dy[k] * Silu(z[k]);
        const float dxhat = gout * sc[k];
        sums[0] += dxhat;
        sums[1] += dxhat * xhat;
        dw[k] += gout * xhat;
        dsk[k] += gout * xc[k];
        const float hs = xhat * sc[k] + sk[k] * xc[k];
        dz[k] = dy[k] * hs * DSilu(z[k]);
        dxc[k] = gout * sk[k];
      }
      Store8(a.dz, r * DzLd(a) + c, dz);
      Store8(a.dxc, r * a.dim + c, dxc);
    }
    MoRowSum<2>(sums, &red[i & 1][0][0], warps);
    Scale8(a, c, sc);
    const float m1 = a.layer ? sums[0] / gs : 0.f, s2 = sums[1] / gs;
    float xv[8], z[8], dy[8];
    Unpack8(s[0], xv);
    Unpack8(s[threads], z);
    Unpack8(s[2 * threads], dy);
    if constexpr (kDots) {
      float dx[8], lo[8];
      GroupNormBwdChunkDx<2>(a, r, c, xv, sc, dy, z, mean, rstd, m1, s2, dx);
      if (h_lo != nullptr) {
        Unpack8(s[4 * threads], lo);
      } else {
#pragma unroll
        for (int k = 0; k < 8; ++k) lo[k] = 0.f;
      }
      float dot = 0.f;
#pragma unroll
      for (int k = 0; k < 8; ++k) dot += __bfloat162float(__float2bfloat16_rn(dx[k])) * (xv[k] + lo[k]);
      dot = WarpSum(dot);
      if ((t & 31) == 0) dot_part[i][t >> 5] = dot;
    } else {
      GroupNormBwdChunkDx<2>(a, r, c, xv, sc, dy, z, mean, rstd, m1, s2);
    }
  }
  if constexpr (kDots) {
    __syncthreads();
    if (t < rows) {
      float d = 0.f;
      for (int w = 0; w < warps; ++w) d += dot_part[t][w];
      dots[(rb0 + t) * a.groups + g] = d;
    }
  }
  const int64_t o = blockIdx.x * a.dim + c;
  if (a.dweight != nullptr) {
    reinterpret_cast<float4*>(pw + o)[0] = make_float4(dw[0], dw[1], dw[2], dw[3]);
    reinterpret_cast<float4*>(pw + o)[1] = make_float4(dw[4], dw[5], dw[6], dw[7]);
  }
  if (a.dskip != nullptr) {
    reinterpret_cast<float4*>(ps + o)[0] = make_float4(dsk[0], dsk[1], dsk[2], dsk[3]);
    reinterpret_cast<float4*>(ps + o)[1] = make_float4(dsk[4], dsk[5], dsk[6], dsk[7]);
  }
}

// kIters of the register-resident kernels for a group size, or 0 for the _vec kernels. Measured
// on an H100 (mglue7 call 1, ms per 16 x 2048-token step, both directions on the _reg kernels):
//   backward, gated, gs 1536 (Mamba-2 130m)       6.91 -> 6.09: the _vec rows overflow L1 (above)
//   backward, gs 384 (mode 2) and 768 (mode 0)   11.61 -> 12.24: the _vec rows stay in L1, and
//       the _reg kernels' 2 blocks per SM (128 registers) lose to _vec's 4
//   forward, gs 384 (mode 2) and 768 (mode 0)     6.41 -> 5.75: one read of each row instead of 2-3
//   forward, gated, gs 1536                       3.61 -> 4.14: 97 registers (16 warps per SM)
//       against _vec's 45 (40 warps), whose re-reads hit L1
// So: the forward for groups up to 1024 columns, the backward for groups of 1025..1536 (where a
// block's rows no longer fit beside its column sums), _vec elsewhere.
int NormRegIters(const GroupNormArgs& a, bool backward) {
  const int64_t chunks = (a.dim / a.groups + 255) / 256;
  if (backward) return chunks > 4 && chunks <= 6 && a.mode != NormMode::kMlstmOutput ? 6 : 0;
  for (int k : {1, 2, 4}) {
    if (chunks <= k) return k;
  }
  return 0;
}
// Lanes per (row, group) of the _vec backward and the _reg forward: 16 (two rows per warp) where
// a group is 1 or 3 (forward) or any odd number (backward) of 128-column passes, so that no lane
// idles on a row's last pass; else 32. With 16 lanes the forward's kIters is the pass count.
// Measured on an H200 (rglue9 call 1, xlstm[1:0]-125m B16 x 2048, ms per step, the 24 mLSTM
// output norms at 4 x 384): backward 6.41 (32 lanes) -> 5.74 (16), both with the fast sigmoid;
// forward 3.81 (main, 32 lanes) -> 2.82; the 16-lane forward at (256, 3) launch bounds spilled
// 38 B and ran 4.19.
int NormLanes(const GroupNormArgs& a, bool backward) {
  const int64_t passes = (a.dim / a.groups + 127) / 128;
  if (passes % 2 == 0) return 32;
  if (backward) return NormRegIters(a, true) > 0 ? 32 : 16;
  return passes <= 3 ? 16 : 32;
}
// f(integral_constant kIters, integral_constant kLanes) for the forward's (kIters, kLanes):
// NormRegIters' answers 1, 2, 4 at 32 lanes, passes 1, 3 at 16.
template <typename F>
void ByNormIters(int iters, int lanes, F&& f) {
  using L16 = std::integral_constant<int, 16>;
  using L32 = std::integral_constant<int, 32>;
  if (lanes == 16) {
    if (iters == 1) f(std::integral_constant<int, 1>{}, L16{});
    else f(std::integral_constant<int, 3>{}, L16{});
    return;
  }
  switch (iters) {
    case 1: f(std::integral_constant<int, 1>{}, L32{}); break;
    case 2: f(std::integral_constant<int, 2>{}, L32{}); break;
    default: f(std::integral_constant<int, 4>{}, L32{}); break;
  }
}

// Shared bytes of group_norm_bwd_vec's column sums (8 warps' own rows); above 48 KiB the launch
// opts in to more (up to what one block of an SM may have).
int64_t NormBwdSmem(const GroupNormArgs& a) {
  const int64_t span = NormSpan(a.dim / a.groups, NormLanes(a, true));
  return (a.mode == NormMode::kMlstmOutput ? 2 : 1) * 8 * span * static_cast<int64_t>(sizeof(float));
}
constexpr int64_t kMaxNormBwdSmem = 227 * 1024;

bool NormVectorizable(const GroupNormArgs& a, bool backward) {
  const int64_t gs = a.dim / a.groups;
  bool ok = gs % 8 == 0 && Aligned(a.x, 16) && (a.weight == nullptr || Aligned(a.weight, 32));
  if (a.mode != NormMode::kPlain) ok = ok && a.ldz % 8 == 0 && Aligned(a.z, 16);
  if (a.mode == NormMode::kMlstmOutput) ok = ok && Aligned(a.skip, 32) && Aligned(a.xc, 16);
  if (!backward) return ok && Aligned(a.y, 16);
  ok = ok && Aligned(a.dy, 16) && Aligned(a.dx, 16) && Aligned(a.dresidual, 16) && NormBwdSmem(a) <= kMaxNormBwdSmem;
  if (a.mode != NormMode::kPlain) ok = ok && Aligned(a.dz, 16);
  if (a.mode == NormMode::kMlstmOutput) ok = ok && Aligned(a.dxc, 16) && a.lddz % 8 == 0;
  return ok;
}

bool BlockDiagVectorizable(const BlockDiagArgs& a, bool backward) {
  const bool two = a.w2 != nullptr;
  bool ok = a.block_in == 4 && a.block_out == 4 && a.ldx % 4 == 0 && a.ldy % 4 == 0 && Aligned(a.x, 8) &&
            Aligned(a.w, 32) && (!two || Aligned(a.w2, 32));
  if (!backward) return ok && Aligned(a.y, 8) && (!two || Aligned(a.y2, 8));
  return ok && Aligned(a.dy, 8) && Aligned(a.dx, 8) && (!two || Aligned(a.dy2, 8));
}

// The fused gate weights are read as float4 at 4-column block starts.
bool FusedGatesVectorizable(const FusedGates& g, bool two) {
  if (g.heads == 0) return true;
  bool ok = g.ldg % 4 == 0 && Aligned(g.wi[0], 16) && Aligned(g.wf[0], 16);
  if (two) ok = ok && Aligned(g.wi[1], 16) && Aligned(g.wf[1], 16);
  return ok;
}

// BlockDiagArgs::gates checked and turned into the kernels' FusedGates (heads 0: none).
CudaResult MakeFusedGates(const BlockDiagArgs& a, bool backward, FusedGates* g) {
  *g = FusedGates{};
  if (a.gates == nullptr) return {};
  const MlstmGateArgs& ga = *a.gates;
  if (ga.heads < 1 || 2 * ga.heads > kMaxGates) return gyre::cuda::InvalidArgument("BlockDiag gates: heads must be 1..8");
  const bool missing = backward ? (ga.dig == nullptr || ga.dfg == nullptr || ga.dwi == nullptr || ga.dwf == nullptr ||
                                   (ga.dbi == nullptr) != (ga.dbf == nullptr))
                                : (ga.ig == nullptr || ga.fg == nullptr || (ga.bi == nullptr) != (ga.bf == nullptr));
  if (ga.rows != a.rows || ga.wi == nullptr || ga.wf == nullptr || missing)
    return gyre::cuda::InvalidArgument("BlockDiag gates: rows differ, or a gate pointer is missing");
  const int64_t cols = a.blocks * a.block_out, width = 3 * ga.inner;
  if (a.gate_col < 0 || a.gate_col + cols > width || (a.w2 && (a.gate_col2 < 0 || a.gate_col2 + cols > width)))
    return gyre::cuda::InvalidArgument("BlockDiag gates: the maps' columns lie outside concat(q, k, v)");
  g->heads = static_cast<int>(ga.heads);
  g->ldg = width;
  g->ig = ga.ig;
  g->fg = ga.fg;
  g->dig = ga.dig;
  g->dfg = ga.dfg;
  g->dbi = ga.dbi;
  g->dbf = ga.dbf;
  g->overwrite_db = ga.overwrite_db;
  const int64_t col[2] = {a.gate_col, a.gate_col2};
  for (int m = 0; m < (a.w2 ? 2 : 1); ++m) {
    g->wi[m] = ga.wi + col[m];
    g->wf[m] = ga.wf + col[m];
    if (backward) {
      g->dwi[m] = ga.dwi + col[m];
      g->dwf[m] = ga.dwf + col[m];
    }
  }
  return {};
}

}  // namespace

// GYRE_NORM_FWD and GYRE_NORM_BWD (each read once): unset or "pf", the only value left (the
// prefetch kernels, defaults since the lead's session-8 call on an H100: gated norm forward 3.87
// -> 2.59 ms a mamba2-130m step, mLSTM output-norm backward 7.53 -> 6.77 ms an xlstm[1:0]-125m
// step). The kernels they replaced ("reg", "vec") were deleted after losing again in the
// 2026-11-27 confirmation; any other value is an error from GroupNormForward / GroupNormBackward.
namespace {
bool PfOrUnset(const char* e) { return e == nullptr || std::string_view(e) == "pf"; }
CudaResult NormSwitchError(const char* name) {
  return gyre::cuda::InvalidArgument(std::string(name) + " must be pf (or unset), got '" + std::getenv(name) + "'");
}
// GYRE_GATED_NORM (read once): unset or "row" (the default since session 19: mamba2-1.3b's norms
// 34.5 -> 19.9 ms a step on an H100) = group_norm_{fwd,bwd}_gated_row for the groups
// GatedNormRowRouted gives them (ops/MAMBA2_NORM.md), the warp-per-(row, group) kernels for the
// rest; "warp" = the warp kernels for every gated norm; any other value is an error from
// GroupNormForward / Backward.
enum class GatedNormSwitch { kWarp, kRow, kBad };
GatedNormSwitch ReadGatedNormSwitch() {
  const char* e = std::getenv("GYRE_GATED_NORM");
  if (e == nullptr || std::string_view(e) == "row") return GatedNormSwitch::kRow;
  return std::string_view(e) == "warp" ? GatedNormSwitch::kWarp : GatedNormSwitch::kBad;
}
CudaResult GatedNormSwitchError() {
  return gyre::cuda::InvalidArgument(std::string("GYRE_GATED_NORM must be warp or row (or unset), got '") +
                                     std::getenv("GYRE_GATED_NORM") + "'");
}
// The row kernels take `a`: gated, 16-byte accesses (NormVectorizable's, without its limit on
// the _vec backward's shared column sums, which these kernels do not have), groups of at most
// kRowMaxIters · 2048 columns (% 8), one CTA per (row, group) within the grid's x limit, dz
// packed or in rows of lddz % 8 == 0.
bool RowKernelsCover(const GroupNormArgs& a, bool backward) {
  if (a.mode != NormMode::kGatedInput || a.groups < 1 || a.dim % a.groups != 0 || a.rows < 0) return false;
  const int64_t gs = a.dim / a.groups;
  const bool stats = a.rstd != nullptr && (!a.layer || a.mean != nullptr);
  bool ok = stats && gs % 8 == 0 && gs <= kRowMaxIters * kRowChunkCols && a.rows * a.groups < (int64_t{1} << 31) &&
            a.ldz % 8 == 0 && Aligned(a.x, 16) && Aligned(a.z, 16) && (a.weight == nullptr || Aligned(a.weight, 32));
  if (!backward) return ok && Aligned(a.y, 16);
  const bool strided_dz = a.lddz != 0 && a.lddz != a.dim;
  return ok && a.dresidual == nullptr && Aligned(a.dy, 16) && Aligned(a.dx, 16) && Aligned(a.dz, 16) &&
         (!strided_dz || (a.lddz > a.dim && a.lddz % 8 == 0));
}
// Where GYRE_GATED_NORM=row sends the gated norm to the row kernels: groups wider than 1536
// columns (those went to the _vec kernels; the 130m width keeps group_norm_fwd_gated_pf<6> and
// group_norm_bwd_reg_lddz<6>).
bool GatedNormRowRouted(const GroupNormArgs& a, bool backward) {
  return RowKernelsCover(a, backward) && a.dim / a.groups > 6 * 256;
}
template <typename F>
void ByRowIters(int64_t gs, F&& f) {
  switch ((gs + kRowChunkCols - 1) / kRowChunkCols) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    default: f(std::integral_constant<int, 2>{}); break;  // RowKernelsCover: at most kRowMaxIters
  }
}
CudaResult LaunchRowForward(const GroupNormArgs& a, cudaStream_t stream) {
  const unsigned ctas = static_cast<unsigned>(a.rows * a.groups);
  ByRowIters(a.dim / a.groups, [&](auto k) { group_norm_fwd_gated_row<decltype(k)::value><<<ctas, kRowThreads, 0, stream>>>(a); });
  return Launched("group_norm_fwd_gated_row");
}
CudaResult LaunchRowBackward(const GroupNormArgs& a, DeviceAllocator* scratch, cudaStream_t stream) {
  const int64_t chunks = (a.rows + kRowBwdRows - 1) / kRowBwdRows;
  gyre::cuda::DeviceBuffer part;
  float* pw = nullptr;
  if (a.dweight != nullptr) {
    if (CudaResult r = Scratch(scratch, chunks * a.dim, &part); !r.ok()) return r;
    pw = part.as<float>();
  }
  const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(a.groups));
  const bool strided_dz = a.lddz != 0 && a.lddz != a.dim;
  ByRowIters(a.dim / a.groups, [&](auto k) {
    constexpr int kI = decltype(k)::value;
    if (strided_dz) group_norm_bwd_gated_row<kI, true><<<grid, kRowThreads, 0, stream>>>(a, pw);
    else group_norm_bwd_gated_row<kI, false><<<grid, kRowThreads, 0, stream>>>(a, pw);
  });
  if (CudaResult r = Launched("group_norm_bwd_gated_row"); !r.ok()) return r;
  ReduceJobs jobs;
  if (a.dweight) jobs.Add(Job(pw, chunks, a.dim, a.dim, a.dweight, a.overwrite_dparams));
  return LaunchReduce(jobs, stream);
}

// GYRE_MLSTM_OUT_NORM (read once): unset or "row" (the default since session 19: xlstm[1:0]-1.3b's
// out-norm backward 12.70 -> 10.26 ms a step with the cell's dots included, step −3.3 ms on an
// H100) = group_norm_bwd_mlstm_row for the heads MlstmRowCovers gives it (512..1024 columns), with
// the cell's dots under GYRE_MLSTM_DH_DOT=norm; "warp" = the kernels it took before
// (group_norm_bwd_vec<2, 32> for heads wider than 384, the cell forming its own dots); any other
// value is an error from GroupNormBackward (and MlstmOutNormDotsCovers says false).
enum class MlstmOutNormSwitch { kWarp, kRow, kBad };
MlstmOutNormSwitch ReadMlstmOutNormSwitch() {
  static const MlstmOutNormSwitch v = [] {
    const char* e = std::getenv("GYRE_MLSTM_OUT_NORM");
    if (e == nullptr || std::string_view(e) == "row") return MlstmOutNormSwitch::kRow;
    return std::string_view(e) == "warp" ? MlstmOutNormSwitch::kWarp : MlstmOutNormSwitch::kBad;
  }();
  return v;
}
CudaResult MlstmOutNormSwitchError() {
  return gyre::cuda::InvalidArgument(std::string("GYRE_MLSTM_OUT_NORM must be warp or row (or unset), got '") +
                                     std::getenv("GYRE_MLSTM_OUT_NORM") + "'");
}
// group_norm_bwd_mlstm_row takes `a` (and h_lo, null = 0): mode 2, heads of 512..1024 columns
// (% 256: whole warps of 8-column chunks), statistics given, 16-byte accesses (weight and skip
// 32-byte aligned), dz packed or in rows of lddz % 8 == 0, no dresidual.
bool MlstmRowCovers(const GroupNormArgs& a, const void* h_lo) {
  if (a.mode != NormMode::kMlstmOutput || a.groups < 1 || a.groups > 65535 || a.dim % a.groups != 0 || a.rows < 0)
    return false;
  const int64_t gs = a.dim / a.groups;
  const bool strided_dz = a.lddz != 0 && a.lddz != a.dim;
  return gs % 256 == 0 && gs >= 512 && gs <= 32 * kMoMaxWarps * 8 && a.rstd != nullptr &&
         (!a.layer || a.mean != nullptr) && (!strided_dz || (a.lddz > a.dim && a.lddz % 8 == 0)) &&
         a.dresidual == nullptr && a.ldz % 8 == 0 &&
         a.skip != nullptr && Aligned(a.skip, 32) && (a.weight == nullptr || Aligned(a.weight, 32)) &&
         Aligned(a.x, 16) && Aligned(a.z, 16) && Aligned(a.xc, 16) && Aligned(a.dy, 16) && Aligned(a.dx, 16) &&
         Aligned(a.dz, 16) && Aligned(a.dxc, 16) && Aligned(h_lo, 16);
}
CudaResult LaunchMlstmRowBackward(const GroupNormArgs& a, const bf16* h_lo, float* dots, DeviceAllocator* scratch,
                                  cudaStream_t stream) {
  const int64_t chunks = (a.rows + kMoRows - 1) / kMoRows;
  gyre::cuda::DeviceBuffer part;
  float *pw = nullptr, *ps = nullptr;
  const int nparams = (a.dweight != nullptr) + (a.dskip != nullptr);
  if (nparams > 0) {
    if (CudaResult r = Scratch(scratch, chunks * a.dim * nparams, &part); !r.ok()) return r;
    pw = part.as<float>();
    ps = pw + (a.dweight != nullptr ? chunks * a.dim : 0);
  }
  const int threads = static_cast<int>(a.dim / a.groups / 8);
  const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(a.groups));
  if (dots != nullptr) {
    group_norm_bwd_mlstm_row<true, 2><<<grid, threads, kMoStashBytes<true, 2>(threads), stream>>>(a, pw, ps, h_lo, dots);
  } else {
    group_norm_bwd_mlstm_row<false, 2><<<grid, threads, kMoStashBytes<false, 2>(threads), stream>>>(a, pw, ps, nullptr,
                                                                                                 nullptr);
  }
  if (CudaResult r = Launched("group_norm_bwd_mlstm_row"); !r.ok()) return r;
  ReduceJobs jobs;
  if (a.dweight) jobs.Add(Job(pw, chunks, a.dim, a.dim, a.dweight, a.overwrite_dparams));
  if (a.dskip) jobs.Add(Job(ps, chunks, a.dim, a.dim, a.dskip, a.overwrite_dparams));
  return LaunchReduce(jobs, stream);
}
}  // namespace

CudaResult GroupNormForward(const GroupNormArgs& a, cudaStream_t stream) {
  if (a.dim % a.groups != 0 || a.rstd == nullptr || (a.layer && a.mean == nullptr))
    return gyre::cuda::InvalidArgument("GroupNormForward: dim not divisible by groups, or missing statistics");
  static const bool switch_ok = PfOrUnset(std::getenv("GYRE_NORM_FWD"));
  if (!switch_ok) return NormSwitchError("GYRE_NORM_FWD");
  static const GatedNormSwitch gated = ReadGatedNormSwitch();
  if (gated == GatedNormSwitch::kBad) return GatedNormSwitchError();
  if (a.rows == 0) return {};
  if (gated == GatedNormSwitch::kRow && GatedNormRowRouted(a, false)) return LaunchRowForward(a, stream);
  const int64_t threads = a.rows * a.groups * 32;
  const int blocks = static_cast<int>((threads + 255) / 256);
  const bool vec = NormVectorizable(a, false);
  if (const int iters = vec ? NormRegIters(a, false) : 0; iters > 0) {
    const int lanes = NormLanes(a, false);
    const int64_t reg_threads = (a.rows * a.groups + 32 / lanes - 1) / (32 / lanes) * 32;
    const int reg_blocks = static_cast<int>((reg_threads + 255) / 256);
    ByNormIters(lanes == 16 ? static_cast<int>((a.dim / a.groups + 127) / 128) : iters, lanes, [&](auto k, auto l) {
      constexpr int kI = decltype(k)::value, kL = decltype(l)::value;
      switch (a.mode) {
        case NormMode::kPlain: group_norm_fwd_reg<0, kI, kL><<<reg_blocks, 256, 0, stream>>>(a); break;
        case NormMode::kGatedInput: group_norm_fwd_reg<1, kI, kL><<<reg_blocks, 256, 0, stream>>>(a); break;
        case NormMode::kMlstmOutput: group_norm_fwd_reg<2, kI, kL><<<reg_blocks, 256, 0, stream>>>(a); break;
      }
    });
    return Launched("group_norm_fwd_reg");
  }
  if (vec && a.mode == NormMode::kGatedInput && a.dim / a.groups == 6 * 256) {
    group_norm_fwd_gated_pf<6><<<blocks, 256, 0, stream>>>(a);
    return Launched("group_norm_fwd_gated_pf");
  }
  switch (a.mode) {
    case NormMode::kPlain:
      if (vec) group_norm_fwd_vec<0><<<blocks, 256, 0, stream>>>(a);
      else group_norm_fwd<0><<<blocks, 256, 0, stream>>>(a);
      break;
    case NormMode::kGatedInput:
      if (vec) group_norm_fwd_vec<1><<<blocks, 256, 0, stream>>>(a);
      else group_norm_fwd<1><<<blocks, 256, 0, stream>>>(a);
      break;
    case NormMode::kMlstmOutput:
      if (vec) group_norm_fwd_vec<2><<<blocks, 256, 0, stream>>>(a);
      else group_norm_fwd<2><<<blocks, 256, 0, stream>>>(a);
      break;
  }
  return Launched("group_norm_fwd");
}

namespace {
// The mLSTM output norm backward's prefetch kernel (group_norm_bwd_mlstm_pf<3>) runs for `a`.
bool MlstmOutNormPf(const GroupNormArgs& a) {
  // (dz rows of lddz: NormVectorizable asks lddz % 8 == 0 in mode 2.)
  return a.mode == NormMode::kMlstmOutput && a.dim % a.groups == 0 && NormVectorizable(a, true) &&
         NormLanes(a, true) == 16 && a.dim / a.groups == 3 * 128;
}
CudaResult GroupNormBackwardImpl(const GroupNormArgs& a, DeviceAllocator* scratch, cudaStream_t stream,
                                 const bf16* h_lo, float* dots);
}  // namespace

CudaResult GroupNormBackward(const GroupNormArgs& a, DeviceAllocator* scratch, cudaStream_t stream) {
  return GroupNormBackwardImpl(a, scratch, stream, nullptr, nullptr);
}

bool GatedNormRowCovers(const GroupNormArgs& a, bool backward) { return RowKernelsCover(a, backward); }

CudaResult GatedNormRowForward(const GroupNormArgs& a, cudaStream_t stream) {
  if (!RowKernelsCover(a, false))
    return gyre::cuda::InvalidArgument("GatedNormRowForward: arguments outside the kernel (GatedNormRowCovers)");
  if (a.rows == 0) return {};
  return LaunchRowForward(a, stream);
}

CudaResult GatedNormRowBackward(const GroupNormArgs& a, DeviceAllocator* scratch, cudaStream_t stream) {
  if (!RowKernelsCover(a, true))
    return gyre::cuda::InvalidArgument("GatedNormRowBackward: arguments outside the kernel (GatedNormRowCovers)");
  if (a.rows == 0) return {};
  return LaunchRowBackward(a, scratch, stream);
}

bool MlstmOutNormDotsCovers(const GroupNormArgs& a, const void* h_lo) {
  if (ReadMlstmOutNormSwitch() == MlstmOutNormSwitch::kRow && MlstmRowCovers(a, h_lo)) return true;
  return MlstmOutNormPf(a) && a.rstd != nullptr && (!a.layer || a.mean != nullptr) && Aligned(h_lo, 16);
}

bool MlstmOutNormRowCovers(const GroupNormArgs& a, const void* h_lo) { return MlstmRowCovers(a, h_lo); }

CudaResult MlstmOutNormRowBackward(const GroupNormArgs& a, const void* h_lo, float* dots, DeviceAllocator* scratch,
                                   cudaStream_t stream) {
  if (!MlstmRowCovers(a, h_lo))
    return gyre::cuda::InvalidArgument("MlstmOutNormRowBackward: arguments outside the kernel (MlstmOutNormRowCovers)");
  if (a.rows == 0) return {};
  return LaunchMlstmRowBackward(a, static_cast<const bf16*>(h_lo), dots, scratch, stream);
}

CudaResult MlstmOutNormBackwardWithDots(const GroupNormArgs& a, const void* h_lo, float* dots,
                                        DeviceAllocator* scratch, cudaStream_t stream) {
  if (!MlstmOutNormDotsCovers(a, h_lo) || dots == nullptr)
    return gyre::cuda::InvalidArgument("MlstmOutNormBackwardWithDots: not the prefetch kernel's shape, or no dots");
  return GroupNormBackwardImpl(a, scratch, stream, static_cast<const bf16*>(h_lo), dots);
}

namespace {
// dots != null: the prefetch kernel with the cell's dots (MlstmOutNormBackwardWithDots checked it runs).
CudaResult GroupNormBackwardImpl(const GroupNormArgs& a, DeviceAllocator* scratch, cudaStream_t stream,
                                 const bf16* h_lo, float* dots) {
  if (a.dim % a.groups != 0 || a.rstd == nullptr || (a.layer && a.mean == nullptr))
    return gyre::cuda::InvalidArgument("GroupNormBackward: dim not divisible by groups, or missing statistics");
  if (a.dresidual != nullptr && a.mode != NormMode::kPlain)
    return gyre::cuda::InvalidArgument("GroupNormBackward: dresidual is for the plain mode only");
  static const bool switch_ok = PfOrUnset(std::getenv("GYRE_NORM_BWD"));
  if (!switch_ok) return NormSwitchError("GYRE_NORM_BWD");
  if (a.rows == 0) return {};
  // dz rows of lddz: the gated mode (Mamba-2's fused in_proj backward) and the mLSTM output mode
  // (its fused up projection backward; every mode-2 kernel indexes dz by DzLd).
  if (a.lddz != 0 && (a.mode == NormMode::kPlain || a.lddz < a.dim))
    return gyre::cuda::InvalidArgument("GroupNormBackward: lddz is for the gated and mLSTM output modes, 0 or >= dim");
  const bool strided_dz = a.mode == NormMode::kGatedInput && a.lddz != 0 && a.lddz != a.dim;
  static const GatedNormSwitch gated = ReadGatedNormSwitch();
  if (gated == GatedNormSwitch::kBad) return GatedNormSwitchError();
  if (gated == GatedNormSwitch::kRow && dots == nullptr && GatedNormRowRouted(a, true))
    return LaunchRowBackward(a, scratch, stream);
  const MlstmOutNormSwitch mlstm_out = ReadMlstmOutNormSwitch();
  if (mlstm_out == MlstmOutNormSwitch::kBad) return MlstmOutNormSwitchError();
  if (mlstm_out == MlstmOutNormSwitch::kRow && MlstmRowCovers(a, h_lo))
    return LaunchMlstmRowBackward(a, h_lo, dots, scratch, stream);
  float* dskip = a.mode == NormMode::kMlstmOutput ? a.dskip : nullptr;
  const bool params = a.dweight != nullptr || dskip != nullptr;
  const bool vec = NormVectorizable(a, true);
  // dz rows of lddz: the vectorised kernels' twins write them in place (16-byte stores: lddz % 8
  // == 0); the scalar path writes a packed dz to scratch, then one strided copy.
  const bool lddz_kernel = strided_dz && vec && a.lddz % 8 == 0;
  if (strided_dz && !lddz_kernel) {
    gyre::cuda::DeviceBuffer packed;
    if (CudaResult r = Scratch(scratch, (a.rows * a.dim + 1) / 2, &packed); !r.ok()) return r;
    GroupNormArgs b = a;
    b.dz = packed.as<float>();
    b.lddz = 0;
    if (CudaResult r = GroupNormBackward(b, scratch, stream); !r.ok()) return r;
    const size_t row_bytes = static_cast<size_t>(a.dim) * sizeof(bf16);
    CUDA_RETURN_IF_ERROR(cudaMemcpy2DAsync(a.dz, static_cast<size_t>(a.lddz) * sizeof(bf16), b.dz, row_bytes,
                                           row_bytes, static_cast<size_t>(a.rows), cudaMemcpyDeviceToDevice, stream));
    return {};
  }
  // Partial column sums [chunks, dim] (dweight, then dskip), chunk = the kernel's row block.
  const int64_t chunks = vec ? (a.rows + kNormBwdRows - 1) / kNormBwdRows : (a.rows + kRowsPerBlock - 1) / kRowsPerBlock;
  gyre::cuda::DeviceBuffer part;
  float *pw = nullptr, *ps = nullptr;
  if (params) {
    if (CudaResult r = Scratch(scratch, chunks * a.dim * (dskip ? 2 : 1), &part); !r.ok()) return r;
    pw = part.as<float>();
    ps = pw + (a.dweight ? chunks * a.dim : 0);
  }
  if (vec) {
    const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(a.groups));
    const int64_t smem = params ? NormBwdSmem(a) : 0;
    auto launch = [&](auto kernel) {
      if (smem > 48 * 1024)
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
      kernel<<<grid, 256, static_cast<size_t>(smem), stream>>>(a, pw, ps);
    };
    if (lddz_kernel) {
      if (NormRegIters(a, true) == 6) launch(group_norm_bwd_reg_lddz<6>);
      else if (NormLanes(a, true) == 16) launch(group_norm_bwd_vec_lddz<16>);
      else launch(group_norm_bwd_vec_lddz<32>);
    } else if (NormRegIters(a, true) == 6) {
      if (a.mode == NormMode::kPlain) launch(group_norm_bwd_reg<0, 6>);
      else launch(group_norm_bwd_reg<1, 6>);
    } else if (a.mode == NormMode::kMlstmOutput && NormLanes(a, true) == 16 &&
               a.dim / a.groups == 3 * 128) {
      if (dots != nullptr) {
        const int64_t pf_smem = kNormPfStashBytes<3, true> + smem;
        if (pf_smem > 48 * 1024)
          cudaFuncSetAttribute(group_norm_bwd_mlstm_pf_dots<3>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(pf_smem));
        group_norm_bwd_mlstm_pf_dots<3><<<grid, 256, static_cast<size_t>(pf_smem), stream>>>(a, pw, ps, h_lo, dots);
      } else {
        const int64_t pf_smem = kNormPfStashBytes<3> + smem;
        if (pf_smem > 48 * 1024)
          cudaFuncSetAttribute(group_norm_bwd_mlstm_pf<3>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(pf_smem));
        group_norm_bwd_mlstm_pf<3><<<grid, 256, static_cast<size_t>(pf_smem), stream>>>(a, pw, ps);
      }
    } else {
      const bool half = NormLanes(a, true) == 16;
      switch (a.mode) {
        case NormMode::kPlain: launch(half ? group_norm_bwd_vec<0, 16> : group_norm_bwd_vec<0, 32>); break;
        case NormMode::kGatedInput: launch(half ? group_norm_bwd_vec<1, 16> : group_norm_bwd_vec<1, 32>); break;
        case NormMode::kMlstmOutput: launch(half ? group_norm_bwd_vec<2, 16> : group_norm_bwd_vec<2, 32>); break;
      }
    }
    if (CudaResult r = Launched("group_norm_bwd_vec"); !r.ok()) return r;
  } else {
    const int64_t threads = a.rows * a.groups * 32;
    const int blocks = static_cast<int>((threads + 255) / 256);
    const dim3 grid = ColumnGrid(a.dim, a.rows), block(32, 8);
    switch (a.mode) {
      case NormMode::kPlain:
        group_norm_bwd<0><<<blocks, 256, 0, stream>>>(a);
        if (params) group_norm_param_grads<0><<<grid, block, 0, stream>>>(a, pw, ps);
        break;
      case NormMode::kGatedInput:
        group_norm_bwd<1><<<blocks, 256, 0, stream>>>(a);
        if (params) group_norm_param_grads<1><<<grid, block, 0, stream>>>(a, pw, ps);
        break;
      case NormMode::kMlstmOutput:
        group_norm_bwd<2><<<blocks, 256, 0, stream>>>(a);
        if (params) group_norm_param_grads<2><<<grid, block, 0, stream>>>(a, pw, ps);
        break;
    }
    if (CudaResult r = Launched("group_norm_bwd"); !r.ok()) return r;
  }
  ReduceJobs jobs;
  if (a.dweight) jobs.Add(Job(pw, chunks, a.dim, a.dim, a.dweight, a.overwrite_dparams));
  if (dskip) jobs.Add(Job(ps, chunks, a.dim, a.dim, dskip, a.overwrite_dparams));
  return LaunchReduce(jobs, stream);
}
}  // namespace

CudaResult BlockDiagForward(const BlockDiagArgs& a, DeviceAllocator* scratch, cudaStream_t stream) {
  if (a.block_in > 8 || a.block_out > 8) return gyre::cuda::InvalidArgument("BlockDiag: blocks larger than 8");
  if ((a.w2 == nullptr) != (a.y2 == nullptr)) return gyre::cuda::InvalidArgument("BlockDiag: w2 without y2");
  FusedGates g;
  if (CudaResult r = MakeFusedGates(a, false, &g); !r.ok()) return r;
  if (a.rows == 0) return {};
  if (BlockDiagVectorizable(a, false) && FusedGatesVectorizable(g, a.w2 != nullptr)) {
    const dim3 grid(static_cast<unsigned>((a.blocks + 31) / 32), static_cast<unsigned>((a.rows + kBdRows - 1) / kBdRows));
    const dim3 block(32, 8);
    // Gate sums per column block [grid.x, 2, rows, heads], then ig (fg) = (bias +) their sum.
    gyre::cuda::DeviceBuffer part;
    float* pf = nullptr;
    if (g.heads > 0) {
      if (CudaResult r = Scratch(scratch, grid.x * 2 * a.rows * g.heads, &part); !r.ok()) return r;
      pf = part.as<float>();
    }
    auto gated = [&](auto kernel, size_t smem) {
      if (smem > 48 * 1024) cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
      kernel<<<grid, block, smem, stream>>>(a, g, pf);
    };
    if (g.heads == 0) {
      if (a.w2) block_diag4_fwd<true><<<grid, block, 0, stream>>>(a);
      else block_diag4_fwd<false><<<grid, block, 0, stream>>>(a);
    } else if (g.heads <= 4) {
      if (a.w2) gated(block_diag4_fwd_gates<true, 8>, sizeof(BdFwdSmem<true, 8>));
      else gated(block_diag4_fwd_gates<false, 8>, sizeof(BdFwdSmem<false, 8>));
    } else {
      if (a.w2) gated(block_diag4_fwd_gates<true, 16>, sizeof(BdFwdSmem<true, 16>));
      else gated(block_diag4_fwd_gates<false, 16>, sizeof(BdFwdSmem<false, 16>));
    }
    if (CudaResult r = Launched("block_diag4_fwd"); !r.ok() || g.heads == 0) return r;
    const int64_t n = a.rows * g.heads;
    ReduceJobs jobs;
    for (int f = 0; f < 2; ++f) {
      ReduceJob j = Job(pf + f * n, grid.x, 2 * n, n, f == 0 ? g.ig : g.fg, false);
      const float* bias = f == 0 ? a.gates->bi : a.gates->bf;
      if (bias != nullptr) {
        j.mode = kReduceSetBias;
        j.bias = bias;
        j.bias_period = g.heads;
      }
      jobs.Add(j);
    }
    return LaunchReduce(jobs, stream);
  }
  // Scalar path: the gates start at the bias; one warp per row then adds each map's share.
  if (g.heads > 0 && a.gates->bi != nullptr)
    gate_fwd_init<<<Blocks(a.rows * g.heads, 256), 256, 0, stream>>>(g, a.gates->bi, a.gates->bf, a.rows);
  for (int m = 0; m < (a.w2 ? 2 : 1); ++m) {
    BlockDiagArgs b = a;
    if (m == 1) {
      b.w = a.w2;
      b.y = a.y2;
    }
    block_diag_fwd<<<Blocks(a.rows * a.blocks * a.block_out, 256), 256, 0, stream>>>(b);
    if (g.heads > 0) gate_fwd<<<Blocks(a.rows * 32, 256), 256, 0, stream>>>(b, g, m, b.y);
  }
  return Launched("block_diag_fwd");
}

bool BlockDiagQkvRowsCovers(const BlockDiagArgs& qk, const BlockDiagArgs& v) {
  if (qk.gates == nullptr || v.gates == nullptr || qk.w2 == nullptr || v.w2 != nullptr) return false;
  const MlstmGateArgs& g = *qk.gates;
  FusedGates fqk, fv;
  return qk.rows >= 1 && qk.rows <= kQkvRowsMax && v.rows == qk.rows && v.blocks == qk.blocks && g.bi != nullptr &&
         g.bf != nullptr && v.gates->bi == nullptr && v.gates->bf == nullptr && v.gates->heads == g.heads &&
         v.gates->ig == g.ig && v.gates->fg == g.fg && BlockDiagVectorizable(qk, false) &&
         BlockDiagVectorizable(v, false) && MakeFusedGates(qk, false, &fqk).ok() && FusedGatesVectorizable(fqk, true) &&
         MakeFusedGates(v, false, &fv).ok() && FusedGatesVectorizable(fv, false);
}

CudaResult BlockDiagQkvRowsForward(const BlockDiagArgs& qk, const BlockDiagArgs& v, DeviceAllocator* scratch,
                                   cudaStream_t stream) {
  if (!BlockDiagQkvRowsCovers(qk, v))
    return gyre::cuda::InvalidArgument("BlockDiagQkvRowsForward: arguments outside the kernel (BlockDiagQkvRowsCovers)");
  FusedGates gqk, gv;
  if (CudaResult r = MakeFusedGates(qk, false, &gqk); !r.ok()) return r;
  if (CudaResult r = MakeFusedGates(v, false, &gv); !r.ok()) return r;
  const dim3 grid(static_cast<unsigned>((qk.blocks + 31) / 32)), block(32, 4);
  gyre::cuda::DeviceBuffer part;
  if (CudaResult r = Scratch(scratch, 2 * grid.x * 2 * qk.rows * gqk.heads, &part); !r.ok()) return r;
  const float *bi = qk.gates->bi, *bf = qk.gates->bf;
  if (gqk.heads <= 4) {
    block_diag4_qkv_rows<8><<<grid, block, sizeof(QkvRowsSmem<8>), stream>>>(qk, v, gqk, gv, bi, bf, part.as<float>());
  } else {
    block_diag4_qkv_rows<16><<<grid, block, sizeof(QkvRowsSmem<16>), stream>>>(qk, v, gqk, gv, bi, bf, part.as<float>());
  }
  return Launched("block_diag4_qkv_rows");
}

bool MlstmConvQkvFusable(const Conv1dArgs& c, const BlockDiagArgs& qk, const BlockDiagArgs& v) {
  if (qk.gates == nullptr || v.gates == nullptr || qk.w2 == nullptr || v.w2 != nullptr) return false;
  const int64_t p = c.channels;
  const MlstmGateArgs& g = *qk.gates;
  const int64_t ldxm = c.x_row_stride == 0 ? p : c.x_row_stride;  // xm's rows (>= p, % 4: 8-byte loads)
  const bool same = qk.rows == c.batch * c.seq && v.rows == qk.rows && qk.blocks * 4 == p && v.blocks == qk.blocks &&
                    qk.x == c.y && v.x == c.x && qk.ldx == p && qk.ldy == p && v.ldx == ldxm && v.ldy == p &&
                    ldxm >= p && ldxm % 4 == 0 && v.gates->wi == g.wi && v.gates->wf == g.wf &&
                    v.gates->ig == g.ig && v.gates->fg == g.fg && v.gates->bi == nullptr &&
                    v.gates->heads == g.heads && c.dx_row_stride == 0;
  FusedGates fg;
  return same && c.width >= 1 && c.width <= 4 && c.seq > 0 && g.heads >= 1 && g.heads <= 4 &&
         BlockDiagVectorizable(qk, false) && BlockDiagVectorizable(v, false) && MakeFusedGates(qk, false, &fg).ok() &&
         FusedGatesVectorizable(fg, true) && MakeFusedGates(v, false, &fg).ok() && FusedGatesVectorizable(fg, false) &&
         Aligned(c.y, 8) && qk.rows < (int64_t{1} << 31);
}

CudaResult MlstmConvQkvForward(const Conv1dArgs& c, const BlockDiagArgs& qk, const BlockDiagArgs& v,
                               DeviceAllocator* scratch, cudaStream_t stream) {
  if (!MlstmConvQkvFusable(c, qk, v))
    return gyre::cuda::InvalidArgument("MlstmConvQkvForward: arguments outside the fused kernel (MlstmConvQkvFusable)");
  if (qk.rows == 0) return {};
  ConvQkvParams k;
  k.rows = qk.rows; k.blocks = qk.blocks; k.ld = c.channels; k.seq = c.seq; k.silu = c.silu;
  k.ldxm = c.x_row_stride == 0 ? c.channels : c.x_row_stride;
  k.xm = static_cast<const bf16*>(c.x);
  k.xc = static_cast<bf16*>(c.y);
  k.y0 = static_cast<bf16*>(qk.y);
  k.y1 = static_cast<bf16*>(qk.y2);
  k.y2 = static_cast<bf16*>(v.y);
  k.cw = c.w; k.cb = c.bias;
  k.w0 = qk.w; k.w1 = qk.w2; k.w2 = v.w;
  const MlstmGateArgs& g = *qk.gates;
  const int64_t col[3] = {qk.gate_col, qk.gate_col2, v.gate_col};
  for (int m = 0; m < 3; ++m) {
    k.wi[m] = g.wi + col[m];
    k.wf[m] = g.wf + col[m];
  }
  k.ldg = 3 * g.inner;
  k.heads = static_cast<int>(g.heads);
  const dim3 grid(static_cast<unsigned>((qk.blocks + 31) / 32), static_cast<unsigned>((qk.rows + kBdRows - 1) / kBdRows));
  gyre::cuda::DeviceBuffer part;
  if (CudaResult r = Scratch(scratch, grid.x * 2 * qk.rows * g.heads, &part); !r.ok()) return r;
  float* pf = part.as<float>();
  const size_t smem = sizeof(ConvQkvSmem);
  auto launch = [&](auto kernel) {
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    kernel<<<grid, dim3(32, 8), smem, stream>>>(k, pf);
  };
  switch (c.width) {
    case 1: launch(mlstm_conv_qkv_fwd<1>); break;
    case 2: launch(mlstm_conv_qkv_fwd<2>); break;
    case 3: launch(mlstm_conv_qkv_fwd<3>); break;
    default: launch(mlstm_conv_qkv_fwd<4>); break;
  }
  if (CudaResult r = Launched("mlstm_conv_qkv_fwd"); !r.ok()) return r;
  const int64_t n = qk.rows * g.heads;
  ReduceJobs jobs;
  for (int f = 0; f < 2; ++f) {
    ReduceJob j = Job(pf + f * n, grid.x, 2 * n, n, f == 0 ? g.ig : g.fg, false);
    const float* bias = f == 0 ? g.bi : g.bf;
    if (bias != nullptr) {
      j.mode = kReduceSetBias;
      j.bias = bias;
      j.bias_period = g.heads;
    } else {
      j.mode = kReduceSet;  // the one launch writes the whole sum
    }
    jobs.Add(j);
  }
  return LaunchReduce(jobs, stream);
}

bool MlstmConvVFusable(const Conv1dArgs& c, const BlockDiagArgs& v) {
  if (v.gates == nullptr || v.w2 != nullptr || v.dw == nullptr || c.dw == nullptr || c.dbias == nullptr) return false;
  const int64_t p = c.channels;
  const MlstmGateArgs& g = *v.gates;
  // xm and dxm in rows of one stride ldm >= p (% 4: 8-byte accesses), dxc and dv packed.
  const int64_t ldm = c.x_row_stride == 0 ? p : c.x_row_stride;
  const int64_t lddx = c.dx_row_stride == 0 ? p : c.dx_row_stride;
  const bool same = v.rows == c.batch * c.seq && v.blocks * 4 == p && v.block_in == 4 && v.block_out == 4 &&
                    v.x == c.x && v.dx == c.dx && v.accumulate_dx && v.ldx == ldm && v.ldy == p && lddx == ldm &&
                    ldm >= p && ldm % 4 == 0;
  FusedGates fg;
  return same && c.width >= 1 && c.width <= 4 && c.seq > 0 && c.seq < (int64_t{1} << 30) && g.heads >= 1 &&
         g.heads <= 4 && BlockDiagVectorizable(v, true) && MakeFusedGates(v, true, &fg).ok() &&
         FusedGatesVectorizable(fg, false) && Aligned(c.dy, 8) && v.rows < (int64_t{1} << 31);
}

CudaResult MlstmConvVBackward(const Conv1dArgs& c, const BlockDiagArgs& v, DeviceAllocator* scratch,
                              cudaStream_t stream) {
  if (!MlstmConvVFusable(c, v))
    return gyre::cuda::InvalidArgument("MlstmConvVBackward: arguments outside the fused kernel (MlstmConvVFusable)");
  if (v.rows == 0) return {};
  FusedGates g;
  if (CudaResult r = MakeFusedGates(v, true, &g); !r.ok()) return r;
  const int K = static_cast<int>(c.width);
  const int64_t p = c.channels, G = 2 * g.heads, nw = v.blocks * 16;
  const dim3 grid(static_cast<unsigned>((v.blocks + 31) / 32),
                  static_cast<unsigned>((c.seq + kCvRun * kCvWarps - 1) / (kCvRun * kCvWarps)),
                  static_cast<unsigned>(c.batch));
  const int64_t chunks = static_cast<int64_t>(grid.y) * grid.z;
  const bool db = g.dbi != nullptr;
  gyre::cuda::DeviceBuffer part;
  if (CudaResult r = Scratch(scratch, chunks * (p * K + p + nw + G * p + (db ? G : 0)), &part); !r.ok()) return r;
  ConvVBwdParams k;
  k.rows = v.rows; k.blocks = v.blocks; k.ld = p;
  k.ldm = c.x_row_stride == 0 ? p : c.x_row_stride;
  k.seq = static_cast<int>(c.seq); k.heads = g.heads; k.silu = c.silu;
  k.xm = static_cast<const bf16*>(c.x);
  k.dxc = static_cast<const bf16*>(c.dy);
  k.dv = static_cast<const bf16*>(v.dy);
  k.dxm = static_cast<bf16*>(c.dx);
  k.cw = c.w; k.cb = c.bias; k.wv = v.w;
  k.wi = g.wi[0]; k.wf = g.wf[0]; k.ldg = g.ldg;
  k.dig = g.dig; k.dfg = g.dfg;
  k.pcw = part.as<float>();
  k.pcb = k.pcw + chunks * p * K;
  k.pdw = k.pcb + chunks * p;
  k.pgate = k.pdw + chunks * nw;
  k.pdb = db ? k.pgate + chunks * G * p : nullptr;
  const dim3 block(32, kCvWarps);
  // The ring (kCvAhead slots of xm, dxc, dv rows and gate gradients per warp): 56 KiB, above the
  // 48 KiB of a launch without the opt-in.
  const size_t smem = static_cast<size_t>(kCvWarps) * kCvAhead * (3 * 32 * sizeof(uint2) + 32 * sizeof(float));
  auto launch = [&](auto kernel) {
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    kernel<<<grid, block, smem, stream>>>(k);
  };
  switch (K) {
    case 1: launch(mlstm_conv_v_bwd<1>); break;
    case 2: launch(mlstm_conv_v_bwd<2>); break;
    case 3: launch(mlstm_conv_v_bwd<3>); break;
    default: launch(mlstm_conv_v_bwd<4>); break;
  }
  if (CudaResult r = Launched("mlstm_conv_v_bwd"); !r.ok()) return r;
  ReduceJobs jobs;
  jobs.Add(Job(k.pcw, chunks, p * K, p * K, c.dw, c.overwrite_dparams));
  jobs.Add(Job(k.pcb, chunks, p, p, c.dbias, c.overwrite_dparams));
  jobs.Add(Job(k.pdw, chunks, nw, nw, v.dw, v.overwrite_dw));
  // Gate t's v columns land in row t of dwi (dwf for the forget gates), as BlockDiagBackward.
  for (int f = 0; f < 2; ++f) {
    ReduceJob j = Job(k.pgate + f * g.heads * p, chunks, G * p, g.heads * p, f == 0 ? g.dwi[0] : g.dwf[0],
                      v.gates->overwrite_dw);
    j.seg = p;
    j.out_stride = g.ldg;
    jobs.Add(j);
  }
  if (db) {
    jobs.Add(Job(k.pdb, chunks, G, g.heads, g.dbi, g.overwrite_db));
    jobs.Add(Job(k.pdb + g.heads, chunks, G, g.heads, g.dbf, g.overwrite_db));
  }
  return LaunchReduce(jobs, stream);
}

namespace {
CudaResult BdReduce(const BlockDiagArgs& a, const FusedGates& g, const BdPartials& p, int64_t chunks,
                    cudaStream_t stream);

// The block-diagonal backward's partial sums per row chunk, in one scratch block (BdReduce sums
// them): dw, dw2 [chunks, nw]; per map the gate weight columns [chunks, G, cols]; with
// `bias_sums` (the vectorised and tensor-core kernels) the gate bias sums [chunks, G].
CudaResult TakeBdPartials(const BlockDiagArgs& a, const FusedGates& g, int64_t chunks, bool bias_sums,
                          DeviceAllocator* scratch, gyre::cuda::DeviceBuffer* part, BdPartials* p) {
  const int64_t cols = a.blocks * a.block_out, nw = cols * a.block_in, G = 2 * g.heads, maps = a.w2 ? 2 : 1;
  const bool db = bias_sums && g.heads > 0 && g.dbi != nullptr;
  const int64_t per_chunk = (a.dw ? nw : 0) + (a.w2 && a.dw2 ? nw : 0) + maps * G * cols + (db ? G : 0);
  if (CudaResult r = Scratch(scratch, chunks * per_chunk, part); !r.ok()) return r;
  float* next = part->as<float>();
  auto take = [&](int64_t row) {
    float* t = next;
    next += chunks * row;
    return t;
  };
  if (a.dw) p->dw = take(nw);
  if (a.w2 && a.dw2) p->dw2 = take(nw);
  if (g.heads > 0) {
    p->gate0 = take(G * cols);
    if (a.w2) p->gate1 = take(G * cols);
  }
  if (db) p->db = take(G);
  return {};
}
}  // namespace

CudaResult BlockDiagBackward(const BlockDiagArgs& a, DeviceAllocator* scratch, cudaStream_t stream) {
  if (a.block_in > 8 || a.block_out > 8) return gyre::cuda::InvalidArgument("BlockDiag: blocks larger than 8");
  if ((a.w2 == nullptr) != (a.dy2 == nullptr)) return gyre::cuda::InvalidArgument("BlockDiag: w2 without dy2");
  FusedGates g;
  if (CudaResult r = MakeFusedGates(a, true, &g); !r.ok()) return r;
  if (a.rows == 0) return {};
  const bool vec = BlockDiagVectorizable(a, true) && FusedGatesVectorizable(g, a.w2 != nullptr);
  const int64_t chunks = (a.rows + (vec ? kBdBwdRows : kRowsPerBlock) - 1) / (vec ? kBdBwdRows : kRowsPerBlock);
  const int64_t cols = a.blocks * a.block_out, G = 2 * g.heads, maps = a.w2 ? 2 : 1;
  const bool db = g.heads > 0 && g.dbi != nullptr;
  gyre::cuda::DeviceBuffer part;
  BdPartials p;
  if (CudaResult r = TakeBdPartials(a, g, chunks, /*bias_sums=*/vec, scratch, &part, &p); !r.ok()) return r;
  if (vec) {
    const dim3 grid(static_cast<unsigned>((a.blocks + 31) / 32), static_cast<unsigned>(chunks));
    const dim3 block(32, 8);
    if (g.heads == 0) {
      if (a.w2) block_diag4_bwd<true, 0><<<grid, block, 0, stream>>>(a, g, p);
      else block_diag4_bwd<false, 0><<<grid, block, 0, stream>>>(a, g, p);
    } else if (g.heads <= 4) {
      if (a.w2) block_diag4_bwd<true, 8><<<grid, block, 0, stream>>>(a, g, p);
      else block_diag4_bwd<false, 8><<<grid, block, 0, stream>>>(a, g, p);
    } else {
      if (a.w2) block_diag4_bwd<true, 16><<<grid, block, 0, stream>>>(a, g, p);
      else block_diag4_bwd<false, 16><<<grid, block, 0, stream>>>(a, g, p);
    }
    if (CudaResult r = Launched("block_diag4_bwd"); !r.ok()) return r;
  } else {
    // Scalar path: one launch per map and product; the bias sums in one block per gate.
    for (int m = 0; m < maps; ++m) {
      BlockDiagArgs b = a;
      if (m == 1) {
        b.w = a.w2;
        b.dy = a.dy2;
        b.dw = a.dw2;
        b.accumulate_dx = true;
      }
      block_diag_bwd_dx<<<Blocks(a.rows * a.blocks * a.block_in, 256), 256, 0, stream>>>(b, g, m);
      if (b.dw)
        block_diag_bwd_dw<<<ColumnGrid(cols, a.rows), dim3(32, 8), 0, stream>>>(b, g, m, m == 0 ? p.dw : p.dw2);
      if (g.heads > 0) {
        const dim3 grid = ColumnGrid(cols, a.rows);
        gate_bwd_dw<<<dim3(grid.x, grid.y, G), dim3(32, 8), 0, stream>>>(b, g, m, m == 0 ? p.gate0 : p.gate1);
      }
    }
    if (db) gate_bwd_db<<<G, 256, 0, stream>>>(g, a.rows);
    if (CudaResult r = Launched("block_diag_bwd"); !r.ok()) return r;
  }
  return BdReduce(a, g, p, chunks, stream);
}

namespace {
// The fixed-order sums of BlockDiagBackward's partials (BdPartials, `chunks` row chunks) into the
// gradients.
CudaResult BdReduce(const BlockDiagArgs& a, const FusedGates& g, const BdPartials& p, int64_t chunks,
                    cudaStream_t stream) {
  const int64_t cols = a.blocks * a.block_out, nw = cols * a.block_in, G = 2 * g.heads, maps = a.w2 ? 2 : 1;
  ReduceJobs jobs;
  if (p.dw) jobs.Add(Job(p.dw, chunks, nw, nw, a.dw, a.overwrite_dw));
  if (p.dw2) jobs.Add(Job(p.dw2, chunks, nw, nw, a.dw2, a.overwrite_dw2));
  // Gate t's columns of map m land in row t (of dwi, or of dwf for the forget gates) from the
  // map's first column on: segments of `cols` with the gate weights' row stride.
  for (int m = 0; m < (g.heads > 0 ? maps : 0); ++m) {
    const float* pg = m == 0 ? p.gate0 : p.gate1;
    for (int f = 0; f < 2; ++f) {
      ReduceJob j = Job(pg + f * g.heads * cols, chunks, G * cols, g.heads * cols, f == 0 ? g.dwi[m] : g.dwf[m],
                        a.gates->overwrite_dw);
      j.seg = cols;
      j.out_stride = g.ldg;
      jobs.Add(j);
    }
  }
  if (p.db) {
    jobs.Add(Job(p.db, chunks, G, g.heads, g.dbi, g.overwrite_db));
    jobs.Add(Job(p.db + g.heads, chunks, G, g.heads, g.dbf, g.overwrite_db));
  }
  return LaunchReduce(jobs, stream);
}
}  // namespace

bool BlockDiagBackwardTcCovers(const BlockDiagArgs& a) {
  if (a.w2 == nullptr || a.dy2 == nullptr || a.gates == nullptr || a.block_in != 4 || a.block_out != 4 ||
      a.ldx != a.ldy || a.rows * a.ldx >= (int64_t{1} << 31) || !BlockDiagVectorizable(a, true))
    return false;
  FusedGates g;
  return MakeFusedGates(a, true, &g).ok() && g.heads >= 1 && g.heads <= 4 && FusedGatesVectorizable(g, true);
}

CudaResult BlockDiagBackwardTc(const BlockDiagArgs& a, DeviceAllocator* scratch, cudaStream_t stream) {
  if (!BlockDiagBackwardTcCovers(a))
    return gyre::cuda::InvalidArgument("BlockDiagBackwardTc: arguments outside the kernel (BlockDiagBackwardTcCovers)");
  FusedGates g;
  if (CudaResult r = MakeFusedGates(a, true, &g); !r.ok()) return r;
  if (a.rows == 0) return {};
  // block_diag4_bwd's partial layout (both maps, gates, bias sums).
  const int64_t chunks = (a.rows + kBdBwdRows - 1) / kBdBwdRows;
  gyre::cuda::DeviceBuffer part;
  BdPartials p;
  if (CudaResult r = TakeBdPartials(a, g, chunks, /*bias_sums=*/true, scratch, &part, &p); !r.ok()) return r;
  const dim3 grid(static_cast<unsigned>((a.blocks + 31) / 32), static_cast<unsigned>(chunks));
  // The rings (60 KiB a block): above the 48 KiB of a launch without the opt-in.
  cudaFuncSetAttribute(block_diag4_bwd_tc, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kBtSmem));
  block_diag4_bwd_tc<<<grid, dim3(32, kBtWarps), kBtSmem, stream>>>(a, g, p);
  if (CudaResult r = Launched("block_diag4_bwd_tc"); !r.ok()) return r;
  return BdReduce(a, g, p, chunks, stream);
}

CudaResult AddColumnBias(void* y, int64_t rows, int64_t cols, int64_t ld, const float* bias, cudaStream_t stream) {
  if (rows == 0) return {};
  add_column_bias<<<Blocks(rows * cols, 256), 256, 0, stream>>>(y, rows, cols, ld, bias);
  return Launched("add_column_bias");
}

CudaResult ColumnSum(const void* x, int64_t rows, int64_t cols, int64_t ld, float* out, DeviceAllocator* scratch,
                     cudaStream_t stream) {
  if (rows == 0) return {};
  const dim3 grid = ColumnGrid(cols, rows);
  gyre::cuda::DeviceBuffer part;
  if (CudaResult r = Scratch(scratch, grid.y * cols, &part); !r.ok()) return r;
  column_sum<<<grid, dim3(32, 8), 0, stream>>>(x, rows, cols, ld, part.as<float>());
  if (CudaResult r = Launched("column_sum"); !r.ok()) return r;
  ReduceJobs jobs;
  jobs.Add(Job(part.as<float>(), grid.y, cols, cols, out, false));
  return LaunchReduce(jobs, stream);
}

}  // namespace gyre::ops::cuda_ops
