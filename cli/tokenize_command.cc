// `gyre tokenize --tokenizer PATH --jsonl FILE`: one line of space-separated token ids per JSON
// line of FILE (its "text" field; no end-of-text id appended). A line that is not a JSON object
// with a string "text" gets an error on stderr naming FILE:LINE, prints an empty line (so output
// line N still belongs to input line N) and makes the exit status 1; the other lines go on.
//
// JSON strings may hold lone surrogate escapes (SlimPajama has them): each becomes U+FFFD.
// --pieces prints each token's bytes instead of its id (for eyeballing a split).
#include <cctype>
#include <cstdio>
#include <string>
#include <string_view>
#include <vector>

#include "CLI/CLI.hpp"
#include "base/env.h"
#include "dataloader/tokenizer/tokenizer.h"
#include "nlohmann/json.hpp"

namespace gyre::cli {
namespace {

bool IsHex4(std::string_view s, size_t i) {
  if (i + 4 > s.size()) return false;
  for (size_t k = i; k < i + 4; ++k) {
    if (!std::isxdigit(static_cast<unsigned char>(s[k]))) return false;
  }
  return true;
}

unsigned Hex4(std::string_view s, size_t i) {
  return static_cast<unsigned>(std::stoul(std::string(s.substr(i, 4)), nullptr, 16));
}

// `line` with every lone surrogate escape (\uD800-\uDFFF without its partner) replaced by \uFFFD,
// so a strict JSON parser accepts it. Escaped backslashes are honoured.
std::string ReplaceLoneSurrogates(std::string_view line) {
  std::string out;
  out.reserve(line.size());
  size_t i = 0;
  while (i < line.size()) {
    if (line[i] != '\\' || i + 1 >= line.size()) {
      out.push_back(line[i++]);
      continue;
    }
    if (line[i + 1] != 'u' || !IsHex4(line, i + 2)) {  // \\, \", \n, ... or malformed
      out.append(line.substr(i, 2));
      i += 2;
      continue;
    }
    const unsigned u = Hex4(line, i + 2);
    if (u >= 0xD800 && u <= 0xDBFF && i + 12 <= line.size() && line[i + 6] == '\\' &&
        line[i + 7] == 'u' && IsHex4(line, i + 8) && Hex4(line, i + 8) >= 0xDC00 &&
        Hex4(line, i + 8) <= 0xDFFF) {
      out.append(line.substr(i, 12));  // a proper pair
      i += 12;
    } else if (u >= 0xD800 && u <= 0xDFFF) {
      out.append("\\uFFFD");
      i += 6;
    } else {
      out.append(line.substr(i, 6));
      i += 6;
    }
  }
  return out;
}

// The "text" of one JSON line, or an error phrase in *why.
bool TextOfLine(std::string_view line, std::string* text, std::string* why) {
  nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() && line.find("\\u") != std::string_view::npos) {
    j = nlohmann::json::parse(ReplaceLoneSurrogates(line), nullptr, false);
  }
  if (j.is_discarded()) {
    *why = "not valid JSON";
    return false;
  }
  if (!j.is_object()) {
    *why = "not a JSON object";
    return false;
  }
  auto it = j.find("text");
  if (it == j.end()) {
    *why = "no \"text\" field";
    return false;
  }
  if (!it->is_string()) {
    *why = "\"text\" is not a string";
    return false;
  }
  *text = it->get<std::string>();
  return true;
}

}  // namespace

int RunTokenize(int argc, char** argv) {
  CLI::App app{"Print the token ids of each JSON line's \"text\", one line of ids per line."};
  std::string tokenizer_path, jsonl_path;
  bool pieces = false;
  app.add_option("--tokenizer", tokenizer_path,
                 "tokenizer.json, or a folder with vocab.json + merges.txt")
      ->required();
  app.add_option("--jsonl", jsonl_path, "JSON-lines file with a \"text\" field per line")
      ->required();
  app.add_flag("--pieces", pieces, "print each token's text (escaped) instead of its id");
  CLI11_PARSE(app, argc, argv);

  auto tokenizer = Tokenizer::Load(tokenizer_path);
  if (!tokenizer.ok()) {
    std::fprintf(stderr, "gyre tokenize: %s\n", tokenizer.status().ToString().c_str());
    return 1;
  }
  auto region = Env::Default()->MapFile(jsonl_path);
  if (!region.ok()) {
    std::fprintf(stderr, "gyre tokenize: %s: %s\n", jsonl_path.c_str(),
                 region.status().ToString().c_str());
    return 1;
  }
  const std::string_view data = (*region)->data();
  size_t bad = 0, line_no = 0, pos = 0;
  std::string text, why, out;
  std::vector<uint32_t> ids;
  while (pos < data.size()) {
    size_t end = data.find('\n', pos);
    if (end == std::string_view::npos) end = data.size();
    std::string_view line = data.substr(pos, end - pos);
    pos = end + 1;
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (!TextOfLine(line, &text, &why)) {
      std::fprintf(stderr, "%s:%zu: %s\n", jsonl_path.c_str(), line_no, why.c_str());
      ++bad;
      out.push_back('\n');
      continue;
    }
    ids.clear();
    (*tokenizer)->Encode(text, &ids);
    for (size_t i = 0; i < ids.size(); ++i) {
      if (i > 0) out.push_back(' ');
      if (!pieces) {
        out += std::to_string(ids[i]);
        continue;
      }
      auto piece = (*tokenizer)->Decode(std::span<const uint32_t>(&ids[i], 1));
      for (unsigned char c : piece.ok() ? *piece : std::string("?")) {
        if (c < 0x20 || c == ' ' || c == '\\' || c >= 0x80) {
          char hex[8];
          std::snprintf(hex, sizeof(hex), "\\x%02x", c);
          out += hex;
        } else {
          out.push_back(static_cast<char>(c));
        }
      }
    }
    out.push_back('\n');
    if (out.size() > (1 << 20)) {
      std::fwrite(out.data(), 1, out.size(), stdout);
      out.clear();
    }
  }
  std::fwrite(out.data(), 1, out.size(), stdout);
  if (std::fflush(stdout) != 0) {
    std::fprintf(stderr, "gyre tokenize: writing the output failed\n");
    return 1;
  }
  if (bad > 0) {
    std::fprintf(stderr, "gyre tokenize: %zu of %zu lines were bad\n", bad, line_no);
    return 1;
  }
  return 0;
}

}  // namespace gyre::cli
