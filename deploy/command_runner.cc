#include "deploy/command_runner.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace gyre::deploy {
namespace {

int64_t NowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Exit code 127 plus this marker on the pipe: exec failed (the program is missing).
constexpr char kExecFailed[] = "gyre-command-runner: exec failed: ";

class SubprocessRunner final : public CommandRunner {
 public:
  absl::StatusOr<CommandOutput> Run(const std::vector<std::string>& argv, int64_t timeout_ms) override {
    if (argv.empty()) return absl::InvalidArgumentError("empty command");
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0) return absl::InternalError(absl::StrCat("pipe: ", std::strerror(errno)));
    std::vector<std::string> copy = argv;
    std::vector<char*> args;
    for (std::string& a : copy) args.push_back(a.data());
    args.push_back(nullptr);
    const pid_t pid = ::fork();
    if (pid < 0) {
      ::close(fds[0]);
      ::close(fds[1]);
      return absl::ResourceExhaustedError(absl::StrCat("fork: ", std::strerror(errno)));
    }
    if (pid == 0) {
      ::dup2(fds[1], 1);
      ::dup2(fds[1], 2);
      const int devnull = ::open("/dev/null", O_RDONLY);
      if (devnull >= 0) ::dup2(devnull, 0);
      ::execvp(args[0], args.data());
      const std::string why = absl::StrCat(kExecFailed, std::strerror(errno), "\n");
      (void)!::write(2, why.data(), why.size());
      ::_exit(127);
    }
    ::close(fds[1]);
    CommandOutput result;
    const int64_t deadline = NowMs() + timeout_ms;
    bool timed_out = false;
    char buf[4096];
    while (true) {
      const int64_t left = deadline - NowMs();
      if (left <= 0) {
        timed_out = true;
        break;
      }
      pollfd p = {fds[0], POLLIN, 0};
      const int ready = ::poll(&p, 1, static_cast<int>(std::min<int64_t>(left, 1000)));
      if (ready < 0 && errno == EINTR) continue;
      if (ready <= 0) continue;
      const ssize_t n = ::read(fds[0], buf, sizeof(buf));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) break;  // EOF: the child (and anything it left behind) closed the pipe
      result.output.append(buf, static_cast<size_t>(n));
    }
    ::close(fds[0]);
    if (timed_out) ::kill(pid, SIGKILL);
    int status = 0;
    while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    if (timed_out) {
      return absl::DeadlineExceededError(
          absl::StrCat("`", ShellJoin(argv), "` did not finish within ", timeout_ms, " ms"));
    }
    result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    if (result.exit_code == 127 && result.output.find(kExecFailed) != std::string::npos) {
      return absl::NotFoundError(absl::StrCat("cannot run `", argv[0], "`: ",
                                              result.output.substr(result.output.find(kExecFailed) + std::strlen(kExecFailed)),
                                              " (is it installed and on PATH?)"));
    }
    return result;
  }
};

}  // namespace

std::unique_ptr<CommandRunner> NewSubprocessRunner() { return std::make_unique<SubprocessRunner>(); }

std::string ShellQuote(const std::string& word) {
  if (!word.empty() && word.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-./:=@%+,") ==
                           std::string::npos) {
    return word;
  }
  std::string out = "'";
  for (char c : word) {
    if (c == '\'') {
      out += "'\\''";
    } else {
      out += c;
    }
  }
  return out + "'";
}

std::string ShellJoin(const std::vector<std::string>& argv) {
  std::string out;
  for (const std::string& a : argv) {
    if (!out.empty()) out += ' ';
    out += ShellQuote(a);
  }
  return out;
}

}  // namespace gyre::deploy
