// Argument structs of the recurrent blocks' CUDA work (plain C++: shared by ops/cuda_backend.h,
// which every build compiles, and the nvcc-compiled kernels of ops/recurrent_cuda.h). Pointers
// are device pointers; bf16 arrays are 2-byte storage. Semantics: ops/recurrent_cuda.h (glue)
// and kernels/cuda/{conv1d,mlstm,slstm,ssd}.h (cells).
#pragma once

#include <cstdint>

namespace gyre::ops {

// Group-wise RMS/Layer norm over [rows, dim] in `groups` equal slices, scale (w + offset):
//   kPlain        y = N(x)
//   kGatedInput   a = x ⊙ SiLU(z);  y = N(a)                      (Mamba-2 gated RMSNorm)
//   kMlstmOutput  hs = N(x) + skip ⊙ xc;  y = hs ⊙ SiLU(z)         (mLSTM block output)
// Backward: dx (overwritten, + dresidual when given), dz (overwritten; modes 1, 2), dxc (overwritten; mode 2),
// dweight / dskip (fp32, accumulated, or overwritten with `overwrite_dparams`).
enum class NormMode { kPlain = 0, kGatedInput = 1, kMlstmOutput = 2 };

struct GroupNormArgs {
  NormMode mode = NormMode::kPlain;
  bool layer = false;  // LayerNorm (mean removed) vs RMSNorm
  int64_t rows = 0, dim = 0, groups = 1;
  float eps = 1e-5f;
  float weight_offset = 0.f;
  const void* x = nullptr;        // [rows, dim]
  const float* weight = nullptr;  // [dim] or null (scale 1 + offset... i.e. no learnable scale: 1)
  const void* z = nullptr;        // [rows, ldz] (modes 1, 2)
  int64_t ldz = 0;
  const float* skip = nullptr;    // [dim] (mode 2)
  const void* xc = nullptr;       // [rows, dim] (mode 2)
  void* y = nullptr;              // [rows, dim]
  float* mean = nullptr;          // [rows, groups] (LayerNorm)
  float* rstd = nullptr;          // [rows, groups]
  // Backward.
  const void* dy = nullptr;
  void* dx = nullptr;
  void* dz = nullptr;    // [rows, dim], rows of lddz (below) when set (modes 1, 2)
  void* dxc = nullptr;   // [rows, dim]
  // Optional [rows, dim], kPlain only: added to dx (a residual branch's gradient: no separate add pass).
  const void* dresidual = nullptr;
  float* dweight = nullptr;
  float* dskip = nullptr;
  // dweight / dskip = Σ instead of += Σ: the deferred-zero rule's first write (ops/module.h).
  bool overwrite_dparams = false;
  // Backward, modes 1 and 2: dz's row stride in elements; 0 = dim (packed). Mode 1: Mamba-2's
  // fused in_proj backward; mode 2: the mLSTM block's fused up projection backward (dz the last p
  // columns of dx_m | dz). (Last, in the tail padding after the bool: the kernels' by-value
  // parameter block keeps its size and layout.)
  int32_t lddz = 0;
};

// mLSTM gate pre-activations from concat(q, k, v) without the concat (heads <= 8):
//   ig[r, g] = bi[g] + Σ_j qkv[r, j] wi[g, j],  fg likewise;  q, k, v [rows, p] bf16.
// Backward: not a launch of its own — it runs inside the backward of the block-diagonal maps
// that produced q, k, v (BlockDiagArgs::gates), which read dq, dk, dv anyway.
struct MlstmGateArgs {
  int64_t rows = 0, inner = 0, heads = 0;
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const float* wi = nullptr;  // [heads, 3 inner]
  const float* wf = nullptr;
  const float* bi = nullptr;  // [heads]
  const float* bf = nullptr;
  float* ig = nullptr;        // [rows, heads]
  float* fg = nullptr;
  // Backward (through BlockDiagArgs::gates): gate gradients [rows, heads] in, parameter
  // gradients accumulated.
  const float* dig = nullptr;
  const float* dfg = nullptr;
  float* dwi = nullptr;
  float* dwf = nullptr;
  float* dbi = nullptr;
  float* dbf = nullptr;
  // Overwrite instead of accumulate (the deferred-zero rule's first write): dwi / dwf columns of
  // this launch's maps, and dbi / dbf.
  bool overwrite_dw = false;
  bool overwrite_db = false;
};

// Block-diagonal map with small square-ish blocks (block_in, block_out <= 8):
//   y[r, b·bo + o] = Σ_i x[r, b·bi + i] · w[b, o, i]
// Backward: dx (= or += when accumulate) and dw (+=, or = with overwrite_dw).
// Optional second map over the SAME input in the same pass (the mLSTM's q and k): w2 -> y2
// forward; backward dx also gets dy2·w2 and dw2 += dy2ᵀx (y2 / dy2 share ldy).
struct BlockDiagArgs {
  int64_t rows = 0, blocks = 0, block_in = 0, block_out = 0;
  const void* x = nullptr;
  int64_t ldx = 0;
  const float* w = nullptr;  // [blocks, block_out, block_in]
  void* y = nullptr;
  int64_t ldy = 0;
  const void* dy = nullptr;  // ld = ldy
  void* dx = nullptr;        // ld = ldx
  bool accumulate_dx = false;
  float* dw = nullptr;
  const float* w2 = nullptr;
  void* y2 = nullptr;
  const void* dy2 = nullptr;
  float* dw2 = nullptr;
  bool overwrite_dw = false, overwrite_dw2 = false;  // dw / dw2 = instead of += (deferred-zero rule)
  // Optional, backward only: the mLSTM gates read y (y2) as the columns gate_col (gate_col2) ..
  // + blocks·block_out of concat(q, k, v), and their gradient is fused in: per row
  //   dy_total = dy + Σ_t dig[r, t] wi[t, gate_col + c] + dfg[r, t] wf[t, gate_col + c]
  // feeds dx and dw; dwi / dwf of those columns += dgateᵀ y with y = x·wᵀ recomputed in fp32
  // (not re-read); dbi / dbf += Σ_r dgate when gates->dbi is set (give it to one launch only);
  // = instead of += with gates->overwrite_dw / overwrite_db. (Forward: MlstmGateArgs' ig / fg.)
  // `gates` is read on the host during the call; its q/k/v/ig/fg/dq.. fields are not used.
  const MlstmGateArgs* gates = nullptr;
  int64_t gate_col = 0, gate_col2 = 0;
};

// Causal depthwise conv1d (+ SiLU), kernels/cuda/conv1d.h: x, y, dy, dx [B, S, C] bf16; w [C, K],
// bias [C] fp32 masters; dw, dbias fp32 accumulated (overwritten with `overwrite_dparams`).
struct Conv1dArgs {
  int64_t batch = 0, seq = 0, channels = 0, width = 4;
  bool silu = false;
  const void* x = nullptr;
  // x's row stride in elements, 0 = channels (packed); else >= channels: x is the leading columns
  // of wider rows (the mLSTM block's fused up projection output x_m | z, GYRE_MLSTM_UP=fused). The
  // fused mLSTM kernels (MlstmConvQkv, MlstmConvVBackward) read it in place; the plain conv1d
  // kernels take packed rows, so CudaBackend::Conv1d copies x to packed scratch first.
  int64_t x_row_stride = 0;
  const float* w = nullptr;
  const float* bias = nullptr;
  void* y = nullptr;
  const void* dy = nullptr;
  void* dx = nullptr;
  int64_t dx_row_stride = 0;  // backward: dx's row stride in elements, 0 = channels (packed)
  float* dw = nullptr;
  float* dbias = nullptr;
  bool overwrite_dparams = false;  // dw, dbias = Σ: the deferred-zero rule's first write (ops/module.h)
};

// mLSTM chunkwise cell, kernels/cuda/mlstm.h: q, k [B, S, NH, dk], v, h [B, S, NH, dv] bf16;
// gates [B, S, NH] fp32; saved: SavedBytes.
struct MlstmCellArgs {
  int64_t batch = 0, seq = 0, heads = 0, dk = 0, dv = 0, chunk = 64;
  bool sigmoid_forget = true;
  double eps = 1e-6;
  double qk_scale = 0;  // 0 = 1/sqrt(dk); see kernels/cuda/mlstm.h MlstmOptions::qk_scale
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const float* ig = nullptr;
  const float* fg = nullptr;
  void* h = nullptr;
  void* saved = nullptr;
  void* tokens = nullptr;  // MlstmTokenBytes: saved's per-token part (GYRE_MLSTM_RECOMPUTE=states)
  const void* dh = nullptr;
  // Backward, optional: [B, S, NH] fp32 dh·(h + h_lo) per token and head, formed by the caller
  // (kernels/cuda/mlstm.h MlstmChunkwiseBackwardWithDots); null = the cell forms them.
  const float* dh_dots = nullptr;
  void* dq = nullptr;
  void* dk_out = nullptr;
  void* dv_out = nullptr;
  float* dig = nullptr;
  float* dfg = nullptr;
};

// sLSTM cell, kernels/cuda/slstm.h: gx, dgx [B, S, 4, d] bf16; r [NH, 4, dh, dh] bf16 (compute
// copy); h, dh [B, S, d] bf16; dr fp32 accumulated.
struct SlstmCellArgs {
  int64_t batch = 0, seq = 0, heads = 0, head_dim = 0;
  const void* gx = nullptr;
  const void* r = nullptr;
  void* h = nullptr;
  void* saved = nullptr;
  const void* dh = nullptr;
  void* dgx = nullptr;
  float* dr = nullptr;
};

// Mamba-2 SSD, kernels/cuda/ssd.h: x, y [B, S, H, P] bf16; dt [B, S, H] fp32 raw; B, C
// [B, S, G, N] bf16; A_log, dt_bias, D [H] fp32 masters (their gradients accumulate).
struct SsdCellArgs {
  int64_t batch = 0, seq = 0, heads = 0, head_dim = 0, groups = 1, state = 0, chunk = 256;
  const void* x = nullptr;
  const float* dt = nullptr;
  const float* a_log = nullptr;
  const float* dt_bias = nullptr;
  const void* b = nullptr;
  const void* c = nullptr;
  const float* d = nullptr;
  void* y = nullptr;
  void* saved = nullptr;
  const void* dy = nullptr;
  void* dx = nullptr;
  float* ddt = nullptr;
  void* db = nullptr;
  void* dc = nullptr;
  float* da_log = nullptr;
  float* ddt_bias = nullptr;
  float* dd = nullptr;
  // Token-row strides in elements of x / dx and of B, C / dB, dC (0 = dense), as ssd.h: lets
  // the block pass column slices of the conv output without copies.
  int64_t x_row_stride = 0, bc_row_stride = 0;
};

// xLSTM Large glue (ops/xlstm_large_cuda.h; the block: ops/xlstm_large_block.h).
// Gates: `pre` [rows, 2·heads] fp32 is the gate GEMM's output u·[W_i; W_f]ᵀ without bias (columns
// [0, heads) the input gate, [heads, 2·heads) the forget gate).
//   forward:  pre += (bi | bf) in place (pre becomes the raw pre-activations, kept for the
//             backward); ig, fg [rows, heads] fp32 = cap·tanh(pre / cap) (cap 0: pre itself).
//   backward: dpre [rows, 2·heads] bf16 = (dig | dfg) · sech²(pre / cap) (the two GEMMs' operand);
//             dbi, dbf fp32 += Σ_rows of the fp32 products, in a fixed order (= with overwrite_db).
struct XlstmLargeGateArgs {
  int64_t rows = 0, heads = 0;
  float cap = 15.f;
  float* pre = nullptr;
  const float* bi = nullptr;
  const float* bf = nullptr;
  float* ig = nullptr;
  float* fg = nullptr;
  const float* dig = nullptr;
  const float* dfg = nullptr;
  void* dpre = nullptr;
  float* dbi = nullptr;
  float* dbf = nullptr;
  bool overwrite_db = false;
  // Backward scratch: XlstmLargeGatePartialFloats(rows, heads) fp32. One block per 256 rows writes
  // dpre and its per-column partial sums, then one block per column adds the partials in tile
  // order (fixed order: the same bits every run). It replaced one block per gate column walking
  // all rows (2·heads blocks, latency-bound: 1.46 -> 0.14 ms a step at the 125m, ops/XLSTM_LARGE.md
  // session 21).
  float* partial = nullptr;
  // dpre's row stride in elements; 0 = 2·heads (packed). The folded backward (the block's default,
  // GYRE_XLSTM_LARGE_FOLD_GATES) writes dpre as the last 2·heads columns of [d_o | dpre].
  int64_t ldpre = 0;
};
constexpr int64_t kXlstmLargeGateTileRows = 256;
inline int64_t XlstmLargeGatePartialFloats(int64_t rows, int64_t heads) {
  return (rows + kXlstmLargeGateTileRows - 1) / kXlstmLargeGateTileRows * 2 * heads;
}

// The per-head LayerNorm (weight only) and the output gate in one pass each way (session 20,
// helper xlperf20, ops/XLSTM_LARGE.md; it replaced the GroupNorm kernel + an elementwise gate):
//   forward:  y = (LN_head(h) · weight) ⊙ σ(o), mean / rstd [rows, heads] fp32 kept;
//   backward: with n = xhat · weight, dn = dy ⊙ σ(o):  dh = LayerNorm backward of dn,
//             d_o = dy ⊙ n ⊙ σ(o)(1 − σ(o)), dweight (+)= Σ_rows dn ⊙ xhat (fixed order: per
//             tile_rows-row tile partial sums in `partial`, then summed over tiles in order by
//             one block per 32 columns, warp w adding tiles w, w + 8, ..., then the 8 warp sums).
// h, o, y, dy, dh, d_o [rows, dim] bf16; dim = heads · dv with dv a multiple of 8, at most 1024.
struct XlstmLargeNormGateArgs {
  int64_t rows = 0, dim = 0, heads = 0;
  float eps = 1e-6f;
  const void* h = nullptr;
  const void* o = nullptr;
  const float* weight = nullptr;  // [dim] fp32 master
  void* y = nullptr;
  float* mean = nullptr;  // [rows, heads]
  float* rstd = nullptr;  // [rows, heads]
  const void* dy = nullptr;
  void* dh = nullptr;
  void* d_o = nullptr;
  float* dweight = nullptr;
  float* partial = nullptr;  // backward scratch: XlstmLargeNormGatePartialFloats(rows, dim, tile_rows) floats
  bool overwrite_dweight = false;
  // Backward rows per block (a multiple of 8, the block's warps); the block uses 64 (32 and 16
  // measured slower, ops/XLSTM_LARGE.md session 20).
  int32_t tile_rows = 64;
  int64_t ld_do = 0;  // d_o's row stride in elements (a multiple of 8, >= dim); 0 = dim
};
inline int64_t XlstmLargeNormGatePartialFloats(int64_t rows, int64_t dim, int64_t tile_rows) {
  return (rows + tile_rows - 1) / tile_rows * dim;
}

// Per-head width change of a [rows, heads, width] bf16 tensor (the xLSTM Large block at a dk the
// cell does not take, e.g. 96: q, k padded to 128 for the cell, dq, dk cut back; ops/XLSTM_LARGE.md):
//   dst[r, h, j] = j < src_width ? src[r, h, j] : 0   for j < dst_width.
// Padding (dst_width > src_width) writes the zero columns; cutting (dst_width < src_width) drops
// src's columns past dst_width. Widths multiples of 8 (16-byte vectors), pointers 16-byte aligned.
struct XlstmLargeHeadWidthArgs {
  int64_t rows = 0, heads = 0, src_width = 0, dst_width = 0;
  const void* src = nullptr;
  void* dst = nullptr;
};

}  // namespace gyre::ops
