// Issue 5: "a corrupt or torn checkpoint is detected and the previous one used".
//
// A 2-worker run checkpoints every 4 steps and keeps 3. Once three checkpoints c1 < c2 < c3
// exist, the run is paused, one byte of c3's tensor file is flipped (corrupt) and c2's tensor
// file is deleted (torn), and every worker is killed -9. No state holder survives, so the
// replacements must restore: c3 fails its checksum, the worker reports it, the coordinator marks
// it bad in its journal and names c2; c2 fails (missing file), is marked bad too; c1 verifies and
// the run resumes from it (the steps after c1 are erased from the journal and redone on the same
// samples). The ledger is exact, `gyre ledger` lists c2 and c3 as BAD, and the run goes on past c3.
#include <signal.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include "gtest/gtest.h"
#include "tests/e2e/e2e_util.h"

namespace gyre::e2e {
namespace {

namespace fs = std::filesystem;

std::vector<uint64_t> CheckpointSteps(const std::string& run_dir) {
  std::vector<uint64_t> steps;
  const std::string dir = run_dir + "/checkpoints";
  if (!fs::exists(dir)) return steps;
  for (const auto& e : fs::directory_iterator(dir)) {
    const std::string name = e.path().filename();
    if (name.rfind("step-", 0) != 0 || name.find(".tmp") != std::string::npos) continue;
    steps.push_back(std::stoull(name.substr(5)));
  }
  std::sort(steps.begin(), steps.end());
  return steps;
}

TEST(CheckpointFallbackTest, CorruptAndTornCheckpointsFallBackToThePreviousValidOne) {
  const std::string root = TestTmp() + "/checkpoint_fallback";
  ASSERT_TRUE(PrepareGoldenIndex(root + "/index"));
  LocalRun run(root, "fallback",
               "seed: 13\n"
               "model { preset: \"llama-tiny\" vocab_size: 50257 }\n"
               "data { index_dir: \"@INDEX@\" seq_len: 32 global_batch: 6 }\n"
               "optimizer { lr: 0.003 }\n"
               "schedule { warmup_steps: 5 total_steps: 100000 }\n"
               "train { max_steps: 100000 }\n"
               "checkpoint { every_steps: 4 keep_last: 3 }\n"
               "cluster { desired_workers: 2 heartbeat_interval_ms: 100 heartbeat_timeout_ms: 1500 "
               "collective_timeout_ms: 10000 }\n");
  ASSERT_TRUE(run.Launch(2));
  ASSERT_TRUE(WaitFor([&] { return run.Committed() >= 14; }, 240)) << (run.DumpLogs(), "no progress");
  ASSERT_TRUE(run.PauseAndSettle()) << (run.DumpLogs(), "commits did not stop after pause");
  // The last checkpoint's report may still be on its way: wait until the journal names the
  // newest complete directory.
  std::vector<uint64_t> steps;
  ASSERT_TRUE(WaitFor(
      [&] {
        steps = CheckpointSteps(run.run_dir());
        nlohmann::json s = run.Status();
        return steps.size() == 3 && s.is_object() &&
               std::stoull(s.value("last_checkpoint_step", std::string("0"))) == steps.back();
      },
      60))
      << (run.DumpLogs(), "expected 3 checkpoints, the newest one journaled");
  const uint64_t c1 = steps[0], c2 = steps[1], c3 = steps[2];
  const uint64_t paused_at = run.Committed();
  std::fprintf(stderr, "paused at %llu with checkpoints %llu, %llu, %llu\n", (unsigned long long)paused_at,
               (unsigned long long)c1, (unsigned long long)c2, (unsigned long long)c3);

  // Corrupt c3: flip one byte in the middle of its tensor file.
  const std::string c3_file = run.run_dir() + "/checkpoints/step-" + std::to_string(c3) + "/state-0.bin";
  {
    std::fstream f(c3_file, std::ios::in | std::ios::out | std::ios::binary);
    ASSERT_TRUE(f.good()) << c3_file;
    const auto size = fs::file_size(c3_file);
    f.seekg(static_cast<std::streamoff>(size / 2));
    char byte = 0;
    f.read(&byte, 1);
    byte = static_cast<char>(byte ^ 0x5a);
    f.seekp(static_cast<std::streamoff>(size / 2));
    f.write(&byte, 1);
  }
  // Tear c2: its tensor file is gone (the manifest still names it).
  ASSERT_TRUE(fs::remove(run.run_dir() + "/checkpoints/step-" + std::to_string(c2) + "/state-0.bin"));

  // Nobody survives with the state.
  for (pid_t pid : run.Pids("worker")) ASSERT_EQ(::kill(pid, SIGKILL), 0);
  std::fprintf(stderr, "killed every worker\n");
  // The replacements restore (while paused: membership changes do not wait for resume).
  // "gyre coordinator: generation G (restore): N workers from step S" (S ends the line).
  auto restored_from = [&](uint64_t step) {
    const std::string suffix = "from step " + std::to_string(step);
    for (const std::string& line : run.CoordinatorLogLines({"(restore)", suffix})) {
      if (line.size() >= suffix.size() && line.compare(line.size() - suffix.size(), suffix.size(), suffix) == 0) {
        return true;
      }
    }
    return false;
  };
  ASSERT_TRUE(WaitFor([&] { return restored_from(c1); }, 120))
      << (run.DumpLogs(), "no restore generation from the oldest checkpoint");
  EXPECT_TRUE(restored_from(c3)) << "no restore was first attempted from checkpoint " << c3;
  EXPECT_EQ(run.Committed(), c1) << "the ledger was not rolled back to the valid checkpoint";
  // The journal marks both bad (read while the coordinator runs; before the run writes new
  // checkpoints of those steps, whose good records would replace the bad ones).
  ASSERT_TRUE(WaitFor(
      [&] {
        Ledger now = run.ReadLedger();
        return now.summary.find("checkpoints/step-" + std::to_string(c2) + "  BAD: ") != std::string::npos &&
               now.summary.find("checkpoints/step-" + std::to_string(c3) + "  BAD: ") != std::string::npos;
      },
      30))
      << run.ReadLedger().summary;
  std::fprintf(stderr, "%s", run.ReadLedger().summary.c_str());
  ASSERT_FALSE(run.Ctl({"resume"}).is_null());
  ASSERT_TRUE(WaitFor([&] { return run.Committed() >= paused_at + 2; }, 180))
      << (run.DumpLogs(), "the run did not continue past the bad checkpoints");

  ASSERT_FALSE(run.Ctl({"stop"}).is_null());
  int code = -1;
  const bool clean = run.WaitForExit(180, &code);
  if (!clean) run.DumpLogs();
  ASSERT_TRUE(clean) << "launcher exit code " << code;

  const std::string worker_logs = run.WorkerLogs();
  EXPECT_NE(worker_logs.find("step-" + std::to_string(c3) + "/state-0.bin fails its checksum"), std::string::npos)
      << "no worker reported the corrupt file by name";
  EXPECT_NE(worker_logs.find("step-" + std::to_string(c2) + "/state-0.bin"), std::string::npos)
      << "no worker reported the missing file by name";

  Ledger ledger = run.ReadLedger();
  std::fprintf(stderr, "%s", ledger.summary.c_str());
  EXPECT_EQ(ledger.code, 0) << ledger.summary;
  ASSERT_GT(ledger.steps.size(), paused_at);
  for (size_t i = 0; i < ledger.steps.size(); ++i) {
    const LedgerStep& s = ledger.steps[i];
    EXPECT_EQ(s.step, i);
    EXPECT_EQ(s.sample_begin, 6 * s.step);
    EXPECT_EQ(s.sample_end, 6 * s.step + 6);
  }
}

}  // namespace
}  // namespace gyre::e2e
