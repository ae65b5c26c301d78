// SnapshotStaging: the host buffer a checkpoint snapshot is copied into (ModelReplica::Snapshot).
// One buffer, reused from checkpoint to checkpoint, pinned for a CUDA replica so the
// device-to-host copy runs at link speed (16 GB in 0.31 s on an H100 host instead of 16.5 s
// through pageable memory). Pinning costs time once (16 GB: 8.5 s there), so Prepare() does it on
// a background thread ahead of the first checkpoint, and Acquire() only waits for what is left.
//
// A snapshot holds the buffer (TensorSnapshot::staging) while the checkpoint writer writes it;
// Acquire() hands out a buffer no earlier snapshot still holds.
//
// Thread-safety: one thread (the training loop) calls Prepare / Acquire; the allocation Prepare
// starts runs on its own thread.
#pragma once

#include <cstddef>
#include <future>
#include <memory>

namespace gyre {

// `bytes` of host memory, page-locked through the CUDA backend when `pinned` and the backend
// agrees (else malloc); null when none can be had. Also the read buffers of a streaming restore.
std::shared_ptr<void> AllocateHostBuffer(size_t bytes, bool pinned);

class SnapshotStaging {
 public:
  // pinned: page-locked through the CUDA backend (falls back to malloc when it refuses).
  explicit SnapshotStaging(bool pinned) : pinned_(pinned) {}
  ~SnapshotStaging();  // waits for an allocation in flight

  SnapshotStaging(const SnapshotStaging&) = delete;
  SnapshotStaging& operator=(const SnapshotStaging&) = delete;

  // Starts allocating `bytes` in the background, unless a buffer that large is kept (even one a
  // snapshot still holds: the worker waits for the write in flight before it acquires, so a
  // second buffer, 16 GB pinned at 1.3B, would never be used) or one is already coming.
  void Prepare(size_t bytes);
  // A buffer of at least `bytes` that no snapshot holds: the kept or prepared one when it fits,
  // else a new one (kept for next time). Null when host memory cannot be had.
  std::shared_ptr<void> Acquire(size_t bytes);

  bool pinned() const { return pinned_; }

 private:
  void TakePending();

  const bool pinned_;
  std::shared_ptr<void> buffer_;
  size_t bytes_ = 0;
  std::future<std::shared_ptr<void>> pending_;
  size_t pending_bytes_ = 0;
};

}  // namespace gyre
