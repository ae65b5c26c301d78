// Fused linear + cross-entropy over token chunks; the algorithm and costs are in cross_entropy.h.
//
//   ce_row_kernel2      block per token row (512 threads, two blocks per SM at V = 50304), the
//                       bf16 row staged in shared memory (V · 2 bytes <= 226 KiB): 16-byte loads
//                       in batches of four with the running max, the block max; Σ exp(l − max)
//                       from shared memory (independent exponentials), the block sum; the token
//                       loss; then G in place as bf16 from the staged row (16-byte stores).
//   ce_row_kernel2_lean ce_row_kernel2 with fewer instructions a logit, same bits (the default
//                       since session 18; ce_row_kernel2 stays as its readable reference and
//                       the bitwise test's other side: lean_rows = false, GYRE_LCE_ROWS=staged).
//   ce_row_kernel1      the same for larger vocabularies, reading the row three times (max, sum,
//                       G) from global memory.
//   ce_row_kernel2_capped soft-capped logits (LinearCrossEntropyArgs::logit_soft_cap > 0; xLSTM
//                       Large): the lean kernel's staging, the cap as ex2.approx + rcp.approx
//                       (session 21).
//   ce_row_kernel_capped ce_row_kernel1's three passes over soft-capped logits: rows too long for
//                       shared memory (V > ~115K).
//   ce_loss_sum_kernel1 one block: Σ token_loss in double, fixed order (deterministic).
// The row kernels share the device functions below (block max / sum, token loss, gradient).
// Host side: the logits buffer's row stride (LogitsRowStride: V rounded up to 128 by default, with
// the three products planned as at V rounded up to 128, GemmArgs::plan_round; to 8 under ld_align /
// GYRE_LCE_LD_ALIGN=8; cross_entropy_notes.md session 19), a product split at the vocabulary's last
// multiple of 128 where its rounded plan is rejected (VocabProduct, GYRE_LCE_SPLIT; session 20)
// and the measurement-only phase timer (GYRE_LCE_TIMING=1).
#include "kernels/cuda/cross_entropy.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/vec_util.cuh"

namespace gyre::cuda {
namespace {

using bf16 = __nv_bfloat16;
constexpr float kNaN = __builtin_nanf("");

struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct SumOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};

// Reduces v over the block: warp shuffles, then every thread combines the warps' partials in the
// same order (same bits everywhere, no second barrier). Called once per Op per block. Its
// barrier also orders every thread's earlier reads of the row before any later G write.
template <int kThreads, typename Op>
__device__ __forceinline__ float BlockReduce(float v, Op op) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, off));
  __shared__ float part[kThreads / 32];
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = v;
  __syncthreads();
  float r = part[0];
#pragma unroll
  for (int w = 1; w < kThreads / 32; ++w) r = op(r, part[w]);
  return r;
}

// Unscaled token loss: 0 for an ignored target (< 0), NaN for one outside the vocabulary.
__device__ __forceinline__ float TokenLoss(float lse, int32_t target, int64_t vocab, float target_logit) {
  if (target < 0) return 0.f;
  if (target >= vocab) return kNaN;
  return lse - target_logit;
}

// G element: loss_scale · (softmax − onehot); 0 on ignored rows, NaN on rows with a bad target.
struct GradElement {
  float lse, loss_scale, bad;
  int32_t target;
  bool ignored;
  __device__ GradElement(float lse_, float loss_scale_, int32_t target_, int64_t vocab)
      : lse(lse_), loss_scale(loss_scale_), bad(target_ >= vocab ? kNaN : 0.f), target(target_),
        ignored(target_ < 0) {}
  __device__ __forceinline__ float operator()(float l, int64_t j) const {
    return ignored ? 0.f : loss_scale * (expf(l - lse) - (j == target ? 1.f : 0.f)) + bad;
  }
};

__device__ __forceinline__ void Unpack8(const uint4& raw, float (&f)[8]) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 v = __bfloat1622float2(h[i]);
    f[2 * i] = v.x;
    f[2 * i + 1] = v.y;
  }
}

constexpr int kRowThreads2 = 512;
constexpr int kLoadBatch = 4;  // independent 16-byte loads in flight per thread
constexpr int64_t kRowSmemMax = 226 * 1024;  // the 227 KiB opt-in maximum less the static part

__global__ void __launch_bounds__(kRowThreads2, 2)
ce_row_kernel2(bf16* logits, int64_t ld, int64_t vocab, const int32_t* targets, float loss_scale,
               float* token_loss, bool write_grad) {
  extern __shared__ uint4 srow_v[];
  bf16* srow = reinterpret_cast<bf16*>(srow_v);
  const int64_t r = blockIdx.x;
  bf16* row = logits + r * ld;
  const int tid = threadIdx.x;
  const int64_t nv = vocab / 8;
  const uint4* row_v = reinterpret_cast<const uint4*>(row);  // rows are 16-byte aligned (ld % 8 == 0)
  // 1. Stage the row, running max.
  float m = -INFINITY;
  for (int64_t q0 = tid; q0 < nv; q0 += kLoadBatch * kRowThreads2) {
    uint4 v[kLoadBatch];
#pragma unroll
    for (int b = 0; b < kLoadBatch; ++b) {
      const int64_t q = q0 + b * kRowThreads2;
      if (q < nv) v[b] = row_v[q];
    }
#pragma unroll
    for (int b = 0; b < kLoadBatch; ++b) {
      const int64_t q = q0 + b * kRowThreads2;
      if (q < nv) {
        srow_v[q] = v[b];
        float f[8];
        Unpack8(v[b], f);
#pragma unroll
        for (int i = 0; i < 8; ++i) m = fmaxf(m, f[i]);
      }
    }
  }
  for (int64_t j = 8 * nv + tid; j < vocab; j += kRowThreads2) {
    const bf16 l = row[j];
    srow[j] = l;
    m = fmaxf(m, __bfloat162float(l));
  }
  const float row_max = BlockReduce<kRowThreads2>(m, MaxOp{});
  // 2. Σ exp(l − max) over this thread's own staged elements.
  float s = 0.f;
  for (int64_t q = tid; q < nv; q += kRowThreads2) {
    float f[8];
    Unpack8(srow_v[q], f);
#pragma unroll
    for (int i = 0; i < 8; ++i) s += expf(f[i] - row_max);
  }
  for (int64_t j = 8 * nv + tid; j < vocab; j += kRowThreads2) s += expf(__bfloat162float(srow[j]) - row_max);
  const float lse = row_max + logf(BlockReduce<kRowThreads2>(s, SumOp{}));
  const int32_t target = targets[r];
  if (tid == 0) {
    token_loss[r] = TokenLoss(lse, target, vocab, target >= 0 && target < vocab ? __bfloat162float(srow[target]) : 0.f);
  }
  if (!write_grad) return;
  // 3. G over the row's own bytes, from the staged copy.
  const GradElement grad(lse, loss_scale, target, vocab);
  for (int64_t q = tid; q < nv; q += kRowThreads2) {
    float f[8];
    Unpack8(srow_v[q], f);
#pragma unroll
    for (int i = 0; i < 8; ++i) f[i] = grad(f[i], 8 * q + i);
    StoreBf16<8>(row + 8 * q, f);
  }
  for (int64_t j = 8 * nv + tid; j < vocab; j += kRowThreads2) row[j] = __float2bfloat16_rn(grad(__bfloat162float(srow[j]), j));
}

// ce_row_kernel2 with fewer instructions per logit, same bits (the default; GYRE_LCE_ROWS=staged
// runs ce_row_kernel2; cross_entropy_notes.md; measured on an H100 in lce18's calls: the row pass
// −10.7%, 0 differing values in loss, token losses, dh and dW). The row pass is issue-bound, not DRAM-bound: ~38 instructions a logit
// (two expf of ~11 each, the bf16 unpacking, and in the G pass a 64-bit index, its compare with
// the target, two selects and a subtraction per element) make ~8.5 µs a row an SM at 4 issues a
// clock, which is what the kernel takes (2.14 ms for 32K rows on 132 SMs). Here:
//   - the staged row is read back from shared memory as 16-byte words and unpacked with a shift
//     or a mask per element (bf16 -> fp32 is exact: the value's bits moved up 16), not four
//     16-bit loads and a cvt per element;
//   - the staging max runs on bf16 pairs (__hmax2, 4 a 16-byte word instead of 8 unpacks and 8
//     fmaxf), unpacked once at the end: max is exact, so the row max is the same;
//   - 32-bit loop indices (a row has < 2^31 / 8 words);
//   - the G pass branches once per row: an ignored row stores zeros, a row with a bad target
//     runs the old formula, every other row computes loss_scale · expf(l − lse) + 0 (the old
//     formula with the one-hot 0: x − 0 is x, the addend stays a runtime zero so the fma
//     rounds the same), and only the 16-byte group holding the target runs the old formula
//     with its one-hot compare (so the target's expf − 1 compiles as before).
// The max, the sum (same elements per thread, same order), the reductions and the token loss
// are ce_row_kernel2's, so loss, token losses and G carry the same bits.
__device__ __forceinline__ void UnpackWords8(const uint4& raw, float (&f)[8]) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __uint_as_float(w[i] << 16);             // the lower-address bf16
    f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}

__global__ void __launch_bounds__(kRowThreads2, 2)
ce_row_kernel2_lean(bf16* logits, int64_t ld, int64_t vocab, const int32_t* targets, float loss_scale,
                    float* token_loss, bool write_grad) {
  extern __shared__ uint4 srow_v[];
  bf16* srow = reinterpret_cast<bf16*>(srow_v);
  const int64_t r = blockIdx.x;
  bf16* row = logits + r * ld;
  const int tid = threadIdx.x;
  const int64_t nv = vocab / 8;
  const uint4* row_v = reinterpret_cast<const uint4*>(row);
  // 1. Stage the row, running max on bf16 pairs (max is exact: the same maximum as fmaxf over
  // the unpacked floats, NaN inputs skipped alike), unpacked once at the end.
  const __nv_bfloat162 neg_inf2 = __floats2bfloat162_rn(-INFINITY, -INFINITY);
  __nv_bfloat162 m2 = neg_inf2;
  for (int q0 = tid; q0 < nv; q0 += kLoadBatch * kRowThreads2) {
    uint4 v[kLoadBatch];
#pragma unroll
    for (int b = 0; b < kLoadBatch; ++b) {
      const int q = q0 + b * kRowThreads2;
      if (q < nv) v[b] = row_v[q];
    }
#pragma unroll
    for (int b = 0; b < kLoadBatch; ++b) {
      const int q = q0 + b * kRowThreads2;
      if (q < nv) {
        srow_v[q] = v[b];
        const __nv_bfloat162* p = reinterpret_cast<const __nv_bfloat162*>(&v[b]);
        m2 = __hmax2(__hmax2(m2, p[0]), __hmax2(p[1], __hmax2(p[2], p[3])));
      }
    }
  }
  const float2 m2f = __bfloat1622float2(m2);
  float m = fmaxf(m2f.x, m2f.y);
  for (int64_t j = 8 * nv + tid; j < vocab; j += kRowThreads2) {
    const bf16 l = row[j];
    srow[j] = l;
    m = fmaxf(m, __bfloat162float(l));
  }
  const float row_max = BlockReduce<kRowThreads2>(m, MaxOp{});
  // 2. Σ exp(l − max): the same elements in the same order as ce_row_kernel2.
  float s = 0.f;
  for (int q = tid; q < nv; q += kRowThreads2) {
    float f[8];
    UnpackWords8(srow_v[q], f);
#pragma unroll
    for (int i = 0; i < 8; ++i) s += expf(f[i] - row_max);
  }
  for (int64_t j = 8 * nv + tid; j < vocab; j += kRowThreads2) s += expf(__bfloat162float(srow[j]) - row_max);
  const float lse = row_max + logf(BlockReduce<kRowThreads2>(s, SumOp{}));
  const int32_t target = targets[r];
  if (tid == 0) {
    token_loss[r] = TokenLoss(lse, target, vocab, target >= 0 && target < vocab ? __bfloat162float(srow[target]) : 0.f);
  }
  if (!write_grad) return;
  // 3. G over the row's own bytes.
  const GradElement grad(lse, loss_scale, target, vocab);
  if (grad.ignored) {
    for (int q = tid; q < nv; q += kRowThreads2) reinterpret_cast<uint4*>(row)[q] = make_uint4(0, 0, 0, 0);
  } else if (target >= vocab) {
    for (int q = tid; q < nv; q += kRowThreads2) {
      float f[8];
      UnpackWords8(srow_v[q], f);
#pragma unroll
      for (int i = 0; i < 8; ++i) f[i] = grad(f[i], 8 * q + i);
      StoreBf16<8>(row + 8 * q, f);
    }
  } else {
    const int target_q = target / 8;
    const float zero = grad.bad;  // 0 here; a runtime value, as the old formula's addend
    for (int q = tid; q < nv; q += kRowThreads2) {
      float f[8];
      UnpackWords8(srow_v[q], f);
      if (q == target_q) {
        // The target's group: ce_row_kernel2's formula verbatim (one-hot compare included).
#pragma unroll
        for (int i = 0; i < 8; ++i) f[i] = grad(f[i], 8 * q + i);
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) f[i] = loss_scale * expf(f[i] - lse) + zero;
      }
      StoreBf16<8>(row + 8 * q, f);
    }
  }
  for (int64_t j = 8 * nv + tid; j < vocab; j += kRowThreads2) row[j] = __float2bfloat16_rn(grad(__bfloat162float(srow[j]), j));
}

// Rows too long for shared memory (V > ~115K): max, sum and G each read the row from global
// memory. Element j is read and written only by thread j % kRowThreads1 after the max.
constexpr int kRowThreads1 = 512;

__global__ void __launch_bounds__(kRowThreads1)
ce_row_kernel1(bf16* logits, int64_t ld, int64_t vocab, const int32_t* targets, float loss_scale,
               float* token_loss, bool write_grad) {
  const int64_t r = blockIdx.x;
  bf16* row = logits + r * ld;
  const int tid = threadIdx.x;
  float m = -INFINITY;
  for (int64_t j = tid; j < vocab; j += kRowThreads1) m = fmaxf(m, __bfloat162float(row[j]));
  const float row_max = BlockReduce<kRowThreads1>(m, MaxOp{});
  float s = 0.f;
  for (int64_t j = tid; j < vocab; j += kRowThreads1) s += expf(__bfloat162float(row[j]) - row_max);
  const int32_t target = targets[r];
  // Read before the next barrier: the target's owner overwrites it with G right after.
  const float target_logit = tid == 0 && target >= 0 && target < vocab ? __bfloat162float(row[target]) : 0.f;
  const float lse = row_max + logf(BlockReduce<kRowThreads1>(s, SumOp{}));
  if (tid == 0) token_loss[r] = TokenLoss(lse, target, vocab, target_logit);
  if (!write_grad) return;
  const GradElement grad(lse, loss_scale, target, vocab);
  for (int64_t j = tid; j < vocab; j += kRowThreads1) row[j] = __float2bfloat16_rn(grad(__bfloat162float(row[j]), j));
}

// Soft-capped logits (LinearCrossEntropyArgs::logit_soft_cap = c > 0): l = c · tanh(z / c) of
// the GEMM's bf16 z, in fp32; max, Σ exp(l − max) and the token loss over l as ce_row_kernel1
// does over z; G = loss_scale · (softmax(l) − onehot) · sech²(z / c) written over z in place.
// sech² is 4e/(1 + e)² with e = exp(−2|z/c|): no cancellation where the cap saturates (the
// gradient there is tiny, not 1 − tanh² rounded to 0). Reads the row three times from global
// memory (no staging): since session 21 only for rows too long for ce_row_kernel2_capped's
// shared-memory copy (V > ~115K), as ce_row_kernel1 for the uncapped loss.
__device__ __forceinline__ float SoftCapped(float z, float cap, float inv_cap) { return cap * tanhf(z * inv_cap); }
__device__ __forceinline__ float SoftCapSlope(float z, float inv_cap) {
  const float e = expf(-2.f * fabsf(z * inv_cap));
  return 4.f * e / ((1.f + e) * (1.f + e));
}

__global__ void __launch_bounds__(kRowThreads1)
ce_row_kernel_capped(bf16* logits, int64_t ld, int64_t vocab, const int32_t* targets, float loss_scale,
                     float* token_loss, bool write_grad, float cap) {
  const int64_t r = blockIdx.x;
  bf16* row = logits + r * ld;
  const int tid = threadIdx.x;
  const float inv_cap = 1.f / cap;
  float m = -INFINITY;
  for (int64_t j = tid; j < vocab; j += kRowThreads1) m = fmaxf(m, SoftCapped(__bfloat162float(row[j]), cap, inv_cap));
  const float row_max = BlockReduce<kRowThreads1>(m, MaxOp{});
  float s = 0.f;
  for (int64_t j = tid; j < vocab; j += kRowThreads1)
    s += expf(SoftCapped(__bfloat162float(row[j]), cap, inv_cap) - row_max);
  const int32_t target = targets[r];
  // Read before the next barrier: the target's owner overwrites it with G right after.
  const float target_logit =
      tid == 0 && target >= 0 && target < vocab ? SoftCapped(__bfloat162float(row[target]), cap, inv_cap) : 0.f;
  const float lse = row_max + logf(BlockReduce<kRowThreads1>(s, SumOp{}));
  if (tid == 0) token_loss[r] = TokenLoss(lse, target, vocab, target_logit);
  if (!write_grad) return;
  const GradElement grad(lse, loss_scale, target, vocab);
  for (int64_t j = tid; j < vocab; j += kRowThreads1) {
    const float z = __bfloat162float(row[j]);
    row[j] = __float2bfloat16_rn(grad(SoftCapped(z, cap, inv_cap), j) * SoftCapSlope(z, inv_cap));
  }
}

// The capped row pass with the lean kernel's staging (the default for every vocabulary whose
// row fits in shared memory since session 21; cross_entropy_notes.md). ce_row_kernel_capped above
// reads the row three times from global memory with 2-byte loads and evaluates tanhf three times,
// expf three times and an IEEE division per logit (~95 instructions a logit, ~10 multi-function-
// unit ops): 3.84 ms a 16384-row chunk at V 50304 on an H100 against the uncapped lean pass's 1.17.
// Here the cap is one exponential and one approximate reciprocal per evaluation, with everything
// the loss and the gradient need derived from the same two values:
//   x = z / c, e = exp(−2|x|) (ex2.approx of |z| · (−2 log2 e / c): one multiply, one MUFU op),
//   u = 1 − |tanh x| = 2e / (1 + e)       (rcp.approx and two multiplies; 0 <= u <= 1),
//   l = sign(z) · c · (1 − u)             (the capped logit; one fma and the sign bit),
//   sech² x = 1 − tanh² x = u · (2 − u)   (no cancellation where the cap saturates: u is small
//                                          there and carried with its own relative precision).
// Error: e carries ex2.approx's ~2 ulp plus the argument's rounding (|arg| <= ~25 before e
// underflows relative to 1: <= ~2e-6 relative); u the same plus rcp's ulp; l's absolute error is
// c · δu <= ~1e-5 at c = 30 — far under the bf16 rounding of z itself (2^-9 of |z|), which the
// float64 bands already carry. Where e underflows (|z| > ~44 c) u = 0: l = ±c, sech² = 0 (the true
// value is < 1e-38).
// The row max needs no cap evaluation per logit: l is monotonic in z, so the max is taken on the
// raw bf16 pairs (__hmax2, the lean kernel's staging) and capped once (the same formula, so the
// maximum element's l equals row_max exactly).
// z stays staged in bf16 (2 B a logit: two 512-thread blocks an SM, as the lean kernel) and the
// cap is evaluated in the sum pass and again in the G pass: 2 exponentials + 2 reciprocals + the
// softmax's 2 expf a logit, 1.70 ms a 16384-row chunk. Evaluating it once while staging and
// keeping sign(z)·u in fp32 instead (4 B a logit: one 1024-thread block an SM) measured 1.91 ms:
// the halved block count hid less than the saved MUFU ops (session 21, deleted).
// Softmax exponentials stay expf (as the uncapped kernels): only the cap's own transcendentals
// are approximate.
__device__ __forceinline__ float Ex2Approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
// sign(z) · u with u = 1 − |tanh(z / c)|; `neg2_log2e_over_cap` = −2 log2(e) / c.
__device__ __forceinline__ float CapSignedU(float z, float neg2_log2e_over_cap) {
  const float e = Ex2Approx(fabsf(z) * neg2_log2e_over_cap);
  const float u = __fdividef(e + e, 1.f + e);
  return copysignf(u, z);
}
// The capped logit and sech² from sign(z) · u.
__device__ __forceinline__ float CappedFromU(float su, float cap) { return copysignf(fmaf(-cap, fabsf(su), cap), su); }
__device__ __forceinline__ float SlopeFromU(float su) {
  const float u = fabsf(su);
  return u * (2.f - u);
}

__global__ void __launch_bounds__(kRowThreads2, 2)
ce_row_kernel2_capped(bf16* logits, int64_t ld, int64_t vocab, const int32_t* targets, float loss_scale,
                      float* token_loss, bool write_grad, float cap) {
  constexpr int kThreads = kRowThreads2;
  extern __shared__ uint4 srow_v[];
  bf16* srow = reinterpret_cast<bf16*>(srow_v);
  const int64_t r = blockIdx.x;
  bf16* row = logits + r * ld;
  const int tid = threadIdx.x;
  const int nv = static_cast<int>(vocab / 8);
  const float k = -2.f * 1.4426950408889634f / cap;
  const uint4* row_v = reinterpret_cast<const uint4*>(row);
  // 1. Stage the row, the running max of z on bf16 pairs.
  __nv_bfloat162 m2 = __floats2bfloat162_rn(-INFINITY, -INFINITY);
  for (int q0 = tid; q0 < nv; q0 += kLoadBatch * kThreads) {
    uint4 v[kLoadBatch];
#pragma unroll
    for (int b = 0; b < kLoadBatch; ++b) {
      const int q = q0 + b * kThreads;
      if (q < nv) v[b] = row_v[q];
    }
#pragma unroll
    for (int b = 0; b < kLoadBatch; ++b) {
      const int q = q0 + b * kThreads;
      if (q < nv) {
        const __nv_bfloat162* p = reinterpret_cast<const __nv_bfloat162*>(&v[b]);
        m2 = __hmax2(__hmax2(m2, p[0]), __hmax2(p[1], __hmax2(p[2], p[3])));
        srow_v[q] = v[b];
      }
    }
  }
  const float2 m2f = __bfloat1622float2(m2);
  float m = fmaxf(m2f.x, m2f.y);
  for (int64_t j = 8 * static_cast<int64_t>(nv) + tid; j < vocab; j += kThreads) {
    const float z = __bfloat162float(row[j]);
    srow[j] = row[j];
    m = fmaxf(m, z);
  }
  // The capped max: the same formula as every element's, so no l exceeds it.
  const float row_max = CappedFromU(CapSignedU(BlockReduce<kThreads>(m, MaxOp{}), k), cap);
  // The capped logits of 16-byte group q of the staged row, and their sign(z)·u.
  auto capped8 = [&](int q, float (&l)[8], float (&su)[8]) {
    float f[8];
    UnpackWords8(srow_v[q], f);
#pragma unroll
    for (int i = 0; i < 8; ++i) su[i] = CapSignedU(f[i], k);
#pragma unroll
    for (int i = 0; i < 8; ++i) l[i] = CappedFromU(su[i], cap);
  };
  auto su_at = [&](int64_t j) { return CapSignedU(__bfloat162float(srow[j]), k); };
  // 2. Σ exp(l − max).
  float s = 0.f;
  for (int q = tid; q < nv; q += kThreads) {
    float l[8], su[8];
    capped8(q, l, su);
#pragma unroll
    for (int i = 0; i < 8; ++i) s += expf(l[i] - row_max);
  }
  for (int64_t j = 8 * static_cast<int64_t>(nv) + tid; j < vocab; j += kThreads) s += expf(CappedFromU(su_at(j), cap) - row_max);
  const float lse = row_max + logf(BlockReduce<kThreads>(s, SumOp{}));
  const int32_t target = targets[r];
  if (tid == 0) {
    token_loss[r] = TokenLoss(lse, target, vocab, target >= 0 && target < vocab ? CappedFromU(su_at(target), cap) : 0.f);
  }
  if (!write_grad) return;
  // 3. G = loss_scale · (softmax(l) − onehot) · sech² over the row's own bytes.
  const GradElement grad(lse, loss_scale, target, vocab);
  if (grad.ignored) {
    for (int q = tid; q < nv; q += kThreads) reinterpret_cast<uint4*>(row)[q] = make_uint4(0, 0, 0, 0);
  } else {
    const int target_q = target < vocab ? target / 8 : -1;
    const bool bad = target >= vocab;
    for (int q = tid; q < nv; q += kThreads) {
      float l[8], su[8], g[8];
      capped8(q, l, su);
      if (q == target_q || bad) {
#pragma unroll
        for (int i = 0; i < 8; ++i) g[i] = grad(l[i], 8 * q + i) * SlopeFromU(su[i]);
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) g[i] = loss_scale * expf(l[i] - lse) * SlopeFromU(su[i]);
      }
      StoreBf16<8>(row + 8 * q, g);
    }
  }
  for (int64_t j = 8 * static_cast<int64_t>(nv) + tid; j < vocab; j += kThreads) {
    const float su = su_at(j);
    row[j] = __float2bfloat16_rn(grad(CappedFromU(su, cap), j) * SlopeFromU(su));
  }
}

__global__ void ce_loss_sum_kernel1(const float* token_loss, int64_t n, float loss_scale,
                                    double* loss_sum) {
  __shared__ double part[1024 / 32];
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc += static_cast<double>(token_loss[i]);
  acc = WarpSumDouble(acc);
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) total += part[w];
    *loss_sum = static_cast<double>(loss_scale) * total;
  }
}

// The row kernel for n rows of bf16 logits.
CudaResult LaunchRows(bf16* logits, int64_t ld, int64_t n, const LinearCrossEntropyArgs& a, int64_t c0,
                      bool grad, cudaStream_t stream) {
  // The staged row is the vocabulary rounded up to 16 bytes, whatever the buffer's stride.
  const int64_t row_smem = CeilDiv(a.vocab, 8) * 8 * static_cast<int64_t>(sizeof(bf16));
  if (a.logit_soft_cap > 0.f && row_smem <= kRowSmemMax) {
    CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(ce_row_kernel2_capped, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                              static_cast<int>(row_smem)));
    ce_row_kernel2_capped<<<static_cast<unsigned>(n), kRowThreads2, row_smem, stream>>>(
        logits, ld, a.vocab, a.targets + c0, a.loss_scale, a.token_loss + c0, grad, a.logit_soft_cap);
    CUDA_RETURN_IF_LAUNCH_ERROR("ce_row_kernel2_capped");
  } else if (a.logit_soft_cap > 0.f) {
    ce_row_kernel_capped<<<static_cast<unsigned>(n), kRowThreads1, 0, stream>>>(
        logits, ld, a.vocab, a.targets + c0, a.loss_scale, a.token_loss + c0, grad, a.logit_soft_cap);
    CUDA_RETURN_IF_LAUNCH_ERROR("ce_row_kernel_capped");
  } else if (row_smem <= kRowSmemMax && a.lean_rows) {
    CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(ce_row_kernel2_lean, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                              static_cast<int>(row_smem)));
    ce_row_kernel2_lean<<<static_cast<unsigned>(n), kRowThreads2, row_smem, stream>>>(
        logits, ld, a.vocab, a.targets + c0, a.loss_scale, a.token_loss + c0, grad);
    CUDA_RETURN_IF_LAUNCH_ERROR("ce_row_kernel2_lean");
  } else if (row_smem <= kRowSmemMax) {
    CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(ce_row_kernel2, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                              static_cast<int>(row_smem)));
    ce_row_kernel2<<<static_cast<unsigned>(n), kRowThreads2, row_smem, stream>>>(
        logits, ld, a.vocab, a.targets + c0, a.loss_scale, a.token_loss + c0, grad);
    CUDA_RETURN_IF_LAUNCH_ERROR("ce_row_kernel2");
  } else {
    ce_row_kernel1<<<static_cast<unsigned>(n), kRowThreads1, 0, stream>>>(
        logits, ld, a.vocab, a.targets + c0, a.loss_scale, a.token_loss + c0, grad);
    CUDA_RETURN_IF_LAUNCH_ERROR("ce_row_kernel1");
  }
  return {};
}

// GYRE_LCE_LD_ALIGN, read once: the default row-stride multiple of the logits buffer. Unset or 128
// (the default since session 19: rows padded to 128 columns and the products planned as at the
// padded vocabulary, the same plans and bits at a vocabulary that is a multiple of 128); 8 the
// previous stride (measurement only); any other value -1 (LinearCrossEntropy's error names it).
int64_t EnvLdAlign() {
  static const int64_t align = [] {
    const char* v = std::getenv("GYRE_LCE_LD_ALIGN");
    if (v == nullptr || std::string(v) == "128") return int64_t{128};
    return std::string(v) == "8" ? int64_t{8} : int64_t{-1};
  }();
  return align;
}

// The row-stride multiple for `a`: its ld_align, else GYRE_LCE_LD_ALIGN's (-1 for a bad value,
// which LinearCrossEntropy reports).
int64_t LdAlign(const LinearCrossEntropyArgs& a) { return a.ld_align > 0 ? a.ld_align : EnvLdAlign(); }

using VocabSplit = LinearCrossEntropyArgs::VocabSplit;

// GYRE_LCE_SPLIT, read once: the default of LinearCrossEntropyArgs::vocab_split. Unset or 1
// kWhereRejected (the default since session 20), 0 kOff (the old path, for A/B), 2 kAlways
// (measurement); any other value kFromEnv (LinearCrossEntropy's error names it).
VocabSplit EnvVocabSplit() {
  static const VocabSplit split = [] {
    const char* v = std::getenv("GYRE_LCE_SPLIT");
    if (v == nullptr || std::string(v) == "1") return VocabSplit::kWhereRejected;
    if (std::string(v) == "0") return VocabSplit::kOff;
    return std::string(v) == "2" ? VocabSplit::kAlways : VocabSplit::kFromEnv;
  }();
  return split;
}

VocabSplit SplitMode(const LinearCrossEntropyArgs& a) {
  return a.vocab_split != VocabSplit::kFromEnv ? a.vocab_split : EnvVocabSplit();
}

// The split boundary: the vocabulary's last multiple of 128 (cuBLASLt's TMA kernels take
// products whose dimensions are multiples of 128; the offsets V128 · 2 bytes of a logits or G row
// and V128 rows of W or dW keep the pieces' pointers 256-byte aligned).
constexpr int64_t kSplitAlign = 128;

// Which of a product's dimensions is the vocabulary.
enum class VocabAxis {
  kN,  // logits [n, V] = h Wᵀ: C's columns and W's rows
  kK,  // dh = G W: the reduction (G's columns, W's rows)
  kM,  // dW = Gᵀ h: C's rows and Gᵀ's rows (G's columns)
};

const void* ByteOffset(const void* p, int64_t bytes) { return static_cast<const char*>(p) + bytes; }

// One of the LM head's products `g` (vocabulary `vocab` along `axis`), whole or split at V128
// (LinearCrossEntropyArgs::vocab_split). The pieces keep g's plan_round: the body's vocabulary
// dimension is a multiple of 128 already; the tail's (V mod 128 columns, ~0.2% of the work at
// GPT-2's vocabulary) takes whichever plan cuBLASLt accepts.
CudaResult VocabProduct(GemmContext* gemm, const GemmArgs& g, VocabAxis axis, int64_t vocab, VocabSplit mode,
                        cudaStream_t stream) {
  const int64_t body = vocab / kSplitAlign * kSplitAlign;
  bool split = mode == VocabSplit::kAlways && body > 0 && body < vocab;
  if (mode == VocabSplit::kWhereRejected && body > 0 && body < vocab) {
    CUDA_RETURN_IF_NOT_OK(gemm->RoundedPlanRejected(g, stream, &split));
  }
  if (!split) return gemm->Gemm(g, stream);
  constexpr int64_t kBf16Bytes = sizeof(bf16);
  const int64_t c_bytes = g.c_dtype == DType::kBf16 ? 2 : 4;
  GemmArgs head = g, tail = g;
  switch (axis) {
    case VocabAxis::kN:  // W [V, d] (trans_b): rows; C [rows, V]: columns
      head.n = body;
      tail.n = vocab - body;
      tail.b = ByteOffset(g.b, body * g.ldb * kBf16Bytes);
      tail.c = const_cast<void*>(ByteOffset(g.c, body * c_bytes));
      break;
    case VocabAxis::kM:  // Gᵀ (trans_a: G [k, V] stored): G's columns; dW [V, d]: rows
      head.m = body;
      tail.m = vocab - body;
      tail.a = ByteOffset(g.a, body * kBf16Bytes);
      tail.c = const_cast<void*>(ByteOffset(g.c, body * g.ldc * c_bytes));
      break;
    case VocabAxis::kK: {  // G [m, V]: columns; W [V, d]: rows. The tail first, the body onto it.
      if (g.beta != 0.f || g.c_in != nullptr) return InvalidArgument("VocabProduct: a split reduction must overwrite");
      tail.k = vocab - body;
      tail.a = ByteOffset(g.a, body * kBf16Bytes);
      tail.b = ByteOffset(g.b, body * g.ldb * kBf16Bytes);
      head.k = body;
      head.beta = 1.f;
      CUDA_RETURN_IF_NOT_OK(gemm->Gemm(tail, stream));
      return gemm->Gemm(head, stream);
    }
  }
  CUDA_RETURN_IF_NOT_OK(gemm->Gemm(head, stream));
  return gemm->Gemm(tail, stream);
}

bool EnvFlag(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && v[0] == '1';
}

int64_t PtrAlignment(const void* p) {
  const uintptr_t v = reinterpret_cast<uintptr_t>(p);
  int64_t a = 1;
  while (a < 256 && v % (2 * a) == 0) a *= 2;
  return a;
}

// GYRE_LCE_TIMING=1 (measurement only): events around each phase of each chunk, summed per
// phase, printed after the call (which then synchronises the stream).
class PhaseTimer {
 public:
  explicit PhaseTimer(cudaStream_t stream) : stream_(stream) {}
  ~PhaseTimer() {
    for (cudaEvent_t e : events_) cudaEventDestroy(e);
  }
  // Marks the end of the phase `phase` (and the start of the next) on the stream.
  void Mark(int phase) {
    cudaEvent_t e = nullptr;
    if (cudaEventCreate(&e) != cudaSuccess) return;
    cudaEventRecord(e, stream_);
    events_.push_back(e);
    phases_.push_back(phase);
  }
  // Milliseconds per phase (index 0..kPhases-1), after a synchronisation.
  static constexpr int kPhases = 4;  // logits, rows, dh, dW
  void Sum(double (&ms)[kPhases]) {
    for (double& m : ms) m = 0;
    if (events_.empty()) return;
    cudaEventSynchronize(events_.back());
    for (size_t i = 1; i < events_.size(); ++i) {
      float t = 0;
      if (cudaEventElapsedTime(&t, events_[i - 1], events_[i]) == cudaSuccess && phases_[i] >= 0) ms[phases_[i]] += t;
    }
  }

 private:
  cudaStream_t stream_;
  std::vector<cudaEvent_t> events_;
  std::vector<int> phases_;
};

}  // namespace

int64_t LogitsRowStride(const LinearCrossEntropyArgs& a) {
  const int64_t align = std::max<int64_t>(8, LdAlign(a));
  return CeilDiv(a.vocab, align) * align;
}

CudaResult CrossEntropyRows(bf16* logits, int64_t ld, int64_t rows, const LinearCrossEntropyArgs& a, bool grad,
                            cudaStream_t stream) {
  if (rows <= 0 || ld < a.vocab || ld % 8 != 0 || !logits || !a.targets || !a.token_loss) {
    return InvalidArgument("CrossEntropyRows: bad shape or missing pointer");
  }
  return LaunchRows(logits, ld, rows, a, 0, grad, stream);
}

CudaResult LinearCrossEntropy(GemmContext* gemm, DeviceAllocator* alloc,
                              const LinearCrossEntropyArgs& a, cudaStream_t stream) {
  if (a.tokens < 0 || a.dim <= 0 || a.vocab <= 0 || a.chunk_tokens <= 0 || !a.h || !a.w ||
      !a.targets || !a.token_loss || !a.loss_sum) {
    return InvalidArgument("LinearCrossEntropy: bad shape or missing pointer");
  }
  if (a.chunk_tokens > 0x7fffffff) return InvalidArgument("LinearCrossEntropy: chunk too large");
  if (!(a.logit_soft_cap >= 0.f) || std::isinf(a.logit_soft_cap))
    return InvalidArgument("LinearCrossEntropy: logit_soft_cap must be finite and >= 0 (0 = off)");
  const int64_t align = LdAlign(a);
  if (align < 0)
    return InvalidArgument(std::string("GYRE_LCE_LD_ALIGN must be 8 or 128 (or unset), got '") +
                           std::getenv("GYRE_LCE_LD_ALIGN") + "'");
  const VocabSplit split = SplitMode(a);
  if (split == VocabSplit::kFromEnv)
    return InvalidArgument(std::string("GYRE_LCE_SPLIT must be 0, 1 or 2 (or unset), got '") +
                           std::getenv("GYRE_LCE_SPLIT") + "'");
  const bool grad = a.dh != nullptr || a.dw != nullptr;
  const int64_t ld = LogitsRowStride(a);
  if (ld % 8 != 0) return InvalidArgument("LinearCrossEntropy: ld_align must be a multiple of 8");
  // Plans as at the padded vocabulary (a vocabulary that is a multiple already keeps its plans).
  const int64_t plan_round = a.plan_as_padded && align >= 128 && a.vocab % align != 0 ? align : 0;
  static const bool timing = EnvFlag("GYRE_LCE_TIMING");
  std::unique_ptr<PhaseTimer> phases;
  double alloc_ms = 0;
  AllocatorStats stats0;
  if (timing) {
    CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
    phases = std::make_unique<PhaseTimer>(stream);
    stats0 = alloc->stats();
  }
  const auto host_t0 = timing ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point{};
  const int64_t chunk = std::min(a.chunk_tokens, std::max<int64_t>(a.tokens, 1));
  if (a.dw != nullptr && a.overwrite_dw && a.tokens == 0) {
    CUDA_RETURN_IF_ERROR(cudaMemsetAsync(a.dw, 0, sizeof(float) * a.vocab * a.dim, stream));
  }
  DeviceBuffer logits_buf;
  CUDA_RETURN_IF_NOT_OK(alloc->Allocate(sizeof(bf16) * chunk * ld, &logits_buf));
  bf16* logits = logits_buf.as<bf16>();
  if (phases) {
    alloc_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - host_t0).count();
    phases->Mark(-1);
  }
  for (int64_t c0 = 0; c0 < a.tokens; c0 += chunk) {
    const int64_t n = std::min(chunk, a.tokens - c0);
    const bf16* h_c = a.h + c0 * a.dim;
    // 1. logits [n, V] = h_c Wᵀ (bf16 out, fp32 accumulation).
    GemmArgs g1;
    g1.trans_b = true;
    g1.m = n;
    g1.n = a.vocab;
    g1.k = a.dim;
    g1.a = h_c;
    g1.lda = a.dim;
    g1.b = a.w;
    g1.ldb = a.dim;
    g1.c = logits;
    g1.ldc = ld;
    g1.plan_round = plan_round;
    g1.c_dtype = DType::kBf16;
    CUDA_RETURN_IF_NOT_OK(VocabProduct(gemm, g1, VocabAxis::kN, a.vocab, split, stream));
    if (phases) phases->Mark(0);
    // 2. loss and G (in place, bf16).
    CUDA_RETURN_IF_NOT_OK(LaunchRows(logits, ld, n, a, c0, grad, stream));
    if (phases) phases->Mark(1);
    if (a.dh != nullptr) {
      // 3. dh_c [n, d] = G [n, V] · W [V, d].
      GemmArgs g2;
      g2.m = n;
      g2.n = a.dim;
      g2.k = a.vocab;
      g2.a = logits;
      g2.lda = ld;
      g2.b = a.w;
      g2.ldb = a.dim;
      g2.c = a.dh + c0 * a.dim;
      g2.ldc = a.dim;
      g2.plan_round = plan_round;
      g2.c_dtype = DType::kBf16;
      CUDA_RETURN_IF_NOT_OK(VocabProduct(gemm, g2, VocabAxis::kK, a.vocab, split, stream));
      if (phases) phases->Mark(2);
    }
    if (a.dw != nullptr) {
      // 4. dW [V, d] (+)= Gᵀ [V, n] · h_c [n, d]; the first chunk overwrites under overwrite_dw.
      GemmArgs g3;
      g3.trans_a = true;
      g3.m = a.vocab;
      g3.n = a.dim;
      g3.k = n;
      g3.a = logits;
      g3.lda = ld;
      g3.b = h_c;
      g3.ldb = a.dim;
      g3.c = a.dw;
      g3.ldc = a.dim;
      g3.plan_round = plan_round;
      g3.c_dtype = DType::kF32;
      g3.beta = (c0 == 0 && a.overwrite_dw) ? 0.f : 1.f;
      CUDA_RETURN_IF_NOT_OK(VocabProduct(gemm, g3, VocabAxis::kM, a.vocab, split, stream));
      if (phases) phases->Mark(3);
    }
  }
  if (phases) {
    double ms[PhaseTimer::kPhases];
    phases->Sum(ms);
    const AllocatorStats stats1 = alloc->stats();
    std::fprintf(stderr,
                 "lce-timing N=%ld d=%ld V=%ld ld=%ld chunk=%ld | alloc %.3f ms (host), cudaMalloc +%lu, cudaFree +%lu | "
                 "logits %.3f | rows %.3f | dh %.3f | dW %.3f ms | align h %ld w %ld dh %ld dw %ld\n",
                 (long)a.tokens, (long)a.dim, (long)a.vocab, (long)ld, (long)chunk, alloc_ms,
                 (unsigned long)(stats1.device_mallocs - stats0.device_mallocs),
                 (unsigned long)(stats1.device_frees - stats0.device_frees), ms[0], ms[1], ms[2], ms[3],
                 (long)PtrAlignment(a.h), (long)PtrAlignment(a.w), (long)PtrAlignment(a.dh), (long)PtrAlignment(a.dw));
  }
  ce_loss_sum_kernel1<<<1, 1024, 0, stream>>>(a.token_loss, a.tokens, a.loss_scale, a.loss_sum);
  CUDA_RETURN_IF_LAUNCH_ERROR("ce_loss_sum_kernel1");
  return {};
}

}  // namespace gyre::cuda
