#include "ops/xlstm_large_block.h"

#include <algorithm>
#include <cmath>
#include <utility>

#include "kernels/cpu/mlstm.h"
#include "ops/block_cuda_util.h"
#include "ops/cuda_backend.h"
#include "ops/elementwise.h"
#include "ops/env_switch.h"
#include "ops/parallel.h"
#include "ops/rng.h"

namespace gyre::ops {
namespace {

// xLSTM init helpers ([xl] components/init.py; transformers' small_init_method / wang_init_method).
double SmallInitStd(int64_t dim) { return std::sqrt(2.0 / (5.0 * static_cast<double>(dim))); }
double WangInitStd(int64_t dim, int64_t blocks) {
  return 2.0 / (static_cast<double>(blocks) * std::sqrt(static_cast<double>(dim)));
}

NormOptions RmsNorm(double eps) { return {NormOptions::kRms, 1, eps, false, 0.0, true}; }
NormOptions HeadLayerNorm(int64_t heads, double eps) { return {NormOptions::kLayer, heads, eps, false, 0.0, true}; }

// Contiguous batch slices, one per pool thread (kernels/cpu/mlstm.h: a call on batch rows
// [b0, b1) is the call with shape.batch = b1 - b0 and every batch-major pointer advanced).
std::vector<std::pair<int64_t, int64_t>> BatchSlices(int64_t batch) {
  const int64_t n = std::max<int64_t>(1, std::min<int64_t>(batch, NumThreads()));
  std::vector<std::pair<int64_t, int64_t>> slices;
  for (int64_t i = 0; i < n; ++i) slices.push_back({batch * i / n, batch * (i + 1) / n});
  return slices;
}

bool g_record_gate_terms = false;
std::vector<Mamba2GradTerms>& GateTerms() {
  static auto* terms = new std::vector<Mamba2GradTerms>();
  return *terms;
}

uint32_t g_bf16_stages = 0;
double g_bf16_jitter = 0.0;
Rng& JitterRng() {
  static auto* rng = new Rng(1);
  return *rng;
}

// The precision experiment's rounding (SetXlstmLargeBf16Emulation): t's values as bf16 (or fp32).
void EmulateStage(Tensor* t, uint32_t stage) {
  if ((g_bf16_stages & stage) == 0) return;
  for (int64_t i = 0; i < t->numel(); ++i) {
    const double jitter = g_bf16_jitter > 0 ? 1.0 + g_bf16_jitter * JitterRng().Normal() : 1.0;
    const float f = static_cast<float>(t->At(i) * jitter);
    t->Set(i, stage == kXlBf16GatesF32 ? f : Bf16ToFloat(FloatToBf16(f)));
  }
}

// The [mk] / xlstm_large backend: sigmoid forget gate in log space, ε = 1e-6, true gradient.
cpu::MlstmOptions CellOptions(int64_t chunk) { return {chunk, cpu::MlstmForgetGate::kSigmoid, 1e-6}; }

}  // namespace

void SetXlstmLargeGateTermRecording(bool on) { g_record_gate_terms = on; }
void SetXlstmLargeBf16Emulation(uint32_t stages, double jitter, uint64_t jitter_seed) {
  g_bf16_stages = stages;
  g_bf16_jitter = jitter;
  JitterRng() = Rng(jitter_seed);
}

std::vector<Mamba2GradTerms> TakeXlstmLargeGateTerms() {
  std::vector<Mamba2GradTerms> out;
  out.swap(GateTerms());
  return out;
}

XlstmLargeBlock::XlstmLargeBlock(const BuildContext& ctx, const ModelSpec& s, int64_t n_layers)
    : d_(s.d_model), heads_(s.xl_heads), qk_dim_(s.xl_qk_dim), v_dim_(s.xl_v_dim), chunk_(s.mlstm_chunk),
      gate_cap_(s.gate_soft_cap),
      norm_eps_(s.norm_eps),
      store_(ctx.store),
      norm_mlstm_(ctx.Sub("norm_mlstm"), s.d_model, RmsNorm(s.norm_eps)),
      q_(ctx.Sub("mlstm.q"), s.d_model, s.xl_qk_dim, false),
      k_(ctx.Sub("mlstm.k"), s.d_model, s.xl_qk_dim, false),
      v_(ctx.Sub("mlstm.v"), s.d_model, s.xl_v_dim, false),
      ogate_(ctx.Sub("mlstm.ogate_preact"), s.d_model, s.xl_v_dim, false),
      wi_(ctx.store->Create(ctx.Name("mlstm.igate_preact.weight"), {s.xl_heads, s.d_model}, ParamKind::kWeight)),
      wf_(ctx.store->Create(ctx.Name("mlstm.fgate_preact.weight"), {s.xl_heads, s.d_model}, ParamKind::kWeight)),
      bi_(ctx.store->Create(ctx.Name("mlstm.igate_preact.bias"), {s.xl_heads}, ParamKind::kBias)),
      bf_(ctx.store->Create(ctx.Name("mlstm.fgate_preact.bias"), {s.xl_heads}, ParamKind::kBias)),
      multihead_norm_(ctx.Sub("mlstm.multihead_norm"), s.xl_v_dim, HeadLayerNorm(s.xl_heads, s.norm_eps)),
      out_proj_(ctx.Sub("mlstm.out_proj"), s.xl_v_dim, s.d_model, false),
      norm_ffn_(ctx.Sub("norm_ffn"), s.d_model, RmsNorm(s.norm_eps)),
      ffn_(ctx.Sub("ffn"), s.d_model, s.ffn_dim, Activation::kSilu) {
  GYRE_CHECK(heads_ > 0 && qk_dim_ % heads_ == 0 && v_dim_ % heads_ == 0, "xLSTM Large: %ld heads for qk %ld, v %ld",
             (long)heads_, (long)qk_dim_, (long)v_dim_);
  GYRE_CHECK(cpu::mlstm_check({1, 1, heads_, qk_dim_ / heads_, v_dim_ / heads_}, CellOptions(chunk_)).ok(),
             "xLSTM Large: mLSTM shape");
  GYRE_CHECK(gate_cap_ >= 0, "xLSTM Large: gate soft cap %g", gate_cap_);
  Rng* rng = ctx.rng;
  for (Linear* l : {&q_, &k_, &v_, &ogate_, &ffn_.gate(), &ffn_.up()})
    InitNormal(&l->weight()->value, SmallInitStd(d_), rng);
  InitNormal(&out_proj_.weight()->value, WangInitStd(d_, n_layers), rng);
  InitNormal(&ffn_.down().weight()->value, WangInitStd(s.ffn_dim, n_layers), rng);
  InitConstant(&wi_->value, 0.0);
  InitConstant(&bi_->value, -10.0);
  InitConstant(&wf_->value, 0.0);
  if (ctx.materialized()) {
    for (int64_t h = 0; h < heads_; ++h)
      bf_->value.Set(h, heads_ == 1 ? 3.0 : 3.0 + 3.0 * h / (heads_ - 1));  // linspace(3, 6)
  }
}

Tensor XlstmLargeBlock::GateForward(const Tensor& u, Parameter* w, Parameter* b) const {
  Tensor y = LinearForward(u, w->value);
  DispatchFloat(y.dtype(), [&]<typename T>() {
    T* p = y.data<T>();
    const T* bias = b->value.data<T>();
    for (int64_t r = 0; r < y.rows(); ++r)
      for (int64_t c = 0; c < heads_; ++c) p[r * heads_ + c] += bias[c];
  });
  return y;
}

Tensor XlstmLargeBlock::GateBackward(const Tensor& u, Parameter* w, Parameter* b, const Tensor& dpre) const {
  ZeroGradIfStale(b);
  DispatchFloat(dpre.dtype(), [&]<typename T>() {
    const T* d = dpre.data<T>();
    T* gb = b->grad.data<T>();
    for (int64_t r = 0; r < dpre.rows(); ++r)
      for (int64_t c = 0; c < heads_; ++c) gb[c] += d[r * heads_ + c];
  });
  return LinearBackward(u, w->value, dpre, &w->grad, FirstGradWrite(w));
}

Tensor XlstmLargeBlock::CapGate(const Tensor& raw) const {
  return gate_cap_ > 0 ? SoftCap(raw, gate_cap_) : raw.Clone();
}

Tensor XlstmLargeBlock::Forward(const Tensor& x, int64_t batch, int64_t seq) {
  batch_ = batch;
  seq_ = seq;
  if (IsCuda(x)) return ForwardCuda(x, batch, seq);
  const int64_t dk = qk_dim_ / heads_, dv = v_dim_ / heads_;
  u_ = norm_mlstm_.Forward(x);
  Tensor u_gates = u_;
  if (g_bf16_stages != 0) {
    u_gates = u_.Clone();
    EmulateStage(&u_gates, kXlBf16UGates);
    EmulateStage(&u_, kXlBf16U);
  }
  q_out_ = q_.Forward(u_);
  k_out_ = k_.Forward(u_);
  v_out_ = v_.Forward(u_);
  o_pre_ = ogate_.Forward(u_);
  ig_raw_ = GateForward(u_gates, wi_, bi_);
  fg_raw_ = GateForward(u_gates, wf_, bf_);
  ig_ = CapGate(ig_raw_);
  fg_ = CapGate(fg_raw_);
  EmulateStage(&q_out_, kXlBf16QK);
  EmulateStage(&k_out_, kXlBf16QK);
  EmulateStage(&v_out_, kXlBf16V);
  EmulateStage(&o_pre_, kXlBf16O);
  EmulateStage(&ig_, kXlBf16GatesF32);
  EmulateStage(&fg_, kXlBf16GatesF32);
  h_ = Tensor::EmptyLike(v_out_);
  const cpu::MlstmOptions options = CellOptions(chunk_);
  saved_ = Tensor::Empty({cpu::mlstm_chunkwise_saved_size({batch, seq, heads_, dk, dv}, options)}, x.dtype());
  DispatchFloat(x.dtype(), [&]<typename T>() {
    const auto slices = BatchSlices(batch);
    const int64_t saved_row = cpu::mlstm_chunkwise_saved_size({1, seq, heads_, dk, dv}, options);
    const int64_t qk_row = seq * qk_dim_, v_row = seq * v_dim_, g_row = seq * heads_;
    ParallelFor(static_cast<int64_t>(slices.size()), [&](int64_t i) {
      const auto [b0, b1] = slices[i];
      cpu::MlstmInputs<T> in{q_out_.data<T>() + b0 * qk_row, k_out_.data<T>() + b0 * qk_row,
                             v_out_.data<T>() + b0 * v_row, ig_.data<T>() + b0 * g_row, fg_.data<T>() + b0 * g_row};
      cpu::mlstm_chunkwise_fwd_ref<T>({b1 - b0, seq, heads_, dk, dv}, options, in, {}, h_.data<T>() + b0 * v_row,
                                      saved_.data<T>() + b0 * saved_row, {});
    });
  });
  if (g_bf16_stages == 0) {
    hn_ = multihead_norm_.Forward(h_);
    so_ = Activate(Activation::kSigmoid, o_pre_);
    Tensor x1 = Add(x, out_proj_.Forward(Mul(hn_, so_)));
    return Add(x1, ffn_.Forward(norm_ffn_.Forward(x1)));
  }
  // The precision experiment: the same layers, each CUDA rounding where its bit is set.
  EmulateStage(&h_, kXlBf16H);
  hn_ = multihead_norm_.Forward(h_);
  so_ = Activate(Activation::kSigmoid, o_pre_);
  Tensor gated = Mul(hn_, so_);
  EmulateStage(&gated, kXlBf16Gated);
  Tensor x1 = Add(x, out_proj_.Forward(gated));
  EmulateStage(&x1, kXlBf16X1);
  Tensor un = norm_ffn_.Forward(x1);
  EmulateStage(&un, kXlBf16FfnIn);
  Tensor f;
  if ((g_bf16_stages & (kXlBf16FfnGateUp | kXlBf16FfnHidden)) == 0) {
    f = ffn_.Forward(un);
  } else {
    Tensor g = LinearForward(un, ffn_.gate().weight()->value), up = LinearForward(un, ffn_.up().weight()->value);
    EmulateStage(&g, kXlBf16FfnGateUp);
    EmulateStage(&up, kXlBf16FfnGateUp);
    Tensor hidden = Mul(Activate(Activation::kSilu, g), up);
    EmulateStage(&hidden, kXlBf16FfnHidden);
    f = LinearForward(hidden, ffn_.down().weight()->value);
  }
  Tensor y = Add(x1, f);
  EmulateStage(&y, kXlBf16Y);
  return y;
}

Tensor XlstmLargeBlock::Backward(const Tensor& dy) {
  GYRE_CHECK(h_.defined(), "XlstmLargeBlock::Backward without Forward");
  if (IsCuda(dy)) return BackwardCuda(dy);
  const int64_t dk = qk_dim_ / heads_, dv = v_dim_ / heads_;
  // y = x1 + FFN(RMSNorm(x1)): the residual path plus the FFN's.
  Tensor dx1 = Add(dy, norm_ffn_.Backward(ffn_.Backward(dy)));
  // x1 = x + W_out(hn ⊙ σ(o)).
  Tensor dgated = out_proj_.Backward(dx1);
  Tensor dhn = Mul(dgated, so_);
  Tensor dopre = ActivateBackward(Activation::kSigmoid, o_pre_, Mul(dgated, hn_));
  Tensor dh = multihead_norm_.Backward(dhn);
  const cpu::MlstmOptions options = CellOptions(chunk_);
  Tensor dq = Tensor::EmptyLike(q_out_), dk_t = Tensor::EmptyLike(k_out_), dv_t = Tensor::EmptyLike(v_out_);
  Tensor dig = Tensor::EmptyLike(ig_), dfg = Tensor::EmptyLike(fg_);
  DispatchFloat(dy.dtype(), [&]<typename T>() {
    const auto slices = BatchSlices(batch_);
    const int64_t saved_row = cpu::mlstm_chunkwise_saved_size({1, seq_, heads_, dk, dv}, options);
    const int64_t qk_row = seq_ * qk_dim_, v_row = seq_ * v_dim_, g_row = seq_ * heads_;
    ParallelFor(static_cast<int64_t>(slices.size()), [&](int64_t i) {
      const auto [b0, b1] = slices[i];
      cpu::MlstmInputs<T> in{q_out_.data<T>() + b0 * qk_row, k_out_.data<T>() + b0 * qk_row,
                             v_out_.data<T>() + b0 * v_row, ig_.data<T>() + b0 * g_row, fg_.data<T>() + b0 * g_row};
      cpu::MlstmGrads<T> g{dq.data<T>() + b0 * qk_row, dk_t.data<T>() + b0 * qk_row, dv_t.data<T>() + b0 * v_row,
                           dig.data<T>() + b0 * g_row, dfg.data<T>() + b0 * g_row};
      cpu::mlstm_chunkwise_bwd_ref<T>({b1 - b0, seq_, heads_, dk, dv}, options, in, {}, h_.data<T>() + b0 * v_row,
                                      saved_.data<T>() + b0 * saved_row, dh.data<T>() + b0 * v_row, {}, g, {});
    });
  });
  if (gate_cap_ > 0) {
    dig = SoftCapBackward(ig_raw_, dig, gate_cap_);
    dfg = SoftCapBackward(fg_raw_, dfg, gate_cap_);
  }
  if (g_record_gate_terms) {
    for (auto [b, d] : {std::pair<Parameter*, const Tensor*>{bi_, &dig}, {bf_, &dfg}}) {
      Mamba2GradTerms t{b->name, batch_, seq_, heads_, {}};
      for (int64_t i = 0; i < d->numel(); ++i) t.terms.push_back(d->At(i));
      GateTerms().push_back(std::move(t));
    }
  }
  // Every projection reads u = RMSNorm(x): their input gradients add up.
  Tensor du = q_.Backward(dq);
  AddInPlace(&du, k_.Backward(dk_t));
  AddInPlace(&du, v_.Backward(dv_t));
  AddInPlace(&du, ogate_.Backward(dopre));
  AddInPlace(&du, GateBackward(u_, wi_, bi_, dig));
  AddInPlace(&du, GateBackward(u_, wf_, bf_, dfg));
  Tensor dx = Add(dx1, norm_mlstm_.Backward(du));
  ReleaseActivations();
  return dx;
}

void XlstmLargeBlock::ReleaseActivations() {
  u_ = q_out_ = k_out_ = v_out_ = o_pre_ = ig_raw_ = fg_raw_ = ig_ = fg_ = h_ = saved_ = hn_ = so_ = pre_ = Tensor();
  norm_mean_ = norm_rstd_ = Tensor();
  norm_mlstm_.ReleaseActivations();
  for (Linear* l : {&q_, &k_, &v_, &ogate_, &out_proj_}) l->ReleaseActivations();
  multihead_norm_.ReleaseActivations();
  norm_ffn_.ReleaseActivations();
  ffn_.ReleaseActivations();
}

std::unique_ptr<BlockState> XlstmLargeBlock::NewState(int64_t batch) const {
  const DType dt = out_proj_.weight()->value.dtype();
  const int64_t dk = qk_dim_ / heads_, dv = v_dim_ / heads_;
  auto st = std::make_unique<XlstmLargeState>();
  st->c = Tensor::Zeros({batch, heads_, dk, dv}, dt);
  st->n = Tensor::Zeros({batch, heads_, dk}, dt);
  st->m = Tensor::Zeros({batch, heads_}, dt);
  return st;
}

Tensor XlstmLargeBlock::StepChunk(const Tensor& x, int64_t chunk, BlockState* state, bool rewindable) {
  auto* st = static_cast<XlstmLargeState*>(state);
  st->cell_history.Clear();
  if (IsCuda(x)) return StepCuda(x, chunk, st, rewindable);  // ops/xlstm_large_step_cuda.cc
  const int64_t B = x.rows() / chunk, dk = qk_dim_ / heads_, dv = v_dim_ / heads_;
  // Row-wise parts once over all chunk·B rows; the cell position by position (the step recurrence).
  Tensor u = norm_mlstm_.Forward(x);
  Tensor q = q_.Forward(u), k = k_.Forward(u), v = v_.Forward(u), o = ogate_.Forward(u);
  Tensor ig = CapGate(GateForward(u, wi_, bi_)), fg = CapGate(GateForward(u, wf_, bf_));
  Tensor h = Tensor::EmptyLike(v);
  const cpu::MlstmOptions options = CellOptions(chunk_);
  DispatchFloat(x.dtype(), [&]<typename T>() {
    for (int64_t j = 0; j < chunk; ++j) {
      const int64_t rq = j * B * qk_dim_, rv = j * B * v_dim_, g = j * B * heads_;
      cpu::mlstm_step_fwd_ref<T>({B, 1, heads_, dk, dv}, options, q.data<T>() + rq, k.data<T>() + rq, v.data<T>() + rv,
                                 ig.data<T>() + g, fg.data<T>() + g, {st->c.data<T>(), st->n.data<T>(), st->m.data<T>()},
                                 h.data<T>() + rv);
      if (rewindable && j + 1 < chunk) st->cell_history.Record({&st->c, &st->n, &st->m});
    }
  });
  Tensor x1 = Add(x, out_proj_.Forward(Mul(multihead_norm_.Forward(h), Activate(Activation::kSigmoid, o))));
  Tensor y = Add(x1, ffn_.Forward(norm_ffn_.Forward(x1)));
  ReleaseActivations();
  return y;
}

// ---------------------------------------------------------------- CUDA
// (CudaEmpty, CudaBytes, Mm: ops/block_cuda_util.h)

void XlstmLargeBlock::GateSpan(Tensor* compute, Tensor* grad) const {
  GYRE_CHECK(store_->AdjacentSpan({wi_, wf_}, compute, grad),
             "xLSTM Large: the input and forget gate weights are not adjacent in the flat CUDA store");
}

XlstmLargeNormGateArgs XlstmLargeBlock::NormGateArgs() {
  XlstmLargeNormGateArgs n;
  n.rows = h_.rows(); n.dim = v_dim_; n.heads = heads_;
  n.eps = static_cast<float>(norm_eps_);
  n.h = h_.raw(); n.o = o_pre_.raw();
  n.weight = multihead_norm_.weight()->value.data<float>();  // as Norm's grouped CUDA path: the fp32 master
  n.mean = norm_mean_.data<float>(); n.rstd = norm_rstd_.data<float>();
  return n;
}

namespace {

// The cell's head width: dk rounded up to 64 (kernels/cuda/mlstm.h takes multiples of 64). Where
// it differs from dk (the 125m's 96), q and k are zero-padded per head and the cell scales q·kᵀ by
// 1/sqrt(dk), not 1/sqrt(dk_cell): the zero columns add nothing to q·kᵀ, to C = Σ k vᵀ or to n, so
// h is the unpadded cell's; the padded columns' dq, dk are dropped (ops/XLSTM_LARGE.md, "dk 96").
int64_t CellDk(int64_t dk) { return (dk + 63) / 64 * 64; }

// [rows, heads·from] -> [rows, heads·to] bf16, per head: the first min(from, to) columns copied,
// the rest zero (XlstmLargeHeadWidthArgs).
Tensor HeadWidth(const Tensor& t, int64_t heads, int64_t from, int64_t to) {
  Tensor out = CudaEmpty({t.rows(), heads * to});
  XlstmLargeHeadWidthArgs a;
  a.rows = t.rows(); a.heads = heads; a.src_width = from; a.dst_width = to;
  a.src = t.raw(); a.dst = out.raw();
  Cuda().XlstmLargeHeadWidth(a);
  return out;
}

}  // namespace

Tensor XlstmLargeBlock::ForwardCuda(const Tensor& x, int64_t batch, int64_t seq) {
  const int64_t rows = batch * seq, dk = qk_dim_ / heads_, dv = v_dim_ / heads_, dk_cell = CellDk(dk);
  GYRE_CHECK(dk % 8 == 0, "xLSTM Large on CUDA: dk %ld is not a multiple of 8 (the q / k head padding moves 16-byte "
             "vectors)", (long)dk);
  u_ = norm_mlstm_.Forward(x);
  q_out_ = q_.Forward(u_);
  k_out_ = k_.Forward(u_);
  if (dk_cell != dk) {  // the cell's inputs, kept for the backward in the padded layout
    q_out_ = HeadWidth(q_out_, heads_, dk, dk_cell);
    k_out_ = HeadWidth(k_out_, heads_, dk, dk_cell);
  }
  v_out_ = v_.Forward(u_);
  o_pre_ = ogate_.Forward(u_);
  // Both gates in one fp32 GEMM, then bias + cap (pre_ keeps the raw pre-activations).
  Tensor w_if, dw_if;
  GateSpan(&w_if, &dw_if);
  pre_ = CudaEmpty({rows, 2 * heads_}, DType::kF32);
  Mm(false, true, rows, 2 * heads_, d_, u_.raw(), d_, w_if.raw(), d_, pre_.raw(), 2 * heads_, true, 0.f);
  ig_ = CudaEmpty({rows, heads_}, DType::kF32);
  fg_ = CudaEmpty({rows, heads_}, DType::kF32);
  XlstmLargeGateArgs g;
  g.rows = rows; g.heads = heads_; g.cap = static_cast<float>(gate_cap_);
  g.pre = pre_.data<float>(); g.bi = bi_->value.data<float>(); g.bf = bf_->value.data<float>();
  g.ig = ig_.data<float>(); g.fg = fg_.data<float>();
  Cuda().XlstmLargeGates(false, g);
  MlstmCellArgs c;
  c.batch = batch; c.seq = seq; c.heads = heads_; c.dk = dk_cell; c.dv = dv; c.chunk = chunk_;
  c.sigmoid_forget = true;
  c.eps = 1e-6;
  if (dk_cell != dk) c.qk_scale = 1.0 / std::sqrt(static_cast<double>(dk));
  saved_ = CudaBytes(Cuda().MlstmSavedBytes(c));
  h_ = CudaEmpty({rows, v_dim_});
  c.q = q_out_.raw(); c.k = k_out_.raw(); c.v = v_out_.raw();
  c.ig = ig_.data<float>(); c.fg = fg_.data<float>();
  c.h = h_.raw(); c.saved = saved_.raw();
  Cuda().Mlstm(false, c);
  // y = LN_head(h)·w ⊙ σ(o) in one kernel (the per-head LayerNorm's weight read from multihead_norm_;
  // its statistics kept). Measured against the GroupNorm kernel + an elementwise gate kernel
  // (session 20, ops/XLSTM_LARGE.md): xlstm-large-bench B4 step 160.3 -> 157.0 ms on an H100, 3 of
  // 3 rounds; that path was deleted.
  Tensor gated = CudaEmpty({rows, v_dim_});
  norm_mean_ = CudaEmpty({rows, heads_}, DType::kF32);
  norm_rstd_ = CudaEmpty({rows, heads_}, DType::kF32);
  XlstmLargeNormGateArgs n = NormGateArgs();
  n.y = gated.raw();
  Cuda().XlstmLargeNormGate(false, n);
  Tensor x1 = out_proj_.ForwardAdd(gated, x);  // x + out_proj(gated): the add in the GEMM's store
  return ffn_.ForwardAdd(norm_ffn_.Forward(x1), x1);
}

Tensor XlstmLargeBlock::BackwardCuda(const Tensor& dy) {
  const int64_t rows = batch_ * seq_, dk = qk_dim_ / heads_, dv = v_dim_ / heads_, dk_cell = CellDk(dk);
  Tensor dx1 = norm_ffn_.BackwardAdd(ffn_.Backward(dy), dy);
  Tensor dgated = out_proj_.Backward(dx1);
  // The gates folded into the o map (GYRE_XLSTM_LARGE_FOLD_GATES=on, opt-in; read at every backward
  // so recurrent_step_bench --variants can alternate it): d_o and the gates' dpre side by side in one
  // [rows, v_dim + 2·NH] buffer, so the o map's two backward GEMMs carry the gate rows ([W_o; W_i;
  // W_f] one span) instead of two skinny gate GEMMs. Its kernel rows say −0.93 ms a step at the 125m
  // (helper xl125), but the steps disagree: on at the 125m 74.80 vs 75.18 ms (xl125's call 3, 3 of 3)
  // and then 67.65 vs 66.88 ms off (the lead's final call of session 21, 4 of 4 rounds for off, on the
  // merged main); at xlstm-large-bench 154.49 vs 153.75 off (2 of 4), as session 20's +0.05 ms. No
  // clear win: the unfused path stays the default (ops/XLSTM_LARGE.md).
  const bool fold_gates = EnvChoice("GYRE_XLSTM_LARGE_FOLD_GATES", {"", "off", "on"}, "off") == "on";
  const int64_t ld_do = fold_gates ? v_dim_ + 2 * heads_ : v_dim_;
  // The norm + out gate backward: dh, d(o pre-activation), d(norm weight) in one kernel (+ the
  // fixed-order column pass of dweight's tile sums).
  Tensor dopre = CudaEmpty({rows, ld_do}), dh = CudaEmpty({rows, v_dim_});
  {
    Parameter* w = multihead_norm_.weight();
    // 64-row tiles (XlstmLargeNormGateArgs::tile_rows' default): 32 and 16 measured slower (session
    // 20, ops/XLSTM_LARGE.md: the serial column pass over more tiles costs more than the blocks gain).
    Tensor partial = CudaEmpty({XlstmLargeNormGatePartialFloats(rows, v_dim_, 64)}, DType::kF32);
    XlstmLargeNormGateArgs n = NormGateArgs();
    n.tile_rows = 64;
    n.dy = dgated.raw(); n.dh = dh.raw(); n.d_o = dopre.raw(); n.ld_do = ld_do;
    n.dweight = w->grad.data<float>();
    n.partial = partial.data<float>();
    n.overwrite_dweight = rows > 0 && FirstGradWrite(w);
    if (rows == 0) ZeroGradIfStale(w);
    Cuda().XlstmLargeNormGate(true, n);
  }
  Tensor dq = CudaEmpty({rows, heads_ * dk_cell}), dk_t = CudaEmpty({rows, heads_ * dk_cell});
  Tensor dv_t = CudaEmpty({rows, v_dim_});
  Tensor dig = CudaEmpty({rows, heads_}, DType::kF32), dfg = CudaEmpty({rows, heads_}, DType::kF32);
  MlstmCellArgs c;
  c.batch = batch_; c.seq = seq_; c.heads = heads_; c.dk = dk_cell; c.dv = dv; c.chunk = chunk_;
  c.sigmoid_forget = true;
  c.eps = 1e-6;
  if (dk_cell != dk) c.qk_scale = 1.0 / std::sqrt(static_cast<double>(dk));
  c.q = q_out_.raw(); c.k = k_out_.raw(); c.v = v_out_.raw();
  c.ig = ig_.data<float>(); c.fg = fg_.data<float>();
  c.h = h_.raw(); c.saved = saved_.raw();
  c.dh = dh.raw();
  c.dq = dq.raw(); c.dk_out = dk_t.raw(); c.dv_out = dv_t.raw();
  c.dig = dig.data<float>(); c.dfg = dfg.data<float>();
  Cuda().Mlstm(true, c);
  if (dk_cell != dk) {  // the padded columns' gradients dropped
    dq = HeadWidth(dq, heads_, dk_cell, dk);
    dk_t = HeadWidth(dk_t, heads_, dk_cell, dk);
  }
  // The gates: the cap's slope -> dpre (bf16), the bias gradients (overwritten on the step's first
  // write, the kernel sets every element); then du += dpre·[W_i; W_f], d[W_i; W_f] (+)= dpreᵀ u.
  Tensor dpre = fold_gates ? Tensor() : CudaEmpty({rows, 2 * heads_});
  XlstmLargeGateArgs g;
  g.rows = rows; g.heads = heads_; g.cap = static_cast<float>(gate_cap_);
  g.pre = pre_.data<float>(); g.dig = dig.data<float>(); g.dfg = dfg.data<float>();
  g.dpre = fold_gates ? static_cast<void*>(static_cast<char*>(dopre.raw()) + v_dim_ * 2) : dpre.raw();
  g.ldpre = fold_gates ? ld_do : 0;
  g.dbi = bi_->grad.data<float>(); g.dbf = bf_->grad.data<float>();
  g.overwrite_db = FirstGradWrite({bi_, bf_});
  Tensor gate_partial = CudaEmpty({std::max<int64_t>(1, XlstmLargeGatePartialFloats(rows, heads_))}, DType::kF32);
  g.partial = gate_partial.data<float>();
  Cuda().XlstmLargeGates(true, g);
  // du = Σ over q, k, v, o of dy_l · W_l (+ the gates below): the first product written, the
  // others accumulated in their GEMMs' stores (beta 1), no separate additions. Measured against
  // four Linear backwards + three bf16 Axpy (session 20, ops/XLSTM_LARGE.md): xlstm-large-bench B4
  // step 163.5 -> 161.0 ms on an H100; the Axpy path was deleted.
  Tensor du = CudaEmpty({rows, d_});
  const std::pair<Linear*, const Tensor*> maps[] = {{&q_, &dq}, {&k_, &dk_t}, {&v_, &dv_t}, {&ogate_, &dopre}};
  bool first = true;
  for (const auto& [map, dy_map] : maps) {
    Parameter* w = map->weight();
    if (fold_gates && map == &ogate_) {
      // du += [d_o | dpre]·[W_o; W_i; W_f], d[W_o; W_i; W_f] (+)= [d_o | dpre]ᵀ u: K and M of
      // v_dim + 2·NH, the gate rows riding along.
      Tensor w_ogates, dw_ogates;
      GYRE_CHECK(store_->AdjacentSpan({w, wi_, wf_}, &w_ogates, &dw_ogates),
                 "xLSTM Large: the out-gate and gate weights are not adjacent in the flat CUDA store "
                 "(GYRE_XLSTM_LARGE_FOLD_GATES=on needs them as one matrix)");
      Mm(false, false, rows, d_, ld_do, dopre.raw(), ld_do, w_ogates.raw(), d_, du.raw(), d_, false,
         first ? 0.f : 1.f);
      first = false;
      const bool overwrite = rows > 0 ? FirstGradWrite({w, wi_, wf_}) : false;
      if (rows == 0) { ZeroGradIfStale(w); ZeroGradIfStale(wi_); ZeroGradIfStale(wf_); }
      Mm(true, false, ld_do, d_, rows, dopre.raw(), ld_do, u_.raw(), d_, dw_ogates.raw(), d_, true,
         overwrite ? 0.f : 1.f);
      continue;
    }
    const int64_t n = map->out();
    Mm(false, false, rows, d_, n, dy_map->raw(), n, w->compute.raw(), d_, du.raw(), d_, false, first ? 0.f : 1.f);
    first = false;
    const bool overwrite = rows > 0 ? FirstGradWrite(w) : false;
    if (rows == 0) ZeroGradIfStale(w);
    Mm(true, false, n, d_, rows, dy_map->raw(), n, u_.raw(), d_, w->grad.raw(), d_, true, overwrite ? 0.f : 1.f);
  }
  if (!fold_gates) {
    Tensor w_if, dw_if;
    GateSpan(&w_if, &dw_if);
    Mm(false, false, rows, d_, 2 * heads_, dpre.raw(), 2 * heads_, w_if.raw(), d_, du.raw(), d_, false, 1.f);
    const bool overwrite_dw = rows > 0 ? FirstGradWrite({wi_, wf_}) : false;
    if (rows == 0) { ZeroGradIfStale(wi_); ZeroGradIfStale(wf_); }
    Mm(true, false, 2 * heads_, d_, rows, dpre.raw(), 2 * heads_, u_.raw(), d_, dw_if.raw(), d_, true,
       overwrite_dw ? 0.f : 1.f);
  }
  Tensor dx = norm_mlstm_.BackwardAdd(du, dx1);
  ReleaseActivations();
  return dx;
}

void XlstmLargeBlock::Rewind(BlockState* state, int64_t keep) {
  auto* st = static_cast<XlstmLargeState*>(state);
  st->cell_history.Restore(keep, {&st->c, &st->n, &st->m});
}

}  // namespace gyre::ops
