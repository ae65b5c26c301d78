#include "base/clock.h"

#include "gtest/gtest.h"

namespace gyre {
namespace {

TEST(ClockTest, RealClockIsMonotonicAndSleeps) {
  Clock* clock = Clock::Real();
  int64_t a = clock->NowMicros();
  clock->SleepMicros(2000);
  int64_t b = clock->NowMicros();
  EXPECT_GE(b - a, 2000);
  EXPECT_GT(clock->UnixMillis(), 1700000000000);  // after 2023
}

TEST(ClockTest, ManualClockAdvancesOnlyWhenTold) {
  ManualClock clock(100);
  EXPECT_EQ(clock.NowMicros(), 100);
  clock.SleepMicros(50);
  EXPECT_EQ(clock.NowMicros(), 150);
  clock.Advance(-10);  // time never runs backwards
  EXPECT_EQ(clock.NowMicros(), 150);
  EXPECT_EQ(clock.UnixMillis(), ManualClock::kUnixEpochOffsetMillis);
}

}  // namespace
}  // namespace gyre
