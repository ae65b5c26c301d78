// mLSTM cell on the CPU: step recurrence (generation) and chunkwise-parallel form (training),
// forward and backward. Reference for every GPU mLSTM kernel and the CPU training engine.
//
// Math: /work/shared/MODELS.md §1.1 (step) and §1.3 (chunkwise). One head, per time step t:
//
//     lf_t = logσ(f̃_t)            (sigmoid forget gate, log space; MlstmForgetGate::kSigmoid)
//     lf_t = f̃_t                  (exponential forget gate, f = exp(f̃); kExponential, [X eq 26])
//     m_t  = max(lf_t + m_{t-1}, ĩ_t)                          stabiliser
//     f'   = exp(lf_t + m_{t-1} − m_t),   i' = exp(ĩ_t − m_t)
//     C_t  = f'·C_{t-1} + i'·k_t v_tᵀ      C ∈ R^{dk×dv}
//     n_t  = f'·n_{t-1} + i'·k_t            n ∈ R^dk
//     q̂_t  = q_t / sqrt(dk)                 ([mk] convention: q is scaled, the state stores raw k)
//     h_t  = (C_tᵀ q̂_t) / ( max(|n_tᵀ q̂_t|, exp(−m_t)) + ε )
//
// The output gate o is not part of the cell (it lives in the layer). Initial state (C, n, m) =
// (0, 0, 0) unless one is given; note that m_0 = 0 takes part in the max of m_1.
//
// Layouts (all row-major, contiguous, token-major so a Linear's [B·S, features] output is used
// as is; per-head slices are strided and handed to BLAS with a leading dimension):
//     q, k   [B, S, NH, dk]        v, h  [B, S, NH, dv]        ĩ, f̃  [B, S, NH]
//     state  C [B, NH, dk, dv]     n [B, NH, dk]               m [B, NH]
//
// Which gradient the backward computes (decided for Gyre; see PERFORMANCE.md's TFLA note):
// the TRUE gradient of the forward that is computed, everywhere it is differentiable. In
// unstabilised terms h_t = Ñ_t / (max(|D̃_t|, 1) + ε·e^{m_t}), so h depends on m only through
// ε·e^{m_t}. The backward therefore is (a) the gradient with every m held constant (the paper's
// "no gradient through m", [X eqs 87–105], extended to the normaliser max(|·|, e^{−m}) and the
// initial/final states) plus (b) the exact correction ∂h_t/∂m_t = −h_t·ε/d_t (d_t = the
// denominator) routed along the argmax that chose m_t = b_t + max(m_0, max_{s≤t}(ĩ_s − b_s)),
// b_t = Σ_{r≤t} lf_r. Part (b) is of relative size ε·e^{m_t} / max(|D̃_t|, 1): small (without it
// the tests' gradients are off by 1e-6 to 4e-5, measured), but needed to match finite
// differences of the forward to 1e-6. At ties of a max (measure zero) the branch the forward
// picked gets the gradient. With ε = 0, (b) vanishes and (a) is exact.
//
// Versus NX-AI/mlstm_kernels: its chunkwise backward drops the gradient through the
// denominator ("it cancels out in the forward in the groupnorm", `torch/chunkwise/native/bw.py`),
// so dq, dk, dĩ, df̃ differ from the true gradient while dv agrees — the pattern PERFORMANCE.md
// records for TFLA. MlstmOptions::stop_normaliser_gradient reproduces that convention.
//
// Gradient contract (llm.c): activation gradients (dq, dk, dv, dĩ, df̃, d initial state) are
// OVERWRITTEN; these kernels have no parameters.
//
// Threading and batch slicing: every function is a pure function of its arguments (no globals
// besides OpenBLAS's own thread pool); calls on disjoint outputs may run concurrently. Batch rows
// are independent and every array (the opaque `saved` buffer included) is batch-major, so a
// call on rows [b0, b1) is the same call with shape.batch = b1 − b0 and every pointer advanced
// by b0 rows (saved by b0·saved_size(batch = 1)); the results are bit-identical to the rows of a
// full call. That is how a caller spreads one layer over threads.
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

struct MlstmShape {
  int64_t batch = 0;      // B
  int64_t seq_len = 0;    // S (ignored by the single-step functions)
  int64_t num_heads = 0;  // NH
  int64_t dk = 0;         // head dimension of q and k
  int64_t dv = 0;         // head dimension of v and h
};

enum class MlstmForgetGate {
  kSigmoid,      // f = σ(f̃), lf = logσ(f̃): the official xLSTM code and the default
  kExponential,  // f = exp(f̃), lf = f̃
};

struct MlstmOptions {
  // Chunk length L of the chunkwise form; any S is allowed (the last chunk may be shorter).
  // L = 1 is exactly the step recurrence (so its backward is the recurrent backward); L >= S is
  // the parallel quadratic form of MODELS.md §1.2 (with m_0 taking part in the max).
  int64_t chunk_size = 64;
  MlstmForgetGate forget_gate = MlstmForgetGate::kSigmoid;
  double eps = 1e-6;  // ε of the normaliser
  // Backward only. false (default): the true gradient described at the top of this file.
  // true: the convention of NX-AI/mlstm_kernels' chunkwise backward (native `bw.py`, TFLA):
  // the denominator d_t = max(|n_tᵀq̂_t|, e^{−m_t}) + ε is a constant and m gets no gradient, i.e.
  // only dh_t/d_t flows into the numerator. It equals the true gradient whenever dh_t ⟂ h_t for
  // every token and head, which a following per-head scale-invariant norm (the block's
  // GroupNorm, with its ε → 0) makes true; use it to compare with TFLA-style kernels.
  bool stop_normaliser_gradient = false;
};

// Pointers to one (C, n, m) state triple for all B×NH heads. A null `c` in an INPUT state means
// "zeros" (then n and m are ignored too); a null `c` in an OUTPUT state means "not wanted".
// Elem is `T` for outputs and `const T` for inputs.
template <typename Elem>
struct MlstmStateRef {
  Elem* c = nullptr;  // [B, NH, dk, dv]
  Elem* n = nullptr;  // [B, NH, dk]
  Elem* m = nullptr;  // [B, NH]
};

template <typename T>
struct MlstmInputs {
  const T* q = nullptr;      // [B, S, NH, dk]  (unscaled; the kernel applies 1/sqrt(dk))
  const T* k = nullptr;      // [B, S, NH, dk]
  const T* v = nullptr;      // [B, S, NH, dv]
  const T* igate = nullptr;  // [B, S, NH]  input-gate pre-activation ĩ
  const T* fgate = nullptr;  // [B, S, NH]  forget-gate pre-activation f̃
};

// Activation gradients, all overwritten. Shapes as in MlstmInputs.
template <typename T>
struct MlstmGrads {
  T* dq = nullptr;
  T* dk = nullptr;
  T* dv = nullptr;
  T* digate = nullptr;
  T* dfgate = nullptr;
};

// OK when the shape and options are usable (positive sizes, chunk_size >= 1, eps >= 0).
// The kernels below assume this holds (they do not check again).
absl::Status mlstm_check(const MlstmShape& shape, const MlstmOptions& options);

// ---- Step recurrence (generation) -----------------------------------------------------------
// One time step for all B×NH heads. q, k [B, NH, dk]; v [B, NH, dv]; ĩ, f̃ [B, NH];
// `state` is read and overwritten with (C_t, n_t, m_t); h [B, NH, dv] is overwritten.
template <typename T>
void mlstm_step_fwd_ref(const MlstmShape& shape, const MlstmOptions& options, const T* q,
                        const T* k, const T* v, const T* igate, const T* fgate,
                        MlstmStateRef<T> state, T* h);

// The step recurrence run over a whole sequence (S calls of the step): the simple oracle the
// chunkwise form is tested against. h [B, S, NH, dv] overwritten; `initial` may be null
// (zeros); `final_state` may be null.
template <typename T>
void mlstm_recurrent_fwd_ref(const MlstmShape& shape, const MlstmOptions& options,
                             const MlstmInputs<T>& in, MlstmStateRef<const T> initial, T* h,
                             MlstmStateRef<T> final_state);

// ---- Chunkwise-parallel form (training) ------------------------------------------------------
// Elements of T the forward saves for the backward: the NC+1 chunk-boundary states (C_k, n_k,
// m_k), k = 0..NC with NC = ceil(S / L), plus per-token m_t and den_t = n_tᵀq̂_t. About
// B·NH·(NC+1)·dk·dv, i.e. ~dk/L times the size of v: choose L accordingly (2× at dk = 128,
// L = 64; 6× at dk = 384, L = 64). The backward must get the same shape and options.
int64_t mlstm_chunkwise_saved_size(const MlstmShape& shape, const MlstmOptions& options);

// Chunkwise forward (MODELS.md §1.3): inside each chunk a masked (Q̂Kᵀ ⊙ D') quadratic form,
// between chunks the state recurrence; matrix products through OpenBLAS.
// h [B, S, NH, dv] overwritten; saved [mlstm_chunkwise_saved_size] overwritten (opaque; pass it
// to the backward unchanged); `initial` may be null (zeros), `final_state` may be null.
template <typename T>
void mlstm_chunkwise_fwd_ref(const MlstmShape& shape, const MlstmOptions& options,
                             const MlstmInputs<T>& in, MlstmStateRef<const T> initial, T* h,
                             T* saved, MlstmStateRef<T> final_state);

// Chunkwise backward: the true gradient described at the top of this file. Needs the forward's
// inputs, `initial` (same as given to the forward), the forward's output h and `saved`.
// dh [B, S, NH, dv]; `d_final` = gradient w.r.t. the final (C, n, m) (null c = zero).
// All of `grads` are overwritten; `d_initial` (null c = not wanted) is overwritten.
template <typename T>
void mlstm_chunkwise_bwd_ref(const MlstmShape& shape, const MlstmOptions& options,
                             const MlstmInputs<T>& in, MlstmStateRef<const T> initial, const T* h,
                             const T* saved, const T* dh, MlstmStateRef<const T> d_final,
                             const MlstmGrads<T>& grads, MlstmStateRef<T> d_initial);

}  // namespace gyre::cpu
