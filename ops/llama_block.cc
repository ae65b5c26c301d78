#include "ops/llama_block.h"

#include <cmath>

#include "ops/cuda_infer.h"
#include "ops/recurrent_blocks.h"

namespace gyre::ops {
namespace {

AttentionOptions OptionsFrom(const ModelSpec& s) {
  return {s.attn_heads,      s.attn_kv_heads, s.attn_head_dim, s.rope_theta, 0, 0,
          s.attn_rotary_dim, s.deterministic};
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
  if (IsCuda(x)) {
    // h = x + attn(...) is written by the MLP norm's fused residual kernel; h + mlp(...) by the
    // down projection's GEMM (beta = 1 on h).
    Tensor h;
    Tensor y = mlp_norm_.ForwardAdd(attn_.Forward(attn_norm_.Forward(x), batch, seq), x, &h);
    return mlp_.ForwardAdd(y, h);
  }
  Tensor h = Add(x, attn_.Forward(attn_norm_.Forward(x), batch, seq));
  return Add(h, mlp_.Forward(mlp_norm_.Forward(h)));
}

Tensor LlamaBlock::Backward(const Tensor& dy) {
  if (IsCuda(dy)) {
    // The residual gradients are added inside the norms' backward kernels.
    Tensor dh = mlp_norm_.BackwardAdd(mlp_.Backward(dy), dy);
    return attn_norm_.BackwardAdd(attn_.Backward(dh), dh);
  }
  Tensor dh = Add(dy, mlp_norm_.Backward(mlp_.Backward(dy)));
  return Add(dh, attn_norm_.Backward(attn_.Backward(dh)));
}

void LlamaBlock::ReleaseActivations() {
  attn_norm_.ReleaseActivations();
  attn_.ReleaseActivations();
  mlp_norm_.ReleaseActivations();
  mlp_.ReleaseActivations();
}

AttentionMixerBlock::AttentionMixerBlock(const BuildContext& ctx, const ModelSpec& spec, int64_t n_layers)
    : options_(OptionsFrom(spec)),
      q_dim_(spec.attn_heads * spec.attn_head_dim),
      kv_dim_(spec.attn_kv_heads * spec.attn_head_dim),
      norm_(ctx.Sub("norm"), spec.d_model, {NormOptions::kRms, 1, spec.norm_eps}),
      in_proj_(ctx.Sub("in_proj"), spec.d_model, q_dim_ + 2 * kv_dim_, false),
      out_proj_(ctx.Sub("out_proj"), q_dim_, spec.d_model, false) {
  if (spec.attn_qkv_conv > 0) {
    conv_ = std::make_unique<CausalConv1d>(ctx.Sub("conv1d"), q_dim_ + 2 * kv_dim_, spec.attn_qkv_conv, /*silu=*/false);
  }
  // mamba_ssm `_init_weights` with rescale_prenorm_residual (n_residuals_per_layer = 1 without
  // MLP): out_proj kaiming-uniform(a = sqrt 5) / sqrt(n_layer); in_proj PyTorch default.
  const double bound = 1.0 / std::sqrt(static_cast<double>(q_dim_)) / std::sqrt(static_cast<double>(n_layers));
  InitUniform(&out_proj_.weight()->value, -bound, bound, ctx.rng);
}

AttentionMixerBlock::~AttentionMixerBlock() = default;

Tensor AttentionMixerBlock::Forward(const Tensor& x, int64_t batch, int64_t seq) {
  Tensor qkv = in_proj_.Forward(norm_.Forward(x));
  if (conv_) qkv = conv_->Forward(qkv, batch, seq);
  Tensor q = SliceColumns(qkv, 0, q_dim_);
  Tensor k = SliceColumns(qkv, q_dim_, q_dim_ + kv_dim_);
  Tensor v = SliceColumns(qkv, q_dim_ + kv_dim_, q_dim_ + 2 * kv_dim_);
  Tensor a = CausalAttentionForward(q, k, v, batch, seq, options_, &saved_);
  return Add(x, out_proj_.Forward(a));
}

Tensor AttentionMixerBlock::Backward(const Tensor& dy) {
  Tensor da = out_proj_.Backward(dy);
  Tensor dq, dk, dv;
  CausalAttentionBackward(saved_, da, options_, &dq, &dk, &dv);
  saved_ = AttentionSaved();
  Tensor dqkv = ConcatColumns({dq, dk, dv});
  if (conv_) dqkv = conv_->Backward(dqkv);
  return Add(dy, norm_.Backward(in_proj_.Backward(dqkv)));
}

void AttentionMixerBlock::ReleaseActivations() {
  saved_ = AttentionSaved();
  norm_.ReleaseActivations();
  in_proj_.ReleaseActivations();
  if (conv_) conv_->ReleaseActivations();
  out_proj_.ReleaseActivations();
}

namespace {

struct KvState : BlockState {
  KvCache cache;
  Tensor conv;  // [B, K-1, q+2kv] for the mixer's qkv conv
  int64_t length_before_chunk = -1;  // cache length before the last rewindable chunk
  StateHistory conv_history;
  // A decode graph replays a step at a device-held position (ops/decode_graph.h): the cache
  // buffers and the conv window are what it checks for moves (a Grow makes new buffers).
  std::vector<const Tensor*> StepTensors() const override {
    return {&cache.cuda_k, &cache.cuda_v, &cache.cuda_k_grouped, &conv};
  }
  KvCache* AttentionCache() override { return &cache; }
  // The mixer's conv window (a Llama block has none); the cache itself rewinds by its length.
  std::vector<RewindSlot> TakeRewindSlots() override {
    if (!conv.defined()) return {};
    return conv_history.Take({&conv});
  }
};

void RewindKv(KvState* st, int64_t keep) {
  GYRE_CHECK(st->length_before_chunk >= 0 && keep >= 1 &&
                 st->length_before_chunk + keep <= st->cache.length(),
             "rewind to %ld without a rewindable chunk", (long)keep);
  TruncateKvCache(&st->cache, st->length_before_chunk + keep);
  if (st->conv.defined()) st->conv_history.Restore(keep, {&st->conv});
  st->length_before_chunk = -1;
}

}  // namespace

std::unique_ptr<BlockState> LlamaBlock::NewState(int64_t) const { return std::make_unique<KvState>(); }

Tensor LlamaBlock::StepChunk(const Tensor& x, int64_t chunk, BlockState* state, bool rewindable) {
  auto* st = static_cast<KvState*>(state);
  st->length_before_chunk = rewindable ? st->cache.length() : -1;
  Tensor h = Add(x, attn_.StepChunk(attn_norm_.Forward(x), chunk, &st->cache).Reshape(x.shape()));
  Tensor y = Add(h, mlp_.Forward(mlp_norm_.Forward(h)));
  ReleaseActivations();
  return y;
}

void LlamaBlock::Rewind(BlockState* state, int64_t keep) { RewindKv(static_cast<KvState*>(state), keep); }

std::unique_ptr<BlockState> AttentionMixerBlock::NewState(int64_t batch) const {
  auto st = std::make_unique<KvState>();
  if (conv_) st->conv = Tensor::Zeros({batch, conv_->width() - 1, conv_->channels()}, out_proj_.weight()->value.dtype());
  return st;
}

Tensor AttentionMixerBlock::StepChunk(const Tensor& x, int64_t chunk, BlockState* state, bool rewindable) {
  auto* st = static_cast<KvState*>(state);
  st->length_before_chunk = rewindable ? st->cache.length() : -1;
  st->conv_history.Clear();
  Tensor qkv = in_proj_.Forward(norm_.Forward(x));
  if (conv_) qkv = conv_->StepChunk(qkv, chunk, &st->conv, rewindable ? &st->conv_history : nullptr);
  // With the one-launch appends + RoPE (GYRE_DECODE_ROPE_APPEND=1) the kernel reads q, k, v in
  // place: no column copies (the same bits).
  Tensor a = IsCuda(qkv) && DecodeRopeAppendOneLaunch()
                 ? CausalAttentionDecodeChunkPacked(qkv, chunk, options_, &st->cache)
                 : CausalAttentionDecodeChunk(SliceColumns(qkv, 0, q_dim_), SliceColumns(qkv, q_dim_, q_dim_ + kv_dim_),
                                              SliceColumns(qkv, q_dim_ + kv_dim_, q_dim_ + 2 * kv_dim_), chunk,
                                              options_, &st->cache);
  Tensor y = Add(x, out_proj_.Forward(a).Reshape(x.shape()));
  ReleaseActivations();
  return y;
}

void AttentionMixerBlock::Rewind(BlockState* state, int64_t keep) { RewindKv(static_cast<KvState*>(state), keep); }

}  // namespace gyre::ops
