// mLSTM: the recurrent and chunkwise forwards against a step loop written here from MODELS.md
// §1.1 (several chunk sizes, lengths not divisible by the chunk, both forget-gate kinds, with and
// without an initial state), the float path against float64, and the chunkwise backward against
// float64 central finite differences of the same forward, including extreme gate
// pre-activations (ĩ, f̃ = ±30).
#include "kernels/cpu/mlstm.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <random>
#include <thread>
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
  MlstmShape shape;
  Vec q, k, v, ig, fg;  // [B, S, NH, *]
  Vec c0, n0, m0;       // initial state (used when has_initial)
  bool has_initial = false;

  MlstmInputs<double> Inputs() const {
    return {q.data(), k.data(), v.data(), ig.data(), fg.data()};
  }
  MlstmStateRef<const double> Initial() const {
    if (!has_initial) return {};
    return {c0.data(), n0.data(), m0.data()};
  }
};

Problem MakeProblem(MlstmShape s, bool has_initial, uint64_t seed, bool extreme_gates) {
  std::mt19937_64 rng(seed);
  Problem p;
  p.shape = s;
  const int64_t tokens = s.batch * s.seq_len * s.num_heads;
  p.q = RandomVector(tokens * s.dk, rng);
  p.k = RandomVector(tokens * s.dk, rng);
  p.v = RandomVector(tokens * s.dv, rng);
  p.ig = RandomVector(tokens, rng, 2.0);
  p.fg = RandomVector(tokens, rng, 2.0);
  for (double& f : p.fg) f += 2.0;  // typical forget bias
  if (extreme_gates) {
    // Every third gate saturated at ±30 (mixed with ordinary values, so that each gradient
    // tensor has a well-defined norm).
    std::uniform_int_distribution<int> coin(0, 1);
    for (int64_t i = 0; i < tokens; i += 3) p.ig[i] = coin(rng) ? 30.0 : -30.0;
    for (int64_t i = 1; i < tokens; i += 3) p.fg[i] = coin(rng) ? 30.0 : -30.0;
  }
  const int64_t bh = s.batch * s.num_heads;
  p.has_initial = has_initial;
  p.c0 = RandomVector(bh * s.dk * s.dv, rng, 0.5);
  p.n0 = RandomVector(bh * s.dk, rng, 0.5);
  p.m0 = RandomVector(bh, rng, 1.0);
  return p;
}

// MODELS.md §1.1, literally, one (batch, head) at a time. Returns h; writes the final state.
Vec NaiveRecurrence(const Problem& p, const MlstmOptions& o, Vec* c_out, Vec* n_out, Vec* m_out) {
  const MlstmShape& s = p.shape;
  const int64_t S = s.seq_len, NH = s.num_heads, DK = s.dk, DV = s.dv;
  Vec h(s.batch * S * NH * DV);
  c_out->assign(s.batch * NH * DK * DV, 0);
  n_out->assign(s.batch * NH * DK, 0);
  m_out->assign(s.batch * NH, 0);
  for (int64_t b = 0; b < s.batch; ++b) {
    for (int64_t hd = 0; hd < NH; ++hd) {
      const int64_t bh = b * NH + hd;
      Vec C(DK * DV, 0.0), n(DK, 0.0);
      double m = 0;
      if (p.has_initial) {
        std::copy_n(p.c0.begin() + bh * DK * DV, DK * DV, C.begin());
        std::copy_n(p.n0.begin() + bh * DK, DK, n.begin());
        m = p.m0[bh];
      }
      for (int64_t t = 0; t < S; ++t) {
        const int64_t tok = (b * S + t) * NH + hd;
        const double f_raw = p.fg[tok], i_raw = p.ig[tok];
        const double lf =
            o.forget_gate == MlstmForgetGate::kSigmoid ? -std::log1p(std::exp(-f_raw)) : f_raw;
        const double m_new = std::max(lf + m, i_raw);
        const double fp = std::exp(lf + m - m_new), ip = std::exp(i_raw - m_new);
        m = m_new;
        for (int64_t a = 0; a < DK; ++a) {
          for (int64_t j = 0; j < DV; ++j) {
            C[a * DV + j] = fp * C[a * DV + j] + ip * p.k[tok * DK + a] * p.v[tok * DV + j];
          }
          n[a] = fp * n[a] + ip * p.k[tok * DK + a];
        }
        double den = 0;
        for (int64_t a = 0; a < DK; ++a) den += n[a] * p.q[tok * DK + a] / std::sqrt(DK);
        const double denom = std::max(std::abs(den), std::exp(-m)) + o.eps;
        for (int64_t j = 0; j < DV; ++j) {
          double num = 0;
          for (int64_t a = 0; a < DK; ++a) {
            num += C[a * DV + j] * p.q[tok * DK + a] / std::sqrt(DK);
          }
          h[tok * DV + j] = num / denom;
        }
      }
      std::copy(C.begin(), C.end(), c_out->begin() + bh * DK * DV);
      std::copy(n.begin(), n.end(), n_out->begin() + bh * DK);
      (*m_out)[bh] = m;
    }
  }
  return h;
}

struct FwdCase {
  int64_t seq_len;
  int64_t chunk_size;
  bool has_initial;
  MlstmForgetGate gate;
};

class MlstmForwardTest : public ::testing::TestWithParam<FwdCase> {};

TEST_P(MlstmForwardTest, ChunkwiseAndRecurrentMatchStepLoop) {
  const FwdCase tc = GetParam();
  const MlstmShape s{.batch = 2, .seq_len = tc.seq_len, .num_heads = 2, .dk = 5, .dv = 3};
  const MlstmOptions o{.chunk_size = tc.chunk_size, .forget_gate = tc.gate};
  ASSERT_TRUE(mlstm_check(s, o).ok());
  const Problem p = MakeProblem(s, tc.has_initial, 1234 + tc.seq_len, /*extreme_gates=*/false);
  Vec c_ref, n_ref, m_ref;
  const Vec h_ref = NaiveRecurrence(p, o, &c_ref, &n_ref, &m_ref);

  const int64_t bh = s.batch * s.num_heads;
  Vec h(h_ref.size(), std::nan("")), c(c_ref.size()), n(n_ref.size()), m(m_ref.size());
  mlstm_recurrent_fwd_ref<double>(s, o, p.Inputs(), p.Initial(), h.data(),
                                  {c.data(), n.data(), m.data()});
  EXPECT_LT(RelativeError(h, h_ref), 1e-13);
  EXPECT_LT(RelativeError(c, c_ref), 1e-13);

  Vec saved(mlstm_chunkwise_saved_size(s, o), std::nan(""));
  Vec hc(h_ref.size(), std::nan("")), cc(c_ref.size()), nc(n_ref.size()), mc(bh);
  mlstm_chunkwise_fwd_ref<double>(s, o, p.Inputs(), p.Initial(), hc.data(), saved.data(),
                                  {cc.data(), nc.data(), mc.data()});
  EXPECT_LT(RelativeError(hc, h_ref), 1e-12);
  EXPECT_LT(RelativeError(cc, c_ref), 1e-12);
  EXPECT_LT(RelativeError(nc, n_ref), 1e-12);
  EXPECT_LT(RelativeError(mc, m_ref), 1e-12);

  // Inference prefill: no saved buffer, same outputs.
  Vec hn(h_ref.size(), std::nan("")), cn(c_ref.size()), nn(n_ref.size()), mn(bh);
  mlstm_chunkwise_fwd_ref<double>(s, o, p.Inputs(), p.Initial(), hn.data(), nullptr,
                                  {cn.data(), nn.data(), mn.data()});
  EXPECT_EQ(hn, hc);
  EXPECT_EQ(cn, cc);
  EXPECT_EQ(mn, mc);

  // float: the same computation in single precision against the float64 step loop.
  auto to_f = [](const Vec& v) { return std::vector<float>(v.begin(), v.end()); };
  const auto qf = to_f(p.q), kf = to_f(p.k), vf = to_f(p.v), igf = to_f(p.ig), fgf = to_f(p.fg),
             c0f = to_f(p.c0), n0f = to_f(p.n0), m0f = to_f(p.m0);
  MlstmStateRef<const float> init_f;
  if (p.has_initial) init_f = {c0f.data(), n0f.data(), m0f.data()};
  std::vector<float> savedf(mlstm_chunkwise_saved_size(s, o)), hf(h_ref.size());
  mlstm_chunkwise_fwd_ref<float>(s, o, {qf.data(), kf.data(), vf.data(), igf.data(), fgf.data()},
                                 init_f, hf.data(), savedf.data(), {});
  EXPECT_LT(RelativeError(Vec(hf.begin(), hf.end()), h_ref), 1e-5);
}

INSTANTIATE_TEST_SUITE_P(LengthsAndChunks, MlstmForwardTest,
                         ::testing::Values(FwdCase{1, 4, false, MlstmForgetGate::kSigmoid},
                                           FwdCase{7, 1, false, MlstmForgetGate::kSigmoid},
                                           FwdCase{7, 3, true, MlstmForgetGate::kSigmoid},
                                           FwdCase{16, 4, false, MlstmForgetGate::kSigmoid},
                                           FwdCase{23, 8, true, MlstmForgetGate::kSigmoid},
                                           FwdCase{23, 64, true, MlstmForgetGate::kSigmoid},
                                           FwdCase{37, 16, false, MlstmForgetGate::kSigmoid},
                                           FwdCase{23, 5, true, MlstmForgetGate::kExponential},
                                           FwdCase{12, 4, false, MlstmForgetGate::kExponential}));

struct BwdCase {
  int64_t seq_len;
  int64_t chunk_size;
  bool has_initial;
  bool with_final_grad;
  bool extreme_gates;
  MlstmForgetGate gate;
};

class MlstmBackwardTest : public ::testing::TestWithParam<BwdCase> {};

TEST_P(MlstmBackwardTest, MatchesFiniteDifferences) {
  const BwdCase tc = GetParam();
  const MlstmShape s{.batch = 2, .seq_len = tc.seq_len, .num_heads = 2, .dk = 3, .dv = 2};
  const MlstmOptions o{.chunk_size = tc.chunk_size, .forget_gate = tc.gate};
  Problem p = MakeProblem(s, tc.has_initial, 99 + tc.seq_len * 7 + tc.chunk_size, tc.extreme_gates);
  const int64_t bh = s.batch * s.num_heads;
  std::mt19937_64 rng(5);
  const Vec dh = RandomVector(p.v.size(), rng), dcf = RandomVector(p.c0.size(), rng),
            dnf = RandomVector(p.n0.size(), rng), dmf = RandomVector(bh, rng);
  MlstmStateRef<const double> d_final;
  if (tc.with_final_grad) d_final = {dcf.data(), dnf.data(), dmf.data()};

  // Scalar loss = Σ dh·h (+ <dC_S, C_S> + <dn_S, n_S> + dm_S·m_S).
  auto loss = [&]() {
    Vec saved(mlstm_chunkwise_saved_size(s, o)), h(p.v.size()), c(p.c0.size()), n(p.n0.size()),
        m(bh);
    mlstm_chunkwise_fwd_ref<double>(s, o, p.Inputs(), p.Initial(), h.data(), saved.data(),
                                    {c.data(), n.data(), m.data()});
    double l = 0;
    for (size_t i = 0; i < h.size(); ++i) l += dh[i] * h[i];
    if (tc.with_final_grad) {
      for (size_t i = 0; i < c.size(); ++i) l += dcf[i] * c[i];
      for (size_t i = 0; i < n.size(); ++i) l += dnf[i] * n[i];
      for (size_t i = 0; i < m.size(); ++i) l += dmf[i] * m[i];
    }
    return l;
  };

  Vec saved(mlstm_chunkwise_saved_size(s, o)), h(p.v.size());
  mlstm_chunkwise_fwd_ref<double>(s, o, p.Inputs(), p.Initial(), h.data(), saved.data(), {});
  const double nan = std::nan("");
  Vec dq(p.q.size(), nan), dk(p.k.size(), nan), dv(p.v.size(), nan), dig(p.ig.size(), nan),
      dfg(p.fg.size(), nan), dc0(p.c0.size(), nan), dn0(p.n0.size(), nan), dm0(bh, nan);
  mlstm_chunkwise_bwd_ref<double>(s, o, p.Inputs(), p.Initial(), h.data(), saved.data(), dh.data(),
                                  d_final,
                                  {dq.data(), dk.data(), dv.data(), dig.data(), dfg.data()},
                                  {dc0.data(), dn0.data(), dm0.data()});

  // Threshold: 1e-6 norm-wise relative (the bar for float64). The Richardson central
  // differences are accurate to ~1e-10 on these cases (measured while writing the test).
  constexpr double kTol = 1e-6;
  EXPECT_LT(RelativeError(dq, NumericGradient(p.q, loss)), kTol);
  EXPECT_LT(RelativeError(dk, NumericGradient(p.k, loss)), kTol);
  EXPECT_LT(RelativeError(dv, NumericGradient(p.v, loss)), kTol);
  EXPECT_LT(RelativeError(dig, NumericGradient(p.ig, loss)), kTol);
  EXPECT_LT(RelativeError(dfg, NumericGradient(p.fg, loss)), kTol);
  if (tc.has_initial) {
    EXPECT_LT(RelativeError(dc0, NumericGradient(p.c0, loss)), kTol);
    EXPECT_LT(RelativeError(dn0, NumericGradient(p.n0, loss)), kTol);
    EXPECT_LT(RelativeError(dm0, NumericGradient(p.m0, loss)), kTol);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Cases, MlstmBackwardTest,
    ::testing::Values(BwdCase{7, 3, false, false, false, MlstmForgetGate::kSigmoid},
                      BwdCase{7, 1, true, true, false, MlstmForgetGate::kSigmoid},
                      BwdCase{8, 8, true, true, false, MlstmForgetGate::kSigmoid},
                      BwdCase{9, 4, true, true, false, MlstmForgetGate::kSigmoid},
                      BwdCase{10, 4, true, true, true, MlstmForgetGate::kSigmoid},
                      BwdCase{10, 3, false, false, true, MlstmForgetGate::kSigmoid},
                      BwdCase{9, 4, true, true, false, MlstmForgetGate::kExponential},
                      BwdCase{10, 3, true, true, true, MlstmForgetGate::kExponential}));

// Generation: a chunkwise prefill of the first tokens, then the step function for the rest,
// equals the step loop over the whole sequence.
TEST(MlstmStepTest, PrefillThenStepMatchesStepLoop) {
  const MlstmShape s{.batch = 2, .seq_len = 17, .num_heads = 3, .dk = 4, .dv = 5};
  const MlstmOptions o{.chunk_size = 4};
  const Problem p = MakeProblem(s, /*has_initial=*/true, 55, /*extreme_gates=*/false);
  Vec c_ref, n_ref, m_ref;
  const Vec h_ref = NaiveRecurrence(p, o, &c_ref, &n_ref, &m_ref);
  const int64_t S = s.seq_len, NH = s.num_heads, dk = s.dk, dv = s.dv, B = s.batch;
  const int64_t prefill = 10;
  // Prefill: the first 10 tokens of each row, re-packed as a [B, 10, ...] problem.
  Problem pre = p;
  pre.shape.seq_len = prefill;
  auto take = [&](const Vec& src, int64_t width) {
    Vec out;
    for (int64_t b = 0; b < B; ++b) {
      out.insert(out.end(), src.begin() + b * S * width, src.begin() + (b * S + prefill) * width);
    }
    return out;
  };
  pre.q = take(p.q, NH * dk);
  pre.k = take(p.k, NH * dk);
  pre.v = take(p.v, NH * dv);
  pre.ig = take(p.ig, NH);
  pre.fg = take(p.fg, NH);
  Vec saved(mlstm_chunkwise_saved_size(pre.shape, o)), h_pre(B * prefill * NH * dv);
  Vec c(c_ref.size()), n(n_ref.size()), m(m_ref.size());
  mlstm_chunkwise_fwd_ref<double>(pre.shape, o, pre.Inputs(), pre.Initial(), h_pre.data(),
                                  saved.data(), {c.data(), n.data(), m.data()});
  Vec h_all(h_ref.size());
  for (int64_t b = 0; b < B; ++b) {
    std::copy_n(h_pre.begin() + b * prefill * NH * dv, prefill * NH * dv,
                h_all.begin() + b * S * NH * dv);
  }
  Vec qt(B * NH * dk), kt(qt.size()), vt(B * NH * dv), it(B * NH), ft(B * NH), ht(vt.size());
  for (int64_t t = prefill; t < S; ++t) {
    for (int64_t b = 0; b < B; ++b) {
      const int64_t tok = (b * S + t) * NH;
      std::copy_n(p.q.begin() + tok * dk, NH * dk, qt.begin() + b * NH * dk);
      std::copy_n(p.k.begin() + tok * dk, NH * dk, kt.begin() + b * NH * dk);
      std::copy_n(p.v.begin() + tok * dv, NH * dv, vt.begin() + b * NH * dv);
      std::copy_n(p.ig.begin() + tok, NH, it.begin() + b * NH);
      std::copy_n(p.fg.begin() + tok, NH, ft.begin() + b * NH);
    }
    mlstm_step_fwd_ref<double>(s, o, qt.data(), kt.data(), vt.data(), it.data(), ft.data(),
                               {c.data(), n.data(), m.data()}, ht.data());
    for (int64_t b = 0; b < B; ++b) {
      std::copy_n(ht.begin() + b * NH * dv, NH * dv, h_all.begin() + (b * S + t) * NH * dv);
    }
  }
  EXPECT_LT(RelativeError(h_all, h_ref), 1e-12);
  EXPECT_LT(RelativeError(c, c_ref), 1e-12);
  EXPECT_LT(RelativeError(m, m_ref), 1e-12);
}

// The float path of the backward (what the CPU trainer runs) against the float64 one.
TEST(MlstmFloatTest, BackwardMatchesFloat64) {
  const MlstmShape s{.batch = 2, .seq_len = 45, .num_heads = 2, .dk = 16, .dv = 8};
  const MlstmOptions o{.chunk_size = 16};
  for (bool extreme : {false, true}) {
    const Problem p = MakeProblem(s, /*has_initial=*/true, 77, extreme);
    std::mt19937_64 rng(12);
    const Vec dh = RandomVector(p.v.size(), rng);
    auto run = [&](auto zero) {
      using T = decltype(zero);
      auto cast = [](const Vec& v) { return std::vector<T>(v.begin(), v.end()); };
      const auto q = cast(p.q), k = cast(p.k), v = cast(p.v), ig = cast(p.ig), fg = cast(p.fg),
                 c0 = cast(p.c0), n0 = cast(p.n0), m0 = cast(p.m0), dhc = cast(dh);
      const MlstmInputs<T> in{q.data(), k.data(), v.data(), ig.data(), fg.data()};
      const MlstmStateRef<const T> init{c0.data(), n0.data(), m0.data()};
      std::vector<T> saved(mlstm_chunkwise_saved_size(s, o)), h(v.size()), dq(q.size()),
          dk(k.size()), dv(v.size()), dig(ig.size()), dfg(fg.size());
      mlstm_chunkwise_fwd_ref<T>(s, o, in, init, h.data(), saved.data(), {});
      mlstm_chunkwise_bwd_ref<T>(s, o, in, init, h.data(), saved.data(), dhc.data(), {},
                                 {dq.data(), dk.data(), dv.data(), dig.data(), dfg.data()}, {});
      std::vector<Vec> out;
      for (const auto* g : {&dq, &dk, &dv, &dig, &dfg}) out.emplace_back(g->begin(), g->end());
      return out;
    };
    const auto gf = run(0.0f), gd = run(0.0);
    // With saturated gates some denominators n_tᵀq̂_t nearly cancel (|h| reaches ~1e3 here), so
    // float loses digits in the forward itself: the float step recurrence is already 2e-4 off
    // in h, the chunkwise form 1e-3 (measured). The bar is set by that conditioning.
    const double tol = extreme ? 1e-2 : 1e-4;
    for (size_t i = 0; i < gd.size(); ++i) {
      EXPECT_LT(RelativeError(gf[i], gd[i]), tol) << "tensor " << i << " extreme " << extreme;
    }
  }
}

// The TFLA convention (stop_normaliser_gradient) equals the exact gradient when every dh_t is
// orthogonal to h_t (what a following scale-invariant per-head norm produces), and differs
// otherwise. The exact gradient is the one checked against finite differences above.
TEST(MlstmNormaliserGradientTest, StopGradientMatchesExactForOrthogonalUpstream) {
  const MlstmShape s{.batch = 2, .seq_len = 13, .num_heads = 2, .dk = 4, .dv = 3};
  MlstmOptions exact{.chunk_size = 5};
  MlstmOptions stop = exact;
  stop.stop_normaliser_gradient = true;
  const Problem p = MakeProblem(s, /*has_initial=*/true, 31, /*extreme_gates=*/true);
  Vec saved(mlstm_chunkwise_saved_size(s, exact)), h(p.v.size());
  mlstm_chunkwise_fwd_ref<double>(s, exact, p.Inputs(), p.Initial(), h.data(), saved.data(), {});
  std::mt19937_64 rng(6);
  Vec dh = RandomVector(h.size(), rng);
  auto grads = [&](const MlstmOptions& o, const Vec& upstream) {
    Vec dq(p.q.size()), dk(p.k.size()), dv(p.v.size()), dig(p.ig.size()), dfg(p.fg.size());
    mlstm_chunkwise_bwd_ref<double>(s, o, p.Inputs(), p.Initial(), h.data(), saved.data(),
                                    upstream.data(), {},
                                    {dq.data(), dk.data(), dv.data(), dig.data(), dfg.data()}, {});
    return std::vector<Vec>{dq, dk, dv, dig, dfg};
  };
  // Not orthogonal: dq (enters the denominator) must differ by more than rounding.
  EXPECT_GT(RelativeError(grads(stop, dh)[0], grads(exact, dh)[0]), 1e-3);
  // Project dh_t onto the orthogonal complement of h_t, per token and head.
  for (size_t i = 0; i < h.size(); i += s.dv) {
    double dot = 0, nn = 0;
    for (int64_t j = 0; j < s.dv; ++j) {
      dot += dh[i + j] * h[i + j];
      nn += h[i + j] * h[i + j];
    }
    for (int64_t j = 0; j < s.dv; ++j) dh[i + j] -= dot / nn * h[i + j];
  }
  const auto a = grads(stop, dh), b = grads(exact, dh);
  for (size_t k = 0; k < a.size(); ++k) EXPECT_LT(RelativeError(a[k], b[k]), 1e-10) << k;
}

// mlstm.h promises that rows [b0, b1) can be computed by a call on a slice (pointers advanced,
// saved advanced by b0·saved_size(batch = 1)), bit-identically: what the ops layer uses to spread
// a layer over threads.
TEST(MlstmBatchSliceTest, SliceCallEqualsRowsOfFullCall) {
  const MlstmShape s{.batch = 3, .seq_len = 11, .num_heads = 2, .dk = 4, .dv = 3};
  const MlstmOptions o{.chunk_size = 4};
  const Problem p = MakeProblem(s, /*has_initial=*/true, 4, /*extreme_gates=*/false);
  std::mt19937_64 rng(8);
  const Vec dh = RandomVector(p.v.size(), rng);
  const int64_t NH = s.num_heads, S = s.seq_len, dk = s.dk, dv = s.dv;
  auto run = [&](int64_t b0, int64_t nb, Vec* h, Vec* grads) {
    MlstmShape sub = s;
    sub.batch = nb;
    const int64_t tq = b0 * S * NH * dk, tv = b0 * S * NH * dv, tg = b0 * S * NH;
    const MlstmInputs<double> in{p.q.data() + tq, p.k.data() + tq, p.v.data() + tv,
                                 p.ig.data() + tg, p.fg.data() + tg};
    const MlstmStateRef<const double> init{p.c0.data() + b0 * NH * dk * dv,
                                           p.n0.data() + b0 * NH * dk, p.m0.data() + b0 * NH};
    Vec saved(mlstm_chunkwise_saved_size(sub, o));
    h->assign(nb * S * NH * dv, 0);
    mlstm_chunkwise_fwd_ref<double>(sub, o, in, init, h->data(), saved.data(), {});
    Vec dq(nb * S * NH * dk), dkk(dq.size()), dvv(h->size()), dig(nb * S * NH), dfg(dig.size());
    mlstm_chunkwise_bwd_ref<double>(sub, o, in, init, h->data(), saved.data(), dh.data() + tv, {},
                                    {dq.data(), dkk.data(), dvv.data(), dig.data(), dfg.data()},
                                    {});
    grads->clear();
    for (const Vec* g : {&dq, &dkk, &dvv, &dig, &dfg})
      grads->insert(grads->end(), g->begin(), g->end());
  };
  Vec h_full, g_full, h_sub, g_sub;
  run(0, 3, &h_full, &g_full);
  run(1, 2, &h_sub, &g_sub);
  ASSERT_EQ(h_full.size(), h_sub.size() * 3 / 2);
  for (size_t i = 0; i < h_sub.size(); ++i) ASSERT_EQ(h_sub[i], h_full[S * NH * dv + i]);
  // Gradient blocks: the slice's dq (2 rows) equals rows 1..2 of the full dq, etc.
  const int64_t sizes[] = {S * NH * dk, S * NH * dk, S * NH * dv, S * NH, S * NH};
  int64_t off_full = 0, off_sub = 0;
  for (int64_t per_row : sizes) {
    for (int64_t i = 0; i < 2 * per_row; ++i) {
      ASSERT_EQ(g_sub[off_sub + i], g_full[off_full + per_row + i]);
    }
    off_full += 3 * per_row;
    off_sub += 2 * per_row;
  }
}

// The same promise exercised the way a caller uses it: batch rows spread over threads running
// at the same time (OpenBLAS is entered concurrently), bit-identical to one full call.
TEST(MlstmBatchSliceTest, ConcurrentSlicesEqualFullCall) {
  const MlstmShape s{.batch = 4, .seq_len = 70, .num_heads = 2, .dk = 16, .dv = 16};
  const MlstmOptions o{.chunk_size = 16};
  const Problem p = MakeProblem(s, /*has_initial=*/false, 5, /*extreme_gates=*/false);
  const int64_t row_qk = s.seq_len * s.num_heads * s.dk, row_v = s.seq_len * s.num_heads * s.dv,
                row_g = s.seq_len * s.num_heads;
  MlstmShape one = s;
  one.batch = 1;
  const int64_t saved_row = mlstm_chunkwise_saved_size(one, o);
  Vec h_full(p.v.size()), saved_full(mlstm_chunkwise_saved_size(s, o));
  mlstm_chunkwise_fwd_ref<double>(s, o, p.Inputs(), {}, h_full.data(), saved_full.data(), {});
  for (int repeat = 0; repeat < 3; ++repeat) {
    Vec h(p.v.size()), saved(saved_full.size());
    std::vector<std::thread> threads;
    for (int64_t b = 0; b < s.batch; ++b) {
      threads.emplace_back([&, b] {
        const MlstmInputs<double> in{p.q.data() + b * row_qk, p.k.data() + b * row_qk,
                                     p.v.data() + b * row_v, p.ig.data() + b * row_g,
                                     p.fg.data() + b * row_g};
        mlstm_chunkwise_fwd_ref<double>(one, o, in, {}, h.data() + b * row_v,
                                        saved.data() + b * saved_row, {});
      });
    }
    for (auto& t : threads) t.join();
    ASSERT_EQ(h, h_full);
    ASSERT_EQ(saved, saved_full);
  }
}

}  // namespace
}  // namespace gyre::cpu
