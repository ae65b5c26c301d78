// NFC as Hugging Face tokenizers computes it. Its normalizer (the unicode-normalization-
// alignments crate) carries Unicode 9.0 tables, so a code point assigned after 9.0 has, to it,
// combining class 0 and no decomposition: it blocks reordering and composition around it and is
// itself left as is. We reproduce that with utf8proc (Unicode 15.0): the text is cut at such code
// points, each piece between them is normalized by utf8proc, and the cut points are copied
// verbatim. The list of code points assigned after 9.0 is generated at build time from the
// Unicode Character Database's DerivedAge.txt (Debian package unicode-data).
// Internal to the tokenizer.
#pragma once

#include <string>
#include <string_view>

namespace gyre::tokenizer_internal {

// True when `cp` was assigned after Unicode 9.0 (and by 15.0).
bool AssignedAfterUnicode9(char32_t cp);

// Standard NFC of valid UTF-8 (utf8proc).
std::string Nfc(std::string_view s);

// Hugging Face's NFC of valid UTF-8 (see the file comment).
std::string HfNfc(std::string_view s);

}  // namespace gyre::tokenizer_internal
