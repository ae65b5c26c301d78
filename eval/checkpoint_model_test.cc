#include "eval/checkpoint_model.h"

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "cli/run_config.h"
#include "eval/test_models.h"
#include "gtest/gtest.h"

namespace gyre::eval {
namespace {

std::string Tmp(const std::string& name) {
  const char* base = std::getenv("TEST_TMPDIR");
  const std::string dir = std::string(base ? base : "/tmp") + "/" + name;
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

// A run directory as the coordinator and workers leave it: config.json and checkpoints of a
// model whose parameters are shifted by `step` (so each checkpoint is distinguishable).
class RunDirTest : public ::testing::Test {
 protected:
  void SetUp() override {
    run_ = Tmp("run");
    config_.set_name("t");
    config_.set_seed(3);
    *config_.mutable_model() = testing::TinyModelConfig("hybrid", 2);
    std::ofstream(run_ + "/config.json") << cli::RunConfigToJson(config_);
    for (uint64_t step : {4, 8}) WriteStep(step);
  }

  std::unique_ptr<ops::LanguageModel> ModelOfStep(uint64_t step) {
    auto model = ops::LanguageModel::Create(*ops::ResolveModelConfig(config_.model()), ops::DType::kF32,
                                            ops::Device::kCpu, 100 + step);
    EXPECT_TRUE(model.ok());
    return std::move(*model);
  }

  void WriteStep(uint64_t step) {
    auto model = ModelOfStep(step);
    CheckpointState state;
    state.step = step;
    state.config = config_;
    for (ops::Parameter* p : model->params().All()) {
      TensorSnapshot s;
      s.name = "param." + p->name;
      s.dtype = gyre::v1::DTYPE_F32;
      for (int64_t d : p->value.shape()) s.shape.push_back(d);
      s.bytes.assign(static_cast<const char*>(p->value.raw()), p->value.nbytes());
      state.tensors.push_back(std::move(s));
    }
    TensorSnapshot moment{.name = "adam.m.embedding.weight", .dtype = gyre::v1::DTYPE_F32, .shape = {1}, .bytes = "abcd"};
    state.tensors.push_back(moment);
    ASSERT_TRUE(WriteCheckpoint(Env::Default(), run_ + "/checkpoints", state).ok());
  }

  static double LogitsDistance(ops::LanguageModel* a, ops::LanguageModel* b) {
    const std::vector<int32_t> in = {1, 7, 3, 9, 2};
    ops::Tensor x = a->Logits(in, 1, 5), y = b->Logits(in, 1, 5);
    double worst = 0;
    for (int64_t i = 0; i < x.numel(); ++i) worst = std::max(worst, std::abs(x.At(i) - y.At(i)));
    return worst;
  }

  std::string run_;
  gyre::v1::RunConfig config_;
};

TEST_F(RunDirTest, LoadsTheNewestOrANamedStep) {
  absl::StatusOr<LoadedModel> latest = LoadModelFromRun(Env::Default(), {.run_dir = run_});
  ASSERT_TRUE(latest.ok()) << latest.status();
  EXPECT_EQ(latest->step, 8u);
  EXPECT_EQ(latest->spec.mtp_heads, 2);
  EXPECT_EQ(LogitsDistance(latest->model.get(), ModelOfStep(8).get()), 0.0);
  EXPECT_GT(LogitsDistance(latest->model.get(), ModelOfStep(4).get()), 1e-3);
  absl::StatusOr<LoadedModel> four = LoadModelFromRun(Env::Default(), {.run_dir = run_, .step = 4});
  ASSERT_TRUE(four.ok()) << four.status();
  EXPECT_EQ(LogitsDistance(four->model.get(), ModelOfStep(4).get()), 0.0);
}

TEST_F(RunDirTest, ListsCheckpointStepsInOrder) {
  WriteStep(12);
  std::filesystem::create_directories(run_ + "/checkpoints/step-00000099.tmp");  // a torn write
  absl::StatusOr<std::vector<uint64_t>> steps = ListCheckpointSteps(Env::Default(), run_);
  ASSERT_TRUE(steps.ok()) << steps.status();
  EXPECT_EQ(*steps, (std::vector<uint64_t>{4, 8, 12}));
  EXPECT_FALSE(ListCheckpointSteps(Env::Default(), run_ + "/missing").ok());
}

TEST_F(RunDirTest, CorruptNewestFallsBackAndIsReported) {
  // Flip a byte of the newest checkpoint's first tensor file.
  std::string victim;
  for (const auto& e : std::filesystem::directory_iterator(run_ + "/checkpoints/" + CheckpointDirName(8)))
    if (e.path().filename() != "MANIFEST") victim = e.path();
  ASSERT_FALSE(victim.empty());
  {
    std::fstream f(victim, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(3);
    f.put('\x7f');
  }
  absl::StatusOr<LoadedModel> latest = LoadModelFromRun(Env::Default(), {.run_dir = run_});
  ASSERT_TRUE(latest.ok()) << latest.status();
  EXPECT_EQ(latest->step, 4u);
  ASSERT_EQ(latest->skipped.size(), 1u);
  auto named = LoadModelFromRun(Env::Default(), {.run_dir = run_, .step = 8});
  ASSERT_FALSE(named.ok());
  EXPECT_NE(named.status().message().find(CheckpointDirName(8)), std::string::npos) << named.status();
}

TEST_F(RunDirTest, BadInputNamesTheFileOrField) {
  auto no_run = LoadModelFromRun(Env::Default(), {.run_dir = run_ + "/missing"});
  ASSERT_FALSE(no_run.ok());
  EXPECT_NE(no_run.status().message().find("missing/config.json"), std::string::npos) << no_run.status();

  auto no_step = LoadModelFromRun(Env::Default(), {.run_dir = run_, .step = 5});
  ASSERT_FALSE(no_step.ok());
  EXPECT_NE(no_step.status().message().find("step 5"), std::string::npos) << no_step.status();

  const std::string empty = Tmp("empty_run");
  std::ofstream(empty + "/config.json") << cli::RunConfigToJson(config_);
  auto none = LoadModelFromRun(Env::Default(), {.run_dir = empty});
  ASSERT_FALSE(none.ok());
  EXPECT_NE(none.status().message().find("no valid checkpoint in " + empty + "/checkpoints"), std::string::npos)
      << none.status();

  // A config whose model differs from the one the checkpoint was written with.
  gyre::v1::RunConfig other = config_;
  other.mutable_model()->set_d_model(24);
  const std::string other_path = empty + "/other.json";
  std::ofstream(other_path) << cli::RunConfigToJson(other);
  auto mismatch = LoadModelFromRun(Env::Default(), {.run_dir = run_, .config_path = other_path});
  ASSERT_FALSE(mismatch.ok());
  EXPECT_NE(mismatch.status().message().find("other.json differs"), std::string::npos) << mismatch.status();

  // An invalid model section names the field.
  gyre::v1::RunConfig bad = config_;
  bad.mutable_model()->set_preset("no-such-model");
  const std::string bad_path = empty + "/bad.json";
  std::ofstream(bad_path) << cli::RunConfigToJson(bad);
  auto invalid = LoadModelFromRun(Env::Default(), {.run_dir = run_, .config_path = bad_path});
  ASSERT_FALSE(invalid.ok());
  EXPECT_NE(invalid.status().message().find("bad.json"), std::string::npos) << invalid.status();
  EXPECT_NE(invalid.status().message().find("preset"), std::string::npos) << invalid.status();

  // A checkpoint that lacks a parameter.
  auto model = ModelOfStep(1);
  std::vector<TensorSnapshot> tensors;
  auto load = LoadParameters(tensors, "ckpt-x", model.get());
  ASSERT_FALSE(load.ok());
  EXPECT_NE(load.message().find("ckpt-x has no tensor param.embedding.weight"), std::string::npos) << load;
}

}  // namespace
}  // namespace gyre::eval
