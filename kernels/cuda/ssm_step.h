// Generation steps of the recurrent cells: the causal depthwise conv1d window, the Mamba-2 SSD
// state update, the sLSTM cell, and a multi-position mLSTM step (the one-position mLSTM step is
// kernels/cuda/mlstm.h MlstmStepForward). CPU references: kernels/cpu conv1d_step_fwd_ref,
// ssd_step_fwd_ref, slstm_step_fwd_ref, mlstm_step_fwd_ref; ssm_step_gpu_test checks each in
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
// MlstmStepChunk  StepHead of kernels/cpu/mlstm.cc per position: m' = max(lf + m, ĩ),
//             C = e^{lf+m−m'} C + e^{ĩ−m'} k vᵀ, n likewise with 1 for v, h = q̂ᵀC / (max(|q̂ᵀn|, e^{−m'}) + ε).
//
// Chunks (Conv1dStep, SsdStep, SlstmStep, MlstmStepChunk with `positions` k > 1; speculative
// decoding's DecodeChunk): operand rows are position-major (row j·B + b is sequence b at chunk
// position j) and ONE launch steps all k positions, each thread block holding its slice of the
// state on chip (registers for conv / SSD, shared memory for the mLSTM's C slice and the sLSTM's
// h; the sLSTM's c, n, m — d floats each — are re-read by their owning thread from L2) from the
// first position to the last:
// the state is read once and written once per chunk, instead of k times each with k launches.
// With `history` (a rewindable chunk) the kernel also writes the state after positions
// 0..k-2 into history[j] (layout of the state, j-major), so Rewind(keep) takes history[keep-1]
// by swapping a tensor handle — no launch.
//
// Why per-position history and not "the state before the chunk + recompute the kept prefix on
// Rewind" (S = one layer's state bytes; mLSTM 125m: 4·384·384·4 = 2.36 MB a sequence, SSD
// mamba2-130m: 24·64·128·4 = 0.79 MB):
//   history:    chunk reads S, writes S + (k−1)·S history;  Rewind 0 bytes, 0 launches.
//               Per round (k+1)·S bytes, 1 launch per cell.
//   recompute:  chunk reads S, writes S into a second buffer (the old one is the kept "before");
//               Rewind(keep < k) reruns the kernel over keep positions: reads S, writes S.
//               Per rewinding round 4·S bytes, 2 launches per cell.
// Bytes favour recompute from k = 4 (5·S vs 4·S) and history below (k = 2: 3·S vs 4·S); but at
// batch 1 a launch (~3–5 µs of host and GPU latency) costs more than S at 3.3 TB/s (0.7 µs for
// the mLSTM's 2.36 MB, 0.24 µs for the SSD's), so (k−3)·S extra bytes (≤ 2·S at k = 5) are
// cheaper than one launch a layer: history wins for k ≤ 5 at these sizes, and decode at batch 1
// is launch-bound (bench/RESULTS.md, helper specdec14). Non-rewindable chunks write no history.
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
  __nv_bfloat16* y = nullptr;        // [k·B, C] packed
  // Chunk positions k (x rows j·B + b, stride ldx); width <= kMaxChunkConvWidth when k > 1.
  int64_t positions = 1;
  float* history = nullptr;          // [k-1, B, K-1, C]: the window after positions 0..k-2, or null
};
constexpr int64_t kMaxChunkConvWidth = 8;
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
  __nv_bfloat16* y = nullptr;        // [k·B, H·P] packed
  // Chunk positions k (any number: a prefill chunk too): x, b, c rows j·B + b (stride ld_xbc),
  // dt [k·B, H]. N <= 256.
  int64_t positions = 1;
  float* history = nullptr;          // [k-1, B, H, P, N]: the state after positions 0..k-2, or null
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
  __nv_bfloat16* h_out = nullptr;     // [k·B, d]
  // Chunk positions k: gx rows j·B + b. The state after positions 0..k-2 (all four or none):
  // [k-1, B, d] each.
  int64_t positions = 1;
  float *h_history = nullptr, *c_history = nullptr, *n_history = nullptr, *m_history = nullptr;
};
CudaResult SlstmStep(const SlstmStepArgs& a, cudaStream_t stream);

struct MlstmStepChunkArgs {
  int64_t batch = 0, heads = 0, dk = 0, dv = 0, positions = 1;
  bool sigmoid_forget = true;
  double eps = 1e-6;
  const __nv_bfloat16* q = nullptr;  // [k·B, NH, dk] (row j·B + b)
  const __nv_bfloat16* k = nullptr;  // [k·B, NH, dk]
  const __nv_bfloat16* v = nullptr;  // [k·B, NH, dv]
  const float* ig = nullptr;         // [k·B, NH] raw input gate ĩ
  const float* fg = nullptr;         // [k·B, NH] raw forget gate f̃
  float* c = nullptr;                // [B, NH, dk, dv] state, read and overwritten
  const float* n = nullptr;          // [B, NH, dk] state before the chunk
  const float* m = nullptr;          // [B, NH]
  // n and m after the chunk: NOT in place (every block of a head reads n and m at its start,
  // while the head's first block writes them at its end; blocks of a head need not overlap).
  float* n_out = nullptr;            // [B, NH, dk]
  float* m_out = nullptr;            // [B, NH]
  __nv_bfloat16* h = nullptr;        // [k·B, NH, dv]
  // The state after positions 0..k-2 (all three or none): [k-1, B, NH, dk, dv], [k-1, B, NH, dk],
  // [k-1, B, NH].
  float* c_history = nullptr;
  float* n_history = nullptr;
  float* m_history = nullptr;
};
// One block per (sequence, head, slice of CB dv columns) with its dk × CB slice of C in shared
// memory (dk <= 2048); n and the gates are recomputed by every block of a head (dk loads), so no
// block waits on another. CB = 32, 16 or 8: the widest that still gives one block per SM.
CudaResult MlstmStepChunk(const MlstmStepChunkArgs& a, cudaStream_t stream);

}  // namespace gyre::cuda
