// SuperviseWorker with stand-in worker programs (small shell scripts given as the "gyre" binary:
// they see `worker <args>` as their arguments and count their starts in a file).
#include "deploy/worker_supervisor.h"

#include <sys/stat.h>

#include <cstdlib>
#include <fstream>
#include <sstream>

#include "gtest/gtest.h"

namespace gyre::deploy {
namespace {

std::string Tmp() { return std::getenv("TEST_TMPDIR"); }

// Writes an executable script whose body runs after `n` = how many times it has started (1, 2, ...).
std::string Script(const std::string& name, const std::string& body) {
  const std::string path = Tmp() + "/" + name;
  const std::string count = path + ".starts";
  std::remove(count.c_str());
  std::ofstream(path) << "#!/bin/sh\n"
                      << "echo \"$*\" >>'" << count << "'\n"
                      << "n=$(wc -l <'" << count << "')\n"
                      << body << "\n";
  ::chmod(path.c_str(), 0755);
  return path;
}

std::vector<std::string> Starts(const std::string& script) {
  std::ifstream in(script + ".starts");
  std::vector<std::string> lines;
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

gyre::v1::RunStatus State(gyre::v1::RunState s) {
  gyre::v1::RunStatus status;
  status.set_state(s);
  return status;
}

SuperviseOptions Options(const std::string& exe) {
  SuperviseOptions o;
  o.self_exe = exe;
  o.worker_args = {"--run-dir", "/r", "--device", "cpu"};
  o.restart_delay_ms = 10;
  return o;
}

TEST(SuperviseWorkerTest, RestartsAKilledWorkerWithTheSameArgumentsNamingTheOneItReplaces) {
  const std::string pids = Tmp() + "/killed.pids";
  std::remove(pids.c_str());
  const std::string exe =
      Script("killed", "echo $$ >>'" + pids + "'; if [ \"$n\" -lt 3 ]; then kill -9 $$; fi; exit 0");
  int polls = 0;
  absl::Status s = SuperviseWorker(Options(exe), [&]() -> absl::StatusOr<gyre::v1::RunStatus> {
    ++polls;
    return State(gyre::v1::RUN_STATE_RUNNING);
  });
  EXPECT_TRUE(s.ok()) << s;
  const std::vector<std::string> starts = Starts(exe);
  ASSERT_EQ(starts.size(), 3u);  // killed twice, then finished
  std::vector<std::string> pid_of_start;
  std::ifstream in(pids);
  for (std::string line; std::getline(in, line);) pid_of_start.push_back(line);
  ASSERT_EQ(pid_of_start.size(), 3u);
  // The same arguments each time; a restart names the process it replaces.
  EXPECT_EQ(starts[0], "worker --run-dir /r --device cpu");
  EXPECT_EQ(starts[1], "worker --replaces-pid " + pid_of_start[0] + " --run-dir /r --device cpu");
  EXPECT_EQ(starts[2], "worker --replaces-pid " + pid_of_start[1] + " --run-dir /r --device cpu");
  EXPECT_EQ(polls, 5);  // the run's progress at each start, "is the run over?" after each kill
}

TEST(SuperviseWorkerTest, DoesNotRestartWhenTheRunIsOver) {
  const std::string exe = Script("over", "exit 1");
  absl::Status s = SuperviseWorker(Options(exe), []() -> absl::StatusOr<gyre::v1::RunStatus> {
    return State(gyre::v1::RUN_STATE_FINISHED);
  });
  EXPECT_TRUE(s.ok()) << s;
  EXPECT_EQ(Starts(exe).size(), 1u);
}

TEST(SuperviseWorkerTest, AnUnreachableCoordinatorIsNotTheEndOfTheRun) {
  const std::string exe = Script("unreachable", "if [ \"$n\" -lt 2 ]; then kill -9 $$; fi; exit 0");
  absl::Status s = SuperviseWorker(Options(exe), []() -> absl::StatusOr<gyre::v1::RunStatus> {
    return absl::UnavailableError("connection refused");
  });
  EXPECT_TRUE(s.ok()) << s;
  EXPECT_EQ(Starts(exe).size(), 2u);
}

TEST(SuperviseWorkerTest, GivesUpOnACrashLoop) {
  const std::string exe = Script("crashing", "exit 3");
  SuperviseOptions options = Options(exe);
  options.max_quick_exits_in_a_row = 4;
  absl::Status s = SuperviseWorker(options, []() -> absl::StatusOr<gyre::v1::RunStatus> {
    return State(gyre::v1::RUN_STATE_RUNNING);
  });
  EXPECT_EQ(s.code(), absl::StatusCode::kAborted) << s;
  EXPECT_NE(s.message().find("4 times in a row"), absl::string_view::npos) << s;
  EXPECT_EQ(Starts(exe).size(), 4u);
}

TEST(SuperviseWorkerTest, SlowFailuresAfterProgressAreRestartedWithoutLimit) {
  // Failures after quick_exit_ms while the run committed steps are not a crash loop (a worker
  // that trained a while, then died).
  const std::string exe = Script("slow", "if [ \"$n\" -lt 6 ]; then sleep 0.2; exit 3; fi; exit 0");
  SuperviseOptions options = Options(exe);
  options.max_quick_exits_in_a_row = 2;
  options.quick_exit_ms = 100;
  int64_t committed = 0;
  absl::Status s = SuperviseWorker(options, [&]() -> absl::StatusOr<gyre::v1::RunStatus> {
    gyre::v1::RunStatus status = State(gyre::v1::RUN_STATE_RUNNING);
    status.set_committed_steps(committed += 5);
    return status;
  });
  EXPECT_TRUE(s.ok()) << s;
  EXPECT_EQ(Starts(exe).size(), 6u);
}

TEST(SuperviseWorkerTest, GivesUpOnSlowFailuresWithoutProgress) {
  // A worker whose start-up outlasts quick_exit_ms and that then fails before any step (out of
  // device memory at step 0): the run never moves, so the restarts must end.
  const std::string exe = Script("stuck", "sleep 0.2; exit 3");
  SuperviseOptions options = Options(exe);
  options.max_quick_exits_in_a_row = 3;
  options.quick_exit_ms = 100;
  absl::Status s = SuperviseWorker(options, []() -> absl::StatusOr<gyre::v1::RunStatus> {
    gyre::v1::RunStatus status = State(gyre::v1::RUN_STATE_RUNNING);
    status.set_committed_steps(17);
    return status;
  });
  EXPECT_EQ(s.code(), absl::StatusCode::kAborted) << s;
  EXPECT_NE(s.message().find("no step committed"), absl::string_view::npos) << s;
  EXPECT_EQ(Starts(exe).size(), 3u);
}

}  // namespace
}  // namespace gyre::deploy
