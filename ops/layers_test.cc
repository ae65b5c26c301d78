// Every layer's backward against float64 central finite differences (gradcheck.h), plus
// functional equivalences: SelfExtend with W >= T is plain attention, SelfExtend matches a
// direct per-pair evaluation, chunked cross-entropy equals the materialised-logits version.
#include "ops/layers.h"

#include <algorithm>
#include <cmath>
#include <functional>

#include "gtest/gtest.h"
#include "ops/attention.h"
#include "ops/cross_entropy.h"
#include "ops/gradcheck.h"
#include "ops/parallel.h"

namespace gyre::ops {
namespace {

using testing::CheckGradient;
using testing::Inner;
using testing::RandomTensor;

constexpr double kTol = 1e-6;

// Checks d<forward(x), dy>/dx and /dparams for a one-input layer.
void CheckOneInputLayer(ParamStore* store, Tensor x, const std::function<Tensor(const Tensor&)>& forward,
                        const std::function<Tensor(const Tensor&)>& backward, Rng* rng,
                        double input_tol = kTol) {
  Tensor y = forward(x);
  Tensor dy = RandomTensor(y.shape(), rng);
  store->ZeroGrad();
  Tensor dx = backward(dy);
  auto loss = [&] { return Inner(forward(x), dy); };
  EXPECT_LT(CheckGradient(loss, &x, dx), input_tol) << "input gradient";
  for (Parameter* p : store->All()) {
    Tensor analytic = p->grad.Clone();
    EXPECT_LT(CheckGradient(loss, &p->value, analytic), kTol) << p->name;
  }
}

void Randomize(ParamStore* store, Rng* rng, double scale = 0.5) {
  for (Parameter* p : store->All())
    for (int64_t i = 0; i < p->value.numel(); ++i) p->value.Set(i, scale * rng->Normal());
}

// The initialisers draw counter-based chunks in parallel: the values depend on the seed only,
// not on the thread count; each call advances the caller's generator by one draw; chunks are
// independent streams; and the draws have the requested distribution.
TEST(InitTest, DrawsDoNotDependOnTheThreadCount) {
  const int64_t n = (int64_t{1} << 16) * 3 + 17;  // three full chunks and a partial one
  for (DType dtype : {DType::kF32, DType::kF64}) {
    Tensor serial = Tensor::Empty({n}, dtype), parallel = Tensor::Empty({n}, dtype);
    Rng a(42), b(42);
    SetNumThreads(1);
    InitNormal(&serial, 0.02, &a);
    InitUniform(&serial, -0.5, 0.5, &a);  // the second call must see the advanced generator
    SetNumThreads(3);
    InitNormal(&parallel, 0.02, &b);
    InitUniform(&parallel, -0.5, 0.5, &b);
    SetNumThreads(1);
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(serial.At(i), parallel.At(i)) << "element " << i;
    Rng c(42);
    c.Next();
    c.Next();
    const uint64_t next = c.Next();
    EXPECT_EQ(a.Next(), next) << "two initialisers advance the generator by two draws";
    EXPECT_EQ(b.Next(), next);
  }
}

TEST(InitTest, NormalAndUniformHaveTheirDistributions) {
  const int64_t n = (int64_t{1} << 16) * 8 + 5;
  Rng rng(7);
  Tensor t = Tensor::Empty({n}, DType::kF64);
  InitNormal(&t, 0.02, &rng);
  double sum = 0, sum_sq = 0, max_abs = 0;
  int64_t beyond_3sigma = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double v = t.At(i);
    sum += v;
    sum_sq += v * v;
    max_abs = std::max(max_abs, std::abs(v));
    beyond_3sigma += std::abs(v) > 0.06;
  }
  const double mean = sum / n, stddev = std::sqrt(sum_sq / n - mean * mean);
  EXPECT_LT(std::abs(mean), 5 * 0.02 / std::sqrt(static_cast<double>(n)));
  EXPECT_NEAR(stddev, 0.02, 0.02 * 5 / std::sqrt(2.0 * n));
  EXPECT_LE(max_abs, 0.02 * 5.8);  // u1 >= 2^-24: at most sqrt(2 ln 2^24) standard deviations
  // P(|z| > 3) = 0.0027: 1415 expected here, sd ~38.
  EXPECT_NEAR(static_cast<double>(beyond_3sigma), 0.0027 * n, 200);
  // Neighbouring chunks are independent streams, not copies or shifts of one another.
  const int64_t chunk = int64_t{1} << 16;
  double cross = 0;
  for (int64_t i = 0; i < chunk; ++i) cross += t.At(i) * t.At(chunk + i);
  EXPECT_LT(std::abs(cross / chunk), 5 * 0.02 * 0.02 / std::sqrt(static_cast<double>(chunk)));

  InitUniform(&t, -0.25, 0.75, &rng);
  double lo = 1, hi = -1;
  sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    lo = std::min(lo, t.At(i));
    hi = std::max(hi, t.At(i));
    sum += t.At(i);
  }
  EXPECT_GE(lo, -0.25);
  EXPECT_LT(hi, 0.75);
  EXPECT_NEAR(sum / n, 0.25, 5 * std::sqrt(1.0 / 12) / std::sqrt(static_cast<double>(n)));
}

TEST(InitTest, SeedsGiveTheirOwnWeights) {
  Tensor x = Tensor::Empty({1000}, DType::kF32), y = Tensor::Empty({1000}, DType::kF32);
  Rng a(1), b(2);
  InitNormal(&x, 1.0, &a);
  InitNormal(&y, 1.0, &b);
  int64_t equal = 0;
  for (int64_t i = 0; i < 1000; ++i) equal += x.At(i) == y.At(i);
  EXPECT_LT(equal, 5);
}

TEST(LinearTest, BackwardMatchesFiniteDifferences) {
  Rng rng(1);
  ParamStore store(DType::kF64, Device::kCpu);
  Linear layer({&store, &rng, "lin"}, 7, 5, /*bias=*/true);
  Randomize(&store, &rng);
  CheckOneInputLayer(&store, RandomTensor({2, 3, 7}, &rng), [&](const Tensor& x) { return layer.Forward(x); },
                     [&](const Tensor& dy) { return layer.Backward(dy); }, &rng);
}

TEST(BlockDiagonalLinearTest, BackwardMatchesFiniteDifferences) {
  Rng rng(2);
  ParamStore store(DType::kF64, Device::kCpu);
  BlockDiagonalLinear layer({&store, &rng, "bd"}, 3, 4, 2);
  Randomize(&store, &rng);
  CheckOneInputLayer(&store, RandomTensor({5, 12}, &rng), [&](const Tensor& x) { return layer.Forward(x); },
                     [&](const Tensor& dy) { return layer.Backward(dy); }, &rng);
}

TEST(BlockDiagonalLinearTest, EqualsDenseWithZeroOffDiagonalBlocks) {
  Rng rng(3);
  ParamStore store(DType::kF64, Device::kCpu);
  BlockDiagonalLinear bd({&store, &rng, "bd"}, 2, 3, 3);
  Linear dense({&store, &rng, "dense"}, 6, 6, false);
  Randomize(&store, &rng);
  Tensor& w = dense.weight()->value;
  for (int64_t o = 0; o < 6; ++o)
    for (int64_t i = 0; i < 6; ++i)
      w.Set(o * 6 + i, (o / 3 == i / 3) ? bd.weight()->value.At((o / 3) * 9 + (o % 3) * 3 + i % 3) : 0.0);
  Tensor x = RandomTensor({4, 6}, &rng);
  EXPECT_LT(MaxAbsDiff(bd.Forward(x), dense.Forward(x)), 1e-12);
}

struct NormCase {
  const char* name;
  NormOptions options;
};

class NormTest : public ::testing::TestWithParam<NormCase> {};

TEST_P(NormTest, BackwardMatchesFiniteDifferences) {
  Rng rng(4);
  ParamStore store(DType::kF64, Device::kCpu);
  Norm layer({&store, &rng, "norm"}, 12, GetParam().options);
  Randomize(&store, &rng);
  CheckOneInputLayer(&store, RandomTensor({3, 12}, &rng, 2.0), [&](const Tensor& x) { return layer.Forward(x); },
                     [&](const Tensor& dy) { return layer.Backward(dy); }, &rng);
}

INSTANTIATE_TEST_SUITE_P(
    Kinds, NormTest,
    ::testing::Values(NormCase{"rms", {NormOptions::kRms, 1, 1e-5, false, 0.0, true}},
                      NormCase{"rms_groups", {NormOptions::kRms, 3, 1e-5, false, 0.0, true}},
                      NormCase{"layer_bias", {NormOptions::kLayer, 1, 1e-5, true, 0.0, true}},
                      NormCase{"group_offset", {NormOptions::kLayer, 4, 1e-5, false, 1.0, true}},
                      NormCase{"layer_no_weight", {NormOptions::kLayer, 2, 1e-5, false, 0.0, false}}),
    [](const auto& info) { return std::string(info.param.name); });

TEST(NormTest, RmsNormValues) {
  Rng rng(5);
  ParamStore store(DType::kF64, Device::kCpu);
  Norm layer({&store, &rng, "norm"}, 2, {NormOptions::kRms, 1, 0.0, false, 0.0, true});
  Tensor x = Tensor::Empty({1, 2}, DType::kF64);
  x.Set(0, 3.0);
  x.Set(1, 4.0);
  Tensor y = layer.Forward(x);  // rms = sqrt(12.5)
  EXPECT_NEAR(y.At(0), 3.0 / std::sqrt(12.5), 1e-14);
  EXPECT_NEAR(y.At(1), 4.0 / std::sqrt(12.5), 1e-14);
}

TEST(ActivationTest, GradientsIncludingExtremeValues) {
  Rng rng(6);
  for (Activation act : {Activation::kSilu, Activation::kGelu, Activation::kSigmoid}) {
    Tensor x = RandomTensor({40}, &rng, 3.0);
    x.Set(0, 40.0);
    x.Set(1, -40.0);
    x.Set(2, 700.0);
    x.Set(3, -700.0);
    Tensor dy = RandomTensor({40}, &rng);
    Tensor dx = ActivateBackward(act, x, dy);
    auto loss = [&] { return Inner(Activate(act, x), dy); };
    EXPECT_LT(CheckGradient(loss, &x, dx), kTol) << static_cast<int>(act);
    for (int64_t i = 0; i < 40; ++i) EXPECT_TRUE(std::isfinite(dx.At(i)));
  }
}

TEST(GatedMlpTest, SwiGluAndGeluBackward) {
  for (Activation act : {Activation::kSilu, Activation::kGelu}) {
    Rng rng(7);
    ParamStore store(DType::kF64, Device::kCpu);
    GatedMlp mlp({&store, &rng, "mlp"}, 6, 10, act);
    Randomize(&store, &rng);
    CheckOneInputLayer(&store, RandomTensor({2, 3, 6}, &rng), [&](const Tensor& x) { return mlp.Forward(x); },
                       [&](const Tensor& dy) { return mlp.Backward(dy); }, &rng);
  }
}

TEST(EmbeddingTest, BackwardScattersIntoRows) {
  Rng rng(8);
  ParamStore store(DType::kF64, Device::kCpu);
  Embedding emb({&store, &rng, "emb"}, 5, 3);
  Randomize(&store, &rng);
  std::vector<int32_t> ids = {1, 4, 1, 0};
  Tensor dy = RandomTensor({4, 3}, &rng);
  emb.Forward(ids);
  emb.Backward(dy);
  auto loss = [&] { return Inner(emb.Forward(ids), dy); };
  EXPECT_LT(CheckGradient(loss, &emb.weight()->value, emb.weight()->grad.Clone()), kTol);
  // Row 1 received two contributions.
  EXPECT_NEAR(emb.weight()->grad.At(3), dy.At(0) + dy.At(6), 1e-14);
}

TEST(RopeTest, InverseUndoesAndPreservesNorm) {
  Rng rng(9);
  Tensor x = RandomTensor({2 * 5, 3 * 8}, &rng);
  std::vector<int64_t> pos = {0, 3, 7, 100, 2047};
  Tensor y = ApplyRope(x, 5, 3, 8, 10000.0, pos, false);
  EXPECT_NEAR(SumSquares(y), SumSquares(x), 1e-9);
  EXPECT_LT(MaxAbsDiff(ApplyRope(y, 5, 3, 8, 10000.0, pos, true), x), 1e-12);
  // Position 0 is the identity.
  for (int64_t c = 0; c < 24; ++c) EXPECT_DOUBLE_EQ(y.At(c), x.At(c));
}

TEST(RopeTest, PartialRotaryLeavesTailFeatures) {
  Rng rng(17);
  Tensor x = RandomTensor({3, 2 * 8}, &rng);
  Tensor y = ApplyRope(x, 3, 2, 8, 10000.0, {5, 6, 7}, false, 4);
  for (int64_t r = 0; r < 3; ++r)
    for (int64_t h = 0; h < 2; ++h)
      for (int64_t i = 4; i < 8; ++i) EXPECT_EQ(y.At(r * 16 + h * 8 + i), x.At(r * 16 + h * 8 + i));
  // The rotated part equals a full RoPE of a 4-dim head.
  Tensor x4 = Tensor::Empty({3, 4}, DType::kF64);
  for (int64_t r = 0; r < 3; ++r)
    for (int64_t i = 0; i < 4; ++i) x4.Set(r * 4 + i, x.At(r * 16 + i));
  Tensor y4 = ApplyRope(x4, 3, 1, 4, 10000.0, {5, 6, 7}, false);
  for (int64_t r = 0; r < 3; ++r)
    for (int64_t i = 0; i < 4; ++i) EXPECT_NEAR(y.At(r * 16 + i), y4.At(r * 4 + i), 1e-14);
}

TEST(RopeTest, DotProductDependsOnlyOnRelativePosition) {
  Rng rng(10);
  Tensor q = RandomTensor({1, 8}, &rng), k = RandomTensor({1, 8}, &rng);
  auto dot_at = [&](int64_t pq, int64_t pk) {
    return Inner(ApplyRope(q, 1, 1, 8, 10000.0, {pq}, false), ApplyRope(k, 1, 1, 8, 10000.0, {pk}, false));
  };
  EXPECT_NEAR(dot_at(10, 3), dot_at(107, 100), 1e-10);
  EXPECT_NEAR(dot_at(5, 5), Inner(q, k), 1e-12);
}

struct AttentionCase {
  const char* name;
  int64_t heads, kv_heads, head_dim, seq, group, window, rotary_dim = 0;
};

class AttentionTest : public ::testing::TestWithParam<AttentionCase> {};

TEST_P(AttentionTest, CoreBackwardMatchesFiniteDifferences) {
  const AttentionCase& c = GetParam();
  Rng rng(11);
  const int64_t B = 2, T = c.seq;
  AttentionOptions o{c.heads, c.kv_heads, c.head_dim, 10000.0, c.group, c.window, c.rotary_dim};
  Tensor q = RandomTensor({B, T, c.heads * c.head_dim}, &rng);
  Tensor k = RandomTensor({B, T, c.kv_heads * c.head_dim}, &rng);
  Tensor v = RandomTensor({B, T, c.kv_heads * c.head_dim}, &rng);
  AttentionSaved saved;
  Tensor out = CausalAttentionForward(q, k, v, B, T, o, &saved);
  Tensor dout = RandomTensor(out.shape(), &rng);
  Tensor dq, dk, dv;
  CausalAttentionBackward(saved, dout, o, &dq, &dk, &dv);
  auto loss = [&] {
    AttentionSaved s;
    return Inner(CausalAttentionForward(q, k, v, B, T, o, &s), dout);
  };
  EXPECT_LT(CheckGradient(loss, &q, dq), kTol);
  EXPECT_LT(CheckGradient(loss, &k, dk), kTol);
  EXPECT_LT(CheckGradient(loss, &v, dv), kTol);
}

INSTANTIATE_TEST_SUITE_P(Shapes, AttentionTest,
                         ::testing::Values(AttentionCase{"mha", 2, 2, 4, 6, 0, 0},
                                           AttentionCase{"gqa", 4, 2, 4, 5, 0, 0},
                                           AttentionCase{"mqa", 3, 1, 6, 4, 0, 0},
                                           AttentionCase{"self_extend", 2, 1, 4, 11, 3, 4},
                                           AttentionCase{"self_extend_window_not_multiple", 2, 2, 4, 9, 2, 3},
                                           AttentionCase{"partial_rotary", 2, 1, 6, 5, 0, 0, 2},
                                           AttentionCase{"partial_rotary_self_extend", 2, 2, 6, 9, 2, 3, 4}),
                         [](const auto& info) { return std::string(info.param.name); });

TEST(SelfExtendTest, WindowCoveringSequenceIsPlainAttention) {
  Rng rng(12);
  const int64_t B = 1, T = 16, H = 4, Hk = 2, D = 8;
  Tensor q = RandomTensor({B, T, H * D}, &rng), k = RandomTensor({B, T, Hk * D}, &rng),
         v = RandomTensor({B, T, Hk * D}, &rng);
  AttentionSaved s1, s2, s3;
  Tensor plain = CausalAttentionForward(q, k, v, B, T, {H, Hk, D, 10000.0, 0, 0}, &s1);
  Tensor extended = CausalAttentionForward(q, k, v, B, T, {H, Hk, D, 10000.0, 4, T}, &s2);
  EXPECT_LT(MaxAbsDiff(plain, extended), 1e-13);
  // And a window shorter than the sequence really changes the result.
  Tensor shorter = CausalAttentionForward(q, k, v, B, T, {H, Hk, D, 10000.0, 4, T / 2}, &s3);
  EXPECT_GT(MaxAbsDiff(plain, shorter), 1e-3);
}

// Independent per-pair evaluation of MODELS.md §6: rotate q_i and k_j at the pair's positions.
TEST(SelfExtendTest, MatchesDirectPairwiseDefinition) {
  Rng rng(13);
  const int64_t T = 13, D = 8, G = 4, W = 6;
  Tensor q = RandomTensor({1, T, D}, &rng), k = RandomTensor({1, T, D}, &rng), v = RandomTensor({1, T, D}, &rng);
  AttentionSaved s;
  Tensor out = CausalAttentionForward(q, k, v, 1, T, {1, 1, D, 10000.0, G, W}, &s);
  for (int64_t i = 0; i < T; ++i) {
    std::vector<double> logits(i + 1);
    double mx = -1e300;
    for (int64_t j = 0; j <= i; ++j) {
      const bool neighbour = i - j < W;
      const int64_t pq = neighbour ? i : i / G + W - W / G;
      const int64_t pk = neighbour ? j : j / G;
      Tensor qi = ApplyRope(q.Rows(i, i + 1), 1, 1, D, 10000.0, {pq}, false);
      Tensor kj = ApplyRope(k.Rows(j, j + 1), 1, 1, D, 10000.0, {pk}, false);
      logits[j] = Inner(qi, kj) / std::sqrt(double(D));
      mx = std::max(mx, logits[j]);
    }
    double z = 0;
    for (double& l : logits) z += (l = std::exp(l - mx));
    for (int64_t d = 0; d < D; ++d) {
      double o = 0;
      for (int64_t j = 0; j <= i; ++j) o += logits[j] / z * v.At(j * D + d);
      EXPECT_NEAR(out.At(i * D + d), o, 1e-12) << "i=" << i << " d=" << d;
    }
  }
}

TEST(SelfAttentionTest, LayerBackwardMatchesFiniteDifferences) {
  Rng rng(14);
  ParamStore store(DType::kF64, Device::kCpu);
  SelfAttention attn({&store, &rng, "attn"}, 8, {4, 2, 3, 10000.0, 0, 0});
  Randomize(&store, &rng);
  CheckOneInputLayer(&store, RandomTensor({2, 5, 8}, &rng), [&](const Tensor& x) { return attn.Forward(x, 2, 5); },
                     [&](const Tensor& dy) { return attn.Backward(dy); }, &rng);
}

TEST(CrossEntropyTest, ChunkedEqualsNaiveIncludingIgnoredTargets) {
  Rng rng(15);
  const int64_t N = 37, d = 6, V = 29;
  for (DType dtype : {DType::kF64, DType::kF32}) {
    Tensor h = RandomTensor({N, d}, &rng, 1.0, dtype), w = RandomTensor({V, d}, &rng, 1.0, dtype);
    std::vector<int32_t> targets(N);
    for (auto& t : targets) t = static_cast<int32_t>(rng.Below(V));
    targets[3] = -1;
    Tensor dh_ref, dw_ref = Tensor::Zeros({V, d}, dtype);
    CrossEntropyResult ref = NaiveLmHeadCrossEntropy(h, w, targets, 1.0 / N, &dh_ref, &dw_ref);
    EXPECT_EQ(ref.tokens, N - 1);
    for (auto [vc, rb] : {std::pair<int64_t, int64_t>{7, 5}, {29, 37}, {4, 100}, {1000, 1}}) {
      Tensor dh, dw = Tensor::Zeros({V, d}, dtype);
      CrossEntropyResult got = FusedLmHeadCrossEntropy(h, w, targets, 1.0 / N, {vc, rb}, &dh, &dw);
      const double tol = dtype == DType::kF64 ? 1e-12 : 1e-5;
      EXPECT_NEAR(got.loss, ref.loss, tol * ref.loss);
      EXPECT_EQ(got.tokens, ref.tokens);
      EXPECT_LT(RelativeError(dh, dh_ref), tol);
      EXPECT_LT(RelativeError(dw, dw_ref), tol);
      CrossEntropyResult loss_only = FusedLmHeadCrossEntropy(h, w, targets, 1.0 / N, {vc, rb}, nullptr, nullptr);
      EXPECT_NEAR(loss_only.loss, ref.loss, tol * ref.loss);
    }
  }
}

TEST(CrossEntropyTest, BackwardMatchesFiniteDifferencesAtLargeLogits) {
  Rng rng(16);
  const int64_t N = 6, d = 4, V = 11;
  Tensor h = RandomTensor({N, d}, &rng, 10.0), w = RandomTensor({V, d}, &rng, 10.0);  // logits ~ 200
  std::vector<int32_t> targets = {0, 3, 10, 5, 5, 1};
  Tensor dh, dw = Tensor::Zeros({V, d}, DType::kF64);
  FusedLmHeadCrossEntropy(h, w, targets, 0.5, {4, 4}, &dh, &dw);
  auto loss = [&] { return FusedLmHeadCrossEntropy(h, w, targets, 0.5, {4, 4}, nullptr, nullptr).loss; };
  EXPECT_LT(CheckGradient(loss, &h, dh, 400, 1e-5), kTol);
  EXPECT_LT(CheckGradient(loss, &w, dw, 400, 1e-5), kTol);
  EXPECT_TRUE(std::isfinite(loss()));
}

TEST(CrossEntropyTest, UniformLogitsGiveLogV) {
  const int64_t V = 50;
  Tensor h = Tensor::Zeros({3, 4}, DType::kF64), w = Tensor::Full({V, 4}, DType::kF64, 0.3);
  std::vector<int32_t> targets = {1, 2, 49};
  EXPECT_NEAR(FusedLmHeadCrossEntropy(h, w, targets, 1.0 / 3, {16, 2}, nullptr, nullptr).loss, std::log(V), 1e-12);
}

}  // namespace
}  // namespace gyre::ops
