// Byte-level BPE, laid out for speed:
//   - the vocabulary is kept as byte strings (the GPT-2 byte-to-unicode mapping is undone once at
//     load), so encoding never builds the mapped unicode strings;
//   - merges live in one flat hash map from the id pair to (rank, merged id);
//   - each thread caches the ids of the pre-tokens it has seen (most words repeat), so BPE runs
//     only on new words;
//   - short words merge in place over small arrays; long ones (a 1 MB run of letters) use a heap,
//     as Hugging Face does, so the cost stays O(n log n).
#include "dataloader/tokenizer/tokenizer.h"

#include <utf8proc.h>
#include <xxhash.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <queue>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "base/status_macros.h"
#include "dataloader/tokenizer/hf_nfc.h"
#include "dataloader/tokenizer/pretokenize.h"
#include "dataloader/tokenizer/utf8.h"
#include "nlohmann/json.hpp"

namespace gyre {

using tokenizer_internal::AppendUtf8;
using tokenizer_internal::DecodeUtf8;
using tokenizer_internal::FindInvalidUtf8;
using tokenizer_internal::HfNfc;
using tokenizer_internal::NextPretoken;
using tokenizer_internal::ReplaceInvalidUtf8;

namespace {

using Json = nlohmann::json;

// Fingerprints of the two tokenizers Gyre ships recipes for (see name()).
constexpr uint64_t kGpt2Fingerprint = 0x4d6af73997ce154cULL;
constexpr uint64_t kGptNeox20bFingerprint = 0x7cf3d597c4e8eeccULL;

// GPT-2's reversible byte -> code point mapping: printable Latin-1 bytes map to themselves, the
// other 68 bytes to U+0100.. in byte order.
std::array<char32_t, 256> ByteToUnicode() {
  std::array<char32_t, 256> table{};
  std::array<bool, 256> printable{};
  for (int b = '!'; b <= '~'; ++b) printable[b] = true;
  for (int b = 0xA1; b <= 0xAC; ++b) printable[b] = true;
  for (int b = 0xAE; b <= 0xFF; ++b) printable[b] = true;
  char32_t next = 256;
  for (int b = 0; b < 256; ++b) table[b] = printable[b] ? static_cast<char32_t>(b) : next++;
  return table;
}

// Converts a vocabulary token (byte-level code points) back to its bytes. False when a code
// point is not one of the 256 the mapping produces.
bool ByteLevelToBytes(std::string_view token, std::string* bytes) {
  static const auto* inverse = [] {
    auto* inv = new std::array<int16_t, 512>;
    inv->fill(-1);
    const auto fwd = ByteToUnicode();
    for (int b = 0; b < 256; ++b) (*inv)[fwd[b]] = static_cast<int16_t>(b);
    return inv;
  }();
  bytes->clear();
  size_t i = 0;
  while (i < token.size()) {
    char32_t cp;
    const int len = DecodeUtf8(token, i, &cp);
    if (cp >= 512 || (*inverse)[cp] < 0) return false;
    bytes->push_back(static_cast<char>((*inverse)[cp]));
    i += len;
  }
  return true;
}

std::string Quote(std::string_view s) {
  std::string out = "\"";
  for (char c : s.substr(0, 60)) {
    if (static_cast<unsigned char>(c) < 0x20) {
      absl::StrAppend(&out, "\\x", absl::Hex(static_cast<unsigned char>(c), absl::kZeroPad2));
    } else {
      out.push_back(c);
    }
  }
  if (s.size() > 60) out += "...";
  return out + "\"";
}

bool IsAscii(std::string_view s) {
  size_t i = 0;
  for (; i + 8 <= s.size(); i += 8) {
    uint64_t w;
    std::memcpy(&w, s.data() + i, 8);
    if (w & 0x8080808080808080ULL) return false;
  }
  for (; i < s.size(); ++i) {
    if (static_cast<unsigned char>(s[i]) >= 0x80) return false;
  }
  return true;
}

// Added tokens, matched leftmost-longest (the Aho-Corasick mode Hugging Face uses) with a byte
// trie. Few tokens, short contents: a trie walk from each candidate position is cheap.
class AddedTokenMatcher {
 public:
  AddedTokenMatcher() : nodes_(1) { first_byte_.fill(false); }

  void Add(std::string_view content, uint32_t id) {
    if (content.empty()) return;
    int32_t node = 0;
    for (char c : content) {
      const auto b = static_cast<uint8_t>(c);
      int32_t child = Child(node, b);
      if (child < 0) {
        child = static_cast<int32_t>(nodes_.size());
        nodes_[node].children.emplace_back(b, child);
        nodes_.emplace_back();
      }
      node = child;
    }
    nodes_[node].id = id;
    first_byte_[static_cast<uint8_t>(content[0])] = true;
    empty_ = false;
  }

  bool empty() const { return empty_; }

  // The leftmost-longest match at or after `from`.
  bool FindNext(std::string_view text, size_t from, size_t* start, size_t* len,
                uint32_t* id) const {
    const auto* p = reinterpret_cast<const uint8_t*>(text.data());
    const size_t n = text.size();
    for (size_t i = from; i < n; ++i) {
      if (!first_byte_[p[i]]) continue;
      int32_t node = 0;
      int64_t best_id = -1;
      size_t best_len = 0;
      for (size_t j = i; j < n; ++j) {
        node = Child(node, p[j]);
        if (node < 0) break;
        if (nodes_[node].id >= 0) {
          best_id = nodes_[node].id;
          best_len = j + 1 - i;
        }
      }
      if (best_id >= 0) {
        *start = i;
        *len = best_len;
        *id = static_cast<uint32_t>(best_id);
        return true;
      }
    }
    return false;
  }

 private:
  struct Node {
    std::vector<std::pair<uint8_t, int32_t>> children;
    int64_t id = -1;
  };
  int32_t Child(int32_t node, uint8_t b) const {
    for (const auto& [byte, child] : nodes_[node].children) {
      if (byte == b) return child;
    }
    return -1;
  }
  std::vector<Node> nodes_;
  std::array<bool, 256> first_byte_;
  bool empty_ = true;
};

// Per-thread cache of pre-token -> ids, one per live tokenizer (keyed by a serial number that is
// never reused). An open-addressing table of 64-bit XXH3 hashes with the keys and ids in two
// arenas: a hit costs one hash, one probe and one short compare. Bounded: cleared when full.
constexpr size_t kMaxCachedWordBytes = 64;
constexpr size_t kMaxCacheEntries = 1 << 18;  // ~20 MB a thread
constexpr size_t kMaxThreadCaches = 8;

// a[0, n) == b[0, n) for short n without a libc call: word loads, overlapping at the end.
inline bool EqualBytes(const char* a, const char* b, size_t n) {
  auto load64 = [](const char* p) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    return v;
  };
  auto load32 = [](const char* p) {
    uint32_t v;
    std::memcpy(&v, p, 4);
    return v;
  };
  if (n >= 8) {
    for (size_t i = 0; i + 8 < n; i += 8) {
      if (load64(a + i) != load64(b + i)) return false;
    }
    return load64(a + n - 8) == load64(b + n - 8);
  }
  if (n >= 4) return load32(a) == load32(b) && load32(a + n - 4) == load32(b + n - 4);
  for (size_t i = 0; i < n; ++i) {
    if (a[i] != b[i]) return false;
  }
  return true;
}

class WordCache {
 public:
  WordCache() : slots_(kInitialSlots) {}

  // Appends the cached ids of `word` to *ids and returns true, or returns false.
  bool Find(std::string_view word, uint64_t hash, std::vector<uint32_t>* ids) const {
    const size_t mask = slots_.size() - 1;
    for (size_t i = hash & mask;; i = (i + 1) & mask) {
      const Slot& slot = slots_[i];
      if (slot.hash == 0) return false;
      if (slot.hash == hash && slot.key_len == word.size() &&
          EqualBytes(keys_.data() + slot.key_off, word.data(), word.size())) {
        ids->insert(ids->end(), ids_.begin() + slot.id_off,
                    ids_.begin() + slot.id_off + slot.id_count);
        return true;
      }
    }
  }

  void Insert(std::string_view word, uint64_t hash, std::span<const uint32_t> word_ids) {
    if (word.size() > kMaxCachedWordBytes || word_ids.size() > kMaxCachedWordBytes) return;
    if (used_ + 1 > kMaxCacheEntries) Clear();
    if (2 * (used_ + 1) > slots_.size()) Grow();
    const Slot slot{hash, static_cast<uint32_t>(keys_.size()), static_cast<uint16_t>(word.size()),
                    static_cast<uint16_t>(word_ids.size()), static_cast<uint32_t>(ids_.size())};
    keys_.append(word.data(), word.size());
    ids_.insert(ids_.end(), word_ids.begin(), word_ids.end());
    Place(slot);
    ++used_;
  }

  // Never zero (zero marks an empty slot).
  static uint64_t Hash(std::string_view word) { return XXH3_64bits(word.data(), word.size()) | 1; }

 private:
  static constexpr size_t kInitialSlots = 1 << 12;
  struct Slot {
    uint64_t hash = 0;
    uint32_t key_off = 0;
    uint16_t key_len = 0;
    uint16_t id_count = 0;
    uint32_t id_off = 0;
  };
  void Place(const Slot& slot) {
    const size_t mask = slots_.size() - 1;
    size_t i = slot.hash & mask;
    while (slots_[i].hash != 0) i = (i + 1) & mask;
    slots_[i] = slot;
  }
  void Grow() {
    std::vector<Slot> old(slots_.size() * 2);
    old.swap(slots_);
    for (const Slot& slot : old) {
      if (slot.hash != 0) Place(slot);
    }
  }
  void Clear() {
    slots_.assign(kInitialSlots, Slot{});
    keys_.clear();
    ids_.clear();
    used_ = 0;
  }
  std::vector<Slot> slots_;
  std::string keys_;
  std::vector<uint32_t> ids_;
  size_t used_ = 0;
};

std::atomic<uint64_t> next_serial{1};

WordCache& CacheForThisThread(uint64_t serial) {
  thread_local std::vector<std::pair<uint64_t, std::unique_ptr<WordCache>>> caches;
  for (auto& [s, cache] : caches) {
    if (s == serial) return *cache;
  }
  if (caches.size() >= kMaxThreadCaches) caches.clear();
  caches.emplace_back(serial, std::make_unique<WordCache>());
  return *caches.back().second;
}

struct Merge {
  uint32_t rank;
  uint32_t new_id;
};

inline uint64_t PairKey(uint32_t left, uint32_t right) {
  return (static_cast<uint64_t>(left) << 32) | right;
}

// What a tokenizer is made of, before the fast tables are built: the same for both file kinds.
struct AddedTokenSpec {
  std::string content;
  uint32_t id;
  bool normalized;  // matched after the normalizer runs (else on the raw text)
};
struct TokenizerSpec {
  std::string source;  // the file or folder, for messages
  std::string name;
  bool nfc = false;
  std::vector<std::pair<std::string, uint32_t>> vocab;   // byte-level token -> id
  std::vector<std::pair<std::string, std::string>> merges;  // in rank order
  // Where merge i came from, for messages: "<merges_file>:<merge_line[i]>" for a merges.txt,
  // "<source> (model.merges[i])" for a tokenizer.json (merges_file empty).
  std::string merges_file;
  std::vector<uint32_t> merge_line;
  std::string MergeWhere(size_t i) const {
    return merges_file.empty() ? absl::StrCat(source, " (model.merges[", i, "])")
                               : absl::StrCat(merges_file, ":", merge_line[i]);
  }
  std::vector<AddedTokenSpec> added;
};

}  // namespace

class Tokenizer::Impl {
 public:
  static absl::StatusOr<std::unique_ptr<Impl>> Build(TokenizerSpec spec);

  void Encode(std::string_view text, std::vector<uint32_t>* ids) const;
  absl::StatusOr<std::string> Decode(std::span<const uint32_t> ids) const;

  std::string name_;
  uint64_t fingerprint_ = 0;
  uint32_t eos_id_ = 0;
  uint32_t vocab_size_ = 0;

 private:
  void EncodeNormalizable(std::string_view piece, std::vector<uint32_t>* ids,
                          WordCache* cache) const;
  void EncodeOrdinary(std::string_view piece, std::vector<uint32_t>* ids, WordCache* cache) const;
  void EncodeWord(std::string_view word, std::vector<uint32_t>* ids, WordCache* cache) const;
  void Bpe(std::string_view word, std::vector<uint32_t>* ids) const;
  void BpeLong(std::string_view word, std::vector<uint32_t>* ids) const;

  const Merge* FindMerge(uint32_t left, uint32_t right) const {
    auto it = merges_.find(PairKey(left, right));
    return it == merges_.end() ? nullptr : &it->second;
  }

  uint64_t serial_ = next_serial.fetch_add(1);
  bool nfc_ = false;
  std::vector<std::string> id_bytes_;  // id -> bytes ("" and !id_valid_ for unused ids)
  std::vector<bool> id_valid_;
  std::array<uint32_t, 256> byte_id_{};
  absl::flat_hash_map<uint64_t, Merge> merges_;
  AddedTokenMatcher raw_added_;
  AddedTokenMatcher normalized_added_;
};

namespace {

// ---- Loading -------------------------------------------------------------------------------

absl::Status Invalid(const std::string& source, std::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(source, ": ", std::string(what)));
}

// A short description of a JSON value's kind, for messages.
const char* Kind(const Json& j) { return j.type_name(); }

absl::StatusOr<std::vector<std::pair<std::string, uint32_t>>> ParseVocab(
    const Json& vocab, const std::string& where) {
  if (!vocab.is_object()) {
    return Invalid(where, absl::StrCat("the vocabulary must be a JSON object of token -> id, not ",
                                       Kind(vocab)));
  }
  std::vector<std::pair<std::string, uint32_t>> out;
  out.reserve(vocab.size());
  for (auto it = vocab.begin(); it != vocab.end(); ++it) {
    const Json& v = it.value();
    if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() >= (1LL << 31)) {
      return Invalid(where, absl::StrCat("vocabulary entry ", Quote(it.key()),
                                         " must map to a non-negative integer id, not ",
                                         v.dump().substr(0, 40)));
    }
    out.emplace_back(it.key(), static_cast<uint32_t>(v.get<int64_t>()));
  }
  return out;
}

absl::Status ParseMergesText(std::string_view text, const std::string& file, TokenizerSpec* spec) {
  spec->merges_file = file;
  size_t line_no = 0;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    if (end == std::string_view::npos) end = text.size();
    std::string_view line = text.substr(pos, end - pos);
    pos = end + 1;
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line.empty()) continue;
    if (line_no == 1 && line.substr(0, 8) == "#version") continue;
    const size_t space = line.find(' ');
    if (space == std::string_view::npos || space == 0 || space + 1 == line.size() ||
        line.find(' ', space + 1) != std::string_view::npos) {
      return Invalid(absl::StrCat(file, ":", line_no),
                     absl::StrCat("a merges line must be two tokens separated by one space, got ",
                                  Quote(line)));
    }
    spec->merges.emplace_back(std::string(line.substr(0, space)),
                              std::string(line.substr(space + 1)));
    spec->merge_line.push_back(static_cast<uint32_t>(line_no));
  }
  if (spec->merges.empty()) return Invalid(file, "holds no merges");
  return absl::OkStatus();
}

// Why `text` is not what we expected, in a phrase: helps when someone passes the wrong file.
std::string GuessKind(std::string_view text) {
  if (text.substr(0, 8) == "#version") return "it looks like a merges.txt";
  if (text.find('\0') != std::string_view::npos) return "it looks like a binary file";
  return "it is not valid JSON";
}

absl::StatusOr<TokenizerSpec> SpecFromTokenizerJson(const std::string& path, Env* env) {
  ASSIGN_OR_RETURN(std::string text, env->ReadFile(path));
  Json root = Json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded()) {
    return Invalid(path, absl::StrCat("not a Hugging Face tokenizer.json: ", GuessKind(text),
                                      " (a merges.txt or vocab.json belongs in a folder passed "
                                      "as the path)"));
  }
  if (!root.is_object()) {
    return Invalid(path, absl::StrCat("not a Hugging Face tokenizer.json: the top level is a JSON ",
                                      Kind(root), ", not an object"));
  }
  auto model_it = root.find("model");
  if (model_it == root.end() || !model_it->is_object()) {
    bool looks_like_vocab = !root.empty();
    for (auto it = root.begin(); it != root.end() && looks_like_vocab; ++it) {
      looks_like_vocab = it.value().is_number_integer();
    }
    return Invalid(path, absl::StrCat(
                             "not a Hugging Face tokenizer.json: no \"model\" object",
                             looks_like_vocab ? " (it looks like a vocab.json: pass the folder "
                                                "holding vocab.json + merges.txt instead)"
                                              : ""));
  }
  const Json& model = *model_it;
  TokenizerSpec spec;
  spec.source = path;

  // The model: BPE, byte-level, no dropout, no affixes.
  auto type_it = model.find("type");
  if (type_it != model.end()) {
    if (!type_it->is_string()) return Invalid(path, "model.type must be a string");
    const std::string& type = type_it->get_ref<const std::string&>();
    if (type != "BPE") {
      return Invalid(path, absl::StrCat("model.type is ", Quote(type),
                                        "; only byte-level BPE is supported"));
    }
  }
  for (const char* key : {"dropout", "continuing_subword_prefix", "end_of_word_suffix"}) {
    auto it = model.find(key);
    if (it != model.end() && !it->is_null() && !(it->is_string() && it->get_ref<const std::string&>().empty())) {
      return Invalid(path, absl::StrCat("model.", key, " = ", it->dump().substr(0, 40),
                                        " is not supported (byte-level BPE uses none)"));
    }
  }
  if (auto it = model.find("byte_fallback"); it != model.end() && it->is_boolean() && it->get<bool>()) {
    return Invalid(path, "model.byte_fallback = true is not supported");
  }
  if (auto it = model.find("ignore_merges"); it != model.end() && it->is_boolean() && it->get<bool>()) {
    return Invalid(path, "model.ignore_merges = true is not supported (GPT-2-style BPE merges every word)");
  }
  auto vocab_it = model.find("vocab");
  if (vocab_it == model.end()) return Invalid(path, "model has no \"vocab\"");
  ASSIGN_OR_RETURN(spec.vocab, ParseVocab(*vocab_it, path + " (model.vocab)"));
  auto merges_it = model.find("merges");
  if (merges_it == model.end() || !merges_it->is_array()) {
    return Invalid(path, "model.merges must be an array");
  }
  spec.merges.reserve(merges_it->size());
  for (size_t i = 0; i < merges_it->size(); ++i) {
    const Json& m = (*merges_it)[i];
    auto where = [&] { return absl::StrCat(path, " (model.merges[", i, "])"); };
    if (m.is_string()) {  // "a b"
      const std::string& s = m.get_ref<const std::string&>();
      const size_t space = s.find(' ');
      if (space == std::string::npos || space == 0 || space + 1 == s.size() ||
          s.find(' ', space + 1) != std::string::npos) {
        return Invalid(where(), absl::StrCat("a merge must be two tokens separated by one space, got ",
                                           Quote(s)));
      }
      spec.merges.emplace_back(s.substr(0, space), s.substr(space + 1));
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {  // [a, b]
      spec.merges.emplace_back(m[0].get<std::string>(), m[1].get<std::string>());
    } else {
      return Invalid(where(), "a merge must be \"a b\" or [\"a\", \"b\"]");
    }
  }

  // Normalizer: none or NFC (alone or as the only member of a Sequence).
  if (auto it = root.find("normalizer"); it != root.end() && !it->is_null()) {
    const Json* norm = &*it;
    if (norm->is_object() && norm->value("type", "") == "Sequence") {
      auto list = norm->find("normalizers");
      if (list != norm->end() && list->is_array() && list->size() == 1) norm = &(*list)[0];
      else if (list != norm->end() && list->is_array() && list->empty()) norm = nullptr;
    }
    if (norm != nullptr) {
      if (!norm->is_object() || norm->value("type", "") != "NFC") {
        return Invalid(path, absl::StrCat("normalizer ", norm->dump().substr(0, 60),
                                          " is not supported (only none or NFC)"));
      }
      spec.nfc = true;
    }
  }
  // Pre-tokenizer: ByteLevel with the GPT-2 regex and no prefix space.
  {
    auto it = root.find("pre_tokenizer");
    const Json* pre = it == root.end() ? nullptr : &*it;
    if (pre != nullptr && pre->is_object() && pre->value("type", "") == "Sequence") {
      auto list = pre->find("pretokenizers");
      pre = (list != pre->end() && list->is_array() && list->size() == 1) ? &(*list)[0] : pre;
    }
    if (pre == nullptr || !pre->is_object() || pre->value("type", "") != "ByteLevel") {
      return Invalid(path, absl::StrCat("pre_tokenizer ",
                                        pre == nullptr ? std::string("(none)") : pre->dump().substr(0, 80),
                                        " is not supported (only ByteLevel)"));
    }
    auto prefix = pre->find("add_prefix_space");
    if (prefix != pre->end() && prefix->is_boolean() && prefix->get<bool>()) {
      return Invalid(path, "pre_tokenizer ByteLevel with add_prefix_space = true is not supported");
    }
    auto regex = pre->find("use_regex");
    if (regex != pre->end() && regex->is_boolean() && !regex->get<bool>()) {
      return Invalid(path, "pre_tokenizer ByteLevel with use_regex = false is not supported");
    }
  }
  // Added tokens.
  if (auto it = root.find("added_tokens"); it != root.end() && !it->is_null()) {
    if (!it->is_array()) return Invalid(path, "added_tokens must be an array");
    for (size_t i = 0; i < it->size(); ++i) {
      const Json& t = (*it)[i];
      const std::string where = absl::StrCat("added_tokens[", i, "]");
      if (!t.is_object() || !t.contains("content") || !t["content"].is_string() ||
          !t.contains("id") || !t["id"].is_number_integer() || t["id"].get<int64_t>() < 0 ||
          t["id"].get<int64_t>() >= (1LL << 31)) {
        return Invalid(path, absl::StrCat(where, " needs a string \"content\" and an integer \"id\""));
      }
      for (const char* flag : {"lstrip", "rstrip", "single_word"}) {
        auto f = t.find(flag);
        if (f != t.end() && f->is_boolean() && f->get<bool>()) {
          return Invalid(path, absl::StrCat(where, " sets ", flag, " = true, which is not supported"));
        }
      }
      AddedTokenSpec added;
      added.content = t["content"].get<std::string>();
      added.id = static_cast<uint32_t>(t["id"].get<int64_t>());
      auto norm = t.find("normalized");
      // Hugging Face's default: special tokens match the raw text, others the normalized text.
      const bool special = t.value("special", false);
      added.normalized = (norm != t.end() && norm->is_boolean()) ? norm->get<bool>() : !special;
      spec.added.push_back(std::move(added));
    }
  }
  return spec;
}

absl::StatusOr<TokenizerSpec> SpecFromVocabFolder(const std::string& dir,
                                                  const std::vector<std::string>& entries,
                                                  Env* env) {
  auto has = [&](const char* name) {
    return std::find(entries.begin(), entries.end(), name) != entries.end();
  };
  std::string vocab_path, merges_path;
  if (has("vocab.json") && has("merges.txt")) {
    vocab_path = JoinPath(dir, "vocab.json");
    merges_path = JoinPath(dir, "merges.txt");
  } else if (has("encoder.json") && has("vocab.bpe")) {
    vocab_path = JoinPath(dir, "encoder.json");
    merges_path = JoinPath(dir, "vocab.bpe");
  } else if (has("tokenizer.json")) {
    return SpecFromTokenizerJson(JoinPath(dir, "tokenizer.json"), env);
  } else {
    return absl::NotFoundError(absl::StrCat(
        dir, ": the folder holds neither vocab.json + merges.txt, encoder.json + vocab.bpe, nor "
             "tokenizer.json"));
  }
  TokenizerSpec spec;
  spec.source = dir;
  ASSIGN_OR_RETURN(std::string vocab_text, env->ReadFile(vocab_path));
  Json vocab = Json::parse(vocab_text, nullptr, /*allow_exceptions=*/false);
  if (vocab.is_discarded()) {
    return Invalid(vocab_path, absl::StrCat("not a vocab.json: ", GuessKind(vocab_text)));
  }
  ASSIGN_OR_RETURN(spec.vocab, ParseVocab(vocab, vocab_path));
  ASSIGN_OR_RETURN(std::string merges_text, env->ReadFile(merges_path));
  if (!merges_text.empty() && (merges_text[0] == '{' || merges_text[0] == '[')) {
    return Invalid(merges_path, "not a merges file: it looks like JSON");
  }
  RETURN_IF_ERROR(ParseMergesText(merges_text, merges_path, &spec));
  // As GPT2TokenizerFast does: <|endoftext|> is a special token, matched in the text.
  for (const auto& [token, id] : spec.vocab) {
    if (token == "<|endoftext|>") spec.added.push_back({token, id, /*normalized=*/false});
  }
  return spec;
}

// The last path component of `path`'s folder (for a file) or of `path` (for a folder).
std::string FolderName(std::string path, bool is_folder) {
  while (path.size() > 1 && path.back() == '/') path.pop_back();
  if (!is_folder) path = DirName(path);
  if (path == "." || path.empty()) return "tokenizer";
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

void HashU64(XXH64_state_t* state, uint64_t v) { XXH64_update(state, &v, sizeof(v)); }
void HashBytes(XXH64_state_t* state, std::string_view s) {
  HashU64(state, s.size());
  XXH64_update(state, s.data(), s.size());
}

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer::Impl>> Tokenizer::Impl::Build(TokenizerSpec spec) {
  auto impl = std::make_unique<Impl>();
  impl->nfc_ = spec.nfc;

  uint32_t max_id = 0;
  for (const auto& [token, id] : spec.vocab) max_id = std::max(max_id, id);
  for (const auto& added : spec.added) max_id = std::max(max_id, added.id);
  if (spec.vocab.empty()) return Invalid(spec.source, "the vocabulary is empty");
  if (max_id >= (1u << 24)) {  // 16M ids: far beyond any real vocabulary; guards memory
    return Invalid(spec.source, absl::StrCat("token id ", max_id, " is too large (limit 16777215)"));
  }
  impl->vocab_size_ = max_id + 1;
  impl->id_bytes_.assign(impl->vocab_size_, "");
  impl->id_valid_.assign(impl->vocab_size_, false);

  // Model vocabulary: back to bytes.
  absl::flat_hash_map<std::string, uint32_t> token_id;  // byte-level token -> id (for merges)
  absl::flat_hash_map<std::string, uint32_t> bytes_id;  // token bytes -> id
  token_id.reserve(spec.vocab.size());
  std::string bytes;
  for (const auto& [token, id] : spec.vocab) {
    if (!ByteLevelToBytes(token, &bytes) || bytes.empty()) {
      return Invalid(spec.source, absl::StrCat("vocabulary token ", Quote(token), " (id ", id,
                                               ") is not byte-level encoded: this is not a "
                                               "GPT-2-style byte-level BPE vocabulary"));
    }
    if (impl->id_valid_[id]) {
      return Invalid(spec.source, absl::StrCat("id ", id, " is given to two vocabulary tokens"));
    }
    impl->id_valid_[id] = true;
    impl->id_bytes_[id] = bytes;
    bytes_id.emplace(bytes, id);
    token_id.emplace(token, id);
  }
  for (int b = 0; b < 256; ++b) {
    auto it = bytes_id.find(std::string(1, static_cast<char>(b)));
    // C0, C1 and F5..FF never occur in valid UTF-8 (and input is made valid before encoding);
    // GPT-NeoX-20B has no tokens for them.
    const bool never_in_utf8 = b == 0xC0 || b == 0xC1 || b >= 0xF5;
    if (it == bytes_id.end() && never_in_utf8) {
      impl->byte_id_[b] = 0;
      continue;
    }
    if (it == bytes_id.end()) {
      return Invalid(spec.source, absl::StrCat("the vocabulary has no token for byte 0x",
                                               absl::Hex(b, absl::kZeroPad2),
                                               ": not a byte-level BPE vocabulary"));
    }
    impl->byte_id_[b] = it->second;
  }

  // Merges: rank = position; a later duplicate wins, as in Hugging Face's map.
  impl->merges_.reserve(spec.merges.size());
  for (size_t rank = 0; rank < spec.merges.size(); ++rank) {
    const auto& [left, right] = spec.merges[rank];
    auto l = token_id.find(left);
    auto r = token_id.find(right);
    auto m = token_id.find(left + right);
    if (l == token_id.end() || r == token_id.end() || m == token_id.end()) {
      const std::string& missing = l == token_id.end()   ? left
                                   : r == token_id.end() ? right
                                                         : left + right;
      return Invalid(spec.MergeWhere(rank),
                     absl::StrCat("merge ", Quote(left + " " + right), " uses token ",
                                  Quote(missing), ", which is not in the vocabulary"));
    }
    impl->merges_[PairKey(l->second, r->second)] =
        Merge{static_cast<uint32_t>(rank), m->second};
  }

  // Added tokens.
  bool have_eos = false;
  for (auto& added : spec.added) {
    if (!spec.nfc) added.normalized = false;  // no normalizer: the two kinds match alike
    if (added.normalized) added.content = HfNfc(added.content);
    if (added.content.empty()) return Invalid(spec.source, "an added token has empty content");
    impl->id_valid_[added.id] = true;
    impl->id_bytes_[added.id] = added.content;
    (added.normalized ? impl->normalized_added_ : impl->raw_added_).Add(added.content, added.id);
    if (added.content == "<|endoftext|>") {
      impl->eos_id_ = added.id;
      have_eos = true;
    }
  }
  if (!have_eos) {
    return Invalid(spec.source, "the tokenizer has no <|endoftext|> token to end documents with");
  }

  // Fingerprint: everything that decides the ids, in a canonical order.
  XXH64_state_t* state = XXH64_createState();
  XXH64_reset(state, 0);
  HashBytes(state, "gyre-byte-level-bpe-v1");
  HashU64(state, spec.nfc);
  HashU64(state, impl->vocab_size_);
  for (uint32_t id = 0; id < impl->vocab_size_; ++id) {
    HashU64(state, impl->id_valid_[id]);
    HashBytes(state, impl->id_bytes_[id]);
  }
  for (const auto& [left, right] : spec.merges) {
    HashU64(state, PairKey(token_id[left], token_id[right]));
  }
  std::sort(spec.added.begin(), spec.added.end(),
            [](const AddedTokenSpec& a, const AddedTokenSpec& b) { return a.id < b.id; });
  for (const auto& added : spec.added) {
    HashU64(state, added.id);
    HashU64(state, added.normalized);
    HashBytes(state, added.content);
  }
  impl->fingerprint_ = XXH64_digest(state);
  XXH64_freeState(state);

  if (impl->fingerprint_ == kGpt2Fingerprint) {
    impl->name_ = "gpt2";
  } else if (impl->fingerprint_ == kGptNeox20bFingerprint) {
    impl->name_ = "gpt-neox-20b";
  } else {
    impl->name_ = spec.name;
  }
  return impl;
}

// ---- Encoding ------------------------------------------------------------------------------

void Tokenizer::Impl::Encode(std::string_view text, std::vector<uint32_t>* ids) const {
  std::string repaired;
  if (FindInvalidUtf8(text) != text.size()) {
    repaired = ReplaceInvalidUtf8(text);
    text = repaired;
  }
  WordCache* cache = &CacheForThisThread(serial_);
  // Added tokens that match the raw text (special tokens) split it first; the pieces between are
  // normalized and split again by the added tokens that match normalized text.
  size_t pos = 0, start, len;
  uint32_t id;
  while (!raw_added_.empty() && raw_added_.FindNext(text, pos, &start, &len, &id)) {
    EncodeNormalizable(text.substr(pos, start - pos), ids, cache);
    ids->push_back(id);
    pos = start + len;
  }
  EncodeNormalizable(text.substr(pos), ids, cache);
}

void Tokenizer::Impl::EncodeNormalizable(std::string_view piece, std::vector<uint32_t>* ids,
                                         WordCache* cache) const {
  if (piece.empty()) return;
  std::string normalized;
  if (nfc_ && !IsAscii(piece)) {
    normalized = HfNfc(piece);
    piece = normalized;
  }
  size_t pos = 0, start, len;
  uint32_t id;
  while (!normalized_added_.empty() && normalized_added_.FindNext(piece, pos, &start, &len, &id)) {
    EncodeOrdinary(piece.substr(pos, start - pos), ids, cache);
    ids->push_back(id);
    pos = start + len;
  }
  EncodeOrdinary(piece.substr(pos), ids, cache);
}

void Tokenizer::Impl::EncodeOrdinary(std::string_view piece, std::vector<uint32_t>* ids,
                                     WordCache* cache) const {
  size_t pos = 0;
  while (pos < piece.size()) {
    const size_t len = NextPretoken(piece, pos);
    EncodeWord(piece.substr(pos, len), ids, cache);
    pos += len;
  }
}

void Tokenizer::Impl::EncodeWord(std::string_view word, std::vector<uint32_t>* ids,
                                 WordCache* cache) const {
  if (word.size() == 1) {
    ids->push_back(byte_id_[static_cast<uint8_t>(word[0])]);
    return;
  }
  if (word.size() > kMaxCachedWordBytes) {
    Bpe(word, ids);
    return;
  }
  const uint64_t hash = WordCache::Hash(word);
  if (cache->Find(word, hash, ids)) return;
  const size_t before = ids->size();
  Bpe(word, ids);
  cache->Insert(word, hash, std::span<const uint32_t>(ids->data() + before, ids->size() - before));
}

// Hugging Face's merge order: repeatedly the adjacent pair of lowest rank, leftmost on ties.
void Tokenizer::Impl::Bpe(std::string_view word, std::vector<uint32_t>* ids) const {
  constexpr size_t kShort = 128;
  if (word.size() > kShort) {
    BpeLong(word, ids);
    return;
  }
  constexpr uint32_t kNone = ~0u;
  uint32_t sym[kShort];
  uint32_t rank[kShort];    // rank[i]: rank of the pair (sym[i], sym[i+1]), kNone if no merge
  uint32_t merged[kShort];  // merged[i]: the id that pair becomes
  size_t m = word.size();
  for (size_t i = 0; i < m; ++i) sym[i] = byte_id_[static_cast<uint8_t>(word[i])];
  auto set_pair = [&](size_t i) {
    const Merge* merge = FindMerge(sym[i], sym[i + 1]);
    rank[i] = merge ? merge->rank : kNone;
    merged[i] = merge ? merge->new_id : 0;
  };
  for (size_t i = 0; i + 1 < m; ++i) set_pair(i);
  while (m > 1) {
    size_t best = 0;
    for (size_t i = 1; i + 1 < m; ++i) {
      if (rank[i] < rank[best]) best = i;
    }
    if (rank[best] == kNone) break;
    sym[best] = merged[best];
    // Remove symbol best+1 and pair best+1.
    for (size_t i = best + 1; i + 1 < m; ++i) {
      sym[i] = sym[i + 1];
      rank[i] = rank[i + 1];
      merged[i] = merged[i + 1];
    }
    --m;
    if (best > 0) set_pair(best - 1);
    if (best + 1 < m) set_pair(best);
  }
  ids->insert(ids->end(), sym, sym + m);
}

void Tokenizer::Impl::BpeLong(std::string_view word, std::vector<uint32_t>* ids) const {
  struct Symbol {
    uint32_t id;
    int32_t prev, next;
    bool alive;
  };
  struct Candidate {
    uint32_t rank;
    uint32_t pos;
    uint32_t new_id;
    bool operator>(const Candidate& o) const {
      return rank != o.rank ? rank > o.rank : pos > o.pos;
    }
  };
  const int32_t m = static_cast<int32_t>(word.size());
  std::vector<Symbol> sym(m);
  for (int32_t i = 0; i < m; ++i) {
    sym[i] = {byte_id_[static_cast<uint8_t>(word[i])], i - 1, i + 1 < m ? i + 1 : -1, true};
  }
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> queue;
  auto push = [&](int32_t left) {
    const int32_t right = sym[left].next;
    if (right < 0) return;
    if (const Merge* merge = FindMerge(sym[left].id, sym[right].id)) {
      queue.push({merge->rank, static_cast<uint32_t>(left), merge->new_id});
    }
  };
  for (int32_t i = 0; i + 1 < m; ++i) push(i);
  while (!queue.empty()) {
    const Candidate top = queue.top();
    queue.pop();
    Symbol& left = sym[top.pos];
    if (!left.alive || left.next < 0) continue;
    Symbol& right = sym[left.next];
    const Merge* merge = FindMerge(left.id, right.id);
    if (merge == nullptr || merge->new_id != top.new_id) continue;  // a stale candidate
    left.id = top.new_id;
    right.alive = false;
    left.next = right.next;
    if (right.next >= 0) sym[right.next].prev = static_cast<int32_t>(top.pos);
    if (left.prev >= 0) push(left.prev);
    push(static_cast<int32_t>(top.pos));
  }
  for (int32_t i = 0; i >= 0; i = sym[i].next) ids->push_back(sym[i].id);
}

absl::StatusOr<std::string> Tokenizer::Impl::Decode(std::span<const uint32_t> ids) const {
  std::string out;
  for (size_t i = 0; i < ids.size(); ++i) {
    const uint32_t id = ids[i];
    if (id >= vocab_size_ || !id_valid_[id]) {
      return absl::InvalidArgumentError(absl::StrCat("token id ", id, " at position ", i,
                                                     " is not in the vocabulary (size ",
                                                     vocab_size_, ")"));
    }
    out += id_bytes_[id];
  }
  return out;
}

// ---- Public surface --------------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::Load(const std::string& path, Env* env) {
  if (!env->Exists(path)) return absl::NotFoundError(absl::StrCat(path, ": no such file or folder"));
  absl::StatusOr<std::vector<std::string>> entries = env->ListDir(path);
  absl::StatusOr<TokenizerSpec> spec =
      entries.ok() ? SpecFromVocabFolder(path, *entries, env) : SpecFromTokenizerJson(path, env);
  if (!spec.ok()) return spec.status();
  spec->name = FolderName(path, entries.ok());
  ASSIGN_OR_RETURN(std::unique_ptr<Impl> impl, Impl::Build(*std::move(spec)));
  return std::unique_ptr<Tokenizer>(new Tokenizer(std::move(impl)));
}

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::~Tokenizer() = default;

void Tokenizer::Encode(std::string_view text, std::vector<uint32_t>* ids) const {
  impl_->Encode(text, ids);
}

std::vector<uint32_t> Tokenizer::Encode(std::string_view text) const {
  std::vector<uint32_t> ids;
  ids.reserve(text.size() / 3 + 1);
  impl_->Encode(text, &ids);
  return ids;
}

absl::StatusOr<std::string> Tokenizer::Decode(std::span<const uint32_t> ids) const {
  return impl_->Decode(ids);
}

uint32_t Tokenizer::eos_id() const { return impl_->eos_id_; }
uint32_t Tokenizer::vocab_size() const { return impl_->vocab_size_; }
uint64_t Tokenizer::fingerprint() const { return impl_->fingerprint_; }
const std::string& Tokenizer::name() const { return impl_->name_; }

}  // namespace gyre
