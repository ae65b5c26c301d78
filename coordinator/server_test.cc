// The coordinator's gRPC front end on 127.0.0.1:0: authentication, precise errors, and one
// worker training a step through the real CoreLoop and core.
#include <chrono>
#include <memory>

#include "coordinator/services.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "gtest/gtest.h"

namespace gyre::coordinator {
namespace {

constexpr char kToken[] = "s3cret-token";

class ServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    journal_ = NewMemJournal();
    CoreLoop::Options options;
    options.config.set_name("server-test");
    options.config.mutable_data()->set_global_batch(6);
    options.config.mutable_train()->set_max_steps(3);
    options.config.mutable_cluster()->set_desired_workers(1);
    options.journal = journal_.get();
    options.rendezvous = &rendezvous_;
    auto loop = CoreLoop::Start(options);
    ASSERT_TRUE(loop.ok()) << loop.status();
    loop_ = std::move(*loop);
    ServerOptions server_options;
    server_options.token = kToken;
    auto server = CoordinatorServer::Start(loop_.get(), server_options);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(*server);
    auto channel = grpc::CreateChannel("127.0.0.1:" + std::to_string(server_->port()),
                                       grpc::InsecureChannelCredentials());
    control_ = gyre::v1::Control::NewStub(channel);
    cluster_ = gyre::v1::Cluster::NewStub(channel);
  }
  void TearDown() override {
    if (loop_) loop_->Stop();
    server_.reset();
    loop_.reset();
  }

  // Every client call sets a deadline.
  std::unique_ptr<grpc::ClientContext> Context(const std::string& token = kToken) {
    auto ctx = std::make_unique<grpc::ClientContext>();
    ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    if (!token.empty()) ctx->AddMetadata("authorization", "Bearer " + token);
    return ctx;
  }

  GlooRendezvous rendezvous_{"127.0.0.1:29500", "server-test"};
  std::unique_ptr<Journal> journal_;
  std::unique_ptr<CoreLoop> loop_;
  std::unique_ptr<CoordinatorServer> server_;
  std::unique_ptr<gyre::v1::Control::Stub> control_;
  std::unique_ptr<gyre::v1::Cluster::Stub> cluster_;
};

TEST_F(ServerTest, MissingOrBadTokenIsUnauthenticated) {
  gyre::v1::RunStatus status;
  auto none = Context("");
  EXPECT_EQ(control_->GetStatus(none.get(), {}, &status).error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
  auto wrong = Context("s3cret-tokeN");
  EXPECT_EQ(control_->GetStatus(wrong.get(), {}, &status).error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
  auto longer = Context(std::string(kToken) + "x");
  EXPECT_EQ(control_->Pause(longer.get(), {}, &status).error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
  gyre::v1::RegisterRequest reg;
  reg.mutable_worker()->set_host("h");
  gyre::v1::RegisterResponse registered;
  auto worker_none = Context("");
  EXPECT_EQ(cluster_->Register(worker_none.get(), reg, &registered).error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
  auto good = Context();
  EXPECT_TRUE(control_->GetStatus(good.get(), {}, &status).ok());
  EXPECT_EQ(status.run_name(), "server-test");
}

TEST_F(ServerTest, ImpossibleRequestsGetPreciseErrors) {
  gyre::v1::RunStatus status;
  gyre::v1::ScaleRequest zero;
  auto c1 = Context();
  grpc::Status s = control_->Scale(c1.get(), zero, &status);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
  gyre::v1::DrainRequest drain;
  drain.set_session(0x1234);
  auto c2 = Context();
  s = control_->Drain(c2.get(), drain, &status);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND) << s.error_message();
  auto c3 = Context();
  ASSERT_TRUE(control_->Stop(c3.get(), {}, &status).ok());
  auto c4 = Context();
  s = control_->Resume(c4.get(), {}, &status);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << s.error_message();
  gyre::v1::AcquireStepRequest unknown;
  unknown.set_session(99);
  gyre::v1::StepLease lease;
  auto c5 = Context();
  s = cluster_->AcquireStep(c5.get(), unknown, &lease);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND) << s.error_message();
}

TEST_F(ServerTest, WatchMetricsNeedsTheToken) {
  auto ctx = Context("wrong");
  auto reader = control_->WatchMetrics(ctx.get(), gyre::v1::WatchMetricsRequest());
  gyre::v1::MetricsUpdate update;
  EXPECT_FALSE(reader->Read(&update));
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::UNAUTHENTICATED);
}

TEST_F(ServerTest, OneWorkerTrainsToMaxSteps) {
  gyre::v1::RegisterRequest reg;
  reg.mutable_worker()->set_host("localhost");
  reg.mutable_worker()->set_pid(42);
  gyre::v1::RegisterResponse registered;
  auto c = Context();
  ASSERT_TRUE(cluster_->Register(c.get(), reg, &registered).ok());
  EXPECT_NE(registered.session(), 0u);
  uint64_t generation = 0;
  for (uint64_t t = 0; t < 3; ++t) {
    gyre::v1::AcquireStepRequest acquire;
    acquire.set_session(registered.session());
    acquire.set_generation(generation);
    acquire.set_step(t);
    gyre::v1::StepLease lease;
    auto ca = Context();
    ASSERT_TRUE(cluster_->AcquireStep(ca.get(), acquire, &lease).ok());
    if (lease.decision() == gyre::v1::STEP_DECISION_RECONFIGURE) {
      generation = lease.generation().id();
      acquire.set_generation(generation);
      auto cb = Context();
      ASSERT_TRUE(cluster_->AcquireStep(cb.get(), acquire, &lease).ok());
    }
    ASSERT_EQ(lease.decision(), gyre::v1::STEP_DECISION_RUN) << t;
    EXPECT_EQ(lease.samples().begin(), t * 6);
    EXPECT_EQ(lease.samples().rank_end(), t * 6 + 6);
    gyre::v1::CompleteStepRequest complete;
    complete.set_session(registered.session());
    complete.set_generation(generation);
    complete.set_step(t);
    gyre::v1::CompleteStepResponse verdict;
    auto cc = Context();
    ASSERT_TRUE(cluster_->CompleteStep(cc.get(), complete, &verdict).ok());
    EXPECT_EQ(verdict.verdict(), gyre::v1::COMMIT_VERDICT_COMMIT);
  }
  gyre::v1::RunStatus status;
  auto cs = Context();
  ASSERT_TRUE(control_->GetStatus(cs.get(), {}, &status).ok());
  EXPECT_EQ(status.committed_steps(), 3u);
  EXPECT_EQ(status.state(), gyre::v1::RUN_STATE_FINISHED);
  auto contents = journal_->Load();
  ASSERT_TRUE(contents.ok());
  EXPECT_EQ(contents->steps.size(), 3u);

  // The metrics of steps 1 and 2, replayed to a watcher that joins late.
  auto watch = Context();
  gyre::v1::WatchMetricsRequest since;
  since.set_since_step(1);
  auto reader = control_->WatchMetrics(watch.get(), since);
  gyre::v1::MetricsUpdate update;
  ASSERT_TRUE(reader->Read(&update));
  EXPECT_EQ(update.metrics().step(), 1u);
  ASSERT_TRUE(reader->Read(&update));
  EXPECT_EQ(update.metrics().step(), 2u);
  EXPECT_EQ(update.status().committed_steps(), 3u);
  watch->TryCancel();
  while (reader->Read(&update)) {
  }
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
}

}  // namespace
}  // namespace gyre::coordinator
