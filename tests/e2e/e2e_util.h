// Helpers for the end-to-end tests: the real `gyre` / `gyrectl` binaries run as users run them
// (prepare a corpus, `gyre launch --local`, steer with gyrectl, read the ledger), processes found
// and killed by pid, and every log dumped when something goes wrong.
//
// Thread-safety: none; one test thread drives a LocalRun.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "nlohmann/json.hpp"

namespace gyre::e2e {

// Path of a binary of //cli (runfiles).
std::string Bin(const std::string& name);
// The test's private temporary directory.
std::string TestTmp();
// The whole file as text; empty when it does not exist (logs a process may not have written).
std::string ReadFileOrEmpty(const std::string& path);

struct CommandResult {
  int code = -1;
  std::string out;  // stdout (stderr goes to the test log)
};
CommandResult RunCommand(const std::vector<std::string>& args);

// Runs `gyre prepare` of the golden corpus into `index_dir` (GPT-2 tokenizer). False on failure.
bool PrepareGoldenIndex(const std::string& index_dir);

// Waits until `pred` holds, polling every `poll_ms`; false after `seconds`.
bool WaitFor(const std::function<bool()>& pred, int seconds, int poll_ms = 200);

// One committed step as `gyre ledger --json` prints it.
struct LedgerStep {
  uint64_t step = 0;
  uint64_t generation = 0;
  uint32_t world = 0;
  uint64_t sample_begin = 0, sample_end = 0;
  double loss = 0;
  int64_t committed_unix_ms = 0;
  double model_flops_per_s = 0;  // summed over ranks (ops/flops.h)
  double eval_loss = -1;         // in-run held-out loss evaluated before this step; -1: none
  std::string problem;
};
struct Ledger {
  int code = -1;          // gyre ledger's exit code: 0 means no gap, duplicate or wrong range
  std::string summary;    // the human summary line ("ledger: N committed steps, ...")
  std::vector<LedgerStep> steps;
};

// A run under `gyre launch --local` in `root`/runs/<name>, with the config text given.
class LocalRun {
 public:
  // `config_text`: RunConfig text proto; "@INDEX@" is replaced with the prepared index path.
  LocalRun(std::string root, std::string name, std::string config_text);
  ~LocalRun();  // kills whatever is left (launcher first, then its children by pid)

  const std::string& run_dir() const { return run_dir_; }
  const std::string& root() const { return root_; }

  // Starts `gyre launch --local --workers N` (its output goes to root/launch-<name>.log).
  bool Launch(int workers, const std::vector<std::string>& extra_args = {});
  // gyrectl --json <args>; null json when gyrectl fails.
  nlohmann::json Ctl(const std::vector<std::string>& args, const std::vector<std::string>& global_flags = {});
  uint64_t Committed();  // 0 when unknown
  nlohmann::json Status() { return Ctl({"status"}); }
  // Pids of `gyre <role>` processes of this run ("worker", "coordinator"), from /proc.
  std::vector<pid_t> Pids(const std::string& role) const;
  // Waits for the launcher to exit; true with exit code 0.
  bool WaitForExit(int seconds, int* exit_code = nullptr);
  // Pause and wait until the committed count has been still for `still_seconds`.
  bool PauseAndSettle(int still_seconds = 3);
  Ledger ReadLedger() const;
  // Prints the tail of the launcher log and of every process log (coordinator, workers).
  void DumpLogs(size_t tail_bytes = 2500) const;
  // Counts lines of the coordinator log containing `needle`.
  int CountInCoordinatorLog(const std::string& needle) const;
  // The coordinator log's lines containing every one of `needles`.
  std::vector<std::string> CoordinatorLogLines(const std::vector<std::string>& needles) const;
  // The contents of every worker log, concatenated.
  std::string WorkerLogs() const;

 private:
  std::string root_, name_, run_dir_, config_path_, launch_log_;
  pid_t launcher_ = -1;
  bool exited_ = false;
};

}  // namespace gyre::e2e
