// The D 64 backward main kernel: 128-query tiles (attention_notes.md, "attn64b (session 22)").
// The default at D 64 since session 22 (attention.cu calls it): 4-5% faster
// than attn_bwd_ws_kernel<64> (64-query tiles, dQ split by keys), which was deleted
// (H100: --bwd_only B16 S2048 H12 D64 0.900 vs 0.944 ms, llama-125m B16 step 64.18 vs 64.60 ms).
// The deterministic backward at D 64 keeps BwdWsBody (attention_bwd_det_presum.cu).
//
// What it computes: for the block's 128 keys of one kv head, dK and dV over every query head of
// the GQA group and every query at or below the diagonal, and each key block's contribution to
// dQ, added to the blocked fp32 dq_acc with bulk reductions (prep and dq conversion are
// attention.cu's; dq_acc's layout [B, H, ceil(T/64), 1, 64, 64] is the one BwdWsBody uses at D 64).
//
// Structure (FlashAttention-3's hdim-64 tiling, 128 queries x 128 keys; the producer warpgroup,
// its TMA ring and the block order are BwdWsBody's):
//   - a query tile has 128 rows. Consumer warpgroup c owns keys 64c..64c+63 and their dK, dV
//     (fp32 registers), so Sᵀ = K_c Qᵀ and dPᵀ = V_c dOᵀ are m64n128k16 wgmmas (4 each; 64 fp32
//     accumulators each), all operands from shared memory (K_c as register fragments was 4-5%
//     slower, attention_notes.md; K_c and V_c's do not fit in 240 registers beside the 192 of
//     Sᵀ, dPᵀ, dK, dV);
//   - dV_c += Pᵀ dO, dK_c += dSᵀ Q: m64n64k16 x 8 (k = 128 queries), A from registers;
//   - dQ is split by query rows: warpgroup c computes dQ rows 64c..64c+63 of the tile over all
//     128 keys (m64n64k16 x 8, A = dS from the dSᵀ buffer, M-major, B = K), which needs both
//     warpgroups' dSᵀ halves. It does so one tile late, as the D 128 kernel does (ds_full /
//     ds_empty mbarriers, two dSᵀ buffers): in iteration it, after its own dSᵀ(it) is stored,
//     it waits for dSᵀ(it − 1) and releases that buffer after its dQ GEMM. Each warpgroup adds
//     one 16 KB tile (its 64 rows = one dq_acc 64-row block) per 128-query tile: half the bulk
//     reductions and staging traffic per FLOP of the old kernel's two partial tiles per 64
//     queries.
//   - Q / dO ring: 2 stages of 16 KB each (3 do not fit: 226 KB + stats + barriers).
// Per 128 x 128 tile (both warpgroups): 10.5 MFLOP of wgmma in 2 x 32 wgmma instructions (the
// old kernel: 2 x 40 for two 128 x 64 tiles), half the per-tile waits, barriers, fences and bulk
// operations per FLOP, 352 instead of 384 KB of shared-memory traffic.
//
// In a translation unit of its own: a second backward kernel beside another changes one
// address expression of that kernel's PTX (attention_notes.md, attn10).
#include "kernels/cuda/attention_wgmma.cuh"

namespace gyre::cuda {
namespace {

constexpr int kQ128Stages = 2;

struct BwdQ128Layout {
  static constexpr int kKVBytes = 128 * 64 * 2;  // K, V: 128 rows x 64 features
  static constexpr int kQBytes = 128 * 64 * 2;   // Q, dO: 128 rows
  static constexpr int kDSBytes = 128 * 128 * 2;  // dSᵀ: 128 keys x 128 queries (2 column blocks)
  static constexpr int kDqBytes = 64 * 64 * 4;    // a warpgroup's fp32 dQ staging tile
  static constexpr int kK = 0, kV = kKVBytes, kQ = 2 * kKVBytes;
  static constexpr int kDO = kQ + kQ128Stages * kQBytes;
  static constexpr int kDS = kDO + kQ128Stages * kQBytes;  // [2]
  static constexpr int kDQ = kDS + 2 * kDSBytes;           // [2 warpgroups]
  static constexpr int kStats = kDQ + 2 * kDqBytes;        // [stages] lse[128], D[128]
  static constexpr int kBars = kStats + kQ128Stages * 1024;
  // full[stages], empty[stages], ds_full[2], ds_empty[2]
  static constexpr int kBytes = kBars + 8 * (2 * kQ128Stages + 4) + 1024;  // + alignment slack
  static_assert(kBytes <= 227 * 1024, "backward tiles exceed shared memory");
};

// Shared-memory accesses through 32-bit shared addresses (no 64-bit generic pointers live in
// the consumer loop, whose registers are nearly all taken by accumulators).
__device__ __forceinline__ float2 LdSharedF2(uint32_t addr) {
  float2 v;
  asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n" : "=f"(v.x), "=f"(v.y) : "r"(addr));
  return v;
}
__device__ __forceinline__ void StSharedF2(uint32_t addr, float x, float y) {
  asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(addr), "f"(x), "f"(y) : "memory");
}
__device__ __forceinline__ void StShared32(uint32_t addr, uint32_t v) {
  asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
}

template <bool kRope>
__device__ __forceinline__ void BwdQ128Body(const WgmmaBwdParams& p, const BwdTmaMaps& maps,
                                            const int head_group) {
  using L = BwdQ128Layout;
  constexpr int kD = 64, kBN = 128, kBM = 128;
  constexpr int kKBlock = kBN * 128;  // bytes of a 128-row, 64-column swizzled block
  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw = SmemAddr(smem_raw);
  uint32_t base = (raw + 1023u) & ~1023u;
  const uint32_t sK = base + L::kK, sV = base + L::kV;
  auto full_bar = [&](int s) { return base + L::kBars + 8 * s; };
  auto empty_bar = [&](int s) { return base + L::kBars + 8 * (kQ128Stages + s); };
  auto ds_full = [&](int b) { return base + L::kBars + 8 * (2 * kQ128Stages + b); };
  auto ds_empty = [&](int b) { return base + L::kBars + 8 * (2 * kQ128Stages + 2 + b); };

  const int tid = threadIdx.x, wg = tid / 128, wtid = tid % 128;
  if (tid == 0) {
    for (int s = 0; s < kQ128Stages; ++s) {
      MbInit(full_bar(s), 128);
      MbInit(empty_bar(s), 256);
    }
    for (int i = 0; i < 2; ++i) {
      MbInit(ds_full(i), 256);
      MbInit(ds_empty(i), 256);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  int rank, pair;
  GroupedBlockOrder(blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z), gridDim.x,
                    gridDim.y * gridDim.z, head_group, rank, pair);
  const int n_block = rank;  // longest first
  int hk = pair % gridDim.y, b = pair / gridDim.y;
  const int seq = p.seq;
  const int n0 = n_block * kBN;
  const int64_t row_base = static_cast<int64_t>(b) * seq;
  const int m_first = n_block;  // 128-query tiles: the diagonal tile has the block's index
  const int m_tiles = (seq + kBM - 1) / kBM;
  int m_tiles64 = (seq + 63) / 64;  // dq_acc's 64-row blocks
  const int per_head = m_tiles - m_first;
  const int total = p.group * per_head;

  if (wg == 0) {
    // ---------------------------------------------------------------- producer warpgroup
    asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n" ::: "memory");
    for (int it = 0; it < total; ++it) {
      const int s = it % kQ128Stages;
      MbWait(empty_bar(s), ((it / kQ128Stages) & 1) ^ 1);
      const int h = hk * p.group + it / per_head;
      const int m0 = (m_first + it % per_head) * kBM;
      if (wtid == 0) {
        MbarExpectTx(full_bar(s), 2 * L::kQBytes + (it == 0 ? 2 * L::kKVBytes : 0));
        if (it == 0) {
          TmaTile4d(sK, &maps.k, full_bar(s), 0, hk, n0, b);
          TmaTile4d(sV, &maps.v, full_bar(s), 0, hk, n0, b);
        }
        TmaTile4d(base + L::kQ + s * L::kQBytes, &maps.q, full_bar(s), 0, h, m0, b);
        TmaTile4d(base + L::kDO + s * L::kQBytes, &maps.dout, full_bar(s), 0, h, m0, b);
      }
      // Thread r copies lse and D of query row m0 + r (zeros past T) and arrives once both
      // landed (128 arrivals + the TMA bytes complete the stage).
      const bool valid = m0 + wtid < seq;
      const int64_t off = (static_cast<int64_t>(b) * p.heads + h) * seq + (valid ? m0 + wtid : 0);
      const uint32_t dst = base + L::kStats + s * 1024 + wtid * 4;
      asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(p.lse + off),
                   "r"(valid ? 4 : 0));
      asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst + 512),
                   "l"(p.dvec + off), "r"(valid ? 4 : 0));
      CpAsyncMbarArrive(full_bar(s));
    }
    return;
  }

  // ------------------------------------------------------------------ consumer warpgroups
  asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n" ::: "memory");
  const int cwg = wg - 1;
  // Not const: laundered at the top of each tile (below).
  int warp_in_wg = wtid / 32, lane = tid % 32, g = lane / 4, tq = lane % 4;
  int kw0 = n0 + 64 * cwg;                 // this warpgroup's first key
  int key_lo = kw0 + 16 * warp_in_wg + g;  // thread keys key_lo, key_lo + 8
  uint32_t sDQ = base + L::kDQ + cwg * L::kDqBytes;
  const bool reducer = wtid == 0;

  float dk[32], dv[32];
#pragma unroll
  for (int i = 0; i < 32; ++i) dk[i] = dv[i] = 0.f;

  // dQ rows 64c..64c+63 of tile `pit` (dSᵀ buffer pit & 1) over all 128 keys; A = dS (M-major:
  // this warpgroup's queries are column block c of dSᵀ), B = K rows (N-major).
  auto issue_dq = [&](float (&dq)[32], uint32_t kb, int buf) {
    const uint32_t sdS = base + L::kDS + buf * L::kDSBytes + cwg * kKBlock;
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      const uint32_t row_off = 16 * kk * 128;
      WgmmaSS64<1, 1>(dq, SmemDescSw128(sdS + row_off, 64 * 128, 1024),
                      SmemDescSw128(kb + row_off, kKBlock, 1024), kk > 0);
    }
  };
  // dQ tile -> staging tile (fp32, row r column c at c ^ 8(r % 4)) -> one bulk reduction into
  // dq_acc's 64-row block 2·m_tile + c of head h (none past T: those rows are all zero).
  auto reduce_dq = [&](const float (&dq)[32], int h, int m_tile) {
    const int block64 = 2 * m_tile + cwg;
    if (block64 >= m_tiles64) return;  // uniform over the warpgroup
    if (reducer) BulkWaitRead<0>();  // the previous reduction has read the staging tile
    NamedBarrierSync(3 + cwg, 128);
#pragma unroll
    for (int c = 0; c < 8; ++c)
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const int r = 16 * warp_in_wg + g + 8 * hr;
        const int col = (8 * c + 2 * tq) ^ (8 * (r & 3));
        StSharedF2(sDQ + (r * 64 + col) * 4, dq[4 * c + 2 * hr], dq[4 * c + 2 * hr + 1]);
      }
    FenceProxyAsync();
    NamedBarrierSync(3 + cwg, 128);
    if (reducer) {
      float* dst = p.dq_acc +
                   ((static_cast<int64_t>(b) * p.heads + h) * m_tiles64 + block64) * (64 * 64);
      BulkReduceAddF32(dst, sDQ, L::kDqBytes);
    }
  };

  for (int it = 0; it < total; ++it) {
    // Loop invariants laundered per tile: the compiler recomputes what it derives from them
    // (shared-memory offsets, the mask's bounds) instead of keeping it in registers across the
    // loop, which made ptxas spill (8-12 bytes) with 192 accumulator registers live.
    asm volatile("" : "+r"(base), "+r"(g), "+r"(tq), "+r"(warp_in_wg), "+r"(key_lo), "+r"(kw0),
                 "+r"(sDQ), "+r"(hk), "+r"(b), "+r"(m_tiles64));
    const int m_tile = m_first + it % per_head;
    const int m0 = m_tile * kBM;
    const int s = it % kQ128Stages;
    const uint32_t sQ = base + L::kQ + s * L::kQBytes, sdO = base + L::kDO + s * L::kQBytes;
    const uint32_t sdS = base + L::kDS + (it & 1) * L::kDSBytes;
    const uint32_t lse_s = base + L::kStats + s * 1024, d_s = lse_s + 512;
    MbWait(full_bar(s), (it / kQ128Stages) & 1);
    // Laundered per tile so that the descriptors are rebuilt from these bases rather than
    // hoisted into registers.
    uint32_t kb = sK, vb = sV;
    asm volatile("" : "+r"(kb), "+r"(vb));

    // Sᵀ = K_c Qᵀ, dPᵀ = V_c dOᵀ: m64n128k16 x 4 each, both operands K-major in shared memory.
    float st[64], dpt[64];
    WgmmaFence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      WgmmaSS128<0, 0>(st, SmemDescSw128(kb + 64 * cwg * 128 + kk * 32, 16, 1024),
                       SmemDescSw128(sQ + kk * 32, 16, 1024), kk > 0);
    }
    WgmmaCommit();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      WgmmaSS128<0, 0>(dpt, SmemDescSw128(vb + 64 * cwg * 128 + kk * 32, 16, 1024),
                       SmemDescSw128(sdO + kk * 32, 16, 1024), kk > 0);
    }
    WgmmaCommit();
    WgmmaWait<1>();  // Sᵀ done; dPᵀ may still run
    FenceRegs(st);

    // Pᵀ; element (key_lo + 8hr, query m0 + 8c + 2tq + e) at index 4c + 2hr + e, c < 16.
    // The mask (query < key, or key past T) is applied to the packed bf16 Pᵀ and dSᵀ below,
    // when Sᵀ and dPᵀ are no longer live: applied to the fp32 values here it made ptxas spill
    // (8-76 bytes: the mask's integers on top of the 192 accumulator registers). A masked P
    // may be inf here (exp of a future score), and its dS inf or NaN: both are zeroed as bits.
    // A query row past T needs no mask: its Q = dO = 0 (TMA zero fill) and lse = D = 0
    // (cp.async zero fill), so its P is 1 and its dS, dV and dK terms are 0.
    const bool need_mask = m0 < kw0 + 63 || kw0 + 64 > seq;
#pragma unroll
    for (int c = 0; c < kBM / 8; ++c) {
      const float2 l2 = LdSharedF2(lse_s + 4 * (8 * c + 2 * tq));
#pragma unroll
      for (int hr = 0; hr < 2; ++hr)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int i = 4 * c + 2 * hr + e;
          st[i] = Exp2(fmaf(st[i], p.scale_log2, -(e ? l2.y : l2.x) * kLog2eF));
        }
    }
    WgmmaWait<0>();  // dPᵀ done
    FenceRegs(dpt);
#pragma unroll
    for (int c = 0; c < kBM / 8; ++c) {
      const float2 d2 = LdSharedF2(d_s + 4 * (8 * c + 2 * tq));
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
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        pa[kk][j] = PackBf16(st[8 * kk + 2 * j], st[8 * kk + 2 * j + 1]);
        da[kk][j] = PackBf16(dpt[8 * kk + 2 * j], dpt[8 * kk + 2 * j + 1]);
      }
    }
    if (need_mask) {
#pragma unroll
      for (int kk = 0; kk < kBM / 16; ++kk)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int key = key_lo + 8 * (j % 2);
          // query − key (keys past T: as if after every query)
          const int rel = m0 + 16 * kk + 8 * (j / 2) + 2 * tq - (key < seq ? key : 1 << 30);
          const uint32_t keep = (rel >= 0 ? 0xFFFFu : 0u) | (rel >= -1 ? 0xFFFF0000u : 0u);
          pa[kk][j] &= keep;
          da[kk][j] &= keep;
        }
    }
    // dV += Pᵀ dO, dK += dSᵀ Q (k = 128 queries; B = dO / Q rows, N-major); they run under the
    // dSᵀ stores and the previous tile's dQ.
    WgmmaFence();
#pragma unroll
    for (int kk = 0; kk < kBM / 16; ++kk) {
      WgmmaRS64(dv, pa[kk], SmemDescSw128(sdO + kk * 16 * 128, kKBlock, 1024));
      WgmmaRS64(dk, da[kk], SmemDescSw128(sQ + kk * 16 * 128, kKBlock, 1024));
    }
    WgmmaCommit();
    // Both warpgroups read dSᵀ(it − 2) (same buffer) in their dQ GEMMs of iteration it − 1.
    if (it >= 2) MbWait(ds_empty(it & 1), ((it >> 1) + 1) & 1);
    // dSᵀ to shared memory (rows = keys 64c + 16·warp + g (+8), columns = the 128 queries).
#pragma unroll
    for (int kk = 0; kk < kBM / 16; ++kk)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int r = 64 * cwg + 16 * warp_in_wg + g + 8 * (j % 2);
        const int col = 16 * kk + 8 * (j / 2) + 2 * tq;
        StShared32(sdS + Sw128Offset<kBN>(r, col), da[kk][j]);
      }
    FenceProxyAsync();
    MbArrive(ds_full(it & 1));  // this warpgroup's half of dSᵀ(it) is written
    if (it == 0) {
      WgmmaWait<0>();
      FenceRegs(pa);
      FenceRegs(da);
      FenceRegs(dv);
      FenceRegs(dk);
      MbArrive(empty_bar(s));
    } else {
      const int pit = it - 1;
      MbWait(ds_full(pit & 1), (pit >> 1) & 1);
      float dq[32];
      WgmmaFence();
      issue_dq(dq, kb, pit & 1);
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
      reduce_dq(dq, hk * p.group + pit / per_head, m_first + pit % per_head);
    }
  }
  {
    const int pit = total - 1;
    uint32_t kb = sK;
    asm volatile("" : "+r"(kb));
    MbWait(ds_full(pit & 1), (pit >> 1) & 1);
    float dq[32];
    WgmmaFence();
    issue_dq(dq, kb, pit & 1);
    WgmmaCommit();
    WgmmaWait<0>();
    FenceRegs(dq);
    reduce_dq(dq, hk * p.group + pit / per_head, m_first + pit % per_head);
  }
  StoreDkDv<kD, kRope>(p, dk, dv, key_lo, seq, row_base, hk, tq, [&] {
    if (reducer) BulkWait<0>();
  });
}

__global__ void __launch_bounds__(kWsThreads, 1)
    attn_bwd_q128_kernel(const WgmmaBwdParams p, const __grid_constant__ BwdTmaMaps maps,
                         const int head_group) {
  BwdQ128Body</*kRope=*/false>(p, maps, head_group);
}

__global__ void __launch_bounds__(kWsThreads, 1)
    attn_bwd_q128_rope_kernel(const WgmmaBwdParams p, const __grid_constant__ BwdTmaMaps maps,
                              const int head_group) {
  BwdQ128Body</*kRope=*/true>(p, maps, head_group);
}

}  // namespace

CudaResult LaunchAttentionBackwardWgmmaQ128(const WgmmaBwdParams& p, int64_t batch,
                                            int64_t kv_heads, cudaStream_t stream) {
  // Q and dO boxes of 128 rows; K and V as in the default.
  BwdTmaMaps maps{};
  CUDA_RETURN_IF_NOT_OK(EncodeRowsMap(&maps.q, p.q, 64, p.heads, p.seq, batch, p.q_stride, 128));
  CUDA_RETURN_IF_NOT_OK(
      EncodeRowsMap(&maps.dout, p.dout, 64, p.heads, p.seq, batch, p.heads * 64, 128));
  CUDA_RETURN_IF_NOT_OK(EncodeRowsMap(&maps.k, p.k, 64, static_cast<int>(kv_heads), p.seq, batch,
                                      p.kv_stride, 128));
  CUDA_RETURN_IF_NOT_OK(EncodeRowsMap(&maps.v, p.v, 64, static_cast<int>(kv_heads), p.seq, batch,
                                      p.kv_stride, 128));
  const dim3 grid = BwdGrid(p, batch, kv_heads);
  const int head_group = BwdHeadGroup(p, batch, kv_heads, 64);
  constexpr int smem = BwdQ128Layout::kBytes;
  auto* kernel = p.rope_half > 0 ? attn_bwd_q128_rope_kernel : attn_bwd_q128_kernel;
  CUDA_RETURN_IF_ERROR(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  kernel<<<grid, kWsThreads, smem, stream>>>(p, maps, head_group);
  CUDA_RETURN_IF_LAUNCH_ERROR("attn_bwd_q128_kernel (or _rope_kernel)");
  return {};
}

}  // namespace gyre::cuda
