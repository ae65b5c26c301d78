// RendezvousStore: the key-value store through which the members of one generation find each
// other before forming a communicator (Gloo's full-mesh connect; NCCL's unique id travels in the
// lease instead). Keys are scoped by the caller (one prefix per generation), values are bytes.
//
// Implementations:
//  - InProcessStore: threads of one process (tests, the simulation).
//  - DirectoryStore: a directory every member can reach (one host, or a shared file system),
//    one file per key written atomically through Env — what the local launcher uses.
//  - a coordinator-backed store over gRPC (see coordinator/), for multi-host CPU runs.
//
// Thread-safety: implementations are thread-safe.
#pragma once

#include <map>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "base/clock.h"
#include "base/env.h"

namespace gyre {

class RendezvousStore {
 public:
  virtual ~RendezvousStore() = default;
  // Sets `key` once; setting an existing key to a different value is FailedPrecondition
  // (a stale member of an old generation must not overwrite a live one).
  virtual absl::Status Set(const std::string& key, const std::string& value) = 0;
  // Blocks until `key` exists or `timeout_ms` passes (DeadlineExceeded naming the key).
  virtual absl::StatusOr<std::string> Get(const std::string& key, int64_t timeout_ms) = 0;
};

class InProcessStore final : public RendezvousStore {
 public:
  absl::Status Set(const std::string& key, const std::string& value) override;
  absl::StatusOr<std::string> Get(const std::string& key, int64_t timeout_ms) override;

 private:
  absl::Mutex mu_;
  std::map<std::string, std::string> values_ ABSL_GUARDED_BY(mu_);
};

class DirectoryStore final : public RendezvousStore {
 public:
  // `dir` is created if missing. `env` and `clock` must outlive the store.
  DirectoryStore(Env* env, Clock* clock, std::string dir)
      : env_(env), clock_(clock), dir_(std::move(dir)) {}
  absl::Status Set(const std::string& key, const std::string& value) override;
  absl::StatusOr<std::string> Get(const std::string& key, int64_t timeout_ms) override;

 private:
  std::string PathFor(const std::string& key) const;
  Env* const env_;
  Clock* const clock_;
  const std::string dir_;
};

}  // namespace gyre
