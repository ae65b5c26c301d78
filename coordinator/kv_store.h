// RendezvousKv: the coordinator-hosted key-value store behind Cluster.StoreSet / StoreGet, where
// the members of a CPU generation exchange their Gloo addresses (no shared file system needed).
// Keys are set once; values are small. Bounded: at most max_entries keys (the oldest are evicted
// first; rendezvous keys are read within seconds of being set) and max_value_bytes per value.
// Ephemeral by design (not journaled).
//
// Thread-safety: thread-safe (gRPC handler threads call it directly, not through the core).
#pragma once

#include <cstddef>
#include <deque>
#include <map>
#include <optional>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"

namespace gyre::coordinator {

class RendezvousKv {
 public:
  struct Options {
    size_t max_entries = 65536;
    size_t max_value_bytes = size_t{1} << 20;
  };
  RendezvousKv() : RendezvousKv(Options()) {}
  explicit RendezvousKv(Options options) : options_(options) {}

  // InvalidArgument for an empty key or an oversized value; FailedPrecondition when the key holds
  // a different value (a stale member must not overwrite a live one). Setting the same value again
  // is OK (a retried call).
  absl::Status Set(const std::string& key, const std::string& value);
  std::optional<std::string> Get(const std::string& key) const;
  size_t size() const;

 private:
  const Options options_;
  mutable absl::Mutex mu_;
  std::map<std::string, std::string> values_ ABSL_GUARDED_BY(mu_);
  std::deque<std::string> order_ ABSL_GUARDED_BY(mu_);  // insertion order, for eviction
};

}  // namespace gyre::coordinator
