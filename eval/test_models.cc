#include "eval/test_models.h"

#include "ops/check.h"

namespace gyre::eval::testing {

gyre::v1::ModelConfig TinyModelConfig(const std::string& family, int64_t mtp_heads, int64_t vocab) {
  gyre::v1::ModelConfig c;
  c.set_d_model(16);
  c.set_vocab_size(vocab);
  c.set_pad_vocab_to(1);
  c.set_mtp_heads(mtp_heads);
  c.set_n_layers(2);
  if (family == "llama") {
    c.set_preset("llama-tiny");
    c.mutable_attention()->set_num_heads(4);
    c.mutable_attention()->set_num_kv_heads(2);
    c.mutable_attention()->set_head_dim(4);
    c.mutable_attention()->set_ffn_dim(32);
  } else if (family == "xlstm") {
    c.set_preset("xlstm-tiny");
    c.add_slstm_at(0);
    c.mutable_xlstm()->set_chunk_size(4);
    c.mutable_xlstm()->set_slstm_heads(2);
  } else {
    c.set_preset(family == "hybrid" ? "hybrid-tiny" : "mamba2-tiny");
    c.mutable_mamba2()->set_head_dim(4);
    c.mutable_mamba2()->set_d_state(4);
    c.mutable_mamba2()->set_n_groups(1);
    c.mutable_mamba2()->set_chunk_size(4);
    c.mutable_attention()->set_num_heads(2);
    c.mutable_attention()->set_head_dim(8);
    c.mutable_attention()->set_ffn_dim(32);
    if (family == "hybrid") c.add_attention_at(0);
  }
  return c;
}

ops::ModelSpec TinySpec(const std::string& family, int64_t mtp_heads, int64_t vocab) {
  auto spec = ops::ResolveModelConfig(TinyModelConfig(family, mtp_heads, vocab));
  GYRE_CHECK(spec.ok(), "%s", std::string(spec.status().message()).c_str());
  return *spec;
}

}  // namespace gyre::eval::testing
