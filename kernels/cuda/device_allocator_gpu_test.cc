// Needs a GPU: the caching allocator serves a repeated step's working set without cudaMalloc,
// keeps live blocks disjoint, trims its cache and survives an impossible request; a graph pool
// keeps its blocks from everyone else until it is released, and refuses to cudaMalloc.
#include "kernels/cuda/device_allocator.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cuda/cuda_check.h"

namespace gyre::cuda {
namespace {

TEST(DeviceAllocatorTest, ClassBytesBoundsWaste) {
  EXPECT_EQ(DeviceAllocator::ClassBytes(1), 256u);
  EXPECT_EQ(DeviceAllocator::ClassBytes(256), 256u);
  EXPECT_EQ(DeviceAllocator::ClassBytes(257), 512u);
  EXPECT_EQ(DeviceAllocator::ClassBytes(4096), 4096u);
  EXPECT_EQ(DeviceAllocator::ClassBytes(4097), 5120u);
  std::mt19937_64 rng(1);
  for (int i = 0; i < 10000; ++i) {
    const size_t n = 1 + rng() % (size_t{1} << 34);
    const size_t c = DeviceAllocator::ClassBytes(n);
    ASSERT_GE(c, n);
    ASSERT_EQ(c % 256, 0u);
    if (n > 4096) {
      ASSERT_LE(static_cast<double>(c), 1.25 * static_cast<double>(n) + 1) << n;
    }
  }
}

TEST(DeviceAllocatorTest, StepLoopHitsCacheAndBlocksAreDisjoint) {
  DeviceAllocator alloc;
  std::mt19937_64 rng(2);
  std::vector<size_t> sizes;
  for (int i = 0; i < 40; ++i) sizes.push_back(1 + rng() % (3u << 20));
  uint64_t mallocs_after_first = 0;
  for (int step = 0; step < 10; ++step) {
    std::vector<DeviceBuffer> live(sizes.size());
    for (size_t i = 0; i < sizes.size(); ++i) {
      CudaResult r = alloc.Allocate(sizes[i], &live[i]);
      ASSERT_TRUE(r.ok()) << r.message;
      ASSERT_EQ(reinterpret_cast<uintptr_t>(live[i].get()) % 256, 0u);
      // Fill each live block with its own byte; any overlap shows up in the read-back below.
      ASSERT_EQ(cudaMemset(live[i].get(), static_cast<int>(i + 1), sizes[i]), cudaSuccess);
    }
    for (size_t i = 0; i < sizes.size(); ++i) {
      std::vector<unsigned char> host(sizes[i]);
      ASSERT_EQ(cudaMemcpy(host.data(), live[i].get(), sizes[i], cudaMemcpyDeviceToHost),
                cudaSuccess);
      for (size_t b = 0; b < sizes[i]; b += 997) {
        ASSERT_EQ(host[b], static_cast<unsigned char>(i + 1)) << "block " << i << " byte " << b;
      }
    }
    const AllocatorStats s = alloc.stats();
    EXPECT_GE(s.bytes_in_use, s.bytes_requested);
    if (step == 0) mallocs_after_first = s.device_mallocs;
    // live goes out of scope: every block returns to the cache.
  }
  const AllocatorStats s = alloc.stats();
  std::printf("[INFO] allocator: %lu allocations, %lu cache hits, %lu cudaMalloc, peak %lu bytes\n",
              (unsigned long)s.allocations, (unsigned long)s.cache_hits,
              (unsigned long)s.device_mallocs, (unsigned long)s.peak_bytes_in_use);
  EXPECT_EQ(s.device_mallocs, mallocs_after_first) << "steady-state steps called cudaMalloc";
  EXPECT_EQ(s.cache_hits, 9 * sizes.size());
  EXPECT_EQ(s.bytes_in_use, 0u);
  EXPECT_EQ(s.bytes_requested, 0u);
  EXPECT_GT(s.bytes_cached, 0u);
  ASSERT_TRUE(alloc.ReleaseCached().ok());
  EXPECT_EQ(alloc.stats().bytes_cached, 0u);
  EXPECT_EQ(alloc.stats().device_frees, mallocs_after_first);
}

TEST(DeviceAllocatorTest, ImpossibleRequestIsAnErrorAndAllocatorStillWorks) {
  DeviceAllocator alloc;
  DeviceBuffer keep;
  ASSERT_TRUE(alloc.Allocate(1 << 20, &keep).ok());
  DeviceBuffer huge;
  CudaResult r = alloc.Allocate(size_t{1} << 50, &huge);  // 1 PiB
  EXPECT_FALSE(r.ok());
  EXPECT_FALSE(huge);
  std::printf("[INFO] 1 PiB request: %s\n", r.message.c_str());
  DeviceBuffer again;
  ASSERT_TRUE(alloc.Allocate(1 << 20, &again).ok());
  EXPECT_NE(again.get(), keep.get());
  EXPECT_EQ(cudaMemset(again.get(), 1, 1 << 20), cudaSuccess);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
}

// A miss on a full device returns only what the request lacks to the driver, not the whole cache:
// the device is filled with 1 GiB blocks (then 256 / 16 / 2 MiB ones), three 1 GiB blocks and then
// one 256 MiB block go back to the cache, and a 1.5 GiB request must then free two 1 GiB blocks
// (the two freed first) and keep the third and the 256 MiB one cached.
// Fills the whole card: run it alone (not beside other GPU tests).
TEST(DeviceAllocatorTest, MissOnAFullDeviceFreesOnlyWhatItLacks) {
  DeviceAllocator alloc;
  std::vector<DeviceBuffer> gib, rest;
  for (;;) {
    DeviceBuffer b;
    if (!alloc.Allocate(size_t{1} << 30, &b).ok()) break;
    gib.push_back(std::move(b));
  }
  ASSERT_GE(gib.size(), 4u) << "needs a card of >= 4 GiB";
  for (size_t piece : {size_t{256} << 20, size_t{16} << 20, size_t{2} << 20}) {
    for (;;) {
      DeviceBuffer b;
      if (!alloc.Allocate(piece, &b).ok()) break;
      rest.push_back(std::move(b));
    }
  }
  size_t device_free = 0, device_total = 0;
  ASSERT_EQ(cudaMemGetInfo(&device_free, &device_total), cudaSuccess);
  std::printf("[INFO] filled: %zu x 1 GiB + %zu smaller blocks, %.1f MiB left on the device\n", gib.size(),
              rest.size(), device_free / 1048576.0);
  const AllocatorStats filled = alloc.stats();
  ASSERT_EQ(filled.bytes_cached, 0u);
  for (int i = 0; i < 3; ++i) gib.pop_back();  // three 1 GiB blocks to the cache
  auto quarter = std::find_if(rest.begin(), rest.end(), [](const DeviceBuffer& b) { return b.bytes() == (size_t{256} << 20); });
  ASSERT_NE(quarter, rest.end()) << "no 256 MiB block was placed";
  rest.erase(quarter);
  ASSERT_EQ(alloc.stats().bytes_cached, (size_t{3} << 30) + (size_t{256} << 20));
  DeviceBuffer big;
  CudaResult r = alloc.Allocate(size_t{3} << 29, &big);  // 1.5 GiB: a class the cache does not hold
  ASSERT_TRUE(r.ok()) << r.message;
  const AllocatorStats after = alloc.stats();
  EXPECT_EQ(after.device_frees - filled.device_frees, 2u);
  EXPECT_EQ(after.bytes_cached, (size_t{1} << 30) + (size_t{256} << 20));
  EXPECT_EQ(cudaMemset(big.get(), 1, big.bytes()), cudaSuccess);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::printf("[%s] full device: a 1.5 GiB miss freed %llu cached blocks, %.2f GiB stay cached\n",
              after.device_frees - filled.device_frees == 2 && after.bytes_cached == (size_t{1} << 30) + (size_t{256} << 20)
                  ? "PASS" : "FAIL",
              static_cast<unsigned long long>(after.device_frees - filled.device_frees),
              after.bytes_cached / double(size_t{1} << 30));
}

// The blocks a pressure release returns are the ones unused longest, whatever their size. The
// device is filled with a 2 GiB block B, then 1 GiB blocks (then 256 / 16 / 2 MiB ones); B goes to
// the cache first, then two 1 GiB blocks A1, A2; B is taken again and freed again (the working
// set's pattern: used every step), so the cache holds A1, A2 (idle longest) and B (just used). A
// 1.5 GiB miss must free A1 and A2 and keep B: the next 2 GiB request is B again, no cudaMalloc.
// The old rule (the smallest single cached block that covers the lack) freed B instead: one
// cudaFree, and the next 2 GiB request had to cudaMalloc (after freeing A1 and A2 as well).
// Fills the whole card: run it alone (not beside other GPU tests).
TEST(DeviceAllocatorTest, PressureReleaseFreesTheLeastRecentlyUsedBlocks) {
  DeviceAllocator alloc;
  constexpr size_t kGiB = size_t{1} << 30;
  DeviceBuffer b2;
  ASSERT_TRUE(alloc.Allocate(2 * kGiB, &b2).ok());
  void* const b2_ptr = b2.get();
  std::vector<DeviceBuffer> gib, rest;
  for (;;) {
    DeviceBuffer b;
    if (!alloc.Allocate(kGiB, &b).ok()) break;
    gib.push_back(std::move(b));
  }
  ASSERT_GE(gib.size(), 3u) << "needs a card of >= 6 GiB";
  for (size_t piece : {size_t{256} << 20, size_t{16} << 20, size_t{2} << 20}) {
    for (;;) {
      DeviceBuffer b;
      if (!alloc.Allocate(piece, &b).ok()) break;
      rest.push_back(std::move(b));
    }
  }
  ASSERT_EQ(alloc.stats().bytes_cached, 0u);
  b2.reset();                              // B: freed first
  gib.pop_back();                          // A1
  gib.pop_back();                          // A2
  const uint64_t mallocs = alloc.stats().device_mallocs;
  ASSERT_TRUE(alloc.Allocate(2 * kGiB, &b2).ok());  // B used again ...
  ASSERT_EQ(b2.get(), b2_ptr);
  b2.reset();                              // ... and freed last: the most recently used block
  ASSERT_EQ(alloc.stats().bytes_cached, 4 * kGiB);
  const AllocatorStats before = alloc.stats();
  DeviceBuffer big;
  CudaResult r = alloc.Allocate(size_t{3} << 29, &big);  // 1.5 GiB: a class the cache does not hold
  ASSERT_TRUE(r.ok()) << r.message;
  const AllocatorStats after = alloc.stats();
  const uint64_t freed = after.device_frees - before.device_frees;
  EXPECT_EQ(freed, 2u) << "A1 and A2 (2 GiB, idle longest) cover the 1.5 GiB lack";
  EXPECT_EQ(after.bytes_cached, 2 * kGiB);
  DeviceBuffer again;
  ASSERT_TRUE(alloc.Allocate(2 * kGiB, &again).ok());
  const bool b2_kept = again.get() == b2_ptr;
  EXPECT_TRUE(b2_kept) << "the most recently used block was returned to the driver";
  EXPECT_EQ(alloc.stats().device_mallocs, mallocs + 1) << "only the 1.5 GiB miss may cudaMalloc";
  EXPECT_EQ(cudaMemset(big.get(), 1, big.bytes()), cudaSuccess);
  EXPECT_EQ(cudaMemset(again.get(), 2, again.bytes()), cudaSuccess);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::printf("[%s] LRU release: a 1.5 GiB miss freed %llu blocks (want 2: the idle 1 GiB ones); the 2 GiB block "
              "used last %s\n",
              freed == 2 && b2_kept ? "PASS" : "FAIL", static_cast<unsigned long long>(freed),
              b2_kept ? "stayed cached" : "was freed");
}

TEST(DeviceAllocatorTest, MoveTransfersOwnership) {
  DeviceAllocator alloc;
  DeviceBuffer a;
  ASSERT_TRUE(alloc.Allocate(1000, &a).ok());
  void* p = a.get();
  DeviceBuffer b = std::move(a);
  EXPECT_FALSE(a);
  EXPECT_EQ(b.get(), p);
  EXPECT_EQ(alloc.stats().bytes_in_use, 1024u);
  b.reset();
  EXPECT_EQ(alloc.stats().bytes_in_use, 0u);
  DeviceBuffer c;
  ASSERT_TRUE(alloc.Allocate(900, &c).ok());  // same class: the cached block comes back
  EXPECT_EQ(c.get(), p);
}

// A graph pool (ops/decode_graph.h): during its capture, allocations come from the free lists,
// a miss is an error (no cudaMalloc); the pool's blocks, freed during or after the capture, and
// ordinary blocks freed during it, are handed to no one else until ReleasePool returns them.
TEST(DeviceAllocatorTest, GraphPoolKeepsItsBlocksUntilReleased) {
  DeviceAllocator alloc;
  // Warm the free lists with two 1 KiB blocks and one 64 KiB block.
  {
    DeviceBuffer a, b, c;
    ASSERT_TRUE(alloc.Allocate(1024, &a).ok());
    ASSERT_TRUE(alloc.Allocate(1024, &b).ok());
    ASSERT_TRUE(alloc.Allocate(65536, &c).ok());
  }
  DeviceBuffer outside;  // allocated before the capture, freed during it: adopted by the pool
  ASSERT_TRUE(alloc.Allocate(65536, &outside).ok());
  void* outside_ptr = outside.get();
  const uint64_t mallocs = alloc.stats().device_mallocs;

  const uint64_t pool = alloc.BeginPoolCapture();
  ASSERT_NE(pool, 0u);
  EXPECT_EQ(alloc.BeginPoolCapture(), 0u) << "a second pool while one captures";
  EXPECT_EQ(alloc.capturing_pool(), pool);
  DeviceBuffer kept, temp;
  ASSERT_TRUE(alloc.Allocate(1000, &kept).ok());  // lives past the capture (the graph's output)
  ASSERT_TRUE(alloc.Allocate(1000, &temp).ok());
  void* temp_ptr = temp.get();
  temp.reset();  // freed during the capture: back to the pool
  DeviceBuffer again;
  ASSERT_TRUE(alloc.Allocate(1000, &again).ok());
  EXPECT_EQ(again.get(), temp_ptr) << "the capture reuses its own freed block";
  again.reset();
  outside.reset();
  DeviceBuffer miss;
  const CudaResult r = alloc.Allocate(3 << 20, &miss);  // nothing of this class is cached
  EXPECT_FALSE(r.ok());
  std::printf("[INFO] capture miss: %s\n", r.message.c_str());
  EXPECT_EQ(alloc.stats().capture_misses, 1u);
  EXPECT_EQ(alloc.stats().device_mallocs, mallocs) << "cudaMalloc during a capture";
  alloc.EndPoolCapture();
  EXPECT_EQ(alloc.capturing_pool(), 0u);
  EXPECT_EQ(alloc.stats().bytes_pooled, 1024u + 65536u);

  // While the pool lives, nobody else gets its blocks, not even a freed one.
  void* kept_ptr = kept.get();
  kept.reset();
  std::vector<DeviceBuffer> others(4);
  for (auto& o : others) {
    ASSERT_TRUE(alloc.Allocate(1000, &o).ok());
    EXPECT_NE(o.get(), temp_ptr);
    EXPECT_NE(o.get(), kept_ptr);
  }
  DeviceBuffer big;
  ASSERT_TRUE(alloc.Allocate(65536, &big).ok());
  EXPECT_NE(big.get(), outside_ptr);
  others.clear();
  big.reset();

  // Released: the pool's blocks are ordinary cached blocks again.
  const uint64_t cached = alloc.stats().bytes_cached;
  alloc.ReleasePool(pool);
  EXPECT_EQ(alloc.stats().bytes_pooled, 0u);
  EXPECT_EQ(alloc.stats().bytes_cached, cached + 2 * 1024u + 65536u);
  std::vector<void*> got;
  std::vector<DeviceBuffer> after(8);
  for (auto& o : after) {
    ASSERT_TRUE(alloc.Allocate(1000, &o).ok());
    got.push_back(o.get());
  }
  EXPECT_NE(std::find(got.begin(), got.end(), temp_ptr), got.end());
  EXPECT_NE(std::find(got.begin(), got.end(), kept_ptr), got.end());
  ASSERT_TRUE(alloc.ReleaseCached().ok());
}

}  // namespace
}  // namespace gyre::cuda
