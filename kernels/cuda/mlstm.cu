// mLSTM chunkwise forward/backward and step on the GPU; the contract is in mlstm.h, the math in
// kernels/cpu/mlstm.h (letters below are that file's: b_t local log-forget cumsum inside a chunk,
// g = b_last, m_t token stabiliser, m_k chunk-boundary stabiliser, G_t = e^{b_t + m_k − m_t},
// E_t = e^{g − b_t + ĩ_t − m_{k+1}}, W_ts = e^{b_t − b_s + ĩ_s − m_t}, decay = e^{g + m_k − m_{k+1}}).
//
// Algorithm (two-level, after TFLA [Beck et al. 2025, "Tiled Flash Linear Attention"]; our code):
//
// Forward, per head, chunks of L tokens:
//   1. gates_fwd       one block per head, one warp per chunk (groups of 32 chunks): chunk-local
//                      cumsum b_t and the prefix max of ĩ − b (warp scans), then the boundary m_k
//                      (the max-plus recurrence m_{k+1} = g_k + max(m_k, r_k) over the group's
//                      chunk totals, one thread), then m_t and the state-update weights E_t and
//                      decay_k, so the state kernel only loads them. (kSequential: one warp walks
//                      all chunks, the first version. With few heads (B·NH <= #SMs / 2) a head's
//                      chunks are split over a cluster of CTAs: mlstm_gates_fwd_cluster.)
//   2. state_fwd       the inter-chunk recurrence C_{k+1} = decay·C_k + Kᵀ diag(E) V on tensor cores:
//                      one block per (head, TM×TN tile of C, 64×64 or 128×128); the tile lives in
//                      fp32 registers for the whole sequence (no rounding of the carried state),
//                      each chunk adds one (TM × L) · (L × TN) product with E_t applied to the
//                      Kᵀ fragments in registers as bf16 hi + lo (two MMAs, exact weights; no
//                      shared-memory pass); three K/V stages (two chunks in flight); n_{k+1} by
//                      the same fragments times a ones operand; writes every C_k as bf16
//                      hi + lo (split precision) or bf16, staged through the stage about to be
//                      refilled for 16-byte stores, and n_k in fp32.
//   3. fwd_out         one block per (head, chunk, DVT-column slab of h): S = Q̂Kᵀ (causal warps
//                      only), P = S ⊙ W, den = P·1 + G q̂·n_k, h = (P V + G Q̂ C_k) / (max(|den|,
//                      e^{−m}) + ε). Each warp owns 16 query rows; P goes from the accumulator
//                      registers straight into the A operand of P·V (no shared-memory round trip).
//
// Backward (m frozen = "part (a)", then the exact m correction = "part (b)"):
//   4. bwd_prep        per token: 1/denom, dden = ±(−dh·h/denom) where |den| won the max (0 with
//                      stop_normaliser_gradient), dm = −ε·dh·h/denom (0 likewise), and the
//                      dC/dn recurrence weights scale·G_t/denom_t, scale·G_t·dden_t. (With the
//                      dots given, MlstmChunkwiseBackwardWithDots: mlstm_bwd_prep_dots, one
//                      thread a token, the scalars only; ops forms dh·(h + h_lo) in its out-norm
//                      backward, GYRE_MLSTM_DH_DOT=norm, ops/XLSTM_GLUE.md session 16.)
//   5. state_bwd       reverse recurrence dC_k = decay·dC_{k+1} + Q̂ᵀ diag(G/denom) dH (dn: with
//                      dden), fp32 tile in registers, organised as state_fwd (weights on the Q̂ᵀ
//                      fragments as hi + lo, three stages); stores every dC_{k+1} as bf16
//                      (hi + lo), dn_{k+1} fp32.
//   6. bwd_dv          per (head, chunk, DVT slab): dV = Pᵀ diag(1/denom) dH + diag(E) K dC_{k+1}.
//   7. bwd_dqk         per (head, chunk, DKT slab): dP = dH Vᵀ, dS = W ⊙ (dP/denom + dden) (to
//                      shared memory as bf16), dQ = dS K + diag(G)(dH C_kᵀ/denom + dden n_k) (times
//                      1/sqrt(dk)), dK = dSᵀ Q̂ + diag(E)(V dC_{k+1}ᵀ + dn_{k+1}); also the row dots
//                      q·dq and k·dk.
//   8. gates_bwd       (few heads: a cluster of CTAs per head, mlstm_gates_bwd_cluster; else)
//                      one block per head (1024 threads, 8 consecutive tokens each: a thread-local
//                      sweep, one block scan of the thread aggregates, a second sweep; the first
//                      version: 256 threads, one block scan per 256 tokens): with m frozen,
//                      dĩ_t = k_t·dk_t and
//                      dlf_r = F + Σ_{t≥r} (q_t·dq_t − k_t·dk_t), F = <dC_S, C_S> + <dn_S, n_S>
//                      (the usual gated-linear-attention identity: e^{B_t} rides on q_t, e^{ĩ_s−B_s}
//                      on k_s); then part (b): the prefix argmax of ĩ_s − B_s (block scans over the
//                      sequence) routes each dm_t to the ĩ/B that set m_t; segment sums by prefix
//                      differences (deterministic, no atomics); df̃ = dlf·σ(−f̃) (sigmoid gate).
//
// Tensor cores: at chunk 128 the main loops run on Hopper's warpgroup MMA (wgmma, sm_90a;
// primitives in hopper_mma.cuh): mlstm_fwd_out_ws3 and mlstm_bwd_dqk_ws (128-column slabs; a TMA
// producer warpgroup and mbarrier stages since session 9), and mlstm_state_fwd_ws /
// mlstm_state_bwd_ws (128×128 tiles); operands in 128-byte-swizzled shared memory, three stages
// in bwd_dqk's phase 1. bwd_dv at chunk 128 with 128-column dv slabs runs
// mlstm_bwd_dv_wg_fused (one block per head-chunk for all slabs; the default since session 8,
// 0.542 -> 0.335 ms at the 125m cell on an H100; MlstmBwdDvKernel / GYRE_MLSTM_BWD_DV select the
// others). Everything else (chunk 16-64,
// 64-column slabs, 64×64 state tiles) uses mma.sync m16n8k16 with ldmatrix; at chunk 64 with dv
// a multiple of 192 but not of 128 (xlstm-large-125m's dv 192) fwd_out takes 96-column slabs and
// bwd_dv 192-column ones (UseWideSlabs, session 21: the cell 1.12 -> 1.03 ms). xlstm-125m cell
// (H200): fwd+bwd 3.53 -> ~3.0 ms; what was measured: kernels/cuda/mlstm_notes.md (session 7).
// Defaults since the lead's session-8 device call (helper mlstm10's kernels; H100, 125m cell):
// mlstm_fwd_out_ws3 (three dk stages, 0.624 -> 0.495 ms) and mlstm_state_fwd_ws /
// mlstm_state_bwd_ws (TMA producer, TMA box stores; 0.449 -> 0.383 and 0.453 -> 0.334 ms), all
// byte-identical to the kernels they replaced. The replaced ones (the two-stage mlstm_fwd_out_ws,
// the warpgroup mlstm_state_fwd / _bwd<128, 128, 128, true>) were deleted after losing in the
// lead's 2026-11-27 whole-step confirmation; mlstm_fwd_out_wsf (the two-stage kernel without
// C7515, 0.599 ms) lost to ws3 and was deleted before. mlstm_bwd_dqk_fused (helper mlstm11: one
// block per head-chunk for all dk slabs) lost to the per-slab mlstm_bwd_dqk_ws (H100, 125m cell
// 0.867-0.869 vs 0.759-0.762 ms) and was deleted (2026-11-27).
// The fused forward mlstm_fwd_fused (helper fusedfwd19, session 19: state_fwd + fwd_out in one block
// per (head, 64-column dv tile) owning C's columns for all of dk, C_k never read back; GYRE_MLSTM_FWD=
// fused) reproduced the default's bytes but lost (H100, 125m cell forward 0.757 -> 1.28 ms, 1.12 without
// the C_k stores: the update and output chains run in series in one block) and was deleted; the code
// is on commit 1cc40b9, the count and the measurements in kernels/cuda/mlstm_notes.md (session 19).
//
// Chunk 256 (opt-in; helper mlstm256, session 15; LaunchForward256 / LaunchBackward256): the
// chunk-128 warpgroup-MMA family on 128-token halves. The gate scans (_wide<8>) store b relative
// to the boundary between a chunk's halves and m_k + g0 for m_k (ChunkGates: chunk 128's rounding
// of b_t − b_s); the state kernels (_l256) walk 128-token steps and store C_k / dC_{k+1} only at
// chunk boundaries (half the states' bytes); fwd_out / bwd_dv / bwd_dqk (_l256) run one block per
// half (its causal diagonal block and the chunk's state terms). Each chunk's off-diagonal block
// (second-half queries x first-half keys) was first added by two separate passes afterwards;
// measured (H100): 125m cell fwd+bwd 2.70 vs 2.49 ms at chunk 128, 1.3b cell (dk = dv = 1024) 3.05
// vs 3.24 (kernels/cuda/mlstm_notes.md, session 15).
// Since session 18 (helpers off256, off256b) the off-diagonal block runs inside the consumers:
// forward, a pre-pass (mlstm_fwd_offdiag_p_l256) computes P' = S' ⊙ W once per chunk-head into
// `saved` as fwd_out's A fragments, and fwd_out's half-1 blocks add P'·V₀ before their one
// normalisation (mlstm_fwd_out_ws3_l256_off[_eager]); 1.3b cell forward −12 to −19%,
// xlstm[1:0]-1.3b B4 step −1.2%. Backward, a pre-pass (mlstm_bwd_offdiag_p_l256, two blocks per
// chunk-head) stores P̃ᵀ, dS'ᵀ and dS' as wgmma A fragments in `scratch`, and bwd_dv's half-0
// blocks add P̃ᵀ dH₁, bwd_dqk's half-0 blocks dS'ᵀ Q₁ and half-1 blocks dS' K₀ before their one
// rounding (mlstm_bwd_dv_wg_fused_l256_off, mlstm_bwd_dqk_ws_l256_off); 1.3b cell off-diagonal
// backward 0.225 → 0.119 ms, 125m 0.338 → 0.156, xlstm[1:0]-1.3b B4 step −3.1 ms. The separate
// passes (mlstm_fwd_offdiag_l256 / mlstm_bwd_offdiag_l256, their read-modify-writes of the bf16
// outputs, and the diagonal-only _l256 consumers they followed) were deleted by helper offclean18.
//
// Work at the xLSTM-1.3b bench shape (B8 S2048 NH4 dk256 dv512 L128; 512 head-chunks):
//   forward MACs per head-chunk as executed: state L·dk·dv (16.8M) + fwd_out: causal half of Q̂Kᵀ
//   once per DVT slab (4 × 2.1M) + causal half of P·V (4.2M) + Q̂C_k (16.8M) ≈ 46M → 47 GFLOP;
//   backward ≈ state L·dk·dv + bwd_dv (Sᵀ half per slab 4 × 2.1M, PᵀdH 4.2M, K dC 16.8M) +
//   bwd_dqk over both DKT slabs (dP halves 2 × 4.2M, dQ/dK intra 4 × 1M, dH C_kᵀ 16.8M, V dCᵀ
//   16.8M) ≈ 92M → 94 GFLOP. The bench counts the useful work (Q̂Kᵀ once): 41 + 84 GFLOP.
//   Bytes: q, k 34 MB each, v, h, dh 67 MB each; the bf16 boundary states (NC+1)·dk·dv·2 per
//   head = 143 MB written by the forward and read by the backward; the dC scratch (134 MB) is
//   written once and read twice. Forward ≈ 0.34 GB, backward ≈ 1.0 GB → ~0.08 ms + ~0.24 ms at
//   ~4.2 TB/s (H200); tensor time at ~700 TFLOP/s: ~0.06 ms + ~0.12 ms. Floor fwd+bwd ≈ 0.35 ms.
//   Split precision adds the lo halves: +21M MACs in fwd_out (Q̂ C_lo, P_lo V), +34M in bwd_dqk
//   (dH C_loᵀ, V dC_loᵀ), and C_lo, dC_lo, h_lo written and read (≈ +0.5 GB fwd+bwd).
//   Measured (H200, 2026-11-26, bench/RESULTS.md): fwd 0.65 ms, fwd+bwd 1.70 ms (true gradient,
//   split precision, 128×128 state tiles); bf16 states 0.59 / 1.53 ms (64×64 tiles). The first
//   version (bf16, sequential gate scans, fragment stores): 0.66 / 1.64 ms.
//   The xlstm-125m layout (dk = dv = 384, B16 S2048 NH4): per-kernel FLOPs and bytes, ncu stall
//   reasons (one 256-thread block per SM everywhere: 24-30% tensor-pipe use), what the lo planes
//   cost (15%) and buy, chunk 64 / 128 / 256, and what was tried: kernels/cuda/mlstm_notes.md.
//
// Precision (MlstmStatePrecision): the state recurrences keep C, n in fp32 registers for the
// whole sequence; the stored copies C_k, dC_k, the P operand of P·V and h (for the backward's
// dh·h) are bf16 hi + lo pairs by default. Why: the true gradient w.r.t. q_t, k_s is
// Σ_s w_ts k_s dh_t·(v_s − h_t)/den_t, a difference that nearly cancels at ill-conditioned
// tokens (one s dominates, h_t ≈ v_s), and df̃ = F + Σ_{t≥r} (q·dq − k·dk) cancels over long
// suffixes in both conventions; bf16 states / h moved those gradients by up to 4e-2 (CPU float64
// experiment with only C_k and h rounded) and 2.4e-2 / 1.3e-1 / 2.0e-2 on GPU test cases.
#include "kernels/cuda/mlstm.h"

#include <cooperative_groups.h>
#include <cuda.h>  // CUtensorMap
#include <cuda_bf16.h>
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/hopper_mma.cuh"
#include "kernels/cuda/tensor_map.h"

namespace gyre::cuda {
namespace {

// The kernels, by concern (kernels/cuda/MLSTM_LAYOUT.md: which kernel, helper and switch is where).
// One translation unit, as ssd.cu with its .cuh files: the kernels, their parameter blocks and the
// launchers below share this anonymous namespace, and every template instantiation is made by the
// launchers here.
#include "kernels/cuda/mlstm_device.cuh"      // Dims / FwdPtrs / BwdPtrs, mma.sync + hi/lo helpers
#include "kernels/cuda/mlstm_gates.cuh"       // 1. gates_fwd, 8. gates_bwd
#include "kernels/cuda/mlstm_mma_sync.cuh"    // the mma.sync family (chunk 16-64, 64-wide slabs)
#include "kernels/cuda/mlstm_state_ws.cuh"    // 2. / 5. state_fwd / state_bwd on wgmma (+ tail)
#include "kernels/cuda/mlstm_fwd_out_ws.cuh"  // 3. fwd_out on wgmma (+ persistent grid)
#include "kernels/cuda/mlstm_bwd.cuh"         // 4. bwd_prep, 6. bwd_dv, 7. bwd_dqk on wgmma
#include "kernels/cuda/mlstm_chunk256.cuh"    // chunk 256's off-diagonal pre-passes
#include "kernels/cuda/mlstm_step.cuh"        // generation step

// ---------------------------------------------------------------- layouts of saved / scratch

size_t AlignUp(size_t x) { return (x + 255) / 256 * 256; }

bool UseSplit(const MlstmOptions& o) {
  switch (o.state_precision) {
    case MlstmStatePrecision::kSplitBf16: return true;
    case MlstmStatePrecision::kBf16: return false;
    default: return true;  // kAuto: both conventions (see mlstm.h)
  }
}

// GYRE_MLSTM_OFFDIAG, read once per process: the switch between chunk 256's fused off-diagonal
// block and the separate passes (helpers off256 / off256b, session 18) is gone with the passes;
// "all" (the fused form, its last default) is still accepted, any other value makes the forward
// and the backward return an error naming it.
const char* OffdiagBadEnv() {
  static const char* const bad = [] {
    const char* e = std::getenv("GYRE_MLSTM_OFFDIAG");
    return e != nullptr && std::strcmp(e, "all") != 0 ? e : nullptr;
  }();
  return bad;
}

// P' of the fused off-diagonal forward, per chunk-head: 16 uint4 a consumer thread (its A
// fragments of P' hi, then lo: the m64n128 accumulator of its warpgroup packed as fwd_out packs P),
// stored [16][256 threads] so that a warp's load of one uint4 each is 512 contiguous bytes.
constexpr size_t kOffdiagFragBytes = 16 * 256 * 16;
// The fused off-diagonal backward's per chunk-head fragments (mlstm_bwd_offdiag_p_l256): 24 uint4
// a consumer thread, [24][256 threads]: 0-7 P̃ᵀ (rows s, bwd_dv's A), 8-15 dS'ᵀ (rows s, bwd_dqk's
// dK A), 16-23 dS' (rows t, bwd_dqk's dQ A), each the packing of an m64n128 accumulator.
constexpr size_t kOffdiagBwdFragBytes = 24 * 256 * 16;

struct SavedLayout {
  int64_t nc = 0;
  size_t c = 0;        // bf16 [BH][NC+1][dk][dv]  boundary C_k (hi part when split)
  size_t c_lo = 0;     // bf16 [BH][NC+1][dk][dv]  C_k − hi (split only)
  size_t h_lo = 0;     // bf16 [B][S][NH][dv]      h_fp32 − h (split only)
  size_t c_last = 0;   // f32  [BH][dk][dv]        C_S in fp32 (for <dC_S, C_S>)
  size_t n = 0;        // f32  [BH][NC+1][dk]
  size_t mk = 0;       // f32  [BH][NC+1]  (chunk 256: m_k + g0_k, see ChunkGates)
  size_t b_tok = 0;    // f32  [BH][S]  chunk-local cumsum of lf (chunk 256: minus g0_k)
  size_t m_tok = 0;    // f32  [BH][S]
  size_t den_tok = 0;  // f32  [BH][S]  n_tᵀq̂_t
  size_t e_tok = 0;    // f32  [BH][S]  E_t = e^{g − b_t + ĩ_t − m_{k+1}} (state-update weight)
  size_t decay = 0;    // f32  [BH][NC] e^{g + m_k − m_{k+1}}
  size_t p_off = 0;    // uint4 [BH][NC][16][256] P' fragments (chunk 256 only)
  size_t rs_off = 0;   // f32  [BH][NC][128]      P' row sums (likewise)
  size_t total = 0;
};

SavedLayout MakeSaved(const MlstmShape& s, const MlstmOptions& o) {
  SavedLayout l;
  const size_t bh = s.batch * s.num_heads;
  l.nc = (s.seq_len + o.chunk_size - 1) / o.chunk_size;
  size_t off = 0;
  l.c = off;
  off = AlignUp(off + bh * (l.nc + 1) * s.dk * s.dv * 2);
  l.c_last = off;
  off = AlignUp(off + bh * s.dk * s.dv * 4);
  l.n = off;
  off = AlignUp(off + bh * (l.nc + 1) * s.dk * 4);
  l.mk = off;
  off = AlignUp(off + bh * (l.nc + 1) * 4);
  l.b_tok = off;
  off = AlignUp(off + bh * s.seq_len * 4);
  l.m_tok = off;
  off = AlignUp(off + bh * s.seq_len * 4);
  l.den_tok = off;
  off = AlignUp(off + bh * s.seq_len * 4);
  l.e_tok = off;
  off = AlignUp(off + bh * s.seq_len * 4);
  l.decay = off;
  off = AlignUp(off + bh * l.nc * 4);
  // The split-precision parts come last, so every other offset is the same for both precisions.
  const bool split = UseSplit(o);
  l.c_lo = off;
  if (split) off = AlignUp(off + bh * (l.nc + 1) * s.dk * s.dv * 2);
  l.h_lo = off;
  if (split) off = AlignUp(off + bh * s.seq_len * s.dv * 2);
  // Chunk 256's off-diagonal P' (written and read inside one forward call) last.
  const bool fused_off = o.chunk_size == 256;
  l.p_off = off;
  if (fused_off) off = AlignUp(off + bh * l.nc * kOffdiagFragBytes);
  l.rs_off = off;
  if (fused_off) off = AlignUp(off + bh * l.nc * 128 * 4);
  l.total = off;
  return l;
}

int DvSlab(int64_t dv) { return dv % 128 == 0 ? 128 : 64; }

// Wide dv slabs at chunk 64 (session 21, helper cell125; the default since its call 3): where dv
// is not a multiple of 128 but of 192 (xlstm-large-125m's cell: dk 128, dv 192), the mma.sync
// fwd_out runs 96-column slabs and bwd_dv 192-column ones instead of 64. Why: each 64-column
// slab block recomputes the chunk's QKᵀ (fwd_out) / KQᵀ (bwd_dv) and re-reads its q / k tiles, and
// at 64 (b, h) pairs × 32 chunks the blocks are short, so the recomputation is most of the
// difference. fwd_out<64, 96>: 102 KB, two 4-warp blocks per SM as at 64, two slabs instead of
// three; bwd_dv<64, 192>: 112 KB, two blocks per SM (three at 64), no recomputation. Measured (H100,
// B16 S2048 NH4 dk128 dv192): fwd_out 0.269 -> 0.220 ms, bwd_dv 0.155 -> 0.117, the cell's fwd+bwd
// 1.12 -> 1.03 ms; the 125m step 73.4 -> 71.7 ms (3 of 3 rounds, two processes). Lost and deleted:
// fwd_out at 192 columns (0.222 alone, the step 72.5: one block per SM) and bwd_dv at 96 (0.152:
// two blocks per SM eat the saving). GYRE_MLSTM_WIDE_SLABS=off (read at every forward / backward,
// one getenv, so recurrent_step_bench --variants can alternate it on one model) keeps the 64
// slabs; "on" or unset = wide; any other value is an error naming it.
enum class WideSlabsSetting { kOn, kOff, kBad };
WideSlabsSetting WideSlabsEnv() {
  const char* e = std::getenv("GYRE_MLSTM_WIDE_SLABS");
  if (e == nullptr || std::strcmp(e, "on") == 0) return WideSlabsSetting::kOn;
  return std::strcmp(e, "off") == 0 ? WideSlabsSetting::kOff : WideSlabsSetting::kBad;
}
CudaResult WideSlabsCheck(const char* who) {
  if (WideSlabsEnv() != WideSlabsSetting::kBad) return {};
  return InvalidArgument(std::string(who) + ": GYRE_MLSTM_WIDE_SLABS must be on or off (or unset), got '" +
                         std::getenv("GYRE_MLSTM_WIDE_SLABS") + "'");
}
// Whether a chunk-64 launch at this dv takes the wide slabs (fwd_out 96, bwd_dv 192).
bool UseWideSlabs(int dv) { return dv % 128 != 0 && dv % 192 == 0 && WideSlabsEnv() == WideSlabsSetting::kOn; }
// Columns of h per fwd_out block and of dq/dk per bwd_dqk block (MlstmOptions::io_slab; the
// auto rule is next to the shared-memory layouts below).
int OutSlab(const MlstmShape& s, const MlstmOptions& o);
int DqkSlab(const MlstmShape& s, const MlstmOptions& o);
// Resolved MlstmOptions::state_tile. Auto: 128×128 tiles read K and V half as often but make 4x
// fewer blocks; measured on an H200 (bench/RESULTS.md, three-stage kernels) they win with >= 256
// blocks (1.3b shape: state kernels 0.20 + 0.20 vs 0.22 + 0.23 ms) and lose with 64 (7B heads:
// 0.35 + 0.40 vs 0.21 + 0.26 ms). Threshold: about one block per SM.
int StateTile(const MlstmShape& s, const MlstmOptions& o) {
  if (o.state_tile != 0) return static_cast<int>(o.state_tile);
  if (o.chunk_size == 256) return 128;  // the only tile at chunk 256 (MlstmCheck)
  const int64_t big_tile_blocks = s.batch * s.num_heads * (s.dk / 128) * (s.dv / 128);
  return s.dk % 128 == 0 && s.dv % 128 == 0 && big_tile_blocks >= 128 ? 128 : 64;
}

struct ScratchLayout {
  size_t dc = 0;      // bf16 [BH][NC][dk][dv]  dC_{k+1} for chunk k (hi part when split)
  size_t dc_lo = 0;   // bf16 [BH][NC][dk][dv]  dC_{k+1} − hi (split only)
  size_t dn = 0;      // f32  [BH][NC+1][dv/state_tile][dk]  partial dn_{k+1} (slot NC: dn_0)
  size_t inv_d = 0;   // f32  [BH][S]
  size_t coef = 0;    // f32  [BH][S]  scale·G_t/denom_t (dC recurrence weight of dh_t)
  size_t ddc = 0;     // f32  [BH][S]  scale·G_t·dden_t  (dn recurrence weight of q_t)
  size_t dden = 0;    // f32  [BH][S]
  size_t dm = 0;      // f32  [BH][S]
  size_t qdq = 0;     // f32  [BH][S][dk/DKT]  partial q·dq
  size_t kdk = 0;     // f32  [BH][S][dk/DKT]  partial k·dk
  size_t arg = 0;     // i32  [BH][S]
  size_t ps = 0;      // f64  [BH][S]
  size_t seg = 0;     // f64  [BH][S]
  size_t bfrag = 0;   // uint4 [BH][NC][24][256]  P̃ᵀ, dS'ᵀ, dS' fragments (chunk 256 only)
  size_t total = 0;
};

ScratchLayout MakeScratch(const MlstmShape& s, const MlstmOptions& o) {
  ScratchLayout l;
  const size_t bh = s.batch * s.num_heads;
  const size_t nc = (s.seq_len + o.chunk_size - 1) / o.chunk_size;
  const size_t S = s.seq_len;
  const size_t nt = s.dk / DqkSlab(s, o);
  size_t off = 0;
  l.dc = off;
  off = AlignUp(off + bh * nc * s.dk * s.dv * 2);
  l.dc_lo = off;
  if (UseSplit(o)) off = AlignUp(off + bh * nc * s.dk * s.dv * 2);
  l.dn = off;  // partial dn per state_bwd column block, slot NC = dn_0 (see mlstm_state_bwd)
  off = AlignUp(off + bh * (nc + 1) * (s.dv / StateTile(s, o)) * s.dk * 4);
  l.inv_d = off;
  off = AlignUp(off + bh * S * 4);
  l.coef = off;
  off = AlignUp(off + bh * S * 4);
  l.ddc = off;
  off = AlignUp(off + bh * S * 4);
  l.dden = off;
  off = AlignUp(off + bh * S * 4);
  l.dm = off;
  off = AlignUp(off + bh * S * 4);
  l.qdq = off;
  off = AlignUp(off + bh * S * nt * 4);
  l.kdk = off;
  off = AlignUp(off + bh * S * nt * 4);
  l.arg = off;
  off = AlignUp(off + bh * S * 4);
  l.ps = off;
  off = AlignUp(off + bh * S * 8);
  l.seg = off;
  off = AlignUp(off + bh * S * 8);
  // Chunk 256's off-diagonal A fragments (written and read inside one backward call).
  l.bfrag = off;
  if (o.chunk_size == 256) off = AlignUp(off + bh * nc * kOffdiagBwdFragBytes);
  l.total = off;
  return l;
}

// ---------------------------------------------------------------- slab choice (host)

// fwd_out and bwd_dqk hold one chunk's q/k tiles plus a slab of C_k (hi + lo when split) in
// shared memory; a wider slab recomputes the chunk's Q̂Kᵀ / dH Vᵀ fewer times but can halve the
// blocks per SM. At L 128 both slabs give one 256-thread block per SM, so 128 wins; at L 64 with
// split states the 128 slab needs 126 KB (fwd_out) / 166 KB (bwd_dqk), one 128-thread block per
// SM (4 warps), while the 64 slab fits two (83 / 94 KB). That was the model path's slowdown
// Auto: 128 unless it leaves fewer than 8 warps per SM and 64 keeps more. Measured (H200,
// bench/RESULTS.md helper mlstm5): at L 64 with split states the 64 slab is 1-5% faster
// (xlstm-125m cell: fwd_out 1.030 vs 1.041 ms, bwd_dqk 1.281 vs 1.345); at L 128 the 64 slab
// loses even with twice the warps (bf16 states, 7B heads: fwd_out 0.60 vs 0.43-0.56 ms) or the
// same (split, 125m cell: 1.31 vs 0.83 ms). (The xLSTM presets run chunk 64; the model path's
// cell was slow at chunk 64 for another reason: the state kernels' stores, see StateSmem.)
constexpr size_t kSmemPerSm = 228 * 1024;  // sm_90; 1 KB of it reserved per block
int WarpsPerSm(size_t smem_bytes, int threads) {
  const int by_smem = static_cast<int>(kSmemPerSm / (smem_bytes + 1024));
  const int by_threads = 2048 / threads;
  return std::min(by_smem, by_threads) * threads / 32;
}
template <int L>
size_t OutBytes(int slab, bool split, int dk) {
  if (slab == 128) return split ? OutSmem<L, 128, true>::Bytes(dk) : OutSmem<L, 128, false>::Bytes(dk);
  return split ? OutSmem<L, 64, true>::Bytes(dk) : OutSmem<L, 64, false>::Bytes(dk);
}
template <int L>
size_t DqkBytes(int slab, bool split) {
  if (slab == 128) return split ? DqkSmem<L, 128, true>::kBytes : DqkSmem<L, 128, false>::kBytes;
  return split ? DqkSmem<L, 64, true>::kBytes : DqkSmem<L, 64, false>::kBytes;
}
size_t OutBytesL(int L, int slab, bool split, int dk) {
  switch (L) {
    case 16: return OutBytes<16>(slab, split, dk);
    case 32: return OutBytes<32>(slab, split, dk);
    case 64: return OutBytes<64>(slab, split, dk);
    default: return OutBytes<128>(slab, split, dk);
  }
}
size_t DqkBytesL(int L, int slab, bool split) {
  switch (L) {
    case 16: return DqkBytes<16>(slab, split);
    case 32: return DqkBytes<32>(slab, split);
    case 64: return DqkBytes<64>(slab, split);
    default: return DqkBytes<128>(slab, split);
  }
}
int OutSlab(const MlstmShape& s, const MlstmOptions& o) {
  if (s.dv % 128 != 0) return 64;
  if (o.chunk_size == 256) return 128;  // the only slab at chunk 256 (MlstmCheck)
  if (o.io_slab == 64 || o.io_slab == 128) return static_cast<int>(o.io_slab);
  const int L = static_cast<int>(o.chunk_size), threads = 2 * L;
  const bool split = UseSplit(o);
  const int dk = static_cast<int>(s.dk);
  const int w128 = WarpsPerSm(OutBytesL(L, 128, split, dk), threads);
  return w128 >= 8 || w128 >= WarpsPerSm(OutBytesL(L, 64, split, dk), threads) ? 128 : 64;
}
int DqkSlab(const MlstmShape& s, const MlstmOptions& o) {
  if (s.dk % 128 != 0) return 64;
  if (o.chunk_size == 256) return 128;
  if (o.io_slab == 64 || o.io_slab == 128) return static_cast<int>(o.io_slab);
  const int L = static_cast<int>(o.chunk_size), threads = 2 * L;
  const bool split = UseSplit(o);
  const int w128 = WarpsPerSm(DqkBytesL(L, 128, split), threads);
  return w128 >= 8 || w128 >= WarpsPerSm(DqkBytesL(L, 64, split), threads) ? 128 : 64;
}

// Cluster size of gates_fwd / gates_bwd (MlstmGateSchedule): the largest power of two <= 16 that keeps
// B·NH·CL within two CTAs per SM; 0 (one block per head) for kChunkParallel / kSequential and,
// under kAuto, when B·NH > #SMs / 2 (then the heads alone fill the GPU).
// The current device's SM count, queried once per device ordinal (0 when the query fails) instead
// of on every launch by the launchers that size grids with it (GateCluster, StateTailPlan). (The
// session-16 suspicion that the query cost ~16 µs of host time between the gate scan and the state
// kernel was wrong: mlstm_bench's gates_fwd split moves between 0.013 and 0.031 ms in both
// settings with the cache too; bench/RESULTS.md, session 16 lead call 3.)
int CurrentDeviceSms() {
  static std::array<std::atomic<int>, 64> cached{};
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  const bool cacheable = device >= 0 && device < static_cast<int>(cached.size());
  if (cacheable && (sms = cached[device].load(std::memory_order_relaxed)) > 0) return sms;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0) {
    (void)cudaGetLastError();
    return 0;
  }
  if (cacheable) cached[device].store(sms, std::memory_order_relaxed);
  return sms;
}

int GateCluster(const MlstmShape& s, const MlstmOptions& o) {
  if (o.gate_schedule != MlstmGateSchedule::kAuto && o.gate_schedule != MlstmGateSchedule::kCluster) {
    return 0;
  }
  int sms = CurrentDeviceSms();
  if (sms == 0) sms = 132;
  const int64_t bh = s.batch * s.num_heads;
  if (o.gate_schedule == MlstmGateSchedule::kAuto && 2 * bh > sms) return 0;
  int cl = kGateClMax;
  while (cl > 2 && bh * cl > 2 * sms) cl /= 2;
  return cl;
}

// MlstmBwdDvKernel resolved: the fused warpgroup-MMA kernel or the mma.sync one (also wherever
// the wgmma kernel does not apply: chunk != 128 or 64-column dv slabs). GYRE_MLSTM_BWD_DV is read
// once per process (the kAuto choice); an unknown value is an error.
struct BwdDvChoice {
  bool fused = false;             // mlstm_bwd_dv_wg_fused (one block per head-chunk)
  const char* bad_env = nullptr;  // the unknown GYRE_MLSTM_BWD_DV value
  // GYRE_MLSTM_STATE_BWD: only "ws" (mlstm_state_bwd_ws) is left; "wg" (deleted) and any other
  // value make the backward return an error naming the value.
  const char* bad_state_env = nullptr;
  // GYRE_MLSTM_BWD_DQK: only "ws" (mlstm_bwd_dqk_ws) is left; "fused" (deleted) and any other
  // value make the backward return an error naming the value.
  const char* bad_dqk_env = nullptr;
  // MlstmRingRelease resolved (RingRelease): bwd_dqk as mlstm_bwd_dqk_ws_eager; a bad
  // GYRE_MLSTM_RING value.
  bool ring_eager = false;
  const char* bad_ring_env = nullptr;
  // DqkPersistBlocks: > 0 runs chunk 128's bwd_dqk as mlstm_bwd_dqk_ws_persist on that many blocks.
  int dqk_persist_blocks = 0;
};
BwdDvChoice BwdDvKernel(const MlstmShape& s, const MlstmOptions& o) {
  static const BwdDvChoice from_env = [] {
    BwdDvChoice c;
    const char* e = std::getenv("GYRE_MLSTM_BWD_DV");
    if (e == nullptr || std::strcmp(e, "wgf") == 0) {  // the default (measured: session 8,
      c.fused = true;                                   // 0.542 -> 0.335 ms)
    } else if (std::strcmp(e, "mma") != 0) {
      c.bad_env = e;
    }
    const char* st = std::getenv("GYRE_MLSTM_STATE_BWD");
    if (st != nullptr && std::strcmp(st, "ws") != 0) c.bad_state_env = st;
    const char* dq = std::getenv("GYRE_MLSTM_BWD_DQK");
    if (dq != nullptr && std::strcmp(dq, "ws") != 0) c.bad_dqk_env = dq;
    return c;
  }();
  BwdDvChoice c;
  c.bad_state_env = from_env.bad_state_env;
  c.bad_dqk_env = from_env.bad_dqk_env;
  switch (o.bwd_dv) {
    case MlstmBwdDvKernel::kAuto:
      c.fused = from_env.fused;
      c.bad_env = from_env.bad_env;
      break;
    case MlstmBwdDvKernel::kMmaSync: break;
    case MlstmBwdDvKernel::kWgmmaFused: c.fused = true; break;
  }
  // (a bad env value stays)
  if ((o.chunk_size != 128 && o.chunk_size != 256) || DvSlab(s.dv) != 128) c.fused = false;
  return c;
}

// GYRE_MLSTM_FWD_OUT and GYRE_MLSTM_STATE_FWD, read once per process: each names the one kernel
// left ("ws3": mlstm_fwd_out_ws3; "ws": mlstm_state_fwd_ws). The deleted "ws" / "wg" (and any
// other value) make the forward return an error naming the value.
struct FwdEnvCheck {
  const char* bad_env = nullptr;        // the unknown GYRE_MLSTM_FWD_OUT value
  const char* bad_state_env = nullptr;  // the unknown GYRE_MLSTM_STATE_FWD value
};
FwdEnvCheck FwdEnv() {
  static const FwdEnvCheck from_env = [] {
    FwdEnvCheck c;
    const char* e = std::getenv("GYRE_MLSTM_FWD_OUT");
    if (e != nullptr && std::strcmp(e, "ws3") != 0) c.bad_env = e;
    const char* st = std::getenv("GYRE_MLSTM_STATE_FWD");
    if (st != nullptr && std::strcmp(st, "ws") != 0) c.bad_state_env = st;
    return c;
  }();
  return from_env;
}

// MlstmOptions::state_tail resolved (kAuto: GYRE_MLSTM_STATE_TAIL, read once per process: unset or
// "split" = mlstm_state_fwd_ws_tail / mlstm_state_bwd_ws_tail (the default since session 16; the
// same bytes), "full" = the one-block-per-tile state kernels; any other value is an error naming
// the accepted ones). `who` names the
// entry point in the message.
CudaResult StateTailSplit(const MlstmOptions& o, const char* who, bool* split) {
  static const char* const env = std::getenv("GYRE_MLSTM_STATE_TAIL");
  *split = false;
  switch (o.state_tail) {
    case MlstmStateTail::kFull: return {};
    case MlstmStateTail::kSplit: *split = true; return {};
    case MlstmStateTail::kAuto: break;
  }
  if (env != nullptr && std::strcmp(env, "full") == 0) return {};
  if (env == nullptr || std::strcmp(env, "split") == 0) {
    *split = true;
    return {};
  }
  return InvalidArgument(std::string(who) + ": GYRE_MLSTM_STATE_TAIL must be full or split (or unset), got '" +
                         env + "'");
}

// The split grid of the state kernels (see mlstm_state_fwd_ws_tail): the tiles of the last wave,
// tiles % #SMs, run as two 64-column halves each where there is a partial wave and its halves fit
// into one wave; elsewhere (blocks 0) the full kernels run, with the same bytes.
struct StateTailGrid {
  int nfull = 0;   // full blocks, then 2·(tiles − nfull) half blocks
  int blocks = 0;  // 0: not split
};
StateTailGrid StateTailPlan(const Dims& d) {
  const int sms = CurrentDeviceSms();
  if (sms == 0) return {};
  const int64_t tiles = static_cast<int64_t>(d.DV / 128) * (d.DK / 128) * d.B * d.NH;
  const int64_t tail = tiles % sms;
  if (tail == 0 || 2 * tail > sms) return {};
  StateTailGrid g;
  g.nfull = static_cast<int>(tiles - tail);
  g.blocks = static_cast<int>(tiles + tail);
  return g;
}

// MlstmRingRelease resolved; GYRE_MLSTM_RING is read once per process (helper dqk16, session 16;
// the default since its merge): unset or "eager" runs mlstm_fwd_out_ws3_eager /
// mlstm_bwd_dqk_ws_eager (stages released as soon as their wgmma group retired; bitwise the same
// outputs) at chunk 128; "lag" the kernels before (mlstm_fwd_out_ws3 / mlstm_bwd_dqk_ws); any
// other value makes forward and backward return an error naming it.
struct RingEnv {
  bool eager = false;
  const char* bad_env = nullptr;
};
RingEnv RingRelease(const MlstmOptions& o) {
  static const RingEnv from_env = [] {
    RingEnv r;
    const char* e = std::getenv("GYRE_MLSTM_RING");
    r.eager = e == nullptr || std::strcmp(e, "lag") != 0;
    if (e != nullptr && std::strcmp(e, "eager") != 0 && std::strcmp(e, "lag") != 0) r.bad_env = e;
    return r;
  }();
  switch (o.ring) {
    case MlstmRingRelease::kAuto: return from_env;
    case MlstmRingRelease::kLag: return {false, from_env.bad_env};
    case MlstmRingRelease::kEager: return {true, from_env.bad_env};
  }
  return from_env;
}

// MlstmOptions::persist resolved for the forward: the persistent fwd_out's grid (one block per SM,
// or persist_blocks, never more than the tiles), 0 where it does not run (off, or not the
// chunk-128 128-column-slab kernel: LaunchForward decides that by d.wg_out). With the automatic
// grid, tiles that fit into one wave run one block per tile: there is no next tile to load ahead
// (B1 S1024, 96 tiles: 0.021 ms against the persistent kernel's 0.022).
int PersistBlocks(const Dims& d, const MlstmOptions& o) {
  if (o.persist != MlstmPersist::kFwdOut && o.persist != MlstmPersist::kBoth) return 0;
  // (its two vector buffers make it 6.2 KB larger than the default at dk 384: past dk ~4000 only
  // the default fits into an SM's 227 KB)
  if (OutWs3PersistSmem<true>::Bytes(d.DK) > 227 * 1024) return 0;
  const int64_t tiles = static_cast<int64_t>(d.DV / 128) * d.NC * d.B * d.NH;
  int64_t blocks = o.persist_blocks;
  if (blocks <= 0) {
    const int sms = CurrentDeviceSms();
    blocks = sms > 0 ? sms : 132;
    if (tiles <= blocks) return 0;
  }
  return static_cast<int>(std::max<int64_t>(1, std::min(blocks, tiles)));
}

// MlstmOptions::persist resolved for the backward: the persistent bwd_dqk's grid, as PersistBlocks
// (0 = one block per tile: off / fwd_out, tiles within one wave under the automatic grid, or its
// shared memory past an SM's: dn_parts above ~27).
int DqkPersistBlocks(const Dims& d, const MlstmOptions& o) {
  if (o.persist != MlstmPersist::kDqk && o.persist != MlstmPersist::kBoth) return 0;
  if (DqkPersistSmem::Bytes(d.dn_parts) > 227 * 1024) return 0;
  const int64_t tiles = static_cast<int64_t>(d.DK / 128) * d.NC * d.B * d.NH;
  int64_t blocks = o.persist_blocks;
  if (blocks <= 0) {
    const int sms = CurrentDeviceSms();
    blocks = sms > 0 ? sms : 132;
    if (tiles <= blocks) return 0;
  }
  return static_cast<int>(std::max<int64_t>(1, std::min(blocks, tiles)));
}

// The next of the persistent kernels' tile counters, zeroed on `stream`.
CudaResult TakePersistCounter(cudaStream_t stream, unsigned** counter) {
  static std::atomic<unsigned> next_counter{0};
  void* counters = nullptr;
  CUDA_RETURN_IF_ERROR(cudaGetSymbolAddress(&counters, g_persist_tiles));
  *counter = static_cast<unsigned*>(counters) + next_counter.fetch_add(1, std::memory_order_relaxed) % kPersistCounters;
  CUDA_RETURN_IF_ERROR(cudaMemsetAsync(*counter, 0, sizeof(unsigned), stream));
  return {};
}

// ---------------------------------------------------------------- host helpers

MlstmLaunchHook g_launch_hook = nullptr;
void Hook(const char* name, cudaStream_t stream) {
  if (g_launch_hook != nullptr) g_launch_hook(name, stream);
}

Dims MakeDims(const MlstmShape& s, const MlstmOptions& o) {
  Dims d;
  d.B = static_cast<int>(s.batch);
  d.S = static_cast<int>(s.seq_len);
  d.NH = static_cast<int>(s.num_heads);
  d.DK = static_cast<int>(s.dk);
  d.DV = static_cast<int>(s.dv);
  d.L = static_cast<int>(o.chunk_size);
  d.NC = static_cast<int>((s.seq_len + o.chunk_size - 1) / o.chunk_size);
  d.scale = static_cast<float>(o.qk_scale > 0 ? o.qk_scale : 1.0 / std::sqrt(static_cast<double>(s.dk)));
  d.eps = static_cast<float>(o.eps);
  d.sigmoid = o.forget_gate == MlstmForgetGate::kSigmoid;
  d.stop_grad = o.stop_normaliser_gradient;
  d.split = UseSplit(o);
  // MlstmStateWeights (mlstm.h says why kAuto keeps hi + lo in both state kernels).
  const MlstmStateWeights wt = o.state_weights != MlstmStateWeights::kAuto
                                   ? o.state_weights
                                   : MlstmStateWeights::kSplitBf16;
  d.fwd_wlo = d.split && wt != MlstmStateWeights::kBf16;
  d.bwd_wlo = d.split && wt == MlstmStateWeights::kSplitBf16;
  d.par_gates = o.gate_schedule != MlstmGateSchedule::kSequential;
  d.gate_cluster = 0;  // set by the chunkwise launchers (GateCluster)
  d.state_tile = StateTile(s, o);
  d.dn_parts = static_cast<int>(s.dv / d.state_tile);
  d.out_slab = OutSlab(s, o);
  d.dqk_slab = DqkSlab(s, o);
  d.wg_dqk = d.L == 128 && d.dqk_slab == 128 && d.DV % 64 == 0;
  d.wg_out = d.L == 128 && d.out_slab == 128 && d.DK % 64 == 0;
  d.wg_state = d.L == 128 && d.state_tile == 128;
  return d;
}

template <typename Kernel>
CudaResult SetSmem(Kernel kernel, size_t bytes) {
  CUDA_RETURN_IF_ERROR(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
  return {};
}

// Clusters of more than 8 CTAs are non-portable: allowed explicitly, and 8 where the device
// cannot place one (cudaOccupancyMaxActiveClusters).
template <typename Kernel>
CudaResult FitCluster(Kernel kernel, cudaLaunchConfig_t* cfg, cudaLaunchAttribute* attr) {
  if (attr[0].val.clusterDim.x <= 8) return {};
  CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  int max_clusters = 0;
  if (cudaOccupancyMaxActiveClusters(&max_clusters, kernel, cfg) != cudaSuccess || max_clusters < 1) {
    (void)cudaGetLastError();  // 8 is portable
    attr[0].val.clusterDim.x = 8;
    cfg->gridDim.x = 8;
  }
  return {};
}

// The gate scans' cluster launch (gates_fwd / gates_bwd with d.gate_cluster > 1): a cluster of
// d.gate_cluster CTAs of `threads` per head, grid (cluster, B·NH); attr[0] holds the cluster size
// (FitCluster may lower it).
void GateClusterLaunch(const Dims& d, int threads, cudaStream_t stream, cudaLaunchConfig_t* cfg,
                       cudaLaunchAttribute* attr) {
  *cfg = {};
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(d.gate_cluster);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg->gridDim = dim3(static_cast<unsigned>(d.gate_cluster), static_cast<unsigned>(d.B * d.NH));
  cfg->blockDim = dim3(threads);
  cfg->stream = stream;
  cfg->attrs = attr;
  cfg->numAttrs = 1;
}

// A bf16 map with 64-column × `box_rows` boxes in the 128-byte swizzle (zeros outside `dims`):
// rank 4 = (columns, heads, tokens, batch) of a [B][S][NH][cols] tensor, rank 2 = (columns, rows).
CudaResult EncodeSwizzledMap(CUtensorMap* map, const bf16* base, int rank, const cuuint64_t* dims,
                             const cuuint64_t* strides_bytes, int box_rows) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = TensorMapEncoder();
  if (encode == nullptr) return {1, "cuTensorMapEncodeTiled: not found in the driver"};
  const cuuint32_t box4[4] = {64, 1, static_cast<cuuint32_t>(box_rows), 1};
  const cuuint32_t box2[2] = {64, static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t elem_strides[4] = {1, 1, 1, 1};
  const CUresult r = encode(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, rank, const_cast<bf16*>(base),
                            dims, strides_bytes, rank == 4 ? box4 : box2, elem_strides,
                            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    return {static_cast<int>(r),
            "mlstm bwd_dqk: cuTensorMapEncodeTiled failed (error " + std::to_string(r) + ")"};
  }
  return {};
}

// A [B][S][NH][cols] bf16 tensor (q, k, v, dh) as rank-4 rows, 128-row boxes.
CudaResult EncodeTokenRows(const Dims& d, CUtensorMap* map, const bf16* base, int cols) {
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(d.NH),
                              static_cast<cuuint64_t>(d.S), static_cast<cuuint64_t>(d.B)};
  const cuuint64_t strides[3] = {static_cast<cuuint64_t>(cols) * 2, static_cast<cuuint64_t>(d.NH) * cols * 2,
                                 static_cast<cuuint64_t>(d.S) * d.NH * cols * 2};
  return EncodeSwizzledMap(map, base, 4, dims, strides, 128);
}

// `rows` state rows of dv bf16 columns (C_k, dC_k hi / lo) as a rank-2 map with `box_rows` boxes.
CudaResult EncodeStateRows(const Dims& d, CUtensorMap* map, const bf16* base, int64_t rows, int box_rows) {
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(d.DV), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(d.DV) * 2};
  return EncodeSwizzledMap(map, base, 2, dims, strides, box_rows);
}

// The eight maps of mlstm_bwd_dqk_ws (lo maps alias the hi ones when the states are single bf16).
CudaResult EncodeDqkMaps(const Dims& d, const BwdPtrs& p, DqkTmaMaps* m) {
  const int64_t bh = static_cast<int64_t>(d.B) * d.NH;
  CUDA_RETURN_IF_NOT_OK(EncodeTokenRows(d, &m->q, p.q, d.DK));
  CUDA_RETURN_IF_NOT_OK(EncodeTokenRows(d, &m->k, p.k, d.DK));
  CUDA_RETURN_IF_NOT_OK(EncodeTokenRows(d, &m->v, p.v, d.DV));
  CUDA_RETURN_IF_NOT_OK(EncodeTokenRows(d, &m->dh, p.dh, d.DV));
  CUDA_RETURN_IF_NOT_OK(EncodeStateRows(d, &m->c, p.sc, bh * (d.NC + 1) * d.DK, 128));
  CUDA_RETURN_IF_NOT_OK(EncodeStateRows(d, &m->c_lo, d.split ? p.sc_lo : p.sc, bh * (d.NC + 1) * d.DK, 128));
  CUDA_RETURN_IF_NOT_OK(EncodeStateRows(d, &m->dc, p.dc, bh * d.NC * d.DK, 128));
  CUDA_RETURN_IF_NOT_OK(EncodeStateRows(d, &m->dc_lo, d.split ? p.dc_lo : p.dc, bh * d.NC * d.DK, 128));
  return {};
}

// The five maps of mlstm_fwd_out_ws3 (c_lo aliases c when the states are single bf16).
CudaResult EncodeOutMaps(const Dims& d, const FwdPtrs& p, OutWsMaps* m) {
  const int64_t rows = static_cast<int64_t>(d.B) * d.NH * (d.NC + 1) * d.DK;
  CUDA_RETURN_IF_NOT_OK(EncodeTokenRows(d, &m->q, p.q, d.DK));
  CUDA_RETURN_IF_NOT_OK(EncodeTokenRows(d, &m->k, p.k, d.DK));
  CUDA_RETURN_IF_NOT_OK(EncodeTokenRows(d, &m->v, p.v, d.DV));
  CUDA_RETURN_IF_NOT_OK(EncodeStateRows(d, &m->c, p.sc, rows, 64));
  CUDA_RETURN_IF_NOT_OK(EncodeStateRows(d, &m->c_lo, d.split ? p.sc_lo : p.sc, rows, 64));
  return {};
}

// The four maps of mlstm_state_fwd_ws (c_lo aliases c when the states are single bf16; it is
// then not stored).
CudaResult EncodeStateFwdMaps(const Dims& d, const FwdPtrs& p, StateWsMaps* m) {
  const int64_t rows = static_cast<int64_t>(d.B) * d.NH * (d.NC + 1) * d.DK;
  CUDA_RETURN_IF_NOT_OK(EncodeTokenRows(d, &m->k, p.k, d.DK));
  CUDA_RETURN_IF_NOT_OK(EncodeTokenRows(d, &m->v, p.v, d.DV));
  CUDA_RETURN_IF_NOT_OK(EncodeStateRows(d, &m->c, p.sc, rows, 16));
  CUDA_RETURN_IF_NOT_OK(EncodeStateRows(d, &m->c_lo, d.split ? p.sc_lo : p.sc, rows, 16));
  return {};
}

// The four maps of mlstm_state_bwd_ws: q and dh in StateWsMaps::k / v, dC_{k+1} (scratch,
// [BH][NC][dk] rows) hi / lo in c / c_lo (c_lo aliases c when the states are single bf16).
CudaResult EncodeStateBwdMaps(const Dims& d, const BwdPtrs& p, StateWsMaps* m) {
  const int64_t rows = static_cast<int64_t>(d.B) * d.NH * d.NC * d.DK;
  CUDA_RETURN_IF_NOT_OK(EncodeTokenRows(d, &m->k, p.q, d.DK));
  CUDA_RETURN_IF_NOT_OK(EncodeTokenRows(d, &m->v, p.dh, d.DV));
  CUDA_RETURN_IF_NOT_OK(EncodeStateRows(d, &m->c, p.dc, rows, 16));
  CUDA_RETURN_IF_NOT_OK(EncodeStateRows(d, &m->c_lo, d.split ? p.dc_lo : p.dc, rows, 16));
  return {};
}

// `with_out` false: the gate scan and state_fwd only (MlstmChunkwiseRecomputeStates), the same
// launches with the same arguments as the full forward's first two.
// tail_split: StateTailSplit's choice (chunk 128's TMA state kernel only).
// persist_blocks > 0: chunk 128's fwd_out as mlstm_fwd_out_ws3_persist on that many blocks.
template <int L>
CudaResult LaunchForward(const Dims& d, const FwdPtrs& p, cudaStream_t stream, bool with_out = true,
                         bool tail_split = false, bool ring_eager = false, int persist_blocks = 0) {
  const int bh = d.B * d.NH;
  if (d.gate_cluster > 1 && d.NC <= kGateFwdClMaxChunks) {
    cudaLaunchConfig_t cfg;
    cudaLaunchAttribute attr[1];
    GateClusterLaunch(d, 32 * kGateFwdClWarps, stream, &cfg, attr);
    CUDA_RETURN_IF_NOT_OK(FitCluster(mlstm_gates_fwd_cluster, &cfg, attr));
    CUDA_RETURN_IF_ERROR(cudaLaunchKernelEx(&cfg, mlstm_gates_fwd_cluster, d, p));
  } else if (d.par_gates) {
    const int warps = std::min(d.NC, kGateFwdWarps);
    mlstm_gates_fwd_par<<<bh, 32 * warps, 0, stream>>>(d, p);
  } else {
    mlstm_gates_fwd<<<bh, 32, 0, stream>>>(d, p);
  }
  CUDA_RETURN_IF_LAUNCH_ERROR("mlstm_gates_fwd");
  Hook("mlstm_gates_fwd", stream);
  {
    auto state = [&](auto tile_tag) -> CudaResult {
      constexpr int kT = decltype(tile_tag)::value;
      const size_t smem = StateSmem<L, kT, kT>::kBytes;
      if constexpr (L == 128 && kT == 128) {
        if (d.wg_state) {
          const size_t ws_smem = StateWsSmem::kBytes;
          StateWsMaps maps{};
          CUDA_RETURN_IF_NOT_OK(EncodeStateFwdMaps(d, p, &maps));
          const StateTailGrid tg = tail_split ? StateTailPlan(d) : StateTailGrid{};
          if (tg.blocks > 0) {
            CUDA_RETURN_IF_NOT_OK(SetSmem(mlstm_state_fwd_ws_tail, ws_smem));
            mlstm_state_fwd_ws_tail<<<tg.blocks, 384, ws_smem, stream>>>(d, p, maps, tg.nfull);
            CUDA_RETURN_IF_LAUNCH_ERROR("mlstm_state_fwd_tail");
            Hook("mlstm_state_fwd_tail", stream);  // (its own name: the test checks it ran)
            return {};
          }
          CUDA_RETURN_IF_NOT_OK(SetSmem(mlstm_state_fwd_ws, ws_smem));
          mlstm_state_fwd_ws<<<dim3(d.DV / kT, d.DK / kT, bh), 384, ws_smem, stream>>>(d, p, maps);
          CUDA_RETURN_IF_LAUNCH_ERROR("mlstm_state_fwd");
          Hook("mlstm_state_fwd", stream);
          return {};
        }
      }
      CUDA_RETURN_IF_NOT_OK(SetSmem(mlstm_state_fwd<L, kT, kT>, smem));
      mlstm_state_fwd<L, kT, kT><<<dim3(d.DV / kT, d.DK / kT, bh), 2 * kT, smem, stream>>>(d, p);
      CUDA_RETURN_IF_LAUNCH_ERROR("mlstm_state_fwd");
      Hook("mlstm_state_fwd", stream);
      return {};
    };
    CUDA_RETURN_IF_NOT_OK(d.state_tile == 128 ? state(std::integral_constant<int, 128>{})
                                              : state(std::integral_constant<int, 64>{}));
  }
  if (!with_out) return {};
  auto out = [&](auto dvt_tag, auto split_tag) -> CudaResult {
    constexpr int DVT = decltype(dvt_tag)::value;
    constexpr bool SPLIT = decltype(split_tag)::value;
    const size_t smem = OutSmem<L, DVT, SPLIT>::Bytes(d.DK);
    CUDA_RETURN_IF_NOT_OK(SetSmem(mlstm_fwd_out<L, DVT, SPLIT>, smem));
    mlstm_fwd_out<L, DVT, SPLIT><<<dim3(d.DV / DVT, d.NC, bh), 2 * L, smem, stream>>>(d, p);
    CUDA_RETURN_IF_LAUNCH_ERROR("mlstm_fwd_out");
    Hook("mlstm_fwd_out", stream);
    return {};
  };
  using T = std::true_type;
  using F = std::false_type;
  if constexpr (L == 128) {
    if (d.wg_out) {
      auto out_ws3_launch = [&](auto split_tag) -> CudaResult {
        constexpr bool SPLIT = decltype(split_tag)::value;
        const size_t smem = OutWs3Smem<SPLIT>::Bytes(d.DK);
        OutWsMaps maps{};
        CUDA_RETURN_IF_NOT_OK(EncodeOutMaps(d, p, &maps));
        if (persist_blocks > 0) {
          const size_t psmem = OutWs3PersistSmem<SPLIT>::Bytes(d.DK);
          CUDA_RETURN_IF_NOT_OK(SetSmem(mlstm_fwd_out_ws3_persist<SPLIT>, psmem));
          unsigned* counter = nullptr;
          CUDA_RETURN_IF_NOT_OK(TakePersistCounter(stream, &counter));
          mlstm_fwd_out_ws3_persist<SPLIT><<<persist_blocks, 384, psmem, stream>>>(d, p, maps, counter);
        } else if (ring_eager) {
          CUDA_RETURN_IF_NOT_OK(SetSmem(mlstm_fwd_out_ws3_eager<SPLIT>, smem));
          mlstm_fwd_out_ws3_eager<SPLIT><<<dim3(d.DV / 128, d.NC, bh), 384, smem, stream>>>(d, p, maps);
        } else {
          CUDA_RETURN_IF_NOT_OK(SetSmem(mlstm_fwd_out_ws3<SPLIT>, smem));
          mlstm_fwd_out_ws3<SPLIT><<<dim3(d.DV / 128, d.NC, bh), 384, smem, stream>>>(d, p, maps);
        }
        CUDA_RETURN_IF_LAUNCH_ERROR("mlstm_fwd_out");
        Hook("mlstm_fwd_out", stream);
        return {};
      };
      return d.split ? out_ws3_launch(T{}) : out_ws3_launch(F{});
    }
  }
  if (d.out_slab == 128) {
    return d.split ? out(std::integral_constant<int, 128>{}, T{})
                   : out(std::integral_constant<int, 128>{}, F{});
  }
  if constexpr (L == 64) {  // wide slabs (UseWideSlabs): 96 columns
    if (UseWideSlabs(d.DV)) {
      return d.split ? out(std::integral_constant<int, 96>{}, T{}) : out(std::integral_constant<int, 96>{}, F{});
    }
  }
  return d.split ? out(std::integral_constant<int, 64>{}, T{})
                 : out(std::integral_constant<int, 64>{}, F{});
}

CudaResult LaunchGatesBwd(const Dims& d, const BwdPtrs& p, cudaStream_t stream) {
  const int bh = d.B * d.NH;
  if (d.gate_cluster > 1) {
    cudaLaunchConfig_t cfg;
    cudaLaunchAttribute attr[1];
    GateClusterLaunch(d, kGateClThreads, stream, &cfg, attr);
    CUDA_RETURN_IF_NOT_OK(FitCluster(mlstm_gates_bwd_cluster, &cfg, attr));
    CUDA_RETURN_IF_ERROR(cudaLaunchKernelEx(&cfg, mlstm_gates_bwd_cluster, d, p));
  } else if (d.par_gates) {
    mlstm_gates_bwd_par<<<bh, kGateParThreads, 0, stream>>>(d, p);
  } else {
    mlstm_gates_bwd<<<bh, kGateThreads, 0, stream>>>(d, p);
  }
  CUDA_RETURN_IF_LAUNCH_ERROR("mlstm_gates_bwd");
  Hook("mlstm_gates_bwd", stream);
  return {};
}

// GYRE_MLSTM_BWD_PREP (session 21, helper dqk64; opt-in): "early" runs the warp-per-token step 4
// as mlstm_bwd_prep_early (the per-token scalars read before the rows; mlstm_bwd.cuh says why).
// Read at every backward (one getenv, so recurrent_step_bench --variants can alternate it): unset
// or "default" = mlstm_bwd_prep; any other value is an error naming it (BwdPrepCheck).
enum class BwdPrepSetting { kDefault, kEarly, kBad };
BwdPrepSetting BwdPrepEnv() {
  const char* e = std::getenv("GYRE_MLSTM_BWD_PREP");
  if (e == nullptr || std::strcmp(e, "default") == 0) return BwdPrepSetting::kDefault;
  return std::strcmp(e, "early") == 0 ? BwdPrepSetting::kEarly : BwdPrepSetting::kBad;
}
CudaResult BwdPrepCheck(const char* who) {
  if (BwdPrepEnv() != BwdPrepSetting::kBad) return {};
  return InvalidArgument(std::string(who) + ": GYRE_MLSTM_BWD_PREP must be default or early (or unset), got '" +
                         std::getenv("GYRE_MLSTM_BWD_PREP") + "'");
}

// Step 4: the warp-per-token kernel that forms dh·(h + h_lo) itself, or with `dots` (not null;
// MlstmChunkwiseBackwardWithDots) the thread-per-token one that reads them.
CudaResult LaunchBwdPrep(const Dims& d, const BwdPtrs& p, const float* dots, cudaStream_t stream) {
  const int64_t tokens = static_cast<int64_t>(d.B) * d.S * d.NH;
  if (dots != nullptr) {
    mlstm_bwd_prep_dots<<<static_cast<unsigned>((tokens + 255) / 256), 256, 0, stream>>>(d, p, dots);
  } else if (BwdPrepEnv() == BwdPrepSetting::kEarly) {
    mlstm_bwd_prep_early<<<static_cast<unsigned>((tokens + 7) / 8), 256, 0, stream>>>(d, p);
  } else {
    mlstm_bwd_prep<<<static_cast<unsigned>((tokens + 7) / 8), 256, 0, stream>>>(d, p);
  }
  CUDA_RETURN_IF_LAUNCH_ERROR("mlstm_bwd_prep");
  Hook("mlstm_bwd_prep", stream);
  return {};
}

// dv_choice: BwdDvKernel's choice (fused = the warpgroup-MMA bwd_dv, else mma.sync); dots: see
// LaunchBwdPrep. tail_split: StateTailSplit's choice (chunk 128's TMA state kernel only).
template <int L>
CudaResult LaunchBackward(const Dims& d, const BwdPtrs& p, const BwdDvChoice& dv_choice, const float* dots,
                          cudaStream_t stream, bool tail_split = false) {
  const int bh = d.B * d.NH;
  CUDA_RETURN_IF_NOT_OK(LaunchBwdPrep(d, p, dots, stream));
  {
    auto state = [&](auto tile_tag) -> CudaResult {
      constexpr int kT = decltype(tile_tag)::value;
      const size_t smem = StateSmem<L, kT, kT>::kBytes;
      if constexpr (L == 128 && kT == 128) {
        if (d.wg_state) {
          const size_t ws_smem = StateWsSmem::kBytes;
          StateWsMaps maps{};
          CUDA_RETURN_IF_NOT_OK(EncodeStateBwdMaps(d, p, &maps));
          const StateTailGrid tg = tail_split ? StateTailPlan(d) : StateTailGrid{};
          if (tg.blocks > 0) {
            CUDA_RETURN_IF_NOT_OK(SetSmem(mlstm_state_bwd_ws_tail, ws_smem));
            mlstm_state_bwd_ws_tail<<<tg.blocks, 384, ws_smem, stream>>>(d, p, maps, tg.nfull);
            CUDA_RETURN_IF_LAUNCH_ERROR("mlstm_state_bwd_tail");
            Hook("mlstm_state_bwd_tail", stream);  // (its own name: the test checks it ran)
            return {};
          }
          CUDA_RETURN_IF_NOT_OK(SetSmem(mlstm_state_bwd_ws, ws_smem));
          mlstm_state_bwd_ws<<<dim3(d.DV / kT, d.DK / kT, bh), 384, ws_smem, stream>>>(d, p, maps);
          CUDA_RETURN_IF_LAUNCH_ERROR("mlstm_state_bwd");
          Hook("mlstm_state_bwd", stream);
          return {};
        }
      }
      CUDA_RETURN_IF_NOT_OK(SetSmem(mlstm_state_bwd<L, kT, kT>, smem));
      mlstm_state_bwd<L, kT, kT><<<dim3(d.DV / kT, d.DK / kT, bh), 2 * kT, smem, stream>>>(d, p);
      CUDA_RETURN_IF_LAUNCH_ERROR("mlstm_state_bwd");
      Hook("mlstm_state_bwd", stream);
      return {};
    };
    CUDA_RETURN_IF_NOT_OK(d.state_tile == 128 ? state(std::integral_constant<int, 128>{})
                                              : state(std::integral_constant<int, 64>{}));
  }
  auto dv = [&](auto tag) -> CudaResult {
    constexpr int DVT = decltype(tag)::value;
    const size_t smem = DvSmem<L, DVT>::kBytes;
    CUDA_RETURN_IF_NOT_OK(SetSmem(mlstm_bwd_dv<L, DVT>, smem));
    mlstm_bwd_dv<L, DVT><<<dim3(d.DV / DVT, d.NC, bh), 2 * L, smem, stream>>>(d, p);
    CUDA_RETURN_IF_LAUNCH_ERROR("mlstm_bwd_dv");
    Hook("mlstm_bwd_dv", stream);
    return {};
  };
  if (L == 128 && dv_choice.fused) {  // BwdDvKernel checked chunk 128 and 128-column slabs
    constexpr int kStages = 3;
    const size_t smem = DvWgFusedSmem<kStages>::kBytes;
    CUDA_RETURN_IF_NOT_OK(SetSmem(mlstm_bwd_dv_wg_fused<kStages>, smem));
    mlstm_bwd_dv_wg_fused<kStages><<<dim3(1, d.NC, bh), 256, smem, stream>>>(d, p);
    CUDA_RETURN_IF_LAUNCH_ERROR("mlstm_bwd_dv");
    Hook("mlstm_bwd_dv", stream);
  } else if (DvSlab(d.DV) == 128) {
    CUDA_RETURN_IF_NOT_OK(dv(std::integral_constant<int, 128>{}));
  } else {
    const bool wide = L == 64 && UseWideSlabs(d.DV);  // 192 columns
    if constexpr (L == 64) {
      if (wide) CUDA_RETURN_IF_NOT_OK(dv(std::integral_constant<int, 192>{}));
    }
    if (!wide) CUDA_RETURN_IF_NOT_OK(dv(std::integral_constant<int, 64>{}));
  }
  auto dqk = [&](auto tag, auto split_tag) -> CudaResult {
    constexpr int DKT = decltype(tag)::value;
    constexpr bool SPLIT = decltype(split_tag)::value;
    const size_t smem = DqkSmem<L, DKT, SPLIT>::kBytes;
    CUDA_RETURN_IF_NOT_OK(SetSmem(mlstm_bwd_dqk<L, DKT, SPLIT>, smem));
    mlstm_bwd_dqk<L, DKT, SPLIT><<<dim3(d.DK / DKT, d.NC, bh), 2 * L, smem, stream>>>(d, p);
    CUDA_RETURN_IF_LAUNCH_ERROR("mlstm_bwd_dqk");
    Hook("mlstm_bwd_dqk", stream);
    return {};
  };
  using T = std::true_type;
  using F = std::false_type;
  if constexpr (L == 128) {
    if (d.wg_dqk) {
      auto dqk_ws = [&](auto split_tag) -> CudaResult {
        constexpr bool SPLIT = decltype(split_tag)::value;
        const size_t smem = DqkWgSmem<SPLIT>::kBytes + DqkWsBars::kBytes;
        DqkTmaMaps maps{};
        CUDA_RETURN_IF_NOT_OK(EncodeDqkMaps(d, p, &maps));
        if (dv_choice.dqk_persist_blocks > 0) {
          const size_t psmem = DqkPersistSmem::Bytes(d.dn_parts);
          CUDA_RETURN_IF_NOT_OK(SetSmem(mlstm_bwd_dqk_ws_persist<SPLIT>, psmem));
          unsigned* counter = nullptr;
          CUDA_RETURN_IF_NOT_OK(TakePersistCounter(stream, &counter));
          mlstm_bwd_dqk_ws_persist<SPLIT><<<dv_choice.dqk_persist_blocks, 384, psmem, stream>>>(d, p, maps, counter);
        } else if (dv_choice.ring_eager) {
          CUDA_RETURN_IF_NOT_OK(SetSmem(mlstm_bwd_dqk_ws_eager<SPLIT>, smem));
          mlstm_bwd_dqk_ws_eager<SPLIT><<<dim3(d.DK / 128, d.NC, bh), 384, smem, stream>>>(d, p, maps);
        } else {
          CUDA_RETURN_IF_NOT_OK(SetSmem(mlstm_bwd_dqk_ws<SPLIT>, smem));
          mlstm_bwd_dqk_ws<SPLIT><<<dim3(d.DK / 128, d.NC, bh), 384, smem, stream>>>(d, p, maps);
        }
        CUDA_RETURN_IF_LAUNCH_ERROR("mlstm_bwd_dqk");
        Hook("mlstm_bwd_dqk", stream);
        return {};
      };
      CUDA_RETURN_IF_NOT_OK(d.split ? dqk_ws(T{}) : dqk_ws(F{}));
      return LaunchGatesBwd(d, p, stream);
    }
  }
  if (d.dqk_slab == 128) {
    CUDA_RETURN_IF_NOT_OK(d.split ? dqk(std::integral_constant<int, 128>{}, T{})
                                  : dqk(std::integral_constant<int, 128>{}, F{}));
  } else {
    CUDA_RETURN_IF_NOT_OK(d.split ? dqk(std::integral_constant<int, 64>{}, T{})
                                  : dqk(std::integral_constant<int, 64>{}, F{}));
  }
  return LaunchGatesBwd(d, p, stream);
}

// Chunk 256 (MlstmOptions::chunk_size 256; kernels/cuda/mlstm_notes.md, session 15): the chunk
// 128 warpgroup-MMA family on 128-token halves. Gate scans with 8 tokens per lane; the state
// recurrences over 128-token steps, storing C_k / dC_{k+1} at the 256-token boundaries only (half
// the state bytes of chunk 128); fwd_out / bwd_dv / bwd_dqk one block per half (its diagonal block
// and the chunk's state terms; the chunk's off-diagonal block inside them after one pre-pass per
// direction: see "chunk 256: the off-diagonal block"). MlstmCheck admits only the shapes and
// options all of these take (dk, dv multiples of 128, 128×128 tiles, 128-column slabs, parallel
// gate scans, the fused bwd_dv).
// pfrag / rs_off: the P' fragments and row sums in `saved` (needed with with_out).
CudaResult LaunchForward256(const Dims& d, const FwdPtrs& p, cudaStream_t stream, bool with_out = true,
                            uint4* pfrag = nullptr, float* rs_off = nullptr, bool ring_eager = false) {
  const int bh = d.B * d.NH, halves = (d.S + 127) / 128;
  if (d.gate_cluster > 1 && d.NC <= kGateFwdClMaxChunks) {
    cudaLaunchConfig_t cfg;
    cudaLaunchAttribute attr[1];
    GateClusterLaunch(d, 32 * kGateFwdClWarps, stream, &cfg, attr);
    CUDA_RETURN_IF_NOT_OK(FitCluster(mlstm_gates_fwd_cluster_wide<8>, &cfg, attr));
    CUDA_RETURN_IF_ERROR(cudaLaunchKernelEx(&cfg, mlstm_gates_fwd_cluster_wide<8>, d, p));
  } else {
    const int warps = std::min(d.NC, kGateFwdWarps);
    mlstm_gates_fwd_par_wide<8><<<bh, 32 * warps, 0, stream>>>(d, p);
  }
  CUDA_RETURN_IF_LAUNCH_ERROR("mlstm_gates_fwd");
  Hook("mlstm_gates_fwd", stream);
  {
    const size_t smem = StateWsSmem::kBytes;
    StateWsMaps maps{};
    CUDA_RETURN_IF_NOT_OK(EncodeStateFwdMaps(d, p, &maps));
    CUDA_RETURN_IF_NOT_OK(SetSmem(mlstm_state_fwd_ws_l256, smem));
    mlstm_state_fwd_ws_l256<<<dim3(d.DV / 128, d.DK / 128, bh), 384, smem, stream>>>(d, p, maps);
    CUDA_RETURN_IF_LAUNCH_ERROR("mlstm_state_fwd");
    Hook("mlstm_state_fwd", stream);
  }
  if (!with_out) return {};
  auto out = [&](auto split_tag) -> CudaResult {
    constexpr bool SPLIT = decltype(split_tag)::value;
    const size_t smem = OutWs3Smem<SPLIT>::Bytes(d.DK);
    OutWsMaps maps{};
    CUDA_RETURN_IF_NOT_OK(EncodeOutMaps(d, p, &maps));
    if (d.S > 128) {
      CUDA_RETURN_IF_NOT_OK(SetSmem(mlstm_fwd_offdiag_p_l256<SPLIT>, OffdiagPSmem::kBytes));
      mlstm_fwd_offdiag_p_l256<SPLIT><<<dim3(1, d.NC, bh), 256, OffdiagPSmem::kBytes, stream>>>(d, p, pfrag,
                                                                                                 rs_off);
      CUDA_RETURN_IF_LAUNCH_ERROR("mlstm_fwd_offdiag_p");
      Hook("mlstm_fwd_offdiag_p", stream);
    }
    if (ring_eager) {
      CUDA_RETURN_IF_NOT_OK(SetSmem(mlstm_fwd_out_ws3_l256_off_eager<SPLIT>, smem));
      mlstm_fwd_out_ws3_l256_off_eager<SPLIT><<<dim3(d.DV / 128, halves, bh), 384, smem, stream>>>(d, p, maps,
                                                                                                 pfrag, rs_off);
    } else {
      CUDA_RETURN_IF_NOT_OK(SetSmem(mlstm_fwd_out_ws3_l256_off<SPLIT>, smem));
      mlstm_fwd_out_ws3_l256_off<SPLIT><<<dim3(d.DV / 128, halves, bh), 384, smem, stream>>>(d, p, maps, pfrag,
                                                                                             rs_off);
    }
    CUDA_RETURN_IF_LAUNCH_ERROR("mlstm_fwd_out");
    Hook("mlstm_fwd_out", stream);
    return {};
  };
  return d.split ? out(std::true_type{}) : out(std::false_type{});
}

// bfrag: the backward pre-pass's fragments in `scratch` (bwd_dv / bwd_dqk's _off forms read them).
CudaResult LaunchBackward256(const Dims& d, const BwdPtrs& p, const BwdDvChoice& dv_choice, const float* dots,
                             cudaStream_t stream, uint4* bfrag) {
  if (!dv_choice.fused) {
    return InvalidArgument("mlstm backward: chunk 256 runs only the fused warpgroup bwd_dv "
                           "(GYRE_MLSTM_BWD_DV=mma / MlstmBwdDvKernel::kMmaSync are chunk <= 128 only)");
  }
  const int bh = d.B * d.NH, halves = (d.S + 127) / 128;
  CUDA_RETURN_IF_NOT_OK(LaunchBwdPrep(d, p, dots, stream));
  {
    const size_t smem = StateWsSmem::kBytes;
    StateWsMaps maps{};
    CUDA_RETURN_IF_NOT_OK(EncodeStateBwdMaps(d, p, &maps));
    CUDA_RETURN_IF_NOT_OK(SetSmem(mlstm_state_bwd_ws_l256, smem));
    mlstm_state_bwd_ws_l256<<<dim3(d.DV / 128, d.DK / 128, bh), 384, smem, stream>>>(d, p, maps);
    CUDA_RETURN_IF_LAUNCH_ERROR("mlstm_state_bwd");
    Hook("mlstm_state_bwd", stream);
  }
  if (d.S > 128) {
    CUDA_RETURN_IF_NOT_OK(SetSmem(mlstm_bwd_offdiag_p_l256, OffdiagBwdPSmem::kBytes));
    mlstm_bwd_offdiag_p_l256<<<dim3(2, d.NC, bh), 256, OffdiagBwdPSmem::kBytes, stream>>>(d, p, bfrag);
    CUDA_RETURN_IF_LAUNCH_ERROR("mlstm_bwd_offdiag_p");
    Hook("mlstm_bwd_offdiag_p", stream);
  }
  {
    constexpr int kStages = 3;
    const size_t smem = DvWgFusedSmem<kStages>::kBytes;
    CUDA_RETURN_IF_NOT_OK(SetSmem(mlstm_bwd_dv_wg_fused_l256_off<kStages>, smem));
    mlstm_bwd_dv_wg_fused_l256_off<kStages><<<dim3(1, halves, bh), 256, smem, stream>>>(d, p, bfrag);
    CUDA_RETURN_IF_LAUNCH_ERROR("mlstm_bwd_dv");
    Hook("mlstm_bwd_dv", stream);
  }
  auto dqk = [&](auto split_tag) -> CudaResult {
    constexpr bool SPLIT = decltype(split_tag)::value;
    const size_t smem = DqkWgSmem<SPLIT>::kBytes + DqkWsBars::kBytes;
    DqkTmaMaps maps{};
    CUDA_RETURN_IF_NOT_OK(EncodeDqkMaps(d, p, &maps));
    CUDA_RETURN_IF_NOT_OK(SetSmem(mlstm_bwd_dqk_ws_l256_off<SPLIT>, smem));
    mlstm_bwd_dqk_ws_l256_off<SPLIT><<<dim3(d.DK / 128, halves, bh), 384, smem, stream>>>(d, p, maps, bfrag);
    CUDA_RETURN_IF_LAUNCH_ERROR("mlstm_bwd_dqk");
    Hook("mlstm_bwd_dqk", stream);
    return {};
  };
  CUDA_RETURN_IF_NOT_OK(d.split ? dqk(std::true_type{}) : dqk(std::false_type{}));
  return LaunchGatesBwd(d, p, stream);
}

bool Aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace

void MlstmSetLaunchHook(MlstmLaunchHook hook) { g_launch_hook = hook; }

CudaResult MlstmCheck(const MlstmShape& s, const MlstmOptions& o) {
  if (s.batch < 1 || s.seq_len < 1 || s.num_heads < 1 || s.dk < 1 || s.dv < 1) {
    return InvalidArgument("mlstm: batch, seq_len, num_heads, dk, dv must be >= 1");
  }
  if (o.chunk_size != 16 && o.chunk_size != 32 && o.chunk_size != 64 && o.chunk_size != 128 &&
      o.chunk_size != 256) {
    return InvalidArgument("mlstm (cuda): chunk_size must be 16, 32, 64, 128 or 256, got " +
                           std::to_string(o.chunk_size));
  }
  // Chunk 256 exists only on the warpgroup-MMA kernels (LaunchForward256 / LaunchBackward256).
  if (o.chunk_size == 256) {
    if (s.dk % 128 != 0 || s.dv % 128 != 0) {
      return InvalidArgument("mlstm (cuda): chunk 256 needs dk and dv multiples of 128 (only the "
                             "warpgroup-MMA kernels run it), got dk=" + std::to_string(s.dk) +
                             " dv=" + std::to_string(s.dv));
    }
    if (o.state_tile == 64 || o.io_slab == 64) {
      return InvalidArgument("mlstm (cuda): chunk 256 runs only 128x128 state tiles and 128-column "
                             "io slabs (state_tile / io_slab 0 or 128)");
    }
    if (o.gate_schedule == MlstmGateSchedule::kSequential) {
      return InvalidArgument("mlstm (cuda): chunk 256 has no sequential gate scan (kAuto, "
                             "kChunkParallel or kCluster)");
    }
    if (o.bwd_dv == MlstmBwdDvKernel::kMmaSync) {
      return InvalidArgument("mlstm (cuda): chunk 256 runs only the fused warpgroup bwd_dv");
    }
  }
  if (s.dk % 64 != 0 || s.dv % 64 != 0) {
    return InvalidArgument("mlstm (cuda): dk and dv must be multiples of 64, got dk=" +
                           std::to_string(s.dk) + " dv=" + std::to_string(s.dv));
  }
  if (!(o.eps >= 0)) return InvalidArgument("mlstm: eps must be >= 0");
  if (!(o.qk_scale >= 0) || !std::isfinite(o.qk_scale)) return InvalidArgument("mlstm: qk_scale must be finite and >= 0");
  if (o.state_tile != 0 && o.state_tile != 64 && o.state_tile != 128) {
    return InvalidArgument("mlstm (cuda): state_tile must be 0 (auto), 64 or 128, got " +
                           std::to_string(o.state_tile));
  }
  if (o.io_slab != 0 && o.io_slab != 64 && o.io_slab != 128) {
    return InvalidArgument("mlstm (cuda): io_slab must be 0 (auto), 64 or 128, got " +
                           std::to_string(o.io_slab));
  }
  if (o.state_tile == 128 && (s.dk % 128 != 0 || s.dv % 128 != 0)) {
    return InvalidArgument("mlstm (cuda): state_tile 128 needs dk and dv multiples of 128");
  }
  if (s.batch * s.seq_len * s.num_heads > (int64_t{1} << 31) / 8 ||
      s.batch * s.num_heads > 65535 || (s.seq_len + o.chunk_size - 1) / o.chunk_size > 65535) {
    return InvalidArgument("mlstm (cuda): too many tokens, heads or chunks for one call");
  }
  return {};
}

size_t MlstmChunkwiseSavedBytes(const MlstmShape& shape, const MlstmOptions& options) {
  return MakeSaved(shape, options).total;
}

size_t MlstmChunkwiseSavedBackwardBytes(const MlstmShape& shape, const MlstmOptions& options) {
  return MakeSaved(shape, options).p_off;  // P' and its row sums come last (MakeSaved)
}

size_t MlstmChunkwiseBackwardScratchBytes(const MlstmShape& shape, const MlstmOptions& options) {
  return MakeScratch(shape, options).total;
}

namespace {
// The forward kernels' pointers into the inputs and the saved buffer (the forward and the
// states-only recomputation use the same layout; the final state is set by the caller).
FwdPtrs ForwardPointers(const MlstmDeviceInputs& in, MlstmDeviceState<const float> initial, bf16* h, char* base,
                        const SavedLayout& l) {
  FwdPtrs p{};
  p.q = in.q;
  p.k = in.k;
  p.v = in.v;
  p.ig = in.igate;
  p.fg = in.fgate;
  p.c0 = initial.c;
  p.n0 = initial.n;
  p.m0 = initial.m;
  p.h = h;
  p.sc = reinterpret_cast<bf16*>(base + l.c);
  p.sc_lo = reinterpret_cast<bf16*>(base + l.c_lo);
  p.h_lo = reinterpret_cast<bf16*>(base + l.h_lo);
  p.sc_last = reinterpret_cast<float*>(base + l.c_last);
  p.sn = reinterpret_cast<float*>(base + l.n);
  p.smk = reinterpret_cast<float*>(base + l.mk);
  p.b_tok = reinterpret_cast<float*>(base + l.b_tok);
  p.m_tok = reinterpret_cast<float*>(base + l.m_tok);
  p.den_tok = reinterpret_cast<float*>(base + l.den_tok);
  p.e_tok = reinterpret_cast<float*>(base + l.e_tok);
  p.decay = reinterpret_cast<float*>(base + l.decay);
  return p;
}
}  // namespace

CudaResult MlstmChunkwiseForward(const MlstmShape& shape, const MlstmOptions& options,
                                 const MlstmDeviceInputs& in,
                                 MlstmDeviceState<const float> initial, __nv_bfloat16* h,
                                 void* saved, MlstmDeviceState<float> final_state,
                                 cudaStream_t stream) {
  CUDA_RETURN_IF_NOT_OK(MlstmCheck(shape, options));
  if (in.q == nullptr || in.k == nullptr || in.v == nullptr || in.igate == nullptr ||
      in.fgate == nullptr || h == nullptr || saved == nullptr) {
    return InvalidArgument("mlstm forward: q, k, v, igate, fgate, h and saved are required");
  }
  if (!Aligned16(in.q) || !Aligned16(in.k) || !Aligned16(in.v) || !Aligned16(h)) {
    return InvalidArgument("mlstm forward: q, k, v, h must be 16-byte aligned");
  }
  const FwdEnvCheck env = FwdEnv();
  const RingEnv ring = RingRelease(options);
  if (ring.bad_env != nullptr) {
    return InvalidArgument(std::string("mlstm forward: GYRE_MLSTM_RING must be eager or lag (or unset), got '") +
                           ring.bad_env + "'");
  }
  if (const char* bad = OffdiagBadEnv(); bad != nullptr) {
    return InvalidArgument(std::string("mlstm forward: GYRE_MLSTM_OFFDIAG must be all (or unset; fused and pass "
                                       "were deleted), got '") +
                           bad + "'");
  }
  if (env.bad_env != nullptr) {
    return InvalidArgument(std::string("mlstm forward: GYRE_MLSTM_FWD_OUT must be ws3 (or unset; "
                                       "ws was deleted), got '") +
                           env.bad_env + "'");
  }
  if (env.bad_state_env != nullptr) {
    return InvalidArgument(std::string("mlstm forward: GYRE_MLSTM_STATE_FWD must be ws (or unset; "
                                       "wg was deleted), got '") +
                           env.bad_state_env + "'");
  }
  bool tail_split = false;
  CUDA_RETURN_IF_NOT_OK(StateTailSplit(options, "mlstm forward", &tail_split));
  CUDA_RETURN_IF_NOT_OK(WideSlabsCheck("mlstm forward"));
  Dims d = MakeDims(shape, options);
  d.gate_cluster = GateCluster(shape, options);
  const SavedLayout l = MakeSaved(shape, options);
  FwdPtrs p = ForwardPointers(in, initial, h, static_cast<char*>(saved), l);
  p.c_out = final_state.c;
  p.n_out = final_state.n;
  p.m_out = final_state.m;
  switch (d.L) {
    case 16: return LaunchForward<16>(d, p, stream);
    case 32: return LaunchForward<32>(d, p, stream);
    case 64: return LaunchForward<64>(d, p, stream);
    case 256: {
      char* base = static_cast<char*>(saved);
      return LaunchForward256(d, p, stream, true, reinterpret_cast<uint4*>(base + l.p_off),
                              reinterpret_cast<float*>(base + l.rs_off), ring.eager);
    }
    default: return LaunchForward<128>(d, p, stream, true, tail_split, ring.eager, PersistBlocks(d, options));
  }
}

// The per-token rows of `saved` only mlstm_fwd_out writes: den_t, then h lo (split precision).
struct TokenLayout {
  size_t den = 0;   // f32  [BH][S]       = SavedLayout::den_tok
  size_t h_lo = 0;  // bf16 [B][S][NH][dv] = SavedLayout::h_lo (split only)
  size_t den_bytes = 0, h_lo_bytes = 0;
  size_t total = 0;
};

TokenLayout MakeTokens(const MlstmShape& s, const MlstmOptions& o) {
  TokenLayout t;
  t.den_bytes = static_cast<size_t>(s.batch * s.num_heads * s.seq_len) * 4;
  t.h_lo_bytes = UseSplit(o) ? static_cast<size_t>(s.batch * s.seq_len * s.num_heads * s.dv) * 2 : 0;
  t.h_lo = AlignUp(t.den_bytes);
  t.total = t.h_lo + AlignUp(t.h_lo_bytes);
  return t;
}

size_t MlstmChunkwiseTokenBytes(const MlstmShape& shape, const MlstmOptions& options) {
  return MakeTokens(shape, options).total;
}

CudaResult MlstmChunkwiseCopyTokens(const MlstmShape& shape, const MlstmOptions& options,
                                    const void* saved, void* tokens, cudaStream_t stream) {
  CUDA_RETURN_IF_NOT_OK(MlstmCheck(shape, options));
  if (saved == nullptr || tokens == nullptr) {
    return InvalidArgument("mlstm copy tokens: saved and tokens are required");
  }
  const SavedLayout l = MakeSaved(shape, options);
  const TokenLayout t = MakeTokens(shape, options);
  const char* from = static_cast<const char*>(saved);
  char* to = static_cast<char*>(tokens);
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(to + t.den, from + l.den_tok, t.den_bytes, cudaMemcpyDeviceToDevice, stream));
  if (t.h_lo_bytes > 0) {
    CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(to + t.h_lo, from + l.h_lo, t.h_lo_bytes, cudaMemcpyDeviceToDevice, stream));
  }
  return {};
}

CudaResult MlstmChunkwiseRecomputeStates(const MlstmShape& shape, const MlstmOptions& options,
                                         const MlstmDeviceInputs& in,
                                         MlstmDeviceState<const float> initial,
                                         const void* tokens, void* saved, cudaStream_t stream) {
  CUDA_RETURN_IF_NOT_OK(MlstmCheck(shape, options));
  if (in.q == nullptr || in.k == nullptr || in.v == nullptr || in.igate == nullptr ||
      in.fgate == nullptr || tokens == nullptr || saved == nullptr) {
    return InvalidArgument("mlstm recompute states: q, k, v, igate, fgate, tokens and saved are required");
  }
  if (!Aligned16(in.q) || !Aligned16(in.k) || !Aligned16(in.v)) {
    return InvalidArgument("mlstm recompute states: q, k, v must be 16-byte aligned");
  }
  const FwdEnvCheck env = FwdEnv();
  if (env.bad_state_env != nullptr) {
    return InvalidArgument(std::string("mlstm recompute states: GYRE_MLSTM_STATE_FWD must be ws (or "
                                       "unset; wg was deleted), got '") +
                           env.bad_state_env + "'");
  }
  bool tail_split = false;
  CUDA_RETURN_IF_NOT_OK(StateTailSplit(options, "mlstm recompute states", &tail_split));
  // Exactly MlstmChunkwiseForward's Dims and pointers (h / den / h lo are not touched by the
  // first two launches; the final state is not wanted, as in the ops forward).
  Dims d = MakeDims(shape, options);
  d.gate_cluster = GateCluster(shape, options);
  const SavedLayout l = MakeSaved(shape, options);
  const TokenLayout t = MakeTokens(shape, options);
  char* base = static_cast<char*>(saved);
  const char* tok = static_cast<const char*>(tokens);
  const FwdPtrs p = ForwardPointers(in, initial, /*h=*/nullptr, base, l);
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(base + l.den_tok, tok + t.den, t.den_bytes, cudaMemcpyDeviceToDevice, stream));
  if (t.h_lo_bytes > 0) {
    CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(base + l.h_lo, tok + t.h_lo, t.h_lo_bytes, cudaMemcpyDeviceToDevice, stream));
  }
  switch (d.L) {
    case 16: return LaunchForward<16>(d, p, stream, false);
    case 32: return LaunchForward<32>(d, p, stream, false);
    case 64: return LaunchForward<64>(d, p, stream, false);
    case 256: return LaunchForward256(d, p, stream, false);
    default: return LaunchForward<128>(d, p, stream, false, tail_split);
  }
}

const __nv_bfloat16* MlstmChunkwiseSavedHLo(const MlstmShape& shape, const MlstmOptions& options,
                                            const void* saved) {
  if (saved == nullptr || !UseSplit(options)) return nullptr;
  return reinterpret_cast<const bf16*>(static_cast<const char*>(saved) + MakeSaved(shape, options).h_lo);
}

namespace {
// MlstmChunkwiseBackward (dh_dots null) and MlstmChunkwiseBackwardWithDots.
CudaResult Backward(const MlstmShape& shape, const MlstmOptions& options, const MlstmDeviceInputs& in,
                    MlstmDeviceState<const float> initial, const __nv_bfloat16* h, const void* saved,
                    const __nv_bfloat16* dh, const float* dh_dots, MlstmDeviceState<const float> d_final,
                    const MlstmDeviceGrads& grads, MlstmDeviceState<float> d_initial, void* scratch,
                    cudaStream_t stream) {
  CUDA_RETURN_IF_NOT_OK(MlstmCheck(shape, options));
  if (in.q == nullptr || in.k == nullptr || in.v == nullptr || in.igate == nullptr ||
      in.fgate == nullptr || h == nullptr || saved == nullptr || dh == nullptr ||
      scratch == nullptr || grads.dq == nullptr || grads.dk == nullptr || grads.dv == nullptr ||
      grads.digate == nullptr || grads.dfgate == nullptr) {
    return InvalidArgument("mlstm backward: inputs, h, saved, dh, scratch and all grads are required");
  }
  if (!Aligned16(in.q) || !Aligned16(in.k) || !Aligned16(in.v) || !Aligned16(h) ||
      !Aligned16(dh) || !Aligned16(grads.dq) || !Aligned16(grads.dk) || !Aligned16(grads.dv)) {
    return InvalidArgument("mlstm backward: bf16 tensors must be 16-byte aligned");
  }
  BwdDvChoice dv_choice = BwdDvKernel(shape, options);
  {
    const RingEnv ring = RingRelease(options);
    dv_choice.ring_eager = ring.eager;
    dv_choice.bad_ring_env = ring.bad_env;
  }
  if (dv_choice.bad_ring_env != nullptr) {
    return InvalidArgument(std::string("mlstm backward: GYRE_MLSTM_RING must be eager or lag (or unset), got '") +
                           dv_choice.bad_ring_env + "'");
  }
  if (dv_choice.bad_env != nullptr) {
    return InvalidArgument(std::string("mlstm backward: GYRE_MLSTM_BWD_DV must be mma or wgf, got '") +
                           dv_choice.bad_env + "'");
  }
  if (dv_choice.bad_dqk_env != nullptr) {
    return InvalidArgument(std::string("mlstm backward: GYRE_MLSTM_BWD_DQK must be ws (or unset; "
                                       "fused was deleted), got '") +
                           dv_choice.bad_dqk_env + "'");
  }
  if (dv_choice.bad_state_env != nullptr) {
    return InvalidArgument(std::string("mlstm backward: GYRE_MLSTM_STATE_BWD must be ws (or unset; "
                                       "wg was deleted), got '") +
                           dv_choice.bad_state_env + "'");
  }
  bool tail_split = false;
  CUDA_RETURN_IF_NOT_OK(StateTailSplit(options, "mlstm backward", &tail_split));
  CUDA_RETURN_IF_NOT_OK(WideSlabsCheck("mlstm backward"));
  CUDA_RETURN_IF_NOT_OK(BwdPrepCheck("mlstm backward"));
  Dims d = MakeDims(shape, options);
  d.gate_cluster = GateCluster(shape, options);
  dv_choice.dqk_persist_blocks = DqkPersistBlocks(d, options);
  const SavedLayout l = MakeSaved(shape, options);
  const ScratchLayout sl = MakeScratch(shape, options);
  const char* base = static_cast<const char*>(saved);
  char* sb = static_cast<char*>(scratch);
  BwdPtrs p{};
  p.q = in.q;
  p.k = in.k;
  p.v = in.v;
  p.h = h;
  p.dh = dh;
  p.ig = in.igate;
  p.fg = in.fgate;
  p.c0 = initial.c;
  p.n0 = initial.n;
  p.m0 = initial.m;
  p.sc = reinterpret_cast<const bf16*>(base + l.c);
  p.sc_lo = reinterpret_cast<const bf16*>(base + l.c_lo);
  p.h_lo = reinterpret_cast<const bf16*>(base + l.h_lo);
  p.sc_last = reinterpret_cast<const float*>(base + l.c_last);
  p.sn = reinterpret_cast<const float*>(base + l.n);
  p.smk = reinterpret_cast<const float*>(base + l.mk);
  p.b_tok = reinterpret_cast<const float*>(base + l.b_tok);
  p.m_tok = reinterpret_cast<const float*>(base + l.m_tok);
  p.den_tok = reinterpret_cast<const float*>(base + l.den_tok);
  p.e_tok = reinterpret_cast<const float*>(base + l.e_tok);
  p.decay = reinterpret_cast<const float*>(base + l.decay);
  p.dc_fin = d_final.c;
  p.dn_fin = d_final.n;
  p.dm_fin = d_final.m;
  p.dq = grads.dq;
  p.dk = grads.dk;
  p.dv = grads.dv;
  p.dig = grads.digate;
  p.dfg = grads.dfgate;
  p.dc0 = d_initial.c;
  p.dn0 = d_initial.n;
  p.dm0 = d_initial.m;
  p.dc = reinterpret_cast<bf16*>(sb + sl.dc);
  p.dc_lo = reinterpret_cast<bf16*>(sb + sl.dc_lo);
  p.dn = reinterpret_cast<float*>(sb + sl.dn);
  p.inv_d = reinterpret_cast<float*>(sb + sl.inv_d);
  p.coef = reinterpret_cast<float*>(sb + sl.coef);
  p.ddc = reinterpret_cast<float*>(sb + sl.ddc);
  p.dden = reinterpret_cast<float*>(sb + sl.dden);
  p.dm = reinterpret_cast<float*>(sb + sl.dm);
  p.qdq = reinterpret_cast<float*>(sb + sl.qdq);
  p.kdk = reinterpret_cast<float*>(sb + sl.kdk);
  p.arg = reinterpret_cast<int*>(sb + sl.arg);
  p.ps = reinterpret_cast<double*>(sb + sl.ps);
  p.seg = reinterpret_cast<double*>(sb + sl.seg);
  p.n_dk_slabs = static_cast<int>(shape.dk / d.dqk_slab);
  switch (d.L) {
    case 16: return LaunchBackward<16>(d, p, BwdDvChoice{}, dh_dots, stream);
    case 32: return LaunchBackward<32>(d, p, BwdDvChoice{}, dh_dots, stream);
    case 64: return LaunchBackward<64>(d, p, BwdDvChoice{}, dh_dots, stream);
    case 256:
      if (const char* bad = OffdiagBadEnv(); bad != nullptr) {
        return InvalidArgument(std::string("mlstm backward: GYRE_MLSTM_OFFDIAG must be all (or unset; fused and "
                                           "pass were deleted), got '") +
                               bad + "'");
      }
      return LaunchBackward256(d, p, dv_choice, dh_dots, stream, reinterpret_cast<uint4*>(sb + sl.bfrag));
    default: return LaunchBackward<128>(d, p, dv_choice, dh_dots, stream, tail_split);
  }
}
}  // namespace

CudaResult MlstmChunkwiseBackward(const MlstmShape& shape, const MlstmOptions& options,
                                  const MlstmDeviceInputs& in,
                                  MlstmDeviceState<const float> initial, const __nv_bfloat16* h,
                                  const void* saved, const __nv_bfloat16* dh,
                                  MlstmDeviceState<const float> d_final,
                                  const MlstmDeviceGrads& grads,
                                  MlstmDeviceState<float> d_initial, void* scratch,
                                  cudaStream_t stream) {
  return Backward(shape, options, in, initial, h, saved, dh, nullptr, d_final, grads, d_initial, scratch, stream);
}

CudaResult MlstmChunkwiseBackwardWithDots(const MlstmShape& shape, const MlstmOptions& options,
                                          const MlstmDeviceInputs& in,
                                          MlstmDeviceState<const float> initial,
                                          const __nv_bfloat16* h, const void* saved,
                                          const __nv_bfloat16* dh, const float* dh_dots,
                                          MlstmDeviceState<const float> d_final,
                                          const MlstmDeviceGrads& grads,
                                          MlstmDeviceState<float> d_initial, void* scratch,
                                          cudaStream_t stream) {
  if (dh_dots == nullptr && !options.stop_normaliser_gradient) {
    return InvalidArgument("mlstm backward with dots: dh_dots is required (unless stop_normaliser_gradient)");
  }
  if (options.stop_normaliser_gradient) dh_dots = nullptr;  // unused: the warp kernel skips the dot too
  return Backward(shape, options, in, initial, h, saved, dh, dh_dots, d_final, grads, d_initial, scratch, stream);
}

CudaResult MlstmStepForward(const MlstmShape& shape, const MlstmOptions& options,
                            const __nv_bfloat16* q, const __nv_bfloat16* k,
                            const __nv_bfloat16* v, const float* igate, const float* fgate,
                            MlstmDeviceState<float> state, __nv_bfloat16* h,
                            cudaStream_t stream) {
  if (shape.batch < 1 || shape.num_heads < 1 || shape.dk < 1 || shape.dv < 1) {
    return InvalidArgument("mlstm step: batch, num_heads, dk, dv must be >= 1");
  }
  if (q == nullptr || k == nullptr || v == nullptr || igate == nullptr || fgate == nullptr ||
      state.c == nullptr || state.n == nullptr || state.m == nullptr || h == nullptr) {
    return InvalidArgument("mlstm step: every pointer (state included) is required");
  }
  MlstmShape s1 = shape;
  s1.seq_len = 1;
  MlstmOptions o1 = options;
  o1.chunk_size = 16;
  const Dims d = MakeDims(s1, o1);
  // Cluster size: 16 CTAs per head (non-portable, H100 / H200) while that still leaves SMs
  // idle (B·NH·16 <= #SMs: the 7B layout at B1 streams its 4 MB of state from 128 SMs), else 8;
  // 8 again where the device cannot place 16 (cudaOccupancyMaxActiveClusters). The choice and the
  // function attributes are made once per (device, B·NH, dk, dv), not at every decoded token:
  // they took five driver calls a layer a token, the occupancy query among them.
  int device = 0;
  CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  const int64_t bh = shape.batch * shape.num_heads;
  auto smem_of = [&](int cs) {
    const int64_t rows = (shape.dk + cs - 1) / cs;
    return static_cast<size_t>((shape.dv + 2 * rows + kStepThreads / 32) * sizeof(float));
  };
  cudaLaunchConfig_t cfg = {};
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.blockDim = dim3(kStepThreads);
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  auto configure = [&](int cs) {
    attr[0].val.clusterDim.x = static_cast<unsigned>(cs);
    cfg.gridDim = dim3(static_cast<unsigned>(bh * cs));
    cfg.dynamicSmemBytes = smem_of(cs);
  };
  if (smem_of(1) > 200 * 1024) return InvalidArgument("mlstm step: dv too large");
  int csize = 0;
  {
    struct DeviceStepState {
      int sms = 0;
      size_t smem_set = 0;                                       // the attribute's value so far
      std::map<std::tuple<int64_t, int64_t, int64_t>, int> csize;  // (B·NH, dk, dv) -> cluster size
    };
    static std::mutex mu;
    static std::map<int, DeviceStepState> per_device;
    std::lock_guard<std::mutex> lock(mu);
    DeviceStepState& st = per_device[device];
    if (st.sms == 0) {  // (set only once both calls succeeded)
      int sms = 0;
      CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
      CUDA_RETURN_IF_ERROR(
          cudaFuncSetAttribute(mlstm_step, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
      st.sms = sms;
    }
    if (smem_of(1) > st.smem_set) {  // only ever raised: a smaller shape keeps the larger limit
      CUDA_RETURN_IF_ERROR(
          cudaFuncSetAttribute(mlstm_step, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(smem_of(1))));
      st.smem_set = smem_of(1);
    }
    const auto key = std::make_tuple(bh, shape.dk, shape.dv);
    if (auto it = st.csize.find(key); it != st.csize.end()) {
      csize = it->second;
    } else {
      csize = static_cast<int>(std::min<int64_t>(bh * 16 <= st.sms ? 16 : 8, shape.dk));
      configure(csize);
      int max_clusters = 0;
      if (csize > 8 && (cudaOccupancyMaxActiveClusters(&max_clusters, mlstm_step, &cfg) != cudaSuccess ||
                        max_clusters < 1)) {
        (void)cudaGetLastError();  // clear the query's error; 8 is portable
        csize = static_cast<int>(std::min<int64_t>(8, shape.dk));
      }
      st.csize[key] = csize;
    }
  }
  configure(csize);
  const int rows = static_cast<int>((shape.dk + csize - 1) / csize);
  CUDA_RETURN_IF_ERROR(cudaLaunchKernelEx(&cfg, mlstm_step, d, rows, q, k, v, igate, fgate,
                                          state.c, state.n, state.m, h));
  CUDA_RETURN_IF_LAUNCH_ERROR("mlstm_step");
    Hook("mlstm_step", stream);
  return {};
}

}  // namespace gyre::cuda
