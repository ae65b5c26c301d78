// Export of a Llama checkpoint to the Hugging Face layout: `model.safetensors` + `config.json`
// (LlamaForCausalLM), so transformers' `AutoModelForCausalLM.from_pretrained(dir)` loads it.
//
// Scope: Llama-family specs whose blocks are all plain Llama blocks (RMSNorm, GQA attention with
// full rotate-half RoPE — the same pairing as transformers' Llama —, SwiGLU MLP, no biases).
// Mamba-2 / xLSTM / hybrids, partial rotary or qkv-conv attention are refused with the reason:
// transformers' Mamba2 and xLSTM layouts are not mapped (yet). With MTP heads, the exported model
// is the next-token model (trunk + head 1, which is named like the ordinary last layer); the
// extra heads have no place in LlamaForCausalLM and are left out (reported in `dropped`).
//
// Name map: embedding.weight -> model.embed_tokens.weight; blocks.i.attn_norm -> model.layers.i.
// input_layernorm; blocks.i.attn.{q,k,v,o}_proj -> model.layers.i.self_attn.*; blocks.i.mlp_norm
// -> model.layers.i.post_attention_layernorm; blocks.i.mlp.{gate,up,down}_proj -> model.layers.i.
// mlp.*; final_norm -> model.norm; lm_head -> lm_head (absent when tied). Linear weights are
// [out, in] on both sides; tensors are written as F32.
//
// safetensors format (huggingface/safetensors README): u64 little-endian header size N, N bytes
// of UTF-8 JSON {name: {dtype, shape, data_offsets: [begin, end)}, "__metadata__": {...}}
// (padded with spaces to a multiple of 8), then the byte buffer; offsets are relative to it.
//
// Thread-safety: pure functions.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "base/env.h"
#include "ops/model.h"

namespace gyre::eval {

struct SafetensorsTensor {
  std::string dtype;            // "F32", ...
  std::vector<int64_t> shape;
  std::string bytes;
};

// Serialises tensors (ordered by name) into the safetensors byte layout.
std::string EncodeSafetensors(const std::map<std::string, SafetensorsTensor>& tensors,
                              const std::map<std::string, std::string>& metadata);
// Parses and validates a safetensors buffer: header size in bounds, JSON well-formed, known dtypes,
// byte ranges matching shape x dtype size, in bounds, non-overlapping and covering the buffer.
// Errors name `where` and the tensor.
absl::StatusOr<std::map<std::string, SafetensorsTensor>> DecodeSafetensors(const std::string& data,
                                                                           const std::string& where);

struct ExportResult {
  std::string safetensors_path, config_path;
  int64_t tensors = 0;
  std::vector<std::string> dropped;  // parameters not exported (MTP heads 2..n)
};

// The transformers config.json of a spec (FailedPrecondition naming the reason when the spec is
// not exportable). `max_positions`: max_position_embeddings (the training seq_len).
absl::StatusOr<std::string> HfLlamaConfigJson(const ops::ModelSpec& spec, int64_t max_positions);

// Writes <out_dir>/model.safetensors and <out_dir>/config.json (atomically, through `env`).
absl::StatusOr<ExportResult> ExportHfLlama(Env* env, ops::LanguageModel* model, int64_t max_positions,
                                           const std::string& out_dir);

}  // namespace gyre::eval
