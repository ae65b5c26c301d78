#include "dataloader/tokenizer/pretokenize.h"

#include <utf8proc.h>

#include <array>
#include <memory>

#include "dataloader/tokenizer/utf8.h"

namespace gyre::tokenizer_internal {
namespace {

CharClass ClassFromUtf8proc(char32_t cp) {
  switch (utf8proc_category(static_cast<utf8proc_int32_t>(cp))) {
    case UTF8PROC_CATEGORY_LU:
    case UTF8PROC_CATEGORY_LL:
    case UTF8PROC_CATEGORY_LT:
    case UTF8PROC_CATEGORY_LM:
    case UTF8PROC_CATEGORY_LO:
      return CharClass::kLetter;
    case UTF8PROC_CATEGORY_ND:
    case UTF8PROC_CATEGORY_NL:
    case UTF8PROC_CATEGORY_NO:
      return CharClass::kNumber;
    case UTF8PROC_CATEGORY_ZS:
    case UTF8PROC_CATEGORY_ZL:
    case UTF8PROC_CATEGORY_ZP:
      return CharClass::kSpace;
    default:
      // White_Space also holds these five controls (Cc).
      if ((cp >= 0x09 && cp <= 0x0D) || cp == 0x85) return CharClass::kSpace;
      return CharClass::kOther;
  }
}

// The classes of the whole BMP, computed from utf8proc once (64 KiB).
const std::array<CharClass, 0x10000>& BmpClasses() {
  static const auto* table = [] {
    auto* t = new std::array<CharClass, 0x10000>;
    for (char32_t cp = 0; cp < 0x10000; ++cp) (*t)[cp] = ClassFromUtf8proc(cp);
    return t;
  }();
  return *table;
}

// Decodes the code point at s[i] and its class; ASCII takes the short path.
inline int ClassAt(std::string_view s, size_t i, const std::array<CharClass, 0x10000>& bmp,
                   CharClass* cls) {
  const auto b = static_cast<uint8_t>(s[i]);
  if (b < 0x80) {
    *cls = bmp[b];
    return 1;
  }
  char32_t cp;
  const int len = DecodeUtf8(s, i, &cp);
  *cls = cp < 0x10000 ? bmp[cp] : ClassFromUtf8proc(cp);
  return len;
}

// End of the run of characters of class `cls` starting at `i`.
inline size_t RunEnd(std::string_view s, size_t i, CharClass cls,
                     const std::array<CharClass, 0x10000>& bmp) {
  const size_t n = s.size();
  while (i < n) {
    CharClass c;
    const int len = ClassAt(s, i, bmp, &c);
    if (c != cls) break;
    i += len;
  }
  return i;
}

}  // namespace

CharClass ClassOf(char32_t cp) {
  return cp < 0x10000 ? BmpClasses()[cp] : ClassFromUtf8proc(cp);
}

size_t NextPretoken(std::string_view s, size_t pos) {
  const auto& bmp = BmpClasses();
  const size_t n = s.size();
  const char c0 = s[pos];

  // 's|'t|'re|'ve|'m|'ll|'d
  if (c0 == '\'' && pos + 1 < n) {
    const char c1 = s[pos + 1];
    if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') return 2;
    if (pos + 2 < n) {
      const char c2 = s[pos + 2];
      if ((c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e') || (c1 == 'l' && c2 == 'l')) {
        return 3;
      }
    }
  }

  CharClass cls0;
  const int len0 = ClassAt(s, pos, bmp, &cls0);

  //  ?\p{L}+ |  ?\p{N}+ |  ?[^\s\p{L}\p{N}]+  with the optional leading space.
  if (c0 == ' ' && pos + 1 < n) {
    CharClass cls1;
    const int len1 = ClassAt(s, pos + 1, bmp, &cls1);
    if (cls1 != CharClass::kSpace) return RunEnd(s, pos + 1 + len1, cls1, bmp) - pos;
  }
  //  \p{L}+ | \p{N}+ | [^\s\p{L}\p{N}]+  without it.
  if (cls0 != CharClass::kSpace) return RunEnd(s, pos + len0, cls0, bmp) - pos;

  // \s+(?!\S) | \s+ : the white-space run, giving back its last character when a non-space
  // follows (so that " word" keeps its space), unless the run is that one character.
  size_t last_start = pos;
  size_t i = pos + len0;
  while (i < n) {
    CharClass c;
    const int len = ClassAt(s, i, bmp, &c);
    if (c != CharClass::kSpace) break;
    last_start = i;
    i += len;
  }
  if (i == n) return n - pos;
  return last_start > pos ? last_start - pos : i - pos;
}

}  // namespace gyre::tokenizer_internal
