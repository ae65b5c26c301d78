// Collective: the data-parallel communication a worker needs inside one generation — sum
// all-reduce of gradient buckets and broadcast of state to joining members (live hand-over,
// DESIGN.md section 4). One object per generation: a failure or membership change never repairs
// a communicator, it drops it and forms the next generation's (ELASTIC.md section 6).
//
// Implementations: GlooCollective (CPU, TCP) here; NCCL (GPU) in the CUDA backend.
// Thread-safety: one thread calls at a time; Abort() may be called from any thread.
#pragma once

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"

namespace gyre {

class Collective {
 public:
  virtual ~Collective() = default;
  virtual int rank() const = 0;
  virtual int world_size() const = 0;
  virtual uint64_t generation() const = 0;
  // True when the buffers passed in must be device (CUDA) memory (NCCL); false: host memory.
  virtual bool device_buffers() const { return false; }

  // In place: data[i] = sum over ranks of data[i]. On error (a peer died, timeout, abort) the
  // contents of `data` are undefined and this communicator is unusable: return Aborted or
  // DeadlineExceeded, and the caller moves to the next generation.
  virtual absl::Status AllReduceSum(float* data, size_t count) = 0;
  virtual absl::Status AllReduceSum(double* data, size_t count) = 0;
  // In place: every rank's `bytes` bytes at `data` become root's.
  virtual absl::Status Broadcast(void* data, size_t bytes, int root) = 0;
  // Makes in-flight and later operations fail promptly on this rank and tells peers (best
  // effort; peers' own timeouts are the guarantee).
  virtual void Abort() = 0;
};

}  // namespace gyre
