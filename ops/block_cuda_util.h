// Small CUDA-path helpers shared by the blocks' .cc files (ops/recurrent_blocks.cc,
// ops/xlstm_large_block.cc): device tensors, byte offsets into a tensor, and one GEMM on the
// backend's cuBLASLt. Internal to the `model` library (not a public header of ops/).
#pragma once

#include <cstddef>
#include <cstdint>

#include "ops/tensor.h"

namespace gyre::ops {

// An uninitialised CUDA tensor (bf16 unless asked).
Tensor CudaEmpty(Shape shape, DType dtype = DType::kBF16);
// An uninitialised CUDA buffer of at least `bytes` bytes (fp32 elements; for kernels' saved blobs).
Tensor CudaBytes(size_t bytes);
// The address `elements` elements (of t's dtype) into t's storage.
const void* BytePtr(const Tensor& t, int64_t elements);
void* MutBytePtr(const Tensor& t, int64_t elements);
// Row-major C [m, n] (ldc) = op(A) op(B) (+ beta C) on the backend's cuBLASLt; A, B bf16, C bf16 or
// fp32 (`c_f32`). Nothing happens for an empty output.
void Mm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const void* a, int64_t lda, const void* b, int64_t ldb,
        void* c, int64_t ldc, bool c_f32, float beta);

}  // namespace gyre::ops
