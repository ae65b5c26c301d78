// Timing helpers shared by the GPU kernel benchmarks: CUDA-event medians with warm-up and an L2
// flush before every timed repetition (so a kernel never reads its inputs from the previous
// repetition's cache; 256 MiB is over four times the H200's 60 MB L2).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <functional>
#include <vector>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/device_allocator.h"

namespace gyre::cuda {

inline double Median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
}

// Events and the flush buffer; Init once per process (default stream).
struct Timer {
  cudaEvent_t start = nullptr, stop = nullptr;
  DeviceBuffer flush;
  int reps = 30, warmup = 5;

  void Init(DeviceAllocator* alloc) {
    CUDA_OK_OR_DIE(alloc->Allocate(256ull << 20, &flush));
    CUDA_CHECK_OR_DIE(cudaEventCreate(&start));
    CUDA_CHECK_OR_DIE(cudaEventCreate(&stop));
  }
};

// Median over t.reps of one call of `op` on the default stream, L2 flushed before each.
inline double TimeMs(Timer& t, const std::function<CudaResult()>& op) {
  for (int i = 0; i < t.warmup; ++i) CUDA_OK_OR_DIE(op());
  CUDA_CHECK_OR_DIE(cudaDeviceSynchronize());
  std::vector<float> ms;
  for (int i = 0; i < t.reps; ++i) {
    CUDA_CHECK_OR_DIE(cudaMemsetAsync(t.flush.get(), i & 0xff, t.flush.bytes(), nullptr));
    CUDA_CHECK_OR_DIE(cudaEventRecord(t.start, nullptr));
    CUDA_OK_OR_DIE(op());
    CUDA_CHECK_OR_DIE(cudaEventRecord(t.stop, nullptr));
    CUDA_CHECK_OR_DIE(cudaEventSynchronize(t.stop));
    float v = 0;
    CUDA_CHECK_OR_DIE(cudaEventElapsedTime(&v, t.start, t.stop));
    ms.push_back(v);
  }
  return Median(ms);
}

}  // namespace gyre::cuda
