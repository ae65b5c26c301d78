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
// Name maps (linear weights [out, in] on both sides; tensors written as F32):
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
// not exportable). `max_positions`: Llama's max_position_embeddings (the training seq_len);
// Mamba2Config has no such field.
absl::StatusOr<std::string> HfConfigJson(const ops::ModelSpec& spec, int64_t max_positions);

// The model's parameters under their transformers names (F32, transformers' shapes); MTP heads
// 2..n go to `dropped`. Checks names only, not exportability (HfConfigJson does): InternalError
// for a parameter without a name in the family's map (an xLSTM block).
absl::StatusOr<std::map<std::string, SafetensorsTensor>> HfTensors(ops::LanguageModel* model,
                                                                   std::vector<std::string>* dropped);

// Writes <out_dir>/model.safetensors and <out_dir>/config.json (atomically, through `env`).
absl::StatusOr<ExportResult> ExportHf(Env* env, ops::LanguageModel* model, int64_t max_positions,
                                      const std::string& out_dir);

}  // namespace gyre::eval
