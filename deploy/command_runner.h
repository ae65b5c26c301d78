// CommandRunner: the seam through which the Slurm and Kubernetes provisioners run external
// programs (`sbatch`, `kubectl scale ...`). The real one fork/execs with a PATH search and
// captures the output; tests put fake `sbatch` / `kubectl` scripts first on PATH, or record argv
// in a RecordingRunner (command_runner_testing.h), so every call a provisioner makes is visible.
//
// Thread-safety: implementations may be called from one thread at a time.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace gyre::deploy {

struct CommandOutput {
  int exit_code = -1;  // the program's exit status; 128 + signal when a signal ended it
  std::string output;  // stdout and stderr together, in order
};

class CommandRunner {
 public:
  virtual ~CommandRunner() = default;
  // Runs argv[0] (searched on PATH when it has no '/') with argv[1..] and waits for it, at most
  // `timeout_ms` (then it is killed and DeadlineExceeded returned). A program that cannot be
  // started (not on PATH, not executable) is NotFound naming it; a non-zero exit is not an error
  // here: callers read exit_code.
  virtual absl::StatusOr<CommandOutput> Run(const std::vector<std::string>& argv, int64_t timeout_ms) = 0;
};

// fork + execvp; output captured through a pipe.
std::unique_ptr<CommandRunner> NewSubprocessRunner();

// "a 'b c' d": argv as a shell would need it, for messages and dry-run lines.
std::string ShellJoin(const std::vector<std::string>& argv);
// One word quoted for a POSIX shell (single quotes unless it is plainly safe).
std::string ShellQuote(const std::string& word);

}  // namespace gyre::deploy
