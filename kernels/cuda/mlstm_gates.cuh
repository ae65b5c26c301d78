// mLSTM gate scans: gates_fwd (step 1 of mlstm.cu's algorithm: chunk-local cumsum b_t, the
// boundary stabilisers m_k, then m_t, E_t and decay_k for the state and output kernels) and
// gates_bwd (step 8: dĩ, df̃ from the row dots with m frozen, then the exact m correction through
// the prefix argmax), each as a sequential / chunk-parallel / cluster kernel (MlstmGateSchedule;
// the cluster forms with few heads, mlstm.cu's GateCluster), and the _wide<8> gates_fwd of chunk
// 256. Included by mlstm.cu inside its anonymous namespace, after mlstm_device.cuh; launched by
// LaunchForward / LaunchForward256 / LaunchGatesBwd there.

// ---------------------------------------------------------------- 1. gates_fwd

// One chunk's gate quantities, computed by one warp (lane j owns tokens j·per .. j·per+per−1):
// chunk-local cumsum b_t, the local prefix max of ĩ_s − b_s, and the totals g = b_last,
// r = max_s (ĩ_s − b_s). Independent of m_k, so every chunk can do this at once.
// kPer 8 (chunk 256) only: b_t − g0, b relative to the boundary between the chunk's 128-token
// halves (g0 = b at the first half's last token), from two half-local scans, and g0. (An empty
// base below chunk 256, so those kernels' code does not change.)
template <int kPer>
struct ChunkGateHalves {};
template <>
struct ChunkGateHalves<8> {
  float bh[8];
  float g0;
};
template <int kPer>
struct ChunkGateLocalT : ChunkGateHalves<kPer> {
  float bl[kPer], rl[kPer], igl[kPer];
  float exclm;  // max of ĩ_s − b_s over the tokens of lower lanes
  float g, r;   // chunk totals (every lane)
  int t0, len, per;
};
using ChunkGateLocal = ChunkGateLocalT<4>;

// kPer: the largest tokens per lane (4 up to L 128, 8 at L 256).
template <int kPer = 4>
__device__ __forceinline__ ChunkGateLocalT<kPer> ChunkGates(const Dims& d, const FwdPtrs& p, int b,
                                                            int hd, int k, int lane) {
  ChunkGateLocalT<kPer> c;
  c.per = (d.L + 31) / 32;  // tokens per lane (<= kPer)
  c.t0 = k * d.L;
  c.len = min(d.L, d.S - c.t0);
  float lfl[kPer];
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int j = lane * c.per + i;
    lfl[i] = 0.f;
    c.igl[i] = -INFINITY;
    if (i < c.per && j < c.len) {
      const int64_t tok = (static_cast<int64_t>(b) * d.S + c.t0 + j) * d.NH + hd;
      sum += LogForget(d.sigmoid, p.fg[tok]);
      lfl[i] = sum;
      c.igl[i] = p.ig[tok];
    }
  }
  float incl = sum;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const float y = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += y;
  }
  const float excl = incl - sum;
  float run = -INFINITY;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    c.bl[i] = excl + lfl[i];
    run = fmaxf(run, c.igl[i] - c.bl[i]);
    c.rl[i] = run;
  }
  float inclm = run;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const float y = __shfl_up_sync(0xffffffffu, inclm, o);
    if (lane >= o) inclm = fmaxf(inclm, y);
  }
  c.exclm = __shfl_up_sync(0xffffffffu, inclm, 1);
  if (lane == 0) c.exclm = -INFINITY;
  c.g = __shfl_sync(0xffffffffu, incl, 31);
  c.r = __shfl_sync(0xffffffffu, inclm, 31);
  if constexpr (kPer == 8) {
    // Chunk 256: the consumers' weights e^{b_t − b_s + ...} need b_t − b_s to chunk 128's
    // precision, but the chunk-local b spans 256 tokens of log-forget (|b| ~ 2000 at gates ±30:
    // twice chunk 128's absolute rounding). So b is stored relative to the halves' boundary,
    // b_t − g0, each half scanned on its own (lanes 0-15 and 16-31 hold the two halves): a
    // half-local prefix for the second half, prefix − half total for the first; both at most one
    // half's magnitude. (The stored m_k becomes m_k + g0 so that b + m_k is unchanged; see
    // ChunkGatesWrite.)
    float inclh = sum;
#pragma unroll
    for (int o = 1; o < 16; o <<= 1) {
      const float y = __shfl_up_sync(0xffffffffu, inclh, o);
      if ((lane & 15) >= o) inclh += y;
    }
    const float exclh = inclh - sum;
    c.g0 = __shfl_sync(0xffffffffu, inclh, 15);
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const float blh = exclh + lfl[i];
      c.bh[i] = lane < 16 ? blh - c.g0 : blh;
    }
  }
  return c;
}

// Writes b_t, m_t, E_t of one chunk once its boundary stabilisers m_k, m_{k+1} are known.
template <int kPer>
__device__ __forceinline__ void ChunkGatesWrite(const Dims& d, const FwdPtrs& p, int bh,
                                                const ChunkGateLocalT<kPer>& c, float m_prev,
                                                float m_next, int lane) {
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int j = lane * c.per + i;
    if (i < c.per && j < c.len) {
      const int64_t o = static_cast<int64_t>(bh) * d.S + c.t0 + j;
      if constexpr (kPer == 8) {
        p.b_tok[o] = c.bh[i];
      } else {
        p.b_tok[o] = c.bl[i];
      }
      p.m_tok[o] = c.bl[i] + fmaxf(m_prev, fmaxf(c.exclm, c.rl[i]));
      p.e_tok[o] = __expf(c.g - c.bl[i] + c.igl[i] - m_next);
    }
  }
  if constexpr (kPer == 8) {  // chunk 256: the stored m_k is m_k + g0 (b is stored as b − g0)
    if (lane == 0) p.smk[static_cast<int64_t>(bh) * (d.NC + 1) + c.t0 / d.L] = m_prev + c.g0;
  }
}

// kSequential: one warp per head walks the chunks.
__global__ void __launch_bounds__(32) mlstm_gates_fwd(Dims d, FwdPtrs p) {
  const int bh = blockIdx.x, b = bh / d.NH, hd = bh % d.NH, lane = threadIdx.x;
  float m_prev = p.m0 != nullptr && p.c0 != nullptr ? p.m0[bh] : 0.f;
  float* mk = p.smk + static_cast<int64_t>(bh) * (d.NC + 1);
  if (lane == 0) mk[0] = m_prev;
  for (int k = 0; k < d.NC; ++k) {
    const ChunkGateLocal c = ChunkGates(d, p, b, hd, k, lane);
    const float m_next = c.g + fmaxf(m_prev, c.r);
    ChunkGatesWrite(d, p, bh, c, m_prev, m_next, lane);
    if (lane == 0) {
      mk[k + 1] = m_next;
      p.decay[static_cast<int64_t>(bh) * d.NC + k] = __expf(c.g + m_prev - m_next);
    }
    m_prev = m_next;
  }
  if (lane == 0 && p.m_out != nullptr && p.c_out != nullptr) p.m_out[bh] = m_prev;
}

// kChunkParallel: one block per head, one warp per chunk (groups of up to 32 chunks). Each warp
// computes its chunk's local quantities; then the max-plus recurrence m_{k+1} = g_k +
// max(m_k, r_k) runs over the group's (g, r) pairs (32 scalar steps, one thread); then each warp
// writes its tokens with its m_k, m_{k+1}.
constexpr int kGateFwdWarps = 32;
// kPer as ChunkGates (4 up to chunk 128; 8 at chunk 256, whose b is stored relative to the halves'
// boundary and whose m_k + g0 ChunkGatesWrite stores, so only m_NC is written here).
template <int kPer>
__device__ __forceinline__ void GatesFwdPar(Dims d, FwdPtrs p) {
  constexpr bool kHalves = kPer == 8;
  __shared__ float gs[kGateFwdWarps], rs[kGateFwdWarps], mprev[kGateFwdWarps + 1];
  const int bh = blockIdx.x, b = bh / d.NH, hd = bh % d.NH;
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
  float* mk = p.smk + static_cast<int64_t>(bh) * (d.NC + 1);
  float m_carry = p.m0 != nullptr && p.c0 != nullptr ? p.m0[bh] : 0.f;
  if (!kHalves && threadIdx.x == 0) mk[0] = m_carry;
  for (int kg = 0; kg < d.NC; kg += nw) {
    const int k = kg + w;
    const bool active = k < d.NC;  // warp-uniform
    ChunkGateLocalT<kPer> c;
    if (active) {
      c = ChunkGates<kPer>(d, p, b, hd, k, lane);
      if (lane == 0) {
        gs[w] = c.g;
        rs[w] = c.r;
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      float m = m_carry;
      const int n = min(nw, d.NC - kg);
      for (int i = 0; i < n; ++i) {
        mprev[i] = m;
        const float mn = gs[i] + fmaxf(m, rs[i]);
        if constexpr (kHalves) {
          if (kg + i + 1 == d.NC) mk[d.NC] = mn;  // (m_k + g0 of every chunk: ChunkGatesWrite)
        } else {
          mk[kg + i + 1] = mn;
        }
        p.decay[static_cast<int64_t>(bh) * d.NC + kg + i] = __expf(gs[i] + m - mn);
        m = mn;
      }
      mprev[n] = m;
    }
    __syncthreads();
    if (active) ChunkGatesWrite(d, p, bh, c, mprev[w], mprev[w + 1], lane);
    m_carry = mprev[min(nw, d.NC - kg)];
    __syncthreads();  // mprev / gs / rs are rewritten by the next group
  }
  if (threadIdx.x == 0 && p.m_out != nullptr && p.c_out != nullptr) p.m_out[bh] = m_carry;
}
__global__ void __launch_bounds__(32 * kGateFwdWarps) mlstm_gates_fwd_par(Dims d, FwdPtrs p) {
  GatesFwdPar<4>(d, p);
}

// kCluster (and kAuto with few heads): gates_fwd over a cluster of CL CTAs per head, CTA r owning
// chunks [r·per, (r+1)·per). Sweep 1: its warps compute those chunks' totals (g, r) into its
// shared copy of the per-chunk arrays; after a cluster barrier every CTA copies the lower ranks'
// totals (distributed shared memory, all threads at once) and thread 0 runs the max-plus
// recurrence from chunk 0 (the same float operations in the same order as mlstm_gates_fwd_par,
// so m_k are bit-identical); sweep 2 recomputes its chunks (a few KB of loads) and writes b_t,
// m_t, E_t as the par kernel does. The 7B layout (8 heads) ran on 8 SMs for 0.028 ms (H200).
constexpr int kGateFwdClWarps = 8;
constexpr int kGateFwdClMaxChunks = 1024;  // NC above this: the par kernel

template <int kPer>
__device__ __forceinline__ void GatesFwdCluster(Dims d, FwdPtrs p) {
  constexpr bool kHalves = kPer == 8;
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  __shared__ float gall[kGateFwdClMaxChunks], rall[kGateFwdClMaxChunks];
  __shared__ float mprev[kGateFwdClMaxChunks + 1];
  const int CL = static_cast<int>(cluster.num_blocks());
  const int rank = static_cast<int>(cluster.block_rank());
  const int bh = blockIdx.y, b = bh / d.NH, hd = bh % d.NH;
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const int per = (d.NC + CL - 1) / CL;
  const int k0 = min(d.NC, rank * per), k1 = min(d.NC, k0 + per), n = k1 - k0;
  for (int i = w; i < n; i += kGateFwdClWarps) {
    const ChunkGateLocalT<kPer> c = ChunkGates<kPer>(d, p, b, hd, k0 + i, lane);
    if (lane == 0) {
      gall[k0 + i] = c.g;
      rall[k0 + i] = c.r;
    }
  }
  cluster.sync();
  for (int k = threadIdx.x; k < k0; k += blockDim.x) {  // the lower ranks' totals
    const int owner = k / per;
    gall[k] = *cluster.map_shared_rank(&gall[k], owner);
    rall[k] = *cluster.map_shared_rank(&rall[k], owner);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float m = p.m0 != nullptr && p.c0 != nullptr ? p.m0[bh] : 0.f;
    float* mk = p.smk + static_cast<int64_t>(bh) * (d.NC + 1);
    if (!kHalves && rank == 0) mk[0] = m;
    for (int k = 0; k < k0; ++k) m = gall[k] + fmaxf(m, rall[k]);
    for (int i = 0; i < n; ++i) {
      mprev[i] = m;
      const float mn = gall[k0 + i] + fmaxf(m, rall[k0 + i]);
      if constexpr (kHalves) {
        if (k0 + i + 1 == d.NC) mk[d.NC] = mn;  // (m_k + g0 of every chunk: ChunkGatesWrite)
      } else {
        mk[k0 + i + 1] = mn;
      }
      p.decay[static_cast<int64_t>(bh) * d.NC + k0 + i] = __expf(gall[k0 + i] + m - mn);
      m = mn;
    }
    mprev[n] = m;
    if (n > 0 && k1 == d.NC && p.m_out != nullptr && p.c_out != nullptr) p.m_out[bh] = m;
  }
  cluster.sync();  // mprev visible; no CTA leaves while another still reads its totals
  for (int i = w; i < n; i += kGateFwdClWarps) {
    const ChunkGateLocalT<kPer> c = ChunkGates<kPer>(d, p, b, hd, k0 + i, lane);
    ChunkGatesWrite(d, p, bh, c, mprev[i], mprev[i + 1], lane);
  }
}
__global__ void __launch_bounds__(32 * kGateFwdClWarps) mlstm_gates_fwd_cluster(Dims d, FwdPtrs p) {
  GatesFwdCluster<4>(d, p);
}

// Chunk 256 (8 tokens per lane): the same bodies with kPer-token lane arrays. kSequential is not
// offered at chunk 256 (MlstmCheck).
template <int kPer>
__global__ void __launch_bounds__(32 * kGateFwdWarps) mlstm_gates_fwd_par_wide(Dims d, FwdPtrs p) {
  GatesFwdPar<kPer>(d, p);
}
template <int kPer>
__global__ void __launch_bounds__(32 * kGateFwdClWarps) mlstm_gates_fwd_cluster_wide(Dims d, FwdPtrs p) {
  GatesFwdCluster<kPer>(d, p);
}

// ---------------------------------------------------------------- 8. gates_bwd

constexpr int kGateThreads = 256;

struct ArgMax {
  double v;
  int i;
};
__device__ __forceinline__ double ShflUp(double x, int o) {
  return __shfl_up_sync(0xffffffffu, x, o);
}
__device__ __forceinline__ ArgMax ShflUp(ArgMax x, int o) {
  return {__shfl_up_sync(0xffffffffu, x.v, o), __shfl_up_sync(0xffffffffu, x.i, o)};
}

// Inclusive scan over a warp's lanes with op(earlier, later) (the block scans' first level).
template <typename T, typename Op>
__device__ __forceinline__ T WarpInclusiveScan(T x, Op op, int lane) {
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const T y = ShflUp(x, o);
    if (lane >= o) x = op(y, x);
  }
  return x;
}

// Inclusive block scan (256 threads) with an associative op; `carry` is combined in front and
// updated to the block total. T must be trivially copyable.
template <typename T, typename Op>
__device__ T BlockInclusiveScan(T x, Op op, T& carry, T* warp_tot) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  x = WarpInclusiveScan(x, op, lane);
  if (lane == 31) warp_tot[w] = x;
  __syncthreads();
  T pre = carry;
  for (int i = 0; i < w; ++i) pre = op(pre, warp_tot[i]);
  x = op(pre, x);
  T total = carry;
  for (int i = 0; i < kGateThreads / 32; ++i) total = op(total, warp_tot[i]);
  __syncthreads();
  carry = total;
  return x;
}

// One thread's part of F = <dC_S, C_S> + <dn_S, n_S> (kFinal; the state gradient given at the end
// against the saved final state) or of the initial state's <dC_0, C_0> + <dn_0, n_0>, over the
// elements first, first + stride, ... of head bh (cd = dk·dv). Idx: the dn·n loop's index type as
// each kernel had it. (p, not the four pointers: passing them moved their parameter loads.)
// gates_bwd and gates_bwd_par; the cluster kernel keeps its own copy (see there).
template <bool kFinal, typename Idx>
__device__ __forceinline__ double StateDotPart(const Dims& d, const BwdPtrs& p, int bh, int64_t cd, Idx first,
                                               Idx stride) {
  double s = 0;
  const float* x = (kFinal ? p.dc_fin : p.dc0) + bh * cd;
  const float* y = (kFinal ? p.sc_last : p.c0) + bh * cd;
  for (int64_t i = first; i < cd; i += stride) s += double(x[i]) * y[i];
  if constexpr (kFinal) {
    const float* xn = p.dn_fin + static_cast<int64_t>(bh) * d.DK;
    const float* yn = p.sn + (static_cast<int64_t>(bh) * (d.NC + 1) + d.NC) * d.DK;
    for (Idx i = first; i < d.DK; i += stride) s += double(xn[i]) * yn[i];
  } else {
    for (Idx i = first; i < d.DK; i += stride)
      s += double(p.dn0[static_cast<int64_t>(bh) * d.DK + i]) * p.n0[static_cast<int64_t>(bh) * d.DK + i];
  }
  return s;
}

__global__ void __launch_bounds__(kGateThreads) mlstm_gates_bwd(Dims d, BwdPtrs p) {
  __shared__ double wd[kGateThreads / 32];
  __shared__ ArgMax wa[kGateThreads / 32];
  __shared__ double red[kGateThreads / 32];
  __shared__ double dm0_tail;
  const int bh = blockIdx.x, b = bh / d.NH, hd = bh % d.NH, tid = threadIdx.x;
  const int64_t so = static_cast<int64_t>(bh) * d.S;
  auto tok_of = [&](int t) { return (static_cast<int64_t>(b) * d.S + t) * d.NH + hd; };
  auto block_sum = [&](double v) {
    v = WarpSumT(v);
    if ((tid & 31) == 0) red[tid >> 5] = v;
    __syncthreads();
    double s = 0;
    for (int i = 0; i < kGateThreads / 32; ++i) s += red[i];
    __syncthreads();
    return s;
  };
  // F = <dC_S, C_S> + <dn_S, n_S>; init = <dC_0, C_0> + <dn_0, n_0>.
  double F = 0, init_dot = 0;
  const int64_t cd = static_cast<int64_t>(d.DK) * d.DV;
  if (p.dc_fin != nullptr) F = block_sum(StateDotPart<true, int>(d, p, bh, cd, tid, kGateThreads));
  if (p.dc0 != nullptr && p.c0 != nullptr) {
    init_dot = block_sum(StateDotPart<false, int>(d, p, bh, cd, tid, kGateThreads));
  }
  const double m0 = p.c0 != nullptr ? double(p.m0[bh]) : 0.0;
  const double dm_last_extra = p.dc_fin != nullptr ? double(p.dm_fin[bh]) - F : 0.0;
  if (tid == 0) dm0_tail = 0;

  // Pass 1: B_t, prefix argmax of ĩ_t − B_t (ties keep the earlier), prefix sums of dm.
  double carry_b = 0, carry_ps = 0;
  ArgMax carry_a{m0, -1};
  auto add = [](double x, double y) { return x + y; };
  auto amax = [](ArgMax x, ArgMax y) { return y.v > x.v ? y : x; };
  for (int base = 0; base < d.S; base += kGateThreads) {
    const int t = base + tid;
    const bool ok = t < d.S;
    const double lf = ok ? double(LogForget(d.sigmoid, p.fg[tok_of(t)])) : 0.0;
    const double B = BlockInclusiveScan(lf, add, carry_b, wd);
    ArgMax cand{ok ? double(p.ig[tok_of(t)]) - B : -INFINITY, ok ? t : -1};
    if (!ok) cand.v = -INFINITY;
    const ArgMax best = BlockInclusiveScan(cand, amax, carry_a, wa);
    double dmv = ok ? double(p.dm[so + t]) : 0.0;
    if (t == d.S - 1) dmv += dm_last_extra;
    const double ps = BlockInclusiveScan(dmv, add, carry_ps, wd);
    if (ok) {
      p.arg[so + t] = best.i;
      p.ps[so + t] = ps;
      p.seg[so + t] = 0;
    }
  }
  __syncthreads();
  // Pass 2: segment sums: seg[a] = Σ_{t: arg_t = a} dm_t (arg is non-decreasing in t).
  for (int t = tid; t < d.S; t += kGateThreads) {
    const int a = p.arg[so + t];
    const bool end = t == d.S - 1 || p.arg[so + t + 1] != a;
    if (end) {
      if (a >= 0) {
        p.seg[so + a] = p.ps[so + t] - (a > 0 ? p.ps[so + a - 1] : 0.0);
      } else {
        dm0_tail = p.ps[so + t];
      }
    }
  }
  __syncthreads();
  // Pass 3 (reverse): dlf_r = F + Σ_{t>=r} (q·dq − k·dk + dm_t − seg_t); dĩ = k·dk + seg.
  double carry_r = F;
  const int ns = p.n_dk_slabs;
  for (int top = d.S - 1; top >= 0; top -= kGateThreads) {
    const int t = top - tid;
    const bool ok = t >= 0;
    double x = 0, kdk = 0, seg = 0;
    if (ok) {
      double qdq = 0;
      for (int i = 0; i < ns; ++i) {
        qdq += p.qdq[(so + t) * ns + i];
        kdk += p.kdk[(so + t) * ns + i];
      }
      seg = p.seg[so + t];
      double dmv = p.dm[so + t];
      if (t == d.S - 1) dmv += dm_last_extra;
      x = qdq - kdk + dmv - seg;
    }
    const double dlf = BlockInclusiveScan(x, add, carry_r, wd);
    if (ok) {
      const int64_t tok = tok_of(t);
      p.dig[tok] = float(kdk + seg);
      p.dfg[tok] = float(dlf * LogForgetDerivative(d.sigmoid, p.fg[tok]));
    }
  }
  if (p.dc0 != nullptr && tid == 0) p.dm0[bh] = float(init_dot + dm0_tail);
}

// kChunkParallel: the same three passes as mlstm_gates_bwd, but 1024 threads per head and
// kGateItems consecutive tokens per thread: each pass does a thread-local sweep for the
// thread's aggregate, one block scan of the aggregates, and a second sweep that applies the
// prefix (one block scan per 8192 tokens instead of three per 256).
constexpr int kGateParThreads = 1024;
constexpr int kGateItems = 8;

// Exclusive block scan (kGateParThreads threads, op(earlier, later)): returns carry ⊕ the
// aggregates of lower threads and advances carry by the block total. smem: 32 entries.
template <typename T, typename Op>
__device__ T BlockExclusiveScan(T x, Op op, T identity, T& carry, T* smem) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const T incl = WarpInclusiveScan(x, op, lane);
  T excl = ShflUp(incl, 1);
  if (lane == 0) excl = identity;
  if (lane == 31) smem[w] = incl;
  __syncthreads();
  if (w == 0) {
    const T t = WarpInclusiveScan(smem[lane], op, lane);  // kGateParThreads / 32 == 32 warps
    smem[lane] = t;
  }
  __syncthreads();
  const T warp_pre = w > 0 ? smem[w - 1] : identity;
  const T result = op(carry, op(warp_pre, excl));
  const T total = smem[31];
  __syncthreads();  // smem is reused by the next scan
  carry = op(carry, total);
  return result;
}

__global__ void __launch_bounds__(kGateParThreads) mlstm_gates_bwd_par(Dims d, BwdPtrs p) {
  static_assert(kGateParThreads == 1024, "BlockExclusiveScan assumes 32 warps");
  __shared__ double sd[32];
  __shared__ ArgMax sa[32];
  __shared__ double dm0_tail;
  const int bh = blockIdx.x, b = bh / d.NH, hd = bh % d.NH, tid = threadIdx.x;
  const int64_t so = static_cast<int64_t>(bh) * d.S;
  auto tok_of = [&](int t) { return (static_cast<int64_t>(b) * d.S + t) * d.NH + hd; };
  auto add = [](double x, double y) { return x + y; };
  auto amax = [](ArgMax x, ArgMax y) { return y.v > x.v ? y : x; };
  auto block_sum = [&](double v) {
    double carry = 0;
    BlockExclusiveScan(v, add, 0.0, carry, sd);
    return carry;
  };
  double F = 0, init_dot = 0;
  const int64_t cd = static_cast<int64_t>(d.DK) * d.DV;
  if (p.dc_fin != nullptr) F = block_sum(StateDotPart<true, int>(d, p, bh, cd, tid, kGateParThreads));
  if (p.dc0 != nullptr && p.c0 != nullptr) {
    init_dot = block_sum(StateDotPart<false, int>(d, p, bh, cd, tid, kGateParThreads));
  }
  const double m0 = p.c0 != nullptr ? double(p.m0[bh]) : 0.0;
  const double dm_last_extra = p.dc_fin != nullptr ? double(p.dm_fin[bh]) - F : 0.0;
  if (tid == 0) dm0_tail = 0;
  auto dm_of = [&](int t) {
    double v = double(p.dm[so + t]);
    if (t == d.S - 1) v += dm_last_extra;
    return v;
  };
  constexpr int kTile = kGateParThreads * kGateItems;

  // Pass 1: B_t, prefix argmax of ĩ_t − B_t (ties keep the earlier), prefix sums of dm.
  double carry_b = 0, carry_ps = 0;
  ArgMax carry_a{m0, -1};
  for (int base = 0; base < d.S; base += kTile) {
    const int t0 = base + tid * kGateItems, t1 = min(t0 + kGateItems, d.S);
    double bloc = 0, sdm = 0;
    ArgMax loc{-INFINITY, -1};  // in thread-local terms (argmax is shift-invariant)
    float lfv[kGateItems], igv[kGateItems];
    double dmv[kGateItems];
#pragma unroll
    for (int j = 0; j < kGateItems; ++j) {  // fixed trip count: all loads in flight at once
      const int t = t0 + j;
      const bool ok = t < t1;
      lfv[j] = ok ? LogForget(d.sigmoid, p.fg[tok_of(t)]) : 0.f;
      igv[j] = ok ? p.ig[tok_of(t)] : -INFINITY;
      dmv[j] = ok ? dm_of(t) : 0.0;
    }
#pragma unroll
    for (int j = 0; j < kGateItems; ++j) {
      bloc += double(lfv[j]);
      if (t0 + j < t1) loc = amax(loc, ArgMax{double(igv[j]) - bloc, t0 + j});
      sdm += dmv[j];
    }
    const double bpre = BlockExclusiveScan(bloc, add, 0.0, carry_b, sd);
    loc.v -= bpre;
    ArgMax run = BlockExclusiveScan(loc, amax, ArgMax{-INFINITY, -1}, carry_a, sa);
    double ps = BlockExclusiveScan(sdm, add, 0.0, carry_ps, sd);
    double B = bpre;
#pragma unroll
    for (int j = 0; j < kGateItems; ++j) {
      const int t = t0 + j;
      if (t < t1) {
        B += double(lfv[j]);
        run = amax(run, ArgMax{double(igv[j]) - B, t});
        ps += dmv[j];
        p.arg[so + t] = run.i;
        p.ps[so + t] = ps;
        p.seg[so + t] = 0;
      }
    }
  }
  __syncthreads();
  // Pass 2: segment sums: seg[a] = Σ_{t: arg_t = a} dm_t (arg is non-decreasing in t). The
  // kGateItems tokens of a thread (strided by the block) load together: two dependent rounds of
  // loads per 8192 tokens instead of two per 1024.
  for (int base = 0; base < d.S; base += kTile) {
    int av[kGateItems];
    bool endv[kGateItems];
#pragma unroll
    for (int u = 0; u < kGateItems; ++u) {
      const int t = base + u * kGateParThreads + tid;
      av[u] = t < d.S ? p.arg[so + t] : 0;
      const int next = t < d.S - 1 ? p.arg[so + t + 1] : 0;
      endv[u] = t < d.S && (t == d.S - 1 || next != av[u]);
    }
    double pt[kGateItems], pa[kGateItems];
#pragma unroll
    for (int u = 0; u < kGateItems; ++u) {
      const int t = base + u * kGateParThreads + tid;
      pt[u] = endv[u] ? p.ps[so + t] : 0.0;
      pa[u] = endv[u] && av[u] > 0 ? p.ps[so + av[u] - 1] : 0.0;
    }
#pragma unroll
    for (int u = 0; u < kGateItems; ++u) {
      if (!endv[u]) continue;
      if (av[u] >= 0) {
        p.seg[so + av[u]] = pt[u] - pa[u];
      } else {
        dm0_tail = pt[u];
      }
    }
  }
  __syncthreads();
  // Pass 3 (reverse): dlf_r = F + Σ_{t>=r} (q·dq − k·dk + dm_t − seg_t); dĩ = k·dk + seg.
  // Every load of a thread's kGateItems tokens is issued before the first use (slab-outer loop,
  // dĩ and f̃'s derivative ready before the scan): one round of dependent loads per slab instead
  // of one per (token, slab) and two more per token after the scan (the stores to dĩ / df̃ kept
  // the compiler from hoisting those loads). Same arithmetic, same order as before. Measured on
  // an H100 (7B heads, 8 blocks of S 8192): 0.075 vs 0.079 ms; 1.3b shape unchanged (0.032).
  double carry_r = F;
  const int ns = p.n_dk_slabs;
  for (int top = d.S - 1; top >= 0; top -= kTile) {
    const int t0 = top - tid * kGateItems;  // this thread: t0, t0 − 1, ..., t0 − 7 (>= 0)
    double qdqv[kGateItems], kdkv[kGateItems];
    float digv[kGateItems], dlfdv[kGateItems];
#pragma unroll
    for (int j = 0; j < kGateItems; ++j) qdqv[j] = kdkv[j] = 0;
    for (int i = 0; i < ns; ++i) {
#pragma unroll
      for (int j = 0; j < kGateItems; ++j) {
        const int t = t0 - j;
        if (t >= 0) {
          qdqv[j] += p.qdq[(so + t) * ns + i];
          kdkv[j] += p.kdk[(so + t) * ns + i];
        }
      }
    }
    double sx = 0;
#pragma unroll
    for (int j = 0; j < kGateItems; ++j) {
      const int t = t0 - j;
      double x = 0;
      digv[j] = 0.f;
      dlfdv[j] = 0.f;
      if (t >= 0) {
        const double seg = p.seg[so + t];
        x = qdqv[j] - kdkv[j] + dm_of(t) - seg;
        digv[j] = float(kdkv[j] + seg);
        dlfdv[j] = LogForgetDerivative(d.sigmoid, p.fg[tok_of(t)]);
      }
      qdqv[j] = x;  // reused: x_t
      sx += x;
    }
    double dlf = BlockExclusiveScan(sx, add, 0.0, carry_r, sd);
#pragma unroll
    for (int j = 0; j < kGateItems; ++j) {
      const int t = t0 - j;
      if (t >= 0) {
        dlf += qdqv[j];
        const int64_t tok = tok_of(t);
        p.dig[tok] = digv[j];
        p.dfg[tok] = float(dlf * dlfdv[j]);
      }
    }
  }
  if (p.dc0 != nullptr && tid == 0) p.dm0[bh] = float(init_dot + dm0_tail);
}

// kCluster: the three passes of mlstm_gates_bwd_par with each head's sequence split over a
// cluster of CL CTAs (CTA r owns tokens [r·per, (r+1)·per), per = ⌈S/CL⌉). Every scan becomes
// "CTA aggregate -> exchange through distributed shared memory -> local scan from the carry of
// the lower (pass 1) or higher (pass 3) ranks"; a CTA sweeps its range twice per scan pass (the
// aggregate, then the scan), reading the inputs twice (they are a few KB per CTA). The segment
// sums of pass 2 read ps / arg across CTA boundaries, so passes are separated by cluster
// barriers (release / acquire at cluster scope: the global writes of pass 1 and 2 are visible to
// the other CTAs after them). Why: with one block per head the 7B layout (8 heads of S 8192)
// used 8 SMs for 0.075 ms (H100, helper mlstm4); latency-bound, so more SMs per head.
constexpr int kGateClThreads = 256;
constexpr int kGateClItems = 2;
constexpr int kGateClWarps = kGateClThreads / 32;
constexpr int kGateClMax = 16;

// Exclusive scan over the kGateClThreads threads (op(earlier, later), identity on the left),
// carry in front; carry advances by the block total. smem: kGateClWarps entries.
template <typename T, typename Op>
__device__ T BlockExclusiveScanCl(T x, Op op, T identity, T& carry, T* smem) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const T incl = WarpInclusiveScan(x, op, lane);
  T excl = ShflUp(incl, 1);
  if (lane == 0) excl = identity;
  if (lane == 31) smem[w] = incl;
  __syncthreads();
  T warp_pre = identity, total = identity;
#pragma unroll
  for (int i = 0; i < kGateClWarps; ++i) {
    if (i < w) warp_pre = op(warp_pre, smem[i]);
    total = op(total, smem[i]);
  }
  __syncthreads();  // smem is reused by the next scan
  const T result = op(carry, op(warp_pre, excl));
  carry = op(carry, total);
  return result;
}

// What a CTA publishes to the others of its cluster.
struct GateClusterShare {
  double f_part, init_part;  // its share of <dC_S, C_S> + <dn_S, n_S> and <dC_0, C_0> + ...
  double sum_lf;             // Σ lf over its tokens
  ArgMax best;               // argmax of ĩ_t − (B_t − B at its first token) over its tokens
  double sum_dm;             // Σ dm over its tokens (without the last token's extra)
  double sum_x;              // pass 3: Σ x_t over its tokens
  double dm0_tail;           // rank 0's copy is the one used
};

__global__ void __launch_bounds__(kGateClThreads) mlstm_gates_bwd_cluster(Dims d, BwdPtrs p) {
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  __shared__ double sd[kGateClWarps];
  __shared__ ArgMax sa[kGateClWarps];
  __shared__ GateClusterShare share;
  const int CL = static_cast<int>(cluster.num_blocks());
  const int rank = static_cast<int>(cluster.block_rank());
  const int bh = blockIdx.y, b = bh / d.NH, hd = bh % d.NH, tid = threadIdx.x;
  const int per = (d.S + CL - 1) / CL;
  const int r0 = min(d.S, rank * per), r1 = min(d.S, r0 + per);
  const int64_t so = static_cast<int64_t>(bh) * d.S;
  auto tok_of = [&](int t) { return (static_cast<int64_t>(b) * d.S + t) * d.NH + hd; };
  auto add = [](double x, double y) { return x + y; };
  auto amax = [](ArgMax x, ArgMax y) { return y.v > x.v ? y : x; };
  constexpr ArgMax kNone{-INFINITY, -1};
  auto block_sum = [&](double v) {
    double carry = 0;
    BlockExclusiveScanCl(v, add, 0.0, carry, sd);
    return carry;
  };
  constexpr int kTile = kGateClThreads * kGateClItems;

  // Pass 0: this CTA's shares of F and of the initial-state dot.
  const int64_t cd = static_cast<int64_t>(d.DK) * d.DV;
  const int64_t stride = static_cast<int64_t>(CL) * kGateClThreads;
  const int64_t first = static_cast<int64_t>(rank) * kGateClThreads + tid;
  double f_part = 0, init_part = 0;
  // (Not StateDotPart: with it the PTX binds the two partial sums' registers in the other order.)
  if (p.dc_fin != nullptr) {
    double s = 0;
    const float* x = p.dc_fin + bh * cd;
    const float* y = p.sc_last + bh * cd;
    for (int64_t i = first; i < cd; i += stride) s += double(x[i]) * y[i];
    const float* xn = p.dn_fin + static_cast<int64_t>(bh) * d.DK;
    const float* yn = p.sn + (static_cast<int64_t>(bh) * (d.NC + 1) + d.NC) * d.DK;
    for (int64_t i = first; i < d.DK; i += stride) s += double(xn[i]) * yn[i];
    f_part = block_sum(s);
  }
  if (p.dc0 != nullptr && p.c0 != nullptr) {
    double s = 0;
    const float* x = p.dc0 + bh * cd;
    const float* y = p.c0 + bh * cd;
    for (int64_t i = first; i < cd; i += stride) s += double(x[i]) * y[i];
    for (int64_t i = first; i < d.DK; i += stride)
      s += double(p.dn0[static_cast<int64_t>(bh) * d.DK + i]) * p.n0[static_cast<int64_t>(bh) * d.DK + i];
    init_part = block_sum(s);
  }

  // Pass 1 over this CTA's tokens, from the given carries: B_t, the prefix argmax of ĩ_t − B_t,
  // prefix sums of dm (with `extra` on token S−1). write = false: only the carries advance.
  auto pass1 = [&](bool write, double& carry_b, ArgMax& carry_a, double& carry_ps, double extra) {
    for (int base = r0; base < r1; base += kTile) {
      const int t0 = base + tid * kGateClItems, t1 = min(t0 + kGateClItems, r1);
      double bloc = 0, sdm = 0;
      ArgMax loc = kNone;  // in thread-local terms (argmax is shift-invariant)
      float lfv[kGateClItems], igv[kGateClItems];
      double dmv[kGateClItems];
#pragma unroll
      for (int j = 0; j < kGateClItems; ++j) {
        const int t = t0 + j;
        const bool ok = t < t1;
        lfv[j] = ok ? LogForget(d.sigmoid, p.fg[tok_of(t)]) : 0.f;
        igv[j] = ok ? p.ig[tok_of(t)] : -INFINITY;
        dmv[j] = ok ? double(p.dm[so + t]) + (t == d.S - 1 ? extra : 0.0) : 0.0;
      }
#pragma unroll
      for (int j = 0; j < kGateClItems; ++j) {
        bloc += double(lfv[j]);
        if (t0 + j < t1) loc = amax(loc, ArgMax{double(igv[j]) - bloc, t0 + j});
        sdm += dmv[j];
      }
      // carry_b before this tile: the argmax values of this tile are relative to it.
      const double b_before = carry_b;
      const double bpre = BlockExclusiveScanCl(bloc, add, 0.0, carry_b, sd);
      loc.v -= bpre;
      ArgMax run = BlockExclusiveScanCl(loc, amax, kNone, carry_a, sa);
      double ps = BlockExclusiveScanCl(sdm, add, 0.0, carry_ps, sd);
      if (write) {
        double B = bpre;  // = carry_b(before) + the lower threads' sums
#pragma unroll
        for (int j = 0; j < kGateClItems; ++j) {
          const int t = t0 + j;
          if (t < t1) {
            B += double(lfv[j]);
            run = amax(run, ArgMax{double(igv[j]) - B, t});
            ps += dmv[j];
            p.arg[so + t] = run.i;
            p.ps[so + t] = ps;
            p.seg[so + t] = 0;
          }
        }
      }
      (void)b_before;
    }
  };
  // The argmax candidates of a tile are ĩ_t − B_t with B_t from carry_b: pass1 with carry_b
  // starting at 0 gives this CTA's best in terms of its local B; the caller shifts it.
  double loc_b = 0, loc_ps = 0;
  ArgMax loc_a = kNone;
  pass1(false, loc_b, loc_a, loc_ps, 0.0);
  if (tid == 0) {
    share.f_part = f_part;
    share.init_part = init_part;
    share.sum_lf = loc_b;
    share.best = loc_a;
    share.sum_dm = loc_ps;
    share.dm0_tail = 0;
  }
  cluster.sync();
  double F = 0, init_dot = 0, carry_b = 0, carry_ps = 0;
  ArgMax carry_a{p.c0 != nullptr ? double(p.m0[bh]) : 0.0, -1};
  for (int j = 0; j < CL; ++j) {
    const GateClusterShare* o = cluster.map_shared_rank(&share, j);
    F += o->f_part;
    init_dot += o->init_part;
    if (j < rank) {
      const ArgMax cand{o->best.v - carry_b, o->best.i};  // local B -> global B
      carry_a = amax(carry_a, cand);
      carry_b += o->sum_lf;
      carry_ps += o->sum_dm;
    }
  }
  const double dm_last_extra = p.dc_fin != nullptr ? double(p.dm_fin[bh]) - F : 0.0;
  pass1(true, carry_b, carry_a, carry_ps, dm_last_extra);
  cluster.sync();  // arg, ps, seg of every CTA written; every read of `share` above done

  // Pass 2: segment sums seg[a] = Σ_{t: arg_t = a} dm_t over segment ends t in this CTA.
  for (int t = r0 + tid; t < r1; t += kGateClThreads) {
    const int a = p.arg[so + t];
    const bool end = t == d.S - 1 || p.arg[so + t + 1] != a;
    if (end) {
      const double pt = p.ps[so + t];
      if (a >= 0) {
        p.seg[so + a] = pt - (a > 0 ? p.ps[so + a - 1] : 0.0);
      } else {
        cluster.map_shared_rank(&share, 0)->dm0_tail = pt;  // one segment has a = −1
      }
    }
  }
  cluster.sync();

  // Pass 3 (reverse): dlf_r = F + Σ_{t>=r} (q·dq − k·dk + dm_t − seg_t); dĩ = k·dk + seg.
  const int ns = p.n_dk_slabs;
  auto x_of = [&](int t, double& kdk) {
    double qdq = 0;
    kdk = 0;
    for (int i = 0; i < ns; ++i) {
      qdq += p.qdq[(so + t) * ns + i];
      kdk += p.kdk[(so + t) * ns + i];
    }
    double dmv = p.dm[so + t];
    if (t == d.S - 1) dmv += dm_last_extra;
    return qdq - kdk + dmv - p.seg[so + t];
  };
  {
    double sx = 0;
    for (int t = r0 + tid; t < r1; t += kGateClThreads) {
      double kdk;
      sx += x_of(t, kdk);
    }
    sx = block_sum(sx);
    if (tid == 0) share.sum_x = sx;
  }
  cluster.sync();
  double carry_r = F;
  for (int j = CL - 1; j > rank; --j) carry_r += cluster.map_shared_rank(&share, j)->sum_x;
  const double dm0_tail = rank == 0 ? share.dm0_tail : 0.0;
  cluster.sync();  // no CTA leaves (or reuses `share`) while another reads it
  for (int top = r1 - 1; top >= r0; top -= kTile) {
    const int t0 = top - tid * kGateClItems;  // this thread: t0, t0 − 1, ... (>= r0)
    double xv[kGateClItems];
    float digv[kGateClItems], dlfdv[kGateClItems];
    double sx = 0;
#pragma unroll
    for (int j = 0; j < kGateClItems; ++j) {
      const int t = t0 - j;
      xv[j] = 0;
      digv[j] = 0.f;
      dlfdv[j] = 0.f;
      if (t >= r0) {
        double kdk;
        xv[j] = x_of(t, kdk);
        digv[j] = float(kdk + p.seg[so + t]);
        dlfdv[j] = LogForgetDerivative(d.sigmoid, p.fg[tok_of(t)]);
      }
      sx += xv[j];
    }
    double dlf = BlockExclusiveScanCl(sx, add, 0.0, carry_r, sd);
#pragma unroll
    for (int j = 0; j < kGateClItems; ++j) {
      const int t = t0 - j;
      if (t >= r0) {
        dlf += xv[j];
        const int64_t tok = tok_of(t);
        p.dig[tok] = digv[j];
        p.dfg[tok] = float(dlf * dlfdv[j]);
      }
    }
  }
  if (rank == 0 && p.dc0 != nullptr && tid == 0) p.dm0[bh] = float(init_dot + dm0_tail);
}
