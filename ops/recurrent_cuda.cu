// Kernels of ops/recurrent_cuda.h. All memory-bound; layouts and contracts in the header.
// Column reductions (parameter gradients) use blocks of 32 columns x 8 row lanes over chunks of
// kRowsPerBlock rows, a shared-memory sum over the lanes, then one fp32 atomicAdd per column and
// block.
#include "ops/recurrent_cuda.h"

#include <cuda_bf16.h>

#include <algorithm>

#include "kernels/cuda/cuda_check.h"

namespace gyre::ops::cuda_ops {
namespace {

using bf16 = __nv_bfloat16;
constexpr int kRowsPerBlock = 256;
constexpr int kMaxGates = 8;  // 2 x heads of the mLSTM gates
constexpr int kGateRows = 8;  // rows per warp in the gate projection

__device__ inline float F(const void* p, int64_t i) { return __bfloat162float(static_cast<const bf16*>(p)[i]); }
__device__ inline void St(void* p, int64_t i, float v) { static_cast<bf16*>(p)[i] = __float2bfloat16(v); }
__device__ inline float Sigmoid(float z) { return 1.f / (1.f + __expf(-z)); }
__device__ inline float Silu(float z) { return z * Sigmoid(z); }
__device__ inline float DSilu(float z) {
  const float s = Sigmoid(z);
  return s * (1.f + z * (1.f - s));
}
__device__ inline float WarpSum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

int Blocks(int64_t n, int threads) {
  return static_cast<int>(std::min<int64_t>((n + threads - 1) / threads, 65535 * 8));
}

CudaResult Launched(const char* what) { return gyre::cuda::CudaError(cudaGetLastError(), what, __FILE__, __LINE__); }

// ---------------------------------------------------------------- group norm

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
      St(a.dz, r * a.dim + c, F(a.dy, r * a.dim + c) * hs * DSilu(zc));
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
      St(a.dx, r * a.dim + c, dxa);
    }
  }
}

// dweight[c] += Σ_r gout·xhat; dskip[c] += Σ_r gout·xc (mode 2).
template <int kMode>
__global__ void group_norm_param_grads(GroupNormArgs a) {
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
    if (a.dweight) atomicAdd(a.dweight + c, tw);
    if (kMode == 2 && a.dskip) atomicAdd(a.dskip + c, ts);
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

__global__ void block_diag_bwd_dx(BlockDiagArgs a) {
  const int64_t cols = a.blocks * a.block_in, n = a.rows * cols;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = e / cols, c = e % cols, b = c / a.block_in, i = c % a.block_in;
    float s = 0.f;
    for (int64_t o = 0; o < a.block_out; ++o)
      s += F(a.dy, r * a.ldy + b * a.block_out + o) * a.w[(b * a.block_out + o) * a.block_in + i];
    if (a.accumulate_dx) s += F(a.dx, r * a.ldx + c);
    St(a.dx, r * a.ldx + c, s);
  }
}

__global__ void block_diag_bwd_dw(BlockDiagArgs a) {
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
      const float d = F(a.dy, r * a.ldy + c);
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
      atomicAdd(a.dw + c * a.block_in + i, t);
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------- mLSTM gates

__device__ inline float QkvAt(const MlstmGateArgs& a, int64_t r, int64_t j) {
  const int64_t p = a.inner;
  const void* src = j < p ? a.q : (j < 2 * p ? a.k : a.v);
  return F(src, r * p + (j % p));
}

// One warp per kGateRows rows: 2·heads dot products of length 3p per row.
__global__ void mlstm_gates_fwd(MlstmGateArgs a) {
  const int64_t warp = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  const int64_t r0 = warp * kGateRows;
  if (r0 >= a.rows) return;
  const int G = static_cast<int>(2 * a.heads);
  const int64_t width = 3 * a.inner;
  float acc[kGateRows][kMaxGates];
#pragma unroll
  for (int rr = 0; rr < kGateRows; ++rr)
#pragma unroll
    for (int t = 0; t < kMaxGates; ++t) acc[rr][t] = 0.f;
  for (int64_t j = lane; j < width; j += 32) {
    float w[kMaxGates];
#pragma unroll
    for (int t = 0; t < kMaxGates; ++t)
      w[t] = t < G ? (t < a.heads ? a.wi[t * width + j] : a.wf[(t - a.heads) * width + j]) : 0.f;
#pragma unroll
    for (int rr = 0; rr < kGateRows; ++rr) {
      if (r0 + rr >= a.rows) break;
      const float x = QkvAt(a, r0 + rr, j);
#pragma unroll
      for (int t = 0; t < kMaxGates; ++t) acc[rr][t] += x * w[t];
    }
  }
#pragma unroll
  for (int rr = 0; rr < kGateRows; ++rr) {
#pragma unroll
    for (int t = 0; t < kMaxGates; ++t) {
      const float s = WarpSum(acc[rr][t]);
      if (lane == t && t < G && r0 + rr < a.rows) {
        if (t < a.heads) a.ig[(r0 + rr) * a.heads + t] = s + a.bi[t];
        else a.fg[(r0 + rr) * a.heads + t - a.heads] = s + a.bf[t - a.heads];
      }
    }
  }
}

__global__ void mlstm_gates_bwd_dx(MlstmGateArgs a) {
  const int64_t width = 3 * a.inner, n = a.rows * width;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = e / width, j = e % width;
    float s = 0.f;
    for (int64_t h = 0; h < a.heads; ++h)
      s += a.dig[r * a.heads + h] * a.wi[h * width + j] + a.dfg[r * a.heads + h] * a.wf[h * width + j];
    const int64_t p = a.inner;
    void* dst = j < p ? a.dq : (j < 2 * p ? a.dk : a.dv);
    const int64_t idx = r * p + (j % p);
    St(dst, idx, F(dst, idx) + s);
  }
}

__global__ void mlstm_gates_bwd_dw(MlstmGateArgs a) {
  __shared__ float sm[8][33];
  const int64_t width = 3 * a.inner;
  const int64_t j = blockIdx.x * 32 + threadIdx.x;
  const int64_t r0 = blockIdx.y * (int64_t)kRowsPerBlock;
  const int64_t r1 = min(r0 + kRowsPerBlock, a.rows);
  const int G = static_cast<int>(2 * a.heads);
  float acc[kMaxGates];
#pragma unroll
  for (int t = 0; t < kMaxGates; ++t) acc[t] = 0.f;
  if (j < width) {
    for (int64_t r = r0 + threadIdx.y; r < r1; r += 8) {
      const float x = QkvAt(a, r, j);
#pragma unroll
      for (int t = 0; t < kMaxGates; ++t)
        if (t < G) acc[t] += x * (t < a.heads ? a.dig[r * a.heads + t] : a.dfg[r * a.heads + t - a.heads]);
    }
  }
  for (int t = 0; t < G; ++t) {
    float v = 0.f;
#pragma unroll
    for (int k = 0; k < kMaxGates; ++k)
      if (k == t) v = acc[k];
    sm[threadIdx.y][threadIdx.x] = v;
    __syncthreads();
    if (threadIdx.y == 0 && j < width) {
      float s = 0.f;
      for (int k = 0; k < 8; ++k) s += sm[k][threadIdx.x];
      if (t < a.heads) atomicAdd(a.dwi + t * width + j, s);
      else atomicAdd(a.dwf + (t - a.heads) * width + j, s);
    }
    __syncthreads();
  }
}

// One block per gate: the bias gradients Σ_r dgate[r, h].
__global__ void mlstm_gates_bwd_db(MlstmGateArgs a) {
  __shared__ float sm[256];
  const int t = blockIdx.x;
  const float* src = t < a.heads ? a.dig : a.dfg;
  const int64_t h = t < a.heads ? t : t - a.heads;
  float s = 0.f;
  for (int64_t r = threadIdx.x; r < a.rows; r += blockDim.x) s += src[r * a.heads + h];
  sm[threadIdx.x] = s;
  __syncthreads();
  for (int o = blockDim.x / 2; o > 0; o >>= 1) {
    if (threadIdx.x < o) sm[threadIdx.x] += sm[threadIdx.x + o];
    __syncthreads();
  }
  if (threadIdx.x == 0) atomicAdd(t < a.heads ? a.dbi + h : a.dbf + h, sm[0]);
}

// ---------------------------------------------------------------- columns

__global__ void add_column_bias(void* y, int64_t rows, int64_t cols, int64_t ld, const float* bias) {
  const int64_t n = rows * cols;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = e / cols, c = e % cols;
    St(y, r * ld + c, F(y, r * ld + c) + bias[c]);
  }
}

__global__ void column_sum(const void* x, int64_t rows, int64_t cols, int64_t ld, float* out) {
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
    atomicAdd(out + c, t);
  }
}

dim3 ColumnGrid(int64_t cols, int64_t rows) {
  return dim3(static_cast<unsigned>((cols + 31) / 32), static_cast<unsigned>((rows + kRowsPerBlock - 1) / kRowsPerBlock));
}

}  // namespace

CudaResult GroupNormForward(const GroupNormArgs& a, cudaStream_t stream) {
  if (a.dim % a.groups != 0 || a.rstd == nullptr || (a.layer && a.mean == nullptr))
    return gyre::cuda::InvalidArgument("GroupNormForward: dim not divisible by groups, or missing statistics");
  if (a.rows == 0) return {};
  const int64_t threads = a.rows * a.groups * 32;
  const int blocks = static_cast<int>((threads + 255) / 256);
  switch (a.mode) {
    case NormMode::kPlain: group_norm_fwd<0><<<blocks, 256, 0, stream>>>(a); break;
    case NormMode::kGatedInput: group_norm_fwd<1><<<blocks, 256, 0, stream>>>(a); break;
    case NormMode::kMlstmOutput: group_norm_fwd<2><<<blocks, 256, 0, stream>>>(a); break;
  }
  return Launched("group_norm_fwd");
}

CudaResult GroupNormBackward(const GroupNormArgs& a, cudaStream_t stream) {
  if (a.rows == 0) return {};
  const int64_t threads = a.rows * a.groups * 32;
  const int blocks = static_cast<int>((threads + 255) / 256);
  const dim3 grid = ColumnGrid(a.dim, a.rows), block(32, 8);
  const bool params = a.dweight != nullptr || a.dskip != nullptr;
  switch (a.mode) {
    case NormMode::kPlain:
      group_norm_bwd<0><<<blocks, 256, 0, stream>>>(a);
      if (params) group_norm_param_grads<0><<<grid, block, 0, stream>>>(a);
      break;
    case NormMode::kGatedInput:
      group_norm_bwd<1><<<blocks, 256, 0, stream>>>(a);
      if (params) group_norm_param_grads<1><<<grid, block, 0, stream>>>(a);
      break;
    case NormMode::kMlstmOutput:
      group_norm_bwd<2><<<blocks, 256, 0, stream>>>(a);
      if (params) group_norm_param_grads<2><<<grid, block, 0, stream>>>(a);
      break;
  }
  return Launched("group_norm_bwd");
}

CudaResult BlockDiagForward(const BlockDiagArgs& a, cudaStream_t stream) {
  if (a.block_in > 8 || a.block_out > 8) return gyre::cuda::InvalidArgument("BlockDiag: blocks larger than 8");
  if (a.rows == 0) return {};
  block_diag_fwd<<<Blocks(a.rows * a.blocks * a.block_out, 256), 256, 0, stream>>>(a);
  return Launched("block_diag_fwd");
}

CudaResult BlockDiagBackward(const BlockDiagArgs& a, cudaStream_t stream) {
  if (a.block_in > 8 || a.block_out > 8) return gyre::cuda::InvalidArgument("BlockDiag: blocks larger than 8");
  if (a.rows == 0) return {};
  block_diag_bwd_dx<<<Blocks(a.rows * a.blocks * a.block_in, 256), 256, 0, stream>>>(a);
  if (a.dw) block_diag_bwd_dw<<<ColumnGrid(a.blocks * a.block_out, a.rows), dim3(32, 8), 0, stream>>>(a);
  return Launched("block_diag_bwd");
}

CudaResult MlstmGatesForward(const MlstmGateArgs& a, cudaStream_t stream) {
  if (a.heads < 1 || 2 * a.heads > kMaxGates) return gyre::cuda::InvalidArgument("MlstmGates: heads must be 1..4");
  if (a.rows == 0) return {};
  const int64_t warps = (a.rows + kGateRows - 1) / kGateRows;
  mlstm_gates_fwd<<<static_cast<int>((warps * 32 + 255) / 256), 256, 0, stream>>>(a);
  return Launched("mlstm_gates_fwd");
}

CudaResult MlstmGatesBackward(const MlstmGateArgs& a, cudaStream_t stream) {
  if (a.heads < 1 || 2 * a.heads > kMaxGates) return gyre::cuda::InvalidArgument("MlstmGates: heads must be 1..4");
  if (a.rows == 0) return {};
  mlstm_gates_bwd_dx<<<Blocks(a.rows * 3 * a.inner, 256), 256, 0, stream>>>(a);
  mlstm_gates_bwd_dw<<<ColumnGrid(3 * a.inner, a.rows), dim3(32, 8), 0, stream>>>(a);
  mlstm_gates_bwd_db<<<static_cast<int>(2 * a.heads), 256, 0, stream>>>(a);
  return Launched("mlstm_gates_bwd");
}

CudaResult AddColumnBias(void* y, int64_t rows, int64_t cols, int64_t ld, const float* bias, cudaStream_t stream) {
  if (rows == 0) return {};
  add_column_bias<<<Blocks(rows * cols, 256), 256, 0, stream>>>(y, rows, cols, ld, bias);
  return Launched("add_column_bias");
}

CudaResult ColumnSum(const void* x, int64_t rows, int64_t cols, int64_t ld, float* out, cudaStream_t stream) {
  if (rows == 0) return {};
  column_sum<<<ColumnGrid(cols, rows), dim3(32, 8), 0, stream>>>(x, rows, cols, ld, out);
  return Launched("column_sum");
}

}  // namespace gyre::ops::cuda_ops
