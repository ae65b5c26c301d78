#include "eval/spectrum.h"

#include <cblas.h>
#include <lapacke.h>

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/strings/str_cat.h"

namespace gyre::eval {
namespace {

// Rows [begin, end) of a CPU f32/f64 matrix as float64.
std::vector<double> RowsAsDouble(const ops::Tensor& m, int64_t begin, int64_t end) {
  const int64_t cols = m.cols();
  std::vector<double> out(static_cast<size_t>((end - begin) * cols));
  if (m.dtype() == ops::DType::kF64) {
    const double* p = m.data<double>() + begin * cols;
    std::copy(p, p + out.size(), out.begin());
  } else {
    const float* p = m.data<float>() + begin * cols;
    for (size_t i = 0; i < out.size(); ++i) out[i] = p[i];
  }
  return out;
}

absl::Status CheckMatrix(const ops::Tensor& m, const char* what) {
  if (!m.defined() || m.rank() != 2) return absl::InvalidArgumentError(absl::StrCat(what, " must be a matrix"));
  if (m.device() != ops::Device::kCpu) return absl::InvalidArgumentError(absl::StrCat(what, " must be on the CPU"));
  if (m.dtype() != ops::DType::kF32 && m.dtype() != ops::DType::kF64) {
    return absl::InvalidArgumentError(absl::StrCat(what, " must be f32 or f64, not ", ops::DTypeName(m.dtype())));
  }
  return absl::OkStatus();
}

// Eigendecomposition of the symmetric d×d `a` (row-major, overwritten by the eigenvectors as
// columns when `vectors`); eigenvalues ascending.
absl::StatusOr<std::vector<double>> SymmetricEigen(std::vector<double>* a, int64_t d, bool vectors) {
  std::vector<double> eig(static_cast<size_t>(d));
  const lapack_int info = LAPACKE_dsyevd(LAPACK_ROW_MAJOR, vectors ? 'V' : 'N', 'U', static_cast<lapack_int>(d),
                                         a->data(), static_cast<lapack_int>(d), eig.data());
  if (info != 0) return absl::InternalError(absl::StrCat("LAPACKE_dsyevd failed (info ", info, ")"));
  return eig;
}

}  // namespace

std::vector<double> GramMatrix(const ops::Tensor& w) {
  const int64_t v = w.rows(), d = w.cols();
  std::vector<double> gram(static_cast<size_t>(d * d), 0.0);
  constexpr int64_t kBlockRows = 1024;
  for (int64_t begin = 0; begin < v; begin += kBlockRows) {
    const int64_t end = std::min(v, begin + kBlockRows);
    std::vector<double> block = RowsAsDouble(w, begin, end);
    cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, static_cast<int>(d), static_cast<int>(end - begin), 1.0,
                block.data(), static_cast<int>(d), 1.0, gram.data(), static_cast<int>(d));
  }
  for (int64_t i = 0; i < d; ++i)
    for (int64_t j = 0; j < i; ++j) gram[i * d + j] = gram[j * d + i];
  return gram;
}

double EffectiveRank(std::span<const double> s) {
  const double total = std::accumulate(s.begin(), s.end(), 0.0);
  if (total <= 0) return 0;
  double entropy = 0;
  for (double x : s) {
    const double p = x / total;
    if (p > 0) entropy -= p * std::log(p);
  }
  return std::exp(entropy);
}

double StableRank(std::span<const double> s) {
  if (s.empty() || s[0] <= 0) return 0;
  double sq = 0;
  for (double x : s) sq += x * x;
  return sq / (s[0] * s[0]);
}

double WError(std::span<const double> s, int64_t r) {
  double total = 0, tail = 0;
  for (size_t i = 0; i < s.size(); ++i) {
    total += s[i] * s[i];
    if (static_cast<int64_t>(i) >= r) tail += s[i] * s[i];
  }
  return total > 0 ? std::sqrt(tail / total) : 0;
}

absl::StatusOr<HeadSpectrum> ComputeHeadSpectrum(const ops::Tensor& w, std::span<const int64_t> ranks) {
  if (absl::Status s = CheckMatrix(w, "LM head weight"); !s.ok()) return s;
  HeadSpectrum out;
  out.vocab = w.rows();
  out.dim = w.cols();
  for (int64_t r : ranks) {
    if (r < 0 || r > out.dim) {
      return absl::InvalidArgumentError(absl::StrCat("W-error rank ", r, " is outside [0, d = ", out.dim, "]"));
    }
  }
  std::vector<double> gram = GramMatrix(w);
  absl::StatusOr<std::vector<double>> eig = SymmetricEigen(&gram, out.dim, /*vectors=*/false);
  if (!eig.ok()) return eig.status();
  out.singular_values.reserve(eig->size());
  for (auto it = eig->rbegin(); it != eig->rend(); ++it) out.singular_values.push_back(std::sqrt(std::max(*it, 0.0)));
  out.effective_rank = EffectiveRank(out.singular_values);
  out.stable_rank = StableRank(out.singular_values);
  for (int64_t r : ranks) out.w_error.emplace_back(r, WError(out.singular_values, r));
  return out;
}

absl::StatusOr<std::vector<double>> RecoverHiddenStates(const ops::Tensor& logits, const ops::Tensor& w) {
  if (absl::Status s = CheckMatrix(w, "LM head weight"); !s.ok()) return s;
  if (absl::Status s = CheckMatrix(logits, "logits"); !s.ok()) return s;
  const int64_t v = w.rows(), d = w.cols(), n = logits.rows();
  if (logits.cols() != v) {
    return absl::InvalidArgumentError(absl::StrCat("logits have ", logits.cols(), " columns, the head has ", v, " rows"));
  }
  if (v < d) return absl::FailedPreconditionError(absl::StrCat("head is ", v, "x", d, ": V < d, hidden states are not determined"));
  std::vector<double> q = GramMatrix(w);
  absl::StatusOr<std::vector<double>> eig = SymmetricEigen(&q, d, /*vectors=*/true);
  if (!eig.ok()) return eig.status();
  const double largest = eig->back();
  if (!(largest > 0) || eig->front() <= largest * 1e-10) {
    return absl::FailedPreconditionError(absl::StrCat("the head's Gram matrix is singular (eigenvalues ", eig->front(),
                                                      " .. ", largest, "): hidden states cannot be recovered"));
  }
  const std::vector<double> wd = RowsAsDouble(w, 0, v);
  const std::vector<double> z = RowsAsDouble(logits, 0, n);
  // y = z W  [n, d];  m = y Q;  m /= λ (columns);  h = m Qᵀ.
  std::vector<double> y(static_cast<size_t>(n * d)), m(static_cast<size_t>(n * d)), h(static_cast<size_t>(n * d));
  cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, d, v, 1.0, z.data(), v, wd.data(), d, 0.0, y.data(), d);
  cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, d, d, 1.0, y.data(), d, q.data(), d, 0.0, m.data(), d);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < d; ++j) m[i * d + j] /= (*eig)[j];
  cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, d, d, 1.0, m.data(), d, q.data(), d, 0.0, h.data(), d);
  return h;
}

absl::StatusOr<std::vector<double>> UndoRmsNormScale(std::span<const double> hidden, const ops::Tensor& weight) {
  const int64_t d = weight.numel();
  if (d == 0 || hidden.size() % d != 0) {
    return absl::InvalidArgumentError(absl::StrCat("norm weight of ", d, " values does not divide ", hidden.size(), " hidden values"));
  }
  double largest = 0;
  for (int64_t j = 0; j < d; ++j) largest = std::max(largest, std::abs(weight.At(j)));
  std::vector<double> inv(d);
  for (int64_t j = 0; j < d; ++j) {
    const double w = weight.At(j);
    if (!(std::abs(w) > 1e-6 * largest)) {
      return absl::FailedPreconditionError(absl::StrCat("final norm weight ", j, " is ", w, ": that feature of the residual stream is not recoverable"));
    }
    inv[j] = 1 / w;
  }
  std::vector<double> out(hidden.begin(), hidden.end());
  for (size_t i = 0; i < out.size(); ++i) out[i] *= inv[i % d];
  return out;
}

absl::StatusOr<double> Anisotropy(std::span<const double> hidden, int64_t batch, int64_t seq, int64_t dim) {
  if (batch <= 0 || seq < 2 || dim <= 0) {
    return absl::InvalidArgumentError("anisotropy needs at least one sequence of two or more tokens");
  }
  if (static_cast<int64_t>(hidden.size()) != batch * seq * dim) {
    return absl::InvalidArgumentError(absl::StrCat("anisotropy: ", hidden.size(), " values for ", batch, "x", seq, "x", dim));
  }
  // Σ_{i<j} u_i·u_j = (|Σ u_i|² − Σ |u_i|²) / 2 with unit vectors u_i, so each sequence costs O(T d).
  double cos_sum = 0;
  std::vector<double> sum(static_cast<size_t>(dim));
  for (int64_t b = 0; b < batch; ++b) {
    std::fill(sum.begin(), sum.end(), 0.0);
    for (int64_t t = 0; t < seq; ++t) {
      const double* x = hidden.data() + (b * seq + t) * dim;
      double norm = 0;
      for (int64_t k = 0; k < dim; ++k) norm += x[k] * x[k];
      norm = std::sqrt(norm);
      if (!(norm > 0)) {
        return absl::InvalidArgumentError(absl::StrCat("anisotropy: hidden state of sequence ", b, " position ", t, " is zero"));
      }
      for (int64_t k = 0; k < dim; ++k) sum[k] += x[k] / norm;
    }
    double sq = 0;
    for (double s : sum) sq += s * s;
    cos_sum += (sq - static_cast<double>(seq)) / 2;
  }
  const double pairs = static_cast<double>(batch) * seq * (seq - 1) / 2;
  return cos_sum / pairs;
}

}  // namespace gyre::eval
