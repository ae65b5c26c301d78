// Kernels of kernels/cuda/ssm_step.h (the header states the math and the chunk / history byte
// count). Latency-bound designs: one thread per channel with its window in registers (conv), one
// warp per state row with the row in registers (SSD), one block per (sequence, head) (sLSTM),
// one block per (sequence, head, column slice) with the slice in shared memory (mLSTM chunk).
// The conv, SSD and mLSTM kernels step all `positions` of a chunk in one launch. fp32 states and
// arithmetic.
#include "kernels/cuda/ssm_step.h"

#include <cmath>

#include "kernels/cuda/cuda_check.h"

namespace gyre::cuda {
namespace {

using bf16 = __nv_bfloat16;

// Thread per (sequence, channel): the K-1 window values live in registers across the chunk.
__global__ void conv1d_step_kernel(Conv1dStepArgs a) {
  const int64_t C = a.channels, K = a.width, ldx = a.ldx > 0 ? a.ldx : C, B = a.batch;
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= B * C) return;
  const int64_t b = idx / C, ch = idx % C;
  constexpr int kWin = static_cast<int>(kMaxChunkConvWidth) - 1;
  float win[kWin], w[kWin];
  float* s = a.state + b * (K - 1) * C;
#pragma unroll
  for (int j = 0; j < kWin; ++j) {
    win[j] = j < K - 1 ? s[j * C + ch] : 0.f;
    w[j] = j < K - 1 ? a.w[ch * K + j] : 0.f;
  }
  const float w_last = a.w[ch * K + K - 1], bias = a.bias ? a.bias[ch] : 0.f;
  for (int64_t t = 0; t < a.positions; ++t) {
    const int64_t row = t * B + b;
    const float x = __bfloat162float(a.x[row * ldx + ch]);
    float u = bias;
#pragma unroll
    for (int j = 0; j < kWin; ++j)
      if (j < K - 1) u += w[j] * win[j];
    u += w_last * x;
    if (a.silu) u = u / (1.f + expf(-u));
    a.y[row * C + ch] = __float2bfloat16(u);
#pragma unroll
    for (int j = 0; j < kWin; ++j) {
      if (j + 1 < K - 1) win[j] = win[j + 1];
      else if (j == K - 2) win[j] = x;
    }
    if (a.history != nullptr && t + 1 < a.positions) {
      float* hs = a.history + (t * B + b) * (K - 1) * C;
#pragma unroll
      for (int j = 0; j < kWin; ++j)
        if (j < K - 1) hs[j * C + ch] = win[j];
    }
  }
#pragma unroll
  for (int j = 0; j < kWin; ++j)
    if (j < K - 1) s[j * C + ch] = win[j];
}

// The single-position kernel for windows wider than kMaxChunkConvWidth (the window shifts in
// global memory).
__global__ void conv1d_step_wide_kernel(Conv1dStepArgs a) {
  const int64_t C = a.channels, K = a.width, ldx = a.ldx > 0 ? a.ldx : C;
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= a.batch * C) return;
  const int64_t b = idx / C, ch = idx % C;
  float* s = a.state + b * (K - 1) * C;
  const float x = __bfloat162float(a.x[b * ldx + ch]);
  float u = a.bias ? a.bias[ch] : 0.f;
  for (int64_t j = 0; j < K - 1; ++j) u += a.w[ch * K + j] * s[j * C + ch];
  u += a.w[ch * K + K - 1] * x;
  if (a.silu) u = u / (1.f + expf(-u));
  a.y[b * C + ch] = __float2bfloat16(u);
  for (int64_t j = 0; j + 1 < K - 1; ++j) s[j * C + ch] = s[(j + 1) * C + ch];
  if (K > 1) s[(K - 2) * C + ch] = x;
}

constexpr int kSsdWarps = 4;
constexpr int kSsdRowsPerWarp = 2;
constexpr int kSsdRowsPerBlock = kSsdWarps * kSsdRowsPerWarp;
constexpr int kSsdWindow = 16;  // positions staged in shared memory at a time (chunks of any length)

// Grid (B·H, ceil(P / 8)); warp w owns rows p0 + w and p0 + w + 4 of its block's 8. A lane holds
// NPL = ceil(N / 32) state values of each of its two rows (n = lane + 32 i) in registers across
// the whole chunk; the per-position dt, decay, B and C of the head's group are staged in shared
// memory kSsdWindow positions at a time (a prefill chunk of 256 positions takes 16 windows).
template <int NPL>
__global__ void __launch_bounds__(kSsdWarps * 32) ssd_step_kernel(SsdStepArgs a) {
  extern __shared__ float ssd_sm[];
  const int64_t H = a.heads, P = a.head_dim, N = a.state_dim, B = a.batch, T = a.positions;
  const int64_t b = blockIdx.x / H, h = blockIdx.x % H, g = h / (H / a.groups);
  float* dts = ssd_sm;              // [W]
  float* decays = dts + kSsdWindow;  // [W]
  float* bs = decays + kSsdWindow;   // [W, N]
  float* cs = bs + kSsdWindow * N;   // [W, N]
  const float dskip = a.d ? a.d[h] : 0.f;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int64_t p[kSsdRowsPerWarp];
  float sv[kSsdRowsPerWarp][NPL];
#pragma unroll
  for (int r = 0; r < kSsdRowsPerWarp; ++r) {
    p[r] = blockIdx.y * static_cast<int64_t>(kSsdRowsPerBlock) + r * kSsdWarps + warp;
    const float* st = a.state + ((b * H + h) * P + p[r]) * N;
#pragma unroll
    for (int i = 0; i < NPL; ++i) {
      const int64_t n = lane + 32 * i;
      sv[r][i] = p[r] < P && n < N ? st[n] : 0.f;
    }
  }
  for (int64_t t0 = 0; t0 < T; t0 += kSsdWindow) {
    const int64_t len = T - t0 < kSsdWindow ? T - t0 : kSsdWindow;
    __syncthreads();  // the previous window's readers are done
    for (int64_t i = threadIdx.x; i < len; i += blockDim.x) {
      const float raw = a.dt[((t0 + i) * B + b) * H + h] + a.dt_bias[h];
      const float dt = raw > 20.f ? raw : log1pf(expf(raw));
      const float arg = -dt * expf(a.a_log[h]);
      dts[i] = dt;
      decays[i] = arg < -60.f ? 0.f : expf(arg);
    }
    for (int64_t i = threadIdx.x; i < len * N; i += blockDim.x) {
      const int64_t t = i / N, n = i % N;
      const int64_t row = ((t0 + t) * B + b) * a.ld_xbc + g * N + n;
      bs[i] = __bfloat162float(a.b[row]);
      cs[i] = __bfloat162float(a.c[row]);
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kSsdRowsPerWarp; ++r) {
      if (p[r] >= P) continue;  // warp-uniform
      // Lane t < len fetches x of position t0 + t; shuffled to all lanes per position.
      float xl = 0.f;
      if (lane < len) xl = __bfloat162float(a.x[((t0 + lane) * B + b) * a.ld_xbc + h * P + p[r]]);
      for (int t = 0; t < len; ++t) {
        const float x = __shfl_sync(0xffffffffu, xl, t);
        const float dx = dts[t] * x, decay = decays[t];
        float acc = 0.f;
#pragma unroll
        for (int i = 0; i < NPL; ++i) {
          const int64_t n = lane + 32 * i;
          if (n < N) {
            sv[r][i] = decay * sv[r][i] + dx * bs[t * N + n];
            acc += sv[r][i] * cs[t * N + n];
          }
        }
        for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
        const int64_t tt = t0 + t;
        if (lane == 0) a.y[(tt * B + b) * H * P + h * P + p[r]] = __float2bfloat16(acc + dskip * x);
        if (a.history != nullptr && tt + 1 < T) {
          float* hs = a.history + (((tt * B + b) * H + h) * P + p[r]) * N;
#pragma unroll
          for (int i = 0; i < NPL; ++i) {
            const int64_t n = lane + 32 * i;
            if (n < N) hs[n] = sv[r][i];
          }
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kSsdRowsPerWarp; ++r) {
    if (p[r] >= P) continue;
    float* st = a.state + ((b * H + h) * P + p[r]) * N;
#pragma unroll
    for (int i = 0; i < NPL; ++i) {
      const int64_t n = lane + 32 * i;
      if (n < N) st[n] = sv[r][i];
    }
  }
}

__device__ float LogSigmoid(float x) { return x < 0.f ? x - log1pf(expf(x)) : -log1pf(expf(-x)); }

// One block per (b, head); dynamic shared memory: h_prev [dh] then pre [4, dh]. A chunk loops over
// its positions in the block (h stays in shared memory between them; c, n, m elements belong to
// one thread throughout).
__global__ void slstm_step_kernel(SlstmStepArgs a) {
  extern __shared__ float sm[];
  const int64_t NH = a.heads, dh = a.head_dim, d = NH * dh, B = a.batch, T = a.positions;
  const int64_t b = blockIdx.x / NH, hd = blockIdx.x % NH;
  float* hp = sm;
  float* pre = sm + dh;
  for (int64_t j = threadIdx.x; j < dh; j += blockDim.x) hp[j] = a.h[b * d + hd * dh + j];
  for (int64_t t = 0; t < T; ++t) {
    const int64_t row = t * B + b;
    __syncthreads();  // hp holds h of the previous position; pre is free
    for (int64_t gj = threadIdx.x; gj < 4 * dh; gj += blockDim.x) {
      const int64_t gate = gj / dh, j = gj % dh;
      const bf16* rr = a.r + ((hd * 4 + gate) * dh + j) * dh;
      float acc = __bfloat162float(a.gx[row * 4 * d + gate * d + hd * dh + j]);
      for (int64_t l = 0; l < dh; ++l) acc += __bfloat162float(rr[l]) * hp[l];
      pre[gj] = acc;
    }
    __syncthreads();
    const bool record = a.h_history != nullptr && t + 1 < T;
    for (int64_t j = threadIdx.x; j < dh; j += blockDim.x) {
      const int64_t i = b * d + hd * dh + j;
      const float i_raw = pre[j], f_raw = pre[dh + j], z_raw = pre[2 * dh + j], o_raw = pre[3 * dh + j];
      const float n_prev = a.n[i], lf = LogSigmoid(f_raw) + a.m[i];
      const bool from_input = n_prev == 0.f || i_raw >= lf;
      const float m_new = from_input ? i_raw : lf;
      const float ip = from_input ? 1.f : fminf(expf(i_raw - m_new), 1.f);
      const float fp = from_input ? fminf(expf(lf - m_new), 1.f) : 1.f;
      const float c = fp * a.c[i] + ip * tanhf(z_raw);
      const float n = fp * n_prev + ip;
      const float h = c / n / (1.f + expf(-o_raw));
      a.c[i] = c;
      a.n[i] = n;
      a.m[i] = m_new;
      a.h[i] = h;
      hp[j] = h;
      a.h_out[row * d + hd * dh + j] = __float2bfloat16(h);
      if (record) {
        const int64_t hi = t * B * d + i;
        a.h_history[hi] = h;
        a.c_history[hi] = c;
        a.n_history[hi] = n;
        a.m_history[hi] = m_new;
      }
    }
  }
}

// ---------------------------------------------------------------- mLSTM chunk

__device__ float DecayExpF(float x) { return x < -60.f ? 0.f : expf(x); }  // kernels/cpu/cell_math.h DecayExp

constexpr int kMlstmThreads = 256;

// Grid (B·NH, ceil(dv / CB)); thread (row group rg = tid / CB, column cj = tid % CB) owns rows
// a ≡ rg (mod 256 / CB) of column j0 + cj. Shared: the block's C slice [dk][CB], q̂ [dk], i'·k [dk],
// n [dk], the per-row-group partial q̂ᵀC [256 / CB][CB] and the per-warp den partials. Every block
// of a head keeps its own copy of n (and m in a register) so den needs no exchange; block column 0
// writes n_out, m_out (another buffer: the head's other blocks may not have read n, m yet) and
// their history. C is in place: each block reads and writes only its own columns.
__global__ void __launch_bounds__(kMlstmThreads) mlstm_step_chunk_kernel(MlstmStepChunkArgs a, int cb) {
  extern __shared__ float ml_sm[];
  const int64_t NH = a.heads, DK = a.dk, DV = a.dv, B = a.batch, T = a.positions;
  const int64_t bh = blockIdx.x, b = bh / NH, hd = bh % NH;
  const int groups = kMlstmThreads / cb;
  const int tid = threadIdx.x, rg = tid / cb, cj = tid % cb, warp = tid / 32, lane = tid % 32;
  const int64_t col = blockIdx.y * static_cast<int64_t>(cb) + cj;
  const bool has_col = col < DV, writes_nm = blockIdx.y == 0;
  float* cs = ml_sm;              // [DK][cb]
  float* qs = cs + DK * cb;       // [DK]
  float* ks = qs + DK;            // [DK]
  float* ns = ks + DK;            // [DK]
  float* red = ns + DK;           // [groups][cb]
  float* dred = red + groups * cb;  // [kMlstmThreads / 32]
  float* cst = a.c + bh * DK * DV;
  for (int64_t r = rg; r < DK; r += groups) cs[r * cb + cj] = has_col ? cst[r * DV + col] : 0.f;
  for (int64_t r = tid; r < DK; r += kMlstmThreads) ns[r] = a.n[bh * DK + r];
  float m = a.m[bh];
  const float scale = rsqrtf(static_cast<float>(DK));
  const float eps = static_cast<float>(a.eps);
  for (int64_t t = 0; t < T; ++t) {
    const int64_t tok = (t * B + b) * NH + hd;
    const float lf = a.sigmoid_forget ? LogSigmoid(a.fg[tok]) : a.fg[tok];
    const float i_raw = a.ig[tok];
    const float m_new = fmaxf(lf + m, i_raw);
    const float fp = DecayExpF(lf + m - m_new), ip = DecayExpF(i_raw - m_new);
    __syncthreads();  // the previous position's readers of qs / ks / red / dred are done
    float den = 0.f;
    for (int64_t r = tid; r < DK; r += kMlstmThreads) {
      const float qa = __bfloat162float(a.q[tok * DK + r]) * scale;
      const float ka = ip * __bfloat162float(a.k[tok * DK + r]);
      const float nn = fp * ns[r] + ka;
      qs[r] = qa;
      ks[r] = ka;
      ns[r] = nn;
      den += qa * nn;
      if (writes_nm && a.n_history != nullptr && t + 1 < T) a.n_history[(t * B * NH + bh) * DK + r] = nn;
    }
    for (int o = 16; o > 0; o >>= 1) den += __shfl_xor_sync(0xffffffffu, den, o);
    if (lane == 0) dred[warp] = den;
    const float vj = has_col ? __bfloat162float(a.v[tok * DV + col]) : 0.f;
    __syncthreads();
    float acc = 0.f;
    float* hist = a.c_history != nullptr && t + 1 < T ? a.c_history + (t * B * NH + bh) * DK * DV : nullptr;
    for (int64_t r = rg; r < DK; r += groups) {
      const float c = fp * cs[r * cb + cj] + ks[r] * vj;
      cs[r * cb + cj] = c;
      acc += qs[r] * c;
      if (hist != nullptr && has_col) hist[r * DV + col] = c;
    }
    red[rg * cb + cj] = acc;
    __syncthreads();
    if (tid < cb) {
      float num = 0.f;
      for (int g = 0; g < groups; ++g) num += red[g * cb + tid];
      float d = 0.f;
      for (int w = 0; w < kMlstmThreads / 32; ++w) d += dred[w];
      const int64_t j = blockIdx.y * static_cast<int64_t>(cb) + tid;
      if (j < DV) a.h[tok * DV + j] = __float2bfloat16(num / (fmaxf(fabsf(d), expf(-m_new)) + eps));
    }
    if (writes_nm && tid == 0 && a.m_history != nullptr && t + 1 < T) a.m_history[t * B * NH + bh] = m_new;
    m = m_new;
  }
  if (has_col)
    for (int64_t r = rg; r < DK; r += groups) cst[r * DV + col] = cs[r * cb + cj];
  if (writes_nm) {
    for (int64_t r = tid; r < DK; r += kMlstmThreads) a.n_out[bh * DK + r] = ns[r];
    if (tid == 0) a.m_out[bh] = m;
  }
}

}  // namespace

CudaResult Conv1dStep(const Conv1dStepArgs& a, cudaStream_t stream) {
  if (a.batch <= 0 || a.channels <= 0 || a.width < 1 || a.positions < 1 || !a.x || !a.w || !a.y ||
      (a.width > 1 && !a.state)) {
    return InvalidArgument("conv1d_step: bad arguments");
  }
  const int64_t n = a.batch * a.channels;
  const unsigned blocks = static_cast<unsigned>((n + 255) / 256);
  if (a.width > kMaxChunkConvWidth) {
    if (a.positions != 1 || a.history != nullptr) {
      return InvalidArgument("conv1d_step: a chunk of positions needs width <= kMaxChunkConvWidth (8)");
    }
    conv1d_step_wide_kernel<<<blocks, 256, 0, stream>>>(a);
    CUDA_RETURN_IF_LAUNCH_ERROR("conv1d_step_wide_kernel");
    return {};
  }
  conv1d_step_kernel<<<blocks, 256, 0, stream>>>(a);
  CUDA_RETURN_IF_LAUNCH_ERROR("conv1d_step_kernel");
  return {};
}

CudaResult SsdStep(const SsdStepArgs& a, cudaStream_t stream) {
  if (a.batch <= 0 || a.heads <= 0 || a.groups <= 0 || a.heads % a.groups != 0 || a.head_dim <= 0 ||
      a.state_dim <= 0 || a.positions < 1 || !a.x || !a.b || !a.c || !a.dt || !a.a_log || !a.dt_bias || !a.state ||
      !a.y) {
    return InvalidArgument("ssd_step: bad arguments");
  }
  if (a.state_dim > 256) return InvalidArgument("ssd_step: state_dim > 256");
  const size_t smem = static_cast<size_t>(kSsdWindow) * (2 + 2 * a.state_dim) * sizeof(float);  // <= 33 KB
  const dim3 grid(static_cast<unsigned>(a.batch * a.heads),
                  static_cast<unsigned>((a.head_dim + kSsdRowsPerBlock - 1) / kSsdRowsPerBlock));
  const int npl = static_cast<int>((a.state_dim + 31) / 32);
  if (npl <= 1) ssd_step_kernel<1><<<grid, kSsdWarps * 32, smem, stream>>>(a);
  else if (npl <= 2) ssd_step_kernel<2><<<grid, kSsdWarps * 32, smem, stream>>>(a);
  else if (npl <= 4) ssd_step_kernel<4><<<grid, kSsdWarps * 32, smem, stream>>>(a);
  else ssd_step_kernel<8><<<grid, kSsdWarps * 32, smem, stream>>>(a);
  CUDA_RETURN_IF_LAUNCH_ERROR("ssd_step_kernel");
  return {};
}

CudaResult SlstmStep(const SlstmStepArgs& a, cudaStream_t stream) {
  if (a.batch <= 0 || a.heads <= 0 || a.head_dim <= 0 || a.head_dim > 2048 || a.positions < 1 || !a.gx || !a.r ||
      !a.h || !a.c || !a.n || !a.m || !a.h_out) {
    return InvalidArgument("slstm_step: bad arguments");
  }
  const bool any_history = a.h_history || a.c_history || a.n_history || a.m_history;
  if (any_history && !(a.h_history && a.c_history && a.n_history && a.m_history)) {
    return InvalidArgument("slstm_step: give all four histories or none");
  }
  const size_t smem = 5 * a.head_dim * sizeof(float);
  slstm_step_kernel<<<static_cast<unsigned>(a.batch * a.heads), 256, smem, stream>>>(a);
  CUDA_RETURN_IF_LAUNCH_ERROR("slstm_step_kernel");
  return {};
}

CudaResult MlstmStepChunk(const MlstmStepChunkArgs& a, cudaStream_t stream) {
  if (a.batch <= 0 || a.heads <= 0 || a.dk <= 0 || a.dv <= 0 || a.positions < 1 || a.eps < 0 || !a.q || !a.k || !a.v ||
      !a.ig || !a.fg || !a.c || !a.n || !a.m || !a.n_out || !a.m_out || !a.h) {
    return InvalidArgument("mlstm_step_chunk: bad arguments");
  }
  if (a.n_out == a.n || a.m_out == a.m) return InvalidArgument("mlstm_step_chunk: n_out / m_out must not be n / m");
  const bool any_history = a.c_history || a.n_history || a.m_history;
  if (any_history && !(a.c_history && a.n_history && a.m_history)) {
    return InvalidArgument("mlstm_step_chunk: give all three histories or none");
  }
  if (a.dk > 2048) return InvalidArgument("mlstm_step_chunk: dk > 2048");
  static int sms = [] {
    int device = 0, n = 0;
    if (cudaGetDevice(&device) != cudaSuccess || cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) !=
                                                     cudaSuccess) {
      (void)cudaGetLastError();
      return 132;
    }
    return n;
  }();
  // The widest column slice that still gives every SM a block (coalescing is fine down to 8
  // floats = one 32-byte sector per row).
  const int64_t bh = a.batch * a.heads;
  int cb = 8;
  for (int c : {32, 16}) {
    if (bh * ((a.dv + c - 1) / c) >= sms) {
      cb = c;
      break;
    }
  }
  const int groups = kMlstmThreads / cb;
  const size_t smem = static_cast<size_t>(a.dk * cb + 3 * a.dk + groups * cb + kMlstmThreads / 32) * sizeof(float);
  if (smem > 200 * 1024) return InvalidArgument("mlstm_step_chunk: dk too large for shared memory");
  if (smem > 48 * 1024) {
    CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(mlstm_step_chunk_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                              static_cast<int>(smem)));
  }
  const dim3 grid(static_cast<unsigned>(bh), static_cast<unsigned>((a.dv + cb - 1) / cb));
  mlstm_step_chunk_kernel<<<grid, kMlstmThreads, smem, stream>>>(a, cb);
  CUDA_RETURN_IF_LAUNCH_ERROR("mlstm_step_chunk_kernel");
  return {};
}

}  // namespace gyre::cuda
