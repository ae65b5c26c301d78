#include "coordinator/journal.h"

#include <atomic>
#include <memory>

#include "coordinator/core.h"
#include "gtest/gtest.h"
#include "rocksdb/db.h"
#include "rocksdb/env.h"

namespace gyre::coordinator {
namespace {

// Fails Sync/Fsync of every file while armed: an fsync error under the WAL (RocksDB's own Env
// seam over its in-memory Env, no mocking of RocksDB).
class SyncFailingEnv : public rocksdb::EnvWrapper {
 public:
  explicit SyncFailingEnv(rocksdb::Env* base) : rocksdb::EnvWrapper(base) {}
  const char* Name() const override { return "SyncFailingEnv"; }
  rocksdb::Status NewWritableFile(const std::string& f, std::unique_ptr<rocksdb::WritableFile>* r,
                                  const rocksdb::EnvOptions& options) override {
    std::unique_ptr<rocksdb::WritableFile> file;
    rocksdb::Status s = target()->NewWritableFile(f, &file, options);
    if (!s.ok()) return s;
    *r = std::make_unique<File>(std::move(file), this);
    return s;
  }
  std::atomic<bool> fail_syncs{false};
  std::atomic<int> failed{0};

 private:
  class File : public rocksdb::WritableFileWrapper {
   public:
    File(std::unique_ptr<rocksdb::WritableFile> f, SyncFailingEnv* env)
        : rocksdb::WritableFileWrapper(f.get()), owned_(std::move(f)), env_(env) {}
    rocksdb::Status Sync() override { return Check() ? WritableFileWrapper::Sync() : Error(); }
    rocksdb::Status Fsync() override { return Check() ? WritableFileWrapper::Fsync() : Error(); }

   private:
    bool Check() { return !env_->fail_syncs.load(); }
    rocksdb::Status Error() {
      ++env_->failed;
      return rocksdb::Status::IOError("injected fsync failure");
    }
    std::unique_ptr<rocksdb::WritableFile> owned_;
    SyncFailingEnv* env_;
  };
};

gyre::v1::CommittedStep Step(uint64_t t) {
  gyre::v1::CommittedStep s;
  s.set_step(t);
  s.set_generation(1 + t / 100);
  s.set_sample_begin(t * 8);
  s.set_sample_end(t * 8 + 8);
  s.set_world_size(2);
  s.mutable_metrics()->set_loss(1.0 / (1 + t));
  return s;
}

std::string Fingerprint(const JournalContents& c) {
  std::string out;
  if (c.config) out += "config:" + c.config->SerializeAsString() + "|";
  if (c.control) out += "control:" + c.control->SerializeAsString() + "|";
  for (const auto& g : c.generations) out += "g:" + g.SerializeAsString() + "|";
  for (const auto& s : c.steps) out += "s:" + s.SerializeAsString() + "|";
  for (const auto& k : c.checkpoints) out += "k:" + k.SerializeAsString() + "|";
  return out;
}

std::vector<JournalBatch> SampleBatches() {
  std::vector<JournalBatch> batches;
  JournalBatch first;
  gyre::v1::JournalConfig config;
  config.mutable_config()->set_name("journal-test");
  config.set_started_unix_ms(123);
  first.config = config;
  gyre::v1::ControlState control;
  control.set_desired_workers(2);
  first.control = control;
  batches.push_back(first);
  for (uint64_t id = 1; id <= 3; ++id) {
    JournalBatch b;
    gyre::v1::GenerationRecord g;
    g.mutable_generation()->set_id(id);
    g.mutable_generation()->set_start_step(id * 100);
    g.set_reason("join");
    b.generations.push_back(g);
    batches.push_back(b);
  }
  // 300 steps: keys beyond 255 must still scan in numeric order (big-endian keys).
  for (uint64_t t = 0; t < 300; ++t) {
    JournalBatch b;
    b.steps.push_back(Step(t));
    batches.push_back(b);
  }
  for (uint64_t t : {100, 200, 256}) {
    JournalBatch b;
    gyre::v1::CheckpointRecord c;
    c.set_step(t);
    c.set_path("checkpoints/step-" + std::to_string(t));
    b.checkpoints.push_back(c);
    if (t == 256) b.erased_checkpoints.push_back(100);
    batches.push_back(b);
  }
  // A restore back to step 256: later steps are erased and redone.
  JournalBatch restore;
  gyre::v1::GenerationRecord g;
  g.mutable_generation()->set_id(4);
  g.mutable_generation()->set_start_step(256);
  g.set_reason("restore");
  restore.generations.push_back(g);
  restore.erase_steps_from = 256;
  batches.push_back(restore);
  JournalBatch redo;
  redo.steps.push_back(Step(256));
  batches.push_back(redo);
  return batches;
}

TEST(JournalTest, RocksJournalMatchesMemJournalAndSurvivesReopen) {
  std::unique_ptr<rocksdb::Env> env(rocksdb::NewMemEnv(rocksdb::Env::Default()));
  RocksJournalOptions options;
  options.env = env.get();
  auto mem = NewMemJournal();
  {
    auto rocks = OpenRocksJournal("/journal", options);
    ASSERT_TRUE(rocks.ok()) << rocks.status();
    for (const auto& b : SampleBatches()) {
      ASSERT_TRUE((*rocks)->Write(b).ok());
      ASSERT_TRUE(mem->Write(b).ok());
    }
    auto a = (*rocks)->Load();
    auto m = mem->Load();
    ASSERT_TRUE(a.ok() && m.ok());
    EXPECT_EQ(Fingerprint(*a), Fingerprint(*m));
    ASSERT_EQ(a->steps.size(), 257u);
    EXPECT_EQ(a->steps.back().step(), 256u);
    ASSERT_EQ(a->checkpoints.size(), 2u);
    EXPECT_EQ(a->checkpoints[0].step(), 200u);
  }
  auto reopened = OpenRocksJournal("/journal", options);
  ASSERT_TRUE(reopened.ok()) << reopened.status();
  auto again = (*reopened)->Load();
  auto m = mem->Load();
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(Fingerprint(*again), Fingerprint(*m));
}

TEST(JournalTest, FailedSyncLosesNothingAcknowledged) {
  std::unique_ptr<rocksdb::Env> mem_env(rocksdb::NewMemEnv(rocksdb::Env::Default()));
  SyncFailingEnv env(mem_env.get());
  RocksJournalOptions options;
  options.env = &env;
  uint64_t acknowledged = 0;
  {
    auto journal = OpenRocksJournal("/j", options);
    ASSERT_TRUE(journal.ok()) << journal.status();
    for (uint64_t t = 0; t < 20; ++t) {
      JournalBatch b;
      b.steps.push_back(Step(t));
      if (t == 10) env.fail_syncs = true;
      absl::Status s = (*journal)->Write(b);
      if (s.ok()) {
        ASSERT_EQ(acknowledged, t) << "a write succeeded after an earlier one failed";
        ++acknowledged;
      }
    }
    EXPECT_GT(env.failed.load(), 0);
    EXPECT_EQ(acknowledged, 10u);  // the fsync failure is reported, not swallowed
  }
  env.fail_syncs = false;
  auto journal = OpenRocksJournal("/j", options);
  ASSERT_TRUE(journal.ok()) << journal.status();
  auto contents = (*journal)->Load();
  ASSERT_TRUE(contents.ok()) << contents.status();
  ASSERT_GE(contents->steps.size(), acknowledged);
  for (size_t i = 0; i < contents->steps.size(); ++i) EXPECT_EQ(contents->steps[i].step(), i);
}

TEST(JournalTest, UnparsableRecordIsDataLossNamingTheKey) {
  std::unique_ptr<rocksdb::Env> env(rocksdb::NewMemEnv(rocksdb::Env::Default()));
  {
    rocksdb::Options o;
    o.create_if_missing = true;
    o.env = env.get();
    rocksdb::DB* raw = nullptr;
    ASSERT_TRUE(rocksdb::DB::Open(o, "/bad", &raw).ok());
    std::unique_ptr<rocksdb::DB> db(raw);
    ASSERT_TRUE(db->Put(rocksdb::WriteOptions(), StepKey(3), std::string(12, '\xff')).ok());
  }
  RocksJournalOptions options;
  options.env = env.get();
  auto journal = OpenRocksJournal("/bad", options);
  ASSERT_TRUE(journal.ok());
  auto contents = (*journal)->Load();
  ASSERT_EQ(contents.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(contents.status().message().find("step/0000000000000003"), std::string::npos)
      << contents.status();
}

class NamedRendezvous : public RendezvousProvider {
 public:
  gyre::v1::Rendezvous ForGeneration(uint64_t id) override {
    gyre::v1::Rendezvous r;
    r.set_store_prefix("g" + std::to_string(id));
    return r;
  }
};

// The core's journal writes through RocksDB, then a restarted core resumes from Load().
TEST(JournalTest, CoreRestartsFromRocksJournal) {
  std::unique_ptr<rocksdb::Env> env(rocksdb::NewMemEnv(rocksdb::Env::Default()));
  RocksJournalOptions options;
  options.env = env.get();
  NamedRendezvous rendezvous;
  CoreOptions core_options;
  core_options.config.set_name("r");
  core_options.config.mutable_data()->set_global_batch(4);
  core_options.config.mutable_train()->set_max_steps(10);
  core_options.config.mutable_cluster()->set_desired_workers(1);
  core_options.rendezvous = &rendezvous;
  uint64_t generation = 0;
  {
    auto journal = OpenRocksJournal("/run/journal", options);
    ASSERT_TRUE(journal.ok());
    std::vector<Action> actions;
    auto core = CoordinatorCore::Create(core_options, &actions);
    ASSERT_TRUE(core.ok());
    auto run = [&](std::vector<Action> list) {
      for (const auto& a : list) {
        if (auto* w = std::get_if<JournalWrite>(&a)) {
          ASSERT_TRUE((*journal)->Write(w->batch).ok());
        }
      }
    };
    run(actions);
    RegisterEvent reg;
    reg.id = 1;
    reg.request.mutable_worker()->set_host("h");
    reg.fresh_session = 7;
    run((*core)->Handle(reg, 0));
    generation = (*core)->generation().id();
    for (uint64_t t = 0; t < 4; ++t) {
      AcquireStepEvent acquire;
      acquire.request.set_session(7);
      acquire.request.set_generation(generation);
      acquire.request.set_step(t);
      run((*core)->Handle(acquire, 10));
      CompleteStepEvent complete;
      complete.request.set_session(7);
      complete.request.set_generation(generation);
      complete.request.set_step(t);
      run((*core)->Handle(complete, 20));
    }
    EXPECT_EQ((*core)->committed_steps(), 4u);
  }
  auto journal = OpenRocksJournal("/run/journal", options);
  ASSERT_TRUE(journal.ok());
  auto contents = (*journal)->Load();
  ASSERT_TRUE(contents.ok());
  std::vector<Action> initial;
  auto restored = CoordinatorCore::Restore(core_options, *contents, 1000, &initial);
  ASSERT_TRUE(restored.ok()) << restored.status();
  EXPECT_EQ((*restored)->committed_steps(), 4u);
  EXPECT_EQ((*restored)->generation().id(), generation);
  EXPECT_EQ((*restored)->config().name(), "r");
  // The worker re-attaches with its previous session and carries on at step 4.
  AcquireStepEvent acquire;
  acquire.id = 9;
  acquire.request.set_session(7);
  acquire.request.set_generation(generation);
  acquire.request.set_step(4);
  auto actions = (*restored)->Handle(acquire, 1001);
  bool run = false;
  for (const auto& a : actions) {
    if (auto* r = std::get_if<Reply>(&a); r && r->id == 9) {
      run = std::get<gyre::v1::StepLease>(r->body).decision() == gyre::v1::STEP_DECISION_RUN;
    }
  }
  EXPECT_TRUE(run);
}

}  // namespace
}  // namespace gyre::coordinator
