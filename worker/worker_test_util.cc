#include "worker/worker_test_util.h"

#include <cstdlib>
#include <filesystem>
#include <random>

#include "base/env.h"
#include "dataloader/shard.h"
#include "dataloader/token_index.h"
#include "gtest/gtest.h"

namespace gyre::testing {

std::string FreshTestDir(const std::string& name) {
  const char* base = std::getenv("TEST_TMPDIR");
  const std::string dir = std::string(base ? base : "/tmp") + "/" + name;
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

void WriteSyntheticIndex(const std::string& dir, uint32_t vocab) {
  auto index = data::TokenIndex::Open(dir, data::TokenIndex::Mode::kReadWrite);
  ASSERT_TRUE(index.ok()) << index.status();
  gyre::v1::IndexMeta meta;
  meta.set_tokenizer_fingerprint(7);
  ASSERT_TRUE((*index)->WriteMeta(meta).ok());
  const std::string rel = "shards/synthetic/0.tok";
  auto writer = data::ShardWriter::Create(Env::Default(), dir + "/" + rel, 2, 7);
  ASSERT_TRUE(writer.ok()) << writer.status();
  std::vector<uint32_t> ids;
  uint64_t x = 12345;
  for (int i = 0; i < 20000; ++i) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    ids.push_back(static_cast<uint32_t>((x >> 33) % vocab));
  }
  ASSERT_TRUE((*writer)->AppendDocument(ids).ok());
  auto header = (*writer)->Finish();
  ASSERT_TRUE(header.ok()) << header.status();
  data::TokenIndex::InputCommit commit;
  commit.input.set_path("synthetic");
  data::TokenIndex::NewShard shard;
  shard.source = "synthetic";
  shard.split = "train";
  shard.path = rel;
  shard.tokens = header->tokens;
  shard.documents = 1;
  shard.payload_checksum = header->payload_checksum;
  shard.dtype_bytes = 2;
  commit.shards.push_back(shard);
  ASSERT_TRUE((*index)->CommitInput(commit).ok());
}

gyre::v1::RunConfig TinyClusterRunConfig(const std::string& name, const std::string& index_dir,
                                         uint64_t max_steps) {
  gyre::v1::RunConfig c;
  c.set_name(name);
  c.set_seed(3);
  c.mutable_model()->set_preset("llama-tiny");
  c.mutable_model()->set_vocab_size(256);
  c.mutable_data()->set_index_dir(index_dir);
  c.mutable_data()->set_seq_len(16);
  c.mutable_data()->set_global_batch(2);
  c.mutable_optimizer()->set_lr(0.003);
  c.mutable_schedule()->set_warmup_steps(1);
  c.mutable_schedule()->set_total_steps(100);
  c.mutable_train()->set_max_steps(max_steps);
  c.mutable_checkpoint()->set_every_steps(2);
  c.mutable_checkpoint()->set_keep_last(5);
  c.mutable_cluster()->set_desired_workers(1);
  c.mutable_cluster()->set_heartbeat_interval_ms(100);
  c.mutable_cluster()->set_heartbeat_timeout_ms(5000);
  return c;
}

gyre::v1::RunConfig TinyReplicaConfig(uint64_t seed) {
  gyre::v1::RunConfig c;
  c.set_seed(seed);
  c.mutable_model()->set_preset("llama-tiny");
  c.mutable_optimizer()->set_lr(1e-2);
  c.mutable_schedule()->set_warmup_steps(2);
  c.mutable_schedule()->set_total_steps(100);
  return c;
}

std::vector<int32_t> RandomTokens(int64_t batch, int64_t seq, int vocab, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> t(batch * (seq + 1));
  for (auto& x : t) x = static_cast<int32_t>(rng() % vocab);
  return t;
}

}  // namespace gyre::testing
