#include "eval/spectrum.h"

#include <lapacke.h>

#include <algorithm>
#include <cmath>
#include <random>

#include "gtest/gtest.h"

namespace gyre::eval {
namespace {

// A rows×cols matrix with orthonormal columns (QR of a Gaussian matrix, LAPACKE).
std::vector<double> Orthonormal(int64_t rows, int64_t cols, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal;
  std::vector<double> a(static_cast<size_t>(rows * cols));
  for (double& x : a) x = normal(rng);
  std::vector<double> tau(static_cast<size_t>(cols));
  EXPECT_EQ(LAPACKE_dgeqrf(LAPACK_ROW_MAJOR, rows, cols, a.data(), cols, tau.data()), 0);
  EXPECT_EQ(LAPACKE_dorgqr(LAPACK_ROW_MAJOR, rows, cols, cols, a.data(), cols, tau.data()), 0);
  return a;
}

// W = U diag(s) Vᵀ as an f64 tensor [v, d].
ops::Tensor WithSpectrum(int64_t v, int64_t d, const std::vector<double>& s, uint64_t seed) {
  const std::vector<double> u = Orthonormal(v, d, seed), q = Orthonormal(d, d, seed + 1);
  ops::Tensor w = ops::Tensor::Zeros({v, d}, ops::DType::kF64);
  double* p = w.data<double>();
  for (int64_t i = 0; i < v; ++i)
    for (int64_t j = 0; j < d; ++j) {
      double acc = 0;
      for (int64_t k = 0; k < d; ++k) acc += u[i * d + k] * s[k] * q[j * d + k];
      p[i * d + j] = acc;
    }
  return w;
}

TEST(SpectrumTest, RecoversAConstructedSpectrum) {
  const std::vector<double> s = {9, 5, 4, 2.5, 1, 0.5, 0.25, 0.125};
  ops::Tensor w = WithSpectrum(40, 8, s, 7);
  const int64_t ranks[] = {0, 1, 3, 8};
  absl::StatusOr<HeadSpectrum> spec = ComputeHeadSpectrum(w, ranks);
  ASSERT_TRUE(spec.ok()) << spec.status();
  ASSERT_EQ(spec->singular_values.size(), 8u);
  for (size_t i = 0; i < s.size(); ++i) EXPECT_NEAR(spec->singular_values[i], s[i], 1e-10 * s[0]) << i;
  double sum = 0, sq = 0;
  for (double x : s) sum += x, sq += x * x;
  double entropy = 0;
  for (double x : s) entropy -= (x / sum) * std::log(x / sum);
  EXPECT_NEAR(spec->effective_rank, std::exp(entropy), 1e-9);
  EXPECT_NEAR(spec->stable_rank, sq / 81.0, 1e-9);
  ASSERT_EQ(spec->w_error.size(), 4u);
  EXPECT_NEAR(spec->w_error[0].second, 1.0, 1e-12);
  EXPECT_NEAR(spec->w_error[1].second, std::sqrt((sq - 81) / sq), 1e-9);
  EXPECT_NEAR(spec->w_error[2].second, std::sqrt((sq - 81 - 25 - 16) / sq), 1e-9);
  EXPECT_NEAR(spec->w_error[3].second, 0.0, 1e-7);
}

TEST(SpectrumTest, KnownRankGivesExactRanksAndZeroErrorAtTheRank) {
  // Rank 3 with equal singular values: effective rank = stable rank = 3, W-error(3) = 0,
  // W-error(r < 3) = sqrt((3 - r) / 3).
  const std::vector<double> s = {2, 2, 2, 0, 0, 0};
  ops::Tensor w = WithSpectrum(30, 6, s, 11).To(ops::DType::kF32);
  const int64_t ranks[] = {1, 2, 3};
  absl::StatusOr<HeadSpectrum> spec = ComputeHeadSpectrum(w, ranks);
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_NEAR(spec->singular_values[0], 2, 1e-5);
  EXPECT_NEAR(spec->singular_values[2], 2, 1e-5);
  EXPECT_LT(spec->singular_values[3], 1e-3);  // f32 input: zero up to the Gram route's resolution
  EXPECT_NEAR(spec->effective_rank, 3, 2e-3);
  EXPECT_NEAR(spec->stable_rank, 3, 1e-4);
  EXPECT_NEAR(spec->w_error[0].second, std::sqrt(2.0 / 3), 1e-5);
  EXPECT_NEAR(spec->w_error[1].second, std::sqrt(1.0 / 3), 1e-5);
  EXPECT_LT(spec->w_error[2].second, 1e-3);
}

TEST(SpectrumTest, OrthogonalColumnsGiveTheirNormsSorted) {
  // Columns e_{2j} * c_j (disjoint supports): σ = the column norms, sorted.
  const std::vector<double> norms = {1.5, 7, 3, 0.5};
  ops::Tensor w = ops::Tensor::Zeros({10, 4}, ops::DType::kF64);
  for (int64_t j = 0; j < 4; ++j) {
    w.Set((2 * j) * 4 + j, norms[j] * 0.6);
    w.Set((2 * j + 1) * 4 + j, norms[j] * 0.8);
  }
  absl::StatusOr<HeadSpectrum> spec = ComputeHeadSpectrum(w, {});
  ASSERT_TRUE(spec.ok()) << spec.status();
  std::vector<double> want = norms;
  std::sort(want.rbegin(), want.rend());
  for (size_t i = 0; i < want.size(); ++i) EXPECT_NEAR(spec->singular_values[i], want[i], 1e-12);
}

TEST(SpectrumTest, MatchesFloat64SvdOnARandomMatrix) {
  std::mt19937_64 rng(3);
  std::normal_distribution<double> normal;
  const int64_t v = 97, d = 13;
  ops::Tensor w = ops::Tensor::Empty({v, d}, ops::DType::kF64);
  std::vector<double> a(static_cast<size_t>(v * d));
  for (int64_t i = 0; i < v * d; ++i) {
    a[i] = normal(rng) * (1 + (i % d));  // uneven column scales
    w.Set(i, a[i]);
  }
  std::vector<double> s(d), superb(d);
  ASSERT_EQ(LAPACKE_dgesvd(LAPACK_ROW_MAJOR, 'N', 'N', v, d, a.data(), d, s.data(), nullptr, 1, nullptr, 1,
                           superb.data()),
            0);
  absl::StatusOr<HeadSpectrum> spec = ComputeHeadSpectrum(w, {});
  ASSERT_TRUE(spec.ok()) << spec.status();
  for (int64_t i = 0; i < d; ++i) EXPECT_NEAR(spec->singular_values[i], s[i], 1e-9 * s[0]) << i;
}

TEST(SpectrumTest, RejectsBadRanks) {
  ops::Tensor w = ops::Tensor::Full({5, 3}, ops::DType::kF32, 1.0);
  const int64_t ranks[] = {4};
  absl::StatusOr<HeadSpectrum> spec = ComputeHeadSpectrum(w, ranks);
  ASSERT_FALSE(spec.ok());
  EXPECT_NE(spec.status().message().find("rank 4"), std::string::npos) << spec.status();
}

TEST(AnisotropyTest, ClosedForms) {
  // Identical directions (different lengths): 1.
  std::vector<double> same = {1, 2, 0, 2, 4, 0, 0.5, 1, 0};
  EXPECT_NEAR(*Anisotropy(same, 1, 3, 3), 1.0, 1e-12);
  // Orthogonal: 0.
  std::vector<double> ortho = {3, 0, 0, 0, 1, 0, 0, 0, 2};
  EXPECT_NEAR(*Anisotropy(ortho, 1, 3, 3), 0.0, 1e-12);
  // Two sequences: {h, -h} (cos -1) and {e1, e1} (cos 1): mean over the two pairs = 0.
  std::vector<double> two = {1, 1, -1, -1, 1, 0, 2, 0};
  EXPECT_NEAR(*Anisotropy(two, 2, 2, 2), 0.0, 1e-12);
  // Pairs across sequences do not count: seq A = {e1, e1}, seq B = {e2, e2}: 1 (cross pairs are 0).
  std::vector<double> cross = {1, 0, 1, 0, 0, 1, 0, 1};
  EXPECT_NEAR(*Anisotropy(cross, 2, 2, 2), 1.0, 1e-12);
  EXPECT_FALSE(Anisotropy(std::vector<double>{0, 0, 1, 0}, 1, 2, 2).ok());  // zero vector
}

TEST(AnisotropyTest, MatchesBruteForcePairs) {
  std::mt19937_64 rng(5);
  std::normal_distribution<double> normal;
  const int64_t b = 3, t = 7, d = 5;
  std::vector<double> h(b * t * d);
  for (double& x : h) x = normal(rng) + 0.7;  // a shared offset makes them anisotropic
  double total = 0;
  int64_t pairs = 0;
  for (int64_t s = 0; s < b; ++s)
    for (int64_t i = 0; i < t; ++i)
      for (int64_t j = i + 1; j < t; ++j) {
        const double* x = &h[(s * t + i) * d];
        const double* y = &h[(s * t + j) * d];
        double xy = 0, xx = 0, yy = 0;
        for (int64_t k = 0; k < d; ++k) xy += x[k] * y[k], xx += x[k] * x[k], yy += y[k] * y[k];
        total += xy / std::sqrt(xx * yy);
        ++pairs;
      }
  EXPECT_NEAR(*Anisotropy(h, b, t, d), total / pairs, 1e-12);
}

TEST(RecoverHiddenStatesTest, InvertsTheHead) {
  std::mt19937_64 rng(9);
  std::normal_distribution<double> normal;
  const int64_t v = 31, d = 6, n = 4;
  ops::Tensor w = ops::Tensor::Empty({v, d}, ops::DType::kF64);
  for (int64_t i = 0; i < v * d; ++i) w.Set(i, normal(rng));
  std::vector<double> h(n * d);
  for (double& x : h) x = normal(rng);
  ops::Tensor z = ops::Tensor::Zeros({n, v}, ops::DType::kF64);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t r = 0; r < v; ++r) {
      double acc = 0;
      for (int64_t k = 0; k < d; ++k) acc += w.At(r * d + k) * h[i * d + k];
      z.Set(i * v + r, acc);
    }
  absl::StatusOr<std::vector<double>> got = RecoverHiddenStates(z, w);
  ASSERT_TRUE(got.ok()) << got.status();
  for (int64_t i = 0; i < n * d; ++i) EXPECT_NEAR((*got)[i], h[i], 1e-9) << i;
}

TEST(UndoRmsNormScaleTest, RecoversTheResidualDirection) {
  std::mt19937_64 rng(2);
  std::normal_distribution<double> normal;
  const int64_t n = 5, d = 4;
  ops::Tensor w = ops::Tensor::Empty({d}, ops::DType::kF32);
  for (int64_t j = 0; j < d; ++j) w.Set(j, 0.5 + j);  // uneven scales change cosines
  std::vector<double> x(n * d), y(n * d);
  for (double& v : x) v = normal(rng) + 1.0;
  for (int64_t i = 0; i < n; ++i) {
    double ms = 0;
    for (int64_t j = 0; j < d; ++j) ms += x[i * d + j] * x[i * d + j];
    for (int64_t j = 0; j < d; ++j) y[i * d + j] = x[i * d + j] / std::sqrt(ms / d + 1e-5) * w.At(j);
  }
  absl::StatusOr<std::vector<double>> back = UndoRmsNormScale(y, w);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_NEAR(*Anisotropy(*back, 1, n, d), *Anisotropy(x, 1, n, d), 1e-12);
  EXPECT_GT(std::abs(*Anisotropy(y, 1, n, d) - *Anisotropy(x, 1, n, d)), 1e-3);  // the scale matters
  w.Set(2, 0.0);
  EXPECT_FALSE(UndoRmsNormScale(y, w).ok());
}

TEST(RecoverHiddenStatesTest, RefusesARankDeficientHead) {
  ops::Tensor w = WithSpectrum(12, 4, {3, 2, 1, 0}, 1);
  ops::Tensor z = ops::Tensor::Zeros({2, 12}, ops::DType::kF64);
  absl::StatusOr<std::vector<double>> got = RecoverHiddenStates(z, w);
  ASSERT_FALSE(got.ok());
  EXPECT_NE(got.status().message().find("singular"), std::string::npos) << got.status();
}

}  // namespace
}  // namespace gyre::eval
