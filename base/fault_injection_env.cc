#include "base/fault_injection_env.h"

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"

namespace gyre {
namespace {

class FaultWritableFile final : public WritableFile {
 public:
  FaultWritableFile(FaultInjectionEnv* env, std::string path, std::unique_ptr<WritableFile> file)
      : env_(env), path_(std::move(path)), file_(std::move(file)) {}

  absl::Status Append(std::string_view data) override {
    RETURN_IF_ERROR(env_->CheckMutation(absl::StrCat("write ", path_)));
    RETURN_IF_ERROR(file_->Append(data));
    size_ += data.size();
    return absl::OkStatus();
  }
  absl::Status Sync() override {
    RETURN_IF_ERROR(env_->CheckMutation(absl::StrCat("fsync ", path_)));
    RETURN_IF_ERROR(file_->Sync());
    env_->RecordSynced(path_, size_);
    return absl::OkStatus();
  }
  absl::Status Close() override { return file_->Close(); }

 private:
  FaultInjectionEnv* env_;
  std::string path_;
  std::unique_ptr<WritableFile> file_;
  uint64_t size_ = 0;
};

class FaultRandomAccessFile final : public RandomAccessFile {
 public:
  FaultRandomAccessFile(FaultInjectionEnv* env, std::string path, std::unique_ptr<RandomAccessFile> file)
      : env_(env), path_(std::move(path)), file_(std::move(file)) {}

  absl::StatusOr<size_t> Read(uint64_t offset, size_t n, char* scratch) override {
    RETURN_IF_ERROR(env_->CheckRead(absl::StrCat("read ", path_, " at ", offset)));
    return file_->Read(offset, n, scratch);
  }

 private:
  FaultInjectionEnv* env_;
  std::string path_;
  std::unique_ptr<RandomAccessFile> file_;
};

}  // namespace

absl::Status FaultInjectionEnv::CheckRead(const std::string& what) {
  absl::MutexLock lock(&mu_);
  ++reads_;
  if (fail_read_at_ > 0 && reads_ == fail_read_at_) {
    fail_read_at_ = 0;
    return absl::UnavailableError(absl::StrCat(what, ": injected I/O error"));
  }
  return absl::OkStatus();
}

void FaultInjectionEnv::FailNthRead(int n) {
  absl::MutexLock lock(&mu_);
  fail_read_at_ = n > 0 ? reads_ + n : 0;
}

int FaultInjectionEnv::read_count() const {
  absl::MutexLock lock(&mu_);
  return reads_;
}

absl::StatusOr<std::string> FaultInjectionEnv::ReadFile(const std::string& path) {
  RETURN_IF_ERROR(CheckRead(absl::StrCat("read ", path)));
  return target_->ReadFile(path);
}

absl::StatusOr<std::unique_ptr<RandomAccessFile>> FaultInjectionEnv::NewRandomAccessFile(const std::string& path) {
  ASSIGN_OR_RETURN(std::unique_ptr<RandomAccessFile> file, target_->NewRandomAccessFile(path));
  return std::unique_ptr<RandomAccessFile>(std::make_unique<FaultRandomAccessFile>(this, path, std::move(file)));
}

absl::Status FaultInjectionEnv::CheckMutation(const std::string& what) {
  absl::MutexLock lock(&mu_);
  ++mutations_;
  if (failing_ || (fail_at_ > 0 && mutations_ == fail_at_)) {
    failing_ = sticky_;
    return absl::UnavailableError(absl::StrCat(what, ": injected I/O error"));
  }
  return absl::OkStatus();
}

void FaultInjectionEnv::RecordSynced(const std::string& path, uint64_t size) {
  absl::MutexLock lock(&mu_);
  synced_size_[path] = size;
}

void FaultInjectionEnv::FailNthMutation(int n, bool sticky) {
  absl::MutexLock lock(&mu_);
  fail_at_ = n > 0 ? mutations_ + n : 0;
  sticky_ = sticky;
  failing_ = false;
}

int FaultInjectionEnv::mutation_count() const {
  absl::MutexLock lock(&mu_);
  return mutations_;
}

absl::StatusOr<std::unique_ptr<WritableFile>> FaultInjectionEnv::NewWritableFile(const std::string& path) {
  RETURN_IF_ERROR(CheckMutation(absl::StrCat("create ", path)));
  bool existed = target_->Exists(path);
  ASSIGN_OR_RETURN(std::unique_ptr<WritableFile> file, target_->NewWritableFile(path));
  {
    absl::MutexLock lock(&mu_);
    synced_size_[path] = 0;  // truncated: nothing durable until the next Sync
    if (!existed) created_unsynced_[path] = true;
  }
  return std::unique_ptr<WritableFile>(std::make_unique<FaultWritableFile>(this, path, std::move(file)));
}

absl::Status FaultInjectionEnv::Rename(const std::string& from, const std::string& to) {
  RETURN_IF_ERROR(CheckMutation(absl::StrCat("rename ", from, " -> ", to)));
  std::optional<std::string> replaced;
  if (auto old = target_->ReadFile(to); old.ok()) replaced = std::move(*old);
  RETURN_IF_ERROR(target_->Rename(from, to));
  absl::MutexLock lock(&mu_);
  pending_renames_.push_back({from, to, std::move(replaced)});
  if (auto it = synced_size_.find(from); it != synced_size_.end()) {
    synced_size_[to] = it->second;
    synced_size_.erase(it);
  }
  return absl::OkStatus();
}

absl::Status FaultInjectionEnv::SyncDir(const std::string& dir) {
  RETURN_IF_ERROR(CheckMutation(absl::StrCat("fsync dir ", dir)));
  RETURN_IF_ERROR(target_->SyncDir(dir));
  absl::MutexLock lock(&mu_);
  std::erase_if(created_unsynced_, [&](const auto& kv) { return DirName(kv.first) == dir; });
  std::erase_if(pending_renames_, [&](const PendingRename& r) { return DirName(r.to) == dir; });
  return absl::OkStatus();
}

absl::Status FaultInjectionEnv::CreateDirs(const std::string& dir) {
  RETURN_IF_ERROR(CheckMutation(absl::StrCat("mkdir ", dir)));
  return target_->CreateDirs(dir);
}

absl::Status FaultInjectionEnv::RemoveFile(const std::string& path) {
  RETURN_IF_ERROR(CheckMutation(absl::StrCat("unlink ", path)));
  RETURN_IF_ERROR(target_->RemoveFile(path));
  absl::MutexLock lock(&mu_);
  synced_size_.erase(path);
  created_unsynced_.erase(path);
  return absl::OkStatus();
}

absl::Status FaultInjectionEnv::RemoveAll(const std::string& path) {
  RETURN_IF_ERROR(CheckMutation(absl::StrCat("rm -r ", path)));
  return target_->RemoveAll(path);
}

absl::Status FaultInjectionEnv::SimulateCrash() {
  absl::MutexLock lock(&mu_);
  // Undo renames whose directory entry was never made durable, newest first.
  for (auto it = pending_renames_.rbegin(); it != pending_renames_.rend(); ++it) {
    if (target_->Exists(it->to)) {
      RETURN_IF_ERROR(target_->Rename(it->to, it->from));
      if (auto s = synced_size_.find(it->to); s != synced_size_.end()) {
        synced_size_[it->from] = s->second;
        synced_size_.erase(s);
      }
    }
    if (it->replaced.has_value()) {
      ASSIGN_OR_RETURN(auto file, target_->NewWritableFile(it->to));
      RETURN_IF_ERROR(file->Append(*it->replaced));
      RETURN_IF_ERROR(file->Close());
    }
  }
  pending_renames_.clear();
  // Files whose creation was never made durable disappear.
  for (const auto& [path, unused] : created_unsynced_) {
    if (target_->Exists(path)) RETURN_IF_ERROR(target_->RemoveFile(path));
    synced_size_.erase(path);
  }
  created_unsynced_.clear();
  // Everything else is cut back to its last synced length.
  for (const auto& [path, size] : synced_size_) {
    auto content = target_->ReadFile(path);
    if (!content.ok()) continue;  // removed through another path
    if (content->size() <= size) continue;
    content->resize(size);
    ASSIGN_OR_RETURN(auto file, target_->NewWritableFile(path));
    RETURN_IF_ERROR(file->Append(*content));
    RETURN_IF_ERROR(file->Close());
  }
  failing_ = false;
  fail_at_ = 0;
  return absl::OkStatus();
}

absl::Status FaultInjectionEnv::FlipByte(const std::string& path, uint64_t offset, uint8_t mask) {
  ASSIGN_OR_RETURN(std::string content, target_->ReadFile(path));
  if (offset >= content.size()) {
    return absl::OutOfRangeError(absl::StrCat("flip byte ", offset, " of ", path, " (", content.size(), " bytes)"));
  }
  content[offset] = static_cast<char>(content[offset] ^ mask);
  ASSIGN_OR_RETURN(auto file, target_->NewWritableFile(path));
  RETURN_IF_ERROR(file->Append(content));
  return file->Close();
}

}  // namespace gyre
