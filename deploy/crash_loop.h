// CrashLoop: when a launcher should stop restarting workers that keep failing.
//
// A worker failure (non-zero exit, not killed from outside) counts towards a crash loop when the
// worker died soon after it started, or when the run committed no step while it was alive. The
// second rule catches workers that fail after a long start-up: a 1.3B replica takes a minute to
// build, and a worker that then runs out of device memory at step 0 would otherwise be restarted
// forever. A failure after the run made progress resets the count (a worker that trained a while,
// then died, is what restarts are for).
//
// Used by the local launcher (one instance for all its workers) and the Slurm per-task supervisor.
// Not thread-safe.
#pragma once

#include <cstdint>
#include <string>

namespace gyre::deploy {

class CrashLoop {
 public:
  struct Options {
    int64_t quick_exit_ms = 15000;  // a failure this soon after start counts
    int max_failures_in_a_row = 6;  // this many counted failures in a row: give up
  };
  explicit CrashLoop(Options options) : options_(options) {}

  // What a worker looked like when it started: its start time and the run's committed steps
  // then (-1 when unknown, e.g. the coordinator was unreachable).
  struct Start {
    int64_t at_ms = 0;
    int64_t committed_steps = -1;
  };

  // A worker that started at `start` failed at `now_ms`, when the run had `committed_steps`
  // (-1: unknown). Returns true once the launcher should give up.
  bool Failed(const Start& start, int64_t now_ms, int64_t committed_steps);
  // A worker exited cleanly, or the run was seen to make progress: the count starts over.
  void Reset() { failures_in_a_row_ = 0; }

  int failures_in_a_row() const { return failures_in_a_row_; }
  // Why the last counted failure counted, for the give-up message.
  const std::string& last_reason() const { return last_reason_; }

 private:
  Options options_;
  int failures_in_a_row_ = 0;
  std::string last_reason_;
};

}  // namespace gyre::deploy
