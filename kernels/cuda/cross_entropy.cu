// Fused linear + cross-entropy over token chunks; the algorithm and costs are in cross_entropy.h.
//
//   ce_row_kernel2      block per token row (1024 threads), the row staged in shared memory
//                       (vocab <= ~58K): online (max, sum) while staging, block-combined; the
//                       token loss; then G in place as bf16 from the staged row.
//   ce_row_kernel1      the same for larger vocabularies (512 threads), reading the row twice.
//   ce_loss_sum_kernel1 one block: Σ token_loss in double, fixed order (deterministic).
#include "kernels/cuda/cross_entropy.h"

#include <cmath>
#include <string>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/vec_util.cuh"

namespace gyre::cuda {
namespace {

constexpr int kRowThreads = 512;
constexpr int kTileK = 4;  // elements per thread per in-place tile

__device__ __forceinline__ void CombineMaxSum(float& m, float& s, float m2, float s2) {
  const float mn = fmaxf(m, m2);
  if (mn == -INFINITY) {
    m = mn;
    s = 0.f;
    return;
  }
  s = s * expf(m - mn) + s2 * expf(m2 - mn);
  m = mn;
}

// logits: fp32 rows of stride ld (elements); G: bf16 view of the same memory, row stride 2·ld.
__global__ void __launch_bounds__(kRowThreads)
ce_row_kernel1(float* logits, int64_t ld, int64_t vocab, const int32_t* targets, float loss_scale,
               float* token_loss, bool write_grad) {
  const int64_t r = blockIdx.x;
  float* row = logits + r * ld;
  const int tid = threadIdx.x;
  float m = -INFINITY, s = 0.f;
  for (int64_t j = tid; j < vocab; j += kRowThreads) {
    const float l = row[j];
    if (l > m) {
      s = s * expf(m - l) + 1.f;
      m = l;
    } else {
      s += expf(l - m);
    }
  }
  // Warp combine, then across warps through shared memory.
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, off);
    const float s2 = __shfl_xor_sync(0xffffffffu, s, off);
    CombineMaxSum(m, s, m2, s2);
  }
  __shared__ float sh_m[kRowThreads / 32], sh_s[kRowThreads / 32];
  __shared__ float sh_lse;
  if (tid % 32 == 0) {
    sh_m[tid / 32] = m;
    sh_s[tid / 32] = s;
  }
  __syncthreads();
  const int32_t target = targets[r];
  if (tid == 0) {
    float bm = sh_m[0], bs = sh_s[0];
    for (int w = 1; w < kRowThreads / 32; ++w) CombineMaxSum(bm, bs, sh_m[w], sh_s[w]);
    const float lse = bm + logf(bs);
    sh_lse = lse;
    float loss;
    if (target < 0) {
      loss = 0.f;
    } else if (target >= vocab) {
      loss = __int_as_float(0x7fc00000);
    } else {
      loss = lse - row[target];
    }
    token_loss[r] = loss;
  }
  __syncthreads();
  if (!write_grad) return;
  const float lse = sh_lse;
  const bool ignored = target < 0;
  const float bad = target >= vocab ? __int_as_float(0x7fc00000) : 0.f;
  __nv_bfloat16* g = reinterpret_cast<__nv_bfloat16*>(row);
  constexpr int64_t kTile = static_cast<int64_t>(kRowThreads) * kTileK;
  for (int64_t t0 = 0; t0 < vocab; t0 += kTile) {
    float vals[kTileK];
#pragma unroll
    for (int k = 0; k < kTileK; ++k) {
      const int64_t j = t0 + k * kRowThreads + tid;
      vals[k] = j < vocab ? row[j] : 0.f;
    }
    __syncthreads();  // every read of this tile happens before any write into its bytes
#pragma unroll
    for (int k = 0; k < kTileK; ++k) {
      const int64_t j = t0 + k * kRowThreads + tid;
      if (j < vocab) {
        float grad = 0.f;
        if (!ignored) {
          grad = loss_scale * (expf(vals[k] - lse) - (j == target ? 1.f : 0.f)) + bad;
        }
        g[j] = __float2bfloat16_rn(grad);
      }
    }
    __syncthreads();  // writes of this tile land before the next tile's reads (bytes < 2·t0')
  }
}

// The same row work with the row staged in shared memory (vocab · 4 bytes <= kRowSmemMax): one
// 16-byte read of each logit from global memory (kernel1 reads the row twice: the online pass,
// then the gradient tiles), then G written from shared memory. One block of kRowThreads2 per SM.
constexpr int kRowThreads2 = 1024;
constexpr int64_t kRowSmemMax = 226 * 1024;  // the 227 KiB opt-in maximum less the static part
__global__ void __launch_bounds__(kRowThreads2)
ce_row_kernel2(float* logits, int64_t ld, int64_t vocab, const int32_t* targets, float loss_scale,
               float* token_loss, bool write_grad) {
  extern __shared__ float4 srow4[];
  float* srow = reinterpret_cast<float*>(srow4);
  const int64_t r = blockIdx.x;
  float* row = logits + r * ld;
  const int tid = threadIdx.x;
  const int64_t n4 = vocab / 4;
  const float4* row4 = reinterpret_cast<const float4*>(row);  // rows are 32-byte aligned (ld % 8 == 0)
  float m = -INFINITY, s = 0.f;
  auto add = [&](float l) {
    if (l > m) {
      s = s * expf(m - l) + 1.f;
      m = l;
    } else {
      s += expf(l - m);
    }
  };
#pragma unroll 4
  for (int64_t q = tid; q < n4; q += kRowThreads2) {
    const float4 v = row4[q];
    srow4[q] = v;
    add(v.x);
    add(v.y);
    add(v.z);
    add(v.w);
  }
  for (int64_t j = 4 * n4 + tid; j < vocab; j += kRowThreads2) {
    const float l = row[j];
    srow[j] = l;
    add(l);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, off);
    const float s2 = __shfl_xor_sync(0xffffffffu, s, off);
    CombineMaxSum(m, s, m2, s2);
  }
  __shared__ float sh_m[kRowThreads2 / 32], sh_s[kRowThreads2 / 32];
  __shared__ float sh_lse;
  if (tid % 32 == 0) {
    sh_m[tid / 32] = m;
    sh_s[tid / 32] = s;
  }
  __syncthreads();  // also: every global read of the row is done before G overwrites it
  const int32_t target = targets[r];
  if (tid == 0) {
    float bm = sh_m[0], bs = sh_s[0];
    for (int w = 1; w < kRowThreads2 / 32; ++w) CombineMaxSum(bm, bs, sh_m[w], sh_s[w]);
    const float lse = bm + logf(bs);
    sh_lse = lse;
    float loss;
    if (target < 0) {
      loss = 0.f;
    } else if (target >= vocab) {
      loss = __int_as_float(0x7fc00000);
    } else {
      loss = lse - srow[target];
    }
    token_loss[r] = loss;
  }
  __syncthreads();
  if (!write_grad) return;
  const float lse = sh_lse;
  const bool ignored = target < 0;
  const float bad = target >= vocab ? __int_as_float(0x7fc00000) : 0.f;
  auto grad = [&](float l, int64_t j) {
    return ignored ? 0.f : loss_scale * (expf(l - lse) - (j == target ? 1.f : 0.f)) + bad;
  };
  __nv_bfloat16* g = reinterpret_cast<__nv_bfloat16*>(row);
  uint2* g4 = reinterpret_cast<uint2*>(row);  // 4 bf16 = 8 bytes per group of 4 logits
#pragma unroll 4
  for (int64_t q = tid; q < n4; q += kRowThreads2) {
    const float4 v = srow4[q];
    const int64_t j = 4 * q;
    const __nv_bfloat162 a = __floats2bfloat162_rn(grad(v.x, j), grad(v.y, j + 1));
    const __nv_bfloat162 b = __floats2bfloat162_rn(grad(v.z, j + 2), grad(v.w, j + 3));
    uint2 u;
    u.x = *reinterpret_cast<const uint32_t*>(&a);
    u.y = *reinterpret_cast<const uint32_t*>(&b);
    g4[q] = u;
  }
  for (int64_t j = 4 * n4 + tid; j < vocab; j += kRowThreads2) g[j] = __float2bfloat16_rn(grad(srow[j], j));
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
  DeviceBuffer logits_buf;
  CUDA_RETURN_IF_NOT_OK(alloc->Allocate(sizeof(float) * chunk * ld, &logits_buf));
  float* logits = logits_buf.as<float>();
  // Rows that fit in shared memory take ce_row_kernel2 (every vocabulary up to ~58K).
  const int64_t row_smem = ld * static_cast<int64_t>(sizeof(float));
  if (row_smem <= kRowSmemMax) {
    CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(ce_row_kernel2, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                              static_cast<int>(row_smem)));
  }
  for (int64_t c0 = 0; c0 < a.tokens; c0 += chunk) {
    const int64_t n = std::min(chunk, a.tokens - c0);
    const __nv_bfloat16* h_c = a.h + c0 * a.dim;
    // 1. logits [n, V] = h_c Wᵀ (fp32).
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
    g1.c_dtype = DType::kF32;
    CUDA_RETURN_IF_NOT_OK(gemm->Gemm(g1, stream));
    // 2. loss and G (in place, bf16, row stride 2·ld).
    if (row_smem <= kRowSmemMax) {
      ce_row_kernel2<<<static_cast<unsigned>(n), kRowThreads2, row_smem, stream>>>(
          logits, ld, a.vocab, a.targets + c0, a.loss_scale, a.token_loss + c0, grad);
      CUDA_RETURN_IF_LAUNCH_ERROR("ce_row_kernel2");
    } else {
      ce_row_kernel1<<<static_cast<unsigned>(n), kRowThreads, 0, stream>>>(
          logits, ld, a.vocab, a.targets + c0, a.loss_scale, a.token_loss + c0, grad);
      CUDA_RETURN_IF_LAUNCH_ERROR("ce_row_kernel1");
    }
    if (!grad) continue;
    const void* g_bf16 = logits;
    if (a.dh != nullptr) {
      // 3. dh_c [n, d] = G [n, V] · W [V, d].
      GemmArgs g2;
      g2.m = n;
      g2.n = a.dim;
      g2.k = a.vocab;
      g2.a = g_bf16;
      g2.lda = 2 * ld;
      g2.b = a.w;
      g2.ldb = a.dim;
      g2.c = a.dh + c0 * a.dim;
      g2.ldc = a.dim;
      g2.c_dtype = DType::kBf16;
      CUDA_RETURN_IF_NOT_OK(gemm->Gemm(g2, stream));
    }
    if (a.dw != nullptr) {
      // 4. dW [V, d] += Gᵀ [V, n] · h_c [n, d].
      GemmArgs g3;
      g3.trans_a = true;
      g3.m = a.vocab;
      g3.n = a.dim;
      g3.k = n;
      g3.a = g_bf16;
      g3.lda = 2 * ld;
      g3.b = h_c;
      g3.ldb = a.dim;
      g3.c = a.dw;
      g3.ldc = a.dim;
      g3.c_dtype = DType::kF32;
      g3.beta = 1.f;
      CUDA_RETURN_IF_NOT_OK(gemm->Gemm(g3, stream));
    }
  }
  ce_loss_sum_kernel1<<<1, 1024, 0, stream>>>(a.token_loss, a.tokens, a.loss_scale, a.loss_sum);
  CUDA_RETURN_IF_LAUNCH_ERROR("ce_loss_sum_kernel1");
  return {};
}

}  // namespace gyre::cuda
