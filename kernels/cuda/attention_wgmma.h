// Internal to kernels/cuda/attention: the Hopper (wgmma) forward kernel that AttentionForward
// (attention.h) selects on sm_90 devices. Callers use attention.h, not this header.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/device_info.h"

namespace gyre::cuda {

// Validated by AttentionForward (attention.cu): D ∈ {64, 128}, 16-byte-aligned pointers, strides
// multiples of 8 elements, seq · stride < 2^31. se_window is used only with self_extend.
struct WgmmaFwdParams {
  const __nv_bfloat16 *q, *k, *v, *qg, *kg;
  __nv_bfloat16* out;
  float* lse;  // may be null
  int q_stride, kv_stride;
  int seq, heads, group;
  float scale, scale_log2;
  int se_window;
};

// warp_specialised: the FlashAttention-3-style kernel (producer warpgroup, mbarriers, two
// consumer warpgroups in pingpong); otherwise the two-warpgroup kernel with block barriers.
CudaResult LaunchAttentionForwardWgmma(const WgmmaFwdParams& p, int64_t batch, int head_dim,
                                       bool self_extend, bool warp_specialised,
                                       cudaStream_t stream);

// Backward main kernel (dK, dV, dQ accumulation) on wgmma; the caller runs attention.cu's prep
// kernel (dvec = rowsum(dout ∘ out), dq_acc zeroed) before and its dq conversion after.
struct WgmmaBwdParams {
  const __nv_bfloat16 *q, *k, *v, *dout;
  const float *lse, *dvec;
  float* dq_acc;  // [B·T, H, D] fp32, zeroed by the caller
  __nv_bfloat16 *dk, *dv;
  int q_stride, kv_stride;
  int seq, heads, group;
  float scale, scale_log2;
};

// kTwoWarpgroups: attn_bwd_wgmma_kernel (128 keys per block, 8-byte dQ atomics);
// kTwoWarpgroupsVec4: the same with 16-byte dQ atomics; kOneWarpgroup: attn_bwd_wgmma1_kernel
// (64 keys per block, two blocks per SM).
enum class WgmmaBwdVariant { kTwoWarpgroups, kTwoWarpgroupsVec4, kOneWarpgroup };

CudaResult LaunchAttentionBackwardWgmmaMain(const WgmmaBwdParams& p, int64_t batch,
                                            int64_t kv_heads, int head_dim,
                                            WgmmaBwdVariant variant, cudaStream_t stream);

}  // namespace gyre::cuda
