// Passkey retrieval (SelfExtend paper §4 / its repo's passkey script; MODELS.md §6): a random
// passkey hidden at a given depth in repetitive filler text of a given length; the model must
// repeat it after "What is the pass key? The pass key is".
//
// Prompt (the repo's wording), built in tokens so its length is exact:
//   task    "There is an important info hidden inside a lot of irrelevant text. Find it and
//            memorize them. I will quiz you about the important information there."
//   filler  " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back
//            again." repeated (the stream is cut to fill the length exactly)
//   info    " The pass key is <key>. Remember it. <key> is the pass key."
//   final   " What is the pass key? The pass key is"
//   prompt = task + filler[0, before) + info + filler[0, after) + final, with `before` the
//   depth × (filler tokens) rounded to whole filler sentences, `after` the rest.
// Scoring: greedy decoding of (tokens of " <key>") + 2 tokens; correct when the first run of
// digits in the decoded text equals the key exactly (exact match, no partial credit).
//
// Thread-safety: none (drives one model).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "dataloader/tokenizer/tokenizer.h"
#include "ops/model.h"

namespace gyre::eval {

struct PasskeyPrompt {
  std::vector<int32_t> tokens;
  std::string passkey;
  int64_t info_offset = 0;  // token index where the info sentence starts
  double depth = 0;         // the realised depth: filler tokens before the info / all filler tokens
};

// InvalidArgument naming the length when it cannot hold task + info + final.
absl::StatusOr<PasskeyPrompt> BuildPasskeyPrompt(const Tokenizer& tokenizer, int64_t length, double depth,
                                                 const std::string& passkey);

// Exact match of the first run of digits in `generated` with `passkey`.
bool PasskeyMatches(const std::string& generated, const std::string& passkey);

struct PasskeyOptions {
  std::vector<int64_t> lengths = {256};
  std::vector<double> depths = {0.0, 0.25, 0.5, 0.75, 1.0};
  int64_t trials = 2;      // passkeys per (length, depth)
  int64_t digits = 5;      // passkey length
  uint64_t seed = 0;       // draws the passkeys
};

struct PasskeyCell {
  int64_t length = 0;
  double depth = 0;
  int64_t trials = 0, correct = 0;
  std::vector<std::string> answers;  // decoded generations, one per trial
  double accuracy() const { return trials > 0 ? double(correct) / trials : 0; }
};

struct PasskeyReport {
  std::vector<PasskeyCell> cells;
  int64_t trials = 0, correct = 0;
};

absl::StatusOr<PasskeyReport> RunPasskey(ops::LanguageModel* model, const Tokenizer& tokenizer,
                                         const PasskeyOptions& options);

}  // namespace gyre::eval
