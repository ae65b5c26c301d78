#include "dataloader/token_index.h"

#include <cstdlib>
#include <filesystem>

#include "gtest/gtest.h"

namespace gyre::data {
namespace {

std::string TempDir(const std::string& name) {
  const char* base = std::getenv("TEST_TMPDIR");
  std::string dir = std::string(base ? base : "/tmp") + "/" + name;
  std::filesystem::remove_all(dir);
  return dir;
}

TokenIndex::NewShard Shard(const std::string& source, const std::string& split, uint64_t tokens,
                           const std::string& path) {
  TokenIndex::NewShard s;
  s.source = source;
  s.split = split;
  s.path = path;
  s.tokens = tokens;
  s.documents = tokens / 10;
  s.payload_checksum = tokens * 31;
  return s;
}

TEST(TokenIndexTest, KeysAreBigEndianAndOrdered) {
  EXPECT_EQ(ShardKey("ab", 0x01020304), std::string("ab\0\x01\x02\x03\x04", 7));
  EXPECT_LT(ShardKey("a", 255), ShardKey("a", 256));
  EXPECT_LT(ShardKey("a", 0xFFFFFFFF), ShardKey("a b", 0));  // prefix scan stops at the 0x00
  EXPECT_EQ(DocKey("a", 1, 2).size(), 2u + 4 + 8);
}

TEST(TokenIndexTest, CommitsAssignOrdinalsAndFirstTokens) {
  const std::string dir = TempDir("index_commit");
  {
    auto index = TokenIndex::Open(dir, TokenIndex::Mode::kReadWrite);
    ASSERT_TRUE(index.ok()) << index.status();
    auto meta = (*index)->ReadMeta();
    ASSERT_TRUE(meta.ok());
    EXPECT_FALSE(meta->has_value());
    gyre::v1::IndexMeta m;
    m.set_format_version(kIndexFormatVersion);
    m.set_tokenizer_name("gpt2");
    m.set_tokenizer_fingerprint(42);
    ASSERT_TRUE((*index)->WriteMeta(m).ok());

    TokenIndex::InputCommit a;
    a.input.set_path("in/a.jsonl");
    a.input.set_documents(3);
    a.shards = {Shard("C4", "train", 100, "shards/C4/a-0.tok"),
                Shard("Book", "train", 50, "shards/Book/a-0.tok"),
                Shard("C4", "train", 30, "shards/C4/a-1.tok")};
    a.shards[0].docs.resize(2);
    a.shards[0].docs[1].set_offset(60);
    a.shards[0].docs[1].set_length(39);
    ASSERT_TRUE((*index)->CommitInput(a).ok());
    TokenIndex::InputCommit b;
    b.input.set_path("in/b.jsonl");
    b.shards = {Shard("C4", "train", 7, "shards/C4/b-0.tok"),
                Shard("C4/validation", "validation", 9, "shards/C4_validation/b-0.tok")};
    ASSERT_TRUE((*index)->CommitInput(b).ok());

    // A source cannot change split.
    TokenIndex::InputCommit c;
    c.input.set_path("in/c.jsonl");
    c.shards = {Shard("C4", "test", 1, "x")};
    EXPECT_EQ((*index)->CommitInput(c).code(), absl::StatusCode::kFailedPrecondition);
  }
  // Read-only view after the writer closed.
  auto index = TokenIndex::Open(dir, TokenIndex::Mode::kReadOnly);
  ASSERT_TRUE(index.ok()) << index.status();
  auto meta = (*index)->ReadMeta();
  ASSERT_TRUE(meta.ok() && meta->has_value());
  EXPECT_EQ((*meta)->tokenizer_fingerprint(), 42u);
  auto sources = (*index)->ListSources();
  ASSERT_TRUE(sources.ok());
  ASSERT_EQ(sources->size(), 3u);
  EXPECT_EQ((*sources)[0].name(), "Book");
  EXPECT_EQ((*sources)[1].name(), "C4");
  EXPECT_EQ((*sources)[1].tokens(), 137u);
  EXPECT_EQ((*sources)[1].shards(), 3u);
  EXPECT_FALSE((*sources)[1].validation());
  EXPECT_EQ((*sources)[2].name(), "C4/validation");
  EXPECT_TRUE((*sources)[2].validation());
  EXPECT_EQ((*sources)[2].split(), "validation");
  auto shards = (*index)->ListShards("C4");
  ASSERT_TRUE(shards.ok());
  ASSERT_EQ(shards->size(), 3u);
  EXPECT_EQ((*shards)[0].path(), "shards/C4/a-0.tok");
  EXPECT_EQ((*shards)[1].path(), "shards/C4/a-1.tok");
  EXPECT_EQ((*shards)[1].first_token(), 100u);
  EXPECT_EQ((*shards)[2].first_token(), 130u);
  EXPECT_EQ((*shards)[2].ordinal(), 2u);
  auto docs = (*index)->ListDocs("C4", 0);
  ASSERT_TRUE(docs.ok());
  ASSERT_EQ(docs->size(), 2u);
  EXPECT_EQ((*docs)[1].offset(), 60u);
  auto input = (*index)->GetInput("in/a.jsonl");
  ASSERT_TRUE(input.ok() && input->has_value());
  EXPECT_EQ((*input)->documents(), 3u);
  auto missing = (*index)->GetInput("in/c.jsonl");
  ASSERT_TRUE(missing.ok());
  EXPECT_FALSE(missing->has_value());  // the failed commit left nothing
  EXPECT_EQ((*index)->WriteMeta(gyre::v1::IndexMeta()).code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST(TokenIndexTest, MissingIndexIsNotFound) {
  auto index = TokenIndex::Open(TempDir("no_index"), TokenIndex::Mode::kReadOnly);
  EXPECT_EQ(index.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(index.status().message().find("gyre prepare"), std::string::npos);
}

TEST(TokenIndexTest, SecondWriterIsRefused) {
  const std::string dir = TempDir("two_writers");
  auto first = TokenIndex::Open(dir, TokenIndex::Mode::kReadWrite);
  ASSERT_TRUE(first.ok());
  auto second = TokenIndex::Open(dir, TokenIndex::Mode::kReadWrite);
  EXPECT_FALSE(second.ok());
  // Readers may open while a writer holds it.
  auto reader = TokenIndex::Open(dir, TokenIndex::Mode::kReadOnly);
  EXPECT_TRUE(reader.ok()) << reader.status();
}

}  // namespace
}  // namespace gyre::data
