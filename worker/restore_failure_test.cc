// The worker's streaming restore against a real coordinator (CoreLoop + gRPC server), with a
// checkpoint whose LAST bytes are corrupt, so the restore fails after most of the file was
// already copied into the replica (small restore chunks):
//   phase 1: one worker trains with a checkpoint every 2 steps; the coordinator and the worker
//            stop once step 6's checkpoint is recorded (a crash of everything: no state holder).
//   phase 2: a coordinator resumed from the journal and a fresh worker. The newest checkpoint's
//            file has a flipped byte near its end: the worker reports it (the error names the
//            file), the coordinator marks it bad and names the previous one, the worker restores
//            that one and the run finishes. The half-restored replica never produced a step: every
//            redone step has exactly the loss and gradient norm of phase 1, and the ledger is exact.
#include <chrono>
#include <functional>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "base/env.h"
#include "base/fault_injection_env.h"
#include "coordinator/core_loop.h"
#include "coordinator/journal.h"
#include "coordinator/services.h"
#include "gtest/gtest.h"
#include "worker/worker.h"
#include "worker/worker_test_util.h"

namespace gyre {
namespace {

constexpr char kToken[] = "restore-failure-token";
constexpr uint32_t kVocab = 256;

// The in-memory journal, keeping every checkpoint record marked bad (a later valid write of the
// same step replaces the record in the journal itself).
class RecordingJournal final : public coordinator::Journal {
 public:
  absl::Status Write(const coordinator::JournalBatch& batch) override {
    for (const gyre::v1::CheckpointRecord& r : batch.checkpoints) {
      if (!r.invalid_reason().empty()) {
        std::lock_guard<std::mutex> lock(mu_);
        marked_bad_.push_back(r);
      }
    }
    return journal_->Write(batch);
  }
  absl::StatusOr<coordinator::JournalContents> Load() override { return journal_->Load(); }
  std::vector<gyre::v1::CheckpointRecord> marked_bad() {
    std::lock_guard<std::mutex> lock(mu_);
    return marked_bad_;
  }

 private:
  std::unique_ptr<coordinator::Journal> journal_ = coordinator::NewMemJournal();
  std::mutex mu_;
  std::vector<gyre::v1::CheckpointRecord> marked_bad_;
};

struct Coordinator {
  std::unique_ptr<coordinator::CoreLoop> loop;
  std::unique_ptr<coordinator::CoordinatorServer> server;
  void Stop() {
    loop->Stop();
    server.reset();
  }
};

Coordinator StartCoordinator(const gyre::v1::RunConfig& config, coordinator::Journal* journal,
                             coordinator::RendezvousProvider* rendezvous) {
  Coordinator c;
  coordinator::CoreLoop::Options loop_options;
  loop_options.config = config;
  loop_options.journal = journal;
  loop_options.rendezvous = rendezvous;
  auto loop = coordinator::CoreLoop::Start(loop_options);
  EXPECT_TRUE(loop.ok()) << loop.status();
  if (!loop.ok()) return c;
  c.loop = std::move(*loop);
  coordinator::ServerOptions server_options;
  server_options.token = kToken;
  auto server = coordinator::CoordinatorServer::Start(c.loop.get(), server_options);
  EXPECT_TRUE(server.ok()) << server.status();
  if (server.ok()) c.server = std::move(*server);
  return c;
}

ClusterClientOptions ClientOptions(const Coordinator& c, int64_t retry_budget_ms) {
  ClusterClientOptions o;
  o.address = "127.0.0.1:" + std::to_string(c.server->port());
  o.token = kToken;
  o.retry_budget_ms = retry_budget_ms;
  return o;
}

// What is done to the last file of a corrupt checkpoint, and what the worker's error must say.
enum class Damage { kFlipNearEnd, kTruncate, kRemove };

// corrupt_all: every checkpoint is damaged, so the run falls back to step 0 (the worker rebuilds
// its half-restored replica from the seed) instead of the previous checkpoint.
void RunRestoreAfterCorruption(Damage damage, bool corrupt_all) {
  const std::string root = testing::FreshTestDir(absl::StrCat("restore_failure_", static_cast<int>(damage), corrupt_all ? "_all" : ""));
  ASSERT_NO_FATAL_FAILURE(testing::WriteSyntheticIndex(root + "/index", kVocab));
  const std::string run_dir = root + "/run";
  std::filesystem::create_directories(run_dir);
  const gyre::v1::RunConfig config = testing::TinyClusterRunConfig("restorefail", root + "/index", 100000);
  auto journal = std::make_unique<RecordingJournal>();
  coordinator::GlooRendezvous rendezvous("coordinator", config.name());
  FaultInjectionEnv env(Env::Default());
  WorkerOptions worker_options;
  worker_options.run_dir = run_dir;
  worker_options.log_steps = false;
  worker_options.restore.chunk_bytes = 4096;  // the corrupt end is found after the rest was copied in

  // Runs a coordinator on the journal and one worker until `done(status)`, then stops both (the
  // worker gives up on the vanished coordinator: a crash of everything). The run never ends by
  // itself (max_steps is far away).
  auto run_until = [&](const std::function<bool(const gyre::v1::RunStatus&)>& done) {
    Coordinator c = StartCoordinator(config, journal.get(), &rendezvous);
    ASSERT_NE(c.server, nullptr);
    ClusterClient client(ClientOptions(c, /*retry_budget_ms=*/300), Clock::Real());
    Worker worker(&client, &env, Clock::Real(), worker_options);
    std::thread run([&] { worker.Run().IgnoreError(); });
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
    bool reached = false;
    while (!(reached = done(c.loop->Status())) && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    c.Stop();
    run.join();
    EXPECT_TRUE(reached) << "timed out";
  };

  // Phase 1: train until step 6's checkpoint is recorded.
  ASSERT_NO_FATAL_FAILURE(run_until([](const gyre::v1::RunStatus& s) { return s.last_checkpoint_step() >= 6; }));
  absl::StatusOr<coordinator::JournalContents> before = journal->Load();
  ASSERT_TRUE(before.ok()) << before.status();
  ASSERT_GE(before->checkpoints.size(), 2u);
  const gyre::v1::CheckpointRecord newest = before->checkpoints.back();
  const gyre::v1::CheckpointRecord previous = before->checkpoints[before->checkpoints.size() - 2];
  ASSERT_GE(newest.step(), 6u);
  ASSERT_GE(before->steps.size(), newest.step());
  std::map<uint64_t, gyre::v1::StepMetrics> first;  // phase 1's metrics by step
  for (const gyre::v1::CommittedStep& s : before->steps) first[s.step()] = s.metrics();

  // The newest checkpoint's last file (or every checkpoint's), corrupt 16 bytes before its end.
  std::map<uint64_t, std::string> corrupt;  // step -> the file
  for (const gyre::v1::CheckpointRecord& r : before->checkpoints) {
    if (!corrupt_all && r.step() != newest.step()) continue;
    const std::string dir = run_dir + "/" + r.path();
    absl::StatusOr<gyre::v1::CheckpointManifest> manifest = ReadCheckpointManifest(&env, dir);
    ASSERT_TRUE(manifest.ok()) << manifest.status();
    const gyre::v1::FileEntry& last = manifest->files(manifest->files_size() - 1);
    ASSERT_GT(last.bytes(), 4 * worker_options.restore.chunk_bytes);
    corrupt[r.step()] = JoinPath(dir, last.path());
    const std::string& path = corrupt[r.step()];
    switch (damage) {
      case Damage::kFlipNearEnd:  // found after the rest of the file was streamed into the replica
        ASSERT_TRUE(env.FlipByte(path, last.bytes() - 16).ok());
        break;
      case Damage::kTruncate: {  // found before anything is written
        absl::StatusOr<std::string> bytes = env.ReadFile(path);
        ASSERT_TRUE(bytes.ok());
        ASSERT_TRUE(WriteFileAtomically(&env, path, bytes->substr(0, bytes->size() - 1)).ok());
        break;
      }
      case Damage::kRemove:
        ASSERT_TRUE(env.RemoveFile(path).ok());
        break;
    }
  }
  const uint64_t restart_step = corrupt_all ? 0 : previous.step();

  // Phase 2: everything restarts; the run must go through the bad checkpoint(s) to the previous
  // one (or step 0) and past every step phase 1 had committed.
  const uint64_t end = before->steps.size() + 2;
  ASSERT_NO_FATAL_FAILURE(run_until([&](const gyre::v1::RunStatus& s) { return s.committed_steps() >= end; }));

  absl::StatusOr<coordinator::JournalContents> after = journal->Load();
  ASSERT_TRUE(after.ok()) << after.status();
  // The bad checkpoints (only they) were marked with the worker's error, which names the file.
  const std::vector<gyre::v1::CheckpointRecord> bad = journal->marked_bad();
  ASSERT_EQ(bad.size(), corrupt.size());
  for (const gyre::v1::CheckpointRecord& r : bad) {
    ASSERT_EQ(corrupt.count(r.step()), 1u) << "step " << r.step() << " marked bad";
    EXPECT_NE(r.invalid_reason().find(corrupt[r.step()]), std::string::npos) << r.invalid_reason();
    const char* why = damage == Damage::kFlipNearEnd ? "fails its checksum"
                      : damage == Damage::kTruncate  ? "manifest says"
                                                     : "No such file";
    EXPECT_NE(r.invalid_reason().find(why), std::string::npos) << r.invalid_reason();
  }
  // Exact ledger, and every step phase 1 had computed was redone from the previous checkpoint with
  // the same loss and gradient norm: the state came back exactly, the half-restored one was never
  // used.
  ASSERT_GE(after->steps.size(), end);
  int redone = 0;
  for (size_t i = 0; i < after->steps.size(); ++i) {
    const gyre::v1::CommittedStep& s = after->steps[i];
    EXPECT_EQ(s.step(), i);
    auto it = first.find(s.step());
    if (s.step() < restart_step || it == first.end()) continue;
    ++redone;
    EXPECT_EQ(s.metrics().loss(), it->second.loss()) << "step " << s.step();
    EXPECT_EQ(s.metrics().grad_norm(), it->second.grad_norm()) << "step " << s.step();
    EXPECT_GT(s.generation(), before->steps.back().generation()) << "step " << s.step() << " was not redone";
  }
  EXPECT_GE(redone, static_cast<int>(newest.step() - restart_step));
  // The restore generations: one from the bad checkpoint, then one from the previous.
  std::vector<std::string> reasons;
  for (const gyre::v1::GenerationRecord& g : after->generations) {
    if (g.generation().id() > before->generations.back().generation().id()) reasons.push_back(g.reason());
  }
  ASSERT_GE(reasons.size(), corrupt.size() + 1);
  EXPECT_EQ(reasons[0], "restore");
}

TEST(RestoreFailureTest, ACheckpointCorruptAtItsEndIsReportedAndThePreviousOneRestoredExactly) {
  RunRestoreAfterCorruption(Damage::kFlipNearEnd, /*corrupt_all=*/false);
}

TEST(RestoreFailureTest, WithEveryCheckpointCorruptTheRunRestartsFromStepZeroExactly) {
  RunRestoreAfterCorruption(Damage::kFlipNearEnd, /*corrupt_all=*/true);
}

TEST(RestoreFailureTest, AShortFileIsReportedAndThePreviousCheckpointRestoredExactly) {
  RunRestoreAfterCorruption(Damage::kTruncate, /*corrupt_all=*/false);
}

TEST(RestoreFailureTest, AMissingFileIsReportedAndThePreviousCheckpointRestoredExactly) {
  RunRestoreAfterCorruption(Damage::kRemove, /*corrupt_all=*/false);
}

}  // namespace
}  // namespace gyre
