// GlooCollective: Collective over Gloo's TCP transport (CPU workers).
//
// Per generation: a fresh gloo rendezvous Context under the store prefix "g<generation>/",
// full-mesh connect with a deadline, ring all-reduce per call with a unique tag and timeout.
// Gloo reports failures by throwing (gloo::IoException, EnforceNotMet); every call catches and
// turns them into Status, so no exception crosses this boundary. SIGPIPE is ignored process-wide
// on first use (Gloo writes without MSG_NOSIGNAL; ELASTIC.md section 4).
#pragma once

#include <atomic>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "worker/collective.h"
#include "worker/rendezvous_store.h"

namespace gloo {
class Context;
}  // namespace gloo

namespace gyre {

struct GlooOptions {
  std::string hostname = "127.0.0.1";  // this worker's reachable address for peers
  int64_t connect_timeout_ms = 30000;   // rendezvous + full-mesh connect
  int64_t op_timeout_ms = 60000;        // each all-reduce / broadcast
};

class GlooCollective final : public Collective {
 public:
  // Blocks until all `world_size` members joined or the connect timeout passed. `store` must
  // outlive the call only (it is not kept). Keys live under `key_prefix` (the generation's
  // Rendezvous.store_prefix; empty: "g<generation>/").
  static absl::StatusOr<std::unique_ptr<GlooCollective>> Connect(RendezvousStore* store, uint64_t generation,
                                                                 int rank, int world_size,
                                                                 const GlooOptions& options,
                                                                 const std::string& key_prefix = "");
  ~GlooCollective() override;

  int rank() const override { return rank_; }
  int world_size() const override { return world_size_; }
  uint64_t generation() const override { return generation_; }
  absl::Status AllReduceSum(float* data, size_t count) override;
  absl::Status AllReduceSum(double* data, size_t count) override;
  absl::Status Broadcast(void* data, size_t bytes, int root) override;
  void Abort() override;

 private:
  GlooCollective(std::shared_ptr<gloo::Context> context, uint64_t generation, int rank, int world_size,
                 const GlooOptions& options);
  template <typename T>
  absl::Status AllReduceImpl(T* data, size_t count);

  std::shared_ptr<gloo::Context> context_;
  const uint64_t generation_;
  const int rank_;
  const int world_size_;
  const GlooOptions options_;
  uint32_t next_tag_ = 1;
  std::atomic<bool> aborted_{false};
};

}  // namespace gyre
