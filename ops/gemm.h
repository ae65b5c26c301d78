// Row-major GEMM on raw host arrays through OpenBLAS (cblas_sgemm / cblas_dgemm):
//   C[m,n] = alpha * op(A)[m,k] * op(B)[k,n] + beta * C
// op(X) = X or Xᵀ; lda/ldb/ldc are row strides in elements (so sub-matrices of wider rows work).
// Thread-safety: reentrant; OpenBLAS's own threads parallelise each call.
#pragma once

#include <cstdint>

namespace gyre::ops {

template <typename T>
void Gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
          int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc);

}  // namespace gyre::ops
