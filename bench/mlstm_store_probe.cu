// mlstm_bench --store_probe (session 17, helper stateio17): mlstm_state_fwd_ws_tail's traffic
// with its math removed.
//
// Why: the state kernels move 0.80-0.88 GB a call at the 125m cell at 2.34-2.45 TB/s, while this
// H100 streams 3.18-3.20 TB/s (memset) and 2.96-2.97 TB/s (copy); two half blocks an SM did not
// help (helper state17), so the limit is something an SM's blocks share. Candidates: the write
// pattern of the saved states, L2 write-back beside the concurrent K / V reads, TMA store issue.
//
// What the probe kernel does (one template, the mode as bits): the grid, block shape and shared
// memory of mlstm_state_fwd_ws_tail (384 threads, ~195 KB of shared memory so one block an SM;
// at the 125m cell 528 full 128×128 tiles then 96 half tiles of 64 columns; x = dv tile fastest,
// then dk tile, then head), and per chunk k = 0..NC each consumer warp (8 a block, 16 state rows
// each) writes its rows of C_k:
//   - kTma: lane 0 waits until its previous boxes were read (as the kernel), the warp writes zeros
//     into its 8 KB staging area, fence, lane 0 stores the [16 rows][64 columns] boxes (hi and lo,
//     two column blocks each; one for a half tile) through 2-d tensor maps with the 128-byte
//     swizzle, exactly the kernel's StateTailStageOut boxes. Otherwise st.global.v4 of zeros.
//   - kBlocked: the same boxes into a blocked layout [BH][NC+1][dv/64][dk][64] per plane (a box
//     = 2 KB contiguous, a block's 8 warps = 16 KB contiguous a column block); else the saved
//     states' [BH][NC+1][dk][dv] layout (a box = 16 pieces of 128 bytes, 2·dv bytes apart).
//   - kLoads: the producer thread issues the kernel's K / V TMA loads (two 64 KB stages, the same
//     boxes and mbarriers) and each consumer warp waits for chunk k's stage and releases it after
//     its stores (no math: the stores of chunk k + 1 follow at once).
//   - kNoStores: loads only (the read stream alone).
//   - kEvictFirst: the TMA stores carry an L2 evict_first policy (added after the first call).
//   - kEvictLast: the K / V TMA loads carry an L2 evict_last policy (helper evict17): each K tile
//     is read by the 3 dv-tile blocks of its row, each V tile by the 3 dk-tile blocks.
// Then the fp32 last state (st.global.v4, [BH][dk][dv]) and, by the tile's n block, n_k
// ([BH][NC+1][dk] fp32). The real kernel stores C_NC with plain stores (StoreAccSplit), the probe
// with the mode's stores: the same bytes.
#include "bench/mlstm_store_probe.h"

#include <cuda.h>

#include <algorithm>
#include <cstring>
#include <utility>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/hopper_mma.cuh"
#include "kernels/cuda/tensor_map.h"

namespace gyre::cuda {
namespace {

using bf16 = __nv_bfloat16;

constexpr int kLoads = 1, kBlocked = 2, kPlain = 4, kNoStores = 8, kEvictFirst = 16, kEvictLast = 32;

// The L2-hinted TMA forms (TmaStore2dHint, TmaTile4dHint) and policies are hopper_mma.cuh's.

// mlstm.cu's StateWsSmem: 2 stages × (K two column blocks, V two) + 8 warps × 8 KB staging +
// mbarriers and state_bwd's coef / ddc stages: the same size, so one block an SM as there.
struct ProbeSmem {
  static constexpr int kTile64 = 128 * 128;
  static constexpr int kStage = 4 * kTile64;
  static constexpr int kOffV = 2 * kTile64;
  static constexpr int kStaging = 2 * kStage;
  static constexpr int kBars = kStaging + 8 * 8192;
  static constexpr size_t kBytes = kBars + 64 + 4 * 128 * 4 + 1024;
};

struct ProbeMaps {
  CUtensorMap k, v;    // 4-d (columns, heads, tokens, batch), box 64 × 1 × 128 × 1
  CUtensorMap c, c_lo; // 2-d, box 64 × 16: (dv, [BH][NC+1][dk] rows) or (64, blocked rows)
};
struct ProbeArgs {
  int B, S, NH, DK, DV, NC, nfull;
  bf16* c;
  bf16* c_lo;
  float* c_last;
  float* sn;
};

template <int kMode>
__global__ void __launch_bounds__(384, 1)
    mlstm_store_probe(ProbeArgs a, const __grid_constant__ ProbeMaps maps) {
  using namespace hopper;
  using SM = ProbeSmem;
  constexpr bool loads = kMode & kLoads, blocked = kMode & kBlocked, plain = kMode & kPlain,
                 stores = !(kMode & kNoStores), evict_first = kMode & kEvictFirst,
                 evict_last = kMode & kEvictLast;
  constexpr int L = 128;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* sm = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  const uint32_t sa = SmemAddr(sm);
  const uint32_t full = sa + SM::kBars, empty = full + 16;
  // StateTailTileOf: blocks [0, nfull) full tiles, then two 64-column halves a tile.
  const bool half = static_cast<int>(blockIdx.x) >= a.nfull;
  const int tx = a.DV / 128, ty = a.DK / 128, i = static_cast<int>(blockIdx.x);
  const int u = half ? a.nfull + ((i - a.nfull) >> 1) : i;
  const int hs = half ? ((i - a.nfull) & 1) : 0;
  const int part = u % tx, j0 = part * 128 + 64 * hs, a0 = ((u / tx) % ty) * 128, bh = u / (tx * ty);
  const bool n_block = hs == 0 && part == 0;
  const int ncb = half ? 1 : 2;  // 64-column blocks of this tile
  if (threadIdx.x == 0) {
    for (int s = 0; s < 2; ++s) {
      MbInit(full + 8 * s, 1);
      MbInit(empty + 8 * s, 8);
    }
    MbInitFence();
  }
  __syncthreads();
  if (threadIdx.x < 128) {
    if (loads && threadIdx.x == 0) {
      const int b = bh / a.NH, hd = bh % a.NH;
      uint64_t load_policy = 0;
      if (evict_last) load_policy = L2PolicyEvictLast();
      for (int k = 0; k < a.NC; ++k) {
        const int slot = k & 1, use = k >> 1;
        if (use > 0) MbWait(empty + 8 * slot, (use - 1) & 1);
        const uint32_t st = sa + slot * SM::kStage, fb = full + 8 * slot;
        MbArriveExpectTx(fb, (2 + ncb) * SM::kTile64);
        if (evict_last) {
          TmaTile4dHint(st, &maps.k, fb, a0, hd, k * L, b, load_policy);
          TmaTile4dHint(st + SM::kTile64, &maps.k, fb, a0 + 64, hd, k * L, b, load_policy);
          TmaTile4dHint(st + SM::kOffV, &maps.v, fb, j0, hd, k * L, b, load_policy);
          if (!half) TmaTile4dHint(st + SM::kOffV + SM::kTile64, &maps.v, fb, j0 + 64, hd, k * L, b, load_policy);
        } else {
          TmaTile4d(st, &maps.k, fb, a0, hd, k * L, b);
          TmaTile4d(st + SM::kTile64, &maps.k, fb, a0 + 64, hd, k * L, b);
          TmaTile4d(st + SM::kOffV, &maps.v, fb, j0, hd, k * L, b);
          if (!half) TmaTile4d(st + SM::kOffV + SM::kTile64, &maps.v, fb, j0 + 64, hd, k * L, b);
        }
      }
    }
    return;
  }
  const int lane = threadIdx.x & 31, w = (threadIdx.x - 128) >> 5;
  const int row0 = a0 + 16 * w;
  unsigned char* stg = sm + SM::kStaging + w * 8192;  // hi blocks at +0, +2048; lo at +4096, +6144
  const uint32_t stg_a = SmemAddr(stg);
  const uint4 zero = make_uint4(0, 0, 0, 0);
  uint64_t policy = 0;
  if (evict_first) policy = L2PolicyEvictFirst();
  int slot = 0, phase = 0;
  for (int k = 0; k <= a.NC; ++k) {
    const int64_t state = static_cast<int64_t>(bh) * (a.NC + 1) + k;
    if (stores && !plain) {
      if (lane == 0) BulkWaitRead<0>();
      __syncwarp();
#pragma unroll
      for (int q = 0; q < 16; ++q) reinterpret_cast<uint4*>(stg)[lane + 32 * q] = zero;
      FenceProxyAsync();
      __syncwarp();
      if (lane == 0) {
        for (int cb = 0; cb < ncb; ++cb) {
          int c0, c1;
          if (blocked) {
            c0 = 0;
            c1 = static_cast<int>((state * (a.DV / 64) + j0 / 64 + cb) * a.DK + row0);
          } else {
            c0 = j0 + 64 * cb;
            c1 = static_cast<int>(state * a.DK + row0);
          }
          if (evict_first) {
            TmaStore2dHint(&maps.c, stg_a + 2048 * cb, c0, c1, policy);
            TmaStore2dHint(&maps.c_lo, stg_a + 4096 + 2048 * cb, c0, c1, policy);
          } else {
            TmaStore2d(&maps.c, stg_a + 2048 * cb, c0, c1);
            TmaStore2d(&maps.c_lo, stg_a + 4096 + 2048 * cb, c0, c1);
          }
        }
        BulkCommit();
      }
    } else if (stores) {
      // 16 rows × ncb·128 bytes a plane, 16-byte pieces, lane-contiguous.
      for (int cb = 0; cb < ncb; ++cb) {
        if (blocked) {  // 2 KB contiguous: 4 instructions a plane
          const int64_t base = ((state * (a.DV / 64) + j0 / 64 + cb) * a.DK + row0) * 64;
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            reinterpret_cast<uint4*>(a.c + base)[lane + 32 * q] = zero;
            reinterpret_cast<uint4*>(a.c_lo + base)[lane + 32 * q] = zero;
          }
        } else {  // rows of 128 bytes (8 pieces) 2·dv bytes apart: 4 rows an instruction
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            const int r = 4 * q + (lane >> 3);
            const int64_t off = (state * a.DK + row0 + r) * a.DV + j0 + 64 * cb + 8 * (lane & 7);
            *reinterpret_cast<uint4*>(a.c + off) = zero;
            *reinterpret_cast<uint4*>(a.c_lo + off) = zero;
          }
        }
      }
    }
    if (stores && n_block && lane < 16) a.sn[state * a.DK + row0 + lane] = 0.f;
    if (k == a.NC) break;
    if (loads) {
      MbWait(full + 8 * slot, phase);
      __syncwarp();
      if (lane == 0) MbArrive(empty + 8 * slot);
      if (++slot == 2) {
        slot = 0;
        phase ^= 1;
      }
    }
  }
  if (stores) {
    // The fp32 last state: 16 rows × ncb·256 bytes (16 pieces a column block).
    for (int cb = 0; cb < ncb; ++cb) {
#pragma unroll
      for (int q = 0; q < 8; ++q) {
        const int r = 2 * q + (lane >> 4);
        const int64_t off = (static_cast<int64_t>(bh) * a.DK + row0 + r) * a.DV + j0 + 64 * cb + 4 * (lane & 15);
        *reinterpret_cast<uint4*>(a.c_last + off) = zero;
      }
    }
  }
  if (stores && !plain && lane == 0) BulkWait<0>();
}

// Counts 16-byte words that are not all zero.
__global__ void count_nonzero_words(const uint4* p, size_t n, unsigned long long* count) {
  unsigned long long local = 0;
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n; i += size_t{gridDim.x} * blockDim.x) {
    const uint4 x = p[i];
    local += (x.x | x.y | x.z | x.w) != 0;
  }
  for (int o = 16; o > 0; o >>= 1) local += __shfl_xor_sync(0xffffffffu, local, o);
  if ((threadIdx.x & 31) == 0 && local != 0) atomicAdd(count, local);
}

CudaResult Encode(CUtensorMap* map, const void* base, int rank, const cuuint64_t* dims,
                  const cuuint64_t* strides, int box_rows) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = TensorMapEncoder();
  if (encode == nullptr) return {1, "cuTensorMapEncodeTiled: not found in the driver"};
  const cuuint32_t box4[4] = {64, 1, static_cast<cuuint32_t>(box_rows), 1};
  const cuuint32_t box2[2] = {64, static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t elem[4] = {1, 1, 1, 1};
  const CUresult r = encode(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, rank, const_cast<void*>(base), dims,
                            strides, rank == 4 ? box4 : box2, elem, CU_TENSOR_MAP_INTERLEAVE_NONE,
                            CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) return {static_cast<int>(r), "store probe: cuTensorMapEncodeTiled failed"};
  return {};
}

struct ModeInfo {
  const char* name;
  int mode;
  bool unsplit;  // 576 full blocks instead of the split tail grid
};
constexpr ModeInfo kModes[] = {
    {"tma state-layout stores", 0, false},
    {"tma state-layout stores + K/V loads", kLoads, false},
    {"tma blocked stores", kBlocked, false},
    {"tma blocked stores + K/V loads", kLoads | kBlocked, false},
    {"st.global.v4 state-layout stores", kPlain, false},
    {"st.global.v4 state-layout + K/V loads", kPlain | kLoads, false},
    {"st.global.v4 blocked stores", kPlain | kBlocked, false},
    {"K/V loads only", kLoads | kNoStores, false},
    {"tma state-layout stores, unsplit grid", 0, true},
    // Added after the first call (not yet measured): is the loads + stores gap L2 eviction of K / V?
    {"tma state-layout evict_first + K/V loads", kLoads | kEvictFirst, false},
    {"tma blocked evict_first + K/V loads", kLoads | kBlocked | kEvictFirst, false},
    // helper evict17: which side of the mix an L2 policy helps (stores evict_first, loads evict_last).
    {"tma state-layout stores evict_first", kEvictFirst, false},
    {"tma state-layout + K/V loads evict_last", kLoads | kEvictLast, false},
    {"tma state-layout evict_first + K/V loads evict_last", kLoads | kEvictFirst | kEvictLast, false},
    {"K/V loads only evict_last", kLoads | kNoStores | kEvictLast, false},
};

// blocks == 0: only sets the kernel's shared-memory limit (once, before any timing).
template <int kMode>
CudaResult LaunchMode(int blocks, const ProbeArgs& a, const ProbeMaps& m, cudaStream_t stream) {
  const size_t smem = ProbeSmem::kBytes;
  if (blocks == 0) {
    CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(mlstm_store_probe<kMode>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                              static_cast<int>(smem)));
    return {};
  }
  mlstm_store_probe<kMode><<<blocks, 384, smem, stream>>>(a, m);
  CUDA_RETURN_IF_LAUNCH_ERROR("mlstm_store_probe");
  return {};
}
CudaResult Launch(int mode, int blocks, const ProbeArgs& a, const ProbeMaps& m, cudaStream_t stream) {
  switch (mode) {
    case 0: return LaunchMode<0>(blocks, a, m, stream);
    case kLoads: return LaunchMode<kLoads>(blocks, a, m, stream);
    case kBlocked: return LaunchMode<kBlocked>(blocks, a, m, stream);
    case kLoads | kBlocked: return LaunchMode<kLoads | kBlocked>(blocks, a, m, stream);
    case kPlain: return LaunchMode<kPlain>(blocks, a, m, stream);
    case kPlain | kLoads: return LaunchMode<kPlain | kLoads>(blocks, a, m, stream);
    case kPlain | kBlocked: return LaunchMode<kPlain | kBlocked>(blocks, a, m, stream);
    case kLoads | kNoStores: return LaunchMode<kLoads | kNoStores>(blocks, a, m, stream);
    case kLoads | kEvictFirst: return LaunchMode<kLoads | kEvictFirst>(blocks, a, m, stream);
    case kLoads | kBlocked | kEvictFirst: return LaunchMode<kLoads | kBlocked | kEvictFirst>(blocks, a, m, stream);
    case kEvictFirst: return LaunchMode<kEvictFirst>(blocks, a, m, stream);
    case kLoads | kEvictLast: return LaunchMode<kLoads | kEvictLast>(blocks, a, m, stream);
    case kLoads | kEvictFirst | kEvictLast: return LaunchMode<kLoads | kEvictFirst | kEvictLast>(blocks, a, m, stream);
    case kLoads | kNoStores | kEvictLast: return LaunchMode<kLoads | kNoStores | kEvictLast>(blocks, a, m, stream);
  }
  return InvalidArgument("store probe: unknown mode");
}

}  // namespace

StoreProbeSizes StoreProbeBytes(const StoreProbeShape& s) {
  const size_t T = size_t(s.batch) * s.seq_len * s.num_heads, bh = size_t(s.batch) * s.num_heads;
  const size_t nc = (s.seq_len + 127) / 128;
  return {T * s.dk * 2, T * s.dv * 2, bh * (nc + 1) * s.dk * s.dv * 2, bh * s.dk * s.dv * 4,
          bh * (nc + 1) * s.dk * 4};
}

CudaResult RunMlstmStoreProbe(const StoreProbeShape& s, const StoreProbeBuffers& b, int reps,
                              cudaStream_t stream, std::vector<StoreProbeLine>* lines) {
  if (s.dk % 128 != 0 || s.dv % 128 != 0) return InvalidArgument("store probe: dk, dv multiples of 128");
  const StoreProbeSizes z = StoreProbeBytes(s);
  const int bhn = s.batch * s.num_heads, nc = (s.seq_len + 127) / 128;
  ProbeArgs a{s.batch, s.seq_len, s.num_heads, s.dk, s.dv, nc, 0, b.c, b.c_lo, b.c_last, b.sn};
  // StateTailPlan: the tiles of the partial last wave run as halves when they fit in one wave.
  int dev = 0, sms = 0;
  CUDA_RETURN_IF_ERROR(cudaGetDevice(&dev));
  CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  const int tiles = (s.dv / 128) * (s.dk / 128) * bhn, tail = tiles % sms;
  const bool split = tail != 0 && 2 * tail <= sms;
  const int split_nfull = split ? tiles - tail : tiles, split_blocks = split ? tiles + tail : tiles;

  ProbeMaps state_maps{}, blocked_maps{};
  const cuuint64_t tok_k[4] = {cuuint64_t(s.dk), cuuint64_t(s.num_heads), cuuint64_t(s.seq_len), cuuint64_t(s.batch)};
  const cuuint64_t tok_v[4] = {cuuint64_t(s.dv), cuuint64_t(s.num_heads), cuuint64_t(s.seq_len), cuuint64_t(s.batch)};
  const cuuint64_t str_k[3] = {cuuint64_t(s.dk) * 2, cuuint64_t(s.num_heads) * s.dk * 2,
                               cuuint64_t(s.seq_len) * s.num_heads * s.dk * 2};
  const cuuint64_t str_v[3] = {cuuint64_t(s.dv) * 2, cuuint64_t(s.num_heads) * s.dv * 2,
                               cuuint64_t(s.seq_len) * s.num_heads * s.dv * 2};
  const cuuint64_t rows = cuuint64_t(bhn) * (nc + 1) * s.dk;
  const cuuint64_t st_dims[2] = {cuuint64_t(s.dv), rows}, st_str[1] = {cuuint64_t(s.dv) * 2};
  const cuuint64_t bl_dims[2] = {64, rows * (s.dv / 64)}, bl_str[1] = {128};
  for (ProbeMaps* m : {&state_maps, &blocked_maps}) {
    CUDA_RETURN_IF_NOT_OK(Encode(&m->k, b.k, 4, tok_k, str_k, 128));
    CUDA_RETURN_IF_NOT_OK(Encode(&m->v, b.v, 4, tok_v, str_v, 128));
  }
  CUDA_RETURN_IF_NOT_OK(Encode(&state_maps.c, b.c, 2, st_dims, st_str, 16));
  CUDA_RETURN_IF_NOT_OK(Encode(&state_maps.c_lo, b.c_lo, 2, st_dims, st_str, 16));
  CUDA_RETURN_IF_NOT_OK(Encode(&blocked_maps.c, b.c, 2, bl_dims, bl_str, 16));
  CUDA_RETURN_IF_NOT_OK(Encode(&blocked_maps.c_lo, b.c_lo, 2, bl_dims, bl_str, 16));

  const int nmodes = static_cast<int>(sizeof(kModes) / sizeof(kModes[0]));
  for (const ModeInfo& m : kModes) CUDA_RETURN_IF_NOT_OK(Launch(m.mode, 0, a, state_maps, stream));
  auto launch = [&](int i) -> CudaResult {
    const ModeInfo& m = kModes[i];
    ProbeArgs args = a;
    args.nfull = m.unsplit ? tiles : split_nfull;
    return Launch(m.mode, m.unsplit ? tiles : split_blocks, args, (m.mode & kBlocked) ? blocked_maps : state_maps,
                  stream);
  };

  // Coverage: poison, one launch, count the 16-byte words still not zero.
  lines->assign(nmodes, {});
  unsigned long long* count = nullptr;
  CUDA_RETURN_IF_ERROR(cudaMalloc(&count, sizeof(unsigned long long)));
  for (int i = 0; i < nmodes; ++i) {
    StoreProbeLine& l = (*lines)[i];
    l.name = kModes[i].name;
    const bool stores = !(kModes[i].mode & kNoStores);
    l.write_bytes = stores ? double(2 * z.plane + z.c_last + z.sn) : 0.0;
    l.read_bytes = (kModes[i].mode & kLoads) ? double(z.tokens_k + z.tokens_v) : 0.0;
    if (!stores) continue;
    for (void* p : {static_cast<void*>(b.c), static_cast<void*>(b.c_lo)}) {
      CUDA_RETURN_IF_ERROR(cudaMemsetAsync(p, 0xff, z.plane, stream));
    }
    CUDA_RETURN_IF_ERROR(cudaMemsetAsync(b.c_last, 0xff, z.c_last, stream));
    CUDA_RETURN_IF_ERROR(cudaMemsetAsync(b.sn, 0xff, z.sn, stream));
    CUDA_RETURN_IF_NOT_OK(launch(i));
    CUDA_RETURN_IF_ERROR(cudaMemsetAsync(count, 0, sizeof(unsigned long long), stream));
    const std::pair<const void*, size_t> bufs[] = {
        {b.c, z.plane}, {b.c_lo, z.plane}, {b.c_last, z.c_last}, {b.sn, z.sn}};
    for (const auto& [p, bytes] : bufs) {
      count_nonzero_words<<<1024, 256, 0, stream>>>(static_cast<const uint4*>(p), bytes / 16, count);
      CUDA_RETURN_IF_LAUNCH_ERROR("count_nonzero_words");
    }
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(&l.unwritten_words, count, sizeof(unsigned long long),
                                         cudaMemcpyDeviceToHost, stream));
    CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  }
  CUDA_RETURN_IF_ERROR(cudaFree(count));

  // Timing: every round launches each mode kBatch times back to back between two events (the
  // launch gap after the first event amortised), modes interleaved round by round.
  constexpr int kBatch = 3;
  cudaEvent_t e0, e1;
  CUDA_RETURN_IF_ERROR(cudaEventCreate(&e0));
  CUDA_RETURN_IF_ERROR(cudaEventCreate(&e1));
  std::vector<std::vector<float>> ms(nmodes);
  for (int r = 0; r < reps + 3; ++r) {
    for (int i = 0; i < nmodes; ++i) {
      CUDA_RETURN_IF_ERROR(cudaEventRecord(e0, stream));
      for (int j = 0; j < kBatch; ++j) CUDA_RETURN_IF_NOT_OK(launch(i));
      CUDA_RETURN_IF_ERROR(cudaEventRecord(e1, stream));
      CUDA_RETURN_IF_ERROR(cudaEventSynchronize(e1));
      float t = 0;
      CUDA_RETURN_IF_ERROR(cudaEventElapsedTime(&t, e0, e1));
      if (r >= 3) ms[i].push_back(t / kBatch);
    }
  }
  CUDA_RETURN_IF_ERROR(cudaEventDestroy(e0));
  CUDA_RETURN_IF_ERROR(cudaEventDestroy(e1));
  for (int i = 0; i < nmodes; ++i) {
    std::sort(ms[i].begin(), ms[i].end());
    const size_t n = ms[i].size();
    (*lines)[i].ms = n % 2 ? ms[i][n / 2] : 0.5 * (ms[i][n / 2 - 1] + ms[i][n / 2]);
  }
  return {};
}

}  // namespace gyre::cuda
