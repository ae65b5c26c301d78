// Fused RMSNorm / LayerNorm with an optional residual add, forward and backward (bf16
// activations, fp32 statistics). One warp per row; the launcher picks 16-byte vector accesses
// when the row length is a multiple of 8 and the pointers are 16-byte aligned, else scalar ones.
//
// Forward (rows N, features d; ops/layers.h Norm with groups = 1, weight_offset = 0):
//   s = x + residual                     (rounded to bf16 and written to residual_out; with no
//                                          residual, s = x and nothing is written)
//   RMS:   rstd = 1 / sqrt(mean(s²) + eps),             y = s · rstd · w
//   Layer: mean = mean(s), rstd = 1 / sqrt(mean((s - mean)²) + eps),
//                                                       y = (s - mean) · rstd · w + b
// Saved for backward: s (x or residual_out), rstd [N] (and mean [N] for LayerNorm), fp32.
//
// Backward, with xhat = (s - mean) · rstd and g = dy · w:
//   ds = rstd · (g - mean(g) [Layer only] - xhat · mean(g · xhat)) + dresidual
//   dw += Σ_rows dy · xhat,  db += Σ_rows dy         (fp32; accumulate = false: dw = ..., db = ...)
// ds overwrites dx; it is the gradient of both x and residual (s = x + residual). dresidual is
// the gradient arriving along the residual stream (of residual_out), if any.
//
// The weight gradient is a column sum over rows, done deterministically without atomics: a
// second kernel writes per-row-chunk partial sums [chunks, d] to scratch taken from the
// allocator, and a third sums them in a fixed order into dw/db. Same inputs, same bits.
//
// Cost (bf16 = 2 bytes): forward reads x (+ residual), writes y (+ residual_out): 4-8 bytes per
// element. Backward, RMSNorm with d % 8 == 0, d <= 2048 and 16-byte-aligned rows (the Llama and
// Mamba-2 widths): one pass, reads dy, s (+ dresidual), writes dx: 6-8 bytes per element (dx must
// not overlap dy, s or dresidual there: an error); otherwise (LayerNorm, other shapes) the dw
// kernel re-reads dy and s: 10-12 bytes. Measured on an H100 (copy 2.87 TB/s at these sizes;
// norm_notes.md, normbwd22): 16K tokens x d 2048 (268 MB) backward 0.113 ms (83% of copy),
// forward 0.096 ms (98%); 32K x 768 backward 0.084 ms (85%).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/device_allocator.h"
#include "kernels/cuda/device_info.h"

namespace gyre::cuda {

enum class NormKind { kRms, kLayer };

struct NormForwardArgs {
  NormKind kind = NormKind::kRms;
  int64_t rows = 0, dim = 0;
  float eps = 1e-5f;
  const __nv_bfloat16* x = nullptr;         // [rows, dim]
  const __nv_bfloat16* residual = nullptr;  // [rows, dim] or null
  __nv_bfloat16* residual_out = nullptr;    // [rows, dim]; required iff residual != null
  const __nv_bfloat16* weight = nullptr;    // [dim] or null (scale 1)
  const __nv_bfloat16* bias = nullptr;      // [dim] or null; LayerNorm only
  __nv_bfloat16* y = nullptr;               // [rows, dim]
  float* mean = nullptr;                    // [rows]; LayerNorm only (required there)
  float* rstd = nullptr;                    // [rows]
};

struct NormBackwardArgs {
  NormKind kind = NormKind::kRms;
  int64_t rows = 0, dim = 0;
  const __nv_bfloat16* dy = nullptr;         // [rows, dim]
  const __nv_bfloat16* s = nullptr;          // [rows, dim] the forward's normalised input
  const __nv_bfloat16* weight = nullptr;     // [dim] or null
  const float* mean = nullptr;               // [rows] LayerNorm
  const float* rstd = nullptr;               // [rows]
  const __nv_bfloat16* dresidual = nullptr;  // [rows, dim] or null
  __nv_bfloat16* dx = nullptr;               // [rows, dim] overwritten; apart from dy, s, dresidual
  float* dweight = nullptr;                  // [dim] accumulated, or null
  float* dbias = nullptr;                    // [dim] accumulated, or null (LayerNorm)
  bool accumulate = true;                    // false: dweight / dbias are overwritten (never read)
};

CudaResult NormForward(const NormForwardArgs& args, cudaStream_t stream);
// `scratch` provides the partial-sum buffer for dweight/dbias (cached after the first call).
CudaResult NormBackward(const NormBackwardArgs& args, DeviceAllocator* scratch,
                        cudaStream_t stream);

}  // namespace gyre::cuda
