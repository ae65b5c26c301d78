// Real Gloo over loopback TCP, one thread per rank.
#include "worker/gloo_collective.h"

#include <future>
#include <random>
#include <thread>
#include <vector>

#include "gtest/gtest.h"

namespace gyre {
namespace {

GlooOptions FastOptions() {
  GlooOptions o;
  o.connect_timeout_ms = 10000;
  o.op_timeout_ms = 3000;
  return o;
}

TEST(GlooCollectiveTest, AllReduceAndBroadcastOverThreeRanks) {
  constexpr int kWorld = 3;
  InProcessStore store;
  std::vector<std::vector<float>> inputs(kWorld);
  std::mt19937 rng(11);
  std::normal_distribution<float> dist;
  const size_t n = 100003;  // odd: not a multiple of any chunking
  for (auto& v : inputs) {
    v.resize(n);
    for (float& x : v) x = dist(rng);
  }
  std::vector<double> expected(n, 0.0);
  for (const auto& v : inputs)
    for (size_t i = 0; i < n; ++i) expected[i] += v[i];

  std::vector<absl::Status> results(kWorld);
  std::vector<std::vector<float>> outputs = inputs;
  std::vector<std::vector<double>> doubles(kWorld, std::vector<double>(5));
  std::vector<std::string> state(kWorld, std::string(1000, '?'));
  std::vector<std::thread> threads;
  for (int r = 0; r < kWorld; ++r) {
    threads.emplace_back([&, r] {
      auto c = GlooCollective::Connect(&store, /*generation=*/7, r, kWorld, FastOptions());
      if (!c.ok()) {
        results[r] = c.status();
        return;
      }
      EXPECT_EQ((*c)->generation(), 7u);
      absl::Status s = (*c)->AllReduceSum(outputs[r].data(), n);
      for (int i = 0; i < 5; ++i) doubles[r][i] = r + 0.5 * i;
      if (s.ok()) s = (*c)->AllReduceSum(doubles[r].data(), 5);
      if (r == 1) state[r] = std::string(1000, 'S');
      if (s.ok()) s = (*c)->Broadcast(state[r].data(), state[r].size(), /*root=*/1);
      results[r] = s;
    });
  }
  for (auto& t : threads) t.join();
  for (int r = 0; r < kWorld; ++r) {
    ASSERT_TRUE(results[r].ok()) << "rank " << r << ": " << results[r];
    for (size_t i = 0; i < n; i += 97) ASSERT_NEAR(outputs[r][i], expected[i], 1e-4) << "rank " << r << " i " << i;
    for (int i = 0; i < 5; ++i) EXPECT_DOUBLE_EQ(doubles[r][i], 0 + 1 + 2 + 3 * 0.5 * i);
    EXPECT_EQ(state[r], std::string(1000, 'S'));
  }
  // Every rank holds bitwise the same sum.
  EXPECT_EQ(outputs[0], outputs[1]);
  EXPECT_EQ(outputs[1], outputs[2]);
}

TEST(GlooCollectiveTest, MissingMemberTimesOutInRendezvous) {
  InProcessStore store;
  GlooOptions o = FastOptions();
  o.connect_timeout_ms = 300;
  // Rank 1 of 2 never comes.
  auto c = GlooCollective::Connect(&store, 1, 0, 2, o);
  ASSERT_FALSE(c.ok());
  EXPECT_TRUE(absl::IsDeadlineExceeded(c.status())) << c.status();
}

TEST(GlooCollectiveTest, PeerThatDiesMidRunFailsTheSurvivorsOperation) {
  InProcessStore store;
  absl::Status survivor_status;
  // The peer dies only once both sides have connected: Connect returning on
  // one rank does not mean the other's handshake is done, and a death inside
  // the handshake is a different case (the survivor's Connect fails).
  std::promise<void> survivor_connected;
  std::shared_future<void> both_connected = survivor_connected.get_future().share();
  std::thread dying([&] {
    auto c = GlooCollective::Connect(&store, 3, 1, 2, FastOptions());
    both_connected.wait();
    ASSERT_TRUE(c.ok()) << c.status();
    (*c)->Abort();  // closes its connections, as a killed process would
  });
  std::thread survivor([&] {
    auto c = GlooCollective::Connect(&store, 3, 0, 2, FastOptions());
    survivor_connected.set_value();
    ASSERT_TRUE(c.ok()) << c.status();
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    std::vector<float> grads(1 << 16, 1.0f);
    survivor_status = (*c)->AllReduceSum(grads.data(), grads.size());
    // The communicator is dead for good: the next call fails at once.
    EXPECT_TRUE(absl::IsAborted((*c)->AllReduceSum(grads.data(), grads.size())));
  });
  dying.join();
  survivor.join();
  EXPECT_FALSE(survivor_status.ok());
  EXPECT_TRUE(absl::IsAborted(survivor_status) || absl::IsDeadlineExceeded(survivor_status)) << survivor_status;
}

TEST(GlooCollectiveTest, RejectsBadRank) {
  InProcessStore store;
  EXPECT_TRUE(absl::IsInvalidArgument(GlooCollective::Connect(&store, 1, 2, 2, FastOptions()).status()));
}

}  // namespace
}  // namespace gyre
