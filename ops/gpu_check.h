// Helpers shared by the ops/ GPU tests (llama_gpu_test, recurrent_gpu_test): compare a CUDA
// result with a float64 CPU reference and print one `[PASS|FAIL] name shape rel_err tol` line
// (the format of kernels/cuda/gpu_test_util.h), and make bf16-representable random inputs so the
// same numbers feed both backends.
#pragma once

#include <cmath>
#include <cstdio>
#include <string>

#include "ops/elementwise.h"
#include "ops/rng.h"
#include "ops/tensor.h"

namespace gyre::ops {

// Relative error of `got` (any device/dtype) against `want`; a non-finite value fails.
inline bool Check(const std::string& name, const Tensor& got, const Tensor& want, double tol) {
  const Tensor g = got.ToDevice(Device::kCpu).To(DType::kF64);
  const Tensor w = want.ToDevice(Device::kCpu).To(DType::kF64);
  bool finite = true;
  for (int64_t i = 0; i < g.numel(); ++i) finite = finite && std::isfinite(g.At(i));
  const double err = finite ? RelativeError(g, w) : INFINITY;
  const bool ok = err <= tol;
  std::printf("[%s] %s %s rel_err %.3e tol %.0e\n", ok ? "PASS" : "FAIL", name.c_str(),
              ShapeString(got.shape()).c_str(), err, tol);
  return ok;
}

// Random bf16-representable values as a float64 CPU tensor.
inline Tensor RandomBf16Host(Shape shape, double scale, Rng* rng) {
  Tensor t = Tensor::Empty(std::move(shape), DType::kF64, Device::kCpu);
  for (int64_t i = 0; i < t.numel(); ++i) t.Set(i, Bf16ToFloat(FloatToBf16(static_cast<float>(scale * rng->Normal()))));
  return t;
}

inline Tensor ToCudaBf16(const Tensor& host_f64) {
  return host_f64.To(DType::kF32).ToDevice(Device::kCuda).To(DType::kBF16);
}

}  // namespace gyre::ops
