#include "ops/recompute_budget.h"

#include <algorithm>

namespace gyre::ops {

uint64_t RecomputeMarginBytes(uint64_t device_total) {
  return std::max<uint64_t>(uint64_t{6} << 30, device_total / 100 * 8);
}

uint64_t RecomputeHeadroomBytes(const MemorySnapshot& m) {
  const uint64_t can_hold = m.device_free + m.cached + m.in_use;  // the most tensors can take
  const uint64_t need = std::max(m.peak, m.in_use) + RecomputeMarginBytes(m.device_total);
  return can_hold > need ? can_hold - need : 0;
}

int64_t KeptLayersFromEnd(std::span<const int64_t> freed_from_last, uint64_t headroom) {
  int64_t kept = 0;
  uint64_t used = 0;
  for (const int64_t freed : freed_from_last) {
    if (freed > 0) {
      if (used + static_cast<uint64_t>(freed) > headroom) break;
      used += static_cast<uint64_t>(freed);
    }
    ++kept;
  }
  return kept;
}

}  // namespace gyre::ops
