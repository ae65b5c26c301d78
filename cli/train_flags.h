// The `gyre train` flags that describe the model and the optimisation, and their mapping onto the
// run-config messages (protos/gyre/v1/config.proto). The flags fill the same ModelConfig /
// OptimizerConfig / ScheduleConfig / TrainConfig fields a config file would, and are resolved by
// the same functions the launch path uses (ops::ResolveModelConfig, ops::TrainOptionsFromConfig),
// so a flag value is checked by the config's own validation and fails with the config's error
// (naming the field, e.g. "model.xlstm.mlstm_recompute: ...").
#pragma once

#include <cstdint>
#include <string>

#include "CLI/CLI.hpp"
#include "absl/status/statusor.h"
#include "gyre/v1/config.pb.h"
#include "ops/model_config.h"
#include "ops/train_step.h"

namespace gyre::cli {

struct TrainFlags {
  std::string preset = "llama-tiny";
  uint64_t steps = 100;
  uint64_t warmup = 0;
  int mtp_heads = 1;
  double lr = 3e-3;
  double weight_decay = 0.1;
  double grad_clip = 1.0;
  bool recompute = false;          // model.recompute_blocks
  std::string mlstm_recompute;     // model.xlstm.mlstm_recompute ("" = the config's default)
  int64_t mlstm_keep_last = 0;     // model.xlstm.mlstm_recompute_keep_last (0 = every layer recomputes, -1 = auto)
  bool deterministic = false;      // train.deterministic
};

// Registers --preset, --steps, --warmup, --lr, --weight-decay, --grad-clip, --mtp-heads,
// --recompute, --mlstm_recompute, --deterministic on `app`, writing into `flags` (which must
// outlive the parse).
void AddTrainFlags(CLI::App* app, TrainFlags* flags);

// The run-config messages the flags stand for (what a config file with the same values holds).
struct TrainFlagConfig {
  gyre::v1::ModelConfig model;
  gyre::v1::OptimizerConfig optimizer;
  gyre::v1::ScheduleConfig schedule;
  gyre::v1::TrainConfig train;
};
TrainFlagConfig TrainFlagsToConfig(const TrainFlags& flags);

struct ResolvedTrain {
  ops::ModelSpec spec;
  ops::TrainOptions options;
};
// Resolves the messages exactly as the worker's replica does (worker/replica.cc): the model
// through ops::ResolveModelConfig, train.deterministic onto ModelSpec::deterministic, the
// optimizer and schedule through ops::TrainOptionsFromConfig. Errors are the config's own.
absl::StatusOr<ResolvedTrain> ResolveTrainConfig(const TrainFlagConfig& config);

}  // namespace gyre::cli
