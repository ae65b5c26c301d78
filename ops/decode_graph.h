// DecodeGraph: greedy decoding's one-token step on CUDA captured once into a CUDA graph and
// replayed per token (ops/DECODE_GRAPHS.md has the counts and the measurements).
//
// Why: at batch 1 a decode step of a 125M-parameter model reads ~250 MB of weights (~85 µs at
// 3 TB/s) but launches a few hundred small kernels, each paying the host's launch cost; the
// step is launch-bound (~1.1-1.5 ms). A graph launches them all with one call.
//
// What is captured, for a decode state of batch B (LanguageModel::DecodeStep with heads = 1):
//   pinned host ids [B] -> device ids (a copy node), the embedding of those device ids, the
//   trunk's and head 1's block steps, the final norm, the LM head, the argmax of each row on the
//   device, device ids -> pinned host (a copy node).
// Replay therefore needs no host work but writing B ids into the pinned input and reading B ids
// from the pinned output after one stream synchronisation.
//
// What capture needs, and how it gets it:
//   - fixed addresses: the input / output ids and the logits are buffers the graph owns; every
//     temporary allocated during the capture comes from a graph-private pool of the caching
//     allocator (kernels/cuda/device_allocator.h) that nobody else is given while the graph
//     lives and that returns to the ordinary free lists when it dies;
//   - states updated in place: the recurrent states and conv windows are written in place by
//     their step kernels; the mLSTM step's n / m (written to fresh buffers by the chunk kernel)
//     are copied back while capturing (MlstmBlock::StepCuda). Each replay checks that the state
//     tensors still have the addresses of the capture and that the state's position is the one
//     the last replay left (an eager step or a Rewind on the state in between is an error);
//   - nothing host-side inside: no synchronisation, no pageable copy, no cudaMalloc (a cache
//     miss fails the capture). The caller warms the state with one eager one-token step first,
//     so cuBLASLt plans, the states' move to the device and the step's working set exist
//     before the capture. Any CUDA failure inside the capture fails the capture (a Status) and
//     the caller keeps the eager step.
//   - attention blocks (Llama, the hybrids' mixer; session 16, helper attngraph16): the KV length
//     and RoPE position change every token, so the recorded append, RoPE and decode attention
//     kernels read the cache length t from a device int32 the graph owns (a copy node fills it
//     from pinned memory at the start of each replay; Step writes t there and advances every
//     cache's host length after the replay). The attention kernel's grid does not depend on t
//     and its shared memory is sized for the cache's capacity, so one graph serves every length
//     below the capacity with the eager step's arithmetic (the same bits). A step that must grow
//     a cache (length == capacity: new buffers) cannot replay: MustGrow() says so, Step and
//     Capture refuse it (FailedPrecondition), and the caller steps eagerly once (the cache
//     doubles) and captures again: log2 of the tokens captures a generation. All caches of the
//     state must have one length (they do: every attention block sees every token).
//
// Thread-safety: none; the thread that drives the CUDA backend.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "ops/cuda_backend.h"
#include "ops/model.h"

namespace gyre::ops {

// GYRE_DECODE_GRAPH: unset or "1" (the default since session 16: x1.24-1.26 greedy tok/s on an
// H100, bitwise the eager tokens): eval::Generate replays a DecodeGraph on CUDA (greedy and
// sampled; attention models too since helper attngraph16, x1.22 for llama-125m; a step that grows
// a KV cache runs eagerly and the graph is captured again); "0": every step eager.
// Read once; any other value stops the process with a message naming the accepted ones.
// SetDecodeGraph overrides it (tests, benchmarks).
bool DecodeGraphEnabled();
void SetDecodeGraph(bool on);

struct DecodeGraphOptions {
  // Tests of the failure path: a stream synchronisation inside the captured region (illegal in a
  // capture), so the capture fails with the driver's message.
  bool inject_host_sync = false;
};
// Makes every following Capture inject a host synchronisation (tests of callers' fallback).
void InjectDecodeGraphFailure(bool on);


// What a captured graph pins of a decode state (DecodeGraph and SpeculativeGraph share it): every
// step tensor of its blocks with the address it had at capture (a replay writes there, so a swap
// outside the graph is an error), and the attention blocks' KV caches, all of one length.
struct PinnedState {
  // Collects `blocks` (refusing what a graph cannot replay); `what` prefixes the messages
  // ("decode graph"), `warm` says how to put a state on the device ("run one eager round").
  absl::Status Pin(const std::vector<BlockState*>& blocks, const char* what, const char* warm);
  // Every tensor still at its captured address and every cache at cache_length.
  absl::Status CheckUnmoved(const char* what) const;
  // cache_length = length, and every cache's host-side length with it.
  void SetCacheLength(int64_t length);

  std::vector<const Tensor*> tensors;
  std::vector<const void*> addresses;
  std::vector<KvCache*> caches;
  int64_t cache_length = 0;
};
class DecodeGraph {
 public:
  // Captures the one-token head-1 step of `state` (CUDA model, batch = state->batch). The state
  // must have been stepped by one eager DecodeStep (heads 1) just before (the warm-up; without it
  // the capture may miss the allocator's cache; a capture that failed on cache misses alone is
  // retried once with the missed sizes cached). Nothing runs and the state is not advanced.
  // Errors: Unimplemented (a CPU model, a block state without step tensors, KV caches of
  // different lengths), FailedPrecondition (an unwarmed state; a full KV cache: step eagerly,
  // then capture), Internal with the CUDA reason (the capture failed; eager stays usable).
  static absl::StatusOr<std::unique_ptr<DecodeGraph>> Capture(LanguageModel* model, LanguageModel::DecodeState* state,
                                                              const DecodeGraphOptions& options = {});
  ~DecodeGraph();

  // One replay: feeds `tokens` [batch] (ids < vocab) and returns head 1's argmax per sequence
  // (valid until the next Step); logits() then holds head 1's logits [batch, vocab] (bf16). As
  // LanguageModel::DecodeStep(tokens, state, 1), bit for bit. FailedPrecondition when the state
  // was stepped, rewound or swapped outside this graph since the last replay.
  absl::StatusOr<std::span<const int32_t>> Step(std::span<const int32_t> tokens);
  const Tensor& logits() const { return logits_; }
  // Nodes of the captured graph (kernels and copies).
  int64_t nodes() const { return graph_ != nullptr ? graph_->nodes() : 0; }
  // True when the next step must grow a KV cache (its length reached its capacity): Step would
  // refuse; step eagerly once, then capture again.
  bool MustGrow() const { return KvCacheFull(state_); }
  // The same test on any decode state (false without attention blocks).
  static bool KvCacheFull(LanguageModel::DecodeState* state);

 private:
  DecodeGraph() = default;
  absl::Status CheckState() const;

  LanguageModel::DecodeState* state_ = nullptr;
  int64_t batch_ = 0, vocab_ = 0, position_ = 0;
  // The state's tensors and, for attention blocks, the caches and the length every cache has
  // before the next replay.
  PinnedState pinned_;
  std::shared_ptr<void> host_in_, host_out_;  // pinned [batch] int32
  Tensor ids_, argmax_, logits_;               // device, fixed for the graph's life
  // The pinned / device int32 the recorded kernels read the cache length from (a copy node moves
  // it each replay).
  std::shared_ptr<void> host_position_;
  Tensor cache_position_;
  std::vector<int32_t> out_;
  std::unique_ptr<CudaBackend::Graph> graph_;  // declared last: destroyed (and its pool released) first
};

// GYRE_SPEC_GRAPH: unset or "1" (the default since session 17's merge: bitwise the eager rounds,
// x1.12-1.13 speculative tok/s on the recurrent 125m models) replays a SpeculativeGraph for
// eval::GenerateSpeculative's rounds on CUDA; "0": every round eager. Read once;
// other values stop the process naming the accepted ones. SetSpeculativeGraph overrides it.
bool SpeculativeGraphEnabled();
void SetSpeculativeGraph(bool on);

// GYRE_SPEC_DRAFT_ROWS: how a SpeculativeGraph round of k = 2 finds the next round's draft (session
// 18, helper spec18; ops/DECODE_GRAPHS.md). "gather" (session 17's design, every k): keep on the
// device, DraftRows gathers head 2's normed row at keep - 1, then a second LM-head product over
// that row and a second argmax. "all" (unset: the default since spec18's call 1, k = 2 rounds
// -11 to -18 µs and speculative tok/s +1.1% on xlstm[1:0]-125m and mamba2-130m, one H100): head
// 1's and head 2's rows at both positions in ONE LM-head product of k·k = 4 rows and one argmax
// launch; the host counts keep and picks head 2's id at keep - 1. GemmRows computes every row alone
// (row-invariant decoding), so each row has the bits of the eager round's product (the draft row
// those of DraftLogits' one-row product). Only at k = 2 and with row-invariant decoding (k = 3
// would be 9 rows, k = 4 16: the product turns compute-bound, session 17's first design); other
// rounds keep "gather". Read once; other values stop the process naming the accepted ones.
// SetSpecDraftRowsAll overrides it (tests, benchmarks); it applies to graphs captured after it.
bool SpecDraftRowsAll();
void SetSpecDraftRowsAll(bool on);

// SpeculativeGraph: one round of self-speculative decoding (eval/generate.h) at a fixed k,
// captured once and replayed per round (session 17, helper specgraph17; ops/DECODE_GRAPHS.md).
//
// The eager round is DecodeChunk(k tokens, heads 1..k, rewindable, deferred draft logits), head
// 1's argmax of the k rows (a sync), Rewind(keep) (handle swaps), DraftLogits at the last kept
// position and the drafts' argmax (a second sync). What varies between rounds is the k tokens,
// the position (the KV caches' length) and keep; the shapes do not (k is fixed; the last rounds
// of a generation, shorter than k, run eagerly). So:
//   - Round (the graph): pinned [k ids, 0, t] -> device (one copy node), the embedding, the
//     trunk's and heads 1..k's StepChunk over k rows, rewindable (the cells' kernels write the
//     state after every position into buffers of the graph's pool: fixed addresses), the final
//     norms, head 1's LM head over k rows and its argmax (the eager DecodeChunk with deferred
//     drafts); then keep on the DEVICE (DraftRows: 1 + the drafts equal to head 1's argmax
//     before them, the host's acceptance rule), the gather of heads 2..k's rows at keep - 1,
//     the LM head over those k - 1 rows and their argmax (eager DraftLogits: the same shapes,
//     the same bits), and [head 1's k ids, k - 1 drafts, keep] -> pinned. Attention blocks read
//     the cache length t from the device (as DecodeGraph). One synchronisation a round, not two.
//     (Call 1 computed every head at every position in one 16-row LM-head product instead: the
//     same bits, but ~0.4 ms slower a round, DECODE_GRAPHS.md.)
//   - Commit(keep) (eager, after the host counted the accepted drafts): keep < k puts the
//     state after position keep - 1 back into the live state tensors IN PLACE with one
//     CopySpans launch (ops/cuda_infer.h; the graph's addresses must not move, so no handle
//     swap), and truncates the KV caches' host length; keep = k does nothing.
// Refused (Unimplemented; the caller keeps the eager round): batch != 1, k > 16, KV caches of
// different lengths, a block whose chunk keeps no per-position states. FailedPrecondition: an
// unwarmed state (run one eager round first), a KV cache without room for k more rows (an eager
// round grows it; capture again).
class SpeculativeGraph {
 public:
  // Captures the round of `state` (after one eager round of the same k: the warm-up). Nothing
  // runs; the state is not advanced.
  static absl::StatusOr<std::unique_ptr<SpeculativeGraph>> Capture(LanguageModel* model,
                                                                   LanguageModel::DecodeState* state, int64_t k,
                                                                   const DecodeGraphOptions& options = {});
  ~SpeculativeGraph();

  // One verification round over `chunk` [k] (the kept token, then the drafts), as the eager
  // round's DecodeChunk + DraftLogits. Returns ids [2k] (valid until the next Round): [0, k) head
  // 1's argmax at each chunk position, [k, 2k - 1) heads 2..k's argmax at position keep - 1 (the
  // next round's drafts), [2k - 1] keep: forced_keep when > 0 (tests), else 1 + the drafts
  // accepted by the acceptance rule. logits()[0] is head 1's logits [k, vocab], logits()[1]
  // heads 2..k's at keep - 1 [k - 1, vocab] (bf16). The state then stands after all k
  // positions; call Commit (with that keep, unless the generation ends) before the next Round.
  absl::StatusOr<std::span<const int32_t>> Round(std::span<const int32_t> chunk, int64_t forced_keep = 0);
  // Keeps the first `keep` (1..k) positions of the last Round, as LanguageModel::Rewind would.
  absl::Status Commit(int64_t keep);
  const std::vector<Tensor>& logits() const { return all_rows_ ? round_logits_ : logits_; }
  int64_t k() const { return k_; }
  // True when this graph finds the drafts with the one all-rows product (SpecDraftRowsAll at k = 2).
  bool all_draft_rows() const { return all_rows_; }
  int64_t nodes() const { return graph_ != nullptr ? graph_->nodes() : 0; }
  // Bytes one Commit below k copies (every state tensor once).
  int64_t commit_bytes() const { return commit_bytes_; }
  // True when the next round would grow a KV cache (length + k > capacity): Round refuses; run
  // one eager round, then capture again.
  bool MustGrow() const { return CacheTooShort(state_, k_); }
  static bool CacheTooShort(LanguageModel::DecodeState* state, int64_t k);

 private:
  SpeculativeGraph() = default;
  absl::Status CheckState() const;

  LanguageModel::DecodeState* state_ = nullptr;
  int64_t k_ = 0, vocab_ = 0, position_ = 0, commit_bytes_ = 0, max_span_bytes_ = 0, spans_ = 0;
  bool committed_ = true;
  // SpecDraftRowsAll: logits_ holds heads 1..k's rows at every position (views of one [k·k, V]
  // product), the device returns their k·k argmaxes, and Round picks the drafts at keep - 1 on the
  // host; round_logits_ = {head 1's [k, V], head 2's row at keep - 1} for logits().
  bool all_rows_ = false;
  std::vector<Tensor> round_logits_;
  PinnedState pinned_;
  std::shared_ptr<void> host_in_, host_out_;  // pinned [k + 2] / [2k] int32
  Tensor ids_, argmax_;
  std::vector<Tensor> logits_, draft_hidden_;
  // The per-position state copies the replays write (views into the graph's pool) and, per keep
  // 1..k-1, the device table of CopySpans records that restores them.
  std::vector<RewindSlot> slots_;
  std::vector<Tensor> commit_tables_;
  std::vector<int32_t> out_, all_ids_;
  std::unique_ptr<CudaBackend::Graph> graph_;  // declared last: destroyed (and its pool released) first
};

}  // namespace gyre::ops
