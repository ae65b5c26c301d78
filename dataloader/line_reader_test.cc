#include "dataloader/line_reader.h"

#include <vector>

#include "base/mem_env.h"
#include "gtest/gtest.h"
#include "zstd.h"

namespace gyre::data {
namespace {

std::string Compress(std::string_view s, int level = 3) {
  std::string out(ZSTD_compressBound(s.size()), '\0');
  size_t n = ZSTD_compress(out.data(), out.size(), s.data(), s.size(), level);
  EXPECT_FALSE(ZSTD_isError(n));
  out.resize(n);
  return out;
}

// With a content checksum, so that a flipped byte anywhere is detected.
std::string CompressChecked(std::string_view s) {
  ZSTD_CCtx* ctx = ZSTD_createCCtx();
  ZSTD_CCtx_setParameter(ctx, ZSTD_c_checksumFlag, 1);
  std::string out(ZSTD_compressBound(s.size()), '\0');
  size_t n = ZSTD_compress2(ctx, out.data(), out.size(), s.data(), s.size());
  ZSTD_freeCCtx(ctx);
  EXPECT_FALSE(ZSTD_isError(n));
  out.resize(n);
  return out;
}

absl::StatusOr<std::vector<std::string>> ReadAll(Env* env, const std::string& path) {
  auto reader = LineReader::Open(env, path);
  if (!reader.ok()) return reader.status();
  std::vector<std::string> lines;
  std::string_view line;
  while (true) {
    auto more = (*reader)->Next(&line);
    if (!more.ok()) return more.status();
    if (!*more) break;
    lines.emplace_back(line);
    EXPECT_EQ((*reader)->line_number(), lines.size());
  }
  EXPECT_EQ((*reader)->bytes_consumed(), (*reader)->file_bytes());
  return lines;
}

TEST(LineReaderTest, PlainLinesCrLfBomAndNoFinalNewline) {
  auto env = NewMemEnv();
  ASSERT_TRUE(WriteFileAtomically(env.get(), "/a.jsonl", "\xEF\xBB\xBFone\r\ntwo\n\nthree").ok());
  auto lines = ReadAll(env.get(), "/a.jsonl");
  ASSERT_TRUE(lines.ok());
  EXPECT_EQ(*lines, (std::vector<std::string>{"one", "two", "", "three"}));
}

TEST(LineReaderTest, ZstdMultiFrameAndLongLines) {
  auto env = NewMemEnv();
  std::string part1 = "first\nsecond ";
  std::string long_line(3u << 20, 'z');  // crosses the 1 MiB decode chunks
  std::string part2 = long_line + "\nlast\n";
  // Two frames plus a skippable frame in between, as concatenated .zst files give.
  std::string skippable("\x50\x2A\x4D\x18\x03\x00\x00\x00xyz", 11);
  ASSERT_TRUE(WriteFileAtomically(env.get(), "/b.jsonl.zst",
                                  Compress(part1) + skippable + Compress(part2, 1))
                  .ok());
  auto lines = ReadAll(env.get(), "/b.jsonl.zst");
  ASSERT_TRUE(lines.ok()) << lines.status();
  ASSERT_EQ(lines->size(), 3u);
  EXPECT_EQ((*lines)[0], "first");
  EXPECT_EQ((*lines)[1], "second " + long_line);
  EXPECT_EQ((*lines)[2], "last");
}

TEST(LineReaderTest, TruncatedAndCorruptZstdNameTheFile) {
  auto env = NewMemEnv();
  std::string text;
  for (int i = 0; i < 20000; ++i) text += "{\"text\":\"line " + std::to_string(i) + "\"}\n";
  const std::string z = Compress(text);
  ASSERT_TRUE(WriteFileAtomically(env.get(), "/t.jsonl.zst", z.substr(0, z.size() - 10)).ok());
  auto lines = ReadAll(env.get(), "/t.jsonl.zst");
  ASSERT_FALSE(lines.ok());
  EXPECT_EQ(lines.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(lines.status().message().find("/t.jsonl.zst"), std::string::npos);
  EXPECT_NE(lines.status().message().find("truncated"), std::string::npos) << lines.status();

  std::string corrupt = CompressChecked(text);
  corrupt[corrupt.size() / 2] ^= 0x5A;
  ASSERT_TRUE(WriteFileAtomically(env.get(), "/c.jsonl.zst", corrupt).ok());
  auto bad = ReadAll(env.get(), "/c.jsonl.zst");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("/c.jsonl.zst"), std::string::npos);
}

TEST(LineReaderTest, EmptyAndMissingFiles) {
  auto env = NewMemEnv();
  ASSERT_TRUE(WriteFileAtomically(env.get(), "/empty.jsonl", "").ok());
  ASSERT_TRUE(WriteFileAtomically(env.get(), "/empty.jsonl.zst", "").ok());
  for (const char* p : {"/empty.jsonl", "/empty.jsonl.zst"}) {
    auto lines = ReadAll(env.get(), p);
    ASSERT_TRUE(lines.ok()) << p;
    EXPECT_TRUE(lines->empty());
  }
  // A frame with no content is a valid empty file too.
  ASSERT_TRUE(WriteFileAtomically(env.get(), "/zero.jsonl.zst", Compress("")).ok());
  auto zero = ReadAll(env.get(), "/zero.jsonl.zst");
  ASSERT_TRUE(zero.ok()) << zero.status();
  EXPECT_TRUE(zero->empty());
  auto missing = LineReader::Open(env.get(), "/nope.jsonl");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find("/nope.jsonl"), std::string::npos);
}

}  // namespace
}  // namespace gyre::data
