// A second seam between ops/ and CUDA, for what the training backend (ops/cuda_backend.h) does
// not cover: RoPE on part of a head and at SelfExtend / decode positions, the SelfExtend forward
// of the fused attention kernel, single-token attention over a key/value cache, and the
// one-token recurrent steps (conv1d window, SSD, sLSTM, mLSTM) of incremental decoding. Implemented
// and registered (static initialiser) by `//ops:cuda_infer_impl` (kernels: ops/cuda_infer.cu),
// which `//ops:cuda_backend` links; every op is ordered on Cuda().ComputeStream().
// Kept apart from cuda_backend.h so inference features do not touch the training backend.
//
// Thread-safety: the one thread that drives the CUDA backend.
#pragma once

#include <cstdint>
#include <vector>

#include "ops/cuda_backend.h"

namespace gyre::ops {

// Rotary embedding in place on bf16 rows (rotate-half pairing inside the first rotary_dim
// features of each head, as ops/attention.h). Row r holds `heads` heads of head_dim features at
// x + r * row_stride; its position is p = offset + r % seq, then with group > 0
// p = p / group + shift (SelfExtend grouped positions). Angles in float64.
struct CudaRopeArgs {
  void* x = nullptr;
  int64_t rows = 0, seq = 1, heads = 0, head_dim = 0, rotary_dim = 0, row_stride = 0;
  int64_t offset = 0, group = 0, shift = 0;
  double theta = 10000.0;
  bool inverse = false;
  // A decode graph's launch (ops/decode_graph.h): the cache length before the step, t, read from
  // this device int32 at run time instead of `offset` (p = t + r % seq), and x advanced by
  // t · position_stride elements (the cache row the step appends). Same bits as offset = t.
  const int32_t* position_dev = nullptr;
  int64_t position_stride = 0;
};

// A decode step's (or speculative chunk's) RoPE and KV appends in one launch
// (ops/cuda_infer_kernels.h RopeAppend: the bits of the separate append / clone / RoPE
// launches). Rows r = j·batch + b at position t + j, t = *position_dev when set (a decode graph)
// else `offset`: q_out[r] = RoPE(q[r]); k_cache / v_cache row t + j of sequence b = RoPE(k[r]) /
// v[r]; with group > 0 (SelfExtend) also q_grouped_out (at p / group + shift) and
// k_grouped_cache (at p / group). rotary_dim 0 = head_dim.
struct CudaRopeAppendArgs {
  int64_t batch = 1, queries = 1, heads = 0, kv_heads = 0, head_dim = 0, rotary_dim = 0;
  double theta = 10000.0;
  int64_t offset = 0;
  const int32_t* position_dev = nullptr;
  int64_t group = 0, shift = 0;
  const void *q = nullptr, *k = nullptr, *v = nullptr;
  int64_t ldq = 0, ldk = 0, ldv = 0;
  void *q_out = nullptr, *q_grouped_out = nullptr;
  void *k_cache = nullptr, *k_grouped_cache = nullptr, *v_cache = nullptr;
  int64_t cache_batch_stride = 0;
};

// One query token per sequence against a cache of `length` keys (the last one is the query's
// own). q, q_grouped: [B, H*D] rotated at the neighbour / grouped position; caches
// [B, capacity, Hk*D] with `cache_batch_stride` elements between sequences. SelfExtend
// (window > 0): key j uses k_grouped with q_grouped when length - 1 - j >= window.
struct CudaAttentionDecodeArgs {
  int64_t batch = 0, heads = 0, kv_heads = 0, head_dim = 0, length = 0;
  // Queries per sequence (a DecodeChunk): q/out rows j * batch + b; query j attends to keys
  // 0 .. length - queries + j (causal inside the chunk, `length` counts the whole chunk).
  int64_t queries = 1;
  const void* q = nullptr;
  const void* q_grouped = nullptr;
  const void* k = nullptr;
  const void* k_grouped = nullptr;
  const void* v = nullptr;
  int64_t cache_batch_stride = 0;
  int64_t window = 0;
  void* out = nullptr;  // [B, H*D] bf16, overwritten
  // A decode graph's launch: the kernel's length is *position_dev + queries, read at run time
  // (the cache length before the step lives in device memory), and `length` is the cache's
  // capacity (it sizes the shared memory). Same bits as length = *position_dev + queries.
  const int32_t* position_dev = nullptr;
  // DecodeAttnSplit(): the split kernel (another summation order, row-invariant).
  bool split = false;
  // DecodeAttnCluster() (with split): the cluster kernel (GYRE_DECODE_ATTN=cluster).
  bool cluster = false;
};

// Recurrent steps (kernels/cuda/ssm_step.h, kernels/cuda/mlstm.h MlstmStepForward): bf16
// activations, fp32 states and parameters (masters), as the training kernels. `positions` k > 1
// steps a whole chunk in one launch (operand rows j·B + b, position-major; B = batch), and a
// non-null history receives the state after positions 0..k-2 (kernels/cuda/ssm_step.h says why
// per-position history rather than recomputation on Rewind).
struct CudaConv1dStepArgs {
  int64_t batch = 0, channels = 0, width = 4;
  bool silu = false;
  const void* x = nullptr;  // [B, ldx] bf16
  int64_t ldx = 0;
  const float* w = nullptr;
  const float* bias = nullptr;
  float* state = nullptr;   // [B, K-1, C]
  void* y = nullptr;        // [k·B, C] bf16
  int64_t positions = 1;
  float* history = nullptr;  // [k-1, B, K-1, C] or null
};
struct CudaSsdStepArgs {
  int64_t batch = 0, heads = 0, head_dim = 0, groups = 1, state_dim = 0;
  const void* x = nullptr;  // bf16 views of the conv output (row stride ld_xbc)
  const void* b = nullptr;
  const void* c = nullptr;
  int64_t ld_xbc = 0;
  const float* dt = nullptr;
  const float* a_log = nullptr;
  const float* dt_bias = nullptr;
  const float* d = nullptr;
  float* state = nullptr;
  void* y = nullptr;
  int64_t positions = 1;
  float* history = nullptr;  // [k-1, B, H, P, N] or null
};
struct CudaSlstmStepArgs {
  int64_t batch = 0, heads = 0, head_dim = 0;
  const void* gx = nullptr;  // [B, 4, d] bf16 (bias included)
  const void* r = nullptr;   // [NH, 4, dh, dh] bf16
  float *h = nullptr, *c = nullptr, *n = nullptr, *m = nullptr;
  void* h_out = nullptr;
  int64_t positions = 1;  // gx / h_out rows j·B + b
  float *h_history = nullptr, *c_history = nullptr, *n_history = nullptr, *m_history = nullptr;  // [k-1, B, d]
};
struct CudaMlstmStepArgs {
  int64_t batch = 0, heads = 0, dk = 0, dv = 0;
  bool sigmoid_forget = true;
  double eps = 1e-6;
  const void* q = nullptr;  // [B, NH, dk] bf16
  const void* k = nullptr;
  const void* v = nullptr;
  const float* ig = nullptr;  // [B, NH]
  const float* fg = nullptr;
  float *c = nullptr, *n = nullptr, *m = nullptr;
  void* h = nullptr;  // [B, NH, dv] bf16
  // k > 1, or any k with n_out set: one launch of kernels/cuda/ssm_step.h MlstmStepChunk (k = 1
  // without n_out keeps the cluster kernel MlstmStepForward), which writes n and m after the chunk
  // to n_out, m_out (required then, not n / m; c stays in place). Histories: all three or none.
  int64_t positions = 1;
  float *n_out = nullptr, *m_out = nullptr;
  float *c_history = nullptr, *n_history = nullptr, *m_history = nullptr;
};

// One record of CudaInference::CopySpans (the layout of ops/cuda_infer_kernels.h CopySpan).
struct CudaCopySpan {
  void* dst = nullptr;
  const void* src = nullptr;
  int64_t bytes = 0;
};

class CudaInference {
 public:
  virtual ~CudaInference() = default;
  virtual void Rope(const CudaRopeArgs& a) = 0;
  // The fused attention forward (kernels/cuda/attention.h) with SelfExtend: q_grouped/k_grouped
  // have the layout and strides of a.q / a.k. head_dim 64 or 128.
  virtual void AttentionForwardSelfExtend(const CudaAttention& a, const void* q_grouped, const void* k_grouped,
                                          int64_t group, int64_t window) = 0;
  virtual void AttentionDecode(const CudaAttentionDecodeArgs& a) = 0;
  virtual void RopeAppend(const CudaRopeAppendArgs& a) = 0;
  // cache [B, capacity, cols] row *position_dev (device int32) of sequence b = src [B, cols] row
  // b (bf16): a decode graph's KV append (an eager step's Copy2D has the row in its address).
  virtual void AppendRows(void* cache, int64_t cache_batch_stride, const void* src, int64_t batch, int64_t cols,
                          const int32_t* position_dev) = 0;
  // spans_dev: `n` CudaCopySpan records in device memory; copies each src to its dst in one
  // launch (a speculative decode graph's in-place commit, ops/decode_graph.h). max_bytes bounds
  // every span's bytes (multiples of 4).
  virtual void CopySpans(const void* spans_dev, int64_t n, int64_t max_bytes) = 0;
  // A speculative decode graph's draft gather (ops/cuda_infer_kernels.h DraftRows): keep =
  // *forced_keep if > 0, else 1 + the accepted drafts of chunk [k] against head1 [k] (device
  // ids); dst [heads, cols] row h = row keep - 1 of srcs[h] (bf16); *keep_out = keep. heads <= 15.
  virtual void DraftRows(const int32_t* chunk, const int32_t* head1, const int32_t* forced_keep, int32_t* keep_out,
                         int64_t k, const std::vector<const void*>& srcs, int64_t cols, void* dst) = 0;
  virtual void Conv1dStep(const CudaConv1dStepArgs& a) = 0;
  virtual void SsdStep(const CudaSsdStepArgs& a) = 0;
  virtual void SlstmStep(const CudaSlstmStepArgs& a) = 0;
  virtual void MlstmStep(const CudaMlstmStepArgs& a) = 0;
  // x [n] (bf16, device) = cap · tanh(x / cap) in place, fp32 math (ops/cuda_infer_kernels.h
  // SoftCapRows): the LM head's logit soft cap on CUDA logits (ops/cross_entropy.h LmHeadLogits).
  virtual void SoftCap(void* x, int64_t n, float cap) = 0;
  // out[r] (device int32) = argmax of bf16 row r of x [rows, ld] over its first `cols` (lowest
  // index on ties).
  virtual void ArgmaxRows(const void* x, int64_t rows, int64_t cols, int64_t ld, int32_t* out) = 0;
  // out [rows, dim] (bf16) = rows `ids` of the bf16 table [vocab, dim], the ids in device memory
  // (kernels/cuda/embedding.h; CudaBackend::EmbeddingForward copies host ids first, which a
  // captured decode graph cannot: ops/decode_graph.h).
  virtual void EmbeddingRows(const int32_t* ids, int64_t rows, const void* table, int64_t vocab, int64_t dim,
                             void* out) = 0;
};

// Row-invariant decoding (default on; GYRE_ROW_INVARIANT_DECODE=0 turns it off, unset or 1 keeps it,
// any other value stops the process as every ops switch does (ops/env_switch.h); read once): the
// products of at most kGemmRowsMax rows (X · Wᵀ, the decode path at batch 1) take the fixed-order
// GemmRows kernel (ops/cuda_infer_kernels.h) instead of cuBLASLt, and the one-token mLSTM step
// takes the chunk kernel (MlstmStepChunk at positions 1) instead of the cluster kernel, so a
// DecodeChunk of k positions gives every position the bits of k DecodeStep calls and speculative
// decoding gives greedy decoding's tokens. Off: cuBLASLt's choice per row count (another
// summation order at another m) and the cluster step kernel, as before 2026-11-27.
bool RowInvariantDecode();

// The mLSTM decode step's q, k, v maps and gates (MlstmBlock::QkvGatesCuda at <= 16 rows):
// GYRE_DECODE_QKV unset or "1" (the default since session 16: one launch,
// ops/recurrent_cuda.h BlockDiagQkvRowsForward, the same bits as the two), "0" (two
// BlockDiagForward launches, each a kernel and a reduction, as before). Read once; other values
// stop the process naming the accepted ones. SetDecodeQkvOneLaunch overrides it (tests, benchmarks).
bool DecodeQkvOneLaunch();
void SetDecodeQkvOneLaunch(bool on);

// The attention decode step's appends and RoPE (ops/attention.cc DecodeCuda / DecodeChunkCuda):
// GYRE_DECODE_ROPE_APPEND "0" (k appended then rotated in the cache, v appended, q cloned then
// rotated: 5 launches a layer, 9 with SelfExtend; Llama's q, k, v from three products, the
// mixer's from three column copies), unset or "1" (the default since session 17's merge: one
// CudaInference::RopeAppend launch; Llama's q, k, v from one GemmRows product over the adjacent
// weights at <= kDecodeGemmRowsMax rows, the mixer's qkv read in place: the same bits; llama-125m
// graph step -18%, greedy graph x1.20, speculative graph x1.16 on an H100, ops/DECODE_GRAPHS.md
// "Session 17 (helper attndec17)"). Read once; other values stop the process naming the accepted
// ones. SetDecodeRopeAppendOneLaunch overrides it (tests, benchmarks).
bool DecodeRopeAppendOneLaunch();
// The most rows a decoding product sends to GemmRows (= cuda_infer::kGemmRowsMax, asserted in
// ops/cuda_infer_impl.cc), for callers that need to know which kernel computes a product.
inline constexpr int64_t kDecodeGemmRowsMax = 16;
void SetDecodeRopeAppendOneLaunch(bool on);

// The decode attention kernel (ops/cuda_infer_kernels.h AttentionDecode): GYRE_DECODE_ATTN
// "serial" (one warp a key for the scores, then 64 of 128 threads each walking all T values in
// order: the kernel of sessions 14-16), unset or "split" (the default since session 17's merge;
// helper decattn17: x1.5 at 64 cached keys to x11 at 4096 on an H100;
// both key loops dealt over 256 threads in lane groups of 16-byte rows, the slots' partial
// outputs added in slot order; row-invariant, another summation order than serial, checked
// against float64: ops/DECODE_GRAPHS.md "Session 17 (helper decattn17)"). Read once; other values
// stop the process naming the accepted ones. SetDecodeAttnSplit overrides it (tests, benchmarks).
bool DecodeAttnSplit();
void SetDecodeAttnSplit(bool on);
// GYRE_DECODE_ATTN=cluster (opt-in, helper flashdec17: ops/DECODE_GRAPHS.md "Session 17 (helper
// flashdec17)"): the split kernel's keys further split over a cluster of 8 blocks a (query, head),
// combined in rank order through distributed shared memory (row-invariant; another summation
// order than split past 128 keys). DecodeAttnSplit() is true under it too. SetDecodeAttnCluster(true)
// selects it, (false) the split kernel; SetDecodeAttnSplit(on) leaves it (serial or split).
bool DecodeAttnCluster();
void SetDecodeAttnCluster(bool on);

// Warps a column of GemmRows (ops/cuda_infer_kernels.h): GYRE_GEMM_ROWS_WARPS unset or "2" (the
// default since session 16: the column's reduction dealt to 2 warps, combined in a fixed order;
// row-invariant; graph decode steps −3.5% xLSTM / −5.5% Mamba-2 against 1 on an H100), "4", or
// "1" (one warp a column: session 15's summation order, other bits at near-ties). Read once;
// other values stop the process naming the accepted ones.
// SetGemmRowsWarps overrides it (tests, benchmarks; 1, 2 or 4).
int GemmRowsWarps();
void SetGemmRowsWarps(int warps);

// The registered implementation, or null in a binary built without CUDA.
CudaInference* CudaInferenceOrNull();
// Aborts with a clear message when there is none.
CudaInference& CudaInfer();
void RegisterCudaInference(CudaInference* impl);

}  // namespace gyre::ops
