// Export of a checkpoint to the Hugging Face layout: `model.safetensors` + `config.json`, so
// transformers' `AutoModelForCausalLM.from_pretrained(dir)` loads it as LlamaForCausalLM,
// Mamba2ForCausalLM or xLSTMForCausalLM (the spec's family picks). Checked in transformers
// itself: tools/hf_check/.
//
// Exportable: (a) Llama specs whose blocks are all plain Llama blocks (RMSNorm, GQA attention with
// full rotate-half RoPE, the pairing of transformers' Llama, SwiGLU MLP, no biases); (b) Mamba-2
// specs whose blocks are all Mamba-2 blocks with n_groups = 1 (every state-spaces/mamba2 preset);
// (c) xLSTM Large specs (Family::kXlstmLarge: xlstm-7b, xlstm-large-*; MODELS.md §1.5) with both
// soft caps on and an FFN width that is a multiple of 64.
// Refused with the reason (FailedPrecondition):
//   - the NeurIPS xLSTM (Family::kXlstm): transformers' xLSTM is the xLSTM Large/7B layout
//     (post-up-projection mLSTM, no conv, no learnable skip, SwiGLU FFN, soft-capped gates);
//   - xLSTM Large with a cap off (0): xLSTMConfig's caps are floats, "off" has no spelling;
//   - hybrids (Mamba-2 with attention layers): Mamba2ForCausalLM has Mamba-2 mixers only;
//   - Mamba-2 with n_groups > 1: transformers' gated RMSNorm (MambaRMSNormGated) normalises over
//     all expand*d_model features, ours per group of expand*d_model / n_groups (as mamba_ssm's
//     RMSNormGated(group_size = d_inner / ngroups)); B and C would map, the norm would not;
//   - Llama with partial rotary, qkv conv or no MLP (the hybrids' attention mixer).
// With MTP heads, the exported model is the next-token model (trunk + head 1, which is named like
// the ordinary last layer); heads 2..n have no place in either class and are left out (`dropped`).
//
// Name maps (linear weights [out, in] on both sides; tensors written as F32, or BF16 / F16 with
// ExportOptions::dtype, below):
//   Llama: embedding.weight -> model.embed_tokens.weight; blocks.i.attn_norm -> model.layers.i.
//     input_layernorm; blocks.i.attn.{q,k,v,o}_proj -> model.layers.i.self_attn.*; blocks.i.
//     mlp_norm -> model.layers.i.post_attention_layernorm; blocks.i.mlp.{gate,up,down}_proj ->
//     model.layers.i.mlp.*; final_norm -> model.norm; lm_head -> lm_head (absent when tied).
//   Mamba-2: embedding.weight -> backbone.embeddings.weight; blocks.i.norm -> backbone.layers.i.
//     norm; blocks.i.{in_proj, out_proj, A_log, dt_bias, D, conv1d.bias} -> backbone.layers.i.
//     mixer.* (in_proj rows [z | x | B | C | dt] in both); blocks.i.conv1d.weight [C, K] ->
//     mixer.conv1d.weight [C, 1, K] (nn.Conv1d depthwise, same bytes, same tap order: y_t =
//     b + sum_j w_j x_{t-(K-1)+j}); blocks.i.gated_norm -> mixer.norm (y * SiLU(z), then RMSNorm,
//     in both); final_norm -> backbone.norm_f; lm_head -> lm_head (absent when tied).
//   xLSTM Large ("single" weight mode): embedding.weight -> backbone.embeddings.weight;
//     blocks.i.norm_mlstm -> backbone.blocks.i.norm_mlstm; blocks.i.mlstm.{q, k, v} ->
//     backbone.blocks.i.mlstm_layer.{q, k, v} (5.17; older 5.x
//     source spelled them query/key/value); blocks.i.mlstm.{ogate_preact,
//     igate_preact (weight, bias), fgate_preact (weight, bias), multihead_norm, out_proj} ->
//     backbone.blocks.i.mlstm_layer.* (same names); blocks.i.norm_ffn -> backbone.blocks.i.norm_ffn;
//     blocks.i.ffn.{gate_proj, up_proj, down_proj} -> backbone.blocks.i.ffn.{proj_up_gate, proj_up,
//     proj_down}; final_norm -> backbone.out_norm; lm_head -> lm_head (always written: a tied spec
//     gets a copy of the embedding, tie_word_embeddings false). Heads are contiguous slices of the
//     feature axis on both sides (q/k/v [.., NH, dk|dv], the per-head norm's weight [NH*dv]).
//     Not in the config: transformers' xLSTMCache sizes its states from qk_dim / v_dim rounded up
//     to multiples of 64, so with qk_dim or v_dim not a multiple of 64 (xlstm-large-tiny: qk 32)
//     a forward with use_cache=True (the default; generate) fails on the state shape; use_cache=
//     False is exact. xlstm-7b (qk 2048, v 4096) is unaffected.
//
// dtype (`gyre export --dtype f32|bf16|f16`, default f32: the files of earlier sessions, byte for
// byte): bf16 / f16 convert the fp32 masters with round-to-nearest-even (bf16: ops::FloatToBf16,
// the conversion the CUDA path's weight casts are checked against; f16: FloatToF16 below, IEEE
// binary16 with subnormals), NaN stays a (quiet) NaN and ±inf stays ±inf; a finite master whose
// rounding overflows (|x| >= 65520 for f16, >= 3.3961e38 for bf16) is refused, naming the
// parameter, instead of becoming inf. The safetensors dtype tag is "F32" / "BF16" / "F16" and
// config.json's torch_dtype "float32" / "bfloat16" / "float16" (published xLSTM-7B, Mamba-2 and
// Llama checkpoints are bf16: 13.7 GB for xlstm-7b instead of 27).
// Memory: ExportHf streams: it writes the header (computed from shapes alone), then each tensor
// converted in pieces of 64K elements straight into the file; beside the model it holds one
// piece (f32 masters on the CPU: none; a parameter on the GPU: one host copy of that tensor).
// (Until session 21 it built every tensor's bytes in a map, then the whole file in one string:
// two full copies of the model.) HfTensors / EncodeSafetensors build in memory, for tests.
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

// The element type of an export (see the file comment).
enum class ExportDType { kF32, kBF16, kF16 };
struct ExportOptions {
  ExportDType dtype = ExportDType::kF32;
};
// "f32" / "bf16" / "f16" (the `--dtype` values); InvalidArgument naming `flag` otherwise.
absl::StatusOr<ExportDType> ParseExportDType(const std::string& flag, const std::string& text);
const char* ExportDTypeName(ExportDType dtype);    // "f32", "bf16", "f16"
const char* SafetensorsDType(ExportDType dtype);   // "F32", "BF16", "F16"
const char* TorchDType(ExportDType dtype);         // "float32", "bfloat16", "float16"
// IEEE binary16 bits of `value`, round to nearest even (subnormals kept; overflow gives ±inf; NaN
// a quiet NaN of the same sign). The project had no f16 conversion; bf16 is ops::FloatToBf16.
uint16_t FloatToF16(float value);

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
// not exportable). `max_positions`: Llama's max_position_embeddings (the training seq_len);
// Mamba2Config has no such field.
// `dtype`: config.json's torch_dtype.
absl::StatusOr<std::string> HfConfigJson(const ops::ModelSpec& spec, int64_t max_positions,
                                         ExportDType dtype = ExportDType::kF32);

// The model's parameters under their transformers names (transformers' shapes, converted to
// `dtype`), in memory; MTP heads 2..n go to `dropped`. Checks names only, not exportability
// (HfConfigJson does): InternalError for a parameter without a name in the family's map (an xLSTM
// block); FailedPrecondition for a finite value that overflows `dtype`.
absl::StatusOr<std::map<std::string, SafetensorsTensor>> HfTensors(ops::LanguageModel* model,
                                                                   std::vector<std::string>* dropped,
                                                                   ExportDType dtype = ExportDType::kF32);

// Writes <out_dir>/model.safetensors (streamed: the file comment's "Memory") and
// <out_dir>/config.json, each atomically (temp file, sync, rename) through `env`. On an error
// nothing is left under either name (the temp file is removed).
absl::StatusOr<ExportResult> ExportHf(Env* env, ops::LanguageModel* model, int64_t max_positions,
                                      const std::string& out_dir, const ExportOptions& options = {});

}  // namespace gyre::eval
