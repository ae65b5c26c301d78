// One JSON line of a corpus file -> (text, source). Understands SlimPajama (ujson: compact,
// ASCII-only, `\uXXXX`, `\/`, lone surrogates), the Pile (json.dumps) and any `{"text": ...}`.
//
// Structure and UTF-8 come from simdjson's On-Demand parser; string values are unescaped here,
// because both simdjson and nlohmann reject the lone surrogates SlimPajama contains:
//   - `\uD8xx`..`\uDBxx` followed by `\uDCxx`..`\uDFxx` -> the supplementary code point;
//   - any other (lone) surrogate escape -> U+FFFD (EF BF BD), counted in lone_surrogates;
//     the escape after a lone high surrogate is decoded on its own, never swallowed;
//   - `\/` -> `/`, the other JSON escapes as usual, `\u0000` -> a NUL byte;
//   - an unknown escape (`\x`) or a short `\u` makes the line malformed.
// Raw bytes >= 0x80 must be valid UTF-8 (simdjson checks the whole line); raw control bytes
// inside strings are accepted as they are.
//
// Source: `--source-field a.b` (a dotted path to a string), else auto: `meta.redpajama_set_name`
// or `meta.pile_set_name`; when neither is present the source is empty (the caller decides).
//
// Not thread-safe: one parser per thread (it owns simdjson's buffers).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace gyre::data {

enum class LineVerdict {
  kOk,
  kMalformedJson,   // not one JSON object, bad escape, trailing garbage
  kInvalidUtf8,
  kMissingText,     // no "text" member, or it is not a string
  kMissingSource,   // --source-field given but absent / not a string
};
const char* LineVerdictName(LineVerdict v);  // "malformed_json", ...

struct ParsedLine {
  std::string text;
  std::string source;        // empty when not found (auto mode)
  uint64_t lone_surrogates = 0;
  std::string error;         // detail for a verdict other than kOk
};

// Unescapes the body of a JSON string starting just after its opening quote; stops at the
// closing quote. Returns false (with `error`) on a bad escape or a missing closing quote.
// `end` bounds the scan. Exposed for tests and the fuzzer.
bool UnescapeJsonString(const char* begin, const char* end, std::string* out,
                        uint64_t* lone_surrogates, std::string* error);

class JsonLineParser {
 public:
  // `source_field`: dotted path, or empty for auto-detection.
  explicit JsonLineParser(std::string source_field = "");
  ~JsonLineParser();

  // Parses `line` (no trailing newline needed; surrounding whitespace is fine) into `out`.
  LineVerdict Parse(std::string_view line, ParsedLine* out);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace gyre::data
