// CUDA incremental decoding of the recurrent blocks (Block::Step on CUDA tensors): the same
// layers as each block's ForwardCuda (ops/recurrent_blocks.cc) at one token, with the cell's
// one-step kernel (ops/cuda_infer.h: conv1d window, SSD state, sLSTM, mLSTM) in place of the
// sequence kernel. States stay fp32 on the device; the CPU-made zero states of NewState are
// moved there on the first step (fp32, exact). Stepping equals the full forward up to bf16
// rounding (decode_gpu_test checks both against the CPU in float64).
#include "ops/cuda_backend.h"
#include "ops/cuda_infer.h"
#include "ops/recurrent_blocks.h"

namespace gyre::ops {
namespace {

void OnDevice(Tensor* t) {
  if (!IsCuda(*t)) *t = t->To(DType::kF32).ToDevice(Device::kCuda);
}

const void* Bytes(const Tensor& t, int64_t elements) {
  return static_cast<const char*>(t.raw()) + elements * static_cast<int64_t>(DTypeSize(t.dtype()));
}

// y [rows, n] = x [rows, k] · W[r0 : r0 + n, :]ᵀ (W the bf16 compute copy [*, k]); y bf16 or f32.
Tensor RowsGemm(const Tensor& x, const Parameter& w, int64_t r0, int64_t n, bool f32) {
  const int64_t rows = x.rows(), k = x.cols();
  Tensor y = Tensor::Empty({rows, n}, f32 ? DType::kF32 : DType::kBF16, Device::kCuda);
  CudaGemm g;
  g.trans_b = true;
  g.m = rows; g.n = n; g.k = k;
  g.a = x.raw(); g.lda = k;
  g.b = Bytes(w.compute, r0 * k); g.ldb = k;
  g.c = y.raw(); g.ldc = n; g.c_f32 = f32;
  Cuda().Gemm(g);
  return y;
}

}  // namespace

Tensor CausalConv1d::StepCuda(const Tensor& x, Tensor* state, Tensor* y_out) {
  GYRE_CHECK(x.dtype() == DType::kBF16 && x.cols() == channels_, "conv1d step: CUDA x %s", ShapeString(x.shape()).c_str());
  OnDevice(state);
  GYRE_CHECK(state->numel() == x.rows() * (width_ - 1) * channels_, "conv1d step: state %s",
             ShapeString(state->shape()).c_str());
  Tensor y = y_out != nullptr ? *y_out : Tensor::Empty({x.rows(), channels_}, DType::kBF16, Device::kCuda);
  CudaConv1dStepArgs a;
  a.batch = x.rows(); a.channels = channels_; a.width = width_; a.silu = silu_;
  a.x = x.raw(); a.ldx = channels_;
  a.w = weight_->value.data<float>();
  a.bias = bias_->value.data<float>();
  a.state = state->data<float>();
  a.y = y.raw();
  if (a.batch > 0) CudaInfer().Conv1dStep(a);
  return y;
}

Tensor Mamba2Block::StepCuda(const Tensor& x, int64_t chunk, Mamba2State* st, bool rewindable) {
  const int64_t rows = x.rows(), B = rows / chunk, gn = groups_ * state_, cx = di_ + 2 * gn;
  Tensor* ssm = &st->ssm;
  OnDevice(ssm);
  Tensor u = norm_.Forward(x);
  Tensor z = RowsGemm(u, *in_proj_.weight(), 0, di_, false);
  Tensor xbc_in = RowsGemm(u, *in_proj_.weight(), di_, cx, false);
  Tensor dt = RowsGemm(u, *in_proj_.weight(), di_ + cx, heads_, /*f32=*/true);
  Tensor xbc = conv_.StepChunk(xbc_in, chunk, &st->conv, rewindable ? &st->conv_history : nullptr);
  Tensor y = Tensor::Empty({rows, di_}, DType::kBF16, Device::kCuda);
  for (int64_t j = 0; j < chunk; ++j) {
    // Position j: rows j*B .. (j+1)*B of every operand.
    CudaSsdStepArgs s;
    s.batch = B; s.heads = heads_; s.head_dim = head_dim_; s.groups = groups_; s.state_dim = state_;
    s.x = Bytes(xbc, j * B * cx); s.b = Bytes(xbc, j * B * cx + di_); s.c = Bytes(xbc, j * B * cx + di_ + gn);
    s.ld_xbc = cx;
    s.dt = dt.data<float>() + j * B * heads_;
    s.a_log = a_log_->value.data<float>(); s.dt_bias = dt_bias_->value.data<float>(); s.d = d_skip_->value.data<float>();
    s.state = ssm->data<float>();
    s.y = const_cast<void*>(Bytes(y, j * B * di_));
    CudaInfer().SsdStep(s);
    if (rewindable && j + 1 < chunk) st->cell_history.Record({ssm});
  }
  // RMSNorm_G(y ⊙ SiLU(z)), as ForwardCuda.
  Tensor gnorm = Tensor::Empty({rows, di_}, DType::kBF16, Device::kCuda);
  Tensor rstd = Tensor::Empty({rows * groups_}, DType::kF32, Device::kCuda);
  GroupNormArgs n;
  n.mode = NormMode::kGatedInput;
  n.rows = rows; n.dim = di_; n.groups = groups_;
  n.eps = 1e-5f;
  n.x = y.raw();
  n.weight = gated_norm_.weight()->value.data<float>();
  n.z = z.raw(); n.ldz = di_;
  n.y = gnorm.raw();
  n.rstd = rstd.data<float>();
  Cuda().GroupNorm(false, n);
  Tensor out = Add(x, out_proj_.Forward(gnorm).Reshape(x.shape()));
  ReleaseActivations();
  return out;
}

Tensor MlstmBlock::StepCuda(const Tensor& x, int64_t chunk, MlstmState* st, bool rewindable) {
  const int64_t B = x.rows(), p = p_, dk = p_ / heads_, per = B / chunk;
  Tensor *c = &st->c, *n = &st->n, *m = &st->m;
  for (Tensor* t : {c, n, m}) OnDevice(t);
  Tensor u = norm_.Forward(x);
  Tensor xm = RowsGemm(u, *up_.weight(), 0, p, false);
  Tensor z = RowsGemm(u, *up_.weight(), p, p, false);
  Tensor xc = conv_.StepChunk(xm, chunk, &st->conv, rewindable ? &st->conv_history : nullptr);
  Tensor q, k, v, ig, fg;
  QkvGatesCuda(xc, xm, B, q, k, v, ig, fg);
  Tensor h = Tensor::Empty({B, p}, DType::kBF16, Device::kCuda);
  for (int64_t j = 0; j < chunk; ++j) {
    const int64_t r = j * per * p;
    CudaMlstmStepArgs s;
    s.batch = per; s.heads = heads_; s.dk = dk; s.dv = dk; s.sigmoid_forget = sigmoid_forget_;
    s.q = Bytes(q, r); s.k = Bytes(k, r); s.v = Bytes(v, r);
    s.ig = ig.data<float>() + j * per * heads_; s.fg = fg.data<float>() + j * per * heads_;
    s.c = c->data<float>(); s.n = n->data<float>(); s.m = m->data<float>();
    s.h = const_cast<void*>(Bytes(h, r));
    CudaInfer().MlstmStep(s);
    if (rewindable && j + 1 < chunk) st->cell_history.Record({c, n, m});
  }
  Tensor mean = Tensor::Empty({B * heads_}, DType::kF32, Device::kCuda);
  Tensor rstd = Tensor::Empty({B * heads_}, DType::kF32, Device::kCuda);
  Tensor out = OutputNormCuda(h, z, xc, B, mean, rstd);
  Tensor y = Add(x, down_.Forward(out).Reshape(x.shape()));
  ReleaseActivations();
  return y;
}

Tensor SlstmBlock::StepCuda(const Tensor& x, int64_t chunk, SlstmState* st, bool rewindable) {
  const int64_t B = x.rows(), d = d_, dh = d_ / heads_, per = B / chunk;
  Tensor *h = &st->h, *c = &st->c, *n = &st->n, *m = &st->m;
  for (Tensor* t : {h, c, n, m}) OnDevice(t);
  Tensor u = norm_.Forward(x);
  Tensor xc = conv_.StepChunk(u, chunk, &st->conv, rewindable ? &st->conv_history : nullptr);
  // The four gate projections per (gate, head) into [B, 4, d], as ForwardCuda.
  Tensor gx = Tensor::Empty({B, 4 * d}, DType::kBF16, Device::kCuda);
  BlockDiagonalLinear* w[4] = {&wi_, &wf_, &wz_, &wo_};
  for (int k = 0; k < 4; ++k) {
    const Tensor& src = k < 2 ? xc : u;
    for (int64_t hd = 0; hd < heads_; ++hd) {
      CudaGemm g;
      g.trans_b = true;
      g.m = B; g.n = dh; g.k = dh;
      g.a = Bytes(src, hd * dh); g.lda = d;
      g.b = Bytes(w[k]->weight()->compute, hd * dh * dh); g.ldb = dh;
      g.c = const_cast<void*>(Bytes(gx, k * d + hd * dh)); g.ldc = 4 * d;
      Cuda().Gemm(g);
    }
  }
  Cuda().AddColumnBias(gx.raw(), B, 4 * d, 4 * d, bias_->value.data<float>());
  Tensor hb = Tensor::Empty({B, d}, DType::kBF16, Device::kCuda);
  for (int64_t j = 0; j < chunk; ++j) {
    CudaSlstmStepArgs s;
    s.batch = per; s.heads = heads_; s.head_dim = dh;
    s.gx = Bytes(gx, j * per * 4 * d); s.r = recurrent_->compute.raw();
    s.h = h->data<float>(); s.c = c->data<float>(); s.n = n->data<float>(); s.m = m->data<float>();
    s.h_out = const_cast<void*>(Bytes(hb, j * per * d));
    CudaInfer().SlstmStep(s);
    if (rewindable && j + 1 < chunk) st->cell_history.Record({h, c, n, m});
  }
  Tensor x1 = Add(x, group_norm_.Forward(hb).Reshape(x.shape()));
  Tensor y = Add(x1, ffn_.Forward(ffn_norm_.Forward(x1)));
  ReleaseActivations();
  return y;
}

}  // namespace gyre::ops
