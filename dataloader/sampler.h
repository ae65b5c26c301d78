// The sample addressing contract of DESIGN.md section 3, in closed form.
//
// For training source s with T_s tokens there are N_s = floor((T_s - 1) / L) sequences of L + 1
// tokens (windows overlap by one token). Global sample index g maps to (s, e, j) like this:
//
//   1. Mixing blocks. Every block of K consecutive g holds exactly n_s samples of source s
//      (sum n_s = K; n_s from the weights by largest remainder, at least 1 for every source with a
//      positive weight). Block b = g / K, slot k = g % K. A keyed permutation P_b of [0, K)
//      (seed, b) gives p = P_b(k); the sources own consecutive ranges of p in name order, so
//      s = the owner of p and r = p - start_s is s's rank inside the block.
//   2. Per-source counter c = b * n_s + r: the number of samples of s drawn in earlier blocks plus
//      a bijection of this block's n_s slots onto [b n_s, (b+1) n_s). No replay is needed.
//      Within one block a source's counters come in permuted order, so a source much smaller
//      than its n_s (several epochs per block) shows epochs interleaved inside that block; across
//      blocks the counters are exactly consecutive.
//   3. Epoch e = c / N_s, sequence j = c % N_s.
//   4. The window starts at token perm_{s,e}(j) * L of s, where perm_{s,e} is a keyed Feistel
//      permutation of [0, N_s) seeded by (run seed, XXH64(source name), e). Tokens of a source are
//      the concatenation of its shards in ordinal order, so a window may span shards.
//
// Step t with global batch B covers g in [t B, (t+1) B); rank r of W takes a contiguous slice,
// the remainder B % W going one each to the first ranks (RankSlice). The map depends only on
// (seed, L, K, the training sources' names + token counts, weights) -- never on W -- so resuming
// from a step number is exact and any world size sees the same samples for step t.
//
// Weights: by default proportional to tokens (a source's share of all training tokens). An
// override replaces the share of the sources it names; unnamed sources keep their token share;
// weights are relative (normalized). A weight of 0 excludes a source. Validation sources
// (split != "train") are never in the training mix; naming one in the weights is an error.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "base/env.h"
#include "dataloader/shard.h"
#include "dataloader/token_index.h"
#include "gyre/v1/config.pb.h"

namespace gyre::data {

struct SamplerOptions {
  uint32_t seq_len = 2048;   // L; each sample is L + 1 tokens
  uint64_t seed = 0;         // run seed
  uint32_t mix_block = 1024; // K samples per mixing block
  // Per-source weight overrides (see the header comment). Empty: proportional to tokens.
  std::map<std::string, double> weights;
};

// The sampler's options from the run config: data.seq_len (default 2048), data.mix_block
// (default 1024), data.weights, and the run seed.
SamplerOptions SamplerOptionsFromConfig(const gyre::v1::RunConfig& config);

// What the schedule needs to know about one source.
struct SourceInfo {
  std::string name;
  uint64_t tokens = 0;  // T_s, EOS included
  bool validation = false;
};

struct SampleAddress {
  uint64_t global = 0;      // g
  uint32_t source = 0;      // index into MixSchedule::sources()
  uint64_t epoch = 0;       // e
  uint64_t sequence = 0;    // j, the sequence id within the epoch
  uint64_t start_token = 0; // perm_{s,e}(j) * L
};

// The contiguous slice of [t B, (t+1) B) that rank r of W reads.
struct SampleRange {
  uint64_t first = 0;
  uint64_t count = 0;
};
SampleRange RankSlice(uint64_t step, uint64_t global_batch, uint32_t world, uint32_t rank);

// The pure map g -> (s, e, j, start). No I/O; thread-safe (immutable).
class MixSchedule {
 public:
  struct Source {
    std::string name;
    uint64_t tokens = 0;
    uint64_t sequences = 0;  // N_s
    double weight = 0;       // normalized effective weight
    uint32_t per_block = 0;  // n_s
    uint32_t block_start = 0;
    uint64_t key = 0;        // XXH64(name)
  };

  // `sources` may include validation sources and sources too small for one sequence; they are
  // left out of the mix. Errors name the offending source or weight.
  static absl::StatusOr<MixSchedule> Create(const std::vector<SourceInfo>& sources,
                                            const SamplerOptions& options);

  SampleAddress Locate(uint64_t g) const;
  const std::vector<Source>& sources() const { return sources_; }
  uint32_t seq_len() const { return seq_len_; }
  uint32_t mix_block() const { return mix_block_; }
  uint64_t seed() const { return seed_; }
  // One line per source: name, weight, n_s / K, sequences.
  std::string Describe() const;

 private:
  std::vector<Source> sources_;           // in the mix only, by name
  std::vector<uint32_t> owner_of_slot_;   // K entries: slot p -> source
  uint32_t seq_len_ = 0;
  uint32_t mix_block_ = 0;
  uint64_t seed_ = 0;
};

// The tokens of one source: its shards concatenated in ordinal order. Shards are mapped lazily
// on first use (their header is checked then: magic, version, size, dtype, tokenizer fingerprint
// and token count against the index; with verify_checksums also the payload hash), and at most
// `max_open_shards` stay mapped: the full SlimPajama gives ~400k small shards, far over the
// kernel's default vm.max_map_count of 65530. An evicted shard is unmapped once no reader holds
// it and is checked again when mapped again.
// Thread-safe.
class SourceTokens {
 public:
  static constexpr size_t kDefaultMaxOpenShards = 1024;

  static absl::StatusOr<std::unique_ptr<SourceTokens>> Open(
      Env* env, const std::string& index_dir, std::vector<gyre::v1::ShardRecord> shards,
      uint64_t tokenizer_fingerprint, bool verify_checksums,
      size_t max_open_shards = kDefaultMaxOpenShards);
  ~SourceTokens();

  uint64_t tokens() const { return total_; }
  size_t shards() const { return records_.size(); }
  // Copies tokens [begin, begin + out.size()) into `out`.
  absl::Status Read(uint64_t begin, std::span<uint32_t> out) const;
  size_t open_shards() const;  // currently mapped (for tests)

 private:
  SourceTokens() = default;
  absl::StatusOr<std::shared_ptr<const ShardReader>> Shard(size_t i) const;

  Env* env_ = nullptr;
  std::string index_dir_;
  std::vector<gyre::v1::ShardRecord> records_;
  std::vector<uint64_t> first_token_;
  uint64_t total_ = 0;
  uint64_t fingerprint_ = 0;
  bool verify_ = false;
  size_t max_open_ = kDefaultMaxOpenShards;
  mutable absl::Mutex mu_;
  mutable std::vector<std::shared_ptr<const ShardReader>> open_ ABSL_GUARDED_BY(mu_);
  mutable size_t open_count_ ABSL_GUARDED_BY(mu_) = 0;
  mutable size_t evict_cursor_ ABSL_GUARDED_BY(mu_) = 0;
};

// The schedule plus the tokens: "give me the tokens of global sample g". Thread-safe.
class Sampler {
 public:
  struct OpenOptions {
    bool verify_checksums = false;  // hash every shard's payload when first mapped
    size_t max_open_shards_per_source = SourceTokens::kDefaultMaxOpenShards;
  };
  static absl::StatusOr<std::unique_ptr<Sampler>> Open(Env* env, const TokenIndex& index,
                                                      const SamplerOptions& options,
                                                      const OpenOptions& open_options);

  const MixSchedule& schedule() const { return schedule_; }
  SampleAddress Locate(uint64_t g) const { return schedule_.Locate(g); }
  // Writes the L + 1 tokens of sample g into `out` (out.size() must be L + 1).
  absl::Status Read(uint64_t g, std::span<uint32_t> out) const;
  // Samples first .. first + count - 1, row after row: out.size() must be count * (L + 1).
  // With RankSlice this is one rank's share of a step.
  absl::Status ReadRange(SampleRange range, std::span<uint32_t> out) const;
  absl::Status ReadAt(const SampleAddress& address, std::span<uint32_t> out) const;

 private:
  Sampler(MixSchedule schedule) : schedule_(std::move(schedule)) {}
  MixSchedule schedule_;
  std::vector<std::unique_ptr<SourceTokens>> tokens_;  // parallel to schedule_.sources()
};

// The tokens of any one source (validation sources included, e.g. for perplexity), read in
// order: sequence j of a validation source is the window starting at j * L, no permutation.
absl::StatusOr<std::unique_ptr<SourceTokens>> OpenSourceTokens(Env* env, const TokenIndex& index,
                                                               const std::string& source,
                                                               bool verify_checksums);

// XXH3-64 of the token ids as little-endian uint32 (what `gyre sample` prints).
uint64_t HashTokens(std::span<const uint32_t> tokens);

}  // namespace gyre::data
