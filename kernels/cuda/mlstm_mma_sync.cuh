// mLSTM's mma.sync family (m16n8k16 with ldmatrix, cp.async stages): state_fwd, fwd_out,
// state_bwd, bwd_dv and bwd_dqk as templates over the chunk L (16-128), the slab width and the
// precision. They run wherever the warpgroup-MMA kernels do not apply: chunk 16-64, 64-column
// h / dq / dk / dv slabs, 64×64 state tiles (mlstm.cu's Dims::wg_* flags and LaunchForward /
// LaunchBackward choose; GYRE_MLSTM_BWD_DV=mma forces bwd_dv here at chunk 128). The wgmma kernels
// of chunk 128 / 256 (mlstm_state_ws.cuh, mlstm_fwd_out_ws.cuh, mlstm_bwd.cuh) compute the same
// math; each of them names the kernel here whose products it reorganises. Included by mlstm.cu
// inside its anonymous namespace, after mlstm_device.cuh.

// The two-stage cp.async pipeline of fwd_out / bwd_dv / bwd_dqk: before step i, issue step i + 1's
// loads into the other stage (load(i + 1, stage), which commits a group) and wait for step i's
// group, or at the last step for all; then the block barrier makes the tiles visible.
template <typename Load>
__device__ __forceinline__ void NextStage(Load& load, int i, int n) {
  if (i + 1 < n) {
    load(i + 1, (i + 1) & 1);
    CpAsyncWait<1>();
  } else {
    CpAsyncWait<0>();
  }
  __syncthreads();
}

// ---------------------------------------------------------------- 2. state_fwd

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
  LoadStateInit(acc, d, p.c0, bh, row0, j0, lane);
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
    DecayState(acc, nacc, decay);
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
  StoreFinalState(d, p, acc, nacc, bh, row0, j0, n_block, lane);
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
    NextStage(load_stage, dt, ndt);
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
      MmaTileB<true, DVT / 16>(hacc, a, cs, SM::kSV, 16 * kk, lane);
      if constexpr (SPLIT) {
        MmaTileB<true, DVT / 16>(hacc, a, cs + 64 * SM::kSV, SM::kSV, 16 * kk, lane);
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
  rs0 = QuadSum(rs0);
  rs1 = QuadSum(rs1);
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

  // (Not LoadStateInit: with it the PTX computes two of the init addresses in the other order.)
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
    DecayState(acc, dnacc, decay);
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
    NextStage(load_stage, dt, ndt);
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
      MmaTileB<true, DVT / 16>(vacc, a, cs, SM::kSV, 16 * kk, lane);
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
      MmaTileB<true, DVT / 16>(vacc, a, hs, SM::kSV, 16 * kk, lane);
    }
  }
  // dv leaves through shared memory in 16-byte pieces (warp w stages its rows in the dh slab's
  // rows 16w.., free after this barrier).
  __syncthreads();
  StoreAccStaged(p.dv + (tok0 + static_cast<int64_t>(16 * w) * d.NH) * d.DV + j0,
                 static_cast<bf16*>(nullptr), ldv, vacc, hs + 16 * w * SM::kSV,
                 static_cast<bf16*>(nullptr), lane, len - 16 * w);
}

// ---------------------------------------------------------------- 7. bwd_dqk

// The rows r0, r1 of a warp's dQ / dK accumulator (m16n8 fragments, NT n-tiles) as bf16 into dst
// (row stride ld; rows past len are padding), and their partial dots with the same rows of the
// padded shared tile xs (row stride sx; Q for dQ, K for dK) over this lane's columns added to
// dot0, dot1.
template <int NT>
__device__ __forceinline__ void StoreRowsPadded(const float (&acc)[NT][4], const bf16* xs, int sx, bf16* dst,
                                                int64_t ld, int r0, int r1, int c, int len, float& dot0,
                                                float& dot1) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int col = nt * 8 + 2 * c;
    const float2 x0 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(xs + r0 * sx + col));
    const float2 x1 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(xs + r1 * sx + col));
    dot0 += x0.x * acc[nt][0] + x0.y * acc[nt][1];
    dot1 += x1.x * acc[nt][2] + x1.y * acc[nt][3];
    if (r0 < len) *reinterpret_cast<uint32_t*>(dst + r0 * ld + col) = PackBf16(acc[nt][0], acc[nt][1]);
    if (r1 < len) *reinterpret_cast<uint32_t*>(dst + r1 * ld + col) = PackBf16(acc[nt][2], acc[nt][3]);
  }
}

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
    NextStage(load_p1, jt, njt);
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
      MmaTileB<false, DKT / 16>(qacc, a, cs, SM::kS64, 16 * kk, lane);  // C_hi, then C_lo (as in fwd_out)
      if constexpr (SPLIT) {
        MmaTileB<false, DKT / 16>(qacc, a, clos, SM::kS64, 16 * kk, lane);
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
      MmaTileB<true, DKT / 16>(qacc, a, ks, SM::kSK, 16 * kk, lane);
    }
  }
  {
    float dot0 = 0.f, dot1 = 0.f;
    StoreRowsPadded(qacc, qs, SM::kSK, p.dq + tok0 * d.DK + a0, ldqk, r0, r1, c, len, dot0, dot1);
    StoreRowDots<true>(p, dot0, dot1, so, blockIdx.x, r0, r1, c, len);
  }
  // Phase 3: dK = diag(E)(V dC_{k+1}ᵀ + dn_{k+1}) + dS'ᵀ Q  (rows s of this warp).
  float kacc[kQt][4];
#pragma unroll
  for (int i = 0; i < kQt; ++i) kacc[i][0] = kacc[i][1] = kacc[i][2] = kacc[i][3] = 0.f;
  for (int jt = 0; jt < njt; ++jt) {
    NextStage(load_p3, jt, njt);
    const bf16* vs = sm + (jt & 1) * SM::kStage + SM::kOffV;
    const bf16* dcs = sm + (jt & 1) * SM::kStage + SM::kOffC;
    const bf16* dclos = sm + (jt & 1) * SM::kStage;
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      uint32_t a[4];
      LoadA(a, vs, SM::kS64, 16 * w, 16 * kk, lane);
      MmaTileB<false, DKT / 16>(kacc, a, dcs, SM::kS64, 16 * kk, lane);  // dC_hi, then dC_lo
      if constexpr (SPLIT) {
        MmaTileB<false, DKT / 16>(kacc, a, dclos, SM::kS64, 16 * kk, lane);
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
      MmaTileB<true, DKT / 16>(kacc, a, qs, SM::kSK, 16 * kk, lane);
    }
  }
  {
    float dot0 = 0.f, dot1 = 0.f;
    StoreRowsPadded(kacc, ks, SM::kSK, p.dk + tok0 * d.DK + a0, ldqk, r0, r1, c, len, dot0, dot1);
    StoreRowDots<false>(p, dot0, dot1, so, blockIdx.x, r0, r1, c, len);
  }
}
