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
#include "ops/model.h"
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

// Deferred zeroing (ops/module.h) on the device: after a step, every gradient of a model of `spec`
// skips the memset and is poisoned with NaN; two micro-batches must then give the gradients of a
// fresh, eagerly zeroed model (every first write overwrites or zeroes what is stale).
inline bool DeferredZeroMatchesZeroed(const ModelSpec& spec, const std::string& label) {
  const int64_t B = 4, T = 64;
  auto fresh = LanguageModel::Create(spec, DType::kF32, Device::kCuda, 6);
  auto reused = LanguageModel::Create(spec, DType::kF32, Device::kCuda, 6);
  if (!fresh.ok() || !reused.ok()) {
    std::printf("[FAIL] %s: model: %s\n", label.c_str(),
                std::string((fresh.ok() ? reused : fresh).status().message()).c_str());
    return false;
  }
  const auto earlier = RandomTokens(B * (T + 1), spec.vocab_size, 7);
  const auto tokens = RandomTokens(B * (T + 1), spec.vocab_size, 8);
  const double scale = 1.0 / (B * T);
  auto two_passes = [&](LanguageModel& m) {
    const std::span<const int32_t> all(tokens);
    m.ForwardBackward(all.first(2 * (T + 1)), 2, T, scale);
    m.ForwardBackward(all.subspan(2 * (T + 1)), 2, T, scale);
  };
  (*reused)->params().ZeroGrad();
  (*reused)->ForwardBackward(earlier, B, T, scale);
  (*reused)->params().DeferZeroGrad();
  size_t stale = 0;
  for (Parameter* p : (*reused)->params().All()) {
    if (!p->grad_stale) continue;
    ++stale;
    p->grad.Fill(std::nan(""));
  }
  const size_t params = (*reused)->params().All().size();
  bool ok = stale == params;
  if (!ok) std::printf("[FAIL] %s: %zu of %zu gradients skip the memset\n", label.c_str(), stale, params);
  two_passes(**reused);
  (*fresh)->params().ZeroGrad();
  two_passes(**fresh);
  return CheckGrads((*reused)->params(), (*fresh)->params(), label, 1e-5) && ok;
}

}  // namespace gyre::ops
