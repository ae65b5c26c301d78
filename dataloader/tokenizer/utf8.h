// UTF-8 decoding with the "maximal subpart" replacement rule (Unicode 15, section 3.9; the rule
// of Rust's String::from_utf8_lossy and of the WHATWG decoder): each maximal invalid subsequence
// becomes one U+FFFD. Internal to the tokenizer.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "base/utf8.h"

namespace gyre::tokenizer_internal {

inline constexpr char32_t kReplacementChar = 0xFFFD;

// Decodes the code point at s[i] (i < s.size()). Returns its length in bytes; on an invalid
// sequence returns the length of the maximal invalid subpart (>= 1) and sets *cp to U+FFFD.
int DecodeUtf8(std::string_view s, size_t i, char32_t* cp);

// Offset of the first invalid byte sequence, or s.size() when `s` is valid UTF-8.
size_t FindInvalidUtf8(std::string_view s);

// `s` with every maximal invalid subpart replaced by U+FFFD (EF BF BD).
std::string ReplaceInvalidUtf8(std::string_view s);

// Appends the UTF-8 encoding of `cp` (a scalar value) to `*out`.
using ::gyre::AppendUtf8;

}  // namespace gyre::tokenizer_internal
