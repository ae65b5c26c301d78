// sLSTM: forward vs a manual step loop written here from MODELS.md §2 (plain loops, no BLAS),
// the step function vs the sequence forward, float vs float64, and the backward through time
// against float64 central finite differences, including saturated gates (ĩ, f̃ = ±30).
#include "kernels/cpu/slstm.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cpu/cell_test_util.h"

namespace gyre::cpu {
namespace {

using testing::Vec;
using testing::NumericGradient;
using testing::RandomVector;
using testing::RelativeError;




struct Problem {
  SlstmShape shape;
  Vec gx, r;           // [B, S, 4, d], [NH, 4, dh, dh]
  Vec h0, c0, n0, m0;  // initial state, each [B, d]
  bool has_initial = false;

  SlstmStateRef<const double> Initial() const {
    if (!has_initial) return {};
    return {h0.data(), c0.data(), n0.data(), m0.data()};
  }
};

Problem MakeProblem(const SlstmShape& s, bool has_initial, bool extreme, uint64_t seed) {
  std::mt19937_64 rng(seed);
  Problem p;
  p.shape = s;
  const int64_t d = s.num_heads * s.head_dim;
  p.gx = RandomVector(s.batch * s.seq_len * 4 * d, rng);
  p.r = RandomVector(s.num_heads * 4 * s.head_dim * s.head_dim, rng,
                     0.5 / std::sqrt(double(s.head_dim)));
  if (extreme) {
    std::uniform_int_distribution<int> coin(0, 1);
    for (int64_t bt = 0; bt < s.batch * s.seq_len; ++bt) {
      for (int64_t u = 0; u < d; ++u) {
        if (u % 2 == 0) p.gx[bt * 4 * d + u] = coin(rng) ? 30.0 : -30.0;      // ĩ
        if (u % 3 == 1) p.gx[bt * 4 * d + d + u] = coin(rng) ? 30.0 : -30.0;  // f̃
      }
    }
  }
  p.has_initial = has_initial;
  p.h0 = RandomVector(s.batch * d, rng, 0.5);
  p.c0 = RandomVector(s.batch * d, rng);
  p.n0 = RandomVector(s.batch * d, rng, 0.3, 1.5);
  p.m0 = RandomVector(s.batch * d, rng);
  return p;
}

// MODELS.md §2, literally: explicit loops, per unit.
Vec ManualStepLoop(const Problem& p, Vec* hf, Vec* cf, Vec* nf, Vec* mf) {
  const SlstmShape& s = p.shape;
  const int64_t B = s.batch, S = s.seq_len, NH = s.num_heads, dh = s.head_dim, d = NH * dh;
  Vec h(B * S * d);
  Vec hs(B * d, 0.0), cs(B * d, 0.0), ns(B * d, 0.0), ms(B * d, 0.0);
  if (p.has_initial) {
    hs = p.h0;
    cs = p.c0;
    ns = p.n0;
    ms = p.m0;
  }
  for (int64_t t = 0; t < S; ++t) {
    Vec h_new(B * d);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t hd = 0; hd < NH; ++hd) {
        for (int64_t j = 0; j < dh; ++j) {
          const int64_t u = hd * dh + j, i = b * d + u;
          double pre[4];
          for (int g = 0; g < 4; ++g) {
            pre[g] = p.gx[((b * S + t) * 4 + g) * d + u];
            for (int64_t l = 0; l < dh; ++l) {
              pre[g] += p.r[((hd * 4 + g) * dh + j) * dh + l] * hs[b * d + hd * dh + l];
            }
          }
          const double lf = -std::log1p(std::exp(-pre[1])) + ms[i];
          const double m = ns[i] == 0.0 ? pre[0] : std::max(pre[0], lf);
          const double ip = std::min(std::exp(pre[0] - m), 1.0);
          const double fp = std::min(std::exp(lf - m), 1.0);
          cs[i] = fp * cs[i] + ip * std::tanh(pre[2]);
          ns[i] = fp * ns[i] + ip;
          ms[i] = m;
          h_new[i] = 1.0 / (1.0 + std::exp(-pre[3])) * cs[i] / ns[i];
          h[(b * S + t) * d + u] = h_new[i];
        }
      }
    }
    hs = h_new;
  }
  *hf = hs;
  *cf = cs;
  *nf = ns;
  *mf = ms;
  return h;
}

struct FwdCase {
  SlstmShape shape;
  bool has_initial;
  bool extreme;
};

class SlstmForwardTest : public ::testing::TestWithParam<FwdCase> {};

TEST_P(SlstmForwardTest, MatchesManualStepLoop) {
  const FwdCase tc = GetParam();
  const SlstmShape s = tc.shape;
  ASSERT_TRUE(slstm_check(s).ok());
  const int64_t B = s.batch, S = s.seq_len, d = s.num_heads * s.head_dim;
  const Problem p = MakeProblem(s, tc.has_initial, tc.extreme, 21 + S);
  Vec hf_ref, cf_ref, nf_ref, mf_ref;
  const Vec h_ref = ManualStepLoop(p, &hf_ref, &cf_ref, &nf_ref, &mf_ref);

  Vec h(h_ref.size(), std::nan("")), saved(slstm_saved_size(s), std::nan(""));
  Vec hf(B * d), cf(B * d), nf(B * d), mf(B * d);
  slstm_fwd_ref<double>(s, p.gx.data(), p.r.data(), p.Initial(), h.data(), saved.data(),
                        {hf.data(), cf.data(), nf.data(), mf.data()});
  EXPECT_LT(RelativeError(h, h_ref), 1e-13);
  EXPECT_LT(RelativeError(hf, hf_ref), 1e-13);
  EXPECT_LT(RelativeError(cf, cf_ref), 1e-13);
  EXPECT_LT(RelativeError(nf, nf_ref), 1e-13);
  EXPECT_LT(RelativeError(mf, mf_ref), 1e-13);

  // Without a backward to feed: no saved buffer, same outputs.
  Vec hn(h_ref.size(), std::nan("")), cn(B * d);
  slstm_fwd_ref<double>(s, p.gx.data(), p.r.data(), p.Initial(), hn.data(), nullptr,
                        {hf.data(), cn.data(), nf.data(), mf.data()});
  EXPECT_EQ(hn, h);
  EXPECT_EQ(cn, cf);

  // Step function, S times.
  Vec hs(B * d, 0.0), cs(B * d, 0.0), ns(B * d, 0.0), ms(B * d, 0.0);
  if (p.has_initial) {
    hs = p.h0;
    cs = p.c0;
    ns = p.n0;
    ms = p.m0;
  }
  Vec gxt(B * 4 * d), ht(B * d), h_step(h_ref.size());
  for (int64_t t = 0; t < S; ++t) {
    for (int64_t b = 0; b < B; ++b) {
      std::copy_n(p.gx.begin() + (b * S + t) * 4 * d, 4 * d, gxt.begin() + b * 4 * d);
    }
    slstm_step_fwd_ref<double>(s, gxt.data(), p.r.data(),
                               {hs.data(), cs.data(), ns.data(), ms.data()}, ht.data());
    for (int64_t b = 0; b < B; ++b) {
      std::copy_n(ht.begin() + b * d, d, h_step.begin() + (b * S + t) * d);
    }
  }
  EXPECT_LT(RelativeError(h_step, h_ref), 1e-13);
  EXPECT_LT(RelativeError(cs, cf_ref), 1e-13);

  auto to_f = [](const Vec& v) { return std::vector<float>(v.begin(), v.end()); };
  const auto gxf = to_f(p.gx), rf = to_f(p.r), h0f = to_f(p.h0), c0f = to_f(p.c0), n0f = to_f(p.n0),
             m0f = to_f(p.m0);
  SlstmStateRef<const float> init_f;
  if (p.has_initial) init_f = {h0f.data(), c0f.data(), n0f.data(), m0f.data()};
  std::vector<float> hfl(h_ref.size()), savedf(slstm_saved_size(s));
  slstm_fwd_ref<float>(s, gxf.data(), rf.data(), init_f, hfl.data(), savedf.data(), {});
  EXPECT_LT(RelativeError(Vec(hfl.begin(), hfl.end()), h_ref), 1e-5);
}

INSTANTIATE_TEST_SUITE_P(Shapes, SlstmForwardTest,
                         ::testing::Values(FwdCase{{2, 9, 2, 3}, false, false},
                                           FwdCase{{3, 12, 4, 2}, true, false},
                                           FwdCase{{2, 10, 2, 4}, true, true},
                                           FwdCase{{1, 1, 1, 5}, false, false}));

struct BwdCase {
  SlstmShape shape;
  bool has_initial;
  bool with_final_grad;
  bool extreme;
};

class SlstmBackwardTest : public ::testing::TestWithParam<BwdCase> {};

TEST_P(SlstmBackwardTest, MatchesFiniteDifferences) {
  const BwdCase tc = GetParam();
  const SlstmShape s = tc.shape;
  const int64_t B = s.batch, d = s.num_heads * s.head_dim;
  Problem p = MakeProblem(s, tc.has_initial, tc.extreme, 8 + s.seq_len);
  std::mt19937_64 rng(17);
  const Vec dh = RandomVector(B * s.seq_len * d, rng), dhf = RandomVector(B * d, rng),
            dcf = RandomVector(B * d, rng), dnf = RandomVector(B * d, rng),
            dmf = RandomVector(B * d, rng);
  SlstmStateRef<const double> d_final;
  if (tc.with_final_grad) d_final = {dhf.data(), dcf.data(), dnf.data(), dmf.data()};

  auto loss = [&]() {
    Vec h(dh.size()), saved(slstm_saved_size(s)), hf(B * d), cf(B * d), nf(B * d), mf(B * d);
    slstm_fwd_ref<double>(s, p.gx.data(), p.r.data(), p.Initial(), h.data(), saved.data(),
                          {hf.data(), cf.data(), nf.data(), mf.data()});
    double l = 0;
    for (size_t i = 0; i < h.size(); ++i) l += dh[i] * h[i];
    if (tc.with_final_grad) {
      for (int64_t i = 0; i < B * d; ++i) {
        l += dhf[i] * hf[i] + dcf[i] * cf[i] + dnf[i] * nf[i] + dmf[i] * mf[i];
      }
    }
    return l;
  };

  Vec h(dh.size()), saved(slstm_saved_size(s));
  slstm_fwd_ref<double>(s, p.gx.data(), p.r.data(), p.Initial(), h.data(), saved.data(), {});
  const double nan = std::nan("");
  Vec dgx(p.gx.size(), nan), dh0(B * d, nan), dc0(B * d, nan), dn0(B * d, nan), dm0(B * d, nan);
  Vec dr(p.r.size(), 1.0);  // accumulates: start from 1, subtract it afterwards
  slstm_bwd_ref<double>(s, p.r.data(), p.Initial(), h.data(), saved.data(), dh.data(), d_final,
                        dgx.data(), dr.data(), {dh0.data(), dc0.data(), dn0.data(), dm0.data()});
  for (double& e : dr) e -= 1.0;
  constexpr double kTol = 1e-6;
  EXPECT_LT(RelativeError(dgx, NumericGradient(p.gx, loss)), kTol);
  EXPECT_LT(RelativeError(dr, NumericGradient(p.r, loss)), kTol);
  if (tc.has_initial) {
    EXPECT_LT(RelativeError(dh0, NumericGradient(p.h0, loss)), kTol);
    EXPECT_LT(RelativeError(dc0, NumericGradient(p.c0, loss)), kTol);
    EXPECT_LT(RelativeError(dn0, NumericGradient(p.n0, loss)), kTol);
    if (tc.with_final_grad) {
      // Without a final-state gradient h does not depend on m_0 at all (dm0 = 0 both ways).
      EXPECT_LT(RelativeError(dm0, NumericGradient(p.m0, loss)), kTol);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, SlstmBackwardTest,
                         ::testing::Values(BwdCase{{2, 6, 2, 3}, false, false, false},
                                           BwdCase{{2, 6, 2, 3}, true, true, false},
                                           BwdCase{{1, 8, 3, 2}, true, true, true},
                                           BwdCase{{2, 7, 2, 2}, false, true, true},
                                           BwdCase{{2, 5, 1, 4}, true, false, false}));

// The float path of the backward (what the CPU trainer runs) against the float64 one.
TEST(SlstmFloatTest, BackwardMatchesFloat64) {
  const SlstmShape s{.batch = 2, .seq_len = 20, .num_heads = 2, .head_dim = 8};
  const Problem p = MakeProblem(s, true, /*extreme=*/true, 23);
  std::mt19937_64 rng(9);
  const Vec dh = RandomVector(s.batch * s.seq_len * s.num_heads * s.head_dim, rng);
  auto run = [&](auto zero) {
    using T = decltype(zero);
    auto cast = [](const Vec& v) { return std::vector<T>(v.begin(), v.end()); };
    const auto gx = cast(p.gx), r = cast(p.r), h0 = cast(p.h0), c0 = cast(p.c0), n0 = cast(p.n0),
               m0 = cast(p.m0), dhc = cast(dh);
    const SlstmStateRef<const T> init{h0.data(), c0.data(), n0.data(), m0.data()};
    std::vector<T> saved(slstm_saved_size(s)), h(dh.size()), dgx(gx.size()), dr(r.size(), T(0));
    slstm_fwd_ref<T>(s, gx.data(), r.data(), init, h.data(), saved.data(), {});
    slstm_bwd_ref<T>(s, r.data(), init, h.data(), saved.data(), dhc.data(), {}, dgx.data(),
                     dr.data(), {});
    return std::vector<Vec>{Vec(h.begin(), h.end()), Vec(dgx.begin(), dgx.end()),
                            Vec(dr.begin(), dr.end())};
  };
  const auto gf = run(0.0f), gd = run(0.0);
  for (size_t i = 0; i < gd.size(); ++i) EXPECT_LT(RelativeError(gf[i], gd[i]), 1e-4) << i;
}

// slstm.h promises that rows [b0, b1) can be computed by a call on a slice (equal up to rounding).
TEST(SlstmBatchSliceTest, SliceCallEqualsRowsOfFullCall) {
  const SlstmShape s{.batch = 3, .seq_len = 6, .num_heads = 2, .head_dim = 3};
  const Problem p = MakeProblem(s, true, false, 13);
  const int64_t S = s.seq_len, d = s.num_heads * s.head_dim;
  std::mt19937_64 rng(2);
  const Vec dh = RandomVector(s.batch * S * d, rng);
  auto run = [&](int64_t b0, int64_t nb) {
    SlstmShape sub = s;
    sub.batch = nb;
    const SlstmStateRef<const double> init{p.h0.data() + b0 * d, p.c0.data() + b0 * d,
                                           p.n0.data() + b0 * d, p.m0.data() + b0 * d};
    Vec saved(slstm_saved_size(sub)), h(nb * S * d), dgx(nb * S * 4 * d), dr(p.r.size(), 0.0);
    slstm_fwd_ref<double>(sub, p.gx.data() + b0 * S * 4 * d, p.r.data(), init, h.data(),
                          saved.data(), {});
    slstm_bwd_ref<double>(sub, p.r.data(), init, h.data(), saved.data(), dh.data() + b0 * S * d, {},
                          dgx.data(), dr.data(), {});
    return std::vector<Vec>{h, dgx};
  };
  const auto full = run(0, 3), sub = run(1, 2);
  for (size_t k = 0; k < full.size(); ++k) {
    const size_t per_row = full[k].size() / 3;
    const Vec rows(full[k].begin() + per_row, full[k].end());
    EXPECT_LT(RelativeError(sub[k], rows), 1e-14);
  }
}

}  // namespace
}  // namespace gyre::cpu
