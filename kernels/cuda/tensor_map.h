// cuTensorMapEncodeTiled, the driver call that builds TMA descriptors, reached through the CUDA
// runtime's driver entry point so that no target links against libcuda. Shared by the TMA
// kernels' host code (attention_wgmma.cu, mlstm.cu); include from .cu files only.
#pragma once

#include <cuda.h>          // CUtensorMap
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled
#include <cuda_runtime.h>

namespace gyre::cuda {

// The encoder, looked up once per process; nullptr when the driver lacks it (callers report
// "cuTensorMapEncodeTiled: not found in the driver").
inline PFN_cuTensorMapEncodeTiled_v12000 TensorMapEncoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault,
                                         &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      return static_cast<PFN_cuTensorMapEncodeTiled_v12000>(nullptr);
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

}  // namespace gyre::cuda
