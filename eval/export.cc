#include "eval/export.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <string_view>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "nlohmann/json.hpp"
#include "ops/tensor.h"

namespace gyre::eval {
namespace {

int64_t DTypeBytes(const std::string& dtype) {
  static const std::map<std::string, int64_t> kSizes = {{"F64", 8}, {"F32", 4}, {"F16", 2}, {"BF16", 2}, {"I64", 8},
                                                        {"I32", 4}, {"I16", 2}, {"I8", 1},  {"U8", 1},   {"BOOL", 1}};
  auto it = kSizes.find(dtype);
  return it == kSizes.end() ? -1 : it->second;
}

// The transformers name of one of our parameters, or "" when the family's map has no place for it.
std::string HfName(ops::Family family, const std::string& name) {
  static const std::vector<std::pair<std::string, std::string>> kLlamaBlock = {
      {"attn_norm.weight", "input_layernorm.weight"},
      {"attn.q_proj.weight", "self_attn.q_proj.weight"},
      {"attn.k_proj.weight", "self_attn.k_proj.weight"},
      {"attn.v_proj.weight", "self_attn.v_proj.weight"},
      {"attn.o_proj.weight", "self_attn.o_proj.weight"},
      {"mlp_norm.weight", "post_attention_layernorm.weight"},
      {"mlp.gate_proj.weight", "mlp.gate_proj.weight"},
      {"mlp.up_proj.weight", "mlp.up_proj.weight"},
      {"mlp.down_proj.weight", "mlp.down_proj.weight"}};
  static const std::vector<std::pair<std::string, std::string>> kMamba2Block = {
      {"norm.weight", "norm.weight"},
      {"in_proj.weight", "mixer.in_proj.weight"},
      {"conv1d.weight", "mixer.conv1d.weight"},
      {"conv1d.bias", "mixer.conv1d.bias"},
      {"A_log", "mixer.A_log"},
      {"dt_bias", "mixer.dt_bias"},
      {"D", "mixer.D"},
      {"gated_norm.weight", "mixer.norm.weight"},
      {"out_proj.weight", "mixer.out_proj.weight"}};
  // xLSTM Large (transformers' "single" weight mode); our FFN is the GatedMlp shared with Llama.
  static const std::vector<std::pair<std::string, std::string>> kXlstmLargeBlock = {
      {"norm_mlstm.weight", "norm_mlstm.weight"},
      {"mlstm.q.weight", "mlstm_layer.q.weight"},
      {"mlstm.k.weight", "mlstm_layer.k.weight"},
      {"mlstm.v.weight", "mlstm_layer.v.weight"},
      {"mlstm.ogate_preact.weight", "mlstm_layer.ogate_preact.weight"},
      {"mlstm.igate_preact.weight", "mlstm_layer.igate_preact.weight"},
      {"mlstm.igate_preact.bias", "mlstm_layer.igate_preact.bias"},
      {"mlstm.fgate_preact.weight", "mlstm_layer.fgate_preact.weight"},
      {"mlstm.fgate_preact.bias", "mlstm_layer.fgate_preact.bias"},
      {"mlstm.multihead_norm.weight", "mlstm_layer.multihead_norm.weight"},
      {"mlstm.out_proj.weight", "mlstm_layer.out_proj.weight"},
      {"norm_ffn.weight", "norm_ffn.weight"},
      {"ffn.gate_proj.weight", "ffn.proj_up_gate.weight"},
      {"ffn.up_proj.weight", "ffn.proj_up.weight"},
      {"ffn.down_proj.weight", "ffn.proj_down.weight"}};
  if (family == ops::Family::kXlstmLarge) {
    if (name == "embedding.weight") return "backbone.embeddings.weight";
    if (name == "final_norm.weight") return "backbone.out_norm.weight";
    if (name == "lm_head.weight") return "lm_head.weight";
    if (!absl::StartsWith(name, "blocks.")) return "";
    const size_t dot = name.find('.', 7);
    if (dot == std::string::npos) return "";
    const std::string layer = name.substr(7, dot - 7), rest = name.substr(dot + 1);
    for (const auto& [ours, hf] : kXlstmLargeBlock)
      if (rest == ours) return absl::StrCat("backbone.blocks.", layer, ".", hf);
    return "";
  }
  const bool mamba2 = family == ops::Family::kMamba2;
  if (family != ops::Family::kLlama && !mamba2) return "";
  const std::string base = mamba2 ? "backbone." : "model.";
  if (name == "embedding.weight") return base + (mamba2 ? "embeddings.weight" : "embed_tokens.weight");
  if (name == "final_norm.weight") return base + (mamba2 ? "norm_f.weight" : "norm.weight");
  if (name == "lm_head.weight") return "lm_head.weight";
  if (!absl::StartsWith(name, "blocks.")) return "";
  const size_t dot = name.find('.', 7);
  if (dot == std::string::npos) return "";
  const std::string layer = name.substr(7, dot - 7), rest = name.substr(dot + 1);
  for (const auto& [ours, hf] : mamba2 ? kMamba2Block : kLlamaBlock)
    if (rest == ours) return absl::StrCat(base, "layers.", layer, ".", hf);
  return "";
}

absl::Status Refuse(const ops::ModelSpec& spec, const std::string& why) {
  return absl::FailedPreconditionError(absl::StrCat(spec.preset, ": ", why));
}

absl::StatusOr<std::string> LlamaConfigJson(const ops::ModelSpec& spec, int64_t max_positions, ExportDType dtype) {
  for (ops::BlockType b : spec.blocks) {
    if (b != ops::BlockType::kAttention) {
      return Refuse(spec, absl::StrCat("a Llama model with a ", ops::BlockTypeName(b),
                                       " block; only all-attention Llama models are exportable"));
    }
  }
  if (!spec.attn_mlp || spec.attn_qkv_conv != 0 || (spec.attn_rotary_dim != 0 && spec.attn_rotary_dim != spec.attn_head_dim)) {
    return Refuse(spec, "attention without MLP, qkv conv or partial rotary has no LlamaForCausalLM equivalent");
  }
  nlohmann::ordered_json c;
  c["architectures"] = {"LlamaForCausalLM"};
  c["model_type"] = "llama";
  c["vocab_size"] = spec.vocab_size;
  c["hidden_size"] = spec.d_model;
  c["intermediate_size"] = spec.ffn_dim;
  c["num_hidden_layers"] = spec.n_layers();
  c["num_attention_heads"] = spec.attn_heads;
  c["num_key_value_heads"] = spec.attn_kv_heads;
  c["head_dim"] = spec.attn_head_dim;
  c["hidden_act"] = "silu";
  c["max_position_embeddings"] = max_positions;
  c["rms_norm_eps"] = spec.norm_eps;
  c["rope_theta"] = spec.rope_theta;
  c["attention_bias"] = false;
  c["mlp_bias"] = false;
  c["tie_word_embeddings"] = spec.tie_embeddings;
  c["torch_dtype"] = TorchDType(dtype);
  return c.dump(2) + "\n";
}

// Mamba2Config fields that Mamba2ForCausalLM's forward reads, plus the dt initialisation range
// (init only; ours, ops/recurrent_blocks.cc). Left at transformers' defaults on purpose:
// time_step_limit (0, inf) = no dt clamp, as ours (JSON cannot spell inf), and the token ids.
absl::StatusOr<std::string> Mamba2ConfigJson(const ops::ModelSpec& spec, ExportDType dtype) {
  for (ops::BlockType b : spec.blocks) {
    if (b != ops::BlockType::kMamba2) {
      return Refuse(spec, absl::StrCat("a hybrid with a ", ops::BlockTypeName(b),
                                       " layer; transformers' Mamba2ForCausalLM has Mamba-2 mixer layers only"));
    }
  }
  if (spec.ssm_groups != 1) {
    return Refuse(spec, absl::StrCat("n_groups = ", spec.ssm_groups, " > 1: transformers' Mamba2 gated RMSNorm "
                                     "(MambaRMSNormGated) normalises over all expand*d_model features, ours per group "
                                     "of expand*d_model / n_groups (as mamba_ssm's RMSNormGated with group_size); "
                                     "the exported model would compute something else"));
  }
  // Our Mamba-2 blocks' norms use eps 1e-5 (ops/recurrent_blocks.cc), the final norm spec.norm_eps;
  // transformers has one layer_norm_epsilon for all three.
  if (spec.norm_eps != 1e-5) {
    return Refuse(spec, absl::StrCat("norm_eps ", spec.norm_eps, " differs from the blocks' fixed 1e-5; "
                                     "Mamba2Config has one layer_norm_epsilon"));
  }
  const int64_t inner = spec.ssm_expand * spec.d_model;
  nlohmann::ordered_json c;
  c["architectures"] = {"Mamba2ForCausalLM"};
  c["model_type"] = "mamba2";
  c["vocab_size"] = spec.vocab_size;
  c["hidden_size"] = spec.d_model;
  c["num_hidden_layers"] = spec.n_layers();
  c["expand"] = spec.ssm_expand;
  c["num_heads"] = inner / spec.ssm_head_dim;
  c["head_dim"] = spec.ssm_head_dim;
  c["state_size"] = spec.ssm_state;
  c["n_groups"] = spec.ssm_groups;
  c["conv_kernel"] = spec.ssm_conv;
  c["chunk_size"] = spec.ssm_chunk;
  c["layer_norm_epsilon"] = spec.norm_eps;
  c["rms_norm"] = true;
  c["residual_in_fp32"] = true;
  c["use_bias"] = false;
  c["use_conv_bias"] = true;
  c["hidden_act"] = "silu";
  c["time_step_min"] = 1e-3;
  c["time_step_max"] = 0.1;
  c["time_step_floor"] = 1e-4;
  c["tie_word_embeddings"] = spec.tie_embeddings;
  c["torch_dtype"] = TorchDType(dtype);
  return c.dump(2) + "\n";
}

// transformers' xLSTMLayer sizes its q/k and v projections as int(hidden_size * factor) and its
// FFN as round_up(hidden_size * ffn_proj_factor, 64) (configuration_xlstm.py
// round_up_to_next_multiple_of, floor division on a float); the factors below are chosen so that
// those double-precision expressions give back our widths exactly (JSON keeps a double exactly).
int64_t PyIntOf(double x) { return static_cast<int64_t>(x); }  // int() truncates toward zero
int64_t PyRoundUp(double x, int64_t multiple) {
  return static_cast<int64_t>(std::floor((x + multiple - 1) / multiple) * multiple);
}
// A factor f with int(d * f) == width, or 0 when none is found next to width / d.
double TruncatingFactor(int64_t width, int64_t d) {
  double f = static_cast<double>(width) / static_cast<double>(d);
  for (int i = 0; i < 4 && PyIntOf(d * f) != width; ++i) f = std::nextafter(f, 1e300);
  return PyIntOf(d * f) == width ? f : 0.0;
}

// xLSTMConfig fields that xLSTMForCausalLM's native (PyTorch) forward reads. The cell's ε is 1e-6
// in ours (kernels/cpu/mlstm.h via the block's CellOptions) and in the config; norm_eps is used by
// both RMSNorms, the per-head LayerNorm and out_norm, as ours uses spec.norm_eps for all four.
// mode "inference": chunkwise over the largest multiple of chunk_size, the recurrent sequence
// kernel for the remainder, the step kernel for T = 1 (all three native PyTorch).
// tie_word_embeddings is always false and lm_head.weight always written (a copy of the embedding
// for a tied spec): xLSTMForCausalLM declares no tied weights, so a missing lm_head would be left
// at its random initialisation rather than tied.
absl::StatusOr<std::string> XlstmLargeConfigJson(const ops::ModelSpec& spec, ExportDType dtype) {
  for (ops::BlockType b : spec.blocks) {
    if (b != ops::BlockType::kXlstmLarge) {
      return Refuse(spec, absl::StrCat("an xLSTM Large model with a ", ops::BlockTypeName(b),
                                       " block; transformers' xLSTMForCausalLM has xLSTM Large blocks only"));
    }
  }
  if (!(spec.gate_soft_cap > 0) || !(spec.logit_soft_cap > 0)) {
    return Refuse(spec, absl::StrCat("gate_soft_cap ", spec.gate_soft_cap, ", logit_soft_cap ", spec.logit_soft_cap,
                                     ": a cap that is off (0) has no xLSTMConfig spelling (the fields are floats)"));
  }
  const int64_t d = spec.d_model;
  const double qk_factor = TruncatingFactor(spec.xl_qk_dim, d), v_factor = TruncatingFactor(spec.xl_v_dim, d);
  if (qk_factor == 0 || v_factor == 0) {
    return Refuse(spec, absl::StrCat("q/k width ", spec.xl_qk_dim, " or v width ", spec.xl_v_dim,
                                     " is not int(d_model * factor) for any double factor"));
  }
  double ffn_factor = spec.xl_ffn_factor;
  if (PyRoundUp(d * ffn_factor, 64) != spec.ffn_dim) ffn_factor = static_cast<double>(spec.ffn_dim) / d;
  if (PyRoundUp(d * ffn_factor, 64) != spec.ffn_dim) {
    return Refuse(spec, absl::StrCat("FFN width ", spec.ffn_dim, " is not a multiple of 64; xLSTMFeedForward "
                                     "rounds its width up to ffn_round_up_to_multiple_of 64"));
  }
  nlohmann::ordered_json c;
  c["architectures"] = {"xLSTMForCausalLM"};
  c["model_type"] = "xlstm";
  c["vocab_size"] = spec.vocab_size;
  c["hidden_size"] = d;
  c["embedding_dim"] = d;
  c["num_hidden_layers"] = spec.n_layers();
  c["num_blocks"] = spec.n_layers();
  c["num_heads"] = spec.xl_heads;
  c["use_bias"] = false;
  c["norm_reduction_force_float32"] = true;
  c["add_out_norm"] = true;
  c["norm_eps"] = spec.norm_eps;
  c["qk_dim_factor"] = qk_factor;
  c["v_dim_factor"] = v_factor;
  c["chunkwise_kernel"] = "chunkwise--native_autograd";
  c["sequence_kernel"] = "native_sequence__native";
  c["step_kernel"] = "native";
  c["mode"] = "inference";
  c["chunk_size"] = spec.mlstm_chunk;
  c["return_last_states"] = true;
  c["autocast_kernel_dtype"] = "float32";
  c["eps"] = 1e-6;
  c["inference_state_dtype"] = "float32";
  c["ffn_proj_factor"] = ffn_factor;
  c["ffn_round_up_to_multiple_of"] = 64;
  c["gate_soft_cap"] = spec.gate_soft_cap;
  c["output_logit_soft_cap"] = spec.logit_soft_cap;
  c["weight_mode"] = "single";
  c["tie_word_embeddings"] = false;
  c["torch_dtype"] = TorchDType(dtype);
  return c.dump(2) + "\n";
}

// One header entry: what EncodeSafetensors and the streaming ExportHf both describe.
struct HeaderEntry {
  std::string name, dtype;
  std::vector<int64_t> shape;
  uint64_t bytes = 0;
};

// The 8-byte little-endian size + the JSON header (padded with spaces to a multiple of 8) of
// tensors laid out in `entries` order.
std::string SafetensorsHeader(const std::vector<HeaderEntry>& entries, const std::map<std::string, std::string>& metadata) {
  nlohmann::ordered_json header;
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (const HeaderEntry& e : entries) {
    header[e.name] = {{"dtype", e.dtype}, {"shape", e.shape}, {"data_offsets", {offset, offset + e.bytes}}};
    offset += e.bytes;
  }
  std::string json = header.dump();
  while (json.size() % 8 != 0) json.push_back(' ');
  std::string out(8, '\0');
  const uint64_t n = json.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  out += json;
  return out;
}

uint64_t ElementBytes(ExportDType dtype) { return dtype == ExportDType::kF32 ? 4 : 2; }

// One exported tensor: its transformers name and shape, and the parameter whose values it holds.
struct PlannedTensor {
  std::string name;
  std::vector<int64_t> shape;
  const ops::Parameter* source = nullptr;
};

// The exported tensors in file (name) order; MTP heads 2..n go to `dropped`.
absl::StatusOr<std::vector<PlannedTensor>> PlanHfTensors(ops::LanguageModel* model, std::vector<std::string>* dropped) {
  std::map<std::string, PlannedTensor> planned;
  for (ops::Parameter* p : model->params().All()) {
    const std::string hf = HfName(model->spec().family, p->name);
    if (hf.empty()) {
      if (absl::StartsWith(p->name, "mtp_heads.")) {
        dropped->push_back(p->name);
        continue;
      }
      return absl::InternalError(absl::StrCat("export: no transformers name for parameter ", p->name));
    }
    PlannedTensor t{.name = hf, .shape = p->value.shape(), .source = p};
    // nn.Conv1d(groups = channels) keeps a singleton in-channel axis: [C, K] -> [C, 1, K].
    if (absl::EndsWith(hf, ".mixer.conv1d.weight")) t.shape = {t.shape[0], 1, t.shape[1]};
    planned[hf] = std::move(t);
  }
  // xLSTMForCausalLM always has its own lm_head (XlstmLargeConfigJson): a tied spec exports a copy.
  if (model->spec().family == ops::Family::kXlstmLarge && model->spec().tie_embeddings) {
    auto emb = planned.find("backbone.embeddings.weight");
    if (emb == planned.end()) return absl::InternalError("export: tied xLSTM Large model without an embedding");
    PlannedTensor head = emb->second;
    head.name = "lm_head.weight";
    planned["lm_head.weight"] = std::move(head);
  }
  std::vector<PlannedTensor> plan;
  for (auto& [name, t] : planned) plan.push_back(std::move(t));
  return plan;
}

// Hands `p`'s values, converted to `dtype`, to `sink` in pieces of at most kPieceElements
// elements (f32 masters on the CPU: straight from the tensor, one piece). A parameter that is not
// an f32 CPU tensor is copied to one first (this tensor only). FailedPrecondition, naming the
// parameter (its transformers name `hf`), for a finite value that the rounding turns into inf.
absl::Status StreamConverted(const ops::Parameter& p, const std::string& hf, ExportDType dtype,
                             const std::function<absl::Status(std::string_view)>& sink) {
  constexpr int64_t kPieceElements = int64_t{1} << 16;
  const ops::Tensor host = p.value.device() == ops::Device::kCpu ? p.value : p.value.ToDevice(ops::Device::kCpu);
  const ops::Tensor f32 = host.dtype() == ops::DType::kF32 ? host : host.To(ops::DType::kF32);
  const float* x = static_cast<const float*>(f32.raw());
  const int64_t n = f32.numel();
  if (dtype == ExportDType::kF32) return sink(std::string_view(reinterpret_cast<const char*>(x), n * sizeof(float)));
  std::vector<uint16_t> piece(std::min(n, kPieceElements));
  for (int64_t begin = 0; begin < n; begin += kPieceElements) {
    const int64_t count = std::min(kPieceElements, n - begin);
    for (int64_t i = 0; i < count; ++i) {
      const float v = x[begin + i];
      const uint16_t bits = dtype == ExportDType::kBF16 ? ops::FloatToBf16(v) : FloatToF16(v);
      const bool inf = dtype == ExportDType::kBF16 ? (bits & 0x7fffu) == 0x7f80u : (bits & 0x7fffu) == 0x7c00u;
      if (inf && std::isfinite(v)) {
        return absl::FailedPreconditionError(absl::StrCat(
            "--dtype ", ExportDTypeName(dtype), ": ", hf, " (", p.name, ") element ", begin + i, " = ", v,
            " is beyond ", ExportDTypeName(dtype), "'s largest finite value (",
            dtype == ExportDType::kBF16 ? "3.3895e38" : "65504", ") and would become inf; export as ",
            dtype == ExportDType::kF16 ? "bf16 or f32" : "f32"));
      }
      piece[i] = bits;  // little-endian host (x86-64, aarch64): the file's byte order
    }
    RETURN_IF_ERROR(sink(std::string_view(reinterpret_cast<const char*>(piece.data()), count * sizeof(uint16_t))));
  }
  return absl::OkStatus();
}

}  // namespace

std::string EncodeSafetensors(const std::map<std::string, SafetensorsTensor>& tensors,
                              const std::map<std::string, std::string>& metadata) {
  std::vector<HeaderEntry> entries;
  for (const auto& [name, t] : tensors) entries.push_back({name, t.dtype, t.shape, t.bytes.size()});
  std::string out = SafetensorsHeader(entries, metadata);
  for (const auto& [name, t] : tensors) out += t.bytes;
  return out;
}

absl::StatusOr<std::map<std::string, SafetensorsTensor>> DecodeSafetensors(const std::string& data,
                                                                           const std::string& where) {
  auto bad = [&](const std::string& why) { return absl::DataLossError(absl::StrCat(where, ": ", why)); };
  if (data.size() < 8) return bad("shorter than the 8-byte header size");
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= static_cast<uint64_t>(static_cast<unsigned char>(data[i])) << (8 * i);
  if (n > data.size() - 8) return bad(absl::StrCat("header size ", n, " exceeds the file (", data.size(), " bytes)"));
  nlohmann::json header = nlohmann::json::parse(data.substr(8, n), nullptr, /*allow_exceptions=*/false);
  if (!header.is_object()) return bad("header is not a JSON object");
  const uint64_t buffer = data.size() - 8 - n;
  std::map<std::string, SafetensorsTensor> out;
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") continue;
    const nlohmann::json& e = it.value();
    if (!e.is_object() || !e.contains("dtype") || !e.contains("shape") || !e.contains("data_offsets") ||
        !e["dtype"].is_string() || !e["shape"].is_array() || !e["data_offsets"].is_array() || e["data_offsets"].size() != 2) {
      return bad(absl::StrCat("tensor ", it.key(), ": entry needs dtype, shape and data_offsets [begin, end]"));
    }
    SafetensorsTensor t;
    t.dtype = e["dtype"];
    const int64_t size = DTypeBytes(t.dtype);
    if (size < 0) return bad(absl::StrCat("tensor ", it.key(), ": unknown dtype ", t.dtype));
    int64_t elements = 1;
    for (const auto& d : e["shape"]) {
      if (!d.is_number_unsigned()) return bad(absl::StrCat("tensor ", it.key(), ": shape entries must be non-negative integers"));
      t.shape.push_back(d.get<int64_t>());
      elements *= t.shape.back();
    }
    if (!e["data_offsets"][0].is_number_unsigned() || !e["data_offsets"][1].is_number_unsigned()) {
      return bad(absl::StrCat("tensor ", it.key(), ": data_offsets must be non-negative integers"));
    }
    const uint64_t begin = e["data_offsets"][0], end = e["data_offsets"][1];
    if (begin > end || end > buffer) return bad(absl::StrCat("tensor ", it.key(), ": data_offsets [", begin, ", ", end, ") outside the ", buffer, "-byte buffer"));
    if (end - begin != static_cast<uint64_t>(elements * size)) {
      return bad(absl::StrCat("tensor ", it.key(), ": ", end - begin, " bytes for shape x ", t.dtype, " = ", elements * size));
    }
    t.bytes = data.substr(8 + n + begin, end - begin);
    ranges.emplace_back(begin, end);
    out[it.key()] = std::move(t);
  }
  std::sort(ranges.begin(), ranges.end());
  uint64_t covered = 0;
  for (const auto& [b, e] : ranges) {
    if (b != covered) return bad(absl::StrCat("byte range at ", b, " leaves a gap or overlaps (expected ", covered, ")"));
    covered = e;
  }
  if (covered != buffer) return bad(absl::StrCat("tensors cover ", covered, " of ", buffer, " buffer bytes"));
  return out;
}

absl::StatusOr<std::string> HfConfigJson(const ops::ModelSpec& spec, int64_t max_positions, ExportDType dtype) {
  switch (spec.family) {
    case ops::Family::kLlama:
      return LlamaConfigJson(spec, max_positions, dtype);
    case ops::Family::kMamba2:
      return Mamba2ConfigJson(spec, dtype);
    case ops::Family::kXlstmLarge:
      return XlstmLargeConfigJson(spec, dtype);
    case ops::Family::kXlstm:
      break;
  }
  return Refuse(spec, "transformers' xLSTM (xLSTMForCausalLM) is the xLSTM Large/7B layout (MODELS.md §1.5: "
                      "post-up-projection mLSTM, no conv, no learnable skip, SwiGLU FFN, soft-capped gates), "
                      "not our NeurIPS xLSTM blocks; Llama, Mamba-2 and xLSTM Large (xlstm-7b, "
                      "xlstm-large-*) models are exportable");
}

absl::StatusOr<ExportDType> ParseExportDType(const std::string& flag, const std::string& text) {
  for (ExportDType d : {ExportDType::kF32, ExportDType::kBF16, ExportDType::kF16})
    if (text == ExportDTypeName(d)) return d;
  return absl::InvalidArgumentError(
      absl::StrCat(flag, " \"", text, "\": expected f32, bf16 or f16 (the element type of model.safetensors)"));
}

const char* ExportDTypeName(ExportDType dtype) {
  switch (dtype) {
    case ExportDType::kBF16: return "bf16";
    case ExportDType::kF16: return "f16";
    case ExportDType::kF32: break;
  }
  return "f32";
}

const char* SafetensorsDType(ExportDType dtype) {
  switch (dtype) {
    case ExportDType::kBF16: return "BF16";
    case ExportDType::kF16: return "F16";
    case ExportDType::kF32: break;
  }
  return "F32";
}

const char* TorchDType(ExportDType dtype) {
  switch (dtype) {
    case ExportDType::kBF16: return "bfloat16";
    case ExportDType::kF16: return "float16";
    case ExportDType::kF32: break;
  }
  return "float32";
}

// binary16: 1 sign, 5 exponent (bias 15), 10 mantissa bits; normal from 2^-14, subnormal steps of
// 2^-24, largest finite 65504. Each branch rounds the dropped f32 bits to nearest, ties to even.
uint16_t FloatToF16(float value) {
  uint32_t u;
  std::memcpy(&u, &value, 4);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return sign | 0x7e00u | static_cast<uint16_t>((abs >> 13) & 0x3ffu);  // quiet NaN
  if (abs >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 (65504 + half a step, odd: ties up): inf
  if (abs < 0x38800000u) {                        // below 2^-14: an f16 subnormal or zero
    if (abs <= 0x33000000u) return sign;          // <= 2^-25 (2^-25 is the tie with 2^-24: even 0)
    // value = significand * 2^(exp - 150); in steps of 2^-24 that is significand >> (126 - exp).
    const uint32_t significand = (abs & 0x7fffffu) | 0x800000u;  // f32 subnormals went to 0 above
    const int shift = 126 - static_cast<int>(abs >> 23);         // 14 .. 24
    uint32_t q = significand >> shift;
    const uint32_t rest = significand & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rest > half || (rest == half && (q & 1u))) ++q;  // may carry into 0x400: 2^-14, normal
    return sign | static_cast<uint16_t>(q);
  }
  uint32_t h = (abs >> 13) - (112u << 10);  // rebias 127 -> 15, top 10 mantissa bits
  const uint32_t rest = abs & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // carry may step the exponent (< inf here)
  return sign | static_cast<uint16_t>(h);
}

absl::StatusOr<std::map<std::string, SafetensorsTensor>> HfTensors(ops::LanguageModel* model,
                                                                   std::vector<std::string>* dropped,
                                                                   ExportDType dtype) {
  ASSIGN_OR_RETURN(std::vector<PlannedTensor> plan, PlanHfTensors(model, dropped));
  std::map<std::string, SafetensorsTensor> tensors;
  for (const PlannedTensor& p : plan) {
    SafetensorsTensor t{.dtype = SafetensorsDType(dtype), .shape = p.shape};
    t.bytes.reserve(p.source->value.numel() * ElementBytes(dtype));
    RETURN_IF_ERROR(StreamConverted(*p.source, p.name, dtype, [&](std::string_view piece) {
      t.bytes.append(piece);
      return absl::OkStatus();
    }));
    tensors[p.name] = std::move(t);
  }
  return tensors;
}

absl::StatusOr<ExportResult> ExportHf(Env* env, ops::LanguageModel* model, int64_t max_positions,
                                      const std::string& out_dir, const ExportOptions& options) {
  ASSIGN_OR_RETURN(std::string config, HfConfigJson(model->spec(), max_positions, options.dtype));
  ExportResult result;
  ASSIGN_OR_RETURN(std::vector<PlannedTensor> plan, PlanHfTensors(model, &result.dropped));
  result.tensors = static_cast<int64_t>(plan.size());
  RETURN_IF_ERROR(env->CreateDirs(out_dir));
  result.safetensors_path = out_dir + "/model.safetensors";
  result.config_path = out_dir + "/config.json";
  // The header first (offsets from shapes alone), then each tensor converted piece by piece: the
  // bytes of the file never exist in memory together (the file comment's "Memory").
  std::vector<HeaderEntry> entries;
  for (const PlannedTensor& p : plan) {
    entries.push_back({p.name, SafetensorsDType(options.dtype), p.shape,
                       static_cast<uint64_t>(p.source->value.numel()) * ElementBytes(options.dtype)});
  }
  const std::string tmp = result.safetensors_path + ".tmp";
  absl::Status written = [&]() -> absl::Status {
    ASSIGN_OR_RETURN(std::unique_ptr<WritableFile> file, env->NewWritableFile(tmp));
    absl::Status st = file->Append(SafetensorsHeader(entries, {{"format", "pt"}}));
    for (size_t i = 0; i < plan.size() && st.ok(); ++i) {
      st = StreamConverted(*plan[i].source, plan[i].name, options.dtype,
                           [&](std::string_view piece) { return file->Append(piece); });
    }
    if (st.ok()) st = file->Sync();
    const absl::Status closed = file->Close();
    return st.ok() ? closed : st;
  }();
  if (!written.ok()) {
    if (env->Exists(tmp)) env->RemoveFile(tmp).IgnoreError();
    return written;
  }
  RETURN_IF_ERROR(env->Rename(tmp, result.safetensors_path));
  RETURN_IF_ERROR(env->SyncDir(out_dir));
  RETURN_IF_ERROR(WriteFileAtomically(env, result.config_path, config));
  return result;
}

}  // namespace gyre::eval
