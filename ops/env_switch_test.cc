#include "ops/env_switch.h"

#include <cstdlib>

#include "gtest/gtest.h"

namespace gyre::ops {
namespace {

TEST(EnvChoiceTest, UnsetGivesTheFallbackAndAcceptedValuesPassThrough) {
  unsetenv("GYRE_TEST_SWITCH");
  EXPECT_EQ(EnvChoice("GYRE_TEST_SWITCH", {"separate", "fused"}, "fused"), "fused");
  setenv("GYRE_TEST_SWITCH", "separate", /*overwrite=*/1);
  EXPECT_EQ(EnvChoice("GYRE_TEST_SWITCH", {"separate", "fused"}, "fused"), "separate");
  setenv("GYRE_TEST_SWITCH", "4", 1);
  EXPECT_EQ(EnvChoice("GYRE_TEST_SWITCH", {"1", "2", "4"}, "2"), "4");
  unsetenv("GYRE_TEST_SWITCH");
}

TEST(EnvChoiceTest, OtherValuesStopTheProcessNamingTheAcceptedOnes) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  setenv("GYRE_TEST_SWITCH", "on", 1);
  EXPECT_DEATH(EnvChoice("GYRE_TEST_SWITCH", {"separate", "fused"}, "fused"),
               "GYRE_TEST_SWITCH must be separate or fused, got 'on'");
  EXPECT_DEATH(EnvChoice("GYRE_TEST_SWITCH", {"1", "2", "4"}, "2"), "GYRE_TEST_SWITCH must be 1, 2 or 4, got 'on'");
  setenv("GYRE_TEST_SWITCH", "", 1);  // set but empty is a value too
  EXPECT_DEATH(EnvChoice("GYRE_TEST_SWITCH", {"0", "1"}, "1"), "GYRE_TEST_SWITCH must be 0 or 1, got ''");
  unsetenv("GYRE_TEST_SWITCH");
}

}  // namespace
}  // namespace gyre::ops
