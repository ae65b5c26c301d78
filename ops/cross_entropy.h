// Cross-entropy fused with the LM-head linear, computed in vocabulary chunks so the full
// [tokens, vocab] logits tensor never exists (peak extra memory: row_block x vocab_chunk).
//
//   loss = loss_scale * Σ_{r : target_r >= 0} ( logsumexp_v(h_r · W_v) − h_r · W_{target_r} )
//
// Two passes per block of rows: (1) an online (running max / running sum) log-sum-exp over the
// vocabulary chunks, (2) recompute each chunk's logits, form
// G = loss_scale * (softmax − onehot) and accumulate dh += G W_c, dW_c += Gᵀ h. The recompute
// costs one extra [rows x chunk x d] GEMM per chunk; that is the price of not storing logits
// (skipped when the whole vocabulary fits one chunk).
// loss_scale is 1 / (token count of the global batch) under DESIGN.md §4's scaling contract.
// Targets < 0 are ignored (no loss, no gradient).
// With logit_soft_cap = c > 0 the logits are l = c · tanh(h·W_v / c) (xLSTM Large's output cap,
// MODELS.md §1.5) and the gradient carries the cap's slope: G = scale · (softmax(l) − onehot) ⊙
// sech²(h·W_v / c). Pass 2 then always recomputes the raw logits (the slope needs them). On CUDA
// the cap rides in the fused kernel's row pass (kernels/cuda/cross_entropy.h logit_soft_cap);
// LmHeadLogits with a cap is CPU only (CUDA logits of a capped model: not yet).
#pragma once

#include <cstdint>
#include <span>

#include "ops/tensor.h"

namespace gyre::ops {

struct CrossEntropyOptions {
  int64_t vocab_chunk = 8192;
  int64_t row_block = 512;
  // *dw is overwritten instead of accumulated (its old contents are never read): the first
  // write of a stale gradient under the deferred-zero rule (ops/module.h FirstGradWrite).
  bool overwrite_dw = false;
  // c > 0: logits c · tanh(logit / c) (see the top of this file); 0: off (every model but xLSTM
  // Large). LanguageModel sets it from ModelSpec::logit_soft_cap on each call.
  double logit_soft_cap = 0.0;
  // CUDA: the loss is not read back; it stays in a device slot whose index is
  // CrossEntropyResult::deferred_index, read by CudaBackend::TakeDeferredScalars (the training
  // step's one read-back, ops/step_notes.md). CPU: ignored (the loss is there at once).
  bool defer_loss = false;
};

struct CrossEntropyResult {
  double loss = 0;          // loss_scale * sum of per-token losses (NaN while deferred)
  int64_t tokens = 0;       // targets counted
  int deferred_index = -1;  // >= 0: the loss is TakeDeferredScalars()[deferred_index]
};

// h [N, d], w [V, d]. *dh (if not null) is overwritten with dloss/dh [N, d]; *dw (if not null)
// accumulates dloss/dW (with options.overwrite_dw: is overwritten). With both null only the loss
// is computed (one pass).
CrossEntropyResult FusedLmHeadCrossEntropy(const Tensor& h, const Tensor& w,
                                           std::span<const int32_t> targets, double loss_scale,
                                           const CrossEntropyOptions& options, Tensor* dh, Tensor* dw);

// Reference: materialises all logits. Same contract. For tests.
CrossEntropyResult NaiveLmHeadCrossEntropy(const Tensor& h, const Tensor& w,
                                           std::span<const int32_t> targets, double loss_scale,
                                           Tensor* dh, Tensor* dw, double logit_soft_cap = 0.0);

// Logits [N, V] = h Wᵀ, soft-capped when logit_soft_cap > 0 (inference: Logits, decoding). CUDA:
// bf16 logits, the cap applied in place by CudaInference::SoftCap (fp32 math, one rounding), so
// greedy and speculative decoding argmax the capped logits.
Tensor LmHeadLogits(const Tensor& h, const Tensor& w, double logit_soft_cap);

}  // namespace gyre::ops
