// A model to evaluate, from a run directory (DESIGN.md §7): the resolved config
// (runs/<name>/config.json) and the parameters of the newest checkpoint that verifies (or of a
// named step), read with worker/checkpoint.h (manifest + per-file XXH64 checks).
//
// Parameters are the checkpoint's "param.<name>" tensors (what ModelReplica::Snapshot writes);
// optimizer tensors are ignored. The checkpoint carries its own copy of the run config; when its
// model section differs from config.json's, loading is refused (naming both files), because the
// parameter shapes would be read against the wrong architecture.
//
// Thread-safety: functions are thread-safe; the returned model is not.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "base/env.h"
#include "worker/checkpoint.h"
#include "gyre/v1/config.pb.h"
#include "ops/model.h"

namespace gyre::eval {

struct LoadOptions {
  std::string run_dir;       // runs/<name>
  int64_t step = -1;         // -1: newest valid checkpoint; else checkpoints/step-<step> exactly
  std::string config_path;   // empty: <run_dir>/config.json
};

struct LoadedModel {
  gyre::v1::RunConfig config;
  ops::ModelSpec spec;
  uint64_t step = 0;
  std::string checkpoint_dir;
  std::vector<std::string> skipped;  // corrupt newer checkpoints passed over ("step-...: why")
  std::unique_ptr<ops::LanguageModel> model;  // CPU, f32
};

absl::StatusOr<LoadedModel> LoadModelFromRun(Env* env, const LoadOptions& options);

// Steps of the checkpoint directories "step-<t>" under <run_dir>/checkpoints, ascending (complete
// ones by name; ".tmp" leftovers are not listed; contents are verified only when read).
absl::StatusOr<std::vector<uint64_t>> ListCheckpointSteps(Env* env, const std::string& run_dir);

// Copies the checkpoint's "param.<name>" tensors into `model` (names, dtypes and shapes checked;
// errors name the tensor and `where`).
absl::Status LoadParameters(const std::vector<TensorSnapshot>& tensors, const std::string& where,
                            ops::LanguageModel* model);

}  // namespace gyre::eval
