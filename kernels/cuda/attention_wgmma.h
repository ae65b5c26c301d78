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
  // Fused RoPE of Q (plain kernel only; AttentionForwardArgs::rope): fp32 cos / sin rows
  // [T][rope_half] (rope.h's table), rope_half = R/2 a multiple of 8, or 0 = off; the rotated
  // rows go to q_rot (q's strides).
  const float *rope_cos, *rope_sin;
  int rope_half;
  __nv_bfloat16* q_rot;
  bool q_rot_copy_rest;  // R < D and q_rot != q: features R.. are copied to q_rot too
};

// attn_fwd_ws_kernel: the FlashAttention-3-style kernel (TMA producer, mbarriers, two consumer
// warpgroups in pingpong).
CudaResult LaunchAttentionForwardWgmma(const WgmmaFwdParams& p, int64_t batch, int head_dim,
                                       bool self_extend, cudaStream_t stream);

// attn_fwd64_kernel (attention_fwd64.cu): the D 64 forward without SelfExtend (plain or with the
// fused RoPE), three consumer warpgroups on 192-row blocks; LaunchAttentionForwardWgmma calls it.
CudaResult LaunchAttentionForwardFwd64(const WgmmaFwdParams& p, int64_t batch,
                                       cudaStream_t stream);

// Backward main kernel (dK, dV, dQ accumulation) on wgmma; the caller runs attention.cu's prep
// kernel (dvec = rowsum(dout ∘ out), dq_acc zeroed) before and its dq conversion after.
struct WgmmaBwdParams {
  const __nv_bfloat16 *q, *k, *v, *dout;
  const float *lse, *dvec;
  float* dq_acc;  // blocked (BwdWsDqAccIndex), fp32, zeroed by the caller
  __nv_bfloat16 *dk, *dv;
  int q_stride, kv_stride;
  int seq, heads, group;
  float scale, scale_log2;
  // Fused inverse RoPE on dK (AttentionBackwardArgs::rope): fp32 cos / sin rows [T][rope_half]
  // (rope.h's table); rope_half = R/2, a multiple of 8, or 0 = off.
  const float *rope_cos, *rope_sin;
  int rope_half;
};

// Columns per dq_acc block of the warp-specialised backward: D/2 (D 128) or D (D 64).
inline int BwdWsDqBlockCols(int head_dim) { return head_dim == 64 ? head_dim : head_dim / 2; }
// Element index of (b, h, t, d) in that layout: [B, H, ceil(T/64), D/W, 64, W], with column c of
// row r stored at c ^ 8·(r % 4).
__host__ __device__ inline int64_t BwdWsDqAccIndex(int64_t b, int64_t h, int64_t t, int d,
                                                   int64_t heads, int64_t m_tiles, int head_dim,
                                                   int block_cols) {
  const int parts = head_dim / block_cols;
  const int64_t r = t % 64;
  return ((((b * heads + h) * m_tiles + t / 64) * parts + d / block_cols) * 64 + r) *
             block_cols +
         ((d % block_cols) ^ static_cast<int>(8 * (r % 4)));
}

// The backward prep's D_i = Σ_d dO·O of one (row, head) `rh` of [rows·heads, kD] out / dout: one
// thread per 8-column chunk d0 (16-byte loads), the kD/8 threads of a row-head (whole row-heads per
// warp) reduced with shuffles; invalid threads (past the last row-head) add 0. Shared by
// attention.cu's prep and attention_bwd_store.cu's.
template <int kD>
__device__ __forceinline__ float OutDoutRowDot(const __nv_bfloat16* out, const __nv_bfloat16* dout,
                                               int64_t rh, int d0, bool valid) {
  constexpr int kChunks = kD / 8;
  float acc = 0.f;
  if (valid) {
    const uint4 o = *reinterpret_cast<const uint4*>(out + rh * kD + d0);
    const uint4 d = *reinterpret_cast<const uint4*>(dout + rh * kD + d0);
    const uint32_t os[4] = {o.x, o.y, o.z, o.w}, ds[4] = {d.x, d.y, d.z, d.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 of = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&os[i]));
      const float2 df = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&ds[i]));
      acc = fmaf(of.x, df.x, fmaf(of.y, df.y, acc));
    }
  }
#pragma unroll
  for (int off = kChunks / 2; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  return acc;
}

// The backward main kernels (attention.cu picks): D 128 LaunchAttentionBackwardWgmmaStore, D 64
// LaunchAttentionBackwardWgmmaQ128, the deterministic backward
// LaunchAttentionBackwardWgmmaDeterministic. dq_acc is in the blocked layout above (rows past T
// may hold anything: never read); the D 64 and the deterministic kernels add into a zeroed one
// (attention.cu's prep zeroes it), the D 128 one needs no zeroing.

// Deterministic variant (attention_bwd_det.cu; GYRE_ATTN_DETERMINISTIC=1): BwdWsBody with dQ
// added in a fixed order per query tile. dq_turns: BwdDetTurnCount ints, zeroed on
// `stream` before the launch (2 per query tile: one per column half at D 128, slot 0 at D 64).
inline int64_t BwdDetTurnCount(int64_t batch, int64_t heads, int64_t seq) {
  return batch * heads * ((seq + 63) / 64) * 2;
}
CudaResult LaunchAttentionBackwardWgmmaDeterministic(const WgmmaBwdParams& p, int64_t batch,
                                                     int64_t kv_heads, int head_dim,
                                                     int* dq_turns, cudaStream_t stream);
// Its D 64 kernel, the two warpgroups' partial dQ tiles summed in shared memory first
// (attention_bwd_det_presum.cu; called by the above at head_dim 64).
CudaResult LaunchAttentionBackwardWgmmaDetPresum(const WgmmaBwdParams& p, int64_t batch,
                                                 int64_t kv_heads, int* dq_turns,
                                                 cudaStream_t stream);

// The D 128 backward (attention_bwd_store.cu; the default since session 22, attn128b): dq_acc is
// never zeroed, the first contribution to each dq_acc half-tile is a bulk copy, picked by
// per-tile tickets. dq_tickets: BwdStoreTicketCount ints, zeroed by the prep below,
// which replaces attention.cu's prep (D_i only; dq_acc is left as it is).
inline int64_t BwdStoreTicketCount(int64_t batch, int64_t heads, int64_t seq) {
  return batch * heads * ((seq + 63) / 64) * 4;  // 2 column halves x {ticket, stored flag}
}
CudaResult LaunchAttentionBackwardStorePrep(const __nv_bfloat16* out, const __nv_bfloat16* dout,
                                            float* dvec, int64_t rows_heads, int seq, int heads,
                                            int* dq_tickets, int64_t ticket_ints,
                                            cudaStream_t stream);
CudaResult LaunchAttentionBackwardWgmmaStore(const WgmmaBwdParams& p, int64_t batch,
                                             int64_t kv_heads, int* dq_tickets,
                                             cudaStream_t stream);

// The D 64 main kernel: 128-query tiles (attention_bwd_q128.cu); same params and dq_acc layout
// as at D 128, attention.cu's prep (zeroing dq_acc) and conversion.
CudaResult LaunchAttentionBackwardWgmmaQ128(const WgmmaBwdParams& p, int64_t batch,
                                            int64_t kv_heads, cudaStream_t stream);

}  // namespace gyre::cuda
