// The worker's refusals around a partially restored replica (worker.cc JoinGeneration, the step
// loop), driven lease by lease. The real coordinator never sends these leases after a failed
// restore (it trusts no claim of state then, and names the previous checkpoint), so a scripted
// one plays it here: a gyre.v1.Cluster gRPC service that answers AcquireStep from a fixed list
// and records what the worker reports; the worker, its client, replica, Gloo collective and
// checkpoint files are the real ones.
//
// Every test first sends a RECONFIGURE that restores a checkpoint whose last file has a flipped
// byte: the restore streams (one reader, files in order, 4 KB chunks) every other file into the
// replica before that checksum fails, which leaves it partially restored. Then:
//   - CHECKPOINT, RUN and a STOP asking for a final checkpoint: no step is computed or
//     completed, nothing is written or reported as a checkpoint;
//   - a generation that keeps its parameters, or names it the state source for a member that
//     needs state: the worker exits (Internal) instead, and the member receives nothing;
//   - a good checkpoint, or state received from a member, clears it: the next steps' losses are
//     bit-identical to a worker that restored the good checkpoint directly, a CHECKPOINT writes
//     exactly the good state, and a generation keeping the parameters is accepted.
// Also: the run config's checkpoint.restore_* settings reach the worker's restore, and an invalid
// one stops the worker naming the field.
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <filesystem>
#include <functional>
#include <optional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "base/env.h"
#include "base/fault_injection_env.h"
#include "gtest/gtest.h"
#include "worker/checkpoint.h"
#include "worker/gloo_collective.h"
#include "worker/rendezvous_store.h"
#include "worker/replica.h"
#include "worker/worker.h"
#include "worker/worker_test_util.h"

namespace gyre {
namespace {

constexpr uint32_t kVocab = 256;
constexpr uint64_t kSession = 7;      // the worker's session (the scripted coordinator's only one)
constexpr uint64_t kPeerSession = 99; // a member played by the test itself
constexpr uint64_t kSeqLen = 16;      // TinyClusterRunConfig
constexpr uint64_t kBatch = 2;

// Answers AcquireStep from `script`, then STOP; everything else is recorded and acknowledged
// (CompleteStep with COMMIT).
class ScriptedCoordinator final : public gyre::v1::Cluster::Service {
 public:
  ScriptedCoordinator(gyre::v1::RunConfig config, std::vector<gyre::v1::StepLease> script)
      : config_(std::move(config)), script_(std::move(script)) {}

  grpc::Status Register(grpc::ServerContext*, const gyre::v1::RegisterRequest*,
                        gyre::v1::RegisterResponse* response) override {
    response->set_session(kSession);
    *response->mutable_config() = config_;
    response->set_heartbeat_interval_ms(100);
    return grpc::Status::OK;
  }
  grpc::Status Heartbeat(grpc::ServerContext*, const gyre::v1::HeartbeatRequest*,
                         gyre::v1::HeartbeatResponse* response) override {
    response->set_known(true);
    return grpc::Status::OK;
  }
  grpc::Status AcquireStep(grpc::ServerContext*, const gyre::v1::AcquireStepRequest*,
                           gyre::v1::StepLease* lease) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (leases_given_ < script_.size()) {
      *lease = script_[leases_given_++];
    } else {
      lease->set_decision(gyre::v1::STEP_DECISION_STOP);
    }
    return grpc::Status::OK;
  }
  grpc::Status CompleteStep(grpc::ServerContext*, const gyre::v1::CompleteStepRequest* request,
                            gyre::v1::CompleteStepResponse* response) override {
    std::lock_guard<std::mutex> lock(mu_);
    completed_.push_back(*request);
    response->set_verdict(gyre::v1::COMMIT_VERDICT_COMMIT);
    return grpc::Status::OK;
  }
  grpc::Status ReportCheckpoint(grpc::ServerContext*, const gyre::v1::ReportCheckpointRequest* request,
                                gyre::v1::ReportCheckpointResponse*) override {
    std::lock_guard<std::mutex> lock(mu_);
    checkpoints_.push_back(*request);
    return grpc::Status::OK;
  }
  grpc::Status ReportBadCheckpoint(grpc::ServerContext*, const gyre::v1::ReportBadCheckpointRequest* request,
                                   gyre::v1::ReportBadCheckpointResponse*) override {
    std::lock_guard<std::mutex> lock(mu_);
    bad_checkpoints_.push_back(*request);
    return grpc::Status::OK;
  }
  grpc::Status Leave(grpc::ServerContext*, const gyre::v1::LeaveRequest*, gyre::v1::LeaveResponse*) override {
    return grpc::Status::OK;
  }

  size_t leases_given() {
    std::lock_guard<std::mutex> lock(mu_);
    return leases_given_;
  }
  std::vector<gyre::v1::CompleteStepRequest> completed() {
    std::lock_guard<std::mutex> lock(mu_);
    return completed_;
  }
  std::vector<gyre::v1::ReportCheckpointRequest> checkpoints() {
    std::lock_guard<std::mutex> lock(mu_);
    return checkpoints_;
  }
  std::vector<gyre::v1::ReportBadCheckpointRequest> bad_checkpoints() {
    std::lock_guard<std::mutex> lock(mu_);
    return bad_checkpoints_;
  }

 private:
  const gyre::v1::RunConfig config_;
  const std::vector<gyre::v1::StepLease> script_;
  std::mutex mu_;
  size_t leases_given_ = 0;
  std::vector<gyre::v1::CompleteStepRequest> completed_;
  std::vector<gyre::v1::ReportCheckpointRequest> checkpoints_;
  std::vector<gyre::v1::ReportBadCheckpointRequest> bad_checkpoints_;
};

// What one worker run left behind.
struct WorkerRun {
  absl::Status status;
  std::optional<ModelReplica::RestoreStats> last_restore;
  size_t leases_given = 0;
  std::vector<gyre::v1::CompleteStepRequest> completed;
  std::vector<gyre::v1::ReportCheckpointRequest> checkpoints;
  std::vector<gyre::v1::ReportBadCheckpointRequest> bad_checkpoints;

  std::vector<double> Losses() const {
    std::vector<double> out;
    for (const auto& c : completed) out.push_back(c.metrics().loss());
    return out;
  }
};

class PartialRestoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = testing::FreshTestDir(::testing::UnitTest::GetInstance()->current_test_info()->name());
    ASSERT_NO_FATAL_FAILURE(testing::WriteSyntheticIndex(root_ + "/index", kVocab));
    run_dir_ = root_ + "/run";
    std::filesystem::create_directories(run_dir_);
    config_ = testing::TinyClusterRunConfig("partial", root_ + "/index", 100);

    // The checkpoints of a replica of the worker's own model: step 2 good, step 4 with the last
    // byte of its last file flipped. Several files each (64 KB apiece): the worker's one reader
    // streams them in order, so all the others reach the replica before the checksum fails.
    auto replica = ModelReplica::Create(config_);
    ASSERT_TRUE(replica.ok()) << replica.status();
    Train(replica->get(), 0, 2);
    ASSERT_NO_FATAL_FAILURE(WriteState(**replica, 2, kGood));
    Train(replica->get(), 2, 2);
    ASSERT_NO_FATAL_FAILURE(WriteState(**replica, 4, kBad));
    absl::StatusOr<gyre::v1::CheckpointManifest> manifest = ReadCheckpointManifest(&env_, Dir(kBad));
    ASSERT_TRUE(manifest.ok()) << manifest.status();
    ASSERT_GE(manifest->files_size(), 3);
    const gyre::v1::FileEntry& last = manifest->files(manifest->files_size() - 1);
    bad_file_ = JoinPath(Dir(kBad), last.path());
    absl::Status flipped = env_.FlipByte(bad_file_, last.bytes() - 1);
    ASSERT_TRUE(flipped.ok()) << flipped;
  }

  static void Train(ModelReplica* replica, uint64_t first_step, uint64_t steps) {
    testing::SingleRankCollective single;
    for (uint64_t t = first_step; t < first_step + steps; ++t) {
      ReplicaLoss l = replica->ComputeGradients(testing::RandomTokens(2, kSeqLen, kVocab, 900 + t), 2, kSeqLen, 32);
      ASSERT_TRUE(replica->ReduceGradients(&single, &l).ok());
      ASSERT_TRUE(replica->ApplyUpdate(t).ok());
    }
  }

  void WriteState(const ModelReplica& replica, uint64_t step, const std::string& relative) {
    SnapshotStaging staging(/*pinned=*/false);
    absl::StatusOr<std::vector<TensorSnapshot>> snapshot = replica.Snapshot(&staging);
    ASSERT_TRUE(snapshot.ok()) << snapshot.status();
    CheckpointState state;
    state.step = step;
    state.config = config_;
    state.tensors = *std::move(snapshot);
    ASSERT_TRUE(WriteCheckpointTo(&env_, Dir(relative), state, /*max_file_bytes=*/64 << 10).ok());
  }

  std::string Dir(const std::string& relative) const { return JoinPath(run_dir_, relative); }

  // A generation of `members` (session -> rank) on a directory rendezvous store. Generation ids
  // are unique within a test: the store keeps every generation's keys.
  gyre::v1::Generation Generation(uint64_t id, uint64_t start_step, const std::map<uint64_t, uint32_t>& members,
                                  std::vector<uint32_t> needs_state, uint32_t source = 0) const {
    gyre::v1::Generation g;
    g.set_id(id);
    g.set_start_step(start_step);
    std::vector<std::pair<uint32_t, uint64_t>> by_rank;
    for (const auto& [session, rank] : members) by_rank.emplace_back(rank, session);
    std::sort(by_rank.begin(), by_rank.end());
    for (const auto& [rank, session] : by_rank) {
      gyre::v1::Member* m = g.add_members();
      m->set_session(session);
      m->set_rank(rank);
    }
    g.mutable_rendezvous()->set_store_address("dir:" + Rendezvous());
    g.mutable_rendezvous()->set_store_prefix(absl::StrCat("g", id));
    for (uint32_t r : needs_state) g.add_needs_state(r);
    g.set_state_source_rank(source);
    return g;
  }
  std::string Rendezvous() const { return root_ + "/rendezvous"; }

  static gyre::v1::StepLease Reconfigure(gyre::v1::Generation g, const std::string& checkpoint_dir = "") {
    gyre::v1::StepLease lease;
    lease.set_decision(gyre::v1::STEP_DECISION_RECONFIGURE);
    lease.set_step(g.start_step());
    lease.set_checkpoint_dir(checkpoint_dir);
    *lease.mutable_generation() = std::move(g);
    return lease;
  }
  // RUN (or CHECKPOINT into `checkpoint_dir`) step `step` with the whole global batch on one rank.
  static gyre::v1::StepLease Step(uint64_t step, const std::string& checkpoint_dir = "") {
    gyre::v1::StepLease lease;
    lease.set_decision(checkpoint_dir.empty() ? gyre::v1::STEP_DECISION_RUN : gyre::v1::STEP_DECISION_CHECKPOINT);
    lease.set_step(step);
    lease.set_checkpoint_dir(checkpoint_dir);
    gyre::v1::SampleRange* samples = lease.mutable_samples();
    samples->set_begin(step * kBatch);
    samples->set_end((step + 1) * kBatch);
    samples->set_rank_begin(step * kBatch);
    samples->set_rank_end((step + 1) * kBatch);
    lease.mutable_schedule()->set_global_tokens(kBatch * kSeqLen);
    return lease;
  }
  static gyre::v1::StepLease Stop(const std::string& checkpoint_dir = "") {
    gyre::v1::StepLease lease;
    lease.set_decision(gyre::v1::STEP_DECISION_STOP);
    lease.set_checkpoint_dir(checkpoint_dir);
    return lease;
  }

  // Runs one worker against a scripted coordinator until it stops or fails. `during` runs on this
  // thread while the worker runs (a member played by the test).
  WorkerRun RunWorker(const std::vector<gyre::v1::StepLease>& script, const std::function<void()>& during = nullptr,
                      const gyre::v1::RunConfig* config = nullptr) {
    ScriptedCoordinator coordinator(config ? *config : config_, script);
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(&coordinator);
    std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
    WorkerRun out;
    EXPECT_NE(server, nullptr);
    if (server == nullptr) return out;
    ClusterClientOptions client_options;
    client_options.address = absl::StrCat("127.0.0.1:", port);
    client_options.token = "scripted";
    client_options.retry_budget_ms = 2000;
    ClusterClient client(client_options, Clock::Real());
    WorkerOptions options;
    options.run_dir = run_dir_;
    options.log_steps = false;
    options.broken_collective_wait_ms = 10;
    options.gloo.connect_timeout_ms = 20000;
    options.gloo.op_timeout_ms = 20000;
    options.restore.chunk_bytes = 4096;  // the corrupt end is found after the rest was copied in
    options.restore.reader_threads = 1;  // files in order: the corrupt one last
    {
      Worker worker(&client, &env_, Clock::Real(), options);
      std::thread run([&] { out.status = worker.Run(); });
      if (during) during();
      run.join();
      out.last_restore = worker.last_restore();
    }
    server->Shutdown();
    out.leases_given = coordinator.leases_given();
    out.completed = coordinator.completed();
    out.checkpoints = coordinator.checkpoints();
    out.bad_checkpoints = coordinator.bad_checkpoints();
    return out;
  }

  // The first lease of every test: restore the corrupt checkpoint (fails part-way, reported).
  gyre::v1::StepLease FailedRestore() const { return Reconfigure(Generation(1, 4, {{kSession, 0}}, {0}), kBad); }
  void ExpectTheFailedRestoreReported(const WorkerRun& run) {
    ASSERT_GE(run.bad_checkpoints.size(), 1u);
    EXPECT_EQ(run.bad_checkpoints[0].path(), kBad);
    EXPECT_NE(run.bad_checkpoints[0].error().find(bad_file_), std::string::npos) << run.bad_checkpoints[0].error();
    EXPECT_NE(run.bad_checkpoints[0].error().find("checksum"), std::string::npos) << run.bad_checkpoints[0].error();
  }

  // Steps 2 and 3 from the good checkpoint, restored directly: the losses every test that clears
  // the flag must reproduce bit for bit.
  std::vector<double> ReferenceLosses() {
    WorkerRun reference =
        RunWorker({Reconfigure(Generation(101, 2, {{kSession, 0}}, {0}), kGood), Step(2), Step(3), Stop()});
    EXPECT_TRUE(reference.status.ok()) << reference.status;
    EXPECT_EQ(reference.completed.size(), 2u);
    return reference.Losses();
  }

  static constexpr char kGood[] = "checkpoints/step-2";
  static constexpr char kBad[] = "checkpoints/step-4";
  std::string root_;
  std::string run_dir_;
  std::string bad_file_;
  gyre::v1::RunConfig config_;
  FaultInjectionEnv env_{Env::Default()};
};

TEST_F(PartialRestoreTest, AfterAFailedRestoreNoStepRunsAndNoCheckpointIsWritten) {
  WorkerRun run = RunWorker({FailedRestore(), Step(4, "checkpoints/refused-4"), Step(4), Step(5),
                             Stop("checkpoints/refused-final")});
  EXPECT_TRUE(run.status.ok()) << run.status;
  EXPECT_EQ(run.leases_given, 5u) << "every lease reached the worker";
  ASSERT_NO_FATAL_FAILURE(ExpectTheFailedRestoreReported(run));
  EXPECT_EQ(run.bad_checkpoints.size(), 1u);
  EXPECT_TRUE(run.completed.empty()) << "a step completed on a partially restored replica";
  EXPECT_TRUE(run.checkpoints.empty()) << "a checkpoint of a partially restored replica was reported";
  for (const char* dir : {"checkpoints/refused-4", "checkpoints/refused-4.tmp", "checkpoints/refused-final",
                          "checkpoints/refused-final.tmp"}) {
    EXPECT_FALSE(env_.Exists(Dir(dir))) << dir << " was written";
  }
}

TEST_F(PartialRestoreTest, AGenerationKeepingThePartiallyRestoredParametersMakesTheWorkerExit) {
  WorkerRun run = RunWorker({FailedRestore(), Reconfigure(Generation(2, 4, {{kSession, 0}}, {})), Step(4), Step(5)});
  ASSERT_TRUE(absl::IsInternal(run.status)) << run.status;
  EXPECT_NE(run.status.message().find("keeps this worker's parameters"), std::string_view::npos) << run.status;
  EXPECT_NE(run.status.message().find("partially restored"), std::string_view::npos) << run.status;
  ASSERT_NO_FATAL_FAILURE(ExpectTheFailedRestoreReported(run));
  EXPECT_EQ(run.leases_given, 2u) << "the worker asked for a lease after refusing the generation";
  EXPECT_TRUE(run.completed.empty());
}

TEST_F(PartialRestoreTest, APartiallyRestoredWorkerIsNeverTheStateSource) {
  // Generation 2: this worker rank 0 and the state source, the test's member rank 1 needs state.
  auto receiver = ModelReplica::Create(testing::TinyReplicaConfig(/*seed=*/5));
  ASSERT_TRUE(receiver.ok());
  const uint64_t before = (*receiver)->ParameterFingerprint();
  absl::Status received = absl::UnknownError("the member never connected");
  WorkerRun run = RunWorker(
      {FailedRestore(), Reconfigure(Generation(2, 4, {{kSession, 0}, {kPeerSession, 1}}, {1}, /*source=*/0)), Step(4)},
      [&] {
        DirectoryStore store(Env::Default(), Clock::Real(), Rendezvous());
        GlooOptions gloo;
        gloo.connect_timeout_ms = 20000;
        gloo.op_timeout_ms = 20000;  // the worker aborting the communicator fails the receive at once
        absl::StatusOr<std::unique_ptr<GlooCollective>> collective = GlooCollective::Connect(&store, 2, 1, 2, gloo, "g2");
        if (!collective.ok()) {
          received = collective.status();
          return;
        }
        received = (*receiver)->BroadcastState(collective->get(), /*root=*/0);
      });
  ASSERT_TRUE(absl::IsInternal(run.status)) << run.status;
  EXPECT_NE(run.status.message().find("names this worker the state source"), std::string_view::npos) << run.status;
  ASSERT_NO_FATAL_FAILURE(ExpectTheFailedRestoreReported(run));
  EXPECT_EQ(run.leases_given, 2u);
  EXPECT_TRUE(run.completed.empty());
  EXPECT_FALSE(received.ok()) << "the member received the partially restored state";
  EXPECT_EQ((*receiver)->ParameterFingerprint(), before) << "bytes of the partially restored state reached the member";
}

TEST_F(PartialRestoreTest, AGoodRestoreAfterAFailedOneClearsIt) {
  const std::vector<double> reference = ReferenceLosses();
  ASSERT_EQ(reference.size(), 2u);
  WorkerRun run = RunWorker({FailedRestore(), Reconfigure(Generation(2, 2, {{kSession, 0}}, {0}), kGood),
                             Step(2, "checkpoints/again-2"), Step(3), Stop()});
  ASSERT_TRUE(run.status.ok()) << run.status;
  ASSERT_NO_FATAL_FAILURE(ExpectTheFailedRestoreReported(run));
  EXPECT_EQ(run.Losses(), reference) << "the steps after the good restore differ from a direct restore";
  // The CHECKPOINT of step 2 went out, and holds exactly the good checkpoint's state.
  ASSERT_EQ(run.checkpoints.size(), 1u);
  EXPECT_EQ(run.checkpoints[0].step(), 2u);
  EXPECT_EQ(run.checkpoints[0].path(), "checkpoints/again-2");
  EXPECT_TRUE(run.checkpoints[0].error().empty()) << run.checkpoints[0].error();
  absl::StatusOr<CheckpointState> written = ReadCheckpoint(&env_, Dir("checkpoints/again-2"));
  absl::StatusOr<CheckpointState> good = ReadCheckpoint(&env_, Dir(kGood));
  ASSERT_TRUE(written.ok()) << written.status();
  ASSERT_TRUE(good.ok()) << good.status();
  ASSERT_EQ(written->tensors.size(), good->tensors.size());
  for (size_t i = 0; i < good->tensors.size(); ++i) {
    EXPECT_EQ(written->tensors[i].name, good->tensors[i].name);
    EXPECT_TRUE(written->tensors[i].data() == good->tensors[i].data()) << good->tensors[i].name << " differs";
  }
}

TEST_F(PartialRestoreTest, StateReceivedFromAMemberClearsIt) {
  const std::vector<double> reference = ReferenceLosses();
  ASSERT_EQ(reference.size(), 2u);
  // The test's member holds the good checkpoint's state and sends it (generation 2, source rank 0);
  // generation 3 then keeps the worker's parameters, which it refuses while partially restored.
  auto source = ModelReplica::Create(config_);
  ASSERT_TRUE(source.ok());
  ASSERT_TRUE((*source)->RestoreFrom(&env_, Clock::Real(), Dir(kGood), 2).ok());
  absl::Status sent = absl::UnknownError("the member never connected");
  WorkerRun run = RunWorker({FailedRestore(),
                             Reconfigure(Generation(2, 2, {{kPeerSession, 0}, {kSession, 1}}, {1}, /*source=*/0)),
                             Reconfigure(Generation(3, 2, {{kSession, 0}}, {})), Step(2), Step(3), Stop()},
                            [&] {
                              DirectoryStore store(Env::Default(), Clock::Real(), Rendezvous());
                              GlooOptions gloo;
                              absl::StatusOr<std::unique_ptr<GlooCollective>> collective =
                                  GlooCollective::Connect(&store, 2, 0, 2, gloo, "g2");
                              if (!collective.ok()) {
                                sent = collective.status();
                                return;
                              }
                              sent = (*source)->BroadcastState(collective->get(), /*root=*/0);
                            });
  ASSERT_TRUE(sent.ok()) << sent;
  ASSERT_TRUE(run.status.ok()) << run.status;
  ASSERT_NO_FATAL_FAILURE(ExpectTheFailedRestoreReported(run));
  EXPECT_EQ(run.leases_given, 6u);
  EXPECT_EQ(run.Losses(), reference) << "the steps after the received state differ from a direct restore";
}

TEST_F(PartialRestoreTest, TheRunConfigSetsTheRestoreReaders) {
  gyre::v1::RunConfig config = config_;
  config.mutable_checkpoint()->set_restore_reader_threads(2);
  config.mutable_checkpoint()->set_restore_buffers_per_reader(3);
  config.mutable_checkpoint()->set_restore_chunk_bytes(uint64_t{1} << 20);
  WorkerRun run = RunWorker({Reconfigure(Generation(1, 2, {{kSession, 0}}, {0}), kGood), Stop()}, nullptr, &config);
  ASSERT_TRUE(run.status.ok()) << run.status;
  ASSERT_TRUE(run.last_restore.has_value());
  EXPECT_EQ(run.last_restore->stream.reader_threads, 2);  // the checkpoint has more files than that
  EXPECT_EQ(run.last_restore->stream.buffers, 6);
  EXPECT_EQ(run.last_restore->stream.chunk_bytes, size_t{1} << 20);

  config.mutable_checkpoint()->set_restore_chunk_bytes(4096);  // below 1 MiB
  run = RunWorker({Reconfigure(Generation(2, 2, {{kSession, 0}}, {0}), kGood), Stop()}, nullptr, &config);
  ASSERT_TRUE(absl::IsInvalidArgument(run.status)) << run.status;
  EXPECT_NE(run.status.message().find("checkpoint.restore_chunk_bytes: 4096"), std::string_view::npos) << run.status;
  EXPECT_EQ(run.leases_given, 0u);
}

}  // namespace
}  // namespace gyre
