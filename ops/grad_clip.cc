#include "ops/grad_clip.h"

#include <cmath>

#include "ops/elementwise.h"

namespace gyre::ops {

double GlobalGradNorm(ParamStore* params) {
  double sum = 0;
  for (Parameter* p : params->All()) sum += SumSquares(p->grad);
  return std::sqrt(sum);
}

double ClipGradNorm(ParamStore* params, double max_norm) {
  const double norm = GlobalGradNorm(params);
  if (max_norm > 0 && std::isfinite(norm) && norm > max_norm) {
    const double scale = max_norm / norm;
    for (Parameter* p : params->All()) {
      DispatchFloat(p->grad.dtype(), [&]<typename T>() {
        T* g = p->grad.data<T>();
        for (int64_t i = 0; i < p->grad.numel(); ++i) g[i] = static_cast<T>(g[i] * scale);
      });
    }
  }
  return norm;
}

}  // namespace gyre::ops
