#include "ops/cuda_backend.h"

#include <atomic>

#include "ops/check.h"

namespace gyre::ops {
namespace {

std::atomic<CudaBackend*> g_backend{nullptr};

}  // namespace

CudaBackend* CudaBackendOrNull() { return g_backend.load(std::memory_order_acquire); }

CudaBackend& Cuda() {
  CudaBackend* b = CudaBackendOrNull();
  GYRE_CHECK(b != nullptr,
             "CUDA tensor used, but this binary was built without CUDA (build with --config=cuda and "
             "link //ops:cuda_backend)");
  return *b;
}

void RegisterCudaBackend(CudaBackend* backend) { g_backend.store(backend, std::memory_order_release); }

}  // namespace gyre::ops
