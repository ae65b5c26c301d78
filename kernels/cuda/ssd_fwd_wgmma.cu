// ssd_chunk_scan_fwd_wg: the SSD forward's chunk scan (y = e^{Acs_l} C_l H_cᵀ + Σ_{s≤l} M_ls x_s
// + D x_l; ssd.cu's header has the math) on Hopper warpgroup MMA. Helper ssdf13, session 13;
// ssd_notes.md "Session 13 (helper ssdf13)" has the counts and the outcome.
//
// The work split is ssd_chunk_scan_fwd_pair_xs's: one 128-thread block (one warpgroup) per
// (b, c, h) and pair of 64-row l-tiles (p, T−1−p), so every block has the same work. What
// differs:
//  - Every s-tile product is one wgmma m64n64k16 chain with A from registers (the warp's 16
//    rows of the masked, decayed C Bᵀ tile, exactly as the mma.sync code forms them) and B (x_s)
//    from shared memory in the 128-byte swizzle layout:
//    the B tile is read once per warpgroup by the tensor cores instead of once per warp through
//    ldmatrix, and one instruction replaces 8 mma.sync + 4 ldmatrix per k16 step.
//  - The inter-chunk product is N/64 K = 64 items of shared-memory wgmmas (A = C_l's 64-column
//    half, B = H_c's, both K-major) into the accumulator, scaled by e^{Acs_l} in fp32 once
//    complete (while the first s-tile's A fragments are prepared); the s-tile items then
//    accumulate into the same registers. H_c's halves travel with the C_l halves in the same
//    ring slots (H_c is read once per l-tile: +12.5% L2 bytes over pair_xs).
//  - The off-diagonal column factors are formed once per l-tile in shared memory.
//  - Items are uniform 16 KB slots (A tile 8 KB + B tile 8 KB): C_l half + H_c half, or the
//    C Bᵀ tile + x_s. The ring has 3 slots; the wgmma of item k stays in flight through
//    item k+1's barrier, load issue, ldmatrix and scaling (wgmma.wait_group 0 only right before
//    item k+1's A registers are written: waiting there, not after the commit with wait_group 1,
//    is what keeps ptxas from serialising the wgmmas, warning C7513), so a slot is refilled two
//    items after its use and the load lookahead is one item (as in pair_xs).
//
// Items of an l-tile lt: NH = N/64 inter halves, then s-tiles 0..lt (diagonal last, whose x_s
// tile holds the l-tile's own rows: the D·x term reads it). Every sum is in a fixed order
// (deterministic), but not pair_xs's order: not bitwise the same as pair_xs (which still runs
// the shapes this kernel does not take: P != 64, N % 64 != 0).
//
// Measured (H200, session 13, ssd_notes.md / bench/RESULTS.md): kernel 337 → 244 µs at B8 S2048
// H64 (−28%), 256 → 187 µs at B16 S2048 H24; with ssd_bwd_dbc_wg below, fwd+bwd −11% at both.
#include "kernels/cuda/ssd_fwd_wgmma.h"

#include <algorithm>
#include <string>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/hopper_mma.cuh"
#include "kernels/cuda/ssd_device.cuh"

namespace gyre::cuda {
namespace {

using bf16 = __nv_bfloat16;
using namespace hopper;

constexpr int kWgThreads = 128;
constexpr int kTileRows = 64;
constexpr uint32_t kTileBytes = 64 * 128;        // 64 rows × 64 bf16, swizzled
constexpr uint32_t kSlotBytes = 2 * kTileBytes;  // A tile + B tile

// (CpAsyncCommit, CpAsyncWait<kPending>: ssd_device.cuh.)
__device__ __forceinline__ void Cp4(uint32_t dst, const float* src, bool ok) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src),
               "r"(ok ? 4 : 0));
}

// The warp's 16 rows of the swizzled 64×64 tile at `tile` as m16n8k16 A fragments (K = 64).
__device__ __forceinline__ void LoadTileASw(uint32_t (&fa)[4][4], uint32_t tile) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, q = lane / 8, r = lane % 8;
  const int row = warp * 16 + 8 * (q % 2) + r;  // row % 8 == r
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int ch = 2 * k + q / 2;
    const uint32_t addr = tile + row * 128 + ((ch ^ r) << 4);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(fa[k][0]), "=r"(fa[k][1]), "=r"(fa[k][2]), "=r"(fa[k][3])
                 : "r"(addr));
  }
}

// acc += A·B over K = 64, issued and committed (not waited for): A from the registers fa (four
// k16 steps), B the N-major 64×64 tile that follows the A tile at a_tile in its ring slot.
__device__ __forceinline__ void WgmmaRsAccumulate(float (&acc)[32], const uint32_t (&fa)[4][4],
                                                  uint32_t a_tile) {
  const uint64_t db = SmemDescSw128(a_tile + kTileBytes, kTileBytes, 1024);
  WgmmaFence();
#pragma unroll
  for (int ks = 0; ks < 4; ++ks) WgmmaRS64Pred<1>(acc, fa[ks], db + 128 * ks, 1);
  WgmmaCommit();
}

__device__ __forceinline__ uint32_t Pack(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
// A fragments ↔ accumulator layout s[8][4] (n8 tile j, element e: row g + 8·(e/2), column
// 8j + 2t + e%2), as ssd.cu's AToAcc / AccToA.
__device__ __forceinline__ void FragToAcc(const uint32_t (&fa)[4][4], float (&s)[8][4]) {
#pragma unroll
  for (int k = 0; k < 4; ++k)
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const float2 v = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&fa[k][q]));
      s[2 * k + q / 2][2 * (q % 2)] = v.x;
      s[2 * k + q / 2][2 * (q % 2) + 1] = v.y;
    }
}
__device__ __forceinline__ void AccToFrag(const float (&s)[8][4], uint32_t (&fa)[4][4]) {
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    fa[k][0] = Pack(s[2 * k][0], s[2 * k][1]);
    fa[k][1] = Pack(s[2 * k][2], s[2 * k][3]);
    fa[k][2] = Pack(s[2 * k + 1][0], s[2 * k + 1][1]);
    fa[k][3] = Pack(s[2 * k + 1][2], s[2 * k + 1][3]);
  }
}

// grid (NC·ceil(T/2), H, B), 128 threads; dynamic shared memory: 1024 (alignment) + 3 · 16 KB +
// 12·Q bytes (the chunk's Acs and dt, the l-tile's column factors). Four blocks per SM at
// P64 N128 Q256 (123 registers, 53 KB).
// The off-diagonal tiles' column factors dt_s·e^{Acs_l0 − Acs_s} are formed once per l-tile
// into shared memory (one exponential per column per block, not one in each of the 32 threads
// that hold the column; session 13's form wgc, bitwise the same as without). The inter product
// is shared-memory wgmmas (A = C_l straight from the slot) into the accumulator, scaled by
// e^{Acs_l} in fp32 once complete (pair_xs's numerics for that term; form wgs; the first form,
// wg, scaled C_l's rows in registers before a register-A product: more instructions, and one
// more bf16 rounding).
__global__ void __launch_bounds__(kWgThreads, 4) ssd_chunk_scan_fwd_wg(SsdScanFwdWgArgs d) {
  constexpr int kSlots = 3;
  constexpr int kLook = kSlots - 2;  // items loaded ahead of the one being multiplied
  extern __shared__ __align__(1024) char smem_raw[];
  const uint32_t raw_addr = SmemAddr(smem_raw);
  const uint32_t pad = ((raw_addr + 1023u) & ~1023u) - raw_addr;
  char* smem = smem_raw + pad;
  const uint32_t ring = raw_addr + pad;
  float* acs_c = reinterpret_cast<float*>(smem + kSlots * kSlotBytes);
  float* dt_c = acs_c + d.Q;
  float* cf_c = dt_c + d.Q;  // column factors of the current l-tile's s < l0

  const int T = d.Q / kTileRows, pairs = (T + 1) / 2;
  const int c = blockIdx.x / pairs, pr = blockIdx.x % pairs, h = blockIdx.y, b = blockIdx.z;
  const int g = h / d.hpg;
  const int c0 = c * d.Q;
  const int len = min(d.Q, d.S - c0);
  const int nT = (len + kTileRows - 1) / kTileRows;
  const int ta = pr, tb = (T - 1 - pr > pr && T - 1 - pr < nT) ? T - 1 - pr : -1;
  if (ta >= nT) return;
  const int NH = d.N / 64;
  const int Ka = NH + ta + 1;
  const int K = Ka + (tb >= 0 ? NH + tb + 1 : 0);

  const float* sb = d.saved + b * d.per_batch;
  const float* acs_g = sb + d.acs_off + static_cast<int64_t>(h) * d.NC * d.Q + c0;
  const float* dts = sb + d.dt_off;
  const bf16* cbc = reinterpret_cast<const bf16*>(sb + d.cb_off) +
                    static_cast<int64_t>(g) * d.NC * d.Q * d.Q + static_cast<int64_t>(c0) * d.Q;
  const bf16* hc = reinterpret_cast<const bf16*>(sb + d.hbf_off) +
                   (static_cast<int64_t>(h) * d.NC + c) * (64 * d.N);
  const bf16* Cb = d.c + static_cast<int64_t>(b) * d.S * d.ldbc + static_cast<int64_t>(g) * d.N;
  const bf16* xb = d.x + static_cast<int64_t>(b) * d.S * d.ldx + static_cast<int64_t>(h) * 64;

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, tq = lane % 4;
  const int r0 = warp * 16 + lane / 4;  // this thread's rows of the l-tile: r0, r0 + 8

  auto issue = [&](int k) {
    if (k < K) {
      const int lt = k < Ka ? ta : tb;
      const int j = k < Ka ? k : k - Ka;
      const uint32_t a_dst = ring + (k % kSlots) * kSlotBytes, b_dst = a_dst + kTileBytes;
      const int tl0 = c0 + lt * kTileRows;
      if (j < NH) {
        CpAsyncTile64Sw128(a_dst, Cb + tl0 * d.ldbc + 64 * j, d.ldbc, min(kTileRows, d.S - tl0));
        CpAsyncTile64Sw128(b_dst, hc + 64 * j, d.N, kTileRows);
      } else {
        const int st = j - NH, ts0 = c0 + st * kTileRows;
        CpAsyncTile64Sw128(a_dst, cbc + static_cast<int64_t>(lt * kTileRows) * d.Q + st * kTileRows, d.Q,
                   kTileRows);
        CpAsyncTile64Sw128(b_dst, xb + ts0 * d.ldx, d.ldx, min(kTileRows, d.S - ts0));
      }
    }
    CpAsyncCommit();
  };

  // Prologue: the chunk's Acs (padded tokens carry the last value) and dt (0 past the end),
  // joining item 0's group; items 0..kLook−1.
  for (int i = threadIdx.x; i < d.Q; i += kWgThreads) {
    Cp4(SmemAddr(acs_c + i), acs_g + i, true);
    Cp4(SmemAddr(dt_c + i), dts + static_cast<int64_t>(c0 + min(i, len - 1)) * d.H + h, i < len);
  }
#pragma unroll
  for (int k = 0; k < kLook; ++k) issue(k);

  // Item k's data visible to the block, the slot of item k − 2 (whose wgmma was retired in
  // item k − 1, before its A registers were written) refilled with item k + kLook.
  auto begin = [&](int k) {
    CpAsyncWait<kLook - 1>();
    FenceProxyAsync();
    __syncthreads();
    issue(k + kLook);
  };

  float acc[32];
#pragma unroll
  for (int i = 0; i < 32; ++i) acc[i] = 0.f;
  int k = 0;
  for (int li = 0; li < 2; ++li) {
    const int lt = li == 0 ? ta : tb;
    if (lt < 0) break;
    const int l0 = lt * kTileRows;
    float al0 = 0.f, al1 = 0.f, aref = 0.f;
    // Inter-chunk halves: A = C_l[:, 64j..], B = H_c[:, 64j..] (both K-major).
    int j = 0;
    do {
      begin(k);
      if (j == 0) {
        al0 = acs_c[l0 + r0];
        al1 = acs_c[l0 + r0 + 8];
        aref = acs_c[l0];
        // Read from the first s-tile item on (after its barrier); the previous l-tile's
        // readers all passed this item's barrier.
        for (int i = threadIdx.x; i < l0; i += kWgThreads) {
          cf_c[i] = dt_c[i] * __expf(aref - acs_c[i]);
        }
      }
      const uint32_t a_tile = ring + (k % kSlots) * kSlotBytes;
      // acc (=) C_l H_cᵀ over this half, both operands K-major in shared memory.
      const uint64_t da = SmemDescSw128(a_tile, 16, 1024);
      const uint64_t db = SmemDescSw128(a_tile + kTileBytes, 16, 1024);
      WgmmaFence();
#pragma unroll
      for (int ks = 0; ks < 4; ++ks) WgmmaSS64<0, 0>(acc, da + 2 * ks, db + 2 * ks, j > 0 || ks > 0);
      WgmmaCommit();
      WgmmaWait<1>();  // the previous half's wgmma: its slot is refilled at the next barrier
      ++k;
      ++j;
    } while (j < NH);
    // Intra-chunk s-tiles 0..lt: A = the masked, decayed C Bᵀ tile, B = x_s (N-major).
    const float rf0 = __expf(al0 - aref), rf1 = __expf(al1 - aref);
    int st = 0;
    do {
      begin(k);
      const uint32_t a_tile = ring + (k % kSlots) * kSlotBytes;
      const float* as = acs_c + st * kTileRows;
      const float* ds = dt_c + st * kTileRows;
      const float* cs = cf_c + st * kTileRows;
      uint32_t fa[4][4];
      {
        uint32_t raw[4][4];
        LoadTileASw(raw, a_tile);
        float s[8][4];
        FragToAcc(raw, s);
        if (st < lt) {
          // e^{Acs_l − Acs_s} = e^{Acs_l − Acs_l0} · e^{Acs_l0 − Acs_s}, both factors <= 1.
#pragma unroll
          for (int jj = 0; jj < 8; ++jj) {
            const float2 cf = *reinterpret_cast<const float2*>(cs + 8 * jj + 2 * tq);
            s[jj][0] *= cf.x * rf0;
            s[jj][1] *= cf.y * rf0;
            s[jj][2] *= cf.x * rf1;
            s[jj][3] *= cf.y * rf1;
          }
        } else {
          ScaleDiagCausal(s, tq, r0, al0, al1, as, ds);
        }
        WgmmaWait<0>();  // the previous item's wgmma: its A registers and slot are free
        if (st == 0) {
          // The inter product is complete (wait above): y starts as e^{Acs_l} C_l H_cᵀ.
          FenceRegs(acc);
          const float e0 = expf(al0), e1 = expf(al1);
#pragma unroll
          for (int jj = 0; jj < 8; ++jj) {
            acc[4 * jj] *= e0;
            acc[4 * jj + 1] *= e0;
            acc[4 * jj + 2] *= e1;
            acc[4 * jj + 3] *= e1;
          }
        }
        AccToFrag(s, fa);
      }
      WgmmaRsAccumulate(acc, fa, a_tile);
      ++k;
      ++st;
    } while (st <= lt);
    WgmmaWait<0>();
    FenceRegs(acc);
    // y = acc + D x for the rows inside the sequence; x_l is the diagonal item's B tile.
    const char* xs = smem + ((k - 1) % kSlots) * kSlotBytes + kTileBytes;
    const int tl0 = c0 + l0, lv = min(kTileRows, d.S - tl0);
    const float dsk = d.dskip != nullptr ? d.dskip[h] : 0.f;
    bf16* yb = d.y + static_cast<int64_t>(b) * d.S * d.ldy + static_cast<int64_t>(h) * 64;
#pragma unroll
    for (int e2 = 0; e2 < 2; ++e2) {
      const int row = r0 + 8 * e2;
      if (row < lv) {
        const int64_t yoff = (tl0 + row) * d.ldy;
#pragma unroll
        for (int jj = 0; jj < 8; ++jj) {
          const float2 xv = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(
              xs + row * 128 + ((jj ^ (row & 7)) << 4) + tq * 4));
          *reinterpret_cast<__nv_bfloat162*>(yb + yoff + 8 * jj + 2 * tq) =
              __floats2bfloat162_rn(acc[4 * jj + 2 * e2] + dsk * xv.x,
                                    acc[4 * jj + 2 * e2 + 1] + dsk * xv.y);
        }
      }
    }
  }
}



// ------------------------------------------------------------------ dB / dC (backward)
//
// ssd_bwd_dbc_wg<kDB, kInter>: ssd.cu's ssd_bwd_dbc_smem (which documents the math) on wgmma,
// for P = 64 and N % 64 == 0: one 128-thread block per (own 64-row tile, 64 columns of N, g,
// b) of dC (kDB false) or dB. Steps: the other tiles' dCB products (A = the dCB tile, B = the
// C_l / B_s slice), then the group's heads (A = the head's dy / x own rows scaled by e^{Acs_l}
// or e^{Acs_last − Acs_s} dt_s, rounded to bf16 as ssd_bwd_dbc_smem does; B = the H_c / G_{c+1}
// slice): all wgmma m64n64k16 with A from registers and B N-major from swizzled shared memory
// (one instruction form, so ptxas keeps the chain asynchronous). The ring is the forward scan's
// (three 16 KB slots, one step of lookahead, the step's wgmma running under the next step's
// barrier and A-fragment preparation). kInter (dC blocks of the v3 dx path): each head's product
// goes to its own accumulator t, waited for, dotted with the own rows' C slice (held in
// registers) into inter_out, and added to the running one, as ssd_bwd_dbc_smem does. dC and dB
// are two launches (a wgmma chain under a block-uniform branch between two accumulator sets
// would be serialised by ptxas).
template <bool kDB, bool kInter>
__global__ void __launch_bounds__(kWgThreads, 4) ssd_bwd_dbc_wg(SsdDbcWgArgs d) {
  constexpr int kSlots = 3, kLook = 1;
  constexpr int kScal = 136;  // floats per slot: own rows' Acs [64], dt [64], Acs_last
  extern __shared__ __align__(1024) char smem_raw[];
  const uint32_t raw_addr = SmemAddr(smem_raw);
  const uint32_t pad = ((raw_addr + 1023u) & ~1023u) - raw_addr;
  char* smem = smem_raw + pad;
  const uint32_t ring = raw_addr + pad;
  float* scal = reinterpret_cast<float*>(smem + kSlots * kSlotBytes);

  const int tiles = d.Q / kTileRows, nsl = d.N / 64;
  const int c = blockIdx.x / tiles, ot = blockIdx.x % tiles, b = blockIdx.z;
  const int g = blockIdx.y / nsl, n0 = (blockIdx.y % nsl) * 64;
  const int c0 = c * d.Q;
  const int len = min(d.Q, d.S - c0);
  const int nT = (len + kTileRows - 1) / kTileRows;
  if (ot >= nT) return;
  const int o0 = ot * kTileRows, ov = min(kTileRows, len - o0);
  const float* sb = d.saved + b * d.per_batch;
  const float* dt_g = sb + d.dt_off;
  const int n1 = kDB ? nT - ot : ot + 1;  // other tiles
  const int nsteps = n1 + d.hpg;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, tq = lane % 4;
  const int r0 = warp * 16 + lane / 4;
  const int64_t bc_base = static_cast<int64_t>(b) * d.S * d.ldbc + static_cast<int64_t>(g) * d.N;

  auto issue = [&](int step) {
    if (step < nsteps) {
      const int sl = step % kSlots;
      const uint32_t a_dst = ring + sl * kSlotBytes, b_dst = a_dst + kTileBytes;
      if (step < n1) {
        const int o = kDB ? ot + step : step;
        const int t0 = c0 + o * kTileRows;
        const int64_t n_all = static_cast<int64_t>(d.B) * d.NC * d.G * d.Q * d.Q;
        const bf16* t = d.dcb_bf + (kDB ? n_all : 0) +
                        ((static_cast<int64_t>(b) * d.NC + c) * d.G + g) * d.Q * d.Q +
                        static_cast<int64_t>(o0) * d.Q + o * kTileRows;
        CpAsyncTile64Sw128(a_dst, t, d.Q, kTileRows);
        CpAsyncTile64Sw128(b_dst, (kDB ? d.c : d.b) + bc_base + t0 * d.ldbc + n0, d.ldbc,
                   min(kTileRows, d.S - t0));
      } else {
        const int h = g * d.hpg + (step - n1);
        const int64_t row0 = static_cast<int64_t>(b) * d.S + c0 + o0;
        const bf16* a_src = kDB ? d.x + row0 * d.ldx + static_cast<int64_t>(h) * 64
                                : d.dy + row0 * d.ldy + static_cast<int64_t>(h) * 64;
        CpAsyncTile64Sw128(a_dst, a_src, kDB ? d.ldx : d.ldy, ov);
        const bf16* st = kDB ? d.st_g + ((static_cast<int64_t>(b) * d.H + h) * d.NC + c) * (64 * d.N)
                             : reinterpret_cast<const bf16*>(sb + d.hbf_off) +
                                   (static_cast<int64_t>(h) * d.NC + c) * (64 * d.N);
        CpAsyncTile64Sw128(b_dst, st + n0, d.N, 64);
        if (threadIdx.x < kTileRows) {
          const int r = threadIdx.x;
          const float* acs_h = sb + d.acs_off + static_cast<int64_t>(h) * d.NC * d.Q + c0;
          float* sc = scal + sl * kScal;
          Cp4(SmemAddr(sc + r), acs_h + o0 + r, true);
          if (kDB) {
            Cp4(SmemAddr(sc + 64 + r), dt_g + static_cast<int64_t>(c0 + o0 + min(r, ov - 1)) * d.H + h,
                r < ov);
            if (r == 0) Cp4(SmemAddr(sc + 128), acs_h + d.Q - 1, true);
          }
        }
      }
    }
    CpAsyncCommit();
  };

  // The own rows' C slice (kInter), as bf16 pairs in this thread's accumulator layout.
  uint32_t cown[8][2];
  if constexpr (kInter) {
#pragma unroll
    for (int e2 = 0; e2 < 2; ++e2) {
      const int row = r0 + 8 * e2;
      const bf16* cr = d.c + bc_base + static_cast<int64_t>(c0 + o0 + row) * d.ldbc + n0;
#pragma unroll
      for (int jj = 0; jj < 8; ++jj) {
        cown[jj][e2] = row < ov ? *reinterpret_cast<const uint32_t*>(cr + 8 * jj + 2 * tq) : 0u;
      }
    }
  }

#pragma unroll
  for (int k = 0; k < kLook; ++k) issue(k);
  float acc[32];
#pragma unroll
  for (int i = 0; i < 32; ++i) acc[i] = 0.f;
  float t[32];
#pragma unroll
  for (int i = 0; i < 32; ++i) t[i] = 0.f;
  int step = 0;
  // dCB steps (n1 >= 1 always: the own tile itself).
  do {
    CpAsyncWait<kLook - 1>();
    FenceProxyAsync();
    __syncthreads();
    issue(step + kLook);
    const uint32_t a_tile = ring + (step % kSlots) * kSlotBytes;
    uint32_t fa[4][4];
    WgmmaWait<0>();  // the previous step's wgmma (its A registers, its slot)
    LoadTileASw(fa, a_tile);
    WgmmaRsAccumulate(acc, fa, a_tile);
    ++step;
  } while (step < n1);
  if constexpr (kInter) {
    // The head steps add t into acc with ordinary instructions: the dCB chain retires here
    // (without this wait ptxas serialised the kernel's wgmmas, C7515).
    WgmmaWait<0>();
    FenceRegs(acc);
  }
  // Head steps (hpg >= 1: a do-while, so that no path skips the loop with the dCB steps' wgmma
  // still in flight; a zero-trip path drew ptxas C7515 in the mLSTM kernels).
  do {
    CpAsyncWait<kLook - 1>();
    FenceProxyAsync();
    __syncthreads();
    issue(step + kLook);
    const int sl = step % kSlots;
    const uint32_t a_tile = ring + sl * kSlotBytes;
    const float* sc = scal + sl * kScal;
    float sc0, sc1;
    if (kDB) {
      const float last = sc[128];
      sc0 = expf(last - sc[r0]) * sc[64 + r0];
      sc1 = expf(last - sc[r0 + 8]) * sc[64 + r0 + 8];
    } else {
      sc0 = expf(sc[r0]);
      sc1 = expf(sc[r0 + 8]);
    }
    uint32_t fa[4][4];
    {
      uint32_t raw[4][4];
      LoadTileASw(raw, a_tile);
      float s[8][4];
      FragToAcc(raw, s);
#pragma unroll
      for (int jj = 0; jj < 8; ++jj) {
        s[jj][0] *= sc0;
        s[jj][1] *= sc0;
        s[jj][2] *= sc1;
        s[jj][3] *= sc1;
      }
      WgmmaWait<0>();
      AccToFrag(s, fa);
    }
    const uint64_t db = SmemDescSw128(a_tile + kTileBytes, kTileBytes, 1024);
    WgmmaFence();
    if constexpr (kInter) {
#pragma unroll
      for (int ks = 0; ks < 4; ++ks) WgmmaRS64Pred<1>(t, fa[ks], db + 128 * ks, ks > 0);
      WgmmaCommit();
      WgmmaWait<0>();
      FenceRegs(t);
      float i0 = 0.f, i1 = 0.f;
#pragma unroll
      for (int jj = 0; jj < 8; ++jj) {
        const float2 u0 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&cown[jj][0]));
        const float2 u1 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&cown[jj][1]));
        i0 += t[4 * jj] * u0.x + t[4 * jj + 1] * u0.y;
        i1 += t[4 * jj + 2] * u1.x + t[4 * jj + 3] * u1.y;
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[4 * jj + e] += t[4 * jj + e];
      }
      i0 += __shfl_xor_sync(0xffffffffu, i0, 1);
      i0 += __shfl_xor_sync(0xffffffffu, i0, 2);
      i1 += __shfl_xor_sync(0xffffffffu, i1, 1);
      i1 += __shfl_xor_sync(0xffffffffu, i1, 2);
      if (tq == 0) {
        const int h = g * d.hpg + (step - n1);
        float* io = d.inter_out + ((static_cast<int64_t>(n0 / 64) * d.B + b) * d.H + h) * d.NC * d.Q +
                    c0 + o0;
        io[r0] = i0;
        io[r0 + 8] = i1;
      }
    } else {
#pragma unroll
      for (int ks = 0; ks < 4; ++ks) WgmmaRS64Pred<1>(acc, fa[ks], db + 128 * ks, 1);
      WgmmaCommit();
    }
    ++step;
  } while (step < nsteps);
  WgmmaWait<0>();
  FenceRegs(acc);
  bf16* out = kDB ? d.db : d.dc;
#pragma unroll
  for (int e2 = 0; e2 < 2; ++e2) {
    const int row = r0 + 8 * e2;
    if (row < ov) {
      bf16* orow = out + bc_base + static_cast<int64_t>(c0 + o0 + row) * d.ldbc + n0;
#pragma unroll
      for (int jj = 0; jj < 8; ++jj)
        *reinterpret_cast<__nv_bfloat162*>(orow + 8 * jj + 2 * tq) =
            __floats2bfloat162_rn(acc[4 * jj + 2 * e2], acc[4 * jj + 2 * e2 + 1]);
    }
  }
}

template <bool kDB, bool kInter>
CudaResult LaunchDbc(const SsdDbcWgArgs& a, cudaStream_t stream) {
  const size_t smem = 1024 + 3 * kSlotBytes + 3 * 136 * sizeof(float);
  CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(ssd_bwd_dbc_wg<kDB, kInter>,
                                            cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(smem)));
  ssd_bwd_dbc_wg<kDB, kInter><<<dim3(a.NC * (a.Q / kTileRows), a.G * (a.N / 64), a.B), kWgThreads,
                                smem, stream>>>(a);
  CUDA_RETURN_IF_LAUNCH_ERROR("ssd_bwd_dbc_wg");
  return {};
}

}  // namespace

bool SsdScanFwdWgSupports(int P, int N, int Q) {
  return P == 64 && N % 64 == 0 && N >= 64 && N <= 256 && Q % 64 == 0 && Q <= 1024;
}

CudaResult LaunchSsdScanFwdWg(const SsdScanFwdWgArgs& a, cudaStream_t stream) {
  if (!SsdScanFwdWgSupports(a.P, a.N, a.Q)) {
    return InvalidArgument("ssd_chunk_scan_fwd_wg: unsupported head_dim " + std::to_string(a.P) +
                           " / state_dim " + std::to_string(a.N) + " / chunk " +
                           std::to_string(a.Q));
  }
  const size_t smem = 1024 + 3 * kSlotBytes + 3 * sizeof(float) * a.Q;
  CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(ssd_chunk_scan_fwd_wg,
                                            cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(smem)));
  const int T = a.Q / kTileRows;
  ssd_chunk_scan_fwd_wg<<<dim3(a.NC * ((T + 1) / 2), a.H, a.B), kWgThreads, smem, stream>>>(a);
  CUDA_RETURN_IF_LAUNCH_ERROR("ssd_chunk_scan_fwd_wg");
  return {};
}

}  // namespace gyre::cuda

namespace gyre::cuda {

bool SsdDbcWgSupports(int P, int N, int Q) {
  return P == 64 && N % 64 == 0 && N >= 64 && Q % 64 == 0 && Q <= 1024;
}

CudaResult LaunchSsdDbcWg(const SsdDbcWgArgs& a, cudaStream_t stream) {
  if (!SsdDbcWgSupports(a.P, a.N, a.Q)) {
    return InvalidArgument("ssd_bwd_dbc_wg: unsupported head_dim " + std::to_string(a.P) +
                           " / state_dim " + std::to_string(a.N) + " / chunk " +
                           std::to_string(a.Q));
  }
  if (a.inter_out != nullptr) {
    CUDA_RETURN_IF_NOT_OK((LaunchDbc<false, true>(a, stream)));
  } else {
    CUDA_RETURN_IF_NOT_OK((LaunchDbc<false, false>(a, stream)));
  }
  return LaunchDbc<true, false>(a, stream);
}

}  // namespace gyre::cuda
