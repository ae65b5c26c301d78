// Streams the lines of one corpus file: plain `.jsonl` or zstd-compressed `.jsonl.zst` (detected
// by the zstd magic number, whatever the name). zstd is decoded incrementally (several frames
// and skippable frames are fine); memory is O(longest line), so a 14 GB Pile file or a single
// 100 MB line both work. A file that ends inside a zstd frame is an error naming the file.
//
// Lines are split on '\n'; a trailing '\r' and a leading UTF-8 BOM on the first line are
// dropped; a last line without '\n' is still a line.
//
// Not thread-safe; one reader per file.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "base/env.h"

namespace gyre::data {

class LineReader {
 public:
  // NotFound naming `path` when it does not exist.
  static absl::StatusOr<std::unique_ptr<LineReader>> Open(Env* env, const std::string& path);
  ~LineReader();

  // The next line (valid until the next call), or nullopt-like false at the end of the file.
  // An error (corrupt or truncated zstd) names the file and the compressed offset.
  absl::StatusOr<bool> Next(std::string_view* line);

  uint64_t line_number() const { return line_number_; }    // 1-based number of the last line
  uint64_t bytes_consumed() const;                          // of the file (compressed bytes)
  uint64_t file_bytes() const { return file_bytes_; }
  bool compressed() const { return zstd_ != nullptr; }
  const std::string& path() const { return path_; }

 private:
  LineReader() = default;
  absl::Status Refill();  // decodes more zstd output into buffer_

  std::string path_;
  std::unique_ptr<ReadOnlyRegion> region_;
  std::string_view data_;
  uint64_t file_bytes_ = 0;
  uint64_t line_number_ = 0;
  // Plain files: position in data_.
  size_t plain_pos_ = 0;
  // zstd: decoded bytes [buffer_pos_, buffer_.size()) are not yet returned.
  struct Zstd;
  std::unique_ptr<Zstd> zstd_;
  std::string buffer_;
  size_t buffer_pos_ = 0;
  size_t scan_from_ = 0;  // no '\n' in [buffer_pos_, scan_from_)
  bool input_done_ = false;
};

}  // namespace gyre::data
