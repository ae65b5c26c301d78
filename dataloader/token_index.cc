#include "dataloader/token_index.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "base/env.h"
#include "base/status_macros.h"
#include "rocksdb/db.h"
#include "rocksdb/options.h"
#include "rocksdb/write_batch.h"

namespace gyre::data {
namespace {

enum Cf { kDefault = 0, kMeta, kSources, kShards, kDocs, kInputs, kNumCf };
const char* const kCfNames[kNumCf] = {"default", "meta", "sources", "shards", "docs", "inputs"};
constexpr char kMetaKey[] = "index";

absl::Status FromRocks(const rocksdb::Status& s, const std::string& what) {
  if (s.ok()) return absl::OkStatus();
  const std::string msg = absl::StrCat(what, ": ", s.ToString());
  if (s.IsNotFound()) return absl::NotFoundError(msg);
  if (s.IsCorruption()) return absl::DataLossError(msg);
  if (s.IsInvalidArgument()) return absl::InvalidArgumentError(msg);
  if (s.IsBusy() || s.IsIOError()) return absl::UnavailableError(msg);
  return absl::InternalError(msg);
}

void PutBE(std::string& out, uint64_t v, int bytes) {
  for (int i = bytes - 1; i >= 0; --i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
}

template <typename Msg>
absl::StatusOr<Msg> Parse(const std::string& bytes, const std::string& what) {
  Msg m;
  if (!m.ParseFromString(bytes)) return absl::DataLossError("index record " + what + " does not parse");
  return m;
}

std::string SourcePrefix(const std::string& source) { return source + std::string(1, '\0'); }

}  // namespace

std::string IndexRocksDir(const std::string& index_dir) { return JoinPath(index_dir, "rocksdb"); }
std::string IndexShardsDir(const std::string& index_dir) { return JoinPath(index_dir, "shards"); }

std::string ShardKey(const std::string& source, uint32_t ordinal) {
  std::string k = SourcePrefix(source);
  PutBE(k, ordinal, 4);
  return k;
}

std::string DocKey(const std::string& source, uint32_t shard, uint64_t doc) {
  std::string k = ShardKey(source, shard);
  PutBE(k, doc, 8);
  return k;
}

TokenIndex::~TokenIndex() {
  if (db_) {
    for (auto* h : handles_) db_->DestroyColumnFamilyHandle(h).PermitUncheckedError();
    db_->Close().PermitUncheckedError();
  }
}

absl::StatusOr<std::unique_ptr<TokenIndex>> TokenIndex::Open(const std::string& dir, Mode mode) {
  std::unique_ptr<TokenIndex> index(new TokenIndex());
  index->dir_ = dir;
  index->mode_ = mode;
  const std::string rocks_dir = IndexRocksDir(dir);
  rocksdb::DBOptions options;
  options.create_if_missing = mode == Mode::kReadWrite;
  options.create_missing_column_families = mode == Mode::kReadWrite;
  options.info_log_level = rocksdb::InfoLogLevel::WARN_LEVEL;
  options.keep_log_file_num = 2;
  std::vector<rocksdb::ColumnFamilyDescriptor> cfs;
  for (const char* name : kCfNames) cfs.emplace_back(name, rocksdb::ColumnFamilyOptions());
  rocksdb::DB* db = nullptr;
  rocksdb::Status s;
  if (mode == Mode::kReadWrite) {
    RETURN_IF_ERROR(Env::Default()->CreateDirs(dir));
    s = rocksdb::DB::Open(options, rocks_dir, cfs, &index->handles_, &db);
  } else {
    if (!Env::Default()->Exists(JoinPath(rocks_dir, "CURRENT"))) {
      return absl::NotFoundError(absl::StrCat("no token index at ", dir,
                                              " (expected ", rocks_dir, "; run `gyre prepare`)"));
    }
    s = rocksdb::DB::OpenForReadOnly(options, rocks_dir, cfs, &index->handles_, &db);
  }
  if (!s.ok()) {
    if (s.IsIOError() && s.ToString().find("lock") != std::string::npos) {
      return absl::UnavailableError(absl::StrCat("token index ", dir,
                                                 " is open for writing by another process: ",
                                                 s.ToString()));
    }
    return FromRocks(s, "open token index " + rocks_dir);
  }
  index->db_.reset(db);
  return index;
}

absl::StatusOr<std::optional<gyre::v1::IndexMeta>> TokenIndex::ReadMeta() const {
  std::string value;
  rocksdb::Status s = db_->Get(rocksdb::ReadOptions(), cf(kMeta), kMetaKey, &value);
  if (s.IsNotFound()) return std::optional<gyre::v1::IndexMeta>();
  RETURN_IF_ERROR(FromRocks(s, "read index meta in " + dir_));
  ASSIGN_OR_RETURN(auto meta, Parse<gyre::v1::IndexMeta>(value, "meta/index in " + dir_));
  return std::optional<gyre::v1::IndexMeta>(std::move(meta));
}

absl::Status TokenIndex::WriteMeta(const gyre::v1::IndexMeta& meta) {
  if (mode_ != Mode::kReadWrite) return absl::FailedPreconditionError("index opened read-only");
  rocksdb::WriteOptions wo;
  wo.sync = true;
  return FromRocks(db_->Put(wo, cf(kMeta), kMetaKey, meta.SerializeAsString()),
                   "write index meta in " + dir_);
}

absl::StatusOr<std::vector<gyre::v1::SourceRecord>> TokenIndex::ListSources() const {
  std::vector<gyre::v1::SourceRecord> out;
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions(), cf(kSources)));
  for (it->SeekToFirst(); it->Valid(); it->Next()) {
    ASSIGN_OR_RETURN(auto rec, Parse<gyre::v1::SourceRecord>(it->value().ToString(),
                                                             "sources/" + it->key().ToString()));
    out.push_back(std::move(rec));
  }
  RETURN_IF_ERROR(FromRocks(it->status(), "scan sources in " + dir_));
  return out;
}

absl::StatusOr<std::vector<gyre::v1::ShardRecord>> TokenIndex::ListShards(
    const std::string& source) const {
  std::vector<gyre::v1::ShardRecord> out;
  const std::string prefix = SourcePrefix(source);
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions(), cf(kShards)));
  for (it->Seek(prefix); it->Valid() && it->key().starts_with(prefix); it->Next()) {
    ASSIGN_OR_RETURN(auto rec, Parse<gyre::v1::ShardRecord>(it->value().ToString(),
                                                            "shards of " + source));
    if (rec.ordinal() != out.size()) {
      return absl::DataLossError(absl::StrCat("index ", dir_, ": source '", source,
                                              "' shard ordinal ", rec.ordinal(), " where ",
                                              out.size(), " was expected"));
    }
    out.push_back(std::move(rec));
  }
  RETURN_IF_ERROR(FromRocks(it->status(), "scan shards in " + dir_));
  return out;
}

absl::StatusOr<std::vector<gyre::v1::DocRecord>> TokenIndex::ListDocs(const std::string& source,
                                                                      uint32_t shard) const {
  std::vector<gyre::v1::DocRecord> out;
  const std::string prefix = ShardKey(source, shard);
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions(), cf(kDocs)));
  for (it->Seek(prefix); it->Valid() && it->key().starts_with(prefix); it->Next()) {
    ASSIGN_OR_RETURN(auto rec, Parse<gyre::v1::DocRecord>(it->value().ToString(), "docs"));
    out.push_back(std::move(rec));
  }
  RETURN_IF_ERROR(FromRocks(it->status(), "scan docs in " + dir_));
  return out;
}

absl::StatusOr<std::optional<gyre::v1::InputRecord>> TokenIndex::GetInput(
    const std::string& path) const {
  std::string value;
  rocksdb::Status s = db_->Get(rocksdb::ReadOptions(), cf(kInputs), path, &value);
  if (s.IsNotFound()) return std::optional<gyre::v1::InputRecord>();
  RETURN_IF_ERROR(FromRocks(s, "read input record in " + dir_));
  ASSIGN_OR_RETURN(auto rec, Parse<gyre::v1::InputRecord>(value, "inputs/" + path));
  return std::optional<gyre::v1::InputRecord>(std::move(rec));
}

absl::StatusOr<std::vector<gyre::v1::InputRecord>> TokenIndex::ListInputs() const {
  std::vector<gyre::v1::InputRecord> out;
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions(), cf(kInputs)));
  for (it->SeekToFirst(); it->Valid(); it->Next()) {
    ASSIGN_OR_RETURN(auto rec, Parse<gyre::v1::InputRecord>(it->value().ToString(), "inputs"));
    out.push_back(std::move(rec));
  }
  RETURN_IF_ERROR(FromRocks(it->status(), "scan inputs in " + dir_));
  return out;
}

absl::Status TokenIndex::CommitInput(const InputCommit& commit) {
  if (mode_ != Mode::kReadWrite) return absl::FailedPreconditionError("index opened read-only");
  absl::MutexLock lock(&commit_mu_);
  std::map<std::string, gyre::v1::SourceRecord> sources;
  rocksdb::WriteBatch batch;
  for (const NewShard& shard : commit.shards) {
    auto it = sources.find(shard.source);
    if (it == sources.end()) {
      gyre::v1::SourceRecord rec;
      std::string value;
      rocksdb::Status s = db_->Get(rocksdb::ReadOptions(), cf(kSources), shard.source, &value);
      if (s.ok()) {
        ASSIGN_OR_RETURN(rec, Parse<gyre::v1::SourceRecord>(value, "sources/" + shard.source));
        if (rec.split() != shard.split) {
          return absl::FailedPreconditionError(absl::StrCat(
              "input ", commit.input.path(), " adds split '", shard.split, "' to source '",
              shard.source, "' which holds split '", rec.split(), "'"));
        }
      } else if (s.IsNotFound()) {
        rec.set_name(shard.source);
        rec.set_split(shard.split);
        rec.set_validation(shard.split != "train");
      } else {
        return FromRocks(s, "read source " + shard.source);
      }
      it = sources.emplace(shard.source, std::move(rec)).first;
    }
    gyre::v1::SourceRecord& src = it->second;
    gyre::v1::ShardRecord rec;
    rec.set_source(shard.source);
    rec.set_ordinal(src.shards());
    rec.set_path(shard.path);
    rec.set_tokens(shard.tokens);
    rec.set_documents(shard.documents);
    rec.set_payload_checksum(shard.payload_checksum);
    rec.set_first_token(src.tokens());
    rec.set_dtype_bytes(shard.dtype_bytes);
    RETURN_IF_ERROR(FromRocks(
        batch.Put(cf(kShards), ShardKey(shard.source, rec.ordinal()), rec.SerializeAsString()),
        "batch"));
    for (size_t d = 0; d < shard.docs.size(); ++d) {
      RETURN_IF_ERROR(FromRocks(batch.Put(cf(kDocs), DocKey(shard.source, rec.ordinal(), d),
                                          shard.docs[d].SerializeAsString()),
                                "batch"));
    }
    src.set_shards(src.shards() + 1);
    src.set_tokens(src.tokens() + shard.tokens);
    src.set_documents(src.documents() + shard.documents);
    src.set_default_weight(static_cast<double>(src.tokens()));
  }
  for (const auto& [name, rec] : sources) {
    RETURN_IF_ERROR(FromRocks(batch.Put(cf(kSources), name, rec.SerializeAsString()), "batch"));
  }
  RETURN_IF_ERROR(FromRocks(
      batch.Put(cf(kInputs), commit.input.path(), commit.input.SerializeAsString()), "batch"));
  rocksdb::WriteOptions wo;
  wo.sync = true;
  return FromRocks(db_->Write(wo, &batch), "commit input " + commit.input.path() + " to " + dir_);
}

}  // namespace gyre::data
