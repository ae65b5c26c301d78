#include "worker/checkpoint.h"

#include <algorithm>
#include <optional>
#include <random>

#include "base/fault_injection_env.h"
#include "base/mem_env.h"
#include "gtest/gtest.h"

namespace gyre {
namespace {

CheckpointState MakeState(uint64_t step, uint32_t seed) {
  std::mt19937 rng(seed);
  CheckpointState s;
  s.step = step;
  s.generation = 4;
  s.config.set_name("unit");
  s.rng_state = "rng-" + std::to_string(seed);
  for (int i = 0; i < 3; ++i) {
    TensorSnapshot t;
    t.name = "blocks." + std::to_string(i) + ".weight";
    t.shape = {17, uint64_t(3 + i)};
    t.bytes.resize(17 * (3 + i) * sizeof(float));
    for (char& c : t.bytes) c = static_cast<char>(rng());
    s.tensors.push_back(std::move(t));
  }
  return s;
}

void ExpectSame(const CheckpointState& a, const CheckpointState& b) {
  EXPECT_EQ(a.step, b.step);
  EXPECT_EQ(a.generation, b.generation);
  EXPECT_EQ(a.rng_state, b.rng_state);
  EXPECT_EQ(a.config.name(), b.config.name());
  ASSERT_EQ(a.tensors.size(), b.tensors.size());
  for (size_t i = 0; i < a.tensors.size(); ++i) {
    EXPECT_EQ(a.tensors[i].name, b.tensors[i].name);
    EXPECT_EQ(a.tensors[i].shape, b.tensors[i].shape);
    EXPECT_EQ(a.tensors[i].data(), b.tensors[i].data());
  }
}

TEST(CheckpointTest, RoundTripAcrossSeveralFiles) {
  auto env = NewMemEnv();
  CheckpointState s = MakeState(12, 1);
  auto dir = WriteCheckpoint(env.get(), "/run/checkpoints", s, /*max_file_bytes=*/300);
  ASSERT_TRUE(dir.ok()) << dir.status();
  EXPECT_EQ(*dir, "/run/checkpoints/step-12");
  auto names = env->ListDir(*dir);
  EXPECT_GE(names->size(), 3u);  // MANIFEST + at least two state files
  auto back = ReadCheckpoint(env.get(), *dir);
  ASSERT_TRUE(back.ok()) << back.status();
  ExpectSame(s, *back);
}

TEST(CheckpointTest, CorruptNewestFallsBackToPreviousAndNamesTheFile) {
  auto mem = NewMemEnv();
  FaultInjectionEnv env(mem.get());
  ASSERT_TRUE(WriteCheckpoint(&env, "/c", MakeState(10, 1)).ok());
  ASSERT_TRUE(WriteCheckpoint(&env, "/c", MakeState(20, 2)).ok());
  ASSERT_TRUE(env.FlipByte("/c/step-20/state-0.bin", 5).ok());
  auto latest = LoadLatestCheckpoint(&env, "/c");
  ASSERT_TRUE(latest.ok()) << latest.status();
  EXPECT_EQ(latest->state.step, 10u);
  ASSERT_EQ(latest->skipped.size(), 1u);
  EXPECT_NE(latest->skipped[0].find("state-0.bin"), std::string::npos) << latest->skipped[0];
  EXPECT_NE(latest->skipped[0].find("checksum"), std::string::npos);
  ExpectSame(MakeState(10, 1), latest->state);
}

TEST(CheckpointTest, TornCheckpointMissingAFileIsSkipped) {
  auto env = NewMemEnv();
  ASSERT_TRUE(WriteCheckpoint(env.get(), "/c", MakeState(1, 1)).ok());
  ASSERT_TRUE(WriteCheckpoint(env.get(), "/c", MakeState(2, 2)).ok());
  ASSERT_TRUE(env->RemoveFile("/c/step-2/state-0.bin").ok());
  auto latest = LoadLatestCheckpoint(env.get(), "/c");
  ASSERT_TRUE(latest.ok());
  EXPECT_EQ(latest->state.step, 1u);
  // A manifest that does not parse is data loss too.
  auto f = env->NewWritableFile("/c/step-1/MANIFEST");
  ASSERT_TRUE((*f)->Append("garbage").ok());
  auto none = LoadLatestCheckpoint(env.get(), "/c");
  EXPECT_TRUE(absl::IsNotFound(none.status())) << none.status();
  EXPECT_TRUE(absl::IsDataLoss(ReadCheckpoint(env.get(), "/c/step-1").status()));
}

// Kill the writer at every mutation point of a second checkpoint: after the crash the newest
// valid checkpoint is the old one or the complete new one — never torn, never lost once
// WriteCheckpoint returned OK.
TEST(CheckpointTest, CrashAtEveryPointLeavesOldOrNew) {
  int points = 0;
  {
    auto mem = NewMemEnv();
    FaultInjectionEnv env(mem.get());
    ASSERT_TRUE(WriteCheckpoint(&env, "/c", MakeState(1, 1)).ok());
    int before = env.mutation_count();
    ASSERT_TRUE(WriteCheckpoint(&env, "/c", MakeState(2, 2), 300).ok());
    points = env.mutation_count() - before;
  }
  ASSERT_GT(points, 8);
  for (int n = 1; n <= points + 1; ++n) {
    auto mem = NewMemEnv();
    FaultInjectionEnv env(mem.get());
    ASSERT_TRUE(WriteCheckpoint(&env, "/c", MakeState(1, 1)).ok());
    env.FailNthMutation(n, /*sticky=*/true);
    absl::StatusOr<std::string> written = WriteCheckpoint(&env, "/c", MakeState(2, 2), 300);
    ASSERT_TRUE(env.SimulateCrash().ok());
    auto latest = LoadLatestCheckpoint(&env, "/c");
    ASSERT_TRUE(latest.ok()) << "n=" << n << ": " << latest.status();
    if (written.ok()) {
      EXPECT_EQ(latest->state.step, 2u) << "acknowledged checkpoint lost at n=" << n;
    }
    ExpectSame(MakeState(latest->state.step, latest->state.step == 1 ? 1 : 2), latest->state);
  }
}

TEST(CheckpointTest, PruneKeepsLastKAndRemovesLeftovers) {
  auto env = NewMemEnv();
  for (uint64_t step : {5, 10, 15, 20}) ASSERT_TRUE(WriteCheckpoint(env.get(), "/c", MakeState(step, step)).ok());
  ASSERT_TRUE(env->CreateDirs("/c/step-25.tmp").ok());
  ASSERT_TRUE(PruneCheckpoints(env.get(), "/c", 2).ok());
  auto names = env->ListDir("/c");
  EXPECT_EQ(*names, std::vector<std::string>({"step-15", "step-20"}));
}

TEST(CheckpointTest, AsyncWriterReportsCompletionAndPrunes) {
  auto env = NewMemEnv();
  std::vector<uint64_t> done;
  {
    CheckpointWriter writer(env.get(), "/c", 2, [&](uint64_t step, absl::StatusOr<std::string> dir) {
      ASSERT_TRUE(dir.ok()) << dir.status();
      done.push_back(step);
    });
    for (uint64_t step = 1; step <= 4; ++step) writer.Submit(MakeState(step, step));
    writer.Flush();
  }
  EXPECT_EQ(done, std::vector<uint64_t>({1, 2, 3, 4}));
  EXPECT_EQ(*env->ListDir("/c"), std::vector<std::string>({"step-3", "step-4"}));
}

// A failure at any point of a checkpoint's write and the pruning after it: the writer reports
// success exactly when the new checkpoint is durable (still the latest after a crash). A durable
// one whose pruning of older checkpoints failed is still reported (the coordinator must learn of
// it, or no restore would ever use it); one that is partial or not yet durable is an error.
TEST(CheckpointTest, WriterReportsSuccessExactlyWhenTheCheckpointIsDurable) {
  int pruning_failures = 0;
  bool covered = false;
  for (int n = 1; n <= 200 && !covered; ++n) {
    auto mem = NewMemEnv();
    FaultInjectionEnv env(mem.get());
    std::optional<absl::StatusOr<std::string>> second;
    {
      CheckpointWriter writer(&env, "/c", 1, [&](uint64_t step, absl::StatusOr<std::string> dir) {
        if (step == 2) second = std::move(dir);
      });
      writer.Submit(MakeState(1, 1));
      writer.Flush();
      env.FailNthMutation(n);
      writer.Submit(MakeState(2, 2));
      writer.Flush();
    }
    ASSERT_TRUE(second.has_value());
    const std::vector<std::string> names = *env.ListDir("/c");
    const bool old_kept = std::count(names.begin(), names.end(), "step-1") == 1;
    pruning_failures += second->ok() && old_kept;
    covered = second->ok() && !old_kept;  // n lies past the last mutation: every point was hit
    env.SimulateCrash();
    absl::StatusOr<LatestCheckpoint> latest = LoadLatestCheckpoint(&env, "/c");
    ASSERT_TRUE(latest.ok()) << "n " << n << ": " << latest.status();
    EXPECT_EQ(second->ok(), latest->state.step == 2)
        << "n " << n << ": the writer said " << second->status() << "; after a crash the latest is step "
        << latest->state.step;
    if (latest->state.step == 2) ExpectSame(MakeState(2, 2), latest->state);
  }
  EXPECT_TRUE(covered) << "200 injected failures did not get past the write and the pruning";
  EXPECT_GT(pruning_failures, 0) << "no failure hit the pruning: the test did not exercise it";
}

}  // namespace
}  // namespace gyre
