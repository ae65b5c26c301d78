// SSD chunked forward / backward on the CPU at the mamba2-small shape (d 256 → di 512: 8 heads
// of 64, d_state 64, 1 group, chunk 64). Run: bazel run -c opt //kernels/cpu:ssd_bench
// Run with OPENBLAS_NUM_THREADS=1 OPENBLAS_CORETYPE=SkylakeX on the development machine (see the
// performance note in the kernel's header); on a loaded machine compare CPU time, not wall time.
#include <random>
#include <vector>

#include "benchmark/benchmark.h"
#include "kernels/cpu/ssd.h"

namespace gyre::cpu {
namespace {

void BM_SsdChunked(benchmark::State& state) {
  const SsdShape s{.batch = 8,
                   .seq_len = state.range(0),
                   .num_heads = 8,
                   .head_dim = 64,
                   .num_groups = 1,
                   .state_dim = 64};
  const SsdOptions o{.chunk_size = state.range(1)};
  const bool backward = state.range(2) != 0;
  std::mt19937 rng(1);
  std::normal_distribution<float> nd(0.f, 1.f);
  auto fill = [&](int64_t n, float mean = 0.f) {
    std::vector<float> v(n);
    for (float& e : v) e = nd(rng) + mean;
    return v;
  };
  const int64_t BS = s.batch * s.seq_len, H = s.num_heads, P = s.head_dim, N = s.state_dim;
  auto x = fill(BS * H * P), dt = fill(BS * H, -3.f), a_log = fill(H, 1.f), dt_bias = fill(H),
       b = fill(BS * N), c = fill(BS * N), d = fill(H), dy = fill(BS * H * P);
  std::vector<float> y(BS * H * P), saved(ssd_chunked_saved_size(s, o)), dx(y.size()), ddt(BS * H),
      da(H), ddtb(H), db(BS * N), dc(BS * N), dd(H);
  const SsdInputs<float> in{x.data(), dt.data(), a_log.data(), dt_bias.data(),
                            b.data(), c.data(),  d.data()};
  ssd_chunked_fwd_ref<float>(s, o, in, nullptr, y.data(), saved.data(), nullptr);
  for (auto _ : state) {
    if (backward) {
      ssd_chunked_bwd_ref<float>(
          s, o, in, nullptr, saved.data(), dy.data(), nullptr,
          {dx.data(), ddt.data(), da.data(), ddtb.data(), db.data(), dc.data(), dd.data()},
          nullptr);
    } else {
      ssd_chunked_fwd_ref<float>(s, o, in, nullptr, y.data(), saved.data(), nullptr);
    }
    benchmark::ClobberMemory();
  }
  state.counters["tokens/s"] =
      benchmark::Counter(double(BS) * state.iterations(), benchmark::Counter::kIsRate);
}
BENCHMARK(BM_SsdChunked)
    ->ArgNames({"S", "Q", "bwd"})
    ->Args({256, 64, 0})
    ->Args({256, 64, 1})
    ->Args({256, 128, 0})
    ->Args({1024, 64, 0})
    ->Args({1024, 64, 1})
    ->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace gyre::cpu
