// Small numeric helpers shared by the chunked recurrent cells (mLSTM, Mamba-2 SSD).
#pragma once

#include <cmath>
#include <cstdint>

namespace gyre::cpu {

// exp for the decay weights that feed the matrix products (every exponent here is <= 0, up to
// rounding). Below e^-60 (float) / e^-600 (double) the weight is flushed to 0: such a term is
// < 1e-26 of the largest weight of its row (which is e^0), far below rounding, and letting it
// through would put denormals into the GEMMs, which are many times slower on x86 (measured: a
// Mamba-2 head with A = -e^3.5 made the whole SSD forward ~1.8x slower per token; mLSTM gates
// reach the same range).
template <typename T>
inline T DecayExp(T x) {
  constexpr T kFloor = sizeof(T) == sizeof(float) ? T(-60) : T(-600);
  return x < kFloor ? T(0) : std::exp(x);
}

// Σ a_i b_i with 16 independent partial sums: the compiler vectorises it (a single running sum
// is a serial dependency chain, and Dot over a whole dk×dv state was the hottest loop).
template <typename T>
inline T Dot(const T* a, const T* b, int64_t n) {
  constexpr int kLanes = 16;
  T part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) part[j] += a[i + j] * b[i + j];
  }
  T s = 0;
  for (; i < n; ++i) s += a[i] * b[i];
  for (int j = 0; j < kLanes; ++j) s += part[j];
  return s;
}

}  // namespace gyre::cpu
