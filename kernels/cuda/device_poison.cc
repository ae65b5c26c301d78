#include "kernels/cuda/device_poison.h"

#include <cuda_runtime.h>

#include <vector>

#include "kernels/cuda/cuda_check.h"

namespace gyre::cuda {

CudaResult PoisonFreeDeviceMemory(uint8_t byte, size_t keep_free, PoisonReport* report) {
  *report = PoisonReport{};
  constexpr size_t kMiB = size_t{1} << 20;
  std::vector<void*> held;
  CudaResult result;
  // Chunks of 1 GiB, then smaller, until the driver reports no more than keep_free free.
  for (size_t chunk = size_t{1} << 30; chunk >= 2 * kMiB && result.ok();) {
    size_t free_bytes = 0, total_bytes = 0;
    if (cudaMemGetInfo(&free_bytes, &total_bytes) != cudaSuccess) {
      result = CudaError(cudaGetLastError(), "cudaMemGetInfo", __FILE__, __LINE__);
      break;
    }
    if (free_bytes < keep_free + chunk) {
      chunk /= 2;
      continue;
    }
    void* p = nullptr;
    if (cudaMalloc(&p, chunk) != cudaSuccess) {
      cudaGetLastError();  // not sticky: the driver had less than it said
      chunk /= 2;
      continue;
    }
    held.push_back(p);
    const cudaError_t err = cudaMemset(p, byte, chunk);
    if (err != cudaSuccess) result = CudaError(err, "cudaMemset", __FILE__, __LINE__);
    report->bytes += chunk;
  }
  if (result.ok()) {
    const cudaError_t err = cudaDeviceSynchronize();
    if (err != cudaSuccess) result = CudaError(err, "cudaDeviceSynchronize", __FILE__, __LINE__);
  }
  for (void* p : held) cudaFree(p);
  if (!result.ok()) return result;
  // Did the driver hand the pages back out? One probe allocation, its first bytes read back.
  void* probe = nullptr;
  if (cudaMalloc(&probe, 64 * kMiB) == cudaSuccess) {
    uint8_t head[256] = {};
    if (cudaMemcpy(head, probe, sizeof(head), cudaMemcpyDeviceToHost) == cudaSuccess) {
      report->reused = true;
      for (uint8_t b : head) report->reused = report->reused && b == byte;
    }
    cudaFree(probe);
  }
  cudaGetLastError();
  return {};
}

}  // namespace gyre::cuda
