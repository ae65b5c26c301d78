// The tokenizer's internal pieces: UTF-8 maximal-subpart decoding, character classes, the
// pre-token splitter and Hugging Face's Unicode 9 NFC.
#include <string>
#include <vector>

#include "dataloader/tokenizer/hf_nfc.h"
#include "dataloader/tokenizer/pretokenize.h"
#include "dataloader/tokenizer/utf8.h"
#include "gtest/gtest.h"

namespace gyre::tokenizer_internal {
namespace {

std::vector<std::string> Split(std::string_view s) {
  std::vector<std::string> out;
  for (size_t pos = 0; pos < s.size();) {
    const size_t len = NextPretoken(s, pos);
    out.emplace_back(s.substr(pos, len));
    pos += len;
  }
  return out;
}

TEST(Utf8Test, MaximalSubparts) {
  char32_t cp;
  EXPECT_EQ(DecodeUtf8("\xE2\x82\xAC", 0, &cp), 3);
  EXPECT_EQ(cp, 0x20ACu);
  EXPECT_EQ(DecodeUtf8("\xE2\x82", 0, &cp), 2);  // truncated: one subpart of two bytes
  EXPECT_EQ(cp, kReplacementChar);
  EXPECT_EQ(DecodeUtf8("\xED\xA0\x80", 0, &cp), 1);  // surrogate: second byte out of range
  EXPECT_EQ(DecodeUtf8("\xF4\x90\x80\x80", 0, &cp), 1);  // above U+10FFFF
  EXPECT_EQ(DecodeUtf8("\xF0\x9F\x98", 0, &cp), 3);
  EXPECT_EQ(DecodeUtf8("\xC1\xBF", 0, &cp), 1);  // overlong lead byte
  EXPECT_EQ(FindInvalidUtf8("plain \xEF\xBF\xBD ok"), std::string_view("plain \xEF\xBF\xBD ok").size());
  EXPECT_EQ(FindInvalidUtf8("12345678901234567\x80"), 17u);
  EXPECT_EQ(ReplaceInvalidUtf8("a\xF1\x80\x80\xE1\x80\xC2" "b"), "a\uFFFD\uFFFD\uFFFDb");
}

TEST(ClassTest, CategoriesFromUtf8proc) {
  EXPECT_EQ(ClassOf('a'), CharClass::kLetter);
  EXPECT_EQ(ClassOf(0x4E2D), CharClass::kLetter);   // 中
  EXPECT_EQ(ClassOf(0x02B0), CharClass::kLetter);   // modifier letter (Lm)
  EXPECT_EQ(ClassOf(0x0663), CharClass::kNumber);   // Arabic-Indic three (Nd)
  EXPECT_EQ(ClassOf(0x216B), CharClass::kNumber);   // Roman numeral twelve (Nl)
  EXPECT_EQ(ClassOf(0x00BD), CharClass::kNumber);   // ½ (No)
  EXPECT_EQ(ClassOf(0x00A0), CharClass::kSpace);    // no-break space (Zs)
  EXPECT_EQ(ClassOf(0x3000), CharClass::kSpace);
  EXPECT_EQ(ClassOf(0x2028), CharClass::kSpace);    // line separator (Zl)
  EXPECT_EQ(ClassOf(0x0085), CharClass::kSpace);    // NEL: White_Space though Cc
  EXPECT_EQ(ClassOf(0x000B), CharClass::kSpace);
  EXPECT_EQ(ClassOf(0x001C), CharClass::kOther);    // Python's isspace says yes; \s says no
  EXPECT_EQ(ClassOf(0x180E), CharClass::kOther);    // Mongolian vowel separator: Cf since 6.3
  EXPECT_EQ(ClassOf(0x200B), CharClass::kOther);    // zero-width space is not White_Space
  EXPECT_EQ(ClassOf(0x0301), CharClass::kOther);    // combining marks are neither L nor N
  EXPECT_EQ(ClassOf(0x1F600), CharClass::kOther);
}

TEST(PretokenizeTest, RegexAlternatives) {
  using V = std::vector<std::string>;
  EXPECT_EQ(Split("I'm  here"), (V{"I", "'m", " ", " here"}));
  EXPECT_EQ(Split("it's'll"), (V{"it", "'s", "'ll"}));
  EXPECT_EQ(Split("'x ''s"), (V{"'", "x", " ''", "s"}));
  EXPECT_EQ(Split("abc123 456!!? x"), (V{"abc", "123", " 456", "!!?", " x"}));
  EXPECT_EQ(Split("a\t\tb"), (V{"a", "\t", "\t", "b"}));  // \s+(?!\S) gives back one, \s+ takes it
  EXPECT_EQ(Split("a \n b"), (V{"a", " \n", " b"}));
  EXPECT_EQ(Split("end   "), (V{"end", "   "}));           // trailing run stays whole
  EXPECT_EQ(Split(" \u00a0x"), (V{" ", "\u00a0", "x"}));  // NBSP is \s, not the ' ?' space
  EXPECT_EQ(Split("\u3000\u4e2d"), (V{"\u3000", "\u4e2d"}));
  EXPECT_EQ(Split("e\u0301t\u00e9"), (V{"e", "\u0301", "t\u00e9"}));
}

TEST(HfNfcTest, Unicode9Tables) {
  EXPECT_FALSE(AssignedAfterUnicode9(0x0300));
  EXPECT_FALSE(AssignedAfterUnicode9(0x08D4));   // 9.0
  EXPECT_TRUE(AssignedAfterUnicode9(0x1DF6));    // 10.0
  EXPECT_TRUE(AssignedAfterUnicode9(0x0898));    // 14.0
  EXPECT_TRUE(AssignedAfterUnicode9(0x16FF0));   // 13.0
  EXPECT_FALSE(AssignedAfterUnicode9(0x0378));   // unassigned in every version
  // What npm tokenizers@0.23.2's NFC normalizer returns for these (checked by hand with
  // normalizeString): U+1DFA (Unicode 14) blocks the composition of a + U+0300 and is not
  // reordered; plain NFC composes and reorders.
  EXPECT_EQ(HfNfc("a\u1dfa\u0316\u0300"), "a\u1dfa\u0316\u0300");
  EXPECT_EQ(Nfc("a\u1dfa\u0316\u0300"), "\u00e0\u1dfa\u0316");
  EXPECT_EQ(HfNfc("a\u059a\u0316\u1dfa\u0316b"), "a\u0316\u059a\u1dfa\u0316b");
  EXPECT_EQ(HfNfc("x cafe\u0301 y"), "x caf\u00e9 y");
  EXPECT_EQ(HfNfc("\u1100\u1161\u11a8 ok"), "\uac01 ok");  // Hangul jamo compose
  EXPECT_EQ(HfNfc("pure ascii"), "pure ascii");
}

}  // namespace
}  // namespace gyre::tokenizer_internal
