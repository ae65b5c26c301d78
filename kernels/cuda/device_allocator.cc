#include "kernels/cuda/device_allocator.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <iterator>
#include <string>
#include <utility>
#include <vector>

#include "kernels/cuda/cuda_check.h"

namespace gyre::cuda {

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& other) noexcept {
  if (this != &other) {
    reset();
    owner_ = other.owner_;
    ptr_ = other.ptr_;
    bytes_ = other.bytes_;
    other.owner_ = nullptr;
    other.ptr_ = nullptr;
    other.bytes_ = 0;
  }
  return *this;
}

void DeviceBuffer::reset() {
  if (owner_ != nullptr && ptr_ != nullptr) owner_->Free(ptr_, bytes_);
  owner_ = nullptr;
  ptr_ = nullptr;
  bytes_ = 0;
}

namespace {

// GYRE_ALLOC_POISON (diagnosis only, read once; helper det22, session 22): "nan" or "3f" fills
// every block Allocate hands out with 0xFF / 0x3F bytes before the caller gets it, so a kernel
// that reads bytes it did not write (and nobody wrote since the allocation) sees NaN or 0.746
// instead of whatever the block held, and its output changes with the pattern. Blocks carry no
// stream (see device_allocator.h), so the fill is made safe the slow way: the device is drained
// first (every earlier user of a cached block is done), the block is set on the legacy stream
// and that is waited for. Two synchronisations per allocation: for one-step diagnosis runs, never
// a default. Not during a graph pool's capture (no synchronisation allowed there).
int PoisonByte() {
  static const int byte = [] {
    const char* v = std::getenv("GYRE_ALLOC_POISON");
    if (v == nullptr) return -1;
    const std::string s(v);
    return s == "nan" ? 0xFF : s == "3f" ? 0x3F : -1;
  }();
  return byte;
}

CudaResult PoisonBlock(void* ptr, size_t bytes) {
  CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());
  CUDA_RETURN_IF_ERROR(cudaMemsetAsync(ptr, PoisonByte(), bytes, cudaStreamLegacy));
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(cudaStreamLegacy));
  return {};
}

}  // namespace

size_t DeviceAllocator::ClassBytes(size_t bytes) {
  if (bytes <= 4096) return (bytes + 255) / 256 * 256;
  // Highest power of two <= bytes, then quarter steps above it.
  size_t pow2 = 4096;
  while (pow2 * 2 <= bytes) pow2 *= 2;
  const size_t quarter = pow2 / 4;
  return (bytes + quarter - 1) / quarter * quarter;
}

DeviceAllocator::~DeviceAllocator() {
  std::lock_guard<std::mutex> lock(mu_);
  // Blocks still held by callers are a bug in the caller; free them anyway so the device memory
  // goes back (their handles must not be used afterwards).
  for (auto& [ptr, live] : live_) cudaFree(ptr);
  live_.clear();
  for (auto& [id, lists] : pools_)
    for (auto& [cls, blocks] : lists)
      for (const FreeBlock& b : blocks) cudaFree(b.ptr);
  pools_.clear();
  ReleaseCachedLocked();
}

void* DeviceAllocator::Pop(FreeLists& lists, size_t cls) {
  auto it = lists.find(cls);
  if (it == lists.end() || it->second.empty()) return nullptr;
  void* ptr = it->second.back().ptr;  // the most recently freed block of the class
  it->second.pop_back();
  return ptr;
}

CudaResult DeviceAllocator::Allocate(size_t bytes, DeviceBuffer* out) {
  out->reset();
  if (bytes == 0) return {};
  const size_t cls = ClassBytes(bytes);
  std::lock_guard<std::mutex> lock(mu_);
  void* ptr = nullptr;
  if (capturing_ != 0 && (ptr = Pop(pools_[capturing_], cls)) != nullptr) {
    stats_.bytes_pooled -= cls;
    ++stats_.cache_hits;
  } else if ((ptr = Pop(free_, cls)) != nullptr) {
    stats_.bytes_cached -= cls;
    ++stats_.cache_hits;
  } else if (capturing_ != 0) {
    // A graph capture must not allocate from the driver (cudaMalloc is not a graph node and may
    // synchronise); the caller fails the capture and runs eagerly.
    ++stats_.capture_misses;
    return CudaError(cudaErrorMemoryAllocation,
                     ("allocation of " + std::to_string(cls) + " bytes missed the cache during a graph capture")
                         .c_str(),
                     __FILE__, __LINE__);
  } else {
    cudaError_t err = cudaMalloc(&ptr, cls);
    if (err == cudaErrorMemoryAllocation) {
      cudaGetLastError();  // clear the sticky-free error state before retrying
      CUDA_RETURN_IF_NOT_OK(ReleaseCachedForLocked(cls));
      err = cudaMalloc(&ptr, cls);
    }
    if (err == cudaErrorMemoryAllocation && !free_.empty()) {
      cudaGetLastError();
      CUDA_RETURN_IF_NOT_OK(ReleaseCachedLocked());
      err = cudaMalloc(&ptr, cls);
    }
    if (err != cudaSuccess) {
      cudaGetLastError();
      return CudaError(err, ("cudaMalloc(" + std::to_string(cls) + " bytes)").c_str(), __FILE__,
                       __LINE__);
    }
    ++stats_.device_mallocs;
  }
  if (PoisonByte() >= 0 && capturing_ == 0) CUDA_RETURN_IF_NOT_OK(PoisonBlock(ptr, cls));
  live_[ptr] = Live{cls, capturing_};
  ++stats_.allocations;
  stats_.bytes_in_use += cls;
  stats_.bytes_requested += bytes;
  if (stats_.bytes_in_use > stats_.peak_bytes_in_use) stats_.peak_bytes_in_use = stats_.bytes_in_use;
  out->owner_ = this;
  out->ptr_ = ptr;
  out->bytes_ = bytes;
  return {};
}

void DeviceAllocator::Free(void* ptr, size_t requested) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = live_.find(ptr);
  if (it == live_.end()) return;  // not ours (cannot happen through DeviceBuffer)
  const size_t cls = it->second.cls;
  // A pool's block returns to its pool; an ordinary one freed during a capture is adopted by the
  // capturing pool (the graph may read it on every replay).
  const uint64_t pool = it->second.pool != 0 ? it->second.pool : capturing_;
  live_.erase(it);
  stats_.bytes_in_use -= cls;
  stats_.bytes_requested -= requested;
  if (pool != 0) {
    pools_[pool][cls].push_back({ptr, ++free_tick_});
    stats_.bytes_pooled += cls;
  } else {
    free_[cls].push_back({ptr, ++free_tick_});
    stats_.bytes_cached += cls;
  }
}

uint64_t DeviceAllocator::BeginPoolCapture() {
  std::lock_guard<std::mutex> lock(mu_);
  if (capturing_ != 0) return 0;
  capturing_ = next_pool_++;
  pools_[capturing_];
  return capturing_;
}

void DeviceAllocator::EndPoolCapture() {
  std::lock_guard<std::mutex> lock(mu_);
  capturing_ = 0;
}

uint64_t DeviceAllocator::capturing_pool() const {
  std::lock_guard<std::mutex> lock(mu_);
  return capturing_;
}

void DeviceAllocator::ReleasePool(uint64_t pool) {
  std::lock_guard<std::mutex> lock(mu_);
  if (pool == 0) return;
  if (capturing_ == pool) capturing_ = 0;
  auto it = pools_.find(pool);
  if (it != pools_.end()) {
    for (auto& [cls, blocks] : it->second) {
      // Used by the graph until now: stamped as freed now (the lists stay in tick order).
      for (const FreeBlock& b : blocks) free_[cls].push_back({b.ptr, ++free_tick_});
      stats_.bytes_pooled -= cls * blocks.size();
      stats_.bytes_cached += cls * blocks.size();
    }
    pools_.erase(it);
  }
  for (auto& [ptr, live] : live_)
    if (live.pool == pool) live.pool = 0;
}

CudaResult DeviceAllocator::ReleaseCached() {
  std::lock_guard<std::mutex> lock(mu_);
  return ReleaseCachedLocked();
}

// Why not everything: near the card's capacity (mamba2-1.3b at 8 x 2048 peaks at 78 of 79.6 GiB)
// one missed class used to return the whole cache to the driver, so the next step missed again in
// every class and paid ~10 cudaFree + cudaMalloc a step (helper vocab19, session 19: 8-11 ms of
// host time at the LM head's 1.65 GB logits buffer alone). Freeing only what the request lacks
// keeps the other classes' blocks for their next use.
// Why least recently freed first (helper tidy21, session 21; it replaced "the smallest single
// block that covers the lack, else the largest ones", PyTorch's release_available_cached_blocks
// rule): in a step loop every block of the working set is popped and freed again once a step, so
// its tick is at most a step old; a block that has sat on its list longer is not in the working
// set (a previous model's, an eval phase's, a shape that is gone) and freeing it costs no later
// cudaMalloc. The size rule ignored that and could return a block the very next allocation
// wanted (the single cached block of the right size is often the step's own). Sizes count only
// as "enough yet?". Cost: one sort of the cached blocks, O(n log n), on the miss path only (the
// step loop never gets here once warm). Blocks under the driver's 2 MiB page may share a page
// with live allocations, so their bytes may not come back; then the caller's retry fails and it
// releases everything, as before.
CudaResult DeviceAllocator::ReleaseCachedForLocked(size_t cls) {
  size_t device_free = 0, device_total = 0;
  if (cudaMemGetInfo(&device_free, &device_total) != cudaSuccess) {
    cudaGetLastError();
    return ReleaseCachedLocked();
  }
  // The driver maps in 2 MiB pages: ask for the request rounded up, plus one page of slack.
  constexpr size_t kPage = size_t{2} << 20;
  const size_t want = (cls + kPage - 1) / kPage * kPage + kPage;
  if (device_free >= want) return {};  // not a shortage of bytes: let the caller's retry decide
  const size_t lack = want - device_free;
  struct Cached {
    uint64_t freed_at;
    size_t cls;
    void* ptr;
  };
  std::vector<Cached> cached;
  for (const auto& [c, blocks] : free_)
    for (const FreeBlock& b : blocks) cached.push_back({b.freed_at, c, b.ptr});
  std::sort(cached.begin(), cached.end(), [](const Cached& a, const Cached& b) { return a.freed_at < b.freed_at; });
  // The oldest prefix that covers the lack (all of them when none does: the caller retries).
  size_t got = 0, count = 0;
  while (count < cached.size() && got < lack) got += cached[count++].cls;
  if (count == 0) return {};
  // Ticks are unique and each class's list is in tick order, so a class's released blocks are the
  // ones at or below the newest released tick: drop a prefix per class (O(n) in all).
  const uint64_t newest_released = cached[count - 1].freed_at;
  CudaResult result;
  for (size_t i = 0; i < count; ++i) {
    const cudaError_t err = cudaFree(cached[i].ptr);
    ++stats_.device_frees;
    stats_.bytes_cached -= cached[i].cls;
    if (err != cudaSuccess && result.ok()) result = CudaError(err, "cudaFree", __FILE__, __LINE__);
  }
  for (auto it = free_.begin(); it != free_.end();) {
    auto& blocks = it->second;
    const auto keep = std::find_if(blocks.begin(), blocks.end(),
                                   [&](const FreeBlock& b) { return b.freed_at > newest_released; });
    blocks.erase(blocks.begin(), keep);
    it = blocks.empty() ? free_.erase(it) : std::next(it);
  }
  return result;
}

CudaResult DeviceAllocator::ReleaseCachedLocked() {
  CudaResult result;
  for (auto& [cls, blocks] : free_) {
    for (const FreeBlock& b : blocks) {
      const cudaError_t err = cudaFree(b.ptr);
      ++stats_.device_frees;
      stats_.bytes_cached -= cls;
      if (err != cudaSuccess && result.ok()) result = CudaError(err, "cudaFree", __FILE__, __LINE__);
    }
  }
  free_.clear();
  return result;
}

AllocatorStats DeviceAllocator::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

}  // namespace gyre::cuda
