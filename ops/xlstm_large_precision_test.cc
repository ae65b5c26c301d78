// Where the xLSTM Large CUDA forward's distance from float64 comes from (ops/XLSTM_LARGE.md
// "Session 21 (helper xlprec): precision"): a float64 CPU stack of the decode_gpu_test model
// (d 512, NH 4, dk 64, dv 128, 3 blocks, FFN 1408, vocab 512, caps 15 / 30; its parameter
// distributions: Randomise's norm scales and biases N(0, 0.3²), XlstmLargeTweak's gates and head)
// run once exactly and then with the CUDA path's roundings emulated one boundary at a time
// (SetXlstmLargeBf16Emulation: the tensors the CUDA path stores in bf16, the gates in fp32), and
// all together. Every row prints the capped logits' relative error against the exact run.
// Also: InputGainPerFamily (how much each family's test model amplifies a relative input
// perturbation), WhereTheBlockAmplifies (every intermediate of each block, written out from its
// parameters and checked against XlstmLargeBlock::Forward), CarriedErrorsGrowFasterThanFreshOnes,
// and RoundingsDecorrelateWithinAFewStages (a 1e-7 jitter before every rounding: how near a GPU can
// come to the emulation at all; xlstm_large_gpu_test ForwardMatchesTheBf16Emulation uses it).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <tuple>
#include <utility>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "ops/elementwise.h"
#include "ops/layers.h"
#include "ops/model.h"
#include "ops/model_config.h"
#include "ops/rng.h"
#include "ops/xlstm_large_block.h"

namespace gyre::ops {
namespace {

double Bf16(double x) { return Bf16ToFloat(FloatToBf16(static_cast<float>(x))); }

void RoundToBf16(Tensor* t) {
  for (int64_t i = 0; i < t->numel(); ++i) t->Set(i, Bf16(t->At(i)));
}

// The decode_gpu_test model's shape (SmallXlstmLarge there).
ModelSpec Spec() {
  ModelSpec s;
  s.d_model = 512;
  s.xl_heads = 4;
  s.xl_qk_dim = 256;  // dk 64
  s.xl_v_dim = 512;   // dv 128
  s.ffn_dim = 1408;
  s.mlstm_chunk = 64;
  s.norm_eps = 1e-6;
  s.gate_soft_cap = 15.0;
  s.logit_soft_cap = 30.0;
  s.vocab_size = 512;
  return s;
}

// Model-level roundings (outside the block), after the block's stage bits.
constexpr uint32_t kFinalNorm = 1u << 13, kLogits = 1u << 14, kCapped = 1u << 15;

// Embedding rows -> 3 blocks -> final RMSNorm -> head -> 30·tanh(l/30), in float64.
struct Stack {
  ModelSpec spec = Spec();
  ParamStore store{DType::kF64, Device::kCpu};
  Rng rng{8};
  std::vector<std::unique_ptr<XlstmLargeBlock>> blocks;
  std::unique_ptr<Norm> final_norm;
  Parameter* head = nullptr;

  // `tweak`: decode_gpu_test's XlstmLargeTweak on top of Randomise; `model_init`: the block's own
  // init (gate weights 0, input-gate bias −10, forget-gate bias linspace(3, 6), norm scales 1).
  Stack(bool tweak, bool model_init) {
    BuildContext root{&store, &rng, ""};
    for (int i = 0; i < 3; ++i)
      blocks.push_back(std::make_unique<XlstmLargeBlock>(root.Sub("blocks." + std::to_string(i)), spec, 3));
    final_norm = std::make_unique<Norm>(root.Sub("final_norm"), spec.d_model,
                                        NormOptions{NormOptions::kRms, 1, spec.norm_eps, false, 0.0, true});
    head = store.Create("lm_head.weight", {spec.vocab_size, spec.d_model}, ParamKind::kWeight);
    InitNormal(&head->value, std::sqrt(2.0 / (5.0 * spec.d_model)), &rng);
    Rng r(108);
    for (Parameter* p : store.All()) {
      const bool gate = p->name.find("igate_preact") != std::string::npos ||
                        p->name.find("fgate_preact") != std::string::npos;
      for (int64_t i = 0; i < p->value.numel(); ++i) {
        double x = p->value.At(i);
        if (!model_init && (p->kind == ParamKind::kNorm || p->kind == ParamKind::kBias)) x = 0.3 * r.Normal();
        if (tweak && gate) {
          x = r.Normal();
          if (p->kind == ParamKind::kWeight) x *= 0.03;
          else if (p->name.find("fgate") != std::string::npos) x += 4.0;
        }
        if (tweak && p == head) x = 1.25 * r.Normal();
        p->value.Set(i, Bf16(x));  // the GPU test's masters are bf16 numbers (RoundMastersToBf16)
      }
    }
  }

  // `only_block` >= 0: the block stages in that block only.
  // `jitter` > 0: every rounding first moves its value by a relative jitter·N(0, 1) (see
  // SetXlstmLargeBf16Emulation), the model-level ones too.
  Tensor Logits(const Tensor& x0, int64_t batch, int64_t seq, uint32_t stages, int only_block = -1,
                double jitter = 0.0, uint64_t seed = 1) {
    Tensor x = x0;
    for (size_t i = 0; i < blocks.size(); ++i) {
      SetXlstmLargeBf16Emulation(only_block < 0 || only_block == static_cast<int>(i) ? stages & kXlBf16All : 0,
                                 jitter, seed + 100 * i);
      x = blocks[i]->Forward(x, batch, seq);
      blocks[i]->ReleaseActivations();
    }
    SetXlstmLargeBf16Emulation(0);
    Rng jr(seed + 1000);
    auto round = [&](Tensor* t) {
      if (jitter > 0)
        for (int64_t i = 0; i < t->numel(); ++i) t->Set(i, t->At(i) * (1.0 + jitter * jr.Normal()));
      RoundToBf16(t);
    };
    Tensor hn = final_norm->Forward(x.Reshape({batch * seq, spec.d_model}));
    final_norm->ReleaseActivations();
    if (stages & kFinalNorm) round(&hn);
    Tensor logits = LinearForward(hn, head->value);
    if (stages & kLogits) round(&logits);
    logits = SoftCap(logits, spec.logit_soft_cap);
    if (stages & kCapped) round(&logits);
    return logits;
  }
};

struct Stage {
  const char* name;
  uint32_t bits;
};

const Stage kStages[] = {
    {"u (q, k, v, o read it)", kXlBf16U},
    {"u (the gates read it)", kXlBf16UGates},
    {"q, k", kXlBf16QK},
    {"v", kXlBf16V},
    {"o pre-activation", kXlBf16O},
    {"gates fp32", kXlBf16GatesF32},
    {"h (cell output)", kXlBf16H},
    {"LN_head(h) * sigma(o)", kXlBf16Gated},
    {"x1 = x + out_proj", kXlBf16X1},
    {"RMSNorm(x1)", kXlBf16FfnIn},
    {"FFN gate, up", kXlBf16FfnGateUp},
    {"FFN SiLU(g) * up", kXlBf16FfnHidden},
    {"y = x1 + FFN", kXlBf16Y},
    {"final norm", kFinalNorm},
    {"logits", kLogits},
    {"capped logits", kCapped},
};

// Prints one line per stage and returns {all-stages error, Σ single-stage errors²}.
std::pair<double, double> Attribute(const std::string& label, Stack& s, int64_t batch, int64_t seq, bool gate_weights) {
  Rng rng(9);
  // Embedding rows: the model's "small" init N(0, 2/(5d)), bf16 numbers.
  Tensor x = Tensor::Empty({batch, seq, s.spec.d_model}, DType::kF64);
  const double emb = std::sqrt(2.0 / (5.0 * s.spec.d_model));
  for (int64_t i = 0; i < x.numel(); ++i) x.Set(i, Bf16(emb * rng.Normal()));
  const Tensor exact = s.Logits(x, batch, seq, 0);
  double max_logit = 0;
  for (int64_t i = 0; i < exact.numel(); ++i) max_logit = std::max(max_logit, std::fabs(exact.At(i)));
  std::printf("%s B%ld T%ld (max |capped logit| %.1f)\n", label.c_str(), (long)batch, (long)seq, max_logit);
  double sum_sq = 0;
  for (const Stage& st : kStages) {
    const double err = RelativeError(s.Logits(x, batch, seq, st.bits), exact);
    sum_sq += err * err;
    std::printf("  %-24s rel_err %.3e", st.name, err);
    if (st.bits & kXlBf16All)
      for (int b = 0; b < 3; ++b) std::printf("  block %d only %.3e", b, RelativeError(s.Logits(x, batch, seq, st.bits, b), exact));
    std::printf("\n");
    // The emulation rounds something (the gates' u matters only with gate weights).
    if (st.bits != kXlBf16UGates || gate_weights) {
      EXPECT_GT(err, 0.0) << st.name;
    }
  }
  const double all = RelativeError(s.Logits(x, batch, seq, kXlBf16All | kFinalNorm | kLogits | kCapped), exact);
  std::printf("  %-24s rel_err %.3e (root of the sum of squares of the rows: %.3e)\n", "all", all, std::sqrt(sum_sq));
  return {all, sum_sq};
}

TEST(XlstmLargePrecisionTest, Bf16RoundingPerStage) {
  for (const auto& [label, tweak, model_init] :
       std::vector<std::tuple<std::string, bool, bool>>{{"decode_gpu_test weights (Randomise + XlstmLargeTweak)", true, false},
                                                        {"Randomise only", false, false},
                                                        {"the model's own init", false, true}}) {
    Stack s(tweak, model_init);
    const auto [all, sum_sq] = Attribute(label, s, 2, 100, tweak);
    // The roundings' effects add about as independent errors do (measured 1.01-1.23x the root of
    // the sum of squares): no hidden interaction between stages.
    EXPECT_GT(all, 0.8 * std::sqrt(sum_sq));
    EXPECT_LT(all, 1.5 * std::sqrt(sum_sq));
  }
}

// ---------------------------------------------------------------- the models' own gain

// decode_gpu_test's small models (SmallLlama, SmallXlstm, the Mamba-2 stack of SmallMixerHybrid,
// SmallXlstmLarge), their parameters as its Randomise leaves them (norm scales and biases
// N(0, 0.3²)); `xl_tweak` adds XlstmLargeTweak's gates and head.
ModelSpec FamilySpec(const std::string& family) {
  ModelSpec s;
  if (family == "llama") {
    s = *PresetSpec("llama-tiny");
    s.d_model = 128;
    s.attn_heads = 2;
    s.attn_kv_heads = 1;
    s.attn_head_dim = 64;
    s.ffn_dim = 256;
    s.blocks = {BlockType::kAttention, BlockType::kAttention, BlockType::kAttention};
  } else if (family == "xlstm") {
    s = *PresetSpec("xlstm-tiny");
    s.d_model = 128;
    s.mlstm_heads = 4;
    s.mlstm_inner = 256;
    s.slstm_heads = 4;
    s.slstm_ffn = 192;
    s.mlstm_chunk = 32;
    s.blocks = {BlockType::kMlstm, BlockType::kSlstm, BlockType::kMlstm};
  } else if (family == "mamba2") {
    s = *PresetSpec("mamba2-attention-tiny");
    s.d_model = 128;
    s.ssm_head_dim = 32;
    s.ssm_state = 32;
    s.ssm_chunk = 64;
    s.blocks = {BlockType::kMamba2, BlockType::kMamba2, BlockType::kMamba2};
  } else {
    s = *PresetSpec("xlstm-large-tiny");
    const ModelSpec xl = Spec();
    s.d_model = xl.d_model;
    s.xl_heads = xl.xl_heads;
    s.xl_qk_dim = xl.xl_qk_dim;
    s.xl_v_dim = xl.xl_v_dim;
    s.ffn_dim = xl.ffn_dim;
    s.mlstm_chunk = xl.mlstm_chunk;
    s.gate_soft_cap = xl.gate_soft_cap;
    s.logit_soft_cap = xl.logit_soft_cap;
    s.blocks.assign(3, BlockType::kXlstmLarge);
  }
  s.vocab_size = 512;
  return s;
}

// Relative change of the logits when every embedding value is multiplied by (1 + δ), δ uniform in
// ±2^-9 (one bf16 rounding's size; rms 1.13e-3), divided by that rms: how much the model
// amplifies a relative perturbation of its input. Averaged over 3 perturbations.
double InputGain(const std::string& family, bool xl_tweak, bool model_init) {
  const ModelSpec spec = FamilySpec(family);
  auto made = LanguageModel::Create(spec, DType::kF64, Device::kCpu, 8);
  EXPECT_TRUE(made.ok()) << made.status();
  if (!made.ok()) return 0;
  LanguageModel& m = **made;
  Rng r(108);
  for (Parameter* p : m.params().All()) {
    const bool gate = p->name.find("igate_preact") != std::string::npos ||
                      p->name.find("fgate_preact") != std::string::npos;
    for (int64_t i = 0; i < p->value.numel(); ++i) {
      double x = p->value.At(i);
      if (!model_init && (p->kind == ParamKind::kNorm || p->kind == ParamKind::kBias)) x = 0.3 * r.Normal();
      if (xl_tweak && gate) {
        x = r.Normal();
        if (p->kind == ParamKind::kWeight) x *= 0.03;
        else if (p->name.find("fgate") != std::string::npos) x += 4.0;
      }
      if (xl_tweak && p->name == "lm_head.weight") x = 1.25 * r.Normal();
      p->value.Set(i, x);
    }
  }
  const int64_t B = 2, T = 100;
  Rng tr(9);
  std::vector<int32_t> inputs(B * T);
  for (int32_t& t : inputs) t = static_cast<int32_t>(tr.Uniform() * spec.vocab_size) % spec.vocab_size;
  const Tensor exact = m.Logits(inputs, B, T);
  Parameter* emb = m.params().Find("embedding.weight");
  EXPECT_NE(emb, nullptr);
  const Tensor saved = emb->value.Clone();
  double gain = 0;
  for (int rep = 0; rep < 3; ++rep) {
    for (int64_t i = 0; i < saved.numel(); ++i)
      emb->value.Set(i, saved.At(i) * (1.0 + std::ldexp(2.0 * tr.Uniform() - 1.0, -9)));
    gain += RelativeError(m.Logits(inputs, B, T), exact) / (std::ldexp(1.0, -9) / std::sqrt(3.0)) / 3;
  }
  emb->value.CopyFrom(saved);
  return gain;
}

TEST(XlstmLargePrecisionTest, InputGainPerFamily) {
  double large_min = INFINITY, others_max = 0;
  for (const auto& [family, tweak, init] : std::vector<std::tuple<std::string, bool, bool>>{
           {"llama", false, false}, {"mamba2", false, false}, {"xlstm", false, false}, {"xlstm", false, true},
           {"xlstm-large", true, false}, {"xlstm-large", false, false}, {"xlstm-large", false, true}}) {
    const double gain = InputGain(family, tweak, init);
    std::printf("%-12s %-22s logits rel change / input rel change %.2f\n", family.c_str(),
                tweak ? "Randomise + tweak" : init ? "model init" : "Randomise", gain);
    EXPECT_GT(gain, 0.0);
    (family == "xlstm-large" ? large_min : others_max) =
        family == "xlstm-large" ? std::min(large_min, gain) : std::max(others_max, gain);
  }
  // The finding (ops/XLSTM_LARGE.md, session 21): the xLSTM Large model amplifies a relative input
  // perturbation at least twice as much as any of the other families' test models.
  std::printf("xlstm-large smallest gain %.2f, other families' largest %.2f\n", large_min, others_max);
  EXPECT_GT(large_min, 2.0 * others_max);
}

// ---------------------------------------------------------------- where a block amplifies

// One XlstmLargeBlock's forward written out from its parameters (the step recurrence for the
// cell, float64), keeping every intermediate; checked against XlstmLargeBlock::Forward below.
struct Probe {
  Tensor u, q, k, v, o, ig, fg, h, gated, branch, x1, ffn, y;
  double e_m_branch = 0;     // share of (token, head) whose denominator is e^{-m}, not |n·q̂|
  double mean_over_std = 0;  // rms over (token, head) of |per-head mean of h| / its std
  double h_rms = 0;
};

Tensor Rms(const Tensor& x, const Tensor& w, double eps) {
  Tensor y = Tensor::EmptyLike(x);
  const int64_t d = x.cols();
  for (int64_t r = 0; r < x.rows(); ++r) {
    double ss = 0;
    for (int64_t j = 0; j < d; ++j) ss += x.At(r * d + j) * x.At(r * d + j);
    const double rstd = 1.0 / std::sqrt(ss / d + eps);
    for (int64_t j = 0; j < d; ++j) y.Set(r * d + j, x.At(r * d + j) * rstd * w.At(j));
  }
  return y;
}

Probe ProbeBlock(ParamStore& store, const std::string& b, const ModelSpec& spec, const Tensor& x2d, int64_t batch,
                 int64_t seq) {
  auto W = [&](const std::string& n) -> const Tensor& { return store.Find(b + "." + n)->value; };
  const int64_t NH = spec.xl_heads, dk = spec.xl_qk_dim / NH, dv = spec.xl_v_dim / NH;
  Probe p;
  p.u = Rms(x2d, W("norm_mlstm.weight"), spec.norm_eps);
  p.q = LinearForward(p.u, W("mlstm.q.weight"));
  p.k = LinearForward(p.u, W("mlstm.k.weight"));
  p.v = LinearForward(p.u, W("mlstm.v.weight"));
  p.o = LinearForward(p.u, W("mlstm.ogate_preact.weight"));
  p.ig = LinearForward(p.u, W("mlstm.igate_preact.weight"));
  p.fg = LinearForward(p.u, W("mlstm.fgate_preact.weight"));
  for (int64_t r = 0; r < p.ig.rows(); ++r)
    for (int64_t h = 0; h < NH; ++h) {
      p.ig.Set(r * NH + h, SoftCapValue(p.ig.At(r * NH + h) + W("mlstm.igate_preact.bias").At(h), spec.gate_soft_cap));
      p.fg.Set(r * NH + h, SoftCapValue(p.fg.At(r * NH + h) + W("mlstm.fgate_preact.bias").At(h), spec.gate_soft_cap));
    }
  // The step recurrence (kernels/cpu/mlstm.h's formulas), sigmoid forget gate, ε 1e-6.
  p.h = Tensor::Empty({batch * seq, NH * dv}, DType::kF64);
  int64_t e_m = 0;
  for (int64_t bb = 0; bb < batch; ++bb)
    for (int64_t hd = 0; hd < NH; ++hd) {
      std::vector<double> C(dk * dv, 0.0), n(dk, 0.0);
      double m = 0;
      for (int64_t t = 0; t < seq; ++t) {
        const int64_t r = bb * seq + t;
        const double f_pre = p.fg.At(r * NH + hd), lf = -std::log1p(std::exp(-f_pre));
        const double i_pre = p.ig.At(r * NH + hd), m_new = std::max(lf + m, i_pre);
        const double fp = std::exp(lf + m - m_new), ip = std::exp(i_pre - m_new);
        m = m_new;
        double nq = 0;
        std::vector<double> num(dv, 0.0);
        for (int64_t i = 0; i < dk; ++i) {
          const double ki = p.k.At(r * NH * dk + hd * dk + i), qi = p.q.At(r * NH * dk + hd * dk + i) / std::sqrt(dk);
          n[i] = fp * n[i] + ip * ki;
          nq += n[i] * qi;
          for (int64_t j = 0; j < dv; ++j) {
            double& c = C[i * dv + j];
            c = fp * c + ip * ki * p.v.At(r * NH * dv + hd * dv + j);
            num[j] += c * qi;
          }
        }
        const double den = std::max(std::fabs(nq), std::exp(-m)) + 1e-6;
        if (std::exp(-m) > std::fabs(nq)) ++e_m;
        for (int64_t j = 0; j < dv; ++j) p.h.Set(r * NH * dv + hd * dv + j, num[j] / den);
      }
    }
  p.e_m_branch = static_cast<double>(e_m) / (batch * seq * NH);
  // Per-head LayerNorm (weight only) ⊙ σ(o).
  p.gated = Tensor::EmptyLike(p.h);
  double ratio_sq = 0, h_sq = 0;
  for (int64_t r = 0; r < batch * seq; ++r)
    for (int64_t hd = 0; hd < NH; ++hd) {
      double mean = 0, var = 0;
      for (int64_t j = 0; j < dv; ++j) mean += p.h.At(r * NH * dv + hd * dv + j) / dv;
      for (int64_t j = 0; j < dv; ++j) {
        const double c = p.h.At(r * NH * dv + hd * dv + j) - mean;
        var += c * c / dv;
        h_sq += p.h.At(r * NH * dv + hd * dv + j) * p.h.At(r * NH * dv + hd * dv + j);
      }
      ratio_sq += mean * mean / var;
      const double rstd = 1.0 / std::sqrt(var + spec.norm_eps);
      for (int64_t j = 0; j < dv; ++j) {
        const int64_t i = r * NH * dv + hd * dv + j;
        const double so = 1.0 / (1.0 + std::exp(-p.o.At(i)));
        p.gated.Set(i, (p.h.At(i) - mean) * rstd * W("mlstm.multihead_norm.weight").At(hd * dv + j) * so);
      }
    }
  p.mean_over_std = std::sqrt(ratio_sq / (batch * seq * NH));
  p.h_rms = std::sqrt(h_sq / p.h.numel());
  p.branch = LinearForward(p.gated, W("mlstm.out_proj.weight"));
  p.x1 = Add(x2d, p.branch);
  const Tensor un = Rms(p.x1, W("norm_ffn.weight"), spec.norm_eps);
  const Tensor g = LinearForward(un, W("ffn.gate_proj.weight")), up = LinearForward(un, W("ffn.up_proj.weight"));
  p.ffn = LinearForward(Mul(Activate(Activation::kSilu, g), up), W("ffn.down_proj.weight"));
  p.y = Add(p.x1, p.ffn);
  return p;
}

// Every block's intermediates at the exact input and at the input times (1 + δ), δ uniform in
// ±2^-9 (one bf16 rounding's size, rms 1.13e-3): the relative change of each, divided by 1.13e-3.
TEST(XlstmLargePrecisionTest, WhereTheBlockAmplifies) {
  for (const auto& [label, tweak, model_init] :
       std::vector<std::tuple<std::string, bool, bool>>{{"Randomise + tweak", true, false},
                                                        {"Randomise only", false, false},
                                                        {"the model's own init", false, true}}) {
    Stack s(tweak, model_init);
    const int64_t B = 2, T = 100, d = s.spec.d_model;
    Rng rng(9);
    Tensor x = Tensor::Empty({B * T, d}, DType::kF64);
    const double emb = std::sqrt(2.0 / (5.0 * d));
    for (int64_t i = 0; i < x.numel(); ++i) x.Set(i, Bf16(emb * rng.Normal()));
    std::printf("%s: relative change / input's relative change (rms 1.13e-3), per block\n", label.c_str());
    std::printf("  %-6s %6s %6s %6s %6s %6s %6s %6s %6s %6s %6s %6s | e^-m share, |mean|/std of h, h rms\n",
                "block", "u", "q", "k", "v", "h", "gated", "branch", "x1", "ffn", "y", "y/x");
    for (int blk = 0; blk < 3; ++blk) {
      const std::string name = "blocks." + std::to_string(blk);
      const Probe p = ProbeBlock(s.store, name, s.spec, x, B, T);
      // The written-out forward is the block's.
      const Tensor y_block = s.blocks[blk]->Forward(x.Reshape({B, T, d}), B, T);
      s.blocks[blk]->ReleaseActivations();
      EXPECT_LT(RelativeError(p.y, y_block.Reshape({B * T, d})), 1e-12) << name;
      Tensor xp = x.Clone();
      for (int64_t i = 0; i < xp.numel(); ++i) xp.Set(i, x.At(i) * (1.0 + std::ldexp(2.0 * rng.Uniform() - 1.0, -9)));
      const double in = RelativeError(xp, x);
      const Probe pp = ProbeBlock(s.store, name, s.spec, xp, B, T);
      auto g = [&](const Tensor& a, const Tensor& b) { return RelativeError(a, b) / in; };
      Tensor xr = x.Clone();
      RoundToBf16(&xr);
      const Probe pr = ProbeBlock(s.store, name, s.spec, xr, B, T);
      std::printf("  bf16-rounded input: rel change %.3e, y %.3e (gain %.2f)\n", RelativeError(xr, x), RelativeError(pr.y, p.y), RelativeError(pr.y, p.y) / std::max(RelativeError(xr, x), 1e-300));
      std::printf("  %-6d %6.2f %6.2f %6.2f %6.2f %6.2f %6.2f %6.2f %6.2f %6.2f %6.2f %6.2f | %.2f, %.3f, %.2e\n", blk,
                  g(pp.u, p.u), g(pp.q, p.q), g(pp.k, p.k), g(pp.v, p.v), g(pp.h, p.h), g(pp.gated, p.gated),
                  g(pp.branch, p.branch), g(pp.x1, p.x1), g(pp.ffn, p.ffn), g(pp.y, p.y),
                  std::sqrt(SumSquares(p.y) / SumSquares(x)), p.e_m_branch, p.mean_over_std, p.h_rms);
      x = p.y;
    }
  }
}

// Block 0's output rounded to bf16 (what the CUDA path stores), carried through blocks 1 and 2
// exactly: the carried error grows more per block than a fresh rounding of the same block's input
// does (the errors a block leaves lie along what the next blocks amplify); and the probe chain's
// logits equal the emulation's (Stack::Logits with kXlBf16Y in block 0 only).
TEST(XlstmLargePrecisionTest, CarriedErrorsGrowFasterThanFreshOnes) {
  Stack s(true, false);
  const int64_t B = 2, T = 100, d = s.spec.d_model;
  Rng rng(9);
  Tensor x = Tensor::Empty({B * T, d}, DType::kF64);
  const double emb = std::sqrt(2.0 / (5.0 * d));
  for (int64_t i = 0; i < x.numel(); ++i) x.Set(i, Bf16(emb * rng.Normal()));
  const Tensor y0 = ProbeBlock(s.store, "blocks.0", s.spec, x, B, T).y;
  Tensor a = y0, b = y0.Clone();
  RoundToBf16(&b);
  double err = RelativeError(b, a);
  std::printf("block 0's y rounded: rel change %.3e\n", err);
  for (int blk = 1; blk < 3; ++blk) {
    const std::string name = "blocks." + std::to_string(blk);
    Tensor fresh = a.Clone();
    RoundToBf16(&fresh);
    const Probe exact = ProbeBlock(s.store, name, s.spec, a, B, T);
    const double fresh_gain =
        RelativeError(ProbeBlock(s.store, name, s.spec, fresh, B, T).y, exact.y) / RelativeError(fresh, a);
    b = ProbeBlock(s.store, name, s.spec, b, B, T).y;
    a = exact.y;
    const double carried = RelativeError(b, a);
    std::printf("after block %d: carried %.3e (x%.2f); a fresh rounding of its input grows x%.2f\n", blk, carried,
                carried / err, fresh_gain);
    if (blk == 2) {  // at block 1 the carried error is a fresh one
      EXPECT_GT(carried / err, fresh_gain) << name;
    }
    err = carried;
  }
  const Tensor exact = s.Logits(x.Reshape({B, T, d}), B, T, 0);
  const Tensor emulated = s.Logits(x.Reshape({B, T, d}), B, T, kXlBf16Y, 0);
  auto head = [&](const Tensor& y) {
    return SoftCap(LinearForward(Rms(y, s.store.Find("final_norm.weight")->value, 1e-6), s.head->value), 30.0);
  };
  std::printf("logits: rel change %.3e\n", RelativeError(head(b), head(a)));
  EXPECT_LT(RelativeError(head(a), exact), 1e-12);
  EXPECT_LT(RelativeError(head(b), emulated), 1e-12);
}

// ---------------------------------------------------------------- how far the GPU can match the emulation

// The GPU's pre-rounding values differ from the float64 ones by its fp32 accumulation (relative
// ~1e-7). A rounding is a step function: near a step that difference flips it by a whole bf16
// unit, the flipped units move the next stage's values by more, and so on; so two forwards that
// round the same tensors from inputs 1e-7 apart end up with partly independent rounding errors.
// Here: the full emulation (every block stage and the final norm / logit roundings) with and
// without a relative 1e-7 jitter before every rounding, at two jitter streams; and the block-stage
// emulation alone (what ForwardMatchesTheBf16Emulation compares the GPU with) against the jittered
// full one: the distance that GPU test can expect from its emulation even when both round alike.
TEST(XlstmLargePrecisionTest, RoundingsDecorrelateWithinAFewStages) {
  for (const auto& [label, tweak, model_init] :
       std::vector<std::tuple<std::string, bool, bool>>{{"decode_gpu_test weights", true, false},
                                                        {"the model's own init", false, true}}) {
    Stack s(tweak, model_init);
    const int64_t B = 2, T = 100, d = s.spec.d_model;
    Rng rng(9);
    Tensor x = Tensor::Empty({B, T, d}, DType::kF64);
    const double emb = std::sqrt(2.0 / (5.0 * d));
    for (int64_t i = 0; i < x.numel(); ++i) x.Set(i, Bf16(emb * rng.Normal()));
    const uint32_t all = kXlBf16All | kFinalNorm | kLogits | kCapped;
    const Tensor exact = s.Logits(x, B, T, 0);
    const Tensor e0 = s.Logits(x, B, T, all);
    const Tensor e1 = s.Logits(x, B, T, all, -1, 1e-7, 1);
    const Tensor e2 = s.Logits(x, B, T, all, -1, 1e-7, 2);
    const Tensor blocks_only = s.Logits(x, B, T, kXlBf16All);
    const double d01 = RelativeError(e1, e0), d12 = RelativeError(e2, e1);
    std::printf("%s: emulation vs f64 %.3e; with 1e-7 jitter vs without %.3e, two jitter streams %.3e; "
                "block stages only vs f64 %.3e, vs the jittered full emulation %.3e\n", label.c_str(),
                RelativeError(e0, exact), d01, d12, RelativeError(blocks_only, exact), RelativeError(blocks_only, e1));
    // Far from linear: a 1e-7 input difference would move smooth arithmetic by ~1e-6.
    EXPECT_GT(d01, 1e-4);
    EXPECT_GT(d12, 1e-4);
  }
  // Block level as the GPU test (x of std 1, the increment y − x): emulation vs jittered emulation.
  Stack s(true, false);
  const int64_t B = 2, T = 100, d = s.spec.d_model;
  Rng rng(21);
  Tensor x = Tensor::Empty({B, T, d}, DType::kF64);
  for (int64_t i = 0; i < x.numel(); ++i) x.Set(i, Bf16(rng.Normal()));
  auto increment = [&](double jitter, uint64_t seed) {
    SetXlstmLargeBf16Emulation(kXlBf16All, jitter, seed);
    Tensor y = Add(s.blocks[0]->Forward(x, B, T), Scale(x, -1.0));
    SetXlstmLargeBf16Emulation(0);
    s.blocks[0]->ReleaseActivations();
    return y;
  };
  const Tensor exact = Add(s.blocks[0]->Forward(x, B, T), Scale(x, -1.0));
  s.blocks[0]->ReleaseActivations();
  const Tensor i0 = increment(0.0, 1), i1 = increment(1e-7, 1);
  std::printf("block 0 increment y - x (x of std 1): emulation vs f64 %.3e, with 1e-7 jitter vs without %.3e\n",
              RelativeError(i0, exact), RelativeError(i1, i0));
}

}  // namespace
}  // namespace gyre::ops
