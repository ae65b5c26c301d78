#include "deploy/local_launcher.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <deque>
#include <map>
#include <optional>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "base/env.h"
#include "base/run_dir.h"
#include "cli/control_client.h"
#include "deploy/crash_loop.h"
#include "deploy/gpu_slots.h"

namespace gyre::deploy {
namespace {

std::atomic<int> g_signal{0};
void OnSignal(int sig) { g_signal.store(sig); }

struct Child {
  pid_t pid = -1;
  std::string role;  // "coordinator", "worker-3"
  int64_t started_ms = 0;
  int slot = -1;     // GPU slot of a GPU worker
  int64_t committed_at_start = -1;  // the run's committed steps when it started (-1: unknown)
};

// fork + exec `exe args...` with stdout/stderr appended to `log_path`.
absl::StatusOr<pid_t> Spawn(const std::string& exe, const std::vector<std::string>& args, const std::string& log_path) {
  pid_t pid = ::fork();
  if (pid < 0) return absl::ResourceExhaustedError(absl::StrCat("fork: ", std::strerror(errno)));
  if (pid == 0) {
    int fd = ::open(log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd >= 0) {
      ::dup2(fd, 1);
      ::dup2(fd, 2);
    }
    ::setpgid(0, 0);  // our own group: a Ctrl-C in the terminal reaches only the launcher
    std::vector<char*> argv;
    std::string argv0 = "gyre";
    argv.push_back(argv0.data());
    std::vector<std::string> copy = args;
    for (std::string& a : copy) argv.push_back(a.data());
    argv.push_back(nullptr);
    ::execv(exe.c_str(), argv.data());
    std::fprintf(stderr, "exec %s: %s\n", exe.c_str(), std::strerror(errno));
    ::_exit(127);
  }
  return pid;
}

int64_t NowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// The last `n` non-empty lines of a log (a failing worker's own words: "out of memory",
// "no token index at ..."), each indented for the launcher's output; empty if unreadable.
std::string LastLines(Env* env, const std::string& path, int n) {
  absl::StatusOr<std::string> text = env->ReadFile(path);
  if (!text.ok()) return "";
  std::vector<absl::string_view> lines;
  for (absl::string_view line : absl::StrSplit(*text, '\n', absl::SkipWhitespace())) lines.push_back(line);
  std::string out;
  for (size_t i = lines.size() > static_cast<size_t>(n) ? lines.size() - n : 0; i < lines.size(); ++i) {
    absl::StrAppend(&out, "  ", lines[i], "\n");
  }
  return out;
}

}  // namespace

absl::Status RunLocal(const LaunchOptions& options) {
  RunDir dir(options.run_dir);
  Env* env = Env::Default();
  if (absl::Status s = env->CreateDirs(dir.logs_dir()); !s.ok()) return s;
  ::signal(SIGINT, OnSignal);
  ::signal(SIGTERM, OnSignal);
  ::signal(SIGPIPE, SIG_IGN);

  Child coordinator;
  std::map<pid_t, Child> workers;
  int next_worker = 0;
  // Workers that exited with a failure and were not replaced yet: the next worker started takes
  // the oldest one's place and names it (--replaces-pid), so the coordinator declares it dead
  // without waiting out its heartbeat timeout.
  std::deque<pid_t> exited_workers;
  CrashLoop crash_loop_rule{CrashLoop::Options{}};
  bool give_up = false;
  int64_t committed_steps = -1;  // from the last status poll; -1 until the coordinator answers
  std::string last_failed_log;
  std::string failed_worker_said;  // the end of last_failed_log, read once when giving up
  int coordinator_restarts = 0;
  auto start_coordinator = [&]() -> absl::Status {
    // Gloo rendezvous through the coordinator's own key-value store (the default).
    std::vector<std::string> args = {"coordinator", "--runs-dir", DirName(options.run_dir), "--config",
                                     options.config_path};
    // A restarted coordinator listens where the old one did: workers keep retrying that address
    // (they hold their weights meanwhile) and re-attach to their sessions.
    if (absl::StatusOr<std::string> old = env->ReadFile(dir.control_address_path()); old.ok()) {
      std::string address = *old;
      while (!address.empty() && (address.back() == '\n' || address.back() == ' ')) address.pop_back();
      if (!address.empty()) {
        args.push_back("--listen");
        args.push_back(address);
      }
      // Until it listens again, nobody should find the stale address.
      env->RemoveFile(dir.control_address_path()).IgnoreError();
    }
    absl::StatusOr<pid_t> pid = Spawn(options.self_exe, args, JoinPath(dir.logs_dir(), "coordinator.log"));
    if (!pid.ok()) return pid.status();
    coordinator = {*pid, "coordinator", NowMs()};
    return absl::OkStatus();
  };
  auto start_worker = [&]() -> absl::Status {
    const std::string role = absl::StrCat("worker-", next_worker++);
    std::vector<std::string> args = {"worker", "--run-dir", options.run_dir};
    int slot = -1;
    if (options.gpus > 0) {
      std::vector<int> held;
      for (const auto& [p, c] : workers) {
        if (c.slot >= 0) held.push_back(c.slot);
      }
      std::optional<int> free = FreeGpuSlot(options.gpus, held);
      if (!free.has_value()) {
        // Callers cap GPU workers at the GPU count (WorkersToRun), so this does not happen.
        return absl::InternalError(absl::StrCat("every one of the ", options.gpus,
                                                " GPU(s) has a worker; not starting a second one on a GPU"));
      }
      slot = *free;
      args.push_back("--device");
      args.push_back(absl::StrCat("cuda:", slot));
    } else {
      args.push_back("--device");
      args.push_back("cpu");
    }
    if (!exited_workers.empty()) {
      args.push_back("--replaces-pid");
      args.push_back(absl::StrCat(exited_workers.front()));
      exited_workers.pop_front();
    }
    args.insert(args.end(), options.worker_args.begin(), options.worker_args.end());
    absl::StatusOr<pid_t> pid = Spawn(options.self_exe, args, JoinPath(dir.logs_dir(), role + ".log"));
    if (!pid.ok()) return pid.status();
    workers[*pid] = {*pid, role, NowMs(), slot, committed_steps};
    return absl::OkStatus();
  };

  // A fresh launch picks a fresh port (an address file left by an earlier launch is stale).
  env->RemoveFile(dir.control_address_path()).IgnoreError();
  if (absl::Status s = start_coordinator(); !s.ok()) return s;
  // Workers need the coordinator's address and token first.
  const int64_t wait_until = NowMs() + 60000;
  while (!env->Exists(dir.control_address_path()) || !env->Exists(dir.token_path())) {
    int status = 0;
    if (::waitpid(coordinator.pid, &status, WNOHANG) == coordinator.pid) {
      // Its last line says why (a bad config, a run that exists with another config, a port).
      const std::string log = JoinPath(dir.logs_dir(), "coordinator.log");
      const std::string last = LastLines(env, log, 1);
      absl::string_view said = absl::StripAsciiWhitespace(last);
      absl::ConsumePrefix(&said, "gyre coordinator: ");
      return absl::FailedPreconditionError(absl::StrCat("the coordinator exited during start-up",
                                                        said.empty() ? "" : absl::StrCat(": ", said),
                                                        " (log: ", log, ")"));
    }
    if (NowMs() > wait_until) return absl::DeadlineExceededError("the coordinator did not start listening within 60 s");
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  // One GPU worker per GPU at most (NCCL refuses two ranks on one device): announced once per
  // desired count that does not fit.
  int announced_cap_for = -1;
  auto workers_to_run = [&](int desired) {
    if (std::string notice = GpuCapNotice(desired, options.gpus); !notice.empty() && desired != announced_cap_for) {
      std::fprintf(stderr, "gyre launch: %s\n", notice.c_str());
      announced_cap_for = desired;
    }
    return WorkersToRun(desired, options.gpus);
  };
  auto run_status = [&](int timeout_ms) -> absl::StatusOr<gyre::v1::RunStatus> {
    absl::StatusOr<cli::ControlTarget> target = cli::ResolveControlTarget(options.run_dir, "", "");
    if (!target.ok()) return target.status();
    return cli::ControlClient(*target, timeout_ms).GetStatus();
  };
  // The run's progress when the first workers start (a restarted run resumes from its journal):
  // the crash-loop rule compares it with the progress when a worker fails.
  if (absl::StatusOr<gyre::v1::RunStatus> run = run_status(5000); run.ok()) {
    committed_steps = static_cast<int64_t>(run->committed_steps());
  }
  const int initial_workers = workers_to_run(options.workers);
  for (int i = 0; i < initial_workers; ++i) {
    if (absl::Status s = start_worker(); !s.ok()) return s;
  }
  std::string dashboard = "(see " + dir.http_address_path() + ")";
  for (int i = 0; i < 50 && !env->Exists(dir.http_address_path()); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  if (absl::StatusOr<std::string> http = env->ReadFile(dir.http_address_path()); http.ok()) {
    dashboard = "http://" + *http + "/";
  }
  std::fprintf(stderr,
               "gyre launch: coordinator (pid %d) + %d worker(s) running\n"
               "  dashboard: %s  (Prometheus: /metrics)\n"
               "  logs:      %s/\n"
               "  status:    gyrectl --run-dir %s status\n"
               "  metrics:   gyrectl --run-dir %s metrics\n"
               "  Ctrl-C stops the run at the next step boundary.\n",
               coordinator.pid, initial_workers, dashboard.c_str(), dir.logs_dir().c_str(), options.run_dir.c_str(),
               options.run_dir.c_str());

  int64_t stop_deadline = 0;
  bool crash_loop = false;
  bool coordinator_done = false;
  while (true) {
    // Reap children.
    int status = 0;
    pid_t pid;
    while ((pid = ::waitpid(-1, &status, WNOHANG)) > 0) {
      if (pid == coordinator.pid) {
        const bool clean = WIFEXITED(status) && WEXITSTATUS(status) == 0;
        std::fprintf(stderr, "gyre launch: coordinator exited (%s)\n",
                     clean ? "run over" : absl::StrCat("status ", status).c_str());
        if (clean || g_signal.load() != 0 || !options.restart_coordinator || ++coordinator_restarts > 5) {
          coordinator_done = true;
        } else {
          std::fprintf(stderr, "gyre launch: restarting the coordinator from its journal\n");
          if (absl::Status s = start_coordinator(); !s.ok()) return s;
        }
      } else if (auto it = workers.find(pid); it != workers.end()) {
        const int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        std::fprintf(stderr, "gyre launch: %s (pid %d) exited with status %d\n", it->second.role.c_str(), pid, code);
        // A worker killed from outside (kill -9, the OOM killer, Ctrl-C) did not fail at start-up.
        const bool killed = WIFSIGNALED(status) && (WTERMSIG(status) == SIGKILL || WTERMSIG(status) == SIGTERM ||
                                                    WTERMSIG(status) == SIGINT);
        if (code != 0 && !killed) {
          if (crash_loop_rule.Failed({it->second.started_ms, it->second.committed_at_start}, NowMs(), committed_steps)) {
            give_up = true;
          }
          last_failed_log = JoinPath(dir.logs_dir(), it->second.role + ".log");
        } else if (code == 0) {
          crash_loop_rule.Reset();
        }
        if (code != 0) exited_workers.push_back(pid);
        workers.erase(it);
      }
    }
    if (coordinator_done && workers.empty()) break;

    if (give_up && stop_deadline == 0) {
      std::fprintf(stderr, "gyre launch: workers keep failing (%d in a row; the last %s); giving up (see %s)\n",
                   crash_loop_rule.failures_in_a_row(), crash_loop_rule.last_reason().c_str(), last_failed_log.c_str());
      failed_worker_said = LastLines(env, last_failed_log, 3);
      if (!failed_worker_said.empty()) {
        std::fprintf(stderr, "gyre launch: the last failed worker's log ends with:\n%s", failed_worker_said.c_str());
      }
      g_signal.store(SIGTERM);
      crash_loop = true;
    }
    if (g_signal.load() != 0 && stop_deadline == 0) {
      std::fprintf(stderr, "gyre launch: stopping (waiting for the step in flight)\n");
      stop_deadline = NowMs() + options.stop_grace_ms;
      absl::StatusOr<cli::ControlTarget> target = cli::ResolveControlTarget(options.run_dir, "", "");
      if (target.ok()) cli::ControlClient(*target, 5000).Stop().status().IgnoreError();
    }
    if (stop_deadline != 0 && NowMs() > stop_deadline) {
      std::fprintf(stderr, "gyre launch: grace period over; killing what is left\n");
      if (!coordinator_done) ::kill(coordinator.pid, SIGKILL);
      for (auto& [p, c] : workers) ::kill(p, SIGKILL);
      stop_deadline = NowMs() + 5000;
    }
    if (coordinator_done && !workers.empty() && stop_deadline == 0) {
      // The coordinator is gone for good: give the workers the grace period.
      stop_deadline = NowMs() + options.stop_grace_ms;
    }

    // Provisioner: match the coordinator's desired worker count; end the coordinator once the
    // run is over and every worker has left.
    if (!coordinator_done) {
      absl::StatusOr<gyre::v1::RunStatus> run = run_status(2000);
      if (run.ok()) {
        committed_steps = static_cast<int64_t>(run->committed_steps());
        const bool over = run->state() == gyre::v1::RUN_STATE_STOPPED || run->state() == gyre::v1::RUN_STATE_FINISHED;
        if (over && workers.empty()) {
          ::kill(coordinator.pid, SIGTERM);
        } else if (!over && run->state() != gyre::v1::RUN_STATE_STOPPING && stop_deadline == 0) {
          const int desired = static_cast<int>(run->desired_workers());
          const int to_run = workers_to_run(desired);
          for (int alive = static_cast<int>(workers.size()); alive < to_run; ++alive) {
            std::fprintf(stderr, "gyre launch: %zu worker(s) alive, %d desired: starting one\n", workers.size(), desired);
            if (absl::Status s = start_worker(); !s.ok()) return s;
          }
        }
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(options.poll_ms));
  }
  if (crash_loop) {
    // Its last line: LastLines indents each line and ends it with a newline.
    absl::string_view last_line = absl::StripTrailingAsciiWhitespace(failed_worker_said);
    last_line = absl::StripAsciiWhitespace(last_line.substr(last_line.rfind('\n') + 1));
    return absl::AbortedError(absl::StrCat("workers kept failing (the last ", crash_loop_rule.last_reason(), ")",
                                           last_line.empty() ? "" : absl::StrCat(": ", last_line), "; log: ",
                                           last_failed_log));
  }
  return absl::OkStatus();
}

}  // namespace gyre::deploy
