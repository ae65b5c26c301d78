#include "ops/model_config.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <map>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace gyre::ops {
namespace {

using gyre::v1::BlockKind;
using gyre::v1::ModelConfig;

int64_t RoundUp64(double x) { return 64 * static_cast<int64_t>(std::ceil(x / 64.0 - 1e-9)); }

// The xLSTM Large FFN width as transformers (and NX-AI xlstm_large) compute it:
// round_up_to_next_multiple_of(d · f, 64) = int(((d·f + 63) // 64) · 64) on a float, which is a
// ceiling only for whole d·f: at d 768, f 2.667 it gives 2048 (d·f = 2048.256; RoundUp64 gives
// 2112). The 7B (10944), xlstm-large-bench (5504) and the tiny preset (192) get the same either way;
// the 125m's count 162,303,840 = transformers' sum(p.numel()) (device call, session 21).
int64_t XlstmLargeFfnWidth(double factor, int64_t d) {
  return 64 * static_cast<int64_t>(std::floor((factor * static_cast<double>(d) + 63.0) / 64.0));
}

struct Preset {
  std::string source;
  std::function<void(ModelSpec*)> fill;
};

void Llama(ModelSpec* s, int64_t d, int64_t layers, int64_t heads, int64_t head_dim, int64_t vocab) {
  s->family = Family::kLlama;
  s->d_model = d;
  s->blocks.assign(layers, BlockType::kAttention);
  s->attn_heads = heads;
  s->attn_kv_heads = heads;
  s->attn_head_dim = head_dim;
  s->ffn_dim = RoundUp64(8.0 * d / 3.0);
  s->vocab_size = vocab;
  s->tie_embeddings = false;
}

// xLSTM v1, SlimPajama sizes. `slstm_at` empty = [1:0].
void Xlstm(ModelSpec* s, int64_t d, int64_t layers, std::vector<int64_t> slstm_at, int64_t vocab) {
  s->family = Family::kXlstm;
  s->d_model = d;
  s->blocks.assign(layers, BlockType::kMlstm);
  for (int64_t i : slstm_at) s->blocks[i] = BlockType::kSlstm;
  s->mlstm_heads = 4;
  s->mlstm_inner = RoundUp64(2.0 * d);
  s->slstm_heads = 4;
  s->slstm_ffn = RoundUp64(1.3 * d);  // MODELS.md §2: 1.3 reproduces the published counts
  // A compute knob, not part of the model: chunk 128 was 1.17x faster than 64 for the 125m cell
  // on the GPU and halves the saved chunk states (bench/RESULTS.md, helper mlstm5). Chunk 256
  // halves them again but adds an off-diagonal pass per chunk (kernels/cuda/mlstm_notes.md,
  // session 15): it loses where the states are small (head dim 384: cell +9%, step +4%; dk 256 /
  // dv 512: +9%) and wins where they dominate (head dim 1024, the 1.3B: cell −6%, step −3% on an
  // H100), so heads of 1024 and wider (1.3B, 2.7B) take 256.
  s->mlstm_chunk = s->mlstm_inner / s->mlstm_heads >= 1024 ? 256 : 128;
  // A memory knob, not part of the model: with heads of 1024 (1.3B, 2.7B) every layer keeping its
  // chunk states does not fit 4 x 2048 tokens on an 80 GB card, so these presets rebuild the states
  // in the backward ("states") and keep as many of the last layers whole as the device's memory
  // allows ("auto", decided after the second training pass; ops/MLSTM_MEMORY.md). Every mode is the
  // same step bit for bit; xlstm[1:0]-1.3b B4 on one H100: 29 of 48 layers kept, 310 ms a step
  // against 347 ms with every layer rebuilding (bench/RESULTS.md, session 18). A config's
  // model.xlstm.mlstm_recompute or model.recompute_blocks replaces this default (ApplyConfig).
  if (s->mlstm_inner / s->mlstm_heads >= 1024) {
    s->mlstm_recompute = "states";
    s->mlstm_recompute_keep_last = -1;
  }
  s->vocab_size = vocab;
  s->tie_embeddings = false;
}

void Mamba2(ModelSpec* s, int64_t d, int64_t layers, int64_t state, int64_t head_dim, int64_t chunk,
            int64_t vocab) {
  s->family = Family::kMamba2;
  s->d_model = d;
  s->blocks.assign(layers, BlockType::kMamba2);
  s->ssm_state = state;
  s->ssm_head_dim = head_dim;
  s->ssm_expand = 2;
  s->ssm_chunk = chunk;
  s->ssm_conv = 4;
  s->ssm_groups = 1;
  s->vocab_size = vocab;
  s->tie_embeddings = true;
  // Attention layers of hybrids (used only when attention_at is set).
  s->attn_head_dim = 64;
  s->attn_heads = d / 64;
  s->attn_kv_heads = d / 64;
  s->ffn_dim = RoundUp64(8.0 * d / 3.0);
}

// xLSTM Large (MODELS.md §1.5): all blocks kXlstmLarge; q, k d/2, v d; SwiGLU XlstmLargeFfnWidth(2.667, d);
// RMSNorms eps 1e-6; gate cap 15, logit cap 30; untied head.
void XlstmLarge(ModelSpec* s, int64_t d, int64_t layers, int64_t heads, int64_t vocab) {
  s->family = Family::kXlstmLarge;
  s->d_model = d;
  s->blocks.assign(layers, BlockType::kXlstmLarge);
  s->xl_heads = heads;
  s->xl_qk_dim = d / 2;
  s->xl_v_dim = d;
  s->xl_ffn_factor = 2.667;
  s->ffn_dim = XlstmLargeFfnWidth(s->xl_ffn_factor, d);
  s->gate_soft_cap = 15.0;
  s->logit_soft_cap = 30.0;
  s->norm_eps = 1e-6;
  s->mlstm_chunk = 64;  // [mk] backend default chunk
  s->vocab_size = vocab;
  s->tie_embeddings = false;
}

const std::vector<int64_t> kSlstm350 = {3, 5, 7, 40, 42, 44};

const std::map<std::string, Preset>& Presets() {
  static const auto* presets = new std::map<std::string, Preset>{
      // xLSTM paper 2405.04517 Table 7 / App. B.3 (MODELS.md §3); vocab 50304 (§8).
      {"xlstm[7:1]-125m", {"xLSTM paper Table 7 (125M, sLSTM at [3, 20])", [](ModelSpec* s) { Xlstm(s, 768, 24, {3, 20}, 50304); }}},
      {"xlstm[7:1]-350m", {"xLSTM paper Table 7 (350M)", [](ModelSpec* s) { Xlstm(s, 1024, 48, kSlstm350, 50304); }}},
      {"xlstm[7:1]-760m", {"xLSTM paper Table 7 (760M)", [](ModelSpec* s) { Xlstm(s, 1536, 48, kSlstm350, 50304); }}},
      {"xlstm[7:1]-1.3b", {"xLSTM paper Table 7 (1.3B)", [](ModelSpec* s) { Xlstm(s, 2048, 48, kSlstm350, 50304); }}},
      {"xlstm[1:0]-125m", {"xLSTM paper Table 7 (125M, mLSTM only)", [](ModelSpec* s) { Xlstm(s, 768, 24, {}, 50304); }}},
      {"xlstm[1:0]-350m", {"xLSTM paper Table 7 (350M, mLSTM only)", [](ModelSpec* s) { Xlstm(s, 1024, 48, {}, 50304); }}},
      {"xlstm[1:0]-760m", {"xLSTM paper Table 7 (760M, mLSTM only)", [](ModelSpec* s) { Xlstm(s, 1536, 48, {}, 50304); }}},
      {"xlstm[1:0]-1.3b", {"xLSTM paper Table 7 (1.3B, mLSTM only)", [](ModelSpec* s) { Xlstm(s, 2048, 48, {}, 50304); }}},
      // xLSTM Large / 7B (MODELS.md §1.5, §8: 6,865,424,896 parameters): NX-AI xlstm-jax 7B config
      // and transformers' xLSTMConfig defaults (d 4096, 32 blocks, 8 heads, vocab 50304).
      {"xlstm-7b", {"xLSTM 7B (MODELS.md §1.5: xlstm-jax config, HF xLSTMConfig)", [](ModelSpec* s) { XlstmLarge(s, 4096, 32, 8, 50304); }}},
      // Not a published model: the 7B's head dims (dk 256, dv 512) at d 2048 with 24 blocks (1.42B
      // parameters, the xLSTM 1.3B class), for recurrent_step_bench and the GPU tests.
      {"xlstm-large-bench", {"benchmark shape (7B head dims at d 2048, 24 blocks; not a published model)",
                             [](ModelSpec* s) { XlstmLarge(s, 2048, 24, 4, 50304); }}},
      // PERFORMANCE.md's "xlstm-125m (12 blocks, mLSTM only)" row (transformers xLSTM, 73,568 tok/s at
      // B16): xLSTMConfig(hidden_size=768, num_blocks=12, num_heads=4, vocab_size=50304, chunk_size=64),
      // every other field at xLSTMConfig's defaults (qk 0.5, v 1.0, FFN 2.667 -> 2048 by transformers'
      // rounding, caps 15 / 30, eps 1e-6, untied): dk 96, dv 192, 162,303,840 parameters, equal to
      // transformers' sum(p.numel()) of that model (ops/XLSTM_LARGE.md).
      {"xlstm-large-125m", {"PERFORMANCE.md xlstm-125m row: transformers xLSTMConfig(hidden_size=768, num_blocks=12, "
                            "num_heads=4, vocab_size=50304, chunk_size=64), other fields default",
                            [](ModelSpec* s) { XlstmLarge(s, 768, 12, 4, 50304); }}},
      // Mamba-2: HF Hub config.json of state-spaces/mamba2-* (MODELS.md §4.3 table); vocab 50288.
      {"mamba2-130m", {"state-spaces/mamba2-130m config.json", [](ModelSpec* s) { Mamba2(s, 768, 24, 128, 64, 256, 50288); }}},
      {"mamba2-370m", {"state-spaces/mamba2-370m config.json", [](ModelSpec* s) { Mamba2(s, 1024, 48, 128, 64, 256, 50288); }}},
      {"mamba2-780m", {"state-spaces/mamba2-780m config.json", [](ModelSpec* s) { Mamba2(s, 1536, 48, 128, 64, 256, 50288); }}},
      {"mamba2-1.3b", {"state-spaces/mamba2-1.3b config.json", [](ModelSpec* s) { Mamba2(s, 2048, 48, 128, 64, 256, 50288); }}},
      {"mamba2-2.7b", {"state-spaces/mamba2-2.7b config.json", [](ModelSpec* s) { Mamba2(s, 2560, 64, 128, 64, 256, 50288); }}},
      // Mamba-2 paper §9.2.3 / MODELS.md §4.4: 58 SSD + 6 attention layers at 9, 18, 27, 36, 45,
      // 56; attention 30 heads x 128, rotary on 64 dims, conv k = 4 on qkv, no MLP, no biases.
      {"mamba2-attention-2.7b", {"Mamba-2 paper §9.2.3 (Mamba-2-Attention 2.7B) + hub config", [](ModelSpec* s) {
         Mamba2(s, 2560, 64, 128, 64, 256, 50288);
         s->attn_heads = 30;
         s->attn_kv_heads = 30;
         s->attn_head_dim = 128;
         s->attn_rotary_dim = 64;
         s->attn_qkv_conv = 4;
         s->attn_mlp = false;
         for (int i : {9, 18, 27, 36, 45, 56}) s->blocks[i] = BlockType::kAttention;
       }}},
      {"mamba2-attention-tiny", {"tiny test model (Mamba-2-Attention layout: attention mixer at layer 2)", [](ModelSpec* s) {
         Mamba2(s, 64, 4, 16, 16, 16, 256);
         s->attn_heads = 4;
         s->attn_kv_heads = 4;
         s->attn_head_dim = 16;
         s->attn_rotary_dim = 8;
         s->attn_qkv_conv = 4;
         s->attn_mlp = false;
         s->blocks[2] = BlockType::kAttention;
       }}},
      // Llama (Transformer++) baselines of the xLSTM paper Table 7 (MODELS.md §3: untied,
      // SwiGLU hidden 64*ceil(8d/3/64)).
      {"llama-125m", {"xLSTM paper Table 7 Llama baseline (125M)", [](ModelSpec* s) { Llama(s, 768, 12, 12, 64, 50304); }}},
      {"llama-350m", {"xLSTM paper Table 7 Llama baseline (350M)", [](ModelSpec* s) { Llama(s, 1024, 24, 16, 64, 50304); }}},
      {"llama-760m", {"xLSTM paper Table 7 Llama baseline (760M)", [](ModelSpec* s) { Llama(s, 1536, 24, 16, 96, 50304); }}},
      {"llama-1.3b", {"xLSTM paper Table 7 Llama baseline (1.3B)", [](ModelSpec* s) { Llama(s, 2048, 24, 16, 128, 50304); }}},
      // Tiny presets: byte-level vocabulary (256), for tests and the CPU demo.
      {"llama-tiny", {"tiny test model", [](ModelSpec* s) {
         Llama(s, 64, 4, 4, 16, 256);
         s->attn_kv_heads = 2;  // exercise GQA
       }}},
      {"xlstm-tiny", {"tiny test model ([3:1]: sLSTM at layer 1)", [](ModelSpec* s) {
         Xlstm(s, 64, 4, {1}, 256);
         s->mlstm_chunk = 16;
       }}},
      {"xlstm-large-tiny", {"tiny test model (xLSTM Large blocks: 4 heads, dk 8, dv 16)", [](ModelSpec* s) {
         XlstmLarge(s, 64, 4, 4, 256);
         s->mlstm_chunk = 16;
       }}},
      {"mamba2-tiny", {"tiny test model", [](ModelSpec* s) {
         Mamba2(s, 64, 4, 16, 16, 16, 256);
         s->attn_heads = 4;
         s->attn_kv_heads = 4;
         s->attn_head_dim = 16;
       }}},
      {"hybrid-tiny", {"tiny test model (Mamba-2 with attention at layer 2)", [](ModelSpec* s) {
         Mamba2(s, 64, 4, 16, 16, 16, 256);
         s->attn_heads = 4;
         s->attn_kv_heads = 4;
         s->attn_head_dim = 16;
         s->blocks[2] = BlockType::kAttention;
       }}},
      // Small presets for the CPU benchmark.
      {"llama-small", {"CPU benchmark model", [](ModelSpec* s) { Llama(s, 256, 6, 4, 64, 256); }}},
      {"xlstm-small", {"CPU benchmark model", [](ModelSpec* s) {
         Xlstm(s, 256, 6, {3}, 256);
         s->mlstm_chunk = 64;
       }}},
      {"mamba2-small", {"CPU benchmark model", [](ModelSpec* s) { Mamba2(s, 256, 6, 64, 64, 64, 256); }}},
  };
  return *presets;
}

absl::Status Invalid(const std::string& field, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat("model.", field, ": ", what));
}

absl::StatusOr<BlockType> FromProto(BlockKind kind, int index) {
  switch (kind) {
    case gyre::v1::BLOCK_KIND_MLSTM: return BlockType::kMlstm;
    case gyre::v1::BLOCK_KIND_SLSTM: return BlockType::kSlstm;
    case gyre::v1::BLOCK_KIND_MAMBA2: return BlockType::kMamba2;
    case gyre::v1::BLOCK_KIND_ATTENTION: return BlockType::kAttention;
    case gyre::v1::BLOCK_KIND_XLSTM_LARGE: return BlockType::kXlstmLarge;
    default: return Invalid(absl::StrCat("blocks[", index, "]"), "unspecified or unknown block kind");
  }
}

}  // namespace

const char* BlockTypeName(BlockType type) {
  switch (type) {
    case BlockType::kMlstm: return "mlstm";
    case BlockType::kSlstm: return "slstm";
    case BlockType::kMamba2: return "mamba2";
    case BlockType::kAttention: return "attention";
    case BlockType::kXlstmLarge: return "xlstm_large";
  }
  return "?";
}

std::vector<std::string> PresetNames() {
  std::vector<std::string> names;
  for (const auto& [name, p] : Presets()) names.push_back(name);
  names.push_back("xlstm-125m");
  names.push_back("xlstm-350m");
  names.push_back("xlstm-760m");
  names.push_back("xlstm-1.3b");
  return names;
}

absl::StatusOr<ModelSpec> ResolveModelConfig(const ModelConfig& c) {
  ModelSpec s;
  std::string preset = c.preset();
  if (preset.empty()) return Invalid("preset", "empty (known: " + absl::StrJoin(PresetNames(), ", ") + ")");
  // "xlstm-125m" etc. mean the [7:1] models (the paper's headline xLSTM).
  if (preset.rfind("xlstm-", 0) == 0 && Presets().count(preset) == 0) {
    preset = "xlstm[7:1]-" + preset.substr(6);
  }
  auto it = Presets().find(preset);
  if (it == Presets().end()) {
    return Invalid("preset", absl::StrCat("unknown preset '", c.preset(), "' (known: ", absl::StrJoin(PresetNames(), ", "), ")"));
  }
  s.preset = c.preset();
  s.source = it->second.source;
  it->second.fill(&s);

  // ---- overrides
  if (c.d_model() != 0) {
    s.d_model = c.d_model();
    if (s.family == Family::kXlstm) {
      s.mlstm_inner = RoundUp64(2.0 * s.d_model);
      s.slstm_ffn = RoundUp64(1.3 * s.d_model);
    }
    if (s.family == Family::kXlstmLarge) {
      s.ffn_dim = XlstmLargeFfnWidth(s.xl_ffn_factor, s.d_model);
      s.xl_qk_dim = s.d_model / 2;
      s.xl_v_dim = s.d_model;
    } else if (s.family != Family::kXlstm) {
      s.ffn_dim = RoundUp64(8.0 * s.d_model / 3.0);
    }
    if (s.family == Family::kMamba2 && s.attn_head_dim > 0) {
      s.attn_heads = std::max<int64_t>(1, s.d_model / s.attn_head_dim);
      s.attn_kv_heads = s.attn_heads;
    }
  }
  if (c.n_layers() != 0) {
    const BlockType base = s.family == Family::kXlstm        ? BlockType::kMlstm
                           : s.family == Family::kMamba2     ? BlockType::kMamba2
                           : s.family == Family::kXlstmLarge ? BlockType::kXlstmLarge
                                                             : BlockType::kAttention;
    if (static_cast<int64_t>(c.n_layers()) != s.n_layers()) s.blocks.assign(c.n_layers(), base);
  }
  if (c.vocab_size() != 0) {
    const int64_t pad = c.pad_vocab_to() == 0 ? 64 : c.pad_vocab_to();
    s.vocab_size = (static_cast<int64_t>(c.vocab_size()) + pad - 1) / pad * pad;
  }
  if (c.blocks_size() > 0) {
    if (c.n_layers() != 0 && c.blocks_size() != static_cast<int>(c.n_layers()))
      return Invalid("blocks", absl::StrCat(c.blocks_size(), " entries but n_layers = ", c.n_layers()));
    s.blocks.clear();
    for (int i = 0; i < c.blocks_size(); ++i) {
      auto b = FromProto(c.blocks(i), i);
      if (!b.ok()) return b.status();
      s.blocks.push_back(*b);
    }
  }
  if (c.slstm_at_size() > 0) {
    if (s.family != Family::kXlstm) return Invalid("slstm_at", "only xLSTM presets have sLSTM blocks");
    for (auto& b : s.blocks) if (b == BlockType::kSlstm) b = BlockType::kMlstm;
    for (int i = 0; i < c.slstm_at_size(); ++i) {
      if (c.slstm_at(i) >= s.blocks.size())
        return Invalid(absl::StrCat("slstm_at[", i, "]"), absl::StrCat("layer ", c.slstm_at(i), " >= n_layers ", s.blocks.size()));
      s.blocks[c.slstm_at(i)] = BlockType::kSlstm;
    }
  }
  for (int i = 0; i < c.attention_at_size(); ++i) {
    if (c.attention_at(i) >= s.blocks.size())
      return Invalid(absl::StrCat("attention_at[", i, "]"), absl::StrCat("layer ", c.attention_at(i), " >= n_layers ", s.blocks.size()));
    s.blocks[c.attention_at(i)] = BlockType::kAttention;
  }
  if (c.tie_embeddings()) s.tie_embeddings = true;
  s.mtp_heads = std::max<int64_t>(1, c.mtp_heads());
  s.recompute_blocks = c.recompute_blocks();
  if (s.recompute_blocks) {  // recomputing whole blocks replaces the preset's mLSTM memory default
    s.mlstm_recompute = "none";
    s.mlstm_recompute_keep_last = 0;
  }

  const auto& x = c.xlstm();
  if (x.num_heads() != 0) s.mlstm_heads = x.num_heads();
  if (x.proj_factor_mlstm() != 0) s.mlstm_inner = RoundUp64(x.proj_factor_mlstm() * s.d_model);
  if (x.proj_factor_slstm() != 0) s.slstm_ffn = RoundUp64(x.proj_factor_slstm() * s.d_model);
  if (x.conv_kernel() != 0) s.conv_kernel = x.conv_kernel();
  if (x.qkv_block_size() != 0) s.qkv_block_size = x.qkv_block_size();
  if (x.slstm_heads() != 0) s.slstm_heads = x.slstm_heads();
  if (x.chunk_size() != 0) s.mlstm_chunk = x.chunk_size();
  if (!x.mlstm_recompute().empty()) {
    const std::string& m = x.mlstm_recompute();
    if (m != "none" && m != "states" && m != "glue" && m != "cell")
      return Invalid("xlstm.mlstm_recompute", absl::StrCat("'", m, "' (known: none, states, glue, cell)"));
    if (m != "none" && s.recompute_blocks)
      return Invalid("xlstm.mlstm_recompute",
                     absl::StrCat("'", m, "' together with model.recompute_blocks (choose one: under a "
                                  "recomputed block the mLSTM cell would run three times)"));
    s.mlstm_recompute = m;
    s.mlstm_recompute_keep_last = 0;  // a mode set here means every layer, unless keep_last says otherwise
  }
  if (x.mlstm_recompute_keep_last() != 0) {
    const int64_t keep = x.mlstm_recompute_keep_last();
    if (s.mlstm_recompute == "none")
      return Invalid("xlstm.mlstm_recompute_keep_last",
                     absl::StrCat(keep, " without model.xlstm.mlstm_recompute (it says how many of the last "
                                        "layers skip the recomputation; with none every layer keeps everything)"));
    if (keep > static_cast<int64_t>(s.blocks.size()))
      return Invalid("xlstm.mlstm_recompute_keep_last",
                     absl::StrCat(keep, " > n_layers ", s.blocks.size()));
    if (keep < -1)
      return Invalid("xlstm.mlstm_recompute_keep_last",
                     absl::StrCat(keep, " (a layer count >= 0, or -1 for as many as fit the device)"));
    s.mlstm_recompute_keep_last = keep;
  }
  // sigmoid_forget_gate: proto3 cannot tell "unset" from false, and the documented default is
  // true, so only the sigmoid gate is reachable from a config (see the report: the field should be
  // `optional` or inverted). The exponential gate stays available to code through ModelSpec.

  const auto& xl = c.xlstm_large();
  if (xl.num_heads() != 0) s.xl_heads = xl.num_heads();
  if (xl.qk_dim_factor() != 0) {
    if (!(xl.qk_dim_factor() > 0)) return Invalid("xlstm_large.qk_dim_factor", absl::StrCat(xl.qk_dim_factor(), " must be positive"));
    s.xl_qk_dim = static_cast<int64_t>(std::llround(xl.qk_dim_factor() * s.d_model));
  }
  if (xl.ffn_proj_factor() != 0) {
    if (!(xl.ffn_proj_factor() > 0)) return Invalid("xlstm_large.ffn_proj_factor", absl::StrCat(xl.ffn_proj_factor(), " must be positive"));
    s.xl_ffn_factor = xl.ffn_proj_factor();
    s.ffn_dim = XlstmLargeFfnWidth(s.xl_ffn_factor, s.d_model);
  }
  if (xl.gate_soft_cap() != 0) {
    if (!(xl.gate_soft_cap() > 0)) return Invalid("xlstm_large.gate_soft_cap", absl::StrCat(xl.gate_soft_cap(), " must be positive (0 = the preset's)"));
    s.gate_soft_cap = xl.gate_soft_cap();
  }
  if (xl.logit_soft_cap() != 0) {
    if (!(xl.logit_soft_cap() > 0)) return Invalid("xlstm_large.logit_soft_cap", absl::StrCat(xl.logit_soft_cap(), " must be positive (0 = the preset's)"));
    s.logit_soft_cap = xl.logit_soft_cap();
  }
  if (xl.chunk_size() != 0) s.mlstm_chunk = xl.chunk_size();

  const auto& m = c.mamba2();
  if (m.d_state() != 0) s.ssm_state = m.d_state();
  if (m.d_conv() != 0) s.ssm_conv = m.d_conv();
  if (m.expand() != 0) s.ssm_expand = m.expand();
  if (m.head_dim() != 0) s.ssm_head_dim = m.head_dim();
  if (m.n_groups() != 0) s.ssm_groups = m.n_groups();
  if (m.chunk_size() != 0) s.ssm_chunk = m.chunk_size();

  const auto& a = c.attention();
  if (a.num_heads() != 0) {
    s.attn_heads = a.num_heads();
    s.attn_kv_heads = a.num_heads();
    if (a.head_dim() == 0) s.attn_head_dim = s.d_model / s.attn_heads;
  }
  if (a.num_kv_heads() != 0) s.attn_kv_heads = a.num_kv_heads();
  if (a.head_dim() != 0) s.attn_head_dim = a.head_dim();
  if (a.rope_theta() != 0) s.rope_theta = a.rope_theta();
  if (a.ffn_dim() != 0) s.ffn_dim = a.ffn_dim();
  s.self_extend_group = a.self_extend_group();
  s.self_extend_window = a.self_extend_window();

  // ---- validation
  if (s.d_model <= 0) return Invalid("d_model", "must be positive");
  if (s.blocks.empty()) return Invalid("n_layers", "must be positive");
  if (s.vocab_size <= 1) return Invalid("vocab_size", "must be at least 2");
  auto uses = [&](BlockType t) { return std::find(s.blocks.begin(), s.blocks.end(), t) != s.blocks.end(); };
  if (uses(BlockType::kAttention)) {
    if (s.attn_heads <= 0) return Invalid("attention.num_heads", "must be positive");
    if (s.attn_kv_heads <= 0 || s.attn_heads % s.attn_kv_heads != 0)
      return Invalid("attention.num_kv_heads", absl::StrCat(s.attn_kv_heads, " does not divide num_heads ", s.attn_heads));
    if (s.attn_head_dim <= 0 || s.attn_head_dim % 2 != 0)
      return Invalid("attention.head_dim", absl::StrCat(s.attn_head_dim, " must be positive and even (RoPE pairs)"));
    if (s.ffn_dim <= 0) return Invalid("attention.ffn_dim", "must be positive");
    if (s.attn_rotary_dim < 0 || s.attn_rotary_dim > s.attn_head_dim || s.attn_rotary_dim % 2 != 0)
      return Invalid("attention.head_dim", absl::StrCat("rotary dim ", s.attn_rotary_dim, " must be even and <= head_dim ", s.attn_head_dim));
    if (s.self_extend_group > 0 && s.self_extend_window <= 0)
      return Invalid("attention.self_extend_window", "must be positive when self_extend_group is set");
  }
  if (uses(BlockType::kMlstm)) {
    if (s.mlstm_heads <= 0 || s.mlstm_inner % s.mlstm_heads != 0)
      return Invalid("xlstm.num_heads", absl::StrCat(s.mlstm_heads, " does not divide the inner width ", s.mlstm_inner));
    if (s.qkv_block_size <= 0 || s.mlstm_inner % s.qkv_block_size != 0)
      return Invalid("xlstm.qkv_block_size", absl::StrCat(s.qkv_block_size, " does not divide the inner width ", s.mlstm_inner));
    if (s.mlstm_chunk <= 0) return Invalid("xlstm.chunk_size", "must be positive");
  }
  if (uses(BlockType::kXlstmLarge)) {
    if (s.xl_v_dim == 0) s.xl_v_dim = s.d_model;  // blocks placed into another family's model
    if (s.xl_qk_dim == 0) s.xl_qk_dim = s.d_model / 2;
    if (s.xl_heads <= 0 || s.xl_v_dim % s.xl_heads != 0)
      return Invalid("xlstm_large.num_heads", absl::StrCat(s.xl_heads, " does not divide the value width ", s.xl_v_dim));
    if (s.xl_qk_dim <= 0 || s.xl_qk_dim % s.xl_heads != 0)
      return Invalid("xlstm_large.qk_dim_factor", absl::StrCat("q/k width ", s.xl_qk_dim, " is not a positive multiple of num_heads ", s.xl_heads));
    if (s.ffn_dim <= 0) return Invalid("xlstm_large.ffn_proj_factor", "gives an empty FFN");
    if (s.mlstm_chunk <= 0) return Invalid("xlstm_large.chunk_size", "must be positive");
  }
  if (uses(BlockType::kMlstm) || uses(BlockType::kSlstm)) {
    if (s.conv_kernel <= 0) return Invalid("xlstm.conv_kernel", "must be positive");
  }
  if (uses(BlockType::kSlstm)) {
    if (s.slstm_heads <= 0 || s.d_model % s.slstm_heads != 0)
      return Invalid("xlstm.slstm_heads", absl::StrCat(s.slstm_heads, " does not divide d_model ", s.d_model));
    if (s.slstm_ffn <= 0) return Invalid("xlstm.proj_factor_slstm", "gives an empty FFN");
  }
  if (uses(BlockType::kMamba2)) {
    const int64_t di = s.ssm_expand * s.d_model;
    if (s.ssm_head_dim <= 0 || di % s.ssm_head_dim != 0)
      return Invalid("mamba2.head_dim", absl::StrCat(s.ssm_head_dim, " does not divide expand*d_model = ", di));
    const int64_t heads = di / s.ssm_head_dim;
    if (s.ssm_groups <= 0 || heads % s.ssm_groups != 0)
      return Invalid("mamba2.n_groups", absl::StrCat(s.ssm_groups, " does not divide the ", heads, " SSD heads"));
    if (s.ssm_state <= 0) return Invalid("mamba2.d_state", "must be positive");
    if (s.ssm_conv <= 0) return Invalid("mamba2.d_conv", "must be positive");
    if (s.ssm_chunk <= 0) return Invalid("mamba2.chunk_size", "must be positive");
  }
  if (s.mtp_heads > 16) return Invalid("mtp_heads", absl::StrCat(s.mtp_heads, " is more than 16"));
  return s;
}

absl::StatusOr<ModelSpec> PresetSpec(const std::string& preset) {
  ModelConfig c;
  c.set_preset(preset);
  return ResolveModelConfig(c);
}

std::string DescribeSpec(const ModelSpec& s) {
  std::map<std::string, int> counts;
  for (BlockType b : s.blocks) counts[BlockTypeName(b)]++;
  std::vector<std::string> parts;
  for (const auto& [k, v] : counts) parts.push_back(absl::StrCat(v, "x", k));
  return absl::StrCat(s.preset, ": ", s.n_layers(), " layers (", absl::StrJoin(parts, ", "), "), d=", s.d_model,
                      ", vocab=", s.vocab_size, s.tie_embeddings ? ", tied" : ", untied",
                      s.mtp_heads > 1 ? absl::StrCat(", mtp_heads=", s.mtp_heads) : "", " [", s.source, "]");
}

}  // namespace gyre::ops
