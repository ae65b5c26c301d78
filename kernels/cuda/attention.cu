// Causal attention forward (with fused SelfExtend) and backward; the API and math are in
// attention.h. This file is the FlashAttention-2 algorithm on mma.sync tensor cores.
//
// ---------------------------------------------------------------------------------------------
// Forward: attn_fwd_kernel<D, kSelfExtend>, grid (ceil(T/128), H, B), 256 threads (8 warps).
//   One block owns 128 query rows of one (batch, head); warp w owns rows 16w..16w+15 of them.
//   The Q tile (and, for SelfExtend, the Q_grouped tile) is copied to shared memory once; then
//   the block walks key tiles of 64 rows from key 0 up to the diagonal (tiles entirely above the
//   diagonal are skipped: causal tile skipping halves the work). Per key tile:
//     S = Q Kᵀ          16 x 64 per warp, mma.sync m16n8k16 bf16 -> fp32, A and B via ldmatrix
//     online softmax   row max m, row sum l in fp32 (two rows per thread, quad shuffles);
//                      P = exp2(S·scale·log2e − m·scale·log2e), O and l rescaled by exp2(Δm)
//     O += P V         P converted in registers from the S accumulator layout to the A operand
//                      layout (no shared-memory round trip), V through ldmatrix.trans
//   K and V tiles are double-buffered with cp.async (the copy of tile n+1 runs under the math of
//   tile n; rows past T are zero-filled by the copy so padding never holds NaN). Only tiles that
//   cross the diagonal or the end of the sequence evaluate the mask.
//   The output is normalised by 1/l, staged through the warp's own Q rows in shared memory and
//   written with 16-byte stores; lse = (m·scale + ln l) per row.
//
// SelfExtend (kSelfExtend): the tile also loads K_grouped (and Q_grouped once). For a tile with
//   rows [m0, m0+128) and keys [n0, n0+64) the pair distances i − j lie in
//   [m0 − n0 − 63, m0 − n0 + 127]: if all valid pairs are < W only S = Q Kᵀ is computed (and only
//   K is copied), if all are >= W only S = Q_g K_gᵀ (only K_g copied), and only the few tiles on
//   the band i − j ≈ W compute both products and select per element. The selected logits feed one
//   online softmax, so SelfExtend costs ≈ plain attention plus 2·64·128/(T) of mixed tiles.
//
// Backward: FA2 with recomputation, three launches.
//   attn_bwd_prep_kernel    Dᵢ = Σ_d dOᵢ·Oᵢ (fp32, [B, H, T]) and zeroes the fp32 dQ accumulator.
//   attn_bwd_kernel<D>      grid (ceil(T/128), Hk, B), 256 threads. A block owns 128 keys of one
//                           kv head: K, V tiles stay in shared memory, dK, dV accumulate in
//                           registers (fp32) over every query head of the GQA group and every
//                           64-row query tile at or below the diagonal (Q, dO double-buffered with
//                           cp.async). Per query tile:
//                             S = Q Kᵀ, dP = dO Vᵀ (64 x 128, warps 4 x 2 over rows x keys)
//                             P = exp2(S·scale·log2e − lse·log2e), dS = P ∘ (dP − D)   -> smem bf16
//                             dV += Pᵀ dO, dK += dSᵀ Q (128 x D, warps 4 x 2, A via ldmatrix.trans)
//                             dQ_acc += dS K (64 x D) with fp32 vector atomics (red.global.v2)
//                           dK·scale and dV are written once, bf16, no atomics: each kv head's
//                           gradient sums its query heads inside one block, so GQA needs no scratch.
//   attn_bwd_dq_kernel      dq = bf16(scale · dQ_acc) into the (possibly strided) dq rows.
//   dK and dV are deterministic; dQ sums the key tiles' contributions with atomics, so its last
//   bits may differ between runs (fp32 accumulation, rounded once to bf16).
//
// Costs (causal: T(T+1)/2 pairs ≈ T²/2). Forward: two GEMMs, 4·B·H·T²·D/2 FLOP; backward: five
// (S, dP, dV, dK, dQ), 2.5x the forward. Bytes: forward reads Q, K, V once per query block from
// L2 (HBM once: 2·B·T·(H + 2Hk)·D) and writes O (2·B·T·H·D) and lse; backward reads Q, dO
// once per key block (L2) and K, V, O, dO, lse, D once, writes dQ (fp32 atomics: 4 B/elem per key
// tile, L2-resident), dK, dV. B8 T2048 H16 D128: forward 137 GFLOP, backward 344 GFLOP; at
// ~800 TFLOP/s of dense bf16 mma: 0.17 ms + 0.43 ms — compute-bound (bytes ≈ 0.13 GB).
//
// Requirements checked on the host: D ∈ {64, 128}, H % Hk == 0, row strides multiples of 8
// elements and 16-byte-aligned pointers (cp.async / vector stores), strides >= the packed width.
#include "kernels/cuda/attention.h"

#include <cmath>
#include <cstdint>
#include <string>

#include "kernels/cuda/cuda_check.h"

namespace gyre::cuda {
namespace {

using bf16 = __nv_bfloat16;

constexpr int kThreads = 256;
constexpr float kLog2e = 1.4426950408889634f;

// ------------------------------------------------------------------------------- PTX helpers

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy; valid == false writes 16 zero bytes (src-size 0).
__device__ __forceinline__ void CpAsync16(uint32_t dst, const void* src, bool valid) {
  const int src_size = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_size));
}
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void CpAsyncWaitAll() {
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}

__device__ __forceinline__ void Ldsm4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void Ldsm4T(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// c += a · b, m16n8k16, bf16 operands, fp32 accumulators.
__device__ __forceinline__ void Mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                    uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t PackBf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// Copies rows [row0, row0 + kRows) of a [T, stride] bf16 matrix (D columns from `base`) into a
// shared tile with kLd-element rows; rows >= T are zero-filled.
template <int kRows, int kD, int kLd>
__device__ __forceinline__ void LoadTile(bf16* smem, const bf16* base, int64_t stride, int row0,
                                         int seq, int tid) {
  constexpr int kChunksPerRow = kD / 8;
  constexpr int kChunks = kRows * kChunksPerRow;
  static_assert(kChunks % kThreads == 0, "tile chunks must divide among the threads");
  const uint32_t s = SmemAddr(smem);
#pragma unroll
  for (int i = 0; i < kChunks / kThreads; ++i) {
    const int c = tid + i * kThreads;
    const int r = c / kChunksPerRow, k = c % kChunksPerRow;
    const int t = row0 + r;
    const bool valid = t < seq;
    const bf16* src = base + static_cast<int64_t>(valid ? t : 0) * stride + k * 8;
    CpAsync16(s + (r * kLd + k * 8) * 2, src, valid);
  }
}

// acc[16 x 8·kNT] += A[16 rows of a_lane's tile, kK] · B[8·kNT rows of b, kK]ᵀ, both row-major
// in shared memory (element strides lda, ldb). a_addr / b_addr are this lane's ldmatrix
// addresses at k = 0 (see LaneA / LaneBn).
template <int kNT, int kK>
__device__ __forceinline__ void WarpGemmNT(float (&acc)[kNT][4], uint32_t a_addr, uint32_t b_addr,
                                           int ldb) {
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
    uint32_t a[4];
    Ldsm4(a, a_addr + kk * 32);
#pragma unroll
    for (int np = 0; np < kNT / 2; ++np) {
      uint32_t b[4];
      Ldsm4(b, b_addr + (np * 16 * ldb + kk * 16) * 2);
      Mma(acc[2 * np], a, b[0], b[1]);
      Mma(acc[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// ldmatrix lane addresses (byte offsets from a tile base, element stride ld):
//   A (row-major 16 x 16 block at rows r0):        row r0 + lane%16, col (lane/16)·8
//   B non-trans (rows = n, cols = k, n-tile pair): row (lane/16)·8 + lane%8, col ((lane/8)%2)·8
//   B trans (rows = k, cols = n, n-tile pair):     row lane%8 + ((lane/8)%2)·8, col (lane/16)·8
//   A trans (Aᵀ of a row-major [k][m] matrix):     row lane%8 + (lane/16)·8, col ((lane/8)%2)·8
__device__ __forceinline__ int LaneA(int lane, int ld) { return ((lane % 16) * ld + (lane / 16) * 8) * 2; }
__device__ __forceinline__ int LaneBn(int lane, int ld) {
  return (((lane / 16) * 8 + lane % 8) * ld + ((lane / 8) % 2) * 8) * 2;
}
__device__ __forceinline__ int LaneBt(int lane, int ld) {
  return ((lane % 8 + ((lane / 8) % 2) * 8) * ld + (lane / 16) * 8) * 2;
}
__device__ __forceinline__ int LaneAt(int lane, int ld) {
  return ((lane % 8 + (lane / 16) * 8) * ld + ((lane / 8) % 2) * 8) * 2;
}

// --------------------------------------------------------------------------------- forward

struct FwdParams {
  const bf16 *q, *k, *v, *qg, *kg;
  bf16* out;
  float* lse;
  int64_t q_stride, kv_stride;
  int seq, heads, group;  // group = heads / kv_heads
  float scale_log2;       // softmax_scale · log2(e)
  float scale;
  int se_window;
};

constexpr int kFwdM = 128, kFwdN = 64;

template <int kD, bool kSE>
constexpr int FwdSmemBytes() {
  constexpr int ld = kD + 8;
  return (kSE ? 2 : 1) * kFwdM * ld * 2 + 2 * (kSE ? 3 : 2) * kFwdN * ld * 2;
}

template <int kD, bool kSE>
__global__ void __launch_bounds__(kThreads, 1) attn_fwd_kernel(const FwdParams p) {
  constexpr int kLd = kD + 8;
  constexpr int kNT = kFwdN / 8;  // S n-tiles per warp
  constexpr int kDT = kD / 8;     // O n-tiles per warp
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* sQ = reinterpret_cast<bf16*>(smem_raw);
  bf16* sQg = sQ + kFwdM * kLd;  // SelfExtend only
  bf16* sKV = sQ + (kSE ? 2 : 1) * kFwdM * kLd;
  constexpr int kStage = (kSE ? 3 : 2) * kFwdN * kLd;  // K, V[, Kg] per stage
  auto sK = [&](int st) { return sKV + st * kStage; };
  auto sV = [&](int st) { return sKV + st * kStage + kFwdN * kLd; };
  auto sKg = [&](int st) { return sKV + st * kStage + 2 * kFwdN * kLd; };

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, tq = lane % 4;
  const int m_block = gridDim.x - 1 - blockIdx.x;  // longest (diagonal-heavy) blocks first
  const int h = blockIdx.y, b = blockIdx.z;
  const int hk = h / p.group;
  const int seq = p.seq;
  const int m0 = m_block * kFwdM;
  const int64_t row_base = static_cast<int64_t>(b) * seq;
  const bf16* q = p.q + row_base * p.q_stride + h * kD;
  const bf16* k = p.k + row_base * p.kv_stride + hk * kD;
  const bf16* v = p.v + row_base * p.kv_stride + hk * kD;
  const bf16* qg = kSE ? p.qg + row_base * p.q_stride + h * kD : nullptr;
  const bf16* kg = kSE ? p.kg + row_base * p.kv_stride + hk * kD : nullptr;

  const int last_row = min(m0 + kFwdM, seq) - 1;
  const int n_tiles = last_row / kFwdN + 1;
  const int W = p.se_window;
  // Which products a key tile at n0 needs (valid pairs have 0 <= i - j <= last_row - n0).
  auto needs_near = [&](int n0) { return !kSE || (m0 - (n0 + kFwdN - 1)) < W; };
  auto needs_far = [&](int n0) { return kSE && (last_row - n0) >= W; };
  auto load_kv = [&](int n0, int st) {
    if (needs_near(n0)) LoadTile<kFwdN, kD, kLd>(sK(st), k, p.kv_stride, n0, seq, tid);
    if constexpr (kSE) {
      if (needs_far(n0)) LoadTile<kFwdN, kD, kLd>(sKg(st), kg, p.kv_stride, n0, seq, tid);
    }
    LoadTile<kFwdN, kD, kLd>(sV(st), v, p.kv_stride, n0, seq, tid);
  };

  LoadTile<kFwdM, kD, kLd>(sQ, q, p.q_stride, m0, seq, tid);
  if constexpr (kSE) {
    if (last_row >= W) LoadTile<kFwdM, kD, kLd>(sQg, qg, p.q_stride, m0, seq, tid);
  }
  load_kv(0, 0);
  CpAsyncCommit();

  float o[kDT][4];
#pragma unroll
  for (int i = 0; i < kDT; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
  const int r_lo = m0 + warp * 16 + g;  // this thread's two rows: r_lo, r_lo + 8

  const uint32_t a_off = warp * 16 * kLd * 2 + LaneA(lane, kLd);
  const uint32_t bn_off = LaneBn(lane, kLd);
  const uint32_t bt_off = LaneBt(lane, kLd);

  for (int nt = 0; nt < n_tiles; ++nt) {
    const int st = nt & 1;
    const int n0 = nt * kFwdN;
    CpAsyncWaitAll();
    __syncthreads();
    if (nt + 1 < n_tiles) {
      load_kv(n0 + kFwdN, st ^ 1);
      CpAsyncCommit();
    }

    float s[kNT][4];
#pragma unroll
    for (int i = 0; i < kNT; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
    const bool near = needs_near(n0);
    const bool far = needs_far(n0);
    if (near) WarpGemmNT<kNT, kD>(s, SmemAddr(sQ) + a_off, SmemAddr(sK(st)) + bn_off, kLd);
    if constexpr (kSE) {
      if (far) {
        if (!near) {
          WarpGemmNT<kNT, kD>(s, SmemAddr(sQg) + a_off, SmemAddr(sKg(st)) + bn_off, kLd);
        } else {
          float sg[kNT][4];
#pragma unroll
          for (int i = 0; i < kNT; ++i) sg[i][0] = sg[i][1] = sg[i][2] = sg[i][3] = 0.f;
          WarpGemmNT<kNT, kD>(sg, SmemAddr(sQg) + a_off, SmemAddr(sKg(st)) + bn_off, kLd);
#pragma unroll
          for (int i = 0; i < kNT; ++i) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int row = r_lo + (e / 2) * 8;
              const int col = n0 + i * 8 + tq * 2 + (e % 2);
              if (row - col >= W) s[i][e] = sg[i][e];
            }
          }
        }
      }
    }

    // Mask pairs above the diagonal and keys past the end (only tiles that have any).
    if (n0 + kFwdN - 1 > m0 || n0 + kFwdN > seq) {
#pragma unroll
      for (int i = 0; i < kNT; ++i) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = r_lo + (e / 2) * 8;
          const int col = n0 + i * 8 + tq * 2 + (e % 2);
          if (col > row || col >= seq) s[i][e] = -INFINITY;
        }
      }
    }

    // Online softmax; key 0 is valid for every row, so after the first tile max is finite.
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      float mx = row_max[hr];
#pragma unroll
      for (int i = 0; i < kNT; ++i) mx = fmaxf(mx, fmaxf(s[i][2 * hr], s[i][2 * hr + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float corr = exp2f((row_max[hr] - mx) * p.scale_log2);  // exp2(-inf) = 0 on tile 0
      row_max[hr] = mx;
      const float msc = mx * p.scale_log2;
      float sum = 0.f;
#pragma unroll
      for (int i = 0; i < kNT; ++i) {
        s[i][2 * hr] = exp2f(fmaf(s[i][2 * hr], p.scale_log2, -msc));
        s[i][2 * hr + 1] = exp2f(fmaf(s[i][2 * hr + 1], p.scale_log2, -msc));
        sum += s[i][2 * hr] + s[i][2 * hr + 1];
      }
      row_sum[hr] = row_sum[hr] * corr + sum;
#pragma unroll
      for (int i = 0; i < kDT; ++i) {
        o[i][2 * hr] *= corr;
        o[i][2 * hr + 1] *= corr;
      }
    }

    // O += P V: P from the S accumulators (two n-tiles = one 16-wide k step).
    const uint32_t v_base = SmemAddr(sV(st)) + bt_off;
#pragma unroll
    for (int kk = 0; kk < kFwdN / 16; ++kk) {
      uint32_t a[4];
      a[0] = PackBf16(s[2 * kk][0], s[2 * kk][1]);
      a[1] = PackBf16(s[2 * kk][2], s[2 * kk][3]);
      a[2] = PackBf16(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      a[3] = PackBf16(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int dp = 0; dp < kD / 16; ++dp) {
        uint32_t bv[4];
        Ldsm4T(bv, v_base + (kk * 16 * kLd + dp * 16) * 2);
        Mma(o[2 * dp], a, bv[0], bv[1]);
        Mma(o[2 * dp + 1], a, bv[2], bv[3]);
      }
    }
  }

  // Finish the row sums across the quad, normalise, write lse and O.
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    float sum = row_sum[hr];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const float inv = 1.f / sum;
#pragma unroll
    for (int i = 0; i < kDT; ++i) {
      o[i][2 * hr] *= inv;
      o[i][2 * hr + 1] *= inv;
    }
    const int row = r_lo + hr * 8;
    if (p.lse != nullptr && tq == 0 && row < seq) {
      p.lse[(static_cast<int64_t>(b) * p.heads + h) * seq + row] =
          row_max[hr] * p.scale + logf(sum);
    }
  }
  // Stage through this warp's own Q rows (only this warp ever read them), then 16-byte stores.
  bf16* stage = sQ + warp * 16 * kLd;
#pragma unroll
  for (int i = 0; i < kDT; ++i) {
    *reinterpret_cast<uint32_t*>(stage + g * kLd + i * 8 + tq * 2) = PackBf16(o[i][0], o[i][1]);
    *reinterpret_cast<uint32_t*>(stage + (g + 8) * kLd + i * 8 + tq * 2) =
        PackBf16(o[i][2], o[i][3]);
  }
  __syncwarp();
  constexpr int kChunksPerRow = kD / 8;
#pragma unroll
  for (int c = lane; c < 16 * kChunksPerRow; c += 32) {
    const int r = c / kChunksPerRow, ck = c % kChunksPerRow;
    const int row = m0 + warp * 16 + r;
    if (row < seq) {
      bf16* dst = p.out + ((row_base + row) * p.heads + h) * kD + ck * 8;
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(stage + r * kLd + ck * 8);
    }
  }
}

// -------------------------------------------------------------------------------- backward

struct BwdParams {
  const bf16 *q, *k, *v, *dout;
  const float *lse, *dvec;
  float* dq_acc;  // [B·T, H, D] fp32
  bf16 *dk, *dv;
  int64_t q_stride, kv_stride;
  int seq, heads, group;
  float scale_log2, scale;
};

constexpr int kBwdM = 64, kBwdN = 128;

template <int kD>
constexpr int BwdSmemBytes() {
  constexpr int ld = kD + 8, ldp = kBwdN + 8;
  return (2 * kBwdN * ld + 4 * kBwdM * ld + 2 * kBwdM * ldp) * 2;
}

// D_i = Σ dO·O per (row, head), one warp each; also zeroes that row-head of the dQ accumulator.
template <int kD>
__global__ void __launch_bounds__(kThreads) attn_bwd_prep_kernel(const bf16* out, const bf16* dout,
                                                                  float* dvec, float* dq_acc,
                                                                  int64_t rows_heads, int seq,
                                                                  int heads) {
  const int64_t rh = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (rh >= rows_heads) return;
  constexpr int kPer = kD / 32;  // 2 or 4 elements per lane
  const bf16* o = out + rh * kD + lane * kPer;
  const bf16* d = dout + rh * kD + lane * kPer;
  float acc = 0.f;
#pragma unroll
  for (int i = 0; i < kPer; i += 2) {
    const float2 of = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(o + i));
    const float2 df = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(d + i));
    acc = fmaf(of.x, df.x, fmaf(of.y, df.y, acc));
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  float* z = dq_acc + rh * kD + lane * kPer;
#pragma unroll
  for (int i = 0; i < kPer; ++i) z[i] = 0.f;
  if (lane == 0) {
    const int64_t row = rh / heads;  // b·T + t
    const int h = static_cast<int>(rh % heads);
    const int64_t b = row / seq, t = row % seq;
    dvec[(b * heads + h) * seq + t] = acc;
  }
}

template <int kD>
__global__ void __launch_bounds__(kThreads) attn_bwd_dq_kernel(const float* dq_acc, bf16* dq,
                                                                int64_t q_stride, int heads,
                                                                int64_t chunks, float scale) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (c >= chunks) return;
  constexpr int kChunksPerRowHead = kD / 8;
  const int64_t rh = c / kChunksPerRowHead;
  const int ck = static_cast<int>(c % kChunksPerRowHead);
  const int64_t row = rh / heads;
  const int h = static_cast<int>(rh % heads);
  const float4* src = reinterpret_cast<const float4*>(dq_acc + rh * kD + ck * 8);
  const float4 x0 = src[0], x1 = src[1];
  uint4 packed;
  packed.x = PackBf16(x0.x * scale, x0.y * scale);
  packed.y = PackBf16(x0.z * scale, x0.w * scale);
  packed.z = PackBf16(x1.x * scale, x1.y * scale);
  packed.w = PackBf16(x1.z * scale, x1.w * scale);
  *reinterpret_cast<uint4*>(dq + row * q_stride + h * kD + ck * 8) = packed;
}

template <int kD>
__global__ void __launch_bounds__(kThreads, 1) attn_bwd_kernel(const BwdParams p) {
  constexpr int kLd = kD + 8, kLdp = kBwdN + 8;
  constexpr int kSNT = kBwdN / 2 / 8;  // S / dP n-tiles per warp (64 keys)
  constexpr int kGNT = kD / 2 / 8;     // dK / dV / dQ n-tiles per warp (D/2 features)
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* sK = reinterpret_cast<bf16*>(smem_raw);
  bf16* sV = sK + kBwdN * kLd;
  bf16* sQbuf = sV + kBwdN * kLd;          // [2][kBwdM][kLd]
  bf16* sdObuf = sQbuf + 2 * kBwdM * kLd;  // [2][kBwdM][kLd]
  bf16* sP = sdObuf + 2 * kBwdM * kLd;     // [kBwdM][kLdp]
  bf16* sdS = sP + kBwdM * kLdp;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, tq = lane % 4;
  const int wm = warp % 4, wn = warp / 4;
  const int n_block = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  const int seq = p.seq;
  const int n0 = n_block * kBwdN;
  const int64_t row_base = static_cast<int64_t>(b) * seq;
  const bf16* k = p.k + row_base * p.kv_stride + hk * kD;
  const bf16* v = p.v + row_base * p.kv_stride + hk * kD;
  const int m_first = n0 / kBwdM;
  const int m_tiles = (seq + kBwdM - 1) / kBwdM;
  const int per_head = m_tiles - m_first;
  const int total = p.group * per_head;
  const int64_t do_stride = static_cast<int64_t>(p.heads) * kD;

  auto load_q_do = [&](int it) {
    const int h = hk * p.group + it / per_head;
    const int m0 = (m_first + it % per_head) * kBwdM;
    const int buf = it & 1;
    LoadTile<kBwdM, kD, kLd>(sQbuf + buf * kBwdM * kLd, p.q + row_base * p.q_stride + h * kD,
                             p.q_stride, m0, seq, tid);
    LoadTile<kBwdM, kD, kLd>(sdObuf + buf * kBwdM * kLd, p.dout + row_base * do_stride + h * kD,
                             do_stride, m0, seq, tid);
  };

  LoadTile<kBwdN, kD, kLd>(sK, k, p.kv_stride, n0, seq, tid);
  LoadTile<kBwdN, kD, kLd>(sV, v, p.kv_stride, n0, seq, tid);
  load_q_do(0);
  CpAsyncCommit();

  float dk[2][kGNT][4], dv[2][kGNT][4];
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int i = 0; i < kGNT; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) dk[a][i][e] = dv[a][i][e] = 0.f;

  const uint32_t sK_a = SmemAddr(sK), sV_a = SmemAddr(sV), sP_a = SmemAddr(sP),
                 sdS_a = SmemAddr(sdS);
  // S / dP: rows 16·wm, keys 64·wn.
  const uint32_t s_a_off = wm * 16 * kLd * 2 + LaneA(lane, kLd);
  const uint32_t s_b_off = wn * 64 * kLd * 2 + LaneBn(lane, kLd);
  // dV / dK: keys 32·wm (two m-tiles), features (D/2)·wn; A = Pᵀ / dSᵀ, B = dO / Q (trans).
  const uint32_t g_at_off = (wm * 32 + 0) * 2 + LaneAt(lane, kLdp);
  const uint32_t g_bt_off = (wn * (kD / 2)) * 2 + LaneBt(lane, kLd);
  // dQ: rows 16·wm, features (D/2)·wn; A = dS, B = K (trans).
  const uint32_t q_a_off = wm * 16 * kLdp * 2 + LaneA(lane, kLdp);

  for (int it = 0; it < total; ++it) {
    const int h = hk * p.group + it / per_head;
    const int m0 = (m_first + it % per_head) * kBwdM;
    const int buf = it & 1;
    CpAsyncWaitAll();
    __syncthreads();
    if (it + 1 < total) {
      load_q_do(it + 1);
      CpAsyncCommit();
    }
    const uint32_t sQ_a = SmemAddr(sQbuf + buf * kBwdM * kLd);
    const uint32_t sdO_a = SmemAddr(sdObuf + buf * kBwdM * kLd);

    float s[kSNT][4], dp[kSNT][4];
#pragma unroll
    for (int i = 0; i < kSNT; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[i][e] = dp[i][e] = 0.f;
    WarpGemmNT<kSNT, kD>(s, sQ_a + s_a_off, sK_a + s_b_off, kLd);
    WarpGemmNT<kSNT, kD>(dp, sdO_a + s_a_off, sV_a + s_b_off, kLd);

    const int r_lo = m0 + wm * 16 + g;
    const float* lse_h = p.lse + (static_cast<int64_t>(b) * p.heads + h) * seq;
    const float* dvec_h = p.dvec + (static_cast<int64_t>(b) * p.heads + h) * seq;
    float lse2[2], dd[2];
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int row = r_lo + hr * 8;
      lse2[hr] = row < seq ? lse_h[row] * kLog2e : 0.f;
      dd[hr] = row < seq ? dvec_h[row] : 0.f;
    }
    const bool masked = (n0 + kBwdN - 1 > m0) || (m0 + kBwdM > seq);
#pragma unroll
    for (int i = 0; i < kSNT; ++i) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int hr = e / 2;
        float pr = exp2f(fmaf(s[i][e], p.scale_log2, -lse2[hr]));
        if (masked) {
          const int row = r_lo + hr * 8;
          const int col = n0 + wn * 64 + i * 8 + tq * 2 + (e % 2);
          if (col > row || row >= seq) pr = 0.f;
        }
        s[i][e] = pr;
        dp[i][e] = pr * (dp[i][e] - dd[hr]);
      }
      const int col = wn * 64 + i * 8 + tq * 2;
      const int row = wm * 16 + g;
      *reinterpret_cast<uint32_t*>(sP + row * kLdp + col) = PackBf16(s[i][0], s[i][1]);
      *reinterpret_cast<uint32_t*>(sP + (row + 8) * kLdp + col) = PackBf16(s[i][2], s[i][3]);
      *reinterpret_cast<uint32_t*>(sdS + row * kLdp + col) = PackBf16(dp[i][0], dp[i][1]);
      *reinterpret_cast<uint32_t*>(sdS + (row + 8) * kLdp + col) = PackBf16(dp[i][2], dp[i][3]);
    }
    __syncthreads();

    // dV += Pᵀ dO and dK += dSᵀ Q over the 64 query rows (k dimension).
#pragma unroll
    for (int kq = 0; kq < kBwdM / 16; ++kq) {
      uint32_t ap[2][4], as[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        const uint32_t off = g_at_off + (kq * 16 * kLdp + mt * 16) * 2;
        Ldsm4T(ap[mt], sP_a + off);
        Ldsm4T(as[mt], sdS_a + off);
      }
#pragma unroll
      for (int np = 0; np < kGNT / 2; ++np) {
        const uint32_t off = g_bt_off + (kq * 16 * kLd + np * 16) * 2;
        uint32_t bo[4], bq[4];
        Ldsm4T(bo, sdO_a + off);
        Ldsm4T(bq, sQ_a + off);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          Mma(dv[mt][2 * np], ap[mt], bo[0], bo[1]);
          Mma(dv[mt][2 * np + 1], ap[mt], bo[2], bo[3]);
          Mma(dk[mt][2 * np], as[mt], bq[0], bq[1]);
          Mma(dk[mt][2 * np + 1], as[mt], bq[2], bq[3]);
        }
      }
    }

    // dQ_acc += dS K (rows 16·wm, features (D/2)·wn), fp32 vector atomics.
    float dqp[kGNT][4];
#pragma unroll
    for (int i = 0; i < kGNT; ++i) dqp[i][0] = dqp[i][1] = dqp[i][2] = dqp[i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kBwdN / 16; ++kk) {
      uint32_t a[4];
      Ldsm4(a, sdS_a + q_a_off + kk * 32);
#pragma unroll
      for (int np = 0; np < kGNT / 2; ++np) {
        uint32_t bk[4];
        Ldsm4T(bk, sK_a + g_bt_off + (kk * 16 * kLd + np * 16) * 2);
        Mma(dqp[2 * np], a, bk[0], bk[1]);
        Mma(dqp[2 * np + 1], a, bk[2], bk[3]);
      }
    }
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int row = r_lo + hr * 8;
      if (row < seq) {
        float* dst = p.dq_acc + ((row_base + row) * p.heads + h) * kD + wn * (kD / 2) + tq * 2;
#pragma unroll
        for (int i = 0; i < kGNT; ++i) {
          atomicAdd(reinterpret_cast<float2*>(dst + i * 8),
                    make_float2(dqp[i][2 * hr], dqp[i][2 * hr + 1]));
        }
      }
    }
  }

  // Write dK·scale and dV (keys 32·wm + 16·mt + g (+8), features (D/2)·wn + 8i + 2tq).
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int key = n0 + wm * 32 + mt * 16 + g + hr * 8;
      if (key >= seq) continue;
      bf16* dkr = p.dk + (row_base + key) * p.kv_stride + hk * kD + wn * (kD / 2) + tq * 2;
      bf16* dvr = p.dv + (row_base + key) * p.kv_stride + hk * kD + wn * (kD / 2) + tq * 2;
#pragma unroll
      for (int i = 0; i < kGNT; ++i) {
        *reinterpret_cast<uint32_t*>(dkr + i * 8) =
            PackBf16(dk[mt][i][2 * hr] * p.scale, dk[mt][i][2 * hr + 1] * p.scale);
        *reinterpret_cast<uint32_t*>(dvr + i * 8) =
            PackBf16(dv[mt][i][2 * hr], dv[mt][i][2 * hr + 1]);
      }
    }
  }
}

// ---------------------------------------------------------------------------- host helpers

bool Aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

CudaResult ValidateShape(const AttentionShape& s, int64_t* q_stride, int64_t* kv_stride) {
  if (s.batch < 0 || s.seq < 0 || s.heads <= 0 || s.kv_heads <= 0) {
    return InvalidArgument("attention: batch/seq must be >= 0 and heads/kv_heads > 0");
  }
  if (s.head_dim != 64 && s.head_dim != 128) {
    return InvalidArgument("attention: head_dim must be 64 or 128, got " +
                           std::to_string(s.head_dim));
  }
  if (s.heads % s.kv_heads != 0) {
    return InvalidArgument("attention: heads (" + std::to_string(s.heads) +
                           ") must be a multiple of kv_heads (" + std::to_string(s.kv_heads) + ")");
  }
  if (s.seq > (int64_t{1} << 30) || s.heads > 65535 || s.batch > 65535) {
    return InvalidArgument("attention: seq/heads/batch out of the supported range");
  }
  const int64_t q_packed = s.heads * s.head_dim, kv_packed = s.kv_heads * s.head_dim;
  if (*q_stride == 0) *q_stride = q_packed;
  if (*kv_stride == 0) *kv_stride = kv_packed;
  if (*q_stride < q_packed || *kv_stride < kv_packed) {
    return InvalidArgument("attention: row strides must be >= heads·head_dim (q " +
                           std::to_string(*q_stride) + ", kv " + std::to_string(*kv_stride) + ")");
  }
  if (*q_stride % 8 != 0 || *kv_stride % 8 != 0) {
    return InvalidArgument("attention: row strides must be multiples of 8 elements (16 bytes)");
  }
  return {};
}

template <typename Kernel>
CudaResult SetSmem(Kernel kernel, int bytes) {
  CUDA_RETURN_IF_ERROR(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  return {};
}

template <int kD, bool kSE>
CudaResult LaunchForward(const FwdParams& p, int64_t batch, cudaStream_t stream) {
  constexpr int smem = FwdSmemBytes<kD, kSE>();
  CUDA_RETURN_IF_NOT_OK(SetSmem(attn_fwd_kernel<kD, kSE>, smem));
  const dim3 grid((p.seq + kFwdM - 1) / kFwdM, p.heads, static_cast<unsigned>(batch));
  attn_fwd_kernel<kD, kSE><<<grid, kThreads, smem, stream>>>(p);
  CUDA_RETURN_IF_LAUNCH_ERROR("attn_fwd_kernel");
  return {};
}

template <int kD>
CudaResult LaunchBackward(const BwdParams& p, const AttentionBackwardArgs& a, int64_t batch,
                          int64_t kv_heads, bf16* dq, cudaStream_t stream) {
  const int64_t rows_heads = batch * p.seq * p.heads;
  const int warps_per_block = kThreads / 32;
  attn_bwd_prep_kernel<kD><<<static_cast<unsigned>((rows_heads + warps_per_block - 1) /
                                                   warps_per_block),
                             kThreads, 0, stream>>>(a.out, a.dout, const_cast<float*>(p.dvec),
                                                    p.dq_acc, rows_heads, p.seq, p.heads);
  CUDA_RETURN_IF_LAUNCH_ERROR("attn_bwd_prep_kernel");
  constexpr int smem = BwdSmemBytes<kD>();
  CUDA_RETURN_IF_NOT_OK(SetSmem(attn_bwd_kernel<kD>, smem));
  const dim3 grid((p.seq + kBwdN - 1) / kBwdN, static_cast<unsigned>(kv_heads),
                  static_cast<unsigned>(batch));
  attn_bwd_kernel<kD><<<grid, kThreads, smem, stream>>>(p);
  CUDA_RETURN_IF_LAUNCH_ERROR("attn_bwd_kernel");
  const int64_t chunks = rows_heads * (kD / 8);
  attn_bwd_dq_kernel<kD><<<static_cast<unsigned>((chunks + kThreads - 1) / kThreads), kThreads, 0,
                           stream>>>(p.dq_acc, dq, p.q_stride, p.heads, chunks, p.scale);
  CUDA_RETURN_IF_LAUNCH_ERROR("attn_bwd_dq_kernel");
  return {};
}

}  // namespace

CudaResult AttentionForward(const AttentionForwardArgs& args, cudaStream_t stream) {
  int64_t q_stride = args.q_row_stride, kv_stride = args.kv_row_stride;
  CUDA_RETURN_IF_NOT_OK(ValidateShape(args.shape, &q_stride, &kv_stride));
  const AttentionShape& s = args.shape;
  if (s.batch == 0 || s.seq == 0) return {};
  const bool se = args.self_extend_group > 0;
  if (args.q == nullptr || args.k == nullptr || args.v == nullptr || args.out == nullptr) {
    return InvalidArgument("AttentionForward: q, k, v and out must be set");
  }
  if (!Aligned16(args.q) || !Aligned16(args.k) || !Aligned16(args.v) || !Aligned16(args.out)) {
    return InvalidArgument("AttentionForward: q, k, v, out must be 16-byte aligned");
  }
  if (args.self_extend_group < 0 || (se && args.self_extend_window < 0)) {
    return InvalidArgument("AttentionForward: self_extend_group/window must be >= 0");
  }
  if (se && (args.q_grouped == nullptr || args.k_grouped == nullptr ||
             !Aligned16(args.q_grouped) || !Aligned16(args.k_grouped))) {
    return InvalidArgument(
        "AttentionForward: SelfExtend needs 16-byte-aligned q_grouped and k_grouped");
  }
  FwdParams p{};
  p.q = args.q;
  p.k = args.k;
  p.v = args.v;
  p.qg = args.q_grouped;
  p.kg = args.k_grouped;
  p.out = args.out;
  p.lse = args.lse;
  p.q_stride = q_stride;
  p.kv_stride = kv_stride;
  p.seq = static_cast<int>(s.seq);
  p.heads = static_cast<int>(s.heads);
  p.group = static_cast<int>(s.heads / s.kv_heads);
  p.scale = args.softmax_scale != 0.f ? args.softmax_scale
                                      : static_cast<float>(1.0 / std::sqrt(double(s.head_dim)));
  p.scale_log2 = p.scale * kLog2e;
  // With T <= W every pair is a neighbour pair: the plain kernel computes exactly that.
  const bool use_se = se && args.self_extend_window < s.seq;
  p.se_window = static_cast<int>(use_se ? args.self_extend_window : 0);
  if (s.head_dim == 64) {
    return use_se ? LaunchForward<64, true>(p, s.batch, stream)
                  : LaunchForward<64, false>(p, s.batch, stream);
  }
  return use_se ? LaunchForward<128, true>(p, s.batch, stream)
                : LaunchForward<128, false>(p, s.batch, stream);
}

CudaResult AttentionBackward(DeviceAllocator* alloc, const AttentionBackwardArgs& args,
                             cudaStream_t stream) {
  int64_t q_stride = args.q_row_stride, kv_stride = args.kv_row_stride;
  CUDA_RETURN_IF_NOT_OK(ValidateShape(args.shape, &q_stride, &kv_stride));
  const AttentionShape& s = args.shape;
  if (s.batch == 0 || s.seq == 0) return {};
  if (alloc == nullptr || args.q == nullptr || args.k == nullptr || args.v == nullptr ||
      args.out == nullptr || args.dout == nullptr || args.lse == nullptr ||
      args.dq == nullptr || args.dk == nullptr || args.dv == nullptr) {
    return InvalidArgument("AttentionBackward: alloc and every tensor must be set");
  }
  for (const void* ptr : {static_cast<const void*>(args.q), static_cast<const void*>(args.k),
                          static_cast<const void*>(args.v), static_cast<const void*>(args.out),
                          static_cast<const void*>(args.dout), static_cast<const void*>(args.dq),
                          static_cast<const void*>(args.dk), static_cast<const void*>(args.dv)}) {
    if (!Aligned16(ptr)) return InvalidArgument("AttentionBackward: tensors must be 16-byte aligned");
  }
  const int64_t rows_heads = s.batch * s.seq * s.heads;
  DeviceBuffer dq_acc, dvec;
  CUDA_RETURN_IF_NOT_OK(alloc->Allocate(rows_heads * s.head_dim * sizeof(float), &dq_acc));
  CUDA_RETURN_IF_NOT_OK(alloc->Allocate(rows_heads * sizeof(float), &dvec));
  BwdParams p{};
  p.q = args.q;
  p.k = args.k;
  p.v = args.v;
  p.dout = args.dout;
  p.lse = args.lse;
  p.dvec = dvec.as<float>();
  p.dq_acc = dq_acc.as<float>();
  p.dk = args.dk;
  p.dv = args.dv;
  p.q_stride = q_stride;
  p.kv_stride = kv_stride;
  p.seq = static_cast<int>(s.seq);
  p.heads = static_cast<int>(s.heads);
  p.group = static_cast<int>(s.heads / s.kv_heads);
  p.scale = args.softmax_scale != 0.f ? args.softmax_scale
                                      : static_cast<float>(1.0 / std::sqrt(double(s.head_dim)));
  p.scale_log2 = p.scale * kLog2e;
  // Scratch returns to the allocator when this function returns; the kernels that use it are
  // ordered before any later user of the block on the same stream (allocator contract).
  if (s.head_dim == 64) return LaunchBackward<64>(p, args, s.batch, s.kv_heads, args.dq, stream);
  return LaunchBackward<128>(p, args, s.batch, s.kv_heads, args.dq, stream);
}

}  // namespace gyre::cuda
