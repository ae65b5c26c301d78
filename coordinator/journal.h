// Journal: where the coordinator core's JournalBatch writes go, and what a restarted coordinator
// reads back (DESIGN.md section 4, "Coordinator restart"). Two implementations:
//   * RocksJournal: the run's journal/ directory (RocksDB, one default column family).
//     Keys: "config", "control", "generation/"+BE64(id), "step/"+BE64(step),
//     "checkpoint/"+BE64(step); values are the journal.proto messages. Big-endian keys keep
//     prefix scans in numeric order. A batch is one rocksdb::WriteBatch (atomic); sync batches
//     use WriteOptions::sync (fsync of the WAL before Write returns).
//   * MemJournal: the same semantics in memory, for the simulator and tests.
//
// Thread-safety: a Journal is used by the one thread that owns the core.
#pragma once

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "coordinator/journal_types.h"

namespace rocksdb {
class Env;
}

namespace gyre::coordinator {

class Journal {
 public:
  virtual ~Journal() = default;
  // Applies `batch` atomically; durable before returning when batch.sync. On error nothing may be
  // assumed about the batch: the caller stops and reloads (fail-stop).
  virtual absl::Status Write(const JournalBatch& batch) = 0;
  // Everything written so far. DataLoss names the key of a record that does not parse.
  virtual absl::StatusOr<JournalContents> Load() = 0;
};

// In-memory journal: Write applies with ApplyBatch; Load returns a copy.
std::unique_ptr<Journal> NewMemJournal();

struct RocksJournalOptions {
  // RocksDB Env for all file I/O; nullptr = rocksdb::Env::Default(). Tests pass
  // rocksdb::NewMemEnv(...) or a fault-injecting wrapper of it. Not owned; outlives the journal.
  rocksdb::Env* env = nullptr;
};

// Opens (creating if missing) the RocksDB journal in `dir`.
absl::StatusOr<std::unique_ptr<Journal>> OpenRocksJournal(const std::string& dir,
                                                         const RocksJournalOptions& options);

// Key encodings (exposed for tests and tools).
std::string StepKey(uint64_t step);
std::string GenerationKey(uint64_t id);
std::string CheckpointKey(uint64_t step);

}  // namespace gyre::coordinator
