// The deterministic backward at D 64 (AttentionBackwardArgs::deterministic; called by
// attention_bwd_det.cu's LaunchAttentionBackwardWgmmaDeterministic; attention_notes.md, "attn11"
// and "cattn"): the two consumer warpgroups' partial dQ tiles are summed in shared memory before
// they join the fixed order. BwdWsBody<64, kRope, kDet> (attention_wgmma.cuh): one bulk reduction
// and one turn per key block and query tile, two writers taking alternate tiles. It replaced the
// form with one turn per warpgroup (H100, B16 S2048 H12 D64 backward: 1.01 vs 1.21 ms, default
// 0.94-0.97). In its own translation unit: a second kernel beside another backward kernel
// changes one address expression of that kernel's PTX (the attn10 effect, attention_notes.md).
#include "kernels/cuda/attention_wgmma.cuh"

namespace gyre::cuda {
namespace {

__global__ void __launch_bounds__(kWsThreads, 1)
    attn_bwd_det_presum_kernel(const WgmmaBwdParams p, const __grid_constant__ BwdTmaMaps maps,
                               const int head_group, int* const dq_turns) {
  BwdWsBody<64, /*kRope=*/true, /*kDet=*/true>(p, maps, head_group, dq_turns);
}

}  // namespace

CudaResult LaunchAttentionBackwardWgmmaDetPresum(const WgmmaBwdParams& p, int64_t batch,
                                                 int64_t kv_heads, int* dq_turns,
                                                 cudaStream_t stream) {
  BwdTmaMaps maps{};
  CUDA_RETURN_IF_NOT_OK(EncodeBwdMaps(p, batch, kv_heads, 64, &maps));
  const dim3 grid = BwdGrid(p, batch, kv_heads);
  const int head_group = BwdHeadGroup(p, batch, kv_heads, 64);
  constexpr int smem = BwdWsLayout<64, true>::kBytes;
  CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(attn_bwd_det_presum_kernel,
                                            cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  attn_bwd_det_presum_kernel<<<grid, kWsThreads, smem, stream>>>(p, maps, head_group, dq_turns);
  CUDA_RETURN_IF_LAUNCH_ERROR("attn_bwd_det_presum_kernel");
  return {};
}

}  // namespace gyre::cuda
