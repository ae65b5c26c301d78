// The provisioner loops on simulated time: a scripted sequence of coordinator answers in, the
// argv of every command they run out (a recording CommandRunner). The same loops run against a
// real coordinator and fake kubectl / sbatch programs in tests/e2e/.
#include "deploy/provisioner.h"

#include <deque>
#include <filesystem>
#include <fstream>

#include "gtest/gtest.h"

namespace gyre::deploy {
namespace {

class RecordingRunner final : public CommandRunner {
 public:
  absl::StatusOr<CommandOutput> Run(const std::vector<std::string>& argv, int64_t) override {
    calls.push_back(argv);
    CommandOutput out;
    if (fail_next > 0) {
      --fail_next;
      out.exit_code = 1;
      out.output = "error: forbidden";
      return out;
    }
    out.exit_code = 0;
    out.output = answer;
    return out;
  }
  std::vector<std::vector<std::string>> calls;
  int fail_next = 0;
  std::string answer;
};

gyre::v1::RunStatus Status(gyre::v1::RunState state, uint32_t desired) {
  gyre::v1::RunStatus s;
  s.set_state(state);
  s.set_desired_workers(desired);
  return s;
}

// Answers one scripted status per poll; after the script, the last one again.
struct Script {
  std::deque<absl::StatusOr<gyre::v1::RunStatus>> answers;
  absl::StatusOr<gyre::v1::RunStatus> last = absl::UnavailableError("no answer");
  int polls = 0;
  StatusSource Source() {
    return [this]() {
      ++polls;
      if (!answers.empty()) {
        last = answers.front();
        answers.pop_front();
      }
      return last;
    };
  }
};

std::vector<std::string> Scale(int replicas) {
  return {"kubectl", "--namespace", "ml", "scale", "statefulset", "gyre-demo-worker",
          "--replicas=" + std::to_string(replicas)};
}

TEST(K8sProvisionerTest, ScalesOnEveryChangeOnceRetriesFailuresAndEndsAtZero) {
  using gyre::v1::RUN_STATE_RUNNING;
  Script script;
  script.answers = {absl::UnavailableError("connection refused"),  // coordinator starting
                    Status(RUN_STATE_RUNNING, 2),
                    Status(RUN_STATE_RUNNING, 2),
                    Status(RUN_STATE_RUNNING, 3),                   // kubectl fails once here
                    Status(RUN_STATE_RUNNING, 3),
                    absl::UnavailableError("restarting"),
                    Status(RUN_STATE_RUNNING, 3),
                    Status(gyre::v1::RUN_STATE_PAUSED, 1),
                    Status(gyre::v1::RUN_STATE_STOPPING, 1),
                    Status(gyre::v1::RUN_STATE_FINISHED, 1)};
  RecordingRunner runner;
  ManualClock clock;
  K8sProvisionerOptions options;
  options.statefulset = "gyre-demo-worker";
  options.namespace_name = "ml";
  // Make the kubectl call of the 4th poll fail.
  int calls_before_failure = 1;
  StatusSource source = [&, inner = script.Source()]() {
    if (script.polls == 3) runner.fail_next = calls_before_failure-- > 0 ? 1 : 0;
    return inner();
  };
  absl::Status s = RunK8sProvisioner(options, source, &runner, &clock, [] { return false; });
  EXPECT_TRUE(s.ok()) << s;
  const std::vector<std::vector<std::string>> expected = {Scale(2), Scale(3), Scale(3), Scale(1), Scale(0)};
  EXPECT_EQ(runner.calls, expected);
  EXPECT_EQ(script.polls, 10);
  EXPECT_GE(clock.NowMicros(), 9 * options.poll_ms * 1000);  // it slept between polls
}

TEST(K8sProvisionerTest, WaitsForWorkersToLeaveBeforeScalingToZeroButNotForever) {
  gyre::v1::RunStatus leaving = Status(gyre::v1::RUN_STATE_FINISHED, 2);
  leaving.set_workers_active(1);  // rank 0 still writing the final checkpoint
  gyre::v1::RunStatus left = Status(gyre::v1::RUN_STATE_FINISHED, 2);
  K8sProvisionerOptions options;
  options.statefulset = "w";
  {
    Script script;
    script.answers = {Status(gyre::v1::RUN_STATE_RUNNING, 2), leaving, leaving, leaving, left};
    RecordingRunner runner;
    ManualClock clock;
    EXPECT_TRUE(RunK8sProvisioner(options, script.Source(), &runner, &clock, [] { return false; }).ok());
    ASSERT_EQ(runner.calls.size(), 2u);
    EXPECT_EQ(runner.calls[1].back(), "--replicas=0");
    EXPECT_EQ(script.polls, 5);  // not before the worker left
  }
  {
    Script script;
    script.answers = {Status(gyre::v1::RUN_STATE_RUNNING, 2), leaving};  // it never leaves
    RecordingRunner runner;
    ManualClock clock;
    EXPECT_TRUE(RunK8sProvisioner(options, script.Source(), &runner, &clock, [] { return false; }).ok());
    ASSERT_EQ(runner.calls.size(), 2u);
    EXPECT_EQ(runner.calls[1].back(), "--replicas=0");
    EXPECT_GE(clock.NowMicros(), options.leave_grace_ms * 1000);
    EXPECT_LE(clock.NowMicros(), (options.leave_grace_ms + 2 * options.poll_ms) * 1000);
  }
}

TEST(K8sProvisionerTest, StopsOnRequest) {
  Script script;
  script.answers = {Status(gyre::v1::RUN_STATE_RUNNING, 2)};
  RecordingRunner runner;
  ManualClock clock;
  K8sProvisionerOptions options;
  options.statefulset = "w";
  absl::Status s = RunK8sProvisioner(options, script.Source(), &runner, &clock, [&] { return script.polls >= 5; });
  EXPECT_EQ(s.code(), absl::StatusCode::kCancelled);
  ASSERT_EQ(runner.calls.size(), 1u);  // desired never changed after the first
  EXPECT_EQ(runner.calls[0], (std::vector<std::string>{"kubectl", "scale", "statefulset", "w", "--replicas=2"}));
}

SlurmOptions Slurm(const std::string& run_dir) {
  SlurmOptions o;
  o.run_name = "demo";
  o.gyre_bin = "/opt/gyre";
  o.runs_dir = std::filesystem::path(run_dir).parent_path();
  o.run_dir = run_dir;
  o.config_path = run_dir + "/config.json";
  o.nodes = 1;
  o.gpus_per_node = 4;
  o.workers_per_node = 4;
  return o;
}

std::string Read(const std::string& path) {
  std::ifstream in(path);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

TEST(SlurmProvisionerTest, SubmitsWorkerJobsOnlyBeyondTheAllocation) {
  const std::string run_dir = std::string(std::getenv("TEST_TMPDIR")) + "/runs/demo";
  using gyre::v1::RUN_STATE_RUNNING;
  Script script;
  script.answers = {Status(RUN_STATE_RUNNING, 4),   // the allocation holds 4
                    Status(RUN_STATE_RUNNING, 2),   // down: standbys, nothing to submit
                    Status(RUN_STATE_RUNNING, 6),   // up by 2 -> one job of 2 (sbatch fails first)
                    Status(RUN_STATE_RUNNING, 6),
                    Status(RUN_STATE_RUNNING, 6),
                    Status(RUN_STATE_RUNNING, 11),  // up by 5 more -> a job of 5
                    Status(gyre::v1::RUN_STATE_FINISHED, 11)};
  RecordingRunner runner;
  runner.answer = "Submitted batch job 77\n";
  ManualClock clock;
  SlurmProvisionerOptions options;
  options.slurm = Slurm(run_dir);
  options.allocation_workers = 4;
  StatusSource source = [&, inner = script.Source()]() {
    if (script.polls == 2) runner.fail_next = 1;
    return inner();
  };
  absl::Status s = RunSlurmProvisioner(options, source, &runner, &clock, [] { return false; });
  EXPECT_TRUE(s.ok()) << s;
  // The failed submission wrote workers-1.sbatch; the retry writes workers-2.
  const std::vector<std::vector<std::string>> expected = {{"sbatch", SlurmWorkersBatchPath(run_dir, 1)},
                                                           {"sbatch", SlurmWorkersBatchPath(run_dir, 2)},
                                                           {"sbatch", SlurmWorkersBatchPath(run_dir, 3)}};
  EXPECT_EQ(runner.calls, expected);
  EXPECT_NE(Read(SlurmWorkersBatchPath(run_dir, 2)).find("#SBATCH --ntasks=2\n"), std::string::npos);
  EXPECT_NE(Read(SlurmWorkersBatchPath(run_dir, 3)).find("#SBATCH --ntasks=5\n"), std::string::npos);
  EXPECT_NE(Read(SlurmWorkersBatchPath(run_dir, 3)).find("#SBATCH --nodes=2\n"), std::string::npos);
  EXPECT_GE(clock.NowMicros(), options.retry_ms * 1000);  // backed off after the failure
}

TEST(WriteAndSubmitSlurmWorkersTest, ReportsSbatchErrors) {
  const std::string run_dir = std::string(std::getenv("TEST_TMPDIR")) + "/runs/other";
  RecordingRunner runner;
  runner.fail_next = 1;
  absl::StatusOr<std::string> job = WriteAndSubmitSlurmWorkers(Slurm(run_dir), 2, true, "sbatch", &runner);
  ASSERT_FALSE(job.ok());
  EXPECT_NE(job.status().message().find("error: forbidden"), absl::string_view::npos) << job.status();
  absl::StatusOr<std::string> path = WriteAndSubmitSlurmWorkers(Slurm(run_dir), 1, false, "sbatch", &runner);
  ASSERT_TRUE(path.ok());
  EXPECT_EQ(*path, SlurmWorkersBatchPath(run_dir, 2));
  EXPECT_EQ(runner.calls.size(), 1u);  // not submitted
  EXPECT_FALSE(WriteAndSubmitSlurmWorkers(Slurm(run_dir), 0, false, "sbatch", &runner).ok());
}

}  // namespace
}  // namespace gyre::deploy
