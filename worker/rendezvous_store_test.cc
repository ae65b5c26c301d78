#include "worker/rendezvous_store.h"

#include <thread>

#include "base/mem_env.h"
#include "gtest/gtest.h"

namespace gyre {
namespace {

TEST(InProcessStoreTest, GetBlocksUntilSetAndTimesOutNamingTheKey) {
  InProcessStore store;
  std::thread setter([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    ASSERT_TRUE(store.Set("g1/rank_0", "addr").ok());
  });
  auto v = store.Get("g1/rank_0", 5000);
  setter.join();
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(*v, "addr");
  auto missing = store.Get("g1/rank_9", 10);
  EXPECT_TRUE(absl::IsDeadlineExceeded(missing.status()));
  EXPECT_NE(missing.status().message().find("g1/rank_9"), std::string_view::npos);
}

TEST(InProcessStoreTest, ConflictingSetIsRejected) {
  InProcessStore store;
  ASSERT_TRUE(store.Set("k", "a").ok());
  EXPECT_TRUE(store.Set("k", "a").ok());  // idempotent retry
  EXPECT_TRUE(absl::IsFailedPrecondition(store.Set("k", "b")));
}

TEST(DirectoryStoreTest, RoundTripAcrossInstancesWithEscapedKeys) {
  auto env = NewMemEnv();
  ManualClock clock;
  DirectoryStore a(env.get(), &clock, "/run/rendezvous");
  DirectoryStore b(env.get(), &clock, "/run/rendezvous");
  ASSERT_TRUE(a.Set("g2/rank_1", std::string("\0\1bytes", 7)).ok());
  auto v = b.Get("g2/rank_1", 1000);
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(*v, std::string("\0\1bytes", 7));
  EXPECT_TRUE(absl::IsFailedPrecondition(b.Set("g2/rank_1", "other")));
  // Missing key: the manual clock advances through the backoff sleeps until the deadline.
  auto missing = b.Get("g2/rank_7", 50);
  EXPECT_TRUE(absl::IsDeadlineExceeded(missing.status())) << missing.status();
  EXPECT_GE(clock.NowMicros(), 50000);
}

}  // namespace
}  // namespace gyre
