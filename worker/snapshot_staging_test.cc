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

// The worker flushes the previous write before it takes a snapshot, so a kept buffer that a
// write still holds at Prepare time is free again by Acquire: Prepare must not pin a second one
// (16 GB at 1.3B). Only a buffer too small is replaced.
TEST(SnapshotStagingTest, PrepareKeepsABigEnoughBufferEvenWhileItIsHeld) {
  SnapshotStaging staging(/*pinned=*/false);
  std::shared_ptr<void> held = staging.Acquire(1000);
  void* kept = held.get();
  staging.Prepare(1000);  // held by a write in flight: nothing new is allocated
  held.reset();           // the write finished (the worker's Flush)
  EXPECT_EQ(staging.Acquire(1000).get(), kept);
  held = staging.Acquire(1000);
  staging.Prepare(4000);  // too small: a larger one comes in the background
  std::shared_ptr<void> larger = staging.Acquire(4000);
  ASSERT_NE(larger, nullptr);
  EXPECT_NE(larger.get(), kept);
  std::memset(larger.get(), 1, 4000);
}

TEST(SnapshotStagingTest, HostBuffersWithoutTheCudaBackendArePlainMemory) {
  for (bool pinned : {false, true}) {
    std::shared_ptr<void> p = AllocateHostBuffer(1 << 16, pinned);
    ASSERT_NE(p, nullptr);
    std::memset(p.get(), 7, 1 << 16);
  }
}

}  // namespace
}  // namespace gyre
