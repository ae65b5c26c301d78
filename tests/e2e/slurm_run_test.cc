// `gyre launch --slurm --submit` end to end on a fake one-node Slurm: tests/e2e/fake_slurm/ holds
// `sbatch`, `srun` and `scontrol` scripts, first on PATH, that run the generated run.sbatch and its
// srun tasks on this machine with the SLURM_* variables a real allocation sets. Everything else
// is real: the coordinator, the provisioner and the supervised CPU workers the script starts.
//   1. The run goes to the end while one worker is killed with -9: its supervisor restarts it,
//      and `gyre ledger` shows every step committed exactly once with its sample range.
//   2. `gyrectl scale` beyond the allocation: the Slurm provisioner submits a worker-only job
//      (workers-1.sbatch through the fake sbatch) whose worker joins the run.
#include <arpa/inet.h>
#include <netdb.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "tests/e2e/e2e_util.h"

namespace gyre::e2e {
namespace {

namespace fs = std::filesystem;

// The fake node's name: this machine's host name when it resolves to an address this process
// can bind (so workers really dial a node name, not 127.0.0.1), else "localhost".
std::string FakeNodeName() {
  char host[256] = {};
  if (::gethostname(host, sizeof(host) - 1) != 0) return "localhost";
  addrinfo hints{}, *res = nullptr;
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  if (::getaddrinfo(host, nullptr, &hints, &res) != 0 || res == nullptr) return "localhost";
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  const bool bindable = fd >= 0 && ::bind(fd, res->ai_addr, res->ai_addrlen) == 0;
  if (fd >= 0) ::close(fd);
  ::freeaddrinfo(res);
  return bindable ? std::string(host) : "localhost";
}

std::string Cmdline(pid_t pid) {
  std::string c = ReadFileOrEmpty("/proc/" + std::to_string(pid) + "/cmdline");
  for (char& ch : c) {
    if (ch == '\0') ch = ' ';
  }
  return c;
}

// The fake cluster of one test: PATH, state directory, and clean-up of every job it ran.
class FakeSlurm {
 public:
  explicit FakeSlurm(const std::string& root) : dir_(root + "/fake-slurm"), node_(FakeNodeName()) {
    fs::create_directories(dir_);
    const std::string bin = std::string(std::getenv("TEST_SRCDIR")) + "/gyre/tests/e2e/fake_slurm";
    ::setenv("PATH", (bin + ":" + std::getenv("PATH")).c_str(), 1);
    ::setenv("FAKE_SLURM_DIR", dir_.c_str(), 1);
    ::setenv("FAKE_SLURM_NODE", node_.c_str(), 1);
    std::fprintf(stderr, "fake Slurm node: %s\n", node_.c_str());
  }
  ~FakeSlurm() {
    // Each fake job runs in its own session: end the whole group.
    for (const auto& e : fs::directory_iterator(dir_)) {
      const std::string name = e.path().filename();
      if (name.rfind("job-", 0) == 0 && name.size() > 4 && name.substr(name.size() - 4) == ".pid") {
        const pid_t pid = std::atoi(ReadFileOrEmpty(e.path()).c_str());
        if (pid > 0) ::kill(-pid, SIGKILL);
      }
    }
  }
  const std::string& node() const { return node_; }
  // The exit status of job `id`'s script; -1 while it runs.
  int JobExit(const std::string& id) const {
    const std::string path = dir_ + "/job-" + id + ".exit";
    if (!fs::exists(path)) return -1;
    return std::atoi(ReadFileOrEmpty(path).c_str());
  }
  std::string SbatchLog() const { return ReadFileOrEmpty(dir_ + "/sbatch.log"); }

 private:
  std::string dir_, node_;
};

std::string JobId(const std::string& launch_out) {
  const std::string kPrefix = "submitted job ";
  const size_t at = launch_out.find(kPrefix);
  if (at == std::string::npos) return "";
  size_t end = at + kPrefix.size();
  while (end < launch_out.size() && std::isdigit(static_cast<unsigned char>(launch_out[end]))) ++end;
  return launch_out.substr(at + kPrefix.size(), end - at - kPrefix.size());
}

void DumpSlurm(const LocalRun& run, const std::string& job) {
  run.DumpLogs(2000);
  for (const std::string& f : {run.run_dir() + "/slurm/job-" + job + ".out", run.run_dir() + "/logs/provision.log"}) {
    std::fprintf(stderr, "---- %s\n%s\n", f.c_str(), ReadFileOrEmpty(f).c_str());
  }
}

constexpr char kConfig[] =
    "seed: 3\n"
    "model { preset: \"llama-tiny\" vocab_size: 50257 }\n"
    "data { index_dir: \"@INDEX@\" seq_len: 32 global_batch: 6 }\n"
    "optimizer { lr: 0.003 }\n"
    "schedule { warmup_steps: 5 total_steps: @STEPS@ }\n"
    "train { max_steps: @STEPS@ }\n"
    "cluster { heartbeat_interval_ms: 200 heartbeat_timeout_ms: 3000 collective_timeout_ms: 15000 }\n";

std::string Config(int steps) {
  std::string c = kConfig;
  for (size_t at = c.find("@STEPS@"); at != std::string::npos; at = c.find("@STEPS@")) {
    c.replace(at, 7, std::to_string(steps));
  }
  return c;
}

TEST(SlurmRunTest, RunsToTheEndAndASupervisorRestartsAKilledWorker) {
  const std::string root = TestTmp() + "/slurm";
  ASSERT_TRUE(PrepareGoldenIndex(root + "/index")) << "gyre prepare failed";
  FakeSlurm slurm(root);
  constexpr int kSteps = 30;
  LocalRun run(root, "slurm", Config(kSteps));
  CommandResult launch = RunCommand({Bin("gyre"), "launch", "--slurm", "--submit", "--nodes", "1", "--device", "cpu",
                                     "--workers-per-node", "2", "--config", root + "/slurm.textproto", "--runs-dir",
                                     root + "/runs"});
  ASSERT_EQ(launch.code, 0) << launch.out;
  const std::string job = JobId(launch.out);
  ASSERT_FALSE(job.empty()) << launch.out;
  EXPECT_NE(slurm.SbatchLog().find(run.run_dir() + "/slurm/run.sbatch"), std::string::npos) << slurm.SbatchLog();
  auto dump = [&] {
    DumpSlurm(run, job);
    return "";
  };

  ASSERT_TRUE(WaitFor([&] { return run.Committed() >= 4; }, 120)) << dump() << "no progress";
  std::vector<pid_t> workers = run.Pids("worker");
  ASSERT_EQ(workers.size(), 2u) << dump();
  // Workers dial the first node by name at the coordinator's port and are reached at their node's name.
  const std::string endpoint = ReadFileOrEmpty(run.run_dir() + "/slurm/coordinator.endpoint");
  EXPECT_EQ(endpoint.rfind(slurm.node() + ":", 0), 0u) << endpoint;
  const std::string cmdline = Cmdline(workers.front());
  EXPECT_NE(cmdline.find("--coordinator " + endpoint.substr(0, endpoint.find('\n')) + " "), std::string::npos)
      << cmdline;
  EXPECT_NE(cmdline.find("--hostname " + slurm.node()), std::string::npos) << cmdline;
  EXPECT_NE(cmdline.find("--device cpu"), std::string::npos) << cmdline;

  // kill -9 one worker: its supervisor starts a new one; the run goes on.
  const uint64_t before = run.Committed();
  ASSERT_EQ(::kill(workers.front(), SIGKILL), 0);
  std::fprintf(stderr, "killed worker %d at committed step %llu\n", workers.front(), (unsigned long long)before);
  auto replaced = [&] {
    std::vector<pid_t> now = run.Pids("worker");
    return now.size() == 2 && std::find(now.begin(), now.end(), workers.front()) == now.end();
  };
  ASSERT_TRUE(WaitFor(replaced, 60)) << dump() << "the killed worker was not restarted";

  // The run ends by itself; so does the job (exit 0), the coordinator with it.
  ASSERT_TRUE(WaitFor([&] { return slurm.JobExit(job) >= 0; }, 150)) << dump() << "the job did not end";
  EXPECT_EQ(slurm.JobExit(job), 0) << dump();
  const std::string job_out = ReadFileOrEmpty(run.run_dir() + "/slurm/job-" + job + ".out");
  std::fprintf(stderr, "---- job %s output\n%s", job.c_str(), job_out.c_str());
  if (job_out.find("still running") != std::string::npos) run.DumpLogs(3000);  // who outlived the run, and why
  EXPECT_TRUE(run.Pids("coordinator").empty()) << "the coordinator outlived the job";
  EXPECT_TRUE(run.Pids("worker").empty()) << "a worker outlived the job";
  std::string supervisors;
  for (const auto& e : fs::directory_iterator(run.run_dir() + "/logs")) {
    if (e.path().filename().string().rfind("worker-" + job + "-", 0) == 0) supervisors += ReadFileOrEmpty(e.path());
  }
  EXPECT_NE(supervisors.find("exited with status 137"), std::string::npos) << supervisors;
  EXPECT_NE(supervisors.find("restarting the worker"), std::string::npos) << supervisors;

  Ledger ledger = run.ReadLedger();
  EXPECT_EQ(ledger.code, 0) << ledger.summary;
  EXPECT_NE(ledger.summary.find("ledger: " + std::to_string(kSteps) + " committed steps, global batch 6, 0 problem(s)"),
            std::string::npos)
      << ledger.summary;
  ASSERT_EQ(ledger.steps.size(), static_cast<size_t>(kSteps));
  for (size_t t = 0; t < ledger.steps.size(); ++t) {
    EXPECT_EQ(ledger.steps[t].step, t);
    EXPECT_EQ(ledger.steps[t].sample_begin, 6 * t);
    EXPECT_EQ(ledger.steps[t].sample_end, 6 * t + 6);
    EXPECT_TRUE(ledger.steps[t].problem.empty()) << "step " << t << ": " << ledger.steps[t].problem;
  }
  // The kill moved the run to a newer generation, and the last steps ran with two workers again.
  ASSERT_GE(before, 1u);
  EXPECT_GT(ledger.steps.back().generation, ledger.steps[before - 1].generation);
  EXPECT_EQ(ledger.steps.back().world, 2u) << "the restarted worker did not rejoin";
}

TEST(SlurmRunTest, ScalingBeyondTheAllocationSubmitsAWorkerJob) {
  const std::string root = TestTmp() + "/slurm-scale";
  ASSERT_TRUE(PrepareGoldenIndex(root + "/index")) << "gyre prepare failed";
  FakeSlurm slurm(root);
  LocalRun run(root, "grow", Config(100000));
  CommandResult launch = RunCommand({Bin("gyre"), "launch", "--slurm", "--submit", "--nodes", "1", "--device", "cpu",
                                     "--config", root + "/grow.textproto", "--runs-dir", root + "/runs"});
  ASSERT_EQ(launch.code, 0) << launch.out;
  const std::string job = JobId(launch.out);
  ASSERT_FALSE(job.empty()) << launch.out;
  auto dump = [&] {
    DumpSlurm(run, job);
    return "";
  };
  ASSERT_TRUE(WaitFor([&] { return run.Committed() >= 2; }, 120)) << dump() << "no progress";
  EXPECT_EQ(run.Status().value("desired_workers", 0), 1);

  // One worker in the allocation; ask for two: the provisioner submits a job of one more.
  ASSERT_FALSE(run.Ctl({"scale", "2"}).is_null());
  // (The provisioner writes the script, then runs sbatch on it.)
  const std::string workers_job = run.run_dir() + "/slurm/workers-1.sbatch";
  ASSERT_TRUE(WaitFor([&] { return slurm.SbatchLog().find(workers_job) != std::string::npos; }, 30))
      << dump() << slurm.SbatchLog();
  EXPECT_NE(ReadFileOrEmpty(workers_job).find("#SBATCH --ntasks=1\n"), std::string::npos);
  auto two_active = [&] { return run.Status().value("workers_active", 0) == 2; };
  ASSERT_TRUE(WaitFor(two_active, 120)) << dump() << "the extra job's worker never joined";
  const uint64_t at = run.Committed();
  ASSERT_TRUE(WaitFor([&] { return run.Committed() >= at + 2; }, 120)) << dump() << "no progress at 2 workers";

  // Stop: both jobs end (the extra one when its worker leaves), the ledger is exact.
  ASSERT_FALSE(run.Ctl({"stop"}).is_null());
  ASSERT_TRUE(WaitFor([&] { return slurm.JobExit(job) >= 0; }, 120)) << dump() << "the job did not end";
  EXPECT_EQ(slurm.JobExit(job), 0) << dump();
  const std::string extra_job = std::to_string(std::stoi(job) + 1);
  EXPECT_TRUE(WaitFor([&] { return slurm.JobExit(extra_job) >= 0; }, 60)) << dump() << "the worker job did not end";
  Ledger ledger = run.ReadLedger();
  EXPECT_EQ(ledger.code, 0) << ledger.summary;
  bool saw_world_2 = false;
  for (size_t t = 0; t < ledger.steps.size(); ++t) {
    EXPECT_EQ(ledger.steps[t].step, t);
    EXPECT_EQ(ledger.steps[t].sample_begin, 6 * t);
    saw_world_2 |= ledger.steps[t].world == 2;
  }
  EXPECT_TRUE(saw_world_2) << "no step ran with the extra job's worker";
}

}  // namespace
}  // namespace gyre::e2e
