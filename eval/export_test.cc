#include "eval/export.h"

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "eval/test_models.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "ops/rng.h"

namespace gyre::eval {
namespace {

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// transformers' LlamaForCausalLM forward (modeling_llama.py: RMSNorm in fp32, rotate_half RoPE
// with inv_freq = theta^(-2i/D), repeat_kv for GQA, causal softmax(q k / sqrt(D)), SwiGLU MLP),
// written from the exported files alone in float64: it knows nothing about ops/.
class HfLlamaReference {
 public:
  HfLlamaReference(std::map<std::string, SafetensorsTensor> w, nlohmann::json c) : w_(std::move(w)), c_(std::move(c)) {}

  // Logits [T, V] of ids.
  std::vector<double> Forward(const std::vector<int32_t>& ids) const {
    const int64_t T = ids.size(), d = c_["hidden_size"], V = c_["vocab_size"], L = c_["num_hidden_layers"];
    const int64_t H = c_["num_attention_heads"], Hk = c_["num_key_value_heads"], D = c_["head_dim"];
    const double eps = c_["rms_norm_eps"], theta = c_["rope_theta"];
    std::vector<double> h(T * d);
    const std::vector<double> emb = Get("model.embed_tokens.weight");
    for (int64_t t = 0; t < T; ++t)
      for (int64_t j = 0; j < d; ++j) h[t * d + j] = emb[ids[t] * d + j];
    for (int64_t l = 0; l < L; ++l) {
      const std::string p = "model.layers." + std::to_string(l) + ".";
      std::vector<double> a = RmsNorm(h, Get(p + "input_layernorm.weight"), d, eps);
      std::vector<double> q = Linear(a, Get(p + "self_attn.q_proj.weight"), T, d, H * D);
      std::vector<double> k = Linear(a, Get(p + "self_attn.k_proj.weight"), T, d, Hk * D);
      std::vector<double> v = Linear(a, Get(p + "self_attn.v_proj.weight"), T, d, Hk * D);
      Rope(&q, T, H, D, theta);
      Rope(&k, T, Hk, D, theta);
      std::vector<double> o(T * H * D, 0.0);
      for (int64_t hh = 0; hh < H; ++hh) {
        const int64_t kv = hh / (H / Hk);
        for (int64_t i = 0; i < T; ++i) {
          std::vector<double> s(i + 1);
          double mx = -1e300, sum = 0;
          for (int64_t j = 0; j <= i; ++j) {
            double dot = 0;
            for (int64_t e = 0; e < D; ++e) dot += q[(i * H + hh) * D + e] * k[(j * Hk + kv) * D + e];
            s[j] = dot / std::sqrt(static_cast<double>(D));
            mx = std::max(mx, s[j]);
          }
          for (double& x : s) sum += x = std::exp(x - mx);
          for (int64_t j = 0; j <= i; ++j)
            for (int64_t e = 0; e < D; ++e) o[(i * H + hh) * D + e] += s[j] / sum * v[(j * Hk + kv) * D + e];
        }
      }
      std::vector<double> attn = Linear(o, Get(p + "self_attn.o_proj.weight"), T, H * D, d);
      for (int64_t i = 0; i < T * d; ++i) h[i] += attn[i];
      std::vector<double> m = RmsNorm(h, Get(p + "post_attention_layernorm.weight"), d, eps);
      const int64_t F = c_["intermediate_size"];
      std::vector<double> g = Linear(m, Get(p + "mlp.gate_proj.weight"), T, d, F);
      std::vector<double> u = Linear(m, Get(p + "mlp.up_proj.weight"), T, d, F);
      for (int64_t i = 0; i < T * F; ++i) g[i] = g[i] / (1 + std::exp(-g[i])) * u[i];
      std::vector<double> down = Linear(g, Get(p + "mlp.down_proj.weight"), T, F, d);
      for (int64_t i = 0; i < T * d; ++i) h[i] += down[i];
    }
    std::vector<double> n = RmsNorm(h, Get("model.norm.weight"), d, eps);
    return Linear(n, Get(c_["tie_word_embeddings"] ? "model.embed_tokens.weight" : "lm_head.weight"), T, d, V);
  }

 private:
  std::vector<double> Get(const std::string& name) const {
    auto it = w_.find(name);
    EXPECT_NE(it, w_.end()) << "missing " << name;
    if (it == w_.end()) return {};
    std::vector<double> out(it->second.bytes.size() / 4);
    const float* f = reinterpret_cast<const float*>(it->second.bytes.data());
    for (size_t i = 0; i < out.size(); ++i) out[i] = f[i];
    return out;
  }
  static std::vector<double> RmsNorm(const std::vector<double>& x, const std::vector<double>& w, int64_t d, double eps) {
    std::vector<double> y(x.size());
    for (size_t r = 0; r < x.size() / d; ++r) {
      double ms = 0;
      for (int64_t j = 0; j < d; ++j) ms += x[r * d + j] * x[r * d + j];
      const double inv = 1 / std::sqrt(ms / d + eps);
      for (int64_t j = 0; j < d; ++j) y[r * d + j] = w[j] * (x[r * d + j] * inv);
    }
    return y;
  }
  // x [T, in] times W [out, in] transposed (nn.Linear).
  static std::vector<double> Linear(const std::vector<double>& x, const std::vector<double>& w, int64_t T, int64_t in,
                                    int64_t out) {
    std::vector<double> y(T * out, 0.0);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t o = 0; o < out; ++o) {
        double acc = 0;
        for (int64_t i = 0; i < in; ++i) acc += x[t * in + i] * w[o * in + i];
        y[t * out + o] = acc;
      }
    return y;
  }
  static void Rope(std::vector<double>* x, int64_t T, int64_t heads, int64_t D, double theta) {
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < heads; ++h) {
        double* v = x->data() + (t * heads + h) * D;
        for (int64_t i = 0; i < D / 2; ++i) {
          const double angle = t * std::pow(theta, -2.0 * i / D);
          const double a = v[i], b = v[i + D / 2];
          v[i] = a * std::cos(angle) - b * std::sin(angle);
          v[i + D / 2] = b * std::cos(angle) + a * std::sin(angle);
        }
      }
  }
  std::map<std::string, SafetensorsTensor> w_;
  nlohmann::json c_;
};

std::string Tmp(const std::string& name) {
  const char* base = std::getenv("TEST_TMPDIR");
  return std::string(base ? base : "/tmp") + "/" + name;
}

void ExpectExportMatchesReference(const ops::ModelSpec& spec, const std::string& dir, size_t dropped) {
  auto model = ops::LanguageModel::Create(spec, ops::DType::kF32, ops::Device::kCpu, 12);
  ASSERT_TRUE(model.ok()) << model.status();
  // Perturb every parameter (norm scales start at exactly 1) so each one matters.
  ops::Rng rng(4);
  for (ops::Parameter* p : (*model)->params().All())
    for (int64_t i = 0; i < p->value.numel(); ++i) p->value.Set(i, p->value.At(i) + 0.1 * rng.Normal());
  absl::StatusOr<ExportResult> exported = ExportHfLlama(Env::Default(), model->get(), 64, dir);
  ASSERT_TRUE(exported.ok()) << exported.status();
  EXPECT_EQ(exported->dropped.size(), dropped);
  auto tensors = DecodeSafetensors(ReadAll(exported->safetensors_path), exported->safetensors_path);
  ASSERT_TRUE(tensors.ok()) << tensors.status();
  EXPECT_EQ(static_cast<int64_t>(tensors->size()), exported->tensors);
  const nlohmann::json config = nlohmann::json::parse(ReadAll(exported->config_path));
  EXPECT_EQ(config["architectures"][0], "LlamaForCausalLM");
  EXPECT_EQ(config["num_hidden_layers"], spec.n_layers());
  EXPECT_EQ(config["max_position_embeddings"], 64);

  const std::vector<int32_t> ids = {3, 17, 0, 9, 22, 4, 4, 11};
  ops::Tensor ours = (*model)->Logits(ids, 1, static_cast<int64_t>(ids.size()));
  HfLlamaReference reference(*tensors, config);
  const std::vector<double> want = reference.Forward(ids);
  ASSERT_EQ(static_cast<int64_t>(want.size()), ours.numel());
  double worst = 0, scale = 0;
  for (int64_t i = 0; i < ours.numel(); ++i) {
    worst = std::max(worst, std::abs(ours.At(i) - want[i]));
    scale = std::max(scale, std::abs(want[i]));
  }
  // fp32 model vs float64 reference over a few layers: ~1e-6 relative; a wrong name, layout,
  // RoPE pairing or GQA grouping moves logits by O(scale).
  EXPECT_LT(worst, 1e-4 * scale) << "max |ours - reference| " << worst << " (logit scale " << scale << ")";
}

TEST(ExportTest, LlamaForwardOnTheExportedFilesMatchesOurs) {
  ExpectExportMatchesReference(testing::TinySpec("llama", 1), Tmp("export_llama"), 0);
}

TEST(ExportTest, MtpModelExportsTheNextTokenModel) {
  ExpectExportMatchesReference(testing::TinySpec("llama", 3), Tmp("export_mtp"), 2 * 9);
}

TEST(ExportTest, TiedEmbeddings) {
  ops::ModelSpec spec = testing::TinySpec("llama", 1);
  spec.tie_embeddings = true;
  ExpectExportMatchesReference(spec, Tmp("export_tied"), 0);
}

TEST(ExportTest, NonLlamaModelsAreRefusedWithTheReason) {
  for (const char* family : {"mamba2", "xlstm", "hybrid"}) {
    auto model = ops::LanguageModel::Create(testing::TinySpec(family, 1), ops::DType::kF32, ops::Device::kCpu, 1);
    ASSERT_TRUE(model.ok());
    auto r = ExportHfLlama(Env::Default(), model->get(), 64, Tmp("export_refused"));
    ASSERT_FALSE(r.ok()) << family;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_NE(r.status().message().find("Llama"), std::string::npos) << r.status();
  }
}

TEST(SafetensorsTest, RoundTripAndValidation) {
  std::map<std::string, SafetensorsTensor> t;
  t["b"] = {.dtype = "F32", .shape = {2, 1}, .bytes = std::string(8, '\x01')};
  t["a"] = {.dtype = "I8", .shape = {3}, .bytes = "xyz"};
  const std::string data = EncodeSafetensors(t, {{"format", "pt"}});
  uint64_t n = 0;
  std::memcpy(&n, data.data(), 8);
  EXPECT_EQ(n % 8, 0u);
  EXPECT_EQ(data.size(), 8 + n + 11);
  auto back = DecodeSafetensors(data, "mem");
  ASSERT_TRUE(back.ok()) << back.status();
  ASSERT_EQ(back->size(), 2u);
  EXPECT_EQ((*back)["a"].bytes, "xyz");
  EXPECT_EQ((*back)["b"].shape, (std::vector<int64_t>{2, 1}));
  // Damage: truncated buffer, header size past the end, wrong byte count.
  EXPECT_FALSE(DecodeSafetensors(data.substr(0, data.size() - 1), "mem").ok());
  std::string big = data;
  big[7] = '\x7f';
  EXPECT_FALSE(DecodeSafetensors(big, "mem").ok());
  t["a"].shape = {4};
  auto wrong = DecodeSafetensors(EncodeSafetensors(t, {}), "file.safetensors");
  ASSERT_FALSE(wrong.ok());
  EXPECT_NE(wrong.status().message().find("file.safetensors: tensor a"), std::string::npos) << wrong.status();
}

}  // namespace
}  // namespace gyre::eval
