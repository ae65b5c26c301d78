// mLSTM chunk 256's off-diagonal pre-passes: mlstm_fwd_offdiag_p_l256 (P' = S' ⊙ W as fwd_out's
// A fragments) and mlstm_bwd_offdiag_p_l256 (P̃ᵀ, dS'ᵀ, dS' as bwd_dv's / bwd_dqk's A fragments).
// The rest of the chunk-256 family are instantiations of the chunk-128 templates with two
// 128-token steps (kSub = 2: _wide<8> in mlstm_gates.cuh, _l256 in mlstm_state_ws.cuh,
// mlstm_fwd_out_ws.cuh and mlstm_bwd.cuh). Included by mlstm.cu inside its anonymous namespace;
// launched by LaunchForward256 / LaunchBackward256 there (opt-in: MlstmOptions::chunk_size 256).

// ---------------------------------------------------------------- chunk 256: the off-diagonal block
//
// At chunk 256 every wgmma consumer kernel runs one block per 128-token half of a chunk (the
// _l256 instantiations) and computes the half's diagonal (causal) 128 × 128 block and its state
// terms with the chunk's C_k / dC_{k+1}; what a 128-token half does not see alone is the
// off-diagonal block of the chunk's causal square: the second half's queries t against the first
// half's keys s (all s < t, no mask, only decay: W_ts = e^{b_t − b_s + ĩ_s − m_t} with b the
// 256-token chunk's cumsum, the same formula as on the diagonal). The consumers add it themselves
// (their kOff forms) from operands these two pre-passes compute once per chunk-head (one block of 256
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
  rs0 = QuadSum(rs0);
  rs1 = QuadSum(rs1);
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
