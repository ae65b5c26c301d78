#include "ops/allocator.h"

#include <cstdlib>
#include <mutex>
#include <new>
#include <vector>

#include "ops/check.h"

namespace gyre::ops {
namespace {

constexpr int kMinClass = 8;    // 256 bytes
constexpr int kMaxClass = 48;   // 256 TiB: any real request fits

int SizeClass(size_t bytes) {
  int c = kMinClass;
  while ((size_t{1} << c) < bytes) ++c;
  return c;
}

}  // namespace

struct HostAllocator::Impl {
  mutable std::mutex mu;
  std::vector<void*> free_lists[kMaxClass + 1];
  Stats stats;
};

HostAllocator& HostAllocator::Global() {
  static HostAllocator* global = new HostAllocator();  // intentionally leaked, see header
  return *global;
}

HostAllocator::Impl* HostAllocator::impl() {
  static std::once_flag once;
  std::call_once(once, [this] { impl_ = new Impl(); });
  return impl_;
}

std::shared_ptr<void> HostAllocator::Allocate(size_t bytes) {
  Impl* im = impl();
  const int c = SizeClass(bytes == 0 ? 1 : bytes);
  GYRE_CHECK(c <= kMaxClass, "allocation of %zu bytes too large", bytes);
  const size_t size = size_t{1} << c;
  void* p = nullptr;
  {
    std::lock_guard<std::mutex> lock(im->mu);
    im->stats.allocations++;
    im->stats.bytes_in_use += size;
    if (!im->free_lists[c].empty()) {
      p = im->free_lists[c].back();
      im->free_lists[c].pop_back();
      im->stats.pool_hits++;
      im->stats.bytes_cached -= size;
    }
  }
  if (p == nullptr) {
    p = std::aligned_alloc(64, size);
    if (p == nullptr) {
      Trim();
      p = std::aligned_alloc(64, size);
    }
    GYRE_CHECK(p != nullptr, "out of host memory allocating %zu bytes", size);
  }
  return std::shared_ptr<void>(p, [im, c, size](void* q) {
    std::lock_guard<std::mutex> lock(im->mu);
    im->free_lists[c].push_back(q);
    im->stats.bytes_in_use -= size;
    im->stats.bytes_cached += size;
  });
}

void HostAllocator::Trim() {
  Impl* im = impl();
  std::lock_guard<std::mutex> lock(im->mu);
  for (auto& list : im->free_lists) {
    for (void* p : list) std::free(p);
    list.clear();
  }
  im->stats.bytes_cached = 0;
}

HostAllocator::Stats HostAllocator::GetStats() const {
  Impl* im = const_cast<HostAllocator*>(this)->impl();
  std::lock_guard<std::mutex> lock(im->mu);
  return im->stats;
}

}  // namespace gyre::ops
