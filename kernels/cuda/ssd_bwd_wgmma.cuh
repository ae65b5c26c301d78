// SSD backward dx on warpgroup MMA, one block per (b, c, h) chunk (helper ssdx13, session 13):
// `ssd_bwd_dx_wgc`, the default bwd dx (ssd.cu, LaunchDxReg; GYRE_SSD_BWD_DX=wgc, the only
// accepted value) wherever its shapes allow. Included by ssd.cu inside its anonymous namespace,
// after ssd_chunk_scan_bwd_dx_early (whose comment documents the math and the outputs: this kernel
// writes the same dx, ddtx, dacs_own and dd_part, with the same per-s-tile partial layout, so
// ssd_bwd_dacs_finish and ssd_param_reduce are unchanged). Shapes: P = 64, N in {64, 128},
// Q <= 256; other shapes run the early kernel.
//
// Why a new block shape (ssd_notes.md "Session 13"): the early kernel's block owns one 64-row
// s-tile (16,384 blocks at B8 S2048 H64), so each (b, c, h) loads G_{c+1} four times and the dy
// tile of l-tile lt (lt + 1) times (352 KB of L2 → SM traffic per (b, c, h)), and every block's
// life is a serial chain of round trips and barriers at 4 warps per scheduler (ssd8's ncu: 8.0
// cycles per issued instruction, long-scoreboard stalls). Here one block of two warpgroups owns
// the whole chunk: the chunk's dy tiles (the wgmma B operand, 128-byte swizzle) and G_{c+1}
// (swizzled, the state product's B operand) are loaded once, in one round trip with the first
// s-tiles' B_s and C Bᵀ tiles, and stay resident; warpgroup w owns s-tiles {w, T−1−w} (at
// Q = 256: {0, 3} and {1, 2}, five tile pairs each), so the two finish together. Products:
//   - state product B_s G_{c+1}ᵀ: wgmma m64n64k16, both operands K-major from shared memory
//     (N/16 instructions per warpgroup instead of N/16 · (P/8 mma.sync + P/16 + 1 ldmatrix)
//     per warp);
//   - pair products M·dy_l: wgmma m64n64k16 with A = M from registers (the C Bᵀ tile read with
//     ldmatrix.trans, decayed and masked exactly as the early kernel does, same bf16 values) and
//     B = dy_l from the resident swizzled tiles (N-major).
// Each warpgroup streams its C Bᵀ tiles through two slots (one tile ahead, cp.async) and syncs
// on its own named barrier, never the other's. Shared memory at P64 N128 Q256: ~101 KB, two
// blocks (16 warps) per SM. No atomics; all sums in a fixed order: bitwise reproducible run to
// run (ssd_gpu_test's rerun lines). Measured (H200, ncu): 496.6 → 362.2 µs at B8 S2048 H64,
// 376.7 → 280.6 µs at B16 S2048 H24 against the early kernel (bench/RESULTS.md, session 13).

constexpr int kDxcThreads = 256;  // two consumer warpgroups

// Byte offsets of the shared-memory regions (from a 1024-byte aligned base; every operand region
// keeps that alignment, the swizzle's period). Per warpgroup: slot 0 (a C Bᵀ tile, padded rows
// of kLdCb for ldmatrix) and the B_s region (B_s swizzled for the state product; after it, C Bᵀ
// slot 1).
struct DxcLayout {
  // Warpgroup w's slot 0 at wg + w·wg_bytes, its B_s region cb_bytes after that.
  int dy, g, wg, wg_bytes, cb_bytes, acs, dts, red, total;
};
__host__ __device__ inline int DxcAlign(int v, int a) { return (v + a - 1) / a * a; }
__host__ __device__ inline DxcLayout MakeDxcLayout(int P, int N, int Q) {
  DxcLayout l;
  const int T = Q / kTile;
  l.cb_bytes = DxcAlign(kTile * kLdCb * 2, 1024);
  const int bs_bytes = DxcAlign(kTile * N * 2 > l.cb_bytes ? kTile * N * 2 : l.cb_bytes, 1024);
  l.wg_bytes = l.cb_bytes + bs_bytes;
  l.dy = 0;
  l.g = l.dy + T * kTile * P * 2;
  l.wg = l.g + P * N * 2;
  l.acs = l.wg + 2 * l.wg_bytes;
  l.dts = l.acs + 2 * Q * 4;
  l.red = DxcAlign(l.dts + Q * 4, 8);
  l.total = l.red + 2 * 3 * 4 * 8 + 1024;  // + alignment slack for the base
  return l;
}

// d[8][4] (the m16n8 tile layout: warp w's 16 rows of the 64) += A·B, m64n64k16, A (bf16 pairs,
// the m16n8k16 A-fragment layout of this warp's 16 rows) in registers, B N-major in shared
// memory (helper ssd9's wrapper; hopper_mma.cuh has only the n128 register-A form).
__device__ __forceinline__ void DxcWgmmaRS64NMajor(float (&d)[8][4], const unsigned (&a)[4],
                                                   uint64_t desc_b) {
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, {%32,%33,%34,%35}, %36, 1, 1, 1, 1;\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b));
}
// d[8][4] += A·B, m64n64k16, A and B K-major in shared memory (descriptors).
__device__ __forceinline__ void DxcWgmmaSS64KMajor(float (&d)[8][4], uint64_t desc_a,
                                                   uint64_t desc_b) {
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, %32, %33, 1, 1, 1, 0, 0;\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
      : "l"(desc_a), "l"(desc_b));
}

// `rows` rows × width bf16 (width % 64 == 0) through cp.async into the 128-byte-swizzled layout
// at shared address dst (hopper_mma.cuh: width/64 column blocks of kRows × 128 bytes), by the
// `nthreads` threads numbered `tid`; rows >= valid zero-filled. No commit.
template <int kRows>
__device__ __forceinline__ void DxcCpSw128(unsigned dst, const bf16* src, int64_t stride,
                                           int valid, int width, int tid, int nthreads) {
  const int vpr = width / 8;
#pragma unroll 1
  for (int i = tid; i < kRows * vpr; i += nthreads) {
    const int r = i / vpr, ch = i % vpr;
    const bool ok = r < valid;
    const bf16* gp = ok ? src + r * stride + ch * 8 : src;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(
                     dst + hopper::Sw128ChunkOffset<kRows>(r, ch)),
                 "l"(gp), "r"(ok ? 16 : 0));
  }
}

// A 64×64 C Bᵀ tile (row stride src_ld) into padded rows of kLdCb by one warpgroup (tid 0..127).
__device__ __forceinline__ void DxcCpCb(bf16* dst, const bf16* src, int64_t src_ld, int tid) {
#pragma unroll 1
  for (int i = tid; i < kTile * (kTile / 8); i += 128) {
    const int r = i / (kTile / 8), v = (i % (kTile / 8)) * 8;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(SmemAddr(dst + r * kLdCb + v)),
                 "l"(src + r * src_ld + v));
  }
}

// The warp's 16 rows (warp wq of its warpgroup) of the transpose of a 64×64 tile at t (row
// stride kLdCb) as A fragments (K = 64): LoadTileA<true> with the warpgroup-relative warp.
__device__ __forceinline__ void DxcLoadTileAT(unsigned (&fa)[4][4], const bf16* t, int wq) {
  const int lane = threadIdx.x % 32, q = lane / 8, r = lane % 8;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const bf16* p = t + (16 * k + 8 * (q / 2) + r) * kLdCb + wq * 16 + 8 * (q % 2);
    LdMatrixX4<true>(fa[k], SmemAddr(p));
  }
}

// grid (NC, H, B), block kDxcThreads (see the top of this file and ssd_chunk_scan_bwd_dx_early);
// kN = d.N. x of the own rows for the epilogue travels by cp.async into the C Bᵀ slot that the
// last pair step leaves free (issued after that step's barrier, so it lands under the step's
// work); the first measured form (`wgc` in session 13's first device call) read it again from
// global memory after the pair loop, one exposed round trip per s-tile: 4-6% slower kernel.
// (Also tried, both spilled 16-68 bytes at 128 registers: the prologue in two cp.async groups,
// dy last, so that the state product runs while the dy tiles land; the first s-tile's x for dl
// loaded before the prologue's wait.)
template <int kP, int kN>
__global__ void __launch_bounds__(kDxcThreads, 2) ssd_bwd_dx_wgc(
    Dims d, const bf16* x, const bf16* Bm, const float* Dskip, const float* saved, const bf16* dy,
    const bf16* g_bf, bf16* dx, float* dacs_own, float* ddtx, double* dd_part) {
  static_assert(kP == 64, "one 128-byte swizzle column block per dy tile; the m64n64 wrappers");
  static_assert(kN == 64 || kN == 128, "N in whole 128-byte swizzle column blocks");
  constexpr int NP = kP / 8;
  constexpr int kDyTile = kTile * kP * 2;
  extern __shared__ __align__(128) char smem_raw[];
  const int tiles = d.Q / kTile;
  const int c = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int g = h / d.hpg;
  const int c0 = c * d.Q;
  const int len = min(d.Q, d.S - c0);
  const int nT = (len + kTile - 1) / kTile;
  const int64_t bh = static_cast<int64_t>(b) * d.H + h;
  const DxcLayout L = MakeDxcLayout(kP, kN, d.Q);
  char* base = smem_raw + ((1024u - (SmemAddr(smem_raw) & 1023u)) & 1023u);
  const unsigned base_s = SmemAddr(base);
  float* acs = reinterpret_cast<float*>(base + L.acs);
  float* erel = acs + d.Q;
  float* dts = reinterpret_cast<float*>(base + L.dts);
  const int w = threadIdx.x / 128, wt = threadIdx.x % 128;
  const int lane = threadIdx.x % 32, wq = wt / 32, gq = lane / 4, tq = lane % 4;
  const int r0 = wq * 16 + gq;  // own-tile rows r0, r0 + 8
  const int bar_id = 1 + w;     // this warpgroup's named barrier
  double* red = reinterpret_cast<double*>(base + L.red) + w * 12;
  const int wg_off = L.wg + w * L.wg_bytes;
  bf16* slot0 = reinterpret_cast<bf16*>(base + wg_off);
  bf16* slot1 = reinterpret_cast<bf16*>(base + wg_off + L.cb_bytes);  // the B_s region
  const unsigned bs_s = base_s + wg_off + L.cb_bytes, g_s = base_s + L.g, dy_s = base_s + L.dy;

  const int64_t bc_stride = d.ldbc, x_stride = d.ldx, y_stride = d.ldy;
  const bf16* Bb = Bm + BcRow(d, b, 0) + static_cast<int64_t>(g) * d.N;
  const bf16* xb = x + XRow(d, b, 0) + static_cast<int64_t>(h) * kP;
  const bf16* dyb = dy + YRow(d, b, 0) + static_cast<int64_t>(h) * kP;
  bf16* dxb = dx + XRow(d, b, 0) + static_cast<int64_t>(h) * kP;
  // C Bᵀ tile (l-tile lt, s-tile st) starts at row c0 + lt·64, column st·64.
  const bf16* cbs = CbPtr(d, saved, b, g) + static_cast<int64_t>(c0) * d.Q;
  const float* acs_g = AcsPtr(d, saved, b, h) + c0;
  const float* dt_g = DtPtr(d, saved, b);

  // This warpgroup's s-tiles: w, and T−1−w where that is a third or fourth tile (Q = 256: {0, 3}
  // and {1, 2}; Q = 128: {0} and {1}; Q = 64: {0} and none). Tiles past the sequence end skip.
  const int st_a = w, st_b = tiles - 1 - w >= 2 ? tiles - 1 - w : -1;
  auto st_of = [&](int i) { return i == 0 ? st_a : st_b; };
  auto valid_st = [&](int i) { return st_of(i) >= 0 && st_of(i) < nT; };
  // One warpgroup's copies for s-tile st's state product and first pair: B_s (swizzled) and the
  // diagonal C Bᵀ tile (st, st) into slot 0.
  auto issue_first = [&](int st) {
    const int ts0 = c0 + st * kTile, sv = min(kTile, d.S - ts0);
    DxcCpSw128<kTile>(bs_s, Bb + ts0 * bc_stride, bc_stride, sv, kN, wt, 128);
    DxcCpCb(slot0, cbs + static_cast<int64_t>(st * kTile) * d.Q + st * kTile, d.Q, wt);
  };

  // Prologue: the chunk's dy tiles and G_{c+1} by the whole block, each warpgroup's first B_s and
  // diagonal C Bᵀ tile: one cp.async group, one round trip.
  for (int lt = 0; lt < nT; ++lt) {
    const int tl0 = c0 + lt * kTile, lv = min(kTile, d.S - tl0);
    DxcCpSw128<kTile>(dy_s + lt * kDyTile, dyb + tl0 * y_stride, y_stride, lv, kP, threadIdx.x,
                      kDxcThreads);
  }
  DxcCpSw128<kP>(g_s, g_bf + (bh * d.NC + c) * d.PN, kN, kP, kN, threadIdx.x, kDxcThreads);
  if (valid_st(0)) issue_first(st_a);
  CpAsyncCommit();
  // The own rows of x of s-tile st for dl (registers; rows past the end read row 0).
  __nv_bfloat162 xr0[NP], xr1[NP];
  auto load_x = [&](int st) {
    const int ts0 = c0 + st * kTile, sv = min(kTile, d.S - ts0);
    const bf16* p0 = xb + (ts0 + (r0 < sv ? r0 : 0)) * x_stride + 2 * tq;
    const bf16* p1 = xb + (ts0 + (r0 + 8 < sv ? r0 + 8 : 0)) * x_stride + 2 * tq;
#pragma unroll
    for (int j = 0; j < NP; ++j) {
      xr0[j] = *reinterpret_cast<const __nv_bfloat162*>(p0 + 8 * j);
      xr1[j] = *reinterpret_cast<const __nv_bfloat162*>(p1 + 8 * j);
    }
  };
  for (int i = threadIdx.x; i < d.Q; i += kDxcThreads) {
    const float a = acs_g[i];
    acs[i] = a;
    erel[i] = __expf(a - acs_g[i & ~(kTile - 1)]);
    dts[i] = i < len ? dt_g[static_cast<int64_t>(c0 + i) * d.H + h] : 0.f;
  }
  CpAsyncWait<0>();
  hopper::FenceProxyAsync();  // cp.async writes → the wgmma (async proxy) reads
  __syncthreads();
  const float acs_last = acs[d.Q - 1];

  for (int i = 0; i < 2; ++i) {
    if (!valid_st(i)) break;
    const int st = st_of(i);
    const int s0 = st * kTile, ts0 = c0 + s0, sv = min(kTile, d.S - ts0);
    const int n = nT - st;  // l-tiles st..nT−1
    if (i > 0) {
      // Every warp of this warpgroup is past the previous s-tile's reads of slot 0 / slot 1.
      hopper::NamedBarrierSync(bar_id, 128);
      issue_first(st);
      CpAsyncCommit();
    }
    // The own rows of x for dl (registers, loaded before the state product's wait; rows past
    // the end read row 0). The epilogue reads them again from the free C Bᵀ slot, so that they
    // hold no registers through the pair loop.
    const bool ok0 = r0 < sv, ok1 = r0 + 8 < sv;
    const bf16* xp0 = xb + (ts0 + (ok0 ? r0 : 0)) * x_stride + 2 * tq;
    load_x(st);
    if (i > 0) {
      CpAsyncWait<0>();
      hopper::FenceProxyAsync();
      hopper::NamedBarrierSync(bar_id, 128);
    }
    const float as0 = acs[s0 + r0], as1 = acs[s0 + r0 + 8];

    // State term: dX̄ = w_s (B_s Gᵀ), w_s = e^{Acs_last − Acs_s}; dl_s = dt_s x_s·dX̄_s.
    float acc[NP][4];
    ZeroAcc(acc);
    hopper::FenceRegs(acc);
    hopper::WgmmaFence();
    {
      // K = N in k16 steps: +32 bytes inside a column block, the next block kRows·128 bytes on
      // (descriptor units of 16 bytes).
      const uint64_t da0 = hopper::SmemDescSw128(bs_s, 16, 1024);
      const uint64_t db0 = hopper::SmemDescSw128(g_s, 16, 1024);
#pragma unroll
      for (int kk = 0; kk < kN / 16; ++kk) {
        const unsigned koff = (kk % 4) * 32;
        DxcWgmmaSS64KMajor(acc, da0 + (((kk / 4) * (kTile * 128) + koff) >> 4),
                           db0 + (((kk / 4) * (kP * 128) + koff) >> 4));
      }
    }
    hopper::WgmmaCommit();
    hopper::WgmmaWait<0>();
    hopper::FenceRegs(acc);
    float dl0 = 0.f, dl1 = 0.f;
    {
      const float w0 = expf(acs_last - as0), w1 = expf(acs_last - as1);
#pragma unroll
      for (int j = 0; j < NP; ++j) {
        acc[j][0] *= w0;
        acc[j][1] *= w0;
        acc[j][2] *= w1;
        acc[j][3] *= w1;
        const float2 x0 = __bfloat1622float2(xr0[j]), x1 = __bfloat1622float2(xr1[j]);
        dl0 += acc[j][0] * x0.x + acc[j][1] * x0.y;
        dl1 += acc[j][2] * x1.x + acc[j][3] * x1.y;
      }
      dl0 = QuadSum(dl0) * dts[s0 + r0];
      dl1 = QuadSum(dl1) * dts[s0 + r0 + 8];
      dl0 = ok0 ? dl0 : 0.f;
      dl1 = ok1 ? dl1 : 0.f;
    }
    // B_s retired (every warp's wait_group above): slot 1 may receive the next C Bᵀ tile.
    hopper::NamedBarrierSync(bar_id, 128);
    int issued = 0;  // highest relative l-tile whose copies are issued
    if (n > 1) {
      DxcCpCb(slot1, cbs + static_cast<int64_t>((st + 1) * kTile) * d.Q + s0, d.Q, wt);
      CpAsyncCommit();
      issued = 1;
    }

    // Step k (l-tile st + k, slot k % 2): wait for its copies; barrier (publishes it; every
    // warp has read tile k−1, so its slot may receive tile k+1); ldmatrix the C Bᵀ tile (the
    // previous wgmma still running); wait for that wgmma (frees the one A-fragment set); form M
    // into it; issue the next wgmmas. M as in the early kernel: masked and exponentiated per
    // element on the diagonal tile, factored (column erel_l, row e^{Acs_l0 − Acs_s}) off it.
    unsigned fa[4][4];
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
#pragma unroll
      for (int q = 0; q < 4; ++q) fa[kk][q] = 0u;
    auto step = [&](int k, auto diag) {
      if (issued > k) {
        CpAsyncWait<1>();
      } else {
        CpAsyncWait<0>();
      }
      hopper::NamedBarrierSync(bar_id, 128);
      if (k + 1 < n && k + 1 > issued) {
        DxcCpCb((k + 1) % 2 ? slot1 : slot0,
                cbs + static_cast<int64_t>((st + k + 1) * kTile) * d.Q + s0, d.Q, wt);
        CpAsyncCommit();
        issued = k + 1;
      }
      // The last step: the other slot is free; x of the own rows for the epilogue goes there.
      if (k == n - 1) {
        // (The same row-0 pointer formed two ways: ptxas spilled 8 bytes at N64 with the first
        // form and 20 at N128 with the second; each instance gets the one without.)
        const bf16* xrow = kN == 64 ? xp0 - (ok0 ? r0 : 0) * x_stride - 2 * tq
                                    : xb + ts0 * x_stride;
        DxcCpSw128<kTile>(SmemAddr(n % 2 ? slot1 : slot0), xrow, x_stride, sv, kP, wt, 128);
        CpAsyncCommit();
      }
      const bf16* cur = k % 2 ? slot1 : slot0;
      const int l0 = (st + k) * kTile;
      unsigned cbf[4][4];
      DxcLoadTileAT(cbf, cur, wq);  // B_s·C_l = (C Bᵀ)ᵀ
      hopper::WgmmaWait<0>();
      hopper::FenceRegs(fa);
      if constexpr (decltype(diag)::value) {
#pragma unroll
        for (int kk = 0; kk < 4; ++kk)
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            const float2 v =
                __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&cbf[kk][q]));
            const int l = 16 * kk + 8 * (q / 2) + 2 * tq, row = r0 + 8 * (q % 2);
            const float as = q % 2 ? as1 : as0;
            const float m0 = l >= row ? v.x * __expf(fminf(acs[l0 + l] - as, 0.f)) : 0.f;
            const float m1 = l + 1 >= row ? v.y * __expf(fminf(acs[l0 + l + 1] - as, 0.f)) : 0.f;
            fa[kk][q] = PackBf16(m0, m1);
          }
      } else {
        const float ref = acs[l0];
        const float f0 = __expf(ref - as0), f1 = __expf(ref - as1);
#pragma unroll
        for (int kk = 0; kk < 4; ++kk)
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            const float2 v =
                __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&cbf[kk][q]));
            const float2 er =
                *reinterpret_cast<const float2*>(erel + l0 + 16 * kk + 8 * (q / 2) + 2 * tq);
            const float f = q % 2 ? f1 : f0;
            fa[kk][q] = PackBf16(v.x * (er.x * f), v.y * (er.y * f));
          }
      }
      hopper::FenceRegs(fa);
      hopper::WgmmaFence();
      const uint64_t desc = hopper::SmemDescSw128(dy_s + (st + k) * kDyTile, kTile * 128, 1024);
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) DxcWgmmaRS64NMajor(acc, fa[kk], desc + ((kk * 16 * 128) >> 4));
      hopper::WgmmaCommit();
    };
    step(0, std::true_type{});
    for (int k = 1; k < n; ++k) step(k, std::false_type{});
    hopper::WgmmaWait<0>();
    hopper::FenceRegs(acc);
    hopper::FenceRegs(fa);

    // dx = dt dX̄ + D dy (dy of the own rows from the resident swizzled tile st); x·dX̄ per row;
    // Σ x·dy.
    const char* dyt = base + L.dy + st * kDyTile;
    const char* xst = reinterpret_cast<const char*>(n % 2 ? slot1 : slot0);  // x rows
    CpAsyncWait<0>();
    hopper::NamedBarrierSync(bar_id, 128);
    const float dsk = Dskip != nullptr ? Dskip[h] : 0.f;
    float dot_d = 0.f;
#pragma unroll
    for (int e2 = 0; e2 < 2; ++e2) {
      const int row = r0 + 8 * e2;
      const float dtr = dts[s0 + row];
      float dot_x = 0.f;
      if (row < sv) {
        bf16* dxr = dxb + (ts0 + row) * x_stride;
#pragma unroll
        for (int j = 0; j < NP; ++j) {
          const int p = 8 * j + 2 * tq;
          const float2 xv =
              Bf2(reinterpret_cast<const bf16*>(xst + hopper::Sw128Offset<kTile>(row, p)));
          const float2 dyv =
              Bf2(reinterpret_cast<const bf16*>(dyt + hopper::Sw128Offset<kTile>(row, p)));
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
    // The own rows' ∂Acs terms and their A·∂A share in the difference form (as the early
    // kernel); the three per-s-tile sums over this warpgroup in a fixed order (warp butterflies,
    // then the four warps in turn).
    double v3[3] = {static_cast<double>(dot_d), 0.0, 0.0};
    if (tq == 0) {
      float* own = dacs_own + bh * d.NC * d.Q + ts0;
      own[r0] = -dl0;
      own[r0 + 8] = -dl1;
      v3[1] = static_cast<double>(dl0) * (acs_last - as0) +
              static_cast<double>(dl1) * (acs_last - as1);
      v3[2] = static_cast<double>(dl0) + dl1;
    }
#pragma unroll
    for (int e = 0; e < 3; ++e)
      for (int off = 16; off > 0; off >>= 1) v3[e] += __shfl_xor_sync(0xffffffffu, v3[e], off);
    if (lane == 0) {
#pragma unroll
      for (int e = 0; e < 3; ++e) red[e * 4 + wq] = v3[e];
    }
    hopper::NamedBarrierSync(bar_id, 128);
    if (wt == 0) {
      const int64_t nn = static_cast<int64_t>(d.B) * d.NC * d.H * tiles;
      const int64_t ix = ((static_cast<int64_t>(b) * d.NC + c) * d.H + h) * tiles + st;
#pragma unroll
      for (int e = 0; e < 3; ++e) {
        double s = 0.0;
        for (int q = 0; q < 4; ++q) s += red[e * 4 + q];
        dd_part[e * nn + ix] = s;  // Σ dy·x, A·∂A partial, Σ dl
      }
    }
    // (red is rewritten only after the next s-tile's barriers, which thread 0 passes after
    // reading it.)
  }
}
