// Token shards (DESIGN.md section 3): one file per (source, piece of an input file), holding
// little-endian token ids after a fixed 64-byte header.
//
//   offset size  field
//        0    8  magic "GYRESHRD"
//        8    4  format version (kShardFormatVersion)
//       12    4  dtype bytes: 2 (uint16 ids) or 4 (uint32 ids)
//       16    8  token count (EOS included)
//       24    8  document count
//       32    8  tokenizer fingerprint (IndexMeta.tokenizer_fingerprint)
//       40    8  XXH64 (seed 0) of the payload bytes
//       48    8  XXH64 (seed 0) of header bytes [0, 48) -- a damaged header fails on its own
//       56    8  zero
//       64       payload: token count * dtype bytes
//
// All integers little-endian. Writers go through gyre::Env and publish atomically (temp file,
// sync, rename, directory sync), so a shard file either is complete or does not exist under its
// final name; the index registers a shard only after it is published.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "base/env.h"

namespace gyre::data {

inline constexpr char kShardMagic[8] = {'G', 'Y', 'R', 'E', 'S', 'H', 'R', 'D'};
inline constexpr uint32_t kShardFormatVersion = 1;
inline constexpr size_t kShardHeaderBytes = 64;

struct ShardHeader {
  uint32_t format_version = kShardFormatVersion;
  uint32_t dtype_bytes = 2;
  uint64_t tokens = 0;
  uint64_t documents = 0;
  uint64_t tokenizer_fingerprint = 0;
  uint64_t payload_checksum = 0;
};

// Serializes `h` (with its header checksum) into exactly kShardHeaderBytes bytes.
std::string EncodeShardHeader(const ShardHeader& h);
// Parses and checks magic, version, dtype, header checksum and that `file_bytes` matches the
// token count. `path` only names the file in errors.
absl::StatusOr<ShardHeader> DecodeShardHeader(std::string_view bytes, uint64_t file_bytes,
                                              const std::string& path);

// The dtype for a vocabulary: uint16 when every id fits, else uint32.
inline uint32_t DtypeBytesForVocab(uint64_t vocab_size) { return vocab_size <= 65536 ? 2 : 4; }

// Writes one shard. Tokens stream to `<path>.payload.tmp` through a small buffer; Finish() writes
// `<path>.tmp` = header + payload, syncs it, renames it to `path`, syncs the directory and
// removes the payload temp. Memory: O(buffer), whatever the shard size.
// Not thread-safe; one writer per shard.
class ShardWriter {
 public:
  static absl::StatusOr<std::unique_ptr<ShardWriter>> Create(Env* env, std::string path,
                                                            uint32_t dtype_bytes,
                                                            uint64_t tokenizer_fingerprint);
  ~ShardWriter();

  // Appends one document's ids (the caller appends the EOS id as part of `ids`). Ids must fit the
  // dtype (InvalidArgument otherwise).
  absl::Status AppendDocument(std::span<const uint32_t> ids);
  // Publishes the shard; returns its header (token count, checksum...). Call once.
  absl::StatusOr<ShardHeader> Finish();

  uint64_t tokens() const { return header_.tokens; }
  uint64_t documents() const { return header_.documents; }
  const std::string& path() const { return path_; }

 private:
  ShardWriter(Env* env, std::string path, uint32_t dtype_bytes, uint64_t fingerprint);
  absl::Status Flush();

  Env* env_;
  std::string path_;
  std::unique_ptr<WritableFile> payload_;
  ShardHeader header_;
  std::string buffer_;
  struct HashState;
  std::unique_ptr<HashState> hash_;
  bool finished_ = false;
};

// A published shard, mapped read-only. Thread-safe (immutable after Open).
class ShardReader {
 public:
  struct OpenOptions {
    // Hash the whole payload on open and compare with the header (reads the whole file).
    bool verify_checksum = false;
    // When non-zero, the header's fingerprint must equal it.
    uint64_t expect_tokenizer_fingerprint = 0;
  };
  static absl::StatusOr<std::unique_ptr<ShardReader>> Open(Env* env, const std::string& path,
                                                          const OpenOptions& options);

  const ShardHeader& header() const { return header_; }
  uint64_t tokens() const { return header_.tokens; }
  const std::string& path() const { return path_; }

  // Copies ids [begin, begin + out.size()) into `out`, widened to uint32. Bounds are the
  // caller's contract (checked with a Status).
  absl::Status Read(uint64_t begin, std::span<uint32_t> out) const;
  // Unchecked fast path for the sampler (caller guarantees bounds).
  void ReadUnchecked(uint64_t begin, uint32_t* out, size_t n) const;
  // XXH64 of the payload vs. the header, naming the file on mismatch.
  absl::Status VerifyChecksum() const;

 private:
  std::unique_ptr<ReadOnlyRegion> region_;
  std::string path_;
  ShardHeader header_;
  const unsigned char* payload_ = nullptr;
};

}  // namespace gyre::data
