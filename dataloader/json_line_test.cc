#include "dataloader/json_line.h"

#include "gtest/gtest.h"

namespace gyre::data {
namespace {

LineVerdict P(JsonLineParser& parser, std::string_view line, ParsedLine* out) {
  return parser.Parse(line, out);
}

TEST(JsonLineTest, SlimPajamaUjsonEscaping) {
  JsonLineParser parser;
  ParsedLine out;
  // ujson: ASCII only, \/ for '/', \uXXXX for everything non-ASCII, a paired surrogate.
  const std::string line =
      R"({"text":"caf\u00e9 http:\/\/x.org \ud83d\ude00 \"q\" a\\b\n\t","meta":{"redpajama_set_name":"RedPajamaC4"}})";
  ASSERT_EQ(P(parser, line, &out), LineVerdict::kOk) << out.error;
  EXPECT_EQ(out.text, "caf\xC3\xA9 http://x.org \xF0\x9F\x98\x80 \"q\" a\\b\n\t");
  EXPECT_EQ(out.source, "RedPajamaC4");
  EXPECT_EQ(out.lone_surrogates, 0u);
}

TEST(JsonLineTest, LoneSurrogatesBecomeReplacementCharacters) {
  JsonLineParser parser;
  ParsedLine out;
  // A lone high surrogate (as in SlimPajama: "\ud809" with no partner), a lone low one, a high
  // one followed by a non-surrogate escape (which must survive), and one at the very end.
  ASSERT_EQ(P(parser, R"({"text":"a\ud809b\udc00c\ud800\u0041\udbff"})", &out), LineVerdict::kOk)
      << out.error;
  EXPECT_EQ(out.text, "a\xEF\xBF\xBD" "b\xEF\xBF\xBD" "c\xEF\xBF\xBD" "A\xEF\xBF\xBD");
  EXPECT_EQ(out.lone_surrogates, 4u);
  // Two high surrogates in a row: the first is lone, the second pairs with what follows.
  ASSERT_EQ(P(parser, R"({"text":"\ud83d\ud83d\ude00"})", &out), LineVerdict::kOk);
  EXPECT_EQ(out.text, "\xEF\xBF\xBD\xF0\x9F\x98\x80");
  EXPECT_EQ(out.lone_surrogates, 1u);
}

TEST(JsonLineTest, PileJsonDumpsWithSpacesAndRawUtf8) {
  JsonLineParser parser;
  ParsedLine out;
  ASSERT_EQ(P(parser, "{\"text\": \"na\\u00efve \xC3\xA9\", \"meta\": {\"pile_set_name\": \"Pile-CC\"}}  \r",
              &out),
            LineVerdict::kOk)
      << out.error;
  EXPECT_EQ(out.text, "na\xC3\xAFve \xC3\xA9");
  EXPECT_EQ(out.source, "Pile-CC");
  // meta before text, extra members and nesting are fine.
  ASSERT_EQ(P(parser, R"({"id":[1,{"a":null}],"meta":{"x":1,"pile_set_name":"Github"},"text":"t"})", &out),
            LineVerdict::kOk);
  EXPECT_EQ(out.source, "Github");
  EXPECT_EQ(out.text, "t");
  // No meta: the source stays empty in auto mode.
  ASSERT_EQ(P(parser, R"({"text":"plain"})", &out), LineVerdict::kOk);
  EXPECT_EQ(out.source, "");
}

TEST(JsonLineTest, SourceField) {
  JsonLineParser nested("attrs.origin.name");
  ParsedLine out;
  ASSERT_EQ(P(nested, R"({"attrs":{"origin":{"name":"web\/x"}},"text":"a"})", &out), LineVerdict::kOk)
      << out.error;
  EXPECT_EQ(out.source, "web/x");
  EXPECT_EQ(P(nested, R"({"attrs":{"origin":3},"text":"a"})", &out), LineVerdict::kMissingSource);
  JsonLineParser flat("source");
  ASSERT_EQ(P(flat, R"({"source":"arxiv","text":"a"})", &out), LineVerdict::kOk);
  EXPECT_EQ(out.source, "arxiv");
  EXPECT_EQ(P(flat, R"({"text":"a"})", &out), LineVerdict::kMissingSource);
}

TEST(JsonLineTest, BadLinesGetAVerdictNeverACrash) {
  JsonLineParser parser;
  ParsedLine out;
  EXPECT_EQ(P(parser, R"({"text":"abc)", &out), LineVerdict::kMalformedJson);
  EXPECT_EQ(P(parser, R"({"text":"abc"} trailing)", &out), LineVerdict::kMalformedJson);
  EXPECT_EQ(P(parser, R"([1,2,3])", &out), LineVerdict::kMalformedJson);
  EXPECT_EQ(P(parser, R"("just a string")", &out), LineVerdict::kMalformedJson);
  EXPECT_EQ(P(parser, "", &out), LineVerdict::kMalformedJson);
  EXPECT_EQ(P(parser, R"({"text":"bad \x escape"})", &out), LineVerdict::kMalformedJson);
  EXPECT_NE(out.error.find("escape"), std::string::npos) << out.error;
  EXPECT_EQ(P(parser, R"({"text":"short \u12"})", &out), LineVerdict::kMalformedJson);
  EXPECT_EQ(P(parser, R"({"title":"no text"})", &out), LineVerdict::kMissingText);
  EXPECT_EQ(P(parser, R"({"text":null})", &out), LineVerdict::kMissingText);
  EXPECT_EQ(P(parser, R"({"text":42})", &out), LineVerdict::kMissingText);
  EXPECT_EQ(P(parser, "{\"text\":\"bad \xC3\x28 utf8\"}", &out), LineVerdict::kInvalidUtf8);
  EXPECT_EQ(P(parser, "{\"text\":\"overlong \xC0\xAF\"}", &out), LineVerdict::kInvalidUtf8);
  // The parser recovers: the next good line parses.
  ASSERT_EQ(P(parser, R"({"text":"fine"})", &out), LineVerdict::kOk);
  EXPECT_EQ(out.text, "fine");
}

TEST(JsonLineTest, HugeDocument) {
  JsonLineParser parser;
  ParsedLine out;
  std::string body(100u << 20, 'x');
  for (size_t i = 0; i < body.size(); i += 1000) body[i] = ' ';
  const std::string line = "{\"text\":\"" + body + "\\/\"}";
  ASSERT_EQ(P(parser, line, &out), LineVerdict::kOk) << out.error;
  EXPECT_EQ(out.text.size(), body.size() + 1);
  EXPECT_EQ(out.text.back(), '/');
}

TEST(UnescapeTest, StopsAtClosingQuoteAndRejectsUnterminated) {
  std::string out, err;
  uint64_t lone = 0;
  const std::string s = R"(ab\"c" tail)";
  EXPECT_TRUE(UnescapeJsonString(s.data(), s.data() + s.size(), &out, &lone, &err));
  EXPECT_EQ(out, "ab\"c");
  const std::string u = R"(abc\)";
  EXPECT_FALSE(UnescapeJsonString(u.data(), u.data() + u.size(), &out, &lone, &err));
}

}  // namespace
}  // namespace gyre::data
