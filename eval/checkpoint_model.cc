#include "eval/checkpoint_model.h"

#include <algorithm>
#include <cstring>
#include <map>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/status_macros.h"
#include "cli/run_config.h"
#include "google/protobuf/util/message_differencer.h"

namespace gyre::eval {
namespace {

constexpr char kParamPrefix[] = "param.";

}  // namespace

absl::Status LoadParameters(const std::vector<TensorSnapshot>& tensors, const std::string& where,
                            ops::LanguageModel* model) {
  std::map<std::string, const TensorSnapshot*> by_name;
  for (const TensorSnapshot& t : tensors) by_name[t.name] = &t;
  for (ops::Parameter* p : model->params().All()) {
    auto it = by_name.find(kParamPrefix + p->name);
    if (it == by_name.end()) {
      return absl::DataLossError(absl::StrCat(where, " has no tensor ", kParamPrefix, p->name,
                                              " (the model config expects it)"));
    }
    const TensorSnapshot& s = *it->second;
    std::vector<uint64_t> want;
    for (int64_t d : p->value.shape()) want.push_back(static_cast<uint64_t>(d));
    if (s.shape != want) {
      return absl::DataLossError(absl::StrCat(where, ": tensor ", s.name, " has shape [", absl::StrJoin(s.shape, ","),
                                              "], the model config expects [", absl::StrJoin(want, ","), "]"));
    }
    const std::string_view bytes = s.data();
    if (s.dtype != gyre::v1::DTYPE_F32 || bytes.size() != p->value.nbytes()) {
      return absl::DataLossError(absl::StrCat(where, ": tensor ", s.name, " is not f32 of ", p->value.nbytes(),
                                              " bytes (dtype ", s.dtype, ", ", bytes.size(), " bytes)"));
    }
    std::memcpy(p->value.raw(), bytes.data(), bytes.size());
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<uint64_t>> ListCheckpointSteps(Env* env, const std::string& run_dir) {
  const std::string dir = run_dir + "/checkpoints";
  absl::StatusOr<std::vector<std::string>> names = env->ListDir(dir);
  if (!names.ok()) return absl::Status(names.status().code(), absl::StrCat("checkpoints of ", run_dir, ": ", names.status().message()));
  std::vector<uint64_t> steps;
  for (const std::string& name : *names) {
    uint64_t step;
    if (absl::StartsWith(name, "step-") && absl::SimpleAtoi(name.substr(5), &step)) steps.push_back(step);
  }
  std::sort(steps.begin(), steps.end());
  return steps;
}

absl::StatusOr<LoadedModel> LoadModelFromRun(Env* env, const LoadOptions& options) {
  if (options.run_dir.empty()) return absl::InvalidArgumentError("no run directory given (--run_dir)");
  LoadedModel out;
  const std::string config_path =
      options.config_path.empty() ? options.run_dir + "/config.json" : options.config_path;
  ASSIGN_OR_RETURN(out.config, cli::LoadRunConfig(config_path));
  absl::StatusOr<ops::ModelSpec> spec = ops::ResolveModelConfig(out.config.model());
  if (!spec.ok()) return absl::InvalidArgumentError(absl::StrCat("config file ", config_path, ": ", spec.status().message()));
  out.spec = *spec;

  const std::string checkpoints = options.run_dir + "/checkpoints";
  CheckpointState state;
  if (options.step >= 0) {
    out.checkpoint_dir = checkpoints + "/" + CheckpointDirName(static_cast<uint64_t>(options.step));
    absl::StatusOr<CheckpointState> read = ReadCheckpoint(env, out.checkpoint_dir);
    if (!read.ok()) {
      return absl::Status(read.status().code(), absl::StrCat("checkpoint of step ", options.step, " (",
                                                             out.checkpoint_dir, "): ", read.status().message()));
    }
    state = std::move(*read);
  } else {
    absl::StatusOr<LatestCheckpoint> latest = LoadLatestCheckpoint(env, checkpoints);
    if (!latest.ok()) {
      return absl::Status(latest.status().code(),
                          absl::StrCat("no valid checkpoint in ", checkpoints, ": ", latest.status().message()));
    }
    out.checkpoint_dir = latest->dir;
    out.skipped = latest->skipped;
    state = std::move(latest->state);
  }
  out.step = state.step;
  if (state.config.has_model() &&
      !google::protobuf::util::MessageDifferencer::Equals(state.config.model(), out.config.model())) {
    return absl::FailedPreconditionError(absl::StrCat(
        "the model section of ", config_path, " differs from the one checkpoint ", out.checkpoint_dir,
        " was written with (", state.config.model().ShortDebugString(), " vs ", out.config.model().ShortDebugString(),
        ")"));
  }
  ASSIGN_OR_RETURN(out.model, ops::LanguageModel::Create(out.spec, ops::DType::kF32, ops::Device::kCpu, out.config.seed()));
  RETURN_IF_ERROR(LoadParameters(state.tensors, out.checkpoint_dir, out.model.get()));
  return out;
}

}  // namespace gyre::eval
