// Kernels of kernels/cuda/ssm_step.h (the header states the math). Simple, latency-bound
// designs: one thread per channel (conv), one warp per state row (SSD), one block per
// (sequence, head) (sLSTM). fp32 states and arithmetic.
#include "kernels/cuda/ssm_step.h"

#include <cmath>

#include "kernels/cuda/cuda_check.h"

namespace gyre::cuda {
namespace {

using bf16 = __nv_bfloat16;

__global__ void conv1d_step_kernel(Conv1dStepArgs a) {
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

__global__ void __launch_bounds__(kSsdWarps * 32) ssd_step_kernel(SsdStepArgs a) {
  const int64_t H = a.heads, P = a.head_dim, N = a.state_dim;
  const int64_t b = blockIdx.x / H, h = blockIdx.x % H, g = h / (H / a.groups);
  const float raw = a.dt[b * H + h] + a.dt_bias[h];
  const float dt = raw > 20.f ? raw : log1pf(expf(raw));
  const float arg = -dt * expf(a.a_log[h]);
  const float decay = arg < -60.f ? 0.f : expf(arg);
  const bf16* xr = a.x + b * a.ld_xbc + h * P;
  const bf16* br = a.b + b * a.ld_xbc + g * N;
  const bf16* cr = a.c + b * a.ld_xbc + g * N;
  float* st = a.state + (b * H + h) * P * N;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t p = warp; p < P; p += kSsdWarps) {
    const float x = __bfloat162float(xr[p]);
    const float dx = dt * x;
    float acc = 0.f;
    for (int64_t n = lane; n < N; n += 32) {
      const float s = decay * st[p * N + n] + dx * __bfloat162float(br[n]);
      st[p * N + n] = s;
      acc += s * __bfloat162float(cr[n]);
    }
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) a.y[b * H * P + h * P + p] = __float2bfloat16(acc + (a.d ? a.d[h] * x : 0.f));
  }
}

__device__ float LogSigmoid(float x) { return x < 0.f ? x - log1pf(expf(x)) : -log1pf(expf(-x)); }

// One block per (b, head); dynamic shared memory: h_prev [dh] then pre [4, dh].
__global__ void slstm_step_kernel(SlstmStepArgs a) {
  extern __shared__ float sm[];
  const int64_t NH = a.heads, dh = a.head_dim, d = NH * dh;
  const int64_t b = blockIdx.x / NH, hd = blockIdx.x % NH;
  float* hp = sm;
  float* pre = sm + dh;
  for (int64_t j = threadIdx.x; j < dh; j += blockDim.x) hp[j] = a.h[b * d + hd * dh + j];
  __syncthreads();
  for (int64_t gj = threadIdx.x; gj < 4 * dh; gj += blockDim.x) {
    const int64_t gate = gj / dh, j = gj % dh;
    const bf16* row = a.r + ((hd * 4 + gate) * dh + j) * dh;
    float acc = __bfloat162float(a.gx[b * 4 * d + gate * d + hd * dh + j]);
    for (int64_t l = 0; l < dh; ++l) acc += __bfloat162float(row[l]) * hp[l];
    pre[gj] = acc;
  }
  __syncthreads();
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
    a.h_out[i] = __float2bfloat16(h);
  }
}

}  // namespace

CudaResult Conv1dStep(const Conv1dStepArgs& a, cudaStream_t stream) {
  if (a.batch <= 0 || a.channels <= 0 || a.width < 1 || !a.x || !a.w || !a.y || (a.width > 1 && !a.state)) {
    return InvalidArgument("conv1d_step: bad arguments");
  }
  const int64_t n = a.batch * a.channels;
  conv1d_step_kernel<<<static_cast<unsigned>((n + 255) / 256), 256, 0, stream>>>(a);
  CUDA_RETURN_IF_LAUNCH_ERROR("conv1d_step_kernel");
  return {};
}

CudaResult SsdStep(const SsdStepArgs& a, cudaStream_t stream) {
  if (a.batch <= 0 || a.heads <= 0 || a.groups <= 0 || a.heads % a.groups != 0 || a.head_dim <= 0 ||
      a.state_dim <= 0 || !a.x || !a.b || !a.c || !a.dt || !a.a_log || !a.dt_bias || !a.state || !a.y) {
    return InvalidArgument("ssd_step: bad arguments");
  }
  ssd_step_kernel<<<static_cast<unsigned>(a.batch * a.heads), kSsdWarps * 32, 0, stream>>>(a);
  CUDA_RETURN_IF_LAUNCH_ERROR("ssd_step_kernel");
  return {};
}

CudaResult SlstmStep(const SlstmStepArgs& a, cudaStream_t stream) {
  if (a.batch <= 0 || a.heads <= 0 || a.head_dim <= 0 || a.head_dim > 2048 || !a.gx || !a.r || !a.h || !a.c ||
      !a.n || !a.m || !a.h_out) {
    return InvalidArgument("slstm_step: bad arguments");
  }
  const size_t smem = 5 * a.head_dim * sizeof(float);
  slstm_step_kernel<<<static_cast<unsigned>(a.batch * a.heads), 256, smem, stream>>>(a);
  CUDA_RETURN_IF_LAUNCH_ERROR("slstm_step_kernel");
  return {};
}

}  // namespace gyre::cuda
