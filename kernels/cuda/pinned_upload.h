// Host -> device uploads through page-locked staging buffers, so that an upload in the training
// step (token ids, targets, the embedding backward's plan) neither blocks the host nor costs a
// staging copy inside the driver.
//
// Why: cudaMemcpyAsync from pageable memory may return only once the driver has moved the bytes
// into its own pinned staging area, and for more than a small amount it waits for the DMA, i.e.
// for the stream to reach the copy: mid-step (the LM head's targets while the forward is queued)
// that stalls the host behind the device and leaves the device idle while the host catches up.
// A copy from pinned memory is a true asynchronous DMA: the host memcpy's the bytes into a
// staging buffer (tens of microseconds for 128 KiB) and returns.
//
// A ring of kSlots staging buffers, each with an event recorded after its copy: a slot is reused
// only after its event has completed (cudaEventSynchronize, which returns at once unless the
// device is still kSlots uploads behind). A slot grows (free + re-allocate, after its event) when
// a larger upload comes. Not for a stream that is being captured into a graph (the event record
// would become a graph node): callers use a pageable copy there. Not thread-safe (one stream's
// driver thread).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "kernels/cuda/device_info.h"  // CudaResult

namespace gyre::cuda {

class PinnedUploads {
 public:
  PinnedUploads() = default;
  ~PinnedUploads();
  PinnedUploads(const PinnedUploads&) = delete;
  PinnedUploads& operator=(const PinnedUploads&) = delete;

  // Copies `bytes` from host_src (any host memory; read before the call returns) to device_dst on
  // `stream`, through the next staging slot. The device copy is ordered on the stream as a
  // cudaMemcpyAsync would be.
  CudaResult Upload(void* device_dst, const void* host_src, size_t bytes, cudaStream_t stream);

  static constexpr int kSlots = 8;

 private:
  struct Slot {
    void* host = nullptr;  // pinned
    size_t capacity = 0;
    cudaEvent_t done = nullptr;
    bool in_flight = false;
  };
  Slot slots_[kSlots];
  int next_ = 0;
};

}  // namespace gyre::cuda
