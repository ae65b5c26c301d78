// Causal attention on Hopper tensor cores (wgmma, sm_90a), selected by attention.cu (see the
// kernel-choice table there). API and math: attention.h. The forward kernel, FlashAttention-3
// structured (a TMA producer warpgroup, mbarrier rings, two consumer warpgroups):
//   attn_fwd_ws_kernel      forward, plain and SelfExtend (described above it); the plain
//                           D 64 forward is attention_fwd64.cu's (three consumer warpgroups,
//                           0.91-0.93x this kernel's time at D 64, H100: attention_notes.md,
//                           attn64f), so D 64 instantiates only the SelfExtend form here
// The backward main kernels are elsewhere: D 128 attention_bwd_store.cu (body and prose in
// attention_wgmma.cuh; attn_bwd_ws_kernel<128>, which lived here and added every dQ
// contribution into a zeroed dq_acc, was replaced in session 22, attn128b), D 64
// attention_bwd_q128.cu, the deterministic ones attention_bwd_det{,_presum}.cu.
// Measured on an H100 (bench/RESULTS.md, sessions 5-6, attn5 / attn6): forward 490-630 TFLOP/s
// at D 128 (SDPA cuDNN 450-600); whole backward incl. prep and dQ conversion 360 / 450 TFLOP/s
// at B8 S2048 / B2 S8192 D128; SelfExtend forward 1.02-1.05x the plain one.
//
// Shared memory uses the 128-byte swizzle that both wgmma and TMA use natively: a tile of R rows
// x D columns is D/64 column blocks of [R rows][128 bytes]; 16-byte chunk c of row r sits at
// chunk c ^ (r % 8) (block bases 1024-byte aligned). TMA fills one column block per copy (box of
// 64 columns x R rows of one head; rows past T read as zeros, per batch: the maps are 4-d over
// columns, heads, rows, batch, so fused-qkv row strides need no copy).
// Block order (both kernels, GroupedBlockOrder): longest blocks first inside groups of (batch,
// head) pairs sized to L2, so the causal triangle's long blocks do not form the grid's tail
// while one head's K / V (Q / dO) stay shared in L2.
// Exponentials use ex2.approx.ftz (probabilities below 2^-126 flush to 0).
// Not here: head dims other than 64 / 128 (attention.cu rejects them).
#include "kernels/cuda/attention_wgmma.cuh"

#include <cmath>

namespace gyre::cuda {
namespace {

constexpr int kWgM = 128, kWgN = 128;

// ------------------------------------------------------------------------------------------
// Forward, attn_fwd_ws_kernel<D, kSE>: grid (ceil(T/128), H, B) in GroupedBlockOrder, 384
// threads = a producer warpgroup (one thread issues TMA copies; 40 registers after setmaxnreg)
// and two consumer warpgroups (64 query rows each of the block's 128, 232 registers). Key
// tiles are 128 keys; K and V have two stages each. Loads and compute meet on mbarriers (full:
// the copy's bytes landed, counted by TMA; empty: both consumers are done with a stage), so no
// block-wide barrier sits in the main loop. Per consumer iteration j:
//   [turn] issue S(j) = Q K(j)ᵀ and O += P(j−1) V(j−1) back to back, hand the turn over
//   wait S(j); mask; row max, exp, row sum  (overlaps P(j−1)V(j−1) and the other warpgroup's
//                                           GEMMs on the tensor cores)
//   wait P(j−1)V(j−1); rescale O; pack P(j)
//   S = Q Kᵀ: wgmma m64n128k16 x D/16, both operands in shared memory; O += P V: m64nDk16 x 8
//   with P in registers (the S accumulators packed to bf16) and V N-major in shared memory.
// The turn is a pair of named barriers that makes the two warpgroups issue their GEMMs
// alternately (pingpong): one's softmax runs under the other's GEMMs. The output is staged
// through the block's Q tile and written with 16-byte stores; lse = m·scale + ln l.
// TMA instead of a cp.async producer warpgroup (128 threads, 16-byte copies, a blocking wait
// per stage): 0.28 vs 0.32 ms at B8 S2048 D128, 0.88 vs 1.10 at B2 S8192 (H100, attn5).
// SelfExtend (kSE): per key tile, one position rule wherever it can be: tiles wholly beyond the
//   window (i − j >= W for every row of the block) run the plain step with Q_g and K_g and no
//   mask; tiles wholly inside it the plain step with Q and K (causal mask on the diagonal);
//   only the band tiles that hold both kinds of pairs (one per block when W % 128 == 0) compute
//   both S = Q Kᵀ and S_g = Q_g K_gᵀ, keep S_g where i − j >= W (band_merge) and go on with ONE
//   softmax and ONE P·V. The tiles are visited grouped-only, neighbour-only, band last (the
//   online softmax does not care about the order), so the main loop is the plain kernel's with
//   one select of Q or Q_g (682 vs 653 instructions per iteration at D 128) and the band steps
//   have their own loop; a band step retires P(j−1)V(j−1) before it issues S and S_g (o, s, S_g
//   live; issuing S_g with S and P V spills 212 bytes at D 128). Q_g has its own mbarrier and
//   goes first when the first tile is grouped-only (the block then starts on 64 KB like the
//   plain one); the band tile's K_g has its own buffer (224 KB of shared memory at D 128).
//   Measured (H100, RESULTS.md attn6, plain and SelfExtend timed alternately): 1.04-1.05x the
//   plain forward at B8 S2048 D128, 1.02x at B2 S8192, 1.04x at D 64. (main 2eb55b8 had the
//   band code inside the main loop, 1455 instructions per iteration: 1.10x at both D 128
//   shapes by single timings in the same call.)
// Descriptors of the k-steps of one GEMM are one base descriptor plus the step's offset in the
// start-address field (no carry: every shared address is below 2^18); per-k SmemDesc calls
// cost 80-90 more instructions per iteration, which the SelfExtend loop could not hoist.

// Q (+ Q_g), K and V in two stages each (+ the band tile's K_g), alignment slack, mbarriers.
template <int kD, bool kSE>
constexpr int WsFwdSmemBytes() {
  return (kSE ? 2 : 1) * kWgM * kD * 2 + (kSE ? 5 : 4) * kWgN * kD * 2 + 1024 + 128;
}

// Tensor maps of the forward's TMA loads: dims (D, heads, T, B), box (64 columns, 1 head, 128
// rows, 1), 128-byte swizzle (= the wgmma tile layout above); rows past T read as zeros.
struct FwdTmaMaps {
  CUtensorMap q, k, v, qg, kg;
};

template <int kD, bool kSE>
__global__ void __launch_bounds__(kWsThreads, 1)
    attn_fwd_ws_kernel(const WgmmaFwdParams p, const __grid_constant__ FwdTmaMaps maps,
                       const int head_group) {
  constexpr int kQBytes = kWgM * kD * 2, kKVBytes = kWgN * kD * 2;
  constexpr int kQBlock = kWgM * 128, kKBlock = kWgN * 128;
  constexpr int kDT = kD / 8;
  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw = SmemAddr(smem_raw);
  const uint32_t base = (raw + 1023u) & ~1023u;
  unsigned char* base_ptr = smem_raw + (base - raw);
  const uint32_t sQ = base;
  const uint32_t sQg = base + kQBytes;
  const uint32_t sKV = base + (kSE ? 2 : 1) * kQBytes;
  const uint32_t sKgBand = sKV + 4 * kKVBytes;           // SelfExtend only
  const uint32_t bars = sKV + (kSE ? 5 : 4) * kKVBytes;  // 10 mbarriers, 8 bytes each
  auto sK = [&](int stage) { return sKV + stage * kKVBytes; };
  auto sV = [&](int stage) { return sKV + (2 + stage) * kKVBytes; };
  auto k_full = [&](int s) { return bars + 8 * s; };
  auto k_empty = [&](int s) { return bars + 16 + 8 * s; };
  auto v_full = [&](int s) { return bars + 32 + 8 * s; };
  auto v_empty = [&](int s) { return bars + 48 + 8 * s; };
  const uint32_t q_full = bars + 64, qg_full = bars + 72;

  const int tid = threadIdx.x, wg = tid / 128, wtid = tid % 128;
  if (tid == 0) {  // full: one arrive.expect_tx per fill; empty: both consumer warpgroups
    for (int s = 0; s < 2; ++s) {
      MbInit(k_full(s), 1);
      MbInit(v_full(s), 1);
      MbInit(k_empty(s), 256);
      MbInit(v_empty(s), 256);
    }
    MbInit(q_full, 1);
    MbInit(qg_full, 1);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  int rank, pair;
  GroupedBlockOrder(blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z), gridDim.x,
                    gridDim.y * gridDim.z, head_group, rank, pair);
  const int m_block = gridDim.x - 1 - rank;
  const int h = pair % p.heads, b = pair / p.heads;
  const int hk = h / p.group;
  const int seq = p.seq;
  const int m0 = m_block * kWgM;
  const int64_t row_base = static_cast<int64_t>(b) * seq;
  const int last_row = min(m0 + kWgM, seq) - 1;
  const int n_tiles = last_row / kWgN + 1;
  const int W = p.se_window;
  // SelfExtend: tiles [0, near_first) hold only grouped pairs (i − j >= W for every row of the
  // block), tiles [n_far, n_tiles) only neighbour pairs, the band tiles in between both.
  int near_first = 0, n_far = 0;
  if constexpr (kSE) {
    near_first = max(0, m0 - W + 1) / kWgN;
    n_far = last_row >= W ? (last_row - W) / kWgN + 1 : 0;
  }
  const int total = n_tiles;
  auto is_far_only = [&](int t) { return kSE && t < near_first; };  // Q_g, K_g
  auto is_band = [&](int t) { return kSE && t >= near_first && t < n_far; };
  // Visiting order (SelfExtend): grouped-only tiles, neighbour-only tiles, band tiles last, so
  // the main loop holds no band code and the block starts with one Q-sized tile + one K tile
  // (Q_g and K_g for a grouped tile) as the plain kernel does. Step u visits tile tile_of(u);
  // stages and mbarrier phases follow u.
  const int n_plain_steps = total - (n_far - near_first);  // grouped-only + neighbour-only
  auto tile_of = [&](int u) {
    if constexpr (!kSE) {
      return u;
    } else {
      if (u < near_first) return u;
      if (u < n_plain_steps) return n_far + (u - near_first);
      return near_first + (u - n_plain_steps);
    }
  };

  if (wg == 0) {
    // ---------------------------------------------------------------- producer warpgroup
    // One thread issues every copy (TMA): K(u + 1) (its stage freed by S(u − 1)) ahead of V(u)
    // (freed by P(u − 2)V(u − 2)), the order in which the consumers release them. SelfExtend:
    // Q_g has its own mbarrier; when the first tile is grouped-only, Q_g goes first and Q
    // follows K(0) (needed from the first neighbour tile on); a band tile's K_g (own buffer)
    // rides with its K.
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    if (wtid != 0) return;
    auto tile = [&](uint32_t dst, const CUtensorMap* map, uint32_t bar, int head, int row0) {
#pragma unroll
      for (int cb = 0; cb < kD / 64; ++cb) {
        TmaTile4d(dst + cb * kWgN * 128, map, bar, 64 * cb, head, row0, b);
      }
    };
    auto load_k = [&](int u) {
      const int s = u & 1, t = tile_of(u);
      MbWait(k_empty(s), ((u >> 1) & 1) ^ 1);
      const bool band = is_band(t);
      if (band && u > 0 && is_band(tile_of(u - 1))) {  // the K_g band buffer: S_g(u − 1) done
        MbWait(k_empty(s ^ 1), ((u - 1) >> 1) & 1);
      }
      MbArriveExpectTx(k_full(s), kKVBytes * (band ? 2 : 1));
      tile(sK(s), is_far_only(t) ? &maps.kg : &maps.k, k_full(s), hk, t * kWgN);
      if (band) tile(sKgBand, &maps.kg, k_full(s), hk, t * kWgN);
    };
    auto load_q = [&] {
      MbArriveExpectTx(q_full, kQBytes);
      tile(sQ, &maps.q, q_full, h, m0);
    };
    auto load_qg = [&] {
      MbArriveExpectTx(qg_full, kQBytes);
      tile(sQg, &maps.qg, qg_full, h, m0);
    };
    if (is_far_only(tile_of(0))) {
      load_qg();
      load_k(0);
      load_q();
    } else {
      load_q();
      if (kSE && n_far > 0) load_qg();
      load_k(0);
    }
    for (int u = 0; u < total; ++u) {
      if (u + 1 < total) load_k(u + 1);
      const int s = u & 1;
      MbWait(v_empty(s), ((u >> 1) & 1) ^ 1);
      MbArriveExpectTx(v_full(s), kKVBytes);
      tile(sV(s), &maps.v, v_full(s), hk, tile_of(u) * kWgN);
    }
    return;
  }

  // ------------------------------------------------------------------ consumer warpgroups
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
  const int cwg = wg - 1;
  const int warp_in_wg = wtid / 32, lane = tid % 32, g = lane / 4, tq = lane % 4;
  const int w_first = m0 + 64 * cwg;
  const int r_lo = w_first + 16 * warp_in_wg + g;
  const uint32_t own_rows = cwg * 64 * 128;  // this warpgroup's 64 rows of a Q tile
  // Turn barriers: ids 1 + c (256 threads: consumer c syncs, the other arrives).
  const int my_turn = 1 + cwg, other_turn = 2 - cwg;
  if (cwg == 1) NamedBarArrive(1, 256);  // consumer 0 takes the first turn

  float o[kD / 2];
#pragma unroll
  for (int i = 0; i < kD / 2; ++i) o[i] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
  float s[64];
  uint32_t pa[kWgN / 16][4];

  // acc = Q Kᵀ over the 128 keys of K stage / buffer k_rows (m64n128k16 x D/16, both operands
  // K-major in shared memory); q_rows: this warpgroup's first query row in column block 0.
  auto issue_scores = [&](float (&acc)[64], uint32_t q_rows, uint32_t k_rows) {
    // Descriptors of the k-steps: the start-address field (bits 0-13, 16-byte units) plus the
    // step's offset (every address stays below 2^18, so the field never carries).
    const uint64_t da0 = SmemDescSw128(q_rows, 16, 1024), db0 = SmemDescSw128(k_rows, 16, 1024);
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      const uint64_t da = da0 + (((kk / 4) * kQBlock + (kk % 4) * 32) >> 4);
      const uint64_t db = db0 + (((kk / 4) * kKBlock + (kk % 4) * 32) >> 4);
      WgmmaSS128<0, 0>(acc, da, db, kk > 0 ? 1 : 0);
    }
    WgmmaCommit();
  };
  auto issue_pv = [&](int u) {
    const uint64_t dv0 = SmemDescSw128(sV(u & 1), kKBlock, 1024);
#pragma unroll
    for (int kk = 0; kk < kWgN / 16; ++kk) {
      const uint64_t dv = dv0 + ((kk * 16 * 128) >> 4);
      if constexpr (kD == 128) {
        WgmmaRS128(o, pa[kk], dv);
      } else {
        WgmmaRS64(o, pa[kk], dv);
      }
    }
    WgmmaCommit();
  };
  // Band tile: S_g where i − j >= W, −inf past the diagonal and past T (s keeps the rest).
  auto band_merge = [&](int t, const float (&sg)[64]) {
    const int n0 = t * kWgN;
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int row = r_lo + 8 * hr;
      const int hi = min(row, seq - 1) - n0, far_hi = row - W - n0;
#pragma unroll
      for (int c = 0; c < kWgN / 8; ++c)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = 8 * c + 2 * tq + e;
          float& x = s[4 * c + 2 * hr + e];
          x = col > hi ? -INFINITY : (col <= far_hi ? sg[4 * c + 2 * hr + e] : x);
        }
    }
  };
  // Mask, row max, exponentials and row sums of S(t); returns the O correction per row half.
  // Only neighbour tiles crossing this warpgroup's diagonal or the end of the sequence are
  // masked here (grouped-only tiles never need it; band tiles were masked by band_merge).
  auto softmax = [&](int t, float (&corr)[2]) {
    const int n0 = t * kWgN;
    const bool need_mask = !is_far_only(t) && !is_band(t) &&
                           (n0 + kWgN - 1 > w_first || n0 + kWgN > seq);
    if (need_mask) {
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const int hi = min(r_lo + 8 * hr, seq - 1) - n0;
#pragma unroll
        for (int c = 0; c < kWgN / 8; ++c)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            if (8 * c + 2 * tq + e > hi) s[4 * c + 2 * hr + e] = -INFINITY;
          }
      }
    }
    SoftmaxRows<kWgN>(s, row_max, row_sum, corr, p.scale_log2);
  };
  auto pack_p = [&]() { PackP<kWgN>(s, pa); };
  auto rescale_o = [&](const float (&corr)[2]) { RescaleO<kD>(o, corr); };

  // Step 0: S only (a band tile: S, then S_g).
  {
    const int t = tile_of(0);
    const bool far = is_far_only(t), band = is_band(t);
    if constexpr (kSE) {
      if (far || band) MbWait(qg_full, 0);
    }
    if constexpr (!kSE) {
      if (p.rope_half > 0) {
        RopeOwnQRows<kD, kWgM>(p, base_ptr + (sQ - base), cwg, m0 + 64 * cwg, row_base, h, wtid,
                               q_full, 3 + cwg);
      } else {
        MbWait(q_full, 0);
      }
    } else if (!far) {
      MbWait(q_full, 0);
    }
    MbWait(k_full(0), 0);
    NamedBarrierSync(my_turn, 256);
    WgmmaFence();
    issue_scores(s, (far ? sQg : sQ) + own_rows, sK(0));
    if (!(cwg == 1 && total == 1)) NamedBarArrive(other_turn, 256);
    WgmmaWait<0>();
    FenceRegs(s);
    if (band) {
      float sg[64];
      WgmmaFence();
      issue_scores(sg, sQg + own_rows, sKgBand);
      WgmmaWait<0>();
      FenceRegs(sg);
      band_merge(t, sg);
    }
    MbArrive(k_empty(0));
    float corr[2];
    softmax(t, corr);
    pack_p();
  }

  // Steps 1 .. n_plain_steps − 1: grouped-only and neighbour-only tiles (the plain kernel's
  // loop; SelfExtend only picks Q_g for grouped tiles, whose K stage holds K_g). In this
  // warpgroup's turn S(u) and P(u − 1)V(u − 1) are issued back to back; the softmax of S(u)
  // runs under P V and the other warpgroup's GEMMs.
  int u = 1;
  if constexpr (kSE) {
    if (n_plain_steps > 1) MbWait(q_full, 0);
  }
  for (; u < n_plain_steps; ++u) {
    const int t = tile_of(u);
    MbWait(k_full(u & 1), (u >> 1) & 1);
    MbWait(v_full((u - 1) & 1), ((u - 1) >> 1) & 1);
    NamedBarrierSync(my_turn, 256);
    WgmmaFence();
    issue_scores(s, (is_far_only(t) ? sQg : sQ) + own_rows, sK(u & 1));
    issue_pv(u - 1);
    if (!(cwg == 1 && u == total - 1)) NamedBarArrive(other_turn, 256);
    WgmmaWait<1>();  // S(u) done; P(u − 1)V(u − 1) may still run
    FenceRegs(s);
    MbArrive(k_empty(u & 1));
    float corr[2];
    softmax(t, corr);
    WgmmaWait<0>();
    FenceRegs(o);
    FenceRegs(pa);
    MbArrive(v_empty((u - 1) & 1));
    rescale_o(corr);
    pack_p();
  }
  // SelfExtend band tiles (one per block when W % 128 == 0), last: both score products, ONE
  // softmax, ONE P V. A band step issues P(u − 1)V(u − 1) first and S, S_g together once it
  // retired, so P's registers are free for S_g (o, s, S_g live; issued with S and P V as in a
  // plain step, S_g spills 212 bytes at D 128). (A 64-key-wide S_g for W % 64 == 0, issued
  // the same way, measured no faster at D 128 and 2% slower at D 64: RESULTS.md, attn6.)
  if constexpr (kSE) {
    if (u < total) {  // (step 0 may have been a grouped-only tile and the only plain step)
      MbWait(q_full, 0);
      MbWait(qg_full, 0);
    }
    for (; u < total; ++u) {
      const int t = tile_of(u);
      MbWait(k_full(u & 1), (u >> 1) & 1);
      MbWait(v_full((u - 1) & 1), ((u - 1) >> 1) & 1);
      NamedBarrierSync(my_turn, 256);
      WgmmaFence();
      issue_pv(u - 1);
      WgmmaWait<0>();
      FenceRegs(o);
      FenceRegs(pa);
      MbArrive(v_empty((u - 1) & 1));
      const uint32_t kb = sK(u & 1);
      WgmmaFence();
      float sg[64];
      issue_scores(s, sQ + own_rows, kb);
      issue_scores(sg, sQg + own_rows, sKgBand);
      if (!(cwg == 1 && u == total - 1)) NamedBarArrive(other_turn, 256);
      WgmmaWait<0>();
      FenceRegs(s);
      FenceRegs(sg);
      band_merge(t, sg);
      MbArrive(k_empty(u & 1));
      float corr[2];
      softmax(t, corr);
      rescale_o(corr);
      pack_p();
    }
  }
  MbWait(v_full((total - 1) & 1), ((total - 1) >> 1) & 1);
  WgmmaFence();
  issue_pv(total - 1);
  WgmmaWait<0>();
  FenceRegs(o);
  FenceRegs(pa);

#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    float sum = row_sum[hr];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const float inv = 1.f / sum;
#pragma unroll
    for (int c = 0; c < kDT; ++c) {
      o[4 * c + 2 * hr] *= inv;
      o[4 * c + 2 * hr + 1] *= inv;
    }
    const int row = r_lo + 8 * hr;
    if (p.lse != nullptr && tq == 0 && row < seq) {
      p.lse[(static_cast<int64_t>(b) * p.heads + h) * seq + row] =
          row_max[hr] * p.scale + logf(sum);
    }
  }
  // Stage O through this warpgroup's own Q rows (no wgmma reads them any more), then 16-byte
  // stores. Barrier ids 3 + c, 128 threads.
  NamedBarrierSync(3 + cwg, 128);
#pragma unroll
  for (int c = 0; c < kDT; ++c)
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int r = 64 * cwg + 16 * warp_in_wg + g + 8 * hr;
      *reinterpret_cast<uint32_t*>(base_ptr + Sw128Offset<kWgM>(r, 8 * c + 2 * tq)) =
          PackBf16(o[4 * c + 2 * hr], o[4 * c + 2 * hr + 1]);
    }
  NamedBarrierSync(3 + cwg, 128);
  constexpr int kChunks = 64 * kD / 8;
#pragma unroll
  for (int i = 0; i < kChunks / 128; ++i) {
    const int c = wtid + i * 128;
    const int r = c / (kD / 8), col = (c % (kD / 8)) * 8;
    const int row = w_first + r;
    if (row < seq) {
      bf16* dst = p.out + ((row_base + row) * p.heads + h) * kD + col;
      *reinterpret_cast<uint4*>(dst) =
          *reinterpret_cast<const uint4*>(base_ptr + Sw128Offset<kWgM>(64 * cwg + r, col));
    }
  }
}

template <int kD, bool kSE>
CudaResult LaunchWs(const WgmmaFwdParams& p, int64_t batch, cudaStream_t stream) {
  constexpr int smem = WsFwdSmemBytes<kD, kSE>();
  CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(attn_fwd_ws_kernel<kD, kSE>,
                                            cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  FwdTmaMaps maps{};
  const int kv_heads = p.heads / p.group;
  CUDA_RETURN_IF_NOT_OK(EncodeRowsMap(&maps.q, p.q, kD, p.heads, p.seq, batch, p.q_stride, kWgM));
  CUDA_RETURN_IF_NOT_OK(EncodeRowsMap(&maps.k, p.k, kD, kv_heads, p.seq, batch, p.kv_stride, kWgN));
  CUDA_RETURN_IF_NOT_OK(EncodeRowsMap(&maps.v, p.v, kD, kv_heads, p.seq, batch, p.kv_stride, kWgN));
  if constexpr (kSE) {
    CUDA_RETURN_IF_NOT_OK(
        EncodeRowsMap(&maps.qg, p.qg, kD, p.heads, p.seq, batch, p.q_stride, kWgM));
    CUDA_RETURN_IF_NOT_OK(
        EncodeRowsMap(&maps.kg, p.kg, kD, kv_heads, p.seq, batch, p.kv_stride, kWgN));
  }
  const int64_t pairs = batch * p.heads;
  // A pair's blocks re-read K and V (SelfExtend: and K_g).
  const int head_group = HeadGroup(int64_t{2} * p.seq * kD * 2, pairs);
  const dim3 grid((p.seq + kWgM - 1) / kWgM, p.heads, static_cast<unsigned>(batch));
  attn_fwd_ws_kernel<kD, kSE><<<grid, kWsThreads, smem, stream>>>(p, maps, head_group);
  CUDA_RETURN_IF_LAUNCH_ERROR("attn_fwd_ws_kernel");
  return {};
}

}  // namespace

CudaResult LaunchAttentionForwardWgmma(const WgmmaFwdParams& p, int64_t batch, int head_dim,
                                       bool self_extend, cudaStream_t stream) {
  if (head_dim == 64) {  // the plain D 64 forward is attention_fwd64.cu's
    return self_extend ? LaunchWs<64, true>(p, batch, stream)
                       : LaunchAttentionForwardFwd64(p, batch, stream);
  }
  return self_extend ? LaunchWs<128, true>(p, batch, stream)
                     : LaunchWs<128, false>(p, batch, stream);
}

}  // namespace gyre::cuda
