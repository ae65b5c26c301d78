// Llama (Transformer++) block [M1 App. E.2; MODELS.md §4.4]: pre-norm RMSNorm, causal RoPE
// attention (GQA), pre-norm RMSNorm, SwiGLU MLP, no biases:
//   x <- x + Attn(RMSNorm(x));  x <- x + SwiGLU(RMSNorm(x))
// Also the attention layer of hybrids.
#pragma once

#include "ops/attention.h"
#include "ops/block.h"
#include "ops/layers.h"
#include "ops/model_config.h"

namespace gyre::ops {

class LlamaBlock : public Block {
 public:
  // `layer` and `n_layers` scale the residual-output projections' init (GPT-2 / mamba_ssm
  // `_init_weights`: std 0.02 / sqrt(2 * n_layers)).
  LlamaBlock(const BuildContext& ctx, const ModelSpec& spec, int64_t n_layers);
  Tensor Forward(const Tensor& x, int64_t batch, int64_t seq) override;
  Tensor Backward(const Tensor& dy) override;
  void ReleaseActivations() override;
  SelfAttention& attention() { return attn_; }

 private:
  Norm attn_norm_;
  SelfAttention attn_;
  Norm mlp_norm_;
  GatedMlp mlp_;
};

}  // namespace gyre::ops
