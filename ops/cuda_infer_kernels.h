// Kernels behind ops/cuda_infer.h (nvcc-compiled, plain C++ API returning CudaResult).
//
// RopePartial: in-place rotary embedding on bf16 rows, first rotary_dim features of each head,
//   position p = offset + r % seq (then p / group + shift with group > 0); cos/sin of the angle
//   in float64 (no table: exact at any position). 4 bytes per rotated element.
// AttentionDecode: one (sequence, head) per block; scores of the query against every cached key
//   in shared memory (fp32, length·4 bytes; up to ~50K keys), one softmax, out = Σ p_j v_j in
//   fp32. Reads the whole cache once per step: decode is bound by these bytes,
//   B·length·2·Hk·D·2 bytes (the GQA group re-reads hit L2). With queries > 1 (a chunk of
//   speculative tokens, DecodeChunk) one block per (query, head), causal within the chunk.
//   split = true (GYRE_DECODE_ATTN=split): 256 threads, a lane group of G = pow2 >= D/8 lanes a
//   key row (one 16-byte load a lane), 8 · 32 / G keys in flight per round and 4 rounds
//   unrolled, for the scores and for Σ p_j v_j; the slots' partial outputs added in slot order
//   (key j in slot j % slots): the order depends on T and D only (row-invariant). Shared
//   memory length·4 + 8 KB. The serial kernel's order otherwise (and for D % 8 != 0, D > 256).
//   cluster = true with split (GYRE_DECODE_ATTN=cluster, opt-in): a cluster of 8 blocks a (query,
//   head), min(8, ceil(T / 128)) of them each running the split body on a contiguous key range,
//   rank 0 combining their (max, sum, row) through distributed shared memory in rank order
//   (row-invariant; the split kernel's bits at T <= 128). Shared memory max(128, ⌈length/8⌉)·4 + 9 KB.
// Decode graphs (ops/decode_graph.h): with `position_dev` set, RopePartial and AttentionDecode
//   read the cache length before the step, t, from that device int32 instead of the host
//   argument (RoPE: p = t + r % seq and x advanced by t·position_stride elements, the cache row
//   the step appends; attention: length = t + queries, the shared memory sized for `length`,
//   which the caller then sets to the cache's capacity). The same arithmetic for the same t, so
//   the same bits as the host-argument launch; AppendRows copies B rows into cache row t.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/device_info.h"
#include "kernels/cuda/gemm.h"

namespace gyre::ops::cuda_infer {

using gyre::cuda::CudaResult;

struct RopePartialArgs {
  void* x = nullptr;  // bf16
  int64_t rows = 0, seq = 1, heads = 0, head_dim = 0, rotary_dim = 0, row_stride = 0;
  int64_t offset = 0, group = 0, shift = 0;
  double theta = 10000.0;
  bool inverse = false;
  const int32_t* position_dev = nullptr;  // replaces `offset` when set (see above)
  int64_t position_stride = 0;
};
CudaResult RopePartial(const RopePartialArgs& a, cudaStream_t stream);

struct DecodeArgs {
  int64_t batch = 0, heads = 0, kv_heads = 0, head_dim = 0, length = 0;
  int64_t queries = 1;  // per sequence: q/out rows j * batch + b, query j sees length - queries + j + 1 keys
  const void* q = nullptr;
  const void* q_grouped = nullptr;
  const void* k = nullptr;
  const void* k_grouped = nullptr;
  const void* v = nullptr;
  int64_t cache_batch_stride = 0;
  int64_t window = 0;
  void* out = nullptr;
  // Set: the kernel's length is *position_dev + queries and `length` only bounds it (the cache's
  // capacity: shared memory and argument checks).
  const int32_t* position_dev = nullptr;
  // The split kernel (GYRE_DECODE_ATTN=split, see the header's note) where the shape fits
  // (head_dim % 8 == 0, <= 256, 16-byte aligned rows); false or another shape: the serial one.
  bool split = false;
  // With split: the cluster kernel (GYRE_DECODE_ATTN=cluster): the keys of a (query, head) over a
  // cluster of 8 blocks, min(8, ceil(T / 128)) of them working, combined in rank order through
  // distributed shared memory (row-invariant; the split kernel's bits at T <= 128).
  bool cluster = false;
};
CudaResult AttentionDecode(const DecodeArgs& a, cudaStream_t stream);

// dst[b * dst_batch_stride + (*position_dev) * cols + c] = src[b * cols + c] (bf16, B rows of
// `cols`): a KV-cache append at a position held in device memory (a Copy2D's address is fixed
// when a graph records it).
CudaResult AppendRows(void* dst, int64_t dst_batch_stride, const void* src, int64_t batch, int64_t cols,
                      const int32_t* position_dev, cudaStream_t stream);

// RopeAppend: a decode step's (or chunk's) RoPE and KV-cache appends in ONE launch instead of
//   five (k appended + rotated in the cache, v appended, q cloned + rotated; SelfExtend: the
//   grouped k appended + rotated and the grouped q cloned + rotated, nine). Rows r = j·batch + b
//   (position-major, as AttentionDecode): sequence b's token at position t + j, t = *position_dev
//   when set (a decode graph) else `offset`. For row r:
//     q_out[r]          = RoPE(q[r]) at p = t + j            (q_grouped_out: at p / group + shift)
//     k_cache[b, t + j] = RoPE(k[r]) at p                     (k_grouped_cache: at p / group)
//     v_cache[b, t + j] = v[r]
//   the non-rotary features of each head (partial rotary) copied. Each rotated pair calls the
//   same device function as RopePartial (angle θ^(-2i/rd)·p in float64, sincos in float64, the
//   rotation in float64, one bf16 rounding), on the same bf16 inputs (the separate path's append
//   or clone is an exact copy before its in-place RoPE), so every output has the separate
//   launches' bits. One thread a (row, head, pair-or-passthrough feature), grid-stride; at
//   llama-125m's 12 x 64 heads ~1.5K items at one row: latency, not bytes (~7 KB).
struct RopeAppendArgs {
  int64_t batch = 1, queries = 1, heads = 0, kv_heads = 0, head_dim = 0, rotary_dim = 0;
  double theta = 10000.0;
  int64_t offset = 0;                     // t when position_dev is null
  const int32_t* position_dev = nullptr;  // t in device memory (a decode graph's launch)
  int64_t group = 0, shift = 0;           // SelfExtend (group > 0): the grouped outputs below
  const void* q = nullptr;                // [rows, ldq] bf16, heads·head_dim used
  const void* k = nullptr;                // [rows, ldk]
  const void* v = nullptr;                // [rows, ldv]
  int64_t ldq = 0, ldk = 0, ldv = 0;
  void* q_out = nullptr;                  // [rows, heads·head_dim]
  void* q_grouped_out = nullptr;          // [rows, heads·head_dim] (group > 0)
  void* k_cache = nullptr;                // [batch, capacity, kv_heads·head_dim]
  void* k_grouped_cache = nullptr;        // (group > 0)
  void* v_cache = nullptr;
  int64_t cache_batch_stride = 0;         // elements between sequences of a cache
};
CudaResult RopeAppend(const RopeAppendArgs& a, cudaStream_t stream);

// ArgmaxRows: out[r] = argmax_c x[r * ld + c] over bf16 rows (the lowest index on ties), one
// block per row; greedy decoding reads back `rows` ids instead of the logits.
CudaResult ArgmaxRows(const void* x, int64_t rows, int64_t cols, int64_t ld, int32_t* out, cudaStream_t stream);

// SoftCapRows: x[i] = bf16(cap · tanh(x[i] / cap)) in place over n bf16 values, the math in fp32
// (ops/elementwise.h SoftCap's formula). The LM head's logit soft cap on decoding's logits (xLSTM
// Large, cap 30; ops/cross_entropy.h LmHeadLogits): elementwise, so a row's capped bits depend
// only on its own uncapped bits and row-invariant logits stay row-invariant. Bound by 4 bytes a
// logit (50304 logits a row: ~0.2 MB, one launch, a few µs).
CudaResult SoftCapRows(void* x, int64_t n, float cap, cudaStream_t stream);

// CopySpans: for each of `n` spans {dst, src, bytes} (the array in device memory), dst[0, bytes) =
//   src[0, bytes). A speculative decode graph's commit (ops/decode_graph.h SpeculativeGraph):
//   after a round that kept `keep` of its k positions, every state tensor of every block takes
//   the copy the round's kernels made after position keep - 1, in place (the graph replays fixed
//   addresses, so the eager Rewind's handle swap is not an option), in ONE launch instead of one
//   copy a tensor (~100 for a 24-layer xLSTM). Grid: y = the span, x = up to 64 blocks striding
//   over it; 16-byte words when dst, src and bytes allow, 4-byte words otherwise (bytes must be a
//   multiple of 4: fp32 states). Bound by the bytes (xlstm[1:0]-125m: ~57 MB of mLSTM c at keep <
//   k, ~20 µs); a plain copy, so exact.
struct CopySpan {
  void* dst = nullptr;
  const void* src = nullptr;
  int64_t bytes = 0;
};
CudaResult CopySpans(const CopySpan* spans_dev, int64_t n, int64_t max_bytes, cudaStream_t stream);

// DraftRows: a speculative decode graph's draft gather (ops/decode_graph.h SpeculativeGraph).
//   keep = *forced_keep when > 0, else 1 + the number of leading j < k - 1 with chunk[j + 1] ==
//   head1[j] (GenerateSpeculative's acceptance rule, on the device ids of the round's chunk and
//   of head 1's argmax); then dst row h = row keep - 1 of src[h] (bf16, `cols` each), h <
//   heads: the rows eager DraftLogits copies, at the position the host will keep, without a
//   round trip to the host. *keep_out = keep. One block a head; a copy, so exact.
constexpr int kDraftRowsMaxHeads = 15;
struct DraftRowsArgs {
  const int32_t* chunk = nullptr;  // [k] device
  const int32_t* head1 = nullptr;  // [k] device
  const int32_t* forced_keep = nullptr;
  int32_t* keep_out = nullptr;
  int64_t k = 0, heads = 0, cols = 0;
  const void* src[kDraftRowsMaxHeads] = {};
  void* dst = nullptr;  // [heads, cols]
};
CudaResult DraftRows(const DraftRowsArgs& a, cudaStream_t stream);

// GemmRows: row-major C [m, n] = alpha · A [m, k] · B [n, k]ᵀ + beta · C_in (C_in = c_in, or C
// itself when c_in is null; read only when beta != 0), A and B bf16, fp32 accumulation, C bf16 or
// fp32; m <= kGemmRowsMax. The decoding GEMM (X · Wᵀ at a few rows): every row's arithmetic is
// the same whatever m is, so a DecodeChunk of k positions and k DecodeStep calls give the same
// bits (cuBLASLt picks another algorithm, i.e. another summation order, for another m).
//   Per output (r, j): lane l of the warp that owns column j sums the 8-element groups
//   g = l, l + 32, l + 64, ... of the reduction in ascending order with one fused multiply-add
//   per element (explicit __fmaf_rn, so no contraction choice differs between instantiations),
//   then a fixed xor butterfly over the 32 lanes; nothing of that depends on m, on the other
//   rows, on alignment (16-byte vector loads when aligned, scalar loads otherwise, same values
//   in the same order) or on which instantiation (exact rows 1..8, then padded to 12 or 16) runs.
//   Bound by reading B once (2·n·k bytes; A's m·k·2 bytes stay in L1/L2): one warp per column,
//   4 columns per 128-thread block.
//   Takes the GEMM's own arguments (kernels/cuda/gemm.h): only !trans_a, trans_b, no epilogue.
//   warps_per_column 2 or 4 (GYRE_GEMM_ROWS_WARPS, ops/cuda_infer.h): each column's groups dealt
//   to that many warps (warp s: groups 32 s + l, 32 s + l + 32 S, ...), their sums added in warp
//   order; another fixed order (other bits than 1), equally row-invariant, more loads in flight.
constexpr int64_t kGemmRowsMax = 16;
CudaResult GemmRows(const gyre::cuda::GemmArgs& g, cudaStream_t stream, int warps_per_column = 1);

}  // namespace gyre::ops::cuda_infer
