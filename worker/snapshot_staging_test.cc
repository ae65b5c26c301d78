#include "worker/snapshot_staging.h"

#include <cstring>

#include "gtest/gtest.h"

namespace gyre {
namespace {

// Without the CUDA backend (this binary) a pinned staging falls back to plain host memory.
TEST(SnapshotStagingTest, PreparedBufferIsHandedOutAndReusedOnlyWhenFree) {
  SnapshotStaging staging(/*pinned=*/true);
  staging.Prepare(4096);
  std::shared_ptr<void> a = staging.Acquire(4096);
  ASSERT_NE(a, nullptr);
  std::memset(a.get(), 0x5a, 4096);  // the whole range is usable
  // While `a` is held (a checkpoint being written), another snapshot gets a different buffer.
  std::shared_ptr<void> b = staging.Acquire(4096);
  ASSERT_NE(b, nullptr);
  EXPECT_NE(a.get(), b.get());
  EXPECT_EQ(static_cast<unsigned char*>(a.get())[4095], 0x5a);
  // Once every holder is gone, the kept buffer comes back.
  void* kept = b.get();
  a.reset();
  b.reset();
  EXPECT_EQ(staging.Acquire(4096).get(), kept);
  // A larger request gets a larger buffer, and Prepare of a size already kept starts nothing.
  std::shared_ptr<void> big = staging.Acquire(1 << 20);
  ASSERT_NE(big, nullptr);
  std::memset(big.get(), 1, 1 << 20);
  void* big_ptr = big.get();
  big.reset();
  staging.Prepare(1 << 20);
  EXPECT_EQ(staging.Acquire(1 << 20).get(), big_ptr);
}

TEST(SnapshotStagingTest, PrepareWhileHeldReplacesTheKeptBuffer) {
  SnapshotStaging staging(/*pinned=*/false);
  std::shared_ptr<void> held = staging.Acquire(1000);
  staging.Prepare(1000);  // the kept one is held: a new one is allocated in the background
  std::shared_ptr<void> next = staging.Acquire(1000);
  ASSERT_NE(next, nullptr);
  EXPECT_NE(next.get(), held.get());
}

}  // namespace
}  // namespace gyre
