#include "eval/generate.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <numeric>
#include <random>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "base/clock.h"
#include "ops/decode_graph.h"

namespace gyre::eval {
namespace {

// Row `row` of a [rows, V] logits tensor as floats (CUDA logits are copied to the host).
std::vector<float> Row(const ops::Tensor& logits, int64_t row = 0) {
  ops::Tensor r = logits.Rows(row, row + 1);
  if (r.device() != ops::Device::kCpu) r = r.ToDevice(ops::Device::kCpu);
  if (r.dtype() != ops::DType::kF32) r = r.To(ops::DType::kF32);
  const float* p = r.data<float>();
  return std::vector<float>(p, p + r.cols());
}

absl::Status CheckPrompt(const ops::LanguageModel& model, std::span<const int32_t> prompt,
                         const GenerateOptions& options) {
  if (prompt.empty()) return absl::InvalidArgumentError("the prompt is empty (generation needs at least one token)");
  const int64_t vocab = model.spec().vocab_size;
  for (size_t i = 0; i < prompt.size(); ++i) {
    if (prompt[i] < 0 || prompt[i] >= vocab) {
      return absl::InvalidArgumentError(
          absl::StrCat("prompt token ", i, " is id ", prompt[i], ", outside the model's vocabulary [0, ", vocab, ")"));
    }
  }
  if (options.max_new_tokens < 0) return absl::InvalidArgumentError("max_new_tokens must be >= 0");
  if (options.max_context > 0 && static_cast<int64_t>(prompt.size()) + options.max_new_tokens > options.max_context) {
    return absl::InvalidArgumentError(absl::StrCat("prompt of ", prompt.size(), " tokens + ", options.max_new_tokens,
                                                   " new tokens exceeds the allowed context of ", options.max_context,
                                                   " tokens"));
  }
  const SamplingOptions& s = options.sampling;
  if (s.temperature < 0 || !std::isfinite(s.temperature)) return absl::InvalidArgumentError("temperature must be >= 0");
  if (s.top_k < 0) return absl::InvalidArgumentError("top_k must be >= 0");
  if (!(s.top_p > 0 && s.top_p <= 1)) return absl::InvalidArgumentError("top_p must be in (0, 1]");
  return absl::OkStatus();
}

// Feeds the prompt in chunks (one GEMM per weight per chunk); returns the logits of heads
// 1..heads after its last token.
std::vector<ops::Tensor> Prefill(ops::LanguageModel* model, std::span<const int32_t> prompt, int64_t heads,
                                 ops::LanguageModel::DecodeState* state) {
  constexpr int64_t kPrefillChunk = 256;  // bounds the activations of one chunk
  ops::LanguageModel::DecodeOptions options;
  options.heads = heads;
  options.last_position_only = true;
  std::vector<ops::Tensor> out;
  for (size_t begin = 0; begin < prompt.size(); begin += kPrefillChunk) {
    const size_t n = std::min<size_t>(kPrefillChunk, prompt.size() - begin);
    out = model->DecodeChunk(prompt.subspan(begin, n), static_cast<int64_t>(n), state, options);
  }
  return out;
}

double Seconds(int64_t begin_us) { return (Clock::Real()->NowMicros() - begin_us) * 1e-6; }

// A decode graph's capture: the graph, with result->decode_graph = "graph"; or null (the caller
// keeps stepping eagerly) with "eager: <why>", also printed as "<who>: <why>; <fallback>" unless
// the graph merely does not cover this state (Unimplemented: e.g. KV caches of different lengths),
// which is expected, not news.
template <typename Graph>
std::unique_ptr<Graph> AdoptCapture(absl::StatusOr<std::unique_ptr<Graph>> made, const char* who, const char* fallback,
                                    GenerateResult* result) {
  if (made.ok()) {
    result->decode_graph = "graph";
    return std::move(*made);
  }
  result->decode_graph = absl::StrCat("eager: ", made.status().message());
  if (!absl::IsUnimplemented(made.status())) {
    std::fprintf(stderr, "%s: %s; %s\n", who, std::string(made.status().message()).c_str(), fallback);
  }
  return nullptr;
}

}  // namespace

double DefaultRoundCost(int64_t k) { return 0.68 + 0.26 * static_cast<double>(k); }

int64_t PickDraftHeads(std::span<const int64_t> checked, std::span<const int64_t> accepted, int64_t max_k,
                       std::span<const double> round_cost) {
  int64_t best = 2;
  double best_rate = 0, expect = 1, run = 1;
  for (int64_t k = 2; k <= max_k; ++k) {
    const size_t i = static_cast<size_t>(k - 2);
    const double c = i < checked.size() ? static_cast<double>(checked[i]) : 0.0;
    const double a = i < accepted.size() ? static_cast<double>(accepted[i]) : 0.0;
    run *= (a + 1) / (c + 2);
    expect += run;
    const double cost = i < round_cost.size() ? round_cost[i] : DefaultRoundCost(k);
    if (expect / cost > best_rate) best_rate = expect / cost, best = k;
  }
  return best;
}

int64_t AutoDraftHeads(std::span<const int64_t> checked, std::span<const int64_t> accepted, int64_t max_k,
                       int64_t rounds, int64_t auto_rounds, std::span<const double> round_cost) {
  const int64_t pick = PickDraftHeads(checked, accepted, max_k, round_cost);
  return pick == 2 || pick == max_k || rounds >= auto_rounds ? pick : 0;
}

int32_t Argmax(std::span<const float> logits) {
  return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
}

int32_t SampleToken(std::span<const float> logits, const SamplingOptions& options, double u) {
  if (options.temperature <= 0) return Argmax(logits);
  const size_t v = logits.size();
  std::vector<int32_t> order(v);
  std::iota(order.begin(), order.end(), 0);
  // Most likely first (stable: lower id first on ties).
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
  size_t keep = v;
  if (options.top_k > 0) keep = std::min<size_t>(keep, static_cast<size_t>(options.top_k));
  const double top = logits[order[0]] / options.temperature;
  std::vector<double> p(keep);
  double total = 0;
  for (size_t i = 0; i < keep; ++i) total += p[i] = std::exp(logits[order[i]] / options.temperature - top);
  if (options.top_p < 1) {
    double mass = 0;
    size_t i = 0;
    for (; i < keep; ++i) {
      mass += p[i] / total;
      if (mass >= options.top_p) break;
    }
    keep = std::min(keep, i + 1);
    total = std::accumulate(p.begin(), p.begin() + keep, 0.0);
  }
  double target = u * total;
  for (size_t i = 0; i < keep; ++i) {
    target -= p[i];
    if (target < 0) return order[i];
  }
  return order[keep - 1];
}

absl::StatusOr<GenerateResult> Generate(ops::LanguageModel* model, std::span<const int32_t> prompt,
                                        const GenerateOptions& options) {
  if (absl::Status s = CheckPrompt(*model, prompt, options); !s.ok()) return s;
  GenerateResult result;
  std::mt19937_64 rng(options.sampling.seed);
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  // Only head 1 is run: the ordinary model's cost (the MTP heads' blocks and logits are skipped).
  auto state = model->NewDecodeState(1);
  const int64_t prefill_begin = Clock::Real()->NowMicros();
  std::vector<ops::Tensor> logits = Prefill(model, prompt, 1, state.get());
  result.prefill_seconds = Seconds(prefill_begin);
  const int64_t begin = Clock::Real()->NowMicros();
  const bool sampled = options.sampling.temperature > 0;
  // CUDA (GYRE_DECODE_GRAPH unset or 1): the first step runs eagerly (the warm-up), then the step is
  // captured once and replayed (ops/decode_graph.h); a failed capture leaves the eager step.
  bool capture = ops::DecodeGraphEnabled() && !logits.empty() && ops::IsCuda(logits[0]);
  std::unique_ptr<ops::DecodeGraph> graph;
  if (options.max_new_tokens == 0) {
    result.seconds = Seconds(begin);
    return result;
  }
  int32_t next = sampled ? SampleToken(Row(logits[0]), options.sampling, uniform(rng)) : ops::ArgmaxRows(logits[0])[0];
  while (true) {
    result.tokens.push_back(next);
    ++result.forwards;
    if (next == options.stop_token || static_cast<int64_t>(result.tokens.size()) >= options.max_new_tokens) break;
    ++result.decode_steps;
    // A KV cache at its capacity grows in the next step (new buffers): that step runs eagerly
    // and the graph is captured again after it (ops/decode_graph.h).
    if (graph != nullptr && graph->MustGrow()) {
      graph.reset();
      capture = true;
    }
    if (graph != nullptr) {
      absl::StatusOr<std::span<const int32_t>> ids = graph->Step(std::span<const int32_t>(&next, 1));
      if (!ids.ok()) return ids.status();
      // Greedy: the argmax the graph computed on the device (only the id came back).
      next = sampled ? SampleToken(Row(graph->logits()), options.sampling, uniform(rng)) : (*ids)[0];
      continue;
    }
    logits = model->DecodeStep(std::span<const int32_t>(&next, 1), state.get(), 1);
    next = sampled ? SampleToken(Row(logits[0]), options.sampling, uniform(rng)) : ops::ArgmaxRows(logits[0])[0];
    if (capture && !ops::DecodeGraph::KvCacheFull(state.get())) {
      capture = false;
      logits.clear();  // the warm-up's logits go back to the cache before the capture
      graph = AdoptCapture(ops::DecodeGraph::Capture(model, state.get()), "Generate", "decoding eagerly", &result);
    }
  }
  result.seconds = Seconds(begin);
  return result;
}

absl::StatusOr<GenerateResult> GenerateSpeculative(ops::LanguageModel* model, std::span<const int32_t> prompt,
                                                   const GenerateOptions& options) {
  if (absl::Status s = CheckPrompt(*model, prompt, options); !s.ok()) return s;
  const int64_t heads = model->spec().mtp_heads;
  const bool auto_k = options.draft_heads == kAutoDraftHeads;
  int64_t k = options.draft_heads > 0 ? options.draft_heads : heads;  // auto: all heads until the pick
  if (heads < 2) {
    return absl::FailedPreconditionError(absl::StrCat("speculative decoding needs MTP heads (model.mtp_heads >= 2); this model has ",
                                                      heads));
  }
  if (options.draft_heads < 0 && !auto_k) {
    return absl::InvalidArgumentError(absl::StrCat("draft_heads ", options.draft_heads, ": -1 (auto), 0 (all) or a k"));
  }
  if (k < 2 || k > heads) {
    return absl::InvalidArgumentError(absl::StrCat("draft_heads ", k, " must be in [2, mtp_heads = ", heads, "]"));
  }
  if (auto_k && options.auto_rounds < 1) return absl::InvalidArgumentError("auto_rounds must be >= 1");
  if (options.sampling.temperature > 0) {
    return absl::InvalidArgumentError("speculative decoding is greedy: temperature must be 0");
  }
  GenerateResult result;
  for (auto* v : {&result.head_checked, &result.head_accepted, &result.head_hits, &result.head_guesses,
                  &result.head_repeats}) {
    v->assign(static_cast<size_t>(k - 1), 0);
  }
  // Each round's fed drafts with the output index of its kept token (draft i guesses the token
  // i + 1 after it; counted against the output at the end: head_hits / head_guesses).
  std::vector<std::pair<size_t, std::vector<int32_t>>> guesses;
  auto state = model->NewDecodeState(1);
  const int64_t prefill_begin = Clock::Real()->NowMicros();
  std::vector<ops::Tensor> logits = Prefill(model, prompt, k, state.get());
  result.prefill_seconds = Seconds(prefill_begin);
  const int64_t begin = Clock::Real()->NowMicros();
  const auto done = [&] {
    return static_cast<int64_t>(result.tokens.size()) >= options.max_new_tokens ||
           (!result.tokens.empty() && result.tokens.back() == options.stop_token);
  };
  // Head 1's argmax at every position of the last chunk (row `row` is the last accepted one) and
  // heads 2..k's argmax there (the drafts of the next round).
  const bool on_cuda = ops::IsCuda(logits[0]);
  std::vector<int32_t> head1 = ops::ArgmaxRows(logits[0]);
  int64_t row = 0;
  std::vector<int32_t> drafted =
      ops::ArgmaxFirstRows(std::vector<ops::Tensor>(logits.begin() + 1, logits.end()));
  logits.clear();
  // CUDA (unless GYRE_SPEC_GRAPH=0): after one eager round (the warm-up) the round of k tokens is
  // captured once and replayed (ops/decode_graph.h SpeculativeGraph); rounds shorter than k (the
  // last ones) and rounds that must grow a KV cache run eagerly (then the graph is captured
  // again); a failed capture leaves the eager rounds. result.decode_graph says which.
  // Auto captures only at its pick: a graph of the warm-up rounds' k would be dropped a few rounds
  // later (call 3: a second capture a prompt cost ~15% of a 64-token generation). The capture at
  // the pick follows the last all-heads round directly (its state and buffers are warm for every
  // k <= all heads): no eager round at the picked k first.
  const bool graphs = ops::SpeculativeGraphEnabled() && on_cuda;
  bool capture = graphs && !auto_k;
  std::unique_ptr<ops::SpeculativeGraph> graph;
  bool picked = !auto_k;
  while (!done()) {
    // The kept token (head 1) and the drafts (heads 2..k) from the last accepted position.
    std::vector<int32_t> chunk = {head1[row]};
    chunk.insert(chunk.end(), drafted.begin(), drafted.end());
    ++result.forwards;
    result.tokens.push_back(chunk[0]);
    if (done()) break;
    // Drafts past max_new_tokens would be thrown away: do not feed them.
    const int64_t room = options.max_new_tokens - static_cast<int64_t>(result.tokens.size());
    chunk.resize(static_cast<size_t>(std::min<int64_t>(k, room + 1)));
    guesses.emplace_back(result.tokens.size() - 1, std::vector<int32_t>(chunk.begin() + 1, chunk.end()));
    const bool full = static_cast<int64_t>(chunk.size()) == k;
    if (graph != nullptr && full && graph->MustGrow()) {
      graph.reset();  // this round grows a KV cache eagerly; capture again after it
      capture = true;
    }
    ++result.decode_steps;
    if (graph != nullptr && full) {
      absl::StatusOr<std::span<const int32_t>> ids = graph->Round(chunk);
      if (!ids.ok()) return ids.status();
      // ids: head 1's argmax at the k positions, the next drafts (at the keep the device found
      // by the same rule as below), that keep.
      head1.assign(ids->begin(), ids->begin() + k);
      int64_t accepted = 0;
      while (accepted + 1 < k && !done()) {
        ++result.drafted;
        ++result.head_checked[accepted];
        if (chunk[accepted + 1] != head1[accepted]) break;
        ++result.head_accepted[accepted];
        ++accepted;
        result.tokens.push_back(chunk[accepted]);
      }
      result.accepted += accepted;
      result.proposed += k - 1;
      if (done()) break;
      if ((*ids)[2 * k - 1] != accepted + 1) {
        return absl::InternalError(absl::StrCat("speculative graph: the device kept ", (*ids)[2 * k - 1],
                                                " positions, the host ", accepted + 1));
      }
      if (absl::Status s = graph->Commit(accepted + 1); !s.ok()) return s;
      drafted.assign(ids->begin() + k, ids->begin() + 2 * k - 1);
      row = accepted;
      continue;
    }
    // Verification: one forward over [kept, drafts...]; draft i is accepted while it equals
    // head 1's argmax at the position before it.
    ops::LanguageModel::DecodeOptions decode;
    decode.heads = k;
    decode.rewindable = true;
    decode.defer_draft_logits = true;
    head1 = ops::ArgmaxRows(model->DecodeChunk(chunk, static_cast<int64_t>(chunk.size()), state.get(), decode)[0]);
    int64_t accepted = 0;
    while (accepted + 1 < static_cast<int64_t>(chunk.size()) && !done()) {
      ++result.drafted;
      ++result.head_checked[accepted];
      if (chunk[accepted + 1] != head1[accepted]) break;
      ++result.head_accepted[accepted];
      ++accepted;
      result.tokens.push_back(chunk[accepted]);
    }
    result.accepted += accepted;
    result.proposed += static_cast<int64_t>(chunk.size()) - 1;
    if (done()) break;
    // Undo the rejected suffix (the state then holds kept + accepted drafts); the drafts for the
    // next round come from that position only.
    if (absl::Status s = model->Rewind(state.get(), accepted + 1); !s.ok()) return s;
    drafted = ops::ArgmaxFirstRows(model->DraftLogits(*state, accepted));
    row = accepted;
    if (!picked) {
      // Auto: after each eager all-heads round, k once the acceptance so far settles it
      // (AutoDraftHeads); heads past it stop (DecodeChunk lets them fall behind). This round,
      // eager at all heads, is the capture's warm-up: the graph is captured right here at k.
      const int64_t pick = AutoDraftHeads(result.head_checked, result.head_accepted, k, result.forwards,
                                          options.auto_rounds, options.round_cost);
      if (pick > 0) {
        picked = true;
        k = pick;
        drafted.resize(static_cast<size_t>(k - 1));
        capture = graphs;
      }
    }
    if (capture && full && !ops::SpeculativeGraph::CacheTooShort(state.get(), k)) {
      capture = false;
      graph = AdoptCapture(ops::SpeculativeGraph::Capture(model, state.get(), k), "GenerateSpeculative", "eager rounds",
                           &result);
    }
  }
  result.seconds = Seconds(begin);
  result.draft_heads = k;
  // Output equals greedy decoding, so a draft's hit is its guess against greedy's token there.
  for (const auto& [first, drafts] : guesses) {
    for (size_t i = 0; i < drafts.size() && first + 1 + i < result.tokens.size(); ++i) {
      ++result.head_guesses[i];
      result.head_hits[i] += drafts[i] == result.tokens[first + 1 + i];
    }
    for (size_t i = 1; i < drafts.size(); ++i) result.head_repeats[i] += drafts[i] == drafts[i - 1];
  }
  return result;
}

}  // namespace gyre::eval
