#include "worker/rendezvous_store.h"

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "base/status_macros.h"

namespace gyre {

absl::Status InProcessStore::Set(const std::string& key, const std::string& value) {
  absl::MutexLock lock(&mu_);
  auto [it, inserted] = values_.emplace(key, value);
  if (!inserted && it->second != value) {
    return absl::FailedPreconditionError(absl::StrCat("rendezvous key '", key, "' already set to a different value"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> InProcessStore::Get(const std::string& key, int64_t timeout_ms) {
  absl::MutexLock lock(&mu_);
  auto present = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return values_.count(key) > 0; };
  if (!mu_.AwaitWithTimeout(absl::Condition(&present), absl::Milliseconds(timeout_ms))) {
    return absl::DeadlineExceededError(absl::StrCat("rendezvous key '", key, "' not set within ", timeout_ms, " ms"));
  }
  return values_.at(key);
}

std::string DirectoryStore::PathFor(const std::string& key) const {
  // Keys are generation-scoped names like "g3/rank_1"; flatten '/' so one directory holds all.
  std::string name;
  for (char c : key) {
    bool safe = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '-' || c == '.';
    if (safe) {
      name.push_back(c);
    } else {
      absl::StrAppend(&name, "%", absl::Hex(static_cast<unsigned char>(c), absl::kZeroPad2));
    }
  }
  return JoinPath(dir_, name);
}

absl::Status DirectoryStore::Set(const std::string& key, const std::string& value) {
  RETURN_IF_ERROR(env_->CreateDirs(dir_));
  const std::string path = PathFor(key);
  if (env_->Exists(path)) {
    ASSIGN_OR_RETURN(std::string existing, env_->ReadFile(path));
    if (existing != value) {
      return absl::FailedPreconditionError(absl::StrCat("rendezvous key '", key, "' already set to a different value in ", path));
    }
    return absl::OkStatus();
  }
  return WriteFileAtomically(env_, path, value);
}

absl::StatusOr<std::string> DirectoryStore::Get(const std::string& key, int64_t timeout_ms) {
  const std::string path = PathFor(key);
  const int64_t deadline = clock_->NowMicros() + timeout_ms * 1000;
  int64_t backoff_us = 200;
  while (true) {
    absl::StatusOr<std::string> value = env_->ReadFile(path);
    if (value.ok()) return value;
    if (!absl::IsNotFound(value.status())) return value.status();
    if (clock_->NowMicros() >= deadline) {
      return absl::DeadlineExceededError(absl::StrCat("rendezvous key '", key, "' not set within ", timeout_ms, " ms (", path, ")"));
    }
    clock_->SleepMicros(backoff_us);
    backoff_us = std::min<int64_t>(backoff_us * 2, 20000);
  }
}

}  // namespace gyre
