// AdamW against a hand-computed step, weight-decay exclusions, state save/load, the LR schedule's
// shape, gradient clipping, config parsing and one Trainer step.
#include "ops/train_step.h"

#include <cmath>

#include "gtest/gtest.h"
#include "ops/grad_clip.h"

namespace gyre::ops {
namespace {

TEST(AdamWTest, MatchesHandComputedSteps) {
  ParamStore store(DType::kF64, Device::kCpu);
  Parameter* w = store.Create("w", {2}, ParamKind::kWeight);
  Parameter* n = store.Create("n", {1}, ParamKind::kNorm);
  w->value.Set(0, 1.0);
  w->value.Set(1, -2.0);
  n->value.Set(0, 0.5);
  AdamW opt(&store, {0.9, 0.95, 1e-5, 0.1, false});
  // Step 1: g = (0.5, -1), g_n = 2, lr = 0.01.
  w->grad.Set(0, 0.5);
  w->grad.Set(1, -1.0);
  n->grad.Set(0, 2.0);
  opt.Step(0.01);
  // m = 0.1 g, v = 0.05 g²; m̂ = g, v̂ = g²  ->  update = lr * g / (|g| + eps)
  EXPECT_NEAR(w->value.At(0), 1.0 * (1 - 0.01 * 0.1) - 0.01 * 0.5 / (0.5 + 1e-5), 1e-15);
  EXPECT_NEAR(w->value.At(1), -2.0 * (1 - 0.01 * 0.1) + 0.01 * 1.0 / (1.0 + 1e-5), 1e-15);
  EXPECT_NEAR(n->value.At(0), 0.5 - 0.01 * 2.0 / (2.0 + 1e-5), 1e-15);  // no decay on norms
  // Step 2 with g = (-0.5, 0), lr = 0.02, by hand.
  w->grad.Set(0, -0.5);
  w->grad.Set(1, 0.0);
  n->grad.Set(0, 0.0);
  const double w0 = w->value.At(0);
  opt.Step(0.02);
  const double m = 0.9 * 0.05 + 0.1 * -0.5, v = 0.95 * 0.05 * 0.25 + 0.05 * 0.25;
  const double mhat = m / (1 - 0.81), vhat = v / (1 - 0.9025);
  EXPECT_NEAR(w->value.At(0), w0 * (1 - 0.02 * 0.1) - 0.02 * mhat / (std::sqrt(vhat) + 1e-5), 1e-15);
  EXPECT_EQ(opt.steps_taken(), 2);
}

TEST(AdamWTest, DecayKindsAndDecayAll) {
  ParamStore store(DType::kF64, Device::kCpu);
  Parameter* kinds[] = {store.Create("w", {1}, ParamKind::kWeight), store.Create("n", {1}, ParamKind::kNorm),
                        store.Create("b", {1}, ParamKind::kBias), store.Create("e", {1}, ParamKind::kEmbedding),
                        store.Create("a", {1}, ParamKind::kNoDecay)};
  AdamW normal(&store, {});
  AdamW all(&store, {0.9, 0.95, 1e-5, 0.1, true});
  EXPECT_TRUE(normal.Decays(*kinds[0]));
  for (int i = 1; i < 5; ++i) EXPECT_FALSE(normal.Decays(*kinds[i])) << kinds[i]->name;
  for (int i = 0; i < 5; ++i) EXPECT_TRUE(all.Decays(*kinds[i]));
  // Zero gradient: only decay moves a weight.
  for (Parameter* p : kinds) p->value.Set(0, 1.0);
  normal.Step(0.5);
  EXPECT_NEAR(kinds[0]->value.At(0), 0.95, 1e-15);
  EXPECT_EQ(kinds[1]->value.At(0), 1.0);
}

TEST(AdamWTest, StateRoundTripContinuesIdentically) {
  auto make = [] {
    auto s = std::make_unique<ParamStore>(DType::kF32, Device::kCpu);
    Parameter* p = s->Create("layer.weight", {3}, ParamKind::kWeight);
    for (int i = 0; i < 3; ++i) p->value.Set(i, i + 1.0);
    return s;
  };
  auto feed = [](ParamStore* s, int step) {
    for (int i = 0; i < 3; ++i) s->All()[0]->grad.Set(i, std::sin(step + i));
  };
  auto a = make();
  AdamW opt_a(a.get(), {});
  for (int t = 0; t < 3; ++t) { feed(a.get(), t); opt_a.Step(0.1); }
  auto b = make();
  b->All()[0]->value.CopyFrom(a->All()[0]->value);
  AdamW opt_b(b.get(), {});
  std::vector<NamedTensor> state;
  for (const NamedTensor& nt : opt_a.State()) state.push_back({nt.name, nt.tensor.Clone()});
  ASSERT_TRUE(opt_b.LoadState(state).ok());
  EXPECT_EQ(opt_b.steps_taken(), 3);
  for (int t = 3; t < 6; ++t) {
    feed(a.get(), t); opt_a.Step(0.1);
    feed(b.get(), t); opt_b.Step(0.1);
  }
  for (int i = 0; i < 3; ++i) EXPECT_EQ(a->All()[0]->value.At(i), b->All()[0]->value.At(i));
  // Missing or mis-shaped entries are refused by name.
  state.erase(state.begin());
  absl::Status s = opt_b.LoadState(state);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(std::string(s.message()).find("adam.m.layer.weight"), std::string::npos);
}

TEST(LrScheduleTest, WarmupCosineFloor) {
  LrSchedule s{1e-3, 10, 110, 0.1};
  EXPECT_NEAR(s.At(0), 1e-4, 1e-15);
  EXPECT_NEAR(s.At(9), 1e-3, 1e-15);
  EXPECT_NEAR(s.At(10), 1e-3, 1e-15);
  EXPECT_NEAR(s.At(60), 0.55e-3, 1e-12);  // halfway: final + (peak - final) / 2
  EXPECT_NEAR(s.At(110), 1e-4, 1e-15);
  EXPECT_NEAR(s.At(100000), 1e-4, 1e-15);
  for (uint64_t t = 10; t < 110; ++t) EXPECT_GE(s.At(t), s.At(t + 1));
}

TEST(GradClipTest, ScalesOnlyAboveMax) {
  ParamStore store(DType::kF64, Device::kCpu);
  Parameter* a = store.Create("a", {2}, ParamKind::kWeight);
  Parameter* b = store.Create("b", {1}, ParamKind::kBias);
  a->grad.Set(0, 3.0);
  b->grad.Set(0, 4.0);
  EXPECT_NEAR(ClipGradNorm(&store, 10.0), 5.0, 1e-15);
  EXPECT_EQ(a->grad.At(0), 3.0);
  EXPECT_NEAR(ClipGradNorm(&store, 1.0), 5.0, 1e-15);
  EXPECT_NEAR(a->grad.At(0), 0.6, 1e-15);
  EXPECT_NEAR(b->grad.At(0), 0.8, 1e-15);
  EXPECT_NEAR(GlobalGradNorm(&store), 1.0, 1e-15);
}

TEST(TrainOptionsTest, DefaultsAndErrors) {
  gyre::v1::OptimizerConfig o;
  gyre::v1::ScheduleConfig s;
  EXPECT_FALSE(TrainOptionsFromConfig(o, s).ok());
  o.set_lr(1e-3);
  auto t = TrainOptionsFromConfig(o, s);
  ASSERT_TRUE(t.ok());
  EXPECT_DOUBLE_EQ(t->adamw.beta2, 0.95);
  EXPECT_FLOAT_EQ(t->adamw.eps, 1e-5);
  EXPECT_DOUBLE_EQ(t->grad_clip, 1.0);
  EXPECT_DOUBLE_EQ(t->schedule.final_fraction, 0.1);
  s.set_warmup_steps(10);
  s.set_total_steps(5);
  auto bad = TrainOptionsFromConfig(o, s);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(std::string(bad.status().message()).find("schedule.total_steps"), std::string::npos);
}

TEST(ModelStateTest, SaveLoadReproducesTheModel) {
  auto spec = PresetSpec("xlstm-tiny");
  ASSERT_TRUE(spec.ok());
  auto a = LanguageModel::Create(*spec, DType::kF32, Device::kCpu, 1);
  auto b = LanguageModel::Create(*spec, DType::kF32, Device::kCpu, 2);
  ASSERT_TRUE(a.ok() && b.ok());
  std::vector<int32_t> tokens(2 * 17);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<int32_t>((i * 5) % 31);
  const double la = (*a)->Evaluate(tokens, 2, 16, 1.0 / 32).loss;
  EXPECT_NE(la, (*b)->Evaluate(tokens, 2, 16, 1.0 / 32).loss);
  std::vector<NamedTensor> state;
  for (const NamedTensor& nt : (*a)->params().State()) state.push_back({nt.name, nt.tensor.Clone()});
  ASSERT_TRUE((*b)->params().LoadState(state).ok());
  EXPECT_EQ(la, (*b)->Evaluate(tokens, 2, 16, 1.0 / 32).loss);
  state.back().tensor = Tensor::Zeros({3}, DType::kF32);
  absl::Status s = (*b)->params().LoadState(state);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(std::string(s.message()).find(state.back().name), std::string::npos) << s;
}

TEST(TrainerTest, StepLowersLossOnRepeatedBatch) {
  auto spec = PresetSpec("llama-tiny");
  ASSERT_TRUE(spec.ok());
  auto model = LanguageModel::Create(*spec, DType::kF32, Device::kCpu, 1);
  ASSERT_TRUE(model.ok());
  TrainOptions opt;
  opt.schedule = {3e-3, 0, 0, 0.1};
  Trainer trainer(model->get(), opt);
  std::vector<int32_t> tokens(2 * 17);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<int32_t>((i * 7) % 23);
  auto first = trainer.Step(tokens, 2, 16, 0);
  ASSERT_TRUE(first.ok());
  EXPECT_NEAR(first->loss.loss, std::log(256.0), 0.5);  // near uniform at init
  EXPECT_GT(first->update.grad_norm, 0);
  double last = 0;
  for (int t = 1; t < 20; ++t) last = trainer.Step(tokens, 2, 16, t)->loss.loss;
  EXPECT_LT(last, first->loss.loss - 1.0);
}

}  // namespace
}  // namespace gyre::ops
