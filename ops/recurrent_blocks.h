// The recurrent blocks around the cell kernels of kernels/cpu (mlstm.h, slstm.h, ssd.h,
// conv1d.h): projections, norms, gates, skips and residuals, with explicit backward.
//
// MlstmBlock  — xLSTM v1 mLSTM block, pre-up-projection (MODELS.md §1.4; [xl] mLSTMLayer):
//   u = LN(x); [x_m | z] = W_up u; x_c = SiLU(conv4(x_m)); q, k = BD(x_c); v = BD(x_m);
//   ĩ, f̃ = Linear(concat(q, k, v)) (+bias); h̃ = mLSTM(q, k, v, ĩ, f̃) (chunkwise kernel);
//   h = (GroupNorm(h̃) + s ⊙ x_c) ⊙ SiLU(z); x <- x + W_down h.
// SlstmBlock  — xLSTM v1 sLSTM block, post-up-projection (MODELS.md §2; [xl] sLSTMLayer + FFN):
//   u = LN(x); x_c = SiLU(conv4(u)); gates i, f from x_c and z, o from u (block-diagonal per
//   head) + bias; h = sLSTM(gates, R); x <- x + GroupNorm(h); x <- x + FFN_GeLU(LN(x)).
// Mamba2Block — Mamba-2 mixer layer (MODELS.md §4.3; [ms] Mamba2 + Block):
//   u = RMSNorm(x); [z | x | B | C | dt] = in_proj u; [x | B | C] = SiLU(conv4([x | B | C]));
//   y = SSD(x, dt, A, B, C, D) (chunked kernel); x <- x + out_proj(RMSNorm_G(y ⊙ SiLU(z))).
// All LayerNorms of the xLSTM blocks store their scale as 1 + w (w init 0), no bias, eps 1e-5.
//
// Gradients follow the deferred-zero rule (ops/module.h): GEMM and glue-kernel writers overwrite
// on the step's first write (FirstGradWrite), and so does the CUDA conv; the cells' accumulating
// writers zero a stale gradient first (ZeroGradIfStale; one memset for gradients created one
// after another: Mamba-2's A_log, dt_bias, D; sLSTM's bias, R); so the blocks skip the per-step
// memset.
// CUDA (bf16 activations, fp32 gates / dt / states / gradients): the cells of kernels/cuda, the
// projections through cuBLASLt on weight row blocks (no activation slicing: [x_m | z] and
// [z | xBC | dt] are separate GEMMs into separate tensors; dt in fp32), the sLSTM gate GEMMs per
// (gate, head) written straight into the cell's interleaved [B, S, 4, d] layout, and fused glue
// (ops/recurrent_cuda.h): mLSTM 4x4 block-diagonal q/k/v, mLSTM gate projections without the
// concat, the mLSTM output path (GroupNorm + skip + SiLU(z) gate in one kernel), the Mamba-2
// gated RMSNorm (y ⊙ SiLU(z) inside the norm).
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "ops/block.h"
#include "ops/layers.h"
#include "ops/model_config.h"

namespace gyre::ops {

// Causal depthwise conv1d (+ optional fused SiLU) over [B, S, C], weight [C, K], bias [C].
struct Conv1dArgs;     // ops/cuda_recurrent.h
struct GroupNormArgs;  // ops/cuda_recurrent.h

class CausalConv1d {
 public:
  CausalConv1d(const BuildContext& ctx, int64_t channels, int64_t width, bool silu);
  Tensor Forward(const Tensor& x, int64_t batch, int64_t seq);
  Tensor Backward(const Tensor& dy);
  // CUDA only: Backward with dx written into `dx` (bf16, rows of `dx_row_stride` elements, the
  // first `channels` of each set): one gradient buffer holding several projections' columns.
  void BackwardInto(const Tensor& dy, void* dx, int64_t dx_row_stride);
  void ReleaseActivations() { x_ = Tensor(); }
  // CUDA: what Forward records and allocates (y), and the kernel arguments it would launch
  // with, without launching them (a fused launch takes them: CudaBackend::MlstmConvQkv).
  // `x_row_stride` (0 = channels): x is the first `channels` columns of [batch·seq, x_row_stride]
  // rows (the mLSTM block's fused up projection output x_m | z); y is packed either way.
  Conv1dArgs ForwardArgsCuda(const Tensor& x, int64_t batch, int64_t seq, Tensor* y, int64_t x_row_stride = 0);
  // CUDA: BackwardInto's bookkeeping (the first-write rule of dw, dbias; x released) and its
  // kernel arguments, without the launch (CudaBackend::MlstmConvVBackward takes them).
  Conv1dArgs BackwardArgsCuda(const Tensor& dy, void* dx, int64_t dx_row_stride);
  // Inference: x [B, C]; `state` [B, K-1, C] (zeros at the start) is advanced.
  Tensor Step(const Tensor& x, Tensor* state);
  // `chunk` positions, x [chunk * B, C] position-major; with a history, the window after every
  // position but the last is recorded (Block::StepChunk).
  // On CUDA (Step too) one launch for all positions (StepChunkCuda).
  Tensor StepChunk(const Tensor& x, int64_t chunk, Tensor* state, StateHistory* history);
  int64_t channels() const { return channels_; }
  int64_t width() const { return width_; }

 private:
  int64_t channels_, width_;
  bool silu_;
  Parameter* weight_;
  Parameter* bias_;
  Tensor x_;
  int64_t x_row_stride_ = 0;  // ForwardArgsCuda's (0 = packed)
  int64_t batch_ = 0, seq_ = 0;
  // The CUDA kernel's arguments both directions share: shape, x, weight and bias.
  Conv1dArgs CudaArgs(const Tensor& x, int64_t batch, int64_t seq) const;
  // StepChunk on CUDA (ops/recurrent_step_cuda.cc): with a history, the kernel writes the
  // window after each position but the last into one buffer and the history holds views of it.
  Tensor StepChunkCuda(const Tensor& x, int64_t chunk, Tensor* state, StateHistory* history);
};

// Benchmarks only: while on, the CUDA paths of the blocks below synchronise the stream after
// every phase and add its host time to a named bucket ("mamba2.fwd.ssd", ...). Off by default
// (no cost). TakeRecurrentProfile returns the buckets (seconds) and clears them. Not thread-safe.
void SetRecurrentProfiling(bool on);
std::vector<std::pair<std::string, double>> TakeRecurrentProfile();

// Float64 reference checks only (ops/DT_BIAS_CHECK.md). The gradients of a Mamba-2 block's per-head
// parameters dt_bias, A_log and D are each a sum over tokens of one term per token and head; where
// that sum cancels (blocks.1.dt_bias of the GPU model test: 0.036 of its terms' magnitude), bf16
// inputs alone move it by more than 5e-2 relative. While recording is on, the CPU backward of
// every Mamba2Block appends those terms (the CUDA backward records nothing):
//   dt_bias  d dt_raw[token, h]                              (dt = softplus(dt_raw + dt_bias))
//   D        sum over the head's P channels of dy·x           (y = ... + D x)
//   A_log    dt·g_dt − sum over the head's channels of x·(dx − D dy), g_dt = d dt_raw / sigmoid(
//            dt_raw + dt_bias): the gradient of the token's log-decay dt·A times dt·A, by the chain
//            rule through the SSD's two uses of dt (decay e^{dt A} and input dt·x).
// (Valid without the dt clamp, which Mamba2Block never sets.) Off by default (no cost); not
// thread-safe: switch it and take the records between steps.
struct Mamba2GradTerms {
  std::string param;         // the parameter's name, e.g. "blocks.1.dt_bias"
  int64_t batch = 0, seq = 0, heads = 0;
  std::vector<double> terms;  // [batch, seq, heads]; the sum over tokens is the gradient
};
void SetMamba2GradTermRecording(bool on);
std::vector<Mamba2GradTerms> TakeMamba2GradTerms();

// Per head, the sum of |term| over every record of `param` (empty when there is none).
std::vector<double> SumAbsTerms(const std::vector<Mamba2GradTerms>& records, const std::string& param);

// The check for such a sum (ops/DT_BIAS_CHECK.md): rel_err = RelativeError(got, want) as for every
// other gradient; terms_err = ||got − want|| / ||abs_sums|| (norms over heads; abs_sums from
// SumAbsTerms); cancel = ||want|| / ||abs_sums||. Passes when rel_err <= rel_tol OR terms_err <=
// terms_tol; a non-finite `got` fails.
struct SumOfTermsCheck {
  double rel_err = 0, terms_err = 0, cancel = 0;
  bool pass = false;
};
SumOfTermsCheck CheckSumOfTerms(const Tensor& got, const Tensor& want, const std::vector<double>& abs_sums,
                                double rel_tol, double terms_tol);

// What the CUDA mLSTM block keeps between its forward and its backward (helper mem11; memory
// table and time prediction: ops/MLSTM_MEMORY.md). Every mode runs the same kernels on the same
// inputs as kNone, so the step's results are bit-identical; the modes only move work from
// memory to time. The cell's saved chunk states dominate at 1.3b (C_k hi + lo planes: 1.2 GiB a
// layer at B4 x 2048, 2.4 GiB at B8), so model.recompute_blocks (whole block again) was needed.
//   kNone   keep everything (the default).
//   kCell   drop the cell's saved states, h and the down projection's input; the backward runs
//           the cell forward and the output norm again (kept: u, x_m, z, x_c, q, k, v, gates).
//   kGlue   kCell and also drop u = LN(x), x_c, q, k, v and the gates: the backward recomputes
//           everything but the three GEMMs (kept: the block input, x_m, z).
//   kStates kGlue, but the cell's output h (and the per-token part of `saved`: den_t, h lo) stay
//           and the backward rebuilds only the chunk states (gate scan + state_fwd,
//           kernels/cuda/mlstm.h MlstmChunkwiseRecomputeStates), not h (helper mem12; opt-in).
//   kBlock  benchmarks only: what model.recompute_blocks does (RecomputeBlock), inside the block
//           (keep x; the backward runs the whole forward again), so one model can alternate it
//           with the others.
// `keep_last` > 0: blocks built for layer >= n_layers - keep_last run kNone whatever the mode
// (memory left over after recomputation buys back time).
// The backward frees each tensor once used in the modes other than kNone.
// Use with model.recompute_blocks off (under RecomputeBlock a mode other than kNone recomputes
// the cell twice).
enum class MlstmRecompute { kNone, kCell, kGlue, kBlock, kStates };
struct MlstmRecomputeConfig {
  MlstmRecompute mode = MlstmRecompute::kNone;
  int64_t keep_last = 0;
};
// The model's setting is ModelSpec::mlstm_recompute and ::mlstm_recompute_keep_last (config:
// model.xlstm.mlstm_recompute, .mlstm_recompute_keep_last). The process-wide setting below
// overrides the mode when it is not kNone, and keep_last when it is > 0 (tests, benchmarks).
// The process-wide setting each MlstmBlock::Forward reads (the backward uses the forward's).
// Starts from GYRE_MLSTM_RECOMPUTE (unset, "none", "cell", "glue", "block", "states"; anything else stops
// the process with a message naming it) and GYRE_MLSTM_RECOMPUTE_KEEP (an integer >= 0), read
// once on first use; SetMlstmRecompute overrides them (tests, benchmarks). Not thread-safe.
MlstmRecomputeConfig GetMlstmRecompute();
void SetMlstmRecompute(MlstmRecomputeConfig config);
const char* MlstmRecomputeName(MlstmRecompute mode);

// The mLSTM block's conv1d forward + q/k/v block-diagonal maps + gate sums in one kernel instead
// of three (CudaBackend::MlstmConvQkv; counts and measurements in ops/XLSTM_GLUE.md). The
// default since the lead's session-14 call (xlstm[1:0]-125m step 135.3-135.4 -> 133.5-134.1 ms on
// an H100): GYRE_MLSTM_CONV_QKV unset or "fused"; "separate" = the three launches (also what
// shapes the fused kernel does not cover take); read once on first use;
// anything else stops the process with a message naming the accepted values.
// SetMlstmConvQkvFused overrides it (tests, benchmarks). Not thread-safe. CUDA training only.
bool MlstmConvQkvFused();
void SetMlstmConvQkvFused(bool fused);

// The mLSTM block's conv1d backward + v block-diagonal backward (with the gates' v columns) in
// one kernel instead of two (CudaBackend::MlstmConvVBackward; fusion C of ops/XLSTM_GLUE.md).
// Measured on an H100 (xglue15, session 15): xlstm[1:0]-125m step 134.7-134.9 -> 133.3-133.6 ms,
// so the default since then: GYRE_MLSTM_CONV_V_BWD unset or "fused"; "separate" = the two
// launches (also what shapes the fused kernel does not cover take); read once on first use;
// anything else stops the process with a message naming the accepted values. SetMlstmConvVBwdFused overrides it (tests,
// benchmarks). Not thread-safe. CUDA training only.
bool MlstmConvVBwdFused();
void SetMlstmConvVBwdFused(bool fused);

// The mLSTM block's 2-map (q, k) block-diagonal backward with the fused gates: kTc =
// CudaBackend::BlockDiagBackwardTc (the row sums dWq, dWk and the gates' S on tensor cores;
// ops/XLSTM_GLUE.md "Tensor-core row sums": on an H100 the op 6.62 -> 5.70 ms, the xlstm[1:0]-125m
// step -0.5 to -0.7 ms; the default since session 15); kFma = CudaBackend::BlockDiag
// (block_diag4_bwd, the row sums on the FMA pipe; also what shapes the tensor-core kernel does
// not cover take). GYRE_MLSTM_QK_BWD unset or "tc", "fma"; read once on first use; anything
// else stops the process with a message naming the accepted values. SetMlstmQkBwd overrides it
// (tests, benchmarks). Not thread-safe. CUDA only.
enum class MlstmQkBwd { kFma, kTc };
MlstmQkBwd GetMlstmQkBwd();
void SetMlstmQkBwd(MlstmQkBwd mode);

// Where the mLSTM cell backward's per-token dots dh·(h + h_lo) are formed: in the block's
// output-norm backward, which writes dh and reads h anyway (default since session 16: + one pass
// for h lo, then CudaBackend::MlstmOutNormBackwardWithDots and the cell's entry that takes the
// dots; xlstm[1:0]-125m step −1.5 to −2.6 ms on an H100), or in the cell's bwd_prep ("cell": it
// reads dh, h and h's saved lo part again, three [tokens, p] bf16 passes). Shapes the norm kernel
// does not cover (heads other than 384 wide) keep the cell's. ops/XLSTM_GLUE.md "lever 1".
// GYRE_MLSTM_DH_DOT unset or "norm", "cell"; read once on first use; anything else stops the
// process with a message naming the accepted values. SetMlstmDhDotInNorm overrides it (tests,
// benchmarks). Not thread-safe. CUDA only.
bool MlstmDhDotInNorm();
void SetMlstmDhDotInNorm(bool in_norm);

// The mLSTM block's up projection (one parameter W_up [2p, d]) as ONE GEMM each way ("fused":
// x_m | z = u·Wᵀ with N = 2p into one [rows, 2p] tensor whose column blocks the conv + q/k/v and
// the output norm read through row strides; backward dx_m | dz written into one [rows, 2p]
// gradient by the conv + v backward and the output norm backward, then one du GEMM over K = 2p
// and one dW GEMM) or two ("split": x_m and z apart, two GEMMs forward, du written then
// accumulated, dW in two row blocks). ops/XLSTM_GLUE.md "Session 20 (helper upcat20)": on an H100
// xlstm[1:0]-125m B16 step 124.3-125.3 -> 122.9-124.1 ms (the up GEMMs 16.8 -> 15.2 ms), 1.3b B4
// neutral (311.7 / 313.4 -> 310.3 / 313.5); forward y bitwise the split path's in the block tests.
// GYRE_MLSTM_UP unset or "fused" (the default since session 20), "split"; read once on first use;
// anything else stops the process with a message naming the accepted values. SetMlstmUpFused
// overrides it (tests, benchmarks). Each block's forward records the setting its backward uses.
// Not thread-safe. CUDA training only (decoding and the CPU path keep two products).
bool MlstmUpFused();
void SetMlstmUpFused(bool fused);

// Decoding states (defined here so ops/recurrent_step_cuda.cc shares them): each tensor is
// advanced in place; the histories hold the per-position copies of a rewindable chunk.
inline std::vector<RewindSlot> JoinSlots(std::vector<RewindSlot> a, std::vector<RewindSlot> b) {
  for (RewindSlot& s : b) a.push_back(std::move(s));
  return a;
}
struct MlstmState : BlockState {
  Tensor conv, c, n, m;
  StateHistory conv_history, cell_history;
  std::vector<const Tensor*> StepTensors() const override { return {&conv, &c, &n, &m}; }
  std::vector<RewindSlot> TakeRewindSlots() override { return JoinSlots(conv_history.Take({&conv}), cell_history.Take({&c, &n, &m})); }
};
struct SlstmState : BlockState {
  Tensor conv, h, c, n, m;
  StateHistory conv_history, cell_history;
  std::vector<const Tensor*> StepTensors() const override { return {&conv, &h, &c, &n, &m}; }
  std::vector<RewindSlot> TakeRewindSlots() override {
    return JoinSlots(conv_history.Take({&conv}), cell_history.Take({&h, &c, &n, &m}));
  }
};
struct Mamba2State : BlockState {
  Tensor conv, ssm;
  StateHistory conv_history, cell_history;
  std::vector<const Tensor*> StepTensors() const override { return {&conv, &ssm}; }
  std::vector<RewindSlot> TakeRewindSlots() override { return JoinSlots(conv_history.Take({&conv}), cell_history.Take({&ssm})); }
};

class MlstmBlock : public Block {
 public:
  // `layer` (0-based; -1 unknown) only decides MlstmRecomputeConfig::keep_last.
  MlstmBlock(const BuildContext& ctx, const ModelSpec& spec, int64_t n_layers, int64_t layer = -1);
  Tensor Forward(const Tensor& x, int64_t batch, int64_t seq) override;
  Tensor Backward(const Tensor& dy) override;
  void ReleaseActivations() override;
  std::unique_ptr<BlockState> NewState(int64_t batch) const override;
  Tensor StepChunk(const Tensor& x, int64_t chunk, BlockState* state, bool rewindable) override;
  void Rewind(BlockState* state, int64_t keep) override;
  bool FollowsDeferredZero() const override { return true; }
  int64_t RecomputeFreedBytes() const override { return freed_bytes_; }
  void KeepForBackward() override { keep_for_backward_ = true; }

 private:
  int64_t d_, p_, heads_, chunk_;
  int64_t n_layers_, layer_;
  int64_t freed_bytes_ = 0;          // by the last CUDA forward's recomputation drops
  bool keep_for_backward_ = false;   // KeepForBackward: run kNone whatever the mode
  bool sigmoid_forget_;
  Norm norm_;
  Linear up_;
  CausalConv1d conv_;
  BlockDiagonalLinear q_, k_, v_;
  Linear igate_, fgate_;
  Norm outnorm_;
  Parameter* skip_;
  Linear down_;
  int64_t batch_ = 0, seq_ = 0;
  Tensor z_, xc_, q_out_, k_out_, v_out_, ig_, fg_, h_, saved_, hs_, sz_;
  // CUDA path (recurrent_blocks.cc): u = LN(x), xm, out-norm statistics.
  Tensor ForwardCuda(const Tensor& x, int64_t batch, int64_t seq);  // ForwardCudaAll, then the mode's drops
  Tensor ForwardCudaAll(const Tensor& x, int64_t batch, int64_t seq);  // keeps everything
  Tensor BackwardCuda(const Tensor& dy);
  // xm_: x_m [rows, p], or with up_fused_ the fused GEMM's x_m | z [rows, 2p] (z_ then undefined).
  Tensor u_, xm_, mean_, rstd_;
  bool up_fused_ = false;  // MlstmUpFused() at the last ForwardCudaAll
  int64_t XmLd() const { return up_fused_ ? 2 * p_ : p_; }  // row stride of x_m (and of dx_m)
  const void* ZPtr() const;  // z [rows, p] in rows of ZLd()
  int64_t ZLd() const { return XmLd(); }
  // MlstmRecompute (mode_ = the forward's): the block input, kept by kBlock, kGlue and kStates;
  // kStates' copy of the per-token part of the cell's saved (MlstmTokenBytes).
  MlstmRecompute mode_ = MlstmRecompute::kNone;
  MlstmRecompute configured_ = MlstmRecompute::kNone;  // ModelSpec::mlstm_recompute
  int64_t configured_keep_last_ = 0;                    // ModelSpec::mlstm_recompute_keep_last
  Tensor x_in_, tokens_;
  // The cell, its saved states and the output norm (out = down's input) from the kept tensors.
  Tensor RecomputeCellCuda();
  // kCell / kGlue / kStates: drop what the backward recomputes.
  void DropRecomputableCuda();
  // CUDA decoding (ops/recurrent_step_cuda.cc); the CPU-made state tensors move to the device
  // on the first step.
  Tensor StepCuda(const Tensor& x, int64_t chunk, struct MlstmState* st, bool rewindable);
  // out = (GroupNorm(h) + skip ⊙ x_c) ⊙ SiLU(z) for `rows` rows in one kernel (training and
  // decoding); writes the per-(row, head) statistics into mean / rstd (fp32, rows x heads).
  // z: [rows, p] in rows of ldz (the fused up projection's z columns: 2p).
  Tensor OutputNormCuda(const Tensor& h, const void* z, int64_t ldz, const Tensor& xc, int64_t rows, Tensor& mean,
                        Tensor& rstd);
  // The out-norm's arguments shared by that forward and the training backward (which adds dy and
  // the gradients): h, the gate z and the skip input x_c, the statistics mean / rstd.
  GroupNormArgs OutputNormArgs(const Tensor& h, const void* z, int64_t ldz, const Tensor& xc, int64_t rows,
                               Tensor& mean, Tensor& rstd);
  // q, k = blockdiag(x_c), v = blockdiag(x_m) (bf16 [rows, p]) and the gate pre-activations
  // ig, fg (fp32 [rows, heads]) in two launches, the gates fused into the maps (training and
  // decoding). Allocates the five outputs. With `conv` (the conv forward's arguments that write
  // x_c from x_m: CausalConv1d::ForwardArgsCuda), that conv runs first, and all three in one
  // launch (CudaBackend::MlstmConvQkv). `ldxm`: x_m's row stride (0 = p; 2p under the fused up
  // projection).
  void QkvGatesCuda(const Tensor& xc, const Tensor& xm, int64_t rows, Tensor& q, Tensor& k, Tensor& v, Tensor& ig,
                    Tensor& fg, const Conv1dArgs* conv = nullptr, int64_t ldxm = 0);
  // x_c = conv(x_m) and QkvGatesCuda on the block's tensors, fused or not (MlstmConvQkvFused);
  // allocates x_c. `marks`: the profiling marks (SetRecurrentProfiling) after each part.
  void ConvQkvGatesCuda(int64_t batch, int64_t seq, bool marks = true);
};

class SlstmBlock : public Block {
 public:
  SlstmBlock(const BuildContext& ctx, const ModelSpec& spec, int64_t layer, int64_t n_layers);
  Tensor Forward(const Tensor& x, int64_t batch, int64_t seq) override;
  Tensor Backward(const Tensor& dy) override;
  void ReleaseActivations() override;
  std::unique_ptr<BlockState> NewState(int64_t batch) const override;
  Tensor StepChunk(const Tensor& x, int64_t chunk, BlockState* state, bool rewindable) override;
  void Rewind(BlockState* state, int64_t keep) override;
  bool FollowsDeferredZero() const override { return true; }

 private:
  int64_t d_, heads_;
  Norm norm_;
  CausalConv1d conv_;
  BlockDiagonalLinear wi_, wf_, wz_, wo_;
  Parameter* bias_;       // [4, d], gate order i, f, z, o
  Parameter* recurrent_;  // [NH, 4, dh, dh]
  Norm group_norm_;
  Norm ffn_norm_;
  GatedMlp ffn_;
  int64_t batch_ = 0, seq_ = 0;
  Tensor gx_, h_, saved_;
  Tensor ForwardCuda(const Tensor& x, int64_t batch, int64_t seq);
  Tensor BackwardCuda(const Tensor& dy);
  Tensor u_, xc_;
  Tensor StepCuda(const Tensor& x, int64_t chunk, struct SlstmState* st, bool rewindable);
};

class Mamba2Block : public Block {
 public:
  Mamba2Block(const BuildContext& ctx, const ModelSpec& spec, int64_t n_layers);
  Tensor Forward(const Tensor& x, int64_t batch, int64_t seq) override;
  Tensor Backward(const Tensor& dy) override;
  void ReleaseActivations() override;
  std::unique_ptr<BlockState> NewState(int64_t batch) const override;
  Tensor StepChunk(const Tensor& x, int64_t chunk, BlockState* state, bool rewindable) override;
  void Rewind(BlockState* state, int64_t keep) override;
  bool FollowsDeferredZero() const override { return true; }

 private:
  int64_t d_, di_, heads_, head_dim_, groups_, state_, chunk_;
  Norm norm_;
  Linear in_proj_;
  CausalConv1d conv_;
  Parameter* a_log_;
  Parameter* dt_bias_;
  Parameter* d_skip_;
  Norm gated_norm_;
  Linear out_proj_;
  int64_t batch_ = 0, seq_ = 0;
  Tensor z_, dt_, xs_, b_, c_, y_, saved_, sz_;
  Tensor ForwardCuda(const Tensor& x, int64_t batch, int64_t seq);
  Tensor BackwardCuda(const Tensor& dy);
  Tensor u_, rstd_;
  Tensor StepCuda(const Tensor& x, int64_t chunk, struct Mamba2State* st, bool rewindable);
};

}  // namespace gyre::ops
