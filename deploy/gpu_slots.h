// GPU slot assignment of the local launcher, apart from processes so it is testable without GPUs.
//
// A GPU worker owns one GPU (`--device cuda:<slot>`): NCCL refuses a communicator with two ranks
// on one device, and CPU extras cannot join an NCCL run (the backends do not mix), so the
// launcher runs at most `gpus` GPU workers and says so when more are desired.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"

namespace gyre::deploy {

// How many worker processes to keep alive for `desired` workers: all of them for CPU workers
// (gpus == 0), at most one per GPU otherwise.
int WorkersToRun(int desired, int gpus);

// The lowest slot in [0, gpus) that no live worker holds (`held` lists the live workers' slots),
// so a replacement takes the slot its dead predecessor freed. nullopt when every slot is held:
// the caller must not start another GPU worker.
std::optional<int> FreeGpuSlot(int gpus, const std::vector<int>& held);

// The notice printed (once per desired count) when more workers are desired than GPUs exist;
// empty when the desired count fits.
std::string GpuCapNotice(int desired, int gpus);

// A GPU run whose `cluster.min_workers` exceeds the GPU count could never take a step (the
// launcher runs at most one worker per GPU), so it is refused before anything starts, naming
// the field. OK for CPU runs (gpus == 0).
absl::Status CheckGpuCapacity(int min_workers, int gpus);

}  // namespace gyre::deploy
