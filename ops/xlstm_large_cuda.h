// CUDA glue of the xLSTM Large block (ops/xlstm_large_block.h; arguments and semantics in
// ops/cuda_recurrent.h XlstmLargeGateArgs / XlstmLargeNormGateArgs). Everything else of the block
// on CUDA is existing ops: cuBLASLt GEMMs, the RMS / per-head Layer norms, the chunkwise mLSTM
// cell (dk != dv), the SwiGLU MLP and the fused LM-head loss with its opt-in logit cap.
//
//   xl_gates_fwd  one thread per (row, gate column): pre += bias, gate = cap·tanh(pre / cap),
//                 split into the cell's ig / fg [rows, heads] layouts. rows · 2·heads floats:
//                 at 32K tokens x 16 columns 2 MB in, 4 MB out: microseconds.
//   xl_gates_bwd_tiles + xl_gates_bias_sum  one block per 256 rows, a thread per row: d·sech²(pre /
//                 cap) stored as bf16 (the GEMMs' operand, row stride ldpre), the fp32 products
//                 summed per column (warp shuffles, then the 8 warps in order) into a per-tile
//                 partial; then one block per column adds the tiles in order and a fixed tree: the
//                 bias gradient without atomics, the same bits every run (the repository's
//                 determinism rule, ops/recurrent_cuda.h). (Session 21 replaced one block per gate
//                 column walking all rows: 2·heads = 8 blocks at the 125m took 1.46 ms a step for
//                 data of ~2.6 MB a layer; the tiled pair 0.14 ms.)
//   xl_norm_gate_fwd / _bwd  the per-head LayerNorm and the out gate in one pass each way: one
//                 warp per (row, head) holds the head's dv values in registers (8 bf16 a lane per
//                 256-column chunk, dv <= 1024), so h, o (and dy) are read once and y (dh, d_o)
//                 written once: 3 / 5 bf16 passes instead of 3 + 3 / 3 + 5 (ops/XLSTM_LARGE.md,
//                 session 20). The backward's dweight is per-tile partial sums (64 rows x one head
//                 per block, the 8 warps added in order in shared memory), then a column pass over
//                 the tiles in order (a block per 32 columns, warp w adding tiles w, w + 8, ...,
//                 then the 8 warp sums in order; session 21, it replaced one thread a column: the
//                 backward row 2.03 -> 1.36 ms at the 125m): no atomics, the same bits every run. (It replaced the
//                 GroupNorm kernel + an elementwise gate kernel, xl_out_gate_fwd / _bwd: 6.9 ->
//                 3.4 ms a step at xlstm-large-bench B4.)
//   xl_head_width one thread per 16-byte vector of the destination: dst[r, h, j] = src[r, h, j]
//                 for j < src width, else 0 (pads q / k per head to the cell's dk, or cuts dq / dk
//                 back). Pure copy: at the 125m's B16 x 2048, dk 96 -> 128, 4 heads: 25 MB read,
//                 34 MB written per tensor, ~25 µs at 2.5 TB/s.
#pragma once

#include <cuda_runtime.h>

#include "kernels/cuda/cuda_check.h"
#include "ops/cuda_recurrent.h"

namespace gyre::ops::cuda_ops {

using gyre::cuda::CudaResult;

CudaResult XlstmLargeGatesForward(const XlstmLargeGateArgs& a, cudaStream_t stream);
CudaResult XlstmLargeGatesBackward(const XlstmLargeGateArgs& a, cudaStream_t stream);
CudaResult XlstmLargeNormGateForward(const XlstmLargeNormGateArgs& a, cudaStream_t stream);
CudaResult XlstmLargeNormGateBackward(const XlstmLargeNormGateArgs& a, cudaStream_t stream);
CudaResult XlstmLargeHeadWidth(const XlstmLargeHeadWidthArgs& a, cudaStream_t stream);

}  // namespace gyre::ops::cuda_ops
