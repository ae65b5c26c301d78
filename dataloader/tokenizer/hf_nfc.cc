#include "dataloader/tokenizer/hf_nfc.h"

#include <utf8proc.h>

#include <algorithm>
#include <cstdlib>
#include <utility>
#include <vector>

#include "dataloader/tokenizer/utf8.h"

namespace gyre::tokenizer_internal {
namespace {

const std::vector<std::pair<char32_t, char32_t>>& RangesAfter9() {
  static const auto* ranges = [] {
    auto* v = new std::vector<std::pair<char32_t, char32_t>>{
#include "dataloader/tokenizer/unicode_after_9.inc"
    };
    std::sort(v->begin(), v->end());
    return v;
  }();
  return *ranges;
}

}  // namespace

bool AssignedAfterUnicode9(char32_t cp) {
  if (cp < 0x0860) return false;  // the first code point assigned after 9.0
  const auto& r = RangesAfter9();
  auto it = std::upper_bound(r.begin(), r.end(), std::make_pair(cp, char32_t{0x10FFFF + 1}));
  return it != r.begin() && std::prev(it)->first <= cp && cp <= std::prev(it)->second;
}

std::string Nfc(std::string_view s) {
  utf8proc_uint8_t* dst = nullptr;
  const utf8proc_ssize_t n =
      utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(s.data()),
                   static_cast<utf8proc_ssize_t>(s.size()), &dst,
                   static_cast<utf8proc_option_t>(UTF8PROC_STABLE | UTF8PROC_COMPOSE));
  std::string out;
  if (n >= 0) {
    out.assign(reinterpret_cast<const char*>(dst), static_cast<size_t>(n));
  } else {
    out.assign(s);  // Unreachable for valid UTF-8; keep the text rather than lose it.
  }
  std::free(dst);
  return out;
}

namespace {

std::string HfNfcOfIsland(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  size_t piece_start = 0, i = 0;
  while (i < s.size()) {
    if (static_cast<unsigned char>(s[i]) < 0x80) {
      ++i;
      continue;
    }
    char32_t cp;
    const int len = DecodeUtf8(s, i, &cp);
    if (AssignedAfterUnicode9(cp)) {
      if (i > piece_start) out += Nfc(s.substr(piece_start, i - piece_start));
      out.append(s.data() + i, len);
      piece_start = i + len;
    }
    i += len;
  }
  if (piece_start == 0) return Nfc(s);
  if (piece_start < s.size()) out += Nfc(s.substr(piece_start));
  return out;
}


}  // namespace

// Only the non-ASCII islands need work: an ASCII character next to another ASCII character
// neither reorders nor composes with anything (combining class 0, first or second of no
// canonical composition with an ASCII partner), so the text can be cut there. Each island takes
// the ASCII character before it along (it may compose with a following mark: "e\u0301").
std::string HfNfc(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  const size_t n = s.size();
  size_t i = 0;
  while (i < n) {
    size_t j = i;
    while (j < n && static_cast<unsigned char>(s[j]) < 0x80) ++j;
    if (j == n) {
      out.append(s.data() + i, n - i);
      break;
    }
    const size_t island = j > i ? j - 1 : j;
    out.append(s.data() + i, island - i);
    size_t k = j;
    while (k < n && static_cast<unsigned char>(s[k]) >= 0x80) ++k;
    out += HfNfcOfIsland(s.substr(island, k - island));
    i = k;
  }
  return out;
}

}  // namespace gyre::tokenizer_internal
