// Mamba-2 SSD (state-space duality), chunked forward and backward on the GPU: the CUDA twin of
// kernels/cpu/ssd.h (same math, layouts, options and gradient contract; read that header first).
//
//     dt_t = clamp(softplus(dt_raw_t + dt_bias), dt_min, dt_max),  A = −exp(A_log)
//     H_t  = exp(dt_t·A)·H_{t−1} + dt_t·x_t B_tᵀ,                  y_t = H_t C_t + D·x_t
//
// Layouts (row-major, token-major; dense unless x_row_stride / bc_row_stride below say
// otherwise for x, dx and B, C, dB, dC), dtypes:
//     x, y, dx, dy       [B, S, H, P]   bf16
//     B, C, dB, dC       [B, S, G, N]   bf16   (head h uses group h / (H/G))
//     dt_raw, d dt_raw   [B, S, H]      fp32
//     A_log, dt_bias, D  [H]            fp32   (and their gradients, fp32)
//     states             [B, H, P, N]   fp32   (initial, final, and their gradients)
//
// Gradient contract (as the CPU API): dx, d dt_raw, dB, dC and d initial state are OVERWRITTEN;
// dA_log, d dt_bias and dD ACCUMULATE (deterministically: no float atomics on them).
//
// Supported shapes (others return InvalidArgument, never crash): head_dim P and state_dim N
// multiples of 32 with P <= 128 and N <= 256; chunk_size a multiple of 64 and <= 256; any
// seq_len >= 1 (the last chunk may be partial); G divides H.
//
// The opaque `saved` buffer (ssd_saved_bytes) holds, per batch row (batch-major, so a call on
// rows [b0, b1) may advance every pointer by b0 rows, `saved` by b0·ssd_saved_bytes(batch=1)):
// the NC+1 chunk-boundary states fp32 [H, NC+1, P, N], dt after softplus/clamp fp32 [S, H],
// the within-chunk cumulative sums of dt·A fp32 [H, NC·Q], C Bᵀ per (group, chunk) bf16
// [G, NC·Q, Q], and the states H_c (c < NC) again in bf16 [H, NC, P, N] (tensor-core operands). The backward takes its scratch from a
// DeviceAllocator (cached after the first call; same stream semantics as that allocator).
//
// All calls are asynchronous on `stream`; pointers are device pointers. Not thread-safe with
// respect to the same output buffers; otherwise stateless.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>

#include "kernels/cuda/device_allocator.h"
#include "kernels/cuda/device_info.h"

namespace gyre::cuda {

// Field-for-field the same as gyre::cpu::SsdShape / SsdOptions (nvcc code keeps off abseil,
// which the CPU header pulls in).
struct SsdShape {
  int64_t batch = 0;       // B
  int64_t seq_len = 0;     // S
  int64_t num_heads = 0;   // H
  int64_t head_dim = 0;    // P
  int64_t num_groups = 1;  // G (divides H)
  int64_t state_dim = 0;   // N
};

struct SsdOptions {
  int64_t chunk_size = 256;  // Q
  double dt_min = 0.0;
  double dt_max = std::numeric_limits<double>::infinity();
};

struct SsdForwardArgs {
  SsdShape shape;
  SsdOptions options;
  const __nv_bfloat16* x = nullptr;   // [B, S, H, P]
  const float* dt = nullptr;          // [B, S, H] raw dt (before + dt_bias and softplus)
  const float* a_log = nullptr;       // [H]
  const float* dt_bias = nullptr;     // [H]
  const __nv_bfloat16* b = nullptr;   // [B, S, G, N]
  const __nv_bfloat16* c = nullptr;   // [B, S, G, N]
  const float* d = nullptr;           // [H] D skip; null = none
  const float* initial_state = nullptr;  // [B, H, P, N] or null (zeros)
  __nv_bfloat16* y = nullptr;         // [B, S, H, P] overwritten
  void* saved = nullptr;              // [ssd_saved_bytes] overwritten; required
  float* final_state = nullptr;       // [B, H, P, N] or null
  // Token-row strides in elements (0 = dense: H·P for x, G·N for B and C). Lets x, B and C be
  // column slices of one wider row (Mamba-2's conv output [B·S, H·P + 2·G·N]) without copies.
  // Non-zero strides must be multiples of 8 and at least the dense width; y stays dense.
  int64_t x_row_stride = 0;
  int64_t bc_row_stride = 0;
};

struct SsdBackwardArgs {
  SsdShape shape;
  SsdOptions options;
  // The forward's inputs (same values) and its saved buffer.
  const __nv_bfloat16* x = nullptr;
  const float* dt = nullptr;
  const float* a_log = nullptr;
  const float* dt_bias = nullptr;
  const __nv_bfloat16* b = nullptr;
  const __nv_bfloat16* c = nullptr;
  const float* d = nullptr;
  const void* saved = nullptr;
  const __nv_bfloat16* dy = nullptr;     // [B, S, H, P]
  const float* d_final_state = nullptr;  // [B, H, P, N] or null (zero)
  // Overwritten:
  __nv_bfloat16* dx = nullptr;           // [B, S, H, P]
  float* ddt = nullptr;                  // [B, S, H]
  __nv_bfloat16* db = nullptr;           // [B, S, G, N]
  __nv_bfloat16* dc = nullptr;           // [B, S, G, N]
  float* d_initial_state = nullptr;      // [B, H, P, N] or null (not wanted)
  // Accumulated:
  float* da_log = nullptr;               // [H]
  float* ddt_bias = nullptr;             // [H]
  float* dd = nullptr;                   // [H] or null (ignored when d is null)
  // As SsdForwardArgs: x_row_stride applies to x and dx, bc_row_stride to B, C, dB and dC (so
  // the gradients land in the column slices of one wider row, as the forward's inputs did).
  // dy stays dense. Elements between the slices are not written.
  int64_t x_row_stride = 0;
  int64_t bc_row_stride = 0;
};

// Empty message when the shape and options are supported by these kernels.
CudaResult SsdCheck(const SsdShape& shape, const SsdOptions& options);

// Bytes of the saved buffer the forward writes and the backward reads.
int64_t SsdSavedBytes(const SsdShape& shape, const SsdOptions& options);

CudaResult SsdForward(const SsdForwardArgs& args, cudaStream_t stream);

// Selects, per kernel, the register-resident v3 kernels (FlashAttention-2 style: products kept
// in mma.sync accumulators through the masking, cp.async double-buffered tiles) instead of the
// v2 ones, for all later calls (process-wide): kSsdRegScanFwd the forward scan, kSsdRegDx the
// backward dx/ddt kernels (with the per-head x·dyᵀ kernel that also feeds dB/dC, which forms
// their intra-chunk ∂Acs terms, and the v3 dB/dC kernel, which forms their inter-chunk ones:
// kSsdRegDx implies kSsdRegDbc), kSsdRegDbc the backward dB/dC kernels, kSsdRegState the
// chunk-state kernels (double-buffered cp.async, not register-resident). 0 = v2 only. Shapes
// whose v3 tiles do not fit shared memory (or, for kSsdRegDx and kSsdRegDbc, N not a multiple
// of 64) use v2 (which is
// why v2 stays: it is the fallback, and the test runs it). All selections compute the same
// function. SsdRegisterPath() is the current mask; the default is
// kSsdRegAll (device-verified and fastest on 2026-11-26; ssd_notes.md).
inline constexpr int kSsdRegScanFwd = 1;
inline constexpr int kSsdRegDx = 2;
inline constexpr int kSsdRegDbc = 4;
inline constexpr int kSsdRegState = 8;  // chunk-state kernels (forward and backward), pipelined
inline constexpr int kSsdRegAll = 15;
void SsdSetRegisterPathForTesting(int mask);
// The pipelined chunk-state kernels compute 128 columns of N per block where P <= 64 and
// N % 128 == 0 (session 4), else 64; 64 forces the session-3 split everywhere (A/B timing and
// the test's coverage of both). Process-wide; 0 restores the default.
void SsdSetStateSliceForTesting(int columns);
// The v3 forward chunk states: 0 (default) fuses the state pass into them where there are enough
// (N slice, head, batch row) blocks to fill the device (ssd.cu, UseFusedStatePass), 1 always
// fuses, 2 never (one chunk per block + ssd_state_pass). Process-wide; same function.
void SsdSetFusedStatePassForTesting(int mode);
// Head split of the v3 dCB kernel (process-wide; same function up to the fp32 order of the
// head sums): 0 = by shape (ssd.cu DcbSplit), 1 / 2 / 4 / 8 = that split where it divides the
// heads per group.
void SsdSetDcbSplitForTesting(int split);
// Helper ssdc13 (session 13): GYRE_SSD_DCB=wgc names the only dCB form (unset is the same;
// "reg", "wg" and any other value are an error from SsdBackward): at head_dim 64 ssd_bwd_dcb_wg
// (the per-head products on wgmma, the head-split sum folded into a thread-block cluster, no
// separate sum kernel); other head dims run ssd_bwd_dcb_reg + ssd_bwd_dcb_sum.
// Environment (read once per process): GYRE_SSD_BWD_DX=wgc, GYRE_SSD_FWD=wgs and
// GYRE_SSD_BWD_DBC=wg (below) name the only kernel forms left; unset is the same, any other value
// is an error from SsdForward / SsdBackward.
// Helper ssd11's forms after the lead's session-9 call: GYRE_SSD_FUSED_STATE=2 (the fused
// chunk-state / state-pass kernels where their blocks are at least 2 per SM) and
// GYRE_SSD_DACS_FINISH=pf (the ∂Acs finishing kernel with its loads issued together) are the
// only forms; GYRE_SSD_DCB_SUM=kernel names the only dCB sum left ("last" was deleted). Unset is
// the same; any other value (the deleted "3", "plain", "last" included) is an error from
// SsdForward / SsdBackward.
// Helper ssd12's side stream (default since the lead's 2026-11-27 call; ssd_notes.md "Session 12
// measured"): GYRE_SSD_SIDE_STREAM=hi (default; unset is the same) | off. Backward only (the
// forward never forks: its launches are all on the caller's stream). hi runs the backward's
// dCB → dCB sum → dB/dC chain on a second stream of the calling device at a middle priority
// (dB/dC waits for the state pass's G only) and the backward state passes on a third at the
// device's greatest priority (both created on first use, never destroyed); bwd dx stays on the
// caller's stream. Both join the caller's stream before ssd_bwd_dacs_finish, so the caller sees
// stream order as before. Same kernels, same values: bitwise the same outputs as off. off: one
// stream (the tests' bitwise reference; an escape hatch). "on" was deleted (it lost to hi) and is
// now an error from SsdBackward naming the accepted values, like any other value.
// Backward calls from several host threads serialise their enqueueing (one mutex; the events
// are shared).
// SsdSetSideStreamForTesting: 0 the environment, 1 off, 2 hi (process-wide).
void SsdSetSideStreamForTesting(int mode);
// Helper ssdx13's bwd dx (session 13): GYRE_SSD_BWD_DX=wgc names the only selectable form (unset
// is the same; "early" and any other value are an error from SsdBackward): the one-block-per-chunk
// wgmma kernel where P = 64, N is 64 or 128 and the chunk is at most 256, the per-s-tile
// mma.sync kernel (early) for every other shape.
// Helper ssdf13's wgmma kernels (session 13; ssd_notes.md "Session 13"): where head_dim is 64
// and state_dim a multiple of 64 the forward scan is ssd_chunk_scan_fwd_wg (GYRE_SSD_FWD=wgs, the
// only accepted value; "xs" is an error) and dB / dC are ssd_bwd_dbc_wg (GYRE_SSD_BWD_DBC=wg, the
// only accepted value; "smem" is an error); other shapes run the mma.sync kernels those names
// used to select. Not bitwise the same as the mma.sync kernels (the products' fp32 order);
// deterministic.
// GYRE_SSD_STATE=ct1 (default; unset is the same) | one: the fused chunk-state / state-pass
// kernels (where UseFusedStatePass picks them). ct1 = helper ssdr13's kernel with P 64 and the
// 128-column slice fixed at compile time (one head per block), where P is 64 and the slice 128
// columns (N % 128 == 0); other shapes, and every shape under "one", run the general one-head
// kernel ssd_chunk_state_scan. Bitwise the same outputs. The default since helper cssdr13's call
// (session 13, one H200; ssd_notes.md). mh2, mh4, ct2 (and any other value) are errors from
// SsdForward / SsdBackward. SsdSetStateFormForTesting: 0 the environment, 1 ct1, 2 one
// (process-wide).
void SsdSetStateFormForTesting(int form);
// GYRE_SSD_DT_CUMSUM=plain is the only accepted value (unset is the same); helper ssdr13's
// coalesced "co" form was measured no faster and is gone (an error from SsdForward).
int SsdRegisterPath();
CudaResult SsdBackward(const SsdBackwardArgs& args, DeviceAllocator* scratch,
                       cudaStream_t stream);

}  // namespace gyre::cuda
