// Env: every file operation Gyre performs (shards, index side files, checkpoints, the journal's
// side files, run directories) goes through this seam, so tests can run in memory and inject
// faults (see fault_injection_env.h). Modelled on leveldb's Env, cut down to what we use.
//
// Thread-safety: Env implementations are thread-safe. A WritableFile is used by one thread.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace gyre {

// A file being written sequentially. Bytes are durable only after Sync() returned OK; a crash
// may lose anything appended since (FaultInjectionEnv models exactly that).
class WritableFile {
 public:
  virtual ~WritableFile() = default;
  virtual absl::Status Append(std::string_view data) = 0;
  virtual absl::Status Sync() = 0;   // fsync / fdatasync
  virtual absl::Status Close() = 0;  // idempotent; does not sync
};

// A read-only view of a whole file's bytes (mmap on POSIX). Valid while the object lives.
class ReadOnlyRegion {
 public:
  virtual ~ReadOnlyRegion() = default;
  virtual std::string_view data() const = 0;
};

// A file read by byte ranges: a checkpoint restore streams each file through a few reused
// (pinned) buffers instead of holding it whole. Used by one thread at a time.
class RandomAccessFile {
 public:
  virtual ~RandomAccessFile() = default;
  // Reads up to `n` bytes at `offset` into `scratch`: exactly `n` unless the file ends first (0 at
  // or past its end).
  virtual absl::StatusOr<size_t> Read(uint64_t offset, size_t n, char* scratch) = 0;
};

class Env {
 public:
  virtual ~Env() = default;

  // The process-wide POSIX Env. Never null; not owned by the caller.
  static Env* Default();

  // Creates or truncates `path`.
  virtual absl::StatusOr<std::unique_ptr<WritableFile>> NewWritableFile(const std::string& path) = 0;
  // Reads the whole file. NotFound when it does not exist.
  virtual absl::StatusOr<std::string> ReadFile(const std::string& path) = 0;
  // Opens `path` for reads by range. NotFound when it does not exist.
  virtual absl::StatusOr<std::unique_ptr<RandomAccessFile>> NewRandomAccessFile(const std::string& path) = 0;
  // Maps the whole file read-only (shards). NotFound when it does not exist.
  virtual absl::StatusOr<std::unique_ptr<ReadOnlyRegion>> MapFile(const std::string& path) = 0;
  // Atomically replaces `to` (file or empty directory) with `from`. Durable only after
  // SyncDir(parent of `to`).
  virtual absl::Status Rename(const std::string& from, const std::string& to) = 0;
  // Makes creations, renames and deletions inside `dir` durable.
  virtual absl::Status SyncDir(const std::string& dir) = 0;
  // mkdir -p.
  virtual absl::Status CreateDirs(const std::string& dir) = 0;
  virtual absl::Status RemoveFile(const std::string& path) = 0;
  // rm -r; OK when the path does not exist.
  virtual absl::Status RemoveAll(const std::string& path) = 0;
  // Names (not paths) of the entries of `dir`, sorted.
  virtual absl::StatusOr<std::vector<std::string>> ListDir(const std::string& dir) = 0;
  virtual bool Exists(const std::string& path) = 0;
  virtual absl::StatusOr<uint64_t> FileSize(const std::string& path) = 0;
};

// Writes `data` to `path` durably and atomically: temp file, sync, rename, sync directory.
// Readers see either the old content or the new, never a torn file.
absl::Status WriteFileAtomically(Env* env, const std::string& path, std::string_view data);

// Joins path components with exactly one '/'.
std::string JoinPath(std::string_view a, std::string_view b);
// Everything before the last '/', or "." when there is none.
std::string DirName(std::string_view path);

}  // namespace gyre
