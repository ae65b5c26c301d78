#include "tests/e2e/e2e_util.h"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "dataloader/tokenizer/test_paths.h"

namespace gyre::e2e {

std::string ReadFileOrEmpty(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

namespace fs = std::filesystem;
using SteadyClock = std::chrono::steady_clock;

std::string Bin(const std::string& name) { return std::string(std::getenv("TEST_SRCDIR")) + "/gyre/cli/" + name; }
std::string TestTmp() { return std::string(std::getenv("TEST_TMPDIR")); }

CommandResult RunCommand(const std::vector<std::string>& args) {
  std::string cmd;
  for (const auto& a : args) cmd += "'" + a + "' ";
  CommandResult r;
  FILE* p = ::popen(cmd.c_str(), "r");
  if (p == nullptr) return r;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), p)) > 0) r.out.append(buf, n);
  int status = ::pclose(p);
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

bool PrepareGoldenIndex(const std::string& index_dir) {
  CommandResult prep = RunCommand({Bin("gyre"), "prepare", "--tokenizer", tokenizer_testing::Gpt2Dir(), "--out",
                                   index_dir, "--source", "golden", "--threads", "2",
                                   tokenizer_testing::Runfile("tools/golden/corpus.jsonl.zst")});
  return prep.code == 0;
}

bool WaitFor(const std::function<bool()>& pred, int seconds, int poll_ms) {
  auto until = SteadyClock::now() + std::chrono::seconds(seconds);
  while (SteadyClock::now() < until) {
    if (pred()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(poll_ms));
  }
  return pred();
}

LocalRun::LocalRun(std::string root, std::string name, std::string config_text)
    : root_(std::move(root)), name_(std::move(name)) {
  fs::create_directories(root_);
  run_dir_ = root_ + "/runs/" + name_;
  config_path_ = root_ + "/" + name_ + ".textproto";
  launch_log_ = root_ + "/launch-" + name_ + ".log";
  const std::string index = root_ + "/index";
  for (size_t at = config_text.find("@INDEX@"); at != std::string::npos; at = config_text.find("@INDEX@")) {
    config_text.replace(at, 7, index);
  }
  std::ofstream(config_path_) << "name: \"" << name_ << "\"\n" << config_text;
}

LocalRun::~LocalRun() {
  if (launcher_ > 0 && !exited_) {
    ::kill(launcher_, SIGKILL);
    ::waitpid(launcher_, nullptr, 0);
  }
  // Children run in their own process groups: find them by pid.
  for (const std::string role : {"worker", "coordinator"}) {
    for (pid_t pid : Pids(role)) ::kill(pid, SIGKILL);
  }
}

bool LocalRun::Launch(int workers, const std::vector<std::string>& extra_args) {
  launcher_ = ::fork();
  if (launcher_ < 0) return false;
  if (launcher_ == 0) {
    std::freopen(launch_log_.c_str(), "w", stderr);
    std::freopen(launch_log_.c_str(), "a", stdout);
    const std::string gyre = Bin("gyre");
    std::vector<std::string> args = {"gyre", "launch", "--local", "--workers", std::to_string(workers),
                                     "--config", config_path_, "--runs-dir", root_ + "/runs"};
    args.insert(args.end(), extra_args.begin(), extra_args.end());
    std::vector<char*> argv;
    for (std::string& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    ::execv(gyre.c_str(), argv.data());
    ::_exit(127);
  }
  return true;
}

nlohmann::json LocalRun::Ctl(const std::vector<std::string>& args, const std::vector<std::string>& global_flags) {
  std::vector<std::string> full = {Bin("gyrectl"), "--run-dir", run_dir_, "--json"};
  full.insert(full.end(), global_flags.begin(), global_flags.end());
  full.insert(full.end(), args.begin(), args.end());
  CommandResult r = RunCommand(full);
  if (r.code != 0) return nlohmann::json();
  return nlohmann::json::parse(r.out, nullptr, false);
}

uint64_t LocalRun::Committed() {
  nlohmann::json s = Status();
  if (!s.is_object() || !s.contains("committed_steps")) return 0;
  return std::stoull(s["committed_steps"].get<std::string>());
}

std::vector<pid_t> LocalRun::Pids(const std::string& role) const {
  std::vector<pid_t> pids;
  for (const auto& entry : fs::directory_iterator("/proc")) {
    const std::string name = entry.path().filename();
    if (name.find_first_not_of("0123456789") != std::string::npos) continue;
    std::ifstream in(entry.path() / "cmdline");
    std::string cmdline((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    for (char& c : cmdline) {
      if (c == '\0') c = ' ';
    }
    const bool ours = cmdline.find(run_dir_ + " ") != std::string::npos || cmdline.find(run_dir_ + "/") != std::string::npos;
    if (ours && cmdline.find(" " + role + " ") != std::string::npos) pids.push_back(static_cast<pid_t>(std::stoi(name)));
  }
  return pids;
}

bool LocalRun::WaitForExit(int seconds, int* exit_code) {
  if (launcher_ <= 0) return false;
  int status = 0;
  bool done = exited_ || WaitFor([&] { return ::waitpid(launcher_, &status, WNOHANG) == launcher_; }, seconds, 100);
  if (!done) return false;
  if (!exited_) {
    exited_ = true;
    const int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    if (exit_code != nullptr) *exit_code = code;
    return code == 0;
  }
  return true;
}

bool LocalRun::PauseAndSettle(int still_seconds) {
  if (Ctl({"pause"}).is_null()) return false;
  uint64_t seen = Committed();
  return WaitFor(
      [&] {
        std::this_thread::sleep_for(std::chrono::seconds(still_seconds));
        const uint64_t now = Committed();
        const bool still = now == seen;
        seen = now;
        return still;
      },
      120, 10);
}

Ledger LocalRun::ReadLedger() const {
  Ledger ledger;
  CommandResult json = RunCommand({Bin("gyre"), "ledger", "--run-dir", run_dir_, "--json"});
  ledger.code = json.code;
  std::istringstream lines(json.out);
  for (std::string line; std::getline(lines, line);) {
    nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
    if (!j.is_object()) continue;
    LedgerStep s;
    s.step = j.value("step", uint64_t{0});
    s.generation = j.value("generation", uint64_t{0});
    s.world = j.value("world", 0u);
    if (j.contains("samples") && j["samples"].size() == 2) {
      s.sample_begin = j["samples"][0].get<uint64_t>();
      s.sample_end = j["samples"][1].get<uint64_t>();
    }
    s.loss = j.value("loss", 0.0);
    s.committed_unix_ms = j.value("committed_unix_ms", int64_t{0});
    s.model_flops_per_s = j.value("model_flops_per_s", 0.0);
    s.eval_loss = j.value("eval_loss", -1.0);
    s.problem = j.value("problem", "");
    ledger.steps.push_back(s);
  }
  CommandResult summary = RunCommand({Bin("gyre"), "ledger", "--run-dir", run_dir_, "--quiet"});
  ledger.summary = summary.out;
  if (summary.code != 0) ledger.code = summary.code;
  return ledger;
}

void LocalRun::DumpLogs(size_t tail_bytes) const {
  std::vector<std::string> files = {launch_log_};
  if (fs::exists(run_dir_ + "/logs")) {
    for (const auto& e : fs::directory_iterator(run_dir_ + "/logs")) files.push_back(e.path());
  }
  for (const auto& f : files) {
    std::string text = ReadFileOrEmpty(f);
    if (text.size() > tail_bytes) text = text.substr(text.size() - tail_bytes);
    std::fprintf(stderr, "---- %s (tail)\n%s\n", f.c_str(), text.c_str());
  }
}

int LocalRun::CountInCoordinatorLog(const std::string& needle) const {
  std::ifstream in(run_dir_ + "/logs/coordinator.log");
  int count = 0;
  for (std::string line; std::getline(in, line);) count += line.find(needle) != std::string::npos;
  return count;
}

}  // namespace gyre::e2e

namespace gyre::e2e {

std::vector<std::string> LocalRun::CoordinatorLogLines(const std::vector<std::string>& needles) const {
  std::ifstream in(run_dir_ + "/logs/coordinator.log");
  std::vector<std::string> lines;
  for (std::string line; std::getline(in, line);) {
    bool all = true;
    for (const std::string& n : needles) all = all && line.find(n) != std::string::npos;
    if (all) lines.push_back(line);
  }
  return lines;
}

std::string LocalRun::WorkerLogs() const {
  std::string all;
  if (!fs::exists(run_dir_ + "/logs")) return all;
  for (const auto& e : fs::directory_iterator(run_dir_ + "/logs")) {
    if (e.path().filename().string().rfind("worker-", 0) != 0) continue;
    all += ReadFileOrEmpty(e.path());
  }
  return all;
}

}  // namespace gyre::e2e
