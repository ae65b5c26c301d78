#include "eval/perplexity.h"

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <set>

#include "dataloader/shard.h"
#include "eval/test_models.h"
#include "gtest/gtest.h"

namespace gyre::eval {
namespace {

constexpr int64_t kVocab = 23;

// Token t of source number s: a deterministic, non-constant id < kVocab.
uint32_t TokenOf(uint32_t s, uint64_t t) { return static_cast<uint32_t>((t * t * 3 + t * 5 + s * 7) % kVocab); }

class PerplexityTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const char* base = std::getenv("TEST_TMPDIR");
    dir_ = std::string(base ? base : "/tmp") + "/ppl_index";
    std::filesystem::remove_all(dir_);
    auto index = data::TokenIndex::Open(dir_, data::TokenIndex::Mode::kReadWrite);
    ASSERT_TRUE(index.ok()) << index.status();
    gyre::v1::IndexMeta meta;
    meta.set_tokenizer_fingerprint(5);
    ASSERT_TRUE((*index)->WriteMeta(meta).ok());
    // name, split, shard sizes
    const std::vector<std::tuple<std::string, std::string, std::vector<uint64_t>>> layout = {
        {"books", "train", {700}}, {"books/validation", "validation", {300, 211}}, {"code/test", "test", {150}}};
    uint32_t s = 0;
    for (const auto& [name, split, sizes] : layout) {
      data::TokenIndex::InputCommit commit;
      commit.input.set_path(name);
      uint64_t t = 0;
      for (size_t i = 0; i < sizes.size(); ++i) {
        const std::string rel = "shards/" + std::to_string(s) + "-" + std::to_string(i) + ".tok";
        auto w = data::ShardWriter::Create(Env::Default(), dir_ + "/" + rel, 2, 5);
        ASSERT_TRUE(w.ok());
        std::vector<uint32_t> ids;
        for (uint64_t k = 0; k < sizes[i]; ++k, ++t) ids.push_back(TokenOf(s, t));
        ASSERT_TRUE((*w)->AppendDocument(ids).ok());
        auto h = (*w)->Finish();
        ASSERT_TRUE(h.ok());
        data::TokenIndex::NewShard shard;
        shard.source = name;
        shard.split = split;
        shard.path = rel;
        shard.tokens = h->tokens;
        shard.documents = 1;
        shard.payload_checksum = h->payload_checksum;
        commit.shards.push_back(shard);
      }
      ASSERT_TRUE((*index)->CommitInput(commit).ok());
      ++s;
    }
    auto model = ops::LanguageModel::Create(testing::TinySpec("mamba2", 1, kVocab), ops::DType::kF32,
                                            ops::Device::kCpu, 4);
    ASSERT_TRUE(model.ok());
    model_ = std::move(*model);
  }

  // Mean next-token cross-entropy of window j of source number s, from the full logits.
  double ReferenceNats(uint32_t s, uint64_t j, int64_t L) {
    std::vector<int32_t> in(L);
    for (int64_t t = 0; t < L; ++t) in[t] = static_cast<int32_t>(TokenOf(s, j * L + t));
    ops::Tensor logits = model_->Logits(in, 1, L);
    double nats = 0;
    for (int64_t t = 0; t < L; ++t) {
      double mx = -1e300, sum = 0;
      for (int64_t v = 0; v < kVocab; ++v) mx = std::max(mx, logits.At(t * kVocab + v));
      for (int64_t v = 0; v < kVocab; ++v) sum += std::exp(logits.At(t * kVocab + v) - mx);
      nats += mx + std::log(sum) - logits.At(t * kVocab + TokenOf(s, j * L + t + 1));
    }
    return nats;
  }

  std::string dir_;
  std::unique_ptr<ops::LanguageModel> model_;
};

TEST_F(PerplexityTest, HeldOutSourcesOnlyAndLossMatchesTheFullForward) {
  auto index = data::TokenIndex::Open(dir_, data::TokenIndex::Mode::kReadOnly);
  ASSERT_TRUE(index.ok());
  PerplexityOptions options;
  options.seq_len = 16;
  options.samples_per_source = 5;
  options.batch = 2;
  options.seed = 9;
  absl::StatusOr<PerplexityReport> report = EvaluatePerplexity(Env::Default(), **index, model_.get(), options);
  ASSERT_TRUE(report.ok()) << report.status();
  ASSERT_EQ(report->sources.size(), 2u);  // "books" is training data
  EXPECT_EQ(report->sources[0].name, "books/validation");
  EXPECT_EQ(report->sources[0].split, "validation");
  EXPECT_EQ(report->sources[1].name, "code/test");
  EXPECT_EQ(report->sources[0].windows_available, (511u - 1) / 16);  // 31: spans both shards
  EXPECT_EQ(report->sources[1].windows_available, (150u - 1) / 16);   // 9
  double all_nats = 0;
  int64_t all_tokens = 0;
  for (uint32_t k = 0; k < 2; ++k) {
    const SourcePerplexity& src = report->sources[k];
    ASSERT_EQ(src.windows.size(), 5u);
    EXPECT_EQ(std::set<uint64_t>(src.windows.begin(), src.windows.end()).size(), 5u);
    double nats = 0;
    for (uint64_t j : src.windows) {
      EXPECT_LT(j, src.windows_available);
      nats += ReferenceNats(k + 1, j, 16);
    }
    EXPECT_EQ(src.tokens, 5 * 16);
    EXPECT_NEAR(src.loss, nats / (5 * 16), 1e-4) << src.name;
    EXPECT_NEAR(src.perplexity, std::exp(src.loss), 1e-9);
    all_nats += nats;
    all_tokens += src.tokens;
  }
  EXPECT_EQ(report->tokens, all_tokens);
  EXPECT_NEAR(report->loss, all_nats / all_tokens, 1e-4);
}

TEST(HeldOutWindowsTest, SeededDistinctAndSpread) {
  const auto a = HeldOutWindows("s", 1000, 50, 1), b = HeldOutWindows("s", 1000, 50, 1);
  const auto c = HeldOutWindows("s", 1000, 50, 2), d = HeldOutWindows("t", 1000, 50, 1);
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
  EXPECT_NE(a, d);
  EXPECT_EQ(std::set<uint64_t>(a.begin(), a.end()).size(), 50u);
  EXPECT_TRUE(std::is_sorted(a.begin(), a.end()));
  EXPECT_GT(a.back() - a.front(), 500u);  // not a prefix of the source
  EXPECT_EQ(HeldOutWindows("s", 7, 50, 1), (std::vector<uint64_t>{0, 1, 2, 3, 4, 5, 6}));
}

TEST_F(PerplexityTest, BadRequestsNameTheSource) {
  auto index = data::TokenIndex::Open(dir_, data::TokenIndex::Mode::kReadOnly);
  ASSERT_TRUE(index.ok());
  PerplexityOptions options;
  options.seq_len = 16;
  options.sources = {"nope"};
  auto missing = EvaluatePerplexity(Env::Default(), **index, model_.get(), options);
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.status().message().find("no source \"nope\""), std::string::npos) << missing.status();
  options.sources = {"code/test"};
  options.seq_len = 400;
  auto too_long = EvaluatePerplexity(Env::Default(), **index, model_.get(), options);
  ASSERT_FALSE(too_long.ok());
  EXPECT_NE(too_long.status().message().find("code/test"), std::string::npos) << too_long.status();
  // A training source may be named; it is reported as such.
  options.sources = {"books"};
  options.seq_len = 16;
  options.samples_per_source = 2;
  auto train = EvaluatePerplexity(Env::Default(), **index, model_.get(), options);
  ASSERT_TRUE(train.ok()) << train.status();
  EXPECT_EQ(train->sources[0].split, "train");
  // A model whose vocabulary is smaller than the index's ids.
  auto small = ops::LanguageModel::Create(testing::TinySpec("llama", 1, 5), ops::DType::kF32, ops::Device::kCpu, 1);
  ASSERT_TRUE(small.ok());
  auto vocab = EvaluatePerplexity(Env::Default(), **index, small->get(), options);
  ASSERT_FALSE(vocab.ok());
  EXPECT_NE(vocab.status().message().find("outside the model's vocabulary"), std::string::npos) << vocab.status();
}

}  // namespace
}  // namespace gyre::eval
