// mLSTM's fwd_out on warpgroup MMA (step 3 of mlstm.cu's algorithm at chunk 128 / 256 with
// 128-column h slabs): mlstm_fwd_out_ws3 (three dk stages, TMA producer, mbarrier ring; the
// default), its eager-release form (GYRE_MLSTM_RING=eager), the chunk-256 consumers with the
// off-diagonal block (_l256_off, after mlstm_chunk256.cuh's P' pre-pass) and the persistent grid
// (mlstm_fwd_out_ws3_persist, MlstmOptions::persist). The mma.sync fwd_out is in
// mlstm_mma_sync.cuh. Included by mlstm.cu inside its anonymous namespace; launched by
// LaunchForward / LaunchForward256 there.

// fwd_out on warpgroup MMA (sm_90a wgmma), L 128 and 128-column h slabs: mlstm_fwd_out_ws3 below,
// the math of mlstm_fwd_out in mlstm_mma_sync.cuh. Warpgroup wg owns rows 64wg..64wg+63 (identity
// map, as bwd_dqk). Per 64-wide dk stage (swizzled Q, K tiles [128][64], C_k hi / lo rows [64 dk][128
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
  rs0 = QuadSum(rs0);
  rs1 = QuadSum(rs1);
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

// P (the gated S accumulator of a warpgroup's m64n128 wgmma, 64 floats) as the A fragments of P·V:
// bf16 hi + lo pairs, k-step kk from accumulator n-tiles 2kk, 2kk + 1.
__device__ __forceinline__ void PackPFragments(const float (&sacc)[64], uint32_t (&pa)[8][4],
                                               uint32_t (&palo)[8][4]) {
#pragma unroll
  for (int kk = 0; kk < 8; ++kk) {
    SplitPack(sacc[8 * kk + 0], sacc[8 * kk + 1], pa[kk][0], palo[kk][0]);
    SplitPack(sacc[8 * kk + 2], sacc[8 * kk + 3], pa[kk][1], palo[kk][1]);
    SplitPack(sacc[8 * kk + 4], sacc[8 * kk + 5], pa[kk][2], palo[kk][2]);
    SplitPack(sacc[8 * kk + 6], sacc[8 * kk + 7], pa[kk][3], palo[kk][3]);
  }
}

// hacc += A·V (and A_lo·V when SPLIT) over 128 keys: V's [128][128] slab N-major at desc_v. The
// caller fences what must be final before (hacc after its scaling, or the A operands).
template <bool SPLIT>
__device__ __forceinline__ void PvWgmma(float (&hacc)[64], uint32_t (&a)[8][4], uint32_t (&alo)[8][4],
                                        uint64_t desc_v) {
  using namespace hopper;
  WgmmaFence();
#pragma unroll
  for (int kk = 0; kk < 8; ++kk) {
    WgmmaRS128<1>(hacc, a[kk], desc_v + ((kk * 16 * 128) >> 4));
    if constexpr (SPLIT) WgmmaRS128<1>(hacc, alo[kk], desc_v + ((kk * 16 * 128) >> 4));
  }
  WgmmaCommit();
  WgmmaWait<0>();
  FenceRegs(hacc);
  FenceRegs(a);
  FenceRegs(alo);
}

// h = numerator / (max(|den|, e^{−m}) + ε) for the thread's rows r0 (den0, m0v) and r1, into the
// [16][4] fragment layout of the epilogue's stores.
__device__ __forceinline__ void NormalizeRows(const Dims& d, const float (&hacc)[64], float den0, float den1,
                                              float m0v, float m1v, float (&h4)[16][4]) {
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
  PackPFragments(sacc, pa, palo);
  MbWait(full + 8 * slot, phase);
  const uint64_t v_d = SmemDescSw128(sa + slot * kStageBytes, kTile64, 1024);
  // The scaled hacc must be final before the fence: pure register math, so without this the
  // compiler may sink the multiplies between wgmma.fence and the wgmma that reads them, and
  // ptxas then serialises every wgmma of the kernel (warning C7515, which the deleted two-stage
  // kernel got: the likely reason its TMA producer gained 3% where bwd_dqk_ws gained 19%).
  FenceRegs(hacc);
  PvWgmma<SPLIT>(hacc, pa, palo, v_d);
  NormalizeRows(d, hacc, den0, den1, m0v, m1v, h4);
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
  PackPFragments(sacc, pa, palo);
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
  PvWgmma<SPLIT>(hacc, pa, palo, v_d);
  if (off) {
    const int slot0 = slot + 1 == 3 ? 0 : slot + 1, phase0 = slot0 == 0 ? phase ^ 1 : phase;
    MbWait(full + 8 * slot0, phase0);
    const uint64_t v0_d = SmemDescSw128(sa + slot0 * kStageBytes, kTile64, 1024);
    FenceRegs(pb);
    FenceRegs(pblo);
    PvWgmma<SPLIT>(hacc, pb, pblo, v0_d);
  }
  NormalizeRows(d, hacc, den0, den1, m0v, m1v, h4);
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
  InitRing<kRing>(full, empty, 1);

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
    AdvanceRing<kRing>(slot, phase);
  } while (++dt < ndt);
  WgmmaWait<0>();
  FenceRegs(sacc);
  FenceRegs(hacc);
  qn0 = QuadSum(qn0);
  qn1 = QuadSum(qn1);

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

// tile_counter: zeroed by the launcher before each launch. Warp 1 draws the tiles and publishes
// each in its vector buffer (the int after m_k); the TMA thread and the consumers read it there
// (tile >= ntiles: stop).
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
        PublishTile(reinterpret_cast<int*>(nks), d.DK + 1, vfull + 8 * vb, tile, ntiles, lane);
        if (tile >= ntiles) break;
        tile = DrawNextTile(tile_counter, lane);
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
      AdvanceRing<kRing>(slot, phase);
    } while (++dt < ndt);
    WgmmaWait<0>();
    FenceRegs(sacc);
    FenceRegs(hacc);
    qn0 = QuadSum(qn0);
    qn1 = QuadSum(qn1);

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
    AdvanceRing<kRing>(slot, phase);
    if (slab == 0 && c == 0) {
      const int64_t o = static_cast<int64_t>(bh) * d.S + t0;
      if (r0 < len) p.den_tok[o + r0] = den0;
      if (r1 < len) p.den_tok[o + r1] = den1;
    }
  }
}
