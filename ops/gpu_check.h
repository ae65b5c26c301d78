// Helpers shared by the ops/ GPU tests (llama_gpu_test, recurrent_gpu_test, decode_gpu_test): compare a CUDA
// result with a float64 CPU reference and print one `[PASS|FAIL] name shape rel_err tol` line
// (the format of kernels/cuda/gpu_test_util.h), and make bf16-representable random inputs so the
// same numbers feed both backends.
#pragma once

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "ops/elementwise.h"
#include "ops/module.h"
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

// value := bf16(value) on a CUDA store, so masters and compute copies hold the same numbers.
inline void RoundMastersToBf16(ParamStore& store) {
  for (Parameter* p : store.All()) p->value.CopyFrom(p->compute.To(DType::kF32));
}

// The masters of a GPU store as float64 CPU tensors (to load into the CPU reference).
inline std::vector<NamedTensor> AsF64State(const ParamStore& gpu) {
  std::vector<NamedTensor> state;
  for (const Parameter* p : gpu.All()) state.push_back({p->name, p->value.ToDevice(Device::kCpu).To(DType::kF64)});
  return state;
}

// Every gradient of the GPU store against the CPU store's parameter of the same name.
inline bool CheckGrads(const ParamStore& gpu, ParamStore& cpu, const std::string& prefix, double tol) {
  bool ok = true;
  for (const Parameter* g : gpu.All()) ok &= Check(prefix + " d" + g->name, g->grad, cpu.Find(g->name)->grad, tol);
  return ok;
}

}  // namespace gyre::ops
