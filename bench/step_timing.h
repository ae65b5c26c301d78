// Host-timed training steps, shared by the one-GPU step benchmarks (llama_step_bench,
// recurrent_step_bench). Each Trainer::Step ends with two device-to-host reads (the loss and the
// gradient norm), so the stream is drained and the host wall clock is the step time.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "ops/rng.h"
#include "ops/train_step.h"

namespace gyre::bench {

struct StepTimes {
  std::vector<double> seconds;  // one per step, in order
  double loss_first = 0, loss_last = 0;
};

// Runs `count` steps numbered first_step.. on fresh uniform random tokens in [0, vocab) drawn from
// `rng` (batch rows of seq + 1 ids), timing each. Returns false after printing the error of a
// failed step.
inline bool TimeSteps(ops::Trainer& trainer, ops::Rng& rng, int64_t vocab, int64_t batch, int64_t seq,
                      int first_step, int count, StepTimes* out) {
  std::vector<int32_t> tokens(batch * (seq + 1));
  for (int s = first_step; s < first_step + count; ++s) {
    for (auto& t : tokens) t = static_cast<int32_t>(rng.Below(vocab));
    const auto a = std::chrono::steady_clock::now();
    auto st = trainer.Step(tokens, batch, seq, s);
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count();
    if (!st.ok()) {
      std::fprintf(stderr, "step %d: %s\n", s, std::string(st.status().message()).c_str());
      return false;
    }
    if (out->seconds.empty()) out->loss_first = st->loss.loss;
    out->loss_last = st->loss.loss;
    out->seconds.push_back(dt);
  }
  return true;
}

// Median (upper middle for an even count, as the benches always reported).
inline double MedianOf(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// The per-op table of a --profile run: `ops` (CudaBackend::OpTime: label, calls, seconds, flops)
// summed over `steps` steps, sorted by time here; `busy` is their total seconds.
template <typename OpTime>
void PrintOpTable(std::vector<OpTime> ops, double steps, double busy) {
  std::sort(ops.begin(), ops.end(), [](const auto& a, const auto& b) { return a.seconds > b.seconds; });
  std::printf("  | op | calls/step | ms/step | %% of busy | TFLOP/s |\n  |---|---|---|---|---|\n");
  for (const auto& o : ops) {
    char tf[32] = "";
    if (o.flops > 0) std::snprintf(tf, sizeof(tf), "%.0f", o.flops / o.seconds / 1e12);
    std::printf("  | %s | %.0f | %.3f | %.1f%% | %s |\n", o.label.c_str(), o.calls / steps, 1e3 * o.seconds / steps,
                100 * o.seconds / busy, tf);
  }
  std::fflush(stdout);
}

}  // namespace gyre::bench
