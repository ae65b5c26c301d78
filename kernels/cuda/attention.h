// Causal softmax attention (FlashAttention-2/3 class), forward and backward, bf16 in/out, fp32
// softmax statistics, with GQA, row-strided views (fused qkv) and SelfExtend fused into the
// forward. The kernels (Hopper wgmma by default, mma.sync as the fallback; tiling, pipelines,
// tile skipping, the choice between them) are described in attention.cu and attention_wgmma.cu.
//
//   S_ij   = scale · q_i · k_j                    (j <= i; j > i masked)
//   P_ij   = exp(S_ij − lse_i),  lse_i = log Σ_{j<=i} exp(S_ij)   (natural log, fp32)
//   out_i  = Σ_j P_ij v_j
// Backward (recomputes P from q, k, lse; nothing of size T² is ever stored):
//   D_i    = Σ_d dout_id · out_id
//   dP_ij  = dout_i · v_j,   dS_ij = P_ij (dP_ij − D_i)
//   dq_i   = scale · Σ_j dS_ij k_j,  dk_j = scale · Σ_i dS_ij q_i,  dv_j = Σ_i P_ij dout_i
// GQA: query head h reads kv head h / (H / Hk); dk, dv of a kv head sum over its H/Hk query heads.
// SelfExtend (group G, window W; inference, forward only): S_ij uses q·k when i − j < W and
// q_grouped·k_grouped when i − j >= W (grouped inputs are the caller's RoPE at grouped positions,
// see ops/attention.h); one softmax over both kinds. With T <= W it is exactly plain attention.
//
// Shapes: q [B, T, H, D] rows of stride q_row_stride, k/v [B, T, Hk, D] rows of stride
// kv_row_stride (0 = packed), out [B, T, H, D] packed, lse [B, H, T] fp32. D ∈ {64, 128}.
// Saved for backward by the caller: q, k, v, out, lse (O(B·H·T)). Outputs overwrite.
//
// Floors (causal, half of the T² pairs): forward 4·B·H·T²·D/2 FLOP (two GEMMs of 2·T²·D/2),
// backward 2.5x that (five GEMMs, one of them the recomputed S). Bytes: forward reads q, k, v
// and writes out once (≈ 2·B·T·(2H + 2Hk)·D bytes + lse), backward ≈ 2.5x; at B8 T2048 H16
// D128: 137 GFLOP forward, 344 GFLOP backward — compute-bound (≈ 0.17 ms / 0.43 ms at
// ~800 TFLOP/s) against ≈ 0.13 GB of traffic (0.04 ms at 3.3 TB/s).
//
// Thread-safety: stateless; the backward takes scratch (fp32 dq accumulators [B·T, H, D], D rows
// [B, H, T]) from `alloc` and returns it to the cache before returning (stream-ordered reuse, see
// device_allocator.h; under CUDA-graph capture the scratch would have to outlive the graph).
// Determinism: forward, dk and dv are bitwise reproducible; dq sums key blocks with fp32 atomics
// (bulk shared-to-global reductions on Hopper), so its low bits vary between runs, unless
// AttentionBackwardArgs::deterministic: then the Hopper backward adds each query tile's key
// blocks in a fixed order (attention_bwd_det.cu) and dq is bitwise reproducible too (slower:
// +7-12% at D 128, +5-7% at D 64, H100; not with GYRE_ATTN_BWD=mma, which is then an error).
// Extra scratch: one int per (batch, head, 64-row tile, half). GYRE_ATTN_DETERMINISTIC (read
// once per process) overrides the field for benches and tests: "1" on, "0" off, unset = the
// field; other values make AttentionBackward fail. GYRE_ATTN_PHASES=1 (read once per process; a
// diagnostic) records CUDA events around each kernel of both calls and prints one line per call
// to stderr ("attn_phases ...": prep / main / dq times), e.g. inside a training step.
//
// CONTRACT (owner: the `attn` helper; the `gpuops` helper codes against it). Changes only by
// adding fields with defaults.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/device_allocator.h"
#include "kernels/cuda/device_info.h"
#include "kernels/cuda/rope.h"

namespace gyre::cuda {

struct AttentionShape {
  int64_t batch = 0, seq = 0;
  int64_t heads = 0, kv_heads = 0;  // GQA: query head h reads kv head h / (heads / kv_heads)
  int64_t head_dim = 0;             // 64 or 128 (others: kInvalidArgument)
};

// Causal softmax attention, bf16 in/out, fp32 softmax statistics. Inputs already rotated (RoPE
// is applied by kernels/cuda/rope before this op). Row r = b*seq + t of q holds `heads` heads of
// head_dim features starting at q + r * q_row_stride (0 = packed heads*head_dim); same for k/v
// with kv_row_stride (0 = packed kv_heads*head_dim), so q/k/v may be views of one fused qkv buffer.
struct AttentionForwardArgs {
  AttentionShape shape;
  float softmax_scale = 0.f;  // 0 = 1/sqrt(head_dim)
  const __nv_bfloat16* q = nullptr;
  const __nv_bfloat16* k = nullptr;
  const __nv_bfloat16* v = nullptr;
  int64_t q_row_stride = 0, kv_row_stride = 0;
  // SelfExtend (inference; ops/attention.h and MODELS.md section 6). When self_extend_group > 0:
  // logit (i, j) with i - j < window uses q·k (normal positions); with i - j >= window it uses
  // q_grouped·k_grouped (q rotated at floor(i/G) + W - floor(W/G), k at floor(j/G)); both kinds
  // merged in ONE softmax, in the same kernel. Same layout/strides as q and k.
  int64_t self_extend_group = 0, self_extend_window = 0;
  const __nv_bfloat16* q_grouped = nullptr;
  const __nv_bfloat16* k_grouped = nullptr;
  __nv_bfloat16* out = nullptr;  // [B, T, heads, head_dim] packed, overwritten
  float* lse = nullptr;          // [B, heads, T] natural-log log-sum-exp of scaled logits; may be null
  // Fused RoPE of q (the training path; plain mode only): when set, q holds un-rotated values
  // and each block rotates its query tile as it loads it (rotate-half over the first
  // R = rope->head_dim features, position t for row b·T + t; R % 16 == 0, R <= head_dim,
  // rope->max_positions >= T; RopeForward's fp32 math and bf16 rounding) and writes the rotated
  // rows to q_rotated (q's strides) for the backward. q_rotated may be q itself (each row is
  // read and written by one block). k must already be rotated (RopeForward).
  const RopeTable* rope = nullptr;
  __nv_bfloat16* q_rotated = nullptr;
};
CudaResult AttentionForward(const AttentionForwardArgs& args, cudaStream_t stream);

// Backward of the plain (non-SelfExtend) forward; recomputes scores from q, k, v, lse.
struct AttentionBackwardArgs {
  AttentionShape shape;
  float softmax_scale = 0.f;
  const __nv_bfloat16* q = nullptr;
  const __nv_bfloat16* k = nullptr;
  const __nv_bfloat16* v = nullptr;
  int64_t q_row_stride = 0, kv_row_stride = 0;  // also the strides of dq / dk, dv
  const __nv_bfloat16* out = nullptr;   // packed
  const __nv_bfloat16* dout = nullptr;  // packed
  const float* lse = nullptr;
  __nv_bfloat16* dq = nullptr;  // overwritten (same layout as q)
  __nv_bfloat16* dk = nullptr;  // overwritten (same layout as k)
  __nv_bfloat16* dv = nullptr;  // overwritten (same layout as v)
  // Fused inverse RoPE (the training path's RopeBackward, rope.h): when set, q and k hold
  // RoPE-rotated values (rotate-half over the first R = rope->head_dim features of each head,
  // position t for row b·T + t, R % 16 == 0, R <= head_dim, rope->max_positions >= T), and dq, dk
  // come back as the gradients w.r.t. the un-rotated q and k: the dQ conversion and the dK
  // epilogue rotate by −angle in fp32 before the one rounding to bf16 (the separate pass rounded
  // twice). Null: dq, dk are w.r.t. q, k as given.
  const RopeTable* rope = nullptr;
  // dQ summed in a fixed order, so that dq is bitwise reproducible (see Determinism above).
  bool deterministic = false;
};
// Scratch (e.g. fp32 dq accumulators, row dot(dout, out)) comes from `alloc`.
CudaResult AttentionBackward(DeviceAllocator* alloc, const AttentionBackwardArgs& args,
                             cudaStream_t stream);

}  // namespace gyre::cuda
