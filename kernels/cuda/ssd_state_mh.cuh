// The fused chunk-state / state-pass kernel of helper ssdr13 (session 13), in the one form that
// stayed: ct1 = ssd_state_scan_mh<kBwd, 1, 64, 128>, one head per block, two ring slots, P 64 and
// the 128-column slice at compile time. The default where those shapes hold (GYRE_SSD_STATE=ct1,
// ssd.cu; helper cssdr13's call, one H200: state kernels 200.7 / 192.0 → 187.3 / 169.4 µs at B8
// S2048 H64 and 157.5 / 164.1 → 135.9 / 135.8 at B16 S2048 H24, fwd / bwd, ncu). Included by
// ssd.cu inside its anonymous namespace, after ssd_chunk_state_scan (whose recurrence, numerics
// and outputs this kernel repeats exactly: see the comment there).
//
// History: the template takes kHeads heads of one group per block (one 128-thread warpgroup
// each, loading the shared B / C tile once for all, a kStages-slot cp.async ring) and kP = kSlice
// = 0 for P and the slice at run time; the forms mh2 / mh4 (2 / 4 heads, run-time P) and ct2 (ct1
// with 2 heads) were measured slower (ssd_notes.md "Session 13 (helper ssdr13)" and "(helper
// cssdr13)") and are no longer instantiated; the template keeps their code paths, which the
// instantiation at kHeads 1, kP 64, kSlice 128 folds away (its PTX is that of the measured ct1).
// Why ct1 wins: the one-head kernel is issue-bound (~1500 instructions per warp per 64-token
// step, ~0.48 issued warps per scheduler), and the compile-time P / slice remove the run-time
// integer divisions of the copy and scale index arithmetic (~300 of them); sharing a tile across
// heads (mh2 / mh4) saved instructions but coupled the heads at every block barrier.
// Each head's outputs are bitwise those of ssd_chunk_state_scan: the same fragments in the same
// k order per element, the same scale expression, the same <G, H_c> partial order (warp sums,
// then warps 0..3 of the head's warpgroup).

// MmaPtx::Mma / ForEachPair for a warp of one warpgroup (lane, warp within the warpgroup given),
// MAXI tiles of 32×32 over the warpgroup's 4 warps, as there.
template <bool AT, bool BT, int MAXI>
__device__ __forceinline__ void StMma(MmaPtx::Tile (&acc)[MAXI], const bf16* a, int lda,
                                      const bf16* b, int ldb, int m, int n, int k, int lane,
                                      int warp) {
  const int q = lane / 8, r = lane % 8;
  const int tn = n / 32, nt = (m / 32) * tn;
#pragma unroll
  for (int i = 0; i < MAXI; ++i) {
    const int wt = warp + i * kWarps;
    if (wt < nt) {
      const int i0 = (wt / tn) * 32, j0 = (wt % tn) * 32;
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

template <int MAXI, class T, class F>
__device__ __forceinline__ void StForEachPair(T (&acc)[MAXI], int m, int n, int lane, int warp,
                                              F&& f) {
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

// LoadRowsAsync over `nthreads` threads (thread index tid).
__device__ __forceinline__ void StLoadRowsAsync(bf16* dst, int ld, const bf16* src, int64_t stride,
                                                int valid, int width, int tid, int nthreads) {
  const int vpr = width / 8;
  for (int i = tid; i < kTile * vpr; i += nthreads) {
    const int r = i / vpr, v = (i % vpr) * 8;
    const bool ok = r < valid;
    const bf16* g = ok ? src + r * stride + v : src;
    const unsigned sm = static_cast<unsigned>(__cvta_generic_to_shared(dst + r * ld + v));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(sm), "l"(g),
                 "r"(ok ? 16 : 0));
  }
}

// The same with the width and the thread count known at compile time (row / vector index by
// shifts, the loop unrolled): the lean forms below.
template <int kWidth, int kN>
__device__ __forceinline__ void StLoadRowsAsyncCt(bf16* dst, int ld, const bf16* src,
                                                  int64_t stride, int valid, int tid) {
  constexpr int kVpr = kWidth / 8;
  static_assert((kTile * kVpr) % kN == 0, "whole vectors per thread");
  // Not unrolled: the unrolled copies' hoisted addresses spilled (20-216 bytes at 128 registers).
#pragma unroll 1
  for (int m = 0; m < kTile * kVpr / kN; ++m) {
    const int i = tid + m * kN;
    const int r = i / kVpr, v = (i % kVpr) * 8;
    const bool ok = r < valid;
    const bf16* g = ok ? src + r * stride + v : src;
    const unsigned sm = static_cast<unsigned>(__cvta_generic_to_shared(dst + r * ld + v));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(sm), "l"(g),
                 "r"(ok ? 16 : 0));
  }
}

// Heads per block and ring slots (ct1: one head, two slots, four blocks per SM).
template <int kHeads>
struct StateMhForm;
template <>
struct StateMhForm<1> {
  static constexpr int kStages = 2, kMinBlocks = 4;
};

// Dynamic shared memory of ssd_state_scan_mh: per slot the V tile [64][slice+8], kHeads U tiles
// [64][P+8], and per head the tile's Acs and dt (64 floats each).
size_t StateScanMhSmem(int P, int slice, int heads, int stages) {
  CarveSize cs;
  cs.take<bf16>(static_cast<size_t>(stages) * kTile * (slice + 8));
  cs.take<bf16>(static_cast<size_t>(stages) * heads * kTile * (P + 8));
  cs.take<float>(static_cast<size_t>(stages) * heads * kTile);
  cs.take<float>(static_cast<size_t>(stages) * heads * kTile);
  return cs.off;
}

// Grid (ntn, H / kHeads, B); block kHeads × 128 threads; warpgroup w runs head
// blockIdx.y · kHeads + w (all of one group: hpg % kHeads == 0, checked by the host). Arguments
// as ssd_chunk_state_scan's fused form (pw = P).
// kP, kSlice: 0 (P and the slice at run time; no longer instantiated) or ct1's compile-time
// head dim and slice, P 64 and slice 128 (N % 128 == 0), so that the copy, scale and MMA loops
// index with shifts instead of ~16 run-time integer divisions per thread and step (helper
// ssdr13's count: ~1480 issued instructions per warp per 64-token step, issue-bound at ~0.48 per
// scheduler).
template <bool kBwd, int kHeads, int kP = 0, int kSlice = 0>
__global__ void __launch_bounds__(kHeads * kThreads, StateMhForm<kHeads>::kMinBlocks)
    ssd_state_scan_mh(Dims d, int slice, const bf16* u, const bf16* v, const float* start,
                      float* saved, float* end_state, float* dsg, bf16* g_bf, float* ddecay) {
  constexpr int kStages = StateMhForm<kHeads>::kStages;
  constexpr int kBlockThreads = kHeads * kThreads;
  constexpr bool kCt = kP > 0;
  extern __shared__ __align__(128) char smem[];
  __shared__ float red[2 * kHeads * kWarps];
  if constexpr (kCt) slice = kSlice;
  const int pw = kCt ? kP : d.P;
  const int n0 = blockIdx.x * slice;
  const int wg = threadIdx.x / kThreads, lt = threadIdx.x % kThreads;
  const int lane = lt % 32, warp = lt / 32;
  const int h = blockIdx.y * kHeads + wg, b = blockIdx.z;
  const int nw = kCt ? kSlice : min(slice, d.N - n0);
  const int g = (blockIdx.y * kHeads) / d.hpg;
  const int ldu = pw + 8, ldv = slice + 8;
  const int64_t pn0 = n0;
  Carve cv{smem};
  bf16* V0 = cv.take<bf16>(static_cast<size_t>(kStages) * kTile * ldv);
  bf16* U0 = cv.take<bf16>(static_cast<size_t>(kStages) * kHeads * kTile * ldu);
  float* acs_b = cv.take<float>(kStages * kHeads * kTile);  // [slot][head][64]
  float* dt_b = cv.take<float>(kStages * kHeads * kTile);
  const float* acs = AcsPtr(d, saved, b, h);
  const float* dts = DtPtr(d, saved, b);
  const int tiles = d.Q / kTile;
  const int last_tiles = (d.S - (d.NC - 1) * d.Q + kTile - 1) / kTile;
  const int total = (d.NC - 1) * tiles + last_tiles;
  auto locate = [&](int k, int& c, int& tt) {
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
  };
  const int64_t bh = static_cast<int64_t>(b) * d.H + h;
  // Tile k into slot s: V by the whole block, U / Acs / dt of each head by its warpgroup.
  auto issue = [&](int k, int s) {
    int c, tt;
    locate(k, c, tt);
    const int t0 = c * d.Q + tt * kTile, valid = min(kTile, d.S - t0);
    if constexpr (kCt) {
      StLoadRowsAsyncCt<kSlice, kBlockThreads>(
          V0 + s * kTile * ldv, ldv, v + BcRow(d, b, t0) + static_cast<int64_t>(g) * d.N + n0,
          d.ldbc, valid, threadIdx.x);
      StLoadRowsAsyncCt<kP, kThreads>(
          U0 + (s * kHeads + wg) * kTile * ldu, ldu,
          u + (kBwd ? YRow(d, b, t0) : XRow(d, b, t0)) + static_cast<int64_t>(h) * kP,
          kBwd ? d.ldy : d.ldx, valid, lt);
    } else {
      StLoadRowsAsync(V0 + s * kTile * ldv, ldv,
                      v + BcRow(d, b, t0) + static_cast<int64_t>(g) * d.N + n0, d.ldbc, valid,
                      nw, threadIdx.x, kBlockThreads);
      StLoadRowsAsync(U0 + (s * kHeads + wg) * kTile * ldu, ldu,
                      u + (kBwd ? YRow(d, b, t0) : XRow(d, b, t0)) +
                          static_cast<int64_t>(h) * d.P,
                      kBwd ? d.ldy : d.ldx, valid, pw, lt, kThreads);
    }
    if (lt < kTile) {
      const int r = lt, o = (s * kHeads + wg) * kTile + r;
      CpAsync4(acs_b + o, acs + t0 + r, r < valid);
      if (!kBwd) {
        CpAsync4(dt_b + o, dts + static_cast<int64_t>(t0 + min(r, valid - 1)) * d.H + h,
                 r < valid);
      }
    }
  };
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < total) issue(s, s);
    CpAsyncCommit();  // (an empty group past the end keeps the wait counts uniform)
  }
  typename MmaPtx::Tile acc[2];
  if (start != nullptr) {
    const float* st = start + bh * d.PN + pn0;
    StForEachPair(acc, pw, nw, lane, warp, [&](float& x, float& y, int row, int col) {
      const float2 v2 =
          *reinterpret_cast<const float2*>(st + static_cast<int64_t>(row) * d.N + col);
      x = v2.x;
      y = v2.y;
    });
  } else {
    MmaPtx::Zero(acc);
  }
  int c_first, tt_first;
  locate(0, c_first, tt_first);
  float acs_last = 0.f, acs_last_next = acs[static_cast<int64_t>(c_first) * d.Q + d.Q - 1];
  int pending_c = -1;
  for (int k = 0; k < total; ++k) {
    const int buf = k % kStages;
    int c, tt;
    locate(k, c, tt);
    if (tt == 0) {
      if (!kBwd) {
        float* hs = StatePtr(d, saved, b, h, c) + pn0;
        bf16* hb = HbfPtr(d, saved, b, h, c) + pn0;
        StForEachPair(acc, pw, nw, lane, warp, [&](float x, float y, int row, int col) {
          *reinterpret_cast<float2*>(hs + row * d.N + col) = make_float2(x, y);
        });
        StForEachPair(acc, pw, nw, lane, warp, [&](float x, float y, int row, int col) {
          *reinterpret_cast<__nv_bfloat162*>(hb + row * d.N + col) = __floats2bfloat162_rn(x, y);
        });
      } else {
        if (dsg != nullptr) {
          float* gs = dsg + (bh * d.NC + c) * d.PN + pn0;
          StForEachPair(acc, pw, nw, lane, warp, [&](float x, float y, int row, int col) {
            *reinterpret_cast<float2*>(gs + row * d.N + col) = make_float2(x, y);
          });
        }
        if (g_bf != nullptr) {
          bf16* gb = g_bf + (bh * d.NC + c) * d.PN + pn0;
          StForEachPair(acc, pw, nw, lane, warp, [&](float x, float y, int row, int col) {
            *reinterpret_cast<__nv_bfloat162*>(gb + row * d.N + col) =
                __floats2bfloat162_rn(x, y);
          });
        }
        float prod = 0.f;
        const float* hc = StatePtr(d, saved, b, h, c) + pn0;
        StForEachPair(acc, pw, nw, lane, warp, [&](float x, float y, int row, int col) {
          const float2 hv =
              *reinterpret_cast<const float2*>(hc + static_cast<int64_t>(row) * d.N + col);
          prod = fmaf(x, hv.x, prod);
          prod = fmaf(y, hv.y, prod);
        });
        prod = WarpSum(prod);
        if (lane == 0) red[((c & 1) * kHeads + wg) * kWarps + warp] = prod;
        pending_c = c;
      }
      acs_last = acs_last_next;
      const int c_next = kBwd ? c - 1 : c + 1;
      if (c_next >= 0 && c_next < d.NC) {
        acs_last_next = acs[static_cast<int64_t>(c_next) * d.Q + d.Q - 1];
      }
      const float decay = expf(acs_last);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
          for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i].c[mi][ni][e] *= decay;
    }
    __syncthreads();  // slot (k − 1) % kStages is no longer read by any head; red[] published
    if (kBwd && pending_c >= 0) {
      if (lt == 0) {
        float s = 0.f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) s += red[((pending_c & 1) * kHeads + wg) * kWarps + w];
        ddecay[(bh * d.NC + pending_c) * gridDim.x + blockIdx.x] = s;
      }
      pending_c = -1;
    }
    if (k + kStages - 1 < total) issue(k + kStages - 1, (k + kStages - 1) % kStages);
    CpAsyncCommit();
    CpAsyncWait<kStages - 1>();  // tile k has landed (this thread's copies)
    __syncthreads();             // ... and every thread's
    bf16* Us = U0 + (buf * kHeads + wg) * kTile * ldu;  // this head's tile, scaled in place
    const float* ab = acs_b + (buf * kHeads + wg) * kTile;
    const float* db = dt_b + (buf * kHeads + wg) * kTile;
    auto scale_vector = [&](int r, int cidx) {
      float f[8];
      LoadBf16<8>(Us + r * ldu + cidx, f);
      const float sc = kBwd ? expf(ab[r]) : expf(acs_last - ab[r]) * db[r];
#pragma unroll
      for (int j = 0; j < 8; ++j) f[j] *= sc;
      StoreBf16<8>(Us + r * ldu + cidx, f);
    };
    if constexpr (kCt) {
      constexpr int kVpr = kP / 8;
#pragma unroll
      for (int m = 0; m < kTile * kVpr / kThreads; ++m) {
        const int i = lt + m * kThreads;
        scale_vector(i / kVpr, (i % kVpr) * 8);
      }
    } else {
      const int vpr = pw / 8;
      for (int i = lt; i < kTile * vpr; i += kThreads) {
        scale_vector(i / vpr, (i % vpr) * 8);
      }
    }
    hopper::NamedBarrierSync(1 + wg, kThreads);  // this head's scaled tile is complete
    StMma<true, false, 2>(acc, Us, ldu, V0 + buf * kTile * ldv, ldv, pw, nw, kTile, lane, warp);
  }
  CpAsyncWait<0>();  // (only empty groups can be pending here)
  auto store_f32 = [&](float* dst) {
    StForEachPair(acc, pw, nw, lane, warp, [&](float x, float y, int row, int col) {
      *reinterpret_cast<float2*>(dst + row * d.N + col) = make_float2(x, y);
    });
  };
  if (!kBwd) store_f32(StatePtr(d, saved, b, h, d.NC) + pn0);
  if (end_state != nullptr) store_f32(end_state + bh * d.PN + pn0);
}
