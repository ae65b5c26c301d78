#include "eval/passkey.h"

#include <cctype>
#include <cmath>
#include <random>

#include "absl/strings/str_cat.h"
#include "eval/generate.h"

namespace gyre::eval {
namespace {

constexpr char kTask[] =
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will quiz you "
    "about the important information there.";
constexpr char kFiller[] = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.";
constexpr char kFinal[] = " What is the pass key? The pass key is";

void Append(const std::vector<uint32_t>& ids, size_t count, std::vector<int32_t>* out) {
  for (size_t i = 0; i < count; ++i) out->push_back(static_cast<int32_t>(ids[i % ids.size()]));
}

}  // namespace

absl::StatusOr<PasskeyPrompt> BuildPasskeyPrompt(const Tokenizer& tokenizer, int64_t length, double depth,
                                                 const std::string& passkey) {
  if (!(depth >= 0 && depth <= 1)) return absl::InvalidArgumentError(absl::StrCat("passkey depth ", depth, " is outside [0, 1]"));
  if (passkey.empty()) return absl::InvalidArgumentError("empty passkey");
  const std::vector<uint32_t> task = tokenizer.Encode(kTask), filler = tokenizer.Encode(kFiller),
                              final_ids = tokenizer.Encode(kFinal);
  const std::vector<uint32_t> info =
      tokenizer.Encode(absl::StrCat(" The pass key is ", passkey, ". Remember it. ", passkey, " is the pass key."));
  const int64_t fixed = static_cast<int64_t>(task.size() + info.size() + final_ids.size());
  if (length < fixed) {
    return absl::InvalidArgumentError(absl::StrCat("passkey length ", length, " is too short: the prompt needs ", fixed,
                                                   " tokens without filler"));
  }
  const int64_t fill = length - fixed, sentence = static_cast<int64_t>(filler.size());
  const int64_t before = std::min<int64_t>(fill, std::llround(depth * fill / sentence) * sentence);
  PasskeyPrompt out;
  out.passkey = passkey;
  Append(task, task.size(), &out.tokens);
  Append(filler, static_cast<size_t>(before), &out.tokens);
  out.info_offset = static_cast<int64_t>(out.tokens.size());
  Append(info, info.size(), &out.tokens);
  Append(filler, static_cast<size_t>(fill - before), &out.tokens);
  Append(final_ids, final_ids.size(), &out.tokens);
  out.depth = fill > 0 ? static_cast<double>(before) / fill : 0;
  return out;
}

bool PasskeyMatches(const std::string& generated, const std::string& passkey) {
  size_t i = 0;
  while (i < generated.size() && !std::isdigit(static_cast<unsigned char>(generated[i]))) ++i;
  size_t j = i;
  while (j < generated.size() && std::isdigit(static_cast<unsigned char>(generated[j]))) ++j;
  return j > i && generated.compare(i, j - i, passkey) == 0 && j - i == passkey.size();
}

absl::StatusOr<PasskeyReport> RunPasskey(ops::LanguageModel* model, const Tokenizer& tokenizer,
                                         const PasskeyOptions& options) {
  if (options.digits < 1 || options.digits > 18) return absl::InvalidArgumentError("passkey digits must be in [1, 18]");
  if (options.trials < 1) return absl::InvalidArgumentError("passkey trials must be >= 1");
  if (tokenizer.vocab_size() > model->spec().vocab_size) {
    return absl::InvalidArgumentError(absl::StrCat("tokenizer ", tokenizer.name(), " has ", tokenizer.vocab_size(),
                                                   " ids, the model's vocabulary only ", model->spec().vocab_size));
  }
  std::mt19937_64 rng(options.seed);
  PasskeyReport report;
  for (int64_t length : options.lengths) {
    for (double depth : options.depths) {
      PasskeyCell cell;
      cell.length = length;
      cell.depth = depth;
      for (int64_t t = 0; t < options.trials; ++t) {
        std::string key;
        key.push_back(static_cast<char>('1' + rng() % 9));  // no leading zero
        while (static_cast<int64_t>(key.size()) < options.digits) key.push_back(static_cast<char>('0' + rng() % 10));
        absl::StatusOr<PasskeyPrompt> prompt = BuildPasskeyPrompt(tokenizer, length, depth, key);
        if (!prompt.ok()) return prompt.status();
        GenerateOptions gen;
        gen.max_new_tokens = static_cast<int64_t>(tokenizer.Encode(" " + key).size()) + 2;
        absl::StatusOr<GenerateResult> out = Generate(model, prompt->tokens, gen);
        if (!out.ok()) return out.status();
        std::vector<uint32_t> ids;
        for (int32_t id : out->tokens) {
          if (id >= 0 && static_cast<uint32_t>(id) < tokenizer.vocab_size()) ids.push_back(static_cast<uint32_t>(id));
        }
        absl::StatusOr<std::string> text = tokenizer.Decode(ids);
        if (!text.ok()) return text.status();
        cell.answers.push_back(*text);
        ++cell.trials;
        cell.correct += PasskeyMatches(*text, key);
      }
      report.trials += cell.trials;
      report.correct += cell.correct;
      report.cells.push_back(std::move(cell));
    }
  }
  return report;
}

}  // namespace gyre::eval
