// libFuzzer target for the JSON-line reader (json_line.h): any bytes as one corpus line, in auto
// source mode and with a dotted --source-field, plus the string unescaper alone. Checks that
// nothing crashes, that accepted text is valid UTF-8, and that parsing is deterministic.
// Built and run by tools/fuzz/run_jsonl_fuzz.sh (clang -fsanitize=fuzzer,address,undefined).
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include "dataloader/json_line.h"
#include "simdjson.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static gyre::data::JsonLineParser auto_parser;
  static gyre::data::JsonLineParser field_parser("meta.a.b");
  const std::string_view line(reinterpret_cast<const char*>(data), size);
  gyre::data::ParsedLine first, second;
  for (gyre::data::JsonLineParser* parser : {&auto_parser, &field_parser}) {
    const auto v1 = parser->Parse(line, &first);
    const auto v2 = parser->Parse(line, &second);
    if (v1 != v2 || first.text != second.text || first.source != second.source) std::abort();
    if (v1 == gyre::data::LineVerdict::kOk) {
      if (!simdjson::validate_utf8(first.text.data(), first.text.size())) std::abort();
      if (!simdjson::validate_utf8(first.source.data(), first.source.size())) std::abort();
    }
  }
  std::string out, error;
  uint64_t lone = 0;
  gyre::data::UnescapeJsonString(line.data(), line.data() + line.size(), &out, &lone, &error);
  return 0;
}
