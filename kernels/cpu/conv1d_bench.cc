// Causal depthwise conv1d (K 4, SiLU) forward / backward on the CPU at the xlstm-small inner
// width (C 512). Run: bazel run -c opt //kernels/cpu:conv1d_bench
#include <random>
#include <vector>

#include "benchmark/benchmark.h"
#include "kernels/cpu/conv1d.h"

namespace gyre::cpu {
namespace {

void BM_Conv1d(benchmark::State& state) {
  const Conv1dShape s{.batch = 8, .seq_len = state.range(0), .channels = 512, .width = 4};
  const Conv1dOptions o{.silu = true};
  const bool backward = state.range(1) != 0;
  std::mt19937 rng(1);
  std::normal_distribution<float> nd(0.f, 1.f);
  auto fill = [&](int64_t n) {
    std::vector<float> v(n);
    for (float& e : v) e = nd(rng);
    return v;
  };
  const int64_t n = s.batch * s.seq_len * s.channels;
  auto x = fill(n), w = fill(s.channels * s.width), bias = fill(s.channels), dy = fill(n);
  std::vector<float> y(n), dx(n), dw(w.size()), db(bias.size());
  for (auto _ : state) {
    if (backward) {
      conv1d_bwd_ref<float>(s, o, x.data(), w.data(), bias.data(), nullptr, dy.data(), nullptr,
                            dx.data(), dw.data(), db.data(), nullptr);
    } else {
      conv1d_fwd_ref<float>(s, o, x.data(), w.data(), bias.data(), nullptr, y.data(), nullptr);
    }
    benchmark::ClobberMemory();
  }
  state.counters["tokens/s"] = benchmark::Counter(double(s.batch * s.seq_len) * state.iterations(),
                                                  benchmark::Counter::kIsRate);
}
BENCHMARK(BM_Conv1d)
    ->ArgNames({"S", "bwd"})
    ->Args({256, 0})
    ->Args({256, 1})
    ->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace gyre::cpu
