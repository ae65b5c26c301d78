// LM-head spectrum and representation diagnostics (MODELS.md §7, softmax bottleneck).
//
// Head spectrum: the singular values σ_1 >= ... >= σ_d of the head W ∈ R^{V×d} come from the
// eigendecomposition of the d×d Gram matrix WᵀW (accumulated in float64 over row blocks of W,
// then LAPACKE dsyevd): σ_i = sqrt(λ_i). Cost O(V d²), memory O(d²) beyond W. Going through the
// Gram matrix squares the condition number: singular values below ~1e-8 σ_1 are not resolved
// (they come out as 0 or as float64 noise); that is far below anything the diagnostics read.
//
// Derived numbers (standard forms, MODELS.md §7):
//   effective rank  exp(-Σ p_i ln p_i),  p_i = σ_i / Σ σ
//   stable rank     Σ σ_i² / σ_1²
//   W-error(r)      ‖W − W_r‖_F / ‖W‖_F = sqrt(Σ_{i>r} σ_i² / Σ σ_i²)   (Eckart–Young–Mirsky)
//
// Anisotropy: mean cosine similarity between the last-layer hidden states of distinct tokens in
// the same sequence (all pairs i < j of a sequence, pooled over the sequences of the batch).
// LanguageModel exposes logits, not hidden states; the states the head sees (after the final
// norm) are recovered exactly from logits z = W h by least squares, h = (WᵀW)⁻¹ Wᵀ z, which is
// exact when W has full column rank (V >= d; refused when WᵀW is numerically singular).
//
// Thread-safety: pure functions.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "ops/tensor.h"

namespace gyre::eval {

struct HeadSpectrum {
  int64_t vocab = 0, dim = 0;
  std::vector<double> singular_values;  // descending, `dim` values
  double effective_rank = 0;
  double stable_rank = 0;
  std::vector<std::pair<int64_t, double>> w_error;  // (r, W-error(r)) for each requested r
};

// W is [V, d] (f32 or f64, CPU). `ranks`: the r of each W-error(r) (0 <= r <= d, else
// InvalidArgument naming it).
absl::StatusOr<HeadSpectrum> ComputeHeadSpectrum(const ops::Tensor& w, std::span<const int64_t> ranks);

// The pieces, on a given descending spectrum.
double EffectiveRank(std::span<const double> singular_values);
double StableRank(std::span<const double> singular_values);
double WError(std::span<const double> singular_values, int64_t r);

// The d×d Gram matrix WᵀW in float64 (row-major), accumulated over row blocks of W.
std::vector<double> GramMatrix(const ops::Tensor& w);

// Hidden states h [N, d] (float64) with W h_n = z_n for logits z [N, V] (least squares through the
// Gram matrix). FailedPrecondition when WᵀW is singular to working precision (rank-deficient head).
absl::StatusOr<std::vector<double>> RecoverHiddenStates(const ops::Tensor& logits, const ops::Tensor& w);

// Undoes the elementwise scale of a final RMSNorm (y = x / rms(x) * w) on rows of `hidden`
// [N, d]: returns y / w, which is x / rms(x), i.e. the pre-norm residual stream up to a positive
// per-row factor -- enough for cosines. FailedPrecondition when some |w_j| is ~0 (x_j is lost).
absl::StatusOr<std::vector<double>> UndoRmsNormScale(std::span<const double> hidden, const ops::Tensor& weight);

// Mean cosine similarity over pairs of distinct positions i < j within each sequence; `hidden`
// is [batch * seq, d] row-major (float64). Zero vectors are refused (cosine undefined).
absl::StatusOr<double> Anisotropy(std::span<const double> hidden, int64_t batch, int64_t seq, int64_t dim);

}  // namespace gyre::eval
