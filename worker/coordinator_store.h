// CoordinatorStore: the RendezvousStore of a generation whose Rendezvous.store_address is
// "coordinator": keys live in the coordinator's RendezvousKv (Cluster.StoreSet / StoreGet), so
// workers on different hosts form Gloo communicators without a shared file system. Get polls
// with capped exponential backoff until the key appears or the timeout passes.
//
// Thread-safety: thread-safe (ClusterClient is).
#pragma once

#include <functional>
#include <string>

#include "base/clock.h"
#include "worker/cluster_client.h"
#include "worker/rendezvous_store.h"

namespace gyre {

class CoordinatorStore final : public RendezvousStore {
 public:
  // `client` and `clock` are not owned and outlive the store; `session` is sent for the
  // coordinator's logs.
  CoordinatorStore(ClusterClient* client, Clock* clock, uint64_t session)
      : client_(client), clock_(clock), session_(session) {}
  absl::Status Set(const std::string& key, const std::string& value) override;
  absl::StatusOr<std::string> Get(const std::string& key, int64_t timeout_ms) override;

  // The store_address that selects this store.
  static constexpr char kAddress[] = "coordinator";

 private:
  ClusterClient* const client_;
  Clock* const clock_;
  const uint64_t session_;
};

}  // namespace gyre
