// Finite-difference gradient checking for tests (float64 mode).
//
// For a scalar L = <forward(), dy> (dy a fixed random tensor), compares an analytic gradient
// with central differences (L(x+h) - L(x-h)) / 2h, element by element, and reports the
// norm-wise relative error ||analytic - numeric|| / max(||analytic||, ||numeric||).
// h = 1e-6 in float64: truncation O(h^2) and round-off O(eps/h) both stay near 1e-10, far under
// the 1e-6 tolerance the tests use.
#pragma once

#include <algorithm>
#include <cmath>
#include <functional>
#include <string>

#include "ops/elementwise.h"
#include "ops/rng.h"
#include "ops/tensor.h"

namespace gyre::ops::testing {

inline Tensor RandomTensor(Shape shape, Rng* rng, double scale = 1.0, DType dtype = DType::kF64) {
  Tensor t = Tensor::Empty(std::move(shape), dtype);
  for (int64_t i = 0; i < t.numel(); ++i) t.Set(i, scale * rng->Normal());
  return t;
}

inline double Inner(const Tensor& a, const Tensor& b) {
  GYRE_CHECK(a.numel() == b.numel(), "inner: %ld vs %ld", (long)a.numel(), (long)b.numel());
  double s = 0;
  for (int64_t i = 0; i < a.numel(); ++i) s += a.At(i) * b.At(i);
  return s;
}

// Numeric gradient of `loss()` with respect to every element of *value (or at most
// `max_elements` of them, evenly strided; the others are copied from `analytic` so they do not
// count). Returns ||analytic - numeric|| / max(||analytic||, ||numeric||, floor).
// `floor` > 0 is for saturated regimes (extreme gates) where true gradients are ~1e-12 and the
// finite differences are pure round-off (~1e-10 per element): there the check becomes an
// absolute one, ||analytic - numeric|| < tol * floor.
inline double CheckGradient(const std::function<double()>& loss, Tensor* value, const Tensor& analytic,
                            int64_t max_elements = 400, double h = 1e-6, double floor = 0.0) {
  Tensor numeric = analytic.Clone();
  const int64_t n = value->numel();
  const int64_t stride = std::max<int64_t>(1, n / max_elements);
  for (int64_t i = 0; i < n; i += stride) {
    const double x = value->At(i);
    value->Set(i, x + h);
    const double lp = loss();
    value->Set(i, x - h);
    const double lm = loss();
    value->Set(i, x);
    numeric.Set(i, (lp - lm) / (2 * h));
  }
  double diff = 0, na = 0, nn = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double a = analytic.At(i), b = numeric.At(i);
    diff += (a - b) * (a - b);
    na += a * a;
    nn += b * b;
  }
  return std::sqrt(diff) / std::max({std::sqrt(na), std::sqrt(nn), floor, 1e-300});
}

}  // namespace gyre::ops::testing
