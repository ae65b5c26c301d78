// Causal depthwise conv1d (the short convolution of the xLSTM mLSTM/sLSTM blocks and of the
// Mamba-2 block), optionally followed by SiLU, on the CPU: forward, backward, single step.
//
// Math (per channel ch, width K, PyTorch Conv1d(groups=C, padding=K−1) truncated to the first S
// outputs, weight [C, 1, K] stored as [C, K]):
//
//     u_t[ch] = bias[ch] + Σ_{j=0}^{K−1} w[ch][j] · x_{t−(K−1)+j}[ch]
//     y_t     = u_t            or   SiLU(u_t) = u_t·σ(u_t)   (Conv1dOptions::silu)
//
// where x_τ for τ < 0 is taken from the conv state (the K−1 inputs before the sequence; zeros
// when none is given): state[B, K−1, C], row r holding x_{r−(K−1)} (oldest first), as the step
// function keeps it.
//
// Layouts (row-major, contiguous, channels last): x, y [B, S, C]; w [C, K]; bias [C].
//
// Nothing is saved for the backward: it recomputes u from x (the conv is cheap).
// Gradient contract: activation gradients (dx, d initial state) are OVERWRITTEN; parameter
// gradients (dw, dbias) ACCUMULATE.
//
// Threading and batch slicing: pure functions of their arguments. A call on batch rows [b0, b1)
// is the call with shape.batch = b1 − b0 and every batch-major pointer advanced by b0 rows;
// dw and dbias accumulate, so concurrent slices need their own buffers.
#pragma once

#include <cstdint>

#include "absl/status/status.h"

namespace gyre::cpu {

struct Conv1dShape {
  int64_t batch = 0;     // B
  int64_t seq_len = 0;   // S (ignored by the step function)
  int64_t channels = 0;  // C
  int64_t width = 4;     // K
};

struct Conv1dOptions {
  bool silu = false;  // apply SiLU to the conv output (fused)
};

absl::Status conv1d_check(const Conv1dShape& shape);

// y [B, S, C] overwritten. bias, initial_state [B, K−1, C] may be null (zero); final_state
// [B, K−1, C] may be null; it receives the last K−1 inputs (drawing on initial_state if S < K−1).
template <typename T>
void conv1d_fwd_ref(const Conv1dShape& shape, const Conv1dOptions& options, const T* x, const T* w,
                    const T* bias, const T* initial_state, T* y, T* final_state);

// dy [B, S, C]; d_final_state [B, K−1, C] may be null (zero). dx overwritten; dw [C, K] and
// dbias [C] accumulated (dbias may be null); d_initial_state may be null (not wanted).
template <typename T>
void conv1d_bwd_ref(const Conv1dShape& shape, const Conv1dOptions& options, const T* x, const T* w,
                    const T* bias, const T* initial_state, const T* dy, const T* d_final_state,
                    T* dx, T* dw, T* dbias, T* d_initial_state);

// One step: x [B, C]; state [B, K−1, C] read and overwritten (shifted by one, x appended);
// y [B, C] overwritten.
template <typename T>
void conv1d_step_fwd_ref(const Conv1dShape& shape, const Conv1dOptions& options, const T* x,
                         const T* w, const T* bias, T* state, T* y);

}  // namespace gyre::cpu
