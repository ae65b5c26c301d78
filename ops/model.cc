#include "ops/model.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "ops/cuda_backend.h"
#include "ops/cuda_infer.h"
#include "ops/llama_block.h"
#include "ops/recompute_budget.h"

namespace gyre::ops {
namespace {

// What the CUDA kernels support (kernels/cuda/{mlstm,slstm,ssd,conv1d}.h, ops/recurrent_cuda.h),
// checked before anything is allocated so a bad configuration fails with the field's name.
absl::Status CheckCudaSupport(const ModelSpec& spec) {
  bool attention = false, mlstm = false, slstm = false, mamba = false;
  bool xlstm_large = false;
  for (BlockType b : spec.blocks) {
    xlstm_large |= b == BlockType::kXlstmLarge;
    attention |= b == BlockType::kAttention;
    mlstm |= b == BlockType::kMlstm;
    slstm |= b == BlockType::kSlstm;
    mamba |= b == BlockType::kMamba2;
  }
  auto unsupported = [](const std::string& what) {
    return absl::UnimplementedError(absl::StrCat("no CUDA kernel yet for ", what));
  };
  // Attention: Llama blocks and the hybrids' mixer (partial rotary through ops/cuda_infer.h, the
  // qkv conv through the CUDA conv1d); the plain fallback kernel covers head dims other than
  // 64 / 128 (SelfExtend needs 64 or 128 and says so when it is switched on).
  if (attention && spec.attn_qkv_conv > 4)
    return unsupported(absl::StrCat("attention qkv conv width ", spec.attn_qkv_conv, " (CUDA conv1d: 1..4)"));
  if (attention && spec.attn_head_dim > 256)
    return unsupported(absl::StrCat("attention head dim ", spec.attn_head_dim, " (CUDA: <= 256)"));
  if ((mlstm || slstm) && (spec.conv_kernel < 1 || spec.conv_kernel > 4))
    return unsupported(absl::StrCat("conv_kernel ", spec.conv_kernel, " (CUDA conv1d: 1..4)"));
  if (mlstm) {
    const int64_t dk = spec.mlstm_inner / spec.mlstm_heads;
    if (dk % 64 != 0) return unsupported(absl::StrCat("mLSTM head dim ", dk, " (CUDA: a multiple of 64)"));
    if (spec.mlstm_chunk != 16 && spec.mlstm_chunk != 32 && spec.mlstm_chunk != 64 && spec.mlstm_chunk != 128 &&
        spec.mlstm_chunk != 256)
      return unsupported(absl::StrCat("mLSTM chunk ", spec.mlstm_chunk, " (CUDA: 16, 32, 64, 128 or 256)"));
    if (spec.mlstm_chunk == 256 && dk % 128 != 0)
      return unsupported(absl::StrCat("mLSTM chunk 256 with head dim ", dk, " (CUDA: a multiple of 128)"));
    if (spec.mlstm_heads > 8) return unsupported(absl::StrCat("mLSTM with ", spec.mlstm_heads, " heads (CUDA: <= 8)"));
    if (spec.qkv_block_size > 8 || spec.mlstm_inner % spec.qkv_block_size != 0)
      return unsupported(absl::StrCat("mLSTM qkv_block_size ", spec.qkv_block_size, " (CUDA: <= 8)"));
  }
  if (slstm) {
    const int64_t dh = spec.d_model / spec.slstm_heads;
    if (dh % 16 != 0 || dh > 512) return unsupported(absl::StrCat("sLSTM head dim ", dh, " (CUDA: multiple of 16, <= 512)"));
  }
  if (mamba) {
    if (spec.ssm_head_dim % 32 != 0 || spec.ssm_head_dim > 128)
      return unsupported(absl::StrCat("SSD head dim ", spec.ssm_head_dim, " (CUDA: multiple of 32, <= 128)"));
    if (spec.ssm_state % 32 != 0 || spec.ssm_state > 256)
      return unsupported(absl::StrCat("SSD state ", spec.ssm_state, " (CUDA: multiple of 32, <= 256)"));
    if (spec.ssm_chunk % 64 != 0 || spec.ssm_chunk > 256)
      return unsupported(absl::StrCat("SSD chunk ", spec.ssm_chunk, " (CUDA: multiple of 64, <= 256)"));
    if (spec.ssm_conv < 1 || spec.ssm_conv > 4) return unsupported(absl::StrCat("ssm_conv ", spec.ssm_conv, " (CUDA: 1..4)"));
  }
  if (xlstm_large) {
    // The chunkwise cell (kernels/cuda/mlstm.h), the gates' [rows, 2·NH] bf16 gradient as a GEMM
    // operand (rows of 16 bytes), the gate weights' adjacency in the flat store (NH·d % 8). A dk
    // that is not a multiple of 64 runs the cell at dk rounded up to 64, q / k zero-padded per head
    // by the block (XlstmLargeBlock, ops/XLSTM_LARGE.md "dk 96"); the pad kernel moves 16-byte
    // vectors, so such a dk must be a multiple of 8.
    const int64_t dk = spec.xl_qk_dim / spec.xl_heads, dv = spec.xl_v_dim / spec.xl_heads;
    const int64_t dk_cell = (dk + 63) / 64 * 64;
    if (dk % 8 != 0 || dv % 64 != 0)
      return unsupported(absl::StrCat("xLSTM Large head dims dk ", dk, ", dv ", dv,
                                      " (CUDA: dk a multiple of 8, padded to a multiple of 64 for the cell; dv a "
                                      "multiple of 64)"));
    if (spec.mlstm_chunk != 16 && spec.mlstm_chunk != 32 && spec.mlstm_chunk != 64 && spec.mlstm_chunk != 128 &&
        spec.mlstm_chunk != 256)
      return unsupported(absl::StrCat("xLSTM Large chunk ", spec.mlstm_chunk, " (CUDA: 16, 32, 64, 128 or 256)"));
    if (spec.mlstm_chunk == 256 && (dk_cell % 128 != 0 || dv % 128 != 0))
      return unsupported(absl::StrCat("xLSTM Large chunk 256 with dk ", dk, " (cell dk ", dk_cell, "), dv ", dv,
                                      " (CUDA: multiples of 128)"));
    if (spec.xl_heads % 4 != 0)
      return unsupported(absl::StrCat("xLSTM Large with ", spec.xl_heads, " heads (CUDA: a multiple of 4)"));
  }
  return absl::OkStatus();
}

}  // namespace

LanguageModel::LanguageModel(const ModelSpec& spec, DType dtype, Device device)
    : spec_(spec), store_(std::make_unique<ParamStore>(dtype, device)) {}

absl::StatusOr<std::unique_ptr<LanguageModel>> LanguageModel::Create(const ModelSpec& spec, DType dtype,
                                                                     Device device, uint64_t seed) {
  if (dtype != DType::kF32 && dtype != DType::kF64) {
    return absl::InvalidArgumentError(absl::StrCat("model dtype ", DTypeName(dtype), " has no CPU kernels"));
  }
  if (device == Device::kCuda) {
    // Mixed precision: fp32 masters and gradients, bf16 compute copies and activations.
    if (dtype != DType::kF32) {
      return absl::InvalidArgumentError(absl::StrCat("CUDA models keep f32 master weights; dtype ", DTypeName(dtype)));
    }
    if (CudaBackendOrNull() == nullptr) {
      return absl::FailedPreconditionError("this binary was built without CUDA (build with --config=cuda)");
    }
    RETURN_IF_ERROR(CheckCudaSupport(spec));
    // Initialise on the host (the same weights as a CPU model of the same seed), then move into
    // flat device buffers.
    std::unique_ptr<LanguageModel> m(new LanguageModel(spec, dtype, Device::kCpu));
    m->store_->StageForDevice();
    RETURN_IF_ERROR(m->Build(seed));
    m->store_->MoveToDevice(Device::kCuda);
    return m;
  }
  std::unique_ptr<LanguageModel> m(new LanguageModel(spec, dtype, device));
  RETURN_IF_ERROR(m->Build(seed));
  return m;
}

absl::Status LanguageModel::Build(uint64_t seed) {
  rng_ = std::make_unique<Rng>(seed);
  BuildContext root{store_.get(), rng_.get(), ""};
  const int64_t d = spec_.d_model, V = spec_.vocab_size;
  embedding_ = std::make_unique<Embedding>(root.Sub("embedding"), V, d);
  // Embedding init: N(0, 0.02) (mamba_ssm, Transformer++); xLSTM "small" N(0, sqrt(2/(5d))).
  const double small = std::sqrt(2.0 / (5.0 * d));
  const bool xlstm_init = spec_.family == Family::kXlstm || spec_.family == Family::kXlstmLarge;
  const double emb_std = xlstm_init ? small : 0.02;
  InitNormal(&embedding_->weight()->value, emb_std, root.rng);

  const int64_t n_layers = spec_.n_layers();
  const int64_t trunk = spec_.trunk_layers();
  // Gradients the deferred-zero rule may leave stale at the start of a step (ops/module.h): the
  // embedding's, the final norm's, the head's, and those of blocks whose writers all follow it.
  std::vector<Parameter*> deferred = {embedding_->weight()};
  auto make = [&](BlockType type, const std::string& name, int64_t layer,
                  std::vector<std::vector<Parameter*>>* params) -> absl::StatusOr<std::unique_ptr<Block>> {
    const size_t first = store_->All().size();
    ASSIGN_OR_RETURN(std::unique_ptr<Block> b, MakeBlock(type, root.Sub(name), spec_, layer, n_layers));
    if (spec_.recompute_blocks) b = std::make_unique<RecomputeBlock>(std::move(b));
    params->push_back(ParamsSince(first));
    if (b->FollowsDeferredZero()) deferred.insert(deferred.end(), params->back().begin(), params->back().end());
    return b;
  };
  for (int64_t i = 0; i < trunk; ++i) {
    ASSIGN_OR_RETURN(auto b, make(spec_.blocks[i], absl::StrCat("blocks.", i), i, &trunk_params_));
    trunk_.push_back(std::move(b));
  }
  for (int64_t k = 0; k < spec_.mtp_heads; ++k) {
    // Head 1 is named like the last layer of the ordinary model, so an n = 1 model is exactly the
    // ordinary one (same names, same initialisation stream).
    const std::string name = k == 0 ? absl::StrCat("blocks.", trunk) : absl::StrCat("mtp_heads.", k);
    ASSIGN_OR_RETURN(auto b, make(spec_.blocks.back(), name, n_layers - 1, &head_params_));
    heads_.push_back(std::move(b));
  }
  NormOptions final_norm;
  if (spec_.family == Family::kXlstm) {
    final_norm = {NormOptions::kLayer, 1, spec_.norm_eps, false, 1.0, true};  // xLSTM LN: 1 + w
  } else if (spec_.family == Family::kXlstmLarge) {
    final_norm = {NormOptions::kRms, 1, spec_.norm_eps, false, 0.0, true};  // out_norm: RMSNorm, scale init 1
  } else {
    final_norm = {NormOptions::kRms, 1, spec_.norm_eps};
  }
  const size_t first = store_->All().size();
  final_norm_ = std::make_unique<Norm>(root.Sub("final_norm"), d, final_norm);
  final_norm_params_ = ParamsSince(first);
  deferred.insert(deferred.end(), final_norm_params_.begin(), final_norm_params_.end());
  if (!spec_.tie_embeddings) {
    head_weight_ = store_->Create("lm_head.weight", {V, d}, ParamKind::kWeight);
    InitNormal(&head_weight_->value, xlstm_init ? small : 0.02, root.rng);
    deferred.push_back(head_weight_);
  }
  store_->AllowDeferredZero(deferred);
  return absl::OkStatus();
}

std::vector<Parameter*> LanguageModel::ParamsSince(size_t first) {
  std::vector<Parameter*> all = store_->All();
  return std::vector<Parameter*>(all.begin() + static_cast<std::ptrdiff_t>(first), all.end());
}

const Parameter& LanguageModel::HeadParameter() const {
  return head_weight_ != nullptr ? *head_weight_ : *embedding_->weight();
}

const Tensor& LanguageModel::HeadWeight() const {
  const Parameter& p = HeadParameter();
  return p.value.device() == Device::kCuda ? p.compute : p.value;
}

Tensor& LanguageModel::HeadGrad(bool* overwrite) {
  Parameter* head = head_weight_ != nullptr ? head_weight_ : embedding_->weight();
  if (overwrite != nullptr) {
    *overwrite = FirstGradWrite(head);  // the fused loss overwrites dW when it is stale
  } else {
    ZeroGradIfStale(head);  // the naive loss adds
  }
  return head->grad;
}

Tensor LanguageModel::TrunkForward(std::span<const int32_t> tokens, int64_t batch, int64_t seq) {
  GYRE_CHECK(static_cast<int64_t>(tokens.size()) == batch * (seq + 1), "tokens: %zu for batch %ld seq %ld",
             tokens.size(), (long)batch, (long)seq);
  std::vector<int32_t> inputs(batch * seq);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t t = 0; t < seq; ++t) inputs[b * seq + t] = tokens[b * (seq + 1) + t];
  Tensor x = embedding_->Forward(inputs).Reshape({batch, seq, spec_.d_model});
  for (auto& block : trunk_) x = block->Forward(x, batch, seq);
  return x;
}

std::vector<int32_t> LanguageModel::HeadTargets(std::span<const int32_t> tokens, int64_t batch, int64_t seq,
                                                int k) const {
  std::vector<int32_t> targets(batch * seq, -1);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t t = 0; t + k + 1 <= seq; ++t) targets[b * seq + t] = tokens[b * (seq + 1) + t + k + 1];
  return targets;
}

LossResult LanguageModel::ForwardBackward(std::span<const int32_t> tokens, int64_t batch, int64_t seq,
                                          double loss_scale) {
  ForwardBackwardDeferred(tokens, batch, seq, loss_scale);
  return TakeLoss();
}

LossResult LanguageModel::TakeLoss() {
  GYRE_CHECK(loss_pending_, "TakeLoss without a ForwardBackwardDeferred");
  loss_pending_ = false;
  bool deferred = false;
  for (const CrossEntropyResult& ce : pending_heads_) deferred |= ce.deferred_index >= 0;
  std::vector<double> fetched;
  if (deferred) fetched = Cuda().TakeDeferredScalars();
  // The memory-saving order's sums, head by head, as the heads finished.
  const int n = static_cast<int>(pending_heads_.size());
  LossResult result;
  for (int k = 0; k < n; ++k) {
    const CrossEntropyResult& ce = pending_heads_[k];
    double loss = ce.loss;
    if (ce.deferred_index >= 0) {
      GYRE_CHECK(ce.deferred_index < static_cast<int>(fetched.size()),
                 "TakeLoss: deferred loss %d of %zu (were the deferred scalars taken by someone else?)",
                 ce.deferred_index, fetched.size());
      loss = fetched[ce.deferred_index];
    }
    result.head_losses.push_back(loss * n);
    result.loss += loss;
    if (k == 0) result.tokens = ce.tokens;
  }
  pending_heads_.clear();
  return result;
}

void LanguageModel::ForwardBackwardDeferred(std::span<const int32_t> tokens, int64_t batch, int64_t seq,
                                            double loss_scale) {
  GYRE_CHECK(!loss_pending_, "ForwardBackwardDeferred: the previous pass's loss was not taken (TakeLoss)");
  const int n = static_cast<int>(heads_.size());
  auto ready = [&](const std::string& group, const std::vector<Parameter*>& params) {
    store_->ZeroStaleGrads(params);  // never written this step (the deferred-zero rule)
    if (grad_ready_hook) grad_ready_hook(group);
  };
  pending_heads_.clear();
  Tensor z = TrunkForward(tokens, batch, seq);
  Tensor dz;  // the first head's gradient initialises it (no zero fill + add)
  for (int k = 0; k < n; ++k) {
    Tensor h = heads_[k]->Forward(z, batch, seq);
    Tensor hn = final_norm_->Forward(h);
    std::vector<int32_t> targets = HeadTargets(tokens, batch, seq, k);
    Tensor dhn;
    if (k == 0) ready("", {});
    CrossEntropyOptions ce_options = ce_options_;
    ce_options.logit_soft_cap = spec_.logit_soft_cap;
    ce_options.defer_loss = true;
    Tensor& head_grad = HeadGrad(&ce_options.overwrite_dw);
    pending_heads_.push_back(FusedLmHeadCrossEntropy(hn.Reshape({batch * seq, spec_.d_model}), HeadWeight(),
                                                     targets, loss_scale / n, ce_options, &dhn, &head_grad));
    Tensor dh = final_norm_->Backward(dhn.Reshape(h.shape()));
    if (k == 0) dz = heads_[k]->Backward(dh);
    else AddInPlace(&dz, heads_[k]->Backward(dh));
    ready(k == 0 ? absl::StrCat("blocks.", trunk_.size()) : absl::StrCat("mtp_heads.", k), head_params_[k]);
  }
  ready("final_norm", final_norm_params_);
  if (head_weight_ != nullptr) ready("lm_head", {head_weight_});
  for (int64_t i = static_cast<int64_t>(trunk_.size()) - 1; i >= 0; --i) {
    dz = trunk_[i]->Backward(dz);
    ready(absl::StrCat("blocks.", i), trunk_params_[i]);
  }
  embedding_->Backward(dz.Reshape({batch * seq, spec_.d_model}));
  ready("embedding", {embedding_->weight()});
  store_->ZeroStaleGrads();  // none left unless a group above missed a parameter
  ReleaseAll();
  loss_pending_ = true;
  if (++training_passes_ == 2) FitRecomputeToMemory();
}

void LanguageModel::FitRecomputeToMemory() {
  if (spec_.mlstm_recompute_keep_last != -1 || spec_.mlstm_recompute == "none" ||
      store_->device() != Device::kCuda)
    return;
  const CudaBackend::MemoryStats held = Cuda().Memory();
  const CudaBackend::DeviceMemory device = Cuda().DeviceMemoryNow();
  MemorySnapshot m;
  m.in_use = held.bytes_in_use; m.cached = held.bytes_cached; m.peak = held.peak_bytes_in_use;
  m.device_free = device.free_bytes; m.device_total = device.total_bytes;
  // The last layers first, as keep_last counts them: the MTP head blocks (head 1's block is the
  // model's last layer; their activations live alongside the trunk's at the peak, one head at a
  // time, so summing them over-counts when there are several), then the trunk from its end.
  std::vector<Block*> order;
  for (auto it = heads_.rbegin(); it != heads_.rend(); ++it) order.push_back(it->get());
  for (auto it = trunk_.rbegin(); it != trunk_.rend(); ++it) order.push_back(it->get());
  std::vector<int64_t> freed;
  for (const Block* b : order) freed.push_back(b->RecomputeFreedBytes());
  const uint64_t headroom = RecomputeHeadroomBytes(m);
  const int64_t kept = KeptLayersFromEnd(freed, headroom);
  int64_t bytes = 0;
  for (int64_t i = 0; i < kept; ++i) {
    order[i]->KeepForBackward();
    bytes += freed[i];
  }
  auto_kept_layers_ = kept;
  std::fprintf(stderr,
               "gyre: model.xlstm.mlstm_recompute_keep_last auto: the last %lld of %zu layers (MTP head blocks "
               "included) keep everything from the next step (+%.2f GiB on a measured peak of %.2f GiB; headroom "
               "%.2f GiB of %.2f GiB)\n",
               static_cast<long long>(kept), order.size(), bytes / double(1 << 30), m.peak / double(1 << 30),
               headroom / double(1 << 30), m.device_total / double(1 << 30));
}

LossResult LanguageModel::ForwardBackwardAllHeads(std::span<const int32_t> tokens, int64_t batch, int64_t seq,
                                                  double loss_scale) {
  const int n = static_cast<int>(heads_.size());
  LossResult result;
  Tensor z = TrunkForward(tokens, batch, seq);
  std::vector<Tensor> h(n), dh(n);
  for (int k = 0; k < n; ++k) h[k] = heads_[k]->Forward(z, batch, seq);
  for (int k = 0; k < n; ++k) {
    Tensor hn = final_norm_->Forward(h[k]);
    std::vector<int32_t> targets = HeadTargets(tokens, batch, seq, k);
    Tensor dhn;
    CrossEntropyResult ce = NaiveLmHeadCrossEntropy(hn.Reshape({batch * seq, spec_.d_model}), HeadWeight(),
                                                    targets, loss_scale / n, &dhn, &HeadGrad(), spec_.logit_soft_cap);
    result.head_losses.push_back(ce.loss * n);
    result.loss += ce.loss;
    if (k == 0) result.tokens = ce.tokens;
    dh[k] = final_norm_->Backward(dhn.Reshape(h[k].shape()));
  }
  Tensor dz = Tensor::ZerosLike(z);
  for (int k = n - 1; k >= 0; --k) AddInPlace(&dz, heads_[k]->Backward(dh[k]));
  for (int64_t i = static_cast<int64_t>(trunk_.size()) - 1; i >= 0; --i) dz = trunk_[i]->Backward(dz);
  embedding_->Backward(dz.Reshape({batch * seq, spec_.d_model}));
  store_->ZeroStaleGrads();
  ReleaseAll();
  return result;
}

LossResult LanguageModel::Evaluate(std::span<const int32_t> tokens, int64_t batch, int64_t seq, double loss_scale) {
  const int n = static_cast<int>(heads_.size());
  LossResult result;
  CrossEntropyOptions ce_options = ce_options_;
  ce_options.logit_soft_cap = spec_.logit_soft_cap;
  Tensor z = TrunkForward(tokens, batch, seq);
  for (int k = 0; k < n; ++k) {
    Tensor hn = final_norm_->Forward(heads_[k]->Forward(z, batch, seq));
    std::vector<int32_t> targets = HeadTargets(tokens, batch, seq, k);
    CrossEntropyResult ce = FusedLmHeadCrossEntropy(hn.Reshape({batch * seq, spec_.d_model}), HeadWeight(),
                                                    targets, loss_scale, ce_options, nullptr, nullptr);
    result.head_losses.push_back(ce.loss);
    result.loss += ce.loss / n;
    if (k == 0) result.tokens = ce.tokens;
  }
  ReleaseAll();
  return result;
}

Tensor LanguageModel::Logits(std::span<const int32_t> inputs, int64_t batch, int64_t seq) {
  std::vector<int32_t> tokens(batch * (seq + 1), 0);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t t = 0; t < seq; ++t) tokens[b * (seq + 1) + t] = inputs[b * seq + t];
  Tensor z = TrunkForward(tokens, batch, seq);
  Tensor hn = final_norm_->Forward(heads_[0]->Forward(z, batch, seq));
  Tensor logits = LmHeadLogits(hn.Reshape({batch * seq, spec_.d_model}), HeadWeight(), spec_.logit_soft_cap);
  ReleaseAll();
  return logits;
}

std::unique_ptr<LanguageModel::DecodeState> LanguageModel::NewDecodeState(int64_t batch) const {
  auto st = std::make_unique<DecodeState>();
  st->batch = batch;
  st->live_heads = static_cast<int64_t>(heads_.size());
  for (const auto& b : trunk_) st->trunk.push_back(b->NewState(batch));
  for (const auto& b : heads_) st->heads.push_back(b->NewState(batch));
  return st;
}

std::vector<Tensor> LanguageModel::DecodeStep(std::span<const int32_t> tokens, DecodeState* state, int64_t heads) {
  DecodeOptions options;
  options.heads = heads;
  return DecodeChunk(tokens, 1, state, options);
}

std::vector<Tensor> LanguageModel::DecodeChunk(std::span<const int32_t> tokens, int64_t chunk, DecodeState* state,
                                               const DecodeOptions& options) {
  const int64_t B = state->batch, rows = chunk * B;
  GYRE_CHECK(chunk >= 1 && static_cast<int64_t>(tokens.size()) == rows, "decode: %zu tokens for chunk %ld x batch %ld",
             tokens.size(), (long)chunk, (long)B);
  const int64_t n = options.heads > 0 ? options.heads : static_cast<int64_t>(heads_.size());
  GYRE_CHECK(n <= state->live_heads, "decode: head %ld was skipped earlier on this state (live heads %ld)", (long)n,
             (long)state->live_heads);
  state->live_heads = n;
  Tensor z = embedding_->Forward(tokens);
  embedding_->ReleaseActivations();
  return DecodeEmbedded(z, chunk, state, options);
}

std::vector<Tensor> LanguageModel::DecodeEmbedded(Tensor z, int64_t chunk, DecodeState* state,
                                                  const DecodeOptions& options) {
  const int64_t B = state->batch, rows = chunk * B;
  const int64_t n = state->live_heads;
  for (size_t i = 0; i < trunk_.size(); ++i) z = trunk_[i]->StepChunk(z, chunk, state->trunk[i].get(), options.rewindable);
  // Every head's normed output in one [n * out_rows, d] matrix, so the LM head weight is read once.
  const int64_t out_rows = options.last_position_only ? B : rows;
  std::vector<Tensor> hn(n);
  for (int64_t k = 0; k < n; ++k) {
    Tensor h = heads_[k]->StepChunk(z, chunk, state->heads[k].get(), options.rewindable);
    if (options.last_position_only && chunk > 1) h = h.Rows(rows - B, rows).Clone();
    hn[k] = final_norm_->Forward(h);
    final_norm_->ReleaseActivations();
  }
  state->draft_hidden.clear();
  int64_t with_logits = n;
  if (options.defer_draft_logits) {
    state->draft_hidden.assign(hn.begin() + 1, hn.end());
    with_logits = 1;
  }
  Tensor all;
  if (with_logits == 1) {
    all = hn[0];
  } else {
    all = Tensor::Empty({with_logits * out_rows, spec_.d_model}, hn[0].dtype(), hn[0].device());
    for (int64_t k = 0; k < with_logits; ++k) all.Rows(k * out_rows, (k + 1) * out_rows).CopyFrom(hn[k]);
  }
  Tensor logits =
      LmHeadLogits(all.Reshape({with_logits * out_rows, spec_.d_model}), HeadWeight(), spec_.logit_soft_cap);
  std::vector<Tensor> out;
  for (int64_t k = 0; k < with_logits; ++k) out.push_back(logits.Rows(k * out_rows, (k + 1) * out_rows));
  state->position += chunk;
  state->rewind_chunk = options.rewindable ? chunk : 0;
  return out;
}

std::vector<Tensor> LanguageModel::DraftLogits(const DecodeState& state, int64_t position) {
  const int64_t B = state.batch, n = static_cast<int64_t>(state.draft_hidden.size());
  GYRE_CHECK(n > 0, "DraftLogits without a DecodeChunk with defer_draft_logits and >= 2 heads");
  const int64_t rows = state.draft_hidden[0].rows();
  GYRE_CHECK(position >= 0 && (position + 1) * B <= rows, "DraftLogits position %ld of %ld rows", (long)position,
             (long)rows);
  const Tensor& h0 = state.draft_hidden[0];
  Tensor all = Tensor::Empty({n * B, spec_.d_model}, h0.dtype(), h0.device());
  for (int64_t k = 0; k < n; ++k)
    all.Rows(k * B, (k + 1) * B).CopyFrom(state.draft_hidden[k].Rows(position * B, (position + 1) * B));
  Tensor logits = LmHeadLogits(all, HeadWeight(), spec_.logit_soft_cap);
  std::vector<Tensor> out;
  for (int64_t k = 0; k < n; ++k) out.push_back(logits.Rows(k * B, (k + 1) * B));
  return out;
}

absl::Status LanguageModel::Rewind(DecodeState* state, int64_t keep) {
  if (state->rewind_chunk == 0) {
    return absl::FailedPreconditionError("rewind: the last DecodeChunk was not rewindable (or was rewound already)");
  }
  if (keep < 1 || keep > state->rewind_chunk) {
    return absl::InvalidArgumentError(
        absl::StrCat("rewind: keep ", keep, " outside [1, ", state->rewind_chunk, "] of the last chunk"));
  }
  for (size_t i = 0; i < trunk_.size(); ++i) trunk_[i]->Rewind(state->trunk[i].get(), keep);
  for (int64_t k = 0; k < state->live_heads; ++k) heads_[k]->Rewind(state->heads[k].get(), keep);
  state->position -= state->rewind_chunk - keep;
  state->rewind_chunk = 0;
  return absl::OkStatus();
}

void LanguageModel::SetSelfExtend(int64_t group, int64_t window) {
  auto apply = [&](Block* b) {
    if (auto* r = dynamic_cast<RecomputeBlock*>(b)) b = r->inner();
    if (auto* l = dynamic_cast<LlamaBlock*>(b)) l->attention().SetSelfExtend(group, window);
    if (auto* m = dynamic_cast<AttentionMixerBlock*>(b)) m->SetSelfExtend(group, window);
  };
  for (auto& b : trunk_) apply(b.get());
  for (auto& b : heads_) apply(b.get());
}

void LanguageModel::ReleaseAll() {
  embedding_->ReleaseActivations();
  for (auto& b : trunk_) b->ReleaseActivations();
  for (auto& b : heads_) b->ReleaseActivations();
  final_norm_->ReleaseActivations();
}

std::vector<int32_t> ArgmaxRows(const Tensor& logits) {
  const int64_t rows = logits.rows(), cols = logits.cols();
  std::vector<int32_t> out(static_cast<size_t>(rows));
  if (IsCuda(logits)) {
    GYRE_CHECK(logits.dtype() == DType::kBF16, "ArgmaxRows: CUDA logits must be bf16");
    Tensor ids = Tensor::Empty({rows}, DType::kI32, Device::kCuda);
    CudaInfer().ArgmaxRows(logits.raw(), rows, cols, cols, ids.data<int32_t>());
    Tensor host = ids.ToDevice(Device::kCpu);
    std::copy(host.data<int32_t>(), host.data<int32_t>() + rows, out.begin());
    return out;
  }
  DispatchFloat(logits.dtype(), [&]<typename T>() {
    for (int64_t r = 0; r < rows; ++r) {
      const T* p = logits.data<T>() + r * cols;
      out[r] = static_cast<int32_t>(std::max_element(p, p + cols) - p);
    }
  });
  return out;
}

std::vector<int32_t> ArgmaxFirstRows(std::span<const Tensor> logits) {
  const int64_t n = static_cast<int64_t>(logits.size());
  std::vector<int32_t> out(static_cast<size_t>(n));
  if (n == 0) return out;
  if (!IsCuda(logits[0])) {
    for (int64_t i = 0; i < n; ++i) out[i] = ArgmaxRows(logits[i].Rows(0, 1))[0];
    return out;
  }
  Tensor ids = Tensor::Empty({n}, DType::kI32, Device::kCuda);
  for (int64_t i = 0; i < n; ++i) {
    const Tensor& t = logits[i];
    GYRE_CHECK(IsCuda(t) && t.dtype() == DType::kBF16, "ArgmaxFirstRows: all logits must be bf16 on one device");
    CudaInfer().ArgmaxRows(t.raw(), 1, t.cols(), t.cols(), ids.data<int32_t>() + i);
  }
  Tensor host = ids.ToDevice(Device::kCpu);
  std::copy(host.data<int32_t>(), host.data<int32_t>() + n, out.begin());
  return out;
}

absl::StatusOr<int64_t> CountParameters(const ModelSpec& spec) {
  ASSIGN_OR_RETURN(auto model, LanguageModel::Create(spec, DType::kF32, Device::kMeta, 0));
  return model->NumParameters();
}

}  // namespace gyre::ops
