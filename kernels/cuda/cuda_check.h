// Error checking for CUDA runtime calls and kernel launches, for library code that must not abort.
//
// Every CUDA call in kernels/cuda goes through one of these macros; each turns a failure into a
// returned CudaResult (kernels/cuda/device_info.h) whose message names the call, file and line:
//
//   CUDA_RETURN_IF_ERROR(cudaMemsetAsync(p, 0, n, stream));   // any cudaError_t expression
//   my_kernel<<<grid, block, 0, stream>>>(...);
//   CUDA_RETURN_IF_LAUNCH_ERROR("my_kernel");                 // cudaGetLastError() after a launch
//   CUDA_RETURN_IF_NOT_OK(OtherLauncher(...));                 // propagate a CudaResult
//
// A launch error (bad configuration, too much shared memory) is reported at the launch; errors
// raised while the kernel runs (illegal address) surface at the next synchronising call, which
// is checked too. Callers outside kernels/cuda (ops/, worker/) turn CudaResult into absl::Status.
// Tests and benchmarks, which may abort, use CUDA_CHECK_OR_DIE.
//
// Plain C++ (no abseil) so nvcc-compiled .cu files can include it.
#pragma once

#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#include "kernels/cuda/device_info.h"  // CudaResult

namespace gyre::cuda {

inline CudaResult CudaError(cudaError_t err, const char* what, const char* file, int line) {
  if (err == cudaSuccess) return {};
  return {static_cast<int>(err), std::string(what) + ": " + cudaGetErrorName(err) + " (" +
                                     cudaGetErrorString(err) + ") at " + file + ":" +
                                     std::to_string(line)};
}

// A non-CUDA failure (bad argument, unsupported shape): code -1 so it never reads as success.
inline CudaResult InvalidArgument(const std::string& message) { return {-1, message}; }

}  // namespace gyre::cuda


#define CUDA_RETURN_IF_ERROR(expr)                                                     \
  do {                                                                                 \
    const cudaError_t gyre_cuda_err_ = (expr);                                         \
    if (gyre_cuda_err_ != cudaSuccess)                                                 \
      return ::gyre::cuda::CudaError(gyre_cuda_err_, #expr, __FILE__, __LINE__);       \
  } while (0)

#define CUDA_RETURN_IF_LAUNCH_ERROR(kernel_name)                                       \
  do {                                                                                 \
    const cudaError_t gyre_cuda_err_ = cudaGetLastError();                             \
    if (gyre_cuda_err_ != cudaSuccess)                                                 \
      return ::gyre::cuda::CudaError(gyre_cuda_err_, "launch " kernel_name, __FILE__, \
                                     __LINE__);                                        \
  } while (0)

#define CUDA_RETURN_IF_NOT_OK(expr)                                  \
  do {                                                               \
    ::gyre::cuda::CudaResult gyre_cuda_result_ = (expr);             \
    if (!gyre_cuda_result_.ok()) return gyre_cuda_result_;           \
  } while (0)

// Tests and benchmarks only: print and exit(1).
#define CUDA_CHECK_OR_DIE(expr)                                                               \
  do {                                                                                        \
    const cudaError_t gyre_cuda_err_ = (expr);                                                \
    if (gyre_cuda_err_ != cudaSuccess) {                                                      \
      std::fprintf(stderr, "%s failed: %s (%s) at %s:%d\n", #expr,                            \
                   cudaGetErrorName(gyre_cuda_err_), cudaGetErrorString(gyre_cuda_err_),      \
                   __FILE__, __LINE__);                                                       \
      std::exit(1);                                                                           \
    }                                                                                         \
  } while (0)

#define CUDA_OK_OR_DIE(expr)                                                                  \
  do {                                                                                        \
    ::gyre::cuda::CudaResult gyre_cuda_result_ = (expr);                                      \
    if (!gyre_cuda_result_.ok()) {                                                            \
      std::fprintf(stderr, "%s failed: %s at %s:%d\n", #expr,                                 \
                   gyre_cuda_result_.message.c_str(), __FILE__, __LINE__);                    \
      std::exit(1);                                                                           \
    }                                                                                         \
  } while (0)
