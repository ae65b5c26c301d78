// Dense matrix products through cuBLASLt: bf16 inputs, fp32 accumulation, bf16 or fp32 output,
// row-major tensors (as everywhere in Gyre), with the three products a Linear layer needs:
//
//   forward        Y [rows, out] = X [rows, in] · Wᵀ          (+ bias [out], optional GeLU)
//   input grad     dX [rows, in] = dY [rows, out] · W [out, in]          (overwrites dX)
//   weight grad    dW [out, in] += dYᵀ · X                    (fp32 dW, accumulates: beta = 1)
//
// Row-major C = op(A) op(B) is column-major Cᵀ = op(B)ᵀ op(A)ᵀ, so the call swaps A and B and
// hands cuBLASLt the transposed shapes; nothing is copied.
//
// Epilogues (fused into the GEMM's store): bias add, bias + GeLU. cuBLASLt's GeLU is the tanh
// approximation 0.5 x (1 + tanh(√(2/π)(x + 0.044715 x³))), not the erf GeLU of ops/elementwise.h
// (they differ by < 1e-3 absolute); use kernels/cuda/activations.h for the exact one. The bias
// has the output's dtype.
//
// Plans (descriptors + the heuristic's algorithm) are cached per shape, transposes, dtypes,
// epilogue, beta != 0 and operand alignment; the first call of a shape runs the heuristic, later
// calls only launch. Large products (>= 4M outputs) with a short reduction (k <= 1024) and bf16
// output take a measured configuration from the heuristic's top 8 when it is among them
// (gemm.cu kShortKPreferred: 128x160 tiles for llama-125m's k = 768 products, 8-17% faster in
// the training step than the heuristic's first choice), and the Llama training products with
// longer reductions that an in-step measurement found faster on another of the top 8 take that
// one (gemm.cu kShapePreferred, exact shapes of llama-125m and llama-1.3b at 16 / 8 x 2048
// tokens); fixed rules, so every run picks the same algorithm. A caller may ask for the plan of
// its shape rounded up (GemmArgs::plan_round; the LM head's vocabulary, session 19). GYRE_GEMM_PICK (measurement only,
// gemm.cu) forces a candidate index for in-step A/B runs. GYRE_GEMM_LOG=1 prints each new plan's configuration (and, when autotuning,
// every candidate's time) to stderr. The 32 MiB workspace comes from the DeviceAllocator once,
// at Create.
// Autotuning (GYRE_GEMM_AUTOTUNE=1, read per call; a separate plan set): the first call of a
// shape asks the heuristic for up to 8 algorithms, times each (1 + 5 launches into a scratch C,
// so accumulating outputs are untouched; one stream synchronisation) and keeps the fastest if it
// beats the heuristic's first choice by >= 3%.
//
// FLOPs 2·m·n·k per product; bytes 2(mk + kn) + |C|·mn (+|C|·mn read when accumulating).
// H100 SXM dense bf16 ~ 790-990 TFLOP/s: 16K tokens x 2048 x 5504 (1.3B MLP) = 0.37 TFLOP per
// product, floor ~0.4 ms.
//
// Thread-safety: a GemmContext is used by one thread (one stream) at a time.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <memory>
#include <vector>

#include "kernels/cuda/device_allocator.h"
#include "kernels/cuda/device_info.h"

namespace gyre::cuda {

enum class DType { kBf16, kF32 };

enum class GemmEpilogue {
  kNone,
  kBias,      // C = alpha · op(A) op(B) + beta · C + bias (bias broadcast over rows)
  kGeluBias,  // C = gelu_tanh(alpha · op(A) op(B) + bias)
};

// Row-major C [m, n] = alpha · op(A) [m, k] · op(B) [k, n] + beta · C.
// A is [m, k] (lda >= k) or, with trans_a, [k, m] (lda >= m); likewise B. A and B are bf16.
struct GemmArgs {
  bool trans_a = false;
  bool trans_b = false;
  int64_t m = 0, n = 0, k = 0;
  const void* a = nullptr;
  int64_t lda = 0;
  const void* b = nullptr;
  int64_t ldb = 0;
  void* c = nullptr;
  int64_t ldc = 0;
  DType c_dtype = DType::kBf16;
  float alpha = 1.f;
  float beta = 0.f;
  GemmEpilogue epilogue = GemmEpilogue::kNone;
  const void* bias = nullptr;  // [n], c_dtype
  // Optional separate input for the beta term: C [m, n] = alpha · op(A) op(B) + beta · c_in
  // (c_in has C's dtype and ldc; it may equal c). Fuses a residual add into the product's
  // store: out = x Wᵀ + residual without a separate pass, the residual left intact.
  const void* c_in = nullptr;
  // > 0: the plan is the one cuBLASLt's heuristic gives for m, n, k rounded up to multiples of
  // plan_round (same operands, dtypes and leading dimensions, a leading dimension raised to the
  // rounded row count where that is larger), run on the real shape when cublasLtMatmulAlgoCheck
  // accepts it there (else the real shape's first choice). A fixed rule (the same algorithm in
  // every run). Used by the LM head (kernels/cuda/cross_entropy.cu, opt-in): at d 2048 the
  // heuristic tiles V = 50288 differently from 50304 (160x256 / 256x160 instead of 192x192 /
  // 256x128), cross_entropy_notes.md session 19. 0: the real shape's plan (every other caller).
  int64_t plan_round = 0;
};

class GemmContext {
 public:
  // Creates the cuBLASLt handle and takes the workspace from `allocator` (which must outlive the
  // context).
  static CudaResult Create(DeviceAllocator* allocator, std::unique_ptr<GemmContext>* out,
                           size_t workspace_bytes = size_t{32} << 20);
  ~GemmContext();
  GemmContext(const GemmContext&) = delete;
  GemmContext& operator=(const GemmContext&) = delete;

  CudaResult Gemm(const GemmArgs& args, cudaStream_t stream);
  // Whether `args`' plan (built and cached here when new, as Gemm would) is the real shape's own
  // first choice because the rounded shape's (GemmArgs::plan_round) failed cublasLtMatmulAlgoCheck
  // on the real one; false without plan_round or when the shape is rounded already. The LM head
  // splits such a product at its vocabulary's last multiple of 128 (cross_entropy.h, vocab_split).
  CudaResult RoundedPlanRejected(const GemmArgs& args, cudaStream_t stream, bool* rejected);
  size_t cached_plans() const { return plans_.size(); }

 private:
  struct Plan;
  GemmContext() = default;
  CudaResult GetPlan(const GemmArgs& args, cudaStream_t stream, Plan** plan);

  void* handle_ = nullptr;  // cublasLtHandle_t
  DeviceAllocator* allocator_ = nullptr;  // scratch for autotuning
  DeviceBuffer workspace_;
  std::map<std::vector<int64_t>, std::unique_ptr<Plan>> plans_;
};

// The three products of a Linear layer (W [out, in] bf16).
// Y = X Wᵀ (+ bias, GeLU per epilogue); y_dtype bf16 or fp32; overwrites Y.
// With `residual` (same dtype and shape as Y): Y = X Wᵀ + residual, rounded once.
CudaResult LinearForward(GemmContext* ctx, const void* x, const void* w, void* y, DType y_dtype,
                         int64_t rows, int64_t in, int64_t out, cudaStream_t stream,
                         GemmEpilogue epilogue = GemmEpilogue::kNone, const void* bias = nullptr,
                         const void* residual = nullptr);
// dX = dY W (bf16 or fp32 dX, overwritten).
CudaResult LinearBackwardInput(GemmContext* ctx, const void* dy, const void* w, void* dx,
                               DType dx_dtype, int64_t rows, int64_t in, int64_t out,
                               cudaStream_t stream);
// dW += dYᵀ X (fp32 dW [out, in], accumulated).
CudaResult LinearBackwardWeight(GemmContext* ctx, const void* dy, const void* x, float* dw,
                                int64_t rows, int64_t in, int64_t out, cudaStream_t stream);

}  // namespace gyre::cuda
