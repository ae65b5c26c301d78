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
//   1. GEMM (cuBLASLt): logits [n, V] as bf16 (fp32 accumulation, rounded once at the store:
//      what PyTorch autocast's LM head produces) into a bounded buffer [chunk_tokens, ld] (ld = V
//      rounded up to 128 by default: 256-byte aligned rows, and the GEMM plans of the next multiple of
//      128; or to 8 under ld_align 8, see LinearCrossEntropyArgs);
//   2. one block per row: log-sum-exp (the row's max, then Σ exp(l − max)), the token loss, then
//      G written as bf16 *in place* over the row's own logits. ce_row_kernel2 (V8 · 2 bytes <=
//      226 KiB: every vocabulary up to ~115K; two blocks per SM at GPT-2 sizes) stages the row in
//      shared memory, so it is read from global memory once; ce_row_kernel1 (larger V) reads it
//      three times;
//   3. GEMM dh_chunk = G W (bf16 out), 4. GEMM dW += Gᵀ h_chunk (fp32; beta 0 on the first chunk
//      under `overwrite_dw`, the deferred gradient zeroing of ops/module.h).
// A product whose rounded plan cuBLASLt rejects on the real shape (V 50257 / 50277 / 50281's
// logits) runs as two, split at V128 = 128·⌊V/128⌋ (vocab_split below; session 20).
// Peak extra memory: chunk_tokens · ld · 2 bytes (16384 x 50304: 1.65 GB; ld is V rounded up to
// 128: at most 127 columns more than V, 4 MB at 16384 rows).
// A target ≥ V gives a NaN loss and NaN gradient row (loud; the host validates ids).
//
// Precision: bf16 logits, fp32 log-sum-exp; G is rounded to bf16 for the two backward GEMMs.
// Rounding a logit to bf16 moves it by <= 2^-9 of its size, so the error grows with the logits'
// scale; against float64 at V = 50304 (bench/lce_bench.cc, bench/RESULTS.md session 6 lce6):
// logit std 1: loss 1.3e-5 relative, dh/dW as with fp32 logits (1.7e-3 / 4e-5); std 3 (a
// trained head's scale, max |logit| 16): loss 1.5e-4, dh 3.5e-3, dW 3.1e-3 (fp32 logits: 1.8e-3,
// 8e-4); std 6 (max 30): loss 4e-5, dh/dW 1.1e-2. fp32 logits cost 2.2 ms more at 32K x 50304 x
// 768 on an H100 (17.1 vs 14.9 ms) and were dropped.
//
// Cost: 3 GEMMs of 2·N·V·d FLOPs (forward only: 1): 32K tokens x 50304 x 768 = 2.5 TFLOP each
// (~11 ms at ~680 TFLOP/s). Extra bytes per logit: written (2) + read (2) + G written (2) + read
// by 2 GEMMs (4) = 10: 16.5 GB at 32K x 50304; the row kernel's 4 B/logit (6.6 GB) is the part
// not hidden under GEMM arithmetic: ~2.2 ms at 3 TB/s.
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
  float* dw = nullptr;               // [vocab, dim] accumulated (or overwritten), or null
  int64_t chunk_tokens = 16384;
  // dW = Gᵀ h over this call's tokens: dW's old contents are ignored, never read (a stale
  // gradient under the deferred-zero rule); with no tokens dW is zeroed.
  bool overwrite_dw = false;
  // The shared-memory row kernel with fewer instructions a logit (ce_row_kernel2_lean, the
  // default); false: ce_row_kernel2, its reference with the same bits (GYRE_LCE_ROWS=staged in
  // ops/cuda_backend_impl.cc; the bitwise test).
  bool lean_rows = true;
  // Row stride of the logits buffer, in elements: the vocabulary rounded up to a multiple of
  // this (8: every row 16-byte aligned, the old layout; 128: rows 256-byte aligned) and, when 128
  // or more and plan_as_padded, the three GEMMs take the plans cuBLASLt's heuristic gives at the
  // vocabulary rounded up alike (GemmArgs::plan_round): any V then runs the kernels of the next
  // multiple of 128 (cross_entropy_notes.md, session 19: at d 2048 the heuristic tiles 50288
  // differently from 50304, 1.5x the time). 0: from GYRE_LCE_LD_ALIGN (read once; "8" or "128",
  // unset: 128 since session 19; any other value is an error). The GEMM shapes stay [tokens, V] / [V, d]: the padding columns are neither
  // computed, read nor written; W, dW and the checkpoint are untouched.
  int64_t ld_align = 0;
  bool plan_as_padded = true;  // false: the padded stride alone (measurement: bench/lce_bench.cc)
  // A vocabulary that is not a multiple of 128 (GPT-2's raw 50257) whose rounded plan cuBLASLt
  // rejects on the real shape runs that product's real-shape choice, which can be a slow non-TMA
  // kernel (V 50257 at d 2048: the logits product at ~100 TFLOP/s, 33.6 of the call's 43.9 ms).
  // The split runs such a product as two: the vocabulary's columns [0, V128) with V128 =
  // 128·⌊V/128⌋ (a multiple of 128: the plans of a padded vocabulary) and the V mod 128 columns
  // after them (W's rows, the logits' columns and dW's rows offset by V128: 256-byte aligned).
  // logits and dW split along V keep each element's k-order; dh = G W splits its reduction:
  // the tail's product first, then the body's accumulated onto it (beta 1), one more bf16
  // rounding of the tail's small partial sum (cross_entropy_notes.md, session 20).
  //   kOff: never; kWhereRejected: each product whose plan_round choice cuBLASLt rejected (a
  //   function of shape, library and card, like every plan: the same split in every run);
  //   kAlways: every product whenever V % 128 != 0 and V > 128 (measurement);
  //   kFromEnv: GYRE_LCE_SPLIT, read once: 0 kOff, 1 kWhereRejected, 2 kAlways; unset:
  //   kWhereRejected (the default since session 20: V 50257 / 50277 / 50281 at d 2048 x 16384
  //   tokens 43.5 → 15.5-15.6 ms on an H100, d 768 x 32768 at 50257 35.2 → 13.2; the same plans
  //   and bits at 50288 / 50304 / 1000, whose plans are accepted or not rounded).
  enum class VocabSplit { kFromEnv, kOff, kWhereRejected, kAlways };
  VocabSplit vocab_split = VocabSplit::kFromEnv;
  // c > 0 (opt-in; xLSTM Large's c = 30, MODELS.md §1.5): the loss uses the soft-capped logits
  // l = c · tanh(z / c) of the GEMM's z, and G = loss_scale · (softmax(l) − onehot) ⊙ sech²(z / c)
  // feeds the two backward GEMMs. The row pass is then ce_row_kernel2_capped (the lean kernel's
  // staging, the cap as one ex2.approx and one rcp.approx per evaluation, session 21: 3.84 ->
  // 1.70 ms a 16384-row chunk at V 50304 on an H100; ce_row_kernel_capped, three reads from global
  // memory, where the row does not fit in shared memory, V > ~115K); 0 (the default) launches
  // exactly the kernels above (their PTX unchanged: tools/ptx/diff_rev.sh).
  float logit_soft_cap = 0.f;
};

// The logits buffer's row stride for `args` (ld_align resolved as above).
int64_t LogitsRowStride(const LinearCrossEntropyArgs& args);

// With dh and dw both null only the loss is computed (one GEMM per chunk).
// Measurement only (GYRE_LCE_TIMING=1, read once): each call synchronises, times its phases with
// events (the allocation on the host; per chunk logits / rows / dh / dW on the stream) and prints
// them to stderr with ld, the operands' alignments and the allocator's cudaMalloc / cudaFree counts.
CudaResult LinearCrossEntropy(GemmContext* gemm, DeviceAllocator* alloc,
                              const LinearCrossEntropyArgs& args, cudaStream_t stream);

// Step 2 alone (bench/lce_bench.cc): the row pass over `rows` rows of bf16 logits [rows, ld]
// (ld % 8 == 0, ld >= vocab) with args' vocab, targets, loss_scale, token_loss and lean_rows;
// G written in place when `grad`.
CudaResult CrossEntropyRows(__nv_bfloat16* logits, int64_t ld, int64_t rows, const LinearCrossEntropyArgs& args,
                            bool grad, cudaStream_t stream);

}  // namespace gyre::cuda
