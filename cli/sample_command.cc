// `gyre sample`: prints which samples each step and rank read, one line per sample, so people can
// inspect their mix and tests can check determinism (DESIGN.md section 3).
//
//   gyre sample --index DIR --seq-len L --global-batch B --steps A:C --world W --rank R
//               [--seed S] [--weights src=w,...] [--mix-block K] [--verify-checksums]
//
// Steps A:C are A, A+1, ..., C-1 (a single number is one step). Output, tab-separated:
//   step  rank  global  source  epoch  sequence  hash
// where hash is XXH3-64 of the sample's L+1 token ids as little-endian uint32 (hex).
#include <cstdio>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "cli/commands.h"
#include "dataloader/sampler.h"
#include "dataloader/token_index.h"

namespace gyre::cli {
namespace {

bool ParseSteps(const std::string& text, uint64_t* first, uint64_t* end) {
  std::vector<std::string> parts = absl::StrSplit(text, ':');
  if (parts.size() == 1) {
    if (!absl::SimpleAtoi(parts[0], first)) return false;
    *end = *first + 1;
    return true;
  }
  return parts.size() == 2 && absl::SimpleAtoi(parts[0], first) &&
         absl::SimpleAtoi(parts[1], end) && *first < *end;
}

}  // namespace

// Parses "a=1,b c=0.5" into weights; false (with `error`) on a malformed entry.
namespace {
bool ParseWeights(const std::string& text, std::map<std::string, double>* weights,
                  std::string* error) {
  if (text.empty()) return true;
  for (absl::string_view item : absl::StrSplit(text, ',')) {
    const size_t eq = item.rfind('=');
    double w = 0;
    if (eq == absl::string_view::npos || eq == 0 ||
        !absl::SimpleAtod(item.substr(eq + 1), &w)) {
      *error = "--weights: expected source=weight, got '" + std::string(item) + "'";
      return false;
    }
    (*weights)[std::string(item.substr(0, eq))] = w;
  }
  return true;
}

}  // namespace

int RunSample(int argc, char** argv) {
  CLI::App app("print the samples each step and rank reads", argv[0]);
  std::string index_dir, steps_text = "0", weights_text;
  uint32_t seq_len = 0, world = 1, rank = 0, mix_block = 1024;
  uint64_t global_batch = 0, seed = 0;
  bool verify = false;
  app.add_option("--index", index_dir, "token index directory (gyre prepare --out)")->required();
  app.add_option("--seq-len", seq_len, "L: tokens per sample (+1 target)")->required();
  app.add_option("--global-batch", global_batch, "B: sequences per step over all ranks")->required();
  app.add_option("--steps", steps_text, "A:C = steps A..C-1, or one step");
  app.add_option("--world", world, "W: number of ranks");
  app.add_option("--rank", rank, "R: this rank, 0..W-1");
  app.add_option("--seed", seed, "run seed");
  app.add_option("--weights", weights_text, "source=weight,...; unnamed sources keep their token share");
  app.add_option("--mix-block", mix_block, "K: samples per mixing block");
  app.add_flag("--verify-checksums", verify, "hash each shard's payload when first read");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  uint64_t first_step = 0, end_step = 0;
  if (!ParseSteps(steps_text, &first_step, &end_step)) {
    std::fprintf(stderr, "gyre sample: --steps: expected A:C with A < C, or one step; got '%s'\n",
                 steps_text.c_str());
    return 2;
  }
  if (world == 0 || rank >= world) {
    std::fprintf(stderr, "gyre sample: --rank %u is not in [0, --world %u)\n", rank, world);
    return 2;
  }
  if (global_batch == 0) {
    std::fprintf(stderr, "gyre sample: --global-batch must be positive\n");
    return 2;
  }
  data::SamplerOptions options;
  options.seq_len = seq_len;
  options.seed = seed;
  options.mix_block = mix_block;
  std::string error;
  if (!ParseWeights(weights_text, &options.weights, &error)) {
    std::fprintf(stderr, "gyre sample: %s\n", error.c_str());
    return 2;
  }
  auto index = data::TokenIndex::Open(index_dir, data::TokenIndex::Mode::kReadOnly);
  if (!index.ok()) {
    std::fprintf(stderr, "gyre sample: %s\n", index.status().ToString().c_str());
    return 1;
  }
  auto sampler = data::Sampler::Open(Env::Default(), **index, options, {.verify_checksums = verify});
  if (!sampler.ok()) {
    std::fprintf(stderr, "gyre sample: %s\n", sampler.status().ToString().c_str());
    return 1;
  }
  std::fprintf(stderr, "%s", (*sampler)->schedule().Describe().c_str());
  std::vector<uint32_t> window(seq_len + size_t{1});
  std::printf("# step\trank\tglobal\tsource\tepoch\tsequence\thash\n");
  for (uint64_t step = first_step; step < end_step; ++step) {
    const data::SampleRange range = data::RankSlice(step, global_batch, world, rank);
    for (uint64_t g = range.first; g < range.first + range.count; ++g) {
      const data::SampleAddress a = (*sampler)->Locate(g);
      absl::Status st = (*sampler)->ReadAt(a, window);
      if (!st.ok()) {
        std::fprintf(stderr, "gyre sample: global sample %llu: %s\n",
                     static_cast<unsigned long long>(g), st.ToString().c_str());
        return 1;
      }
      std::printf("%llu\t%u\t%llu\t%s\t%llu\t%llu\t%016llx\n",
                  static_cast<unsigned long long>(step), rank, static_cast<unsigned long long>(g),
                  (*sampler)->schedule().sources()[a.source].name.c_str(),
                  static_cast<unsigned long long>(a.epoch),
                  static_cast<unsigned long long>(a.sequence),
                  static_cast<unsigned long long>(data::HashTokens(window)));
    }
  }
  return std::fflush(stdout) == 0 ? 0 : 1;
}

}  // namespace gyre::cli
