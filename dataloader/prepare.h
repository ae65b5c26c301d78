// `gyre prepare`: corpus files (.jsonl / .jsonl.zst; SlimPajama, the Pile, any {"text": ...}
// lines) -> token shards + the RocksDB token index (DESIGN.md section 3).
//
// Work: one input file per task, `threads` tasks at once. A task streams its file, parses each
// line (json_line.h), encodes the text, appends the ids + EOS to the open shard of the line's
// source (one shard writer per source per input; a shard closes at max_shard_tokens), and at the
// end publishes its shards. Inputs are registered in the index strictly in the sorted order of
// their (absolute) paths, each in one synced RocksDB batch with its InputRecord -- so the index
// is the same whatever the thread timing, and a crash or Ctrl-C loses only unregistered work.
//
// Resuming: inputs already in the `inputs` family are skipped; shard files that no index record
// references (left by a crash) are deleted at start. Appending new files to an existing index
// works the same way. An index written with another tokenizer (fingerprint) is refused.
//
// Splits: a file named val.* / validation.* / test.* (the Pile), or one whose folder or parent
// folder (the closer wins; higher folders never count) is named validation/valid/val/holdout or
// test (SlimPajama: validation/chunk1/...), is a validation split; its documents go to the
// separate source "<set>/validation" or "<set>/test" (validation = true), never mixed into
// training.
//
// Bad lines are skipped and counted per reason with file:line examples; an input whose fraction
// of bad lines exceeds max_bad_fraction is not registered and is reported as failed (nothing of
// it is lost silently; fix it and re-run). Empty documents are skipped and counted but are not
// "bad". Lone surrogate escapes become U+FFFD (counted).
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "base/clock.h"
#include "base/env.h"
#include "gyre/v1/data.pb.h"

namespace gyre::data {

// What `prepare` needs from a tokenizer (gyre::Tokenizer in production).
// Implementations must allow concurrent Encode calls.
class DocumentEncoder {
 public:
  virtual ~DocumentEncoder() = default;
  // Appends the ids of `text` (no EOS) to `ids`.
  virtual void Encode(std::string_view text, std::vector<uint32_t>* ids) const = 0;
  virtual uint32_t eos_id() const = 0;
  virtual uint32_t vocab_size() const = 0;
  virtual uint64_t fingerprint() const = 0;
  virtual std::string name() const = 0;
};

enum class DocIndexMode { kNone, kValidation, kAll };

struct PrepareOptions {
  std::string out_dir;                // the index directory
  std::vector<std::string> inputs;    // files, directories or glob patterns
  std::string source_field;           // dotted path; empty: meta.{redpajama,pile}_set_name
  std::string fixed_source;           // when set, every document's source (before the split suffix)
  int threads = 1;
  double max_bad_fraction = 0.01;     // per input file
  uint64_t max_shard_tokens = uint64_t{1} << 28;
  uint64_t max_document_bytes = uint64_t{1} << 30;  // larger documents are skipped as bad
  DocIndexMode doc_index = DocIndexMode::kValidation;
  Env* env = Env::Default();          // shards and input files (the index uses RocksDB's own)
  Clock* clock = Clock::Real();
};

// Live counters for a progress display; written by the workers, read by anyone.
struct PrepareProgress {
  std::atomic<uint64_t> bytes_total{0};  // of the inputs to do in this run (compressed sizes)
  std::atomic<uint64_t> bytes_done{0};
  std::atomic<uint64_t> documents{0};
  std::atomic<uint64_t> tokens{0};
  std::atomic<uint64_t> inputs_total{0};
  std::atomic<uint64_t> inputs_done{0};
};

struct PrepareReport {
  struct Added {
    uint64_t documents = 0;
    uint64_t tokens = 0;
    uint64_t shards = 0;
  };
  std::map<std::string, Added> added;             // by source, this run
  std::vector<gyre::v1::SourceRecord> totals;     // the whole index afterwards
  uint64_t inputs_committed = 0;
  uint64_t inputs_already_done = 0;
  uint64_t lines = 0;
  std::map<std::string, uint64_t> skipped;        // reason -> lines, this run (bad + empty)
  std::vector<std::string> skip_examples;         // "file:line: reason: detail", first few
  uint64_t bad_lines = 0;                         // skipped lines except empty documents
  uint64_t lone_surrogates = 0;
  std::vector<std::pair<std::string, absl::Status>> failed_inputs;  // not registered
  uint64_t orphans_removed = 0;
};

// Expands files, directories (recursively: *.jsonl, *.jsonl.zst, *.json, *.json.zst) and glob
// patterns into a sorted list of absolute paths. NotFound naming the first missing path or
// pattern without matches.
absl::StatusOr<std::vector<std::string>> ExpandInputs(const std::vector<std::string>& inputs);

// "train", "validation" or "test" for an input path (see the header comment).
std::string SplitOfPath(std::string_view path);

// Runs the whole job. A Status error is a job-level failure (bad options, index open, tokenizer
// mismatch, interruption via `cancel`); per-input failures are in report.failed_inputs.
// `progress` and `cancel` may be null.
absl::StatusOr<PrepareReport> RunPrepare(const DocumentEncoder& encoder,
                                         const PrepareOptions& options,
                                         PrepareProgress* progress = nullptr,
                                         const std::atomic<bool>* cancel = nullptr);

}  // namespace gyre::data
