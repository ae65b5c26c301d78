#include "ops/cuda_infer.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "ops/check.h"

namespace gyre::ops {
namespace {

std::atomic<CudaInference*> g_infer{nullptr};

}  // namespace

CudaInference* CudaInferenceOrNull() { return g_infer.load(std::memory_order_acquire); }

CudaInference& CudaInfer() {
  CudaInference* p = CudaInferenceOrNull();
  GYRE_CHECK(p != nullptr, "CUDA inference ops used, but this binary does not link //ops:cuda_infer_impl");
  return *p;
}

bool RowInvariantDecode() {
  static const bool on = [] {
    const char* v = std::getenv("GYRE_ROW_INVARIANT_DECODE");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return on;
}

void RegisterCudaInference(CudaInference* impl) { g_infer.store(impl, std::memory_order_release); }

}  // namespace gyre::ops
