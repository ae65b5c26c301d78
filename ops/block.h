// A residual block: the unit models are stacked from (DESIGN.md section 6).
// Forward maps the residual stream x [B, T, d] to x + f(x) (the residual add is inside the
// block); Backward maps d(out) to d(x) (including the identity path) and accumulates parameter
// gradients. `RecomputeBlock` wraps any block to keep only its input between forward and
// backward and rerun the forward just before the backward (activation recomputation).
#pragma once

#include <cstdint>
#include <memory>

#include "ops/tensor.h"

namespace gyre::ops {

// Incremental-decoding state of one block for a batch of sequences (recurrent states, conv
// windows, key/value cache). Owned by the caller; one per block.
struct BlockState {
  virtual ~BlockState() = default;
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
  virtual Tensor Step(const Tensor& x, BlockState* state) = 0;
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
  Tensor Step(const Tensor& x, BlockState* state) override { return inner_->Step(x, state); }
  Block* inner() { return inner_.get(); }

 private:
  std::unique_ptr<Block> inner_;
  Tensor x_;
  int64_t batch_ = 0, seq_ = 0;
};

}  // namespace gyre::ops
