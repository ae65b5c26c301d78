// Deterministic backward main kernel (opt-in: AttentionBackwardArgs::deterministic, or
// GYRE_ATTN_DETERMINISTIC=1 as a bench / test override, read once in attention.cu):
// attention_wgmma.cu's attn_bwd_ws_kernel with dQ added to dq_acc in a fixed order, so dq (and,
// as before, dk, dv) are bitwise reproducible run to run. The body is the default kernel's
// (BwdWsBody in attention_wgmma.cuh, kDet = true: what differs is listed above it; same GEMMs,
// same exponentials, the dK / dV epilogue of the fused-RoPE kernel). In its own translation unit
// so that the default kernels' PTX stays byte-identical (attention_notes.md, attn10: any second
// backward kernel in attention_wgmma.cu perturbs attn_bwd_ws_kernel<64>'s address arithmetic).
// Cost (counted in attention_notes.md, "detdq"; measured by the lead on an H100: +7-12% at
// B8 S2048 H16 D128, +29% at B16 S2048 H12 D64): no extra FLOPs or dQ bytes; the longest
// blocks run last (grid tail); waiting where a key block catches up with the next one.
#include "kernels/cuda/attention_wgmma.cuh"

#include <cstdlib>
#include <cstring>

namespace gyre::cuda {
namespace {

template <int kD>
__global__ void __launch_bounds__(kWsThreads, 1)
    attn_bwd_det_kernel(const WgmmaBwdParams p, const __grid_constant__ BwdTmaMaps maps,
                        const int head_group, int* const dq_turns) {
  BwdWsBody<kD, /*kRope=*/true, /*kDet=*/true>(p, maps, head_group, dq_turns);
}

// GYRE_ATTN_DET_FORM (read once per process): unset / "pair" = attn_bwd_det_kernel (at D 64 each
// warpgroup's partial tile is its own turn), "presum" = attention_bwd_det_presum.cu's kernel at
// D 64 (at D 128 "pair"'s kernel, whose column halves have a turn counter each); anything else
// is an error.
enum class DetForm { kPair, kPresum, kUnknown };
DetForm DetFormFromEnv() {
  static const DetForm form = [] {
    const char* env = std::getenv("GYRE_ATTN_DET_FORM");
    if (env == nullptr || std::strcmp(env, "pair") == 0) return DetForm::kPair;
    if (std::strcmp(env, "presum") == 0) return DetForm::kPresum;
    return DetForm::kUnknown;
  }();
  return form;
}

template <int kD>
CudaResult LaunchBwdDet(const WgmmaBwdParams& p, int64_t batch, int64_t kv_heads, int* dq_turns,
                        cudaStream_t stream) {
  const DetForm form = DetFormFromEnv();
  if (form == DetForm::kUnknown) {
    return {static_cast<int>(cudaErrorInvalidValue),
            std::string("GYRE_ATTN_DET_FORM must be pair or presum, got '") +
                std::getenv("GYRE_ATTN_DET_FORM") + "'"};
  }
  if (kD == 64 && form == DetForm::kPresum) {
    return LaunchAttentionBackwardWgmmaDetPresum(p, batch, kv_heads, dq_turns, stream);
  }
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
  return head_dim == 64 ? LaunchBwdDet<64>(p, batch, kv_heads, dq_turns, stream)
                        : LaunchBwdDet<128>(p, batch, kv_heads, dq_turns, stream);
}

}  // namespace gyre::cuda
