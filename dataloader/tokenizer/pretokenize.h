// The GPT-2 pre-tokenization split, by hand, over code points. It reproduces the matches of
//
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//
// (leftmost-first alternation, greedy quantifiers, as Oniguruma runs it inside Hugging Face
// tokenizers). Letter, number and white-space classes come from utf8proc's general categories:
// \p{L} = L*, \p{N} = N*, \s = the White_Space property = Zs + Zl + Zp + U+0009..U+000D + U+0085.
// Internal to the tokenizer.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace gyre::tokenizer_internal {

enum class CharClass : uint8_t { kLetter, kNumber, kSpace, kOther };

// The class of one code point (utf8proc categories; a table for the BMP built on first use).
CharClass ClassOf(char32_t cp);

// Length in bytes of the pre-token that starts at s[pos] (pos < s.size(); s is valid UTF-8).
size_t NextPretoken(std::string_view s, size_t pos);

}  // namespace gyre::tokenizer_internal
