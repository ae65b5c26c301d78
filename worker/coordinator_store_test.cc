// CoordinatorStore against the real coordinator server: set-once semantics, a timeout naming the
// key, the bearer token enforced, and two Gloo ranks (threads) forming a communicator through it.
#include "worker/coordinator_store.h"

#include <thread>

#include "coordinator/services.h"
#include "gtest/gtest.h"
#include "worker/gloo_collective.h"

namespace gyre {
namespace {

constexpr char kToken[] = "store-token";

class CoordinatorStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    journal_ = coordinator::NewMemJournal();
    coordinator::CoreLoop::Options options;
    options.config.set_name("store-test");
    options.config.mutable_data()->set_global_batch(2);
    options.config.mutable_train()->set_max_steps(1);
    options.journal = journal_.get();
    options.rendezvous = &rendezvous_;
    auto loop = coordinator::CoreLoop::Start(options);
    ASSERT_TRUE(loop.ok()) << loop.status();
    loop_ = std::move(*loop);
    coordinator::ServerOptions server_options;
    server_options.token = kToken;
    auto server = coordinator::CoordinatorServer::Start(loop_.get(), server_options);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(*server);
  }
  void TearDown() override {
    if (loop_) loop_->Stop();
    server_.reset();
    loop_.reset();
  }
  ClusterClientOptions ClientOptions(const std::string& token = kToken) {
    ClusterClientOptions o;
    o.address = "127.0.0.1:" + std::to_string(server_->port());
    o.token = token;
    o.retry_budget_ms = 2000;
    return o;
  }

  coordinator::GlooRendezvous rendezvous_{CoordinatorStore::kAddress, "store-test"};
  std::unique_ptr<coordinator::Journal> journal_;
  std::unique_ptr<coordinator::CoreLoop> loop_;
  std::unique_ptr<coordinator::CoordinatorServer> server_;
};

TEST_F(CoordinatorStoreTest, SetOnceGetTimeoutAndToken) {
  ClusterClient client(ClientOptions(), Clock::Real());
  CoordinatorStore store(&client, Clock::Real(), 1);
  ASSERT_TRUE(store.Set("g1/rank_0", "addr-0").ok());
  EXPECT_TRUE(store.Set("g1/rank_0", "addr-0").ok());
  EXPECT_TRUE(absl::IsFailedPrecondition(store.Set("g1/rank_0", "addr-x")));
  absl::StatusOr<std::string> v = store.Get("g1/rank_0", 1000);
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(*v, "addr-0");
  absl::StatusOr<std::string> missing = store.Get("g1/rank_9", 200);
  EXPECT_TRUE(absl::IsDeadlineExceeded(missing.status())) << missing.status();
  EXPECT_NE(missing.status().message().find("g1/rank_9"), std::string::npos);

  ClusterClient stranger(ClientOptions("wrong"), Clock::Real());
  CoordinatorStore bad(&stranger, Clock::Real(), 1);
  EXPECT_TRUE(absl::IsUnauthenticated(bad.Set("g1/rank_1", "x")));
  EXPECT_TRUE(absl::IsUnauthenticated(bad.Get("g1/rank_0", 100).status()));
}

TEST_F(CoordinatorStoreTest, TwoGlooRanksRendezvousThroughTheCoordinator) {
  std::vector<absl::Status> status(2);
  std::vector<std::vector<float>> data = {{1, 2, 3}, {10, 20, 30}};
  std::vector<std::thread> threads;
  for (int r = 0; r < 2; ++r) {
    threads.emplace_back([&, r] {
      ClusterClient client(ClientOptions(), Clock::Real());
      CoordinatorStore store(&client, Clock::Real(), 100 + r);
      GlooOptions options;
      options.connect_timeout_ms = 20000;
      auto c = GlooCollective::Connect(&store, 4, r, 2, options, rendezvous_.ForGeneration(4).store_prefix());
      if (!c.ok()) {
        status[r] = c.status();
        return;
      }
      status[r] = (*c)->AllReduceSum(data[r].data(), data[r].size());
    });
  }
  for (auto& t : threads) t.join();
  for (int r = 0; r < 2; ++r) {
    ASSERT_TRUE(status[r].ok()) << r << ": " << status[r];
    EXPECT_EQ(data[r], (std::vector<float>{11, 22, 33}));
  }
}

}  // namespace
}  // namespace gyre
