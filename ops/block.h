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

class Block {
 public:
  virtual ~Block() = default;
  virtual Tensor Forward(const Tensor& x, int64_t batch, int64_t seq) = 0;
  virtual Tensor Backward(const Tensor& dy) = 0;
  virtual void ReleaseActivations() = 0;
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
  Block* inner() { return inner_.get(); }

 private:
  std::unique_ptr<Block> inner_;
  Tensor x_;
  int64_t batch_ = 0, seq_ = 0;
};

}  // namespace gyre::ops
