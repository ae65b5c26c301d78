#include "dataloader/json_line.h"

#include "base/utf8.h"

#include <cstring>
#include <functional>

#include "simdjson.h"

namespace gyre::data {
namespace {

using simdjson::ondemand::json_type;

constexpr uint32_t kReplacement = 0xFFFD;


int HexDigit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// Reads "XXXX" at p (p + 4 <= end). -1 when not four hex digits.
int32_t Hex4(const char* p, const char* end) {
  if (end - p < 4) return -1;
  int32_t v = 0;
  for (int i = 0; i < 4; ++i) {
    const int d = HexDigit(p[i]);
    if (d < 0) return -1;
    v = v * 16 + d;
  }
  return v;
}

}  // namespace

const char* LineVerdictName(LineVerdict v) {
  switch (v) {
    case LineVerdict::kOk: return "ok";
    case LineVerdict::kMalformedJson: return "malformed_json";
    case LineVerdict::kInvalidUtf8: return "invalid_utf8";
    case LineVerdict::kMissingText: return "missing_text";
    case LineVerdict::kMissingSource: return "missing_source";
  }
  return "unknown";
}

bool UnescapeJsonString(const char* p, const char* end, std::string* out,
                        uint64_t* lone_surrogates, std::string* error) {
  out->clear();
  while (p < end) {
    // Copy the run up to the next quote or backslash in one go.
    const char* run = p;
    while (p < end && *p != '"' && *p != '\\') ++p;
    out->append(run, p - run);
    if (p >= end) break;
    if (*p == '"') return true;
    // Backslash escape.
    if (end - p < 2) break;
    const char e = p[1];
    p += 2;
    switch (e) {
      case '"': out->push_back('"'); break;
      case '\\': out->push_back('\\'); break;
      case '/': out->push_back('/'); break;
      case 'b': out->push_back('\b'); break;
      case 'f': out->push_back('\f'); break;
      case 'n': out->push_back('\n'); break;
      case 'r': out->push_back('\r'); break;
      case 't': out->push_back('\t'); break;
      case 'u': {
        const int32_t cp = Hex4(p, end);
        if (cp < 0) {
          *error = "bad \\u escape (expected four hex digits)";
          return false;
        }
        p += 4;
        if (cp >= 0xD800 && cp <= 0xDBFF) {
          // A high surrogate: paired only when a low-surrogate escape follows immediately.
          if (end - p >= 6 && p[0] == '\\' && p[1] == 'u') {
            const int32_t low = Hex4(p + 2, end);
            if (low >= 0xDC00 && low <= 0xDFFF) {
              AppendUtf8(static_cast<char32_t>(0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00)), out);
              p += 6;
              break;
            }
          }
          AppendUtf8(kReplacement, out);
          ++*lone_surrogates;
        } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
          AppendUtf8(kReplacement, out);
          ++*lone_surrogates;
        } else {
          AppendUtf8(static_cast<char32_t>(cp), out);
        }
        break;
      }
      default:
        *error = std::string("unknown escape \\") +
                 (static_cast<unsigned char>(e) >= 0x20 && static_cast<unsigned char>(e) < 0x7F
                      ? std::string(1, e)
                      : "<byte>");
        return false;
    }
  }
  *error = "unterminated string";
  return false;
}

struct JsonLineParser::Impl {
  simdjson::ondemand::parser parser;
  std::string buffer;  // the line plus SIMDJSON_PADDING bytes
  std::vector<std::string> source_path;
  const char* buffer_end() const { return buffer.data() + buffer.size(); }
};

JsonLineParser::JsonLineParser(std::string source_field) : impl_(std::make_unique<Impl>()) {
  size_t start = 0;
  while (!source_field.empty() && start <= source_field.size()) {
    size_t dot = source_field.find('.', start);
    if (dot == std::string::npos) dot = source_field.size();
    impl_->source_path.push_back(source_field.substr(start, dot - start));
    start = dot + 1;
  }
}

JsonLineParser::~JsonLineParser() = default;

namespace {

// The verdict for a simdjson error.
LineVerdict FromSimdjson(simdjson::error_code code, ParsedLine* out) {
  out->error = simdjson::error_message(code);
  return code == simdjson::UTF8_ERROR ? LineVerdict::kInvalidUtf8 : LineVerdict::kMalformedJson;
}

}  // namespace

LineVerdict JsonLineParser::Parse(std::string_view line, ParsedLine* out) {
  out->text.clear();
  out->source.clear();
  out->lone_surrogates = 0;
  out->error.clear();
  Impl& im = *impl_;
  im.buffer.assign(line.data(), line.size());
  im.buffer.append(simdjson::SIMDJSON_PADDING, '\0');
  simdjson::padded_string_view view(im.buffer.data(), line.size(), im.buffer.size());
  // A huge line grows simdjson's buffers; give them back afterwards.
  struct Shrink {
    Impl& im;
    size_t n;
    ~Shrink() {
      if (n > (64u << 20)) {
        im.parser = simdjson::ondemand::parser();
        std::string().swap(im.buffer);
      }
    }
  } shrink{im, line.size()};
  if (line.size() > im.parser.capacity()) {
    if (auto err = im.parser.allocate(line.size() + 64)) return FromSimdjson(err, out);
  }

  simdjson::ondemand::document doc;
  if (auto err = im.parser.iterate(view).get(doc)) return FromSimdjson(err, out);
  simdjson::ondemand::object object;
  if (auto err = doc.get_object().get(object)) {
    if (err == simdjson::INCORRECT_TYPE) {
      out->error = "the line is not a JSON object";
      return LineVerdict::kMalformedJson;
    }
    return FromSimdjson(err, out);
  }

  bool have_text = false;
  bool text_not_string = false;
  bool have_source = false;
  std::string escape_error;
  static const std::vector<std::string> kAutoPath = {"meta", ""};
  const std::vector<std::string>& path = im.source_path.empty() ? kAutoPath : im.source_path;
  const bool auto_source = im.source_path.empty();
  simdjson::error_code json_error = simdjson::SUCCESS;

  // 1: read a string into dst; 0: not a string; -1: bad escape (escape_error); -2: json_error.
  auto read_string = [&](simdjson::ondemand::value value, std::string* dst) -> int {
    json_type type;
    if ((json_error = value.type().get(type))) return -2;
    if (type != json_type::string) return 0;
    simdjson::ondemand::raw_json_string raw;
    if ((json_error = value.get_raw_json_string().get(raw))) return -2;
    if (!UnescapeJsonString(raw.raw(), im.buffer_end(), dst, &out->lone_surrogates,
                            &escape_error)) {
      return -1;
    }
    return 1;
  };
  // Follows path[depth..] from `value`; same return codes as read_string.
  std::function<int(simdjson::ondemand::value, size_t)> follow =
      [&](simdjson::ondemand::value value, size_t depth) -> int {
    if (depth == path.size()) return read_string(value, &out->source);
    json_type type;
    if ((json_error = value.type().get(type))) return -2;
    if (type != json_type::object) return 0;
    simdjson::ondemand::object inner;
    if ((json_error = value.get_object().get(inner))) return -2;
    for (auto field : inner) {
      std::string_view key;
      if ((json_error = field.unescaped_key().get(key))) return -2;
      const bool match = auto_source ? (key == "redpajama_set_name" || key == "pile_set_name")
                                     : key == path[depth];
      if (!match) continue;
      simdjson::ondemand::value child;
      if ((json_error = field.value().get(child))) return -2;
      const int r = follow(child, depth + 1);
      if (r != 0) return r;
    }
    return 0;
  };

  for (auto field : object) {
    std::string_view key;
    if (auto err = field.unescaped_key().get(key)) return FromSimdjson(err, out);
    simdjson::ondemand::value value;
    if (auto err = field.value().get(value)) return FromSimdjson(err, out);
    int r = 0;
    if (key == "text" && !have_text) {
      r = read_string(value, &out->text);
      if (r == 0) text_not_string = true;
      if (r > 0) have_text = true;
      if (r == -1) escape_error = "\"text\": " + escape_error;
    } else if (key == path[0] && !have_source) {
      r = follow(value, 1);
      if (r > 0) have_source = true;
      if (r == -1) escape_error = "source field: " + escape_error;
    }
    if (r == -2) return FromSimdjson(json_error, out);
    if (r == -1) {
      out->error = escape_error;
      return LineVerdict::kMalformedJson;
    }
  }
  if (doc.current_location().error() == simdjson::SUCCESS) {
    out->error = "trailing content after the JSON object";
    return LineVerdict::kMalformedJson;
  }
  if (!have_text) {
    out->error = text_not_string ? "\"text\" is not a string" : "no \"text\" member";
    return LineVerdict::kMissingText;
  }
  if (!auto_source && !have_source) {
    out->error = "no string at source field";
    return LineVerdict::kMissingSource;
  }
  return LineVerdict::kOk;
}

}  // namespace gyre::data
