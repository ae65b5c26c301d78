#include "ops/decode_graph.h"

#include <algorithm>
#include <cstring>
#include <string>

#include "absl/strings/str_cat.h"
#include "ops/attention.h"
#include "ops/cuda_infer.h"
#include "ops/env_switch.h"

namespace gyre::ops {
namespace {

bool& GraphSwitch() {
  static bool on = EnvChoice("GYRE_DECODE_GRAPH", {"0", "1"}, "1") == "1";
  return on;
}

bool& InjectFailure() {
  static bool on = false;
  return on;
}

const void* Address(const Tensor* t) { return t->defined() && t->numel() > 0 ? t->raw() : nullptr; }

}  // namespace

absl::Status PinnedState::Pin(const std::vector<BlockState*>& blocks, const char* what, const char* warm) {
  for (BlockState* b : blocks) {
    const std::vector<const Tensor*> step = b->StepTensors();
    if (step.empty()) return absl::UnimplementedError(absl::StrCat(what, ": a block state without step tensors"));
    if (KvCache* cache = b->AttentionCache(); cache != nullptr) {
      if (!cache->cuda_k.defined()) {
        return absl::FailedPreconditionError(absl::StrCat(what, ": a KV cache is not on the device yet (", warm, ")"));
      }
      if (!caches.empty() && cache->cuda_length != cache_length) {
        return absl::UnimplementedError(absl::StrCat(what, ": KV caches of different lengths (", cache_length, " and ",
                                                     cache->cuda_length, ")"));
      }
      cache_length = cache->cuda_length;
      caches.push_back(cache);
    }
    for (const Tensor* t : step) {
      if (t->defined() && t->numel() > 0 && !IsCuda(*t)) {
        return absl::FailedPreconditionError(absl::StrCat(what, ": the state is not on the device yet (", warm, ")"));
      }
      tensors.push_back(t);
      addresses.push_back(Address(t));
    }
  }
  return absl::OkStatus();
}

absl::Status PinnedState::CheckUnmoved(const char* what) const {
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (Address(tensors[i]) != addresses[i]) {
      return absl::FailedPreconditionError(absl::StrCat(
          what, ": state tensor ", i, " no longer has the captured address (swapped outside the graph)"));
    }
  }
  for (const KvCache* cache : caches) {
    if (cache->cuda_length != cache_length) {
      return absl::FailedPreconditionError(absl::StrCat(what, ": a KV cache has length ", cache->cuda_length,
                                                        ", the graph left it at ", cache_length));
    }
  }
  return absl::OkStatus();
}

void PinnedState::SetCacheLength(int64_t length) {
  cache_length = length;
  for (KvCache* cache : caches) cache->cuda_length = length;
}

bool DecodeGraphEnabled() { return GraphSwitch(); }
void SetDecodeGraph(bool on) { GraphSwitch() = on; }
void InjectDecodeGraphFailure(bool on) { InjectFailure() = on; }

absl::StatusOr<std::unique_ptr<DecodeGraph>> DecodeGraph::Capture(LanguageModel* model,
                                                                  LanguageModel::DecodeState* state,
                                                                  const DecodeGraphOptions& options) {
  const Tensor& table = model->embedding_->weight()->compute;
  if (!table.defined() || !IsCuda(table)) return absl::UnimplementedError("decode graph: the model is not on CUDA");
  // The blocks head 1's step runs: the trunk and head 1. A state without step tensors (a KV
  // cache) cannot be replayed at a fixed position.
  std::vector<BlockState*> blocks;
  for (const auto& s : state->trunk) blocks.push_back(s.get());
  blocks.push_back(state->heads[0].get());
  auto graph = std::unique_ptr<DecodeGraph>(new DecodeGraph());
  if (absl::Status s = graph->pinned_.Pin(blocks, "decode graph", "warm it with one eager DecodeStep"); !s.ok()) return s;
  if (state->position < 1) {
    return absl::FailedPreconditionError("decode graph: warm the state with one eager DecodeStep before the capture");
  }
  if (KvCacheFull(state)) {
    return absl::FailedPreconditionError(absl::StrCat("decode graph: a KV cache is full (length ", graph->pinned_.cache_length,
                                                      "): one eager step grows it, then capture again"));
  }
  const int64_t B = state->batch, V = model->spec().vocab_size, d = model->spec().d_model;
  graph->state_ = state;
  graph->batch_ = B;
  graph->vocab_ = V;
  graph->position_ = state->position;
  graph->host_in_ = Cuda().AllocatePinnedHost(B * sizeof(int32_t));
  graph->host_out_ = Cuda().AllocatePinnedHost(B * sizeof(int32_t));
  if (graph->host_in_ == nullptr || graph->host_out_ == nullptr) {
    return absl::ResourceExhaustedError("decode graph: no page-locked host memory for the token ids");
  }
  graph->ids_ = Tensor::Empty({B}, DType::kI32, Device::kCuda);
  graph->argmax_ = Tensor::Empty({B}, DType::kI32, Device::kCuda);
  graph->out_.resize(static_cast<size_t>(B));
  if (!graph->pinned_.caches.empty()) {
    graph->host_position_ = Cuda().AllocatePinnedHost(sizeof(int32_t));
    if (graph->host_position_ == nullptr) {
      return absl::ResourceExhaustedError("decode graph: no page-locked host memory for the cache length");
    }
    graph->cache_position_ = Tensor::Empty({1}, DType::kI32, Device::kCuda);
  }
  const int32_t* position_dev = graph->pinned_.caches.empty() ? nullptr : graph->cache_position_.data<int32_t>();

  // The host-side bookkeeping of DecodeChunk is redone by each Step; the capture must not move it.
  const int64_t position = state->position, live_heads = state->live_heads, rewind = state->rewind_chunk;
  CudaBackend& cuda = Cuda();
  std::string why;
  // A second attempt only after a capture that failed on allocator cache misses alone (the
  // warm-up's free blocks were short, e.g. of the few the graph's own buffers took): EndCapture
  // has cached the missed sizes, so the same recording now finds them. Nothing ran either time.
  bool retry = true;
  for (int attempt = 0; attempt < 2 && retry && graph->graph_ == nullptr; ++attempt) {
    retry = false;
    cuda.BeginCapture();
    cuda.CopyAsync(graph->ids_.raw(), graph->host_in_.get(), B * sizeof(int32_t));
    if (position_dev != nullptr) {
      cuda.CopyAsync(graph->cache_position_.raw(), graph->host_position_.get(), sizeof(int32_t));
    }
    for (KvCache* cache : graph->pinned_.caches) cache->graph_position = position_dev;
    Tensor z = Tensor::Empty({B, d}, DType::kBF16, Device::kCuda);
    CudaInfer().EmbeddingRows(graph->ids_.data<int32_t>(), B, table.raw(), V, d, z.raw());
    if (options.inject_host_sync || InjectFailure()) cuda.Synchronize();
    LanguageModel::DecodeOptions step;
    step.heads = 1;
    state->live_heads = 1;
    graph->logits_ = model->DecodeEmbedded(z, 1, state, step)[0];
    z = Tensor();
    CudaInfer().ArgmaxRows(graph->logits_.raw(), B, V, V, graph->argmax_.data<int32_t>());
    cuda.CopyAsync(graph->host_out_.get(), graph->argmax_.raw(), B * sizeof(int32_t));
    graph->graph_ = cuda.EndCapture(&why, &retry);
    for (KvCache* cache : graph->pinned_.caches) {
      cache->graph_position = nullptr;
      cache->cuda_length = graph->pinned_.cache_length;  // the recording advanced the host length
    }
    state->position = position;
    state->live_heads = live_heads;
    state->rewind_chunk = rewind;
    state->draft_hidden.clear();
    if (graph->graph_ == nullptr) graph->logits_ = Tensor();
  }
  if (graph->graph_ == nullptr) return absl::InternalError(absl::StrCat("decode graph: capture failed: ", why));
  if (absl::Status s = graph->CheckState(); !s.ok()) {
    return absl::InternalError(absl::StrCat("decode graph: a block moved its state during the capture: ", s.message()));
  }
  return graph;
}

DecodeGraph::~DecodeGraph() = default;

bool DecodeGraph::KvCacheFull(LanguageModel::DecodeState* state) {
  std::vector<BlockState*> blocks;
  for (const auto& s : state->trunk) blocks.push_back(s.get());
  if (!state->heads.empty()) blocks.push_back(state->heads[0].get());
  for (BlockState* b : blocks) {
    const KvCache* cache = b->AttentionCache();
    if (cache != nullptr && cache->cuda_k.defined() && cache->cuda_length >= cache->cuda_capacity()) return true;
  }
  return false;
}

absl::Status DecodeGraph::CheckState() const {
  if (state_->position != position_) {
    return absl::FailedPreconditionError(absl::StrCat("decode graph: the state is at position ", state_->position,
                                                      ", the graph left it at ", position_,
                                                      " (stepped or rewound outside the graph)"));
  }
  if (absl::Status s = pinned_.CheckUnmoved("decode graph"); !s.ok()) return s;
  for (const KvCache* cache : pinned_.caches) {
    if (cache->cuda_length >= cache->cuda_capacity()) {
      return absl::FailedPreconditionError(
          absl::StrCat("decode graph: the KV cache is full (length ", cache->cuda_length,
                       "): the next step grows it; step eagerly once and capture again (MustGrow)"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::span<const int32_t>> DecodeGraph::Step(std::span<const int32_t> tokens) {
  if (static_cast<int64_t>(tokens.size()) != batch_) {
    return absl::InvalidArgumentError(absl::StrCat("decode graph: ", tokens.size(), " tokens for batch ", batch_));
  }
  for (int32_t id : tokens) {
    if (id < 0 || id >= vocab_) {
      return absl::InvalidArgumentError(absl::StrCat("decode graph: token id ", id, " outside vocabulary ", vocab_));
    }
  }
  if (absl::Status s = CheckState(); !s.ok()) return s;
  // The previous replay has finished (Step synchronises), so the pinned input is free.
  std::memcpy(host_in_.get(), tokens.data(), tokens.size() * sizeof(int32_t));
  if (!pinned_.caches.empty()) *static_cast<int32_t*>(host_position_.get()) = static_cast<int32_t>(pinned_.cache_length);
  graph_->Launch();
  Cuda().Synchronize();
  std::memcpy(out_.data(), host_out_.get(), out_.size() * sizeof(int32_t));
  pinned_.SetCacheLength(pinned_.cache_length + 1);
  state_->position += 1;
  position_ = state_->position;
  state_->live_heads = 1;
  state_->rewind_chunk = 0;
  state_->draft_hidden.clear();
  return std::span<const int32_t>(out_);
}


// ---------------------------------------------------------------- speculative rounds

namespace {

bool& SpecGraphSwitch() {
  static bool on = EnvChoice("GYRE_SPEC_GRAPH", {"0", "1"}, "1") == "1";
  return on;
}

// The blocks a speculative round of k heads runs: the trunk and heads 1..k.
std::vector<BlockState*> RoundBlocks(LanguageModel::DecodeState* state, int64_t k) {
  std::vector<BlockState*> blocks;
  for (const auto& s : state->trunk) blocks.push_back(s.get());
  for (int64_t h = 0; h < k && h < static_cast<int64_t>(state->heads.size()); ++h) blocks.push_back(state->heads[h].get());
  return blocks;
}

}  // namespace

bool SpeculativeGraphEnabled() { return SpecGraphSwitch(); }
void SetSpeculativeGraph(bool on) { SpecGraphSwitch() = on; }

namespace {

bool& SpecDraftRowsSwitch() {
  static bool all = EnvChoice("GYRE_SPEC_DRAFT_ROWS", {"gather", "all"}, "all") == "all";
  return all;
}

}  // namespace

bool SpecDraftRowsAll() { return SpecDraftRowsSwitch(); }
void SetSpecDraftRowsAll(bool on) { SpecDraftRowsSwitch() = on; }

bool SpeculativeGraph::CacheTooShort(LanguageModel::DecodeState* state, int64_t k) {
  for (BlockState* b : RoundBlocks(state, k)) {
    const KvCache* cache = b->AttentionCache();
    if (cache != nullptr && cache->cuda_k.defined() && cache->cuda_length + k > cache->cuda_capacity()) return true;
  }
  return false;
}

absl::StatusOr<std::unique_ptr<SpeculativeGraph>> SpeculativeGraph::Capture(LanguageModel* model,
                                                                             LanguageModel::DecodeState* state, int64_t k,
                                                                             const DecodeGraphOptions& options) {
  const Tensor& table = model->embedding_->weight()->compute;
  if (!table.defined() || !IsCuda(table)) return absl::UnimplementedError("speculative graph: the model is not on CUDA");
  if (state->batch != 1) return absl::UnimplementedError("speculative graph: batch 1 only (speculative decoding's)");
  if (k < 2 || k > static_cast<int64_t>(state->heads.size()) || k > state->live_heads) {
    return absl::InvalidArgumentError(absl::StrCat("speculative graph: k ", k, " outside [2, live heads ",
                                                   state->live_heads, "]"));
  }
  if (k > 16) return absl::UnimplementedError(absl::StrCat("speculative graph: k ", k, " > 16 (the draft gather's table)"));
  auto graph = std::unique_ptr<SpeculativeGraph>(new SpeculativeGraph());
  if (absl::Status s = graph->pinned_.Pin(RoundBlocks(state, k), "speculative graph", "run one eager round"); !s.ok()) {
    return s;
  }
  if (state->position < 1) return absl::FailedPreconditionError("speculative graph: run one eager round before the capture");
  if (CacheTooShort(state, k)) {
    return absl::FailedPreconditionError(absl::StrCat("speculative graph: a KV cache has no room for ", k,
                                                      " more rows (length ", graph->pinned_.cache_length,
                                                      "): one eager round grows it, then capture again"));
  }
  const int64_t V = model->spec().vocab_size, d = model->spec().d_model;
  graph->state_ = state;
  graph->k_ = k;
  graph->vocab_ = V;
  graph->position_ = state->position;
  graph->all_rows_ = k == 2 && SpecDraftRowsAll() && RowInvariantDecode();
  // In: [k tokens, forced keep, cache length]; out: [head 1's k ids, the k - 1 drafts, keep] (all
  // rows: the k·k argmaxes of heads 1..k at positions 0..k-1, head-major).
  const int64_t out_ids = graph->all_rows_ ? k * k : 2 * k;
  graph->host_in_ = Cuda().AllocatePinnedHost((k + 2) * sizeof(int32_t));
  graph->host_out_ = Cuda().AllocatePinnedHost(out_ids * sizeof(int32_t));
  if (graph->host_in_ == nullptr || graph->host_out_ == nullptr) {
    return absl::ResourceExhaustedError("speculative graph: no page-locked host memory for the token ids");
  }
  std::memset(graph->host_in_.get(), 0, (k + 2) * sizeof(int32_t));
  graph->ids_ = Tensor::Empty({k + 2}, DType::kI32, Device::kCuda);
  graph->argmax_ = Tensor::Empty({out_ids}, DType::kI32, Device::kCuda);
  graph->out_.resize(static_cast<size_t>(2 * k));
  graph->all_ids_.resize(static_cast<size_t>(out_ids));
  int32_t* in_dev = graph->ids_.data<int32_t>();
  int32_t* out_dev = graph->argmax_.data<int32_t>();
  const int32_t* position_dev = graph->pinned_.caches.empty() ? nullptr : in_dev + k + 1;
  const std::vector<BlockState*> blocks = RoundBlocks(state, k);

  const int64_t position = state->position, live_heads = state->live_heads, rewind = state->rewind_chunk;
  CudaBackend& cuda = Cuda();
  std::string why;
  bool retry = true;
  for (int attempt = 0; attempt < 2 && retry && graph->graph_ == nullptr; ++attempt) {
    retry = false;
    cuda.BeginCapture();
    cuda.CopyAsync(in_dev, graph->host_in_.get(), (k + 2) * sizeof(int32_t));
    for (KvCache* cache : graph->pinned_.caches) cache->graph_position = position_dev;
    Tensor z = Tensor::Empty({k, d}, DType::kBF16, Device::kCuda);
    CudaInfer().EmbeddingRows(in_dev, k, table.raw(), V, d, z.raw());
    if (options.inject_host_sync || InjectFailure()) cuda.Synchronize();
    // The eager round's DecodeChunk: head 1's logits [k, V], heads 2..k's normed rows deferred.
    LanguageModel::DecodeOptions round;
    round.heads = k;
    round.rewindable = true;
    round.defer_draft_logits = !graph->all_rows_;
    state->live_heads = k;
    graph->logits_ = model->DecodeEmbedded(z, k, state, round);
    z = Tensor();
    if (graph->all_rows_) {
      // Heads 1..k at every position from one product: logits_[h] are rows [h·k, (h + 1)·k) of it,
      // consecutive, so one argmax launch covers all k·k rows.
      if (static_cast<int64_t>(graph->logits_.size()) != k ||
          static_cast<const char*>(graph->logits_[k - 1].raw()) !=
              static_cast<const char*>(graph->logits_[0].raw()) + (k - 1) * k * V * DTypeSize(DType::kBF16)) {
        cuda.FailCapture("speculative graph: the heads' logits are not one product");
      }
      CudaInfer().ArgmaxRows(graph->logits_[0].raw(), k * k, V, V, out_dev);
      cuda.CopyAsync(graph->host_out_.get(), out_dev, out_ids * sizeof(int32_t));
      graph->graph_ = cuda.EndCapture(&why, &retry);
    } else {
      graph->draft_hidden_ = state->draft_hidden;
      CudaInfer().ArgmaxRows(graph->logits_[0].raw(), k, V, V, out_dev);
      // DraftLogits at the position the host will keep, found on the device: the gather, one
      // LM-head product over k - 1 rows (the eager one's shape, so its bits), their argmax.
      std::vector<const void*> srcs;
      for (const Tensor& h : graph->draft_hidden_) srcs.push_back(h.raw());
      Tensor rows = Tensor::Empty({k - 1, d}, DType::kBF16, Device::kCuda);
      if (static_cast<int64_t>(srcs.size()) != k - 1) cuda.FailCapture("speculative graph: no deferred draft rows");
      CudaInfer().DraftRows(in_dev, out_dev, in_dev + k, out_dev + 2 * k - 1, k, srcs, d, rows.raw());
      graph->logits_.push_back(LinearForward(rows, model->HeadWeight()));
      rows = Tensor();
      CudaInfer().ArgmaxRows(graph->logits_[1].raw(), k - 1, V, V, out_dev + k);
      cuda.CopyAsync(graph->host_out_.get(), out_dev, 2 * k * sizeof(int32_t));
      graph->graph_ = cuda.EndCapture(&why, &retry);
    }
    for (KvCache* cache : graph->pinned_.caches) {
      cache->graph_position = nullptr;
      cache->cuda_length = graph->pinned_.cache_length;
    }
    state->position = position;
    state->live_heads = live_heads;
    state->rewind_chunk = rewind;
    state->draft_hidden.clear();
    // The recorded per-position copies: kept for the commit when the capture worked, dropped
    // otherwise (the blocks' histories are emptied either way).
    graph->slots_.clear();
    for (BlockState* b : blocks) {
      for (RewindSlot& s : b->TakeRewindSlots()) graph->slots_.push_back(std::move(s));
    }
    if (graph->graph_ == nullptr) graph->logits_.clear(), graph->slots_.clear(), graph->draft_hidden_.clear();
  }
  if (graph->graph_ == nullptr) return absl::InternalError(absl::StrCat("speculative graph: capture failed: ", why));
  if (absl::Status s = graph->CheckState(); !s.ok()) {
    return absl::InternalError(absl::StrCat("speculative graph: a block moved its state during the capture: ", s.message()));
  }
  // Per keep 1..k-1: one CopySpans record a state tensor (after[keep - 1] -> live).
  std::vector<std::vector<CudaCopySpan>> tables(static_cast<size_t>(k - 1));
  for (const RewindSlot& s : graph->slots_) {
    if (static_cast<int64_t>(s.after.size()) != k - 1) {
      return absl::UnimplementedError(absl::StrCat("speculative graph: a state tensor kept ", s.after.size(),
                                                   " per-position copies of a chunk of ", k));
    }
    const int64_t bytes = s.live->numel() * static_cast<int64_t>(DTypeSize(s.live->dtype()));
    if (!IsCuda(*s.live) || bytes % 4 != 0) {
      return absl::UnimplementedError("speculative graph: a state tensor is not a device array of 4-byte words");
    }
    for (int64_t keep = 1; keep < k; ++keep) {
      const Tensor& src = s.after[keep - 1];
      if (src.numel() != s.live->numel() || src.dtype() != s.live->dtype()) {
        return absl::InternalError("speculative graph: a per-position copy differs from its state tensor");
      }
      if (src.raw() == s.live->raw()) continue;  // a width-1 conv window: the state itself
      tables[keep - 1].push_back({s.live->raw(), src.raw(), bytes});
      if (keep == 1) graph->commit_bytes_ += bytes;
      graph->max_span_bytes_ = std::max(graph->max_span_bytes_, bytes);
    }
  }
  for (auto& t : tables) {
    const int64_t words = static_cast<int64_t>(t.size() * sizeof(CudaCopySpan) / sizeof(int32_t));
    Tensor dev = Tensor::Empty({std::max<int64_t>(words, 1)}, DType::kI32, Device::kCuda);
    if (!t.empty()) {
      Cuda().CopyBytes(dev.raw(), Device::kCuda, t.data(), Device::kCpu, t.size() * sizeof(CudaCopySpan));
    }
    graph->spans_ = std::max<int64_t>(graph->spans_, static_cast<int64_t>(t.size()));
    graph->commit_tables_.push_back(std::move(dev));
  }
  return graph;
}

SpeculativeGraph::~SpeculativeGraph() = default;

absl::Status SpeculativeGraph::CheckState() const {
  if (state_->position != position_) {
    return absl::FailedPreconditionError(absl::StrCat("speculative graph: the state is at position ", state_->position,
                                                      ", the graph left it at ", position_,
                                                      " (stepped or rewound outside the graph)"));
  }
  return pinned_.CheckUnmoved("speculative graph");
}

absl::StatusOr<std::span<const int32_t>> SpeculativeGraph::Round(std::span<const int32_t> chunk, int64_t forced_keep) {
  if (static_cast<int64_t>(chunk.size()) != k_) {
    return absl::InvalidArgumentError(absl::StrCat("speculative graph: ", chunk.size(), " tokens for k ", k_));
  }
  for (int32_t id : chunk) {
    if (id < 0 || id >= vocab_) {
      return absl::InvalidArgumentError(absl::StrCat("speculative graph: token id ", id, " outside vocabulary ", vocab_));
    }
  }
  if (forced_keep < 0 || forced_keep > k_) {
    return absl::InvalidArgumentError(absl::StrCat("speculative graph: forced keep ", forced_keep, " outside [0, ", k_, "]"));
  }
  if (!committed_) return absl::FailedPreconditionError("speculative graph: Round before the last round's Commit");
  if (absl::Status s = CheckState(); !s.ok()) return s;
  if (MustGrow()) {
    return absl::FailedPreconditionError(absl::StrCat("speculative graph: a KV cache (length ", pinned_.cache_length,
                                                      ") has no room for ", k_, " rows: run an eager round (MustGrow)"));
  }
  int32_t* in = static_cast<int32_t*>(host_in_.get());
  std::memcpy(in, chunk.data(), chunk.size() * sizeof(int32_t));
  in[k_] = static_cast<int32_t>(forced_keep);
  in[k_ + 1] = static_cast<int32_t>(pinned_.cache_length);
  graph_->Launch();
  Cuda().Synchronize();
  if (all_rows_) {
    // The acceptance rule (DraftRows') on the host, then head h's id at keep - 1 for h = 2..k.
    std::memcpy(all_ids_.data(), host_out_.get(), all_ids_.size() * sizeof(int32_t));
    int64_t keep = forced_keep;
    if (keep == 0) {
      keep = 1;
      while (keep < k_ && chunk[keep] == all_ids_[keep - 1]) ++keep;
    }
    for (int64_t j = 0; j < k_; ++j) out_[j] = all_ids_[j];
    for (int64_t h = 1; h < k_; ++h) out_[k_ + h - 1] = all_ids_[h * k_ + keep - 1];
    out_[2 * k_ - 1] = static_cast<int32_t>(keep);
    round_logits_ = {logits_[0], logits_[1].Rows(keep - 1, keep)};  // k = 2: head 2 is the only draft head
  } else {
    std::memcpy(out_.data(), host_out_.get(), out_.size() * sizeof(int32_t));
  }
  pinned_.SetCacheLength(pinned_.cache_length + k_);
  state_->position += k_;
  position_ = state_->position;
  state_->live_heads = k_;
  state_->rewind_chunk = 0;  // LanguageModel::Rewind must not swap the graph's states: Commit does it
  state_->draft_hidden.clear();
  committed_ = false;
  return std::span<const int32_t>(out_);
}

absl::Status SpeculativeGraph::Commit(int64_t keep) {
  if (committed_) return absl::FailedPreconditionError("speculative graph: Commit without a Round");
  if (keep < 1 || keep > k_) {
    return absl::InvalidArgumentError(absl::StrCat("speculative graph: keep ", keep, " outside [1, ", k_, "]"));
  }
  if (absl::Status s = CheckState(); !s.ok()) return s;
  if (keep < k_) {
    const Tensor& table = commit_tables_[static_cast<size_t>(keep - 1)];
    const int64_t n = static_cast<int64_t>(table.numel() * sizeof(int32_t) / sizeof(CudaCopySpan));
    if (n > 0) CudaInfer().CopySpans(table.raw(), n, max_span_bytes_);
    pinned_.SetCacheLength(pinned_.cache_length - (k_ - keep));
    state_->position -= k_ - keep;
    position_ = state_->position;
  }
  committed_ = true;
  return absl::OkStatus();
}

}  // namespace gyre::ops
