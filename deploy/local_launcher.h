// LocalLauncher: `gyre launch --local` — a coordinator and N worker processes on this machine,
// and the local *provisioner* of DESIGN.md section 5: it keeps as many worker processes alive as
// the coordinator's desired worker count (so `gyrectl scale` starts or stops processes, and a
// killed worker is replaced), and restarts a coordinator that died (it resumes from its journal).
//
// Children are this same binary (`/proc/self/exe coordinator|worker ...`), each logging to
// <run_dir>/logs/. Ctrl-C (SIGINT/SIGTERM) asks the coordinator to stop at a step boundary, waits
// for everyone, then kills stragglers.
#pragma once

#include <string>
#include <vector>

#include "absl/status/status.h"

namespace gyre::deploy {

struct LaunchOptions {
  std::string run_dir;       // runs/<name>
  std::string config_path;   // resolved config written by the caller
  int workers = 1;
  std::vector<std::string> worker_args;  // appended to every `gyre worker` command line
  // > 0: GPU workers, one GPU each. Every worker holds its own slot 0..gpus-1
  // (`--device cuda:<slot>`); a replacement takes the lowest slot no live worker holds (so a
  // killed worker's successor gets its GPU). Never two workers on one GPU (NCCL refuses two ranks
  // on one device, and CPU workers cannot join an NCCL run): when more workers are desired (at
  // launch or by `gyrectl scale`) only `gpus` run, with a notice (gpu_slots.h). 0: CPU workers
  // (`--device cpu`).
  int gpus = 0;
  std::string self_exe = "/proc/self/exe";
  int64_t poll_ms = 500;
  int64_t stop_grace_ms = 60000;
  bool restart_coordinator = true;
};

// Runs until the run finishes or is stopped. Returns the first unrecoverable error.
absl::Status RunLocal(const LaunchOptions& options);

}  // namespace gyre::deploy
