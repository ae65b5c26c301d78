// The token index (DESIGN.md section 3): a RocksDB database in `<dir>/rocksdb` describing the
// shards under `<dir>/shards`. Column families and values (protos/gyre/v1/data.proto):
//   meta     "index"                                  -> IndexMeta
//   sources  source name                              -> SourceRecord
//   shards   source 0x00 BE32(shard ordinal)          -> ShardRecord
//   docs     source 0x00 BE32(shard) BE64(doc ordinal) -> DocRecord   (optional)
//   inputs   input path as given                      -> InputRecord  (resumable prepare)
// Big-endian ordinals make a prefix scan of one source return its shards in order.
//
// The index is the only thing the sampler and the coordinator read to know what exists.
// Writers: one process at a time (RocksDB's LOCK enforces it). Readers open read-only and may
// run while a writer appends; they see the state at their open.
//
// Thread-safety: all methods are thread-safe (RocksDB is; CommitInput serializes itself).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "gyre/v1/data.pb.h"

namespace rocksdb {
class DB;
class ColumnFamilyHandle;
}  // namespace rocksdb

namespace gyre::data {

inline constexpr uint32_t kIndexFormatVersion = 1;

std::string IndexRocksDir(const std::string& index_dir);   // <dir>/rocksdb
std::string IndexShardsDir(const std::string& index_dir);  // <dir>/shards

// Key encodings (exposed for tests and tools).
std::string ShardKey(const std::string& source, uint32_t ordinal);
std::string DocKey(const std::string& source, uint32_t shard, uint64_t doc);

class TokenIndex {
 public:
  enum class Mode { kReadOnly, kReadWrite };

  // kReadOnly: NotFound when there is no index at `dir`. kReadWrite: creates it when missing.
  static absl::StatusOr<std::unique_ptr<TokenIndex>> Open(const std::string& dir, Mode mode);
  ~TokenIndex();

  const std::string& dir() const { return dir_; }

  // IndexMeta, or nullopt for a freshly created index that has none yet.
  absl::StatusOr<std::optional<gyre::v1::IndexMeta>> ReadMeta() const;
  // Writes the meta record (read-write only). Used once, when the first prepare starts.
  absl::Status WriteMeta(const gyre::v1::IndexMeta& meta);

  // All sources, ordered by name.
  absl::StatusOr<std::vector<gyre::v1::SourceRecord>> ListSources() const;
  // Shards of `source`, ordered by ordinal.
  absl::StatusOr<std::vector<gyre::v1::ShardRecord>> ListShards(const std::string& source) const;
  // Document records of one shard, in order (empty when the docs family was not written).
  absl::StatusOr<std::vector<gyre::v1::DocRecord>> ListDocs(const std::string& source,
                                                            uint32_t shard) const;
  absl::StatusOr<std::optional<gyre::v1::InputRecord>> GetInput(const std::string& path) const;
  absl::StatusOr<std::vector<gyre::v1::InputRecord>> ListInputs() const;

  // Everything one input file contributed, registered in one synced RocksDB write batch: either
  // all of it is in the index after a crash, or none of it.
  struct NewShard {
    std::string source;       // created on first use with `split`
    std::string split;        // "train", "validation", "test"
    std::string path;         // relative to the index directory; the file is already published
    uint64_t tokens = 0;
    uint64_t documents = 0;
    uint64_t payload_checksum = 0;
    uint32_t dtype_bytes = 2;
    std::vector<gyre::v1::DocRecord> docs;  // optional
  };
  struct InputCommit {
    gyre::v1::InputRecord input;
    std::vector<NewShard> shards;  // appended to their sources in this order
  };
  // Assigns each shard the next ordinal of its source and `first_token` = the source's token
  // total so far, updates the source totals (default_weight = tokens, i.e. proportional to
  // tokens), records the input, and writes it all atomically. Read-write only.
  absl::Status CommitInput(const InputCommit& commit);

 private:
  TokenIndex() = default;
  rocksdb::ColumnFamilyHandle* cf(int i) const { return handles_[i]; }

  std::string dir_;
  Mode mode_ = Mode::kReadOnly;
  std::unique_ptr<rocksdb::DB> db_;
  std::vector<rocksdb::ColumnFamilyHandle*> handles_;  // owned by db_; destroyed before it
  absl::Mutex commit_mu_;
};

}  // namespace gyre::data
