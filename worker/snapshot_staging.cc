#include "worker/snapshot_staging.h"

#include <cstdlib>
#include <utility>

#include "ops/cuda_backend.h"

namespace gyre {

std::shared_ptr<void> AllocateHostBuffer(size_t bytes, bool pinned) {
  const size_t n = bytes == 0 ? 1 : bytes;
  if (pinned) {
    if (ops::CudaBackend* cuda = ops::CudaBackendOrNull(); cuda != nullptr) {
      if (std::shared_ptr<void> p = cuda->AllocatePinnedHost(n)) return p;
    }
  }
  void* p = std::malloc(n);
  if (p == nullptr) return nullptr;
  return std::shared_ptr<void>(p, std::free);
}

SnapshotStaging::~SnapshotStaging() {
  if (pending_.valid()) pending_.wait();
}

void SnapshotStaging::TakePending() {
  if (!pending_.valid()) return;
  // The prepared buffer replaces the kept one (a snapshot that still holds the old one keeps it
  // alive until the writer drops it).
  if (std::shared_ptr<void> p = pending_.get(); p != nullptr) {
    buffer_ = std::move(p);
    bytes_ = pending_bytes_;
  }
  pending_bytes_ = 0;
}

void SnapshotStaging::Prepare(size_t bytes) {
  if (pending_.valid() && pending_bytes_ >= bytes) return;
  if (buffer_ != nullptr && bytes_ >= bytes) return;
  TakePending();
  pending_bytes_ = bytes;
  pending_ = std::async(std::launch::async, [this, bytes] { return AllocateHostBuffer(bytes, pinned_); });
}

std::shared_ptr<void> SnapshotStaging::Acquire(size_t bytes) {
  TakePending();
  if (buffer_ != nullptr && buffer_.use_count() == 1 && bytes_ >= bytes) return buffer_;
  buffer_.reset();
  bytes_ = 0;
  std::shared_ptr<void> p = AllocateHostBuffer(bytes, pinned_);
  if (p == nullptr) return nullptr;
  buffer_ = p;
  bytes_ = bytes;
  return p;
}

}  // namespace gyre
