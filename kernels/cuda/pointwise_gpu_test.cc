// Needs a GPU: embedding (forward gather, deterministic backward), SiLU/GeLU and their gated
// forms (SwiGLU / GeGLU), and RoPE, forward and backward, against float64 references on the same
// bf16 inputs; odd sizes take the scalar paths, multiples of 8 the 16-byte paths.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>

#include "gtest/gtest.h"
#include "kernels/cuda/activations.h"
#include "kernels/cuda/embedding.h"
#include "kernels/cuda/gpu_test_util.h"
#include "kernels/cuda/rope.h"

namespace gyre::cuda {
namespace {

using testing::DeviceArray;
using testing::RandomBf16Values;
using testing::RandomFloats;
using testing::RelError;
using testing::Report;
using bf16 = __nv_bfloat16;

// ---------------------------------------------------------------- embedding

TEST(EmbeddingGpuTest, ForwardGatherAndDeterministicBackward) {
  std::mt19937_64 rng(5);
  struct C { int64_t rows, vocab, dim; };
  for (const C& c : {C{1000, 50257, 768}, C{4099, 1001, 771}, C{1, 50277, 64}}) {
    DeviceAllocator alloc;
    const std::string shape = "rows=" + std::to_string(c.rows) + " V=" + std::to_string(c.vocab) +
                              " d=" + std::to_string(c.dim);
    // Half the tokens from a small hot set, so ids repeat many times (the case that needs a
    // careful reduction); the rest uniform.
    std::vector<int32_t> ids(c.rows);
    for (int64_t r = 0; r < c.rows; ++r) {
      ids[r] = (rng() % 2) ? static_cast<int32_t>(rng() % 7) : static_cast<int32_t>(rng() % c.vocab);
    }
    const auto table = RandomBf16Values(rng, c.vocab * c.dim);
    const auto dyv = RandomBf16Values(rng, c.rows * c.dim);
    const auto dw0 = RandomFloats(rng, c.vocab * c.dim);
    DeviceArray<int32_t> d_ids(&alloc, c.rows);
    std::vector<float> ids_f(ids.begin(), ids.end());
    d_ids.Upload(ids_f);
    DeviceArray<bf16> d_table(&alloc, table.size()), d_out(&alloc, c.rows * c.dim), d_dy(&alloc, dyv.size());
    DeviceArray<float> d_dw(&alloc, dw0.size());
    DeviceArray<int> d_bad(&alloc, 1);
    d_table.Upload(table);
    d_dy.Upload(dyv);
    d_dw.Upload(dw0);
    d_bad.Upload({0.f});
    d_out.Poison();
    CudaResult r = EmbeddingForward(d_ids.get(), d_table.get(), d_out.get(), c.rows, c.vocab, c.dim,
                                    d_bad.get(), nullptr);
    ASSERT_TRUE(r.ok()) << r.message;
    EmbeddingBackwardPlan plan;
    r = plan.Build(ids.data(), c.rows, c.vocab, &alloc, nullptr);
    ASSERT_TRUE(r.ok()) << r.message;
    r = EmbeddingBackward(plan, d_dy.get(), d_dw.get(), c.dim, /*overwrite=*/false, nullptr);
    ASSERT_TRUE(r.ok()) << r.message;
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);

    std::vector<double> out_ref(c.rows * c.dim), inc_ref(c.vocab * c.dim, 0.0);
    for (int64_t row = 0; row < c.rows; ++row) {
      for (int64_t j = 0; j < c.dim; ++j) {
        out_ref[row * c.dim + j] = table[ids[row] * c.dim + j];
        inc_ref[ids[row] * c.dim + j] += dyv[row * c.dim + j];
      }
    }
    const auto got_dw = d_dw.Download();
    std::vector<float> got_inc(got_dw.size());
    for (size_t i = 0; i < got_dw.size(); ++i) got_inc[i] = static_cast<float>(double(got_dw[i]) - dw0[i]);
    EXPECT_TRUE(Report("embedding fwd (exact copy)", shape, RelError(d_out.Download(), out_ref), 0.0));
    EXPECT_EQ(d_bad.Download()[0], 0.f);
    EXPECT_TRUE(Report("embedding bwd dW (increment)", shape, RelError(got_inc, inc_ref), testing::kTolF32));
    // Same plan, same dy, same dw0: same bits.
    d_dw.Upload(dw0);
    r = EmbeddingBackward(plan, d_dy.get(), d_dw.get(), c.dim, /*overwrite=*/false, nullptr);
    ASSERT_TRUE(r.ok()) << r.message;
    const auto again = d_dw.Download();
    EXPECT_EQ(0, std::memcmp(again.data(), got_dw.data(), got_dw.size() * sizeof(float)))
        << "embedding backward not bitwise reproducible";
    // Overwrite (the deferred-zero first write): dW = the sums, unseen rows 0, the NaN-poisoned
    // old contents never read.
    d_dw.Poison();
    r = EmbeddingBackward(plan, d_dy.get(), d_dw.get(), c.dim, /*overwrite=*/true, nullptr);
    ASSERT_TRUE(r.ok()) << r.message;
    EXPECT_TRUE(Report("embedding bwd dW (overwrite)", shape, RelError(d_dw.Download(), inc_ref), testing::kTolF32));
  }
}

TEST(EmbeddingGpuTest, OutOfRangeIdsAreCountedAndRejected) {
  DeviceAllocator alloc;
  const int64_t vocab = 100, dim = 16;
  std::vector<int32_t> ids = {3, -1, 100, 7};
  DeviceArray<int32_t> d_ids(&alloc, ids.size());
  d_ids.Upload(std::vector<float>(ids.begin(), ids.end()));
  std::mt19937_64 rng(6);
  DeviceArray<bf16> d_table(&alloc, vocab * dim), d_out(&alloc, ids.size() * dim);
  d_table.Upload(RandomBf16Values(rng, vocab * dim));
  d_out.Poison();
  DeviceArray<int> d_bad(&alloc, 1);
  d_bad.Upload({0.f});
  ASSERT_TRUE(EmbeddingForward(d_ids.get(), d_table.get(), d_out.get(), ids.size(), vocab, dim,
                               d_bad.get(), nullptr).ok());
  EXPECT_EQ(d_bad.Download()[0], 2.f);
  const auto out = d_out.Download();
  for (int64_t j = 0; j < dim; ++j) {
    EXPECT_EQ(out[1 * dim + j], 0.f);
    EXPECT_EQ(out[2 * dim + j], 0.f);
  }
  EmbeddingBackwardPlan plan;
  CudaResult r = plan.Build(ids.data(), ids.size(), vocab, &alloc, nullptr);
  EXPECT_FALSE(r.ok());
  std::printf("[INFO] bad id: %s\n", r.message.c_str());
}

// ---------------------------------------------------------------- activations

double ActRef(ActKind a, double x) {
  if (a == ActKind::kSilu) return x / (1 + std::exp(-x));
  return 0.5 * x * (1 + std::erf(x / std::sqrt(2.0)));
}
double ActGradRef(ActKind a, double x) {
  if (a == ActKind::kSilu) {
    const double s = 1 / (1 + std::exp(-x));
    return s * (1 + x * (1 - s));
  }
  return 0.5 * (1 + std::erf(x / std::sqrt(2.0))) + x * std::exp(-0.5 * x * x) / std::sqrt(2 * M_PI);
}

TEST(ActivationGpuTest, PlainForwardBackward) {
  std::mt19937_64 rng(7);
  for (int64_t n : {int64_t{1000003}, int64_t{1} << 20, int64_t{7}}) {
    for (ActKind a : {ActKind::kSilu, ActKind::kGelu}) {
      DeviceAllocator alloc;
      const auto x = RandomBf16Values(rng, n, 2.f);
      const auto dy = RandomBf16Values(rng, n);
      DeviceArray<bf16> d_x(&alloc, n), d_dy(&alloc, n), d_y(&alloc, n), d_dx(&alloc, n);
      d_x.Upload(x);
      d_dy.Upload(dy);
      d_y.Poison();
      d_dx.Poison();
      ASSERT_TRUE(ActivationForward(a, d_x.get(), d_y.get(), n, nullptr).ok());
      ASSERT_TRUE(ActivationBackward(a, d_x.get(), d_dy.get(), d_dx.get(), n, nullptr).ok());
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      std::vector<double> y(n), dx(n);
      for (int64_t i = 0; i < n; ++i) {
        y[i] = ActRef(a, x[i]);
        dx[i] = dy[i] * ActGradRef(a, x[i]);
      }
      const std::string name = a == ActKind::kSilu ? "silu" : "gelu";
      const std::string shape = "n=" + std::to_string(n);
      EXPECT_TRUE(Report(name + " fwd", shape, RelError(d_y.Download(), y), testing::kTolBf16));
      EXPECT_TRUE(Report(name + " bwd", shape, RelError(d_dx.Download(), dx), testing::kTolBf16));
    }
  }
}

TEST(ActivationGpuTest, GatedForwardBackwardOnFusedAndSeparateLayouts) {
  std::mt19937_64 rng(8);
  struct C { int64_t rows, cols; bool fused; };
  for (const C& c : {C{512, 2048, true}, C{333, 1001, true}, C{77, 5504, false}, C{3, 13, false}}) {
    for (ActKind a : {ActKind::kSilu, ActKind::kGelu}) {
      DeviceAllocator alloc;
      const int64_t ld_in = c.fused ? 2 * c.cols : c.cols;
      const auto gu = RandomBf16Values(rng, c.rows * ld_in * (c.fused ? 1 : 2), 2.f);
      const auto dh = RandomBf16Values(rng, c.rows * c.cols);
      DeviceArray<bf16> d_gu(&alloc, gu.size()), d_h(&alloc, c.rows * c.cols), d_dh(&alloc, dh.size()),
          d_dgu(&alloc, gu.size());
      d_gu.Upload(gu);
      d_dh.Upload(dh);
      d_h.Poison();
      d_dgu.Poison();
      const int64_t u_off = c.fused ? c.cols : c.rows * c.cols;  // where u starts
      GatedArgs g;
      g.act = a;
      g.rows = c.rows;
      g.cols = c.cols;
      g.g = d_gu.get();
      g.u = d_gu.get() + u_off;
      g.ld_in = ld_in;
      g.h = d_h.get();
      g.dh = d_dh.get();
      g.dg = d_dgu.get();
      g.du = d_dgu.get() + u_off;
      g.ld_out = c.cols;
      ASSERT_TRUE(GatedForward(g, nullptr).ok());
      ASSERT_TRUE(GatedBackward(g, nullptr).ok());
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      std::vector<double> h(c.rows * c.cols), dgu(gu.size());
      for (int64_t r = 0; r < c.rows; ++r) {
        for (int64_t j = 0; j < c.cols; ++j) {
          const int64_t gi = r * ld_in + j, ui = u_off + r * ld_in + j, hi = r * c.cols + j;
          h[hi] = ActRef(a, gu[gi]) * gu[ui];
          dgu[gi] = dh[hi] * gu[ui] * ActGradRef(a, gu[gi]);
          dgu[ui] = dh[hi] * ActRef(a, gu[gi]);
        }
      }
      const std::string name = std::string(a == ActKind::kSilu ? "swiglu" : "geglu") + (c.fused ? " fused-gu" : "");
      const std::string shape = "rows=" + std::to_string(c.rows) + " cols=" + std::to_string(c.cols);
      EXPECT_TRUE(Report(name + " fwd h", shape, RelError(d_h.Download(), h), testing::kTolBf16));
      EXPECT_TRUE(Report(name + " bwd dg,du", shape, RelError(d_dgu.Download(), dgu), testing::kTolBf16));
    }
  }
}

// ---------------------------------------------------------------- RoPE

TEST(RopeGpuTest, ForwardBackwardMatchFloat64) {
  std::mt19937_64 rng(9);
  struct C { int64_t batch, seq, heads, head_dim, extra_stride; bool positions, in_place; };
  for (const C& c : {C{3, 257, 5, 64, 0, false, false}, C{2, 100, 4, 128, 3 * 4 * 128, true, false},
                     C{1, 33, 3, 65, 7, false, true}, C{4, 2048, 2, 128, 0, false, false},
                     // Vector path: D = 80 (5 vectors per half), strided, positions, in place;
                     // D = 16 (one vector); then a row stride that is not a multiple of 8 (the
                     // scalar fallback for a vectorisable D).
                     C{3, 129, 7, 80, 8, true, true}, C{2, 31, 5, 16, 0, false, false},
                     C{2, 50, 3, 64, 3, false, false}}) {
    DeviceAllocator alloc;
    const double theta = 10000.0;
    const int64_t rows = c.batch * c.seq, width = c.heads * c.head_dim;
    const int64_t stride = width + c.extra_stride;
    const int64_t max_pos = 4096;
    RopeTable table;
    ASSERT_TRUE(BuildRopeTable(max_pos, c.head_dim, theta, &alloc, &table).ok());
    std::vector<int32_t> pos(c.seq);
    for (int64_t t = 0; t < c.seq; ++t) pos[t] = c.positions ? static_cast<int32_t>(rng() % max_pos) : t;
    const auto x = RandomBf16Values(rng, rows * stride);
    const auto dy = RandomBf16Values(rng, rows * stride);
    DeviceArray<bf16> d_x(&alloc, x.size()), d_y(&alloc, x.size()), d_dy(&alloc, dy.size()),
        d_dx(&alloc, dy.size());
    DeviceArray<int32_t> d_pos(&alloc, c.seq);
    d_pos.Upload(std::vector<float>(pos.begin(), pos.end()));
    d_x.Upload(x);
    d_dy.Upload(dy);
    d_y.Poison();
    d_dx.Poison();
    RopeArgs f;
    f.x = d_x.get();
    f.y = c.in_place ? d_x.get() : d_y.get();
    f.rows = rows;
    f.seq = c.seq;
    f.heads = c.heads;
    f.row_stride = stride;
    f.positions = c.positions ? d_pos.get() : nullptr;
    RopeArgs b = f;
    b.x = d_dy.get();
    b.y = c.in_place ? d_dy.get() : d_dx.get();
    ASSERT_TRUE(RopeForward(table, f, nullptr).ok());
    ASSERT_TRUE(RopeBackward(table, b, nullptr).ok());
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const int64_t half = c.head_dim / 2;
    std::vector<double> y_ref, dx_ref;
    std::vector<float> y_got, dx_got;
    const auto y_all = c.in_place ? d_x.Download() : d_y.Download();
    const auto dx_all = c.in_place ? d_dy.Download() : d_dx.Download();
    for (int64_t r = 0; r < rows; ++r) {
      const double p = pos[r % c.seq];
      for (int64_t h = 0; h < c.heads; ++h) {
        const int64_t base = r * stride + h * c.head_dim;
        for (int64_t i = 0; i < c.head_dim; ++i) {
          double yv, dv;
          if (i < 2 * half) {
            const int64_t k = i % half;
            const double ang = p * std::pow(theta, -2.0 * k / c.head_dim);
            const double co = std::cos(ang), si = std::sin(ang);
            const double x1 = x[base + k], x2 = x[base + k + half];
            const double g1 = dy[base + k], g2 = dy[base + k + half];
            yv = i < half ? x1 * co - x2 * si : x2 * co + x1 * si;
            dv = i < half ? g1 * co + g2 * si : g2 * co - g1 * si;
          } else {
            yv = x[base + i];
            dv = dy[base + i];
          }
          y_ref.push_back(yv);
          dx_ref.push_back(dv);
          y_got.push_back(y_all[base + i]);
          dx_got.push_back(dx_all[base + i]);
        }
      }
    }
    const std::string shape = "B=" + std::to_string(c.batch) + " T=" + std::to_string(c.seq) +
                              " H=" + std::to_string(c.heads) + " D=" + std::to_string(c.head_dim);
    const std::string name = std::string("rope") + (c.positions ? " pos[]" : "") +
                             (c.extra_stride ? " strided" : "") + (c.in_place ? " in-place" : "");
    EXPECT_TRUE(Report(name + " fwd", shape, RelError(y_got, y_ref), testing::kTolBf16));
    EXPECT_TRUE(Report(name + " bwd", shape, RelError(dx_got, dx_ref), testing::kTolBf16));
  }
}

// The table must be complete when BuildRopeTable returns, also for a kernel on a stream that
// does not synchronise with the legacy default stream (the backend's stream is created
// cudaStreamNonBlocking). The old plain pageable cudaMemcpy is documented to return with its last
// DMA possibly still in flight (helper det22, session 22; kernels/cuda/attention_notes.md). The
// block the table will get is filled with NaN first (allocated from the same allocator at the
// table's size, set, freed: the allocator hands the same block back, LIFO per class), so a RoPE
// that beats the copy writes NaN. A 16 MiB table (32768 positions x D 128) read right after the
// build on a non-blocking stream; a different theta each trial, so a table left from an earlier
// trial can never pass for the new one.
TEST(RopeGpuTest, TableIsCompleteForANonBlockingStreamRightAway) {
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  const int64_t positions = 32768, head_dim = 128, half = head_dim / 2;
  std::mt19937_64 rng(11);
  const auto x = RandomBf16Values(rng, positions * head_dim);
  DeviceAllocator alloc;
  DeviceArray<bf16> d_x(&alloc, x.size()), d_y(&alloc, x.size());
  d_x.Upload(x);
  constexpr int kTrials = 6;
  int bad_trials = 0;
  for (int trial = 0; trial < kTrials; ++trial) {
    const double theta = 10000.0 + 1000.0 * trial;
    {
      DeviceBuffer poison;  // the block the table gets next (same class, last freed)
      ASSERT_TRUE(alloc.Allocate(sizeof(float) * 2 * positions * half, &poison).ok());
      ASSERT_EQ(cudaMemset(poison.get(), 0xFF, poison.bytes()), cudaSuccess);
    }
    d_y.Poison();
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);  // x, y and the poison are in place
    RopeTable table;
    const CudaResult br = BuildRopeTable(positions, head_dim, theta, &alloc, &table);
    ASSERT_TRUE(br.ok()) << br.message;
    RopeArgs f;  // launched the moment the build returns, as the backend's first RoPE is
    f.x = d_x.get();
    f.y = d_y.get();
    f.rows = positions;
    f.seq = positions;
    f.heads = 1;
    f.row_stride = head_dim;
    ASSERT_TRUE(RopeForward(table, f, stream).ok());
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    const auto y = d_y.Download();
    int64_t bad_rows = 0, first_bad = -1, nonfinite = 0;
    for (int64_t p = 0; p < positions; ++p) {
      bool bad = false;
      for (int64_t k = 0; k < half; ++k) {
        const double ang = static_cast<double>(p) * std::pow(theta, -2.0 * k / head_dim);
        const double co = std::cos(ang), si = std::sin(ang);
        const double x1 = x[p * head_dim + k], x2 = x[p * head_dim + k + half];
        const double want[2] = {x1 * co - x2 * si, x2 * co + x1 * si};
        const double got[2] = {y[p * head_dim + k], y[p * head_dim + k + half]};
        for (int e = 0; e < 2; ++e) {
          nonfinite += std::isfinite(got[e]) ? 0 : 1;
          bad |= !(std::fabs(got[e] - want[e]) <= 1e-2 * std::max(1.0, std::fabs(want[e])));
        }
      }
      if (bad && first_bad < 0) first_bad = p;
      bad_rows += bad ? 1 : 0;
    }
    std::printf("  rope table 32768 x D128, trial %d (theta %.0f): %lld of %lld rows wrong (%lld non-finite), "
                "first wrong position %lld\n",
                trial, theta, (long long)bad_rows, (long long)positions, (long long)nonfinite, (long long)first_bad);
    bad_trials += bad_rows > 0 ? 1 : 0;
  }
  cudaStreamDestroy(stream);
  EXPECT_EQ(bad_trials, 0) << "a RoPE launched right after BuildRopeTable read a table that had not landed";
}

TEST(RopeGpuTest, PositionOutsideTableWritesNaN) {
  DeviceAllocator alloc;
  RopeTable table;
  ASSERT_TRUE(BuildRopeTable(16, 8, 10000.0, &alloc, &table).ok());
  DeviceArray<int32_t> d_pos(&alloc, 2);
  d_pos.Upload({3.f, 16.f});
  std::mt19937_64 rng(10);
  DeviceArray<bf16> d_x(&alloc, 16), d_y(&alloc, 16);
  d_x.Upload(RandomBf16Values(rng, 16));
  RopeArgs a;
  a.x = d_x.get();
  a.y = d_y.get();
  a.rows = 2;
  a.seq = 2;
  a.heads = 1;
  a.row_stride = 8;
  a.positions = d_pos.get();
  ASSERT_TRUE(RopeForward(table, a, nullptr).ok());
  const auto y = d_y.Download();
  for (int i = 0; i < 8; ++i) EXPECT_TRUE(std::isfinite(y[i]));
  for (int i = 8; i < 16; ++i) EXPECT_TRUE(std::isnan(y[i]));
}

}  // namespace
}  // namespace gyre::cuda
