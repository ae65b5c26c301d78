// Needs a GPU: the recurrent blocks of ops/ on CUDA (mixed precision: fp32 masters, gradients,
// gates, dt and states; bf16 compute copies and activations) against the CPU backend in float64
// on the same weights.
//
// The fp32 masters are first rounded to bf16 (value := compute), so both backends see exactly
// the same numbers whether a CUDA kernel reads the master (conv, norms, gates, skip, A_log, ...)
// or the bf16 copy (GEMMs, the sLSTM recurrent matrix); the only differences left are bf16
// rounding of activations and fp32 accumulation. Bands: METHOD.md's bf16 ones, widened where
// the path crosses several bf16 roundings (gate gradients pass through dq/dk/dv and exp gates).
//   kernels: the glue kernels (block-diagonal with its fused second map, mLSTM gates with 3 and 8
//            heads through the q/k/v maps with the gate backward fused in, the three group-norm
//            modes) on their vectorised and scalar paths vs float64;
//   blocks:  MlstmBlock (T 100 over chunk 32: a partial chunk; also 8 heads), SlstmBlock, Mamba2Block
//            (T 100 over chunk 64) — output, input gradient and every parameter gradient;
//   models:  xLSTM [mLSTM, sLSTM, mLSTM], Mamba-2 x 3, hybrid (Mamba-2 + Llama attention block)
//            — loss and every parameter gradient;
//   train:   20 AdamW steps (clip 1.0, lr 3e-3, warm-up 5) GPU vs CPU fp32 from the same fp32
//            masters: the loss curves agree step by step within 3e-2 relative;
//   AdamW:   LoadState on CUDA restores the step count (the next update equals the one of the
//            optimizer that never stopped);
//   bitwise: the same three training steps twice (fresh models, same seed) give identical bits —
//            losses, gradient norms, every parameter and every gradient — for xLSTM (mLSTM +
//            sLSTM: the fused q/k/v gates, the out-norm, the grouped LayerNorms, the sLSTM bias
//            column sum) and Mamba-2 (gated RMSNorm, SSD), at shapes with several column and row
//            blocks per reduction (where float atomics made the order, and the bits, vary);
//   recompute: the mLSTM block's recomputation modes (GYRE_MLSTM_RECOMPUTE: cell, glue, block,
//            glue with keep_last 1) against float64 (block and model) and BITWISE against the
//            default path (three AdamW steps; also at the 125M widths), and the bytes a block
//            holds between forward and backward per mode;
//   deferred zero: after an earlier step the recurrent blocks' gradients are left stale (NaN
//            written into them) and two micro-batches must reproduce a fresh model's gradients.
// Every check prints `[PASS|FAIL] name shape rel_err tol`; the Mamba-2 dt_bias, A_log and D
// gradients (sums over tokens that can cancel) add `| terms_err ... tol 1e-02` and pass on either
// measure (CheckGradsWithTerms, ops/DT_BIAS_CHECK.md).
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "gtest/gtest.h"
#include "ops/adamw.h"
#include "ops/cuda_backend.h"
#include "ops/gpu_check.h"
#include "ops/elementwise.h"
#include "ops/model.h"
#include "ops/recurrent_blocks.h"
#include "ops/train_step.h"

namespace gyre::ops {
namespace {

class RecurrentGpuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (CudaBackendOrNull() == nullptr) GTEST_SKIP() << "built without CUDA";
    std::printf("device: %s\n", Cuda().DeviceDescription().c_str());
  }
};

ModelSpec SmallXlstm() {
  ModelSpec s = *PresetSpec("xlstm-tiny");
  s.preset = "xlstm-gpu-test";
  s.d_model = 128;
  s.mlstm_heads = 4;
  s.mlstm_inner = 256;  // 4 heads x 64
  s.slstm_heads = 4;    // 4 x 32
  s.slstm_ffn = 192;
  s.mlstm_chunk = 32;
  s.blocks = {BlockType::kMlstm, BlockType::kSlstm, BlockType::kMlstm};
  s.vocab_size = 512;
  return s;
}

ModelSpec SmallMamba2() {
  ModelSpec s = *PresetSpec("mamba2-tiny");
  s.preset = "mamba2-gpu-test";
  s.d_model = 64;
  s.ssm_head_dim = 32;  // di 128: 4 heads
  s.ssm_state = 32;
  s.ssm_chunk = 64;
  s.blocks = {BlockType::kMamba2, BlockType::kMamba2, BlockType::kMamba2};
  s.vocab_size = 512;
  return s;
}

ModelSpec SmallHybrid() {
  ModelSpec s = SmallMamba2();
  s.preset = "hybrid-gpu-test";
  s.d_model = 128;  // di 256: 8 SSD heads
  s.attn_heads = 2;
  s.attn_kv_heads = 2;
  s.attn_head_dim = 64;
  s.ffn_dim = 384;
  s.attn_mlp = true;
  s.blocks = {BlockType::kMamba2, BlockType::kAttention, BlockType::kMamba2};
  return s;
}

// One block on a CUDA store and on a float64 CPU store holding the same (bf16-rounded) weights.
void CheckBlock(const std::string& name, const ModelSpec& spec,
                const std::function<std::unique_ptr<Block>(const BuildContext&)>& make, int64_t B, int64_t T) {
  ParamStore gpu_store(DType::kF32, Device::kCpu), cpu_store(DType::kF64, Device::kCpu);
  Rng r1(7), r2(7);
  auto gpu = make({&gpu_store, &r1, "l"});
  auto cpu = make({&cpu_store, &r2, "l"});
  gpu_store.MoveToDevice(Device::kCuda);
  // Non-trivial norm scales / skips: the inits are constants (0 for 1+w, 1 otherwise).
  Rng rng(21);
  for (Parameter* p : gpu_store.All()) {
    if (p->kind == ParamKind::kNorm) p->value.CopyFrom(RandomBf16Host(p->value.shape(), 0.3, &rng).To(DType::kF32));
  }
  gpu_store.SyncCompute();
  RoundMastersToBf16(gpu_store);
  ASSERT_TRUE(cpu_store.LoadState(AsF64State(gpu_store)).ok());
  const int64_t d = spec.d_model;
  const Tensor x = RandomBf16Host({B, T, d}, 1.0, &rng), dy = RandomBf16Host({B, T, d}, 1.0, &rng);
  SetMamba2GradTermRecording(true);
  const Tensor y_ref = cpu->Forward(x, B, T);
  const Tensor dx_ref = cpu->Backward(dy);
  SetMamba2GradTermRecording(false);
  const std::vector<Mamba2GradTerms> terms = TakeMamba2GradTerms();
  const Tensor y = gpu->Forward(ToCudaBf16(x), B, T);
  const Tensor dx = gpu->Backward(ToCudaBf16(dy));
  EXPECT_TRUE(Check(name + " y", y, y_ref, 1e-2));
  EXPECT_TRUE(Check(name + " dx", dx, dx_ref, 3e-2));
  EXPECT_TRUE(CheckGradsWithTerms(gpu_store, cpu_store, name, 5e-2, terms));
}

TEST_F(RecurrentGpuTest, MlstmBlock) {
  const ModelSpec s = SmallXlstm();
  CheckBlock("mlstm", s, [&](const BuildContext& c) { return std::make_unique<MlstmBlock>(c, s, 3); }, 2, 100);
}

TEST_F(RecurrentGpuTest, SlstmBlock) {
  const ModelSpec s = SmallXlstm();
  CheckBlock("slstm", s, [&](const BuildContext& c) { return std::make_unique<SlstmBlock>(c, s, 1, 3); }, 2, 67);
}

TEST_F(RecurrentGpuTest, Mamba2Block) {
  const ModelSpec s = SmallMamba2();
  CheckBlock("mamba2", s, [&](const BuildContext& c) { return std::make_unique<Mamba2Block>(c, s, 3); }, 2, 100);
}

// ---------------------------------------------------------------- glue kernels, one by one
// Each glue kernel of ops/recurrent_cuda.cu on random bf16-representable inputs against a float64
// loop, outputs NaN-poisoned first, accumulated gradients starting from random values; shapes
// that take the vectorised paths and shapes that take the scalar ones (odd rows, widths not a
// multiple of 8, 3x3 blocks, row strides), 3 and 8 mLSTM heads.

Tensor DevF32(const Tensor& host) { return host.To(DType::kF32).ToDevice(Device::kCuda); }
Tensor Poison(Shape s) { return Tensor::Full(std::move(s), DType::kBF16, NAN, Device::kCuda); }
double Sig(double z) { return 1.0 / (1.0 + std::exp(-z)); }
double SiluD(double z) { return z * Sig(z); }
double DSiluD(double z) { return Sig(z) * (1.0 + z * (1.0 - Sig(z))); }

// `overwrite`: dw / dw2 start as NaN and are overwritten (the deferred-zero rule's first write).
void CheckBlockDiag(int64_t rows, int64_t blocks, int64_t bs, int64_t ld, bool two, bool overwrite = false) {
  Rng rng(31);
  const int64_t cols = blocks * bs;
  const std::string name = "blockdiag rows " + std::to_string(rows) + " bs " + std::to_string(bs) + " ld " +
                           std::to_string(ld) + (two ? " +second map" : "") + (overwrite ? " overwrite" : "");
  const Tensor x = RandomBf16Host({rows, ld}, 1.0, &rng), w = RandomBf16Host({blocks, bs, bs}, 0.5, &rng),
               w2 = RandomBf16Host({blocks, bs, bs}, 0.5, &rng), dy = RandomBf16Host({rows, ld}, 1.0, &rng),
               dy2 = RandomBf16Host({rows, ld}, 1.0, &rng), dx0 = RandomBf16Host({rows, ld}, 1.0, &rng),
               dw0 = RandomBf16Host({blocks, bs, bs}, 1.0, &rng), dw20 = RandomBf16Host({blocks, bs, bs}, 1.0, &rng);
  Tensor y_ref = Tensor::Zeros({rows, cols}, DType::kF64), y2_ref = Tensor::Zeros({rows, cols}, DType::kF64);
  Tensor dx_ref = Tensor::Zeros({rows, cols}, DType::kF64), dw_ref = dw0.To(DType::kF64), dw2_ref = dw20.To(DType::kF64);
  if (overwrite) {
    dw_ref.SetZero();
    dw2_ref.SetZero();
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t b = 0; b < blocks; ++b)
      for (int64_t o = 0; o < bs; ++o)
        for (int64_t i = 0; i < bs; ++i) {
          const int64_t wi = (b * bs + o) * bs + i, xi = r * ld + b * bs + i, yi = r * ld + b * bs + o;
          y_ref.Set(r * cols + b * bs + o, y_ref.At(r * cols + b * bs + o) + x.At(xi) * w.At(wi));
          y2_ref.Set(r * cols + b * bs + o, y2_ref.At(r * cols + b * bs + o) + x.At(xi) * w2.At(wi));
          double g = dy.At(yi) * w.At(wi);
          if (two) g += dy2.At(yi) * w2.At(wi);
          dx_ref.Set(r * cols + b * bs + i, dx_ref.At(r * cols + b * bs + i) + g);
          dw_ref.Set(wi, dw_ref.At(wi) + dy.At(yi) * x.At(xi));
          dw2_ref.Set(wi, dw2_ref.At(wi) + dy2.At(yi) * x.At(xi));
        }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dx_ref.Set(r * cols + c, dx_ref.At(r * cols + c) + dx0.At(r * ld + c));
  const Tensor xd = ToCudaBf16(x), wd = DevF32(w), w2d = DevF32(w2), dyd = ToCudaBf16(dy), dy2d = ToCudaBf16(dy2);
  Tensor y = Poison({rows, ld}), y2 = Poison({rows, ld}), dx = ToCudaBf16(dx0), dw = DevF32(dw0), dw2 = DevF32(dw20);
  if (overwrite) {
    dw.Fill(std::nan(""));
    dw2.Fill(std::nan(""));
  }
  BlockDiagArgs a;
  a.rows = rows; a.blocks = blocks; a.block_in = bs; a.block_out = bs;
  a.x = xd.raw(); a.ldx = ld; a.w = wd.data<float>(); a.y = y.raw(); a.ldy = ld;
  if (two) { a.w2 = w2d.data<float>(); a.y2 = y2.raw(); }
  Cuda().BlockDiag(false, a);
  a.dy = dyd.raw(); a.dx = dx.raw(); a.accumulate_dx = true; a.dw = dw.data<float>();
  a.overwrite_dw = a.overwrite_dw2 = overwrite;
  if (two) { a.dy2 = dy2d.raw(); a.dw2 = dw2.data<float>(); }
  Cuda().BlockDiag(true, a);
  auto cols_of = [&](const Tensor& t) {  // the first `cols` columns of a [rows, ld] device tensor
    const Tensor h = t.ToDevice(Device::kCpu).To(DType::kF64);
    Tensor o = Tensor::Empty({rows, cols}, DType::kF64);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) o.Set(r * cols + c, h.At(r * ld + c));
    return o;
  };
  EXPECT_TRUE(Check(name + " y", cols_of(y), y_ref, 1e-2));
  if (two) { EXPECT_TRUE(Check(name + " y2", cols_of(y2), y2_ref, 1e-2)); }
  EXPECT_TRUE(Check(name + " dx", cols_of(dx), dx_ref, 1e-2));
  EXPECT_TRUE(Check(name + " dw", dw, dw_ref, 1e-4));
  if (two) { EXPECT_TRUE(Check(name + " dw2", dw2, dw2_ref, 1e-4)); }
}

TEST_F(RecurrentGpuTest, BlockDiagKernels) {
  CheckBlockDiag(37, 70, 4, 280, true);   // 4x4 vectorised, 3 column blocks of threads (70 > 64)
  CheckBlockDiag(37, 6, 4, 28, false);    // row stride wider than the map
  CheckBlockDiag(300, 5, 3, 15, true);    // 3x3: the scalar kernels, both maps
  CheckBlockDiag(1100, 70, 4, 280, true, /*overwrite=*/true);  // 3 row chunks of the backward
  CheckBlockDiag(300, 5, 3, 15, true, /*overwrite=*/true);
}

// The mLSTM gates fused into the q/k/v block-diagonal maps that feed them (BlockDiagArgs::gates):
// forward q, k (one pass over x_c, bias written first), v (x_m), the gates summed from the bf16
// q, k, v; backward the two block-diagonal launches with the gate gradient fused in (BlockDiagArgs::gates: q, k at columns 0 and p of the
// gate weights, v at 2p; bias sums on the v launch), against float64 with exact q, k, v.
// `overwrite`: every weight / bias gradient starts as NaN and is overwritten.
// qk: the 2-map backward's kernel (MlstmQkBwd: kFma = CudaBackend::BlockDiag; kTc =
// BlockDiagBackwardTc, which must cover the shape when heads <= 4 and bs == 4, and whose dx must
// equal the FMA kernel's bit for bit).
void CheckGates(int64_t rows, int64_t p, int64_t heads, int64_t bs, bool overwrite = false,
                MlstmQkBwd qk = MlstmQkBwd::kFma) {
  Rng rng(41);
  const std::string qk_label = qk == MlstmQkBwd::kTc ? " [qk_bwd tc]" : "";
  const std::string name = "mlstm gates rows " + std::to_string(rows) + " p " + std::to_string(p) + " heads " +
                           std::to_string(heads) + " bs " + std::to_string(bs) + (overwrite ? " overwrite" : "") +
                           qk_label;
  const int64_t width = 3 * p, blocks = p / bs;
  const Tensor xc = RandomBf16Host({rows, p}, 1.0, &rng), xm = RandomBf16Host({rows, p}, 1.0, &rng),
               wi = RandomBf16Host({heads, width}, 0.2, &rng), wf = RandomBf16Host({heads, width}, 0.2, &rng),
               bi = RandomBf16Host({heads}, 1.0, &rng), bf = RandomBf16Host({heads}, 1.0, &rng);
  Tensor dig = RandomBf16Host({rows, heads}, 1.0, &rng), dfg = RandomBf16Host({rows, heads}, 1.0, &rng);
  const Tensor dxc0 = RandomBf16Host({rows, p}, 1.0, &rng), dwi0 = RandomBf16Host({heads, width}, 1.0, &rng),
               dwf0 = RandomBf16Host({heads, width}, 1.0, &rng), dbi0 = RandomBf16Host({heads}, 1.0, &rng),
               dbf0 = RandomBf16Host({heads}, 1.0, &rng);
  // The gate gradients are fp32 in training (not bf16): widen them to 24-bit mantissas, so that
  // the kernels see values whose low 16 bits are not zero, as in a step.
  for (Tensor* t : {&dig, &dfg})
    for (int64_t i = 0; i < t->numel(); ++i) t->Set(i, static_cast<double>(static_cast<float>(t->At(i) * 1.3719)));
  Tensor wm[3], d0[3], dwm0[3];  // q, k, v: block weights, cell gradients, accumulated weight grads
  for (int m = 0; m < 3; ++m) {
    wm[m] = RandomBf16Host({blocks, bs, bs}, 0.5, &rng);
    d0[m] = RandomBf16Host({rows, p}, 1.0, &rng);
    dwm0[m] = RandomBf16Host({blocks, bs, bs}, 1.0, &rng);
  }
  const Tensor* xin[3] = {&xc, &xc, &xm};
  // float64 reference.
  Tensor dx_ref[2] = {dxc0.To(DType::kF64), Tensor::Zeros({rows, p}, DType::kF64)};  // dx_c, dx_m
  Tensor dw_ref[3] = {dwm0[0].To(DType::kF64), dwm0[1].To(DType::kF64), dwm0[2].To(DType::kF64)};
  Tensor y_ref[3], dwi_ref = dwi0.To(DType::kF64), dwf_ref = dwf0.To(DType::kF64), dbi_ref = dbi0.To(DType::kF64),
         dbf_ref = dbf0.To(DType::kF64);
  if (overwrite) {
    for (Tensor* t : {&dw_ref[0], &dw_ref[1], &dw_ref[2], &dwi_ref, &dwf_ref, &dbi_ref, &dbf_ref}) t->SetZero();
  }
  for (int m = 0; m < 3; ++m) {
    y_ref[m] = Tensor::Zeros({rows, p}, DType::kF64);
    Tensor& dx = dx_ref[m == 2 ? 1 : 0];
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t b = 0; b < blocks; ++b)
        for (int64_t o = 0; o < bs; ++o) {
          const int64_t c = b * bs + o, gc = m * p + c;
          double y = 0, d = d0[m].At(r * p + c);
          for (int64_t i = 0; i < bs; ++i) y += wm[m].At((b * bs + o) * bs + i) * xin[m]->At(r * p + b * bs + i);
          y_ref[m].Set(r * p + c, y);
          for (int64_t h = 0; h < heads; ++h) {
            d += dig.At(r * heads + h) * wi.At(h * width + gc) + dfg.At(r * heads + h) * wf.At(h * width + gc);
            dwi_ref.Set(h * width + gc, dwi_ref.At(h * width + gc) + dig.At(r * heads + h) * y);
            dwf_ref.Set(h * width + gc, dwf_ref.At(h * width + gc) + dfg.At(r * heads + h) * y);
          }
          for (int64_t i = 0; i < bs; ++i) {
            const int64_t wi_ = (b * bs + o) * bs + i, xi = r * p + b * bs + i;
            dx.Set(xi, dx.At(xi) + d * wm[m].At(wi_));
            dw_ref[m].Set(wi_, dw_ref[m].At(wi_) + d * xin[m]->At(xi));
          }
        }
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t h = 0; h < heads; ++h) {
      dbi_ref.Set(h, dbi_ref.At(h) + dig.At(r * heads + h));
      dbf_ref.Set(h, dbf_ref.At(h) + dfg.At(r * heads + h));
    }
  // GPU: forward.
  const Tensor xcd = ToCudaBf16(xc), xmd = ToCudaBf16(xm), wid = DevF32(wi), wfd = DevF32(wf), bid = DevF32(bi),
               bfd = DevF32(bf), digd = DevF32(dig), dfgd = DevF32(dfg);
  Tensor wmd[3], d0d[3], dwmd[3], ym[3];
  for (int m = 0; m < 3; ++m) {
    wmd[m] = DevF32(wm[m]);
    d0d[m] = ToCudaBf16(d0[m]);
    dwmd[m] = DevF32(dwm0[m]);
    ym[m] = Poison({rows, p});
  }
  Tensor ig = Tensor::Full({rows, heads}, DType::kF32, NAN, Device::kCuda), fg = ig.Clone();
  MlstmGateArgs g;
  g.rows = rows; g.inner = p; g.heads = heads;
  g.wi = wid.data<float>(); g.wf = wfd.data<float>();
  g.ig = ig.data<float>(); g.fg = fg.data<float>();
  MlstmGateArgs g_bias = g;
  g_bias.bi = bid.data<float>(); g_bias.bf = bfd.data<float>();
  for (int pass = 0; pass < 2; ++pass) {
    BlockDiagArgs a;
    a.rows = rows; a.blocks = blocks; a.block_in = bs; a.block_out = bs;
    a.x = (pass == 0 ? xcd : xmd).raw(); a.ldx = p; a.ldy = p;
    a.w = wmd[pass == 0 ? 0 : 2].data<float>(); a.y = ym[pass == 0 ? 0 : 2].raw();
    a.gates = pass == 0 ? &g_bias : &g;
    a.gate_col = pass == 0 ? 0 : 2 * p;
    if (pass == 0) { a.w2 = wmd[1].data<float>(); a.y2 = ym[1].raw(); a.gate_col2 = p; }
    Cuda().BlockDiag(false, a);
  }
  // Gate reference from the GPU's bf16 q, k, v (what the gate kernel reads).
  Tensor ig_ref = Tensor::Zeros({rows, heads}, DType::kF64), fg_ref = ig_ref.Clone();
  {
    Tensor yh[3];
    for (int m = 0; m < 3; ++m) yh[m] = ym[m].ToDevice(Device::kCpu).To(DType::kF64);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t h = 0; h < heads; ++h) {
        double si = bi.At(h), sf = bf.At(h);
        for (int64_t j = 0; j < width; ++j) {
          const double x = yh[j / p].At(r * p + j % p);
          si += x * wi.At(h * width + j);
          sf += x * wf.At(h * width + j);
        }
        ig_ref.Set(r * heads + h, si);
        fg_ref.Set(r * heads + h, sf);
      }
  }
  // GPU: backward, the gate gradient fused into the two block-diagonal launches.
  Tensor dxc = ToCudaBf16(dxc0), dxm = Poison({rows, p}), dwi = DevF32(dwi0), dwf = DevF32(dwf0), dbi = DevF32(dbi0),
         dbf = DevF32(dbf0);
  if (overwrite) {
    for (Tensor* t : {&dwmd[0], &dwmd[1], &dwmd[2], &dwi, &dwf, &dbi, &dbf}) t->Fill(std::nan(""));
  }
  MlstmGateArgs gb;
  gb.rows = rows; gb.inner = p; gb.heads = heads;
  gb.wi = wid.data<float>(); gb.wf = wfd.data<float>();
  gb.dig = digd.data<float>(); gb.dfg = dfgd.data<float>();
  gb.dwi = dwi.data<float>(); gb.dwf = dwf.data<float>();
  gb.overwrite_dw = overwrite;
  MlstmGateArgs gb_bias = gb;
  gb_bias.dbi = dbi.data<float>(); gb_bias.dbf = dbf.data<float>();
  gb_bias.overwrite_db = overwrite;
  for (int pass = 0; pass < 2; ++pass) {
    const int m = pass == 0 ? 0 : 2;
    BlockDiagArgs a;
    a.rows = rows; a.blocks = blocks; a.block_in = bs; a.block_out = bs;
    a.x = (pass == 0 ? xcd : xmd).raw(); a.ldx = p; a.ldy = p;
    a.w = wmd[m].data<float>(); a.dy = d0d[m].raw(); a.dw = dwmd[m].data<float>();
    a.overwrite_dw = a.overwrite_dw2 = overwrite;
    a.dx = (pass == 0 ? dxc : dxm).raw(); a.accumulate_dx = pass == 0;
    // The bias sums ride with the v map, or with the q/k map when the tensor-core kernel takes it.
    a.gates = (pass == 0) == (qk != MlstmQkBwd::kFma) ? &gb_bias : &gb;
    a.gate_col = m * p;
    if (pass == 0) {
      a.w2 = wmd[1].data<float>(); a.dy2 = d0d[1].raw(); a.dw2 = dwmd[1].data<float>();
      a.gate_col2 = p;
    }
    if (pass == 0 && qk != MlstmQkBwd::kFma) {
      // The FMA kernel on copies first: its dx is the reference for the bits.
      Tensor dxc_fma = dxc.Clone(), dwq_fma = dwmd[0].Clone(), dwk_fma = dwmd[1].Clone(), dwi_fma = dwi.Clone(),
             dwf_fma = dwf.Clone(), dbi_fma = dbi.Clone(), dbf_fma = dbf.Clone();
      MlstmGateArgs gf = *a.gates;
      gf.dwi = dwi_fma.data<float>(); gf.dwf = dwf_fma.data<float>();
      gf.dbi = dbi_fma.data<float>(); gf.dbf = dbf_fma.data<float>();
      BlockDiagArgs f = a;
      f.dx = dxc_fma.raw(); f.dw = dwq_fma.data<float>(); f.dw2 = dwk_fma.data<float>(); f.gates = &gf;
      Cuda().BlockDiag(true, f);
      const bool ran = Cuda().BlockDiagBackwardTc(a);
      EXPECT_EQ(ran, heads <= 4 && bs == 4) << name;
      const Tensor want = dxc_fma.ToDevice(Device::kCpu).To(DType::kF64), got = dxc.ToDevice(Device::kCpu).To(DType::kF64);
      int64_t differ = 0;
      for (int64_t i = 0; i < got.numel(); ++i) differ += got.At(i) != want.At(i) ? 1 : 0;
      std::printf("[%s] %s dxc bitwise vs the FMA kernel: %ld of %ld differ\n", differ == 0 ? "PASS" : "FAIL",
                  name.c_str(), (long)differ, (long)got.numel());
      EXPECT_EQ(differ, 0);
      continue;
    }
    Cuda().BlockDiag(true, a);
  }
  EXPECT_TRUE(Check(name + " q", ym[0], y_ref[0], 1e-2));
  EXPECT_TRUE(Check(name + " k", ym[1], y_ref[1], 1e-2));
  EXPECT_TRUE(Check(name + " v", ym[2], y_ref[2], 1e-2));
  EXPECT_TRUE(Check(name + " ig", ig, ig_ref, 1e-5));
  EXPECT_TRUE(Check(name + " fg", fg, fg_ref, 1e-5));
  EXPECT_TRUE(Check(name + " dxc", dxc, dx_ref[0], 1e-2));
  EXPECT_TRUE(Check(name + " dxm", dxm, dx_ref[1], 1e-2));
  EXPECT_TRUE(Check(name + " dwq", dwmd[0], dw_ref[0], 1e-4));
  EXPECT_TRUE(Check(name + " dwk", dwmd[1], dw_ref[1], 1e-4));
  EXPECT_TRUE(Check(name + " dwv", dwmd[2], dw_ref[2], 1e-4));
  EXPECT_TRUE(Check(name + " dwi", dwi, dwi_ref, 1e-5));
  EXPECT_TRUE(Check(name + " dwf", dwf, dwf_ref, 1e-5));
  EXPECT_TRUE(Check(name + " dbi", dbi, dbi_ref, 1e-5));
  EXPECT_TRUE(Check(name + " dbf", dbf, dbf_ref, 1e-5));
}

TEST_F(RecurrentGpuTest, MlstmGateKernels) {
  CheckGates(1500, 96, 3, 4);  // vectorised, 8-gate kernels; 3 backward row blocks, odd tail; dead lanes
  CheckGates(37, 320, 8, 4);   // vectorised, 16-gate kernels (the 7B layout's 8 heads); 3 column blocks
  // The 8-gate backward: 4 heads (all 8 gates live) with fewer than 8 rows per warp, and 2
  // heads (gates 4..7 padding) over 1024 rows (2 row chunks, 64 rows per warp each) with a
  // second column block of 2 live lanes.
  CheckGates(37, 96, 4, 4);
  CheckGates(1024, 136, 2, 4, /*overwrite=*/true);
  CheckGates(37, 12, 3, 3);    // 3x3 blocks, p % 8 != 0: the scalar kernels
  CheckGates(21, 15, 8, 3);    // scalar, 8 heads, odd p
  CheckGates(1500, 96, 3, 4, /*overwrite=*/true);
  CheckGates(37, 320, 8, 4, /*overwrite=*/true);
  CheckGates(300, 12, 3, 3, /*overwrite=*/true);  // scalar, 2 row chunks
}

// The 2-map backward with its row sums on tensor cores (BlockDiagBackwardTc, GYRE_MLSTM_QK_BWD=tc)
// against float64, every output, and its dx bitwise against the FMA kernel's.
TEST_F(RecurrentGpuTest, MlstmQkBwdTensorCoreKernel) {
  const MlstmQkBwd tc = MlstmQkBwd::kTc;
  CheckGates(1500, 96, 3, 4, false, tc);    // 3 row chunks, odd tail; 24 of 32 lanes live
  CheckGates(37, 96, 4, 4, false, tc);      // fewer rows than a tile a warp; all 8 gates live
  CheckGates(1024, 136, 2, 4, true, tc);    // 2 column blocks (2 live lanes), gates 4..7 padding, = instead of +=
  CheckGates(777, 128, 1, 4, false, tc);    // one head, odd rows
  CheckGates(2051, 1536, 4, 4, true, tc);   // the 125M width: 12 column blocks, 5 row chunks
  CheckGates(37, 320, 8, 4, false, tc);     // 8 heads: not covered, BlockDiag's 16-gate kernel
}

// `overwrite`: dweight / dskip start as NaN and are overwritten.
// residual (kPlain only): dx += dresidual inside the backward (GroupNormArgs::dresidual).
// The group norms' kernels in this process (ops/recurrent_cuda.cu: the prefetch kernels for the
// mLSTM output norm's backward at 3 x 128 columns a group and the gated forward at 6 x 256; their
// switches GYRE_NORM_BWD / GYRE_NORM_FWD accept only pf since the 2026-11-27 deletions), for the
// result lines; and GYRE_GATED_NORM (unset / row: the CTA-per-row kernels for gated groups of
// 1537-4096 columns, the warp-per-row kernels for the rest; warp: those for all; ops/MAMBA2_NORM.md).
std::string NormVariant() {
  const char* gated = std::getenv("GYRE_GATED_NORM");
  const char* mlstm_out = std::getenv("GYRE_MLSTM_OUT_NORM");
  return std::string(" [norm_bwd pf] [norm_fwd pf] [gated_norm ") + (gated != nullptr ? gated : "row") +
         "] [mlstm_out_norm " + (mlstm_out != nullptr ? mlstm_out : "row") + "]";
}

// lddz > 0 (gated mode): dz rows of lddz (GroupNormArgs::lddz, the Mamba-2 fused in_proj
// backward), dz the first dim columns of a NaN-poisoned [rows, lddz] whose other columns must stay NaN.
void CheckNorm(NormMode mode, bool layer, int64_t rows, int64_t groups, int64_t gs, int64_t ldz,
               bool overwrite = false, bool residual = false, int64_t lddz = 0) {
  Rng rng(51);
  const int64_t dim = groups * gs;
  const std::string name = "groupnorm mode " + std::to_string(static_cast<int>(mode)) + (layer ? " layer" : " rms") +
                           " rows " + std::to_string(rows) + " groups " + std::to_string(groups) + " gs " +
                           std::to_string(gs) + (overwrite ? " overwrite" : "") + (residual ? " +dresidual" : "") +
                           (lddz > 0 ? " lddz " + std::to_string(lddz) : "") + NormVariant();
  const Tensor x = RandomBf16Host({rows, dim}, 1.0, &rng), z = RandomBf16Host({rows, ldz}, 1.0, &rng),
               xc = RandomBf16Host({rows, dim}, 1.0, &rng), w = RandomBf16Host({dim}, 0.3, &rng),
               skip = RandomBf16Host({dim}, 1.0, &rng), dy = RandomBf16Host({rows, dim}, 1.0, &rng),
               dw0 = RandomBf16Host({dim}, 1.0, &rng), ds0 = RandomBf16Host({dim}, 1.0, &rng),
               dres = RandomBf16Host({rows, dim}, 1.0, &rng);
  const double off = 1.0, eps = 1e-5;
  const int m = static_cast<int>(mode);
  Tensor y_ref = Tensor::Zeros({rows, dim}, DType::kF64), dx_ref = y_ref.Clone(), dz_ref = y_ref.Clone(),
         dxc_ref = y_ref.Clone(), dw_ref = dw0.To(DType::kF64), ds_ref = ds0.To(DType::kF64);
  if (overwrite) {
    dw_ref.SetZero();
    ds_ref.SetZero();
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      std::vector<double> in(gs), xhat(gs), gout(gs);
      double mean = 0, var = 0;
      for (int64_t i = 0; i < gs; ++i) {
        const int64_t c = g * gs + i;
        in[i] = x.At(r * dim + c) * (m == 1 ? SiluD(z.At(r * ldz + c)) : 1.0);
        mean += in[i] / gs;
      }
      if (!layer) mean = 0;
      for (int64_t i = 0; i < gs; ++i) var += (in[i] - mean) * (in[i] - mean) / gs;
      const double rstd = 1.0 / std::sqrt(var + eps);
      double s1 = 0, s2 = 0;
      for (int64_t i = 0; i < gs; ++i) {
        const int64_t c = g * gs + i, e = r * dim + c;
        const double sc = w.At(c) + off, zc = z.At(r * ldz + c);
        xhat[i] = (in[i] - mean) * rstd;
        double n = xhat[i] * sc;
        gout[i] = dy.At(e) * (m == 2 ? SiluD(zc) : 1.0);
        if (m == 2) {
          const double hs = n + skip.At(c) * xc.At(e);
          n = hs * SiluD(zc);
          dz_ref.Set(e, dy.At(e) * hs * DSiluD(zc));
          dxc_ref.Set(e, gout[i] * skip.At(c));
          ds_ref.Set(c, ds_ref.At(c) + gout[i] * xc.At(e));
        }
        y_ref.Set(e, n);
        dw_ref.Set(c, dw_ref.At(c) + gout[i] * xhat[i]);
        s1 += gout[i] * sc / gs;
        s2 += gout[i] * sc * xhat[i] / gs;
      }
      for (int64_t i = 0; i < gs; ++i) {
        const int64_t c = g * gs + i, e = r * dim + c;
        const double zc = z.At(r * ldz + c);
        const double dxa = rstd * (gout[i] * (w.At(c) + off) - (layer ? s1 : 0.0) - xhat[i] * s2);
        if (m == 1) {
          dx_ref.Set(e, dxa * SiluD(zc));
          dz_ref.Set(e, dxa * x.At(e) * DSiluD(zc));
        } else {
          dx_ref.Set(e, dxa + (residual ? dres.At(e) : 0.0));
        }
      }
    }
  const Tensor xd = ToCudaBf16(x), zd = ToCudaBf16(z), xcd = ToCudaBf16(xc), wd = DevF32(w), sd = DevF32(skip),
               dyd = ToCudaBf16(dy), dresd = ToCudaBf16(dres);
  Tensor y = Poison({rows, dim}), dx = Poison({rows, dim}), dz = Poison({rows, lddz > 0 ? lddz : dim}),
         dxc = Poison({rows, dim});
  Tensor mean = Tensor::Full({rows * groups}, DType::kF32, NAN, Device::kCuda), rstd = mean.Clone();
  Tensor dw = DevF32(dw0), ds = DevF32(ds0);
  if (overwrite) {
    dw.Fill(std::nan(""));
    ds.Fill(std::nan(""));
  }
  GroupNormArgs n;
  n.mode = mode; n.layer = layer; n.rows = rows; n.dim = dim; n.groups = groups; n.eps = static_cast<float>(eps);
  n.weight_offset = static_cast<float>(off);
  n.x = xd.raw(); n.weight = wd.data<float>();
  if (m != 0) { n.z = zd.raw(); n.ldz = ldz; }
  if (m == 2) { n.skip = sd.data<float>(); n.xc = xcd.raw(); }
  n.y = y.raw(); n.mean = layer ? mean.data<float>() : nullptr; n.rstd = rstd.data<float>();
  Cuda().GroupNorm(false, n);
  n.dy = dyd.raw(); n.dx = dx.raw(); n.dweight = dw.data<float>();
  n.overwrite_dparams = overwrite;
  if (residual) n.dresidual = dresd.raw();
  if (m != 0) n.dz = dz.raw();
  n.lddz = static_cast<int32_t>(lddz);
  if (m == 2) { n.dxc = dxc.raw(); n.dskip = ds.data<float>(); }
  Cuda().GroupNorm(true, n);
  if (lddz > 0) {
    const Tensor wide = dz.ToDevice(Device::kCpu).To(DType::kF64);
    Tensor packed = Tensor::Empty({rows, dim}, DType::kF64, Device::kCpu);
    int64_t touched = 0;  // columns >= dim no longer NaN
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < lddz; ++c) {
        if (c < dim) packed.Set(r * dim + c, wide.At(r * lddz + c));
        else touched += !std::isnan(wide.At(r * lddz + c));
      }
    std::printf("[%s] %s dz columns >= dim untouched: %ld written\n", touched == 0 ? "PASS" : "FAIL", name.c_str(),
                (long)touched);
    EXPECT_EQ(touched, 0);
    dz = packed;
  }
  EXPECT_TRUE(Check(name + " y", y, y_ref, 1e-2));
  EXPECT_TRUE(Check(name + " dx", dx, dx_ref, 2e-2));
  if (m != 0) { EXPECT_TRUE(Check(name + " dz", dz, dz_ref, 2e-2)); }
  if (m == 2) { EXPECT_TRUE(Check(name + " dxc", dxc, dxc_ref, 1e-2)); }
  EXPECT_TRUE(Check(name + " dweight", dw, dw_ref, 1e-4));
  if (m == 2) { EXPECT_TRUE(Check(name + " dskip", ds, ds_ref, 1e-4)); }
}

TEST_F(RecurrentGpuTest, GroupNormKernels) {
  // Vectorised (group size % 8 == 0; z with a wider row stride as in Mamba-2's in_proj output).
  CheckNorm(NormMode::kGatedInput, false, 300, 1, 264, 280);
  CheckNorm(NormMode::kMlstmOutput, true, 37, 4, 48, 192);
  CheckNorm(NormMode::kPlain, true, 37, 2, 16, 32);
  // The backward's column sums over row blocks of 64 with a tail, lanes with 1 or 2 chunks
  // (xlstm-125m's out-norm groups of 384) and a partial last chunk (776 = 3 x 256 + 8).
  CheckNorm(NormMode::kMlstmOutput, true, 200, 4, 384, 1536);
  CheckNorm(NormMode::kPlain, true, 130, 1, 776, 776);
  // Half-warp rows (groups of an odd number of 128-column passes: 16 lanes a row, two rows a
  // warp): rows x groups odd, so the last warp of the forward and the last row pair of the
  // backward have a half without a row; 3 passes with a partial last one (264 = 2 x 128 + 8).
  CheckNorm(NormMode::kMlstmOutput, true, 37, 3, 384, 1152, true);
  CheckNorm(NormMode::kMlstmOutput, false, 65, 4, 384, 1536);  // RMS (the prefetch backward: mean 0)
  CheckNorm(NormMode::kPlain, true, 65, 1, 264, 264, true, true);
  // Scalar (group size 12).
  CheckNorm(NormMode::kGatedInput, false, 37, 2, 12, 30);
  CheckNorm(NormMode::kMlstmOutput, true, 37, 3, 12, 36);
  // Overwritten parameter gradients (NaN before): vectorised and scalar; the Mamba-2 130m group
  // (1536: 48 KiB of per-warp sums) and a larger one (2048: the opt-in above 48 KiB).
  CheckNorm(NormMode::kMlstmOutput, true, 200, 4, 384, 1536, true);
  CheckNorm(NormMode::kGatedInput, false, 300, 1, 1536, 1536, true);
  CheckNorm(NormMode::kGatedInput, true, 37, 2, 1536, 3200);  // LayerNorm, 2 groups, odd rows (prefetch forward)
  CheckNorm(NormMode::kGatedInput, false, 150, 1, 2048, 2112, true);
  CheckNorm(NormMode::kMlstmOutput, true, 300, 3, 12, 36, true);
  // The register-resident backward (groups of 1025..1536 columns) with a partial last chunk
  // (1288 = 5 x 256 + 8), LayerNorm and gated, two groups.
  CheckNorm(NormMode::kPlain, true, 130, 1, 1288, 1288, true);
  CheckNorm(NormMode::kGatedInput, false, 70, 2, 1288, 2600);
  // dx + dresidual (the xLSTM blocks' 1+w LayerNorms, Norm::BackwardAdd): vectorised (xlstm-125m's
  // 768), register-resident (1288) and scalar (12) paths.
  CheckNorm(NormMode::kPlain, true, 130, 1, 768, 768, true, true);
  CheckNorm(NormMode::kPlain, true, 70, 1, 1288, 1288, false, true);
  CheckNorm(NormMode::kPlain, true, 37, 2, 12, 24, false, true);
}

// The mLSTM output norm's backward that also writes the cell's dots (GYRE_MLSTM_DH_DOT=norm;
// CudaBackend::MlstmOutNormBackwardWithDots): every other output bitwise the plain backward's (the
// same kernel body; the plain outputs are checked against float64 by GroupNormKernels), and
//   dots[r, g] = Σ_{c in g} dh[r, c]·(h[r, c] + h_lo[r, c])
// against float64 on the kernel's own bf16 dh (its rounding is part of the contract: the cell sees
// that dh); a second call gives the same bits. The error is measured against the terms, as
// ||dots − ref|| / ||Σ_c |dh·(h + lo)|||, tol 1e-6 (fp32 sums of 384 products: ~u/√2 a row):
// a norm's dx is orthogonal to its own input (Σ_c dx = 0, Σ_c dx·x̂ = 0 per group, exactly), so
// dh·h is only what the bf16 rounding of dh and h lo leave, ~1e-3 of the terms, and a plain
// relative error would measure fp32 rounding against that residue (call 1: 2-3e-5, printed as
// [INFO]; the cell's own bwd_prep sums the same terms in fp32 as well). h_lo small
// (~2^-8 of h, as a lo part) or null (bf16 cell states). Odd rows (a half-warp without a row, a
// partial last row block of 64), 1-4 heads, RMS / LayerNorm, overwritten parameter gradients.
// gs: the head width (384: the prefetch kernel; 512..1024: group_norm_bwd_mlstm_row, the default
// unless GYRE_MLSTM_OUT_NORM=warp, whose plain backward is the same kernel without the dots).
void CheckNormDots(bool layer, int64_t rows, int64_t groups, bool overwrite, bool with_lo, int64_t gs = 384) {
  Rng rng(77);
  const int64_t dim = groups * gs;
  const std::string name = "mlstm out-norm + dots" + std::string(layer ? " layer" : " rms") + " rows " +
                           std::to_string(rows) + " heads " + std::to_string(groups) + " gs " + std::to_string(gs) +
                           (overwrite ? " overwrite" : "") + (with_lo ? "" : " no h_lo") + NormVariant();
  const Tensor x = RandomBf16Host({rows, dim}, 1.0, &rng), z = RandomBf16Host({rows, dim}, 1.0, &rng),
               xc = RandomBf16Host({rows, dim}, 1.0, &rng), w = RandomBf16Host({dim}, 0.3, &rng),
               skip = RandomBf16Host({dim}, 1.0, &rng), dy = RandomBf16Host({rows, dim}, 1.0, &rng),
               dw0 = RandomBf16Host({dim}, 1.0, &rng), ds0 = RandomBf16Host({dim}, 1.0, &rng),
               lo = RandomBf16Host({rows, dim}, 0.004, &rng);
  const Tensor xd = ToCudaBf16(x), zd = ToCudaBf16(z), xcd = ToCudaBf16(xc), wd = DevF32(w), sd = DevF32(skip),
               dyd = ToCudaBf16(dy), lod = ToCudaBf16(lo);
  Tensor y = Poison({rows, dim});
  Tensor mean = Tensor::Full({rows * groups}, DType::kF32, NAN, Device::kCuda), rstd = mean.Clone();
  GroupNormArgs n;
  n.mode = NormMode::kMlstmOutput; n.layer = layer; n.rows = rows; n.dim = dim; n.groups = groups; n.eps = 1e-5f;
  n.weight_offset = 1.f;
  n.x = xd.raw(); n.weight = wd.data<float>(); n.z = zd.raw(); n.ldz = dim; n.skip = sd.data<float>();
  n.xc = xcd.raw();
  n.y = y.raw(); n.mean = layer ? mean.data<float>() : nullptr; n.rstd = rstd.data<float>();
  Cuda().GroupNorm(false, n);
  n.dy = dyd.raw();
  n.overwrite_dparams = overwrite;
  struct Out {
    Tensor dx, dz, dxc, dw, ds, dots;
  } out[3];  // plain, with dots, with dots again
  bool covered[3] = {false, false, false};
  for (int run = 0; run < 3; ++run) {
    Out& o = out[run];
    o.dx = Poison({rows, dim}); o.dz = Poison({rows, dim}); o.dxc = Poison({rows, dim});
    o.dw = DevF32(dw0); o.ds = DevF32(ds0);
    if (overwrite) {
      o.dw.Fill(std::nan(""));
      o.ds.Fill(std::nan(""));
    }
    o.dots = Tensor::Full({rows, groups}, DType::kF32, NAN, Device::kCuda);
    GroupNormArgs b = n;
    b.dx = o.dx.raw(); b.dz = o.dz.raw(); b.dxc = o.dxc.raw(); b.dweight = o.dw.data<float>();
    b.dskip = o.ds.data<float>();
    if (run == 0) {
      Cuda().GroupNorm(true, b);
    } else {
      covered[run] = Cuda().MlstmOutNormBackwardWithDots(b, with_lo ? lod.raw() : nullptr, o.dots.data<float>());
    }
  }
  bool same = covered[1] && covered[2];
  for (const auto& [a, b] : {std::pair{&out[0].dx, &out[1].dx}, {&out[0].dz, &out[1].dz}, {&out[0].dxc, &out[1].dxc},
                             {&out[0].dw, &out[1].dw}, {&out[0].ds, &out[1].ds}}) {
    same = same && HostBytes(*a) == HostBytes(*b);
  }
  const bool repeat = HostBytes(out[1].dots) == HostBytes(out[2].dots) && HostBytes(out[1].dx) == HostBytes(out[2].dx);
  std::printf("[%s] %s: covered %d, dh dz dxc dweight dskip bitwise the plain backward's %d, a second call the same "
              "bits %d\n",
              same && repeat ? "PASS" : "FAIL", name.c_str(), covered[1] && covered[2], same, repeat);
  EXPECT_TRUE(same);
  EXPECT_TRUE(repeat);
  const Tensor dh = out[1].dx.ToDevice(Device::kCpu).To(DType::kF64);
  const Tensor got = out[1].dots.ToDevice(Device::kCpu).To(DType::kF64);
  double diff2 = 0, ref2 = 0, abs2 = 0;
  bool finite = true;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      double sum = 0, abs_sum = 0;
      for (int64_t c = g * gs; c < (g + 1) * gs; ++c) {
        const int64_t e = r * dim + c;
        const double t = dh.At(e) * (x.At(e) + (with_lo ? lo.At(e) : 0.0));
        sum += t;
        abs_sum += std::fabs(t);
      }
      const double v = got.At(r * groups + g);
      finite = finite && std::isfinite(v);
      diff2 += (v - sum) * (v - sum);
      ref2 += sum * sum;
      abs2 += abs_sum * abs_sum;
    }
  const double terms_err = finite ? std::sqrt(diff2 / abs2) : INFINITY;
  const bool ok = terms_err <= (gs > 384 ? 2e-6 : 1e-6);
  std::printf("[%s] %s dots [%ld, %ld] terms_err %.3e tol %.0e (||dots|| / ||sum |terms||| %.2e; [INFO] plain "
              "rel_err %.3e)\n",
              ok ? "PASS" : "FAIL", name.c_str(), (long)rows, (long)groups, terms_err, gs > 384 ? 2e-6 : 1e-6,
              std::sqrt(ref2 / abs2),
              std::sqrt(diff2 / ref2));
  EXPECT_TRUE(ok);
}

TEST_F(RecurrentGpuTest, MlstmOutNormDotsKernel) {
  CheckNormDots(true, 37, 3, false, true);     // odd rows: the last row pair has a half without a row
  CheckNormDots(true, 1001, 4, true, true);    // 16 row blocks of 64 with a partial last one; 125m heads
  CheckNormDots(false, 130, 1, false, true);   // RMS, one head
  CheckNormDots(true, 65, 2, false, false);    // no lo part (bf16 cell states)
  // Shapes the kernel does not cover (groups of 64): the plain backward runs, dots untouched.
  Rng rng(3);
  const int64_t rows = 9, dim = 128;
  const Tensor x = ToCudaBf16(RandomBf16Host({rows, dim}, 1.0, &rng));
  Tensor buf = Poison({rows, dim}), dots = Tensor::Full({rows, 2}, DType::kF32, NAN, Device::kCuda);
  Tensor mean = Tensor::Full({rows * 2}, DType::kF32, 0.0, Device::kCuda), rstd = Tensor::Full({rows * 2}, DType::kF32, 1.0, Device::kCuda);
  Tensor wt = Tensor::Full({dim}, DType::kF32, 0.0, Device::kCuda);
  GroupNormArgs n;
  n.mode = NormMode::kMlstmOutput; n.layer = true; n.rows = rows; n.dim = dim; n.groups = 2; n.weight_offset = 1.f;
  n.x = x.raw(); n.z = x.raw(); n.ldz = dim; n.xc = x.raw(); n.skip = wt.data<float>(); n.weight = wt.data<float>();
  n.mean = mean.data<float>(); n.rstd = rstd.data<float>();
  Tensor dx = Poison({rows, dim}), dz = Poison({rows, dim}), dxc = Poison({rows, dim});
  n.dy = x.raw(); n.dx = dx.raw(); n.dz = dz.raw(); n.dxc = dxc.raw();
  const bool ran = Cuda().MlstmOutNormBackwardWithDots(n, x.raw(), dots.data<float>());
  const Tensor d = dots.ToDevice(Device::kCpu).To(DType::kF64), h = dx.ToDevice(Device::kCpu).To(DType::kF64);
  bool untouched = true, written = true;
  for (int64_t i = 0; i < d.numel(); ++i) untouched = untouched && std::isnan(d.At(i));
  for (int64_t i = 0; i < h.numel(); ++i) written = written && std::isfinite(h.At(i));
  std::printf("[%s] mlstm out-norm + dots, groups of 64: not covered (returned %d), dots untouched %d, dh written %d\n",
              !ran && untouched && written ? "PASS" : "FAIL", ran, untouched, written);
  EXPECT_FALSE(ran);
  EXPECT_TRUE(untouched);
  EXPECT_TRUE(written);
}

// An mLSTM out-norm backward on CUDA over `rows` rows of 2 heads of 1024: x (random) as every input
// (z, x_c, dy), statistics 0 and 1, weight and skip 0, outputs poisoned.
struct MlstmOutNormBackwardCase {
  MlstmOutNormBackwardCase(int64_t rows, uint64_t seed) {
    Rng rng(seed);
    const int64_t dim = 2048;
    x = ToCudaBf16(RandomBf16Host({rows, dim}, 1.0, &rng));
    mean = Tensor::Full({rows * 2}, DType::kF32, 0.0, Device::kCuda);
    rstd = Tensor::Full({rows * 2}, DType::kF32, 1.0, Device::kCuda);
    wt = Tensor::Full({dim}, DType::kF32, 0.0, Device::kCuda);
    n.mode = NormMode::kMlstmOutput; n.layer = true; n.rows = rows; n.dim = dim; n.groups = 2; n.weight_offset = 1.f;
    n.x = x.raw(); n.z = x.raw(); n.ldz = dim; n.xc = x.raw(); n.skip = wt.data<float>(); n.weight = wt.data<float>();
    n.mean = mean.data<float>(); n.rstd = rstd.data<float>();
    dx = Poison({rows, dim}); dz = Poison({rows, dim}); dxc = Poison({rows, dim});
    n.dy = x.raw(); n.dx = dx.raw(); n.dz = dz.raw(); n.dxc = dxc.raw();
  }
  Tensor x, mean, rstd, wt, dx, dz, dxc;
  GroupNormArgs n;
};

// The mLSTM output norm at heads wider than 384 (xlstm[1:0]-1.3b: 4 heads of 1024; 350m / 760m:
// 512 / 768) against float64, through the backend (CheckNorm: forward, backward with dweight /
// dskip accumulated or overwritten), and with the cell's dots (CheckNormDots). Run both ways:
// GYRE_MLSTM_OUT_NORM=warp (group_norm_bwd_vec<2, 32>; the dots not covered, the plain backward
// runs) and unset (= row since session 19: group_norm_bwd_mlstm_row, dots covered; its dots call
// bitwise its plain call in every other output, a second call the same bits). Odd row counts: a partial last
// CTA of 32 rows (37, 301) and of the _vec kernel's 64.
TEST_F(RecurrentGpuTest, MlstmOutNormWideHeads) {
  CheckNorm(NormMode::kMlstmOutput, true, 37, 4, 1024, 4096);
  CheckNorm(NormMode::kMlstmOutput, true, 301, 4, 1024, 4096, true);
  CheckNorm(NormMode::kMlstmOutput, false, 65, 4, 1024, 4096);   // RMS
  CheckNorm(NormMode::kMlstmOutput, true, 33, 1, 1024, 1024, true);
  CheckNorm(NormMode::kMlstmOutput, true, 67, 2, 512, 1024);     // 2 warps a CTA
  CheckNorm(NormMode::kMlstmOutput, true, 45, 3, 768, 2304, true);  // 3 warps a CTA
  const bool row = std::getenv("GYRE_MLSTM_OUT_NORM") == nullptr ||
                   std::string_view(std::getenv("GYRE_MLSTM_OUT_NORM")) == "row";
  if (!row) {  // the dots are not covered at these widths: the plain backward, dots untouched
    const int64_t rows = 9;
    const MlstmOutNormBackwardCase c(rows, 5);
    Tensor dots = Tensor::Full({rows, 2}, DType::kF32, NAN, Device::kCuda);
    const bool ran = Cuda().MlstmOutNormBackwardWithDots(c.n, c.x.raw(), dots.data<float>());
    const Tensor d = dots.ToDevice(Device::kCpu).To(DType::kF64);
    bool untouched = true;
    for (int64_t i = 0; i < d.numel(); ++i) untouched = untouched && std::isnan(d.At(i));
    std::printf("[%s] mlstm out-norm + dots, 2 heads of 1024, GYRE_MLSTM_OUT_NORM=warp: not covered (returned %d), "
                "dots untouched %d\n", !ran && untouched ? "PASS" : "FAIL", ran, untouched);
    EXPECT_FALSE(ran);
    EXPECT_TRUE(untouched);
    return;
  }
  CheckNormDots(true, 37, 4, false, true, 1024);
  CheckNormDots(true, 301, 4, true, true, 1024);
  CheckNormDots(false, 130, 1, false, true, 1024);
  CheckNormDots(true, 65, 2, false, false, 1024);  // no lo part
  CheckNormDots(true, 45, 3, true, true, 768);
  CheckNormDots(true, 33, 2, false, true, 512);
}

// Runs `op` (which ends synchronised) with the environment switch `env` set to `value` in this
// process (a switch is read once a process, at its first use): a rejected value aborts inside `op`
// through the backend's error, else exits 0.
[[noreturn]] void RunUnderSwitchAndExit(const char* env, const char* value, const std::function<void()>& op) {
  setenv(env, value, /*overwrite=*/1);
  op();
  std::exit(0);
}

// A warp-or-row switch's values through `op`: `rejected` dies with "<env> must be warp or row (or
// unset), got '<rejected>'", row and warp exit 0. Each case in a fresh process (the "threadsafe"
// death-test style re-executes this binary).
void ExpectWarpOrRowSwitchValues(const char* env, const char* rejected, const std::function<void()>& op) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(RunUnderSwitchAndExit(env, rejected, op),
               std::string(env) + " must be warp or row \\(or unset\\), got '" + rejected + "'");
  EXPECT_EXIT(RunUnderSwitchAndExit(env, "row", op), ::testing::ExitedWithCode(0), "");
  EXPECT_EXIT(RunUnderSwitchAndExit(env, "warp", op), ::testing::ExitedWithCode(0), "");
}

// An mLSTM out-norm backward (2 heads of 1024), synchronised: GYRE_MLSTM_OUT_NORM's test op.
void MlstmOutNormBackwardOnCuda() {
  const MlstmOutNormBackwardCase c(3, 9);
  Cuda().GroupNorm(true, c.n);
  Cuda().Synchronize();
}

TEST_F(RecurrentGpuTest, MlstmOutNormSwitchValues) {
  ExpectWarpOrRowSwitchValues("GYRE_MLSTM_OUT_NORM", "tile", MlstmOutNormBackwardOnCuda);
}

// The gated norm's dz with a row stride (the Mamba-2 in_proj backward writes dz into the first d_inner
// columns of the whole in_proj gradient [rows, d_inner + conv channels + heads]): the vectorised
// kernels' twins (lddz % 8 == 0): register-resident (groups of 1025..1536: mamba2-130m's 1536 of
// 3352; two groups of 1288), _vec with 16 lanes (264: 3 passes) and 32 (2048, mamba2-1.3b-like:
// 16 passes, > 48 KiB of column sums); the packed-then-copied fallback (lddz % 8 != 0: the test
// model's 128 of 324, 264 of 284; scalar groups of 12).
TEST_F(RecurrentGpuTest, Mamba2GatedNormStridedDz) {
  CheckNorm(NormMode::kGatedInput, false, 300, 1, 1536, 1536, true, false, 3352);
  CheckNorm(NormMode::kGatedInput, false, 70, 2, 1288, 2600, false, false, 2600 + 1824 + 24);
  CheckNorm(NormMode::kGatedInput, false, 300, 1, 264, 280, true, false, 264 + 24);
  CheckNorm(NormMode::kGatedInput, false, 150, 1, 2048, 2112, true, false, 2048 + 2112 + 32);
  CheckNorm(NormMode::kGatedInput, false, 300, 1, 264, 280, true, false, 264 + 20);
  CheckNorm(NormMode::kGatedInput, false, 37, 2, 12, 30, false, false, 31);
  CheckNorm(NormMode::kGatedInput, false, 65, 1, 128, 128, true, false, 324);
}

// The mLSTM output norm (mode 2) writing dz in rows of lddz (GYRE_MLSTM_UP=fused: dz is the z half of
// the [rows, 2p] gradient dx_m | dz; here the first dim columns of a NaN-poisoned [rows, lddz], the
// rest must stay NaN), z read in rows of 2·dim as the fused forward stores it: 4 heads of 384 (the
// prefetch kernel), 2 of 1024 (group_norm_bwd_mlstm_row unless GYRE_MLSTM_OUT_NORM=warp), 2 of 48
// (_vec), lddz not a multiple of 8 and groups of 12 (the scalar kernel).
TEST_F(RecurrentGpuTest, MlstmOutNormStridedDz) {
  CheckNorm(NormMode::kMlstmOutput, true, 300, 4, 384, 2 * 1536, true, false, 2 * 1536);
  CheckNorm(NormMode::kMlstmOutput, true, 97, 2, 1024, 2 * 2048, false, false, 2 * 2048);
  CheckNorm(NormMode::kMlstmOutput, true, 37, 2, 48, 2 * 96, true, false, 2 * 96);
  CheckNorm(NormMode::kMlstmOutput, true, 37, 2, 48, 2 * 96, false, false, 96 + 4);
  CheckNorm(NormMode::kMlstmOutput, false, 37, 2, 12, 2 * 24, false, false, 2 * 24);
}

// Mamba-2's gated norm at the wide groups (ops/MAMBA2_NORM.md): mamba2-1.3b's one group of 4096
// (dz in rows of its in_proj width 4096 + 4352 + 64, odd rows: a partial last block of 32 and of
// 64 rows), 4096-wide rows in 8 groups of 512, two groups of 2056 with LayerNorm (a partial second
// chunk a thread), one of 5128. By default (GYRE_GATED_NORM unset = row) the groups of 1537..4096
// columns take the CTA-per-row kernels, under GYRE_GATED_NORM=warp the warp kernels (run this test
// both ways); 8 x 512 and 5128 stay on the warp kernels either way.
TEST_F(RecurrentGpuTest, Mamba2GatedNormWideGroups) {
  CheckNorm(NormMode::kGatedInput, false, 301, 1, 4096, 4096, true, false, 8512);
  CheckNorm(NormMode::kGatedInput, false, 301, 1, 4096, 4096);
  CheckNorm(NormMode::kGatedInput, false, 301, 8, 512, 4096, true);
  CheckNorm(NormMode::kGatedInput, true, 37, 2, 2056, 4112 + 8, false, false, 4112 + 24);
  CheckNorm(NormMode::kGatedInput, false, 65, 1, 5128, 5128, true);
}

// A gated norm forward and backward (4096 wide, one group: the shape GYRE_GATED_NORM=row routes),
// synchronised: GYRE_GATED_NORM's test op.
void GatedNormForwardBackwardOnCuda() {
  Rng rng(7);
  const int64_t rows = 3, dim = 4096;
  const Tensor x = ToCudaBf16(RandomBf16Host({rows, dim}, 1.0, &rng)), dy = x.Clone();
  Tensor y = Poison({rows, dim}), dx = Poison({rows, dim}), dz = Poison({rows, dim});
  Tensor rstd = Tensor::Full({rows}, DType::kF32, 0.0, Device::kCuda);
  Tensor w = Tensor::Full({dim}, DType::kF32, 1.0, Device::kCuda), dw = w.Clone();
  GroupNormArgs n;
  n.mode = NormMode::kGatedInput; n.rows = rows; n.dim = dim; n.groups = 1; n.eps = 1e-5f;
  n.x = x.raw(); n.z = x.raw(); n.ldz = dim; n.weight = w.data<float>(); n.y = y.raw(); n.rstd = rstd.data<float>();
  Cuda().GroupNorm(false, n);
  n.dy = dy.raw(); n.dx = dx.raw(); n.dz = dz.raw(); n.dweight = dw.data<float>();
  Cuda().GroupNorm(true, n);
  Cuda().Synchronize();
}

TEST_F(RecurrentGpuTest, GatedNormSwitchValues) {
  ExpectWarpOrRowSwitchValues("GYRE_GATED_NORM", "tile", GatedNormForwardBackwardOnCuda);
}

// CudaBackend::ConvertRows (Mamba-2's ddt into its columns of din): a rows x cols f32 block with a
// wider source row writes round-to-nearest-even bf16 into a column block of a wider destination,
// and nothing outside the block; and back.
TEST_F(RecurrentGpuTest, ConvertRowsWritesOnlyItsColumnBlock) {
  Rng rng(11);
  const int64_t rows = 37, cols = 24, src_ld = 30, dst_ld = 3352, col0 = 3328;
  Tensor src = Tensor::Empty({rows, src_ld}, DType::kF32);
  for (int64_t i = 0; i < src.numel(); ++i) src.data<float>()[i] = static_cast<float>(rng.Normal() * 3.0);
  Tensor dst = Poison({rows, dst_ld});
  Cuda().ConvertRows(src.ToDevice(Device::kCuda).raw(), DType::kF32, src_ld, static_cast<char*>(dst.raw()) + col0 * 2, DType::kBF16,
                     dst_ld, rows, cols);
  const Tensor host = dst.ToDevice(Device::kCpu);
  int64_t wrong = 0, touched = 0;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < dst_ld; ++c) {
      const double got = host.At(r * dst_ld + c);
      if (c >= col0 && c < col0 + cols) {
        wrong += got != Bf16ToFloat(FloatToBf16(src.data<float>()[r * src_ld + c - col0]));
      } else {
        touched += !std::isnan(got);
      }
    }
  }
  EXPECT_EQ(wrong, 0) << "values not rounded to nearest bf16";
  EXPECT_EQ(touched, 0) << "elements outside the column block written";
  // And back to f32 (exact), into a strided block.
  Tensor back = Tensor::Full({rows, src_ld}, DType::kF32, NAN, Device::kCuda);
  Cuda().ConvertRows(static_cast<const char*>(dst.raw()) + col0 * 2, DType::kBF16, dst_ld, back.raw(), DType::kF32, src_ld, rows, cols);
  const Tensor b = back.ToDevice(Device::kCpu);
  int64_t back_wrong = 0;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < src_ld; ++c) {
      const double got = b.At(r * src_ld + c);
      back_wrong += c < cols ? got != host.At(r * dst_ld + col0 + c) : !std::isnan(got);
    }
  }
  EXPECT_EQ(back_wrong, 0);
  std::printf("[%s] convert-rows f32->bf16->f32 %ldx%ld, ld %ld / %ld: %ld wrong, %ld outside written, %ld back wrong\n",
              wrong + touched + back_wrong == 0 ? "PASS" : "FAIL", (long)rows, (long)cols, (long)src_ld, (long)dst_ld,
              (long)wrong, (long)touched, (long)back_wrong);
}

// A group norm forward and backward under GYRE_NORM_FWD=fwd, GYRE_NORM_BWD=bwd in this process
// (each switch is read once a process): aborts through the backend's error (CUDA backend: ...
// failed: <message>) if a value is rejected, else exits 0.
[[noreturn]] void GroupNormUnderSwitches(const char* fwd, const char* bwd) {
  setenv("GYRE_NORM_FWD", fwd, /*overwrite=*/1);
  setenv("GYRE_NORM_BWD", bwd, /*overwrite=*/1);
  Rng rng(7);
  const Tensor x = ToCudaBf16(RandomBf16Host({2, 16}, 1.0, &rng)), dy = x.Clone();
  Tensor y = Poison({2, 16}), dx = Poison({2, 16});
  Tensor mean = Tensor::Full({2}, DType::kF32, 0.0, Device::kCuda), rstd = mean.Clone();
  Tensor w = Tensor::Full({16}, DType::kF32, 0.0, Device::kCuda), dw = w.Clone();
  GroupNormArgs n;
  n.mode = NormMode::kPlain; n.layer = true; n.rows = 2; n.dim = 16; n.groups = 1; n.eps = 1e-5f;
  n.x = x.raw(); n.weight = w.data<float>(); n.y = y.raw(); n.mean = mean.data<float>(); n.rstd = rstd.data<float>();
  Cuda().GroupNorm(false, n);
  n.dy = dy.raw(); n.dx = dx.raw(); n.dweight = dw.data<float>();
  Cuda().GroupNorm(true, n);
  Cuda().Synchronize();
  std::exit(0);
}

// The deleted kernels' switch values (GYRE_NORM_BWD=vec, GYRE_NORM_FWD=reg: slower than pf in the
// 2026-11-27 confirmation) are errors naming the accepted value; pf is accepted. Each case in a
// fresh process (the "threadsafe" death-test style re-executes this binary).
TEST_F(RecurrentGpuTest, DeletedNormSwitchValuesAreErrors) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(GroupNormUnderSwitches("pf", "vec"), "GYRE_NORM_BWD must be pf \\(or unset\\), got 'vec'");
  EXPECT_DEATH(GroupNormUnderSwitches("reg", "pf"), "GYRE_NORM_FWD must be pf \\(or unset\\), got 'reg'");
  EXPECT_EXIT(GroupNormUnderSwitches("pf", "pf"), ::testing::ExitedWithCode(0), "");
}

// One forward and backward of a `BlockT` (layer 3 of `s`, 1 x 16 tokens) on CUDA, synchronised:
// what runs the kernels' host code, where the environment switches are read (once a process).
template <class BlockT>
void BlockForwardBackwardOnCuda(const ModelSpec& s) {
  ParamStore store(DType::kF32, Device::kCpu);
  Rng init(7), rng(8);
  BlockT block({&store, &init, "l"}, s, 3);
  store.MoveToDevice(Device::kCuda);
  store.SyncCompute();
  store.ZeroGrad();
  const Tensor x = ToCudaBf16(RandomBf16Host({1, 16, s.d_model}, 1.0, &rng));
  block.Forward(x, 1, 16);
  block.Backward(x.Clone());
  Cuda().Synchronize();
}

// A Mamba-2 block's forward and backward on CUDA under GYRE_MAMBA_IN_BWD=value (read once a
// process): aborts naming the accepted value if it is rejected, else exits 0.
[[noreturn]] void Mamba2BackwardUnderInProjSwitch(const char* value) {
  setenv("GYRE_MAMBA_IN_BWD", value, /*overwrite=*/1);
  BlockForwardBackwardOnCuda<Mamba2Block>(SmallMamba2());
  std::exit(0);
}

// The split in_proj backward was deleted after losing on 2026-11-27 (ops/recurrent_blocks.cc):
// GYRE_MAMBA_IN_BWD=split (or anything but fused) is an error naming the accepted value.
TEST_F(RecurrentGpuTest, DeletedMamba2InProjSwitchValueIsAnError) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(Mamba2BackwardUnderInProjSwitch("split"),
               "GYRE_MAMBA_IN_BWD must be fused \\(or unset; split was deleted\\), got 'split'");
  EXPECT_EXIT(Mamba2BackwardUnderInProjSwitch("fused"), ::testing::ExitedWithCode(0), "");
}

// GYRE_MAMBA_IN_BWD's neighbour GYRE_MAMBA_DIN_LD (helper m2130, read at every backward): din's
// rows padded to a multiple of 64 elements (the default; kin 324 here -> 384, the padding columns
// never written nor read) or packed (the previous stride). The block against float64 under each
// explicit value, in the same bands as Mamba2Block above (which runs the default); then a bad value
// is an error naming the accepted ones.
TEST_F(RecurrentGpuTest, Mamba2BlockPaddedInGradStride) {
  const ModelSpec s = SmallMamba2();
  for (const char* v : {"64", "packed"}) {
    setenv("GYRE_MAMBA_DIN_LD", v, /*overwrite=*/1);
    CheckBlock(std::string("mamba2 din ld ") + v, s,
               [&](const BuildContext& c) { return std::make_unique<Mamba2Block>(c, s, 3); }, 2, 100);
  }
  unsetenv("GYRE_MAMBA_DIN_LD");
}

[[noreturn]] void Mamba2BackwardUnderInGradStride(const char* value) {
  setenv("GYRE_MAMBA_DIN_LD", value, /*overwrite=*/1);
  BlockForwardBackwardOnCuda<Mamba2Block>(SmallMamba2());
  std::exit(0);
}

TEST_F(RecurrentGpuTest, Mamba2InGradStrideBadValueIsAnError) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(Mamba2BackwardUnderInGradStride("128"),
               "GYRE_MAMBA_DIN_LD must be 64 or packed \\(or unset = 64\\), got '128'");
  EXPECT_EXIT(Mamba2BackwardUnderInGradStride("packed"), ::testing::ExitedWithCode(0), "");
}

// ---------------------------------------------------------------- fused conv + q/k/v forward

// The mLSTM block's conv1d forward + q/k/v block-diagonal maps + gates in one launch
// (CudaBackend::MlstmConvQkv; GYRE_MLSTM_CONV_QKV=fused in the blocks) against float64, and
// against the three separate launches on the same inputs: x_c, q, k, v the same bits, ig / fg the
// same sums in another fp32 order; a second fused call gives the same bits. B x S rows with
// sequences shorter than the conv window (S 2), not multiples of the 8-row tiles, and channel
// counts with a partly live second column block (p 200: 50 of 64 lanes).
void CheckConvQkv(int64_t B, int64_t S, int64_t p, int64_t heads, int64_t K, bool silu) {
  Rng rng(53 + B * 7 + S);
  const int64_t rows = B * S, blocks = p / 4, width = 3 * p;
  const std::string name = "mlstm conv+qkv fused B " + std::to_string(B) + " S " + std::to_string(S) + " p " +
                           std::to_string(p) + " heads " + std::to_string(heads) + " K " + std::to_string(K) +
                           (silu ? " silu" : "");
  const Tensor xm = RandomBf16Host({rows, p}, 1.0, &rng), cw = RandomBf16Host({p, K}, 0.5, &rng),
               cb = RandomBf16Host({p}, 0.5, &rng), wi = RandomBf16Host({heads, width}, 0.2, &rng),
               wf = RandomBf16Host({heads, width}, 0.2, &rng), bi = RandomBf16Host({heads}, 1.0, &rng),
               bf = RandomBf16Host({heads}, 1.0, &rng);
  Tensor wm[3];
  for (int m = 0; m < 3; ++m) wm[m] = RandomBf16Host({blocks, 4, 4}, 0.5, &rng);
  // float64 reference: xc = [SiLU](bias + Σ_j w_j xm_{t-(K-1)+j}) within each sequence; q, k from
  // xc, v from xm; ig, fg = bias + [q | k | v]·w.
  Tensor xc_ref = Tensor::Zeros({rows, p}, DType::kF64), y_ref[3], ig_ref = Tensor::Zeros({rows, heads}, DType::kF64),
         fg_ref = ig_ref.Clone();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < p; ++c) {
      double u = cb.At(c);
      for (int64_t j = 0; j < K; ++j) {
        const int64_t t = r % S - (K - 1) + j;
        if (t >= 0) u += cw.At(c * K + j) * xm.At((r - (K - 1) + j) * p + c);
      }
      xc_ref.Set(r * p + c, silu ? SiluD(u) : u);
    }
  for (int m = 0; m < 3; ++m) {
    y_ref[m] = Tensor::Zeros({rows, p}, DType::kF64);
    const Tensor& x = m == 2 ? xm : xc_ref;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < p; ++c) {
        const int64_t b = c / 4, o = c % 4;
        double y = 0;
        for (int64_t i = 0; i < 4; ++i) y += wm[m].At((b * 4 + o) * 4 + i) * x.At(r * p + b * 4 + i);
        y_ref[m].Set(r * p + c, y);
      }
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t h = 0; h < heads; ++h) {
      double si = bi.At(h), sf = bf.At(h);
      for (int64_t j = 0; j < width; ++j) {
        const double y = y_ref[j / p].At(r * p + j % p);
        si += y * wi.At(h * width + j);
        sf += y * wf.At(h * width + j);
      }
      ig_ref.Set(r * heads + h, si);
      fg_ref.Set(r * heads + h, sf);
    }
  const Tensor xmd = ToCudaBf16(xm), cwd = DevF32(cw), cbd = DevF32(cb), wid = DevF32(wi), wfd = DevF32(wf),
               bid = DevF32(bi), bfd = DevF32(bf);
  Tensor wmd[3];
  for (int m = 0; m < 3; ++m) wmd[m] = DevF32(wm[m]);
  // Outputs of run 0 (fused), 1 (fused again), 2 (separate launches), NaN-poisoned.
  struct Out {
    Tensor xc, y[3], ig, fg;
  } out[3];
  for (int run = 0; run < 3; ++run) {
    Out& o = out[run];
    o.xc = Poison({rows, p});
    for (Tensor& y : o.y) y = Poison({rows, p});
    o.ig = Tensor::Full({rows, heads}, DType::kF32, NAN, Device::kCuda);
    o.fg = o.ig.Clone();
    Conv1dArgs conv;
    conv.batch = B; conv.seq = S; conv.channels = p; conv.width = K; conv.silu = silu;
    conv.x = xmd.raw(); conv.w = cwd.data<float>(); conv.bias = cbd.data<float>(); conv.y = o.xc.raw();
    MlstmGateArgs g;
    g.rows = rows; g.inner = p; g.heads = heads;
    g.wi = wid.data<float>(); g.wf = wfd.data<float>();
    g.ig = o.ig.data<float>(); g.fg = o.fg.data<float>();
    MlstmGateArgs g_bias = g;
    g_bias.bi = bid.data<float>(); g_bias.bf = bfd.data<float>();
    BlockDiagArgs maps[2];
    for (int pass = 0; pass < 2; ++pass) {
      BlockDiagArgs& a = maps[pass];
      a.rows = rows; a.blocks = blocks; a.block_in = 4; a.block_out = 4;
      a.x = (pass == 0 ? o.xc : xmd).raw(); a.ldx = p; a.ldy = p;
      a.w = wmd[pass == 0 ? 0 : 2].data<float>(); a.y = o.y[pass == 0 ? 0 : 2].raw();
      a.gates = pass == 0 ? &g_bias : &g;
      a.gate_col = pass == 0 ? 0 : 2 * p;
      if (pass == 0) { a.w2 = wmd[1].data<float>(); a.y2 = o.y[1].raw(); a.gate_col2 = p; }
    }
    if (run < 2) {
      Cuda().SetOpProfiling(true);
      Cuda().MlstmConvQkv(conv, maps[0], maps[1]);
      bool fused_ran = false;
      for (const auto& t : Cuda().TakeOpProfile()) fused_ran |= t.label.find("(fused)") != std::string::npos;
      Cuda().SetOpProfiling(false);
      EXPECT_TRUE(fused_ran) << name << ": the fused kernel did not take these arguments";
    } else {
      Cuda().Conv1d(false, conv);
      Cuda().BlockDiag(false, maps[0]);
      Cuda().BlockDiag(false, maps[1]);
    }
  }
  const Out& f = out[0];
  EXPECT_TRUE(Check(name + " xc", f.xc, xc_ref, 1e-2));
  EXPECT_TRUE(Check(name + " q", f.y[0], y_ref[0], 1e-2));
  EXPECT_TRUE(Check(name + " k", f.y[1], y_ref[1], 1e-2));
  EXPECT_TRUE(Check(name + " v", f.y[2], y_ref[2], 1e-2));
  EXPECT_TRUE(Check(name + " ig", f.ig, ig_ref, 1e-2));
  EXPECT_TRUE(Check(name + " fg", f.fg, fg_ref, 1e-2));
  // Against the separate launches: the gates from the same bf16 q, k, v, summed in another order.
  EXPECT_TRUE(Check(name + " ig vs separate", f.ig, out[2].ig, 1e-5));
  EXPECT_TRUE(Check(name + " fg vs separate", f.fg, out[2].fg, 1e-5));
  const char* names[4] = {"xc", "q", "k", "v"};
  for (int i = 0; i < 4; ++i) {
    const Tensor& a = i == 0 ? f.xc : f.y[i - 1];
    const Tensor& s = i == 0 ? out[2].xc : out[2].y[i - 1];
    const Tensor& again = i == 0 ? out[1].xc : out[1].y[i - 1];
    const bool same = HostBytes(a) == HostBytes(s), repeat = HostBytes(a) == HostBytes(again);
    std::printf("[%s] %s %s: bitwise equal to the separate launches %d, to a second fused call %d\n",
                same && repeat ? "PASS" : "FAIL", name.c_str(), names[i], same, repeat);
    EXPECT_TRUE(same && repeat);
  }
  const bool gates_repeat = HostBytes(f.ig) == HostBytes(out[1].ig) && HostBytes(f.fg) == HostBytes(out[1].fg);
  std::printf("[%s] %s ig, fg: bitwise equal to a second fused call %d\n", gates_repeat ? "PASS" : "FAIL",
              name.c_str(), gates_repeat);
  EXPECT_TRUE(gates_repeat);
}

TEST_F(RecurrentGpuTest, MlstmConvQkvFusedKernel) {
  CheckConvQkv(3, 13, 200, 3, 4, true);    // 39 rows; second column block 18 of 32 lanes live
  CheckConvQkv(5, 2, 128, 4, 4, true);     // sequences shorter than the window: every tile crosses 4 starts
  CheckConvQkv(1, 37, 256, 1, 3, true);    // width 3, one head
  CheckConvQkv(2, 300, 512, 4, 4, false);  // 600 rows: 3 row chunks of 256; no SiLU
  CheckConvQkv(4, 512, 1536, 4, 4, true);  // the 125M block's width: 12 column blocks, 8 row chunks
}

// The fused forward is the default (the other xLSTM tests run it); these run the blocks and a
// model with the three separate launches (GYRE_MLSTM_CONV_QKV=separate, and what shapes the fused
// kernel does not cover take): float64 checks of the output and every gradient, and training
// bitwise reproducible.
// One of ops' process-wide switches (recurrent_blocks.h: a getter and a setter) set for a test's
// scope and restored after it.
template <typename T>
class ScopedSwitch {
 public:
  ScopedSwitch(T (*get)(), void (*set)(T), T value) : set_(set), was_(get()) { set(value); }
  ~ScopedSwitch() { set_(was_); }
  ScopedSwitch(const ScopedSwitch&) = delete;
  ScopedSwitch& operator=(const ScopedSwitch&) = delete;

 private:
  void (*set_)(T);
  T was_;
};

// An mLSTM block (layer 3 of SmallXlstm) against float64 at B 2 T 100 and B 3 T 37 under the switch
// the caller holds (`label` names it in the lines: "mlstm [<label>] ...").
void CheckMlstmBlockUnder(const std::string& label) {
  const ModelSpec s = SmallXlstm();
  const auto make = [&](const BuildContext& c) { return std::make_unique<MlstmBlock>(c, s, 3); };
  CheckBlock("mlstm [" + label + "]", s, make, 2, 100);
  CheckBlock("mlstm [" + label + "] B 3 T 37", s, make, 3, 37);
}

// One of the mLSTM block's environment switches as its death tests see it: the variable (read
// once a process), the values it accepts (in its error message's order), the block's spec, and
// whether the switch's getter says it took `value`.
struct MlstmSwitch {
  const char* env;
  std::vector<std::string> accepted;
  ModelSpec spec;
  bool (*took)(const std::string& value);
};

// env=value through an mLSTM block's forward and backward: aborts naming the accepted values if
// the value is rejected, else exits 0 if the switch took it (3 if not).
[[noreturn]] void MlstmBlockUnderSwitch(const MlstmSwitch& sw, const std::string& value) {
  setenv(sw.env, value.c_str(), /*overwrite=*/1);
  BlockForwardBackwardOnCuda<MlstmBlock>(sw.spec);
  std::exit(sw.took(value) ? 0 : 3);
}

// Each `rejected` value dies with "<env> must be <a> or <b>, got '<value>'"; each accepted value
// exits 0, taken. Each case in a fresh process (the "threadsafe" death-test style re-executes
// this binary).
void ExpectSwitchValues(const MlstmSwitch& sw, const std::vector<std::string>& rejected) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  std::string listed;
  for (const std::string& v : sw.accepted) listed += (listed.empty() ? "" : " or ") + v;
  for (const std::string& v : rejected) {
    EXPECT_DEATH(MlstmBlockUnderSwitch(sw, v), std::string(sw.env) + " must be " + listed + ", got '" + v + "'");
  }
  for (const std::string& v : sw.accepted) {
    EXPECT_EXIT(MlstmBlockUnderSwitch(sw, v), ::testing::ExitedWithCode(0), "") << sw.env << "=" << v;
  }
}

struct SeparateConvQkv : ScopedSwitch<bool> {
  SeparateConvQkv() : ScopedSwitch(MlstmConvQkvFused, SetMlstmConvQkvFused, false) {}
};

TEST_F(RecurrentGpuTest, MlstmBlockWithSeparateConvQkv) {
  SeparateConvQkv separate;
  CheckMlstmBlockUnder("conv_qkv separate");
}

TEST_F(RecurrentGpuTest, MlstmConvQkvSwitchValues) {
  ExpectSwitchValues({"GYRE_MLSTM_CONV_QKV", {"separate", "fused"}, SmallXlstm(),
                      [](const std::string& v) { return MlstmConvQkvFused() == (v == "fused"); }},
                     {"on"});
}

// ---------------------------------------------------------------- fused conv + v backward

// The mLSTM block's conv1d backward + v block-diagonal backward with its gates in one launch
// (CudaBackend::MlstmConvVBackward; GYRE_MLSTM_CONV_V_BWD=fused in the blocks) against float64:
// dxm (= the conv's dx + the v map's dx), conv dw / dbias, dWv, the gate weight gradients of v's
// columns (the q / k columns untouched), the gate bias sums; accumulating onto random gradients
// and overwriting them (the first-write rule), the separate launches on the same inputs, and a
// second fused call (bitwise). B x S rows with the conv's causal boundary at every sequence start,
// sequences shorter than the window (S 2), odd row counts, runs not filling the 64-row warps or
// the 256-row blocks (S 300, 517), and a partly live second column block (p 200: 50 of 64 lanes).
void CheckConvVBwd(int64_t B, int64_t S, int64_t p, int64_t heads, int64_t K, bool silu) {
  Rng rng(71 + B * 5 + S + K);
  const int64_t rows = B * S, blocks = p / 4, width = 3 * p, G = 2 * heads;
  const std::string name = "mlstm conv+v bwd fused B " + std::to_string(B) + " S " + std::to_string(S) + " p " +
                           std::to_string(p) + " heads " + std::to_string(heads) + " K " + std::to_string(K) +
                           (silu ? " silu" : "");
  const Tensor xm = RandomBf16Host({rows, p}, 1.0, &rng), dxc = RandomBf16Host({rows, p}, 1.0, &rng),
               dv = RandomBf16Host({rows, p}, 1.0, &rng), cw = RandomBf16Host({p, K}, 0.5, &rng),
               cb = RandomBf16Host({p}, 0.5, &rng), wv = RandomBf16Host({blocks, 4, 4}, 0.5, &rng),
               wi = RandomBf16Host({heads, width}, 0.2, &rng), wf = RandomBf16Host({heads, width}, 0.2, &rng);
  Tensor dig = RandomBf16Host({rows, heads}, 1.0, &rng), dfg = RandomBf16Host({rows, heads}, 1.0, &rng);
  for (Tensor* t : {&dig, &dfg})  // fp32 in training: low mantissa bits set
    for (int64_t i = 0; i < t->numel(); ++i) t->Set(i, static_cast<double>(static_cast<float>(t->At(i) * 1.3719)));
  // The gradients' previous values (accumulated onto unless overwriting).
  const Tensor cdw0 = RandomBf16Host({p, K}, 1.0, &rng), cdb0 = RandomBf16Host({p}, 1.0, &rng),
               dwv0 = RandomBf16Host({blocks, 4, 4}, 1.0, &rng), dwi0 = RandomBf16Host({heads, width}, 1.0, &rng),
               dwf0 = RandomBf16Host({heads, width}, 1.0, &rng), dbi0 = RandomBf16Host({heads}, 1.0, &rng),
               dbf0 = RandomBf16Host({heads}, 1.0, &rng);
  auto dgate = [&](int64_t r, int64_t t) { return t < heads ? dig.At(r * heads + t) : dfg.At(r * heads + t - heads); };
  // float64 reference of the sums alone (the previous values added per run below).
  Tensor dxm_ref = Tensor::Zeros({rows, p}, DType::kF64), cdw = Tensor::Zeros({p, K}, DType::kF64),
         cdb = Tensor::Zeros({p}, DType::kF64), dwv = Tensor::Zeros({blocks, 4, 4}, DType::kF64),
         dwi = Tensor::Zeros({heads, width}, DType::kF64), dwf = dwi.Clone(), dbi = Tensor::Zeros({heads}, DType::kF64),
         dbf = dbi.Clone();
  std::vector<double> du(rows * p);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < p; ++c) {
      double u = cb.At(c);
      for (int64_t j = 0; j < K; ++j)
        if (r % S - (K - 1) + j >= 0) u += cw.At(c * K + j) * xm.At((r - (K - 1) + j) * p + c);
      const double g = dxc.At(r * p + c) * (silu ? DSiluD(u) : 1.0);
      du[r * p + c] = g;
      for (int64_t j = 0; j < K; ++j)
        if (r % S - (K - 1) + j >= 0) cdw.Set(c * K + j, cdw.At(c * K + j) + g * xm.At((r - (K - 1) + j) * p + c));
      cdb.Set(c, cdb.At(c) + g);
    }
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t t = 0; t < G; ++t) (t < heads ? dbi : dbf).Set(t % heads, (t < heads ? dbi : dbf).At(t % heads) + dgate(r, t));
    for (int64_t b = 0; b < blocks; ++b) {
      double d[4], x[4];
      for (int64_t i = 0; i < 4; ++i) x[i] = xm.At(r * p + b * 4 + i);
      for (int64_t o = 0; o < 4; ++o) {
        const int64_t c = b * 4 + o, gc = 2 * p + c;
        d[o] = dv.At(r * p + c);
        double y = 0;
        for (int64_t i = 0; i < 4; ++i) y += wv.At((b * 4 + o) * 4 + i) * x[i];
        for (int64_t h = 0; h < heads; ++h) {
          d[o] += dig.At(r * heads + h) * wi.At(h * width + gc) + dfg.At(r * heads + h) * wf.At(h * width + gc);
          dwi.Set(h * width + gc, dwi.At(h * width + gc) + dig.At(r * heads + h) * y);
          dwf.Set(h * width + gc, dwf.At(h * width + gc) + dfg.At(r * heads + h) * y);
        }
        for (int64_t i = 0; i < 4; ++i) dwv.Set((b * 4 + o) * 4 + i, dwv.At((b * 4 + o) * 4 + i) + d[o] * x[i]);
      }
      for (int64_t i = 0; i < 4; ++i) {
        const int64_t c = b * 4 + i;
        double dx = 0;
        for (int64_t o = 0; o < 4; ++o) dx += d[o] * wv.At((b * 4 + o) * 4 + i);
        // The conv's dx: Σ_j w_j du_{r+K-1-j} over the tokens of r's own sequence.
        for (int64_t j = 0; j < K; ++j)
          if (r % S + K - 1 - j < S) dx += cw.At(c * K + j) * du[(r + K - 1 - j) * p + c];
        dxm_ref.Set(r * p + c, dx);
      }
    }
  }
  const Tensor xmd = ToCudaBf16(xm), dxcd = ToCudaBf16(dxc), dvd = ToCudaBf16(dv), cwd = DevF32(cw), cbd = DevF32(cb),
               wvd = DevF32(wv), wid = DevF32(wi), wfd = DevF32(wf), digd = DevF32(dig), dfgd = DevF32(dfg);
  // Runs: 0 fused accumulating, 1 fused overwriting, 2 the separate launches overwriting.
  struct Out {
    Tensor dxm, cdw, cdb, dwv, dwi, dwf, dbi, dbf;
  } out[3];
  for (int run = 0; run < 3; ++run) {
    Out& o = out[run];
    const bool overwrite = run > 0;
    o.dxm = Poison({rows, p});
    o.cdw = DevF32(cdw0); o.cdb = DevF32(cdb0); o.dwv = DevF32(dwv0);
    o.dwi = DevF32(dwi0); o.dwf = DevF32(dwf0); o.dbi = DevF32(dbi0); o.dbf = DevF32(dbf0);
    Conv1dArgs conv;
    conv.batch = B; conv.seq = S; conv.channels = p; conv.width = K; conv.silu = silu;
    conv.x = xmd.raw(); conv.w = cwd.data<float>(); conv.bias = cbd.data<float>();
    conv.dy = dxcd.raw(); conv.dx = o.dxm.raw();
    conv.dw = o.cdw.data<float>(); conv.dbias = o.cdb.data<float>(); conv.overwrite_dparams = overwrite;
    MlstmGateArgs g;
    g.rows = rows; g.inner = p; g.heads = heads;
    g.wi = wid.data<float>(); g.wf = wfd.data<float>();
    g.dig = digd.data<float>(); g.dfg = dfgd.data<float>();
    g.dwi = o.dwi.data<float>(); g.dwf = o.dwf.data<float>();
    g.dbi = o.dbi.data<float>(); g.dbf = o.dbf.data<float>();
    g.overwrite_dw = g.overwrite_db = overwrite;
    BlockDiagArgs v;
    v.rows = rows; v.blocks = blocks; v.block_in = 4; v.block_out = 4;
    v.x = xmd.raw(); v.ldx = p; v.ldy = p;
    v.w = wvd.data<float>(); v.dy = dvd.raw(); v.dx = o.dxm.raw(); v.accumulate_dx = true;
    v.dw = o.dwv.data<float>(); v.overwrite_dw = overwrite;
    v.gates = &g; v.gate_col = 2 * p;
    if (run < 2) {
      Cuda().SetOpProfiling(true);
      Cuda().MlstmConvVBackward(conv, v);
      bool fused_ran = false;
      for (const auto& t : Cuda().TakeOpProfile()) fused_ran |= t.label.find("(fused)") != std::string::npos;
      Cuda().SetOpProfiling(false);
      EXPECT_TRUE(fused_ran) << name << ": the fused kernel did not take these arguments";
    } else {
      Cuda().Conv1d(true, conv);
      Cuda().BlockDiag(true, v);
    }
  }
  auto plus = [](const Tensor& a, const Tensor& b) {  // a + b in float64
    Tensor s = a.To(DType::kF64);
    for (int64_t i = 0; i < s.numel(); ++i) s.Set(i, s.At(i) + b.At(i));
    return s;
  };
  // The q / k columns of dwi / dwf keep their previous values (overwrite or not).
  auto v_cols = [&](const Tensor& sums, const Tensor& prev, bool overwrite) {
    Tensor s = prev.To(DType::kF64);
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t c = 2 * p; c < width; ++c)
        s.Set(h * width + c, (overwrite ? 0.0 : prev.At(h * width + c)) + sums.At(h * width + c));
    return s;
  };
  for (int run = 0; run < 3; ++run) {
    const Out& o = out[run];
    const bool overwrite = run > 0;
    const std::string n = name + (run == 0 ? " [accumulate]" : run == 1 ? " [overwrite]" : " [separate launches]");
    EXPECT_TRUE(Check(n + " dxm", o.dxm, dxm_ref, 1e-2));
    EXPECT_TRUE(Check(n + " conv dw", o.cdw, overwrite ? cdw : plus(cdw0, cdw), 1e-4));
    EXPECT_TRUE(Check(n + " conv dbias", o.cdb, overwrite ? cdb : plus(cdb0, cdb), 1e-4));
    EXPECT_TRUE(Check(n + " dWv", o.dwv, overwrite ? dwv : plus(dwv0, dwv), 1e-4));
    EXPECT_TRUE(Check(n + " dwi", o.dwi, v_cols(dwi, dwi0, overwrite), 1e-4));
    EXPECT_TRUE(Check(n + " dwf", o.dwf, v_cols(dwf, dwf0, overwrite), 1e-4));
    EXPECT_TRUE(Check(n + " dbi", o.dbi, overwrite ? dbi : plus(dbi0, dbi), 1e-4));
    EXPECT_TRUE(Check(n + " dbf", o.dbf, overwrite ? dbf : plus(dbf0, dbf), 1e-4));
  }
  const bool repeat = HostBytes(out[0].dxm) == HostBytes(out[1].dxm);
  std::printf("[%s] %s dxm: bitwise equal in a second fused call %d\n", repeat ? "PASS" : "FAIL", name.c_str(), repeat);
  EXPECT_TRUE(repeat);
}

TEST_F(RecurrentGpuTest, MlstmConvVBwdFusedKernel) {
  CheckConvVBwd(3, 13, 200, 3, 4, true);    // 39 rows; second column block 18 of 32 lanes live
  CheckConvVBwd(5, 2, 128, 2, 4, true);     // sequences shorter than the window
  CheckConvVBwd(1, 37, 256, 1, 3, true);    // width 3, one head
  CheckConvVBwd(2, 300, 128, 4, 4, true);   // 2 row blocks a sequence, the second with one 44-row run
  CheckConvVBwd(2, 517, 64, 4, 2, false);   // width 2, odd rows, no SiLU
  CheckConvVBwd(2, 1024, 1536, 4, 4, true);  // the 125M block's width: 12 column blocks, 4 row blocks
}

// The fused backward is the default (the other xLSTM tests run it); these run the blocks, a model
// and training with the two separate launches (GYRE_MLSTM_CONV_V_BWD=separate, and what shapes the
// fused kernel does not cover take).
struct SeparateConvVBwd : ScopedSwitch<bool> {
  SeparateConvVBwd() : ScopedSwitch(MlstmConvVBwdFused, SetMlstmConvVBwdFused, false) {}
};

TEST_F(RecurrentGpuTest, MlstmBlockWithSeparateConvVBwd) {
  SeparateConvVBwd separate;
  CheckMlstmBlockUnder("conv_v_bwd separate");
}

TEST_F(RecurrentGpuTest, MlstmConvVBwdSwitchValues) {
  ExpectSwitchValues({"GYRE_MLSTM_CONV_V_BWD", {"separate", "fused"}, SmallXlstm(),
                      [](const std::string& v) { return MlstmConvVBwdFused() == (v == "fused"); }},
                     {"on"});
}

// The q/k backward's row sums: the tensor-core kernel is the default (the other xLSTM tests run it);
// these run the blocks, a model and training with the FMA kernel (GYRE_MLSTM_QK_BWD=fma, and
// what shapes the tensor-core kernel does not cover take).
struct QkBwdMode : ScopedSwitch<MlstmQkBwd> {
  explicit QkBwdMode(MlstmQkBwd mode) : ScopedSwitch(GetMlstmQkBwd, SetMlstmQkBwd, mode) {}
};

TEST_F(RecurrentGpuTest, MlstmBlockWithFmaQkBwd) {
  QkBwdMode mode(MlstmQkBwd::kFma);
  CheckMlstmBlockUnder("qk_bwd fma");
}

TEST_F(RecurrentGpuTest, MlstmQkBwdSwitchValues) {
  ExpectSwitchValues(
      {"GYRE_MLSTM_QK_BWD", {"fma", "tc"}, SmallXlstm(),
       [](const std::string& v) { return GetMlstmQkBwd() == (v == "tc" ? MlstmQkBwd::kTc : MlstmQkBwd::kFma); }},
      {"on", "tc8"});
}

// GYRE_MLSTM_DH_DOT=norm: the output norm's backward forms the cell's dots (its kernel covers heads
// of 384 columns only, so these run 125m-wide heads: inner 768 = 2 x 384 or 1536 = 4 x 384).
struct DhDotInNorm : ScopedSwitch<bool> {
  explicit DhDotInNorm(bool in_norm) : ScopedSwitch(MlstmDhDotInNorm, SetMlstmDhDotInNorm, in_norm) {}
};

ModelSpec WideHeadXlstm(int64_t heads, int64_t width = 384) {
  ModelSpec s = SmallXlstm();
  s.mlstm_heads = heads;
  s.mlstm_inner = width * heads;
  return s;
}

// One mLSTM block's y, dx and parameter gradients (host float64), built as CheckBlock builds its
// GPU block (same seeds: the same bf16 weights every call) and run on the GPU with the dots where
// `dh_dot_in_norm` says, or (cpu) its float64 twin on the CPU.
struct BlockRun {
  Tensor y, dx;
  std::vector<std::pair<std::string, Tensor>> grads;
  bool dots_in_norm = false;  // GPU: the backward ran the out-norm kernel that forms the cell's dots
  std::vector<std::string> backward_ops;  // GPU: the backward's op profile labels, in order
};
BlockRun RunMlstmBlock(const ModelSpec& spec, int64_t B, int64_t T, bool cpu, bool dh_dot_in_norm) {
  DhDotInNorm mode(dh_dot_in_norm);
  ParamStore gpu_store(DType::kF32, Device::kCpu), cpu_store(DType::kF64, Device::kCpu);
  Rng r1(7), r2(7);
  auto gpu = std::make_unique<MlstmBlock>(BuildContext{&gpu_store, &r1, "l"}, spec, 3);
  auto host = std::make_unique<MlstmBlock>(BuildContext{&cpu_store, &r2, "l"}, spec, 3);
  gpu_store.MoveToDevice(Device::kCuda);
  Rng rng(21);
  for (Parameter* p : gpu_store.All()) {
    if (p->kind == ParamKind::kNorm) p->value.CopyFrom(RandomBf16Host(p->value.shape(), 0.3, &rng).To(DType::kF32));
  }
  gpu_store.SyncCompute();
  RoundMastersToBf16(gpu_store);
  EXPECT_TRUE(cpu_store.LoadState(AsF64State(gpu_store)).ok());
  const Tensor x = RandomBf16Host({B, T, spec.d_model}, 1.0, &rng), dy = RandomBf16Host({B, T, spec.d_model}, 1.0, &rng);
  BlockRun out;
  Block& block = cpu ? static_cast<Block&>(*host) : static_cast<Block&>(*gpu);
  ParamStore& store = cpu ? cpu_store : gpu_store;
  out.y = block.Forward(cpu ? x : ToCudaBf16(x), B, T).ToDevice(Device::kCpu).To(DType::kF64);
  if (!cpu) Cuda().SetOpProfiling(true);
  out.dx = block.Backward(cpu ? dy : ToCudaBf16(dy)).ToDevice(Device::kCpu).To(DType::kF64);
  if (!cpu) {
    for (const auto& t : Cuda().TakeOpProfile()) {
      out.dots_in_norm |= t.label.find("+ cell dots") != std::string::npos;
      out.backward_ops.push_back(t.label);
    }
    Cuda().SetOpProfiling(false);
  }
  for (const Parameter* p : store.All()) out.grads.emplace_back(p->name, p->grad.ToDevice(Device::kCpu).To(DType::kF64));
  return out;
}

// The block with the dots in the norm against the block with the cell's own (the default) and
// both against float64: every output of the norm path within 0.1 x the default path's own
// distance from float64 of the default path's value (the two differ only in the dots' fp32
// summation order), and within CheckBlock's float64 bands (1e-2 y, 3e-2 dx, 5e-2 gradients)
// wherever the default path is; where the default path is outside its band too (a cancelling
// sum: B 3 T 37, 2 heads, fgate bias: 0.22 on both paths, session 16 call 2), the line says so
// and only the first check counts.
// width: the head width; expect_norm: whether the norm path covers it (384 always; 512..1024 unless
// GYRE_MLSTM_OUT_NORM=warp; elsewhere both runs take the cell's dots and must agree bitwise).
void CheckDhDotInNormBlock(int64_t heads, int64_t B, int64_t T, int64_t width = 384, bool expect_norm = true) {
  const ModelSpec s = WideHeadXlstm(heads, width);
  const std::string name = "mlstm [dh_dot norm vs cell] heads " + std::to_string(heads) + "x" + std::to_string(width) +
                           " B " + std::to_string(B) + " T " + std::to_string(T) + NormVariant();
  const BlockRun ref = RunMlstmBlock(s, B, T, /*cpu=*/true, false), cell = RunMlstmBlock(s, B, T, false, false),
                 norm = RunMlstmBlock(s, B, T, false, true);
  // (Session 16's call 2 found the two GPU paths bitwise equal in every output at these sizes,
  // before this check existed: the dots' last bits did not reach a rounding.)
  const bool took = norm.dots_in_norm == expect_norm && !cell.dots_in_norm;
  std::printf("[%s] %s: the out-norm kernel with the cell's dots ran under the switch %d (expected %d), not without "
              "it %d\n",
              took ? "PASS" : "FAIL", name.c_str(), norm.dots_in_norm, expect_norm, !cell.dots_in_norm);
  EXPECT_TRUE(took);
  auto one = [&](const std::string& what, const Tensor& n, const Tensor& c, const Tensor& r, double band) {
    bool finite = true;
    for (int64_t i = 0; i < n.numel(); ++i) finite = finite && std::isfinite(n.At(i));
    const double nc = finite ? RelativeError(n, c) : INFINITY, cr = RelativeError(c, r), nr = finite ? RelativeError(n, r) : INFINITY;
    const bool close = nc <= std::max(0.1 * cr, 1e-6);
    const bool band_ok = nr <= band || cr > band;
    std::printf("[%s] %s %s: norm vs cell %.3e (<= 0.1 x cell vs f64 %.3e), norm vs f64 %.3e%s (band %.0e)\n",
                close && band_ok ? "PASS" : "FAIL", name.c_str(), what.c_str(), nc, cr, nr,
                cr > band ? " [the default path is outside the band too]" : "", band);
    EXPECT_TRUE(close && band_ok) << what;
  };
  one("y", norm.y, cell.y, ref.y, 1e-2);
  one("dx", norm.dx, cell.dx, ref.dx, 3e-2);
  ASSERT_EQ(norm.grads.size(), ref.grads.size());
  for (size_t i = 0; i < norm.grads.size(); ++i) {
    one("d" + norm.grads[i].first, norm.grads[i].second, cell.grads[i].second, ref.grads[i].second, 5e-2);
  }
}

TEST_F(RecurrentGpuTest, MlstmBlockWithDhDotInNorm) {
  for (const int64_t heads : {2, 4}) {
    CheckDhDotInNormBlock(heads, 2, 100);
    CheckDhDotInNormBlock(heads, 3, 37);
  }
}

// Heads of 1024 (xlstm[1:0]-1.3b) and 768 through a whole block, dots in the norm vs the cell's vs
// float64: by default (GYRE_MLSTM_OUT_NORM unset = row) the norm path forms the dots
// (group_norm_bwd_mlstm_row); under =warp it does not cover them (both runs the cell's dots). Run
// both ways.
TEST_F(RecurrentGpuTest, MlstmBlockWideHeadsDhDot) {
  const char* e = std::getenv("GYRE_MLSTM_OUT_NORM");
  const bool row = e == nullptr || std::string_view(e) == "row";
  CheckDhDotInNormBlock(2, 2, 100, 1024, row);
  CheckDhDotInNormBlock(1, 3, 37, 1024, row);
  CheckDhDotInNormBlock(2, 3, 37, 768, row);
}

// (The switch's death tests run an mLSTM block with heads of 384, which the norm path covers.)
TEST_F(RecurrentGpuTest, MlstmDhDotSwitchValues) {
  ExpectSwitchValues({"GYRE_MLSTM_DH_DOT", {"cell", "norm"}, WideHeadXlstm(2),
                      [](const std::string& v) { return MlstmDhDotInNorm() == (v == "norm"); }},
                     {"on"});
}

// ---------------------------------------------------------------- fused up projection (GYRE_MLSTM_UP)

// GYRE_MLSTM_UP=fused (ops/recurrent_blocks.h MlstmUpFused; ops/XLSTM_GLUE.md "Session 20"): x_m | z
// from one GEMM, read in rows of 2p; dx_m | dz written into one [rows, 2p] gradient by the conv + v
// backward and the out-norm backward, then one du and one dW GEMM.
struct FusedUp : ScopedSwitch<bool> {
  explicit FusedUp(bool fused) : ScopedSwitch(MlstmUpFused, SetMlstmUpFused, fused) {}
};

int64_t CountDiffering(const Tensor& a, const Tensor& b) {
  int64_t n = 0;
  for (int64_t i = 0; i < a.numel(); ++i) n += a.At(i) != b.At(i) || std::isnan(a.At(i)) != std::isnan(b.At(i));
  return n;
}

bool RanOp(const BlockRun& r, const std::string& label) {
  for (const std::string& l : r.backward_ops) {
    if (l.find(label) != std::string::npos) return true;
  }
  return false;
}

// One block, split vs fused vs float64 (the dots where MlstmDhDotInNorm says): the fused path
// within CheckBlock's float64 bands (1e-2 y, 3e-2 dx, 5e-2 gradients) wherever the split path is,
// and no farther from float64 than 1.25 x the split path's distance (+1e-6); the same out-norm
// kernel kind (with the cell's dots or not) and the fused conv + v backward on both; and the
// forward's y bit for bit or not (reported: the GEMM's k-order per element is the same, so y is
// bitwise unless cuBLASLt plans N = 2p differently).
void CheckFusedUpBlock(const ModelSpec& s, int64_t B, int64_t T) {
  const bool dots = MlstmDhDotInNorm();
  const std::string name = "mlstm [up fused vs split] inner " + std::to_string(s.mlstm_inner) + " heads " +
                           std::to_string(s.mlstm_heads) + " B " + std::to_string(B) + " T " + std::to_string(T) +
                           (dots ? " dots in norm" : " dots in cell") + NormVariant();
  const BlockRun ref = RunMlstmBlock(s, B, T, /*cpu=*/true, dots);
  BlockRun split, fused;
  {
    FusedUp up(false);
    split = RunMlstmBlock(s, B, T, false, dots);
  }
  {
    FusedUp up(true);
    fused = RunMlstmBlock(s, B, T, false, dots);
  }
  const bool conv_v = MlstmConvVBwdFused();
  const bool same_kernels = fused.dots_in_norm == split.dots_in_norm &&
                            RanOp(fused, "Conv1d + BlockDiag v backward (fused)") == conv_v &&
                            RanOp(split, "Conv1d + BlockDiag v backward (fused)") == conv_v;
  std::printf("[%s] %s: cell dots in the norm kernel fused %d split %d; fused conv + v backward fused %d split %d "
              "(switch %d)\n",
              same_kernels ? "PASS" : "FAIL", name.c_str(), fused.dots_in_norm, split.dots_in_norm,
              RanOp(fused, "Conv1d + BlockDiag v backward (fused)"), RanOp(split, "Conv1d + BlockDiag v backward (fused)"),
              conv_v);
  EXPECT_TRUE(same_kernels);
  std::printf("[INFO] %s: y bitwise %s (%ld of %ld elements differ)\n", name.c_str(),
              CountDiffering(fused.y, split.y) == 0 ? "EQUAL" : "DIFFERENT", (long)CountDiffering(fused.y, split.y),
              (long)fused.y.numel());
  auto one = [&](const std::string& what, const Tensor& f, const Tensor& sp, const Tensor& r, double band) {
    bool finite = true;
    for (int64_t i = 0; i < f.numel(); ++i) finite = finite && std::isfinite(f.At(i));
    const double fr = finite ? RelativeError(f, r) : INFINITY, sr = RelativeError(sp, r);
    const double fs = finite ? RelativeError(f, sp) : INFINITY;
    const bool ok = (fr <= band || sr > band) && fr <= 1.25 * sr + 1e-6;
    std::printf("[%s] %s %s: fused vs f64 %.3e, split vs f64 %.3e (fused <= 1.25 x split + 1e-6), fused vs split "
                "%.3e%s (band %.0e)\n",
                ok ? "PASS" : "FAIL", name.c_str(), what.c_str(), fr, sr, fs,
                sr > band ? " [the split path is outside the band too]" : "", band);
    EXPECT_TRUE(ok) << what;
  };
  one("y", fused.y, split.y, ref.y, 1e-2);
  one("dx", fused.dx, split.dx, ref.dx, 3e-2);
  ASSERT_EQ(fused.grads.size(), ref.grads.size());
  for (size_t i = 0; i < fused.grads.size(); ++i) {
    one("d" + fused.grads[i].first, fused.grads[i].second, split.grads[i].second, ref.grads[i].second, 5e-2);
  }
}

// The out-norm kernels that write dz in rows of 2p: 384-wide heads (the prefetch kernel, with the
// cell's dots and without), 1024 and 768 (group_norm_bwd_mlstm_row unless GYRE_MLSTM_OUT_NORM=warp;
// _vec then), the small model's 2 x 64 (_vec 16 lanes; odd row counts at T 37).
TEST_F(RecurrentGpuTest, MlstmBlockWithFusedUp) {
  {
    FusedUp up(true);
    CheckMlstmBlockUnder("up fused");
  }
  for (const bool dots : {true, false}) {
    DhDotInNorm in_norm(dots);
    CheckFusedUpBlock(WideHeadXlstm(2), 2, 100);
    CheckFusedUpBlock(WideHeadXlstm(4), 3, 37);
    CheckFusedUpBlock(WideHeadXlstm(2, 1024), 2, 100);
    CheckFusedUpBlock(WideHeadXlstm(1, 768), 3, 37);
    CheckFusedUpBlock(SmallXlstm(), 3, 37);
  }
}

// The non-default conv paths under the fused up projection: the plain conv1d kernels get x_m
// packed by CudaBackend::Conv1d's copy, the block-diagonal v map reads x_m / writes dx_m in rows of
// 2p, the conv backward writes dx_m in rows of 2p (its dx_row_stride).
TEST_F(RecurrentGpuTest, MlstmBlockWithFusedUpAndSeparateConvs) {
  SeparateConvQkv separate_fwd;
  SeparateConvVBwd separate_bwd;
  {
    FusedUp up(true);
    CheckMlstmBlockUnder("up fused, conv_qkv + conv_v_bwd separate");
  }
  CheckFusedUpBlock(WideHeadXlstm(2), 2, 100);
  CheckFusedUpBlock(SmallXlstm(), 3, 37);
}

TEST_F(RecurrentGpuTest, MlstmUpSwitchValues) {
  ExpectSwitchValues({"GYRE_MLSTM_UP", {"split", "fused"}, SmallXlstm(),
                      [](const std::string& v) { return MlstmUpFused() == (v == "fused"); }},
                     {"on", "one"});
}

// The preset widths' GEMM shapes (one block, GPU only): the forward's y split vs fused bit for
// bit or not (reported; within 4e-3 of each other either way), dx and every gradient within 2e-2 of
// the split path's. xlstm[1:0]-125m at B16 x 2048 (N 3072 vs 2 x 1536), xlstm[1:0]-1.3b at B4 x 2048
// (N 8192 vs 2 x 4096): the shapes the step bench times.
TEST_F(RecurrentGpuTest, MlstmFusedUpAtPresetShapes) {
  for (const auto& [preset, B] : {std::pair<const char*, int64_t>{"xlstm[1:0]-125m", 16}, {"xlstm[1:0]-1.3b", 4}}) {
    const ModelSpec s = *PresetSpec(preset);
    const int64_t T = 2048;
    BlockRun split, fused;
    {
      FusedUp up(false);
      split = RunMlstmBlock(s, B, T, false, MlstmDhDotInNorm());
    }
    {
      FusedUp up(true);
      fused = RunMlstmBlock(s, B, T, false, MlstmDhDotInNorm());
    }
    const int64_t differ = CountDiffering(fused.y, split.y);
    const double ey = RelativeError(fused.y, split.y), edx = RelativeError(fused.dx, split.dx);
    double eg = 0.0;
    std::string worst;
    for (size_t i = 0; i < fused.grads.size(); ++i) {
      const double e = RelativeError(fused.grads[i].second, split.grads[i].second);
      if (e > eg) {
        eg = e;
        worst = fused.grads[i].first;
      }
    }
    const bool ok = ey <= 4e-3 && edx <= 2e-2 && eg <= 2e-2;
    std::printf("[%s] %s B %ld T %ld up fused vs split: y bitwise %s (%ld of %ld differ, rel %.3e <= 4e-3), dx rel "
                "%.3e, worst gradient d%s rel %.3e (<= 2e-2)\n",
                ok ? "PASS" : "FAIL", preset, (long)B, (long)T, differ == 0 ? "EQUAL" : "DIFFERENT", (long)differ,
                (long)fused.y.numel(), ey, edx, worst.c_str(), eg);
    EXPECT_TRUE(ok);
  }
}

// The 7B layout's 8 mLSTM heads (the 16-gate kernels) through a whole block.
TEST_F(RecurrentGpuTest, MlstmBlockEightHeads) {
  ModelSpec s = SmallXlstm();
  s.mlstm_heads = 8;
  s.mlstm_inner = 512;  // 8 heads x 64
  CheckBlock("mlstm 8 heads", s, [&](const BuildContext& c) { return std::make_unique<MlstmBlock>(c, s, 3); }, 2, 70);
}

void CheckModel(const ModelSpec& spec) {
  const int64_t B = 2, T = 100;
  auto gpu = LanguageModel::Create(spec, DType::kF32, Device::kCuda, 3);
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  auto cpu = LanguageModel::Create(spec, DType::kF64, Device::kCpu, 3);
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  RoundMastersToBf16((*gpu)->params());
  ASSERT_TRUE((*cpu)->params().LoadState(AsF64State((*gpu)->params())).ok());
  const auto tokens = RandomTokens(B * (T + 1), spec.vocab_size, 5);
  const double scale = 1.0 / (B * T);
  (*gpu)->params().ZeroGrad();
  (*cpu)->params().ZeroGrad();
  const LossResult lg = (*gpu)->ForwardBackward(tokens, B, T, scale);
  SetMamba2GradTermRecording(true);
  const LossResult lc = (*cpu)->ForwardBackward(tokens, B, T, scale);
  SetMamba2GradTermRecording(false);
  const std::vector<Mamba2GradTerms> terms = TakeMamba2GradTerms();
  const double loss_err = std::fabs(lg.loss - lc.loss) / lc.loss;
  std::printf("[%s] %s loss gpu %.6f cpu(f64) %.6f rel_err %.3e tol 2e-3\n", loss_err <= 2e-3 ? "PASS" : "FAIL",
              spec.preset.c_str(), lg.loss, lc.loss, loss_err);
  EXPECT_LE(loss_err, 2e-3);
  EXPECT_EQ(lg.tokens, lc.tokens);
  EXPECT_TRUE(CheckGradsWithTerms((*gpu)->params(), (*cpu)->params(), spec.preset, 5e-2, terms));
}

TEST_F(RecurrentGpuTest, XlstmModelLossAndEveryGradient) { CheckModel(SmallXlstm()); }
TEST_F(RecurrentGpuTest, XlstmModelWithSeparateConvQkv) {
  SeparateConvQkv separate;
  CheckModel(SmallXlstm());
}
TEST_F(RecurrentGpuTest, XlstmModelWithSeparateConvVBwd) {
  SeparateConvVBwd separate;
  CheckModel(SmallXlstm());
}
TEST_F(RecurrentGpuTest, XlstmModelWithFmaQkBwd) {
  QkBwdMode mode(MlstmQkBwd::kFma);
  CheckModel(SmallXlstm());
}
TEST_F(RecurrentGpuTest, XlstmModelWithFusedUp) {
  FusedUp up(true);
  CheckModel(SmallXlstm());
}
TEST_F(RecurrentGpuTest, Mamba2ModelLossAndEveryGradient) { CheckModel(SmallMamba2()); }
TEST_F(RecurrentGpuTest, HybridModelLossAndEveryGradient) { CheckModel(SmallHybrid()); }

std::vector<int32_t> CycleTokens(int64_t B, int64_t T, int64_t vocab, Rng* rng) {
  std::vector<int32_t> tokens(B * (T + 1));
  for (int64_t b = 0; b < B; ++b) {
    const int64_t start = rng->Below(37);
    for (int64_t t = 0; t <= T; ++t) tokens[b * (T + 1) + t] = static_cast<int32_t>(((start + t) % 37) * 13 % vocab);
  }
  return tokens;
}

void TrainTwentySteps(const ModelSpec& spec) {
  const int64_t B = 2, T = 100;
  auto gpu = LanguageModel::Create(spec, DType::kF32, Device::kCuda, 4);
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  auto cpu = LanguageModel::Create(spec, DType::kF32, Device::kCpu, 4);
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  std::vector<NamedTensor> state;
  for (const Parameter* p : (*gpu)->params().All()) state.push_back({p->name, p->value.ToDevice(Device::kCpu)});
  ASSERT_TRUE((*cpu)->params().LoadState(state).ok());
  TrainOptions opt;
  opt.schedule.peak_lr = 3e-3;
  opt.schedule.warmup_steps = 5;
  opt.grad_clip = 1.0;
  Trainer tg(gpu->get(), opt), tc(cpu->get(), opt);
  Rng rng(9);
  double first_g = 0, last_g = 0, max_err = 0;
  for (int step = 0; step < 20; ++step) {
    const auto tokens = CycleTokens(B, T, spec.vocab_size, &rng);
    auto sg = tg.Step(tokens, B, T, step);
    auto sc = tc.Step(tokens, B, T, step);
    ASSERT_TRUE(sg.ok()) << sg.status();
    ASSERT_TRUE(sc.ok()) << sc.status();
    const double err = std::fabs(sg->loss.loss - sc->loss.loss) / sc->loss.loss;
    max_err = std::max(max_err, err);
    std::printf("%s step %2d loss gpu %.5f cpu %.5f rel %.2e | grad_norm gpu %.4f cpu %.4f\n", spec.preset.c_str(),
                step, sg->loss.loss, sc->loss.loss, err, sg->update.grad_norm, sc->update.grad_norm);
    if (step == 0) first_g = sg->loss.loss;
    last_g = sg->loss.loss;
  }
  const bool ok = max_err <= 3e-2;
  std::printf("[%s] %s 20 AdamW steps: max loss rel_err %.3e tol 3e-2; gpu loss %.4f -> %.4f\n", ok ? "PASS" : "FAIL",
              spec.preset.c_str(), max_err, first_g, last_g);
  EXPECT_TRUE(ok);
  EXPECT_LT(last_g, 0.8 * first_g);  // it learns the cycle
}

TEST_F(RecurrentGpuTest, XlstmTwentyAdamWStepsTrackTheCpu) { TrainTwentySteps(SmallXlstm()); }
TEST_F(RecurrentGpuTest, Mamba2TwentyAdamWStepsTrackTheCpu) { TrainTwentySteps(SmallMamba2()); }
TEST_F(RecurrentGpuTest, HybridTwentyAdamWStepsTrackTheCpu) { TrainTwentySteps(SmallHybrid()); }

// FusedAdamW's step count is restored by AdamW::LoadState: an optimizer resumed from State()
// makes the same update as the one that kept running (bias correction depends on t).
TEST_F(RecurrentGpuTest, AdamWLoadStateRestoresTheStepOnCuda) {
  const ModelSpec spec = SmallMamba2();
  const int64_t B = 2, T = 64;
  auto a = LanguageModel::Create(spec, DType::kF32, Device::kCuda, 5);
  auto b = LanguageModel::Create(spec, DType::kF32, Device::kCuda, 6);
  ASSERT_TRUE(a.ok() && b.ok());
  AdamW opt_a(&(*a)->params(), {});
  Rng rng(3);
  auto grads = [&](LanguageModel& m, const std::vector<int32_t>& tokens) {
    m.params().ZeroGrad();
    m.ForwardBackward(tokens, B, T, 1.0 / (B * T));
  };
  for (int s = 0; s < 3; ++s) {
    grads(**a, RandomTokens(B * (T + 1), spec.vocab_size, 10 + s));
    opt_a.Step(1e-3);
  }
  ASSERT_TRUE((*b)->params().LoadState((*a)->params().State()).ok());
  (*b)->params().SyncCompute();
  AdamW opt_b(&(*b)->params(), {});
  ASSERT_TRUE(opt_b.LoadState(opt_a.State()).ok());
  EXPECT_EQ(opt_b.steps_taken(), 3);
  const auto tokens = RandomTokens(B * (T + 1), spec.vocab_size, 99);
  grads(**a, tokens);
  grads(**b, tokens);
  opt_a.Step(1e-3);
  opt_b.Step(1e-3);
  double worst = 0;
  for (const Parameter* p : (*a)->params().All())
    worst = std::max(worst, RelativeError(p->value, (*b)->params().Find(p->name)->value));
  std::printf("[%s] resumed AdamW step 4 vs uninterrupted: worst weight rel_err %.3e tol 1e-5\n",
              worst <= 1e-5 ? "PASS" : "FAIL", worst);
  EXPECT_LE(worst, 1e-5);
}

// ---------------------------------------------------------------- bitwise reproducibility

// TrainStepsForBits / CompareBits (ops/gpu_check.h): three AdamW steps (the deferred-zero step
// path of Trainer) from a fresh model of seed 11, kept bit for bit, and two runs compared.
void ExpectBitwiseReproducible(const ModelSpec& spec, int64_t B, int64_t T) {
  const TrainBits a = TrainStepsForBits(spec, B, T), b = TrainStepsForBits(spec, B, T);
  ASSERT_EQ(a.names, b.names);
  ASSERT_EQ(a.losses.size(), 3u);
  ASSERT_EQ(b.losses.size(), 3u);
  for (size_t i = 0; i < a.losses.size(); ++i) {
    std::printf("%s step %zu loss %.17g / %.17g grad_norm %.17g / %.17g\n", spec.preset.c_str(), i, a.losses[i],
                b.losses[i], a.grad_norms[i], b.grad_norms[i]);
  }
  const BitsDiff d = CompareBits(a, b);
  const std::string first = d.Names(400, /*tagged=*/true);
  const bool ok = d.Same();
  std::printf("[%s] bitwise %s B %ld T %ld, 3 steps twice: steps differing %d/3, parameters %d/%zu, gradients "
              "%d/%zu%s%s\n",
              ok ? "PASS" : "FAIL", spec.preset.c_str(), (long)B, (long)T, d.steps, d.values, a.names.size(),
              d.grads, a.names.size(), first.empty() ? "" : "; first:", first.c_str());
  EXPECT_TRUE(ok);
}

// 8 x 256 = 2048 rows: 2 column blocks of the q/k/v gate sums per launch, 4 row chunks of the
// block-diagonal backward, 32 row blocks of each group-norm backward.
TEST_F(RecurrentGpuTest, XlstmTrainingIsBitwiseReproducible) { ExpectBitwiseReproducible(SmallXlstm(), 8, 256); }
TEST_F(RecurrentGpuTest, XlstmTrainingWithSeparateConvQkvIsBitwiseReproducible) {
  SeparateConvQkv separate;
  ExpectBitwiseReproducible(SmallXlstm(), 8, 256);
}
TEST_F(RecurrentGpuTest, XlstmTrainingWithSeparateConvVBwdIsBitwiseReproducible) {
  SeparateConvVBwd separate;
  ExpectBitwiseReproducible(SmallXlstm(), 8, 256);
}
TEST_F(RecurrentGpuTest, XlstmTrainingWithFmaQkBwdIsBitwiseReproducible) {
  QkBwdMode mode(MlstmQkBwd::kFma);
  ExpectBitwiseReproducible(SmallXlstm(), 8, 256);
}
// (The model against float64 with the dots in the norm: here, after CheckModel.)
TEST_F(RecurrentGpuTest, XlstmModelWithDhDotInNorm) {
  DhDotInNorm in_norm(true);
  CheckModel(WideHeadXlstm(2));
}

TEST_F(RecurrentGpuTest, XlstmTrainingWithDhDotInNormIsBitwiseReproducible) {
  DhDotInNorm in_norm(true);
  ExpectBitwiseReproducible(WideHeadXlstm(2), 8, 256);
}

TEST_F(RecurrentGpuTest, XlstmTrainingWithFusedUpIsBitwiseReproducible) {
  FusedUp up(true);
  ExpectBitwiseReproducible(SmallXlstm(), 8, 256);
}

// Three AdamW steps split vs fused: the first step's loss (the forward only) bit for bit or not
// (reported), every loss within 1e-4 relative and every grad norm within 1e-2 (the backward's du
// and dW round differently: K = 2p in one GEMM against p + p with a bf16 rounding between).
void CompareFusedUpTraining(const ModelSpec& spec, int64_t B, int64_t T) {
  TrainBits split, fused;
  {
    FusedUp up(false);
    split = TrainStepsForBits(spec, B, T);
  }
  {
    FusedUp up(true);
    fused = TrainStepsForBits(spec, B, T);
  }
  ASSERT_EQ(split.losses.size(), 3u);
  ASSERT_EQ(fused.losses.size(), 3u);
  bool ok = true;
  for (size_t i = 0; i < 3; ++i) {
    const double dl = std::abs(fused.losses[i] - split.losses[i]) / std::abs(split.losses[i]);
    const double dg = std::abs(fused.grad_norms[i] - split.grad_norms[i]) / std::abs(split.grad_norms[i]);
    ok = ok && dl <= 1e-4 && dg <= 1e-2;
    std::printf("%s step %zu up split / fused: loss %.17g / %.17g (%s, rel %.2e) grad_norm %.9g / %.9g (rel %.2e)\n",
                spec.preset.c_str(), i, split.losses[i], fused.losses[i],
                fused.losses[i] == split.losses[i] ? "bitwise equal" : "differs", dl, split.grad_norms[i],
                fused.grad_norms[i], dg);
  }
  const BitsDiff d = CompareBits(split, fused);
  std::printf("[%s] %s B %ld T %ld up fused vs split, 3 steps: losses within 1e-4, grad norms within 1e-2; first "
              "loss bitwise %s; parameters differing %d/%zu, gradients %d/%zu\n",
              ok ? "PASS" : "FAIL", spec.preset.c_str(), (long)B, (long)T,
              fused.losses[0] == split.losses[0] ? "EQUAL" : "DIFFERENT", d.values, split.names.size(), d.grads,
              split.names.size());
  EXPECT_TRUE(ok);
}

TEST_F(RecurrentGpuTest, XlstmFusedUpTrainsLikeSplit) {
  CompareFusedUpTraining(SmallXlstm(), 8, 256);
  ModelSpec x = *PresetSpec("xlstm[1:0]-125m");
  x.blocks = {BlockType::kMlstm, BlockType::kMlstm};
  x.vocab_size = 1024;
  CompareFusedUpTraining(x, 4, 1024);
}

TEST_F(RecurrentGpuTest, Mamba2TrainingIsBitwiseReproducible) { ExpectBitwiseReproducible(SmallMamba2(), 8, 256); }

// The 125M presets' widths (mLSTM inner 1536: 12 column blocks of gate sums, out-norm groups of
// 384, LayerNorms of 768; Mamba-2 inner 1536 in one group: 48 KiB of per-warp column sums) in two
// layers, 4 x 1024 tokens.
TEST_F(RecurrentGpuTest, PresetWidthsTrainBitwiseReproducibly) {
  ModelSpec x = *PresetSpec("xlstm[7:1]-125m");
  x.blocks = {BlockType::kMlstm, BlockType::kSlstm};
  ExpectBitwiseReproducible(x, 4, 1024);
  ModelSpec m = *PresetSpec("mamba2-130m");
  m.blocks = {BlockType::kMamba2, BlockType::kMamba2};
  ExpectBitwiseReproducible(m, 4, 1024);
}

// ---------------------------------------------------------------- mLSTM recomputation modes

// MlstmRecompute (ops/recurrent_blocks.h): each mode moves the cell (and, for glue, the norm, conv
// and q/k/v maps) from the forward's saved tensors to the backward, running the same kernels on
// the same inputs — so the results must be BITWISE those of the default path, and against float64
// the same bands as MlstmBlock. Select just these with --gtest_filter='*MlstmRecompute*'.
class MlstmRecomputeScope {
 public:
  explicit MlstmRecomputeScope(MlstmRecomputeConfig c) : saved_(GetMlstmRecompute()) { SetMlstmRecompute(c); }
  ~MlstmRecomputeScope() { SetMlstmRecompute(saved_); }

 private:
  MlstmRecomputeConfig saved_;
};

std::string ModeLabel(const MlstmRecomputeConfig& c) {
  return std::string(MlstmRecomputeName(c.mode)) + (c.keep_last > 0 ? ":" + std::to_string(c.keep_last) : "");
}

// MLSTM_RECOMPUTE_TEST_MODES="states,states:1": only the modes of `all` with those labels (e.g.
// the part script runs just the new states mode against the default); unset or empty: all.
std::vector<MlstmRecomputeConfig> SelectModes(const std::vector<MlstmRecomputeConfig>& all) {
  const char* e = std::getenv("MLSTM_RECOMPUTE_TEST_MODES");
  if (e == nullptr || *e == '\0') return all;
  const std::string list = std::string(",") + e + ",";
  std::vector<MlstmRecomputeConfig> out;
  for (const MlstmRecomputeConfig& m : all) {
    if (list.find("," + ModeLabel(m) + ",") != std::string::npos) out.push_back(m);
  }
  return out;
}

// kStates (helper mem12): glue with h kept and only the chunk states rebuilt.
std::vector<MlstmRecomputeConfig> RecomputeModes() {
  return SelectModes({{MlstmRecompute::kCell, 0},
                      {MlstmRecompute::kGlue, 0},
                      {MlstmRecompute::kBlock, 0},
                      {MlstmRecompute::kGlue, 1},
                      {MlstmRecompute::kStates, 0},
                      {MlstmRecompute::kStates, 1}});
}

TEST_F(RecurrentGpuTest, MlstmRecomputeBlockMatchesFloat64) {
  const ModelSpec s = SmallXlstm();
  for (const MlstmRecomputeConfig& m : RecomputeModes()) {
    if (m.keep_last > 0) continue;  // a lone block has no layer index
    MlstmRecomputeScope scope(m);
    CheckBlock("mlstm recompute=" + ModeLabel(m), s,
               [&](const BuildContext& c) { return std::make_unique<MlstmBlock>(c, s, 3); }, 2, 100);
  }
}

TEST_F(RecurrentGpuTest, MlstmRecomputeModelMatchesFloat64) {
  for (const MlstmRecomputeConfig& m : RecomputeModes()) {
    MlstmRecomputeScope scope(m);
    ModelSpec s = SmallXlstm();
    s.preset = "xlstm-gpu-test recompute=" + ModeLabel(m);
    CheckModel(s);
  }
}

// Device bytes a block holds from its forward to its backward: kCell and kGlue must hold less than
// kNone by at least the cell's saved states, and kGlue less than kCell; kStates holds glue's bytes
// plus h and the saved's per-token part (MlstmTokenBytes): more than glue, less than cell, and at
// most none - saved + tokens.
TEST_F(RecurrentGpuTest, MlstmRecomputeHoldsLessBetweenForwardAndBackward) {
  const ModelSpec s = SmallXlstm();
  const int64_t B = 4, T = 256;
  ParamStore store(DType::kF32, Device::kCpu);
  Rng r(7);
  MlstmBlock block({&store, &r, "l"}, s, 3);
  store.MoveToDevice(Device::kCuda);
  Rng rng(5);
  const Tensor x = ToCudaBf16(RandomBf16Host({B, T, s.d_model}, 1.0, &rng));
  const Tensor dy = ToCudaBf16(RandomBf16Host({B, T, s.d_model}, 1.0, &rng));
  auto held = [&](MlstmRecompute mode) {
    MlstmRecomputeScope scope({mode, 0});
    Cuda().Synchronize();
    const uint64_t before = Cuda().Memory().bytes_in_use;
    Tensor y = block.Forward(x, B, T);
    const uint64_t after = Cuda().Memory().bytes_in_use;
    block.Backward(dy);
    return static_cast<int64_t>(after - before);
  };
  MlstmCellArgs c;
  c.batch = B; c.seq = T; c.heads = s.mlstm_heads; c.dk = c.dv = s.mlstm_inner / s.mlstm_heads; c.chunk = s.mlstm_chunk;
  const int64_t saved = static_cast<int64_t>(Cuda().MlstmSavedBytes(c));
  const int64_t none = held(MlstmRecompute::kNone), cell = held(MlstmRecompute::kCell);
  const int64_t glue = held(MlstmRecompute::kGlue), whole = held(MlstmRecompute::kBlock);
  const int64_t states = held(MlstmRecompute::kStates);
  const int64_t tokens = static_cast<int64_t>(Cuda().MlstmTokenBytes(c));
  const bool ok = cell <= none - saved && glue < cell && whole < glue && glue < states && states < cell &&
                  states <= none - saved + tokens;
  std::printf("[%s] mlstm recompute held bytes B %ld T %ld: none %ld cell %ld glue %ld block %ld states %ld (cell "
              "saved %ld, tokens %ld)\n",
              ok ? "PASS" : "FAIL", (long)B, (long)T, (long)none, (long)cell, (long)glue, (long)whole, (long)states,
              (long)saved, (long)tokens);
  EXPECT_TRUE(ok);

  // The model's setting (model.xlstm.mlstm_recompute -> ModelSpec) selects the same mode when the
  // process-wide override is kNone.
  ModelSpec configured = s;
  configured.mlstm_recompute = "states";
  ParamStore store2(DType::kF32, Device::kCpu);
  Rng r2(7);
  MlstmBlock block2({&store2, &r2, "l"}, configured, 3);
  store2.MoveToDevice(Device::kCuda);
  MlstmRecomputeScope scope({MlstmRecompute::kNone, 0});
  Cuda().Synchronize();
  const uint64_t before = Cuda().Memory().bytes_in_use;
  Tensor y = block2.Forward(x, B, T);
  const int64_t from_spec = static_cast<int64_t>(Cuda().Memory().bytes_in_use - before);
  block2.Backward(dy);
  std::printf("[%s] mlstm recompute from the model config: states holds %ld (override: %ld)\n",
              from_spec == states ? "PASS" : "FAIL", (long)from_spec, (long)states);
  EXPECT_EQ(from_spec, states);

  // model.xlstm.mlstm_recompute_keep_last = 1 in a 3-layer model: layer 2 keeps everything (none's
  // bytes), layer 1 still recomputes its states.
  configured.mlstm_recompute_keep_last = 1;
  for (const int64_t layer : {1, 2}) {
    ParamStore store3(DType::kF32, Device::kCpu);
    Rng r3(7);
    MlstmBlock block3({&store3, &r3, "l"}, configured, 3, layer);
    store3.MoveToDevice(Device::kCuda);
    Cuda().Synchronize();
    const uint64_t at = Cuda().Memory().bytes_in_use;
    Tensor y3 = block3.Forward(x, B, T);
    const int64_t held3 = static_cast<int64_t>(Cuda().Memory().bytes_in_use - at);
    block3.Backward(dy);
    const int64_t want = layer == 2 ? none : states;
    std::printf("[%s] mlstm recompute keep_last 1 from the model config, layer %ld of 3: holds %ld (want %ld)\n",
                held3 == want ? "PASS" : "FAIL", (long)layer, (long)held3, (long)want);
    EXPECT_EQ(held3, want);
  }
}

// Three AdamW steps of the xLSTM model (mLSTM, sLSTM, mLSTM) per mode against the default path:
// identical losses, gradient norms, parameters and gradients. Also at the 125M widths (mLSTM inner
// 1536, chunk 128) for glue.
void ExpectRecomputeBitwiseEqualsDefault(const ModelSpec& spec, int64_t B, int64_t T,
                                         const std::vector<MlstmRecomputeConfig>& modes) {
  TrainBits base;
  {
    MlstmRecomputeScope scope({MlstmRecompute::kNone, 0});
    base = TrainStepsForBits(spec, B, T);
  }
  ASSERT_EQ(base.losses.size(), 3u);
  for (const MlstmRecomputeConfig& m : modes) {
    MlstmRecomputeScope scope(m);
    const TrainBits b = TrainStepsForBits(spec, B, T);
    ASSERT_EQ(base.names, b.names);
    ASSERT_EQ(b.losses.size(), 3u);
    const BitsDiff d = CompareBits(base, b);
    const std::string first = d.Names(400, /*tagged=*/true);
    const bool ok = d.Same();
    std::printf("[%s] mlstm recompute=%s bitwise vs default, %s B %ld T %ld, 3 steps: steps differing %d/3 (last loss "
                "%.17g / %.17g), parameters %d/%zu, gradients %d/%zu%s%s\n",
                ok ? "PASS" : "FAIL", ModeLabel(m).c_str(), spec.preset.c_str(), (long)B, (long)T, d.steps,
                base.losses[2], b.losses[2], d.values, base.names.size(), d.grads, base.names.size(),
                first.empty() ? "" : "; first:", first.c_str());
    EXPECT_TRUE(ok);
  }
}

TEST_F(RecurrentGpuTest, MlstmRecomputeTrainsBitwiseLikeTheDefault) {
  ExpectRecomputeBitwiseEqualsDefault(SmallXlstm(), 8, 256, RecomputeModes());
}

// model.xlstm.mlstm_recompute_keep_last = -1: two steps recompute every layer's states, then the
// model keeps every layer that fits (all of this small model's, on any card) — and the three steps
// are bit for bit the default path's.
// The same under the fused up projection: every mode bitwise the fused default path (x_m | z kept
// as one tensor by cell / glue / states, the forward rerun by block), and the block against
// float64 per mode.
TEST_F(RecurrentGpuTest, MlstmRecomputeWithFusedUpTrainsBitwiseLikeItsDefault) {
  FusedUp up(true);
  ExpectRecomputeBitwiseEqualsDefault(SmallXlstm(), 8, 256, RecomputeModes());
  ModelSpec x = *PresetSpec("xlstm[7:1]-125m");
  x.blocks = {BlockType::kMlstm, BlockType::kSlstm, BlockType::kMlstm};
  x.vocab_size = 1024;
  ExpectRecomputeBitwiseEqualsDefault(
      x, 4, 1024, SelectModes({{MlstmRecompute::kCell, 0}, {MlstmRecompute::kGlue, 0}, {MlstmRecompute::kStates, 0}}));
}

TEST_F(RecurrentGpuTest, MlstmRecomputeWithFusedUpBlockMatchesFloat64) {
  FusedUp up(true);
  const ModelSpec s = SmallXlstm();
  for (const MlstmRecomputeConfig& m : RecomputeModes()) {
    if (m.keep_last > 0) continue;
    MlstmRecomputeScope scope(m);
    CheckBlock("mlstm up fused recompute=" + ModeLabel(m), s,
               [&](const BuildContext& c) { return std::make_unique<MlstmBlock>(c, s, 3); }, 2, 100);
  }
}

TEST_F(RecurrentGpuTest, MlstmRecomputeAutoKeepsWhatFitsAndTrainsBitwise) {
  const ModelSpec base_spec = SmallXlstm();
  TrainBits base;
  {
    MlstmRecomputeScope scope({MlstmRecompute::kNone, 0});
    base = TrainStepsForBits(base_spec, 8, 256);
  }
  ModelSpec spec = base_spec;
  spec.mlstm_recompute = "states";
  spec.mlstm_recompute_keep_last = -1;
  MlstmRecomputeScope scope({MlstmRecompute::kNone, 0});  // the model's setting decides
  int64_t kept = -2;
  const TrainBits b = TrainStepsForBits(spec, 8, 256, 3, &kept);
  ASSERT_EQ(base.names, b.names);
  const BitsDiff d = CompareBits(base, b);
  const bool ok = d.Same() && kept == static_cast<int64_t>(spec.blocks.size());
  std::printf("[%s] mlstm recompute states + keep_last auto: kept %ld of %zu layers after step 2; bitwise vs "
              "default over 3 steps: steps differing %d/3, parameters %d, gradients %d%s\n",
              ok ? "PASS" : "FAIL", (long)kept, spec.blocks.size(), d.steps, d.values, d.grads,
              d.Names(400, true).c_str());
  EXPECT_TRUE(ok);
}

TEST_F(RecurrentGpuTest, MlstmRecomputeTrainsBitwiseLikeTheDefaultAtPresetWidths) {
  ModelSpec x = *PresetSpec("xlstm[7:1]-125m");
  x.blocks = {BlockType::kMlstm, BlockType::kSlstm, BlockType::kMlstm};
  x.vocab_size = 1024;  // the blocks are under test; a small head keeps the three inits short
  ExpectRecomputeBitwiseEqualsDefault(
      x, 4, 1024, SelectModes({{MlstmRecompute::kCell, 0}, {MlstmRecompute::kGlue, 0}, {MlstmRecompute::kStates, 0}}));
}

// ---------------------------------------------------------------- deferred zero

// Deferred zeroing on the device for the recurrent blocks (as LlamaGpuTest's): the overwriting
// first writes are GEMM beta 0, the glue kernels' and the conv's reduces; the cells zero what is
// stale first, and adjacent stale gradients take one memset.
void ExpectDeferredZeroMatchesZeroed(const ModelSpec& spec) {
  EXPECT_TRUE(DeferredZeroMatchesZeroed(spec, spec.preset + " deferred zero"));
}

TEST_F(RecurrentGpuTest, XlstmDeferredZeroStepEqualsAStepOnZeroedGradients) {
  ExpectDeferredZeroMatchesZeroed(SmallXlstm());
}
TEST_F(RecurrentGpuTest, Mamba2DeferredZeroStepEqualsAStepOnZeroedGradients) {
  ExpectDeferredZeroMatchesZeroed(SmallMamba2());
}

// The Mamba-2-Attention mixer layer (no MLP) with its qkv conv: the conv's overwriting first write.
TEST_F(RecurrentGpuTest, HybridMixerDeferredZeroStepEqualsAStepOnZeroedGradients) {
  ModelSpec s = SmallHybrid();
  s.preset = "hybrid-mixer-gpu-test";
  s.attn_mlp = false;
  s.attn_qkv_conv = 4;
  ExpectDeferredZeroMatchesZeroed(s);
}

}  // namespace
}  // namespace gyre::ops
