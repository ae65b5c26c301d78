// A model to evaluate, from a run directory (DESIGN.md §7): the resolved config
// (runs/<name>/config.json) and the parameters of the newest checkpoint whose parameters verify
// (or of a named step), read with worker/checkpoint.h (manifest + per-file XXH64 checks).
//
// Parameters are the checkpoint's "param.<name>" tensors (what ModelReplica::Snapshot writes).
// They are streamed (StreamCheckpoint) chunk by chunk through one set of read buffers straight
// into the model, never held whole in host memory (a 1.3B checkpoint is 16 GB). Only the files
// holding a parameter are read and checksummed: the optimizer's moments (2/3 of a checkpoint)
// are neither needed nor verified, so a checkpoint whose moment-only file is corrupt still
// serves its (verified) parameters. The checkpoint carries its own copy of the run config; when
// its model section differs from config.json's, loading is refused (naming both files), because
// the parameter shapes would be read against the wrong architecture.
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
  CheckpointStreamStats stream;      // how the parameters were read
  CheckpointStreamOptions stream_options;  // the reader settings (config's checkpoint.restore_*)
};

// The read buffers follow the config's checkpoint.restore_* settings (an invalid one is refused
// naming the config file and the field).
absl::StatusOr<LoadedModel> LoadModelFromRun(Env* env, const LoadOptions& options);

// Steps of the checkpoint directories "step-<t>" under <run_dir>/checkpoints, ascending (complete
// ones by name; ".tmp" leftovers are not listed; contents are verified only when read).
absl::StatusOr<std::vector<uint64_t>> ListCheckpointSteps(Env* env, const std::string& run_dir);

// Streams the "param.<name>" tensors of checkpoint `dir` (`manifest`: ReadCheckpointManifest's)
// into `model` (on the CPU), chunk by chunk through `options`' buffers; only the files that hold
// a parameter are read. Checked before the first byte is written (the model untouched on error):
// every parameter present, f32, with the model's shape and size (DataLoss naming the tensor and
// `dir`), every file read present with its manifest size (DataLoss naming the file). A file that
// fails its checksum, or a read error, is DataLoss naming the file, found after earlier chunks
// were copied: the model then holds a mix of old and new parameters and must be loaded again
// before use. Returns what was streamed (bytes: those of the files read).
absl::StatusOr<CheckpointStreamStats> LoadParameters(Env* env, const std::string& dir,
                                                     const gyre::v1::CheckpointManifest& manifest,
                                                     ops::LanguageModel* model,
                                                     const CheckpointStreamOptions& options = CheckpointStreamOptions());

}  // namespace gyre::eval
