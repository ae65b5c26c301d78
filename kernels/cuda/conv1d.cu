// Causal depthwise conv1d (+ SiLU), forward and backward; the contract is in conv1d.h.
//
// Index the inputs as one extended sequence per (batch row, channel): X_e, e = 0..S+K−2, where
// e < K−1 is the conv state (row e) and e ≥ K−1 is x_{e−(K−1)}. Then
//   u_t = bias + Σ_j w_j X_{t+j},  y_t = u_t or SiLU(u_t),  final state row r = X_{S+r},
//   ∂X_e = Σ_j w_j du_{e−j} (0 ≤ e−j < S) + [e ≥ S] d_final_{e−S},
//   ∂w_j = Σ_t du_t X_{t+j},  ∂bias = Σ_t du_t,  du_t = dy_t · SiLU'(u_t) (or dy_t).
// ∂X_e is dx_{e−(K−1)} for e ≥ K−1 and the initial state's gradient for e < K−1.
//
// Kernels: one thread per (V adjacent channels, run of 64 outputs), V = 4 (or 2, or 1 for odd
// channel counts / unaligned pointers), channels across the warp (coalesced 8-byte accesses of
// bf16 rows, channels last), sliding a K-wide register window along the run, so each input is
// read once per run plus K−1 halo values. The rows reach the window through a per-thread
// cp.async ring in shared memory (V >= 2; 16 tokens ahead forward, 8 backward) so that many
// rows' loads are in flight without registers; V = 1 (2-byte rows, below cp.async's minimum)
// loads batches of rows into registers. (V = 1 with no unrolling ran the backward at 0.84 TB/s
// on an H200; V = 4 with conditional loads at 0.35 TB/s; V = 4 with register batches of 4 rows
// at ~1.7 TB/s; see conv1d_bwd.) Consuming the ring 4 tokens per wait (to let the compiler
// interleave tokens) was slower, forward and backward (+10%, rglue8 call 3). The backward
// recomputes u over the run plus a K−1 halo, writes dX, and per-run partial sums of ∂w, ∂bias
// to scratch; conv1d_param_reduce adds them in a fixed order into dw, dbias (deterministic).
//
// Cost (bf16): forward reads x, writes y: 4 B per element; backward reads x, dy, writes dx:
// 6 B per element (+ partials: (K+1)·4 B per channel per 64 tokens, ~1/10 of that). At
// B8 S2048 C4096 (Mamba-2 d_inner 2048 + 2·N·G conv channels, rounded): 67M elements, forward
// 268 MB ≈ 0.08 ms, backward 403 MB ≈ 0.12 ms at 3.3 TB/s; FLOPs (2K+~10 per element) are
// negligible.
#include "kernels/cuda/conv1d.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <string>
#include <type_traits>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/vec_util.cuh"

namespace gyre::cuda {
namespace {

using bf16 = __nv_bfloat16;
constexpr int kRun = 64;       // outputs per thread
constexpr int kBlock = 128;    // most threads per block (V channels each); see ConvBlockThreads
constexpr int kFwdBatch = 8;   // token rows whose loads the forward issues together (scalar channels)
constexpr int kFwdAhead = 16;  // the forward's cp.async ring of token rows per thread
constexpr int kBwdAhead = 8;   // the backward's cp.async ring of token rows per thread

// cp.async of kBytes (4 or 8) global -> shared, through L1; one commit group per call site's token.
template <int kBytes>
__device__ __forceinline__ void CpAsync(void* dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(static_cast<uint32_t>(__cvta_generic_to_shared(dst))),
               "l"(src), "n"(kBytes));
}
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}
// V bf16 from their raw 2·V bytes (V = 2: one 32-bit word; V = 4: uint2).
template <int V, typename Raw>
__device__ __forceinline__ void FromRaw(const Raw& raw, float (&out)[V]) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int k = 0; k < V / 2; ++k) {
    const float2 f = __bfloat1622float2(h[k]);
    out[2 * k] = f.x;
    out[2 * k + 1] = f.y;
  }
}

struct ConvDims {
  int B, S, C, K;
};

// V consecutive bf16 (V = 1, 2 or 4; the launcher guarantees V-element alignment) ↔ floats.
template <int V>
__device__ __forceinline__ void LoadV(const bf16* __restrict__ p, float (&out)[V]) {
  if constexpr (V == 4) {
    const uint2 raw = *reinterpret_cast<const uint2*>(p);
    const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.x));
    const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.y));
    out[0] = a.x;
    out[1] = a.y;
    out[2] = b.x;
    out[3] = b.y;
  } else if constexpr (V == 2) {
    const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
    out[0] = a.x;
    out[1] = a.y;
  } else {
    out[0] = __bfloat162float(*p);
  }
}

template <int V>
__device__ __forceinline__ void StoreV(bf16* __restrict__ p, const float (&v)[V]) {
  if constexpr (V == 4) {
    uint2 raw;
    *reinterpret_cast<__nv_bfloat162*>(&raw.x) = __floats2bfloat162_rn(v[0], v[1]);
    *reinterpret_cast<__nv_bfloat162*>(&raw.y) = __floats2bfloat162_rn(v[2], v[3]);
    *reinterpret_cast<uint2*>(p) = raw;
  } else if constexpr (V == 2) {
    *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(v[0], v[1]);
  } else {
    *p = __float2bfloat16_rn(v[0]);
  }
}

// X_e for one (batch row, V channels from ch); zeros outside [0, S+K−1).
template <int V>
__device__ __forceinline__ void XExt(const ConvDims& d, const bf16* __restrict__ x,
                                     const bf16* __restrict__ init, int b, int ch, int e,
                                     float (&out)[V]) {
  if (e < 0 || e >= d.S + d.K - 1 || (e < d.K - 1 && init == nullptr)) {
#pragma unroll
    for (int v = 0; v < V; ++v) out[v] = 0.f;
  } else if (e < d.K - 1) {
    LoadV<V>(init + (static_cast<int64_t>(b) * (d.K - 1) + e) * d.C + ch, out);
  } else {
    LoadV<V>(x + (static_cast<int64_t>(b) * d.S + (e - (d.K - 1))) * d.C + ch, out);
  }
}

// Fast-math sigmoid: ex2.approx and one MUFU reciprocal (__fdividef: 2 ulp; 1 + e^-u >= 1, and
// above 2^126 it gives 0, the true limit) instead of expf's range reduction and an IEEE division
// (~20 dependent instructions): the backward recomputes SiLU' per token and was latency-bound on
// that chain (~100 instructions per token-thread at 24% issue, rglue8). H200, ms per 16 x 2048
// step (rglue9 call 1): backward 4.47 -> 3.79 (xlstm[1:0]-125m), 4.95 -> 4.24 (mamba2-130m);
// forward 2.17 -> 1.60, 2.64 -> 1.86.
__device__ __forceinline__ float SigmoidF(float u) { return __fdividef(1.f, 1.f + __expf(-u)); }

// grid (ceil(C/(128·V)), ceil(S/64), B); thread = V adjacent channels (one 2·V-byte access per
// token row: a warp reads 64·V contiguous bytes), the token loop unrolled so that several rows'
// loads are in flight.
template <int K, int V>
__global__ void __launch_bounds__(kBlock) conv1d_fwd(ConvDims d, bool silu,
                                                     const bf16* __restrict__ x,
                                                     const float* __restrict__ w,
                                                     const float* __restrict__ bias,
                                                     const bf16* __restrict__ init,
                                                     bf16* __restrict__ y) {
  const int ch = (blockIdx.x * blockDim.x + threadIdx.x) * V;
  if (ch >= d.C) return;
  const int b = blockIdx.z;
  const int t0 = blockIdx.y * kRun, t1 = min(d.S, t0 + kRun);
  float wk[K][V], b0[V];
#pragma unroll
  for (int v = 0; v < V; ++v) {
#pragma unroll
    for (int j = 0; j < K; ++j) wk[j][v] = w[static_cast<int64_t>(ch + v) * K + j];
    b0[v] = bias != nullptr ? bias[ch + v] : 0.f;
  }
  float win[K][V];  // win[j] = X_{t+j}
#pragma unroll
  for (int j = 0; j < K - 1; ++j) XExt<V>(d, x, init, b, ch, t0 + j, win[j + 1]);
  // One token from its new input row xn = X_{t+K−1}.
  auto token = [&](int t, const float (&xn)[V]) {
#pragma unroll
    for (int j = 0; j < K - 1; ++j)
#pragma unroll
      for (int v = 0; v < V; ++v) win[j][v] = win[j + 1][v];
#pragma unroll
    for (int v = 0; v < V; ++v) win[K - 1][v] = xn[v];
    float out[V];
#pragma unroll
    for (int v = 0; v < V; ++v) {
      float u = b0[v];
#pragma unroll
      for (int j = 0; j < K; ++j) u += wk[j][v] * win[j][v];
      out[v] = silu ? u * SigmoidF(u) : u;
    }
    StoreV<V>(y + (static_cast<int64_t>(b) * d.S + t) * d.C + ch, out);
  };
  const bf16* __restrict__ xrow = x + static_cast<int64_t>(b) * d.S * d.C + ch;
  int t = t0;
  if constexpr (V >= 2) {
    // x rows by cp.async through a per-thread shared ring kFwdAhead − 1 tokens ahead. A plain
    // `unroll 4` left the loads to the compiler (56 registers); per step on an H200 (rglue8):
    // xlstm[1:0]-125m 2.78 ms -> 2.34 with register batches of 8 rows (95 registers) -> 2.13
    // with this ring; mamba2-130m 2.94 -> 2.53 -> 2.61 (its 64-thread blocks leave half of each
    // block's ring unused; smem then limits it to 14 blocks per SM).
    using Raw = std::conditional_t<V == 4, uint2, uint32_t>;
    __shared__ Raw ring[kFwdAhead][kBlock];
    const int tid = threadIdx.x;
    auto issue = [&](int tt) {
      if (tt < t1) CpAsync<2 * V>(&ring[tt % kFwdAhead][tid], xrow + static_cast<int64_t>(tt) * d.C);
      CpAsyncCommit();
    };
#pragma unroll
    for (int i = 0; i < kFwdAhead - 1; ++i) issue(t0 + i);
#pragma unroll 4
    for (; t < t1; ++t) {
      issue(t + kFwdAhead - 1);
      CpAsyncWait<kFwdAhead - 1>();
      float xn[V];
      FromRaw<V>(ring[t % kFwdAhead][tid], xn);
      token(t, xn);
    }
    CpAsyncWait<0>();
  } else {
    for (; t + kFwdBatch <= t1; t += kFwdBatch) {  // scalar channels: 8 rows' loads issued together
      float xn[kFwdBatch][V];
#pragma unroll
      for (int i = 0; i < kFwdBatch; ++i) LoadV<V>(xrow + static_cast<int64_t>(t + i) * d.C, xn[i]);
#pragma unroll
      for (int i = 0; i < kFwdBatch; ++i) token(t + i, xn[i]);
    }
    for (; t < t1; ++t) {
      float xn[V];
      LoadV<V>(xrow + static_cast<int64_t>(t) * d.C, xn);
      token(t, xn);
    }
  }
}

// final[b, r, ch] = X_{S+r}; grid-stride over B·(K−1)·C.
__global__ void conv1d_final_state(ConvDims d, const bf16* x, const bf16* init, bf16* final_state) {
  const int64_t n = static_cast<int64_t>(d.B) * (d.K - 1) * d.C;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int ch = static_cast<int>(i % d.C);
    const int r = static_cast<int>((i / d.C) % (d.K - 1));
    const int b = static_cast<int>(i / (static_cast<int64_t>(d.C) * (d.K - 1)));
    float v[1];
    XExt<1>(d, x, init, b, ch, d.S + r, v);
    final_state[i] = __float2bfloat16_rn(v[0]);
  }
}

// X_e as XExt, but the load itself is unconditional: the address is always a valid row (x row
// clamped into [0, S), or the init row when e names one) and out-of-range values are zeroed after
// the load, so that the unrolled token loop of conv1d_bwd can issue several rows' loads before
// using any (with XExt's branches each token waited a full memory latency: 0.35 TB/s).
template <int K, int V>
__device__ __forceinline__ void XExtClamped(const ConvDims& d, const bf16* __restrict__ x,
                                            const bf16* __restrict__ init, int b, int ch, int e,
                                            float (&out)[V]) {
  const int row = min(max(e - (K - 1), 0), d.S - 1);
  const bf16* p = x + (static_cast<int64_t>(b) * d.S + row) * d.C + ch;
  bool valid = e >= K - 1 && e < d.S + K - 1;
  if (K > 1 && init != nullptr && e >= 0 && e < K - 1) {
    p = init + (static_cast<int64_t>(b) * (K - 1) + max(e, 0)) * d.C + ch;
    valid = true;
  }
  LoadV<V>(p, out);
#pragma unroll
  for (int v = 0; v < V; ++v) out[v] = valid ? out[v] : 0.f;
}

// grid (ceil(C/(128·V)), ceil((S+K−1)/64), B): outputs ∂X_e for e in [e0, e0+64) ∩ [0, S+K−1),
// V adjacent channels per thread (as conv1d_fwd).
// part [B·runs, C, K+1]: this run's Σ du X_{t+j} (j < K) and Σ du over t in [e0, e1) ∩ [0, S).
// Structure: the K−1 halo tokens before e0 (du only) are a fully unrolled prologue; the main
// loop over t in [e0, e1) has only unconditional loads (clamped rows, zeroed after the load) and
// plain stores, so its 4x unrolling keeps 8 loads in flight per thread like the forward.
// (kBlock, 5): 96 registers (12 bytes spilled) for 5 blocks of 128 per SM instead of 110 and 4:
// 5.12 -> 4.91 ms per mamba2-130m step, 4.39 -> 4.37 xlstm[1:0]-125m (H200, rglue8 call 2).
// The other template arguments serve the variants (GYRE_CONV_BWD, ConvBwdVariant below):
// kMinBlocks the launch bounds, kAhead the ring depth, kRunLen the outputs per thread, kSplit:
// the first and last run of a row send their interior tokens (K−1 <= t < S) through the ring
// too and only the state / final-state tokens through `step` (without it a row's run 0 takes
// all 64 tokens through step's dependent loads, the slowest part).
// The body is Conv1dBwdRun, shared by conv1d_bwd (dx rows of C) and conv1d_bwd_ldx (dx rows of
// ldx >= C: the Mamba-2 fused in_proj backward writes dxBC into its columns of one [rows, ldx]
// gradient); the kernels declare the cp.async ring (V >= 2) and pass it.
// (The split left the PTX of both conv1d_bwd<4, 4, ...> kernels — every Mamba-2 / xLSTM preset's
// conv backward — and of 5 of the 11 other widths / vector sizes identical; in 6 (1 or 2 channels
// a thread at K 1, 3, 4) a few integer instructions moved, the same machine-code size.)
template <int V>
using BwdRaw = std::conditional_t<V == 4, uint2, uint32_t>;

template <int K, int V, int kAhead, int kRunLen, bool kSplit, bool kLdx>
__device__ __forceinline__ void Conv1dBwdRun(
    ConvDims d, int ld_arg, bool silu, const bf16* __restrict__ x, const float* __restrict__ w,
    const float* __restrict__ bias, const bf16* __restrict__ init, const bf16* __restrict__ dy,
    const bf16* __restrict__ d_final, bf16* __restrict__ dx, bf16* __restrict__ d_init,
    float* __restrict__ part, BwdRaw<V> (*ring)[2][kBlock]) {
  const int ch = (blockIdx.x * blockDim.x + threadIdx.x) * V;
  if (ch >= d.C) return;
  const int ldx = kLdx ? ld_arg : d.C;  // (d.C itself in conv1d_bwd)
  const int b = blockIdx.z;
  const int ext = d.S + K - 1;
  const int e0 = blockIdx.y * kRunLen, e1 = min(ext, e0 + kRunLen);
  float wk[K][V], b0[V];
#pragma unroll
  for (int v = 0; v < V; ++v) {
#pragma unroll
    for (int j = 0; j < K; ++j) wk[j][v] = w[static_cast<int64_t>(ch + v) * K + j];
    b0[v] = bias != nullptr ? bias[ch + v] : 0.f;
  }
  const bf16* dyb = dy + static_cast<int64_t>(b) * d.S * d.C + ch;
  // du_t for one token t (zero outside [0, S)), from the window win[j] = X_{t+j}.
  auto du_of = [&](int t, const float (&win)[K][V], float (&g)[V]) {
    LoadV<V>(dyb + static_cast<int64_t>(min(max(t, 0), d.S - 1)) * d.C, g);
    const bool valid = t >= 0 && t < d.S;
#pragma unroll
    for (int v = 0; v < V; ++v) {
      if (silu) {
        float u = b0[v];
#pragma unroll
        for (int j = 0; j < K; ++j) u += wk[j][v] * win[j][v];
        const float sg = SigmoidF(u);
        g[v] *= sg * (1.f + u * (1.f - sg));
      }
      g[v] = valid ? g[v] : 0.f;
    }
  };
  float win[K][V];  // win[j] = X_{t+j}
  float du[K][V];   // du[j] = du_{t−(K−1)+j}, du[K−1] = du_t
#pragma unroll
  for (int j = 0; j < K; ++j)
#pragma unroll
    for (int v = 0; v < V; ++v) du[j][v] = 0.f;
  const int tstart = e0 - (K - 1);
#pragma unroll
  for (int j = 0; j < K - 1; ++j) XExtClamped<K, V>(d, x, init, b, ch, tstart + j, win[j + 1]);
  // Prologue: t in [e0 − (K−1), e0): du only (these ∂X outputs belong to the previous run).
#pragma unroll
  for (int i = 0; i < K - 1; ++i) {
    const int t = tstart + i;
#pragma unroll
    for (int j = 0; j < K - 1; ++j)
#pragma unroll
      for (int v = 0; v < V; ++v) {
        win[j][v] = win[j + 1][v];
        du[j][v] = du[j + 1][v];
      }
    XExtClamped<K, V>(d, x, init, b, ch, t + K - 1, win[K - 1]);
    du_of(t, win, du[K - 1]);
  }
  float dw_acc[K][V], db_acc[V];
#pragma unroll
  for (int v = 0; v < V; ++v) {
    db_acc[v] = 0.f;
#pragma unroll
    for (int j = 0; j < K; ++j) dw_acc[j][v] = 0.f;
  }
  // One output token; kEdge: the run touches the state rows (e < K−1) or the final-state
  // gradient (e >= S). Interior runs (all but the first and last per row) take the branch-free
  // instantiation, so nothing in the unrolled body stops the loads from being issued early.
  auto step = [&](int t, auto edge) {
    constexpr bool kEdge = decltype(edge)::value;
#pragma unroll
    for (int j = 0; j < K - 1; ++j)
#pragma unroll
      for (int v = 0; v < V; ++v) {
        win[j][v] = win[j + 1][v];
        du[j][v] = du[j + 1][v];
      }
    XExtClamped<K, V>(d, x, init, b, ch, t + K - 1, win[K - 1]);
    float g[V];
    du_of(t, win, g);
#pragma unroll
    for (int v = 0; v < V; ++v) {
#pragma unroll
      for (int j = 0; j < K; ++j) dw_acc[j][v] += g[v] * win[j][v];
      db_acc[v] += g[v];
      du[K - 1][v] = g[v];
    }
    // ∂X_e for e = t: Σ_j w_j du_{t−j} = Σ_j w_j du[K−1−j].
    const int e = t;
    float o[V];
#pragma unroll
    for (int v = 0; v < V; ++v) {
      o[v] = 0.f;
#pragma unroll
      for (int j = 0; j < K; ++j) o[v] += wk[j][v] * du[K - 1 - j][v];
    }
    if constexpr (kEdge) {
      if (e >= d.S && d_final != nullptr) {
        float f[V];
        LoadV<V>(d_final + (static_cast<int64_t>(b) * (K - 1) + (e - d.S)) * d.C + ch, f);
#pragma unroll
        for (int v = 0; v < V; ++v) o[v] += f[v];
      }
      if (e < K - 1) {
        if (d_init != nullptr) StoreV<V>(d_init + (static_cast<int64_t>(b) * (K - 1) + e) * d.C + ch, o);
        return;
      }
    }
    StoreV<V>(dx + (static_cast<int64_t>(b) * d.S + (e - (K - 1))) * ldx + ch, o);
  };
  // kSplit: [e0, ia) state tokens (run 0 only), [ia, ib) interior, [ib, e1) final-state tokens.
  // The interior loop's tokens are [ia, ib): the whole run by default (interior runs only).
  int ia = e0, ib = e1;
  if constexpr (kSplit) {
    // (plain comparisons, not min / max: more calls of those in the module perturbed the default
    // kernels' inlining and PTX)
    ia = e0 > K - 1 ? e0 : K - 1;
    ia = ia < e1 ? ia : e1;
    ib = e1 < d.S ? e1 : d.S;
    ib = ib > ia ? ib : ia;
    for (int t = e0; t < ia; ++t) step(t, std::true_type{});
  }
  if ((e0 >= K - 1 && e1 <= d.S) || (kSplit && ia < ib)) {
    // Interior run: X_{t+K−1} is x row t and every dy row is valid.
    const bf16* __restrict__ xrow = x + (static_cast<int64_t>(b) * d.S) * d.C + ch;
    bf16* __restrict__ dxrow = dx + static_cast<int64_t>(b) * d.S * ldx + ch;  // row t − (K−1)
    // One token from its x row (X_{t+K−1}) and dy row.
    auto token = [&](int t, const float (&xn)[V], const float (&gy)[V]) {
#pragma unroll
      for (int j = 0; j < K - 1; ++j)
#pragma unroll
        for (int v = 0; v < V; ++v) {
          win[j][v] = win[j + 1][v];
          du[j][v] = du[j + 1][v];
        }
#pragma unroll
      for (int v = 0; v < V; ++v) win[K - 1][v] = xn[v];
      float o[V];
#pragma unroll
      for (int v = 0; v < V; ++v) {
        float g = gy[v];
        if (silu) {
          float u = b0[v];
#pragma unroll
          for (int j = 0; j < K; ++j) u += wk[j][v] * win[j][v];
          const float sg = SigmoidF(u);
          g *= sg * (1.f + u * (1.f - sg));
        }
#pragma unroll
        for (int j = 0; j < K; ++j) dw_acc[j][v] += g * win[j][v];
        db_acc[v] += g;
        du[K - 1][v] = g;
        o[v] = 0.f;
#pragma unroll
        for (int j = 0; j < K; ++j) o[v] += wk[j][v] * du[K - 1 - j][v];
      }
      StoreV<V>(dxrow + static_cast<int64_t>(t - (K - 1)) * ldx, o);
    };
    int t = ia;
    if constexpr (V >= 2) {
      // The x and dy rows travel by cp.async through a per-thread shared ring kBwdAhead − 1
      // tokens ahead of the arithmetic: bytes in flight without registers. (Register batches of
      // 4 tokens — 124 registers, 16 warps per SM, no overlap between batches — ran at 1.7 TB/s
      // on an H200; batches of 8 slower still.)
      const int tid = threadIdx.x;
      auto issue = [&](int tt) {  // one commit group per token (empty past the run)
        if (tt < ib) {
          CpAsync<2 * V>(&ring[tt % kAhead][0][tid], xrow + static_cast<int64_t>(tt) * d.C);
          CpAsync<2 * V>(&ring[tt % kAhead][1][tid], dyb + static_cast<int64_t>(tt) * d.C);
        }
        CpAsyncCommit();
      };
#pragma unroll
      for (int i = 0; i < kAhead - 1; ++i) issue(ia + i);
#pragma unroll 4
      for (; t < ib; ++t) {
        issue(t + kAhead - 1);
        CpAsyncWait<kAhead - 1>();
        float xn[V], gy[V];
        FromRaw<V>(ring[t % kAhead][0][tid], xn);
        FromRaw<V>(ring[t % kAhead][1][tid], gy);
        token(t, xn, gy);
      }
      CpAsyncWait<0>();
    } else {
      // Scalar channels (2-byte rows: below cp.async's 4): kBatch tokens' loads issued together.
      constexpr int kBatch = 4;
      for (; t + kBatch <= ib; t += kBatch) {
        float xn[kBatch][V], gy[kBatch][V];
#pragma unroll
        for (int i = 0; i < kBatch; ++i) {
          LoadV<V>(xrow + static_cast<int64_t>(t + i) * d.C, xn[i]);
          LoadV<V>(dyb + static_cast<int64_t>(t + i) * d.C, gy[i]);
        }
#pragma unroll
        for (int i = 0; i < kBatch; ++i) token(t + i, xn[i], gy[i]);
      }
    }
    for (; t < ib; ++t) step(t, std::false_type{});
  } else if constexpr (!kSplit) {
#pragma unroll 2
    for (int t = e0; t < e1; ++t) step(t, std::true_type{});
  }
  if constexpr (kSplit) {
    for (int t = ib; t < e1; ++t) step(t, std::true_type{});
  }
#pragma unroll
  for (int v = 0; v < V; ++v) {
    float* pp = part + ((static_cast<int64_t>(b) * gridDim.y + blockIdx.y) * d.C + ch + v) * (K + 1);
#pragma unroll
    for (int j = 0; j < K; ++j) pp[j] = dw_acc[j][v];
    pp[K] = db_acc[v];
  }
}

template <int K, int V, int kMinBlocks = 5, int kAhead = kBwdAhead, int kRunLen = kRun, bool kSplit = false>
__global__ void __launch_bounds__(kBlock, kMinBlocks) conv1d_bwd(
    ConvDims d, bool silu, const bf16* __restrict__ x, const float* __restrict__ w,
    const float* __restrict__ bias, const bf16* __restrict__ init, const bf16* __restrict__ dy,
    const bf16* __restrict__ d_final, bf16* __restrict__ dx, bf16* __restrict__ d_init,
    float* __restrict__ part) {
  if constexpr (V >= 2) {
    __shared__ BwdRaw<V> ring[kAhead][2][kBlock];
    Conv1dBwdRun<K, V, kAhead, kRunLen, kSplit, false>(d, 0, silu, x, w, bias, init, dy, d_final, dx, d_init, part, ring);
  } else {
    Conv1dBwdRun<K, V, kAhead, kRunLen, kSplit, false>(d, 0, silu, x, w, bias, init, dy, d_final, dx, d_init, part,
                                                nullptr);
  }
}

// conv1d_bwd with dx rows of ldx elements (Conv1dBackwardArgs::dx_row_stride).
template <int K, int V, int kMinBlocks = 5, int kAhead = kBwdAhead, int kRunLen = kRun, bool kSplit = false>
__global__ void __launch_bounds__(kBlock, kMinBlocks) conv1d_bwd_ldx(
    ConvDims d, int ldx, bool silu, const bf16* __restrict__ x, const float* __restrict__ w,
    const float* __restrict__ bias, const bf16* __restrict__ init, const bf16* __restrict__ dy,
    const bf16* __restrict__ d_final, bf16* __restrict__ dx, bf16* __restrict__ d_init,
    float* __restrict__ part) {
  if constexpr (V >= 2) {
    __shared__ BwdRaw<V> ring[kAhead][2][kBlock];
    Conv1dBwdRun<K, V, kAhead, kRunLen, kSplit, true>(d, ldx, silu, x, w, bias, init, dy, d_final, dx, d_init, part, ring);
  } else {
    Conv1dBwdRun<K, V, kAhead, kRunLen, kSplit, true>(d, ldx, silu, x, w, bias, init, dy, d_final, dx, d_init, part,
                                                nullptr);
  }
}

// Block of 256 threads = 8 warps over 32 consecutive (channel, j ≤ K) entries: warp w sums rows
// w, w + 8, ... (coalesced 128-byte rows, 8 warps' loads in flight), then lane sums of the 8
// warps in a fixed order are accumulated into dw / dbias, or stored there with `overwrite`
// (deterministic either way). (One thread per entry
// walking all B·runs rows serially left the backward at 0.84 TB/s.)
constexpr int kReduceWarps = 8;
__global__ void __launch_bounds__(32 * kReduceWarps) conv1d_param_reduce(
    ConvDims d, int rows, bool overwrite, const float* __restrict__ part, float* dw, float* dbias) {
  __shared__ double sums[kReduceWarps][32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t n = static_cast<int64_t>(d.C) * (d.K + 1);
  const int64_t i = static_cast<int64_t>(blockIdx.x) * 32 + lane;
  double s = 0.0;
  if (i < n) {
#pragma unroll 4
    for (int r = warp; r < rows; r += kReduceWarps) s += part[static_cast<int64_t>(r) * n + i];
  }
  sums[warp][lane] = s;
  __syncthreads();
  if (warp != 0 || i >= n) return;
  double total = 0.0;
  for (int w = 0; w < kReduceWarps; ++w) total += sums[w][lane];
  const int ch = static_cast<int>(i / (d.K + 1)), j = static_cast<int>(i % (d.K + 1));
  float* out = j < d.K ? dw + static_cast<int64_t>(ch) * d.K + j : dbias != nullptr ? dbias + ch : nullptr;
  if (out != nullptr) *out = static_cast<float>(total) + (overwrite ? 0.f : *out);
}

// Channels per thread: 4 (or 2) when C is a multiple of it and every bf16 tensor is aligned to
// that many elements (each row then starts aligned too), else 1.
int Conv1dVec(const ConvDims& d, std::initializer_list<const void*> ptrs) {
  auto ok = [&](int v) {
    if (d.C % v != 0) return false;
    for (const void* p : ptrs) {
      if (p != nullptr && reinterpret_cast<uintptr_t>(p) % (2 * v) != 0) return false;
    }
    return true;
  };
  return ok(4) ? 4 : ok(2) ? 2 : 1;
}

// Threads per block over the channel axis: 128, or 64 where that leaves fewer threads without a
// channel group (C/V = 448 at Mamba-2 130m's 1792 conv channels: 4 blocks of 128 leave 64 of 512
// threads, 12.5%, idle in every run; 7 blocks of 64 leave none). Same registers per warp, so the
// same 16 warps per SM at 124 registers; the blocks are only smaller.
int ConvBlockThreads(const ConvDims& d, int vec) {
  const int64_t groups = CeilDiv(d.C, vec);
  const int64_t idle128 = CeilDiv(groups, 128) * 128 - groups, idle64 = CeilDiv(groups, 64) * 64 - groups;
  return idle64 < idle128 ? 64 : kBlock;
}

// f(integral_constant K, integral_constant V) for K in 1..4 and V in {1, 2, 4}.
template <typename F>
void LaunchByWidth(int k, int vec, F&& f) {
  auto by_v = [&](auto kc) {
    if (vec == 4) {
      f(kc, std::integral_constant<int, 4>{});
    } else if (vec == 2) {
      f(kc, std::integral_constant<int, 2>{});
    } else {
      f(kc, std::integral_constant<int, 1>{});
    }
  };
  switch (k) {
    case 1: by_v(std::integral_constant<int, 1>{}); break;
    case 2: by_v(std::integral_constant<int, 2>{}); break;
    case 3: by_v(std::integral_constant<int, 3>{}); break;
    default: by_v(std::integral_constant<int, 4>{}); break;
  }
}

ConvDims MakeConvDims(const Conv1dShape& s) {
  return {static_cast<int>(s.batch), static_cast<int>(s.seq_len), static_cast<int>(s.channels),
          static_cast<int>(s.width)};
}

}  // namespace

CudaResult Conv1dCheck(const Conv1dShape& s) {
  if (s.batch < 1 || s.seq_len < 1 || s.channels < 1) {
    return InvalidArgument("conv1d: batch, seq_len, channels must be >= 1");
  }
  if (s.width < 1 || s.width > 4) return InvalidArgument("conv1d (cuda): width must be 1..4");
  if (s.batch > 65535 || s.seq_len > (1 << 30) || s.channels > (1 << 30)) {
    return InvalidArgument("conv1d (cuda): shape beyond the launch grid");
  }
  return {};
}

CudaResult Conv1dForward(const Conv1dForwardArgs& a, cudaStream_t stream) {
  CUDA_RETURN_IF_NOT_OK(Conv1dCheck(a.shape));
  if (!a.x || !a.w || !a.y) return InvalidArgument("conv1d forward: x, w, y are required");
  const ConvDims d = MakeConvDims(a.shape);
  const int vec = Conv1dVec(d, {a.x, a.initial_state, a.y});
  const int threads = ConvBlockThreads(d, vec);
  const dim3 grid(static_cast<unsigned>(CeilDiv(d.C, threads * vec)),
                  static_cast<unsigned>(CeilDiv(d.S, kRun)), d.B);
  LaunchByWidth(d.K, vec, [&](auto k, auto v) {
    conv1d_fwd<decltype(k)::value, decltype(v)::value><<<grid, threads, 0, stream>>>(
        d, a.options.silu, a.x, a.w, a.bias, a.initial_state, a.y);
  });
  CUDA_RETURN_IF_LAUNCH_ERROR("conv1d_fwd");
  if (a.final_state != nullptr && d.K > 1) {
    const int64_t n = static_cast<int64_t>(d.B) * (d.K - 1) * d.C;
    conv1d_final_state<<<static_cast<unsigned>(std::min<int64_t>(CeilDiv(n, 256), 4096)), 256, 0,
                         stream>>>(d, a.x, a.initial_state, a.final_state);
    CUDA_RETURN_IF_LAUNCH_ERROR("conv1d_final_state");
  }
  return {};
}

// GYRE_CONV_BWD (read once): the conv1d_bwd variant at K = 4, V = 4 (the Mamba-2 and xLSTM
// layouts). Unset or "split" = split (the default since the lead's session-8 call on an H100:
// conv1d_bench backward at the step shapes B16 S2048 C1536 / C1792 0.178 -> 0.141 / 0.199 ->
// 0.163 ms, same bits); "r128" = a candidate (0.136 / 0.160 there, but it changes the dw
// grouping). Any other value is an error (Conv1dBackward).
//   split  (kBlock, 4) launch bounds (109 registers, no spill) + the first / last run's interior
//          tokens through the ring (kSplit)
//   r128   split + runs of 128 tokens and a 16-token ring (half the halo re-reads and dw
//          partials, twice the bytes in flight per thread; 32 KiB a block)
// Other shapes (K < 4 or fewer than 4 channels a thread) take the (kBlock, 5) kernel.
enum class ConvBwdVariant { kSplit, kRun128, kUnknown };
ConvBwdVariant ConvBwdVariantFromEnv() {
  static const ConvBwdVariant v = [] {
    const char* e = std::getenv("GYRE_CONV_BWD");
    const std::string s = e != nullptr ? e : "split";
    if (s == "split") return ConvBwdVariant::kSplit;
    if (s == "r128") return ConvBwdVariant::kRun128;
    return ConvBwdVariant::kUnknown;
  }();
  return v;
}

CudaResult Conv1dBackward(const Conv1dBackwardArgs& a, DeviceAllocator* scratch,
                          cudaStream_t stream) {
  CUDA_RETURN_IF_NOT_OK(Conv1dCheck(a.shape));
  if (!a.x || !a.w || !a.dy || !a.dx || !a.dw || scratch == nullptr) {
    return InvalidArgument("conv1d backward: x, w, dy, dx, dw and scratch are required");
  }
  const ConvDims d = MakeConvDims(a.shape);
  const bf16* df = d.K > 1 ? a.d_final_state : nullptr;
  bf16* di = d.K > 1 ? a.d_initial_state : nullptr;
  const int64_t ldx = a.dx_row_stride == 0 ? a.shape.channels : a.dx_row_stride;
  if (ldx < a.shape.channels || ldx > (1 << 30)) {
    return InvalidArgument("conv1d backward: dx_row_stride must be 0 or channels..2^30");
  }
  const bool strided = ldx != a.shape.channels;
  int vec = Conv1dVec(d, {a.x, a.initial_state, a.dy, df, a.dx, di});
  if (ldx % vec != 0) vec = ldx % 2 == 0 ? 2 : 1;  // (vec 2 then passes Conv1dVec's checks too)
  if (ConvBwdVariantFromEnv() == ConvBwdVariant::kUnknown) {
    return InvalidArgument(std::string("conv1d backward: GYRE_CONV_BWD must be split or r128, got '") +
                           std::getenv("GYRE_CONV_BWD") + "'");
  }
  // The variants serve K = 4 with 4 channels a thread; other shapes take the (kBlock, 5) kernel.
  const bool k4v4 = d.K == 4 && vec == 4;
  const ConvBwdVariant variant = ConvBwdVariantFromEnv();
  const int run_len = k4v4 && variant == ConvBwdVariant::kRun128 ? 128 : kRun;
  const int runs = static_cast<int>(CeilDiv(d.S + d.K - 1, run_len));
  DeviceBuffer part;
  CUDA_RETURN_IF_NOT_OK(scratch->Allocate(
      sizeof(float) * static_cast<size_t>(d.B) * runs * d.C * (d.K + 1), &part));
  const int threads = ConvBlockThreads(d, vec);
  const dim3 grid(static_cast<unsigned>(CeilDiv(d.C, threads * vec)), static_cast<unsigned>(runs),
                  d.B);
  float* pp = part.as<float>();
  auto args = [&](auto kernel) {
    kernel<<<grid, threads, 0, stream>>>(d, a.options.silu, a.x, a.w, a.bias, a.initial_state, a.dy, df, a.dx, di,
                                         pp);
  };
  // dx rows of ldx: the same kernels' conv1d_bwd_ldx twins (the default launches stay as they were).
  auto args_ldx = [&](auto kernel) {
    kernel<<<grid, threads, 0, stream>>>(d, static_cast<int>(ldx), a.options.silu, a.x, a.w, a.bias, a.initial_state,
                                         a.dy, df, a.dx, di, pp);
  };
  if (strided) {
    if (k4v4) {
      if (variant == ConvBwdVariant::kRun128) args_ldx(conv1d_bwd_ldx<4, 4, 4, 16, 128, true>);
      else args_ldx(conv1d_bwd_ldx<4, 4, 4, kBwdAhead, kRun, true>);
    } else {
      LaunchByWidth(d.K, vec, [&](auto k, auto v) {
        constexpr int kK = decltype(k)::value, kV = decltype(v)::value;
        if constexpr (kK != 4 || kV != 4) args_ldx(conv1d_bwd_ldx<kK, kV>);
      });
    }
  } else if (k4v4) {
    switch (variant) {
      case ConvBwdVariant::kUnknown: break;  // (rejected above)
      case ConvBwdVariant::kSplit: args(conv1d_bwd<4, 4, 4, kBwdAhead, kRun, true>); break;
      case ConvBwdVariant::kRun128: args(conv1d_bwd<4, 4, 4, 16, 128, true>); break;
    }
  } else {
    LaunchByWidth(d.K, vec, [&](auto k, auto v) {
      constexpr int kK = decltype(k)::value, kV = decltype(v)::value;
      if constexpr (kK != 4 || kV != 4) {  // (K = 4, V = 4 took a variant above)
        conv1d_bwd<kK, kV><<<grid, threads, 0, stream>>>(d, a.options.silu, a.x, a.w, a.bias, a.initial_state, a.dy,
                                                        df, a.dx, di, pp);
      }
    });
  }
  CUDA_RETURN_IF_LAUNCH_ERROR("conv1d_bwd");
  const int64_t n = static_cast<int64_t>(d.C) * (d.K + 1);
  conv1d_param_reduce<<<static_cast<unsigned>(CeilDiv(n, 32)), 32 * kReduceWarps, 0, stream>>>(
      d, d.B * runs, a.overwrite_dparams, pp, a.dw, a.dbias);
  CUDA_RETURN_IF_LAUNCH_ERROR("conv1d_param_reduce");
  return {};
}

}  // namespace gyre::cuda
