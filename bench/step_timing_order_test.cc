// RoundOrder (bench/step_timing_order.h): the rotation AlternateVariants runs its entries in.
#include "bench/step_timing_order.h"

#include <vector>

#include "gtest/gtest.h"

namespace gyre::bench {
namespace {

TEST(RoundOrderTest, RoundRStartsAtEntryRModN) {
  EXPECT_EQ(RoundOrder(0, 3), (std::vector<size_t>{0, 1, 2}));
  EXPECT_EQ(RoundOrder(1, 3), (std::vector<size_t>{1, 2, 0}));
  EXPECT_EQ(RoundOrder(2, 3), (std::vector<size_t>{2, 0, 1}));
  EXPECT_EQ(RoundOrder(3, 3), (std::vector<size_t>{0, 1, 2}));
  EXPECT_EQ(RoundOrder(5, 1), (std::vector<size_t>{0}));
  EXPECT_TRUE(RoundOrder(2, 0).empty());
}

// Over n rounds (or any multiple) every entry runs in every position exactly once per n rounds:
// no entry is always first (the old default-first order put entry 0 first in every round).
TEST(RoundOrderTest, EveryEntryTakesEveryPositionOncePerNRounds) {
  for (size_t n = 1; n <= 6; ++n) {
    for (int rounds : {static_cast<int>(n), static_cast<int>(2 * n)}) {
      std::vector<std::vector<int>> count(n, std::vector<int>(n, 0));  // [entry][position]
      for (int r = 0; r < rounds; ++r) {
        const std::vector<size_t> order = RoundOrder(r, n);
        ASSERT_EQ(order.size(), n);
        std::vector<int> seen(n, 0);
        for (size_t pos = 0; pos < n; ++pos) {
          ASSERT_LT(order[pos], n);
          ++seen[order[pos]];
          ++count[order[pos]][pos];
        }
        for (size_t e = 0; e < n; ++e) ASSERT_EQ(seen[e], 1) << "round " << r << " is not a permutation";
      }
      for (size_t e = 0; e < n; ++e)
        for (size_t pos = 0; pos < n; ++pos) EXPECT_EQ(count[e][pos], rounds / static_cast<int>(n)) << n << " " << e << " " << pos;
    }
  }
}

TEST(RoundOrderTest, DescribeNamesTheEntriesInOrder) {
  const std::vector<std::string> names = {"default", "A=1", "B=2"};
  EXPECT_EQ(DescribeRoundOrder(1, RoundOrder(1, 3), names), "round 1: A=1, B=2, default");
  EXPECT_EQ(DescribeRoundOrder(0, RoundOrder(0, 3), names), "round 0: default, A=1, B=2");
}

}  // namespace
}  // namespace gyre::bench
