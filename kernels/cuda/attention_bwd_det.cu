// Deterministic backward main kernel (opt-in: AttentionBackwardArgs::deterministic, or
// GYRE_ATTN_DETERMINISTIC=1 as a bench / test override, read once in attention.cu):
// the default backward kernel (BwdWsBody) with dQ added to dq_acc in a fixed order, so dq (and,
// as before, dk, dv) are bitwise reproducible run to run. The body is the default kernel's
// (BwdWsBody in attention_wgmma.cuh, kDet = true: what differs is listed above it; same GEMMs,
// same exponentials, the dK / dV epilogue of the fused-RoPE kernel). Here the D 128 kernel (each
// column half its own turn counter); D 64 is attention_bwd_det_presum.cu's kernel (the two
// warpgroups' partial dQ tiles summed in shared memory, then one turn per key block and query
// tile). Each in its own translation unit so that every kernel's PTX stays the one measured
// (attention_notes.md, attn10: any second backward kernel in a translation unit perturbs the
// other's address arithmetic).
// Cost (counted in attention_notes.md, "detdq" / "attn11"; measured by the lead on an H100:
// backward +7-12% at B8 S2048 H16 D128, +5-7% at B16 S2048 H12 D64; llama-125m B16 step +1.8%):
// no extra FLOPs or dQ bytes; the longest blocks run last (grid tail); waiting where a key block
// catches up with the next one.
#include "kernels/cuda/attention_wgmma.cuh"

namespace gyre::cuda {
namespace {

// A template instantiated at D 128 only (D 64: attention_bwd_det_presum.cu): the kernel keeps the
// name and PTX it had beside its D 64 instantiation (deleted in session 9, cattn).
template <int kD>
__global__ void __launch_bounds__(kWsThreads, 1)
    attn_bwd_det_kernel(const WgmmaBwdParams p, const __grid_constant__ BwdTmaMaps maps,
                        const int head_group, int* const dq_turns) {
  static_assert(kD == 128, "the deterministic backward at D 64 is attn_bwd_det_presum_kernel");
  BwdWsBody<kD, /*kRope=*/true, /*kDet=*/true>(p, maps, head_group, dq_turns);
}

CudaResult LaunchBwdDet128(const WgmmaBwdParams& p, int64_t batch, int64_t kv_heads,
                           int* dq_turns, cudaStream_t stream) {
  constexpr int kD = 128;
  BwdTmaMaps maps{};
  CUDA_RETURN_IF_NOT_OK(EncodeBwdMaps(p, batch, kv_heads, kD, &maps));
  const dim3 grid = BwdGrid(p, batch, kv_heads);
  const int head_group = BwdHeadGroup(p, batch, kv_heads, kD);
  constexpr int smem = BwdWsLayout<kD, true>::kBytes;
  CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(attn_bwd_det_kernel<kD>,
                                            cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  attn_bwd_det_kernel<kD><<<grid, kWsThreads, smem, stream>>>(p, maps, head_group, dq_turns);
  CUDA_RETURN_IF_LAUNCH_ERROR("attn_bwd_det_kernel");
  return {};
}

}  // namespace

CudaResult LaunchAttentionBackwardWgmmaDeterministic(const WgmmaBwdParams& p, int64_t batch,
                                                     int64_t kv_heads, int head_dim,
                                                     int* dq_turns, cudaStream_t stream) {
  if (head_dim == 64) {
    return LaunchAttentionBackwardWgmmaDetPresum(p, batch, kv_heads, dq_turns, stream);
  }
  return LaunchBwdDet128(p, batch, kv_heads, dq_turns, stream);
}

}  // namespace gyre::cuda
