// mLSTM chunkwise forward / backward on the CPU at the xlstm-small shape (d 256 → p 512, 4 heads
// of 128, chunk 64). Run: bazel run -c opt //kernels/cpu:mlstm_bench
// Counters: tokens/s (B·S per iteration). Set OPENBLAS_NUM_THREADS to compare thread counts.
// Run with OPENBLAS_NUM_THREADS=1 OPENBLAS_CORETYPE=SkylakeX on the development machine (see the
// performance note in the kernel's header); on a loaded machine compare CPU time, not wall time.
#include <random>
#include <vector>

#include "benchmark/benchmark.h"
#include "kernels/cpu/mlstm.h"

namespace gyre::cpu {
namespace {

struct Buffers {
  std::vector<float> q, k, v, ig, fg, h, saved, dh, dq, dk, dv, dig, dfg;
};

Buffers Make(const MlstmShape& s, const MlstmOptions& o) {
  std::mt19937 rng(1);
  std::normal_distribution<float> nd(0.f, 1.f);
  auto fill = [&](int64_t n, float mean = 0.f) {
    std::vector<float> v(n);
    for (float& e : v) e = nd(rng) + mean;
    return v;
  };
  const int64_t tok = s.batch * s.seq_len * s.num_heads;
  Buffers b;
  b.q = fill(tok * s.dk);
  b.k = fill(tok * s.dk);
  b.v = fill(tok * s.dv);
  b.ig = fill(tok);
  b.fg = fill(tok, 3.f);
  b.h.resize(tok * s.dv);
  b.saved.resize(mlstm_chunkwise_saved_size(s, o));
  b.dh = fill(tok * s.dv);
  b.dq.resize(tok * s.dk);
  b.dk.resize(tok * s.dk);
  b.dv.resize(tok * s.dv);
  b.dig.resize(tok);
  b.dfg.resize(tok);
  return b;
}

void BM_MlstmChunkwise(benchmark::State& state) {
  const MlstmShape s{.batch = 8, .seq_len = state.range(0), .num_heads = 4, .dk = 128, .dv = 128};
  const MlstmOptions o{.chunk_size = state.range(1)};
  const bool backward = state.range(2) != 0;
  Buffers b = Make(s, o);
  const MlstmInputs<float> in{b.q.data(), b.k.data(), b.v.data(), b.ig.data(), b.fg.data()};
  mlstm_chunkwise_fwd_ref<float>(s, o, in, {}, b.h.data(), b.saved.data(), {});
  for (auto _ : state) {
    if (backward) {
      mlstm_chunkwise_bwd_ref<float>(
          s, o, in, {}, b.h.data(), b.saved.data(), b.dh.data(), {},
          {b.dq.data(), b.dk.data(), b.dv.data(), b.dig.data(), b.dfg.data()}, {});
    } else {
      mlstm_chunkwise_fwd_ref<float>(s, o, in, {}, b.h.data(), b.saved.data(), {});
    }
    benchmark::ClobberMemory();
  }
  state.counters["tokens/s"] = benchmark::Counter(double(s.batch * s.seq_len) * state.iterations(),
                                                  benchmark::Counter::kIsRate);
}
BENCHMARK(BM_MlstmChunkwise)
    ->ArgNames({"S", "L", "bwd"})
    ->Args({256, 64, 0})
    ->Args({256, 64, 1})
    ->Args({256, 32, 0})
    ->Args({256, 128, 0})
    ->Args({1024, 64, 0})
    ->Args({1024, 64, 1})
    ->Unit(benchmark::kMillisecond);

void BM_MlstmRecurrent(benchmark::State& state) {
  const MlstmShape s{.batch = 8, .seq_len = state.range(0), .num_heads = 4, .dk = 128, .dv = 128};
  const MlstmOptions o{};
  Buffers b = Make(s, o);
  const MlstmInputs<float> in{b.q.data(), b.k.data(), b.v.data(), b.ig.data(), b.fg.data()};
  for (auto _ : state) {
    mlstm_recurrent_fwd_ref<float>(s, o, in, {}, b.h.data(), {});
    benchmark::ClobberMemory();
  }
  state.counters["tokens/s"] = benchmark::Counter(double(s.batch * s.seq_len) * state.iterations(),
                                                  benchmark::Counter::kIsRate);
}
BENCHMARK(BM_MlstmRecurrent)->ArgNames({"S"})->Arg(256)->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace gyre::cpu
