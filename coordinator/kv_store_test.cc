#include "coordinator/kv_store.h"

#include "gtest/gtest.h"

namespace gyre::coordinator {
namespace {

TEST(RendezvousKvTest, SetOnceGetAndBounds) {
  RendezvousKv::Options options;
  options.max_entries = 3;
  options.max_value_bytes = 8;
  RendezvousKv kv(options);
  EXPECT_FALSE(kv.Get("run/gen-1/rank_0").has_value());
  ASSERT_TRUE(kv.Set("run/gen-1/rank_0", "addr0").ok());
  EXPECT_EQ(kv.Get("run/gen-1/rank_0"), "addr0");
  EXPECT_TRUE(kv.Set("run/gen-1/rank_0", "addr0").ok());  // a retry
  EXPECT_TRUE(absl::IsFailedPrecondition(kv.Set("run/gen-1/rank_0", "other")));
  EXPECT_TRUE(absl::IsInvalidArgument(kv.Set("", "x")));
  EXPECT_TRUE(absl::IsInvalidArgument(kv.Set("big", "123456789")));
  ASSERT_TRUE(kv.Set("k1", "1").ok());
  ASSERT_TRUE(kv.Set("k2", "2").ok());
  ASSERT_TRUE(kv.Set("k3", "3").ok());  // evicts the oldest key
  EXPECT_EQ(kv.size(), 3u);
  EXPECT_FALSE(kv.Get("run/gen-1/rank_0").has_value());
  EXPECT_EQ(kv.Get("k3"), "3");
}

}  // namespace
}  // namespace gyre::coordinator
