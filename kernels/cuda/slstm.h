// sLSTM cell on the GPU: forward over a sequence and backward through time, each one persistent
// kernel that keeps the recurrent matrix R on chip (in registers) for all S steps. The math, gate
// order, the stabiliser and the gradient are exactly kernels/cpu/slstm.h (the float64 reference
// the GPU test checks against); this header only fixes dtypes, layouts and the device contract.
//
// Dtypes: gate pre-activations gx, the recurrent matrix R, the output h and its gradient dh, and
// d_gx are bf16 (the layer's projections produce and consume bf16); every state (h, c, n, m),
// the gradients of the initial/final state and dR are fp32; the products R h_{t-1} and dG R
// take bf16 operands (h_{t-1} as written to `h`, dG as written to `d_gx`) with fp32 accumulation;
// the pointwise gating runs in fp32.
//
// Layouts (row-major, contiguous; d = NH·dh; as the CPU reference):
//     gx, d_gx [B, S, 4, d]   gate order i, f, z, o; unit j of head hd at index hd·dh + j
//     R        [NH, 4, dh, dh] R[hd][g][j][l]: from h_{t−1}[hd·dh + l] to g̃[g][hd·dh + j]
//     dR       [NH, 4, dh, dh] fp32, ACCUMULATED (+=)
//     h, dh    [B, S, d]
//     states   (h, c, n, m), each [B, d] fp32
//     saved    opaque, SlstmSavedBytes(shape) bytes; batch-major like the CPU one (batch row b's
//              part is contiguous), so batch slices compose as in kernels/cpu/slstm.h
//
// Contract (as the CPU reference): null `initial.h` means a zero initial state; null
// `final_state.h` / `d_initial.h` means not wanted; null `d_final.h` means zero; d_gx and
// d_initial are OVERWRITTEN, dR ACCUMULATES.
//
// Supported shapes (SlstmCheck): head_dim a multiple of 16 and at most 512 (Gyre's presets: 192,
// 256, 384, 512), any batch and length >= 1. The cluster kernel needs head_dim <= 256 or a
// multiple of 32 (clusters of head_dim/16 or head_dim/32 <= 16 CTAs); the flag kernel needs all
// its CTAs resident at once (cooperative launch, NH·head_dim/16 CTAs per batch slice of up to 16
// rows; larger batches run as several launches in sequence).
//
// Streams and scratch: everything is enqueued on `stream`; scratch (step flags, the shifted h for
// dR) comes from `allocator` and is returned before the call returns (stream-ordered reuse, see
// device_allocator.h). Not thread-safe per allocator/GemmContext (see their headers).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/device_allocator.h"
#include "kernels/cuda/device_info.h"
#include "kernels/cuda/gemm.h"

namespace gyre::cuda {

struct SlstmShape {
  int64_t batch = 0;      // B
  int64_t seq_len = 0;    // S
  int64_t num_heads = 0;  // NH
  int64_t head_dim = 0;   // dh; d = NH·dh
};

// Device pointers to one (h, c, n, m) state, each [B, d] fp32 (see the contract above for null).
struct SlstmState {
  float* h = nullptr;
  float* c = nullptr;
  float* n = nullptr;
  float* m = nullptr;
};
struct SlstmConstState {
  const float* h = nullptr;
  const float* c = nullptr;
  const float* n = nullptr;
  const float* m = nullptr;
};

// Which persistent kernel runs the recurrence (slstm.cu explains them). kAuto:
// kClusterAsyncFastNext when the shape and the device allow a cluster kernel of >= 2 CTAs, the
// barrier cluster kernel for one-CTA clusters, else kFlags. Results agree to rounding; all are
// device-tested (slstm_gpu_test --experimental: 756 checks on an H200, 2026-11-26).
enum class SlstmAlgorithm {
  kAuto,
  kCluster,  // one thread-block cluster per (head, 8 batch rows); h / dG exchanged through DSMEM,
             // one cluster barrier per step
  kFlags,    // cooperative grid, per-head release/acquire flags; h / dG exchanged through L2
  // kCluster with mbarrier-counted st.async DSMEM stores instead of a cluster barrier per step.
  kClusterAsync,
  // kClusterAsync plus latency cuts: inputs loaded two steps ahead, shorter MMA chains, faster
  // pointwise math; the backward exchanges fp32 partial products (half the DSMEM bytes, one
  // __syncthreads a step; slstm.cu, SlstmBwdPartialKernel).
  kClusterAsyncFast,
  // What kAuto runs (9.43 ms fwd+bwd at 1.3B B8 S2048 on an H200, 6.4x the xlstm kernel):
  // kClusterAsyncFast with the prefetched step inputs left untouched (raw bf16 bits,
  // unconditional loads straight into the loop-carried registers) until the step that uses them.
  kClusterAsyncFastNext,
};

// Tuning aid (kClusterAsyncFast / kClusterAsyncFastNext kernels only; ignored otherwise): with
// `debug_trace` set to SlstmTraceLongs(shape) zeroed int64s, thread 0 of each CTA of the first
// cluster (head 0, batch rows 0-7) records clock64() at kSlstmTracePoints points of each of its
// first kSlstmTraceSteps steps: trace[(cta · kSlstmTraceSteps + step) · kSlstmTracePoints +
// point]. Points, forward: step start, data received (mbarrier passed), products reduced (after
// the first barrier), pointwise done (before the DSMEM stores); backward: step start, dG·R
// partials received and summed, pointwise done (after the barrier), partial products sent.
constexpr int kSlstmTraceSteps = 256;
constexpr int kSlstmTracePoints = 4;
int64_t SlstmTraceLongs(const SlstmShape& shape);

// Tuning aid: the cluster kernels' per-step DSMEM exchange alone (no products, no pointwise).
// `clusters` clusters of `cluster_size` CTAs (512 threads each) run `steps` steps; per step every
// CTA sends `bytes_per_dest` bytes (a multiple of 16, 16-byte stores) to each CTA of its cluster
// and waits for what it receives: `barrier` true as kCluster (DSMEM stores + a cluster barrier),
// false as kClusterAsync (st.async counted on an mbarrier). Synchronises `stream`; *ms is the
// kernel's time (CUDA events). E.g. the 1.3B forward sends 512 bytes a destination, clusters of 16.
CudaResult SlstmExchangeProbe(int cluster_size, int clusters, int bytes_per_dest, int steps,
                              bool barrier, cudaStream_t stream, float* ms);

// Ok, or InvalidArgument naming the unsupported field.
CudaResult SlstmCheck(const SlstmShape& shape);

// Bytes of the forward's saved buffer: per (b, t) the four gate pre-activations (input +
// recurrent) and c_t, n_t, m_t, fp32: B·S·7·d·4.
int64_t SlstmSavedBytes(const SlstmShape& shape);

struct SlstmForwardArgs {
  SlstmShape shape;
  const __nv_bfloat16* gx = nullptr;  // [B, S, 4, d]
  const __nv_bfloat16* r = nullptr;   // [NH, 4, dh, dh]
  SlstmConstState initial;            // null h: zeros
  __nv_bfloat16* h = nullptr;         // [B, S, d] overwritten
  void* saved = nullptr;              // SlstmSavedBytes; null when no backward follows
  SlstmState final_state;             // null h: not wanted
  SlstmAlgorithm algorithm = SlstmAlgorithm::kAuto;
  long long* debug_trace = nullptr;  // tuning aid, see kSlstmTraceSteps; normally null
};

struct SlstmBackwardArgs {
  SlstmShape shape;
  const __nv_bfloat16* r = nullptr;   // [NH, 4, dh, dh]
  SlstmConstState initial;            // as given to the forward
  const __nv_bfloat16* h = nullptr;   // the forward's output
  const void* saved = nullptr;        // the forward's saved buffer
  const __nv_bfloat16* dh = nullptr;  // [B, S, d]
  SlstmConstState d_final;            // null h: zero
  __nv_bfloat16* d_gx = nullptr;      // [B, S, 4, d] overwritten
  float* dr = nullptr;                // [NH, 4, dh, dh] accumulated; null: not wanted
  SlstmState d_initial;               // null h: not wanted
  SlstmAlgorithm algorithm = SlstmAlgorithm::kAuto;
  long long* debug_trace = nullptr;  // tuning aid, see kSlstmTraceSteps; normally null
};

CudaResult SlstmForward(const SlstmForwardArgs& args, DeviceAllocator* allocator,
                        cudaStream_t stream);

// dR = Σ_{b,t} d_gxᵀ h_{t−1} runs after the recurrent kernel as one cuBLASLt product per
// (head, gate) over all B·S rows (it is off the sequential path), through `gemm`.
CudaResult SlstmBackward(const SlstmBackwardArgs& args, GemmContext* gemm,
                         DeviceAllocator* allocator, cudaStream_t stream);

}  // namespace gyre::cuda
