#include "coordinator/http/http_server.h"

#include <httplib.h>

#include "gtest/gtest.h"

namespace gyre::coordinator {
namespace {

// A canned source: the HTTP layer is what is under test.
class CannedSource final : public DashboardSource {
 public:
  gyre::v1::RunStatus Status() override {
    gyre::v1::RunStatus s;
    s.set_run_name("unit");
    s.set_state(gyre::v1::RUN_STATE_RUNNING);
    s.set_committed_steps(5);
    s.mutable_last_metrics()->set_loss(2.5);
    s.mutable_last_metrics()->mutable_times()->set_exposed_comm_ms(3);
    s.mutable_last_metrics()->set_model_flops_per_s(400e12);
    s.mutable_last_metrics()->set_peak_flops_per_s(1000e12);
    gyre::v1::SourceLoss* src = s.mutable_last_eval()->add_sources();
    src->set_source("pile-val");
    src->set_loss(3.25);
    s.add_alarms("saturation: pile-val");
    s.set_checkpoint_failures(2);
    s.set_last_checkpoint_error("step 60: write checkpoints/step-60/state-3.bin: No space left on device");
    return s;
  }
  std::vector<gyre::v1::StepMetrics> MetricsSince(uint64_t since, size_t limit) override {
    std::vector<gyre::v1::StepMetrics> out;
    for (uint64_t step = since; step < 5 && out.size() < limit; ++step) {
      gyre::v1::StepMetrics m;
      m.set_step(step);
      m.set_loss(3.0 - 0.1 * step);
      out.push_back(m);
    }
    return out;
  }
};

TEST(HttpServerTest, ServesPageJsonAndPrometheus) {
  CannedSource source;
  auto server = HttpServer::Start("127.0.0.1:0", &source);
  ASSERT_TRUE(server.ok()) << server.status();
  const std::string& addr = (*server)->address();
  httplib::Client client(addr.substr(0, addr.rfind(':')), std::stoi(addr.substr(addr.rfind(':') + 1)));

  auto page = client.Get("/");
  ASSERT_TRUE(page);
  EXPECT_EQ(page->status, 200);
  EXPECT_NE(page->body.find("<title>Gyre run</title>"), std::string::npos);
  // The status view shows failed checkpoint writes.
  EXPECT_NE(page->body.find("status.last_checkpoint_error"), std::string::npos);

  auto status = client.Get("/api/status");
  ASSERT_TRUE(status);
  EXPECT_NE(status->body.find("\"run_name\":\"unit\""), std::string::npos) << status->body;
  EXPECT_NE(status->body.find("\"committed_steps\""), std::string::npos);
  EXPECT_NE(status->body.find("\"checkpoint_failures\":\"2\""), std::string::npos) << status->body;
  EXPECT_NE(status->body.find("\"last_checkpoint_error\":\"step 60: write"), std::string::npos) << status->body;

  auto metrics = client.Get("/api/metrics?since=3");
  ASSERT_TRUE(metrics);
  EXPECT_NE(metrics->body.find("\"step\":\"3\""), std::string::npos) << metrics->body;
  EXPECT_EQ(metrics->body.find("\"step\":\"2\""), std::string::npos);

  auto bad = client.Get("/api/metrics?since=x");
  ASSERT_TRUE(bad);
  EXPECT_EQ(bad->status, 400);

  auto prom = client.Get("/metrics");
  ASSERT_TRUE(prom);
  EXPECT_NE(prom->body.find("gyre_committed_steps{run=\"unit\"} 5"), std::string::npos) << prom->body;
  EXPECT_NE(prom->body.find("gyre_loss{run=\"unit\"} 2.5"), std::string::npos);
  EXPECT_NE(prom->body.find("phase=\"exposed_comm\"} 3"), std::string::npos);
  EXPECT_NE(prom->body.find("gyre_mfu{run=\"unit\"} 0.4"), std::string::npos) << prom->body;
  EXPECT_NE(prom->body.find("gyre_validation_loss{run=\"unit\",source=\"pile-val\"} 3.25"), std::string::npos);
  EXPECT_NE(prom->body.find("gyre_saturation_alarms{run=\"unit\"} 1"), std::string::npos);
  EXPECT_NE(prom->body.find("# TYPE gyre_checkpoint_failures_total counter\ngyre_checkpoint_failures_total{run=\"unit\"} 2\n"),
            std::string::npos)
      << prom->body;
  EXPECT_NE(prom->body.find("gyre_model_flops_per_second{run=\"unit\"} 4e+14"), std::string::npos) << prom->body;
}

TEST(HttpServerTest, RejectsBadListenAddress) {
  CannedSource source;
  EXPECT_TRUE(absl::IsInvalidArgument(HttpServer::Start("no-port", &source).status()));
}

}  // namespace
}  // namespace gyre::coordinator
