// Pooled host allocator for tensor storage. Blocks are rounded up to a power-of-two size class
// (minimum 256 bytes) and kept on a per-class free list when released, so the many short-lived
// activation tensors of a training step are recycled instead of going back to malloc. Memory is
// 64-byte aligned (AVX-512 width). Thread-safe: one mutex guards the free lists.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

namespace gyre::ops {

class HostAllocator {
 public:
  // The process-wide pool. Never destroyed (blocks may be released during static destruction).
  static HostAllocator& Global();

  // Returns a block of at least `bytes` bytes; the deleter returns it to the pool.
  std::shared_ptr<void> Allocate(size_t bytes);

  // Frees every cached (currently unused) block.
  void Trim();

  struct Stats {
    uint64_t bytes_in_use = 0;     // handed out and not yet released
    uint64_t bytes_cached = 0;     // on free lists
    uint64_t allocations = 0;      // Allocate calls
    uint64_t pool_hits = 0;        // served from a free list
  };
  Stats GetStats() const;

 private:
  HostAllocator() = default;
  struct Impl;
  Impl* impl();
  Impl* impl_ = nullptr;
};

}  // namespace gyre::ops
