#include "dataloader/shard.h"

#include <vector>

#include "base/fault_injection_env.h"
#include "base/mem_env.h"
#include "gtest/gtest.h"

namespace gyre::data {
namespace {

std::vector<uint32_t> Iota(uint32_t n, uint32_t start) {
  std::vector<uint32_t> v(n);
  for (uint32_t i = 0; i < n; ++i) v[i] = start + i;
  return v;
}

TEST(ShardTest, RoundTripsBothDtypes) {
  auto env = NewMemEnv();
  for (uint32_t dtype : {2u, 4u}) {
    const std::string path = "/idx/shards/s/" + std::to_string(dtype) + ".tok";
    auto writer = ShardWriter::Create(env.get(), path, dtype, 0xabcdef);
    ASSERT_TRUE(writer.ok()) << writer.status();
    const uint32_t base = dtype == 2 ? 100 : 70000;
    // Larger than the 1 MiB write buffer, so several flushes happen.
    const uint32_t mod = dtype == 2 ? 60000 : 0xFFFFFFFF;
    std::vector<uint32_t> doc1 = Iota(400000, base), doc2 = Iota(5, base + 7);
    for (auto& v : doc1) v %= mod;
    ASSERT_TRUE((*writer)->AppendDocument(doc1).ok());
    ASSERT_TRUE((*writer)->AppendDocument(doc2).ok());
    auto header = (*writer)->Finish();
    ASSERT_TRUE(header.ok()) << header.status();
    EXPECT_EQ(header->tokens, 400005u);
    EXPECT_EQ(header->documents, 2u);
    EXPECT_FALSE(env->Exists(path + ".tmp"));
    EXPECT_FALSE(env->Exists(path + ".payload.tmp"));

    auto reader = ShardReader::Open(env.get(), path, {.verify_checksum = true,
                                                      .expect_tokenizer_fingerprint = 0xabcdef});
    ASSERT_TRUE(reader.ok()) << reader.status();
    EXPECT_EQ((*reader)->tokens(), 400005u);
    EXPECT_EQ((*reader)->header().dtype_bytes, dtype);
    std::vector<uint32_t> got(6);
    ASSERT_TRUE((*reader)->Read(399999, got).ok());
    EXPECT_EQ(got[0], (base + 399999) % mod);
    EXPECT_EQ(got[1], base + 7);
    EXPECT_EQ(got[5], base + 11);
    std::vector<uint32_t> too_far(7);
    EXPECT_EQ((*reader)->Read(399999, too_far).code(), absl::StatusCode::kOutOfRange);
  }
}

TEST(ShardTest, RejectsIdsThatDoNotFitUint16) {
  auto env = NewMemEnv();
  auto writer = ShardWriter::Create(env.get(), "/s.tok", 2, 1);
  ASSERT_TRUE(writer.ok());
  std::vector<uint32_t> ids = {1, 65536};
  EXPECT_EQ((*writer)->AppendDocument(ids).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*writer)->tokens(), 0u);
}

TEST(ShardTest, CorruptionIsReportedWithTheFileName) {
  auto mem = NewMemEnv();
  FaultInjectionEnv env(mem.get());
  const std::string path = "/shards/a.tok";
  auto writer = ShardWriter::Create(&env, path, 2, 7);
  ASSERT_TRUE(writer.ok());
  std::vector<uint32_t> ids = Iota(1000, 1);
  ASSERT_TRUE((*writer)->AppendDocument(ids).ok());
  ASSERT_TRUE((*writer)->Finish().ok());

  // A flipped payload byte: the header still opens; the checksum names the file.
  ASSERT_TRUE(env.FlipByte(path, kShardHeaderBytes + 100).ok());
  auto lazy = ShardReader::Open(&env, path, {});
  ASSERT_TRUE(lazy.ok());
  absl::Status st = (*lazy)->VerifyChecksum();
  EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(st.message().find(path), std::string::npos) << st;
  auto eager = ShardReader::Open(&env, path, {.verify_checksum = true});
  EXPECT_EQ(eager.status().code(), absl::StatusCode::kDataLoss);
  ASSERT_TRUE(env.FlipByte(path, kShardHeaderBytes + 100).ok());  // undo

  // A flipped header byte (token count): the header checksum catches it.
  ASSERT_TRUE(env.FlipByte(path, 16).ok());
  auto bad_header = ShardReader::Open(&env, path, {});
  EXPECT_EQ(bad_header.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(bad_header.status().message().find(path), std::string::npos);
  ASSERT_TRUE(env.FlipByte(path, 16).ok());

  // Wrong tokenizer.
  auto other = ShardReader::Open(&env, path, {.expect_tokenizer_fingerprint = 8});
  EXPECT_EQ(other.status().code(), absl::StatusCode::kFailedPrecondition);

  // Not a shard at all / truncated.
  ASSERT_TRUE(WriteFileAtomically(&env, "/shards/b.tok", "hello").ok());
  EXPECT_EQ(ShardReader::Open(&env, "/shards/b.tok", {}).status().code(),
            absl::StatusCode::kDataLoss);
  auto bytes = env.ReadFile(path);
  ASSERT_TRUE(bytes.ok());
  ASSERT_TRUE(WriteFileAtomically(&env, "/shards/c.tok", bytes->substr(0, bytes->size() - 2)).ok());
  auto truncated = ShardReader::Open(&env, "/shards/c.tok", {});
  EXPECT_EQ(truncated.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(truncated.status().message().find("truncated"), std::string::npos);
}

// A crash at any point of writing a shard leaves either nothing or the complete shard under its
// final name, never a torn file.
TEST(ShardTest, CrashAtEveryMutationLeavesNoTornShard) {
  for (int fail_at = 1; fail_at < 20; ++fail_at) {
    auto mem = NewMemEnv();
    FaultInjectionEnv env(mem.get());
    ASSERT_TRUE(env.CreateDirs("/shards").ok());
    ASSERT_TRUE(env.SyncDir("/").ok());
    env.FailNthMutation(fail_at, /*sticky=*/true);
    const std::string path = "/shards/x.tok";
    absl::Status st;
    {
      auto writer = ShardWriter::Create(&env, path, 2, 3);
      st = writer.status();
      if (st.ok()) {
        std::vector<uint32_t> ids = Iota(300000, 0);
        for (auto& v : ids) v &= 0xFFFF;
        st = (*writer)->AppendDocument(ids);
        if (st.ok()) st = (*writer)->AppendDocument(ids);
        if (st.ok()) st = (*writer)->Finish().status();
      }
    }
    env.FailNthMutation(0);
    ASSERT_TRUE(env.SimulateCrash().ok());
    if (env.Exists(path)) {
      auto reader = ShardReader::Open(&env, path, {.verify_checksum = true});
      ASSERT_TRUE(reader.ok()) << "fail_at " << fail_at << ": " << reader.status();
      EXPECT_EQ((*reader)->tokens(), 600000u);
      EXPECT_TRUE(st.ok()) << "a failed write must not publish the shard";
    } else {
      EXPECT_FALSE(st.ok()) << "fail_at " << fail_at << ": write succeeded but shard is gone";
    }
  }
}

}  // namespace
}  // namespace gyre::data
