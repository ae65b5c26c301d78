// Fills the device memory nobody holds with a byte pattern, for tests and benches that must not
// depend on what cudaMalloc hands out.
//
// cudaMalloc does not clear memory: a buffer gets whatever the last owner of those pages left (in
// this process, or another one that ran on the card before it; a fresh machine gives zeros). A
// kernel that reads bytes nobody wrote, or reads them before a copy landed, then gives results
// that depend on the process's history: fine on a fresh machine, different after other programs
// ran (helper det22, session 22: llama-1.3b's first-step loss). PoisonFreeDeviceMemory takes as
// much of the card as the driver gives in chunks, fills it with `byte` (0xFF: NaN in bf16 and fp32;
// 0x3F: finite values, 0.746 in bf16), synchronises and frees it again, so the next allocations
// of this process most likely land on poisoned pages (the driver reuses freed pages; nothing
// guarantees it, so `reused` reports whether a fresh allocation afterwards saw the pattern).
// Caching allocators keep what they hold: call it before anything else allocates, or after
// DeviceAllocator::ReleaseCached.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/cuda/device_info.h"  // CudaResult

namespace gyre::cuda {

struct PoisonReport {
  size_t bytes = 0;     // poisoned (and freed again)
  bool reused = false;  // a 64 MiB allocation made afterwards started with the pattern
};

// Leaves `keep_free` bytes untouched (room for the driver and cuBLAS' own allocations).
CudaResult PoisonFreeDeviceMemory(uint8_t byte, size_t keep_free, PoisonReport* report);

}  // namespace gyre::cuda
