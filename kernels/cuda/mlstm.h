// mLSTM cell on the GPU: chunkwise-parallel forward and backward (training / prefill) and the
// single-step recurrence (generation). Same math, layouts, gradient conventions and state
// semantics as the CPU reference kernels/cpu/mlstm.h (read that header for the formulas); this
// file only says what differs: dtypes, supported sizes, buffers and streams.
//
// Dtypes. q, k, v, h and their gradients (dq, dk, dv, dh): bf16. Gate pre-activations ĩ, f̃ and
// their gradients: fp32 (they are NH numbers per token; fp32 keeps the exponentials exact-ish
// and costs nothing). States C, n, m (initial, final, their gradients): fp32. Inside: bf16
// tensor-core products (mma.sync m16n8k16) with fp32 accumulation; the chunk-boundary states
// saved for the backward are stored as bf16 hi + lo pairs by default (or as bf16; see
// MlstmStatePrecision), the carried recurrence stays fp32 in registers.
//
// Layouts (token-major, as on the CPU): q, k [B, S, NH, dk]; v, h [B, S, NH, dv];
// ĩ, f̃ [B, S, NH]; state C [B, NH, dk, dv], n [B, NH, dk], m [B, NH].
//
// Supported sizes (MlstmCheck says why not): chunk_size ∈ {16, 32, 64, 128, 256}; dk and dv
// multiples of 64; any S >= 1 (the last chunk may be shorter); pointers of q, k, v, h, dh, dq,
// dk, dv 16-byte aligned. The CPU allows any chunk size; 16-128 cover every configuration in
// MODELS.md (TFLA uses 64 or 128). Chunk 256 (session 15; the xLSTM presets with heads of 1024
// and wider use it, ops/model_config.cc) runs only on the chunk-128
// warpgroup-MMA kernels over 128-token halves, each chunk's off-diagonal block (second-half
// queries x first-half keys) inside those kernels after a small pre-pass per chunk-head (helpers
// off256 / off256b, session 18; see "Chunk 256's off-diagonal block" below): it needs dk
// and dv multiples of 128, state_tile and io_slab 0 or 128, a gate schedule other than
// kSequential and a bwd_dv other than kMmaSync. It stores half the chunk-boundary states (the
// xlstm[1:0]-125m step's allocator peak 43.1 -> 37.1 GiB) but is slower at the 125m cell (+9%)
// and faster at the 1.3B head, dk = dv = 1024 (cell −6%, step −3 to −4%; kernels/cuda/mlstm_notes.md,
// session 15).
//
// Gradient convention: MlstmOptions::stop_normaliser_gradient as on the CPU. false (default):
// the true gradient of this forward (part (a) with m frozen + the exact m correction);
// true: the convention of NX-AI/mlstm_kernels (TFLA), denominators held constant.
//
// Buffers. `saved` (MlstmChunkwiseSavedBytes) is written by the forward and read by the
// backward; it is also the forward's workspace, so it is required even without a backward.
// `scratch` (MlstmChunkwiseBackwardScratchBytes) is the backward's workspace. Both come from the
// caller (e.g. a DeviceAllocator block), so nothing is allocated inside a training step.
// Alignment: 256 bytes (cudaMalloc / DeviceAllocator blocks are).
//
// Gradient contract (llm.c, as on the CPU): dq, dk, dv, dĩ, df̃ and d_initial are OVERWRITTEN.
// Every function enqueues on `stream` and returns without synchronising; a CudaResult error
// means a bad argument or a launch failure. Thread-safety: pure functions of their arguments;
// calls on disjoint buffers may run concurrently on different streams.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kernels/cuda/device_info.h"

namespace gyre::cuda {

struct MlstmShape {
  int64_t batch = 0;      // B
  int64_t seq_len = 0;    // S (ignored by the step)
  int64_t num_heads = 0;  // NH
  int64_t dk = 0;         // head dimension of q and k
  int64_t dv = 0;         // head dimension of v and h
};

enum class MlstmForgetGate {
  kSigmoid,      // lf = logσ(f̃) (default; xLSTM and TFLA)
  kExponential,  // lf = f̃
};

// How the intermediates that the TRUE gradient cancels against each other are kept. The true
// gradient of h_t = num_t / den_t w.r.t. q_t and k_s is Σ_s w_ts k_s dh_t·(v_s − h_t) / den_t: at
// ill-conditioned tokens (one s dominates, h_t ≈ v_s) the two halves cancel, so h_t, C_k (the
// numerator's state) and dC_k must be far more exact than bf16 for the difference to survive.
enum class MlstmStatePrecision {
  kAuto,       // kSplitBf16 (both conventions: with stop_normaliser_gradient df̃ = F + Σ (q·dq −
               // k·dk) suffix sums cancel too; kBf16 measured 1.3e-1 / 2.0e-2 there on the
               // extreme-gate / S 8200 test cases, kSplitBf16 1.7e-2 / 1.2e-2)
  kSplitBf16,  // C_k, dC_k, P (in P·V) and h kept as bf16 hi + lo pairs (≈ 16 mantissa bits);
               // every product with them is done twice (hi, lo); the forward saves h's lo part
  kBf16,       // single bf16 (the first version; faster, true gradient loses accuracy)
};

// How the two state recurrences apply their per-token weights (E_t to k_t in the forward,
// G_t·scale/den_t to q_t in the backward) on the bf16 MMA operand, when the states are split
// (MlstmStatePrecision kSplitBf16 / kAuto); with kBf16 states the weights are always hi only.
// hi only saves one MMA per product but breaks cancellations that df̃ relies on: df̃ = F +
// Σ_{t≥r}(q·dq − k·dk) sums over long suffixes. Measured (H100, 2026-11-26, bench/RESULTS.md
// helper mlstm4): hi only in the backward (kSplitForward) takes the S 8200 case's TRUE-gradient
// df̃ from 2.0e-3 to 1.99e-2 (band 2e-2: in, but at the edge) and the TFLA-convention df̃ out of
// its band (2.0e-2 gates ±30, 2.9e-2 S 8200); hi only in both (kBf16) failed the same two
// TFLA-convention checks (helper mlstm3). The gain of kSplitForward at the 7B-heads shape was
// 0.009 ms of 1.86 (state_bwd 0.257 vs 0.266 ms), so the default keeps hi + lo everywhere.
enum class MlstmStateWeights {
  kAuto,           // = kSplitBf16
  kSplitBf16,      // hi + lo in both kernels
  kSplitForward,   // hi + lo in the forward, hi only in the backward (benchmarks / experiments)
  kBf16,           // hi only in both (benchmarks / experiments)
};

// Which algorithm computes the gate prefix scans (results agree to fp32 rounding).
enum class MlstmGateSchedule {
  kAuto,           // default: kCluster while B·NH <= #SMs / 2, else kChunkParallel
  kChunkParallel,  // one block per head, one warp per chunk / many tokens per thread
  kCluster,        // each head's chunks (forward) / tokens (backward) split over a cluster of
                   // 2-16 CTAs, per-CTA aggregates exchanged through distributed shared memory,
                   // so few heads still fill the GPU (7B layout: 8 heads; bench/RESULTS.md)
  kSequential,     // the first version: one warp (forward) / one 256-thread block (backward)
                   // walks the sequence (slow when B·NH is small)
};

// Which kernel computes dV in the backward (step 6, bwd_dv). The warpgroup-MMA kernel needs chunk
// 128 and dv a multiple of 128; elsewhere every choice runs the mma.sync kernel. Same math and
// the same operands (dC_{k+1} hi plane, Pᵀ as bf16) on both; results differ by fp32 summation order.
enum class MlstmBwdDvKernel {
  kAuto,           // GYRE_MLSTM_BWD_DV (read once per process): "wgf" or unset = kWgmmaFused,
                   // "mma" = kMmaSync; any other value makes MlstmChunkwiseBackward return an
                   // error naming it
  kMmaSync,        // mlstm_bwd_dv: mma.sync m16n8k16 + ldmatrix (every shape the wgmma kernel
                   // does not take)
  kWgmmaFused,     // mlstm_bwd_dv_wg_fused: one block per (head, chunk) for all dv slabs, Sᵀ and
                   // Pᵀ computed once; the default since session 8: 0.542 -> 0.335 ms at the 125m
                   // cell, 0.288 -> 0.164 ms at the 1.3b layout (H100, bench/RESULTS.md)
};

// At chunk 128 with 128-column h slabs fwd_out runs mlstm_fwd_out_ws3 (three TMA dk stages), and
// with 128×128 state tiles the two state recurrences run mlstm_state_fwd_ws / mlstm_state_bwd_ws
// (TMA producer warpgroup, TMA box stores); there is no choice left. The earlier kernels (the
// two-stage fwd_out, the warpgroup cp.async state kernels; MlstmFwdOutKernel and
// MlstmStateKernel, GYRE_MLSTM_FWD_OUT=ws, GYRE_MLSTM_STATE_FWD / _BWD=wg) were deleted after
// losing in the lead's 2026-11-27 whole-step confirmation. bwd_dqk at chunk 128 with 128-column
// dq/dk slabs runs mlstm_bwd_dqk_ws (one block per head, chunk and slab); the fused one
// (MlstmBwdDqkKernel::kFusedSlabs, GYRE_MLSTM_BWD_DQK=fused) lost (H100, 125m cell 0.868 vs 0.761
// ms) and was deleted. GYRE_MLSTM_FWD_OUT accepts only "ws3", GYRE_MLSTM_STATE_FWD /
// GYRE_MLSTM_STATE_BWD / GYRE_MLSTM_BWD_DQK only "ws" (or unset); any other value makes
// MlstmChunkwiseForward / Backward return an error naming it.

// How the two chunk-128 TMA state kernels (mlstm_state_fwd_ws / _bwd_ws: 128×128 state tiles,
// one 384-thread block of 192 KB shared memory per tile, so one block an SM) meet a partial last
// wave (helper state16, session 16; kernels/cuda/mlstm_notes.md). The bytes are the same either way
// (every state element gets the same products in the same order; tested bytewise).
enum class MlstmStateTail {
  kAuto,   // GYRE_MLSTM_STATE_TAIL (read once per process): "split" or unset = kSplit (the
           // default since session 16: state_fwd −4%, state_bwd −1% at the 125m cell on an
           // H100), "full" = kFull; any other value makes forward, recompute and backward return
           // an error naming it
  kFull,   // one block per tile
  kSplit,  // the tiles of the last wave (tiles % #SMs) as two 64-column blocks each, where that
           // wave is partial and its halves fit into one wave (125m cell: 576 tiles on 132 SMs ->
           // 528 full blocks + 96 halves); elsewhere, at other chunk sizes and with 64×64 state
           // tiles the kFull kernels run
};

// When the consumers of the chunk-128 TMA kernels fwd_out (mlstm_fwd_out_ws3) and bwd_dqk
// (mlstm_bwd_dqk_ws) hand a shared-memory stage back to their producer (helper dqk16, session 16;
// kernels/cuda/mlstm_notes.md). The outputs are the same bytes either way (the same products in the
// same order; tested bytewise).
enum class MlstmRingRelease {
  kAuto,   // GYRE_MLSTM_RING (read once per process): "eager" or unset = kEager (the default
           // since session 16: fwd_out −5.6%, bwd_dqk −5.8% at the 125m cell on an H100), "lag" =
           // kLag; any other value makes forward and backward return an error naming it
  kLag,    // a stage is released once the next stage has arrived (wgmma wait depth 1)
  kEager,  // a stage is released as soon as its own wgmma group retired (wait depth 0), so the
           // producer refills it one stage earlier
};

// Whether chunk 128's fwd_out runs on a persistent grid (helper persist17, session 17;
// kernels/cuda/mlstm_notes.md): one block per SM, each drawing (slab, chunk, head) tiles from a
// device counter, the next tile's first stages loaded under this tile's epilogue. The same bytes as
// the default (tested bytewise). H100, medians of 3: 125m cell fwd_out 0.465 -> 0.390 ms, 1.3b
// cell (L128) 0.554 -> 0.515, step xlstm[1:0]-125m B16 127.3 -> 125.5 ms. ops sets it from
// GYRE_MLSTM_PERSIST (off | fwd_out | dqk | both, default both since session 17; read once through
// ops/env_switch.h); the kernels read no environment for it, and MlstmOptions' own default stays
// kOff (the kernel-level API and its tests choose explicitly).
// kDqk / kBoth (helper persistdqk17, session 17): chunk 128's bwd_dqk the same way
// (mlstm_bwd_dqk_ws_persist; the same bytes as the default, tested bytewise). H100: 125m cell
// bwd_dqk 0.719 -> 0.661 ms, 1.3b cell (L128) 0.960 -> 0.931, step xlstm[1:0]-125m B16 (fwd_out ->
// both) 125.4 -> 124.2 ms.
enum class MlstmPersist {
  kOff,     // one block per tile (mlstm_fwd_out_ws3_eager / mlstm_fwd_out_ws3 under kLag)
  kFwdOut,  // mlstm_fwd_out_ws3_persist (eager stage release whatever `ring` says); other chunk
            // sizes and 64-column slabs run as kOff
  kDqk,     // mlstm_bwd_dqk_ws_persist (eager release whatever `ring` says; fwd_out as kOff)
  kBoth,    // kFwdOut and kDqk
};

// Chunk 256's off-diagonal block (second-half queries x first-half keys; helpers off256 / off256b,
// session 18; kernels/cuda/mlstm_notes.md). Forward: a small pre-pass (mlstm_fwd_offdiag_p_l256)
// computes the gated scores P' = S' ⊙ W once per chunk-head (bf16 hi + lo, in the order of the
// wgmma A fragments) and their row sums into `saved`; the half-1 blocks of fwd_out add P'·V0 to
// their fp32 accumulator before the one normalisation (h is rounded once). Backward: a pre-pass
// (mlstm_bwd_offdiag_p_l256) stores P̃ᵀ, dS'ᵀ and dS' once per chunk-head as wgmma A fragments in
// `scratch`; bwd_dv's half-0 blocks add P̃ᵀ dH1, bwd_dqk's half-0 blocks dS'ᵀ Q1 and its half-1
// blocks dS' K0 before their one bf16 rounding. At chunk 256 `saved` holds 64.5 KB and `scratch`
// 96 KB more per chunk-head for these fragments. (The first form, separate passes after the
// diagonal kernels that re-read the operands and rewrote h / dq / dk / dv as bf16 — MlstmOffdiag
// kPass / kFused, GYRE_MLSTM_OFFDIAG — lost on time and was deleted by helper offclean18; a set
// GYRE_MLSTM_OFFDIAG other than "all" makes the forward and the backward return an error.)

// The forward and the backward of one step must get the same options: what the forward saves
// depends on chunk_size and the effective state precision (kAuto resolves it from
// stop_normaliser_gradient).
struct MlstmOptions {
  int64_t chunk_size = 64;  // 16, 32, 64, 128 or 256 (see "Supported sizes" above)
  MlstmForgetGate forget_gate = MlstmForgetGate::kSigmoid;
  double eps = 1e-6;
  bool stop_normaliser_gradient = false;  // see the top of this file
  MlstmStatePrecision state_precision = MlstmStatePrecision::kAuto;
  MlstmGateSchedule gate_schedule = MlstmGateSchedule::kAuto;
  MlstmStateWeights state_weights = MlstmStateWeights::kAuto;
  // Rows × columns of C that one block of the two state recurrences owns: 64 (64×64), 128
  // (128×128, needs dk and dv multiples of 128) or 0 = auto: 128 where allowed and
  // B·NH·(dk/128)·(dv/128) >= 128 blocks, else 64 (measured on an H200: bench/RESULTS.md).
  int64_t state_tile = 0;
  // Columns per block of the chunk-output kernels: h columns of fwd_out and dq/dk columns of
  // bwd_dqk: 64, 128 (needs dv resp. dk multiples of 128; otherwise 64 is used) or 0 = auto: 128
  // unless it leaves fewer than 8 warps resident per SM (chunk 64 with split states: 4) and 64
  // keeps more (measured in bench/RESULTS.md, helper mlstm5). Chunk 64 with dv a multiple of 192
  // but not of 128 takes wider dv slabs whatever this says (fwd_out 96, bwd_dv 192 columns; mlstm.cu
  // UseWideSlabs, GYRE_MLSTM_WIDE_SLABS=off keeps 64).
  int64_t io_slab = 0;
  // Backward only (see MlstmBwdDvKernel; kAuto follows GYRE_MLSTM_BWD_DV, default kWgmmaFused).
  MlstmBwdDvKernel bwd_dv = MlstmBwdDvKernel::kAuto;
  // Chunk 128's TMA state kernels: the last wave whole or split (see MlstmStateTail).
  MlstmStateTail state_tail = MlstmStateTail::kAuto;
  // Chunk 128's fwd_out / bwd_dqk TMA kernels: when a stage is released (see MlstmRingRelease).
  MlstmRingRelease ring = MlstmRingRelease::kAuto;
  // Chunk 128's fwd_out / bwd_dqk on a persistent grid (see MlstmPersist), and that grid's blocks: 0 = one
  // per SM (never more than the tiles); tests set fewer so that each block loops over many tiles.
  MlstmPersist persist = MlstmPersist::kOff;
  int64_t persist_blocks = 0;
  // The factor q·kᵀ is scaled by; 0 = 1/sqrt(dk). A caller that zero-pads q and k per head to a
  // supported dk (the xLSTM Large block at dk 96 runs the cell at 128, ops/XLSTM_LARGE.md) passes
  // 1/sqrt(its true dk): the zero columns add nothing to q·k or to C, so the cell is then exactly
  // the unpadded one. Host-side only (it sets the kernels' `scale` argument).
  double qk_scale = 0;
};

// Device pointers to one (C, n, m) triple for all B×NH heads (fp32). A null `c` in an input
// state means zeros; in an output state, "not wanted".
template <typename Elem>
struct MlstmDeviceState {
  Elem* c = nullptr;  // [B, NH, dk, dv]
  Elem* n = nullptr;  // [B, NH, dk]
  Elem* m = nullptr;  // [B, NH]
};

struct MlstmDeviceInputs {
  const __nv_bfloat16* q = nullptr;  // [B, S, NH, dk] unscaled (the kernel applies 1/sqrt(dk))
  const __nv_bfloat16* k = nullptr;  // [B, S, NH, dk]
  const __nv_bfloat16* v = nullptr;  // [B, S, NH, dv]
  const float* igate = nullptr;      // [B, S, NH]
  const float* fgate = nullptr;      // [B, S, NH]
};

struct MlstmDeviceGrads {
  __nv_bfloat16* dq = nullptr;
  __nv_bfloat16* dk = nullptr;
  __nv_bfloat16* dv = nullptr;
  float* digate = nullptr;
  float* dfgate = nullptr;
};

// Ok when the shape and options are supported by these kernels (see the top of this file).
CudaResult MlstmCheck(const MlstmShape& shape, const MlstmOptions& options);

size_t MlstmChunkwiseSavedBytes(const MlstmShape& shape, const MlstmOptions& options);
// The prefix of `saved` the backward reads: all of it but, at chunk 256, the fused forward's P'
// fragments and row sums at its end (written and read inside one forward call).
size_t MlstmChunkwiseSavedBackwardBytes(const MlstmShape& shape, const MlstmOptions& options);
size_t MlstmChunkwiseBackwardScratchBytes(const MlstmShape& shape, const MlstmOptions& options);

// h [B, S, NH, dv] overwritten; saved overwritten; final_state (null c = not wanted) overwritten.
CudaResult MlstmChunkwiseForward(const MlstmShape& shape, const MlstmOptions& options,
                                 const MlstmDeviceInputs& in,
                                 MlstmDeviceState<const float> initial, __nv_bfloat16* h,
                                 void* saved, MlstmDeviceState<float> final_state,
                                 cudaStream_t stream);

// States-only recomputation (helper mem12; ops GYRE_MLSTM_RECOMPUTE=states). `saved` holds two
// kinds of bytes: the chunk states (C_k hi / lo, C_S, n_k, m_k and the gate scan's per-token rows
// b_t, m_t, E_t and decays), which the gate scan + state_fwd rebuild from q, k, v, gates and
// `initial` alone, and the per-token rows only the output pass writes (den_t = n_tᵀq̂_t and, split
// precision, h lo). A caller that wants to drop `saved` between forward and backward keeps the
// latter (MlstmChunkwiseTokenBytes: 1/20 of `saved` at the 1.3b shape) with
// MlstmChunkwiseCopyTokens after the forward, and before the backward rebuilds `saved` with
// MlstmChunkwiseRecomputeStates: the same launches of the same kernels on the same inputs as the
// forward's first two, plus two device copies, so `saved`'s first MlstmChunkwiseSavedBackwardBytes
// are byte for byte the forward's (the backward reads nothing else of it). The output pass (h, ~70%
// of the forward's MACs) is not rerun.
size_t MlstmChunkwiseTokenBytes(const MlstmShape& shape, const MlstmOptions& options);
// tokens (MlstmChunkwiseTokenBytes) <- the per-token part of a forward's `saved`.
CudaResult MlstmChunkwiseCopyTokens(const MlstmShape& shape, const MlstmOptions& options,
                                    const void* saved, void* tokens, cudaStream_t stream);
// saved (MlstmChunkwiseSavedBytes) overwritten: the chunk states from `in` and `initial` (as the
// forward's), the per-token part from `tokens`. h is not written (the caller keeps the forward's).
CudaResult MlstmChunkwiseRecomputeStates(const MlstmShape& shape, const MlstmOptions& options,
                                         const MlstmDeviceInputs& in,
                                         MlstmDeviceState<const float> initial,
                                         const void* tokens, void* saved, cudaStream_t stream);

// Needs the forward's inputs, `initial`, h and saved unchanged. dh [B, S, NH, dv]; d_final
// (null c = zero) is the gradient w.r.t. the forward's final state.
CudaResult MlstmChunkwiseBackward(const MlstmShape& shape, const MlstmOptions& options,
                                  const MlstmDeviceInputs& in,
                                  MlstmDeviceState<const float> initial, const __nv_bfloat16* h,
                                  const void* saved, const __nv_bfloat16* dh,
                                  MlstmDeviceState<const float> d_final,
                                  const MlstmDeviceGrads& grads,
                                  MlstmDeviceState<float> d_initial, void* scratch,
                                  cudaStream_t stream);

// The backward with the per-token dots given instead of formed from dh, h and h lo (ops: the
// mLSTM block's output norm backward writes dh and reads h anyway, so it forms them and the
// cell's bwd_prep reads 5 floats a token instead of three [tokens, dv] bf16 rows;
// GYRE_MLSTM_DH_DOT=norm, ops/XLSTM_GLUE.md). dh_dots [B, S, NH] fp32 (token-major, as ĩ, f̃):
//   dh_dots[b, t, hd] = Σ_j float(dh[b, t, hd, j]) · (float(h[b, t, hd, j]) + float(h_lo[b, t, hd, j]))
// over j < dv, with dh the bf16 values passed here, h the forward's output and h_lo the forward's
// lo part of h (MlstmChunkwiseSavedHLo; none, i.e. 0, with MlstmStatePrecision::kBf16), the
// products and sums in fp32 (any fixed order: the true gradient relies on h + h_lo, not h —
// dh·h cancels against dh·v_s). Everything else as MlstmChunkwiseBackward; the results equal its
// own up to the dots' fp32 summation order (bitwise when the dots are its bits: its warp sums
// 8-element runs of lane l at columns 8l + 256i, then a butterfly over the 32 lanes).
// With stop_normaliser_gradient the dots are not used (may be null); otherwise required.
CudaResult MlstmChunkwiseBackwardWithDots(const MlstmShape& shape, const MlstmOptions& options,
                                          const MlstmDeviceInputs& in,
                                          MlstmDeviceState<const float> initial,
                                          const __nv_bfloat16* h, const void* saved,
                                          const __nv_bfloat16* dh, const float* dh_dots,
                                          MlstmDeviceState<const float> d_final,
                                          const MlstmDeviceGrads& grads,
                                          MlstmDeviceState<float> d_initial, void* scratch,
                                          cudaStream_t stream);

// Where a forward's `saved` keeps h's lo part (bf16 [B, S, NH, dv], h_fp32 − h), or null when the
// state precision keeps none (kBf16) or saved is null. Read-only for callers; valid while `saved`
// holds that forward's bytes (or MlstmChunkwiseRecomputeStates' rebuild of them).
const __nv_bfloat16* MlstmChunkwiseSavedHLo(const MlstmShape& shape, const MlstmOptions& options,
                                            const void* saved);

// One time step for all B×NH heads (generation). q, k [B, NH, dk]; v [B, NH, dv]; ĩ, f̃ [B, NH]
// fp32; `state` (required, fp32) read and overwritten with (C_t, n_t, m_t); h [B, NH, dv]
// overwritten. Only dk, dv, batch, num_heads of `shape` are used (any sizes). A cluster of 16
// CTAs per head (8 once B·NH·16 exceeds the SM count) splits the dk rows of the state; h's
// dk-sum is reduced through distributed shared memory (sm_90). Bandwidth: bench/RESULTS.md.
CudaResult MlstmStepForward(const MlstmShape& shape, const MlstmOptions& options,
                            const __nv_bfloat16* q, const __nv_bfloat16* k,
                            const __nv_bfloat16* v, const float* igate, const float* fgate,
                            MlstmDeviceState<float> state, __nv_bfloat16* h, cudaStream_t stream);

// Benchmarks only: when set, called on the host right after every kernel these functions
// launch, with the kernel's name and the stream (e.g. to record a cudaEvent per kernel). Null by
// default (no cost). Not thread-safe: set it before any other thread launches mLSTM work.
using MlstmLaunchHook = void (*)(const char* kernel_name, cudaStream_t stream);
void MlstmSetLaunchHook(MlstmLaunchHook hook);

}  // namespace gyre::cuda
