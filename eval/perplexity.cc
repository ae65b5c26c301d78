#include "eval/perplexity.h"

#include <xxhash.h>

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "dataloader/permutation.h"
#include "dataloader/sampler.h"

namespace gyre::eval {

std::vector<uint64_t> HeldOutWindows(const std::string& source, uint64_t available, uint64_t count, uint64_t seed) {
  std::vector<uint64_t> out;
  if (available == 0) return out;
  const uint64_t key = data::HashCombine(seed, XXH64(source.data(), source.size(), 0));
  data::KeyedPermutation perm(available, key);
  const uint64_t n = std::min(count, available);
  for (uint64_t i = 0; i < n; ++i) out.push_back(perm(i));
  std::sort(out.begin(), out.end());
  return out;
}

absl::StatusOr<PerplexityReport> EvaluatePerplexity(Env* env, const data::TokenIndex& index,
                                                    ops::LanguageModel* model, const PerplexityOptions& options) {
  if (options.seq_len < 1) return absl::InvalidArgumentError("perplexity: seq_len must be >= 1");
  if (options.samples_per_source < 1) return absl::InvalidArgumentError("perplexity: samples_per_source must be >= 1");
  if (options.batch < 1) return absl::InvalidArgumentError("perplexity: batch must be >= 1");
  absl::StatusOr<std::vector<gyre::v1::SourceRecord>> all = index.ListSources();
  if (!all.ok()) return all.status();
  std::vector<gyre::v1::SourceRecord> chosen;
  if (options.sources.empty()) {
    for (const auto& s : *all)
      if (s.validation()) chosen.push_back(s);
    if (chosen.empty()) {
      std::vector<std::string> names;
      for (const auto& s : *all) names.push_back(s.name());
      return absl::FailedPreconditionError(absl::StrCat(
          "index ", index.dir(), " has no validation or test source (sources: ", absl::StrJoin(names, ", "),
          "); name sources explicitly to evaluate training data (not held out)"));
    }
  } else {
    for (const std::string& name : options.sources) {
      auto it = std::find_if(all->begin(), all->end(), [&](const auto& s) { return s.name() == name; });
      if (it == all->end()) return absl::NotFoundError(absl::StrCat("index ", index.dir(), " has no source \"", name, "\""));
      chosen.push_back(*it);
    }
  }
  const int64_t L = options.seq_len, vocab = model->spec().vocab_size;
  PerplexityReport report;
  report.seq_len = L;
  report.seed = options.seed;
  double total_nats = 0;
  for (const auto& record : chosen) {
    absl::StatusOr<std::unique_ptr<data::SourceTokens>> tokens =
        data::OpenSourceTokens(env, index, record.name(), /*verify_checksums=*/true);
    if (!tokens.ok()) return tokens.status();
    SourcePerplexity out;
    out.name = record.name();
    out.split = record.split().empty() ? (record.validation() ? "validation" : "train") : record.split();
    const uint64_t total = (*tokens)->tokens();
    out.windows_available = total > 0 ? (total - 1) / static_cast<uint64_t>(L) : 0;
    if (out.windows_available == 0) {
      return absl::FailedPreconditionError(absl::StrCat("source \"", out.name, "\" has ", total,
                                                        " tokens: not one window of ", L + 1, " (lower --seq_len)"));
    }
    out.windows = HeldOutWindows(out.name, out.windows_available, static_cast<uint64_t>(options.samples_per_source),
                                 options.seed);
    double nats = 0;
    std::vector<uint32_t> window(static_cast<size_t>(L + 1));
    for (size_t first = 0; first < out.windows.size(); first += static_cast<size_t>(options.batch)) {
      const size_t count = std::min(out.windows.size() - first, static_cast<size_t>(options.batch));
      std::vector<int32_t> batch_tokens;
      batch_tokens.reserve(count * (L + 1));
      for (size_t b = 0; b < count; ++b) {
        const uint64_t j = out.windows[first + b];
        if (absl::Status s = (*tokens)->Read(j * L, std::span<uint32_t>(window)); !s.ok()) return s;
        for (uint32_t id : window) {
          if (static_cast<int64_t>(id) >= vocab) {
            return absl::FailedPreconditionError(absl::StrCat("source \"", out.name, "\" window ", j, " holds token id ", id,
                                                              ", outside the model's vocabulary of ", vocab,
                                                              " (index and model tokenizers differ?)"));
          }
          batch_tokens.push_back(static_cast<int32_t>(id));
        }
      }
      // loss_scale 1: head_losses[0] is the sum of head 1's cross-entropy over the batch.
      const ops::LossResult loss = model->Evaluate(batch_tokens, static_cast<int64_t>(count), L, 1.0);
      nats += loss.head_losses.at(0);
      out.tokens += static_cast<int64_t>(count) * L;
    }
    out.loss = nats / static_cast<double>(out.tokens);
    out.perplexity = std::exp(out.loss);
    total_nats += nats;
    report.tokens += out.tokens;
    report.sources.push_back(std::move(out));
  }
  report.loss = total_nats / static_cast<double>(report.tokens);
  report.perplexity = std::exp(report.loss);
  return report;
}

}  // namespace gyre::eval
