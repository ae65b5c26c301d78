// xLSTM Large / 7B block (MODELS.md §1.5; [xl] xlstm_large/model.py mLSTMBlock, transformers'
// models/xlstm xLSTMBlock), all-mLSTM and post-up-projection:
//
//   u  = RMSNorm(x)                                   (weight only, init 1, eps 1e-6)
//   q, k = W_q u, W_k u  (d -> qk_dim = d/2)   v, o = W_v u, W_o u  (d -> v_dim = d), no biases
//   ĩ, f̃ = cap · tanh(Linear(u -> NH, bias) / cap)   (gate soft cap, cap = 15)
//   h̃  = mLSTM(q, k, v, ĩ, f̃)                        (kernels/cpu/mlstm.h chunkwise; dk = qk_dim/NH,
//                                                      dv = v_dim/NH: 7B has dk 256, dv 512)
//   x1 = x + W_out( LN_head(h̃) ⊙ σ(o) )               (per-head LayerNorm, weight only, eps 1e-6)
//   y  = x1 + SwiGLU(RMSNorm(x1))                      (hidden 64·ceil(2.667d/64), no biases)
//
// Differences from the v1 MlstmBlock (ops/recurrent_blocks.h): no conv, no learnable skip, no
// up-projection around the cell, q/k/v/o and the gates read the normed block input directly,
// the gates are soft-capped, the norms store their scale directly (init 1, not 1 + w), and the
// block carries its own SwiGLU FFN. The LM head's logit cap (30) is ModelSpec::logit_soft_cap.
//
// Init (transformers' xLSTMPreTrainedModel._init_weights; [xl] xlstm_large has none): "small"
// N(0, sqrt(2/(5d))) for q, k, v, o and the FFN's gate / up; "wang" N(0, 2/(L·sqrt(d))) for
// out_proj and N(0, 2/(L·sqrt(ffn))) for the FFN's down projection; gate weights 0, input-gate
// bias -10, forget-gate bias linspace(3, 6) over heads; norm scales 1. (transformers matches
// "gate" in the module name, which in its "single" weight mode also zeroes ogate_preact and the
// FFN's proj_up_gate; we keep "small" for those two, as a freshly trained model would want them
// non-degenerate; see ops/XLSTM_LARGE.md.)
//
// Backward: explicit (no tape); the gradient contract of ops/module.h; every writer follows the
// deferred-zero rule (Linear, Norm, GatedMlp; the gates' GEMM and bias kernel overwrite on the
// step's first write). The cell's backward is the true gradient (kernels/cpu/mlstm.h; on CUDA
// kernels/cuda/mlstm.h's).
//
// CUDA (bf16 activations, fp32 gates / masters / gradients; ops/xlstm_large_cuda.h): the norms,
// q/k/v/o (their backward's dx products accumulating into one du, beta 1), out_proj (residual add
// in its GEMM's store) and the SwiGLU MLP as LlamaBlock runs them; both gates as ONE [rows, 2·NH] fp32 GEMM over the input and forget weights (created back
// to back, so adjacent in the flat store) plus a kernel for bias + soft cap (backward: the cap's
// slope, bf16 dpre for the dx / dW GEMMs, the bias gradient in a fixed order; since session 21 dpre
// sits beside d_o and rides in the o map's backward GEMMs, [W_o; W_i; W_f] one span); the chunkwise
// mLSTM cell with dk != dv (a dk that is not a multiple of 64, the 125m's 96, runs the cell at dk
// rounded up to 64 with q / k zero-padded per head and 1/sqrt(dk) passed as the scale); the per-head LayerNorm and σ(o) as one kernel each way
// (LN(h)·w ⊙ σ(o), ops/xlstm_large_cuda.h xl_norm_gate_*). CUDA decoding (StepChunk,
// ops/xlstm_large_step_cuda.cc): the same layers at the chunk's rows with the mLSTM step kernel
// (one launch for all k positions, per-position state history for Rewind), as the v1 MlstmBlock
// decodes.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "ops/block.h"
#include "ops/layers.h"
#include "ops/model_config.h"
#include "ops/recurrent_blocks.h"  // Mamba2GradTerms, SumAbsTerms, CheckSumOfTerms

namespace gyre::ops {

struct XlstmLargeNormGateArgs;  // ops/cuda_recurrent.h

// Float64 reference checks only (the rule of ops/DT_BIAS_CHECK.md). The gate-bias gradients are
// sums over tokens of the per-token gate gradients; the input gate's nearly cancels: adding one
// constant to every ĩ of a head scales C and n alike and leaves h unchanged but for the
// max(|n·q̂|, e^{−m}) branch and ε, so its true gradient is a tiny remainder of large terms (the
// GPU test measured rel_err 0.26 at terms that bf16 rounds correctly). While on, every CPU
// backward of an XlstmLargeBlock appends its per-token d pre-activation (after the cap's slope)
// for "<block>.mlstm.igate_preact.bias" and "<block>.mlstm.fgate_preact.bias" ([batch, seq, NH]);
// SumAbsTerms / CheckSumOfTerms (ops/recurrent_blocks.h) take the records. Off by default (no
// cost); not thread-safe.
void SetXlstmLargeGateTermRecording(bool on);
std::vector<Mamba2GradTerms> TakeXlstmLargeGateTerms();

// Float64 precision experiments only (ops/xlstm_large_precision_test.cc; ops/XLSTM_LARGE.md
// "Session 21 (helper xlprec): precision"). While non-zero, every CPU Forward of an XlstmLargeBlock
// rounds the tensors named by the set bits to the precision the CUDA path stores them in (bf16;
// the gates fp32), so the float64 model emulates one CUDA rounding at a time. With any bit of the
// FFN's inside set (kXlBf16FfnGateUp, kXlBf16FfnHidden) the FFN runs unsaved (forward only).
// Off by default (no cost); not thread-safe.
enum XlstmLargeBf16Stage : uint32_t {
  kXlBf16U = 1u << 0,            // RMSNorm(x) as q, k, v, o read it
  kXlBf16QK = 1u << 1,           // q, k GEMM outputs
  kXlBf16V = 1u << 2,            // v GEMM output
  kXlBf16O = 1u << 3,            // o pre-activation GEMM output
  kXlBf16GatesF32 = 1u << 4,     // ĩ, f̃ (fp32 on CUDA)
  kXlBf16H = 1u << 5,            // the cell's output h
  kXlBf16Gated = 1u << 6,        // LN_head(h)·w ⊙ σ(o) (one rounding: the fused kernel)
  kXlBf16X1 = 1u << 7,           // x + out_proj(...) (one rounding: the add in the GEMM's store)
  kXlBf16FfnIn = 1u << 8,        // RMSNorm(x1)
  kXlBf16FfnGateUp = 1u << 9,    // the FFN's gate and up GEMM outputs
  kXlBf16FfnHidden = 1u << 10,   // SiLU(gate) ⊙ up
  kXlBf16Y = 1u << 11,           // x1 + FFN(...) (one rounding)
  kXlBf16UGates = 1u << 12,      // RMSNorm(x) as the gates' product reads it (on CUDA the same bf16 u)
  kXlBf16All = (1u << 13) - 1,
};
// `jitter` > 0: each value is first multiplied by (1 + jitter·N(0, 1)) (a fixed stream from
// `jitter_seed`), the size of the fp32 accumulation's own error, to see how far such a difference
// moves the rounded results (session 21: it decorrelates them within a few stages).
void SetXlstmLargeBf16Emulation(uint32_t stages, double jitter = 0.0, uint64_t jitter_seed = 1);

// Decoding state: the cell's (C, n, m) per sequence and head ([B, NH, dk, dv], [B, NH, dk],
// [B, NH]); no conv window.
struct XlstmLargeState : BlockState {
  Tensor c, n, m;
  StateHistory cell_history;
  std::vector<const Tensor*> StepTensors() const override { return {&c, &n, &m}; }
  std::vector<RewindSlot> TakeRewindSlots() override { return cell_history.Take({&c, &n, &m}); }
};

class XlstmLargeBlock : public Block {
 public:
  XlstmLargeBlock(const BuildContext& ctx, const ModelSpec& spec, int64_t n_layers);
  Tensor Forward(const Tensor& x, int64_t batch, int64_t seq) override;
  Tensor Backward(const Tensor& dy) override;
  void ReleaseActivations() override;
  std::unique_ptr<BlockState> NewState(int64_t batch) const override;
  Tensor StepChunk(const Tensor& x, int64_t chunk, BlockState* state, bool rewindable) override;
  void Rewind(BlockState* state, int64_t keep) override;
  bool FollowsDeferredZero() const override { return true; }

 private:
  int64_t d_, heads_, qk_dim_, v_dim_, chunk_;
  double gate_cap_;
  double norm_eps_;  // the per-head LayerNorm's ε (its CUDA kernel is the block's own)
  const ParamStore* store_;
  Norm norm_mlstm_;
  Linear q_, k_, v_, ogate_;
  // The gates' Linear(d -> NH, bias) each, as four parameters created weights first (wi, wf,
  // bi, bf) so the two weights are one [2·NH, d] matrix in the flat CUDA store.
  Parameter* wi_;
  Parameter* wf_;
  Parameter* bi_;
  Parameter* bf_;
  Norm multihead_norm_;
  Linear out_proj_;
  Norm norm_ffn_;
  GatedMlp ffn_;
  int64_t batch_ = 0, seq_ = 0;
  // Saved by Forward: q, k, v (the cell's inputs), o (pre-activation), the raw gate
  // pre-activations and their capped values, the cell output h and its saved chunk states, the
  // normed h and σ(o).
  Tensor u_, q_out_, k_out_, v_out_, o_pre_, ig_raw_, fg_raw_, ig_, fg_, h_, saved_, hn_, so_;
  Tensor pre_;  // CUDA: the raw gate pre-activations [rows, 2·NH] fp32
  // CUDA: the per-head LayerNorm and σ(o) are one kernel each way (XlstmLargeNormGate; hn_ and
  // so_ are the CPU path's); the norm's statistics [rows, NH] fp32.
  Tensor norm_mean_, norm_rstd_;
  // ĩ, f̃ from the raw pre-activations (the cap, or a copy when the cap is off).
  Tensor CapGate(const Tensor& raw) const;
  // CPU: raw pre-activation u·wᵀ + b of one gate; its backward (dW, db accumulated, du returned).
  Tensor GateForward(const Tensor& u, Parameter* w, Parameter* b) const;
  Tensor GateBackward(const Tensor& u, Parameter* w, Parameter* b, const Tensor& dpre) const;
  Tensor ForwardCuda(const Tensor& x, int64_t batch, int64_t seq);
  Tensor BackwardCuda(const Tensor& dy);
  Tensor StepCuda(const Tensor& x, int64_t chunk, XlstmLargeState* st, bool rewindable);
  // The two gate weights as one [2·NH, d] matrix: its bf16 compute copy and its fp32 gradient.
  void GateSpan(Tensor* compute, Tensor* grad) const;
  // The fused norm + out gate kernels' shape, inputs and statistics (h_, o_pre_ set).
  XlstmLargeNormGateArgs NormGateArgs();
};

}  // namespace gyre::ops
