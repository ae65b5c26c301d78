// Fused LM-head linear + cross-entropy that never materialises the [tokens, vocab] logits.
//
//   logits_r = h_r Wᵀ                       h [N, d] bf16, W [V, d] bf16
//   loss     = loss_scale · Σ_{r: t_r >= 0} ( logsumexp(logits_r) − logits_r[t_r] )
//   G_r      = loss_scale · (softmax(logits_r) − onehot(t_r))     (0 for ignored rows)
//   dh       = G W          (overwrites, bf16)      dW += Gᵀ h   (accumulates, fp32)
// Same contract as ops/cross_entropy.h (FusedLmHeadCrossEntropy): targets < 0 are ignored;
// loss_scale is 1 / (tokens of the global batch) under DESIGN.md §4.
//
// The loop runs over chunks of `chunk_tokens` token rows; per chunk, one pass:
//   1. GEMM (cuBLASLt): logits [n, V] fp32 into a bounded buffer [chunk_tokens, V8] (V8 = V
//      rounded up to 8 so rows stay 32-byte aligned for any V, e.g. 50257 and 50277);
//   2. one block per row: online log-sum-exp (running max and rescaled sum) in one read of the
//      row, the token loss, then G written as bf16 *in place* over the row's own fp32 logits
//      (bf16 element j lands in bytes [2j, 2j+2)). ce_row_kernel2 (V · 4 bytes <= 227 KiB, so
//      every GPT-2-sized vocabulary) stages the row in shared memory and writes G from there: the
//      row is read from global memory once; ce_row_kernel1 (larger V) reads it again tile by tile
//      (each tile read into registers before a barrier, then written, inside elements already read);
//   3. GEMM dh_chunk = G W (bf16 out), 4. GEMM dW += Gᵀ h_chunk (fp32, beta = 1).
// Peak extra memory: chunk_tokens · V8 · 4 bytes (1024 x 50304: 206 MB) instead of N · V · 4.
// A target ≥ V gives a NaN loss and NaN gradient row (loud; the host validates ids).
//
// Precision: fp32 logits (bf16 operands, fp32 accumulation), fp32 log-sum-exp; G is rounded to
// bf16 for the two backward GEMMs (the usual mixed-precision choice; ~2e-3 relative in dh, dW).
//
// Cost: 3 GEMMs of 2·N·V·d FLOPs (forward only: 1): 16K tokens x 50304 x 2048 = 3.4 TFLOP each,
// 10.1 TFLOP total: ~13 ms at ~800 TFLOP/s. Extra bytes per chunk: logits written (4) + read
// (4) + G written (2) + read twice by GEMMs (4) = 14 bytes per logit: 11.5 GB at 16K x 50304,
// ~3.5 ms at 3.3 TB/s if nothing stays in L2 — the GEMMs dominate at d = 2048, not at d = 768.
//
// Thread-safety: uses the GemmContext (one thread) and the allocator.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/device_allocator.h"
#include "kernels/cuda/device_info.h"
#include "kernels/cuda/gemm.h"

namespace gyre::cuda {

struct LinearCrossEntropyArgs {
  int64_t tokens = 0, dim = 0, vocab = 0;
  const __nv_bfloat16* h = nullptr;  // [tokens, dim]
  const __nv_bfloat16* w = nullptr;  // [vocab, dim]
  const int32_t* targets = nullptr;  // device [tokens]; < 0 = ignored
  float loss_scale = 1.f;
  float* token_loss = nullptr;       // [tokens] unscaled per-token loss (0 if ignored); overwritten
  double* loss_sum = nullptr;        // [1] loss_scale · Σ token_loss; overwritten
  __nv_bfloat16* dh = nullptr;       // [tokens, dim] overwritten, or null
  float* dw = nullptr;               // [vocab, dim] accumulated, or null
  int64_t chunk_tokens = 1024;
};

// With dh and dw both null only the loss is computed (one GEMM per chunk).
CudaResult LinearCrossEntropy(GemmContext* gemm, DeviceAllocator* alloc,
                              const LinearCrossEntropyArgs& args, cudaStream_t stream);

}  // namespace gyre::cuda
