// A residual block: the unit models are stacked from (DESIGN.md section 6).
// Forward maps the residual stream x [B, T, d] to x + f(x) (the residual add is inside the
// block); Backward maps d(out) to d(x) (including the identity path) and accumulates parameter
// gradients. `RecomputeBlock` wraps any block to keep only its input between forward and
// backward and rerun the forward just before the backward (activation recomputation).
#pragma once

#include <cstdint>
#include <initializer_list>
#include <memory>
#include <vector>

#include "ops/tensor.h"

namespace gyre::ops {

struct KvCache;  // ops/attention.h

// One state tensor of a block and its copies after each position of the last rewindable chunk
// but its last (after[j]: the state after chunk position j). A speculative decode graph
// (ops/decode_graph.h SpeculativeGraph) takes them after its capture: the replays write those
// copies to the same addresses every round, and its commit copies after[keep - 1] into *live in
// place instead of swapping handles as Block::Rewind does.
struct RewindSlot {
  Tensor* live = nullptr;
  std::vector<Tensor> after;
};

// Incremental-decoding state of one block for a batch of sequences (recurrent states, conv
// windows, key/value cache). Owned by the caller; one per block.
struct BlockState {
  virtual ~BlockState() = default;
  // The tensors a step advances (recurrent states, conv windows), for a decode graph's check
  // that nothing swapped them since its capture (ops/decode_graph.h). Empty: a state a graph
  // cannot replay (a KV cache grows with the position).
  virtual std::vector<const Tensor*> StepTensors() const { return {}; }
  // The KV cache of an attention block's state (a decode graph reads and advances its length
  // on the device, ops/decode_graph.h); null for every other state.
  virtual KvCache* AttentionCache() { return nullptr; }
  // After a rewindable StepChunk: every state tensor a Rewind restores, with its per-position
  // copies, moved out of the state (its histories are empty afterwards, so Block::Rewind cannot
  // swap the live tensors any more). Empty: nothing to restore (a KV cache without a conv window:
  // a rewind only truncates its length).
  virtual std::vector<RewindSlot> TakeRewindSlots() { return {}; }
};

// Copies of some state tensors after each position of a chunk but its last (Block::StepChunk
// with `rewindable`), so Block::Rewind can restore the state after position keep - 1 by swapping
// tensor handles (no recomputation). Works on CPU and CUDA tensors (Clone is a device copy,
// ordered on the compute stream). Adopt records tensors the caller already filled instead of
// cloning: the CUDA chunk kernels write every position's state into one buffer in the same
// launch (kernels/cuda/ssm_step.h), and the history holds views of it.
class StateHistory {
 public:
  void Clear() { after_.clear(); }
  int64_t size() const { return static_cast<int64_t>(after_.size()); }
  void Record(std::initializer_list<const Tensor*> state) {
    after_.emplace_back();
    for (const Tensor* t : state) after_.back().push_back(t->Clone());
  }
  void Adopt(std::vector<Tensor> state_after) { after_.push_back(std::move(state_after)); }
  // One slot per tensor of `state` (the order Record / Adopt used) holding its copies after each
  // recorded position; the history is empty afterwards.
  std::vector<RewindSlot> Take(std::initializer_list<Tensor*> state) {
    std::vector<RewindSlot> slots;
    size_t i = 0;
    for (Tensor* t : state) {
      RewindSlot slot;
      slot.live = t;
      for (std::vector<Tensor>& position : after_) {
        GYRE_CHECK(i < position.size(), "state history of %zu tensors, asked for %zu", position.size(), i + 1);
        slot.after.push_back(std::move(position[i]));
      }
      slots.push_back(std::move(slot));
      ++i;
    }
    Clear();
    return slots;
  }
  // keep in [1, size() + 1]; keep == size() + 1 is the live state (nothing to do).
  void Restore(int64_t keep, std::initializer_list<Tensor*> state) {
    GYRE_CHECK(keep >= 1 && keep <= size() + 1, "rewind to %ld of a %ld-position history", (long)keep,
               (long)size() + 1);
    if (keep <= size()) {
      size_t i = 0;
      for (Tensor* t : state) *t = after_[keep - 1][i++];
    }
    Clear();
  }

 private:
  std::vector<std::vector<Tensor>> after_;
};

class Block {
 public:
  virtual ~Block() = default;
  virtual Tensor Forward(const Tensor& x, int64_t batch, int64_t seq) = 0;
  virtual Tensor Backward(const Tensor& dy) = 0;
  virtual void ReleaseActivations() = 0;
  // Inference (no gradients): a fresh (zero) state for `batch` sequences, and one step that maps
  // the residual stream of the next token x [B, d] to the block's output [B, d], advancing the
  // state. Stepping through a sequence equals Forward on it (block_step_test).
  virtual std::unique_ptr<BlockState> NewState(int64_t batch) const = 0;
  Tensor Step(const Tensor& x, BlockState* state) { return StepChunk(x, 1, state, false); }
  // `chunk` tokens per sequence at once: x [chunk * B, d] position-major (row j * B + b is
  // sequence b at chunk position j) -> [chunk * B, d], advancing the state by `chunk` positions;
  // equals `chunk` Step calls. Row-wise layers (norms, projections, MLPs, LM head) run once over
  // all rows (one GEMM per weight); the cells (mLSTM, sLSTM, SSD, conv window, attention over the
  // KV cache) run position by position inside (on CUDA the recurrent cells step all positions in
  // one launch each: kernels/cuda/ssm_step.h). With `rewindable`, the per-position recurrent
  // states are kept until the next StepChunk so that Rewind can undo a suffix of this chunk.
  virtual Tensor StepChunk(const Tensor& x, int64_t chunk, BlockState* state, bool rewindable) = 0;
  // After a rewindable StepChunk of `chunk` positions: keep only the first `keep` (1..chunk), as if
  // only those had been fed (KV caches truncate; recurrent states and conv windows take the
  // copies made after position keep - 1). Exact: the state equals a fresh run over the kept prefix.
  virtual void Rewind(BlockState* state, int64_t keep) = 0;
  // True when every op that writes this block's parameter gradients follows the deferred-zero
  // rule (ops/module.h); the model then lets ParamStore::DeferZeroGrad skip their memset.
  virtual bool FollowsDeferredZero() const { return false; }
  // Memory for time (ops/recompute_budget.h): the device bytes this block's last training forward
  // freed by leaving work to its backward (0 for blocks that never do), and an order to stop doing
  // so from the next forward on (LanguageModel's keep_last "auto").
  virtual int64_t RecomputeFreedBytes() const { return 0; }
  virtual void KeepForBackward() {}
};

class RecomputeBlock : public Block {
 public:
  explicit RecomputeBlock(std::unique_ptr<Block> inner) : inner_(std::move(inner)) {}
  Tensor Forward(const Tensor& x, int64_t batch, int64_t seq) override {
    x_ = x;
    batch_ = batch;
    seq_ = seq;
    Tensor y = inner_->Forward(x, batch, seq);
    inner_->ReleaseActivations();
    return y;
  }
  Tensor Backward(const Tensor& dy) override {
    GYRE_CHECK(x_.defined(), "RecomputeBlock::Backward without Forward");
    inner_->Forward(x_, batch_, seq_);
    x_ = Tensor();
    return inner_->Backward(dy);
  }
  void ReleaseActivations() override {
    x_ = Tensor();
    inner_->ReleaseActivations();
  }
  std::unique_ptr<BlockState> NewState(int64_t batch) const override { return inner_->NewState(batch); }
  Tensor StepChunk(const Tensor& x, int64_t chunk, BlockState* state, bool rewindable) override {
    return inner_->StepChunk(x, chunk, state, rewindable);
  }
  void Rewind(BlockState* state, int64_t keep) override { inner_->Rewind(state, keep); }
  bool FollowsDeferredZero() const override { return inner_->FollowsDeferredZero(); }
  Block* inner() { return inner_.get(); }

 private:
  std::unique_ptr<Block> inner_;
  Tensor x_;
  int64_t batch_ = 0, seq_ = 0;
};

}  // namespace gyre::ops
