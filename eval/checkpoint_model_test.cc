#include "eval/checkpoint_model.h"

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <utility>

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

  // The parameters as ModelReplica::Snapshot names them, then an optimizer moment of 64 KiB;
  // files of at most 4 KiB, so the parameters span several files and the moment has its own.
  std::vector<TensorSnapshot> StateTensors(ops::LanguageModel* model) {
    std::vector<TensorSnapshot> tensors;
    for (ops::Parameter* p : model->params().All()) {
      TensorSnapshot s;
      s.name = "param." + p->name;
      s.dtype = gyre::v1::DTYPE_F32;
      for (int64_t d : p->value.shape()) s.shape.push_back(d);
      s.bytes.assign(static_cast<const char*>(p->value.raw()), p->value.nbytes());
      tensors.push_back(std::move(s));
    }
    TensorSnapshot moment{.name = "adam.m.embedding.weight", .dtype = gyre::v1::DTYPE_F32, .shape = {16384}};
    moment.bytes.assign(16384 * 4, '\x5a');
    tensors.push_back(moment);
    return tensors;
  }

  void WriteTensors(uint64_t step, std::vector<TensorSnapshot> tensors) {
    CheckpointState state;
    state.step = step;
    state.config = config_;
    state.tensors = std::move(tensors);
    ASSERT_TRUE(WriteCheckpoint(Env::Default(), run_ + "/checkpoints", state, /*max_file_bytes=*/4096).ok());
  }

  void WriteStep(uint64_t step) { WriteTensors(step, StateTensors(ModelOfStep(step).get())); }

  std::string StepDir(uint64_t step) const { return run_ + "/checkpoints/" + CheckpointDirName(step); }

  // The files of checkpoint `step` that hold a parameter, and the others, in manifest order.
  std::pair<std::vector<gyre::v1::FileEntry>, std::vector<gyre::v1::FileEntry>> Files(uint64_t step) {
    absl::StatusOr<gyre::v1::CheckpointManifest> manifest = ReadCheckpointManifest(Env::Default(), StepDir(step));
    EXPECT_TRUE(manifest.ok()) << manifest.status();
    std::set<std::string> with_parameters;
    for (const auto& t : manifest->tensors()) {
      if (t.name().rfind("param.", 0) == 0) with_parameters.insert(t.file());
    }
    std::pair<std::vector<gyre::v1::FileEntry>, std::vector<gyre::v1::FileEntry>> out;
    for (const auto& f : manifest->files()) (with_parameters.count(f.path()) ? out.first : out.second).push_back(f);
    return out;
  }

  static void FlipByte(const std::string& path, uint64_t offset) {
    std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(static_cast<std::streamoff>(offset));
    const char c = static_cast<char>(f.get());
    f.seekp(static_cast<std::streamoff>(offset));
    f.put(static_cast<char>(c ^ 1));
  }

  // Every parameter's bytes, by name.
  static std::map<std::string, std::string> ParameterBytes(ops::LanguageModel* model) {
    std::map<std::string, std::string> out;
    for (ops::Parameter* p : model->params().All()) {
      out[p->name].assign(static_cast<const char*>(p->value.raw()), p->value.nbytes());
    }
    return out;
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
  // Flip a byte in the LAST file holding parameters of the newest checkpoint: found after the
  // earlier files were streamed into the model, which the fallback then overwrites completely.
  const auto [parameter_files, other_files] = Files(8);
  ASSERT_GE(parameter_files.size(), 3u);
  const std::string victim = StepDir(8) + "/" + parameter_files.back().path();
  FlipByte(victim, parameter_files.back().bytes() / 2);
  absl::StatusOr<LoadedModel> latest = LoadModelFromRun(Env::Default(), {.run_dir = run_});
  ASSERT_TRUE(latest.ok()) << latest.status();
  EXPECT_EQ(latest->step, 4u);
  EXPECT_EQ(ParameterBytes(latest->model.get()), ParameterBytes(ModelOfStep(4).get()));
  ASSERT_EQ(latest->skipped.size(), 1u);
  EXPECT_NE(latest->skipped[0].find(victim), std::string::npos) << latest->skipped[0];
  auto named = LoadModelFromRun(Env::Default(), {.run_dir = run_, .step = 8});
  ASSERT_TRUE(absl::IsDataLoss(named.status())) << named.status();
  EXPECT_NE(named.status().message().find(victim), std::string::npos) << named.status();
  EXPECT_NE(named.status().message().find("checksum"), std::string::npos) << named.status();
}

// The streamed parameters are the saved ones bit for bit, across files and chunks that split
// tensors (1000 bytes: not a multiple of 4), with 1 to 3 readers; only the parameter files are
// read, through one set of buffers (readers x 2 chunks), never the whole checkpoint.
TEST_F(RunDirTest, StreamedParametersAreBitIdenticalToTheSavedOnes) {
  const auto [parameter_files, other_files] = Files(8);
  ASSERT_GE(parameter_files.size(), 3u);
  ASSERT_FALSE(other_files.empty()) << "the moment should have a file of its own";
  uint64_t parameter_bytes = 0;
  for (const auto& f : parameter_files) parameter_bytes += f.bytes();
  const auto saved = ParameterBytes(ModelOfStep(8).get());
  absl::StatusOr<gyre::v1::CheckpointManifest> manifest = ReadCheckpointManifest(Env::Default(), StepDir(8));
  ASSERT_TRUE(manifest.ok());
  for (int threads : {1, 3}) {
    auto model = ModelOfStep(1);
    ASSERT_NE(ParameterBytes(model.get()), saved);
    CheckpointStreamOptions options;
    options.chunk_bytes = 1000;
    options.reader_threads = threads;
    absl::StatusOr<CheckpointStreamStats> stats = LoadParameters(Env::Default(), StepDir(8), *manifest, model.get(), options);
    ASSERT_TRUE(stats.ok()) << stats.status();
    EXPECT_EQ(ParameterBytes(model.get()), saved) << threads << " readers";
    EXPECT_EQ(stats->bytes, parameter_bytes) << "files without parameters were read";
    EXPECT_EQ(stats->buffers, threads * 2);
    EXPECT_EQ(stats->chunk_bytes, 1000u);
  }
  // LoadModelFromRun streams with the config's settings (unset: 4 readers x 2 buffers x 32 MiB).
  absl::StatusOr<LoadedModel> loaded = LoadModelFromRun(Env::Default(), {.run_dir = run_});
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(ParameterBytes(loaded->model.get()), saved);
  EXPECT_EQ(loaded->stream.bytes, parameter_bytes);
  EXPECT_EQ(loaded->stream.chunk_bytes, size_t{32} << 20);
}

// The optimizer's moments are not read, so a corrupt moment-only file costs nothing.
TEST_F(RunDirTest, AFileWithoutParametersIsNotRead) {
  const auto [parameter_files, other_files] = Files(8);
  ASSERT_FALSE(other_files.empty());
  FlipByte(StepDir(8) + "/" + other_files.back().path(), 5);
  absl::StatusOr<LoadedModel> latest = LoadModelFromRun(Env::Default(), {.run_dir = run_});
  ASSERT_TRUE(latest.ok()) << latest.status();
  EXPECT_EQ(latest->step, 8u);
  EXPECT_TRUE(latest->skipped.empty());
  EXPECT_EQ(ParameterBytes(latest->model.get()), ParameterBytes(ModelOfStep(8).get()));
}

// A checkpoint of another architecture: a parameter missing, of another shape, or not f32 is
// refused naming the tensor and the checkpoint, before a byte of the model is written; and it is
// the model's problem, not a torn file, so LoadModelFromRun does not fall back to an older one.
TEST_F(RunDirTest, MissingOrMismatchedParametersAreRefusedBeforeAnythingIsWritten) {
  for (const std::string fault : {"missing", "shape", "dtype", "size"}) {
    std::vector<TensorSnapshot> tensors = StateTensors(ModelOfStep(12).get());
    std::string expect;
    if (fault == "missing") {
      tensors.erase(tensors.begin());
      expect = StepDir(12) + " has no tensor param.embedding.weight (the model config expects it)";
    } else if (fault == "shape") {
      std::swap(tensors[0].shape[0], tensors[0].shape[1]);
      expect = StepDir(12) + ": tensor param.embedding.weight has shape [";
    } else if (fault == "dtype") {
      tensors[0].dtype = gyre::v1::DTYPE_BF16;
      expect = StepDir(12) + ": tensor param.embedding.weight is not f32";
    } else {
      tensors[0].bytes.resize(tensors[0].bytes.size() - 4);
      expect = StepDir(12) + ": tensor param.embedding.weight is not f32";
    }
    ASSERT_NO_FATAL_FAILURE(WriteTensors(12, tensors));
    absl::StatusOr<gyre::v1::CheckpointManifest> manifest = ReadCheckpointManifest(Env::Default(), StepDir(12));
    ASSERT_TRUE(manifest.ok());
    auto model = ModelOfStep(1);
    const auto before = ParameterBytes(model.get());
    absl::StatusOr<CheckpointStreamStats> stats = LoadParameters(Env::Default(), StepDir(12), *manifest, model.get());
    ASSERT_TRUE(absl::IsDataLoss(stats.status())) << fault << ": " << stats.status();
    EXPECT_NE(stats.status().message().find(expect), std::string::npos) << stats.status();
    EXPECT_EQ(ParameterBytes(model.get()), before) << fault << ": the model was written";
    absl::StatusOr<LoadedModel> latest = LoadModelFromRun(Env::Default(), {.run_dir = run_});
    ASSERT_TRUE(absl::IsDataLoss(latest.status())) << fault << ": " << latest.status();
    EXPECT_NE(latest.status().message().find(expect), std::string::npos) << latest.status();
  }
}

TEST_F(RunDirTest, InvalidReadSettingsInTheConfigAreRefusedNamingTheField) {
  gyre::v1::RunConfig bad = config_;
  bad.mutable_checkpoint()->set_restore_reader_threads(100);
  const std::string path = run_ + "/bad-readers.json";
  std::ofstream(path) << cli::RunConfigToJson(bad);
  absl::StatusOr<LoadedModel> loaded = LoadModelFromRun(Env::Default(), {.run_dir = run_, .config_path = path});
  ASSERT_TRUE(absl::IsInvalidArgument(loaded.status())) << loaded.status();
  EXPECT_NE(loaded.status().message().find("bad-readers.json: checkpoint.restore_reader_threads: 100"), std::string::npos)
      << loaded.status();
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

}

}  // namespace
}  // namespace gyre::eval
