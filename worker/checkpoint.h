// Checkpoint files: runs/<name>/checkpoints/step-<t>/ (DESIGN.md section 7).
//
// Layout: one file per tensor group ("state-<k>.bin": raw little-endian tensor bytes back to
// back) plus MANIFEST (gyre.v1.CheckpointManifest, binary protobuf) naming every tensor with its
// dtype, shape, file and byte range, and every file with its size and XXH64.
//
// Atomicity: everything is written into "step-<t>.tmp/", each file synced, MANIFEST last, then
// the directory is renamed to "step-<t>" and the parent directory synced. A reader trusts a
// checkpoint only when its MANIFEST parses and every file matches its size and checksum, so a
// crash at any point leaves either the previous checkpoint or the new one, never a torn one.
// A corrupt newest checkpoint is reported (with the file that failed) and the previous one used.
// A worker's restore streams (StreamCheckpoint) instead of holding a 16 GB checkpoint in memory:
// it verifies each file while copying it in, so a corrupt file found late leaves the replica
// partly written; the replica then refuses all use until a good restore (replica.h).
//
// Thread-safety: the functions are thread-safe for different directories; CheckpointWriter
// runs one write at a time on its own thread.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "base/clock.h"
#include "base/env.h"
#include "gyre/v1/checkpoint.pb.h"
#include "gyre/v1/config.pb.h"

namespace gyre {

// One tensor's bytes (a snapshot: training may go on while it is written). They are either owned
// (`bytes`: exports, tests) or a range of a buffer that `staging` keeps alive: a training
// replica's snapshot (one reused pinned buffer instead of a fresh string per tensor,
// ModelReplica::Snapshot) or a read checkpoint (views into its files' bytes, ReadCheckpoint).
// Readers use data().
struct TensorSnapshot {
  std::string name;
  gyre::v1::DType dtype = gyre::v1::DTYPE_F32;
  std::vector<uint64_t> shape;
  std::string bytes;
  std::shared_ptr<const void> staging;
  const char* staged = nullptr;
  size_t staged_size = 0;

  std::string_view data() const { return staging ? std::string_view(staged, staged_size) : std::string_view(bytes); }
};

struct CheckpointState {
  uint64_t step = 0;        // parameters after `step` committed steps; data position = step
  uint64_t generation = 0;
  gyre::v1::RunConfig config;
  std::vector<TensorSnapshot> tensors;
  std::string rng_state;
};

// "step-<t>" (the coordinator names the same directory in a CHECKPOINT lease). Readers order
// checkpoints by the parsed step, not by name.
std::string CheckpointDirName(uint64_t step);

// Writes `state` atomically (see above) as the directory `final_dir` (its parent is created if
// needed) and returns it. `max_file_bytes` splits tensors over several files so no single file
// grows unbounded.
absl::StatusOr<std::string> WriteCheckpointTo(Env* env, const std::string& final_dir, const CheckpointState& state,
                                              uint64_t max_file_bytes = uint64_t{1} << 30);
// WriteCheckpointTo(checkpoints_dir/CheckpointDirName(state.step)).
absl::StatusOr<std::string> WriteCheckpoint(Env* env, const std::string& checkpoints_dir, const CheckpointState& state,
                                            uint64_t max_file_bytes = uint64_t{1} << 30);

// Reads and fully verifies one checkpoint directory into host memory, one buffer for all tensors
// (LoadLatestCheckpoint, `gyre eval --all_checkpoints`, tests; streamed through StreamCheckpoint,
// so several files are read at once; a worker's restore and eval's LoadModelFromRun stream
// straight into the model instead). DataLoss naming the file on any
// mismatch; nothing is returned unless every file passed its checksum.
absl::StatusOr<CheckpointState> ReadCheckpoint(Env* env, const std::string& dir);

// The MANIFEST of checkpoint `dir`, parsed and checked for consistency without reading the tensor
// files: the format version, and every tensor's byte range inside a file the manifest lists.
// DataLoss naming the manifest (or the tensor) otherwise; NotFound-derived DataLoss when it is
// missing.
absl::StatusOr<gyre::v1::CheckpointManifest> ReadCheckpointManifest(Env* env, const std::string& dir);

// Streaming restore (ModelReplica::RestoreFrom). Reader threads read the tensor files in chunks
// into a few reused buffers (pinned for a CUDA replica, so the copy to the device runs at link
// speed) and checksum each chunk as it is read; the calling thread hands each chunk's tensor
// bytes to the sink (the copy to the device) while the readers fill the other buffers. A buffer
// is reused only after the sink returned for it (a synchronous copy has finished with it).
// The defaults are those of the run config's checkpoint.restore_* fields left unset
// (StreamOptionsFromConfig).
struct CheckpointStreamOptions {
  size_t chunk_bytes = size_t{32} << 20;
  // Files are read in parallel, one reader per file at a time: a single thread reading from the
  // page cache (memcpy) and hashing (xxh64, ~10 GB/s a core) tops out at a few GB/s, and NVMe
  // disks want several requests in flight.
  int reader_threads = 4;
  int buffers_per_reader = 2;
  // Allocates one chunk buffer (null: out of memory). Unset: malloc.
  std::function<std::shared_ptr<void>(size_t bytes)> allocate;
};

// `base` with the run config's checkpoint.restore_reader_threads / restore_chunk_bytes /
// restore_buffers_per_reader applied (a field left 0 keeps base's value). InvalidArgument naming
// the field when one is out of range: threads 1..64, chunk 1 MiB..1 GiB, buffers 1..16, and the
// buffers' host memory (threads x buffers x chunk) at most 8 GiB. `base` itself is not checked
// (tests stream in chunks of a few KB).
absl::StatusOr<CheckpointStreamOptions> StreamOptionsFromConfig(const gyre::v1::CheckpointConfig& config,
                                                                CheckpointStreamOptions base = CheckpointStreamOptions());

struct CheckpointStreamStats {
  uint64_t bytes = 0;     // tensor-file bytes read
  int reader_threads = 0; // used: the option, at most one per file
  int buffers = 0;        // chunk buffers allocated (reader_threads x buffers_per_reader)
  size_t chunk_bytes = 0; // each buffer's size
  double wall_s = 0;      // first read to last sink call
  double read_s = 0;      // in Env reads, summed over the reader threads
  double verify_s = 0;    // in xxh64, summed over the reader threads
  double sink_s = 0;      // in the sink (the calling thread)
  double sink_wait_s = 0; // the calling thread waiting for a chunk
};

// Receives bytes [offset, offset + bytes.size()) of manifest tensor `tensor` (its index in
// manifest.tensors()). Called on StreamCheckpoint's calling thread; each file's chunks in order.
using TensorChunkSink = std::function<absl::Status(int tensor, uint64_t offset, std::string_view bytes)>;

// Streams every tensor file of checkpoint `dir` (`manifest`: ReadCheckpointManifest's, or any
// other: its layout is checked again, see below) through `sink`; every byte of every tensor is
// delivered exactly once when it returns OK. Before the first byte reaches the sink, the manifest
// must list every file once and put every tensor inside a listed file (DataLoss naming the tensor)
// and every file must exist with the size its manifest entry says (DataLoss naming the file):
// otherwise the sink's destination is untouched. A failure found while streaming — a checksum
// that does not match (checked before a file's last chunk is delivered), a read error, a file
// that shrank, an error from the sink — comes back as DataLoss naming the file (or the sink's
// error) after earlier chunks may have reached the sink: the destination then holds a mix of old
// and new bytes, and the caller must treat it as such. Only the files `manifest` lists are read
// (eval passes one cut down to the files holding parameters).
absl::StatusOr<CheckpointStreamStats> StreamCheckpoint(Env* env, Clock* clock, const std::string& dir,
                                                       const gyre::v1::CheckpointManifest& manifest,
                                                       const CheckpointStreamOptions& options,
                                                       const TensorChunkSink& sink);

// The newest checkpoint that verifies, skipping (and reporting through `skipped`) corrupt or
// torn ones. NotFound when none is valid.
struct LatestCheckpoint {
  std::string dir;
  CheckpointState state;
  std::vector<std::string> skipped;  // "step-00000009: <why>"
};
absl::StatusOr<LatestCheckpoint> LoadLatestCheckpoint(Env* env, const std::string& checkpoints_dir);

// Deletes all but the newest `keep_last` complete checkpoints and any leftover "*.tmp" dirs.
absl::Status PruneCheckpoints(Env* env, const std::string& checkpoints_dir, uint32_t keep_last);

// Writes checkpoints on a background thread so training continues (issue 5: asynchronous).
// Submit() returns at once; a second Submit while one is in flight waits for the first
// (bounded queue of one). `on_done` runs on the writer thread with the final dir or the error.
class CheckpointWriter {
 public:
  using Done = std::function<void(uint64_t step, absl::StatusOr<std::string> dir)>;
  CheckpointWriter(Env* env, std::string checkpoints_dir, uint32_t keep_last, Done on_done);
  ~CheckpointWriter();  // finishes the write in flight

  // Writes to `final_dir` (empty: checkpoints_dir/CheckpointDirName(state.step)).
  void Submit(CheckpointState state, std::string final_dir = "");
  // Blocks until no write is in flight.
  void Flush();

 private:
  void Run();
  Env* const env_;
  const std::string dir_;
  const uint32_t keep_last_;
  const Done on_done_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::optional<CheckpointState> pending_;
  std::string pending_dir_;
  bool busy_ = false;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace gyre
