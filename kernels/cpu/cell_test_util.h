// Test helpers shared by the CPU cell tests: random inputs, norm-wise relative error, and
// float64 central-difference gradients.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <random>
#include <vector>

namespace gyre::cpu::testing {

using Vec = std::vector<double>;

inline Vec RandomVector(int64_t n, std::mt19937_64& rng, double scale = 1.0, double mean = 0.0) {
  std::normal_distribution<double> dist(mean, scale);
  Vec v(n);
  for (double& e : v) e = dist(rng);
  return v;
}

// Norm-wise relative error ||a − b|| / ||b||.
inline double RelativeError(const Vec& a, const Vec& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  return std::sqrt(num) / std::max(std::sqrt(den), 1e-300);
}

// Central differences of `loss` w.r.t. every element of `param` (restored afterwards), with one
// Richardson step: (4·D(h/2) − D(h)) / 3 is accurate to O(h⁴), so high-curvature cases
// (exponential forget gates) do not need a tiny, noisy step.
inline Vec NumericGradient(Vec& param, const std::function<double()>& loss, double step = 1e-4) {
  auto central = [&](size_t i, double h) {
    const double saved = param[i];
    param[i] = saved + h;
    const double up = loss();
    param[i] = saved - h;
    const double down = loss();
    param[i] = saved;
    return (up - down) / (2 * h);
  };
  Vec grad(param.size());
  for (size_t i = 0; i < param.size(); ++i) grad[i] = (4 * central(i, step / 2) - central(i, step)) / 3;
  return grad;
}

}  // namespace gyre::cpu::testing
