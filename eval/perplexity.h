// Perplexity per source over held-out samples of a token index (DESIGN.md §3; Paloma-style
// per-source evaluation, DATA.md).
//
// Which sequences: a source with T_s tokens has N_s = floor((T_s - 1) / L) non-overlapping
// windows of L + 1 tokens starting at j * L (the validation-source contract of
// OpenSourceTokens: no training permutation). The evaluation takes
// min(samples_per_source, N_s) of them: the images of 0, 1, 2, ... under a keyed Feistel
// permutation of [0, N_s) seeded by (eval seed, XXH64(source name)), i.e. a fixed, seeded,
// uniformly spread subset that does not depend on the training order, the run seed or the
// other sources, read in ascending order. By default only validation/test sources (split !=
// "train") are evaluated — they are never mixed into training; naming a training source is
// allowed and reported with its split (not held out).
//
// Loss: mean next-token cross-entropy (nats) of head 1 over all L targets of each chosen window;
// perplexity = exp(loss); overall = token-weighted over the sources.
//
// Thread-safety: none (drives one model).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "base/env.h"
#include "dataloader/token_index.h"
#include "ops/model.h"

namespace gyre::eval {

struct PerplexityOptions {
  int64_t seq_len = 0;              // L (required)
  int64_t samples_per_source = 16;  // windows per source (fewer when the source is small)
  int64_t batch = 4;                // windows per Evaluate call
  uint64_t seed = 0;                // picks the windows
  std::vector<std::string> sources; // empty: every validation/test source
};

struct SourcePerplexity {
  std::string name;
  std::string split;
  uint64_t windows_available = 0;  // N_s
  std::vector<uint64_t> windows;   // the chosen j (ascending)
  int64_t tokens = 0;              // targets scored
  double loss = 0;                 // nats per token
  double perplexity = 0;
};

struct PerplexityReport {
  int64_t seq_len = 0;
  uint64_t seed = 0;
  std::vector<SourcePerplexity> sources;
  int64_t tokens = 0;
  double loss = 0;
  double perplexity = 0;
};

// The chosen window ids of a source with `available` windows (see the header comment).
std::vector<uint64_t> HeldOutWindows(const std::string& source, uint64_t available, uint64_t count, uint64_t seed);

absl::StatusOr<PerplexityReport> EvaluatePerplexity(Env* env, const data::TokenIndex& index,
                                                    ops::LanguageModel* model, const PerplexityOptions& options);

}  // namespace gyre::eval
