// Needs a GPU: the caching allocator serves a repeated step's working set without cudaMalloc,
// keeps live blocks disjoint, trims its cache and survives an impossible request.
#include "kernels/cuda/device_allocator.h"

#include <cuda_runtime.h>

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

}  // namespace
}  // namespace gyre::cuda
