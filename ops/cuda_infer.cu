// Kernels of ops/cuda_infer_kernels.h (the header states the math, bytes and limits).
#include <cooperative_groups.h>
#include <algorithm>
#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>

#include "kernels/cuda/cuda_check.h"
#include "ops/cuda_infer_kernels.h"

namespace gyre::ops::cuda_infer {

// gemm_rows_kernel's parameters (GemmRows takes the GEMM's own GemmArgs and checks the form).
struct GemmRowsArgs {
  int64_t m = 0, n = 0, k = 0;
  const void* a = nullptr;
  int64_t lda = 0;
  const void* b = nullptr;
  int64_t ldb = 0;
  void* c = nullptr;
  int64_t ldc = 0;
  bool c_f32 = false;
  float alpha = 1.f, beta = 0.f;
  const void* c_in = nullptr;
};

namespace {

using bf16 = __nv_bfloat16;
using gyre::cuda::InvalidArgument;

// One rotate-half pair of RoPE at integer position p (pair i of rotary_dim): the angle
// p · θ^(-2i/rd) and its sine / cosine in float64, the rotation in float64, one rounding to bf16.
// rope_partial_kernel and rope_append_kernel both rotate through these two functions, so a pair
// rotated by either has the same bits (the fused decode launch's promise).
__device__ __forceinline__ void RopeAngle(int64_t p, int64_t i, int64_t rotary_dim, double theta, bool inverse,
                                          double* s, double* c) {
  const double inv_freq = pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(rotary_dim));
  sincos(static_cast<double>(p) * inv_freq, s, c);
  if (inverse) *s = -*s;
}
__device__ __forceinline__ void RopeRotate(double x1, double x2, double s, double c, bf16* y1, bf16* y2) {
  *y1 = __float2bfloat16(static_cast<float>(x1 * c - x2 * s));
  *y2 = __float2bfloat16(static_cast<float>(x2 * c + x1 * s));
}

__global__ void rope_partial_kernel(RopePartialArgs a) {
  const int64_t half = a.rotary_dim / 2;
  const int64_t total = a.rows * a.heads * half;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = idx % half;
    const int64_t h = (idx / half) % a.heads;
    const int64_t r = idx / (half * a.heads);
    // A decode graph's launch reads the position from device memory (the same integer, the same
    // angles); the eager launch passes it by value.
    const int64_t offset = a.position_dev != nullptr ? static_cast<int64_t>(*a.position_dev) : a.offset;
    int64_t p = offset + r % a.seq;
    if (a.group > 0) p = p / a.group + a.shift;
    double s, c;
    RopeAngle(p, i, a.rotary_dim, a.theta, a.inverse, &s, &c);
    bf16* base = static_cast<bf16*>(a.x) + (a.position_dev != nullptr ? offset * a.position_stride : 0) +
                 r * a.row_stride + h * a.head_dim;
    const double x1 = __bfloat162float(base[i]), x2 = __bfloat162float(base[i + half]);
    RopeRotate(x1, x2, s, c, &base[i], &base[i + half]);
  }
}

// RopeAppend (ops/cuda_infer_kernels.h): items in three sections, grid-stride over all of them:
// q (rows x heads x per_head), k (rows x kv_heads x per_head), v (rows x kvd). per_head =
// rotary_dim / 2 pairs, then head_dim - rotary_dim copied features. The q and k sections write
// the grouped outputs from the same loads when SelfExtend is on.
__global__ void rope_append_kernel(RopeAppendArgs a) {
  const int64_t D = a.head_dim, half = a.rotary_dim / 2, per_head = D - half;
  const int64_t rows = a.batch * a.queries, qd = a.heads * D, kvd = a.kv_heads * D;
  const int64_t q_items = rows * a.heads * per_head, k_items = rows * a.kv_heads * per_head;
  const int64_t total = q_items + k_items + rows * kvd;
  const int64_t t = a.position_dev != nullptr ? static_cast<int64_t>(*a.position_dev) : a.offset;
  const bf16* q = static_cast<const bf16*>(a.q);
  const bf16* k = static_cast<const bf16*>(a.k);
  const bf16* v = static_cast<const bf16*>(a.v);
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (idx >= q_items + k_items) {  // v: a copy into cache row t + j
      const int64_t e = idx - q_items - k_items, r = e / kvd, col = e % kvd;
      const int64_t b = r % a.batch, j = r / a.batch;
      static_cast<bf16*>(a.v_cache)[b * a.cache_batch_stride + (t + j) * kvd + col] = v[r * a.ldv + col];
      continue;
    }
    const bool is_q = idx < q_items;
    const int64_t e = is_q ? idx : idx - q_items, nh = is_q ? a.heads : a.kv_heads;
    const int64_t f = e % per_head, h = (e / per_head) % nh, r = e / (per_head * nh);
    const int64_t b = r % a.batch, j = r / a.batch, p = t + j;
    const bf16* src = (is_q ? q + r * a.ldq : k + r * a.ldk) + h * D;
    const int64_t dst_off = is_q ? r * qd + h * D : b * a.cache_batch_stride + p * kvd + h * D;
    bf16* dst = static_cast<bf16*>(is_q ? a.q_out : a.k_cache) + dst_off;
    bf16* dst_g = a.group > 0 ? static_cast<bf16*>(is_q ? a.q_grouped_out : a.k_grouped_cache) + dst_off : nullptr;
    if (f >= half) {  // a feature past the rotary part: copied
      const int64_t col = a.rotary_dim + (f - half);
      dst[col] = src[col];
      if (dst_g != nullptr) dst_g[col] = src[col];
      continue;
    }
    const double x1 = __bfloat162float(src[f]), x2 = __bfloat162float(src[f + half]);
    double s, c;
    RopeAngle(p, f, a.rotary_dim, a.theta, false, &s, &c);
    RopeRotate(x1, x2, s, c, &dst[f], &dst[f + half]);
    if (dst_g != nullptr) {
      RopeAngle(p / a.group + (is_q ? a.shift : 0), f, a.rotary_dim, a.theta, false, &s, &c);
      RopeRotate(x1, x2, s, c, &dst_g[f], &dst_g[f + half]);
    }
  }
}

constexpr int kDecodeThreads = 128;

// The max (is_max) or sum of v over a block of kWarps warps: each warp's xor butterfly, then the
// warp results in warp order from scratch[kWarps] (the same order for every block size's caller).
template <int kWarps>
__device__ float BlockReduce(float v, bool is_max, float* scratch) {
  for (int o = 16; o > 0; o >>= 1) {
    const float w = __shfl_xor_sync(0xffffffffu, v, o);
    v = is_max ? fmaxf(v, w) : v + w;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float r = scratch[0];
  for (int w = 1; w < kWarps; ++w) r = is_max ? fmaxf(r, scratch[w]) : r + scratch[w];
  return r;
}

// The (query, head) row of a decode attention block (item = blockIdx.x, or blockIdx.x / ranks in
// the cluster kernel): query row qi = j_query · batch + b, head h of KV head hk, and T, the keys it
// sees (0 .. length − queries + j_query). Under a decode graph the length comes from device memory
// (the grid does not depend on it; the shared memory was sized for the cache's capacity), so one
// graph serves every length.
struct DecodeRow {
  int64_t qi, h, b, hk, D, T, kvd;
};
__device__ __forceinline__ DecodeRow DecodeRowOf(const DecodeArgs& a, int64_t item) {
  DecodeRow r;
  r.qi = item / a.heads;
  r.h = item % a.heads;
  r.b = r.qi % a.batch;
  const int64_t j_query = r.qi / a.batch;
  r.hk = r.h / (a.heads / a.kv_heads);
  const int64_t length = a.position_dev != nullptr ? static_cast<int64_t>(*a.position_dev) + a.queries : a.length;
  r.D = a.head_dim;
  r.T = length - (a.queries - 1 - j_query);
  r.kvd = a.kv_heads * r.D;
  return r;
}

__global__ void __launch_bounds__(kDecodeThreads) attention_decode_kernel(DecodeArgs a) {
  extern __shared__ float scores[];
  __shared__ float scratch[kDecodeThreads / 32];
  // Query row qi = j * batch + b (chunk position j of sequence b) sees keys 0 .. length - queries + j.
  const DecodeRow row = DecodeRowOf(a, blockIdx.x);
  const int64_t qi = row.qi, h = row.h, b = row.b, hk = row.hk, D = row.D, T = row.T, kvd = row.kvd;
  const float scale = rsqrtf(static_cast<float>(D));
  const bf16* qn = static_cast<const bf16*>(a.q) + (qi * a.heads + h) * D;
  const bf16* qg = a.q_grouped ? static_cast<const bf16*>(a.q_grouped) + (qi * a.heads + h) * D : nullptr;
  const bf16* kn = static_cast<const bf16*>(a.k) + b * a.cache_batch_stride + hk * D;
  const bf16* kg = a.k_grouped ? static_cast<const bf16*>(a.k_grouped) + b * a.cache_batch_stride + hk * D : nullptr;
  const bf16* v = static_cast<const bf16*>(a.v) + b * a.cache_batch_stride + hk * D;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // Scores: one warp per key, lanes over the head dim.
  for (int64_t j = warp; j < T; j += kDecodeThreads / 32) {
    const bool grouped = a.window > 0 && T - 1 - j >= a.window;
    const bf16* qr = grouped ? qg : qn;
    const bf16* kr = (grouped ? kg : kn) + j * kvd;
    float dot = 0.f;
    for (int64_t d = lane; d < D; d += 32) dot += __bfloat162float(qr[d]) * __bfloat162float(kr[d]);
    for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
    if (lane == 0) scores[j] = dot * scale;
  }
  __syncthreads();
  float mx = -INFINITY;
  for (int64_t j = threadIdx.x; j < T; j += kDecodeThreads) mx = fmaxf(mx, scores[j]);
  mx = BlockReduce<kDecodeThreads / 32>(mx, true, scratch);
  float sum = 0.f;
  for (int64_t j = threadIdx.x; j < T; j += kDecodeThreads) {
    const float p = __expf(scores[j] - mx);
    scores[j] = p;
    sum += p;
  }
  sum = BlockReduce<kDecodeThreads / 32>(sum, false, scratch);
  __syncthreads();
  const float inv = 1.f / sum;
  bf16* out = static_cast<bf16*>(a.out) + (qi * a.heads + h) * D;
  for (int64_t d = threadIdx.x; d < D; d += kDecodeThreads) {
    float acc = 0.f;
    for (int64_t j = 0; j < T; ++j) acc += scores[j] * __bfloat162float(v[j * kvd + d]);
    out[d] = __float2bfloat16(acc * inv);
  }
}

// The split decode attention (GYRE_DECODE_ATTN=split, ops/cuda_infer_kernels.h): the same math
// as attention_decode_kernel, with both key loops dealt over all 256 threads so no thread walks
// the cache alone. A lane group of G lanes (G = the smallest power of two >= D / 8, at most 32)
// covers one key's row, lane c of the group its 8 features [8c, 8c + 8) with one 16-byte load;
// a warp holds 32 / G keys at once and the block `slots` = 8 · 32 / G of them (32 at D = 64).
// Key j belongs to slot j % slots; a slot takes its keys in ascending order.
//   scores: each lane's 8 products in order (fmaf), then the group's xor butterfly;
//   softmax: as the serial kernel (per-thread strided partials, then a block reduction);
//   values: each lane accumulates p_j · v_j[8c .. 8c + 7] over its slot's keys (fmaf, ascending
//     j) into 8 fp32 registers; the slots' partial rows go to shared memory and thread d adds
//     them in slot order, then scales by 1 / sum.
// Every order above depends only on T (the row's own key count) and D, never on how many rows
// the launch holds, so a chunk's row has the bits of the single step (greedy == speculative);
// it differs from the serial kernel's order, so this is a numerics switch (tests: float64).
// Latency: the serial kernel's value loop is T dependent load + FMA steps on 64 threads; here a
// thread walks T / slots keys, 4 loads in flight, in each loop.
constexpr int kSplitThreads = 256, kSplitWarps = kSplitThreads / 32;
constexpr int kSplitUnroll = 4;
// slots · D = (8 · 32 / G) · D <= 8 · 32 · 8 floats, since G >= D / 8.
constexpr int kSplitPartials = kSplitWarps * 32 * 8;

__device__ __forceinline__ void Bf16x8ToFloat(const uint4& u, float* f) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 x = __bfloat1622float2(h[i]);
    f[2 * i] = x.x;
    f[2 * i + 1] = x.y;
  }
}

// Feature d of the slots' partial rows added in slot order.
__device__ __forceinline__ float SlotSum(const float* partial, int slots, int64_t D, int64_t d) {
  float s = 0.f;
  for (int sl = 0; sl < slots; ++sl) s += partial[sl * D + d];
  return s;
}

// The split decode attention's work on the keys [j0, j0 + n) of a row of T keys — the split
// kernel's whole row (j0 = 0, n = T), or one cluster rank's range (kn, kg, v already offset to
// j0): each slot's scores (G lanes a key, kSplitUnroll loads in flight; SelfExtend's grouped keys
// where T - 1 - j >= window) into scores[], the block's max mx and Σ exp(score - mx) = sum (the
// scores replaced by the exponentials), then each slot's partial output row Σ p_j v_j into
// partial[slot]. kInv: 1 / sum as well, taken before the value loop as the split kernel always
// did (its PTX is the same with the code here).
template <bool kInv>
__device__ __forceinline__ void SplitKeyRange(const DecodeArgs& a, float* scores, float* partial, float* scratch,
                                              const bf16* kn, const bf16* kg, const bf16* v, const float (&qn8)[8],
                                              const float (&qg8)[8], int64_t j0, int64_t n, int64_t T, int64_t kvd,
                                              int64_t D, float scale, int G, int c, int slots, int slot, bool active,
                                              float& mx, float& sum, float& inv) {
  const int64_t rounds = (n + slots - 1) / slots;
  for (int64_t r0 = 0; r0 < rounds; r0 += kSplitUnroll) {
    uint4 kr[kSplitUnroll];
    bool grouped[kSplitUnroll];
#pragma unroll
    for (int u = 0; u < kSplitUnroll; ++u) {
      const int64_t jl = (r0 + u) * slots + slot;
      grouped[u] = a.window > 0 && T - 1 - (j0 + jl) >= a.window;
      kr[u] = make_uint4(0, 0, 0, 0);
      if (active && jl < n) kr[u] = *reinterpret_cast<const uint4*>((grouped[u] ? kg : kn) + jl * kvd);
    }
#pragma unroll
    for (int u = 0; u < kSplitUnroll; ++u) {
      const int64_t jl = (r0 + u) * slots + slot;
      float k8[8];
      Bf16x8ToFloat(kr[u], k8);
      const float* q8 = grouped[u] ? qg8 : qn8;
      float dot = 0.f;
#pragma unroll
      for (int i = 0; i < 8; ++i) dot = fmaf(q8[i], k8[i], dot);
      for (int o = G / 2; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
      if (c == 0 && jl < n) scores[jl] = dot * scale;
    }
  }
  __syncthreads();
  mx = -INFINITY;
  for (int64_t j = threadIdx.x; j < n; j += kSplitThreads) mx = fmaxf(mx, scores[j]);
  mx = BlockReduce<kSplitWarps>(mx, true, scratch);
  sum = 0.f;
  for (int64_t j = threadIdx.x; j < n; j += kSplitThreads) {
    const float p = __expf(scores[j] - mx);
    scores[j] = p;
    sum += p;
  }
  sum = BlockReduce<kSplitWarps>(sum, false, scratch);
  __syncthreads();
  if constexpr (kInv) inv = 1.f / sum;
  float acc[8] = {};
  if (active) {
    for (int64_t r0 = 0; r0 < rounds; r0 += kSplitUnroll) {
      uint4 vr[kSplitUnroll];
      float p[kSplitUnroll];
#pragma unroll
      for (int u = 0; u < kSplitUnroll; ++u) {
        const int64_t jl = (r0 + u) * slots + slot;
        vr[u] = make_uint4(0, 0, 0, 0);
        p[u] = 0.f;
        if (jl < n) {
          vr[u] = *reinterpret_cast<const uint4*>(v + jl * kvd);
          p[u] = scores[jl];
        }
      }
#pragma unroll
      for (int u = 0; u < kSplitUnroll; ++u) {
        if ((r0 + u) * slots + slot >= n) break;
        float v8[8];
        Bf16x8ToFloat(vr[u], v8);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[i] = fmaf(p[u], v8[i], acc[i]);
      }
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) partial[slot * D + 8 * c + i] = acc[i];
  }
}

__global__ void __launch_bounds__(kSplitThreads) attention_decode_split_kernel(DecodeArgs a, int group_lanes) {
  extern __shared__ float scores[];
  __shared__ float partial[kSplitPartials];
  __shared__ float scratch[kSplitWarps];
  const DecodeRow row = DecodeRowOf(a, blockIdx.x);
  const int64_t qi = row.qi, h = row.h, b = row.b, hk = row.hk, D = row.D, T = row.T, kvd = row.kvd;
  const float scale = rsqrtf(static_cast<float>(D));
  const int G = group_lanes, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int c = lane % G, per_warp = 32 / G, slots = kSplitWarps * per_warp;
  const int slot = warp * per_warp + lane / G;
  const bool active = c < D / 8;
  const bf16* qn = static_cast<const bf16*>(a.q) + (qi * a.heads + h) * D;
  const bf16* qg = a.q_grouped ? static_cast<const bf16*>(a.q_grouped) + (qi * a.heads + h) * D : nullptr;
  const bf16* kn = static_cast<const bf16*>(a.k) + b * a.cache_batch_stride + hk * D + 8 * c;
  const bf16* kg = a.k_grouped ? static_cast<const bf16*>(a.k_grouped) + b * a.cache_batch_stride + hk * D + 8 * c
                               : nullptr;
  const bf16* v = static_cast<const bf16*>(a.v) + b * a.cache_batch_stride + hk * D + 8 * c;
  float qn8[8] = {}, qg8[8] = {};
  if (active) {
    Bf16x8ToFloat(*reinterpret_cast<const uint4*>(qn + 8 * c), qn8);
    if (qg != nullptr) Bf16x8ToFloat(*reinterpret_cast<const uint4*>(qg + 8 * c), qg8);
  }
  // Scores, softmax statistics, the slots' partial rows (the cluster kernel runs the same on a range).
  float mx, sum, inv;
  SplitKeyRange<true>(a, scores, partial, scratch, kn, kg, v, qn8, qg8, 0, T, T, kvd, D, scale, G, c, slots, slot, active,
                      mx, sum, inv);
  __syncthreads();
  bf16* out = static_cast<bf16*>(a.out) + (qi * a.heads + h) * D;
  for (int64_t d = threadIdx.x; d < D; d += kSplitThreads) {
    out[d] = __float2bfloat16(SlotSum(partial, slots, D, d) * inv);
  }
}

// The cluster decode attention (GYRE_DECODE_ATTN=cluster, opt-in; ops/DECODE_GRAPHS.md "Session
// 17 (helper flashdec17)"): the split kernel's keys of one (query, head) further split over a
// cluster of kClusterRanks blocks, so a long cache's loads are in flight on 8 SMs instead of one.
// The launch is always a cluster of 8 (the graph captures it once for every length); the row's
// key count T decides how many ranks work: ranks(T) = min(8, ceil(T / 128)), rank r taking the
// contiguous keys [r · per, min(T, (r + 1) · per)), per = ceil(T / ranks); ranks past ranks(T) only
// join the two cluster barriers. A working rank runs the split kernel's body on its range
// (local key index jl = j - r · per dealt to slot jl % slots, local max m_r, local sum l_r, the
// slots' partial rows added in slot order into o_r, unnormalised) and leaves (m_r, l_r, o_r) in its
// shared memory. After the cluster barrier rank 0 reads them through distributed shared memory in
// rank order: M = max m_r, w_r = expf(m_r - M), L = Σ_r l_r w_r, out[d] = (Σ_r o_r[d] w_r) · (1 / L).
// Every order depends only on T and D (row-invariant, graph == eager); at ranks(T) = 1 (T <= 128)
// w_0 = expf(0) = 1 exactly, so the output has the split kernel's bits. Longer rows sum in another
// order than split (each rank's exponentials are taken against its own max): a numerics switch,
// tested against float64.
constexpr int kClusterRanks = 8;
constexpr int64_t kClusterMinKeys = 128;

__device__ __forceinline__ int ClusterRanksFor(int64_t T) {
  const int64_t r = (T + kClusterMinKeys - 1) / kClusterMinKeys;
  return static_cast<int>(r < kClusterRanks ? r : kClusterRanks);
}

__global__ void __cluster_dims__(kClusterRanks, 1, 1) __launch_bounds__(kSplitThreads)
    attention_decode_cluster_kernel(DecodeArgs a, int group_lanes) {
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  extern __shared__ float scores[];
  __shared__ float partial[kSplitPartials];
  __shared__ float scratch[kSplitWarps];
  __shared__ float rank_out[256];  // o_r: the rank's unnormalised output row (D <= 256)
  __shared__ float rank_stats[2];  // m_r, l_r
  const int rank = static_cast<int>(cluster.block_rank());
  const DecodeRow row = DecodeRowOf(a, blockIdx.x / kClusterRanks);
  const int64_t qi = row.qi, h = row.h, b = row.b, hk = row.hk, D = row.D, T = row.T, kvd = row.kvd;
  const int ranks = ClusterRanksFor(T);
  const int64_t per = (T + ranks - 1) / ranks;
  const int64_t j0 = rank < ranks ? (rank * per < T ? rank * per : T) : T;
  const int64_t n = (j0 + per < T ? j0 + per : T) - j0;  // this rank's keys (0 past ranks(T))
  if (rank < ranks) {
    const float scale = rsqrtf(static_cast<float>(D));
    const int G = group_lanes, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int c = lane % G, per_warp = 32 / G, slots = kSplitWarps * per_warp;
    const int slot = warp * per_warp + lane / G;
    const bool active = c < D / 8;
    const bf16* qn = static_cast<const bf16*>(a.q) + (qi * a.heads + h) * D;
    const bf16* qg = a.q_grouped ? static_cast<const bf16*>(a.q_grouped) + (qi * a.heads + h) * D : nullptr;
    const bf16* kn = static_cast<const bf16*>(a.k) + b * a.cache_batch_stride + hk * D + 8 * c + j0 * kvd;
    const bf16* kg = a.k_grouped
                         ? static_cast<const bf16*>(a.k_grouped) + b * a.cache_batch_stride + hk * D + 8 * c + j0 * kvd
                         : nullptr;
    const bf16* v = static_cast<const bf16*>(a.v) + b * a.cache_batch_stride + hk * D + 8 * c + j0 * kvd;
    float qn8[8] = {}, qg8[8] = {};
    if (active) {
      Bf16x8ToFloat(*reinterpret_cast<const uint4*>(qn + 8 * c), qn8);
      if (qg != nullptr) Bf16x8ToFloat(*reinterpret_cast<const uint4*>(qg + 8 * c), qg8);
    }
    float mx, sum, unused_inv;
    SplitKeyRange<false>(a, scores, partial, scratch, kn, kg, v, qn8, qg8, j0, n, T, kvd, D, scale, G, c, slots, slot,
                         active, mx, sum, unused_inv);
    __syncthreads();
    for (int64_t d = threadIdx.x; d < D; d += kSplitThreads) rank_out[d] = SlotSum(partial, slots, D, d);
    if (threadIdx.x == 0) {
      rank_stats[0] = mx;
      rank_stats[1] = sum;
    }
  }
  cluster.sync();  // every rank's (m_r, l_r, o_r) visible to rank 0
  if (rank == 0) {
    float m_all = -INFINITY;
    for (int r = 0; r < ranks; ++r) m_all = fmaxf(m_all, cluster.map_shared_rank(rank_stats, r)[0]);
    float l_all = 0.f;
    for (int r = 0; r < ranks; ++r) {
      const float* st = cluster.map_shared_rank(rank_stats, r);
      l_all += st[1] * expf(st[0] - m_all);
    }
    const float inv = 1.f / l_all;
    bf16* out = static_cast<bf16*>(a.out) + (qi * a.heads + h) * D;
    for (int64_t d = threadIdx.x; d < D; d += kSplitThreads) {
      float s = 0.f;
      for (int r = 0; r < ranks; ++r) {
        const float w = expf(cluster.map_shared_rank(rank_stats, r)[0] - m_all);
        s += cluster.map_shared_rank(rank_out, r)[d] * w;
      }
      out[d] = __float2bfloat16(s * inv);
    }
  }
  cluster.sync();  // no rank leaves while rank 0 still reads its shared memory
}

// The split kernel's shapes: 8-feature lanes (D % 8 == 0, D <= 256: one chunk a lane) and
// 16-byte aligned rows and bases; anything else takes the serial kernel.
bool SplitDecodeFits(const DecodeArgs& a) {
  const auto aligned = [](const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  return a.head_dim % 8 == 0 && a.head_dim <= 256 && aligned(a.q) && aligned(a.q_grouped) && aligned(a.k) &&
         aligned(a.k_grouped) && aligned(a.v) && (a.batch == 1 || a.cache_batch_stride % 8 == 0);
}

// Blocks of a grid-stride launch over `total` elements: enough for one element a thread, at most
// max_blocks (the threads then stride over the rest).
unsigned GridStrideBlocks(int64_t total, int threads, int64_t max_blocks) {
  return static_cast<unsigned>(std::min<int64_t>((total + threads - 1) / threads, max_blocks));
}

// G of the split and cluster decode kernels: the lanes covering one key row (8 features a lane),
// the smallest power of two >= head_dim / 8.
int SplitGroupLanes(int64_t head_dim) {
  int group_lanes = 1;
  while (group_lanes * 8 < head_dim) group_lanes *= 2;
  return group_lanes;
}

// The KV-cache append of a decode graph: B rows of `cols` bf16 to cache row *position_dev (a
// plain copy, so the bytes of the eager path's Copy2D).
__global__ void append_rows_kernel(bf16* dst, int64_t dst_batch_stride, const bf16* src, int64_t batch,
                                   int64_t cols, const int32_t* position_dev) {
  const int64_t t = *position_dev;
  const int64_t total = batch * cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = i / cols, c = i % cols;
    dst[b * dst_batch_stride + t * cols + c] = src[i];
  }
}

// One block per row: each thread scans a strided slice, then a shared-memory tree keeps the
// larger value (the lower index on ties), as the host's std::max_element.
constexpr int kArgmaxThreads = 256;
__global__ void __launch_bounds__(kArgmaxThreads) argmax_rows_kernel(const bf16* x, int64_t cols, int64_t ld,
                                                                     int32_t* out) {
  __shared__ float best_v[kArgmaxThreads];
  __shared__ int64_t best_i[kArgmaxThreads];
  const bf16* row = x + blockIdx.x * ld;
  float bv = -INFINITY;
  int64_t bi = cols;
  for (int64_t c = threadIdx.x; c < cols; c += kArgmaxThreads) {
    const float v = __bfloat162float(row[c]);
    if (v > bv || (bi == cols && !(v < bv))) {  // first finite-or-not candidate, then strictly larger
      bv = v;
      bi = c;
    }
  }
  best_v[threadIdx.x] = bv;
  best_i[threadIdx.x] = bi;
  __syncthreads();
  for (int s = kArgmaxThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      const float ov = best_v[threadIdx.x + s];
      const int64_t oi = best_i[threadIdx.x + s];
      if (oi < cols && (best_i[threadIdx.x] == cols || ov > best_v[threadIdx.x] ||
                        (ov == best_v[threadIdx.x] && oi < best_i[threadIdx.x]))) {
        best_v[threadIdx.x] = ov;
        best_i[threadIdx.x] = oi;
      }
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = static_cast<int32_t>(best_i[0]);
}

// CopySpans: block (x, y) copies every gridDim.x-th word of span y from word x · blockDim.x on.
constexpr int kCopySpanThreads = 256;
__global__ void __launch_bounds__(kCopySpanThreads) copy_spans_kernel(const CopySpan* spans) {
  const CopySpan s = spans[blockIdx.y];
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kCopySpanThreads;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kCopySpanThreads + threadIdx.x;
  if (((reinterpret_cast<uintptr_t>(s.dst) | reinterpret_cast<uintptr_t>(s.src) | static_cast<uintptr_t>(s.bytes)) &
       15) == 0) {
    uint4* d = static_cast<uint4*>(s.dst);
    const uint4* x = static_cast<const uint4*>(s.src);
    for (int64_t i = first; i < s.bytes / 16; i += stride) d[i] = x[i];
  } else {
    uint32_t* d = static_cast<uint32_t*>(s.dst);
    const uint32_t* x = static_cast<const uint32_t*>(s.src);
    for (int64_t i = first; i < s.bytes / 4; i += stride) d[i] = x[i];
  }
}

// DraftRows: every block recomputes keep (k <= 16 compares) and copies its head's row.
__global__ void draft_rows_kernel(DraftRowsArgs a) {
  int64_t keep = *a.forced_keep;
  if (keep <= 0) {
    keep = 1;
    while (keep < a.k && a.chunk[keep] == a.head1[keep - 1]) ++keep;
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) *a.keep_out = static_cast<int32_t>(keep);
  const bf16* src = static_cast<const bf16*>(a.src[blockIdx.x]) + (keep - 1) * a.cols;
  bf16* dst = static_cast<bf16*>(a.dst) + blockIdx.x * a.cols;
  for (int64_t c = threadIdx.x; c < a.cols; c += blockDim.x) dst[c] = src[c];
}

// GemmRows (the header states the math and why its order is fixed): warp w of block x owns
// column j = 4x + w; lane l walks the reduction's 8-element groups l, l + 32, ... and keeps one
// fp32 accumulator per row; B's row j is read once for all rows.
constexpr int kGemmRowsWarps = 4;

struct Eight {
  float v[8];
};

// Elements 8g .. 8g + 7 of a bf16 row (zeros past k; the caller adds only those < k).
__device__ __forceinline__ Eight LoadEight(const bf16* row, int64_t g, int64_t k, bool vec) {
  Eight e;
  const int64_t base = g * 8;
  if (vec && base + 8 <= k) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(row + base));
    const __nv_bfloat162* p = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __bfloat1622float2(p[i]);
      e.v[2 * i] = f.x;
      e.v[2 * i + 1] = f.y;
    }
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) e.v[i] = base + i < k ? __bfloat162float(row[base + i]) : 0.f;
  }
  return e;
}

// One warp's share of GemmRows' column dot products (both kernels): the groups of 8 elements
// g = first, first + kStep, ... in ascending order, one __fmaf_rn an element (the short last group
// masked), then the warp's xor butterfly (__fadd_rn); acc[r] for each of the MR rows xr.
template <int MR, int kStep>
__device__ __forceinline__ void GemmRowsWarpDot(float (&acc)[MR], const bf16* w, const bf16* const (&xr)[MR],
                                                int64_t k, bool vec, int first) {
  const int64_t groups = (k + 7) / 8;
#pragma unroll 2
  for (int64_t g = first; g < groups; g += kStep) {
    const Eight we = LoadEight(w, g, k, vec);
    Eight xe[MR];
#pragma unroll
    for (int r = 0; r < MR; ++r) xe[r] = LoadEight(xr[r], g, k, vec);
    const int valid = k - g * 8 >= 8 ? 8 : static_cast<int>(k - g * 8);
#pragma unroll
    for (int r = 0; r < MR; ++r) {
#pragma unroll
      for (int i = 0; i < 8; ++i)
        if (i < valid) acc[r] = __fmaf_rn(xe[r].v[i], we.v[i], acc[r]);
    }
  }
#pragma unroll
  for (int r = 0; r < MR; ++r)
    for (int o = 16; o > 0; o >>= 1) acc[r] = __fadd_rn(acc[r], __shfl_xor_sync(0xffffffffu, acc[r], o));
}

// The MR rows of A a GemmRows block reads; rows past m (MR pads m up) re-read row m - 1.
template <int MR>
__device__ __forceinline__ void GemmRowsInputRows(const GemmRowsArgs& a, const bf16* (&xr)[MR]) {
#pragma unroll
  for (int r = 0; r < MR; ++r) xr[r] = static_cast<const bf16*>(a.a) + (r < a.m ? r : a.m - 1) * a.lda;
}

// Column j of C's first min(MR, m) rows from the column's dot products acc: C = alpha · acc +
// beta · C_in (C_in = c_in or C itself), each step rounded as written (__fmul_rn, __fadd_rn).
template <int MR>
__device__ __forceinline__ void GemmRowsStore(const GemmRowsArgs& a, const float (&acc)[MR], int64_t j) {
  const void* cin = a.c_in != nullptr ? a.c_in : a.c;
#pragma unroll
  for (int r = 0; r < MR; ++r) {
    if (r >= a.m) break;
    float v = __fmul_rn(a.alpha, acc[r]);
    const int64_t o = r * a.ldc + j;
    if (a.beta != 0.f) {
      const float old = a.c_f32 ? static_cast<const float*>(cin)[o] : __bfloat162float(static_cast<const bf16*>(cin)[o]);
      v = __fadd_rn(v, __fmul_rn(a.beta, old));
    }
    if (a.c_f32) {
      static_cast<float*>(a.c)[o] = v;
    } else {
      static_cast<bf16*>(a.c)[o] = __float2bfloat16(v);
    }
  }
}

template <int MR>
__global__ void __launch_bounds__(kGemmRowsWarps * 32) gemm_rows_kernel(GemmRowsArgs a, bool vec) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t j = blockIdx.x * static_cast<int64_t>(kGemmRowsWarps) + warp;
  if (j >= a.n) return;
  const bf16* w = static_cast<const bf16*>(a.b) + j * a.ldb;
  // Rows past m (MR pads m up) re-read row m - 1 and are not stored: no branch in the loop body,
  // so every row's loads of a group are in flight together (a branch per row serialised them:
  // 0.3-0.5 ms more per speculative round at k = 4-5 in the first call).
  const bf16* xr[MR];
  GemmRowsInputRows<MR>(a, xr);
  float acc[MR];
#pragma unroll
  for (int r = 0; r < MR; ++r) acc[r] = 0.f;
  GemmRowsWarpDot<MR, 32>(acc, w, xr, a.k, vec, lane);
  if (lane != 0) return;
  GemmRowsStore<MR>(a, acc, j);
}


// GemmRows with S = 2 or 4 warps a column (GYRE_GEMM_ROWS_WARPS; ops/cuda_infer.h): the one-warp
// kernel above keeps only ~12 warps an SM at n = 1536 and walks a lane's 3-6 groups in 2-3 rounds
// of loads (5-6.6 µs a product at k = 768-1536 on an H100 in a decode graph, ops/DECODE_GRAPHS.md,
// for 2.4 MB that stream in ~1 µs). Here warp s of column j's S warps sums the groups
// g = 32 s + l, 32 s + l + 32 S, ... (lane l) in ascending order, one __fmaf_rn an element, then
// the warp's xor butterfly; warp 0 of the column adds the S warp sums in the order 0, 1, ..., S - 1
// (__fadd_rn, through shared memory). Another summation order than the one-warp kernel's, but as
// fixed: nothing depends on m, alignment or instantiation, so rows stay bit-identical alone and
// together (speculative == greedy). 4 / S columns a 128-thread block; S x the loads in flight.
template <int MR, int S>
__global__ void __launch_bounds__(kGemmRowsWarps * 32) gemm_rows_split_kernel(GemmRowsArgs a, bool vec) {
  static_assert(S == 2 || S == 4, "2 or 4 warps a column");
  constexpr int kCols = kGemmRowsWarps / S;
  __shared__ float partial[kGemmRowsWarps][MR];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int col = warp / S, part = warp % S;
  const int64_t j = blockIdx.x * static_cast<int64_t>(kCols) + col;
  const bool live = j < a.n;  // no early return: the block meets at __syncthreads
  float acc[MR];
#pragma unroll
  for (int r = 0; r < MR; ++r) acc[r] = 0.f;
  if (live) {
    const bf16* w = static_cast<const bf16*>(a.b) + j * a.ldb;
    const bf16* xr[MR];
    GemmRowsInputRows<MR>(a, xr);
    GemmRowsWarpDot<MR, 32 * S>(acc, w, xr, a.k, vec, part * 32 + lane);
    if (lane == 0) {
#pragma unroll
      for (int r = 0; r < MR; ++r) partial[warp][r] = acc[r];
    }
  }
  __syncthreads();
  if (!live || part != 0 || lane != 0) return;
#pragma unroll
  for (int r = 0; r < MR; ++r) {
    float sum = partial[warp][r];
#pragma unroll
    for (int s = 1; s < S; ++s) sum = __fadd_rn(sum, partial[warp + s][r]);
    acc[r] = sum;
  }
  GemmRowsStore<MR>(a, acc, j);
}

}  // namespace

namespace {

// One thread a logit; tanhf (not the fast-math intrinsic) so the cap matches the CPU's tanh to
// fp32 rounding before the one bf16 rounding.
__global__ void soft_cap_rows_kernel(bf16* x, int64_t n, float cap) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  x[i] = __float2bfloat16_rn(cap * tanhf(__bfloat162float(x[i]) / cap));
}

}  // namespace

CudaResult SoftCapRows(void* x, int64_t n, float cap, cudaStream_t stream) {
  if (n < 0 || !(cap > 0.f) || (n > 0 && x == nullptr)) return InvalidArgument("soft_cap_rows: bad arguments");
  if (n == 0) return {};
  const int threads = 256;
  soft_cap_rows_kernel<<<static_cast<unsigned>((n + threads - 1) / threads), threads, 0, stream>>>(static_cast<bf16*>(x),
                                                                                                   n, cap);
  CUDA_RETURN_IF_LAUNCH_ERROR("soft_cap_rows_kernel");
  return {};
}

CudaResult ArgmaxRows(const void* x, int64_t rows, int64_t cols, int64_t ld, int32_t* out, cudaStream_t stream) {
  if (x == nullptr || out == nullptr || rows < 0 || cols <= 0 || ld < cols) return InvalidArgument("argmax_rows: bad arguments");
  if (rows == 0) return {};
  argmax_rows_kernel<<<static_cast<unsigned>(rows), kArgmaxThreads, 0, stream>>>(static_cast<const bf16*>(x), cols, ld,
                                                                                out);
  CUDA_RETURN_IF_LAUNCH_ERROR("argmax_rows_kernel");
  return {};
}

CudaResult RopePartial(const RopePartialArgs& a, cudaStream_t stream) {
  if (a.x == nullptr || a.rows < 0 || a.seq <= 0 || a.heads <= 0 || a.rotary_dim < 2 || a.rotary_dim % 2 != 0 ||
      a.rotary_dim > a.head_dim || a.row_stride < a.heads * a.head_dim || a.theta <= 0) {
    return InvalidArgument("rope_partial: bad arguments");
  }
  const int64_t total = a.rows * a.heads * (a.rotary_dim / 2);
  if (total == 0) return {};
  const int threads = 256;
  rope_partial_kernel<<<GridStrideBlocks(total, threads, 65535), threads, 0, stream>>>(a);
  CUDA_RETURN_IF_LAUNCH_ERROR("rope_partial_kernel");
  return {};
}

CudaResult RopeAppend(const RopeAppendArgs& a, cudaStream_t stream) {
  const int64_t qd = a.heads * a.head_dim, kvd = a.kv_heads * a.head_dim;
  if (a.batch <= 0 || a.queries <= 0 || a.heads <= 0 || a.kv_heads <= 0 || a.head_dim <= 0 || a.rotary_dim < 2 ||
      a.rotary_dim % 2 != 0 || a.rotary_dim > a.head_dim || a.theta <= 0 || a.group < 0 || !a.q || !a.k || !a.v ||
      !a.q_out || !a.k_cache || !a.v_cache || a.ldq < qd || a.ldk < kvd || a.ldv < kvd ||
      (a.batch > 1 && a.cache_batch_stride < kvd) || (a.group > 0 && (!a.q_grouped_out || !a.k_grouped_cache))) {
    return InvalidArgument("rope_append: bad arguments");
  }
  const int64_t rows = a.batch * a.queries, per_head = a.head_dim - a.rotary_dim / 2;
  const int64_t total = rows * ((a.heads + a.kv_heads) * per_head + kvd);
  const int threads = 256;
  rope_append_kernel<<<GridStrideBlocks(total, threads, 1024), threads, 0, stream>>>(a);
  CUDA_RETURN_IF_LAUNCH_ERROR("rope_append_kernel");
  return {};
}

CudaResult AttentionDecode(const DecodeArgs& a, cudaStream_t stream) {
  if (a.batch <= 0 || a.heads <= 0 || a.kv_heads <= 0 || a.heads % a.kv_heads != 0 || a.head_dim <= 0 ||
      a.length <= 0 || a.queries <= 0 || a.queries > a.length || !a.q || !a.k || !a.v || !a.out ||
      (a.window > 0 && (!a.q_grouped || !a.k_grouped))) {
    return InvalidArgument("attention_decode: bad arguments");
  }
  const size_t smem = static_cast<size_t>(a.length) * sizeof(float);
  constexpr size_t kMaxSmem = 200 * 1024;
  if (smem > kMaxSmem) return InvalidArgument("attention_decode: more than 51200 cached keys");
  if (a.split && a.cluster && SplitDecodeFits(a) && (a.position_dev != nullptr || a.length > kClusterMinKeys)) {
    // One cluster of 8 blocks a (query, head); the scores of a rank's range: at most
    // max(128, ceil(length / 8)) keys (see ClusterRanksFor). An eager launch whose rows all have
    // <= 128 keys takes the split kernel below: the same bits (one working rank, w_0 = 1).
    const int group_lanes = SplitGroupLanes(a.head_dim);
    const int64_t rank_keys = std::max<int64_t>(kClusterMinKeys, (a.length + kClusterRanks - 1) / kClusterRanks);
    const size_t cluster_smem = static_cast<size_t>(rank_keys) * sizeof(float);
    if (cluster_smem + sizeof(float) * (kSplitPartials + kSplitWarps + 256 + 2) > 48 * 1024) {
      CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(attention_decode_cluster_kernel,
                                                cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kMaxSmem)));
    }
    attention_decode_cluster_kernel<<<static_cast<unsigned>(a.batch * a.queries * a.heads * kClusterRanks),
                                      kSplitThreads, cluster_smem, stream>>>(a, group_lanes);
    CUDA_RETURN_IF_LAUNCH_ERROR("attention_decode_cluster_kernel");
    return {};
  }
  if (a.split && SplitDecodeFits(a)) {
    const int group_lanes = SplitGroupLanes(a.head_dim);
    if (smem + sizeof(float) * (kSplitPartials + kSplitWarps) > 48 * 1024) {
      CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(attention_decode_split_kernel,
                                                cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kMaxSmem)));
    }
    attention_decode_split_kernel<<<static_cast<unsigned>(a.batch * a.queries * a.heads), kSplitThreads, smem,
                                    stream>>>(a, group_lanes);
    CUDA_RETURN_IF_LAUNCH_ERROR("attention_decode_split_kernel");
    return {};
  }
  if (smem > 48 * 1024) {
    CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(attention_decode_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                              static_cast<int>(kMaxSmem)));
  }
  attention_decode_kernel<<<static_cast<unsigned>(a.batch * a.queries * a.heads), kDecodeThreads, smem, stream>>>(a);
  CUDA_RETURN_IF_LAUNCH_ERROR("attention_decode_kernel");
  return {};
}

CudaResult AppendRows(void* dst, int64_t dst_batch_stride, const void* src, int64_t batch, int64_t cols,
                      const int32_t* position_dev, cudaStream_t stream) {
  if (dst == nullptr || src == nullptr || position_dev == nullptr || batch < 0 || cols < 0 ||
      (batch > 1 && dst_batch_stride < cols)) {
    return InvalidArgument("append_rows: bad arguments");
  }
  const int64_t total = batch * cols;
  if (total == 0) return {};
  const int threads = 256;
  append_rows_kernel<<<GridStrideBlocks(total, threads, 1024), threads, 0, stream>>>(
      static_cast<bf16*>(dst), dst_batch_stride, static_cast<const bf16*>(src), batch, cols, position_dev);
  CUDA_RETURN_IF_LAUNCH_ERROR("append_rows_kernel");
  return {};
}

CudaResult CopySpans(const CopySpan* spans_dev, int64_t n, int64_t max_bytes, cudaStream_t stream) {
  if (n < 0 || n > 65535 || max_bytes < 0 || (n > 0 && spans_dev == nullptr)) {
    return InvalidArgument("copy_spans: bad arguments");
  }
  if (n == 0 || max_bytes == 0) return {};
  const int64_t per_block = 16 * kCopySpanThreads;
  const int64_t blocks = std::min<int64_t>((max_bytes + per_block - 1) / per_block, 64);
  copy_spans_kernel<<<dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(n)), kCopySpanThreads, 0, stream>>>(
      spans_dev);
  CUDA_RETURN_IF_LAUNCH_ERROR("copy_spans_kernel");
  return {};
}

CudaResult DraftRows(const DraftRowsArgs& a, cudaStream_t stream) {
  if (a.chunk == nullptr || a.head1 == nullptr || a.forced_keep == nullptr || a.keep_out == nullptr ||
      a.dst == nullptr || a.k < 1 || a.heads < 1 || a.heads > kDraftRowsMaxHeads || a.cols < 1) {
    return InvalidArgument("draft_rows: bad arguments");
  }
  for (int64_t h = 0; h < a.heads; ++h) {
    if (a.src[h] == nullptr) return InvalidArgument("draft_rows: a null source");
  }
  draft_rows_kernel<<<static_cast<unsigned>(a.heads), 256, 0, stream>>>(a);
  CUDA_RETURN_IF_LAUNCH_ERROR("draft_rows_kernel");
  return {};
}

CudaResult GemmRows(const gyre::cuda::GemmArgs& g, cudaStream_t stream, int warps_per_column) {
  if (g.trans_a || !g.trans_b || g.epilogue != gyre::cuda::GemmEpilogue::kNone) {
    return InvalidArgument("gemm_rows: only C = alpha A Bᵀ + beta C_in (no transposed A, no epilogue)");
  }
  GemmRowsArgs a;
  a.m = g.m; a.n = g.n; a.k = g.k;
  a.a = g.a; a.lda = g.lda;
  a.b = g.b; a.ldb = g.ldb;
  a.c = g.c; a.ldc = g.ldc; a.c_f32 = g.c_dtype == gyre::cuda::DType::kF32;
  a.alpha = g.alpha; a.beta = g.beta; a.c_in = g.c_in;
  if (a.m < 0 || a.m > kGemmRowsMax || a.n < 0 || a.k < 0 || (a.m > 0 && a.n > 0 && (!a.a || !a.b || !a.c)) ||
      a.lda < a.k || a.ldb < a.k || a.ldc < a.n) {
    return InvalidArgument("gemm_rows: bad arguments");
  }
  if (a.m == 0 || a.n == 0) return {};
  const auto aligned = [](const void* p, int64_t ld) { return reinterpret_cast<uintptr_t>(p) % 16 == 0 && ld % 8 == 0; };
  const bool vec = aligned(a.a, a.lda) && aligned(a.b, a.ldb);
  if (warps_per_column != 1 && warps_per_column != 2 && warps_per_column != 4) {
    return InvalidArgument("gemm_rows: 1, 2 or 4 warps a column");
  }
  const unsigned threads = kGemmRowsWarps * 32;
  if (warps_per_column > 1) {
    const int64_t cols = kGemmRowsWarps / warps_per_column;
    const unsigned split_blocks = static_cast<unsigned>((a.n + cols - 1) / cols);
    const int mr = a.m <= 8 ? static_cast<int>(a.m) : a.m <= 12 ? 12 : 16;
#define GYRE_GEMM_ROWS_SPLIT(R)                                                                       \
  case R:                                                                                             \
    if (warps_per_column == 2) gemm_rows_split_kernel<R, 2><<<split_blocks, threads, 0, stream>>>(a, vec); \
    else gemm_rows_split_kernel<R, 4><<<split_blocks, threads, 0, stream>>>(a, vec);                   \
    break;
    switch (mr) {
      GYRE_GEMM_ROWS_SPLIT(1) GYRE_GEMM_ROWS_SPLIT(2) GYRE_GEMM_ROWS_SPLIT(3) GYRE_GEMM_ROWS_SPLIT(4)
      GYRE_GEMM_ROWS_SPLIT(5) GYRE_GEMM_ROWS_SPLIT(6) GYRE_GEMM_ROWS_SPLIT(7) GYRE_GEMM_ROWS_SPLIT(8)
      GYRE_GEMM_ROWS_SPLIT(12) GYRE_GEMM_ROWS_SPLIT(16)
    }
#undef GYRE_GEMM_ROWS_SPLIT
    CUDA_RETURN_IF_LAUNCH_ERROR("gemm_rows_split_kernel");
    return {};
  }
  const unsigned blocks = static_cast<unsigned>((a.n + kGemmRowsWarps - 1) / kGemmRowsWarps);
  switch (a.m) {  // exact row counts up to 8 (a speculative chunk is 2-5 rows), then 12 and 16
#define GYRE_GEMM_ROWS_CASE(R) \
  case R:                      \
    gemm_rows_kernel<R><<<blocks, threads, 0, stream>>>(a, vec); \
    break;
    GYRE_GEMM_ROWS_CASE(1) GYRE_GEMM_ROWS_CASE(2) GYRE_GEMM_ROWS_CASE(3) GYRE_GEMM_ROWS_CASE(4)
    GYRE_GEMM_ROWS_CASE(5) GYRE_GEMM_ROWS_CASE(6) GYRE_GEMM_ROWS_CASE(7) GYRE_GEMM_ROWS_CASE(8)
#undef GYRE_GEMM_ROWS_CASE
    default:
      if (a.m <= 12) {
        gemm_rows_kernel<12><<<blocks, threads, 0, stream>>>(a, vec);
      } else {
        gemm_rows_kernel<16><<<blocks, threads, 0, stream>>>(a, vec);
      }
  }
  CUDA_RETURN_IF_LAUNCH_ERROR("gemm_rows_kernel");
  return {};
}

}  // namespace gyre::ops::cuda_infer
