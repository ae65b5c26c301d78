// libFuzzer target for the tokenizer (built by tools/fuzz/run_tokenizer_fuzz.sh with clang's
// -fsanitize=fuzzer,address,undefined). For any bytes:
//   - Encode never crashes and yields ids < vocab_size, for GPT-2 and GPT-NeoX-20B;
//   - for valid UTF-8, GPT-2 decodes back to the exact text (no normalizer), and NeoX decodes
//     to the text normalized the way Hugging Face does it (HfNfc between special tokens);
//   - HfNfc equals plain utf8proc NFC when no code point assigned after Unicode 9.0 occurs (the
//     ASCII-island shortcut and the cut points change nothing else).
// Tokenizer paths come from GYRE_GPT2_DIR and GYRE_NEOX_TOKENIZER.
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "dataloader/tokenizer/hf_nfc.h"
#include "dataloader/tokenizer/tokenizer.h"
#include "dataloader/tokenizer/utf8.h"

namespace {

const gyre::Tokenizer* LoadFromEnv(const char* var) {
  const char* path = std::getenv(var);
  if (path == nullptr) {
    std::fprintf(stderr, "set %s\n", var);
    std::abort();
  }
  auto tok = gyre::Tokenizer::Load(path);
  if (!tok.ok()) {
    std::fprintf(stderr, "%s\n", tok.status().ToString().c_str());
    std::abort();
  }
  return tok->release();
}

// NeoX's expected decode: special tokens (matched on the raw text) split it; each piece between
// them is normalized on its own.
std::string NeoxExpected(std::string_view text) {
  std::string out;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t best = std::string_view::npos, len = 0;
    for (std::string_view special : {"<|endoftext|>", "<|padding|>"}) {
      const size_t at = text.find(special, pos);
      if (at < best) best = at, len = special.size();
    }
    if (best == std::string_view::npos) break;
    out += gyre::tokenizer_internal::HfNfc(text.substr(pos, best - pos));
    out += text.substr(best, len);
    pos = best + len;
  }
  out += gyre::tokenizer_internal::HfNfc(text.substr(pos));
  return out;
}

bool HasCodePointAfterUnicode9(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    char32_t cp;
    i += gyre::tokenizer_internal::DecodeUtf8(s, i, &cp);
    if (gyre::tokenizer_internal::AssignedAfterUnicode9(cp)) return true;
  }
  return false;
}

}  // namespace

const gyre::Tokenizer* gpt2 = nullptr;
const gyre::Tokenizer* neox = nullptr;

// Loading (seconds under ASan) happens before the per-input timeout starts.
extern "C" int LLVMFuzzerInitialize(int*, char***) {
  gpt2 = LoadFromEnv("GYRE_GPT2_DIR");
  neox = LoadFromEnv("GYRE_NEOX_TOKENIZER");
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  const bool valid = gyre::tokenizer_internal::FindInvalidUtf8(text) == text.size();
  for (const gyre::Tokenizer* tok : {gpt2, neox}) {
    std::vector<uint32_t> ids;
    tok->Encode(text, &ids);
    for (uint32_t id : ids) {
      if (id >= tok->vocab_size()) std::abort();
    }
    auto decoded = tok->Decode(ids);
    if (!decoded.ok()) std::abort();
    if (!valid) continue;
    const std::string expected = tok == gpt2 ? std::string(text) : NeoxExpected(text);
    if (*decoded != expected) {
      std::fprintf(stderr, "round trip differs for %s\n", tok->name().c_str());
      std::abort();
    }
  }
  if (valid && !HasCodePointAfterUnicode9(text) &&
      gyre::tokenizer_internal::HfNfc(text) != gyre::tokenizer_internal::Nfc(text)) {
    std::fprintf(stderr, "HfNfc differs from NFC without post-9.0 code points\n");
    std::abort();
  }
  return 0;
}
