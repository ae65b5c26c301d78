// Fused linear + cross-entropy over token chunks; the algorithm and costs are in cross_entropy.h.
//
//   ce_row_kernel2<T>   block per token row, the row staged in shared memory (V · sizeof(T) <=
//                       226 KiB): online (max, sum) while staging with 16-byte loads, the
//                       block-combined log-sum-exp, the token loss, then G in place as bf16 from
//                       the staged row (16 or 8-byte stores).
//   ce_row_kernel1<T>   the same for larger vocabularies (512 threads), reading the row twice.
//   ce_loss_sum_kernel1 one block: Σ token_loss in double, fixed order (deterministic).
// T is the logits' type: __nv_bfloat16 (default) or float. The row kernels share the device
// functions below (online max/sum, block log-sum-exp, token loss, gradient element).
#include "kernels/cuda/cross_entropy.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/vec_util.cuh"

namespace gyre::cuda {
namespace {

constexpr float kNaN = __builtin_nanf("");

__device__ __forceinline__ float ToFloat(float x) { return x; }
__device__ __forceinline__ float ToFloat(__nv_bfloat16 x) { return __bfloat162float(x); }

// Running (max, Σ exp(l − max)) of one thread's logits.
struct MaxSum {
  float m = -INFINITY, s = 0.f;
  __device__ __forceinline__ void Add(float l) {
    if (l > m) {
      s = s * expf(m - l) + 1.f;
      m = l;
    } else {
      s += expf(l - m);
    }
  }
  __device__ __forceinline__ void Combine(float m2, float s2) {
    const float mn = fmaxf(m, m2);
    if (mn == -INFINITY) {
      m = mn;
      s = 0.f;
      return;
    }
    s = s * expf(m - mn) + s2 * expf(m2 - mn);
    m = mn;
  }
};

// log Σ exp over the block's rows of (m, s): warp shuffles, then one thread over the warps.
// Every thread gets the result. Its barriers also order every thread's reads of the row before
// any thread's G writes (G overwrites the row in place).
template <int kThreads>
__device__ __forceinline__ float BlockLogSumExp(MaxSum ms) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, ms.m, off);
    const float s2 = __shfl_xor_sync(0xffffffffu, ms.s, off);
    ms.Combine(m2, s2);
  }
  __shared__ float sh_m[kThreads / 32], sh_s[kThreads / 32];
  __shared__ float sh_lse;
  const int tid = threadIdx.x;
  if (tid % 32 == 0) {
    sh_m[tid / 32] = ms.m;
    sh_s[tid / 32] = ms.s;
  }
  __syncthreads();
  if (tid == 0) {
    MaxSum b{sh_m[0], sh_s[0]};
    for (int w = 1; w < kThreads / 32; ++w) b.Combine(sh_m[w], sh_s[w]);
    sh_lse = b.m + logf(b.s);
  }
  __syncthreads();
  return sh_lse;
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

// 16 bytes of T as floats (4 fp32 or 8 bf16).
template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));

template <typename T>
__device__ __forceinline__ void Unpack(const uint4& raw, float (&f)[kVec<T>]) {
  if constexpr (sizeof(T) == 4) {
    f[0] = __uint_as_float(raw.x);
    f[1] = __uint_as_float(raw.y);
    f[2] = __uint_as_float(raw.z);
    f[3] = __uint_as_float(raw.w);
  } else {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 v = __bfloat1622float2(h[i]);
      f[2 * i] = v.x;
      f[2 * i + 1] = v.y;
    }
  }
}

// kN floats -> kN bf16 at p (8 or 16 bytes, aligned to that).
template <int kN>
__device__ __forceinline__ void StoreGrad(__nv_bfloat16* p, const float (&g)[kN]) {
  if constexpr (kN == 8) {
    StoreBf16<8>(p, g);
  } else {
    static_assert(kN == 4);
    const __nv_bfloat162 a = __floats2bfloat162_rn(g[0], g[1]);
    const __nv_bfloat162 b = __floats2bfloat162_rn(g[2], g[3]);
    uint2 u;
    u.x = *reinterpret_cast<const uint32_t*>(&a);
    u.y = *reinterpret_cast<const uint32_t*>(&b);
    *reinterpret_cast<uint2*>(p) = u;
  }
}

// Threads of the shared-memory row kernel: fp32 rows (201 KB at V = 50304) fit one block per
// SM, so 1024 threads; bf16 rows (101 KB) fit two blocks of 512.
template <typename T>
constexpr int kRowThreads2 = sizeof(T) == 4 ? 1024 : 512;
template <typename T>
constexpr int kRowBlocksPerSm2 = sizeof(T) == 4 ? 1 : 2;
constexpr int64_t kRowSmemMax = 226 * 1024;  // the 227 KiB opt-in maximum less the static part

template <typename T>
__global__ void __launch_bounds__(kRowThreads2<T>, kRowBlocksPerSm2<T>)
ce_row_kernel2(T* logits, int64_t ld, int64_t vocab, const int32_t* targets, float loss_scale,
               float* token_loss, bool write_grad) {
  constexpr int kThreads = kRowThreads2<T>;
  constexpr int kN = kVec<T>;
  extern __shared__ uint4 srow_v[];
  T* srow = reinterpret_cast<T*>(srow_v);
  const int64_t r = blockIdx.x;
  T* row = logits + r * ld;
  const int tid = threadIdx.x;
  const int64_t nv = vocab / kN;
  const uint4* row_v = reinterpret_cast<const uint4*>(row);  // rows are 16-byte aligned (ld % 8 == 0)
  MaxSum ms;
#pragma unroll 4
  for (int64_t q = tid; q < nv; q += kThreads) {
    const uint4 v = row_v[q];
    srow_v[q] = v;
    float f[kN];
    Unpack<T>(v, f);
#pragma unroll
    for (int i = 0; i < kN; ++i) ms.Add(f[i]);
  }
  for (int64_t j = kN * nv + tid; j < vocab; j += kThreads) {
    const T l = row[j];
    srow[j] = l;
    ms.Add(ToFloat(l));
  }
  const float lse = BlockLogSumExp<kThreads>(ms);
  const int32_t target = targets[r];
  if (tid == 0) {
    token_loss[r] = TokenLoss(lse, target, vocab, target >= 0 && target < vocab ? ToFloat(srow[target]) : 0.f);
  }
  if (!write_grad) return;
  const GradElement grad(lse, loss_scale, target, vocab);
  __nv_bfloat16* g = reinterpret_cast<__nv_bfloat16*>(row);
#pragma unroll 4
  for (int64_t q = tid; q < nv; q += kThreads) {
    float f[kN];
    Unpack<T>(srow_v[q], f);
#pragma unroll
    for (int i = 0; i < kN; ++i) f[i] = grad(f[i], kN * q + i);
    StoreGrad<kN>(g + kN * q, f);
  }
  for (int64_t j = kN * nv + tid; j < vocab; j += kThreads) g[j] = __float2bfloat16_rn(grad(ToFloat(srow[j]), j));
}

// Rows too long for shared memory: the row is read twice from global memory.
constexpr int kRowThreads1 = 512;
constexpr int kTileK = 4;  // fp32 rows: elements per thread per in-place tile

template <typename T>
__global__ void __launch_bounds__(kRowThreads1)
ce_row_kernel1(T* logits, int64_t ld, int64_t vocab, const int32_t* targets, float loss_scale,
               float* token_loss, bool write_grad) {
  const int64_t r = blockIdx.x;
  T* row = logits + r * ld;
  const int tid = threadIdx.x;
  MaxSum ms;
  for (int64_t j = tid; j < vocab; j += kRowThreads1) ms.Add(ToFloat(row[j]));
  const int32_t target = targets[r];
  // Read before the barriers: G may overwrite the target's bytes right after them.
  const float target_logit = tid == 0 && target >= 0 && target < vocab ? ToFloat(row[target]) : 0.f;
  const float lse = BlockLogSumExp<kRowThreads1>(ms);
  if (tid == 0) token_loss[r] = TokenLoss(lse, target, vocab, target_logit);
  if (!write_grad) return;
  const GradElement grad(lse, loss_scale, target, vocab);
  __nv_bfloat16* g = reinterpret_cast<__nv_bfloat16*>(row);
  if constexpr (sizeof(T) == 2) {
    // Same size: each thread overwrites only the elements it reads.
    for (int64_t j = tid; j < vocab; j += kRowThreads1) g[j] = __float2bfloat16_rn(grad(ToFloat(row[j]), j));
  } else {
    // bf16 element j lands in bytes [2j, 2j+2) of the fp32 row: tile by tile, every read of a tile
    // before a barrier, then its writes (inside elements already read).
    constexpr int64_t kTile = static_cast<int64_t>(kRowThreads1) * kTileK;
    for (int64_t t0 = 0; t0 < vocab; t0 += kTile) {
      float vals[kTileK];
#pragma unroll
      for (int k = 0; k < kTileK; ++k) {
        const int64_t j = t0 + k * kRowThreads1 + tid;
        vals[k] = j < vocab ? row[j] : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int k = 0; k < kTileK; ++k) {
        const int64_t j = t0 + k * kRowThreads1 + tid;
        if (j < vocab) g[j] = __float2bfloat16_rn(grad(vals[k], j));
      }
      __syncthreads();
    }
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

// Launches the row kernel for n rows of T logits.
template <typename T>
CudaResult LaunchRows(T* logits, int64_t ld, int64_t n, const LinearCrossEntropyArgs& a, int64_t c0,
                      bool grad, cudaStream_t stream) {
  const int64_t row_smem = ld * static_cast<int64_t>(sizeof(T));
  if (row_smem <= kRowSmemMax) {
    CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(ce_row_kernel2<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                              static_cast<int>(row_smem)));
    ce_row_kernel2<T><<<static_cast<unsigned>(n), kRowThreads2<T>, row_smem, stream>>>(
        logits, ld, a.vocab, a.targets + c0, a.loss_scale, a.token_loss + c0, grad);
    CUDA_RETURN_IF_LAUNCH_ERROR("ce_row_kernel2");
  } else {
    ce_row_kernel1<T><<<static_cast<unsigned>(n), kRowThreads1, 0, stream>>>(
        logits, ld, a.vocab, a.targets + c0, a.loss_scale, a.token_loss + c0, grad);
    CUDA_RETURN_IF_LAUNCH_ERROR("ce_row_kernel1");
  }
  return {};
}

// Owns the side stream and events of the overlapped schedule for one call.
struct SideStream {
  cudaStream_t stream = nullptr;
  cudaEvent_t logits_ready = nullptr, rows_done[2] = {nullptr, nullptr};
  ~SideStream() {
    if (logits_ready) cudaEventDestroy(logits_ready);
    for (cudaEvent_t e : rows_done)
      if (e) cudaEventDestroy(e);
    if (stream) cudaStreamDestroy(stream);
  }
  CudaResult Init() {
    CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&logits_ready, cudaEventDisableTiming));
    for (cudaEvent_t& e : rows_done) CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    return {};
  }
};

}  // namespace

CudaResult LinearCrossEntropy(GemmContext* gemm, DeviceAllocator* alloc,
                              const LinearCrossEntropyArgs& a, cudaStream_t stream) {
  if (a.tokens < 0 || a.dim <= 0 || a.vocab <= 0 || a.chunk_tokens <= 0 || !a.h || !a.w ||
      !a.targets || !a.token_loss || !a.loss_sum) {
    return InvalidArgument("LinearCrossEntropy: bad shape or missing pointer");
  }
  if (a.chunk_tokens > 0x7fffffff) return InvalidArgument("LinearCrossEntropy: chunk too large");
  const bool grad = a.dh != nullptr || a.dw != nullptr;
  const int64_t ld = CeilDiv(a.vocab, 8) * 8;
  const int64_t chunk = std::min(a.chunk_tokens, std::max<int64_t>(a.tokens, 1));
  const int64_t chunks = CeilDiv(a.tokens, chunk);
  if (a.dw != nullptr && a.overwrite_dw && a.tokens == 0) {
    CUDA_RETURN_IF_ERROR(cudaMemsetAsync(a.dw, 0, sizeof(float) * a.vocab * a.dim, stream));
  }
  const size_t elem = a.bf16_logits ? sizeof(__nv_bfloat16) : sizeof(float);
  const bool overlap = a.overlap_rows && chunks > 1;
  SideStream side;
  if (overlap) CUDA_RETURN_IF_NOT_OK(side.Init());
  const cudaStream_t row_stream = overlap ? side.stream : stream;
  DeviceBuffer logits_buf[2];
  for (int b = 0; b < (overlap ? 2 : 1); ++b) {
    CUDA_RETURN_IF_NOT_OK(alloc->Allocate(elem * chunk * ld, &logits_buf[b]));
  }
  // 1. logits [n, V] = h_c Wᵀ (bf16 or fp32 out, fp32 accumulation); 2. loss and G in place.
  auto logits_and_rows = [&](int64_t i) -> CudaResult {
    const int64_t c0 = i * chunk, n = std::min(chunk, a.tokens - c0);
    void* logits = logits_buf[overlap ? i % 2 : 0].get();
    GemmArgs g1;
    g1.trans_b = true;
    g1.m = n;
    g1.n = a.vocab;
    g1.k = a.dim;
    g1.a = a.h + c0 * a.dim;
    g1.lda = a.dim;
    g1.b = a.w;
    g1.ldb = a.dim;
    g1.c = logits;
    g1.ldc = ld;
    g1.c_dtype = a.bf16_logits ? DType::kBf16 : DType::kF32;
    CUDA_RETURN_IF_NOT_OK(gemm->Gemm(g1, stream));
    if (overlap) {
      CUDA_RETURN_IF_ERROR(cudaEventRecord(side.logits_ready, stream));
      CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(row_stream, side.logits_ready, 0));
    }
    if (a.bf16_logits) {
      CUDA_RETURN_IF_NOT_OK(LaunchRows(static_cast<__nv_bfloat16*>(logits), ld, n, a, c0, grad, row_stream));
    } else {
      CUDA_RETURN_IF_NOT_OK(LaunchRows(static_cast<float*>(logits), ld, n, a, c0, grad, row_stream));
    }
    if (overlap) CUDA_RETURN_IF_ERROR(cudaEventRecord(side.rows_done[i % 2], row_stream));
    return {};
  };
  // Overlapped schedule (two logit buffers): the logits GEMM of chunk i+1 is issued before the
  // backward GEMMs of chunk i, so the row kernel of chunk i (side stream) can run beside it and
  // that of chunk i+1 beside the backward GEMMs of chunk i. Buffer (i+1) % 2 was last read by
  // chunk i-1's backward GEMMs, earlier on the main stream.
  if (chunks > 0) CUDA_RETURN_IF_NOT_OK(logits_and_rows(0));
  for (int64_t i = 0; i < chunks; ++i) {
    if (overlap && i + 1 < chunks) CUDA_RETURN_IF_NOT_OK(logits_and_rows(i + 1));
    if (overlap) CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(stream, side.rows_done[i % 2], 0));
    const int64_t c0 = i * chunk, n = std::min(chunk, a.tokens - c0);
    const void* g_bf16 = logits_buf[overlap ? i % 2 : 0].get();
    const int64_t ldg = a.bf16_logits ? ld : 2 * ld;  // G's row stride in bf16 elements
    if (a.dh != nullptr) {
      // 3. dh_c [n, d] = G [n, V] · W [V, d].
      GemmArgs g2;
      g2.m = n;
      g2.n = a.dim;
      g2.k = a.vocab;
      g2.a = g_bf16;
      g2.lda = ldg;
      g2.b = a.w;
      g2.ldb = a.dim;
      g2.c = a.dh + c0 * a.dim;
      g2.ldc = a.dim;
      g2.c_dtype = DType::kBf16;
      CUDA_RETURN_IF_NOT_OK(gemm->Gemm(g2, stream));
    }
    if (a.dw != nullptr) {
      // 4. dW [V, d] (+)= Gᵀ [V, n] · h_c [n, d]; the first chunk overwrites under overwrite_dw.
      GemmArgs g3;
      g3.trans_a = true;
      g3.m = a.vocab;
      g3.n = a.dim;
      g3.k = n;
      g3.a = g_bf16;
      g3.lda = ldg;
      g3.b = a.h + c0 * a.dim;
      g3.ldb = a.dim;
      g3.c = a.dw;
      g3.ldc = a.dim;
      g3.c_dtype = DType::kF32;
      g3.beta = (i == 0 && a.overwrite_dw) ? 0.f : 1.f;
      CUDA_RETURN_IF_NOT_OK(gemm->Gemm(g3, stream));
    }
    if (!overlap && i + 1 < chunks) CUDA_RETURN_IF_NOT_OK(logits_and_rows(i + 1));
  }
  ce_loss_sum_kernel1<<<1, 1024, 0, stream>>>(a.token_loss, a.tokens, a.loss_scale, a.loss_sum);
  CUDA_RETURN_IF_LAUNCH_ERROR("ce_loss_sum_kernel1");
  return {};
}

}  // namespace gyre::cuda
