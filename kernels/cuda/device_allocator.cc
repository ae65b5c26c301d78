#include "kernels/cuda/device_allocator.h"

#include <cuda_runtime.h>

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
      for (void* ptr : blocks) cudaFree(ptr);
  pools_.clear();
  ReleaseCachedLocked();
}

void* DeviceAllocator::Pop(FreeLists& lists, size_t cls) {
  auto it = lists.find(cls);
  if (it == lists.end() || it->second.empty()) return nullptr;
  void* ptr = it->second.back();
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
    pools_[pool][cls].push_back(ptr);
    stats_.bytes_pooled += cls;
  } else {
    free_[cls].push_back(ptr);
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
      for (void* ptr : blocks) free_[cls].push_back(ptr);
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

CudaResult DeviceAllocator::ReleaseCachedLocked() {
  CudaResult result;
  for (auto& [cls, blocks] : free_) {
    for (void* ptr : blocks) {
      const cudaError_t err = cudaFree(ptr);
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
