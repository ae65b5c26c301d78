// GpuRuntime: the seam between the worker (compiled everywhere) and its CUDA + NCCL parts
// (//worker:gpu_runtime_cuda, built only with --config=cuda), like ops/cuda_backend.h: the CUDA
// library registers an implementation at static-initialisation time; binaries depend on
// :gpu_runtime_if_available, so a CPU build behaves exactly as before and asking it for a GPU
// worker fails with a clear message.
//
// What lives behind it:
//  - Connect: one generation's NCCL communicator (NcclCollective). Rank 0 creates the unique id
//    (it hosts NCCL's bootstrap root) and publishes it in the generation's rendezvous store
//    (the coordinator's store by default); the others read it from there.
//  - DeviceGradSync: the GPU gradient sync of one replica. Buckets are byte ranges of the flat
//    gradient buffer (ParamStore::FlatGrad, BucketPlan). At each grad_ready_hook a CUDA event is
//    recorded on the compute stream and the NCCL stream waits on it before the bucket's
//    all-reduce (enqueue-time readiness is not completion). Finish waits for every bucket (the
//    exposed communication). Forward / backward / exposed communication are timed with CUDA
//    events, since the host only enqueues kernels.
//
// Thread-safety: one thread (the training loop) uses a runtime object and what it creates.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "ops/module.h"
#include "worker/collective.h"
#include "worker/rendezvous_store.h"

namespace gyre {

struct DeviceStepTimes {
  double forward_ms = 0;       // compute stream, summed over the step's passes: pass start -> its backward start
  double backward_ms = 0;      // compute stream, summed over the passes: backward start -> next pass / backward end
  double exposed_comm_ms = 0;  // backward end -> last bucket reduced (0 if hidden)
  double comm_ms = 0;          // first bucket launched -> last bucket reduced (busy span)
};

class DeviceGradSync {
 public:
  virtual ~DeviceGradSync() = default;
  virtual size_t num_buckets() const = 0;
  // Around the model's passes (training thread): PassStart before each micro-batch's forward
  // (the first one starts the step), BackwardStart at that pass's hook "" call.
  virtual void PassStart(bool first_pass) = 0;
  virtual void BackwardStart() = 0;
  // Overlapped: Begin before backward, GroupReady from the hook, Finish after backward. Without
  // Begin, Finish all-reduces every bucket after backward. Finish returns the first error (the
  // gradients are then undefined and the collective is aborted).
  virtual void Begin(Collective* collective) = 0;
  virtual void GroupReady(const std::string& prefix) = 0;
  virtual absl::Status Finish(Collective* collective) = 0;
  // Valid after Finish.
  virtual DeviceStepTimes LastTimes() = 0;
};

class GpuRuntime {
 public:
  virtual ~GpuRuntime() = default;
  // CUDA devices this process sees (0 when there is no driver or no GPU).
  virtual int DeviceCount() = 0;
  // This rank's NCCL communicator for `generation`; the id travels under `key` in `store`.
  virtual absl::StatusOr<std::unique_ptr<Collective>> Connect(RendezvousStore* store, const std::string& key,
                                                              uint64_t generation, int rank, int world_size,
                                                              int64_t timeout_ms) = 0;
  // Peak dense bf16 FLOP/s of the current device (worker/gpu_peak.h); 0 when unknown.
  virtual double PeakFlops() = 0;
  // The gradient sync of a CUDA model's flat parameter store.
  virtual absl::StatusOr<std::unique_ptr<DeviceGradSync>> NewGradSync(ops::ParamStore* params,
                                                                     size_t bucket_bytes) = 0;
};

// The registered runtime, or null in a binary built without CUDA.
GpuRuntime* GpuRuntimeOrNull();
void RegisterGpuRuntime(GpuRuntime* runtime);

}  // namespace gyre
