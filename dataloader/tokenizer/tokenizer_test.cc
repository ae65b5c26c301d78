// Unit tests: loading (and refusing the wrong files), the invalid-UTF-8 rule, special and added
// tokens, decoding, fingerprints and names, concurrent use. Exactness over a large corpus is
// golden_test's job.
#include "dataloader/tokenizer/tokenizer.h"

#include <random>
#include <thread>

#include "base/mem_env.h"
#include "dataloader/tokenizer/test_paths.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace gyre {
namespace {

using tokenizer_testing::Gpt2Dir;
using tokenizer_testing::NeoxTokenizerJson;

const Tokenizer& Gpt2() {
  static const Tokenizer* tok = [] {
    auto t = Tokenizer::Load(Gpt2Dir());
    EXPECT_TRUE(t.ok()) << t.status() << " (tools/setup.sh installs tools/node_modules)";
    return t.ok() ? t->release() : nullptr;
  }();
  return *tok;
}

const Tokenizer& Neox() {
  static const Tokenizer* tok = [] {
    auto t = Tokenizer::Load(NeoxTokenizerJson());
    EXPECT_TRUE(t.ok()) << t.status();
    return t.ok() ? t->release() : nullptr;
  }();
  return *tok;
}

std::string DecodeOrDie(const Tokenizer& tok, const std::vector<uint32_t>& ids) {
  auto s = tok.Decode(ids);
  EXPECT_TRUE(s.ok()) << s.status();
  return s.ok() ? *s : "";
}

// The pieces (decoded tokens) of `text`.
std::vector<std::string> Pieces(const Tokenizer& tok, std::string_view text) {
  std::vector<std::string> out;
  for (uint32_t id : tok.Encode(text)) out.push_back(DecodeOrDie(tok, {id}));
  return out;
}

TEST(TokenizerTest, KnownSizesAndIds) {
  EXPECT_EQ(Gpt2().vocab_size(), 50257u);
  EXPECT_EQ(Gpt2().eos_id(), 50256u);
  EXPECT_EQ(Gpt2().name(), "gpt2");
  EXPECT_EQ(Neox().vocab_size(), 50277u);
  EXPECT_EQ(Neox().eos_id(), 0u);
  EXPECT_EQ(Neox().name(), "gpt-neox-20b");
  EXPECT_NE(Gpt2().fingerprint(), Neox().fingerprint());
}

TEST(TokenizerTest, Gpt2SplitFollowsTheRegex) {
  // ' ?\p{L}+', contractions, and '\s+(?!\S)' giving back the last space before a word.
  EXPECT_EQ(Pieces(Gpt2(), "Hello world's  end\n\n x"),
            (std::vector<std::string>{"Hello", " world", "'s", " ", " end", "\n\n", " x"}));
  // Numbers and punctuation runs are their own pre-tokens; a tab before a word stays alone.
  const auto pieces = Pieces(Gpt2(), "x=12345;\ty");
  std::string joined;
  for (const auto& p : pieces) joined += p + "|";
  EXPECT_NE(joined.find("\t|y|"), std::string::npos) << joined;
}

TEST(TokenizerTest, SpecialTokensAreMatchedInText) {
  const auto ids = Gpt2().Encode("a<|endoftext|>b");
  ASSERT_EQ(ids.size(), 3u);
  EXPECT_EQ(ids[1], Gpt2().eos_id());
  const auto neox = Neox().Encode("a<|endoftext|>b");
  ASSERT_EQ(neox.size(), 3u);
  EXPECT_EQ(neox[1], 0u);
}

TEST(TokenizerTest, NeoxWhitespaceRunsAreAddedTokens) {
  // Runs of 2..24 spaces are added tokens 50254..50276 (matched longest first, before BPE).
  const auto ids = Neox().Encode("a" + std::string(30, ' ') + "b");
  ASSERT_EQ(ids.size(), 4u);
  EXPECT_EQ(DecodeOrDie(Neox(), {ids[1]}), std::string(24, ' '));
  EXPECT_EQ(DecodeOrDie(Neox(), {ids[2]}), std::string(6, ' '));
  EXPECT_GE(ids[1], 50254u);
}

TEST(TokenizerTest, InvalidUtf8BecomesReplacementCharacters) {
  // Unicode 15 section 3.9, table 3-11's example: one U+FFFD per maximal invalid subpart.
  const std::string bad = "a\xF1\x80\x80\xE1\x80\xC2" "b\x80" "c\x80\xBF" "d";
  const std::string fixed =
      "a\uFFFD\uFFFD\uFFFDb\uFFFDc\uFFFD\uFFFDd";  // 3 + 1 + 2 replacements
  EXPECT_EQ(Gpt2().Encode(bad), Gpt2().Encode(fixed));
  EXPECT_EQ(DecodeOrDie(Gpt2(), Gpt2().Encode(bad)), fixed);
  // Surrogates encoded in UTF-8 (CESU) and overlong forms are invalid too.
  EXPECT_EQ(Gpt2().Encode("\xED\xA0\x80"), Gpt2().Encode("\uFFFD\uFFFD\uFFFD"));
  EXPECT_EQ(Gpt2().Encode("\xC0\xAF"), Gpt2().Encode("\uFFFD\uFFFD"));
  EXPECT_EQ(Neox().Encode("x\xFFy"), Neox().Encode("x\uFFFDy"));
}

TEST(TokenizerTest, AnyBytesEncodeAndDecodeToValidUtf8) {
  std::mt19937 rng(7);
  for (int i = 0; i < 200; ++i) {
    std::string s(rng() % 300, '\0');
    for (char& c : s) c = static_cast<char>(rng());
    for (const Tokenizer* tok : {&Gpt2(), &Neox()}) {
      const auto ids = tok->Encode(s);
      for (uint32_t id : ids) ASSERT_LT(id, tok->vocab_size());
      // Decoding gives the repaired text back (GPT-2 has no normalizer).
      if (tok == &Gpt2()) {
        std::string repaired;
        for (uint32_t id : Gpt2().Encode(s)) repaired += DecodeOrDie(Gpt2(), {id});
        EXPECT_EQ(DecodeOrDie(Gpt2(), ids), repaired);
      }
    }
  }
}

TEST(TokenizerTest, DecodeInvertsEncode) {
  const std::string text =
      "The naïve café — 東京 🙂 'tis\t\tcode(x) {\n    return 42;\n}\r\n\u00a0\u3000end";
  EXPECT_EQ(DecodeOrDie(Gpt2(), Gpt2().Encode(text)), text);
  EXPECT_EQ(DecodeOrDie(Neox(), Neox().Encode(text)), text);  // already NFC
  // NeoX normalizes: e + combining acute comes back composed.
  EXPECT_EQ(DecodeOrDie(Neox(), Neox().Encode("cafe\u0301")), "caf\u00e9");
  EXPECT_EQ(DecodeOrDie(Gpt2(), Gpt2().Encode("cafe\u0301")), "cafe\u0301");
}

TEST(TokenizerTest, DecodeRejectsUnknownIds) {
  const std::vector<uint32_t> ids = {1, 50257};
  auto s = Gpt2().Decode(ids);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.status().message().find("50257"), absl::string_view::npos) << s.status();
}

TEST(TokenizerTest, LongWordsUseTheHeapPathAndRoundTrip) {
  std::string word;
  for (int i = 0; i < 300; ++i) word += (i % 3 == 0) ? "thequickbrownfox" : "jumpsoverthelazydog";
  const auto ids = Gpt2().Encode(word);
  EXPECT_EQ(DecodeOrDie(Gpt2(), ids), word);
  EXPECT_LT(ids.size(), word.size() / 2);  // merges happened
  // (Exactness of this path against Hugging Face: golden_test's "long#" and "base64" documents.)
}

TEST(TokenizerTest, RepeatedEncodesAgreeAcrossCachesAndThreads) {
  std::string text;
  std::mt19937 rng(3);
  const char* words[] = {"alpha", " beta", " gamma's", " 12345", "\n\n", " δέλτα", " 中文",
                         " 🙂🙂", "  ", "\t", " x", "<|endoftext|>"};
  for (int i = 0; i < 20000; ++i) text += words[rng() % 12];
  const auto expected = Gpt2().Encode(text);
  EXPECT_EQ(Gpt2().Encode(text), expected);  // second time: from the word cache
  auto fresh = Tokenizer::Load(Gpt2Dir());
  ASSERT_TRUE(fresh.ok());
  EXPECT_EQ((*fresh)->Encode(text), expected);
  std::vector<std::vector<uint32_t>> got(4);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int r = 0; r < 3; ++r) got[t] = Gpt2().Encode(text);
    });
  }
  for (auto& th : threads) th.join();
  for (const auto& g : got) EXPECT_EQ(g, expected);
}

// ---- Loading ----------------------------------------------------------------------------------

class LoadTest : public ::testing::Test {
 protected:
  void Write(const std::string& path, const std::string& data) {
    ASSERT_TRUE(env_->CreateDirs(DirName(path)).ok());
    ASSERT_TRUE(WriteFileAtomically(env_.get(), path, data).ok());
  }
  absl::Status LoadError(const std::string& path) {
    auto t = Tokenizer::Load(path, env_.get());
    return t.ok() ? absl::OkStatus() : t.status();
  }
  std::unique_ptr<Env> env_ = NewMemEnv();
};

void ExpectError(const absl::Status& s, absl::StatusCode code, std::initializer_list<const char*> words) {
  EXPECT_EQ(s.code(), code) << s;
  for (const char* w : words) EXPECT_NE(s.message().find(w), absl::string_view::npos) << s << " lacks " << w;
}

TEST_F(LoadTest, MissingPath) {
  ExpectError(LoadError("/nope/tokenizer.json"), absl::StatusCode::kNotFound, {"/nope/tokenizer.json"});
}

TEST_F(LoadTest, NotJson) {
  Write("/t/tokenizer.json", "hello {");
  ExpectError(LoadError("/t/tokenizer.json"), absl::StatusCode::kInvalidArgument,
              {"/t/tokenizer.json", "not valid JSON"});
}

TEST_F(LoadTest, MergesFileGivenAsTokenizerJson) {
  Write("/t/merges.txt", "#version: 0.2\nĠ t\nĠ a\n");
  ExpectError(LoadError("/t/merges.txt"), absl::StatusCode::kInvalidArgument,
              {"/t/merges.txt", "merges.txt"});
}

TEST_F(LoadTest, RandomJson) {
  Write("/t/x.json", R"({"name": "not a tokenizer", "values": [1, 2]})");
  ExpectError(LoadError("/t/x.json"), absl::StatusCode::kInvalidArgument, {"/t/x.json", "\"model\""});
  Write("/t/vocab.json", R"({"a": 0, "b": 1})");
  ExpectError(LoadError("/t/vocab.json"), absl::StatusCode::kInvalidArgument, {"vocab.json", "folder"});
  Write("/t/list.json", "[1, 2, 3]");
  ExpectError(LoadError("/t/list.json"), absl::StatusCode::kInvalidArgument, {"array"});
}

TEST_F(LoadTest, NonBpeModel) {
  Write("/t/wp.json", R"({"model": {"type": "WordPiece", "vocab": {"a": 0}}})");
  ExpectError(LoadError("/t/wp.json"), absl::StatusCode::kInvalidArgument, {"/t/wp.json", "WordPiece", "BPE"});
}

TEST_F(LoadTest, UnsupportedPieces) {
  nlohmann::json j = {
      {"model", {{"type", "BPE"}, {"vocab", {{"a", 0}}}, {"merges", nlohmann::json::array()}}},
      {"normalizer", {{"type", "Lowercase"}}},
      {"pre_tokenizer", {{"type", "ByteLevel"}}}};
  Write("/t/a.json", j.dump());
  ExpectError(LoadError("/t/a.json"), absl::StatusCode::kInvalidArgument, {"Lowercase", "NFC"});
  j["normalizer"] = nullptr;
  j["pre_tokenizer"] = {{"type", "Whitespace"}};
  Write("/t/b.json", j.dump());
  ExpectError(LoadError("/t/b.json"), absl::StatusCode::kInvalidArgument, {"Whitespace", "ByteLevel"});
  j["pre_tokenizer"] = {{"type", "ByteLevel"}};
  Write("/t/c.json", j.dump());  // vocabulary without the 256 byte tokens
  ExpectError(LoadError("/t/c.json"), absl::StatusCode::kInvalidArgument, {"no token for byte"});
}

TEST_F(LoadTest, FolderFormsAndBrokenMerges) {
  Write("/empty/readme", "x");
  ExpectError(LoadError("/empty"), absl::StatusCode::kNotFound, {"/empty", "vocab.json"});
  auto vocab = Env::Default()->ReadFile(Gpt2Dir() + "/encoder.json");
  ASSERT_TRUE(vocab.ok()) << vocab.status();
  Write("/g/vocab.json", *vocab);
  Write("/g/merges.txt", "#version: 0.2\nĠ t\nthis line has three\n");
  ExpectError(LoadError("/g"), absl::StatusCode::kInvalidArgument, {"/g/merges.txt:3", "two tokens"});
  Write("/g/merges.txt", "#version: 0.2\nĠ t\nĠ zzzzqqq\n");
  ExpectError(LoadError("/g"), absl::StatusCode::kInvalidArgument, {"/g/merges.txt:3", "zzzzqqq", "not in the vocabulary"});
  Write("/g/merges.txt", *vocab);  // JSON where the merges belong
  ExpectError(LoadError("/g"), absl::StatusCode::kInvalidArgument, {"/g/merges.txt", "JSON"});
}

TEST_F(LoadTest, Gpt2AsTokenizerJsonHasTheSameFingerprint) {
  // The tokenizer.json Hugging Face would save for GPT-2, built from the same two files.
  auto vocab_text = Env::Default()->ReadFile(Gpt2Dir() + "/encoder.json");
  auto merges_text = Env::Default()->ReadFile(Gpt2Dir() + "/vocab.bpe");
  ASSERT_TRUE(vocab_text.ok() && merges_text.ok());
  nlohmann::json merges = nlohmann::json::array();
  size_t pos = merges_text->find('\n') + 1;  // skip "#version"
  while (pos < merges_text->size()) {
    size_t end = merges_text->find('\n', pos);
    if (end == std::string::npos) end = merges_text->size();
    if (end > pos) merges.push_back(merges_text->substr(pos, end - pos));
    pos = end + 1;
  }
  nlohmann::json j = {
      {"version", "1.0"},
      {"added_tokens", {{{"id", 50256}, {"content", "<|endoftext|>"}, {"special", true},
                         {"normalized", true}, {"lstrip", false}, {"rstrip", false},
                         {"single_word", false}}}},
      {"normalizer", nullptr},
      {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}}},
      {"model", {{"type", "BPE"}, {"dropout", nullptr}, {"vocab", nlohmann::json::parse(*vocab_text)},
                 {"merges", merges}}}};
  Write("/hf/gpt2/tokenizer.json", j.dump());
  auto tok = Tokenizer::Load("/hf/gpt2/tokenizer.json", env_.get());
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->fingerprint(), Gpt2().fingerprint());
  EXPECT_EQ((*tok)->name(), "gpt2");
  const std::string text = "Fingerprints agree, so ids agree: <|endoftext|> 123 café";
  EXPECT_EQ((*tok)->Encode(text), Gpt2().Encode(text));
  // A one-merge change is a different tokenizer.
  merges.erase(merges.begin() + 1000);
  j["model"]["merges"] = merges;
  Write("/hf/other/tokenizer.json", j.dump());
  auto other = Tokenizer::Load("/hf/other/tokenizer.json", env_.get());
  ASSERT_TRUE(other.ok()) << other.status();
  EXPECT_NE((*other)->fingerprint(), Gpt2().fingerprint());
  EXPECT_EQ((*other)->name(), "other");
}

}  // namespace
}  // namespace gyre
