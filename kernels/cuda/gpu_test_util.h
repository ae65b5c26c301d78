// Helpers for the GPU test binaries and the dense benchmark (host code; may abort on CUDA errors).
//
// The checking method (METHOD.md): fresh random inputs for every check (never zeros), outputs
// poisoned with NaN (all bytes 0xFF: NaN in fp32 and in bf16) before the kernel runs, and the
// relative error ||out - ref|| / ||ref|| against a float64 reference computed from the same
// (bf16-rounded) inputs. A NaN anywhere in the output makes the error NaN, which fails every
// threshold. Each check prints one summary line: name, shape, error, threshold, PASS/FAIL.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/device_allocator.h"

namespace gyre::cuda::testing {

// Round-to-nearest-even float -> bf16 bits, and back (host; matches __float2bfloat16_rn).
inline uint16_t FloatToBf16Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  const uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>((u + rounding) >> 16);
}
inline float Bf16BitsToFloat(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float RoundBf16(float f) { return Bf16BitsToFloat(FloatToBf16Bits(f)); }

// Random normal values already rounded to bf16 (so host references see exactly what the device
// reads), scaled by `stddev`, plus `mean`.
inline std::vector<float> RandomBf16Values(std::mt19937_64& rng, size_t n, float stddev = 1.f,
                                           float mean = 0.f) {
  std::normal_distribution<float> dist(mean, stddev);
  std::vector<float> v(n);
  for (float& x : v) x = RoundBf16(dist(rng));
  return v;
}
inline std::vector<float> RandomFloats(std::mt19937_64& rng, size_t n, float stddev = 1.f,
                                       float mean = 0.f) {
  std::normal_distribution<float> dist(mean, stddev);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

// Device array of T (float, int32_t or __nv_bfloat16) filled from / read back to float vectors.
template <typename T>
class DeviceArray {
 public:
  DeviceArray(DeviceAllocator* alloc, size_t n) : n_(n) {
    CUDA_OK_OR_DIE(alloc->Allocate(n * sizeof(T), &buf_));
  }
  T* get() const { return buf_.as<T>(); }
  size_t size() const { return n_; }
  void Upload(const std::vector<float>& host) {
    std::vector<T> tmp(n_);
    for (size_t i = 0; i < n_; ++i) tmp[i] = Convert(host[i]);
    CUDA_CHECK_OR_DIE(cudaMemcpy(get(), tmp.data(), n_ * sizeof(T), cudaMemcpyHostToDevice));
  }
  std::vector<float> Download() const {
    std::vector<T> tmp(n_);
    CUDA_CHECK_OR_DIE(cudaMemcpy(tmp.data(), get(), n_ * sizeof(T), cudaMemcpyDeviceToHost));
    std::vector<float> out(n_);
    for (size_t i = 0; i < n_; ++i) out[i] = Back(tmp[i]);
    return out;
  }
  void Poison() { CUDA_CHECK_OR_DIE(cudaMemset(get(), 0xFF, n_ * sizeof(T))); }

 private:
  static T Convert(float f) {
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      const uint16_t b = FloatToBf16Bits(f);
      T t;
      std::memcpy(static_cast<void*>(&t), &b, 2);
      return t;
    } else {
      return static_cast<T>(f);
    }
  }
  static float Back(T t) {
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      uint16_t b;
      std::memcpy(&b, static_cast<const void*>(&t), 2);
      return Bf16BitsToFloat(b);
    } else {
      return static_cast<float>(t);
    }
  }
  size_t n_;
  DeviceBuffer buf_;
};

// ||out - ref|| / ||ref||; NaN if any output is not finite.
inline double RelError(const std::vector<float>& out, const std::vector<double>& ref) {
  double diff = 0, norm = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (!std::isfinite(out[i])) return std::nan("");
    const double d = static_cast<double>(out[i]) - ref[i];
    diff += d * d;
    norm += ref[i] * ref[i];
  }
  return std::sqrt(diff) / std::max(std::sqrt(norm), 1e-300);
}

// Prints one summary line and returns whether err <= tol (false for NaN).
inline bool Report(const std::string& name, const std::string& shape, double err, double tol) {
  const bool ok = err <= tol;
  std::printf("[%s] %-34s %-28s rel_err %.3e  tol %.1e\n", ok ? "PASS" : "FAIL", name.c_str(),
              shape.c_str(), err, tol);
  std::fflush(stdout);
  return ok;
}

// Relative-error thresholds (METHOD.md): fp32 arithmetic from exact (bf16) inputs, and outputs
// rounded to bf16 (one rounding is ~2e-3 relative in the Frobenius norm).
constexpr double kTolF32 = 1e-5;
constexpr double kTolF32Accum = 1e-4;  // long fp32 sums (K or rows in the thousands)
constexpr double kTolBf16 = 1e-2;

}  // namespace gyre::cuda::testing
