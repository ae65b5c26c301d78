#include "worker/checkpoint.h"

#include <xxhash.h>

#include <algorithm>
#include <cstdio>
#include <memory>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "base/status_macros.h"

namespace gyre {
namespace {

constexpr uint32_t kFormatVersion = 1;
constexpr char kManifest[] = "MANIFEST";
constexpr char kPrefix[] = "step-";

uint64_t Xxh64(std::string_view bytes) { return XXH64(bytes.data(), bytes.size(), 0); }

absl::Status WriteSynced(Env* env, const std::string& path, std::string_view data) {
  ASSIGN_OR_RETURN(std::unique_ptr<WritableFile> file, env->NewWritableFile(path));
  RETURN_IF_ERROR(file->Append(data));
  RETURN_IF_ERROR(file->Sync());
  return file->Close();
}

std::optional<uint64_t> ParseStepDir(const std::string& name) {
  if (!absl::StartsWith(name, kPrefix) || absl::EndsWith(name, ".tmp")) return std::nullopt;
  uint64_t step = 0;
  std::string digits = name.substr(sizeof(kPrefix) - 1);
  if (digits.empty()) return std::nullopt;
  for (char c : digits) {
    if (c < '0' || c > '9') return std::nullopt;
    step = step * 10 + (c - '0');
  }
  return step;
}

}  // namespace

std::string CheckpointDirName(uint64_t step) {
  return absl::StrCat(kPrefix, step);
}

absl::StatusOr<std::string> WriteCheckpoint(Env* env, const std::string& checkpoints_dir, const CheckpointState& state,
                                            uint64_t max_file_bytes) {
  return WriteCheckpointTo(env, JoinPath(checkpoints_dir, CheckpointDirName(state.step)), state, max_file_bytes);
}

absl::StatusOr<std::string> WriteCheckpointTo(Env* env, const std::string& final_dir, const CheckpointState& state,
                                              uint64_t max_file_bytes) {
  const std::string checkpoints_dir = DirName(final_dir);
  const std::string tmp_dir = final_dir + ".tmp";
  RETURN_IF_ERROR(env->CreateDirs(checkpoints_dir));
  RETURN_IF_ERROR(env->RemoveAll(tmp_dir));  // leftover of an earlier crash
  RETURN_IF_ERROR(env->CreateDirs(tmp_dir));

  gyre::v1::CheckpointManifest manifest;
  manifest.set_format_version(kFormatVersion);
  manifest.set_step(state.step);
  manifest.set_generation(state.generation);
  *manifest.mutable_config() = state.config;
  manifest.set_rng_state(state.rng_state);

  // Pack tensors into files of at most max_file_bytes (a larger tensor gets a file of its own).
  std::string buffer;
  int file_index = 0;
  auto flush = [&]() -> absl::Status {
    if (buffer.empty()) return absl::OkStatus();
    const std::string name = absl::StrCat("state-", file_index++, ".bin");
    RETURN_IF_ERROR(WriteSynced(env, JoinPath(tmp_dir, name), buffer));
    gyre::v1::FileEntry* f = manifest.add_files();
    f->set_path(name);
    f->set_bytes(buffer.size());
    f->set_xxh64(Xxh64(buffer));
    buffer.clear();
    return absl::OkStatus();
  };
  for (const TensorSnapshot& t : state.tensors) {
    const std::string_view bytes = t.data();
    if (!buffer.empty() && buffer.size() + bytes.size() > max_file_bytes) RETURN_IF_ERROR(flush());
    gyre::v1::TensorEntry* e = manifest.add_tensors();
    e->set_name(t.name);
    e->set_dtype(t.dtype);
    for (uint64_t d : t.shape) e->add_shape(d);
    e->set_file(absl::StrCat("state-", file_index, ".bin"));
    e->set_offset(buffer.size());
    e->set_bytes(bytes.size());
    buffer.append(bytes);
  }
  RETURN_IF_ERROR(flush());

  std::string manifest_bytes;
  if (!manifest.SerializeToString(&manifest_bytes)) return absl::InternalError("checkpoint: manifest serialization failed");
  RETURN_IF_ERROR(WriteSynced(env, JoinPath(tmp_dir, kManifest), manifest_bytes));
  RETURN_IF_ERROR(env->SyncDir(tmp_dir));
  RETURN_IF_ERROR(env->RemoveAll(final_dir));  // a re-written step replaces the old one
  RETURN_IF_ERROR(env->Rename(tmp_dir, final_dir));
  RETURN_IF_ERROR(env->SyncDir(checkpoints_dir));
  return final_dir;
}

absl::StatusOr<CheckpointState> ReadCheckpoint(Env* env, const std::string& dir) {
  const std::string manifest_path = JoinPath(dir, kManifest);
  ASSIGN_OR_RETURN(std::string manifest_bytes, env->ReadFile(manifest_path));
  gyre::v1::CheckpointManifest manifest;
  if (!manifest.ParseFromString(manifest_bytes)) {
    return absl::DataLossError(absl::StrCat("checkpoint manifest ", manifest_path, " does not parse"));
  }
  if (manifest.format_version() != kFormatVersion) {
    return absl::DataLossError(absl::StrCat("checkpoint manifest ", manifest_path, ": format version ",
                                            manifest.format_version(), ", expected ", kFormatVersion));
  }
  // The tensors are views into the files' bytes (TensorSnapshot::staging keeps each file alive), not
  // copies: a 1.3B model's 16 GB checkpoint is held once while it is restored, not twice.
  std::map<std::string, std::shared_ptr<const std::string>> files;
  for (const gyre::v1::FileEntry& f : manifest.files()) {
    const std::string path = JoinPath(dir, f.path());
    absl::StatusOr<std::string> bytes = env->ReadFile(path);
    if (!bytes.ok()) return absl::DataLossError(absl::StrCat("checkpoint file ", path, ": ", bytes.status().message()));
    if (bytes->size() != f.bytes()) {
      return absl::DataLossError(absl::StrCat("checkpoint file ", path, " has ", bytes->size(), " bytes, manifest says ", f.bytes()));
    }
    if (Xxh64(*bytes) != f.xxh64()) return absl::DataLossError(absl::StrCat("checkpoint file ", path, " fails its checksum"));
    files[f.path()] = std::make_shared<const std::string>(std::move(*bytes));
  }
  CheckpointState state;
  state.step = manifest.step();
  state.generation = manifest.generation();
  state.config = manifest.config();
  state.rng_state = manifest.rng_state();
  for (const gyre::v1::TensorEntry& e : manifest.tensors()) {
    auto it = files.find(e.file());
    if (it == files.end() || e.offset() + e.bytes() > it->second->size()) {
      return absl::DataLossError(absl::StrCat("checkpoint ", dir, ": tensor ", e.name(), " points outside ", e.file()));
    }
    TensorSnapshot t;
    t.name = e.name();
    t.dtype = e.dtype();
    t.shape.assign(e.shape().begin(), e.shape().end());
    t.staging = it->second;
    t.staged = it->second->data() + e.offset();
    t.staged_size = e.bytes();
    state.tensors.push_back(std::move(t));
  }
  return state;
}

absl::StatusOr<LatestCheckpoint> LoadLatestCheckpoint(Env* env, const std::string& checkpoints_dir) {
  if (!env->Exists(checkpoints_dir)) return absl::NotFoundError(absl::StrCat("no checkpoints in ", checkpoints_dir));
  ASSIGN_OR_RETURN(std::vector<std::string> names, env->ListDir(checkpoints_dir));
  std::vector<std::pair<uint64_t, std::string>> steps;
  for (const std::string& n : names) {
    if (auto step = ParseStepDir(n)) steps.emplace_back(*step, n);
  }
  std::sort(steps.rbegin(), steps.rend());
  LatestCheckpoint latest;
  for (const auto& [step, name] : steps) {
    const std::string dir = JoinPath(checkpoints_dir, name);
    absl::StatusOr<CheckpointState> state = ReadCheckpoint(env, dir);
    if (state.ok()) {
      latest.dir = dir;
      latest.state = std::move(*state);
      return latest;
    }
    latest.skipped.push_back(absl::StrCat(name, ": ", state.status().message()));
  }
  std::string why = latest.skipped.empty() ? "none written" : absl::StrCat("all invalid: ", latest.skipped.front());
  return absl::NotFoundError(absl::StrCat("no valid checkpoint in ", checkpoints_dir, " (", why, ")"));
}

absl::Status PruneCheckpoints(Env* env, const std::string& checkpoints_dir, uint32_t keep_last) {
  if (!env->Exists(checkpoints_dir)) return absl::OkStatus();
  ASSIGN_OR_RETURN(std::vector<std::string> names, env->ListDir(checkpoints_dir));
  std::vector<std::pair<uint64_t, std::string>> steps;
  for (const std::string& n : names) {
    if (auto step = ParseStepDir(n)) steps.emplace_back(*step, n);
    if (absl::StartsWith(n, kPrefix) && absl::EndsWith(n, ".tmp")) RETURN_IF_ERROR(env->RemoveAll(JoinPath(checkpoints_dir, n)));
  }
  std::sort(steps.rbegin(), steps.rend());
  for (size_t i = std::max<uint32_t>(keep_last, 1); i < steps.size(); ++i) {
    RETURN_IF_ERROR(env->RemoveAll(JoinPath(checkpoints_dir, steps[i].second)));
  }
  return env->SyncDir(checkpoints_dir);
}

CheckpointWriter::CheckpointWriter(Env* env, std::string checkpoints_dir, uint32_t keep_last, Done on_done)
    : env_(env), dir_(std::move(checkpoints_dir)), keep_last_(keep_last), on_done_(std::move(on_done)) {
  thread_ = std::thread([this] { Run(); });
}

CheckpointWriter::~CheckpointWriter() {
  {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return !pending_.has_value() && !busy_; });
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

void CheckpointWriter::Submit(CheckpointState state, std::string final_dir) {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [&] { return !pending_.has_value() && !busy_; });
  pending_ = std::move(state);
  pending_dir_ = std::move(final_dir);
  cv_.notify_all();
}

void CheckpointWriter::Flush() {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [&] { return !pending_.has_value() && !busy_; });
}

void CheckpointWriter::Run() {
  while (true) {
    CheckpointState state;
    std::string final_dir;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stop_ || pending_.has_value(); });
      if (!pending_.has_value()) return;  // stop requested and nothing left
      state = std::move(*pending_);
      final_dir = pending_dir_.empty() ? JoinPath(dir_, CheckpointDirName(state.step)) : pending_dir_;
      pending_.reset();
      busy_ = true;
    }
    absl::StatusOr<std::string> dir = WriteCheckpointTo(env_, final_dir, state);
    if (dir.ok()) {
      // The new checkpoint is durable: failing to delete older ones must not hide it (unreported,
      // no restore would ever use it). The failure is logged; the next checkpoint prunes again.
      if (absl::Status pruned = PruneCheckpoints(env_, dir_, keep_last_); !pruned.ok()) {
        std::fprintf(stderr, "checkpoint: step %llu written; removing older checkpoints failed: %s\n",
                     (unsigned long long)state.step, std::string(pruned.message()).c_str());
      }
    }
    if (on_done_) on_done_(state.step, std::move(dir));
    state = CheckpointState();  // drop the snapshot (and its staging buffer) before Flush() returns
    {
      std::lock_guard<std::mutex> lock(mu_);
      busy_ = false;
    }
    cv_.notify_all();
  }
}

}  // namespace gyre
