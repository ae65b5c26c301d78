// Exactness against Hugging Face: every document of tools/golden/corpus.jsonl.zst (~6 MB of
// prose, code, dictionaries, markup, CJK, RTL, emoji, combining marks, white-space runs,
// numbers, every code point of planes 0-1) is encoded by the npm `tokenizers` package (the
// Hugging Face Rust library, pinned in tools/package.json) at test time and by Gyre; the ids
// must be identical, for GPT-2 and GPT-NeoX-20B. The first mismatch is reported with context.
#include <sys/wait.h>
#include <zstd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "dataloader/tokenizer/test_paths.h"
#include "dataloader/tokenizer/tokenizer.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace gyre {
namespace {

using tokenizer_testing::NeoxTokenizerJson;
using tokenizer_testing::Gpt2Dir;
using tokenizer_testing::NodeModules;
using tokenizer_testing::Runfile;

struct Doc {
  std::string source, name, text;
};

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string Unzstd(const std::string& compressed) {
  std::string out;
  ZSTD_DStream* ds = ZSTD_createDStream();
  ZSTD_initDStream(ds);
  ZSTD_inBuffer in{compressed.data(), compressed.size(), 0};
  std::vector<char> buf(1 << 20);
  while (in.pos < in.size) {
    ZSTD_outBuffer o{buf.data(), buf.size(), 0};
    const size_t r = ZSTD_decompressStream(ds, &o, &in);
    if (ZSTD_isError(r)) break;
    out.append(buf.data(), o.pos);
  }
  ZSTD_freeDStream(ds);
  return out;
}

std::vector<Doc> ReadCorpus(const std::string& path) {
  std::vector<Doc> docs;
  std::istringstream lines(Unzstd(ReadAll(path)));
  std::string line;
  while (std::getline(lines, line)) {
    if (line.empty()) continue;
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded()) continue;
    docs.push_back({j.value("source", ""), j.value("name", ""), j.value("text", "")});
  }
  return docs;
}

// Runs the golden script; returns the ids of each document, or fails the test.
std::vector<std::vector<uint32_t>> HfIds(const std::string& tokenizer, const std::string& corpus,
                                         const std::string& tag) {
  const char* tmp = std::getenv("TEST_TMPDIR");
  const std::string out = absl::StrCat(tmp ? tmp : "/tmp", "/golden_", tag, ".ids");
  const std::string cmd =
      absl::StrCat("node '", Runfile("tools/golden/golden_ids.js"), "' '", NodeModules(), "' '",
                   tokenizer, "' '", corpus, "' '", out, "' 2>&1");
  const int rc = std::system(cmd.c_str());
  std::vector<std::vector<uint32_t>> ids;
  if (rc != 0) {
    ADD_FAILURE() << "the golden script failed (rc " << rc << "): " << cmd
                  << "\n(node and tools/node_modules come from tools/setup.sh)";
    return ids;
  }
  const std::string bin = ReadAll(out);
  size_t pos = 0;
  while (pos + 4 <= bin.size()) {
    uint32_t n;
    std::memcpy(&n, bin.data() + pos, 4);
    pos += 4;
    std::vector<uint32_t> doc(n);
    if (pos + 4ull * n > bin.size()) break;
    std::memcpy(doc.data(), bin.data() + pos, 4ull * n);
    pos += 4ull * n;
    ids.push_back(std::move(doc));
  }
  return ids;
}

std::string Show(const Tokenizer& tok, const std::vector<uint32_t>& ids, size_t from, size_t to) {
  std::string s;
  for (size_t i = from; i < std::min(to, ids.size()); ++i) {
    auto piece = tok.Decode(std::span<const uint32_t>(&ids[i], 1));
    std::string p = piece.ok() ? *piece : "?";
    std::string esc;
    for (unsigned char c : p) {
      if (c < 0x20 || c == '|') {
        absl::StrAppend(&esc, "\\x", absl::Hex(c, absl::kZeroPad2));
      } else {
        esc.push_back(static_cast<char>(c));
      }
    }
    absl::StrAppend(&s, ids[i], "[", esc, "] ");
  }
  return s;
}

void CheckAgainstHf(const std::string& tokenizer_path, const std::string& tag) {
  const std::string corpus = Runfile("tools/golden/corpus.jsonl.zst");
  const std::vector<Doc> docs = ReadCorpus(corpus);
  ASSERT_GT(docs.size(), 500u) << "corpus " << corpus << " did not load";
  auto tok = Tokenizer::Load(tokenizer_path);
  ASSERT_TRUE(tok.ok()) << tok.status();
  const auto golden = HfIds(tokenizer_path, corpus, tag);
  ASSERT_EQ(golden.size(), docs.size());
  size_t bytes = 0, tokens = 0, bad_docs = 0;
  for (size_t d = 0; d < docs.size(); ++d) {
    const std::vector<uint32_t> ids = (*tok)->Encode(docs[d].text);
    bytes += docs[d].text.size();
    tokens += golden[d].size();
    if (ids == golden[d]) continue;
    ++bad_docs;
    if (bad_docs > 5) continue;
    size_t i = 0;
    while (i < ids.size() && i < golden[d].size() && ids[i] == golden[d][i]) ++i;
    const size_t from = i >= 5 ? i - 5 : 0;
    // The text around the mismatch, as code points (token pieces may be partial characters).
    auto prefix = tok.value()->Decode(std::span<const uint32_t>(golden[d].data(), i));
    const size_t at = prefix.ok() ? prefix->size() : 0;
    std::string around;
    const std::string& text = docs[d].text;
    size_t k = at >= 12 ? at - 12 : 0;
    while (k > 0 && (static_cast<unsigned char>(text[k]) & 0xC0) == 0x80) --k;
    for (int n = 0; n < 10 && k < text.size(); ++n) {
      char32_t cp = 0;
      int len = 1;
      const unsigned char b = text[k];
      if (b >= 0xF0) { cp = b & 7; len = 4; } else if (b >= 0xE0) { cp = b & 15; len = 3; }
      else if (b >= 0xC0) { cp = b & 31; len = 2; } else { cp = b; }
      for (int q = 1; q < len && k + q < text.size(); ++q) cp = (cp << 6) | (text[k + q] & 0x3F);
      absl::StrAppend(&around, k == at ? ">" : "", "U+", absl::Hex(cp, absl::kZeroPad4), " ");
      k += len;
    }
    ADD_FAILURE() << "text near byte " << at << ": " << around << "\n" << tag << ": document " << d << " (" << docs[d].source << " " << docs[d].name
                  << ") differs at token " << i << " of " << golden[d].size() << "\n  hf:   "
                  << Show(**tok, golden[d], from, i + 8) << "\n  gyre: "
                  << Show(**tok, ids, from, i + 8);
  }
  EXPECT_EQ(bad_docs, 0u) << "documents that differ";
  std::printf("%s: %zu documents, %zu bytes, %zu tokens compared; %zu differ\n", tag.c_str(),
              docs.size(), bytes, tokens, bad_docs);
}

TEST(GoldenTest, Gpt2MatchesHuggingFace) { CheckAgainstHf(Gpt2Dir(), "gpt2"); }

TEST(GoldenTest, GptNeox20bMatchesHuggingFace) { CheckAgainstHf(NeoxTokenizerJson(), "neox"); }

}  // namespace
}  // namespace gyre
