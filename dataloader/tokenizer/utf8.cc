#include "dataloader/tokenizer/utf8.h"

namespace gyre::tokenizer_internal {
namespace {

inline bool IsCont(uint8_t b) { return (b & 0xC0) == 0x80; }

}  // namespace

int DecodeUtf8(std::string_view s, size_t i, char32_t* cp) {
  const auto* p = reinterpret_cast<const uint8_t*>(s.data());
  const size_t n = s.size();
  const uint8_t b0 = p[i];
  if (b0 < 0x80) {
    *cp = b0;
    return 1;
  }
  *cp = kReplacementChar;
  int len;
  uint8_t lo = 0x80, hi = 0xBF;  // the allowed range of the second byte
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    len = 2;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    len = 3;
    if (b0 == 0xE0) lo = 0xA0;  // no overlong forms
    if (b0 == 0xED) hi = 0x9F;  // no surrogates
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    len = 4;
    if (b0 == 0xF0) lo = 0x90;  // no overlong forms
    if (b0 == 0xF4) hi = 0x8F;  // nothing above U+10FFFF
  } else {
    return 1;  // a continuation byte, C0/C1 or F5..FF: never valid
  }
  if (i + 1 >= n || p[i + 1] < lo || p[i + 1] > hi) return 1;
  char32_t c = b0 & (0x7F >> len);
  c = (c << 6) | (p[i + 1] & 0x3F);
  for (int k = 2; k < len; ++k) {
    if (i + k >= n || !IsCont(p[i + k])) return k;  // the maximal subpart ends here
    c = (c << 6) | (p[i + k] & 0x3F);
  }
  *cp = c;
  return len;
}

size_t FindInvalidUtf8(std::string_view s) {
  const auto* p = reinterpret_cast<const uint8_t*>(s.data());
  const size_t n = s.size();
  size_t i = 0;
  while (i < n) {
    // Eight ASCII bytes at a time.
    while (i + 8 <= n) {
      uint64_t w;
      __builtin_memcpy(&w, p + i, 8);
      if (w & 0x8080808080808080ULL) break;
      i += 8;
    }
    if (i >= n) break;
    if (p[i] < 0x80) {
      ++i;
      continue;
    }
    char32_t cp;
    const int len = DecodeUtf8(s, i, &cp);
    if (cp == kReplacementChar) {
      // U+FFFD itself (EF BF BD) is valid; anything else that decoded to it is not.
      if (!(len == 3 && p[i] == 0xEF && p[i + 1] == 0xBF && p[i + 2] == 0xBD)) return i;
    }
    i += len;
  }
  return n;
}

std::string ReplaceInvalidUtf8(std::string_view s) {
  std::string out;
  out.reserve(s.size() + 16);
  size_t i = 0;
  while (i < s.size()) {
    char32_t cp;
    const int len = DecodeUtf8(s, i, &cp);
    if (cp == kReplacementChar) {
      out.append("\xEF\xBF\xBD");
    } else {
      out.append(s.data() + i, len);
    }
    i += len;
  }
  return out;
}


}  // namespace gyre::tokenizer_internal
