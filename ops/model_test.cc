// Whole-model tests: gradients of the full loss against float64 finite differences (every
// parameter tensor, sampled elements), recomputation and MTP orders give the same gradients,
// MTP with n = 1 is the ordinary next-token loss, parameter counts match the papers, configs are
// validated with field names.
#include "ops/model.h"

#include <cmath>
#include <map>

#include "gtest/gtest.h"
#include "ops/gradcheck.h"
#include "ops/parallel.h"
#include "ops/rng.h"

namespace gyre::ops {
namespace {

using testing::CheckGradient;

// A very small spec of the given preset family for float64 FD checks.
ModelSpec SmallSpec(const std::string& preset) {
  gyre::v1::ModelConfig c;
  c.set_preset(preset);
  c.set_d_model(8);
  c.set_vocab_size(11);
  c.set_pad_vocab_to(1);
  if (preset == "xlstm-tiny") {
    c.set_n_layers(2);
    c.add_slstm_at(1);
    c.mutable_xlstm()->set_chunk_size(2);  // several chunks, the last one short
    c.mutable_xlstm()->set_slstm_heads(2);
  }
  if (preset == "mamba2-tiny" || preset == "hybrid-tiny" || preset == "mamba2-attention-tiny") {
    c.set_n_layers(2);
    c.mutable_mamba2()->set_head_dim(4);
    c.mutable_mamba2()->set_d_state(4);
    c.mutable_mamba2()->set_n_groups(2);
    c.mutable_mamba2()->set_chunk_size(2);
    c.mutable_attention()->set_num_heads(2);
    c.mutable_attention()->set_head_dim(preset == "mamba2-attention-tiny" ? 8 : 4);
    c.mutable_attention()->set_ffn_dim(12);
    if (preset != "mamba2-tiny") c.add_attention_at(0);
  }
  if (preset == "xlstm-large-tiny") {
    c.set_n_layers(2);
    c.mutable_xlstm_large()->set_num_heads(2);   // q/k 4 wide (dk 2), v 8 wide (dv 4)
    c.mutable_xlstm_large()->set_chunk_size(2);  // several chunks, the last one short
  }
  if (preset == "llama-tiny") {
    c.set_n_layers(2);
    c.mutable_attention()->set_num_heads(4);
    c.mutable_attention()->set_num_kv_heads(2);
    c.mutable_attention()->set_head_dim(4);
    c.mutable_attention()->set_ffn_dim(12);
  }
  auto spec = ResolveModelConfig(c);
  GYRE_CHECK(spec.ok(), "%s", std::string(spec.status().message()).c_str());
  if (preset == "mamba2-attention-tiny") spec->attn_rotary_dim = 4;  // partial rotary (no config field)
  return *spec;
}

// Perturbs parameters away from their (often exactly zero or one) initial values so every path
// carries gradient.
void Perturb(LanguageModel* m, uint64_t seed, double scale = 0.3) {
  Rng rng(seed);
  for (Parameter* p : m->params().All())
    for (int64_t i = 0; i < p->value.numel(); ++i) p->value.Set(i, p->value.At(i) + scale * rng.Normal());
}

std::map<std::string, Tensor> Grads(LanguageModel* m) {
  std::map<std::string, Tensor> g;
  for (Parameter* p : m->params().All()) g[p->name] = p->grad.Clone();
  return g;
}

void ExpectModelGradientsMatchFd(const ModelSpec& spec, int64_t batch, int64_t seq, uint64_t seed) {
  auto model = LanguageModel::Create(spec, DType::kF64, Device::kCpu, seed);
  ASSERT_TRUE(model.ok()) << model.status();
  LanguageModel& m = **model;
  Perturb(&m, seed + 1);
  m.cross_entropy_options() = {5, 3};  // several vocabulary chunks and row blocks
  std::vector<int32_t> tokens = RandomTokens(batch * (seq + 1), spec.vocab_size, seed + 2);
  const double scale = 1.0 / (batch * seq);
  m.params().ZeroGrad();
  m.ForwardBackward(tokens, batch, seq, scale);
  auto loss = [&] { return m.Evaluate(tokens, batch, seq, scale).loss; };
  for (Parameter* p : m.params().All()) {
    const Tensor analytic = p->grad.Clone();
    EXPECT_LT(CheckGradient(loss, &p->value, analytic, 24), 1e-6) << p->name;
  }
}

TEST(LlamaModelTest, GradientsMatchFiniteDifferences) {
  ExpectModelGradientsMatchFd(SmallSpec("llama-tiny"), 2, 5, 10);
}

TEST(LlamaModelTest, TiedEmbeddingsGradientsMatchFiniteDifferences) {
  ModelSpec spec = SmallSpec("llama-tiny");
  spec.tie_embeddings = true;
  ExpectModelGradientsMatchFd(spec, 2, 4, 11);
}

TEST(LlamaModelTest, MultiTokenHeadsGradientsMatchFiniteDifferences) {
  ModelSpec spec = SmallSpec("llama-tiny");
  spec.mtp_heads = 3;
  ExpectModelGradientsMatchFd(spec, 2, 5, 12);
}

// Runs ForwardBackward (or the naive order) and returns loss + gradients.
std::pair<LossResult, std::map<std::string, Tensor>> RunStep(const ModelSpec& spec, const std::vector<int32_t>& tokens,
                                                             int64_t batch, int64_t seq, bool naive_order) {
  auto model = LanguageModel::Create(spec, DType::kF64, Device::kCpu, 5);
  GYRE_CHECK(model.ok(), "create");
  Perturb(model->get(), 6);
  (*model)->params().ZeroGrad();
  LossResult r = naive_order ? (*model)->ForwardBackwardAllHeads(tokens, batch, seq, 1.0 / (batch * seq))
                             : (*model)->ForwardBackward(tokens, batch, seq, 1.0 / (batch * seq));
  return {r, Grads(model->get())};
}

void ExpectSameGradients(const std::map<std::string, Tensor>& a, const std::map<std::string, Tensor>& b, double tol) {
  ASSERT_EQ(a.size(), b.size());
  for (const auto& [name, g] : a) {
    ASSERT_TRUE(b.count(name)) << name;
    EXPECT_LE(RelativeError(g, b.at(name)), tol) << name;
  }
}

void ExpectMtpOrdersAgree(ModelSpec spec) {
  spec.mtp_heads = 3;
  const int64_t B = 2, T = 6;
  std::vector<int32_t> tokens = RandomTokens(B * (T + 1), spec.vocab_size, 7);
  auto [r1, g1] = RunStep(spec, tokens, B, T, false);
  auto [r2, g2] = RunStep(spec, tokens, B, T, true);
  EXPECT_NEAR(r1.loss, r2.loss, 1e-12);
  ASSERT_EQ(r1.head_losses.size(), 3u);
  for (int k = 0; k < 3; ++k) EXPECT_NEAR(r1.head_losses[k], r2.head_losses[k], 1e-12);
  // The loss is the mean of the heads' losses, and later heads see fewer targets.
  EXPECT_NEAR(r1.loss, (r1.head_losses[0] + r1.head_losses[1] + r1.head_losses[2]) / 3, 1e-12);
  ExpectSameGradients(g1, g2, 1e-12);
}

// Deferred zeroing (ops/module.h): a step whose gradients start stale (the previous step's
// values, no memset) must give the gradients of a fresh model. The stale values are replaced by
// NaN before the step, so any writer that adds into a stale gradient instead of overwriting it
// (or zeroing it first) leaves NaN behind, whatever the old values were.
struct DeferredStep {
  std::map<std::string, Tensor> grads;
  int64_t params = 0, left_stale = 0;  // parameters, and how many DeferZeroGrad did not zero
};

// An earlier step on other tokens, then DeferZeroGrad, NaN in the stale gradients, and the step on
// `tokens` as passes of `rows_per_pass` rows, each scaled by the whole batch's token count (what
// the worker's micro-batches do). `mark_all`: every parameter marked for deferred zeroing,
// including those of blocks whose writers do not follow the rule. `ignore_rule_for`: parameters
// whose names start with it are taken as written after the NaN fill (what a writer that adds
// without asking FirstGradWrite / ZeroGradIfStale leaves behind).
DeferredStep StepAfterAnEarlierStep(const ModelSpec& spec, const std::vector<int32_t>& tokens, int64_t batch,
                                    int64_t seq, int64_t rows_per_pass, bool mark_all = false,
                                    const std::string& ignore_rule_for = "") {
  auto model = LanguageModel::Create(spec, DType::kF64, Device::kCpu, 5);
  GYRE_CHECK(model.ok(), "create");
  LanguageModel& m = **model;
  Perturb(&m, 6);
  if (mark_all) m.params().AllowDeferredZero(m.params().All());
  const double scale = 1.0 / (batch * seq);
  m.params().ZeroGrad();
  m.ForwardBackward(RandomTokens(static_cast<int64_t>(tokens.size()), spec.vocab_size, 99), batch, seq, scale);
  m.params().DeferZeroGrad();
  DeferredStep out;
  for (Parameter* p : m.params().All()) {
    ++out.params;
    if (!p->grad_stale) continue;
    ++out.left_stale;
    p->grad.Fill(std::nan(""));
    if (!ignore_rule_for.empty() && p->name.rfind(ignore_rule_for, 0) == 0) p->grad_stale = false;
  }
  const std::span<const int32_t> all(tokens);
  for (int64_t r0 = 0; r0 < batch; r0 += rows_per_pass) {
    const int64_t n = std::min(rows_per_pass, batch - r0);
    m.ForwardBackward(all.subspan(r0 * (seq + 1), n * (seq + 1)), n, seq, scale);
  }
  out.grads = Grads(&m);
  return out;
}

ModelSpec WithHeads(ModelSpec spec, int64_t mtp_heads, bool tied) {
  spec.mtp_heads = mtp_heads;
  spec.tie_embeddings = tied;
  return spec;
}

TEST(DeferredZeroTest, AStepOnStaleGradientsEqualsAFreshModelsStep) {
  const int64_t B = 3, T = 5;
  struct Case {
    std::string name;
    ModelSpec spec;
    bool all_deferred;  // every writer follows the rule: no memset at all
  };
  const std::vector<Case> cases = {
      {"llama", SmallSpec("llama-tiny"), true},
      {"llama tied", WithHeads(SmallSpec("llama-tiny"), 1, true), true},
      {"llama mtp 3", WithHeads(SmallSpec("llama-tiny"), 3, false), true},
      {"mamba2", SmallSpec("mamba2-tiny"), true},
      {"hybrid", SmallSpec("hybrid-tiny"), true},
      {"mamba2-attention", SmallSpec("mamba2-attention-tiny"), true},   // AttentionMixerBlock and its qkv conv
      {"xlstm", SmallSpec("xlstm-tiny"), true},                         // mLSTM and sLSTM blocks
      {"xlstm mtp 2", WithHeads(SmallSpec("xlstm-tiny"), 2, false), true},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    std::vector<int32_t> tokens = RandomTokens(B * (T + 1), c.spec.vocab_size, 17);
    auto [loss, fresh] = RunStep(c.spec, tokens, B, T, false);
    DeferredStep got = StepAfterAnEarlierStep(c.spec, tokens, B, T, B);
    ExpectSameGradients(got.grads, fresh, 1e-13);
    // The embedding, final norm and head always skip the memset; Llama and recurrent blocks too.
    EXPECT_GE(got.left_stale, c.spec.tie_embeddings ? 2 : 3);
    if (c.all_deferred) {
      EXPECT_EQ(got.left_stale, got.params);
    } else {
      EXPECT_LT(got.left_stale, got.params);
    }
  }
}

TEST(DeferredZeroTest, MicroBatchesOnStaleGradientsEqualOneBatch) {
  const int64_t B = 5, T = 4;
  for (const std::string preset : {"llama-tiny", "hybrid-tiny", "xlstm-tiny", "mamba2-tiny"}) {
    SCOPED_TRACE(preset);
    const ModelSpec spec = WithHeads(SmallSpec(preset), preset == "llama-tiny" ? 2 : 1, false);
    std::vector<int32_t> tokens = RandomTokens(B * (T + 1), spec.vocab_size, 18);
    auto [loss, one_batch] = RunStep(spec, tokens, B, T, false);
    ExpectSameGradients(StepAfterAnEarlierStep(spec, tokens, B, T, 2).grads, one_batch, 1e-12);  // rows 2, 2, 1
    ExpectSameGradients(StepAfterAnEarlierStep(spec, tokens, B, T, 1).grads, one_batch, 1e-12);
  }
}

// The check above can fail: a writer that adds into a stale gradient without asking the rule
// (simulated for one block's parameters: their stale marks cleared after the NaN fill) must leave
// NaN in exactly those gradients, whichever op writes them (cell, conv, norm, GEMM, glue).
TEST(DeferredZeroTest, AWriterThatIgnoresTheRuleIsCaught) {
  const int64_t B = 2, T = 5;
  for (const std::string preset : {"mamba2-tiny", "xlstm-tiny"}) {
    SCOPED_TRACE(preset);
    const ModelSpec spec = SmallSpec(preset);
    std::vector<int32_t> tokens = RandomTokens(B * (T + 1), spec.vocab_size, 19);
    auto [loss, fresh] = RunStep(spec, tokens, B, T, false);
    const std::string block = preset == "xlstm-tiny" ? "blocks.1." : "blocks.0.";  // sLSTM / Mamba-2
    DeferredStep got = StepAfterAnEarlierStep(spec, tokens, B, T, B, /*mark_all=*/false, block);
    int bad = 0, in_block = 0;
    for (const auto& [name, g] : got.grads) {
      const double err = RelativeError(g, fresh.at(name));
      const bool ours = name.rfind(block, 0) == 0;
      in_block += ours;
      EXPECT_EQ(!(err <= 1e-13), ours) << name;  // NaN counts as a difference
      bad += !(err <= 1e-13);
    }
    EXPECT_GT(in_block, 0);
    EXPECT_EQ(bad, in_block);
  }
}

TEST(MtpTest, MemorySavingOrderEqualsAllHeadsBackward) { ExpectMtpOrdersAgree(SmallSpec("llama-tiny")); }

// n = 1: the loss equals an independent next-token cross-entropy over the model's logits.
void ExpectSingleHeadIsNextTokenLoss(const ModelSpec& spec) {
  ASSERT_EQ(spec.mtp_heads, 1);
  auto model = LanguageModel::Create(spec, DType::kF64, Device::kCpu, 3);
  ASSERT_TRUE(model.ok());
  Perturb(model->get(), 4);
  const int64_t B = 2, T = 5;
  std::vector<int32_t> tokens = RandomTokens(B * (T + 1), spec.vocab_size, 8);
  std::vector<int32_t> inputs;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) inputs.push_back(tokens[b * (T + 1) + t]);
  Tensor logits = (*model)->Logits(inputs, B, T);
  double expected = 0;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < T; ++t) {
      const int64_t row = b * T + t;
      double mx = -1e300;
      for (int64_t v = 0; v < spec.vocab_size; ++v) mx = std::max(mx, logits.At(row * spec.vocab_size + v));
      double z = 0;
      for (int64_t v = 0; v < spec.vocab_size; ++v) z += std::exp(logits.At(row * spec.vocab_size + v) - mx);
      expected += mx + std::log(z) - logits.At(row * spec.vocab_size + tokens[b * (T + 1) + t + 1]);
    }
  }
  expected /= B * T;
  (*model)->params().ZeroGrad();
  LossResult r = (*model)->ForwardBackward(tokens, B, T, 1.0 / (B * T));
  EXPECT_NEAR(r.loss, expected, 1e-12);
  EXPECT_EQ(r.tokens, B * T);
  EXPECT_NEAR((*model)->Evaluate(tokens, B, T, 1.0 / (B * T)).loss, expected, 1e-12);
}

TEST(MtpTest, OneHeadIsTheOrdinaryNextTokenLoss) { ExpectSingleHeadIsNextTokenLoss(SmallSpec("llama-tiny")); }

TEST(MtpTest, HeadsAddOneLayerEach) {
  ModelSpec spec = SmallSpec("llama-tiny");
  auto base = CountParameters(spec);
  spec.mtp_heads = 4;
  auto mtp = CountParameters(spec);
  ASSERT_TRUE(base.ok() && mtp.ok());
  spec.mtp_heads = 1;
  spec.blocks.push_back(spec.blocks.back());
  auto deeper = CountParameters(spec);
  ASSERT_TRUE(deeper.ok());
  EXPECT_EQ(*mtp - *base, 3 * (*deeper - *base));
}

TEST(RecomputeTest, RecomputedBlocksGiveIdenticalGradients) {
  ModelSpec spec = SmallSpec("llama-tiny");
  std::vector<int32_t> tokens = RandomTokens(2 * 7, spec.vocab_size, 9);
  auto [r1, g1] = RunStep(spec, tokens, 2, 6, false);
  spec.recompute_blocks = true;
  auto [r2, g2] = RunStep(spec, tokens, 2, 6, false);
  EXPECT_EQ(r1.loss, r2.loss);
  ExpectSameGradients(g1, g2, 0.0);
}

TEST(ModelTest, Float32MatchesFloat64) {
  ModelSpec spec = SmallSpec("llama-tiny");
  std::vector<int32_t> tokens = RandomTokens(2 * 7, spec.vocab_size, 13);
  auto m64 = LanguageModel::Create(spec, DType::kF64, Device::kCpu, 1);
  auto m32 = LanguageModel::Create(spec, DType::kF32, Device::kCpu, 1);
  ASSERT_TRUE(m64.ok() && m32.ok());
  // Same seed, so the same weights up to rounding.
  const double l64 = (*m64)->Evaluate(tokens, 2, 6, 1.0 / 12).loss;
  const double l32 = (*m32)->Evaluate(tokens, 2, 6, 1.0 / 12).loss;
  EXPECT_NEAR(l32, l64, 1e-5 * l64);
}

TEST(SelfExtendModelTest, WindowAtLeastLengthLeavesLossUnchanged) {
  auto spec = PresetSpec("llama-tiny");
  ASSERT_TRUE(spec.ok());
  auto model = LanguageModel::Create(*spec, DType::kF64, Device::kCpu, 1);
  ASSERT_TRUE(model.ok());
  std::vector<int32_t> tokens = RandomTokens(1 * 33, spec->vocab_size, 2);
  const double plain = (*model)->Evaluate(tokens, 1, 32, 1.0 / 32).loss;
  (*model)->SetSelfExtend(4, 32);
  EXPECT_NEAR((*model)->Evaluate(tokens, 1, 32, 1.0 / 32).loss, plain, 1e-12);
  (*model)->SetSelfExtend(4, 8);
  EXPECT_GT(std::fabs((*model)->Evaluate(tokens, 1, 32, 1.0 / 32).loss - plain), 1e-9);
}

// Parameter counts against MODELS.md §8 (derived formulas that reproduce the papers' tables; the
// comment gives the published figure in millions).
class RecurrentModelTest : public ::testing::TestWithParam<std::string> {};

TEST_P(RecurrentModelTest, GradientsMatchFiniteDifferences) {
  ExpectModelGradientsMatchFd(SmallSpec(GetParam()), 2, 5, 20);
}

TEST_P(RecurrentModelTest, MtpMemorySavingOrderEqualsAllHeadsBackward) { ExpectMtpOrdersAgree(SmallSpec(GetParam())); }

TEST_P(RecurrentModelTest, OneHeadIsTheOrdinaryNextTokenLoss) { ExpectSingleHeadIsNextTokenLoss(SmallSpec(GetParam())); }

TEST_P(RecurrentModelTest, RecomputedBlocksGiveIdenticalGradients) {
  ModelSpec spec = SmallSpec(GetParam());
  std::vector<int32_t> tokens = RandomTokens(2 * 7, spec.vocab_size, 9);
  auto [r1, g1] = RunStep(spec, tokens, 2, 6, false);
  spec.recompute_blocks = true;
  auto [r2, g2] = RunStep(spec, tokens, 2, 6, false);
  EXPECT_EQ(r1.loss, r2.loss);
  ExpectSameGradients(g1, g2, 0.0);
}

TEST_P(RecurrentModelTest, Float32MatchesFloat64) {
  auto spec = PresetSpec(GetParam());
  ASSERT_TRUE(spec.ok());
  std::vector<int32_t> tokens = RandomTokens(2 * 33, spec->vocab_size, 14);
  auto m64 = LanguageModel::Create(*spec, DType::kF64, Device::kCpu, 1);
  auto m32 = LanguageModel::Create(*spec, DType::kF32, Device::kCpu, 1);
  ASSERT_TRUE(m64.ok() && m32.ok());
  const double l64 = (*m64)->Evaluate(tokens, 2, 32, 1.0 / 64).loss;
  const double l32 = (*m32)->Evaluate(tokens, 2, 32, 1.0 / 64).loss;
  EXPECT_NEAR(l32, l64, 1e-5 * l64);
}

// Batch-sliced threading of the cell kernels (and attention heads) gives the same loss and
// gradients as one thread, up to the summation order of parameter-gradient slices.
TEST_P(RecurrentModelTest, TwoThreadsEqualOneThread) {
  ModelSpec spec = SmallSpec(GetParam());
  std::vector<int32_t> tokens = RandomTokens(3 * 7, spec.vocab_size, 15);
  SetNumThreads(1);
  auto [r1, g1] = RunStep(spec, tokens, 3, 6, false);
  SetNumThreads(2);
  auto [r2, g2] = RunStep(spec, tokens, 3, 6, false);
  SetNumThreads(1);
  EXPECT_NEAR(r1.loss, r2.loss, 1e-13);
  ExpectSameGradients(g1, g2, 1e-12);
}

// Incremental decoding (recurrent states, conv windows, KV caches) reproduces the
// full-sequence logits at every position.
void ExpectDecodeMatchesFullForward(const ModelSpec& spec, int64_t se_group = 0, int64_t se_window = 0) {
  auto model = LanguageModel::Create(spec, DType::kF64, Device::kCpu, 21);
  ASSERT_TRUE(model.ok());
  Perturb(model->get(), 22);
  if (se_group > 0) (*model)->SetSelfExtend(se_group, se_window);
  const int64_t B = 2, T = 9, V = spec.vocab_size;
  std::vector<int32_t> inputs = RandomTokens(B * T, V, 23);
  Tensor full = (*model)->Logits(inputs, B, T);  // [B*T, V]
  auto state = (*model)->NewDecodeState(B);
  for (int64_t t = 0; t < T; ++t) {
    std::vector<int32_t> step_tokens = {inputs[t], inputs[T + t]};
    std::vector<Tensor> logits = (*model)->DecodeStep(step_tokens, state.get());
    ASSERT_EQ(logits.size(), static_cast<size_t>(spec.mtp_heads));
    for (int64_t b = 0; b < B; ++b) {
      double diff = 0, norm = 0;
      for (int64_t v = 0; v < V; ++v) {
        const double e = full.At((b * T + t) * V + v), g = logits[0].At(b * V + v);
        diff += (e - g) * (e - g);
        norm += e * e;
      }
      EXPECT_LT(std::sqrt(diff / norm), 1e-10) << "t=" << t << " b=" << b;
    }
  }
}

TEST_P(RecurrentModelTest, DecodeStepsReproduceFullForward) { ExpectDecodeMatchesFullForward(SmallSpec(GetParam())); }

TEST(DecodeTest, LlamaWithMtpHeadsAndSelfExtend) {
  ModelSpec spec = SmallSpec("llama-tiny");
  ExpectDecodeMatchesFullForward(spec);
  ExpectDecodeMatchesFullForward(spec, 2, 3);  // grouped positions beyond a window of 3
  spec.mtp_heads = 3;
  ExpectDecodeMatchesFullForward(spec);
}

INSTANTIATE_TEST_SUITE_P(Families, RecurrentModelTest, ::testing::Values("xlstm-tiny", "mamba2-tiny", "hybrid-tiny", "mamba2-attention-tiny",
                                                               "xlstm-large-tiny"),
                         [](const auto& info) {
                           std::string n = info.param;
                           for (char& ch : n) if (ch == '-') ch = '_';
                           return n;
                         });

TEST(ParameterCountTest, PresetsMatchPublishedCounts) {
  const std::vector<std::pair<std::string, int64_t>> expected = {
      {"llama-125m", 162220800},    // xLSTM paper Table 7 Llama: 162.2M
      {"llama-350m", 406635520},    // 406.6M
      {"llama-760m", 834086400},    // 834.1M
      {"llama-1.3b", 1420396544},   // 1420.4M
      // xLSTM paper Table 7 ([1:0] / [7:1]); MODELS.md §8 gives the 125M and 1.3B figures exactly.
      {"xlstm[1:0]-125m", 163806144},  // 163.8M
      {"xlstm[7:1]-125m", 163690928},  // 163.7M
      {"xlstm[1:0]-350m", 409290112},  // 409.3M
      {"xlstm[7:1]-350m", 408436048},  // 408.4M
      {"xlstm[1:0]-760m", 840427392},  // 840.4M
      {"xlstm[7:1]-760m", 839736144},  // 839.7M
      {"xlstm[1:0]-1.3b", 1422559616}, // 1422.6M
      {"xlstm[7:1]-1.3b", 1420065104}, // 1420.1M
      // Mamba-2 (MODELS.md §4.3 table, tied embeddings, vocab 50288).
      {"mamba2-130m", 128989632},   // 129.0M
      {"mamba2-370m", 368346624},   // 368.3M
      {"mamba2-780m", 780161280},   // 780.2M
      {"mamba2-1.3b", 1343757312},  // 1343.8M
      {"mamba2-2.7b", 2702599680},  // 2702.6M
      {"mamba2-attention-2.7b", 2697590880},  // MODELS.md §8: 58 SSD + 6 attention layers
      // xLSTM Large (MODELS.md §8: 201,666,576 per block, 32 blocks, untied 2Vd, final RMSNorm d).
      {"xlstm-7b", 6865424896},
      {"xlstm-large-bench", 1420839104},  // the same formula at d 2048, 24 blocks, NH 4, f 5504
      // PERFORMANCE.md's transformers xlstm-125m: per block 4·768² + 2(768·4 + 4) + 3·768 + 3·768·2048
      // = 7,086,344 (FFN 2048: transformers' round-up of 2048.256); 12 blocks + 2·50304·768 + 768
      // (ops/XLSTM_LARGE.md); = transformers' sum(p.numel()) of the model (device, session 21).
      {"xlstm-large-125m", 162303840},
  };
  for (const auto& [preset, count] : expected) {
    auto spec = PresetSpec(preset);
    ASSERT_TRUE(spec.ok()) << spec.status();
    auto n = CountParameters(*spec);
    ASSERT_TRUE(n.ok()) << n.status();
    EXPECT_EQ(*n, count) << preset;
  }
}

TEST(ParameterCountTest, MetaCountEqualsAllocatedCount) {
  for (const std::string preset :
       {"llama-tiny", "xlstm-tiny", "mamba2-tiny", "hybrid-tiny", "mamba2-attention-tiny", "xlstm-large-tiny"}) {
    auto spec = PresetSpec(preset);
    ASSERT_TRUE(spec.ok());
    auto model = LanguageModel::Create(*spec, DType::kF32, Device::kCpu, 0);
    ASSERT_TRUE(model.ok());
    int64_t sum = 0;
    for (Parameter* p : (*model)->params().All()) sum += p->value.numel();
    EXPECT_EQ(*CountParameters(*spec), sum);
  }
}

TEST(ModelConfigTest, RejectsBadFieldsByName) {
  auto expect_error = [](gyre::v1::ModelConfig c, const std::string& field) {
    auto s = ResolveModelConfig(c);
    ASSERT_FALSE(s.ok()) << field;
    EXPECT_NE(std::string(s.status().message()).find(field), std::string::npos) << s.status();
  };
  gyre::v1::ModelConfig c;
  expect_error(c, "model.preset");
  c.set_preset("no-such-model");
  expect_error(c, "model.preset");
  c.set_preset("llama-tiny");
  c.mutable_attention()->set_num_kv_heads(3);
  expect_error(c, "model.attention.num_kv_heads");
  c.mutable_attention()->set_num_kv_heads(0);
  c.add_attention_at(99);
  expect_error(c, "model.attention_at[0]");
  c.clear_attention_at();
  c.add_slstm_at(1);
  expect_error(c, "model.slstm_at");
  c.clear_slstm_at();
  c.set_preset("mamba2-tiny");
  c.mutable_mamba2()->set_head_dim(48);
  expect_error(c, "model.mamba2.head_dim");
  c.clear_mamba2();
  c.set_preset("xlstm-tiny");
  c.mutable_xlstm()->set_mlstm_recompute("sometimes");
  expect_error(c, "model.xlstm.mlstm_recompute");
  c.mutable_xlstm()->set_mlstm_recompute("states");
  c.set_recompute_blocks(true);  // both at once: the cell would run three times
  expect_error(c, "model.xlstm.mlstm_recompute");
  c.set_recompute_blocks(false);
  auto ok = ResolveModelConfig(c);
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->mlstm_recompute, "states");
  EXPECT_EQ(ok->mlstm_recompute_keep_last, 0);
  c.mutable_xlstm()->set_mlstm_recompute_keep_last(ok->blocks.size() + 1);  // more layers than the model has
  expect_error(c, "model.xlstm.mlstm_recompute_keep_last");
  c.mutable_xlstm()->set_mlstm_recompute_keep_last(1);
  ok = ResolveModelConfig(c);
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->mlstm_recompute_keep_last, 1);
  c.mutable_xlstm()->set_mlstm_recompute_keep_last(-1);  // auto
  ok = ResolveModelConfig(c);
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->mlstm_recompute_keep_last, -1);
  c.mutable_xlstm()->set_mlstm_recompute_keep_last(-2);
  expect_error(c, "model.xlstm.mlstm_recompute_keep_last");
  c.mutable_xlstm()->set_mlstm_recompute_keep_last(1);
  c.mutable_xlstm()->set_mlstm_recompute("none");  // keep_last says which layers skip a recomputation
  expect_error(c, "model.xlstm.mlstm_recompute_keep_last");
  c.clear_xlstm();
  c.set_preset("xlstm-large-tiny");
  c.mutable_xlstm_large()->set_num_heads(3);  // does not divide v = 64
  expect_error(c, "model.xlstm_large.num_heads");
  c.mutable_xlstm_large()->set_num_heads(0);
  c.mutable_xlstm_large()->set_qk_dim_factor(0.3);  // q/k width 19: not a multiple of 4 heads
  expect_error(c, "model.xlstm_large.qk_dim_factor");
  c.mutable_xlstm_large()->set_qk_dim_factor(-0.5);
  expect_error(c, "model.xlstm_large.qk_dim_factor");
  c.mutable_xlstm_large()->set_qk_dim_factor(0);
  c.mutable_xlstm_large()->set_gate_soft_cap(-15);
  expect_error(c, "model.xlstm_large.gate_soft_cap");
  c.mutable_xlstm_large()->set_gate_soft_cap(0);
  c.mutable_xlstm_large()->set_logit_soft_cap(-1);
  expect_error(c, "model.xlstm_large.logit_soft_cap");
  c.mutable_xlstm_large()->set_logit_soft_cap(0);
  c.mutable_xlstm_large()->set_ffn_proj_factor(-2);
  expect_error(c, "model.xlstm_large.ffn_proj_factor");
}

// The xLSTM Large presets: the 7B's published shape (MODELS.md §1.5), the caps, overrides.
TEST(ModelConfigTest, XlstmLargePresets) {
  auto s = PresetSpec("xlstm-7b");
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->family, Family::kXlstmLarge);
  EXPECT_EQ(s->n_layers(), 32);
  EXPECT_EQ(s->d_model, 4096);
  EXPECT_EQ(s->xl_heads, 8);
  EXPECT_EQ(s->xl_qk_dim / s->xl_heads, 256);  // dk
  EXPECT_EQ(s->xl_v_dim / s->xl_heads, 512);   // dv
  EXPECT_EQ(s->ffn_dim, 10944);
  EXPECT_EQ(s->vocab_size, 50304);
  EXPECT_EQ(s->gate_soft_cap, 15.0);
  EXPECT_EQ(s->logit_soft_cap, 30.0);
  EXPECT_EQ(s->norm_eps, 1e-6);
  EXPECT_FALSE(s->tie_embeddings);
  // The other families keep the logits uncapped.
  for (const char* other : {"llama-tiny", "xlstm-tiny", "mamba2-tiny"}) EXPECT_EQ(PresetSpec(other)->logit_soft_cap, 0.0);
  gyre::v1::ModelConfig c;
  c.set_preset("xlstm-large-tiny");
  c.set_d_model(128);
  c.set_n_layers(3);
  c.mutable_xlstm_large()->set_logit_soft_cap(50);
  auto o = ResolveModelConfig(c);
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->xl_qk_dim, 64);
  EXPECT_EQ(o->xl_v_dim, 128);
  EXPECT_EQ(o->ffn_dim, 384);  // 64 * ceil(2.667 * 128 / 64)
  EXPECT_EQ(o->logit_soft_cap, 50.0);
  EXPECT_EQ(o->blocks, std::vector<BlockType>(3, BlockType::kXlstmLarge));
}

// The presets with mLSTM heads of 1024 (the 1.3B xLSTMs) default to rebuilding the chunk states
// and keeping what fits; a config's own memory setting replaces that default whole.
TEST(ModelConfigTest, WideHeadXlstmPresetsDefaultToStatesAuto) {
  for (const char* preset : {"xlstm[1:0]-1.3b", "xlstm[7:1]-1.3b"}) {
    gyre::v1::ModelConfig c;
    c.set_preset(preset);
    auto s = ResolveModelConfig(c);
    ASSERT_TRUE(s.ok()) << s.status();
    EXPECT_EQ(s->mlstm_recompute, "states") << preset;
    EXPECT_EQ(s->mlstm_recompute_keep_last, -1) << preset;
    c.mutable_xlstm()->set_mlstm_recompute_keep_last(12);  // a count alone keeps the preset's mode
    s = ResolveModelConfig(c);
    ASSERT_TRUE(s.ok()) << s.status();
    EXPECT_EQ(s->mlstm_recompute, "states");
    EXPECT_EQ(s->mlstm_recompute_keep_last, 12);
    c.clear_xlstm();
    c.mutable_xlstm()->set_mlstm_recompute("none");  // every layer keeps everything
    s = ResolveModelConfig(c);
    ASSERT_TRUE(s.ok()) << s.status();
    EXPECT_EQ(s->mlstm_recompute, "none");
    EXPECT_EQ(s->mlstm_recompute_keep_last, 0);
    c.mutable_xlstm()->set_mlstm_recompute("glue");  // a mode alone: every layer recomputes
    s = ResolveModelConfig(c);
    ASSERT_TRUE(s.ok()) << s.status();
    EXPECT_EQ(s->mlstm_recompute, "glue");
    EXPECT_EQ(s->mlstm_recompute_keep_last, 0);
    c.clear_xlstm();
    c.set_recompute_blocks(true);  // whole blocks instead: not both
    s = ResolveModelConfig(c);
    ASSERT_TRUE(s.ok()) << s.status();
    EXPECT_TRUE(s->recompute_blocks);
    EXPECT_EQ(s->mlstm_recompute, "none");
    EXPECT_EQ(s->mlstm_recompute_keep_last, 0);
  }
  for (const char* preset : {"xlstm[1:0]-125m", "xlstm[1:0]-760m", "xlstm-tiny"}) {  // heads < 1024
    gyre::v1::ModelConfig c;
    c.set_preset(preset);
    auto s = ResolveModelConfig(c);
    ASSERT_TRUE(s.ok()) << s.status();
    EXPECT_EQ(s->mlstm_recompute, "none") << preset;
    EXPECT_EQ(s->mlstm_recompute_keep_last, 0) << preset;
  }
}

TEST(ModelConfigTest, OverridesAndHybrids) {
  gyre::v1::ModelConfig c;
  c.set_preset("mamba2-130m");
  c.add_attention_at(9);
  c.add_attention_at(18);
  c.set_vocab_size(50277);
  c.set_pad_vocab_to(16);
  auto s = ResolveModelConfig(c);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->vocab_size, 50288);
  EXPECT_EQ(s->blocks[9], BlockType::kAttention);
  EXPECT_EQ(s->blocks[18], BlockType::kAttention);
  EXPECT_EQ(s->blocks[10], BlockType::kMamba2);
  EXPECT_TRUE(s->tie_embeddings);
  auto x = PresetSpec("xlstm-125m");
  ASSERT_TRUE(x.ok());
  EXPECT_EQ(x->blocks[3], BlockType::kSlstm);
  EXPECT_EQ(x->blocks[20], BlockType::kSlstm);
  EXPECT_EQ(x->blocks[4], BlockType::kMlstm);
}

}  // namespace
}  // namespace gyre::ops
