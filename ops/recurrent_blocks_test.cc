// Each recurrent block's backward against float64 finite differences, at ordinary and at
// extreme gate pre-activations (huge input gates, saturated forget gates, large dt), where the
// stabilisers of the cells are doing the work.
#include "ops/recurrent_blocks.h"

#include <cmath>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "ops/elementwise.h"
#include "ops/block_gradcheck.h"
#include "ops/model.h"
#include "ops/rng.h"

namespace gyre::ops {
namespace {

using testing::CheckBlock;
using testing::CheckGradient;
using testing::Perturb;
using testing::SetParam;
using testing::Inner;
using testing::RandomTensor;

ModelSpec Spec() {
  ModelSpec s;
  s.d_model = 8;
  s.mlstm_heads = 2;
  s.mlstm_inner = 16;
  s.qkv_block_size = 4;
  s.conv_kernel = 3;
  s.mlstm_chunk = 3;
  s.slstm_heads = 2;
  s.slstm_ffn = 12;
  s.ssm_state = 4;
  s.ssm_conv = 4;
  s.ssm_expand = 2;
  s.ssm_head_dim = 4;
  s.ssm_groups = 2;
  s.ssm_chunk = 3;
  return s;
}

TEST(MlstmBlockTest, BackwardMatchesFiniteDifferences) {
  Rng rng(1);
  ParamStore store(DType::kF64, Device::kCpu);
  MlstmBlock block({&store, &rng, "m"}, Spec(), 2);
  Perturb(&store, &rng, 0.3);
  CheckBlock(&block, &store, &rng, 2, 7, 8);
}

TEST(MlstmBlockTest, ExtremeGates) {
  for (double ib : {25.0, -25.0}) {
    for (double fb : {30.0, -30.0}) {
      Rng rng(2);
      ParamStore store(DType::kF64, Device::kCpu);
      MlstmBlock block({&store, &rng, "m"}, Spec(), 2);
      Perturb(&store, &rng, 0.3);
      SetParam(&store, "m.igate.bias", [&](int64_t i) { return ib + i; });
      SetParam(&store, "m.fgate.bias", [&](int64_t i) { return fb - i; });
      CheckBlock(&block, &store, &rng, 1, 7, 8, 0.1);
    }
  }
}

TEST(SlstmBlockTest, BackwardMatchesFiniteDifferences) {
  Rng rng(3);
  ParamStore store(DType::kF64, Device::kCpu);
  SlstmBlock block({&store, &rng, "s"}, Spec(), 1, 3);
  Perturb(&store, &rng, 0.3);
  CheckBlock(&block, &store, &rng, 2, 6, 8);
}

TEST(SlstmBlockTest, ExtremeGates) {
  Rng rng(4);
  ParamStore store(DType::kF64, Device::kCpu);
  SlstmBlock block({&store, &rng, "s"}, Spec(), 0, 3);
  Perturb(&store, &rng, 0.3);
  // i gate +-20, f gate +-25 alternating per unit.
  SetParam(&store, "s.cell.bias", [](int64_t i) {
    const int64_t gate = i / 8, unit = i % 8;
    if (gate == 0) return unit % 2 ? 20.0 : -20.0;
    if (gate == 1) return unit % 3 ? 25.0 : -25.0;
    return 0.1 * unit;
  });
  CheckBlock(&block, &store, &rng, 1, 6, 8, 0.1);
}

TEST(Mamba2BlockTest, BackwardMatchesFiniteDifferences) {
  Rng rng(5);
  ParamStore store(DType::kF64, Device::kCpu);
  Mamba2Block block({&store, &rng, "m"}, Spec(), 2);
  Perturb(&store, &rng, 0.3);
  CheckBlock(&block, &store, &rng, 2, 8, 8);
}

TEST(Mamba2BlockTest, LargeDtAndDecay) {
  Rng rng(6);
  ParamStore store(DType::kF64, Device::kCpu);
  Mamba2Block block({&store, &rng, "m"}, Spec(), 2);
  Perturb(&store, &rng, 0.3);
  SetParam(&store, "m.dt_bias", [](int64_t i) { return i % 2 ? 8.0 : -12.0; });  // dt ~ 8 and ~ 6e-6
  SetParam(&store, "m.A_log", [](int64_t i) { return i % 2 ? 3.0 : -5.0; });
  CheckBlock(&block, &store, &rng, 1, 7, 8, 0.1);
}

TEST(CausalConv1dTest, BackwardMatchesFiniteDifferences) {
  Rng rng(7);
  ParamStore store(DType::kF64, Device::kCpu);
  CausalConv1d conv({&store, &rng, "c"}, 5, 4, true);
  Tensor x = RandomTensor({2, 6, 5}, &rng);
  Tensor y = conv.Forward(x, 2, 6);
  Tensor dy = RandomTensor(y.shape(), &rng);
  Tensor dx = conv.Backward(dy);
  auto loss = [&] { return Inner(conv.Forward(x, 2, 6), dy); };
  EXPECT_LT(CheckGradient(loss, &x, dx), 1e-6);
  for (Parameter* p : store.All()) EXPECT_LT(CheckGradient(loss, &p->value, p->grad.Clone()), 1e-6) << p->name;
  // Causality: changing the last input changes only the last output.
  Tensor y0 = conv.Forward(x, 2, 6);
  x.Set(5 * 5 + 2, x.At(5 * 5 + 2) + 1.0);
  Tensor y1 = conv.Forward(x, 2, 6);
  for (int64_t i = 0; i < 5 * 5; ++i) EXPECT_EQ(y0.At(i), y1.At(i));
  EXPECT_NE(y0.At(5 * 5 + 2), y1.At(5 * 5 + 2));
}


// ---------------------------------------------------------------- Mamba-2 gradient terms

// The recorded per-token terms (SetMamba2GradTermRecording) sum over tokens to the CPU backward's
// dt_bias, A_log and D gradients, heads and groups > 1, a partial chunk; nothing is recorded when
// off.
TEST(Mamba2GradTermsTest, TermsSumToTheGradients) {
  Rng rng(5);
  ParamStore store(DType::kF64, Device::kCpu);
  Mamba2Block block({&store, &rng, "m"}, Spec(), 2);
  Perturb(&store, &rng, 0.3);
  const int64_t B = 2, S = 8, d = 8;
  const Tensor x = RandomTensor({B, S, d}, &rng), dy = RandomTensor({B, S, d}, &rng);
  store.ZeroGrad();
  block.Forward(x, B, S);
  block.Backward(dy);
  EXPECT_TRUE(TakeMamba2GradTerms().empty());
  SetMamba2GradTermRecording(true);
  store.ZeroGrad();
  block.Forward(x, B, S);
  block.Backward(dy);
  SetMamba2GradTermRecording(false);
  const std::vector<Mamba2GradTerms> records = TakeMamba2GradTerms();
  ASSERT_EQ(records.size(), 3u);
  for (const std::string name : {"m.dt_bias", "m.A_log", "m.D"}) {
    const Tensor& grad = store.Find(name)->grad;
    const int64_t H = grad.numel();
    std::vector<double> sum(H, 0.0);
    int found = 0;
    for (const Mamba2GradTerms& r : records) {
      if (r.param != name) continue;
      ++found;
      ASSERT_EQ(r.batch, B);
      ASSERT_EQ(r.seq, S);
      ASSERT_EQ(r.heads, H);
      ASSERT_EQ(static_cast<int64_t>(r.terms.size()), B * S * H);
      for (size_t i = 0; i < r.terms.size(); ++i) sum[i % H] += r.terms[i];
    }
    ASSERT_EQ(found, 1) << name;
    Tensor summed = Tensor::Empty({H}, DType::kF64);
    for (int64_t h = 0; h < H; ++h) summed.Set(h, sum[h]);
    EXPECT_LT(RelativeError(summed, grad), 1e-10) << name;
  }
}

// The Mamba-2 model of recurrent_gpu_test's CheckModel (SmallMamba2: 3 layers, d 64, 4 heads x
// 32, chunk 64, B 2 x T 100, model seed 3 with bf16-rounded weights, tokens seed 5): its float64
// reference gradients w, and gradients built wrong from the reference's own terms the ways a
// kernel could (ops/DT_BIAS_CHECK.md): the combined rule (CheckSumOfTerms, 5e-2 relative OR 1e-2
// of sum|terms|) rejects each in every block for dt_bias, A_log and D; and it accepts every term
// rounded to bf16 (a bound: at most 2^-9 of sum|terms|).
TEST(Mamba2GradTermsTest, SumRuleRejectsStructuralErrorsOnTheModelTestInput) {
  ModelSpec spec = *PresetSpec("mamba2-tiny");
  spec.d_model = 64;
  spec.ssm_head_dim = 32;
  spec.ssm_state = 32;
  spec.ssm_chunk = 64;
  spec.blocks = {BlockType::kMamba2, BlockType::kMamba2, BlockType::kMamba2};
  spec.vocab_size = 512;
  const int64_t B = 2, T = 100, chunk = 64;
  auto f32 = LanguageModel::Create(spec, DType::kF32, Device::kCpu, 3);
  ASSERT_TRUE(f32.ok()) << f32.status();
  auto ref = LanguageModel::Create(spec, DType::kF64, Device::kCpu, 3);
  ASSERT_TRUE(ref.ok()) << ref.status();
  // The GPU test's weights: the seed-3 masters rounded to bf16.
  std::vector<NamedTensor> state = (*f32)->params().State();
  for (NamedTensor& t : state) {
    Tensor v = t.tensor.To(DType::kF64);
    for (int64_t i = 0; i < v.numel(); ++i) v.Set(i, Bf16ToFloat(FloatToBf16(static_cast<float>(v.At(i)))));
    t.tensor = v;
  }
  ASSERT_TRUE((*ref)->params().LoadState(state).ok());
  (*ref)->params().ZeroGrad();
  SetMamba2GradTermRecording(true);
  (*ref)->ForwardBackward(RandomTokens(B * (T + 1), spec.vocab_size, 5), B, T, 1.0 / (B * T));
  SetMamba2GradTermRecording(false);
  const std::vector<Mamba2GradTerms> records = TakeMamba2GradTerms();
  ASSERT_EQ(records.size(), 9u);

  struct Wrong {
    const char* name;
    std::function<std::vector<double>(const Mamba2GradTerms&, const std::vector<double>& w)> make;
  };
  // The sum over the tokens that `keep(b, t)` selects.
  auto partial = [](const Mamba2GradTerms& r, const std::function<bool(int64_t, int64_t)>& keep) {
    std::vector<double> g(r.heads, 0.0);
    for (int64_t b = 0; b < r.batch; ++b)
      for (int64_t t = 0; t < r.seq; ++t)
        if (keep(b, t))
          for (int64_t h = 0; h < r.heads; ++h) g[h] += r.terms[(b * r.seq + t) * r.heads + h];
    return g;
  };
  const std::vector<Wrong> wrongs = {
      {"partial chunk dropped",
       [&](const auto& r, const auto&) { return partial(r, [&](int64_t, int64_t t) { return t < chunk; }); }},
      {"first chunk dropped",
       [&](const auto& r, const auto&) { return partial(r, [&](int64_t, int64_t t) { return t >= chunk; }); }},
      {"sequence 1 dropped",
       [&](const auto& r, const auto&) { return partial(r, [](int64_t b, int64_t) { return b == 0; }); }},
      {"heads rotated", [](const auto& r, const auto& w) {
         std::vector<double> g(w.size());
         for (size_t h = 0; h < w.size(); ++h) g[h] = w[(h + 1) % w.size()];
         return g;
       }},
      {"never accumulated", [](const auto&, const auto& w) { return std::vector<double>(w.size(), 0.0); }},
  };
  auto as_tensor = [](const std::vector<double>& v) {
    Tensor t = Tensor::Empty({static_cast<int64_t>(v.size())}, DType::kF64);
    for (size_t i = 0; i < v.size(); ++i) t.Set(static_cast<int64_t>(i), v[i]);
    return t;
  };
  for (const Mamba2GradTerms& r : records) {
    const Tensor& w = (*ref)->params().Find(r.param)->grad;
    std::vector<double> wv(r.heads);
    for (int64_t h = 0; h < r.heads; ++h) wv[h] = w.At(h);
    const std::vector<double> abs_sums = SumAbsTerms(records, r.param);
    // Control: every term rounded to bf16.
    const std::vector<double> rounded = partial(r, [](int64_t, int64_t) { return true; });
    std::vector<double> g16(r.heads, 0.0);
    for (size_t i = 0; i < r.terms.size(); ++i)
      g16[i % r.heads] += Bf16ToFloat(FloatToBf16(static_cast<float>(r.terms[i])));
    const SumOfTermsCheck exact = CheckSumOfTerms(as_tensor(rounded), w, abs_sums, 5e-2, 1e-2);
    const SumOfTermsCheck c16 = CheckSumOfTerms(as_tensor(g16), w, abs_sums, 5e-2, 1e-2);
    EXPECT_LT(exact.rel_err, 1e-10) << r.param;  // the terms sum to the gradient
    EXPECT_TRUE(c16.pass) << r.param;
    EXPECT_LE(c16.terms_err, std::ldexp(1.0, -9)) << r.param;
    std::string line;
    char buf[96];
    for (const Wrong& wrong : wrongs) {
      const SumOfTermsCheck c = CheckSumOfTerms(as_tensor(wrong.make(r, wv)), w, abs_sums, 5e-2, 1e-2);
      EXPECT_FALSE(c.pass) << r.param << " " << wrong.name << ": rel_err " << c.rel_err << " terms_err "
                           << c.terms_err;
      std::snprintf(buf, sizeof(buf), " | %s %.1e/%.1e%s", wrong.name, c.rel_err, c.terms_err, c.pass ? " PASSED" : "");
      line += buf;
    }
    std::printf("[INFO] %s sum/sum|terms| %.3f; bf16 terms rel_err %.1e terms_err %.1e (accepted)%s\n",
                r.param.c_str(), c16.cancel, c16.rel_err, c16.terms_err, line.c_str());
  }
}

}  // namespace
}  // namespace gyre::ops
