// Global gradient-norm clipping: ||g|| = sqrt(Σ over every parameter of Σ g²) (accumulated in
// double); if max_norm > 0 and ||g|| > max_norm, every gradient is scaled by max_norm / ||g||.
// Returns the norm before clipping (what the trainer reports). A non-finite norm leaves the
// gradients unscaled (the step function refuses to apply such an update).
#pragma once

#include "ops/module.h"

namespace gyre::ops {

double GlobalGradNorm(ParamStore* params);
double ClipGradNorm(ParamStore* params, double max_norm);

}  // namespace gyre::ops
