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
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/device_info.h"

namespace gyre::ops::cuda_infer {

using gyre::cuda::CudaResult;

struct RopePartialArgs {
  void* x = nullptr;  // bf16
  int64_t rows = 0, seq = 1, heads = 0, head_dim = 0, rotary_dim = 0, row_stride = 0;
  int64_t offset = 0, group = 0, shift = 0;
  double theta = 10000.0;
  bool inverse = false;
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
};
CudaResult AttentionDecode(const DecodeArgs& a, cudaStream_t stream);

// ArgmaxRows: out[r] = argmax_c x[r * ld + c] over bf16 rows (the lowest index on ties), one
// block per row; greedy decoding reads back `rows` ids instead of the logits.
CudaResult ArgmaxRows(const void* x, int64_t rows, int64_t cols, int64_t ld, int32_t* out, cudaStream_t stream);

}  // namespace gyre::ops::cuda_infer
