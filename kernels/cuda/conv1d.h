// Causal depthwise conv1d (+ optional fused SiLU), forward and backward on the GPU: the CUDA twin
// of kernels/cpu/conv1d.h (same math, layout, state convention and gradient contract).
//
//     u_t[ch] = bias[ch] + Σ_{j<K} w[ch][j] · x_{t−(K−1)+j}[ch],   y_t = u_t or SiLU(u_t)
//
// x_τ for τ < 0 comes from the conv state [B, K−1, C] (row r = x_{r−(K−1)}, oldest first; zeros
// when none). Width K is 1..4.
//
// Layouts and dtypes: x, y, dx, dy [B, S, C] bf16 (channels last); conv states and their
// gradients [B, K−1, C] bf16; w [C, K], bias [C] and their gradients fp32.
// Gradient contract: dx and d initial state OVERWRITTEN; dw and dbias ACCUMULATE, or are
// OVERWRITTEN with `overwrite_dparams` (the deferred-zero rule's first write, ops/module.h);
// either way deterministically: per-tile partial sums reduced in a fixed order, no float atomics.
// Nothing is saved: the backward recomputes u from x.
//
// Calls are asynchronous on `stream`; pointers are device pointers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/device_allocator.h"
#include "kernels/cuda/device_info.h"

namespace gyre::cuda {

// Field-for-field gyre::cpu::Conv1dShape / Conv1dOptions.
struct Conv1dShape {
  int64_t batch = 0;     // B
  int64_t seq_len = 0;   // S
  int64_t channels = 0;  // C
  int64_t width = 4;     // K (1..4)
};

struct Conv1dOptions {
  bool silu = false;
};

struct Conv1dForwardArgs {
  Conv1dShape shape;
  Conv1dOptions options;
  const __nv_bfloat16* x = nullptr;              // [B, S, C]
  const float* w = nullptr;                      // [C, K]
  const float* bias = nullptr;                   // [C] or null
  const __nv_bfloat16* initial_state = nullptr;  // [B, K−1, C] or null (zeros)
  __nv_bfloat16* y = nullptr;                    // [B, S, C] overwritten
  __nv_bfloat16* final_state = nullptr;          // [B, K−1, C] or null
};

struct Conv1dBackwardArgs {
  Conv1dShape shape;
  Conv1dOptions options;
  const __nv_bfloat16* x = nullptr;
  const float* w = nullptr;
  const float* bias = nullptr;
  const __nv_bfloat16* initial_state = nullptr;
  const __nv_bfloat16* dy = nullptr;             // [B, S, C]
  const __nv_bfloat16* d_final_state = nullptr;  // [B, K−1, C] or null (zero)
  __nv_bfloat16* dx = nullptr;                   // [B, S, C] overwritten (rows of dx_row_stride)
  // dx's row stride in elements: 0 = C (packed), else >= C (dx is then the C leading columns of
  // wider rows, e.g. one gradient [B·S, ldx] holding several projections' columns).
  int64_t dx_row_stride = 0;
  float* dw = nullptr;                           // [C, K] accumulated (or overwritten)
  float* dbias = nullptr;                        // [C] accumulated (or overwritten), or null
  __nv_bfloat16* d_initial_state = nullptr;      // [B, K−1, C] overwritten, or null
  bool overwrite_dparams = false;                // dw, dbias = Σ instead of += Σ
};

CudaResult Conv1dCheck(const Conv1dShape& shape);
CudaResult Conv1dForward(const Conv1dForwardArgs& args, cudaStream_t stream);
// `scratch` provides the dw/dbias partial sums (cached after the first call).
CudaResult Conv1dBackward(const Conv1dBackwardArgs& args, DeviceAllocator* scratch,
                          cudaStream_t stream);

}  // namespace gyre::cuda
