#include "ops/lr_schedule.h"

#include <algorithm>
#include <cmath>

namespace gyre::ops {

double LrSchedule::At(uint64_t step) const {
  if (step < warmup_steps) return peak_lr * static_cast<double>(step + 1) / static_cast<double>(warmup_steps);
  if (total_steps <= warmup_steps) return peak_lr;
  const double progress = std::min(1.0, static_cast<double>(step - warmup_steps) /
                                            static_cast<double>(total_steps - warmup_steps));
  const double final_lr = final_fraction * peak_lr;
  return final_lr + (peak_lr - final_lr) * 0.5 * (1.0 + std::cos(M_PI * progress));
}

}  // namespace gyre::ops
