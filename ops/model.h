// LanguageModel: token embedding -> stack of residual blocks -> final norm -> LM head, built
// from a ModelSpec (model_config.h), with multi-token prediction (MODELS.md §5).
//
// Layout with mtp_heads = n (n = 1: the ordinary model): a shared trunk of n_layers - 1 blocks,
// then n head blocks (each one block of the last layer's kind); head k (k = 1..n) predicts token
// t + k from position t through the shared final norm and shared unembedding. The training loss
// is the mean over heads of  loss_scale * Σ_tokens CE  (loss_scale = 1 / global token count,
// DESIGN.md §4); head k has no target for the last k - 1 positions of each sequence.
//
// ForwardBackward runs the memory-saving order of the MTP paper (Fig. 2): trunk forward once;
// then per head: head forward, loss (chunked CE, no full logits), head backward to the trunk
// output, accumulating d(trunk output); then trunk backward once. Only one head's activations
// live at a time.
//
// Thread-safety: none; one step at a time. Parameters live in params() (fp32 masters on CPU).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "ops/block.h"
#include "ops/cross_entropy.h"
#include "ops/layers.h"
#include "ops/model_config.h"

namespace gyre::ops {

struct LossResult {
  double loss = 0;                   // mean over heads of each head's scaled loss
  std::vector<double> head_losses;   // per head, scaled by loss_scale
  int64_t tokens = 0;                // next-token (head 1) targets counted
};

class LanguageModel {
 public:
  // Builds and initialises (seeded) the model. On Device::kMeta only shapes exist (parameter
  // counting of large presets).
  static absl::StatusOr<std::unique_ptr<LanguageModel>> Create(const ModelSpec& spec, DType dtype,
                                                               Device device, uint64_t seed);

  const ModelSpec& spec() const { return spec_; }
  ParamStore& params() { return *store_; }
  int64_t NumParameters() const { return store_->NumParameters(); }

  // tokens: [batch, seq + 1] row-major (inputs are columns 0..seq-1, targets 1..seq).
  // Accumulates parameter gradients (zero them first); memory-saving head order. On CUDA the
  // loss is read back once, after the whole pass is enqueued (ForwardBackwardDeferred + TakeLoss).
  LossResult ForwardBackward(std::span<const int32_t> tokens, int64_t batch, int64_t seq, double loss_scale);
  // ForwardBackward without waiting for the loss: on CUDA each head's loss sum stays on the
  // device (CrossEntropyOptions::defer_loss) until TakeLoss, so the host never waits in the
  // middle of the step; the optimizer's read-back (CudaAdamW::Step, Trainer::Step) fetches the
  // sums with the gradient norm in one synchronisation. TakeLoss returns what ForwardBackward
  // would have (the same sums combined in the same order); it synchronises only if no read-back
  // has fetched them. One pass at a time: TakeLoss before the next pass (ops/step_notes.md).
  void ForwardBackwardDeferred(std::span<const int32_t> tokens, int64_t batch, int64_t seq, double loss_scale);
  LossResult TakeLoss();
  // The same loss and gradients computed in the naive order (all heads forward, then all
  // backward). For tests of the memory-saving order.
  LossResult ForwardBackwardAllHeads(std::span<const int32_t> tokens, int64_t batch, int64_t seq,
                                     double loss_scale);
  // Loss only (no gradients, activations released).
  LossResult Evaluate(std::span<const int32_t> tokens, int64_t batch, int64_t seq, double loss_scale);
  // Next-token logits [batch*seq, vocab] of head 1 for inputs [batch, seq] (small inputs only:
  // materialises the logits).
  Tensor Logits(std::span<const int32_t> inputs, int64_t batch, int64_t seq);

  // Incremental decoding (inference; no gradients). A state holds every block's recurrent state,
  // conv window or key/value cache for `batch` sequences. DecodeStep feeds one token per
  // sequence (tokens [batch]) and returns, per MTP head k = 1..n, the logits [batch, vocab] for
  // the token k positions ahead (head 1 = next token; heads 2..n are the drafts for
  // self-speculative decoding). Stepping through a sequence reproduces Logits(). On CUDA the
  // states live on the device (KV caches: ops/attention.h; recurrent: recurrent_step_cuda.cc).
  struct DecodeState {
    int64_t batch = 0;
    int64_t position = 0;     // tokens fed per sequence
    int64_t live_heads = 0;   // heads 1..live_heads have states that followed every token
    int64_t rewind_chunk = 0; // length of the last rewindable chunk (0: nothing to rewind)
    std::vector<Tensor> draft_hidden;  // defer_draft_logits: heads 2..n's normed outputs [rows, d]
    std::vector<std::unique_ptr<BlockState>> trunk, heads;
  };
  struct DecodeOptions {
    int64_t heads = 0;                // run and return heads 1..heads only (0: all). Heads past it
                                      // fall behind and cannot be asked for again on this state.
    bool rewindable = false;          // keep per-position states so Rewind can undo a suffix
    bool last_position_only = false;  // logits of the chunk's last position only ([batch, vocab])
    bool defer_draft_logits = false;  // return head 1's logits only; DraftLogits gives heads 2..n
                                      // at the one position that is needed (saves LM-head rows)
  };
  std::unique_ptr<DecodeState> NewDecodeState(int64_t batch) const;
  std::vector<Tensor> DecodeStep(std::span<const int32_t> tokens, DecodeState* state, int64_t heads = 0);
  // Multi-token decoding step: `chunk` tokens per sequence, position-major (tokens[j * batch + b]
  // is sequence b's token at chunk position j). Returns per head k the logits
  // [chunk * batch, vocab], same row order (or [batch, vocab] with last_position_only). Equals
  // `chunk` DecodeStep calls (same numbers up to summation order) but runs every weight once
  // over all chunk * batch rows (one GEMM instead of `chunk` GEMVs; the LM head once for all
  // heads); the cells and attention run position by position inside each block.
  std::vector<Tensor> DecodeChunk(std::span<const int32_t> tokens, int64_t chunk, DecodeState* state,
                                  const DecodeOptions& options);
  // After a DecodeChunk with rewindable = true: keep only its first `keep` positions (1..chunk)
  // in every sequence, exactly as if only those tokens had been fed (KV caches truncated,
  // recurrent states and conv windows restored from the copies made after position keep - 1).
  // InvalidArgument when keep is out of range; FailedPrecondition without such a chunk.
  absl::Status Rewind(DecodeState* state, int64_t keep);
  // After a DecodeChunk with defer_draft_logits: heads 2..n's logits [batch, vocab] at chunk
  // position `position` (one LM-head GEMM over (n - 1) * batch rows).
  std::vector<Tensor> DraftLogits(const DecodeState& state, int64_t position);

  // model.xlstm.mlstm_recompute_keep_last = -1 ("auto"): after the second ForwardBackward on CUDA
  // (every layer recomputed; AdamW's state exists by then), the last layers (MTP head blocks, then
  // the trunk from its end, as keep_last counts them) that fit the device memory left above that
  // step's peak keep everything from the next step on (ops/recompute_budget.h). The count; -1
  // until then, or when auto is off.
  int64_t auto_kept_layers() const { return auto_kept_layers_; }

  // The LM head's parameter [V, d] (fp32 master): lm_head.weight, or the embedding when tied.
  const Parameter& HeadParameter() const;

  // SelfExtend for inference on attention blocks (0 = off).
  void SetSelfExtend(int64_t group, int64_t window);
  CrossEntropyOptions& cross_entropy_options() { return ce_options_; }
  // Called by ForwardBackward (data-parallel overlap, step-time breakdown): with "" when backward
  // begins (before the fused LM-head loss), then with a parameter-name prefix whenever that group's
  // gradients are final (stale ones of the deferred-zero rule already zeroed, ops/module.h):
  // each head block, "final_norm" and "lm_head" after the heads, each trunk block "blocks.<i>"
  // in reverse order, "embedding" last.
  std::function<void(const std::string& group)> grad_ready_hook;

 private:
  friend class DecodeGraph;        // captures DecodeEmbedded (ops/decode_graph.h)
  friend class SpeculativeGraph;  // captures a speculative round's DecodeEmbedded (ditto)
  LanguageModel(const ModelSpec& spec, DType dtype, Device device);
  // DecodeChunk after the embedding: z [chunk * batch, d] the embedded tokens, heads 1..
  // state->live_heads (DecodeChunk has set it from options.heads).
  std::vector<Tensor> DecodeEmbedded(Tensor z, int64_t chunk, DecodeState* state, const DecodeOptions& options);
  absl::Status Build(uint64_t seed);
  Tensor TrunkForward(std::span<const int32_t> tokens, int64_t batch, int64_t seq);
  std::vector<int32_t> HeadTargets(std::span<const int32_t> tokens, int64_t batch, int64_t seq, int k) const;
  const Tensor& HeadWeight() const;
  // The head's gradient under the deferred-zero rule: with `overwrite`, *overwrite says whether
  // the caller's first write must overwrite it (FirstGradWrite); without, a stale one is zeroed.
  Tensor& HeadGrad(bool* overwrite = nullptr);
  void ReleaseAll();
  // Parameters created since the store held `first` of them (a block's, the final norm's).
  std::vector<Parameter*> ParamsSince(size_t first);

  ModelSpec spec_;
  std::unique_ptr<ParamStore> store_;
  std::unique_ptr<Rng> rng_;
  std::unique_ptr<Embedding> embedding_;
  std::vector<std::unique_ptr<Block>> trunk_;
  std::vector<std::unique_ptr<Block>> heads_;
  std::unique_ptr<Norm> final_norm_;
  int64_t training_passes_ = 0;    // ForwardBackward calls (keep_last auto decides after the second)
  int64_t auto_kept_layers_ = -1;
  void FitRecomputeToMemory();
  Parameter* head_weight_ = nullptr;  // untied head; null when tied to the embedding
  // Each block's and the final norm's parameters: the deferred-zero marks and the stale
  // gradients zeroed before a group is reported ready.
  std::vector<std::vector<Parameter*>> trunk_params_, head_params_;
  std::vector<Parameter*> final_norm_params_;
  CrossEntropyOptions ce_options_;
  // ForwardBackwardDeferred's heads (losses or deferred slots), until TakeLoss.
  std::vector<CrossEntropyResult> pending_heads_;
  bool loss_pending_ = false;
};

// Factory for one block of `type` (layer index `layer` of `n_layers`), defined in blocks.cc.
absl::StatusOr<std::unique_ptr<Block>> MakeBlock(BlockType type, const BuildContext& ctx,
                                                 const ModelSpec& spec, int64_t layer, int64_t n_layers);

// Per-row argmax of logits [rows, V] (the lowest index on ties) on any device: CUDA logits are
// reduced on the device and only the ids are copied back (greedy / speculative decoding).
std::vector<int32_t> ArgmaxRows(const Tensor& logits);
// The argmax of row 0 of each of `logits` (e.g. the draft heads' logits at one position), in
// order. CUDA logits: one launch per tensor into one id buffer and ONE copy back, so k draft
// heads cost one host synchronisation instead of k.
std::vector<int32_t> ArgmaxFirstRows(std::span<const Tensor> logits);

// Parameter count of a spec, computed by building it on the meta device (no memory).
absl::StatusOr<int64_t> CountParameters(const ModelSpec& spec);

}  // namespace gyre::ops
