// `gyre sample` lists the same samples for every step whatever the world size (DESIGN.md
// section 3): W = 1, 2 and 3 over the same index, merged per step, must be identical; and a
// resumed listing (steps 3:6 alone) equals the tail of a full one (exact resume from a step).
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "dataloader/prepare.h"
#include "gtest/gtest.h"

namespace gyre::data {
namespace {

// TEST DOUBLE, not a tokenizer: one id per byte, EOS = 256 (the real BPE is tested in
// dataloader/tokenizer; here only the addressing matters).
class ByteEncoderForTest final : public DocumentEncoder {
 public:
  void Encode(std::string_view text, std::vector<uint32_t>* ids) const override {
    for (unsigned char c : text) ids->push_back(c);
  }
  uint32_t eos_id() const override { return 256; }
  uint32_t vocab_size() const override { return 257; }
  uint64_t fingerprint() const override { return 0x5eed; }
  std::string name() const override { return "bytes-test-double"; }
};

std::string Gyre() {
  return std::string(std::getenv("TEST_SRCDIR")) + "/gyre/cli/gyre";
}

// Runs a command; returns stdout, fails the test on a non-zero exit.
std::string RunCommand(const std::string& cmd) {
  FILE* p = popen((cmd + " 2>/dev/null").c_str(), "r");
  EXPECT_NE(p, nullptr);
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  EXPECT_EQ(pclose(p), 0) << cmd;
  return out;
}

// step -> sorted lines without the rank column.
std::map<uint64_t, std::set<std::string>> ByStep(const std::string& out, uint32_t world,
                                                 uint32_t rank) {
  std::map<uint64_t, std::set<std::string>> steps;
  for (absl::string_view line : absl::StrSplit(out, '\n', absl::SkipEmpty())) {
    if (line[0] == '#') continue;
    std::vector<std::string> cols = absl::StrSplit(line, '\t');
    EXPECT_EQ(cols.size(), 7u) << line;
    EXPECT_EQ(cols[1], std::to_string(rank));
    cols.erase(cols.begin() + 1);
    steps[std::stoull(cols[0])].insert(absl::StrJoin(cols, "\t"));
  }
  return steps;
}

TEST(SampleWorldTest, SameSamplesPerStepForAnyWorldSize) {
  const std::string root = std::string(std::getenv("TEST_TMPDIR")) + "/world";
  std::filesystem::remove_all(root);
  std::filesystem::create_directories(root + "/corpus/validation");
  {
    std::ofstream train(root + "/corpus/train.jsonl");
    for (int i = 0; i < 400; ++i) {
      train << "{\"text\":\"document " << i << " " << std::string(i % 37 + 5, 'a' + i % 26)
            << "\",\"meta\":{\"pile_set_name\":\"" << (i % 4 == 0 ? "Github" : "Pile-CC")
            << "\"}}\n";
    }
    std::ofstream val(root + "/corpus/validation/v.jsonl");
    val << "{\"text\":\"held out\",\"meta\":{\"pile_set_name\":\"Pile-CC\"}}\n";
  }
  PrepareOptions options;
  options.out_dir = root + "/index";
  options.inputs = {root + "/corpus"};
  options.max_shard_tokens = 2000;  // many shards, so windows cross shard boundaries
  auto report = RunPrepare(ByteEncoderForTest(), options);
  ASSERT_TRUE(report.ok()) << report.status();

  const std::string base = absl::StrCat(Gyre(), " sample --index ", options.out_dir,
                                        " --seq-len 16 --global-batch 7 --seed 3 --mix-block 8");
  std::map<uint64_t, std::set<std::string>> reference;
  for (uint32_t world : {1u, 2u, 3u}) {
    std::map<uint64_t, std::set<std::string>> merged;
    size_t lines = 0;
    for (uint32_t rank = 0; rank < world; ++rank) {
      const std::string out = RunCommand(absl::StrCat(base, " --steps 0:6 --world ", world, " --rank ", rank));
      for (auto& [step, set] : ByStep(out, world, rank)) {
        lines += set.size();
        merged[step].insert(set.begin(), set.end());
      }
    }
    EXPECT_EQ(lines, 6u * 7u) << "world " << world;
    ASSERT_EQ(merged.size(), 6u);
    for (auto& [step, set] : merged) EXPECT_EQ(set.size(), 7u);
    if (world == 1) {
      reference = merged;
    } else {
      EXPECT_EQ(merged, reference) << "world " << world << " sees other samples";
    }
  }
  // Both sources appear, the validation source never does.
  std::string all;
  for (auto& [step, set] : reference) for (auto& l : set) all += l + "\n";
  EXPECT_NE(all.find("\tGithub\t"), std::string::npos);
  EXPECT_NE(all.find("\tPile-CC\t"), std::string::npos);
  EXPECT_EQ(all.find("validation"), std::string::npos);

  // Exact resume: steps 3..5 asked for alone equal those of the full listing.
  auto resumed = ByStep(RunCommand(absl::StrCat(base, " --steps 3:6 --world 1 --rank 0")), 1, 0);
  for (uint64_t step = 3; step < 6; ++step) EXPECT_EQ(resumed[step], reference[step]);

  // Another seed, other samples; a weight of 0 removes a source.
  auto other_seed = ByStep(RunCommand(absl::StrCat(Gyre(), " sample --index ", options.out_dir,
                                            " --seq-len 16 --global-batch 7 --seed 4 --steps 0:6")),
                           1, 0);
  EXPECT_NE(other_seed, reference);
  const std::string no_github = RunCommand(absl::StrCat(base, " --steps 0:6 --weights Github=0"));
  EXPECT_EQ(no_github.find("\tGithub\t"), std::string::npos);
}

}  // namespace
}  // namespace gyre::data
