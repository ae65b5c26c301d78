// Model presets and the resolution of a `gyre.v1.ModelConfig` (preset + explicit overrides) into
// a fully specified `ModelSpec` that the model builder consumes. Every preset cites the table it
// comes from (MODELS.md). `ResolveModelConfig` validates and names the offending field
// ("model.attention.num_heads ...") in its error.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "gyre/v1/config.pb.h"

namespace gyre::ops {

enum class BlockType { kMlstm, kSlstm, kMamba2, kAttention, kXlstmLarge };
const char* BlockTypeName(BlockType type);

enum class Family { kLlama, kXlstm, kMamba2, kXlstmLarge };

struct ModelSpec {
  std::string preset;
  std::string source;  // where the sizes come from
  Family family = Family::kLlama;
  int64_t d_model = 0;
  int64_t vocab_size = 0;           // padded
  std::vector<BlockType> blocks;    // one per layer (the trunk plus, with MTP, the heads)
  bool tie_embeddings = false;
  int64_t mtp_heads = 1;            // 1 = ordinary next-token model
  bool recompute_blocks = false;
  double norm_eps = 1e-5;

  // xLSTM v1 blocks (MODELS.md §1.4, §2).
  int64_t mlstm_heads = 4;
  int64_t mlstm_inner = 0;          // p = 64 * ceil(proj_factor * d / 64)
  int64_t conv_kernel = 4;
  int64_t qkv_block_size = 4;
  int64_t slstm_heads = 4;
  int64_t slstm_ffn = 0;            // 64 * ceil(proj_factor_slstm * d / 64)
  int64_t mlstm_chunk = 64;
  std::string mlstm_recompute = "none";  // XlstmConfig.mlstm_recompute: none, states, glue, cell
  int64_t mlstm_recompute_keep_last = 0;  // XlstmConfig.mlstm_recompute_keep_last (-1: auto)
  bool mlstm_sigmoid_forget = true;

  // xLSTM Large / 7B blocks (MODELS.md §1.5; ops/xlstm_large_block.h). The chunk length is
  // mlstm_chunk, the SwiGLU hidden size ffn_dim (64 * ceil(xl_ffn_factor * d / 64)), the norms'
  // eps norm_eps (1e-6 for this family).
  int64_t xl_heads = 8;
  int64_t xl_qk_dim = 0;            // q, k width (all heads): d / 2 for the published models
  int64_t xl_v_dim = 0;             // v, o, h width: d
  double xl_ffn_factor = 2.667;     // MODELS.md §1.5 (the xlstm repo writes 2.6667: same widths)
  double gate_soft_cap = 15.0;      // ĩ, f̃ = cap · tanh(pre / cap); 0 = off

  // The LM head's logits cap · tanh(l / cap) (xLSTM Large: 30); 0 = off, the default of every
  // other family. Applied in the loss (ops/cross_entropy.h) and in Logits / decoding.
  double logit_soft_cap = 0.0;

  // Mamba-2 (MODELS.md §4.3).
  int64_t ssm_state = 128;
  int64_t ssm_conv = 4;
  int64_t ssm_expand = 2;
  int64_t ssm_head_dim = 64;
  int64_t ssm_groups = 1;
  int64_t ssm_chunk = 256;

  // Attention blocks (Llama / Transformer++; hybrids).
  int64_t attn_heads = 0;
  int64_t attn_kv_heads = 0;
  int64_t attn_head_dim = 0;
  double rope_theta = 10000.0;
  int64_t ffn_dim = 0;
  int64_t self_extend_group = 0;
  int64_t self_extend_window = 0;
  // Mamba-2-Attention hybrids' attention layer (MODELS.md §4.4, [ms] MHA): no MLP, a causal
  // depthwise conv over the fused qkv, rotary on part of each head. Preset-only for now:
  // ModelConfig has no fields for these (see the report).
  bool attn_mlp = true;        // false: attention-only mixer layer
  int64_t attn_qkv_conv = 0;   // conv width over qkv; 0 = none
  int64_t attn_rotary_dim = 0; // 0 = the whole head

  // Not part of the model's shape: TrainConfig.deterministic, set by the worker (replica.cc).
  // CUDA attention then sums dQ in a fixed order (bitwise-repeatable steps, slower backward).
  bool deterministic = false;

  int64_t n_layers() const { return static_cast<int64_t>(blocks.size()); }
  // The ordinary model has n_layers blocks. With multi-token prediction the first n_layers - 1
  // form the shared trunk and each of the mtp_heads heads is one more block of the last layer's
  // kind (so mtp_heads = 1 is exactly the ordinary model; MODELS.md §5: n - 1 extra layers).
  int64_t trunk_layers() const { return n_layers() - 1; }
};

// Names of all built-in presets.
std::vector<std::string> PresetNames();

// Preset + overrides -> validated spec. Errors name the field path.
// Override rules: non-zero scalar fields replace the preset's; `d_model` also re-derives the
// widths that follow from it (mLSTM inner 64*ceil(2d/64), sLSTM FFN 64*ceil(1.3d/64), SwiGLU
// 64*ceil(8d/3/64)); an `n_layers` that differs from the preset's resets the block pattern to
// the family's base block (give slstm_at / attention_at / blocks to place others); `vocab_size`
// is padded to `pad_vocab_to` (default 64) while preset vocabularies are used as published
// (50304 xLSTM/Llama, 50288 Mamba-2). The attention-only mixer, rotary dim and qkv conv of the
// Mamba-2-Attention presets have no config field yet (preset-only).
absl::StatusOr<ModelSpec> ResolveModelConfig(const gyre::v1::ModelConfig& config);

// Convenience: ResolveModelConfig of a config holding only `preset`.
absl::StatusOr<ModelSpec> PresetSpec(const std::string& preset);

// A one-line description ("llama-125m: 12 layers d=768 ...").
std::string DescribeSpec(const ModelSpec& spec);

}  // namespace gyre::ops
