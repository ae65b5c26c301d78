// Needs a GPU: fused RMSNorm / LayerNorm (+ residual) forward and backward against a float64
// reference on the same bf16 inputs; vector (d % 8 == 0) and scalar (odd d) paths; the weight
// gradient accumulates onto a nonzero buffer and is bitwise deterministic across runs, and with
// accumulate = false overwrites a NaN-poisoned one.
#include "kernels/cuda/norm.h"

#include <cmath>
#include <cstring>
#include <string>

#include "gtest/gtest.h"
#include "kernels/cuda/gpu_test_util.h"

namespace gyre::cuda {
namespace {

using testing::DeviceArray;
using testing::RandomBf16Values;
using testing::RandomFloats;
using testing::RelError;
using testing::Report;
using testing::RoundBf16;
using bf16 = __nv_bfloat16;

struct Case {
  NormKind kind;
  int64_t rows, dim;
  bool residual, weight, bias, dresidual;
};

std::string Name(const Case& c) {
  return std::string(c.kind == NormKind::kRms ? "rmsnorm" : "layernorm") +
         (c.residual ? "+res" : "") + (c.bias ? "+bias" : "") + (c.weight ? "" : " no-w") +
         (c.dresidual ? "+dres" : "");
}
std::string ShapeName(const Case& c) {
  return "rows=" + std::to_string(c.rows) + " d=" + std::to_string(c.dim);
}

void RunCase(const Case& c, std::mt19937_64& rng) {
  DeviceAllocator alloc;
  const int64_t n = c.rows * c.dim;
  const float eps = 1e-5f;
  const auto x = RandomBf16Values(rng, n, 1.5f, 0.3f);
  const auto res = RandomBf16Values(rng, n, 1.0f);
  const auto w = RandomBf16Values(rng, c.dim, 0.2f, 1.0f);
  const auto b = RandomBf16Values(rng, c.dim, 0.2f);
  const auto dyv = RandomBf16Values(rng, n);
  const auto dres = RandomBf16Values(rng, n, 0.5f);
  const auto dw0 = RandomFloats(rng, c.dim);
  const auto db0 = RandomFloats(rng, c.dim);

  DeviceArray<bf16> d_x(&alloc, n), d_res(&alloc, n), d_sout(&alloc, n), d_w(&alloc, c.dim),
      d_b(&alloc, c.dim), d_y(&alloc, n), d_dy(&alloc, n), d_dres(&alloc, n), d_dx(&alloc, n);
  DeviceArray<float> d_mean(&alloc, c.rows), d_rstd(&alloc, c.rows), d_dw(&alloc, c.dim),
      d_db(&alloc, c.dim);
  d_x.Upload(x);
  d_res.Upload(res);
  d_w.Upload(w);
  d_b.Upload(b);
  d_dy.Upload(dyv);
  d_dres.Upload(dres);
  d_dw.Upload(dw0);
  d_db.Upload(db0);
  d_sout.Poison();
  d_y.Poison();
  d_mean.Poison();
  d_rstd.Poison();
  d_dx.Poison();

  const bool layer = c.kind == NormKind::kLayer;
  NormForwardArgs f;
  f.kind = c.kind;
  f.rows = c.rows;
  f.dim = c.dim;
  f.eps = eps;
  f.x = d_x.get();
  f.residual = c.residual ? d_res.get() : nullptr;
  f.residual_out = c.residual ? d_sout.get() : nullptr;
  f.weight = c.weight ? d_w.get() : nullptr;
  f.bias = c.bias ? d_b.get() : nullptr;
  f.y = d_y.get();
  f.mean = layer ? d_mean.get() : nullptr;
  f.rstd = d_rstd.get();
  CudaResult r = NormForward(f, nullptr);
  ASSERT_TRUE(r.ok()) << r.message;

  NormBackwardArgs g;
  g.kind = c.kind;
  g.rows = c.rows;
  g.dim = c.dim;
  g.dy = d_dy.get();
  g.s = c.residual ? d_sout.get() : d_x.get();
  g.weight = f.weight;
  g.mean = f.mean;
  g.rstd = d_rstd.get();
  g.dresidual = c.dresidual ? d_dres.get() : nullptr;
  g.dx = d_dx.get();
  g.dweight = c.weight ? d_dw.get() : nullptr;
  g.dbias = c.bias ? d_db.get() : nullptr;
  r = NormBackward(g, &alloc, nullptr);
  ASSERT_TRUE(r.ok()) << r.message;
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);

  // float64 reference.
  std::vector<double> s(n), y(n), mean_ref(c.rows), rstd_ref(c.rows), dx(n), dw(c.dim, 0.0),
      db(c.dim, 0.0);
  for (int64_t i = 0; i < n; ++i) s[i] = c.residual ? RoundBf16(x[i] + res[i]) : x[i];
  for (int64_t row = 0; row < c.rows; ++row) {
    const double* sr = &s[row * c.dim];
    double mean = 0;
    if (layer) {
      for (int64_t j = 0; j < c.dim; ++j) mean += sr[j];
      mean /= c.dim;
    }
    double var = 0;
    for (int64_t j = 0; j < c.dim; ++j) var += (sr[j] - mean) * (sr[j] - mean);
    const double rstd = 1.0 / std::sqrt(var / c.dim + eps);
    mean_ref[row] = mean;
    rstd_ref[row] = rstd;
    double sum_g = 0, sum_gx = 0;
    for (int64_t j = 0; j < c.dim; ++j) {
      const double wj = c.weight ? w[j] : 1.0;
      const double xhat = (sr[j] - mean) * rstd;
      y[row * c.dim + j] = xhat * wj + (c.bias ? b[j] : 0.0);
      const double gj = dyv[row * c.dim + j] * wj;
      sum_g += gj;
      sum_gx += gj * xhat;
      dw[j] += dyv[row * c.dim + j] * xhat;
      db[j] += dyv[row * c.dim + j];
    }
    const double m1 = layer ? sum_g / c.dim : 0.0, m2 = sum_gx / c.dim;
    for (int64_t j = 0; j < c.dim; ++j) {
      const double wj = c.weight ? w[j] : 1.0;
      const double xhat = (sr[j] - mean) * rstd;
      dx[row * c.dim + j] = rstd * (dyv[row * c.dim + j] * wj - m1 - xhat * m2) +
                            (c.dresidual ? dres[row * c.dim + j] : 0.0);
    }
  }
  const std::string name = Name(c), shape = ShapeName(c);
  EXPECT_TRUE(Report(name + " fwd y", shape, RelError(d_y.Download(), y), testing::kTolBf16));
  EXPECT_TRUE(Report(name + " fwd rstd", shape, RelError(d_rstd.Download(), rstd_ref), testing::kTolF32));
  if (layer) {
    EXPECT_TRUE(Report(name + " fwd mean", shape, RelError(d_mean.Download(), mean_ref), testing::kTolF32));
  }
  if (c.residual) {
    // x + residual rounded once to bf16 on both sides: identical.
    EXPECT_TRUE(Report(name + " fwd residual_out", shape, RelError(d_sout.Download(), s), 1e-7));
  }
  EXPECT_TRUE(Report(name + " bwd dx", shape, RelError(d_dx.Download(), dx), testing::kTolBf16));
  if (c.weight) {
    std::vector<double> inc(c.dim);
    std::vector<float> got = d_dw.Download(), got_inc(c.dim);
    for (int64_t j = 0; j < c.dim; ++j) {
      inc[j] = dw[j];
      got_inc[j] = static_cast<float>(double(got[j]) - dw0[j]);
    }
    EXPECT_TRUE(Report(name + " bwd dw (increment)", shape, RelError(got_inc, inc), testing::kTolF32Accum));
  }
  if (c.bias) {
    std::vector<float> got = d_db.Download(), got_inc(c.dim);
    for (int64_t j = 0; j < c.dim; ++j) got_inc[j] = static_cast<float>(double(got[j]) - db0[j]);
    EXPECT_TRUE(Report(name + " bwd db (increment)", shape, RelError(got_inc, db), testing::kTolF32Accum));
  }
  // Determinism: the same backward again from the same dw0 gives the same bits.
  if (c.weight) {
    const std::vector<float> first = d_dw.Download();
    d_dw.Upload(dw0);
    d_dx.Poison();
    r = NormBackward(g, &alloc, nullptr);
    ASSERT_TRUE(r.ok()) << r.message;
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const std::vector<float> second = d_dw.Download();
    EXPECT_EQ(0, std::memcmp(first.data(), second.data(), first.size() * sizeof(float)))
        << name << " dw not bitwise reproducible";
  }
  // accumulate = false (the deferred-zero rule's first write, ops/module.h): dw and db are
  // overwritten, never read (NaN-poisoned here), and equal the column sums alone.
  if (c.weight || c.bias) {
    d_dw.Poison();
    d_db.Poison();
    d_dx.Poison();
    g.accumulate = false;
    r = NormBackward(g, &alloc, nullptr);
    ASSERT_TRUE(r.ok()) << r.message;
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    if (c.weight) {
      EXPECT_TRUE(Report(name + " bwd dw (overwrite)", shape, RelError(d_dw.Download(), dw), testing::kTolF32Accum));
    }
    if (c.bias) {
      EXPECT_TRUE(Report(name + " bwd db (overwrite)", shape, RelError(d_db.Download(), db), testing::kTolF32Accum));
    }
    EXPECT_TRUE(Report(name + " bwd dx (overwrite mode)", shape, RelError(d_dx.Download(), dx), testing::kTolBf16));
  }
}

TEST(NormGpuTest, MatchesFloat64AcrossShapesAndOptions) {
  std::mt19937_64 rng(99);
  const std::vector<std::pair<int64_t, int64_t>> shapes = {
      {1, 768}, {37, 771}, {1000, 2048}, {333, 5}, {2049, 768}, {17, 4100},
      // RMSNorm's one-pass backward (d % 8 == 0, d <= 2048): a partial last vector per lane
      // (1032 = 4 x 256 + 8), the largest d, one vector per row (d = 8), rows not a multiple
      // of the row block; d = 2056 takes the three-kernel path. Rows per block are 32 below
      // 512 x 64 rows and 64 from there (32777 x 768: llama-125m's width, the prefetching
      // kernel, a partial last block); 300 x 1024: four full vectors per lane (the branch-free form).
      {70, 1032}, {5, 2040}, {129, 8}, {65, 2056}, {32777, 768}, {300, 1024}};
  for (auto [rows, dim] : shapes) {
    for (NormKind kind : {NormKind::kRms, NormKind::kLayer}) {
      for (bool residual : {false, true}) {
        Case c{kind, rows, dim, residual, true, kind == NormKind::kLayer, residual};
        RunCase(c, rng);
      }
    }
  }
  // No learnable scale.
  RunCase({NormKind::kRms, 100, 96, false, false, false, false}, rng);
  RunCase({NormKind::kLayer, 100, 97, true, false, false, true}, rng);
}

// The one-pass RMSNorm backward's __restrict__ pointers: dx over dy, s or dresidual is an error
// (nothing in ops/ does that: its dx is a fresh tensor), not silently wrong output.
TEST(NormGpuTest, RejectsDxOverlappingInputs) {
  DeviceAllocator alloc;
  std::mt19937_64 rng(7);
  const int64_t rows = 4, dim = 768, n = rows * dim;
  DeviceArray<bf16> d_dy(&alloc, n), d_s(&alloc, n), d_dres(&alloc, n), d_dx(&alloc, n);
  DeviceArray<float> d_rstd(&alloc, rows);
  d_dy.Upload(RandomBf16Values(rng, n));
  d_s.Upload(RandomBf16Values(rng, n));
  d_dres.Upload(RandomBf16Values(rng, n));
  d_rstd.Upload(RandomFloats(rng, rows));
  NormBackwardArgs g;
  g.rows = rows;
  g.dim = dim;
  g.dy = d_dy.get();
  g.s = d_s.get();
  g.rstd = d_rstd.get();
  g.dresidual = d_dres.get();
  g.dx = d_dx.get();
  EXPECT_TRUE(NormBackward(g, &alloc, nullptr).ok());
  for (bf16* alias : {d_dy.get(), d_s.get(), d_dres.get() + dim}) {
    g.dx = alias;
    const CudaResult r = NormBackward(g, &alloc, nullptr);
    EXPECT_FALSE(r.ok());
    EXPECT_NE(r.message.find("overlaps"), std::string::npos) << r.message;
  }
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
}

TEST(NormGpuTest, RejectsInconsistentArguments) {
  NormForwardArgs f;
  f.rows = 4;
  f.dim = 8;
  EXPECT_FALSE(NormForward(f, nullptr).ok());  // no x / y / rstd
}

}  // namespace
}  // namespace gyre::cuda
