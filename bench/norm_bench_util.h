// Helpers shared by the norm kernel benches (gated_norm_bench, mlstm_out_norm_bench): device
// buffers copied to the host as doubles or raw bytes, the old-vs-new band check, and the
// command line both take.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/device_allocator.h"

namespace gyre::cuda::norm_bench {

inline std::vector<double> HostBf16(const DeviceBuffer& b, int64_t n) {
  std::vector<__nv_bfloat16> h(n);
  CUDA_CHECK_OR_DIE(cudaMemcpy(h.data(), b.get(), n * 2, cudaMemcpyDeviceToHost));
  std::vector<double> out(n);
  for (int64_t i = 0; i < n; ++i) out[i] = __bfloat162float(h[i]);
  return out;
}
inline std::vector<double> HostF32(const DeviceBuffer& b, int64_t n) {
  std::vector<float> h(n);
  CUDA_CHECK_OR_DIE(cudaMemcpy(h.data(), b.get(), n * 4, cudaMemcpyDeviceToHost));
  return std::vector<double>(h.begin(), h.end());
}
inline std::vector<unsigned char> HostBytes(const DeviceBuffer& b) {
  std::vector<unsigned char> h(b.bytes());
  CUDA_CHECK_OR_DIE(cudaMemcpy(h.data(), b.get(), h.size(), cudaMemcpyDeviceToHost));
  return h;
}

// ||a - b|| / ||b|| <= tol, every element finite; ulps (0 to skip): the largest |a - b| in units
// of the bf16 ulp at max(|a|, |b|, rms(b) / 256) (dx and dz are differences of O(1) terms: where
// they cancel to near 0, a change of the sums in their last fp32 bits is many ulps of the result).
// Prints one [PASS|FAIL] line (with count_differ: how many elements differ, "(bitwise)" if none)
// and returns whether it passed.
inline bool Band(const std::string& name, const std::vector<double>& got, const std::vector<double>& ref, double tol,
                 double max_ulps, bool count_differ) {
  double d2 = 0, r2 = 0, worst = 0;
  bool finite = true;
  for (size_t i = 0; i < got.size(); ++i) r2 += ref[i] * ref[i];
  const double floor = std::sqrt(r2 / std::max<size_t>(ref.size(), 1)) / 256;
  size_t differ = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    finite = finite && std::isfinite(got[i]) && std::isfinite(ref[i]);
    const double d = got[i] - ref[i];
    differ += d != 0;
    d2 += d * d;
    const double mag = std::max({std::fabs(got[i]), std::fabs(ref[i]), floor});
    if (mag > 0) {
      const double ulp = std::ldexp(1.0, std::ilogb(mag) - 7);  // bf16: 8 significant bits
      worst = std::max(worst, std::fabs(d) / ulp);
    }
  }
  const double rel = finite ? std::sqrt(d2 / std::max(r2, 1e-300)) : INFINITY;
  const bool ok = finite && rel <= tol && (max_ulps == 0 || worst <= max_ulps);
  std::printf("[%s] %s rel %.3e tol %.0e", ok ? "PASS" : "FAIL", name.c_str(), rel, tol);
  if (max_ulps > 0) std::printf(", max %.0f bf16 ulp (tol %.0f)", worst, max_ulps);
  if (count_differ) std::printf(", %zu of %zu differ%s", differ, got.size(), differ == 0 ? " (bitwise)" : "");
  std::printf("\n");
  return ok;
}

// `program [--reps=N] [--no_timing]`; false (after the usage line on stderr) on anything else.
inline bool ParseArgs(int argc, char** argv, const char* program, int* reps, bool* timing) {
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], "--reps=", 7) == 0) *reps = std::atoi(argv[i] + 7);
    else if (std::strcmp(argv[i], "--no_timing") == 0) *timing = false;
    else {
      std::fprintf(stderr, "usage: %s [--reps=N] [--no_timing]\n", program);
      return false;
    }
  }
  return true;
}

// The "device: <name>" line both print first.
inline void PrintDevice() {
  cudaDeviceProp prop;
  CUDA_CHECK_OR_DIE(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s\n", prop.name);
}

}  // namespace gyre::cuda::norm_bench
