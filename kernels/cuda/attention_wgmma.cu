// Causal attention on Hopper tensor cores (wgmma, sm_90a), selected by attention.cu (see the
// kernel-choice table there). API and math: attention.h. Two kernels, both FlashAttention-3
// structured (a TMA producer warpgroup, mbarrier rings, two consumer warpgroups):
//   attn_fwd_ws_kernel      forward, plain and SelfExtend (described above it)
//   attn_bwd_ws_kernel      backward main kernel (described above it)
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
#include "kernels/cuda/attention_wgmma.h"

#include <cuda.h>          // CUtensorMap (the encoder comes through cudaGetDriverEntryPoint)
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstdlib>
#include <string>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/hopper_mma.cuh"
#include "kernels/cuda/tensor_map.h"

namespace gyre::cuda {
namespace {

// The swizzled tile layout, descriptors, fences and shared-operand wgmma wrappers are
// kernels/cuda/hopper_mma.cuh's (shared with the mLSTM kernels). The register-A wrappers below
// stay here: they pass scale-d as a predicate formed by setp, hopper_mma.cuh's as an immediate.
using namespace hopper;
using bf16 = __nv_bfloat16;

constexpr int kWgM = 128, kWgN = 128;
constexpr float kLog2eF = 1.4426950408889634f;

// 2^x with denormal results flushed to zero (ex2.approx.ftz: one MUFU op, no denormal fix-up;
// probabilities below 2^-126 become 0). Exp2(−inf) = 0.
__device__ __forceinline__ float Exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ uint32_t PackBf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// d[0..64) += A·B, m64n128k16, A (bf16 pairs) in registers, B N-major in shared memory.
__device__ __forceinline__ void WgmmaRS128(float (&d)[64], const uint32_t (&a)[4],
                                          uint64_t desc_b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, {%64,%65,%66,%67}, %68, p, 1, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "n"(1));
}

// d[0..32) (+)= A·B, m64n64k16, A (bf16 pairs) in registers, B from shared memory (kTransB:
// N-major, otherwise K-major); `accumulate` 0 overwrites d.
template <int kTransB>
__device__ __forceinline__ void WgmmaRS64Acc(float (&d)[32], const uint32_t (&a)[4],
                                             uint64_t desc_b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, {%32,%33,%34,%35}, %36, p, 1, 1, %38;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate), "n"(kTransB));
}

// d[0..32) += A·B, m64n64k16, A (bf16 pairs) in registers, B N-major in shared memory.
__device__ __forceinline__ void WgmmaRS64(float (&d)[32], const uint32_t (&a)[4],
                                          uint64_t desc_b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, {%32,%33,%34,%35}, %36, p, 1, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "n"(1));
}




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

__device__ __forceinline__ void MbarInit(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void MbarArrive(uint32_t bar) {
  asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" ::"r"(bar)
               : "memory");
}
__device__ __forceinline__ void MbarWait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (done == 0);
}
__device__ __forceinline__ void NamedBarSync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void NamedBarArrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

__device__ __forceinline__ void MbarArriveExpectTx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}
// One TMA tile load (4-d map: columns, heads, rows, batch) into shared memory; completes `bar`'s
// transaction bytes. `map` is the address of a __grid_constant__ kernel parameter.
__device__ __forceinline__ void TmaLoad4d(uint32_t dst, const CUtensorMap* map, uint32_t bar,
                                          int col, int head, int row, int batch) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4, %5, %6}], [%2];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(col), "r"(head), "r"(row), "r"(batch)
      : "memory");
}

// Block order of the causal kernels: longest blocks first inside groups of `head_group`
// (batch, head) pairs, groups one after another. Head-major order (head_group 1) leaves the
// last head's long blocks for the end of the grid (tail); one grid-wide longest-first order
// spreads every wave over all heads, so K / V no longer stay in L2 (RESULTS.md attn4: 1.3x
// slower forward at S2048). Groups sized to L2 keep the reuse and cut the tail.
// Returns the length rank (0 = longest) and the (batch, head) index of linear block `linear`.
__device__ __forceinline__ void GroupedBlockOrder(int linear, int blocks_per_head, int pairs,
                                                  int head_group, int& rank, int& pair) {
  const int per_group = head_group * blocks_per_head;
  const int group = linear / per_group;
  const int r = linear - group * per_group;
  const int n = min(head_group, pairs - group * head_group);
  rank = r / n;
  pair = group * head_group + (r - rank * n);
}

// Fused RoPE of Q in the plain forward (WgmmaFwdParams::rope_half > 0): consumer warpgroup
// `cwg` rotates its own 64 rows of the block's Q tile in shared memory once, after the tile
// landed (q_full) and before its first S GEMM, and writes them to q_rot for the backward (a row
// is read and written by this block only, so q_rot may be q). Items are (row, 16-byte chunk
// c < R/16): chunk c pairs with chunk c + R/16 (features f, f + R/2); rope.cu's forward math
// (y1 = x1 cos − x2 sin, y2 = x2 cos + x1 sin in fp32, one rounding to bf16). The table rows are
// loaded before the wait, so their latency hides under the Q copy. Rows past T (zeros) stay.
// With R < D and q_rot != q the features R.. are copied to q_rot as they are.
template <int kD>
__device__ __forceinline__ void RopeOwnQRows(const WgmmaFwdParams& p, unsigned char* sq, int cwg,
                                             int pos0, int64_t row_base, int h, int wtid,
                                             uint32_t q_full) {
  constexpr int kItems = kD / 32;  // (64 rows x kD/16 chunk pairs) / 128 threads, at R = kD
  const int pairs = p.rope_half / 8;
  float cs[kItems][8], sn[kItems][8];
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const int i = wtid + 128 * j, r = i / pairs, c = i % pairs, pos = pos0 + r;
    if (r < 64 && pos < p.seq) {
      const float4* cp = reinterpret_cast<const float4*>(
          p.rope_cos + static_cast<int64_t>(pos) * p.rope_half + 8 * c);
      const float4* sp = reinterpret_cast<const float4*>(
          p.rope_sin + static_cast<int64_t>(pos) * p.rope_half + 8 * c);
      const float4 c0 = __ldg(cp), c1 = __ldg(cp + 1), s0 = __ldg(sp), s1 = __ldg(sp + 1);
      cs[j][0] = c0.x; cs[j][1] = c0.y; cs[j][2] = c0.z; cs[j][3] = c0.w;
      cs[j][4] = c1.x; cs[j][5] = c1.y; cs[j][6] = c1.z; cs[j][7] = c1.w;
      sn[j][0] = s0.x; sn[j][1] = s0.y; sn[j][2] = s0.z; sn[j][3] = s0.w;
      sn[j][4] = s1.x; sn[j][5] = s1.y; sn[j][6] = s1.z; sn[j][7] = s1.w;
    }
  }
  MbarWait(q_full, 0);
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const int i = wtid + 128 * j, r = i / pairs, c = i % pairs, pos = pos0 + r;
    if (r < 64 && pos < p.seq) {
      uint4* a = reinterpret_cast<uint4*>(sq + Sw128ChunkOffset<kWgM>(64 * cwg + r, c));
      uint4* b = reinterpret_cast<uint4*>(sq + Sw128ChunkOffset<kWgM>(64 * cwg + r, c + pairs));
      uint4 va = *a, vb = *b;
      uint32_t* wa = reinterpret_cast<uint32_t*>(&va);
      uint32_t* wb = reinterpret_cast<uint32_t*>(&vb);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const float2 x1 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&wa[k]));
        const float2 x2 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&wb[k]));
        const float c0 = cs[j][2 * k], c1 = cs[j][2 * k + 1];
        const float s0 = sn[j][2 * k], s1 = sn[j][2 * k + 1];
        wa[k] = PackBf16(x1.x * c0 - x2.x * s0, x1.y * c1 - x2.y * s1);
        wb[k] = PackBf16(x2.x * c0 + x1.x * s0, x2.y * c1 + x1.y * s1);
      }
      *a = va;
      *b = vb;
      bf16* dst = p.q_rot + (row_base + pos) * p.q_stride + h * kD + 8 * c;
      *reinterpret_cast<uint4*>(dst) = va;
      *reinterpret_cast<uint4*>(dst + p.rope_half) = vb;
    }
  }
  if (p.q_rot_copy_rest) {  // R < D into a separate buffer: features R.. pass through
    const int rest = kD / 8 - 2 * pairs;
    for (int i = wtid; i < 64 * rest; i += 128) {
      const int r = i / rest, c = 2 * pairs + i % rest, pos = pos0 + r;
      if (pos < p.seq) {
        *reinterpret_cast<uint4*>(p.q_rot + (row_base + pos) * p.q_stride + h * kD + 8 * c) =
            *reinterpret_cast<const uint4*>(sq + Sw128ChunkOffset<kWgM>(64 * cwg + r, c));
      }
    }
  }
  FenceProxyAsync();            // the generic-proxy stores before the wgmmas (async proxy) read them
  NamedBarSync(3 + cwg, 128);   // this warpgroup's 64 rows rotated
}

constexpr int kWsThreads = 384;

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
      MbarInit(k_full(s), 1);
      MbarInit(v_full(s), 1);
      MbarInit(k_empty(s), 256);
      MbarInit(v_empty(s), 256);
    }
    MbarInit(q_full, 1);
    MbarInit(qg_full, 1);
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
        TmaLoad4d(dst + cb * kWgN * 128, map, bar, 64 * cb, head, row0, b);
      }
    };
    auto load_k = [&](int u) {
      const int s = u & 1, t = tile_of(u);
      MbarWait(k_empty(s), ((u >> 1) & 1) ^ 1);
      const bool band = is_band(t);
      if (band && u > 0 && is_band(tile_of(u - 1))) {  // the K_g band buffer: S_g(u − 1) done
        MbarWait(k_empty(s ^ 1), ((u - 1) >> 1) & 1);
      }
      MbarArriveExpectTx(k_full(s), kKVBytes * (band ? 2 : 1));
      tile(sK(s), is_far_only(t) ? &maps.kg : &maps.k, k_full(s), hk, t * kWgN);
      if (band) tile(sKgBand, &maps.kg, k_full(s), hk, t * kWgN);
    };
    auto load_q = [&] {
      MbarArriveExpectTx(q_full, kQBytes);
      tile(sQ, &maps.q, q_full, h, m0);
    };
    auto load_qg = [&] {
      MbarArriveExpectTx(qg_full, kQBytes);
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
      MbarWait(v_empty(s), ((u >> 1) & 1) ^ 1);
      MbarArriveExpectTx(v_full(s), kKVBytes);
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
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      float mx = row_max[hr];
#pragma unroll
      for (int c = 0; c < kWgN / 8; ++c) mx = fmaxf(mx, fmaxf(s[4 * c + 2 * hr], s[4 * c + 2 * hr + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float msc = mx == -INFINITY ? 0.f : mx * p.scale_log2;
      corr[hr] = Exp2(row_max[hr] * p.scale_log2 - msc);
      row_max[hr] = mx;
      float sum = 0.f;
#pragma unroll
      for (int c = 0; c < kWgN / 8; ++c)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float& x = s[4 * c + 2 * hr + e];
          x = Exp2(fmaf(x, p.scale_log2, -msc));
          sum += x;
        }
      row_sum[hr] = row_sum[hr] * corr[hr] + sum;
    }
  };
  auto pack_p = [&]() {
#pragma unroll
    for (int kk = 0; kk < kWgN / 16; ++kk) {
      pa[kk][0] = PackBf16(s[8 * kk + 0], s[8 * kk + 1]);
      pa[kk][1] = PackBf16(s[8 * kk + 2], s[8 * kk + 3]);
      pa[kk][2] = PackBf16(s[8 * kk + 4], s[8 * kk + 5]);
      pa[kk][3] = PackBf16(s[8 * kk + 6], s[8 * kk + 7]);
    }
  };
  auto rescale_o = [&](const float (&corr)[2]) {
#pragma unroll
    for (int c = 0; c < kDT; ++c) {
      o[4 * c] *= corr[0];
      o[4 * c + 1] *= corr[0];
      o[4 * c + 2] *= corr[1];
      o[4 * c + 3] *= corr[1];
    }
  };

  // Step 0: S only (a band tile: S, then S_g).
  {
    const int t = tile_of(0);
    const bool far = is_far_only(t), band = is_band(t);
    if constexpr (kSE) {
      if (far || band) MbarWait(qg_full, 0);
    }
    if constexpr (!kSE) {
      if (p.rope_half > 0) {
        RopeOwnQRows<kD>(p, base_ptr + (sQ - base), cwg, m0 + 64 * cwg, row_base, h, wtid,
                         q_full);
      } else {
        MbarWait(q_full, 0);
      }
    } else if (!far) {
      MbarWait(q_full, 0);
    }
    MbarWait(k_full(0), 0);
    NamedBarSync(my_turn, 256);
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
    MbarArrive(k_empty(0));
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
    if (n_plain_steps > 1) MbarWait(q_full, 0);
  }
  for (; u < n_plain_steps; ++u) {
    const int t = tile_of(u);
    MbarWait(k_full(u & 1), (u >> 1) & 1);
    MbarWait(v_full((u - 1) & 1), ((u - 1) >> 1) & 1);
    NamedBarSync(my_turn, 256);
    WgmmaFence();
    issue_scores(s, (is_far_only(t) ? sQg : sQ) + own_rows, sK(u & 1));
    issue_pv(u - 1);
    if (!(cwg == 1 && u == total - 1)) NamedBarArrive(other_turn, 256);
    WgmmaWait<1>();  // S(u) done; P(u − 1)V(u − 1) may still run
    FenceRegs(s);
    MbarArrive(k_empty(u & 1));
    float corr[2];
    softmax(t, corr);
    WgmmaWait<0>();
    FenceRegs(o);
    FenceRegs(pa);
    MbarArrive(v_empty((u - 1) & 1));
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
      MbarWait(q_full, 0);
      MbarWait(qg_full, 0);
    }
    for (; u < total; ++u) {
      const int t = tile_of(u);
      MbarWait(k_full(u & 1), (u >> 1) & 1);
      MbarWait(v_full((u - 1) & 1), ((u - 1) >> 1) & 1);
      NamedBarSync(my_turn, 256);
      WgmmaFence();
      issue_pv(u - 1);
      WgmmaWait<0>();
      FenceRegs(o);
      FenceRegs(pa);
      MbarArrive(v_empty((u - 1) & 1));
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
      MbarArrive(k_empty(u & 1));
      float corr[2];
      softmax(t, corr);
      rescale_o(corr);
      pack_p();
    }
  }
  MbarWait(v_full((total - 1) & 1), ((total - 1) >> 1) & 1);
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
  NamedBarSync(3 + cwg, 128);
#pragma unroll
  for (int c = 0; c < kDT; ++c)
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int r = 64 * cwg + 16 * warp_in_wg + g + 8 * hr;
      *reinterpret_cast<uint32_t*>(base_ptr + Sw128Offset<kWgM>(r, 8 * c + 2 * tq)) =
          PackBf16(o[4 * c + 2 * hr], o[4 * c + 2 * hr + 1]);
    }
  NamedBarSync(3 + cwg, 128);
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

// (batch, head) pairs per group of GroupedBlockOrder: as many as keep `bytes_per_pair` (what
// the blocks of one pair read repeatedly: K and V in the forward) within kOrderL2Budget (a third
// of the H100's 50 MB L2), so a group's blocks share them in L2 while the group runs longest
// first. Measured against head-major order (H100, RESULTS.md attn5): forward 4-6%, backward
// 3-5% faster; 32 heads per group at B2 S8192 (4 MB each) was 10% slower than 4 (L2 misses).
constexpr int64_t kOrderL2Budget = int64_t{16} << 20;
int HeadGroup(int64_t bytes_per_pair, int64_t pairs) {
  const int64_t n = kOrderL2Budget / std::max<int64_t>(bytes_per_pair, 1);
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(n, 1), pairs));
}

// Map of a [B, T, heads, D] bf16 view with `row_stride` elements per (b, t) row: box of 64
// columns x `box_rows` rows of one head, 128-byte swizzle, zeros past T.
CudaResult EncodeRowsMap(CUtensorMap* map, const bf16* base, int head_dim, int heads, int seq,
                         int64_t batch, int row_stride, int box_rows) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = TensorMapEncoder();
  if (encode == nullptr) return {1, "cuTensorMapEncodeTiled: not found in the driver"};
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(head_dim), static_cast<cuuint64_t>(heads),
                              static_cast<cuuint64_t>(seq), static_cast<cuuint64_t>(batch)};
  const cuuint64_t strides[3] = {static_cast<cuuint64_t>(head_dim) * 2,
                                 static_cast<cuuint64_t>(row_stride) * 2,
                                 static_cast<cuuint64_t>(row_stride) * 2 * seq};
  const cuuint32_t box[4] = {64, 1, static_cast<cuuint32_t>(box_rows), 1};
  const cuuint32_t elem_strides[4] = {1, 1, 1, 1};
  const CUresult r = encode(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 4, const_cast<bf16*>(base),
                            dims, strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                            CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    return {static_cast<int>(r), "cuTensorMapEncodeTiled failed (error " + std::to_string(r) + ")"};
  }
  return {};
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

// ------------------------------------------------------------------------------------------
// Backward main kernel, FlashAttention-3 structure: attn_bwd_ws_kernel<D>, grid
// (ceil(T/128), Hk, B) in GroupedBlockOrder, 384 threads = a producer warpgroup and two
// consumer warpgroups, one block per SM. A block owns 128 keys of one kv head (K, V resident in shared memory); consumer
// warpgroup c owns keys 64c..64c+63 and accumulates their dK, dV in registers (fp32) over every
// query head of the GQA group and every 64-row query tile at or below the diagonal.
//   Producer (24 registers after setmaxnreg; consumers 240): K, V once, then per query tile
//     Q, dO (TMA, issued by one thread) and lse, D_i (fp32 rows, one 4-byte cp.async per
//     thread) into a 3-deep ring (kBwdStages; 2 stages measured 1-4% slower); a stage's `full`
//     mbarrier completes when the TMA bytes and the 128 cp.async arrivals (.noinc, no wait)
//     are in; it is reused after both consumer warpgroups arrived on its `empty` mbarrier. No
//     block-wide barrier. (TMA vs the earlier cp.async producer with a wait per stage: 0.95 vs
//     0.99 ms at B8 S2048 D128, 3.00 vs 3.16 at B2 S8192, equal at D 64; H100, attn5.)
//   Consumer, per query tile (all GEMMs wgmma; S and dP in separate commit groups so the
//   exponentials of P run under dP's GEMM; dV's and dK's GEMMs run under the dSᵀ stores):
//     Sᵀ = K_c Qᵀ, dPᵀ = V_c dOᵀ            m64n64k16 x D/16 each, operands in smem (D 64:
//                                           K_c, V_c as A fragments in registers, loaded once)
//     Pᵀ = exp2(Sᵀ·scale·log2e − lse·log2e), dSᵀ = Pᵀ ∘ (dPᵀ − D)          (fp32 registers)
//     dV_c += Pᵀ dO, dK_c += dSᵀ Q          m64nDk16 x 4, A = Pᵀ / dSᵀ packed bf16 registers
//     dSᵀ -> shared memory (bf16, two buffers), then dQ:
//       column split (D 128): warpgroup c computes dQ[:, 64c..64c+63] = dS K over all 128
//         keys (m64n64, 32 accumulators), which needs both warpgroups' halves of dSᵀ. It does
//         so one tile late: in iteration it, after its own dSᵀ(it) is stored, it waits on the
//         `ds_full` mbarrier of dSᵀ(it − 1) (written an iteration ago unless the other
//         warpgroup lags by that much) and releases that buffer on `ds_empty`. The two
//         warpgroups thus drift freely (one's exponentials under the other's GEMMs) instead
//         of meeting on a named barrier once per tile: 8% faster at B8 S2048 D128 than the same
//         kernel with dQ(it) in iteration it (RESULTS.md, attn4);
//       key split (D 64): warpgroup c computes its partial dQ = dS_c K_c over its
//         own 64 keys (m64nD); the two warpgroups never wait for each other.
//     dQ tile (fp32) -> this warpgroup's shared-memory staging tile -> one bulk reduction
//       (cp.reduce.async.bulk .add.f32, issued by one thread) into dq_acc. dq_acc is blocked
//       for that: [B, H, ceil(T/64), parts, 64 rows, W] with W = D/2 (column split) or D, and
//       column c of row r stored at c ^ 8·(r % 4) (conflict-free fp32 fragment stores);
//       attention.cu's conversion kernel reads it back (BwdDqAccIndex).
// The prep (D_i) and dQ conversion kernels, and zeroing dq_acc, are attention.cu's.


__device__ __forceinline__ void BulkReduceAddF32(float* gdst, uint32_t ssrc, uint32_t bytes) {
  asm volatile(
      "cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(gdst),
      "r"(ssrc), "r"(bytes)
      : "memory");
  asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
}
__device__ __forceinline__ void BulkWaitRead0() {
  asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
}
__device__ __forceinline__ void BulkWait0() {
  asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
}

constexpr int kBwdStages = 3;  // Q / dO ring depth (2 measured 1-4% slower, RESULTS.md attn4)

// Where the dK epilogue's fused inverse RoPE takes its cos / sin table values from
// (GYRE_ATTN_ROPE_EARLY, read once in LaunchAttentionBackwardWgmmaMain):
//   kRopeLate ("0" / "late"): global loads after the last dQ reduction's wait, on every block's
//     exit path (attn9: main kernel 415.0 -> 426.2 us at B8 S2048 H12 D64);
//   kRopeRegs (unset, "1" / "regs"; the default since the lead's session-8 call on an H100:
//     backward at B8 S2048 H12 D64 491.4 -> 486.6 us, llama-125m step 64.30 -> 64.03 ms): the
//     same loads issued into registers before that wait (the reducer thread's wait and its loads
//     overlap instead of adding up).
//   Any other value: an error from AttentionBackward naming it.
constexpr int kRopeLate = 0, kRopeRegs = 1, kRopeUnknown = -1;

template <int kD>
struct BwdWsLayout {
  static constexpr bool kKeySplit = kD == 64;
  static constexpr int kKVBytes = 128 * kD * 2, kQBytes = 64 * kD * 2;
  static constexpr int kDSBytes = 128 * 64 * 2;
  static constexpr int kDqN = kKeySplit ? kD : kD / 2;  // dQ columns per consumer warpgroup
  static constexpr int kDqBytes = 64 * kDqN * 4;
  static constexpr int kK = 0, kV = kKVBytes, kQ = 2 * kKVBytes;
  static constexpr int kDO = kQ + kBwdStages * kQBytes;
  static constexpr int kDS = kDO + kBwdStages * kQBytes;      // [2] dSᵀ buffers
  static constexpr int kDQ = kDS + 2 * kDSBytes;              // [2] (one per consumer)
  static constexpr int kStats = kDQ + 2 * kDqBytes;           // [stages] lse[64], D[64]
  // full[stages], empty[stages], ds_full[2], ds_empty[2]
  static constexpr int kBars = kStats + kBwdStages * 512;
  static constexpr int kBytes = kBars + 8 * (2 * kBwdStages + 4) + 1024;  // + slack
  static_assert(kBytes <= 227 * 1024, "backward tiles exceed shared memory");
};

__device__ __forceinline__ void MbarExpectTx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}
// Arrives on `bar` once this thread's earlier cp.async copies have landed (the arrival counts
// against the barrier's initial count: .noinc).
__device__ __forceinline__ void CpAsyncMbarArrive(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}

// Fused inverse RoPE of the dK epilogue: the thread's features 8c + 2tq + e (c < kD/8, e < 2)
// of key row hr sit at acc[4c + 2hr + e]; feature f < R/2 pairs with f + R/2, i.e. chunk c with
// chunk c + kPairs (kPairs = R/16), the same thread. Rotation by −angle (rope.cu's backward):
// x1 = g1 cos + g2 sin, x2 = g2 cos − g1 sin; cos / sin point at the key's table row + 2tq.
template <int kD, int kPairs>
__device__ __forceinline__ void InverseRopeRow(float (&acc)[kD / 2], int hr, const float* cos_p,
                                               const float* sin_p) {
#pragma unroll
  for (int c = 0; c < kPairs; ++c) {
    const float2 cs = *reinterpret_cast<const float2*>(cos_p + 8 * c);
    const float2 sn = *reinterpret_cast<const float2*>(sin_p + 8 * c);
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const float co = e ? cs.y : cs.x, si = e ? sn.y : sn.x;
      float& g1 = acc[4 * c + 2 * hr + e];
      float& g2 = acc[4 * (c + kPairs) + 2 * hr + e];
      const float x1 = g1 * co + g2 * si, x2 = g2 * co - g1 * si;
      g1 = x1;
      g2 = x2;
    }
  }
}
// Picks the compile-time pairing for pairs = R/16 in [1, kD/16] (register indices must be
// static).
template <int kD, int kPairs = kD / 16>
__device__ __forceinline__ void InverseRopeDispatch(int pairs, float (&acc)[kD / 2], int hr,
                                                    const float* cos_p, const float* sin_p) {
  if (pairs == kPairs) {
    InverseRopeRow<kD, kPairs>(acc, hr, cos_p, sin_p);
  } else if constexpr (kPairs > 1) {
    InverseRopeDispatch<kD, kPairs - 1>(pairs, acc, hr, cos_p, sin_p);
  }
}

// kRopeRegs: the same rotation from table values already loaded: cs[c], sn[c] =
// cos / sin of features 8c + 2tq (+1) of the key.
template <int kD, int kPairs>
__device__ __forceinline__ void InverseRopeRowPre(float (&acc)[kD / 2], int hr,
                                                  const float2 (&cs)[kD / 16],
                                                  const float2 (&sn)[kD / 16]) {
#pragma unroll
  for (int c = 0; c < kPairs; ++c) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const float co = e ? cs[c].y : cs[c].x, si = e ? sn[c].y : sn[c].x;
      float& g1 = acc[4 * c + 2 * hr + e];
      float& g2 = acc[4 * (c + kPairs) + 2 * hr + e];
      const float x1 = g1 * co + g2 * si, x2 = g2 * co - g1 * si;
      g1 = x1;
      g2 = x2;
    }
  }
}
template <int kD, int kPairs = kD / 16>
__device__ __forceinline__ void InverseRopePreDispatch(int pairs, float (&acc)[kD / 2], int hr,
                                                       const float2 (&cs)[kD / 16],
                                                       const float2 (&sn)[kD / 16]) {
  if (pairs == kPairs) {
    InverseRopeRowPre<kD, kPairs>(acc, hr, cs, sn);
  } else if constexpr (kPairs > 1) {
    InverseRopePreDispatch<kD, kPairs - 1>(pairs, acc, hr, cs, sn);
  }
}

// Tensor maps of the backward's TMA loads (EncodeRowsMap): K, V boxes of 128 rows, Q, dO of 64.
struct BwdTmaMaps {
  CUtensorMap q, dout, k, v;
};

// The kernel body, shared by attn_bwd_ws_kernel (kRopeLate: without the fused RoPE, or
// GYRE_ATTN_ROPE_EARLY=0; its name and code as before) and attn_bwd_ws_rope_kernel (kRopeRegs).
template <int kD, int kRopeMode>
__device__ __forceinline__ void BwdWsBody(const WgmmaBwdParams& p, const BwdTmaMaps& maps,
                                          const int head_group) {
  using L = BwdWsLayout<kD>;
  // Key split only at D 64: at D 128 it would hold 64 more dQ accumulators per thread (ptxas:
  // the wgmmas serialise for lack of registers).
  constexpr bool kKeySplit = L::kKeySplit;
  // D 64: this warpgroup's 64 K and V rows as wgmma A fragments in registers (16 + 16 per
  // thread, loaded once per block), so Sᵀ and dPᵀ read only Qᵀ / dOᵀ from shared memory
  // (40.6M vs 46.6M shared wavefronts, main kernel 413 vs 428 µs at B8 S2048 H12, H200, attn8).
  // At D 128 the 64 registers do not fit (ptxas: 176-224 bytes of spills, wgmmas serialised).
  constexpr bool kKvRegs = kD == 64;
  constexpr int kBN = 128, kBM = 64;
  constexpr int kKBlock = kBN * 128, kQBlock = kBM * 128;  // bytes per 64-column block
  constexpr int kDT = kD / 8;
  constexpr int kDqN = L::kDqN;
  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw = SmemAddr(smem_raw);
  const uint32_t base = (raw + 1023u) & ~1023u;
  unsigned char* base_ptr = smem_raw + (base - raw);
  const uint32_t sK = base + L::kK, sV = base + L::kV;
  auto full_bar = [&](int s) { return base + L::kBars + 8 * s; };
  auto empty_bar = [&](int s) { return base + L::kBars + 8 * (kBwdStages + s); };
  auto ds_full = [&](int b) { return base + L::kBars + 8 * (2 * kBwdStages + b); };
  auto ds_empty = [&](int b) { return base + L::kBars + 8 * (2 * kBwdStages + 2 + b); };

  const int tid = threadIdx.x, wg = tid / 128, wtid = tid % 128;
  if (tid == 0) {
    for (int s = 0; s < kBwdStages; ++s) {
      MbarInit(full_bar(s), 128);
      MbarInit(empty_bar(s), 256);
    }
    for (int i = 0; i < 2; ++i) {
      MbarInit(ds_full(i), 256);
      MbarInit(ds_empty(i), 256);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  int n_block, pair;  // key block 0 has the most query tiles: rank 0 = n_block 0
  GroupedBlockOrder(blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z), gridDim.x,
                    gridDim.y * gridDim.z, head_group, n_block, pair);
  const int hk = pair % gridDim.y, b = pair / gridDim.y;
  const int seq = p.seq;
  const int n0 = n_block * kBN;
  const int64_t row_base = static_cast<int64_t>(b) * seq;
  const int m_first = n0 / kBM;
  const int m_tiles = (seq + kBM - 1) / kBM;
  const int per_head = m_tiles - m_first;
  const int total = p.group * per_head;

  if (wg == 0) {
    // ---------------------------------------------------------------- producer warpgroup
    // The block starts with 168 registers per thread (65536 / 384, rounded down to 8): the
    // consumers' setmaxnreg.inc can only take what the producer gives back, so 128 · 24 +
    // 256 · 240 <= 384 · 168 (otherwise setmaxnreg.inc waits forever).
    asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n" ::: "memory");
    // Thread 0 issues the tiles (TMA; K and V with stage 0 of the first tile) and registers
    // their bytes on the stage's `full` barrier; every thread copies one lse / D value with
    // cp.async and arrives when it landed, without waiting (128 arrivals + the bytes).
    auto tile = [&](uint32_t dst, const CUtensorMap* map, uint32_t bar, int head, int row0,
                    int rows) {
#pragma unroll
      for (int cb = 0; cb < kD / 64; ++cb) {
        TmaLoad4d(dst + cb * rows * 128, map, bar, 64 * cb, head, row0, b);
      }
    };
    for (int it = 0; it < total; ++it) {
      const int s = it % kBwdStages;
      MbarWait(empty_bar(s), ((it / kBwdStages) & 1) ^ 1);
      const int h = hk * p.group + it / per_head;
      const int m0 = (m_first + it % per_head) * kBM;
      if (wtid == 0) {
        MbarExpectTx(full_bar(s), 2 * L::kQBytes + (it == 0 ? 2 * L::kKVBytes : 0));
        if (it == 0) {
          tile(sK, &maps.k, full_bar(s), hk, n0, kBN);
          tile(sV, &maps.v, full_bar(s), hk, n0, kBN);
        }
        tile(base + L::kQ + s * L::kQBytes, &maps.q, full_bar(s), h, m0, kBM);
        tile(base + L::kDO + s * L::kQBytes, &maps.dout, full_bar(s), h, m0, kBM);
      }
      const int which = wtid / 64, r = wtid % 64;
      const bool valid = m0 + r < seq;
      const float* src = (which == 0 ? p.lse : p.dvec) +
                         (static_cast<int64_t>(b) * p.heads + h) * seq + (valid ? m0 + r : 0);
      asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(
                       base + L::kStats + s * 512 + wtid * 4),
                   "l"(src), "r"(valid ? 4 : 0));
      CpAsyncMbarArrive(full_bar(s));
    }
    return;
  }

  // ------------------------------------------------------------------ consumer warpgroups
  asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n" ::: "memory");
  const int cwg = wg - 1;
  const int warp_in_wg = wtid / 32, lane = tid % 32, g = lane / 4, tq = lane % 4;
  const int kw0 = n0 + 64 * cwg;                  // this warpgroup's first key
  const int key_lo = kw0 + 16 * warp_in_wg + g;   // thread keys key_lo, key_lo + 8
  const uint32_t sDQ = base + L::kDQ + cwg * L::kDqBytes;
  unsigned char* dq_stage = base_ptr + L::kDQ + cwg * L::kDqBytes;
  const int m_tiles_all = m_tiles;
  const bool reducer = wtid == 0;

  float dk[kD / 2], dv[kD / 2];
#pragma unroll
  for (int i = 0; i < kD / 2; ++i) dk[i] = dv[i] = 0.f;

  // Column split (D 128): dQ[:, 64c..64c+63] = dS K over all 128 keys of dSᵀ buffer `buf`;
  // A = dS (M-major: dSᵀ rows are keys), B = K rows (N-major).
  auto issue_dq_cols = [&](float (&dq)[kDqN / 2], uint32_t kb, int buf) {
    const uint32_t sdS = base + L::kDS + buf * L::kDSBytes;
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      const uint32_t row_off = 16 * kk * 128;
      WgmmaSS64<1, 1>(dq, SmemDescSw128(sdS + row_off, 64 * 128, 1024),
                      SmemDescSw128(kb + cwg * kKBlock + row_off, kKBlock, 1024), kk > 0);
    }
  };
  // dQ tile -> staging tile (fp32, row r column c at c ^ 8(r % 4)) -> one bulk reduction into
  // dq_acc's block of query tile m_tile of head h.
  auto reduce_dq = [&](const float (&dq)[kDqN / 2], int h, int m_tile) {
    if (reducer) BulkWaitRead0();  // the previous tile's reduction has read the staging tile
    NamedBarSync(3 + cwg, 128);
#pragma unroll
    for (int c = 0; c < kDqN / 8; ++c)
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const int r = 16 * warp_in_wg + g + 8 * hr;
        const int col = (8 * c + 2 * tq) ^ (8 * (r & 3));
        *reinterpret_cast<float2*>(dq_stage + (r * kDqN + col) * 4) =
            make_float2(dq[4 * c + 2 * hr], dq[4 * c + 2 * hr + 1]);
      }
    FenceProxyAsync();
    NamedBarSync(3 + cwg, 128);
    if (reducer) {
      constexpr int kParts = kD / kDqN;
      const int part = kKeySplit ? 0 : cwg;
      float* dst = p.dq_acc +
                   (((static_cast<int64_t>(b) * p.heads + h) * m_tiles_all + m_tile) * kParts +
                    part) * (64 * kDqN);
      BulkReduceAddF32(dst, sDQ, L::kDqBytes);
    }
  };

  constexpr int kFragSteps = kKvRegs ? kD / 16 : 1;
  uint32_t kfrag[kFragSteps][4], vfrag[kFragSteps][4];
  for (int it = 0; it < total; ++it) {
    const int h = hk * p.group + it / per_head;
    const int m_tile = m_first + it % per_head;
    const int m0 = m_tile * kBM;
    const int s = it % kBwdStages;
    const uint32_t sQ = base + L::kQ + s * L::kQBytes, sdO = base + L::kDO + s * L::kQBytes;
    const uint32_t sdS = base + L::kDS + (it & 1) * L::kDSBytes;
    const float* lse_s = reinterpret_cast<const float*>(base_ptr + L::kStats + s * 512);
    const float* d_s = lse_s + 64;
    MbarWait(full_bar(s), (it / kBwdStages) & 1);
    // Laundered per tile so that the compiler rebuilds the K / V descriptors from these bases
    // instead of hoisting 32 loop-invariant 64-bit descriptors into registers (spills).
    uint32_t kb = sK, vb = sV;
    asm volatile("" : "+r"(kb), "+r"(vb));

    float st[32], dpt[32];
    if constexpr (kKvRegs) {
      if (it == 0) {
        // A fragment of rows r (+8), columns 16kk + 2tq (+8) (mma.m16n8k16 A layout per warp).
        const int rl = 64 * cwg + 16 * warp_in_wg + g;
#pragma unroll
        for (int kk = 0; kk < kD / 16; ++kk)
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const uint32_t off =
                Sw128Offset<kBN>(rl + 8 * (j % 2), 16 * kk + 8 * (j / 2) + 2 * tq);
            kfrag[kk][j] = *reinterpret_cast<const uint32_t*>(base_ptr + L::kK + off);
            vfrag[kk][j] = *reinterpret_cast<const uint32_t*>(base_ptr + L::kV + off);
          }
      }
    }
    // Sᵀ = K_c Qᵀ (acc st) or dPᵀ = V_c dOᵀ (acc dpt): m64n64k16 x D/16.
    auto issue_scores = [&](float (&acc)[32], uint32_t kv, const uint32_t (&frag)[kFragSteps][4],
                            uint32_t sB) {
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk) {
        const uint32_t koff = (kk / 4) * kKBlock + 64 * cwg * 128 + (kk % 4) * 32;
        const uint32_t qoff = (kk / 4) * kQBlock + (kk % 4) * 32;
        if constexpr (kKvRegs) {
          WgmmaRS64Acc<0>(acc, frag[kk], SmemDescSw128(sB + qoff, 16, 1024), kk > 0);
        } else {
          WgmmaSS64<0, 0>(acc, SmemDescSw128(kv + koff, 16, 1024), SmemDescSw128(sB + qoff, 16, 1024),
                          kk > 0);
        }
      }
      WgmmaCommit();
    };
    WgmmaFence();
    issue_scores(st, kb, kfrag, sQ);
    issue_scores(dpt, vb, vfrag, sdO);
    WgmmaWait<1>();  // Sᵀ done; dPᵀ may still run
    FenceRegs(st);

    // Pᵀ; element (key_lo + 8hr, query m0 + 8c + 2tq + e) at index 4c + 2hr + e.
    const bool need_mask = (m0 < kw0 + 63) || (m0 + kBM > seq) || (kw0 + 64 > seq);
#pragma unroll
    for (int c = 0; c < kBM / 8; ++c) {
      const float2 l2 = *reinterpret_cast<const float2*>(lse_s + 8 * c + 2 * tq);
#pragma unroll
      for (int hr = 0; hr < 2; ++hr)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int i = 4 * c + 2 * hr + e;
          float pr = Exp2(fmaf(st[i], p.scale_log2, -(e ? l2.y : l2.x) * kLog2eF));
          if (need_mask) {
            const int q = m0 + 8 * c + 2 * tq + e, key = key_lo + 8 * hr;
            if (q < key || q >= seq || key >= seq) pr = 0.f;
          }
          st[i] = pr;
        }
    }
    WgmmaWait<0>();  // dPᵀ done
    FenceRegs(dpt);
#pragma unroll
    for (int c = 0; c < kBM / 8; ++c) {
      const float2 d2 = *reinterpret_cast<const float2*>(d_s + 8 * c + 2 * tq);
#pragma unroll
      for (int hr = 0; hr < 2; ++hr)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int i = 4 * c + 2 * hr + e;
          dpt[i] = st[i] * (dpt[i] - (e ? d2.y : d2.x));
        }
    }
    uint32_t pa[kBM / 16][4], da[kBM / 16][4];
#pragma unroll
    for (int kk = 0; kk < kBM / 16; ++kk) {
      pa[kk][0] = PackBf16(st[8 * kk + 0], st[8 * kk + 1]);
      pa[kk][1] = PackBf16(st[8 * kk + 2], st[8 * kk + 3]);
      pa[kk][2] = PackBf16(st[8 * kk + 4], st[8 * kk + 5]);
      pa[kk][3] = PackBf16(st[8 * kk + 6], st[8 * kk + 7]);
      da[kk][0] = PackBf16(dpt[8 * kk + 0], dpt[8 * kk + 1]);
      da[kk][1] = PackBf16(dpt[8 * kk + 2], dpt[8 * kk + 3]);
      da[kk][2] = PackBf16(dpt[8 * kk + 4], dpt[8 * kk + 5]);
      da[kk][3] = PackBf16(dpt[8 * kk + 6], dpt[8 * kk + 7]);
    }
    // dV += Pᵀ dO, dK += dSᵀ Q (k = 64 queries; B = dO / Q rows, N-major); they run under the
    // dSᵀ stores and the barrier below.
    WgmmaFence();
#pragma unroll
    for (int kk = 0; kk < kBM / 16; ++kk) {
      const uint64_t bo = SmemDescSw128(sdO + kk * 16 * 128, kQBlock, 1024);
      const uint64_t bq = SmemDescSw128(sQ + kk * 16 * 128, kQBlock, 1024);
      if constexpr (kD == 128) {
        WgmmaRS128(dv, pa[kk], bo);
        WgmmaRS128(dk, da[kk], bq);
      } else {
        WgmmaRS64(dv, pa[kk], bo);
        WgmmaRS64(dk, da[kk], bq);
      }
    }
    WgmmaCommit();
    // Column split: both warpgroups read dSᵀ(it − 2) (same buffer) in their dQ GEMMs.
    if constexpr (!kKeySplit) {
      if (it >= 2) MbarWait(ds_empty(it & 1), ((it >> 1) + 1) & 1);
    }
    // dSᵀ to shared memory (rows = keys 64c + 16·warp + g (+8), columns = queries).
#pragma unroll
    for (int kk = 0; kk < kBM / 16; ++kk)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int r = 64 * cwg + 16 * warp_in_wg + g + 8 * (j % 2);
        const int col = 16 * kk + 8 * (j / 2) + 2 * tq;
        *reinterpret_cast<uint32_t*>(base_ptr + (sdS - base) + Sw128Offset<kBN>(r, col)) =
            da[kk][j];
      }
    FenceProxyAsync();
    if constexpr (kKeySplit) {
      NamedBarSync(3 + cwg, 128);  // this warpgroup's 64 rows of dSᵀ written
      // dQ (partial over this warpgroup's keys) = dS_c K_c; A = dS (M-major: dSᵀ rows are
      // keys), B = K rows (N-major).
      float dq[kDqN / 2];
      WgmmaFence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        const uint32_t row_off = (64 * cwg + 16 * kk) * 128;
        WgmmaSS64<1, 1>(dq, SmemDescSw128(sdS + row_off, 64 * 128, 1024),
                        SmemDescSw128(kb + row_off, kKBlock, 1024), kk > 0);
      }
      WgmmaCommit();
      WgmmaWait<0>();
      FenceRegs(dq);
      FenceRegs(pa);
      FenceRegs(da);
      FenceRegs(dv);
      FenceRegs(dk);
      MbarArrive(empty_bar(s));  // Q, dO, lse, D of this stage are no longer read
      reduce_dq(dq, h, m_tile);
    } else {
      MbarArrive(ds_full(it & 1));  // this warpgroup's half of dSᵀ(it) is written
      if (it == 0) {
        WgmmaWait<0>();
        FenceRegs(pa);
        FenceRegs(da);
        FenceRegs(dv);
        FenceRegs(dk);
        MbarArrive(empty_bar(s));
      } else {
        // dQ of the previous tile: its dSᵀ halves were both written an iteration ago unless
        // the other warpgroup lags by that much, so the two warpgroups drift freely (one's
        // exponentials under the other's GEMMs) instead of meeting once per tile.
        const int pit = it - 1;
        MbarWait(ds_full(pit & 1), (pit >> 1) & 1);
        float dq[kDqN / 2];
        WgmmaFence();
        issue_dq_cols(dq, kb, pit & 1);
        WgmmaCommit();
        WgmmaWait<1>();  // dV, dK GEMMs (committed before dQ's) done
        FenceRegs(pa);
        FenceRegs(da);
        FenceRegs(dv);
        FenceRegs(dk);
        MbarArrive(empty_bar(s));  // Q, dO, lse, D of this stage are no longer read
        WgmmaWait<0>();
        FenceRegs(dq);
        MbarArrive(ds_empty(pit & 1));  // dSᵀ(pit) is no longer read
        reduce_dq(dq, hk * p.group + pit / per_head, m_first + pit % per_head);
      }
    }
  }
  if constexpr (!kKeySplit) {
    const int pit = total - 1;
    uint32_t kb = sK;
    asm volatile("" : "+r"(kb));
    MbarWait(ds_full(pit & 1), (pit >> 1) & 1);
    float dq[kDqN / 2];
    WgmmaFence();
    issue_dq_cols(dq, kb, pit & 1);
    WgmmaCommit();
    WgmmaWait<0>();
    FenceRegs(dq);
    reduce_dq(dq, hk * p.group + pit / per_head, m_first + pit % per_head);
  }
  if constexpr (kRopeMode == kRopeRegs) {
    // This thread's table values (2 keys x R/16 pairs x cos, sin float2: 32 registers at D 64,
    // 64 at D 128, with only dK, dV live), loaded before the reducer's wait so that the two
    // overlap instead of adding up on the block's exit path.
    float2 rcs[2][kD / 16], rsn[2][kD / 16];
    const int pairs = p.rope_half / 8;
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int64_t row = static_cast<int64_t>(key_lo + 8 * hr < seq ? key_lo + 8 * hr : 0);
      const float* cp = p.rope_cos + row * p.rope_half + 2 * tq;
      const float* sp = p.rope_sin + row * p.rope_half + 2 * tq;
#pragma unroll
      for (int c = 0; c < kD / 16; ++c) {
        if (c < pairs) {
          rcs[hr][c] = __ldg(reinterpret_cast<const float2*>(cp + 8 * c));
          rsn[hr][c] = __ldg(reinterpret_cast<const float2*>(sp + 8 * c));
        } else {
          rcs[hr][c] = rsn[hr][c] = make_float2(0.f, 0.f);
        }
      }
    }
    if (reducer) BulkWait0();
#pragma unroll
    for (int i = 0; i < kD / 2; ++i) dk[i] *= p.scale;
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      if (key_lo + 8 * hr < seq) {
        InverseRopePreDispatch<kD>(pairs, dk, hr, rcs[hr], rsn[hr]);
      }
    }
  } else {
    if (reducer) BulkWait0();

    // dK·scale and dV (keys key_lo (+8), features 8c + 2tq).
#pragma unroll
    for (int i = 0; i < kD / 2; ++i) dk[i] *= p.scale;
    if (p.rope_half > 0) {
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const int key = key_lo + 8 * hr;
        if (key < seq) {
          InverseRopeDispatch<kD>(p.rope_half / 8, dk, hr, p.rope_cos + static_cast<int64_t>(key) * p.rope_half + 2 * tq,
                                  p.rope_sin + static_cast<int64_t>(key) * p.rope_half + 2 * tq);
        }
      }
    }
  }  // kRopeMode != kRopeRegs
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int key = key_lo + 8 * hr;
    if (key >= seq) continue;
    bf16* dkr = p.dk + (row_base + key) * p.kv_stride + hk * kD + 2 * tq;
    bf16* dvr = p.dv + (row_base + key) * p.kv_stride + hk * kD + 2 * tq;
#pragma unroll
    for (int c = 0; c < kDT; ++c) {
      *reinterpret_cast<uint32_t*>(dkr + 8 * c) = PackBf16(dk[4 * c + 2 * hr], dk[4 * c + 2 * hr + 1]);
      *reinterpret_cast<uint32_t*>(dvr + 8 * c) = PackBf16(dv[4 * c + 2 * hr], dv[4 * c + 2 * hr + 1]);
    }
  }
}

template <int kD>
__global__ void __launch_bounds__(kWsThreads, 1)
    attn_bwd_ws_kernel(const WgmmaBwdParams p, const __grid_constant__ BwdTmaMaps maps,
                       const int head_group) {
  BwdWsBody<kD, kRopeLate>(p, maps, head_group);
}

// GYRE_ATTN_ROPE_EARLY unset / "1" / "regs" (the default with the fused RoPE): the dK
// epilogue's table values from registers loaded before the last wait (kRopeRegs).
template <int kD, int kRopeMode>
__global__ void __launch_bounds__(kWsThreads, 1)
    attn_bwd_ws_rope_kernel(const WgmmaBwdParams p, const __grid_constant__ BwdTmaMaps maps,
                            const int head_group) {
  BwdWsBody<kD, kRopeMode>(p, maps, head_group);
}

// GYRE_ATTN_ROPE_EARLY: unset / "1" / "regs" = kRopeRegs, "0" / "late" = kRopeLate, anything
// else kRopeUnknown (an error). Read once per process.
int RopeModeFromEnv() {
  static const int mode = [] {
    const char* env = std::getenv("GYRE_ATTN_ROPE_EARLY");
    if (env == nullptr) return kRopeRegs;
    const std::string v(env);
    if (v == "1" || v == "regs") return kRopeRegs;
    if (v == "0" || v == "late") return kRopeLate;
    return kRopeUnknown;
  }();
  return mode;
}

// The kRopeRegs kernels' launches (GYRE_ATTN_ROPE_EARLY), at the end of this file. With them in
// this translation unit nvcc orders one address expression of attn_bwd_ws_kernel<64> (the dSᵀ
// buffer) differently: one more add.s32 per tile in its PTX; any second kernel here does that,
// even a verbatim copy of it (attention_notes.md, attn10). The other kernels' PTX is
// unchanged.
CudaResult LaunchBwdWsRopeRegs(const WgmmaBwdParams& p, const BwdTmaMaps& maps, int head_dim,
                               dim3 grid, int head_group, cudaStream_t stream);

template <int kD>
CudaResult LaunchBwdWs(const WgmmaBwdParams& p, int64_t batch, int64_t kv_heads,
                       cudaStream_t stream) {
  BwdTmaMaps maps{};
  CUDA_RETURN_IF_NOT_OK(EncodeRowsMap(&maps.q, p.q, kD, p.heads, p.seq, batch, p.q_stride, 64));
  CUDA_RETURN_IF_NOT_OK(
      EncodeRowsMap(&maps.dout, p.dout, kD, p.heads, p.seq, batch, p.heads * kD, 64));
  CUDA_RETURN_IF_NOT_OK(EncodeRowsMap(&maps.k, p.k, kD, static_cast<int>(kv_heads), p.seq,
                                      batch, p.kv_stride, 128));
  CUDA_RETURN_IF_NOT_OK(EncodeRowsMap(&maps.v, p.v, kD, static_cast<int>(kv_heads), p.seq,
                                      batch, p.kv_stride, 128));
  const dim3 grid((p.seq + 127) / 128, static_cast<unsigned>(kv_heads),
                  static_cast<unsigned>(batch));
  // A group's blocks re-read Q and dO of the kv head's query heads and reduce into their dq_acc.
  const int head_group =
      HeadGroup(int64_t{8} * p.group * p.seq * kD, batch * kv_heads);
  const int mode = p.rope_half > 0 ? RopeModeFromEnv() : kRopeLate;
  if (mode == kRopeUnknown) {
    return {static_cast<int>(cudaErrorInvalidValue),
            std::string("GYRE_ATTN_ROPE_EARLY must be 1 / regs or 0 / late, got '") +
                std::getenv("GYRE_ATTN_ROPE_EARLY") + "'"};
  }
  if (mode == kRopeRegs) return LaunchBwdWsRopeRegs(p, maps, kD, grid, head_group, stream);
  constexpr int smem = BwdWsLayout<kD>::kBytes;
  CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(attn_bwd_ws_kernel<kD>,
                                            cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  attn_bwd_ws_kernel<kD><<<grid, kWsThreads, smem, stream>>>(p, maps, head_group);
  CUDA_RETURN_IF_LAUNCH_ERROR("attn_bwd_ws_kernel");
  return {};
}

}  // namespace

CudaResult LaunchAttentionForwardWgmma(const WgmmaFwdParams& p, int64_t batch, int head_dim,
                                       bool self_extend, cudaStream_t stream) {
  if (head_dim == 64) {
    return self_extend ? LaunchWs<64, true>(p, batch, stream)
                       : LaunchWs<64, false>(p, batch, stream);
  }
  return self_extend ? LaunchWs<128, true>(p, batch, stream)
                     : LaunchWs<128, false>(p, batch, stream);
}

CudaResult LaunchAttentionBackwardWgmmaMain(const WgmmaBwdParams& p, int64_t batch,
                                            int64_t kv_heads, int head_dim, cudaStream_t stream) {
  return head_dim == 64 ? LaunchBwdWs<64>(p, batch, kv_heads, stream)
                        : LaunchBwdWs<128>(p, batch, kv_heads, stream);
}

namespace {

template <int kD>
CudaResult LaunchBwdWsRope(const WgmmaBwdParams& p, const BwdTmaMaps& maps, dim3 grid,
                           int head_group, cudaStream_t stream) {
  constexpr int smem = BwdWsLayout<kD>::kBytes;
  auto* kernel = attn_bwd_ws_rope_kernel<kD, kRopeRegs>;
  CUDA_RETURN_IF_ERROR(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  kernel<<<grid, kWsThreads, smem, stream>>>(p, maps, head_group);
  CUDA_RETURN_IF_LAUNCH_ERROR("attn_bwd_ws_rope_kernel");
  return {};
}

CudaResult LaunchBwdWsRopeRegs(const WgmmaBwdParams& p, const BwdTmaMaps& maps, int head_dim,
                               dim3 grid, int head_group, cudaStream_t stream) {
  return head_dim == 64 ? LaunchBwdWsRope<64>(p, maps, grid, head_group, stream)
                        : LaunchBwdWsRope<128>(p, maps, grid, head_group, stream);
}

}  // namespace

}  // namespace gyre::cuda
