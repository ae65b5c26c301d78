// A checkpoint write that fails on the worker's disk reaches the user: one real Worker (CPU, one
// rank) trains against a real coordinator (CoreLoop + gRPC server) through a FaultInjectionEnv
// that fails one file operation of the first checkpoint (step 2). The coordinator's
// RunStatus must count the failure and name the step and the file, and the later checkpoints
// (written fine) must still be recorded, never the failed one.
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

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

constexpr char kToken[] = "checkpoint-failure-token";
constexpr uint32_t kVocab = 256;

TEST(CheckpointFailureTest, FailedWriteIsReportedAndNeverRecorded) {
  const std::string root = testing::FreshTestDir("checkpoint_failure");
  ASSERT_NO_FATAL_FAILURE(testing::WriteSyntheticIndex(root + "/index", kVocab));
  const std::string run_dir = root + "/run";
  std::filesystem::create_directories(run_dir);

  const gyre::v1::RunConfig config = testing::TinyClusterRunConfig("ckfail", root + "/index", 7);

  std::unique_ptr<coordinator::Journal> journal = coordinator::NewMemJournal();
  coordinator::GlooRendezvous rendezvous("coordinator", config.name());
  coordinator::CoreLoop::Options loop_options;
  loop_options.config = config;
  loop_options.journal = journal.get();
  loop_options.rendezvous = &rendezvous;
  auto loop = coordinator::CoreLoop::Start(loop_options);
  ASSERT_TRUE(loop.ok()) << loop.status();
  coordinator::ServerOptions server_options;
  server_options.token = kToken;
  auto server = coordinator::CoordinatorServer::Start(loop->get(), server_options);
  ASSERT_TRUE(server.ok()) << server.status();

  // The worker's disk: one mutation of the first checkpoint fails (the fourth: creating step-2's
  // first tensor file, after the directories are made). Later writes succeed.
  FaultInjectionEnv env(Env::Default());
  env.FailNthMutation(4);
  ClusterClientOptions client_options;
  client_options.address = "127.0.0.1:" + std::to_string((*server)->port());
  client_options.token = kToken;
  ClusterClient client(client_options, Clock::Real());
  WorkerOptions worker_options;
  worker_options.run_dir = run_dir;
  worker_options.log_steps = false;
  absl::Status ran;
  {
    Worker worker(&client, &env, Clock::Real(), worker_options);
    ran = worker.Run();
    EXPECT_EQ(worker.applied_steps(), 7u);
  }
  EXPECT_TRUE(ran.ok()) << ran;

  gyre::v1::RunStatus status = (*loop)->Status();
  (*loop)->Stop();
  server->reset();
  EXPECT_EQ(status.committed_steps(), 7u);
  EXPECT_EQ(status.checkpoint_failures(), 1u) << status.DebugString();
  // "step 2: <op> <run_dir>/checkpoints/step-2...: injected I/O error"
  EXPECT_EQ(status.last_checkpoint_error().rfind("step 2: ", 0), 0u) << status.last_checkpoint_error();
  EXPECT_NE(status.last_checkpoint_error().find("step-2"), std::string::npos) << status.last_checkpoint_error();
  EXPECT_NE(status.last_checkpoint_error().find("injected I/O error"), std::string::npos)
      << status.last_checkpoint_error();
  // The writes after it went through and were recorded (the final one at the STOP boundary).
  EXPECT_EQ(status.last_checkpoint_step(), 7u) << status.DebugString();
  EXPECT_EQ(status.last_checkpoint(), "checkpoints/step-7");
  absl::StatusOr<coordinator::JournalContents> contents = journal->Load();
  ASSERT_TRUE(contents.ok()) << contents.status();
  std::vector<uint64_t> recorded;
  for (const gyre::v1::CheckpointRecord& record : contents->checkpoints) recorded.push_back(record.step());
  EXPECT_EQ(recorded, (std::vector<uint64_t>{4, 6, 7}));
}

}  // namespace
}  // namespace gyre
