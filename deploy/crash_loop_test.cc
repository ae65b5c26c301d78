#include "deploy/crash_loop.h"

#include "gtest/gtest.h"

namespace gyre::deploy {
namespace {

CrashLoop::Options Opts(int max) {
  CrashLoop::Options o;
  o.quick_exit_ms = 1000;
  o.max_failures_in_a_row = max;
  return o;
}

TEST(CrashLoopTest, QuickFailuresGiveUpAtTheLimit) {
  CrashLoop loop(Opts(3));
  EXPECT_FALSE(loop.Failed({0, 5}, 100, 9));
  EXPECT_FALSE(loop.Failed({200, 9}, 300, 12));
  EXPECT_TRUE(loop.Failed({400, 12}, 500, 15));
  EXPECT_NE(loop.last_reason().find("ms after starting"), std::string::npos) << loop.last_reason();
}

TEST(CrashLoopTest, SlowFailuresWithoutProgressCount) {
  // A worker that builds its replica for a minute, then dies at step 0, again and again.
  CrashLoop loop(Opts(2));
  EXPECT_FALSE(loop.Failed({0, 0}, 60000, 0));
  EXPECT_TRUE(loop.Failed({61000, 0}, 121000, 0));
  EXPECT_NE(loop.last_reason().find("no step committed"), std::string::npos) << loop.last_reason();
}

TEST(CrashLoopTest, SlowFailuresAfterProgressAreRestartedWithoutLimit) {
  CrashLoop loop(Opts(2));
  for (int i = 0; i < 10; ++i) {
    EXPECT_FALSE(loop.Failed({i * 10000, i * 7}, i * 10000 + 5000, i * 7 + 3)) << i;
  }
  EXPECT_EQ(loop.failures_in_a_row(), 0);
}

TEST(CrashLoopTest, ProgressBetweenFailuresResetsTheCount) {
  CrashLoop loop(Opts(2));
  EXPECT_FALSE(loop.Failed({0, 4}, 5000, 4));     // no progress: 1
  EXPECT_FALSE(loop.Failed({6000, 4}, 9000, 8));  // progress: reset
  EXPECT_FALSE(loop.Failed({9500, 8}, 14000, 8)); // no progress: 1
  EXPECT_TRUE(loop.Failed({15000, 8}, 20000, 8)); // 2: give up
}

TEST(CrashLoopTest, UnknownCommittedStepsFallBackToTheTimeRule) {
  CrashLoop loop(Opts(1));
  EXPECT_FALSE(loop.Failed({0, -1}, 5000, 3));  // slow, start unknown
  EXPECT_FALSE(loop.Failed({0, 3}, 5000, -1));  // slow, end unknown (coordinator unreachable)
  EXPECT_TRUE(loop.Failed({0, -1}, 10, -1));    // quick
}

}  // namespace
}  // namespace gyre::deploy
