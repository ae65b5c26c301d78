// Causal attention forward (with fused SelfExtend) and backward; the API and math are in
// attention.h. This file is the FlashAttention-2 algorithm on mma.sync tensor cores, the host
// entry points, and the choice of kernel; the Hopper (wgmma) kernels are in attention_wgmma.cu.
//
// Kernel choice (defaults = the fastest path that passed attention_gpu_test on the device, same
// call as the benchmark; bench/RESULTS.md, attn2 .. attn5 sections):
//   forward, plain and SelfExtend   "ws"    attention_wgmma.cu, warp-specialised (FA3 structure):
//                                           TMA producer, pingpong consumers; SelfExtend in one
//                                           pass (both score GEMMs only on band tiles); the
//                                           plain D 64 forward: attention_fwd64.cu (three
//                                           consumer warpgroups, 192-row blocks; attn64f)
//   backward main kernel            "ws"    warp-specialised (FA3 structure): TMA producer,
//                                           mbarrier ring, dQ through shared memory and bulk
//                                           operations (blocked dq_acc layout); D 128:
//                                           attention_bwd_store.cu (dq_acc not zeroed: the first
//                                           contribution is a copy; with its own prep), D 64:
//                                           attention_bwd_q128.cu
// GYRE_ATTN_FWD / GYRE_ATTN_SE_FWD ∈ {ws, mma} and GYRE_ATTN_BWD ∈ {ws, mma} select
// another path (tests and benchmarks run every one). The mma.sync kernels below stay as the
// reference implementation and the fallback.
//
// ---------------------------------------------------------------------------------------------
// Forward: attn_fwd_kernel<D, kSelfExtend>, grid (ceil(T/128), H, B), 128 threads (4 warps),
//   two blocks per SM. One block owns 128 query rows of one (batch, head); warp w owns rows
//   32w..32w+31 as two m16 tiles, so every K / V fragment read from shared memory feeds two MMAs
//   (with one m-tile per warp the kernel is bound by shared-memory bandwidth, not by the tensor
//   cores: a B fragment is 256 bytes per 2048 MACs). The Q tile is copied to shared memory once;
//   then the block walks key tiles of 64 rows from key 0 up to the diagonal — tiles entirely above the
//   never visited (causal tile skipping halves the work), and inside the diagonal tiles a warp
//   whose 32 rows all precede the tile skips it. Per key tile:
//     S = Q Kᵀ          32 x 64 per warp, mma.sync m16n8k16 bf16 -> fp32, A and B via ldmatrix
//     online softmax   row max m, row sum l in fp32 (four rows per thread, quad shuffles);
//                      P = exp2(S·scale·log2e − m·scale·log2e), O and l rescaled by exp2(Δm)
//     O += P V         P packed in registers from the S accumulator layout to the A operand
//                      layout (no shared-memory round trip), V through ldmatrix.trans
//   Pipeline (FA2's): one buffer each for K and V; the copy of V(n) runs under S = Q K(n)ᵀ and
//   the copy of K(n+1) under O += P V(n) (cp.async, two barriers per tile); rows past T are
//   zero-filled by the copy so padding never holds NaN. Only tiles that cross a warp's diagonal
//   or the end of the sequence evaluate the mask. The output is normalised by 1/l, staged
//   through the warp's own Q rows in shared memory and written with 16-byte stores;
//   lse = m·scale + ln l per row.
//
// SelfExtend (kSelfExtend): two passes over key tiles in the same kernel, the same shared
//   memory (one Q, one K, one V buffer) and the same registers as plain attention, feeding ONE
//   online softmax (any partition of a row's keys gives the same softmax):
//     near pass  tiles [near_first, diagonal] with Q and K, valid pairs 0 <= i − j < W;
//     far pass   tiles [0, n_far) with Q_g and K_g (Q_g replaces Q in shared memory between the
//                passes, copied under the last near tile's P·V), valid pairs i − j >= W.
//   A tile holds neighbour pairs iff m0 − (n0 + 63) < W and grouped pairs iff last_row − n0 >= W;
//   only the ~2 tiles per block on the band i − j ≈ W are visited twice, and each warp skips a
//   pass's tile in which its own 32 rows have no valid pair. A row's first visited tile may hold
//   none of its keys (the near pass starts past key 0), so the softmax guards max = −inf.
//   Extra bytes: Q_g once per block and K_g tiles instead of K tiles on the far side.
//   Measured (H200, bench/RESULTS.md) this is 1.47-1.55x the plain forward, far more than the
//   ~6-10% of extra tiles; the cause is not found (the SelfExtend instance spills 84 bytes at
//   D 128 but not at D 64, where the ratio is worst; making the pass a compile-time constant per
//   loop did not move it, call 1 of attn2). The wgmma forward visits each key tile once instead
//   (attention_wgmma.cu), so the default no longer uses this one.
//
// Backward: FA2 with recomputation, three launches.
//   attn_bwd_prep_kernel    Dᵢ = Σ_d dOᵢ·Oᵢ (fp32, [B, H, T]) and zeroes the fp32 dQ accumulator
//                           (all paths but the D 128 ws one, which runs attention_bwd_store.cu's).
//   attn_bwd_kernel<D>      grid (ceil(T/128), Hk, B), 256 threads. A block owns 128 keys of one
//                           kv head: K, V tiles stay in shared memory, dK, dV accumulate in
//                           registers (fp32) over every query head of the GQA group and every
//                           64-row query tile at or below the diagonal (Q, dO double-buffered with
//                           cp.async). Per query tile:
//                             S = Q Kᵀ, dP = dO Vᵀ (64 x 128, warps 4 x 2 over rows x keys)
//                             P = exp2(S·scale·log2e − lse·log2e), dS = P ∘ (dP − D)   -> smem bf16
//                             dV += Pᵀ dO, dK += dSᵀ Q (128 x D, warps 4 x 2, A via ldmatrix.trans;
//                             each warp owns 32 keys = two m-tiles, so fragments feed two MMAs)
//                             dQ_acc += dS K (64 x D, warps 4 x 2) with fp32 vector atomics
//                           dK·scale and dV are written once, bf16, no atomics: each kv head's
//                           gradient sums its query heads inside one block, so GQA needs no scratch.
//   attn_bwd_dq_kernel      dq = bf16(scale · dQ_acc) into the (possibly strided) dq rows
//                           (with the fused RoPE: rotated by −angle in fp32 first).
// Fused RoPE (AttentionForwardArgs / AttentionBackwardArgs::rope; the training path): the ws
// forward rotates each query tile in shared memory as it lands and writes the rotated rows back
// (attention_wgmma.cuh, RopeOwnQRows), the ws backward rotates dK by −angle in its epilogue and
// the dQ conversion dQ; the mma.sync kernels use attn_rope_rows_kernel passes instead (Q before
// the forward, dK after the backward). Why and what it saves: attention_notes.md (attn9).
//   dK and dV are deterministic; dQ sums the key tiles' contributions with atomics, so its last
//   bits may differ between runs (fp32 accumulation, rounded once to bf16).
//
// Costs (causal: T(T+1)/2 pairs ≈ T²/2). Forward: two GEMMs, 4·B·H·T²·D/2 FLOP; backward: five
// (S, dP, dV, dK, dQ), 2.5x the forward. Bytes: forward reads Q, K, V once per query block from
// L2 (HBM once: 2·B·T·(H + 2Hk)·D) and writes O (2·B·T·H·D) and lse; backward reads Q, dO
// once per key block (L2) and K, V, O, dO, lse, D once, writes dQ (fp32 atomics: 4 B/elem per key
// tile, L2-resident), dK, dV. B8 T2048 H16 D128: forward 137 GFLOP, backward 344 GFLOP; at
// ~800 TFLOP/s of dense bf16 (cuBLASLt on this card; mma.sync reaches ~2/3 of wgmma's rate):
// 0.17 ms + 0.43 ms — compute-bound (bytes ≈ 0.13 GB). Measured on an H200: these mma.sync
// kernels 0.51 ms forward (271 TFLOP/s, = torch SDPA flash), 1.66 ms backward (207 TFLOP/s);
// the wgmma defaults on an H100 0.28 ms (490 TFLOP/s) and 0.95 ms (360 TFLOP/s, session 5).
//
// Requirements checked on the host: D ∈ {64, 128}, H % Hk == 0, row strides multiples of 8
// elements and 16-byte-aligned pointers (cp.async / vector stores), strides >= the packed width,
// seq · stride < 2^31 (32-bit in-sequence offsets keep registers free).
#include "kernels/cuda/attention.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "kernels/cuda/attention_wgmma.h"
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
// shared tile with kLd-element rows; rows >= T are zero-filled. kNThreads threads cooperate;
// thread tid always copies 16-byte column chunk tid % (D/8), rows tid / (D/8) + i·(threads/(D/8)).
// Offsets are 32-bit (the host checks seq · stride < 2^31) to keep registers free.
template <int kRows, int kD, int kLd, int kNThreads>
__device__ __forceinline__ void LoadTile(bf16* smem, const bf16* base, int stride, int row0,
                                         int seq, int tid) {
  constexpr int kChunksPerRow = kD / 8;
  constexpr int kRowsPerPass = kNThreads / kChunksPerRow;
  static_assert(kNThreads % kChunksPerRow == 0 && kRows % kRowsPerPass == 0,
                "tile chunks must divide among the threads");
  const int r0 = tid / kChunksPerRow, col = (tid % kChunksPerRow) * 8;
  const uint32_t s = SmemAddr(smem) + (r0 * kLd + col) * 2;
  const bf16* src = base + col;
#pragma unroll
  for (int i = 0; i < kRows / kRowsPerPass; ++i) {
    const int t = row0 + r0 + i * kRowsPerPass;
    const bool valid = t < seq;
    CpAsync16(s + i * kRowsPerPass * kLd * 2, src + (valid ? t * stride : 0), valid);
  }
}

// acc[16·kMT x 8·kNT] += A[16·kMT rows, kK] · B[8·kNT rows, kK]ᵀ, both row-major in shared
// memory (element strides lda, ldb). a_addr / b_addr are this lane's ldmatrix addresses at k = 0
// of the first m-tile / n-tile pair (see LaneA / LaneBn). Each B fragment feeds kMT MMAs, each A
// fragment kNT: more m-tiles per warp means fewer shared-memory bytes per MMA.
template <int kMT, int kNT, int kK>
__device__ __forceinline__ void WarpGemmNT(float (&acc)[kMT][kNT][4], uint32_t a_addr, int lda,
                                           uint32_t b_addr, int ldb) {
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
    uint32_t a[kMT][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) Ldsm4(a[mt], a_addr + (mt * 16 * lda + kk * 16) * 2);
#pragma unroll
    for (int np = 0; np < kNT / 2; ++np) {
      uint32_t b[4];
      Ldsm4(b, b_addr + (np * 16 * ldb + kk * 16) * 2);
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        Mma(acc[mt][2 * np], a[mt], b[0], b[1]);
        Mma(acc[mt][2 * np + 1], a[mt], b[2], b[3]);
      }
    }
  }
}

template <int kMT, int kNT>
__device__ __forceinline__ void Zero(float (&acc)[kMT][kNT][4]) {
#pragma unroll
  for (int m = 0; m < kMT; ++m)
#pragma unroll
    for (int n = 0; n < kNT; ++n) acc[m][n][0] = acc[m][n][1] = acc[m][n][2] = acc[m][n][3] = 0.f;
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
  int q_stride, kv_stride;  // elements; seq · stride < 2^31 (host-checked)
  int seq, heads, group;  // group = heads / kv_heads
  float scale_log2;       // softmax_scale · log2(e)
  float scale;
  int se_window;
};

// 128 query rows per block, 4 warps of 32 rows (two m16 tiles each), 64-key tiles; two blocks
// per SM (registers: ≤ 255 per thread at 128 threads x 2 blocks; 68 / 37 KB shared memory at
// D 128 / 64).
constexpr int kFwdM = 128, kFwdN = 64, kFwdWarps = 4, kFwdThreads = kFwdWarps * 32;

template <int kD>
constexpr int FwdSmemBytes() {
  return (kFwdM + 2 * kFwdN) * (kD + 8) * 2;
}

template <int kD, bool kSE>
__global__ void __launch_bounds__(kFwdThreads, 2) attn_fwd_kernel(const FwdParams p) {
  constexpr int kLd = kD + 8;
  constexpr int kNT = kFwdN / 8;  // S n-tiles per m-tile
  constexpr int kDT = kD / 8;     // O n-tiles per m-tile
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* sQ = reinterpret_cast<bf16*>(smem_raw);  // Q, then (SelfExtend far pass) Q_grouped
  bf16* sK = sQ + kFwdM * kLd;                   // K, or K_grouped in the far pass
  bf16* sV = sK + kFwdN * kLd;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, tq = lane % 4;
  const int m_block = gridDim.x - 1 - blockIdx.x;  // longest (most key tiles) blocks first
  const int h = blockIdx.y, b = blockIdx.z;
  const int hk = h / p.group;
  const int seq = p.seq;
  const int m0 = m_block * kFwdM;
  const int64_t row_base = static_cast<int64_t>(b) * seq;
  const bf16* q = p.q + row_base * p.q_stride + h * kD;
  const bf16* k = p.k + row_base * p.kv_stride + hk * kD;
  const bf16* v = p.v + row_base * p.kv_stride + hk * kD;

  const int last_row = min(m0 + kFwdM, seq) - 1;
  const int n_tiles = last_row / kFwdN + 1;
  const int W = p.se_window;
  // Virtual tiles: the near pass over key tiles [near_first, n_tiles) with Q and K, then (only
  // SelfExtend) the far pass over [0, n_far) with Q_g and K_g. A tile has neighbour pairs iff
  // m0 − (n0 + 63) < W and grouped pairs iff last_row − n0 >= W.
  int near_first = 0, n_far = 0;
  if constexpr (kSE) {
    const int x = m0 - (kFwdN - 1) - W;  // near tiles: n0 > x
    near_first = x < 0 ? 0 : x / kFwdN + 1;
    n_far = last_row >= W ? (last_row - W) / kFwdN + 1 : 0;
  }
  const int n_near = n_tiles - near_first;
  const int total = n_near + n_far;
  auto load_k = [&](int vt) {
    if (!kSE || vt < n_near) {
      LoadTile<kFwdN, kD, kLd, kFwdThreads>(sK, k, p.kv_stride, (near_first + vt) * kFwdN, seq,
                                            tid);
    } else {
      const bf16* kg = p.kg + row_base * p.kv_stride + hk * kD;
      LoadTile<kFwdN, kD, kLd, kFwdThreads>(sK, kg, p.kv_stride, (vt - n_near) * kFwdN, seq, tid);
    }
  };

  LoadTile<kFwdM, kD, kLd, kFwdThreads>(sQ, q, p.q_stride, m0, seq, tid);
  load_k(0);
  CpAsyncCommit();

  float o[2][kDT][4];
  Zero(o);
  float row_max[2][2], row_sum[2][2];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
    row_max[mt][0] = row_max[mt][1] = -INFINITY;
    row_sum[mt][0] = row_sum[mt][1] = 0.f;
  }
  const int w_first = m0 + warp * 32;              // this warp's rows: w_first .. +31
  const int w_last = min(w_first + 31, last_row);  // < w_first when the warp has none
  const int r_lo = w_first + g;                    // thread rows: r_lo + 16·mt + 8·half

  const uint32_t a_addr = SmemAddr(sQ) + warp * 32 * kLd * 2 + LaneA(lane, kLd);
  const uint32_t b_addr = SmemAddr(sK) + LaneBn(lane, kLd);
  const uint32_t v_addr = SmemAddr(sV) + LaneBt(lane, kLd);

  for (int vt = 0; vt < total; ++vt) {
    const bool far = kSE && vt >= n_near;
    const int n0 = (far ? vt - n_near : near_first + vt) * kFwdN;
    CpAsyncWaitAll();
    __syncthreads();  // K(vt) (and Q / Q_g) landed; every warp is done with V(vt − 1)
    LoadTile<kFwdN, kD, kLd, kFwdThreads>(sV, v, p.kv_stride, n0, seq, tid);
    CpAsyncCommit();

    // A warp skips the tile when none of its pairs is valid in this pass (causal; SelfExtend:
    // no neighbour pair in the near pass, no grouped pair in the far pass).
    const bool active = far ? (w_last - n0 >= W)
                            : (n0 <= w_last && (!kSE || w_first - (n0 + kFwdN - 1) < W));
    float s[2][kNT][4];
    Zero(s);
    if (active) {
      WarpGemmNT<2, kNT, kD>(s, a_addr, kLd, b_addr, kLd);
      // Valid: near pass j <= i, j < T (SelfExtend: and i − j < W); far pass i − j >= W.
      const bool need_mask =
          far ? (w_first - (n0 + kFwdN - 1) < W || n0 + kFwdN > seq)
              : (n0 + kFwdN - 1 > w_first || n0 + kFwdN > seq || (kSE && w_last - n0 >= W));
      if (need_mask) {
        // Per row, the valid keys are one interval [lo, hi]; compared in tile coordinates.
        const int c0 = n0 + tq * 2;
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
          for (int hr = 0; hr < 2; ++hr) {
            const int row = r_lo + mt * 16 + hr * 8;
            const int hi = min(far ? row - W : row, seq - 1) - c0;
            const int lo = (far || !kSE) ? -c0 : row - W + 1 - c0;
#pragma unroll
            for (int i = 0; i < kNT; ++i)
#pragma unroll
              for (int e2 = 0; e2 < 2; ++e2) {
                const int col = i * 8 + e2;
                if (col < lo || col > hi) s[mt][i][hr * 2 + e2] = -INFINITY;
              }
          }
      }

      // Online softmax. A row may have no valid key yet (SelfExtend's near pass starts past
      // key 0): its max stays −inf, and the guard keeps exp2 arguments finite (p = 0, corr = 0).
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
          float mx = row_max[mt][hr];
#pragma unroll
          for (int i = 0; i < kNT; ++i) mx = fmaxf(mx, fmaxf(s[mt][i][2 * hr], s[mt][i][2 * hr + 1]));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
          const float msc = mx == -INFINITY ? 0.f : mx * p.scale_log2;
          const float corr = exp2f(row_max[mt][hr] * p.scale_log2 - msc);  // 0 while max = −inf
          row_max[mt][hr] = mx;
          float sum = 0.f;
#pragma unroll
          for (int i = 0; i < kNT; ++i) {
            s[mt][i][2 * hr] = exp2f(fmaf(s[mt][i][2 * hr], p.scale_log2, -msc));
            s[mt][i][2 * hr + 1] = exp2f(fmaf(s[mt][i][2 * hr + 1], p.scale_log2, -msc));
            sum += s[mt][i][2 * hr] + s[mt][i][2 * hr + 1];
          }
          row_sum[mt][hr] = row_sum[mt][hr] * corr + sum;
#pragma unroll
          for (int i = 0; i < kDT; ++i) {
            o[mt][i][2 * hr] *= corr;
            o[mt][i][2 * hr + 1] *= corr;
          }
        }
      }
    }

    // P to bf16 A fragments now (two n-tiles = one 16-wide k step), so the fp32 logits die
    // before the P·V loop.
    uint32_t pa[2][kFwdN / 16][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
      for (int kk = 0; kk < kFwdN / 16; ++kk) {
        pa[mt][kk][0] = PackBf16(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        pa[mt][kk][1] = PackBf16(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        pa[mt][kk][2] = PackBf16(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        pa[mt][kk][3] = PackBf16(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
    }

    CpAsyncWaitAll();
    __syncthreads();  // V(vt) landed; every warp is done with Q and K(vt)
    if (vt + 1 < total) {
      if (kSE && vt + 1 == n_near) {  // switch to the far pass: Q_g replaces Q
        const bf16* qg = p.qg + row_base * p.q_stride + h * kD;
        LoadTile<kFwdM, kD, kLd, kFwdThreads>(sQ, qg, p.q_stride, m0, seq, tid);
      }
      load_k(vt + 1);
      CpAsyncCommit();
    }

    // O += P V; each V fragment feeds both m-tiles.
    if (active) {
#pragma unroll
      for (int kk = 0; kk < kFwdN / 16; ++kk) {
#pragma unroll
        for (int dp = 0; dp < kD / 16; ++dp) {
          uint32_t bv[4];
          Ldsm4T(bv, v_addr + (kk * 16 * kLd + dp * 16) * 2);
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            Mma(o[mt][2 * dp], pa[mt][kk], bv[0], bv[1]);
            Mma(o[mt][2 * dp + 1], pa[mt][kk], bv[2], bv[3]);
          }
        }
      }
    }
  }

  // Finish the row sums across the quad, normalise, write lse and O.
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      float sum = row_sum[mt][hr];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      const float inv = 1.f / sum;
#pragma unroll
      for (int i = 0; i < kDT; ++i) {
        o[mt][i][2 * hr] *= inv;
        o[mt][i][2 * hr + 1] *= inv;
      }
      const int row = r_lo + mt * 16 + hr * 8;
      if (p.lse != nullptr && tq == 0 && row < seq) {
        p.lse[(static_cast<int64_t>(b) * p.heads + h) * seq + row] =
            row_max[mt][hr] * p.scale + logf(sum);
      }
    }
  }
  // Stage through this warp's own Q rows (only this warp ever read them), then 16-byte stores.
  bf16* stage = sQ + warp * 32 * kLd;
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
    for (int i = 0; i < kDT; ++i) {
      *reinterpret_cast<uint32_t*>(stage + (mt * 16 + g) * kLd + i * 8 + tq * 2) =
          PackBf16(o[mt][i][0], o[mt][i][1]);
      *reinterpret_cast<uint32_t*>(stage + (mt * 16 + g + 8) * kLd + i * 8 + tq * 2) =
          PackBf16(o[mt][i][2], o[mt][i][3]);
    }
  }
  __syncwarp();
  constexpr int kChunksPerRow = kD / 8;
#pragma unroll
  for (int c = lane; c < 32 * kChunksPerRow; c += 32) {
    const int r = c / kChunksPerRow, ck = c % kChunksPerRow;
    const int row = w_first + r;
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
  int q_stride, kv_stride;  // elements; seq · stride < 2^31 (host-checked)
  int seq, heads, group;
  float scale_log2, scale;
};

constexpr int kBwdM = 64, kBwdN = 128;

template <int kD>
constexpr int BwdSmemBytes() {
  constexpr int ld = kD + 8, ldp = kBwdN + 8;
  return (2 * kBwdN * ld + 4 * kBwdM * ld + 2 * kBwdM * ldp) * 2;
}

// D_i = Σ dO·O per (row, head) and zeroes that row-head of the dQ accumulator: [B·T, H, D] when
// dq_block_cols is 0, else the ws kernel's blocked layout (BwdWsDqAccIndex; chunks of 8 columns
// stay contiguous there, and the padded rows past T are never zeroed because nothing reads
// them). One thread per 8-column chunk (16-byte loads, two 16-byte zero stores), D/8 threads
// per row-head reduce with shuffles.
template <int kD>
__global__ void __launch_bounds__(kThreads) attn_bwd_prep_kernel(const bf16* out, const bf16* dout,
                                                                  float* dvec, float* dq_acc,
                                                                  int64_t rows_heads, int seq,
                                                                  int heads, int dq_block_cols) {
  constexpr int kChunks = kD / 8;  // threads per row-head (8 or 16; a warp holds 2 or 4)
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t rh = c / kChunks;
  const int d0 = static_cast<int>(c % kChunks) * 8;
  const bool valid = rh < rows_heads;  // whole row-heads per warp: no partial shuffle groups
  const float acc = OutDoutRowDot<kD>(out, dout, rh, d0, valid);
  if (!valid) return;
  const int64_t row = rh / heads;  // b·T + t
  const int h = static_cast<int>(rh % heads);
  const int64_t b = row / seq, t = row % seq;
  float4* z = reinterpret_cast<float4*>(
      dq_acc + (dq_block_cols == 0 ? rh * kD + d0
                                   : BwdWsDqAccIndex(b, h, t, d0, heads, (seq + 63) / 64, kD,
                                                     dq_block_cols)));
  z[0] = make_float4(0.f, 0.f, 0.f, 0.f);
  z[1] = make_float4(0.f, 0.f, 0.f, 0.f);
  if (d0 == 0) dvec[(b * heads + h) * seq + t] = acc;
}

// Fused inverse RoPE of the backward (AttentionBackwardArgs::rope): fp32 cos / sin table rows
// [position][half], half = R/2 (a multiple of 8); half 0 = off.
struct InvRope {
  const float* cos = nullptr;
  const float* sin = nullptr;
  int half = 0;
};

__device__ __forceinline__ void Load8(const float* src, float scale, float (&x)[8]) {
  const float4 a = reinterpret_cast<const float4*>(src)[0];
  const float4 b = reinterpret_cast<const float4*>(src)[1];
  x[0] = a.x * scale; x[1] = a.y * scale; x[2] = a.z * scale; x[3] = a.w * scale;
  x[4] = b.x * scale; x[5] = b.y * scale; x[6] = b.z * scale; x[7] = b.w * scale;
}
__device__ __forceinline__ void LoadBf16x8(const bf16* src, float (&x)[8]) {
  const uint4 v = *reinterpret_cast<const uint4*>(src);
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w[i]));
    x[2 * i] = f.x;
    x[2 * i + 1] = f.y;
  }
}
__device__ __forceinline__ void Store8(bf16* dst, const float (&x)[8]) {
  uint4 packed;
  packed.x = PackBf16(x[0], x[1]);
  packed.y = PackBf16(x[2], x[3]);
  packed.z = PackBf16(x[4], x[5]);
  packed.w = PackBf16(x[6], x[7]);
  *reinterpret_cast<uint4*>(dst) = packed;
}
// RoPE rotation of the pair (x1 = features f, x2 = f + R/2) at table row `pos`, features
// f0..f0+7, by +angle (sign 1: rope.cu's forward, x1 c − x2 s, x2 c + x1 s) or −angle (sign −1:
// its backward).
__device__ __forceinline__ void Rope8(const InvRope& rope, int64_t pos, int f0, float sign,
                                      float (&x1)[8], float (&x2)[8]) {
  float c[8], s[8];
  Load8(rope.cos + pos * rope.half + f0, 1.f, c);
  Load8(rope.sin + pos * rope.half + f0, sign, s);
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    const float a = x1[k] * c[k] - x2[k] * s[k], b = x2[k] * c[k] + x1[k] * s[k];
    x1[k] = a;
    x2[k] = b;
  }
}

// dq = scale · dq_acc -> bf16, from [B·T, H, D] (block_cols 0) or the warp-specialised
// backward's blocked layout (BwdWsDqAccIndex, attention_wgmma.h; chunks of 8 columns stay
// contiguous there: the swizzle moves whole chunks). One thread per item of a row-head: without
// RoPE an item is one 8-column chunk; with the fused inverse RoPE the first R/16 items are the
// chunk pairs (f0, f0 + R/2), rotated by −angle in fp32 before the one rounding to bf16, and the
// rest the pass-through chunks from R on (items_per_rh = R/16 + (D − R)/8).
template <int kD>
__global__ void __launch_bounds__(kThreads) attn_bwd_dq_kernel(
    const float* dq_acc, bf16* dq, int64_t q_stride, int heads, int seq, int block_cols,
    int64_t items, int items_per_rh, float scale, InvRope rope) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (c >= items) return;
  const int64_t rh = c / items_per_rh;
  const int item = static_cast<int>(c % items_per_rh);
  const int pairs = rope.half / 8;
  const int d0 = item < pairs ? 8 * item : 2 * rope.half + 8 * (item - pairs);
  const int64_t row = rh / heads;
  const int h = static_cast<int>(rh % heads);
  const int64_t b = row / seq, t = row % seq;
  const int64_t m_tiles = (seq + 63) / 64;
  auto src = [&](int d) {
    return dq_acc + (block_cols == 0
                         ? rh * kD + d
                         : BwdWsDqAccIndex(b, h, t, d, heads, m_tiles, kD, block_cols));
  };
  bf16* dst = dq + row * q_stride + h * kD;
  float x1[8];
  Load8(src(d0), scale, x1);
  if (item < pairs) {
    float x2[8];
    Load8(src(d0 + rope.half), scale, x2);
    Rope8(rope, t, d0, -1.f, x1, x2);
    Store8(dst + d0 + rope.half, x2);
  }
  Store8(dst + d0, x1);
}

// RoPE (sign 1) or its inverse (sign −1) on bf16 rows x -> y (in place allowed) for the
// mma.sync kernels (the forward's Q, the backward's dK; the ws kernels fuse both): one thread
// per (row, head, chunk of 8 pairs).
template <int kD>
__global__ void __launch_bounds__(kThreads) attn_rope_rows_kernel(
    const bf16* x, bf16* y, int64_t stride, int heads, int seq, int64_t items, InvRope rope,
    float sign) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= items) return;
  const int per_head = rope.half / 8;
  const int64_t rh = i / per_head;
  const int f0 = static_cast<int>(i % per_head) * 8;
  const int64_t row = rh / heads;
  const int h = static_cast<int>(rh % heads);
  const int64_t off = row * stride + h * kD + f0;
  float x1[8], x2[8];
  LoadBf16x8(x + off, x1);
  LoadBf16x8(x + off + rope.half, x2);
  Rope8(rope, row % seq, f0, sign, x1, x2);
  Store8(y + off, x1);
  Store8(y + off + rope.half, x2);
}

template <int kD>
CudaResult LaunchRopeRows(const bf16* x, bf16* y, int64_t stride, int64_t rows, int heads,
                          int seq, const InvRope& rope, float sign, cudaStream_t stream) {
  const int64_t items = rows * heads * (rope.half / 8);
  attn_rope_rows_kernel<kD>
      <<<static_cast<unsigned>((items + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
          x, y, stride, heads, seq, items, rope, sign);
  CUDA_RETURN_IF_LAUNCH_ERROR("attn_rope_rows_kernel");
  return {};
}

// S / dP: warps 4 (16 rows) x 2 (64 keys); dV / dK: 4 (32 keys) x 2 (D/2 features); dQ: 4 (16
// rows) x 2 (D/2 features). (A 2 x 4 layout with 32 x 32 S blocks per warp and above-diagonal
// skips measured 11-22% slower on an H200 — see bench/RESULTS.md — and was dropped.)
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
  const int do_stride = p.heads * kD;

  auto load_q_do = [&](int it) {
    const int h = hk * p.group + it / per_head;
    const int m0 = (m_first + it % per_head) * kBwdM;
    const int buf = it & 1;
    LoadTile<kBwdM, kD, kLd, kThreads>(sQbuf + buf * kBwdM * kLd, p.q + row_base * p.q_stride + h * kD,
                             p.q_stride, m0, seq, tid);
    LoadTile<kBwdM, kD, kLd, kThreads>(sdObuf + buf * kBwdM * kLd, p.dout + row_base * do_stride + h * kD,
                             do_stride, m0, seq, tid);
  };

  LoadTile<kBwdN, kD, kLd, kThreads>(sK, k, p.kv_stride, n0, seq, tid);
  LoadTile<kBwdN, kD, kLd, kThreads>(sV, v, p.kv_stride, n0, seq, tid);
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

    float s2[1][kSNT][4], dp2[1][kSNT][4];
    Zero(s2);
    Zero(dp2);
    WarpGemmNT<1, kSNT, kD>(s2, sQ_a + s_a_off, kLd, sK_a + s_b_off, kLd);
    WarpGemmNT<1, kSNT, kD>(dp2, sdO_a + s_a_off, kLd, sV_a + s_b_off, kLd);
    float (&s)[kSNT][4] = s2[0];
    float (&dp)[kSNT][4] = dp2[0];

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
  if (s.seq * std::max(*q_stride, *kv_stride) >= (int64_t{1} << 31)) {
    return InvalidArgument("attention: seq · row stride must be < 2^31 elements");
  }
  return {};
}

// The fused-RoPE table of AttentionForwardArgs / AttentionBackwardArgs::rope (null: off).
CudaResult RopeFromTable(const RopeTable* table, const AttentionShape& s, const char* who,
                         InvRope* rope) {
  *rope = InvRope();
  if (table == nullptr) return {};
  const RopeTable& t = *table;
  if (t.cos_sin.as<float>() == nullptr || t.head_dim <= 0 || t.head_dim % 16 != 0 ||
      t.head_dim > s.head_dim || t.max_positions < s.seq ||
      t.max_positions * t.head_dim >= (int64_t{1} << 31)) {
    return InvalidArgument(std::string(who) +
                           ": the fused RoPE table needs a rotary dim that is a multiple of 16 "
                           "and <= head_dim, and at least seq positions (rotary dim " +
                           std::to_string(t.head_dim) + ", " + std::to_string(t.max_positions) +
                           " positions)");
  }
  rope->half = static_cast<int>(t.head_dim / 2);
  rope->cos = t.cos_sin.as<float>();
  rope->sin = rope->cos + t.max_positions * rope->half;
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
  constexpr int smem = FwdSmemBytes<kD>();
  CUDA_RETURN_IF_NOT_OK(SetSmem(attn_fwd_kernel<kD, kSE>, smem));
  const dim3 grid((p.seq + kFwdM - 1) / kFwdM, p.heads, static_cast<unsigned>(batch));
  attn_fwd_kernel<kD, kSE><<<grid, kFwdThreads, smem, stream>>>(p);
  CUDA_RETURN_IF_LAUNCH_ERROR("attn_fwd_kernel");
  return {};
}

// Backward main kernel: "ws" (attention_wgmma.cu, FA3 structure; the default, measured faster
// than the earlier two-warpgroup wgmma kernels at every bench shape, which were removed:
// bench/RESULTS.md, session 3 attn3) or "mma" (attn_bwd_kernel above; the reference and
// fallback). GYRE_ATTN_BWD overrides the default (read once per process).
enum class BwdPath { kMma, kWs };
constexpr BwdPath kDefaultBackward = BwdPath::kWs;
bool IsWsPath(BwdPath path) { return path == BwdPath::kWs; }

BwdPath BackwardPath() {
  static const char* const env = std::getenv("GYRE_ATTN_BWD");
  if (env != nullptr) {
    if (std::strcmp(env, "mma") == 0) return BwdPath::kMma;
    if (std::strcmp(env, "ws") == 0) return BwdPath::kWs;
  }
  return kDefaultBackward;
}

// GYRE_ATTN_DETERMINISTIC (read once per process), an override of
// AttentionBackwardArgs::deterministic for benches and tests: unset = the args decide, "1" = on
// for every call (the ws backward adds dQ's key blocks in a fixed order, attention_bwd_det.cu),
// "0" = off for every call; anything else is an error.
enum class DetMode { kArgs, kOff, kOn, kUnknown };
DetMode DeterministicOverride() {
  static const DetMode mode = [] {
    const char* env = std::getenv("GYRE_ATTN_DETERMINISTIC");
    if (env == nullptr) return DetMode::kArgs;
    if (std::strcmp(env, "0") == 0) return DetMode::kOff;
    if (std::strcmp(env, "1") == 0) return DetMode::kOn;
    return DetMode::kUnknown;
  }();
  return mode;
}

// GYRE_ATTN_PHASES=1 (read once per process; a diagnostic, attention_notes.md session 12): CUDA
// events around every kernel of AttentionForward / AttentionBackward on the caller's stream, so
// that the time of each kernel (prep, main, dq conversion) can be read inside a training step
// as well as in the benchmark. A call's line ("attn_phases bwd B.. S.. H../.. D.. q_stride ..
// kv_stride .. rope .. det ..: prep X main Y dq Z total W ms") goes to stderr once its last event
// has completed, checked without blocking at a later call (the last calls of a process are not
// printed; with many calls in flight the lines come in bursts). Unset or any other value: no events, nothing printed (the default path is untouched).
bool PhasesOn() {
  static const bool on = [] {
    const char* env = std::getenv("GYRE_ATTN_PHASES");
    return env != nullptr && std::strcmp(env, "1") == 0;
  }();
  return on;
}

class PhaseRecorder {
 public:
  // Records the call's first event (nothing when GYRE_ATTN_PHASES is off).
  PhaseRecorder(const char* kind, const AttentionShape& s, int64_t q_stride, int64_t kv_stride,
                bool rope, bool det, cudaStream_t stream)
      : on_(PhasesOn()), stream_(stream) {
    if (!on_) return;
    char label[192];
    std::snprintf(label, sizeof(label), "attn_phases %s B%lld S%lld H%lld/%lld D%lld q_stride %lld "
                  "kv_stride %lld rope %d det %d:", kind, static_cast<long long>(s.batch),
                  static_cast<long long>(s.seq), static_cast<long long>(s.heads),
                  static_cast<long long>(s.kv_heads), static_cast<long long>(s.head_dim),
                  static_cast<long long>(q_stride), static_cast<long long>(kv_stride),
                  rope ? 1 : 0, det ? 1 : 0);
    call_.label = label;
    Record(nullptr);
  }
  // Records an event after the phase `name` (the kernels launched since the previous event).
  void Mark(const char* name) {
    if (on_) Record(name);
  }
  // Hands the call to the log and prints every logged call whose events have completed.
  ~PhaseRecorder() {
    if (call_.events.empty()) return;
    Log& log = GetLog();
    std::lock_guard<std::mutex> lock(log.mu);
    if (on_ && call_.events.size() > 1) {
      log.pending.push_back(std::move(call_));
    } else {  // a failed record: the events go back to the pool, the call is not printed
      for (cudaEvent_t e : call_.events) log.free_events.push_back(e);
    }
    // Calls complete in order on one stream: print from the front up to the first call still in
    // flight (a call on another stream may wait for a later call to print it).
    size_t done = 0;
    for (; done < log.pending.size(); ++done) {
      Call& c = log.pending[done];
      const cudaError_t q = cudaEventQuery(c.events.back());
      if (q == cudaErrorNotReady) break;
      if (q == cudaSuccess) {
        std::string line = c.label;
        float total = 0.f;
        for (size_t i = 1; i < c.events.size(); ++i) {
          float ms = 0.f;
          if (cudaEventElapsedTime(&ms, c.events[i - 1], c.events[i]) != cudaSuccess) ms = -1.f;
          total += ms;
          char part[64];
          std::snprintf(part, sizeof(part), " %s %.4f", c.names[i].c_str(), ms);
          line += part;
        }
        char tail[48];
        std::snprintf(tail, sizeof(tail), " total %.4f ms\n", total);
        line += tail;
        std::fputs(line.c_str(), stderr);
      }
      for (cudaEvent_t e : c.events) log.free_events.push_back(e);
    }
    log.pending.erase(log.pending.begin(), log.pending.begin() + static_cast<std::ptrdiff_t>(done));
  }
  PhaseRecorder(const PhaseRecorder&) = delete;
  PhaseRecorder& operator=(const PhaseRecorder&) = delete;

 private:
  struct Call {
    std::string label;
    std::vector<cudaEvent_t> events;
    std::vector<std::string> names;
  };
  struct Log {
    std::mutex mu;
    std::vector<Call> pending;
    std::vector<cudaEvent_t> free_events;  // reused; never destroyed (process lifetime)
  };
  static Log& GetLog() {
    static Log log;
    return log;
  }
  void Record(const char* name) {
    cudaEvent_t e = nullptr;
    {
      Log& log = GetLog();
      std::lock_guard<std::mutex> lock(log.mu);
      if (!log.free_events.empty()) {
        e = log.free_events.back();
        log.free_events.pop_back();
      }
    }
    if (e == nullptr && cudaEventCreate(&e) != cudaSuccess) {
      on_ = false;  // a diagnostic only: give up on this call, never fail the op
      return;
    }
    call_.events.push_back(e);
    if (cudaEventRecord(e, stream_) != cudaSuccess) {
      on_ = false;
      return;
    }
    call_.names.push_back(name != nullptr ? name : "");
  }

  bool on_;
  cudaStream_t stream_;
  Call call_;
};

// Bytes of the fp32 dQ accumulator: [B·T, H, D], or for the warp-specialised kernel the blocked
// layout with T padded to a multiple of 64.
size_t BwdDqAccBytes(BwdPath path, int64_t batch, int64_t seq, int64_t heads, int64_t head_dim) {
  const int64_t rows = IsWsPath(path) ? (seq + 63) / 64 * 64 : seq;
  return static_cast<size_t>(batch * rows * heads * head_dim) * sizeof(float);
}

template <int kD>
CudaResult LaunchBackward(const BwdParams& p, const AttentionBackwardArgs& a, int64_t batch,
                          int64_t kv_heads, bf16* dq, const InvRope& rope, int* dq_turns,
                          int* dq_tickets, PhaseRecorder* phases, cudaStream_t stream) {
  const int64_t rows_heads = batch * p.seq * p.heads;
  const BwdPath path = BackwardPath();
  const bool blocked = IsWsPath(path);
  if (dq_tickets != nullptr) {  // the D 128 ws backward: dq_acc is not zeroed
    CUDA_RETURN_IF_NOT_OK(LaunchAttentionBackwardStorePrep(
        a.out, a.dout, const_cast<float*>(p.dvec), rows_heads, p.seq, p.heads, dq_tickets,
        BwdStoreTicketCount(batch, p.heads, p.seq), stream));
  } else {
    const int64_t prep_threads = rows_heads * (kD / 8);
    attn_bwd_prep_kernel<kD>
        <<<static_cast<unsigned>((prep_threads + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
            a.out, a.dout, const_cast<float*>(p.dvec), p.dq_acc, rows_heads, p.seq, p.heads,
            blocked ? BwdWsDqBlockCols(kD) : 0);
    CUDA_RETURN_IF_LAUNCH_ERROR("attn_bwd_prep_kernel");
  }
  phases->Mark("prep");
  if (path == BwdPath::kWs) {
    WgmmaBwdParams w{};
    w.q = p.q;
    w.k = p.k;
    w.v = p.v;
    w.dout = p.dout;
    w.lse = p.lse;
    w.dvec = p.dvec;
    w.dq_acc = p.dq_acc;
    w.dk = p.dk;
    w.dv = p.dv;
    w.q_stride = p.q_stride;
    w.kv_stride = p.kv_stride;
    w.seq = p.seq;
    w.heads = p.heads;
    w.group = p.group;
    w.scale = p.scale;
    w.scale_log2 = p.scale_log2;
    w.rope_cos = rope.cos;
    w.rope_sin = rope.sin;
    w.rope_half = rope.half;
    if (dq_turns != nullptr) {
      CUDA_RETURN_IF_NOT_OK(LaunchAttentionBackwardWgmmaDeterministic(w, batch, kv_heads, kD,
                                                                      dq_turns, stream));
    } else if constexpr (kD == 128) {
      CUDA_RETURN_IF_NOT_OK(
          LaunchAttentionBackwardWgmmaStore(w, batch, kv_heads, dq_tickets, stream));
    } else {
      CUDA_RETURN_IF_NOT_OK(LaunchAttentionBackwardWgmmaQ128(w, batch, kv_heads, stream));
    }
  } else {
    constexpr int smem = BwdSmemBytes<kD>();
    const dim3 grid((p.seq + kBwdN - 1) / kBwdN, static_cast<unsigned>(kv_heads),
                    static_cast<unsigned>(batch));
    CUDA_RETURN_IF_NOT_OK(SetSmem(attn_bwd_kernel<kD>, smem));
    attn_bwd_kernel<kD><<<grid, kThreads, smem, stream>>>(p);
    CUDA_RETURN_IF_LAUNCH_ERROR("attn_bwd_kernel");
    if (rope.half > 0) {
      phases->Mark("main");
      CUDA_RETURN_IF_NOT_OK(LaunchRopeRows<kD>(p.dk, p.dk, p.kv_stride, batch * p.seq,
                                               static_cast<int>(kv_heads), p.seq, rope, -1.f,
                                               stream));
      phases->Mark("dk_rope");
    }
  }
  if (path == BwdPath::kWs || rope.half == 0) phases->Mark("main");
  const int items_per_rh = rope.half / 8 + (kD - 2 * rope.half) / 8;
  const int64_t items = rows_heads * items_per_rh;
  attn_bwd_dq_kernel<kD>
      <<<static_cast<unsigned>((items + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
          p.dq_acc, dq, p.q_stride, p.heads, p.seq, blocked ? BwdWsDqBlockCols(kD) : 0, items,
          items_per_rh, p.scale, rope);
  CUDA_RETURN_IF_LAUNCH_ERROR("attn_bwd_dq_kernel");
  phases->Mark("dq");
  return {};
}

// Forward kernel choice: the Hopper wgmma kernel (attention_wgmma.cu) or the mma.sync kernel
// above. Defaults per kind (plain / SelfExtend) are the faster path that passed
// attention_gpu_test on the device (bench/RESULTS.md); GYRE_ATTN_FWD and GYRE_ATTN_SE_FWD
// ("ws": warp-specialised wgmma, "mma": mma.sync) override them, read once per process, for
// tests and benchmarks. (The two-warpgroup wgmma forward with block barriers, 1.25x slower than
// "ws", was removed in session 5.)
enum class FwdPath { kMma, kWgmmaWs };
constexpr FwdPath kDefaultPlainPath = FwdPath::kWgmmaWs;
constexpr FwdPath kDefaultSelfExtendPath = FwdPath::kWgmmaWs;

FwdPath PathFromEnv(const char* name, FwdPath fallback) {
  const char* value = std::getenv(name);
  if (value == nullptr) return fallback;
  if (std::strcmp(value, "mma") == 0) return FwdPath::kMma;
  if (std::strcmp(value, "ws") == 0) return FwdPath::kWgmmaWs;
  return fallback;
}

FwdPath ForwardPath(bool self_extend) {
  static const FwdPath plain = PathFromEnv("GYRE_ATTN_FWD", kDefaultPlainPath);
  static const FwdPath se = PathFromEnv("GYRE_ATTN_SE_FWD", kDefaultSelfExtendPath);
  return self_extend ? se : plain;
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
  InvRope rope;
  CUDA_RETURN_IF_NOT_OK(RopeFromTable(args.rope, s, "AttentionForward", &rope));
  if (rope.half > 0 && (se || args.q_rotated == nullptr || !Aligned16(args.q_rotated))) {
    return InvalidArgument(
        "AttentionForward: the fused RoPE needs a 16-byte-aligned q_rotated and no SelfExtend");
  }
  FwdParams p{};
  p.q = args.q;
  p.k = args.k;
  p.v = args.v;
  p.qg = args.q_grouped;
  p.kg = args.k_grouped;
  p.out = args.out;
  p.lse = args.lse;
  p.q_stride = static_cast<int>(q_stride);
  p.kv_stride = static_cast<int>(kv_stride);
  p.seq = static_cast<int>(s.seq);
  p.heads = static_cast<int>(s.heads);
  p.group = static_cast<int>(s.heads / s.kv_heads);
  p.scale = args.softmax_scale != 0.f ? args.softmax_scale
                                      : static_cast<float>(1.0 / std::sqrt(double(s.head_dim)));
  p.scale_log2 = p.scale * kLog2e;
  // With T <= W every pair is a neighbour pair: the plain kernel computes exactly that.
  const bool use_se = se && args.self_extend_window < s.seq;
  p.se_window = static_cast<int>(use_se ? args.self_extend_window : 0);
  const FwdPath path = ForwardPath(use_se);
  PhaseRecorder phases(use_se ? "fwd_se" : "fwd", s, q_stride, kv_stride, rope.half > 0, false,
                       stream);
  if (path != FwdPath::kMma) {
    WgmmaFwdParams w{};
    w.q = p.q;
    w.k = p.k;
    w.v = p.v;
    w.qg = p.qg;
    w.kg = p.kg;
    w.out = p.out;
    w.lse = p.lse;
    w.q_stride = p.q_stride;
    w.kv_stride = p.kv_stride;
    w.seq = p.seq;
    w.heads = p.heads;
    w.group = p.group;
    w.scale = p.scale;
    w.scale_log2 = p.scale_log2;
    w.se_window = p.se_window;
    w.rope_cos = rope.cos;
    w.rope_sin = rope.sin;
    w.rope_half = rope.half;
    w.q_rot = args.q_rotated;
    w.q_rot_copy_rest = rope.half > 0 && 2 * rope.half < s.head_dim && args.q_rotated != args.q;
    const CudaResult r =
        LaunchAttentionForwardWgmma(w, s.batch, static_cast<int>(s.head_dim), use_se, stream);
    phases.Mark("main");
    return r;
  }
  if (rope.half > 0) {  // the mma.sync kernel reads q_rotated, rotated by a separate pass
    const int64_t rows = s.batch * s.seq;
    if (args.q_rotated != args.q && 2 * rope.half < s.head_dim) {  // features R.. pass through
      CUDA_RETURN_IF_ERROR(cudaMemcpy2DAsync(args.q_rotated, q_stride * sizeof(bf16), args.q,
                                             q_stride * sizeof(bf16),
                                             s.heads * s.head_dim * sizeof(bf16), rows,
                                             cudaMemcpyDeviceToDevice, stream));
    }
    CUDA_RETURN_IF_NOT_OK(
        s.head_dim == 64
            ? LaunchRopeRows<64>(args.q, args.q_rotated, q_stride, rows, p.heads, p.seq, rope,
                                 1.f, stream)
            : LaunchRopeRows<128>(args.q, args.q_rotated, q_stride, rows, p.heads, p.seq, rope,
                                  1.f, stream));
    p.q = args.q_rotated;
    phases.Mark("q_rope");
  }
  const CudaResult r = s.head_dim == 64
                           ? (use_se ? LaunchForward<64, true>(p, s.batch, stream)
                                     : LaunchForward<64, false>(p, s.batch, stream))
                           : (use_se ? LaunchForward<128, true>(p, s.batch, stream)
                                     : LaunchForward<128, false>(p, s.batch, stream));
  phases.Mark("main");
  return r;
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
  const DetMode det_override = DeterministicOverride();
  if (det_override == DetMode::kUnknown) {
    return InvalidArgument(std::string("GYRE_ATTN_DETERMINISTIC must be 0 or 1, got '") +
                           std::getenv("GYRE_ATTN_DETERMINISTIC") + "'");
  }
  const bool deterministic =
      det_override == DetMode::kArgs ? args.deterministic : det_override == DetMode::kOn;
  if (deterministic && !IsWsPath(BackwardPath())) {
    return InvalidArgument(
        "AttentionBackward: the deterministic backward needs the ws backward (GYRE_ATTN_BWD=mma "
        "adds dQ with atomics in no fixed order)");
  }
  const int64_t rows_heads = s.batch * s.seq * s.heads;
  PhaseRecorder phases("bwd", s, q_stride, kv_stride, args.rope != nullptr, deterministic, stream);
  DeviceBuffer dq_acc, dvec, dq_turns, dq_tickets;
  if (deterministic) {
    const size_t bytes = static_cast<size_t>(BwdDetTurnCount(s.batch, s.heads, s.seq)) * sizeof(int);
    CUDA_RETURN_IF_NOT_OK(alloc->Allocate(bytes, &dq_turns));
    CUDA_RETURN_IF_ERROR(cudaMemsetAsync(dq_turns.as<int>(), 0, bytes, stream));
  } else if (s.head_dim == 128 && BackwardPath() == BwdPath::kWs) {
    // The D 128 ws backward's tickets (attention_bwd_store.cu), zeroed by its prep kernel.
    const size_t bytes =
        static_cast<size_t>(BwdStoreTicketCount(s.batch, s.heads, s.seq)) * sizeof(int);
    CUDA_RETURN_IF_NOT_OK(alloc->Allocate(bytes, &dq_tickets));
  }
  CUDA_RETURN_IF_NOT_OK(alloc->Allocate(
      BwdDqAccBytes(BackwardPath(), s.batch, s.seq, s.heads, s.head_dim),
      &dq_acc));
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
  p.q_stride = static_cast<int>(q_stride);
  p.kv_stride = static_cast<int>(kv_stride);
  p.seq = static_cast<int>(s.seq);
  p.heads = static_cast<int>(s.heads);
  p.group = static_cast<int>(s.heads / s.kv_heads);
  p.scale = args.softmax_scale != 0.f ? args.softmax_scale
                                      : static_cast<float>(1.0 / std::sqrt(double(s.head_dim)));
  p.scale_log2 = p.scale * kLog2e;
  InvRope rope;
  CUDA_RETURN_IF_NOT_OK(RopeFromTable(args.rope, s, "AttentionBackward", &rope));
  // Scratch returns to the allocator when this function returns; the kernels that use it are
  // ordered before any later user of the block on the same stream (allocator contract).
  if (s.head_dim == 64) {
    return LaunchBackward<64>(p, args, s.batch, s.kv_heads, args.dq, rope, dq_turns.as<int>(),
                              nullptr, &phases, stream);
  }
  return LaunchBackward<128>(p, args, s.batch, s.kv_heads, args.dq, rope, dq_turns.as<int>(),
                             dq_tickets.as<int>(), &phases, stream);
}

}  // namespace gyre::cuda
