#include "worker/checkpoint.h"

#include <xxhash.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
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

// Every file listed once, every tensor's byte range inside a listed file (no overflow).
absl::Status CheckManifestLayout(const std::string& dir, const gyre::v1::CheckpointManifest& manifest) {
  std::map<std::string, uint64_t> file_bytes;
  for (const gyre::v1::FileEntry& f : manifest.files()) {
    if (!file_bytes.emplace(f.path(), f.bytes()).second) {
      return absl::DataLossError(absl::StrCat("checkpoint manifest ", JoinPath(dir, kManifest), " lists ", f.path(), " twice"));
    }
  }
  for (const gyre::v1::TensorEntry& e : manifest.tensors()) {
    auto it = file_bytes.find(e.file());
    if (it == file_bytes.end() || e.offset() > it->second || e.bytes() > it->second - e.offset()) {
      return absl::DataLossError(absl::StrCat("checkpoint ", dir, ": tensor ", e.name(), " points outside ", e.file()));
    }
  }
  return absl::OkStatus();
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

absl::StatusOr<gyre::v1::CheckpointManifest> ReadCheckpointManifest(Env* env, const std::string& dir) {
  const std::string manifest_path = JoinPath(dir, kManifest);
  absl::StatusOr<std::string> manifest_bytes = env->ReadFile(manifest_path);
  if (!manifest_bytes.ok()) {
    return absl::DataLossError(absl::StrCat("checkpoint manifest ", manifest_path, ": ", manifest_bytes.status().message()));
  }
  gyre::v1::CheckpointManifest manifest;
  if (!manifest.ParseFromString(*manifest_bytes)) {
    return absl::DataLossError(absl::StrCat("checkpoint manifest ", manifest_path, " does not parse"));
  }
  if (manifest.format_version() != kFormatVersion) {
    return absl::DataLossError(absl::StrCat("checkpoint manifest ", manifest_path, ": format version ",
                                            manifest.format_version(), ", expected ", kFormatVersion));
  }
  RETURN_IF_ERROR(CheckManifestLayout(dir, manifest));
  return manifest;
}

absl::StatusOr<CheckpointStreamOptions> StreamOptionsFromConfig(const gyre::v1::CheckpointConfig& config,
                                                                CheckpointStreamOptions base) {
  constexpr uint64_t kMiB = uint64_t{1} << 20;
  constexpr uint64_t kMaxChunkBytes = uint64_t{1} << 30;
  constexpr uint64_t kMaxBufferBytes = uint64_t{8} << 30;
  if (config.restore_reader_threads() != 0) {
    if (config.restore_reader_threads() > 64) {
      return absl::InvalidArgumentError(absl::StrCat("checkpoint.restore_reader_threads: ", config.restore_reader_threads(),
                                                     " is out of range 1..64 (0: the default, 4)"));
    }
    base.reader_threads = static_cast<int>(config.restore_reader_threads());
  }
  if (config.restore_chunk_bytes() != 0) {
    if (config.restore_chunk_bytes() < kMiB || config.restore_chunk_bytes() > kMaxChunkBytes) {
      return absl::InvalidArgumentError(absl::StrCat("checkpoint.restore_chunk_bytes: ", config.restore_chunk_bytes(),
                                                     " is out of range 1048576 (1 MiB)..1073741824 (1 GiB) (0: the "
                                                     "default, 32 MiB)"));
    }
    base.chunk_bytes = static_cast<size_t>(config.restore_chunk_bytes());
  }
  if (config.restore_buffers_per_reader() != 0) {
    if (config.restore_buffers_per_reader() > 16) {
      return absl::InvalidArgumentError(absl::StrCat("checkpoint.restore_buffers_per_reader: ",
                                                     config.restore_buffers_per_reader(),
                                                     " is out of range 1..16 (0: the default, 2)"));
    }
    base.buffers_per_reader = static_cast<int>(config.restore_buffers_per_reader());
  }
  const uint64_t buffer_bytes = static_cast<uint64_t>(std::max(base.reader_threads, 1)) *
                                static_cast<uint64_t>(std::max(base.buffers_per_reader, 1)) * base.chunk_bytes;
  if (buffer_bytes > kMaxBufferBytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "checkpoint.restore_reader_threads x checkpoint.restore_buffers_per_reader x checkpoint.restore_chunk_bytes: ",
        base.reader_threads, " x ", base.buffers_per_reader, " x ", base.chunk_bytes, " = ", buffer_bytes,
        " bytes of read buffers, more than the 8 GiB allowed"));
  }
  return base;
}

namespace {

// The pipeline between StreamCheckpoint's reader threads and its calling thread.
class ChunkPipeline {
 public:
  struct Chunk {
    int file = 0;          // index in manifest.files()
    uint64_t offset = 0;   // in the file
    size_t size = 0;
    int buffer = 0;
  };

  ChunkPipeline(int readers, int buffers_per_reader) : free_(readers) {
    for (int r = 0; r < readers; ++r) {
      for (int b = 0; b < buffers_per_reader; ++b) free_[r].push_back(r * buffers_per_reader + b);
    }
    active_readers_ = readers;
  }

  // Reader `reader`: one of its free buffers, or nullopt once the stream failed.
  std::optional<int> TakeFree(int reader) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return !error_.ok() || !free_[reader].empty(); });
    if (!error_.ok()) return std::nullopt;
    const int b = free_[reader].front();
    free_[reader].pop_front();
    return b;
  }
  void Push(const Chunk& c) {
    std::lock_guard<std::mutex> lock(mu_);
    ready_.push_back(c);
    cv_.notify_all();
  }
  void Release(int reader, int buffer) {
    std::lock_guard<std::mutex> lock(mu_);
    free_[reader].push_back(buffer);
    cv_.notify_all();
  }
  void ReaderDone() {
    std::lock_guard<std::mutex> lock(mu_);
    --active_readers_;
    cv_.notify_all();
  }
  // The first error wins; every waiter wakes up and stops.
  void Fail(absl::Status s) {
    std::lock_guard<std::mutex> lock(mu_);
    if (error_.ok()) error_ = std::move(s);
    cv_.notify_all();
  }
  bool failed() {
    std::lock_guard<std::mutex> lock(mu_);
    return !error_.ok();
  }
  absl::Status error() {
    std::lock_guard<std::mutex> lock(mu_);
    return error_;
  }
  // The next chunk, or nullopt when the stream failed or every reader is done.
  std::optional<Chunk> Next() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return !error_.ok() || !ready_.empty() || active_readers_ == 0; });
    if (!error_.ok() || ready_.empty()) return std::nullopt;
    Chunk c = ready_.front();
    ready_.pop_front();
    return c;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::deque<int>> free_;
  std::deque<Chunk> ready_;
  int active_readers_ = 0;
  absl::Status error_;
};

}  // namespace

absl::StatusOr<CheckpointStreamStats> StreamCheckpoint(Env* env, Clock* clock, const std::string& dir,
                                                       const gyre::v1::CheckpointManifest& manifest,
                                                       const CheckpointStreamOptions& options,
                                                       const TensorChunkSink& sink) {
  const int num_files = manifest.files_size();
  // Everything that can be checked without reading a tensor byte is checked before the sink sees
  // one: a torn checkpoint (a file missing, short or long) leaves the destination untouched.
  // The layout check repeats ReadCheckpointManifest's on purpose (a few map lookups a tensor):
  // this function takes any manifest, and what it promises (every tensor byte delivered exactly
  // once, the destination untouched on a bad manifest) rests on it. Without it, a tensor naming
  // an unlisted file would dereference file_index.end(), and one reaching past its file's end
  // would be delivered short while the call returned OK.
  RETURN_IF_ERROR(CheckManifestLayout(dir, manifest));
  std::map<std::string, int> file_index;
  for (int f = 0; f < num_files; ++f) {
    const gyre::v1::FileEntry& entry = manifest.files(f);
    const std::string path = JoinPath(dir, entry.path());
    absl::StatusOr<uint64_t> size = env->FileSize(path);
    if (!size.ok()) return absl::DataLossError(absl::StrCat("checkpoint file ", path, ": ", size.status().message()));
    if (*size != entry.bytes()) {
      return absl::DataLossError(absl::StrCat("checkpoint file ", path, " has ", *size, " bytes, manifest says ", entry.bytes()));
    }
    file_index[entry.path()] = f;
  }
  // Each file's tensors (manifest index, offset, bytes).
  struct Slot {
    int tensor;
    uint64_t offset;
    uint64_t bytes;
  };
  std::vector<std::vector<Slot>> slots(num_files);
  for (int t = 0; t < manifest.tensors_size(); ++t) {
    const gyre::v1::TensorEntry& e = manifest.tensors(t);
    if (e.bytes() > 0) slots[file_index.find(e.file())->second].push_back({t, e.offset(), e.bytes()});  // listed: checked above
  }

  const size_t chunk = std::max<size_t>(options.chunk_bytes, 1);
  const int readers = std::max(1, std::min(options.reader_threads, num_files));
  const int per_reader = std::max(1, options.buffers_per_reader);
  std::vector<std::shared_ptr<void>> buffers;
  for (int b = 0; b < readers * per_reader; ++b) {
    std::shared_ptr<void> p;
    if (options.allocate) {
      p = options.allocate(chunk);
    } else if (void* raw = std::malloc(chunk); raw != nullptr) {
      p = std::shared_ptr<void>(raw, std::free);
    }
    if (p == nullptr) {
      return absl::ResourceExhaustedError(absl::StrCat("checkpoint restore: cannot allocate a ", chunk, "-byte read buffer"));
    }
    buffers.push_back(std::move(p));
  }
  auto buffer_data = [&](int b) { return static_cast<char*>(buffers[b].get()); };

  CheckpointStreamStats stats;
  stats.reader_threads = readers;
  stats.buffers = static_cast<int>(buffers.size());
  stats.chunk_bytes = chunk;
  const int64_t start = clock->NowMicros();
  ChunkPipeline pipeline(readers, per_reader);
  std::atomic<int> next_file{0};
  std::mutex stats_mu;
  auto read_files = [&](int reader) {
    int64_t read_us = 0, verify_us = 0;
    uint64_t bytes_read = 0;
    XXH64_state_t* hash = XXH64_createState();
    for (int f = next_file++; f < num_files && !pipeline.failed(); f = next_file++) {
      const gyre::v1::FileEntry& entry = manifest.files(f);
      const std::string path = JoinPath(dir, entry.path());
      absl::StatusOr<std::unique_ptr<RandomAccessFile>> file = env->NewRandomAccessFile(path);
      if (!file.ok()) {
        pipeline.Fail(absl::DataLossError(absl::StrCat("checkpoint file ", path, ": ", file.status().message())));
        break;
      }
      XXH64_reset(hash, 0);
      for (uint64_t offset = 0; offset < entry.bytes();) {
        const std::optional<int> b = pipeline.TakeFree(reader);
        if (!b.has_value()) break;
        const size_t want = static_cast<size_t>(std::min<uint64_t>(chunk, entry.bytes() - offset));
        const int64_t t0 = clock->NowMicros();
        absl::StatusOr<size_t> got = (*file)->Read(offset, want, buffer_data(*b));
        const int64_t t1 = clock->NowMicros();
        read_us += t1 - t0;
        if (!got.ok()) {
          pipeline.Fail(absl::DataLossError(absl::StrCat("checkpoint file ", path, ": ", got.status().message())));
          break;
        }
        if (*got != want) {
          pipeline.Fail(absl::DataLossError(absl::StrCat("checkpoint file ", path, " ends at byte ", offset + *got,
                                                         ", manifest says ", entry.bytes())));
          break;
        }
        bytes_read += want;
        XXH64_update(hash, buffer_data(*b), want);
        const bool last = offset + want == entry.bytes();
        if (last && XXH64_digest(hash) != entry.xxh64()) {
          pipeline.Fail(absl::DataLossError(absl::StrCat("checkpoint file ", path, " fails its checksum")));
        }
        verify_us += clock->NowMicros() - t1;
        if (pipeline.failed()) break;
        pipeline.Push({f, offset, want, *b});
        offset += want;
      }
    }
    XXH64_freeState(hash);
    {
      std::lock_guard<std::mutex> lock(stats_mu);
      stats.read_s += read_us / 1e6;
      stats.verify_s += verify_us / 1e6;
      stats.bytes += bytes_read;
    }
    pipeline.ReaderDone();
  };
  std::vector<std::thread> threads;
  for (int r = 0; r < readers; ++r) threads.emplace_back(read_files, r);

  int64_t sink_us = 0, wait_us = 0;
  while (true) {
    const int64_t w0 = clock->NowMicros();
    std::optional<ChunkPipeline::Chunk> c = pipeline.Next();
    const int64_t w1 = clock->NowMicros();
    wait_us += w1 - w0;
    if (!c.has_value()) break;
    const char* data = buffer_data(c->buffer);
    absl::Status delivered;
    for (const Slot& s : slots[c->file]) {
      // The overlap of the tensor's range [s.offset, s.offset + s.bytes) with the chunk's.
      const uint64_t begin = std::max(s.offset, c->offset);
      const uint64_t end = std::min(s.offset + s.bytes, c->offset + c->size);
      if (begin >= end) continue;
      delivered = sink(s.tensor, begin - s.offset, std::string_view(data + (begin - c->offset), end - begin));
      if (!delivered.ok()) break;
    }
    sink_us += clock->NowMicros() - w1;
    pipeline.Release(c->buffer / per_reader, c->buffer);
    if (!delivered.ok()) {
      pipeline.Fail(delivered);
      break;
    }
  }
  for (std::thread& t : threads) t.join();
  RETURN_IF_ERROR(pipeline.error());
  stats.wall_s = (clock->NowMicros() - start) / 1e6;
  stats.sink_s = sink_us / 1e6;
  stats.sink_wait_s = wait_us / 1e6;
  return stats;
}

absl::StatusOr<CheckpointState> ReadCheckpoint(Env* env, const std::string& dir) {
  ASSIGN_OR_RETURN(gyre::v1::CheckpointManifest manifest, ReadCheckpointManifest(env, dir));
  // Every tensor's bytes land in one buffer (TensorSnapshot::staging keeps it alive; no zero-fill,
  // no string growth), streamed and verified like a worker's restore. Nothing is returned unless
  // every file passed its checksum.
  std::vector<uint64_t> at(manifest.tensors_size());
  uint64_t total = 0;
  for (int t = 0; t < manifest.tensors_size(); ++t) {
    at[t] = total;
    total += manifest.tensors(t).bytes();
  }
  void* raw = std::malloc(total == 0 ? 1 : total);
  if (raw == nullptr) {
    return absl::ResourceExhaustedError(absl::StrCat("checkpoint ", dir, ": cannot allocate ", total, " bytes of host memory"));
  }
  const std::shared_ptr<char> buffer(static_cast<char*>(raw), std::free);
  RETURN_IF_ERROR(StreamCheckpoint(env, Clock::Real(), dir, manifest, CheckpointStreamOptions(),
                                   [&](int t, uint64_t offset, std::string_view bytes) {
                                     std::memcpy(buffer.get() + at[t] + offset, bytes.data(), bytes.size());
                                     return absl::OkStatus();
                                   })
                      .status());
  CheckpointState state;
  state.step = manifest.step();
  state.generation = manifest.generation();
  state.config = manifest.config();
  state.rng_state = manifest.rng_state();
  for (int i = 0; i < manifest.tensors_size(); ++i) {
    const gyre::v1::TensorEntry& e = manifest.tensors(i);
    TensorSnapshot t;
    t.name = e.name();
    t.dtype = e.dtype();
    t.shape.assign(e.shape().begin(), e.shape().end());
    t.staging = buffer;
    t.staged = buffer.get() + at[i];
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
