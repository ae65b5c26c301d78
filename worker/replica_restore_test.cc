// The worker's restore path: a replica's state written with WriteCheckpoint and streamed back
// with RestoreFrom must come back byte for byte; a checkpoint that fails part-way (a flipped
// byte in the LAST file, found after the earlier files were copied in) must leave the replica
// marked partially restored and refusing every use that could spread it (update, snapshot, state
// source), until a restore from a good checkpoint makes it exact again; a torn checkpoint (a file
// short or missing) must fail before anything is written.
#include <random>
#include <string>
#include <vector>

#include "base/fault_injection_env.h"
#include "base/mem_env.h"
#include "gtest/gtest.h"
#include "worker/replica.h"
#include "worker/worker_test_util.h"

namespace gyre {
namespace {

void Train(ModelReplica* replica, uint64_t first_step, uint64_t steps) {
  testing::SingleRankCollective single;
  const int vocab = static_cast<int>(replica->spec().vocab_size);
  for (uint64_t t = first_step; t < first_step + steps; ++t) {
    ReplicaLoss l = replica->ComputeGradients(testing::RandomTokens(2, 8, vocab, static_cast<uint32_t>(700 + t)), 2, 8, 16);
    ASSERT_TRUE(replica->ReduceGradients(&single, &l).ok());
    ASSERT_TRUE(replica->ApplyUpdate(t).ok());
  }
}

// Every tensor's name and bytes (parameters and optimizer state).
std::vector<std::pair<std::string, std::string>> Bytes(const ModelReplica& replica) {
  SnapshotStaging staging(/*pinned=*/false);
  absl::StatusOr<std::vector<TensorSnapshot>> snapshot = replica.Snapshot(&staging);
  EXPECT_TRUE(snapshot.ok()) << snapshot.status();
  std::vector<std::pair<std::string, std::string>> out;
  if (snapshot.ok()) {
    for (const TensorSnapshot& t : *snapshot) out.emplace_back(t.name, std::string(t.data()));
  }
  return out;
}

// Writes `replica`'s state as checkpoint `step` under /c, spread over several files.
std::string WriteState(Env* env, const ModelReplica& replica, uint64_t step) {
  SnapshotStaging staging(/*pinned=*/false);
  absl::StatusOr<std::vector<TensorSnapshot>> snapshot = replica.Snapshot(&staging);
  EXPECT_TRUE(snapshot.ok()) << snapshot.status();
  CheckpointState state;
  state.step = step;
  state.tensors = *std::move(snapshot);
  absl::StatusOr<std::string> dir = WriteCheckpoint(env, "/c", state, /*max_file_bytes=*/64 << 10);
  EXPECT_TRUE(dir.ok()) << dir.status();
  return dir.ok() ? *dir : "";
}

CheckpointStreamOptions SmallChunks(int threads) {
  CheckpointStreamOptions o;
  o.chunk_bytes = 5000;  // not a multiple of 4: chunks split floats between copies
  o.reader_threads = threads;
  return o;
}

TEST(ReplicaRestoreTest, StreamedRestoreIsByteExactAndTrainsOnIdentically) {
  auto env = NewMemEnv();
  auto trained = ModelReplica::Create(testing::TinyReplicaConfig());
  ASSERT_TRUE(trained.ok()) << trained.status();
  Train(trained->get(), 0, 3);
  const std::string dir = WriteState(env.get(), **trained, 3);
  ASSERT_GE(env->ListDir(dir)->size(), 4u) << "expected several tensor files";
  const auto expected = Bytes(**trained);
  for (int threads : {1, 3}) {
    auto restored = ModelReplica::Create(testing::TinyReplicaConfig(/*seed=*/5));  // different initial weights
    ASSERT_TRUE(restored.ok());
    ASSERT_NE(Bytes(**restored), expected);
    absl::StatusOr<ModelReplica::RestoreStats> stats =
        (*restored)->RestoreFrom(env.get(), Clock::Real(), dir, 3, SmallChunks(threads));
    ASSERT_TRUE(stats.ok()) << stats.status();
    EXPECT_FALSE((*restored)->partially_restored());
    EXPECT_FALSE((*restored)->at_initial_state());
    const auto got = Bytes(**restored);
    ASSERT_EQ(got.size(), expected.size());
    for (size_t i = 0; i < got.size(); ++i) {
      EXPECT_EQ(got[i].first, expected[i].first);
      EXPECT_TRUE(got[i].second == expected[i].second) << got[i].first << " differs after the restore";
    }
    uint64_t total = 0;
    for (const auto& [name, bytes] : expected) total += bytes.size();
    EXPECT_EQ(stats->stream.bytes, total);
    // The optimizer's step count and moments came back too: the next step is the same.
    auto reference = ModelReplica::Create(testing::TinyReplicaConfig());
    ASSERT_TRUE(reference.ok());
    Train(reference->get(), 0, 4);
    Train(restored->get(), 3, 1);
    EXPECT_EQ((*restored)->ParameterFingerprint(), (*reference)->ParameterFingerprint()) << threads << " threads";
  }
}

TEST(ReplicaRestoreTest, AFlippedByteInTheLastFileLeavesTheReplicaUnusableUntilAGoodRestore) {
  auto mem = NewMemEnv();
  FaultInjectionEnv env(mem.get());
  auto trained = ModelReplica::Create(testing::TinyReplicaConfig());
  ASSERT_TRUE(trained.ok());
  Train(trained->get(), 0, 2);
  const std::string good = WriteState(&env, **trained, 2);
  const auto good_bytes = Bytes(**trained);
  Train(trained->get(), 2, 2);
  const std::string bad = WriteState(&env, **trained, 4);
  auto manifest = ReadCheckpointManifest(&env, bad);
  ASSERT_TRUE(manifest.ok());
  const gyre::v1::FileEntry& last = manifest->files(manifest->files_size() - 1);
  ASSERT_GE(manifest->files_size(), 3);
  ASSERT_TRUE(env.FlipByte(JoinPath(bad, last.path()), last.bytes() / 2).ok());

  auto replica = ModelReplica::Create(testing::TinyReplicaConfig(/*seed=*/5));
  ASSERT_TRUE(replica.ok());
  const uint64_t initial = (*replica)->ParameterFingerprint();
  absl::StatusOr<ModelReplica::RestoreStats> restored = (*replica)->RestoreFrom(&env, Clock::Real(), bad, 4, SmallChunks(1));
  ASSERT_TRUE(absl::IsDataLoss(restored.status())) << restored.status();
  EXPECT_NE(restored.status().message().find(JoinPath(bad, last.path())), std::string_view::npos) << restored.status();
  EXPECT_NE(restored.status().message().find("checksum"), std::string_view::npos) << restored.status();
  // The earlier files did reach the parameters: this is the case the flag exists for.
  EXPECT_NE((*replica)->ParameterFingerprint(), initial);
  EXPECT_TRUE((*replica)->partially_restored());
  EXPECT_FALSE((*replica)->at_initial_state());  // a fresh start rebuilds it (worker.cc)
  // Nothing may train it, checkpoint it or hand it to another member.
  SnapshotStaging staging(/*pinned=*/false);
  EXPECT_TRUE(absl::IsFailedPrecondition((*replica)->Snapshot(&staging).status()));
  EXPECT_TRUE(absl::IsFailedPrecondition((*replica)->ApplyUpdate(4).status()));
  testing::SingleRankCollective root;
  EXPECT_TRUE(absl::IsFailedPrecondition((*replica)->BroadcastState(&root, /*root=*/0)));

  // The previous good checkpoint (what the coordinator names after ReportBadCheckpoint) makes it
  // exact again.
  restored = (*replica)->RestoreFrom(&env, Clock::Real(), good, 2, SmallChunks(2));
  ASSERT_TRUE(restored.ok()) << restored.status();
  EXPECT_FALSE((*replica)->partially_restored());
  EXPECT_EQ(Bytes(**replica), good_bytes);
}

TEST(ReplicaRestoreTest, ATornCheckpointFailsBeforeAnythingIsWritten) {
  for (const std::string fault : {"short", "missing", "read-error", "wrong-step", "missing-manifest"}) {
    auto mem = NewMemEnv();
    FaultInjectionEnv env(mem.get());
    auto trained = ModelReplica::Create(testing::TinyReplicaConfig());
    ASSERT_TRUE(trained.ok());
    Train(trained->get(), 0, 2);
    const std::string dir = WriteState(&env, **trained, 2);
    auto manifest = ReadCheckpointManifest(&env, dir);
    ASSERT_TRUE(manifest.ok());
    const std::string last = JoinPath(dir, manifest->files(manifest->files_size() - 1).path());
    std::string expect_in_error = last;
    uint64_t step = 2;
    if (fault == "short") {
      ASSERT_TRUE(WriteFileAtomically(&env, last, mem->ReadFile(last)->substr(1)).ok());
    } else if (fault == "missing") {
      ASSERT_TRUE(env.RemoveFile(last).ok());
    } else if (fault == "read-error") {
      env.FailNthRead(1);  // the manifest
      expect_in_error = JoinPath(dir, "MANIFEST");
    } else if (fault == "wrong-step") {
      step = 3;
      expect_in_error = "step 2";
    } else {
      ASSERT_TRUE(env.RemoveFile(JoinPath(dir, "MANIFEST")).ok());
      expect_in_error = JoinPath(dir, "MANIFEST");
    }
    auto replica = ModelReplica::Create(testing::TinyReplicaConfig(/*seed=*/5));
    ASSERT_TRUE(replica.ok());
    const auto before = Bytes(**replica);
    absl::StatusOr<ModelReplica::RestoreStats> restored = (*replica)->RestoreFrom(&env, Clock::Real(), dir, step);
    ASSERT_TRUE(absl::IsDataLoss(restored.status())) << fault << ": " << restored.status();
    EXPECT_NE(restored.status().message().find(expect_in_error), std::string_view::npos) << restored.status();
    EXPECT_FALSE((*replica)->partially_restored()) << fault;
    EXPECT_TRUE((*replica)->at_initial_state()) << fault;
    EXPECT_EQ(Bytes(**replica), before) << fault << ": the replica was touched";
  }
}

// A checkpoint of another model (a tensor of the wrong size) is refused before anything is
// written, by both restore paths.
TEST(ReplicaRestoreTest, AMismatchedTensorIsRefusedBeforeAnythingIsWritten) {
  auto env = NewMemEnv();
  auto trained = ModelReplica::Create(testing::TinyReplicaConfig());
  ASSERT_TRUE(trained.ok());
  SnapshotStaging staging(/*pinned=*/false);
  absl::StatusOr<std::vector<TensorSnapshot>> snapshot = (*trained)->Snapshot(&staging);
  ASSERT_TRUE(snapshot.ok());
  std::vector<TensorSnapshot> tensors;
  for (const TensorSnapshot& t : *snapshot) {
    TensorSnapshot copy;
    copy.name = t.name;
    copy.dtype = t.dtype;
    copy.shape = t.shape;
    copy.bytes = std::string(t.data());
    tensors.push_back(std::move(copy));
  }
  tensors.back().bytes.resize(tensors.back().bytes.size() + 4);
  CheckpointState state;
  state.step = 0;
  state.tensors = tensors;
  absl::StatusOr<std::string> dir = WriteCheckpoint(env.get(), "/c", state, 64 << 10);
  ASSERT_TRUE(dir.ok());
  auto replica = ModelReplica::Create(testing::TinyReplicaConfig(/*seed=*/5));
  ASSERT_TRUE(replica.ok());
  const auto before = Bytes(**replica);
  absl::StatusOr<ModelReplica::RestoreStats> restored = (*replica)->RestoreFrom(env.get(), Clock::Real(), *dir, 0);
  ASSERT_TRUE(absl::IsDataLoss(restored.status())) << restored.status();
  EXPECT_NE(restored.status().message().find(tensors.back().name), std::string_view::npos) << restored.status();
  EXPECT_EQ(Bytes(**replica), before);
  EXPECT_FALSE((*replica)->partially_restored());
}

}  // namespace
}  // namespace gyre
