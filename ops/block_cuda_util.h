// Small CUDA-path helpers shared by the blocks' .cc files (ops/recurrent_blocks.cc,
// ops/xlstm_large_block.cc): device tensors, byte offsets into a tensor, and one GEMM on the
// backend's cuBLASLt. Internal to the `model` library (not a public header of ops/).
#pragma once

#include <cstddef>
#include <cstdint>

#include "ops/block.h"
#include "ops/cuda_infer.h"
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

// A decode state's tensor on the device: the CPU-made (zero) states of NewState move there as fp32
// on the first step, exact.
void StateOnDevice(Tensor* t);

// The mLSTM cell over a decode chunk's `chunk` positions in one launch (kernels/cuda/ssm_step.h),
// shared by MlstmBlock::StepCuda and XlstmLargeBlock::StepCuda. `s` carries the shape and the
// q, k, v, gate and h pointers; the states c, n, m are stepped here. Row-invariant decoding
// (cuda_infer.h) steps one token with the chunk kernel as well, so a position's arithmetic is the
// same at k = 1 and k > 1; n and m after a chunk-kernel step go to fresh tensors (the kernel's
// blocks of a head all read the old ones), taken by handle — or copied back under decode-graph
// capture, whose replays need fixed addresses. A rewindable chunk has the kernel write the state
// after positions 0..k-2 into one buffer per tensor whose views `history` adopts (Rewind then swaps
// handles: no copy, no launch). No launch for an empty batch.
void StepMlstmCells(CudaMlstmStepArgs s, int64_t chunk, bool rewindable, Tensor* c, Tensor* n, Tensor* m,
                    StateHistory* history);

}  // namespace gyre::ops
