// A killed worker costs the run its replacement's registration, not its heartbeat timeout: the
// launcher starts the replacement with --replaces-pid, the coordinator declares the killed member
// dead when the replacement registers, the survivor trains on, and the replacement joins at a step
// boundary once it has built its replica (DESIGN.md section 4, "Failure"). The heartbeat timeout
// here is two minutes, so a failover within the test's deadline can only come from that path.
#include <signal.h>

#include <chrono>
#include <cstdio>

#include "gtest/gtest.h"
#include "tests/e2e/e2e_util.h"

namespace gyre::e2e {
namespace {

TEST(FailoverTest, AKilledWorkerIsDeclaredDeadWhenItsReplacementRegisters) {
  const std::string root = TestTmp() + "/failover";
  ASSERT_TRUE(PrepareGoldenIndex(root + "/index"));
  LocalRun run(root, "failover",
               "seed: 3\n"
               "model { preset: \"llama-tiny\" vocab_size: 50257 }\n"
               "data { index_dir: \"@INDEX@\" seq_len: 32 global_batch: 6 }\n"
               "optimizer { lr: 0.003 }\n"
               "schedule { warmup_steps: 5 total_steps: 100000 }\n"
               "train { max_steps: 100000 }\n"
               "cluster { desired_workers: 2 heartbeat_interval_ms: 200 heartbeat_timeout_ms: 120000 "
               "collective_timeout_ms: 120000 }\n");
  ASSERT_TRUE(run.Launch(2));
  ASSERT_TRUE(WaitFor([&] { return run.Committed() >= 3; }, 180)) << (run.DumpLogs(), "no progress");

  std::vector<pid_t> workers = run.Pids("worker");
  ASSERT_EQ(workers.size(), 2u);
  const uint64_t before = run.Committed();
  const auto killed_at = std::chrono::steady_clock::now();
  ASSERT_EQ(::kill(workers.back(), SIGKILL), 0);
  // Three more commits well inside the 120 s heartbeat timeout (the survivor's collective breaks
  // at once; only the replacement's registration can end the generation).
  ASSERT_TRUE(WaitFor([&] { return run.Committed() >= before + 3; }, 60))
      << (run.DumpLogs(), "no progress within 60 s of the kill");
  const double failover_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - killed_at).count();
  std::fprintf(stderr, "failover: 3 commits %.1f s after the kill\n", failover_s);
  // The replacement joins: two active workers again, none starting.
  auto two_active = [&] {
    nlohmann::json s = run.Status();
    return s.is_object() && s.value("workers_active", 0) == 2;
  };
  ASSERT_TRUE(WaitFor(two_active, 60)) << (run.DumpLogs(), "the replacement never joined");
  const uint64_t rejoined = run.Committed();
  ASSERT_TRUE(WaitFor([&] { return two_active() && run.Committed() >= rejoined + 2; }, 60))
      << (run.DumpLogs(), "no progress at 2 workers after the replacement joined");

  ASSERT_FALSE(run.Ctl({"stop"}).is_null());
  int code = -1;
  const bool clean = run.WaitForExit(180, &code);
  if (!clean) run.DumpLogs();
  ASSERT_TRUE(clean) << "launcher exit code " << code;
  EXPECT_GE(run.CountInCoordinatorLog("(failure)"), 1);
  EXPECT_GE(run.CountInCoordinatorLog("(join)"), 1);
  Ledger ledger = run.ReadLedger();
  std::fprintf(stderr, "%s", ledger.summary.c_str());
  EXPECT_EQ(ledger.code, 0) << ledger.summary;
  for (size_t i = 0; i < ledger.steps.size(); ++i) {
    EXPECT_EQ(ledger.steps[i].step, i);
    EXPECT_EQ(ledger.steps[i].sample_begin, 6 * i);
    EXPECT_EQ(ledger.steps[i].sample_end, 6 * i + 6);
  }
  // Stopped with two members: rank 0 wrote the final checkpoint even if the other member left
  // (and dissolved the generation) first.
  const std::string final_checkpoint =
      run.run_dir() + "/checkpoints/step-" + std::to_string(ledger.steps.size()) + "/MANIFEST";
  EXPECT_FALSE(ReadFileOrEmpty(final_checkpoint).empty()) << final_checkpoint;
}

}  // namespace
}  // namespace gyre::e2e
