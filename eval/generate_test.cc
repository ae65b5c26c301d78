#include "eval/generate.h"

#include <cmath>
#include <cstdio>
#include <map>

#include "eval/test_models.h"
#include "gtest/gtest.h"
#include "ops/rng.h"
#include "ops/train_step.h"

namespace gyre::eval {
namespace {

using testing::TinySpec;

std::unique_ptr<ops::LanguageModel> MakeModel(const ops::ModelSpec& spec, uint64_t seed) {
  auto model = ops::LanguageModel::Create(spec, ops::DType::kF32, ops::Device::kCpu, seed);
  EXPECT_TRUE(model.ok()) << model.status();
  return std::move(*model);
}

// Perturbs the (often zero-initialised) output projections so that random models have varied,
// position-dependent predictions rather than near-constant ones.
void Perturb(ops::LanguageModel* m, uint64_t seed, double scale) {
  ops::Rng rng(seed);
  for (ops::Parameter* p : m->params().All())
    for (int64_t i = 0; i < p->value.numel(); ++i) p->value.Set(i, p->value.At(i) + scale * rng.Normal());
}

// Trains the model briefly on a periodic token stream (period 7), so every MTP head learns the
// continuation and the drafts agree with the next-token head.
void TrainOnCycle(ops::LanguageModel* model, int steps) {
  ops::TrainOptions options;
  options.adamw.weight_decay = 0;
  options.schedule.peak_lr = 1e-2;
  ops::Trainer trainer(model, options);
  const int64_t batch = 4, seq = 16;
  std::vector<int32_t> tokens(batch * (seq + 1));
  for (int step = 0; step < steps; ++step) {
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t t = 0; t <= seq; ++t) tokens[b * (seq + 1) + t] = static_cast<int32_t>(3 + (b + step + t) % 7);
    auto stats = trainer.Step(tokens, batch, seq, step);
    ASSERT_TRUE(stats.ok()) << stats.status();
  }
}

class SpeculativeTest : public ::testing::TestWithParam<std::tuple<std::string, int>> {};

TEST_P(SpeculativeTest, EqualsGreedyTokenForToken) {
  const auto& [family, heads] = GetParam();
  auto model = MakeModel(TinySpec(family, heads), 17);
  Perturb(model.get(), 5, 0.2);
  const std::vector<int32_t> prompt = {1, 5, 9, 2, 7};
  GenerateOptions options;
  options.max_new_tokens = 24;
  absl::StatusOr<GenerateResult> greedy = Generate(model.get(), prompt, options);
  ASSERT_TRUE(greedy.ok()) << greedy.status();
  for (int64_t k = 2; k <= heads; ++k) {
    options.draft_heads = k;
    absl::StatusOr<GenerateResult> spec = GenerateSpeculative(model.get(), prompt, options);
    ASSERT_TRUE(spec.ok()) << spec.status();
    EXPECT_EQ(spec->tokens, greedy->tokens) << family << " heads " << heads << " k " << k;
    EXPECT_EQ(spec->forwards + spec->accepted, static_cast<int64_t>(spec->tokens.size()));
    EXPECT_GT(spec->drafted, spec->accepted) << "the rejection path was not exercised";
    // Per draft head: the checks and acceptances add up to the totals; head i + 3 is checked only
    // where head i + 2 was accepted; an accepted draft is a hit (it equals greedy's token there).
    ASSERT_EQ(static_cast<int64_t>(spec->head_checked.size()), k - 1);
    int64_t checked = 0, accepted = 0;
    for (int64_t i = 0; i + 1 < k; ++i) {
      checked += spec->head_checked[i];
      accepted += spec->head_accepted[i];
      EXPECT_LE(spec->head_accepted[i], spec->head_hits[i]);
      EXPECT_LE(spec->head_hits[i], spec->head_guesses[i]);
      if (i > 0) {
        EXPECT_LE(spec->head_checked[i], spec->head_accepted[i - 1]);  // less at the end / short rounds
      }
    }
    EXPECT_EQ(checked, spec->drafted);
    EXPECT_EQ(accepted, spec->accepted);
    std::printf("random %s mtp=%d k=%ld: drafted %ld accepted %ld\n", family.c_str(), heads, static_cast<long>(k),
                static_cast<long>(spec->drafted), static_cast<long>(spec->accepted));
  }
}

// Auto draft heads: all heads for the first rounds, then the k PickDraftHeads chooses; the output
// stays greedy's. A random model's drafts are almost never accepted, so the pick is k = 2.
TEST_P(SpeculativeTest, AutoDraftHeadsEqualsGreedyAndDropsToTwoAtLowAcceptance) {
  const auto& [family, heads] = GetParam();
  auto model = MakeModel(TinySpec(family, heads), 17);
  Perturb(model.get(), 5, 0.2);
  const std::vector<int32_t> prompt = {1, 5, 9, 2, 7};
  GenerateOptions options;
  options.max_new_tokens = 30;
  absl::StatusOr<GenerateResult> greedy = Generate(model.get(), prompt, options);
  ASSERT_TRUE(greedy.ok()) << greedy.status();
  options.draft_heads = kAutoDraftHeads;
  options.auto_rounds = 4;
  absl::StatusOr<GenerateResult> spec = GenerateSpeculative(model.get(), prompt, options);
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->tokens, greedy->tokens) << family << " heads " << heads;
  EXPECT_EQ(spec->draft_heads, 2) << family << " heads " << heads << ": accepted " << spec->accepted << " of "
                                  << spec->drafted;
  options.draft_heads = -2;
  EXPECT_FALSE(GenerateSpeculative(model.get(), prompt, options).ok());
}

TEST(PickDraftHeadsTest, ExpectedTokensOverRoundCost) {
  // Every draft accepted: all heads; none: two.
  EXPECT_EQ(PickDraftHeads(std::vector<int64_t>{100, 100, 100}, std::vector<int64_t>{100, 100, 100}, 4), 4);
  EXPECT_EQ(PickDraftHeads(std::vector<int64_t>{100, 0, 0}, std::vector<int64_t>{0, 0, 0}, 4), 2);
  // Session 18's counts on one H100 (generate_bench, k = 4 rounds): xlstm[1:0]-125m and mamba2-130m
  // pick 2 (measured fastest), llama-125m 4.
  EXPECT_EQ(PickDraftHeads(std::vector<int64_t>{161, 63, 15}, std::vector<int64_t>{64, 15, 13}, 4), 2);
  EXPECT_EQ(PickDraftHeads(std::vector<int64_t>{181, 71, 0}, std::vector<int64_t>{73, 0, 0}, 4), 2);
  EXPECT_EQ(PickDraftHeads(std::vector<int64_t>{74, 63, 61}, std::vector<int64_t>{63, 62, 57}, 4), 4);
  // With rounds as cheap at every k, any acceptance pays for more heads.
  EXPECT_EQ(PickDraftHeads(std::vector<int64_t>{100, 30, 10}, std::vector<int64_t>{30, 10, 1}, 4,
                           std::vector<double>{1.0, 1.0, 1.0}),
            4);
  EXPECT_NEAR(DefaultRoundCost(2), 1.20, 1e-12);
  EXPECT_NEAR(DefaultRoundCost(4), 1.72, 1e-12);
}

// Auto's sequential rule: settle at once where the pick is an end (2 or all heads), else run
// another all-heads round, up to auto_rounds.
TEST(PickDraftHeadsTest, AutoSettlesAtTheEndsAndWaitsBetween) {
  using V = std::vector<int64_t>;
  // Round 1 rejects head 2 (the recurrent models' usual first round): 2 at once.
  EXPECT_EQ(AutoDraftHeads(V{1, 0, 0}, V{0, 0, 0}, 4, 1, 4), 2);
  // Head 2 accepted, head 3 rejected: PickDraftHeads says 2 (a_3 = 1/3): at once.
  EXPECT_EQ(AutoDraftHeads(V{1, 1, 0}, V{1, 0, 0}, 4, 1, 4), 2);
  // Every draft of one round accepted: PickDraftHeads says 3 (a = 2/3): wait ...
  EXPECT_EQ(PickDraftHeads(V{1, 1, 1}, V{1, 1, 1}, 4), 3);
  EXPECT_EQ(AutoDraftHeads(V{1, 1, 1}, V{1, 1, 1}, 4, 1, 4), 0);
  // ... unless that was the last warm-up round allowed.
  EXPECT_EQ(AutoDraftHeads(V{1, 1, 1}, V{1, 1, 1}, 4, 1, 1), 3);
  // Two all-accepted rounds (llama-125m's loop): all heads.
  EXPECT_EQ(AutoDraftHeads(V{2, 2, 2}, V{2, 2, 2}, 4, 2, 4), 4);
  // The first round all accepted, the second rejecting head 2: still between (a_2 = 1/2); a third
  // rejecting head 2 again: 2.
  EXPECT_EQ(AutoDraftHeads(V{2, 1, 1}, V{1, 1, 1}, 4, 2, 4), 0);
  EXPECT_EQ(AutoDraftHeads(V{3, 1, 1}, V{1, 1, 1}, 4, 3, 4), 2);
  // Two heads only: the pick is always both, after one round.
  EXPECT_EQ(AutoDraftHeads(V{1}, V{0}, 2, 1, 4), 2);
}

TEST_P(SpeculativeTest, TrainedHeadsAreAcceptedAndOutputStillEqualsGreedy) {
  const auto& [family, heads] = GetParam();
  auto model = MakeModel(TinySpec(family, heads), 3);
  TrainOnCycle(model.get(), 60);
  const std::vector<int32_t> prompt = {3, 4, 5, 6, 7, 8, 9, 3, 4};
  GenerateOptions options;
  options.max_new_tokens = 21;
  absl::StatusOr<GenerateResult> greedy = Generate(model.get(), prompt, options);
  ASSERT_TRUE(greedy.ok()) << greedy.status();
  // The trained model continues the cycle (the heads agree only if it learned it).
  int in_cycle = 0;
  for (size_t i = 0; i < greedy->tokens.size(); ++i) in_cycle += greedy->tokens[i] == static_cast<int32_t>(3 + (i + 9) % 7);
  EXPECT_GE(in_cycle, 18) << family;
  absl::StatusOr<GenerateResult> spec = GenerateSpeculative(model.get(), prompt, options);
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->tokens, greedy->tokens) << family << " heads " << heads;
  EXPECT_GT(spec->accepted, 0) << family;
  std::printf("%s mtp=%d: %zu tokens, %ld rounds, %.2f tokens/forward, acceptance %.2f\n", family.c_str(), heads,
              spec->tokens.size(), static_cast<long>(spec->forwards), spec->tokens_per_forward(), spec->acceptance());
  EXPECT_GT(spec->tokens_per_forward(), 1.0) << family;
  EXPECT_LE(spec->tokens_per_forward(), static_cast<double>(heads));
  EXPECT_EQ(greedy->forwards, 21);
  EXPECT_LT(spec->forwards, greedy->forwards);
  // Auto keeps every head where every draft is accepted.
  options.draft_heads = kAutoDraftHeads;
  options.auto_rounds = 2;
  absl::StatusOr<GenerateResult> auto_k = GenerateSpeculative(model.get(), prompt, options);
  ASSERT_TRUE(auto_k.ok()) << auto_k.status();
  EXPECT_EQ(auto_k->tokens, greedy->tokens) << family;
  EXPECT_EQ(auto_k->draft_heads, heads) << family << ": accepted " << auto_k->accepted << " of " << auto_k->drafted;
}

INSTANTIATE_TEST_SUITE_P(Families, SpeculativeTest,
                         ::testing::Values(std::make_tuple("llama", 2), std::make_tuple("llama", 4),
                                           std::make_tuple("xlstm", 3), std::make_tuple("mamba2", 2),
                                           std::make_tuple("mamba2", 4), std::make_tuple("hybrid", 3)),
                         [](const auto& info) {
                           return std::get<0>(info.param) + "_mtp" + std::to_string(std::get<1>(info.param));
                         });

TEST(SpeculativeStopTest, StopTokenInsideAnAcceptedRunEndsLikeGreedy) {
  auto model = MakeModel(TinySpec("mamba2", 4), 3);
  TrainOnCycle(model.get(), 60);
  const std::vector<int32_t> prompt = {3, 4, 5, 6, 7, 8, 9, 3, 4};
  GenerateOptions options;
  options.max_new_tokens = 30;
  for (int32_t stop : {5, 8}) {  // tokens the cycle reaches mid-round
    options.stop_token = stop;
    absl::StatusOr<GenerateResult> greedy = Generate(model.get(), prompt, options);
    absl::StatusOr<GenerateResult> spec = GenerateSpeculative(model.get(), prompt, options);
    ASSERT_TRUE(greedy.ok() && spec.ok());
    EXPECT_EQ(spec->tokens, greedy->tokens) << "stop " << stop;
    ASSERT_FALSE(spec->tokens.empty());
    EXPECT_EQ(spec->tokens.back(), stop);
    EXPECT_LE(spec->decode_steps, spec->forwards);  // one DecodeChunk per round at most
  }
}

TEST(GenerateTest, GreedyEqualsArgmaxOfTheFullForward) {
  auto model = MakeModel(TinySpec("hybrid", 1), 9);
  Perturb(model.get(), 2, 0.2);
  std::vector<int32_t> seq = {2, 4, 6, 8};
  GenerateOptions options;
  options.max_new_tokens = 6;
  absl::StatusOr<GenerateResult> out = Generate(model.get(), seq, options);
  ASSERT_TRUE(out.ok()) << out.status();
  for (int32_t t : out->tokens) {
    ops::Tensor logits = model->Logits(seq, 1, static_cast<int64_t>(seq.size()));
    const int64_t v = logits.cols();
    std::vector<float> last(v);
    for (int64_t i = 0; i < v; ++i) last[i] = static_cast<float>(logits.At((logits.rows() - 1) * v + i));
    EXPECT_EQ(t, Argmax(last));
    seq.push_back(t);
  }
}

TEST(GenerateTest, SamplingIsSeededAndTopKOneIsGreedy) {
  auto model = MakeModel(TinySpec("llama", 1), 4);
  Perturb(model.get(), 8, 0.3);
  const std::vector<int32_t> prompt = {1, 2, 3};
  GenerateOptions options;
  options.max_new_tokens = 12;
  auto greedy = Generate(model.get(), prompt, options);
  options.sampling = {.temperature = 1.5, .top_k = 0, .top_p = 1.0, .seed = 42};
  auto a = Generate(model.get(), prompt, options);
  auto b = Generate(model.get(), prompt, options);
  options.sampling.seed = 43;
  auto c = Generate(model.get(), prompt, options);
  options.sampling.top_k = 1;
  auto k1 = Generate(model.get(), prompt, options);
  ASSERT_TRUE(greedy.ok() && a.ok() && b.ok() && c.ok() && k1.ok());
  EXPECT_EQ(a->tokens, b->tokens);
  EXPECT_NE(a->tokens, c->tokens);  // 12 draws at temperature 1.5 over 23 ids
  EXPECT_EQ(k1->tokens, greedy->tokens);
}

TEST(SampleTokenTest, TopKAndTopPCutTheTail) {
  // Probabilities at temperature 1: logits log(0.5), log(0.3), log(0.15), log(0.05).
  const std::vector<float> logits = {std::log(0.3f), std::log(0.05f), std::log(0.5f), std::log(0.15f)};
  SamplingOptions s{.temperature = 1.0};
  // Sorted: id 2 (0.5), 0 (0.3), 3 (0.15), 1 (0.05).
  EXPECT_EQ(SampleToken(logits, s, 0.49), 2);
  EXPECT_EQ(SampleToken(logits, s, 0.51), 0);
  EXPECT_EQ(SampleToken(logits, s, 0.81), 3);
  EXPECT_EQ(SampleToken(logits, s, 0.99), 1);
  s.top_k = 2;  // {2, 0} renormalised: 0.625 / 0.375
  EXPECT_EQ(SampleToken(logits, s, 0.6), 2);
  EXPECT_EQ(SampleToken(logits, s, 0.99), 0);
  s.top_k = 0;
  s.top_p = 0.8;  // smallest set with mass >= 0.8: {2, 0}
  EXPECT_EQ(SampleToken(logits, s, 0.99), 0);
  s.top_p = 0.81;  // {2, 0, 3}: 0.15 / 0.95 of the mass is id 3
  EXPECT_EQ(SampleToken(logits, s, 0.99), 3);
  std::map<int32_t, int> counts;
  s = {.temperature = 1.0};
  for (int i = 0; i < 1000; ++i) counts[SampleToken(logits, s, (i + 0.5) / 1000)]++;
  EXPECT_EQ(counts[2], 500);
  EXPECT_EQ(counts[0], 300);
  EXPECT_EQ(counts[3], 150);
  EXPECT_EQ(counts[1], 50);
}

TEST(GenerateTest, BadInputGetsClearErrors) {
  auto model = MakeModel(TinySpec("llama", 1), 1);
  GenerateOptions options;
  options.max_new_tokens = 4;
  options.max_context = 6;
  auto too_long = Generate(model.get(), std::vector<int32_t>{1, 2, 3}, options);
  ASSERT_FALSE(too_long.ok());
  EXPECT_NE(too_long.status().message().find("exceeds the allowed context of 6"), std::string::npos) << too_long.status();
  auto bad_id = Generate(model.get(), std::vector<int32_t>{1, 99}, options);
  ASSERT_FALSE(bad_id.ok());
  EXPECT_NE(bad_id.status().message().find("prompt token 1 is id 99"), std::string::npos) << bad_id.status();
  EXPECT_FALSE(Generate(model.get(), std::vector<int32_t>{}, options).ok());
  auto no_heads = GenerateSpeculative(model.get(), std::vector<int32_t>{1}, options);
  ASSERT_FALSE(no_heads.ok());
  EXPECT_NE(no_heads.status().message().find("mtp_heads"), std::string::npos) << no_heads.status();
}

}  // namespace
}  // namespace gyre::eval
