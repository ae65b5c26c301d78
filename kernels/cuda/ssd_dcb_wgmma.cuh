// dCB on warpgroup MMA with the head-split sum folded into a thread-block cluster (helper ssdc13,
// session 13): `ssd_bwd_dcb_wg`, the default dCB kernel at head_dim 64 (ssd.cu; GYRE_SSD_DCB=wgc
// is the only accepted value; other head dims run ssd_bwd_dcb_reg + ssd_bwd_dcb_sum). Included by
// ssd.cu inside its anonymous namespace, after ssd_bwd_dcb_sum (whose comments, and
// ssd_bwd_dcb_reg's, document the math and the outputs).
//
// Same grid and work split as ssd_bwd_dcb_reg (one 128-thread block = one warpgroup per (b, c, g)
// 64×64 tile pair and head split `part`, looping over its heads), the same ∂Acs outputs
// (dacs_pair, dpair). What differs:
//  - the per-head product dy_l x_sᵀ (K = P = 64) is 4 wgmma m64n64k16 with both operands K-major
//    from 128-byte-swizzled shared memory (one instruction per k16 step per warpgroup instead of
//    per warp 1 + 4 ldmatrix.x4 + 8 mma.sync); the m64n64 accumulator is the m16n8 layout the
//    epilogue reads; the previous head's column-sum flush runs under the wgmmas;
//  - the off-diagonal column factors dt_s·e^{Acs_l0 − Acs_s} are formed once per head per block
//    (threads 0..63, one column each, during the previous head's wgmmas) instead of in each of the
//    32 threads that hold a column (16 exponentials + 32 loads per thread per head);
//  - the C Bᵀ tile lives in shared memory and the column sums are reduced per half of the tile:
//    123 registers, 0 spills at four blocks per SM (the reg kernel: 128 registers, 4 bytes spilled);
//  - the head split's partial sums never reach global memory: the `split` blocks of one tile
//    pair form a cluster (blockIdx.x = pair·split + part, cluster rank = part); each stores its
//    fp32 partial in its own shared memory, and block `part` adds rows [part·64/split, ...)
//    of all partials in rank order 0, 1, ... (ssd_bwd_dcb_sum's order) through distributed shared
//    memory, then writes dCB and dCBᵀ in bf16. No ssd_bwd_dcb_sum launch, no fp32 partial round
//    trip (at B8 S2048 H64, split 4: 42 MB written and read back).
// No atomics; all sums in a fixed order: bitwise reproducible run to run (ssd_gpu_test's rerun
// paths). Measured (H200, ncu, bench/RESULTS.md session 13 ssdc13): dCB + sum 366 → 304 µs at B8
// S2048 H64 (−17%), 284 → 221 µs at B16 S2048 H24 (−22%); fwd+bwd −4.6% at both.

constexpr int kDcbWgStages = 2;
constexpr int kDcbCbLd = kTile + 8;  // bf16 row stride of the C Bᵀ tile in shared memory
constexpr uint32_t kDcbWgTileBytes = kTile * 128;             // 64 rows × 64 bf16, swizzled
constexpr uint32_t kDcbWgStageBytes = 2 * kDcbWgTileBytes;  // dy_l tile, x_s tile
constexpr int kDcbFoldLd = kTile + 8;                         // fp32 row stride of the fold tile

// Dynamic shared memory of ssd_bwd_dcb_wg (P = 64): 1024 (alignment slack) + the ring (2 × 16
// KB); static: Acs_l, Acs_s, dt_s (3 slots), the column factors (2 heads), the column sums (2
// heads × 4 warps), pair sums and the C Bᵀ tile (13.9 KB). ~47 KB: four blocks per SM. The fold
// after the head loop reuses the ring (fp32 partial [64][72] = 18 KB, bf16 transpose [64][R + 2]).
inline size_t DcbWgSmem() { return 1024 + kDcbWgStages * kDcbWgStageBytes; }

// Thread-block cluster primitives (PTX; cooperative_groups cannot be included inside ssd.cu's
// namespaces): a full cluster barrier with release / acquire semantics (orders shared-memory
// writes before other blocks' distributed reads, and those reads before the barrier's end), the
// cluster address of a local shared-memory address in block `rank`, and a distributed load.
__device__ __forceinline__ void DcbClusterSync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::
                   : "memory");
}
__device__ __forceinline__ uint32_t DcbMapa(uint32_t addr, uint32_t rank) {
  uint32_t r;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(r) : "r"(addr), "r"(rank));
  return r;
}
__device__ __forceinline__ float2 DcbLdCluster(uint32_t addr) {
  float2 v;
  asm volatile("ld.shared::cluster.v2.f32 {%0, %1}, [%2];\n"
               : "=f"(v.x), "=f"(v.y)
               : "r"(addr)
               : "memory");
  return v;
}

// Two bf16 of the C Bᵀ tile (shared address) as floats; asm volatile, so not hoisted out of the
// head loop into registers.
__device__ __forceinline__ float2 DcbCbPair(uint32_t addr) {
  unsigned v;
  asm volatile("ld.shared.b32 %0, [%1];\n" : "=r"(v) : "r"(addr));
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v));
}

// The fold's second half (after the first cluster barrier), in a function of its own whose
// indices are re-read from the special registers (asm volatile: not hoisted above the head loop,
// where holding them spilled 84 bytes at 128 registers).
__device__ __forceinline__ uint32_t DcbCtaid(int axis) {
  uint32_t v;
  if (axis == 0) {
    asm volatile("mov.u32 %0, %%ctaid.x;\n" : "=r"(v));
  } else if (axis == 1) {
    asm volatile("mov.u32 %0, %%ctaid.y;\n" : "=r"(v));
  } else {
    asm volatile("mov.u32 %0, %%ctaid.z;\n" : "=r"(v));
  }
  return v;
}
__device__ __forceinline__ void DcbFold(const Dims& d, int split, bf16* dcb_bf, uint32_t ring,
                                        char* smem) {
  const int tiles = d.Q / kTile, pairs = tiles * (tiles + 1) / 2;
  const int bx = static_cast<int>(DcbCtaid(0));
  const int part = bx % split, cp = bx / split;
  const int c = cp / pairs, g = static_cast<int>(DcbCtaid(1)), b = static_cast<int>(DcbCtaid(2));
  int lt, st;
  TilePairOf(cp % pairs, lt, st);
  const int l0 = lt * kTile, s0 = st * kTile;
  const int R = kTile / split, rb = part * R;
  const int64_t n = static_cast<int64_t>(d.B) * d.NC * d.G * d.Q * d.Q;
  const int64_t base = ((static_cast<int64_t>(b) * d.NC + c) * d.G + g) * d.Q * d.Q;
  bf16* tt = reinterpret_cast<bf16*>(smem + kTile * kDcbFoldLd * 4);  // [64 columns][R + 2]
  const int ldt = R + 2;
  for (int i = threadIdx.x; i < R * (kTile / 2); i += kThreads) {
    const int r = i / (kTile / 2), cc = (i % (kTile / 2)) * 2;
    const uint32_t off = ring + ((rb + r) * kDcbFoldLd + cc) * 4;
    float2 v = DcbLdCluster(DcbMapa(off, 0));
    for (int p = 1; p < split; ++p) {
      const float2 w = DcbLdCluster(DcbMapa(off, p));
      v.x += w.x;
      v.y += w.y;
    }
    const __nv_bfloat162 hv = __floats2bfloat162_rn(v.x, v.y);
    *reinterpret_cast<__nv_bfloat162*>(dcb_bf + base + static_cast<int64_t>(l0 + rb + r) * d.Q +
                                       s0 + cc) = hv;
    tt[cc * ldt + r] = hv.x;
    tt[(cc + 1) * ldt + r] = hv.y;
  }
  DcbClusterSync();  // no block leaves (or reuses its fold tile) while another still reads it
  // dCBᵀ[s0 + s, l0 + rb ..): R contiguous bf16 per column s.
  for (int i = threadIdx.x; i < kTile * (R / 2); i += kThreads) {
    const int s = i / (R / 2), rr = (i % (R / 2)) * 2;
    __nv_bfloat162 hv;
    hv.x = tt[s * ldt + rr];
    hv.y = tt[s * ldt + rr + 1];
    *reinterpret_cast<__nv_bfloat162*>(dcb_bf + n + base + static_cast<int64_t>(s0 + s) * d.Q +
                                       l0 + rb + rr) = hv;
  }
}

// grid (NC·pairs·split, G, B), cluster (split, 1, 1), 128 threads, DcbWgSmem() bytes. Outputs as
// ssd_bwd_dcb_reg (dacs_pair, dpair) plus, when dcb_bf is not null, ssd_bwd_dcb_sum's (dcb_bf:
// dCB [B, NC, G, Q, Q] then dCBᵀ n elements later).
__global__ void __launch_bounds__(kThreads, 4) ssd_bwd_dcb_wg(Dims d, const bf16* x,
                                                              const bf16* dy, const float* saved,
                                                              float* dacs_pair, double* dpair,
                                                              int split, bf16* dcb_bf) {
  extern __shared__ __align__(128) char smem_raw[];
  const uint32_t raw_addr = hopper::SmemAddr(smem_raw);
  const uint32_t pad = ((raw_addr + 1023u) & ~1023u) - raw_addr;
  char* smem = smem_raw + pad;
  const uint32_t ring = raw_addr + pad;
  const int tiles = d.Q / kTile, pairs = tiles * (tiles + 1) / 2;
  const int part = blockIdx.x % split, cp = blockIdx.x / split;
  const int c = cp / pairs, g = blockIdx.y, b = blockIdx.z;
  const int pair = cp % pairs;
  const int nh = d.hpg / split, h_first = g * d.hpg + part * nh;
  int lt, st;
  TilePairOf(pair, lt, st);
  const int c0 = c * d.Q;
  const int len = min(d.Q, d.S - c0);
  const int nT = (len + kTile - 1) / kTile;
  if (lt >= nT) return;  // the whole cluster (same tile pair) returns together
  const int l0 = lt * kTile, s0 = st * kTile;
  const int lv = min(kTile, len - l0), sv = min(kTile, len - s0);
  // The small per-head arrays in static shared memory: constant addresses, no pointer registers
  // (generic pointers to them, held across the head loop, spilled at 128 registers).
  // Three slots (the small arrays travel one head ahead of the tiles) and the column factors of
  // two heads.
  constexpr int kSmall = 3;
  __shared__ float al[kSmall * kTile], as[kSmall * kTile], ds[kSmall * kTile];
  __shared__ float colbuf[2 * kWarps * kTile], pairbuf[2 * kWarps];
  __shared__ float cfbuf[2 * kTile];
  const float* dt_g = DtPtr(d, saved, b);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, gq = lane / 4, tq = lane % 4;
  const int r0 = warp * 16 + gq;

  auto issue_tiles = [&](int hh, int buf) {
    const int h = h_first + hh;
    const uint32_t stage = ring + buf * kDcbWgStageBytes;
    hopper::CpAsyncTile64Sw128(stage, dy + YRow(d, b, c0 + l0) + static_cast<int64_t>(h) * d.P, d.ldy, lv);
    hopper::CpAsyncTile64Sw128(stage + kDcbWgTileBytes, x + XRow(d, b, c0 + s0) + static_cast<int64_t>(h) * d.P,
                d.ldx, sv);
  };
  auto issue_small = [&](int hh, int buf) {
    const int h = h_first + hh;
    DcbIssueSmall(al, as, ds, buf, d, saved, dt_g, b, h, c0, l0, s0, sv);
  };
  // Off-diagonal tiles: head hh's column factors dt_s·e^{Acs_l0 − Acs_s} (the expression the
  // reg kernel forms per element in each thread, so the same values), one column per thread 0..63.
  auto column_factors = [&](int hh) {
    if (threadIdx.x < kTile) {
      const int sl = (hh % kSmall) * kTile;
      cfbuf[(hh & 1) * kTile + threadIdx.x] =
          ds[sl + threadIdx.x] * __expf(al[sl] - as[sl + threadIdx.x]);
    }
  };

  // The C Bᵀ tile (l-tile lt, s-tile st; the same for every head) in shared memory, read per head
  // with ld.shared that the compiler cannot hoist: held in 16 registers across the head loop (as
  // ssd_bwd_dcb_reg does) it spilled 56-84 bytes at 128 registers beside the wgmma accumulator.
  __shared__ __align__(16) bf16 cbs[kTile * kDcbCbLd];
  {
    const bf16* cbt = CbPtr(d, saved, b, g) + static_cast<int64_t>(c0 + l0) * d.Q + s0;
#pragma unroll 1
    for (int i = threadIdx.x; i < kTile * (kTile / 8); i += kThreads) {
      const int r = i / (kTile / 8), v = (i % (kTile / 8)) * 8;
      *reinterpret_cast<uint4*>(cbs + r * kDcbCbLd + v) =
          *reinterpret_cast<const uint4*>(cbt + static_cast<int64_t>(r) * d.Q + v);
    }
  }
  const uint32_t cbs_row = hopper::SmemAddr(cbs + r0 * kDcbCbLd + 2 * tq);
  float* pair_out = dacs_pair + ((static_cast<int64_t>(b) * d.H) * d.NC + c) * pairs * 2 * kTile;
  auto flush = [&](int hh) {
    const int h = h_first + hh, pb = hh & 1;
    DcbFlushHead(colbuf, pairbuf, pb, pair_out, dpair, d, b, c, h, pairs, pair);
  };

  float acc[8][4];
  ZeroAcc(acc);
  // A two-stage ring of tiles, one barrier per head (wait_group 0: head hh has landed). The
  // barrier of head hh also retires the stage of head hh − 1 (its wgmmas were waited for before
  // its epilogue), which receives head hh + 1. The small arrays of head hh + 2 travel with the
  // tiles of head hh + 1, so that head hh + 1's column factors are formed during head hh (under
  // its wgmmas) and published by the next barrier. (The session's first form, wg, formed them
  // per element in the epilogue with the small arrays beside their own head's tiles: 4-7% slower.)
  static_assert(kDcbWgStages == 2, "the schedule assumes two tile stages");
  issue_tiles(0, 0);
  issue_small(0, 0);
  if (nh > 1) issue_small(1, 1);
  CpAsyncCommit();
  if (lt > st) {
    CpAsyncWait<0>();
    __syncthreads();
    column_factors(0);
  }
  for (int hh = 0; hh < nh; ++hh) {
    const int buf = hh % kDcbWgStages;
    CpAsyncWait<kDcbWgStages - 2>();
    hopper::FenceProxyAsync();  // this thread's cp.async writes before the wgmmas read them
    __syncthreads();
    if (hh + 1 < nh) issue_tiles(hh + 1, (hh + 1) % kDcbWgStages);
    if (hh + 2 < nh) issue_small(hh + 2, (hh + 2) % kSmall);
    CpAsyncCommit();
    float s2f[32];
    {
      const uint32_t stage = ring + buf * kDcbWgStageBytes;
      const uint64_t da = hopper::SmemDescSw128(stage, 16, 1024);
      const uint64_t db = hopper::SmemDescSw128(stage + kDcbWgTileBytes, 16, 1024);
      hopper::WgmmaFence();
#pragma unroll
      for (int k = 0; k < 4; ++k) hopper::WgmmaSS64<0, 0, 32>(s2f, da + 2 * k, db + 2 * k, k > 0);
      hopper::WgmmaCommit();
    }
    if (hh > 0) flush(hh - 1);  // under the wgmmas
    if (lt > st && hh + 1 < nh) column_factors(hh + 1);
    hopper::WgmmaWait<0>();
    hopper::FenceRegs(s2f);
    const auto& s2 = *reinterpret_cast<const float(*)[8][4]>(s2f);
    const int sb = (hh % kSmall) * kTile;
    const float* alb = al + sb;
    const float* asb = as + sb;
    const float* dsb = ds + sb;
    const float* cfb = cfbuf + (hh & 1) * kTile;
    const float al0 = alb[r0], al1 = alb[r0 + 8];
    const float ref = alb[0];
    // ssd_bwd_dcb_reg's epilogue (see its comments), with the column sums reduced per half of
    // the tile's columns (j = 4·hf .. 4·hf + 3) as soon as that half is formed, so that 8 column
    // partials are live instead of 16 (at 128 registers the 16 spilled here).
    float rp0 = 0.f, rp1 = 0.f, dp = 0.f;
    const bool off_diag = lt > st;
    const float rf0 = off_diag ? __expf(al0 - ref) : 1.f, rf1 = off_diag ? __expf(al1 - ref) : 1.f;
    const bool b2 = (gq & 4) != 0, b1 = (gq & 2) != 0, b0 = (gq & 1) != 0;
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      float csum[8];  // k = 2j' + c2: column 8(4hf + j') + 2tq + c2, this thread's two rows
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) {
        const int j = 4 * hf + jj;
        const float2 cb0 = DcbCbPair(cbs_row + 16 * j);
        const float2 cb1 = DcbCbPair(cbs_row + (8 * kDcbCbLd + 8 * j) * 2);
        if (off_diag) {
#pragma unroll
          for (int c2 = 0; c2 < 2; ++c2) {
            const int col = 8 * j + 2 * tq + c2;
            const float cf = cfb[col];
            const float v0 = s2[j][c2] * cf * rf0, v1 = s2[j][2 + c2] * cf * rf1;
            acc[j][c2] += v0;
            acc[j][2 + c2] += v1;
            const float m0 = v0 * (c2 ? cb0.y : cb0.x), m1 = v1 * (c2 ? cb1.y : cb1.x);
            rp0 += m0;
            rp1 += m1;
            csum[2 * jj + c2] = m0 + m1;
          }
        } else {
          csum[2 * jj] = 0.f;
          csum[2 * jj + 1] = 0.f;
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int col = 8 * j + 2 * tq + (e & 1), row = r0 + 8 * (e >> 1);
            const float a = e < 2 ? al0 : al1;
            const float asc = asb[col];
            const float v =
                col <= row ? s2[j][e] * dsb[col] * __expf(fminf(a - asc, 0.f)) : 0.f;
            acc[j][e] += v;
            const float m = v * (e == 0 ? cb0.x : e == 1 ? cb0.y : e == 2 ? cb1.x : cb1.y);
            if (e < 2) {
              rp0 += m;
            } else {
              rp1 += m;
            }
            csum[2 * jj + (e & 1)] += m;
            dp = fmaf(m, a - asc, dp);
          }
        }
      }
      // Column sums over the warp's 16 rows (the 8 lanes of equal tq) as a transpose-reduce
      // (4 + 2 + 1 shuffles), ending with the sum of k = gq: column 8(4hf + gq/2) + 2tq + gq%2.
      float w4[4];
#pragma unroll
      for (int i = 0; i < 4; ++i)
        w4[i] = (b2 ? csum[4 + i] : csum[i]) +
                __shfl_xor_sync(0xffffffffu, b2 ? csum[i] : csum[4 + i], 16);
      float w2[2];
#pragma unroll
      for (int i = 0; i < 2; ++i)
        w2[i] = (b1 ? w4[2 + i] : w4[i]) + __shfl_xor_sync(0xffffffffu, b1 ? w4[i] : w4[2 + i], 8);
      const float w1 = (b0 ? w2[1] : w2[0]) + __shfl_xor_sync(0xffffffffu, b0 ? w2[0] : w2[1], 4);
      const int col = 8 * (4 * hf + gq / 2) + 2 * tq + (gq & 1);
      colbuf[((hh & 1) * kWarps + warp) * kTile + col] = w1;
      if (off_diag) dp -= (asb[col] - ref) * w1;
    }
    if (off_diag) dp += (al0 - ref) * rp0 + (al1 - ref) * rp1;
    // Row sums (l side): the quad holds a row's 64 columns.
    rp0 = QuadSum(rp0);
    rp1 = QuadSum(rp1);
    if (tq == 0) {
      float* rows = pair_out + (static_cast<int64_t>(h_first + hh) * d.NC * pairs + pair) * 2 * kTile;
      rows[r0] = rp0;
      rows[r0 + 8] = rp1;
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) dp += __shfl_xor_sync(0xffffffffu, dp, off);
    if (lane == 0) pairbuf[(hh & 1) * kWarps + warp] = dp;
  }
  CpAsyncWait<0>();  // only empty groups are left; the ring is reused below
  __syncthreads();
  flush(nh - 1);
  if (dcb_bf == nullptr) return;  // uniform over the cluster (a kernel argument)

  // The fold: this block's fp32 partial into the ring, then rows [rb, rb + R) of the tile pair
  // summed over the cluster's partials in rank order.
  float* fold = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int e2 = 0; e2 < 2; ++e2)
      *reinterpret_cast<float2*>(fold + (r0 + 8 * e2) * kDcbFoldLd + 8 * j + 2 * tq) =
          make_float2(acc[j][2 * e2], acc[j][2 * e2 + 1]);
  DcbClusterSync();  // every partial of the tile pair is in its block's shared memory
  DcbFold(d, split, dcb_bf, ring, smem);
}
