// CUDA incremental decoding of the xLSTM Large block (XlstmLargeBlock::StepChunk on CUDA tensors,
// ops/xlstm_large_block.h): the layers of ForwardCuda at the chunk's k·B rows (position-major, row
// j·B + b), with the mLSTM step kernel (kernels/cuda/ssm_step.h MlstmStepChunk, dk != dv) in place
// of the chunkwise cell, as MlstmBlock::StepCuda (ops/recurrent_step_cuda.cc) does for the v1 block:
//   u = RMSNorm(x); q, k, v, o = Linear(u) (X·Wᵀ at <= 16 rows: the row-invariant GemmRows
//   kernel under GYRE_ROW_INVARIANT_DECODE, ops/cuda_infer.h); [ĩ f̃] raw = u·[W_i; W_f]ᵀ as one
//   fp32 product, then the block's gate kernel (bias + soft cap, ops/xlstm_large_cuda.h); the
//   cell over all k positions in ONE launch (the chunk kernel at k = 1 too when row-invariant
//   decoding is on, so a chunk of k positions rounds every position as k one-token steps do);
//   LN_head(h)·w ⊙ σ(o) (the training forward's fused kernel), out_proj with the residual
//   in its GEMM's store, the SwiGLU FFN with its residual likewise.
// States stay fp32 on the device (the CPU-made zero states of NewState move there on the first
// step, exact). A rewindable chunk has the kernel write the state after positions 0..k-2 into one
// buffer per tensor whose views the StateHistory adopts, so Rewind swaps handles (no copy, no
// launch). Under decode-graph capture, n and m are copied back into their captured addresses
// instead of taking the kernel's fresh outputs by handle (as the v1 block).
#include "ops/block_cuda_util.h"
#include "ops/cuda_backend.h"
#include "ops/cuda_infer.h"
#include "ops/cuda_recurrent.h"
#include "ops/xlstm_large_block.h"

namespace gyre::ops {

Tensor XlstmLargeBlock::StepCuda(const Tensor& x, int64_t chunk, XlstmLargeState* st, bool rewindable) {
  const int64_t rows = x.rows(), dk = qk_dim_ / heads_, dv = v_dim_ / heads_;
  GYRE_CHECK(chunk > 0 && rows % chunk == 0 && x.dtype() == DType::kBF16 && x.cols() == d_,
             "xLSTM Large CUDA step: x %s, chunk %ld", ShapeString(x.shape()).c_str(), (long)chunk);
  const int64_t B = rows / chunk;
  Tensor *c = &st->c, *n = &st->n, *m = &st->m;
  for (Tensor* t : {c, n, m}) StateOnDevice(t);
  Tensor u = norm_mlstm_.Forward(x);
  Tensor q = q_.Forward(u), k = k_.Forward(u), v = v_.Forward(u), o = ogate_.Forward(u);
  // Both gates' raw pre-activations in one fp32 product over the adjacent [W_i; W_f], then bias + cap.
  Tensor w_if, dw_if;
  GateSpan(&w_if, &dw_if);
  Tensor pre = Tensor::Empty({rows, 2 * heads_}, DType::kF32, Device::kCuda);
  {
    CudaGemm g;
    g.trans_b = true;
    g.m = rows; g.n = 2 * heads_; g.k = d_;
    g.a = u.raw(); g.lda = d_;
    g.b = w_if.raw(); g.ldb = d_;
    g.c = pre.raw(); g.ldc = 2 * heads_; g.c_f32 = true;
    Cuda().Gemm(g);
  }
  Tensor ig = Tensor::Empty({rows, heads_}, DType::kF32, Device::kCuda);
  Tensor fg = Tensor::Empty({rows, heads_}, DType::kF32, Device::kCuda);
  XlstmLargeGateArgs ga;
  ga.rows = rows; ga.heads = heads_; ga.cap = static_cast<float>(gate_cap_);
  ga.pre = pre.data<float>(); ga.bi = bi_->value.data<float>(); ga.bf = bf_->value.data<float>();
  ga.ig = ig.data<float>(); ga.fg = fg.data<float>();
  Cuda().XlstmLargeGates(false, ga);
  // The cell: all `chunk` positions in one launch.
  Tensor h = Tensor::Empty({rows, v_dim_}, DType::kBF16, Device::kCuda);
  CudaMlstmStepArgs s;
  s.batch = B; s.heads = heads_; s.dk = dk; s.dv = dv; s.sigmoid_forget = true; s.eps = 1e-6;
  s.q = q.raw(); s.k = k.raw(); s.v = v.raw();
  s.ig = ig.data<float>(); s.fg = fg.data<float>();
  s.h = h.raw();
  StepMlstmCells(s, chunk, rewindable, c, n, m, &st->cell_history);
  // LN_head(h)·w ⊙ σ(o) by the training forward's kernel (xl_norm_gate_fwd), so a decoded position
  // rounds as the full forward's does; its statistics go to scratch.
  Tensor gated = Tensor::Empty({rows, v_dim_}, DType::kBF16, Device::kCuda);
  Tensor mean = Tensor::Empty({rows, heads_}, DType::kF32, Device::kCuda);
  Tensor rstd = Tensor::Empty({rows, heads_}, DType::kF32, Device::kCuda);
  XlstmLargeNormGateArgs ng;
  ng.rows = rows; ng.dim = v_dim_; ng.heads = heads_;
  ng.eps = static_cast<float>(norm_eps_);
  ng.h = h.raw(); ng.o = o.raw();
  ng.weight = multihead_norm_.weight()->value.data<float>();
  ng.y = gated.raw(); ng.mean = mean.data<float>(); ng.rstd = rstd.data<float>();
  Cuda().XlstmLargeNormGate(false, ng);
  Tensor x1 = out_proj_.ForwardAdd(gated, x);
  Tensor y = ffn_.ForwardAdd(norm_ffn_.Forward(x1), x1);
  ReleaseActivations();
  return y;
}

}  // namespace gyre::ops
