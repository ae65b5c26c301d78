// Device-side random fills for benchmarks (multi-GB buffers where host generation and upload
// would dominate): counter-based hash (splitmix64) -> uniform -> approximately normal (sum of
// four uniforms, centred and scaled to unit variance). Deterministic for a given seed.
// Benchmarks must never time on zeros (METHOD.md); these give dense nonzero data.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/device_info.h"

namespace gyre::cuda {

CudaResult FillRandomF32(float* out, int64_t n, float mean, float stddev, uint64_t seed,
                         cudaStream_t stream);
CudaResult FillRandomBf16(__nv_bfloat16* out, int64_t n, float mean, float stddev, uint64_t seed,
                          cudaStream_t stream);
// Uniform integers in [0, range).
CudaResult FillRandomInt32(int32_t* out, int64_t n, int32_t range, uint64_t seed,
                           cudaStream_t stream);

}  // namespace gyre::cuda
