#include "base/mem_env.h"

#include <algorithm>
#include <cstring>
#include <map>
#include <set>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"

namespace gyre {
namespace {

std::string Normalize(std::string_view path) {
  std::string p(path);
  while (p.size() > 1 && p.back() == '/') p.pop_back();
  return p;
}

class MemEnv;

class MemWritableFile final : public WritableFile {
 public:
  MemWritableFile(MemEnv* env, std::string path) : env_(env), path_(std::move(path)) {}
  absl::Status Append(std::string_view data) override;
  absl::Status Sync() override { return absl::OkStatus(); }
  absl::Status Close() override { return absl::OkStatus(); }

 private:
  MemEnv* env_;
  std::string path_;
};

class StringRegion final : public ReadOnlyRegion {
 public:
  explicit StringRegion(std::string bytes) : bytes_(std::move(bytes)) {}
  std::string_view data() const override { return bytes_; }

 private:
  std::string bytes_;
};

// Reads the file's bytes as they were when it was opened (an open POSIX file also survives its
// unlink or replacement by rename).
class StringRandomAccessFile final : public RandomAccessFile {
 public:
  explicit StringRandomAccessFile(std::string bytes) : bytes_(std::move(bytes)) {}
  absl::StatusOr<size_t> Read(uint64_t offset, size_t n, char* scratch) override {
    if (offset >= bytes_.size()) return size_t{0};
    const size_t count = std::min<uint64_t>(n, bytes_.size() - offset);
    std::memcpy(scratch, bytes_.data() + offset, count);
    return count;
  }

 private:
  std::string bytes_;
};

class MemEnv final : public Env {
 public:
  MemEnv() { dirs_.insert("/"); dirs_.insert("."); }

  absl::StatusOr<std::unique_ptr<WritableFile>> NewWritableFile(const std::string& path) override {
    std::string p = Normalize(path);
    absl::MutexLock lock(&mu_);
    if (!dirs_.count(DirName(p))) return absl::NotFoundError(absl::StrCat("open for write ", p, ": no such directory"));
    files_[p].clear();
    return std::make_unique<MemWritableFile>(this, p);
  }

  absl::Status AppendTo(const std::string& path, std::string_view data) {
    absl::MutexLock lock(&mu_);
    auto it = files_.find(path);
    if (it == files_.end()) return absl::NotFoundError(absl::StrCat("write ", path, ": file was removed"));
    it->second.append(data);
    return absl::OkStatus();
  }

  absl::StatusOr<std::string> ReadFile(const std::string& path) override {
    absl::MutexLock lock(&mu_);
    auto it = files_.find(Normalize(path));
    if (it == files_.end()) return absl::NotFoundError(absl::StrCat("open ", path, ": no such file"));
    return it->second;
  }

  absl::StatusOr<std::unique_ptr<RandomAccessFile>> NewRandomAccessFile(const std::string& path) override {
    auto bytes = ReadFile(path);
    if (!bytes.ok()) return bytes.status();
    return std::make_unique<StringRandomAccessFile>(std::move(*bytes));
  }

  absl::StatusOr<std::unique_ptr<ReadOnlyRegion>> MapFile(const std::string& path) override {
    auto bytes = ReadFile(path);
    if (!bytes.ok()) return bytes.status();
    return std::make_unique<StringRegion>(std::move(*bytes));
  }

  absl::Status Rename(const std::string& from, const std::string& to) override {
    std::string f = Normalize(from), t = Normalize(to);
    absl::MutexLock lock(&mu_);
    if (auto it = files_.find(f); it != files_.end()) {
      files_[t] = std::move(it->second);
      files_.erase(f);
      return absl::OkStatus();
    }
    if (dirs_.count(f)) {
      // Move the directory and everything under it.
      std::string prefix = f + "/";
      std::map<std::string, std::string> moved;
      for (auto it = files_.begin(); it != files_.end();) {
        if (absl::StartsWith(it->first, prefix)) {
          moved[t + "/" + it->first.substr(prefix.size())] = std::move(it->second);
          it = files_.erase(it);
        } else {
          ++it;
        }
      }
      std::set<std::string> moved_dirs;
      for (auto it = dirs_.begin(); it != dirs_.end();) {
        if (*it == f || absl::StartsWith(*it, prefix)) {
          moved_dirs.insert(t + it->substr(f.size()));
          it = dirs_.erase(it);
        } else {
          ++it;
        }
      }
      files_.merge(moved);
      dirs_.merge(moved_dirs);
      return absl::OkStatus();
    }
    return absl::NotFoundError(absl::StrCat("rename ", f, ": no such file or directory"));
  }

  absl::Status SyncDir(const std::string& dir) override {
    absl::MutexLock lock(&mu_);
    if (!dirs_.count(Normalize(dir))) return absl::NotFoundError(absl::StrCat("sync dir ", dir));
    return absl::OkStatus();
  }

  absl::Status CreateDirs(const std::string& dir) override {
    absl::MutexLock lock(&mu_);
    std::string p = Normalize(dir);
    while (!p.empty() && p != "/" && p != ".") {
      if (files_.count(p)) return absl::AlreadyExistsError(absl::StrCat("mkdir ", p, ": is a file"));
      dirs_.insert(p);
      p = DirName(p);
    }
    return absl::OkStatus();
  }

  absl::Status RemoveFile(const std::string& path) override {
    absl::MutexLock lock(&mu_);
    if (files_.erase(Normalize(path)) == 0) return absl::NotFoundError(absl::StrCat("unlink ", path));
    return absl::OkStatus();
  }

  absl::Status RemoveAll(const std::string& path) override {
    absl::MutexLock lock(&mu_);
    std::string p = Normalize(path), prefix = p + "/";
    files_.erase(p);
    dirs_.erase(p);
    std::erase_if(files_, [&](const auto& kv) { return absl::StartsWith(kv.first, prefix); });
    std::erase_if(dirs_, [&](const std::string& d) { return absl::StartsWith(d, prefix); });
    return absl::OkStatus();
  }

  absl::StatusOr<std::vector<std::string>> ListDir(const std::string& dir) override {
    absl::MutexLock lock(&mu_);
    std::string p = Normalize(dir);
    if (!dirs_.count(p)) return absl::NotFoundError(absl::StrCat("opendir ", dir));
    std::string prefix = p == "/" ? "/" : p + "/";
    std::set<std::string> names;
    auto add = [&](const std::string& path) {
      if (!absl::StartsWith(path, prefix) || path == p) return;
      std::string rest = path.substr(prefix.size());
      if (!rest.empty() && rest.find('/') == std::string::npos) names.insert(rest);
    };
    for (const auto& kv : files_) add(kv.first);
    for (const auto& d : dirs_) add(d);
    return std::vector<std::string>(names.begin(), names.end());
  }

  bool Exists(const std::string& path) override {
    absl::MutexLock lock(&mu_);
    std::string p = Normalize(path);
    return files_.count(p) > 0 || dirs_.count(p) > 0;
  }

  absl::StatusOr<uint64_t> FileSize(const std::string& path) override {
    absl::MutexLock lock(&mu_);
    auto it = files_.find(Normalize(path));
    if (it == files_.end()) return absl::NotFoundError(absl::StrCat("stat ", path));
    return it->second.size();
  }

 private:
  absl::Mutex mu_;
  std::map<std::string, std::string> files_ ABSL_GUARDED_BY(mu_);
  std::set<std::string> dirs_ ABSL_GUARDED_BY(mu_);
};

absl::Status MemWritableFile::Append(std::string_view data) { return env_->AppendTo(path_, data); }

}  // namespace

std::unique_ptr<Env> NewMemEnv() { return std::make_unique<MemEnv>(); }

}  // namespace gyre
