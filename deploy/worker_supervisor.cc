#include "deploy/worker_supervisor.h"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <thread>

#include "deploy/crash_loop.h"
#include "absl/strings/str_cat.h"

namespace gyre::deploy {
namespace {

std::atomic<int> g_stop_signal{0};
void OnStopSignal(int sig) { g_stop_signal.store(sig); }

int64_t NowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// `replaces` is the pid of the previous worker process, which exited (0 for the first): the
// coordinator then declares it dead at once instead of after its heartbeat timeout.
absl::StatusOr<pid_t> SpawnWorker(const SuperviseOptions& options, pid_t replaces) {
  std::vector<std::string> args = {"gyre", "worker"};
  if (replaces > 0) {
    args.push_back("--replaces-pid");
    args.push_back(absl::StrCat(replaces));
  }
  args.insert(args.end(), options.worker_args.begin(), options.worker_args.end());
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  const pid_t pid = ::fork();
  if (pid < 0) return absl::ResourceExhaustedError(absl::StrCat("fork: ", std::strerror(errno)));
  if (pid == 0) {
    ::signal(SIGTERM, SIG_DFL);
    ::signal(SIGINT, SIG_DFL);
    ::execv(options.self_exe.c_str(), argv.data());
    std::fprintf(stderr, "gyre provision: exec %s: %s\n", options.self_exe.c_str(), std::strerror(errno));
    ::_exit(127);
  }
  return pid;
}

}  // namespace

absl::Status SuperviseWorker(const SuperviseOptions& options, const StatusSource& status) {
  ::signal(SIGTERM, OnStopSignal);
  ::signal(SIGINT, OnStopSignal);
  CrashLoop crash_loop({options.quick_exit_ms, options.max_quick_exits_in_a_row});
  auto committed_steps = [&status]() -> int64_t {
    absl::StatusOr<gyre::v1::RunStatus> run = status();
    return run.ok() ? static_cast<int64_t>(run->committed_steps()) : -1;
  };
  pid_t previous = 0;
  for (int restarts = 0;; ++restarts) {
    const int64_t committed_at_start = committed_steps();
    absl::StatusOr<pid_t> pid = SpawnWorker(options, previous);
    if (!pid.ok()) return pid.status();
    const int64_t started = NowMs();
    std::fprintf(stderr, "gyre provision: worker started (pid %d)%s\n", *pid,
                 restarts > 0 ? absl::StrCat(", restart ", restarts).c_str() : "");
    int wait_status = 0;
    int64_t kill_at = 0;
    while (true) {
      const pid_t done = ::waitpid(*pid, &wait_status, WNOHANG);
      if (done == *pid) break;
      if (done < 0 && errno != EINTR) return absl::InternalError(absl::StrCat("waitpid: ", std::strerror(errno)));
      if (g_stop_signal.load() != 0 && kill_at == 0) {
        std::fprintf(stderr, "gyre provision: signal %d: stopping the worker\n", g_stop_signal.load());
        ::kill(*pid, SIGTERM);
        kill_at = NowMs() + options.stop_grace_ms;
      }
      if (kill_at != 0 && NowMs() > kill_at) ::kill(*pid, SIGKILL);
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    const int code = WIFEXITED(wait_status) ? WEXITSTATUS(wait_status) : 128 + WTERMSIG(wait_status);
    std::fprintf(stderr, "gyre provision: worker (pid %d) exited with status %d\n", *pid, code);
    if (g_stop_signal.load() != 0) return absl::CancelledError(absl::StrCat("signal ", g_stop_signal.load()));
    if (code == 0) return absl::OkStatus();  // the run is over, or this worker was drained
    absl::StatusOr<gyre::v1::RunStatus> run = status();
    if (run.ok() && RunIsOver(*run)) {
      std::fprintf(stderr, "gyre provision: the run is over; not restarting the worker\n");
      return absl::OkStatus();
    }
    // Killed from outside (kill -9, the OOM killer) is not a start-up failure.
    const bool killed = WIFSIGNALED(wait_status) &&
                        (WTERMSIG(wait_status) == SIGKILL || WTERMSIG(wait_status) == SIGTERM ||
                         WTERMSIG(wait_status) == SIGINT);
    if (!killed && crash_loop.Failed({started, committed_at_start}, NowMs(),
                                     run.ok() ? static_cast<int64_t>(run->committed_steps()) : -1)) {
      return absl::AbortedError(absl::StrCat("the worker failed ", crash_loop.failures_in_a_row(),
                                             " times in a row (the last ", crash_loop.last_reason(),
                                             ", status ", code, "); giving up"));
    }
    previous = *pid;
    std::fprintf(stderr, "gyre provision: restarting the worker in %lld ms\n",
                 static_cast<long long>(options.restart_delay_ms));
    std::this_thread::sleep_for(std::chrono::milliseconds(options.restart_delay_ms));
  }
}

}  // namespace gyre::deploy
