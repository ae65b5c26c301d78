// The client against a scripted in-test Control server (a test double of the coordinator's
// service: it checks the token the way the real one must and answers canned state).
#include "cli/control_client.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>

#include "base/run_dir.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"

namespace gyre::cli {
namespace {

constexpr char kToken[] = "0123456789abcdef";

class ScriptedControl final : public gyre::v1::Control::Service {
 public:
  grpc::Status Check(grpc::ServerContext* ctx) {
    auto it = ctx->client_metadata().find("authorization");
    if (it == ctx->client_metadata().end()) return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "missing token");
    if (std::string(it->second.data(), it->second.size()) != std::string("Bearer ") + kToken) {
      return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "wrong token");
    }
    return grpc::Status::OK;
  }
  grpc::Status GetStatus(grpc::ServerContext* ctx, const gyre::v1::GetStatusRequest*, gyre::v1::RunStatus* out) override {
    if (auto s = Check(ctx); !s.ok()) return s;
    out->set_run_name("demo");
    out->set_committed_steps(42);
    return grpc::Status::OK;
  }
  grpc::Status Scale(grpc::ServerContext* ctx, const gyre::v1::ScaleRequest* req, gyre::v1::RunStatus* out) override {
    if (auto s = Check(ctx); !s.ok()) return s;
    if (req->target() == 0) return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "scale target must be >= 1");
    out->set_desired_workers(req->target());
    return grpc::Status::OK;
  }
  grpc::Status ListWorkers(grpc::ServerContext* ctx, const gyre::v1::ListWorkersRequest*,
                           gyre::v1::ListWorkersResponse* out) override {
    if (auto s = Check(ctx); !s.ok()) return s;
    for (int i = 0; i < 2; ++i) {
      auto* w = out->add_workers();
      w->set_session(0xabc0 + i);
      w->mutable_worker()->set_host("node" + std::to_string(i));
      w->mutable_worker()->set_pid(100 + i);
    }
    return grpc::Status::OK;
  }
  grpc::Status Drain(grpc::ServerContext* ctx, const gyre::v1::DrainRequest* req, gyre::v1::RunStatus* out) override {
    if (auto s = Check(ctx); !s.ok()) return s;
    if (req->session() != 0xabc1) return grpc::Status(grpc::StatusCode::NOT_FOUND, "unknown worker");
    drained = req->session();
    return grpc::Status::OK;
  }
  grpc::Status WatchMetrics(grpc::ServerContext* ctx, const gyre::v1::WatchMetricsRequest* req,
                            grpc::ServerWriter<gyre::v1::MetricsUpdate>* writer) override {
    if (auto s = Check(ctx); !s.ok()) return s;
    for (uint64_t step = req->since_step(); step < req->since_step() + 3; ++step) {
      gyre::v1::MetricsUpdate u;
      u.mutable_metrics()->set_step(step);
      writer->Write(u);
    }
    return grpc::Status::OK;
  }
  uint64_t drained = 0;
};

class ControlClientTest : public ::testing::Test {
 protected:
  void SetUp() override {
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port_);
    builder.RegisterService(&service_);
    server_ = builder.BuildAndStart();
    ASSERT_NE(port_, 0);
    const char* tmp = std::getenv("TEST_TMPDIR");
    run_dir_ = std::string(tmp ? tmp : "/tmp") + "/run_" + std::to_string(::getpid());
    ::mkdir(run_dir_.c_str(), 0755);
    RunDir dir(run_dir_);
    std::ofstream(dir.control_address_path()) << "127.0.0.1:" << port_ << "\n";
    std::ofstream(dir.token_path()) << kToken << "\n";
    ::chmod(dir.token_path().c_str(), 0600);
  }
  void TearDown() override { server_->Shutdown(); }

  ScriptedControl service_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  std::string run_dir_;
};

TEST_F(ControlClientTest, ReadsRunDirAndSendsTheToken) {
  auto target = ResolveControlTarget(run_dir_, "", "");
  ASSERT_TRUE(target.ok()) << target.status();
  ControlClient client(*target, 5000);
  auto status = client.GetStatus();
  ASSERT_TRUE(status.ok()) << status.status();
  EXPECT_EQ(status->run_name(), "demo");
  EXPECT_EQ(status->committed_steps(), 42u);
}

TEST_F(ControlClientTest, WrongTokenIsUnauthenticatedNamingTheTokenFile) {
  auto target = ResolveControlTarget(run_dir_, "", "");
  ASSERT_TRUE(target.ok());
  target->token = "forged";
  ControlClient client(*target, 5000);
  auto status = client.GetStatus();
  EXPECT_TRUE(absl::IsUnauthenticated(status.status()));
  EXPECT_NE(status.status().message().find(target->token_path), std::string_view::npos);
}

TEST_F(ControlClientTest, ImpossibleRequestsKeepTheServersCode) {
  ControlClient client(*ResolveControlTarget(run_dir_, "", ""), 5000);
  EXPECT_TRUE(absl::IsInvalidArgument(client.Scale(0).status()));
  EXPECT_EQ(client.Scale(3)->desired_workers(), 3u);
  EXPECT_TRUE(absl::IsNotFound(client.Drain(0x999).status()));
}

TEST_F(ControlClientTest, ResolvesWorkersByHostPidOrSession) {
  ControlClient client(*ResolveControlTarget(run_dir_, "", ""), 5000);
  EXPECT_EQ(*client.ResolveWorker("node1:101"), 0xabc1u);
  EXPECT_EQ(*client.ResolveWorker("abc0"), 0xabc0u);
  EXPECT_EQ(*client.ResolveWorker("node0"), 0xabc0u);
  EXPECT_TRUE(absl::IsNotFound(client.ResolveWorker("node7").status()));
  ASSERT_TRUE(client.Drain(*client.ResolveWorker("node1:101")).ok());
  EXPECT_EQ(service_.drained, 0xabc1u);
}

TEST_F(ControlClientTest, WatchMetricsStreamsUpdates) {
  ControlClient client(*ResolveControlTarget(run_dir_, "", ""), 5000);
  std::vector<uint64_t> steps;
  ASSERT_TRUE(client.WatchMetrics(7, 0, [&](const gyre::v1::MetricsUpdate& u) {
                      steps.push_back(u.metrics().step());
                      return true;
                    }).ok());
  EXPECT_EQ(steps, std::vector<uint64_t>({7, 8, 9}));
}

TEST(ControlClientNoServerTest, UnreachableAndMissingRunDirAreExplained) {
  EXPECT_TRUE(absl::IsNotFound(ResolveControlTarget("/nonexistent/run", "", "").status()));
  const char* tmp = std::getenv("TEST_TMPDIR");
  std::string token = std::string(tmp ? tmp : "/tmp") + "/tok";
  std::ofstream(token) << kToken;
  ::chmod(token.c_str(), 0600);
  auto target = ResolveControlTarget("/nonexistent/run", "127.0.0.1:1", token);
  ASSERT_TRUE(target.ok()) << target.status();
  ControlClient client(*target, 500);
  auto s = client.GetStatus();
  EXPECT_TRUE(absl::IsUnavailable(s.status()) || absl::IsDeadlineExceeded(s.status())) << s.status();
  EXPECT_NE(s.status().message().find("cannot reach the coordinator at 127.0.0.1:1"), std::string_view::npos);
}

}  // namespace
}  // namespace gyre::cli
