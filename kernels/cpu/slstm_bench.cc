// sLSTM forward / backward on the CPU at the xlstm-small shape (d 256, 4 heads of 64).
// Run: bazel run -c opt //kernels/cpu:slstm_bench
// Run with OPENBLAS_NUM_THREADS=1 OPENBLAS_CORETYPE=SkylakeX on the development machine (see the
// performance note in the kernel's header); on a loaded machine compare CPU time, not wall time.
#include <random>
#include <vector>

#include "benchmark/benchmark.h"
#include "kernels/cpu/slstm.h"

namespace gyre::cpu {
namespace {

void BM_Slstm(benchmark::State& state) {
  const SlstmShape s{.batch = 8, .seq_len = state.range(0), .num_heads = 4, .head_dim = 64};
  const bool backward = state.range(1) != 0;
  std::mt19937 rng(1);
  std::normal_distribution<float> nd(0.f, 1.f);
  auto fill = [&](int64_t n, float scale = 1.f) {
    std::vector<float> v(n);
    for (float& e : v) e = scale * nd(rng);
    return v;
  };
  const int64_t d = s.num_heads * s.head_dim, BS = s.batch * s.seq_len;
  auto gx = fill(BS * 4 * d), r = fill(s.num_heads * 4 * s.head_dim * s.head_dim, 0.1f),
       dh = fill(BS * d);
  std::vector<float> h(BS * d), saved(slstm_saved_size(s)), dgx(gx.size()), dr(r.size());
  slstm_fwd_ref<float>(s, gx.data(), r.data(), {}, h.data(), saved.data(), {});
  for (auto _ : state) {
    if (backward) {
      slstm_bwd_ref<float>(s, r.data(), {}, h.data(), saved.data(), dh.data(), {}, dgx.data(),
                           dr.data(), {});
    } else {
      slstm_fwd_ref<float>(s, gx.data(), r.data(), {}, h.data(), saved.data(), {});
    }
    benchmark::ClobberMemory();
  }
  state.counters["tokens/s"] =
      benchmark::Counter(double(BS) * state.iterations(), benchmark::Counter::kIsRate);
}
BENCHMARK(BM_Slstm)
    ->ArgNames({"S", "bwd"})
    ->Args({256, 0})
    ->Args({256, 1})
    ->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace gyre::cpu
