// Learning-rate schedule: linear warm-up from peak/warmup to peak over `warmup_steps`, then
// cosine decay to final_fraction * peak at `total_steps`, constant afterwards (xLSTM recipe:
// 10 % of peak, MODELS.md §3). Stateless: the rate is a function of the step index, so its only
// "state" for checkpoints is its options (kept in the run config).
#pragma once

#include <cstdint>

namespace gyre::ops {

struct LrSchedule {
  double peak_lr = 1e-3;
  uint64_t warmup_steps = 0;
  uint64_t total_steps = 0;       // end of the cosine; 0 = constant after warm-up
  double final_fraction = 0.1;

  // Learning rate for step index `step` (0-based: the first update is step 0).
  double At(uint64_t step) const;
};

}  // namespace gyre::ops
