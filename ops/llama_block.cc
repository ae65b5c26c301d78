#include "ops/llama_block.h"

#include <cmath>

namespace gyre::ops {
namespace {

AttentionOptions OptionsFrom(const ModelSpec& s) {
  return {s.attn_heads, s.attn_kv_heads, s.attn_head_dim, s.rope_theta, 0, 0};
}

}  // namespace

LlamaBlock::LlamaBlock(const BuildContext& ctx, const ModelSpec& spec, int64_t n_layers)
    : attn_norm_(ctx.Sub("attn_norm"), spec.d_model, {NormOptions::kRms, 1, spec.norm_eps}),
      attn_(ctx.Sub("attn"), spec.d_model, OptionsFrom(spec)),
      mlp_norm_(ctx.Sub("mlp_norm"), spec.d_model, {NormOptions::kRms, 1, spec.norm_eps}),
      mlp_(ctx.Sub("mlp"), spec.d_model, spec.ffn_dim, Activation::kSilu) {
  // Transformer++ init as in mamba_ssm's `_init_weights` (used for its Transformer++ baselines):
  // N(0, 0.02) for every linear, residual-output projections divided by sqrt(2 * n_layers).
  const double out_std = 0.02 / std::sqrt(2.0 * static_cast<double>(n_layers));
  for (Linear* l : {&mlp_.gate(), &mlp_.up()}) InitNormal(&l->weight()->value, 0.02, ctx.rng);
  InitNormal(&mlp_.down().weight()->value, out_std, ctx.rng);
  InitNormal(&attn_.o_proj().weight()->value, out_std, ctx.rng);
  for (const char* name : {"attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight"}) {
    InitNormal(&ctx.store->Find(ctx.Name(name))->value, 0.02, ctx.rng);
  }
}

Tensor LlamaBlock::Forward(const Tensor& x, int64_t batch, int64_t seq) {
  Tensor h = Add(x, attn_.Forward(attn_norm_.Forward(x), batch, seq));
  return Add(h, mlp_.Forward(mlp_norm_.Forward(h)));
}

Tensor LlamaBlock::Backward(const Tensor& dy) {
  Tensor dh = Add(dy, mlp_norm_.Backward(mlp_.Backward(dy)));
  return Add(dh, attn_norm_.Backward(attn_.Backward(dh)));
}

void LlamaBlock::ReleaseActivations() {
  attn_norm_.ReleaseActivations();
  attn_.ReleaseActivations();
  mlp_norm_.ReleaseActivations();
  mlp_.ReleaseActivations();
}

}  // namespace gyre::ops
