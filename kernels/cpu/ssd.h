// Mamba-2 SSD (state-space duality) on the CPU: sequential step recurrence (generation, oracle)
// and the chunked algorithm (training), forward and backward.
//
// Math: /work/shared/MODELS.md §4.1–4.2 ([M2] §6; [ms] `modules/ssd_minimal.py`,
// `ops/triton/ssd_combined.py`). Per head (x_t ∈ R^P, B_t, C_t ∈ R^N, state H ∈ R^{P×N}):
//
//     dt_t = clamp(softplus(dt_raw_t + dt_bias), dt_min, dt_max)
//     A    = −exp(A_log)                 one scalar per head ("scalar times identity")
//     H_t  = exp(dt_t·A)·H_{t−1} + dt_t·x_t B_tᵀ
//     y_t  = H_t C_t + D·x_t
//
// Groups: B and C have G groups; head hd uses group hd / (H/G).
// Chunked (chunk Q, Acs = within-chunk cumsum of dt·A), per chunk c:
//   1. y_l  = Σ_{s≤l} (C_l·B_s) e^{Acs_l−Acs_s} dt_s x_s                (intra-chunk, quadratic)
//   2. S_c  = Σ_s e^{Acs_last−Acs_s} dt_s x_s B_sᵀ                       (chunk state)
//   3. H_c  = e^{Acs_last} H_{c−1} + S_c                                (state passing)
//   4. y_l += e^{Acs_l} H_{c−1} C_l;  y_l += D x_l                       (state → output)
// Every exponent is ≤ 0 (A < 0, dt ≥ 0), so no stabiliser is needed. Q = 1 is exactly the
// step recurrence.
//
// Layouts (row-major, contiguous, token-major):
//     x, y [B, S, H, P]    dt_raw [B, S, H]    B, C [B, S, G, N]
//     A_log, dt_bias, D [H]                     state [B, H, P, N]
//
// Gradient contract: activation gradients (dx, d dt_raw, dB, dC, d initial state) are
// OVERWRITTEN; parameter gradients (dA_log, d dt_bias, dD) ACCUMULATE. The clamp passes no
// gradient where it binds.
//
// Threading and batch slicing: pure functions of their arguments; OpenBLAS does the in-chunk
// products. Batch rows are independent and every array (the opaque `saved` buffer included) is
// batch-major, so a call on rows [b0, b1) is the call with shape.batch = b1 − b0 and every
// pointer advanced by b0 rows (saved by b0·saved_size(batch = 1)). The parameter gradients
// accumulate, so concurrent slices need their own dA_log / d dt_bias / dD buffers.
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
#include <limits>

#include "absl/status/status.h"

namespace gyre::cpu {

struct SsdShape {
  int64_t batch = 0;       // B
  int64_t seq_len = 0;     // S (ignored by the step function)
  int64_t num_heads = 0;   // H
  int64_t head_dim = 0;    // P
  int64_t num_groups = 1;  // G (divides H)
  int64_t state_dim = 0;   // N
};

struct SsdOptions {
  int64_t chunk_size = 256;  // Q; any S is allowed (the last chunk may be shorter)
  // dt_limit of [ms]: dt is clamped to [dt_min, dt_max] after the softplus (default: no clamp).
  double dt_min = 0.0;
  double dt_max = std::numeric_limits<double>::infinity();
};

template <typename T>
struct SsdInputs {
  const T* x = nullptr;        // [B, S, H, P]
  const T* dt = nullptr;       // [B, S, H]  raw dt (before + dt_bias and softplus)
  const T* a_log = nullptr;    // [H]        A = −exp(A_log)
  const T* dt_bias = nullptr;  // [H]
  const T* b = nullptr;        // [B, S, G, N]
  const T* c = nullptr;        // [B, S, G, N]
  const T* d = nullptr;        // [H]  D skip; null = no skip
};

// dx, ddt, db, dc overwritten; da_log, ddt_bias, dd accumulated (dd ignored when null or when
// the input D is null).
// The per-head parameter gradients are sums over the B·S tokens of per-token terms that partly
// cancel; a check of such a sum needs the terms' magnitude (ssd_check_sum_of_terms below). The
// d dt_bias terms are ddt itself; da_log_terms and dd_terms (optional, [B, S, H], overwritten;
// dd_terms only with a D input) receive the other two, so that per head the sum over tokens of
// the terms is the increment of da_log / dd:
//   dA_log: dt_t·A times the gradient of the token's log-decay a_t = dt_t·A (the reverse cumsum
//           of ∂Acs), A = −exp(A_log);   dD: Σ_p dy_t·x_t over the head's P channels.
template <typename T>
struct SsdGrads {
  T* dx = nullptr;
  T* ddt = nullptr;
  T* da_log = nullptr;
  T* ddt_bias = nullptr;
  T* db = nullptr;
  T* dc = nullptr;
  T* dd = nullptr;
  T* da_log_terms = nullptr;
  T* dd_terms = nullptr;
};

absl::Status ssd_check(const SsdShape& shape, const SsdOptions& options);

// One step: x [B, H, P], dt_raw [B, H], B, C [B, G, N] (a_log, dt_bias, d as in SsdInputs);
// state [B, H, P, N] read and overwritten; y [B, H, P] overwritten.
template <typename T>
void ssd_step_fwd_ref(const SsdShape& shape, const SsdOptions& options, const T* x, const T* dt,
                      const T* a_log, const T* dt_bias, const T* b, const T* c, const T* d,
                      T* state, T* y);

// The step recurrence over a whole sequence (the oracle for the chunked form).
// y overwritten; initial_state may be null (zeros); final_state may be null.
template <typename T>
void ssd_recurrent_fwd_ref(const SsdShape& shape, const SsdOptions& options, const SsdInputs<T>& in,
                           const T* initial_state, T* y, T* final_state);

// Elements of T the chunked forward saves: the NC+1 chunk-boundary states H_c (c = 0..NC,
// NC = ceil(S/Q)), B·H·(NC+1)·P·N, plus dt after softplus/clamp, B·S·H.
int64_t ssd_chunked_saved_size(const SsdShape& shape, const SsdOptions& options);

// Chunked forward. y [B, S, H, P] and saved [ssd_chunked_saved_size] overwritten (saved may be
// null when no backward follows: inference prefill); initial_state [B, H, P, N] may be null
// (zeros); final_state may be null.
template <typename T>
void ssd_chunked_fwd_ref(const SsdShape& shape, const SsdOptions& options, const SsdInputs<T>& in,
                         const T* initial_state, T* y, T* saved, T* final_state);

// Chunked backward (exact gradient of the chunked forward). Needs the forward's inputs,
// initial_state (as given to the forward) and saved. dy [B, S, H, P]; d_final_state may be
// null (zero). See SsdGrads for overwrite/accumulate; d_initial_state may be null.
template <typename T>
void ssd_chunked_bwd_ref(const SsdShape& shape, const SsdOptions& options, const SsdInputs<T>& in,
                         const T* initial_state, const T* saved, const T* dy,
                         const T* d_final_state, const SsdGrads<T>& grads, T* d_initial_state);

// The check of one per-head sum of per-token terms (dA_log, d dt_bias, dD), as
// ops/DT_BIAS_CHECK.md gives it for the model test: rel_err = ||got − want|| / ||want|| (norms
// over heads, as every other check), terms_err = ||got − want|| / ||abs_sums|| with abs_sums[h] =
// Σ_tokens |term| from the float64 reference, cancel = ||want|| / ||abs_sums||. Passes when
// rel_err <= rel_tol OR terms_err <= terms_tol; a non-finite `got` fails. The second arm says
// "right to 1 % of the terms' magnitude": bf16 operands move each term by ~2^-9 of itself, which
// a cancelling sum amplifies by 1 / cancel in rel_err but not in terms_err.
struct SsdSumOfTermsCheck {
  double rel_err = 0, terms_err = 0, cancel = 0;
  bool pass = false;
};
SsdSumOfTermsCheck ssd_check_sum_of_terms(const double* got, const double* want,
                                          const double* abs_sums, int64_t heads, double rel_tol,
                                          double terms_tol);

// terms_tol of the CUDA kernel test (kernels/cuda/ssd_gpu_test.cc) and of the CPU test of this
// rule (ssd_test.cc). The kernels read exact bf16 inputs, so their error is ~1e-4 of the terms
// (seed 1514's dA_log: rel_err 1.244e-2 at cancel 0.008), not the model test's ~2e-3 (bf16
// rounding at every activation boundary); the model's 1e-2 would accept a zero dA_log there.
// Every term rounded to bf16 reaches 1.1e-3 on the test's "large dt*A Q256" draws (ssd_test.cc),
// the thinnest structural error there 7.6e-3: 2e-3 sits between.
constexpr double kSsdKernelTestTermsTol = 2e-3;

// Per head, Σ over the tokens of |terms[b, s, h]| (terms [B, S, H] as SsdGrads records them).
void ssd_sum_abs_terms(const double* terms, int64_t tokens, int64_t heads, double* abs_sums);

}  // namespace gyre::cpu
