// Mamba-2 SSD chunked forward and backward on the GPU; the contract is in ssd.h, the math in
// kernels/cpu/ssd.h and MODELS.md §4.1–4.2.
//
// ---------------------------------------------------------------------------------------------
// The algorithm
// ---------------------------------------------------------------------------------------------
// Per batch row b, head h (group g = h / (H/G)), chunk c of Q tokens (the last may be partial;
// its missing tokens are treated as dt = 0, x = B = C = 0, which changes nothing):
//
//   a_t = dt_t·A,  Acs_t = Σ_{t'≤t in chunk} a_t'   (≤ 0, decreasing; every exponent below ≤ 0)
//   S_c   = Σ_s (e^{Acs_last − Acs_s} dt_s x_s)ᵀ B_s                  [P×N] chunk state
//   H_c+1 = e^{Acs_last} H_c + S_c                                     state passing (fp32)
//   y_l   = Σ_{s≤l} (C_l·B_s) e^{Acs_l − Acs_s} dt_s x_s               intra-chunk (quadratic)
//         + e^{Acs_l} C_l H_cᵀ + D x_l                                 inter-chunk + skip
//
// Forward kernels (token tiles of 64 rows; all products on tensor cores, bf16 operands from shared
// memory, fp32 accumulators, each warp owning 32×32 output tiles: mma.sync.m16n8k16 fed by
// ldmatrix, see "block-level tensor-core GEMM" below):
//   1. ssd_dt_cumsum       dt = clamp(softplus(raw + bias)) (saved), Acs per chunk (saved).
//   2. ssd_chunk_state     S_c for every (b, c, h, 64-column slice of N), written straight into
//                          the saved boundary-state slot c+1.
//   3. ssd_state_pass      one thread per state element walks the chunks: H_{c+1} = e·H_c + S_c,
//                          in place; slot 0 = initial state; the last slot is the final state.
//                          (v3, many (slice, h, b) blocks: 2 and 3 are one kernel,
//                          ssd_chunk_state_scan, and so are backward 1 and 2.)
//   4. ssd_chunk_scan_fwd  per (b, c, h, 64-row tile of l): y = e^{Acs} C H_cᵀ (one product,
//                          rows scaled), then for each s-tile ≤ l-tile: M = C Bᵀ (fp32), masked
//                          and scaled by e^{Acs_l−Acs_s}·dt_s, rounded to bf16, y += M x_s; + D x.
//                          C Bᵀ is recomputed per head instead of stored (G = 1 would share it
//                          across all H heads, but storing it costs Q² fp32 per (b, c) of reads
//                          per head, and the recompute is only Q²N of the ~Q²(N+P)+2QPN flops).
//
// Backward (reverse-mode of exactly the above; bf16 operands, fp32 accumulation):
//   1. ssd_chunk_state<bwd>  dS_c = Σ_l (e^{Acs_l} dy_l)ᵀ C_l: the part of ∂L/∂H_c that chunk
//                          c's own outputs produce.
//   2. ssd_state_pass_bwd  reverse walk: G_NC = d final; the buffer slot c receives G_{c+1}
//                          (= ∂L/∂(output state of chunk c)); G_c = e^{Acs_last} G_{c+1} + dS_c;
//                          G_0 = d initial state. Also the partial dot products
//                          <G_{c+1}, H_c> (the decay's gradient), per 256 elements.
//   3. ssd_chunk_scan_bwd_dx  per (b, c, h), whole chunk in one block: dX̄_s = e^{Acs_last−Acs_s}
//                          B_s G_{c+1}ᵀ + Σ_{l≥s} (B_s·C_l) e^{Acs_l−Acs_s} dy_l; dx = dt·dX̄ + D dy;
//                          every ∂/∂Acs term (intra: dt_s (x_s·dy_l) M_ls, summed into l and
//                          subtracted from s; state: the decay weights and <G, H_c>; inter:
//                          e^{Acs_l} dy_l·(C_l H_cᵀ)) summed in shared memory, reverse-cumsummed
//                          into ∂/∂a, then d dt_raw (through softplus/clamp), and per-block
//                          partials of ∂A, ∂dt_bias, ∂D in float64.
//   4. ssd_chunk_scan_bwd_dbc<dC|dB>  per (b, c, g, 64-row tile, head split): the heads of the
//                          group are looped inside the block, summing dCB = Σ_h dt_s e^{..}
//                          (dy_l·x_s) in fp32 shared memory, plus the per-head state terms
//                          e^{Acs_l} dy_l H_c (dC) and e^{Acs_last−Acs_s} dt_s x_s G_{c+1} (dB);
//                          then dC += dCB B, dB += dCBᵀ C. Head splits write fp32 partials that
//                          ssd_reduce_bc sums in a fixed order into bf16 dB, dC.
//   5. ssd_param_reduce    ∂A_log, ∂dt_bias, ∂D: the per-(b, c, h) partials summed per head in a
//                          fixed order and ACCUMULATED (deterministic; no float atomics on
//                          parameters). The only atomics are shared-memory adds of ∂Acs terms
//                          inside one block (order may vary run to run at fp32 rounding level).
//
// ∂A in the difference form. A·∂A = Σ_t ∂Acs_t·Acs_t, and almost every ∂Acs term comes in a
// pair (+v at token l, −v at token s < l: the intra-chunk terms dt_s (x_s·dy_l) M_ls and the
// state terms dt_s w_s x_s·dX̄_s), whose true contribution is v·(Acs_l − Acs_s). Forming ∂A from
// the reverse cumsum of the fp32 ∂Acs (Σ_t dt_t Σ_{t'≥t} ∂Acs_t', as the CPU reference does in
// float64) weights each term's fp32 rounding residue by |Acs_t| (up to |A|·Σ dt, thousands at
// dt ~ 3, |A| ~ 30) instead of by the pair's Acs difference: with fast decays the true ∂A is
// a sum of near-neighbour terms and the residues dominated it (1.5e-2 relative error on one
// ssd_gpu_test input; a CPU emulation of that fp32 order gives 1.7e-2 on the same input).
// So the kernels add each term with its own weight as it is formed — v·(Acs_l − Acs_s) for a
// pair, v·Acs_l for the inter and decay terms — in double across terms (fp32 within a
// thread's share of one tile pair), and ∂A = that sum / A. ∂dt still uses the reverse cumsum
// (its terms are not weighted by Acs, so it has no such amplification).
//
// ---------------------------------------------------------------------------------------------
// Cost (B8 S2048 H64 P64 N128 G1 Q256: NC = 8 chunks, B·NC·H = 4096 (b, c, h) blocks)
// ---------------------------------------------------------------------------------------------
// FLOPs per (b, c, h), causal halves counted as computed (tile pairs on/below the diagonal,
// (Q/64)(Q/64+1)/2 = 10 of 16 for Q = 256):
//   forward:  C Bᵀ 2·Q²N·(10/16) 10.5M + M x 2·Q²P·(10/16) 5.2M + C Hᵀ 2QPN 4.2M
//             + chunk state 2QPN 4.2M                                    = 24.1 MFLOP → 99 GFLOP
//   backward: dS 4.2M; dx kernel: B Cᵀ 10.5M + x dyᵀ 5.2M + M dy 5.2M + B Gᵀ 4.2M + C Hᵀ 4.2M;
//             dB/dC kernels: 2 × (x dyᵀ 5.2M + state term 4.2M) + the summed dCB products
//             (once per group, negligible at G = 1)                   = 52.2 MFLOP → 214 GFLOP
// Bytes (fewest the contract allows, bf16 = 2): forward reads x, B, C, dt and writes y,
//   the saved states (B·H·(NC+1)·P·N fp32 = 151 MB here), dt, Acs: ≈ 67+8+8+4 + 67 + 151
//   ≈ 0.31 GB; backward reads x, B, C, dy, saved (≈ 0.3 GB) and writes dx, dB, dC, ddt
//   (≈ 0.15 GB) plus the dS/G buffer (134 MB written and read twice).
// Floors (≈ 800 dense bf16 TFLOP/s, 3.3 TB/s H100 / 4.2 TB/s H200): forward ≈ 0.12 ms (flops) /
//   0.10 ms (bytes); backward ≈ 0.27 / 0.25 ms.
// Measured (H200, 2026-11-26): v2 forward 1.52 ms, forward+backward 7.68 ms (1.7-2.2x slower
//   than mamba_ssm's Triton kernels timed in the same call; latency-bound: one un-prefetched
//   memory round trip and several barriers per 64-row tile, small MMAs between them). v3 (the
//   default; "register-resident path" below): forward 1.05 ms, forward+backward 3.31 ms, i.e.
//   0.75-0.87x the anchor's fwd+bwd in the same call (its forward, 0.57 ms, is still faster).
//   Session 3 (C Bᵀ once per group, bf16 H_c in `saved`, factored decays): forward 0.75 ms,
//   forward+backward 2.81 ms (H200; 0.61-0.65x the anchor's fwd+bwd in that call). Session 4
//   (chunk states 128 columns wide, 4 blocks/SM for chunk states, forward scan and dCB, cheaper
//   ∂Acs reductions in bwd dx): forward 0.72-0.74 ms, forward+backward 2.74 ms (H200 and H100;
//   0.68-0.71x the anchor in calls where it ran 3.8-4.1 ms). As staged here the kernels must
//   move ~3.1 GB (0.93 ms at 3.35 TB/s); ssd_notes.md has the floor per stage. Session 5 (the
//   pair ∂Acs terms moved from bwd dx into ssd_bwd_dcb_reg, dCB head split 2): 2.65 ms on an
//   H100 (previous main binary 2.74 ms, anchor 5.22 ms in that call). The lead's call on the
//   later session-5 code (ssd_bwd_dcb_sum, the shuffle fix; H100): 2.47-2.49 ms with the inter
//   ∂Acs terms formed in the chunk-state backward (now the only variant), 2.53-2.55 ms with them
//   in bwd dx (removed), 0.62-0.66x the anchor in that call. Session 6 (H100, two calls): the
//   inter ∂Acs terms moved again, into ssd_bwd_dbc_smem's dC blocks (chunk-state backward 338 →
//   183 µs, dB/dC 421 → 509 µs), and the chunk states fused with the state passes where the
//   (slice, h, b) blocks fill the device (ssd_chunk_state_scan: forward 308 → 234 µs, backward
//   339 → 228 µs at B8 S2048): 2.22-2.24 ms at B8 S2048 (main before: 2.46-2.49), 2.43 ms at
//   B2 S8192 (unfused there; main 2.46-2.47). Session 7 (H100, one call): narrower fused tiles
//   at B2 S8192 (2-4x the blocks) lost to the unfused kernels (2.52-2.55 vs 2.43 ms) and were
//   removed; the unfused chunk states became ssd_chunk_state_scan's one-chunk form (same time);
//   median of 5 alternating rounds: 0.58x (B8 S2048) / 0.60x (B2 S8192) the anchor. Session 8
//   (H200, three calls): the forward scan as one block per l-tile pair (ssd_chunk_scan_fwd_pair_xs,
//   forward 0.631 → 0.611 ms), dCB head split 4, dB/dC at four blocks per SM: fwd+bwd 2.193 →
//   2.113 ms (B8 S2048), 2.292 → 2.205 ms (B2 S8192); two heads per block sharing the C_l / B_s
//   / C Bᵀ tiles (−25% L2 bytes) and the tile pairing in bwd dx did not win and are gone. The
//   anchor's GPU kernels alone (torch.profiler) take 2.48 ms per fwd+bwd call on the H200,
//   against 3.4-5.4 ms between its events: the rest is host-side launch time.
//   Session 11 (helper ssd11's three forms, the lead's session-9 call, H100): all three on,
//   fwd+bwd 1.689-1.695 → 1.559-1.576 ms at mamba2-130m's B16 S2048 H24, 2.039-2.041 →
//   2.013-2.025 ms at B8 S2048 H64; alone at B16 H24 (default 1.695): the fused state rule at 2
//   blocks per SM 1.579, the ∂Acs finish with its loads issued together 1.683 (both now the only
//   forms), the dCB sum in the last head-split block 1.706 (deleted). This combination without
//   the deleted form was not timed as such.
//   Per-kernel times, the reasoning and the next steps are in ssd_notes.md.
//
// Kernel versions: the v2 kernels described above (mma.sync, block-level GEMMs through
// shared memory) stay selectable per kernel; the v3 replacements (section "register-resident
// path" below, the default) are: ssd_chunk_state_scan (chunk states, cp.async double-buffered;
// fused with the state pass where its blocks fill the device, else one chunk per block),
// ssd_chunk_scan_fwd_pair_xs (one block per pair of l-tiles), ssd_bwd_dcb_reg (x·dyᵀ per head,
// once for two consumers: the
// head-summed dCB per (b, c, g) tile pair, in head-split fp32 partials that ssd_bwd_dcb_sum adds
// into bf16 dCB and dCBᵀ, and since session 5 the intra-chunk ∂Acs pair terms per head),
// ssd_chunk_scan_bwd_dx_early (one block per 64-row s-tile: dx and the state ∂Acs terms of its
// own rows; one 64×64 product per tile pair), ssd_bwd_dbc_smem (dB and dC in one launch, state
// terms as a GEMM over (head, p); its dC blocks also form the inter-chunk ∂Acs terms) +
// ssd_bwd_dacs_finish (all ∂Acs partials summed in a fixed order). The v3 bwd dx path therefore
// always runs with the v3 dB/dC kernel.
// Shared by all paths since session 3: ssd_bmm_cb writes C Bᵀ once per (b, c, g) as bf16 into
// `saved` (the v3 forward scan and bwd dx read it instead of recomputing it per head: 64x at
// G = 1), and ssd_state_pass writes a bf16 copy of every H_c into `saved` (the v3 kernels'
// cp.async operand). In off-diagonal tile pairs the v3 kernels split the decay
// e^{Acs_l − Acs_s} = e^{Acs_l − Acs_l0} · e^{Acs_l0 − Acs_s} (l0 the l-tile's first row; both
// factors <= 1, so nothing overflows) into row and column factors: bwd dx needs no exponential
// per element there, the forward scan and dCB half as many.
//
// Tiles move global → shared either through registers with kLoadBatch 16-byte loads in flight per
// thread (when they are scaled on the way) or through cp.async (plain copies); shared-memory
// regions are reused between phases of a kernel (see each Carve* function) so that 2-3 blocks fit
// per SM.
#include "kernels/cuda/ssd.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <type_traits>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/hopper_mma.cuh"
#include "kernels/cuda/ssd_device.cuh"
#include "kernels/cuda/ssd_fwd_wgmma.h"  // session 13: forward scan and dB/dC at P64 on wgmma
#include "kernels/cuda/vec_util.cuh"

namespace gyre::cuda {
namespace {

using bf16 = __nv_bfloat16;

constexpr int kThreads = 128;  // 4 warps per block
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 64;      // token rows per tile

// ------------------------------------------------------------------ shapes and the saved buffer

struct Dims {
  int B, S, H, P, G, N, Q, NC, hpg;
  int64_t PN;
  // Token-row strides (elements) of x / dx (ldx, >= H·P) and of B, C / dB, dC (ldbc, >= G·N);
  // y and dy are always dense (H·P). See ssd.h (x_row_stride, bc_row_stride).
  int64_t ldx, ldbc, ldy;
  int64_t per_batch;  // floats per batch row in `saved` (padded to 64)
  int64_t dt_off, acs_off, cb_off, hbf_off;
  float dt_min, dt_max;
};

Dims MakeDims(const SsdShape& s, const SsdOptions& o) {
  Dims d;
  d.B = static_cast<int>(s.batch);
  d.S = static_cast<int>(s.seq_len);
  d.H = static_cast<int>(s.num_heads);
  d.P = static_cast<int>(s.head_dim);
  d.G = static_cast<int>(s.num_groups);
  d.N = static_cast<int>(s.state_dim);
  d.Q = static_cast<int>(o.chunk_size);
  d.NC = static_cast<int>((s.seq_len + o.chunk_size - 1) / o.chunk_size);
  d.hpg = d.H / std::max(d.G, 1);
  d.PN = static_cast<int64_t>(d.P) * d.N;
  d.ldx = static_cast<int64_t>(d.H) * d.P;
  d.ldbc = static_cast<int64_t>(d.G) * d.N;
  d.ldy = d.ldx;
  d.dt_off = static_cast<int64_t>(d.H) * (d.NC + 1) * d.PN;
  d.acs_off = d.dt_off + static_cast<int64_t>(d.S) * d.H;
  // C Bᵀ per (group, chunk) as bf16 [G, NC·Q, Q] (two per float), 256-byte aligned.
  d.cb_off = (d.acs_off + static_cast<int64_t>(d.H) * d.NC * d.Q + 63) / 64 * 64;
  // H_c (c < NC) in bf16 [H, NC, P, N] (written by ssd_state_pass; the operand copy that the v3
  // forward scan, backward dx and dB/dC kernels load with cp.async).
  d.hbf_off = (d.cb_off + static_cast<int64_t>(d.G) * d.NC * d.Q * d.Q / 2 + 63) / 64 * 64;
  const int64_t raw = d.hbf_off + static_cast<int64_t>(d.H) * d.NC * d.PN / 2;
  d.per_batch = (raw + 63) / 64 * 64;
  d.dt_min = static_cast<float>(o.dt_min);
  d.dt_max = static_cast<float>(o.dt_max);
  return d;
}

// Element offsets of token t of batch row b: x / dx (XRow), y / dy (YRow), B, C / dB, dC (BcRow).
__device__ __forceinline__ int64_t XRow(const Dims& d, int b, int64_t t) {
  return (static_cast<int64_t>(b) * d.S + t) * d.ldx;
}
__device__ __forceinline__ int64_t YRow(const Dims& d, int b, int64_t t) {
  return (static_cast<int64_t>(b) * d.S + t) * d.ldy;
}
__device__ __forceinline__ int64_t BcRow(const Dims& d, int b, int64_t t) {
  return (static_cast<int64_t>(b) * d.S + t) * d.ldbc;
}

__device__ __forceinline__ float* StatePtr(const Dims& d, float* saved, int b, int h, int slot) {
  return saved + b * d.per_batch + (static_cast<int64_t>(h) * (d.NC + 1) + slot) * d.PN;
}
__device__ __forceinline__ const float* StatePtr(const Dims& d, const float* saved, int b, int h,
                                                 int slot) {
  return saved + b * d.per_batch + (static_cast<int64_t>(h) * (d.NC + 1) + slot) * d.PN;
}
// dt after softplus/clamp, [S, H] per batch row.
__device__ __forceinline__ const float* DtPtr(const Dims& d, const float* saved, int b) {
  return saved + b * d.per_batch + d.dt_off;
}
// Acs for head h, [NC·Q] per (batch row, head); padded tokens carry the last value.
__device__ __forceinline__ const float* AcsPtr(const Dims& d, const float* saved, int b, int h) {
  return saved + b * d.per_batch + d.acs_off + static_cast<int64_t>(h) * d.NC * d.Q;
}

// C Bᵀ of group g, [NC·Q, Q] bf16 per (batch row, group): row c·Q + l, column s holds
// C_l·B_s of chunk c (written for tile pairs s-tile <= l-tile by ssd_bmm_cb; zero where a token
// is past the sequence end).
__device__ __forceinline__ bf16* CbPtr(const Dims& d, float* saved, int b, int g) {
  return reinterpret_cast<bf16*>(saved + b * d.per_batch + d.cb_off) +
         static_cast<int64_t>(g) * d.NC * d.Q * d.Q;
}
__device__ __forceinline__ const bf16* CbPtr(const Dims& d, const float* saved, int b, int g) {
  return reinterpret_cast<const bf16*>(saved + b * d.per_batch + d.cb_off) +
         static_cast<int64_t>(g) * d.NC * d.Q * d.Q;
}

// bf16 H_c of head h, chunk c ([P, N]).
__device__ __forceinline__ bf16* HbfPtr(const Dims& d, float* saved, int b, int h, int c) {
  return reinterpret_cast<bf16*>(saved + b * d.per_batch + d.hbf_off) +
         (static_cast<int64_t>(h) * d.NC + c) * d.PN;
}
__device__ __forceinline__ const bf16* HbfPtr(const Dims& d, const float* saved, int b, int h,
                                              int c) {
  return reinterpret_cast<const bf16*>(saved + b * d.per_batch + d.hbf_off) +
         (static_cast<int64_t>(h) * d.NC + c) * d.PN;
}

__device__ __forceinline__ float Softplus(float x) { return x > 20.f ? x : log1pf(expf(x)); }
__device__ __forceinline__ float Sigmoid(float x) {
  if (x >= 0.f) return 1.f / (1.f + expf(-x));
  const float e = expf(x);
  return e / (1.f + e);
}

// ∂raw dt of one token from its total ∂dt (total) and raw dt (raw_dt + bias): the softplus's
// derivative, zero where the clamp [dt_min, dt_max] held dt.
__device__ __forceinline__ float DdtRaw(const Dims& d, float total, float raw) {
  const float sp = Softplus(raw);
  const bool passes = sp >= d.dt_min && sp <= d.dt_max;
  return passes ? total * Sigmoid(raw) : 0.f;
}

// ------------------------------------------------------------------ block-level tensor-core GEMM
//
// The block's warps tile an m×n output (m, n multiples of 32) into 32×32 warp tiles, warp w
// taking tiles w, w + 4, ...; MAXI bounds the tiles per warp (the callers keep m·n/1024 <=
// 4·MAXI). Operands are bf16 in shared memory: A(i, k) at a[i·lda + k] (a[k·lda + i] when AT),
// B(k, j) at b[k·ldb + j] (b[j·ldb + k] when BT). lda, ldb multiples of 8; fp32 accumulators.
//
// MmaPtx: mma.sync.m16n8k16 (bf16, fp32 accumulate) fed by ldmatrix(.trans) from shared memory,
// 8 MMAs per 4 ldmatrix.x4 per k-step of a 32×32 warp tile (the v2 kernels are templated on it;
// an nvcuda::wmma twin, slower because nvcc emitted generic-address fragment loads for it, was
// removed in session 3 after v3 had replaced it everywhere it was fastest).

__device__ __forceinline__ unsigned SmemAddr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

template <bool kTrans>
__device__ __forceinline__ void LdMatrixX4(unsigned (&r)[4], unsigned addr) {
  if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
  }
}

__device__ __forceinline__ void MmaBf16(float (&c)[4], const unsigned (&a)[4], unsigned b0,
                                        unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

struct MmaPtx {
  // c[mi][ni][e]: the m16n8 accumulator (mi, ni) of the 32×32 warp tile; e = 0, 1 at row
  // g = lane/4, columns 2t, 2t+1 (t = lane%4); e = 2, 3 at row g + 8.
  struct Tile {
    float c[2][4][4];
  };
  template <int MAXI>
  static __device__ __forceinline__ void Zero(Tile (&acc)[MAXI]) {
#pragma unroll
    for (int i = 0; i < MAXI; ++i)
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[i].c[mi][ni][e] = 0.f;
  }
  template <bool AT, bool BT, int MAXI>
  static __device__ __forceinline__ void Mma(Tile (&acc)[MAXI], const bf16* a, int lda,
                                             const bf16* b, int ldb, int m, int n, int k) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    MmaAt<AT, BT>(acc, a, lda, b, ldb, m, n, k, lane, warp);
  }
  // Mma for a block whose warps are numbered otherwise (lane, warp given): the fused state
  // kernel of ssd_state_ct.cuh.
  template <bool AT, bool BT, int MAXI>
  static __device__ __forceinline__ void MmaAt(Tile (&acc)[MAXI], const bf16* a, int lda,
                                               const bf16* b, int ldb, int m, int n, int k,
                                               int lane, int warp) {
    const int q = lane / 8, r = lane % 8;
    const int tn = n / 32, nt = (m / 32) * tn;
#pragma unroll
    for (int i = 0; i < MAXI; ++i) {
      const int wt = warp + i * kWarps;
      if (wt < nt) {
        const int i0 = (wt / tn) * 32, j0 = (wt % tn) * 32;
        // Per-lane ldmatrix row addresses at kk = 0 (see the fragment layouts above).
        unsigned a_addr[2], b_addr[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int ib = i0 + 16 * h, jb = j0 + 16 * h;
          a_addr[h] = AT ? SmemAddr(a + (r + 8 * (q / 2)) * lda + ib + 8 * (q % 2))
                         : SmemAddr(a + (ib + r + 8 * (q % 2)) * lda + 8 * (q / 2));
          b_addr[h] = BT ? SmemAddr(b + (jb + r + 8 * (q / 2)) * ldb + 8 * (q % 2))
                         : SmemAddr(b + (r + 8 * (q % 2)) * ldb + jb + 8 * (q / 2));
        }
        const unsigned a_step = (AT ? 16 * lda : 16) * 2, b_step = (BT ? 16 : 16 * ldb) * 2;
        for (int kk = 0; kk < k; kk += 16) {
          unsigned fa[2][4], fb[2][4];
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            LdMatrixX4<AT>(fa[h], a_addr[h]);
            LdMatrixX4<!BT>(fb[h], b_addr[h]);
            a_addr[h] += a_step;
            b_addr[h] += b_step;
          }
#pragma unroll
          for (int mi = 0; mi < 2; ++mi)
#pragma unroll
            for (int ni = 0; ni < 4; ++ni)
              MmaBf16(acc[i].c[mi][ni], fa[mi], fb[ni / 2][(ni % 2) * 2],
                      fb[ni / 2][(ni % 2) * 2 + 1]);
        }
      }
    }
  }
  // Calls f(x, y, row, col) for each pair of this thread's accumulator elements (x at (row, col)
  // of the m×n tile, y at (row, col + 1)), in the layout above: the one walk behind Store, Load,
  // StoreTileBf16 and ssd_chunk_state_scan's <G, H_c> dot. T is Tile or const Tile.
  template <int MAXI, class T, class F>
  static __device__ __forceinline__ void ForEachPair(T (&acc)[MAXI], int m, int n, F&& f) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    ForEachPairAt(acc, m, n, lane, warp, static_cast<F&&>(f));
  }
  template <int MAXI, class T, class F>
  static __device__ __forceinline__ void ForEachPairAt(T (&acc)[MAXI], int m, int n, int lane,
                                                       int warp, F&& f) {
    const int g = lane / 4, t = lane % 4;
    const int tn = n / 32, nt = (m / 32) * tn;
#pragma unroll
    for (int i = 0; i < MAXI; ++i) {
      const int wt = warp + i * kWarps;
      if (wt < nt) {
        const int i0 = (wt / tn) * 32, j0 = (wt % tn) * 32;
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
          for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int hf = 0; hf < 2; ++hf)
              f(acc[i].c[mi][ni][2 * hf], acc[i].c[mi][ni][2 * hf + 1], i0 + 16 * mi + g + 8 * hf,
                j0 + 8 * ni + 2 * t);
      }
    }
  }
  template <int MAXI>
  static __device__ __forceinline__ void Store(const Tile (&acc)[MAXI], float* c, int64_t ldc,
                                               int m, int n) {
    ForEachPair(acc, m, n, [&](float x, float y, int row, int col) {
      *reinterpret_cast<float2*>(c + row * ldc + col) = make_float2(x, y);
    });
  }
  template <int MAXI>
  static __device__ __forceinline__ void Load(Tile (&acc)[MAXI], const float* c, int ldc, int m,
                                              int n) {
    ForEachPair(acc, m, n, [&](float& x, float& y, int row, int col) {
      const float2 v = *reinterpret_cast<const float2*>(c + static_cast<int64_t>(row) * ldc + col);
      x = v.x;
      y = v.y;
    });
  }
};

// C (m × n fp32, row stride ldc) = A·B (AT / BT: A or B transposed, as MM::Mma) through a fresh
// accumulator of MAXI tiles: the one-shot product of the v2 kernels, stored for element-wise use.
template <class MM, bool AT, bool BT, int MAXI>
__device__ __forceinline__ void MmaStore(float* c, int64_t ldc, const bf16* a, int lda,
                                         const bf16* b, int ldb, int m, int n, int k) {
  typename MM::Tile t[MAXI];
  MM::Zero(t);
  MM::template Mma<AT, BT, MAXI>(t, a, lda, b, ldb, m, n, k);
  MM::Store(t, c, ldc, m, n);
}

// ------------------------------------------------------------------ tile loads (global → shared)

// 64 rows × width bf16 (width % 8 == 0) from src (row stride `stride` elements) into dst (row
// stride ld). Rows >= valid are zero. With `scale`, row r is multiplied by scale[r] (fp32) and
// rounded to bf16. Each thread issues kLoadBatch 16-byte loads before its first shared store, so
// that many are in flight (a load-store-load loop would wait a full memory latency per vector:
// the first version did, and its kernels were latency-bound on exactly that).
constexpr int kLoadBatch = 8;

__device__ __forceinline__ void LoadRows(bf16* dst, int ld, const bf16* __restrict__ src,
                                         int64_t stride, int valid, int width,
                                         const float* scale = nullptr) {
  const int vpr = width / 8;
  const int total = kTile * vpr;
  for (int base = threadIdx.x; base < total; base += kThreads * kLoadBatch) {
    uint4 raw[kLoadBatch];
#pragma unroll
    for (int u = 0; u < kLoadBatch; ++u) {
      const int i = base + u * kThreads;
      raw[u] = make_uint4(0, 0, 0, 0);
      if (i < total) {
        const int r = i / vpr, v = (i % vpr) * 8;
        if (r < valid) raw[u] = __ldg(reinterpret_cast<const uint4*>(src + r * stride + v));
      }
    }
#pragma unroll
    for (int u = 0; u < kLoadBatch; ++u) {
      const int i = base + u * kThreads;
      if (i < total) {
        const int r = i / vpr, v = (i % vpr) * 8;
        if (scale != nullptr && r < valid) {
          float f[8];
          LoadBf16<8>(reinterpret_cast<const bf16*>(&raw[u]), f);
          const float sc = scale[r];
#pragma unroll
          for (int j = 0; j < 8; ++j) f[j] *= sc;
          StoreBf16<8>(reinterpret_cast<bf16*>(&raw[u]), f);
        }
        *reinterpret_cast<uint4*>(dst + r * ld + v) = raw[u];
      }
    }
  }
}

// LoadRows without scaling through the asynchronous copy unit (cp.async, 16 bytes, rows >= valid
// zero-filled): several tiles' copies can be in flight at once. The caller ends the group with
// CpAsyncWaitAll() and a __syncthreads() before reading dst.
__device__ __forceinline__ void LoadRowsAsync(bf16* dst, int ld, const bf16* src, int64_t stride,
                                              int valid, int width) {
  const int vpr = width / 8;
  for (int i = threadIdx.x; i < kTile * vpr; i += kThreads) {
    const int r = i / vpr, v = (i % vpr) * 8;
    const bool ok = r < valid;
    const bf16* g = ok ? src + r * stride + v : src;
    const unsigned sm = static_cast<unsigned>(__cvta_generic_to_shared(dst + r * ld + v));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(sm), "l"(g),
                 "r"(ok ? 16 : 0));
  }
}
__device__ __forceinline__ void CpAsyncWaitAll() { asm volatile("cp.async.wait_all;\n" ::); }

// A P×N fp32 state (row stride N) into bf16 shared memory (row stride ld); batched as above.
__device__ __forceinline__ void LoadState(bf16* dst, int ld, const float* __restrict__ src, int P,
                                          int N) {
  const int vpr = N / 4;
  const int total = P * vpr;
  for (int base = threadIdx.x; base < total; base += kThreads * kLoadBatch) {
    float4 f[kLoadBatch];
#pragma unroll
    for (int u = 0; u < kLoadBatch; ++u) {
      const int i = base + u * kThreads;
      if (i < total) {
        const int r = i / vpr, v = (i % vpr) * 4;
        f[u] = __ldg(reinterpret_cast<const float4*>(src + static_cast<int64_t>(r) * N + v));
      }
    }
#pragma unroll
    for (int u = 0; u < kLoadBatch; ++u) {
      const int i = base + u * kThreads;
      if (i < total) {
        const int r = i / vpr, v = (i % vpr) * 4;
        __nv_bfloat162* out = reinterpret_cast<__nv_bfloat162*>(dst + r * ld + v);
        out[0] = __floats2bfloat162_rn(f[u].x, f[u].y);
        out[1] = __floats2bfloat162_rn(f[u].z, f[u].w);
      }
    }
  }
}

// Shared-memory carve-out: 128-byte aligned pieces of one dynamic buffer.
struct Carve {
  char* base;
  size_t off = 0;
  template <typename T>
  __device__ __host__ T* take(size_t count) {
    T* p = reinterpret_cast<T*>(base + off);
    off += (count * sizeof(T) + 127) / 128 * 128;
    return p;
  }
};
// The same arithmetic on the host, for launch sizes.
struct CarveSize {
  size_t off = 0;
  template <typename T>
  void take(size_t count) { off += (count * sizeof(T) + 127) / 128 * 128; }
};

// ------------------------------------------------------------------ forward kernels

// grid (NC, H, B), block Q threads.
__global__ void ssd_dt_cumsum(Dims d, const float* dt_raw, const float* a_log,
                              const float* dt_bias, float* saved) {
  const int c = blockIdx.x, h = blockIdx.y, b = blockIdx.z, tid = threadIdx.x;
  const int t = c * d.Q + tid;
  float dtv = 0.f;
  if (t < d.S) {
    const float sp = Softplus(dt_raw[(static_cast<int64_t>(b) * d.S + t) * d.H + h] + dt_bias[h]);
    dtv = fminf(fmaxf(sp, d.dt_min), d.dt_max);
    saved[b * d.per_batch + d.dt_off + static_cast<int64_t>(t) * d.H + h] = dtv;
  }
  const float A = -expf(a_log[h]);
  float v = dtv * A;
  const int lane = tid % 32, warp = tid / 32;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const float o = __shfl_up_sync(0xffffffffu, v, off);
    if (lane >= off) v += o;
  }
  __shared__ float warp_sum[32];
  if (lane == 31) warp_sum[warp] = v;
  __syncthreads();
  float prefix = 0.f;
  for (int w = 0; w < warp; ++w) prefix += warp_sum[w];
  saved[b * d.per_batch + d.acs_off + (static_cast<int64_t>(h) * d.NC + c) * d.Q + tid] =
      v + prefix;
}

// Forward: out = Σ_s (e^{Acs_last − Acs_s} dt_s x_s)ᵀ B_s into the saved state slot c+1.
// Backward: out = Σ_l (e^{Acs_l} dy_l)ᵀ C_l into dS[b, h, c].
// grid (NC, H·ceil(N/64), B); dynamic smem: U [64][P+8], V [64][72] bf16, scale [64].
template <class MM, bool kBwd>
__global__ void __launch_bounds__(kThreads) ssd_chunk_state(Dims d, const bf16* u, const bf16* v,
                                                            float* saved, float* ds_out) {
  extern __shared__ __align__(128) char smem[];
  const int ntn = (d.N + 63) / 64;
  const int c = blockIdx.x, h = blockIdx.y / ntn, b = blockIdx.z;
  const int n0 = (blockIdx.y % ntn) * 64, nw = min(64, d.N - n0);
  const int g = h / d.hpg;
  Carve cv{smem};
  const int ldu = d.P + 8, ldv = 72;
  bf16* Us = cv.take<bf16>(kTile * ldu);
  bf16* Vs = cv.take<bf16>(kTile * ldv);
  float* scale = cv.take<float>(kTile);
  const float* acs = AcsPtr(d, saved, b, h) + static_cast<int64_t>(c) * d.Q;
  const float* dts = DtPtr(d, saved, b);
  const float acs_last = acs[d.Q - 1];

  typename MM::Tile acc[2];
  MM::Zero(acc);
  for (int tt = 0; tt < d.Q / kTile; ++tt) {
    const int t0 = c * d.Q + tt * kTile;
    const int valid = min(kTile, d.S - t0);
    if (valid <= 0) break;
    if (threadIdx.x < kTile) {
      const int r = threadIdx.x;
      float s = 0.f;
      if (r < valid) {
        const float a = acs[tt * kTile + r];
        s = kBwd ? expf(a) : expf(acs_last - a) * dts[static_cast<int64_t>(t0 + r) * d.H + h];
      }
      scale[r] = s;
    }
    __syncthreads();
    // u is x (forward, row stride ldx) or dy (backward, dense); v is B or C (ldbc).
    const int64_t u_ld = kBwd ? d.ldy : d.ldx;
    LoadRowsAsync(Vs, ldv, v + BcRow(d, b, t0) + static_cast<int64_t>(g) * d.N + n0, d.ldbc,
                  valid, nw);
    LoadRows(Us, ldu, u + (static_cast<int64_t>(b) * d.S + t0) * u_ld + static_cast<int64_t>(h) * d.P,
             u_ld, valid, d.P, scale);
    CpAsyncWaitAll();
    __syncthreads();
    MM::template Mma<true, false, 2>(acc, Us, ldu, Vs, ldv, d.P, nw, kTile);
    __syncthreads();
  }
  float* out = kBwd ? ds_out + ((static_cast<int64_t>(b) * d.H + h) * d.NC + c) * d.PN
                    : StatePtr(d, saved, b, h, c + 1);
  MM::Store(acc, out + n0, d.N, d.P, nw);
}

size_t ChunkStateSmem(const Dims& d) {
  CarveSize cs;
  cs.take<bf16>(kTile * (d.P + 8));
  cs.take<bf16>(kTile * 72);
  cs.take<float>(kTile);
  return cs.off;
}

// grid (ceil(PN/1024), H, B), block 256, four consecutive elements (one float4) per thread:
// slot 0 = initial; slot c+1 = e^{Acs_last,c} slot c + S_c (in place).
__global__ void ssd_state_pass(Dims d, const float* initial, float* saved, float* final_state) {
  const int64_t e = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * 4;
  const int h = blockIdx.y, b = blockIdx.z;
  if (e >= d.PN) return;
  float* base = StatePtr(d, saved, b, h, 0);
  const float* acs = AcsPtr(d, saved, b, h);
  const int64_t bh = static_cast<int64_t>(b) * d.H + h;
  float4 hv = initial != nullptr ? *reinterpret_cast<const float4*>(initial + bh * d.PN + e)
                                 : make_float4(0.f, 0.f, 0.f, 0.f);
  *reinterpret_cast<float4*>(base + e) = hv;
  for (int c = 0; c < d.NC; ++c) {
    __nv_bfloat162* hp = reinterpret_cast<__nv_bfloat162*>(HbfPtr(d, saved, b, h, c) + e);
    hp[0] = __floats2bfloat162_rn(hv.x, hv.y);
    hp[1] = __floats2bfloat162_rn(hv.z, hv.w);
    const float decay = expf(acs[static_cast<int64_t>(c) * d.Q + d.Q - 1]);
    float4* slot = reinterpret_cast<float4*>(base + (c + 1) * d.PN + e);
    const float4 sc = *slot;
    hv = make_float4(decay * hv.x + sc.x, decay * hv.y + sc.y, decay * hv.z + sc.z,
                     decay * hv.w + sc.w);
    *slot = hv;
  }
  if (final_state != nullptr) *reinterpret_cast<float4*>(final_state + bh * d.PN + e) = hv;
}

// Shared memory of ssd_chunk_scan_fwd. H_c is needed only before the s-loop and B_s only in it,
// so they share one region; likewise the y staging tile Ys (start and end) and the C Bᵀ tile Ms
// (inside the loop). At P64 N128 that is ~71 KB: three blocks per SM.
template <typename Carver>
void CarveScanFwd(Carver& cv, const Dims& d) {
  cv.template take<bf16>(kTile * (d.N + 8));                          // Cl
  cv.template take<bf16>(std::max(d.P, kTile) * (d.N + 8));           // Hs, then Bs
  cv.template take<bf16>(kTile * (d.P + 8));                          // Xs
  cv.template take<bf16>(kTile * 72);                                 // Mb
  cv.template take<float>(std::max(kTile * 68, kTile * (d.P + 4)));   // Ys / Ms
  cv.template take<float>(kTile * 3);                                 // acs_l, acs_s, dt_s
}

// grid (NC·Q/64, H, B): y for one 64-row tile of one chunk and head.
template <class MM>
__global__ void __launch_bounds__(kThreads, 3) ssd_chunk_scan_fwd(Dims d, const bf16* x,
                                                               const bf16* Bm, const bf16* Cm,
                                                               const float* Dskip,
                                                               const float* saved, bf16* y) {
  extern __shared__ __align__(128) char smem[];
  const int tiles = d.Q / kTile;
  const int c = blockIdx.x / tiles, lt = blockIdx.x % tiles, h = blockIdx.y, b = blockIdx.z;
  const int g = h / d.hpg;
  const int tl0 = c * d.Q + lt * kTile;
  if (tl0 >= d.S) return;
  const int lv = min(kTile, d.S - tl0);
  const int ldn = d.N + 8, ldp = d.P + 8, ldy = d.P + 4;
  Carve cv{smem};
  bf16* Cl = cv.take<bf16>(kTile * ldn);
  bf16* Hs = cv.take<bf16>(max(d.P, kTile) * ldn);
  bf16* Bs = Hs;  // after the inter-chunk product
  bf16* Xs = cv.take<bf16>(kTile * ldp);
  bf16* Mb = cv.take<bf16>(kTile * 72);
  float* Ys = cv.take<float>(max(kTile * 68, kTile * ldy));
  float* Ms = Ys;  // inside the s-loop only
  float* acs_l = cv.take<float>(kTile * 3);
  float* acs_s = acs_l + kTile;
  float* dt_s = acs_s + kTile;

  const float* acs = AcsPtr(d, saved, b, h);
  const float* dts = DtPtr(d, saved, b);
  const int64_t bc_stride = d.ldbc;
  const int64_t x_stride = d.ldx;
  const bf16* Cb = Cm + BcRow(d, b, 0) + static_cast<int64_t>(g) * d.N;
  const bf16* Bb = Bm + BcRow(d, b, 0) + static_cast<int64_t>(g) * d.N;
  const bf16* xb = x + XRow(d, b, 0) + static_cast<int64_t>(h) * d.P;

  LoadRowsAsync(Cl, ldn, Cb + tl0 * bc_stride, bc_stride, lv, d.N);
  LoadState(Hs, ldn, StatePtr(d, saved, b, h, c), d.P, d.N);
  if (threadIdx.x < kTile) acs_l[threadIdx.x] = acs[tl0 + threadIdx.x];
  CpAsyncWaitAll();
  __syncthreads();

  // Inter-chunk: Ys = e^{Acs_l} (C_l H_cᵀ); becomes the accumulator's starting value.
  typename MM::Tile acc[2];
  MM::Zero(acc);
  MM::template Mma<false, true, 2>(acc, Cl, ldn, Hs, ldn, kTile, d.P, d.N);
  MM::Store(acc, Ys, ldy, kTile, d.P);
  __syncthreads();
  for (int i = threadIdx.x; i < kTile * d.P; i += kThreads) {
    const int r = i / d.P, p = i % d.P;
    Ys[r * ldy + p] *= expf(acs_l[r]);
  }
  __syncthreads();
  MM::Load(acc, Ys, ldy, kTile, d.P);
  __syncthreads();  // Ys and Hs are reused as Ms and Bs below

  // Intra-chunk: s-tiles 0..lt.
  for (int st = 0; st <= lt; ++st) {
    const int ts0 = c * d.Q + st * kTile;
    const int sv = min(kTile, d.S - ts0);
    LoadRowsAsync(Bs, ldn, Bb + ts0 * bc_stride, bc_stride, sv, d.N);
    LoadRowsAsync(Xs, ldp, xb + ts0 * x_stride, x_stride, sv, d.P);
    if (threadIdx.x < kTile) {
      const int r = threadIdx.x;
      acs_s[r] = acs[ts0 + r];
      dt_s[r] = r < sv ? dts[static_cast<int64_t>(ts0 + r) * d.H + h] : 0.f;
    }
    CpAsyncWaitAll();
    __syncthreads();
    MmaStore<MM, false, true, 1>(Ms, 68, Cl, ldn, Bs, ldn, kTile, kTile, d.N);
    __syncthreads();
    for (int i = threadIdx.x; i < kTile * kTile; i += kThreads) {
      const int r = i / kTile, s = i % kTile;
      float m = 0.f;
      if (st < lt || s <= r) m = Ms[r * 68 + s] * expf(acs_l[r] - acs_s[s]) * dt_s[s];
      Mb[r * 72 + s] = __float2bfloat16_rn(m);
    }
    __syncthreads();
    MM::template Mma<false, false, 2>(acc, Mb, 72, Xs, ldp, kTile, d.P, kTile);
    __syncthreads();
  }
  MM::Store(acc, Ys, ldy, kTile, d.P);
  __syncthreads();
  const float dsk = Dskip != nullptr ? Dskip[h] : 0.f;
  const int vpr = d.P / 8;
  for (int i = threadIdx.x; i < lv * vpr; i += kThreads) {
    const int r = i / vpr, p = (i % vpr) * 8;
    float xv[8], out[8];
    LoadBf16<8>(xb + (tl0 + r) * x_stride + p, xv);
#pragma unroll
    for (int j = 0; j < 8; ++j) out[j] = Ys[r * ldy + p + j] + dsk * xv[j];
    StoreBf16<8>(y + YRow(d, b, tl0 + r) + static_cast<int64_t>(h) * d.P + p, out);
  }
}

// ------------------------------------------------------------------ backward kernels

// grid (ceil(PN/1024), H, B), block 256, one float4 per thread. dsg [B, H, NC, PN]: in dS_c,
// out G_{c+1}. ddecay [B, H, NC, gridDim.x]: Σ over this block's elements of G_{c+1}·H_c.
// g_bf (or null; [B, H, NC, P, N] bf16): a copy of G_{c+1} for the v3 kernels (their bf16 H_c
// is in the saved buffer, HbfPtr).
__global__ void ssd_state_pass_bwd(Dims d, const float* saved, const float* d_final,
                                   float* dsg, float* ddecay, float* d_initial, bf16* g_bf) {
  const int64_t e = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * 4;
  const int h = blockIdx.y, b = blockIdx.z;
  const bool valid = e < d.PN;
  const int64_t bh = static_cast<int64_t>(b) * d.H + h;
  float* buf = dsg + bh * d.NC * d.PN;
  const float* acs = AcsPtr(d, saved, b, h);
  float4 gv = (valid && d_final != nullptr)
                  ? *reinterpret_cast<const float4*>(d_final + bh * d.PN + e)
                  : make_float4(0.f, 0.f, 0.f, 0.f);
  __shared__ float warp_part[8];
  for (int c = d.NC - 1; c >= 0; --c) {
    float prod = 0.f;
    float4 t = make_float4(0.f, 0.f, 0.f, 0.f);
    if (valid) {
      float4* slot = reinterpret_cast<float4*>(buf + c * d.PN + e);
      t = *slot;
      *slot = gv;
      const float4 hs = *reinterpret_cast<const float4*>(StatePtr(d, saved, b, h, c) + e);
      prod = gv.x * hs.x + gv.y * hs.y + gv.z * hs.z + gv.w * hs.w;
      if (g_bf != nullptr) {
        const int64_t o = (bh * d.NC + c) * d.PN + e;
        __nv_bfloat162* gp = reinterpret_cast<__nv_bfloat162*>(g_bf + o);
        gp[0] = __floats2bfloat162_rn(gv.x, gv.y);
        gp[1] = __floats2bfloat162_rn(gv.z, gv.w);
      }
    }
    prod = WarpSum(prod);
    if (threadIdx.x % 32 == 0) warp_part[threadIdx.x / 32] = prod;
    __syncthreads();
    if (threadIdx.x == 0) {
      float s = 0.f;
      for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) s += warp_part[w];
      ddecay[(bh * d.NC + c) * gridDim.x + blockIdx.x] = s;
    }
    __syncthreads();
    const float decay = expf(acs[static_cast<int64_t>(c) * d.Q + d.Q - 1]);
    gv = make_float4(decay * gv.x + t.x, decay * gv.y + t.y, decay * gv.z + t.z,
                     decay * gv.w + t.w);
  }
  if (valid && d_initial != nullptr) *reinterpret_cast<float4*>(d_initial + bh * d.PN + e) = gv;
}

// Shared memory of ssd_chunk_scan_bwd_dx, with regions reused across phases (~97 KB at P64
// N128 Q256: two blocks per SM):
//   R1: H_c (phase 1), then B_s (phase 2);  R2: C_l (phase 1 and the pair loop), and G_{c+1}
//   reloaded at the start of each s-tile (only the state-term product reads it);
//   MX: the two 64×64 fp32 tiles (B_s·C_l, x_s·dy_l) in the pair loop, DX [64][P+4] around it.
template <typename Carver>
void CarveScanBwdDx(Carver& cv, const Dims& d) {
  cv.template take<float>(4 * d.Q);                                  // acs, dts, dacs, ddtx
  cv.template take<bf16>(std::max(d.P, kTile) * (d.N + 8));          // R1
  cv.template take<bf16>(kTile * (d.P + 8));                         // Xs
  cv.template take<bf16>(std::max(d.P, kTile) * (d.N + 8));          // R2
  cv.template take<bf16>(kTile * (d.P + 8));                         // dYl
  cv.template take<float>(std::max(2 * kTile * kTile, kTile * (d.P + 4)));  // MX
  cv.template take<bf16>(kTile * 72);                                // Mb
  cv.template take<double>(3 * kWarps);                              // block reduction
}

// Sum of a double over the block (fixed order); every thread gets the result.
__device__ double BlockSumDouble(double v, double* scratch) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  __syncthreads();
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  double s = 0;
  for (int w = 0; w < kWarps; ++w) s += scratch[w];
  return s;
}

// grid (NC, H, B): one block per (b, c, h), whole chunk. Writes dx, ddt_raw and the partials
// part[3][B·NC·H] (dA, ddt_bias, dD) as doubles.
template <class MM>
__global__ void __launch_bounds__(kThreads, 2) ssd_chunk_scan_bwd_dx(
    Dims d, const bf16* x, const float* dt_raw, const float* a_log, const float* dt_bias,
    const bf16* Bm, const bf16* Cm, const float* Dskip, const float* saved, const bf16* dy,
    const float* dsg, const float* ddecay, int ddecay_parts, bf16* dx, float* ddt,
    double* part) {
  static_assert(kThreads == 2 * kTile, "two threads per token row; the pair loop's sums split the block in halves");
  extern __shared__ __align__(128) char smem[];
  __shared__ float dl_warp[kThreads / 32];
  const int c = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int g = h / d.hpg;
  const int ldn = d.N + 8, ldp = d.P + 8, ldx = d.P + 4;
  Carve cv{smem};
  float* acs = cv.take<float>(4 * d.Q);
  float* dts = acs + d.Q;
  float* dacs = dts + d.Q;
  float* ddtx = dacs + d.Q;
  bf16* R1 = cv.take<bf16>(max(d.P, kTile) * ldn);
  bf16* Xs = cv.take<bf16>(kTile * ldp);
  bf16* R2 = cv.take<bf16>(max(d.P, kTile) * ldn);
  bf16* dYl = cv.take<bf16>(kTile * ldp);
  float* MX = cv.take<float>(max(2 * kTile * kTile, kTile * ldx));
  bf16* Mb = cv.take<bf16>(kTile * 72);
  double* red = cv.take<double>(3 * kWarps);
  bf16* const Hc = R1;  // phase 1
  bf16* const Bs = R1;  // phase 2
  bf16* const Cl = R2;
  bf16* const Gs = R2;  // at the start of each s-tile
  float* const Ms = MX;
  float* const Ms2 = MX + kTile * kTile;
  float* const DX = MX;
  constexpr int ldm = kTile;  // Ms, Ms2 row stride

  const int c0 = c * d.Q;
  const int len = min(d.Q, d.S - c0);
  const int nT = (len + kTile - 1) / kTile;
  const int64_t bh = static_cast<int64_t>(b) * d.H + h;
  const float* acs_g = AcsPtr(d, saved, b, h) + c0;
  const float* dt_g = DtPtr(d, saved, b);
  for (int i = threadIdx.x; i < d.Q; i += kThreads) {
    acs[i] = acs_g[i];
    dts[i] = i < len ? dt_g[static_cast<int64_t>(c0 + i) * d.H + h] : 0.f;
    dacs[i] = 0.f;
    ddtx[i] = 0.f;
  }
  LoadState(Hc, ldn, StatePtr(d, saved, b, h, c), d.P, d.N);
  __syncthreads();

  const int64_t bc_stride = d.ldbc;
  const int64_t x_stride = d.ldx;   // x, dx
  const int64_t y_stride = d.ldy;   // dy
  const bf16* Cb = Cm + BcRow(d, b, 0) + static_cast<int64_t>(g) * d.N;
  const bf16* Bb = Bm + BcRow(d, b, 0) + static_cast<int64_t>(g) * d.N;
  const bf16* xb = x + XRow(d, b, 0) + static_cast<int64_t>(h) * d.P;
  const bf16* dyb = dy + YRow(d, b, 0) + static_cast<int64_t>(h) * d.P;
  bf16* dxb = dx + XRow(d, b, 0) + static_cast<int64_t>(h) * d.P;
  const int row = threadIdx.x / 2, half = threadIdx.x % 2, hp = d.P / 2;
  // A·∂A = Σ_t ∂Acs_t·Acs_t, summed in the difference form (see "∂A in the difference form" at the top): every
  // term is added here with its Acs weight (a pair term with Acs_l − Acs_s), in double.
  double da_loc = 0.0;

  // Phase 1 (inter term of ∂Acs): dacs_l += e^{Acs_l} dy_l·(C_l H_cᵀ)_l.
  for (int lt = 0; lt < nT; ++lt) {
    const int tl0 = c0 + lt * kTile, lv = min(kTile, d.S - tl0);
    LoadRowsAsync(Cl, ldn, Cb + tl0 * bc_stride, bc_stride, lv, d.N);
    LoadRowsAsync(dYl, ldp, dyb + tl0 * y_stride, y_stride, lv, d.P);
    CpAsyncWaitAll();
    __syncthreads();
    MmaStore<MM, false, true, 2>(DX, ldx, Cl, ldn, Hc, ldn, kTile, d.P, d.N);
    __syncthreads();
    float s = 0.f;
    for (int p = half * hp; p < (half + 1) * hp; ++p)
      s += DX[row * ldx + p] * __bfloat162float(dYl[row * ldp + p]);
    s += __shfl_xor_sync(0xffffffffu, s, 1);
    if (half == 0 && row < lv) {
      const float a = acs[lt * kTile + row], v = expf(a) * s;
      dacs[lt * kTile + row] += v;
      da_loc += static_cast<double>(v) * a;
    }
    __syncthreads();
  }

  // The state-passing decay: dacs_last += e^{Acs_last} <G_{c+1}, H_c>.
  const float e_last = expf(acs[d.Q - 1]);
  if (threadIdx.x == 0) {
    const float* pp = ddecay + (bh * d.NC + c) * ddecay_parts;
    float s = 0.f;
    for (int i = 0; i < ddecay_parts; ++i) s += pp[i];
    dacs[d.Q - 1] += e_last * s;
    da_loc += static_cast<double>(e_last * s) * acs[d.Q - 1];
  }
  __syncthreads();
  const float* g_state = dsg + (bh * d.NC + c) * d.PN;  // G_{c+1}

  const float dsk = Dskip != nullptr ? Dskip[h] : 0.f;
  double dd_acc = 0.0;
  for (int st = 0; st < nT; ++st) {
    const int s0 = st * kTile, ts0 = c0 + s0, sv = min(kTile, d.S - ts0);
    LoadRowsAsync(Bs, ldn, Bb + ts0 * bc_stride, bc_stride, sv, d.N);
    LoadRowsAsync(Xs, ldp, xb + ts0 * x_stride, x_stride, sv, d.P);
    LoadState(Gs, ldn, g_state, d.P, d.N);
    CpAsyncWaitAll();
    __syncthreads();
    // State term: DX = w_s (B_s Gᵀ); dlogw_s = dt_s w_s x_s·(B_s Gᵀ)_s.
    typename MM::Tile acc[2];
    MM::Zero(acc);
    MM::template Mma<false, true, 2>(acc, Bs, ldn, Gs, ldn, kTile, d.P, d.N);
    MM::Store(acc, DX, ldx, kTile, d.P);
    __syncthreads();
    {
      const float w = expf(acs[d.Q - 1] - acs[s0 + row]);
      float dot = 0.f;
      for (int p = half * hp; p < (half + 1) * hp; ++p) {
        const float v = DX[row * ldx + p] * w;
        DX[row * ldx + p] = v;
        dot += v * __bfloat162float(Xs[row * ldp + p]);
      }
      dot += __shfl_xor_sync(0xffffffffu, dot, 1);
      float dl = 0.f;
      if (half == 0 && row < sv) {
        dl = dts[s0 + row] * dot;
        dacs[s0 + row] -= dl;  // one writer per row
        da_loc += static_cast<double>(dl) * (acs[d.Q - 1] - acs[s0 + row]);
      }
      // Σ_rows dl into dacs_last in a fixed order (warp butterflies, then the warps in turn), not
      // by shared-memory atomics: training must give the same bits run after run.
      for (int o = 16; o > 0; o >>= 1) dl += __shfl_xor_sync(0xffffffffu, dl, o);
      if (threadIdx.x % 32 == 0) dl_warp[threadIdx.x / 32] = dl;
      __syncthreads();
      if (threadIdx.x == 0) {
        float total = 0.f;
        for (int w = 0; w < kThreads / 32; ++w) total += dl_warp[w];
        dacs[d.Q - 1] += total;
      }
    }
    __syncthreads();
    MM::Load(acc, DX, ldx, kTile, d.P);
    __syncthreads();  // DX is reused as Ms/Ms2, Gs as Cl, in the pair loop
    for (int lt = st; lt < nT; ++lt) {
      const int l0 = lt * kTile, tl0 = c0 + l0, lv = min(kTile, d.S - tl0);
      LoadRowsAsync(Cl, ldn, Cb + tl0 * bc_stride, bc_stride, lv, d.N);
      LoadRowsAsync(dYl, ldp, dyb + tl0 * y_stride, y_stride, lv, d.P);
      CpAsyncWaitAll();
      __syncthreads();
      typename MM::Tile t1[1], t2[1];
      MM::Zero(t1);
      MM::Zero(t2);
      MM::template Mma<false, true, 1>(t1, Bs, ldn, Cl, ldn, kTile, kTile, d.N);   // (s, l) B_s·C_l
      MM::template Mma<false, true, 1>(t2, Xs, ldp, dYl, ldp, kTile, kTile, d.P);  // (s, l) x_s·dy_l
      MM::Store(t1, Ms, ldm, kTile, kTile);
      MM::Store(t2, Ms2, ldm, kTile, kTile);
      __syncthreads();
      for (int i = threadIdx.x; i < kTile * kTile; i += kThreads) {
        const int s = i / kTile, l = i % kTile;
        float mt = 0.f;
        if (lt > st || l >= s) mt = Ms[s * ldm + l] * expf(acs[l0 + l] - acs[s0 + s]);
        Mb[s * 72 + l] = __float2bfloat16_rn(mt);
        const float m2 = dts[s0 + s] * Ms2[s * ldm + l] * mt;
        Ms2[s * ldm + l] = m2;
        if (mt != 0.f) da_loc += static_cast<double>(m2) * (acs[l0 + l] - acs[s0 + s]);
      }
      __syncthreads();
      // Row sums go to dacs_s, column sums to dacs_l; on the diagonal tile (l0 == s0) both hit one
      // element, so the two halves write one after the other (a fixed order, no atomics).
      const int own = threadIdx.x < kTile ? threadIdx.x : threadIdx.x - kTile;
      float sum = 0.f;
      if (threadIdx.x < kTile) {
        for (int j = 0; j < kTile; ++j) sum += Ms2[own * ldm + (j + own) % kTile];
        dacs[s0 + own] -= sum;
      } else {
        for (int i = 0; i < kTile; ++i) sum += Ms2[i * ldm + own];
      }
      __syncthreads();
      if (threadIdx.x >= kTile) dacs[l0 + own] += sum;
      MM::template Mma<false, false, 2>(acc, Mb, 72, dYl, ldp, kTile, d.P, kTile);
      __syncthreads();
    }
    MM::Store(acc, DX, ldx, kTile, d.P);
    __syncthreads();
    // dx = dt dX̄ + D dy; ddtx = x·dX̄; dD += dy·x (two threads per row, P/2 columns each).
    float dot_x = 0.f, dot_d = 0.f;
    if (row < sv) {
      const int64_t off = (ts0 + row) * x_stride, yoff = (ts0 + row) * y_stride;
      for (int p = half * hp; p < (half + 1) * hp; p += 8) {
        float dyv[8], out[8];
        LoadBf16<8>(dyb + yoff + p, dyv);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const float xv = __bfloat162float(Xs[row * ldp + p + j]);
          const float gx = DX[row * ldx + p + j];
          dot_x += xv * gx;
          dot_d += xv * dyv[j];
          out[j] = dts[s0 + row] * gx + dsk * dyv[j];
        }
        StoreBf16<8>(dxb + off + p, out);
      }
    }
    dot_x += __shfl_xor_sync(0xffffffffu, dot_x, 1);
    if (row < sv && half == 0) ddtx[s0 + row] = dot_x;
    dd_acc += dot_d;
    __syncthreads();
  }

  // ∂a_t = Σ_{t' ≥ t} ∂Acs_t' (reverse cumsum; warp 0, lane-contiguous segments).
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x, seg = d.Q / 32;
    float s = 0.f;
    for (int i = 0; i < seg; ++i) s += dacs[lane * seg + i];
    float suffix = s;  // inclusive suffix sum over lanes >= lane
    for (int off = 1; off < 32; off <<= 1) {
      const float o = __shfl_down_sync(0xffffffffu, suffix, off);
      if (lane + off < 32) suffix += o;
    }
    float run = suffix - s;  // lanes above
    for (int i = seg - 1; i >= 0; --i) {
      run += dacs[lane * seg + i];
      dacs[lane * seg + i] = run;
    }
  }
  __syncthreads();
  const float A = -expf(a_log[h]);
  const float bias = dt_bias[h];
  double db_acc = 0.0;
  for (int t = threadIdx.x; t < len; t += kThreads) {
    const int64_t idx = (static_cast<int64_t>(b) * d.S + c0 + t) * d.H + h;
    const float dda = dacs[t];
    const float total = ddtx[t] + A * dda;
    const float draw = DdtRaw(d, total, dt_raw[idx] + bias);
    ddt[idx] = draw;
    db_acc += draw;
  }
  const double s_a = BlockSumDouble(da_loc, red) / static_cast<double>(A);
  const double s_b = BlockSumDouble(db_acc, red + kWarps);
  const double s_d = BlockSumDouble(dd_acc, red + 2 * kWarps);
  if (threadIdx.x == 0) {
    const int64_t n = static_cast<int64_t>(d.B) * d.NC * d.H;
    const int64_t i = (static_cast<int64_t>(b) * d.NC + c) * d.H + h;
    part[i] = s_a;
    part[n + i] = s_b;
    part[2 * n + i] = s_d;
  }
}

// Shared memory of ssd_chunk_scan_bwd_dbc (~104 KB at P64 N128 Q256: two blocks per SM):
//   Sum [64][Q] fp32 (the head-summed dCB rows), Acs/dt [2Q] and the own-row scale [64] of the
//   current head, the raw own tile Own [64][P+8], and one region U used three ways:
//   state term: OwnS [64][P+8] + St [P][N+8] bf16;  other-tile loop: Oth [64][P+8] bf16 +
//   Ms [64][68] fp32;  final products: Tb [64][72] bf16 (one 64-column slice of Sum) + Vt [64][N+8].
template <typename Carver>
void CarveDbc(Carver& cv, const Dims& d) {
  cv.template take<float>(kTile * d.Q);        // Sum
  cv.template take<float>(2 * d.Q);            // acs, dt of the current head
  cv.template take<float>(kTile);              // own-row scale
  cv.template take<bf16>(kTile * (d.P + 8));   // Own
  CarveSize a, o, f;
  a.take<bf16>(kTile * (d.P + 8));
  a.take<bf16>(d.P * (d.N + 8));
  o.take<bf16>(kTile * (d.P + 8));
  o.take<float>(kTile * 68);
  f.take<bf16>(kTile * 72);
  f.take<bf16>(kTile * (d.N + 8));
  cv.template take<char>(std::max({a.off, o.off, f.off}));
}

// kDB = false: dC for the 64-row l-tile `blockIdx.x % (Q/64)`; true: dB for that s-tile.
// grid (NC·Q/64, G·nsplit, B). part [nsplit, B, NC·Q, G, N] fp32.
template <class MM, bool kDB>
__global__ void __launch_bounds__(kThreads, 2) ssd_chunk_scan_bwd_dbc(
    Dims d, int nsplit, const bf16* x, const bf16* Bm, const bf16* Cm, const float* saved,
    const bf16* dy, const float* dsg, float* part) {
  extern __shared__ __align__(128) char smem[];
  const int tiles = d.Q / kTile;
  const int c = blockIdx.x / tiles, ot_own = blockIdx.x % tiles;
  const int g = blockIdx.y / nsplit, sp = blockIdx.y % nsplit, b = blockIdx.z;
  const int own0 = c * d.Q + ot_own * kTile;
  if (own0 >= d.S) return;
  const int ov = min(kTile, d.S - own0);
  const int nT = (min(d.Q, d.S - c * d.Q) + kTile - 1) / kTile;
  const int hps = d.hpg / nsplit;
  const int ldp = d.P + 8, ldn = d.N + 8, lds = d.Q;
  Carve cv{smem};
  float* Sum = cv.take<float>(kTile * lds);
  float* acs = cv.take<float>(2 * d.Q);
  float* dts = acs + d.Q;
  float* scale = cv.take<float>(kTile);
  bf16* Own = cv.take<bf16>(kTile * ldp);
  char* region = cv.base + cv.off;
  Carve ca{region}, co{region}, cf{region};
  bf16* OwnS = ca.take<bf16>(kTile * ldp);
  bf16* St = ca.take<bf16>(d.P * ldn);
  bf16* Oth = co.take<bf16>(kTile * ldp);
  float* Ms = co.take<float>(kTile * 68);
  bf16* Tb = cf.take<bf16>(kTile * 72);
  bf16* Vt = cf.take<bf16>(kTile * ldn);

  for (int i = threadIdx.x; i < kTile * lds; i += kThreads) Sum[i] = 0.f;
  // Own rows are x (dB) or dy (dC), the other rows the other one; part is dense [.., G, N].
  const int64_t own_ld = kDB ? d.ldx : d.ldy, oth_ld = kDB ? d.ldy : d.ldx;
  const int64_t bc_stride = static_cast<int64_t>(d.G) * d.N;
  const int lo = kDB ? ot_own : 0, hi = kDB ? nT - 1 : ot_own;  // other tiles

  typename MM::Tile acc[4];
  MM::Zero(acc);
  for (int hh = 0; hh < hps; ++hh) {
    const int h = g * d.hpg + sp * hps + hh;
    const int64_t bh = static_cast<int64_t>(b) * d.H + h;
    __syncthreads();
    const float* acs_g = AcsPtr(d, saved, b, h) + static_cast<int64_t>(c) * d.Q;
    const float* dt_g = DtPtr(d, saved, b);
    const bf16* xh = x + XRow(d, b, 0) + static_cast<int64_t>(h) * d.P;
    const bf16* dyh = dy + YRow(d, b, 0) + static_cast<int64_t>(h) * d.P;
    const bf16* own_src = (kDB ? xh : dyh) + own0 * own_ld;
    const bf16* oth_src = kDB ? dyh : xh;
    // One memory round trip for the head's prologue: the raw own tile through cp.async, the
    // state and Acs/dt through registers, all in flight together.
    LoadRowsAsync(Own, ldp, own_src, own_ld, ov, d.P);
    for (int i = threadIdx.x; i < d.Q; i += kThreads) {
      acs[i] = acs_g[i];
      dts[i] = c * d.Q + i < d.S ? dt_g[static_cast<int64_t>(c * d.Q + i) * d.H + h] : 0.f;
    }
    LoadState(St, ldn,
              kDB ? dsg + (bh * d.NC + c) * d.PN : StatePtr(d, saved, b, h, c), d.P, d.N);
    CpAsyncWaitAll();
    __syncthreads();
    // Own-row scale: dB: e^{Acs_last − Acs_s} dt_s; dC: e^{Acs_l}.
    if (threadIdx.x < kTile) {
      const int r = threadIdx.x, i = ot_own * kTile + r;
      scale[r] = kDB ? expf(acs[d.Q - 1] - acs[i]) * dts[i] : expf(acs[i]);
    }
    __syncthreads();
    {
      const int vpr = d.P / 8;
      for (int i = threadIdx.x; i < kTile * vpr; i += kThreads) {
        const int r = i / vpr, v = (i % vpr) * 8;
        float f[8];
        LoadBf16<8>(Own + r * ldp + v, f);
        const float sc = scale[r];
#pragma unroll
        for (int j = 0; j < 8; ++j) f[j] *= sc;
        StoreBf16<8>(OwnS + r * ldp + v, f);
      }
    }
    __syncthreads();
    MM::template Mma<false, false, 4>(acc, OwnS, ldp, St, ldn, kTile, d.N, d.P);
    for (int ot = lo; ot <= hi; ++ot) {
      const int oth0 = c * d.Q + ot * kTile, othv = min(kTile, d.S - oth0);
      __syncthreads();  // OwnS/St (first pass) or Ms (later passes) are still being read
      LoadRowsAsync(Oth, ldp, oth_src + oth0 * oth_ld, oth_ld, othv, d.P);
      CpAsyncWaitAll();
      __syncthreads();
      MmaStore<MM, false, true, 1>(Ms, 68, Own, ldp, Oth, ldp, kTile, kTile, d.P);
      __syncthreads();
      for (int i = threadIdx.x; i < kTile * kTile; i += kThreads) {
        const int r = i / kTile, q = i % kTile;
        const int oi = ot_own * kTile + r, qi = ot * kTile + q;
        const int l = kDB ? qi : oi, s = kDB ? oi : qi;
        if (l >= s) Sum[r * lds + ot * kTile + q] += dts[s] * expf(acs[l] - acs[s]) * Ms[r * 68 + q];
      }
    }
  }
  const bf16* vsrc = (kDB ? Cm : Bm) + BcRow(d, b, 0) + static_cast<int64_t>(g) * d.N;
  for (int ot = lo; ot <= hi; ++ot) {
    const int oth0 = c * d.Q + ot * kTile, othv = min(kTile, d.S - oth0);
    __syncthreads();
    LoadRowsAsync(Vt, ldn, vsrc + oth0 * d.ldbc, d.ldbc, othv, d.N);
    for (int i = threadIdx.x; i < kTile * kTile; i += kThreads) {
      const int r = i / kTile, j = i % kTile;
      Tb[r * 72 + j] = __float2bfloat16_rn(Sum[r * lds + ot * kTile + j]);
    }
    CpAsyncWaitAll();
    __syncthreads();
    MM::template Mma<false, false, 4>(acc, Tb, 72, Vt, ldn, kTile, d.N, kTile);
  }
  const int64_t ncq = static_cast<int64_t>(d.NC) * d.Q;
  float* out = part + ((static_cast<int64_t>(sp) * d.B + b) * ncq + own0) * bc_stride + g * d.N;
  MM::Store(acc, out, bc_stride, kTile, d.N);
}

// dB/dC [B, S, G, N] bf16 (row stride ldbc) = Σ_split part (fixed order).
__global__ void ssd_reduce_bc(Dims d, int nsplit, const float* part, bf16* out) {
  const int64_t gn = static_cast<int64_t>(d.G) * d.N;
  const int64_t per_b = static_cast<int64_t>(d.S) * gn;
  const int64_t total = d.B * per_b;
  const int64_t ncq_stride = static_cast<int64_t>(d.NC) * d.Q * d.G * d.N;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = i / per_b, rem = i % per_b;
    float s = 0.f;
    for (int k = 0; k < nsplit; ++k) s += part[(k * d.B + b) * ncq_stride + rem];
    out[BcRow(d, static_cast<int>(b), rem / gn) + rem % gn] = __float2bfloat16_rn(s);
  }
}

// grid H, block 256: da_log[h] += A·Σ dA, ddt_bias[h] += Σ, dd[h] += Σ (fixed order).
__global__ void ssd_param_reduce(Dims d, const double* part, const float* a_log, float* da_log,
                                 float* ddt_bias, float* dd) {
  const int h = blockIdx.x;
  const int64_t n = static_cast<int64_t>(d.B) * d.NC * d.H;
  double s[3] = {0, 0, 0};
  for (int i = threadIdx.x; i < d.B * d.NC; i += blockDim.x)
    for (int k = 0; k < 3; ++k) s[k] += part[k * n + static_cast<int64_t>(i) * d.H + h];
  __shared__ double red[3][256];
  for (int k = 0; k < 3; ++k) red[k][threadIdx.x] = s[k];
  __syncthreads();
  for (int w = blockDim.x / 2; w > 0; w >>= 1) {
    if (static_cast<int>(threadIdx.x) < w)
      for (int k = 0; k < 3; ++k) red[k][threadIdx.x] += red[k][threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const double A = -exp(static_cast<double>(a_log[h]));
    da_log[h] += static_cast<float>(red[0][0] * A);
    ddt_bias[h] += static_cast<float>(red[1][0]);
    if (dd != nullptr) dd[h] += static_cast<float>(red[2][0]);
  }
}

// ------------------------------------------------------------------ register-resident path (v3)
//
// FlashAttention-2 style: each warp owns 16 rows of a 64-row tile and keeps its products in
// mma.sync accumulators through the element-wise steps (decay, causal mask, dt scale, rounding
// to bf16). The m16n8 accumulators of two adjacent n8 tiles are exactly the A fragment of one
// k16 step, so a masked product feeds the next product with no shared-memory round trip and no
// barrier. Operand tiles are double-buffered in shared memory through cp.async: tile i+1 is in
// flight while tile i is multiplied. The backward reads bf16 copies of H_c and G_{c+1} that
// ssd_state_pass_bwd writes on this path (plain cp.async tiles, no per-block fp32 conversion).
// Each v3 kernel is selected separately (SsdSetRegisterPathForTesting) so that the v2 kernels
// stay available for A/B checks; shapes whose v3 tiles do not fit shared memory use v2.
//
// Fragment coordinates (lane = 4·gq + tq): accumulator element e of n8 tile j sits at row
// gq + 8·(e / 2) of the warp's 16 rows, column 8·j + 2·tq + (e % 2).

// (CpAsyncCommit, CpAsyncWait<kPending>: ssd_device.cuh.)

// A kStages-deep cp.async ring over n steps, one barrier a step, for loops of the form
//   RingPrologue<kStages>(n, issue);
//   for (int step = 0; step < n; ++step) {
//     const int buf = step % kStages;
//     RingStep<kStages>(step, n, issue);
//     ...  // slot buf holds step `step`
//   }
// issue(step, buf) loads step `step` into ring slot buf and commits its group. A group is
// committed for every step even past n (empty), so that wait_group<kStages − 2> always means
// "step `step` has landed"; the barrier then also retires slot (step − 1) % kStages, which
// receives step + kStages − 1.
template <int kStages, class Issue>
__device__ __forceinline__ void RingPrologue(int n, Issue&& issue) {
#pragma unroll
  for (int i = 0; i < kStages - 1; ++i) {
    if (i < n) {
      issue(i, i);
    } else {
      CpAsyncCommit();
    }
  }
}
template <int kStages, class Issue>
__device__ __forceinline__ void RingStep(int step, int n, Issue&& issue) {
  CpAsyncWait<kStages - 2>();
  __syncthreads();
  if (step + kStages - 1 < n) {
    issue(step + kStages - 1, (step + kStages - 1) % kStages);
  } else {
    CpAsyncCommit();
  }
}

// `rows` rows × width bf16 (width % 8 == 0) through cp.async; rows >= valid zero-filled.
__device__ __forceinline__ void CpRows(bf16* dst, int ld, const bf16* src, int64_t stride,
                                       int rows, int valid, int width) {
  const int vpr = width / 8;
  for (int i = threadIdx.x; i < rows * vpr; i += kThreads) {
    const int r = i / vpr, v = (i % vpr) * 8;
    const bool ok = r < valid;
    const bf16* g = ok ? src + r * stride + v : src;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(
                     SmemAddr(dst + r * ld + v)),
                 "l"(g), "r"(ok ? 16 : 0));
  }
}

// One fp32 through cp.async (4 bytes; zero-filled when !ok, src then only has to be valid).
__device__ __forceinline__ void CpAsync4(float* dst, const float* src, bool ok) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(SmemAddr(dst)), "l"(src),
               "r"(ok ? 4 : 0));
}

__device__ __forceinline__ unsigned PackBf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&v);
}

template <int NT>
__device__ __forceinline__ void ZeroAcc(float (&acc)[NT][4]) {
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[j][e] = 0.f;
}

// acc[NT][4] (the warp's 16 rows × 8·NT columns) += A · B over K (a multiple of 16).
// A: the warp's 16 rows at a (row-major, lda). B(k, n) = b[n·ldb + k] when BT, else b[k·ldb + n].
template <int NT, bool BT>
__device__ __forceinline__ void WarpMmaSS(float (&acc)[NT][4], const bf16* a, int lda,
                                          const bf16* b, int ldb, int K) {
  static_assert(NT % 2 == 0, "n8 tiles come in pairs (one ldmatrix.x4)");
  const int lane = threadIdx.x % 32, q = lane / 8, r = lane % 8;
  const unsigned a0 = SmemAddr(a + (r + 8 * (q % 2)) * lda + 8 * (q / 2));
  const unsigned b0 = BT ? SmemAddr(b + (r + 8 * (q / 2)) * ldb + 8 * (q % 2))
                         : SmemAddr(b + (r + 8 * (q % 2)) * ldb + 8 * (q / 2));
  for (int kk = 0; kk < K; kk += 16) {
    unsigned fa[4];
    LdMatrixX4<false>(fa, a0 + kk * 2);
#pragma unroll
    for (int h = 0; h < NT / 2; ++h) {
      unsigned fb[4];
      const unsigned off = BT ? (16 * h * ldb + kk) * 2 : (kk * ldb + 16 * h) * 2;
      LdMatrixX4<!BT>(fb, b0 + off);
      MmaBf16(acc[2 * h], fa, fb[0], fb[1]);
      MmaBf16(acc[2 * h + 1], fa, fb[2], fb[3]);
    }
  }
}

// The same with A from registers: fa[KS][4], K = 16·KS.
template <int NT, int KS, bool BT>
__device__ __forceinline__ void WarpMmaRS(float (&acc)[NT][4], const unsigned (&fa)[KS][4],
                                          const bf16* b, int ldb) {
  const int lane = threadIdx.x % 32, q = lane / 8, r = lane % 8;
  const unsigned b0 = BT ? SmemAddr(b + (r + 8 * (q / 2)) * ldb + 8 * (q % 2))
                         : SmemAddr(b + (r + 8 * (q % 2)) * ldb + 8 * (q / 2));
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
    const int kk = 16 * ks;
#pragma unroll
    for (int h = 0; h < NT / 2; ++h) {
      unsigned fb[4];
      const unsigned off = BT ? (16 * h * ldb + kk) * 2 : (kk * ldb + 16 * h) * 2;
      LdMatrixX4<!BT>(fb, b0 + off);
      MmaBf16(acc[2 * h], fa[ks], fb[0], fb[1]);
      MmaBf16(acc[2 * h + 1], fa[ks], fb[2], fb[3]);
    }
  }
}

// Accumulators (16 × 8·NS, fp32) → bf16 A fragments of NS/2 k16 steps.
template <int NS>
__device__ __forceinline__ void AccToA(const float (&s)[NS][4], unsigned (&fa)[NS / 2][4]) {
#pragma unroll
  for (int k = 0; k < NS / 2; ++k) {
    fa[k][0] = PackBf16(s[2 * k][0], s[2 * k][1]);
    fa[k][1] = PackBf16(s[2 * k][2], s[2 * k][3]);
    fa[k][2] = PackBf16(s[2 * k + 1][0], s[2 * k + 1][1]);
    fa[k][3] = PackBf16(s[2 * k + 1][2], s[2 * k + 1][3]);
  }
}

__device__ __forceinline__ float QuadSum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  v += __shfl_xor_sync(0xffffffffu, v, 2);
  return v;
}

__device__ __forceinline__ float2 Bf2(const bf16* p) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
}

// bf16 A fragments of NS/2 k16 steps → fp32 accumulator layout (16 × 8·NS): AccToA inverted.
template <int NS>
__device__ __forceinline__ void AToAcc(const unsigned (&fa)[NS / 2][4], float (&s)[NS][4]) {
#pragma unroll
  for (int k = 0; k < NS / 2; ++k)
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const float2 v = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&fa[k][q]));
      s[2 * k + q / 2][2 * (q % 2)] = v.x;
      s[2 * k + q / 2][2 * (q % 2) + 1] = v.y;
    }
}

constexpr int kLdCb = kTile + 8;  // shared-memory row stride of a 64×64 bf16 C Bᵀ tile

// The warp's 16 rows of a 64×64 bf16 tile at t (row stride kLdCb) as A fragments (K = 64):
// rows warp·16.. of t itself, or (kTrans) of its transpose (row i of the result = column i of t).
template <bool kTrans>
__device__ __forceinline__ void LoadTileA(unsigned (&fa)[4][4], const bf16* t) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, q = lane / 8, r = lane % 8;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    // Matrix q of the x4 is A fragment register q: rows +8·(q%2), k +8·(q/2).
    const bf16* p = kTrans ? t + (16 * k + 8 * (q / 2) + r) * kLdCb + warp * 16 + 8 * (q % 2)
                           : t + (warp * 16 + 8 * (q % 2) + r) * kLdCb + 16 * k + 8 * (q / 2);
    LdMatrixX4<kTrans>(fa[k], SmemAddr(p));
  }
}

// grid (NC·T(T+1)/2, G, B) with T = Q/64 tiles per chunk: one 64×64 tile (l-tile lt, s-tile
// st <= lt) of C Bᵀ per block, K = N, fp32 accumulate, rounded to bf16 into the saved buffer
// (CbPtr). Computed once per (b, c, g) and read by every head of the group in the forward scan
// and the backward dx kernel (mamba_ssm's _bmm_chunk_fwd; at G = 1 it was recomputed 64 times).
template <typename Carver>
void CarveBmmCb(Carver& cv, const Dims& d) {
  cv.template take<bf16>(2 * kTile * (d.N + 8));
}

// Tile pair `pair` of a chunk's lower triangle (l-tile lt >= s-tile st), in the order
// (0, 0), (1, 0), (1, 1), (2, 0), ...: the pairs = tiles·(tiles + 1)/2 blocks of the C Bᵀ and
// dCB kernels.
__device__ __forceinline__ void TilePairOf(int pair, int& lt, int& st) {
  int pi = pair;
  lt = 0;
  while (pi > lt) {
    pi -= lt + 1;
    ++lt;
  }
  st = pi;
}

__global__ void __launch_bounds__(kThreads) ssd_bmm_cb(Dims d, const bf16* Bm, const bf16* Cm,
                                                       float* saved) {
  extern __shared__ __align__(128) char smem[];
  const int tiles = d.Q / kTile, pairs = tiles * (tiles + 1) / 2;
  const int c = blockIdx.x / pairs, g = blockIdx.y, b = blockIdx.z;
  int lt, st;
  TilePairOf(blockIdx.x % pairs, lt, st);
  const int tl0 = c * d.Q + lt * kTile, ts0 = c * d.Q + st * kTile;
  if (tl0 >= d.S) return;
  const int ldn = d.N + 8;
  bf16* Cl = reinterpret_cast<bf16*>(smem);
  bf16* Bs = Cl + kTile * ldn;
  const int64_t bc_stride = d.ldbc;
  const bf16* Cb = Cm + BcRow(d, b, 0) + static_cast<int64_t>(g) * d.N;
  const bf16* Bb = Bm + BcRow(d, b, 0) + static_cast<int64_t>(g) * d.N;
  LoadRowsAsync(Cl, ldn, Cb + tl0 * bc_stride, bc_stride, min(kTile, d.S - tl0), d.N);
  LoadRowsAsync(Bs, ldn, Bb + ts0 * bc_stride, bc_stride, min(kTile, d.S - ts0), d.N);
  CpAsyncCommit();
  CpAsyncWait<0>();
  __syncthreads();
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, gq = lane / 4, tq = lane % 4;
  float acc[8][4];
  ZeroAcc(acc);
  WarpMmaSS<8, true>(acc, Cl + warp * 16 * ldn, ldn, Bs, ldn, d.N);
  bf16* out = CbPtr(d, saved, b, g) + static_cast<int64_t>(tl0 + warp * 16 + gq) * d.Q +
              st * kTile;
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int e2 = 0; e2 < 2; ++e2) {
      *reinterpret_cast<__nv_bfloat162*>(out + 8 * e2 * d.Q + 8 * j + 2 * tq) =
          __floats2bfloat162_rn(acc[j][2 * e2], acc[j][2 * e2 + 1]);
    }
}

// ssd_chunk_scan_fwd_pair_xs: y for the l-tiles p and T−1−p (T = Q/64 tiles per chunk; one tile
// where they coincide) of one (b, c, h), so every block has the same work (at Q = 256: 2 inter
// products and 5 tile pairs) and one cp.async pipeline runs through all of it. Session 8
// replaced the per-l-tile kernel (ssd_chunk_scan_fwd_reg, one block per 64-row l-tile walking
// 1-4 s-tiles after a prologue that waited for C_l, H_c and tile 0 together): H_c, the chunk's
// Acs and dt are loaded once per block (H_c was read by each l-tile block), and only the first
// item's round trip is exposed per two l-tiles. H200 (ncu): 511 → 479-484 µs at B8 S2048;
// forward 0.631 → 0.611 ms. A third ring slot (3 blocks per SM at 163 registers) was slower
// (forward 0.643 ms), as was the same pairing in bwd dx (649 → 677 µs; removed).
// Items k = 0..K−1, in order: I(a) (C_l tile: y = e^{Acs_l} C_l H_cᵀ), S(a, 0..a) (C Bᵀ and x_s
// tiles: y += M x_s), then y of a; I(b), S(b, 0..b), y of b. Item k's tiles go to ring slot
// k % kSlots (a slot holds either C_l or a C Bᵀ tile + x tile); one barrier per item publishes
// item k and retires slot k−1, which then receives item k+1 (loading while k is computed).
// The math per tile is ssd_chunk_scan_fwd's (which documents it).
constexpr int kScanSlots = 2;
template <typename Carver>
void CarveScanFwdPair(Carver& cv, const Dims& d) {
  const int slot = std::max(kTile * (d.N + 8), kTile * kLdCb + kTile * (d.P + 8));
  cv.template take<bf16>(static_cast<size_t>(kScanSlots) * slot);  // ring
  cv.template take<bf16>(d.P * (d.N + 8));                          // H_c
  cv.template take<float>(2 * d.Q);                                 // Acs, dt of the chunk
}

// grid (NC·ceil(T/2), H, B). 128 registers and 55 KB at P64 N128: four blocks per SM.
// The D·x term of each l-tile's rows reads x from the ring slot of the diagonal item S(a, a),
// whose x_s tile holds exactly those rows (helper ssd10; session 8's form read it from global
// memory after the last product, one synchronous round trip per l-tile).
template <int kP>
__global__ void __launch_bounds__(kThreads, kP <= 64 ? 4 : 2) ssd_chunk_scan_fwd_pair_xs(
    Dims d, const bf16* x, const bf16* Cm, const float* Dskip, const float* saved, bf16* y) {
  extern __shared__ __align__(128) char smem[];
  constexpr int NP = kP / 8;
  constexpr int kSlots = kScanSlots;
  const int T = d.Q / kTile, pairs = (T + 1) / 2;
  const int c = blockIdx.x / pairs, pr = blockIdx.x % pairs, h = blockIdx.y, b = blockIdx.z;
  const int g = h / d.hpg;
  const int c0 = c * d.Q;
  const int len = min(d.Q, d.S - c0);
  const int nT = (len + kTile - 1) / kTile;  // l-tiles of this chunk inside the sequence
  // The block's l-tiles: ta = pr, tb = T−1−pr (none where past the sequence end or equal to ta).
  const int ta = pr, tb = (T - 1 - pr > pr && T - 1 - pr < nT) ? T - 1 - pr : -1;
  if (ta >= nT) return;
  const int K = (ta + 2) + (tb >= 0 ? tb + 2 : 0);
  const int ldn = d.N + 8, ldp = kP + 8;
  const int slot_elems = max(kTile * ldn, kTile * kLdCb + kTile * ldp);
  Carve cv{smem};
  bf16* ring = cv.take<bf16>(static_cast<size_t>(kSlots) * slot_elems);
  bf16* Hs = cv.take<bf16>(kP * ldn);
  float* acs_c = cv.take<float>(2 * d.Q);
  float* dt_c = acs_c + d.Q;

  const float* acs_g = AcsPtr(d, saved, b, h) + c0;
  const float* dts = DtPtr(d, saved, b);
  const int64_t bc_stride = d.ldbc;
  const int64_t x_stride = d.ldx;
  const bf16* Cb = Cm + BcRow(d, b, 0) + static_cast<int64_t>(g) * d.N;
  const bf16* cbc = CbPtr(d, saved, b, g) + static_cast<int64_t>(c0) * d.Q;  // chunk's C Bᵀ
  const bf16* xb = x + XRow(d, b, 0) + static_cast<int64_t>(h) * d.P;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, gq = lane / 4, tq = lane % 4;
  const int r0 = warp * 16 + gq;  // this thread's rows of the current l-tile: r0, r0 + 8

  // Item k → (l-tile, s-tile or −1 for the inter item).
  auto item = [&](int k, int& lt, int& st) {
    const int ka = ta + 2;
    lt = k < ka ? ta : tb;
    const int j = k < ka ? k : k - ka;
    st = j - 1;
  };
  auto issue = [&](int k) {
    if (k < K) {
      int lt, st;
      item(k, lt, st);
      bf16* sl = ring + (k % kSlots) * slot_elems;
      const int tl0 = c0 + lt * kTile;
      if (st < 0) {
        LoadRowsAsync(sl, ldn, Cb + tl0 * bc_stride, bc_stride, min(kTile, d.S - tl0), d.N);
      } else {
        const int ts0 = c0 + st * kTile;
        CpRows(sl, kLdCb, cbc + static_cast<int64_t>(lt * kTile) * d.Q + st * kTile, d.Q, kTile,
               kTile, kTile);
        LoadRowsAsync(sl + kTile * kLdCb, ldp, xb + ts0 * x_stride, x_stride,
                      min(kTile, d.S - ts0), kP);
      }
    }
    CpAsyncCommit();
  };

  // Prologue: H_c, the chunk's Acs and dt (joining item 0's group).
  CpRows(Hs, ldn, HbfPtr(d, saved, b, h, c), d.N, kP, kP, d.N);
  for (int i = threadIdx.x; i < d.Q; i += kThreads) {
    CpAsync4(acs_c + i, acs_g + i, true);  // padded tokens carry the last value (AcsPtr)
    CpAsync4(dt_c + i, dts + static_cast<int64_t>(c0 + min(i, len - 1)) * d.H + h, i < len);
  }
  issue(0);
  for (int k = 1; k < kSlots - 1; ++k) issue(k);  // (none with two slots)

  float acc[NP][4];
  float al0 = 0.f, al1 = 0.f, aref = 0.f, rf0 = 0.f, rf1 = 0.f;
  for (int k = 0; k < K; ++k) {
    CpAsyncWait<kSlots - 2>();
    __syncthreads();
    issue(k + kSlots - 1);
    int lt, st;
    item(k, lt, st);
    const bf16* sl = ring + (k % kSlots) * slot_elems;
    const int l0 = lt * kTile;
    if (st < 0) {
      // Inter-chunk: y = e^{Acs_l} (C_l H_cᵀ).
      al0 = acs_c[l0 + r0];
      al1 = acs_c[l0 + r0 + 8];
      aref = acs_c[l0];
      rf0 = __expf(al0 - aref);
      rf1 = __expf(al1 - aref);
      ZeroAcc(acc);
      WarpMmaSS<NP, true>(acc, sl + warp * 16 * ldn, ldn, Hs, ldn, d.N);
      const float e0 = expf(al0), e1 = expf(al1);
#pragma unroll
      for (int j = 0; j < NP; ++j) {
        acc[j][0] *= e0;
        acc[j][1] *= e0;
        acc[j][2] *= e1;
        acc[j][3] *= e1;
      }
      continue;
    }
    const float* as = acs_c + st * kTile;
    const float* ds = dt_c + st * kTile;
    float s[8][4];
    {
      unsigned cbf[4][4];
      LoadTileA<false>(cbf, sl);
      AToAcc<8>(cbf, s);
    }
    if (st < lt) {
      // Off-diagonal tile: e^{Acs_l − Acs_s} = e^{Acs_l − Acs_l0} · e^{Acs_l0 − Acs_s}, both <= 1.
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int c2 = 0; c2 < 2; ++c2) {
          const int col = 8 * j + 2 * tq + c2;
          const float cf = ds[col] * __expf(aref - as[col]);
          s[j][c2] *= cf * rf0;
          s[j][2 + c2] *= cf * rf1;
        }
    } else {
      ScaleDiagCausal(s, tq, r0, al0, al1, as, ds);
    }
    unsigned fa[4][4];
    AccToA(s, fa);
    WarpMmaRS<NP, 4, false>(acc, fa, sl + kTile * kLdCb, ldp);
    if (st == lt) {
      // Last tile of this l-tile: y = acc + D x (rows inside the sequence).
      const int tl0 = c0 + l0, lv = min(kTile, d.S - tl0);
      const float dsk = Dskip != nullptr ? Dskip[h] : 0.f;
      bf16* yb = y + YRow(d, b, 0) + static_cast<int64_t>(h) * d.P;
#pragma unroll
      for (int e2 = 0; e2 < 2; ++e2) {
        const int row = r0 + 8 * e2;
        if (row < lv) {
          const int64_t yoff = (tl0 + row) * d.ldy;
#pragma unroll
          for (int j = 0; j < NP; ++j) {
            const int p = 8 * j + 2 * tq;
            const float2 xv = Bf2(sl + kTile * kLdCb + row * ldp + p);  // x_s of S(a, a): l-tile a
            *reinterpret_cast<__nv_bfloat162*>(yb + yoff + p) = __floats2bfloat162_rn(
                acc[j][2 * e2] + dsk * xv.x, acc[j][2 * e2 + 1] + dsk * xv.y);
          }
        }
      }
    }
  }
}

// Shared memory of ssd_chunk_scan_bwd_dx_early (~56 KB at P64 N128: four blocks per SM by shared
// memory): region RA first holds the state product's operands B_s and G_{c+1} (bf16), then one
// l-tile buffer of the pair loop (C Bᵀ tile, dy_l); RB is the other l-tile buffer; Acs of the
// chunk, its tile-relative decays, dt of the own rows. (The inter term comes from
// ssd_bwd_dbc_smem, so no C_l or H_c here.)
template <typename Carver>
void CarveDxReg(Carver& cv, const Dims& d) {
  const int buf = kTile * kLdCb + kTile * (d.P + 8);
  const int region = std::max((kTile + d.P) * (d.N + 8), buf);
  cv.template take<bf16>(region);  // RA
  cv.template take<bf16>(buf);     // RB
  cv.template take<float>(2 * d.Q);   // acs, erel
  cv.template take<float>(kTile);     // dt (own rows)
  cv.template take<double>(kWarps);   // block reduction
}

// grid (NC·Q/64, H, B): dx for one 64-row s-tile of one (b, c, h) (same math as
// ssd_chunk_scan_bwd_dx): dX̄_s = e^{Acs_last − Acs_s} B_s G_{c+1}ᵀ + Σ_{l ≥ s} M_ls dy_l with
// M = (C Bᵀ)ᵀ ∘ decay ∘ mask; dx = dt dX̄ + D dy. Besides dx it writes the ∂Acs terms that need
// this kernel's products: per own row, own[t] = −dl_t (dl: dt_t x_t·(state part of dX̄_t), the
// row's term as s) into dacs_own [B, H, NC·Q], and x·dX̄ into ddtx [B, H, NC·Q]; per block
// dd_part[3][B, NC, H, Q/64]: Σ dy·x (∂D), A·∂A of those terms (difference form), Σ dl (the +dl
// of the decay to the chunk's last token). The pair terms (x_s·dy_l)·M come from
// ssd_bwd_dcb_reg, which forms x·dyᵀ per head anyway; the inter terms (the row as l) from
// ssd_bwd_dbc_smem's dC blocks, which form e^{Acs_l} dy_l H_c per head anyway (session 5:
// forming them here cost C_l and H_c loads, 72 KB and 3 blocks/SM: fwd+bwd 2-3.5% slower; in
// the chunk-state backward, +160 µs there).
// Phases: RA is loaded with B_s and G_{c+1} while RB receives the first l-tile's cp.async group
// (C Bᵀ tile st, dy_st), so its round trip overlaps the state product (helper ssd10; session
// 8's form issued it after the product); state product (RA); RA then receives l-tile st+1; the
// pair loop alternates RB, RA with one barrier per tile. Also (below) the own rows of x for the
// state term are loaded into registers in the prologue (P <= 64), and the own rows of x and dy
// for the epilogue travel by cp.async into RA's unused tail (P64, N >= 128), so no synchronous
// global load is left on the block's path there.
template <int kP>
__global__ void __launch_bounds__(kThreads, 4) ssd_chunk_scan_bwd_dx_early(
    Dims d, const bf16* x, const bf16* Bm, const float* Dskip,
    const float* saved, const bf16* dy, const bf16* g_bf, bf16* dx, float* dacs_own,
    float* ddtx, double* dd_part) {
  extern __shared__ __align__(128) char smem[];
  constexpr int NP = kP / 8;
  const int tiles = d.Q / kTile;
  const int c = blockIdx.x / tiles, st = blockIdx.x % tiles, h = blockIdx.y, b = blockIdx.z;
  const int g = h / d.hpg;
  const int c0 = c * d.Q;
  const int len = min(d.Q, d.S - c0);
  const int nT = (len + kTile - 1) / kTile;
  if (st >= nT) return;
  const int s0 = st * kTile, ts0 = c0 + s0, sv = min(kTile, d.S - ts0);
  const int64_t bh = static_cast<int64_t>(b) * d.H + h;
  const int ldn = d.N + 8, ldp = kP + 8;
  const int tbuf = kTile * kLdCb + kTile * ldp;
  const int region = max((kTile + kP) * ldn, tbuf);
  Carve cv{smem};
  bf16* RA = cv.take<bf16>(region);
  bf16* RB = cv.take<bf16>(tbuf);
  float* acs = cv.take<float>(2 * d.Q);
  float* erel = acs + d.Q;
  float* dts = cv.take<float>(kTile);
  double* red = cv.take<double>(kWarps);
  bf16* Bs = RA;
  bf16* Gs = RA + kTile * ldn;

  const int64_t bc_stride = d.ldbc;
  const int64_t x_stride = d.ldx;  // x, dx
  const int64_t y_stride = d.ldy;  // dy
  const bf16* Bb = Bm + BcRow(d, b, 0) + static_cast<int64_t>(g) * d.N;
  const bf16* xb = x + XRow(d, b, 0) + static_cast<int64_t>(h) * d.P;
  const bf16* dyb = dy + YRow(d, b, 0) + static_cast<int64_t>(h) * d.P;
  bf16* dxb = dx + XRow(d, b, 0) + static_cast<int64_t>(h) * d.P;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, gq = lane / 4, tq = lane % 4;
  const int r0 = warp * 16 + gq;  // own-tile rows r0, r0 + 8

  LoadRowsAsync(Bs, ldn, Bb + ts0 * bc_stride, bc_stride, sv, d.N);
  CpRows(Gs, ldn, g_bf + (bh * d.NC + c) * d.PN, d.N, kP, kP, d.N);
  CpAsyncCommit();
  // C Bᵀ tile (l-tile lt, own s-tile st) starts at row c0 + lt·64, column s0.
  const bf16* cbs = CbPtr(d, saved, b, g) + static_cast<int64_t>(c0) * d.Q + s0;
  const float* acs_g = AcsPtr(d, saved, b, h) + c0;
  const float* dt_g = DtPtr(d, saved, b);
  auto issue = [&](int lt, bf16* buf) {
    const int tl0 = c0 + lt * kTile, lv = min(kTile, d.S - tl0);
    CpRows(buf, kLdCb, cbs + static_cast<int64_t>(lt * kTile) * d.Q, d.Q, kTile, kTile, kTile);
    LoadRowsAsync(buf + kTile * kLdCb, ldp, dyb + tl0 * y_stride, y_stride, lv, kP);
    CpAsyncCommit();
  };
  // P <= 64: the own rows of x for the state term's dl go into registers here, so that their
  // round trip overlaps B_s / G_{c+1}'s instead of following the state product (at P128 the 32
  // extra registers spilled 160 bytes, so wider heads read x after the product).
  constexpr bool kPreX = kP <= 64;
  const float dsk = Dskip != nullptr ? Dskip[h] : 0.f;  // (D for the epilogue)
  __nv_bfloat162 xpre0[kPreX ? NP : 1], xpre1[kPreX ? NP : 1];
  issue(st, RB);  // RB is unused until the pair loop
  if constexpr (kPreX) {
    const int q0 = r0 < sv ? r0 : 0, q1 = r0 + 8 < sv ? r0 + 8 : 0;
    const bf16* p0 = xb + (ts0 + q0) * x_stride + 2 * tq;
    const bf16* p1 = xb + (ts0 + q1) * x_stride + 2 * tq;
#pragma unroll
    for (int j = 0; j < NP; ++j) {
      xpre0[j] = *reinterpret_cast<const __nv_bfloat162*>(p0 + 8 * j);
      xpre1[j] = *reinterpret_cast<const __nv_bfloat162*>(p1 + 8 * j);
    }
  }
  // erel[q] = e^{Acs_q − Acs at q's 64-row tile start} (<= 1): with the row factor
  // e^{Acs_l0 − Acs_s} (<= 1 for s before the l-tile) it splits the decay of an off-diagonal
  // tile pair into a column and a row factor, so those tiles need no exponential per element.
  for (int i = threadIdx.x; i < d.Q; i += kThreads) {
    const float a = acs_g[i];
    acs[i] = a;
    erel[i] = __expf(a - acs_g[i & ~(kTile - 1)]);
  }
  if (threadIdx.x < kTile) {
    const int r = threadIdx.x;
    dts[r] = r < sv ? dt_g[static_cast<int64_t>(ts0 + r) * d.H + h] : 0.f;
  }
  CpAsyncWait<1>();  // B_s, G_{c+1} (l-tile st may still be in flight)
  __syncthreads();

  const float acs_last = acs[d.Q - 1];
  const float as0 = acs[s0 + r0], as1 = acs[s0 + r0 + 8];
  const float dt0 = dts[r0], dt1 = dts[r0 + 8];
  const bool ok0 = r0 < sv, ok1 = r0 + 8 < sv;
  const bf16* xr0 = xb + (ts0 + (ok0 ? r0 : 0)) * x_stride;
  const bf16* xr1 = xb + (ts0 + (ok1 ? r0 + 8 : 0)) * x_stride;
  const bf16* yr0 = dyb + (ts0 + (ok0 ? r0 : 0)) * y_stride;
  const bf16* yr1 = dyb + (ts0 + (ok1 ? r0 + 8 : 0)) * y_stride;

  // State term: dX̄ = w_s (B_s Gᵀ), w_s = e^{Acs_last − Acs_s}; dl_s = dt_s x_s·dX̄_s (x of the
  // own rows from the prologue's registers, or at P > 64 from global memory).
  float acc[NP][4];
  ZeroAcc(acc);
  WarpMmaSS<NP, true>(acc, Bs + warp * 16 * ldn, ldn, Gs, ldn, d.N);
  float dl0 = 0.f, dl1 = 0.f;
  {
    const float w0 = expf(acs_last - as0), w1 = expf(acs_last - as1);
#pragma unroll
    for (int j = 0; j < NP; ++j) {
      const int p = 8 * j + 2 * tq;
      acc[j][0] *= w0;
      acc[j][1] *= w0;
      acc[j][2] *= w1;
      acc[j][3] *= w1;
      float2 x0, x1;
      if constexpr (kPreX) {
        x0 = __bfloat1622float2(xpre0[j]);
        x1 = __bfloat1622float2(xpre1[j]);
      } else {
        x0 = Bf2(xr0 + p);
        x1 = Bf2(xr1 + p);
      }
      dl0 += acc[j][0] * x0.x + acc[j][1] * x0.y;
      dl1 += acc[j][2] * x1.x + acc[j][3] * x1.y;
    }
    // The shuffles run on every lane (full mask); rows past the sequence end are zeroed after.
    dl0 = QuadSum(dl0) * dt0;
    dl1 = QuadSum(dl1) * dt1;
    dl0 = ok0 ? dl0 : 0.f;
    dl1 = ok1 ? dl1 : 0.f;
  }
  __syncthreads();  // RA retired (B_s, G read by every warp)
  // P64, N >= 128: the own rows of x and dy for the epilogue go by cp.async into the
  // part of RA that the pair loop never uses (RA + tbuf: 2·64·64 bf16 fit exactly there at N128),
  // unpadded with 16-byte chunks XOR-swizzled by row (conflict-free reads of the accumulator
  // layout's columns); they join tile st+1's group (or form their own), so the epilogue reads
  // shared memory instead of waiting for a global round trip.
  bf16* own_x = RA + tbuf;
  bf16* own_dy = own_x + kTile * kP;
  const bool own_smem = kP == 64 && region - tbuf >= 2 * kTile * kP;
  if (own_smem) {
    for (int i = threadIdx.x; i < 2 * kTile * (kP / 8); i += kThreads) {
      const int which = i / (kTile * (kP / 8)), k2 = i % (kTile * (kP / 8));
      const int r = k2 / (kP / 8), ch = k2 % (kP / 8);
      const bool ok = r < sv;
      const bf16* src = (which ? dyb : xb) + (ts0 + (ok ? r : 0)) * (which ? y_stride : x_stride) + 8 * ch;
      bf16* dst = (which ? own_dy : own_x) + r * kP + 8 * (ch ^ (r & 7));
      const unsigned sm = static_cast<unsigned>(__cvta_generic_to_shared(dst));
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(sm), "l"(src),
                   "r"(ok ? 16 : 0));
    }
  }
  if (st + 1 < nT) {
    issue(st + 1, RA);
  } else {
    CpAsyncCommit();
  }

  // Pair loop over l-tiles st..nT−1, buffers RB (even steps) and RA (odd). One barrier per
  // tile: publishes tile lt, retires the other buffer (tile lt−1), which then receives tile
  // lt+1 (tile st+1 is already in flight at the first step, so that step waits for all but the
  // newest group and issues none).
  for (int lt = st; lt < nT; ++lt) {
    bf16* cur = ((lt - st) & 1) ? RA : RB;
    // At lt == st the newest group (tile st+1 and the own rows, or the own rows alone) may
    // stay in flight; the last tile's step waits for everything, the own rows included.
    if (lt == st && st + 1 < nT) {
      CpAsyncWait<1>();
    } else {
      CpAsyncWait<0>();
    }
    __syncthreads();
    if (lt + 1 < nT && lt != st) issue(lt + 1, ((lt - st) & 1) ? RB : RA);
    const bf16* dYl = cur + kTile * kLdCb;
    const int l0 = lt * kTile;
    float s1[8][4];
    {
      unsigned cbf[4][4];
      LoadTileA<true>(cbf, cur);  // B_s·C_l = (C Bᵀ)ᵀ
      AToAcc<8>(cbf, s1);
    }
    // M = (B_s·C_l) e^{Acs_l − Acs_s}, masked (l >= s) on the diagonal tile; off the diagonal
    // the decay is the column factor erel_l times the row factor e^{Acs_l0 − Acs_s}.
    if (lt == st) {
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int l = 8 * j + 2 * tq + (e & 1), row = r0 + 8 * (e >> 1);
          const float as = e < 2 ? as0 : as1;
          s1[j][e] = l >= row ? s1[j][e] * __expf(fminf(acs[l0 + l] - as, 0.f)) : 0.f;
        }
    } else {
      const float ref = acs[l0];
      const float f0 = __expf(ref - as0), f1 = __expf(ref - as1);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const float2 er = *reinterpret_cast<const float2*>(erel + l0 + 8 * j + 2 * tq);
        s1[j][0] *= er.x * f0;
        s1[j][1] *= er.y * f0;
        s1[j][2] *= er.x * f1;
        s1[j][3] *= er.y * f1;
      }
    }
    unsigned fa[4][4];
    AccToA(s1, fa);
    WarpMmaRS<NP, 4, false>(acc, fa, dYl, ldp);
  }

  // dx = dt dX̄ + D dy; x·dX̄ per row; Σ x·dy.
  float dot_d = 0.f;
#pragma unroll
  for (int e2 = 0; e2 < 2; ++e2) {
    const int row = r0 + 8 * e2;
    const float dtr = e2 ? dt1 : dt0;
    float dot_x = 0.f;
    if (row < sv) {
      const bf16* xr = e2 ? xr1 : xr0;
      const bf16* yr = e2 ? yr1 : yr0;
      bf16* dxr = dxb + (ts0 + row) * x_stride;
#pragma unroll
      for (int j = 0; j < NP; ++j) {
        const int p = 8 * j + 2 * tq;
        float2 xv, dyv;
        if (own_smem) {
          const int o = row * kP + 8 * (j ^ (row & 7)) + 2 * tq;
          xv = Bf2(own_x + o);
          dyv = Bf2(own_dy + o);
        } else {
          xv = Bf2(xr + p);
          dyv = Bf2(yr + p);
        }
        const float g0 = acc[j][2 * e2], g1 = acc[j][2 * e2 + 1];
        dot_x += xv.x * g0 + xv.y * g1;
        dot_d += xv.x * dyv.x + xv.y * dyv.y;
        *reinterpret_cast<__nv_bfloat162*>(dxr + p) =
            __floats2bfloat162_rn(dtr * g0 + dsk * dyv.x, dtr * g1 + dsk * dyv.y);
      }
    }
    dot_x = QuadSum(dot_x);
    if (tq == 0 && row < sv) ddtx[bh * d.NC * d.Q + ts0 + row] = dot_x;
  }
  // The own rows' ∂Acs terms (rows past the sequence end hold zeros) and their A·∂A share in
  // the difference form: dl at the chunk's last token and −dl at s (weight Acs_last − Acs_s).
  // Each quad's four lanes hold the same row values.
  double da_loc = 0.0, dl_loc = 0.0;
  if (tq == 0) {
    float* own = dacs_own + bh * d.NC * d.Q + ts0;
    own[r0] = -dl0;
    own[r0 + 8] = -dl1;
    da_loc = static_cast<double>(dl0) * (acs_last - as0) +
             static_cast<double>(dl1) * (acs_last - as1);
    dl_loc = static_cast<double>(dl0) + dl1;
  }
  const double s_d = BlockSumDouble(static_cast<double>(dot_d), red);  // has barriers
  const double s_a = BlockSumDouble(da_loc, red);
  const double s_l = BlockSumDouble(dl_loc, red);
  if (threadIdx.x == 0) {
    const int64_t n = static_cast<int64_t>(d.B) * d.NC * d.H * tiles;
    const int64_t i = ((static_cast<int64_t>(b) * d.NC + c) * d.H + h) * tiles + st;
    dd_part[i] = s_d;
    dd_part[n + i] = s_a;  // A·∂A partial
    dd_part[2 * n + i] = s_l;
  }
}

// ssd_bwd_dx_wgc (helper ssdx13): bwd dx on wgmma, one block per chunk; the default at P64,
// N 64 / 128, Q <= 256 (LaunchDxReg), the early kernel above everywhere else.
#include "kernels/cuda/ssd_bwd_wgmma.cuh"

// grid (NC, H, B), block kThreads: sums the ∂Acs terms of a chunk in a fixed order — the tile
// pairs' row sums (+, tokens as l) and column sums (−, tokens as s) from ssd_bwd_dcb_reg, the
// own-row terms from ssd_chunk_scan_bwd_dx_early, the inter terms from ssd_bwd_dbc_smem's dC
// blocks — adds the state-passing decay term,
// reverse-cumsums into ∂a, and writes d dt_raw and the per-(b, c, h) partials of ∂A, ∂dt_bias,
// ∂D (the tail of ssd_chunk_scan_bwd_dx, unchanged).
// Its global loads are issued together, not one dependent round trip at a time: the scalars
// thread 0 sums (Σ dl, the <G, H_c> partials, the ∂D / A·∂A s-tile partials, the tile pairs'
// A·∂A, Acs_last; up to 4 + 32 + 4 + 4 + 10 + 1 values) go to shared memory from threads 0..64
// at the start, overlapping the ∂Acs gathering; each token's pair / inter partials are loaded by
// fully unrolled, predicated loops (Q <= 256: at most 4 tiles, N <= 256: at most 4 slices)
// before they are added; dt_raw and x·dX̄ of the thread's two tokens are loaded at the start.
// (Helper ssd11's GYRE_SSD_DACS_FINISH=pf, the only form since session 9's call: bitwise the same
// as the serial-load kernel it replaced; H100 fwd+bwd 1.695 → 1.683 ms at B16 S2048 H24, 2.026 →
// 2.024 ms at B8 S2048 H64, alone.)
__global__ void __launch_bounds__(kThreads) ssd_bwd_dacs_finish(
    Dims d, const float* dt_raw, const float* a_log, const float* dt_bias, const float* saved,
    const float* dacs_pair, const float* dacs_own, const float* ddtx, const double* dd_part,
    const double* dpair, const float* inter_part, int inter_parts, const float* ddecay,
    int ddecay_parts, float* ddt, double* part) {
  constexpr int kMaxT = 4, kMaxQ = 32;  // tiles per chunk (Q <= 256), prefetched ddecay parts
  static_assert(2 * kThreads >= 256, "two tokens per thread cover a chunk of Q <= 256");
  __shared__ float dacs[256];
  __shared__ double red[3 * kWarps];
  __shared__ float dacs_decay;  // e^{Acs_last} <G_{c+1}, H_c> (thread 0 writes, thread 0 reads)
  __shared__ double pre_dl[kMaxT], pre_sd[kMaxT], pre_sa[kMaxT], pre_pair[kMaxT * (kMaxT + 1) / 2];
  __shared__ float pre_q[kMaxQ], pre_alast;
  const int c = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int tiles = d.Q / kTile, pairs = tiles * (tiles + 1) / 2;
  const int c0 = c * d.Q;
  const int len = min(d.Q, d.S - c0);
  const int nT = (len + kTile - 1) / kTile;
  const int64_t bh = static_cast<int64_t>(b) * d.H + h;
  const int64_t n = static_cast<int64_t>(d.B) * d.NC * d.H;
  const int64_t bch = (static_cast<int64_t>(b) * d.NC + c) * d.H + h;
  const float* acs_g = AcsPtr(d, saved, b, h) + c0;
  const float* pp = dacs_pair + (bh * d.NC + c) * pairs * 2 * kTile;
  const float* own = dacs_own + bh * d.NC * d.Q + c0;
  const float* q = ddecay + (bh * d.NC + c) * ddecay_parts;
  {
    const int i = threadIdx.x;
    if (i < kMaxT) {
      if (i < nT) pre_dl[i] = dd_part[2 * n * tiles + bch * tiles + i];
    } else if (i < 2 * kMaxT) {
      if (i - kMaxT < nT) pre_sd[i - kMaxT] = dd_part[bch * tiles + i - kMaxT];
    } else if (i < 3 * kMaxT) {
      if (i - 2 * kMaxT < nT) pre_sa[i - 2 * kMaxT] = dd_part[n * tiles + bch * tiles + i - 2 * kMaxT];
    } else if (i < 3 * kMaxT + kMaxT * (kMaxT + 1) / 2) {
      const int p = i - 3 * kMaxT;
      if (p < nT * (nT + 1) / 2) pre_pair[p] = dpair[bch * pairs + p];
    } else if (i >= 32 && i < 32 + kMaxQ) {
      if (i - 32 < ddecay_parts) pre_q[i - 32] = q[i - 32];
    } else if (i == 32 + kMaxQ) {
      pre_alast = acs_g[d.Q - 1];
    }
  }
  // The thread's tokens of the ddt pass (t = threadIdx.x, threadIdx.x + kThreads), loaded now.
  const float* dx_dot = ddtx + bh * d.NC * d.Q + c0;
  float raw_v[2] = {0.f, 0.f}, dot_v[2] = {0.f, 0.f};
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    const int t = threadIdx.x + k * kThreads;
    if (t < len) {
      raw_v[k] = dt_raw[(static_cast<int64_t>(b) * d.S + c0 + t) * d.H + h];
      dot_v[k] = dx_dot[t];
    }
  }
  double inter_da = 0.0;
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    const int t = threadIdx.x + k * kThreads;
    if (t >= d.Q) break;
    const int T = t / kTile, r = t % kTile;
    float v = 0.f;
    if (T < nT) {
      float iv[4], pr[kMaxT], pc[kMaxT];
#pragma unroll
      for (int sl = 0; sl < 4; ++sl) {
        iv[sl] = sl < inter_parts
                     ? inter_part[((static_cast<int64_t>(sl) * d.B + b) * d.H + h) * d.NC * d.Q + c0 + t]
                     : 0.f;
      }
#pragma unroll
      for (int s2 = 0; s2 < kMaxT; ++s2) {
        pr[s2] = s2 <= T ? pp[(T * (T + 1) / 2 + s2) * 2 * kTile + r] : 0.f;
        pc[s2] = s2 >= T && s2 < nT ? pp[(s2 * (s2 + 1) / 2 + T) * 2 * kTile + kTile + r] : 0.f;
      }
      const float at = acs_g[t], ow = own[t];
      float inter = 0.f;
#pragma unroll
      for (int sl = 0; sl < 4; ++sl) {
        if (sl < inter_parts) inter += iv[sl];
      }
      inter_da += static_cast<double>(inter) * at;
      v = ow + inter;
#pragma unroll
      for (int s2 = 0; s2 < kMaxT; ++s2) {
        if (s2 <= T) v += pr[s2];
      }
#pragma unroll
      for (int l = 0; l < kMaxT; ++l) {
        if (l >= T && l < nT) v -= pc[l];
      }
    }
    dacs[t] = v;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double dl = 0.0;  // Σ dl of the chunk: each state term's +dl at the last token
    for (int s2 = 0; s2 < nT; ++s2) dl += pre_dl[s2];
    float s = 0.f;
    for (int i = 0; i < ddecay_parts; ++i) s += i < kMaxQ ? pre_q[i] : q[i];
    dacs[d.Q - 1] += static_cast<float>(dl) + expf(pre_alast) * s;
    dacs_decay = expf(pre_alast) * s;
  }
  __syncthreads();
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x, seg = d.Q / 32;
    float s = 0.f;
    for (int i = 0; i < seg; ++i) s += dacs[lane * seg + i];
    float suffix = s;
    for (int off = 1; off < 32; off <<= 1) {
      const float o = __shfl_down_sync(0xffffffffu, suffix, off);
      if (lane + off < 32) suffix += o;
    }
    float run = suffix - s;
    for (int i = seg - 1; i >= 0; --i) {
      run += dacs[lane * seg + i];
      dacs[lane * seg + i] = run;
    }
  }
  __syncthreads();
  const float A = -expf(a_log[h]);
  const float bias = dt_bias[h];
  double db_acc = 0.0;
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    const int t = threadIdx.x + k * kThreads;
    if (t < len) {
      const int64_t idx = (static_cast<int64_t>(b) * d.S + c0 + t) * d.H + h;
      const float dda = dacs[t];
      const float total = dot_v[k] + A * dda;
      const float draw = DdtRaw(d, total, raw_v[k] + bias);
      ddt[idx] = draw;
      db_acc += draw;
    }
  }
  const double s_b = BlockSumDouble(db_acc, red + kWarps);
  const double s_i = BlockSumDouble(inter_da, red + 2 * kWarps);
  if (threadIdx.x == 0) {
    const int64_t i = bch;
    double s_d = 0.0, s_a = 0.0;
    for (int s2 = 0; s2 < nT; ++s2) s_d += pre_sd[s2];
    for (int s2 = 0; s2 < nT; ++s2) s_a += pre_sa[s2];
    for (int p = 0; p < nT * (nT + 1) / 2; ++p) s_a += pre_pair[p];
    s_a += s_i;
    s_a += static_cast<double>(dacs_decay) * pre_alast;
    s_a /= static_cast<double>(A);
    part[i] = s_a;
    part[n + i] = s_b;
    part[2 * n + i] = s_d;
  }
}

// cp.async pipeline depth of the head loop of ssd_bwd_dbc_smem: 2 with four blocks per SM
// (128 registers, 84 bytes spilled, 47 KB) beat 3 at three blocks per SM (168 registers, 66 KB):
// H200, session 8, fwd+bwd 2.133 → 2.113 ms at B8 S2048, 2.245 → 2.205 ms at B2 S8192 (1024
// blocks: 1.9 waves of 528 instead of 2.6 of 396).
constexpr int kStages = 2;
// Shared memory of ssd_bwd_dcb_reg: dy_l and x_s tiles of kDcbStages heads, each head's Acs_l,
// Acs_s, dt_s, and (double-buffered per head) the per-warp column sums and pair sums of the
// ∂Acs terms: ~41 KB at P64, and at most 128 registers, so that four blocks fit per SM.
constexpr int kDcbStages = 2;

template <typename Carver>
void CarveDcbReg(Carver& cv, const Dims& d) {
  cv.template take<bf16>(2 * kDcbStages * kTile * (d.P + 8));  // dY[kDcbStages], X[kDcbStages]
  cv.template take<float>(3 * kDcbStages * kTile);             // al, as, ds per stage
  cv.template take<float>(2 * kWarps * kTile);                 // column sums, per warp, 2 heads
  cv.template take<float>(2 * kWarps);                         // pair sums, per warp, 2 heads
}

// Head h's small arrays of tile pair (l0, s0) of the chunk from c0 into slot buf (ssd_bwd_dcb_reg,
// ssd_bwd_dcb_wg; threads 0..63, row r each, through cp.async): Acs_l, Acs_s (padded tokens carry
// the last value) and dt_s (dt_g: row b's dt; zero past the sv valid rows).
__device__ __forceinline__ void DcbIssueSmall(float* al, float* as, float* ds, int buf,
                                              const Dims& d, const float* saved, const float* dt_g,
                                              int b, int h, int c0, int l0, int s0, int sv) {
  if (threadIdx.x < kTile) {
    const int r = threadIdx.x;
    const float* acs_h = AcsPtr(d, saved, b, h) + c0;
    CpAsync4(al + buf * kTile + r, acs_h + l0 + r, true);
    CpAsync4(as + buf * kTile + r, acs_h + s0 + r, true);
    CpAsync4(ds + buf * kTile + r,
             dt_g + static_cast<int64_t>(c0 + s0 + min(r, sv - 1)) * d.H + h, r < sv);
  }
}

// Head h's ∂Acs partials of tile pair `pair` (ssd_bwd_dcb_reg, ssd_bwd_dcb_wg), after the barrier
// that follows its compute step: threads 0..63 one column sum each (warps 0..kWarps−1 of colbuf
// half pb, in order) into the s side of its dacs_pair row (pair_out: this (b, c)'s rows), thread 64
// the pair sum (pairbuf half pb, double) into dpair.
__device__ __forceinline__ void DcbFlushHead(const float* colbuf, const float* pairbuf, int pb,
                                             float* pair_out, double* dpair, const Dims& d, int b,
                                             int c, int h, int pairs, int pair) {
  if (threadIdx.x < kTile) {
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) v += colbuf[(pb * kWarps + w) * kTile + threadIdx.x];
    pair_out[(static_cast<int64_t>(h) * d.NC * pairs + pair) * 2 * kTile + kTile + threadIdx.x] =
        v;
  } else if (threadIdx.x == kTile) {
    double v = 0.0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) v += pairbuf[pb * kWarps + w];
    dpair[((static_cast<int64_t>(b) * d.NC + c) * d.H + h) * pairs + pair] = v;
  }
}

// grid (NC·pairs, G, B), pairs = (Q/64)(Q/64+1)/2 tile pairs (l-tile ≥ s-tile). Per head h of
// group g, in registers: v[l, s] = dt_s e^{Acs_l − Acs_s} (dy_l·x_s) (l ≥ s), heads
// double-buffered through cp.async. Two results from the same v:
//  - the head-summed dCB[l, s] = Σ_h v of the 64×64 tile (for dB and dC), written fp32 to
//    dcb [split, B, NC, G, Q, Q] (one partial sum per head split, added in order by
//    ssd_bwd_dbc_smem; tiles above the diagonal are not written and never read);
//  - the intra-chunk ∂Acs terms m2[l, s] = v·(C_l·B_s) of head h (C Bᵀ from `saved`, the same
//    tile for every head of the group): +m2 at l, −m2 at s. Per (b, h, c, pair) their row sums
//    (l side) and column sums (s side) go to dacs_pair [B, H, NC, pairs, 2, 64], and Σ
//    m2·(Acs_l − Acs_s) (A·∂A in the difference form) to dpair [B, NC, H, pairs] (double);
//    ssd_bwd_dacs_finish sums them in a fixed order. (Until session 5 bwd dx recomputed x·dyᵀ
//    per head for these terms and held it beside its P-wide accumulator: 195 registers.)
__global__ void __launch_bounds__(kThreads, 4) ssd_bwd_dcb_reg(Dims d, const bf16* x,
                                                               const bf16* dy, const float* saved,
                                                               float* dcb, float* dacs_pair,
                                                               double* dpair, int split) {
  extern __shared__ __align__(128) char smem[];
  const int tiles = d.Q / kTile, pairs = tiles * (tiles + 1) / 2;
  const int part = blockIdx.x % split, cp = blockIdx.x / split;
  const int c = cp / pairs, g = blockIdx.y, b = blockIdx.z;
  const int pair = cp % pairs;
  // This block's heads: nh of the group's, from h_first (a head split fills the machine: at
  // B8 S2048 G1 the 640 unsplit blocks are 1.2 waves of 4 per SM).
  const int nh = d.hpg / split, h_first = g * d.hpg + part * nh;
  int lt, st;
  TilePairOf(pair, lt, st);
  const int c0 = c * d.Q;
  const int len = min(d.Q, d.S - c0);
  const int nT = (len + kTile - 1) / kTile;
  if (lt >= nT) return;
  const int l0 = lt * kTile, s0 = st * kTile;
  const int lv = min(kTile, len - l0), sv = min(kTile, len - s0);
  const int ldp = d.P + 8;
  Carve cv{smem};
  bf16* Y0 = cv.take<bf16>(2 * kDcbStages * kTile * ldp);
  bf16* X0 = Y0 + kDcbStages * kTile * ldp;
  float* al = cv.take<float>(3 * kDcbStages * kTile);
  float* as = al + kDcbStages * kTile;
  float* ds = as + kDcbStages * kTile;
  float* colbuf = cv.take<float>(2 * kWarps * kTile);
  float* pairbuf = cv.take<float>(2 * kWarps);
  const float* dt_g = DtPtr(d, saved, b);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, gq = lane / 4, tq = lane % 4;
  const int r0 = warp * 16 + gq;

  auto issue = [&](int hh, int buf) {
    const int h = h_first + hh;
    LoadRowsAsync(Y0 + buf * kTile * ldp, ldp,
                  dy + YRow(d, b, c0 + l0) + static_cast<int64_t>(h) * d.P, d.ldy, lv, d.P);
    LoadRowsAsync(X0 + buf * kTile * ldp, ldp,
                  x + XRow(d, b, c0 + s0) + static_cast<int64_t>(h) * d.P, d.ldx, sv, d.P);
    DcbIssueSmall(al, as, ds, buf, d, saved, dt_g, b, h, c0, l0, s0, sv);
    CpAsyncCommit();
  };

  // The C Bᵀ tile (l-tile lt, s-tile st) in the accumulator layout, bf16 pairs: cb[j][e2] holds
  // columns 8j + 2tq, +1 of row r0 + 8·e2.
  unsigned cb[8][2];
  {
    const bf16* cbt = CbPtr(d, saved, b, g) + static_cast<int64_t>(c0 + l0 + r0) * d.Q + s0;
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e2 = 0; e2 < 2; ++e2)
        cb[j][e2] = *reinterpret_cast<const unsigned*>(cbt + static_cast<int64_t>(8 * e2) * d.Q +
                                                       8 * j + 2 * tq);
  }
  // Head hh's column sums (4 warps, fixed order) and pair sum, after the barrier that follows
  // its compute step: threads 0..63 one column each, thread 64 the pair sum.
  float* pair_out = dacs_pair + ((static_cast<int64_t>(b) * d.H) * d.NC + c) * pairs * 2 * kTile;
  auto flush = [&](int hh) {
    const int h = h_first + hh, pb = hh & 1;
    DcbFlushHead(colbuf, pairbuf, pb, pair_out, dpair, d, b, c, h, pairs, pair);
  };

  float acc[8][4];
  ZeroAcc(acc);
  // kDcbStages-deep pipeline, one barrier per head: groups are committed even when empty so that
  // wait_group<kDcbStages−2> always means "head hh has landed"; the barrier then also retires the
  // buffer of head hh−1, which receives head hh+kDcbStages−1, and publishes head hh−1's column
  // sums (flushed right after; colbuf of head hh−1 is rewritten only after the next barrier).
  RingPrologue<kDcbStages>(nh, issue);
  for (int hh = 0; hh < nh; ++hh) {
    const int buf = hh % kDcbStages;
    RingStep<kDcbStages>(hh, nh, issue);
    if (hh > 0) flush(hh - 1);
    float s2[8][4];
    ZeroAcc(s2);
    WarpMmaSS<8, true>(s2, Y0 + buf * kTile * ldp + warp * 16 * ldp, ldp, X0 + buf * kTile * ldp,
                       ldp, d.P);
    const float* alb = al + buf * kTile;
    const float* asb = as + buf * kTile;
    const float* dsb = ds + buf * kTile;
    const float al0 = alb[r0], al1 = alb[r0 + 8];
    const float ref = alb[0];
    // m2 = v·CB: row partials (this thread's columns), column partials (this thread's two rows),
    // and Σ m2·(Acs_l − Acs_s). Off the diagonal every s precedes l0, so that sum is formed as
    // Σ_l (Acs_l − Acs_l0)·rowsum_l − Σ_s (Acs_s − Acs_l0)·colsum_s: both weights are at most
    // the pair's own |Acs_l − Acs_s| (no amplification of fp32 residues; see "∂A in the
    // difference form"). The diagonal tile keeps the per-element form.
    float rp0 = 0.f, rp1 = 0.f, dp = 0.f;
    float csum[8][2];
    if (lt > st) {
      // Off-diagonal pair: e^{Acs_l − Acs_s} = e^{Acs_l − Acs_l0} · e^{Acs_l0 − Acs_s}, both
      // <= 1: 2 row + 16 column exponentials per thread, not 32.
      const float rf0 = __expf(al0 - ref), rf1 = __expf(al1 - ref);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const float2 cb0 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&cb[j][0]));
        const float2 cb1 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&cb[j][1]));
#pragma unroll
        for (int c2 = 0; c2 < 2; ++c2) {
          const int col = 8 * j + 2 * tq + c2;
          const float cf = dsb[col] * __expf(ref - asb[col]);
          const float v0 = s2[j][c2] * cf * rf0, v1 = s2[j][2 + c2] * cf * rf1;
          acc[j][c2] += v0;
          acc[j][2 + c2] += v1;
          const float m0 = v0 * (c2 ? cb0.y : cb0.x), m1 = v1 * (c2 ? cb1.y : cb1.x);
          rp0 += m0;
          rp1 += m1;
          csum[j][c2] = m0 + m1;
        }
      }
      dp = (al0 - ref) * rp0 + (al1 - ref) * rp1;
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const float2 cb0 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&cb[j][0]));
        const float2 cb1 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&cb[j][1]));
        csum[j][0] = 0.f;
        csum[j][1] = 0.f;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = 8 * j + 2 * tq + (e & 1), row = r0 + 8 * (e >> 1);
          const float a = e < 2 ? al0 : al1;
          const float asc = asb[col];
          const float v =
              col <= row ? s2[j][e] * dsb[col] * __expf(fminf(a - asc, 0.f)) : 0.f;
          acc[j][e] += v;
          const float m = v * (e == 0 ? cb0.x : e == 1 ? cb0.y : e == 2 ? cb1.x : cb1.y);
          if (e < 2) {
            rp0 += m;
          } else {
            rp1 += m;
          }
          csum[j][e & 1] += m;
          dp = fmaf(m, a - asc, dp);
        }
      }
    }
    // Row sums (l side): the quad holds a row's 64 columns.
    rp0 = QuadSum(rp0);
    rp1 = QuadSum(rp1);
    {
      const int h = h_first + hh;
      float* rows = pair_out + (static_cast<int64_t>(h) * d.NC * pairs + pair) * 2 * kTile;
      if (tq == 0) {
        rows[r0] = rp0;
        rows[r0 + 8] = rp1;
      }
    }
    // Column sums over the warp's 16 rows (the 8 lanes of equal tq) as a transpose-reduce
    // (8 + 4 + 2 shuffles), ending with the sums of columns 8·gq + 2·tq + {0, 1}.
    {
      float w8[8];
      const bool b2 = (gq & 4) != 0, b1 = (gq & 2) != 0, b0 = (gq & 1) != 0;
#pragma unroll
      for (int i = 0; i < 8; ++i) {  // value k = 2j + e1; keep k in [8·b2, 8·b2 + 8)
        const float lo = csum[i / 2][i % 2], hi = csum[4 + i / 2][i % 2];
        w8[i] = (b2 ? hi : lo) + __shfl_xor_sync(0xffffffffu, b2 ? lo : hi, 16);
      }
      float w4[4];
#pragma unroll
      for (int i = 0; i < 4; ++i)
        w4[i] = (b1 ? w8[i + 4] : w8[i]) + __shfl_xor_sync(0xffffffffu, b1 ? w8[i] : w8[i + 4], 8);
      float w2[2];
#pragma unroll
      for (int i = 0; i < 2; ++i)
        w2[i] = (b0 ? w4[i + 2] : w4[i]) + __shfl_xor_sync(0xffffffffu, b0 ? w4[i] : w4[i + 2], 4);
      const int col = 8 * gq + 2 * tq;
      *reinterpret_cast<float2*>(colbuf + ((hh & 1) * kWarps + warp) * kTile + col) =
          make_float2(w2[0], w2[1]);
      if (lt > st) dp -= (asb[col] - ref) * w2[0] + (asb[col + 1] - ref) * w2[1];
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) dp += __shfl_xor_sync(0xffffffffu, dp, off);
    if (lane == 0) pairbuf[(hh & 1) * kWarps + warp] = dp;
  }
  __syncthreads();
  flush(nh - 1);
  float* out = dcb + (((static_cast<int64_t>(part) * d.B + b) * d.NC + c) * d.G + g) * d.Q * d.Q;
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int e2 = 0; e2 < 2; ++e2) {
      const int row = r0 + 8 * e2, col = 8 * j + 2 * tq;
      *reinterpret_cast<float2*>(out + static_cast<int64_t>(l0 + row) * d.Q + s0 + col) =
          make_float2(acc[j][2 * e2], acc[j][2 * e2 + 1]);
    }
}

// grid (NC·pairs, G, B): one 64×64 tile pair of dCB: the head splits' fp32 partials summed in
// order and rounded to bf16 (the dB/dC products' operand precision), written as dCB[l, s] and
// transposed, dCBᵀ[s, l], so that ssd_bwd_dbc_smem copies either's 64×64 tile as plain rows.
__global__ void __launch_bounds__(kThreads) ssd_bwd_dcb_sum(Dims d, const float* dcb, int split,
                                                            bf16* dcb_bf) {
  __shared__ bf16 tile[kTile][kTile + 2];
  const int tiles = d.Q / kTile, pairs = tiles * (tiles + 1) / 2;
  const int c = blockIdx.x / pairs, g = blockIdx.y, b = blockIdx.z;
  // (TilePairOf's loop written out: through the helper the block index loads are ordered
  // differently in the PTX.)
  int pi = blockIdx.x % pairs, lt = 0;
  while (pi > lt) {
    pi -= lt + 1;
    ++lt;
  }
  const int st = pi;
  const int len = min(d.Q, d.S - c * d.Q);
  if (lt * kTile >= len) return;
  const int64_t n = static_cast<int64_t>(d.B) * d.NC * d.G * d.Q * d.Q;
  const int64_t base = ((static_cast<int64_t>(b) * d.NC + c) * d.G + g) * d.Q * d.Q;
  const int l0 = lt * kTile, s0 = st * kTile;
  for (int i = threadIdx.x; i < kTile * kTile / 2; i += kThreads) {
    const int r = i / (kTile / 2), cc = (i % (kTile / 2)) * 2;
    const int64_t off = base + static_cast<int64_t>(l0 + r) * d.Q + s0 + cc;
    float2 v = *reinterpret_cast<const float2*>(dcb + off);
    for (int p = 1; p < split; ++p) {
      const float2 w = *reinterpret_cast<const float2*>(dcb + p * n + off);
      v.x += w.x;
      v.y += w.y;
    }
    const __nv_bfloat162 h = __floats2bfloat162_rn(v.x, v.y);
    *reinterpret_cast<__nv_bfloat162*>(dcb_bf + off) = h;
    tile[r][cc] = h.x;
    tile[r][cc + 1] = h.y;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kTile * kTile / 2; i += kThreads) {
    const int r = i / (kTile / 2), cc = (i % (kTile / 2)) * 2;  // row s0 + r, columns l0 + cc
    __nv_bfloat162 h;
    h.x = tile[cc][r];
    h.y = tile[cc + 1][r];
    *reinterpret_cast<__nv_bfloat162*>(dcb_bf + n + base + static_cast<int64_t>(s0 + r) * d.Q +
                                       l0 + cc) = h;
  }
}

#include "kernels/cuda/ssd_dcb_wgmma.cuh"  // dCB at P 64 (helper ssdc13, session 13)

// Shared memory of ssd_bwd_dbc_smem (~47 KB at P64: four blocks per SM): kStages stages, each
// either one head's own rows of dy/x [64][P+8] + its state slice [P][72], or (dCB steps) the
// other tile's C_l/B_s slice [64][72] in the same place and the dCB tile [64][72] after it (at
// least 2·64·72 elements per stage, more than P < 64 needs otherwise); each head's Acs and dt of the own rows,
// and Acs_last; the own rows' C slice [64][72] (dC blocks, for the inter ∂Acs terms).
int DbcStageElems(const Dims& d) {
  return std::max(kTile * (d.P + 8) + d.P * 72, 2 * kTile * 72);
}
template <typename Carver>
void CarveDbcReg(Carver& cv, const Dims& d) {
  cv.template take<bf16>(kStages * DbcStageElems(d));  // per stage: A + St, or V
  cv.template take<float>(2 * kStages * kTile + 8);    // acs, dt per stage; acs_last
  cv.template take<bf16>(kTile * 72);                  // C_l slice of the own rows
}

// A 16×16k warp tile (the warp's rows at a, row-major) times B (non-transposed, b[k·ldb + n]),
// rows of A scaled by sc0 (rows gq) and sc1 (rows gq + 8) after the bf16 load, rounded to bf16
// again (the v2 kernels scaled in fp32 and rounded once: the same values).
template <int NT>
__device__ __forceinline__ void WarpMmaSSRowScaled(float (&acc)[NT][4], const bf16* a, int lda,
                                                   float sc0, float sc1, const bf16* b, int ldb,
                                                   int K) {
  const int lane = threadIdx.x % 32, q = lane / 8, r = lane % 8;
  const unsigned a0 = SmemAddr(a + (r + 8 * (q % 2)) * lda + 8 * (q / 2));
  const unsigned b0 = SmemAddr(b + (r + 8 * (q % 2)) * ldb + 8 * (q / 2));
  for (int kk = 0; kk < K; kk += 16) {
    unsigned fa[4];
    LdMatrixX4<false>(fa, a0 + kk * 2);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float sc = (i & 1) ? sc1 : sc0;
      const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&fa[i]));
      fa[i] = PackBf16(f.x * sc, f.y * sc);
    }
#pragma unroll
    for (int h = 0; h < NT / 2; ++h) {
      unsigned fb[4];
      LdMatrixX4<true>(fb, b0 + (kk * ldb + 16 * h) * 2);
      MmaBf16(acc[2 * h], fa, fb[0], fb[1]);
      MmaBf16(acc[2 * h + 1], fa, fb[2], fb[3]);
    }
  }
}

// grid (NC·Q/64, 2·G·N/64, B) (N % 64 == 0): one 64-row own tile × 64 columns of dC (first
// G·N/64 y-blocks; own = l) or dB (the rest; own = s), in one pass and bf16 directly (no head
// splits, no fp32 partials):
//   dC_l = Σ_{s-tiles ≤ own} dCB[l, s] B_s + Σ_h e^{Acs_l} dy_l H_c       (state term over (h, p))
//   dB_s = Σ_{l-tiles ≥ own} dCB[l, s]ᵀ C_l + Σ_h e^{Acs_last − Acs_s} dt_s x_s G_{c+1}
// Steps (other tiles, then heads) are double-buffered through cp.async. st_h / st_g: bf16 copies
// of H_c and G_{c+1}, [B, H, NC, P, N].
// inter_out (not null: the v3 bwd dx path): the dC blocks also write the inter-chunk ∂Acs term
// of each own row l and head h over their 64 columns of N, Σ_n C[l, n]·(e^{Acs_l} dy_l H_c)[l, n]
// = e^{Acs_l} dy_l·(C_l H_cᵀ) restricted to those columns, into inter_out [N/64, B, H, NC·Q]
// (ssd_bwd_dacs_finish sums the slices): the head's product goes to its own accumulator, which
// is dotted with C_l and then added to the running one (no difference of running sums, so a
// fast-decaying head's small term is not lost under the others').
//
// The dCB steps' A fragments (the 64×64 dCB tile) travel by cp.async in the step's own group
// into the half of the stage that a dCB step leaves unused (after the 64×72 C_l / B_s slice;
// DbcStageElems makes the stage that large at P < 64), and are read with ldmatrix (helper
// ssd10; session 8's form loaded them with 16 synchronous 4-byte global loads per thread after
// the barrier, one exposed round trip per dCB step).
__global__ void __launch_bounds__(kThreads, 4) ssd_bwd_dbc_smem(
    Dims d, const bf16* x, const bf16* Bm, const bf16* Cm, const float* saved, const bf16* dy,
    const bf16* st_g, const bf16* dcb_bf, bf16* db, bf16* dc, float* inter_out) {
  extern __shared__ __align__(128) char smem[];
  const int tiles = d.Q / kTile, nsl = d.N / 64;
  const int c = blockIdx.x / tiles, ot = blockIdx.x % tiles, b = blockIdx.z;
  const bool kDB = static_cast<int>(blockIdx.y) >= d.G * nsl;
  const int yy = kDB ? blockIdx.y - d.G * nsl : blockIdx.y;
  const int g = yy / nsl, n0 = (yy % nsl) * 64;
  const int c0 = c * d.Q;
  const int len = min(d.Q, d.S - c0);
  const int nT = (len + kTile - 1) / kTile;
  if (ot >= nT) return;
  const int o0 = ot * kTile, ov = min(kTile, len - o0);
  const int ldp = d.P + 8, ldv = 72;
  Carve cv{smem};
  const int stage_elems = max(kTile * ldp + d.P * ldv, 2 * kTile * ldv);
  bf16* stages = cv.take<bf16>(kStages * stage_elems);
  float* acsb = cv.take<float>(2 * kStages * kTile + 8);
  float* dtb = acsb + kStages * kTile;
  float* alast = dtb + kStages * kTile;
  bf16* Cown = cv.take<bf16>(kTile * 72);
  const bool inter = inter_out != nullptr && !kDB;
  // Stage buf: A at stages + buf·stage_elems, its state slice right after, V aliasing A.
  auto A_of = [&](int buf) { return stages + buf * stage_elems; };
  auto S_of = [&](int buf) { return stages + buf * stage_elems + kTile * ldp; };
  const int64_t bc_stride = d.ldbc;  // B, C in; dB, dC out
  const float* dt_g = DtPtr(d, saved, b);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, gq = lane / 4, tq = lane % 4;
  const int r0 = warp * 16 + gq;
  const int n1 = kDB ? nT - ot : ot + 1;  // other tiles
  const int nsteps = n1 + d.hpg;
  auto issue = [&](int step, int buf) {
    if (step < n1) {
      const int o = kDB ? ot + step : step;
      const int t0 = c0 + o * kTile, valid = min(kTile, d.S - t0);
      LoadRowsAsync(A_of(buf), ldv,
                    (kDB ? Cm : Bm) + BcRow(d, b, t0) + static_cast<int64_t>(g) * d.N + n0,
                    bc_stride, valid, 64);
      {
        // dCB rows o0.. (own), columns o·64.. (other) of this chunk's (transposed) copy.
        const int64_t n_all = static_cast<int64_t>(d.B) * d.NC * d.G * d.Q * d.Q;
        const bf16* t = dcb_bf + (kDB ? n_all : 0) +
                        ((static_cast<int64_t>(b) * d.NC + c) * d.G + g) * d.Q * d.Q +
                        static_cast<int64_t>(o0) * d.Q + o * kTile;
        CpRows(A_of(buf) + kTile * ldv, kLdCb, t, d.Q, kTile, kTile, kTile);
      }
    } else {
      const int h = g * d.hpg + (step - n1);
      LoadRowsAsync(A_of(buf), ldp,
                    (kDB ? x + XRow(d, b, c0 + o0) : dy + YRow(d, b, c0 + o0)) +
                        static_cast<int64_t>(h) * d.P,
                    kDB ? d.ldx : d.ldy, ov, d.P);
      CpRows(S_of(buf), ldv,
             (kDB ? st_g + ((static_cast<int64_t>(b) * d.H + h) * d.NC + c) * d.PN
                  : HbfPtr(d, saved, b, h, c)) +
                 n0,
             d.N, d.P, d.P, 64);
      if (threadIdx.x < kTile) {
        const int r = threadIdx.x;
        const float* acs_h = AcsPtr(d, saved, b, h) + c0;
        CpAsync4(acsb + buf * kTile + r, acs_h + o0 + r, true);
        if (kDB) {
          CpAsync4(dtb + buf * kTile + r,
                   dt_g + static_cast<int64_t>(c0 + o0 + min(r, ov - 1)) * d.H + h, r < ov);
          if (r == 0) CpAsync4(alast + buf, acs_h + d.Q - 1, true);
        }
      }
    }
    CpAsyncCommit();
  };

  float acc[8][4];
  ZeroAcc(acc);
  // The pipeline of ssd_bwd_dcb_reg (kStages deep, one barrier per step).
  if (inter) {  // (the same cp.async group as step 0)
    LoadRowsAsync(Cown, 72, Cm + BcRow(d, b, c0 + o0) + static_cast<int64_t>(g) * d.N + n0,
                  bc_stride, ov, 64);
  }
  RingPrologue<kStages>(nsteps, issue);
  for (int step = 0; step < nsteps; ++step) {
    const int buf = step % kStages;
    RingStep<kStages>(step, nsteps, issue);
    if (step < n1) {
      // A fragments of the dCB tile (dC: A(l, s) = dCB[l, s]; dB: A(s, l) = dCB[l, s] =
      // dCBᵀ[s, l], the transposed copy) from the stage's second half.
      unsigned fa[4][4];
      LoadTileA<false>(fa, A_of(buf) + kTile * ldv);
      WarpMmaRS<8, 4, false>(acc, fa, A_of(buf), ldv);
    } else {
      const float* ab = acsb + buf * kTile;
      float sc0, sc1;
      if (kDB) {
        const float last = alast[buf];
        sc0 = expf(last - ab[r0]) * dtb[buf * kTile + r0];
        sc1 = expf(last - ab[r0 + 8]) * dtb[buf * kTile + r0 + 8];
      } else {
        sc0 = expf(ab[r0]);
        sc1 = expf(ab[r0 + 8]);
      }
      if (inter) {
        float t[8][4];
        ZeroAcc(t);
        WarpMmaSSRowScaled<8>(t, A_of(buf) + warp * 16 * ldp, ldp, sc0, sc1, S_of(buf), ldv,
                              d.P);
        float i0 = 0.f, i1 = 0.f;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const float2 u0 = Bf2(Cown + r0 * 72 + 8 * j + 2 * tq);
          const float2 u1 = Bf2(Cown + (r0 + 8) * 72 + 8 * j + 2 * tq);
          i0 += t[j][0] * u0.x + t[j][1] * u0.y;
          i1 += t[j][2] * u1.x + t[j][3] * u1.y;
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[j][e] += t[j][e];
        }
        i0 = QuadSum(i0);
        i1 = QuadSum(i1);
        if (tq == 0) {
          const int h = g * d.hpg + (step - n1);
          float* io = inter_out + ((static_cast<int64_t>(n0 / 64) * d.B + b) * d.H + h) * d.NC * d.Q +
                      c0 + o0;
          io[r0] = i0;
          io[r0 + 8] = i1;
        }
      } else {
        WarpMmaSSRowScaled<8>(acc, A_of(buf) + warp * 16 * ldp, ldp, sc0, sc1, S_of(buf), ldv,
                              d.P);
      }
    }
  }
  bf16* out = kDB ? db : dc;
#pragma unroll
  for (int e2 = 0; e2 < 2; ++e2) {
    const int row = r0 + 8 * e2;
    if (row < ov) {
      bf16* orow = out + BcRow(d, b, c0 + o0 + row) + static_cast<int64_t>(g) * d.N + n0;
#pragma unroll
      for (int j = 0; j < 8; ++j)
        *reinterpret_cast<__nv_bfloat162*>(orow + 8 * j + 2 * tq) =
            __floats2bfloat162_rn(acc[j][2 * e2], acc[j][2 * e2 + 1]);
    }
  }
}


// Columns of N per ssd_chunk_state_scan block: 128 where the P×128 fp32 accumulator still fits
// two 32×32 warp tiles per warp (P <= 64) and N allows, else 64. With 64 (sessions 2-3) every
// (b, c, h) ran two blocks that each loaded and scaled the same x (or dy) tiles; 128 does that
// once and gives each block twice the MMAs per barrier. g_state_slice_override (testing) forces 64.
std::atomic<int> g_state_slice_override{0};
int StateSlice(const Dims& d) {
  const int forced = g_state_slice_override.load();
  if (forced == 64) return 64;
  return d.P <= 64 && d.N % 128 == 0 ? 128 : 64;
}

// Shared memory of ssd_chunk_state_scan: U tiles [2][64][P+8] (x or dy rows, scaled in place)
// and V tiles [2][64][slice+8] (B or C), double-buffered, and per stage the tile's Acs and dt (the
// row scales are formed while scaling): ~55 KB at P64 with 128-column slices, four blocks per SM
// (a separate scaled U tile made it 63.5 KB, three).
size_t StateScanSmem(const Dims& d) {
  CarveSize cs;
  cs.take<bf16>(2 * kTile * (d.P + 8));
  cs.take<bf16>(2 * kTile * (StateSlice(d) + 8));
  cs.take<float>(4 * kTile);  // acs[2][64], dt[2][64]
  return cs.off;
}

template <int MAXI>
__device__ __forceinline__ void StoreTileBf16(const MmaPtx::Tile (&acc)[MAXI], bf16* c,
                                              int64_t ldc, int m, int n) {
  MmaPtx::ForEachPair(acc, m, n, [&](float x, float y, int row, int col) {
    *reinterpret_cast<__nv_bfloat162*>(c + row * ldc + col) = __floats2bfloat162_rn(x, y);
  });
}

// Steps of the fused chunk-state scan shared by ssd_chunk_state_scan (below) and its compile-time
// form ssd_state_scan_ct (ssd_state_ct.cuh), which repeats its recurrence exactly.

// Tile k of the scan: chunk c, 64-token tile tt of it; `tiles` tiles a chunk, `last_tiles` in the
// last (only it can be partial). The forward takes the chunks in order, the backward from the last.
template <bool kBwd>
__device__ __forceinline__ void StateScanTile(const Dims& d, int tiles, int last_tiles, int k,
                                              int& c, int& tt) {
  if (!kBwd) {
    c = k / tiles;
    tt = k % tiles;
  } else if (k < last_tiles) {
    c = d.NC - 1;
    tt = k;
  } else {
    c = d.NC - 2 - (k - last_tiles) / tiles;
    tt = (k - last_tiles) % tiles;
  }
}

// This thread's part of <G_{c+1}, H_c> (backward): G in the accumulator (pw × nw tile), H_c's
// tile hc (fp32, row stride N) read in the accumulator layout straight from global memory, the
// products in ForEachPair order (fmaf), then the warp's sum.
template <int MAXI>
__device__ __forceinline__ float StateDotWarpSum(MmaPtx::Tile (&acc)[MAXI], const float* hc,
                                                 const Dims& d, int pw, int nw, int lane,
                                                 int warp) {
  float prod = 0.f;
  MmaPtx::ForEachPairAt(acc, pw, nw, lane, warp, [&](float x, float y, int row, int col) {
    const float2 hv = *reinterpret_cast<const float2*>(hc + static_cast<int64_t>(row) * d.N + col);
    prod = fmaf(x, hv.x, prod);
    prod = fmaf(y, hv.y, prod);
  });
  return WarpSum(prod);
}

// The state accumulator times a chunk's decay e^{Acs_last}.
__device__ __forceinline__ void StateScanDecay(MmaPtx::Tile (&acc)[2], float decay) {
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i].c[mi][ni][e] *= decay;
}

// Row r's 8 columns from cidx of the U tile (ld ldu), scaled in place: by e^{Acs_r} (backward,
// dy) or e^{acs_last − Acs_r} dt_r (forward, x). Rows past the sequence end have zero-filled U,
// Acs and dt: a finite factor (Acs <= 0).
template <bool kBwd>
__device__ __forceinline__ void StateScanScaleU(bf16* Us, int ldu, int r, int cidx, const float* ab,
                                                const float* db, float acs_last) {
  float f[8];
  LoadBf16<8>(Us + r * ldu + cidx, f);
  const float sc = kBwd ? expf(ab[r]) : expf(acs_last - ab[r]) * db[r];
#pragma unroll
  for (int j = 0; j < 8; ++j) f[j] *= sc;
  StoreBf16<8>(Us + r * ldu + cidx, f);
}

// The chunk states and the state pass in one kernel (no S_c / dS_c round trip through memory,
// no ssd_state_pass(_bwd) launch): one block per (state tile, head, batch row) walks all chunks in
// order (the backward in reverse) with the next token tile's U, V, Acs and dt in flight
// (cp.async) while the current one is scaled and multiplied, across chunk boundaries. Its
// accumulator holds the running state.
// Forward: H_0 = initial (or 0); at the start of chunk c it is H_c, written to slot c (fp32) and
// to the bf16 copy, then scaled by the chunk's decay e^{Acs_last,c}, and the chunk's products
// x̃ᵀB (x rows scaled by e^{Acs_last − Acs_t} dt_t, rounded to bf16 once, as before) accumulate
// onto it: H_{c+1} = e^{Acs_last,c} H_c + S_c, the recurrence of ssd_state_pass. After the last
// chunk: slot NC and final_state.
// Backward: G_NC = d_final (or 0); at the start of chunk c (from the last) it is G_{c+1}: written
// fp32 to dsg slot c (where the v2 dx/dB/dC kernels need it; else null) and bf16 to g_bf, and
// <G_{c+1}, H_c> over this block's elements (H_c fp32 from `saved`) goes to
// ddecay [B, H, NC, ntn]; then G_c = e^{Acs_last,c} G_{c+1} + dS_c with dS_c the chunk's
// (e^{Acs_t} dy_t)ᵀ C_t products: ssd_state_pass_bwd's recurrence. After chunk 0: d_initial.
// Grid (ntn, H, B): each block owns `slice` columns of N (n0..) of the state, 512 blocks at B8
// H64 N128: NC times fewer than the unfused pair's, so small B·H keep the unfused kernels
// (UseFusedStatePass; narrower tiles, 64 columns and/or half of P per block for 2-4x the blocks,
// lost to them at B2 S8192: ssd_notes.md session 7).
// kOneChunk (the unfused kernels' chunk states): grid (ntn·NC, H, B), each block one chunk c
// (blockIdx.x / ntn) from a zero accumulator, no state pass: S_c goes to slot c + 1 of `saved`
// (forward; ssd_state_pass turns it into H_{c+1} in place) or dS_c to dsg slot c (backward).
// pw (rows of P per block) is always P now: the P split lost (above). The parameter stays because
// this build of the kernel is the device-verified one (session 7, call 1); without it ptxas
// spilled 12 bytes in the fused backward. (__launch_bounds__ 4: at most 128 registers, so four
// blocks per SM; without it the fused backward took 132.)
template <bool kBwd, bool kOneChunk = false>
__global__ void __launch_bounds__(kThreads, 4) ssd_chunk_state_scan(
    Dims d, int slice, int pw, const bf16* u, const bf16* v, const float* start, float* saved,
    float* end_state, float* dsg, bf16* g_bf, float* ddecay) {
  extern __shared__ __align__(128) char smem[];
  __shared__ float red[2 * kWarps];
  const int ntn = (d.N + slice - 1) / slice, parts = ntn * (d.P / pw);
  const int part = blockIdx.x % parts, one_c = blockIdx.x / parts;
  const int n0 = (part % ntn) * slice, p0 = (part / ntn) * pw;
  const int h = blockIdx.y, b = blockIdx.z;
  const int nw = min(slice, d.N - n0);
  const int g = h / d.hpg;
  const int ldu = pw + 8, ldv = slice + 8;
  // This block's P×N tile of the state: rows p0.., columns n0.. (offset into [P, N] states).
  const int64_t pn0 = static_cast<int64_t>(p0) * d.N + n0;
  Carve cv{smem};
  bf16* Raw = cv.take<bf16>(2 * kTile * ldu);  // raw[0], raw[1]; each scaled in place
  bf16* V0 = cv.take<bf16>(2 * kTile * ldv);
  float* acs_b = cv.take<float>(4 * kTile);  // [2][64] Acs, then [2][64] dt
  float* dt_b = acs_b + 2 * kTile;
  const float* acs = AcsPtr(d, saved, b, h);
  const float* dts = DtPtr(d, saved, b);
  const int tiles = d.Q / kTile;
  // Only the last chunk can be partial. Tile k: chunk c, tile tt of it (the backward takes the
  // chunks from the last).
  const int last_tiles = (d.S - (d.NC - 1) * d.Q + kTile - 1) / kTile;
  const int total = kOneChunk ? (one_c == d.NC - 1 ? last_tiles : tiles)
                              : (d.NC - 1) * tiles + last_tiles;
  auto locate = [&](int k, int& c, int& tt) {
    if (kOneChunk) {
      c = one_c;
      tt = k;
    } else {
      StateScanTile<kBwd>(d, tiles, last_tiles, k, c, tt);
    }
  };
  const int64_t bh = static_cast<int64_t>(b) * d.H + h;
  // u is x (forward) or dy (backward); v is B or C.
  auto issue = [&](int k, int buf) {
    int c, tt;
    locate(k, c, tt);
    const int t0 = c * d.Q + tt * kTile, valid = min(kTile, d.S - t0);
    LoadRowsAsync(V0 + buf * kTile * ldv, ldv,
                  v + BcRow(d, b, t0) + static_cast<int64_t>(g) * d.N + n0, d.ldbc, valid, nw);
    LoadRowsAsync(Raw + buf * kTile * ldu, ldu,
                  u + (kBwd ? YRow(d, b, t0) : XRow(d, b, t0)) + static_cast<int64_t>(h) * d.P + p0,
                  kBwd ? d.ldy : d.ldx, valid, pw);
    if (threadIdx.x < kTile) {
      const int r = threadIdx.x;
      CpAsync4(acs_b + buf * kTile + r, acs + t0 + r, r < valid);
      if (!kBwd) {
        CpAsync4(dt_b + buf * kTile + r,
                 dts + static_cast<int64_t>(t0 + min(r, valid - 1)) * d.H + h, r < valid);
      }
    }
    CpAsyncCommit();
  };
  issue(0, 0);
  typename MmaPtx::Tile acc[2];
  if (!kOneChunk && start != nullptr) {
    MmaPtx::Load(acc, start + bh * d.PN + pn0, d.N, pw, nw);
  } else {
    MmaPtx::Zero(acc);
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int vpr = pw / 8;
  int c_first, tt_first;
  locate(0, c_first, tt_first);
  float acs_last = 0.f,
        acs_last_next = acs[static_cast<int64_t>(c_first) * d.Q + d.Q - 1];
  int pending_c = -1;  // chunk whose <G, H> block partials wait for the next barrier
  for (int k = 0; k < total; ++k) {
    const int buf = k & 1;
    int c, tt;
    locate(k, c, tt);
    if (tt == 0 && kOneChunk) {
      acs_last = acs_last_next;
    } else if (tt == 0) {
      // Chunk c starts: the accumulator is H_c (forward) or G_{c+1} (backward).
      if (!kBwd) {
        MmaPtx::Store(acc, StatePtr(d, saved, b, h, c) + pn0, d.N, pw, nw);
        StoreTileBf16(acc, HbfPtr(d, saved, b, h, c) + pn0, d.N, pw, nw);
      } else {
        if (dsg != nullptr) {
          MmaPtx::Store(acc, dsg + (bh * d.NC + c) * d.PN + pn0, d.N, pw, nw);
        }
        if (g_bf != nullptr) {
          StoreTileBf16(acc, g_bf + (bh * d.NC + c) * d.PN + pn0, d.N, pw, nw);
        }
        const float prod =
            StateDotWarpSum(acc, StatePtr(d, saved, b, h, c) + pn0, d, pw, nw, lane, warp);
        if (lane == 0) red[(c & 1) * kWarps + warp] = prod;
        pending_c = c;
      }
      acs_last = acs_last_next;  // (loaded a chunk ahead)
      const int c_next = kBwd ? c - 1 : c + 1;
      if (c_next >= 0 && c_next < d.NC) {
        acs_last_next = acs[static_cast<int64_t>(c_next) * d.Q + d.Q - 1];
      }
      StateScanDecay(acc, expf(acs_last));
    }
    __syncthreads();  // buffer buf^1 (tile k−1, scaled) is no longer read; red[] published
    if (kBwd && !kOneChunk && pending_c >= 0) {
      if (threadIdx.x == 0) {
        float s = 0.f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) s += red[(pending_c & 1) * kWarps + w];
        ddecay[(bh * d.NC + pending_c) * gridDim.x + blockIdx.x] = s;
      }
      pending_c = -1;
    }
    if (k + 1 < total) {
      issue(k + 1, buf ^ 1);
      CpAsyncWait<1>();
    } else {
      CpAsyncWait<0>();
    }
    __syncthreads();
    bf16* Us = Raw + buf * kTile * ldu;  // scaled in place: each thread rewrites its own vectors
    const float* ab = acs_b + buf * kTile;
    const float* db = dt_b + buf * kTile;
    for (int i = threadIdx.x; i < kTile * vpr; i += kThreads) {
      StateScanScaleU<kBwd>(Us, ldu, i / vpr, (i % vpr) * 8, ab, db, acs_last);
    }
    __syncthreads();
    MmaPtx::Mma<true, false, 2>(acc, Us, ldu, V0 + buf * kTile * ldv, ldv, pw, nw, kTile);
  }
  if (kOneChunk) {
    MmaPtx::Store(acc,
                  (kBwd ? dsg + (bh * d.NC + one_c) * d.PN : StatePtr(d, saved, b, h, one_c + 1)) +
                      pn0,
                  d.N, pw, nw);
    return;
  }
  if (!kBwd) MmaPtx::Store(acc, StatePtr(d, saved, b, h, d.NC) + pn0, d.N, pw, nw);
  if (end_state != nullptr) MmaPtx::Store(acc, end_state + bh * d.PN + pn0, d.N, pw, nw);
}

// Helper ssdr13 (session 13): the same kernel with P 64 and the 128-column slice at compile time
// (ct1, the default where those shapes hold since helper cssdr13's call; GYRE_SSD_STATE).
#include "kernels/cuda/ssd_state_ct.cuh"

// ------------------------------------------------------------------ host side

template <typename Kernel>
CudaResult SetSmem(Kernel k, size_t bytes) {
  CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(bytes)));
  return {};
}

template <void (*Carver)(CarveSize&, const Dims&)>
size_t SmemOf(const Dims& d) {
  CarveSize cs;
  Carver(cs, d);
  return cs.off;
}

int MaxSmemOptin() {
  int dev = 0, max_optin = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&max_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) !=
          cudaSuccess) {
    return 0;
  }
  return max_optin;
}

CudaResult CheckSmem(const Dims& d) {
  int dev = 0, max_optin = 0;
  CUDA_RETURN_IF_ERROR(cudaGetDevice(&dev));
  CUDA_RETURN_IF_ERROR(
      cudaDeviceGetAttribute(&max_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  const size_t need = std::max({SmemOf<CarveScanFwd<CarveSize>>(d),
                                SmemOf<CarveScanBwdDx<CarveSize>>(d),
                                SmemOf<CarveDbc<CarveSize>>(d), ChunkStateSmem(d)});
  if (need > static_cast<size_t>(max_optin)) {
    return InvalidArgument("ssd: head_dim " + std::to_string(d.P) + " x state_dim " +
                           std::to_string(d.N) + " x chunk " + std::to_string(d.Q) + " needs " +
                           std::to_string(need) + " bytes of shared memory per block; device has " +
                           std::to_string(max_optin));
  }
  return {};
}

bool Aligned(const void* p) { return p == nullptr || Aligned16(p); }

// The v3 kernels selected by default (kSsdReg* bits); see SsdSetRegisterPathForTesting. All of
// them: device call 2026-11-26 (H200): every variant passed ssd_gpu_test (12 cases, all outputs
// and gradients vs float64) and racecheck, and all-v3 was the fastest (fwd+bwd 3.31 ms vs 7.75).
constexpr int kDefaultRegMask = kSsdRegAll;
std::atomic<int> g_reg_mask{kDefaultRegMask};

// Which v3 kernels this call uses: the selected ones whose tiles fit the device.
// dx implies dbc: ssd_bwd_dbc_smem's dC blocks form the inter-chunk ∂Acs terms that the v3 bwd dx
// path needs (ssd_bwd_dacs_finish runs after it).
struct RegPlan {
  bool fwd = false, dx = false, dbc = false, state = false;
};

RegPlan PlanReg(const Dims& d) {
  RegPlan p;
  const int mask = g_reg_mask.load();
  if (mask == 0) return p;
  const size_t optin = static_cast<size_t>(MaxSmemOptin());
  p.fwd = (mask & kSsdRegScanFwd) && SmemOf<CarveScanFwdPair<CarveSize>>(d) <= optin;
  const bool dbc_fits = d.N % 64 == 0 && SmemOf<CarveDcbReg<CarveSize>>(d) <= optin &&
                        SmemOf<CarveDbcReg<CarveSize>>(d) <= optin;
  p.dx = (mask & kSsdRegDx) && dbc_fits && SmemOf<CarveDxReg<CarveSize>>(d) <= optin;
  p.state = (mask & kSsdRegState) && StateScanSmem(d) <= optin;
  p.dbc = ((mask & kSsdRegDbc) || p.dx) && dbc_fits;
  return p;
}

int SmCount() {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
    return 0;
  }
  return sms;
}

// Environment switches, read once per process (two threads reading at once store the same
// value). names[0] is the default form, also when the variable is unset; any value not in
// `names` is an error from the launching call that lists the accepted values. Helper ssd10's
// forms (early dx loads, D·x from the scan's ring, dCB tiles through shared memory) became the
// defaults after the lead's session-8 call and the forms they replaced were deleted after the
// 2026-11-27 confirmation, so their switches accept only the remaining name:
//   GYRE_SSD_BWD_DX  = early  (ssd_chunk_scan_bwd_dx_early; "reg" was deleted; since session
//                              13 the value is wgc, below)
//   GYRE_SSD_FWD     = xs     (ssd_chunk_scan_fwd_pair_xs; "pair" was deleted)
//   GYRE_SSD_BWD_DBC = smem   (ssd_bwd_dbc_smem; "reg" was deleted)
// Helper ssd11's forms after the lead's session-9 call (H100; ssd_notes.md "Session 11"): two
// won and are the only forms, one lost and was deleted:
//   GYRE_SSD_FUSED_STATE = 2       (UseFusedStatePass's rule: 2 blocks per SM; "3" was deleted)
//   GYRE_SSD_DACS_FINISH = pf      (ssd_bwd_dacs_finish, loads issued together; "plain" was
//                                   deleted)
//   GYRE_SSD_DCB_SUM     = kernel  (ssd_bwd_dcb_sum after ssd_bwd_dcb_reg; "last", the last
//                                   head-split block summing, was deleted)
// Helper ssdf13's wgmma kernels (ssd_fwd_wgmma.cu; H200, session 13, ssd_notes.md "Session 13")
// are the defaults where they take the shape (head_dim 64, state_dim % 64 == 0; the kernels
// above run the other shapes), and their switches accept only their names:
//   GYRE_SSD_FWD     = wgs  (ssd_chunk_scan_fwd_wg; "xs", which named pair_xs, and the session's
//                            other forms "wg", "wgc", "wg4" are errors)
//   GYRE_SSD_BWD_DBC = wg   (ssd_bwd_dbc_wg; "smem", which named ssd_bwd_dbc_smem, is an error)
struct EnvSwitch {
  const char* env;
  const char* names[6];              // null-terminated
  std::atomic<int> from_env{-2};     // -2 not read yet, -1 unknown value, else the form index
};
struct Form {
  int index = 0;
  std::string bad;  // the error message for an unknown environment value
};
// Helper ssdx13's bwd dx on wgmma (session 13, two device calls on an H200; ssd_notes.md
// "Session 13"): the default where its shapes allow (P64, N 64 or 128, Q <= 256; other shapes run
// ssd_chunk_scan_bwd_dx_early, no longer selectable):
//   GYRE_SSD_BWD_DX = wgc    (ssd_bwd_dx_wgc, measured as "wgc2"; "early" and "wgc2" are
//                             errors now)
EnvSwitch g_dx_switch{"GYRE_SSD_BWD_DX", {"wgc", nullptr}};
EnvSwitch g_fwd_switch{"GYRE_SSD_FWD", {"wgs", nullptr}};
EnvSwitch g_dbc_switch{"GYRE_SSD_BWD_DBC", {"wg", nullptr}};
EnvSwitch g_fused_rule_switch{"GYRE_SSD_FUSED_STATE", {"2", nullptr}};
EnvSwitch g_dcb_sum_switch{"GYRE_SSD_DCB_SUM", {"kernel", nullptr}};
EnvSwitch g_dacs_finish_switch{"GYRE_SSD_DACS_FINISH", {"pf", nullptr}};
// Helper ssdc13's dCB (session 13, two device calls on an H200; ssd_notes.md "Session 13 (helper
// ssdc13)"): the default at head_dim 64 (other head dims run ssd_bwd_dcb_reg + ssd_bwd_dcb_sum,
// no longer selectable there):
//   GYRE_SSD_DCB = wgc  (ssd_bwd_dcb_wg, kernels/cuda/ssd_dcb_wgmma.cuh: wgmma products, column
//                        factors once per head, the head-split sum folded in a cluster; "reg"
//                        and the session's first form "wg" are errors)
EnvSwitch g_dcb_switch{"GYRE_SSD_DCB", {"wgc", nullptr}};
Form Choose(EnvSwitch& sw) {
  int state = sw.from_env.load();
  if (state == -2) {
    const char* e = std::getenv(sw.env);
    state = e == nullptr ? 0 : -1;
    for (int i = 0; e != nullptr && sw.names[i] != nullptr; ++i) {
      if (std::strcmp(e, sw.names[i]) == 0) state = i;
    }
    sw.from_env.store(state);
  }
  if (state >= 0) return {state, {}};
  const char* e = std::getenv(sw.env);
  std::string accepted;
  for (int i = 0; sw.names[i] != nullptr; ++i) {
    accepted += std::string(i > 0 ? " or " : "") + sw.names[i];
  }
  return {0, std::string(sw.env) + ": unknown value \"" + (e != nullptr ? e : "") +
                 "\" (accepted: " + accepted + ")"};
}

// GYRE_SSD_SIDE_STREAM (helper ssd12; default since the lead's 2026-11-27 call, ssd_notes.md
// "Session 12 measured"): hi (default; unset is the same) | off. Backward only: hi forks the
// backward's v3 dCB → dCB sum → dB/dC chain onto a second stream. Why: at mamba2-130m's step
// shape (B16 S2048 H24) the fused state kernels have 384 blocks for 528 block slots (132 SMs ×
// 4): one slot per SM stays empty for the whole kernel, and every kernel boundary of the
// backward's six kernels drains a wave. The dCB kernel (its 40.5 KB fits beside three 53 KB state
// blocks), its sum and dB/dC need nothing from the state pass but G (dB/dC only), so they run
// beside it: dCB fills the empty slots during the state pass and the chains' tails overlap. The
// state passes (the critical chain: everything after them waits for them) go to a stream at the
// device's greatest priority, so their blocks are dispatched first; the side chain to a stream of
// middle priority, so dB/dC's long blocks are dispatched before bwd dx's short ones on the
// caller's stream, which then fill dB/dC's last wave. Same kernels: the values cannot change
// (bitwise the same as off). Measured (H100, B16 S2048 H24 fwd+bwd): off 1.550, hi 1.526-1.539
// ms. The forward never forks: C Bᵀ beside the forward state pass lost 5-6% at that shape (0.450
// → 0.472-0.479 ms), so its launches are on the caller's stream as before helper ssd12.
// off: one stream (the bitwise reference of ssd_gpu_test, and an escape hatch). "on" (the side
// chain at the least priority, state passes on the caller's stream) was deleted after losing to
// hi on 2026-11-27; it is now an unknown value.
EnvSwitch g_side_switch{"GYRE_SSD_SIDE_STREAM", {"hi", "off", nullptr}};
// SsdSetSideStreamForTesting: 0 the environment, 1 off, 2 hi.
std::atomic<int> g_side_override{0};

// The extra streams and events of one device, created on first use and never destroyed (they
// live as long as the CUDA context; a static destructor could run after the driver's teardown).
struct SideStreams {
  cudaStream_t middle = nullptr, greatest = nullptr;  // by priority
  cudaEvent_t fork = nullptr, mid = nullptr, join = nullptr, join_crit = nullptr;
};
constexpr int kMaxSideDevices = 64;
std::mutex g_side_mu;  // guards g_side and each call's fork → join sequence (shared events)
SideStreams g_side[kMaxSideDevices];

// One backward call's fork of work onto the side streams and its join back. Three roles: main
// (the caller's stream: bwd dx and everything after the join), crit (the state passes: the
// greatest-priority stream) and side (the dCB → dB/dC chain: middle priority). Begin locks
// g_side_mu until the join, so two host threads cannot interleave records of the shared events
// (cudaStreamWaitEvent waits for the record that precedes it in host order). The destructor joins
// if the call returned early (a failed launch), so no side work outlives the call's scratch (the
// DeviceAllocator reuses blocks in the caller stream's order). Inactive (off, or no Begin):
// side() and crit() are the caller's stream and every method does nothing, so that path enqueues
// exactly what it did before helper ssd12.
class SideFork {
 public:
  explicit SideFork(cudaStream_t main) : main_(main), side_(main), crit_(main) {}
  SideFork(const SideFork&) = delete;
  SideFork& operator=(const SideFork&) = delete;
  ~SideFork() { (void)Join(); }

  CudaResult Begin() {
    int dev = 0;
    CUDA_RETURN_IF_ERROR(cudaGetDevice(&dev));
    if (dev < 0 || dev >= kMaxSideDevices) return InvalidArgument("ssd: side stream: device id");
    lock_ = std::unique_lock<std::mutex>(g_side_mu);
    SideStreams& s = g_side[dev];
    if (s.middle == nullptr) {
      int least = 0, greatest = 0;
      CUDA_RETURN_IF_ERROR(cudaDeviceGetStreamPriorityRange(&least, &greatest));
      SideStreams n;
      CUDA_RETURN_IF_ERROR(cudaStreamCreateWithPriority(&n.middle, cudaStreamNonBlocking,
                                                        (least + greatest) / 2));
      CUDA_RETURN_IF_ERROR(
          cudaStreamCreateWithPriority(&n.greatest, cudaStreamNonBlocking, greatest));
      for (cudaEvent_t* e : {&n.fork, &n.mid, &n.join, &n.join_crit}) {
        CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(e, cudaEventDisableTiming));
      }
      s = n;
    }
    CUDA_RETURN_IF_ERROR(cudaEventRecord(s.fork, main_));
    s_ = &s;
    side_ = s.middle;
    crit_ = s.greatest;
    CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(side_, s.fork, 0));
    CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(crit_, s.fork, 0));
    return {};
  }
  cudaStream_t side() const { return side_; }
  cudaStream_t crit() const { return crit_; }
  // After the state passes (on crit): the side stream may start dB/dC (WaitMark) and the
  // caller's stream may start what reads the states (MainWaitsMark).
  CudaResult Mark() {
    if (s_ != nullptr) CUDA_RETURN_IF_ERROR(cudaEventRecord(s_->mid, crit_));
    return {};
  }
  CudaResult WaitMark() {
    if (s_ != nullptr) CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(side_, s_->mid, 0));
    return {};
  }
  CudaResult MainWaitsMark() {
    if (s_ != nullptr) CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(main_, s_->mid, 0));
    return {};
  }
  // The caller's stream waits for everything enqueued on the side and crit streams so far; then
  // inactive (side() and crit() are the caller's stream again).
  CudaResult Join() {
    if (s_ == nullptr) return {};
    SideStreams* s = s_;
    const cudaStream_t side = side_, crit = crit_;
    s_ = nullptr;
    side_ = crit_ = main_;
    cudaError_t e = cudaEventRecord(s->join, side);
    if (e == cudaSuccess) e = cudaStreamWaitEvent(main_, s->join, 0);
    if (e == cudaSuccess) e = cudaEventRecord(s->join_crit, crit);
    if (e == cudaSuccess) e = cudaStreamWaitEvent(main_, s->join_crit, 0);
    if (lock_.owns_lock()) lock_.unlock();
    CUDA_RETURN_IF_ERROR(e);
    return {};
  }

 private:
  const cudaStream_t main_;
  cudaStream_t side_, crit_;
  SideStreams* s_ = nullptr;
  std::unique_lock<std::mutex> lock_;
};

// Whether the backward forks (hi), or the switch's error.
struct SideChoice {
  bool fork = true;
  std::string bad;
};
SideChoice SideMode() {
  const int forced = g_side_override.load();
  if (forced == 1 || forced == 2) return {forced == 2, {}};
  const Form f = Choose(g_side_switch);
  return {f.index == 0, f.bad};
}

// Whether the v3 state path runs ssd_chunk_state_scan (chunk states and state pass fused) rather
// than its one-chunk form + ssd_state_pass: where its ntn·H·B blocks fill the device at least
// kFusedStateWaves times over (the fused kernel walks the chunks of one (slice, h, b) in order,
// so it has NC times fewer blocks). g_fused_state_pass (testing): 0 that rule, 1 always, 2 never.
std::atomic<int> g_fused_state_pass{0};
// 2 blocks per SM since the lead's session-9 call (helper ssd11's GYRE_SSD_FUSED_STATE=2; the
// rule was 3): mamba2-130m's training shape B16 H24 has 384 (slice, h, b) blocks, 2.9 per SM on
// an H100 (132 SMs), all resident at once at 4 per SM, with a chain of only NC = 8 chunks per
// block; fused, H100 fwd 0.505 → 0.453 ms, fwd+bwd 1.695 → 1.579 ms there. The B2 S8192 shape
// where fusing lost (session 7) has 128 blocks, < 1 per SM, and 32 chunks: still unfused.
constexpr double kFusedStateWaves = 2.0;
bool UseFusedStatePass(const Dims& d) {
  const int mode = g_fused_state_pass.load();
  if (mode != 0) return mode == 1;
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
    return false;
  }
  const int slice = StateSlice(d);
  const double blocks = static_cast<double>((d.N + slice - 1) / slice) * d.H * d.B;
  return blocks >= kFusedStateWaves * sms;
}

// GYRE_SSD_STATE: the fused chunk-state / state-pass kernels (where UseFusedStatePass picks them).
//   ct1 (default; unset is the same) = ssd_state_scan_ct<kBwd> (ssd_state_ct.cuh, helper
//        ssdr13: one head per block, two ring slots, P 64 and the 128-column slice at compile
//        time) where P == 64, the slice is 128 columns (N % 128 == 0) and its shared
//        memory fits; elsewhere ssd_chunk_state_scan. Made the default by helper cssdr13
//        (session 13, one H200: fwd+bwd −3.7% at B16 S2048 H24, −2.3% at B8 S2048 H64;
//        ssd_notes.md)
//   one  = ssd_chunk_state_scan everywhere (the general kernel; bitwise the same outputs).
// mh2, mh4 (2 / 4 heads per block) and ct2 (ct1 with 2 heads) were measured slower and are gone:
// errors now. g_state_form (testing): 0 the environment, 1 ct1, 2 one.
EnvSwitch g_state_switch{"GYRE_SSD_STATE", {"ct1", "one", nullptr}};
// GYRE_SSD_DT_CUMSUM: plain (ssd_dt_cumsum) only; the coalesced form "co" (helper ssdr13) was
// measured no faster and is gone (an error now).
EnvSwitch g_dt_cumsum_switch{"GYRE_SSD_DT_CUMSUM", {"plain", nullptr}};
std::atomic<int> g_state_form{0};
enum class StateForm { kOne, kCt1 };
// The fused state kernels' form for this shape (kOne: ssd_chunk_state_scan).
StateForm ChooseStateForm(const Dims& d, std::string* bad) {
  int index = g_state_form.load() - 1;
  if (index < 0) {
    const Form f = Choose(g_state_switch);
    if (!f.bad.empty()) *bad = f.bad;
    index = f.index;
  }
  if (index != 0) return StateForm::kOne;
  if (!(d.P == 64 && StateSlice(d) == 128 && d.N % 128 == 0)) return StateForm::kOne;
  return StateScanCtSmem() <= static_cast<size_t>(MaxSmemOptin()) ? StateForm::kCt1
                                                                   : StateForm::kOne;
}
// Launches ssd_state_scan_ct (arguments as the fused ssd_chunk_state_scan's; ChooseStateForm
// checked P 64 and the 128-column slice).
template <bool kBwd>
CudaResult LaunchStateCt1(const Dims& d, const bf16* u, const bf16* v, const float* start,
                          float* saved, float* end_state, float* dsg, bf16* g_bf, float* ddecay,
                          cudaStream_t stream) {
  const dim3 grid(d.N / kStateCtSlice, d.H, d.B);
  const size_t smem = StateScanCtSmem();
  CUDA_RETURN_IF_NOT_OK(SetSmem(ssd_state_scan_ct<kBwd>, smem));
  ssd_state_scan_ct<kBwd><<<grid, kThreads, smem, stream>>>(d, u, v, start, saved, end_state,
                                                            dsg, g_bf, ddecay);
  CUDA_RETURN_IF_LAUNCH_ERROR("ssd_state_scan_ct");
  return {};
}

// Launches ssd_chunk_state_scan<kBwd, kOneChunk> (arguments as the kernel's; the slice is
// StateSlice(d)): grid (ntn, H, B) for the fused scan, (NC·ntn, H, B) for the per-chunk states.
// `what` names the launch in an error ("launch ssd_chunk_state_scan<...>").
template <bool kBwd, bool kOneChunk>
CudaResult LaunchStateScan(const Dims& d, const bf16* u, const bf16* v, const float* start,
                           float* saved, float* end_state, float* dsg, bf16* g_bf, float* ddecay,
                           cudaStream_t stream, const char* what) {
  const int slice = StateSlice(d);
  const size_t smem = StateScanSmem(d);
  CUDA_RETURN_IF_NOT_OK(SetSmem(ssd_chunk_state_scan<kBwd, kOneChunk>, smem));
  const int ntn = (d.N + slice - 1) / slice;
  ssd_chunk_state_scan<kBwd, kOneChunk>
      <<<dim3(kOneChunk ? d.NC * ntn : ntn, d.H, d.B), kThreads, smem, stream>>>(
          d, slice, d.P, u, v, start, saved, end_state, dsg, g_bf, ddecay);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return CudaError(err, what, __FILE__, __LINE__);
  return {};
}

template <int kP>
CudaResult LaunchScanFwd(const SsdForwardArgs& a, const Dims& d, const float* saved,
                         cudaStream_t stream) {
  const size_t smem = SmemOf<CarveScanFwdPair<CarveSize>>(d);
  const int T = d.Q / kTile;
  const Form form = Choose(g_fwd_switch);
  if (!form.bad.empty()) return InvalidArgument(form.bad);
  if (SsdScanFwdWgSupports(d.P, d.N, d.Q)) {  // helper ssdf13's wgmma scan (ssd_fwd_wgmma.cu)
    SsdScanFwdWgArgs w;
    w.B = d.B, w.S = d.S, w.H = d.H, w.P = d.P, w.N = d.N, w.Q = d.Q, w.NC = d.NC, w.hpg = d.hpg;
    w.ldx = d.ldx, w.ldbc = d.ldbc, w.ldy = d.ldy, w.per_batch = d.per_batch;
    w.dt_off = d.dt_off, w.acs_off = d.acs_off, w.cb_off = d.cb_off, w.hbf_off = d.hbf_off;
    w.x = a.x, w.c = a.c, w.dskip = a.d, w.saved = saved, w.y = a.y;
    return LaunchSsdScanFwdWg(w, stream);
  }
  CUDA_RETURN_IF_NOT_OK(SetSmem(ssd_chunk_scan_fwd_pair_xs<kP>, smem));
  ssd_chunk_scan_fwd_pair_xs<kP><<<dim3(d.NC * ((T + 1) / 2), d.H, d.B), kThreads, smem,
                                   stream>>>(d, a.x, a.c, a.d, saved, a.y);
  CUDA_RETURN_IF_LAUNCH_ERROR("ssd_chunk_scan_fwd_pair_xs");
  return {};
}

// The forward's matrix kernels (after ssd_dt_cumsum), for one GEMM implementation.
template <class MM>
CudaResult ForwardKernels(const SsdForwardArgs& a, const Dims& d, float* saved,
                          cudaStream_t stream) {
  const RegPlan plan = PlanReg(d);
  const int ntn = (d.N + 63) / 64;
  std::string state_bad;
  const StateForm state_form =
      plan.state && UseFusedStatePass(d) ? ChooseStateForm(d, &state_bad) : StateForm::kOne;
  if (!state_bad.empty()) return InvalidArgument(state_bad);
  if (state_form == StateForm::kCt1) {
    CUDA_RETURN_IF_NOT_OK(LaunchStateCt1<false>(d, a.x, a.b, a.initial_state, saved,
                                                a.final_state, nullptr, nullptr, nullptr, stream));
  } else if (plan.state && UseFusedStatePass(d)) {
    CUDA_RETURN_IF_NOT_OK((LaunchStateScan<false, false>(
        d, a.x, a.b, a.initial_state, saved, a.final_state, nullptr, nullptr, nullptr, stream,
        "launch ssd_chunk_state_scan")));
  } else if (plan.state) {
    CUDA_RETURN_IF_NOT_OK((LaunchStateScan<false, true>(
        d, a.x, a.b, nullptr, saved, nullptr, nullptr, nullptr, nullptr, stream,
        "launch ssd_chunk_state_scan<one chunk>")));
  } else {
    const size_t st_smem = ChunkStateSmem(d);
    CUDA_RETURN_IF_NOT_OK(SetSmem(ssd_chunk_state<MM, false>, st_smem));
    ssd_chunk_state<MM, false><<<dim3(d.NC, d.H * ntn, d.B), kThreads, st_smem, stream>>>(
        d, a.x, a.b, saved, nullptr);
    CUDA_RETURN_IF_LAUNCH_ERROR("ssd_chunk_state");
  }
  if (!(plan.state && UseFusedStatePass(d))) {
    ssd_state_pass<<<dim3(static_cast<unsigned>(CeilDiv(d.PN, 1024)), d.H, d.B), 256, 0,
                     stream>>>(d, a.initial_state, saved, a.final_state);
    CUDA_RETURN_IF_LAUNCH_ERROR("ssd_state_pass");
  }

  if (plan.fwd) {
    switch (d.P) {
      case 32: return LaunchScanFwd<32>(a, d, saved, stream);
      case 64: return LaunchScanFwd<64>(a, d, saved, stream);
      case 96: return LaunchScanFwd<96>(a, d, saved, stream);
      default: return LaunchScanFwd<128>(a, d, saved, stream);
    }
  }
  const size_t fwd_smem = SmemOf<CarveScanFwd<CarveSize>>(d);
  CUDA_RETURN_IF_NOT_OK(SetSmem(ssd_chunk_scan_fwd<MM>, fwd_smem));
  ssd_chunk_scan_fwd<MM><<<dim3(d.NC * (d.Q / kTile), d.H, d.B), kThreads, fwd_smem, stream>>>(
      d, a.x, a.b, a.c, a.d, saved, a.y);
  CUDA_RETURN_IF_LAUNCH_ERROR("ssd_chunk_scan_fwd");
  return {};
}

// Head split of ssd_bwd_dcb_reg: 4 or 2 where the group's heads divide evenly and there are
// enough of them (each block keeps a pipeline of several heads), else 1. At B8 S2048 G1 (H100, session
// 5, call 1) the kernel took 461 µs split, 582 µs unsplit (640 blocks: 1.2 waves of 4 per SM).
// Session 8: 4 where split 2 would leave fewer than 4 waves of 4 blocks per SM and hpg % 4 == 0,
// hpg >= 16 (B8 S2048 and B2 S8192 at H64 G1: 2560 blocks, 4.8 waves instead of 2.4, whose last
// round ran 42% full): H200, 494 → 453 µs (ncu), dcb_sum 15 → 23 µs; fwd+bwd 2.170 → 2.134 ms
// at B8 S2048 (split 8: 2.145). Shapes with enough blocks at split 2 (mamba2-130m's B16 S2048
// H24: 2560) keep it; split 4 was not measured there. g_dcb_split (testing): 0 that rule, else
// that split where it divides hpg.
std::atomic<int> g_dcb_split{0};
int DcbSplit(const Dims& d) {
  const int forced = g_dcb_split.load();
  if (forced > 0 && d.hpg % forced == 0) return forced;
  if (!(d.hpg % 2 == 0 && d.hpg >= 4)) return 1;
  const int tiles = d.Q / kTile;
  const int64_t blocks2 = 2LL * d.NC * (tiles * (tiles + 1) / 2) * d.G * d.B;
  const bool few = blocks2 < 16LL * SmCount();  // 4 waves of 4 blocks per SM
  return few && d.hpg % 4 == 0 && d.hpg >= 16 ? 4 : 2;
}

struct BwdScratch {
  float* dsg;
  float* ddecay;
  double* part;
  float* dbp;
  float* dcp;
  int nsplit;
  int pass_blocks;   // blocks per (b, h) of ssd_state_pass_bwd
  int ddecay_parts;  // partial sums per (b, h, c) in ddecay: pass_blocks, or ntn when fused
  // v3 only (null otherwise):
  bf16* g_bf;         // [B, H, NC, P, N] G_{c+1}
  float* dacs_own;    // [B, H, NC·Q] ∂Acs terms of bwd dx's own rows
  float* ddtx;        // [B, H, NC·Q]
  double* dd_part;    // [3][B, NC, H, Q/64]: Σ dy·x, A·∂A (difference form), Σ dl
  float* dcb;         // [B, NC, G, Q, Q]
  float* dacs_pair;   // [B, H, NC, pairs, 2, 64] ∂Acs row / column sums per tile pair
  double* dpair;      // [B, NC, H, pairs] A·∂A of the pair terms
  int dcb_split;      // head split of ssd_bwd_dcb_reg (dcb holds that many partial sums)
  bf16* dcb_bf;       // [2][B, NC, G, Q, Q] their sum as bf16, then its per-chunk transpose
  float* inter_part;  // [N/64, B, H, NC·Q] inter ∂Acs terms per 64-column slice of N
};

template <int kP>
CudaResult LaunchDxReg(const SsdBackwardArgs& a, const Dims& d, const BwdScratch& sc,
                       cudaStream_t stream) {
  const size_t smem = SmemOf<CarveDxReg<CarveSize>>(d);
  const Form form = Choose(g_dx_switch);
  if (!form.bad.empty()) return InvalidArgument(form.bad);
  // ssd_bwd_dx_wgc where its shapes allow (helper ssdx13; ssd_bwd_wgmma.cuh), else early.
  if constexpr (kP == 64) {
    const DxcLayout lay = MakeDxcLayout(kP, d.N, d.Q);
    if ((d.N == 64 || d.N == 128) && d.Q <= 256 && lay.total <= MaxSmemOptin()) {
      auto* kernel = d.N == 64 ? ssd_bwd_dx_wgc<kP, 64> : ssd_bwd_dx_wgc<kP, 128>;
      CUDA_RETURN_IF_NOT_OK(SetSmem(kernel, lay.total));
      kernel<<<dim3(d.NC, d.H, d.B), kDxcThreads, lay.total, stream>>>(
          d, a.x, a.b, a.d, static_cast<const float*>(a.saved), a.dy, sc.g_bf, a.dx, sc.dacs_own,
          sc.ddtx, sc.dd_part);
      CUDA_RETURN_IF_LAUNCH_ERROR("ssd_bwd_dx_wgc");
      return {};
    }
  }
  CUDA_RETURN_IF_NOT_OK(SetSmem(ssd_chunk_scan_bwd_dx_early<kP>, smem));
  ssd_chunk_scan_bwd_dx_early<kP><<<dim3(d.NC * (d.Q / kTile), d.H, d.B), kThreads, smem,
                                    stream>>>(d, a.x, a.b, a.d,
                                              static_cast<const float*>(a.saved), a.dy,
                                              sc.g_bf, a.dx, sc.dacs_own, sc.ddtx, sc.dd_part);
  CUDA_RETURN_IF_LAUNCH_ERROR("ssd_chunk_scan_bwd_dx_early");
  return {};
}

template <class MM>
CudaResult BackwardKernels(const SsdBackwardArgs& a, const Dims& d, const RegPlan& plan,
                           const BwdScratch& sc, cudaStream_t stream, SideFork* fork) {
  const float* saved = static_cast<const float*>(a.saved);
  const int ntn = (d.N + 63) / 64;
  const bool fused = plan.state && UseFusedStatePass(d);
  const cudaStream_t crit = fork->crit();  // the state passes' stream (hi: greatest priority)
  std::string state_bad;
  const StateForm state_form = fused ? ChooseStateForm(d, &state_bad) : StateForm::kOne;
  if (!state_bad.empty()) return InvalidArgument(state_bad);
  if (state_form == StateForm::kCt1) {
    CUDA_RETURN_IF_NOT_OK(LaunchStateCt1<true>(d, a.dy, a.c, a.d_final_state,
                                               const_cast<float*>(saved), a.d_initial_state,
                                               plan.dx && plan.dbc ? nullptr : sc.dsg, sc.g_bf,
                                               sc.ddecay, crit));
  } else if (fused) {
    // fp32 G only where a v2 kernel reads it (the v3 ones read the bf16 copy).
    CUDA_RETURN_IF_NOT_OK((LaunchStateScan<true, false>(
        d, a.dy, a.c, a.d_final_state, const_cast<float*>(saved), a.d_initial_state,
        plan.dx && plan.dbc ? nullptr : sc.dsg, sc.g_bf, sc.ddecay, crit,
        "launch ssd_chunk_state_scan<bwd>")));
  } else if (plan.state) {
    CUDA_RETURN_IF_NOT_OK((LaunchStateScan<true, true>(
        d, a.dy, a.c, nullptr, const_cast<float*>(saved), nullptr, sc.dsg, nullptr, nullptr, crit,
        "launch ssd_chunk_state_scan<bwd, one chunk>")));
  } else {
    const size_t st_smem = ChunkStateSmem(d);
    CUDA_RETURN_IF_NOT_OK(SetSmem(ssd_chunk_state<MM, true>, st_smem));
    ssd_chunk_state<MM, true><<<dim3(d.NC, d.H * ntn, d.B), kThreads, st_smem, crit>>>(
        d, a.dy, a.c, const_cast<float*>(saved), sc.dsg);
    CUDA_RETURN_IF_LAUNCH_ERROR("ssd_chunk_state<bwd>");
  }

  if (!fused) {
    ssd_state_pass_bwd<<<dim3(sc.pass_blocks, d.H, d.B), 256, 0, crit>>>(
        d, saved, a.d_final_state, sc.dsg, sc.ddecay, a.d_initial_state, sc.g_bf);
    CUDA_RETURN_IF_LAUNCH_ERROR("ssd_state_pass_bwd");
  }
  CUDA_RETURN_IF_NOT_OK(fork->Mark());  // G (bf16) is written: dB/dC and dx may start
  // Side stream (when active): ssd_bwd_dcb_reg, ssd_bwd_dcb_sum, ssd_bwd_dbc_smem.
  const cudaStream_t side = fork->side();

  // ssd_bwd_dcb_reg forms x·dyᵀ per head once for both consumers: the head-summed dCB of the
  // dB/dC kernel and the pair ∂Acs terms of the v3 dx path.
  const int tiles = d.Q / kTile;
  // Helper ssdc13's ssd_bwd_dcb_wg at P 64 (GYRE_SSD_DCB=wgc): it writes dCB / dCBᵀ itself (no
  // ssd_bwd_dcb_sum); other head dims run ssd_bwd_dcb_reg + ssd_bwd_dcb_sum.
  bool dcb_wg = false;
  if (plan.dx || plan.dbc) {
    const Form dcb_form = Choose(g_dcb_switch);
    if (!dcb_form.bad.empty()) return InvalidArgument(dcb_form.bad);
    dcb_wg = d.P == 64;
  }
  if ((plan.dx || plan.dbc) && dcb_wg) {
    CUDA_RETURN_IF_NOT_OK(SetSmem(ssd_bwd_dcb_wg, DcbWgSmem()));
    cudaLaunchConfig_t cfg{};
    cfg.gridDim = dim3(d.NC * tiles * (tiles + 1) / 2 * sc.dcb_split, d.G, d.B);
    cfg.blockDim = dim3(kThreads);
    cfg.dynamicSmemBytes = DcbWgSmem();
    cfg.stream = side;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = sc.dcb_split;  // the head split of one tile pair
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    CUDA_RETURN_IF_ERROR(cudaLaunchKernelEx(&cfg, ssd_bwd_dcb_wg, d, a.x, a.dy, saved,
                                            sc.dacs_pair, sc.dpair, sc.dcb_split, sc.dcb_bf));
    CUDA_RETURN_IF_LAUNCH_ERROR("ssd_bwd_dcb_wg");
  } else if (plan.dx || plan.dbc) {
    const size_t dcb_smem = SmemOf<CarveDcbReg<CarveSize>>(d);
    CUDA_RETURN_IF_NOT_OK(SetSmem(ssd_bwd_dcb_reg, dcb_smem));
    ssd_bwd_dcb_reg<<<dim3(d.NC * tiles * (tiles + 1) / 2 * sc.dcb_split, d.G, d.B), kThreads,
                      dcb_smem, side>>>(d, a.x, a.dy, saved, sc.dcb, sc.dacs_pair, sc.dpair,
                                        sc.dcb_split);
    CUDA_RETURN_IF_LAUNCH_ERROR("ssd_bwd_dcb_reg");
  }
  CUDA_RETURN_IF_NOT_OK(fork->MainWaitsMark());  // dx reads G (hi: from the crit stream)
  if (plan.dx) {
    switch (d.P) {
      case 32: CUDA_RETURN_IF_NOT_OK(LaunchDxReg<32>(a, d, sc, stream)); break;
      case 64: CUDA_RETURN_IF_NOT_OK(LaunchDxReg<64>(a, d, sc, stream)); break;
      case 96: CUDA_RETURN_IF_NOT_OK(LaunchDxReg<96>(a, d, sc, stream)); break;
      default: CUDA_RETURN_IF_NOT_OK(LaunchDxReg<128>(a, d, sc, stream)); break;
    }
  } else {
    const size_t dx_smem = SmemOf<CarveScanBwdDx<CarveSize>>(d);
    CUDA_RETURN_IF_NOT_OK(SetSmem(ssd_chunk_scan_bwd_dx<MM>, dx_smem));
    ssd_chunk_scan_bwd_dx<MM><<<dim3(d.NC, d.H, d.B), kThreads, dx_smem, stream>>>(
        d, a.x, a.dt, a.a_log, a.dt_bias, a.b, a.c, a.d, saved, a.dy, sc.dsg, sc.ddecay,
        sc.ddecay_parts, a.dx, a.ddt, sc.part);
    CUDA_RETURN_IF_LAUNCH_ERROR("ssd_chunk_scan_bwd_dx");
  }

  if (plan.dbc && !dcb_wg) {
    ssd_bwd_dcb_sum<<<dim3(d.NC * tiles * (tiles + 1) / 2, d.G, d.B), kThreads, 0, side>>>(
        d, sc.dcb, sc.dcb_split, sc.dcb_bf);
    CUDA_RETURN_IF_LAUNCH_ERROR("ssd_bwd_dcb_sum");
  }
  if (plan.dbc) {
    const size_t bc_smem = SmemOf<CarveDbcReg<CarveSize>>(d);
    const Form dbc_form = Choose(g_dbc_switch);
    if (!dbc_form.bad.empty()) return InvalidArgument(dbc_form.bad);
    const bool dbc_wg = SsdDbcWgSupports(d.P, d.N, d.Q);  // helper ssdf13's wgmma dB/dC
    if (!dbc_wg) CUDA_RETURN_IF_NOT_OK(SetSmem(ssd_bwd_dbc_smem, bc_smem));
    CUDA_RETURN_IF_NOT_OK(fork->WaitMark());
    if (dbc_wg) {
      SsdDbcWgArgs w;
      w.B = d.B, w.S = d.S, w.H = d.H, w.P = d.P, w.N = d.N, w.Q = d.Q, w.NC = d.NC, w.G = d.G;
      w.hpg = d.hpg, w.ldx = d.ldx, w.ldbc = d.ldbc, w.ldy = d.ldy, w.per_batch = d.per_batch;
      w.dt_off = d.dt_off, w.acs_off = d.acs_off, w.hbf_off = d.hbf_off;
      w.x = a.x, w.b = a.b, w.c = a.c, w.saved = saved, w.dy = a.dy, w.st_g = sc.g_bf;
      w.dcb_bf = sc.dcb_bf, w.db = a.db, w.dc = a.dc, w.inter_out = plan.dx ? sc.inter_part : nullptr;
      CUDA_RETURN_IF_NOT_OK(LaunchSsdDbcWg(w, side));
    } else {
      ssd_bwd_dbc_smem<<<dim3(d.NC * tiles, 2 * d.G * (d.N / 64), d.B), kThreads, bc_smem,
                         side>>>(d, a.x, a.b, a.c, saved, a.dy, sc.g_bf, sc.dcb_bf, a.db, a.dc,
                                 plan.dx ? sc.inter_part : nullptr);
      CUDA_RETURN_IF_LAUNCH_ERROR("ssd_bwd_dbc_smem");
    }
    CUDA_RETURN_IF_NOT_OK(fork->Join());
    if (plan.dx) {
      const Form finish = Choose(g_dacs_finish_switch);
      if (!finish.bad.empty()) return InvalidArgument(finish.bad);
      ssd_bwd_dacs_finish<<<dim3(d.NC, d.H, d.B), kThreads, 0, stream>>>(
          d, a.dt, a.a_log, a.dt_bias, saved, sc.dacs_pair, sc.dacs_own, sc.ddtx, sc.dd_part,
          sc.dpair, sc.inter_part, d.N / 64, sc.ddecay, sc.ddecay_parts, a.ddt, sc.part);
      CUDA_RETURN_IF_LAUNCH_ERROR("ssd_bwd_dacs_finish");
    }
    return {};
  }
  const size_t bc_smem = SmemOf<CarveDbc<CarveSize>>(d);
  const dim3 bc_grid(d.NC * (d.Q / kTile), d.G * sc.nsplit, d.B);
  CUDA_RETURN_IF_NOT_OK(SetSmem(ssd_chunk_scan_bwd_dbc<MM, false>, bc_smem));
  CUDA_RETURN_IF_NOT_OK(SetSmem(ssd_chunk_scan_bwd_dbc<MM, true>, bc_smem));
  ssd_chunk_scan_bwd_dbc<MM, false><<<bc_grid, kThreads, bc_smem, stream>>>(
      d, sc.nsplit, a.x, a.b, a.c, saved, a.dy, sc.dsg, sc.dcp);
  CUDA_RETURN_IF_LAUNCH_ERROR("ssd_chunk_scan_bwd_dbc<dC>");
  ssd_chunk_scan_bwd_dbc<MM, true><<<bc_grid, kThreads, bc_smem, stream>>>(
      d, sc.nsplit, a.x, a.b, a.c, saved, a.dy, sc.dsg, sc.dbp);
  CUDA_RETURN_IF_LAUNCH_ERROR("ssd_chunk_scan_bwd_dbc<dB>");

  const int64_t n_bc_out = static_cast<int64_t>(d.B) * d.S * d.G * d.N;
  const unsigned red_blocks = static_cast<unsigned>(std::min<int64_t>(CeilDiv(n_bc_out, 256), 4096));
  ssd_reduce_bc<<<red_blocks, 256, 0, stream>>>(d, sc.nsplit, sc.dbp, a.db);
  CUDA_RETURN_IF_LAUNCH_ERROR("ssd_reduce_bc<dB>");
  ssd_reduce_bc<<<red_blocks, 256, 0, stream>>>(d, sc.nsplit, sc.dcp, a.dc);
  CUDA_RETURN_IF_LAUNCH_ERROR("ssd_reduce_bc<dC>");
  return {};
}

// Row strides of x / dx and B, C / dB, dC (0 = dense). Each row must start 16-byte aligned
// (cp.async tiles), so a stride is a multiple of 8 elements.
CudaResult ApplyRowStrides(int64_t x_row_stride, int64_t bc_row_stride, Dims* d) {
  const int64_t hp = static_cast<int64_t>(d->H) * d->P, gn = static_cast<int64_t>(d->G) * d->N;
  if (x_row_stride != 0 && (x_row_stride < hp || x_row_stride % 8 != 0)) {
    return InvalidArgument("ssd: x_row_stride must be 0 or a multiple of 8 that is >= H·P");
  }
  if (bc_row_stride != 0 && (bc_row_stride < gn || bc_row_stride % 8 != 0)) {
    return InvalidArgument("ssd: bc_row_stride must be 0 or a multiple of 8 that is >= G·N");
  }
  d->ldx = x_row_stride != 0 ? x_row_stride : hp;
  d->ldbc = bc_row_stride != 0 ? bc_row_stride : gn;
  return {};
}

}  // namespace

void SsdSetRegisterPathForTesting(int mask) { g_reg_mask.store(mask & kSsdRegAll); }
void SsdSetStateSliceForTesting(int columns) { g_state_slice_override.store(columns == 64 ? 64 : 0); }
void SsdSetFusedStatePassForTesting(int mode) { g_fused_state_pass.store(mode == 1 || mode == 2 ? mode : 0); }
void SsdSetSideStreamForTesting(int mode) {
  g_side_override.store(mode == 1 || mode == 2 ? mode : 0);
}
void SsdSetStateFormForTesting(int form) { g_state_form.store(form == 1 || form == 2 ? form : 0); }
void SsdSetDcbSplitForTesting(int split) {
  g_dcb_split.store(split == 1 || split == 2 || split == 4 || split == 8 ? split : 0);
}
int SsdRegisterPath() { return g_reg_mask.load(); }

CudaResult SsdCheck(const SsdShape& s, const SsdOptions& o) {
  if (s.batch < 1 || s.seq_len < 1 || s.num_heads < 1 || s.head_dim < 1 || s.num_groups < 1 ||
      s.state_dim < 1) {
    return InvalidArgument("ssd: batch, seq_len, num_heads, head_dim, num_groups, state_dim must be >= 1");
  }
  if (s.num_heads % s.num_groups != 0) return InvalidArgument("ssd: num_groups must divide num_heads");
  if (s.head_dim % 32 != 0 || s.head_dim > 128) {
    return InvalidArgument("ssd (cuda): head_dim must be a multiple of 32, at most 128");
  }
  if (s.state_dim % 32 != 0 || s.state_dim > 256) {
    return InvalidArgument("ssd (cuda): state_dim must be a multiple of 32, at most 256");
  }
  if (o.chunk_size % 64 != 0 || o.chunk_size < 64 || o.chunk_size > 256) {
    return InvalidArgument("ssd (cuda): chunk_size must be 64, 128, 192 or 256");
  }
  if (!(o.dt_min >= 0) || !(o.dt_max >= o.dt_min)) {
    return InvalidArgument("ssd: need 0 <= dt_min <= dt_max");
  }
  if (s.batch > 65535 || s.num_heads * s.num_groups > 65535 || s.seq_len > (1LL << 30)) {
    return InvalidArgument("ssd (cuda): batch or heads beyond the launch grid");
  }
  return {};
}

int64_t SsdSavedBytes(const SsdShape& shape, const SsdOptions& options) {
  const Dims d = MakeDims(shape, options);
  return static_cast<int64_t>(d.B) * d.per_batch * static_cast<int64_t>(sizeof(float));
}

CudaResult SsdForward(const SsdForwardArgs& a, cudaStream_t stream) {
  CUDA_RETURN_IF_NOT_OK(SsdCheck(a.shape, a.options));
  if (!a.x || !a.dt || !a.a_log || !a.dt_bias || !a.b || !a.c || !a.y || !a.saved) {
    return InvalidArgument("ssd forward: x, dt, a_log, dt_bias, b, c, y and saved are required");
  }
  if (!Aligned(a.x) || !Aligned(a.b) || !Aligned(a.c) || !Aligned(a.y) || !Aligned(a.saved) ||
      !Aligned(a.initial_state) || !Aligned(a.final_state)) {
    return InvalidArgument("ssd forward: x, b, c, y, saved and states must be 16-byte aligned");
  }
  Dims d = MakeDims(a.shape, a.options);
  CUDA_RETURN_IF_NOT_OK(ApplyRowStrides(a.x_row_stride, a.bc_row_stride, &d));
  CUDA_RETURN_IF_NOT_OK(CheckSmem(d));
  if (const Form rule = Choose(g_fused_rule_switch); !rule.bad.empty()) {
    return InvalidArgument(rule.bad);
  }
  float* saved = static_cast<float*>(a.saved);

  if (const Form dt_form = Choose(g_dt_cumsum_switch); !dt_form.bad.empty()) {
    return InvalidArgument(dt_form.bad);
  }
  ssd_dt_cumsum<<<dim3(d.NC, d.H, d.B), d.Q, 0, stream>>>(d, a.dt, a.a_log, a.dt_bias, saved);
  CUDA_RETURN_IF_LAUNCH_ERROR("ssd_dt_cumsum");
  // C Bᵀ once per (b, c, g) into the saved buffer, on every path (the v3 forward scan and
  // backward dx kernels read it; the backward may run a different kernel selection).
  {
    const int tiles = d.Q / kTile;
    const size_t smem = SmemOf<CarveBmmCb<CarveSize>>(d);
    CUDA_RETURN_IF_NOT_OK(SetSmem(ssd_bmm_cb, smem));
    ssd_bmm_cb<<<dim3(d.NC * tiles * (tiles + 1) / 2, d.G, d.B), kThreads, smem, stream>>>(
        d, a.b, a.c, saved);
    CUDA_RETURN_IF_LAUNCH_ERROR("ssd_bmm_cb");
  }

  return ForwardKernels<MmaPtx>(a, d, saved, stream);
}

CudaResult SsdBackward(const SsdBackwardArgs& a, DeviceAllocator* scratch, cudaStream_t stream) {
  CUDA_RETURN_IF_NOT_OK(SsdCheck(a.shape, a.options));
  if (!a.x || !a.dt || !a.a_log || !a.dt_bias || !a.b || !a.c || !a.saved || !a.dy || !a.dx ||
      !a.ddt || !a.db || !a.dc || !a.da_log || !a.ddt_bias || scratch == nullptr) {
    return InvalidArgument("ssd backward: a required pointer is null");
  }
  if (!Aligned(a.x) || !Aligned(a.b) || !Aligned(a.c) || !Aligned(a.dy) || !Aligned(a.dx) ||
      !Aligned(a.saved) || !Aligned(a.d_final_state) || !Aligned(a.d_initial_state)) {
    return InvalidArgument("ssd backward: bf16 tensors, saved and states must be 16-byte aligned");
  }
  if (!Aligned(a.db) || !Aligned(a.dc)) {
    return InvalidArgument("ssd backward: db and dc must be 16-byte aligned");
  }
  Dims d = MakeDims(a.shape, a.options);
  CUDA_RETURN_IF_NOT_OK(ApplyRowStrides(a.x_row_stride, a.bc_row_stride, &d));
  CUDA_RETURN_IF_NOT_OK(CheckSmem(d));
  if (const Form rule = Choose(g_fused_rule_switch); !rule.bad.empty()) {
    return InvalidArgument(rule.bad);
  }

  // Head splits for the v2 dB/dC kernels: enough blocks to cover the chip about twice.
  const int64_t base = static_cast<int64_t>(d.B) * d.NC * (d.Q / kTile) * d.G;
  int nsplit = 1;
  for (int k = 1; k <= d.hpg; ++k) {
    if (d.hpg % k != 0) continue;
    nsplit = k;
    if (base * k >= 264 || k >= 8) break;
  }
  const RegPlan plan = PlanReg(d);
  const unsigned pass_blocks = static_cast<unsigned>(CeilDiv(d.PN, 1024));
  const int64_t ncq = static_cast<int64_t>(d.NC) * d.Q;
  const int tiles = d.Q / kTile;
  const int64_t n_dsg = static_cast<int64_t>(d.B) * d.H * d.NC * d.PN;
  const int ddecay_parts = plan.state && UseFusedStatePass(d)
                               ? (d.N + StateSlice(d) - 1) / StateSlice(d)
                               : static_cast<int>(pass_blocks);
  const int64_t n_ddecay = static_cast<int64_t>(d.B) * d.H * d.NC * ddecay_parts;
  const int64_t n_part = 3LL * d.B * d.NC * d.H;  // doubles
  const int64_t n_bc = plan.dbc ? 0 : static_cast<int64_t>(nsplit) * d.B * ncq * d.G * d.N;
  const bool need_bf = plan.dx || plan.dbc;
  const int64_t n_stbf = need_bf ? n_dsg : 0;  // bf16 G_{c+1}
  const bool run_dcb = plan.dx || plan.dbc;  // ssd_bwd_dcb_reg feeds both (BackwardKernels)
  const int pairs = tiles * (tiles + 1) / 2;
  const int64_t n_own = plan.dx ? static_cast<int64_t>(d.B) * d.H * ncq : 0;
  const int64_t n_ddtx = plan.dx ? static_cast<int64_t>(d.B) * d.H * ncq : 0;
  // doubles: Σ dy·x, A·∂A (difference form), Σ dl, per [B, NC, H, Q/64]
  const int64_t n_ddp = plan.dx ? 3LL * d.B * d.NC * d.H * tiles : 0;
  const int dcb_split = DcbSplit(d);
  const int64_t n_dcb =
      run_dcb ? static_cast<int64_t>(dcb_split) * d.B * d.NC * d.G * d.Q * d.Q : 0;
  const int inter_parts = d.N / 64;  // ssd_bwd_dbc_smem's column slices (plan.dx: N % 64 == 0)
  const int64_t n_inter = plan.dx ? inter_parts * static_cast<int64_t>(d.B) * d.H * ncq : 0;
  const int64_t n_dcb_bf = plan.dbc ? 2LL * d.B * d.NC * d.G * d.Q * d.Q : 0;
  const int64_t n_pair = run_dcb ? static_cast<int64_t>(d.B) * d.H * d.NC * pairs * 2 * kTile : 0;
  const int64_t n_dpair = run_dcb ? static_cast<int64_t>(d.B) * d.NC * d.H * pairs : 0;
  auto up = [](int64_t bytes) { return (bytes + 255) / 256 * 256; };
  const int64_t off_ddecay = up(n_dsg * 4);
  const int64_t off_part = off_ddecay + up(n_ddecay * 4);
  const int64_t off_dbp = off_part + up(n_part * 8);
  const int64_t off_dcp = off_dbp + up(n_bc * 4);
  const int64_t off_gbf = off_dcp + up(n_bc * 4);
  const int64_t off_own = off_gbf + up(n_stbf * 2);
  const int64_t off_ddtx = off_own + up(n_own * 4);
  const int64_t off_ddp = off_ddtx + up(n_ddtx * 4);
  const int64_t off_dcb = off_ddp + up(n_ddp * 8);
  const int64_t off_pair = off_dcb + up(n_dcb * 4);
  const int64_t off_dpair = off_pair + up(n_pair * 4);
  const int64_t off_dcb_bf = off_dpair + up(n_dpair * 8);
  const int64_t off_inter = off_dcb_bf + up(n_dcb_bf * 2);
  const Form dcb_sum = Choose(g_dcb_sum_switch);
  if (!dcb_sum.bad.empty()) return InvalidArgument(dcb_sum.bad);
  const int64_t total = off_inter + up(n_inter * 4);
  DeviceBuffer buf;
  CUDA_RETURN_IF_NOT_OK(scratch->Allocate(static_cast<size_t>(total), &buf));
  char* base_ptr = buf.as<char>();
  BwdScratch sc{};
  sc.dsg = reinterpret_cast<float*>(base_ptr);
  sc.ddecay = reinterpret_cast<float*>(base_ptr + off_ddecay);
  sc.part = reinterpret_cast<double*>(base_ptr + off_part);
  sc.dbp = reinterpret_cast<float*>(base_ptr + off_dbp);
  sc.dcp = reinterpret_cast<float*>(base_ptr + off_dcp);
  sc.nsplit = nsplit;
  sc.dcb_split = dcb_split;
  sc.pass_blocks = static_cast<int>(pass_blocks);
  sc.ddecay_parts = ddecay_parts;
  if (need_bf) {
    sc.g_bf = reinterpret_cast<bf16*>(base_ptr + off_gbf);
  }
  if (plan.dx) {
    sc.dacs_own = reinterpret_cast<float*>(base_ptr + off_own);
    sc.ddtx = reinterpret_cast<float*>(base_ptr + off_ddtx);
    sc.dd_part = reinterpret_cast<double*>(base_ptr + off_ddp);
  }
  if (run_dcb) {
    sc.dcb = reinterpret_cast<float*>(base_ptr + off_dcb);
    sc.dacs_pair = reinterpret_cast<float*>(base_ptr + off_pair);
    sc.dpair = reinterpret_cast<double*>(base_ptr + off_dpair);
  }
  if (plan.dbc) sc.dcb_bf = reinterpret_cast<bf16*>(base_ptr + off_dcb_bf);
  if (plan.dx) sc.inter_part = reinterpret_cast<float*>(base_ptr + off_inter);
  double* part = sc.part;

  // GYRE_SSD_SIDE_STREAM=hi (default): the dCB → dB/dC chain on the side stream and the state
  // passes on the crit stream (v3 dB/dC only), joined before ssd_bwd_dacs_finish. Declared after
  // `buf`, so an early return joins before the scratch goes back to the allocator.
  const SideChoice side_mode = SideMode();
  if (!side_mode.bad.empty()) return InvalidArgument(side_mode.bad);
  SideFork fork(stream);
  if (plan.dbc && side_mode.fork) CUDA_RETURN_IF_NOT_OK(fork.Begin());
  CUDA_RETURN_IF_NOT_OK(BackwardKernels<MmaPtx>(a, d, plan, sc, stream, &fork));
  CUDA_RETURN_IF_NOT_OK(fork.Join());

  ssd_param_reduce<<<d.H, 256, 0, stream>>>(d, part, a.a_log, a.da_log, a.ddt_bias,
                                            a.d != nullptr ? a.dd : nullptr);
  CUDA_RETURN_IF_LAUNCH_ERROR("ssd_param_reduce");
  return {};
}

}  // namespace gyre::cuda
