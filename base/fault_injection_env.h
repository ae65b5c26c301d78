// FaultInjectionEnv wraps another Env (usually NewMemEnv(), or Env::Default() on a temp dir) and
// models what a machine crash and a failing disk do to it:
//  - SimulateCrash(): bytes appended since a file's last Sync() are lost; files created and
//    renames made since the last SyncDir() of their directory are undone.
//  - FailNthMutation(n): the n-th mutating call from now (write, sync, rename, mkdir, remove)
//    returns an error, as does every later one when `sticky` (a dead disk).
//  - FlipByte(): silent corruption of a stored byte (what checksums must catch).
//  - FailNthRead(n): the n-th read from now (ReadFile, or one RandomAccessFile::Read) returns an
//    error (a bad sector: restores must fail cleanly, naming the file).
// Thread-safe.
#pragma once

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "base/env.h"

namespace gyre {

class FaultInjectionEnv final : public Env {
 public:
  explicit FaultInjectionEnv(Env* target) : target_(target) {}

  absl::StatusOr<std::unique_ptr<WritableFile>> NewWritableFile(const std::string& path) override;
  absl::StatusOr<std::string> ReadFile(const std::string& path) override;
  absl::StatusOr<std::unique_ptr<RandomAccessFile>> NewRandomAccessFile(const std::string& path) override;
  absl::StatusOr<std::unique_ptr<ReadOnlyRegion>> MapFile(const std::string& path) override {
    return target_->MapFile(path);
  }
  absl::Status Rename(const std::string& from, const std::string& to) override;
  absl::Status SyncDir(const std::string& dir) override;
  absl::Status CreateDirs(const std::string& dir) override;
  absl::Status RemoveFile(const std::string& path) override;
  absl::Status RemoveAll(const std::string& path) override;
  absl::StatusOr<std::vector<std::string>> ListDir(const std::string& dir) override {
    return target_->ListDir(dir);
  }
  bool Exists(const std::string& path) override { return target_->Exists(path); }
  absl::StatusOr<uint64_t> FileSize(const std::string& path) override { return target_->FileSize(path); }

  // The n-th (1-based) mutating call from now fails with an IO-style error; with `sticky`, every
  // call after it too. n = 0 disarms.
  void FailNthMutation(int n, bool sticky = false);
  // Number of mutating calls seen so far (to pick n for a sweep over every crash point).
  int mutation_count() const;

  // The n-th (1-based) read from now fails with an IO-style error; n = 0 disarms.
  void FailNthRead(int n);
  // Number of reads seen so far.
  int read_count() const;

  // Drops everything that was not made durable (see the header comment).
  absl::Status SimulateCrash();

  // XORs the byte at `offset` of `path` with `mask`.
  absl::Status FlipByte(const std::string& path, uint64_t offset, uint8_t mask = 0x01);

  // Called by FaultWritableFile.
  absl::Status CheckMutation(const std::string& what);
  void RecordSynced(const std::string& path, uint64_t size);
  // Called by every read (FaultRandomAccessFile too).
  absl::Status CheckRead(const std::string& what);

 private:
  struct PendingRename {
    std::string from;
    std::string to;
    std::optional<std::string> replaced;  // previous content of `to`, if it was a file
  };

  Env* const target_;
  mutable absl::Mutex mu_;
  int mutations_ ABSL_GUARDED_BY(mu_) = 0;
  int fail_at_ ABSL_GUARDED_BY(mu_) = 0;
  bool sticky_ ABSL_GUARDED_BY(mu_) = false;
  bool failing_ ABSL_GUARDED_BY(mu_) = false;
  int reads_ ABSL_GUARDED_BY(mu_) = 0;
  int fail_read_at_ ABSL_GUARDED_BY(mu_) = 0;
  // Durable size of every file written through this Env.
  std::map<std::string, uint64_t> synced_size_ ABSL_GUARDED_BY(mu_);
  // Files created since the last SyncDir of their directory.
  std::map<std::string, bool> created_unsynced_ ABSL_GUARDED_BY(mu_);
  std::vector<PendingRename> pending_renames_ ABSL_GUARDED_BY(mu_);
};

}  // namespace gyre
