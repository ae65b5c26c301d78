// The compute core of one training step, callable by the one-process trainer (`gyre train`) and
// by the distributed worker: model + AdamW + LR schedule + gradient clipping.
//
// The step is split where DESIGN.md §4 needs it:
//   ComputeGradients(tokens)   forward + backward (loss scaled by 1/global tokens); the previous
//                              step's gradients are replaced (ParamStore::DeferZeroGrad)
//   ... the worker all-reduces the gradients (SUM) and waits for the coordinator's COMMIT ...
//   ApplyUpdate(step)          clip to the global norm, AdamW with lr = schedule(step)
// `Step` does both for a single process, with one read-back at its end (the loss travels with
// the gradient norm; ComputeGradients reads the loss back at its own end). A non-finite gradient norm is refused (no update, an
// error) so one bad batch cannot poison the weights (torchtitan's train_step does the same).
// Not thread-safe.
#pragma once

#include <cstdint>
#include <span>

#include "absl/status/statusor.h"
#include "gyre/v1/config.pb.h"
#include "ops/adamw.h"
#include "ops/lr_schedule.h"
#include "ops/model.h"

namespace gyre::ops {

struct TrainOptions {
  AdamWOptions adamw;
  LrSchedule schedule;
  double grad_clip = 1.0;  // <= 0 disables
};

// Reads OptimizerConfig + ScheduleConfig with the defaults documented in config.proto.
// Errors name the field ("optimizer.lr must be positive").
absl::StatusOr<TrainOptions> TrainOptionsFromConfig(const gyre::v1::OptimizerConfig& optimizer,
                                                    const gyre::v1::ScheduleConfig& schedule);

struct UpdateStats {
  double grad_norm = 0;  // before clipping
  double lr = 0;
};

struct StepStats {
  LossResult loss;
  UpdateStats update;
};

class Trainer {
 public:
  // `model` must outlive the trainer.
  Trainer(LanguageModel* model, TrainOptions options);

  LossResult ComputeGradients(std::span<const int32_t> tokens, int64_t batch, int64_t seq, double loss_scale);
  absl::StatusOr<UpdateStats> ApplyUpdate(uint64_t step);
  // One process: loss_scale = 1 / (batch * seq).
  absl::StatusOr<StepStats> Step(std::span<const int32_t> tokens, int64_t batch, int64_t seq, uint64_t step);

  AdamW& optimizer() { return adamw_; }
  LanguageModel& model() { return *model_; }
  const TrainOptions& options() const { return options_; }

 private:
  LanguageModel* model_;
  TrainOptions options_;
  AdamW adamw_;
};

}  // namespace gyre::ops
