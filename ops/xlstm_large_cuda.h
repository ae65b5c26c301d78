// CUDA glue of the xLSTM Large block (ops/xlstm_large_block.h; arguments and semantics in
// ops/cuda_recurrent.h XlstmLargeGateArgs / XlstmLargeOutGateArgs). Everything else of the block
// on CUDA is existing ops: cuBLASLt GEMMs, the RMS / per-head Layer norms, the chunkwise mLSTM
// cell (dk != dv), the SwiGLU MLP and the fused LM-head loss with its opt-in logit cap.
//
//   xl_gates_fwd  one thread per (row, gate column): pre += bias, gate = cap·tanh(pre / cap),
//                 split into the cell's ig / fg [rows, heads] layouts. rows · 2·heads floats:
//                 at 32K tokens x 16 columns 2 MB in, 4 MB out: microseconds.
//   xl_gates_bwd  one block per gate column (2·heads blocks of 256 threads): each thread walks rows
//                 r ≡ tid (mod 256) computing d·sech²(pre / cap), stores it as bf16 (the GEMMs'
//                 operand) and sums the fp32 products; the block then reduces its 256 partials in
//                 a fixed tree order: the bias gradient without atomics, the same bits every run
//                 (the repository's determinism rule, ops/recurrent_cuda.h). 2·heads blocks is a
//                 small grid (16 at the 7B), but the data are rows · 16 floats: it reads 4 MB at
//                 32K tokens, ~20 µs even at a tenth of the card's bandwidth.
//   xl_out_gate_fwd / _bwd  elementwise over [rows, d] bf16: y = hn ⊙ σ(o); dhn = dy ⊙ σ(o),
//                 d_o = dy ⊙ hn ⊙ σ(o)(1 − σ(o)) in fp32, rounded once. Memory-bound
//                 (3 / 5 bf16 passes); not fused into the norm yet (a candidate once measured).
#pragma once

#include <cuda_runtime.h>

#include "kernels/cuda/cuda_check.h"
#include "ops/cuda_recurrent.h"

namespace gyre::ops::cuda_ops {

using gyre::cuda::CudaResult;

CudaResult XlstmLargeGatesForward(const XlstmLargeGateArgs& a, cudaStream_t stream);
CudaResult XlstmLargeGatesBackward(const XlstmLargeGateArgs& a, cudaStream_t stream);
CudaResult XlstmLargeOutGateForward(const XlstmLargeOutGateArgs& a, cudaStream_t stream);
CudaResult XlstmLargeOutGateBackward(const XlstmLargeOutGateArgs& a, cudaStream_t stream);

}  // namespace gyre::ops::cuda_ops
