#include "ops/recurrent_blocks.h"

#include <algorithm>
#include <chrono>
#include <map>
#include <cmath>
#include <cstdlib>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "kernels/cpu/conv1d.h"
#include "kernels/cpu/mlstm.h"
#include "kernels/cpu/slstm.h"
#include "kernels/cpu/ssd.h"
#include "ops/block_cuda_util.h"
#include "ops/cuda_backend.h"
#include "ops/elementwise.h"
#include "ops/env_switch.h"
#include "ops/parallel.h"

namespace gyre::ops {
namespace {

// xLSTM init helpers ([xl] components/init.py).
double SmallInitStd(int64_t dim) { return std::sqrt(2.0 / (5.0 * static_cast<double>(dim))); }
double WangInitStd(int64_t dim, int64_t blocks) {
  return 2.0 / (static_cast<double>(blocks) * std::sqrt(static_cast<double>(dim)));
}

NormOptions XlstmLayerNorm(int64_t groups = 1) { return {NormOptions::kLayer, groups, 1e-5, false, 1.0, true}; }

// out[r, c] = a[r, c] * v[c] (+ b[r, c] if b given): per-column scaling.
Tensor ScaleColumns(const Tensor& a, const Tensor& v) {
  Tensor out = Tensor::EmptyLike(a);
  const int64_t rows = a.rows(), cols = a.cols();
  DispatchFloat(a.dtype(), [&]<typename T>() {
    const T* x = a.data<T>();
    const T* s = v.data<T>();
    T* o = out.data<T>();
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) o[r * cols + c] = x[r * cols + c] * s[c];
  });
  return out;
}

// grad[c] += Σ_r a[r, c] * b[r, c]  (b null: Σ_r a[r, c])
void AccumulateColumnSums(const Tensor& a, const Tensor* b, Tensor* grad) {
  const int64_t rows = a.rows(), cols = a.cols();
  DispatchFloat(a.dtype(), [&]<typename T>() {
    const T* x = a.data<T>();
    const T* y = b ? b->data<T>() : nullptr;
    T* g = grad->data<T>();
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) g[c] += y ? x[r * cols + c] * y[r * cols + c] : x[r * cols + c];
  });
}

// Contiguous batch slices, one per pool thread (kernels/cpu: a call on batch rows [b0, b1) is
// the call with shape.batch = b1 - b0 and every batch-major pointer advanced by b0 rows).
std::vector<std::pair<int64_t, int64_t>> BatchSlices(int64_t batch) {
  const int64_t n = std::max<int64_t>(1, std::min<int64_t>(batch, NumThreads()));
  std::vector<std::pair<int64_t, int64_t>> slices;
  for (int64_t i = 0; i < n; ++i) slices.push_back({batch * i / n, batch * (i + 1) / n});
  return slices;
}

// ---------------------------------------------------------------- CUDA helpers
// (CudaEmpty, CudaBytes, BytePtr, MutBytePtr, Mm: ops/block_cuda_util.h)

// y [rows, n] = x [rows, in] · W[r0 : r0 + n, :]ᵀ for the Linear's weight W [out, in] (bf16
// compute copy); f32 output when asked.
Tensor LinearRowsForward(const Tensor& x, Linear& l, int64_t r0, int64_t n, bool f32 = false) {
  const int64_t rows = x.rows(), in = l.in();
  Tensor y = Tensor::Empty({rows, n}, f32 ? DType::kF32 : DType::kBF16, Device::kCuda);
  Mm(false, true, rows, n, in, x.raw(), in, BytePtr(l.weight()->compute, r0 * in), in, y.raw(), n, f32, 0.f);
  return y;
}

// dx [rows, in] (+)= dy [rows, n] · W[r0 : r0 + n, :];  dW[r0 : r0 + n, :] (+)= dyᵀ x (= when
// `overwrite_dw`: the caller's FirstGradWrite of W, whose row blocks together cover all of dW).
// `n` > 0: dy holds n columns in rows of dy.cols() (a padded row stride), else all of its columns.
void LinearRowsBackward(const Tensor& x, Linear& l, int64_t r0, const Tensor& dy, Tensor* dx, bool accumulate,
                        bool overwrite_dw, int64_t n = 0) {
  const int64_t rows = x.rows(), in = l.in(), ld = dy.cols();
  if (n <= 0) n = ld;
  if (!dx->defined()) *dx = Tensor::Empty({rows, in}, DType::kBF16, Device::kCuda);
  Mm(false, false, rows, in, n, dy.raw(), ld, BytePtr(l.weight()->compute, r0 * in), in, dx->raw(), in, false,
     accumulate ? 1.f : 0.f);
  Mm(true, false, n, in, rows, dy.raw(), ld, x.raw(), in, MutBytePtr(l.weight()->grad, r0 * in), in, true,
     overwrite_dw ? 0.f : 1.f);
}

// FirstGradWrite (ops/module.h) for a writer that sets every element of the gradients only when
// it has rows to sum over: with none, stale gradients are zeroed now and the writer adds nothing.
bool FirstWriteOverRows(int64_t rows, std::initializer_list<Parameter*> params) {
  if (rows > 0) return FirstGradWrite(params);
  for (Parameter* p : params) ZeroGradIfStale(p);
  return false;
}

// ZeroGradIfStale for parameters created one after another, whose gradients lie back to back in
// the flat gradient buffer (each padded to 8 elements, ops/module.h): one memset over the run
// when all are stale and CUDA fp32, else one per parameter. (A gap of the padding belongs to the
// previous gradient's own allocation under any allocator aligning to 32 bytes or more.)
void ZeroStaleGradsTogether(std::initializer_list<Parameter*> params) {
  bool together = params.size() > 1;
  const char* first = nullptr;
  const char* prev = nullptr;  // the previous gradient's start
  int64_t prev_numel = 0;
  for (Parameter* p : params) {
    const Tensor& g = p->grad;
    const char* at = static_cast<const char*>(g.raw());
    const bool adjacent = prev == nullptr || at == prev + prev_numel * sizeof(float) ||
                          at == prev + (prev_numel + 7) / 8 * 8 * sizeof(float);
    if (!p->grad_stale || !IsCuda(g) || g.dtype() != DType::kF32 || !adjacent) {
      together = false;
      break;
    }
    if (first == nullptr) first = at;
    prev = at;
    prev_numel = g.numel();
  }
  if (!together) {
    for (Parameter* p : params) ZeroGradIfStale(p);
    return;
  }
  Cuda().Memset0(const_cast<char*>(first), static_cast<size_t>(prev + prev_numel * sizeof(float) - first));
  for (Parameter* p : params) p->grad_stale = false;
}


// ---------------------------------------------------------------- phase profiling (benchmarks)

struct Profile {
  bool on = false;
  std::map<std::string, double> seconds;
  std::chrono::steady_clock::time_point last;
};
Profile& Prof() {
  static Profile* p = new Profile();
  return *p;
}
void ProfileStart() {
  if (!Prof().on) return;
  Cuda().Synchronize();
  Prof().last = std::chrono::steady_clock::now();
}
void ProfileMark(const char* name) {
  if (!Prof().on) return;
  Cuda().Synchronize();
  const auto now = std::chrono::steady_clock::now();
  Prof().seconds[name] += std::chrono::duration<double>(now - Prof().last).count();
  Prof().last = now;
}

}  // namespace

void SetRecurrentProfiling(bool on) { Prof().on = on; }

std::vector<std::pair<std::string, double>> TakeRecurrentProfile() {
  std::vector<std::pair<std::string, double>> out(Prof().seconds.begin(), Prof().seconds.end());
  Prof().seconds.clear();
  return out;
}

namespace {

}  // namespace

// ---------------------------------------------------------------- CausalConv1d

CausalConv1d::CausalConv1d(const BuildContext& ctx, int64_t channels, int64_t width, bool silu)
    : channels_(channels), width_(width), silu_(silu),
      weight_(ctx.store->Create(ctx.Name("weight"), {channels, width}, ParamKind::kWeight)),
      bias_(ctx.store->Create(ctx.Name("bias"), {channels}, ParamKind::kBias)) {
  GYRE_CHECK(cpu::conv1d_check({1, 1, channels, width}).ok(), "conv1d channels %ld width %ld", (long)channels, (long)width);
  // PyTorch's Conv1d default for a depthwise conv: fan_in = width.
  const double bound = 1.0 / std::sqrt(static_cast<double>(width));
  InitUniform(&weight_->value, -bound, bound, ctx.rng);
  InitUniform(&bias_->value, -bound, bound, ctx.rng);
}

Conv1dArgs CausalConv1d::CudaArgs(const Tensor& x, int64_t batch, int64_t seq) const {
  Conv1dArgs a;
  a.batch = batch; a.seq = seq; a.channels = channels_; a.width = width_; a.silu = silu_;
  a.x = x.raw();
  a.w = weight_->value.data<float>();
  a.bias = bias_->value.data<float>();
  return a;
}

Conv1dArgs CausalConv1d::ForwardArgsCuda(const Tensor& x, int64_t batch, int64_t seq, Tensor* y,
                                         int64_t x_row_stride) {
  const int64_t ld = x_row_stride == 0 ? channels_ : x_row_stride;
  GYRE_CHECK(ld >= channels_ && x.numel() == batch * seq * ld, "conv1d x %s (row stride %ld)",
             ShapeString(x.shape()).c_str(), (long)ld);
  GYRE_CHECK(IsCuda(x) && x.dtype() == DType::kBF16, "conv1d: CUDA x must be bf16");
  x_ = x;
  x_row_stride_ = x_row_stride;
  batch_ = batch;
  seq_ = seq;
  *y = x_row_stride == 0 ? Tensor::EmptyLike(x) : Tensor::Empty({batch * seq, channels_}, DType::kBF16, Device::kCuda);
  Conv1dArgs a = CudaArgs(x, batch, seq);
  a.x_row_stride = x_row_stride;
  a.y = y->raw();
  return a;
}

Tensor CausalConv1d::Forward(const Tensor& x, int64_t batch, int64_t seq) {
  GYRE_CHECK(x.numel() == batch * seq * channels_, "conv1d x %s", ShapeString(x.shape()).c_str());
  x_ = x;
  x_row_stride_ = 0;
  batch_ = batch;
  seq_ = seq;
  if (IsCuda(x)) {
    GYRE_CHECK(x.dtype() == DType::kBF16, "conv1d: CUDA x must be bf16");
    Tensor y = Tensor::EmptyLike(x);
    Conv1dArgs a = CudaArgs(x, batch, seq);
    a.y = y.raw();
    if (y.numel() > 0) Cuda().Conv1d(false, a);
    return y;
  }
  CheckCpu(x, "conv1d");
  Tensor y = Tensor::EmptyLike(x);
  DispatchFloat(x.dtype(), [&]<typename T>() {
    cpu::conv1d_fwd_ref<T>({batch, seq, channels_, width_}, {silu_}, x.data<T>(), weight_->value.data<T>(),
                           bias_->value.data<T>(), nullptr, y.data<T>(), nullptr);
  });
  return y;
}

Tensor CausalConv1d::Backward(const Tensor& dy) {
  GYRE_CHECK(x_.defined(), "CausalConv1d::Backward without Forward");
  GYRE_CHECK(x_row_stride_ == 0, "CausalConv1d::Backward after a strided x: BackwardInto");
  Tensor dx = Tensor::EmptyLike(x_);
  if (IsCuda(x_)) {
    BackwardInto(dy, dx.raw(), 0);
    return dx;
  }
  // The CPU reference (kernels/cpu/conv1d.h) only accumulates dw, dbias.
  ZeroGradIfStale(weight_);
  ZeroGradIfStale(bias_);
  DispatchFloat(x_.dtype(), [&]<typename T>() {
    cpu::conv1d_bwd_ref<T>({batch_, seq_, channels_, width_}, {silu_}, x_.data<T>(), weight_->value.data<T>(),
                           bias_->value.data<T>(), nullptr, dy.data<T>(), nullptr, dx.data<T>(),
                           weight_->grad.data<T>(), bias_->grad.data<T>(), nullptr);
  });
  x_ = Tensor();
  return dx;
}

void CausalConv1d::BackwardInto(const Tensor& dy, void* dx, int64_t dx_row_stride) {
  const bool rows = x_.defined() && x_.numel() > 0;
  const Conv1dArgs a = BackwardArgsCuda(dy, dx, dx_row_stride);
  if (rows) Cuda().Conv1d(true, a);
}

Conv1dArgs CausalConv1d::BackwardArgsCuda(const Tensor& dy, void* dx, int64_t dx_row_stride) {
  GYRE_CHECK(x_.defined(), "CausalConv1d::Backward without Forward");
  GYRE_CHECK(IsCuda(x_) && IsCuda(dy) && dy.dtype() == DType::kBF16 && dy.numel() == batch_ * seq_ * channels_,
             "conv1d: CUDA dy");
  Conv1dArgs a = CudaArgs(x_, batch_, seq_);
  a.x_row_stride = x_row_stride_;
  a.dy = dy.raw();
  a.dx = dx;
  a.dx_row_stride = dx_row_stride;
  a.dw = weight_->grad.data<float>();
  a.dbias = bias_->grad.data<float>();
  // The kernel sets every element of dw, dbias when it has rows (channels >= 1).
  const int64_t rows = x_.numel() > 0 ? batch_ * seq_ : 0;
  a.overwrite_dparams = FirstWriteOverRows(rows, {weight_, bias_});
  x_ = Tensor();
  return a;
}

// ---------------------------------------------------------------- mLSTM recomputation modes

namespace {

MlstmRecomputeConfig& RecomputeConfig() {
  static MlstmRecomputeConfig* config = [] {
    auto* c = new MlstmRecomputeConfig();
    if (const char* v = std::getenv("GYRE_MLSTM_RECOMPUTE")) {
      const std::string mode(v);
      if (mode == "cell") c->mode = MlstmRecompute::kCell;
      else if (mode == "glue") c->mode = MlstmRecompute::kGlue;
      else if (mode == "block") c->mode = MlstmRecompute::kBlock;
      else if (mode == "states") c->mode = MlstmRecompute::kStates;
      else GYRE_CHECK(mode.empty() || mode == "none",
                      "GYRE_MLSTM_RECOMPUTE must be none, cell, glue, block or states, got '%s'", v);
    }
    if (const char* v = std::getenv("GYRE_MLSTM_RECOMPUTE_KEEP")) {
      char* end = nullptr;
      const long long n = std::strtoll(v, &end, 10);
      GYRE_CHECK(*v != '\0' && *end == '\0' && n >= 0, "GYRE_MLSTM_RECOMPUTE_KEEP must be an integer >= 0, got '%s'",
                 v);
      c->keep_last = n;
    }
    return c;
  }();
  return *config;
}


bool& ConvQkvFused() {
  static bool fused = EnvChoice("GYRE_MLSTM_CONV_QKV", {"separate", "fused"}, "fused") == "fused";
  return fused;
}

bool& ConvVBwdFused() {
  static bool fused = EnvChoice("GYRE_MLSTM_CONV_V_BWD", {"separate", "fused"}, "fused") == "fused";
  return fused;
}

MlstmQkBwd& QkBwdMode() {
  static MlstmQkBwd mode =
      EnvChoice("GYRE_MLSTM_QK_BWD", {"fma", "tc"}, "tc") == "fma" ? MlstmQkBwd::kFma : MlstmQkBwd::kTc;
  return mode;
}

bool& DhDotInNorm() {
  static bool norm = EnvChoice("GYRE_MLSTM_DH_DOT", {"cell", "norm"}, "norm") == "norm";
  return norm;
}

bool& UpFused() {
  static bool fused = EnvChoice("GYRE_MLSTM_UP", {"split", "fused"}, "fused") == "fused";
  return fused;
}

}  // namespace

bool MlstmDhDotInNorm() { return DhDotInNorm(); }
void SetMlstmDhDotInNorm(bool in_norm) { DhDotInNorm() = in_norm; }
MlstmQkBwd GetMlstmQkBwd() { return QkBwdMode(); }
void SetMlstmQkBwd(MlstmQkBwd mode) { QkBwdMode() = mode; }
bool MlstmConvQkvFused() { return ConvQkvFused(); }
void SetMlstmConvQkvFused(bool fused) { ConvQkvFused() = fused; }
bool MlstmConvVBwdFused() { return ConvVBwdFused(); }
void SetMlstmConvVBwdFused(bool fused) { ConvVBwdFused() = fused; }
bool MlstmUpFused() { return UpFused(); }
void SetMlstmUpFused(bool fused) { UpFused() = fused; }

MlstmRecomputeConfig GetMlstmRecompute() { return RecomputeConfig(); }
void SetMlstmRecompute(MlstmRecomputeConfig config) { RecomputeConfig() = config; }

const char* MlstmRecomputeName(MlstmRecompute mode) {
  switch (mode) {
    case MlstmRecompute::kCell: return "cell";
    case MlstmRecompute::kGlue: return "glue";
    case MlstmRecompute::kBlock: return "block";
    case MlstmRecompute::kStates: return "states";
    default: return "none";
  }
}

// ---------------------------------------------------------------- MlstmBlock

MlstmBlock::MlstmBlock(const BuildContext& ctx, const ModelSpec& s, int64_t n_layers, int64_t layer)
    : d_(s.d_model), p_(s.mlstm_inner), heads_(s.mlstm_heads), chunk_(s.mlstm_chunk), n_layers_(n_layers),
      layer_(layer), sigmoid_forget_(s.mlstm_sigmoid_forget),
      norm_(ctx.Sub("norm"), s.d_model, XlstmLayerNorm()),
      up_(ctx.Sub("proj_up"), s.d_model, 2 * s.mlstm_inner, false),
      conv_(ctx.Sub("conv1d"), s.mlstm_inner, s.conv_kernel, /*silu=*/true),
      q_(ctx.Sub("q_proj"), s.mlstm_inner / s.qkv_block_size, s.qkv_block_size, s.qkv_block_size),
      k_(ctx.Sub("k_proj"), s.mlstm_inner / s.qkv_block_size, s.qkv_block_size, s.qkv_block_size),
      v_(ctx.Sub("v_proj"), s.mlstm_inner / s.qkv_block_size, s.qkv_block_size, s.qkv_block_size),
      igate_(ctx.Sub("igate"), 3 * s.mlstm_inner, s.mlstm_heads, true),
      fgate_(ctx.Sub("fgate"), 3 * s.mlstm_inner, s.mlstm_heads, true),
      outnorm_(ctx.Sub("outnorm"), s.mlstm_inner, XlstmLayerNorm(s.mlstm_heads)),
      skip_(ctx.store->Create(ctx.Name("learnable_skip"), {s.mlstm_inner}, ParamKind::kNoDecay)),
      down_(ctx.Sub("proj_down"), s.mlstm_inner, s.d_model, false) {
  const int64_t dk = p_ / heads_;
  GYRE_CHECK(cpu::mlstm_check({1, 1, heads_, dk, dk}, {chunk_}).ok(), "mLSTM shape");
  // model_config.cc validated the name.
  if (s.mlstm_recompute == "states") configured_ = MlstmRecompute::kStates;
  else if (s.mlstm_recompute == "glue") configured_ = MlstmRecompute::kGlue;
  else if (s.mlstm_recompute == "cell") configured_ = MlstmRecompute::kCell;
  configured_keep_last_ = s.mlstm_recompute_keep_last;
  Rng* rng = ctx.rng;
  InitNormal(&up_.weight()->value, SmallInitStd(d_), rng);
  for (BlockDiagonalLinear* l : {&q_, &k_, &v_}) InitNormal(&l->weight()->value, SmallInitStd(d_), rng);
  InitNormal(&down_.weight()->value, WangInitStd(d_, n_layers), rng);
  InitConstant(&igate_.weight()->value, 0.0);
  InitNormal(&igate_.bias()->value, 0.1, rng);
  InitConstant(&fgate_.weight()->value, 0.0);
  if (ctx.materialized()) {
    for (int64_t h = 0; h < heads_; ++h)
      fgate_.bias()->value.Set(h, heads_ == 1 ? 3.0 : 3.0 + 3.0 * h / (heads_ - 1));  // linspace(3, 6)
  }
  InitConstant(&skip_->value, 1.0);
}

Tensor MlstmBlock::Forward(const Tensor& x, int64_t batch, int64_t seq) {
  batch_ = batch;
  seq_ = seq;
  if (IsCuda(x)) return ForwardCuda(x, batch, seq);
  const int64_t dk = p_ / heads_;
  Tensor u = norm_.Forward(x);
  Tensor up = up_.Forward(u);
  Tensor xm = SliceColumns(up, 0, p_);
  z_ = SliceColumns(up, p_, 2 * p_);
  xc_ = conv_.Forward(xm, batch, seq);
  q_out_ = q_.Forward(xc_);
  k_out_ = k_.Forward(xc_);
  v_out_ = v_.Forward(xm);
  Tensor qkv = ConcatColumns({q_out_, k_out_, v_out_});
  ig_ = igate_.Forward(qkv);
  fg_ = fgate_.Forward(qkv);
  h_ = Tensor::EmptyLike(xm);
  const cpu::MlstmShape shape{batch, seq, heads_, dk, dk};
  const cpu::MlstmOptions options{chunk_, sigmoid_forget_ ? cpu::MlstmForgetGate::kSigmoid
                                                          : cpu::MlstmForgetGate::kExponential, 1e-6};
  saved_ = Tensor::Empty({cpu::mlstm_chunkwise_saved_size(shape, options)}, x.dtype());
  DispatchFloat(x.dtype(), [&]<typename T>() {
    const auto slices = BatchSlices(batch);
    const int64_t saved_row = cpu::mlstm_chunkwise_saved_size({1, seq, heads_, dk, dk}, options);
    const int64_t qk_row = seq * p_, g_row = seq * heads_;
    ParallelFor(static_cast<int64_t>(slices.size()), [&](int64_t i) {
      const auto [b0, b1] = slices[i];
      cpu::MlstmInputs<T> in{q_out_.data<T>() + b0 * qk_row, k_out_.data<T>() + b0 * qk_row,
                             v_out_.data<T>() + b0 * qk_row, ig_.data<T>() + b0 * g_row, fg_.data<T>() + b0 * g_row};
      cpu::mlstm_chunkwise_fwd_ref<T>({b1 - b0, seq, heads_, dk, dk}, options, in, {}, h_.data<T>() + b0 * qk_row,
                                      saved_.data<T>() + b0 * saved_row, {});
    });
  });
  Tensor hn = outnorm_.Forward(h_);
  hs_ = Add(hn, ScaleColumns(xc_, skip_->value));
  sz_ = Activate(Activation::kSilu, z_);
  return Add(x, down_.Forward(Mul(hs_, sz_)));
}

Tensor MlstmBlock::Backward(const Tensor& dy) {
  if (IsCuda(dy)) {
    // The recomputation modes drop h_ after the forward; the up-projection output (or, for
    // kBlock, the block input) is what every CUDA mode keeps.
    GYRE_CHECK(xm_.defined() || x_in_.defined(), "MlstmBlock::Backward without Forward");
    return BackwardCuda(dy);
  }
  GYRE_CHECK(h_.defined(), "MlstmBlock::Backward without Forward");
  const int64_t dk = p_ / heads_;
  Tensor dhh = down_.Backward(dy);
  Tensor dhs = Mul(dhh, sz_);
  Tensor dz = ActivateBackward(Activation::kSilu, z_, Mul(dhh, hs_));
  ZeroGradIfStale(skip_);
  AccumulateColumnSums(dhs, &xc_, &skip_->grad);
  Tensor dxc = ScaleColumns(dhs, skip_->value);
  Tensor dh = outnorm_.Backward(dhs);
  const cpu::MlstmOptions options{chunk_, sigmoid_forget_ ? cpu::MlstmForgetGate::kSigmoid
                                                          : cpu::MlstmForgetGate::kExponential, 1e-6};
  Tensor dq = Tensor::EmptyLike(q_out_), dk_t = Tensor::EmptyLike(k_out_), dv = Tensor::EmptyLike(v_out_);
  Tensor dig = Tensor::EmptyLike(ig_), dfg = Tensor::EmptyLike(fg_);
  DispatchFloat(dy.dtype(), [&]<typename T>() {
    const auto slices = BatchSlices(batch_);
    const int64_t saved_row = cpu::mlstm_chunkwise_saved_size({1, seq_, heads_, dk, dk}, options);
    const int64_t qk_row = seq_ * p_, g_row = seq_ * heads_;
    ParallelFor(static_cast<int64_t>(slices.size()), [&](int64_t i) {
      const auto [b0, b1] = slices[i];
      cpu::MlstmInputs<T> in{q_out_.data<T>() + b0 * qk_row, k_out_.data<T>() + b0 * qk_row,
                             v_out_.data<T>() + b0 * qk_row, ig_.data<T>() + b0 * g_row, fg_.data<T>() + b0 * g_row};
      cpu::MlstmGrads<T> g{dq.data<T>() + b0 * qk_row, dk_t.data<T>() + b0 * qk_row, dv.data<T>() + b0 * qk_row,
                           dig.data<T>() + b0 * g_row, dfg.data<T>() + b0 * g_row};
      cpu::mlstm_chunkwise_bwd_ref<T>({b1 - b0, seq_, heads_, dk, dk}, options, in, {}, h_.data<T>() + b0 * qk_row,
                                      saved_.data<T>() + b0 * saved_row, dh.data<T>() + b0 * qk_row, {}, g, {});
    });
  });
  Tensor dqkv = igate_.Backward(dig);
  AddInPlace(&dqkv, fgate_.Backward(dfg));
  AddInPlace(&dq, SliceColumns(dqkv, 0, p_));
  AddInPlace(&dk_t, SliceColumns(dqkv, p_, 2 * p_));
  AddInPlace(&dv, SliceColumns(dqkv, 2 * p_, 3 * p_));
  AddInPlace(&dxc, q_.Backward(dq));
  AddInPlace(&dxc, k_.Backward(dk_t));
  Tensor dxm = v_.Backward(dv);
  AddInPlace(&dxm, conv_.Backward(dxc));
  Tensor du = up_.Backward(ConcatColumns({dxm, dz}));
  Tensor dx = Add(dy, norm_.Backward(du));
  ReleaseActivations();
  return dx;
}

void MlstmBlock::ReleaseActivations() {
  z_ = xc_ = q_out_ = k_out_ = v_out_ = ig_ = fg_ = h_ = saved_ = hs_ = sz_ = Tensor();
  u_ = xm_ = mean_ = rstd_ = x_in_ = tokens_ = Tensor();
  norm_.ReleaseActivations();
  up_.ReleaseActivations();
  conv_.ReleaseActivations();
  q_.ReleaseActivations();
  k_.ReleaseActivations();
  v_.ReleaseActivations();
  igate_.ReleaseActivations();
  fgate_.ReleaseActivations();
  outnorm_.ReleaseActivations();
  down_.ReleaseActivations();
}

// ---------------------------------------------------------------- SlstmBlock

SlstmBlock::SlstmBlock(const BuildContext& ctx, const ModelSpec& s, int64_t layer, int64_t n_layers)
    : d_(s.d_model), heads_(s.slstm_heads),
      norm_(ctx.Sub("norm"), s.d_model, XlstmLayerNorm()),
      conv_(ctx.Sub("conv1d"), s.d_model, s.conv_kernel, /*silu=*/true),
      wi_(ctx.Sub("igate"), s.slstm_heads, s.d_model / s.slstm_heads, s.d_model / s.slstm_heads),
      wf_(ctx.Sub("fgate"), s.slstm_heads, s.d_model / s.slstm_heads, s.d_model / s.slstm_heads),
      wz_(ctx.Sub("zgate"), s.slstm_heads, s.d_model / s.slstm_heads, s.d_model / s.slstm_heads),
      wo_(ctx.Sub("ogate"), s.slstm_heads, s.d_model / s.slstm_heads, s.d_model / s.slstm_heads),
      bias_(ctx.store->Create(ctx.Name("cell.bias"), {4, s.d_model}, ParamKind::kBias)),
      recurrent_(ctx.store->Create(ctx.Name("cell.recurrent_kernel"),
                                   {s.slstm_heads, 4, s.d_model / s.slstm_heads, s.d_model / s.slstm_heads},
                                   ParamKind::kNoDecay)),
      group_norm_(ctx.Sub("group_norm"), s.d_model, XlstmLayerNorm(s.slstm_heads)),
      ffn_norm_(ctx.Sub("ffn_norm"), s.d_model, XlstmLayerNorm()),
      ffn_(ctx.Sub("ffn"), s.d_model, s.slstm_ffn, Activation::kGelu) {
  const int64_t dh = d_ / heads_;
  GYRE_CHECK(cpu::slstm_check({1, 1, heads_, dh}).ok(), "sLSTM shape");
  for (BlockDiagonalLinear* l : {&wi_, &wf_, &wz_, &wo_}) InitNormal(&l->weight()->value, SmallInitStd(d_), ctx.rng);
  InitNormal(&ffn_.gate().weight()->value, SmallInitStd(d_), ctx.rng);
  InitNormal(&ffn_.up().weight()->value, SmallInitStd(d_), ctx.rng);
  InitNormal(&ffn_.down().weight()->value, WangInitStd(d_, n_layers), ctx.rng);
  // Forget-gate bias "powerlaw_blockdependent": b_f[j] = 5 - 12 (j/(dh-1))^(0.3 + 1.3 l/(L-1)).
  if (ctx.materialized()) {
    const double exponent = 0.3 + 1.3 * (n_layers > 1 ? static_cast<double>(layer) / (n_layers - 1) : 0.0);
    for (int64_t c = 0; c < d_; ++c) {
      const int64_t j = c % dh;
      const double frac = dh > 1 ? static_cast<double>(j) / (dh - 1) : 0.0;
      bias_->value.Set(1 * d_ + c, 5.0 - 12.0 * std::pow(frac, exponent));
    }
  }
}

Tensor SlstmBlock::Forward(const Tensor& x, int64_t batch, int64_t seq) {
  batch_ = batch;
  seq_ = seq;
  if (IsCuda(x)) return ForwardCuda(x, batch, seq);
  const int64_t dh = d_ / heads_, rows = batch * seq;
  Tensor u = norm_.Forward(x);
  Tensor xc = conv_.Forward(u, batch, seq);
  Tensor gates[4] = {wi_.Forward(xc), wf_.Forward(xc), wz_.Forward(u), wo_.Forward(u)};
  gx_ = Tensor::Empty({batch, seq, 4, d_}, x.dtype());
  h_ = Tensor::Empty({batch, seq, d_}, x.dtype());
  const cpu::SlstmShape shape{batch, seq, heads_, dh};
  saved_ = Tensor::Empty({cpu::slstm_saved_size(shape)}, x.dtype());
  DispatchFloat(x.dtype(), [&]<typename T>() {
    T* g = gx_.data<T>();
    const T* b = bias_->value.data<T>();
    for (int k = 0; k < 4; ++k) {
      const T* src = gates[k].data<T>();
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < d_; ++c) g[(r * 4 + k) * d_ + c] = src[r * d_ + c] + b[k * d_ + c];
    }
    const auto slices = BatchSlices(batch);
    const int64_t saved_row = cpu::slstm_saved_size({1, seq, heads_, dh});
    ParallelFor(static_cast<int64_t>(slices.size()), [&](int64_t i) {
      const auto [b0, b1] = slices[i];
      cpu::slstm_fwd_ref<T>({b1 - b0, seq, heads_, dh}, g + b0 * seq * 4 * d_, recurrent_->value.data<T>(), {},
                            h_.data<T>() + b0 * seq * d_, saved_.data<T>() + b0 * saved_row, {});
    });
  });
  Tensor x1 = Add(x, group_norm_.Forward(h_));
  return Add(x1, ffn_.Forward(ffn_norm_.Forward(x1)));
}

Tensor SlstmBlock::Backward(const Tensor& dy) {
  GYRE_CHECK(h_.defined(), "SlstmBlock::Backward without Forward");
  if (IsCuda(dy)) return BackwardCuda(dy);
  const int64_t dh_dim = d_ / heads_, rows = batch_ * seq_;
  Tensor dx1 = Add(dy, ffn_norm_.Backward(ffn_.Backward(dy)));
  Tensor dh = group_norm_.Backward(dx1);
  Tensor dgx = Tensor::EmptyLike(gx_);
  Tensor dgates[4];
  for (auto& t : dgates) t = Tensor::Empty({batch_, seq_, d_}, dy.dtype());
  DispatchFloat(dy.dtype(), [&]<typename T>() {
    // dR accumulates: one buffer per slice beyond the first, summed afterwards.
    const auto slices = BatchSlices(batch_);
    const int64_t saved_row = cpu::slstm_saved_size({1, seq_, heads_, dh_dim});
    std::vector<Tensor> dr(slices.size());
    for (size_t i = 1; i < slices.size(); ++i) dr[i] = Tensor::ZerosLike(recurrent_->grad);
    ZeroGradIfStale(recurrent_);  // the cell and the bias loop below add
    ZeroGradIfStale(bias_);
    ParallelFor(static_cast<int64_t>(slices.size()), [&](int64_t i) {
      const auto [b0, b1] = slices[i];
      T* dr_out = i == 0 ? recurrent_->grad.data<T>() : dr[i].data<T>();
      cpu::slstm_bwd_ref<T>({b1 - b0, seq_, heads_, dh_dim}, recurrent_->value.data<T>(), {},
                            h_.data<T>() + b0 * seq_ * d_, saved_.data<T>() + b0 * saved_row,
                            dh.data<T>() + b0 * seq_ * d_, {}, dgx.data<T>() + b0 * seq_ * 4 * d_, dr_out, {});
    });
    for (size_t i = 1; i < slices.size(); ++i) AddInPlace(&recurrent_->grad, dr[i]);
    const T* g = dgx.data<T>();
    T* gb = bias_->grad.data<T>();
    for (int k = 0; k < 4; ++k) {
      T* dst = dgates[k].data<T>();
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < d_; ++c) {
          const T v = g[(r * 4 + k) * d_ + c];
          dst[r * d_ + c] = v;
          gb[k * d_ + c] += v;
        }
    }
  });
  Tensor dxc = wi_.Backward(dgates[0]);
  AddInPlace(&dxc, wf_.Backward(dgates[1]));
  Tensor du = wz_.Backward(dgates[2]);
  AddInPlace(&du, wo_.Backward(dgates[3]));
  AddInPlace(&du, conv_.Backward(dxc));
  Tensor dx = Add(dx1, norm_.Backward(du));
  ReleaseActivations();
  return dx;
}

void SlstmBlock::ReleaseActivations() {
  gx_ = h_ = saved_ = u_ = xc_ = Tensor();
  norm_.ReleaseActivations();
  conv_.ReleaseActivations();
  for (BlockDiagonalLinear* l : {&wi_, &wf_, &wz_, &wo_}) l->ReleaseActivations();
  group_norm_.ReleaseActivations();
  ffn_norm_.ReleaseActivations();
  ffn_.ReleaseActivations();
}

// ---------------------------------------------------------------- gradient terms (reference checks)

namespace {

bool g_record_grad_terms = false;
std::mutex g_grad_terms_mu;
std::vector<Mamba2GradTerms> g_grad_terms;

// The per-token terms of the dt_bias, A_log and D gradients of Mamba2Block's CPU backward (the
// header says what each is). x, dx, dy [rows, heads x head_dim]; dt_raw, ddt_raw [rows, heads].
// Mirrors kernels/cpu/ssd.cc: there d dt = rev A + sum_p x dx̄ and dx = dt dx̄ + D dy, dA = sum of
// rev dt, d dt_raw = d dt · sigmoid(dt_raw + dt_bias); so dt·A·rev = dt·d dt − sum_p x (dx − D dy).
void RecordMamba2GradTerms(int64_t batch, int64_t seq, int64_t heads, int64_t head_dim, const Parameter& a_log,
                           const Parameter& dt_bias, const Parameter& d_skip, const Tensor& x, const Tensor& dt_raw,
                           const Tensor& dx, const Tensor& ddt_raw, const Tensor& dy) {
  const int64_t rows = batch * seq, width = heads * head_dim;
  auto record = [&](const Parameter& p) {
    return Mamba2GradTerms{p.name, batch, seq, heads, std::vector<double>(static_cast<size_t>(rows * heads))};
  };
  Mamba2GradTerms t_dt = record(dt_bias), t_a = record(a_log), t_d = record(d_skip);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t i = r * heads + h;
      const double v = dt_raw.At(i) + dt_bias.value.At(h);
      const double dt = v > 20 ? v : std::log1p(std::exp(v));
      const double sigmoid = v >= 0 ? 1 / (1 + std::exp(-v)) : std::exp(v) / (1 + std::exp(v));
      const double d = d_skip.value.At(h);
      double xdy = 0, xdxbar = 0;
      for (int64_t p = 0; p < head_dim; ++p) {
        const int64_t j = r * width + h * head_dim + p;
        xdy += x.At(j) * dy.At(j);
        xdxbar += x.At(j) * (dx.At(j) - d * dy.At(j));
      }
      t_dt.terms[i] = ddt_raw.At(i);
      t_d.terms[i] = xdy;
      t_a.terms[i] = dt * (ddt_raw.At(i) / sigmoid) - xdxbar;
    }
  }
  std::lock_guard<std::mutex> lock(g_grad_terms_mu);
  for (Mamba2GradTerms* t : {&t_dt, &t_a, &t_d}) g_grad_terms.push_back(std::move(*t));
}

double Norm2(const std::vector<double>& v) {
  double s = 0;
  for (double e : v) s += e * e;
  return std::sqrt(s);
}

}  // namespace

void SetMamba2GradTermRecording(bool on) { g_record_grad_terms = on; }

std::vector<Mamba2GradTerms> TakeMamba2GradTerms() {
  std::lock_guard<std::mutex> lock(g_grad_terms_mu);
  std::vector<Mamba2GradTerms> out;
  out.swap(g_grad_terms);
  return out;
}

std::vector<double> SumAbsTerms(const std::vector<Mamba2GradTerms>& records, const std::string& param) {
  std::vector<double> sums;
  for (const Mamba2GradTerms& r : records) {
    if (r.param != param) continue;
    if (sums.empty()) sums.assign(static_cast<size_t>(r.heads), 0.0);
    GYRE_CHECK(static_cast<int64_t>(sums.size()) == r.heads, "%s: records of %zu and %ld heads", param.c_str(),
               sums.size(), (long)r.heads);
    for (size_t i = 0; i < r.terms.size(); ++i) sums[i % sums.size()] += std::fabs(r.terms[i]);
  }
  return sums;
}

SumOfTermsCheck CheckSumOfTerms(const Tensor& got, const Tensor& want, const std::vector<double>& abs_sums,
                                double rel_tol, double terms_tol) {
  const Tensor g = got.ToDevice(Device::kCpu).To(DType::kF64), w = want.ToDevice(Device::kCpu).To(DType::kF64);
  GYRE_CHECK(g.numel() == w.numel() && g.numel() == static_cast<int64_t>(abs_sums.size()),
             "CheckSumOfTerms: %ld, %ld and %zu heads", (long)g.numel(), (long)w.numel(), abs_sums.size());
  std::vector<double> diff(abs_sums.size()), wv(abs_sums.size());
  bool finite = true;
  for (int64_t i = 0; i < g.numel(); ++i) {
    finite = finite && std::isfinite(g.At(i));
    diff[i] = g.At(i) - w.At(i);
    wv[i] = w.At(i);
  }
  SumOfTermsCheck c;
  const double scale = Norm2(abs_sums), err = Norm2(diff);
  c.rel_err = finite ? RelativeError(g, w) : INFINITY;
  c.terms_err = !finite ? INFINITY : scale > 0 ? err / scale : (err == 0 ? 0.0 : INFINITY);
  c.cancel = scale > 0 ? Norm2(wv) / scale : 0.0;
  c.pass = finite && (c.rel_err <= rel_tol || c.terms_err <= terms_tol);
  return c;
}

// ---------------------------------------------------------------- Mamba2Block

Mamba2Block::Mamba2Block(const BuildContext& ctx, const ModelSpec& s, int64_t n_layers)
    : d_(s.d_model), di_(s.ssm_expand * s.d_model), heads_(s.ssm_expand * s.d_model / s.ssm_head_dim),
      head_dim_(s.ssm_head_dim), groups_(s.ssm_groups), state_(s.ssm_state), chunk_(s.ssm_chunk),
      norm_(ctx.Sub("norm"), s.d_model, {NormOptions::kRms, 1, 1e-5}),
      in_proj_(ctx.Sub("in_proj"), s.d_model,
               2 * s.ssm_expand * s.d_model + 2 * s.ssm_groups * s.ssm_state + s.ssm_expand * s.d_model / s.ssm_head_dim,
               false),
      conv_(ctx.Sub("conv1d"), s.ssm_expand * s.d_model + 2 * s.ssm_groups * s.ssm_state, s.ssm_conv, /*silu=*/true),
      a_log_(ctx.store->Create(ctx.Name("A_log"), {s.ssm_expand * s.d_model / s.ssm_head_dim}, ParamKind::kNoDecay)),
      dt_bias_(ctx.store->Create(ctx.Name("dt_bias"), {s.ssm_expand * s.d_model / s.ssm_head_dim}, ParamKind::kNoDecay)),
      d_skip_(ctx.store->Create(ctx.Name("D"), {s.ssm_expand * s.d_model / s.ssm_head_dim}, ParamKind::kNoDecay)),
      gated_norm_(ctx.Sub("gated_norm"), s.ssm_expand * s.d_model, {NormOptions::kRms, s.ssm_groups, 1e-5}),
      out_proj_(ctx.Sub("out_proj"), s.ssm_expand * s.d_model, s.d_model, false) {
  GYRE_CHECK(cpu::ssd_check({1, 1, heads_, head_dim_, groups_, state_}, {chunk_}).ok(), "SSD shape");
  // [ms] Mamba2.__init__: A ~ U[1, 16]; dt = exp(U[ln 1e-3, ln 0.1]) floored at 1e-4,
  // dt_bias = inverse softplus(dt); D = 1. out_proj: kaiming-uniform(a = sqrt 5) / sqrt(n_layer).
  if (ctx.materialized()) {
    for (int64_t h = 0; h < heads_; ++h) {
      a_log_->value.Set(h, std::log(ctx.rng->Uniform(1.0, 16.0)));
      double dt = std::exp(ctx.rng->Uniform(std::log(1e-3), std::log(0.1)));
      dt = std::max(dt, 1e-4);
      dt_bias_->value.Set(h, dt + std::log(-std::expm1(-dt)));
    }
  }
  InitConstant(&d_skip_->value, 1.0);
  const double bound = 1.0 / std::sqrt(static_cast<double>(di_)) / std::sqrt(static_cast<double>(n_layers));
  InitUniform(&out_proj_.weight()->value, -bound, bound, ctx.rng);
}

Tensor Mamba2Block::Forward(const Tensor& x, int64_t batch, int64_t seq) {
  batch_ = batch;
  seq_ = seq;
  if (IsCuda(x)) return ForwardCuda(x, batch, seq);
  const int64_t gn = groups_ * state_;
  Tensor u = norm_.Forward(x);
  Tensor zx = in_proj_.Forward(u);
  z_ = SliceColumns(zx, 0, di_);
  Tensor xbc = conv_.Forward(SliceColumns(zx, di_, 2 * di_ + 2 * gn), batch, seq);
  dt_ = SliceColumns(zx, 2 * di_ + 2 * gn, 2 * di_ + 2 * gn + heads_);
  xs_ = SliceColumns(xbc, 0, di_);
  b_ = SliceColumns(xbc, di_, di_ + gn);
  c_ = SliceColumns(xbc, di_ + gn, di_ + 2 * gn);
  y_ = Tensor::EmptyLike(xs_);
  const cpu::SsdShape shape{batch, seq, heads_, head_dim_, groups_, state_};
  cpu::SsdOptions options;
  options.chunk_size = chunk_;
  saved_ = Tensor::Empty({cpu::ssd_chunked_saved_size(shape, options)}, x.dtype());
  DispatchFloat(x.dtype(), [&]<typename T>() {
    const auto slices = BatchSlices(batch);
    const int64_t saved_row = cpu::ssd_chunked_saved_size({1, seq, heads_, head_dim_, groups_, state_}, options);
    const int64_t x_row = seq * di_, dt_row = seq * heads_, bc_row = seq * groups_ * state_;
    ParallelFor(static_cast<int64_t>(slices.size()), [&](int64_t i) {
      const auto [b0, b1] = slices[i];
      cpu::SsdInputs<T> in{xs_.data<T>() + b0 * x_row, dt_.data<T>() + b0 * dt_row, a_log_->value.data<T>(),
                           dt_bias_->value.data<T>(), b_.data<T>() + b0 * bc_row, c_.data<T>() + b0 * bc_row,
                           d_skip_->value.data<T>()};
      cpu::ssd_chunked_fwd_ref<T>({b1 - b0, seq, heads_, head_dim_, groups_, state_}, options, in, nullptr,
                                  y_.data<T>() + b0 * x_row, saved_.data<T>() + b0 * saved_row, nullptr);
    });
  });
  sz_ = Activate(Activation::kSilu, z_);
  return Add(x, out_proj_.Forward(gated_norm_.Forward(Mul(y_, sz_))));
}

Tensor Mamba2Block::Backward(const Tensor& dy) {
  GYRE_CHECK(y_.defined(), "Mamba2Block::Backward without Forward");
  if (IsCuda(dy)) return BackwardCuda(dy);
  Tensor dg = gated_norm_.Backward(out_proj_.Backward(dy));
  Tensor dyy = Mul(dg, sz_);
  Tensor dz = ActivateBackward(Activation::kSilu, z_, Mul(dg, y_));
  Tensor dxs = Tensor::EmptyLike(xs_), ddt = Tensor::EmptyLike(dt_), db = Tensor::EmptyLike(b_),
         dc = Tensor::EmptyLike(c_);
  cpu::SsdOptions options;
  options.chunk_size = chunk_;
  DispatchFloat(dy.dtype(), [&]<typename T>() {
    // Parameter gradients accumulate: one set of buffers per slice beyond the first.
    const auto slices = BatchSlices(batch_);
    const int64_t saved_row = cpu::ssd_chunked_saved_size({1, seq_, heads_, head_dim_, groups_, state_}, options);
    const int64_t x_row = seq_ * di_, dt_row = seq_ * heads_, bc_row = seq_ * groups_ * state_;
    std::vector<Tensor> extra(3 * slices.size());
    for (size_t i = 3; i < extra.size(); ++i) extra[i] = Tensor::ZerosLike(a_log_->grad);
    for (Parameter* p : {a_log_, dt_bias_, d_skip_}) ZeroGradIfStale(p);  // the cell adds
    ParallelFor(static_cast<int64_t>(slices.size()), [&](int64_t i) {
      const auto [b0, b1] = slices[i];
      cpu::SsdInputs<T> in{xs_.data<T>() + b0 * x_row, dt_.data<T>() + b0 * dt_row, a_log_->value.data<T>(),
                           dt_bias_->value.data<T>(), b_.data<T>() + b0 * bc_row, c_.data<T>() + b0 * bc_row,
                           d_skip_->value.data<T>()};
      cpu::SsdGrads<T> g{dxs.data<T>() + b0 * x_row, ddt.data<T>() + b0 * dt_row,
                         i == 0 ? a_log_->grad.data<T>() : extra[3 * i].data<T>(),
                         i == 0 ? dt_bias_->grad.data<T>() : extra[3 * i + 1].data<T>(),
                         db.data<T>() + b0 * bc_row, dc.data<T>() + b0 * bc_row,
                         i == 0 ? d_skip_->grad.data<T>() : extra[3 * i + 2].data<T>()};
      cpu::ssd_chunked_bwd_ref<T>({b1 - b0, seq_, heads_, head_dim_, groups_, state_}, options, in, nullptr,
                                  saved_.data<T>() + b0 * saved_row, dyy.data<T>() + b0 * x_row, nullptr, g, nullptr);
    });
    for (size_t i = 1; i < slices.size(); ++i) {
      AddInPlace(&a_log_->grad, extra[3 * i]);
      AddInPlace(&dt_bias_->grad, extra[3 * i + 1]);
      AddInPlace(&d_skip_->grad, extra[3 * i + 2]);
    }
  });
  if (g_record_grad_terms) {
    RecordMamba2GradTerms(batch_, seq_, heads_, head_dim_, *a_log_, *dt_bias_, *d_skip_, xs_, dt_, dxs, ddt, dyy);
  }
  Tensor dxbc = conv_.Backward(ConcatColumns({dxs, db, dc}));
  Tensor du = in_proj_.Backward(ConcatColumns({dz, dxbc, ddt}));
  Tensor dx = Add(dy, norm_.Backward(du));
  ReleaseActivations();
  return dx;
}

void Mamba2Block::ReleaseActivations() {
  z_ = dt_ = xs_ = b_ = c_ = y_ = saved_ = sz_ = u_ = rstd_ = Tensor();
  norm_.ReleaseActivations();
  in_proj_.ReleaseActivations();
  conv_.ReleaseActivations();
  gated_norm_.ReleaseActivations();
  out_proj_.ReleaseActivations();
}

// ---------------------------------------------------------------- incremental decoding

Tensor CausalConv1d::Step(const Tensor& x, Tensor* state) {
  if (IsCuda(x)) return StepChunkCuda(x, 1, state, nullptr);
  CheckCpu(x, "conv1d_step");
  GYRE_CHECK(x.cols() == channels_ && state->numel() == x.rows() * (width_ - 1) * channels_, "conv1d step shapes");
  Tensor y = Tensor::EmptyLike(x);
  DispatchFloat(x.dtype(), [&]<typename T>() {
    cpu::conv1d_step_fwd_ref<T>({x.rows(), 1, channels_, width_}, {silu_}, x.data<T>(), weight_->value.data<T>(),
                                bias_->value.data<T>(), state->data<T>(), y.data<T>());
  });
  return y;
}

Tensor CausalConv1d::StepChunk(const Tensor& x, int64_t chunk, Tensor* state, StateHistory* history) {
  if (IsCuda(x)) return StepChunkCuda(x, chunk, state, history);  // all positions in one launch
  if (history != nullptr) history->Clear();
  if (chunk == 1) return Step(x, state);
  GYRE_CHECK(chunk > 0 && x.rows() % chunk == 0, "conv1d chunk %ld of %ld rows", (long)chunk, (long)x.rows());
  const int64_t B = x.rows() / chunk;
  Tensor y = Tensor::Empty({x.rows(), channels_}, x.dtype(), x.device());
  for (int64_t j = 0; j < chunk; ++j) {
    y.Rows(j * B, (j + 1) * B).CopyFrom(Step(x.Rows(j * B, (j + 1) * B), state));
    if (history != nullptr && j + 1 < chunk) history->Record({state});
  }
  return y;
}

namespace {

cpu::MlstmOptions MlstmStepOptions(int64_t chunk, bool sigmoid_forget) {
  return {chunk, sigmoid_forget ? cpu::MlstmForgetGate::kSigmoid : cpu::MlstmForgetGate::kExponential, 1e-6};
}

}  // namespace

std::unique_ptr<BlockState> MlstmBlock::NewState(int64_t batch) const {
  const DType dt = skip_->value.dtype();
  const int64_t dk = p_ / heads_;
  auto st = std::make_unique<MlstmState>();
  st->conv = Tensor::Zeros({batch, conv_.width() - 1, p_}, dt);
  st->c = Tensor::Zeros({batch, heads_, dk, dk}, dt);
  st->n = Tensor::Zeros({batch, heads_, dk}, dt);
  st->m = Tensor::Zeros({batch, heads_}, dt);
  return st;
}

Tensor MlstmBlock::StepChunk(const Tensor& x, int64_t chunk, BlockState* state, bool rewindable) {
  auto* st = static_cast<MlstmState*>(state);
  st->cell_history.Clear();
  if (IsCuda(x)) return StepCuda(x, chunk, st, rewindable);
  const int64_t B = x.rows() / chunk, dk = p_ / heads_;
  Tensor up = up_.Forward(norm_.Forward(x));
  Tensor xm = SliceColumns(up, 0, p_), z = SliceColumns(up, p_, 2 * p_);
  Tensor xc = conv_.StepChunk(xm, chunk, &st->conv, rewindable ? &st->conv_history : nullptr);
  Tensor q = q_.Forward(xc), k = k_.Forward(xc), v = v_.Forward(xm);
  Tensor qkv = ConcatColumns({q, k, v});
  Tensor ig = igate_.Forward(qkv), fg = fgate_.Forward(qkv);
  Tensor h = Tensor::EmptyLike(xm);
  const cpu::MlstmOptions options = MlstmStepOptions(chunk_, sigmoid_forget_);
  DispatchFloat(x.dtype(), [&]<typename T>() {
    for (int64_t j = 0; j < chunk; ++j) {
      const int64_t r = j * B * p_, g = j * B * heads_;
      cpu::mlstm_step_fwd_ref<T>({B, 1, heads_, dk, dk}, options, q.data<T>() + r, k.data<T>() + r, v.data<T>() + r,
                                 ig.data<T>() + g, fg.data<T>() + g, {st->c.data<T>(), st->n.data<T>(), st->m.data<T>()},
                                 h.data<T>() + r);
      if (rewindable && j + 1 < chunk) st->cell_history.Record({&st->c, &st->n, &st->m});
    }
  });
  Tensor hs = Add(outnorm_.Forward(h), ScaleColumns(xc, skip_->value));
  Tensor y = Add(x, down_.Forward(Mul(hs, Activate(Activation::kSilu, z))));
  ReleaseActivations();
  return y;
}

void MlstmBlock::Rewind(BlockState* state, int64_t keep) {
  auto* st = static_cast<MlstmState*>(state);
  st->conv_history.Restore(keep, {&st->conv});
  st->cell_history.Restore(keep, {&st->c, &st->n, &st->m});
}

std::unique_ptr<BlockState> SlstmBlock::NewState(int64_t batch) const {
  const DType dt = bias_->value.dtype();
  auto st = std::make_unique<SlstmState>();
  st->conv = Tensor::Zeros({batch, conv_.width() - 1, d_}, dt);
  for (Tensor* t : {&st->h, &st->c, &st->n, &st->m}) *t = Tensor::Zeros({batch, d_}, dt);
  return st;
}

Tensor SlstmBlock::StepChunk(const Tensor& x, int64_t chunk, BlockState* state, bool rewindable) {
  auto* st = static_cast<SlstmState*>(state);
  st->cell_history.Clear();
  if (IsCuda(x)) return StepCuda(x, chunk, st, rewindable);
  const int64_t rows = x.rows(), B = rows / chunk, dh = d_ / heads_;
  Tensor u = norm_.Forward(x);
  Tensor xc = conv_.StepChunk(u, chunk, &st->conv, rewindable ? &st->conv_history : nullptr);
  Tensor gates[4] = {wi_.Forward(xc), wf_.Forward(xc), wz_.Forward(u), wo_.Forward(u)};
  Tensor gx = Tensor::Empty({rows, 4, d_}, x.dtype());
  Tensor h = Tensor::Empty({rows, d_}, x.dtype());
  DispatchFloat(x.dtype(), [&]<typename T>() {
    T* g = gx.data<T>();
    const T* b = bias_->value.data<T>();
    for (int k = 0; k < 4; ++k) {
      const T* src = gates[k].data<T>();
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < d_; ++c) g[(r * 4 + k) * d_ + c] = src[r * d_ + c] + b[k * d_ + c];
    }
    for (int64_t j = 0; j < chunk; ++j) {
      cpu::slstm_step_fwd_ref<T>({B, 1, heads_, dh}, g + j * B * 4 * d_, recurrent_->value.data<T>(),
                                 {st->h.data<T>(), st->c.data<T>(), st->n.data<T>(), st->m.data<T>()},
                                 h.data<T>() + j * B * d_);
      if (rewindable && j + 1 < chunk) st->cell_history.Record({&st->h, &st->c, &st->n, &st->m});
    }
  });
  Tensor x1 = Add(x, group_norm_.Forward(h));
  Tensor y = Add(x1, ffn_.Forward(ffn_norm_.Forward(x1)));
  ReleaseActivations();
  return y;
}

void SlstmBlock::Rewind(BlockState* state, int64_t keep) {
  auto* st = static_cast<SlstmState*>(state);
  st->conv_history.Restore(keep, {&st->conv});
  st->cell_history.Restore(keep, {&st->h, &st->c, &st->n, &st->m});
}

std::unique_ptr<BlockState> Mamba2Block::NewState(int64_t batch) const {
  const DType dt = a_log_->value.dtype();
  auto st = std::make_unique<Mamba2State>();
  st->conv = Tensor::Zeros({batch, conv_.width() - 1, conv_.channels()}, dt);
  st->ssm = Tensor::Zeros({batch, heads_, head_dim_, state_}, dt);
  return st;
}

Tensor Mamba2Block::StepChunk(const Tensor& x, int64_t chunk, BlockState* state, bool rewindable) {
  auto* st = static_cast<Mamba2State*>(state);
  st->cell_history.Clear();
  if (IsCuda(x)) return StepCuda(x, chunk, st, rewindable);
  const int64_t B = x.rows() / chunk, gn = groups_ * state_;
  Tensor zx = in_proj_.Forward(norm_.Forward(x));
  Tensor z = SliceColumns(zx, 0, di_);
  Tensor xbc = conv_.StepChunk(SliceColumns(zx, di_, 2 * di_ + 2 * gn), chunk, &st->conv,
                               rewindable ? &st->conv_history : nullptr);
  Tensor dt = SliceColumns(zx, 2 * di_ + 2 * gn, 2 * di_ + 2 * gn + heads_);
  Tensor xs = SliceColumns(xbc, 0, di_), b = SliceColumns(xbc, di_, di_ + gn), c = SliceColumns(xbc, di_ + gn, di_ + 2 * gn);
  Tensor y = Tensor::EmptyLike(xs);
  cpu::SsdOptions options;
  options.chunk_size = chunk_;
  DispatchFloat(x.dtype(), [&]<typename T>() {
    for (int64_t j = 0; j < chunk; ++j) {
      cpu::ssd_step_fwd_ref<T>({B, 1, heads_, head_dim_, groups_, state_}, options, xs.data<T>() + j * B * di_,
                               dt.data<T>() + j * B * heads_, a_log_->value.data<T>(), dt_bias_->value.data<T>(),
                               b.data<T>() + j * B * gn, c.data<T>() + j * B * gn, d_skip_->value.data<T>(),
                               st->ssm.data<T>(), y.data<T>() + j * B * di_);
      if (rewindable && j + 1 < chunk) st->cell_history.Record({&st->ssm});
    }
  });
  Tensor out = Add(x, out_proj_.Forward(gated_norm_.Forward(Mul(y, Activate(Activation::kSilu, z)))));
  ReleaseActivations();
  return out;
}

void Mamba2Block::Rewind(BlockState* state, int64_t keep) {
  auto* st = static_cast<Mamba2State*>(state);
  st->conv_history.Restore(keep, {&st->conv});
  st->cell_history.Restore(keep, {&st->ssm});
}

// ---------------------------------------------------------------- CUDA paths

const void* MlstmBlock::ZPtr() const { return up_fused_ ? BytePtr(xm_, p_) : z_.raw(); }

GroupNormArgs MlstmBlock::OutputNormArgs(const Tensor& h, const void* z, int64_t ldz, const Tensor& xc, int64_t rows,
                                          Tensor& mean, Tensor& rstd) {
  GroupNormArgs n;
  n.mode = NormMode::kMlstmOutput;
  n.layer = true;
  n.rows = rows; n.dim = p_; n.groups = heads_;
  n.eps = 1e-5f;
  n.weight_offset = 1.f;
  n.x = h.raw();
  n.weight = outnorm_.weight()->value.data<float>();
  n.z = z; n.ldz = ldz;
  n.skip = skip_->value.data<float>();
  n.xc = xc.raw();
  n.mean = mean.data<float>();
  n.rstd = rstd.data<float>();
  return n;
}

Tensor MlstmBlock::OutputNormCuda(const Tensor& h, const void* z, int64_t ldz, const Tensor& xc, int64_t rows,
                                  Tensor& mean, Tensor& rstd) {
  Tensor out = CudaEmpty({rows, p_});
  GroupNormArgs n = OutputNormArgs(h, z, ldz, xc, rows, mean, rstd);
  n.y = out.raw();
  Cuda().GroupNorm(false, n);
  return out;
}

void MlstmBlock::QkvGatesCuda(const Tensor& xc, const Tensor& xm, int64_t rows, Tensor& q, Tensor& k, Tensor& v,
                              Tensor& ig, Tensor& fg, const Conv1dArgs* conv, int64_t ldxm) {
  const int64_t p = p_;
  q = CudaEmpty({rows, p});
  k = CudaEmpty({rows, p});
  v = CudaEmpty({rows, p});
  ig = CudaEmpty({rows, heads_}, DType::kF32);
  fg = CudaEmpty({rows, heads_}, DType::kF32);
  // The gate pre-activations ride on the q/k/v maps (BlockDiagArgs::gates): the first launch
  // writes the bias, both add their columns' share (q at 0, k at p, v at 2p of the gate weights).
  MlstmGateArgs g;
  g.rows = rows; g.inner = p; g.heads = heads_;
  g.wi = igate_.weight()->value.data<float>();
  g.wf = fgate_.weight()->value.data<float>();
  g.ig = ig.data<float>();
  g.fg = fg.data<float>();
  MlstmGateArgs g_bias = g;
  g_bias.bi = igate_.bias()->value.data<float>();
  g_bias.bf = fgate_.bias()->value.data<float>();
  const int64_t bs = q_.weight()->value.dim(1);
  // q and k in one pass over x_c (the kernel's second map), then v from x_m.
  BlockDiagArgs maps[2];
  int m = 0;
  for (auto [src, layer, dst, layer2, dst2, gates, col] :
       {std::tuple{&xc, &q_, &q, &k_, &k, &g_bias, int64_t{0}},
        std::tuple{&xm, &v_, &v, (BlockDiagonalLinear*)nullptr, (Tensor*)nullptr, &g, 2 * p}}) {
    BlockDiagArgs a;
    a.rows = rows; a.blocks = p / bs; a.block_in = bs; a.block_out = bs;
    a.x = src->raw(); a.ldx = src == &xm && ldxm != 0 ? ldxm : p;
    a.w = layer->weight()->value.data<float>();
    a.y = dst->raw(); a.ldy = p;
    a.gates = gates;
    a.gate_col = col;
    if (layer2 != nullptr) {
      a.w2 = layer2->weight()->value.data<float>();
      a.y2 = dst2->raw();
      a.gate_col2 = p;
    }
    maps[m++] = a;
  }
  if (conv != nullptr) {
    Cuda().MlstmConvQkv(*conv, maps[0], maps[1]);
    return;
  }
  // Decode rows (<= 16): one launch for both maps and the gates, the same bits (cuda_infer.h
  // DecodeQkvOneLaunch); otherwise the two launches.
  Cuda().BlockDiagQkv(maps[0], maps[1]);
}

void MlstmBlock::ConvQkvGatesCuda(int64_t batch, int64_t seq, bool marks) {
  const int64_t rows = batch * seq;
  // Fused up projection: x_m is the first p columns of the GEMM's x_m | z, rows of 2p (0 = packed).
  const int64_t ldxm = up_fused_ ? XmLd() : 0;
  if (MlstmConvQkvFused()) {
    const Conv1dArgs conv = conv_.ForwardArgsCuda(xm_, batch, seq, &xc_, ldxm);
    QkvGatesCuda(xc_, xm_, rows, q_out_, k_out_, v_out_, ig_, fg_, &conv, ldxm);
    if (marks) ProfileMark("mlstm.fwd.conv_qkv_blockdiag_gates (fused)");
    return;
  }
  if (up_fused_) {
    Conv1dArgs conv = conv_.ForwardArgsCuda(xm_, batch, seq, &xc_, ldxm);
    if (rows > 0) Cuda().Conv1d(false, conv);  // (the backend packs the strided x first)
  } else {
    xc_ = conv_.Forward(xm_, batch, seq);
  }
  if (marks) ProfileMark("mlstm.fwd.conv");
  QkvGatesCuda(xc_, xm_, rows, q_out_, k_out_, v_out_, ig_, fg_, nullptr, ldxm);
  if (marks) ProfileMark("mlstm.fwd.qkv_blockdiag_gates");
}

Tensor MlstmBlock::ForwardCuda(const Tensor& x, int64_t batch, int64_t seq) {
  // The process-wide setting (environment, tests, benchmarks) overrides the model's, field by field.
  const MlstmRecomputeConfig config = GetMlstmRecompute();
  const int64_t keep_last = config.keep_last > 0 ? config.keep_last : configured_keep_last_;  // -1: auto
  const bool keep = keep_for_backward_ || (keep_last > 0 && layer_ >= 0 && layer_ >= n_layers_ - keep_last);
  const MlstmRecompute chosen = config.mode != MlstmRecompute::kNone ? config.mode : configured_;
  const MlstmRecompute mode = keep ? MlstmRecompute::kNone : chosen;
  Tensor y = ForwardCudaAll(x, batch, seq);
  mode_ = mode;
  freed_bytes_ = 0;
  if (mode == MlstmRecompute::kBlock) {
    // RecomputeBlock::Forward's release: only the input stays.
    ReleaseActivations();
    x_in_ = x;
  } else if (mode != MlstmRecompute::kNone) {
    const uint64_t held = Cuda().Memory().bytes_in_use;  // before the tokens_ copy (freed_bytes_)
    if (mode == MlstmRecompute::kGlue || mode == MlstmRecompute::kStates) x_in_ = x;
    if (mode == MlstmRecompute::kStates) {
      // The per-token part of saved the state recomputation cannot rebuild (den_t, h lo).
      MlstmCellArgs c;
      c.batch = batch; c.seq = seq; c.heads = heads_; c.dk = p_ / heads_; c.dv = p_ / heads_; c.chunk = chunk_;
      c.sigmoid_forget = sigmoid_forget_;
      tokens_ = CudaBytes(Cuda().MlstmTokenBytes(c));
      c.saved = saved_.raw(); c.tokens = tokens_.raw();
      Cuda().MlstmKeepTokens(c);
    }
    DropRecomputableCuda();
    // What this layer would hold more from here to its backward if it kept everything (the
    // tokens_ copy above counts against it): LanguageModel's keep_last "auto".
    freed_bytes_ = static_cast<int64_t>(held) - static_cast<int64_t>(Cuda().Memory().bytes_in_use);
  }
  return y;
}

void MlstmBlock::DropRecomputableCuda() {
  saved_ = mean_ = rstd_ = Tensor();
  if (mode_ != MlstmRecompute::kStates) h_ = Tensor();  // kStates keeps h (and tokens_)
  down_.ReleaseActivations();  // out, recomputed by the output norm
  if (mode_ == MlstmRecompute::kGlue || mode_ == MlstmRecompute::kStates) {
    u_ = xc_ = q_out_ = k_out_ = v_out_ = ig_ = fg_ = Tensor();
  }
}

Tensor MlstmBlock::RecomputeCellCuda() {
  const int64_t rows = batch_ * seq_, dk = p_ / heads_;
  if (mode_ == MlstmRecompute::kGlue || mode_ == MlstmRecompute::kStates) {
    ConvQkvGatesCuda(batch_, seq_, /*marks=*/false);
  }
  MlstmCellArgs c;
  c.batch = batch_; c.seq = seq_; c.heads = heads_; c.dk = dk; c.dv = dk; c.chunk = chunk_;
  c.sigmoid_forget = sigmoid_forget_;
  saved_ = CudaBytes(Cuda().MlstmSavedBytes(c));
  c.q = q_out_.raw(); c.k = k_out_.raw(); c.v = v_out_.raw();
  c.ig = ig_.data<float>(); c.fg = fg_.data<float>();
  c.saved = saved_.raw();
  if (mode_ == MlstmRecompute::kStates) {
    // h kept; the gate scan and state_fwd rebuild the forward's saved bytes (fwd_out not rerun).
    c.tokens = tokens_.raw();
    Cuda().MlstmRecomputeStates(c);
    tokens_ = Tensor();
  } else {
    h_ = CudaEmpty({rows, p_});
    c.h = h_.raw();
    Cuda().Mlstm(false, c);
  }
  mean_ = CudaEmpty({rows * heads_}, DType::kF32);
  rstd_ = CudaEmpty({rows * heads_}, DType::kF32);
  return OutputNormCuda(h_, ZPtr(), ZLd(), xc_, rows, mean_, rstd_);
}

Tensor MlstmBlock::ForwardCudaAll(const Tensor& x, int64_t batch, int64_t seq) {
  const int64_t rows = batch * seq, p = p_, dk = p_ / heads_;
  mode_ = MlstmRecompute::kNone;
  ProfileStart();
  u_ = norm_.Forward(x);
  ProfileMark("mlstm.fwd.norm");
  up_fused_ = MlstmUpFused();
  if (up_fused_) {
    // GYRE_MLSTM_UP=fused: x_m | z = u·Wᵀ in ONE GEMM (N = 2p); xm_ holds the [rows, 2p] output
    // (row stride 2p), z_ stays undefined (ZPtr: its columns p..2p).
    xm_ = LinearRowsForward(u_, up_, 0, 2 * p);
  } else {
    xm_ = LinearRowsForward(u_, up_, 0, p);
    z_ = LinearRowsForward(u_, up_, p, p);
  }
  ProfileMark("mlstm.fwd.up_proj");
  ConvQkvGatesCuda(batch, seq);
  MlstmCellArgs c;
  c.batch = batch; c.seq = seq; c.heads = heads_; c.dk = dk; c.dv = dk; c.chunk = chunk_;
  c.sigmoid_forget = sigmoid_forget_;
  saved_ = CudaBytes(Cuda().MlstmSavedBytes(c));
  h_ = CudaEmpty({rows, p});
  c.q = q_out_.raw(); c.k = k_out_.raw(); c.v = v_out_.raw();
  c.ig = ig_.data<float>(); c.fg = fg_.data<float>();
  c.h = h_.raw(); c.saved = saved_.raw();
  Cuda().Mlstm(false, c);
  ProfileMark("mlstm.fwd.cell");
  mean_ = CudaEmpty({rows * heads_}, DType::kF32);
  rstd_ = CudaEmpty({rows * heads_}, DType::kF32);
  Tensor out = OutputNormCuda(h_, ZPtr(), ZLd(), xc_, rows, mean_, rstd_);
  ProfileMark("mlstm.fwd.outnorm_skip_gate");
  // y = x + down(out): the residual add rides in the GEMM's store (beta 1), no separate pass.
  Tensor y = down_.ForwardAdd(out, x.Reshape({rows, d_})).Reshape(x.shape());
  ProfileMark("mlstm.fwd.down_proj_residual");
  return y;
}

Tensor MlstmBlock::BackwardCuda(const Tensor& dy) {
  const int64_t rows = batch_ * seq_, p = p_, dk = p_ / heads_;
  // kCell / kGlue: recompute what the forward dropped, and free every tensor once used.
  const bool lean =
      mode_ == MlstmRecompute::kCell || mode_ == MlstmRecompute::kGlue || mode_ == MlstmRecompute::kStates;
  const MlstmRecompute mode = mode_;
  ProfileStart();
  Tensor out;
  if (mode == MlstmRecompute::kBlock) {
    const Tensor x = x_in_;
    ForwardCudaAll(x, batch_, seq_);  // RecomputeBlock::Backward's forward
    ProfileMark("mlstm.bwd.recompute_block");
  } else if (lean) {
    out = RecomputeCellCuda();
    ProfileMark("mlstm.bwd.recompute_cell_outnorm");
  }
  // Linear::Backward's CUDA path on the recomputed input (same GEMMs, same first-write rule).
  Tensor dout = lean ? LinearBackward(out, down_.weight()->compute, dy.Reshape({rows, d_}), &down_.weight()->grad,
                                      FirstGradWrite(down_.weight()))
                     : down_.Backward(dy.Reshape({rows, d_}));
  out = Tensor();
  ProfileMark("mlstm.bwd.down_proj");
  // Fused up projection: dz goes into the last p columns of dup = dx_m | dz [rows, 2p] (row stride
  // 2p), dx_m into the first p (below), then ONE dx GEMM (K = 2p) and ONE dW GEMM; split: dz
  // [rows, p] and dx_m [rows, p] apart, two GEMMs each.
  const bool up_fused = up_fused_;
  Tensor dh = CudaEmpty({rows, p}), dxc = CudaEmpty({rows, p});
  Tensor dz, dup;
  if (up_fused) {
    dup = CudaEmpty({rows, 2 * p});
  } else {
    dz = CudaEmpty({rows, p});
  }
  GroupNormArgs n = OutputNormArgs(h_, ZPtr(), ZLd(), xc_, rows, mean_, rstd_);
  n.dy = dout.raw();
  n.dx = dh.raw(); n.dxc = dxc.raw();
  if (up_fused) {
    n.dz = MutBytePtr(dup, p);
    n.lddz = static_cast<int32_t>(2 * p);
  } else {
    n.dz = dz.raw();
  }
  n.dweight = outnorm_.weight()->grad.data<float>();
  n.dskip = skip_->grad.data<float>();
  n.overwrite_dparams = FirstWriteOverRows(rows, {outnorm_.weight(), skip_});
  MlstmCellArgs c;
  c.batch = batch_; c.seq = seq_; c.heads = heads_; c.dk = dk; c.dv = dk; c.chunk = chunk_;
  c.sigmoid_forget = sigmoid_forget_;
  c.q = q_out_.raw(); c.k = k_out_.raw(); c.v = v_out_.raw();
  c.ig = ig_.data<float>(); c.fg = fg_.data<float>();
  c.h = h_.raw(); c.saved = saved_.raw();
  c.dh = dh.raw();
  // GYRE_MLSTM_DH_DOT=norm: the norm backward, which writes dh and reads h, also forms the cell's
  // per-token dh·(h + h_lo), so the cell's bwd_prep does not read dh, h, h_lo again.
  Tensor dh_dots;
  if (MlstmDhDotInNorm()) {
    dh_dots = CudaEmpty({rows, heads_}, DType::kF32);
    if (Cuda().MlstmOutNormBackwardWithDots(n, Cuda().MlstmSavedHLo(c), dh_dots.data<float>())) {
      c.dh_dots = dh_dots.data<float>();
    }
  } else {
    Cuda().GroupNorm(true, n);
  }
  ProfileMark("mlstm.bwd.outnorm_skip_gate");
  if (lean) dout = Tensor();
  Tensor dq = CudaEmpty({rows, p}), dkk = CudaEmpty({rows, p}), dv = CudaEmpty({rows, p});
  Tensor dig = CudaEmpty({rows, heads_}, DType::kF32), dfg = CudaEmpty({rows, heads_}, DType::kF32);
  c.dq = dq.raw(); c.dk_out = dkk.raw(); c.dv_out = dv.raw();
  c.dig = dig.data<float>(); c.dfg = dfg.data<float>();
  Cuda().Mlstm(true, c);
  ProfileMark("mlstm.bwd.cell");
  if (lean) saved_ = h_ = q_out_ = k_out_ = v_out_ = ig_ = fg_ = mean_ = rstd_ = dh = dh_dots = Tensor();
  // The gates' backward rides on the q/k/v block-diagonal backward (which reads dq, dk, dv
  // anyway): dq/dk/dv get dgate·W on the fly, never stored; the bias sums on the second launch.
  MlstmGateArgs g;
  g.rows = rows; g.inner = p; g.heads = heads_;
  g.wi = igate_.weight()->value.data<float>();
  g.wf = fgate_.weight()->value.data<float>();
  g.dig = dig.data<float>(); g.dfg = dfg.data<float>();
  g.dwi = igate_.weight()->grad.data<float>();
  g.dwf = fgate_.weight()->grad.data<float>();
  // The two launches write disjoint columns of dwi / dwf (q, k, then v): both overwrite on the
  // step's first write. The bias sums come with the second launch only.
  g.overwrite_dw = FirstWriteOverRows(rows, {igate_.weight(), fgate_.weight()});
  MlstmGateArgs g_bias = g;
  g_bias.dbi = igate_.bias()->grad.data<float>();
  g_bias.dbf = fgate_.bias()->grad.data<float>();
  g_bias.overwrite_db = FirstWriteOverRows(rows, {igate_.bias(), fgate_.bias()});
  const int64_t bs = q_.weight()->value.dim(1);
  // ldx: the row stride of src and dst (x_m and dx_m: 2p when the up projection is fused).
  auto qkv_backward_args = [&](const Tensor& src, BlockDiagonalLinear& layer, const Tensor& d,
                               BlockDiagonalLinear* layer2, const Tensor* d2, void* dst, const MlstmGateArgs& gates,
                               int64_t col, int64_t ldx) {
    BlockDiagArgs a;
    a.rows = rows; a.blocks = p / bs; a.block_in = bs; a.block_out = bs;
    a.x = src.raw(); a.ldx = ldx;
    a.w = layer.weight()->value.data<float>();
    a.ldy = p;
    a.dy = d.raw();
    a.dx = dst;
    a.accumulate_dx = true;
    a.dw = layer.weight()->grad.data<float>();
    a.overwrite_dw = FirstWriteOverRows(rows, {layer.weight()});
    a.gates = &gates;
    a.gate_col = col;
    if (layer2 != nullptr) {
      a.w2 = layer2->weight()->value.data<float>();
      a.dy2 = d2->raw();
      a.dw2 = layer2->weight()->grad.data<float>();
      a.overwrite_dw2 = FirstWriteOverRows(rows, {layer2->weight()});
      a.gate_col2 = p;
    }
    return a;
  };
  // dx_c += dq·Wq + dk·Wk in one pass (and dWq, dWk; gate columns q at 0, k at p); then the conv
  // backward's dx_m, into which the v map adds dv·Wv (gate columns at 2p) — no separate sum.
  const BlockDiagArgs qk = qkv_backward_args(xc_, q_, dq, &k_, &dkk, dxc.raw(), g, 0, p);
  if (GetMlstmQkBwd() == MlstmQkBwd::kTc) {
    Cuda().BlockDiagBackwardTc(qk);
  } else {
    Cuda().BlockDiag(true, qk);
  }
  ProfileMark("mlstm.bwd.qk_blockdiag_gates");
  if (lean) dq = dkk = Tensor();
  // dx_m: its own [rows, p] (split), or the first p columns of dup (fused; x_m read in rows of 2p).
  Tensor dxm;
  if (!up_fused) dxm = CudaEmpty({rows, p});
  void* const dxm_at = up_fused ? dup.raw() : dxm.raw();
  const int64_t ldm = XmLd();
  if (MlstmConvVBwdFused()) {
    // Fusion C (ops/XLSTM_GLUE.md): the conv backward and the v map's in one pass; dxm once.
    const Conv1dArgs conv = conv_.BackwardArgsCuda(dxc, dxm_at, up_fused ? ldm : 0);
    Cuda().MlstmConvVBackward(conv, qkv_backward_args(xm_, v_, dv, nullptr, nullptr, dxm_at, g_bias, 2 * p, ldm));
    ProfileMark("mlstm.bwd.conv_v_blockdiag_gates (fused)");
    if (lean) dxc = xc_ = Tensor();
  } else {
    conv_.BackwardInto(dxc, dxm_at, up_fused ? ldm : 0);
    ProfileMark("mlstm.bwd.conv");
    if (lean) dxc = xc_ = Tensor();
    Cuda().BlockDiag(true, qkv_backward_args(xm_, v_, dv, nullptr, nullptr, dxm_at, g_bias, 2 * p, ldm));
    ProfileMark("mlstm.bwd.v_blockdiag_gates");
  }
  if (lean) dv = dig = dfg = Tensor();
  if (mode == MlstmRecompute::kGlue || mode == MlstmRecompute::kStates) {
    u_ = norm_.Forward(x_in_);  // the norm's saved input and statistics are replaced by equal ones
    ProfileMark("mlstm.bwd.recompute_norm");
  }
  Tensor du;
  const bool up_first = FirstWriteOverRows(rows, {up_.weight()});  // rows [0, p) and [p, 2p): all of dW
  if (up_fused) {
    LinearRowsBackward(u_, up_, 0, dup, &du, false, up_first);  // K = 2p; dW [2p, d] in one
  } else {
    LinearRowsBackward(u_, up_, 0, dxm, &du, false, up_first);
    LinearRowsBackward(u_, up_, p, dz, &du, true, up_first);
  }
  ProfileMark("mlstm.bwd.up_proj");
  if (lean) dxm = dz = dup = u_ = xm_ = z_ = Tensor();
  Tensor dx = norm_.BackwardAdd(du.Reshape(dy.shape()), dy);
  ProfileMark("mlstm.bwd.norm_residual");
  ReleaseActivations();
  return dx;
}

Tensor SlstmBlock::ForwardCuda(const Tensor& x, int64_t batch, int64_t seq) {
  const int64_t rows = batch * seq, d = d_, dh = d_ / heads_;
  ProfileStart();
  u_ = norm_.Forward(x).Reshape({rows, d});
  ProfileMark("slstm.fwd.norm");
  xc_ = conv_.Forward(u_, batch, seq);
  ProfileMark("slstm.fwd.conv");
  // The four gate projections, per (gate, head), straight into the cell's [B, S, 4, d] layout.
  gx_ = CudaEmpty({rows, 4 * d});
  BlockDiagonalLinear* w[4] = {&wi_, &wf_, &wz_, &wo_};
  for (int k = 0; k < 4; ++k) {
    const Tensor& src = k < 2 ? xc_ : u_;
    for (int64_t h = 0; h < heads_; ++h) {
      Mm(false, true, rows, dh, dh, BytePtr(src, h * dh), d, BytePtr(w[k]->weight()->compute, h * dh * dh), dh,
         MutBytePtr(gx_, k * d + h * dh), 4 * d, false, 0.f);
    }
  }
  Cuda().AddColumnBias(gx_.raw(), rows, 4 * d, 4 * d, bias_->value.data<float>());
  ProfileMark("slstm.fwd.gate_proj");
  SlstmCellArgs c;
  c.batch = batch; c.seq = seq; c.heads = heads_; c.head_dim = dh;
  saved_ = CudaBytes(Cuda().SlstmSavedBytes(c));
  h_ = CudaEmpty({batch, seq, d});
  c.gx = gx_.raw();
  c.r = recurrent_->compute.raw();
  c.h = h_.raw();
  c.saved = saved_.raw();
  Cuda().Slstm(false, c);
  ProfileMark("slstm.fwd.cell");
  Tensor x1 = Add(x, group_norm_.Forward(h_));
  ProfileMark("slstm.fwd.groupnorm_residual");
  Tensor y = ffn_.ForwardAdd(ffn_norm_.Forward(x1), x1);  // the residual add in the down GEMM
  ProfileMark("slstm.fwd.ffn");
  return y;
}

Tensor SlstmBlock::BackwardCuda(const Tensor& dy) {
  const int64_t rows = batch_ * seq_, d = d_, dh = d_ / heads_;
  ProfileStart();
  Tensor dx1 = ffn_norm_.BackwardAdd(ffn_.Backward(dy), dy);  // dy added inside the norm backward
  ProfileMark("slstm.bwd.ffn");
  Tensor dhh = group_norm_.Backward(dx1);
  ProfileMark("slstm.bwd.groupnorm");
  Tensor dgx = CudaEmpty({rows, 4 * d});
  SlstmCellArgs c;
  c.batch = batch_; c.seq = seq_; c.heads = heads_; c.head_dim = dh;
  c.r = recurrent_->compute.raw();
  c.h = h_.raw();
  c.saved = saved_.raw();
  c.dh = dhh.raw();
  c.dgx = dgx.raw();
  c.dr = recurrent_->grad.data<float>();
  // The cell (kernels/cuda/slstm.h) accumulates dR, ColumnSum adds into dbias: one memset for both
  // (created one after the other).
  ZeroStaleGradsTogether({bias_, recurrent_});
  Cuda().Slstm(true, c);
  ProfileMark("slstm.bwd.cell");
  Cuda().ColumnSum(dgx.raw(), rows, 4 * d, 4 * d, bias_->grad.data<float>());
  Tensor dxc = CudaEmpty({rows, d}), du = CudaEmpty({rows, d});
  BlockDiagonalLinear* w[4] = {&wi_, &wf_, &wz_, &wo_};
  for (int k = 0; k < 4; ++k) {
    const Tensor& src = k < 2 ? xc_ : u_;
    Tensor& dst = k < 2 ? dxc : du;
    const float beta = (k == 0 || k == 2) ? 0.f : 1.f;
    const float dw_beta = FirstWriteOverRows(rows, {w[k]->weight()}) ? 0.f : 1.f;  // the heads' blocks cover dW
    for (int64_t h = 0; h < heads_; ++h) {
      const void* dg = BytePtr(dgx, k * d + h * dh);
      Mm(false, false, rows, dh, dh, dg, 4 * d, BytePtr(w[k]->weight()->compute, h * dh * dh), dh,
         MutBytePtr(dst, h * dh), d, false, beta);
      Mm(true, false, dh, dh, rows, dg, 4 * d, BytePtr(src, h * dh), d,
         MutBytePtr(w[k]->weight()->grad, h * dh * dh), dh, true, dw_beta);
    }
  }
  ProfileMark("slstm.bwd.gate_proj");
  AddInPlace(&du, conv_.Backward(dxc));
  ProfileMark("slstm.bwd.conv");
  Tensor dx = norm_.BackwardAdd(du.Reshape(dy.shape()), dx1);
  ProfileMark("slstm.bwd.norm_residual");
  ReleaseActivations();
  return dx;
}

Tensor Mamba2Block::ForwardCuda(const Tensor& x, int64_t batch, int64_t seq) {
  const int64_t rows = batch * seq, gn = groups_ * state_, cx = di_ + 2 * gn;
  ProfileStart();
  u_ = norm_.Forward(x).Reshape({rows, d_});
  ProfileMark("mamba2.fwd.norm");
  z_ = LinearRowsForward(u_, in_proj_, 0, di_);
  Tensor xbc_in = LinearRowsForward(u_, in_proj_, di_, cx);
  dt_ = LinearRowsForward(u_, in_proj_, di_ + cx, heads_, /*f32=*/true);
  ProfileMark("mamba2.fwd.in_proj");
  // On this path xs_ holds the whole conv output [rows, di + 2·G·N] = x | B | C (b_, c_ stay
  // undefined): the SSD reads the three column slices in place through its row strides, and
  // the backward writes dx | dB | dC the same way, so there are no slice / concat copies.
  xs_ = conv_.Forward(xbc_in, batch, seq);
  ProfileMark("mamba2.fwd.conv");
  SsdCellArgs a;
  a.batch = batch; a.seq = seq; a.heads = heads_; a.head_dim = head_dim_; a.groups = groups_; a.state = state_;
  a.chunk = chunk_;
  saved_ = CudaBytes(Cuda().SsdSavedBytes(a));
  y_ = CudaEmpty({rows, di_});
  a.x = xs_.raw(); a.dt = dt_.data<float>();
  a.a_log = a_log_->value.data<float>(); a.dt_bias = dt_bias_->value.data<float>();
  a.b = BytePtr(xs_, di_); a.c = BytePtr(xs_, di_ + gn); a.d = d_skip_->value.data<float>();
  a.x_row_stride = a.bc_row_stride = cx;
  a.y = y_.raw(); a.saved = saved_.raw();
  Cuda().Ssd(false, a);
  ProfileMark("mamba2.fwd.ssd");
  // RMSNorm_G(y ⊙ SiLU(z)), one kernel.
  Tensor gnorm = CudaEmpty({rows, di_});
  rstd_ = CudaEmpty({rows * groups_}, DType::kF32);
  GroupNormArgs n;
  n.mode = NormMode::kGatedInput;
  n.layer = false;
  n.rows = rows; n.dim = di_; n.groups = groups_;
  n.eps = 1e-5f;
  n.x = y_.raw();
  n.weight = gated_norm_.weight()->value.data<float>();
  n.z = z_.raw(); n.ldz = di_;
  n.y = gnorm.raw();
  n.rstd = rstd_.data<float>();
  Cuda().GroupNorm(false, n);
  ProfileMark("mamba2.fwd.gated_norm");
  // y = x + out_proj(gnorm), the add in the GEMM's store.
  Tensor y = out_proj_.ForwardAdd(gnorm, x.Reshape({rows, d_})).Reshape(x.shape());
  ProfileMark("mamba2.fwd.out_proj_residual");
  return y;
}

namespace {

// The in_proj backward: the gated norm, the conv and the dt conversion write dz | dxBC | ddt into
// one bf16 [rows, d_inner + conv channels + heads] gradient, then ONE du GEMM (K = all in_proj
// rows) and ONE dW GEMM over the whole weight (helper mproj12). It replaced the split backward
// (three row blocks z, xBC, dt: three du GEMMs, the 2nd and 3rd re-reading du with beta 1, and
// three dW GEMMs), deleted after losing on 2026-11-27: mamba2-130m B16 x 2048 on one H100 80GB
// HBM3, alternating in one process, split 102.44 ms vs fused 100.79 ms a step (-1.6%; predicted
// -1.8%). in_proj GEMMs a step: fused du 6.014 + dW 5.521 ms vs split 3.483 + 3.216 + 2.884 +
// 2.758 + 1.379 + 0.805 ms; what the writers cost instead: gated norm bwd 4.94 -> 5.09, conv bwd
// 3.76 -> 3.94, + the ddt copy (Copy2D) 0.57 ms.
// GYRE_MAMBA_IN_BWD (read once): unset or "fused"; any other value ("split" included) is an error.
void CheckMamba2InProjSwitch() {
  static const bool checked = [] {
    const char* v = std::getenv("GYRE_MAMBA_IN_BWD");
    const std::string s = v != nullptr ? v : "";
    GYRE_CHECK(s.empty() || s == "fused",
               "GYRE_MAMBA_IN_BWD must be fused (or unset; split was deleted), got '%s'", s.c_str());
    return true;
  }();
  (void)checked;
}

// The row stride of din [rows, kin] (helper m2130, session 21). kin = d_inner + conv channels +
// heads is 3352 at mamba2-130m, so packed rows (6704 bytes) start at 16-byte but not 128-byte
// boundaries, and every 64-element (128-byte) K box the du GEMM's TMA loads from a row straddles
// two 128-byte lines; the dW GEMM reads the same rows as its A. The stride is padded to a multiple
// of 64 elements (3392: rows of 6784 bytes, every one on a 128-byte boundary); the padding columns
// are never written nor read (K of du and M of dW stay kin), so no FLOPs and +1.2% transient bytes.
// cuBLASLt keeps the same kernels (a66 t24 / t29); measured on one H100 80GB HBM3 (gemm_notes.md
// session 21, call 2): du + dW + the writers (gated norm bwd, conv bwd, ConvertRows) -0.2 to -0.5 ms
// a step in every alternation, step median 90.04 -> 89.50 ms (4 of 4 rounds). Padding to 128
// (3456) gave the same per-op times and 1 of 4 step rounds: not kept.
// GYRE_MAMBA_DIN_LD, read at every backward (the stride is part of the GEMM plans' key, so one
// process can alternate): unset or "64" = kin rounded up to 64, "packed" = kin (the previous
// stride, for A/B); anything else is an error naming the accepted values.
int64_t Mamba2InGradStride(int64_t kin) {
  const char* v = std::getenv("GYRE_MAMBA_DIN_LD");
  const std::string s = v != nullptr ? v : "";
  GYRE_CHECK(s.empty() || s == "64" || s == "packed",
             "GYRE_MAMBA_DIN_LD must be 64 or packed (or unset = 64), got '%s'", s.c_str());
  if (s == "packed") return kin;
  return (kin + 63) / 64 * 64;
}

}  // namespace

Tensor Mamba2Block::BackwardCuda(const Tensor& dy) {
  const int64_t rows = batch_ * seq_, gn = groups_ * state_, cx = di_ + 2 * gn;
  ProfileStart();
  Tensor dg = out_proj_.Backward(dy.Reshape({rows, d_}));
  ProfileMark("mamba2.bwd.out_proj");
  // din [rows, di + cx + H] = dz | dxBC | ddt (bf16), the whole in_proj output's gradient.
  CheckMamba2InProjSwitch();
  const int64_t kin = di_ + cx + heads_, ldin = Mamba2InGradStride(kin);
  Tensor din = CudaEmpty({rows, ldin});  // columns kin..ldin: row padding, never written nor read
  Tensor dyy = CudaEmpty({rows, di_});
  GroupNormArgs n;
  n.mode = NormMode::kGatedInput;
  n.layer = false;
  n.rows = rows; n.dim = di_; n.groups = groups_;
  n.eps = 1e-5f;
  n.x = y_.raw();
  n.weight = gated_norm_.weight()->value.data<float>();
  n.z = z_.raw(); n.ldz = di_;
  n.rstd = rstd_.data<float>();
  n.dy = dg.raw();
  n.dx = dyy.raw();
  n.dz = din.raw();
  n.lddz = static_cast<int32_t>(ldin);
  n.dweight = gated_norm_.weight()->grad.data<float>();
  n.overwrite_dparams = FirstWriteOverRows(rows, {gated_norm_.weight()});
  Cuda().GroupNorm(true, n);
  ProfileMark("mamba2.bwd.gated_norm");
  // dx | dB | dC straight into the conv output's gradient (row stride cx; see ForwardCuda).
  Tensor dxbc_out = CudaEmpty({rows, cx});
  Tensor ddt = CudaEmpty({rows, heads_}, DType::kF32);
  SsdCellArgs a;
  a.batch = batch_; a.seq = seq_; a.heads = heads_; a.head_dim = head_dim_; a.groups = groups_; a.state = state_;
  a.chunk = chunk_;
  a.x = xs_.raw(); a.dt = dt_.data<float>();
  a.a_log = a_log_->value.data<float>(); a.dt_bias = dt_bias_->value.data<float>();
  a.b = BytePtr(xs_, di_); a.c = BytePtr(xs_, di_ + gn); a.d = d_skip_->value.data<float>();
  a.x_row_stride = a.bc_row_stride = cx;
  a.saved = saved_.raw();
  a.dy = dyy.raw();
  a.dx = dxbc_out.raw(); a.ddt = ddt.data<float>();
  a.db = MutBytePtr(dxbc_out, di_); a.dc = MutBytePtr(dxbc_out, di_ + gn);
  a.da_log = a_log_->grad.data<float>(); a.ddt_bias = dt_bias_->grad.data<float>(); a.dd = d_skip_->grad.data<float>();
  ZeroStaleGradsTogether({a_log_, dt_bias_, d_skip_});  // the SSD kernel accumulates (one memset: adjacent)
  Cuda().Ssd(true, a);
  ProfileMark("mamba2.bwd.ssd");
  conv_.BackwardInto(dxbc_out, MutBytePtr(din, di_), ldin);
  ProfileMark("mamba2.bwd.conv");
  Tensor du;
  const bool in_first = FirstWriteOverRows(rows, {in_proj_.weight()});  // rows z | xBC | dt: all of dW
  // ddt (f32) rounded to bf16 straight into its H columns of din (ConvertRows; it replaced a
  // Convert plus a Copy2D of 48-byte rows that cost 0.57 ms a mamba2-130m step); then one du GEMM
  // over K = kin and one dW GEMM over all kin rows of W (dW = dinᵀ u sets every element: the
  // deferred-zero first write overwrites).
  Cuda().ConvertRows(ddt.raw(), DType::kF32, heads_, MutBytePtr(din, di_ + cx), DType::kBF16, ldin, rows, heads_);
  LinearRowsBackward(u_, in_proj_, 0, din, &du, false, in_first, kin);
  ProfileMark("mamba2.bwd.in_proj");
  Tensor dx = norm_.BackwardAdd(du.Reshape(dy.shape()), dy);
  ProfileMark("mamba2.bwd.norm_residual");
  ReleaseActivations();
  return dx;
}

}  // namespace gyre::ops
