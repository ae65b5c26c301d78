// `gyre prepare` + `gyre index stats` as users run them, with the real tokenizers: totals per
// source equal what the tokenizer gives for each document (+1 EOS), splits become separate
// validation sources, a re-run registers nothing twice, and the bad inputs of issue 3 (wrong
// tokenizer file, other tokenizer than the index's, missing path) fail with clear messages.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "dataloader/tokenizer/test_paths.h"
#include "dataloader/tokenizer/tokenizer.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "zstd.h"

namespace gyre {
namespace {

namespace fs = std::filesystem;

struct Result {
  int rc = -1;
  std::string out;  // stdout + stderr
};

Result Shell(const std::string& cmd) {
  Result r;
  FILE* p = popen(("(" + cmd + ") 2>&1").c_str(), "r");
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) r.out.append(buf, n);
  const int status = pclose(p);
  r.rc = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

std::string Gyre() { return tokenizer_testing::Runfile("cli/gyre"); }

void WriteFile(const std::string& path, const std::string& bytes, bool zstd) {
  fs::create_directories(fs::path(path).parent_path());
  std::string data = bytes;
  if (zstd) {
    data.resize(ZSTD_compressBound(bytes.size()));
    data.resize(ZSTD_compress(data.data(), data.size(), bytes.data(), bytes.size(), 3));
  }
  std::ofstream(path, std::ios::binary) << data;
}

struct Doc {
  std::string json_text;  // as escaped in the file
  std::string text;       // what the reader must decode
  std::string source;
};

TEST(PrepareCliTest, TotalsSplitsResumeAndBadInputs) {
  const std::string neox = tokenizer_testing::NeoxTokenizerJson();
  const std::string gpt2 = tokenizer_testing::Gpt2Dir();
  if (!fs::exists(neox) || !fs::exists(gpt2)) {
    GTEST_SKIP() << "tokenizer files missing: " << neox << " / " << gpt2 << " (tools/setup.sh)";
  }
  auto tokenizer = Tokenizer::Load(gpt2);
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();

  const std::string root = std::string(std::getenv("TEST_TMPDIR")) + "/cli";
  fs::remove_all(root);
  // SlimPajama escaping: \uXXXX, \/ and a lone surrogate.
  const std::vector<Doc> train0 = {
      {R"(Caf\u00e9 au lait \u2014 http:\/\/example.org\/a)", "Caf\xC3\xA9 au lait \xE2\x80\x94 http://example.org/a", "RedPajamaC4"},
      {R"(def f(x):\n    return x \/ 2\n)", "def f(x):\n    return x / 2\n", "RedPajamaGithub"},
      {R"(broken \ud809 surrogate and a pair \ud83d\ude00)", "broken \xEF\xBF\xBD surrogate and a pair \xF0\x9F\x98\x80", "RedPajamaC4"},
  };
  const std::vector<Doc> train1 = {{"   leading spaces and\\ttabs", "   leading spaces and\ttabs", "RedPajamaC4"}};
  const std::vector<Doc> holdout = {{"held out text", "held out text", "RedPajamaC4"}};
  auto lines = [](const std::vector<Doc>& docs) {
    std::string s;
    for (const Doc& d : docs) {
      s += absl::StrCat("{\"text\":\"", d.json_text, "\",\"meta\":{\"redpajama_set_name\":\"",
                        d.source, "\"}}\n");
    }
    return s;
  };
  WriteFile(root + "/sp/train/chunk1/example_train_0.jsonl.zst", lines(train0), true);
  WriteFile(root + "/sp/train/chunk1/example_train_1.jsonl", lines(train1) + "{oops\n", false);
  WriteFile(root + "/sp/validation/chunk1/example_holdout_0.jsonl.zst", lines(holdout), true);

  std::map<std::string, std::pair<uint64_t, uint64_t>> want;  // source -> (docs, tokens)
  auto expect = [&](const std::vector<Doc>& docs, const std::string& suffix) {
    for (const Doc& d : docs) {
      auto& w = want[d.source + suffix];
      w.first += 1;
      w.second += (*tokenizer)->Encode(d.text).size() + 1;
    }
  };
  expect(train0, "");
  expect(train1, "");
  expect(holdout, "/validation");

  const std::string idx = root + "/idx";
  const std::string prepare = absl::StrCat(Gyre(), " prepare --tokenizer ", gpt2, " --out ", idx,
                                           " --threads 2 --max-bad-fraction 0.5 ", root, "/sp");
  Result first = Shell(prepare);
  ASSERT_EQ(first.rc, 0) << first.out;
  EXPECT_NE(first.out.find("malformed_json=1"), std::string::npos) << first.out;
  EXPECT_NE(first.out.find("example_train_1.jsonl:2: malformed_json"), std::string::npos) << first.out;

  auto stats = [&] {
    Result r = Shell(absl::StrCat(Gyre(), " index stats --json --index ", idx));
    EXPECT_EQ(r.rc, 0) << r.out;
    return nlohmann::json::parse(r.out);
  };
  nlohmann::json s = stats();
  EXPECT_EQ(s["tokenizer"]["vocab_size"].get<uint32_t>(), 50257u);
  EXPECT_EQ(s["tokenizer"]["eos_id"].get<uint32_t>(), 50256u);
  std::map<std::string, std::pair<uint64_t, uint64_t>> got;
  for (const auto& row : s["sources"]) {
    got[row["source"].get<std::string>()] = {row["documents"].get<uint64_t>(),
                                             row["tokens"].get<uint64_t>()};
    EXPECT_EQ(row["validation"].get<bool>(),
              row["source"].get<std::string>().find("/validation") != std::string::npos);
    EXPECT_GT(row["bytes"].get<uint64_t>(), 64u * row["shards"].get<uint64_t>());
  }
  EXPECT_EQ(got, want);

  // Re-running the same command registers nothing twice.
  Result again = Shell(prepare);
  ASSERT_EQ(again.rc, 0) << again.out;
  EXPECT_NE(again.out.find("0 inputs registered, 3 already in the index"), std::string::npos) << again.out;
  EXPECT_EQ(stats()["total"], s["total"]);

  // Another tokenizer than the index's.
  Result other = Shell(absl::StrCat(Gyre(), " prepare --tokenizer ", neox, " --out ", idx, " ", root, "/sp"));
  EXPECT_EQ(other.rc, 1);
  EXPECT_NE(other.out.find("was written with tokenizer"), std::string::npos) << other.out;
  // A tokenizer file of the wrong kind.
  Result wrong = Shell(absl::StrCat(Gyre(), " prepare --tokenizer ", root,
                                  "/sp/train/chunk1/example_train_1.jsonl --out ", root, "/idx2 ", root, "/sp"));
  EXPECT_EQ(wrong.rc, 2);
  EXPECT_NE(wrong.out.find("--tokenizer"), std::string::npos) << wrong.out;
  EXPECT_FALSE(fs::exists(root + "/idx2"));
  // A missing input path.
  Result missing = Shell(absl::StrCat(Gyre(), " prepare --tokenizer ", gpt2, " --out ", idx, " ", root, "/nope.jsonl.zst"));
  EXPECT_EQ(missing.rc, 2);
  EXPECT_NE(missing.out.find("nope.jsonl.zst"), std::string::npos) << missing.out;

  // The samples of step 0 read real tokens from this index.
  Result sample = Shell(absl::StrCat(Gyre(), " sample --index ", idx, " --seq-len 4 --global-batch 3 --steps 0:2"));
  EXPECT_EQ(sample.rc, 0) << sample.out;
  EXPECT_NE(sample.out.find("\tRedPajamaC4\t"), std::string::npos) << sample.out;
  EXPECT_EQ(sample.out.find("validation"), std::string::npos) << sample.out;
}

// Ctrl-C in the middle of a job, then the same command again: the index (and so every sample)
// equals the one an uninterrupted run writes. The interrupt may land at any point, or after the
// end on a fast machine; the assertion holds either way and the log says which happened.
TEST(PrepareCliTest, CtrlCThenRerunGivesTheSameIndex) {
  const std::string gpt2 = tokenizer_testing::Gpt2Dir();
  if (!fs::exists(gpt2)) GTEST_SKIP() << "GPT-2 files missing: " << gpt2;
  const std::string root = std::string(std::getenv("TEST_TMPDIR")) + "/ctrlc";
  fs::remove_all(root);
  for (int f = 0; f < 12; ++f) {
    std::string lines;
    for (int i = 0; lines.size() < (1u << 20); ++i) {
      lines += absl::StrCat("{\"text\":\"file ", f, " document ", i,
                            " says the quick brown fox jumps over the lazy dog ", i * 7919 % 1000,
                            " times.\",\"meta\":{\"pile_set_name\":\"",
                            i % 5 == 0 ? "Github" : "Pile-CC", "\"}}\n");
    }
    WriteFile(absl::StrCat(root, "/in/", f, ".jsonl"), lines, false);
  }
  auto prepare = [&](const std::string& out) {
    return absl::StrCat(Gyre(), " prepare --threads 2 --tokenizer ", gpt2, " --out ", out, " ",
                        root, "/in");
  };
  const auto start = std::chrono::steady_clock::now();
  ASSERT_EQ(Shell(prepare(root + "/ref")).rc, 0);
  // Interrupt at about 60% of an uninterrupted run's time (tokenizer loading included).
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  Result interrupted = Shell(absl::StrCat(prepare(root + "/idx"), " & pid=$!; sleep ",
                                          absl::StrFormat("%.2f", 0.6 * secs),
                                          "; kill -INT $pid; wait $pid; echo rc=$?"));
  std::printf("interrupted run:\n%s\n", interrupted.out.c_str());
  const bool was_interrupted = interrupted.out.find("rc=130") != std::string::npos;
  if (was_interrupted) {
    EXPECT_NE(interrupted.out.find("run the same command again"), std::string::npos) << interrupted.out;
  }
  Result resumed = Shell(prepare(root + "/idx"));
  ASSERT_EQ(resumed.rc, 0) << resumed.out;
  auto listing = [&](const std::string& idx) {
    Result r = Shell(absl::StrCat(Gyre(), " sample --index ", idx,
                                  " --seq-len 64 --global-batch 32 --steps 0:20 --seed 9 2>/dev/null"));
    EXPECT_EQ(r.rc, 0);
    return r.out;
  };
  EXPECT_EQ(listing(root + "/idx"), listing(root + "/ref"));
  auto totals = [&](const std::string& idx) {
    auto j = nlohmann::json::parse(Shell(absl::StrCat(Gyre(), " index stats --json --index ", idx)).out);
    return j["sources"].dump();
  };
  EXPECT_EQ(totals(root + "/idx"), totals(root + "/ref"));
}

}  // namespace
}  // namespace gyre
