// Test-only helpers shared by worker/'s tests: a fresh directory under TEST_TMPDIR, a one-shard
// synthetic token index for runs against a real coordinator, and the tiny replica set-up (config,
// tokens, a one-rank collective) the replica tests train with.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "gyre/v1/config.pb.h"
#include "worker/collective.h"

namespace gyre::testing {

// TEST_TMPDIR/<name> (or /tmp/<name>), emptied and created.
std::string FreshTestDir(const std::string& name);

// A token index at `dir`: one source "synthetic" (split train), one shard of 20,000 pseudo-random
// ids below `vocab` (2-byte tokens), tokenizer fingerprint 7. Fails the calling test on error.
void WriteSyntheticIndex(const std::string& dir, uint32_t vocab);

// A one-worker run of llama-tiny (vocab 256, seq 16, global batch 2, lr 0.003) on the index at
// `index_dir`, a checkpoint every 2 steps (keep 5), heartbeats every 100 ms (timeout 5 s), for the
// tests that run a real worker against a real coordinator.
gyre::v1::RunConfig TinyClusterRunConfig(const std::string& name, const std::string& index_dir,
                                         uint64_t max_steps);

// llama-tiny, lr 1e-2, warm-up 2 of 100 steps.
gyre::v1::RunConfig TinyReplicaConfig(uint64_t seed = 3);

// batch x (seq + 1) ids below `vocab`, from std::mt19937(seed).
std::vector<int32_t> RandomTokens(int64_t batch, int64_t seq, int vocab, uint32_t seed);

// A world of one: every collective is the identity.
class SingleRankCollective final : public Collective {
 public:
  int rank() const override { return 0; }
  int world_size() const override { return 1; }
  uint64_t generation() const override { return 1; }
  absl::Status AllReduceSum(float*, size_t) override { return absl::OkStatus(); }
  absl::Status AllReduceSum(double*, size_t) override { return absl::OkStatus(); }
  absl::Status Broadcast(void*, size_t, int) override { return absl::OkStatus(); }
  void Abort() override {}
};

}  // namespace gyre::testing
