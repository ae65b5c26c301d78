// Caching device allocator: size-class free lists over cudaMalloc, so the training step loop
// never calls cudaMalloc / cudaFree once its working set has been seen (the first step warms the
// cache; later steps only move blocks between the free lists and their owners).
//
// Size classes: requests round up to 256 bytes below 4 KiB, and above that to one of 4 classes
// per power of two (x1, x1.25, x1.5, x1.75), so no block wastes more than 25% (and on average
// ~12%). A freed block goes back on its class's free list, untouched; Allocate pops from the
// exact class (the block freed last: LIFO), else calls cudaMalloc; if that fails, it returns
// cached blocks to the driver (cudaFree) until the driver's free memory covers the request — the
// blocks that have sat on the free lists longest first (least recently used: each free stamps
// its block with a tick) — and tries again; if that fails too, it returns every cached block and
// tries once more before reporting out-of-memory.
//
// Stream semantics: blocks carry no stream. Freeing a block and handing it to the next Allocate
// is safe when all work that touches device memory runs in order on one stream (the training
// loop's); a block used on another stream must be released only after that stream has finished
// with it (event or synchronise). Allocate/Free never synchronise.
//
// Graph pools (CUDA graphs, ops/decode_graph.h; PyTorch's private graph pools do the same): a
// captured graph bakes the addresses of every block its kernels touch, so those blocks must keep
// their addresses for the graph's life and must not be handed to anyone else meanwhile. While a
// pool captures (BeginPoolCapture .. EndPoolCapture), Allocate serves from the pool's own free
// blocks, then from the ordinary free lists (the block then belongs to the pool), and never
// calls cudaMalloc: a miss is an error (a capture must not allocate from the driver; the warm-up
// step before it leaves the working set on the free lists). A pool's block, freed at any time
// before ReleasePool, goes back to that pool, not to the ordinary lists; an ordinary block freed
// during the capture is adopted by the pool (the graph may read it on every replay). ReleasePool
// (after the graph is destroyed and its last replay has finished) returns the pool's free blocks
// to the ordinary lists and turns its live ones into ordinary blocks.
//
// Thread-safety: all methods are thread-safe (one mutex). The allocator owns every block it ever
// cudaMalloc'ed and frees them all in its destructor; DeviceBuffer handles must not outlive it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "kernels/cuda/device_info.h"  // CudaResult

namespace gyre::cuda {

struct AllocatorStats {
  uint64_t allocations = 0;       // Allocate calls that succeeded
  uint64_t cache_hits = 0;        // ... served from a free list
  uint64_t device_mallocs = 0;    // cudaMalloc calls that succeeded
  uint64_t device_frees = 0;      // cudaFree calls (cache trims, destructor)
  uint64_t bytes_in_use = 0;      // class bytes held by callers now
  uint64_t bytes_cached = 0;      // class bytes on free lists now
  uint64_t peak_bytes_in_use = 0;
  uint64_t bytes_requested = 0;   // requested (unrounded) bytes held by callers now
  uint64_t bytes_pooled = 0;      // class bytes free in graph pools now (not in bytes_cached)
  uint64_t capture_misses = 0;    // Allocate calls refused during a pool's capture (cache miss)
};

class DeviceAllocator;

// Move-only owner of one block; returns it to the allocator when destroyed or reset.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(DeviceBuffer&& other) noexcept { *this = std::move(other); }
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { reset(); }

  void* get() const { return ptr_; }
  template <typename T>
  T* as() const { return static_cast<T*>(ptr_); }
  size_t bytes() const { return bytes_; }  // requested size (the block may be larger)
  explicit operator bool() const { return ptr_ != nullptr; }
  void reset();

 private:
  friend class DeviceAllocator;
  DeviceAllocator* owner_ = nullptr;
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

class DeviceAllocator {
 public:
  // Allocates on the current device (cudaSetDevice before first use); one allocator per device.
  DeviceAllocator() = default;
  ~DeviceAllocator();
  DeviceAllocator(const DeviceAllocator&) = delete;
  DeviceAllocator& operator=(const DeviceAllocator&) = delete;

  // A block of at least `bytes` (256-byte aligned; contents undefined). bytes == 0 gives an empty
  // buffer and success.
  CudaResult Allocate(size_t bytes, DeviceBuffer* out);
  // Returns every cached (free) block to the driver. Blocks in use and graph pools are untouched.
  CudaResult ReleaseCached();

  // Graph pools (see the file comment). BeginPoolCapture opens a new pool and makes it the
  // capturing one (one at a time: returns 0 when another is capturing); EndPoolCapture stops the
  // capture (the pool lives on); ReleasePool(id) dissolves it. Ids are never reused.
  uint64_t BeginPoolCapture();
  void EndPoolCapture();
  void ReleasePool(uint64_t pool);
  // The capturing pool's id, 0 when none.
  uint64_t capturing_pool() const;
  AllocatorStats stats() const;

  // The class size a request of `bytes` is served with (exposed for tests).
  static size_t ClassBytes(size_t bytes);

 private:
  friend class DeviceBuffer;
  void Free(void* ptr, size_t requested);
  CudaResult ReleaseCachedLocked();
  // Returns cached blocks to the driver, least recently freed first, until its free memory covers
  // a block of `cls` bytes (see the file comment); none when it already does.
  CudaResult ReleaseCachedForLocked(size_t cls);

  struct Live {
    size_t cls = 0;     // class bytes
    uint64_t pool = 0;  // owning graph pool, 0: ordinary
  };
  struct FreeBlock {
    void* ptr = nullptr;
    uint64_t freed_at = 0;  // free_tick_ when it went on the list (ascending along each list)
  };
  using FreeLists = std::unordered_map<size_t, std::vector<FreeBlock>>;  // class bytes -> free blocks
  static void* Pop(FreeLists& lists, size_t cls);

  mutable std::mutex mu_;
  FreeLists free_;
  std::unordered_map<void*, Live> live_;     // blocks in use
  std::unordered_map<uint64_t, FreeLists> pools_;  // live graph pools' free blocks
  uint64_t capturing_ = 0, next_pool_ = 1;
  uint64_t free_tick_ = 0;  // counts frees onto the lists: the LRU order of ReleaseCachedForLocked
  AllocatorStats stats_;
};

}  // namespace gyre::cuda
