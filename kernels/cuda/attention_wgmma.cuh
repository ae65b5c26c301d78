// Device helpers of the Hopper attention kernels and the warp-specialised backward's body,
// shared by attention_wgmma.cu (forward, default backward), attention_bwd_det.cu (the
// deterministic backward, AttentionBackwardArgs::deterministic, at D 128) and
// attention_bwd_det_presum.cu (the deterministic backward at D 64).
// Include from those .cu files only (sm_90a). Everything here sits in an unnamed namespace on
// purpose: each kernel translation unit gets its own internal copy, so the kernels' mangled
// names (their parameter types BwdTmaMaps etc. included) and PTX are what they were when all of
// this lived in attention_wgmma.cu, and the deterministic kernel stays out of that translation
// unit (attention_notes.md, attn10: any second backward kernel there perturbs
// attn_bwd_ws_kernel<64>'s PTX).
#pragma once

#include <cuda.h>          // CUtensorMap (the encoder comes through cudaGetDriverEntryPoint)
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled

#include <algorithm>
#include <cstdint>
#include <string>

#include "kernels/cuda/attention_wgmma.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/hopper_mma.cuh"
#include "kernels/cuda/tensor_map.h"

namespace gyre::cuda {
namespace {  // NOLINT(build/namespaces): see the top of this file
// The swizzled tile layout, descriptors, fences and shared-operand wgmma wrappers are
// kernels/cuda/hopper_mma.cuh's (shared with the mLSTM kernels). The register-A wrappers below
// stay here: they pass scale-d as a predicate formed by setp, hopper_mma.cuh's as an immediate.
using namespace hopper;
using bf16 = __nv_bfloat16;

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

// Arrives on named barrier `id` among `threads` threads without waiting (mbarriers, bar.sync,
// TMA loads and bulk waits are hopper_mma.cuh's).
__device__ __forceinline__ void NamedBarArrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
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

constexpr int kWsThreads = 384;

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

// ------------------------------------------------------------------------------------------
// Backward main kernel, FlashAttention-3 structure (BwdWsBody below: attention_bwd_store.cu's
// attn_bwd_store_kernel, the default at D 128, and the deterministic kernels), grid
// (ceil(T/128), Hk, B) in GroupedBlockOrder, 384 threads = a producer warpgroup and two
// consumer warpgroups, one block per SM. A block owns 128 keys of one kv head (K, V resident in shared memory); consumer
// warpgroup c owns keys 64c..64c+63 and accumulates their dK, dV in registers (fp32) over every
// query head of the GQA group and every 64-row query tile at or below the diagonal.
//   Producer (24 registers after setmaxnreg; consumers 240): warps 0-1: K, V once, then per
//     query tile Q, dO (TMA, issued by one thread) and lse, D_i (fp32 rows, one lse and one D
//     4-byte cp.async per thread) into a 3-deep ring (kBwdStages; 2 stages measured 1-4%
//     slower); a stage's `full` mbarrier completes when the TMA bytes and the 64 cp.async
//     arrivals (.noinc, no wait) are in; warps 2-3: the dQ writers (below); it is reused after both consumer warpgroups arrived on its `empty` mbarrier. No
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
//     dQ tile (fp32) -> this warpgroup's shared-memory staging tile -> `dq_full` mbarrier ->
//       its writer (lane 0 of producer warp 2 + c) issues one bulk operation into dq_acc: a copy
//       for the tile's first contribution, else a reduction (cp.reduce.async.bulk .add.f32;
//       DqStoreWriter; the deterministic kernels: DqWriter, in a fixed order). dq_acc is
//       blocked for that: [B, H, ceil(T/64), parts, 64 rows, W] with W = D/2 (column split) or
//       D, and column c of row r stored at c ^ 8·(r % 4) (conflict-free fp32 fragment stores);
//       attention.cu's conversion kernel reads it back (BwdDqAccIndex).
// The prep (D_i; for the deterministic kernels also zeroing dq_acc: attention.cu's; for the
// default attention_bwd_store.cu's, which zeroes only the tickets) and the dQ conversion
// (attention.cu) are separate kernels.


__device__ __forceinline__ void BulkReduceAddF32(float* gdst, uint32_t ssrc, uint32_t bytes) {
  asm volatile(
      "cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(gdst),
      "r"(ssrc), "r"(bytes)
      : "memory");
  BulkCommit();
}
// The first contribution to a dq_acc half-tile in the default D 128 backward (DqStoreWriter): a
// plain bulk copy of the staging tile (no addition), so that dq_acc need not be zeroed first.
__device__ __forceinline__ void BulkStoreF32(float* gdst, uint32_t ssrc, uint32_t bytes) {
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;\n" ::"l"(gdst),
               "r"(ssrc), "r"(bytes)
               : "memory");
  BulkCommit();
}
constexpr int kBwdStages = 3;  // Q / dO ring depth (2 measured 1-4% slower, RESULTS.md attn4)

// Shared memory of the backward main kernel. kDet (the deterministic kernels,
// attention_bwd_det{,_presum}.cu) adds kDqStages dQ staging tiles per consumer warpgroup (2 at
// D 64, where the two warpgroups' partial tiles are summed in tile (0, t) and the writers take
// alternate tiles; 1 at D 128, whose layout has no room for a second: 226.6 of 227 KB) and the
// staging mbarriers dq_full[2][kDqStages] (count 128: the consumer warpgroup wrote the tile). At
// D 64 tiles (1, t) and dq_full[1][t] are unused (32 KB): they are kept so that the kernel is
// the one measured (a smaller layout moves every offset after kDQ). "The writer's bulk
// reduction has read it" is named barrier kDqEmptyBar + c·kDqStages + t (the consumer
// warpgroup's 128 threads sync, the writer warp's 32 arrive): a bar.sync costs the consumers no
// registers, where an mbarrier wait loop there spilled (ptxas: 4-8 bytes).
template <int kD, bool kDet = false>
struct BwdWsLayout {
  static constexpr bool kKeySplit = kD == 64;
  static constexpr int kDqStages = kDet && kKeySplit ? 2 : 1;
  static constexpr int kDqEmptyBar = 5;  // ids 3, 4: the consumers' own barriers
  // kDet at D 64: named barrier kDqPartialBar + t, warpgroup 1's partial dQ tile is in staging
  // tile (0, t).
  static constexpr int kDqPartialBar = kDqEmptyBar + 2 * kDqStages;
  static constexpr int kDqFullBars = kDet ? 2 * kDqStages : 0;
  static constexpr int kKVBytes = 128 * kD * 2, kQBytes = 64 * kD * 2;
  static constexpr int kDSBytes = 128 * 64 * 2;
  static constexpr int kDqN = kKeySplit ? kD : kD / 2;  // dQ columns per consumer warpgroup
  static constexpr int kDqBytes = 64 * kDqN * 4;
  static constexpr int kK = 0, kV = kKVBytes, kQ = 2 * kKVBytes;
  static constexpr int kDO = kQ + kBwdStages * kQBytes;
  static constexpr int kDS = kDO + kBwdStages * kQBytes;      // [2] dSᵀ buffers
  static constexpr int kDQ = kDS + 2 * kDSBytes;              // [2][kDqStages]
  static constexpr int kStats = kDQ + 2 * kDqStages * kDqBytes;  // [stages] lse[64], D[64]
  // full[stages], empty[stages], ds_full[2], ds_empty[2] (kDet: + dq_full[2][kDqStages])
  static constexpr int kBars = kStats + kBwdStages * 512;
  static constexpr int kBytes = kBars + 8 * (2 * kBwdStages + 4 + kDqFullBars) + 1024;  // + slack
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
// x1 = g1 cos + g2 sin, x2 = g2 cos − g1 sin, from table values loaded beforehand: cs[c], sn[c]
// = cos / sin of features 8c + 2tq (+1) of the key.
template <int kD, int kPairs>
__device__ __forceinline__ void InverseRopeRow(float (&acc)[kD / 2], int hr,
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
// Picks the compile-time pairing for pairs = R/16 in [1, kD/16] (register indices must be
// static).
template <int kD, int kPairs = kD / 16>
__device__ __forceinline__ void InverseRopeDispatch(int pairs, float (&acc)[kD / 2], int hr,
                                                       const float2 (&cs)[kD / 16],
                                                       const float2 (&sn)[kD / 16]) {
  if (pairs == kPairs) {
    InverseRopeRow<kD, kPairs>(acc, hr, cs, sn);
  } else if constexpr (kPairs > 1) {
    InverseRopeDispatch<kD, kPairs - 1>(pairs, acc, hr, cs, sn);
  }
}

// Tensor maps of the backward's TMA loads (EncodeRowsMap): K, V boxes of 128 rows, Q, dO of 64.
struct BwdTmaMaps {
  CUtensorMap q, dout, k, v;
};

// Host side of both backward main kernels: their TMA maps, grid (ceil(T/128), Hk, B) and
// GroupedBlockOrder group (a group's blocks re-read Q and dO of the kv head's query heads and
// reduce into their dq_acc).
inline CudaResult EncodeBwdMaps(const WgmmaBwdParams& p, int64_t batch, int64_t kv_heads,
                                int head_dim, BwdTmaMaps* maps) {
  const int hk = static_cast<int>(kv_heads);
  CUDA_RETURN_IF_NOT_OK(
      EncodeRowsMap(&maps->q, p.q, head_dim, p.heads, p.seq, batch, p.q_stride, 64));
  CUDA_RETURN_IF_NOT_OK(EncodeRowsMap(&maps->dout, p.dout, head_dim, p.heads, p.seq, batch,
                                      p.heads * head_dim, 64));
  CUDA_RETURN_IF_NOT_OK(
      EncodeRowsMap(&maps->k, p.k, head_dim, hk, p.seq, batch, p.kv_stride, 128));
  CUDA_RETURN_IF_NOT_OK(
      EncodeRowsMap(&maps->v, p.v, head_dim, hk, p.seq, batch, p.kv_stride, 128));
  return {};
}
inline dim3 BwdGrid(const WgmmaBwdParams& p, int64_t batch, int64_t kv_heads) {
  return dim3((p.seq + 127) / 128, static_cast<unsigned>(kv_heads), static_cast<unsigned>(batch));
}
inline int BwdHeadGroup(const WgmmaBwdParams& p, int64_t batch, int64_t kv_heads, int head_dim) {
  return HeadGroup(int64_t{8} * p.group * p.seq * head_dim, batch * kv_heads);
}

// ------------------------------------------------------------------------------------------
// The dQ writer: lane 0 of producer warp 2 + c serves consumer warpgroup c. For the
// warpgroup's n-th query tile (h, m) it waits until the tile's turn counter says every earlier
// contribution in the fixed order has landed, then adds the staged tile with one bulk reduction,
// frees the staging tile once it has been read, waits for the reduction to complete and bumps
// the counter (release). Order of the contributions to query tile m (key blocks j <= m/2):
//   D 128 (column split, one counter per half of the columns): j = m/2, m/2 − 1, ..., 0;
//   D 64 (key split, both warpgroups add the full tile): (m/2, wg 1), (m/2, wg 0), (m/2 − 1,
//   wg 1), ... 
// Key block j + 1 reaches tile m two iterations before key block j (it starts two tiles later
// in m) and is launched first, so in the steady state nobody waits.
constexpr uint64_t kTurnTimeoutNs = uint64_t{20} * 1000 * 1000 * 1000;  // a bug, not a wait

__device__ __forceinline__ int LdRelaxedGpu(const int* ptr) {
  int v;
  asm volatile("ld.relaxed.gpu.global.b32 %0, [%1];\n" : "=r"(v) : "l"(ptr) : "memory");
  return v;
}
__device__ __forceinline__ void RedReleaseGpuAddOne(int* ptr) {
  asm volatile("red.release.gpu.global.add.s32 [%0], 1;\n" ::"l"(ptr) : "memory");
}
__device__ __forceinline__ void StReleaseGpuOne(int* ptr) {
  asm volatile("st.release.gpu.global.b32 [%0], 1;\n" ::"l"(ptr) : "memory");
}
__device__ __forceinline__ void FenceAcqRelGpu() {
  asm volatile("fence.acq_rel.gpu;\n" ::: "memory");
}
__device__ __forceinline__ void FenceProxyAsyncGlobal() {
  asm volatile("fence.proxy.async.global;\n" ::: "memory");
}
__device__ __forceinline__ uint64_t GlobalTimerNs() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;\n" : "=l"(t));
  return t;
}

// The dQ writers of the deterministic kernels: lane 0 of a producer warp does the work, the warp
// arrives on the staging tile's named barrier. D 128: one writer per consumer warpgroup c (its
// column half, its own turn counter). D 64: the two warpgroups' partial tiles are summed in
// staging slot (0, t) (BwdWsBody's reduce_dq), c = 0, and writer w takes the tiles staged in slot
// w (alternate query tiles). stage_base: shared address of staging tile [0][0]; full: of
// dq_full[0][0].
template <int kD>
__device__ __forceinline__ void DqWriter(const WgmmaBwdParams& p, int* turns, int c, int n_block,
                                         int hk, int b, int m_first, int m_tiles, int total,
                                         uint32_t stage_base, uint32_t full, int w) {
  using L = BwdWsLayout<kD, true>;
  constexpr bool kPresum = L::kKeySplit;
  constexpr int kTileFloats = kD / L::kDqN * 64 * L::kDqN;  // one query tile of dq_acc
  // The producer warps have 24 registers: one running tile index (the pointers are formed from
  // the kernel parameters at each use), per-c bases computed once.
  const bool lane0 = (threadIdx.x & 31) == 0;
  const int slot = L::kKeySplit ? 0 : c;
  int tile = ((b * p.heads + hk * p.group) * m_tiles + m_first);  // < 2^31 (B, H, T bounds)
  const uint32_t stage_c = stage_base + c * L::kDqStages * L::kDqBytes;
  const uint32_t full_c = full + 8 * c * L::kDqStages;
  const int bar_c = L::kDqEmptyBar + c * L::kDqStages;
  // Contributions to tile m that come before this one: key blocks n_block + 1 .. m/2, one per
  // key block (per column half at D 128): turn = m/2 − n_block.
  const int turn_off = -n_block;
  int m_tile = m_first;
  for (int n = 0; n < total; ++n) {
    const int t = n % L::kDqStages;
    // D 64: two writers (c = 0 for both), writer w takes the tiles staged in slot w, so each has
    // two tiles of the consumers' time for one contribution's poll, bulk add and release.
    const bool mine = !kPresum || t == w;
    if (lane0 && mine) {
      int* turn_ptr = turns + 2 * static_cast<int64_t>(tile) + slot;
      const int turn = (m_tile >> 1) + turn_off;
      if (LdRelaxedGpu(turn_ptr) != turn) {
        const uint64_t t0 = GlobalTimerNs();
        while (LdRelaxedGpu(turn_ptr) != turn) {
          if (GlobalTimerNs() - t0 > kTurnTimeoutNs) __trap();
        }
      }
      FenceAcqRelGpu();  // the earlier contributions happen before this one
      MbWait(full_c + 8 * t, (n / L::kDqStages) & 1);
      FenceProxyAsyncGlobal();
      BulkReduceAddF32(p.dq_acc + static_cast<int64_t>(tile) * kTileFloats + slot * 64 * L::kDqN,
                       stage_c + t * L::kDqBytes, L::kDqBytes);
      BulkWaitRead<0>();
    }
    __syncwarp();
    // The consumer syncs on this before it writes staging tile t again (its n + kDqStages-th
    // tile), so arrive only where that comes.
    if (mine && n + L::kDqStages < total) NamedBarArrive(bar_c + t, 160);
    if (lane0 && mine) {
      BulkWait<0>();  // the additions have been performed
      FenceProxyAsyncGlobal();
      RedReleaseGpuAddOne(turns + 2 * static_cast<int64_t>(tile) + slot);
    }
    ++tile;
    if (++m_tile == m_tiles) {  // next query head of the group: (h, m_tiles) -> (h + 1, m_first)
      m_tile = m_first;
      tile += m_first;
    }
  }
}

// The dQ writer of consumer warpgroup c in the default D 128 backward (BwdWsBody without kDet;
// producer warp 2 + c, lane 0 issues): the DqWriter handoff (staging tile -> dq_full[c][0] -> bulk operation ->
// named barrier kDqEmptyBar + c) with a ticket instead of a turn. tickets: per (batch, head,
// 64-row query tile, column half) {ticket, stored flag}, zeroed by the store path's prep. For
// each query tile the writer first takes its ticket (atomicAdd) and reads the flag, both while
// its consumers still compute the tile; ticket 0 (the first writer there, whoever it is) copies
// the half-tile into dq_acc (cp.async.bulk, no addition), waits for the copy's completion and
// sets the flag (st.release); any other ticket adds (cp.reduce.async.bulk .add) once the flag
// is set (polled only if it was still 0). Deadlock-free: a writer only ever waits for the flag
// of a tile whose ticket 0 is held by a running block, and that block's progress to the flag
// depends only on tiles earlier in the (head, query tile) order.
template <int kD>
__device__ __forceinline__ void DqStoreWriter(const WgmmaBwdParams& p, int* tickets, int c, int hk,
                                              int b, int m_first, int m_tiles, int total,
                                              uint32_t stage_base, uint32_t full) {
  using L = BwdWsLayout<kD, true>;
  static_assert(!L::kKeySplit && L::kDqStages == 1, "column split, one staging tile");
  constexpr int kTileFloats = kD / L::kDqN * 64 * L::kDqN;
  const bool lane0 = (threadIdx.x & 31) == 0;
  int tile = ((b * p.heads + hk * p.group) * m_tiles + m_first);  // < 2^31
  const uint32_t stage_c = stage_base + c * L::kDqBytes;
  const uint32_t full_c = full + 8 * c * L::kDqStages;
  const int bar_c = L::kDqEmptyBar + c;
  int m_tile = m_first;
  for (int n = 0; n < total; ++n) {
    bool first = false;
    if (lane0) {
      int* tk = tickets + 4 * static_cast<int64_t>(tile) + 2 * c;
      const int ticket = atomicAdd(tk, 1);
      int flag = LdRelaxedGpu(tk + 1);
      first = ticket == 0;
      MbWait(full_c, n & 1);
      float* dst = p.dq_acc + static_cast<int64_t>(tile) * kTileFloats + c * 64 * L::kDqN;
      if (first) {
        BulkStoreF32(dst, stage_c, L::kDqBytes);
      } else {
        if (flag == 0) {
          const uint64_t t0 = GlobalTimerNs();
          while ((flag = LdRelaxedGpu(tk + 1)) == 0) {
            if (GlobalTimerNs() - t0 > kTurnTimeoutNs) __trap();
          }
        }
        FenceAcqRelGpu();  // the first writer's copy happens before this addition
        FenceProxyAsyncGlobal();
        BulkReduceAddF32(dst, stage_c, L::kDqBytes);
      }
      BulkWaitRead<0>();
    }
    __syncwarp();
    // The consumer syncs on this before it writes its staging tile again.
    if (n + 1 < total) NamedBarArrive(bar_c, 160);
    if (lane0 && first) {
      BulkWait<0>();  // the copy has been performed
      FenceProxyAsyncGlobal();
      StReleaseGpuOne(tickets + 4 * static_cast<int64_t>(tile) + 2 * c + 1);
    }
    ++tile;
    if (++m_tile == m_tiles) {  // next query head of the group: (h, m_tiles) -> (h + 1, m_first)
      m_tile = m_first;
      tile += m_first;
    }
  }
  if (lane0) BulkWait<0>();
}

// The kernel body, shared by attention_bwd_store.cu's attn_bwd_store_kernel<kRope> (the default
// at D 128; D 64: attention_bwd_q128.cu's 128-query tiles; the key-split form below serves the
// deterministic D 64 kernel) and the deterministic kernels, attention_bwd_det.cu's attn_bwd_det_kernel<128> and
// attention_bwd_det_presum.cu's attn_bwd_det_presum_kernel (D 64) (kDet, kRope, with or without
// the RoPE; dq_turns: their turn counters).
// kDet, the deterministic backward, differs only in how dQ reaches dq_acc:
//   - order: per (batch, head, 64-row query tile) an int turn counter in global memory
//     ([B, H, ceil(T/64), 2], zeroed by the caller; slot = column half at D 128, 0 at D 64); the
//     contributions of key blocks j <= m/2 to query tile m are added in a fixed order (DqWriter);
//   - D 64 (kPresum): the two consumer warpgroups' partial dQ tiles of a key block are summed in
//     shared memory first (reduce_dq), so one contribution per key block and query tile;
//   - the bulk reductions are issued by two writer threads in the producer warpgroup (lane 0 of
//     warps 2 and 3; warps 0-1 keep the loads, each thread copying one lse and one D value),
//     so a consumer warpgroup never waits on a counter: it stages its dQ tile and moves on, and
//     blocks only when its staging tiles (2 at D 64, 1 at D 128) are all still unread;
//   - block order: shortest first inside each group of GroupedBlockOrder (diagonal key block
//     first), so a block waits only for blocks launched before it (FlashAttention-3's
//     deterministic backward makes the same choice); this assumes blocks are dispatched in
//     launch order, as FA3 does. A writer that waits 20 s traps (a bug, not a wait).
// Without kDet (the default D 128 backward, attention_bwd_store.cu's kernels since session 22,
// attn128b; dq_tickets) the handoff is the same, without the order: the writers are
// DqStoreWriter (the first contribution to each dq_acc half-tile is a copy, so dq_acc is not
// zeroed) and the block order is longest first. (Until attn128b the default kernel's consumers
// issued their bulk reductions themselves, into a zeroed dq_acc: attention_notes.md.)
// The backward's dK / dV epilogue, shared by BwdWsBody and attention_bwd_q128.cu's D 64 kernel:
// dK times the softmax scale, with the fused RoPE (kRope) rotated back by −angle, then dK and dV
// of this thread's two keys (key_lo, key_lo + 8; keys past seq skipped) packed to bf16 and stored.
// `before_scale` runs after the RoPE table loads are issued and before dK is touched (the q128
// kernel's reducer waits for its last bulk dQ reduction there, so the loads overlap that wait).
template <int kD, bool kRope, typename BeforeScale>
__device__ __forceinline__ void StoreDkDv(const WgmmaBwdParams& p, float (&dk)[kD / 2], const float (&dv)[kD / 2],
                                          int key_lo, int seq, int64_t row_base, int hk, int tq,
                                          BeforeScale before_scale) {
  if constexpr (kRope) {
    // The dK epilogue's fused inverse RoPE. This thread's table values (2 keys x R/16 pairs x
    // cos, sin float2: 32 registers at D 64, 64 at D 128, with only dK, dV live). They were
    // loaded before the consumer's last bulk wait when consumers issued their own dQ
    // reductions (the session-8 H100 call: −1% against loads after that wait); since attn128b
    // no consumer thread issues bulk operations (the writers wait for theirs). With no RoPE,
    // pairs = 0 and nothing is loaded.
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
    before_scale();
#pragma unroll
    for (int i = 0; i < kD / 2; ++i) dk[i] *= p.scale;
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      if (key_lo + 8 * hr < seq) {
        InverseRopeDispatch<kD>(pairs, dk, hr, rcs[hr], rsn[hr]);
      }
    }
  } else {
    before_scale();
#pragma unroll
    for (int i = 0; i < kD / 2; ++i) dk[i] *= p.scale;
  }
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int key = key_lo + 8 * hr;
    if (key >= seq) continue;
    bf16* dkr = p.dk + (row_base + key) * p.kv_stride + hk * kD + 2 * tq;
    bf16* dvr = p.dv + (row_base + key) * p.kv_stride + hk * kD + 2 * tq;
#pragma unroll
    for (int c = 0; c < kD / 8; ++c) {
      *reinterpret_cast<uint32_t*>(dkr + 8 * c) = PackBf16(dk[4 * c + 2 * hr], dk[4 * c + 2 * hr + 1]);
      *reinterpret_cast<uint32_t*>(dvr + 8 * c) = PackBf16(dv[4 * c + 2 * hr], dv[4 * c + 2 * hr + 1]);
    }
  }
}

template <int kD, bool kRope, bool kDet>
__device__ __forceinline__ void BwdWsBody(const WgmmaBwdParams& p, const BwdTmaMaps& maps,
                                          const int head_group, int* const dq_turns = nullptr,
                                          int* const dq_tickets = nullptr) {
  static_assert(!kDet || kRope, "the deterministic kernel has one epilogue");
  static_assert(kDet || kD == 128, "the default D 64 backward is attention_bwd_q128.cu's");
  using L = BwdWsLayout<kD, true>;
  // The deterministic form at D 64: partial dQ tiles summed in shared memory before the order.
  constexpr bool kPresum = kDet && L::kKeySplit;
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
  // kDet: staging tile t of consumer warpgroup c has been written; its address.
  auto dq_full = [&](int c, int t) {
    return base + L::kBars + 8 * (2 * kBwdStages + 4 + c * L::kDqStages + t);
  };
  auto dq_stage_addr = [&](int c, int t) {
    return base + L::kDQ + (c * L::kDqStages + t) * L::kDqBytes;
  };

  const int tid = threadIdx.x, wg = tid / 128, wtid = tid % 128;
  if (tid == 0) {
    for (int s = 0; s < kBwdStages; ++s) {
      MbInit(full_bar(s), 64);  // warps 0-1 of the producer copy lse / D
      MbInit(empty_bar(s), 256);
    }
    for (int i = 0; i < 2; ++i) {
      MbInit(ds_full(i), 256);
      MbInit(ds_empty(i), 256);
      for (int t = 0; t < L::kDqStages; ++t) MbInit(dq_full(i, t), 128);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  // Key block 0 has the most query tiles: rank 0 = n_block 0. kDet: shortest first (rank 0 =
  // the diagonal key block, the last n_block): a key block waits only for key blocks with a
  // larger n_block of its (batch, kv head) pair, and those come earlier in the launch order, so
  // they are resident or done.
  int rank, pair;
  GroupedBlockOrder(blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z), gridDim.x,
                    gridDim.y * gridDim.z, head_group, rank, pair);
  const int n_block = kDet ? static_cast<int>(gridDim.x) - 1 - rank : rank;
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
    if constexpr (!kDet) {
      const int pwarp = wtid / 32;
      if (pwarp >= 2) {
        DqStoreWriter<kD>(p, dq_tickets, pwarp - 2, hk, b, m_first, m_tiles, total,
                          base + L::kDQ, base + L::kBars + 8 * (2 * kBwdStages + 4));
        return;
      }
    }
    if constexpr (kDet) {
      const int pwarp = wtid / 32;
      if (pwarp >= 2) {
        // Warps 2 and 3: the dQ writers of consumer warpgroups 0 and 1 (kPresum: of the summed
        // tiles in staging slots 0 and 1, i.e. of alternate query tiles).
        DqWriter<kD>(p, dq_turns, kPresum ? 0 : pwarp - 2, n_block, hk, b, m_first, m_tiles,
                     total, base + L::kDQ, base + L::kBars + 8 * (2 * kBwdStages + 4),
                     pwarp - 2);
        return;
      }
    }
    // Thread 0 issues the tiles (TMA; K and V with stage 0 of the first tile) and registers
    // their bytes on the stage's `full` barrier; every thread copies one lse / D value with
    // cp.async and arrives when it landed, without waiting (128 arrivals + the bytes; kDet:
    // each thread of warps 0-1 copies one lse and one D value, 64 arrivals).
    auto tile = [&](uint32_t dst, const CUtensorMap* map, uint32_t bar, int head, int row0,
                    int rows) {
#pragma unroll
      for (int cb = 0; cb < kD / 64; ++cb) {
        TmaTile4d(dst + cb * rows * 128, map, bar, 64 * cb, head, row0, b);
      }
    };
    for (int it = 0; it < total; ++it) {
      const int s = it % kBwdStages;
      MbWait(empty_bar(s), ((it / kBwdStages) & 1) ^ 1);
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
      const int r = wtid;  // < 64
      const bool valid = m0 + r < seq;
      const int64_t off = (static_cast<int64_t>(b) * p.heads + h) * seq + (valid ? m0 + r : 0);
      asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(
                       base + L::kStats + s * 512 + r * 4),
                   "l"(p.lse + off), "r"(valid ? 4 : 0));
      asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(
                       base + L::kStats + s * 512 + 256 + r * 4),
                   "l"(p.dvec + off), "r"(valid ? 4 : 0));
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
  // dq_acc's block of query tile m_tile of head h. kDet at D 128: the warpgroup's reduction
  // number n (its n-th query tile) goes to its staging tile, and its writer thread (DqWriter)
  // adds it to dq_acc in its turn. kPresum (kDet at D 64): both warpgroups' partial tiles of
  // query tile n meet in staging tile (0, n % kDqStages): warpgroup 1 writes its own, then
  // warpgroup 0 adds its own to it (one fp32 addition per element, so the order is fixed) and
  // hands the sum to the writer of that slot: one bulk reduction per key block and query tile.
  auto reduce_dq = [&](const float (&dq)[kDqN / 2], int n, int h, int m_tile) {
    if constexpr (kPresum) {
      const int t = n % L::kDqStages;
      if (cwg == 1) {
        if (n >= L::kDqStages) NamedBarrierSync(L::kDqEmptyBar + t, 160);
      } else {
        NamedBarrierSync(L::kDqPartialBar + t, 256);  // warpgroup 1's partial tile n is staged
      }
      unsigned char* sum = base_ptr + (dq_stage_addr(0, t) - base);
#pragma unroll
      for (int c = 0; c < kDqN / 8; ++c)
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
          // The element positions of warpgroup 1's thread wtid: its own store is read here.
          const int r = 16 * warp_in_wg + g + 8 * hr;
          const int col = (8 * c + 2 * tq) ^ (8 * (r & 3));
          float2* e = reinterpret_cast<float2*>(sum + (r * kDqN + col) * 4);
          float2 v = make_float2(dq[4 * c + 2 * hr], dq[4 * c + 2 * hr + 1]);
          if (cwg == 0) {
            const float2 w1 = *e;
            v = make_float2(w1.x + v.x, w1.y + v.y);
          }
          *e = v;
        }
      if (cwg == 1) {
        NamedBarArrive(L::kDqPartialBar + t, 256);
      } else {
        FenceProxyAsync();  // the sums before the writer's bulk reduction (async proxy) reads them
        MbArrive(dq_full(0, t));
      }
    } else {
      const int t = n % L::kDqStages;
      if (n >= L::kDqStages) NamedBarrierSync(L::kDqEmptyBar + cwg * L::kDqStages + t, 160);
      unsigned char* stage = base_ptr + (dq_stage_addr(cwg, t) - base);
#pragma unroll
      for (int c = 0; c < kDqN / 8; ++c)
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
          const int r = 16 * warp_in_wg + g + 8 * hr;
          const int col = (8 * c + 2 * tq) ^ (8 * (r & 3));
          *reinterpret_cast<float2*>(stage + (r * kDqN + col) * 4) =
              make_float2(dq[4 * c + 2 * hr], dq[4 * c + 2 * hr + 1]);
        }
      FenceProxyAsync();
      MbArrive(dq_full(cwg, t));
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
    MbWait(full_bar(s), (it / kBwdStages) & 1);
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
      if (it >= 2) MbWait(ds_empty(it & 1), ((it >> 1) + 1) & 1);
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
      NamedBarrierSync(3 + cwg, 128);  // this warpgroup's 64 rows of dSᵀ written
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
      MbArrive(empty_bar(s));  // Q, dO, lse, D of this stage are no longer read
      reduce_dq(dq, it, h, m_tile);
    } else {
      MbArrive(ds_full(it & 1));  // this warpgroup's half of dSᵀ(it) is written
      if (it == 0) {
        WgmmaWait<0>();
        FenceRegs(pa);
        FenceRegs(da);
        FenceRegs(dv);
        FenceRegs(dk);
        MbArrive(empty_bar(s));
      } else {
        // dQ of the previous tile: its dSᵀ halves were both written an iteration ago unless
        // the other warpgroup lags by that much, so the two warpgroups drift freely (one's
        // exponentials under the other's GEMMs) instead of meeting once per tile.
        const int pit = it - 1;
        MbWait(ds_full(pit & 1), (pit >> 1) & 1);
        float dq[kDqN / 2];
        WgmmaFence();
        issue_dq_cols(dq, kb, pit & 1);
        WgmmaCommit();
        WgmmaWait<1>();  // dV, dK GEMMs (committed before dQ's) done
        FenceRegs(pa);
        FenceRegs(da);
        FenceRegs(dv);
        FenceRegs(dk);
        MbArrive(empty_bar(s));  // Q, dO, lse, D of this stage are no longer read
        WgmmaWait<0>();
        FenceRegs(dq);
        MbArrive(ds_empty(pit & 1));  // dSᵀ(pit) is no longer read
        reduce_dq(dq, pit, hk * p.group + pit / per_head, m_first + pit % per_head);
      }
    }
  }
  if constexpr (!kKeySplit) {
    const int pit = total - 1;
    uint32_t kb = sK;
    asm volatile("" : "+r"(kb));
    MbWait(ds_full(pit & 1), (pit >> 1) & 1);
    float dq[kDqN / 2];
    WgmmaFence();
    issue_dq_cols(dq, kb, pit & 1);
    WgmmaCommit();
    WgmmaWait<0>();
    FenceRegs(dq);
    reduce_dq(dq, pit, hk * p.group + pit / per_head, m_first + pit % per_head);
  }
  StoreDkDv<kD, kRope>(p, dk, dv, key_lo, seq, row_base, hk, tq, [] {});
}

// The forwards' online-softmax steps on one warpgroup's S accumulators (m64n128: 64 floats a
// thread, rows r_lo and r_lo + 8 as hr = 0 / 1; shared by attn_fwd_ws_kernel and
// attention_fwd64.cu's attn_fwd64_kernel). SoftmaxRows: the rows' new max (quad shuffles), the
// correction exp2((m_old − m_new)·scale) of O and l, the exponentials in place and the new row
// sums; a row with no key yet (max −inf) uses 0 as its offset. PackP: the probabilities as bf16
// A fragments of P·V. RescaleO: O's rows times their correction.
template <int kN>
__device__ __forceinline__ void SoftmaxRows(float (&s)[64], float (&row_max)[2], float (&row_sum)[2],
                                            float (&corr)[2], float scale_log2) {
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    float mx = row_max[hr];
#pragma unroll
    for (int c = 0; c < kN / 8; ++c) mx = fmaxf(mx, fmaxf(s[4 * c + 2 * hr], s[4 * c + 2 * hr + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float msc = mx == -INFINITY ? 0.f : mx * scale_log2;
    corr[hr] = Exp2(row_max[hr] * scale_log2 - msc);
    row_max[hr] = mx;
    float sum = 0.f;
#pragma unroll
    for (int c = 0; c < kN / 8; ++c)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float& x = s[4 * c + 2 * hr + e];
        x = Exp2(fmaf(x, scale_log2, -msc));
        sum += x;
      }
    row_sum[hr] = row_sum[hr] * corr[hr] + sum;
  }
}

template <int kN>
__device__ __forceinline__ void PackP(const float (&s)[64], uint32_t (&pa)[kN / 16][4]) {
#pragma unroll
  for (int kk = 0; kk < kN / 16; ++kk) {
    pa[kk][0] = PackBf16(s[8 * kk + 0], s[8 * kk + 1]);
    pa[kk][1] = PackBf16(s[8 * kk + 2], s[8 * kk + 3]);
    pa[kk][2] = PackBf16(s[8 * kk + 4], s[8 * kk + 5]);
    pa[kk][3] = PackBf16(s[8 * kk + 6], s[8 * kk + 7]);
  }
}

template <int kD>
__device__ __forceinline__ void RescaleO(float (&o)[kD / 2], const float (&corr)[2]) {
#pragma unroll
  for (int c = 0; c < kD / 8; ++c) {
    o[4 * c] *= corr[0];
    o[4 * c + 1] *= corr[0];
    o[4 * c + 2] *= corr[1];
    o[4 * c + 3] *= corr[1];
  }
}

// Fused RoPE of Q in the plain forwards (WgmmaFwdParams::rope_half > 0; attn_fwd_ws_kernel and
// attention_fwd64.cu's attn_fwd64_kernel, Q tiles of kBM rows): consumer warpgroup
// `cwg` rotates its own 64 rows of the block's Q tile in shared memory once, after the tile
// landed (q_full) and before its first S GEMM, and writes them to q_rot for the backward (a row
// is read and written by this block only, so q_rot may be q). Items are (row, 16-byte chunk
// c < R/16): chunk c pairs with chunk c + R/16 (features f, f + R/2); rope.cu's forward math
// (y1 = x1 cos − x2 sin, y2 = x2 cos + x1 sin in fp32, one rounding to bf16). The table rows are
// loaded before the wait, so their latency hides under the Q copy. Rows past T (zeros) stay.
// With R < D and q_rot != q the features R.. are copied to q_rot as they are. `bar`: the
// warpgroup's own named barrier (128 threads) that ends the rotation.
template <int kD, int kBM>
__device__ __forceinline__ void RopeOwnQRows(const WgmmaFwdParams& p, unsigned char* sq, int cwg,
                                             int pos0, int64_t row_base, int h, int wtid,
                                             uint32_t q_full, int bar) {
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
  MbWait(q_full, 0);
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const int i = wtid + 128 * j, r = i / pairs, c = i % pairs, pos = pos0 + r;
    if (r < 64 && pos < p.seq) {
      uint4* a = reinterpret_cast<uint4*>(sq + Sw128ChunkOffset<kBM>(64 * cwg + r, c));
      uint4* b = reinterpret_cast<uint4*>(sq + Sw128ChunkOffset<kBM>(64 * cwg + r, c + pairs));
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
            *reinterpret_cast<const uint4*>(sq + Sw128ChunkOffset<kBM>(64 * cwg + r, c));
      }
    }
  }
  FenceProxyAsync();            // the generic-proxy stores before the wgmmas (async proxy) read them
  NamedBarrierSync(bar, 128);       // this warpgroup's 64 rows rotated
}
}  // namespace
}  // namespace gyre::cuda
