// sLSTM forward and backward through time as persistent kernels; contract in slstm.h, math in
// kernels/cpu/slstm.h (this file mirrors that reference line by line in the pointwise parts).
//
// Why persistent: the recurrence is sequential (h_{t−1} feeds R), and per step the work is
// small (1.3B layout, B 8: 8 × 2048 rows × 512 = 67 MFLOP over 4 heads). The official xlstm
// kernel launches a GEMM and a pointwise kernel per step and pays launch + sync for each
// (21.6-24 µs per step fwd+bwd on an H200, measured beside ours). Here one launch covers all S
// steps. Three cluster flavours and one flag kernel, all tested; SlstmAlgorithm::kAuto runs
// kClusterAsyncFast where a cluster kernel can run, else the flag kernel:
//
// Cluster kernels (details above SlstmFwdClusterKernel):
//   * One thread-block cluster per (head, 8 batch rows): C = dh/U CTAs of U = 32 units (16 where
//     dh is not a multiple of 32); 1.3B: clusters of 16, 125M: clusters of 6. A CTA owns its
//     units' four gate rows of R (forward) or a 4dh × U / 4U × dh slice of Rᵀ (backward) as
//     mma.sync A fragments in registers for all S steps (64 registers a thread at dh 512: the
//     8 MB of the 1.3B layout's R live in 64 SMs' register files), and its units' state (c, n, m)
//     in registers, one thread per (row, unit).
//   * Forward step: bf16 m16n8k16 MMAs read h_{t−1} from the CTA's own shared memory, the warps'
//     K-partials are summed through shared memory, the fused pointwise update runs, and the CTA's
//     slice of h_t goes to all C CTAs' next buffer with 16-byte DSMEM stores.
//   * kCluster ends each step with one cluster barrier; kClusterAsync instead counts the stores'
//     bytes on an mbarrier in the receiver (st.async ... complete_tx) and waits on its phase.
//   * kClusterAsyncFast (kAuto): kClusterAsync's exchange; the forward loads gx two steps ahead,
//     runs four MMA accumulator chains and the Fast* pointwise math; the backward is
//     SlstmBwdPartialKernel: each CTA multiplies its own units' dG_t by its 4U × dh slice of R and
//     sends fp32 partial dh_{t−1} stripes to their owners, which sum C of them (half the DSMEM
//     bytes of exchanging dG, no K-partial reduction, one __syncthreads a step).
//   Heads never wait on each other; clusters need no co-residency beyond themselves.
// Flag kernels (fallback for head_dim the clusters cannot split, and a cross-check):
//   * One CTA per (head, 16 units, up to 16 batch rows), all co-resident (cooperative launch);
//     h_{t−1} / dG_{t+1} are read from the output arrays in L2 (ld.global.cg), and each CTA
//     publishes its step with a release flag that the head's other CTAs poll (ld.acquire.gpu).
// All: the backward writes dG_t (= d gx_t, exactly) and forms dh_{t−1} = dG_t R from it; dR is
// not accumulated in the time loop: dR = Σ_{b,t} dG_tᵀ h_{t−1} is one cuBLASLt product per
// (head, gate) over all B·S rows afterwards (137 GFLOP at 1.3B, measured 0.4 ms incl. the shifted
// copy of h), off the sequential path.
//
// Where a step's time goes (H200, 2026-11-26; bench/RESULTS.md and slstm_notes.md): 1.3B
// kCluster 3.0 µs/step forward, 5.4 backward; kClusterAsync 2.7 / 4.0; kClusterAsyncFast 2.6 /
// 2.9. The DSMEM exchange alone (SlstmExchangeProbe, clusters of 16) costs 0.56 µs a step with
// st.async + mbarrier at the forward's 512 B a destination (0.86 with the cluster barrier), 0.80
// at the partial backward's 1 KB, 1.42 at kCluster's backward 2 KB. The phase trace of the fast
// kernels (SlstmForwardArgs::debug_trace) puts ~0.9 µs (forward) and ~1.3 µs (backward) of
// each step in the pointwise phase, whose math is ~0.1 µs: most likely the next step's HBM
// prefetch is consumed (bf16 → fp32 conversion, register moves) right after it is issued, so
// each step waits one HBM latency. slstm_notes.md has the next steps.
//
// Saved for backward (fp32, batch-major): per (b, t) the 4 pre-activations and c_t, n_t, m_t
// (28·d bytes per token: 0.94 GB at B 8, S 2048, d 2048).
#include "kernels/cuda/slstm.h"

#include <cuda_bf16.h>

#include <algorithm>
#include <string>

#include "kernels/cuda/cuda_check.h"

namespace gyre::cuda {
namespace {

constexpr int kUnits = 16;  // units per CTA (one MMA m-tile per gate)
constexpr int kWarps = 8;   // warps per CTA, splitting K
constexpr int kThreads = kWarps * 32;
constexpr int kRedStride = 20;  // padded row of the K-partial buffer (bank-conflict free stores)
constexpr int kSavedRows = 7;   // i, f, z, o pre-activations, c, n, m
constexpr int kMaxHeadDim = 512;

struct FwdParams {
  int batch, seq_len, num_heads, head_dim;
  int batch0;  // first batch row of this launch
  const __nv_bfloat16* gx;
  const __nv_bfloat16* r;
  const float *h0, *c0, *n0, *m0;  // null h0: zeros
  __nv_bfloat16* h;
  float* saved;              // may be null
  float *hT, *cT, *nT, *mT;  // null hT: not wanted
  unsigned* flags;           // [gridDim.y][NH][32]
  long long* trace;          // SlstmForwardArgs::debug_trace
};

struct BwdParams {
  int batch, seq_len, num_heads, head_dim;
  int batch0;
  const __nv_bfloat16* r;
  const float *c0, *n0, *m0;  // the initial state (h0 not needed here); null c0: zeros
  const float* saved;
  const __nv_bfloat16* dh;
  const float *dhT, *dcT, *dnT, *dmT;  // null dhT: zero
  __nv_bfloat16* d_gx;
  float *dh0, *dc0, *dn0, *dm0;  // null dh0: not wanted
  unsigned* flags;
  long long* trace;  // SlstmBackwardArgs::debug_trace
};

// ------------------------------------------------------------------ device helpers

__device__ __forceinline__ void Mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t LoadCgU32(const __nv_bfloat16* p) {
  return __ldcg(reinterpret_cast<const unsigned int*>(p));
}
__device__ __forceinline__ uint32_t LoadU32(const __nv_bfloat16* p) {
  return __ldg(reinterpret_cast<const unsigned int*>(p));
}
// A bf16 as raw bits (converted only where used: Bf16BitsToFloat).
__device__ __forceinline__ unsigned short LoadBits16(const __nv_bfloat16* p) {
  return __ldg(reinterpret_cast<const unsigned short*>(p));
}
__device__ __forceinline__ float Bf16BitsToFloat(unsigned short bits) {
  return __uint_as_float(static_cast<uint32_t>(bits) << 16);
}
__device__ __forceinline__ uint32_t PackBf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
__device__ __forceinline__ uint32_t PackBf16Bits(__nv_bfloat16 lo, __nv_bfloat16 hi) {
  return static_cast<uint32_t>(__bfloat16_as_ushort(lo)) |
         (static_cast<uint32_t>(__bfloat16_as_ushort(hi)) << 16);
}

__device__ __forceinline__ unsigned LoadAcquire(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void StoreRelease(unsigned* p, unsigned v) {
  asm volatile("st.release.gpu.global.u32 [%0], %1;\n" ::"l"(p), "r"(v) : "memory");
}

// Waits until every one of the `count` CTAs of this head has published a step >= target.
// Called by all threads; warp 0 polls, the rest wait at the barrier.
__device__ __forceinline__ void WaitHead(const unsigned* head_flags, int count, unsigned target) {
  if (threadIdx.x < 32) {
    if (static_cast<int>(threadIdx.x) < count) {
      while (LoadAcquire(head_flags + threadIdx.x) < target) {
      }
    }
    __threadfence();
    __syncwarp();
  }
  __syncthreads();
}

// Publishes this CTA's step after all its threads' global stores (the pattern of a grid barrier:
// block barrier, then one thread's fence and release store).
__device__ __forceinline__ void Publish(unsigned* my_flag, unsigned value) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    StoreRelease(my_flag, value);
  }
}

__device__ __forceinline__ float Sigmoid(float x) {
  if (x >= 0.f) return 1.f / (1.f + expf(-x));
  const float e = expf(x);
  return e / (1.f + e);
}
__device__ __forceinline__ float LogSigmoid(float x) {
  return x < 0.f ? x - log1pf(expf(x)) : -log1pf(expf(-x));
}

// Shorter-latency versions for the kClusterAsyncFast kernels (the pointwise chain is on the
// per-step critical path): ex2.approx-based exp (2 ulp), lg2.approx-based log of 1 + e (absolute
// error ~1e-7; only |LogSigmoid| >= ~1e-7 matters next to m), and divisions whose denominators
// are bounded (1 + e in [1, 2]; n >= min(n0, 1) > 0). Errors stay far below the bf16 rounding of h
// and d_gx.
__device__ __forceinline__ float FastSigmoid(float x) {
  if (x >= 0.f) return __fdividef(1.f, 1.f + __expf(-x));
  const float e = __expf(x);
  return __fdividef(e, 1.f + e);
}
__device__ __forceinline__ float FastLogSigmoid(float x) {
  return x < 0.f ? x - __logf(1.f + __expf(x)) : -__logf(1.f + __expf(-x));
}
__device__ __forceinline__ float FastTanh(float x) {  // tanh.approx: max relative error 2^-11
  float y;
  asm("tanh.approx.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// One unit's sLSTM cell backward at a step (kernels/cpu/slstm.cc slstm_bwd_ref), shared by the
// cluster and partial backward kernels (SlstmBwdKernel keeps its copy, see there): from the
// pre-activations (i, f, z, o), the state before the step (cp, np, mp), the step's c_t, n_t, the
// incoming gradient gh + dh_in and the carried gc, gn, gm: the pre-activation gradients d_i, d_f,
// d_z, d_o, and g_c, g_n, fp, g_lf, from which the caller carries gc = g_c·fp, gn = g_n·fp,
// gm = g_lf to the step before (after its stores, as before the fold). kFast: the partial
// kernel's __expf and tanh.approx-based sigmoids (tanh stays precise: d_z uses 1 − tz², which
// cancels near |tz| = 1).
struct CellGrad {
  float d_i, d_f, d_z, d_o;
  float g_c, g_n, fp, g_lf;
};
template <bool kFast>
__device__ __forceinline__ CellGrad CellBackward(const float (&pre)[4], float cp, float np, float mp, float c_t,
                                                 float n_t, float gh, float dh_in, float gc, float gn, float gm) {
  const float i_raw = pre[0], f_raw = pre[1], z_raw = pre[2], o_raw = pre[3];
  const float lf = (kFast ? FastLogSigmoid(f_raw) : LogSigmoid(f_raw)) + mp;
  const bool from_input = np == 0.f || i_raw >= lf;
  const float m_new = from_input ? i_raw : lf;
  const float ip = from_input ? 1.f : fminf(kFast ? __expf(i_raw - m_new) : expf(i_raw - m_new), 1.f);
  const float fp = from_input ? fminf(kFast ? __expf(lf - m_new) : expf(lf - m_new), 1.f) : 1.f;
  const float tz = tanhf(z_raw);
  const float so = kFast ? FastSigmoid(o_raw) : Sigmoid(o_raw);
  const float g_h = gh + dh_in;
  CellGrad r;
  r.d_o = g_h * (c_t / n_t) * so * (1.f - so);
  r.g_c = gc + g_h * so / n_t;
  r.g_n = gn - g_h * so * c_t / (n_t * n_t);
  const float g_fp = r.g_c * cp + r.g_n * np;
  const float g_ip = r.g_c * tz + r.g_n;
  r.d_z = r.g_c * ip * (1.f - tz * tz);
  r.d_i = g_ip * ip;
  r.g_lf = g_fp * fp;
  const float g_m = gm - g_ip * ip - g_fp * fp;
  if (from_input) {
    r.d_i += g_m;
  } else {
    r.g_lf += g_m;
  }
  r.d_f = r.g_lf * (kFast ? FastSigmoid(-f_raw) : Sigmoid(-f_raw));
  r.fp = fp;
  return r;
}

// ------------------------------------------------------------------ forward

// NT: MMA n-tiles of 8 batch rows (batch slice 8·NT); KF: K-tiles (of 16) per warp.
template <int NT, int KF>
__global__ void __launch_bounds__(kThreads, 1) SlstmFwdKernel(FwdParams p) {
  constexpr int kSlice = 8 * NT;
  __shared__ float red[kWarps][4][kSlice][kRedStride];

  const int dh = p.head_dim, d = p.num_heads * dh, S = p.seq_len;
  const int blocks_per_head = dh / kUnits;
  const int hd = blockIdx.x / blocks_per_head;
  const int u0 = (blockIdx.x % blocks_per_head) * kUnits;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int group = lane / 4, quad = lane % 4;
  const int nk = dh / 16;
  const int b_first = p.batch0 + blockIdx.y * kSlice;
  const int nb = min(kSlice, p.batch - b_first);
  unsigned* head_flags = p.flags + (blockIdx.y * p.num_heads + hd) * 32;

  // R rows of this CTA as A fragments: a[g][kk] covers rows u0..u0+15 of gate g, K-tile
  // kt = warp + 8·kk.
  uint32_t a[4][KF][4];
#pragma unroll
  for (int g = 0; g < 4; ++g) {
#pragma unroll
    for (int kk = 0; kk < KF; ++kk) {
      const int kt = warp + kWarps * kk;
      if (kt < nk) {
        const __nv_bfloat16* rg = p.r + (static_cast<int64_t>(hd) * 4 + g) * dh * dh;
        const int col = kt * 16 + quad * 2;
        const __nv_bfloat16* r0 = rg + static_cast<int64_t>(u0 + group) * dh + col;
        const __nv_bfloat16* r8 = r0 + 8 * dh;
        a[g][kk][0] = LoadU32(r0);
        a[g][kk][1] = LoadU32(r8);
        a[g][kk][2] = LoadU32(r0 + 8);
        a[g][kk][3] = LoadU32(r8 + 8);
      } else {
        a[g][kk][0] = a[g][kk][1] = a[g][kk][2] = a[g][kk][3] = 0u;
      }
    }
  }

  // Pointwise thread: batch row bl of the slice, unit u of the block.
  const int bl = threadIdx.x / kUnits, u = threadIdx.x % kUnits;
  const bool active = threadIdx.x < kSlice * kUnits && bl < nb;
  const int b = b_first + bl;
  const int col = hd * dh + u0 + u;
  float c = 0.f, n = 0.f, m = 0.f, h_last = 0.f;
  if (active && p.h0 != nullptr) {
    const int64_t i = static_cast<int64_t>(b) * d + col;
    c = p.c0[i];
    n = p.n0[i];
    m = p.m0[i];
    h_last = p.h0[i];
  }
  float gxv[4] = {0.f, 0.f, 0.f, 0.f};
  if (active) {
    const __nv_bfloat16* gp = p.gx + static_cast<int64_t>(b) * S * 4 * d + col;
#pragma unroll
    for (int g = 0; g < 4; ++g) gxv[g] = __bfloat162float(gp[g * d]);
  }

  for (int t = 0; t < S; ++t) {
    if (t > 0) WaitHead(head_flags, blocks_per_head, static_cast<unsigned>(t));

    // B fragments: h_{t−1} of this head (bf16; at t = 0 the fp32 initial state, rounded).
    uint32_t bf[KF][NT][2];
#pragma unroll
    for (int kk = 0; kk < KF; ++kk) {
      const int kt = warp + kWarps * kk;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const int nrow = nt * 8 + group;
        bf[kk][nt][0] = bf[kk][nt][1] = 0u;
        if (kt < nk && nrow < nb) {
          const int k = hd * dh + kt * 16 + quad * 2;
          const int64_t brow = b_first + nrow;
          if (t > 0) {
            const __nv_bfloat16* hp = p.h + (brow * S + (t - 1)) * d + k;
            bf[kk][nt][0] = LoadCgU32(hp);
            bf[kk][nt][1] = LoadCgU32(hp + 8);
          } else if (p.h0 != nullptr) {
            const float* hp = p.h0 + brow * d + k;
            bf[kk][nt][0] = PackBf16(hp[0], hp[1]);
            bf[kk][nt][1] = PackBf16(hp[8], hp[9]);
          }
        }
      }
    }
    float acc[4][NT][4];
#pragma unroll
    for (int g = 0; g < 4; ++g)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
        acc[g][nt][0] = acc[g][nt][1] = acc[g][nt][2] = acc[g][nt][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < KF; ++kk)
#pragma unroll
      for (int g = 0; g < 4; ++g)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
          Mma16816(acc[g][nt], a[g][kk], bf[kk][nt][0], bf[kk][nt][1]);
    // K-partials: red[warp][g][batch][unit].
#pragma unroll
    for (int g = 0; g < 4; ++g)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const int bc = nt * 8 + quad * 2;
        red[warp][g][bc][group] = acc[g][nt][0];
        red[warp][g][bc + 1][group] = acc[g][nt][1];
        red[warp][g][bc][group + 8] = acc[g][nt][2];
        red[warp][g][bc + 1][group + 8] = acc[g][nt][3];
      }
    __syncthreads();

    if (active) {
      float pre[4];
#pragma unroll
      for (int g = 0; g < 4; ++g) {
        float s = gxv[g];
#pragma unroll
        for (int w = 0; w < kWarps; ++w) s += red[w][g][bl][u];
        pre[g] = s;
      }
      // Pointwise (kernels/cpu/slstm.cc Pointwise).
      const float lf = LogSigmoid(pre[1]) + m;
      const bool from_input = n == 0.f || pre[0] >= lf;
      const float m_new = from_input ? pre[0] : lf;
      const float ip = from_input ? 1.f : fminf(expf(pre[0] - m_new), 1.f);
      const float fp = from_input ? fminf(expf(lf - m_new), 1.f) : 1.f;
      c = fp * c + ip * tanhf(pre[2]);
      n = fp * n + ip;
      m = m_new;
      h_last = Sigmoid(pre[3]) * c / n;
      const int64_t row = static_cast<int64_t>(b) * S + t;
      p.h[row * d + col] = __float2bfloat16_rn(h_last);
      if (p.saved != nullptr) {
        float* sv = p.saved + row * kSavedRows * d + col;
#pragma unroll
        for (int g = 0; g < 4; ++g) sv[g * d] = pre[g];
        sv[4 * d] = c;
        sv[5 * d] = n;
        sv[6 * d] = m;
      }
      if (t + 1 < S) {  // prefetch the next step's input pre-activations
        const __nv_bfloat16* gp = p.gx + (row + 1) * 4 * d + col;
#pragma unroll
        for (int g = 0; g < 4; ++g) gxv[g] = __bfloat162float(gp[g * d]);
      }
    }
    Publish(head_flags + blockIdx.x % blocks_per_head, static_cast<unsigned>(t + 1));
  }

  if (active && p.hT != nullptr) {
    const int64_t i = static_cast<int64_t>(b) * d + col;
    p.hT[i] = h_last;
    p.cT[i] = c;
    p.nT[i] = n;
    p.mT[i] = m;
  }
}

// ------------------------------------------------------------------ backward

// The backward's loads of one (row b, unit col) at step t: the saved pre-activations and the
// incoming dh, and the state before the step (the saved c, n, m of step t − 1, the initial state
// at t = 0, or zeros). sd: floats of one saved row (kSavedRows · d).
__device__ __forceinline__ void LoadBwdStep(const BwdParams& p, int b, int col, int S, int d, int64_t sd, int t,
                                            float (&pre)[4], float& dh_in, float& cp, float& np, float& mp) {
  const int64_t row = static_cast<int64_t>(b) * S + t;
  const float* sv = p.saved + row * sd + col;
#pragma unroll
  for (int g = 0; g < 4; ++g) pre[g] = sv[g * d];
  dh_in = __bfloat162float(p.dh[row * d + col]);
  if (t > 0) {
    cp = sv[-sd + 4 * d];
    np = sv[-sd + 5 * d];
    mp = sv[-sd + 6 * d];
  } else if (p.c0 != nullptr) {
    const int64_t i = static_cast<int64_t>(b) * d + col;
    cp = p.c0[i];
    np = p.n0[i];
    mp = p.m0[i];
  } else {
    cp = np = mp = 0.f;
  }
}


// KB: K-tiles (of 16 over the 4·dh gate rows) per warp.
template <int NT, int KB>
__global__ void __launch_bounds__(kThreads, 1) SlstmBwdKernel(BwdParams p) {
  constexpr int kSlice = 8 * NT;
  __shared__ float red[kWarps][kSlice][kRedStride];

  const int dh = p.head_dim, d = p.num_heads * dh, S = p.seq_len;
  const int blocks_per_head = dh / kUnits;
  const int hd = blockIdx.x / blocks_per_head;
  const int u0 = (blockIdx.x % blocks_per_head) * kUnits;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int group = lane / 4, quad = lane % 4;
  const int nk = 4 * dh / 16;
  const int b_first = p.batch0 + blockIdx.y * kSlice;
  const int nb = min(kSlice, p.batch - b_first);
  unsigned* head_flags = p.flags + (blockIdx.y * p.num_heads + hd) * 32;

  // A[m = unit l][k = (g, j)] = R[hd][g][j][u0 + l]: 16 columns of R's 4dh × dh block.
  uint32_t a[KB][4];
#pragma unroll
  for (int kk = 0; kk < KB; ++kk) {
    const int kt = warp + kWarps * kk;
    if (kt < nk) {
      const int k = kt * 16 + quad * 2;  // a K-tile never straddles two gates (dh % 16 == 0)
      const int g = k / dh, j = k % dh;
      const __nv_bfloat16* rj =
          p.r + ((static_cast<int64_t>(hd) * 4 + g) * dh + j) * dh + u0 + group;
      a[kk][0] = PackBf16Bits(rj[0], rj[dh]);
      a[kk][1] = PackBf16Bits(rj[8], rj[dh + 8]);
      a[kk][2] = PackBf16Bits(rj[8 * dh], rj[9 * dh]);
      a[kk][3] = PackBf16Bits(rj[8 * dh + 8], rj[9 * dh + 8]);
    } else {
      a[kk][0] = a[kk][1] = a[kk][2] = a[kk][3] = 0u;
    }
  }

  const int bl = threadIdx.x / kUnits, u = threadIdx.x % kUnits;
  const bool active = threadIdx.x < kSlice * kUnits && bl < nb;
  const int b = b_first + bl;
  const int col = hd * dh + u0 + u;
  const int64_t sd = static_cast<int64_t>(kSavedRows) * d;
  // Carried gradients w.r.t. the state after step t, and the step's saved values.
  float gc = 0.f, gn = 0.f, gm = 0.f, gh = 0.f;
  float c_t = 0.f, n_t = 0.f;  // c_t, n_t of the step being processed
  float pre[4] = {0.f, 0.f, 0.f, 0.f}, dh_in = 0.f;
  float cp = 0.f, np = 0.f, mp = 0.f;  // c, n, m at t − 1 (or the initial state)
  // The values step t needs beyond c_t, n_t.
  auto load_step = [&](int t) {
    LoadBwdStep(p, b, col, S, d, sd, t, pre, dh_in, cp, np, mp);
  };
  if (active) {
    const int64_t i = static_cast<int64_t>(b) * d + col;
    if (p.dhT != nullptr) {
      gh = p.dhT[i];
      gc = p.dcT[i];
      gn = p.dnT[i];
      gm = p.dmT[i];
    }
    const float* sv = p.saved + (static_cast<int64_t>(b) * S + S - 1) * sd + col;
    c_t = sv[4 * d];
    n_t = sv[5 * d];
    load_step(S - 1);
  }
  const int t_end = p.dh0 != nullptr ? -1 : 0;

  for (int t = S - 1; t >= t_end; --t) {
    if (t < S - 1) {
      // gh = Σ_k dG_{t+1}[k] R[k][unit]: wait for the head's dG_{t+1}.
      WaitHead(head_flags, blocks_per_head, static_cast<unsigned>(S - 1 - t));
      uint32_t bf[KB][NT][2];
#pragma unroll
      for (int kk = 0; kk < KB; ++kk) {
        const int kt = warp + kWarps * kk;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const int nrow = nt * 8 + group;
          bf[kk][nt][0] = bf[kk][nt][1] = 0u;
          if (kt < nk && nrow < nb) {
            const int k = kt * 16 + quad * 2;
            const int g = k / dh, j = k % dh;
            const __nv_bfloat16* gp =
                p.d_gx + ((static_cast<int64_t>(b_first + nrow) * S + t + 1) * 4 + g) * d +
                hd * dh + j;
            bf[kk][nt][0] = LoadCgU32(gp);
            bf[kk][nt][1] = LoadCgU32(gp + 8);
          }
        }
      }
      float acc[2][NT][4];  // two chains (even / odd K-tiles) to halve the MMA dependency chain
#pragma unroll
      for (int e = 0; e < 2; ++e)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
          acc[e][nt][0] = acc[e][nt][1] = acc[e][nt][2] = acc[e][nt][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < KB; ++kk)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
          Mma16816(acc[kk & 1][nt], a[kk], bf[kk][nt][0], bf[kk][nt][1]);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const int bc = nt * 8 + quad * 2;
        red[warp][bc][group] = acc[0][nt][0] + acc[1][nt][0];
        red[warp][bc + 1][group] = acc[0][nt][1] + acc[1][nt][1];
        red[warp][bc][group + 8] = acc[0][nt][2] + acc[1][nt][2];
        red[warp][bc + 1][group + 8] = acc[0][nt][3] + acc[1][nt][3];
      }
      __syncthreads();
      if (active) {
        float s = 0.f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) s += red[w][bl][u];
        gh = s;
      }
    }
    if (t < 0) break;

    if (active) {
      // kernels/cpu/slstm.cc slstm_bwd_ref, one unit. (CellBackward's math; folded, this kernel's
      // PTX binds the loop-carried registers in another order, so it keeps its copy.)
      const float i_raw = pre[0], f_raw = pre[1], z_raw = pre[2], o_raw = pre[3];
      const float lf = LogSigmoid(f_raw) + mp;
      const bool from_input = np == 0.f || i_raw >= lf;
      const float m_new = from_input ? i_raw : lf;
      const float ip = from_input ? 1.f : fminf(expf(i_raw - m_new), 1.f);
      const float fp = from_input ? fminf(expf(lf - m_new), 1.f) : 1.f;
      const float tz = tanhf(z_raw);
      const float so = Sigmoid(o_raw);
      const float g_h = gh + dh_in;
      const float d_o = g_h * (c_t / n_t) * so * (1.f - so);
      const float g_c = gc + g_h * so / n_t;
      const float g_n = gn - g_h * so * c_t / (n_t * n_t);
      const float g_fp = g_c * cp + g_n * np;
      const float g_ip = g_c * tz + g_n;
      const float d_z = g_c * ip * (1.f - tz * tz);
      float d_i = g_ip * ip;
      float g_lf = g_fp * fp;
      const float g_m = gm - g_ip * ip - g_fp * fp;
      if (from_input) {
        d_i += g_m;
      } else {
        g_lf += g_m;
      }
      const float d_f = g_lf * Sigmoid(-f_raw);
      __nv_bfloat16* dg = p.d_gx + (static_cast<int64_t>(b) * S + t) * 4 * d + col;
      dg[0] = __float2bfloat16_rn(d_i);
      dg[d] = __float2bfloat16_rn(d_f);
      dg[2 * d] = __float2bfloat16_rn(d_z);
      dg[3 * d] = __float2bfloat16_rn(d_o);
      gc = g_c * fp;
      gn = g_n * fp;
      gm = g_lf;
      // Step t − 1: its c, n are this step's previous state; prefetch the rest.
      c_t = cp;
      n_t = np;
      if (t > 0) load_step(t - 1);
    }
    Publish(head_flags + blockIdx.x % blocks_per_head, static_cast<unsigned>(S - t));
  }

  if (active && p.dh0 != nullptr) {
    const int64_t i = static_cast<int64_t>(b) * d + col;
    p.dh0[i] = gh;
    p.dc0[i] = gc;
    p.dn0[i] = gn;
    p.dm0[i] = gm;
  }
}

// ------------------------------------------------------------------ cluster kernels (sm_90)
//
// One thread-block cluster per (head, batch slice of 8 rows): C = dh/U CTAs of U units each
// (U = 32 where dh is a multiple of 32, else 16; C <= 16, a non-portable size above 8). The head's
// previous h (forward) or dG (backward) lives in every CTA's shared memory (double-buffered by
// step parity); after its pointwise update each CTA writes its units' slice into all C CTAs'
// next buffer with 16-byte st.shared::cluster (DSMEM) stores, then one cluster barrier
// (arrive.release / wait.acquire) ends the step. No global-memory round trip, no flags, and
// clusters never wait on each other, so no co-residency requirement beyond the cluster itself.
// One barrier per step is enough: a CTA can only write buffer p again two steps later, after
// every CTA has passed the barrier that follows its reads of p.

__device__ __forceinline__ unsigned ClusterRank() {
  unsigned r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
}
__device__ __forceinline__ void ClusterSync() {
  asm volatile(
      "barrier.cluster.arrive.release.aligned;\n"
      "barrier.cluster.wait.acquire.aligned;\n" ::
          : "memory");
}
// 16 bytes from local shared memory `src` to the same-offset address of `dst_local` in CTA
// `rank` of the cluster.
__device__ __forceinline__ void StoreCluster16(const void* dst_local, unsigned rank,
                                               const void* src) {
  const uint4 v = *reinterpret_cast<const uint4*>(src);
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(dst_local));
  uint32_t ra;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(ra) : "r"(a), "r"(rank));
  asm volatile("st.shared::cluster.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(ra), "r"(v.x), "r"(v.y),
               "r"(v.z), "r"(v.w)
               : "memory");
}

// Transaction barriers for kClusterAsync / kClusterAsyncFast (and SlstmExchangeProbe). Instead
// of one cluster barrier per step, every 16-byte DSMEM store is an st.async that counts its bytes
// onto an mbarrier in the receiving CTA (one per receive buffer, buffers alternating by step
// parity); the receiver waits on that mbarrier's phase (parity (use − 1)/2 mod 2 for its use-th
// wait) and thread 0 re-arms it (arrive.expect_tx with the bytes its next use brings, the arrival
// count being 1). No release fence, so the step's global loads and stores stay off the critical
// path. Ordering (reviewed 2026-11-26, device-tested the same day):
//   (1) Phase k+1 of buffer q's mbarrier is fed by the senders' step s+2 (k fed by step s). Each
//       sender needs this CTA's output of step s+1, which this CTA sends only after a
//       __syncthreads that follows thread 0's re-arm (made right after its wait on phase k), so
//       the re-arm precedes every complete_tx of phase k+1, and phase k+1 cannot complete before
//       all of this CTA's threads have left their wait on phase k (no parity aliasing).
//   (2) WAR: buffer q is overwritten at step s+2 only by a CTA that has received this CTA's step
//       s+1 output, computed (data-dependently, after a __syncthreads) from this CTA's reads of q
//       at step s+1; so nothing a slow CTA still reads is overwritten. Local staging buffers
//       (hst, gst, gloc) are reused only across a __syncthreads of this CTA.
//   (3) Visibility: the received bytes are visible to every thread that observes the phase
//       completion (try_wait.parity.acquire.cluster); every reader waits itself.
//   (4) A final cluster barrier keeps every CTA resident until no store to it can be in flight.
__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void MbarInit(uint64_t* bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(SmemAddr(bar)), "r"(count)
               : "memory");
}
__device__ __forceinline__ void MbarInitFence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void MbarArm(uint64_t* bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(SmemAddr(bar)),
               "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void MbarWait(uint64_t* bar, unsigned parity) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "SLSTM_WAIT:\n"
      "mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%0], %1;\n"
      "@!p bra SLSTM_WAIT;\n"
      "}\n" ::"r"(SmemAddr(bar)),
      "r"(parity)
      : "memory");
}

// The start of a cluster kernel's step exchange: thread 0 (when `use`) initialises the two
// exchange mbarriers and arms the first two receiving steps (of the steps up to `last`) with
// step_bytes each, mbar[first] first; then the block and the cluster sync, so every CTA of the
// cluster is running (and its mbarriers exist) before any DSMEM store.
__device__ __forceinline__ void InitExchange(uint64_t (&mbar)[2], bool use, int last, unsigned step_bytes,
                                             int first) {
  if (use && threadIdx.x == 0) {
    MbarInit(&mbar[0], 1);
    MbarInit(&mbar[1], 1);
    MbarInitFence();
    if (last >= 1) MbarArm(&mbar[first], step_bytes);
    if (last >= 2) MbarArm(&mbar[first ^ 1], step_bytes);
  }
  __syncthreads();
  ClusterSync();
}

// 16 bytes (`v`) to the same-offset address of `dst_local` in CTA `rank`, counted onto that
// CTA's mbarrier at the offset of `bar_local`.
__device__ __forceinline__ void StoreAsync16(const void* dst_local, const uint64_t* bar_local,
                                             unsigned rank, uint4 v) {
  uint32_t ra, rb;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n"
               : "=r"(ra)
               : "r"(SmemAddr(dst_local)), "r"(rank));
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n"
               : "=r"(rb)
               : "r"(SmemAddr(bar_local)), "r"(rank));
  asm volatile(
      "st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.b32 [%0], {%1, %2, %3, %4}, "
      "[%5];\n" ::"r"(ra),
      "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w), "r"(rb)
      : "memory");
}
// As above, the 16 bytes read from local shared memory `src`.
__device__ __forceinline__ void StoreAsync16(const void* dst_local, const uint64_t* bar_local,
                                             unsigned rank, const void* src) {
  StoreAsync16(dst_local, bar_local, rank, *reinterpret_cast<const uint4*>(src));
}

// Thread 0 of the first cluster's CTAs records clock64() (slstm.h, kSlstmTraceSteps).
__device__ __forceinline__ void TracePoint(long long* trace, int step, int point) {
  if (trace != nullptr && step < kSlstmTraceSteps) {
    trace[(ClusterRank() * kSlstmTraceSteps + step) * kSlstmTracePoints + point] = clock64();
  }
}

constexpr int kHbufStride = kMaxHeadDim + 8;  // bf16; 260 words: rows land 4 banks apart

// Forward: 16·U threads (U/2 warps); warp w does m-tile w % (U/4) (16 of the 4U gate rows) over
// half of K (K-part w / (U/4)), KT K-tiles each.
// kFast (only with kAsync): the next step's gx two steps ahead (so the HBM load never stalls
// the pointwise chain), four MMA accumulator chains instead of two, and the Fast* pointwise math.
// kLate (only with kFast; SlstmAlgorithm::kClusterAsyncFastNext, EXPERIMENTAL): step t + 1's gx
// is loaded at the top of step t (before the wait) as raw bf16 bits by every thread (inactive
// ones from a valid clamped row), unconditionally, and converted only in step t + 1's pointwise:
// no instruction reads a load's result within ~a step of issuing it (kFast converts right after
// issuing: one exposed HBM latency a step, see the header comment). Unconditional, so the load
// writes the loop-carried registers directly (a conditional one compiles to a load plus a move
// at the merge, and that move would wait for the load).
template <int U, int KT, bool kAsync, bool kFast, bool kLate>
__global__ void __launch_bounds__(U * 16, 1) SlstmFwdClusterKernel(FwdParams p) {
  constexpr int kW = U / 2, kNth = kW * 32, kMt = U / 4, kKs = 2;
  __shared__ __align__(16) __nv_bfloat16 hbuf[2][8][kHbufStride];
  __shared__ __align__(8) uint64_t mbar[2];  // kAsync: mbar[q] counts the bytes of hbuf[q]
  __shared__ float red[kKs][4 * U][9];
  __shared__ __align__(16) __nv_bfloat16 hst[8][U];

  const int dh = p.head_dim, d = p.num_heads * dh, S = p.seq_len;
  const int C = dh / U;
  const unsigned rank = ClusterRank();
  const int hd = blockIdx.x / C;
  const int u0 = static_cast<int>(rank) * U;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int group = lane / 4, quad = lane % 4;
  const int mt = warp % kMt, kpart = warp / kMt;
  const int g_tile = (16 * mt) / U, ub = (16 * mt) % U;
  const int nk = dh / 16;
  const int b_first = p.batch0 + blockIdx.y * 8;
  const int nb = min(8, p.batch - b_first);
  long long* const trace =
      kFast && blockIdx.x < C && blockIdx.y == 0 && threadIdx.x == 0 ? p.trace : nullptr;

  uint32_t a[KT][4];
#pragma unroll
  for (int kk = 0; kk < KT; ++kk) {
    const int kt = kpart + kKs * kk;
    if (kt < nk) {
      const __nv_bfloat16* r0 =
          p.r + ((static_cast<int64_t>(hd) * 4 + g_tile) * dh + u0 + ub + group) * dh + kt * 16 +
          quad * 2;
      const __nv_bfloat16* r8 = r0 + 8 * dh;
      a[kk][0] = LoadU32(r0);
      a[kk][1] = LoadU32(r8);
      a[kk][2] = LoadU32(r0 + 8);
      a[kk][3] = LoadU32(r8 + 8);
    } else {
      a[kk][0] = a[kk][1] = a[kk][2] = a[kk][3] = 0u;
    }
  }

  const int bl = threadIdx.x / U, u = threadIdx.x % U;
  const bool active = threadIdx.x < 8 * U && bl < nb;
  const int b = b_first + bl;
  const int col = hd * dh + u0 + u;
  float c = 0.f, n = 0.f, m = 0.f, h_last = 0.f;
  if (active && p.h0 != nullptr) {
    const int64_t i = static_cast<int64_t>(b) * d + col;
    c = p.c0[i];
    n = p.n0[i];
    m = p.m0[i];
    h_last = p.h0[i];
  }
  float gxv[4] = {0.f, 0.f, 0.f, 0.f};
  float gxn[4] = {0.f, 0.f, 0.f, 0.f};  // kFast: step t + 1's, while step t runs
  // kLate: the next step's gx as raw bf16 bits; every thread loads (rows clamped to the batch).
  unsigned short gx_next[4] = {0, 0, 0, 0};
  const __nv_bfloat16* const gx_base =
      p.gx + static_cast<int64_t>(min(b, p.batch - 1)) * S * 4 * d + col;
  if constexpr (kLate) {
#pragma unroll
    for (int g = 0; g < 4; ++g) gx_next[g] = LoadBits16(gx_base + g * d);
  } else if (active) {
    const __nv_bfloat16* gp = p.gx + static_cast<int64_t>(b) * S * 4 * d + col;
#pragma unroll
    for (int g = 0; g < 4; ++g) gxv[g] = __bfloat162float(gp[g * d]);
    if (kFast && S > 1) {
#pragma unroll
      for (int g = 0; g < 4; ++g) gxn[g] = __bfloat162float(gp[4 * d + g * d]);
    }
  }
  for (int i = threadIdx.x; i < 8 * U; i += kNth) (&hst[0][0])[i] = __float2bfloat16_rn(0.f);
  for (int i = threadIdx.x; i < 8 * dh; i += kNth) {
    const int row = i / dh, k = i % dh;
    float v = 0.f;
    if (row < nb && p.h0 != nullptr)
      v = p.h0[static_cast<int64_t>(b_first + row) * d + hd * dh + k];
    hbuf[0][row][k] = __float2bfloat16_rn(v);
  }
  const unsigned step_bytes = 16u * static_cast<unsigned>(dh);  // 8 rows × dh bf16
  InitExchange(mbar, kAsync, S - 1, step_bytes, 1);  // h_0 into mbar[1] (read at t = 1), h_1 into [0]

  for (int t = 0; t < S; ++t) {
    const int par = t & 1;
    if constexpr (kFast) TracePoint(trace, t, 0);
    unsigned short gx_cur[4];  // kLate: this step's gx (loaded at the top of the previous step)
    if constexpr (kLate) {
#pragma unroll
      for (int g = 0; g < 4; ++g) gx_cur[g] = gx_next[g];
      const __nv_bfloat16* gp = gx_base + static_cast<int64_t>(min(t + 1, S - 1)) * 4 * d;
#pragma unroll
      for (int g = 0; g < 4; ++g) gx_next[g] = LoadBits16(gp + g * d);
    }
    if (kAsync && t > 0) {
      MbarWait(&mbar[par], static_cast<unsigned>((t - 1) >> 1) & 1u);
      if (threadIdx.x == 0 && t + 2 <= S - 1) MbarArm(&mbar[par], step_bytes);
    }
    if constexpr (kFast) TracePoint(trace, t, 1);
    constexpr int kChains = kFast ? 4 : 2;  // independent accumulators: shorter MMA chains
    float acc[kChains][4];
#pragma unroll
    for (int e = 0; e < kChains; ++e) acc[e][0] = acc[e][1] = acc[e][2] = acc[e][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < KT; ++kk) {
      const int kt = kpart + kKs * kk;
      if (kt < nk) {
        const __nv_bfloat16* hb = &hbuf[par][group][kt * 16 + quad * 2];
        Mma16816(acc[kk % kChains], a[kk], *reinterpret_cast<const uint32_t*>(hb),
                 *reinterpret_cast<const uint32_t*>(hb + 8));
      }
    }
    if constexpr (kFast) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        acc[0][j] += acc[2][j];
        acc[1][j] += acc[3][j];
      }
    }
    const int r0 = 16 * mt + group;
    red[kpart][r0][quad * 2] = acc[0][0] + acc[1][0];
    red[kpart][r0][quad * 2 + 1] = acc[0][1] + acc[1][1];
    red[kpart][r0 + 8][quad * 2] = acc[0][2] + acc[1][2];
    red[kpart][r0 + 8][quad * 2 + 1] = acc[0][3] + acc[1][3];
    __syncthreads();
    if constexpr (kFast) TracePoint(trace, t, 2);

    if (active) {
      float pre[4];
#pragma unroll
      for (int g = 0; g < 4; ++g) {
        const float gx_g = kLate ? Bf16BitsToFloat(gx_cur[g]) : gxv[g];
        pre[g] = gx_g + red[0][g * U + u][bl] + red[1][g * U + u][bl];
      }
      if constexpr (kFast) {
        const float lf = FastLogSigmoid(pre[1]) + m;
        const bool from_input = n == 0.f || pre[0] >= lf;
        const float m_new = from_input ? pre[0] : lf;
        const float ip = from_input ? 1.f : fminf(__expf(pre[0] - m_new), 1.f);
        const float fp = from_input ? fminf(__expf(lf - m_new), 1.f) : 1.f;
        c = fp * c + ip * FastTanh(pre[2]);
        n = fp * n + ip;
        m = m_new;
        h_last = __fdividef(FastSigmoid(pre[3]) * c, n);
      } else {
        const float lf = LogSigmoid(pre[1]) + m;
        const bool from_input = n == 0.f || pre[0] >= lf;
        const float m_new = from_input ? pre[0] : lf;
        const float ip = from_input ? 1.f : fminf(expf(pre[0] - m_new), 1.f);
        const float fp = from_input ? fminf(expf(lf - m_new), 1.f) : 1.f;
        c = fp * c + ip * tanhf(pre[2]);
        n = fp * n + ip;
        m = m_new;
        h_last = Sigmoid(pre[3]) * c / n;
      }
      const __nv_bfloat16 hb = __float2bfloat16_rn(h_last);
      hst[bl][u] = hb;
      const int64_t row = static_cast<int64_t>(b) * S + t;
      p.h[row * d + col] = hb;
      if (p.saved != nullptr) {
        float* sv = p.saved + row * kSavedRows * d + col;
#pragma unroll
        for (int g = 0; g < 4; ++g) sv[g * d] = pre[g];
        sv[4 * d] = c;
        sv[5 * d] = n;
        sv[6 * d] = m;
      }
      if constexpr (kLate) {
        // loaded at the top of the step
      } else if constexpr (kFast) {
#pragma unroll
        for (int g = 0; g < 4; ++g) gxv[g] = gxn[g];
        if (t + 2 < S) {
          const __nv_bfloat16* gp = p.gx + (row + 2) * 4 * d + col;
#pragma unroll
          for (int g = 0; g < 4; ++g) gxn[g] = __bfloat162float(gp[g * d]);
        }
      } else if (t + 1 < S) {
        const __nv_bfloat16* gp = p.gx + (row + 1) * 4 * d + col;
#pragma unroll
        for (int g = 0; g < 4; ++g) gxv[g] = __bfloat162float(gp[g * d]);
      }
    }
    if (t + 1 < S) {
      __syncthreads();
      if constexpr (kFast) TracePoint(trace, t, 3);
      // U 16-byte chunks (8 rows × U/8) to each of the C CTAs: dh stores, one per thread.
      for (int i = threadIdx.x; i < C * U; i += kNth) {
        const int dest = i / U, ch = i % U;
        const int row = ch / (U / 8), cc = ch % (U / 8);
        if constexpr (kAsync) {
          StoreAsync16(&hbuf[par ^ 1][row][u0 + cc * 8], &mbar[par ^ 1],
                       static_cast<unsigned>(dest), &hst[row][cc * 8]);
        } else {
          StoreCluster16(&hbuf[par ^ 1][row][u0 + cc * 8], static_cast<unsigned>(dest),
                         &hst[row][cc * 8]);
        }
      }
      if constexpr (!kAsync) ClusterSync();
    }
  }
  if constexpr (kAsync) ClusterSync();  // no CTA leaves while stores to it may be in flight

  if (active && p.hT != nullptr) {
    const int64_t i = static_cast<int64_t>(b) * d + col;
    p.hT[i] = h_last;
    p.cT[i] = c;
    p.nT[i] = n;
    p.mT[i] = m;
  }
}

// Backward: 16·U threads; warp w does m-tile w % (U/16) (16 of the U output units) over one
// eighth of K = 4·dh (K-part w / (U/16)), KT K-tiles each. dG buffers: dynamic shared memory,
// [2][8][4·dh + 8] bf16.
template <int U, int KT, bool kAsync>
__global__ void __launch_bounds__(U * 16, 1) SlstmBwdClusterKernel(BwdParams p) {
  constexpr int kW = U / 2, kNth = kW * 32, kMt = U / 16, kKs = kW / kMt;
  extern __shared__ __align__(16) unsigned char dyn_smem[];
  __shared__ __align__(8) uint64_t mbar[2];  // kAsync: mbar[q] counts the bytes of dG buffer q
  __shared__ float red[kKs][U][9];
  __shared__ __align__(16) __nv_bfloat16 gst[8][4][U];

  const int dh = p.head_dim, d = p.num_heads * dh, S = p.seq_len;
  const int C = dh / U;
  const int gs = 4 * dh + 8;  // gbuf row stride (bf16): 2dh + 4 words, rows 4 banks apart
  __nv_bfloat16* gbuf = reinterpret_cast<__nv_bfloat16*>(dyn_smem);
  const unsigned rank = ClusterRank();
  const int hd = blockIdx.x / C;
  const int u0 = static_cast<int>(rank) * U;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int group = lane / 4, quad = lane % 4;
  const int mt = warp % kMt, kpart = warp / kMt;
  const int nk = 4 * dh / 16;
  const int b_first = p.batch0 + blockIdx.y * 8;
  const int nb = min(8, p.batch - b_first);

  uint32_t a[KT][4];
#pragma unroll
  for (int kk = 0; kk < KT; ++kk) {
    const int kt = kpart + kKs * kk;
    if (kt < nk) {
      const int k = kt * 16 + quad * 2;
      const int g = k / dh, j = k % dh;
      const __nv_bfloat16* rj =
          p.r + ((static_cast<int64_t>(hd) * 4 + g) * dh + j) * dh + u0 + 16 * mt + group;
      a[kk][0] = PackBf16Bits(rj[0], rj[dh]);
      a[kk][1] = PackBf16Bits(rj[8], rj[dh + 8]);
      a[kk][2] = PackBf16Bits(rj[8 * dh], rj[9 * dh]);
      a[kk][3] = PackBf16Bits(rj[8 * dh + 8], rj[9 * dh + 8]);
    } else {
      a[kk][0] = a[kk][1] = a[kk][2] = a[kk][3] = 0u;
    }
  }

  const int bl = threadIdx.x / U, u = threadIdx.x % U;
  const bool active = threadIdx.x < 8 * U && bl < nb;
  const int b = b_first + bl;
  const int col = hd * dh + u0 + u;
  const int64_t sd = static_cast<int64_t>(kSavedRows) * d;
  float gc = 0.f, gn = 0.f, gm = 0.f, gh = 0.f;
  float c_t = 0.f, n_t = 0.f;
  float pre[4] = {0.f, 0.f, 0.f, 0.f}, dh_in = 0.f;
  float cp = 0.f, np = 0.f, mp = 0.f;
  auto load_step = [&](int t) {
    LoadBwdStep(p, b, col, S, d, sd, t, pre, dh_in, cp, np, mp);
  };
  if (active) {
    const int64_t i = static_cast<int64_t>(b) * d + col;
    if (p.dhT != nullptr) {
      gh = p.dhT[i];
      gc = p.dcT[i];
      gn = p.dnT[i];
      gm = p.dmT[i];
    }
    const float* sv = p.saved + (static_cast<int64_t>(b) * S + S - 1) * sd + col;
    c_t = sv[4 * d];
    n_t = sv[5 * d];
    load_step(S - 1);
  }
  for (int i = threadIdx.x; i < 8 * 4 * U; i += kNth) (&gst[0][0][0])[i] = __float2bfloat16_rn(0.f);
  const bool need_dh0 = p.dh0 != nullptr;
  const int t_end = need_dh0 ? -1 : 0;
  const int s_last = S - 1 - t_end;                             // last loop iteration
  const unsigned step_bytes = 64u * static_cast<unsigned>(dh);  // 8 rows × 4·dh bf16
  InitExchange(mbar, kAsync, s_last, step_bytes, 0);  // dG of iteration 0 into mbar[0], read at 1

  for (int t = S - 1; t >= t_end; --t) {
    const int s = S - 1 - t;  // steps done so far
    if (kAsync && s > 0) {
      MbarWait(&mbar[(s - 1) & 1], static_cast<unsigned>((s - 1) >> 1) & 1u);
      if (threadIdx.x == 0 && s + 2 <= s_last) MbarArm(&mbar[(s - 1) & 1], step_bytes);
    }
    if (t < S - 1) {
      const __nv_bfloat16* gb = gbuf + static_cast<int64_t>(((s - 1) & 1) * 8 + group) * gs;
      float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
      for (int kk = 0; kk < KT; ++kk) {
        const int kt = kpart + kKs * kk;
        if (kt < nk) {
          const __nv_bfloat16* q = gb + kt * 16 + quad * 2;
          Mma16816(acc[kk & 1], a[kk], *reinterpret_cast<const uint32_t*>(q),
                   *reinterpret_cast<const uint32_t*>(q + 8));
        }
      }
      const int r0 = 16 * mt + group;
      red[kpart][r0][quad * 2] = acc[0][0] + acc[1][0];
      red[kpart][r0][quad * 2 + 1] = acc[0][1] + acc[1][1];
      red[kpart][r0 + 8][quad * 2] = acc[0][2] + acc[1][2];
      red[kpart][r0 + 8][quad * 2 + 1] = acc[0][3] + acc[1][3];
      __syncthreads();
      if (active) {
        float sum = 0.f;
#pragma unroll
        for (int w = 0; w < kKs; ++w) sum += red[w][u][bl];
        gh = sum;
      }
    }
    if (t < 0) break;

    if (active) {
      const CellGrad cg = CellBackward<false>(pre, cp, np, mp, c_t, n_t, gh, dh_in, gc, gn, gm);
      const __nv_bfloat16 dgs[4] = {__float2bfloat16_rn(cg.d_i), __float2bfloat16_rn(cg.d_f),
                                    __float2bfloat16_rn(cg.d_z), __float2bfloat16_rn(cg.d_o)};
      __nv_bfloat16* dg = p.d_gx + (static_cast<int64_t>(b) * S + t) * 4 * d + col;
#pragma unroll
      for (int g = 0; g < 4; ++g) {
        dg[g * d] = dgs[g];
        gst[bl][g][u] = dgs[g];
      }
      gc = cg.g_c * cg.fp;
      gn = cg.g_n * cg.fp;
      gm = cg.g_lf;
      c_t = cp;
      n_t = np;
      if (t > 0) load_step(t - 1);
    }
    if (t > 0 || need_dh0) {
      __syncthreads();
      // 4U chunks (8 rows × 4 gates × U/8) to each of the C CTAs.
      __nv_bfloat16* dst_base = gbuf + static_cast<int64_t>((s & 1) * 8) * gs;
      for (int i = threadIdx.x; i < C * 4 * U; i += kNth) {
        const int dest = i / (4 * U), ch = i % (4 * U);
        const int row = ch / (U / 2), rem = ch % (U / 2);
        const int g = rem / (U / 8), cc = rem % (U / 8);
        if constexpr (kAsync) {
          StoreAsync16(dst_base + static_cast<int64_t>(row) * gs + g * dh + u0 + cc * 8,
                       &mbar[s & 1], static_cast<unsigned>(dest), &gst[row][g][cc * 8]);
        } else {
          StoreCluster16(dst_base + static_cast<int64_t>(row) * gs + g * dh + u0 + cc * 8,
                         static_cast<unsigned>(dest), &gst[row][g][cc * 8]);
        }
      }
      if constexpr (!kAsync) ClusterSync();
    }
  }
  if constexpr (kAsync) ClusterSync();

  if (active && need_dh0) {
    const int64_t i = static_cast<int64_t>(b) * d + col;
    p.dh0[i] = gh;
    p.dc0[i] = gc;
    p.dn0[i] = gn;
    p.dm0[i] = gm;
  }
}

// Backward, kClusterAsyncFast: the transposed split. Each CTA multiplies only ITS units' dG_t
// (4U values a row, already in its own shared memory) by its 4U × dh slice of R, giving a partial
// dh_{t−1} for all dh units of the head in fp32, and sends each owner CTA its U-unit stripe of that
// partial (st.async, counted on the owner's mbarrier). The owner sums the C partials. Against
// SlstmBwdClusterKernel: half the DSMEM bytes per step (fp32 C·U·8 = 32·dh bytes received, vs
// bf16 4·dh·8 = 64·dh), no K-partial reduction inside the CTA (each warp's m-tiles span the
// whole local K), and one __syncthreads per step instead of two. The partials stay fp32 (no
// extra rounding beyond the bf16 dG operand, as before); the sum order is fixed (deterministic).
//
// 16·U threads; warp w does m-tiles w + W·i (i < MTW) of the dh/16 output m-tiles over all U/4
// local K-tiles (K = (gate, local unit)). Pointwise thread: unit tid / 8, batch row tid % 8 (so a
// warp's reads of the receive buffer are 32 consecutive floats). Receive buffer (dynamic shared
// memory): recv[2][C][U][8] fp32, double-buffered by iteration parity like the dG buffers.
// kLate (SlstmAlgorithm::kClusterAsyncFastNext, EXPERIMENTAL): the step inputs are loaded
// unconditionally (the source pointer is selected, a flag marks a zero initial state) and dh
// stays raw bf16 bits, so nothing touches a load's result in the step that issued it.
template <int U, int MTW, bool kLate>
__global__ void __launch_bounds__(U * 16, 1) SlstmBwdPartialKernel(BwdParams p) {
  constexpr int kW = U / 2, kNth = kW * 32, kKl = U / 4, kGs = 4 * U + 8;
  extern __shared__ __align__(16) unsigned char dyn_smem[];
  __shared__ __align__(8) uint64_t mbar[2];  // mbar[q] counts the bytes of recv[q]
  // This CTA's dG_t (bf16, the MMA's B operand), double-buffered: a warp still multiplying
  // step t's may lag behind another thread's pointwise update of step t − 1 (see below).
  __shared__ __align__(16) __nv_bfloat16 gloc[2][8][kGs];

  const int dh = p.head_dim, d = p.num_heads * dh, S = p.seq_len;
  const int C = dh / U;
  float* recv = reinterpret_cast<float*>(dyn_smem);  // [2][C][U][8]
  const unsigned rank = ClusterRank();
  const int hd = blockIdx.x / C;
  const int u0 = static_cast<int>(rank) * U;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int group = lane / 4, quad = lane % 4;
  const int n_mt = dh / 16;
  const int b_first = p.batch0 + blockIdx.y * 8;
  const int nb = min(8, p.batch - b_first);
  long long* const trace =
      blockIdx.x < C && blockIdx.y == 0 && threadIdx.x == 0 ? p.trace : nullptr;

  // a[i][kt]: A[m = unit l][k = (g, j)] = R[hd][g][u0 + j][l], l in m-tile warp + kW·i.
  uint32_t a[MTW][kKl][4];
#pragma unroll
  for (int i = 0; i < MTW; ++i) {
    const int mt = warp + kW * i;
#pragma unroll
    for (int kt = 0; kt < kKl; ++kt) {
      if (mt < n_mt) {
        const int k = kt * 16 + quad * 2;  // a K-tile never straddles two gates (U % 16 == 0)
        const int g = k / U, j = k % U;
        const __nv_bfloat16* rj =
            p.r + ((static_cast<int64_t>(hd) * 4 + g) * dh + u0 + j) * dh + 16 * mt + group;
        a[i][kt][0] = PackBf16Bits(rj[0], rj[dh]);
        a[i][kt][1] = PackBf16Bits(rj[8], rj[dh + 8]);
        a[i][kt][2] = PackBf16Bits(rj[8 * dh], rj[9 * dh]);
        a[i][kt][3] = PackBf16Bits(rj[8 * dh + 8], rj[9 * dh + 8]);
      } else {
        a[i][kt][0] = a[i][kt][1] = a[i][kt][2] = a[i][kt][3] = 0u;
      }
    }
  }

  const int u = threadIdx.x / 8, bl = threadIdx.x % 8;
  const bool active = threadIdx.x < 8 * U && bl < nb;
  const int b = b_first + bl;
  const int col = hd * dh + u0 + u;
  const int64_t sd = static_cast<int64_t>(kSavedRows) * d;
  float gc = 0.f, gn = 0.f, gm = 0.f, gh = 0.f;
  float c_t = 0.f, n_t = 0.f;
  // Step inputs (pre-activations, dh, previous c, n, m), loaded two steps ahead: cur is step t's,
  // nxt step t − 1's, so the HBM latency never sits on the per-step chain.
  struct StepIn {
    float pre[4], dh_in, cp, np, mp;
    unsigned short dh_bits;  // kLate
    bool zero_prev;          // kLate: cp, np, mp are 0 (t = 0 without an initial state)
  };
  StepIn cur{}, nxt{};
  auto load_step = [&](int t, StepIn& in) {
    const int64_t row = static_cast<int64_t>(b) * S + t;
    const float* sv = p.saved + row * sd + col;
#pragma unroll
    for (int g = 0; g < 4; ++g) in.pre[g] = sv[g * d];
    if constexpr (kLate) {
      in.dh_bits = LoadBits16(p.dh + row * d + col);
      const int64_t i = static_cast<int64_t>(b) * d + col;
      const bool from_saved = t > 0, from_init = t == 0 && p.c0 != nullptr;
      const float* pc = from_saved ? sv - sd + 4 * d : from_init ? p.c0 + i : sv;
      const float* pn = from_saved ? sv - sd + 5 * d : from_init ? p.n0 + i : sv;
      const float* pm = from_saved ? sv - sd + 6 * d : from_init ? p.m0 + i : sv;
      in.cp = *pc;
      in.np = *pn;
      in.mp = *pm;
      in.zero_prev = !from_saved && !from_init;
      return;
    }
    in.dh_in = __bfloat162float(p.dh[row * d + col]);
    if (t > 0) {
      in.cp = sv[-sd + 4 * d];
      in.np = sv[-sd + 5 * d];
      in.mp = sv[-sd + 6 * d];
    } else if (p.c0 != nullptr) {
      const int64_t i = static_cast<int64_t>(b) * d + col;
      in.cp = p.c0[i];
      in.np = p.n0[i];
      in.mp = p.m0[i];
    } else {
      in.cp = in.np = in.mp = 0.f;
    }
  };
  if (active) {
    const int64_t i = static_cast<int64_t>(b) * d + col;
    if (p.dhT != nullptr) {
      gh = p.dhT[i];
      gc = p.dcT[i];
      gn = p.dnT[i];
      gm = p.dmT[i];
    }
    const float* sv = p.saved + (static_cast<int64_t>(b) * S + S - 1) * sd + col;
    c_t = sv[4 * d];
    n_t = sv[5 * d];
    load_step(S - 1, cur);
    if (S > 1) load_step(S - 2, nxt);
  }
  for (int i = threadIdx.x; i < 2 * 8 * kGs; i += kNth) {
    (&gloc[0][0][0])[i] = __float2bfloat16_rn(0.f);
  }
  const bool need_dh0 = p.dh0 != nullptr;
  const int t_end = need_dh0 ? -1 : 0;
  const int s_last = S - 1 - t_end;
  const unsigned step_bytes = 32u * static_cast<unsigned>(dh);  // C senders × U units × 8 rows fp32
  InitExchange(mbar, true, s_last, step_bytes, 0);

  for (int t = S - 1; t >= t_end; --t) {
    const int s = S - 1 - t;
    TracePoint(trace, s, 0);
    if (s > 0) {
      const int q = (s - 1) & 1;
      MbarWait(&mbar[q], static_cast<unsigned>((s - 1) >> 1) & 1u);
      if (threadIdx.x == 0 && s + 2 <= s_last) MbarArm(&mbar[q], step_bytes);
      if (active) {
        const float* rp = recv + (static_cast<int64_t>(q) * C * U + u) * 8 + bl;
        float sum = 0.f;
        for (int src = 0; src < C; ++src) sum += rp[src * U * 8];
        gh = sum;
      }
    }
    TracePoint(trace, s, 1);
    if (t < 0) break;

    const int par = s & 1;
    if (active) {
      const bool zero_prev = kLate && cur.zero_prev;
      const float cp = zero_prev ? 0.f : cur.cp, np = zero_prev ? 0.f : cur.np,
                  mp = zero_prev ? 0.f : cur.mp;
      const float dh_in = kLate ? Bf16BitsToFloat(cur.dh_bits) : cur.dh_in;
      const CellGrad cg = CellBackward<true>(cur.pre, cp, np, mp, c_t, n_t, gh, dh_in, gc, gn, gm);
      const __nv_bfloat16 dgs[4] = {__float2bfloat16_rn(cg.d_i), __float2bfloat16_rn(cg.d_f),
                                    __float2bfloat16_rn(cg.d_z), __float2bfloat16_rn(cg.d_o)};
      __nv_bfloat16* dg = p.d_gx + (static_cast<int64_t>(b) * S + t) * 4 * d + col;
#pragma unroll
      for (int g = 0; g < 4; ++g) {
        dg[g * d] = dgs[g];
        gloc[par][bl][g * U + u] = dgs[g];
      }
      gc = cg.g_c * cg.fp;
      gn = cg.g_n * cg.fp;
      gm = cg.g_lf;
      c_t = cp;
      n_t = np;
      cur = nxt;
      if (t > 1) load_step(t - 2, nxt);
    }
    if (t > 0 || need_dh0) {
      // gloc[par] complete. WAR on gloc: its next writer is the pointwise update two steps on,
      // which is past this barrier of the step in between, so every warp's reads here are done.
      __syncthreads();
      TracePoint(trace, s, 2);
      const __nv_bfloat16* gb = &gloc[par][group][quad * 2];
      // Two independent accumulator chains a warp (two m-tiles, or even / odd K-tiles of one);
      // the step's MMAs are tensor-pipe bound at this depth, and more chains cost registers.
      constexpr int kChains = MTW == 1 ? 2 : 1;
      float acc[MTW][kChains][4];
#pragma unroll
      for (int i = 0; i < MTW; ++i)
#pragma unroll
        for (int e = 0; e < kChains; ++e) {
          acc[i][e][0] = acc[i][e][1] = acc[i][e][2] = acc[i][e][3] = 0.f;
        }
#pragma unroll
      for (int kt = 0; kt < kKl; ++kt) {
        const uint32_t b0 = *reinterpret_cast<const uint32_t*>(gb + kt * 16);
        const uint32_t b1 = *reinterpret_cast<const uint32_t*>(gb + kt * 16 + 8);
#pragma unroll
        for (int i = 0; i < MTW; ++i) Mma16816(acc[i][kt % kChains], a[i][kt], b0, b1);
      }
      // Accumulator (unit group / group + 8, rows 2·quad, 2·quad + 1) → one 16-byte chunk a lane
      // (4 consecutive rows of one unit) after one exchange with the neighbour lane (quad ^ 1).
      const bool odd = quad & 1;
#pragma unroll
      for (int i = 0; i < MTW; ++i) {
        const int mt = warp + kW * i;
        float v[4];
#pragma unroll
        for (int j = 0; j < 4; ++j)
          v[j] = kChains == 2 ? acc[i][0][j] + acc[i][kChains - 1][j] : acc[i][0][j];
        const float x = __shfl_xor_sync(0xffffffffu, odd ? v[0] : v[2], 1);
        const float y = __shfl_xor_sync(0xffffffffu, odd ? v[1] : v[3], 1);
        if (mt < n_mt) {
          const int l = 16 * mt + group + (odd ? 8 : 0);  // head unit
          const int row0 = odd ? 2 * quad - 2 : 2 * quad;
          const unsigned dest = static_cast<unsigned>(l / U);
          const uint4 chunk = odd ? make_uint4(__float_as_uint(x), __float_as_uint(y),
                                               __float_as_uint(v[2]), __float_as_uint(v[3]))
                                  : make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]),
                                               __float_as_uint(x), __float_as_uint(y));
          float* dst = recv + ((static_cast<int64_t>(par) * C + rank) * U + l % U) * 8 + row0;
          StoreAsync16(dst, &mbar[par], dest, chunk);
        }
      }
      TracePoint(trace, s, 3);
    }
  }
  ClusterSync();  // no CTA leaves while stores to it may be in flight

  if (active && need_dh0) {
    const int64_t i = static_cast<int64_t>(b) * d + col;
    p.dh0[i] = gh;
    p.dc0[i] = gc;
    p.dn0[i] = gn;
    p.dm0[i] = gm;
  }
}

// SlstmExchangeProbe: the cluster kernels' per-step DSMEM exchange with no compute around it.
// Per step every CTA sends `bytes_per_dest` (a multiple of 16) to each CTA of its cluster, into
// a buffer double-buffered by step parity, then waits for its own (kBarrier: st.shared::cluster +
// one cluster barrier, as kCluster; else st.async counted on an mbarrier, as kClusterAsync).
template <bool kBarrier>
__global__ void __launch_bounds__(512, 1) SlstmExchangeProbeKernel(int steps, int bytes_per_dest) {
  extern __shared__ __align__(16) unsigned char dyn_smem[];
  __shared__ __align__(8) uint64_t mbar[2];
  unsigned cluster_size;
  asm volatile("mov.u32 %0, %%cluster_nctarank;\n" : "=r"(cluster_size));
  const unsigned rank = ClusterRank();
  const int chunks_per_dest = bytes_per_dest / 16;
  const unsigned step_bytes = cluster_size * static_cast<unsigned>(bytes_per_dest);
  const int S = steps;
  InitExchange(mbar, !kBarrier, S - 1, step_bytes, 1);
  uint4 v = make_uint4(threadIdx.x, rank, 0u, 0u);
  for (int t = 0; t < S; ++t) {
    const int par = t & 1;
    if (!kBarrier && t > 0) {
      MbarWait(&mbar[par], static_cast<unsigned>((t - 1) >> 1) & 1u);
      if (threadIdx.x == 0 && t + 2 <= S - 1) MbarArm(&mbar[par], step_bytes);
      // Depend on the received data, as the real kernels do.
      v.z += reinterpret_cast<const uint32_t*>(dyn_smem)[par * (step_bytes / 4) + threadIdx.x % 4];
    }
    if (t + 1 < S) {
      unsigned char* next = dyn_smem + static_cast<size_t>(par ^ 1) * step_bytes;
      for (int i = threadIdx.x; i < static_cast<int>(cluster_size) * chunks_per_dest; i += 512) {
        const unsigned dest = static_cast<unsigned>(i / chunks_per_dest);
        void* dst = next + rank * bytes_per_dest + (i % chunks_per_dest) * 16;
        if constexpr (kBarrier) {
          StoreCluster16(dst, dest, &v);
        } else {
          StoreAsync16(dst, &mbar[par ^ 1], dest, v);
        }
      }
      if constexpr (kBarrier) {
        ClusterSync();
        v.z += reinterpret_cast<const uint32_t*>(next)[threadIdx.x % 4];
      }
    }
  }
  ClusterSync();
  if (v.z == 0xffffffffu) reinterpret_cast<uint32_t*>(dyn_smem)[0] = v.w;  // keep v live
}

// hprev[b, t] = h[b, t − 1] (t ≥ 1), bf16(h0[b]) or 0 (t = 0): the right operand of dR.
__global__ void ShiftHKernel(const __nv_bfloat16* h, const float* h0, __nv_bfloat16* hprev,
                             int64_t batch, int64_t seq_len, int64_t d) {
  const int64_t total = batch * seq_len * d;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t col = i % d, row = i / d, t = row % seq_len, b = row / seq_len;
    __nv_bfloat16 v;
    if (t > 0) {
      v = h[i - d];
    } else {
      v = __float2bfloat16_rn(h0 != nullptr ? h0[b * d + col] : 0.f);
    }
    hprev[i] = v;
  }
}

// ------------------------------------------------------------------ host

int PowerOfTwoAtLeast(int n) {
  int p2 = 1;
  while (p2 < n) p2 *= 2;
  return p2;
}
// K-tiles per warp of the flag kernels (8 warps split K), rounded up to a template instance.
int KTilesPerWarp(int k_tiles) { return PowerOfTwoAtLeast((k_tiles + kWarps - 1) / kWarps); }

// Runs `kernel` over all batch slices of 8·NT rows: as many slices per cooperative launch as can
// be resident at once (each launch re-zeroes the flags).
template <typename Params>
CudaResult LaunchSlices(const void* kernel, Params params, int nt, const SlstmShape& shape,
                        DeviceAllocator* allocator, cudaStream_t stream, const char* name) {
  const int slice = 8 * nt;
  const int64_t slices = (shape.batch + slice - 1) / slice;
  const int ctas_per_slice = static_cast<int>(shape.num_heads * shape.head_dim / kUnits);
  int device = 0, sms = 0, per_sm = 0;
  CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  CUDA_RETURN_IF_ERROR(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0));
  const int64_t resident = static_cast<int64_t>(sms) * per_sm;
  if (ctas_per_slice > resident) {
    return InvalidArgument(std::string(name) + ": " + std::to_string(ctas_per_slice) +
                           " CTAs (num_heads·head_dim/16) exceed the " + std::to_string(resident) +
                           " that can be resident at once");
  }
  const int64_t slices_per_launch = std::min<int64_t>(slices, resident / ctas_per_slice);
  const size_t flag_bytes = sizeof(unsigned) * slices_per_launch * shape.num_heads * 32;
  DeviceBuffer flags;
  CUDA_RETURN_IF_NOT_OK(allocator->Allocate(flag_bytes, &flags));
  params.flags = flags.as<unsigned>();
  for (int64_t s0 = 0; s0 < slices; s0 += slices_per_launch) {
    const int64_t count = std::min(slices_per_launch, slices - s0);
    params.batch0 = static_cast<int>(s0 * slice);
    CUDA_RETURN_IF_ERROR(cudaMemsetAsync(flags.get(), 0, flag_bytes, stream));
    void* kargs[] = {&params};
    CUDA_RETURN_IF_ERROR(
        cudaLaunchCooperativeKernel(kernel, dim3(ctas_per_slice, static_cast<unsigned>(count)),
                                    dim3(kThreads), kargs, 0, stream));
    CUDA_RETURN_IF_LAUNCH_ERROR("slstm persistent kernel");
  }
  return {};
}

template <int NT>
const void* FwdKernelFor(int kf) {
  switch (kf) {
    case 1:
      return reinterpret_cast<const void*>(&SlstmFwdKernel<NT, 1>);
    case 2:
      return reinterpret_cast<const void*>(&SlstmFwdKernel<NT, 2>);
    default:
      return reinterpret_cast<const void*>(&SlstmFwdKernel<NT, 4>);
  }
}
template <int NT>
const void* BwdKernelFor(int kb) {
  switch (kb) {
    case 1:
    case 2:
      return reinterpret_cast<const void*>(&SlstmBwdKernel<NT, 2>);
    case 4:
      return reinterpret_cast<const void*>(&SlstmBwdKernel<NT, 4>);
    case 8:
      return reinterpret_cast<const void*>(&SlstmBwdKernel<NT, 8>);
    default:
      return reinterpret_cast<const void*>(&SlstmBwdKernel<NT, 16>);
  }
}

// Units per CTA of the cluster kernels, 0: unsupported. 32 where head_dim allows (fewer, larger
// CTAs per cluster: 125M's dh 192 gives clusters of 6, which several fit per GPC; 1.3B's 512
// gives 16, the largest a Hopper cluster can be), else 16.
int ClusterUnits(int64_t head_dim) {
  if (head_dim % 32 == 0 && head_dim / 32 <= 16) return 32;
  if (head_dim / 16 <= 16) return 16;
  return 0;
}

// Forward: K = dh in dh/16 tiles over 2 K-parts; backward: K = 4·dh in dh/4 tiles over 8 K-parts;
// both need ⌈dh/32⌉ K-tiles per warp, rounded up to a template instance.
template <int U, bool A, bool F, bool L>
const void* FwdClusterKernelForUnits(int kt) {
  switch (kt) {
    case 1:
      return reinterpret_cast<const void*>(&SlstmFwdClusterKernel<U, 1, A, F, L>);
    case 2:
      return reinterpret_cast<const void*>(&SlstmFwdClusterKernel<U, 2, A, F, L>);
    case 4:
      return reinterpret_cast<const void*>(&SlstmFwdClusterKernel<U, 4, A, F, L>);
    case 8:
      return reinterpret_cast<const void*>(&SlstmFwdClusterKernel<U, 8, A, F, L>);
    default:
      return reinterpret_cast<const void*>(&SlstmFwdClusterKernel<U, 16, A, F, L>);
  }
}
template <int U, bool A>
const void* BwdClusterKernelForUnits(int kt) {
  switch (kt) {
    case 1:
      return reinterpret_cast<const void*>(&SlstmBwdClusterKernel<U, 1, A>);
    case 2:
      return reinterpret_cast<const void*>(&SlstmBwdClusterKernel<U, 2, A>);
    case 4:
      return reinterpret_cast<const void*>(&SlstmBwdClusterKernel<U, 4, A>);
    case 8:
      return reinterpret_cast<const void*>(&SlstmBwdClusterKernel<U, 8, A>);
    default:
      return reinterpret_cast<const void*>(&SlstmBwdClusterKernel<U, 16, A>);
  }
}
// The cluster kernels' flavours (SlstmAlgorithm): kCluster, kClusterAsync, kClusterAsyncFast,
// kClusterAsyncFastNext.
enum class ClusterMode { kBarrier, kAsync, kAsyncFast, kAsyncFastLate };

const void* FwdClusterKernelFor(int units, int64_t head_dim, ClusterMode mode) {
  const int kt = PowerOfTwoAtLeast(static_cast<int>((head_dim + 31) / 32));
  switch (mode) {
    case ClusterMode::kAsyncFastLate:
      return units == 32 ? FwdClusterKernelForUnits<32, true, true, true>(kt)
                         : FwdClusterKernelForUnits<16, true, true, true>(kt);
    case ClusterMode::kAsyncFast:
      return units == 32 ? FwdClusterKernelForUnits<32, true, true, false>(kt)
                         : FwdClusterKernelForUnits<16, true, true, false>(kt);
    case ClusterMode::kAsync:
      return units == 32 ? FwdClusterKernelForUnits<32, true, false, false>(kt)
                         : FwdClusterKernelForUnits<16, true, false, false>(kt);
    default:
      return units == 32 ? FwdClusterKernelForUnits<32, false, false, false>(kt)
                         : FwdClusterKernelForUnits<16, false, false, false>(kt);
  }
}
// kAsyncFast runs SlstmBwdPartialKernel: m-tiles per warp ⌈(head_dim/16) / (units/2)⌉ <= 2.
template <bool L>
const void* BwdPartialKernelFor(int units, int64_t head_dim) {
  const bool two = head_dim / 16 > units / 2;
  if (units == 32) {
    return two ? reinterpret_cast<const void*>(&SlstmBwdPartialKernel<32, 2, L>)
               : reinterpret_cast<const void*>(&SlstmBwdPartialKernel<32, 1, L>);
  }
  return two ? reinterpret_cast<const void*>(&SlstmBwdPartialKernel<16, 2, L>)
             : reinterpret_cast<const void*>(&SlstmBwdPartialKernel<16, 1, L>);
}
const void* BwdClusterKernelFor(int units, int64_t head_dim, ClusterMode mode) {
  if (mode == ClusterMode::kAsyncFast) return BwdPartialKernelFor<false>(units, head_dim);
  if (mode == ClusterMode::kAsyncFastLate) return BwdPartialKernelFor<true>(units, head_dim);
  const int kt = PowerOfTwoAtLeast(static_cast<int>((head_dim + 31) / 32));
  if (mode == ClusterMode::kAsync) {
    return units == 32 ? BwdClusterKernelForUnits<32, true>(kt)
                       : BwdClusterKernelForUnits<16, true>(kt);
  }
  return units == 32 ? BwdClusterKernelForUnits<32, false>(kt)
                     : BwdClusterKernelForUnits<16, false>(kt);
}
// Shared memory beyond the static part: the dG buffers, or the partial-sum receive buffers.
size_t BwdClusterDynSmem(int64_t head_dim, ClusterMode mode) {
  if (mode == ClusterMode::kAsyncFast || mode == ClusterMode::kAsyncFastLate) {
    return sizeof(float) * 2 * 8 * head_dim;
  }
  return sizeof(__nv_bfloat16) * 2 * 8 * (4 * head_dim + 8);
}
// kAuto: kClusterAsyncFast, the fastest of the three on every bench shape in the device call of
// 2026-11-26 (bench/RESULTS.md), where all of them passed slstm_gpu_test.
// kAuto picks kAsyncFastLate (fastest in the 2026-11-26 H200 call, 756/756 checks). A "cluster" of
// one CTA (head_dim == units) uses the barrier kernel: st.async into a one-CTA cluster is what
// compute-sanitizer flagged ("Cluster needs to have at least 2 blocks") in that call.
ClusterMode ModeOf(SlstmAlgorithm algorithm, int64_t ctas_per_cluster) {
  if (ctas_per_cluster < 2) return ClusterMode::kBarrier;
  switch (algorithm) {
    case SlstmAlgorithm::kCluster:
      return ClusterMode::kBarrier;
    case SlstmAlgorithm::kClusterAsync:
      return ClusterMode::kAsync;
    case SlstmAlgorithm::kClusterAsyncFast:
      return ClusterMode::kAsyncFast;
    default:  // kAuto, kClusterAsyncFastNext
      return ClusterMode::kAsyncFastLate;
  }
}

// One launch: grid (NH·C, ⌈B/8⌉), clusters of C = head_dim/units CTAs. *launched = false (and
// nothing enqueued) when the device cannot place such a cluster.
template <typename Params>
CudaResult LaunchCluster(const void* kernel, Params params, int units, size_t dyn_smem,
                         const SlstmShape& s, cudaStream_t stream, bool* launched) {
  *launched = false;
  const unsigned clusters_per_head = static_cast<unsigned>(s.head_dim / units);
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(s.num_heads) * clusters_per_head,
                     static_cast<unsigned>((s.batch + 7) / 8));
  cfg.blockDim = dim3(units * 16);
  cfg.dynamicSmemBytes = dyn_smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = clusters_per_head;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  CUDA_RETURN_IF_ERROR(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  if (dyn_smem > 0) {
    CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                              static_cast<int>(dyn_smem)));
  }
  int max_clusters = 0;
  if (cudaOccupancyMaxActiveClusters(&max_clusters, kernel, &cfg) != cudaSuccess ||
      max_clusters < 1) {
    (void)cudaGetLastError();  // clear a sticky-free query error; the caller falls back
    return {};
  }
  params.batch0 = 0;
  void* kargs[] = {&params};
  CUDA_RETURN_IF_ERROR(cudaLaunchKernelExC(&cfg, kernel, kargs));
  CUDA_RETURN_IF_LAUNCH_ERROR("slstm cluster kernel");
  *launched = true;
  return {};
}

}  // namespace

CudaResult SlstmCheck(const SlstmShape& s) {
  if (s.batch < 1 || s.seq_len < 1 || s.num_heads < 1 || s.head_dim < 1) {
    return InvalidArgument("slstm: batch, seq_len, num_heads and head_dim must all be >= 1");
  }
  if (s.head_dim % kUnits != 0 || s.head_dim > kMaxHeadDim) {
    return InvalidArgument("slstm: head_dim " + std::to_string(s.head_dim) +
                           " unsupported (needs a multiple of 16, at most 512)");
  }
  const int64_t d = s.num_heads * s.head_dim;
  if (s.batch * s.seq_len * kSavedRows * d >= (int64_t{1} << 40) || s.batch > (int64_t{1} << 30) ||
      s.seq_len > (int64_t{1} << 30) || d > (int64_t{1} << 20)) {
    return InvalidArgument("slstm: shape too large");
  }
  return {};
}

int64_t SlstmTraceLongs(const SlstmShape&) {
  return int64_t{16} * kSlstmTraceSteps * kSlstmTracePoints;  // clusters have <= 16 CTAs
}

int64_t SlstmSavedBytes(const SlstmShape& s) {
  return s.batch * s.seq_len * kSavedRows * s.num_heads * s.head_dim *
         static_cast<int64_t>(sizeof(float));
}

CudaResult SlstmExchangeProbe(int cluster_size, int clusters, int bytes_per_dest, int steps,
                              bool barrier, cudaStream_t stream, float* ms) {
  if (cluster_size < 1 || cluster_size > 16 || clusters < 1 || bytes_per_dest < 16 ||
      bytes_per_dest % 16 != 0 || steps < 1 || bytes_per_dest * cluster_size > 32768) {
    return InvalidArgument("SlstmExchangeProbe: unsupported arguments");
  }
  const void* kernel = barrier ? reinterpret_cast<const void*>(&SlstmExchangeProbeKernel<true>)
                               : reinterpret_cast<const void*>(&SlstmExchangeProbeKernel<false>);
  const size_t smem = 2 * static_cast<size_t>(bytes_per_dest) * cluster_size;
  CUDA_RETURN_IF_ERROR(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(smem)));
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(cluster_size * clusters));
  cfg.blockDim = dim3(512);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(cluster_size);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  cudaEvent_t start, stop;
  CUDA_RETURN_IF_ERROR(cudaEventCreate(&start));
  CUDA_RETURN_IF_ERROR(cudaEventCreate(&stop));
  void* kargs[] = {&steps, &bytes_per_dest};
  CUDA_RETURN_IF_ERROR(cudaEventRecord(start, stream));
  CUDA_RETURN_IF_ERROR(cudaLaunchKernelExC(&cfg, kernel, kargs));
  CUDA_RETURN_IF_LAUNCH_ERROR("SlstmExchangeProbeKernel");
  CUDA_RETURN_IF_ERROR(cudaEventRecord(stop, stream));
  CUDA_RETURN_IF_ERROR(cudaEventSynchronize(stop));
  CUDA_RETURN_IF_ERROR(cudaEventElapsedTime(ms, start, stop));
  CUDA_RETURN_IF_ERROR(cudaEventDestroy(start));
  CUDA_RETURN_IF_ERROR(cudaEventDestroy(stop));
  return {};
}

CudaResult SlstmForward(const SlstmForwardArgs& args, DeviceAllocator* allocator,
                        cudaStream_t stream) {
  CUDA_RETURN_IF_NOT_OK(SlstmCheck(args.shape));
  const SlstmShape& s = args.shape;
  if (args.gx == nullptr || args.r == nullptr || args.h == nullptr) {
    return InvalidArgument("SlstmForward: gx, r and h are required");
  }
  if (args.initial.h != nullptr &&
      (args.initial.c == nullptr || args.initial.n == nullptr || args.initial.m == nullptr)) {
    return InvalidArgument("SlstmForward: initial state needs h, c, n and m together");
  }
  if (args.final_state.h != nullptr &&
      (args.final_state.c == nullptr || args.final_state.n == nullptr ||
       args.final_state.m == nullptr)) {
    return InvalidArgument("SlstmForward: final state needs h, c, n and m together");
  }
  FwdParams p{};
  p.batch = static_cast<int>(s.batch);
  p.seq_len = static_cast<int>(s.seq_len);
  p.num_heads = static_cast<int>(s.num_heads);
  p.head_dim = static_cast<int>(s.head_dim);
  p.gx = args.gx;
  p.r = args.r;
  p.h0 = args.initial.h;
  p.c0 = args.initial.c;
  p.n0 = args.initial.n;
  p.m0 = args.initial.m;
  p.h = args.h;
  p.saved = static_cast<float*>(args.saved);
  p.hT = args.final_state.h;
  p.cT = args.final_state.c;
  p.nT = args.final_state.n;
  p.mT = args.final_state.m;
  p.trace = args.debug_trace;
  if (args.algorithm != SlstmAlgorithm::kFlags) {
    const int units = ClusterUnits(s.head_dim);
    if (units != 0) {
      bool launched = false;
      CUDA_RETURN_IF_NOT_OK(
          LaunchCluster(FwdClusterKernelFor(units, s.head_dim, ModeOf(args.algorithm, s.head_dim / units)), p, units, 0,
                        s, stream, &launched));
      if (launched) return {};
    }
    if (args.algorithm != SlstmAlgorithm::kAuto) {
      return InvalidArgument("SlstmForward: the cluster kernel does not support head_dim " +
                             std::to_string(s.head_dim) + " on this device");
    }
  }
  const int nt = s.batch <= 8 ? 1 : 2;
  const int kf = KTilesPerWarp(static_cast<int>(s.head_dim / 16));
  const void* kernel = nt == 1 ? FwdKernelFor<1>(kf) : FwdKernelFor<2>(kf);
  return LaunchSlices(kernel, p, nt, s, allocator, stream, "SlstmForward");
}

CudaResult SlstmBackward(const SlstmBackwardArgs& args, GemmContext* gemm,
                         DeviceAllocator* allocator, cudaStream_t stream) {
  CUDA_RETURN_IF_NOT_OK(SlstmCheck(args.shape));
  const SlstmShape& s = args.shape;
  if (args.r == nullptr || args.h == nullptr || args.saved == nullptr || args.dh == nullptr ||
      args.d_gx == nullptr) {
    return InvalidArgument("SlstmBackward: r, h, saved, dh and d_gx are required");
  }
  if (args.dr != nullptr && gemm == nullptr) {
    return InvalidArgument("SlstmBackward: dr needs a GemmContext");
  }
  if (args.initial.h != nullptr &&
      (args.initial.c == nullptr || args.initial.n == nullptr || args.initial.m == nullptr)) {
    return InvalidArgument("SlstmBackward: initial state needs h, c, n and m together");
  }
  if (args.d_final.h != nullptr &&
      (args.d_final.c == nullptr || args.d_final.n == nullptr || args.d_final.m == nullptr)) {
    return InvalidArgument("SlstmBackward: d_final needs h, c, n and m together");
  }
  if (args.d_initial.h != nullptr &&
      (args.d_initial.c == nullptr || args.d_initial.n == nullptr || args.d_initial.m == nullptr)) {
    return InvalidArgument("SlstmBackward: d_initial needs h, c, n and m together");
  }
  BwdParams p{};
  p.batch = static_cast<int>(s.batch);
  p.seq_len = static_cast<int>(s.seq_len);
  p.num_heads = static_cast<int>(s.num_heads);
  p.head_dim = static_cast<int>(s.head_dim);
  p.r = args.r;
  if (args.initial.h != nullptr) {
    p.c0 = args.initial.c;
    p.n0 = args.initial.n;
    p.m0 = args.initial.m;
  }
  p.saved = static_cast<const float*>(args.saved);
  p.dh = args.dh;
  p.dhT = args.d_final.h;
  p.dcT = args.d_final.c;
  p.dnT = args.d_final.n;
  p.dmT = args.d_final.m;
  p.d_gx = args.d_gx;
  p.dh0 = args.d_initial.h;
  p.dc0 = args.d_initial.c;
  p.dn0 = args.d_initial.n;
  p.dm0 = args.d_initial.m;
  p.trace = args.debug_trace;
  bool launched = false;
  if (args.algorithm != SlstmAlgorithm::kFlags) {
    const int units = ClusterUnits(s.head_dim);
    if (units != 0) {
      const ClusterMode mode = ModeOf(args.algorithm, s.head_dim / units);
      CUDA_RETURN_IF_NOT_OK(LaunchCluster(BwdClusterKernelFor(units, s.head_dim, mode), p, units,
                                          BwdClusterDynSmem(s.head_dim, mode), s, stream,
                                          &launched));
    }
    if (!launched && args.algorithm != SlstmAlgorithm::kAuto) {
      return InvalidArgument("SlstmBackward: the cluster kernel does not support head_dim " +
                             std::to_string(s.head_dim) + " on this device");
    }
  }
  if (!launched) {
    const int nt = s.batch <= 8 ? 1 : 2;
    const int kb = KTilesPerWarp(static_cast<int>(4 * s.head_dim / 16));
    const void* kernel = nt == 1 ? BwdKernelFor<1>(kb) : BwdKernelFor<2>(kb);
    CUDA_RETURN_IF_NOT_OK(LaunchSlices(kernel, p, nt, s, allocator, stream, "SlstmBackward"));
  }
  if (args.dr == nullptr) return {};

  // dR[hd][g] (dh × dh) += dG_gᵀ (dh × B·S) · hprev (B·S × dh) for each head and gate.
  const int64_t d = s.num_heads * s.head_dim, rows = s.batch * s.seq_len;
  DeviceBuffer hprev;
  CUDA_RETURN_IF_NOT_OK(allocator->Allocate(sizeof(__nv_bfloat16) * rows * d, &hprev));
  const int64_t total = rows * d;
  const int blocks = static_cast<int>(std::min<int64_t>((total + 255) / 256, 4096));
  ShiftHKernel<<<blocks, 256, 0, stream>>>(args.h, args.initial.h, hprev.as<__nv_bfloat16>(),
                                           s.batch, s.seq_len, d);
  CUDA_RETURN_IF_LAUNCH_ERROR("ShiftHKernel");
  for (int64_t hd = 0; hd < s.num_heads; ++hd) {
    for (int64_t g = 0; g < 4; ++g) {
      GemmArgs ga;
      ga.trans_a = true;
      ga.m = s.head_dim;
      ga.n = s.head_dim;
      ga.k = rows;
      ga.a = args.d_gx + g * d + hd * s.head_dim;
      ga.lda = 4 * d;
      ga.b = hprev.as<__nv_bfloat16>() + hd * s.head_dim;
      ga.ldb = d;
      ga.c = args.dr + (hd * 4 + g) * s.head_dim * s.head_dim;
      ga.ldc = s.head_dim;
      ga.c_dtype = DType::kF32;
      ga.beta = 1.f;
      CUDA_RETURN_IF_NOT_OK(gemm->Gemm(ga, stream));
    }
  }
  return {};
}

}  // namespace gyre::cuda
