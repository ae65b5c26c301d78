#include "eval/export.h"

#include <cfloat>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>

#include "base/mem_env.h"
#include "cli/run_config.h"
#include "eval/checkpoint_model.h"
#include "eval/test_models.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "ops/rng.h"
#include "worker/checkpoint.h"

namespace gyre::eval {
namespace {

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// Float64 pieces of the transformers references below, written from the exported files alone.
// x [T, in] times W [out, in] transposed (nn.Linear).
std::vector<double> Linear(const std::vector<double>& x, const std::vector<double>& w, int64_t T, int64_t in,
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

// RMSNorm (layer = false) or LayerNorm without bias (layer = true) over each of `groups` slices,
// then the weight over all d features.
std::vector<double> Norm(const std::vector<double>& x, const std::vector<double>& w, int64_t d, int64_t groups,
                         bool layer, double eps) {
  std::vector<double> y(x.size());
  const int64_t gs = d / groups;
  for (size_t r = 0; r < x.size() / d; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      const double* row = &x[r * d + g * gs];
      double mean = 0, var = 0;
      if (layer) {
        for (int64_t j = 0; j < gs; ++j) mean += row[j];
        mean /= gs;
      }
      for (int64_t j = 0; j < gs; ++j) var += (row[j] - mean) * (row[j] - mean);
      const double inv = 1 / std::sqrt(var / gs + eps);
      for (int64_t j = 0; j < gs; ++j) y[r * d + g * gs + j] = w[g * gs + j] * ((row[j] - mean) * inv);
    }
  return y;
}

// RMSNorm of rows of d features, each of `groups` equal slices normalised on its own.
std::vector<double> RmsNorm(const std::vector<double>& x, const std::vector<double>& w, int64_t d, int64_t groups,
                            double eps) {
  return Norm(x, w, d, groups, /*layer=*/false, eps);
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
      std::vector<double> a = RmsNorm(h, Get(p + "input_layernorm.weight"), d, 1, eps);
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
      std::vector<double> m = RmsNorm(h, Get(p + "post_attention_layernorm.weight"), d, 1, eps);
      const int64_t F = c_["intermediate_size"];
      std::vector<double> g = Linear(m, Get(p + "mlp.gate_proj.weight"), T, d, F);
      std::vector<double> u = Linear(m, Get(p + "mlp.up_proj.weight"), T, d, F);
      for (int64_t i = 0; i < T * F; ++i) g[i] = g[i] / (1 + std::exp(-g[i])) * u[i];
      std::vector<double> down = Linear(g, Get(p + "mlp.down_proj.weight"), T, F, d);
      for (int64_t i = 0; i < T * d; ++i) h[i] += down[i];
    }
    std::vector<double> n = RmsNorm(h, Get("model.norm.weight"), d, 1, eps);
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

std::vector<double> F64(const std::map<std::string, SafetensorsTensor>& w, const std::string& name) {
  auto it = w.find(name);
  EXPECT_NE(it, w.end()) << "missing " << name;
  if (it == w.end()) return {};
  std::vector<double> out(it->second.bytes.size() / 4);
  const float* f = reinterpret_cast<const float*>(it->second.bytes.data());
  for (size_t i = 0; i < out.size(); ++i) out[i] = f[i];
  return out;
}

// transformers' Mamba2ForCausalLM forward (modeling_mamba2.py, torch_forward without cache):
// per layer, residual + mixer(RMSNorm(h)); mixer: in_proj -> [gate z | xBC | dt]; xBC through the
// depthwise nn.Conv1d (padding K-1, first T outputs) and SiLU, split [x | B | C]; dt =
// softplus(dt + dt_bias) (time_step_limit (0, inf): no clamp); A = -exp(A_log); B, C of group g
// serve heads g*H/G .. (g+1)*H/G - 1 (repeat_interleave); y = SSM(x) + D x; MambaRMSNormGated:
// y * SiLU(z), then RMSNorm over all expand*d features (`norm_groups` = 1; norm_groups = G
// normalises each group instead, as mamba_ssm's RMSNormGated(group_size) and ours do); out_proj.
// The SSM runs as the plain sequential recurrence in float64 (the chunked form is the same sum).
// Written from the exported files alone: it knows nothing about ops/.
class HfMamba2Reference {
 public:
  HfMamba2Reference(std::map<std::string, SafetensorsTensor> w, nlohmann::json c, int64_t norm_groups = 1)
      : w_(std::move(w)), c_(std::move(c)), norm_groups_(norm_groups) {}

  std::vector<double> Forward(const std::vector<int32_t>& ids) const {
    const int64_t T = ids.size(), d = c_["hidden_size"], V = c_["vocab_size"], L = c_["num_hidden_layers"];
    const int64_t H = c_["num_heads"], P = c_["head_dim"], N = c_["state_size"], G = c_["n_groups"];
    const int64_t K = c_["conv_kernel"], di = static_cast<int64_t>(c_["expand"]) * d;
    const int64_t conv_dim = di + 2 * G * N, proj = di + conv_dim + H;
    const double eps = c_["layer_norm_epsilon"];
    EXPECT_EQ(H * P, di);
    std::vector<double> h(T * d);
    const std::vector<double> emb = F64(w_, "backbone.embeddings.weight");
    for (int64_t t = 0; t < T; ++t)
      for (int64_t j = 0; j < d; ++j) h[t * d + j] = emb[ids[t] * d + j];
    for (int64_t l = 0; l < L; ++l) {
      const std::string p = "backbone.layers." + std::to_string(l) + ".";
      const std::string m = p + "mixer.";
      std::vector<double> u = RmsNorm(h, F64(w_, p + "norm.weight"), d, 1, eps);
      std::vector<double> zxd = Linear(u, F64(w_, m + "in_proj.weight"), T, d, proj);
      const std::vector<double> cw = F64(w_, m + "conv1d.weight"), cb = F64(w_, m + "conv1d.bias");
      std::vector<double> xbc(T * conv_dim);
      for (int64_t t = 0; t < T; ++t)
        for (int64_t ch = 0; ch < conv_dim; ++ch) {
          double acc = cb[ch];
          for (int64_t k = 0; k < K; ++k) {
            const int64_t src = t - (K - 1) + k;
            if (src >= 0) acc += cw[ch * K + k] * zxd[src * proj + di + ch];
          }
          xbc[t * conv_dim + ch] = Silu(acc);
        }
      const std::vector<double> A_log = F64(w_, m + "A_log"), dt_bias = F64(w_, m + "dt_bias"), D = F64(w_, m + "D");
      std::vector<double> y(T * di);
      for (int64_t hh = 0; hh < H; ++hh) {
        const int64_t g = hh / (H / G);
        const double A = -std::exp(A_log[hh]);
        std::vector<double> state(P * N, 0.0);
        for (int64_t t = 0; t < T; ++t) {
          const double raw = zxd[t * proj + di + conv_dim + hh] + dt_bias[hh];
          const double dt = raw > 20 ? raw : std::log1p(std::exp(raw));
          const double decay = std::exp(dt * A);
          const double* x = &xbc[t * conv_dim + hh * P];
          const double* B = &xbc[t * conv_dim + di + g * N];
          const double* C = &xbc[t * conv_dim + di + G * N + g * N];
          for (int64_t pp = 0; pp < P; ++pp) {
            double out = 0;
            for (int64_t n = 0; n < N; ++n) {
              double& s = state[pp * N + n];
              s = decay * s + dt * x[pp] * B[n];
              out += s * C[n];
            }
            y[t * di + hh * P + pp] = out + D[hh] * x[pp];
          }
        }
      }
      for (int64_t t = 0; t < T; ++t)
        for (int64_t j = 0; j < di; ++j) y[t * di + j] *= Silu(zxd[t * proj + j]);
      std::vector<double> gated = RmsNorm(y, F64(w_, m + "norm.weight"), di, norm_groups_, eps);
      std::vector<double> out = Linear(gated, F64(w_, m + "out_proj.weight"), T, di, d);
      for (int64_t i = 0; i < T * d; ++i) h[i] += out[i];
    }
    std::vector<double> n = RmsNorm(h, F64(w_, "backbone.norm_f.weight"), d, 1, eps);
    return Linear(n, F64(w_, c_["tie_word_embeddings"] ? "backbone.embeddings.weight" : "lm_head.weight"), T, d, V);
  }

 private:
  static double Silu(double x) { return x / (1 + std::exp(-x)); }
  std::map<std::string, SafetensorsTensor> w_;
  nlohmann::json c_;
  int64_t norm_groups_;
};

// transformers' xLSTMForCausalLM forward (modeling_xlstm.py, the native PyTorch backend, "single"
// weight mode), written from the exported files alone in float64: it knows nothing about ops/.
// Per block: x += out_proj( sigmoid(ogate_preact(u)) * MultiHeadLayerNorm(mLSTM(q, k, v, ĩ, f̃)) ),
// u = RMSNorm(x) (x * rsqrt(mean x² + norm_eps) * weight); q, k, v = mlstm_layer.q/k/v(u) split into
// num_heads contiguous slices; ĩ, f̃ = soft_cap(igate/fgate_preact(u) incl. bias, gate_soft_cap);
// then x += proj_down( SiLU(proj_up_gate(u')) * proj_up(u') ), u' = RMSNorm(x). After the blocks
// out_norm, lm_head, soft_cap(logits, output_logit_soft_cap). The cell runs as transformers'
// mlstm_recurrent_step_native over every token (its "inference" mode runs the chunkwise kernel on
// the largest multiple of chunk_size first; the chunkwise form is the same sum with the same
// stabiliser m): m_t = max(logsigmoid(f̃) + m_{t-1}, ĩ), C, n updated with exp(· - m_t),
// h = (q̂ C) / (max(|q̂·n|, exp(-m_t)) + eps), q̂ = q / sqrt(dk), zero initial state.
// The MultiHeadLayerNorm normalises each head's dv features (biased variance, eps inside the
// rsqrt) and then scales all v_dim features by its weight. `cap_gates_after_bias` false moves the
// gate cap before the bias (a wrong order, for the negative test).
class HfXlstmLargeReference {
 public:
  HfXlstmLargeReference(std::map<std::string, SafetensorsTensor> w, nlohmann::json c, bool cap_gates_after_bias = true)
      : w_(std::move(w)), c_(std::move(c)), cap_after_bias_(cap_gates_after_bias) {}

  std::vector<double> Forward(const std::vector<int32_t>& ids) const {
    const int64_t T = ids.size(), d = c_["hidden_size"], V = c_["vocab_size"], L = c_["num_blocks"];
    const int64_t H = c_["num_heads"];
    // xLSTMLayer: int(hidden_size * factor); xLSTMFeedForward: round_up(hidden_size * factor, 64).
    const int64_t qk = static_cast<int64_t>(d * static_cast<double>(c_["qk_dim_factor"]));
    const int64_t vd = static_cast<int64_t>(d * static_cast<double>(c_["v_dim_factor"]));
    const int64_t F = static_cast<int64_t>(std::floor((d * static_cast<double>(c_["ffn_proj_factor"]) + 63) / 64) * 64);
    const int64_t dk = qk / H, dv = vd / H;
    const double norm_eps = c_["norm_eps"], eps = c_["eps"], gate_cap = c_["gate_soft_cap"];
    const double logit_cap = c_["output_logit_soft_cap"];
    std::vector<double> h(T * d);
    const std::vector<double> emb = F64(w_, "backbone.embeddings.weight");
    for (int64_t t = 0; t < T; ++t)
      for (int64_t j = 0; j < d; ++j) h[t * d + j] = emb[ids[t] * d + j];
    for (int64_t l = 0; l < L; ++l) {
      const std::string p = "backbone.blocks." + std::to_string(l) + ".";
      const std::string m = p + "mlstm_layer.";
      std::vector<double> u = Norm(h, F64(w_, p + "norm_mlstm.weight"), d, 1, false, norm_eps);
      std::vector<double> q = Linear(u, F64(w_, m + "q.weight"), T, d, qk);
      std::vector<double> k = Linear(u, F64(w_, m + "k.weight"), T, d, qk);
      std::vector<double> v = Linear(u, F64(w_, m + "v.weight"), T, d, vd);
      std::vector<double> o = Linear(u, F64(w_, m + "ogate_preact.weight"), T, d, vd);
      std::vector<double> ig = Gate(u, m + "igate_preact", T, d, H, gate_cap);
      std::vector<double> fg = Gate(u, m + "fgate_preact", T, d, H, gate_cap);
      std::vector<double> cell(T * vd);
      for (int64_t hh = 0; hh < H; ++hh) {
        std::vector<double> C(dk * dv, 0.0), n(dk, 0.0);
        double mstate = 0;
        for (int64_t t = 0; t < T; ++t) {
          const double* qt = &q[t * qk + hh * dk];
          const double* kt = &k[t * qk + hh * dk];
          const double* vt = &v[t * vd + hh * dv];
          const double fl = -std::log1p(std::exp(-fg[t * H + hh]));  // logsigmoid
          const double it = ig[t * H + hh];
          const double mnew = std::max(fl + mstate, it);
          const double fa = std::exp(fl + mstate - mnew), ia = std::exp(it - mnew);
          mstate = mnew;
          for (int64_t a = 0; a < dk; ++a) {
            for (int64_t b = 0; b < dv; ++b) C[a * dv + b] = fa * C[a * dv + b] + ia * kt[a] * vt[b];
            n[a] = fa * n[a] + ia * kt[a];
          }
          const double scale = 1 / std::sqrt(static_cast<double>(dk));
          double qn = 0;
          for (int64_t a = 0; a < dk; ++a) qn += qt[a] * scale * n[a];
          const double denom = std::max(std::abs(qn), std::exp(-mstate)) + eps;
          for (int64_t b = 0; b < dv; ++b) {
            double num = 0;
            for (int64_t a = 0; a < dk; ++a) num += qt[a] * scale * C[a * dv + b];
            cell[t * vd + hh * dv + b] = num / denom;
          }
        }
      }
      std::vector<double> hn = Norm(cell, F64(w_, m + "multihead_norm.weight"), vd, H, true, norm_eps);
      for (int64_t i = 0; i < T * vd; ++i) hn[i] *= 1 / (1 + std::exp(-o[i]));
      std::vector<double> y = Linear(hn, F64(w_, m + "out_proj.weight"), T, vd, d);
      for (int64_t i = 0; i < T * d; ++i) h[i] += y[i];
      std::vector<double> u2 = Norm(h, F64(w_, p + "norm_ffn.weight"), d, 1, false, norm_eps);
      std::vector<double> g = Linear(u2, F64(w_, p + "ffn.proj_up_gate.weight"), T, d, F);
      std::vector<double> up = Linear(u2, F64(w_, p + "ffn.proj_up.weight"), T, d, F);
      for (int64_t i = 0; i < T * F; ++i) g[i] = g[i] / (1 + std::exp(-g[i])) * up[i];
      std::vector<double> down = Linear(g, F64(w_, p + "ffn.proj_down.weight"), T, F, d);
      for (int64_t i = 0; i < T * d; ++i) h[i] += down[i];
    }
    std::vector<double> hn = Norm(h, F64(w_, "backbone.out_norm.weight"), d, 1, false, norm_eps);
    std::vector<double> logits = Linear(hn, F64(w_, "lm_head.weight"), T, d, V);
    for (double& x : logits) x = logit_cap * std::tanh(x / logit_cap);
    return logits;
  }

 private:
  // soft_cap(Linear(u) + bias) (or, wrongly, soft_cap(Linear(u)) + bias).
  std::vector<double> Gate(const std::vector<double>& u, const std::string& name, int64_t T, int64_t d, int64_t H,
                           double cap) const {
    std::vector<double> g = Linear(u, F64(w_, name + ".weight"), T, d, H);
    const std::vector<double> b = F64(w_, name + ".bias");
    for (int64_t t = 0; t < T; ++t)
      for (int64_t hh = 0; hh < H; ++hh) {
        double& x = g[t * H + hh];
        x = cap_after_bias_ ? cap * std::tanh((x + b[hh]) / cap) : cap * std::tanh(x / cap) + b[hh];
      }
    return g;
  }
  std::map<std::string, SafetensorsTensor> w_;
  nlohmann::json c_;
  bool cap_after_bias_;
};

std::string Tmp(const std::string& name) {
  const char* base = std::getenv("TEST_TMPDIR");
  return std::string(base ? base : "/tmp") + "/" + name;
}

// A CPU fp32 model of `spec` with every parameter perturbed (norm scales start at exactly 1, D at
// 1, conv biases and A_log at structured values), so each one matters.
std::unique_ptr<ops::LanguageModel> PerturbedModel(const ops::ModelSpec& spec, ops::DType dtype = ops::DType::kF32) {
  auto model = ops::LanguageModel::Create(spec, dtype, ops::Device::kCpu, 12);
  EXPECT_TRUE(model.ok()) << model.status();
  if (!model.ok()) return nullptr;
  ops::Rng rng(4);
  for (ops::Parameter* p : (*model)->params().All())
    for (int64_t i = 0; i < p->value.numel(); ++i) p->value.Set(i, p->value.At(i) + 0.1 * rng.Normal());
  return std::move(*model);
}

// max |ours - want| over max |want| of our logits of `ids` against a reference's.
double RelativeError(ops::LanguageModel* model, const std::vector<int32_t>& ids, const std::vector<double>& want) {
  ops::Tensor ours = model->Logits(ids, 1, static_cast<int64_t>(ids.size()));
  EXPECT_EQ(static_cast<int64_t>(want.size()), ours.numel());
  if (static_cast<int64_t>(want.size()) != ours.numel()) return 1e300;
  double worst = 0, scale = 0;
  for (int64_t i = 0; i < ours.numel(); ++i) {
    worst = std::max(worst, std::abs(ours.At(i) - want[i]));
    scale = std::max(scale, std::abs(want[i]));
  }
  EXPECT_GT(scale, 0.1);  // logits that carry signal, not a degenerate all-zero model
  return worst / scale;
}

// Exports a perturbed model of `spec`, decodes what was written and compares our logits with the
// transformers forward written from the files. fp32 model vs float64 reference over a few layers:
// ~1e-6 relative; a wrong name, layout, RoPE pairing, GQA or B/C grouping, conv tap order or gate
// order moves logits by O(scale).
void ExpectExportMatchesReference(const ops::ModelSpec& spec, const std::string& dir, size_t dropped) {
  std::unique_ptr<ops::LanguageModel> model = PerturbedModel(spec);
  ASSERT_NE(model, nullptr);
  absl::StatusOr<ExportResult> exported = ExportHf(Env::Default(), model.get(), 64, dir);
  ASSERT_TRUE(exported.ok()) << exported.status();
  EXPECT_EQ(exported->dropped.size(), dropped);
  auto tensors = DecodeSafetensors(ReadAll(exported->safetensors_path), exported->safetensors_path);
  ASSERT_TRUE(tensors.ok()) << tensors.status();
  EXPECT_EQ(static_cast<int64_t>(tensors->size()), exported->tensors);
  const bool mamba2 = spec.family == ops::Family::kMamba2, xlarge = spec.family == ops::Family::kXlstmLarge;
  // xLSTMForCausalLM always gets its lm_head (a copy of the embedding when tied).
  EXPECT_EQ(tensors->count("lm_head.weight"), spec.tie_embeddings && !xlarge ? 0u : 1u);
  const nlohmann::json config = nlohmann::json::parse(ReadAll(exported->config_path));
  EXPECT_EQ(config["num_hidden_layers"], spec.n_layers());
  EXPECT_EQ(config["tie_word_embeddings"], spec.tie_embeddings && !xlarge);
  EXPECT_EQ(config["architectures"][0],
            mamba2 ? "Mamba2ForCausalLM" : xlarge ? "xLSTMForCausalLM" : "LlamaForCausalLM");
  if (xlarge) {
    // The widths transformers derives from the factors are ours.
    const int64_t d = spec.d_model;
    EXPECT_EQ(static_cast<int64_t>(d * static_cast<double>(config["qk_dim_factor"])), spec.xl_qk_dim);
    EXPECT_EQ(static_cast<int64_t>(d * static_cast<double>(config["v_dim_factor"])), spec.xl_v_dim);
    EXPECT_EQ((*tensors)["backbone.blocks.0.mlstm_layer.q.weight"].shape,
              (std::vector<int64_t>{spec.xl_qk_dim, d}));
    EXPECT_EQ((*tensors)["backbone.blocks.0.ffn.proj_down.weight"].shape, (std::vector<int64_t>{d, spec.ffn_dim}));
    EXPECT_EQ((*tensors)["backbone.blocks.0.mlstm_layer.igate_preact.bias"].shape,
              (std::vector<int64_t>{spec.xl_heads}));
    if (spec.tie_embeddings) {
      EXPECT_EQ((*tensors)["lm_head.weight"].bytes, (*tensors)["backbone.embeddings.weight"].bytes);
    }
  } else if (mamba2) {
    EXPECT_EQ(config["num_heads"], spec.ssm_expand * spec.d_model / spec.ssm_head_dim);
    EXPECT_EQ(config["n_groups"], 1);
    const int64_t conv_dim = spec.ssm_expand * spec.d_model + 2 * spec.ssm_state;
    EXPECT_EQ((*tensors)["backbone.layers.0.mixer.conv1d.weight"].shape,
              (std::vector<int64_t>{conv_dim, 1, spec.ssm_conv}));
  } else {
    EXPECT_EQ(config["max_position_embeddings"], 64);
  }
  // Odd lengths: one token, shorter than a chunk, several chunks plus a remainder.
  for (const std::vector<int32_t>& ids : std::vector<std::vector<int32_t>>{
           {5}, {3, 17, 0, 9, 22, 4, 4}, {3, 17, 0, 9, 22, 4, 4, 11, 1, 8, 19, 2, 7}}) {
    const std::vector<double> want = mamba2   ? HfMamba2Reference(*tensors, config).Forward(ids)
                                     : xlarge ? HfXlstmLargeReference(*tensors, config).Forward(ids)
                                              : HfLlamaReference(*tensors, config).Forward(ids);
    const double err = RelativeError(model.get(), ids, want);
    std::printf("%s T=%zu: max |ours - transformers reference| / max |reference| = %.3e\n", spec.preset.c_str(),
                ids.size(), err);
    EXPECT_LT(err, 1e-5) << "length " << ids.size();
  }
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

TEST(ExportTest, Mamba2ForwardOnTheExportedFilesMatchesOurs) {
  ExpectExportMatchesReference(testing::TinySpec("mamba2", 1), Tmp("export_mamba2"), 0);
}

TEST(ExportTest, Mamba2Untied) {
  ops::ModelSpec spec = testing::TinySpec("mamba2", 1);
  spec.tie_embeddings = false;
  ExpectExportMatchesReference(spec, Tmp("export_mamba2_untied"), 0);
}

TEST(ExportTest, Mamba2MtpModelExportsTheNextTokenModel) {
  ExpectExportMatchesReference(testing::TinySpec("mamba2", 3), Tmp("export_mamba2_mtp"), 2 * 9);
}

// A small xLSTM Large (MODELS.md §1.5 layout): d 16, 2 blocks, 2 heads (dk 4, dv 8), FFN 64,
// chunk 4 (so lengths 7 and 13 run several chunks and a remainder in ours), vocabulary 23.
gyre::v1::ModelConfig XlstmLargeConfig(int64_t mtp_heads, double gate_cap = 0, double logit_cap = 0) {
  gyre::v1::ModelConfig c;
  c.set_preset("xlstm-large-tiny");
  c.set_d_model(16);
  c.set_n_layers(2);
  c.set_vocab_size(23);
  c.set_pad_vocab_to(1);
  c.set_mtp_heads(mtp_heads);
  c.mutable_xlstm_large()->set_num_heads(2);
  c.mutable_xlstm_large()->set_chunk_size(4);
  c.mutable_xlstm_large()->set_gate_soft_cap(gate_cap);
  c.mutable_xlstm_large()->set_logit_soft_cap(logit_cap);
  return c;
}

ops::ModelSpec XlstmLargeSpec(int64_t mtp_heads, double gate_cap = 0, double logit_cap = 0) {
  auto spec = ops::ResolveModelConfig(XlstmLargeConfig(mtp_heads, gate_cap, logit_cap));
  EXPECT_TRUE(spec.ok()) << spec.status();
  return spec.ok() ? *spec : ops::ModelSpec{};
}

// The preset caps (15, 30): the perturbed input-gate bias (-10) sits where tanh bends.
TEST(ExportTest, XlstmLargeForwardOnTheExportedFilesMatchesOurs) {
  const ops::ModelSpec spec = XlstmLargeSpec(1);
  EXPECT_EQ(spec.xl_qk_dim, 8);
  EXPECT_EQ(spec.ffn_dim, 64);
  ExpectExportMatchesReference(spec, Tmp("export_xlarge"), 0);
}

// Caps small enough that both act hard (gates saturate near ±2, logits near ±1.5), with MTP
// heads (heads 2..3 dropped: 15 parameters each).
TEST(ExportTest, XlstmLargeTightCapsAndMtp) {
  ExpectExportMatchesReference(XlstmLargeSpec(3, 2.0, 1.5), Tmp("export_xlarge_caps"), 2 * 15);
}

TEST(ExportTest, XlstmLargeTiedExportsACopyOfTheEmbedding) {
  ops::ModelSpec spec = XlstmLargeSpec(1, 2.0, 1.5);
  spec.tie_embeddings = true;
  ExpectExportMatchesReference(spec, Tmp("export_xlarge_tied"), 0);
}

// The reference can tell a wrong map from a right one: i/f gates swapped, the gate cap applied
// before the bias, q and k swapped, the logit cap left out, each misses ours by far more than the
// 1e-5 the right map meets.
TEST(ExportTest, XlstmLargeWrongMapsAreDetected) {
  const ops::ModelSpec spec = XlstmLargeSpec(1, 2.0, 1.5);
  std::unique_ptr<ops::LanguageModel> model = PerturbedModel(spec);
  ASSERT_NE(model, nullptr);
  std::vector<std::string> dropped;
  auto tensors = HfTensors(model.get(), &dropped);
  ASSERT_TRUE(tensors.ok()) << tensors.status();
  auto text = HfConfigJson(spec, 64);
  ASSERT_TRUE(text.ok()) << text.status();
  const nlohmann::json config = nlohmann::json::parse(*text);
  const std::vector<int32_t> ids = {3, 17, 0, 9, 22, 4, 4, 11, 1};
  EXPECT_LT(RelativeError(model.get(), ids, HfXlstmLargeReference(*tensors, config).Forward(ids)), 1e-5);
  auto swapped = [&](const std::string& a, const std::string& b) {
    std::map<std::string, SafetensorsTensor> t = *tensors;
    std::swap(t[a], t[b]);
    return RelativeError(model.get(), ids, HfXlstmLargeReference(t, config).Forward(ids));
  };
  const std::string m = "backbone.blocks.0.mlstm_layer.";
  std::map<std::string, SafetensorsTensor> gates = *tensors;
  std::swap(gates[m + "igate_preact.weight"], gates[m + "fgate_preact.weight"]);
  std::swap(gates[m + "igate_preact.bias"], gates[m + "fgate_preact.bias"]);
  const double if_swapped = RelativeError(model.get(), ids, HfXlstmLargeReference(gates, config).Forward(ids));
  const double qk_swapped = swapped(m + "q.weight", m + "k.weight");
  const double cap_order =
      RelativeError(model.get(), ids, HfXlstmLargeReference(*tensors, config, /*cap_gates_after_bias=*/false).Forward(ids));
  nlohmann::json uncapped = config;
  uncapped["output_logit_soft_cap"] = 1e6;
  const double no_logit_cap = RelativeError(model.get(), ids, HfXlstmLargeReference(*tensors, uncapped).Forward(ids));
  std::printf("wrong maps: i/f swapped %.3e, q/k swapped %.3e, gate cap before bias %.3e, no logit cap %.3e\n",
              if_swapped, qk_swapped, cap_order, no_logit_cap);
  EXPECT_GT(if_swapped, 1e-2);
  EXPECT_GT(qk_swapped, 1e-2);
  EXPECT_GT(cap_order, 1e-2);
  EXPECT_GT(no_logit_cap, 1e-2);
}

// Our float64 model against the float64 reference: equal to rounding (the same function, the
// chunkwise form with its remainder against transformers' recurrent step), not merely close.
TEST(ExportTest, XlstmLargeFloat64ModelEqualsTheReference) {
  const ops::ModelSpec spec = XlstmLargeSpec(1, 2.0, 1.5);
  std::unique_ptr<ops::LanguageModel> model = PerturbedModel(spec, ops::DType::kF64);
  ASSERT_NE(model, nullptr);
  std::vector<std::string> dropped;
  auto tensors = HfTensors(model.get(), &dropped);  // F32 on export: the reference reads those
  ASSERT_TRUE(tensors.ok()) << tensors.status();
  auto text = HfConfigJson(spec, 64);
  ASSERT_TRUE(text.ok()) << text.status();
  // Round the model's parameters to what was exported, so both sides hold the same numbers.
  for (ops::Parameter* p : model->params().All())
    for (int64_t i = 0; i < p->value.numel(); ++i) p->value.Set(i, static_cast<float>(p->value.At(i)));
  const std::vector<int32_t> ids = {3, 17, 0, 9, 22, 4, 4, 11, 1, 8, 19, 2, 7};
  const double err =
      RelativeError(model.get(), ids, HfXlstmLargeReference(*tensors, nlohmann::json::parse(*text)).Forward(ids));
  std::printf("xlstm-large float64 model vs float64 reference, T=13: %.3e\n", err);
  EXPECT_LT(err, 1e-12);
}

// The config of the published 7B shape (MODELS.md §1.5; transformers' xLSTMConfig defaults are
// the 7B's): every field the forward reads, and the widths transformers derives from them.
TEST(ExportTest, Xlstm7bConfigIsTransformersDefaults) {
  gyre::v1::ModelConfig c;
  c.set_preset("xlstm-7b");
  auto spec = ops::ResolveModelConfig(c);
  ASSERT_TRUE(spec.ok()) << spec.status();
  auto text = HfConfigJson(*spec, 4096);
  ASSERT_TRUE(text.ok()) << text.status();
  const nlohmann::json j = nlohmann::json::parse(*text);
  EXPECT_EQ(j["model_type"], "xlstm");
  EXPECT_EQ(j["hidden_size"], 4096);
  EXPECT_EQ(j["embedding_dim"], 4096);
  EXPECT_EQ(j["num_blocks"], 32);
  EXPECT_EQ(j["num_heads"], 8);
  EXPECT_EQ(j["vocab_size"], 50304);
  EXPECT_EQ(j["qk_dim_factor"], 0.5);
  EXPECT_EQ(j["v_dim_factor"], 1.0);
  EXPECT_EQ(j["ffn_proj_factor"], 2.667);
  EXPECT_EQ(j["ffn_round_up_to_multiple_of"], 64);
  EXPECT_EQ(static_cast<int64_t>(std::floor((4096 * 2.667 + 63) / 64) * 64), 10944);
  EXPECT_EQ(j["gate_soft_cap"], 15.0);
  EXPECT_EQ(j["output_logit_soft_cap"], 30.0);
  EXPECT_EQ(j["norm_eps"], 1e-6);
  EXPECT_EQ(j["eps"], 1e-6);
  EXPECT_EQ(j["chunk_size"], 64);
  EXPECT_EQ(j["weight_mode"], "single");
  EXPECT_EQ(j["use_bias"], false);
  EXPECT_EQ(j["tie_word_embeddings"], false);
}

TEST(ExportTest, XlstmLargeWithACapOffOrAnOddFfnIsRefused) {
  ops::ModelSpec spec = XlstmLargeSpec(1);
  spec.gate_soft_cap = 0;
  auto r = HfConfigJson(spec, 64);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(r.status().message().find("no xLSTMConfig spelling"), std::string::npos) << r.status();
  spec = XlstmLargeSpec(1);
  spec.ffn_dim = 100;
  r = HfConfigJson(spec, 64);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("not a multiple of 64"), std::string::npos) << r.status();
  // A width that int(d * factor) cannot give back does not occur with integers: qk 24 of d 16.
  spec = XlstmLargeSpec(1);
  spec.xl_qk_dim = 24;
  r = HfConfigJson(spec, 64);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(static_cast<int64_t>(16 * static_cast<double>(nlohmann::json::parse(*r)["qk_dim_factor"])), 24);
}

// n_groups > 1 is refused, and the test shows why: with the weights mapped by the same names, the
// transformers forward (one gated-norm group) misses ours by O(1), while the same forward with a
// per-group gated norm matches ours, so B/C grouping and everything else map, the norm does not.
TEST(ExportTest, Mamba2WithGroupsIsRefusedBecauseOfTheGatedNorm) {
  gyre::v1::ModelConfig c = testing::TinyModelConfig("mamba2", 1);
  c.mutable_mamba2()->set_n_groups(2);
  auto spec = ops::ResolveModelConfig(c);
  ASSERT_TRUE(spec.ok()) << spec.status();
  std::unique_ptr<ops::LanguageModel> model = PerturbedModel(*spec);
  ASSERT_NE(model, nullptr);
  auto refused = ExportHf(Env::Default(), model.get(), 64, Tmp("export_grouped"));
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(refused.status().message().find("MambaRMSNormGated"), std::string::npos) << refused.status();
  EXPECT_FALSE(std::filesystem::exists(Tmp("export_grouped") + "/config.json"));

  std::vector<std::string> dropped;
  auto tensors = HfTensors(model.get(), &dropped);
  ASSERT_TRUE(tensors.ok()) << tensors.status();
  ops::ModelSpec one_group = *spec;
  one_group.ssm_groups = 1;
  auto text = HfConfigJson(one_group, 64);
  ASSERT_TRUE(text.ok()) << text.status();
  nlohmann::json config = nlohmann::json::parse(*text);
  config["n_groups"] = 2;
  const std::vector<int32_t> ids = {3, 17, 0, 9, 22, 4, 4, 11, 1};
  const double whole = RelativeError(model.get(), ids, HfMamba2Reference(*tensors, config, 1).Forward(ids));
  const double grouped = RelativeError(model.get(), ids, HfMamba2Reference(*tensors, config, 2).Forward(ids));
  std::printf("n_groups 2: relative error against the transformers norm %.3e, against a per-group norm %.3e\n", whole,
              grouped);
  EXPECT_GT(whole, 1e-2);
  EXPECT_LT(grouped, 1e-5);
}

TEST(ExportTest, XlstmAndHybridsAreRefusedWithTheReason) {
  const std::vector<std::pair<std::string, std::string>> cases = {{"xlstm", "xLSTM Large/7B layout"},
                                                                  {"hybrid", "Mamba-2 mixer layers only"}};
  for (const auto& [family, reason] : cases) {
    auto model = ops::LanguageModel::Create(testing::TinySpec(family, 1), ops::DType::kF32, ops::Device::kCpu, 1);
    ASSERT_TRUE(model.ok());
    auto r = ExportHf(Env::Default(), model->get(), 64, Tmp("export_refused"));
    ASSERT_FALSE(r.ok()) << family;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_NE(r.status().message().find(reason), std::string::npos) << r.status();
  }
  EXPECT_FALSE(std::filesystem::exists(Tmp("export_refused")));
  // The hybrids' attention mixer (no MLP, qkv conv, partial rotary) is no Llama layer either.
  ops::ModelSpec llama = testing::TinySpec("llama", 1);
  llama.attn_mlp = false;
  auto r = HfConfigJson(llama, 64);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("no LlamaForCausalLM equivalent"), std::string::npos) << r.status();
}

// What `gyre export` runs (cli/eval_command.cc RunExport): a run directory as the workers leave
// it (config.json + a checkpoint of a model with MTP heads), LoadModelFromRun, ExportHf. The
// export must be the checkpoint's next-token model, by the transformers forward.
void ExpectRunDirectoryExportsLikeGyreExport(const gyre::v1::ModelConfig& model_config, const std::string& name,
                                             size_t dropped) {
  const std::string run = Tmp(name);
  std::filesystem::remove_all(run);
  std::filesystem::create_directories(run);
  gyre::v1::RunConfig config;
  config.set_name("export");
  config.set_seed(3);
  *config.mutable_model() = model_config;
  config.mutable_data()->set_seq_len(32);
  std::ofstream(run + "/config.json") << cli::RunConfigToJson(config);
  auto spec = ops::ResolveModelConfig(config.model());
  ASSERT_TRUE(spec.ok()) << spec.status();
  std::unique_ptr<ops::LanguageModel> trained = PerturbedModel(*spec);
  ASSERT_NE(trained, nullptr);
  CheckpointState state;
  state.step = 6;
  state.config = config;
  for (ops::Parameter* p : trained->params().All()) {
    TensorSnapshot t{.name = "param." + p->name, .dtype = gyre::v1::DTYPE_F32};
    for (int64_t d : p->value.shape()) t.shape.push_back(d);
    t.bytes.assign(static_cast<const char*>(p->value.raw()), p->value.nbytes());
    state.tensors.push_back(std::move(t));
  }
  ASSERT_TRUE(WriteCheckpoint(Env::Default(), run + "/checkpoints", state, /*max_file_bytes=*/1 << 20).ok());

  absl::StatusOr<LoadedModel> loaded = LoadModelFromRun(Env::Default(), {.run_dir = run});
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(loaded->step, 6u);
  auto exported = ExportHf(Env::Default(), loaded->model.get(), loaded->config.data().seq_len(), run + "/hf");
  ASSERT_TRUE(exported.ok()) << exported.status();
  EXPECT_EQ(exported->dropped.size(), dropped);  // MTP head 2
  auto tensors = DecodeSafetensors(ReadAll(exported->safetensors_path), exported->safetensors_path);
  ASSERT_TRUE(tensors.ok()) << tensors.status();
  const nlohmann::json hf_config = nlohmann::json::parse(ReadAll(exported->config_path));
  const std::vector<int32_t> ids = {3, 17, 0, 9, 22, 4, 4, 11, 1};
  const std::vector<double> want = spec->family == ops::Family::kMamba2
                                       ? HfMamba2Reference(*tensors, hf_config).Forward(ids)
                                       : HfXlstmLargeReference(*tensors, hf_config).Forward(ids);
  EXPECT_LT(RelativeError(trained.get(), ids, want), 1e-5);
}

TEST(ExportTest, Mamba2CheckpointOfARunDirectoryExportsLikeGyreExport) {
  ExpectRunDirectoryExportsLikeGyreExport(testing::TinyModelConfig("mamba2", 2), "export_run", 9);
}

TEST(ExportTest, XlstmLargeCheckpointOfARunDirectoryExportsLikeGyreExport) {
  ExpectRunDirectoryExportsLikeGyreExport(XlstmLargeConfig(2), "export_run_xlarge", 15);
}


// ---------------------------------------------------------------------------------------------
// --dtype bf16 / f16. The check of a rounding is independent of the code under test: the exported
// bits are decoded to double by the formats' definitions, and must be the representable value
// nearest to the fp32 master, the even one (last bit 0) on a tie, with NaN -> NaN and ±inf -> ±inf.

// Value of 16-bit `bits` in `dtype`; magnitude 0x7f80 (bf16) / 0x7c00 (f16) is +-2^128 / +-2^16
// there: the "next value" past the largest finite one, which is what rounding compares against.
double Decode16(uint16_t bits, ExportDType dtype) {
  const double sign = (bits & 0x8000u) ? -1.0 : 1.0;
  const uint32_t mag = bits & 0x7fffu;
  if (dtype == ExportDType::kBF16) {
    const int e = static_cast<int>(mag >> 7), m = static_cast<int>(mag & 0x7f);
    if (e == 0) return sign * std::ldexp(m, -133);          // subnormal: m * 2^-126 / 128
    return sign * std::ldexp(128 + m, e - 127 - 7);         // includes e = 255, m = 0: 2^128
  }
  const int e = static_cast<int>(mag >> 10), m = static_cast<int>(mag & 0x3ff);
  if (e == 0) return sign * std::ldexp(m, -24);
  return sign * std::ldexp(1024 + m, e - 15 - 10);           // includes e = 31, m = 0: 2^16
}

bool IsNan16(uint16_t bits, ExportDType dtype) {
  return dtype == ExportDType::kBF16 ? (bits & 0x7fffu) > 0x7f80u : (bits & 0x7fffu) > 0x7c00u;
}
bool IsInf16(uint16_t bits, ExportDType dtype) {
  return (bits & 0x7fffu) == (dtype == ExportDType::kBF16 ? 0x7f80u : 0x7c00u);
}

// "" when `bits` is x rounded to nearest even in `dtype`, else what is wrong. Finite x must not
// overflow (the export refuses those; RoundingOverflowIsRefused checks it).
std::string CheckRounded(float x, uint16_t bits, ExportDType dtype) {
  char buf[160];
  if (std::isnan(x)) {
    if (IsNan16(bits, dtype)) return "";
    std::snprintf(buf, sizeof(buf), "NaN -> 0x%04x", bits);
    return buf;
  }
  if (std::isinf(x)) {
    if (IsInf16(bits, dtype) && ((bits & 0x8000u) != 0) == (x < 0)) return "";
    std::snprintf(buf, sizeof(buf), "%g -> 0x%04x", x, bits);
    return buf;
  }
  if (IsNan16(bits, dtype) || IsInf16(bits, dtype)) {
    std::snprintf(buf, sizeof(buf), "finite %.9g -> non-finite 0x%04x", x, bits);
    return buf;
  }
  const double v = x, d = Decode16(bits, dtype);
  const uint32_t mag = bits & 0x7fffu;
  const double s = (bits & 0x8000u) ? -1.0 : 1.0;
  // Neighbours of d on the number line (magnitude - 1 and + 1; below magnitude 0: -smallest).
  const double up = s * std::abs(Decode16(static_cast<uint16_t>(mag + 1), dtype));
  const double down = mag == 0 ? -s * Decode16(1, dtype) : s * Decode16(static_cast<uint16_t>(mag - 1), dtype);
  const double err = std::abs(v - d), e_up = std::abs(v - up), e_down = std::abs(v - down);
  const bool nearest = err <= e_up && err <= e_down;
  const bool tie = err == e_up || err == e_down;
  const bool sign_ok = v == 0 || d == 0 || (v < 0) == (d < 0);
  if (nearest && sign_ok && (!tie || (bits & 1u) == 0 || err == 0)) {
    // A zero keeps the master's sign (what torch's .to(bfloat16 / float16) does).
    if (d != 0 || std::signbit(v) == ((bits & 0x8000u) != 0)) return "";
  }
  std::snprintf(buf, sizeof(buf), "%.9g -> 0x%04x = %.9g (neighbours %.9g, %.9g)", v, bits, d, down, up);
  return buf;
}

float FloatOfBits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Values that test the rounding's corners, for both formats: zeros, NaN, infinities, f32
// subnormals, f16 subnormals and the subnormal/normal border, 2^-25 (the tie with f16's 0), exact
// ties and values one f32 step either side of a tie in both formats, f16's largest finite value
// and the largest float that still rounds to it.
std::vector<float> CornerValues() {
  std::vector<float> v = {0.0f, -0.0f, std::nanf(""), -std::nanf(""), INFINITY, -INFINITY,
                          1e-40f, -1e-40f, FLT_MIN, FLT_TRUE_MIN, 3e-8f, -3e-8f, 1e-5f, 6.1e-5f,
                          std::ldexp(1.0f, -25), std::ldexp(1.5f, -25), std::ldexp(1.5f, -24), std::ldexp(2.5f, -24),
                          std::ldexp(1.0f, -14), std::ldexp(1023.5f / 1024, -14), 65504.0f,
                          std::nextafter(65520.0f, 0.0f), -std::nextafter(65520.0f, 0.0f), 1.0f, -2.75f, 3.14159265f};
  for (uint32_t hi : {0x3f80u, 0x3f81u, 0xc123u, 0x4000u, 0x0001u}) {   // bf16 ties: low 16 bits 0x8000
    const uint32_t tie = (hi << 16) | 0x8000u;
    for (uint32_t u : {tie - 1, tie, tie + 1}) v.push_back(FloatOfBits(u));
  }
  // f16 ties (low 13 bits 0x1000) below even and odd f16 values, large, and negative.
  for (uint32_t base : {0x3f800000u, 0x3f802000u, 0x46ffe000u, 0xbc002000u}) {
    const uint32_t tie = (base & ~0x1fffu) | 0x1000u;
    for (uint32_t u : {tie - 1, tie, tie + 1}) v.push_back(FloatOfBits(u));
  }
  return v;
}

TEST(ExportDTypeTest, ParseNamesTheFlagOnABadValue) {
  EXPECT_EQ(*ParseExportDType("--dtype", "f32"), ExportDType::kF32);
  EXPECT_EQ(*ParseExportDType("--dtype", "bf16"), ExportDType::kBF16);
  EXPECT_EQ(*ParseExportDType("--dtype", "f16"), ExportDType::kF16);
  for (const char* bad : {"fp8", "BF16", "float16", ""}) {
    auto r = ParseExportDType("--dtype", bad);
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(r.status().message().find("--dtype \"" + std::string(bad) + "\""), std::string::npos) << r.status();
    EXPECT_NE(r.status().message().find("f32, bf16 or f16"), std::string::npos) << r.status();
  }
}

// Every f16 and bf16 tie (the midpoints between neighbouring values, both signs) and one f32
// step either side of it, plus 2^20 random floats over all exponents: the conversions the
// export uses (FloatToF16, ops::FloatToBf16) against CheckRounded.
TEST(ExportDTypeTest, ConversionsRoundToNearestEvenEverywhere) {
  for (ExportDType dtype : {ExportDType::kBF16, ExportDType::kF16}) {
    const auto convert = [&](float x) { return dtype == ExportDType::kBF16 ? ops::FloatToBf16(x) : FloatToF16(x); };
    const uint32_t finite_end = dtype == ExportDType::kBF16 ? 0x7f7fu : 0x7bffu;  // largest finite magnitude
    int64_t checked = 0, failed = 0;
    for (uint32_t mag = 0; mag < finite_end; ++mag) {
      const double mid = (Decode16(static_cast<uint16_t>(mag), dtype) + Decode16(static_cast<uint16_t>(mag + 1), dtype)) / 2;
      const float m = static_cast<float>(mid);
      if (static_cast<double>(m) != mid) continue;  // the midpoint is no float (bf16 subnormals below f32's)
      for (float x : {std::nextafter(m, 0.0f), m, std::nextafter(m, INFINITY)}) {
        for (float sx : {x, -x}) {
          const std::string bad = CheckRounded(sx, convert(sx), dtype);
          ++checked;
          if (!bad.empty() && ++failed <= 5) ADD_FAILURE() << ExportDTypeName(dtype) << ": " << bad;
        }
      }
    }
    ops::Rng rng(21);
    for (int i = 0; i < (1 << 20); ++i) {
      const float x = FloatOfBits(static_cast<uint32_t>(rng.Below(uint64_t{1} << 32)));
      const uint16_t bits = convert(x);
      if (std::isfinite(x) && IsInf16(bits, dtype)) continue;  // overflow: refused by the export
      const std::string bad = CheckRounded(x, bits, dtype);
      ++checked;
      if (!bad.empty() && ++failed <= 10) ADD_FAILURE() << ExportDTypeName(dtype) << ": " << bad;
    }
    for (float x : CornerValues()) {
      const std::string bad = CheckRounded(x, convert(x), dtype);
      ++checked;
      if (!bad.empty() && ++failed <= 15) ADD_FAILURE() << ExportDTypeName(dtype) << ": " << bad;
    }
    std::printf("%s: %lld conversions checked, %lld wrong\n", ExportDTypeName(dtype), (long long)checked,
                (long long)failed);
    EXPECT_EQ(failed, 0);
  }
  // The overflow border: 65519.996 -> 65504, 65520 -> inf (the tie rounds to the even "65536").
  EXPECT_EQ(FloatToF16(std::nextafter(65520.0f, 0.0f)), 0x7bffu);
  EXPECT_EQ(FloatToF16(65520.0f), 0x7c00u);
  EXPECT_EQ(FloatToF16(-65520.0f), 0xfc00u);
  EXPECT_EQ(ops::FloatToBf16(FLT_MAX), 0x7f80u);
}

// An Env that records the size of every Append (over the in-memory Env): the export must reach
// the file in pieces, never as one buffer of the whole file.
class AppendSizeEnv final : public Env {
 public:
  explicit AppendSizeEnv(Env* base) : base_(base) {}
  std::vector<size_t> appends;

  absl::StatusOr<std::unique_ptr<WritableFile>> NewWritableFile(const std::string& path) override {
    auto f = base_->NewWritableFile(path);
    if (!f.ok()) return f.status();
    return std::unique_ptr<WritableFile>(new Recording(std::move(*f), &appends));
  }
  absl::StatusOr<std::string> ReadFile(const std::string& p) override { return base_->ReadFile(p); }
  absl::StatusOr<std::unique_ptr<RandomAccessFile>> NewRandomAccessFile(const std::string& p) override {
    return base_->NewRandomAccessFile(p);
  }
  absl::StatusOr<std::unique_ptr<ReadOnlyRegion>> MapFile(const std::string& p) override { return base_->MapFile(p); }
  absl::Status Rename(const std::string& a, const std::string& b) override { return base_->Rename(a, b); }
  absl::Status SyncDir(const std::string& d) override { return base_->SyncDir(d); }
  absl::Status CreateDirs(const std::string& d) override { return base_->CreateDirs(d); }
  absl::Status RemoveFile(const std::string& p) override { return base_->RemoveFile(p); }
  absl::Status RemoveAll(const std::string& p) override { return base_->RemoveAll(p); }
  absl::StatusOr<std::vector<std::string>> ListDir(const std::string& d) override { return base_->ListDir(d); }
  bool Exists(const std::string& p) override { return base_->Exists(p); }
  absl::StatusOr<uint64_t> FileSize(const std::string& p) override { return base_->FileSize(p); }

 private:
  class Recording final : public WritableFile {
   public:
    Recording(std::unique_ptr<WritableFile> f, std::vector<size_t>* sizes) : f_(std::move(f)), sizes_(sizes) {}
    absl::Status Append(std::string_view data) override {
      sizes_->push_back(data.size());
      return f_->Append(data);
    }
    absl::Status Sync() override { return f_->Sync(); }
    absl::Status Close() override { return f_->Close(); }

   private:
    std::unique_ptr<WritableFile> f_;
    std::vector<size_t>* sizes_;
  };
  Env* base_;
};

// A Llama and a Mamba-2 model (vocab 70000: the embedding, 1.1M elements, spans several 64K
// pieces) with CornerValues written into the embedding, a norm and a projection, exported as f32,
// bf16 and f16 through ExportHf: the header's dtype tags, the shapes and config.json's
// torch_dtype; every exported value against its fp32 master (CheckRounded); the streamed file
// byte-identical to the in-memory EncodeSafetensors(HfTensors(dtype)); f32 bit-identical to the
// masters (the default is the earlier export, byte for byte); the file written in pieces.
TEST(ExportTest, Bf16AndF16ExportsHoldTheRoundedMasters) {
  for (const std::string family : {"llama", "mamba2"}) {
    ops::ModelSpec spec = testing::TinySpec(family, 1, /*vocab=*/70000);
    std::unique_ptr<ops::LanguageModel> model = PerturbedModel(spec);
    ASSERT_NE(model, nullptr);
    const std::vector<float> corners = CornerValues();
    int64_t planted = 0;
    for (ops::Parameter* p : model->params().All()) {
      if (p->name != "embedding.weight" && p->name != "final_norm.weight" && p->name != "blocks.0.attn.q_proj.weight" &&
          p->name != "blocks.0.in_proj.weight") {
        continue;
      }
      float* x = static_cast<float*>(p->value.raw());
      for (size_t i = 0; i < corners.size() && static_cast<int64_t>(i) < p->value.numel(); ++i) {
        x[i * 7 % p->value.numel()] = corners[i];
        ++planted;
      }
    }
    ASSERT_GE(planted, 2 * static_cast<int64_t>(corners.size()));
    std::vector<std::string> dropped;
    auto masters = HfTensors(model.get(), &dropped);  // F32: the masters under their transformers names
    ASSERT_TRUE(masters.ok()) << masters.status();
    for (ExportDType dtype : {ExportDType::kF32, ExportDType::kBF16, ExportDType::kF16}) {
      SCOPED_TRACE(family + " " + ExportDTypeName(dtype));
      std::unique_ptr<Env> mem = NewMemEnv();
      AppendSizeEnv env(mem.get());
      auto exported = ExportHf(&env, model.get(), 64, "/export", {.dtype = dtype});
      ASSERT_TRUE(exported.ok()) << exported.status();
      const std::string file = *mem->ReadFile(exported->safetensors_path);
      EXPECT_FALSE(mem->Exists(exported->safetensors_path + ".tmp"));
      std::vector<std::string> dropped_again;
      auto in_memory = HfTensors(model.get(), &dropped_again, dtype);
      ASSERT_TRUE(in_memory.ok()) << in_memory.status();
      EXPECT_TRUE(file == EncodeSafetensors(*in_memory, {{"format", "pt"}})) << "streamed file differs from the in-memory encoding";
      auto tensors = DecodeSafetensors(file, "model.safetensors");
      ASSERT_TRUE(tensors.ok()) << tensors.status();
      ASSERT_EQ(tensors->size(), masters->size());
      const nlohmann::json config = nlohmann::json::parse(*mem->ReadFile(exported->config_path));
      EXPECT_EQ(config["torch_dtype"], TorchDType(dtype));
      int64_t elements = 0, wrong = 0, nan = 0, inf = 0, subnormal16 = 0, ties = 0;
      for (const auto& [name, t] : *tensors) {
        const SafetensorsTensor& master = masters->at(name);
        EXPECT_EQ(t.dtype, SafetensorsDType(dtype)) << name;
        EXPECT_EQ(t.shape, master.shape) << name;
        const int64_t n = static_cast<int64_t>(master.bytes.size() / 4);
        elements += n;
        if (dtype == ExportDType::kF32) {
          EXPECT_TRUE(t.bytes == master.bytes) << name;
          continue;
        }
        ASSERT_EQ(static_cast<int64_t>(t.bytes.size()), 2 * n) << name;
        for (int64_t i = 0; i < n; ++i) {
          float x;
          uint16_t bits;
          std::memcpy(&x, master.bytes.data() + 4 * i, 4);
          std::memcpy(&bits, t.bytes.data() + 2 * i, 2);
          const std::string bad = CheckRounded(x, bits, dtype);
          if (!bad.empty() && ++wrong <= 5) ADD_FAILURE() << name << "[" << i << "]: " << bad;
          nan += std::isnan(x);
          inf += std::isinf(x);
          uint32_t u;
          std::memcpy(&u, &x, 4);
          const uint16_t exp_bits = dtype == ExportDType::kBF16 ? (bits & 0x7f80u) : (bits & 0x7c00u);
          subnormal16 += exp_bits == 0 && (bits & 0x7fffu) != 0;
          ties += dtype == ExportDType::kBF16 ? (u & 0xffffu) == 0x8000u : (u & 0x1fffu) == 0x1000u && std::abs(x) >= 6.1e-5f;
        }
      }
      EXPECT_EQ(wrong, 0);
      if (dtype != ExportDType::kF32) {
        EXPECT_GE(nan, 6);        // 2 NaN planted in each of 3 tensors
        EXPECT_GE(inf, 6);
        EXPECT_GE(subnormal16, 3);
        EXPECT_GE(ties, 3);
      }
      uint64_t header = 0;
      std::memcpy(&header, file.data(), 8);
      EXPECT_EQ(file.size(), 8 + header + elements * (dtype == ExportDType::kF32 ? 4 : 2));
      const size_t largest = *std::max_element(env.appends.begin(), env.appends.end());
      size_t largest_tensor = 0;
      for (const auto& [name, t] : *masters) largest_tensor = std::max(largest_tensor, t.bytes.size());
      // Pieces: bf16 / f16 at most 64K elements (128 KiB); f32 one tensor at most (the embedding).
      EXPECT_LE(largest, std::max<size_t>(8 + header, dtype == ExportDType::kF32 ? largest_tensor : 128 * 1024));
      if (dtype != ExportDType::kF32) {
        EXPECT_GE(env.appends.size(), file.size() / (128 * 1024));
      }
      std::printf("%s %s: %lld elements (%lld NaN, %lld inf, %lld subnormal in the format, %lld ties), %zu bytes in %zu "
                  "appends (largest %zu), %lld wrong\n",
                  family.c_str(), ExportDTypeName(dtype), (long long)elements, (long long)nan, (long long)inf,
                  (long long)subnormal16, (long long)ties, file.size(), env.appends.size(), largest, (long long)wrong);
    }
  }
}

// A finite master that the rounding would turn into inf is refused, naming the parameter, and
// nothing is left in the output directory; bf16 holds what f16 cannot.
TEST(ExportTest, RoundingOverflowIsRefused) {
  std::unique_ptr<ops::LanguageModel> model = PerturbedModel(testing::TinySpec("llama", 1));
  ASSERT_NE(model, nullptr);
  ops::Parameter* q = nullptr;
  for (ops::Parameter* p : model->params().All())
    if (p->name == "blocks.0.attn.q_proj.weight") q = p;
  ASSERT_NE(q, nullptr);
  static_cast<float*>(q->value.raw())[5] = 70000.0f;
  std::unique_ptr<Env> mem = NewMemEnv();
  auto f16 = ExportHf(mem.get(), model.get(), 64, "/out", {.dtype = ExportDType::kF16});
  ASSERT_FALSE(f16.ok());
  EXPECT_EQ(f16.status().code(), absl::StatusCode::kFailedPrecondition);
  const std::string msg(f16.status().message());
  for (const char* want : {"--dtype f16", "model.layers.0.self_attn.q_proj.weight", "element 5", "70000", "65504", "bf16 or f32"})
    EXPECT_NE(msg.find(want), std::string::npos) << want << " not in: " << msg;
  EXPECT_FALSE(mem->Exists("/out/model.safetensors"));
  EXPECT_FALSE(mem->Exists("/out/model.safetensors.tmp"));
  EXPECT_FALSE(mem->Exists("/out/config.json"));
  auto bf16 = ExportHf(mem.get(), model.get(), 64, "/out", {.dtype = ExportDType::kBF16});
  EXPECT_TRUE(bf16.ok()) << bf16.status();
  static_cast<float*>(q->value.raw())[5] = FLT_MAX;  // rounds to bf16 inf
  auto big = ExportHf(mem.get(), model.get(), 64, "/out2", {.dtype = ExportDType::kBF16});
  ASSERT_FALSE(big.ok());
  EXPECT_NE(big.status().message().find("--dtype bf16"), std::string::npos) << big.status();
  EXPECT_FALSE(mem->Exists("/out2/model.safetensors"));
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
