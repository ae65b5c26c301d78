// Causal softmax self-attention with rotary position embeddings (RoPE), grouped-query attention
// (GQA), and the SelfExtend inference mode (MODELS.md section 6).
//
// Shapes (row-major, batch B, sequence T, query heads H, key/value heads Hk, head dim D):
//   q [B, T, H*D], k [B, T, Hk*D], v [B, T, Hk*D] -> out [B, T, H*D]. Query head h reads key/value
//   head h / (H/Hk).
// RoPE uses the "rotate half" pairing (feature i with i + D/2, as Llama in HF transformers),
// angle = position * theta^(-2i/D), applied inside the op so SelfExtend can use other positions.
// Partial rotary (rotary_dim R < D, as the Mamba-2 hybrids' attention): features i < R/2 pair
// with i + R/2 at angle position * theta^(-2i/R); features >= R are not rotated.
// SelfExtend (group G, window W): logit (i, j) uses the normal positions (i, j) when i - j < W and
// the grouped positions (floor(i/G) + W - floor(W/G), floor(j/G)) otherwise, merged before one
// softmax. When T <= W every pair is a neighbour pair and the op is exactly plain attention.
// Saved for backward: q, k, v (un-rotated), out, the row log-sum-exp [B, H, T]; scores are
// recomputed in backward (flash-attention style), so memory is O(B*H*T), not O(B*H*T^2).
#pragma once

#include <cstdint>

#include "ops/layers.h"

namespace gyre::ops {

struct AttentionOptions {
  int64_t heads = 1;
  int64_t kv_heads = 1;
  int64_t head_dim = 0;
  double rope_theta = 10000.0;
  int64_t self_extend_group = 0;   // G; 0 = off
  int64_t self_extend_window = 0;  // W
  int64_t rotary_dim = 0;          // rotate the first rotary_dim features of each head; 0 = all
  // CUDA backward: dQ summed in a fixed order, so that it is bitwise repeatable (slower;
  // kernels/cuda/attention.h, AttentionBackwardArgs::deterministic). Head dims 64 / 128 only: the
  // plain fallback kernel of other head dims (ops/cuda_ops.cu) adds dK / dV with atomics either
  // way. CPU: always repeatable.
  bool deterministic = false;
};

struct AttentionSaved {
  Tensor q, k, v, out, lse;
  int64_t batch = 0, seq = 0;
  // CUDA: the rotated q|k|v rows [B*T, (H + 2 Hk) D] (bf16) and, with fused projections, the
  // layer input; lse is f32 there.
  Tensor qkv, x;
};

// The device-dispatched core op. CUDA (bf16 q/k/v): q|k|v are packed into one rotated buffer
// (partial rotary and SelfExtend positions through ops/cuda_infer.h), the fused kernel runs on
// it (SelfExtend in the same kernel, forward only: backward with SelfExtend is refused, as
// SelfExtend is an inference mode); dq/dk/dv come back as [B*T, features].
Tensor CausalAttentionForward(const Tensor& q, const Tensor& k, const Tensor& v, int64_t batch,
                              int64_t seq, const AttentionOptions& options, AttentionSaved* saved);
// Overwrites *dq, *dk, *dv (allocated here).
void CausalAttentionBackward(const AttentionSaved& saved, const Tensor& dout,
                             const AttentionOptions& options, Tensor* dq, Tensor* dk, Tensor* dv);

// Applies (or with inverse=true, undoes) RoPE on x [rows = B*T, heads*D] with per-row position
// positions[row % T] (exposed for tests).
Tensor ApplyRope(const Tensor& x, int64_t seq, int64_t heads, int64_t head_dim, double theta,
                 const std::vector<int64_t>& positions, bool inverse, int64_t rotary_dim = 0);

// Key/value cache for incremental decoding: per past position, the keys rotated at their
// neighbour (and SelfExtend grouped) positions and the values, each [B, Hk*D].
// CUDA: instead three bf16 buffers [B, capacity, Hk*D] (capacity doubles when full, so appending
// is amortised O(1) and the decode kernel reads one strided array), `cuda_length` rows filled.
struct KvCache {
  std::vector<Tensor> k_neighbour, k_grouped, v;
  Tensor cuda_k, cuda_k_grouped, cuda_v;
  int64_t cuda_length = 0;
  // Set only while a DecodeGraph records a step (ops/decode_graph.h): a device int32 holding
  // cuda_length, which the recorded append, RoPE and attention kernels read at replay time
  // instead of the host value of the capture. The capture needs room for the step (no Grow).
  const int32_t* graph_position = nullptr;
  int64_t cuda_capacity() const { return cuda_k.defined() ? cuda_k.dim(1) : 0; }
  int64_t length() const { return cuda_k.defined() ? cuda_length : static_cast<int64_t>(v.size()); }
};

// One decoding step: q [B, H*D], k/v [B, Hk*D] of the token at position cache->length();
// appends it to the cache and returns the attention output [B, H*D] (same rules as the
// full-sequence op, SelfExtend included).
Tensor CausalAttentionDecode(const Tensor& q, const Tensor& k, const Tensor& v, const AttentionOptions& options,
                             KvCache* cache);
// The same over `chunk` positions, q/k/v [chunk * B, features] position-major: appends `chunk`
// keys/values, position j attending to the cache up to itself.
Tensor CausalAttentionDecodeChunk(const Tensor& q, const Tensor& k, const Tensor& v, int64_t chunk,
                                  const AttentionOptions& options, KvCache* cache);
// The same with q, k, v as the column blocks [0, qd), [qd, qd + kvd), [qd + kvd, qd + 2 kvd) of
// one CUDA tensor [chunk * B, qd + 2 kvd] (one product over adjacent weights, or a mixer's
// in-projection): read in place by the one-launch appends + RoPE (needs
// DecodeRopeAppendOneLaunch(), ops/cuda_infer.h); the bits of the three-tensor call.
Tensor CausalAttentionDecodeChunkPacked(const Tensor& qkv, int64_t chunk, const AttentionOptions& options,
                                        KvCache* cache);
// Drops the cache's positions from `length` on (rewinding rejected speculative tokens).
void TruncateKvCache(KvCache* cache, int64_t length);

// Attention layer of a Llama block: q/k/v/o projections without biases around the core op.
// Input/output [B, T, d]; Forward needs (B, T) to split rows.
// CUDA (bf16): q/k/v land in one [B*T, (H + 2 Hk) D] buffer (one GEMM when the three weights lie
// back to back in the store's flat buffers), a RoPE pass rotates k in place there, and the
// causal attention kernel reads them through row strides, rotating each query tile as it loads
// it (written back in place for the backward); backward mirrors it (dq|dk|dv in one buffer, the
// inverse RoPE of dq and dk inside the attention backward, one dX and one dW GEMM). With partial
// rotary or SelfExtend on CUDA the layer runs the separate projections around the
// device-dispatched core op instead.
class SelfAttention {
 public:
  SelfAttention(const BuildContext& ctx, int64_t dim, AttentionOptions options);
  Tensor Forward(const Tensor& x, int64_t batch, int64_t seq);
  Tensor Backward(const Tensor& dy);
  void ReleaseActivations();
  // SelfExtend is an inference knob; training leaves it off.
  void SetSelfExtend(int64_t group, int64_t window) {
    options_.self_extend_group = group;
    options_.self_extend_window = window;
  }
  Linear& o_proj() { return o_proj_; }
  // Inference step: x [B, d] -> [B, d] (before the residual add), advancing `cache`.
  Tensor Step(const Tensor& x, KvCache* cache);
  // `chunk` tokens per sequence, x [chunk * B, d] position-major (Block::StepChunk): the q/k/v/o
  // projections over all rows at once, then CausalAttentionDecode position by position (each
  // position appends its key/value and attends to the cache so far: causal inside the chunk).
  Tensor StepChunk(const Tensor& x, int64_t chunk, KvCache* cache);

 private:
  // Decoding with GYRE_DECODE_ROPE_APPEND=1: q, k, v from ONE product over the adjacent weights
  // (*qkv [rows, qd + 2 kvd]) when that gives each column its own product's bits (GemmRows: CUDA,
  // row-invariant decoding, <= 16 rows); false: the three products.
  bool PackedDecodeQkv(const Tensor& x, Tensor* qkv);
  Tensor ForwardCuda(const Tensor& x, int64_t batch, int64_t seq);
  Tensor BackwardCuda(const Tensor& dy);

  AttentionOptions options_;
  const ParamStore* store_;
  Linear q_proj_, k_proj_, v_proj_, o_proj_;
  AttentionSaved saved_;
  bool fused_cuda_ = false;  // the last Forward took ForwardCuda
  // RoPE of the last ForwardCuda: q rotated inside the attention forward / dq, dk inverse-rotated
  // inside the backward (defaults); GYRE_ATTN_ROPE=separate (both off: RoPE passes over q|k and
  // dq|dk) or =bwd (forward pass over q|k, backward fused) select the A/B variants.
  bool rope_in_fwd_ = true, rope_in_bwd_ = true;
};

}  // namespace gyre::ops
