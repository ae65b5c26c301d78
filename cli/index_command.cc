// `gyre index stats --index DIR [--json]`: what a token index holds, per source: documents,
// tokens (EOS included), shards, bytes on disk; and the tokenizer it was written with.
#include <cstdio>
#include <string>

#include "CLI/CLI.hpp"
#include "absl/strings/str_format.h"
#include "base/env.h"
#include "cli/commands.h"
#include "dataloader/token_index.h"
#include "nlohmann/json.hpp"

namespace gyre::cli {

int RunIndex(int argc, char** argv) {
  CLI::App app("inspect a token index", argv[0]);
  app.require_subcommand(1);
  CLI::App* stats = app.add_subcommand("stats", "per-source documents, tokens, shards, bytes");
  std::string index_dir;
  bool json = false;
  stats->add_option("--index", index_dir, "token index directory")->required();
  stats->add_flag("--json", json, "print JSON instead of a table");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  auto fail = [](const absl::Status& st) {
    std::fprintf(stderr, "gyre index stats: %s\n", st.ToString().c_str());
    return 1;
  };
  auto index = data::TokenIndex::Open(index_dir, data::TokenIndex::Mode::kReadOnly);
  if (!index.ok()) return fail(index.status());
  auto meta = (*index)->ReadMeta();
  if (!meta.ok()) return fail(meta.status());
  auto sources = (*index)->ListSources();
  if (!sources.ok()) return fail(sources.status());
  auto inputs = (*index)->ListInputs();
  if (!inputs.ok()) return fail(inputs.status());

  nlohmann::json out;
  const gyre::v1::IndexMeta m = meta->value_or(gyre::v1::IndexMeta());
  out["index"] = index_dir;
  out["tokenizer"] = {{"name", m.tokenizer_name()},
                      {"fingerprint", absl::StrFormat("%016x", m.tokenizer_fingerprint())},
                      {"vocab_size", m.vocab_size()},
                      {"eos_id", m.eos_id()}};
  out["format_version"] = m.format_version();
  out["inputs"] = inputs->size();
  uint64_t total_docs = 0, total_tokens = 0, total_shards = 0, total_bytes = 0;
  nlohmann::json rows = nlohmann::json::array();
  for (const auto& s : *sources) {
    auto shards = (*index)->ListShards(s.name());
    if (!shards.ok()) return fail(shards.status());
    uint64_t bytes = 0;
    for (const auto& sh : *shards) {
      auto size = Env::Default()->FileSize(JoinPath(index_dir, sh.path()));
      if (!size.ok()) return fail(size.status());
      bytes += *size;
    }
    rows.push_back({{"source", s.name()},
                    {"split", s.split()},
                    {"validation", s.validation()},
                    {"documents", s.documents()},
                    {"tokens", s.tokens()},
                    {"shards", s.shards()},
                    {"bytes", bytes}});
    total_docs += s.documents();
    total_tokens += s.tokens();
    total_shards += s.shards();
    total_bytes += bytes;
  }
  out["sources"] = rows;
  out["total"] = {{"documents", total_docs}, {"tokens", total_tokens}, {"shards", total_shards},
                  {"bytes", total_bytes}};
  if (json) {
    std::printf("%s\n", out.dump(2).c_str());
    return 0;
  }
  std::printf("index %s: tokenizer %s (fingerprint %016llx, vocab %u, eos %u), %zu inputs\n",
              index_dir.c_str(), m.tokenizer_name().c_str(),
              static_cast<unsigned long long>(m.tokenizer_fingerprint()), m.vocab_size(),
              m.eos_id(), inputs->size());
  std::printf("%-32s %-10s %12s %14s %7s %14s\n", "source", "split", "documents", "tokens",
              "shards", "bytes");
  for (const auto& r : rows) {
    std::printf("%-32s %-10s %12llu %14llu %7llu %14llu\n",
                r["source"].get<std::string>().c_str(), r["split"].get<std::string>().c_str(),
                static_cast<unsigned long long>(r["documents"].get<uint64_t>()),
                static_cast<unsigned long long>(r["tokens"].get<uint64_t>()),
                static_cast<unsigned long long>(r["shards"].get<uint64_t>()),
                static_cast<unsigned long long>(r["bytes"].get<uint64_t>()));
  }
  std::printf("%-32s %-10s %12llu %14llu %7llu %14llu\n", "total", "",
              static_cast<unsigned long long>(total_docs),
              static_cast<unsigned long long>(total_tokens),
              static_cast<unsigned long long>(total_shards),
              static_cast<unsigned long long>(total_bytes));
  return 0;
}

}  // namespace gyre::cli
