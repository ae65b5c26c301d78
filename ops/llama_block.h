// Llama (Transformer++) block [M1 App. E.2; MODELS.md §4.4]: pre-norm RMSNorm, causal RoPE
// attention (GQA), pre-norm RMSNorm, SwiGLU MLP, no biases:
//   x <- x + Attn(RMSNorm(x));  x <- x + SwiGLU(RMSNorm(x))
// Also the attention layer of hybrids.
#pragma once

#include <memory>

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
  std::unique_ptr<BlockState> NewState(int64_t batch) const override;
  Tensor StepChunk(const Tensor& x, int64_t chunk, BlockState* state, bool rewindable) override;
  void Rewind(BlockState* state, int64_t keep) override;
  bool FollowsDeferredZero() const override { return true; }
  SelfAttention& attention() { return attn_; }

 private:
  Norm attn_norm_;
  SelfAttention attn_;
  Norm mlp_norm_;
  GatedMlp mlp_;
};

// Attention-only mixer layer of the Mamba-2-Attention hybrids ([ms] modules/mha.py inside a
// mamba_ssm Block without MLP): x <- x + out_proj(Attn(conv_k(W_qkv RMSNorm(x)))), the conv a
// causal depthwise conv over the fused q|k|v (with bias, no activation; skipped when width 0),
// RoPE on the first rotary_dim features of each head, no biases elsewhere.
class AttentionMixerBlock : public Block {
 public:
  AttentionMixerBlock(const BuildContext& ctx, const ModelSpec& spec, int64_t n_layers);
  ~AttentionMixerBlock() override;
  Tensor Forward(const Tensor& x, int64_t batch, int64_t seq) override;
  Tensor Backward(const Tensor& dy) override;
  void ReleaseActivations() override;
  std::unique_ptr<BlockState> NewState(int64_t batch) const override;
  Tensor StepChunk(const Tensor& x, int64_t chunk, BlockState* state, bool rewindable) override;
  void Rewind(BlockState* state, int64_t keep) override;
  // Every writer follows the rule, the qkv conv (ops/recurrent_blocks.cc CausalConv1d) included:
  // it overwrites dw, dbias on the step's first write (CUDA) or zeroes them first (CPU).
  bool FollowsDeferredZero() const override { return true; }
  void SetSelfExtend(int64_t group, int64_t window) {
    options_.self_extend_group = group;
    options_.self_extend_window = window;
  }

 private:
  AttentionOptions options_;
  int64_t q_dim_, kv_dim_;
  Norm norm_;
  Linear in_proj_;
  std::unique_ptr<class CausalConv1d> conv_;
  Linear out_proj_;
  AttentionSaved saved_;
};

}  // namespace gyre::ops
