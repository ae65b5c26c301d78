#include "eval/checkpoint_model.h"

#include <algorithm>
#include <cstring>
#include <map>
#include <set>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/clock.h"
#include "base/status_macros.h"
#include "cli/run_config.h"
#include "google/protobuf/util/message_differencer.h"

namespace gyre::eval {
namespace {

constexpr char kParamPrefix[] = "param.";

std::vector<uint64_t> ShapeOf(const ops::Tensor& t) {
  std::vector<uint64_t> shape;
  for (int64_t d : t.shape()) shape.push_back(static_cast<uint64_t>(d));
  return shape;
}

absl::Status MissingParameter(const std::string& where, const ops::Parameter& p) {
  return absl::DataLossError(absl::StrCat(where, " has no tensor ", kParamPrefix, p.name, " (the model config expects it)"));
}

// A checkpoint tensor `name` meant for parameter `p`: its shape, dtype and size must be the model's.
absl::Status CheckParameter(const std::string& where, const std::string& name, const std::vector<uint64_t>& shape,
                            gyre::v1::DType dtype, uint64_t bytes, const ops::Parameter& p) {
  const std::vector<uint64_t> want = ShapeOf(p.value);
  if (shape != want) {
    return absl::DataLossError(absl::StrCat(where, ": tensor ", name, " has shape [", absl::StrJoin(shape, ","),
                                            "], the model config expects [", absl::StrJoin(want, ","), "]"));
  }
  if (dtype != gyre::v1::DTYPE_F32 || bytes != p.value.nbytes()) {
    return absl::DataLossError(absl::StrCat(where, ": tensor ", name, " is not f32 of ", p.value.nbytes(), " bytes (dtype ",
                                            dtype, ", ", bytes, " bytes)"));
  }
  return absl::OkStatus();
}

// What LoadParameters streams: the manifest cut down to the files that hold a parameter (and
// their tensors), and where each of its tensors goes (null: not a parameter, skipped).
struct ParameterPlan {
  gyre::v1::CheckpointManifest manifest;
  std::vector<ops::Parameter*> destination;
};

absl::StatusOr<ParameterPlan> PlanParameters(const std::string& dir, const gyre::v1::CheckpointManifest& manifest,
                                             ops::LanguageModel* model) {
  std::map<std::string, int> by_name;
  for (int t = 0; t < manifest.tensors_size(); ++t) by_name[manifest.tensors(t).name()] = t;
  std::map<int, ops::Parameter*> parameter_of;  // manifest tensor -> parameter
  std::set<std::string> files;                  // the files holding a parameter
  for (ops::Parameter* p : model->params().All()) {
    if (p->value.device() != ops::Device::kCpu) {
      return absl::InvalidArgumentError(absl::StrCat("loading ", dir, ": parameter ", p->name, " is not on the CPU"));
    }
    auto it = by_name.find(kParamPrefix + p->name);
    if (it == by_name.end()) return MissingParameter(dir, *p);
    const gyre::v1::TensorEntry& e = manifest.tensors(it->second);
    RETURN_IF_ERROR(CheckParameter(dir, e.name(), std::vector<uint64_t>(e.shape().begin(), e.shape().end()), e.dtype(),
                                   e.bytes(), *p));
    parameter_of[it->second] = p;
    files.insert(e.file());
  }
  ParameterPlan plan;
  plan.manifest = manifest;
  plan.manifest.clear_files();
  plan.manifest.clear_tensors();
  for (const gyre::v1::FileEntry& f : manifest.files()) {
    if (files.count(f.path()) > 0) *plan.manifest.add_files() = f;
  }
  for (int t = 0; t < manifest.tensors_size(); ++t) {
    if (files.count(manifest.tensors(t).file()) == 0) continue;
    *plan.manifest.add_tensors() = manifest.tensors(t);
    auto p = parameter_of.find(t);
    plan.destination.push_back(p == parameter_of.end() ? nullptr : p->second);
  }
  return plan;
}

absl::StatusOr<CheckpointStreamStats> StreamPlanned(Env* env, const std::string& dir, const ParameterPlan& plan,
                                                    const CheckpointStreamOptions& options, ops::LanguageModel* model) {
  ASSIGN_OR_RETURN(CheckpointStreamStats stats,
                   StreamCheckpoint(env, Clock::Real(), dir, plan.manifest, options,
                                    [&](int tensor, uint64_t offset, std::string_view bytes) {
                                      ops::Parameter* p = plan.destination[tensor];
                                      if (p == nullptr) return absl::OkStatus();
                                      char* into = static_cast<char*>(p->value.raw()) + offset;
                                      std::memcpy(into, bytes.data(), bytes.size());
                                      return absl::OkStatus();
                                    }));
  model->params().SyncCompute();
  return stats;
}

}  // namespace

absl::StatusOr<CheckpointStreamStats> LoadParameters(Env* env, const std::string& dir,
                                                     const gyre::v1::CheckpointManifest& manifest,
                                                     ops::LanguageModel* model, const CheckpointStreamOptions& options) {
  ASSIGN_OR_RETURN(const ParameterPlan plan, PlanParameters(dir, manifest, model));
  return StreamPlanned(env, dir, plan, options, model);
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

  absl::StatusOr<CheckpointStreamOptions> stream_options = StreamOptionsFromConfig(out.config.checkpoint());
  if (!stream_options.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("config file ", config_path, ": ", stream_options.status().message()));
  }
  out.stream_options = *stream_options;

  // The named step, or every step newest first: a checkpoint whose manifest or parameter files
  // fail verification is passed over (and reported) for the previous one.
  const std::string checkpoints = options.run_dir + "/checkpoints";
  const bool named = options.step >= 0;
  std::vector<uint64_t> steps;
  if (named) {
    steps.push_back(static_cast<uint64_t>(options.step));
  } else if (env->Exists(checkpoints)) {
    ASSIGN_OR_RETURN(const std::vector<uint64_t> listed, ListCheckpointSteps(env, options.run_dir));
    steps.assign(listed.rbegin(), listed.rend());
  }
  for (uint64_t step : steps) {
    const std::string dir = checkpoints + "/" + CheckpointDirName(step);
    auto failed = [&](const absl::Status& s) {
      return absl::Status(s.code(), absl::StrCat("checkpoint of step ", step, " (", dir, "): ", s.message()));
    };
    absl::StatusOr<gyre::v1::CheckpointManifest> manifest = ReadCheckpointManifest(env, dir);
    if (!manifest.ok()) {
      if (named) return failed(manifest.status());
      out.skipped.push_back(absl::StrCat(CheckpointDirName(step), ": ", manifest.status().message()));
      continue;
    }
    if (manifest->config().has_model() &&
        !google::protobuf::util::MessageDifferencer::Equals(manifest->config().model(), out.config.model())) {
      return absl::FailedPreconditionError(absl::StrCat(
          "the model section of ", config_path, " differs from the one checkpoint ", dir, " was written with (",
          manifest->config().model().ShortDebugString(), " vs ", out.config.model().ShortDebugString(), ")"));
    }
    if (out.model == nullptr) {
      ASSIGN_OR_RETURN(out.model, ops::LanguageModel::Create(out.spec, ops::DType::kF32, ops::Device::kCpu, out.config.seed()));
    }
    // A missing or mismatched parameter is the model's problem, not a torn file: no fallback.
    ASSIGN_OR_RETURN(const ParameterPlan plan, PlanParameters(dir, *manifest, out.model.get()));
    absl::StatusOr<CheckpointStreamStats> streamed = StreamPlanned(env, dir, plan, *stream_options, out.model.get());
    if (!streamed.ok()) {
      // A file that failed part-way left a mix in the model; the next candidate overwrites every
      // parameter, and no model is returned without one that verified.
      if (named || !absl::IsDataLoss(streamed.status())) return failed(streamed.status());
      out.skipped.push_back(absl::StrCat(CheckpointDirName(step), ": ", streamed.status().message()));
      continue;
    }
    out.step = manifest->step();
    out.checkpoint_dir = dir;
    out.stream = *streamed;
    return out;
  }
  const std::string why = out.skipped.empty() ? "none written" : absl::StrCat("all invalid: ", out.skipped.front());
  return absl::NotFoundError(absl::StrCat("no valid checkpoint in ", checkpoints, " (", why, ")"));
}

}  // namespace gyre::eval
