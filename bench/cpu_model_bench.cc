// CPU training throughput per preset: one full step (forward + backward + clip + AdamW) of
// ops::Trainer on synthetic tokens, reported as tokens/s (Google Benchmark; median of the
// repetitions). Arguments: preset index, threads.
//   bazel run -c opt //bench:cpu_model_bench -- --benchmark_repetitions=3
// The binary re-executes itself with the best OpenBLAS core first (ops/blas_env.h).
#include <cstdio>
#include <string>
#include <vector>

#include "benchmark/benchmark.h"
#include "ops/blas_env.h"
#include "ops/parallel.h"
#include "ops/train_step.h"

namespace {

const std::vector<std::string> kPresets = {"llama-tiny", "xlstm-tiny", "mamba2-tiny", "hybrid-tiny",
                                           "llama-small", "xlstm-small", "mamba2-small"};
constexpr int64_t kBatch = 8;
constexpr int64_t kSeq = 128;

void BM_TrainStep(benchmark::State& state) {
  const std::string& preset = kPresets[state.range(0)];
  gyre::ops::SetNumThreads(static_cast<int>(state.range(1)));
  auto spec = gyre::ops::PresetSpec(preset);
  if (!spec.ok()) {
    state.SkipWithError(std::string(spec.status().message()).c_str());
    return;
  }
  auto model = gyre::ops::LanguageModel::Create(*spec, gyre::ops::DType::kF32, gyre::ops::Device::kCpu, 1);
  if (!model.ok()) {
    state.SkipWithError(std::string(model.status().message()).c_str());
    return;
  }
  gyre::ops::TrainOptions options;
  options.schedule = {1e-3, 0, 0, 0.1};
  gyre::ops::Trainer trainer(model->get(), options);
  std::vector<int32_t> tokens(kBatch * (kSeq + 1));
  gyre::ops::Rng rng(3);
  for (auto& t : tokens) t = static_cast<int32_t>(rng.Below(spec->vocab_size));
  uint64_t step = 0;
  trainer.Step(tokens, kBatch, kSeq, step++).IgnoreError();  // warm the allocator pool
  for (auto _ : state) {
    auto s = trainer.Step(tokens, kBatch, kSeq, step++);
    if (!s.ok()) state.SkipWithError(std::string(s.status().message()).c_str());
    benchmark::DoNotOptimize(s);
  }
  state.counters["tokens/s"] =
      benchmark::Counter(static_cast<double>(state.iterations() * kBatch * kSeq), benchmark::Counter::kIsRate);
  state.counters["params"] = static_cast<double>((*model)->NumParameters());
  state.SetLabel(preset);
}

BENCHMARK(BM_TrainStep)
    ->ArgsProduct({benchmark::CreateDenseRange(0, static_cast<int64_t>(kPresets.size()) - 1, 1), {1, 2}})
    ->ArgNames({"preset", "threads"})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->MinTime(1.0);

}  // namespace

int main(int argc, char** argv) {
  gyre::ops::ReexecWithBestBlasCore(argv);
  std::printf("OpenBLAS core: %s, batch %lld x seq %lld\n", gyre::ops::BlasCoreName().c_str(), (long long)kBatch,
              (long long)kSeq);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
