// `gyre eval <mode> --run_dir runs/<name> [--step N] [--config PATH] [--json]`: evaluates the
// newest valid checkpoint of a run (or step N) with the run's resolved config (eval/*.h):
//   perplexity  loss and perplexity per held-out source of the index, and overall
//   passkey     passkey retrieval accuracy per prompt length and depth (--self_extend G,W)
//   generate    prompt -> text: greedy / sampled, or MTP self-speculative (--speculative)
//   spectrum    LM-head singular values, effective / stable rank, W-error(r), anisotropy
// and `gyre export` (checkpoint -> transformers safetensors + config.json; Llama, Mamba-2,
// xLSTM Large).
// Everything runs on the CPU (fp32). Errors name the file, flag or config field at fault.
#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "base/env.h"
#include "cli/commands.h"
#include "dataloader/sampler.h"
#include "dataloader/token_index.h"
#include "dataloader/tokenizer/tokenizer.h"
#include "eval/checkpoint_model.h"
#include "worker/checkpoint.h"
#include "eval/export.h"
#include "eval/generate.h"
#include "eval/passkey.h"
#include "eval/perplexity.h"
#include "eval/spectrum.h"
#include "nlohmann/json.hpp"

namespace gyre::cli {
namespace {

// `what`: "eval <mode>" or "export".
int Fail(const std::string& what, const absl::Status& status) {
  std::fprintf(stderr, "gyre %s: %s\n", what.c_str(), std::string(status.message()).c_str());
  return 1;
}

absl::StatusOr<std::vector<int64_t>> ParseInts(const std::string& flag, const std::string& text) {
  std::vector<int64_t> out;
  for (absl::string_view part : absl::StrSplit(text, ',', absl::SkipEmpty())) {
    int64_t v;
    if (!absl::SimpleAtoi(part, &v)) return absl::InvalidArgumentError(absl::StrCat(flag, ": \"", std::string(part), "\" is not an integer"));
    out.push_back(v);
  }
  return out;
}

absl::StatusOr<std::vector<double>> ParseDoubles(const std::string& flag, const std::string& text) {
  std::vector<double> out;
  for (absl::string_view part : absl::StrSplit(text, ',', absl::SkipEmpty())) {
    double v;
    if (!absl::SimpleAtod(part, &v)) return absl::InvalidArgumentError(absl::StrCat(flag, ": \"", std::string(part), "\" is not a number"));
    out.push_back(v);
  }
  return out;
}

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadTokenizer(const std::string& flag_value, const eval::LoadedModel& run) {
  const std::string path = !flag_value.empty() ? flag_value : run.config.data().tokenizer();
  if (path.empty()) return absl::InvalidArgumentError("no tokenizer: give --tokenizer or set data.tokenizer in the run config");
  return Tokenizer::Load(path);
}

absl::StatusOr<std::unique_ptr<data::TokenIndex>> OpenIndex(const std::string& flag_value, const eval::LoadedModel& run) {
  const std::string dir = !flag_value.empty() ? flag_value : run.config.data().index_dir();
  if (dir.empty()) return absl::InvalidArgumentError("no index: give --index or set data.index_dir in the run config");
  return data::TokenIndex::Open(dir, data::TokenIndex::Mode::kReadOnly);
}

nlohmann::json RunInfo(const eval::LoadedModel& run) {
  return {{"checkpoint", run.checkpoint_dir}, {"step", run.step}, {"model", ops::DescribeSpec(run.spec)},
          {"skipped_checkpoints", run.skipped}};
}

void Print(bool json, const nlohmann::json& out, const std::string& text) {
  if (json) {
    // Decoded text can end inside a multi-byte character (byte-level BPE tokens split them); the
    // token ids beside it are exact, so invalid bytes become U+FFFD instead of an exception.
    std::printf("%s\n", out.dump(2, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
  } else {
    std::printf("%s", text.c_str());
  }
}

// The first `count` held-out windows of L + 1 tokens, over the sources in order (anisotropy batch).
absl::StatusOr<std::vector<int32_t>> HeldOutBatch(const data::TokenIndex& index, const std::vector<std::string>& names,
                                                  int64_t count, int64_t seq_len, uint64_t seed, int64_t vocab) {
  auto sources = index.ListSources();
  if (!sources.ok()) return sources.status();
  std::vector<int32_t> out;
  int64_t taken = 0;
  for (const auto& s : *sources) {
    if (taken == count) break;
    if (names.empty() ? !s.validation() : std::find(names.begin(), names.end(), s.name()) == names.end()) continue;
    auto tokens = data::OpenSourceTokens(Env::Default(), index, s.name(), true);
    if (!tokens.ok()) return tokens.status();
    const uint64_t available = (*tokens)->tokens() > 0 ? ((*tokens)->tokens() - 1) / seq_len : 0;
    std::vector<uint32_t> window(seq_len);
    for (uint64_t j : eval::HeldOutWindows(s.name(), available, count - taken, seed)) {
      if (absl::Status st = (*tokens)->Read(j * seq_len, std::span<uint32_t>(window)); !st.ok()) return st;
      for (uint32_t id : window) {
        if (static_cast<int64_t>(id) >= vocab) return absl::FailedPreconditionError(absl::StrCat("source ", s.name(), " holds id ", id, " >= the model's vocabulary ", vocab));
        out.push_back(static_cast<int32_t>(id));
      }
      ++taken;
    }
  }
  if (taken == 0) return absl::FailedPreconditionError(absl::StrCat("no held-out window of ", seq_len, " tokens in index ", index.dir()));
  return out;
}

}  // namespace

int RunEval(int argc, char** argv) {
  CLI::App app("evaluate a checkpoint of a run: perplexity, passkey, generate, spectrum", argv[0]);
  app.require_subcommand(1);
  app.fallthrough();  // --run_dir, --json, ... may also follow the mode
  std::string run_dir, config_path;
  int64_t step = -1;
  bool json = false;
  app.add_option("--run_dir", run_dir, "run directory runs/<name> (config.json + checkpoints/)")->required();
  app.add_option("--step", step, "checkpoint step (default: the newest valid one)");
  app.add_option("--config", config_path, "resolved run config (default: <run_dir>/config.json)");
  app.add_flag("--json", json, "print JSON");

  std::string index_dir, tokenizer_path, sources_flag;
  int64_t seq_len = 0, samples = 16, batch = 4;
  uint64_t seed = 0;
  CLI::App* ppl = app.add_subcommand("perplexity", "loss and perplexity per held-out source of the index");
  ppl->add_option("--index", index_dir, "token index (default: data.index_dir)");
  ppl->add_option("--seq_len", seq_len, "window length L (default: data.seq_len)");
  ppl->add_option("--samples", samples, "windows per source");
  ppl->add_option("--batch", batch, "windows per forward");
  ppl->add_option("--seed", seed, "picks the windows");
  ppl->add_option("--sources", sources_flag, "comma-separated source names (default: all validation/test sources)");

  std::string lengths_flag = "256", depths_flag = "0,0.25,0.5,0.75,1", self_extend_flag;
  int64_t trials = 2, digits = 5;
  CLI::App* passkey = app.add_subcommand("passkey", "passkey retrieval accuracy per prompt length and depth");
  passkey->add_option("--tokenizer", tokenizer_path, "tokenizer.json or vocab folder (default: data.tokenizer)");
  passkey->add_option("--lengths", lengths_flag, "prompt lengths in tokens, comma-separated");
  passkey->add_option("--depths", depths_flag, "passkey depths in [0, 1], comma-separated");
  passkey->add_option("--trials", trials, "passkeys per length and depth");
  passkey->add_option("--digits", digits, "passkey digits");
  passkey->add_option("--seed", seed, "draws the passkeys");
  passkey->add_option("--self_extend", self_extend_flag, "G,W: SelfExtend group size and neighbour window");

  std::string prompt_text, prompt_ids_flag;
  eval::GenerateOptions gen;
  bool speculative = false, compare_greedy = false;
  int64_t max_context = -1;
  CLI::App* generate = app.add_subcommand("generate", "prompt -> text (greedy, sampled, or MTP self-speculative)");
  generate->add_option("--tokenizer", tokenizer_path, "tokenizer (default: data.tokenizer)");
  generate->add_option("--prompt", prompt_text, "prompt text");
  generate->add_option("--prompt_ids", prompt_ids_flag, "prompt as comma-separated token ids (no tokenizer needed)");
  generate->add_option("--max_new_tokens", gen.max_new_tokens, "tokens to generate");
  generate->add_option("--temperature", gen.sampling.temperature, "0 = greedy");
  generate->add_option("--top_k", gen.sampling.top_k, "0 = off");
  generate->add_option("--top_p", gen.sampling.top_p, "nucleus mass (1 = off)");
  generate->add_option("--seed", gen.sampling.seed, "sampling seed");
  generate->add_option("--max_context", max_context, "prompt + new tokens limit (default: data.seq_len; 0 = none)");
  generate->add_option("--self_extend", self_extend_flag, "G,W: SelfExtend group size and neighbour window");
  generate->add_flag("--speculative", speculative, "MTP self-speculative greedy decoding (needs mtp_heads >= 2)");
  // Auto by default: session 18 measured the best fixed k at 2 for the 125M xLSTM / Mamba-2 and 4
  // for Llama (k = 4 loses 22-30% on the recurrent models, k = 2 14% on Llama); auto ran at
  // 0.976-0.984 of the best fixed k on all three (helper autok18, bench/RESULTS.md).
  gen.draft_heads = eval::kAutoDraftHeads;
  generate->add_option("--draft_heads", gen.draft_heads,
                       "with --speculative: draft heads k (2..mtp_heads; 0: all; -1, the default: picked from the "
                       "first rounds' acceptance, ops/DECODE_GRAPHS.md)");
  generate->add_flag("--compare_greedy", compare_greedy, "with --speculative: also decode greedily and check equality");

  std::string ranks_flag = "1,8,32,128";
  int64_t aniso_batch = 4, aniso_seq = 128;
  CLI::App* spectrum = app.add_subcommand("spectrum", "LM-head spectrum, ranks, W-error, anisotropy");
  spectrum->add_option("--ranks", ranks_flag, "r values of W-error(r), comma-separated (clipped to d)");
  spectrum->add_option("--index", index_dir, "token index for the anisotropy batch (default: data.index_dir; none: skipped)");
  spectrum->add_option("--anisotropy_batch", aniso_batch, "held-out windows in the anisotropy batch (0 = skip)");
  spectrum->add_option("--anisotropy_seq", aniso_seq, "tokens per window");
  spectrum->add_option("--sources", sources_flag, "sources for the anisotropy batch (default: validation/test)");
  spectrum->add_option("--seed", seed, "picks the windows");
  bool all_checkpoints = false;
  spectrum->add_flag("--all_checkpoints", all_checkpoints, "every checkpoint of the run in step order (spectrum over training)");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  const std::string mode = "eval " + app.get_subcommands().front()->get_name();
  absl::StatusOr<eval::LoadedModel> run =
      eval::LoadModelFromRun(Env::Default(), {.run_dir = run_dir, .step = step, .config_path = config_path});
  if (!run.ok()) return Fail(mode, run.status());
  for (const std::string& s : run->skipped) std::fprintf(stderr, "gyre eval: skipped corrupt checkpoint %s\n", s.c_str());
  ops::LanguageModel* model = run->model.get();
  std::vector<std::string> source_names;
  for (absl::string_view s : absl::StrSplit(sources_flag, ',', absl::SkipEmpty())) source_names.emplace_back(s);
  if (!self_extend_flag.empty()) {
    auto gw = ParseInts("--self_extend", self_extend_flag);
    if (!gw.ok()) return Fail(mode, gw.status());
    if (gw->size() != 2 || (*gw)[0] < 1 || (*gw)[1] < 1) return Fail(mode, absl::InvalidArgumentError("--self_extend wants G,W with G >= 1 and W >= 1"));
    bool has_attention = false;
    for (ops::BlockType b : run->spec.blocks) has_attention |= b == ops::BlockType::kAttention;
    if (!has_attention) return Fail(mode, absl::InvalidArgumentError("--self_extend: this model has no attention (RoPE) layer"));
    model->SetSelfExtend((*gw)[0], (*gw)[1]);
  }
  nlohmann::json out = RunInfo(*run);

  if (mode == "eval perplexity") {
    auto index = OpenIndex(index_dir, *run);
    if (!index.ok()) return Fail(mode, index.status());
    eval::PerplexityOptions options{.seq_len = seq_len > 0 ? seq_len : run->config.data().seq_len(),
                                    .samples_per_source = samples, .batch = batch, .seed = seed, .sources = source_names};
    if (options.seq_len == 0) options.seq_len = 2048;
    auto report = eval::EvaluatePerplexity(Env::Default(), **index, model, options);
    if (!report.ok()) return Fail(mode, report.status());
    std::string text = absl::StrCat("step ", run->step, " (", run->checkpoint_dir, "), L = ", report->seq_len, ", seed ", seed, "\n");
    nlohmann::json rows = nlohmann::json::array();
    for (const auto& s : report->sources) {
      rows.push_back({{"source", s.name}, {"split", s.split}, {"windows", s.windows.size()}, {"window_ids", s.windows},
                      {"windows_available", s.windows_available}, {"tokens", s.tokens}, {"loss", s.loss},
                      {"perplexity", s.perplexity}});
      absl::StrAppend(&text, absl::StrFormat("%-32s %-10s windows %4zu/%-8lu loss %.4f  ppl %.3f\n", s.name, s.split,
                                             s.windows.size(), static_cast<unsigned long>(s.windows_available), s.loss, s.perplexity));
    }
    absl::StrAppend(&text, absl::StrFormat("%-32s %-10s tokens %-14ld loss %.4f  ppl %.3f\n", "overall", "",
                                           static_cast<long>(report->tokens), report->loss, report->perplexity));
    out["seq_len"] = report->seq_len;
    out["seed"] = seed;
    out["sources"] = rows;
    out["overall"] = {{"tokens", report->tokens}, {"loss", report->loss}, {"perplexity", report->perplexity}};
    Print(json, out, text);
    return 0;
  }

  if (mode == "eval passkey") {
    auto tokenizer = LoadTokenizer(tokenizer_path, *run);
    if (!tokenizer.ok()) return Fail(mode, tokenizer.status());
    eval::PasskeyOptions options;
    auto lengths = ParseInts("--lengths", lengths_flag);
    auto depths = ParseDoubles("--depths", depths_flag);
    if (!lengths.ok()) return Fail(mode, lengths.status());
    if (!depths.ok()) return Fail(mode, depths.status());
    options.lengths = *lengths;
    options.depths = *depths;
    options.trials = trials;
    options.digits = digits;
    options.seed = seed;
    auto report = eval::RunPasskey(model, **tokenizer, options);
    if (!report.ok()) return Fail(mode, report.status());
    std::string text = absl::StrCat("step ", run->step, ", self_extend ", self_extend_flag.empty() ? "off" : self_extend_flag, "\n");
    nlohmann::json cells = nlohmann::json::array();
    for (const auto& c : report->cells) {
      cells.push_back({{"length", c.length}, {"depth", c.depth}, {"trials", c.trials}, {"correct", c.correct},
                       {"accuracy", c.accuracy()}, {"answers", c.answers}});
      absl::StrAppend(&text, absl::StrFormat("length %6ld depth %.2f  %ld/%ld\n", static_cast<long>(c.length), c.depth,
                                             static_cast<long>(c.correct), static_cast<long>(c.trials)));
    }
    absl::StrAppend(&text, absl::StrFormat("accuracy %ld/%ld\n", static_cast<long>(report->correct), static_cast<long>(report->trials)));
    // The longest prompt the model should handle: the training length L, or with SelfExtend
    // (G, W) the paper's (L - W) * G + W (MODELS.md §6, eq. 4).
    const int64_t trained = run->config.data().seq_len() > 0 ? run->config.data().seq_len() : 2048;
    int64_t supported = trained;
    if (!self_extend_flag.empty()) {
      const std::vector<int64_t> gw = *ParseInts("--self_extend", self_extend_flag);
      supported = gw[1] < trained ? (trained - gw[1]) * gw[0] + gw[1] : trained;
    }
    for (int64_t length : options.lengths) {
      if (length > supported) {
        std::fprintf(stderr, "gyre %s: note: length %ld exceeds the supported %ld (trained on %ld tokens%s)\n", mode.c_str(),
                     static_cast<long>(length), static_cast<long>(supported), static_cast<long>(trained),
                     self_extend_flag.empty() ? "; try --self_extend G,W" : "");
      }
    }
    out["trained_length"] = trained;
    out["supported_length"] = supported;
    out["self_extend"] = self_extend_flag;
    out["cells"] = cells;
    out["accuracy"] = report->trials > 0 ? double(report->correct) / report->trials : 0.0;
    Print(json, out, text);
    return 0;
  }

  if (mode == "eval generate") {
    std::vector<int32_t> prompt;
    std::unique_ptr<Tokenizer> tokenizer;
    if (!prompt_ids_flag.empty()) {
      auto ids = ParseInts("--prompt_ids", prompt_ids_flag);
      if (!ids.ok()) return Fail(mode, ids.status());
      for (int64_t id : *ids) prompt.push_back(static_cast<int32_t>(id));
    }
    if (!prompt_text.empty() || prompt_ids_flag.empty() || !tokenizer_path.empty()) {
      auto t = LoadTokenizer(tokenizer_path, *run);
      if (!t.ok()) return Fail(mode, t.status());
      tokenizer = std::move(*t);
      if (prompt_ids_flag.empty()) {
        for (uint32_t id : tokenizer->Encode(prompt_text)) prompt.push_back(static_cast<int32_t>(id));
      }
    }
    gen.max_context = max_context >= 0 ? max_context : run->config.data().seq_len();
    auto result = speculative ? eval::GenerateSpeculative(model, prompt, gen) : eval::Generate(model, prompt, gen);
    if (!result.ok()) return Fail(mode, result.status());
    std::string decoded;
    if (tokenizer != nullptr) {
      std::vector<uint32_t> ids;
      for (int32_t id : result->tokens)
        if (static_cast<uint32_t>(id) < tokenizer->vocab_size()) ids.push_back(static_cast<uint32_t>(id));
      auto d = tokenizer->Decode(ids);
      if (d.ok()) decoded = *d;
    }
    out["prompt_tokens"] = prompt.size();
    out["tokens"] = result->tokens;
    out["text"] = decoded;
    out["speculative"] = speculative;
    out["forwards"] = result->forwards;
    out["decode_steps"] = result->decode_steps;
    out["tokens_per_forward"] = result->tokens_per_forward();
    out["tokens_per_second"] = result->tokens_per_second();
    out["prefill_seconds"] = result->prefill_seconds;
    if (speculative) {
      out["acceptance"] = result->acceptance();  // accepted / checked (a round stops at its first rejection)
      out["drafts_proposed"] = result->proposed;
      out["acceptance_of_proposed"] = result->acceptance_of_proposed();
    }
    std::string text = absl::StrCat(decoded.empty() ? "" : decoded + "\n", "tokens ", result->tokens.size(),
                                    absl::StrFormat(", %.2f tokens/forward, %.1f tokens/s", result->tokens_per_forward(),
                                                    result->tokens_per_second()));
    if (speculative) absl::StrAppend(&text, absl::StrFormat(", acceptance %.2f", result->acceptance()));
    absl::StrAppend(&text, "\n");
    if (speculative && compare_greedy) {
      eval::GenerateOptions greedy_options = gen;
      auto greedy = eval::Generate(model, prompt, greedy_options);
      if (!greedy.ok()) return Fail(mode, greedy.status());
      const bool same = greedy->tokens == result->tokens;
      out["equals_greedy"] = same;
      out["greedy_tokens_per_second"] = greedy->tokens_per_second();
      if (result->seconds > 0 && greedy->seconds > 0)
        out["speedup"] = greedy->seconds / result->seconds * result->tokens.size() / std::max<size_t>(1, greedy->tokens.size());
      absl::StrAppend(&text, "speculative == greedy: ", same ? "yes" : "NO", absl::StrFormat(" (greedy %.1f tokens/s)\n", greedy->tokens_per_second()));
      if (!same) {
        Print(json, out, text);
        return 2;
      }
    }
    Print(json, out, text);
    return 0;
  }

  // spectrum
  auto ranks = ParseInts("--ranks", ranks_flag);
  if (!ranks.ok()) return Fail(mode, ranks.status());
  for (int64_t& r : *ranks) r = std::min(r, run->spec.d_model);
  const ops::Parameter* head = &model->HeadParameter();  // the embedding when tied
  // The anisotropy batch: fixed held-out windows, the same for every checkpoint.
  std::vector<int32_t> aniso_tokens;
  const std::string index_path = !index_dir.empty() ? index_dir : run->config.data().index_dir();
  if (aniso_batch > 0 && !index_path.empty()) {
    auto index = data::TokenIndex::Open(index_path, data::TokenIndex::Mode::kReadOnly);
    if (!index.ok()) return Fail(mode, index.status());
    auto tokens = HeldOutBatch(**index, source_names, aniso_batch, aniso_seq, seed, run->spec.vocab_size);
    if (!tokens.ok()) return Fail(mode, tokens.status());
    aniso_tokens = std::move(*tokens);
  }
  // One checkpoint's numbers (the parameters currently in `model`).
  auto measure = [&](nlohmann::json* row, std::string* text) -> absl::Status {
    auto spec = eval::ComputeHeadSpectrum(head->value, *ranks);
    if (!spec.ok()) return spec.status();
    const auto& s = spec->singular_values;
    nlohmann::json ratio = nlohmann::json::array();
    for (double x : s) ratio.push_back(s[0] > 0 ? x / s[0] : 0.0);
    (*row)["head"] = head->name;
    (*row)["vocab"] = spec->vocab;
    (*row)["d_model"] = spec->dim;
    (*row)["singular_values"] = s;
    (*row)["sigma_ratio"] = ratio;
    (*row)["effective_rank"] = spec->effective_rank;
    (*row)["stable_rank"] = spec->stable_rank;
    nlohmann::json werr = nlohmann::json::object();
    for (const auto& [r, e] : spec->w_error) werr[std::to_string(r)] = e;
    (*row)["w_error"] = werr;
    absl::StrAppend(text, absl::StrFormat("%s %ldx%ld: sigma_1 %.4g, sigma_d/sigma_1 %.4g, effective rank %.2f, stable rank %.3f",
                                          head->name, static_cast<long>(spec->vocab), static_cast<long>(spec->dim), s.front(),
                                          s.front() > 0 ? s.back() / s.front() : 0.0, spec->effective_rank, spec->stable_rank));
    for (const auto& [r, e] : spec->w_error) absl::StrAppend(text, absl::StrFormat(", W-error(%ld) %.4f", static_cast<long>(r), e));
    if (!aniso_tokens.empty()) {
      const int64_t rows = static_cast<int64_t>(aniso_tokens.size()) / aniso_seq;
      ops::Tensor logits = model->Logits(aniso_tokens, rows, aniso_seq);
      auto hidden = eval::RecoverHiddenStates(logits, head->value);
      if (!hidden.ok()) return hidden.status();
      auto aniso = eval::Anisotropy(*hidden, rows, aniso_seq, run->spec.d_model);
      if (!aniso.ok()) return aniso.status();
      (*row)["anisotropy"] = {{"value", *aniso}, {"of", "head input (after the final norm)"}, {"windows", rows}, {"seq", aniso_seq}};
      absl::StrAppend(text, absl::StrFormat(", anisotropy %.4f (head input; %ld held-out windows of %ld tokens)", *aniso,
                                            static_cast<long>(rows), static_cast<long>(aniso_seq)));
      // With a final RMSNorm (Llama, Mamba-2) the last block's residual stream is recoverable up to
      // a per-token factor; the xLSTM LayerNorm removes each token's mean, so it is not.
      const ops::Parameter* norm = model->params().Find("final_norm.weight");
      if (run->spec.family != ops::Family::kXlstm && norm != nullptr && model->params().Find("final_norm.bias") == nullptr) {
        auto residual = eval::UndoRmsNormScale(*hidden, norm->value);
        if (residual.ok()) {
          auto r = eval::Anisotropy(*residual, rows, aniso_seq, run->spec.d_model);
          if (!r.ok()) return r.status();
          (*row)["anisotropy_residual"] = *r;
          absl::StrAppend(text, absl::StrFormat(", residual stream %.4f", *r));
        }
      }
    } else {
      absl::StrAppend(text, ", anisotropy skipped (no index)");
    }
    absl::StrAppend(text, "\n");
    return absl::OkStatus();
  };
  std::string text;
  if (!all_checkpoints) {
    if (absl::Status st = measure(&out, &text); !st.ok()) return Fail(mode, st);
    Print(json, out, text);
    return 0;
  }
  // --all_checkpoints: every checkpoint of the run in step order (the spectrum over training).
  auto steps = eval::ListCheckpointSteps(Env::Default(), run_dir);
  if (!steps.ok()) return Fail(mode, steps.status());
  nlohmann::json rows = nlohmann::json::array();
  // Each checkpoint's parameters stream into the model (eval::LoadParameters). One whose manifest
  // cannot be read, or whose parameters do not verify (DataLoss: a torn file, or a parameter
  // missing or reshaped), is skipped and named; after a failure part-way the next checkpoint
  // overwrites every parameter before it is measured. The reader settings are the ones
  // LoadModelFromRun validated.
  for (uint64_t t : *steps) {
    const std::string dir = run_dir + "/checkpoints/" + CheckpointDirName(t);
    absl::StatusOr<gyre::v1::CheckpointManifest> manifest = ReadCheckpointManifest(Env::Default(), dir);
    absl::Status loaded = manifest.status();
    if (manifest.ok()) loaded = eval::LoadParameters(Env::Default(), dir, *manifest, model, run->stream_options).status();
    if (!manifest.ok() || absl::IsDataLoss(loaded)) {
      std::fprintf(stderr, "gyre %s: skipped %s: %s\n", mode.c_str(), dir.c_str(), std::string(loaded.message()).c_str());
      continue;
    }
    if (!loaded.ok()) return Fail(mode, loaded);
    nlohmann::json row = {{"step", t}, {"checkpoint", dir}};
    absl::StrAppend(&text, "step ", t, ": ");
    if (absl::Status st = measure(&row, &text); !st.ok()) return Fail(mode, st);
    rows.push_back(std::move(row));
  }
  out.erase("checkpoint");
  out.erase("step");
  out["checkpoints"] = rows;
  Print(json, out, text);
  return 0;
}

}  // namespace gyre::cli

namespace gyre::cli {

// `gyre export --run_dir runs/<name> [--step N] [--config PATH] [--dtype f32|bf16|f16] --out DIR`:
// the checkpoint as DIR/model.safetensors + DIR/config.json for transformers' LlamaForCausalLM,
// Mamba2ForCausalLM or xLSTMForCausalLM (eval/export.h; the NeurIPS xLSTM, hybrids and Mamba-2
// with n_groups > 1 are refused with the reason). --dtype: the tensors' element type (default f32;
// bf16 / f16 round the fp32 masters to nearest even, as published checkpoints are stored).
int RunExport(int argc, char** argv) {
  CLI::App app("export a run's checkpoint as safetensors + config.json for transformers: LlamaForCausalLM "
               "(Llama), Mamba2ForCausalLM (Mamba-2, n_groups 1) or xLSTMForCausalLM (xLSTM Large: xlstm-7b, "
               "xlstm-large-*); the NeurIPS xLSTM and hybrids are refused",
               argv[0]);
  std::string run_dir, config_path, out_dir, dtype_name = "f32";
  int64_t step = -1;
  app.add_option("--run_dir", run_dir, "run directory runs/<name>")->required();
  app.add_option("--step", step, "checkpoint step (default: the newest valid one)");
  app.add_option("--config", config_path, "resolved run config (default: <run_dir>/config.json)");
  app.add_option("--out", out_dir, "output directory")->required();
  app.add_option("--dtype", dtype_name,
                 "element type of model.safetensors: f32, bf16 or f16 (round to nearest even from the fp32 masters)")
      ->capture_default_str();
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  // Checked before the checkpoint is read: a typo costs no load.
  const absl::StatusOr<eval::ExportDType> dtype = eval::ParseExportDType("--dtype", dtype_name);
  if (!dtype.ok()) return Fail("export", dtype.status());
  absl::StatusOr<eval::LoadedModel> run =
      eval::LoadModelFromRun(Env::Default(), {.run_dir = run_dir, .step = step, .config_path = config_path});
  if (!run.ok()) return Fail("export", run.status());
  const int64_t positions = run->config.data().seq_len() > 0 ? run->config.data().seq_len() : 2048;
  auto result = eval::ExportHf(Env::Default(), run->model.get(), positions, out_dir, {.dtype = *dtype});
  if (!result.ok()) return Fail("export", result.status());
  std::printf("exported step %lu (%s): %ld %s tensors -> %s, %s\n", static_cast<unsigned long>(run->step),
              run->checkpoint_dir.c_str(), static_cast<long>(result->tensors), eval::SafetensorsDType(*dtype),
              result->safetensors_path.c_str(), result->config_path.c_str());
  if (!result->dropped.empty()) {
    std::printf("left out %zu parameters of MTP heads 2..%ld (no place in the transformers class)\n", result->dropped.size(),
                static_cast<long>(run->spec.mtp_heads));
  }
  return 0;
}

}  // namespace gyre::cli
