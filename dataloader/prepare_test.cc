#include "dataloader/prepare.h"

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "base/fault_injection_env.h"
#include "dataloader/shard.h"
#include "dataloader/token_index.h"
#include "gtest/gtest.h"
#include "zstd.h"

namespace gyre::data {
namespace {

namespace fs = std::filesystem;

// TEST DOUBLE, not a tokenizer: one id per byte, EOS = 256. It lets these tests check every
// token of the output by hand; the real BPE tokenizer is tested in dataloader/tokenizer.
class ByteEncoderForTest final : public DocumentEncoder {
 public:
  explicit ByteEncoderForTest(uint64_t fingerprint = 0x5eed) : fingerprint_(fingerprint) {}
  void Encode(std::string_view text, std::vector<uint32_t>* ids) const override {
    for (unsigned char c : text) ids->push_back(c);
  }
  uint32_t eos_id() const override { return 256; }
  uint32_t vocab_size() const override { return 257; }
  uint64_t fingerprint() const override { return fingerprint_; }
  std::string name() const override { return "bytes-test-double"; }

 private:
  uint64_t fingerprint_;
};

std::string Zstd(const std::string& s) {
  std::string out(ZSTD_compressBound(s.size()), '\0');
  out.resize(ZSTD_compress(out.data(), out.size(), s.data(), s.size(), 3));
  return out;
}

class PrepareTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const char* base = std::getenv("TEST_TMPDIR");
    root_ = std::string(base ? base : "/tmp") + "/prepare_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name();
    fs::remove_all(root_);
    fs::create_directories(root_);
  }
  std::string Write(const std::string& rel, const std::string& bytes) {
    const std::string path = root_ + "/" + rel;
    fs::create_directories(fs::path(path).parent_path());
    std::ofstream(path, std::ios::binary) << bytes;
    return path;
  }
  PrepareOptions Options(std::vector<std::string> inputs) {
    PrepareOptions o;
    o.out_dir = root_ + "/index";
    o.inputs = std::move(inputs);
    o.threads = 2;
    return o;
  }
  // All tokens of `source`, decoded back to text with EOS shown as '|'.
  std::string SourceText(const std::string& source) {
    auto index = TokenIndex::Open(root_ + "/index", TokenIndex::Mode::kReadOnly);
    EXPECT_TRUE(index.ok()) << index.status();
    auto shards = (*index)->ListShards(source);
    EXPECT_TRUE(shards.ok());
    std::string text;
    for (const auto& rec : *shards) {
      auto reader = ShardReader::Open(Env::Default(), root_ + "/index/" + rec.path(),
                                      {.verify_checksum = true});
      EXPECT_TRUE(reader.ok()) << reader.status();
      std::vector<uint32_t> ids((*reader)->tokens());
      EXPECT_TRUE((*reader)->Read(0, ids).ok());
      for (uint32_t id : ids) text.push_back(id == 256 ? '|' : static_cast<char>(id));
    }
    return text;
  }
  std::map<std::string, gyre::v1::SourceRecord> Sources() {
    auto index = TokenIndex::Open(root_ + "/index", TokenIndex::Mode::kReadOnly);
    EXPECT_TRUE(index.ok());
    std::map<std::string, gyre::v1::SourceRecord> out;
    auto sources = (*index)->ListSources();
    EXPECT_TRUE(sources.ok());
    for (auto& s : *sources) out[s.name()] = s;
    return out;
  }
  std::string root_;
};

TEST(SplitOfPathTest, SlimPajamaAndPileLayouts) {
  EXPECT_EQ(SplitOfPath("/d/SlimPajama/train/chunk1/example_train_0.jsonl.zst"), "train");
  EXPECT_EQ(SplitOfPath("/d/SlimPajama/validation/chunk1/example_holdout_0.jsonl.zst"), "validation");
  EXPECT_EQ(SplitOfPath("/d/SlimPajama/test/chunk3/example_holdout_9.jsonl.zst"), "test");
  EXPECT_EQ(SplitOfPath("/d/pile/train/00.jsonl.zst"), "train");
  EXPECT_EQ(SplitOfPath("/d/pile/val.jsonl.zst"), "validation");
  EXPECT_EQ(SplitOfPath("/d/pile/test.jsonl.zst"), "test");
  EXPECT_EQ(SplitOfPath("/d/pile/testing.jsonl"), "train");
  // Folders far above the file never decide; the closest split name does.
  EXPECT_EQ(SplitOfPath("/home/me/test/SlimPajama/train/chunk1/example_train_0.jsonl.zst"), "train");
  EXPECT_EQ(SplitOfPath("/home/me/test/corpus/a/b.jsonl"), "train");
  EXPECT_EQ(SplitOfPath("/home/me/test/validation/b.jsonl"), "validation");
}

TEST_F(PrepareTest, SlimPajamaLayoutSourcesSplitsAndTotals) {
  Write("sp/train/chunk1/example_train_0.jsonl.zst",
        Zstd(R"({"text":"alpha","meta":{"redpajama_set_name":"RedPajamaC4"}})"
             "\n"
             R"({"text":"x\/y","meta":{"redpajama_set_name":"RedPajamaGithub"}})"
             "\n"
             R"({"text":"beta","meta":{"redpajama_set_name":"RedPajamaC4"}})"
             "\n"));
  Write("sp/train/chunk2/example_train_1.jsonl",
        R"({"text":"gamma","meta":{"redpajama_set_name":"RedPajamaC4"}})"
        "\n");
  Write("sp/validation/chunk1/example_holdout_0.jsonl.zst",
        Zstd(R"({"text":"held","meta":{"redpajama_set_name":"RedPajamaC4"}})"
             "\n"));
  auto report = RunPrepare(ByteEncoderForTest(), Options({root_ + "/sp"}));
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_TRUE(report->failed_inputs.empty());
  EXPECT_EQ(report->inputs_committed, 3u);
  auto sources = Sources();
  ASSERT_EQ(sources.size(), 3u);
  EXPECT_EQ(sources["RedPajamaC4"].documents(), 3u);
  EXPECT_EQ(sources["RedPajamaC4"].tokens(), 6u + 5u + 6u);  // bytes + EOS each
  EXPECT_FALSE(sources["RedPajamaC4"].validation());
  EXPECT_TRUE(sources["RedPajamaC4/validation"].validation());
  EXPECT_EQ(sources["RedPajamaC4/validation"].split(), "validation");
  // Document order: inputs in sorted path order, lines in file order.
  EXPECT_EQ(SourceText("RedPajamaC4"), "alpha|beta|gamma|");
  EXPECT_EQ(SourceText("RedPajamaGithub"), "x/y|");
  EXPECT_EQ(SourceText("RedPajamaC4/validation"), "held|");
  // Validation documents are indexed by default.
  auto index = TokenIndex::Open(root_ + "/index", TokenIndex::Mode::kReadOnly);
  auto docs = (*index)->ListDocs("RedPajamaC4/validation", 0);
  ASSERT_TRUE(docs.ok());
  ASSERT_EQ(docs->size(), 1u);
  EXPECT_EQ((*docs)[0].length(), 4u);
}

TEST_F(PrepareTest, BadLinesAreCountedAndGoodNeighboursKept) {
  const std::string path = Write("bad.jsonl",
                                 "{\"text\":\"good1\"}\n"
                                 "{\"text\":\"trunc\n"                       // line 2 malformed
                                 "{\"title\":\"no text\"}\n"                 // 3 missing_text
                                 "{\"text\":\"bad \xC3\x28\"}\n"             // 4 invalid_utf8
                                 "{\"text\":\"\"}\n"                         // 5 empty
                                 "\n"                                         // blank: ignored
                                 "{\"text\":\"lone \\ud809 pair \\ud83d\\ude00\"}\n"
                                 "{\"text\":\"good2\"}");
  PrepareOptions o = Options({path});
  o.max_bad_fraction = 0.5;
  o.fixed_source = "web";
  auto report = RunPrepare(ByteEncoderForTest(), o);
  ASSERT_TRUE(report.ok()) << report.status();
  ASSERT_TRUE(report->failed_inputs.empty());
  EXPECT_EQ(report->skipped["malformed_json"], 1u);
  EXPECT_EQ(report->skipped["missing_text"], 1u);
  EXPECT_EQ(report->skipped["invalid_utf8"], 1u);
  EXPECT_EQ(report->skipped["empty_document"], 1u);
  EXPECT_EQ(report->bad_lines, 3u);
  EXPECT_EQ(report->lone_surrogates, 1u);
  ASSERT_GE(report->skip_examples.size(), 3u);
  EXPECT_EQ(report->skip_examples[0].rfind(path + ":2: malformed_json", 0), 0u) << report->skip_examples[0];
  EXPECT_NE(report->skip_examples[1].find(":3: missing_text"), std::string::npos);
  EXPECT_EQ(SourceText("web"), "good1|lone \xEF\xBF\xBD pair \xF0\x9F\x98\x80|good2|");
}

TEST_F(PrepareTest, TooManyBadLinesFailsThatInputOnly) {
  const std::string bad = Write("a_bad.jsonl", "{\"text\":\"ok\"}\nnot json\nnot json\n");
  const std::string good = Write("b_good.jsonl", "{\"text\":\"fine\"}\n");
  auto report = RunPrepare(ByteEncoderForTest(), Options({bad, good}));
  ASSERT_TRUE(report.ok()) << report.status();
  ASSERT_EQ(report->failed_inputs.size(), 1u);
  EXPECT_EQ(report->failed_inputs[0].first, bad);
  EXPECT_NE(report->failed_inputs[0].second.message().find("max-bad-fraction"), std::string::npos);
  EXPECT_EQ(SourceText("default"), "fine|");
  // Nothing of the failed input is registered; re-running tries it again.
  auto again = RunPrepare(ByteEncoderForTest(), Options({bad, good}));
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->inputs_already_done, 1u);
  EXPECT_EQ(again->failed_inputs.size(), 1u);
  EXPECT_GT(again->orphans_removed, 0u);
}

TEST_F(PrepareTest, TruncatedZstdEmptyAndMissingInputs) {
  std::string text;
  for (int i = 0; i < 5000; ++i) text += "{\"text\":\"document number " + std::to_string(i) + "\"}\n";
  const std::string z = Zstd(text);
  const std::string truncated = Write("t.jsonl.zst", z.substr(0, z.size() / 2));
  const std::string empty = Write("e.jsonl", "");
  auto report = RunPrepare(ByteEncoderForTest(), Options({truncated, empty}));
  ASSERT_TRUE(report.ok()) << report.status();
  ASSERT_EQ(report->failed_inputs.size(), 1u);
  EXPECT_EQ(report->failed_inputs[0].first, truncated);
  EXPECT_NE(report->failed_inputs[0].second.message().find("truncated zstd"), std::string::npos);
  EXPECT_NE(report->failed_inputs[0].second.message().find(truncated), std::string::npos);
  EXPECT_EQ(report->inputs_committed, 1u);  // the empty file, with no documents

  auto missing = RunPrepare(ByteEncoderForTest(), Options({root_ + "/nope.jsonl"}));
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find("nope.jsonl"), std::string::npos);
  auto no_match = RunPrepare(ByteEncoderForTest(), Options({root_ + "/*.parquet"}));
  EXPECT_EQ(no_match.status().code(), absl::StatusCode::kNotFound);
}

TEST_F(PrepareTest, OtherTokenizerIsRefusedAndAppendingWorks) {
  const std::string a = Write("a.jsonl", "{\"text\":\"one\"}\n");
  ASSERT_TRUE(RunPrepare(ByteEncoderForTest(), Options({a})).ok());
  auto other = RunPrepare(ByteEncoderForTest(0xbeef), Options({a}));
  ASSERT_EQ(other.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(other.status().message().find("bytes-test-double"), std::string::npos);
  const std::string b = Write("b.jsonl", "{\"text\":\"two\"}\n");
  auto appended = RunPrepare(ByteEncoderForTest(), Options({a, b}));
  ASSERT_TRUE(appended.ok()) << appended.status();
  EXPECT_EQ(appended->inputs_already_done, 1u);
  EXPECT_EQ(appended->inputs_committed, 1u);
  EXPECT_EQ(SourceText("default"), "one|two|");
  // A prepared input that changed size is refused rather than silently duplicated or skipped.
  Write("a.jsonl", "{\"text\":\"one, edited\"}\n");
  EXPECT_EQ(RunPrepare(ByteEncoderForTest(), Options({a, b})).status().code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST_F(PrepareTest, HundredMegabyteDocumentAndShardSplitting) {
  std::string body(100u << 20, 'a');
  const std::string path = Write("huge.jsonl", "{\"text\":\"" + body + "\"}\n{\"text\":\"tail\"}\n");
  PrepareOptions o = Options({path});
  o.max_shard_tokens = 1u << 20;
  auto report = RunPrepare(ByteEncoderForTest(), o);
  ASSERT_TRUE(report.ok()) << report.status();
  auto sources = Sources();
  EXPECT_EQ(sources["default"].tokens(), body.size() + 1 + 5);
  EXPECT_EQ(sources["default"].shards(), 2u);  // the huge document closes its shard
}

// Interrupt the job at every kind of point (a failing write, a cancel) and re-run: the final
// index must equal the one an uninterrupted run writes.
TEST_F(PrepareTest, ResumeAfterFailuresGivesTheSameIndex) {
  std::vector<std::string> inputs;
  for (int f = 0; f < 4; ++f) {
    std::string lines;
    for (int i = 0; i < 50; ++i) {
      lines += absl::StrCat("{\"text\":\"f", f, " doc ", i, "\",\"meta\":{\"pile_set_name\":\"",
                            i % 3 == 0 ? "Github" : "Pile-CC", "\"}}\n");
    }
    inputs.push_back(Write(absl::StrCat("in/", f, ".jsonl"), lines));
  }
  PrepareOptions reference = Options(inputs);
  reference.out_dir = root_ + "/reference";
  reference.max_shard_tokens = 300;
  ASSERT_TRUE(RunPrepare(ByteEncoderForTest(), reference).ok());
  auto snapshot = [&](const std::string& dir) {
    auto index = TokenIndex::Open(dir, TokenIndex::Mode::kReadOnly);
    EXPECT_TRUE(index.ok());
    std::string s;
    auto sources = (*index)->ListSources();
    EXPECT_TRUE(sources.ok());
    for (const auto& src : *sources) {
      absl::StrAppend(&s, src.name(), " ", src.tokens(), " ", src.documents(), "\n");
      auto shards = (*index)->ListShards(src.name());
      EXPECT_TRUE(shards.ok());
      for (const auto& sh : *shards) {
        absl::StrAppend(&s, " ", sh.ordinal(), " ", sh.path(), " ", sh.first_token(), " ",
                        sh.payload_checksum(), "\n");
      }
    }
    return s;
  };
  const std::string want = snapshot(reference.out_dir);

  for (int fail_at : {1, 5, 17, 40}) {
    const std::string dir = absl::StrCat(root_, "/resumed", fail_at);
    FaultInjectionEnv faulty(Env::Default());
    PrepareOptions o = Options(inputs);
    o.out_dir = dir;
    o.max_shard_tokens = 300;
    o.threads = 1;
    o.env = &faulty;
    faulty.FailNthMutation(fail_at, /*sticky=*/true);
    auto first = RunPrepare(ByteEncoderForTest(), o);
    EXPECT_TRUE(!first.ok() || !first->failed_inputs.empty()) << "fail_at " << fail_at;
    o.env = Env::Default();
    o.threads = 2;
    auto second = RunPrepare(ByteEncoderForTest(), o);
    ASSERT_TRUE(second.ok()) << second.status();
    EXPECT_TRUE(second->failed_inputs.empty());
    EXPECT_EQ(snapshot(dir), want) << "fail_at " << fail_at;
  }

  std::atomic<bool> cancel{true};
  PrepareOptions o = Options(inputs);
  o.out_dir = root_ + "/cancelled";
  o.max_shard_tokens = 300;
  EXPECT_EQ(RunPrepare(ByteEncoderForTest(), o, nullptr, &cancel).status().code(),
            absl::StatusCode::kCancelled);
  ASSERT_TRUE(RunPrepare(ByteEncoderForTest(), o).ok());
  EXPECT_EQ(snapshot(o.out_dir), want);
}

}  // namespace
}  // namespace gyre::data
