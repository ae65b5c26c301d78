// Glue kernels around the recurrent cells on CUDA (nvcc-compiled, plain C++ API, used by the
// ops/ backend): group-wise norms with the xLSTM 1+w scale and the two fused output paths, the
// small block-diagonal projections of the mLSTM block, the mLSTM gate projections (fp32 gates),
// column bias adds and column sums.
//
// Dtypes: activations bf16 [rows, cols] row-major (with a row stride where named `ld*`);
// weights are read from the fp32 master copies (small tensors; no rounding on the path the CPU
// reference takes in float64); every parameter gradient is fp32 and ACCUMULATES, or is
// overwritten where the args say so (the deferred-zero rule, ops/module.h).
// Deterministic: no float atomics. Every sum over rows (parameter gradients, the fused mLSTM
// gate pre-activations) is formed as per-block partial sums in `scratch` (the caching
// allocator: no cudaMalloc once warm) and reduced in a fixed order, so the same inputs give the
// same bits on every run. Norm statistics fp32 [rows, groups]. Everything is enqueued on
// `stream`; nothing synchronises (scratch blocks go back to the cache for stream-ordered reuse).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/device_allocator.h"
#include "kernels/cuda/device_info.h"
#include "ops/cuda_recurrent.h"

namespace gyre::ops::cuda_ops {

using gyre::cuda::CudaResult;
using gyre::cuda::DeviceAllocator;

using ::gyre::ops::BlockDiagArgs;
using ::gyre::ops::Conv1dArgs;
using ::gyre::ops::GroupNormArgs;
using ::gyre::ops::MlstmGateArgs;
using ::gyre::ops::NormMode;

CudaResult GroupNormForward(const GroupNormArgs& a, cudaStream_t stream);
CudaResult GroupNormBackward(const GroupNormArgs& a, DeviceAllocator* scratch, cudaStream_t stream);
// The mLSTM output norm's backward (mode 2) that also writes the cell's per-token dots
// (GYRE_MLSTM_DH_DOT=norm; kernels/cuda/mlstm.h MlstmChunkwiseBackwardWithDots):
//   dots[r·groups + g] = Σ_{c in group g} float(bf16(dx[r, c])) · (x[r, c] + h_lo[r, c])
// with x = the cell's h and h_lo its saved lo part ([rows, dim] bf16; null = 0), fp32 products and
// sums in a fixed order (bitwise the same run to run). Every other output is GroupNormBackward's,
// bit for bit (the same kernel body). Only for the prefetch kernel's shapes: groups of 384 columns,
// vectorisable, dz packed (and, unless GYRE_MLSTM_OUT_NORM=warp, MlstmOutNormRowCovers' shapes: there
// the outputs are MlstmOutNormRowBackward's); MlstmOutNormDotsCovers says whether; otherwise
// InvalidArgument.
bool MlstmOutNormDotsCovers(const GroupNormArgs& a, const void* h_lo);
CudaResult MlstmOutNormBackwardWithDots(const GroupNormArgs& a, const void* h_lo, float* dots,
                                        DeviceAllocator* scratch, cudaStream_t stream);
// The mLSTM output norm's backward (mode 2) on the CTA-per-(32 rows, head) kernel that
// GYRE_MLSTM_OUT_NORM=row (the default since session 19) routes heads of 512..1024 columns to (xlstm[1:0]-1.3b: 4 x 1024;
// ops/XLSTM_GLUE.md "Session 19"), called directly (tests and benches put it beside the default
// in one process). dots null: GroupNormBackward's outputs, dz and dxc the same arithmetic (expected
// bitwise), dx / dweight / dskip up to fp32 summation order (the row sums and the column sums are
// added in another fixed order: the same bits run to run). dots given: also
// MlstmOutNormBackwardWithDots' dots (same formula, this kernel's fixed order). Unless
// GYRE_MLSTM_OUT_NORM=warp, MlstmOutNormDotsCovers also says true for these shapes and
// MlstmOutNormBackwardWithDots / GroupNormBackward run this kernel. MlstmOutNormRowCovers: mode 2,
// head width % 256 in [512, 1024], statistics given, 16-byte aligned (weight, skip 32), dz packed,
// no dresidual, h_lo 16-byte aligned or null; the call returns InvalidArgument otherwise.
bool MlstmOutNormRowCovers(const GroupNormArgs& a, const void* h_lo);
CudaResult MlstmOutNormRowBackward(const GroupNormArgs& a, const void* h_lo, float* dots, DeviceAllocator* scratch,
                                   cudaStream_t stream);
// Mamba-2's gated norm (NormMode::kGatedInput) on the CTA-per-(row, group) kernels that
// GYRE_GATED_NORM=row (the default) routes the groups of 1537-4096 columns to (ops/MAMBA2_NORM.md), called
// directly (tests and benches put them beside the default in one process): the outputs of
// GroupNormForward / GroupNormBackward up to fp32 summation order (the row sums and dweight are
// added in another fixed order: y, dx, dz within a bf16 ulp, the same bits run to run).
// GatedNormRowCovers: gated, 16-byte aligned, groups of <= 4096 columns (% 8), dz packed or rows
// of lddz % 8 == 0; the two calls return InvalidArgument for any other arguments.
bool GatedNormRowCovers(const GroupNormArgs& a, bool backward);
CudaResult GatedNormRowForward(const GroupNormArgs& a, cudaStream_t stream);
CudaResult GatedNormRowBackward(const GroupNormArgs& a, DeviceAllocator* scratch, cudaStream_t stream);
CudaResult BlockDiagForward(const BlockDiagArgs& a, DeviceAllocator* scratch, cudaStream_t stream);
CudaResult BlockDiagBackward(const BlockDiagArgs& a, DeviceAllocator* scratch, cudaStream_t stream);
// BlockDiagBackward of two 4x4 maps (q, k) with the mLSTM gates (heads <= 4), the row sums (dW,
// dW2, the gates' S) on tensor cores (GYRE_MLSTM_QK_BWD=tc; ops/XLSTM_GLUE.md): the same outputs,
// dx the same bits, the parameter gradients in another fp32 order (dgate split hi + lo bf16 in the
// gate sums: ~2^-17 relative a term). BlockDiagBackwardTcCovers: whether the kernel covers `a`
// (two maps, 4x4 blocks, ldx == ldy, 1..4 heads, aligned); BlockDiagBackwardTc returns
// InvalidArgument for any other.
bool BlockDiagBackwardTcCovers(const BlockDiagArgs& a);
CudaResult BlockDiagBackwardTc(const BlockDiagArgs& a, DeviceAllocator* scratch, cudaStream_t stream);

// The mLSTM decode step's q, k, v maps with the gates in ONE launch (`qk`: xc -> q, k with the
// gate bias; `v`: xm -> v; the arguments of BlockDiagForward(qk) then BlockDiagForward(v)), for at
// most 16 rows (one token or a speculative chunk at small batch): the same outputs bit for bit
// (q, k, v and ig / fg in the two launches' fp32 order; ops/DECODE_GRAPHS.md). Launches must not
// overlap (one device ticket counter; callers enqueue on one stream). BlockDiagQkvRowsCovers:
// whether the kernel covers the pair (4x4 blocks, 1..16 rows, the gate bias on qk only, the same
// ig / fg, aligned); BlockDiagQkvRowsForward returns InvalidArgument for any other.
bool BlockDiagQkvRowsCovers(const BlockDiagArgs& qk, const BlockDiagArgs& v);
CudaResult BlockDiagQkvRowsForward(const BlockDiagArgs& qk, const BlockDiagArgs& v, DeviceAllocator* scratch,
                                   cudaStream_t stream);

// The mLSTM block's causal conv1d forward (`conv`: x = xm -> y = xc) and the three block-diagonal
// maps with the fused gate sums that follow it (`qk`: xc -> q, k with the gate bias; `v`: xm -> v)
// in one pass over xm: the same arguments the three separate launches take (Conv1dForward,
// BlockDiagForward twice), the same outputs (xc, q, k, v bit-identical; ig / fg the same sum in
// another fp32 order). MlstmConvQkvFusable: whether the fused kernel covers them (4x4 blocks,
// heads <= 4, width <= 4, packed rows of `channels`, qk.x == conv.y, v.x == conv.x, aligned);
// MlstmConvQkvForward returns InvalidArgument for any other.
bool MlstmConvQkvFusable(const Conv1dArgs& conv, const BlockDiagArgs& qk, const BlockDiagArgs& v);
CudaResult MlstmConvQkvForward(const Conv1dArgs& conv, const BlockDiagArgs& qk, const BlockDiagArgs& v,
                               DeviceAllocator* scratch, cudaStream_t stream);

// The mLSTM block's conv1d backward (`conv`: x = xm, dy = dxc -> dx = dxm, dw, dbias) and the
// backward of its v map with the fused gates (`v`: x = xm, dy = dv, dx = the same dxm accumulated
// onto the conv's, dw, the gate weight gradients of v's columns and, with gates->dbi, the gate
// bias sums) in one pass (fusion C of ops/XLSTM_GLUE.md): the arguments of Conv1dBackward and
// BlockDiagBackward that the separate path takes, the same outputs up to rounding (dxm rounded to
// bf16 once instead of twice; the parameter sums in another fp32 order). MlstmConvVFusable:
// whether the fused kernel covers them (4x4 blocks, heads <= 4, width <= 4, packed rows of
// `channels`, v.x == conv.x, v.dx == conv.dx with accumulate_dx, every gradient pointer set,
// aligned); MlstmConvVBackward returns InvalidArgument for any other.
bool MlstmConvVFusable(const Conv1dArgs& conv, const BlockDiagArgs& v);
CudaResult MlstmConvVBackward(const Conv1dArgs& conv, const BlockDiagArgs& v, DeviceAllocator* scratch,
                              cudaStream_t stream);

// y[r, c] += bias[c] (bf16 y with row stride ld; fp32 bias).
CudaResult AddColumnBias(void* y, int64_t rows, int64_t cols, int64_t ld, const float* bias, cudaStream_t stream);
// out[c] += Σ_r x[r, c] (bf16 x with row stride ld; fp32 out).
CudaResult ColumnSum(const void* x, int64_t rows, int64_t cols, int64_t ld, float* out, DeviceAllocator* scratch,
                     cudaStream_t stream);

}  // namespace gyre::ops::cuda_ops
