// The D 64 causal forward, plain and with the fused RoPE of q (attention_wgmma.cu's
// LaunchAttentionForwardWgmma sends every D 64 call without SelfExtend here; SelfExtend and D 128
// keep attention_wgmma.cu's attn_fwd_ws_kernel). Own translation unit, so the other attention
// kernels' PTX stays what it was (attention_notes.md, attn10: a kernel added to or removed from a
// translation unit perturbs the others' PTX).
//
// attn_fwd64_kernel: grid (ceil(T / 192), H, B) in GroupedBlockOrder; 512 threads = one TMA
// producer warpgroup and THREE consumer warpgroups of 64 query rows each (192-row blocks, FA3's
// D 64 forward), where attn_fwd_ws_kernel has two (128-row blocks). Key tiles of 128 keys; K and
// V in two stages each (mbarrier rings: full counted by TMA, empty by the 384 consumer threads).
// Per consumer step u, in its turn:
//   issue S(u) = Q K(u)ᵀ (m64n128k16 x 4, both operands in shared memory) and
//   O += P(u−1) V(u−1) (m64n64k16 x 8, P in registers), pass the turn on;
//   wait S(u); mask (only on the diagonal / past T); row max, exp2, row sum;
//   wait P V; rescale O; pack P(u).
// The turn is a ring of named barriers (ids 1..3): warpgroup c issues its GEMMs after c − 1
// (mod 3) issued its own, so the other two softmaxes run under each warpgroup's GEMMs.
// Why three (counts and measurements in attention_notes.md, "attn64f"): at D 64 a 64 x 128 step
// costs 512 tensor and 512 MUFU clocks per SM, but with two warpgroups each took ~3300 clocks
// with no pipe more than ~40% busy (latency: S wait → softmax chain → pack → turn); a third
// warpgroup puts a third such chain on the same pipes. H100, B8 / B16 S2048 H12: 0.91-0.93x the
// two-warpgroup kernel's time (ncu 153 vs 166 µs), at or below SDPA cuDNN's forward. Tried and
// slower (deleted): 4 K / V stages with two warpgroups (+2%), 3 stages with three (+1-3% over
// two), three warpgroups without the ring (+2-4%).
// Registers: 512 threads x 128 at launch = 65536; the producer drops to 32, the consumers take
// 160 each (32 + 3 · 160 = 512 per four threads); ptxas: 0 spills.
// Causal skip per warpgroup: with 192-row blocks and 128-key tiles, a block's lower warpgroups
// need fewer key tiles than its last one (rows 0..63 of block 0 see keys 0..63 only). A warpgroup
// past its own last tile keeps taking its turns (the ring needs every member), issues its last
// P V in the first of them and only releases the K / V stages after they landed (an arrival on an
// empty barrier before the stage's fill could count toward the stage's previous phase). So each
// warpgroup computes the tiles the two-warpgroup kernel computes for the same rows (272 64 x 128
// steps per (batch, head) at T 2048 either way; without the skip 303).
// Output: O / l staged through the warpgroup's own Q rows, 16-byte stores; lse = m·scale + ln l.
// Same arithmetic per row, in the same order, as attn_fwd_ws_kernel: outputs bitwise equal.
#include "kernels/cuda/attention_wgmma.cuh"

#include <cmath>

namespace gyre::cuda {
namespace {

// Head dim, keys per tile, consumer warpgroups, K / V stages.
constexpr int kF64D = 64, kF64N = 128, kC = 3, kStages = 2;
constexpr int kF64Threads = 128 * (kC + 1);

// Q (64·kC rows), K and V stages, alignment slack, mbarriers (4·kStages + 1).
constexpr int kFwd64SmemBytes = 64 * kC * kF64D * 2 + 2 * kStages * kF64N * kF64D * 2 + 1024 + 256;

struct Fwd64Maps {
  CUtensorMap q, k, v;
};

__global__ void __launch_bounds__(kF64Threads, 1)
    attn_fwd64_kernel(const WgmmaFwdParams p, const __grid_constant__ Fwd64Maps maps,
                      const int head_group) {
  constexpr int kD = kF64D, kBM = 64 * kC;
  constexpr int kQBytes = kBM * kD * 2, kKVBytes = kF64N * kD * 2;
  constexpr int kKBlock = kF64N * 128;
  constexpr int kDT = kD / 8;
  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw = SmemAddr(smem_raw);
  const uint32_t base = (raw + 1023u) & ~1023u;
  unsigned char* base_ptr = smem_raw + (base - raw);
  const uint32_t sQ = base;
  const uint32_t sKV = base + kQBytes;
  const uint32_t bars = sKV + 2 * kStages * kKVBytes;
  auto sK = [&](int s) { return sKV + s * kKVBytes; };
  auto sV = [&](int s) { return sKV + (kStages + s) * kKVBytes; };
  auto k_full = [&](int s) { return bars + 8 * s; };
  auto k_empty = [&](int s) { return bars + 8 * (kStages + s); };
  auto v_full = [&](int s) { return bars + 8 * (2 * kStages + s); };
  auto v_empty = [&](int s) { return bars + 8 * (3 * kStages + s); };
  const uint32_t q_full = bars + 8 * 4 * kStages;
  auto stage = [](int u) { return u % kStages; };
  auto phase = [](int u) { return (u / kStages) & 1; };

  const int tid = threadIdx.x, wg = tid / 128, wtid = tid % 128;
  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      MbInit(k_full(s), 1);
      MbInit(v_full(s), 1);
      MbInit(k_empty(s), 128 * kC);
      MbInit(v_empty(s), 128 * kC);
    }
    MbInit(q_full, 1);
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
  const int m0 = m_block * kBM;
  const int64_t row_base = static_cast<int64_t>(b) * seq;
  const int last_row = min(m0 + kBM, seq) - 1;
  const int total = last_row / kF64N + 1;

  if (wg == 0) {
    // ---------------------------------------------------------------- producer warpgroup
    // One thread: Q, K(0), then K(u + 1) ahead of V(u), each as soon as its stage is free.
    asm volatile("setmaxnreg.dec.sync.aligned.u32 32;\n" ::: "memory");
    if (wtid != 0) return;
    MbArriveExpectTx(q_full, kQBytes);
    TmaTile4d(sQ, &maps.q, q_full, 0, h, m0, b);
    auto load_k = [&](int u) {
      const int s = stage(u);
      MbWait(k_empty(s), phase(u) ^ 1);
      MbArriveExpectTx(k_full(s), kKVBytes);
      TmaTile4d(sK(s), &maps.k, k_full(s), 0, hk, u * kF64N, b);
    };
    load_k(0);
    for (int u = 0; u < total; ++u) {
      if (u + 1 < total) load_k(u + 1);
      const int s = stage(u);
      MbWait(v_empty(s), phase(u) ^ 1);
      MbArriveExpectTx(v_full(s), kKVBytes);
      TmaTile4d(sV(s), &maps.v, v_full(s), 0, hk, u * kF64N, b);
    }
    return;
  }

  // ------------------------------------------------------------------ consumer warpgroups
  asm volatile("setmaxnreg.inc.sync.aligned.u32 160;\n" ::: "memory");
  const int cwg = wg - 1;
  const int warp_in_wg = wtid / 32, lane = tid % 32, g = lane / 4, tq = lane % 4;
  const int w_first = m0 + 64 * cwg;
  const int r_lo = w_first + 16 * warp_in_wg + g;
  const uint32_t own_rows = cwg * 64 * 128;
  // Key tiles this warpgroup needs: through its last row's (a warpgroup wholly past T does tile
  // 0 only; nothing of it is stored).
  const int my_total = (w_first < seq ? min(w_first + 63, seq - 1) : 0) / kF64N + 1;
  // Turn ring: barrier 1 + c (256 threads: warpgroup c syncs, its predecessor arrives).
  const int my_turn = 1 + cwg, next_turn = 1 + (cwg + 1) % kC;
  const int stage_bar = 1 + kC + cwg;  // this warpgroup's own (128 threads)
  auto take_turn = [&] { NamedBarrierSync(my_turn, 256); };
  auto pass_turn = [&](int u) {  // the last turn of the ring's last member has no taker
    if (!(cwg == kC - 1 && u == total - 1)) NamedBarArrive(next_turn, 256);
  };
  if (cwg == kC - 1) NamedBarArrive(1, 256);  // warpgroup 0 takes the first turn

  float o[kD / 2];
#pragma unroll
  for (int i = 0; i < kD / 2; ++i) o[i] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
  float s[64];
  uint32_t pa[kF64N / 16][4];

  auto issue_scores = [&](uint32_t k_rows) {
    const uint64_t da0 = SmemDescSw128(sQ + own_rows, 16, 1024);
    const uint64_t db0 = SmemDescSw128(k_rows, 16, 1024);
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      WgmmaSS128<0, 0>(s, da0 + ((kk * 32) >> 4), db0 + ((kk * 32) >> 4), kk > 0 ? 1 : 0);
    }
    WgmmaCommit();
  };
  auto issue_pv = [&](int u) {
    const uint64_t dv0 = SmemDescSw128(sV(stage(u)), kKBlock, 1024);
#pragma unroll
    for (int kk = 0; kk < kF64N / 16; ++kk) {
      WgmmaRS64(o, pa[kk], dv0 + ((kk * 16 * 128) >> 4));
    }
    WgmmaCommit();
  };
  auto softmax = [&](int t, float (&corr)[2]) {
    const int n0 = t * kF64N;
    if (n0 + kF64N - 1 > w_first || n0 + kF64N > seq) {
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const int hi = min(r_lo + 8 * hr, seq - 1) - n0;
#pragma unroll
        for (int c = 0; c < kF64N / 8; ++c)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            if (8 * c + 2 * tq + e > hi) s[4 * c + 2 * hr + e] = -INFINITY;
          }
      }
    }
    SoftmaxRows<kF64N>(s, row_max, row_sum, corr, p.scale_log2);
  };
  auto pack_p = [&]() { PackP<kF64N>(s, pa); };
  auto rescale_o = [&](const float (&corr)[2]) { RescaleO<kD>(o, corr); };

  // Step 0: S only.
  {
    if (p.rope_half > 0) {
      RopeOwnQRows<kD, kBM>(p, base_ptr, cwg, w_first, row_base, h, wtid, q_full, stage_bar);
    } else {
      MbWait(q_full, 0);
    }
    MbWait(k_full(0), 0);
    take_turn();
    WgmmaFence();
    issue_scores(sK(0));
    pass_turn(0);
    WgmmaWait<0>();
    FenceRegs(s);
    MbArrive(k_empty(0));
    float corr[2];
    softmax(0, corr);
    pack_p();
  }
  // Steps 1 .. my_total − 1: S(u) and P(u − 1)V(u − 1) in this warpgroup's turn; the softmax of
  // S(u) under P V and the other warpgroups' GEMMs.
  int u = 1;
  for (; u < my_total; ++u) {
    MbWait(k_full(stage(u)), phase(u));
    MbWait(v_full(stage(u - 1)), phase(u - 1));
    take_turn();
    WgmmaFence();
    issue_scores(sK(stage(u)));
    issue_pv(u - 1);
    pass_turn(u);
    WgmmaWait<1>();
    FenceRegs(s);
    MbArrive(k_empty(stage(u)));
    float corr[2];
    softmax(u, corr);
    WgmmaWait<0>();
    FenceRegs(o);
    FenceRegs(pa);
    MbArrive(v_empty(stage(u - 1)));
    rescale_o(corr);
    pack_p();
  }
  if (my_total == total) {
    MbWait(v_full(stage(total - 1)), phase(total - 1));
    WgmmaFence();
    issue_pv(total - 1);
    WgmmaWait<0>();
    FenceRegs(o);
    FenceRegs(pa);
  } else {
    // Past this warpgroup's last tile: its last P V in the first of the remaining turns, then
    // turns passed on and stages released (each after it landed).
    MbWait(v_full(stage(u - 1)), phase(u - 1));
    take_turn();
    WgmmaFence();
    issue_pv(u - 1);
    pass_turn(u);
    MbWait(k_full(stage(u)), phase(u));
    MbArrive(k_empty(stage(u)));
    WgmmaWait<0>();
    FenceRegs(o);
    FenceRegs(pa);
    MbArrive(v_empty(stage(u - 1)));
    for (++u; u < total; ++u) {
      take_turn();
      pass_turn(u);
      MbWait(k_full(stage(u)), phase(u));
      MbArrive(k_empty(stage(u)));
      MbWait(v_full(stage(u - 1)), phase(u - 1));
      MbArrive(v_empty(stage(u - 1)));
    }
  }

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
  // Stage O through this warpgroup's own Q rows (no wgmma reads them any more).
  NamedBarrierSync(stage_bar, 128);
#pragma unroll
  for (int c = 0; c < kDT; ++c)
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int r = 64 * cwg + 16 * warp_in_wg + g + 8 * hr;
      *reinterpret_cast<uint32_t*>(base_ptr + Sw128Offset<kBM>(r, 8 * c + 2 * tq)) =
          PackBf16(o[4 * c + 2 * hr], o[4 * c + 2 * hr + 1]);
    }
  NamedBarrierSync(stage_bar, 128);
  constexpr int kChunks = 64 * kD / 8;
#pragma unroll
  for (int i = 0; i < kChunks / 128; ++i) {
    const int c = wtid + i * 128;
    const int r = c / (kD / 8), col = (c % (kD / 8)) * 8;
    const int row = w_first + r;
    if (row < seq) {
      bf16* dst = p.out + ((row_base + row) * p.heads + h) * kD + col;
      *reinterpret_cast<uint4*>(dst) =
          *reinterpret_cast<const uint4*>(base_ptr + Sw128Offset<kBM>(64 * cwg + r, col));
    }
  }
}

}  // namespace

CudaResult LaunchAttentionForwardFwd64(const WgmmaFwdParams& p, int64_t batch,
                                       cudaStream_t stream) {
  constexpr int kBM = 64 * kC;
  CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(
      attn_fwd64_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kFwd64SmemBytes));
  Fwd64Maps maps{};
  const int kv_heads = p.heads / p.group;
  CUDA_RETURN_IF_NOT_OK(EncodeRowsMap(&maps.q, p.q, kF64D, p.heads, p.seq, batch, p.q_stride, kBM));
  CUDA_RETURN_IF_NOT_OK(
      EncodeRowsMap(&maps.k, p.k, kF64D, kv_heads, p.seq, batch, p.kv_stride, kF64N));
  CUDA_RETURN_IF_NOT_OK(
      EncodeRowsMap(&maps.v, p.v, kF64D, kv_heads, p.seq, batch, p.kv_stride, kF64N));
  const int64_t pairs = batch * p.heads;
  // A pair's blocks re-read K and V.
  const int head_group = HeadGroup(int64_t{2} * p.seq * kF64D * 2, pairs);
  const dim3 grid((p.seq + kBM - 1) / kBM, p.heads, static_cast<unsigned>(batch));
  attn_fwd64_kernel<<<grid, kF64Threads, kFwd64SmemBytes, stream>>>(p, maps, head_group);
  CUDA_RETURN_IF_LAUNCH_ERROR("attn_fwd64_kernel");
  return {};
}

}  // namespace gyre::cuda
