// mLSTM state recurrences on warpgroup MMA with a TMA producer (steps 2 and 5 of mlstm.cu's
// algorithm at chunk 128 / 256 with 128×128 tiles): mlstm_state_fwd_ws / _bwd_ws and their chunk
// 256 forms (_l256: 128-token steps, states stored at chunk boundaries only), and the
// last-wave-split forms (_tail: MlstmOptions::state_tail, GYRE_MLSTM_STATE_TAIL). The mma.sync
// state kernels (other chunks and tiles) are in mlstm_mma_sync.cuh. Included by mlstm.cu inside
// its anonymous namespace; launched by LaunchForward / LaunchBackward (and *256) there.

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

// C_k / dC_{k+1} out: this warp's 16 rows of the state (kNT n-tiles: 16 in a full block, 8 in a
// tail half block) as hi / lo into its swizzled 8 KB staging area (hi: column blocks at +0, +2048;
// lo at +4096, +6144), then one lane stores the boxes at (j0, row) (bulk async-group; the area is
// reused once the group has been read, a step later).
template <int kNT>
__device__ __forceinline__ void StateStageOut(const float (&acc)[kNT][4], unsigned char* stg, uint32_t stg_a,
                                              const StateWsMaps& maps, bool split, int j0, int row,
                                              int lane) {
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

// One m64n(8·kNT)k16 wgmma of the update: A from registers, B (V / dH) N-major in shared memory.
template <int kNT>
__device__ __forceinline__ void StateMma(float (&acc)[kNT][4], const uint32_t (&a)[4], uint64_t desc_b) {
  using namespace hopper;
  if constexpr (kNT == 16) {
    WgmmaRS128<1>(acc, a, desc_b);
  } else {
    WgmmaRS64<1>(acc, a, desc_b);
  }
}

// E_t (or any per-token weight) of the 32 tokens this lane's A fragments need in a 128-token step
// (w[kk][i]: token 16kk + 2c + (i & 1) + 8(i >> 1)); zero past the chunk's end.
__device__ __forceinline__ void LoadLaneWeights(float (&w)[8][4], const float* src, int len, int c) {
#pragma unroll
  for (int kk = 0; kk < 8; ++kk) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int t = 16 * kk + 2 * c + (i & 1) + 8 * (i >> 1);
      w[kk][i] = t < len ? src[t] : 0.f;
    }
  }
}

// The update's products: acc += A·B and A_lo·B over a 128-token step (B at desc_b, its 16-token
// k-steps 2 KB apart). The lo wgmmas are issued unconditionally, with A_lo zeroed when the weights'
// lo halves are off (MlstmStateWeights; a branch around wgmma is serialised by ptxas).
template <int kNT>
__device__ __forceinline__ void StateUpdate(float (&acc)[kNT][4], uint32_t (&a)[8][4], uint32_t (&alo)[8][4],
                                            bool with_lo, uint64_t desc_b) {
  using namespace hopper;
  if (!with_lo) {
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) alo[kk][0] = alo[kk][1] = alo[kk][2] = alo[kk][3] = 0u;
  }
  FenceRegs(a);
  FenceRegs(alo);
  FenceRegs(acc);
  WgmmaFence();
#pragma unroll
  for (int kk = 0; kk < 8; ++kk) {
    StateMma<kNT>(acc, a[kk], desc_b + ((kk * 16 * 128) >> 4));
    StateMma<kNT>(acc, alo[kk], desc_b + ((kk * 16 * 128) >> 4));
  }
  WgmmaCommit();
  WgmmaWait<0>();
  FenceRegs(acc);
  FenceRegs(a);
  FenceRegs(alo);
}

// A consumer warp hands its stage back once its reads are done (K / Q̂ by ldmatrix, V / dH by
// wgmma: one arrival per warp on the stage's empty barrier), then moves to the next of the two.
__device__ __forceinline__ void StateReleaseStage(uint32_t empty, int& slot, int& phase, int lane) {
  __syncwarp();
  if (lane == 0) hopper::MbArrive(empty + 8 * slot);
  AdvanceRing<2>(slot, phase);
}

// state_fwd's A operand of a 128-token step: Kᵀ diag(E) as hi + lo fragments (Kᵀ by ldmatrix.trans
// from the swizzled K stage, this warp's 16 dk rows; E_t from LoadLaneWeights), and with n_block
// n += (Kᵀ diag(E)) 1 by mma.sync with the ones operand.
__device__ __forceinline__ void StateFwdAFrags(uint32_t (&ae)[8][4], uint32_t (&elo)[8][4], float (&nacc)[4],
                                               const unsigned char* kst, const float (&ew)[8][4], int w,
                                               bool n_block, int lane) {
#pragma unroll
  for (int kk = 0; kk < 8; ++kk) {
    uint32_t a[4];
    LoadATSw(a, kst, 16 * w, 16 * kk, lane);
    ScaleAKSplitW(ae[kk], elo[kk], a, ew[kk]);
    if (n_block) {
      Mma(nacc, ae[kk], kOnesBf16x2, kOnesBf16x2);
      Mma(nacc, elo[kk], kOnesBf16x2, kOnesBf16x2);
    }
  }
}

// state_fwd's producer (thread 0): for each of nsteps 128-token steps the K tile's two column
// blocks (rows a0..) and kNT / 8 column blocks of V (from j0) of head (b, hd), onto the stage's
// "full" mbarrier.
template <int kNT>
__device__ __forceinline__ void StateFwdLoads(const StateWsMaps& maps, int a0, int j0, int b, int hd, int nsteps,
                                              uint32_t sa, uint32_t full, uint32_t empty) {
  using namespace hopper;
  using SM = StateWsSmem;
  constexpr int L = 128;
  for (int k = 0; k < nsteps; ++k) {
    const int slot = k & 1, use = k >> 1;
    if (use > 0) MbWait(empty + 8 * slot, (use - 1) & 1);
    const uint32_t st = sa + slot * SM::kStage, fb = full + 8 * slot;
    MbArriveExpectTx(fb, (2 + kNT / 8) * SM::kTile64);
    TmaTile4d(st, &maps.k, fb, a0, hd, k * L, b);
    TmaTile4d(st + SM::kTile64, &maps.k, fb, a0 + 64, hd, k * L, b);
    TmaTile4d(st + SM::kOffV, &maps.v, fb, j0, hd, k * L, b);
    if (kNT == 16) TmaTile4d(st + SM::kOffV + SM::kTile64, &maps.v, fb, j0 + 64, hd, k * L, b);
  }
}

// state_fwd's consumer warpgroups (both full kernels and the tail's blocks) on one tile: kNT
// n-tiles (16: 128 columns; 8: a tail half block) from column j0, rows a0.., head bh, nsteps
// 128-token steps of kSub per chunk (StateFwdWs). n_block: the block that also carries n.
template <int kNT, int kSub>
__device__ __forceinline__ void StateFwdConsume(const Dims& d, const FwdPtrs& p, const StateWsMaps& maps, int j0,
                                                int a0, int bh, bool n_block, int nsteps, unsigned char* sm,
                                                uint32_t sa, uint32_t full, uint32_t empty) {
  using namespace hopper;
  using SM = StateWsSmem;
  constexpr int L = 128;
  const int tid = threadIdx.x - 128, lane = tid & 31, w = tid >> 5, c = lane & 3;
  const int row0 = a0 + 16 * w;  // this warp's first row of C / n
  float acc[kNT][4];
  LoadStateInit(acc, d, p.c0, bh, row0, j0, lane);
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
    LoadLaneWeights(ew, p.e_tok + static_cast<int64_t>(bh) * d.S + t0, len, c);
    // C_k out: stage this warp's 16 rows (hi, lo) swizzled, then the TMA box stores.
    if (first) {
      StateStageOut<kNT>(acc, stg, stg_a, maps, d.split, j0, (bh * (d.NC + 1) + kc) * d.DK + row0, lane);
      if (n_block) StoreNAcc(p.sn + (static_cast<int64_t>(bh) * (d.NC + 1) + kc) * d.DK + row0, nacc, lane);
    }

    MbWait(full + 8 * slot, phase);
    const unsigned char* kst = sm + slot * SM::kStage;
    if (first) {
      DecayState(acc, nacc, decay);
    }
    // C_{k+1} = decay·C_k + (Kᵀ diag(E)) V, n_{k+1} = decay·n_k + (Kᵀ diag(E)) 1 (as the default).
    uint32_t ae[L / 16][4], elo[L / 16][4];
    StateFwdAFrags(ae, elo, nacc, kst, ew, w, n_block, lane);
    const uint64_t v_d = SmemDescSw128(sa + slot * SM::kStage + SM::kOffV, SM::kTile64, 1024);
    StateUpdate<kNT>(acc, ae, elo, d.fwd_wlo, v_d);
    StateReleaseStage(empty, slot, phase, lane);  // K (ldmatrix) and V (wgmma) reads are done
  }
  StoreFinalState(d, p, acc, nacc, bh, row0, j0, n_block, lane);
  if (lane == 0) BulkWait<0>();  // the staging areas stay valid until every box was stored
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
  constexpr int L = 128;
  const int nsteps = kSub == 1 ? d.NC : (d.S + L - 1) / L;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* sm = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  const uint32_t sa = SmemAddr(sm);
  const uint32_t full = sa + SM::kBars, empty = full + 16;
  const int j0 = blockIdx.x * 128, a0 = blockIdx.y * 128, bh = blockIdx.z;
  const int b = bh / d.NH, hd = bh % d.NH;
  InitRing<2>(full, empty, 1);

  if (threadIdx.x < 128) {  // producer warpgroup: one thread issues all loads
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    if (threadIdx.x == 0) StateFwdLoads<16>(maps, a0, j0, b, hd, nsteps, sa, full, empty);
    return;
  }

  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
  StateFwdConsume<16, kSub>(d, p, maps, j0, a0, bh, blockIdx.x == 0, nsteps, sm, sa, full, empty);
}
__global__ void __launch_bounds__(384, 1)
    mlstm_state_fwd_ws(Dims d, FwdPtrs p, const __grid_constant__ StateWsMaps maps) {
  StateFwdWs<1>(d, p, maps);
}
__global__ void __launch_bounds__(384, 1)
    mlstm_state_fwd_ws_l256(Dims d, FwdPtrs p, const __grid_constant__ StateWsMaps maps) {
  StateFwdWs<2>(d, p, maps);
}


// state_bwd's producer warpgroup (128 threads, one token each): for each of nsteps reverse 128-token
// steps the stage's coef / ddc into cws / dws, then thread 0 issues the Q̂ tile's two column blocks
// (rows a0..) and dH's two (one for a tail half block) from column j0 of head bh = (b, hd), onto
// the stage's "full" mbarrier; every thread arrives there (count 128; thread 0's arrival carries
// the TMA bytes and releases the coefficient stores).
__device__ __forceinline__ void StateBwdLoads(const Dims& d, const BwdPtrs& p, const StateWsMaps& maps, int a0,
                                              int j0, int bh, int b, int hd, int nsteps, bool half, uint32_t sa,
                                              uint32_t full, uint32_t empty, float* cws, float* dws) {
  using namespace hopper;
  using SM = StateWsSmem;
  constexpr int L = 128;
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
      MbArriveExpectTx(fb, (half ? 3 : 4) * SM::kTile64);  // (release: the stores above are visible)
      TmaTile4d(st, &maps.k, fb, a0, hd, k * L, b);  // q
      TmaTile4d(st + SM::kTile64, &maps.k, fb, a0 + 64, hd, k * L, b);
      TmaTile4d(st + SM::kOffV, &maps.v, fb, j0, hd, k * L, b);  // dh
      if (!half) TmaTile4d(st + SM::kOffV + SM::kTile64, &maps.v, fb, j0 + 64, hd, k * L, b);
    } else {
      MbArrive(fb);
    }
  }
}

// state_bwd's consumer warpgroups (both full kernels and the tail's blocks) on one tile: kNT
// n-tiles from column j0, rows a0.., head bh, nsteps reverse 128-token steps of kSub per chunk
// (StateBwdWs); coef / ddc of each stage from the producer warpgroup through shared memory (cws,
// dws). part of parts: this tile's dv column block, which sums the 16-token steps kk % parts ==
// part of dn; dn_block: the block that carries that part (a tail tile's first half only).
template <int kNT, int kSub>
__device__ __forceinline__ void StateBwdConsume(const Dims& d, const BwdPtrs& p, const StateWsMaps& maps, int j0,
                                                int a0, int bh, int part, int parts, bool dn_block, int nsteps,
                                                unsigned char* sm, uint32_t sa, uint32_t full, uint32_t empty,
                                                const float* cws, const float* dws) {
  using namespace hopper;
  using SM = StateWsSmem;
  constexpr int L = 128;
  const int tid = threadIdx.x - 128, lane = tid & 31, w = tid >> 5;
  const int row0 = a0 + 16 * w;
  auto dn_slot = [&](int slot) {
    return p.dn + ((static_cast<int64_t>(bh) * (d.NC + 1) + slot) * parts + part) * d.DK + row0;
  };
  float acc[kNT][4];
  LoadStateInit(acc, d, p.dc_fin, bh, row0, j0, lane);
  float dnacc[4] = {0.f, 0.f, 0.f, 0.f};
  if (dn_block && part == 0 && p.dc_fin != nullptr)
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
      StateStageOut<kNT>(acc, stg, stg_a, maps, d.split, j0, (bh * d.NC + kc) * d.DK + row0, lane);
      if (dn_block) StoreNAcc(dn_slot(kc), dnacc, lane);
    }

    MbWait(full + 8 * slot, phase);
    const unsigned char* qst = sm + slot * SM::kStage;
    if (first) {
      DecayState(acc, dnacc, decay);
    }
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
    StateUpdate<kNT>(acc, ac, aclo, d.bwd_wlo, h_d);
    StateReleaseStage(empty, slot, phase, lane);
  }
  if (dn_block) StoreNAcc(dn_slot(d.NC), dnacc, lane);  // dn_0's part (bwd_dqk writes d_initial's dn0)
  if (p.dc0 != nullptr) {
    StoreAccF32(p.dc0 + (static_cast<int64_t>(bh) * d.DK + row0) * d.DV + j0, d.DV, acc, lane);
  }
  if (lane == 0) BulkWait<0>();
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
  constexpr int L = 128;
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
  InitRing<2>(full, empty, 128);  // every producer thread (thread 0's with the expected bytes)

  if (threadIdx.x < 128) {  // producer warpgroup: thread 0 issues the tiles, all write coef / ddc
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    StateBwdLoads(d, p, maps, a0, j0, bh, b, hd, nsteps, false, sa, full, empty, cws, dws);
    return;
  }

  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
  StateBwdConsume<16, kSub>(d, p, maps, j0, a0, bh, part, parts, true, nsteps, sm, sa, full, empty, cws, dws);
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
  InitRing<2>(full, empty, 1);
  if (threadIdx.x < 128) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    if (threadIdx.x == 0) {
      if (half) {
        StateFwdLoads<8>(maps, t.a0, t.j0, t.bh / d.NH, t.bh % d.NH, d.NC, sa, full, empty);
      } else {
        StateFwdLoads<16>(maps, t.a0, t.j0, t.bh / d.NH, t.bh % d.NH, d.NC, sa, full, empty);
      }
    }
    return;
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
  if (half) {
    StateFwdConsume<8, 1>(d, p, maps, t.j0, t.a0, t.bh, t.first && t.part == 0, d.NC, sm, sa, full, empty);
  } else {
    StateFwdConsume<16, 1>(d, p, maps, t.j0, t.a0, t.bh, t.first && t.part == 0, d.NC, sm, sa, full, empty);
  }
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
  InitRing<2>(full, empty, 128);  // every producer thread (thread 0's with the expected bytes)
  if (threadIdx.x < 128) {  // thread 0 issues the tiles (after its coef / ddc), all write coef / ddc
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    StateBwdLoads(d, p, maps, t.a0, t.j0, t.bh, t.bh / d.NH, t.bh % d.NH, d.NC, half, sa, full, empty, cws, dws);
    return;
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
  if (half) {
    StateBwdConsume<8, 1>(d, p, maps, t.j0, t.a0, t.bh, t.part, d.DV / 128, t.first, d.NC, sm, sa, full, empty, cws, dws);
  } else {
    StateBwdConsume<16, 1>(d, p, maps, t.j0, t.a0, t.bh, t.part, d.DV / 128, t.first, d.NC, sm, sa, full, empty, cws, dws);
  }
}
