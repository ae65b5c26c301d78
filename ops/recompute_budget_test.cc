#include "ops/recompute_budget.h"

#include <vector>

#include "gtest/gtest.h"

namespace gyre::ops {
namespace {

constexpr uint64_t kGiB = uint64_t{1} << 30;

TEST(RecomputeBudgetTest, MarginIsSixGiBOrEightPercent) {
  EXPECT_EQ(RecomputeMarginBytes(24 * kGiB), 6 * kGiB);
  EXPECT_EQ(RecomputeMarginBytes(140 * kGiB), 140 * kGiB / 100 * 8);
}

TEST(RecomputeBudgetTest, HeadroomIsWhatTheAllocatorCanStillHandOutAboveThePeak) {
  // An 80 GB card: 42 GiB peak, 30 GiB held after the step, 10 GiB on the free lists, 37 GiB free
  // in the driver: tensors could take 77 GiB; the peak and the margin (6.32 GiB) need 48.32.
  MemorySnapshot m;
  m.in_use = 30 * kGiB; m.cached = 10 * kGiB; m.peak = 42 * kGiB;
  m.device_free = 37 * kGiB; m.device_total = 79 * kGiB;
  EXPECT_EQ(RecomputeHeadroomBytes(m), 77 * kGiB - 42 * kGiB - RecomputeMarginBytes(79 * kGiB));
  m.device_free = 2 * kGiB;  // another process took the card: nothing to spend
  EXPECT_EQ(RecomputeHeadroomBytes(m), 0u);
}

TEST(RecomputeBudgetTest, KeepsTheLongestFittingSuffixAndPassesOverLayersThatNeverRecompute) {
  const std::vector<int64_t> freed = {int64_t{1} << 30, 0, int64_t{1} << 30, int64_t{1} << 30, int64_t{1} << 30};
  EXPECT_EQ(KeptLayersFromEnd(freed, 0), 0);
  EXPECT_EQ(KeptLayersFromEnd(freed, kGiB), 2);          // the last layer and the sLSTM before it
  EXPECT_EQ(KeptLayersFromEnd(freed, 2 * kGiB), 3);
  EXPECT_EQ(KeptLayersFromEnd(freed, 3 * kGiB - 1), 3);  // a layer that does not fit stops the walk
  EXPECT_EQ(KeptLayersFromEnd(freed, 100 * kGiB), 5);
  EXPECT_EQ(KeptLayersFromEnd({}, kGiB), 0);
}

}  // namespace
}  // namespace gyre::ops
