// The fused chunk-state / state-pass kernel in its compile-time form "ct1" (helper ssdr13, session
// 13): ssd_chunk_state_scan with P 64 and the 128-column slice fixed, one head per 128-thread
// block, two cp.async ring slots. The default where those shapes hold (GYRE_SSD_STATE=ct1, ssd.cu;
// helper cssdr13's call, one H200: state kernels 200.7 / 192.0 → 187.3 / 169.4 µs at B8 S2048 H64
// and 157.5 / 164.1 → 135.9 / 135.8 at B16 S2048 H24, fwd / bwd, ncu). Included by ssd.cu inside
// its anonymous namespace, after ssd_chunk_state_scan (whose recurrence, numerics and outputs this
// kernel repeats exactly: see the comment there).
//
// Why the compile-time form wins: the one-head kernel is issue-bound (~1500 instructions per warp
// per 64-token step, ~0.48 issued warps per scheduler), and the fixed P / slice turn the copy and
// scale index arithmetic's ~300 run-time integer divisions into shifts. Forms with 2 or 4 heads
// of a group per block sharing the B / C tile (mh2, mh4, ct2) saved instructions but coupled the
// heads at every block barrier and were measured slower (ssd_notes.md "Session 13 (helper
// ssdr13)" and "(helper cssdr13)"); session 14 removed their code paths from this template.
// Each head's outputs are bitwise those of ssd_chunk_state_scan: the same fragments in the same
// k order per element (MmaPtx::MmaAt), the same scale expression, the same <G, H_c> partial order
// (warp sums, then warps 0..3). The steps that are the same code in both kernels are shared
// helpers of ssd.cu (StateScanTile, StateDotWarpSum, StateScanDecay, StateScanScaleU).

constexpr int kStateCtP = 64, kStateCtSlice = 128, kStateCtStages = 2;

// 64 rows × kWidth bf16 from src (row stride `stride`) into dst (row stride ld) by the block's
// kThreads threads through cp.async (rows >= valid zero-filled): LoadRowsAsync with the width known
// at compile time (row / vector index by shifts).
template <int kWidth>
__device__ __forceinline__ void LoadRowsAsyncCt(bf16* dst, int ld, const bf16* src, int64_t stride,
                                                int valid, int tid) {
  constexpr int kVpr = kWidth / 8;
  static_assert((kTile * kVpr) % kThreads == 0, "whole vectors per thread");
  // Not unrolled: the unrolled copies' hoisted addresses spilled (20-216 bytes at 128 registers).
#pragma unroll 1
  for (int m = 0; m < kTile * kVpr / kThreads; ++m) {
    const int i = tid + m * kThreads;
    const int r = i / kVpr, v = (i % kVpr) * 8;
    const bool ok = r < valid;
    const bf16* g = ok ? src + r * stride + v : src;
    const unsigned sm = static_cast<unsigned>(__cvta_generic_to_shared(dst + r * ld + v));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(sm), "l"(g),
                 "r"(ok ? 16 : 0));
  }
}

// Dynamic shared memory of ssd_state_scan_ct: per slot the V tile [64][slice+8], the U tile
// [64][P+8], and the tile's Acs and dt (64 floats each).
size_t StateScanCtSmem() {
  CarveSize cs;
  cs.take<bf16>(static_cast<size_t>(kStateCtStages) * kTile * (kStateCtSlice + 8));
  cs.take<bf16>(static_cast<size_t>(kStateCtStages) * kTile * (kStateCtP + 8));
  cs.take<float>(static_cast<size_t>(kStateCtStages) * kTile);
  cs.take<float>(static_cast<size_t>(kStateCtStages) * kTile);
  return cs.off;
}

// Grid (N / 128, H, B); block 128 threads for head blockIdx.y. Arguments as
// ssd_chunk_state_scan's fused form (the slice is 128, P 64: checked by the host).
template <bool kBwd>
__global__ void __launch_bounds__(kThreads, 4)
    ssd_state_scan_ct(Dims d, const bf16* u, const bf16* v, const float* start, float* saved,
                      float* end_state, float* dsg, bf16* g_bf, float* ddecay) {
  constexpr int kStages = kStateCtStages, kP = kStateCtP, kSlice = kStateCtSlice;
  constexpr int pw = kP, nw = kSlice, ldu = kP + 8, ldv = kSlice + 8;
  extern __shared__ __align__(128) char smem[];
  __shared__ float red[2 * kWarps];
  const int n0 = blockIdx.x * kSlice;
  const int lt = threadIdx.x, lane = lt % 32, warp = lt / 32;
  const int h = blockIdx.y, b = blockIdx.z;
  const int g = h / d.hpg;
  const int64_t pn0 = n0;
  Carve cv{smem};
  bf16* V0 = cv.take<bf16>(static_cast<size_t>(kStages) * kTile * ldv);
  bf16* U0 = cv.take<bf16>(static_cast<size_t>(kStages) * kTile * ldu);
  float* acs_b = cv.take<float>(kStages * kTile);  // [slot][64]
  float* dt_b = cv.take<float>(kStages * kTile);
  const float* acs = AcsPtr(d, saved, b, h);
  const float* dts = DtPtr(d, saved, b);
  const int tiles = d.Q / kTile;
  const int last_tiles = (d.S - (d.NC - 1) * d.Q + kTile - 1) / kTile;
  const int total = (d.NC - 1) * tiles + last_tiles;
  const int64_t bh = static_cast<int64_t>(b) * d.H + h;
  // Tile k into slot s: V (B or C), U (x or dy), and the tile's Acs / dt.
  auto issue = [&](int k, int s) {
    int c, tt;
    StateScanTile<kBwd>(d, tiles, last_tiles, k, c, tt);
    const int t0 = c * d.Q + tt * kTile, valid = min(kTile, d.S - t0);
    LoadRowsAsyncCt<kSlice>(V0 + s * kTile * ldv, ldv,
                            v + BcRow(d, b, t0) + static_cast<int64_t>(g) * d.N + n0, d.ldbc,
                            valid, lt);
    LoadRowsAsyncCt<kP>(U0 + s * kTile * ldu, ldu,
                        u + (kBwd ? YRow(d, b, t0) : XRow(d, b, t0)) + static_cast<int64_t>(h) * kP,
                        kBwd ? d.ldy : d.ldx, valid, lt);
    if (lt < kTile) {
      const int r = lt, o = s * kTile + r;
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
    MmaPtx::ForEachPairAt(acc, pw, nw, lane, warp, [&](float& x, float& y, int row, int col) {
      const float2 v2 =
          *reinterpret_cast<const float2*>(st + static_cast<int64_t>(row) * d.N + col);
      x = v2.x;
      y = v2.y;
    });
  } else {
    MmaPtx::Zero(acc);
  }
  int c_first, tt_first;
  StateScanTile<kBwd>(d, tiles, last_tiles, 0, c_first, tt_first);
  float acs_last = 0.f, acs_last_next = acs[static_cast<int64_t>(c_first) * d.Q + d.Q - 1];
  int pending_c = -1;
  for (int k = 0; k < total; ++k) {
    const int buf = k % kStages;
    int c, tt;
    StateScanTile<kBwd>(d, tiles, last_tiles, k, c, tt);
    if (tt == 0) {
      if (!kBwd) {
        float* hs = StatePtr(d, saved, b, h, c) + pn0;
        bf16* hb = HbfPtr(d, saved, b, h, c) + pn0;
        MmaPtx::ForEachPairAt(acc, pw, nw, lane, warp, [&](float x, float y, int row, int col) {
          *reinterpret_cast<float2*>(hs + row * d.N + col) = make_float2(x, y);
        });
        MmaPtx::ForEachPairAt(acc, pw, nw, lane, warp, [&](float x, float y, int row, int col) {
          *reinterpret_cast<__nv_bfloat162*>(hb + row * d.N + col) = __floats2bfloat162_rn(x, y);
        });
      } else {
        if (dsg != nullptr) {
          float* gs = dsg + (bh * d.NC + c) * d.PN + pn0;
          MmaPtx::ForEachPairAt(acc, pw, nw, lane, warp, [&](float x, float y, int row, int col) {
            *reinterpret_cast<float2*>(gs + row * d.N + col) = make_float2(x, y);
          });
        }
        if (g_bf != nullptr) {
          bf16* gb = g_bf + (bh * d.NC + c) * d.PN + pn0;
          MmaPtx::ForEachPairAt(acc, pw, nw, lane, warp, [&](float x, float y, int row, int col) {
            *reinterpret_cast<__nv_bfloat162*>(gb + row * d.N + col) =
                __floats2bfloat162_rn(x, y);
          });
        }
        const float prod =
            StateDotWarpSum(acc, StatePtr(d, saved, b, h, c) + pn0, d, pw, nw, lane, warp);
        if (lane == 0) red[(c & 1) * kWarps + warp] = prod;
        pending_c = c;
      }
      acs_last = acs_last_next;
      const int c_next = kBwd ? c - 1 : c + 1;
      if (c_next >= 0 && c_next < d.NC) {
        acs_last_next = acs[static_cast<int64_t>(c_next) * d.Q + d.Q - 1];
      }
      StateScanDecay(acc, expf(acs_last));
    }
    __syncthreads();  // slot (k − 1) % kStages is no longer read; red[] published
    if (kBwd && pending_c >= 0) {
      if (lt == 0) {
        float s = 0.f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) s += red[(pending_c & 1) * kWarps + w];
        ddecay[(bh * d.NC + pending_c) * gridDim.x + blockIdx.x] = s;
      }
      pending_c = -1;
    }
    if (k + kStages - 1 < total) issue(k + kStages - 1, (k + kStages - 1) % kStages);
    CpAsyncCommit();
    CpAsyncWait<kStages - 1>();  // tile k has landed (this thread's copies)
    __syncthreads();             // ... and every thread's
    bf16* Us = U0 + buf * kTile * ldu;  // the U tile, scaled in place
    const float* ab = acs_b + buf * kTile;
    const float* db = dt_b + buf * kTile;
    constexpr int kVpr = kP / 8;
#pragma unroll
    for (int m = 0; m < kTile * kVpr / kThreads; ++m) {
      const int i = lt + m * kThreads;
      StateScanScaleU<kBwd>(Us, ldu, i / kVpr, (i % kVpr) * 8, ab, db, acs_last);
    }
    __syncthreads();  // the scaled tile is complete
    MmaPtx::MmaAt<true, false>(acc, Us, ldu, V0 + buf * kTile * ldv, ldv, pw, nw, kTile, lane,
                               warp);
  }
  CpAsyncWait<0>();  // (only empty groups can be pending here)
  auto store_f32 = [&](float* dst) {
    MmaPtx::ForEachPairAt(acc, pw, nw, lane, warp, [&](float x, float y, int row, int col) {
      *reinterpret_cast<float2*>(dst + row * d.N + col) = make_float2(x, y);
    });
  };
  if (!kBwd) store_f32(StatePtr(d, saved, b, h, d.NC) + pn0);
  if (end_state != nullptr) store_f32(end_state + bh * d.PN + pn0);
}
