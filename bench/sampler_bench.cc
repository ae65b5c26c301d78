// Sampler throughput from page-cache-resident shards, one thread (issue 3: >= 50M tokens/s).
//
// Builds (once, cached under $GYRE_BENCH_DIR or /tmp/gyre_sampler_bench) an index of three
// sources, 512M tokens (1 GiB, over the 300 MiB L3 of the dev box) in uint16 shards of 4M tokens, reads them once to warm the page
// cache, then times Sampler::Read of consecutive global samples (the training access pattern:
// a step's slice) for several sequence lengths. Items = tokens delivered (L + 1 per sample).
//
//   bazel run -c opt //bench:sampler_bench -- --benchmark_min_time=1
#include <cstdlib>
#include <fstream>
#include <filesystem>
#include <memory>
#include <vector>

#include "absl/strings/str_cat.h"
#include "base/env.h"
#include "benchmark/benchmark.h"
#include "dataloader/permutation.h"
#include "dataloader/sampler.h"
#include "dataloader/shard.h"
#include "dataloader/token_index.h"

namespace gyre::data {
namespace {

constexpr uint64_t kShardTokens = uint64_t{4} << 20;
const std::vector<std::pair<std::string, int>> kLayout = {{"alpha", 80}, {"beta", 40}, {"gamma", 8}};

std::string BenchDir() {
  const char* d = std::getenv("GYRE_BENCH_DIR");
  return d ? d : "/tmp/gyre_sampler_bench";
}

void BuildIndexOnce() {
  const std::string dir = BenchDir();
  if (std::filesystem::exists(dir + "/complete")) return;
  std::filesystem::remove_all(dir);
  auto index = TokenIndex::Open(dir, TokenIndex::Mode::kReadWrite);
  if (!index.ok()) std::abort();
  gyre::v1::IndexMeta meta;
  meta.set_tokenizer_fingerprint(1);
  meta.set_vocab_size(50257);
  if (!(*index)->WriteMeta(meta).ok()) std::abort();
  std::vector<uint32_t> ids(kShardTokens);
  uint64_t x = 1;
  for (const auto& [name, shards] : kLayout) {
    TokenIndex::InputCommit commit;
    commit.input.set_path(name);
    for (int s = 0; s < shards; ++s) {
      for (auto& id : ids) id = (x = Mix64(x)) % 50257;
      const std::string rel = absl::StrCat("shards/", name, "/", s, ".tok");
      auto w = ShardWriter::Create(Env::Default(), dir + "/" + rel, 2, 1);
      if (!w.ok() || !(*w)->AppendDocument(ids).ok()) std::abort();
      auto h = (*w)->Finish();
      if (!h.ok()) std::abort();
      TokenIndex::NewShard ns;
      ns.source = name;
      ns.split = "train";
      ns.path = rel;
      ns.tokens = h->tokens;
      ns.documents = 1;
      ns.payload_checksum = h->payload_checksum;
      commit.shards.push_back(ns);
    }
    if (!(*index)->CommitInput(commit).ok()) std::abort();
  }
  std::ofstream(dir + "/complete") << "ok\n";
}

void BM_SamplerRead(benchmark::State& state) {
  BuildIndexOnce();
  auto index = TokenIndex::Open(BenchDir(), TokenIndex::Mode::kReadOnly);
  SamplerOptions options;
  options.seq_len = static_cast<uint32_t>(state.range(0));
  options.seed = 7;
  auto sampler = Sampler::Open(Env::Default(), **index, options, {.verify_checksums = true});
  if (!sampler.ok()) {
    state.SkipWithError(sampler.status().ToString().c_str());
    return;
  }
  std::vector<uint32_t> window(options.seq_len + 1);
  // Warm: touch every shard through the sampler (and verify checksums once).
  for (uint64_t g = 0; g < 20000; ++g) benchmark::DoNotOptimize((*sampler)->Read(g, window));
  // Page cache: read every shard file once.
  for (const auto& entry : std::filesystem::recursive_directory_iterator(BenchDir() + "/shards")) {
    auto bytes = Env::Default()->ReadFile(entry.path().string());
    if (bytes.ok()) benchmark::DoNotOptimize(bytes->data());
  }
  uint64_t g = 0, tokens = 0;
  for (auto _ : state) {
    if (!(*sampler)->Read(g++, window).ok()) state.SkipWithError("read failed");
    benchmark::DoNotOptimize(window.data());
    tokens += window.size();
  }
  state.SetItemsProcessed(static_cast<int64_t>(tokens));
  state.counters["Mtok/s"] = benchmark::Counter(static_cast<double>(tokens) / 1e6,
                                                benchmark::Counter::kIsRate);
}
BENCHMARK(BM_SamplerRead)->UseRealTime()->Arg(128)->Arg(512)->Arg(2048)->Arg(8192);

// The address computation alone (block permutation + per-source Feistel).
void BM_Locate(benchmark::State& state) {
  std::vector<SourceInfo> sources = {{"a", 1u << 30, false}, {"b", 1u << 28, false},
                                     {"c", 1u << 20, false}};
  SamplerOptions options;
  options.seq_len = 2048;
  auto m = MixSchedule::Create(sources, options);
  uint64_t g = 0;
  for (auto _ : state) benchmark::DoNotOptimize(m->Locate(g++));
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_Locate);

}  // namespace
}  // namespace gyre::data

BENCHMARK_MAIN();
