// One-token (generation) steps of the recurrent cells that have no step kernel elsewhere:
// the causal depthwise conv1d window, the Mamba-2 SSD state update, and the sLSTM cell.
// (The mLSTM step is kernels/cuda/mlstm.h MlstmStepForward.) CPU references: kernels/cpu
// conv1d_step_fwd_ref, ssd_step_fwd_ref, slstm_step_fwd_ref; ssm_step_gpu_test checks each in
// float64 on random bf16-representable inputs.
//
// Conv1dStep  y[b,c] = act(bias[c] + Σ_{j<K-1} w[c,j] s[b,j,c] + w[c,K-1] x[b,c]); then the window
//             s[b] shifts by one and takes x (s [B, K-1, C] fp32, oldest first).
// SsdStep     (MODELS.md §2, [ms] selective_state_update) per (b, head h, group g = h/(H/G)):
//             dt = softplus(dt_raw + dt_bias[h]) (no clamp), a = exp(-dt·exp(A_log[h]));
//             S[p,n] = a S[p,n] + dt x[p] B[n];  y[p] = Σ_n S[p,n] C[n] + D[h] x[p].
//             S [B, H, P, N] fp32; x, B, C bf16 rows with strides (views into the conv output).
// SlstmStep   pre = gx + R h_prev (per head, R [NH, 4, dh, dh] bf16: pre_g[j] += Σ_l R[g][j][l] h[l]),
//             then the stabilised pointwise update of kernels/cpu/slstm.cc; h, c, n, m fp32 [B, d].
// Bytes per step (the floor at batch 1): the states once read and once written (SSD: B·H·P·N·8),
// R once (sLSTM: 8·d·dh bytes); all three are far below a microsecond at 3.3 TB/s for the
// 125M-class models, so a decode step is bound by launch latency and the weight GEMMs.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/device_info.h"

namespace gyre::cuda {

struct Conv1dStepArgs {
  int64_t batch = 0, channels = 0, width = 4;
  bool silu = false;
  const __nv_bfloat16* x = nullptr;  // [B, ldx]
  int64_t ldx = 0;                   // 0 = channels
  const float* w = nullptr;          // [C, K]
  const float* bias = nullptr;       // [C] or null
  float* state = nullptr;            // [B, K-1, C]
  __nv_bfloat16* y = nullptr;        // [B, C] packed
};
CudaResult Conv1dStep(const Conv1dStepArgs& a, cudaStream_t stream);

struct SsdStepArgs {
  int64_t batch = 0, heads = 0, head_dim = 0, groups = 1, state_dim = 0;
  const __nv_bfloat16* x = nullptr;  // [B, H·P] rows of stride ld_xbc
  const __nv_bfloat16* b = nullptr;  // [B, G·N] rows of stride ld_xbc
  const __nv_bfloat16* c = nullptr;  // [B, G·N] rows of stride ld_xbc
  int64_t ld_xbc = 0;
  const float* dt = nullptr;         // [B, H] raw
  const float* a_log = nullptr;      // [H]
  const float* dt_bias = nullptr;    // [H]
  const float* d = nullptr;          // [H] or null
  float* state = nullptr;            // [B, H, P, N]
  __nv_bfloat16* y = nullptr;        // [B, H·P] packed
};
CudaResult SsdStep(const SsdStepArgs& a, cudaStream_t stream);

struct SlstmStepArgs {
  int64_t batch = 0, heads = 0, head_dim = 0;
  const __nv_bfloat16* gx = nullptr;  // [B, 4, d]
  const __nv_bfloat16* r = nullptr;   // [NH, 4, dh, dh]
  float* h = nullptr;                 // [B, d] state (read, overwritten)
  float* c = nullptr;
  float* n = nullptr;
  float* m = nullptr;
  __nv_bfloat16* h_out = nullptr;     // [B, d]
};
CudaResult SlstmStep(const SlstmStepArgs& a, cudaStream_t stream);

}  // namespace gyre::cuda
