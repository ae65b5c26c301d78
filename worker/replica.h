// ModelReplica: one data-parallel replica's compute state — the model, its optimizer and
// schedule — with the operations the worker's step protocol needs (DESIGN.md section 4):
//
//   ComputeGradients   forward + backward on this rank's samples; loss and gradients are sums
//                      over its tokens divided by the GLOBAL batch's token count
//   ReduceGradients    SUM all-reduce of every gradient (packed into buckets) and of the loss
//   ApplyUpdate        only after the coordinator's COMMIT: clip + AdamW at the step's lr
//   BroadcastState     live hand-over to joining members (parameters + optimizer state)
//   Snapshot/RestoreFrom   checkpoint contents
//
// Replicas of one run hold bitwise-identical parameters: they start from the same seed or the
// same broadcast, and apply identical reduced gradients. Not thread-safe.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "gyre/v1/config.pb.h"
#include "ops/flops.h"
#include "ops/model.h"
#include "ops/train_step.h"
#include "worker/checkpoint.h"
#include "base/clock.h"
#include "base/env.h"
#include "worker/collective.h"
#include "worker/gpu_runtime.h"
#include "worker/grad_reducer.h"
#include "worker/snapshot_staging.h"

namespace gyre {

struct ReplicaLoss {
  double loss = 0;        // this rank's share before reduction, the global loss after
  double tokens = 0;      // targets counted (head 1), this rank's / the global batch's
};

class ModelReplica {
 public:
  // Builds the model of `config.model` (fp32 masters), seeded by `config.seed`, and its trainer,
  // on `device`: kCpu (Gloo workers) or kCuda (NCCL workers; needs a binary with the GPU runtime,
  // worker/gpu_runtime.h). On CUDA every Collective buffer is device memory: gradients are
  // reduced as byte ranges of the flat gradient buffer on the collective's stream, the loss and
  // the optimizer's step count are staged through device memory.
  static absl::StatusOr<std::unique_ptr<ModelReplica>> Create(const gyre::v1::RunConfig& config,
                                                              ops::Device device = ops::Device::kCpu);

  // tokens: [batch, seq + 1] row-major (batch may be 0: a rank with no samples this step still
  // takes part in the reduction with zero gradients). With `train.micro_batch` = m > 0 the rows
  // run m at a time (gradient accumulation: activations of one micro-batch live at a time); the
  // sums are the same as one pass over all rows up to fp32 summation order. The overlapped
  // reduction starts only in the last micro-batch's backward (earlier gradients are partial).
  ReplicaLoss ComputeGradients(std::span<const int32_t> tokens, int64_t batch, int64_t seq,
                               uint64_t global_tokens);
  // All-reduces gradients and `loss` (in place), in buckets of at most `bucket_bytes`. After
  // BeginOverlappedReduce the gradient buckets already went out during backward: this waits for
  // them (the exposed part of the communication) and reduces the loss.
  absl::Status ReduceGradients(Collective* collective, ReplicaLoss* loss, size_t bucket_bytes = kBucketBytes);
  // Arms the overlap for the next ComputeGradients: each gradient bucket (reverse parameter order)
  // is all-reduced on `collective` by a communication thread as soon as backward finalized it.
  // The next ReduceGradients must follow (with the same collective).
  void BeginOverlappedReduce(Collective* collective, size_t bucket_bytes = kBucketBytes);
  static constexpr size_t kBucketBytes = size_t{25} << 20;

  // Wall time of the last ComputeGradients: forward = embedding, blocks and final norm up to the
  // loss; backward = the fused LM-head loss and gradient (its logits are computed in the same
  // pass) and back-propagation. With MTP heads, later heads' forwards count as backward.
  // On CUDA the times come from CUDA events on the compute and communication streams (the host
  // only enqueues kernels) and are valid after ReduceGradients; exposed_comm_ms / comm_ms are
  // then the device's view (backward end -> last bucket reduced; first bucket -> last), and -1 on
  // the CPU (the caller measures the wait itself). With micro-batches the host times sum the
  // passes, and so do the CUDA events (one event pair per pass).
  struct PassTimes {
    double forward_ms = 0;
    double backward_ms = 0;
    double exposed_comm_ms = -1;
    double comm_ms = -1;
  };
  const PassTimes& last_pass_times() const { return pass_times_; }
  // Clip + AdamW for step `step` (0-based). DataLoss for a non-finite gradient norm (no update);
  // FailedPrecondition while partially_restored().
  absl::StatusOr<ops::UpdateStats> ApplyUpdate(uint64_t step);
  void DropGradients();
  // Global L2 norm of the (reduced) gradients, before clipping.
  double GradNorm();

  // Every member calls this with the same root: afterwards all hold root's parameters and
  // optimizer state. A partially restored root refuses (FailedPrecondition, before sending); a
  // receiver is partially restored until it has received everything.
  absl::Status BroadcastState(Collective* collective, int root);

  // The parameters and optimizer state as they are now, copied into one buffer from `staging`
  // (the snapshots share it until dropped). ResourceExhausted when host memory cannot be had;
  // FailedPrecondition while partially_restored().
  absl::StatusOr<std::vector<TensorSnapshot>> Snapshot(SnapshotStaging* staging) const;
  // The staging bytes Snapshot needs (for SnapshotStaging::Prepare).
  size_t SnapshotBytes() const;
  // Restores checkpoint directory `dir` (the worker's restore) by streaming its files
  // (StreamCheckpoint): read in chunks into a few reused buffers, pinned on CUDA, each chunk
  // checksummed as it is read and copied to its tensors while the next chunks are read.
  // Checked before anything is written, leaving the replica untouched on failure: the manifest
  // (its step must be `expected_step`), every tensor of this replica in it with its dtype and
  // size, every file present with its manifest size. A failure found while streaming (a checksum,
  // a read error; DataLoss naming the file) leaves the replica partially restored (below).
  struct RestoreStats {
    CheckpointStreamStats stream;
    double alloc_s = 0;   // the read buffers (pinning them on CUDA)
    double finish_s = 0;  // installing the optimizer state and the compute (bf16) copies
  };
  absl::StatusOr<RestoreStats> RestoreFrom(Env* env, Clock* clock, const std::string& dir, uint64_t expected_step,
                                           CheckpointStreamOptions options = CheckpointStreamOptions());
  // True after a restore that failed part-way (some tensors hold the checkpoint's bytes, others
  // not): this state must never be trained, checkpointed or handed to another member. ApplyUpdate,
  // Snapshot and BroadcastState as the root refuse it; a later successful RestoreFrom
  // or a received BroadcastState clears it (the worker rebuilds the replica for a fresh start).
  bool partially_restored() const { return partially_restored_; }
  // True while the parameters and optimizer state are still the seeded initialisation this
  // replica was built with (no update applied, nothing restored or received): a fresh run's
  // generation can keep it instead of building another (worker.cc).
  bool at_initial_state() const { return at_initial_state_; }

  // XXH64 over all parameter bytes: equal replicas have equal fingerprints.
  uint64_t ParameterFingerprint() const;
  int64_t NumParameters() const { return model_->NumParameters(); }
  const ops::ModelSpec& spec() const { return model_->spec(); }
  // For forward-only work between steps (in-run evaluation); no gradients are touched.
  ops::LanguageModel* model() { return model_.get(); }
  ops::Device device() const { return device_; }
  double LrAt(uint64_t step) const { return trainer_->options().schedule.At(step); }
  // Training FLOPs per token at the run's context (ops/flops.h), for the MFU of the step metrics.
  const ops::TrainingFlops& training_flops() const { return flops_; }

 private:
  ModelReplica(std::unique_ptr<ops::LanguageModel> model, ops::TrainOptions options, ops::Device device,
               int64_t micro_batch);
  std::vector<ops::Tensor*> StateTensors();
  bool on_cuda() const { return device_ == ops::Device::kCuda; }
  // The GPU gradient sync for `bucket_bytes` (rebuilt when the cap changes); null + status_ set
  // on failure.
  DeviceGradSync* SyncFor(size_t bucket_bytes);
  // SUM all-reduce of host doubles / a host tensor's bytes over `collective`, staged through
  // device memory when the collective needs it.
  absl::Status AllReduceHost(Collective* collective, double* data, size_t count);
  absl::Status BroadcastTensor(Collective* collective, ops::Tensor* t, int root);

  GradientReducer* ReducerFor(size_t bucket_bytes);
  void OnGradReady(const std::string& group);

  std::unique_ptr<ops::LanguageModel> model_;
  std::unique_ptr<ops::Trainer> trainer_;
  ops::Device device_;
  std::unique_ptr<GradientReducer> reducer_;
  std::unique_ptr<DeviceGradSync> grad_sync_;
  size_t grad_sync_bucket_bytes_ = 0;
  absl::Status grad_sync_status_;
  size_t reducer_bucket_bytes_ = 0;
  Clock* clock_ = Clock::Real();
  int64_t backward_start_micros_ = 0;
  int64_t micro_batch_ = 0;         // rows per forward/backward; 0 = all
  bool at_initial_state_ = true;
  bool partially_restored_ = false;
  bool in_last_micro_batch_ = true;  // gradient-ready events pass to the reducers only then
  PassTimes pass_times_;
  ops::TrainingFlops flops_;
  // Snapshot's tensors: the parameters ("param." + name), then the optimizer state.
  std::vector<ops::NamedTensor> SnapshotTensors() const;
};

}  // namespace gyre
