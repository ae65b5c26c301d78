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
// 64-column slabs, 64×64 state tiles) uses mma.sync m16n8k16 with ldmatrix. xlstm-125m cell
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

using bf16 = __nv_bfloat16;

constexpr int kPad = 8;  // bf16 elements of padding per shared-memory row: conflict-free ldmatrix

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

// ---------------------------------------------------------------- kernel parameters

struct Dims {
  int B, S, NH, DK, DV, L, NC;
  float scale, eps;
  bool sigmoid;
  bool stop_grad;
  bool split;      // hi + lo pairs (MlstmStatePrecision)
  bool fwd_wlo;    // state_fwd: E_t k_t as hi + lo (MlstmStateWeights)
  bool bwd_wlo;    // state_bwd: coef_t q̂_t as hi + lo (MlstmStateWeights)
  bool par_gates;  // MlstmGateSchedule other than kSequential
  int gate_cluster;  // > 1: gates_fwd / gates_bwd on clusters of this many CTAs per head
  int state_tile;  // 64 or 128 (resolved MlstmOptions::state_tile)
  int dn_parts;    // DV / state_tile: state_bwd column blocks, each summing part of dn
  int out_slab;    // DVT of fwd_out (resolved MlstmOptions::io_slab)
  int dqk_slab;    // DKT of bwd_dqk (resolved MlstmOptions::io_slab)
  // Warpgroup-MMA (wgmma) kernels where the shape allows them; the mma.sync kernels elsewhere.
  bool wg_dqk;     // bwd_dqk: mlstm_bwd_dqk_ws (L 128, 128-column dq/dk slabs)
  bool wg_out;     // fwd_out: mlstm_fwd_out_ws3 (L 128, 128-column h slabs)
  bool wg_state;   // state_fwd / state_bwd: mlstm_state_fwd_ws / _bwd_ws (L 128, 128×128 tiles)
};

struct FwdPtrs {
  const bf16 *q, *k, *v;
  const float *ig, *fg;
  const float *c0, *n0, *m0;  // initial (c0 null = zeros)
  bf16* h;
  bf16* sc;         // saved C_k bf16 (hi)
  bf16* sc_lo;      // saved C_k lo (split only)
  bf16* h_lo;       // h_fp32 − h (split only)
  float* sc_last;   // saved C_S fp32
  float* sn;        // saved n_k
  float* smk;       // saved m_k
  float* b_tok;
  float* m_tok;
  float* den_tok;
  float* e_tok;
  float* decay;
  float *c_out, *n_out, *m_out;  // final state (c_out null = not wanted)
};

struct BwdPtrs {
  const bf16 *q, *k, *v, *h, *dh;
  const float *ig, *fg;
  const float *c0, *n0, *m0;
  const bf16* sc;
  const bf16* sc_lo;
  const bf16* h_lo;
  const float* sc_last;
  const float* sn;
  const float* smk;
  const float* b_tok;
  const float* m_tok;
  const float* den_tok;
  const float* e_tok;
  const float* decay;
  const float *dc_fin, *dn_fin, *dm_fin;  // d_final (dc_fin null = zero)
  bf16 *dq, *dk, *dv;
  float *dig, *dfg;
  float *dc0, *dn0, *dm0;  // d_initial (dc0 null = not wanted)
  bf16* dc;                // scratch dC_{k+1}
  bf16* dc_lo;             // its lo part (split only)
  float* dn;
  float *inv_d, *coef, *ddc, *dden, *dm, *qdq, *kdk;
  int* arg;
  double *ps, *seg;
  int n_dk_slabs;
};

// ---------------------------------------------------------------- device helpers

__device__ __forceinline__ float LogForget(bool sigmoid, float f) {
  if (!sigmoid) return f;
  return f < 0.f ? f - log1pf(__expf(f)) : -log1pf(__expf(-f));
}
__device__ __forceinline__ float LogForgetDerivative(bool sigmoid, float f) {
  if (!sigmoid) return 1.f;
  // σ(−f)
  if (f >= 0.f) {
    const float e = __expf(-f);
    return e / (1.f + e);
  }
  return 1.f / (1.f + __expf(f));
}

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void CpAsync16(void* smem, const void* gmem, bool valid) {
  const int bytes = valid ? 16 : 0;  // 0: zero-fill the 16 bytes
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(SmemAddr(smem)), "l"(gmem),
               "r"(bytes));
}
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void Ldsm4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SmemAddr(p)));
}
__device__ __forceinline__ void Ldsm4T(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SmemAddr(p)));
}

__device__ __forceinline__ void Mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                    uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four MMAs into accumulators n0..n0+3 from the B fragments of two column-tile pairs (LoadBKN /
// LoadBNK b0, b1) and one A. The hi + lo products of the split-precision paths call this twice
// (hi A, then lo A), so an accumulator's next MMA comes 4 MMAs later, not 2. Why: ncu's largest
// stall reason in every main kernel is "wait" (fixed-latency dependency, 19-29% of the warps'
// cycles at 8 warps per SM). Measured (H100, xlstm-125m cell, bench/RESULTS.md helper mlstm6):
// state_bwd 0.487 -> 0.473 ms, state_fwd unchanged, and ncu's "wait" share did not drop, so most
// of that stall is the mma.sync issue spacing itself, not this dependency.
template <int N>
__device__ __forceinline__ void MmaPairs(float (&acc)[N][4], int n0, const uint32_t (&a)[4],
                                         const uint32_t (&b0)[4], const uint32_t (&b1)[4]) {
  Mma(acc[n0], a, b0[0], b0[1]);
  Mma(acc[n0 + 1], a, b0[2], b0[3]);
  Mma(acc[n0 + 2], a, b1[0], b1[1]);
  Mma(acc[n0 + 3], a, b1[2], b1[3]);
}

__device__ __forceinline__ uint32_t PackBf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// A fragment (16×16) of a row-major [m][k] shared tile at (m0, k0).
__device__ __forceinline__ void LoadA(uint32_t (&a)[4], const bf16* s, int stride, int m0, int k0,
                                      int lane) {
  Ldsm4(a, s + (m0 + (lane & 15)) * stride + k0 + 8 * (lane >> 4));
}
// A fragment where the tile is stored transposed, [k][m].
__device__ __forceinline__ void LoadAT(uint32_t (&a)[4], const bf16* s, int stride, int m0, int k0,
                                       int lane) {
  const int j = lane >> 3;
  Ldsm4T(a, s + (k0 + (lane & 7) + 8 * (j >> 1)) * stride + m0 + 8 * (j & 1));
}
// B fragments of two n-tiles (16 n × 16 k) from a tile stored [n][k]: b[0], b[1] for n0..n0+7,
// b[2], b[3] for n0+8..n0+15.
__device__ __forceinline__ void LoadBNK(uint32_t (&b)[4], const bf16* s, int stride, int n0, int k0,
                                        int lane) {
  const int j = lane >> 3;
  Ldsm4(b, s + (n0 + (lane & 7) + 8 * (j >> 1)) * stride + k0 + 8 * (j & 1));
}
// Same from a tile stored [k][n].
__device__ __forceinline__ void LoadBKN(uint32_t (&b)[4], const bf16* s, int stride, int n0, int k0,
                                        int lane) {
  const int j = lane >> 3;
  Ldsm4T(b, s + (k0 + (lane & 7) + 8 * (j & 1)) * stride + n0 + 8 * (j >> 1));
}

// ROWS × COLS bf16 tile from global (row stride gstride elements) into shared (row stride
// sstride); rows >= valid_rows are zero-filled.
template <int ROWS, int COLS>
__device__ __forceinline__ void LoadTile(bf16* s, int sstride, const bf16* g, int64_t gstride,
                                         int valid_rows, int tid, int nthreads) {
  constexpr int kChunksPerRow = COLS / 8;
  for (int i = tid; i < ROWS * kChunksPerRow; i += nthreads) {
    const int r = i / kChunksPerRow, c = (i % kChunksPerRow) * 8;
    const bool ok = r < valid_rows;
    CpAsync16(s + r * sstride + c, ok ? g + r * gstride + c : g, ok);
  }
}

// ROWS × 64 bf16 tile (global row stride gstride elements) into a swizzled [ROWS][64] block;
// rows >= valid_rows are zero-filled.
template <int ROWS>
__device__ __forceinline__ void LoadTileSw(unsigned char* s, const bf16* g, int64_t gstride,
                                           int valid_rows, int tid, int nthreads) {
  for (int i = tid; i < ROWS * 8; i += nthreads) {
    const int r = i >> 3, c = i & 7;
    const bool ok = r < valid_rows;
    CpAsync16(s + hopper::Sw128ChunkOffset<ROWS>(r, c), ok ? g + r * gstride + 8 * c : g, ok);
  }
}

template <typename T>
__device__ __forceinline__ T WarpSumT(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// ---------------------------------------------------------------- 1. gates_fwd

// One chunk's gate quantities, computed by one warp (lane j owns tokens j·per .. j·per+per−1):
// chunk-local cumsum b_t, the local prefix max of ĩ_s − b_s, and the totals g = b_last,
// r = max_s (ĩ_s − b_s). Independent of m_k, so every chunk can do this at once.
// kPer 8 (chunk 256) only: b_t − g0, b relative to the boundary between the chunk's 128-token
// halves (g0 = b at the first half's last token), from two half-local scans, and g0. (An empty
// base below chunk 256, so those kernels' code does not change.)
template <int kPer>
struct ChunkGateHalves {};
template <>
struct ChunkGateHalves<8> {
  float bh[8];
  float g0;
};
template <int kPer>
struct ChunkGateLocalT : ChunkGateHalves<kPer> {
  float bl[kPer], rl[kPer], igl[kPer];
  float exclm;  // max of ĩ_s − b_s over the tokens of lower lanes
  float g, r;   // chunk totals (every lane)
  int t0, len, per;
};
using ChunkGateLocal = ChunkGateLocalT<4>;

// kPer: the largest tokens per lane (4 up to L 128, 8 at L 256).
template <int kPer = 4>
__device__ __forceinline__ ChunkGateLocalT<kPer> ChunkGates(const Dims& d, const FwdPtrs& p, int b,
                                                            int hd, int k, int lane) {
  ChunkGateLocalT<kPer> c;
  c.per = (d.L + 31) / 32;  // tokens per lane (<= kPer)
  c.t0 = k * d.L;
  c.len = min(d.L, d.S - c.t0);
  float lfl[kPer];
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int j = lane * c.per + i;
    lfl[i] = 0.f;
    c.igl[i] = -INFINITY;
    if (i < c.per && j < c.len) {
      const int64_t tok = (static_cast<int64_t>(b) * d.S + c.t0 + j) * d.NH + hd;
      sum += LogForget(d.sigmoid, p.fg[tok]);
      lfl[i] = sum;
      c.igl[i] = p.ig[tok];
    }
  }
  float incl = sum;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const float y = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += y;
  }
  const float excl = incl - sum;
  float run = -INFINITY;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    c.bl[i] = excl + lfl[i];
    run = fmaxf(run, c.igl[i] - c.bl[i]);
    c.rl[i] = run;
  }
  float inclm = run;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const float y = __shfl_up_sync(0xffffffffu, inclm, o);
    if (lane >= o) inclm = fmaxf(inclm, y);
  }
  c.exclm = __shfl_up_sync(0xffffffffu, inclm, 1);
  if (lane == 0) c.exclm = -INFINITY;
  c.g = __shfl_sync(0xffffffffu, incl, 31);
  c.r = __shfl_sync(0xffffffffu, inclm, 31);
  if constexpr (kPer == 8) {
    // Chunk 256: the consumers' weights e^{b_t − b_s + ...} need b_t − b_s to chunk 128's
    // precision, but the chunk-local b spans 256 tokens of log-forget (|b| ~ 2000 at gates ±30:
    // twice chunk 128's absolute rounding). So b is stored relative to the halves' boundary,
    // b_t − g0, each half scanned on its own (lanes 0-15 and 16-31 hold the two halves): a
    // half-local prefix for the second half, prefix − half total for the first; both at most one
    // half's magnitude. (The stored m_k becomes m_k + g0 so that b + m_k is unchanged; see
    // ChunkGatesWrite.)
    float inclh = sum;
#pragma unroll
    for (int o = 1; o < 16; o <<= 1) {
      const float y = __shfl_up_sync(0xffffffffu, inclh, o);
      if ((lane & 15) >= o) inclh += y;
    }
    const float exclh = inclh - sum;
    c.g0 = __shfl_sync(0xffffffffu, inclh, 15);
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const float blh = exclh + lfl[i];
      c.bh[i] = lane < 16 ? blh - c.g0 : blh;
    }
  }
  return c;
}

// Writes b_t, m_t, E_t of one chunk once its boundary stabilisers m_k, m_{k+1} are known.
template <int kPer>
__device__ __forceinline__ void ChunkGatesWrite(const Dims& d, const FwdPtrs& p, int bh,
                                                const ChunkGateLocalT<kPer>& c, float m_prev,
                                                float m_next, int lane) {
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int j = lane * c.per + i;
    if (i < c.per && j < c.len) {
      const int64_t o = static_cast<int64_t>(bh) * d.S + c.t0 + j;
      if constexpr (kPer == 8) {
        p.b_tok[o] = c.bh[i];
      } else {
        p.b_tok[o] = c.bl[i];
      }
      p.m_tok[o] = c.bl[i] + fmaxf(m_prev, fmaxf(c.exclm, c.rl[i]));
      p.e_tok[o] = __expf(c.g - c.bl[i] + c.igl[i] - m_next);
    }
  }
  if constexpr (kPer == 8) {  // chunk 256: the stored m_k is m_k + g0 (b is stored as b − g0)
    if (lane == 0) p.smk[static_cast<int64_t>(bh) * (d.NC + 1) + c.t0 / d.L] = m_prev + c.g0;
  }
}

// kSequential: one warp per head walks the chunks.
__global__ void __launch_bounds__(32) mlstm_gates_fwd(Dims d, FwdPtrs p) {
  const int bh = blockIdx.x, b = bh / d.NH, hd = bh % d.NH, lane = threadIdx.x;
  float m_prev = p.m0 != nullptr && p.c0 != nullptr ? p.m0[bh] : 0.f;
  float* mk = p.smk + static_cast<int64_t>(bh) * (d.NC + 1);
  if (lane == 0) mk[0] = m_prev;
  for (int k = 0; k < d.NC; ++k) {
    const ChunkGateLocal c = ChunkGates(d, p, b, hd, k, lane);
    const float m_next = c.g + fmaxf(m_prev, c.r);
    ChunkGatesWrite(d, p, bh, c, m_prev, m_next, lane);
    if (lane == 0) {
      mk[k + 1] = m_next;
      p.decay[static_cast<int64_t>(bh) * d.NC + k] = __expf(c.g + m_prev - m_next);
    }
    m_prev = m_next;
  }
  if (lane == 0 && p.m_out != nullptr && p.c_out != nullptr) p.m_out[bh] = m_prev;
}

// kChunkParallel: one block per head, one warp per chunk (groups of up to 32 chunks). Each warp
// computes its chunk's local quantities; then the max-plus recurrence m_{k+1} = g_k +
// max(m_k, r_k) runs over the group's (g, r) pairs (32 scalar steps, one thread); then each warp
// writes its tokens with its m_k, m_{k+1}.
constexpr int kGateFwdWarps = 32;
// kPer as ChunkGates (4 up to chunk 128; 8 at chunk 256, whose b is stored relative to the halves'
// boundary and whose m_k + g0 ChunkGatesWrite stores, so only m_NC is written here).
template <int kPer>
__device__ __forceinline__ void GatesFwdPar(Dims d, FwdPtrs p) {
  constexpr bool kHalves = kPer == 8;
  __shared__ float gs[kGateFwdWarps], rs[kGateFwdWarps], mprev[kGateFwdWarps + 1];
  const int bh = blockIdx.x, b = bh / d.NH, hd = bh % d.NH;
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
  float* mk = p.smk + static_cast<int64_t>(bh) * (d.NC + 1);
  float m_carry = p.m0 != nullptr && p.c0 != nullptr ? p.m0[bh] : 0.f;
  if (!kHalves && threadIdx.x == 0) mk[0] = m_carry;
  for (int kg = 0; kg < d.NC; kg += nw) {
    const int k = kg + w;
    const bool active = k < d.NC;  // warp-uniform
    ChunkGateLocalT<kPer> c;
    if (active) {
      c = ChunkGates<kPer>(d, p, b, hd, k, lane);
      if (lane == 0) {
        gs[w] = c.g;
        rs[w] = c.r;
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      float m = m_carry;
      const int n = min(nw, d.NC - kg);
      for (int i = 0; i < n; ++i) {
        mprev[i] = m;
        const float mn = gs[i] + fmaxf(m, rs[i]);
        if constexpr (kHalves) {
          if (kg + i + 1 == d.NC) mk[d.NC] = mn;  // (m_k + g0 of every chunk: ChunkGatesWrite)
        } else {
          mk[kg + i + 1] = mn;
        }
        p.decay[static_cast<int64_t>(bh) * d.NC + kg + i] = __expf(gs[i] + m - mn);
        m = mn;
      }
      mprev[n] = m;
    }
    __syncthreads();
    if (active) ChunkGatesWrite(d, p, bh, c, mprev[w], mprev[w + 1], lane);
    m_carry = mprev[min(nw, d.NC - kg)];
    __syncthreads();  // mprev / gs / rs are rewritten by the next group
  }
  if (threadIdx.x == 0 && p.m_out != nullptr && p.c_out != nullptr) p.m_out[bh] = m_carry;
}
__global__ void __launch_bounds__(32 * kGateFwdWarps) mlstm_gates_fwd_par(Dims d, FwdPtrs p) {
  GatesFwdPar<4>(d, p);
}

// kCluster (and kAuto with few heads): gates_fwd over a cluster of CL CTAs per head, CTA r owning
// chunks [r·per, (r+1)·per). Sweep 1: its warps compute those chunks' totals (g, r) into its
// shared copy of the per-chunk arrays; after a cluster barrier every CTA copies the lower ranks'
// totals (distributed shared memory, all threads at once) and thread 0 runs the max-plus
// recurrence from chunk 0 (the same float operations in the same order as mlstm_gates_fwd_par,
// so m_k are bit-identical); sweep 2 recomputes its chunks (a few KB of loads) and writes b_t,
// m_t, E_t as the par kernel does. The 7B layout (8 heads) ran on 8 SMs for 0.028 ms (H200).
constexpr int kGateFwdClWarps = 8;
constexpr int kGateFwdClMaxChunks = 1024;  // NC above this: the par kernel

template <int kPer>
__device__ __forceinline__ void GatesFwdCluster(Dims d, FwdPtrs p) {
  constexpr bool kHalves = kPer == 8;
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  __shared__ float gall[kGateFwdClMaxChunks], rall[kGateFwdClMaxChunks];
  __shared__ float mprev[kGateFwdClMaxChunks + 1];
  const int CL = static_cast<int>(cluster.num_blocks());
  const int rank = static_cast<int>(cluster.block_rank());
  const int bh = blockIdx.y, b = bh / d.NH, hd = bh % d.NH;
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const int per = (d.NC + CL - 1) / CL;
  const int k0 = min(d.NC, rank * per), k1 = min(d.NC, k0 + per), n = k1 - k0;
  for (int i = w; i < n; i += kGateFwdClWarps) {
    const ChunkGateLocalT<kPer> c = ChunkGates<kPer>(d, p, b, hd, k0 + i, lane);
    if (lane == 0) {
      gall[k0 + i] = c.g;
      rall[k0 + i] = c.r;
    }
  }
  cluster.sync();
  for (int k = threadIdx.x; k < k0; k += blockDim.x) {  // the lower ranks' totals
    const int owner = k / per;
    gall[k] = *cluster.map_shared_rank(&gall[k], owner);
    rall[k] = *cluster.map_shared_rank(&rall[k], owner);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float m = p.m0 != nullptr && p.c0 != nullptr ? p.m0[bh] : 0.f;
    float* mk = p.smk + static_cast<int64_t>(bh) * (d.NC + 1);
    if (!kHalves && rank == 0) mk[0] = m;
    for (int k = 0; k < k0; ++k) m = gall[k] + fmaxf(m, rall[k]);
    for (int i = 0; i < n; ++i) {
      mprev[i] = m;
      const float mn = gall[k0 + i] + fmaxf(m, rall[k0 + i]);
      if constexpr (kHalves) {
        if (k0 + i + 1 == d.NC) mk[d.NC] = mn;  // (m_k + g0 of every chunk: ChunkGatesWrite)
      } else {
        mk[k0 + i + 1] = mn;
      }
      p.decay[static_cast<int64_t>(bh) * d.NC + k0 + i] = __expf(gall[k0 + i] + m - mn);
      m = mn;
    }
    mprev[n] = m;
    if (n > 0 && k1 == d.NC && p.m_out != nullptr && p.c_out != nullptr) p.m_out[bh] = m;
  }
  cluster.sync();  // mprev visible; no CTA leaves while another still reads its totals
  for (int i = w; i < n; i += kGateFwdClWarps) {
    const ChunkGateLocalT<kPer> c = ChunkGates<kPer>(d, p, b, hd, k0 + i, lane);
    ChunkGatesWrite(d, p, bh, c, mprev[i], mprev[i + 1], lane);
  }
}
__global__ void __launch_bounds__(32 * kGateFwdClWarps) mlstm_gates_fwd_cluster(Dims d, FwdPtrs p) {
  GatesFwdCluster<4>(d, p);
}

// Chunk 256 (8 tokens per lane): the same bodies with kPer-token lane arrays. kSequential is not
// offered at chunk 256 (MlstmCheck).
template <int kPer>
__global__ void __launch_bounds__(32 * kGateFwdWarps) mlstm_gates_fwd_par_wide(Dims d, FwdPtrs p) {
  GatesFwdPar<kPer>(d, p);
}
template <int kPer>
__global__ void __launch_bounds__(32 * kGateFwdClWarps) mlstm_gates_fwd_cluster_wide(Dims d, FwdPtrs p) {
  GatesFwdCluster<kPer>(d, p);
}

// ---------------------------------------------------------------- 2. state_fwd

// Stores a warp's 16×(8·NT) fp32 accumulator tile (rows a, cols j) as bf16 into dst (row stride ld).
template <int NT>
__device__ __forceinline__ void StoreAccBf16(bf16* dst, int64_t ld, const float (&acc)[NT][4],
                                             int lane) {
  const int g = lane >> 2, c = lane & 3;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int col = nt * 8 + 2 * c;
    *reinterpret_cast<uint32_t*>(dst + g * ld + col) = PackBf16(acc[nt][0], acc[nt][1]);
    *reinterpret_cast<uint32_t*>(dst + (g + 8) * ld + col) = PackBf16(acc[nt][2], acc[nt][3]);
  }
}
// hi = bf16(x), lo = bf16(x − hi): hi + lo carries ~16 mantissa bits (relative error ≤ 2^-17).
__device__ __forceinline__ void SplitPack(float x, float y, uint32_t& hi, uint32_t& lo) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
  const float2 hf = __bfloat1622float2(h);
  hi = *reinterpret_cast<const uint32_t*>(&h);
  lo = PackBf16(x - hf.x, y - hf.y);
}
// StoreAccBf16 into dst, and when lo_dst is not null the lo parts into lo_dst (same layout).
template <int NT>
__device__ __forceinline__ void StoreAccSplit(bf16* dst, bf16* lo_dst, int64_t ld,
                                              const float (&acc)[NT][4], int lane) {
  if (lo_dst == nullptr) {
    StoreAccBf16(dst, ld, acc, lane);
    return;
  }
  const int g = lane >> 2, c = lane & 3;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int col = nt * 8 + 2 * c;
    uint32_t hi, lo;
    SplitPack(acc[nt][0], acc[nt][1], hi, lo);
    *reinterpret_cast<uint32_t*>(dst + g * ld + col) = hi;
    *reinterpret_cast<uint32_t*>(lo_dst + g * ld + col) = lo;
    SplitPack(acc[nt][2], acc[nt][3], hi, lo);
    *reinterpret_cast<uint32_t*>(dst + (g + 8) * ld + col) = hi;
    *reinterpret_cast<uint32_t*>(lo_dst + (g + 8) * ld + col) = lo;
  }
}
template <int NT>
__device__ __forceinline__ void StoreAccF32(float* dst, int64_t ld, const float (&acc)[NT][4],
                                            int lane) {
  const int g = lane >> 2, c = lane & 3;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int col = nt * 8 + 2 * c;
    *reinterpret_cast<float2*>(dst + g * ld + col) = make_float2(acc[nt][0], acc[nt][1]);
    *reinterpret_cast<float2*>(dst + (g + 8) * ld + col) = make_float2(acc[nt][2], acc[nt][3]);
  }
}
template <int NT>
__device__ __forceinline__ void LoadAccF32(const float* src, int64_t ld, float (&acc)[NT][4],
                                           int lane) {
  const int g = lane >> 2, c = lane & 3;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int col = nt * 8 + 2 * c;
    const float2 x = *reinterpret_cast<const float2*>(src + g * ld + col);
    const float2 y = *reinterpret_cast<const float2*>(src + (g + 8) * ld + col);
    acc[nt][0] = x.x;
    acc[nt][1] = x.y;
    acc[nt][2] = y.x;
    acc[nt][3] = y.y;
  }
}

// StoreAccStaged through one 16-row buffer of the warp: hi first, then (glo not null) lo.
template <int NT>
__device__ __forceinline__ void StoreAccStagedTwoRounds(bf16* gdst, bf16* glo, int64_t ld,
                                                        const float (&acc)[NT][4], bf16* buf,
                                                        int lane) {
  constexpr int kCols = NT * 8, kS = kCols + kPad, kPieces = kCols / 8;
  const int g = lane >> 2, c = lane & 3;
#pragma unroll
  for (int round = 0; round < 2; ++round) {
    bf16* dst = round == 0 ? gdst : glo;
    if (dst == nullptr) break;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int col = nt * 8 + 2 * c;
      uint32_t hi, lo;
      SplitPack(acc[nt][0], acc[nt][1], hi, lo);
      *reinterpret_cast<uint32_t*>(buf + g * kS + col) = round == 0 ? hi : lo;
      SplitPack(acc[nt][2], acc[nt][3], hi, lo);
      *reinterpret_cast<uint32_t*>(buf + (g + 8) * kS + col) = round == 0 ? hi : lo;
    }
    __syncwarp();
#pragma unroll
    for (int i = lane; i < 16 * kPieces; i += 32) {
      const int row = i / kPieces, c8 = (i % kPieces) * 8;
      *reinterpret_cast<uint4*>(dst + row * ld + c8) =
          *reinterpret_cast<const uint4*>(buf + row * kS + c8);
    }
    __syncwarp();
  }
}

// Coalesced store of a warp's 16×(8·NT) accumulator tile as bf16 (and its lo parts when glo is
// not null): the fragments go to shared staging rows first (hi_s, lo_s: 16 rows of stride
// 8·NT + kPad, owned by this warp), then every lane writes whole 16-byte pieces of rows. The
// direct fragment stores (StoreAccSplit) write 4 bytes per lane, 8 rows per instruction; at the
// state kernels' one tile per chunk that cost ~0.1 ms per plane at the bench shapes (H200).
template <int NT>
__device__ __forceinline__ void StoreAccStaged(bf16* gdst, bf16* glo, int64_t ld,
                                               const float (&acc)[NT][4], bf16* hi_s, bf16* lo_s,
                                               int lane, int valid_rows = 16) {
  constexpr int kCols = NT * 8, kS = kCols + kPad, kPieces = kCols / 8;
  const int g = lane >> 2, c = lane & 3;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int col = nt * 8 + 2 * c;
    uint32_t hi, lo;
    SplitPack(acc[nt][0], acc[nt][1], hi, lo);
    *reinterpret_cast<uint32_t*>(hi_s + g * kS + col) = hi;
    if (glo != nullptr) *reinterpret_cast<uint32_t*>(lo_s + g * kS + col) = lo;
    SplitPack(acc[nt][2], acc[nt][3], hi, lo);
    *reinterpret_cast<uint32_t*>(hi_s + (g + 8) * kS + col) = hi;
    if (glo != nullptr) *reinterpret_cast<uint32_t*>(lo_s + (g + 8) * kS + col) = lo;
  }
  __syncwarp();
#pragma unroll
  for (int i = lane; i < 16 * kPieces; i += 32) {
    const int row = i / kPieces, c8 = (i % kPieces) * 8;
    if (row >= valid_rows) continue;
    *reinterpret_cast<uint4*>(gdst + row * ld + c8) =
        *reinterpret_cast<const uint4*>(hi_s + row * kS + c8);
    if (glo != nullptr) {
      *reinterpret_cast<uint4*>(glo + row * ld + c8) =
          *reinterpret_cast<const uint4*>(lo_s + row * kS + c8);
    }
  }
}

// A block of the state recurrences owns a TM (dk rows) × TN (dv columns) tile of C for one
// head: TM/16 warps, warp w owns rows 16w..16w+15, 2·TM threads. 64×64 (the first version) or
// 128×128 (MlstmOptions::state_tile): the larger tile reads K and V half as often (the
// recurrences are bound by re-reading them once per tile) at the price of 4x fewer blocks.
// Three stages of (K, V) / (Q, dH) tiles: chunk k multiplies while k+1 and k+2 are in flight
// (a chunk step is only ~3.3 µs at the 7B-heads shape). Together with the register weights
// below this took the 7B state kernels from 0.30 + 0.28 to 0.21 + 0.26 ms on an H200
// (bench/RESULTS.md); the two changes were not measured separately. 64×64 at L 128: 109 KB,
// two blocks per SM, so the 256 blocks of the 7B-heads shape are all resident.
template <int L, int TM, int TN>
struct StateSmem {
  static constexpr int kStages = 3;
  static constexpr int kThreads = 2 * TM;
  static constexpr int kSA = TM + kPad;  // K / q tile [L][TM+8]
  static constexpr int kSB = TN + kPad;  // V / dh tile [L][TN+8]
  static constexpr int kTileA = L * kSA;
  static constexpr int kTileB = L * kSB;
  // C_k / dC_k are staged (StoreAccStaged) in the stage about to be refilled, A (hi) and B (lo)
  // tiles: TM rows of stride TN + kPad must fit in each.
  static constexpr bool kStaged = TM == TN && L >= TM;
  // L < TM (e.g. 128×128 tiles at chunk 64): the refill stage's A and B tiles together hold 2L
  // rows; warp w stages its 16 rows in row 16w of A (16w < L) or of B, hi first, then lo. The
  // unstaged fragment stores made both state kernels 3.5x slower at chunk 64 (xlstm-125m cell:
  // 1.70 vs 0.47 ms at chunk 128, H200; bench/RESULTS.md helper mlstm5).
  static constexpr bool kStaged2 = TM == TN && !kStaged && 2 * L >= TM;
  static constexpr bool kStagedAny = kStaged || kStaged2;
  static constexpr size_t kBytes = kStages * (kTileA + kTileB) * 2  // bf16 tiles
                                   + 2 * L * 4                      // per-token coefficients
                                   + 1024;  // unused: the alignment slack of the deleted
                                                     // warpgroup variant, kept so the launch sizes
                                                     // stay as measured
};

// An A fragment (16 m × 16 k from LoadA / LoadAT at k0) with column k scaled by w[k0 + k], as
// bf16 hi + lo pairs (hi + lo carries ~16 mantissa bits of the fp32 product). The lane holds
// k = 2c, 2c+1 in a[0], a[1] and 2c+8, 2c+9 in a[2], a[3] (c = lane % 4). This puts the per-token
// weights of the state updates (E_t, G_t/den_t, ...) on the small A operand in registers,
// instead of a pass over the V / dH tile in shared memory (+ one barrier) per chunk.
// Why hi + lo and not one bf16: rounding E_t k_t perturbs k inside C but not in the backward's
// k·dk, and df̃ = F + Σ_{t≥r}(q·dq − k·dk) cancels over long suffixes: with hi only, the TFLA-
// convention df̃ of the gates ±30 / S 8200 test cases went from 1.7e-2 / 1.2e-2 (V·E rounded,
// the previous kernels) to 2.0e-2 / 2.8e-2 (H100, 2026-11-26). With hi + lo (one more MMA per
// product) the weighted operand is exact to ~2^-17 and V / dH are not rounded at all. The
// normaliser sums n, dn use the same pairs (dden changes sign from token to token, so
// dn = Σ_t ddc_t q_t can cancel).
__device__ __forceinline__ void ScaleAKSplit(uint32_t (&hi)[4], uint32_t (&lo)[4],
                                             const uint32_t (&a)[4], const float* w, int k0,
                                             int lane) {
  const int c = 2 * (lane & 3);
  const float2 wl = *reinterpret_cast<const float2*>(w + k0 + c);
  const float2 wh = *reinterpret_cast<const float2*>(w + k0 + c + 8);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 s = i < 2 ? wl : wh;
    const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&a[i]));
    SplitPack(f.x * s.x, f.y * s.y, hi[i], lo[i]);
  }
}
// B operand of all ones (bf16 1.0 = 0x3F80): an MMA with it sums the A fragment's rows, which is
// how the state kernels get n = Σ_t w_t k_t (and dn) from the already scaled A fragments.
constexpr uint32_t kOnesBf16x2 = 0x3F803F80u;

// The normaliser rows of a warp's 16 rows live in an MMA accumulator (all columns equal):
// row g in nacc[0] (= nacc[1]), row g + 8 in nacc[2] (= nacc[3]); lanes with lane % 4 == 0 write.
__device__ __forceinline__ void LoadNAcc(float (&nacc)[4], const float* src, int lane) {
  const int g = lane >> 2;
  nacc[0] = nacc[1] = src[g];
  nacc[2] = nacc[3] = src[g + 8];
}
__device__ __forceinline__ void StoreNAcc(float* dst, const float (&nacc)[4], int lane) {
  if ((lane & 3) != 0) return;
  const int g = lane >> 2;
  dst[g] = nacc[0];
  dst[g + 8] = nacc[2];
}

template <int L, int TM, int TN>
__global__ void __launch_bounds__(2 * TM) mlstm_state_fwd(Dims d, FwdPtrs p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  using SM = StateSmem<L, TM, TN>;
  constexpr int kNT = TN / 8, kThreads = SM::kThreads, kSt = SM::kStages;
  bf16* ks = reinterpret_cast<bf16*>(smem_raw);  // [3][L][TM+8]
  bf16* vs = ks + kSt * SM::kTileA;              // [3][L][TN+8]
  float* es = reinterpret_cast<float*>(vs + kSt * SM::kTileB);  // [L]
  const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5;
  const int j0 = blockIdx.x * TN, a0 = blockIdx.y * TM, bh = blockIdx.z;
  const int b = bh / d.NH, hd = bh % d.NH;
  const bool n_block = blockIdx.x == 0;
  const int64_t ldqk = static_cast<int64_t>(d.NH) * d.DK, ldv = static_cast<int64_t>(d.NH) * d.DV;
  const bf16* kbase = p.k + (static_cast<int64_t>(b) * d.S * d.NH + hd) * d.DK + a0;
  const bf16* vbase = p.v + (static_cast<int64_t>(b) * d.S * d.NH + hd) * d.DV + j0;
  const int row0 = a0 + 16 * w;  // this warp's first row of C / n
  float acc[kNT][4];
  if (p.c0 != nullptr) {
    LoadAccF32(p.c0 + (static_cast<int64_t>(bh) * d.DK + row0) * d.DV + j0, d.DV, acc, lane);
  } else {
#pragma unroll
    for (int i = 0; i < kNT; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  }
  float nacc[4] = {0.f, 0.f, 0.f, 0.f};
  if (n_block && p.c0 != nullptr) LoadNAcc(nacc, p.n0 + static_cast<int64_t>(bh) * d.DK + row0, lane);

  auto prefetch = [&](int k, int stage) {  // always commits a group (empty past the end)
    if (k < d.NC) {
      const int t0 = k * L, len = min(L, d.S - t0);
      LoadTile<L, TM>(ks + stage * SM::kTileA, SM::kSA, kbase + t0 * ldqk, ldqk, len, tid, kThreads);
      LoadTile<L, TN>(vs + stage * SM::kTileB, SM::kSB, vbase + t0 * ldv, ldv, len, tid, kThreads);
    }
    CpAsyncCommit();
  };
  prefetch(0, 0);
  prefetch(1, 1);
  for (int k = 0; k < d.NC; ++k) {
    const int stage = k % kSt, refill = (k + 2) % kSt;
    const int t0 = k * L, len = min(L, d.S - t0);
    const int64_t coff = ((static_cast<int64_t>(bh) * (d.NC + 1) + k) * d.DK + row0) * d.DV + j0;
    // Coefficients precomputed by gates_fwd; loads issued before the tile wait.
    const float decay = p.decay[static_cast<int64_t>(bh) * d.NC + k];
    const float e_reg = tid < len ? p.e_tok[static_cast<int64_t>(bh) * d.S + t0 + tid] : 0.f;
    if constexpr (SM::kStaged) {
      // The refill stage is idle here (last read in step k−1, before its final barrier; refilled
      // only after this step's first barrier): stage C_k there.
      StoreAccStaged(p.sc + coff, d.split ? p.sc_lo + coff : nullptr, d.DV, acc,
                     ks + refill * SM::kTileA + 16 * w * SM::kSB,
                     vs + refill * SM::kTileB + 16 * w * SM::kSB, lane);
    } else if constexpr (SM::kStaged2) {
      bf16* buf = 16 * w < L ? ks + refill * SM::kTileA + 16 * w * SM::kSB
                             : vs + refill * SM::kTileB + (16 * w - L) * SM::kSB;
      StoreAccStagedTwoRounds(p.sc + coff, d.split ? p.sc_lo + coff : nullptr, d.DV, acc, buf, lane);
    } else {
      StoreAccSplit(p.sc + coff, d.split ? p.sc_lo + coff : nullptr, d.DV, acc, lane);
    }
    if (n_block) StoreNAcc(p.sn + (static_cast<int64_t>(bh) * (d.NC + 1) + k) * d.DK + row0, nacc, lane);
    if constexpr (SM::kStagedAny) {
      CpAsyncWait<1>();  // groups 0..k+1 committed: chunk k has landed
    } else {
      prefetch(k + 2, refill);
      CpAsyncWait<2>();
    }
    if (tid < L) es[tid] = e_reg;
    __syncthreads();  // tile k and es visible; every warp's staging reads done
    if constexpr (SM::kStagedAny) prefetch(k + 2, refill);
    const bf16* vst = vs + stage * SM::kTileB;
    const bf16* kst = ks + stage * SM::kTileA;
#pragma unroll
    for (int i = 0; i < kNT; ++i) {
      acc[i][0] *= decay;
      acc[i][1] *= decay;
      acc[i][2] *= decay;
      acc[i][3] *= decay;
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) nacc[i] *= decay;
    // C_{k+1} = decay·C_k + (Kᵀ diag(E)) V, n_{k+1} = decay·n_k + (Kᵀ diag(E)) 1.
#pragma unroll
    for (int kk = 0; kk < L / 16; ++kk) {
      uint32_t a[4], ae[4], elo[4];
      LoadAT(a, kst, SM::kSA, 16 * w, 16 * kk, lane);
      ScaleAKSplit(ae, elo, a, es, 16 * kk, lane);
      if (n_block) Mma(nacc, ae, kOnesBf16x2, kOnesBf16x2);
      // Two column tiles at a time, hi products before lo: an MMA into the same accumulator
      // follows 4 MMAs later instead of 2 (see MmaPairs).
#pragma unroll
      for (int np = 0; np < TN / 16; np += 2) {
        uint32_t b0[4], b1[4];
        LoadBKN(b0, vst, SM::kSB, 16 * np, 16 * kk, lane);
        LoadBKN(b1, vst, SM::kSB, 16 * np + 16, 16 * kk, lane);
        MmaPairs(acc, 2 * np, ae, b0, b1);
        if (d.fwd_wlo) MmaPairs(acc, 2 * np, elo, b0, b1);  // lo half of E_t k_t: exact to ~2^-17
      }
      if (n_block) Mma(nacc, elo, kOnesBf16x2, kOnesBf16x2);
    }
    __syncthreads();  // the next step stages into / refills the stage read here; es rewritten
  }
  const int64_t last = (static_cast<int64_t>(bh) * (d.NC + 1) + d.NC);
  const int64_t clast = (last * d.DK + row0) * d.DV + j0;
  StoreAccSplit(p.sc + clast, d.split ? p.sc_lo + clast : nullptr, d.DV, acc, lane);
  StoreAccF32(p.sc_last + (static_cast<int64_t>(bh) * d.DK + row0) * d.DV + j0, d.DV, acc, lane);
  if (p.c_out != nullptr) {
    StoreAccF32(p.c_out + (static_cast<int64_t>(bh) * d.DK + row0) * d.DV + j0, d.DV, acc, lane);
  }
  if (n_block) {
    StoreNAcc(p.sn + last * d.DK + row0, nacc, lane);
    if (p.c_out != nullptr) StoreNAcc(p.n_out + static_cast<int64_t>(bh) * d.DK + row0, nacc, lane);
  }
}


// state_fwd with a TMA producer (helper mlstm10; the default since session 8, the only kernel at
// L 128 with 128×128 state tiles since the warpgroup cp.async kernel it replaced was deleted
// after losing, 0.449 -> 0.383 ms at the 125m cell on an H100). The same recurrence and products (Kᵀ diag(E) as hi + lo register-A
// fragments, V N-major in shared memory, 16 RS wgmma per chunk; n by mma.sync with the ones
// operand), with:
//  - 384 threads: warpgroup 0 produces (one thread issues K and V of chunk k as four TMA boxes
//    [128 tokens][64 columns], zeros past the sequence end, onto stage k % 2's "full" mbarrier);
//    warpgroups 1-2 consume and release the stage (one arrival per warp) once its wgmma retired;
//  - C_k hi / lo leave by TMA stores: each consumer warp writes its 16 rows into its own
//    swizzled 8 KB staging area and one lane issues four [16][64] boxes (bulk async-group); the
//    area is reused one chunk later after cp.async.bulk.wait_group.read (a whole chunk of work
//    in between) instead of the default's st.shared / ld.shared / st.global pass under a block
//    barrier (ncu, session 6: lg_throttle 13% of the warps' cycles);
//  - E_t read from global into registers per warp (no shared vector, no block barrier at all in
//    the chunk loop).
// K is swizzled (TMA), so Kᵀ's fragments come from ldmatrix.trans at swizzled addresses. Shared
// memory: 2 stages × 64 KB + 64 KB staging (3 stages do not fit beside the staging area).
struct StateWsMaps {
  CUtensorMap k, v;        // 4-d (columns, heads, tokens, batch), box 64 × 1 × 128 × 1
  CUtensorMap c, c_lo;     // 2-d (dv, rows of [BH][NC+1][dk]), box 64 × 16 (stores)
};
struct StateWsSmem {
  static constexpr int kTile64 = 128 * 128;       // [128 rows][64 cols] bf16
  static constexpr int kStage = 4 * kTile64;      // K (two column blocks), V (two)
  static constexpr int kOffV = 2 * kTile64;
  static constexpr int kStaging = 2 * kStage;     // 8 warps × 8 KB: hi, lo × two [16][64] boxes
  static constexpr int kBars = kStaging + 8 * 8192;
  // + 4 mbarriers (padded to 64 bytes) + state_bwd_ws's coef / ddc stages (2 × 2 × 128 floats).
  static constexpr size_t kBytes = kBars + 64 + 4 * 128 * 4 + 1024;
};

// Kᵀ's A fragment (16 m = dk rows × 16 k = tokens at (m0, k0)) from a swizzled [128 t][128 dk]
// tile (two [128][64] column blocks): LoadAT's addresses through Sw128ChunkOffset.
__device__ __forceinline__ void LoadATSw(uint32_t (&a)[4], const unsigned char* s, int m0, int k0,
                                         int lane) {
  const int j = lane >> 3;
  const int t = k0 + (lane & 7) + 8 * (j >> 1), col = m0 + 8 * (j & 1);
  Ldsm4T(a, s + hopper::Sw128ChunkOffset<128>(t, col / 8));
}
// ScaleAKSplit with the four weights (tokens k0 + 2c, +1, +8, +9) given.
__device__ __forceinline__ void ScaleAKSplitW(uint32_t (&hi)[4], uint32_t (&lo)[4],
                                              const uint32_t (&a)[4], const float (&w)[4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float w0 = i < 2 ? w[0] : w[2], w1 = i < 2 ? w[1] : w[3];
    const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&a[i]));
    SplitPack(f.x * w0, f.y * w1, hi[i], lo[i]);
  }
}

// kSub: 128-token steps per chunk. 1 = chunk 128 (mlstm_state_fwd_ws); 2 = chunk 256
// (mlstm_state_fwd_ws_l256): the loop walks 128-token steps as before, but C_k / n_k leave and
// the decay applies only at a chunk's first step; E_t (the gate scan's, relative to the 256-token
// chunk's end) weights both halves, so C_{k+1} = decay·C_k + Σ_{both halves} Kᵀ diag(E) V. Half
// the C_k stores of chunk 128 (the point of chunk 256), the same loads and products.
template <int kSub>
__device__ __forceinline__ void StateFwdWs(const Dims& d, const FwdPtrs& p, const StateWsMaps& maps) {
  using namespace hopper;
  using SM = StateWsSmem;
  constexpr int L = 128, kNT = 16;
  const int nsteps = kSub == 1 ? d.NC : (d.S + L - 1) / L;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* sm = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  const uint32_t sa = SmemAddr(sm);
  const uint32_t full = sa + SM::kBars, empty = full + 16;
  const int j0 = blockIdx.x * 128, a0 = blockIdx.y * 128, bh = blockIdx.z;
  const int b = bh / d.NH, hd = bh % d.NH;
  if (threadIdx.x == 0) {
    for (int i = 0; i < 2; ++i) {
      MbInit(full + 8 * i, 1);
      MbInit(empty + 8 * i, 8);
    }
    MbInitFence();
  }
  __syncthreads();

  if (threadIdx.x < 128) {  // producer warpgroup: one thread issues all loads
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    if (threadIdx.x == 0) {
      for (int k = 0; k < nsteps; ++k) {
        const int slot = k & 1, use = k >> 1;
        if (use > 0) MbWait(empty + 8 * slot, (use - 1) & 1);
        const uint32_t st = sa + slot * SM::kStage, fb = full + 8 * slot;
        MbArriveExpectTx(fb, SM::kStage);
        TmaTile4d(st, &maps.k, fb, a0, hd, k * L, b);
        TmaTile4d(st + SM::kTile64, &maps.k, fb, a0 + 64, hd, k * L, b);
        TmaTile4d(st + SM::kOffV, &maps.v, fb, j0, hd, k * L, b);
        TmaTile4d(st + SM::kOffV + SM::kTile64, &maps.v, fb, j0 + 64, hd, k * L, b);
      }
    }
    return;
  }

  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
  const int tid = threadIdx.x - 128, lane = tid & 31, w = tid >> 5, g = lane >> 2, c = lane & 3;
  const bool n_block = blockIdx.x == 0;
  const int row0 = a0 + 16 * w;  // this warp's first row of C / n
  float acc[kNT][4];
  if (p.c0 != nullptr) {
    LoadAccF32(p.c0 + (static_cast<int64_t>(bh) * d.DK + row0) * d.DV + j0, d.DV, acc, lane);
  } else {
#pragma unroll
    for (int i = 0; i < kNT; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  }
  float nacc[4] = {0.f, 0.f, 0.f, 0.f};
  if (n_block && p.c0 != nullptr) LoadNAcc(nacc, p.n0 + static_cast<int64_t>(bh) * d.DK + row0, lane);
  unsigned char* stg = sm + SM::kStaging + w * 8192;  // hi cols 0-63, 64-127, lo 0-63, 64-127
  const uint32_t stg_a = SmemAddr(stg);
  int slot = 0, phase = 0;
  for (int k = 0; k < nsteps; ++k) {
    const int t0 = k * L, len = min(L, d.S - t0);
    const int kc = kSub == 1 ? k : k >> 1;  // chunk of this step
    const bool first = kSub == 1 || (k & 1) == 0;  // the chunk's first step: C_kc out, decay
    const float decay = p.decay[static_cast<int64_t>(bh) * d.NC + kc];
    // E_t of the 32 tokens this lane's A fragments need (zero past the chunk's end).
    float ew[L / 16][4];
    const float* e_tok = p.e_tok + static_cast<int64_t>(bh) * d.S + t0;
#pragma unroll
    for (int kk = 0; kk < L / 16; ++kk) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int t = 16 * kk + 2 * c + (i & 1) + 8 * (i >> 1);
        ew[kk][i] = t < len ? e_tok[t] : 0.f;
      }
    }
    // C_k out: stage this warp's 16 rows (hi, lo) swizzled, then four TMA box stores.
    if (first) {
      if (lane == 0) BulkWaitRead<0>();  // chunk k − 1's boxes have been read
      __syncwarp();
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
        uint32_t hi0, lo0, hi1, lo1;
        SplitPack(acc[nt][0], acc[nt][1], hi0, lo0);
        SplitPack(acc[nt][2], acc[nt][3], hi1, lo1);
        const int col = nt * 8 + 2 * c, blk = col / 64, ch = (col % 64) / 8;
        const int o0 = blk * 2048 + g * 128 + ((ch ^ g) * 16) + (col % 8) * 2;
        const int o1 = blk * 2048 + (g + 8) * 128 + ((ch ^ g) * 16) + (col % 8) * 2;  // (g+8)%8 = g
        *reinterpret_cast<uint32_t*>(stg + o0) = hi0;
        *reinterpret_cast<uint32_t*>(stg + o1) = hi1;
        *reinterpret_cast<uint32_t*>(stg + 4096 + o0) = lo0;
        *reinterpret_cast<uint32_t*>(stg + 4096 + o1) = lo1;
      }
      FenceProxyAsync();
      __syncwarp();
      if (lane == 0) {
        const int crow = (bh * (d.NC + 1) + kc) * d.DK + row0;
        TmaStore2d(&maps.c, stg_a, j0, crow);
        TmaStore2d(&maps.c, stg_a + 2048, j0 + 64, crow);
        if (d.split) {
          TmaStore2d(&maps.c_lo, stg_a + 4096, j0, crow);
          TmaStore2d(&maps.c_lo, stg_a + 6144, j0 + 64, crow);
        }
        BulkCommit();
      }
      if (n_block) StoreNAcc(p.sn + (static_cast<int64_t>(bh) * (d.NC + 1) + kc) * d.DK + row0, nacc, lane);
    }

    MbWait(full + 8 * slot, phase);
    const unsigned char* kst = sm + slot * SM::kStage;
    if (first) {
#pragma unroll
      for (int i = 0; i < kNT; ++i) {
        acc[i][0] *= decay;
        acc[i][1] *= decay;
        acc[i][2] *= decay;
        acc[i][3] *= decay;
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) nacc[i] *= decay;
    }
    // C_{k+1} = decay·C_k + (Kᵀ diag(E)) V, n_{k+1} = decay·n_k + (Kᵀ diag(E)) 1 (as the default).
    uint32_t ae[L / 16][4], elo[L / 16][4];
#pragma unroll
    for (int kk = 0; kk < L / 16; ++kk) {
      uint32_t a[4];
      LoadATSw(a, kst, 16 * w, 16 * kk, lane);
      ScaleAKSplitW(ae[kk], elo[kk], a, ew[kk]);
      if (n_block) {
        Mma(nacc, ae[kk], kOnesBf16x2, kOnesBf16x2);
        Mma(nacc, elo[kk], kOnesBf16x2, kOnesBf16x2);
      }
    }
    const uint64_t v_d = SmemDescSw128(sa + slot * SM::kStage + SM::kOffV, SM::kTile64, 1024);
    if (!d.fwd_wlo) {  // (unconditional lo wgmmas, see mlstm_state_fwd)
#pragma unroll
      for (int kk = 0; kk < L / 16; ++kk) elo[kk][0] = elo[kk][1] = elo[kk][2] = elo[kk][3] = 0u;
    }
    FenceRegs(ae);
    FenceRegs(elo);
    FenceRegs(acc);
    WgmmaFence();
#pragma unroll
    for (int kk = 0; kk < L / 16; ++kk) {
      WgmmaRS128<1>(acc, ae[kk], v_d + ((kk * 16 * 128) >> 4));
      WgmmaRS128<1>(acc, elo[kk], v_d + ((kk * 16 * 128) >> 4));
    }
    WgmmaCommit();
    WgmmaWait<0>();
    FenceRegs(acc);
    FenceRegs(ae);
    FenceRegs(elo);
    __syncwarp();
    if (lane == 0) MbArrive(empty + 8 * slot);  // K (ldmatrix) and V (wgmma) reads are done
    if (++slot == 2) {
      slot = 0;
      phase ^= 1;
    }
  }
  const int64_t last = (static_cast<int64_t>(bh) * (d.NC + 1) + d.NC);
  const int64_t clast = (last * d.DK + row0) * d.DV + j0;
  StoreAccSplit(p.sc + clast, d.split ? p.sc_lo + clast : nullptr, d.DV, acc, lane);
  StoreAccF32(p.sc_last + (static_cast<int64_t>(bh) * d.DK + row0) * d.DV + j0, d.DV, acc, lane);
  if (p.c_out != nullptr) {
    StoreAccF32(p.c_out + (static_cast<int64_t>(bh) * d.DK + row0) * d.DV + j0, d.DV, acc, lane);
  }
  if (n_block) {
    StoreNAcc(p.sn + last * d.DK + row0, nacc, lane);
    if (p.c_out != nullptr) StoreNAcc(p.n_out + static_cast<int64_t>(bh) * d.DK + row0, nacc, lane);
  }
  if (lane == 0) BulkWait<0>();  // the staging areas stay valid until every box was stored
}
__global__ void __launch_bounds__(384, 1)
    mlstm_state_fwd_ws(Dims d, FwdPtrs p, const __grid_constant__ StateWsMaps maps) {
  StateFwdWs<1>(d, p, maps);
}
__global__ void __launch_bounds__(384, 1)
    mlstm_state_fwd_ws_l256(Dims d, FwdPtrs p, const __grid_constant__ StateWsMaps maps) {
  StateFwdWs<2>(d, p, maps);
}
// ---------------------------------------------------------------- 3. fwd_out

// Warp -> 16-row tile of the chunk in the causal kernels fwd_out and bwd_dqk. The
// four SM sub-partitions (schedulers, tensor cores) take warps by warp index % 4, so warps w and
// w + 4 share one. The causal products give row tile i work proportional to i + 1 (fwd_out,
// bwd_dqk's dP and dQ) or L/16 − i (bwd_dv, bwd_dqk's dK): with the identity map the sub-partition
// of warps 3 and 7 does 12 units of P·V against 6 for warps 0 and 4, and every barrier waits for
// it. With 8 warps (L 128), pairing tiles i and 7 − i on one sub-partition gives each 9.
// Measured with the q·n_k MMA below (H100, bench/RESULTS.md helper mlstm6): fwd_out 0.831 ->
// 0.768 ms, bwd_dqk 1.186 -> 1.158 at the xlstm-125m cell; bwd_dv got 2-4% slower, so it keeps
// the identity map.
template <int NW>
__device__ __forceinline__ int RowTile(int warp) {
  if constexpr (NW == 8) {
    return warp < 4 ? warp : 11 - warp;
  } else {
    return warp;
  }
}

// Two stages of (Q, K, C_k [, C_k lo]) dk-tiles (the next one loads while this one
// multiplies), one V slab.
template <int L, int DVT, bool SPLIT>
struct OutSmem {
  static constexpr int kS64 = 64 + kPad;
  static constexpr int kSV = DVT + kPad;
  static constexpr int kStage = 2 * L * kS64 + (SPLIT ? 2 : 1) * 64 * kSV;  // Q, K [L][72]; C
  static constexpr int kV = 2 * kStage;                   // [L][DVT+8]
  static constexpr int kEnd = kV + L * kSV;               // bf16 elements
  static size_t Bytes(int dk) { return kEnd * 2 + (3 * L + dk) * 4; }
  static_assert(L * kSV <= kStage, "h lo staging rows must fit in stage 0");
};

template <int L, int DVT, bool SPLIT>
__global__ void __launch_bounds__(2 * L) mlstm_fwd_out(Dims d, FwdPtrs p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  using SM = OutSmem<L, DVT, SPLIT>;
  bf16* sm = reinterpret_cast<bf16*>(smem_raw);
  bf16* vs = sm + SM::kV;
  float* bs = reinterpret_cast<float*>(sm + SM::kEnd);
  float* igs = bs + L;
  float* ms = igs + L;
  float* nks = ms + L;  // [DK] n_k
  constexpr int kThreads = 2 * L, kNt = L / 8, kHt = DVT / 8;
  const int tid = threadIdx.x, lane = tid & 31, w = RowTile<L / 16>(tid >> 5), g = lane >> 2,
            c = lane & 3;
  const int j0 = blockIdx.x * DVT, k = blockIdx.y, bh = blockIdx.z;
  const int b = bh / d.NH, hd = bh % d.NH;
  const int t0 = k * L, len = min(L, d.S - t0);
  const int64_t ldqk = static_cast<int64_t>(d.NH) * d.DK, ldv = static_cast<int64_t>(d.NH) * d.DV;
  const int64_t tok0 = (static_cast<int64_t>(b) * d.S + t0) * d.NH + hd;  // token (b, t0, hd)
  const bf16* qbase = p.q + tok0 * d.DK;
  const bf16* kbase = p.k + tok0 * d.DK;
  const bf16* vbase = p.v + tok0 * d.DV + j0;
  const int64_t coff = (static_cast<int64_t>(bh) * (d.NC + 1) + k) * d.DK * d.DV + j0;
  const bf16* cbase = p.sc + coff;
  const bf16* clobase = SPLIT ? p.sc_lo + coff : nullptr;
  const float* nbase = p.sn + (static_cast<int64_t>(bh) * (d.NC + 1) + k) * d.DK;
  const float m_k = p.smk[static_cast<int64_t>(bh) * (d.NC + 1) + k];

  auto load_stage = [&](int dt, int stage) {
    bf16* st = sm + stage * SM::kStage;
    LoadTile<L, 64>(st, SM::kS64, qbase + dt * 64, ldqk, len, tid, kThreads);
    LoadTile<L, 64>(st + L * SM::kS64, SM::kS64, kbase + dt * 64, ldqk, len, tid, kThreads);
    LoadTile<64, DVT>(st + 2 * L * SM::kS64, SM::kSV, cbase + static_cast<int64_t>(dt) * 64 * d.DV,
                      d.DV, 64, tid, kThreads);
    if constexpr (SPLIT) {
      LoadTile<64, DVT>(st + 2 * L * SM::kS64 + 64 * SM::kSV, SM::kSV,
                        clobase + static_cast<int64_t>(dt) * 64 * d.DV, d.DV, 64, tid, kThreads);
    }
    CpAsyncCommit();
  };
  LoadTile<L, DVT>(vs, SM::kSV, vbase, ldv, len, tid, kThreads);
  CpAsyncCommit();
  load_stage(0, 0);
  if (tid < L) {
    const int64_t o = static_cast<int64_t>(bh) * d.S + t0 + tid;
    const bool ok = tid < len;
    bs[tid] = ok ? p.b_tok[o] : 0.f;
    ms[tid] = ok ? p.m_tok[o] : 0.f;
    igs[tid] = ok ? p.ig[tok0 + static_cast<int64_t>(tid) * d.NH] : -INFINITY;
  }
  for (int i = tid; i < d.DK; i += kThreads) nks[i] = nbase[i];

  float sacc[kNt][4], hacc[kHt][4];
#pragma unroll
  for (int i = 0; i < kNt; ++i) sacc[i][0] = sacc[i][1] = sacc[i][2] = sacc[i][3] = 0.f;
#pragma unroll
  for (int i = 0; i < kHt; ++i) hacc[i][0] = hacc[i][1] = hacc[i][2] = hacc[i][3] = 0.f;
  // q̂·n_k of rows 16w + g (qnacc[0]) and 16w + g + 8 (qnacc[2]): Q times an operand whose 8
  // columns all hold n_k as bf16 hi + lo (exact to ~2^-17), two MMAs per 16 dk. Before: a scalar
  // loop of 64 shared-memory loads and FMAs per thread per dk tile, about a third of the
  // shared-memory wavefronts of the dk loop next to its ldmatrix loads.
  float qnacc[4] = {0.f, 0.f, 0.f, 0.f};
  const int ndt = d.DK / 64;
  for (int dt = 0; dt < ndt; ++dt) {
    if (dt + 1 < ndt) {
      load_stage(dt + 1, (dt + 1) & 1);
      CpAsyncWait<1>();
    } else {
      CpAsyncWait<0>();
    }
    __syncthreads();
    const bf16* qs = sm + (dt & 1) * SM::kStage;
    const bf16* ks = qs + L * SM::kS64;
    const bf16* cs = qs + 2 * L * SM::kS64;
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      uint32_t a[4], nhi[2], nlo[2];
      LoadA(a, qs, SM::kS64, 16 * w, 16 * kk, lane);
      {
        const float2 n0 = *reinterpret_cast<const float2*>(nks + dt * 64 + 16 * kk + 2 * c);
        const float2 n8 = *reinterpret_cast<const float2*>(nks + dt * 64 + 16 * kk + 2 * c + 8);
        SplitPack(n0.x, n0.y, nhi[0], nlo[0]);
        SplitPack(n8.x, n8.y, nhi[1], nlo[1]);
        Mma(qnacc, a, nhi[0], nhi[1]);
      }
#pragma unroll
      for (int np = 0; np < L / 16; ++np) {
        if (np <= w) {
          uint32_t bb[4];
          LoadBNK(bb, ks, SM::kS64, 16 * np, 16 * kk, lane);
          Mma(sacc[2 * np], a, bb[0], bb[1]);
          Mma(sacc[2 * np + 1], a, bb[2], bb[3]);
        }
      }
      // Q̂·C_hi over all column tiles, then Q̂·C_lo: the two MMAs into one accumulator are 2·DVT/8
      // MMAs apart instead of 2 (see MmaPairs; fwd_out 0.774 -> 0.762 ms at the 125m cell).
#pragma unroll
      for (int np = 0; np < DVT / 16; ++np) {
        uint32_t bb[4];
        LoadBKN(bb, cs, SM::kSV, 16 * np, 16 * kk, lane);
        Mma(hacc[2 * np], a, bb[0], bb[1]);
        Mma(hacc[2 * np + 1], a, bb[2], bb[3]);
      }
      if constexpr (SPLIT) {
#pragma unroll
        for (int np = 0; np < DVT / 16; ++np) {
          uint32_t bb[4];
          LoadBKN(bb, cs + 64 * SM::kSV, SM::kSV, 16 * np, 16 * kk, lane);
          Mma(hacc[2 * np], a, bb[0], bb[1]);
          Mma(hacc[2 * np + 1], a, bb[2], bb[3]);
        }
      }
      Mma(qnacc, a, nlo[0], nlo[1]);
    }
    __syncthreads();
  }
  const float qn0 = qnacc[0], qn1 = qnacc[2];

  // Gating: P = S·scale ⊙ W (causal), row sums.
  const int r0 = 16 * w + g, r1 = r0 + 8;
  const float b0v = bs[r0], b1v = bs[r1], m0v = ms[r0], m1v = ms[r1];
  float rs0 = 0.f, rs1 = 0.f;
#pragma unroll
  for (int nt = 0; nt < kNt; ++nt) {
    if (nt / 2 <= w) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int s = nt * 8 + 2 * c + (e & 1);
        const int r = e < 2 ? r0 : r1;
        const float br = e < 2 ? b0v : b1v, mr = e < 2 ? m0v : m1v;
        float pv = 0.f;
        if (s <= r && r < len) pv = sacc[nt][e] * d.scale * __expf(br - bs[s] + igs[s] - mr);
        sacc[nt][e] = pv;
        if (e < 2) rs0 += pv; else rs1 += pv;
      }
    }
  }
  rs0 += __shfl_xor_sync(0xffffffffu, rs0, 1);
  rs0 += __shfl_xor_sync(0xffffffffu, rs0, 2);
  rs1 += __shfl_xor_sync(0xffffffffu, rs1, 1);
  rs1 += __shfl_xor_sync(0xffffffffu, rs1, 2);
  const float G0 = __expf(b0v + m_k - m0v), G1 = __expf(b1v + m_k - m1v);
  const float den0 = rs0 + G0 * d.scale * qn0, den1 = rs1 + G1 * d.scale * qn1;
#pragma unroll
  for (int i = 0; i < kHt; ++i) {
    hacc[i][0] *= d.scale * G0;
    hacc[i][1] *= d.scale * G0;
    hacc[i][2] *= d.scale * G1;
    hacc[i][3] *= d.scale * G1;
  }
#pragma unroll
  for (int kk = 0; kk < L / 16; ++kk) {
    if (kk <= w) {
      uint32_t a[4], alo[4];
      SplitPack(sacc[2 * kk][0], sacc[2 * kk][1], a[0], alo[0]);
      SplitPack(sacc[2 * kk][2], sacc[2 * kk][3], a[1], alo[1]);
      SplitPack(sacc[2 * kk + 1][0], sacc[2 * kk + 1][1], a[2], alo[2]);
      SplitPack(sacc[2 * kk + 1][2], sacc[2 * kk + 1][3], a[3], alo[3]);
#pragma unroll
      for (int np = 0; np < DVT / 16; np += 2) {
        uint32_t b0[4], b1[4];
        LoadBKN(b0, vs, SM::kSV, 16 * np, 16 * kk, lane);
        LoadBKN(b1, vs, SM::kSV, 16 * np + 16, 16 * kk, lane);
        MmaPairs(hacc, 2 * np, a, b0, b1);
        if constexpr (SPLIT) MmaPairs(hacc, 2 * np, alo, b0, b1);
      }
    }
  }
  const float inv0 = 1.f / (fmaxf(fabsf(den0), __expf(-m0v)) + d.eps);
  const float inv1 = 1.f / (fmaxf(fabsf(den1), __expf(-m1v)) + d.eps);
#pragma unroll
  for (int nt = 0; nt < kHt; ++nt) {
    hacc[nt][0] *= inv0;
    hacc[nt][1] *= inv0;
    hacc[nt][2] *= inv1;
    hacc[nt][3] *= inv1;
  }
  // h (and its lo part) leave through shared memory in 16-byte pieces: after this barrier no warp
  // reads the V slab or the stage buffers (no copies in flight), so warp w stages its 16 rows
  // in the V slab's rows 16w.. (hi) and stage 0's (lo; stage 0 holds >= L rows of DVT + 8).
  __syncthreads();
  StoreAccStaged(p.h + (tok0 + static_cast<int64_t>(16 * w) * d.NH) * d.DV + j0,
                 SPLIT ? p.h_lo + (tok0 + static_cast<int64_t>(16 * w) * d.NH) * d.DV + j0 : nullptr,
                 ldv, hacc, vs + 16 * w * SM::kSV, sm + 16 * w * SM::kSV, lane, len - 16 * w);
  if (blockIdx.x == 0 && c == 0) {
    const int64_t o = static_cast<int64_t>(bh) * d.S + t0;
    if (r0 < len) p.den_tok[o + r0] = den0;
    if (r1 < len) p.den_tok[o + r1] = den1;
  }
}

// ---------------------------------------------------------------- 4. bwd_prep

// The per-token scalars of bwd_prep from dot = dh·(h + h_lo) over dv (0 with stop_grad) at
// (head-major) o = (b·NH + hd)·S + t.
__device__ __forceinline__ void BwdPrepScalars(const Dims& d, const BwdPtrs& p, int b, int hd, int t, int64_t o,
                                               float dot) {
  const float m = p.m_tok[o], den = p.den_tok[o];
  const float floor_v = __expf(-m);
  const float inv = 1.f / (fmaxf(fabsf(den), floor_v) + d.eps);
  const int k = t / d.L;
  const float G = d.scale * __expf(p.b_tok[o] + p.smk[(static_cast<int64_t>(b) * d.NH + hd) * (d.NC + 1) + k] - m);
  float dden = 0.f, dm = 0.f;
  if (!d.stop_grad) {
    const float dd = -dot * inv;
    dden = fabsf(den) >= floor_v ? (den >= 0.f ? dd : -dd) : 0.f;
    dm = -dot * d.eps * inv;
  }
  p.inv_d[o] = inv;
  p.dden[o] = dden;
  p.dm[o] = dm;
  p.coef[o] = G * inv;
  p.ddc[o] = G * dden;
}

__global__ void __launch_bounds__(256) mlstm_bwd_prep(Dims d, BwdPtrs p) {
  const int64_t tok = static_cast<int64_t>(blockIdx.x) * 8 + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (tok >= static_cast<int64_t>(d.B) * d.S * d.NH) return;
  const int hd = tok % d.NH;
  const int64_t bt = tok / d.NH;
  const int t = bt % d.S, b = bt / d.S;
  const int64_t o = (static_cast<int64_t>(b) * d.NH + hd) * d.S + t;
  float dot = 0.f;
  if (!d.stop_grad) {
    // With split precision h_fp32 = h + h_lo: dh·h cancels against dh·v_s in the true
    // gradient, so h's bf16 rounding must not enter here.
    const bf16* hh = p.h + tok * d.DV;
    const bf16* hl = d.split ? p.h_lo + tok * d.DV : nullptr;
    const bf16* dd = p.dh + tok * d.DV;
    for (int j = lane * 8; j < d.DV; j += 256) {
      const uint4 x = *reinterpret_cast<const uint4*>(hh + j);
      const uint4 y = *reinterpret_cast<const uint4*>(dd + j);
      const uint4 z = hl != nullptr ? *reinterpret_cast<const uint4*>(hl + j) : make_uint4(0, 0, 0, 0);
      const __nv_bfloat162* xh = reinterpret_cast<const __nv_bfloat162*>(&x);
      const __nv_bfloat162* yh = reinterpret_cast<const __nv_bfloat162*>(&y);
      const __nv_bfloat162* zh = reinterpret_cast<const __nv_bfloat162*>(&z);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float2 a = __bfloat1622float2(xh[i]), bb = __bfloat1622float2(yh[i]);
        const float2 lo = __bfloat1622float2(zh[i]);
        dot += (a.x + lo.x) * bb.x + (a.y + lo.y) * bb.y;
      }
    }
    dot = WarpSumT(dot);
  }
  if (lane == 0) BwdPrepScalars(d, p, b, hd, t, o, dot);
}

// bwd_prep with the dots given (MlstmChunkwiseBackwardWithDots: dots[tok] = dh·(h + h_lo) of
// token-major tok = (b·S + t)·NH + hd, computed by the caller, e.g. the output norm's backward
// that writes dh and reads h anyway). One thread per (head, token), head-major, so the five
// scalar rows are written coalesced; it reads 5 floats and writes 5 a token (~10 MB at the
// 125m shape, against the warp kernel's three [tokens, dv] bf16 passes, ~300 MB).
__global__ void __launch_bounds__(256) mlstm_bwd_prep_dots(Dims d, BwdPtrs p, const float* dots) {
  const int64_t o = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x;
  if (o >= static_cast<int64_t>(d.B) * d.NH * d.S) return;
  const int t = o % d.S;
  const int64_t bh = o / d.S;
  const int hd = bh % d.NH, b = bh / d.NH;
  const float dot = d.stop_grad ? 0.f : dots[(static_cast<int64_t>(b) * d.S + t) * d.NH + hd];
  BwdPrepScalars(d, p, b, hd, t, o, dot);
}

// ---------------------------------------------------------------- 5. state_bwd

template <int L, int TM, int TN>
__global__ void __launch_bounds__(2 * TM) mlstm_state_bwd(Dims d, BwdPtrs p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  using SM = StateSmem<L, TM, TN>;
  constexpr int kNT = TN / 8, kThreads = SM::kThreads, kSt = SM::kStages;
  bf16* qs = reinterpret_cast<bf16*>(smem_raw);  // [3][L][TM+8]  q (dk cols a0..)
  bf16* hs = qs + kSt * SM::kTileA;              // [3][L][TN+8]  dh (dv cols j0..)
  float* coef = reinterpret_cast<float*>(hs + kSt * SM::kTileB);  // [L] G·scale/denom
  float* ddc = coef + L;                                           // [L] G·scale·dden
  const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5;
  const int j0 = blockIdx.x * TN, a0 = blockIdx.y * TM, bh = blockIdx.z;
  const int b = bh / d.NH, hd = bh % d.NH;
  // dn = Σ_t ddc_t q̂_t is linear in the tokens: column block x sums the 16-token steps kk with
  // kk % parts == x (its partial dn_{k+1} to scratch slot k, dn_0 to slot NC; bwd_dqk adds the
  // parts). Before, the first column block did all of it (two more split A operands and MMAs
  // per step) and, with every block in one wave (7B heads: 256 blocks), set the kernel's time:
  // 0.268 vs 0.214 ms for state_fwd (H100, bench/RESULTS.md helper mlstm5).
  const int part = blockIdx.x, parts = gridDim.x;
  const int64_t ldqk = static_cast<int64_t>(d.NH) * d.DK, ldv = static_cast<int64_t>(d.NH) * d.DV;
  const bf16* qbase = p.q + (static_cast<int64_t>(b) * d.S * d.NH + hd) * d.DK + a0;
  const bf16* hbase = p.dh + (static_cast<int64_t>(b) * d.S * d.NH + hd) * d.DV + j0;
  const int64_t so = static_cast<int64_t>(bh) * d.S;
  const int row0 = a0 + 16 * w;
  auto dn_slot = [&](int slot) {
    return p.dn + ((static_cast<int64_t>(bh) * (d.NC + 1) + slot) * parts + part) * d.DK + row0;
  };

  float acc[kNT][4];
  if (p.dc_fin != nullptr) {
    LoadAccF32(p.dc_fin + (static_cast<int64_t>(bh) * d.DK + row0) * d.DV + j0, d.DV, acc, lane);
  } else {
#pragma unroll
    for (int i = 0; i < kNT; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  }
  float dnacc[4] = {0.f, 0.f, 0.f, 0.f};
  if (part == 0 && p.dc_fin != nullptr)
    LoadNAcc(dnacc, p.dn_fin + static_cast<int64_t>(bh) * d.DK + row0, lane);

  // Step s handles chunk k = NC−1−s in stage s % 3.
  auto prefetch = [&](int s, int stage) {  // always commits a group (empty past the start)
    const int k = d.NC - 1 - s;
    if (k >= 0) {
      const int t0 = k * L, len = min(L, d.S - t0);
      LoadTile<L, TM>(qs + stage * SM::kTileA, SM::kSA, qbase + t0 * ldqk, ldqk, len, tid, kThreads);
      LoadTile<L, TN>(hs + stage * SM::kTileB, SM::kSB, hbase + t0 * ldv, ldv, len, tid, kThreads);
    }
    CpAsyncCommit();
  };
  prefetch(0, 0);
  prefetch(1, 1);
  for (int s = 0; s < d.NC; ++s) {
    const int k = d.NC - 1 - s, stage = s % kSt, refill = (s + 2) % kSt;
    const int t0 = k * L, len = min(L, d.S - t0);
    const int64_t doff = ((static_cast<int64_t>(bh) * d.NC + k) * d.DK + row0) * d.DV + j0;
    const float decay = p.decay[static_cast<int64_t>(bh) * d.NC + k];
    const float cf = tid < len ? p.coef[so + t0 + tid] : 0.f;
    const float dd = tid < len ? p.ddc[so + t0 + tid] : 0.f;
    if constexpr (SM::kStaged) {  // as in state_fwd: the refill stage is idle here
      StoreAccStaged(p.dc + doff, d.split ? p.dc_lo + doff : nullptr, d.DV, acc,
                     qs + refill * SM::kTileA + 16 * w * SM::kSB,
                     hs + refill * SM::kTileB + 16 * w * SM::kSB, lane);
    } else if constexpr (SM::kStaged2) {
      bf16* buf = 16 * w < L ? qs + refill * SM::kTileA + 16 * w * SM::kSB
                             : hs + refill * SM::kTileB + (16 * w - L) * SM::kSB;
      StoreAccStagedTwoRounds(p.dc + doff, d.split ? p.dc_lo + doff : nullptr, d.DV, acc, buf, lane);
    } else {
      StoreAccSplit(p.dc + doff, d.split ? p.dc_lo + doff : nullptr, d.DV, acc, lane);
    }
    StoreNAcc(dn_slot(k), dnacc, lane);
    if constexpr (SM::kStagedAny) {
      CpAsyncWait<1>();
    } else {
      prefetch(s + 2, refill);
      CpAsyncWait<2>();
    }
    if (tid < L) {
      coef[tid] = cf;
      ddc[tid] = dd;
    }
    __syncthreads();  // tile k and the coefficients visible; every warp's staging reads done
    if constexpr (SM::kStagedAny) prefetch(s + 2, refill);
    const bf16* hst = hs + stage * SM::kTileB;
    const bf16* qst = qs + stage * SM::kTileA;
#pragma unroll
    for (int i = 0; i < kNT; ++i) {
      acc[i][0] *= decay;
      acc[i][1] *= decay;
      acc[i][2] *= decay;
      acc[i][3] *= decay;
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) dnacc[i] *= decay;
    // dC_k = decay·dC_{k+1} + (Q̂ᵀ diag(coef)) dH, dn_k = decay·dn_{k+1} + (Q̂ᵀ diag(ddc)) 1.
#pragma unroll
    for (int kk = 0; kk < L / 16; ++kk) {
      uint32_t a[4], ac[4], aclo[4];
      LoadAT(a, qst, SM::kSA, 16 * w, 16 * kk, lane);
      ScaleAKSplit(ac, aclo, a, coef, 16 * kk, lane);
      if (kk % parts == part) {
        uint32_t ad[4], adlo[4];
        ScaleAKSplit(ad, adlo, a, ddc, 16 * kk, lane);
        Mma(dnacc, ad, kOnesBf16x2, kOnesBf16x2);
        Mma(dnacc, adlo, kOnesBf16x2, kOnesBf16x2);
      }
#pragma unroll
      for (int np = 0; np < TN / 16; np += 2) {  // as in state_fwd
        uint32_t b0[4], b1[4];
        LoadBKN(b0, hst, SM::kSB, 16 * np, 16 * kk, lane);
        LoadBKN(b1, hst, SM::kSB, 16 * np + 16, 16 * kk, lane);
        MmaPairs(acc, 2 * np, ac, b0, b1);
        if (d.bwd_wlo) MmaPairs(acc, 2 * np, aclo, b0, b1);
      }
    }
    __syncthreads();
  }
  StoreNAcc(dn_slot(d.NC), dnacc, lane);  // dn_0's part (bwd_dqk writes d_initial's dn0)
  if (p.dc0 != nullptr) {
    StoreAccF32(p.dc0 + (static_cast<int64_t>(bh) * d.DK + row0) * d.DV + j0, d.DV, acc, lane);
  }
}


// state_bwd with a TMA producer (helper mlstm10; the default since session 8, the only kernel at
// L 128 with 128×128 tiles since the warpgroup kernel it replaced was deleted after losing, 0.453
// -> 0.334 ms): mlstm_state_fwd_ws's structure (StateWsSmem, StateWsMaps with q / dh for k / v and
// dC / dC lo for the stores) on mlstm_state_bwd's recurrence: step s handles chunk k = NC − 1 − s, dC_{k+1}
// leaves by TMA box stores before the update dC_k = decay·dC_{k+1} + (Q̂ᵀ diag(coef)) dH, and this
// column block's part of dn (16-token steps kk with kk % parts == part) by mma.sync. coef and ddc
// of each stage are written to shared memory by the producer warpgroup's 128 threads (one token
// each), which all arrive on the stage's "full" mbarrier (count 128; thread 0's arrival carries
// the TMA bytes): a first version kept them in registers per warp and spilled 4 bytes.
// kSub as in StateFwdWs: 2 = chunk 256 (mlstm_state_bwd_ws_l256), reverse 128-token steps;
// dC_{k+1} / dn_{k+1} leave and the decay applies at a chunk's first step in reverse order (its
// second half, or its only half at a short last chunk).
template <int kSub>
__device__ __forceinline__ void StateBwdWs(const Dims& d, const BwdPtrs& p, const StateWsMaps& maps) {
  using namespace hopper;
  using SM = StateWsSmem;
  constexpr int L = 128, kNT = 16;
  const int nsteps = kSub == 1 ? d.NC : (d.S + L - 1) / L;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* sm = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  const uint32_t sa = SmemAddr(sm);
  const uint32_t full = sa + SM::kBars, empty = full + 16;
  // coef and ddc of the two stages ([slot][128] each), written by the producer warpgroup.
  float* cws = reinterpret_cast<float*>(sm + SM::kBars + 64);
  float* dws = cws + 2 * L;
  const int j0 = blockIdx.x * 128, a0 = blockIdx.y * 128, bh = blockIdx.z;
  const int b = bh / d.NH, hd = bh % d.NH;
  const int part = blockIdx.x, parts = gridDim.x;
  if (threadIdx.x == 0) {
    for (int i = 0; i < 2; ++i) {
      MbInit(full + 8 * i, 128);  // every producer thread (thread 0's with the expected bytes)
      MbInit(empty + 8 * i, 8);
    }
    MbInitFence();
  }
  __syncthreads();

  if (threadIdx.x < 128) {  // producer warpgroup: thread 0 issues the tiles, all write coef / ddc
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    const int t = threadIdx.x;
    const int64_t so = static_cast<int64_t>(bh) * d.S;
    for (int s = 0; s < nsteps; ++s) {
      const int k = nsteps - 1 - s, slot = s & 1, use = s >> 1;
      const int t0 = k * L, len = min(L, d.S - t0);
      const float cf = t < len ? p.coef[so + t0 + t] : 0.f;
      const float dd = t < len ? p.ddc[so + t0 + t] : 0.f;
      if (use > 0) MbWait(empty + 8 * slot, (use - 1) & 1);
      cws[slot * L + t] = cf;
      dws[slot * L + t] = dd;
      const uint32_t st = sa + slot * SM::kStage, fb = full + 8 * slot;
      if (t == 0) {
        MbArriveExpectTx(fb, SM::kStage);  // (release: the stores above are visible to waiters)
        TmaTile4d(st, &maps.k, fb, a0, hd, k * L, b);  // q
        TmaTile4d(st + SM::kTile64, &maps.k, fb, a0 + 64, hd, k * L, b);
        TmaTile4d(st + SM::kOffV, &maps.v, fb, j0, hd, k * L, b);  // dh
        TmaTile4d(st + SM::kOffV + SM::kTile64, &maps.v, fb, j0 + 64, hd, k * L, b);
      } else {
        MbArrive(fb);
      }
    }
    return;
  }

  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
  const int tid = threadIdx.x - 128, lane = tid & 31, w = tid >> 5, c = lane & 3, g = lane >> 2;
  const int row0 = a0 + 16 * w;
  auto dn_slot = [&](int slot) {
    return p.dn + ((static_cast<int64_t>(bh) * (d.NC + 1) + slot) * parts + part) * d.DK + row0;
  };
  float acc[kNT][4];
  if (p.dc_fin != nullptr) {
    LoadAccF32(p.dc_fin + (static_cast<int64_t>(bh) * d.DK + row0) * d.DV + j0, d.DV, acc, lane);
  } else {
#pragma unroll
    for (int i = 0; i < kNT; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  }
  float dnacc[4] = {0.f, 0.f, 0.f, 0.f};
  if (part == 0 && p.dc_fin != nullptr)
    LoadNAcc(dnacc, p.dn_fin + static_cast<int64_t>(bh) * d.DK + row0, lane);
  unsigned char* stg = sm + SM::kStaging + w * 8192;
  const uint32_t stg_a = SmemAddr(stg);
  int slot = 0, phase = 0;
  for (int s = 0; s < nsteps; ++s) {
    const int k = nsteps - 1 - s;
    const int kc = kSub == 1 ? k : k >> 1;  // chunk of this step
    const bool first = kSub == 1 || (k & 1) == 1 || s == 0;  // dC_{kc+1} out, decay
    const float decay = p.decay[static_cast<int64_t>(bh) * d.NC + kc];
    if (first) {
      if (lane == 0) BulkWaitRead<0>();  // step s − 1's boxes have been read
      __syncwarp();
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
        uint32_t hi0, lo0, hi1, lo1;
        SplitPack(acc[nt][0], acc[nt][1], hi0, lo0);
        SplitPack(acc[nt][2], acc[nt][3], hi1, lo1);
        const int col = nt * 8 + 2 * c, blk = col / 64, ch = (col % 64) / 8;
        const int o0 = blk * 2048 + g * 128 + ((ch ^ g) * 16) + (col % 8) * 2;
        const int o1 = o0 + 8 * 128;  // row g + 8: same swizzle phase
        *reinterpret_cast<uint32_t*>(stg + o0) = hi0;
        *reinterpret_cast<uint32_t*>(stg + o1) = hi1;
        *reinterpret_cast<uint32_t*>(stg + 4096 + o0) = lo0;
        *reinterpret_cast<uint32_t*>(stg + 4096 + o1) = lo1;
      }
      FenceProxyAsync();
      __syncwarp();
      if (lane == 0) {
        const int drow = (bh * d.NC + kc) * d.DK + row0;
        TmaStore2d(&maps.c, stg_a, j0, drow);
        TmaStore2d(&maps.c, stg_a + 2048, j0 + 64, drow);
        if (d.split) {
          TmaStore2d(&maps.c_lo, stg_a + 4096, j0, drow);
          TmaStore2d(&maps.c_lo, stg_a + 6144, j0 + 64, drow);
        }
        BulkCommit();
      }
      StoreNAcc(dn_slot(kc), dnacc, lane);
    }

    MbWait(full + 8 * slot, phase);
    const unsigned char* qst = sm + slot * SM::kStage;
    if (first) {
#pragma unroll
      for (int i = 0; i < kNT; ++i) {
        acc[i][0] *= decay;
        acc[i][1] *= decay;
        acc[i][2] *= decay;
        acc[i][3] *= decay;
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) dnacc[i] *= decay;
    }
    uint32_t ac[L / 16][4], aclo[L / 16][4];
#pragma unroll
    for (int kk = 0; kk < L / 16; ++kk) {
      uint32_t a[4];
      LoadATSw(a, qst, 16 * w, 16 * kk, lane);
      ScaleAKSplit(ac[kk], aclo[kk], a, cws + slot * L, 16 * kk, lane);
      if (kk % parts == part) {
        uint32_t ad[4], adlo[4];
        ScaleAKSplit(ad, adlo, a, dws + slot * L, 16 * kk, lane);
        Mma(dnacc, ad, kOnesBf16x2, kOnesBf16x2);
        Mma(dnacc, adlo, kOnesBf16x2, kOnesBf16x2);
      }
    }
    const uint64_t h_d = SmemDescSw128(sa + slot * SM::kStage + SM::kOffV, SM::kTile64, 1024);
    if (!d.bwd_wlo) {
#pragma unroll
      for (int kk = 0; kk < L / 16; ++kk) aclo[kk][0] = aclo[kk][1] = aclo[kk][2] = aclo[kk][3] = 0u;
    }
    FenceRegs(ac);
    FenceRegs(aclo);
    FenceRegs(acc);
    WgmmaFence();
#pragma unroll
    for (int kk = 0; kk < L / 16; ++kk) {
      WgmmaRS128<1>(acc, ac[kk], h_d + ((kk * 16 * 128) >> 4));
      WgmmaRS128<1>(acc, aclo[kk], h_d + ((kk * 16 * 128) >> 4));
    }
    WgmmaCommit();
    WgmmaWait<0>();
    FenceRegs(acc);
    FenceRegs(ac);
    FenceRegs(aclo);
    __syncwarp();
    if (lane == 0) MbArrive(empty + 8 * slot);
    if (++slot == 2) {
      slot = 0;
      phase ^= 1;
    }
  }
  StoreNAcc(dn_slot(d.NC), dnacc, lane);  // dn_0's part (bwd_dqk writes d_initial's dn0)
  if (p.dc0 != nullptr) {
    StoreAccF32(p.dc0 + (static_cast<int64_t>(bh) * d.DK + row0) * d.DV + j0, d.DV, acc, lane);
  }
  if (lane == 0) BulkWait<0>();
}
__global__ void __launch_bounds__(384, 1)
    mlstm_state_bwd_ws(Dims d, BwdPtrs p, const __grid_constant__ StateWsMaps maps) {
  StateBwdWs<1>(d, p, maps);
}
__global__ void __launch_bounds__(384, 1)
    mlstm_state_bwd_ws_l256(Dims d, BwdPtrs p, const __grid_constant__ StateWsMaps maps) {
  StateBwdWs<2>(d, p, maps);
}

// ------------------------------------------------ 4b/5b. state kernels with the last wave split
// (helper state16, session 16; the default since its merge: MlstmOptions::state_tail kAuto / kSplit,
// GYRE_MLSTM_STATE_TAIL unset or split; chunk 128 with 128×128 state tiles only.)
//
// The two kernels above give every (head, 128-row dk tile, 128-column dv tile) one block of 384
// threads and 192 KB of shared memory, so one block an SM: at the 125m cell (B16 NH4 dk = dv =
// 384) that is 3·3·64 = 576 blocks on 132 SMs, 4.36 waves, and the fifth wave runs 48 blocks while
// 84 SMs wait. These kernels take the same tiles on a one-dimensional grid in the same order
// (x = dv tile fastest, then the dk tile, then the head), but the tiles of the last wave
// (tiles % #SMs of them, the host decides; only when they fit twice into one wave) run as two
// blocks each, one per 64-column half of the dv tile: nfull full blocks first, then
// 2·(tiles − nfull) half blocks. Blocks are dispatched in index order, so the halves fill the
// last wave on twice as many SMs with half the products and stores each.
//
// A half block is the full block's loop with 8 accumulator n-tiles instead of 16 (m64n64k16
// instead of m64n128k16 wgmmas on the same swizzled V / dH rows, one V box instead of two, two C
// boxes instead of four). Every element of C_k / dC_k gets the same products in the same order as
// in the full kernels, so the states are bitwise those of mlstm_state_fwd_ws / _bwd_ws (tested:
// mlstm_gpu_test StateTailSplitMatchesFullBytewise). The K (Q̂) tile is loaded by both halves
// (L2 hits); n (state_fwd) and this tile's dn part (state_bwd) are summed by the first half only.
//
// Measured (session 16, one H100, 125m cell; kernels/cuda/mlstm_notes.md): state_fwd 0.383-0.388
// -> 0.366-0.372 ms, state_bwd 0.334 -> 0.331-0.332, the xlstm[1:0]-125m step −0.5 ms (median of
// six rounds). A block alone on its SM (B1) runs a chunk in ~3.9 µs (half: ~2.8 µs) against ~5.3
// µs in a full wave: the blocks are bound by their own serial chain more than by DRAM. Three
// load stages for the half blocks (48 KB stages fit three in 192 KB) timed the same and were
// deleted.
struct StateTailTile {
  int j0, a0, bh;
  int part;    // the 128-column dv tile (state_bwd's dn part)
  bool first;  // a full block or a tile's first half: it carries n / its dn part
};
__device__ __forceinline__ StateTailTile StateTailTileOf(const Dims& d, int nfull, bool half) {
  const int tx = d.DV / 128, ty = d.DK / 128, i = static_cast<int>(blockIdx.x);
  const int u = half ? nfull + ((i - nfull) >> 1) : i;
  const int hs = half ? ((i - nfull) & 1) : 0;
  StateTailTile t;
  t.part = u % tx;
  t.j0 = t.part * 128 + 64 * hs;
  t.a0 = ((u / tx) % ty) * 128;
  t.bh = u / (tx * ty);
  t.first = hs == 0;
  return t;
}

// state_fwd's producer (thread 0): the K tile's two column blocks and kNT / 8 column blocks of
// V for each chunk, onto the stage's "full" mbarrier.
template <int kNT>
__device__ __forceinline__ void StateFwdTailLoads(const Dims& d, const StateWsMaps& maps,
                                                  const StateTailTile& t, uint32_t sa,
                                                  uint32_t full, uint32_t empty) {
  using namespace hopper;
  using SM = StateWsSmem;
  constexpr int L = 128;
  const int b = t.bh / d.NH, hd = t.bh % d.NH;
  for (int k = 0; k < d.NC; ++k) {
    const int slot = k & 1, use = k >> 1;
    if (use > 0) MbWait(empty + 8 * slot, (use - 1) & 1);
    const uint32_t st = sa + slot * SM::kStage, fb = full + 8 * slot;
    MbArriveExpectTx(fb, (2 + kNT / 8) * SM::kTile64);
    TmaTile4d(st, &maps.k, fb, t.a0, hd, k * L, b);
    TmaTile4d(st + SM::kTile64, &maps.k, fb, t.a0 + 64, hd, k * L, b);
    TmaTile4d(st + SM::kOffV, &maps.v, fb, t.j0, hd, k * L, b);
    if (kNT == 16) TmaTile4d(st + SM::kOffV + SM::kTile64, &maps.v, fb, t.j0 + 64, hd, k * L, b);
  }
}

// This warp's 16 rows of the state (kNT n-tiles) as hi / lo into its swizzled staging area
// (hi: column blocks at +0, +2048; lo at +4096, +6144), then one lane stores the boxes.
template <int kNT>
__device__ __forceinline__ void StateTailStageOut(const float (&acc)[kNT][4], unsigned char* stg,
                                                  uint32_t stg_a, const StateWsMaps& maps,
                                                  bool split, int j0, int row, int lane) {
  using namespace hopper;
  const int g = lane >> 2, c = lane & 3;
  if (lane == 0) BulkWaitRead<0>();  // the previous step's boxes have been read
  __syncwarp();
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
    uint32_t hi0, lo0, hi1, lo1;
    SplitPack(acc[nt][0], acc[nt][1], hi0, lo0);
    SplitPack(acc[nt][2], acc[nt][3], hi1, lo1);
    const int col = nt * 8 + 2 * c, blk = col / 64, ch = (col % 64) / 8;
    const int o0 = blk * 2048 + g * 128 + ((ch ^ g) * 16) + (col % 8) * 2;
    const int o1 = o0 + 8 * 128;  // row g + 8: same swizzle phase
    *reinterpret_cast<uint32_t*>(stg + o0) = hi0;
    *reinterpret_cast<uint32_t*>(stg + o1) = hi1;
    *reinterpret_cast<uint32_t*>(stg + 4096 + o0) = lo0;
    *reinterpret_cast<uint32_t*>(stg + 4096 + o1) = lo1;
  }
  FenceProxyAsync();
  __syncwarp();
  if (lane == 0) {
    TmaStore2d(&maps.c, stg_a, j0, row);
    if (kNT == 16) TmaStore2d(&maps.c, stg_a + 2048, j0 + 64, row);
    if (split) {
      TmaStore2d(&maps.c_lo, stg_a + 4096, j0, row);
      if (kNT == 16) TmaStore2d(&maps.c_lo, stg_a + 6144, j0 + 64, row);
    }
    BulkCommit();
  }
}

template <int kNT>
__device__ __forceinline__ void StateTailMma(float (&acc)[kNT][4], const uint32_t (&a)[4],
                                             uint64_t desc_b) {
  using namespace hopper;
  if constexpr (kNT == 16) {
    WgmmaRS128<1>(acc, a, desc_b);
  } else {
    WgmmaRS64<1>(acc, a, desc_b);
  }
}

// state_fwd consumer warpgroups (mlstm_state_fwd_ws's, chunk 128) on kNT n-tiles.
template <int kNT>
__device__ __forceinline__ void StateFwdTailConsume(const Dims& d, const FwdPtrs& p,
                                                    const StateWsMaps& maps, const StateTailTile& t,
                                                    unsigned char* sm, uint32_t sa, uint32_t full,
                                                    uint32_t empty) {
  using namespace hopper;
  using SM = StateWsSmem;
  constexpr int L = 128;
  const int tid = threadIdx.x - 128, lane = tid & 31, w = tid >> 5, c = lane & 3;
  const int j0 = t.j0, a0 = t.a0, bh = t.bh;
  const bool n_block = t.first && t.part == 0;
  const int row0 = a0 + 16 * w;
  float acc[kNT][4];
  if (p.c0 != nullptr) {
    LoadAccF32(p.c0 + (static_cast<int64_t>(bh) * d.DK + row0) * d.DV + j0, d.DV, acc, lane);
  } else {
#pragma unroll
    for (int i = 0; i < kNT; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  }
  float nacc[4] = {0.f, 0.f, 0.f, 0.f};
  if (n_block && p.c0 != nullptr) LoadNAcc(nacc, p.n0 + static_cast<int64_t>(bh) * d.DK + row0, lane);
  unsigned char* stg = sm + SM::kStaging + w * 8192;
  const uint32_t stg_a = SmemAddr(stg);
  int slot = 0, phase = 0;
  for (int k = 0; k < d.NC; ++k) {
    const int t0 = k * L, len = min(L, d.S - t0);
    const float decay = p.decay[static_cast<int64_t>(bh) * d.NC + k];
    float ew[L / 16][4];
    const float* e_tok = p.e_tok + static_cast<int64_t>(bh) * d.S + t0;
#pragma unroll
    for (int kk = 0; kk < L / 16; ++kk) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int tt = 16 * kk + 2 * c + (i & 1) + 8 * (i >> 1);
        ew[kk][i] = tt < len ? e_tok[tt] : 0.f;
      }
    }
    StateTailStageOut<kNT>(acc, stg, stg_a, maps, d.split, j0, (bh * (d.NC + 1) + k) * d.DK + row0, lane);
    if (n_block) StoreNAcc(p.sn + (static_cast<int64_t>(bh) * (d.NC + 1) + k) * d.DK + row0, nacc, lane);

    MbWait(full + 8 * slot, phase);
    const unsigned char* kst = sm + slot * SM::kStage;
#pragma unroll
    for (int i = 0; i < kNT; ++i) {
      acc[i][0] *= decay;
      acc[i][1] *= decay;
      acc[i][2] *= decay;
      acc[i][3] *= decay;
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) nacc[i] *= decay;
    uint32_t ae[L / 16][4], elo[L / 16][4];
#pragma unroll
    for (int kk = 0; kk < L / 16; ++kk) {
      uint32_t a[4];
      LoadATSw(a, kst, 16 * w, 16 * kk, lane);
      ScaleAKSplitW(ae[kk], elo[kk], a, ew[kk]);
      if (n_block) {
        Mma(nacc, ae[kk], kOnesBf16x2, kOnesBf16x2);
        Mma(nacc, elo[kk], kOnesBf16x2, kOnesBf16x2);
      }
    }
    const uint64_t v_d = SmemDescSw128(sa + slot * SM::kStage + SM::kOffV, SM::kTile64, 1024);
    if (!d.fwd_wlo) {
#pragma unroll
      for (int kk = 0; kk < L / 16; ++kk) elo[kk][0] = elo[kk][1] = elo[kk][2] = elo[kk][3] = 0u;
    }
    FenceRegs(ae);
    FenceRegs(elo);
    FenceRegs(acc);
    WgmmaFence();
#pragma unroll
    for (int kk = 0; kk < L / 16; ++kk) {
      StateTailMma<kNT>(acc, ae[kk], v_d + ((kk * 16 * 128) >> 4));
      StateTailMma<kNT>(acc, elo[kk], v_d + ((kk * 16 * 128) >> 4));
    }
    WgmmaCommit();
    WgmmaWait<0>();
    FenceRegs(acc);
    FenceRegs(ae);
    FenceRegs(elo);
    __syncwarp();
    if (lane == 0) MbArrive(empty + 8 * slot);
    if (++slot == 2) {
      slot = 0;
      phase ^= 1;
    }
  }
  const int64_t last = (static_cast<int64_t>(bh) * (d.NC + 1) + d.NC);
  const int64_t clast = (last * d.DK + row0) * d.DV + j0;
  StoreAccSplit(p.sc + clast, d.split ? p.sc_lo + clast : nullptr, d.DV, acc, lane);
  StoreAccF32(p.sc_last + (static_cast<int64_t>(bh) * d.DK + row0) * d.DV + j0, d.DV, acc, lane);
  if (p.c_out != nullptr) {
    StoreAccF32(p.c_out + (static_cast<int64_t>(bh) * d.DK + row0) * d.DV + j0, d.DV, acc, lane);
  }
  if (n_block) {
    StoreNAcc(p.sn + last * d.DK + row0, nacc, lane);
    if (p.c_out != nullptr) StoreNAcc(p.n_out + static_cast<int64_t>(bh) * d.DK + row0, nacc, lane);
  }
  if (lane == 0) BulkWait<0>();
}

// Blocks [0, nfull): full 128-column tiles; [nfull, gridDim.x): 64-column halves.
__global__ void __launch_bounds__(384, 1)
    mlstm_state_fwd_ws_tail(Dims d, FwdPtrs p, const __grid_constant__ StateWsMaps maps, int nfull) {
  using namespace hopper;
  using SM = StateWsSmem;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* sm = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  const uint32_t sa = SmemAddr(sm);
  const uint32_t full = sa + SM::kBars, empty = full + 16;
  const bool half = static_cast<int>(blockIdx.x) >= nfull;
  const StateTailTile t = StateTailTileOf(d, nfull, half);
  if (threadIdx.x == 0) {
    for (int i = 0; i < 2; ++i) {
      MbInit(full + 8 * i, 1);
      MbInit(empty + 8 * i, 8);
    }
    MbInitFence();
  }
  __syncthreads();
  if (threadIdx.x < 128) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    if (threadIdx.x == 0) {
      if (half) {
        StateFwdTailLoads<8>(d, maps, t, sa, full, empty);
      } else {
        StateFwdTailLoads<16>(d, maps, t, sa, full, empty);
      }
    }
    return;
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
  if (half) {
    StateFwdTailConsume<8>(d, p, maps, t, sm, sa, full, empty);
  } else {
    StateFwdTailConsume<16>(d, p, maps, t, sm, sa, full, empty);
  }
}

// state_bwd consumer warpgroups (mlstm_state_bwd_ws's, chunk 128) on kNT n-tiles; coef / ddc of
// each stage come from the producer warpgroup through shared memory, as there.
template <int kNT>
__device__ __forceinline__ void StateBwdTailConsume(const Dims& d, const BwdPtrs& p,
                                                    const StateWsMaps& maps, const StateTailTile& t,
                                                    unsigned char* sm, uint32_t sa, uint32_t full,
                                                    uint32_t empty, const float* cws,
                                                    const float* dws) {
  using namespace hopper;
  using SM = StateWsSmem;
  constexpr int L = 128;
  const int tid = threadIdx.x - 128, lane = tid & 31, w = tid >> 5;
  const int j0 = t.j0, a0 = t.a0, bh = t.bh, part = t.part, parts = d.DV / 128;
  const bool dn_block = t.first;  // the tile's dn part: summed and stored by its first half only
  const int row0 = a0 + 16 * w;
  auto dn_slot = [&](int s) {
    return p.dn + ((static_cast<int64_t>(bh) * (d.NC + 1) + s) * parts + part) * d.DK + row0;
  };
  float acc[kNT][4];
  if (p.dc_fin != nullptr) {
    LoadAccF32(p.dc_fin + (static_cast<int64_t>(bh) * d.DK + row0) * d.DV + j0, d.DV, acc, lane);
  } else {
#pragma unroll
    for (int i = 0; i < kNT; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  }
  float dnacc[4] = {0.f, 0.f, 0.f, 0.f};
  if (dn_block && part == 0 && p.dc_fin != nullptr)
    LoadNAcc(dnacc, p.dn_fin + static_cast<int64_t>(bh) * d.DK + row0, lane);
  unsigned char* stg = sm + SM::kStaging + w * 8192;
  const uint32_t stg_a = SmemAddr(stg);
  int slot = 0, phase = 0;
  for (int s = 0; s < d.NC; ++s) {
    const int k = d.NC - 1 - s;
    const float decay = p.decay[static_cast<int64_t>(bh) * d.NC + k];
    StateTailStageOut<kNT>(acc, stg, stg_a, maps, d.split, j0, (bh * d.NC + k) * d.DK + row0, lane);
    if (dn_block) StoreNAcc(dn_slot(k), dnacc, lane);

    MbWait(full + 8 * slot, phase);
    const unsigned char* qst = sm + slot * SM::kStage;
#pragma unroll
    for (int i = 0; i < kNT; ++i) {
      acc[i][0] *= decay;
      acc[i][1] *= decay;
      acc[i][2] *= decay;
      acc[i][3] *= decay;
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) dnacc[i] *= decay;
    uint32_t ac[L / 16][4], aclo[L / 16][4];
#pragma unroll
    for (int kk = 0; kk < L / 16; ++kk) {
      uint32_t a[4];
      LoadATSw(a, qst, 16 * w, 16 * kk, lane);
      ScaleAKSplit(ac[kk], aclo[kk], a, cws + slot * L, 16 * kk, lane);
      if (dn_block && kk % parts == part) {
        uint32_t ad[4], adlo[4];
        ScaleAKSplit(ad, adlo, a, dws + slot * L, 16 * kk, lane);
        Mma(dnacc, ad, kOnesBf16x2, kOnesBf16x2);
        Mma(dnacc, adlo, kOnesBf16x2, kOnesBf16x2);
      }
    }
    const uint64_t h_d = SmemDescSw128(sa + slot * SM::kStage + SM::kOffV, SM::kTile64, 1024);
    if (!d.bwd_wlo) {
#pragma unroll
      for (int kk = 0; kk < L / 16; ++kk) aclo[kk][0] = aclo[kk][1] = aclo[kk][2] = aclo[kk][3] = 0u;
    }
    FenceRegs(ac);
    FenceRegs(aclo);
    FenceRegs(acc);
    WgmmaFence();
#pragma unroll
    for (int kk = 0; kk < L / 16; ++kk) {
      StateTailMma<kNT>(acc, ac[kk], h_d + ((kk * 16 * 128) >> 4));
      StateTailMma<kNT>(acc, aclo[kk], h_d + ((kk * 16 * 128) >> 4));
    }
    WgmmaCommit();
    WgmmaWait<0>();
    FenceRegs(acc);
    FenceRegs(ac);
    FenceRegs(aclo);
    __syncwarp();
    if (lane == 0) MbArrive(empty + 8 * slot);
    if (++slot == 2) {
      slot = 0;
      phase ^= 1;
    }
  }
  if (dn_block) StoreNAcc(dn_slot(d.NC), dnacc, lane);
  if (p.dc0 != nullptr) {
    StoreAccF32(p.dc0 + (static_cast<int64_t>(bh) * d.DK + row0) * d.DV + j0, d.DV, acc, lane);
  }
  if (lane == 0) BulkWait<0>();
}

__global__ void __launch_bounds__(384, 1)
    mlstm_state_bwd_ws_tail(Dims d, BwdPtrs p, const __grid_constant__ StateWsMaps maps, int nfull) {
  using namespace hopper;
  using SM = StateWsSmem;
  constexpr int L = 128;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* sm = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  const uint32_t sa = SmemAddr(sm);
  const uint32_t full = sa + SM::kBars, empty = full + 16;
  float* cws = reinterpret_cast<float*>(sm + SM::kBars + 64);
  float* dws = cws + 2 * L;
  const bool half = static_cast<int>(blockIdx.x) >= nfull;
  const StateTailTile t = StateTailTileOf(d, nfull, half);
  if (threadIdx.x == 0) {
    for (int i = 0; i < 2; ++i) {
      MbInit(full + 8 * i, 128);  // every producer thread (thread 0's with the expected bytes)
      MbInit(empty + 8 * i, 8);
    }
    MbInitFence();
  }
  __syncthreads();
  if (threadIdx.x < 128) {  // thread 0 issues the tiles (after its coef / ddc), all write coef / ddc
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    const int tt = threadIdx.x;
    const int b = t.bh / d.NH, hd = t.bh % d.NH;
    const int64_t so = static_cast<int64_t>(t.bh) * d.S;
    for (int s = 0; s < d.NC; ++s) {
      const int k = d.NC - 1 - s, slot = s & 1, use = s >> 1;
      const int t0 = k * L, len = min(L, d.S - t0);
      const float cf = tt < len ? p.coef[so + t0 + tt] : 0.f;
      const float dd = tt < len ? p.ddc[so + t0 + tt] : 0.f;
      if (use > 0) MbWait(empty + 8 * slot, (use - 1) & 1);
      cws[slot * L + tt] = cf;
      dws[slot * L + tt] = dd;
      const uint32_t st = sa + slot * SM::kStage, fb = full + 8 * slot;
      if (tt == 0) {
        MbArriveExpectTx(fb, (half ? 3 : 4) * SM::kTile64);
        TmaTile4d(st, &maps.k, fb, t.a0, hd, k * L, b);  // q
        TmaTile4d(st + SM::kTile64, &maps.k, fb, t.a0 + 64, hd, k * L, b);
        TmaTile4d(st + SM::kOffV, &maps.v, fb, t.j0, hd, k * L, b);  // dh
        if (!half) TmaTile4d(st + SM::kOffV + SM::kTile64, &maps.v, fb, t.j0 + 64, hd, k * L, b);
      } else {
        MbArrive(fb);
      }
    }
    return;
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
  if (half) {
    StateBwdTailConsume<8>(d, p, maps, t, sm, sa, full, empty, cws, dws);
  } else {
    StateBwdTailConsume<16>(d, p, maps, t, sm, sa, full, empty, cws, dws);
  }
}
// ---------------------------------------------------------------- 6. bwd_dv

// Two stages of (K, Q, dC_{k+1}) dk-tiles, one dh slab.
template <int L, int DVT>
struct DvSmem {
  static constexpr int kS64 = 64 + kPad;
  static constexpr int kSV = DVT + kPad;
  static constexpr int kStage = 2 * L * kS64 + 64 * kSV;  // K, Q [L][72]; dC [64][DVT+8]
  static constexpr int kH = 2 * kStage;                   // [L][DVT+8] dh
  static constexpr int kEnd = kH + L * kSV;
  static constexpr size_t kBytes = kEnd * 2 + 4 * L * 4;
};

template <int L, int DVT>
__global__ void __launch_bounds__(2 * L) mlstm_bwd_dv(Dims d, BwdPtrs p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  using SM = DvSmem<L, DVT>;
  bf16* sm = reinterpret_cast<bf16*>(smem_raw);
  bf16* hs = sm + SM::kH;
  float* bs = reinterpret_cast<float*>(sm + SM::kEnd);
  float* igs = bs + L;
  float* ms = igs + L;
  float* ivs = ms + L;
  constexpr int kThreads = 2 * L, kNt = L / 8, kHt = DVT / 8;
  // Identity warp -> row tile here: the paired map (RowTile) made bwd_dv 2-4% slower (H100,
  // bench/RESULTS.md helper mlstm6), though its causal products are as unbalanced.
  const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5, g = lane >> 2,
            c = lane & 3;
  const int j0 = blockIdx.x * DVT, k = blockIdx.y, bh = blockIdx.z;
  const int b = bh / d.NH, hd = bh % d.NH;
  const int t0 = k * L, len = min(L, d.S - t0);
  const int64_t ldqk = static_cast<int64_t>(d.NH) * d.DK, ldv = static_cast<int64_t>(d.NH) * d.DV;
  const int64_t tok0 = (static_cast<int64_t>(b) * d.S + t0) * d.NH + hd;
  const int64_t so = static_cast<int64_t>(bh) * d.S + t0;
  const bf16* dcbase = p.dc + (static_cast<int64_t>(bh) * d.NC + k) * d.DK * d.DV + j0;
  const float m_next = p.smk[static_cast<int64_t>(bh) * (d.NC + 1) + k + 1];

  auto load_stage = [&](int dt, int stage) {
    bf16* st = sm + stage * SM::kStage;
    LoadTile<L, 64>(st, SM::kS64, p.k + tok0 * d.DK + dt * 64, ldqk, len, tid, kThreads);
    LoadTile<L, 64>(st + L * SM::kS64, SM::kS64, p.q + tok0 * d.DK + dt * 64, ldqk, len, tid,
                    kThreads);
    LoadTile<64, DVT>(st + 2 * L * SM::kS64, SM::kSV, dcbase + static_cast<int64_t>(dt) * 64 * d.DV,
                      d.DV, 64, tid, kThreads);
    CpAsyncCommit();
  };
  LoadTile<L, DVT>(hs, SM::kSV, p.dh + tok0 * d.DV + j0, ldv, len, tid, kThreads);
  CpAsyncCommit();
  load_stage(0, 0);
  if (tid < L) {
    const bool ok = tid < len;
    bs[tid] = ok ? p.b_tok[so + tid] : 0.f;
    ms[tid] = ok ? p.m_tok[so + tid] : 0.f;
    igs[tid] = ok ? p.ig[tok0 + static_cast<int64_t>(tid) * d.NH] : -INFINITY;
    ivs[tid] = ok ? p.inv_d[so + tid] : 0.f;
  }
  float sacc[kNt][4], vacc[kHt][4];
#pragma unroll
  for (int i = 0; i < kNt; ++i) sacc[i][0] = sacc[i][1] = sacc[i][2] = sacc[i][3] = 0.f;
#pragma unroll
  for (int i = 0; i < kHt; ++i) vacc[i][0] = vacc[i][1] = vacc[i][2] = vacc[i][3] = 0.f;
  const int ndt = d.DK / 64;
  for (int dt = 0; dt < ndt; ++dt) {
    if (dt + 1 < ndt) {
      load_stage(dt + 1, (dt + 1) & 1);
      CpAsyncWait<1>();
    } else {
      CpAsyncWait<0>();
    }
    __syncthreads();
    const bf16* ks = sm + (dt & 1) * SM::kStage;
    const bf16* qs = ks + L * SM::kS64;
    const bf16* cs = ks + 2 * L * SM::kS64;
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      uint32_t a[4];
      LoadA(a, ks, SM::kS64, 16 * w, 16 * kk, lane);
#pragma unroll
      for (int np = 0; np < L / 16; ++np) {
        if (np >= w) {
          uint32_t bb[4];
          LoadBNK(bb, qs, SM::kS64, 16 * np, 16 * kk, lane);
          Mma(sacc[2 * np], a, bb[0], bb[1]);
          Mma(sacc[2 * np + 1], a, bb[2], bb[3]);
        }
      }
#pragma unroll
      for (int np = 0; np < DVT / 16; ++np) {
        uint32_t bb[4];
        LoadBKN(bb, cs, SM::kSV, 16 * np, 16 * kk, lane);
        Mma(vacc[2 * np], a, bb[0], bb[1]);
        Mma(vacc[2 * np + 1], a, bb[2], bb[3]);
      }
    }
    __syncthreads();
  }
  // Pᵀ_st = Sᵀ_st · scale · W_ts / denom_t  (s = row of this warp, t = column), causal t >= s.
  const int s0 = 16 * w + g, s1 = s0 + 8;
  const float gl = bs[len - 1];
  const float E0 = s0 < len ? __expf(gl - bs[s0] + igs[s0] - m_next) : 0.f;
  const float E1 = s1 < len ? __expf(gl - bs[s1] + igs[s1] - m_next) : 0.f;
  const float x0 = igs[s0] - bs[s0], x1 = igs[s1] - bs[s1];
#pragma unroll
  for (int nt = 0; nt < kNt; ++nt) {
    if (nt / 2 >= w) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int t = nt * 8 + 2 * c + (e & 1);
        const int s = e < 2 ? s0 : s1;
        const float xs = e < 2 ? x0 : x1;
        float pv = 0.f;
        if (s <= t && t < len) pv = sacc[nt][e] * d.scale * ivs[t] * __expf(bs[t] + xs - ms[t]);
        sacc[nt][e] = pv;
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kHt; ++i) {
    vacc[i][0] *= E0;
    vacc[i][1] *= E0;
    vacc[i][2] *= E1;
    vacc[i][3] *= E1;
  }
#pragma unroll
  for (int kk = 0; kk < L / 16; ++kk) {
    if (kk >= w) {
      uint32_t a[4];
      a[0] = PackBf16(sacc[2 * kk][0], sacc[2 * kk][1]);
      a[1] = PackBf16(sacc[2 * kk][2], sacc[2 * kk][3]);
      a[2] = PackBf16(sacc[2 * kk + 1][0], sacc[2 * kk + 1][1]);
      a[3] = PackBf16(sacc[2 * kk + 1][2], sacc[2 * kk + 1][3]);
#pragma unroll
      for (int np = 0; np < DVT / 16; ++np) {
        uint32_t bb[4];
        LoadBKN(bb, hs, SM::kSV, 16 * np, 16 * kk, lane);
        Mma(vacc[2 * np], a, bb[0], bb[1]);
        Mma(vacc[2 * np + 1], a, bb[2], bb[3]);
      }
    }
  }
  // dv leaves through shared memory in 16-byte pieces (warp w stages its rows in the dh slab's
  // rows 16w.., free after this barrier).
  __syncthreads();
  StoreAccStaged(p.dv + (tok0 + static_cast<int64_t>(16 * w) * d.NH) * d.DV + j0,
                 static_cast<bf16*>(nullptr), ldv, vacc, hs + 16 * w * SM::kSV,
                 static_cast<bf16*>(nullptr), lane, len - 16 * w);
}

// bwd_dv on warpgroup MMA (sm_90a wgmma), L 128 and dv a multiple of 128: the math of
// mlstm_bwd_dv above (K dC_{k+1} with dC's hi plane only and Pᵀ as single bf16, as there), one
// block per (head, chunk) for all 128-column dv slabs (helper mlstm8). Warpgroup wg owns the key
// rows s = 64wg..64wg+63 (identity map, as bwd_dqk_ws / fwd_out_ws3). Per 64-wide dk stage
// (swizzled K, Q tiles [128][64], dC_{k+1} rows [64 dk][128 dv]): slab 0 computes Sᵀ = K Qᵀ
// (m64n128, both K-major) once with dV_0 += K dC (dC N-major); Pᵀ = Sᵀ·scale ⊙ W / den then stays
// in registers (bf16 A fragments, bwd_dqk_ws's dS' mapping) while the block walks the slabs:
// slab j's dk stages load K (again, from L2) and dC_j, then dV_j = diag(E) dV_j + Pᵀ dH_j
// (register A, dH N-major). One cp.async pipeline of kStages 48 KB stages runs across the slabs;
// the dh slab of slab j + 1 loads at slab j + 1's first step (its barrier follows slab j's last
// read of the dh buffer); dv leaves through its own staging buffer (warp-private rows), so the
// next slab's loads stay in flight meanwhile.
// Per head-chunk at the 125m cell: 6.3M + 3 × (6.3M + 2.1M) = 31.5M MACs (mma.sync 33M; the
// one-block-per-slab wgmma version of session 8, which recomputed Sᵀ per slab, 44M, lost to this
// kernel and was deleted in session 9); 1024 blocks.
template <int kStages>
struct DvWgFusedSmem {
  static constexpr int kTile64 = 128 * 128;  // bytes of a [128 rows][64 cols] bf16 tile
  static constexpr int kH = 0;               // [128 t][128 dv] dh of the current slab
  static constexpr int kStage0 = 2 * kTile64;
  // Stage: K [128 s][64 dk], Q [128 t][64 dk] (slab 0 only), dC_{k+1} [64 dk][128 dv].
  static constexpr int kOffQ = kTile64, kOffC = 2 * kTile64;
  static constexpr int kStage = 3 * kTile64;
  static constexpr int kStaging = kStage0 + kStages * kStage;  // bf16 [128][128 + kPad] dv rows
  static constexpr int kFloats = kStaging + 128 * (128 + kPad) * 2;
  static constexpr size_t kBytes = kFloats + 4 * 128 * 4 + 1024;  // b, ĩ, m, 1/den; + alignment
  static_assert(kStages >= 2, "the pipeline below needs a stage in flight");
  static_assert(kBytes <= 227 * 1024, "one block's opt-in shared memory on sm_90");
};

// kSub 2 (chunk 256, always with kOff: mlstm_bwd_dv_wg_fused_l256_off): a block is one 128-token
// half k of chunk k / 2: its diagonal block, dC_{k/2+1} and m_{k/2+1}, E_t read from the gate scan
// (relative to the 256-token chunk's end, which the half may not contain).
// kOff (helper off256b, session 18): a half-0 block whose chunk has a second half also adds the
// chunk's off-diagonal block (the first half's keys against the second half's queries): dV_j += P̃'ᵀ dH1_j, with P̃'ᵀ (this thread's rows s, 8
// uint4 of mlstm_bwd_offdiag_p_l256's fragments, loaded once) and dH1_j (the second half's dh
// slab j) loaded beside slab j's dh into the staging buffer (a swizzled [128][128] tile fits its
// 34 KB; the stage ring has no room for a second dh slab). The 8 extra RS wgmmas join the slab's
// dH group; a block barrier then keeps the staging writes of the dv store behind both warpgroups'
// reads of dH1.
template <int kStages, int kSub, bool kOff = false>
__device__ __forceinline__ void BwdDvWgFused(const Dims& d, const BwdPtrs& p, const uint4* bfrag = nullptr) {
  using namespace hopper;
  using SM = DvWgFusedSmem<kStages>;
  constexpr int L = 128, DVT = 128, kThreads = 256, kSH = DVT + kPad;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* sm = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  const uint32_t sa = SmemAddr(sm);
  bf16* staging = reinterpret_cast<bf16*>(sm + SM::kStaging);
  float* bs = reinterpret_cast<float*>(sm + SM::kFloats);
  float* igs = bs + L;
  float* ms = igs + L;
  float* ivs = ms + L;
  const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5, g = lane >> 2, c = lane & 3;
  const int wg = __shfl_sync(0xffffffffu, tid >> 7, 0);  // warp-uniform (see bwd_dqk_ws)
  const int k = blockIdx.y, bh = blockIdx.z;
  const int kc = kSub == 1 ? k : k >> 1;  // chunk (state index) of this block
  const int b = bh / d.NH, hd = bh % d.NH;
  const int t0 = k * L, len = min(L, d.S - t0);
  const int64_t ldqk = static_cast<int64_t>(d.NH) * d.DK, ldv = static_cast<int64_t>(d.NH) * d.DV;
  const int64_t tok0 = (static_cast<int64_t>(b) * d.S + t0) * d.NH + hd;
  const int64_t so = static_cast<int64_t>(bh) * d.S + t0;
  const bf16* kbase = p.k + tok0 * d.DK;
  const bf16* qbase = p.q + tok0 * d.DK;
  const bf16* dhbase = p.dh + tok0 * d.DV;
  const bf16* dcbase = p.dc + (static_cast<int64_t>(bh) * d.NC + kc) * d.DK * d.DV;
  const float m_next = p.smk[static_cast<int64_t>(bh) * (d.NC + 1) + kc + 1];
  const int ndt = d.DK / 64, nslab = d.DV / DVT, nsteps = ndt * nslab;

  auto stage_ptr = [&](int stage) { return sm + SM::kStage0 + stage * SM::kStage; };
  auto load_dh = [&](int j) {
    LoadTileSw<L>(sm + SM::kH, dhbase + j * DVT, ldv, len, tid, kThreads);
    LoadTileSw<L>(sm + SM::kH + SM::kTile64, dhbase + j * DVT + 64, ldv, len, tid, kThreads);
  };
  // kOff: this half-0 block carries its chunk's off-diagonal block (block-uniform).
  const bool off = kOff && (k & 1) == 0 && t0 + L < d.S;
  const int len1 = kOff ? min(L, d.S - t0 - L) : 0;
  const bf16* dh1base = kOff ? p.dh + (tok0 + static_cast<int64_t>(L) * d.NH) * d.DV : nullptr;
  auto load_dh1 = [&](int j) {
    LoadTileSw<L>(sm + SM::kStaging, dh1base + j * DVT, ldv, len1, tid, kThreads);
    LoadTileSw<L>(sm + SM::kStaging + SM::kTile64, dh1base + j * DVT + 64, ldv, len1, tid, kThreads);
  };
  // Step x = slab j · ndt + dk tile dt.
  auto load_step = [&](int x) {
    const int j = x / ndt, dt = x % ndt;
    unsigned char* st = stage_ptr(x % kStages);
    LoadTileSw<L>(st, kbase + dt * 64, ldqk, len, tid, kThreads);
    if (j == 0) LoadTileSw<L>(st + SM::kOffQ, qbase + dt * 64, ldqk, len, tid, kThreads);
    const bf16* cb = dcbase + static_cast<int64_t>(dt) * 64 * d.DV + j * DVT;
    LoadTileSw<64>(st + SM::kOffC, cb, d.DV, 64, tid, kThreads);
    LoadTileSw<64>(st + SM::kOffC + 64 * 128, cb + 64, d.DV, 64, tid, kThreads);
  };
  // cp.async group x holds step x's tiles (group 0 also slab 0's dh; the group of step j · ndt
  // also slab j's dh); groups past nsteps − 1 hold at most a dh slab.
  load_dh(0);
  if constexpr (kOff) {
    if (off) load_dh1(0);
  }
#pragma unroll
  for (int i = 0; i < kStages - 1; ++i) {
    if (i < nsteps) load_step(i);
    CpAsyncCommit();
  }
  if (tid < L) {
    const bool ok = tid < len;
    bs[tid] = ok ? p.b_tok[so + tid] : 0.f;
    ms[tid] = ok ? p.m_tok[so + tid] : 0.f;
    igs[tid] = ok ? p.ig[tok0 + static_cast<int64_t>(tid) * d.NH] : -INFINITY;
    ivs[tid] = ok ? p.inv_d[so + tid] : 0.f;
  }
  // Step it's tiles visible, every thread done with step it − 1's stage and (it = j · ndt) with
  // slab j − 1's dh; then the loads of step it + kStages − 1 (and slab j's dh).
  auto advance = [&](int it) {
    CpAsyncWait<kStages - 2>();
    FenceProxyAsync();
    __syncthreads();
    if (it + kStages - 1 < nsteps) load_step(it + kStages - 1);
    if (it > 0 && it % ndt == 0) load_dh(it / ndt);
    if constexpr (kOff) {
      if (off && it > 0 && it % ndt == 0) load_dh1(it / ndt);
    }
    CpAsyncCommit();
  };

  const uint32_t own = wg * 64 * 128;  // this warpgroup's 64 rows of a [128][64] block
  const int r0 = 16 * w + g, r1 = r0 + 8;
  float vacc[64];
  uint32_t pa[8][4];
  uint32_t poff[8][4];  // kOff: P̃'ᵀ, this thread's rows s
  if constexpr (kOff) {
    if (off) {
      const uint4* src = bfrag + (static_cast<int64_t>(bh) * d.NC + kc) * 24 * 256 + tid;
#pragma unroll
      for (int kk = 0; kk < 8; ++kk) {
        const uint4 v4 = src[kk * 256];
        poff[kk][0] = v4.x;
        poff[kk][1] = v4.y;
        poff[kk][2] = v4.z;
        poff[kk][3] = v4.w;
      }
    }
  }
  float E0 = 0.f, E1 = 0.f;
  int it = 0;
  for (int j = 0; j < nslab; ++j) {
#pragma unroll
    for (int i = 0; i < 64; ++i) vacc[i] = 0.f;
    if (j == 0) {
      float sacc[64];
#pragma unroll
      for (int i = 0; i < 64; ++i) sacc[i] = 0.f;
      for (int dt = 0; dt < ndt; ++dt, ++it) {
        advance(it);
        const uint32_t st = sa + SM::kStage0 + (it % kStages) * SM::kStage;
        const uint64_t k_d = SmemDescSw128(st + own, 16, 1024);
        const uint64_t q_d = SmemDescSw128(st + SM::kOffQ, 16, 1024);
        const uint64_t c_d = SmemDescSw128(st + SM::kOffC, 64 * 128, 1024);
        WgmmaFence();
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
          const uint64_t ks = (kk * 32) >> 4, cs = (kk * 16 * 128) >> 4;
          WgmmaSS128<0, 0>(sacc, k_d + ks, q_d + ks, 1);
          WgmmaSS128<0, 1>(vacc, k_d + ks, c_d + cs, 1);
        }
        WgmmaCommit();
        WgmmaWait<0>();
        FenceRegs(sacc);
        FenceRegs(vacc);
      }
      // Pᵀ_st = Sᵀ_st · scale · W_ts / denom_t, causal t >= s, to bf16 A
      // fragments kept for every slab.
      if constexpr (kSub == 1) {
        const float gl = bs[len - 1];
        E0 = r0 < len ? __expf(gl - bs[r0] + igs[r0] - m_next) : 0.f;
        E1 = r1 < len ? __expf(gl - bs[r1] + igs[r1] - m_next) : 0.f;
      } else {
        E0 = r0 < len ? p.e_tok[so + r0] : 0.f;
        E1 = r1 < len ? p.e_tok[so + r1] : 0.f;
      }
      const float x0 = igs[r0] - bs[r0], x1 = igs[r1] - bs[r1];
#pragma unroll
      for (int nt = 0; nt < 16; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int t = nt * 8 + 2 * c + (e & 1);
          const int s = e < 2 ? r0 : r1;
          const float xs = e < 2 ? x0 : x1;
          float pv = 0.f;
          if (s <= t && t < len) pv = sacc[4 * nt + e] * d.scale * ivs[t] * __expf(bs[t] + xs - ms[t]);
          sacc[4 * nt + e] = pv;
        }
      }
#pragma unroll
      for (int kk = 0; kk < 8; ++kk) {
        pa[kk][0] = PackBf16(sacc[8 * kk + 0], sacc[8 * kk + 1]);
        pa[kk][1] = PackBf16(sacc[8 * kk + 2], sacc[8 * kk + 3]);
        pa[kk][2] = PackBf16(sacc[8 * kk + 4], sacc[8 * kk + 5]);
        pa[kk][3] = PackBf16(sacc[8 * kk + 6], sacc[8 * kk + 7]);
      }
    } else {
      for (int dt = 0; dt < ndt; ++dt, ++it) {
        advance(it);
        const uint32_t st = sa + SM::kStage0 + (it % kStages) * SM::kStage;
        const uint64_t k_d = SmemDescSw128(st + own, 16, 1024);
        const uint64_t c_d = SmemDescSw128(st + SM::kOffC, 64 * 128, 1024);
        WgmmaFence();
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
          WgmmaSS128<0, 1>(vacc, k_d + ((kk * 32) >> 4), c_d + ((kk * 16 * 128) >> 4), 1);
        }
        WgmmaCommit();
        WgmmaWait<0>();
        FenceRegs(vacc);
      }
    }
    // Slab j's dh landed with the group of step j · ndt, which the waits above cover once
    // ndt >= kStages; with fewer dk tiles, wait for everything.
    if (ndt < kStages) {
      CpAsyncWait<0>();
      FenceProxyAsync();
      __syncthreads();
    }
#pragma unroll
    for (int nt = 0; nt < 16; ++nt) {
      vacc[4 * nt + 0] *= E0;
      vacc[4 * nt + 1] *= E0;
      vacc[4 * nt + 2] *= E1;
      vacc[4 * nt + 3] *= E1;
    }
    {
      const uint64_t dh_d = SmemDescSw128(sa + SM::kH, SM::kTile64, 1024);
      WgmmaFence();
#pragma unroll
      for (int kk = 0; kk < 8; ++kk) {
        WgmmaRS128<1>(vacc, pa[kk], dh_d + ((kk * 16 * 128) >> 4));
      }
      if constexpr (kOff) {
        if (off) {
          const uint64_t dh1_d = SmemDescSw128(sa + SM::kStaging, SM::kTile64, 1024);
#pragma unroll
          for (int kk = 0; kk < 8; ++kk) WgmmaRS128<1>(vacc, poff[kk], dh1_d + ((kk * 16 * 128) >> 4));
        }
      }
      WgmmaCommit();
      WgmmaWait<0>();
      FenceRegs(vacc);
      FenceRegs(pa);
      if constexpr (kOff) {
        FenceRegs(poff);
        if (off) __syncthreads();  // both warpgroups' wgmmas are done reading dH1 in the staging buffer
      }
    }
    float dv4[16][4];
#pragma unroll
    for (int nt = 0; nt < 16; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) dv4[nt][e] = vacc[4 * nt + e];
    }
    __syncwarp();  // this warp's lanes are done reading its staging rows of slab j − 1
    StoreAccStaged(p.dv + (tok0 + static_cast<int64_t>(16 * w) * d.NH) * d.DV + j * DVT,
                   static_cast<bf16*>(nullptr), ldv, dv4, staging + 16 * w * kSH,
                   static_cast<bf16*>(nullptr), lane, len - 16 * w);
  }
}
template <int kStages>
__global__ void __launch_bounds__(256, 1) mlstm_bwd_dv_wg_fused(Dims d, BwdPtrs p) {
  BwdDvWgFused<kStages, 1>(d, p);
}
template <int kStages>
__global__ void __launch_bounds__(256, 1)
    mlstm_bwd_dv_wg_fused_l256_off(Dims d, BwdPtrs p, const uint4* __restrict__ bfrag) {
  BwdDvWgFused<kStages, 2, true>(d, p, bfrag);
}

// ---------------------------------------------------------------- 7. bwd_dqk

// Two stages of 64-wide dv tiles: phase 1 (dh, v, C_k rows of the slab), phase 3 (v, dC_{k+1});
// the q, k slabs and dS' stay for the whole block. Split precision: phase 1's C_k lo tiles live
// in the dS' region (written only after phase 1), phase 3's dC lo tiles in the stage's dh slot.
template <int L, int DKT, bool SPLIT>
struct DqkSmem {
  static constexpr int kS64 = 64 + kPad;
  static constexpr int kSK = DKT + kPad;
  static constexpr int kSL = L + kPad;
  static constexpr int kSlotA = SPLIT && DKT > L ? DKT : L;  // rows: dh (phase 1), dC lo (phase 3)
  static constexpr int kOffV = kSlotA * kS64;
  static constexpr int kOffC = kOffV + L * kS64;
  static constexpr int kStage = kOffC + DKT * kS64;  // dh|dC lo, v [L][72], C|dC [DKT][72]
  static constexpr int kQ = 2 * kStage;       // [L][DKT+8]
  static constexpr int kK = kQ + L * kSK;     // [L][DKT+8]
  static constexpr int kDS = kK + L * kSK;    // [L][L+8]  dS·scale (rows t); phase 1: C lo tiles
  static constexpr int kDSRegion = SPLIT && 2 * DKT * kS64 > L * kSL ? 2 * DKT * kS64 : L * kSL;
  static constexpr int kEnd = kDS + kDSRegion;
  static constexpr size_t kBytes = kEnd * 2 + (5 * L + 2 * DKT) * 4;
};

// The per-token and per-column vectors of one bwd_dqk block, into shared memory: b, m, ĩ, 1/den
// and dden of the chunk's L tokens (padding rows: ĩ = −∞, the rest 0); n_k and dn_{k+1} (summed
// over state_bwd's parts) of the block's DKT dk columns; in chunk 0, dn0 for d_initial. Shared by
// mlstm_bwd_dqk and mlstm_bwd_dqk_ws.
template <int L, int DKT>
__device__ __forceinline__ void LoadDqkVectors(const Dims& d, const BwdPtrs& p, int tid, int threads,
                                               int len, int64_t so, int64_t tok0, int bh, int k,
                                               int a0, float* bs, float* igs, float* ms, float* ivs,
                                               float* dds, float* nks, float* dnks) {
  if (tid < L) {
    const bool ok = tid < len;
    bs[tid] = ok ? p.b_tok[so + tid] : 0.f;
    ms[tid] = ok ? p.m_tok[so + tid] : 0.f;
    igs[tid] = ok ? p.ig[tok0 + static_cast<int64_t>(tid) * d.NH] : -INFINITY;
    ivs[tid] = ok ? p.inv_d[so + tid] : 0.f;
    dds[tid] = ok ? p.dden[so + tid] : 0.f;
  }
  for (int i = tid; i < DKT; i += threads) {
    nks[i] = p.sn[(static_cast<int64_t>(bh) * (d.NC + 1) + k) * d.DK + a0 + i];
    const float* dn_parts = p.dn + (static_cast<int64_t>(bh) * (d.NC + 1) + k) * d.dn_parts * d.DK + a0 + i;
    float dn = 0.f;
    for (int j = 0; j < d.dn_parts; ++j) dn += dn_parts[static_cast<int64_t>(j) * d.DK];
    dnks[i] = dn;
    if (k == 0 && p.dn0 != nullptr) {  // d_initial's dn0: state_bwd's dn_0 parts (slot NC)
      const float* d0 = p.dn + (static_cast<int64_t>(bh) * (d.NC + 1) + d.NC) * d.dn_parts * d.DK + a0 + i;
      float s0 = 0.f;
      for (int j = 0; j < d.dn_parts; ++j) s0 += d0[static_cast<int64_t>(j) * d.DK];
      p.dn0[static_cast<int64_t>(bh) * d.DK + a0 + i] = s0;
    }
  }
}

template <int L, int DKT, bool SPLIT>
__global__ void __launch_bounds__(2 * L) mlstm_bwd_dqk(Dims d, BwdPtrs p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  using SM = DqkSmem<L, DKT, SPLIT>;
  bf16* sm = reinterpret_cast<bf16*>(smem_raw);
  bf16 *qs = sm + SM::kQ, *ks = sm + SM::kK, *dss = sm + SM::kDS;
  float* bs = reinterpret_cast<float*>(sm + SM::kEnd);
  float* igs = bs + L;
  float* ms = igs + L;
  float* ivs = ms + L;
  float* dds = ivs + L;
  float* nks = dds + L;    // [DKT] n_k
  float* dnks = nks + DKT; // [DKT] dn_{k+1}
  constexpr int kThreads = 2 * L, kNt = L / 8, kQt = DKT / 8;
  const int tid = threadIdx.x, lane = tid & 31, w = RowTile<L / 16>(tid >> 5), g = lane >> 2,
            c = lane & 3;
  const int a0 = blockIdx.x * DKT, k = blockIdx.y, bh = blockIdx.z;
  const int b = bh / d.NH, hd = bh % d.NH;
  const int t0 = k * L, len = min(L, d.S - t0);
  const int64_t ldqk = static_cast<int64_t>(d.NH) * d.DK, ldv = static_cast<int64_t>(d.NH) * d.DV;
  const int64_t tok0 = (static_cast<int64_t>(b) * d.S + t0) * d.NH + hd;
  const int64_t so = static_cast<int64_t>(bh) * d.S + t0;
  const int64_t coff = ((static_cast<int64_t>(bh) * (d.NC + 1) + k) * d.DK + a0) * d.DV;
  const int64_t dcoff = ((static_cast<int64_t>(bh) * d.NC + k) * d.DK + a0) * d.DV;
  const bf16* cbase = p.sc + coff;
  const bf16* dcbase = p.dc + dcoff;
  const bf16* clobase = SPLIT ? p.sc_lo + coff : nullptr;
  const bf16* dclobase = SPLIT ? p.dc_lo + dcoff : nullptr;
  const float m_k = p.smk[static_cast<int64_t>(bh) * (d.NC + 1) + k];
  const float m_next = p.smk[static_cast<int64_t>(bh) * (d.NC + 1) + k + 1];

  LoadTile<L, DKT>(qs, SM::kSK, p.q + tok0 * d.DK + a0, ldqk, len, tid, kThreads);
  LoadTile<L, DKT>(ks, SM::kSK, p.k + tok0 * d.DK + a0, ldqk, len, tid, kThreads);
  CpAsyncCommit();
  LoadDqkVectors<L, DKT>(d, p, tid, kThreads, len, so, tok0, bh, k, a0, bs, igs, ms, ivs, dds, nks, dnks);

  // Phase 1: dP = dH Vᵀ (causal warps) and Y = dH C_kᵀ, contracting over dv in 64-wide tiles.
  float pacc[kNt][4], qacc[kQt][4];
#pragma unroll
  for (int i = 0; i < kNt; ++i) pacc[i][0] = pacc[i][1] = pacc[i][2] = pacc[i][3] = 0.f;
#pragma unroll
  for (int i = 0; i < kQt; ++i) qacc[i][0] = qacc[i][1] = qacc[i][2] = qacc[i][3] = 0.f;
  // Stage layout: slot A (dh in phase 1, dC lo in phase 3), L rows v, then DKT rows of C_k /
  // dC_{k+1}.
  auto load_p1 = [&](int jt, int stage) {
    bf16* st = sm + stage * SM::kStage;
    LoadTile<L, 64>(st, SM::kS64, p.dh + tok0 * d.DV + jt * 64, ldv, len, tid, kThreads);
    LoadTile<L, 64>(st + SM::kOffV, SM::kS64, p.v + tok0 * d.DV + jt * 64, ldv, len, tid,
                    kThreads);
    LoadTile<DKT, 64>(st + SM::kOffC, SM::kS64, cbase + jt * 64, d.DV, DKT, tid, kThreads);
    if constexpr (SPLIT) {
      LoadTile<DKT, 64>(dss + stage * DKT * SM::kS64, SM::kS64, clobase + jt * 64, d.DV, DKT, tid,
                        kThreads);
    }
    CpAsyncCommit();
  };
  auto load_p3 = [&](int jt, int stage) {
    bf16* st = sm + stage * SM::kStage;
    LoadTile<L, 64>(st + SM::kOffV, SM::kS64, p.v + tok0 * d.DV + jt * 64, ldv, len, tid,
                    kThreads);
    LoadTile<DKT, 64>(st + SM::kOffC, SM::kS64, dcbase + jt * 64, d.DV, DKT, tid, kThreads);
    if constexpr (SPLIT) {
      LoadTile<DKT, 64>(st, SM::kS64, dclobase + jt * 64, d.DV, DKT, tid, kThreads);
    }
    CpAsyncCommit();
  };
  const int njt = d.DV / 64;
  load_p1(0, 0);
  for (int jt = 0; jt < njt; ++jt) {
    if (jt + 1 < njt) {
      load_p1(jt + 1, (jt + 1) & 1);
      CpAsyncWait<1>();
    } else {
      CpAsyncWait<0>();
    }
    __syncthreads();
    const bf16* hs = sm + (jt & 1) * SM::kStage;
    const bf16* vs = hs + SM::kOffV;
    const bf16* cs = hs + SM::kOffC;
    const bf16* clos = dss + (jt & 1) * DKT * SM::kS64;
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      uint32_t a[4];
      LoadA(a, hs, SM::kS64, 16 * w, 16 * kk, lane);
#pragma unroll
      for (int np = 0; np < L / 16; ++np) {
        if (np <= w) {
          uint32_t bb[4];
          LoadBNK(bb, vs, SM::kS64, 16 * np, 16 * kk, lane);
          Mma(pacc[2 * np], a, bb[0], bb[1]);
          Mma(pacc[2 * np + 1], a, bb[2], bb[3]);
        }
      }
#pragma unroll
      for (int np = 0; np < DKT / 16; ++np) {  // C_hi, then C_lo (as in fwd_out)
        uint32_t bb[4];
        LoadBNK(bb, cs, SM::kS64, 16 * np, 16 * kk, lane);
        Mma(qacc[2 * np], a, bb[0], bb[1]);
        Mma(qacc[2 * np + 1], a, bb[2], bb[3]);
      }
      if constexpr (SPLIT) {
#pragma unroll
        for (int np = 0; np < DKT / 16; ++np) {
          uint32_t bb[4];
          LoadBNK(bb, clos, SM::kS64, 16 * np, 16 * kk, lane);
          Mma(qacc[2 * np], a, bb[0], bb[1]);
          Mma(qacc[2 * np + 1], a, bb[2], bb[3]);
        }
      }
    }
    __syncthreads();
  }
  load_p3(0, 0);  // phase 3's first tiles load while phase 2 runs (phase 1 ended with a barrier)
  // Phase 2: dS' = scale · W ⊙ (dP/denom + dden) (rows t), to shared memory; dQ.
  const int r0 = 16 * w + g, r1 = r0 + 8;
  const float b0v = bs[r0], b1v = bs[r1], m0v = ms[r0], m1v = ms[r1];
  const float iv0 = ivs[r0], iv1 = ivs[r1], dd0 = dds[r0], dd1 = dds[r1];
#pragma unroll
  for (int nt = 0; nt < kNt; ++nt) {
    if (nt / 2 <= w) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int s = nt * 8 + 2 * c + (e & 1);
        const int r = e < 2 ? r0 : r1;
        float v = 0.f;
        if (s <= r && r < len) {
          const float br = e < 2 ? b0v : b1v, mr = e < 2 ? m0v : m1v;
          const float iv = e < 2 ? iv0 : iv1, dd = e < 2 ? dd0 : dd1;
          v = d.scale * __expf(br - bs[s] + igs[s] - mr) * (pacc[nt][e] * iv + dd);
        }
        pacc[nt][e] = v;
      }
    }
  }
#pragma unroll
  for (int nt = 0; nt < kNt; ++nt) {
    const int col = nt * 8 + 2 * c;
    *reinterpret_cast<uint32_t*>(dss + r0 * SM::kSL + col) = PackBf16(pacc[nt][0], pacc[nt][1]);
    *reinterpret_cast<uint32_t*>(dss + r1 * SM::kSL + col) = PackBf16(pacc[nt][2], pacc[nt][3]);
  }
  {
    const float G0 = d.scale * __expf(b0v + m_k - m0v), G1 = d.scale * __expf(b1v + m_k - m1v);
#pragma unroll
    for (int nt = 0; nt < kQt; ++nt) {
      const int col = nt * 8 + 2 * c;
      qacc[nt][0] = G0 * (iv0 * qacc[nt][0] + dd0 * nks[col]);
      qacc[nt][1] = G0 * (iv0 * qacc[nt][1] + dd0 * nks[col + 1]);
      qacc[nt][2] = G1 * (iv1 * qacc[nt][2] + dd1 * nks[col]);
      qacc[nt][3] = G1 * (iv1 * qacc[nt][3] + dd1 * nks[col + 1]);
    }
  }
  // q, k landed before phase 1's last barrier; dS' is read only after phase 3's barriers.
#pragma unroll
  for (int kk = 0; kk < L / 16; ++kk) {
    if (kk <= w) {
      uint32_t a[4];
      a[0] = PackBf16(pacc[2 * kk][0], pacc[2 * kk][1]);
      a[1] = PackBf16(pacc[2 * kk][2], pacc[2 * kk][3]);
      a[2] = PackBf16(pacc[2 * kk + 1][0], pacc[2 * kk + 1][1]);
      a[3] = PackBf16(pacc[2 * kk + 1][2], pacc[2 * kk + 1][3]);
#pragma unroll
      for (int np = 0; np < DKT / 16; ++np) {
        uint32_t bb[4];
        LoadBKN(bb, ks, SM::kSK, 16 * np, 16 * kk, lane);
        Mma(qacc[2 * np], a, bb[0], bb[1]);
        Mma(qacc[2 * np + 1], a, bb[2], bb[3]);
      }
    }
  }
  {
    bf16* dqbase = p.dq + tok0 * d.DK + a0;
    float dot0 = 0.f, dot1 = 0.f;
#pragma unroll
    for (int nt = 0; nt < kQt; ++nt) {
      const int col = nt * 8 + 2 * c;
      const float2 q0 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(qs + r0 * SM::kSK + col));
      const float2 q1 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(qs + r1 * SM::kSK + col));
      dot0 += q0.x * qacc[nt][0] + q0.y * qacc[nt][1];
      dot1 += q1.x * qacc[nt][2] + q1.y * qacc[nt][3];
      if (r0 < len)
        *reinterpret_cast<uint32_t*>(dqbase + r0 * ldqk + col) = PackBf16(qacc[nt][0], qacc[nt][1]);
      if (r1 < len)
        *reinterpret_cast<uint32_t*>(dqbase + r1 * ldqk + col) = PackBf16(qacc[nt][2], qacc[nt][3]);
    }
    dot0 += __shfl_xor_sync(0xffffffffu, dot0, 1);
    dot0 += __shfl_xor_sync(0xffffffffu, dot0, 2);
    dot1 += __shfl_xor_sync(0xffffffffu, dot1, 1);
    dot1 += __shfl_xor_sync(0xffffffffu, dot1, 2);
    if (c == 0) {
      if (r0 < len) p.qdq[(so + r0) * p.n_dk_slabs + blockIdx.x] = dot0;
      if (r1 < len) p.qdq[(so + r1) * p.n_dk_slabs + blockIdx.x] = dot1;
    }
  }
  // Phase 3: dK = diag(E)(V dC_{k+1}ᵀ + dn_{k+1}) + dS'ᵀ Q  (rows s of this warp).
  float kacc[kQt][4];
#pragma unroll
  for (int i = 0; i < kQt; ++i) kacc[i][0] = kacc[i][1] = kacc[i][2] = kacc[i][3] = 0.f;
  for (int jt = 0; jt < njt; ++jt) {
    if (jt + 1 < njt) {
      load_p3(jt + 1, (jt + 1) & 1);
      CpAsyncWait<1>();
    } else {
      CpAsyncWait<0>();
    }
    __syncthreads();
    const bf16* vs = sm + (jt & 1) * SM::kStage + SM::kOffV;
    const bf16* dcs = sm + (jt & 1) * SM::kStage + SM::kOffC;
    const bf16* dclos = sm + (jt & 1) * SM::kStage;
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      uint32_t a[4];
      LoadA(a, vs, SM::kS64, 16 * w, 16 * kk, lane);
#pragma unroll
      for (int np = 0; np < DKT / 16; ++np) {  // dC_hi, then dC_lo
        uint32_t bb[4];
        LoadBNK(bb, dcs, SM::kS64, 16 * np, 16 * kk, lane);
        Mma(kacc[2 * np], a, bb[0], bb[1]);
        Mma(kacc[2 * np + 1], a, bb[2], bb[3]);
      }
      if constexpr (SPLIT) {
#pragma unroll
        for (int np = 0; np < DKT / 16; ++np) {
          uint32_t bb[4];
          LoadBNK(bb, dclos, SM::kS64, 16 * np, 16 * kk, lane);
          Mma(kacc[2 * np], a, bb[0], bb[1]);
          Mma(kacc[2 * np + 1], a, bb[2], bb[3]);
        }
      }
    }
    __syncthreads();
  }
  {
    const float gl = bs[len - 1];
    const float E0 = r0 < len ? __expf(gl - b0v + igs[r0] - m_next) : 0.f;
    const float E1 = r1 < len ? __expf(gl - b1v + igs[r1] - m_next) : 0.f;
#pragma unroll
    for (int nt = 0; nt < kQt; ++nt) {
      const int col = nt * 8 + 2 * c;
      kacc[nt][0] = E0 * (kacc[nt][0] + dnks[col]);
      kacc[nt][1] = E0 * (kacc[nt][1] + dnks[col + 1]);
      kacc[nt][2] = E1 * (kacc[nt][2] + dnks[col]);
      kacc[nt][3] = E1 * (kacc[nt][3] + dnks[col + 1]);
    }
  }
#pragma unroll
  for (int kk = 0; kk < L / 16; ++kk) {
    if (kk >= w) {
      uint32_t a[4];
      LoadAT(a, dss, SM::kSL, 16 * w, 16 * kk, lane);
#pragma unroll
      for (int np = 0; np < DKT / 16; ++np) {
        uint32_t bb[4];
        LoadBKN(bb, qs, SM::kSK, 16 * np, 16 * kk, lane);
        Mma(kacc[2 * np], a, bb[0], bb[1]);
        Mma(kacc[2 * np + 1], a, bb[2], bb[3]);
      }
    }
  }
  {
    bf16* dkbase = p.dk + tok0 * d.DK + a0;
    float dot0 = 0.f, dot1 = 0.f;
#pragma unroll
    for (int nt = 0; nt < kQt; ++nt) {
      const int col = nt * 8 + 2 * c;
      const float2 k0 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(ks + r0 * SM::kSK + col));
      const float2 k1 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(ks + r1 * SM::kSK + col));
      dot0 += k0.x * kacc[nt][0] + k0.y * kacc[nt][1];
      dot1 += k1.x * kacc[nt][2] + k1.y * kacc[nt][3];
      if (r0 < len)
        *reinterpret_cast<uint32_t*>(dkbase + r0 * ldqk + col) = PackBf16(kacc[nt][0], kacc[nt][1]);
      if (r1 < len)
        *reinterpret_cast<uint32_t*>(dkbase + r1 * ldqk + col) = PackBf16(kacc[nt][2], kacc[nt][3]);
    }
    dot0 += __shfl_xor_sync(0xffffffffu, dot0, 1);
    dot0 += __shfl_xor_sync(0xffffffffu, dot0, 2);
    dot1 += __shfl_xor_sync(0xffffffffu, dot1, 1);
    dot1 += __shfl_xor_sync(0xffffffffu, dot1, 2);
    if (c == 0) {
      if (r0 < len) p.kdk[(so + r0) * p.n_dk_slabs + blockIdx.x] = dot0;
      if (r1 < len) p.kdk[(so + r1) * p.n_dk_slabs + blockIdx.x] = dot1;
    }
  }
}

// bwd_dqk on warpgroup MMA (sm_90a wgmma), L 128 and 128-column dq/dk slabs: mlstm_bwd_dqk_ws
// below. The same three phases and math as mlstm_bwd_dqk above; what changes is how the products
// run:
//   - two consumer warpgroups; warpgroup wg owns the chunk's rows 64wg..64wg+63 (the identity
//     warp -> 16-row map; the paired RowTile map of the mma.sync kernel cannot be expressed: a
//     wgmma's 64 rows are contiguous in its A operand);
//   - every tile sits in shared memory in the 128-byte swizzle (hopper_mma.cuh), written by TMA
//     (DqkWgSmem: three stages in phase 1, two in phase 3);
//   - phase 1: dP = dH Vᵀ and Y = dH C_kᵀ (hi + lo) are m64n128k16 wgmma with both operands in
//     shared memory (K-major), 12 per stage and warpgroup, one commit;
//   - dQ += dS' K with dS' in registers (the dP accumulators packed to bf16, as attention's P·V)
//     and K N-major in shared memory;
//   - phase 3: V dC_{k+1}ᵀ (hi + lo) as phase 1; dK += dS'ᵀ Q with dS' from shared memory as an
//     M-major A operand (transposed), Q N-major.
// Both warpgroups run the full 128-key (128-query) products: the causal zeros of dS' make the
// extra terms vanish, and skipping them per warpgroup put wgmma under a branch on the warpgroup
// index, which ptxas serialises (C7520) or fences (C7519) (kernels/cuda/mlstm_notes.md).
// Executed MACs per block at the 125m cell (DV 384): dP 6.3M, Y 12.6M, dQ 2.1M, phase 3 12.6M,
// dK 2.1M = 35.7M (the mma.sync kernel: 31.3M).
//
// Shared memory (192 KB of tiles) is laid out twice. Phase 1 (no Q, K or dS' needed yet): three
// stages of 64 KB (dh, V, C_k, C_k lo tiles, [128][64] each), so two stages load while one
// multiplies. Phases 2-3: Q, K, dS' (32 KB each) and two 48 KB stages (dC lo, V, dC). Q and K
// load into phase-1 stage 0 once its last user is done.
template <bool SPLIT>
struct DqkWgSmem {
  static constexpr int kL = 128, kDKT = 128;
  static constexpr int kTile64 = 128 * 128;     // bytes of a [128 rows][64 cols] bf16 tile
  // Phase 1.
  static constexpr int kP1Stage = 4 * kTile64;  // dh, V, C, C lo
  static constexpr int kP1Stages = 3;
  // Phases 2-3.
  static constexpr int kQ = 0;                  // [128 t][128 dk]  (2 column blocks)
  static constexpr int kK = kQ + 2 * kTile64;   // [128 s][128 dk]
  static constexpr int kDS = kK + 2 * kTile64;  // [128 t][128 s] dS'
  static constexpr int kStages = kDS + 2 * kTile64;
  // Phase-3 stage: dC lo [128 dk][64], V [128 s][64], dC_{k+1} [128 dk][64].
  static constexpr int kStage = 3 * kTile64;
  static constexpr int kOffV = kTile64, kOffC = 2 * kTile64;
  static constexpr int kFloats = kStages + 2 * kStage;
  static_assert(kP1Stages * kP1Stage == kFloats, "the two layouts share the tile region");
  static constexpr size_t kBytes = kFloats + (5 * kL + 2 * kDKT) * 4 + 1024;  // + alignment
};


// bwd_dqk with a TMA producer (helper mlstm9): the products above, fed by
//   - warpgroup 0 (one thread; 40 registers after setmaxnreg) issuing every tile load as a TMA
//     copy (cp.async.bulk.tensor, the 128-byte swizzle; zeros past the sequence end) onto an
//     mbarrier per stage ("full": expect_tx bytes); consumers arrive on the stage's "empty"
//     mbarrier (one arrival per warp) once their wgmma that read it retired, and the producer
//     refills it at once (no block barrier anywhere after the start);
//   - the consumers keep one wgmma group in flight across the wait for the next stage (wait
//     depth 1), so the tensor pipe is fed while the next stage's barrier resolves;
//   - phase 1: three 64 KB stages; Q and K load into stage 0's region once its last phase-1
//     user arrived; phase 3's two 48 KB stages load once all of phase 1 is consumed (they overlap
//     stages 1 and 2), i.e. during phase 2; the two warpgroups meet on a named barrier (256
//     threads) after phase 1 (dS' overwrites stage 1 and the per-row vectors are read) and
//     before dK += dS'ᵀ Q (dS' is written by both).
// 384 threads: the producer warpgroup and two consumer warpgroups (232 registers after
// setmaxnreg; 128 · 40 + 256 · 232 <= 65536). (288 threads, one producer warp, cap every thread
// at 168 registers: three warps on one SM sub-partition; that build spilled.)
// Measured against the cp.async version it replaced (256 threads, a block barrier per stage;
// H200, session 9): 0.834 -> 0.675 ms at the 125m cell (ncu: DRAM 47% -> 58% of peak, tensor
// pipe 28% -> 34%, barrier stalls 28% -> 7%), 0.347 -> 0.289 ms at the 1.3b layout.
struct DqkWsBars {  // mbarrier byte offsets after DqkWgSmem's tiles and vectors
  static constexpr int kFull1 = 0, kEmpty1 = 24, kFullQK = 48, kFull3 = 56, kEmpty3 = 72;
  static constexpr int kBytes = 88;
};

struct DqkTmaMaps {
  CUtensorMap q, k, v, dh;  // 4-d: (columns, heads, tokens, batch), box 64 × 1 × 128 × 1
  CUtensorMap c, c_lo;      // 2-d: (dv, rows of [BH][NC+1][dk]), box 64 × 128
  CUtensorMap dc, dc_lo;    // 2-d: (dv, rows of [BH][NC][dk]), box 64 × 128
};

// bwd_dqk's phase 2, shared by BwdDqkWs and its persistent form (mlstm_bwd_dqk_ws_persist): the
// thread's rows r0, r1 of dS' = scale · W ⊙ (dP/denom + dden) (causal s <= t; rows past len zero)
// from pacc = dP, stored swizzled ([t][s]) at dss for phase 3's dK and packed into pa, the bf16 A
// fragments of dQ += dS' K; qacc (dH C_kᵀ) scaled in place to the inter-chunk part of dQ,
// G · (dP_inter/denom + dden · n_k). b0v, b1v (the rows' gate sums) are the epilogue's too.
template <int L>
__device__ __forceinline__ void DqkPhase2(const Dims& d, float (&pacc)[64], float (&qacc)[64], uint32_t (&pa)[8][4],
                                          float& b0v, float& b1v, unsigned char* dss, const float* bs,
                                          const float* igs, const float* ms, const float* ivs, const float* dds,
                                          const float* nks, int r0, int r1, int c, int len, float m_k) {
  using namespace hopper;
  b0v = bs[r0];
  b1v = bs[r1];
  const float m0v = ms[r0], m1v = ms[r1];
  const float iv0 = ivs[r0], iv1 = ivs[r1], dd0 = dds[r0], dd1 = dds[r1];
#pragma unroll
  for (int nt = 0; nt < 16; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int s = nt * 8 + 2 * c + (e & 1);
      const int r = e < 2 ? r0 : r1;
      float v = 0.f;
      if (s <= r && r < len) {
        const float br = e < 2 ? b0v : b1v, mr = e < 2 ? m0v : m1v;
        const float iv = e < 2 ? iv0 : iv1, dd = e < 2 ? dd0 : dd1;
        v = d.scale * __expf(br - bs[s] + igs[s] - mr) * (pacc[4 * nt + e] * iv + dd);
      }
      pacc[4 * nt + e] = v;
    }
  }
#pragma unroll
  for (int kk = 0; kk < 8; ++kk) {
    pa[kk][0] = PackBf16(pacc[8 * kk + 0], pacc[8 * kk + 1]);
    pa[kk][1] = PackBf16(pacc[8 * kk + 2], pacc[8 * kk + 3]);
    pa[kk][2] = PackBf16(pacc[8 * kk + 4], pacc[8 * kk + 5]);
    pa[kk][3] = PackBf16(pacc[8 * kk + 6], pacc[8 * kk + 7]);
    const int col = 16 * kk + 2 * c;
    *reinterpret_cast<uint32_t*>(dss + Sw128Offset<L>(r0, col)) = pa[kk][0];
    *reinterpret_cast<uint32_t*>(dss + Sw128Offset<L>(r1, col)) = pa[kk][1];
    *reinterpret_cast<uint32_t*>(dss + Sw128Offset<L>(r0, col + 8)) = pa[kk][2];
    *reinterpret_cast<uint32_t*>(dss + Sw128Offset<L>(r1, col + 8)) = pa[kk][3];
  }
  FenceProxyAsync();  // dS' is read by the dK wgmma (after the named barrier that follows)
  const float G0 = d.scale * __expf(b0v + m_k - m0v), G1 = d.scale * __expf(b1v + m_k - m1v);
#pragma unroll
  for (int nt = 0; nt < 16; ++nt) {
    const int col = nt * 8 + 2 * c;
    qacc[4 * nt + 0] = G0 * (iv0 * qacc[4 * nt + 0] + dd0 * nks[col]);
    qacc[4 * nt + 1] = G0 * (iv0 * qacc[4 * nt + 1] + dd0 * nks[col + 1]);
    qacc[4 * nt + 2] = G1 * (iv1 * qacc[4 * nt + 2] + dd1 * nks[col]);
    qacc[4 * nt + 3] = G1 * (iv1 * qacc[4 * nt + 3] + dd1 * nks[col + 1]);
  }
}

// bwd_dqk's dQ after phase 2, shared by BwdDqkWs and its persistent form: dQ += dS' K (K [s][dk]
// at k_d, N-major B in two 64-column blocks; pa from DqkPhase2), dQ's rows r0, r1 stored as bf16,
// and their q·dq dots (the gates' backward) into p.qdq's column `slab`.
// (`slab` keeps its caller's type: blockIdx.x's unsigned in BwdDqkWs, an int in the persistent
// kernel, so each kernel's index arithmetic is what it was before the fold.)
template <int L, typename Slab>
__device__ __forceinline__ void DqkDqStore(const Dims& d, const BwdPtrs& p, float (&qacc)[64], uint32_t (&pa)[8][4],
                                           uint64_t k_d, const unsigned char* qs, int64_t tok0, int a0, int64_t ldqk,
                                           int64_t so, Slab slab, int r0, int r1, int c, int len) {
  using namespace hopper;
  WgmmaFence();
#pragma unroll
  for (int kk = 0; kk < 8; ++kk) {
    WgmmaRS128<1>(qacc, pa[kk], k_d + ((kk * 16 * 128) >> 4));
  }
  WgmmaCommit();
  WgmmaWait<0>();
  FenceRegs(qacc);
  FenceRegs(pa);
  bf16* dqbase = p.dq + tok0 * d.DK + a0;
  float dot0 = 0.f, dot1 = 0.f;
#pragma unroll
  for (int nt = 0; nt < 16; ++nt) {
    const int col = nt * 8 + 2 * c;
    const float2 q0 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(qs + Sw128Offset<L>(r0, col)));
    const float2 q1 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(qs + Sw128Offset<L>(r1, col)));
    dot0 += q0.x * qacc[4 * nt + 0] + q0.y * qacc[4 * nt + 1];
    dot1 += q1.x * qacc[4 * nt + 2] + q1.y * qacc[4 * nt + 3];
    if (r0 < len) *reinterpret_cast<uint32_t*>(dqbase + r0 * ldqk + col) = PackBf16(qacc[4 * nt], qacc[4 * nt + 1]);
    if (r1 < len)
      *reinterpret_cast<uint32_t*>(dqbase + r1 * ldqk + col) = PackBf16(qacc[4 * nt + 2], qacc[4 * nt + 3]);
  }
  dot0 += __shfl_xor_sync(0xffffffffu, dot0, 1);
  dot0 += __shfl_xor_sync(0xffffffffu, dot0, 2);
  dot1 += __shfl_xor_sync(0xffffffffu, dot1, 1);
  dot1 += __shfl_xor_sync(0xffffffffu, dot1, 2);
  if (c == 0) {
    if (r0 < len) p.qdq[(so + r0) * p.n_dk_slabs + slab] = dot0;
    if (r1 < len) p.qdq[(so + r1) * p.n_dk_slabs + slab] = dot1;
  }
}

// kSub 2 (chunk 256, always with kOff: mlstm_bwd_dqk_ws_l256_off): a block is one 128-token half
// k of chunk k / 2: its diagonal block with C_{k/2}, dC_{k/2+1}, n, dn, m of that chunk and E_t
// from the gate scan. (Both halves of chunk 0 write d_initial's dn0: the same values from the same
// inputs.)
// kEager (GYRE_MLSTM_RING=eager, helper dqk16, session 16; opt-in): a consumer warp releases a
// stage as soon as its own wgmma group on it retired (wait<0> right after the commit) instead of
// after the next stage arrived (wait<1>). The same products in the same order (bitwise the same
// outputs); what changes is when the producer may refill a slot. With the lagged release a slot
// is freed only once the following stage landed, so phase 1 (three slots) keeps about two stages
// in flight and phase 3 (two slots) one; the eager release adds one each, at the cost of the
// tensor pipe draining between stages. Measured (H100, 125m cell, ncu + B1): a block alone on its
// SM takes as long as in a full wave (36 vs 33 µs) with 58% of its warp stalls on long
// scoreboard (the mbarrier waits): the blocks wait on load latency, not on DRAM bandwidth.
// Eager vs lag (H100, medians of 3): 125m cell 0.765 -> 0.721 ms, 1.3b cell 1.018 -> 0.966 ms.
// kOff (kSub 2; helper off256b, session 18): the chunk's off-diagonal block inside the blocks (it
// first ran as a separate pass afterwards, deleted). A half-1 block (rows t) adds dS' K0: its producer loads
// K0's [128 s][128 dk] slab as an extra phase-3 ring step in front (step 0: the dC lo and V slots,
// contiguous, hold the two 64-column blocks as the Q / K regions do), and the consumers run 8 RS
// wgmmas (A = dS' rows t, mlstm_bwd_offdiag_p_l256's fragments 16-23) into qacc just before the
// dQ product. A half-0 block whose chunk has a second half (rows s) adds dS'ᵀ Q1: Q1's slab comes
// as an extra step after phase 3 (zeros past the sequence end), the 8 RS wgmmas (fragments 8-15)
// join the dS'ᵀ Q group. The q·dq / k·dk dots then cover the whole row; one bf16 rounding.
template <bool SPLIT, int kSub, bool kEager = false, bool kOff = false>
__device__ __forceinline__ void BwdDqkWs(const Dims& d, const BwdPtrs& p, const DqkTmaMaps& maps,
                                         const uint4* bfrag = nullptr) {
  using namespace hopper;
  using SM = DqkWgSmem<SPLIT>;
  constexpr int L = 128, DKT = 128, kConsumers = 256;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* sm = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  const uint32_t sa = SmemAddr(sm);
  unsigned char *qs = sm + SM::kQ, *ks = sm + SM::kK, *dss = sm + SM::kDS;
  float* bs = reinterpret_cast<float*>(sm + SM::kFloats);
  float* igs = bs + L;
  float* ms = igs + L;
  float* ivs = ms + L;
  float* dds = ivs + L;
  float* nks = dds + L;     // [DKT] n_k
  float* dnks = nks + DKT;  // [DKT] dn_{k+1}
  const uint32_t bars = sa + SM::kFloats + (5 * L + 2 * DKT) * 4;
  const uint32_t full1 = bars + DqkWsBars::kFull1, empty1 = bars + DqkWsBars::kEmpty1;
  const uint32_t full_qk = bars + DqkWsBars::kFullQK;
  const uint32_t full3 = bars + DqkWsBars::kFull3, empty3 = bars + DqkWsBars::kEmpty3;
  const int a0 = blockIdx.x * DKT, k = blockIdx.y, bh = blockIdx.z;
  const int kc = kSub == 1 ? k : k >> 1;  // chunk (state index) of this block
  const int b = bh / d.NH, hd = bh % d.NH;
  const int t0 = k * L, len = min(L, d.S - t0);
  const int njt = d.DV / 64;
  // kOff: off1 = a half-1 block (its K0 step first), off0 = a half-0 block with a second half (its
  // Q1 step last); block-uniform.
  const bool off1 = kOff && (k & 1) == 1;
  const bool off0 = kOff && (k & 1) == 0 && t0 + L < d.S;
  const int shift3 = off1 ? 1 : 0;  // phase-3 ring position of dv tile 0
  if (threadIdx.x == 0) {
    for (int i = 0; i < 3; ++i) {
      MbInit(full1 + 8 * i, 1);
      MbInit(empty1 + 8 * i, 8);
    }
    MbInit(full_qk, 1);
    for (int i = 0; i < 2; ++i) {
      MbInit(full3 + 8 * i, 1);
      MbInit(empty3 + 8 * i, 8);
    }
    MbInitFence();
  }
  __syncthreads();

  if (threadIdx.x < 128) {  // producer warpgroup: one thread issues all loads
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    if (threadIdx.x == 0) {
      const int c_row = (bh * (d.NC + 1) + kc) * d.DK + a0;
      const int dc_row = (bh * d.NC + kc) * d.DK + a0;
      constexpr uint32_t kP1Bytes = (SPLIT ? 4 : 3) * SM::kTile64;
      constexpr uint32_t kP3Bytes = (SPLIT ? 3 : 2) * SM::kTile64;
      for (int jt = 0; jt < njt; ++jt) {
        const int slot = jt % 3, use = jt / 3;
        if (use > 0) MbWait(empty1 + 8 * slot, (use - 1) & 1);
        const uint32_t st = sa + slot * SM::kP1Stage, fb = full1 + 8 * slot;
        MbArriveExpectTx(fb, kP1Bytes);
        TmaTile4d(st, &maps.dh, fb, jt * 64, hd, t0, b);
        TmaTile4d(st + SM::kTile64, &maps.v, fb, jt * 64, hd, t0, b);
        TmaTile2d(st + 2 * SM::kTile64, &maps.c, fb, jt * 64, c_row);
        if constexpr (SPLIT) TmaTile2d(st + 3 * SM::kTile64, &maps.c_lo, fb, jt * 64, c_row);
      }
      // Q, K into stage 0's region after its last phase-1 use.
      const int last0 = (njt - 1) / 3;  // uses of stage 0: 0..last0
      MbWait(empty1, last0 & 1);
      MbArriveExpectTx(full_qk, 4 * SM::kTile64);
      TmaTile4d(sa + SM::kQ, &maps.q, full_qk, a0, hd, t0, b);
      TmaTile4d(sa + SM::kQ + SM::kTile64, &maps.q, full_qk, a0 + 64, hd, t0, b);
      TmaTile4d(sa + SM::kK, &maps.k, full_qk, a0, hd, t0, b);
      TmaTile4d(sa + SM::kK + SM::kTile64, &maps.k, full_qk, a0 + 64, hd, t0, b);
      // Phase 3's stages overlap phase-1 stages 1 and 2: wait for their last uses.
      for (int slot = 1; slot < 3 && slot < njt; ++slot) {
        MbWait(empty1 + 8 * slot, ((njt - 1 - slot) / 3) & 1);
      }
      if constexpr (kOff) {
        if (off1) {  // ring position 0: K0's slab (dC lo and V slots of stage 0)
          const uint32_t st = sa + SM::kStages, fb = full3;
          MbArriveExpectTx(fb, 2 * SM::kTile64);
          TmaTile4d(st, &maps.k, fb, a0, hd, t0 - L, b);
          TmaTile4d(st + SM::kTile64, &maps.k, fb, a0 + 64, hd, t0 - L, b);
        }
      }
      for (int jt = 0; jt < njt; ++jt) {
        int x = jt;
        if constexpr (kOff) x += shift3;
        const int slot = x & 1, use = x >> 1;
        if (use > 0) MbWait(empty3 + 8 * slot, (use - 1) & 1);
        const uint32_t st = sa + SM::kStages + slot * SM::kStage, fb = full3 + 8 * slot;
        MbArriveExpectTx(fb, kP3Bytes);
        TmaTile4d(st + SM::kOffV, &maps.v, fb, jt * 64, hd, t0, b);
        TmaTile2d(st + SM::kOffC, &maps.dc, fb, jt * 64, dc_row);
        if constexpr (SPLIT) TmaTile2d(st, &maps.dc_lo, fb, jt * 64, dc_row);
      }
      if constexpr (kOff) {
        if (off0) {  // ring position njt: Q1's slab (zeros past the sequence end)
          const int x = njt, slot = x & 1, use = x >> 1;
          if (use > 0) MbWait(empty3 + 8 * slot, (use - 1) & 1);
          const uint32_t st = sa + SM::kStages + slot * SM::kStage, fb = full3 + 8 * slot;
          MbArriveExpectTx(fb, 2 * SM::kTile64);
          TmaTile4d(st, &maps.q, fb, a0, hd, t0 + L, b);
          TmaTile4d(st + SM::kTile64, &maps.q, fb, a0 + 64, hd, t0 + L, b);
        }
      }
    }
    return;
  }

  // Consumers: warps 4-11 (consumer thread index tid 0..255), warpgroup wg owns rows
  // 64wg..64wg+63.
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
  const int tid = threadIdx.x - 128, lane = tid & 31, w = tid >> 5, g = lane >> 2, c = lane & 3;
  const int wg = __shfl_sync(0xffffffffu, tid >> 7, 0);
  const int64_t ldqk = static_cast<int64_t>(d.NH) * d.DK;
  const int64_t tok0 = (static_cast<int64_t>(b) * d.S + t0) * d.NH + hd;
  const int64_t so = static_cast<int64_t>(bh) * d.S + t0;
  const float m_k = p.smk[static_cast<int64_t>(bh) * (d.NC + 1) + kc];
  const float m_next = p.smk[static_cast<int64_t>(bh) * (d.NC + 1) + kc + 1];
  LoadDqkVectors<L, DKT>(d, p, tid, kConsumers, len, so, tok0, bh, kc, a0, bs, igs, ms, ivs, dds, nks, dnks);

  // Phase 1: dP = dH Vᵀ and Y = dH C_kᵀ over dv in 64-wide tiles; one wgmma group in flight
  // while the next stage's mbarrier is awaited.
  float pacc[64], qacc[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) pacc[i] = qacc[i] = 0.f;
  const uint32_t own = wg * 64 * 128;  // this warpgroup's 64 rows of a [128][64] block
  for (int jt = 0; jt < njt; ++jt) {
    const int slot = jt % 3;
    MbWait(full1 + 8 * slot, (jt / 3) & 1);
    const uint32_t st = sa + slot * SM::kP1Stage;
    const uint64_t dh_d = SmemDescSw128(st + own, 16, 1024);
    const uint64_t v_d = SmemDescSw128(st + SM::kTile64, 16, 1024);
    const uint64_t c_d = SmemDescSw128(st + 2 * SM::kTile64, 16, 1024);
    const uint64_t clo_d = SmemDescSw128(st + 3 * SM::kTile64, 16, 1024);
    WgmmaFence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      const uint64_t step = (kk * 32) >> 4;
      WgmmaSS128<0, 0>(pacc, dh_d + step, v_d + step, 1);
      WgmmaSS128<0, 0>(qacc, dh_d + step, c_d + step, 1);
      if constexpr (SPLIT) WgmmaSS128<0, 0>(qacc, dh_d + step, clo_d + step, 1);
    }
    WgmmaCommit();
    if constexpr (kEager) {
      WgmmaWait<0>();  // this step's group retired: its stage is free now
      if (lane == 0) MbArrive(empty1 + 8 * slot);
    } else if (jt > 0) {
      WgmmaWait<1>();  // step jt − 1's group retired: its stage is free
      if (lane == 0) MbArrive(empty1 + 8 * ((jt - 1) % 3));
    }
  }
  WgmmaWait<0>();
  FenceRegs(pacc);
  FenceRegs(qacc);
  if (!kEager && lane == 0) MbArrive(empty1 + 8 * ((njt - 1) % 3));
  // Both warpgroups are done with phase 1 (dS' overwrites stage 1's region); the vectors landed.
  NamedBarrierSync(1, kConsumers);
  // Phase 2: dS' = scale · W ⊙ (dP/denom + dden) (rows t, causal s <= t), to shared memory
  // (swizzled [t][s]) for phase 3 and packed to bf16 A fragments for dQ.
  const int r0 = 16 * w + g, r1 = r0 + 8;
  float b0v, b1v;
  uint32_t pa[8][4];
  DqkPhase2<L>(d, pacc, qacc, pa, b0v, b1v, dss, bs, igs, ms, ivs, dds, nks, r0, r1, c, len, m_k);
  // kOff, off1: dQ += dS'_off K0 (K0 at ring position 0), ahead of the block's own dS' K.
  const uint4* offsrc = nullptr;
  uint32_t dsq[8][4];  // dS'_off rows t: live until DqkDqStore's wait retired the wgmmas reading them
  if constexpr (kOff) {
    offsrc = bfrag + (static_cast<int64_t>(bh) * d.NC + kc) * 24 * 256 + tid;
    if (off1) {
#pragma unroll
      for (int kk = 0; kk < 8; ++kk) {
        const uint4 v4 = offsrc[(16 + kk) * 256];
        dsq[kk][0] = v4.x;
        dsq[kk][1] = v4.y;
        dsq[kk][2] = v4.z;
        dsq[kk][3] = v4.w;
      }
      MbWait(full3, 0);
      const uint64_t k0_d = SmemDescSw128(sa + SM::kStages, SM::kTile64, 1024);
      WgmmaFence();
#pragma unroll
      for (int kk = 0; kk < 8; ++kk) WgmmaRS128<1>(qacc, dsq[kk], k0_d + ((kk * 16 * 128) >> 4));
      WgmmaCommit();
    }
  }
  MbWait(full_qk, 0);
  // dQ += dS' K, dQ stored, the q·dq dots.
  DqkDqStore<L>(d, p, qacc, pa, SmemDescSw128(sa + SM::kK, SM::kTile64, 1024), qs, tok0, a0, ldqk, so, blockIdx.x, r0,
                r1, c, len);
  if constexpr (kOff) {
    FenceRegs(dsq);
    if (off1 && lane == 0) MbArrive(empty3);  // K0's step retired (DqkDqStore waited for all groups)
  }
  // Phase 3: dK = diag(E)(V dC_{k+1}ᵀ + dn_{k+1}) + dS'ᵀ Q  (rows s of this warpgroup).
  float kacc[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) kacc[i] = 0.f;
  uint32_t dsk[8][4];  // kOff, off0: dS'ᵀ_off, this thread's rows s
  if constexpr (kOff) {
    if (off0) {
#pragma unroll
      for (int kk = 0; kk < 8; ++kk) {
        const uint4 v4 = offsrc[(8 + kk) * 256];
        dsk[kk][0] = v4.x;
        dsk[kk][1] = v4.y;
        dsk[kk][2] = v4.z;
        dsk[kk][3] = v4.w;
      }
    }
  }
  for (int jt = 0; jt < njt; ++jt) {
    int x = jt;
    if constexpr (kOff) x += shift3;
    const int slot = x & 1;
    MbWait(full3 + 8 * slot, (x >> 1) & 1);
    const uint32_t st = sa + SM::kStages + slot * SM::kStage;
    const uint64_t v_d = SmemDescSw128(st + SM::kOffV + own, 16, 1024);
    const uint64_t dc_d = SmemDescSw128(st + SM::kOffC, 16, 1024);
    const uint64_t dclo_d = SmemDescSw128(st, 16, 1024);
    WgmmaFence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      const uint64_t step = (kk * 32) >> 4;
      WgmmaSS128<0, 0>(kacc, v_d + step, dc_d + step, 1);
      if constexpr (SPLIT) WgmmaSS128<0, 0>(kacc, v_d + step, dclo_d + step, 1);
    }
    WgmmaCommit();
    if constexpr (kEager) {
      WgmmaWait<0>();
      if (lane == 0) MbArrive(empty3 + 8 * slot);
    } else if (jt > 0) {
      WgmmaWait<1>();
      if (lane == 0) MbArrive(empty3 + 8 * ((x - 1) & 1));
    }
  }
  WgmmaWait<0>();
  FenceRegs(kacc);
  {
    float E0, E1;
    if constexpr (kSub == 1) {
      const float gl = bs[len - 1];
      E0 = r0 < len ? __expf(gl - b0v + igs[r0] - m_next) : 0.f;
      E1 = r1 < len ? __expf(gl - b1v + igs[r1] - m_next) : 0.f;
    } else {
      E0 = r0 < len ? p.e_tok[so + r0] : 0.f;
      E1 = r1 < len ? p.e_tok[so + r1] : 0.f;
    }
#pragma unroll
    for (int nt = 0; nt < 16; ++nt) {
      const int col = nt * 8 + 2 * c;
      kacc[4 * nt + 0] = E0 * (kacc[4 * nt + 0] + dnks[col]);
      kacc[4 * nt + 1] = E0 * (kacc[4 * nt + 1] + dnks[col + 1]);
      kacc[4 * nt + 2] = E1 * (kacc[4 * nt + 2] + dnks[col]);
      kacc[4 * nt + 3] = E1 * (kacc[4 * nt + 3] + dnks[col + 1]);
    }
  }
  NamedBarrierSync(1, kConsumers);  // dS' from both warpgroups written (and fenced)
  // dK += dS'ᵀ Q: dS' [t][s] is an M-major A (this warpgroup's column block of s), Q [t][dk]
  // N-major B.
  {
    const uint64_t ds_d = SmemDescSw128(sa + SM::kDS + wg * SM::kTile64, SM::kTile64, 1024);
    const uint64_t q_d = SmemDescSw128(sa + SM::kQ, SM::kTile64, 1024);
    if constexpr (kOff) {
      if (off0) MbWait(full3 + 8 * (njt & 1), (njt >> 1) & 1);  // Q1's step
    }
    WgmmaFence();
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) {
      const uint64_t step = (kk * 16 * 128) >> 4;
      WgmmaSS128<1, 1>(kacc, ds_d + step, q_d + step, 1);
    }
    if constexpr (kOff) {
      if (off0) {  // dK += dS'ᵀ_off Q1 (A: this thread's rows s in registers, Q1 N-major)
        const uint64_t q1_d = SmemDescSw128(sa + SM::kStages + (njt & 1) * SM::kStage, SM::kTile64, 1024);
#pragma unroll
        for (int kk = 0; kk < 8; ++kk) WgmmaRS128<1>(kacc, dsk[kk], q1_d + ((kk * 16 * 128) >> 4));
      }
    }
    WgmmaCommit();
    WgmmaWait<0>();
    FenceRegs(kacc);
    if constexpr (kOff) FenceRegs(dsk);
  }
  {
    bf16* dkbase = p.dk + tok0 * d.DK + a0;
    float dot0 = 0.f, dot1 = 0.f;
#pragma unroll
    for (int nt = 0; nt < 16; ++nt) {
      const int col = nt * 8 + 2 * c;
      const float2 k0 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(ks + Sw128Offset<L>(r0, col)));
      const float2 k1 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(ks + Sw128Offset<L>(r1, col)));
      dot0 += k0.x * kacc[4 * nt + 0] + k0.y * kacc[4 * nt + 1];
      dot1 += k1.x * kacc[4 * nt + 2] + k1.y * kacc[4 * nt + 3];
      if (r0 < len)
        *reinterpret_cast<uint32_t*>(dkbase + r0 * ldqk + col) = PackBf16(kacc[4 * nt], kacc[4 * nt + 1]);
      if (r1 < len)
        *reinterpret_cast<uint32_t*>(dkbase + r1 * ldqk + col) = PackBf16(kacc[4 * nt + 2], kacc[4 * nt + 3]);
    }
    dot0 += __shfl_xor_sync(0xffffffffu, dot0, 1);
    dot0 += __shfl_xor_sync(0xffffffffu, dot0, 2);
    dot1 += __shfl_xor_sync(0xffffffffu, dot1, 1);
    dot1 += __shfl_xor_sync(0xffffffffu, dot1, 2);
    if (c == 0) {
      if (r0 < len) p.kdk[(so + r0) * p.n_dk_slabs + blockIdx.x] = dot0;
      if (r1 < len) p.kdk[(so + r1) * p.n_dk_slabs + blockIdx.x] = dot1;
    }
  }
}
template <bool SPLIT>
__global__ void __launch_bounds__(384, 1)
    mlstm_bwd_dqk_ws(Dims d, BwdPtrs p, const __grid_constant__ DqkTmaMaps maps) {
  BwdDqkWs<SPLIT, 1>(d, p, maps);
}
template <bool SPLIT>
__global__ void __launch_bounds__(384, 1)
    mlstm_bwd_dqk_ws_l256_off(Dims d, BwdPtrs p, const __grid_constant__ DqkTmaMaps maps,
                              const uint4* __restrict__ bfrag) {
  BwdDqkWs<SPLIT, 2, false, true>(d, p, maps, bfrag);
}
template <bool SPLIT>
__global__ void __launch_bounds__(384, 1)
    mlstm_bwd_dqk_ws_eager(Dims d, BwdPtrs p, const __grid_constant__ DqkTmaMaps maps) {
  BwdDqkWs<SPLIT, 1, true>(d, p, maps);
}

// fwd_out on warpgroup MMA (sm_90a wgmma), L 128 and 128-column h slabs: mlstm_fwd_out_ws3 below,
// the math of mlstm_fwd_out above. Warpgroup wg owns rows 64wg..64wg+63 (identity map, as
// bwd_dqk). Per 64-wide dk stage (swizzled Q, K tiles [128][64], C_k hi / lo rows [64 dk][128
// dv]): S = Q̂Kᵀ (m64n128, both K-major), h += Q̂ C_k hi + lo (C N-major), 12 wgmma per
// warpgroup, one commit; q̂·n_k by FMAs from the swizzled Q tile (4 lanes per row, 16 dk each).
// Then P = S ⊙ W (hi + lo bf16 pairs in registers) and h += P V (register A, V N-major).
// Executed MACs per block at the 125m cell (dk 384): S 6.3M (the full square: no per-warpgroup
// causal skip, see the note on divergence at bwd_dqk), Q̂C 12.6M, PV 4.2M = 23.1M (mma.sync:
// 3.5M + 12.6M + 2.4M = 18.5M). A TMA producer warpgroup (helper mlstm9) issues every tile onto
// mbarriers (full / empty per stage, as mlstm_bwd_dqk_ws); no block barrier in the dk loop; one
// wgmma group in flight while the next stage is awaited. 384 threads (consumers: 232 registers
// after setmaxnreg).
struct OutWsMaps {
  CUtensorMap q, k, v;  // 4-d (columns, heads, tokens, batch), box 64 × 1 × 128 × 1
  CUtensorMap c, c_lo;  // 2-d (dv, rows of [BH][NC+1][dk]), box 64 × 64
};

// fwd_out on three dk stages (helper mlstm10; the default since session 8, the only wgmma
// fwd_out since the two-stage mlstm_fwd_out_ws was deleted after losing, 0.624 -> 0.495 ms at the
// 125m cell on an H100). The two-stage kernel kept two 64 KB stages beside a 32 KB V slab (a
// third stage does not fit in 227 KB), so the load of step dt + 2 waited until step dt's wgmma
// group retired: the ring was one step deep. Here V has no region of its own: it is the ring's
// step ndt (after the last dk step), loaded into that step's slot (ndt % 3) once step ndt − 3
// released it, so three dk stages fit (3 × 64 KB + vectors; 48 KB stages without the lo planes)
// and the producer runs two steps ahead. The dk loop is a do-while (ndt >= 1): a zero-trip branch
// made ptxas serialise every wgmma of the two-stage kernel (warning C7515).
// With ndt < 3 (dk 64 / 128) V's slot was never used and loads at once.
template <bool SPLIT>
struct OutWs3Smem {
  static constexpr int kTile64 = 128 * 128;  // bytes of a [128 rows][64 cols] bf16 tile
  static constexpr int kRing = 3;
  // Stage: Q [128 t][64], K [128 s][64], C hi [64 dk][128 dv], C lo [64 dk][128 dv]; the V step
  // uses the first two tiles of its slot ([128 s][128 dv] as two 64-column blocks).
  static constexpr int kOffK = kTile64, kOffC = 2 * kTile64, kOffClo = 3 * kTile64;
  static constexpr int kStage = (SPLIT ? 4 : 3) * kTile64;
  static constexpr int kFloats = kRing * kStage;
  // b, ĩ, m (L each) and n_k (dk) floats, then full[3], empty[3] mbarriers, 1024 of alignment.
  static size_t Bytes(int dk) { return kFloats + (3 * 128 + dk) * 4 + 2 * kRing * 8 + 1024; }
};

// fwd_out's gating, shared by FwdOutWs3 and the persistent fwd_out: P = S·scale ⊙ W in place
// (causal s <= t; rows past len zero) for the thread's rows r0, r1, and its partial row sums
// rs0, rs1 (the quad's shuffles come in OutInterScale); b0v, b1v, m0v, m1v are the rows' gate sums
// and stabilisers, which the caller uses afterwards too.
template <int L>
__device__ __forceinline__ void OutGate(const Dims& d, float (&sacc)[64], const float* bs, const float* igs,
                                        const float* ms, int r0, int r1, int c, int len, float& b0v, float& b1v,
                                        float& m0v, float& m1v, float& rs0, float& rs1) {
  b0v = bs[r0];
  b1v = bs[r1];
  m0v = ms[r0];
  m1v = ms[r1];
  rs0 = 0.f;
  rs1 = 0.f;
#pragma unroll
  for (int nt = 0; nt < 16; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int s = nt * 8 + 2 * c + (e & 1);
      const int r = e < 2 ? r0 : r1;
      const float br = e < 2 ? b0v : b1v, mr = e < 2 ? m0v : m1v;
      float pv = 0.f;
      if (s <= r && r < len) pv = sacc[4 * nt + e] * d.scale * __expf(br - bs[s] + igs[s] - mr);
      sacc[4 * nt + e] = pv;
      if (e < 2) rs0 += pv; else rs1 += pv;
    }
  }
}

// Then: the row sums over the quad, the inter-chunk weight G = exp(b + m_k − m), the normaliser
// den = Σ P + G·scale·q̂·n_k, and hacc (Q̂ C_k) scaled by scale·G in place.
__device__ __forceinline__ void OutInterScale(const Dims& d, float (&hacc)[64], float rs0, float rs1, float qn0,
                                              float qn1, float b0v, float b1v, float m0v, float m1v, float m_k,
                                              float& den0, float& den1) {
  rs0 += __shfl_xor_sync(0xffffffffu, rs0, 1);
  rs0 += __shfl_xor_sync(0xffffffffu, rs0, 2);
  rs1 += __shfl_xor_sync(0xffffffffu, rs1, 1);
  rs1 += __shfl_xor_sync(0xffffffffu, rs1, 2);
  const float G0 = __expf(b0v + m_k - m0v), G1 = __expf(b1v + m_k - m1v);
  den0 = rs0 + G0 * d.scale * qn0;
  den1 = rs1 + G1 * d.scale * qn1;
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    hacc[4 * i + 0] *= d.scale * G0;
    hacc[4 * i + 1] *= d.scale * G0;
    hacc[4 * i + 2] *= d.scale * G1;
    hacc[4 * i + 3] *= d.scale * G1;
  }
}

// One dk step of fwd_out's main loop, shared by FwdOutWs3 and the persistent fwd_out: wait for ring
// slot `slot` (mbarrier full + 8·slot, parity `phase`), issue S += Q̂ Kᵀ and hacc += Q̂ C_k (hi, lo)
// on its tiles as one wgmma group, and under it add this thread's rows' q̂·n_k over the step's 64
// columns (n_k from nks). The caller waits for the group.
template <bool SPLIT, int L, int kStageBytes, int kOffK, int kOffC, int kOffClo>
__device__ __forceinline__ void OutDkStep(float (&sacc)[64], float (&hacc)[64], float& qn0, float& qn1,
                                          const unsigned char* sm, uint32_t sa, uint32_t full, int slot, int phase,
                                          uint32_t own, const float* nks, int dt, int r0, int r1, int c) {
  using namespace hopper;
  MbWait(full + 8 * slot, phase);
  const uint32_t st = sa + slot * kStageBytes;
  const uint64_t q_d = SmemDescSw128(st + own, 16, 1024);
  const uint64_t k_d = SmemDescSw128(st + kOffK, 16, 1024);
  const uint64_t c_d = SmemDescSw128(st + kOffC, 64 * 128, 1024);
  const uint64_t clo_d = SmemDescSw128(st + kOffClo, 64 * 128, 1024);
  WgmmaFence();
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    const uint64_t ks = (kk * 32) >> 4, cs = (kk * 16 * 128) >> 4;
    WgmmaSS128<0, 0>(sacc, q_d + ks, k_d + ks, 1);
    WgmmaSS128<0, 1>(hacc, q_d + ks, c_d + cs, 1);
    if constexpr (SPLIT) WgmmaSS128<0, 1>(hacc, q_d + ks, clo_d + cs, 1);
  }
  WgmmaCommit();
  const unsigned char* qt = sm + slot * kStageBytes;  // q̂·n_k under the wgmma
  const float* nk = nks + dt * 64 + 16 * c;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const uint4 x0 = *reinterpret_cast<const uint4*>(qt + Sw128ChunkOffset<L>(r0, 2 * c + half));
    const uint4 x1 = *reinterpret_cast<const uint4*>(qt + Sw128ChunkOffset<L>(r1, 2 * c + half));
    const __nv_bfloat162* y0 = reinterpret_cast<const __nv_bfloat162*>(&x0);
    const __nv_bfloat162* y1 = reinterpret_cast<const __nv_bfloat162*>(&x1);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 a0 = __bfloat1622float2(y0[j]), a1 = __bfloat1622float2(y1[j]);
      const float n0 = nk[8 * half + 2 * j], n1 = nk[8 * half + 2 * j + 1];
      qn0 = fmaf(a0.x, n0, fmaf(a0.y, n1, qn0));
      qn1 = fmaf(a1.x, n0, fmaf(a1.y, n1, qn1));
    }
  }
}

// fwd_out's last step, shared by FwdOutWs3 and its persistent form (mlstm_fwd_out_ws3_persist):
// the gated scores sacc split into bf16 hi / lo A fragments, the wait for the V stage (ring slot
// `slot`: mbarrier full + 8·slot, parity `phase`, tile at sa + slot·kStageBytes), hacc += S V
// (hi, then lo), and the rows
// normalised into h4 by max(|den|, exp(-m)) + eps.
template <bool SPLIT, int kStageBytes, int kTile64>
__device__ __forceinline__ void OutPvNormalize(const Dims& d, const float (&sacc)[64], float (&hacc)[64], uint32_t full,
                                               int slot, int phase, uint32_t sa, float den0, float den1, float m0v,
                                               float m1v, float (&h4)[16][4]) {
  using namespace hopper;
  uint32_t pa[8][4], palo[8][4];
#pragma unroll
  for (int kk = 0; kk < 8; ++kk) {
    SplitPack(sacc[8 * kk + 0], sacc[8 * kk + 1], pa[kk][0], palo[kk][0]);
    SplitPack(sacc[8 * kk + 2], sacc[8 * kk + 3], pa[kk][1], palo[kk][1]);
    SplitPack(sacc[8 * kk + 4], sacc[8 * kk + 5], pa[kk][2], palo[kk][2]);
    SplitPack(sacc[8 * kk + 6], sacc[8 * kk + 7], pa[kk][3], palo[kk][3]);
  }
  MbWait(full + 8 * slot, phase);
  const uint64_t v_d = SmemDescSw128(sa + slot * kStageBytes, kTile64, 1024);
  // The scaled hacc must be final before the fence: pure register math, so without this the
  // compiler may sink the multiplies between wgmma.fence and the wgmma that reads them, and
  // ptxas then serialises every wgmma of the kernel (warning C7515, which the deleted two-stage
  // kernel got: the likely reason its TMA producer gained 3% where bwd_dqk_ws gained 19%).
  FenceRegs(hacc);
  WgmmaFence();
#pragma unroll
  for (int kk = 0; kk < 8; ++kk) {
    WgmmaRS128<1>(hacc, pa[kk], v_d + ((kk * 16 * 128) >> 4));
    if constexpr (SPLIT) WgmmaRS128<1>(hacc, palo[kk], v_d + ((kk * 16 * 128) >> 4));
  }
  WgmmaCommit();
  WgmmaWait<0>();
  FenceRegs(hacc);
  FenceRegs(pa);
  FenceRegs(palo);
  const float inv0 = 1.f / (fmaxf(fabsf(den0), __expf(-m0v)) + d.eps);
  const float inv1 = 1.f / (fmaxf(fabsf(den1), __expf(-m1v)) + d.eps);
#pragma unroll
  for (int nt = 0; nt < 16; ++nt) {
    h4[nt][0] = hacc[4 * nt + 0] * inv0;
    h4[nt][1] = hacc[4 * nt + 1] * inv0;
    h4[nt][2] = hacc[4 * nt + 2] * inv1;
    h4[nt][3] = hacc[4 * nt + 3] * inv1;
  }
}

// OutPvNormalize of the fused off-diagonal forward (chunk 256; helper off256, session 18): for a half-1 block (`off`) the chunk's P' fragments (this thread's 16 uint4 of
// mlstm_fwd_offdiag_p_l256, at pf with a stride of 256 uint4) are loaded under the wait for V1,
// hacc += P V1 (hi, lo) as OutPvNormalize, then the V0 step (the ring's next position after V1)
// and hacc += P' V0 (hi, lo), so the diagonal and the off-diagonal numerators meet in fp32 and h
// is normalised and rounded once. den0, den1 already include P''s row sums. A half-0 block runs
// OutPvNormalize's steps.
template <bool SPLIT, int kStageBytes, int kTile64>
__device__ __forceinline__ void OutPvOffNormalize(const Dims& d, const float (&sacc)[64], float (&hacc)[64],
                                                  uint32_t full, int slot, int phase, uint32_t sa, float den0,
                                                  float den1, float m0v, float m1v, bool off, const uint4* pf,
                                                  float (&h4)[16][4]) {
  using namespace hopper;
  uint32_t pa[8][4], palo[8][4];
#pragma unroll
  for (int kk = 0; kk < 8; ++kk) {
    SplitPack(sacc[8 * kk + 0], sacc[8 * kk + 1], pa[kk][0], palo[kk][0]);
    SplitPack(sacc[8 * kk + 2], sacc[8 * kk + 3], pa[kk][1], palo[kk][1]);
    SplitPack(sacc[8 * kk + 4], sacc[8 * kk + 5], pa[kk][2], palo[kk][2]);
    SplitPack(sacc[8 * kk + 6], sacc[8 * kk + 7], pa[kk][3], palo[kk][3]);
  }
  uint32_t pb[8][4], pblo[8][4];
#pragma unroll
  for (int kk = 0; kk < 8; ++kk) {
    uint4 x = make_uint4(0u, 0u, 0u, 0u), y = x;
    if (off) {
      x = __ldg(pf + kk * 256);
      if constexpr (SPLIT) y = __ldg(pf + (8 + kk) * 256);
    }
    pb[kk][0] = x.x;
    pb[kk][1] = x.y;
    pb[kk][2] = x.z;
    pb[kk][3] = x.w;
    pblo[kk][0] = y.x;
    pblo[kk][1] = y.y;
    pblo[kk][2] = y.z;
    pblo[kk][3] = y.w;
  }
  MbWait(full + 8 * slot, phase);
  const uint64_t v_d = SmemDescSw128(sa + slot * kStageBytes, kTile64, 1024);
  FenceRegs(hacc);  // (as OutPvNormalize: the scaled hacc final before the fence, C7515)
  WgmmaFence();
#pragma unroll
  for (int kk = 0; kk < 8; ++kk) {
    WgmmaRS128<1>(hacc, pa[kk], v_d + ((kk * 16 * 128) >> 4));
    if constexpr (SPLIT) WgmmaRS128<1>(hacc, palo[kk], v_d + ((kk * 16 * 128) >> 4));
  }
  WgmmaCommit();
  WgmmaWait<0>();
  FenceRegs(hacc);
  FenceRegs(pa);
  FenceRegs(palo);
  if (off) {
    const int slot0 = slot + 1 == 3 ? 0 : slot + 1, phase0 = slot0 == 0 ? phase ^ 1 : phase;
    MbWait(full + 8 * slot0, phase0);
    const uint64_t v0_d = SmemDescSw128(sa + slot0 * kStageBytes, kTile64, 1024);
    FenceRegs(pb);
    FenceRegs(pblo);
    WgmmaFence();
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) {
      WgmmaRS128<1>(hacc, pb[kk], v0_d + ((kk * 16 * 128) >> 4));
      if constexpr (SPLIT) WgmmaRS128<1>(hacc, pblo[kk], v0_d + ((kk * 16 * 128) >> 4));
    }
    WgmmaCommit();
    WgmmaWait<0>();
    FenceRegs(hacc);
    FenceRegs(pb);
    FenceRegs(pblo);
  }
  const float inv0 = 1.f / (fmaxf(fabsf(den0), __expf(-m0v)) + d.eps);
  const float inv1 = 1.f / (fmaxf(fabsf(den1), __expf(-m1v)) + d.eps);
#pragma unroll
  for (int nt = 0; nt < 16; ++nt) {
    h4[nt][0] = hacc[4 * nt + 0] * inv0;
    h4[nt][1] = hacc[4 * nt + 1] * inv0;
    h4[nt][2] = hacc[4 * nt + 2] * inv1;
    h4[nt][3] = hacc[4 * nt + 3] * inv1;
  }
}

// kSub 2 (chunk 256, always with kOff: mlstm_fwd_out_ws3_l256_off[_eager]): a block is one
// 128-token half k of chunk k / 2 and computes that half's diagonal block against the chunk's
// state C_{k/2}, n_{k/2}, m_{k/2} (b_t is the 256-token chunk's cumsum, so W and G keep their
// formulas).
// kEager: as BwdDqkWs's (GYRE_MLSTM_RING=eager): each dk step's slot is released once its own
// wgmma group retired (after the q̂·n_k FMAs), so the V step and the later dk steps load earlier
// (H100, medians of 3: 125m cell 0.497 -> 0.469 ms, 1.3b cell 0.592 -> 0.563 ms).
// kOff (chunk 256; helper off256, session 18): a half-1 block also adds the chunk's off-diagonal
// block (the second half's queries against the first half's keys): the producer loads V0 (the first half's values, this slab) as the
// ring step after V, the consumers add the row sums of P' (mlstm_fwd_offdiag_p_l256's rs_off) to
// den and P' V0 to hacc (OutPvOffNormalize) before normalising; no separate pass.
template <bool SPLIT, int kSub, bool kEager = false, bool kOff = false>
__device__ __forceinline__ void FwdOutWs3(const Dims& d, const FwdPtrs& p, const OutWsMaps& maps,
                                          const uint4* pfrag = nullptr, const float* rs_off = nullptr) {
  using namespace hopper;
  using SM = OutWs3Smem<SPLIT>;
  constexpr int L = 128, DVT = 128, kConsumers = 256, kRing = SM::kRing;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* sm = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  const uint32_t sa = SmemAddr(sm);
  float* bs = reinterpret_cast<float*>(sm + SM::kFloats);
  float* igs = bs + L;
  float* ms = igs + L;
  float* nks = ms + L;  // [DK] n_k
  const uint32_t full = sa + SM::kFloats + (3 * L + d.DK) * 4, empty = full + 8 * kRing;
  const int j0 = blockIdx.x * DVT, k = blockIdx.y, bh = blockIdx.z;
  const int kc = kSub == 1 ? k : k >> 1;  // chunk (state index) of this block
  const int b = bh / d.NH, hd = bh % d.NH;
  const int t0 = k * L, len = min(L, d.S - t0);
  const int ndt = d.DK / 64;
  if (threadIdx.x == 0) {
    for (int i = 0; i < kRing; ++i) {
      MbInit(full + 8 * i, 1);
      MbInit(empty + 8 * i, 8);
    }
    MbInitFence();
  }
  __syncthreads();

  if (threadIdx.x < 128) {  // producer warpgroup: one thread issues all loads
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    if (threadIdx.x == 0) {
      constexpr uint32_t kStageBytes = (SPLIT ? 4 : 3) * SM::kTile64;
      const int c_row = (bh * (d.NC + 1) + kc) * d.DK;
      for (int dt = 0; dt <= ndt; ++dt) {  // step ndt = the V slab
        const int slot = dt % kRing, use = dt / kRing;
        if (use > 0) MbWait(empty + 8 * slot, (use - 1) & 1);
        const uint32_t st = sa + slot * SM::kStage, fb = full + 8 * slot;
        if (dt == ndt) {
          MbArriveExpectTx(fb, 2 * SM::kTile64);
          TmaTile4d(st, &maps.v, fb, j0, hd, t0, b);
          TmaTile4d(st + SM::kTile64, &maps.v, fb, j0 + 64, hd, t0, b);
          break;
        }
        MbArriveExpectTx(fb, kStageBytes);
        TmaTile4d(st, &maps.q, fb, dt * 64, hd, t0, b);
        TmaTile4d(st + SM::kOffK, &maps.k, fb, dt * 64, hd, t0, b);
        TmaTile2d(st + SM::kOffC, &maps.c, fb, j0, c_row + dt * 64);
        TmaTile2d(st + SM::kOffC + 64 * 128, &maps.c, fb, j0 + 64, c_row + dt * 64);
        if constexpr (SPLIT) {
          TmaTile2d(st + SM::kOffClo, &maps.c_lo, fb, j0, c_row + dt * 64);
          TmaTile2d(st + SM::kOffClo + 64 * 128, &maps.c_lo, fb, j0 + 64, c_row + dt * 64);
        }
      }
      if constexpr (kOff) {
        if ((k & 1) == 1) {  // half 1: V0 at ring position ndt + 1 (its slot's last use: dk step ndt − 2)
          const int dt = ndt + 1, slot = dt % kRing, use = dt / kRing;
          MbWait(empty + 8 * slot, (use - 1) & 1);
          const uint32_t st = sa + slot * SM::kStage, fb = full + 8 * slot;
          MbArriveExpectTx(fb, 2 * SM::kTile64);
          TmaTile4d(st, &maps.v, fb, j0, hd, t0 - L, b);
          TmaTile4d(st + SM::kTile64, &maps.v, fb, j0 + 64, hd, t0 - L, b);
        }
      }
    }
    return;
  }

  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
  const int tid = threadIdx.x - 128, lane = tid & 31, w = tid >> 5, g = lane >> 2, c = lane & 3;
  const int wg = __shfl_sync(0xffffffffu, tid >> 7, 0);
  const int64_t ldv = static_cast<int64_t>(d.NH) * d.DV;
  const int64_t tok0 = (static_cast<int64_t>(b) * d.S + t0) * d.NH + hd;
  const float* nbase = p.sn + (static_cast<int64_t>(bh) * (d.NC + 1) + kc) * d.DK;
  const float m_k = p.smk[static_cast<int64_t>(bh) * (d.NC + 1) + kc];
  if (tid < L) {
    const int64_t o = static_cast<int64_t>(bh) * d.S + t0 + tid;
    const bool ok = tid < len;
    bs[tid] = ok ? p.b_tok[o] : 0.f;
    ms[tid] = ok ? p.m_tok[o] : 0.f;
    igs[tid] = ok ? p.ig[tok0 + static_cast<int64_t>(tid) * d.NH] : -INFINITY;
  }
  for (int i = tid; i < d.DK; i += kConsumers) nks[i] = nbase[i];
  NamedBarrierSync(1, kConsumers);  // n_k is read in the loop

  float sacc[64], hacc[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) sacc[i] = hacc[i] = 0.f;
  const int r0 = 16 * w + g, r1 = r0 + 8;
  float qn0 = 0.f, qn1 = 0.f;
  const uint32_t own = wg * 64 * 128;
  int slot = 0, phase = 0;  // ring position of step dt
  [[maybe_unused]] const bool off = kOff && (k & 1) == 1;
  [[maybe_unused]] const int64_t bhc = static_cast<int64_t>(bh) * d.NC + kc;
  [[maybe_unused]] float rso0 = 0.f, rso1 = 0.f;  // P''s row sums (half 1)
  if constexpr (kOff) {
    if (off) {
      rso0 = rs_off[bhc * L + r0];
      rso1 = rs_off[bhc * L + r1];
    }
  }
  // A do-while (ndt >= 1: MlstmCheck makes dk a multiple of 64): with a for loop the compiler
  // keeps a zero-trip path on which the accumulators are defined by moves and merged into the
  // wgmma pipeline, and ptxas then serialises every wgmma of the kernel (C7515: "wgmma.mma_async
  // instructions are serialized due to non wgmma instructions defining accumulator registers of a
  // wgmma between start and end of the pipeline stage"), as it did in the deleted two-stage kernel. Found by
  // editing the PTX: removing that branch alone removes the warning.
  int dt = 0;
  do {
    OutDkStep<SPLIT, L, SM::kStage, SM::kOffK, SM::kOffC, SM::kOffClo>(sacc, hacc, qn0, qn1, sm, sa, full, slot, phase,
                                                                     own, nks, dt, r0, r1, c);
    if constexpr (kEager) {
      WgmmaWait<0>();  // this step's group retired: its stage is free now
      if (lane == 0) MbArrive(empty + 8 * slot);
    } else if (dt > 0) {
      WgmmaWait<1>();  // step dt − 1's group retired: its stage is free
      if (lane == 0) MbArrive(empty + 8 * (slot == 0 ? kRing - 1 : slot - 1));
    }
    if (++slot == kRing) {
      slot = 0;
      phase ^= 1;
    }
  } while (++dt < ndt);
  WgmmaWait<0>();
  FenceRegs(sacc);
  FenceRegs(hacc);
  qn0 += __shfl_xor_sync(0xffffffffu, qn0, 1);
  qn0 += __shfl_xor_sync(0xffffffffu, qn0, 2);
  qn1 += __shfl_xor_sync(0xffffffffu, qn1, 1);
  qn1 += __shfl_xor_sync(0xffffffffu, qn1, 2);

  // Gating: P = S·scale ⊙ W (causal), row sums.
  float b0v, b1v, m0v, m1v, rs0, rs1;
  OutGate<L>(d, sacc, bs, igs, ms, r0, r1, c, len, b0v, b1v, m0v, m1v, rs0, rs1);
  float den0, den1;
  OutInterScale(d, hacc, rs0, rs1, qn0, qn1, b0v, b1v, m0v, m1v, m_k, den0, den1);
  float h4[16][4];
  if constexpr (kOff) {
    den0 += rso0;  // (the deleted separate pass's order: the diagonal's den, then + P' row sum)
    den1 += rso1;
    OutPvOffNormalize<SPLIT, SM::kStage, SM::kTile64>(d, sacc, hacc, full, slot, phase, sa, den0, den1, m0v, m1v,
                                                      off, pfrag + bhc * 16 * 256 + tid, h4);
  } else {
    OutPvNormalize<SPLIT, SM::kStage, SM::kTile64>(d, sacc, hacc, full, slot, phase, sa, den0, den1, m0v, m1v,
                                                   h4);  // the V step (ring position ndt)
  }
  // h (and its lo part) leave through the ring's first 68 KB (two padded [128][DVT + 8]
  // buffers): after the barrier no wgmma reads the ring and every TMA
  // load into it has completed (all ndt + 1 steps were awaited above).
  NamedBarrierSync(1, kConsumers);
  constexpr int kSH = DVT + kPad;
  bf16* hi_s = reinterpret_cast<bf16*>(sm);
  bf16* lo_s = hi_s + L * kSH;
  StoreAccStaged(p.h + (tok0 + static_cast<int64_t>(16 * w) * d.NH) * d.DV + j0,
                 SPLIT ? p.h_lo + (tok0 + static_cast<int64_t>(16 * w) * d.NH) * d.DV + j0 : nullptr,
                 ldv, h4, hi_s + 16 * w * kSH, lo_s + 16 * w * kSH, lane, len - 16 * w);
  if (blockIdx.x == 0 && c == 0) {
    const int64_t o = static_cast<int64_t>(bh) * d.S + t0;
    if (r0 < len) p.den_tok[o + r0] = den0;
    if (r1 < len) p.den_tok[o + r1] = den1;
  }
}
template <bool SPLIT>
__global__ void __launch_bounds__(384, 1)
    mlstm_fwd_out_ws3(Dims d, FwdPtrs p, const __grid_constant__ OutWsMaps maps) {
  FwdOutWs3<SPLIT, 1>(d, p, maps);
}
template <bool SPLIT>
__global__ void __launch_bounds__(384, 1)
    mlstm_fwd_out_ws3_eager(Dims d, FwdPtrs p, const __grid_constant__ OutWsMaps maps) {
  FwdOutWs3<SPLIT, 1, true>(d, p, maps);
}
template <bool SPLIT>
__global__ void __launch_bounds__(384, 1)
    mlstm_fwd_out_ws3_l256_off(Dims d, FwdPtrs p, const __grid_constant__ OutWsMaps maps, const uint4* pfrag,
                               const float* rs_off) {
  FwdOutWs3<SPLIT, 2, false, true>(d, p, maps, pfrag, rs_off);
}
// The same with the eager stage release (MlstmRingRelease, default eager: the chunk-256 forward
// follows `ring` as chunk 128's fwd_out does).
template <bool SPLIT>
__global__ void __launch_bounds__(384, 1)
    mlstm_fwd_out_ws3_l256_off_eager(Dims d, FwdPtrs p, const __grid_constant__ OutWsMaps maps, const uint4* pfrag,
                                     const float* rs_off) {
  FwdOutWs3<SPLIT, 2, true, true>(d, p, maps, pfrag, rs_off);
}

// ---------------------------------------------------------------- fwd_out, persistent grid
//
// mlstm_fwd_out_ws3_persist (helper persist17, session 17; opt-in: MlstmOptions::persist =
// MlstmPersist::kFwdOut, which ops sets from GYRE_MLSTM_PERSIST=fwd_out): the eager three-stage
// fwd_out above with one block per SM that loops over the (slab, chunk, head) tiles instead of
// one block per tile. A tile is the same work as a block of mlstm_fwd_out_ws3_eager (the same
// wgmmas on the same tiles in the same order, the same gating, normalisation and stores), so the
// outputs are the same bytes; what changes is the turnover between tiles. A fwd_out block waits
// on its own load latency (session 16, dqk16: a block alone on its SM takes as long as in a full
// wave), and each new block started with an empty ring: mbarrier init, the per-tile vectors
// fetched by the consumers, and all three first stages ~L away, while the finished block's
// epilogue (h, h lo through shared memory to global) loaded nothing.
//
// Here the ring position runs on across tiles (tile i's seven steps — six dk stages and V — are
// ring positions 7i .. 7i+6, so tile i+1's first two stages fall into the slots tile i's dk steps
// 4 and 5 released, and its third into tile i's V slot): the producer thread loads the next
// tile's first two stages under this tile's gating, PV and epilogue. The epilogue stages h (and
// h lo) in the V step's own slot (it must not touch the slots being refilled); the split-state
// staging needs 16 warp buffers of 16 × (128 + kPad) bf16 = 68 KB and a slot holds 64 KB, so the
// last buffer (warp 7's lo rows) lies in 4.25 KB after the ring. Each consumer warp hands the V
// slot back (empty barrier, as a dk stage) once its staged rows are stored. The per-tile vectors
// (b, ĩ, m: L each, n_k: dk, m_k) are double-buffered and filled by producer warp 1 with 4-byte
// cp.asyncs up to two tiles ahead (vfull / vempty mbarriers), so no consumer waits on a global
// load at a tile start. (The first build filled them with plain loads and stores: they
// serialised, ~16 global round trips a tile, and a lone tile took 0.025 instead of 0.021 ms.)
// Tiles are numbered slab fastest, then chunk, then head (the launch order of the one-block-per-
// tile grid, so a head-chunk's three slabs run side by side and share Q / K through L2); a
// block's first tile is blockIdx.x, each next one gridDim.x + atomicAdd(counter, 1): the SM that
// finishes first takes the next tile, as the hardware block scheduler does for a one-block-per-
// tile grid. Which block computes a tile does not change its bytes. (A static order, tile =
// blockIdx.x + i·gridDim.x, was measured beside it: 125m cell 0.405 against 0.390 ms, 1.3b cell
// no gain at all, 0.555 against 0.515, and its fwd+bwd mean 3.30-3.41 against 3.14 ms: the
// slowest SM's fixed share of tiles sets the end. Deleted.)
template <bool SPLIT>
struct OutWs3PersistSmem {
  using Base = OutWs3Smem<SPLIT>;
  static constexpr int kRing = Base::kRing, kStage = Base::kStage;
  static constexpr int kStageRows = 16 * (128 + kPad) * 2;  // bytes of one warp's 16 staging rows
  static constexpr int kBufs = SPLIT ? 16 : 8;              // (hi, lo) per consumer warp
  static constexpr int kInSlot = kStage / kStageRows;       // 15 (split) / 11 fit into the V slot
  static constexpr int kOverflow = (kBufs > kInSlot ? kBufs - kInSlot : 0) * kStageRows;
  static constexpr int kOffOverflow = kRing * kStage;
  static constexpr int kOffVec = kOffOverflow + kOverflow;
  // b, ĩ, m (L each), n_k (dk), m_k, padded to 16 bytes; two buffers.
  static __host__ __device__ int VecFloats(int dk) { return 3 * 128 + dk + 4; }
  // Then full[3], empty[3], vfull[2], vempty[2] mbarriers, 1024 of alignment.
  static size_t Bytes(int dk) { return kOffVec + 2 * VecFloats(dk) * 4 + (2 * kRing + 4) * 8 + 1024; }
};

// 4-byte cp.async into shared memory, and an arrival on `bar` once this thread's earlier cp.asyncs
// have landed (counted against the barrier's initial count: .noinc).
__device__ __forceinline__ void CpAsync4Shared(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void CpAsyncMbArriveNoinc(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}

// tile_counter: zeroed by the launcher before each launch. Warp 1 draws the tiles and publishes
// each in its vector buffer (the int after m_k); the TMA thread and the consumers read it there
// (tile >= ntiles: stop).
// The persistent kernels' tile counters (fwd_out's and bwd_dqk's share them): each launch takes
// the next of them (host round robin, TakePersistCounter) and zeroes it on its stream, so launches
// in flight at once on different streams (up to 64) do not share one.
constexpr int kPersistCounters = 64;
__device__ unsigned g_persist_tiles[kPersistCounters];

template <bool SPLIT>
__global__ void __launch_bounds__(384, 1)
    mlstm_fwd_out_ws3_persist(Dims d, FwdPtrs p, const __grid_constant__ OutWsMaps maps,
                              unsigned* tile_counter) {
  using namespace hopper;
  using SM = OutWs3PersistSmem<SPLIT>;
  constexpr int L = 128, DVT = 128, kConsumers = 256, kRing = SM::kRing;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* sm = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  const uint32_t sa = SmemAddr(sm);
  const int vec_floats = SM::VecFloats(d.DK);
  float* vec = reinterpret_cast<float*>(sm + SM::kOffVec);  // [2][vec_floats]
  const uint32_t full = sa + SM::kOffVec + 2 * vec_floats * 4, empty = full + 8 * kRing,
                 vfull = empty + 8 * kRing, vempty = vfull + 16;
  const int nslab = d.DV / DVT, ntiles = nslab * d.NC * d.B * d.NH;
  const int ndt = d.DK / 64;
  if (threadIdx.x == 0) {
    for (int i = 0; i < kRing; ++i) {
      MbInit(full + 8 * i, 1);
      MbInit(empty + 8 * i, 8);
    }
    for (int i = 0; i < 2; ++i) {
      MbInit(vfull + 8 * i, 64);  // warp 1: 32 arrivals + 32 cp.async completions
      MbInit(vempty + 8 * i, 8);
    }
    MbInitFence();
  }
  __syncthreads();

  if (threadIdx.x < 128) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    if (threadIdx.x == 0) {  // TMA issue: every tile's 7 steps, the ring position running on
      constexpr uint32_t kStageBytes = (SPLIT ? 4 : 3) * SM::Base::kTile64;
      int slot = 0, use = 0;
      for (int it = 0;; ++it) {
        // The first tile is blockIdx.x (< ntiles: the grid is at most the tiles); the others are
        // published with the vectors (buffer it & 1 cannot be refilled before the consumers
        // finished tile it, which needs the loads below, so the parity wait is safe).
        int tile = blockIdx.x;
        if (it > 0) {
          MbWait(vfull + 8 * (it & 1), (it >> 1) & 1);
          tile = reinterpret_cast<const int*>(vec + (it & 1) * vec_floats)[3 * L + d.DK + 1];
        }
        if (tile >= ntiles) break;
        const int slab = tile % nslab, rest = tile / nslab, k = rest % d.NC, bh = rest / d.NC;
        const int j0 = slab * DVT, b = bh / d.NH, hd = bh % d.NH, t0 = k * L;
        const int c_row = (bh * (d.NC + 1) + k) * d.DK;
        for (int dt = 0; dt <= ndt; ++dt) {  // step ndt = the V slab
          if (use > 0) MbWait(empty + 8 * slot, (use - 1) & 1);
          const uint32_t st = sa + slot * SM::kStage, fb = full + 8 * slot;
          if (dt == ndt) {
            MbArriveExpectTx(fb, 2 * SM::Base::kTile64);
            TmaTile4d(st, &maps.v, fb, j0, hd, t0, b);
            TmaTile4d(st + SM::Base::kTile64, &maps.v, fb, j0 + 64, hd, t0, b);
          } else {
            MbArriveExpectTx(fb, kStageBytes);
            TmaTile4d(st, &maps.q, fb, dt * 64, hd, t0, b);
            TmaTile4d(st + SM::Base::kOffK, &maps.k, fb, dt * 64, hd, t0, b);
            TmaTile2d(st + SM::Base::kOffC, &maps.c, fb, j0, c_row + dt * 64);
            TmaTile2d(st + SM::Base::kOffC + 64 * 128, &maps.c, fb, j0 + 64, c_row + dt * 64);
            if constexpr (SPLIT) {
              TmaTile2d(st + SM::Base::kOffClo, &maps.c_lo, fb, j0, c_row + dt * 64);
              TmaTile2d(st + SM::Base::kOffClo + 64 * 128, &maps.c_lo, fb, j0 + 64, c_row + dt * 64);
            }
          }
          if (++slot == kRing) {
            slot = 0;
            ++use;
          }
        }
      }
    } else if (threadIdx.x >= 32 && threadIdx.x < 64) {  // warp 1: tiles and their vectors
      // Every vector element is its own 4-byte cp.async, all in flight at once (one global latency
      // a tile; plain loads and stores here serialise on the unknown aliasing); the padding rows
      // of a short last chunk are plain stores, released by the lane's ordinary arrival.
      const int lane = threadIdx.x - 32;
      int tile = blockIdx.x;
      for (int it = 0;; ++it) {
        const int vb = it & 1;
        if (it >= 2) MbWait(vempty + 8 * vb, ((it >> 1) - 1) & 1);
        float* bs = vec + vb * vec_floats;
        const uint32_t bsa = SmemAddr(bs);
        float* nks = bs + 3 * L;
        if (tile < ntiles) {
          const int rest = tile / nslab, k = rest % d.NC, bh = rest / d.NC;
          const int b = bh / d.NH, hd = bh % d.NH, t0 = k * L, len = min(L, d.S - t0);
          const int64_t o = static_cast<int64_t>(bh) * d.S + t0;
          const int64_t tok0 = (static_cast<int64_t>(b) * d.S + t0) * d.NH + hd;
          // (not unrolled: the copies are asynchronous anyway, and unrolled the 64-bit addresses
          // spilled under the producer warpgroup's 40 registers)
#pragma unroll 1
          for (int i = lane; i < L; i += 32) {  // b, ĩ, m at bs, bs + L, bs + 2L
            if (i < len) {
              CpAsync4Shared(bsa + 4 * i, p.b_tok + o + i);
              CpAsync4Shared(bsa + 4 * (L + i), p.ig + tok0 + static_cast<int64_t>(i) * d.NH);
              CpAsync4Shared(bsa + 4 * (2 * L + i), p.m_tok + o + i);
            } else {
              bs[i] = 0.f;
              bs[L + i] = -INFINITY;
              bs[2 * L + i] = 0.f;
            }
          }
          const int64_t kst = static_cast<int64_t>(bh) * (d.NC + 1) + k;
          const float* nbase = p.sn + kst * d.DK;
#pragma unroll 1
          for (int i = lane; i < d.DK; i += 32) CpAsync4Shared(bsa + 4 * (3 * L + i), nbase + i);
          if (lane == 0) CpAsync4Shared(bsa + 4 * (3 * L + d.DK), p.smk + kst);
        }
        if (lane == 0) reinterpret_cast<int*>(nks)[d.DK + 1] = min(tile, ntiles);
        MbArrive(vfull + 8 * vb);
        CpAsyncMbArriveNoinc(vfull + 8 * vb);
        if (tile >= ntiles) break;
        int next = 0;
        if (lane == 0) next = gridDim.x + static_cast<int>(atomicAdd(tile_counter, 1u));
        tile = __shfl_sync(0xffffffffu, next, 0);
      }
    }
    return;
  }

  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
  const int tid = threadIdx.x - 128, lane = tid & 31, w = tid >> 5, g = lane >> 2, c = lane & 3;
  const int wg = __shfl_sync(0xffffffffu, tid >> 7, 0);
  const int64_t ldv = static_cast<int64_t>(d.NH) * d.DV;
  const int r0 = 16 * w + g, r1 = r0 + 8;
  const uint32_t own = wg * 64 * 128;
  int slot = 0, phase = 0;  // ring position of the current step, running on across tiles
  for (int it = 0;; ++it) {
    const int vb = it & 1;
    const float* bs = vec + vb * vec_floats;
    const float* igs = bs + L;
    const float* ms = igs + L;
    const float* nks = ms + L;
    MbWait(vfull + 8 * vb, (it >> 1) & 1);
    const int tile = reinterpret_cast<const int*>(nks)[d.DK + 1];
    if (tile >= ntiles) break;
    const int slab = tile % nslab, rest = tile / nslab, k = rest % d.NC, bh = rest / d.NC;
    const int j0 = slab * DVT, b = bh / d.NH, hd = bh % d.NH;
    const int t0 = k * L, len = min(L, d.S - t0);
    const int64_t tok0 = (static_cast<int64_t>(b) * d.S + t0) * d.NH + hd;
    const float m_k = nks[d.DK];

    float sacc[64], hacc[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) sacc[i] = hacc[i] = 0.f;
    float qn0 = 0.f, qn1 = 0.f;
    int dt = 0;
    do {  // (a do-while for the reason given in FwdOutWs3)
      OutDkStep<SPLIT, L, SM::kStage, SM::Base::kOffK, SM::Base::kOffC, SM::Base::kOffClo>(
          sacc, hacc, qn0, qn1, sm, sa, full, slot, phase, own, nks, dt, r0, r1, c);
      WgmmaWait<0>();  // this step's group retired: its stage is free now
      if (lane == 0) MbArrive(empty + 8 * slot);
      if (++slot == kRing) {
        slot = 0;
        phase ^= 1;
      }
    } while (++dt < ndt);
    WgmmaWait<0>();
    FenceRegs(sacc);
    FenceRegs(hacc);
    qn0 += __shfl_xor_sync(0xffffffffu, qn0, 1);
    qn0 += __shfl_xor_sync(0xffffffffu, qn0, 2);
    qn1 += __shfl_xor_sync(0xffffffffu, qn1, 1);
    qn1 += __shfl_xor_sync(0xffffffffu, qn1, 2);

    // Gating: P = S·scale ⊙ W (causal), row sums.
    float b0v, b1v, m0v, m1v, rs0, rs1;
    OutGate<L>(d, sacc, bs, igs, ms, r0, r1, c, len, b0v, b1v, m0v, m1v, rs0, rs1);
    // The last read of this tile's vectors: hand the buffer back to warp 1.
    __syncwarp();
    if (lane == 0) MbArrive(vempty + 8 * vb);
    float den0, den1;
    OutInterScale(d, hacc, rs0, rs1, qn0, qn1, b0v, b1v, m0v, m1v, m_k, den0, den1);
    float h4[16][4];
    OutPvNormalize<SPLIT, SM::kStage, SM::Base::kTile64>(d, sacc, hacc, full, slot, phase, sa, den0, den1, m0v, m1v,
                                                         h4);  // the V step
    // h (and h lo) leave through the V step's slot (plus the overflow rows after the ring): after
    // the barrier no wgmma reads V any more. The other two slots may already hold the next tile's
    // first stages.
    NamedBarrierSync(1, kConsumers);
    {
      unsigned char* vslot = sm + slot * SM::kStage;
      auto buf = [&](int i) {
        return reinterpret_cast<bf16*>(i < SM::kInSlot ? vslot + i * SM::kStageRows
                                                       : sm + SM::kOffOverflow + (i - SM::kInSlot) * SM::kStageRows);
      };
      bf16* hi_s = buf(SPLIT ? 2 * w : w);
      bf16* lo_s = SPLIT ? buf(2 * w + 1) : hi_s;
      StoreAccStaged(p.h + (tok0 + static_cast<int64_t>(16 * w) * d.NH) * d.DV + j0,
                     SPLIT ? p.h_lo + (tok0 + static_cast<int64_t>(16 * w) * d.NH) * d.DV + j0 : nullptr,
                     ldv, h4, hi_s, lo_s, lane, len - 16 * w);
    }
    // This warp's staging rows are stored: the slot goes back to the producer like a dk stage
    // (the proxy fence orders the generic accesses before the TMA that refills it).
    FenceProxyAsync();
    __syncwarp();
    if (lane == 0) MbArrive(empty + 8 * slot);
    if (++slot == kRing) {
      slot = 0;
      phase ^= 1;
    }
    if (slab == 0 && c == 0) {
      const int64_t o = static_cast<int64_t>(bh) * d.S + t0;
      if (r0 < len) p.den_tok[o + r0] = den0;
      if (r1 < len) p.den_tok[o + r1] = den1;
    }
  }
}
// ---------------------------------------------------------------- bwd_dqk, persistent grid
//
// mlstm_bwd_dqk_ws_persist (helper persistdqk17, session 17; opt-in: MlstmOptions::persist =
// MlstmPersist::kDqk or kBoth, which ops sets from GYRE_MLSTM_PERSIST=dqk / both): the eager
// bwd_dqk above (BwdDqkWs<SPLIT, 1, true>, chunk 128) with one block per SM looping over the
// (slab, chunk, head) tiles, as mlstm_fwd_out_ws3_persist does for fwd_out. A tile is the same
// work as a block of mlstm_bwd_dqk_ws_eager: the same wgmmas on the same tiles in the same order,
// the same phase-2 and epilogue arithmetic, the same stores, so every output is the same bytes
// (PersistDqkMatchesDefaultBytewise). What changes is the turnover between tiles (dqk16: a block
// alone on its SM takes as long as in a wave; each new block started with an empty ring, the
// vectors fetched by the consumers, all three phase-1 stages a round trip away, while the
// finished block's dK tail loaded nothing).
//
// The tile region (192 KB = three 64 KB slots, 16 KB tiles T0-T11, slot s = T4s..T4s+3) keeps
// DqkWgSmem's two layouts: phase 1 uses slot jt % 3; phases 2-3 put Q in T0-T1, K in T2-T3 (slot
// 0), dS' in T4-T5, phase-3 stage 0 in T6-T8 (dC lo, V, dC) and stage 1 in T9-T11. A tile frees
// its slots in the order 2 (after its last phase-3 step), 1 (after the dK wgmma: dS', stage 0's
// T6-T7) and 0 (after the k·dK dots: Q, K), and the next tile's phase-1 stages 0, 1, 2 want them in
// that order. So the slots of every second tile are mirrored (logical slot s lies in physical
// slot 2 − s when the block's tile iteration `it` is odd; the tiles inside a slot keep their order,
// so Q, K and dS' stay two adjacent tiles): tile it+1's phase-1 stage s lands in the physical slot
// of tile it's logical slot 2 − s. The producer issues stage 0 once tile it's phase 3 is done, ~the
// dK tail (E-scaling, barrier, dK wgmma, dots, stores) before the tile ends; stage 1 after the dK
// wgmma; stage 2 at the end. Three "tail" mbarriers (one per logical slot, count 8: every consumer
// warp, once a tile) say when tile it's slot is free; within a tile the producer waits on the
// per-physical-slot empty barriers as before (their parities are tracked per physical slot: one bit
// each, flipped at every phase-1 use). The per-tile vectors (b, ĩ, m, 1/D, dden: L each; n_k and the
// dn_parts partial sums of dn_{k+1}: dk-slab wide; m_k, m_{k+1}) are double-buffered and loaded by
// producer warp 1 with 4-byte cp.asyncs up to two tiles ahead (as fwd_out's: vfull / vempty); warp
// 1 waits for its copies and adds the dn parts in the order LoadDqkVectors adds them (the same float
// sum, so the same bits). (The first build left that sum to the consumers at its use, on the dK
// tail: 125m cell 0.724 -> 0.683 ms, but the 1.3b cell, 8 parts, 0.958 -> 0.984.) d_initial's dn0
// (chunk-0 tiles) is summed and stored by warp 1.
// Tiles are numbered slab fastest, then chunk, then head (the one-block-per-tile grid's launch
// order); a block's first tile is blockIdx.x, the next ones gridDim.x + atomicAdd(counter, 1).
// Measured (H100, medians of 5 / 3 rounds against mlstm_bwd_dqk_ws_eager): 125m cell 0.719 ->
// 0.661 ms (a tile in a wave 31.0 -> 28.4 µs), 1.3b cell (L128, alone) 0.960 -> 0.931 ms; step
// xlstm[1:0]-125m B16 125.4 -> 124.2 ms (kernels/cuda/mlstm_notes.md, session 17).
struct DqkPersistSmem {
  static constexpr int kL = 128, kDKT = 128;
  static constexpr int kTile64 = 128 * 128;
  static constexpr int kSlot = 4 * kTile64;
  static constexpr int kRegion = 3 * kSlot;
  // b, ĩ, m, 1/D, dden (L each), n_k, dn_{k+1} (DKT each), dn parts (dn_parts × DKT: warp 1's
  // staging), m_k, m_{k+1}, tile, pad.
  static __host__ __device__ int VecFloats(int dn_parts) { return 5 * kL + 2 * kDKT + dn_parts * kDKT + 4; }
  // full1[3], empty1[3], full_qk, full3[2], empty3[2], vfull[2], vempty[2], tail[3].
  static constexpr int kBars = 18 * 8;
  static size_t Bytes(int dn_parts) { return kRegion + 2 * VecFloats(dn_parts) * 4 + kBars + 1024; }
};

template <bool SPLIT>
__global__ void __launch_bounds__(384, 1)
    mlstm_bwd_dqk_ws_persist(Dims d, BwdPtrs p, const __grid_constant__ DqkTmaMaps maps,
                             unsigned* tile_counter) {
  using namespace hopper;
  using SM = DqkPersistSmem;
  constexpr int L = 128, DKT = 128, kConsumers = 256, kTile64 = SM::kTile64;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* sm = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  const uint32_t sa = SmemAddr(sm);
  const int vec_floats = SM::VecFloats(d.dn_parts);
  float* vec = reinterpret_cast<float*>(sm + SM::kRegion);  // [2][vec_floats]
  const uint32_t full1 = sa + SM::kRegion + 2 * vec_floats * 4, empty1 = full1 + 24,
                 full_qk = empty1 + 24, full3 = full_qk + 8, empty3 = full3 + 16, vfull = empty3 + 16,
                 vempty = vfull + 16, tail = vempty + 16;
  const int nslab = d.DK / DKT, ntiles = nslab * d.NC * d.B * d.NH;
  const int njt = d.DV / 64;
  // Byte offset of logical tile T (0..11) of tile iteration `it`: odd iterations mirror the slots.
  auto tile_at = [](int it, int T) -> uint32_t {
    const int s = T >> 2;
    return ((((it & 1) ? 2 - s : s) << 2) + (T & 3)) * kTile64;
  };
  if (threadIdx.x == 0) {
    for (int i = 0; i < 3; ++i) {
      MbInit(full1 + 8 * i, 1);
      MbInit(empty1 + 8 * i, 8);
      MbInit(tail + 8 * i, 8);
    }
    MbInit(full_qk, 1);
    for (int i = 0; i < 2; ++i) {
      MbInit(full3 + 8 * i, 1);
      MbInit(empty3 + 8 * i, 8);
      MbInit(vfull + 8 * i, 64);  // warp 1: 32 arrivals + 32 cp.async completions
      MbInit(vempty + 8 * i, 8);
    }
    MbInitFence();
  }
  __syncthreads();

  if (threadIdx.x < 128) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    if (threadIdx.x == 0) {  // TMA issue
      constexpr uint32_t kP1Bytes = (SPLIT ? 4 : 3) * kTile64;
      constexpr uint32_t kP3Bytes = (SPLIT ? 3 : 2) * kTile64;
      uint32_t par1 = 0, par3 = 0;  // bit i: parity of the next use of physical slot i / stage i
      for (int it = 0;; ++it) {
        int tile = blockIdx.x;
        if (it > 0) {  // (as fwd_out's: buffer it & 1 cannot be refilled before tile it is done)
          MbWait(vfull + 8 * (it & 1), (it >> 1) & 1);
          tile = reinterpret_cast<const int*>(vec + (it & 1) * vec_floats)[vec_floats - 2];
        }
        if (tile >= ntiles) break;
        const int slab = tile % nslab, rest = tile / nslab, k = rest % d.NC, bh = rest / d.NC;
        const int a0 = slab * DKT, b = bh / d.NH, hd = bh % d.NH, t0 = k * L;
        const int c_row = (bh * (d.NC + 1) + k) * d.DK + a0;
        const int dc_row = (bh * d.NC + k) * d.DK + a0;
        const int mirror = it & 1;
        const uint32_t tail_par = (it - 1) & 1;  // the previous tile's tail barriers
        for (int jt = 0; jt < njt; ++jt) {
          const int s = jt % 3, ps = mirror ? 2 - s : s;
          if (jt >= 3) {
            MbWait(empty1 + 8 * ps, ((par1 >> ps) & 1) ^ 1);
          } else if (it > 0) {
            MbWait(tail + 8 * (2 - s), tail_par);  // the previous tile's logical slot 2 − s
          }
          par1 ^= 1u << ps;
          const uint32_t st = sa + ps * SM::kSlot, fb = full1 + 8 * ps;
          MbArriveExpectTx(fb, kP1Bytes);
          TmaTile4d(st, &maps.dh, fb, jt * 64, hd, t0, b);
          TmaTile4d(st + kTile64, &maps.v, fb, jt * 64, hd, t0, b);
          TmaTile2d(st + 2 * kTile64, &maps.c, fb, jt * 64, c_row);
          if constexpr (SPLIT) TmaTile2d(st + 3 * kTile64, &maps.c_lo, fb, jt * 64, c_row);
        }
        // Q, K into logical slot 0 after its last phase-1 use (njt >= 1: there is one).
        {
          const int p0 = mirror ? 2 : 0;
          MbWait(empty1 + 8 * p0, ((par1 >> p0) & 1) ^ 1);
          MbArriveExpectTx(full_qk, 4 * kTile64);
          TmaTile4d(sa + tile_at(it, 0), &maps.q, full_qk, a0, hd, t0, b);
          TmaTile4d(sa + tile_at(it, 1), &maps.q, full_qk, a0 + 64, hd, t0, b);
          TmaTile4d(sa + tile_at(it, 2), &maps.k, full_qk, a0, hd, t0, b);
          TmaTile4d(sa + tile_at(it, 3), &maps.k, full_qk, a0 + 64, hd, t0, b);
        }
        // Phase 3's stages overlap logical slots 1 and 2: their last phase-1 uses in this tile, or
        // (dv < 192: no such use) the previous tile's release of that physical slot.
        for (int s = 1; s < 3; ++s) {
          const int ps = mirror ? 2 - s : s;
          if (s < njt) {
            MbWait(empty1 + 8 * ps, ((par1 >> ps) & 1) ^ 1);
          } else if (it > 0) {
            MbWait(tail + 8 * (2 - s), tail_par);
          }
        }
        for (int jt = 0; jt < njt; ++jt) {
          const int s3 = jt & 1;
          if (jt >= 2) MbWait(empty3 + 8 * s3, ((par3 >> s3) & 1) ^ 1);
          par3 ^= 1u << s3;
          const uint32_t fb = full3 + 8 * s3;
          MbArriveExpectTx(fb, kP3Bytes);
          TmaTile4d(sa + tile_at(it, 7 + 3 * s3), &maps.v, fb, jt * 64, hd, t0, b);
          TmaTile2d(sa + tile_at(it, 8 + 3 * s3), &maps.dc, fb, jt * 64, dc_row);
          if constexpr (SPLIT) TmaTile2d(sa + tile_at(it, 6 + 3 * s3), &maps.dc_lo, fb, jt * 64, dc_row);
        }
      }
    } else if (threadIdx.x >= 32 && threadIdx.x < 64) {  // warp 1: tiles and their vectors
      // Every vector element is its own 4-byte cp.async, all in flight at once (fwd_out's
      // lesson); a short last chunk's padding rows are plain stores, released by the lane's
      // ordinary arrival.
      const int lane = threadIdx.x - 32;
      int tile = blockIdx.x;
      for (int it = 0;; ++it) {
        const int vb = it & 1;
        if (it >= 2) MbWait(vempty + 8 * vb, ((it >> 1) - 1) & 1);
        float* bs = vec + vb * vec_floats;
        const uint32_t bsa = SmemAddr(bs);
        if (tile < ntiles) {
          const int slab = tile % nslab, rest = tile / nslab, k = rest % d.NC, bh = rest / d.NC;
          const int a0 = slab * DKT, b = bh / d.NH, hd = bh % d.NH, t0 = k * L, len = min(L, d.S - t0);
          const int64_t so = static_cast<int64_t>(bh) * d.S + t0;
          const int64_t tok0 = (static_cast<int64_t>(b) * d.S + t0) * d.NH + hd;
#pragma unroll 1
          for (int i = lane; i < L; i += 32) {  // b, ĩ, m, 1/D, dden at bs + {0, 1, 2, 3, 4}·L
            if (i < len) {
              CpAsync4Shared(bsa + 4 * i, p.b_tok + so + i);
              CpAsync4Shared(bsa + 4 * (L + i), p.ig + tok0 + static_cast<int64_t>(i) * d.NH);
              CpAsync4Shared(bsa + 4 * (2 * L + i), p.m_tok + so + i);
              CpAsync4Shared(bsa + 4 * (3 * L + i), p.inv_d + so + i);
              CpAsync4Shared(bsa + 4 * (4 * L + i), p.dden + so + i);
            } else {
              bs[i] = 0.f;
              bs[L + i] = -INFINITY;
              bs[2 * L + i] = 0.f;
              bs[3 * L + i] = 0.f;
              bs[4 * L + i] = 0.f;
            }
          }
          const int64_t kst = static_cast<int64_t>(bh) * (d.NC + 1) + k;
          const float* nbase = p.sn + kst * d.DK + a0;
          const float* dnbase = p.dn + kst * d.dn_parts * d.DK + a0;
#pragma unroll 1
          for (int i = lane; i < DKT; i += 32) {
            CpAsync4Shared(bsa + 4 * (5 * L + i), nbase + i);
#pragma unroll 1
            for (int j = 0; j < d.dn_parts; ++j) {
              CpAsync4Shared(bsa + 4 * (5 * L + 2 * DKT + j * DKT + i), dnbase + static_cast<int64_t>(j) * d.DK + i);
            }
          }
          if (lane == 0) {
            CpAsync4Shared(bsa + 4 * (vec_floats - 4), p.smk + kst);
            CpAsync4Shared(bsa + 4 * (vec_floats - 3), p.smk + kst + 1);
          }
          // dn_{k+1} = the sum of the parts in LoadDqkVectors' order, here and not at the
          // consumers' use (there it sat on the dK tail: dn_parts loads a value, 8 at the 1.3b
          // cell). Each lane sums the parts it copied itself, after its copies landed (this warp
          // runs up to two tiles ahead; one round trip a tile is off the consumers' path).
          asm volatile("cp.async.wait_all;\n" ::: "memory");
#pragma unroll 1
          for (int i = lane; i < DKT; i += 32) {
            float dn = 0.f;
#pragma unroll 1
            for (int j = 0; j < d.dn_parts; ++j) dn += bs[5 * L + 2 * DKT + j * DKT + i];
            bs[5 * L + DKT + i] = dn;
          }
          if (k == 0 && p.dn0 != nullptr) {  // d_initial's dn0 (as LoadDqkVectors)
            const float* d0 = p.dn + (static_cast<int64_t>(bh) * (d.NC + 1) + d.NC) * d.dn_parts * d.DK + a0;
#pragma unroll 1
            for (int i = lane; i < DKT; i += 32) {
              float s0 = 0.f;
#pragma unroll 1
              for (int j = 0; j < d.dn_parts; ++j) s0 += d0[static_cast<int64_t>(j) * d.DK + i];
              p.dn0[static_cast<int64_t>(bh) * d.DK + a0 + i] = s0;
            }
          }
        }
        if (lane == 0) reinterpret_cast<int*>(bs)[vec_floats - 2] = min(tile, ntiles);
        MbArrive(vfull + 8 * vb);
        CpAsyncMbArriveNoinc(vfull + 8 * vb);
        if (tile >= ntiles) break;
        int next = 0;
        if (lane == 0) next = gridDim.x + static_cast<int>(atomicAdd(tile_counter, 1u));
        tile = __shfl_sync(0xffffffffu, next, 0);
      }
    }
    return;
  }

  // Consumers: warps 4-11, warpgroup wg owns rows 64wg..64wg+63 (as BwdDqkWs).
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
  const int tid = threadIdx.x - 128, lane = tid & 31, w = tid >> 5, g = lane >> 2, c = lane & 3;
  const int wg = __shfl_sync(0xffffffffu, tid >> 7, 0);
  const int64_t ldqk = static_cast<int64_t>(d.NH) * d.DK;
  const uint32_t own = wg * 64 * 128;
  const int r0 = 16 * w + g, r1 = r0 + 8;
  uint32_t par1 = 0, par3 = 0;
  for (int it = 0;; ++it) {
    const int vb = it & 1;
    const float* bs = vec + vb * vec_floats;
    const float* igs = bs + L;
    const float* ms = igs + L;
    const float* ivs = ms + L;
    const float* dds = ivs + L;
    const float* nks = dds + L;
    const float* dnks = nks + DKT;
    MbWait(vfull + 8 * vb, (it >> 1) & 1);
    const int tile = reinterpret_cast<const int*>(bs)[vec_floats - 2];
    if (tile >= ntiles) break;
    const int slab = tile % nslab, rest = tile / nslab, k = rest % d.NC, bh = rest / d.NC;
    const int a0 = slab * DKT, b = bh / d.NH, hd = bh % d.NH;
    const int t0 = k * L, len = min(L, d.S - t0);
    const int64_t tok0 = (static_cast<int64_t>(b) * d.S + t0) * d.NH + hd;
    const int64_t so = static_cast<int64_t>(bh) * d.S + t0;
    const float m_k = bs[vec_floats - 4];
    const float m_next = bs[vec_floats - 3];
    const int mirror = it & 1;
    const unsigned char* qs = sm + tile_at(it, 0);
    const unsigned char* ks = sm + tile_at(it, 2);
    unsigned char* dss = sm + tile_at(it, 4);

    float pacc[64], qacc[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) pacc[i] = qacc[i] = 0.f;
    for (int jt = 0; jt < njt; ++jt) {
      const int s = jt % 3, ps = mirror ? 2 - s : s;
      MbWait(full1 + 8 * ps, (par1 >> ps) & 1);
      par1 ^= 1u << ps;
      const uint32_t st = sa + ps * SM::kSlot;
      const uint64_t dh_d = SmemDescSw128(st + own, 16, 1024);
      const uint64_t v_d = SmemDescSw128(st + kTile64, 16, 1024);
      const uint64_t c_d = SmemDescSw128(st + 2 * kTile64, 16, 1024);
      const uint64_t clo_d = SmemDescSw128(st + 3 * kTile64, 16, 1024);
      WgmmaFence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        const uint64_t step = (kk * 32) >> 4;
        WgmmaSS128<0, 0>(pacc, dh_d + step, v_d + step, 1);
        WgmmaSS128<0, 0>(qacc, dh_d + step, c_d + step, 1);
        if constexpr (SPLIT) WgmmaSS128<0, 0>(qacc, dh_d + step, clo_d + step, 1);
      }
      WgmmaCommit();
      WgmmaWait<0>();  // this step's group retired: its stage is free now
      if (lane == 0) MbArrive(empty1 + 8 * ps);
    }
    WgmmaWait<0>();
    FenceRegs(pacc);
    FenceRegs(qacc);
    // Both warpgroups are done with phase 1 (dS' overwrites logical slot 1).
    NamedBarrierSync(1, kConsumers);
    // Phase 2 (as BwdDqkWs).
    float b0v, b1v;
    uint32_t pa[8][4];
    DqkPhase2<L>(d, pacc, qacc, pa, b0v, b1v, dss, bs, igs, ms, ivs, dds, nks, r0, r1, c, len, m_k);
    MbWait(full_qk, it & 1);
    DqkDqStore<L>(d, p, qacc, pa, SmemDescSw128(sa + tile_at(it, 2), kTile64, 1024), qs, tok0, a0, ldqk, so, slab,
                  r0, r1, c, len);
    // Phase 3 (as BwdDqkWs).
    float kacc[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) kacc[i] = 0.f;
    for (int jt = 0; jt < njt; ++jt) {
      const int s3 = jt & 1;
      MbWait(full3 + 8 * s3, (par3 >> s3) & 1);
      par3 ^= 1u << s3;
      const uint64_t v_d = SmemDescSw128(sa + tile_at(it, 7 + 3 * s3) + own, 16, 1024);
      const uint64_t dc_d = SmemDescSw128(sa + tile_at(it, 8 + 3 * s3), 16, 1024);
      const uint64_t dclo_d = SmemDescSw128(sa + tile_at(it, 6 + 3 * s3), 16, 1024);
      WgmmaFence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        const uint64_t step = (kk * 32) >> 4;
        WgmmaSS128<0, 0>(kacc, v_d + step, dc_d + step, 1);
        if constexpr (SPLIT) WgmmaSS128<0, 0>(kacc, v_d + step, dclo_d + step, 1);
      }
      WgmmaCommit();
      WgmmaWait<0>();
      if (lane == 0) MbArrive(empty3 + 8 * s3);
    }
    WgmmaWait<0>();
    FenceRegs(kacc);
    // Phase 3 is done in this warp: logical slot 2 may take the next tile's first phase-1 stage.
    if (lane == 0) MbArrive(tail + 16);
    {
      const float gl = bs[len - 1];
      const float E0 = r0 < len ? __expf(gl - b0v + igs[r0] - m_next) : 0.f;
      const float E1 = r1 < len ? __expf(gl - b1v + igs[r1] - m_next) : 0.f;
#pragma unroll
      for (int nt = 0; nt < 16; ++nt) {
        const int col = nt * 8 + 2 * c;
        kacc[4 * nt + 0] = E0 * (kacc[4 * nt + 0] + dnks[col]);
        kacc[4 * nt + 1] = E0 * (kacc[4 * nt + 1] + dnks[col + 1]);
        kacc[4 * nt + 2] = E1 * (kacc[4 * nt + 2] + dnks[col]);
        kacc[4 * nt + 3] = E1 * (kacc[4 * nt + 3] + dnks[col + 1]);
      }
    }
    // The last read of this tile's vectors: hand the buffer back to warp 1.
    __syncwarp();
    if (lane == 0) MbArrive(vempty + 8 * vb);
    NamedBarrierSync(1, kConsumers);  // dS' from both warpgroups written (and fenced)
    {
      const uint64_t ds_d = SmemDescSw128(sa + tile_at(it, 4) + wg * kTile64, kTile64, 1024);
      const uint64_t q_d = SmemDescSw128(sa + tile_at(it, 0), kTile64, 1024);
      WgmmaFence();
#pragma unroll
      for (int kk = 0; kk < 8; ++kk) {
        const uint64_t step = (kk * 16 * 128) >> 4;
        WgmmaSS128<1, 1>(kacc, ds_d + step, q_d + step, 1);
      }
      WgmmaCommit();
      WgmmaWait<0>();
      FenceRegs(kacc);
    }
    // dS' and phase-3 stage 0 are read: logical slot 1 is free (the fence orders this warp's
    // generic dS' stores before the TMA that refills the slot).
    FenceProxyAsync();
    __syncwarp();
    if (lane == 0) MbArrive(tail + 8);
    {
      bf16* dkbase = p.dk + tok0 * d.DK + a0;
      float dot0 = 0.f, dot1 = 0.f;
#pragma unroll
      for (int nt = 0; nt < 16; ++nt) {
        const int col = nt * 8 + 2 * c;
        const float2 k0 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(ks + Sw128Offset<L>(r0, col)));
        const float2 k1 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(ks + Sw128Offset<L>(r1, col)));
        dot0 += k0.x * kacc[4 * nt + 0] + k0.y * kacc[4 * nt + 1];
        dot1 += k1.x * kacc[4 * nt + 2] + k1.y * kacc[4 * nt + 3];
        if (r0 < len)
          *reinterpret_cast<uint32_t*>(dkbase + r0 * ldqk + col) = PackBf16(kacc[4 * nt], kacc[4 * nt + 1]);
        if (r1 < len)
          *reinterpret_cast<uint32_t*>(dkbase + r1 * ldqk + col) = PackBf16(kacc[4 * nt + 2], kacc[4 * nt + 3]);
      }
      // Q and K are read (the dots above, the wgmmas before): logical slot 0 is free.
      __syncwarp();
      if (lane == 0) MbArrive(tail);
      dot0 += __shfl_xor_sync(0xffffffffu, dot0, 1);
      dot0 += __shfl_xor_sync(0xffffffffu, dot0, 2);
      dot1 += __shfl_xor_sync(0xffffffffu, dot1, 1);
      dot1 += __shfl_xor_sync(0xffffffffu, dot1, 2);
      if (c == 0) {
        if (r0 < len) p.kdk[(so + r0) * p.n_dk_slabs + slab] = dot0;
        if (r1 < len) p.kdk[(so + r1) * p.n_dk_slabs + slab] = dot1;
      }
    }
  }
}
// ---------------------------------------------------------------- chunk 256: the off-diagonal block
//
// At chunk 256 every consumer kernel above runs one block per 128-token half of a chunk (the
// _l256 instantiations) and computes the half's diagonal (causal) 128 × 128 block and its state
// terms with the chunk's C_k / dC_{k+1}; what a 128-token half does not see alone is the
// off-diagonal block of the chunk's causal square: the second half's queries t against the first
// half's keys s (all s < t, no mask, only decay: W_ts = e^{b_t − b_s + ĩ_s − m_t} with b the
// 256-token chunk's cumsum, the same formula as on the diagonal). The consumers add it themselves
// (kOff above) from operands these two pre-passes compute once per chunk-head (one block of 256
// threads, two warpgroups, wgmma on 128-byte-swizzled cp.async tiles, two stages):
//   fwd: S' = Q̂₁K₀ᵀ (over dk), P' = S'·scale ⊙ W as fwd_out's bf16 hi + lo A fragments, and
//        P''s row sums (fwd_out's half-1 blocks add them to den and P'V₀ to h's numerator).
//   bwd: Sᵀ = K₀Q₁ᵀ (over dk) → P̃ᵀ = Sᵀ·scale ⊙ W / den (bf16 as bwd_dv's), and dPᵀ = V₀dH₁ᵀ
//        (over dv) → dS'ᵀ = scale ⊙ W (dPᵀ/den + dden) and its transpose dS' (bf16 as bwd_dqk's),
//        as A fragments: bwd_dv's half-0 blocks add P̃ᵀ dH₁, bwd_dqk's half-0 blocks dS'ᵀ Q₁ and
//        half-1 blocks dS' K₀ before their one bf16 rounding.
// (The first form, session 15's "simplest consumers" of kernels/cuda/mlstm_notes.md, added the
// block in two separate passes after the diagonal kernels — mlstm_fwd_offdiag_l256 /
// mlstm_bwd_offdiag_l256, re-reading Q₁, K₀, V₀, dH₁ and read-modify-writing the bf16 outputs with
// one extra rounding; it lost to this form in session 18 and was deleted by helper offclean18.)
struct OffdiagSmem {
  static constexpr int kTile64 = 128 * 128;   // [128 rows][64 cols] bf16
  static constexpr int kStage = 2 * kTile64;  // two [128][64] tiles
  static constexpr int kDS = 4 * kTile64;     // dS'ᵀ [128 s][128 t] (bwd), after OffdiagProduct's two stages
};

// acc (the m64n128 accumulator of this warpgroup's 64 rows) += A·B over `nsteps` 64-wide k steps;
// step x loads A rows (valid a_rows) from a + x·64 and B rows (valid b_rows) from bsrc + x·64
// (row strides lda, ldb), two stages. All 256 threads call it.
__device__ __forceinline__ void OffdiagProduct(float (&acc)[64], unsigned char* sm, uint32_t sa, int nsteps,
                                               const bf16* a, int64_t lda, int a_rows, const bf16* bsrc,
                                               int64_t ldb, int b_rows, int tid, uint32_t own) {
  using namespace hopper;
  auto load = [&](int x) {
    unsigned char* st = sm + (x & 1) * OffdiagSmem::kStage;
    LoadTileSw<128>(st, a + x * 64, lda, a_rows, tid, 256);
    LoadTileSw<128>(st + OffdiagSmem::kTile64, bsrc + x * 64, ldb, b_rows, tid, 256);
  };
  load(0);
  CpAsyncCommit();
  for (int x = 0; x < nsteps; ++x) {
    if (x + 1 < nsteps) load(x + 1);
    CpAsyncCommit();
    CpAsyncWait<1>();
    FenceProxyAsync();
    __syncthreads();
    const uint32_t st = sa + (x & 1) * OffdiagSmem::kStage;
    const uint64_t a_d = SmemDescSw128(st + own, 16, 1024);
    const uint64_t b_d = SmemDescSw128(st + OffdiagSmem::kTile64, 16, 1024);
    FenceRegs(acc);
    WgmmaFence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) WgmmaSS128<0, 0>(acc, a_d + ((kk * 32) >> 4), b_d + ((kk * 32) >> 4), 1);
    WgmmaCommit();
    WgmmaWait<0>();
    FenceRegs(acc);
    __syncthreads();  // stage x & 1 is refilled by step x + 2's loads
  }
}

// The forward's pre-pass (helper off256, session 18; it began as the first half of the deleted
// separate pass, whose den_t it reproduced bytewise): S' = Q̂₁K₀ᵀ, the gating and the row sums,
// then P' = S'·scale ⊙ W split into its bf16 hi / lo
// A fragments exactly as fwd_out packs P, stored per consumer thread (pfrag: [BH·NC][16][256]
// uint4: hi fragments 0-7, lo 8-15; rows past len are zeros), and the row sums into rs_off
// ([BH·NC][128] floats, every row). Once per chunk-head, where fwd_out's half-1 blocks would
// otherwise recompute S' for each of their dv/128 slabs. Two cp.async stages (65 KB of shared
// memory: more than one block an SM where the registers allow).
struct OffdiagPSmem {
  static constexpr size_t kVecOff = 2 * OffdiagSmem::kStage;
  static constexpr size_t kBytes = kVecOff + 4 * 128 * 4 + 1024;
};
template <bool SPLIT>
__global__ void __launch_bounds__(256, 1)
    mlstm_fwd_offdiag_p_l256(Dims d, FwdPtrs p, uint4* __restrict__ pfrag, float* __restrict__ rs_off) {
  using namespace hopper;
  constexpr int L = 128;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* sm = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  const uint32_t sa = SmemAddr(sm);
  float* bq = reinterpret_cast<float*>(sm + OffdiagPSmem::kVecOff);  // half 1: b_t, m_t
  float* mq = bq + L;
  float* bk = mq + L;  // half 0: b_s, ĩ_s
  float* igk = bk + L;
  const int kc = blockIdx.y, bh = blockIdx.z, b = bh / d.NH, hd = bh % d.NH;
  const int s0 = kc * 256, t1 = s0 + L;
  if (t1 >= d.S) return;  // no second half
  const int len = min(L, d.S - t1);
  const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5, g = lane >> 2, c = lane & 3;
  const int wg = __shfl_sync(0xffffffffu, tid >> 7, 0);
  const uint32_t own = wg * 64 * 128;
  const int64_t ldqk = static_cast<int64_t>(d.NH) * d.DK;
  const int64_t tok_s = (static_cast<int64_t>(b) * d.S + s0) * d.NH + hd;
  const int64_t tok_t = (static_cast<int64_t>(b) * d.S + t1) * d.NH + hd;
  const int64_t so_s = static_cast<int64_t>(bh) * d.S + s0, so_t = static_cast<int64_t>(bh) * d.S + t1;
  if (tid < L) {
    const bool ok = tid < len;
    bq[tid] = ok ? p.b_tok[so_t + tid] : 0.f;
    mq[tid] = ok ? p.m_tok[so_t + tid] : 0.f;
    bk[tid] = p.b_tok[so_s + tid];
    igk[tid] = p.ig[tok_s + static_cast<int64_t>(tid) * d.NH];
  }
  float sacc[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) sacc[i] = 0.f;
  OffdiagProduct(sacc, sm, sa, d.DK / 64, p.q + tok_t * d.DK, ldqk, len, p.k + tok_s * d.DK, ldqk, L, tid,
                 own);
  const int r0 = 16 * w + g, r1 = r0 + 8;
  const float b0v = bq[r0], b1v = bq[r1], m0v = mq[r0], m1v = mq[r1];
  float rs0 = 0.f, rs1 = 0.f;
#pragma unroll
  for (int nt = 0; nt < 16; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int s = nt * 8 + 2 * c + (e & 1);
      const int r = e < 2 ? r0 : r1;
      const float br = e < 2 ? b0v : b1v, mr = e < 2 ? m0v : m1v;
      float pv = 0.f;
      if (r < len) pv = sacc[4 * nt + e] * d.scale * __expf(br - bk[s] + igk[s] - mr);
      sacc[4 * nt + e] = pv;
      if (e < 2) rs0 += pv; else rs1 += pv;
    }
  }
  rs0 += __shfl_xor_sync(0xffffffffu, rs0, 1);
  rs0 += __shfl_xor_sync(0xffffffffu, rs0, 2);
  rs1 += __shfl_xor_sync(0xffffffffu, rs1, 1);
  rs1 += __shfl_xor_sync(0xffffffffu, rs1, 2);
  const int64_t bhc = static_cast<int64_t>(bh) * d.NC + kc;
  uint4* dst = pfrag + bhc * 16 * 256 + tid;
#pragma unroll
  for (int kk = 0; kk < 8; ++kk) {
    uint32_t hi[4], lo[4];
    SplitPack(sacc[8 * kk + 0], sacc[8 * kk + 1], hi[0], lo[0]);
    SplitPack(sacc[8 * kk + 2], sacc[8 * kk + 3], hi[1], lo[1]);
    SplitPack(sacc[8 * kk + 4], sacc[8 * kk + 5], hi[2], lo[2]);
    SplitPack(sacc[8 * kk + 6], sacc[8 * kk + 7], hi[3], lo[3]);
    dst[kk * 256] = make_uint4(hi[0], hi[1], hi[2], hi[3]);
    if constexpr (SPLIT) dst[(8 + kk) * 256] = make_uint4(lo[0], lo[1], lo[2], lo[3]);
  }
  if (c == 0) {
    rs_off[bhc * L + r0] = rs0;
    rs_off[bhc * L + r1] = rs1;
  }
}

// The backward's pre-pass (helper off256b, session 18; it began as the first half of the deleted
// separate pass, with the same products Sᵀ = K₀Q₁ᵀ over dk and dPᵀ = V₀dH₁ᵀ over dv and the same
// gating): the three wgmma A operands the consumers need, per consumer thread, into bfrag
// ([BH·NC][24][256] uint4, kOffdiagBwdFragBytes a chunk-head): 0-7 P̃ᵀ rows s (bwd_dv's half-0
// blocks: dV₀ += P̃ᵀ dH₁), 8-15 dS'ᵀ rows s (bwd_dqk's half-0 blocks: dK₀ += dS'ᵀ Q₁), 16-23
// dS' rows t (bwd_dqk's half-1 blocks: dQ₁ += dS' K₀; read back transposed from the swizzled
// dS'ᵀ tile in shared memory, the tile the deleted pass read as an M-major A). Columns / rows t past the
// sequence end are zeros. P̃ᵀ needs only Sᵀ and dS'ᵀ only dPᵀ, so each chunk-head gets two blocks
// (blockIdx.x 0: Sᵀ → P̃ᵀ; 1: dPᵀ → dS'ᵀ, dS'), each one synchronous product chain of dk/64 or
// dv/64 steps instead of the deleted pass's two in a row (the chain's latency, not bytes, sets its time:
// 128 blocks are one partial wave at the 1.3b cell), two blocks an SM (100 KB, ≤ 128 registers).
struct OffdiagBwdPSmem {
  static constexpr size_t kVecOff = OffdiagSmem::kDS + 2 * OffdiagSmem::kTile64;
  static constexpr size_t kBytes = kVecOff + 6 * 128 * 4 + 1024;
};
__global__ void __launch_bounds__(256, 2) mlstm_bwd_offdiag_p_l256(Dims d, BwdPtrs p, uint4* __restrict__ bfrag) {
  using namespace hopper;
  using SM = OffdiagSmem;
  constexpr int L = 128;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* sm = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  const uint32_t sa = SmemAddr(sm);
  float* bq = reinterpret_cast<float*>(sm + OffdiagBwdPSmem::kVecOff);  // half 1: b_t, m_t, 1/den_t, dden_t
  float* mq = bq + L;
  float* ivq = mq + L;
  float* ddq = ivq + L;
  float* bk = ddq + L;  // half 0: b_s, ĩ_s
  float* igk = bk + L;
  const int part = blockIdx.x, kc = blockIdx.y, bh = blockIdx.z, b = bh / d.NH, hd = bh % d.NH;
  const int s0 = kc * 256, t1 = s0 + L;
  if (t1 >= d.S) return;  // no second half
  const int len = min(L, d.S - t1);
  const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5, g = lane >> 2, c = lane & 3;
  const int wg = __shfl_sync(0xffffffffu, tid >> 7, 0);
  const uint32_t own = wg * 64 * 128;
  const int64_t ldqk = static_cast<int64_t>(d.NH) * d.DK, ldv = static_cast<int64_t>(d.NH) * d.DV;
  const int64_t tok_s = (static_cast<int64_t>(b) * d.S + s0) * d.NH + hd;
  const int64_t tok_t = (static_cast<int64_t>(b) * d.S + t1) * d.NH + hd;
  const int64_t so_s = static_cast<int64_t>(bh) * d.S + s0, so_t = static_cast<int64_t>(bh) * d.S + t1;
  if (tid < L) {
    const bool ok = tid < len;
    bq[tid] = ok ? p.b_tok[so_t + tid] : 0.f;
    mq[tid] = ok ? p.m_tok[so_t + tid] : 0.f;
    ivq[tid] = ok ? p.inv_d[so_t + tid] : 0.f;
    ddq[tid] = ok ? p.dden[so_t + tid] : 0.f;
    bk[tid] = p.b_tok[so_s + tid];
    igk[tid] = p.ig[tok_s + static_cast<int64_t>(tid) * d.NH];
  }
  // Rows s (this warp: r0, r1), columns t: part 0 Sᵀ, part 1 dPᵀ.
  float acc[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) acc[i] = 0.f;
  if (part == 0) {
    OffdiagProduct(acc, sm, sa, d.DK / 64, p.k + tok_s * d.DK, ldqk, L, p.q + tok_t * d.DK, ldqk, len, tid, own);
  } else {
    OffdiagProduct(acc, sm, sa, d.DV / 64, p.v + tok_s * d.DV, ldv, L, p.dh + tok_t * d.DV, ldv, len, tid, own);
  }
  const int r0 = 16 * w + g, r1 = r0 + 8;
  const float x0 = igk[r0] - bk[r0], x1 = igk[r1] - bk[r1];
#pragma unroll
  for (int nt = 0; nt < 16; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int t = nt * 8 + 2 * c + (e & 1);
      const float xs = e < 2 ? x0 : x1;
      float v = 0.f;
      if (t < len) {
        const float wt = __expf(bq[t] + xs - mq[t]);
        v = part == 0 ? acc[4 * nt + e] * d.scale * ivq[t] * wt : d.scale * wt * (acc[4 * nt + e] * ivq[t] + ddq[t]);
      }
      acc[4 * nt + e] = v;
    }
  }
  const int64_t bhc = static_cast<int64_t>(bh) * d.NC + kc;
  uint4* dst = bfrag + bhc * 24 * 256 + tid;
  unsigned char* dss = sm + SM::kDS;  // dS'ᵀ [s][t], swizzled (part 1)
#pragma unroll
  for (int kk = 0; kk < 8; ++kk) {
    uint32_t a[4];
    a[0] = PackBf16(acc[8 * kk + 0], acc[8 * kk + 1]);
    a[1] = PackBf16(acc[8 * kk + 2], acc[8 * kk + 3]);
    a[2] = PackBf16(acc[8 * kk + 4], acc[8 * kk + 5]);
    a[3] = PackBf16(acc[8 * kk + 6], acc[8 * kk + 7]);
    dst[(part == 0 ? kk : 8 + kk) * 256] = make_uint4(a[0], a[1], a[2], a[3]);
    if (part == 1) {
      const int col = 16 * kk + 2 * c;
      *reinterpret_cast<uint32_t*>(dss + Sw128Offset<L>(r0, col)) = a[0];
      *reinterpret_cast<uint32_t*>(dss + Sw128Offset<L>(r1, col)) = a[1];
      *reinterpret_cast<uint32_t*>(dss + Sw128Offset<L>(r0, col + 8)) = a[2];
      *reinterpret_cast<uint32_t*>(dss + Sw128Offset<L>(r1, col + 8)) = a[3];
    }
  }
  if (part == 0) return;
  __syncthreads();
  // dS' rows t (this thread's r0, r1 as t), columns s: element (t, s) is dS'ᵀ[s][t].
  auto ds_pair = [&](int t, int s) -> uint32_t {
    const uint32_t lo = *reinterpret_cast<const unsigned short*>(dss + Sw128Offset<L>(s, t));
    const uint32_t hi = *reinterpret_cast<const unsigned short*>(dss + Sw128Offset<L>(s + 1, t));
    return lo | (hi << 16);
  };
#pragma unroll
  for (int kk = 0; kk < 8; ++kk) {
    const int col = 16 * kk + 2 * c;
    dst[(16 + kk) * 256] = make_uint4(ds_pair(r0, col), ds_pair(r1, col), ds_pair(r0, col + 8), ds_pair(r1, col + 8));
  }
}

// ---------------------------------------------------------------- 8. gates_bwd

constexpr int kGateThreads = 256;

struct ArgMax {
  double v;
  int i;
};
__device__ __forceinline__ double ShflUp(double x, int o) {
  return __shfl_up_sync(0xffffffffu, x, o);
}
__device__ __forceinline__ ArgMax ShflUp(ArgMax x, int o) {
  return {__shfl_up_sync(0xffffffffu, x.v, o), __shfl_up_sync(0xffffffffu, x.i, o)};
}

// Inclusive block scan (256 threads) with an associative op; `carry` is combined in front and
// updated to the block total. T must be trivially copyable.
template <typename T, typename Op>
__device__ T BlockInclusiveScan(T x, Op op, T& carry, T* warp_tot) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    T y;
    y = ShflUp(x, o);
    if (lane >= o) x = op(y, x);
  }
  if (lane == 31) warp_tot[w] = x;
  __syncthreads();
  T pre = carry;
  for (int i = 0; i < w; ++i) pre = op(pre, warp_tot[i]);
  x = op(pre, x);
  T total = carry;
  for (int i = 0; i < kGateThreads / 32; ++i) total = op(total, warp_tot[i]);
  __syncthreads();
  carry = total;
  return x;
}

__global__ void __launch_bounds__(kGateThreads) mlstm_gates_bwd(Dims d, BwdPtrs p) {
  __shared__ double wd[kGateThreads / 32];
  __shared__ ArgMax wa[kGateThreads / 32];
  __shared__ double red[kGateThreads / 32];
  __shared__ double dm0_tail;
  const int bh = blockIdx.x, b = bh / d.NH, hd = bh % d.NH, tid = threadIdx.x;
  const int64_t so = static_cast<int64_t>(bh) * d.S;
  auto tok_of = [&](int t) { return (static_cast<int64_t>(b) * d.S + t) * d.NH + hd; };
  auto block_sum = [&](double v) {
    v = WarpSumT(v);
    if ((tid & 31) == 0) red[tid >> 5] = v;
    __syncthreads();
    double s = 0;
    for (int i = 0; i < kGateThreads / 32; ++i) s += red[i];
    __syncthreads();
    return s;
  };
  // F = <dC_S, C_S> + <dn_S, n_S>; init = <dC_0, C_0> + <dn_0, n_0>.
  double F = 0, init_dot = 0;
  const int64_t cd = static_cast<int64_t>(d.DK) * d.DV;
  if (p.dc_fin != nullptr) {
    double s = 0;
    const float* x = p.dc_fin + bh * cd;
    const float* y = p.sc_last + bh * cd;
    for (int64_t i = tid; i < cd; i += kGateThreads) s += double(x[i]) * y[i];
    const float* xn = p.dn_fin + static_cast<int64_t>(bh) * d.DK;
    const float* yn = p.sn + (static_cast<int64_t>(bh) * (d.NC + 1) + d.NC) * d.DK;
    for (int i = tid; i < d.DK; i += kGateThreads) s += double(xn[i]) * yn[i];
    F = block_sum(s);
  }
  if (p.dc0 != nullptr && p.c0 != nullptr) {
    double s = 0;
    const float* x = p.dc0 + bh * cd;
    const float* y = p.c0 + bh * cd;
    for (int64_t i = tid; i < cd; i += kGateThreads) s += double(x[i]) * y[i];
    for (int i = tid; i < d.DK; i += kGateThreads)
      s += double(p.dn0[static_cast<int64_t>(bh) * d.DK + i]) * p.n0[static_cast<int64_t>(bh) * d.DK + i];
    init_dot = block_sum(s);
  }
  const double m0 = p.c0 != nullptr ? double(p.m0[bh]) : 0.0;
  const double dm_last_extra = p.dc_fin != nullptr ? double(p.dm_fin[bh]) - F : 0.0;
  if (tid == 0) dm0_tail = 0;

  // Pass 1: B_t, prefix argmax of ĩ_t − B_t (ties keep the earlier), prefix sums of dm.
  double carry_b = 0, carry_ps = 0;
  ArgMax carry_a{m0, -1};
  auto add = [](double x, double y) { return x + y; };
  auto amax = [](ArgMax x, ArgMax y) { return y.v > x.v ? y : x; };
  for (int base = 0; base < d.S; base += kGateThreads) {
    const int t = base + tid;
    const bool ok = t < d.S;
    const double lf = ok ? double(LogForget(d.sigmoid, p.fg[tok_of(t)])) : 0.0;
    const double B = BlockInclusiveScan(lf, add, carry_b, wd);
    ArgMax cand{ok ? double(p.ig[tok_of(t)]) - B : -INFINITY, ok ? t : -1};
    if (!ok) cand.v = -INFINITY;
    const ArgMax best = BlockInclusiveScan(cand, amax, carry_a, wa);
    double dmv = ok ? double(p.dm[so + t]) : 0.0;
    if (t == d.S - 1) dmv += dm_last_extra;
    const double ps = BlockInclusiveScan(dmv, add, carry_ps, wd);
    if (ok) {
      p.arg[so + t] = best.i;
      p.ps[so + t] = ps;
      p.seg[so + t] = 0;
    }
  }
  __syncthreads();
  // Pass 2: segment sums: seg[a] = Σ_{t: arg_t = a} dm_t (arg is non-decreasing in t).
  for (int t = tid; t < d.S; t += kGateThreads) {
    const int a = p.arg[so + t];
    const bool end = t == d.S - 1 || p.arg[so + t + 1] != a;
    if (end) {
      if (a >= 0) {
        p.seg[so + a] = p.ps[so + t] - (a > 0 ? p.ps[so + a - 1] : 0.0);
      } else {
        dm0_tail = p.ps[so + t];
      }
    }
  }
  __syncthreads();
  // Pass 3 (reverse): dlf_r = F + Σ_{t>=r} (q·dq − k·dk + dm_t − seg_t); dĩ = k·dk + seg.
  double carry_r = F;
  const int ns = p.n_dk_slabs;
  for (int top = d.S - 1; top >= 0; top -= kGateThreads) {
    const int t = top - tid;
    const bool ok = t >= 0;
    double x = 0, kdk = 0, seg = 0;
    if (ok) {
      double qdq = 0;
      for (int i = 0; i < ns; ++i) {
        qdq += p.qdq[(so + t) * ns + i];
        kdk += p.kdk[(so + t) * ns + i];
      }
      seg = p.seg[so + t];
      double dmv = p.dm[so + t];
      if (t == d.S - 1) dmv += dm_last_extra;
      x = qdq - kdk + dmv - seg;
    }
    const double dlf = BlockInclusiveScan(x, add, carry_r, wd);
    if (ok) {
      const int64_t tok = tok_of(t);
      p.dig[tok] = float(kdk + seg);
      p.dfg[tok] = float(dlf * LogForgetDerivative(d.sigmoid, p.fg[tok]));
    }
  }
  if (p.dc0 != nullptr && tid == 0) p.dm0[bh] = float(init_dot + dm0_tail);
}

// kChunkParallel: the same three passes as mlstm_gates_bwd, but 1024 threads per head and
// kGateItems consecutive tokens per thread: each pass does a thread-local sweep for the
// thread's aggregate, one block scan of the aggregates, and a second sweep that applies the
// prefix (one block scan per 8192 tokens instead of three per 256).
constexpr int kGateParThreads = 1024;
constexpr int kGateItems = 8;

// Exclusive block scan (kGateParThreads threads, op(earlier, later)): returns carry ⊕ the
// aggregates of lower threads and advances carry by the block total. smem: 32 entries.
template <typename T, typename Op>
__device__ T BlockExclusiveScan(T x, Op op, T identity, T& carry, T* smem) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  T incl = x;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const T y = ShflUp(incl, o);
    if (lane >= o) incl = op(y, incl);
  }
  T excl = ShflUp(incl, 1);
  if (lane == 0) excl = identity;
  if (lane == 31) smem[w] = incl;
  __syncthreads();
  if (w == 0) {
    T t = smem[lane];  // kGateParThreads / 32 == 32 warps
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const T y = ShflUp(t, o);
      if (lane >= o) t = op(y, t);
    }
    smem[lane] = t;
  }
  __syncthreads();
  const T warp_pre = w > 0 ? smem[w - 1] : identity;
  const T result = op(carry, op(warp_pre, excl));
  const T total = smem[31];
  __syncthreads();  // smem is reused by the next scan
  carry = op(carry, total);
  return result;
}

__global__ void __launch_bounds__(kGateParThreads) mlstm_gates_bwd_par(Dims d, BwdPtrs p) {
  static_assert(kGateParThreads == 1024, "BlockExclusiveScan assumes 32 warps");
  __shared__ double sd[32];
  __shared__ ArgMax sa[32];
  __shared__ double dm0_tail;
  const int bh = blockIdx.x, b = bh / d.NH, hd = bh % d.NH, tid = threadIdx.x;
  const int64_t so = static_cast<int64_t>(bh) * d.S;
  auto tok_of = [&](int t) { return (static_cast<int64_t>(b) * d.S + t) * d.NH + hd; };
  auto add = [](double x, double y) { return x + y; };
  auto amax = [](ArgMax x, ArgMax y) { return y.v > x.v ? y : x; };
  auto block_sum = [&](double v) {
    double carry = 0;
    BlockExclusiveScan(v, add, 0.0, carry, sd);
    return carry;
  };
  double F = 0, init_dot = 0;
  const int64_t cd = static_cast<int64_t>(d.DK) * d.DV;
  if (p.dc_fin != nullptr) {
    double s = 0;
    const float* x = p.dc_fin + bh * cd;
    const float* y = p.sc_last + bh * cd;
    for (int64_t i = tid; i < cd; i += kGateParThreads) s += double(x[i]) * y[i];
    const float* xn = p.dn_fin + static_cast<int64_t>(bh) * d.DK;
    const float* yn = p.sn + (static_cast<int64_t>(bh) * (d.NC + 1) + d.NC) * d.DK;
    for (int i = tid; i < d.DK; i += kGateParThreads) s += double(xn[i]) * yn[i];
    F = block_sum(s);
  }
  if (p.dc0 != nullptr && p.c0 != nullptr) {
    double s = 0;
    const float* x = p.dc0 + bh * cd;
    const float* y = p.c0 + bh * cd;
    for (int64_t i = tid; i < cd; i += kGateParThreads) s += double(x[i]) * y[i];
    for (int i = tid; i < d.DK; i += kGateParThreads)
      s += double(p.dn0[static_cast<int64_t>(bh) * d.DK + i]) * p.n0[static_cast<int64_t>(bh) * d.DK + i];
    init_dot = block_sum(s);
  }
  const double m0 = p.c0 != nullptr ? double(p.m0[bh]) : 0.0;
  const double dm_last_extra = p.dc_fin != nullptr ? double(p.dm_fin[bh]) - F : 0.0;
  if (tid == 0) dm0_tail = 0;
  auto dm_of = [&](int t) {
    double v = double(p.dm[so + t]);
    if (t == d.S - 1) v += dm_last_extra;
    return v;
  };
  constexpr int kTile = kGateParThreads * kGateItems;

  // Pass 1: B_t, prefix argmax of ĩ_t − B_t (ties keep the earlier), prefix sums of dm.
  double carry_b = 0, carry_ps = 0;
  ArgMax carry_a{m0, -1};
  for (int base = 0; base < d.S; base += kTile) {
    const int t0 = base + tid * kGateItems, t1 = min(t0 + kGateItems, d.S);
    double bloc = 0, sdm = 0;
    ArgMax loc{-INFINITY, -1};  // in thread-local terms (argmax is shift-invariant)
    float lfv[kGateItems], igv[kGateItems];
    double dmv[kGateItems];
#pragma unroll
    for (int j = 0; j < kGateItems; ++j) {  // fixed trip count: all loads in flight at once
      const int t = t0 + j;
      const bool ok = t < t1;
      lfv[j] = ok ? LogForget(d.sigmoid, p.fg[tok_of(t)]) : 0.f;
      igv[j] = ok ? p.ig[tok_of(t)] : -INFINITY;
      dmv[j] = ok ? dm_of(t) : 0.0;
    }
#pragma unroll
    for (int j = 0; j < kGateItems; ++j) {
      bloc += double(lfv[j]);
      if (t0 + j < t1) loc = amax(loc, ArgMax{double(igv[j]) - bloc, t0 + j});
      sdm += dmv[j];
    }
    const double bpre = BlockExclusiveScan(bloc, add, 0.0, carry_b, sd);
    loc.v -= bpre;
    ArgMax run = BlockExclusiveScan(loc, amax, ArgMax{-INFINITY, -1}, carry_a, sa);
    double ps = BlockExclusiveScan(sdm, add, 0.0, carry_ps, sd);
    double B = bpre;
#pragma unroll
    for (int j = 0; j < kGateItems; ++j) {
      const int t = t0 + j;
      if (t < t1) {
        B += double(lfv[j]);
        run = amax(run, ArgMax{double(igv[j]) - B, t});
        ps += dmv[j];
        p.arg[so + t] = run.i;
        p.ps[so + t] = ps;
        p.seg[so + t] = 0;
      }
    }
  }
  __syncthreads();
  // Pass 2: segment sums: seg[a] = Σ_{t: arg_t = a} dm_t (arg is non-decreasing in t). The
  // kGateItems tokens of a thread (strided by the block) load together: two dependent rounds of
  // loads per 8192 tokens instead of two per 1024.
  for (int base = 0; base < d.S; base += kTile) {
    int av[kGateItems];
    bool endv[kGateItems];
#pragma unroll
    for (int u = 0; u < kGateItems; ++u) {
      const int t = base + u * kGateParThreads + tid;
      av[u] = t < d.S ? p.arg[so + t] : 0;
      const int next = t < d.S - 1 ? p.arg[so + t + 1] : 0;
      endv[u] = t < d.S && (t == d.S - 1 || next != av[u]);
    }
    double pt[kGateItems], pa[kGateItems];
#pragma unroll
    for (int u = 0; u < kGateItems; ++u) {
      const int t = base + u * kGateParThreads + tid;
      pt[u] = endv[u] ? p.ps[so + t] : 0.0;
      pa[u] = endv[u] && av[u] > 0 ? p.ps[so + av[u] - 1] : 0.0;
    }
#pragma unroll
    for (int u = 0; u < kGateItems; ++u) {
      if (!endv[u]) continue;
      if (av[u] >= 0) {
        p.seg[so + av[u]] = pt[u] - pa[u];
      } else {
        dm0_tail = pt[u];
      }
    }
  }
  __syncthreads();
  // Pass 3 (reverse): dlf_r = F + Σ_{t>=r} (q·dq − k·dk + dm_t − seg_t); dĩ = k·dk + seg.
  // Every load of a thread's kGateItems tokens is issued before the first use (slab-outer loop,
  // dĩ and f̃'s derivative ready before the scan): one round of dependent loads per slab instead
  // of one per (token, slab) and two more per token after the scan (the stores to dĩ / df̃ kept
  // the compiler from hoisting those loads). Same arithmetic, same order as before. Measured on
  // an H100 (7B heads, 8 blocks of S 8192): 0.075 vs 0.079 ms; 1.3b shape unchanged (0.032).
  double carry_r = F;
  const int ns = p.n_dk_slabs;
  for (int top = d.S - 1; top >= 0; top -= kTile) {
    const int t0 = top - tid * kGateItems;  // this thread: t0, t0 − 1, ..., t0 − 7 (>= 0)
    double qdqv[kGateItems], kdkv[kGateItems];
    float digv[kGateItems], dlfdv[kGateItems];
#pragma unroll
    for (int j = 0; j < kGateItems; ++j) qdqv[j] = kdkv[j] = 0;
    for (int i = 0; i < ns; ++i) {
#pragma unroll
      for (int j = 0; j < kGateItems; ++j) {
        const int t = t0 - j;
        if (t >= 0) {
          qdqv[j] += p.qdq[(so + t) * ns + i];
          kdkv[j] += p.kdk[(so + t) * ns + i];
        }
      }
    }
    double sx = 0;
#pragma unroll
    for (int j = 0; j < kGateItems; ++j) {
      const int t = t0 - j;
      double x = 0;
      digv[j] = 0.f;
      dlfdv[j] = 0.f;
      if (t >= 0) {
        const double seg = p.seg[so + t];
        x = qdqv[j] - kdkv[j] + dm_of(t) - seg;
        digv[j] = float(kdkv[j] + seg);
        dlfdv[j] = LogForgetDerivative(d.sigmoid, p.fg[tok_of(t)]);
      }
      qdqv[j] = x;  // reused: x_t
      sx += x;
    }
    double dlf = BlockExclusiveScan(sx, add, 0.0, carry_r, sd);
#pragma unroll
    for (int j = 0; j < kGateItems; ++j) {
      const int t = t0 - j;
      if (t >= 0) {
        dlf += qdqv[j];
        const int64_t tok = tok_of(t);
        p.dig[tok] = digv[j];
        p.dfg[tok] = float(dlf * dlfdv[j]);
      }
    }
  }
  if (p.dc0 != nullptr && tid == 0) p.dm0[bh] = float(init_dot + dm0_tail);
}

// kCluster: the three passes of mlstm_gates_bwd_par with each head's sequence split over a
// cluster of CL CTAs (CTA r owns tokens [r·per, (r+1)·per), per = ⌈S/CL⌉). Every scan becomes
// "CTA aggregate -> exchange through distributed shared memory -> local scan from the carry of
// the lower (pass 1) or higher (pass 3) ranks"; a CTA sweeps its range twice per scan pass (the
// aggregate, then the scan), reading the inputs twice (they are a few KB per CTA). The segment
// sums of pass 2 read ps / arg across CTA boundaries, so passes are separated by cluster
// barriers (release / acquire at cluster scope: the global writes of pass 1 and 2 are visible to
// the other CTAs after them). Why: with one block per head the 7B layout (8 heads of S 8192)
// used 8 SMs for 0.075 ms (H100, helper mlstm4); latency-bound, so more SMs per head.
constexpr int kGateClThreads = 256;
constexpr int kGateClItems = 2;
constexpr int kGateClWarps = kGateClThreads / 32;
constexpr int kGateClMax = 16;

// Exclusive scan over the kGateClThreads threads (op(earlier, later), identity on the left),
// carry in front; carry advances by the block total. smem: kGateClWarps entries.
template <typename T, typename Op>
__device__ T BlockExclusiveScanCl(T x, Op op, T identity, T& carry, T* smem) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  T incl = x;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const T y = ShflUp(incl, o);
    if (lane >= o) incl = op(y, incl);
  }
  T excl = ShflUp(incl, 1);
  if (lane == 0) excl = identity;
  if (lane == 31) smem[w] = incl;
  __syncthreads();
  T warp_pre = identity, total = identity;
#pragma unroll
  for (int i = 0; i < kGateClWarps; ++i) {
    if (i < w) warp_pre = op(warp_pre, smem[i]);
    total = op(total, smem[i]);
  }
  __syncthreads();  // smem is reused by the next scan
  const T result = op(carry, op(warp_pre, excl));
  carry = op(carry, total);
  return result;
}

// What a CTA publishes to the others of its cluster.
struct GateClusterShare {
  double f_part, init_part;  // its share of <dC_S, C_S> + <dn_S, n_S> and <dC_0, C_0> + ...
  double sum_lf;             // Σ lf over its tokens
  ArgMax best;               // argmax of ĩ_t − (B_t − B at its first token) over its tokens
  double sum_dm;             // Σ dm over its tokens (without the last token's extra)
  double sum_x;              // pass 3: Σ x_t over its tokens
  double dm0_tail;           // rank 0's copy is the one used
};

__global__ void __launch_bounds__(kGateClThreads) mlstm_gates_bwd_cluster(Dims d, BwdPtrs p) {
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  __shared__ double sd[kGateClWarps];
  __shared__ ArgMax sa[kGateClWarps];
  __shared__ GateClusterShare share;
  const int CL = static_cast<int>(cluster.num_blocks());
  const int rank = static_cast<int>(cluster.block_rank());
  const int bh = blockIdx.y, b = bh / d.NH, hd = bh % d.NH, tid = threadIdx.x;
  const int per = (d.S + CL - 1) / CL;
  const int r0 = min(d.S, rank * per), r1 = min(d.S, r0 + per);
  const int64_t so = static_cast<int64_t>(bh) * d.S;
  auto tok_of = [&](int t) { return (static_cast<int64_t>(b) * d.S + t) * d.NH + hd; };
  auto add = [](double x, double y) { return x + y; };
  auto amax = [](ArgMax x, ArgMax y) { return y.v > x.v ? y : x; };
  constexpr ArgMax kNone{-INFINITY, -1};
  auto block_sum = [&](double v) {
    double carry = 0;
    BlockExclusiveScanCl(v, add, 0.0, carry, sd);
    return carry;
  };
  constexpr int kTile = kGateClThreads * kGateClItems;

  // Pass 0: this CTA's shares of F and of the initial-state dot.
  const int64_t cd = static_cast<int64_t>(d.DK) * d.DV;
  const int64_t stride = static_cast<int64_t>(CL) * kGateClThreads;
  const int64_t first = static_cast<int64_t>(rank) * kGateClThreads + tid;
  double f_part = 0, init_part = 0;
  if (p.dc_fin != nullptr) {
    double s = 0;
    const float* x = p.dc_fin + bh * cd;
    const float* y = p.sc_last + bh * cd;
    for (int64_t i = first; i < cd; i += stride) s += double(x[i]) * y[i];
    const float* xn = p.dn_fin + static_cast<int64_t>(bh) * d.DK;
    const float* yn = p.sn + (static_cast<int64_t>(bh) * (d.NC + 1) + d.NC) * d.DK;
    for (int64_t i = first; i < d.DK; i += stride) s += double(xn[i]) * yn[i];
    f_part = block_sum(s);
  }
  if (p.dc0 != nullptr && p.c0 != nullptr) {
    double s = 0;
    const float* x = p.dc0 + bh * cd;
    const float* y = p.c0 + bh * cd;
    for (int64_t i = first; i < cd; i += stride) s += double(x[i]) * y[i];
    for (int64_t i = first; i < d.DK; i += stride)
      s += double(p.dn0[static_cast<int64_t>(bh) * d.DK + i]) * p.n0[static_cast<int64_t>(bh) * d.DK + i];
    init_part = block_sum(s);
  }

  // Pass 1 over this CTA's tokens, from the given carries: B_t, the prefix argmax of ĩ_t − B_t,
  // prefix sums of dm (with `extra` on token S−1). write = false: only the carries advance.
  auto pass1 = [&](bool write, double& carry_b, ArgMax& carry_a, double& carry_ps, double extra) {
    for (int base = r0; base < r1; base += kTile) {
      const int t0 = base + tid * kGateClItems, t1 = min(t0 + kGateClItems, r1);
      double bloc = 0, sdm = 0;
      ArgMax loc = kNone;  // in thread-local terms (argmax is shift-invariant)
      float lfv[kGateClItems], igv[kGateClItems];
      double dmv[kGateClItems];
#pragma unroll
      for (int j = 0; j < kGateClItems; ++j) {
        const int t = t0 + j;
        const bool ok = t < t1;
        lfv[j] = ok ? LogForget(d.sigmoid, p.fg[tok_of(t)]) : 0.f;
        igv[j] = ok ? p.ig[tok_of(t)] : -INFINITY;
        dmv[j] = ok ? double(p.dm[so + t]) + (t == d.S - 1 ? extra : 0.0) : 0.0;
      }
#pragma unroll
      for (int j = 0; j < kGateClItems; ++j) {
        bloc += double(lfv[j]);
        if (t0 + j < t1) loc = amax(loc, ArgMax{double(igv[j]) - bloc, t0 + j});
        sdm += dmv[j];
      }
      // carry_b before this tile: the argmax values of this tile are relative to it.
      const double b_before = carry_b;
      const double bpre = BlockExclusiveScanCl(bloc, add, 0.0, carry_b, sd);
      loc.v -= bpre;
      ArgMax run = BlockExclusiveScanCl(loc, amax, kNone, carry_a, sa);
      double ps = BlockExclusiveScanCl(sdm, add, 0.0, carry_ps, sd);
      if (write) {
        double B = bpre;  // = carry_b(before) + the lower threads' sums
#pragma unroll
        for (int j = 0; j < kGateClItems; ++j) {
          const int t = t0 + j;
          if (t < t1) {
            B += double(lfv[j]);
            run = amax(run, ArgMax{double(igv[j]) - B, t});
            ps += dmv[j];
            p.arg[so + t] = run.i;
            p.ps[so + t] = ps;
            p.seg[so + t] = 0;
          }
        }
      }
      (void)b_before;
    }
  };
  // The argmax candidates of a tile are ĩ_t − B_t with B_t from carry_b: pass1 with carry_b
  // starting at 0 gives this CTA's best in terms of its local B; the caller shifts it.
  double loc_b = 0, loc_ps = 0;
  ArgMax loc_a = kNone;
  pass1(false, loc_b, loc_a, loc_ps, 0.0);
  if (tid == 0) {
    share.f_part = f_part;
    share.init_part = init_part;
    share.sum_lf = loc_b;
    share.best = loc_a;
    share.sum_dm = loc_ps;
    share.dm0_tail = 0;
  }
  cluster.sync();
  double F = 0, init_dot = 0, carry_b = 0, carry_ps = 0;
  ArgMax carry_a{p.c0 != nullptr ? double(p.m0[bh]) : 0.0, -1};
  for (int j = 0; j < CL; ++j) {
    const GateClusterShare* o = cluster.map_shared_rank(&share, j);
    F += o->f_part;
    init_dot += o->init_part;
    if (j < rank) {
      const ArgMax cand{o->best.v - carry_b, o->best.i};  // local B -> global B
      carry_a = amax(carry_a, cand);
      carry_b += o->sum_lf;
      carry_ps += o->sum_dm;
    }
  }
  const double dm_last_extra = p.dc_fin != nullptr ? double(p.dm_fin[bh]) - F : 0.0;
  pass1(true, carry_b, carry_a, carry_ps, dm_last_extra);
  cluster.sync();  // arg, ps, seg of every CTA written; every read of `share` above done

  // Pass 2: segment sums seg[a] = Σ_{t: arg_t = a} dm_t over segment ends t in this CTA.
  for (int t = r0 + tid; t < r1; t += kGateClThreads) {
    const int a = p.arg[so + t];
    const bool end = t == d.S - 1 || p.arg[so + t + 1] != a;
    if (end) {
      const double pt = p.ps[so + t];
      if (a >= 0) {
        p.seg[so + a] = pt - (a > 0 ? p.ps[so + a - 1] : 0.0);
      } else {
        cluster.map_shared_rank(&share, 0)->dm0_tail = pt;  // one segment has a = −1
      }
    }
  }
  cluster.sync();

  // Pass 3 (reverse): dlf_r = F + Σ_{t>=r} (q·dq − k·dk + dm_t − seg_t); dĩ = k·dk + seg.
  const int ns = p.n_dk_slabs;
  auto x_of = [&](int t, double& kdk) {
    double qdq = 0;
    kdk = 0;
    for (int i = 0; i < ns; ++i) {
      qdq += p.qdq[(so + t) * ns + i];
      kdk += p.kdk[(so + t) * ns + i];
    }
    double dmv = p.dm[so + t];
    if (t == d.S - 1) dmv += dm_last_extra;
    return qdq - kdk + dmv - p.seg[so + t];
  };
  {
    double sx = 0;
    for (int t = r0 + tid; t < r1; t += kGateClThreads) {
      double kdk;
      sx += x_of(t, kdk);
    }
    sx = block_sum(sx);
    if (tid == 0) share.sum_x = sx;
  }
  cluster.sync();
  double carry_r = F;
  for (int j = CL - 1; j > rank; --j) carry_r += cluster.map_shared_rank(&share, j)->sum_x;
  const double dm0_tail = rank == 0 ? share.dm0_tail : 0.0;
  cluster.sync();  // no CTA leaves (or reuses `share`) while another reads it
  for (int top = r1 - 1; top >= r0; top -= kTile) {
    const int t0 = top - tid * kGateClItems;  // this thread: t0, t0 − 1, ... (>= r0)
    double xv[kGateClItems];
    float digv[kGateClItems], dlfdv[kGateClItems];
    double sx = 0;
#pragma unroll
    for (int j = 0; j < kGateClItems; ++j) {
      const int t = t0 - j;
      xv[j] = 0;
      digv[j] = 0.f;
      dlfdv[j] = 0.f;
      if (t >= r0) {
        double kdk;
        xv[j] = x_of(t, kdk);
        digv[j] = float(kdk + p.seg[so + t]);
        dlfdv[j] = LogForgetDerivative(d.sigmoid, p.fg[tok_of(t)]);
      }
      sx += xv[j];
    }
    double dlf = BlockExclusiveScanCl(sx, add, 0.0, carry_r, sd);
#pragma unroll
    for (int j = 0; j < kGateClItems; ++j) {
      const int t = t0 - j;
      if (t >= r0) {
        dlf += xv[j];
        const int64_t tok = tok_of(t);
        p.dig[tok] = digv[j];
        p.dfg[tok] = float(dlf * dlfdv[j]);
      }
    }
  }
  if (rank == 0 && p.dc0 != nullptr && tid == 0) p.dm0[bh] = float(init_dot + dm0_tail);
}

// ---------------------------------------------------------------- step

// One generation step. A head's dk×dv fp32 state is 512 KB at the 7B layout and the step is a
// pure stream over it (read C, write C, h = q̂ᵀC/den), so the work is spread over a CLUSTER of
// CTAs per head: CTA r of the cluster owns dk rows [r·rows, (r+1)·rows) and every dv column,
// updates them in place and leaves its partial q̂ᵀC row sums in shared memory; after a cluster
// barrier CTA r sums the cluster's partials for its share of the columns through distributed
// shared memory and writes h. Every CTA computes den over all dk (dk loads, cheap), so only
// h needs the exchange. Old n and m are read by all CTAs before the barrier and written after it.
constexpr int kStepThreads = 256;

__global__ void __launch_bounds__(kStepThreads) mlstm_step(Dims d, int rows, const bf16* q,
                                                           const bf16* k, const bf16* v,
                                                           const float* ig, const float* fg,
                                                           float* cst, float* nst, float* mst,
                                                           bf16* h) {
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  extern __shared__ float sh[];
  float* hpart = sh;         // [DV] Σ over this CTA's rows of q̂_a C_new[a][j]
  float* qs = hpart + d.DV;  // [rows] q̂ of the slice
  float* kn = qs + rows;     // [rows] i'·k of the slice
  float* red = kn + rows;    // [kStepThreads / 32]
  const int csize = static_cast<int>(cluster.num_blocks());
  const int rank = static_cast<int>(cluster.block_rank());
  const int bh = blockIdx.x / csize, tid = threadIdx.x;
  const int a_begin = rank * rows, a_end = min(d.DK, a_begin + rows);
  const float lf = LogForget(d.sigmoid, fg[bh]);
  const float m_old = mst[bh];
  const float m_new = fmaxf(lf + m_old, ig[bh]);
  const float fp = __expf(lf + m_old - m_new), ip = __expf(ig[bh] - m_new);
  float den_part = 0.f;
  for (int a = tid; a < d.DK; a += kStepThreads) {
    const float qa = __bfloat162float(q[static_cast<int64_t>(bh) * d.DK + a]) * d.scale;
    const float ka = ip * __bfloat162float(k[static_cast<int64_t>(bh) * d.DK + a]);
    if (a >= a_begin && a < a_end) {
      qs[a - a_begin] = qa;
      kn[a - a_begin] = ka;
    }
    den_part += qa * (fp * nst[static_cast<int64_t>(bh) * d.DK + a] + ka);
  }
  den_part = WarpSumT(den_part);
  if ((tid & 31) == 0) red[tid >> 5] = den_part;
  __syncthreads();
  float den = 0.f;
  for (int i = 0; i < kStepThreads / 32; ++i) den += red[i];
  const float inv = 1.f / (fmaxf(fabsf(den), __expf(-m_new)) + d.eps);
  float* cb = cst + static_cast<int64_t>(bh) * d.DK * d.DV;
  const int my_rows = max(0, a_end - a_begin);
  // Each thread owns kStepCols columns (j, j + 256, ...) and walks its rows in batches of
  // kStepRows: all loads of a batch are issued before any store (a load after a store to C could
  // alias it, so the compiler would otherwise wait one memory latency per row).
  constexpr int kStepCols = 2, kStepRows = 16;
  for (int jb = 0; jb < d.DV; jb += kStepCols * kStepThreads) {
    float vj[kStepCols], acc[kStepCols];
#pragma unroll
    for (int u = 0; u < kStepCols; ++u) {
      const int j = jb + u * kStepThreads + tid;
      vj[u] = j < d.DV ? __bfloat162float(v[static_cast<int64_t>(bh) * d.DV + j]) : 0.f;
      acc[u] = 0.f;
    }
    for (int r0 = 0; r0 < my_rows; r0 += kStepRows) {
      float cv[kStepCols][kStepRows];
#pragma unroll
      for (int u = 0; u < kStepCols; ++u) {
        const int j = jb + u * kStepThreads + tid;
#pragma unroll
        for (int i = 0; i < kStepRows; ++i) {
          const bool ok = j < d.DV && r0 + i < my_rows;
          cv[u][i] = ok ? cb[static_cast<int64_t>(a_begin + r0 + i) * d.DV + j] : 0.f;
        }
      }
#pragma unroll
      for (int u = 0; u < kStepCols; ++u) {
        const int j = jb + u * kStepThreads + tid;
#pragma unroll
        for (int i = 0; i < kStepRows; ++i) {
          if (j < d.DV && r0 + i < my_rows) {
            const float cn = fp * cv[u][i] + kn[r0 + i] * vj[u];
            cb[static_cast<int64_t>(a_begin + r0 + i) * d.DV + j] = cn;
            acc[u] += qs[r0 + i] * cn;
          }
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kStepCols; ++u) {
      const int j = jb + u * kStepThreads + tid;
      if (j < d.DV) hpart[j] = acc[u];
    }
  }
  cluster.sync();  // partials visible cluster-wide; every CTA has read the old n and m
  const int cols = (d.DV + csize - 1) / csize;
  for (int j = rank * cols + tid; j < min(d.DV, (rank + 1) * cols); j += kStepThreads) {
    float sum = 0.f;
    for (int r = 0; r < csize; ++r) sum += cluster.map_shared_rank(hpart, r)[j];
    h[static_cast<int64_t>(bh) * d.DV + j] = __float2bfloat16_rn(sum * inv);
  }
  for (int r = tid; r < my_rows; r += kStepThreads) {
    float* na = nst + static_cast<int64_t>(bh) * d.DK + a_begin + r;
    *na = fp * *na + kn[r];
  }
  if (rank == 0 && tid == 0) mst[bh] = m_new;
  cluster.sync();  // no CTA leaves while another still reads its partials
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
  d.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(s.dk)));
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
    cudaLaunchConfig_t cfg = {};
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = static_cast<unsigned>(d.gate_cluster);
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.gridDim = dim3(static_cast<unsigned>(d.gate_cluster), static_cast<unsigned>(bh));
    cfg.blockDim = dim3(32 * kGateFwdClWarps);
    cfg.stream = stream;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
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
  return d.split ? out(std::integral_constant<int, 64>{}, T{})
                 : out(std::integral_constant<int, 64>{}, F{});
}

CudaResult LaunchGatesBwd(const Dims& d, const BwdPtrs& p, cudaStream_t stream) {
  const int bh = d.B * d.NH;
  if (d.gate_cluster > 1) {
    cudaLaunchConfig_t cfg = {};
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = static_cast<unsigned>(d.gate_cluster);
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.gridDim = dim3(static_cast<unsigned>(d.gate_cluster), static_cast<unsigned>(bh));
    cfg.blockDim = dim3(kGateClThreads);
    cfg.stream = stream;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
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

// Step 4: the warp-per-token kernel that forms dh·(h + h_lo) itself, or with `dots` (not null;
// MlstmChunkwiseBackwardWithDots) the thread-per-token one that reads them.
CudaResult LaunchBwdPrep(const Dims& d, const BwdPtrs& p, const float* dots, cudaStream_t stream) {
  const int64_t tokens = static_cast<int64_t>(d.B) * d.S * d.NH;
  if (dots != nullptr) {
    mlstm_bwd_prep_dots<<<static_cast<unsigned>((tokens + 255) / 256), 256, 0, stream>>>(d, p, dots);
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
    CUDA_RETURN_IF_NOT_OK(dv(std::integral_constant<int, 64>{}));
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
    cudaLaunchConfig_t cfg = {};
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = static_cast<unsigned>(d.gate_cluster);
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.gridDim = dim3(static_cast<unsigned>(d.gate_cluster), static_cast<unsigned>(bh));
    cfg.blockDim = dim3(32 * kGateFwdClWarps);
    cfg.stream = stream;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
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
