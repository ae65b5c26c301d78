#include "dataloader/shard.h"

#include <bit>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "xxhash.h"

namespace gyre::data {

static_assert(std::endian::native == std::endian::little,
              "shards are little-endian; a big-endian host would need byte swaps");

namespace {

constexpr size_t kWriteBufferBytes = 1 << 20;

template <typename T>
void Put(std::string& out, size_t offset, T v) {
  std::memcpy(out.data() + offset, &v, sizeof(T));
}
template <typename T>
T Get(std::string_view in, size_t offset) {
  T v;
  std::memcpy(&v, in.data() + offset, sizeof(T));
  return v;
}

}  // namespace

std::string EncodeShardHeader(const ShardHeader& h) {
  std::string out(kShardHeaderBytes, '\0');
  std::memcpy(out.data(), kShardMagic, 8);
  Put<uint32_t>(out, 8, h.format_version);
  Put<uint32_t>(out, 12, h.dtype_bytes);
  Put<uint64_t>(out, 16, h.tokens);
  Put<uint64_t>(out, 24, h.documents);
  Put<uint64_t>(out, 32, h.tokenizer_fingerprint);
  Put<uint64_t>(out, 40, h.payload_checksum);
  Put<uint64_t>(out, 48, XXH64(out.data(), 48, 0));
  return out;
}

absl::StatusOr<ShardHeader> DecodeShardHeader(std::string_view bytes, uint64_t file_bytes,
                                              const std::string& path) {
  if (bytes.size() < kShardHeaderBytes) {
    return absl::DataLossError(absl::StrCat("shard ", path, ": ", bytes.size(),
                                            " bytes, shorter than the 64-byte header"));
  }
  if (std::memcmp(bytes.data(), kShardMagic, 8) != 0) {
    return absl::DataLossError(absl::StrCat("shard ", path, ": bad magic (not a Gyre shard)"));
  }
  if (Get<uint64_t>(bytes, 48) != XXH64(bytes.data(), 48, 0)) {
    return absl::DataLossError(absl::StrCat("shard ", path, ": header checksum mismatch"));
  }
  ShardHeader h;
  h.format_version = Get<uint32_t>(bytes, 8);
  h.dtype_bytes = Get<uint32_t>(bytes, 12);
  h.tokens = Get<uint64_t>(bytes, 16);
  h.documents = Get<uint64_t>(bytes, 24);
  h.tokenizer_fingerprint = Get<uint64_t>(bytes, 32);
  h.payload_checksum = Get<uint64_t>(bytes, 40);
  if (h.format_version != kShardFormatVersion) {
    return absl::FailedPreconditionError(absl::StrCat("shard ", path, ": format version ",
                                                      h.format_version, ", this build reads ",
                                                      kShardFormatVersion));
  }
  if (h.dtype_bytes != 2 && h.dtype_bytes != 4) {
    return absl::DataLossError(absl::StrCat("shard ", path, ": dtype of ", h.dtype_bytes, " bytes"));
  }
  if (h.tokens > (UINT64_MAX - kShardHeaderBytes) / h.dtype_bytes ||
      file_bytes != kShardHeaderBytes + h.tokens * h.dtype_bytes) {
    return absl::DataLossError(absl::StrCat("shard ", path, ": file has ", file_bytes,
                                            " bytes but the header says ", h.tokens, " tokens of ",
                                            h.dtype_bytes, " bytes (truncated or damaged)"));
  }
  return h;
}

// ---------------------------------------------------------------------------------------------
// ShardWriter

struct ShardWriter::HashState {
  XXH64_state_t* state = XXH64_createState();
  ~HashState() { XXH64_freeState(state); }
};

ShardWriter::ShardWriter(Env* env, std::string path, uint32_t dtype_bytes, uint64_t fingerprint)
    : env_(env), path_(std::move(path)), hash_(std::make_unique<HashState>()) {
  header_.dtype_bytes = dtype_bytes;
  header_.tokenizer_fingerprint = fingerprint;
  XXH64_reset(hash_->state, 0);
  buffer_.reserve(kWriteBufferBytes);
}

ShardWriter::~ShardWriter() {
  if (!finished_) {
    // Abandoned (error or interruption): leave nothing under the final name.
    if (payload_) payload_->Close().IgnoreError();
    env_->RemoveFile(path_ + ".payload.tmp").IgnoreError();
  }
}

absl::StatusOr<std::unique_ptr<ShardWriter>> ShardWriter::Create(Env* env, std::string path,
                                                                  uint32_t dtype_bytes,
                                                                  uint64_t tokenizer_fingerprint) {
  if (dtype_bytes != 2 && dtype_bytes != 4) {
    return absl::InvalidArgumentError(absl::StrCat("shard dtype of ", dtype_bytes, " bytes"));
  }
  std::unique_ptr<ShardWriter> w(new ShardWriter(env, std::move(path), dtype_bytes,
                                                 tokenizer_fingerprint));
  RETURN_IF_ERROR(env->CreateDirs(DirName(w->path_)));
  ASSIGN_OR_RETURN(w->payload_, env->NewWritableFile(w->path_ + ".payload.tmp"));
  return w;
}

absl::Status ShardWriter::AppendDocument(std::span<const uint32_t> ids) {
  if (finished_) return absl::FailedPreconditionError("shard " + path_ + " already finished");
  const size_t bytes = ids.size() * header_.dtype_bytes;
  const size_t at = buffer_.size();
  buffer_.resize(at + bytes);
  char* out = buffer_.data() + at;
  if (header_.dtype_bytes == 2) {
    for (size_t i = 0; i < ids.size(); ++i) {
      if (ids[i] > 0xFFFF) {
        buffer_.resize(at);
        return absl::InvalidArgumentError(absl::StrCat("token id ", ids[i],
                                                       " does not fit a uint16 shard ", path_));
      }
      uint16_t v = static_cast<uint16_t>(ids[i]);
      std::memcpy(out + 2 * i, &v, 2);
    }
  } else {
    std::memcpy(out, ids.data(), bytes);
  }
  header_.tokens += ids.size();
  header_.documents += 1;
  if (buffer_.size() >= kWriteBufferBytes) return Flush();
  return absl::OkStatus();
}

absl::Status ShardWriter::Flush() {
  if (buffer_.empty()) return absl::OkStatus();
  XXH64_update(hash_->state, buffer_.data(), buffer_.size());
  RETURN_IF_ERROR(payload_->Append(buffer_));
  buffer_.clear();
  return absl::OkStatus();
}

absl::StatusOr<ShardHeader> ShardWriter::Finish() {
  if (finished_) return absl::FailedPreconditionError("shard " + path_ + " already finished");
  RETURN_IF_ERROR(Flush());
  header_.payload_checksum = XXH64_digest(hash_->state);
  RETURN_IF_ERROR(payload_->Close());
  payload_.reset();
  const std::string payload_path = path_ + ".payload.tmp";
  const std::string tmp_path = path_ + ".tmp";
  {
    ASSIGN_OR_RETURN(std::unique_ptr<ReadOnlyRegion> payload, env_->MapFile(payload_path));
    // Pair assertion: what we hashed while writing is what landed in the file.
    if (XXH64(payload->data().data(), payload->data().size(), 0) != header_.payload_checksum ||
        payload->data().size() != header_.tokens * header_.dtype_bytes) {
      return absl::DataLossError("shard payload " + payload_path + " changed while being written");
    }
    ASSIGN_OR_RETURN(std::unique_ptr<WritableFile> out, env_->NewWritableFile(tmp_path));
    RETURN_IF_ERROR(out->Append(EncodeShardHeader(header_)));
    RETURN_IF_ERROR(out->Append(payload->data()));
    RETURN_IF_ERROR(out->Sync());
    RETURN_IF_ERROR(out->Close());
  }
  RETURN_IF_ERROR(env_->Rename(tmp_path, path_));
  RETURN_IF_ERROR(env_->SyncDir(DirName(path_)));
  env_->RemoveFile(payload_path).IgnoreError();
  finished_ = true;
  return header_;
}

// ---------------------------------------------------------------------------------------------
// ShardReader

absl::StatusOr<std::unique_ptr<ShardReader>> ShardReader::Open(Env* env, const std::string& path,
                                                              const OpenOptions& options) {
  auto reader = std::make_unique<ShardReader>();
  reader->path_ = path;
  ASSIGN_OR_RETURN(reader->region_, env->MapFile(path));
  std::string_view bytes = reader->region_->data();
  ASSIGN_OR_RETURN(reader->header_, DecodeShardHeader(bytes, bytes.size(), path));
  if (options.expect_tokenizer_fingerprint != 0 &&
      reader->header_.tokenizer_fingerprint != options.expect_tokenizer_fingerprint) {
    return absl::FailedPreconditionError(absl::StrCat(
        "shard ", path, ": tokenizer fingerprint ", absl::Hex(reader->header_.tokenizer_fingerprint),
        " differs from the index's ", absl::Hex(options.expect_tokenizer_fingerprint)));
  }
  reader->payload_ = reinterpret_cast<const unsigned char*>(bytes.data()) + kShardHeaderBytes;
  if (options.verify_checksum) RETURN_IF_ERROR(reader->VerifyChecksum());
  return reader;
}

absl::Status ShardReader::VerifyChecksum() const {
  const uint64_t got = XXH64(payload_, header_.tokens * header_.dtype_bytes, 0);
  if (got != header_.payload_checksum) {
    return absl::DataLossError(absl::StrCat("shard ", path_, ": payload checksum ", absl::Hex(got),
                                            " != header's ", absl::Hex(header_.payload_checksum),
                                            " (corrupted file)"));
  }
  return absl::OkStatus();
}

absl::Status ShardReader::Read(uint64_t begin, std::span<uint32_t> out) const {
  if (begin > header_.tokens || out.size() > header_.tokens - begin) {
    return absl::OutOfRangeError(absl::StrCat("shard ", path_, ": read [", begin, ", ",
                                              begin + out.size(), ") past ", header_.tokens,
                                              " tokens"));
  }
  ReadUnchecked(begin, out.data(), out.size());
  return absl::OkStatus();
}

void ShardReader::ReadUnchecked(uint64_t begin, uint32_t* out, size_t n) const {
  if (header_.dtype_bytes == 2) {
    const unsigned char* p = payload_ + 2 * begin;
    for (size_t i = 0; i < n; ++i) {
      uint16_t v;
      std::memcpy(&v, p + 2 * i, 2);
      out[i] = v;
    }
  } else {
    std::memcpy(out, payload_ + 4 * begin, 4 * n);
  }
}

}  // namespace gyre::data
