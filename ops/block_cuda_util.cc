#include "ops/block_cuda_util.h"

#include <utility>

#include "ops/cuda_backend.h"

namespace gyre::ops {

Tensor CudaEmpty(Shape shape, DType dtype) { return Tensor::Empty(std::move(shape), dtype, Device::kCuda); }

Tensor CudaBytes(size_t bytes) {
  return Tensor::Empty({static_cast<int64_t>((bytes + 3) / 4)}, DType::kF32, Device::kCuda);
}

const void* BytePtr(const Tensor& t, int64_t elements) {
  return static_cast<const char*>(t.raw()) + elements * static_cast<int64_t>(DTypeSize(t.dtype()));
}

void* MutBytePtr(const Tensor& t, int64_t elements) {
  return static_cast<char*>(t.raw()) + elements * static_cast<int64_t>(DTypeSize(t.dtype()));
}

void Mm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const void* a, int64_t lda, const void* b, int64_t ldb,
        void* c, int64_t ldc, bool c_f32, float beta) {
  if (m == 0 || n == 0) return;
  CudaGemm g;
  g.trans_a = ta;
  g.trans_b = tb;
  g.m = m; g.n = n; g.k = k;
  g.a = a; g.lda = lda;
  g.b = b; g.ldb = ldb;
  g.c = c; g.ldc = ldc;
  g.c_f32 = c_f32;
  g.beta = beta;
  Cuda().Gemm(g);
}

}  // namespace gyre::ops
