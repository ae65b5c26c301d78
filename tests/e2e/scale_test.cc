// Issue 5, live scale: `gyrectl scale 3` then `gyrectl scale 1` on a running 2-worker run. The
// scale-up hands the state to the new member over the new communicator (no disk); the scale-down
// happens at a step boundary (no step aborted, no failure generation) and the two members beyond
// the target stay up as standbys (DESIGN.md section 5: "workers beyond the target wait as
// standbys and join on the next scale-up or failure"). The ledger is exact throughout and shows
// the world sizes 2, then 3, then 1, in that order.
#include <cstdio>

#include "gtest/gtest.h"
#include "tests/e2e/e2e_util.h"

namespace gyre::e2e {
namespace {

TEST(ScaleTest, TwoToThreeToOneLiveWithAnExactLedger) {
  const std::string root = TestTmp() + "/scale";
  ASSERT_TRUE(PrepareGoldenIndex(root + "/index"));
  LocalRun run(root, "scale",
               "seed: 5\n"
               "model { preset: \"llama-tiny\" vocab_size: 50257 }\n"
               "data { index_dir: \"@INDEX@\" seq_len: 32 global_batch: 6 }\n"
               "optimizer { lr: 0.003 }\n"
               "schedule { warmup_steps: 5 total_steps: 100000 }\n"
               "train { max_steps: 100000 }\n"
               "cluster { desired_workers: 2 heartbeat_interval_ms: 200 heartbeat_timeout_ms: 5000 "
               "collective_timeout_ms: 15000 }\n");
  ASSERT_TRUE(run.Launch(2));
  ASSERT_TRUE(WaitFor([&] { return run.Committed() >= 3; }, 180)) << (run.DumpLogs(), "no progress");
  // The step-time breakdown reaches gyrectl: every phase reported separately.
  {
    nlohmann::json times = run.Status()["last_metrics"]["times"];
    for (const char* phase : {"forward_ms", "backward_ms", "exposed_comm_ms", "optimizer_ms", "total_ms"}) {
      EXPECT_GT(times.value(phase, 0.0), 0.0) << phase << " in " << times.dump();
    }
    CommandResult text = RunCommand({Bin("gyrectl"), "--run-dir", run.run_dir(), "status"});
    EXPECT_NE(text.out.find("step time"), std::string::npos) << text.out;
    EXPECT_NE(text.out.find("exposed comm"), std::string::npos) << text.out;
  }

  auto workers_are = [&](int active, int standby) {
    nlohmann::json s = run.Status();
    return s.is_object() && s.value("workers_active", 0) == active && s.value("workers_standby", 0) == standby;
  };
  ASSERT_FALSE(run.Ctl({"scale", "3"}).is_null());
  ASSERT_TRUE(WaitFor([&] { return workers_are(3, 0); }, 180)) << (run.DumpLogs(), "never 3 active workers");
  uint64_t at = run.Committed();
  ASSERT_TRUE(WaitFor([&] { return run.Committed() >= at + 3; }, 120)) << (run.DumpLogs(), "no progress at 3");

  ASSERT_FALSE(run.Ctl({"scale", "1"}).is_null());
  ASSERT_TRUE(WaitFor([&] { return workers_are(1, 2); }, 120))
      << (run.DumpLogs(), "never 1 active worker with 2 standbys");
  at = run.Committed();
  ASSERT_TRUE(WaitFor([&] { return run.Committed() >= at + 3; }, 120)) << (run.DumpLogs(), "no progress at 1");
  // The standbys are still alive (processes) while the run goes on.
  EXPECT_EQ(run.Pids("worker").size(), 3u);

  ASSERT_FALSE(run.Ctl({"stop"}).is_null());
  int code = -1;
  const bool clean = run.WaitForExit(180, &code);
  if (!clean) run.DumpLogs();
  ASSERT_TRUE(clean) << "launcher exit code " << code;
  // Counted after the stop: members leaving a stopped run dissolve the generation as "stop",
  // never as "failure".
  const int failures = run.CountInCoordinatorLog("(failure)");
  const int restores = run.CountInCoordinatorLog("(restore)");
  const int scales = run.CountInCoordinatorLog("(scale)");
  const int stops = run.CountInCoordinatorLog("(stop)");

  Ledger ledger = run.ReadLedger();
  std::fprintf(stderr, "%s", ledger.summary.c_str());
  EXPECT_EQ(ledger.code, 0) << ledger.summary;
  // World sizes in ledger order: a run of 2s, then 3s, then 1s.
  std::vector<uint32_t> phases;
  for (size_t i = 0; i < ledger.steps.size(); ++i) {
    const LedgerStep& s = ledger.steps[i];
    EXPECT_EQ(s.step, i);
    EXPECT_EQ(s.sample_begin, 6 * s.step);
    EXPECT_EQ(s.sample_end, 6 * s.step + 6);
    if (phases.empty() || phases.back() != s.world) phases.push_back(s.world);
  }
  EXPECT_EQ(phases, (std::vector<uint32_t>{2, 3, 1})) << (run.DumpLogs(), "world sizes out of order");
  // Both changes were boundary reconfigurations, never failures or restores.
  EXPECT_EQ(failures, 0) << (run.DumpLogs(), "a scale change looked like a failure");
  EXPECT_EQ(restores, 0);
  EXPECT_GE(scales, 2);
  EXPECT_EQ(stops, 1) << "the clean end is one empty \"stop\" generation";
}

}  // namespace
}  // namespace gyre::e2e
