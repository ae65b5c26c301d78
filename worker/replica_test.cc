// Data parallelism on real models: W=2 replicas over Gloo (threads) must apply exactly the
// update one replica computes on the whole batch (up to summation order), stay bitwise equal
// to each other, hand their state to a joiner, and round-trip through a checkpoint.
#include "worker/replica.h"
#include "worker/worker_test_util.h"

#include <functional>
#include <random>
#include <thread>

#include "base/clock.h"
#include "base/mem_env.h"
#include "base/status_macros.h"
#include "gtest/gtest.h"
#include "worker/gloo_collective.h"

namespace gyre {
namespace {

// Writes `tensors` as a checkpoint into an in-memory Env and restores `into` from it (the
// worker's restore path).
absl::Status RestoreThroughCheckpoint(ModelReplica* into, const std::vector<TensorSnapshot>& tensors) {
  std::unique_ptr<Env> env = NewMemEnv();
  CheckpointState state;
  state.tensors = tensors;
  ASSIGN_OR_RETURN(const std::string dir, WriteCheckpoint(env.get(), "/checkpoints", state));
  return into->RestoreFrom(env.get(), Clock::Real(), dir, state.step).status();
}

// Runs `body(rank, replica, collective)` on two threads, each with its own replica of `config`
// and one Gloo communicator between them; the first error of either rank fails the test. Returns
// the two replicas for the caller's comparisons (empty when a rank could not start).
std::vector<std::unique_ptr<ModelReplica>> RunTwoRanks(
    const gyre::v1::RunConfig& config, const std::function<absl::Status(int, ModelReplica*, Collective*)>& body) {
  InProcessStore store;
  std::vector<std::unique_ptr<ModelReplica>> replicas(2);
  std::vector<absl::Status> status(2);
  std::vector<std::thread> threads;
  for (int r = 0; r < 2; ++r) {
    threads.emplace_back([&, r] {
      auto replica = ModelReplica::Create(config);
      if (!replica.ok()) {
        status[r] = replica.status();
        return;
      }
      replicas[r] = std::move(*replica);
      auto c = GlooCollective::Connect(&store, 1, r, 2, GlooOptions());
      status[r] = c.ok() ? body(r, replicas[r].get(), c->get()) : c.status();
    });
  }
  for (auto& t : threads) t.join();
  for (int r = 0; r < 2; ++r) {
    EXPECT_TRUE(status[r].ok()) << "rank " << r << ": " << status[r];
    if (!status[r].ok()) return {};
  }
  return replicas;
}

// Largest |difference| between the parameters of two replicas' snapshots.
double MaxParamDiff(const ModelReplica& a, const ModelReplica& b) {
  SnapshotStaging staging(/*pinned=*/false);
  absl::StatusOr<std::vector<TensorSnapshot>> xs = a.Snapshot(&staging), ys = b.Snapshot(&staging);
  EXPECT_TRUE(xs.ok() && ys.ok());
  if (!xs.ok() || !ys.ok()) return 1e30;
  const std::vector<TensorSnapshot>& x = *xs;
  const std::vector<TensorSnapshot>& y = *ys;
  EXPECT_EQ(x.size(), y.size());
  double max_diff = 0;
  for (size_t i = 0; i < x.size() && i < y.size(); ++i) {
    if (x[i].name.rfind("param.", 0) != 0) continue;
    const float* u = reinterpret_cast<const float*>(x[i].data().data());
    const float* v = reinterpret_cast<const float*>(y[i].data().data());
    for (size_t j = 0; j < x[i].data().size() / 4; ++j) max_diff = std::max(max_diff, double(std::abs(u[j] - v[j])));
  }
  return max_diff;
}

// A CUDA replica needs the GPU runtime (registered only by a --config=cuda build): a CPU build
// refuses it with a message that says how to get one, instead of failing later in a kernel.
TEST(ReplicaTest, CudaReplicaNeedsTheGpuRuntime) {
  if (GpuRuntimeOrNull() != nullptr) GTEST_SKIP() << "CUDA build";
  auto replica = ModelReplica::Create(testing::TinyReplicaConfig(), ops::Device::kCuda);
  ASSERT_FALSE(replica.ok());
  EXPECT_EQ(replica.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(replica.status().message().find("--config=cuda"), absl::string_view::npos) << replica.status();
  EXPECT_FALSE(ModelReplica::Create(testing::TinyReplicaConfig(), ops::Device::kMeta).ok());
}

TEST(ReplicaTest, TwoRanksMatchOneRankOnTheWholeBatch) {
  constexpr int64_t kBatch = 5, kSeq = 16;  // odd batch: ranks get 3 and 2 samples
  auto reference = ModelReplica::Create(testing::TinyReplicaConfig());
  ASSERT_TRUE(reference.ok()) << reference.status();
  const int vocab = static_cast<int>((*reference)->spec().vocab_size);
  std::vector<int32_t> tokens = testing::RandomTokens(kBatch, kSeq, vocab, 9);
  const uint64_t global_tokens = kBatch * kSeq;

  testing::SingleRankCollective single;
  ReplicaLoss ref_loss = (*reference)->ComputeGradients(tokens, kBatch, kSeq, global_tokens);
  ASSERT_TRUE((*reference)->ReduceGradients(&single, &ref_loss).ok());
  ASSERT_TRUE((*reference)->ApplyUpdate(0).ok());

  std::vector<ReplicaLoss> losses(2);
  auto replicas = RunTwoRanks(testing::TinyReplicaConfig(), [&](int r, ModelReplica* replica, Collective* c) {
    const int64_t first = r == 0 ? 0 : 3, count = r == 0 ? 3 : 2;
    std::span<const int32_t> mine(tokens.data() + first * (kSeq + 1), count * (kSeq + 1));
    losses[r] = replica->ComputeGradients(mine, count, kSeq, global_tokens);
    RETURN_IF_ERROR(replica->ReduceGradients(c, &losses[r], /*bucket_bytes=*/4096));
    return replica->ApplyUpdate(0).status();
  });
  ASSERT_EQ(replicas.size(), 2u);
  EXPECT_NEAR(losses[0].loss, ref_loss.loss, 1e-5 * std::abs(ref_loss.loss));
  EXPECT_EQ(losses[0].tokens, ref_loss.tokens);
  EXPECT_EQ(losses[0].loss, losses[1].loss);
  EXPECT_EQ(replicas[0]->ParameterFingerprint(), replicas[1]->ParameterFingerprint());
  // Against the single replica: equal up to float summation order.
  EXPECT_LT(MaxParamDiff(*replicas[0], **reference), 1e-5);
}

TEST(ReplicaTest, JoinerReceivesStateByBroadcastAndCheckpointRoundTrips) {
  auto trained = ModelReplica::Create(testing::TinyReplicaConfig(3));
  ASSERT_TRUE(trained.ok());
  const int vocab = static_cast<int>((*trained)->spec().vocab_size);
  testing::SingleRankCollective single;
  for (uint64_t step = 0; step < 3; ++step) {
    auto tokens = testing::RandomTokens(2, 8, vocab, 100 + step);
    ReplicaLoss l = (*trained)->ComputeGradients(tokens, 2, 8, 16);
    ASSERT_TRUE((*trained)->ReduceGradients(&single, &l).ok());
    ASSERT_TRUE((*trained)->ApplyUpdate(step).ok());
  }
  auto joiner = ModelReplica::Create(testing::TinyReplicaConfig(77));  // different init: must be overwritten
  ASSERT_TRUE(joiner.ok());
  ASSERT_NE((*joiner)->ParameterFingerprint(), (*trained)->ParameterFingerprint());

  InProcessStore store;
  absl::Status s0, s1;
  std::thread t0([&] {
    auto c = GlooCollective::Connect(&store, 2, 0, 2, GlooOptions());
    s0 = c.ok() ? (*trained)->BroadcastState(c->get(), 0) : c.status();
  });
  std::thread t1([&] {
    auto c = GlooCollective::Connect(&store, 2, 1, 2, GlooOptions());
    s1 = c.ok() ? (*joiner)->BroadcastState(c->get(), 0) : c.status();
  });
  t0.join();
  t1.join();
  ASSERT_TRUE(s0.ok()) << s0;
  ASSERT_TRUE(s1.ok()) << s1;
  EXPECT_EQ((*joiner)->ParameterFingerprint(), (*trained)->ParameterFingerprint());

  // Both now take the same next step and stay equal (optimizer moments and step count came too).
  auto tokens = testing::RandomTokens(2, 8, vocab, 500);
  for (auto* r : {trained->get(), joiner->get()}) {
    ReplicaLoss l = r->ComputeGradients(tokens, 2, 8, 16);
    ASSERT_TRUE(r->ReduceGradients(&single, &l).ok());
    ASSERT_TRUE(r->ApplyUpdate(3).ok());
  }
  EXPECT_EQ((*joiner)->ParameterFingerprint(), (*trained)->ParameterFingerprint());

  auto restored = ModelReplica::Create(testing::TinyReplicaConfig(5));
  ASSERT_TRUE(restored.ok());
  SnapshotStaging staging(/*pinned=*/false);
  absl::StatusOr<std::vector<TensorSnapshot>> snapshot = (*trained)->Snapshot(&staging);
  ASSERT_TRUE(snapshot.ok()) << snapshot.status();
  ASSERT_TRUE(RestoreThroughCheckpoint(restored->get(), *snapshot).ok());
  EXPECT_EQ((*restored)->ParameterFingerprint(), (*trained)->ParameterFingerprint());
  std::vector<TensorSnapshot> broken = *std::move(snapshot);
  broken.pop_back();
  EXPECT_TRUE(absl::IsDataLoss(RestoreThroughCheckpoint(restored->get(), broken)));
}

// Snapshots share one staging buffer: a snapshot still held (the checkpoint writer is writing
// it) keeps its bytes while training goes on, and the buffer is reused once every snapshot of it
// is dropped.
TEST(ReplicaTest, SnapshotKeepsItsBytesWhileHeldAndReusesTheBufferOnceDropped) {
  auto replica = ModelReplica::Create(testing::TinyReplicaConfig());
  ASSERT_TRUE(replica.ok()) << replica.status();
  const int vocab = static_cast<int>((*replica)->spec().vocab_size);
  testing::SingleRankCollective single;
  auto step = [&](uint64_t t) {
    ReplicaLoss l = (*replica)->ComputeGradients(testing::RandomTokens(2, 8, vocab, static_cast<uint32_t>(600 + t)), 2, 8, 16);
    ASSERT_TRUE((*replica)->ReduceGradients(&single, &l).ok());
    ASSERT_TRUE((*replica)->ApplyUpdate(t).ok());
  };
  step(0);
  SnapshotStaging staging(/*pinned=*/false);
  staging.Prepare((*replica)->SnapshotBytes());
  absl::StatusOr<std::vector<TensorSnapshot>> held = (*replica)->Snapshot(&staging);
  ASSERT_TRUE(held.ok()) << held.status();
  ASSERT_FALSE(held->empty());
  std::vector<std::string> copy;
  for (const TensorSnapshot& t : *held) copy.emplace_back(t.data());
  const char* first_buffer = held->front().staged;

  step(1);
  absl::StatusOr<std::vector<TensorSnapshot>> next = (*replica)->Snapshot(&staging);
  ASSERT_TRUE(next.ok()) << next.status();
  EXPECT_NE(next->front().staged, first_buffer) << "a held snapshot's buffer was reused";
  size_t changed = 0;
  for (size_t i = 0; i < held->size(); ++i) {
    EXPECT_EQ(std::string((*held)[i].data()), copy[i]) << (*held)[i].name << " changed while held";
    changed += std::string((*next)[i].data()) != copy[i];
  }
  EXPECT_GT(changed, 0u) << "the update changed nothing the snapshot sees";

  // Dropped: the next snapshot reuses a buffer instead of allocating a third.
  const char* second_buffer = next->front().staged;
  held = absl::StatusOr<std::vector<TensorSnapshot>>(std::vector<TensorSnapshot>());
  next = absl::StatusOr<std::vector<TensorSnapshot>>(std::vector<TensorSnapshot>());
  absl::StatusOr<std::vector<TensorSnapshot>> again = (*replica)->Snapshot(&staging);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->front().staged, second_buffer);

  auto restored = ModelReplica::Create(testing::TinyReplicaConfig(5));
  ASSERT_TRUE(restored.ok());
  ASSERT_TRUE(RestoreThroughCheckpoint(restored->get(), *again).ok());
  EXPECT_EQ((*restored)->ParameterFingerprint(), (*replica)->ParameterFingerprint());
}

}  // namespace
}  // namespace gyre

namespace gyre {
namespace {

// Overlapping the gradient all-reduce with backward changes when buckets travel, not what is
// summed: the same buckets in the same order give bit-identical parameters after the update.
TEST(ReplicaTest, OverlappedReduceIsBitIdenticalToReduceAfterBackward) {
  constexpr int64_t kSeq = 16;
  constexpr size_t kBucketBytes = 64 << 10;  // many buckets: most are launched during backward
  std::vector<uint64_t> fingerprints[2];
  std::vector<double> reduced_loss[2];
  for (int overlap = 0; overlap < 2; ++overlap) {
    auto replicas = RunTwoRanks(testing::TinyReplicaConfig(5), [&](int r, ModelReplica* replica, Collective* c) -> absl::Status {
      const int vocab = static_cast<int>(replica->spec().vocab_size);
      for (uint64_t step = 0; step < 2; ++step) {
        std::vector<int32_t> tokens = testing::RandomTokens(4, kSeq, vocab, 40 + 10 * step + r);
        if (overlap) replica->BeginOverlappedReduce(c, kBucketBytes);
        ReplicaLoss loss = replica->ComputeGradients(tokens, 4, kSeq, 8 * kSeq);
        EXPECT_GT(replica->last_pass_times().forward_ms, 0);
        EXPECT_GT(replica->last_pass_times().backward_ms, 0);
        RETURN_IF_ERROR(replica->ReduceGradients(c, &loss, kBucketBytes));
        RETURN_IF_ERROR(replica->ApplyUpdate(step).status());
        if (r == 0) reduced_loss[overlap].push_back(loss.loss);
      }
      return absl::OkStatus();
    });
    ASSERT_EQ(replicas.size(), 2u);
    for (int r = 0; r < 2; ++r) fingerprints[overlap].push_back(replicas[r]->ParameterFingerprint());
    EXPECT_EQ(fingerprints[overlap][0], fingerprints[overlap][1]);
  }
  EXPECT_EQ(fingerprints[0], fingerprints[1]);
  EXPECT_EQ(reduced_loss[0], reduced_loss[1]);
}

// Gradient accumulation (train.micro_batch): 2 ranks x 5 rows run as micro-batches of 2, 2, 1
// with the overlapped reduction armed, and must apply the update one replica computes on all 10
// rows in one pass. A bucket reduced during an earlier micro-batch's backward (a partial sum)
// would break this by far more than the tolerance.
TEST(ReplicaTest, MicroBatchesWithOverlapMatchOnePassOverTheWholeBatch) {
  constexpr int64_t kRowsPerRank = 5, kSeq = 16;
  constexpr size_t kBucketBytes = 64 << 10;
  auto reference = ModelReplica::Create(testing::TinyReplicaConfig(7));
  ASSERT_TRUE(reference.ok()) << reference.status();
  const int vocab = static_cast<int>((*reference)->spec().vocab_size);
  std::vector<int32_t> tokens = testing::RandomTokens(2 * kRowsPerRank, kSeq, vocab, 21);
  const uint64_t global_tokens = 2 * kRowsPerRank * kSeq;
  testing::SingleRankCollective single;
  ReplicaLoss ref_loss = (*reference)->ComputeGradients(tokens, 2 * kRowsPerRank, kSeq, global_tokens);
  ASSERT_TRUE((*reference)->ReduceGradients(&single, &ref_loss).ok());
  ASSERT_TRUE((*reference)->ApplyUpdate(0).ok());

  gyre::v1::RunConfig config = testing::TinyReplicaConfig(7);
  config.mutable_train()->set_micro_batch(2);
  std::vector<ReplicaLoss> losses(2);
  auto replicas = RunTwoRanks(config, [&](int r, ModelReplica* replica, Collective* c) {
    std::span<const int32_t> mine(tokens.data() + r * kRowsPerRank * (kSeq + 1), kRowsPerRank * (kSeq + 1));
    replica->BeginOverlappedReduce(c, kBucketBytes);
    losses[r] = replica->ComputeGradients(mine, kRowsPerRank, kSeq, global_tokens);
    RETURN_IF_ERROR(replica->ReduceGradients(c, &losses[r], kBucketBytes));
    return replica->ApplyUpdate(0).status();
  });
  ASSERT_EQ(replicas.size(), 2u);
  EXPECT_NEAR(losses[0].loss, ref_loss.loss, 1e-5 * std::abs(ref_loss.loss));
  EXPECT_EQ(losses[0].tokens, ref_loss.tokens);
  EXPECT_EQ(replicas[0]->ParameterFingerprint(), replicas[1]->ParameterFingerprint());
  EXPECT_GT(replicas[0]->last_pass_times().backward_ms, 0);
  auto initial = ModelReplica::Create(testing::TinyReplicaConfig(7));
  ASSERT_TRUE(initial.ok());
  EXPECT_GT(MaxParamDiff(**initial, **reference), 1e-3);  // the update moved the weights
  EXPECT_LT(MaxParamDiff(*replicas[0], **reference), 1e-5);
}

}  // namespace
}  // namespace gyre
