// Host-timed training steps, shared by the one-GPU step benchmarks (llama_step_bench,
// recurrent_step_bench). Each Trainer::Step ends with one device-to-host read (the gradient norm
// and the loss together, ops/step_notes.md), so the stream is drained and the host wall clock is
// the step time.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "bench/step_timing_order.h"
#include "ops/cuda_backend.h"
#include "ops/rng.h"
#include "ops/train_step.h"

namespace gyre::bench {

// A model on the GPU (fp32 master weights) and its trainer with the benches' settings: AdamW at
// peak lr 3e-4 without warm-up, gradient clipping at 1.0. init_s: creation time, drained.
struct BenchModel {
  std::unique_ptr<ops::LanguageModel> model;
  std::unique_ptr<ops::Trainer> trainer;
  double init_s = 0;
  // Frees the device memory (optimiser state, then weights) before the next model.
  void Release() {
    trainer.reset();
    model.reset();
  }
};

// Prints the error and returns false when the model cannot be created.
inline bool CreateBenchModel(const ops::ModelSpec& spec, BenchModel* out) {
  const auto t0 = std::chrono::steady_clock::now();
  auto model = ops::LanguageModel::Create(spec, ops::DType::kF32, ops::Device::kCuda, 1);
  if (!model.ok()) {
    std::fprintf(stderr, "%s\n", std::string(model.status().message()).c_str());
    return false;
  }
  ops::Cuda().Synchronize();
  out->init_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  out->model = std::move(*model);
  ops::TrainOptions opt;
  opt.schedule.peak_lr = 3e-4;
  opt.schedule.warmup_steps = 0;
  opt.grad_clip = 1.0;
  out->trainer = std::make_unique<ops::Trainer>(out->model.get(), opt);
  return true;
}

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
    ops::Cuda().OpProfileStepStart();  // the op profile's gaps: the step's first op gets the gap since here
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

// --profile_variants NAME=VALUE ...: a per-op profile (CudaBackend::SetOpProfiling) under each
// environment setting in turn, on one model, after the timed steps: one unprofiled step first
// (new plans, e.g. GEMM plans of another GYRE_GEMM_PICK, are built outside the profiled steps),
// then `profile_steps` profiled steps; the variable is unset afterwards. "NAME=" (empty value)
// profiles the default, so default repeats can sit between the variants. Used for in-step A/B
// of per-op settings read per call, such as GYRE_GEMM_PICK (kernels/cuda/gemm.cu), whose isolated
// timings do not carry over to the step. `print(variant, ops, wall seconds of the profiled steps)`
// prints each profile. *next_step: the next step number (advanced). False after printing an error.
template <typename Print>
bool ProfileVariants(ops::Trainer& trainer, ops::Rng& rng, int64_t vocab, int64_t batch, int64_t seq,
                     const std::vector<std::string>& variants, int profile_steps, int* next_step, Print print) {
  for (const std::string& v : variants) {
    const size_t eq = v.find('=');
    if (eq == std::string::npos) {
      std::fprintf(stderr, "--profile_variants wants NAME=VALUE, got %s\n", v.c_str());
      return false;
    }
    const std::string name = v.substr(0, eq);
    setenv(name.c_str(), v.substr(eq + 1).c_str(), 1);
    StepTimes warm, prof;
    bool ok = TimeSteps(trainer, rng, vocab, batch, seq, *next_step, 1, &warm);
    *next_step += 1;
    ops::Cuda().SetOpProfiling(true);
    ok = ok && TimeSteps(trainer, rng, vocab, batch, seq, *next_step, profile_steps, &prof);
    ops::Cuda().SetOpProfiling(false);
    unsetenv(name.c_str());
    if (!ok) return false;
    *next_step += profile_steps;
    std::printf("  profile variant %s:\n", v.c_str());
    print(v, ops::Cuda().TakeOpProfile(), prof.seconds);
  }
  return true;
}

// Step-level A/B of environment settings read per call (or per plan build) on one model:
// one warm-up step per entry (entry 0 = the default: every named variable unset; then each
// NAME=VALUE, in that order), then `rounds` rounds of `steps` steps per entry, round r starting at
// entry r mod n (bench/step_timing_order.h RoundOrder: with rounds a multiple of n every entry is
// first equally often; a default-first order favoured the later entries by ~1 ms, helper
// xlperf20). Prints each round's order. times[entry] gets every timed step, round after round.
// False after printing an error.
inline bool AlternateVariants(ops::Trainer& trainer, ops::Rng& rng, int64_t vocab, int64_t batch, int64_t seq,
                              const std::vector<std::string>& variants, int rounds, int steps, int* next_step,
                              std::vector<std::vector<double>>* times) {
  std::vector<std::pair<std::string, std::string>> settings;
  std::vector<std::string> names = {"default"};
  for (const std::string& v : variants) {
    const size_t eq = v.find('=');
    if (eq == std::string::npos) {
      std::fprintf(stderr, "--variants wants NAME=VALUE, got %s\n", v.c_str());
      return false;
    }
    settings.emplace_back(v.substr(0, eq), v.substr(eq + 1));
    names.push_back(v);
  }
  const auto select = [&](size_t entry) {
    for (const auto& s : settings) unsetenv(s.first.c_str());
    if (entry > 0) setenv(settings[entry - 1].first.c_str(), settings[entry - 1].second.c_str(), 1);
  };
  times->assign(settings.size() + 1, {});
  if (rounds % static_cast<int>(names.size()) != 0) {
    std::printf("  (--variant_rounds %d is not a multiple of the %zu entries: some start a round more often)\n", rounds,
                names.size());
  }
  bool ok = true;
  for (int r = -1; r < rounds && ok; ++r) {  // r = -1: the warm-up step per entry, default first
    const std::vector<size_t> order = RoundOrder(r < 0 ? 0 : r, names.size());
    if (r >= 0) std::printf("  variant %s\n", DescribeRoundOrder(r, order, names).c_str());
    for (size_t e : order) {
      if (!ok) break;
      select(e);
      StepTimes t;
      const int n = r < 0 ? 1 : steps;
      ok = TimeSteps(trainer, rng, vocab, batch, seq, *next_step, n, &t);
      *next_step += n;
      if (ok && r >= 0) (*times)[e].insert((*times)[e].end(), t.seconds.begin(), t.seconds.end());
    }
  }
  std::fflush(stdout);
  select(0);
  return ok;
}

// Median (upper middle for an even count, as the benches always reported).
inline double MedianOf(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Environment A/B settings of one bench run (--profile_variants, --variants, --variant_rounds,
// --variant_steps; both step benches take the same flags).
struct EnvVariants {
  std::vector<std::string> profile, timed;
  int rounds = 3, steps = 3;
};

// --variants: AlternateVariants over env.timed, then one line per entry ("VARIANT <preset> B<batch>
// <entry>: median, each round's median, ratio to the default"). True when there is nothing to time.
inline bool TimeVariants(ops::Trainer& trainer, ops::Rng& rng, int64_t vocab, int64_t batch, int64_t seq,
                         const std::string& preset, const EnvVariants& env, int* next_step) {
  if (env.timed.empty()) return true;
  std::vector<std::vector<double>> vt;
  if (!AlternateVariants(trainer, rng, vocab, batch, seq, env.timed, env.rounds, env.steps, next_step, &vt)) {
    return false;
  }
  const double ref = MedianOf(vt[0]);
  for (size_t e = 0; e < vt.size(); ++e) {
    std::string rounds;
    for (int r = 0; r < env.rounds; ++r) {
      const auto first = vt[e].begin() + static_cast<std::ptrdiff_t>(r) * env.steps;
      char buf[32];
      std::snprintf(buf, sizeof(buf), "%s%.2f", r ? " / " : "", 1e3 * MedianOf(std::vector<double>(first, first + env.steps)));
      rounds += buf;
    }
    const double m = MedianOf(vt[e]);
    std::printf("VARIANT %s B%lld %s: median %.2f ms (%zu steps; rounds %s ms), ratio to default %.4f\n", preset.c_str(),
                (long long)batch, e == 0 ? "default" : env.timed[e - 1].c_str(), 1e3 * m, vt[e].size(), rounds.c_str(),
                m / ref);
  }
  std::fflush(stdout);
  return true;
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

// The device's gaps of a --profile run (CudaBackend::TakeOpGaps, after TakeOpProfile): where the
// device sat in no op. `ops`: the same take's per-op times (gap_seconds: the gap before each call,
// summed per op); `wall`: the profiled steps' host times. Span = from each step's start mark to
// its last op's end; wall - span = the host's tail (the last read-back's round trip and return).
template <typename OpTime>
void PrintOpGaps(const ops::CudaBackend::OpGaps& g, std::vector<OpTime> ops, const std::vector<double>& wall) {
  const double n = static_cast<double>(wall.size());
  double wall_sum = 0, gap_sum = 0, busy = 0;
  for (double w : wall) wall_sum += w;
  for (const auto& o : ops) {
    gap_sum += o.gap_seconds;
    busy += o.seconds;
  }
  std::printf("  device gaps (%lld step marks): span %.3f ms/step, ops %.3f, gaps %.3f ms/step (%.0f gaps/step), host "
              "tail (wall - span) %.3f ms/step\n",
              (long long)g.steps, 1e3 * g.span_seconds / n, 1e3 * busy / n, 1e3 * gap_sum / n,
              (g.counts[0] + g.counts[1] + g.counts[2] + g.counts[3] + g.counts[4]) / n,
              1e3 * (wall_sum - g.span_seconds) / n);
  static const char* kBuckets[5] = {"< 2 us", "2-5 us", "5-20 us", "20-100 us", ">= 100 us"};
  std::printf("  gaps by size:");
  for (int b = 0; b < 5; ++b) {
    std::printf(" %s: %.1f/step %.3f ms%s", kBuckets[b], g.counts[b] / n, 1e3 * g.seconds[b] / n, b < 4 ? ";" : "\n");
  }
  std::sort(ops.begin(), ops.end(), [](const auto& a, const auto& b) { return a.gap_seconds > b.gap_seconds; });
  std::printf("  | gap before op | calls/step | gap ms/step | us per call |\n  |---|---|---|---|\n");
  for (size_t i = 0; i < ops.size() && i < 10; ++i) {
    const auto& o = ops[i];
    std::printf("  | %s | %.0f | %.3f | %.1f |\n", o.label.c_str(), o.calls / n, 1e3 * o.gap_seconds / n,
                1e6 * o.gap_seconds / std::max<double>(1, o.calls));
  }
  std::printf("  largest gaps:");
  for (const auto& x : g.largest) {
    std::printf(" [%.1f us: %s -> %s]", 1e6 * x.seconds, x.before.c_str(), x.after.c_str());
  }
  std::printf("\n");
  std::fflush(stdout);
}

}  // namespace gyre::bench
