#include "dataloader/sampler.h"

#include <cstdlib>
#include <filesystem>
#include <algorithm>
#include <map>
#include <set>

#include "dataloader/permutation.h"
#include "dataloader/shard.h"
#include "dataloader/token_index.h"
#include "gtest/gtest.h"

namespace gyre::data {
namespace {

TEST(KeyedPermutationTest, IsABijectionForAwkwardSizes) {
  for (uint64_t n : {1ull, 2ull, 3ull, 5ull, 16ull, 17ull, 1000ull, 4097ull, 65536ull}) {
    for (uint64_t key : {0ull, 1ull, 0xdeadbeefull}) {
      KeyedPermutation perm(n, key);
      std::vector<bool> seen(n, false);
      for (uint64_t i = 0; i < n; ++i) {
        const uint64_t p = perm(i);
        ASSERT_LT(p, n);
        ASSERT_FALSE(seen[p]) << "n=" << n << " key=" << key << " i=" << i;
        seen[p] = true;
      }
    }
  }
}

TEST(KeyedPermutationTest, DifferentKeysGiveDifferentOrders) {
  KeyedPermutation a(1000, 1), b(1000, 2);
  int same = 0, fixed = 0;
  for (uint64_t i = 0; i < 1000; ++i) {
    same += a(i) == b(i);
    fixed += a(i) == i;
  }
  EXPECT_LT(same, 20);
  EXPECT_LT(fixed, 20);
}

TEST(RankSliceTest, SlicesTileTheStepForEveryWorldSize) {
  for (uint64_t batch : {1ull, 7ull, 64ull, 100ull}) {
    for (uint32_t world = 1; world <= 9; ++world) {
      for (uint64_t step : {0ull, 3ull}) {
        uint64_t next = step * batch;
        for (uint32_t r = 0; r < world; ++r) {
          SampleRange s = RankSlice(step, batch, world, r);
          EXPECT_EQ(s.first, next);
          EXPECT_LE(s.count, batch / world + 1);
          EXPECT_GE(s.count, batch / world);
          if (r > 0 && s.count > 0) {
            EXPECT_LE(s.count, RankSlice(step, batch, world, r - 1).count);
          }
          next += s.count;
        }
        EXPECT_EQ(next, (step + 1) * batch);
      }
    }
  }
}

std::vector<SourceInfo> ThreeSources() {
  return {{"big", 1000001, false}, {"small", 300001, false}, {"tiny", 5001, false},
          {"big/validation", 90000, true}};
}

TEST(MixScheduleTest, BlocksHoldExactlyTheirQuota) {
  SamplerOptions options;
  options.seq_len = 100;
  options.mix_block = 64;
  options.seed = 9;
  auto m = MixSchedule::Create(ThreeSources(), options);
  ASSERT_TRUE(m.ok()) << m.status();
  ASSERT_EQ(m->sources().size(), 3u);  // validation left out
  uint32_t total = 0;
  for (const auto& s : m->sources()) total += s.per_block;
  EXPECT_EQ(total, 64u);
  EXPECT_EQ(m->sources()[2].name, "tiny");
  EXPECT_EQ(m->sources()[2].per_block, 1u);  // 0.4% of 64 rounds to 0; every source gets one
  EXPECT_EQ(m->sources()[0].sequences, 10000u);
  for (uint64_t block = 0; block < 5; ++block) {
    std::vector<uint32_t> counts(3, 0);
    for (uint64_t k = 0; k < 64; ++k) counts[m->Locate(block * 64 + k).source]++;
    for (size_t s = 0; s < 3; ++s) EXPECT_EQ(counts[s], m->sources()[s].per_block);
  }
}

// The closed form equals replaying the stream: the counter of source s at g is the number of
// earlier samples of s; each epoch visits every sequence exactly once, in a permuted order.
TEST(MixScheduleTest, ClosedFormMatchesReplay) {
  SamplerOptions options;
  options.seq_len = 1000;
  options.mix_block = 16;
  options.seed = 1234;
  auto m = MixSchedule::Create(ThreeSources(), options);
  ASSERT_TRUE(m.ok());
  const uint64_t n_tiny = m->sources()[2].sequences;  // 5 sequences, 1 per block
  ASSERT_EQ(n_tiny, 5u);
  std::vector<uint64_t> drawn(3, 0);
  std::map<std::pair<uint32_t, uint64_t>, std::set<uint64_t>> starts;  // (source, epoch) -> starts
  std::vector<std::set<uint64_t>> block_counters(3);
  for (uint64_t g = 0; g < 16 * 40; ++g) {
    SampleAddress a = m->Locate(g);
    ASSERT_EQ(a.global, g);
    const auto& src = m->sources()[a.source];
    block_counters[a.source].insert(a.epoch * src.sequences + a.sequence);
    drawn[a.source]++;
    EXPECT_EQ(a.start_token % 1000, 0u);
    EXPECT_LE(a.start_token + 1001, src.tokens);
    const std::pair<uint32_t, uint64_t> key(a.source, a.epoch);
    EXPECT_TRUE(starts[key].insert(a.start_token).second)
        << "sequence repeated within an epoch at g=" << g;
    if (g % 16 == 15) {
      // Replay: after block b, source s has drawn exactly counters [0, (b+1) n_s).
      for (uint32_t s = 0; s < 3; ++s) {
        const uint64_t want = (g / 16 + 1) * m->sources()[s].per_block;
        ASSERT_EQ(block_counters[s].size(), want);
        ASSERT_EQ(*block_counters[s].rbegin(), want - 1);
        ASSERT_EQ(drawn[s], want);
      }
    }
  }
  // tiny: 40 blocks x 1 = 40 samples = 8 full epochs, each a permutation of all 5 windows.
  for (uint64_t e = 0; e < 8; ++e) {
    const std::pair<uint32_t, uint64_t> key(2, e);
    EXPECT_EQ(starts[key].size(), 5u);
  }
  for (size_t s = 0; s < 3; ++s) EXPECT_EQ(drawn[s], 40 * m->sources()[s].per_block);
}

TEST(MixScheduleTest, SameConfigSameSamplesOtherSeedOtherSamples) {
  SamplerOptions options;
  options.seq_len = 100;
  options.mix_block = 32;
  auto a = MixSchedule::Create(ThreeSources(), options);
  auto b = MixSchedule::Create(ThreeSources(), options);
  options.seed = 1;
  auto c = MixSchedule::Create(ThreeSources(), options);
  int differ = 0;
  for (uint64_t g = 0; g < 1000; ++g) {
    SampleAddress x = a->Locate(g), y = b->Locate(g), z = c->Locate(g);
    EXPECT_EQ(x.source, y.source);
    EXPECT_EQ(x.start_token, y.start_token);
    differ += x.start_token != z.start_token || x.source != z.source;
  }
  EXPECT_GT(differ, 900);
}

TEST(MixScheduleTest, WeightsOverrideExcludeAndReject) {
  SamplerOptions options;
  options.seq_len = 100;
  options.mix_block = 100;
  options.weights = {{"small", 0.0}};
  auto m = MixSchedule::Create(ThreeSources(), options);
  ASSERT_TRUE(m.ok());
  ASSERT_EQ(m->sources().size(), 2u);
  EXPECT_EQ(m->sources()[0].name, "big");
  EXPECT_EQ(m->sources()[1].name, "tiny");

  options.weights = {{"big", 1.0}, {"small", 1.0}, {"tiny", 2.0}};
  m = MixSchedule::Create(ThreeSources(), options);
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->sources()[0].per_block, 25u);
  EXPECT_EQ(m->sources()[1].per_block, 25u);
  EXPECT_EQ(m->sources()[2].per_block, 50u);

  options.weights = {{"nope", 1.0}};
  EXPECT_EQ(MixSchedule::Create(ThreeSources(), options).status().code(),
            absl::StatusCode::kInvalidArgument);
  options.weights = {{"big/validation", 1.0}};
  auto v = MixSchedule::Create(ThreeSources(), options);
  EXPECT_EQ(v.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(v.status().message().find("validation"), std::string::npos);
  options.weights = {{"big", -1.0}};
  EXPECT_EQ(MixSchedule::Create(ThreeSources(), options).status().code(),
            absl::StatusCode::kInvalidArgument);
  options.weights = {{"big", 0.0}, {"small", 0.0}, {"tiny", 0.0}};
  EXPECT_EQ(MixSchedule::Create(ThreeSources(), options).status().code(),
            absl::StatusCode::kFailedPrecondition);
}

// End to end through real shards: a source whose token t has id (t * 7 + source) % 60000, split
// over several shards of uneven size; every sample's window must be exactly those ids.
class SamplerShardsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const char* base = std::getenv("TEST_TMPDIR");
    dir_ = std::string(base ? base : "/tmp") + "/sampler_index";
    std::filesystem::remove_all(dir_);
    auto index = TokenIndex::Open(dir_, TokenIndex::Mode::kReadWrite);
    ASSERT_TRUE(index.ok());
    gyre::v1::IndexMeta meta;
    meta.set_tokenizer_fingerprint(77);
    ASSERT_TRUE((*index)->WriteMeta(meta).ok());
    const std::vector<std::pair<std::string, std::vector<uint64_t>>> layout = {
        {"alpha", {1000, 37, 5000}}, {"beta", {2501}}};
    uint32_t source_id = 0;
    for (const auto& [name, sizes] : layout) {
      uint64_t t = 0;
      TokenIndex::InputCommit commit;
      commit.input.set_path(name);
      for (size_t i = 0; i < sizes.size(); ++i) {
        const std::string rel = "shards/" + name + "/" + std::to_string(i) + ".tok";
        auto w = ShardWriter::Create(Env::Default(), dir_ + "/" + rel, 2, 77);
        ASSERT_TRUE(w.ok());
        std::vector<uint32_t> ids;
        for (uint64_t k = 0; k < sizes[i]; ++k, ++t) ids.push_back(Expected(source_id, t));
        ASSERT_TRUE((*w)->AppendDocument(ids).ok());
        auto h = (*w)->Finish();
        ASSERT_TRUE(h.ok());
        TokenIndex::NewShard s;
        s.source = name;
        s.split = "train";
        s.path = rel;
        s.tokens = h->tokens;
        s.documents = 1;
        s.payload_checksum = h->payload_checksum;
        s.dtype_bytes = 2;
        commit.shards.push_back(s);
      }
      ASSERT_TRUE((*index)->CommitInput(commit).ok());
      ++source_id;
    }
  }
  static uint32_t Expected(uint32_t source, uint64_t t) { return (t * 7 + source) % 60000; }
  std::string dir_;
};

TEST_F(SamplerShardsTest, WindowsAreTheSourceTokensAcrossShardBoundaries) {
  auto index = TokenIndex::Open(dir_, TokenIndex::Mode::kReadOnly);
  ASSERT_TRUE(index.ok());
  SamplerOptions options;
  options.seq_len = 64;
  options.mix_block = 8;
  options.seed = 5;
  auto sampler = Sampler::Open(Env::Default(), **index, options, {.verify_checksums = true});
  ASSERT_TRUE(sampler.ok()) << sampler.status();
  std::vector<uint32_t> window(65);
  int crossing = 0;
  for (uint64_t g = 0; g < 400; ++g) {
    SampleAddress a = (*sampler)->Locate(g);
    ASSERT_TRUE((*sampler)->Read(g, window).ok());
    const uint32_t source = (*sampler)->schedule().sources()[a.source].name == "alpha" ? 0 : 1;
    for (uint64_t i = 0; i < 65; ++i) {
      ASSERT_EQ(window[i], Expected(source, a.start_token + i)) << "g=" << g << " i=" << i;
    }
    crossing += source == 0 && ((a.start_token < 1000 && a.start_token + 65 > 1000) ||
                                (a.start_token < 1037 && a.start_token + 65 > 1037));
  }
  EXPECT_GT(crossing, 0) << "no window crossed a shard boundary; the test lost its point";
  std::vector<uint32_t> wrong(64);
  EXPECT_EQ((*sampler)->Read(0, wrong).code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(SamplerShardsTest, SourceTokensReadsAnySourceInOrder) {
  auto index = TokenIndex::Open(dir_, TokenIndex::Mode::kReadOnly);
  ASSERT_TRUE(index.ok());
  auto beta = OpenSourceTokens(Env::Default(), **index, "beta", true);
  ASSERT_TRUE(beta.ok()) << beta.status();
  EXPECT_EQ((*beta)->tokens(), 2501u);
  std::vector<uint32_t> tail(5);
  ASSERT_TRUE((*beta)->Read(2496, tail).ok());
  for (uint64_t i = 0; i < 5; ++i) EXPECT_EQ(tail[i], Expected(1, 2496 + i));
  EXPECT_EQ((*beta)->Read(2497, tail).code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(OpenSourceTokens(Env::Default(), **index, "nope", false).status().code(),
            absl::StatusCode::kNotFound);
}

TEST_F(SamplerShardsTest, MappedShardsStayBoundedAndReadsStayCorrect) {
  auto index = TokenIndex::Open(dir_, TokenIndex::Mode::kReadOnly);
  ASSERT_TRUE(index.ok());
  auto shards = (*index)->ListShards("alpha");
  ASSERT_TRUE(shards.ok());
  auto meta = (*index)->ReadMeta();
  auto alpha = SourceTokens::Open(Env::Default(), dir_, *shards, (*meta)->tokenizer_fingerprint(),
                                  true, /*max_open_shards=*/1);
  ASSERT_TRUE(alpha.ok());
  EXPECT_EQ((*alpha)->shards(), 3u);
  // Windows across all three shards, back and forth: at most one stays mapped.
  std::vector<uint32_t> window(1100);
  for (uint64_t begin : {0ull, 4900ull, 10ull, 990ull, 3000ull, 0ull}) {
    ASSERT_TRUE((*alpha)->Read(begin, window).ok());
    for (uint64_t i = 0; i < window.size(); ++i) ASSERT_EQ(window[i], Expected(0, begin + i));
    EXPECT_EQ((*alpha)->open_shards(), 1u);
  }
}

TEST_F(SamplerShardsTest, ReadRangeIsRowsOfRead) {
  auto index = TokenIndex::Open(dir_, TokenIndex::Mode::kReadOnly);
  SamplerOptions options;
  options.seq_len = 16;
  options.mix_block = 8;
  auto sampler = Sampler::Open(Env::Default(), **index, options, {});
  ASSERT_TRUE(sampler.ok());
  const SampleRange range = RankSlice(/*step=*/3, /*global_batch=*/10, /*world=*/3, /*rank=*/1);
  std::vector<uint32_t> batch(range.count * 17), row(17);
  ASSERT_TRUE((*sampler)->ReadRange(range, batch).ok());
  for (uint64_t k = 0; k < range.count; ++k) {
    ASSERT_TRUE((*sampler)->Read(range.first + k, row).ok());
    EXPECT_TRUE(std::equal(row.begin(), row.end(), batch.begin() + k * 17));
  }
  EXPECT_EQ((*sampler)->ReadRange(range, row).code(), absl::StatusCode::kInvalidArgument);
}

TEST(SamplerOptionsTest, FromConfigAppliesDefaults) {
  gyre::v1::RunConfig config;
  config.set_seed(11);
  SamplerOptions o = SamplerOptionsFromConfig(config);
  EXPECT_EQ(o.seq_len, 2048u);
  EXPECT_EQ(o.mix_block, 1024u);
  EXPECT_EQ(o.seed, 11u);
  config.mutable_data()->set_seq_len(512);
  auto* w = config.mutable_data()->add_weights();
  w->set_source("Github");
  w->set_weight(0);
  o = SamplerOptionsFromConfig(config);
  EXPECT_EQ(o.seq_len, 512u);
  ASSERT_EQ(o.weights.count("Github"), 1u);
  EXPECT_EQ(o.weights["Github"], 0.0);
}

TEST_F(SamplerShardsTest, CorruptShardIsNamed) {
  const std::string victim = dir_ + "/shards/alpha/2.tok";
  {
    auto bytes = Env::Default()->ReadFile(victim);
    ASSERT_TRUE(bytes.ok());
    (*bytes)[kShardHeaderBytes + 10] ^= 1;
    ASSERT_TRUE(WriteFileAtomically(Env::Default(), victim, *bytes).ok());
  }
  auto index = TokenIndex::Open(dir_, TokenIndex::Mode::kReadOnly);
  ASSERT_TRUE(index.ok());
  SamplerOptions options;
  options.seq_len = 64;
  options.mix_block = 8;
  auto sampler = Sampler::Open(Env::Default(), **index, options, {.verify_checksums = true});
  ASSERT_TRUE(sampler.ok());
  std::vector<uint32_t> window(65);
  absl::Status first_error;
  for (uint64_t g = 0; g < 200 && first_error.ok(); ++g) first_error = (*sampler)->Read(g, window);
  EXPECT_EQ(first_error.code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(first_error.message().find("alpha/2.tok"), std::string::npos) << first_error;
}

}  // namespace
}  // namespace gyre::data
