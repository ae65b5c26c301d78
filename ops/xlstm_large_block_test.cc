// The xLSTM Large block (ops/xlstm_large_block.h) and the two soft caps against float64 finite
// differences: every parameter and the input, at ordinary gates and at gate pre-activations far
// past the cap (where the cap's slope sech² is small and the cell's stabiliser works); the capped
// cross entropy (fused, chunked) against the naive one and finite differences; decoding steps
// equal the full forward.
#include "ops/xlstm_large_block.h"

#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "ops/cross_entropy.h"
#include "ops/elementwise.h"
#include "ops/block_gradcheck.h"
#include "ops/rng.h"

namespace gyre::ops {
namespace {

using testing::CheckBlock;
using testing::CheckGradient;
using testing::Perturb;
using testing::SetParam;
using testing::Inner;
using testing::RandomTensor;

// d 8, 2 heads: q/k 4 wide (dk 2), v 8 wide (dv 4): dk != dv as in the 7B (256 / 512).
ModelSpec Spec() {
  ModelSpec s;
  s.d_model = 8;
  s.xl_heads = 2;
  s.xl_qk_dim = 4;
  s.xl_v_dim = 8;
  s.ffn_dim = 12;
  s.mlstm_chunk = 3;  // several chunks, the last one short
  s.norm_eps = 1e-6;
  s.gate_soft_cap = 15.0;
  return s;
}

// 2 RMSNorms, q k v o, 2 gates (w + b each), head norm, out_proj, 3 FFN.
constexpr int kParams = 15;

TEST(XlstmLargeBlockTest, ParameterNamesAndCount) {
  Rng rng(1);
  ParamStore store(DType::kF64, Device::kCpu);
  ModelSpec s = Spec();
  XlstmLargeBlock block({&store, &rng, "b"}, s, 2);
  // MODELS.md §8 with qk = d/2, v = d: 4d² + 2(d·NH + NH) + d + 2d + 3d·f.
  const int64_t d = 8, nh = 2, f = 12;
  EXPECT_EQ(store.NumParameters(), 4 * d * d + 2 * (d * nh + nh) + d + 2 * d + 3 * d * f);
  ASSERT_NE(store.Find("b.mlstm.igate_preact.bias"), nullptr);
  ASSERT_NE(store.Find("b.mlstm.fgate_preact.bias"), nullptr);
  // Init: input-gate bias −10, forget-gate bias linspace(3, 6), gate weights 0, norm scales 1.
  EXPECT_EQ(store.Find("b.mlstm.igate_preact.bias")->value.At(0), -10.0);
  EXPECT_EQ(store.Find("b.mlstm.fgate_preact.bias")->value.At(0), 3.0);
  EXPECT_EQ(store.Find("b.mlstm.fgate_preact.bias")->value.At(1), 6.0);
  EXPECT_EQ(SumSquares(store.Find("b.mlstm.igate_preact.weight")->value), 0.0);
  EXPECT_EQ(store.Find("b.norm_mlstm.weight")->value.At(3), 1.0);
  EXPECT_EQ(store.Find("b.mlstm.multihead_norm.weight")->value.At(5), 1.0);
}

TEST(XlstmLargeBlockTest, BackwardMatchesFiniteDifferences) {
  Rng rng(2);
  ParamStore store(DType::kF64, Device::kCpu);
  XlstmLargeBlock block({&store, &rng, "b"}, Spec(), 2);
  Perturb(&store, &rng, 0.3);
  EXPECT_EQ(CheckBlock(&block, &store, &rng, 2, 7, 8), kParams);
}

// The gate pre-activations far beyond the cap (raw ±40 -> capped ±14.8, slope sech²(8/3) = 0.019)
// and at it (±15 raw), in all four sign combinations: the soft cap's derivative and the cell's
// stabiliser together.
TEST(XlstmLargeBlockTest, ExtremeGatePreActivations) {
  for (double ib : {40.0, -40.0, 15.0}) {
    for (double fb : {40.0, -40.0}) {
      Rng rng(3);
      ParamStore store(DType::kF64, Device::kCpu);
      XlstmLargeBlock block({&store, &rng, "b"}, Spec(), 2);
      Perturb(&store, &rng, 0.3);
      SetParam(&store, "b.mlstm.igate_preact.bias", [&](int64_t i) { return ib + i; });
      SetParam(&store, "b.mlstm.fgate_preact.bias", [&](int64_t i) { return fb - i; });
      EXPECT_EQ(CheckBlock(&block, &store, &rng, 1, 7, 8, 0.1), kParams);
    }
  }
}

// With the cap the gates stay inside (−cap, cap) whatever the pre-activation; without it (cap 0)
// the block is the uncapped one (the same forward as a cap of +inf).
TEST(XlstmLargeBlockTest, GateCapBoundsAndOff) {
  Rng rng(4);
  ModelSpec capped = Spec(), uncapped = Spec();
  uncapped.gate_soft_cap = 0.0;
  ParamStore s1(DType::kF64, Device::kCpu), s2(DType::kF64, Device::kCpu);
  Rng r1(5), r2(5);
  XlstmLargeBlock b1({&s1, &r1, "b"}, capped, 2), b2({&s2, &r2, "b"}, uncapped, 2);
  Tensor x = RandomTensor({1, 5, 8}, &rng);
  // Small gates: the cap is nearly the identity (15 tanh(x/15) - x = O(x³/675)).
  Tensor y1 = b1.Forward(x, 1, 5), y2 = b2.Forward(x, 1, 5);
  SetParam(&s1, "b.mlstm.igate_preact.bias", [](int64_t) { return 0.01; });
  SetParam(&s2, "b.mlstm.igate_preact.bias", [](int64_t) { return 0.01; });
  SetParam(&s1, "b.mlstm.fgate_preact.bias", [](int64_t) { return 0.02; });
  SetParam(&s2, "b.mlstm.fgate_preact.bias", [](int64_t) { return 0.02; });
  y1 = b1.Forward(x, 1, 5);
  y2 = b2.Forward(x, 1, 5);
  EXPECT_LT(RelativeError(y1, y2), 1e-5);
  EXPECT_GT(RelativeError(y1, y2), 0.0);
  // Input-gate pre-activations of ±10..±40 varying over tokens: capped and uncapped weight the
  // tokens differently.
  SetParam(&s1, "b.mlstm.igate_preact.weight", [](int64_t i) { return 12.0 * (i % 3 - 1); });
  SetParam(&s2, "b.mlstm.igate_preact.weight", [](int64_t i) { return 12.0 * (i % 3 - 1); });
  EXPECT_GT(RelativeError(b1.Forward(x, 1, 5), b2.Forward(x, 1, 5)), 1e-3);
}

TEST(SoftCapTest, ValuesAndSlopeMatchFiniteDifferences) {
  Rng rng(6);
  Tensor x = RandomTensor({64}, &rng, 20.0);
  x.Set(0, 1e4);   // deep saturation: the slope underflows to 0, not NaN
  x.Set(1, -1e4);
  Tensor y = SoftCap(x, 15.0);
  for (int64_t i = 0; i < x.numel(); ++i) {
    EXPECT_LT(std::fabs(y.At(i)), 15.0 + 1e-12);
    EXPECT_NEAR(y.At(i), 15.0 * std::tanh(x.At(i) / 15.0), 1e-12);
  }
  Tensor dy = RandomTensor({64}, &rng);
  Tensor dx = SoftCapBackward(x, dy, 15.0);
  EXPECT_EQ(dx.At(0), 0.0);
  EXPECT_EQ(dx.At(1), 0.0);
  auto loss = [&] { return Inner(SoftCap(x, 15.0), dy); };
  EXPECT_LT(CheckGradient(loss, &x, dx, 64, 1e-6, 1e-3), 1e-7);
  // Near 0 the cap is the identity, and the slope is accurate where 1 − (y/c)² would cancel.
  EXPECT_NEAR(SoftCapValue(1e-3, 30.0), 1e-3, 1e-12);
  EXPECT_NEAR(SoftCapSlope(300.0, 30.0) / (4.0 * std::exp(-20.0)), 1.0, 1e-8);
}

// The capped LM-head loss: the fused (vocabulary chunks, row blocks) and naive forms agree, and
// both gradients match finite differences; logits large enough that the cap matters.
TEST(LogitSoftCapTest, FusedEqualsNaiveAndMatchesFiniteDifferences) {
  Rng rng(7);
  const int64_t N = 7, d = 5, V = 13;
  Tensor h = RandomTensor({N, d}, &rng, 3.0), w = RandomTensor({V, d}, &rng, 4.0);
  std::vector<int32_t> targets = {3, -1, 12, 0, 7, 7, 2};
  const double cap = 30.0, scale = 1.0 / 6;
  CrossEntropyOptions opt;
  opt.vocab_chunk = 5;
  opt.row_block = 3;
  opt.logit_soft_cap = cap;
  Tensor dh_f, dw_f = Tensor::Zeros({V, d}, DType::kF64), dh_n, dw_n = Tensor::Zeros({V, d}, DType::kF64);
  const double lf = FusedLmHeadCrossEntropy(h, w, targets, scale, opt, &dh_f, &dw_f).loss;
  const double ln = NaiveLmHeadCrossEntropy(h, w, targets, scale, &dh_n, &dw_n, cap).loss;
  EXPECT_NEAR(lf, ln, 1e-12 * std::fabs(ln));
  EXPECT_LT(RelativeError(dh_f, dh_n), 1e-12);
  EXPECT_LT(RelativeError(dw_f, dw_n), 1e-12);
  // One vocabulary chunk (pass 2 must still recompute the raw logits for the cap's slope).
  CrossEntropyOptions one = opt;
  one.vocab_chunk = 64;
  Tensor dh_1, dw_1 = Tensor::Zeros({V, d}, DType::kF64);
  EXPECT_NEAR(FusedLmHeadCrossEntropy(h, w, targets, scale, one, &dh_1, &dw_1).loss, ln, 1e-12 * std::fabs(ln));
  EXPECT_LT(RelativeError(dh_1, dh_n), 1e-12);
  EXPECT_LT(RelativeError(dw_1, dw_n), 1e-12);
  auto loss = [&] { return FusedLmHeadCrossEntropy(h, w, targets, scale, opt, nullptr, nullptr).loss; };
  EXPECT_LT(CheckGradient(loss, &h, dh_f), 1e-6);
  EXPECT_LT(CheckGradient(loss, &w, dw_f), 1e-6);
  // The cap changes the loss at these logit sizes (|h·w| up to ~60), and logits stay inside it.
  opt.logit_soft_cap = 0;
  EXPECT_GT(std::fabs(FusedLmHeadCrossEntropy(h, w, targets, scale, opt, nullptr, nullptr).loss - lf), 1e-3);
  Tensor logits = LmHeadLogits(h, w, cap);
  for (int64_t i = 0; i < logits.numel(); ++i) EXPECT_LT(std::fabs(logits.At(i)), cap);
}

// Stepping the block through a sequence (one position at a time, and in chunks of 3 with a
// rewind) reproduces its full forward.
TEST(XlstmLargeBlockTest, StepsEqualForwardAndRewindRestores) {
  Rng rng(8);
  ParamStore store(DType::kF64, Device::kCpu);
  XlstmLargeBlock block({&store, &rng, "b"}, Spec(), 2);
  Perturb(&store, &rng, 0.3);
  const int64_t B = 2, T = 7, d = 8;
  Tensor x = RandomTensor({B, T, d}, &rng);
  Tensor full = block.Forward(x, B, T);
  block.ReleaseActivations();
  auto position = [&](int64_t t) {  // [B, d] rows of position t
    Tensor r = Tensor::Empty({B, d}, DType::kF64);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t c = 0; c < d; ++c) r.Set(b * d + c, x.At((b * T + t) * d + c));
    return r;
  };
  auto expect_row = [&](const Tensor& y, int64_t row, int64_t t, int64_t b) {
    for (int64_t c = 0; c < d; ++c) EXPECT_NEAR(y.At(row * d + c), full.At((b * T + t) * d + c), 1e-12) << t;
  };
  auto st = block.NewState(B);
  for (int64_t t = 0; t < T; ++t) {
    Tensor y = block.Step(position(t), st.get());
    for (int64_t b = 0; b < B; ++b) expect_row(y, b, t, b);
  }
  // Chunks: positions 0..2, then 3..5 rewound to keep 1 (position 3), then 4..6.
  auto chunked = block.NewState(B);
  auto feed = [&](int64_t t0, int64_t n, bool rewindable) {
    Tensor in = Tensor::Empty({n * B, d}, DType::kF64);
    for (int64_t j = 0; j < n; ++j) in.Rows(j * B, (j + 1) * B).CopyFrom(position(t0 + j));
    Tensor y = block.StepChunk(in, n, chunked.get(), rewindable);
    for (int64_t j = 0; j < n; ++j)
      for (int64_t b = 0; b < B; ++b) expect_row(y, j * B + b, t0 + j, b);
  };
  feed(0, 3, false);
  feed(3, 3, true);
  block.Rewind(chunked.get(), 1);
  feed(4, 3, false);
}

}  // namespace
}  // namespace gyre::ops
