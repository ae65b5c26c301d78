// The D 128 backward main kernel (the default since session 22, attn128b: it replaced
// attention_wgmma.cu's attn_bwd_ws_kernel<128> / attn_bwd_ws_rope_kernel<128>, whose consumers
// added every dQ contribution into a zeroed dq_acc; H100: backward −6% plain, −4% with the fused
// RoPE at B8 S2048 H16 D128; attention_notes.md, "attn128b") and its prep.
//
// The backward runs three kernels: a prep (D_i = Σ dO·O), the main kernel (dK, dV; dQ into the
// fp32 accumulator dq_acc with bulk operations, one per key block, query tile and column half)
// and attention.cu's dQ conversion. Before attn128b the prep also zeroed dq_acc (134 MB at B8
// S2048 H16 D128: half the prep's bytes, ~42 µs on an H100) and every contribution was an
// addition, whose first one per line then read the zeros back from DRAM.
//
// Here the first contribution to each dq_acc half-tile is a plain bulk copy instead of an
// addition, so nothing needs zeroing. Which contribution comes first is not known in advance
// (key block j reaches query tile m at its iteration m − 2j, and blocks start at different
// times), so each (query tile, column half) has a ticket counter and a "stored" flag, handled
// by the producer's writer warps (DqStoreWriter in attention_wgmma.cuh: ticket 0 copies and
// then sets the flag; the others add once the flag is set). This file's prep computes D_i and
// zeroes only those counters: 4 ints per (batch, head, query tile), 64 KB at B8 S2048 H16.
// In its own translation unit so that the other attention kernels' PTX stays the one measured
// (attention_notes.md, attn10).
#include "kernels/cuda/attention_wgmma.cuh"

namespace gyre::cuda {
namespace {

constexpr int kPrepThreads = 256;

// D_i = Σ_d dO·O per (row, head) (as attention.cu's attn_bwd_prep_kernel<128>: one thread per
// 8-column chunk, 16 threads per row-head reduce with shuffles); the first `tickets4` threads
// also zero one int4 of the ticket / flag array each.
__global__ void __launch_bounds__(kPrepThreads)
    attn_bwd_store_prep_kernel(const bf16* out, const bf16* dout, float* dvec, int64_t rows_heads,
                               int seq, int heads, int4* tickets, int64_t tickets4) {
  constexpr int kD = 128, kChunks = kD / 8;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kPrepThreads + threadIdx.x;
  if (c < tickets4) tickets[c] = make_int4(0, 0, 0, 0);
  const int64_t rh = c / kChunks;
  const int d0 = static_cast<int>(c % kChunks) * 8;
  const bool valid = rh < rows_heads;
  const float acc = OutDoutRowDot<kD>(out, dout, rh, d0, valid);
  if (!valid || d0 != 0) return;
  const int64_t row = rh / heads;  // b·T + t
  const int h = static_cast<int>(rh % heads);
  const int64_t b = row / seq, t = row % seq;
  dvec[(b * heads + h) * seq + t] = acc;
}

template <bool kRope>
__global__ void __launch_bounds__(kWsThreads, 1)
    attn_bwd_store_kernel(const WgmmaBwdParams p, const __grid_constant__ BwdTmaMaps maps,
                          const int head_group, int* const dq_tickets) {
  BwdWsBody<128, kRope, /*kDet=*/false>(p, maps, head_group, nullptr, dq_tickets);
}

template <bool kRope>
CudaResult LaunchStore(const WgmmaBwdParams& p, const BwdTmaMaps& maps, dim3 grid, int head_group,
                       int* dq_tickets, cudaStream_t stream) {
  constexpr int smem = BwdWsLayout<128>::kBytes;
  CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(attn_bwd_store_kernel<kRope>,
                                            cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  attn_bwd_store_kernel<kRope><<<grid, kWsThreads, smem, stream>>>(p, maps, head_group,
                                                                   dq_tickets);
  CUDA_RETURN_IF_LAUNCH_ERROR("attn_bwd_store_kernel");
  return {};
}

}  // namespace

CudaResult LaunchAttentionBackwardStorePrep(const __nv_bfloat16* out, const __nv_bfloat16* dout,
                                            float* dvec, int64_t rows_heads, int seq, int heads,
                                            int* dq_tickets, int64_t ticket_ints,
                                            cudaStream_t stream) {
  if (ticket_ints % 4 != 0) return InvalidArgument("attn_bwd_store_prep: ticket ints % 4 != 0");
  const int64_t threads = std::max(rows_heads * 16, ticket_ints / 4);
  attn_bwd_store_prep_kernel<<<static_cast<unsigned>((threads + kPrepThreads - 1) / kPrepThreads),
                               kPrepThreads, 0, stream>>>(out, dout, dvec, rows_heads, seq, heads,
                                                          reinterpret_cast<int4*>(dq_tickets),
                                                          ticket_ints / 4);
  CUDA_RETURN_IF_LAUNCH_ERROR("attn_bwd_store_prep_kernel");
  return {};
}

CudaResult LaunchAttentionBackwardWgmmaStore(const WgmmaBwdParams& p, int64_t batch,
                                             int64_t kv_heads, int* dq_tickets,
                                             cudaStream_t stream) {
  constexpr int kD = 128;
  BwdTmaMaps maps{};
  CUDA_RETURN_IF_NOT_OK(EncodeBwdMaps(p, batch, kv_heads, kD, &maps));
  const dim3 grid = BwdGrid(p, batch, kv_heads);
  const int head_group = BwdHeadGroup(p, batch, kv_heads, kD);
  return p.rope_half > 0 ? LaunchStore<true>(p, maps, grid, head_group, dq_tickets, stream)
                         : LaunchStore<false>(p, maps, grid, head_group, dq_tickets, stream);
}

}  // namespace gyre::cuda
