#include "worker/in_run_eval.h"

#include <algorithm>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "eval/perplexity.h"
#include "eval/spectrum.h"

namespace gyre {
namespace {

constexpr int64_t kWErrorRank = 64;
constexpr int kRelativeSingularValues = 8;

}  // namespace

bool EvalDueBefore(const gyre::v1::TrainConfig& train, uint64_t step) {
  return train.eval_every_steps() > 0 && step > 0 && step % train.eval_every_steps() == 0;
}

absl::StatusOr<gyre::v1::EvalResult> RunInRunEval(Env* env, const data::TokenIndex& index,
                                                   ops::LanguageModel* model, const gyre::v1::RunConfig& config,
                                                   uint64_t step) {
  absl::StatusOr<std::vector<gyre::v1::SourceRecord>> sources = index.ListSources();
  if (!sources.ok()) return sources.status();
  eval::PerplexityOptions options;
  options.seq_len = config.data().seq_len();
  options.samples_per_source = std::max<int64_t>(1, config.train().eval_samples_per_source());
  options.batch = 4;
  options.seed = config.seed();
  for (const auto& s : *sources) {
    if (s.split() == "validation") options.sources.push_back(s.name());
  }
  if (options.sources.empty()) {
    return absl::FailedPreconditionError(
        absl::StrCat("train.eval_every_steps: index ", index.dir(), " has no source of split \"validation\""));
  }
  absl::StatusOr<eval::PerplexityReport> report = eval::EvaluatePerplexity(env, index, model, options);
  if (!report.ok()) return report.status();

  gyre::v1::EvalResult result;
  result.set_step(step);
  result.set_loss(report->loss);
  result.set_tokens(static_cast<uint64_t>(report->tokens));
  for (const eval::SourcePerplexity& s : report->sources) {
    gyre::v1::SourceLoss* out = result.add_sources();
    out->set_source(s.name);
    out->set_split(s.split);
    out->set_loss(s.loss);
    out->set_tokens(static_cast<uint64_t>(s.tokens));
  }

  const ops::Tensor& head = model->HeadParameter().value;
  const ops::Tensor w = head.device() == ops::Device::kCpu ? head : head.ToDevice(ops::Device::kCpu);
  const int64_t rank = std::min<int64_t>(kWErrorRank, w.shape().back());
  const int64_t ranks[] = {rank};
  absl::StatusOr<eval::HeadSpectrum> spectrum = eval::ComputeHeadSpectrum(w, ranks);
  if (!spectrum.ok()) return spectrum.status();
  gyre::v1::HeadSpectrum* h = result.mutable_head();
  h->set_dim(static_cast<uint32_t>(spectrum->dim));
  const double top = spectrum->singular_values.empty() ? 0 : spectrum->singular_values.front();
  for (int i = 0; i < kRelativeSingularValues && i < static_cast<int>(spectrum->singular_values.size()); ++i) {
    h->add_relative_singular_values(top > 0 ? spectrum->singular_values[i] / top : 0);
  }
  h->set_effective_rank(spectrum->effective_rank);
  h->set_stable_rank(spectrum->stable_rank);
  h->set_w_error_rank(static_cast<uint32_t>(rank));
  h->set_w_error(spectrum->w_error.empty() ? 0 : spectrum->w_error.front().second);
  return result;
}

}  // namespace gyre
