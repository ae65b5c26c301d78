#include "kernels/cuda/pinned_upload.h"

#include <cstring>

#include "kernels/cuda/cuda_check.h"

namespace gyre::cuda {

PinnedUploads::~PinnedUploads() {
  for (Slot& s : slots_) {
    if (s.in_flight) cudaEventSynchronize(s.done);
    if (s.done != nullptr) cudaEventDestroy(s.done);
    if (s.host != nullptr) cudaFreeHost(s.host);
  }
}

CudaResult PinnedUploads::Upload(void* device_dst, const void* host_src, size_t bytes, cudaStream_t stream) {
  if (bytes == 0) return {};
  if (device_dst == nullptr || host_src == nullptr) return InvalidArgument("PinnedUploads::Upload: null pointer");
  Slot& s = slots_[next_];
  next_ = (next_ + 1) % kSlots;
  if (s.done == nullptr) CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&s.done, cudaEventDisableTiming));
  // The copy that last read this slot must be over before the host overwrites it.
  if (s.in_flight) {
    CUDA_RETURN_IF_ERROR(cudaEventSynchronize(s.done));
    s.in_flight = false;
  }
  if (s.capacity < bytes) {
    if (s.host != nullptr) CUDA_RETURN_IF_ERROR(cudaFreeHost(s.host));
    s.host = nullptr;
    s.capacity = 0;
    size_t capacity = 64 << 10;  // powers of two from 64 KiB: a slot grows a few times at most
    while (capacity < bytes) capacity *= 2;
    CUDA_RETURN_IF_ERROR(cudaHostAlloc(&s.host, capacity, cudaHostAllocPortable));
    s.capacity = capacity;
  }
  std::memcpy(s.host, host_src, bytes);
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(device_dst, s.host, bytes, cudaMemcpyHostToDevice, stream));
  CUDA_RETURN_IF_ERROR(cudaEventRecord(s.done, stream));
  s.in_flight = true;
  return {};
}

}  // namespace gyre::cuda
