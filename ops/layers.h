// Basic layers with explicit forward/backward (module.h states the gradient contract).
// Activations are [..., features] row-major; layers treat them as [rows, features].
// Each layer saves what backward needs in Forward and is not reentrant: one forward, then at most
// one backward, per saved activation set. Not thread-safe.
#pragma once

#include <cstdint>
#include <span>
#include <string>

#include "ops/elementwise.h"
#include "ops/module.h"

namespace gyre::ops {

// Token embedding: ids [rows] -> [rows, dim]. Weight [vocab, dim] (ParamKind::kEmbedding).
class Embedding {
 public:
  Embedding(const BuildContext& ctx, int64_t vocab, int64_t dim);
  Tensor Forward(std::span<const int32_t> ids);
  // Accumulates into the weight gradient; there is no input gradient.
  void Backward(const Tensor& dy);
  void ReleaseActivations() { ids_.clear(); }
  Parameter* weight() { return weight_; }

 private:
  Parameter* weight_;
  std::vector<int32_t> ids_;
};

// y = x Wᵀ (+ b). W [out, in].
class Linear {
 public:
  Linear(const BuildContext& ctx, int64_t in, int64_t out, bool bias);
  Tensor Forward(const Tensor& x);
  // residual + Forward(x); on CUDA (no bias) the add is fused into the GEMM's store.
  Tensor ForwardAdd(const Tensor& x, const Tensor& residual);
  Tensor Backward(const Tensor& dy);
  void ReleaseActivations() { x_ = Tensor(); }
  Parameter* weight() { return weight_; }
  const Parameter* weight() const { return weight_; }
  Parameter* bias() { return bias_; }
  int64_t in() const { return in_; }
  int64_t out() const { return out_; }

 private:
  int64_t in_, out_;
  Parameter* weight_;
  Parameter* bias_ = nullptr;
  Tensor x_;
};

// Block-diagonal linear map: `blocks` independent [block_out, block_in] matrices; input feature
// block b maps to output block b. Weight [blocks, block_out, block_in], no bias (xLSTM q/k/v
// projections with 4x4 blocks, sLSTM per-head gate input weights).
class BlockDiagonalLinear {
 public:
  BlockDiagonalLinear(const BuildContext& ctx, int64_t blocks, int64_t block_in, int64_t block_out);
  Tensor Forward(const Tensor& x);
  Tensor Backward(const Tensor& dy);
  void ReleaseActivations() { x_ = Tensor(); }
  Parameter* weight() { return weight_; }

 private:
  int64_t blocks_, block_in_, block_out_;
  Parameter* weight_;
  Tensor x_;
};

// Functional linear with an external weight (tied heads, tests): y = x Wᵀ; backward returns dx
// and accumulates dW.
Tensor LinearForward(const Tensor& x, const Tensor& w);
// residual + x Wᵀ (residual [rows, out]); on CUDA one GEMM with the add in its store (rounded
// once to bf16), elsewhere Add(residual, LinearForward(x, w)).
Tensor LinearForwardAdd(const Tensor& x, const Tensor& w, const Tensor& residual);
Tensor LinearBackward(const Tensor& x, const Tensor& w, const Tensor& dy, Tensor* dw, bool dw_overwrite = false);

struct NormOptions {
  enum Kind { kRms, kLayer } kind = kRms;
  int64_t groups = 1;          // normalise each of `groups` equal slices of the features
  double eps = 1e-5;
  bool bias = false;           // LayerNorm only
  double weight_offset = 0.0;  // scale = weight + offset (xLSTM stores 1+w with w init 0)
  bool weight = true;          // false: no learnable scale
};

// RMSNorm / LayerNorm / GroupNorm (per-head norm) over the last dimension.
class Norm {
 public:
  Norm(const BuildContext& ctx, int64_t dim, NormOptions options);
  Tensor Forward(const Tensor& x);
  Tensor Backward(const Tensor& dy);
  // Residual variants (one fused kernel on CUDA): *sum = x + residual, returns Norm(*sum); and
  // Backward(dy) + dresidual (the gradient arriving along the residual stream).
  Tensor ForwardAdd(const Tensor& x, const Tensor& residual, Tensor* sum);
  Tensor BackwardAdd(const Tensor& dy, const Tensor& dresidual);
  void ReleaseActivations() { x_ = Tensor(); rstd_ = Tensor(); mean_ = Tensor(); }
  Parameter* weight() { return weight_; }

 private:
  int64_t dim_;
  NormOptions opt_;
  Parameter* weight_ = nullptr;
  Parameter* bias_ = nullptr;
  Tensor ForwardGroupedCuda(const Tensor& x);
  Tensor BackwardGroupedCuda(const Tensor& dy, const Tensor* dresidual = nullptr);  // dx (+ dresidual)
  // The deferred-zero rule (ops/module.h) for weight and bias together.
  bool FirstParamGradWrite();
  void ZeroStaleParamGrads();
  Tensor x_, rstd_;  // rstd_ [rows, groups] (f64 for accuracy; CUDA: f32 [rows · groups])
  Tensor mean_;      // CUDA LayerNorm: f32 [rows]
};

// Gated MLP: y = W_down( act(W_gate x) ⊙ W_up x ), no biases. SwiGLU (act = SiLU; Llama) and the
// sLSTM block's GeLU-gated FFN (act = GELU). On CUDA, when the gate and up weights lie back to
// back in the store's flat buffers, they are one [2 hidden, dim] GEMM (and one dX / dW GEMM).
class GatedMlp {
 public:
  GatedMlp(const BuildContext& ctx, int64_t dim, int64_t hidden, Activation act);
  Tensor Forward(const Tensor& x);
  // residual + Forward(x) (the block's residual stream); on CUDA fused into the down GEMM.
  Tensor ForwardAdd(const Tensor& x, const Tensor& residual);
  Tensor Backward(const Tensor& dy);
  void ReleaseActivations();
  Linear& gate() { return gate_; }
  Linear& up() { return up_; }
  Linear& down() { return down_; }

 private:
  Tensor ForwardImpl(const Tensor& x, const Tensor* residual);
  Activation act_;
  const ParamStore* store_;
  Linear gate_, up_, down_;
  Tensor g_, u_, a_;  // gate pre-activation, up, act(gate); CUDA fused: g_ = [gate | up]
  Tensor x_;          // CUDA fused path: the input
};

}  // namespace gyre::ops
