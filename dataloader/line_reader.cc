#include "dataloader/line_reader.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "zstd.h"

namespace gyre::data {
namespace {

constexpr unsigned char kZstdMagic[4] = {0x28, 0xB5, 0x2F, 0xFD};
constexpr size_t kDecodeChunk = 1 << 20;

std::string_view TrimLine(std::string_view line, bool first) {
  if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
  if (first && line.size() >= 3 && std::memcmp(line.data(), "\xEF\xBB\xBF", 3) == 0) {
    line.remove_prefix(3);
  }
  return line;
}

}  // namespace

struct LineReader::Zstd {
  ZSTD_DCtx* ctx = ZSTD_createDCtx();
  ZSTD_inBuffer in{nullptr, 0, 0};
  size_t last_ret = 0;  // 0 when the last frame ended cleanly
  ~Zstd() { ZSTD_freeDCtx(ctx); }
};

LineReader::~LineReader() = default;

absl::StatusOr<std::unique_ptr<LineReader>> LineReader::Open(Env* env, const std::string& path) {
  std::unique_ptr<LineReader> r(new LineReader());
  r->path_ = path;
  auto region = env->MapFile(path);
  if (!region.ok()) {
    return absl::Status(region.status().code(),
                        absl::StrCat("cannot read input ", path, ": ", region.status().message()));
  }
  r->region_ = std::move(*region);
  r->data_ = r->region_->data();
  r->file_bytes_ = r->data_.size();
  if (r->data_.size() >= 4 && std::memcmp(r->data_.data(), kZstdMagic, 4) == 0) {
    r->zstd_ = std::make_unique<Zstd>();
    r->zstd_->in = {r->data_.data(), r->data_.size(), 0};
  }
  return r;
}

uint64_t LineReader::bytes_consumed() const {
  return zstd_ ? zstd_->in.pos : plain_pos_;
}

absl::Status LineReader::Refill() {
  // Drop what was already returned, then decode at least one chunk of output (or hit the end).
  if (buffer_pos_ > 0) {
    buffer_.erase(0, buffer_pos_);
    scan_from_ -= buffer_pos_;
    buffer_pos_ = 0;
  }
  while (true) {
    if (zstd_->in.pos >= zstd_->in.size) {
      input_done_ = true;
      if (zstd_->last_ret != 0) {
        return absl::DataLossError(absl::StrCat(
            "input ", path_, ": truncated zstd frame (the file ends inside a frame after ",
            file_bytes_, " compressed bytes)"));
      }
      return absl::OkStatus();
    }
    const size_t at = buffer_.size();
    buffer_.resize(at + kDecodeChunk);
    ZSTD_outBuffer out{buffer_.data() + at, kDecodeChunk, 0};
    const size_t ret = ZSTD_decompressStream(zstd_->ctx, &out, &zstd_->in);
    buffer_.resize(at + out.pos);
    if (ZSTD_isError(ret)) {
      input_done_ = true;
      return absl::DataLossError(absl::StrCat("input ", path_, ": zstd error at compressed byte ",
                                              zstd_->in.pos, ": ", ZSTD_getErrorName(ret)));
    }
    zstd_->last_ret = ret;
    if (out.pos > 0) return absl::OkStatus();
  }
}

absl::StatusOr<bool> LineReader::Next(std::string_view* line) {
  const bool first = line_number_ == 0;
  if (!zstd_) {
    if (plain_pos_ >= data_.size()) return false;
    const size_t nl = data_.find('\n', plain_pos_);
    const size_t end = nl == std::string_view::npos ? data_.size() : nl;
    *line = TrimLine(data_.substr(plain_pos_, end - plain_pos_), first);
    plain_pos_ = nl == std::string_view::npos ? data_.size() : nl + 1;
    ++line_number_;
    return true;
  }
  while (true) {
    const size_t nl = buffer_.find('\n', scan_from_);
    if (nl != std::string::npos) {
      *line = TrimLine(std::string_view(buffer_).substr(buffer_pos_, nl - buffer_pos_), first);
      buffer_pos_ = scan_from_ = nl + 1;
      ++line_number_;
      return true;
    }
    scan_from_ = buffer_.size();
    if (input_done_) {
      if (buffer_pos_ >= buffer_.size()) return false;
      *line = TrimLine(std::string_view(buffer_).substr(buffer_pos_), first);
      buffer_pos_ = scan_from_ = buffer_.size();
      ++line_number_;
      return true;
    }
    RETURN_IF_ERROR(Refill());
  }
}

}  // namespace gyre::data
