#include "eval/export.h"

#include <cstring>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "nlohmann/json.hpp"

namespace gyre::eval {
namespace {

int64_t DTypeBytes(const std::string& dtype) {
  static const std::map<std::string, int64_t> kSizes = {{"F64", 8}, {"F32", 4}, {"F16", 2}, {"BF16", 2}, {"I64", 8},
                                                        {"I32", 4}, {"I16", 2}, {"I8", 1},  {"U8", 1},   {"BOOL", 1}};
  auto it = kSizes.find(dtype);
  return it == kSizes.end() ? -1 : it->second;
}

// The HF name of one of our parameter names, or "" when it has no place in LlamaForCausalLM.
std::string HfName(const std::string& name) {
  static const std::vector<std::pair<std::string, std::string>> kInBlock = {
      {"attn_norm.weight", "input_layernorm.weight"},
      {"attn.q_proj.weight", "self_attn.q_proj.weight"},
      {"attn.k_proj.weight", "self_attn.k_proj.weight"},
      {"attn.v_proj.weight", "self_attn.v_proj.weight"},
      {"attn.o_proj.weight", "self_attn.o_proj.weight"},
      {"mlp_norm.weight", "post_attention_layernorm.weight"},
      {"mlp.gate_proj.weight", "mlp.gate_proj.weight"},
      {"mlp.up_proj.weight", "mlp.up_proj.weight"},
      {"mlp.down_proj.weight", "mlp.down_proj.weight"}};
  if (name == "embedding.weight") return "model.embed_tokens.weight";
  if (name == "final_norm.weight") return "model.norm.weight";
  if (name == "lm_head.weight") return "lm_head.weight";
  if (!absl::StartsWith(name, "blocks.")) return "";
  const size_t dot = name.find('.', 7);
  if (dot == std::string::npos) return "";
  const std::string layer = name.substr(7, dot - 7), rest = name.substr(dot + 1);
  for (const auto& [ours, hf] : kInBlock)
    if (rest == ours) return absl::StrCat("model.layers.", layer, ".", hf);
  return "";
}

}  // namespace

std::string EncodeSafetensors(const std::map<std::string, SafetensorsTensor>& tensors,
                              const std::map<std::string, std::string>& metadata) {
  nlohmann::ordered_json header;
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    header[name] = {{"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {offset, offset + t.bytes.size()}}};
    offset += t.bytes.size();
  }
  std::string json = header.dump();
  while (json.size() % 8 != 0) json.push_back(' ');
  std::string out(8, '\0');
  const uint64_t n = json.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  out += json;
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

absl::StatusOr<std::string> HfLlamaConfigJson(const ops::ModelSpec& spec, int64_t max_positions) {
  if (spec.family != ops::Family::kLlama) {
    return absl::FailedPreconditionError(absl::StrCat("export supports Llama models only; ", spec.preset,
                                                      " is a Mamba-2 / xLSTM model (transformers' layouts for those are not mapped)"));
  }
  for (ops::BlockType b : spec.blocks) {
    if (b != ops::BlockType::kAttention) {
      return absl::FailedPreconditionError(absl::StrCat("export: ", spec.preset, " has a ", ops::BlockTypeName(b),
                                                        " block; only all-attention Llama models are exportable"));
    }
  }
  if (!spec.attn_mlp || spec.attn_qkv_conv != 0 || (spec.attn_rotary_dim != 0 && spec.attn_rotary_dim != spec.attn_head_dim)) {
    return absl::FailedPreconditionError("export: attention without MLP, qkv conv or partial rotary has no LlamaForCausalLM equivalent");
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
  c["torch_dtype"] = "float32";
  return c.dump(2) + "\n";
}

absl::StatusOr<ExportResult> ExportHfLlama(Env* env, ops::LanguageModel* model, int64_t max_positions,
                                           const std::string& out_dir) {
  ASSIGN_OR_RETURN(std::string config, HfLlamaConfigJson(model->spec(), max_positions));
  ExportResult result;
  std::map<std::string, SafetensorsTensor> tensors;
  for (ops::Parameter* p : model->params().All()) {
    const std::string hf = HfName(p->name);
    if (hf.empty()) {
      if (absl::StartsWith(p->name, "mtp_heads.")) {
        result.dropped.push_back(p->name);
        continue;
      }
      return absl::InternalError(absl::StrCat("export: no transformers name for parameter ", p->name));
    }
    const ops::Tensor host = p->value.device() == ops::Device::kCpu ? p->value : p->value.ToDevice(ops::Device::kCpu);
    const ops::Tensor f32 = host.dtype() == ops::DType::kF32 ? host : host.To(ops::DType::kF32);
    SafetensorsTensor t{.dtype = "F32", .shape = f32.shape()};
    t.bytes.assign(static_cast<const char*>(f32.raw()), f32.nbytes());
    tensors[hf] = std::move(t);
  }
  result.tensors = static_cast<int64_t>(tensors.size());
  RETURN_IF_ERROR(env->CreateDirs(out_dir));
  result.safetensors_path = out_dir + "/model.safetensors";
  result.config_path = out_dir + "/config.json";
  RETURN_IF_ERROR(WriteFileAtomically(env, result.safetensors_path, EncodeSafetensors(tensors, {{"format", "pt"}})));
  RETURN_IF_ERROR(WriteFileAtomically(env, result.config_path, config));
  return result;
}

}  // namespace gyre::eval
