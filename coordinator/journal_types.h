// What the coordinator core asks its journal to persist (JournalBatch) and what a restarted
// coordinator reads back (JournalContents). Plain data; no I/O. The records are those of
// protos/gyre/v1/journal.proto; journal.h maps them to RocksDB keys.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include "gyre/v1/journal.pb.h"

namespace gyre::coordinator {

// One atomic journal write. A batch is applied all-or-nothing. When `sync` is set the write
// must be durable (fsync'd) before the host executes the actions that follow it.
struct JournalBatch {
  std::optional<gyre::v1::JournalConfig> config;
  std::optional<gyre::v1::ControlState> control;
  std::vector<gyre::v1::GenerationRecord> generations;
  std::vector<gyre::v1::CommittedStep> steps;
  // Restore from a checkpoint (every state holder was lost): step records >= this are erased
  // before `steps` are written.
  std::optional<uint64_t> erase_steps_from;
  std::vector<gyre::v1::CheckpointRecord> checkpoints;
  std::vector<uint64_t> erased_checkpoints;  // keep-last-K: steps whose records are removed
  bool sync = true;
};

// Everything a restarted coordinator needs, in ascending key order.
struct JournalContents {
  std::optional<gyre::v1::JournalConfig> config;
  std::optional<gyre::v1::ControlState> control;
  std::vector<gyre::v1::GenerationRecord> generations;  // ascending id
  std::vector<gyre::v1::CommittedStep> steps;           // ascending step
  std::vector<gyre::v1::CheckpointRecord> checkpoints;  // ascending step
};

// Applies `batch` to `contents` exactly as a journal would (used by the in-memory journal and by
// tests that compare against the RocksDB one).
void ApplyBatch(const JournalBatch& batch, JournalContents* contents);

}  // namespace gyre::coordinator
