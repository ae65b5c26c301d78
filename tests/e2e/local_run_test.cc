// The whole system as users run it: `gyre prepare`, then `gyre launch --local` with two CPU
// workers, steered with `gyrectl` while faults are injected — kill -9 of a worker mid-run, a
// pause, a live scale-up, kill -9 of the coordinator — and at the end `gyre ledger` must show
// every step committed exactly once with the right sample range (DESIGN.md section 4).
#include <signal.h>

#include <chrono>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "tests/e2e/e2e_util.h"

namespace gyre::e2e {
namespace {

constexpr char kConfig[] =
    "seed: 7\n"
    "model { preset: \"llama-tiny\" vocab_size: 50257 }\n"
    "data { index_dir: \"@INDEX@\" seq_len: 32 global_batch: 6 }\n"
    "optimizer { lr: 0.003 }\n"
    "schedule { warmup_steps: 5 total_steps: 70 }\n"
    "train { max_steps: 70 }\n"
    "checkpoint { every_steps: 20 keep_last: 2 }\n"
    "cluster { desired_workers: 2 heartbeat_interval_ms: 200 "
    "heartbeat_timeout_ms: 2500 collective_timeout_ms: 15000 }\n";

TEST(LocalRunTest, SurvivesWorkerAndCoordinatorKillsPauseAndScaleWithAnExactLedger) {
  const std::string root = TestTmp() + "/e2e";
  ASSERT_TRUE(PrepareGoldenIndex(root + "/index")) << "gyre prepare failed";
  LocalRun run(root, "e2e", kConfig);
  ASSERT_TRUE(run.Launch(2));
  auto dump = [&] {
    run.DumpLogs(1500);
    return "";
  };

  ASSERT_TRUE(WaitFor([&] { return run.Committed() >= 5; }, 180)) << dump() << "no progress";

  // 1. kill -9 a worker mid-run: the launcher replaces it, survivors move to a new generation.
  std::vector<pid_t> workers = run.Pids("worker");
  ASSERT_FALSE(workers.empty());
  uint64_t before = run.Committed();
  ASSERT_EQ(::kill(workers.front(), SIGKILL), 0);
  std::fprintf(stderr, "killed worker %d at committed step %llu\n", workers.front(), (unsigned long long)before);
  ASSERT_TRUE(WaitFor([&] { return run.Committed() >= before + 5; }, 180)) << dump() << "no progress after worker kill";

  // 2. pause: commits stop (a step already leased may still commit: wait until the count has
  // been still for 5 s), then nothing commits for another 5 s; then resume.
  ASSERT_TRUE(run.PauseAndSettle(5)) << "commits did not stop after pause";
  const uint64_t paused_at = run.Committed();
  std::this_thread::sleep_for(std::chrono::seconds(5));
  EXPECT_EQ(run.Committed(), paused_at) << "a step committed while paused";
  nlohmann::json paused = run.Status();
  EXPECT_EQ(paused.value("state", ""), "RUN_STATE_PAUSED") << paused.dump();
  ASSERT_FALSE(run.Ctl({"resume"}).is_null());
  ASSERT_TRUE(WaitFor([&] { return run.Committed() > paused_at; }, 120)) << dump() << "no progress after resume";

  // 3. live scale-up to 3 workers: the launcher starts one, it joins by state hand-over, and
  // steps commit at world size 3 before the next fault (on a loaded machine the first 3-worker
  // generation can still be forming when `workers_active` first reads 3).
  ASSERT_FALSE(run.Ctl({"scale", "3"}).is_null());
  auto three_active = [&] {
    nlohmann::json s = run.Status();
    return s.is_object() && s.value("workers_active", 0) == 3;
  };
  ASSERT_TRUE(WaitFor(three_active, 180)) << dump() << "never reached 3 active workers";
  const uint64_t scaled_at = run.Committed();
  ASSERT_TRUE(WaitFor([&] { return three_active() && run.Committed() >= scaled_at + 2; }, 180))
      << dump() << "no progress at 3 workers";

  // 4. kill -9 the coordinator: the launcher restarts it from its journal; workers keep their weights.
  std::vector<pid_t> coordinators = run.Pids("coordinator");
  ASSERT_EQ(coordinators.size(), 1u);
  before = run.Committed();
  ASSERT_EQ(::kill(coordinators.front(), SIGKILL), 0);
  std::fprintf(stderr, "killed coordinator %d at committed step %llu\n", coordinators.front(),
               (unsigned long long)before);
  ASSERT_TRUE(WaitFor([&] { return run.Committed() >= before + 3; }, 180)) << dump() << "no progress after coordinator kill";

  // The run finishes by itself (train.max_steps) and the launcher exits cleanly.
  int exit_code = -1;
  ASSERT_TRUE(run.WaitForExit(300, &exit_code)) << dump() << "the run did not finish";
  EXPECT_EQ(exit_code, 0) << dump() << "launcher failed";

  // The ledger: steps 0..69 exactly once, each [6t, 6t+6); several generations; world 3 seen.
  Ledger ledger = run.ReadLedger();
  EXPECT_EQ(ledger.code, 0) << ledger.summary;
  EXPECT_NE(ledger.summary.find("ledger: 70 committed steps, global batch 6, 0 problem(s)"), std::string::npos)
      << ledger.summary;
  ASSERT_EQ(ledger.steps.size(), 70u);
  bool saw_world_3 = false;
  for (size_t t = 0; t < ledger.steps.size(); ++t) {
    const LedgerStep& s = ledger.steps[t];
    EXPECT_EQ(s.step, t);
    EXPECT_EQ(s.sample_begin, 6 * t);
    EXPECT_EQ(s.sample_end, 6 * t + 6);
    EXPECT_TRUE(s.problem.empty()) << "step " << t << ": " << s.problem;
    EXPECT_GT(s.model_flops_per_s, 0) << "step " << t << ": no model FLOP/s in the step metrics";
    if (t > 0) {
      EXPECT_GE(s.committed_unix_ms, ledger.steps[t - 1].committed_unix_ms) << "step " << t;
    }
    saw_world_3 |= s.world == 3;
  }
  EXPECT_TRUE(saw_world_3) << dump() << "no step ran at world size 3";
  // Loss fell: mean of the last 10 committed losses well below the first 10.
  double first = 0, last = 0;
  for (int i = 0; i < 10; ++i) first += ledger.steps[i].loss, last += ledger.steps[60 + i].loss;
  EXPECT_LT(last, first - 10 * 0.5) << "mean loss of steps 0-9 " << first / 10 << ", of 60-69 " << last / 10;
  std::fprintf(stderr, "mean loss steps 0-9: %.3f, steps 60-69: %.3f\n", first / 10, last / 10);
}

// A worker that cannot start (here: no index was prepared at the config's index_dir) must end
// the launch with its own error, not be restarted forever (deploy/crash_loop.h).
TEST(LocalRunTest, WorkersThatCannotStartEndTheLaunchWithTheirError) {
  const std::string root = TestTmp() + "/bad-index";
  LocalRun run(root, "bad", kConfig);  // root/index is never prepared
  ASSERT_TRUE(run.Launch(2));
  int code = -1;
  const auto start = std::chrono::steady_clock::now();
  ASSERT_TRUE(run.WaitForExit(180, &code) || code != -1) << "the launcher was still restarting workers after 180 s";
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const std::string out = ReadFileOrEmpty(root + "/launch-bad.log");
  EXPECT_NE(code, 0) << out;
  EXPECT_NE(out.find("giving up"), std::string::npos) << out;
  EXPECT_NE(out.find("no token index at " + root + "/index"), std::string::npos) << out;
  std::fprintf(stderr, "launch gave up after %.1f s\n", seconds);
}

}  // namespace
}  // namespace gyre::e2e
