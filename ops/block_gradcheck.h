// Gradient checks of whole blocks for tests (float64 mode): every parameter and the input of a
// Block against central differences (gradcheck.h), plus the two parameter edits those tests make.
// Shared by the recurrent block tests and the xLSTM Large block test.
#pragma once

#include <cmath>
#include <cstdint>
#include <functional>
#include <string>

#include "gtest/gtest.h"
#include "ops/block.h"
#include "ops/gradcheck.h"
#include "ops/rng.h"

namespace gyre::ops::testing {

// Adds scale·N(0, 1) to every parameter value (moves a block off its initialisation, whose
// zeros and ones hide wrong gradients).
inline void Perturb(ParamStore* store, Rng* rng, double scale) {
  for (Parameter* p : store->All())
    for (int64_t i = 0; i < p->value.numel(); ++i) p->value.Set(i, p->value.At(i) + scale * rng->Normal());
}

// Sets parameter `name` element-wise (e.g. gate biases driven to saturation).
inline void SetParam(ParamStore* store, const std::string& name, const std::function<double(int64_t)>& value) {
  Parameter* p = store->Find(name);
  GYRE_CHECK(p != nullptr, "no parameter %s", name.c_str());
  for (int64_t i = 0; i < p->value.numel(); ++i) p->value.Set(i, value(i));
}

// Forward on x [batch, seq, d], backward of L = <y, dy> for a random dy, then the input's and
// every parameter's gradient against central differences to a relative 1e-6. `floor` (gradcheck.h)
// is for saturated gates: parameters behind them have true gradients of 1e-7 .. 1e-22, where
// central differences (h = 1e-6) are round-off (~1e-8 in norm), so they are checked to an
// absolute 1e-6·floor while every gradient above `floor` in norm stays relative.
// Returns the number of parameters checked.
inline int CheckBlock(Block* block, ParamStore* store, Rng* rng, int64_t batch, int64_t seq, int64_t d,
                      double floor = 0.0) {
  const double tol = 1e-6;
  Tensor x = RandomTensor({batch, seq, d}, rng);
  Tensor y = block->Forward(x, batch, seq);
  int64_t non_finite = 0;
  for (int64_t i = 0; i < y.numel(); ++i) non_finite += std::isfinite(y.At(i)) ? 0 : 1;
  EXPECT_EQ(non_finite, 0) << "non-finite outputs";
  if (non_finite != 0) return 0;
  Tensor dy = RandomTensor(y.shape(), rng);
  store->ZeroGrad();
  Tensor dx = block->Backward(dy);
  auto loss = [&] { return Inner(block->Forward(x, batch, seq), dy); };
  EXPECT_LT(CheckGradient(loss, &x, dx, 200, 1e-6, floor), tol) << "input";
  int checked = 0;
  for (Parameter* p : store->All()) {
    Tensor analytic = p->grad.Clone();
    EXPECT_LT(CheckGradient(loss, &p->value, analytic, 60, 1e-6, floor), tol) << p->name;
    ++checked;
  }
  return checked;
}

}  // namespace gyre::ops::testing
