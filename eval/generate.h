// Text generation with incremental decoding (LanguageModel::DecodeStep), greedy or sampled, and
// MTP self-speculative decoding (MODELS.md §5).
//
// Self-speculative decoding, as implemented here (MODELS.md §5, "greedy blockwise parallel
// decoding"). After the last accepted position, head 1 gives the next token (always kept) and
// heads 2..k the drafts for the k - 1 tokens after it. One round = one
// LanguageModel::DecodeChunk over [kept, draft_2, ..., draft_k] (rewindable): draft i is
// accepted while it equals head 1's argmax at the position before it; then
// LanguageModel::Rewind keeps kept + accepted positions (KV caches truncate, recurrent states
// take the copies made after that position), and that position's logits give the next round's
// kept token and drafts. A round yields accepted + 1 tokens for one model forward over k
// tokens; output equals greedy decoding token for token by construction of the acceptance rule.
// Wall-clock gain: a chunk of k tokens reads every weight once (one GEMM instead of k GEMVs),
// so the speed-up approaches tokens_per_forward when decoding is weight-bandwidth (CPU) or
// launch (GPU, batch 1) bound, minus the chunk's extra per-position work (cells, attention,
// state copies for the rewind, the LM head over k * heads rows).
// Greedy `Generate` runs head 1 only (the ordinary model's cost) and is the baseline.
//
// Thread-safety: none (drives one model).
#pragma once

#include <cstdint>
#include <span>
#include <string>
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
  // Speculative: heads 2..draft_heads draft (0: all mtp_heads). Fewer heads make a round cheaper
  // (fewer head blocks, fewer rows) and drafts further ahead are accepted less: session 18 (one
  // H100, 300 training steps, ops/DECODE_GRAPHS.md) measured k = 2 fastest for xlstm[1:0]-125m and
  // mamba2-130m (x1.15 / x1.13 of greedy with its graph; k = 4 x0.90 / x0.79), while llama-125m's
  // heads are accepted 0.85-0.98 a draft (k = 4). generate_bench --draft_heads prints the pick
  // (PICK: tokens a round from the measured acceptance over the timed round at each k).
  // -1 (kAutoDraftHeads): rounds draft with all heads (eagerly) until AutoDraftHeads settles k from
  // their acceptance and round_cost (after the first round where the pick is 2 or all heads, else
  // after auto_rounds rounds); heads past k then fall behind (never back up) and the rounds are
  // captured at k right after that eager round (the warm-up the capture needs anyway).
  int64_t draft_heads = 0;
  int64_t auto_rounds = 4;
  // A round's cost at k draft heads in greedy steps, for k = 2, 3, ... (empty: DefaultRoundCost).
  std::vector<double> round_cost;
};
constexpr int64_t kAutoDraftHeads = -1;

// A speculative round's cost at k heads in greedy decode steps, as measured with both graphs on one
// H100 (session 18, ops/DECODE_GRAPHS.md: xlstm[1:0]-125m / mamba2-130m 1.20 / 1.38-1.40 /
// 1.69-1.74 at k = 2 / 3 / 4, llama-125m 1.25 / 1.88): 0.68 + 0.26 k.
double DefaultRoundCost(int64_t k);
// The k in [2, max_k] that maximises E(k) / cost(k): E(k) = 1 + a_2 + a_2 a_3 + ... + a_2..a_k the
// expected tokens a round, a_i = (accepted[i - 2] + 1) / (checked[i - 2] + 2) head i's acceptance
// given the heads before it (GenerateResult::head_accepted / head_checked; the +1 / +2 keeps an
// unchecked head at 1/2), cost(k) = round_cost[k - 2] when given, else DefaultRoundCost(k).
int64_t PickDraftHeads(std::span<const int64_t> checked, std::span<const int64_t> accepted, int64_t max_k,
                       std::span<const double> round_cost = {});

// Auto's sequential pick after `rounds` eager all-heads rounds: PickDraftHeads' k when it is 2 (the
// cheap round; one rejection of head 2 in the first round already says so) or max_k (every head
// pays), or any pick once rounds >= auto_rounds; 0 (run another all-heads round) when the counts
// point between. The pick is the cheap end unless the drafts keep being accepted: where the first
// round accepts every draft (an all-accepted round gives PickDraftHeads 3 of 4 at the default
// cost, two give 4), one more all-heads round decides.
int64_t AutoDraftHeads(std::span<const int64_t> checked, std::span<const int64_t> accepted, int64_t max_k,
                       int64_t rounds, int64_t auto_rounds, std::span<const double> round_cost = {});

struct GenerateResult {
  std::vector<int32_t> tokens;    // the new tokens only
  int64_t forwards = 0;           // model rounds after the prompt: greedy one per token; speculative one per round
  int64_t decode_steps = 0;       // DecodeStep / DecodeChunk calls after the prompt
  int64_t drafted = 0;            // speculative: drafts checked (a round stops checking at its first rejection)
  int64_t accepted = 0;           // speculative: drafts accepted
  int64_t proposed = 0;           // speculative: drafts fed to the model (k - 1 per round, fewer at the end)
  // Speculative, per draft head (index i = head i + 2, k - 1 entries): drafts checked and accepted
  // (the rule stops at a round's first rejection, so head i + 2 is checked only where heads
  // 2..i + 1 were accepted: head_accepted[i] / head_checked[i] is its acceptance given theirs), and
  // drafts fed whose guess equals the output token at that position (checked or not: the head's
  // hit rate on its own, head_hits[i] / head_guesses[i]).
  std::vector<int64_t> head_checked, head_accepted, head_hits, head_guesses;
  // Per draft head from head 3 on (index i as above, entry 0 stays 0): drafts equal to the previous
  // head's draft in the same round (both can be right only where the output repeats a token).
  std::vector<int64_t> head_repeats;
  int64_t draft_heads = 0;        // speculative: the k the rounds ended with (auto: the pick)
  // Greedy / sampled Generate on CUDA with decode graphs on (GYRE_DECODE_GRAPH; ops/decode_graph.h): "graph"
  // (steps after the first replayed a captured graph; with attention blocks the steps that grow
  // a KV cache run eagerly and the graph is captured again), "eager" (off, or not CUDA), or
  // "eager: <why the capture failed>" (the eager step took over; also printed to stderr).
  // GenerateSpeculative the same for its rounds unless GYRE_SPEC_GRAPH=0 (ops/decode_graph.h
  // SpeculativeGraph): "graph" once a round was captured (rounds shorter than k and rounds that
  // grow a KV cache still run eagerly), "eager", or "eager: <why>".
  std::string decode_graph = "eager";
  double seconds = 0;             // wall time of the generation loop (prompt prefill excluded)
  double prefill_seconds = 0;
  double tokens_per_forward() const { return forwards > 0 ? double(tokens.size()) / forwards : 0; }
  double tokens_per_second() const { return seconds > 0 ? double(tokens.size()) / seconds : 0; }
  double acceptance() const { return drafted > 0 ? double(accepted) / drafted : 0; }
  // Accepted over all drafts fed (the paper's "2.5 of 3 suggestions" measure).
  double acceptance_of_proposed() const { return proposed > 0 ? double(accepted) / proposed : 0; }
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
