// NcclCollective: Collective over NCCL for GPU workers, following ELASTIC.md section 6.
//
//  - One communicator per generation, non-blocking (config.blocking = 0): every NCCL call may
//    return ncclInProgress and is polled with ncclCommGetAsyncError against a deadline, because
//    NCCL has no timeouts of its own and only a non-blocking communicator can be aborted safely.
//  - Operations run on the collective's own stream. A CPU-side wait polls a completion event,
//    the async error and the deadline; on error or expiry the communicator is aborted
//    (ncclCommAbort) and the call returns Aborted / DeadlineExceeded. The caller then drops this
//    object and forms the next generation — a communicator is never repaired.
//  - Buffers are device memory on `device`. AllReduceSumAsync lets the trainer launch a bucket
//    as soon as its gradients are ready (stream-ordered after `ready`) and wait later, so
//    communication hides under the rest of backward.
//
// Thread-safety: one thread issues operations; Abort() may come from a watchdog thread.
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>

#include <atomic>
#include <memory>
#include <mutex>
#include <string>

#include "absl/status/statusor.h"
#include "worker/collective.h"

namespace gyre {

struct NcclOptions {
  int64_t init_timeout_ms = 90000;  // communicator creation (ELASTIC.md: ~90 s)
  int64_t op_timeout_ms = 60000;    // each wait on an operation
};

class NcclCollective final : public Collective {
 public:
  // A fresh unique id (128 bytes). Its creator hosts NCCL's bootstrap root and must stay alive
  // until every rank joined; use a new id per generation.
  static absl::StatusOr<std::string> NewUniqueId();

  // Creates this rank's communicator for `generation` on CUDA device `device`.
  static absl::StatusOr<std::unique_ptr<NcclCollective>> Connect(const std::string& unique_id, uint64_t generation,
                                                                 int rank, int world_size, int device,
                                                                 const NcclOptions& options);
  ~NcclCollective() override;  // healthy: destroy; after an error: abort

  int rank() const override { return rank_; }
  int world_size() const override { return world_size_; }
  uint64_t generation() const override { return generation_; }
  bool device_buffers() const override { return true; }
  // Device pointers. Blocking (launch + wait).
  absl::Status AllReduceSum(float* data, size_t count) override;
  absl::Status AllReduceSum(double* data, size_t count) override;
  absl::Status Broadcast(void* data, size_t bytes, int root) override;
  void Abort() override;

  // Launches a sum all-reduce of a device buffer on the communication stream after `ready`
  // (an event recorded on the compute stream when the bucket's gradients are final; may be
  // null). Returns at once; Wait() blocks until every launched operation finished.
  absl::Status AllReduceSumAsync(float* data, size_t count, cudaEvent_t ready);
  absl::Status Wait();

  cudaStream_t stream() const { return stream_; }

 private:
  NcclCollective(ncclComm_t comm, cudaStream_t stream, cudaEvent_t done, uint64_t generation, int rank,
                 int world_size, int device, const NcclOptions& options);
  // Polls until NCCL leaves ncclInProgress for the last call.
  absl::Status AwaitIssued(ncclResult_t result, const char* what);
  absl::Status AbortWith(absl::Status why);

  std::mutex mu_;  // one NCCL caller at a time (NCCL thread-safety rule), incl. Abort
  ncclComm_t comm_;
  cudaStream_t stream_;
  cudaEvent_t done_;
  const uint64_t generation_;
  const int rank_;
  const int world_size_;
  const int device_;
  const NcclOptions options_;
  std::atomic<bool> aborted_{false};
  bool failed_ = false;
};

}  // namespace gyre
