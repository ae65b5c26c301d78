#include "ops/train_step.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "ops/grad_clip.h"

namespace gyre::ops {

absl::StatusOr<TrainOptions> TrainOptionsFromConfig(const gyre::v1::OptimizerConfig& o,
                                                    const gyre::v1::ScheduleConfig& s) {
  TrainOptions t;
  if (!(o.lr() > 0)) return absl::InvalidArgumentError(absl::StrCat("optimizer.lr must be positive, got ", o.lr()));
  t.schedule.peak_lr = o.lr();
  if (o.beta1() != 0) t.adamw.beta1 = o.beta1();
  if (o.beta2() != 0) t.adamw.beta2 = o.beta2();
  if (o.eps() != 0) t.adamw.eps = o.eps();
  if (o.weight_decay() != 0) t.adamw.weight_decay = o.weight_decay();
  t.adamw.decay_all = o.decay_norms_and_embeddings();
  if (!(t.adamw.beta1 >= 0 && t.adamw.beta1 < 1)) return absl::InvalidArgumentError("optimizer.beta1 must be in [0, 1)");
  if (!(t.adamw.beta2 >= 0 && t.adamw.beta2 < 1)) return absl::InvalidArgumentError("optimizer.beta2 must be in [0, 1)");
  if (!(t.adamw.eps > 0)) return absl::InvalidArgumentError("optimizer.eps must be positive");
  if (!(t.adamw.weight_decay >= 0)) return absl::InvalidArgumentError("optimizer.weight_decay must be >= 0");
  t.grad_clip = o.grad_clip() == 0 ? 1.0 : o.grad_clip();  // negative disables
  t.schedule.warmup_steps = s.warmup_steps();
  t.schedule.total_steps = s.total_steps();
  t.schedule.final_fraction = s.final_lr_fraction() == 0 ? 0.1 : s.final_lr_fraction();
  if (!(t.schedule.final_fraction > 0 && t.schedule.final_fraction <= 1))
    return absl::InvalidArgumentError("schedule.final_lr_fraction must be in (0, 1]");
  if (t.schedule.total_steps != 0 && t.schedule.total_steps < t.schedule.warmup_steps)
    return absl::InvalidArgumentError("schedule.total_steps must be >= schedule.warmup_steps");
  return t;
}

Trainer::Trainer(LanguageModel* model, TrainOptions options)
    : model_(model), options_(options), adamw_(&model->params(), options.adamw) {}

LossResult Trainer::ComputeGradients(std::span<const int32_t> tokens, int64_t batch, int64_t seq, double loss_scale) {
  model_->params().DeferZeroGrad();  // the first writer of each gradient overwrites (ops/module.h)
  return model_->ForwardBackward(tokens, batch, seq, loss_scale);
}

absl::StatusOr<UpdateStats> Trainer::ApplyUpdate(uint64_t step) {
  UpdateStats u;
  if (adamw_.on_cuda()) {
    // One fused pass on the device: global norm, clip, AdamW, bf16 compute copies.
    u.lr = options_.schedule.At(step);
    u.grad_norm = adamw_.ClipAndStep(u.lr, options_.grad_clip);
    if (!std::isfinite(u.grad_norm)) {
      return absl::DataLossError(absl::StrCat("step ", step, ": gradient norm is ", u.grad_norm, "; update skipped"));
    }
    return u;
  }
  u.grad_norm = ClipGradNorm(&model_->params(), options_.grad_clip);
  if (!std::isfinite(u.grad_norm)) {
    return absl::DataLossError(absl::StrCat("step ", step, ": gradient norm is ", u.grad_norm, "; update skipped"));
  }
  u.lr = options_.schedule.At(step);
  adamw_.Step(u.lr);
  return u;
}

absl::StatusOr<StepStats> Trainer::Step(std::span<const int32_t> tokens, int64_t batch, int64_t seq, uint64_t step) {
  StepStats s;
  // The loss stays on the device (CUDA) until the optimizer's read-back fetches it with the
  // gradient norm: one synchronisation a step, at its end (ops/step_notes.md). Taken on the
  // error path too, so the next pass starts clean.
  model_->params().DeferZeroGrad();  // the first writer of each gradient overwrites (ops/module.h)
  model_->ForwardBackwardDeferred(tokens, batch, seq, 1.0 / static_cast<double>(batch * seq));
  auto u = ApplyUpdate(step);
  s.loss = model_->TakeLoss();
  if (!u.ok()) return u.status();
  s.update = *u;
  return s;
}

}  // namespace gyre::ops
