// WorkerSupervisor: keeps one `gyre worker` alive for a cluster launcher that starts one task per
// worker slot (a Slurm task; see slurm.h). It restarts the worker after a crash or a kill unless
// the run is over, and gives up on a crash loop (crash_loop.h, the same rule as the local
// launcher). A worker that exits 0 is done (the run stopped or finished, or it was drained).
//
// SIGTERM / SIGINT to the supervisor (srun ending the step, scancel) go to the worker, which gets
// `stop_grace_ms` to leave before it is killed.
#pragma once

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "deploy/provisioner.h"

namespace gyre::deploy {

struct SuperviseOptions {
  std::string self_exe = "/proc/self/exe";  // the gyre binary
  std::vector<std::string> worker_args;      // after `gyre worker`
  // A worker that fails (non-zero, not killed from outside) this soon after starting, or with no
  // step committed while it ran, counts towards a crash loop (crash_loop.h); this many in a row
  // give up.
  int64_t quick_exit_ms = 15000;
  int max_quick_exits_in_a_row = 6;
  int64_t restart_delay_ms = 1000;
  int64_t stop_grace_ms = 30000;
};

// Runs until the worker is done (OK), the run is over (OK), a crash loop (Aborted) or a stop
// signal (Cancelled). `status` answers "is the run over?" after each unclean exit; an unreachable
// coordinator counts as "not over" (it may be restarting).
absl::Status SuperviseWorker(const SuperviseOptions& options, const StatusSource& status);

}  // namespace gyre::deploy
