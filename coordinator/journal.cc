#include "coordinator/journal.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "rocksdb/db.h"
#include "rocksdb/env.h"
#include "rocksdb/options.h"
#include "rocksdb/write_batch.h"

namespace gyre::coordinator {
namespace {

constexpr char kConfigKey[] = "config";
constexpr char kControlKey[] = "control";
constexpr char kStepPrefix[] = "step/";
constexpr char kGenerationPrefix[] = "generation/";
constexpr char kCheckpointPrefix[] = "checkpoint/";

std::string BigEndianKey(const char* prefix, uint64_t value) {
  std::string key(prefix);
  for (int shift = 56; shift >= 0; shift -= 8) key.push_back(static_cast<char>(value >> shift));
  return key;
}

// The first key after every key starting with `prefix` ("step/" -> "step0").
std::string PrefixEnd(const char* prefix) {
  std::string end(prefix);
  end.back() = static_cast<char>(end.back() + 1);
  return end;
}

absl::Status FromRocks(const rocksdb::Status& s, const std::string& what) {
  if (s.ok()) return absl::OkStatus();
  if (s.IsNotFound()) return absl::NotFoundError(absl::StrCat(what, ": ", s.ToString()));
  if (s.IsCorruption()) return absl::DataLossError(absl::StrCat(what, ": ", s.ToString()));
  if (s.IsInvalidArgument()) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": ", s.ToString()));
  }
  return absl::InternalError(absl::StrCat(what, ": ", s.ToString()));
}

class MemJournal final : public Journal {
 public:
  absl::Status Write(const JournalBatch& batch) override {
    ApplyBatch(batch, &contents_);
    return absl::OkStatus();
  }
  absl::StatusOr<JournalContents> Load() override { return contents_; }

 private:
  JournalContents contents_;
};

class RocksJournal final : public Journal {
 public:
  explicit RocksJournal(std::unique_ptr<rocksdb::DB> db) : db_(std::move(db)) {}

  absl::Status Write(const JournalBatch& batch) override {
    rocksdb::WriteBatch wb;
    auto put = [&](const std::string& key, const google::protobuf::Message& m) {
      return wb.Put(key, m.SerializeAsString());
    };
    rocksdb::Status s;
    if (batch.config.has_value()) s = put(kConfigKey, *batch.config);
    if (s.ok() && batch.control.has_value()) s = put(kControlKey, *batch.control);
    for (const auto& g : batch.generations) {
      if (s.ok()) s = put(GenerationKey(g.generation().id()), g);
    }
    if (s.ok() && batch.erase_steps_from.has_value()) {
      s = wb.DeleteRange(StepKey(*batch.erase_steps_from), PrefixEnd(kStepPrefix));
    }
    for (const auto& step : batch.steps) {
      if (s.ok()) s = put(StepKey(step.step()), step);
    }
    for (const auto& c : batch.checkpoints) {
      if (s.ok()) s = put(CheckpointKey(c.step()), c);
    }
    for (uint64_t step : batch.erased_checkpoints) {
      if (s.ok()) s = wb.Delete(CheckpointKey(step));
    }
    if (!s.ok()) return FromRocks(s, "journal: building write batch");
    rocksdb::WriteOptions options;
    options.sync = batch.sync;
    return FromRocks(db_->Write(options, &wb), "journal: write");
  }

  absl::StatusOr<JournalContents> Load() override {
    JournalContents contents;
    std::string value;
    rocksdb::Status s = db_->Get(rocksdb::ReadOptions(), kConfigKey, &value);
    if (s.ok()) {
      gyre::v1::JournalConfig config;
      if (!config.ParseFromString(value)) {
        return absl::DataLossError("journal: record \"config\" does not parse");
      }
      contents.config = std::move(config);
    } else if (!s.IsNotFound()) {
      return FromRocks(s, "journal: reading \"config\"");
    }
    s = db_->Get(rocksdb::ReadOptions(), kControlKey, &value);
    if (s.ok()) {
      gyre::v1::ControlState control;
      if (!control.ParseFromString(value)) {
        return absl::DataLossError("journal: record \"control\" does not parse");
      }
      contents.control = std::move(control);
    } else if (!s.IsNotFound()) {
      return FromRocks(s, "journal: reading \"control\"");
    }
    if (absl::Status st = Scan(kGenerationPrefix, &contents.generations); !st.ok()) return st;
    if (absl::Status st = Scan(kStepPrefix, &contents.steps); !st.ok()) return st;
    if (absl::Status st = Scan(kCheckpointPrefix, &contents.checkpoints); !st.ok()) return st;
    return contents;
  }

 private:
  template <typename Message>
  absl::Status Scan(const char* prefix, std::vector<Message>* out) {
    std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions()));
    const std::string end = PrefixEnd(prefix);
    for (it->Seek(prefix); it->Valid() && it->key().ToString() < end; it->Next()) {
      Message m;
      if (!m.ParseFromArray(it->value().data(), static_cast<int>(it->value().size()))) {
        std::string hex;
        for (unsigned char c : it->key().ToString().substr(std::string(prefix).size())) {
          absl::StrAppend(&hex, absl::Hex(c, absl::kZeroPad2));
        }
        return absl::DataLossError(
            absl::StrCat("journal: record \"", prefix, hex, "\" does not parse"));
      }
      out->push_back(std::move(m));
    }
    return FromRocks(it->status(), absl::StrCat("journal: scanning \"", prefix, "\""));
  }

  std::unique_ptr<rocksdb::DB> db_;
};

}  // namespace

std::string StepKey(uint64_t step) { return BigEndianKey(kStepPrefix, step); }
std::string GenerationKey(uint64_t id) { return BigEndianKey(kGenerationPrefix, id); }
std::string CheckpointKey(uint64_t step) { return BigEndianKey(kCheckpointPrefix, step); }

std::unique_ptr<Journal> NewMemJournal() { return std::make_unique<MemJournal>(); }

absl::StatusOr<std::unique_ptr<Journal>> OpenRocksJournal(const std::string& dir,
                                                         const RocksJournalOptions& options) {
  rocksdb::Options db_options;
  db_options.create_if_missing = true;
  db_options.paranoid_checks = true;
  if (options.env != nullptr) db_options.env = options.env;
  rocksdb::DB* raw = nullptr;
  rocksdb::Status s = rocksdb::DB::Open(db_options, dir, &raw);
  if (!s.ok()) return FromRocks(s, absl::StrCat("journal: opening ", dir));
  return std::unique_ptr<Journal>(new RocksJournal(std::unique_ptr<rocksdb::DB>(raw)));
}

}  // namespace gyre::coordinator
