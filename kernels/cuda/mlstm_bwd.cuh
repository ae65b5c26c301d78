// mLSTM's backward per-chunk kernels on the chunk-128 / 256 path (steps 4, 6, 7 of mlstm.cu's
// algorithm): bwd_prep (and bwd_prep_dots, MlstmChunkwiseBackwardWithDots), bwd_dv on warpgroup
// MMA (mlstm_bwd_dv_wg_fused, one block per head-chunk for all dv slabs, and its chunk-256 form
// with the off-diagonal fragments), bwd_dqk on warpgroup MMA with a TMA producer
// (mlstm_bwd_dqk_ws, _eager, _l256_off) and its persistent grid (mlstm_bwd_dqk_ws_persist). The
// mma.sync bwd_dv / bwd_dqk are in mlstm_mma_sync.cuh, the state_bwd kernels in
// mlstm_state_ws.cuh, gates_bwd in mlstm_gates.cuh. Included by mlstm.cu inside its anonymous
// namespace; launched by LaunchBwdPrep / LaunchBackward / LaunchBackward256 there.

// ---------------------------------------------------------------- 4. bwd_prep

// The per-token scalars of bwd_prep from dot = dh·(h + h_lo) over dv (0 with stop_grad) at
// (head-major) o = (b·NH + hd)·S + t.
__device__ __forceinline__ void BwdPrepScalars(const Dims& d, const BwdPtrs& p, int b, int hd, int t, int64_t o,
                                               float dot) {
  const float m = p.m_tok[o], den = p.den_tok[o];
  const float floor_v = __expf(-m);
  const float inv = 1.f / (fmaxf(fabsf(den), floor_v) + d.eps);
  const int k = t / d.L;
  const float G = d.scale * __expf(p.b_tok[o] + p.smk[(static_cast<int64_t>(b) * d.NH + hd) * (d.NC + 1) + k] - m);
  float dden = 0.f, dm = 0.f;
  if (!d.stop_grad) {
    const float dd = -dot * inv;
    dden = fabsf(den) >= floor_v ? (den >= 0.f ? dd : -dd) : 0.f;
    dm = -dot * d.eps * inv;
  }
  p.inv_d[o] = inv;
  p.dden[o] = dden;
  p.dm[o] = dm;
  p.coef[o] = G * inv;
  p.ddc[o] = G * dden;
}

__global__ void __launch_bounds__(256) mlstm_bwd_prep(Dims d, BwdPtrs p) {
  const int64_t tok = static_cast<int64_t>(blockIdx.x) * 8 + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (tok >= static_cast<int64_t>(d.B) * d.S * d.NH) return;
  const int hd = tok % d.NH;
  const int64_t bt = tok / d.NH;
  const int t = bt % d.S, b = bt / d.S;
  const int64_t o = (static_cast<int64_t>(b) * d.NH + hd) * d.S + t;
  float dot = 0.f;
  if (!d.stop_grad) {
    // With split precision h_fp32 = h + h_lo: dh·h cancels against dh·v_s in the true
    // gradient, so h's bf16 rounding must not enter here.
    const bf16* hh = p.h + tok * d.DV;
    const bf16* hl = d.split ? p.h_lo + tok * d.DV : nullptr;
    const bf16* dd = p.dh + tok * d.DV;
    for (int j = lane * 8; j < d.DV; j += 256) {
      const uint4 x = *reinterpret_cast<const uint4*>(hh + j);
      const uint4 y = *reinterpret_cast<const uint4*>(dd + j);
      const uint4 z = hl != nullptr ? *reinterpret_cast<const uint4*>(hl + j) : make_uint4(0, 0, 0, 0);
      const __nv_bfloat162* xh = reinterpret_cast<const __nv_bfloat162*>(&x);
      const __nv_bfloat162* yh = reinterpret_cast<const __nv_bfloat162*>(&y);
      const __nv_bfloat162* zh = reinterpret_cast<const __nv_bfloat162*>(&z);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float2 a = __bfloat1622float2(xh[i]), bb = __bfloat1622float2(yh[i]);
        const float2 lo = __bfloat1622float2(zh[i]);
        dot += (a.x + lo.x) * bb.x + (a.y + lo.y) * bb.y;
      }
    }
    dot = WarpSumT(dot);
  }
  if (lane == 0) BwdPrepScalars(d, p, b, hd, t, o, dot);
}

// mlstm_bwd_prep with the per-token scalars loaded first (session 21, helper dqk64; opt-in
// GYRE_MLSTM_BWD_PREP=early). Why: the default warp reads its token's dh, h, h_lo rows, reduces
// the dot across the warp and only then has lane 0 read m, den, b and m_k: two dependent DRAM
// round trips a warp, and in the second one an SM has only 4 scalars a warp in flight. Here every
// lane reads the four scalars (one broadcast transaction each) before the rows, so both sets are in
// flight together; the arithmetic is BwdPrepScalars' in the same order (bitwise the same outputs).
// At xlstm-large-125m's cell (131k tokens, dv 192) the rows are 151 MB: measured (H100, 3 of 3
// alternating rounds) 0.082 -> 0.063 ms (1.9 -> 2.4 TB/s), the cell's fwd+bwd 1.018 -> 0.998 ms;
// the step's −0.3 ms (−0.5%) is inside its round spread, so it stays opt-in (mlstm_notes.md).
__global__ void __launch_bounds__(256) mlstm_bwd_prep_early(Dims d, BwdPtrs p) {
  const int64_t tok = static_cast<int64_t>(blockIdx.x) * 8 + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (tok >= static_cast<int64_t>(d.B) * d.S * d.NH) return;
  const int hd = tok % d.NH;
  const int64_t bt = tok / d.NH;
  const int t = bt % d.S, b = bt / d.S;
  const int64_t o = (static_cast<int64_t>(b) * d.NH + hd) * d.S + t;
  const float m = p.m_tok[o], den = p.den_tok[o], b_t = p.b_tok[o];
  const float m_k = p.smk[(static_cast<int64_t>(b) * d.NH + hd) * (d.NC + 1) + t / d.L];
  float dot = 0.f;
  if (!d.stop_grad) {
    const bf16* hh = p.h + tok * d.DV;
    const bf16* hl = d.split ? p.h_lo + tok * d.DV : nullptr;
    const bf16* dd = p.dh + tok * d.DV;
    for (int j = lane * 8; j < d.DV; j += 256) {
      const uint4 x = *reinterpret_cast<const uint4*>(hh + j);
      const uint4 y = *reinterpret_cast<const uint4*>(dd + j);
      const uint4 z = hl != nullptr ? *reinterpret_cast<const uint4*>(hl + j) : make_uint4(0, 0, 0, 0);
      const __nv_bfloat162* xh = reinterpret_cast<const __nv_bfloat162*>(&x);
      const __nv_bfloat162* yh = reinterpret_cast<const __nv_bfloat162*>(&y);
      const __nv_bfloat162* zh = reinterpret_cast<const __nv_bfloat162*>(&z);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float2 a = __bfloat1622float2(xh[i]), bb = __bfloat1622float2(yh[i]);
        const float2 lo = __bfloat1622float2(zh[i]);
        dot += (a.x + lo.x) * bb.x + (a.y + lo.y) * bb.y;
      }
    }
    dot = WarpSumT(dot);
  }
  if (lane != 0) return;
  const float floor_v = __expf(-m);
  const float inv = 1.f / (fmaxf(fabsf(den), floor_v) + d.eps);
  const float G = d.scale * __expf(b_t + m_k - m);
  float dden = 0.f, dm = 0.f;
  if (!d.stop_grad) {
    const float dd = -dot * inv;
    dden = fabsf(den) >= floor_v ? (den >= 0.f ? dd : -dd) : 0.f;
    dm = -dot * d.eps * inv;
  }
  p.inv_d[o] = inv;
  p.dden[o] = dden;
  p.dm[o] = dm;
  p.coef[o] = G * inv;
  p.ddc[o] = G * dden;
}

// bwd_prep with the dots given (MlstmChunkwiseBackwardWithDots: dots[tok] = dh·(h + h_lo) of
// token-major tok = (b·S + t)·NH + hd, computed by the caller, e.g. the output norm's backward
// that writes dh and reads h anyway). One thread per (head, token), head-major, so the five
// scalar rows are written coalesced; it reads 5 floats and writes 5 a token (~10 MB at the
// 125m shape, against the warp kernel's three [tokens, dv] bf16 passes, ~300 MB).
__global__ void __launch_bounds__(256) mlstm_bwd_prep_dots(Dims d, BwdPtrs p, const float* dots) {
  const int64_t o = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x;
  if (o >= static_cast<int64_t>(d.B) * d.NH * d.S) return;
  const int t = o % d.S;
  const int64_t bh = o / d.S;
  const int hd = bh % d.NH, b = bh / d.NH;
  const float dot = d.stop_grad ? 0.f : dots[(static_cast<int64_t>(b) * d.S + t) * d.NH + hd];
  BwdPrepScalars(d, p, b, hd, t, o, dot);
}

// bwd_dv on warpgroup MMA (sm_90a wgmma), L 128 and dv a multiple of 128: the math of
// mlstm_bwd_dv in mlstm_mma_sync.cuh (K dC_{k+1} with dC's hi plane only and Pᵀ as single bf16, as
// there), one block per (head, chunk) for all 128-column dv slabs (helper mlstm8). Warpgroup wg owns the key
// rows s = 64wg..64wg+63 (identity map, as bwd_dqk_ws / fwd_out_ws3). Per 64-wide dk stage
// (swizzled K, Q tiles [128][64], dC_{k+1} rows [64 dk][128 dv]): slab 0 computes Sᵀ = K Qᵀ
// (m64n128, both K-major) once with dV_0 += K dC (dC N-major); Pᵀ = Sᵀ·scale ⊙ W / den then stays
// in registers (bf16 A fragments, bwd_dqk_ws's dS' mapping) while the block walks the slabs:
// slab j's dk stages load K (again, from L2) and dC_j, then dV_j = diag(E) dV_j + Pᵀ dH_j
// (register A, dH N-major). One cp.async pipeline of kStages 48 KB stages runs across the slabs;
// the dh slab of slab j + 1 loads at slab j + 1's first step (its barrier follows slab j's last
// read of the dh buffer); dv leaves through its own staging buffer (warp-private rows), so the
// next slab's loads stay in flight meanwhile.
// Per head-chunk at the 125m cell: 6.3M + 3 × (6.3M + 2.1M) = 31.5M MACs (mma.sync 33M; the
// one-block-per-slab wgmma version of session 8, which recomputed Sᵀ per slab, 44M, lost to this
// kernel and was deleted in session 9); 1024 blocks.
template <int kStages>
struct DvWgFusedSmem {
  static constexpr int kTile64 = 128 * 128;  // bytes of a [128 rows][64 cols] bf16 tile
  static constexpr int kH = 0;               // [128 t][128 dv] dh of the current slab
  static constexpr int kStage0 = 2 * kTile64;
  // Stage: K [128 s][64 dk], Q [128 t][64 dk] (slab 0 only), dC_{k+1} [64 dk][128 dv].
  static constexpr int kOffQ = kTile64, kOffC = 2 * kTile64;
  static constexpr int kStage = 3 * kTile64;
  static constexpr int kStaging = kStage0 + kStages * kStage;  // bf16 [128][128 + kPad] dv rows
  static constexpr int kFloats = kStaging + 128 * (128 + kPad) * 2;
  static constexpr size_t kBytes = kFloats + 4 * 128 * 4 + 1024;  // b, ĩ, m, 1/den; + alignment
  static_assert(kStages >= 2, "the pipeline below needs a stage in flight");
  static_assert(kBytes <= 227 * 1024, "one block's opt-in shared memory on sm_90");
};

// kSub 2 (chunk 256, always with kOff: mlstm_bwd_dv_wg_fused_l256_off): a block is one 128-token
// half k of chunk k / 2: its diagonal block, dC_{k/2+1} and m_{k/2+1}, E_t read from the gate scan
// (relative to the 256-token chunk's end, which the half may not contain).
// kOff (helper off256b, session 18): a half-0 block whose chunk has a second half also adds the
// chunk's off-diagonal block (the first half's keys against the second half's queries): dV_j += P̃'ᵀ dH1_j, with P̃'ᵀ (this thread's rows s, 8
// uint4 of mlstm_bwd_offdiag_p_l256's fragments, loaded once) and dH1_j (the second half's dh
// slab j) loaded beside slab j's dh into the staging buffer (a swizzled [128][128] tile fits its
// 34 KB; the stage ring has no room for a second dh slab). The 8 extra RS wgmmas join the slab's
// dH group; a block barrier then keeps the staging writes of the dv store behind both warpgroups'
// reads of dH1.
template <int kStages, int kSub, bool kOff = false>
__device__ __forceinline__ void BwdDvWgFused(const Dims& d, const BwdPtrs& p, const uint4* bfrag = nullptr) {
  using namespace hopper;
  using SM = DvWgFusedSmem<kStages>;
  constexpr int L = 128, DVT = 128, kThreads = 256, kSH = DVT + kPad;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* sm = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  const uint32_t sa = SmemAddr(sm);
  bf16* staging = reinterpret_cast<bf16*>(sm + SM::kStaging);
  float* bs = reinterpret_cast<float*>(sm + SM::kFloats);
  float* igs = bs + L;
  float* ms = igs + L;
  float* ivs = ms + L;
  const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5, g = lane >> 2, c = lane & 3;
  const int wg = __shfl_sync(0xffffffffu, tid >> 7, 0);  // warp-uniform (see bwd_dqk_ws)
  const int k = blockIdx.y, bh = blockIdx.z;
  const int kc = kSub == 1 ? k : k >> 1;  // chunk (state index) of this block
  const int b = bh / d.NH, hd = bh % d.NH;
  const int t0 = k * L, len = min(L, d.S - t0);
  const int64_t ldqk = static_cast<int64_t>(d.NH) * d.DK, ldv = static_cast<int64_t>(d.NH) * d.DV;
  const int64_t tok0 = (static_cast<int64_t>(b) * d.S + t0) * d.NH + hd;
  const int64_t so = static_cast<int64_t>(bh) * d.S + t0;
  const bf16* kbase = p.k + tok0 * d.DK;
  const bf16* qbase = p.q + tok0 * d.DK;
  const bf16* dhbase = p.dh + tok0 * d.DV;
  const bf16* dcbase = p.dc + (static_cast<int64_t>(bh) * d.NC + kc) * d.DK * d.DV;
  const float m_next = p.smk[static_cast<int64_t>(bh) * (d.NC + 1) + kc + 1];
  const int ndt = d.DK / 64, nslab = d.DV / DVT, nsteps = ndt * nslab;

  auto stage_ptr = [&](int stage) { return sm + SM::kStage0 + stage * SM::kStage; };
  auto load_dh = [&](int j) {
    LoadTileSw<L>(sm + SM::kH, dhbase + j * DVT, ldv, len, tid, kThreads);
    LoadTileSw<L>(sm + SM::kH + SM::kTile64, dhbase + j * DVT + 64, ldv, len, tid, kThreads);
  };
  // kOff: this half-0 block carries its chunk's off-diagonal block (block-uniform).
  const bool off = kOff && (k & 1) == 0 && t0 + L < d.S;
  const int len1 = kOff ? min(L, d.S - t0 - L) : 0;
  const bf16* dh1base = kOff ? p.dh + (tok0 + static_cast<int64_t>(L) * d.NH) * d.DV : nullptr;
  auto load_dh1 = [&](int j) {
    LoadTileSw<L>(sm + SM::kStaging, dh1base + j * DVT, ldv, len1, tid, kThreads);
    LoadTileSw<L>(sm + SM::kStaging + SM::kTile64, dh1base + j * DVT + 64, ldv, len1, tid, kThreads);
  };
  // Step x = slab j · ndt + dk tile dt.
  auto load_step = [&](int x) {
    const int j = x / ndt, dt = x % ndt;
    unsigned char* st = stage_ptr(x % kStages);
    LoadTileSw<L>(st, kbase + dt * 64, ldqk, len, tid, kThreads);
    if (j == 0) LoadTileSw<L>(st + SM::kOffQ, qbase + dt * 64, ldqk, len, tid, kThreads);
    const bf16* cb = dcbase + static_cast<int64_t>(dt) * 64 * d.DV + j * DVT;
    LoadTileSw<64>(st + SM::kOffC, cb, d.DV, 64, tid, kThreads);
    LoadTileSw<64>(st + SM::kOffC + 64 * 128, cb + 64, d.DV, 64, tid, kThreads);
  };
  // cp.async group x holds step x's tiles (group 0 also slab 0's dh; the group of step j · ndt
  // also slab j's dh); groups past nsteps − 1 hold at most a dh slab.
  load_dh(0);
  if constexpr (kOff) {
    if (off) load_dh1(0);
  }
#pragma unroll
  for (int i = 0; i < kStages - 1; ++i) {
    if (i < nsteps) load_step(i);
    CpAsyncCommit();
  }
  if (tid < L) {
    const bool ok = tid < len;
    bs[tid] = ok ? p.b_tok[so + tid] : 0.f;
    ms[tid] = ok ? p.m_tok[so + tid] : 0.f;
    igs[tid] = ok ? p.ig[tok0 + static_cast<int64_t>(tid) * d.NH] : -INFINITY;
    ivs[tid] = ok ? p.inv_d[so + tid] : 0.f;
  }
  // Step it's tiles visible, every thread done with step it − 1's stage and (it = j · ndt) with
  // slab j − 1's dh; then the loads of step it + kStages − 1 (and slab j's dh).
  auto advance = [&](int it) {
    CpAsyncWait<kStages - 2>();
    FenceProxyAsync();
    __syncthreads();
    if (it + kStages - 1 < nsteps) load_step(it + kStages - 1);
    if (it > 0 && it % ndt == 0) load_dh(it / ndt);
    if constexpr (kOff) {
      if (off && it > 0 && it % ndt == 0) load_dh1(it / ndt);
    }
    CpAsyncCommit();
  };

  const uint32_t own = wg * 64 * 128;  // this warpgroup's 64 rows of a [128][64] block
  const int r0 = 16 * w + g, r1 = r0 + 8;
  float vacc[64];
  uint32_t pa[8][4];
  uint32_t poff[8][4];  // kOff: P̃'ᵀ, this thread's rows s
  if constexpr (kOff) {
    if (off) {
      const uint4* src = bfrag + (static_cast<int64_t>(bh) * d.NC + kc) * 24 * 256 + tid;
#pragma unroll
      for (int kk = 0; kk < 8; ++kk) {
        const uint4 v4 = src[kk * 256];
        poff[kk][0] = v4.x;
        poff[kk][1] = v4.y;
        poff[kk][2] = v4.z;
        poff[kk][3] = v4.w;
      }
    }
  }
  float E0 = 0.f, E1 = 0.f;
  int it = 0;
  for (int j = 0; j < nslab; ++j) {
#pragma unroll
    for (int i = 0; i < 64; ++i) vacc[i] = 0.f;
    if (j == 0) {
      float sacc[64];
#pragma unroll
      for (int i = 0; i < 64; ++i) sacc[i] = 0.f;
      for (int dt = 0; dt < ndt; ++dt, ++it) {
        advance(it);
        const uint32_t st = sa + SM::kStage0 + (it % kStages) * SM::kStage;
        const uint64_t k_d = SmemDescSw128(st + own, 16, 1024);
        const uint64_t q_d = SmemDescSw128(st + SM::kOffQ, 16, 1024);
        const uint64_t c_d = SmemDescSw128(st + SM::kOffC, 64 * 128, 1024);
        WgmmaFence();
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
          const uint64_t ks = (kk * 32) >> 4, cs = (kk * 16 * 128) >> 4;
          WgmmaSS128<0, 0>(sacc, k_d + ks, q_d + ks, 1);
          WgmmaSS128<0, 1>(vacc, k_d + ks, c_d + cs, 1);
        }
        WgmmaCommit();
        WgmmaWait<0>();
        FenceRegs(sacc);
        FenceRegs(vacc);
      }
      // Pᵀ_st = Sᵀ_st · scale · W_ts / denom_t, causal t >= s, to bf16 A
      // fragments kept for every slab.
      if constexpr (kSub == 1) {
        const float gl = bs[len - 1];
        E0 = r0 < len ? __expf(gl - bs[r0] + igs[r0] - m_next) : 0.f;
        E1 = r1 < len ? __expf(gl - bs[r1] + igs[r1] - m_next) : 0.f;
      } else {
        E0 = r0 < len ? p.e_tok[so + r0] : 0.f;
        E1 = r1 < len ? p.e_tok[so + r1] : 0.f;
      }
      const float x0 = igs[r0] - bs[r0], x1 = igs[r1] - bs[r1];
#pragma unroll
      for (int nt = 0; nt < 16; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int t = nt * 8 + 2 * c + (e & 1);
          const int s = e < 2 ? r0 : r1;
          const float xs = e < 2 ? x0 : x1;
          float pv = 0.f;
          if (s <= t && t < len) pv = sacc[4 * nt + e] * d.scale * ivs[t] * __expf(bs[t] + xs - ms[t]);
          sacc[4 * nt + e] = pv;
        }
      }
#pragma unroll
      for (int kk = 0; kk < 8; ++kk) {
        pa[kk][0] = PackBf16(sacc[8 * kk + 0], sacc[8 * kk + 1]);
        pa[kk][1] = PackBf16(sacc[8 * kk + 2], sacc[8 * kk + 3]);
        pa[kk][2] = PackBf16(sacc[8 * kk + 4], sacc[8 * kk + 5]);
        pa[kk][3] = PackBf16(sacc[8 * kk + 6], sacc[8 * kk + 7]);
      }
    } else {
      for (int dt = 0; dt < ndt; ++dt, ++it) {
        advance(it);
        const uint32_t st = sa + SM::kStage0 + (it % kStages) * SM::kStage;
        const uint64_t k_d = SmemDescSw128(st + own, 16, 1024);
        const uint64_t c_d = SmemDescSw128(st + SM::kOffC, 64 * 128, 1024);
        WgmmaFence();
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
          WgmmaSS128<0, 1>(vacc, k_d + ((kk * 32) >> 4), c_d + ((kk * 16 * 128) >> 4), 1);
        }
        WgmmaCommit();
        WgmmaWait<0>();
        FenceRegs(vacc);
      }
    }
    // Slab j's dh landed with the group of step j · ndt, which the waits above cover once
    // ndt >= kStages; with fewer dk tiles, wait for everything.
    if (ndt < kStages) {
      CpAsyncWait<0>();
      FenceProxyAsync();
      __syncthreads();
    }
#pragma unroll
    for (int nt = 0; nt < 16; ++nt) {
      vacc[4 * nt + 0] *= E0;
      vacc[4 * nt + 1] *= E0;
      vacc[4 * nt + 2] *= E1;
      vacc[4 * nt + 3] *= E1;
    }
    {
      const uint64_t dh_d = SmemDescSw128(sa + SM::kH, SM::kTile64, 1024);
      WgmmaFence();
#pragma unroll
      for (int kk = 0; kk < 8; ++kk) {
        WgmmaRS128<1>(vacc, pa[kk], dh_d + ((kk * 16 * 128) >> 4));
      }
      if constexpr (kOff) {
        if (off) {
          const uint64_t dh1_d = SmemDescSw128(sa + SM::kStaging, SM::kTile64, 1024);
#pragma unroll
          for (int kk = 0; kk < 8; ++kk) WgmmaRS128<1>(vacc, poff[kk], dh1_d + ((kk * 16 * 128) >> 4));
        }
      }
      WgmmaCommit();
      WgmmaWait<0>();
      FenceRegs(vacc);
      FenceRegs(pa);
      if constexpr (kOff) {
        FenceRegs(poff);
        if (off) __syncthreads();  // both warpgroups' wgmmas are done reading dH1 in the staging buffer
      }
    }
    float dv4[16][4];
#pragma unroll
    for (int nt = 0; nt < 16; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) dv4[nt][e] = vacc[4 * nt + e];
    }
    __syncwarp();  // this warp's lanes are done reading its staging rows of slab j − 1
    StoreAccStaged(p.dv + (tok0 + static_cast<int64_t>(16 * w) * d.NH) * d.DV + j * DVT,
                   static_cast<bf16*>(nullptr), ldv, dv4, staging + 16 * w * kSH,
                   static_cast<bf16*>(nullptr), lane, len - 16 * w);
  }
}
template <int kStages>
__global__ void __launch_bounds__(256, 1) mlstm_bwd_dv_wg_fused(Dims d, BwdPtrs p) {
  BwdDvWgFused<kStages, 1>(d, p);
}
template <int kStages>
__global__ void __launch_bounds__(256, 1)
    mlstm_bwd_dv_wg_fused_l256_off(Dims d, BwdPtrs p, const uint4* __restrict__ bfrag) {
  BwdDvWgFused<kStages, 2, true>(d, p, bfrag);
}

// bwd_dqk on warpgroup MMA (sm_90a wgmma), L 128 and 128-column dq/dk slabs: mlstm_bwd_dqk_ws
// below. The same three phases and math as mlstm_bwd_dqk in mlstm_mma_sync.cuh; what changes is
// how the products run:
//   - two consumer warpgroups; warpgroup wg owns the chunk's rows 64wg..64wg+63 (the identity
//     warp -> 16-row map; the paired RowTile map of the mma.sync kernel cannot be expressed: a
//     wgmma's 64 rows are contiguous in its A operand);
//   - every tile sits in shared memory in the 128-byte swizzle (hopper_mma.cuh), written by TMA
//     (DqkWgSmem: three stages in phase 1, two in phase 3);
//   - phase 1: dP = dH Vᵀ and Y = dH C_kᵀ (hi + lo) are m64n128k16 wgmma with both operands in
//     shared memory (K-major), 12 per stage and warpgroup, one commit;
//   - dQ += dS' K with dS' in registers (the dP accumulators packed to bf16, as attention's P·V)
//     and K N-major in shared memory;
//   - phase 3: V dC_{k+1}ᵀ (hi + lo) as phase 1; dK += dS'ᵀ Q with dS' from shared memory as an
//     M-major A operand (transposed), Q N-major.
// Both warpgroups run the full 128-key (128-query) products: the causal zeros of dS' make the
// extra terms vanish, and skipping them per warpgroup put wgmma under a branch on the warpgroup
// index, which ptxas serialises (C7520) or fences (C7519) (kernels/cuda/mlstm_notes.md).
// Executed MACs per block at the 125m cell (DV 384): dP 6.3M, Y 12.6M, dQ 2.1M, phase 3 12.6M,
// dK 2.1M = 35.7M (the mma.sync kernel: 31.3M).
//
// Shared memory (192 KB of tiles) is laid out twice. Phase 1 (no Q, K or dS' needed yet): three
// stages of 64 KB (dh, V, C_k, C_k lo tiles, [128][64] each), so two stages load while one
// multiplies. Phases 2-3: Q, K, dS' (32 KB each) and two 48 KB stages (dC lo, V, dC). Q and K
// load into phase-1 stage 0 once its last user is done.
template <bool SPLIT>
struct DqkWgSmem {
  static constexpr int kL = 128, kDKT = 128;
  static constexpr int kTile64 = 128 * 128;     // bytes of a [128 rows][64 cols] bf16 tile
  // Phase 1.
  static constexpr int kP1Stage = 4 * kTile64;  // dh, V, C, C lo
  static constexpr int kP1Stages = 3;
  // Phases 2-3.
  static constexpr int kQ = 0;                  // [128 t][128 dk]  (2 column blocks)
  static constexpr int kK = kQ + 2 * kTile64;   // [128 s][128 dk]
  static constexpr int kDS = kK + 2 * kTile64;  // [128 t][128 s] dS'
  static constexpr int kStages = kDS + 2 * kTile64;
  // Phase-3 stage: dC lo [128 dk][64], V [128 s][64], dC_{k+1} [128 dk][64].
  static constexpr int kStage = 3 * kTile64;
  static constexpr int kOffV = kTile64, kOffC = 2 * kTile64;
  static constexpr int kFloats = kStages + 2 * kStage;
  static_assert(kP1Stages * kP1Stage == kFloats, "the two layouts share the tile region");
  static constexpr size_t kBytes = kFloats + (5 * kL + 2 * kDKT) * 4 + 1024;  // + alignment
};


// bwd_dqk with a TMA producer (helper mlstm9): the products above, fed by
//   - warpgroup 0 (one thread; 40 registers after setmaxnreg) issuing every tile load as a TMA
//     copy (cp.async.bulk.tensor, the 128-byte swizzle; zeros past the sequence end) onto an
//     mbarrier per stage ("full": expect_tx bytes); consumers arrive on the stage's "empty"
//     mbarrier (one arrival per warp) once their wgmma that read it retired, and the producer
//     refills it at once (no block barrier anywhere after the start);
//   - the consumers keep one wgmma group in flight across the wait for the next stage (wait
//     depth 1), so the tensor pipe is fed while the next stage's barrier resolves;
//   - phase 1: three 64 KB stages; Q and K load into stage 0's region once its last phase-1
//     user arrived; phase 3's two 48 KB stages load once all of phase 1 is consumed (they overlap
//     stages 1 and 2), i.e. during phase 2; the two warpgroups meet on a named barrier (256
//     threads) after phase 1 (dS' overwrites stage 1 and the per-row vectors are read) and
//     before dK += dS'ᵀ Q (dS' is written by both).
// 384 threads: the producer warpgroup and two consumer warpgroups (232 registers after
// setmaxnreg; 128 · 40 + 256 · 232 <= 65536). (288 threads, one producer warp, cap every thread
// at 168 registers: three warps on one SM sub-partition; that build spilled.)
// Measured against the cp.async version it replaced (256 threads, a block barrier per stage;
// H200, session 9): 0.834 -> 0.675 ms at the 125m cell (ncu: DRAM 47% -> 58% of peak, tensor
// pipe 28% -> 34%, barrier stalls 28% -> 7%), 0.347 -> 0.289 ms at the 1.3b layout.
struct DqkWsBars {  // mbarrier byte offsets after DqkWgSmem's tiles and vectors
  static constexpr int kFull1 = 0, kEmpty1 = 24, kFullQK = 48, kFull3 = 56, kEmpty3 = 72;
  static constexpr int kBytes = 88;
};

struct DqkTmaMaps {
  CUtensorMap q, k, v, dh;  // 4-d: (columns, heads, tokens, batch), box 64 × 1 × 128 × 1
  CUtensorMap c, c_lo;      // 2-d: (dv, rows of [BH][NC+1][dk]), box 64 × 128
  CUtensorMap dc, dc_lo;    // 2-d: (dv, rows of [BH][NC][dk]), box 64 × 128
};

// bwd_dqk's phase 2, shared by BwdDqkWs and its persistent form (mlstm_bwd_dqk_ws_persist): the
// thread's rows r0, r1 of dS' = scale · W ⊙ (dP/denom + dden) (causal s <= t; rows past len zero)
// from pacc = dP, stored swizzled ([t][s]) at dss for phase 3's dK and packed into pa, the bf16 A
// fragments of dQ += dS' K; qacc (dH C_kᵀ) scaled in place to the inter-chunk part of dQ,
// G · (dP_inter/denom + dden · n_k). b0v, b1v (the rows' gate sums) are the epilogue's too.
template <int L>
__device__ __forceinline__ void DqkPhase2(const Dims& d, float (&pacc)[64], float (&qacc)[64], uint32_t (&pa)[8][4],
                                          float& b0v, float& b1v, unsigned char* dss, const float* bs,
                                          const float* igs, const float* ms, const float* ivs, const float* dds,
                                          const float* nks, int r0, int r1, int c, int len, float m_k) {
  using namespace hopper;
  b0v = bs[r0];
  b1v = bs[r1];
  const float m0v = ms[r0], m1v = ms[r1];
  const float iv0 = ivs[r0], iv1 = ivs[r1], dd0 = dds[r0], dd1 = dds[r1];
#pragma unroll
  for (int nt = 0; nt < 16; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int s = nt * 8 + 2 * c + (e & 1);
      const int r = e < 2 ? r0 : r1;
      float v = 0.f;
      if (s <= r && r < len) {
        const float br = e < 2 ? b0v : b1v, mr = e < 2 ? m0v : m1v;
        const float iv = e < 2 ? iv0 : iv1, dd = e < 2 ? dd0 : dd1;
        v = d.scale * __expf(br - bs[s] + igs[s] - mr) * (pacc[4 * nt + e] * iv + dd);
      }
      pacc[4 * nt + e] = v;
    }
  }
#pragma unroll
  for (int kk = 0; kk < 8; ++kk) {
    pa[kk][0] = PackBf16(pacc[8 * kk + 0], pacc[8 * kk + 1]);
    pa[kk][1] = PackBf16(pacc[8 * kk + 2], pacc[8 * kk + 3]);
    pa[kk][2] = PackBf16(pacc[8 * kk + 4], pacc[8 * kk + 5]);
    pa[kk][3] = PackBf16(pacc[8 * kk + 6], pacc[8 * kk + 7]);
    const int col = 16 * kk + 2 * c;
    *reinterpret_cast<uint32_t*>(dss + Sw128Offset<L>(r0, col)) = pa[kk][0];
    *reinterpret_cast<uint32_t*>(dss + Sw128Offset<L>(r1, col)) = pa[kk][1];
    *reinterpret_cast<uint32_t*>(dss + Sw128Offset<L>(r0, col + 8)) = pa[kk][2];
    *reinterpret_cast<uint32_t*>(dss + Sw128Offset<L>(r1, col + 8)) = pa[kk][3];
  }
  FenceProxyAsync();  // dS' is read by the dK wgmma (after the named barrier that follows)
  const float G0 = d.scale * __expf(b0v + m_k - m0v), G1 = d.scale * __expf(b1v + m_k - m1v);
#pragma unroll
  for (int nt = 0; nt < 16; ++nt) {
    const int col = nt * 8 + 2 * c;
    qacc[4 * nt + 0] = G0 * (iv0 * qacc[4 * nt + 0] + dd0 * nks[col]);
    qacc[4 * nt + 1] = G0 * (iv0 * qacc[4 * nt + 1] + dd0 * nks[col + 1]);
    qacc[4 * nt + 2] = G1 * (iv1 * qacc[4 * nt + 2] + dd1 * nks[col]);
    qacc[4 * nt + 3] = G1 * (iv1 * qacc[4 * nt + 3] + dd1 * nks[col + 1]);
  }
}

// The rows r0, r1 of a warpgroup's dQ / dK accumulator (m64n128 wgmma layout, 16 n-tiles) as bf16
// into dst (row stride ld; rows past len are padding), and their partial dots with the same rows
// of the swizzled [L][128] operand tile xs (Q for dQ, K for dK) over this lane's columns added to
// dot0, dot1 (StoreRowDots finishes them).
template <int L>
__device__ __forceinline__ void StoreRowsSw(const float (&acc)[64], const unsigned char* xs, bf16* dst,
                                            int64_t ld, int r0, int r1, int c, int len, float& dot0,
                                            float& dot1) {
  using namespace hopper;
#pragma unroll
  for (int nt = 0; nt < 16; ++nt) {
    const int col = nt * 8 + 2 * c;
    const float2 x0 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(xs + Sw128Offset<L>(r0, col)));
    const float2 x1 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(xs + Sw128Offset<L>(r1, col)));
    dot0 += x0.x * acc[4 * nt + 0] + x0.y * acc[4 * nt + 1];
    dot1 += x1.x * acc[4 * nt + 2] + x1.y * acc[4 * nt + 3];
    if (r0 < len) *reinterpret_cast<uint32_t*>(dst + r0 * ld + col) = PackBf16(acc[4 * nt], acc[4 * nt + 1]);
    if (r1 < len) *reinterpret_cast<uint32_t*>(dst + r1 * ld + col) = PackBf16(acc[4 * nt + 2], acc[4 * nt + 3]);
  }
}

// bwd_dqk's dQ after phase 2, shared by BwdDqkWs and its persistent form: dQ += dS' K (K [s][dk]
// at k_d, N-major B in two 64-column blocks; pa from DqkPhase2), dQ's rows r0, r1 stored as bf16,
// and their q·dq dots (the gates' backward) into p.qdq's column `slab`.
// (`slab` keeps its caller's type: blockIdx.x's unsigned in BwdDqkWs, an int in the persistent
// kernel, so each kernel's index arithmetic is what it was before the fold.)
template <int L, typename Slab>
__device__ __forceinline__ void DqkDqStore(const Dims& d, const BwdPtrs& p, float (&qacc)[64], uint32_t (&pa)[8][4],
                                           uint64_t k_d, const unsigned char* qs, int64_t tok0, int a0, int64_t ldqk,
                                           int64_t so, Slab slab, int r0, int r1, int c, int len) {
  using namespace hopper;
  WgmmaFence();
#pragma unroll
  for (int kk = 0; kk < 8; ++kk) {
    WgmmaRS128<1>(qacc, pa[kk], k_d + ((kk * 16 * 128) >> 4));
  }
  WgmmaCommit();
  WgmmaWait<0>();
  FenceRegs(qacc);
  FenceRegs(pa);
  float dot0 = 0.f, dot1 = 0.f;
  StoreRowsSw<L>(qacc, qs, p.dq + tok0 * d.DK + a0, ldqk, r0, r1, c, len, dot0, dot1);
  StoreRowDots<true>(p, dot0, dot1, so, slab, r0, r1, c, len);
}

// kSub 2 (chunk 256, always with kOff: mlstm_bwd_dqk_ws_l256_off): a block is one 128-token half
// k of chunk k / 2: its diagonal block with C_{k/2}, dC_{k/2+1}, n, dn, m of that chunk and E_t
// from the gate scan. (Both halves of chunk 0 write d_initial's dn0: the same values from the same
// inputs.)
// kEager (GYRE_MLSTM_RING=eager, helper dqk16, session 16; opt-in): a consumer warp releases a
// stage as soon as its own wgmma group on it retired (wait<0> right after the commit) instead of
// after the next stage arrived (wait<1>). The same products in the same order (bitwise the same
// outputs); what changes is when the producer may refill a slot. With the lagged release a slot
// is freed only once the following stage landed, so phase 1 (three slots) keeps about two stages
// in flight and phase 3 (two slots) one; the eager release adds one each, at the cost of the
// tensor pipe draining between stages. Measured (H100, 125m cell, ncu + B1): a block alone on its
// SM takes as long as in a full wave (36 vs 33 µs) with 58% of its warp stalls on long
// scoreboard (the mbarrier waits): the blocks wait on load latency, not on DRAM bandwidth.
// Eager vs lag (H100, medians of 3): 125m cell 0.765 -> 0.721 ms, 1.3b cell 1.018 -> 0.966 ms.
// kOff (kSub 2; helper off256b, session 18): the chunk's off-diagonal block inside the blocks (it
// first ran as a separate pass afterwards, deleted). A half-1 block (rows t) adds dS' K0: its producer loads
// K0's [128 s][128 dk] slab as an extra phase-3 ring step in front (step 0: the dC lo and V slots,
// contiguous, hold the two 64-column blocks as the Q / K regions do), and the consumers run 8 RS
// wgmmas (A = dS' rows t, mlstm_bwd_offdiag_p_l256's fragments 16-23) into qacc just before the
// dQ product. A half-0 block whose chunk has a second half (rows s) adds dS'ᵀ Q1: Q1's slab comes
// as an extra step after phase 3 (zeros past the sequence end), the 8 RS wgmmas (fragments 8-15)
// join the dS'ᵀ Q group. The q·dq / k·dk dots then cover the whole row; one bf16 rounding.
template <bool SPLIT, int kSub, bool kEager = false, bool kOff = false>
__device__ __forceinline__ void BwdDqkWs(const Dims& d, const BwdPtrs& p, const DqkTmaMaps& maps,
                                         const uint4* bfrag = nullptr) {
  using namespace hopper;
  using SM = DqkWgSmem<SPLIT>;
  constexpr int L = 128, DKT = 128, kConsumers = 256;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* sm = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  const uint32_t sa = SmemAddr(sm);
  unsigned char *qs = sm + SM::kQ, *ks = sm + SM::kK, *dss = sm + SM::kDS;
  float* bs = reinterpret_cast<float*>(sm + SM::kFloats);
  float* igs = bs + L;
  float* ms = igs + L;
  float* ivs = ms + L;
  float* dds = ivs + L;
  float* nks = dds + L;     // [DKT] n_k
  float* dnks = nks + DKT;  // [DKT] dn_{k+1}
  const uint32_t bars = sa + SM::kFloats + (5 * L + 2 * DKT) * 4;
  const uint32_t full1 = bars + DqkWsBars::kFull1, empty1 = bars + DqkWsBars::kEmpty1;
  const uint32_t full_qk = bars + DqkWsBars::kFullQK;
  const uint32_t full3 = bars + DqkWsBars::kFull3, empty3 = bars + DqkWsBars::kEmpty3;
  const int a0 = blockIdx.x * DKT, k = blockIdx.y, bh = blockIdx.z;
  const int kc = kSub == 1 ? k : k >> 1;  // chunk (state index) of this block
  const int b = bh / d.NH, hd = bh % d.NH;
  const int t0 = k * L, len = min(L, d.S - t0);
  const int njt = d.DV / 64;
  // kOff: off1 = a half-1 block (its K0 step first), off0 = a half-0 block with a second half (its
  // Q1 step last); block-uniform.
  const bool off1 = kOff && (k & 1) == 1;
  const bool off0 = kOff && (k & 1) == 0 && t0 + L < d.S;
  const int shift3 = off1 ? 1 : 0;  // phase-3 ring position of dv tile 0
  if (threadIdx.x == 0) {
    for (int i = 0; i < 3; ++i) {
      MbInit(full1 + 8 * i, 1);
      MbInit(empty1 + 8 * i, 8);
    }
    MbInit(full_qk, 1);
    for (int i = 0; i < 2; ++i) {
      MbInit(full3 + 8 * i, 1);
      MbInit(empty3 + 8 * i, 8);
    }
    MbInitFence();
  }
  __syncthreads();

  if (threadIdx.x < 128) {  // producer warpgroup: one thread issues all loads
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    if (threadIdx.x == 0) {
      const int c_row = (bh * (d.NC + 1) + kc) * d.DK + a0;
      const int dc_row = (bh * d.NC + kc) * d.DK + a0;
      constexpr uint32_t kP1Bytes = (SPLIT ? 4 : 3) * SM::kTile64;
      constexpr uint32_t kP3Bytes = (SPLIT ? 3 : 2) * SM::kTile64;
      for (int jt = 0; jt < njt; ++jt) {
        const int slot = jt % 3, use = jt / 3;
        if (use > 0) MbWait(empty1 + 8 * slot, (use - 1) & 1);
        const uint32_t st = sa + slot * SM::kP1Stage, fb = full1 + 8 * slot;
        MbArriveExpectTx(fb, kP1Bytes);
        TmaTile4d(st, &maps.dh, fb, jt * 64, hd, t0, b);
        TmaTile4d(st + SM::kTile64, &maps.v, fb, jt * 64, hd, t0, b);
        TmaTile2d(st + 2 * SM::kTile64, &maps.c, fb, jt * 64, c_row);
        if constexpr (SPLIT) TmaTile2d(st + 3 * SM::kTile64, &maps.c_lo, fb, jt * 64, c_row);
      }
      // Q, K into stage 0's region after its last phase-1 use.
      const int last0 = (njt - 1) / 3;  // uses of stage 0: 0..last0
      MbWait(empty1, last0 & 1);
      MbArriveExpectTx(full_qk, 4 * SM::kTile64);
      TmaTile4d(sa + SM::kQ, &maps.q, full_qk, a0, hd, t0, b);
      TmaTile4d(sa + SM::kQ + SM::kTile64, &maps.q, full_qk, a0 + 64, hd, t0, b);
      TmaTile4d(sa + SM::kK, &maps.k, full_qk, a0, hd, t0, b);
      TmaTile4d(sa + SM::kK + SM::kTile64, &maps.k, full_qk, a0 + 64, hd, t0, b);
      // Phase 3's stages overlap phase-1 stages 1 and 2: wait for their last uses.
      for (int slot = 1; slot < 3 && slot < njt; ++slot) {
        MbWait(empty1 + 8 * slot, ((njt - 1 - slot) / 3) & 1);
      }
      if constexpr (kOff) {
        if (off1) {  // ring position 0: K0's slab (dC lo and V slots of stage 0)
          const uint32_t st = sa + SM::kStages, fb = full3;
          MbArriveExpectTx(fb, 2 * SM::kTile64);
          TmaTile4d(st, &maps.k, fb, a0, hd, t0 - L, b);
          TmaTile4d(st + SM::kTile64, &maps.k, fb, a0 + 64, hd, t0 - L, b);
        }
      }
      for (int jt = 0; jt < njt; ++jt) {
        int x = jt;
        if constexpr (kOff) x += shift3;
        const int slot = x & 1, use = x >> 1;
        if (use > 0) MbWait(empty3 + 8 * slot, (use - 1) & 1);
        const uint32_t st = sa + SM::kStages + slot * SM::kStage, fb = full3 + 8 * slot;
        MbArriveExpectTx(fb, kP3Bytes);
        TmaTile4d(st + SM::kOffV, &maps.v, fb, jt * 64, hd, t0, b);
        TmaTile2d(st + SM::kOffC, &maps.dc, fb, jt * 64, dc_row);
        if constexpr (SPLIT) TmaTile2d(st, &maps.dc_lo, fb, jt * 64, dc_row);
      }
      if constexpr (kOff) {
        if (off0) {  // ring position njt: Q1's slab (zeros past the sequence end)
          const int x = njt, slot = x & 1, use = x >> 1;
          if (use > 0) MbWait(empty3 + 8 * slot, (use - 1) & 1);
          const uint32_t st = sa + SM::kStages + slot * SM::kStage, fb = full3 + 8 * slot;
          MbArriveExpectTx(fb, 2 * SM::kTile64);
          TmaTile4d(st, &maps.q, fb, a0, hd, t0 + L, b);
          TmaTile4d(st + SM::kTile64, &maps.q, fb, a0 + 64, hd, t0 + L, b);
        }
      }
    }
    return;
  }

  // Consumers: warps 4-11 (consumer thread index tid 0..255), warpgroup wg owns rows
  // 64wg..64wg+63.
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
  const int tid = threadIdx.x - 128, lane = tid & 31, w = tid >> 5, g = lane >> 2, c = lane & 3;
  const int wg = __shfl_sync(0xffffffffu, tid >> 7, 0);
  const int64_t ldqk = static_cast<int64_t>(d.NH) * d.DK;
  const int64_t tok0 = (static_cast<int64_t>(b) * d.S + t0) * d.NH + hd;
  const int64_t so = static_cast<int64_t>(bh) * d.S + t0;
  const float m_k = p.smk[static_cast<int64_t>(bh) * (d.NC + 1) + kc];
  const float m_next = p.smk[static_cast<int64_t>(bh) * (d.NC + 1) + kc + 1];
  LoadDqkVectors<L, DKT>(d, p, tid, kConsumers, len, so, tok0, bh, kc, a0, bs, igs, ms, ivs, dds, nks, dnks);

  // Phase 1: dP = dH Vᵀ and Y = dH C_kᵀ over dv in 64-wide tiles; one wgmma group in flight
  // while the next stage's mbarrier is awaited.
  float pacc[64], qacc[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) pacc[i] = qacc[i] = 0.f;
  const uint32_t own = wg * 64 * 128;  // this warpgroup's 64 rows of a [128][64] block
  for (int jt = 0; jt < njt; ++jt) {
    const int slot = jt % 3;
    MbWait(full1 + 8 * slot, (jt / 3) & 1);
    const uint32_t st = sa + slot * SM::kP1Stage;
    const uint64_t dh_d = SmemDescSw128(st + own, 16, 1024);
    const uint64_t v_d = SmemDescSw128(st + SM::kTile64, 16, 1024);
    const uint64_t c_d = SmemDescSw128(st + 2 * SM::kTile64, 16, 1024);
    const uint64_t clo_d = SmemDescSw128(st + 3 * SM::kTile64, 16, 1024);
    WgmmaFence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      const uint64_t step = (kk * 32) >> 4;
      WgmmaSS128<0, 0>(pacc, dh_d + step, v_d + step, 1);
      WgmmaSS128<0, 0>(qacc, dh_d + step, c_d + step, 1);
      if constexpr (SPLIT) WgmmaSS128<0, 0>(qacc, dh_d + step, clo_d + step, 1);
    }
    WgmmaCommit();
    if constexpr (kEager) {
      WgmmaWait<0>();  // this step's group retired: its stage is free now
      if (lane == 0) MbArrive(empty1 + 8 * slot);
    } else if (jt > 0) {
      WgmmaWait<1>();  // step jt − 1's group retired: its stage is free
      if (lane == 0) MbArrive(empty1 + 8 * ((jt - 1) % 3));
    }
  }
  WgmmaWait<0>();
  FenceRegs(pacc);
  FenceRegs(qacc);
  if (!kEager && lane == 0) MbArrive(empty1 + 8 * ((njt - 1) % 3));
  // Both warpgroups are done with phase 1 (dS' overwrites stage 1's region); the vectors landed.
  NamedBarrierSync(1, kConsumers);
  // Phase 2: dS' = scale · W ⊙ (dP/denom + dden) (rows t, causal s <= t), to shared memory
  // (swizzled [t][s]) for phase 3 and packed to bf16 A fragments for dQ.
  const int r0 = 16 * w + g, r1 = r0 + 8;
  float b0v, b1v;
  uint32_t pa[8][4];
  DqkPhase2<L>(d, pacc, qacc, pa, b0v, b1v, dss, bs, igs, ms, ivs, dds, nks, r0, r1, c, len, m_k);
  // kOff, off1: dQ += dS'_off K0 (K0 at ring position 0), ahead of the block's own dS' K.
  const uint4* offsrc = nullptr;
  uint32_t dsq[8][4];  // dS'_off rows t: live until DqkDqStore's wait retired the wgmmas reading them
  if constexpr (kOff) {
    offsrc = bfrag + (static_cast<int64_t>(bh) * d.NC + kc) * 24 * 256 + tid;
    if (off1) {
#pragma unroll
      for (int kk = 0; kk < 8; ++kk) {
        const uint4 v4 = offsrc[(16 + kk) * 256];
        dsq[kk][0] = v4.x;
        dsq[kk][1] = v4.y;
        dsq[kk][2] = v4.z;
        dsq[kk][3] = v4.w;
      }
      MbWait(full3, 0);
      const uint64_t k0_d = SmemDescSw128(sa + SM::kStages, SM::kTile64, 1024);
      WgmmaFence();
#pragma unroll
      for (int kk = 0; kk < 8; ++kk) WgmmaRS128<1>(qacc, dsq[kk], k0_d + ((kk * 16 * 128) >> 4));
      WgmmaCommit();
    }
  }
  MbWait(full_qk, 0);
  // dQ += dS' K, dQ stored, the q·dq dots.
  DqkDqStore<L>(d, p, qacc, pa, SmemDescSw128(sa + SM::kK, SM::kTile64, 1024), qs, tok0, a0, ldqk, so, blockIdx.x, r0,
                r1, c, len);
  if constexpr (kOff) {
    FenceRegs(dsq);
    if (off1 && lane == 0) MbArrive(empty3);  // K0's step retired (DqkDqStore waited for all groups)
  }
  // Phase 3: dK = diag(E)(V dC_{k+1}ᵀ + dn_{k+1}) + dS'ᵀ Q  (rows s of this warpgroup).
  float kacc[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) kacc[i] = 0.f;
  uint32_t dsk[8][4];  // kOff, off0: dS'ᵀ_off, this thread's rows s
  if constexpr (kOff) {
    if (off0) {
#pragma unroll
      for (int kk = 0; kk < 8; ++kk) {
        const uint4 v4 = offsrc[(8 + kk) * 256];
        dsk[kk][0] = v4.x;
        dsk[kk][1] = v4.y;
        dsk[kk][2] = v4.z;
        dsk[kk][3] = v4.w;
      }
    }
  }
  for (int jt = 0; jt < njt; ++jt) {
    int x = jt;
    if constexpr (kOff) x += shift3;
    const int slot = x & 1;
    MbWait(full3 + 8 * slot, (x >> 1) & 1);
    const uint32_t st = sa + SM::kStages + slot * SM::kStage;
    const uint64_t v_d = SmemDescSw128(st + SM::kOffV + own, 16, 1024);
    const uint64_t dc_d = SmemDescSw128(st + SM::kOffC, 16, 1024);
    const uint64_t dclo_d = SmemDescSw128(st, 16, 1024);
    WgmmaFence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      const uint64_t step = (kk * 32) >> 4;
      WgmmaSS128<0, 0>(kacc, v_d + step, dc_d + step, 1);
      if constexpr (SPLIT) WgmmaSS128<0, 0>(kacc, v_d + step, dclo_d + step, 1);
    }
    WgmmaCommit();
    if constexpr (kEager) {
      WgmmaWait<0>();
      if (lane == 0) MbArrive(empty3 + 8 * slot);
    } else if (jt > 0) {
      WgmmaWait<1>();
      if (lane == 0) MbArrive(empty3 + 8 * ((x - 1) & 1));
    }
  }
  WgmmaWait<0>();
  FenceRegs(kacc);
  {
    float E0, E1;
    if constexpr (kSub == 1) {
      const float gl = bs[len - 1];
      E0 = r0 < len ? __expf(gl - b0v + igs[r0] - m_next) : 0.f;
      E1 = r1 < len ? __expf(gl - b1v + igs[r1] - m_next) : 0.f;
    } else {
      E0 = r0 < len ? p.e_tok[so + r0] : 0.f;
      E1 = r1 < len ? p.e_tok[so + r1] : 0.f;
    }
#pragma unroll
    for (int nt = 0; nt < 16; ++nt) {
      const int col = nt * 8 + 2 * c;
      kacc[4 * nt + 0] = E0 * (kacc[4 * nt + 0] + dnks[col]);
      kacc[4 * nt + 1] = E0 * (kacc[4 * nt + 1] + dnks[col + 1]);
      kacc[4 * nt + 2] = E1 * (kacc[4 * nt + 2] + dnks[col]);
      kacc[4 * nt + 3] = E1 * (kacc[4 * nt + 3] + dnks[col + 1]);
    }
  }
  NamedBarrierSync(1, kConsumers);  // dS' from both warpgroups written (and fenced)
  // dK += dS'ᵀ Q: dS' [t][s] is an M-major A (this warpgroup's column block of s), Q [t][dk]
  // N-major B.
  {
    const uint64_t ds_d = SmemDescSw128(sa + SM::kDS + wg * SM::kTile64, SM::kTile64, 1024);
    const uint64_t q_d = SmemDescSw128(sa + SM::kQ, SM::kTile64, 1024);
    if constexpr (kOff) {
      if (off0) MbWait(full3 + 8 * (njt & 1), (njt >> 1) & 1);  // Q1's step
    }
    WgmmaFence();
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) {
      const uint64_t step = (kk * 16 * 128) >> 4;
      WgmmaSS128<1, 1>(kacc, ds_d + step, q_d + step, 1);
    }
    if constexpr (kOff) {
      if (off0) {  // dK += dS'ᵀ_off Q1 (A: this thread's rows s in registers, Q1 N-major)
        const uint64_t q1_d = SmemDescSw128(sa + SM::kStages + (njt & 1) * SM::kStage, SM::kTile64, 1024);
#pragma unroll
        for (int kk = 0; kk < 8; ++kk) WgmmaRS128<1>(kacc, dsk[kk], q1_d + ((kk * 16 * 128) >> 4));
      }
    }
    WgmmaCommit();
    WgmmaWait<0>();
    FenceRegs(kacc);
    if constexpr (kOff) FenceRegs(dsk);
  }
  {
    float dot0 = 0.f, dot1 = 0.f;
    StoreRowsSw<L>(kacc, ks, p.dk + tok0 * d.DK + a0, ldqk, r0, r1, c, len, dot0, dot1);
    StoreRowDots<false>(p, dot0, dot1, so, blockIdx.x, r0, r1, c, len);
  }
}
template <bool SPLIT>
__global__ void __launch_bounds__(384, 1)
    mlstm_bwd_dqk_ws(Dims d, BwdPtrs p, const __grid_constant__ DqkTmaMaps maps) {
  BwdDqkWs<SPLIT, 1>(d, p, maps);
}
template <bool SPLIT>
__global__ void __launch_bounds__(384, 1)
    mlstm_bwd_dqk_ws_l256_off(Dims d, BwdPtrs p, const __grid_constant__ DqkTmaMaps maps,
                              const uint4* __restrict__ bfrag) {
  BwdDqkWs<SPLIT, 2, false, true>(d, p, maps, bfrag);
}
template <bool SPLIT>
__global__ void __launch_bounds__(384, 1)
    mlstm_bwd_dqk_ws_eager(Dims d, BwdPtrs p, const __grid_constant__ DqkTmaMaps maps) {
  BwdDqkWs<SPLIT, 1, true>(d, p, maps);
}
// ---------------------------------------------------------------- bwd_dqk, persistent grid
//
// mlstm_bwd_dqk_ws_persist (helper persistdqk17, session 17; opt-in: MlstmOptions::persist =
// MlstmPersist::kDqk or kBoth, which ops sets from GYRE_MLSTM_PERSIST=dqk / both): the eager
// bwd_dqk above (BwdDqkWs<SPLIT, 1, true>, chunk 128) with one block per SM looping over the
// (slab, chunk, head) tiles, as mlstm_fwd_out_ws3_persist does for fwd_out. A tile is the same
// work as a block of mlstm_bwd_dqk_ws_eager: the same wgmmas on the same tiles in the same order,
// the same phase-2 and epilogue arithmetic, the same stores, so every output is the same bytes
// (PersistDqkMatchesDefaultBytewise). What changes is the turnover between tiles (dqk16: a block
// alone on its SM takes as long as in a wave; each new block started with an empty ring, the
// vectors fetched by the consumers, all three phase-1 stages a round trip away, while the
// finished block's dK tail loaded nothing).
//
// The tile region (192 KB = three 64 KB slots, 16 KB tiles T0-T11, slot s = T4s..T4s+3) keeps
// DqkWgSmem's two layouts: phase 1 uses slot jt % 3; phases 2-3 put Q in T0-T1, K in T2-T3 (slot
// 0), dS' in T4-T5, phase-3 stage 0 in T6-T8 (dC lo, V, dC) and stage 1 in T9-T11. A tile frees
// its slots in the order 2 (after its last phase-3 step), 1 (after the dK wgmma: dS', stage 0's
// T6-T7) and 0 (after the k·dK dots: Q, K), and the next tile's phase-1 stages 0, 1, 2 want them in
// that order. So the slots of every second tile are mirrored (logical slot s lies in physical
// slot 2 − s when the block's tile iteration `it` is odd; the tiles inside a slot keep their order,
// so Q, K and dS' stay two adjacent tiles): tile it+1's phase-1 stage s lands in the physical slot
// of tile it's logical slot 2 − s. The producer issues stage 0 once tile it's phase 3 is done, ~the
// dK tail (E-scaling, barrier, dK wgmma, dots, stores) before the tile ends; stage 1 after the dK
// wgmma; stage 2 at the end. Three "tail" mbarriers (one per logical slot, count 8: every consumer
// warp, once a tile) say when tile it's slot is free; within a tile the producer waits on the
// per-physical-slot empty barriers as before (their parities are tracked per physical slot: one bit
// each, flipped at every phase-1 use). The per-tile vectors (b, ĩ, m, 1/D, dden: L each; n_k and the
// dn_parts partial sums of dn_{k+1}: dk-slab wide; m_k, m_{k+1}) are double-buffered and loaded by
// producer warp 1 with 4-byte cp.asyncs up to two tiles ahead (as fwd_out's: vfull / vempty); warp
// 1 waits for its copies and adds the dn parts in the order LoadDqkVectors adds them (the same float
// sum, so the same bits). (The first build left that sum to the consumers at its use, on the dK
// tail: 125m cell 0.724 -> 0.683 ms, but the 1.3b cell, 8 parts, 0.958 -> 0.984.) d_initial's dn0
// (chunk-0 tiles) is summed and stored by warp 1.
// Tiles are numbered slab fastest, then chunk, then head (the one-block-per-tile grid's launch
// order); a block's first tile is blockIdx.x, the next ones gridDim.x + atomicAdd(counter, 1).
// Measured (H100, medians of 5 / 3 rounds against mlstm_bwd_dqk_ws_eager): 125m cell 0.719 ->
// 0.661 ms (a tile in a wave 31.0 -> 28.4 µs), 1.3b cell (L128, alone) 0.960 -> 0.931 ms; step
// xlstm[1:0]-125m B16 125.4 -> 124.2 ms (kernels/cuda/mlstm_notes.md, session 17).
struct DqkPersistSmem {
  static constexpr int kL = 128, kDKT = 128;
  static constexpr int kTile64 = 128 * 128;
  static constexpr int kSlot = 4 * kTile64;
  static constexpr int kRegion = 3 * kSlot;
  // b, ĩ, m, 1/D, dden (L each), n_k, dn_{k+1} (DKT each), dn parts (dn_parts × DKT: warp 1's
  // staging), m_k, m_{k+1}, tile, pad.
  static __host__ __device__ int VecFloats(int dn_parts) { return 5 * kL + 2 * kDKT + dn_parts * kDKT + 4; }
  // full1[3], empty1[3], full_qk, full3[2], empty3[2], vfull[2], vempty[2], tail[3].
  static constexpr int kBars = 18 * 8;
  static size_t Bytes(int dn_parts) { return kRegion + 2 * VecFloats(dn_parts) * 4 + kBars + 1024; }
};

template <bool SPLIT>
__global__ void __launch_bounds__(384, 1)
    mlstm_bwd_dqk_ws_persist(Dims d, BwdPtrs p, const __grid_constant__ DqkTmaMaps maps,
                             unsigned* tile_counter) {
  using namespace hopper;
  using SM = DqkPersistSmem;
  constexpr int L = 128, DKT = 128, kConsumers = 256, kTile64 = SM::kTile64;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* sm = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  const uint32_t sa = SmemAddr(sm);
  const int vec_floats = SM::VecFloats(d.dn_parts);
  float* vec = reinterpret_cast<float*>(sm + SM::kRegion);  // [2][vec_floats]
  const uint32_t full1 = sa + SM::kRegion + 2 * vec_floats * 4, empty1 = full1 + 24,
                 full_qk = empty1 + 24, full3 = full_qk + 8, empty3 = full3 + 16, vfull = empty3 + 16,
                 vempty = vfull + 16, tail = vempty + 16;
  const int nslab = d.DK / DKT, ntiles = nslab * d.NC * d.B * d.NH;
  const int njt = d.DV / 64;
  // Byte offset of logical tile T (0..11) of tile iteration `it`: odd iterations mirror the slots.
  auto tile_at = [](int it, int T) -> uint32_t {
    const int s = T >> 2;
    return ((((it & 1) ? 2 - s : s) << 2) + (T & 3)) * kTile64;
  };
  if (threadIdx.x == 0) {
    for (int i = 0; i < 3; ++i) {
      MbInit(full1 + 8 * i, 1);
      MbInit(empty1 + 8 * i, 8);
      MbInit(tail + 8 * i, 8);
    }
    MbInit(full_qk, 1);
    for (int i = 0; i < 2; ++i) {
      MbInit(full3 + 8 * i, 1);
      MbInit(empty3 + 8 * i, 8);
      MbInit(vfull + 8 * i, 64);  // warp 1: 32 arrivals + 32 cp.async completions
      MbInit(vempty + 8 * i, 8);
    }
    MbInitFence();
  }
  __syncthreads();

  if (threadIdx.x < 128) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    if (threadIdx.x == 0) {  // TMA issue
      constexpr uint32_t kP1Bytes = (SPLIT ? 4 : 3) * kTile64;
      constexpr uint32_t kP3Bytes = (SPLIT ? 3 : 2) * kTile64;
      uint32_t par1 = 0, par3 = 0;  // bit i: parity of the next use of physical slot i / stage i
      for (int it = 0;; ++it) {
        int tile = blockIdx.x;
        if (it > 0) {  // (as fwd_out's: buffer it & 1 cannot be refilled before tile it is done)
          MbWait(vfull + 8 * (it & 1), (it >> 1) & 1);
          tile = reinterpret_cast<const int*>(vec + (it & 1) * vec_floats)[vec_floats - 2];
        }
        if (tile >= ntiles) break;
        const int slab = tile % nslab, rest = tile / nslab, k = rest % d.NC, bh = rest / d.NC;
        const int a0 = slab * DKT, b = bh / d.NH, hd = bh % d.NH, t0 = k * L;
        const int c_row = (bh * (d.NC + 1) + k) * d.DK + a0;
        const int dc_row = (bh * d.NC + k) * d.DK + a0;
        const int mirror = it & 1;
        const uint32_t tail_par = (it - 1) & 1;  // the previous tile's tail barriers
        for (int jt = 0; jt < njt; ++jt) {
          const int s = jt % 3, ps = mirror ? 2 - s : s;
          if (jt >= 3) {
            MbWait(empty1 + 8 * ps, ((par1 >> ps) & 1) ^ 1);
          } else if (it > 0) {
            MbWait(tail + 8 * (2 - s), tail_par);  // the previous tile's logical slot 2 − s
          }
          par1 ^= 1u << ps;
          const uint32_t st = sa + ps * SM::kSlot, fb = full1 + 8 * ps;
          MbArriveExpectTx(fb, kP1Bytes);
          TmaTile4d(st, &maps.dh, fb, jt * 64, hd, t0, b);
          TmaTile4d(st + kTile64, &maps.v, fb, jt * 64, hd, t0, b);
          TmaTile2d(st + 2 * kTile64, &maps.c, fb, jt * 64, c_row);
          if constexpr (SPLIT) TmaTile2d(st + 3 * kTile64, &maps.c_lo, fb, jt * 64, c_row);
        }
        // Q, K into logical slot 0 after its last phase-1 use (njt >= 1: there is one).
        {
          const int p0 = mirror ? 2 : 0;
          MbWait(empty1 + 8 * p0, ((par1 >> p0) & 1) ^ 1);
          MbArriveExpectTx(full_qk, 4 * kTile64);
          TmaTile4d(sa + tile_at(it, 0), &maps.q, full_qk, a0, hd, t0, b);
          TmaTile4d(sa + tile_at(it, 1), &maps.q, full_qk, a0 + 64, hd, t0, b);
          TmaTile4d(sa + tile_at(it, 2), &maps.k, full_qk, a0, hd, t0, b);
          TmaTile4d(sa + tile_at(it, 3), &maps.k, full_qk, a0 + 64, hd, t0, b);
        }
        // Phase 3's stages overlap logical slots 1 and 2: their last phase-1 uses in this tile, or
        // (dv < 192: no such use) the previous tile's release of that physical slot.
        for (int s = 1; s < 3; ++s) {
          const int ps = mirror ? 2 - s : s;
          if (s < njt) {
            MbWait(empty1 + 8 * ps, ((par1 >> ps) & 1) ^ 1);
          } else if (it > 0) {
            MbWait(tail + 8 * (2 - s), tail_par);
          }
        }
        for (int jt = 0; jt < njt; ++jt) {
          const int s3 = jt & 1;
          if (jt >= 2) MbWait(empty3 + 8 * s3, ((par3 >> s3) & 1) ^ 1);
          par3 ^= 1u << s3;
          const uint32_t fb = full3 + 8 * s3;
          MbArriveExpectTx(fb, kP3Bytes);
          TmaTile4d(sa + tile_at(it, 7 + 3 * s3), &maps.v, fb, jt * 64, hd, t0, b);
          TmaTile2d(sa + tile_at(it, 8 + 3 * s3), &maps.dc, fb, jt * 64, dc_row);
          if constexpr (SPLIT) TmaTile2d(sa + tile_at(it, 6 + 3 * s3), &maps.dc_lo, fb, jt * 64, dc_row);
        }
      }
    } else if (threadIdx.x >= 32 && threadIdx.x < 64) {  // warp 1: tiles and their vectors
      // Every vector element is its own 4-byte cp.async, all in flight at once (fwd_out's
      // lesson); a short last chunk's padding rows are plain stores, released by the lane's
      // ordinary arrival.
      const int lane = threadIdx.x - 32;
      int tile = blockIdx.x;
      for (int it = 0;; ++it) {
        const int vb = it & 1;
        if (it >= 2) MbWait(vempty + 8 * vb, ((it >> 1) - 1) & 1);
        float* bs = vec + vb * vec_floats;
        const uint32_t bsa = SmemAddr(bs);
        if (tile < ntiles) {
          const int slab = tile % nslab, rest = tile / nslab, k = rest % d.NC, bh = rest / d.NC;
          const int a0 = slab * DKT, b = bh / d.NH, hd = bh % d.NH, t0 = k * L, len = min(L, d.S - t0);
          const int64_t so = static_cast<int64_t>(bh) * d.S + t0;
          const int64_t tok0 = (static_cast<int64_t>(b) * d.S + t0) * d.NH + hd;
#pragma unroll 1
          for (int i = lane; i < L; i += 32) {  // b, ĩ, m, 1/D, dden at bs + {0, 1, 2, 3, 4}·L
            if (i < len) {
              CpAsync4Shared(bsa + 4 * i, p.b_tok + so + i);
              CpAsync4Shared(bsa + 4 * (L + i), p.ig + tok0 + static_cast<int64_t>(i) * d.NH);
              CpAsync4Shared(bsa + 4 * (2 * L + i), p.m_tok + so + i);
              CpAsync4Shared(bsa + 4 * (3 * L + i), p.inv_d + so + i);
              CpAsync4Shared(bsa + 4 * (4 * L + i), p.dden + so + i);
            } else {
              bs[i] = 0.f;
              bs[L + i] = -INFINITY;
              bs[2 * L + i] = 0.f;
              bs[3 * L + i] = 0.f;
              bs[4 * L + i] = 0.f;
            }
          }
          const int64_t kst = static_cast<int64_t>(bh) * (d.NC + 1) + k;
          const float* nbase = p.sn + kst * d.DK + a0;
          const float* dnbase = p.dn + kst * d.dn_parts * d.DK + a0;
#pragma unroll 1
          for (int i = lane; i < DKT; i += 32) {
            CpAsync4Shared(bsa + 4 * (5 * L + i), nbase + i);
#pragma unroll 1
            for (int j = 0; j < d.dn_parts; ++j) {
              CpAsync4Shared(bsa + 4 * (5 * L + 2 * DKT + j * DKT + i), dnbase + static_cast<int64_t>(j) * d.DK + i);
            }
          }
          if (lane == 0) {
            CpAsync4Shared(bsa + 4 * (vec_floats - 4), p.smk + kst);
            CpAsync4Shared(bsa + 4 * (vec_floats - 3), p.smk + kst + 1);
          }
          // dn_{k+1} = the sum of the parts in LoadDqkVectors' order, here and not at the
          // consumers' use (there it sat on the dK tail: dn_parts loads a value, 8 at the 1.3b
          // cell). Each lane sums the parts it copied itself, after its copies landed (this warp
          // runs up to two tiles ahead; one round trip a tile is off the consumers' path).
          asm volatile("cp.async.wait_all;\n" ::: "memory");
#pragma unroll 1
          for (int i = lane; i < DKT; i += 32) {
            float dn = 0.f;
#pragma unroll 1
            for (int j = 0; j < d.dn_parts; ++j) dn += bs[5 * L + 2 * DKT + j * DKT + i];
            bs[5 * L + DKT + i] = dn;
          }
          if (k == 0 && p.dn0 != nullptr) {  // d_initial's dn0 (as LoadDqkVectors)
            const float* d0 = p.dn + (static_cast<int64_t>(bh) * (d.NC + 1) + d.NC) * d.dn_parts * d.DK + a0;
#pragma unroll 1
            for (int i = lane; i < DKT; i += 32) {
              float s0 = 0.f;
#pragma unroll 1
              for (int j = 0; j < d.dn_parts; ++j) s0 += d0[static_cast<int64_t>(j) * d.DK + i];
              p.dn0[static_cast<int64_t>(bh) * d.DK + a0 + i] = s0;
            }
          }
        }
        PublishTile(reinterpret_cast<int*>(bs), vec_floats - 2, vfull + 8 * vb, tile, ntiles, lane);
        if (tile >= ntiles) break;
        tile = DrawNextTile(tile_counter, lane);
      }
    }
    return;
  }

  // Consumers: warps 4-11, warpgroup wg owns rows 64wg..64wg+63 (as BwdDqkWs).
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
  const int tid = threadIdx.x - 128, lane = tid & 31, w = tid >> 5, g = lane >> 2, c = lane & 3;
  const int wg = __shfl_sync(0xffffffffu, tid >> 7, 0);
  const int64_t ldqk = static_cast<int64_t>(d.NH) * d.DK;
  const uint32_t own = wg * 64 * 128;
  const int r0 = 16 * w + g, r1 = r0 + 8;
  uint32_t par1 = 0, par3 = 0;
  for (int it = 0;; ++it) {
    const int vb = it & 1;
    const float* bs = vec + vb * vec_floats;
    const float* igs = bs + L;
    const float* ms = igs + L;
    const float* ivs = ms + L;
    const float* dds = ivs + L;
    const float* nks = dds + L;
    const float* dnks = nks + DKT;
    MbWait(vfull + 8 * vb, (it >> 1) & 1);
    const int tile = reinterpret_cast<const int*>(bs)[vec_floats - 2];
    if (tile >= ntiles) break;
    const int slab = tile % nslab, rest = tile / nslab, k = rest % d.NC, bh = rest / d.NC;
    const int a0 = slab * DKT, b = bh / d.NH, hd = bh % d.NH;
    const int t0 = k * L, len = min(L, d.S - t0);
    const int64_t tok0 = (static_cast<int64_t>(b) * d.S + t0) * d.NH + hd;
    const int64_t so = static_cast<int64_t>(bh) * d.S + t0;
    const float m_k = bs[vec_floats - 4];
    const float m_next = bs[vec_floats - 3];
    const int mirror = it & 1;
    const unsigned char* qs = sm + tile_at(it, 0);
    const unsigned char* ks = sm + tile_at(it, 2);
    unsigned char* dss = sm + tile_at(it, 4);

    float pacc[64], qacc[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) pacc[i] = qacc[i] = 0.f;
    for (int jt = 0; jt < njt; ++jt) {
      const int s = jt % 3, ps = mirror ? 2 - s : s;
      MbWait(full1 + 8 * ps, (par1 >> ps) & 1);
      par1 ^= 1u << ps;
      const uint32_t st = sa + ps * SM::kSlot;
      const uint64_t dh_d = SmemDescSw128(st + own, 16, 1024);
      const uint64_t v_d = SmemDescSw128(st + kTile64, 16, 1024);
      const uint64_t c_d = SmemDescSw128(st + 2 * kTile64, 16, 1024);
      const uint64_t clo_d = SmemDescSw128(st + 3 * kTile64, 16, 1024);
      WgmmaFence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        const uint64_t step = (kk * 32) >> 4;
        WgmmaSS128<0, 0>(pacc, dh_d + step, v_d + step, 1);
        WgmmaSS128<0, 0>(qacc, dh_d + step, c_d + step, 1);
        if constexpr (SPLIT) WgmmaSS128<0, 0>(qacc, dh_d + step, clo_d + step, 1);
      }
      WgmmaCommit();
      WgmmaWait<0>();  // this step's group retired: its stage is free now
      if (lane == 0) MbArrive(empty1 + 8 * ps);
    }
    WgmmaWait<0>();
    FenceRegs(pacc);
    FenceRegs(qacc);
    // Both warpgroups are done with phase 1 (dS' overwrites logical slot 1).
    NamedBarrierSync(1, kConsumers);
    // Phase 2 (as BwdDqkWs).
    float b0v, b1v;
    uint32_t pa[8][4];
    DqkPhase2<L>(d, pacc, qacc, pa, b0v, b1v, dss, bs, igs, ms, ivs, dds, nks, r0, r1, c, len, m_k);
    MbWait(full_qk, it & 1);
    DqkDqStore<L>(d, p, qacc, pa, SmemDescSw128(sa + tile_at(it, 2), kTile64, 1024), qs, tok0, a0, ldqk, so, slab,
                  r0, r1, c, len);
    // Phase 3 (as BwdDqkWs).
    float kacc[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) kacc[i] = 0.f;
    for (int jt = 0; jt < njt; ++jt) {
      const int s3 = jt & 1;
      MbWait(full3 + 8 * s3, (par3 >> s3) & 1);
      par3 ^= 1u << s3;
      const uint64_t v_d = SmemDescSw128(sa + tile_at(it, 7 + 3 * s3) + own, 16, 1024);
      const uint64_t dc_d = SmemDescSw128(sa + tile_at(it, 8 + 3 * s3), 16, 1024);
      const uint64_t dclo_d = SmemDescSw128(sa + tile_at(it, 6 + 3 * s3), 16, 1024);
      WgmmaFence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        const uint64_t step = (kk * 32) >> 4;
        WgmmaSS128<0, 0>(kacc, v_d + step, dc_d + step, 1);
        if constexpr (SPLIT) WgmmaSS128<0, 0>(kacc, v_d + step, dclo_d + step, 1);
      }
      WgmmaCommit();
      WgmmaWait<0>();
      if (lane == 0) MbArrive(empty3 + 8 * s3);
    }
    WgmmaWait<0>();
    FenceRegs(kacc);
    // Phase 3 is done in this warp: logical slot 2 may take the next tile's first phase-1 stage.
    if (lane == 0) MbArrive(tail + 16);
    {
      const float gl = bs[len - 1];
      const float E0 = r0 < len ? __expf(gl - b0v + igs[r0] - m_next) : 0.f;
      const float E1 = r1 < len ? __expf(gl - b1v + igs[r1] - m_next) : 0.f;
#pragma unroll
      for (int nt = 0; nt < 16; ++nt) {
        const int col = nt * 8 + 2 * c;
        kacc[4 * nt + 0] = E0 * (kacc[4 * nt + 0] + dnks[col]);
        kacc[4 * nt + 1] = E0 * (kacc[4 * nt + 1] + dnks[col + 1]);
        kacc[4 * nt + 2] = E1 * (kacc[4 * nt + 2] + dnks[col]);
        kacc[4 * nt + 3] = E1 * (kacc[4 * nt + 3] + dnks[col + 1]);
      }
    }
    // The last read of this tile's vectors: hand the buffer back to warp 1.
    __syncwarp();
    if (lane == 0) MbArrive(vempty + 8 * vb);
    NamedBarrierSync(1, kConsumers);  // dS' from both warpgroups written (and fenced)
    {
      const uint64_t ds_d = SmemDescSw128(sa + tile_at(it, 4) + wg * kTile64, kTile64, 1024);
      const uint64_t q_d = SmemDescSw128(sa + tile_at(it, 0), kTile64, 1024);
      WgmmaFence();
#pragma unroll
      for (int kk = 0; kk < 8; ++kk) {
        const uint64_t step = (kk * 16 * 128) >> 4;
        WgmmaSS128<1, 1>(kacc, ds_d + step, q_d + step, 1);
      }
      WgmmaCommit();
      WgmmaWait<0>();
      FenceRegs(kacc);
    }
    // dS' and phase-3 stage 0 are read: logical slot 1 is free (the fence orders this warp's
    // generic dS' stores before the TMA that refills the slot).
    FenceProxyAsync();
    __syncwarp();
    if (lane == 0) MbArrive(tail + 8);
    {
      float dot0 = 0.f, dot1 = 0.f;
      StoreRowsSw<L>(kacc, ks, p.dk + tok0 * d.DK + a0, ldqk, r0, r1, c, len, dot0, dot1);
      // Q and K are read (StoreRowsSw's dots, the wgmmas before): logical slot 0 is free.
      __syncwarp();
      if (lane == 0) MbArrive(tail);
      StoreRowDots<false>(p, dot0, dot1, so, slab, r0, r1, c, len);
    }
  }
}
