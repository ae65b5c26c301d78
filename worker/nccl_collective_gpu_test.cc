// Needs GPUs (the device machine): one thread per GPU, each a rank of a real NCCL communicator.
// Multi-rank cases skip when fewer than two GPUs are visible.
#include "worker/nccl_collective.h"

#include <chrono>
#include <random>
#include <thread>
#include <vector>

#include "gtest/gtest.h"

namespace gyre {
namespace {

int DeviceCount() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) return 0;
  return n;
}

NcclOptions Fast() {
  NcclOptions o;
  o.init_timeout_ms = 60000;
  o.op_timeout_ms = 3000;
  return o;
}

TEST(NcclCollectiveGpuTest, UniqueIdHas128Bytes) {
  auto id = NcclCollective::NewUniqueId();
  ASSERT_TRUE(id.ok()) << id.status();
  EXPECT_EQ(id->size(), 128u);
  EXPECT_TRUE(absl::IsInvalidArgument(NcclCollective::Connect("short", 1, 0, 1, 0, Fast()).status()));
}

// All-reduce (blocking and bucketed async), double all-reduce and broadcast across all GPUs
// (world 1 on a one-GPU machine), checked against host sums of random data.
TEST(NcclCollectiveGpuTest, AllReduceBroadcastAndBucketsMatchHost) {
  const int world = DeviceCount();
  ASSERT_GE(world, 1);
  auto id = NcclCollective::NewUniqueId();
  ASSERT_TRUE(id.ok());
  const size_t n = (1 << 20) + 37;
  std::vector<std::vector<float>> inputs(world, std::vector<float>(n));
  std::mt19937 rng(5);
  std::normal_distribution<float> dist;
  for (auto& v : inputs)
    for (float& x : v) x = dist(rng);
  std::vector<double> expected(n, 0.0);
  for (auto& v : inputs)
    for (size_t i = 0; i < n; ++i) expected[i] += v[i];

  std::vector<std::vector<float>> outputs(world, std::vector<float>(n, -1.f));
  std::vector<absl::Status> status(world);
  std::vector<double> dsum(world, 0.0);
  std::vector<std::vector<char>> state(world, std::vector<char>(4099, 0));
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r) {
    threads.emplace_back([&, r] {
      auto c = NcclCollective::Connect(*id, 9, r, world, r, Fast());
      if (!c.ok()) {
        status[r] = c.status();
        return;
      }
      float* d = nullptr;
      cudaMalloc(&d, n * sizeof(float));
      cudaMemcpy(d, inputs[r].data(), n * sizeof(float), cudaMemcpyHostToDevice);
      // Two buckets, launched separately after a "gradients ready" event, waited once.
      cudaStream_t compute;
      cudaStreamCreate(&compute);
      cudaEvent_t ready;
      cudaEventCreateWithFlags(&ready, cudaEventDisableTiming);
      cudaEventRecord(ready, compute);
      absl::Status s = (*c)->AllReduceSumAsync(d, n / 2, ready);
      if (s.ok()) s = (*c)->AllReduceSumAsync(d + n / 2, n - n / 2, ready);
      if (s.ok()) s = (*c)->Wait();
      cudaMemcpy(outputs[r].data(), d, n * sizeof(float), cudaMemcpyDeviceToHost);
      double* dd = nullptr;
      cudaMalloc(&dd, sizeof(double));
      double mine = r + 0.25;
      cudaMemcpy(dd, &mine, sizeof(double), cudaMemcpyHostToDevice);
      if (s.ok()) s = (*c)->AllReduceSum(dd, 1);
      cudaMemcpy(&dsum[r], dd, sizeof(double), cudaMemcpyDeviceToHost);
      char* bytes = nullptr;
      cudaMalloc(&bytes, state[r].size());
      std::vector<char> mine_state(state[r].size(), char('a' + r));
      cudaMemcpy(bytes, mine_state.data(), mine_state.size(), cudaMemcpyHostToDevice);
      if (s.ok()) s = (*c)->Broadcast(bytes, state[r].size(), world - 1);
      cudaMemcpy(state[r].data(), bytes, state[r].size(), cudaMemcpyDeviceToHost);
      cudaFree(d);
      cudaFree(dd);
      cudaFree(bytes);
      cudaEventDestroy(ready);
      cudaStreamDestroy(compute);
      status[r] = s;
    });
  }
  for (auto& t : threads) t.join();
  double expected_dsum = 0;
  for (int r = 0; r < world; ++r) expected_dsum += r + 0.25;
  for (int r = 0; r < world; ++r) {
    ASSERT_TRUE(status[r].ok()) << "rank " << r << ": " << status[r];
    double max_err = 0;
    for (size_t i = 0; i < n; ++i) max_err = std::max(max_err, std::abs(outputs[r][i] - expected[i]));
    EXPECT_LT(max_err, 1e-4 * world) << "rank " << r;
    EXPECT_DOUBLE_EQ(dsum[r], expected_dsum);
    EXPECT_EQ(state[r], std::vector<char>(state[r].size(), char('a' + world - 1)));
  }
  std::printf("nccl collective: %d rank(s), %zu floats, all-reduce/broadcast match the host\n", world, n);
}

// A peer that stops participating (hung or dead) must not hang the survivor: its wait ends at
// the deadline with DeadlineExceeded, the communicator is aborted, and later calls fail fast.
TEST(NcclCollectiveGpuTest, SilentPeerTimesOutAndAborts) {
  if (DeviceCount() < 2) GTEST_SKIP() << "needs 2 GPUs";
  auto id = NcclCollective::NewUniqueId();
  ASSERT_TRUE(id.ok());
  absl::Status survivor;
  double seconds = 0;
  std::atomic<bool> survivor_done{false};
  std::thread silent([&] {
    auto c = NcclCollective::Connect(*id, 10, 1, 2, 1, Fast());
    ASSERT_TRUE(c.ok()) << c.status();
    while (!survivor_done.load()) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    (*c)->Abort();  // every rank of a broken communicator aborts
  });
  std::thread live([&] {
    auto c = NcclCollective::Connect(*id, 10, 0, 2, 0, Fast());
    ASSERT_TRUE(c.ok()) << c.status();
    float* d = nullptr;
    cudaMalloc(&d, (1 << 20) * sizeof(float));
    auto start = std::chrono::steady_clock::now();
    survivor = (*c)->AllReduceSum(d, 1 << 20);
    seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    EXPECT_TRUE(absl::IsAborted((*c)->AllReduceSum(d, 16)));
    cudaFree(d);
    survivor_done.store(true);
  });
  live.join();
  silent.join();
  EXPECT_TRUE(absl::IsDeadlineExceeded(survivor)) << survivor;
  EXPECT_LT(seconds, 10.0);
  std::printf("nccl collective: silent peer detected after %.2f s (op timeout 3 s), communicator aborted\n", seconds);
}

}  // namespace
}  // namespace gyre
