#include "deploy/gpu_slots.h"

#include <algorithm>

#include "absl/strings/str_format.h"

namespace gyre::deploy {

int WorkersToRun(int desired, int gpus) { return gpus > 0 ? std::min(desired, gpus) : desired; }

std::optional<int> FreeGpuSlot(int gpus, const std::vector<int>& held) {
  for (int slot = 0; slot < gpus; ++slot) {
    if (std::find(held.begin(), held.end(), slot) == held.end()) return slot;
  }
  return std::nullopt;
}

std::string GpuCapNotice(int desired, int gpus) {
  if (gpus <= 0 || desired <= gpus) return "";
  return absl::StrFormat("%d workers desired, %d GPUs: running %d; the rest would share a GPU", desired,
                         gpus, gpus);
}

absl::Status CheckGpuCapacity(int min_workers, int gpus) {
  if (gpus <= 0 || min_workers <= gpus) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrFormat(
      "cluster.min_workers is %d but only %d GPU(s) are visible and GPU workers take one GPU each: "
      "the run could never take a step (lower cluster.min_workers or use --device cpu)",
      min_workers, gpus));
}

}  // namespace gyre::deploy
