// CUDA incremental decoding of the recurrent blocks (Block::Step on CUDA tensors): the same
// layers as each block's ForwardCuda (ops/recurrent_blocks.cc) at one token, with the cell's
// step kernel (ops/cuda_infer.h: conv1d window, SSD state, sLSTM, mLSTM) in place of the
// sequence kernel. States stay fp32 on the device; the CPU-made zero states of NewState are
// moved there on the first step (fp32, exact). Stepping equals the full forward up to bf16
// rounding (decode_gpu_test checks both against the CPU in float64).
// A chunk of k positions (DecodeChunk) runs every weight once over all k·B rows and the conv
// window, SSD, mLSTM and sLSTM cells in ONE launch each for all k positions (kernels/cuda/ssm_step.h);
// a rewindable chunk has the kernels also write the state after positions 0..k-2 into one
// buffer whose views the StateHistory adopts, so Rewind swaps handles (no copy, no launch).
// The sLSTM chunk loops over its positions inside one launch as well (one block per sequence and
// head: the recurrent matmul needs the whole head's h of the previous position).
#include "ops/block_cuda_util.h"
#include "ops/cuda_backend.h"
#include "ops/cuda_infer.h"
#include "ops/recurrent_blocks.h"

namespace gyre::ops {
namespace {

// y [rows, n] = x [rows, k] · W[r0 : r0 + n, :]ᵀ (W the bf16 compute copy [*, k]); y bf16 or f32.
Tensor RowsGemm(const Tensor& x, const Parameter& w, int64_t r0, int64_t n, bool f32) {
  const int64_t rows = x.rows(), k = x.cols();
  Tensor y = Tensor::Empty({rows, n}, f32 ? DType::kF32 : DType::kBF16, Device::kCuda);
  CudaGemm g;
  g.trans_b = true;
  g.m = rows; g.n = n; g.k = k;
  g.a = x.raw(); g.lda = k;
  g.b = BytePtr(w.compute, r0 * k); g.ldb = k;
  g.c = y.raw(); g.ldc = n; g.c_f32 = f32;
  Cuda().Gemm(g);
  return y;
}

}  // namespace

Tensor CausalConv1d::StepChunkCuda(const Tensor& x, int64_t chunk, Tensor* state, StateHistory* history) {
  if (history != nullptr) history->Clear();
  GYRE_CHECK(x.dtype() == DType::kBF16 && x.cols() == channels_ && chunk > 0 && x.rows() % chunk == 0,
             "conv1d chunk step: CUDA x %s, chunk %ld", ShapeString(x.shape()).c_str(), (long)chunk);
  StateOnDevice(state);
  const int64_t B = x.rows() / chunk;
  GYRE_CHECK(state->numel() == B * (width_ - 1) * channels_, "conv1d chunk step: state %s",
             ShapeString(state->shape()).c_str());
  Tensor y = Tensor::Empty({x.rows(), channels_}, DType::kBF16, Device::kCuda);
  Tensor hist;
  const bool record = history != nullptr && chunk > 1;
  if (record && width_ > 1) hist = Tensor::Empty({(chunk - 1) * state->numel()}, DType::kF32, Device::kCuda);
  CudaConv1dStepArgs a;
  a.batch = B; a.channels = channels_; a.width = width_; a.silu = silu_;
  a.x = x.raw(); a.ldx = channels_;
  a.w = weight_->value.data<float>();
  a.bias = bias_->value.data<float>();
  a.state = state->data<float>();
  a.y = y.raw();
  a.positions = chunk;
  a.history = hist.defined() ? hist.data<float>() : nullptr;
  if (B > 0) CudaInfer().Conv1dStep(a);
  if (record) {
    for (int64_t j = 0; j + 1 < chunk; ++j)
      history->Adopt({hist.defined() ? hist.Slice(j * state->numel(), state->shape()) : *state});
  }
  return y;
}

Tensor Mamba2Block::StepCuda(const Tensor& x, int64_t chunk, Mamba2State* st, bool rewindable) {
  const int64_t rows = x.rows(), B = rows / chunk, gn = groups_ * state_, cx = di_ + 2 * gn;
  Tensor* ssm = &st->ssm;
  StateOnDevice(ssm);
  Tensor u = norm_.Forward(x);
  Tensor z = RowsGemm(u, *in_proj_.weight(), 0, di_, false);
  Tensor xbc_in = RowsGemm(u, *in_proj_.weight(), di_, cx, false);
  Tensor dt = RowsGemm(u, *in_proj_.weight(), di_ + cx, heads_, /*f32=*/true);
  Tensor xbc = conv_.StepChunk(xbc_in, chunk, &st->conv, rewindable ? &st->conv_history : nullptr);
  Tensor y = Tensor::Empty({rows, di_}, DType::kBF16, Device::kCuda);
  // All `chunk` positions in one launch; rows j*B .. (j+1)*B of every operand are position j.
  Tensor hist;
  if (rewindable && chunk > 1) hist = Tensor::Empty({(chunk - 1) * ssm->numel()}, DType::kF32, Device::kCuda);
  CudaSsdStepArgs s;
  s.batch = B; s.heads = heads_; s.head_dim = head_dim_; s.groups = groups_; s.state_dim = state_;
  s.x = xbc.raw(); s.b = BytePtr(xbc, di_); s.c = BytePtr(xbc, di_ + gn);
  s.ld_xbc = cx;
  s.dt = dt.data<float>();
  s.a_log = a_log_->value.data<float>(); s.dt_bias = dt_bias_->value.data<float>(); s.d = d_skip_->value.data<float>();
  s.state = ssm->data<float>();
  s.y = y.raw();
  s.positions = chunk;
  s.history = hist.defined() ? hist.data<float>() : nullptr;
  CudaInfer().SsdStep(s);
  if (hist.defined()) {
    for (int64_t j = 0; j + 1 < chunk; ++j) st->cell_history.Adopt({hist.Slice(j * ssm->numel(), ssm->shape())});
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
  for (Tensor* t : {c, n, m}) StateOnDevice(t);
  Tensor u = norm_.Forward(x);
  Tensor xm = RowsGemm(u, *up_.weight(), 0, p, false);
  Tensor z = RowsGemm(u, *up_.weight(), p, p, false);
  Tensor xc = conv_.StepChunk(xm, chunk, &st->conv, rewindable ? &st->conv_history : nullptr);
  Tensor q, k, v, ig, fg;
  QkvGatesCuda(xc, xm, B, q, k, v, ig, fg);
  Tensor h = Tensor::Empty({B, p}, DType::kBF16, Device::kCuda);
  // All `chunk` positions in one launch (k = 1: the cluster step kernel).
  CudaMlstmStepArgs s;
  s.batch = per; s.heads = heads_; s.dk = dk; s.dv = dk; s.sigmoid_forget = sigmoid_forget_;
  s.q = q.raw(); s.k = k.raw(); s.v = v.raw();
  s.ig = ig.data<float>(); s.fg = fg.data<float>();
  s.h = h.raw();
  StepMlstmCells(s, chunk, rewindable, c, n, m, &st->cell_history);
  Tensor mean = Tensor::Empty({B * heads_}, DType::kF32, Device::kCuda);
  Tensor rstd = Tensor::Empty({B * heads_}, DType::kF32, Device::kCuda);
  Tensor out = OutputNormCuda(h, z.raw(), p_, xc, B, mean, rstd);
  Tensor y = Add(x, down_.Forward(out).Reshape(x.shape()));
  ReleaseActivations();
  return y;
}

Tensor SlstmBlock::StepCuda(const Tensor& x, int64_t chunk, SlstmState* st, bool rewindable) {
  const int64_t B = x.rows(), d = d_, dh = d_ / heads_, per = B / chunk;
  Tensor *h = &st->h, *c = &st->c, *n = &st->n, *m = &st->m;
  for (Tensor* t : {h, c, n, m}) StateOnDevice(t);
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
      g.a = BytePtr(src, hd * dh); g.lda = d;
      g.b = BytePtr(w[k]->weight()->compute, hd * dh * dh); g.ldb = dh;
      g.c = MutBytePtr(gx, k * d + hd * dh); g.ldc = 4 * d;
      Cuda().Gemm(g);
    }
  }
  Cuda().AddColumnBias(gx.raw(), B, 4 * d, 4 * d, bias_->value.data<float>());
  Tensor hb = Tensor::Empty({B, d}, DType::kBF16, Device::kCuda);
  // All `chunk` positions in one launch.
  Tensor hist[4];
  if (rewindable && chunk > 1) {
    for (Tensor& t : hist) t = Tensor::Empty({(chunk - 1) * h->numel()}, DType::kF32, Device::kCuda);
  }
  CudaSlstmStepArgs s;
  s.batch = per; s.heads = heads_; s.head_dim = dh;
  s.gx = gx.raw(); s.r = recurrent_->compute.raw();
  s.h = h->data<float>(); s.c = c->data<float>(); s.n = n->data<float>(); s.m = m->data<float>();
  s.h_out = hb.raw();
  s.positions = chunk;
  if (hist[0].defined()) {
    s.h_history = hist[0].data<float>(); s.c_history = hist[1].data<float>();
    s.n_history = hist[2].data<float>(); s.m_history = hist[3].data<float>();
  }
  CudaInfer().SlstmStep(s);
  if (hist[0].defined()) {
    for (int64_t j = 0; j + 1 < chunk; ++j) {
      const int64_t off = j * h->numel();
      st->cell_history.Adopt({hist[0].Slice(off, h->shape()), hist[1].Slice(off, c->shape()),
                              hist[2].Slice(off, n->shape()), hist[3].Slice(off, m->shape())});
    }
  }
  Tensor x1 = Add(x, group_norm_.Forward(hb).Reshape(x.shape()));
  Tensor y = Add(x1, ffn_.Forward(ffn_norm_.Forward(x1)));
  ReleaseActivations();
  return y;
}

}  // namespace gyre::ops
