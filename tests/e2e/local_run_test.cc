// The whole system as users run it: `gyre prepare`, then `gyre launch --local` with two CPU
// workers, steered with `gyrectl` while faults are injected — kill -9 of a worker mid-run, a
// pause, a live scale-up, kill -9 of the coordinator — and at the end `gyre ledger` must show
// every step committed exactly once with the right sample range (DESIGN.md section 4).
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "dataloader/tokenizer/test_paths.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace gyre {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

std::string Bin(const std::string& name) { return std::string(std::getenv("TEST_SRCDIR")) + "/gyre/cli/" + name; }
std::string Tmp() { return std::string(std::getenv("TEST_TMPDIR")); }

struct Result {
  int code = -1;
  std::string out;
};

// Runs a command to completion, capturing stdout (stderr goes to the test log).
Result RunCommand(const std::vector<std::string>& args) {
  std::string cmd;
  for (const auto& a : args) cmd += "'" + a + "' ";
  Result r;
  FILE* p = ::popen(cmd.c_str(), "r");
  if (p == nullptr) return r;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), p)) > 0) r.out.append(buf, n);
  int status = ::pclose(p);
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

class LocalRunTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = Tmp() + "/e2e";
    fs::remove_all(root_);
    fs::create_directories(root_);
    Result prep = RunCommand({Bin("gyre"), "prepare", "--tokenizer", tokenizer_testing::Gpt2Dir(), "--out", root_ + "/index",
                       "--source", "golden", "--threads", "2", tokenizer_testing::Runfile("tools/golden/corpus.jsonl.zst")});
    ASSERT_EQ(prep.code, 0) << "gyre prepare failed";
    std::ofstream(root_ + "/run.textproto") << "name: \"e2e\"\n"
                                               "seed: 7\n"
                                               "model { preset: \"llama-tiny\" vocab_size: 50257 }\n"
                                               "data { index_dir: \"" << root_ << "/index\" seq_len: 32 global_batch: 6 }\n"
                                               "optimizer { lr: 0.003 }\n"
                                               "schedule { warmup_steps: 5 total_steps: 70 }\n"
                                               "train { max_steps: 70 }\n"
                                               "checkpoint { every_steps: 20 keep_last: 2 }\n"
                                               "cluster { desired_workers: 2 heartbeat_interval_ms: 200 "
                                               "heartbeat_timeout_ms: 2500 collective_timeout_ms: 15000 }\n";
    run_dir_ = root_ + "/runs/e2e";
  }

  nlohmann::json Ctl(const std::vector<std::string>& args) {
    std::vector<std::string> full = {Bin("gyrectl"), "--run-dir", run_dir_, "--json"};
    full.insert(full.end(), args.begin(), args.end());
    Result r = RunCommand(full);
    if (r.code != 0) return nlohmann::json();
    return nlohmann::json::parse(r.out, nullptr, false);
  }
  uint64_t Committed() {
    nlohmann::json s = Ctl({"status"});
    if (!s.is_object() || !s.contains("committed_steps")) return 0;
    return std::stoull(s["committed_steps"].get<std::string>());
  }
  // Waits until `pred` holds; false after `seconds`.
  template <typename Pred>
  bool WaitFor(Pred pred, int seconds) {
    auto until = Clock::now() + std::chrono::seconds(seconds);
    while (Clock::now() < until) {
      if (pred()) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
    return false;
  }
  // The pid of the process running `gyre <role>` for this run (scanning /proc).
  std::vector<pid_t> Pids(const std::string& role) {
    std::vector<pid_t> pids;
    for (const auto& entry : fs::directory_iterator("/proc")) {
      const std::string name = entry.path().filename();
      if (name.find_first_not_of("0123456789") != std::string::npos) continue;
      std::ifstream in(entry.path() / "cmdline");
      std::string cmdline((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
      for (char& c : cmdline)
        if (c == '\0') c = ' ';
      if (cmdline.find(" " + role + " ") != std::string::npos && cmdline.find(root_) != std::string::npos) {
        pids.push_back(static_cast<pid_t>(std::stoi(name)));
      }
    }
    return pids;
  }

  std::string root_, run_dir_;
};

TEST_F(LocalRunTest, SurvivesWorkerAndCoordinatorKillsPauseAndScaleWithAnExactLedger) {
  const std::string log = root_ + "/launch.log";
  pid_t launcher = ::fork();
  ASSERT_GE(launcher, 0);
  if (launcher == 0) {
    std::freopen(log.c_str(), "w", stderr);
    std::freopen(log.c_str(), "a", stdout);
    const std::string gyre = Bin("gyre");
    ::execl(gyre.c_str(), "gyre", "launch", "--local", "--workers", "2", "--config", (root_ + "/run.textproto").c_str(),
            "--runs-dir", (root_ + "/runs").c_str(), static_cast<char*>(nullptr));
    ::_exit(127);
  }
  auto dump_logs = [&] {
    std::vector<std::string> files = {log};
    if (fs::exists(run_dir_ + "/logs")) {
      for (const auto& e : fs::directory_iterator(run_dir_ + "/logs")) files.push_back(e.path());
    }
    for (const auto& f : files) {
      std::ifstream in(f);
      std::stringstream ss;
      ss << in.rdbuf();
      std::string text = ss.str();
      if (text.size() > 1500) text = text.substr(text.size() - 1500);
      std::fprintf(stderr, "---- %s (tail)\n%s\n", f.c_str(), text.c_str());
    }
  };

  ASSERT_TRUE(WaitFor([&] { return Committed() >= 5; }, 180)) << (dump_logs(), "no progress");

  // 1. kill -9 a worker mid-run: the launcher replaces it, survivors move to a new generation.
  std::vector<pid_t> workers = Pids("worker");
  ASSERT_FALSE(workers.empty());
  uint64_t before = Committed();
  ASSERT_EQ(::kill(workers.front(), SIGKILL), 0);
  std::fprintf(stderr, "killed worker %d at committed step %llu\n", workers.front(), (unsigned long long)before);
  ASSERT_TRUE(WaitFor([&] { return Committed() >= before + 5; }, 180)) << (dump_logs(), "no progress after worker kill");

  // 2. pause: commits stop (a step already leased may still commit: wait until the count has
  // been still for 5 s), then nothing commits for another 5 s; then resume.
  ASSERT_FALSE(Ctl({"pause"}).is_null());
  uint64_t paused_at = Committed();
  ASSERT_TRUE(WaitFor(
      [&] {
        uint64_t now = Committed();
        if (now != paused_at) {
          paused_at = now;
          return false;
        }
        std::this_thread::sleep_for(std::chrono::seconds(5));
        return Committed() == paused_at;
      },
      120))
      << "commits did not stop after pause";
  std::this_thread::sleep_for(std::chrono::seconds(5));
  EXPECT_EQ(Committed(), paused_at) << "a step committed while paused";
  nlohmann::json paused = Ctl({"status"});
  EXPECT_EQ(paused.value("state", ""), "RUN_STATE_PAUSED") << paused.dump();
  ASSERT_FALSE(Ctl({"resume"}).is_null());
  ASSERT_TRUE(WaitFor([&] { return Committed() > paused_at; }, 120)) << (dump_logs(), "no progress after resume");

  // 3. live scale-up to 3 workers: the launcher starts one, it joins by state hand-over.
  ASSERT_FALSE(Ctl({"scale", "3"}).is_null());
  ASSERT_TRUE(WaitFor(
      [&] {
        nlohmann::json s = Ctl({"status"});
        return s.is_object() && s.value("workers_active", 0) == 3;
      },
      180))
      << (dump_logs(), "never reached 3 active workers");
  // ... and steps commit at world size 3 before the next fault (on a loaded machine the first
  // 3-worker generation can still be forming when `workers_active` first reads 3).
  const uint64_t scaled_at = Committed();
  ASSERT_TRUE(WaitFor(
      [&] {
        nlohmann::json s = Ctl({"status"});
        return s.is_object() && s.value("workers_active", 0) == 3 && Committed() >= scaled_at + 2;
      },
      180))
      << (dump_logs(), "no progress at 3 workers");

  // 4. kill -9 the coordinator: the launcher restarts it from its journal; workers keep their weights.
  std::vector<pid_t> coordinators = Pids("coordinator");
  ASSERT_EQ(coordinators.size(), 1u);
  before = Committed();
  ASSERT_EQ(::kill(coordinators.front(), SIGKILL), 0);
  std::fprintf(stderr, "killed coordinator %d at committed step %llu\n", coordinators.front(), (unsigned long long)before);
  ASSERT_TRUE(WaitFor([&] { return Committed() >= before + 3; }, 180)) << (dump_logs(), "no progress after coordinator kill");

  // The run finishes by itself (train.max_steps) and the launcher exits cleanly.
  int status = 0;
  bool exited = WaitFor([&] { return ::waitpid(launcher, &status, WNOHANG) == launcher; }, 300);
  if (!exited) {
    ::kill(launcher, SIGKILL);
    dump_logs();
  }
  ASSERT_TRUE(exited) << "the run did not finish";
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << (dump_logs(), "launcher failed");

  // The ledger: steps 0..69 exactly once, each [6t, 6t+6); several generations.
  Result ledger = RunCommand({Bin("gyre"), "ledger", "--run-dir", run_dir_});
  EXPECT_EQ(ledger.code, 0) << ledger.out;
  EXPECT_NE(ledger.out.find("ledger: 70 committed steps, global batch 6, 0 problem(s)"), std::string::npos) << ledger.out;
  EXPECT_NE(ledger.out.find("world  3"), std::string::npos) << (dump_logs(), "no step ran at world size 3");
  // Loss fell: mean of the last 10 committed losses below the first 10.
  std::istringstream lines(ledger.out);
  std::vector<double> losses;
  for (std::string line; std::getline(lines, line);) {
    size_t at = line.find("loss ");
    if (line.rfind("step", 0) == 0 && at != std::string::npos) losses.push_back(std::stod(line.substr(at + 5)));
  }
  ASSERT_EQ(losses.size(), 70u);
  double first = 0, last = 0;
  for (int i = 0; i < 10; ++i) first += losses[i], last += losses[60 + i];
  EXPECT_LT(last, first - 10 * 0.5) << "mean loss of steps 0-9 " << first / 10 << ", of 60-69 " << last / 10;
  std::fprintf(stderr, "mean loss steps 0-9: %.3f, steps 60-69: %.3f\n", first / 10, last / 10);
}

}  // namespace
}  // namespace gyre
