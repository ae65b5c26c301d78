// sLSTM cell on the CPU: forward over a sequence, single step (generation), backward through
// time. Reference for the GPU sLSTM kernel and the CPU training engine.
//
// Math: /work/shared/MODELS.md §2 ([X] §2.2 eqs 8–17; [xl] `slstm/src/vanilla/slstm.py`).
// Width d = NH·dh. For every gate g ∈ {i, f, z, o} the pre-activation is
//
//     g̃_t = gx_t[g] + R_g h_{t−1}          gx = W_g x_t + b_g, precomputed by the layer
//                                            R_g block-diagonal: one dense dh×dh block per head
// then, pointwise per unit (states h, c, n, m ∈ R^d):
//     lf   = logσ(f̃_t) + m_{t−1}
//     m_t  = ĩ_t  if n_{t−1} == 0  else  max(ĩ_t, lf)
//     i'   = min(exp(ĩ_t − m_t), 1),   f' = min(exp(lf − m_t), 1)
//     c_t  = f'·c_{t−1} + i'·tanh(z̃_t),   n_t = f'·n_{t−1} + i'
//     h_t  = σ(õ_t) ⊙ c_t / n_t
//
// Initial state (h, c, n, m) = 0 unless given. The `n_{t−1} == 0` test is per unit (the
// official vanilla code tests all units at once; identical when starting from zeros, since n ≥ 1
// after the first step).
//
// Layouts (row-major, contiguous):
//     gx      [B, S, 4, d]        gate order i, f, z, o; unit j of head hd at index hd·dh + j
//     R       [NH, 4, dh, dh]     R[hd][g][j][l]: from h_{t−1}[hd·dh + l] to g̃[g][hd·dh + j]
//     h (out) [B, S, d]           state h, c, n, m: each [B, d]
//
// Gradient: the exact gradient of the forward (every path, the stabiliser m included; since h is
// invariant to m the m paths cancel in exact arithmetic, but they matter for the gradient of the
// final state's c, n, m). min(·, 1) passes the gradient of exp (it binds only where the argument
// is 0, where the two agree). Contract: activation gradients (d gx, d initial state) are
// OVERWRITTEN, the parameter gradient dR ACCUMULATES.
//
// Threading and batch slicing: pure functions of their arguments; OpenBLAS does the per-step
// products. Batch rows are independent and every array (the opaque `saved` buffer included) is
// batch-major, so a call on rows [b0, b1) is the call with shape.batch = b1 − b0 and every
// pointer advanced by b0 rows (saved by b0·saved_size(batch = 1)). dR accumulates, so
// concurrent slices need their own dR buffers (summed afterwards). Results equal a full call's
// rows up to rounding (the per-step GEMM has B rows, and its blocking may depend on B).
//
// Performance: the products inside these kernels are small (chunk- or head-sized), so run them
// with OpenBLAS single-threaded and spread batch rows over threads instead (see above): on the
// 2-core development machine under load, OPENBLAS_NUM_THREADS=2 made the mLSTM chunkwise forward
// and backward 2-4x slower in wall time than 1 thread (mlstm_bench, 2026-11-26). Also: Debian's
// OpenBLAS 0.3.21 does not recognise this machine's Xeon and falls back to its Prescott (SSE3)
// kernels; OPENBLAS_CORETYPE=SkylakeX (set before the process starts) made a 64×64×128 sgemm
// 3.4x and the mLSTM chunkwise forward+backward 1.9x faster here (2026-11-26).
#pragma once

#include <cstdint>

#include "absl/status/status.h"

namespace gyre::cpu {

struct SlstmShape {
  int64_t batch = 0;      // B
  int64_t seq_len = 0;    // S (ignored by the step function)
  int64_t num_heads = 0;  // NH
  int64_t head_dim = 0;   // dh; d = NH·dh
};

// Pointers to one (h, c, n, m) state for all B×d units. Null `h` in an INPUT state means
// "zeros" (all four); null `h` in an OUTPUT state means "not wanted".
template <typename Elem>
struct SlstmStateRef {
  Elem* h = nullptr;  // [B, d]
  Elem* c = nullptr;  // [B, d]
  Elem* n = nullptr;  // [B, d]
  Elem* m = nullptr;  // [B, d]
};

absl::Status slstm_check(const SlstmShape& shape);

// Elements of T the forward saves: per step the full gate pre-activations (input + recurrent)
// and the states c_t, n_t, m_t: B·S·7·d.
int64_t slstm_saved_size(const SlstmShape& shape);

// Forward over S steps. h [B, S, d] and saved [slstm_saved_size] overwritten; `initial` may be
// null (zeros); `final_state` may be null.
template <typename T>
void slstm_fwd_ref(const SlstmShape& shape, const T* gx, const T* r, SlstmStateRef<const T> initial,
                   T* h, T* saved, SlstmStateRef<T> final_state);

// One step (generation): gx [B, 4, d]; `state` read and overwritten; h [B, d] overwritten.
template <typename T>
void slstm_step_fwd_ref(const SlstmShape& shape, const T* gx, const T* r, SlstmStateRef<T> state,
                        T* h);

// Backward through time. Needs r, `initial` (as given to the forward), the forward's h and
// saved. dh [B, S, d]; `d_final` (null h = zero) = gradient w.r.t. the final (h, c, n, m).
// d_gx [B, S, 4, d] overwritten; dr [NH, 4, dh, dh] ACCUMULATED; d_initial (null h = not
// wanted) overwritten.
template <typename T>
void slstm_bwd_ref(const SlstmShape& shape, const T* r, SlstmStateRef<const T> initial, const T* h,
                   const T* saved, const T* dh, SlstmStateRef<const T> d_final, T* d_gx, T* dr,
                   SlstmStateRef<T> d_initial);

}  // namespace gyre::cpu
