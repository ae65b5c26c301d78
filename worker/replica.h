// ModelReplica: one data-parallel replica's compute state — the model, its optimizer and
// schedule — with the operations the worker's step protocol needs (DESIGN.md section 4):
//
//   ComputeGradients   forward + backward on this rank's samples; loss and gradients are sums
//                      over its tokens divided by the GLOBAL batch's token count
//   ReduceGradients    SUM all-reduce of every gradient (packed into buckets) and of the loss
//   ApplyUpdate        only after the coordinator's COMMIT: clip + AdamW at the step's lr
//   BroadcastState     live hand-over to joining members (parameters + optimizer state)
//   Snapshot/Restore   checkpoint contents
//
// Replicas of one run hold bitwise-identical parameters: they start from the same seed or the
// same broadcast, and apply identical reduced gradients. Not thread-safe.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "gyre/v1/config.pb.h"
#include "ops/model.h"
#include "ops/train_step.h"
#include "worker/checkpoint.h"
#include "worker/collective.h"

namespace gyre {

struct ReplicaLoss {
  double loss = 0;        // this rank's share before reduction, the global loss after
  double tokens = 0;      // targets counted (head 1), this rank's / the global batch's
};

class ModelReplica {
 public:
  // Builds the model of `config.model` (fp32, CPU), seeded by `config.seed`, and its trainer.
  static absl::StatusOr<std::unique_ptr<ModelReplica>> Create(const gyre::v1::RunConfig& config);

  // tokens: [batch, seq + 1] row-major (batch may be 0: a rank with no samples this step still
  // takes part in the reduction with zero gradients).
  ReplicaLoss ComputeGradients(std::span<const int32_t> tokens, int64_t batch, int64_t seq,
                               uint64_t global_tokens);
  // All-reduces gradients and `loss` (in place). Buckets of at most `bucket_bytes`.
  absl::Status ReduceGradients(Collective* collective, ReplicaLoss* loss, size_t bucket_bytes = size_t{25} << 20);
  // Clip + AdamW for step `step` (0-based). DataLoss for a non-finite gradient norm (no update).
  absl::StatusOr<ops::UpdateStats> ApplyUpdate(uint64_t step);
  void DropGradients();
  // Global L2 norm of the (reduced) gradients, before clipping.
  double GradNorm();

  // Every member calls this with the same root: afterwards all hold root's parameters and
  // optimizer state.
  absl::Status BroadcastState(Collective* collective, int root);

  std::vector<TensorSnapshot> Snapshot() const;
  absl::Status Restore(const std::vector<TensorSnapshot>& tensors);

  // XXH64 over all parameter bytes: equal replicas have equal fingerprints.
  uint64_t ParameterFingerprint() const;
  int64_t NumParameters() const { return model_->NumParameters(); }
  const ops::ModelSpec& spec() const { return model_->spec(); }
  double LrAt(uint64_t step) const { return trainer_->options().schedule.At(step); }

 private:
  ModelReplica(std::unique_ptr<ops::LanguageModel> model, ops::TrainOptions options);
  std::vector<ops::Tensor*> StateTensors();

  std::unique_ptr<ops::LanguageModel> model_;
  std::unique_ptr<ops::Trainer> trainer_;
  std::vector<float> bucket_;
};

}  // namespace gyre
