// Text generation with incremental decoding (LanguageModel::DecodeStep), greedy or sampled, and
// MTP self-speculative decoding (MODELS.md §5).
//
// Self-speculative decoding, as implemented here. After a position t has been fed, head 1 gives
// the next token (always kept) and heads 2..k give drafts for t+2..t+k. A verification round
// feeds the kept token and then the drafts one at a time; a draft is fed only if it equals head
// 1's argmax after the previous fed token, and the round stops at the first one that does not
// (head 1's own prediction there is kept, so a round yields accepted drafts + 1 tokens). Output
// equals greedy decoding token for token by construction of the acceptance rule.
//
// Rollback of recurrent state: none is needed because a rejected draft is never fed (the check
// happens before the draft enters the state); no snapshot/restore and no re-feeding. The price:
// LanguageModel::DecodeStep takes one token per sequence, so a round costs (accepted + 1)
// DecodeStep calls, the same number of model steps as greedy; `tokens_per_forward` is the number
// of tokens a round yields, i.e. what one chunked forward over [kept token, drafts] would yield,
// and the wall-clock speed-up needs a multi-token decode step in ops/ (not there yet). In a
// chunked implementation rejected drafts would enter the state and recurrent blocks would need
// their state rolled back (BlockState has no copy today).
//
// Thread-safety: none (drives one model).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "ops/model.h"

namespace gyre::eval {

struct SamplingOptions {
  double temperature = 0;  // 0: greedy (argmax, lowest id on ties)
  int64_t top_k = 0;       // 0: no top-k cut
  double top_p = 1.0;      // nucleus: smallest set of most likely tokens with mass >= top_p
  uint64_t seed = 0;
};

struct GenerateOptions {
  int64_t max_new_tokens = 32;
  int64_t stop_token = -1;   // generation ends after this id (included); -1: none
  int64_t max_context = 0;   // prompt + new tokens must fit (0: unlimited); longer prompts refused
  SamplingOptions sampling;
  int64_t draft_heads = 0;   // speculative: heads 2..draft_heads draft (0: all mtp_heads)
};

struct GenerateResult {
  std::vector<int32_t> tokens;    // the new tokens only
  int64_t forwards = 0;           // model rounds after the prompt: greedy one per token; speculative one per round
  int64_t decode_steps = 0;       // DecodeStep calls after the prompt
  int64_t drafted = 0;            // speculative: drafts checked (a round stops checking at its first rejection)
  int64_t accepted = 0;           // speculative: drafts accepted
  double seconds = 0;             // wall time of the generation loop (prompt prefill excluded)
  double prefill_seconds = 0;
  double tokens_per_forward() const { return forwards > 0 ? double(tokens.size()) / forwards : 0; }
  double tokens_per_second() const { return seconds > 0 ? double(tokens.size()) / seconds : 0; }
  double acceptance() const { return drafted > 0 ? double(accepted) / drafted : 0; }
};

// The argmax of a logits row (lowest index on ties).
int32_t Argmax(std::span<const float> logits);
// Draws a token from a logits row by the options (temperature > 0), using `u` uniform in [0, 1).
int32_t SampleToken(std::span<const float> logits, const SamplingOptions& options, double u);

// Greedy or sampled generation after `prompt` (non-empty; ids < vocab).
absl::StatusOr<GenerateResult> Generate(ops::LanguageModel* model, std::span<const int32_t> prompt,
                                        const GenerateOptions& options);
// Self-speculative greedy decoding with the model's MTP heads (mtp_heads >= 2; sampling options
// must be greedy).
absl::StatusOr<GenerateResult> GenerateSpeculative(ops::LanguageModel* model, std::span<const int32_t> prompt,
                                                   const GenerateOptions& options);

}  // namespace gyre::eval
