// --device of `gyre worker` / `gyre launch`: "cpu", "cuda", "cuda:<index>" or "auto".
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "worker/gpu_runtime.h"

namespace gyre {

// Returns "cpu" or "cuda". "cuda:<index>" pins this process to that GPU by narrowing
// CUDA_VISIBLE_DEVICES to it (the index counts among the GPUs already visible), which must
// happen before CUDA initialises: the ops backend then uses device 0. `gpu` is null in a CPU
// build. "auto" is cuda when `gpu` sees a device, else cpu.
absl::StatusOr<std::string> ResolveWorkerDevice(const std::string& device, GpuRuntime* gpu);

// The visible-device list after picking `index` of `visible` (CUDA_VISIBLE_DEVICES' value, empty
// when unset): "2" for index 0 of "2,3", "1" for index 1 of "". Error when out of range.
absl::StatusOr<std::string> NarrowVisibleDevices(const std::string& visible, int index);

}  // namespace gyre
