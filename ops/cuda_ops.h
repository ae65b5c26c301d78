// Small CUDA kernels the ops/ backend needs beyond kernels/cuda (nvcc-compiled, plain C++ API):
// dtype conversion, axpy, scale, sum of squares, and a plain causal attention (fallback for the
// attention kernel of kernels/cuda/attention.h: one warp per query row, online softmax; the
// backward accumulates dK/dV with fp32 atomics). The fallback is correct at any head_dim <= 256
// but O(T²·D) memory traffic per head: fine for tests, far too slow for training at T = 2048.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/device_allocator.h"
#include "kernels/cuda/device_info.h"

namespace gyre::ops::cuda_ops {

using gyre::cuda::CudaResult;

// kind: 0 f32 -> bf16, 1 bf16 -> f32.
CudaResult Convert(const void* src, void* dst, int64_t n, int kind, cudaStream_t stream);
// The same on rows x cols elements, rows `src_ld` / `dst_ld` elements apart.
CudaResult ConvertRows(const void* src, int64_t src_ld, void* dst, int64_t dst_ld, int64_t rows, int64_t cols,
                       int kind, cudaStream_t stream);
// y += alpha x (f32 or bf16 arrays; fp32 math).
CudaResult Axpy(void* y, const void* x, bool bf16, float alpha, int64_t n, cudaStream_t stream);
// out = a + b (f32 or bf16; fp32 math).
CudaResult Add(void* out, const void* a, const void* b, bool bf16, int64_t n, cudaStream_t stream);
CudaResult Scale(void* y, bool bf16, float s, int64_t n, cudaStream_t stream);
// Per-block partial sums of x² into partials [blocks] (double); returns the block count used.
CudaResult SumSquaresPartials(const void* x, bool bf16, int64_t n, double* partials, int max_blocks, int* blocks,
                              cudaStream_t stream);

struct PlainAttentionArgs {
  int64_t batch = 0, seq = 0, heads = 0, kv_heads = 0, head_dim = 0;
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t q_row_stride = 0, kv_row_stride = 0;
  void* out = nullptr;  // packed
  float* lse = nullptr; // [B, H, T]
  const void* dout = nullptr;
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
};
CudaResult PlainAttentionForward(const PlainAttentionArgs& a, cudaStream_t stream);
CudaResult PlainAttentionBackward(const PlainAttentionArgs& a, gyre::cuda::DeviceAllocator* alloc,
                                  cudaStream_t stream);

}  // namespace gyre::ops::cuda_ops
