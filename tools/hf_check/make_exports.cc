// Makes the exports that tools/hf_check/check_export.py loads in transformers itself: for each
// case a tiny model is trained for a few AdamW steps on a synthetic Markov chain (CPU, fp32),
// exported with eval::ExportHf (the code `gyre export` runs), and OUR logits of a few token
// sequences are written beside the export as gyre_logits.json:
//   {"case", "model", "train_steps", "first_loss", "last_loss",
//    "sequences": [{"ids": [T], "logits": [T][V]}]}
// The logits come from ops::LanguageModel::Logits on the trained model, never from a reference;
// the Python side compares transformers' forward on the exported files with them.
// The *-bf16 / *-f16 cases export with --dtype bf16 / f16 (eval::ExportOptions): their masters are
// rounded to that type first (round to nearest even, what the export does), so our logits are
// those of the exported weights exactly and transformers, computing in fp32 on the upcast file,
// must match as closely as for f32; "dtype" in gyre_logits.json says which.
//
//   bazel run //tools/hf_check:make_exports -- --out /work/main/.gpu-xexport20/exports
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/strings/str_cat.h"
#include "base/env.h"
#include "eval/export.h"
#include "nlohmann/json.hpp"
#include "ops/model.h"
#include "ops/rng.h"
#include "ops/tensor.h"
#include "ops/train_step.h"

namespace gyre {
namespace {

struct Case {
  std::string name, preset;
  bool untie = false;
  int64_t d_model = 0;  // 0: the preset's
  eval::ExportDType dtype = eval::ExportDType::kF32;
};

// The value of IEEE binary16 bits (finite; the masters of a trained model are).
float F16Value(uint16_t bits) {
  const int e = (bits >> 10) & 31, m = bits & 1023;
  const float v = e == 0 ? std::ldexp(static_cast<float>(m), -24) : std::ldexp(static_cast<float>(1024 + m), e - 25);
  return (bits & 0x8000) ? -v : v;
}

// Rounds every master to `dtype` in place (what the export writes), so the logits below are the
// exported model's.
void RoundMasters(ops::LanguageModel* model, eval::ExportDType dtype) {
  if (dtype == eval::ExportDType::kF32) return;
  for (ops::Parameter* p : model->params().All()) {
    for (int64_t i = 0; i < p->value.numel(); ++i) {
      const float x = static_cast<float>(p->value.At(i));
      p->value.Set(i, dtype == eval::ExportDType::kBF16 ? ops::Bf16ToFloat(ops::FloatToBf16(x)) : F16Value(eval::FloatToF16(x)));
    }
  }
}

// A random sparse Markov chain over the vocabulary (4 successors per token): learnable, so a few
// steps move every parameter away from its initialisation in a data-shaped way.
std::vector<int32_t> MarkovBatch(const std::vector<int32_t>& next, int64_t vocab, int64_t n, uint64_t seed) {
  ops::Rng rng(seed);
  std::vector<int32_t> out(n);
  int32_t t = static_cast<int32_t>(rng.Below(vocab));
  for (auto& x : out) {
    x = t;
    t = next[t * 4 + rng.Below(4)];
  }
  return out;
}

int Run(const std::string& out_dir, int64_t steps) {
  const std::vector<Case> cases = {{"llama-tiny", "llama-tiny"},
                                   {"mamba2-tiny", "mamba2-tiny"},
                                   {"mamba2-tiny-untied", "mamba2-tiny", /*untie=*/true},
                                   // xLSTM Large: the preset (d 64, 4 heads, qk 32: transformers'
                                   // xLSTMCache rounds qk to 64, so only use_cache=False fits) and
                                   // d 128 (qk 64, v 128: the cache's shapes fit too). Chunk 16.
                                   {"xlstm-large-tiny", "xlstm-large-tiny"},
                                   {"xlstm-large-d128", "xlstm-large-tiny", /*untie=*/false, /*d_model=*/128},
                                   // gyre export --dtype bf16 / f16 (session 21).
                                   {"llama-tiny-bf16", "llama-tiny", false, 0, eval::ExportDType::kBF16},
                                   {"mamba2-tiny-f16", "mamba2-tiny", false, 0, eval::ExportDType::kF16},
                                   {"xlstm-large-d128-bf16", "xlstm-large-tiny", false, 128, eval::ExportDType::kBF16}};
  for (const Case& c : cases) {
    gyre::v1::ModelConfig config;
    config.set_preset(c.preset);
    if (c.d_model != 0) config.set_d_model(c.d_model);
    auto spec = ops::ResolveModelConfig(config);
    if (!spec.ok()) return std::fprintf(stderr, "%s: %s\n", c.name.c_str(), std::string(spec.status().message()).c_str()), 1;
    if (c.untie) spec->tie_embeddings = false;
    auto model = ops::LanguageModel::Create(*spec, ops::DType::kF32, ops::Device::kCpu, 7);
    if (!model.ok()) return std::fprintf(stderr, "%s: %s\n", c.name.c_str(), std::string(model.status().message()).c_str()), 1;

    gyre::v1::OptimizerConfig optimizer;
    optimizer.set_lr(3e-3);
    gyre::v1::ScheduleConfig schedule;
    schedule.set_warmup_steps(5);
    schedule.set_total_steps(steps);
    auto options = ops::TrainOptionsFromConfig(optimizer, schedule);
    if (!options.ok()) return std::fprintf(stderr, "%s\n", std::string(options.status().message()).c_str()), 1;
    ops::Trainer trainer(model->get(), *options);
    const int64_t V = spec->vocab_size, batch = 8, seq = 64;
    ops::Rng chain_rng(11);
    std::vector<int32_t> next(V * 4);
    for (auto& n : next) n = static_cast<int32_t>(chain_rng.Below(V));
    double first_loss = 0, last_loss = 0;
    for (int64_t step = 0; step < steps; ++step) {
      const std::vector<int32_t> tokens = MarkovBatch(next, V, batch * (seq + 1), 1000 + step);
      auto s = trainer.Step(tokens, batch, seq, step);
      if (!s.ok()) return std::fprintf(stderr, "%s step %ld: %s\n", c.name.c_str(), (long)step, std::string(s.status().message()).c_str()), 1;
      if (step == 0) first_loss = s->loss.loss;
      last_loss = s->loss.loss;
    }

    const std::string dir = out_dir + "/" + c.name;
    RoundMasters(model->get(), c.dtype);
    auto exported = eval::ExportHf(Env::Default(), model->get(), seq, dir, {.dtype = c.dtype});
    if (!exported.ok()) return std::fprintf(stderr, "%s: %s\n", c.name.c_str(), std::string(exported.status().message()).c_str()), 1;

    nlohmann::ordered_json out;
    out["case"] = c.name;
    out["model"] = ops::DescribeSpec(*spec);
    out["dtype"] = eval::TorchDType(c.dtype);
    out["train_steps"] = steps;
    out["first_loss"] = first_loss;
    out["last_loss"] = last_loss;
    out["sequences"] = nlohmann::json::array();
    // Lengths 37 (two 16-token SSD / mLSTM chunks and a remainder: transformers' xLSTM runs its
    // chunkwise kernel, then its recurrent sequence kernel), 16 (exactly one chunk), 1 (xLSTM:
    // the step kernel).
    for (int64_t length : {37, 16, 1}) {
      const std::vector<int32_t> ids = ops::RandomTokens(length, V, 500 + length);
      ops::Tensor logits = (*model)->Logits(ids, 1, length);
      nlohmann::json rows = nlohmann::json::array();
      for (int64_t t = 0; t < length; ++t) {
        std::vector<float> row(V);
        for (int64_t v = 0; v < V; ++v) row[v] = static_cast<float>(logits.At(t * V + v));
        rows.push_back(row);
      }
      out["sequences"].push_back({{"ids", ids}, {"logits", rows}});
    }
    absl::Status written = WriteFileAtomically(Env::Default(), dir + "/gyre_logits.json", out.dump() + "\n");
    if (!written.ok()) return std::fprintf(stderr, "%s\n", std::string(written.message()).c_str()), 1;
    std::printf("%-20s %s\n  trained %ld steps: loss %.4f -> %.4f; %ld tensors -> %s\n", c.name.c_str(),
                ops::DescribeSpec(*spec).c_str(), (long)steps, first_loss, last_loss, (long)exported->tensors, dir.c_str());
  }
  return 0;
}

}  // namespace
}  // namespace gyre

int main(int argc, char** argv) {
  CLI::App app("tiny trained models -> gyre export + our logits, for tools/hf_check/check_export.py");
  std::string out_dir;
  int64_t steps = 40;
  app.add_option("--out", out_dir, "output folder (one subfolder per case)")->required();
  app.add_option("--steps", steps, "AdamW steps per model")->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  return gyre::Run(out_dir, steps);
}
