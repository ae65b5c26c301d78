// One-GPU Llama training step through ops/ on CUDA (the same Trainer `gyre train --device cuda`
// and the worker run): forward + backward + global-norm clip + AdamW, random tokens, context
// 2048. Prints tokens/s and MFU for each preset.
//
// FLOPs per step (stated, as PERFORMANCE.md asks):
//   dense   6 · N · tokens            N = parameters of the blocks + final norm (no embedding,
//                                     no LM head): "without head"; N + V·d: "with head"
//   attn    6 · L · d_attn · T · tokens   (12·L·d·T per token for QKᵀ and PV forward + backward,
//                                          halved for the causal mask; d_attn = heads · head_dim)
//   MFU = FLOPs / step time / peak, peak = 989 TFLOP/s (H100/H200 SXM dense bf16, the figure
//   PERFORMANCE.md's anchors use).
// Timing: host wall clock per step (each step ends with one device-to-host read: the gradient
// norm with the loss, so the stream is drained); warm-up steps first; median of the rest
// (bench/step_timing.h). --profile_steps N adds N steps with CUDA events around every backend op
// (CudaBackend::SetOpProfiling) and prints GPU time per op, the device's idle time and its gaps
// (the gap before each op summed per op, the largest gaps with their neighbours, a histogram by
// size, the host's tail after the last op: ops/step_notes.md).
// --variants NAME=VALUE ... times --variant_rounds rounds of --variant_steps steps under each
// environment setting (e.g. GYRE_GEMM_AUTOTUNE=1, GYRE_ATTN_BWD=...) and the default, each round
// starting at another entry (as recurrent_step_bench). --profile_variants NAME=VALUE ...
// prints a per-op profile under each environment setting (one unprofiled step first, so new GEMM
// plans are built outside the timed steps): in-step A/B of per-op settings such as GYRE_GEMM_PICK
// (kernels/cuda/gemm.cu), whose isolated timings did not carry over to the step.
// No CUDA graphs: the step reads the norm (and the loss) back and uploads token ids from the
// host, and the profile shows the device idle only 0.5 ms (125m) / 0.9 ms (1.3b) per step on an
// H100, ~1.7 us launch bubbles between ~258 / ~510 ops a step plus the step's start (the host's
// prologue, 50-110 us) (bench/RESULTS.md, session 22, async22): a graph could save at most that.
#include <algorithm>
#include <cstdlib>
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "bench/step_timing.h"
#include "ops/cuda_backend.h"
#include "ops/flops.h"
#include "ops/parallel.h"
#include "ops/train_step.h"

namespace {

using namespace gyre::ops;

struct Result {
  std::string preset;
  int64_t batch = 0, seq = 0;
  double median_s = 0, tokens_per_s = 0, mfu = 0, mfu_head = 0, init_s = 0;
  double loss_first = 0, loss_last = 0;
};

// Attention fwd / fwd+bwd alone at the model's shape (the same backend call the layer makes;
// fused q|k|v rows), host-timed around a synchronised loop: its share of the step.
void TimeAttention(const ModelSpec& spec, int64_t batch, int64_t seq) {
  const int64_t H = spec.attn_heads, Hk = spec.attn_kv_heads, D = spec.attn_head_dim, rows = batch * seq;
  const int64_t width = (H + 2 * Hk) * D;
  Tensor host = Tensor::Empty({rows, width}, DType::kF32, Device::kCpu);
  uint64_t x = 88172645463325252ull;
  float* p = host.data<float>();
  for (int64_t i = 0; i < host.numel(); ++i) {
    x ^= x << 13; x ^= x >> 7; x ^= x << 17;
    p[i] = static_cast<float>((x >> 11) * 0x1.0p-53 * 2.0 - 1.0);
  }
  Tensor qkv = host.ToDevice(Device::kCuda).To(DType::kBF16);
  Tensor out = Tensor::Empty({rows, H * D}, DType::kBF16, Device::kCuda);
  Tensor lse = Tensor::Empty({batch, H, seq}, DType::kF32, Device::kCuda);
  Tensor dout = qkv.Slice(0, {rows, H * D}).Clone();
  Tensor dqkv = Tensor::Empty({rows, width}, DType::kBF16, Device::kCuda);
  const char* b = static_cast<const char*>(qkv.raw());
  char* db = static_cast<char*>(dqkv.raw());
  CudaAttention a;
  a.batch = batch; a.seq = seq; a.heads = H; a.kv_heads = Hk; a.head_dim = D;
  a.q = b; a.k = b + H * D * 2; a.v = b + (H + Hk) * D * 2;
  a.q_row_stride = a.kv_row_stride = width;
  a.out = out.raw(); a.lse = lse.data<float>(); a.dout = dout.raw();
  a.dq = db; a.dk = db + H * D * 2; a.dv = db + (H + Hk) * D * 2;
  auto time = [&](bool backward) {
    std::vector<double> ts;
    for (int r = 0; r < 23; ++r) {
      Cuda().Synchronize();
      const auto t0 = std::chrono::steady_clock::now();
      Cuda().AttentionForward(a);
      if (backward) Cuda().AttentionBackward(a);
      Cuda().Synchronize();
      if (r >= 3) ts.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    std::sort(ts.begin(), ts.end());
    return ts[ts.size() / 2];
  };
  const double f = time(false), fb = time(true);
  const double flop = 4.0 * batch * H * seq * seq * D / 2;  // causal fwd; bwd 2.5x
  std::printf("  attention B%lld T%lld %lld heads x %lld: fwd %.3f ms (%.0f TFLOP/s), fwd+bwd %.3f ms (%.0f TFLOP/s); "
              "x %lld layers = %.1f ms per step\n",
              (long long)batch, (long long)seq, (long long)H, (long long)D, f * 1e3, flop / f / 1e12, fb * 1e3,
              3.5 * flop / fb / 1e12, (long long)spec.n_layers(), fb * spec.n_layers() * 1e3);
}

// Per-op GPU time of `steps` profiled steps (CUDA events around every backend op; the steps are
// otherwise the same as the timed ones). Busy = Σ op times; idle = wall − busy (the device waiting
// for the host: launch bubbles, host-side bookkeeping, the read-back; ops close their bracket
// before a read-back since session 22, so its round trip is idle, not the op's time).
void PrintProfile(std::vector<CudaBackend::OpTime> ops, const std::vector<double>& wall, double median_s) {
  const double n = static_cast<double>(wall.size());
  double wall_sum = 0, busy = 0, gemm = 0, gemm_flops = 0;
  for (double w : wall) wall_sum += w;
  for (const auto& o : ops) {
    busy += o.seconds;
    if (o.flops > 0) {
      gemm += o.seconds;
      gemm_flops += o.flops;
    }
  }
  std::printf("  per-op profile (%d steps; wall %.2f ms/step vs untimed median %.2f; device busy %.2f ms/step, "
              "idle %.2f ms/step; GEMMs %.2f ms/step at %.0f TFLOP/s):\n",
              static_cast<int>(n), 1e3 * wall_sum / n, 1e3 * median_s, 1e3 * busy / n, 1e3 * (wall_sum - busy) / n,
              1e3 * gemm / n, gemm > 0 ? gemm_flops / gemm / 1e12 : 0.0);
  gyre::bench::PrintOpGaps(Cuda().TakeOpGaps(), ops, wall);
  gyre::bench::PrintOpTable(std::move(ops), n, busy);
}

int Run(const std::string& preset, int64_t batch, int64_t seq, int warmup, int steps, int profile_steps,
        const gyre::bench::EnvVariants& env_variants, double peak_tflops, int layers, bool time_attention,
        Result* out) {
  auto spec = PresetSpec(preset);
  if (!spec.ok()) {
    std::fprintf(stderr, "%s\n", std::string(spec.status().message()).c_str());
    return 1;
  }
  if (layers > 0 && layers < spec->n_layers()) spec->blocks.resize(static_cast<size_t>(layers));
  gyre::bench::BenchModel bench_model;
  if (!gyre::bench::CreateBenchModel(*spec, &bench_model)) return 1;
  out->init_s = bench_model.init_s;
  Trainer& trainer = *bench_model.trainer;
  Rng rng(2);
  gyre::bench::StepTimes run;
  if (!gyre::bench::TimeSteps(trainer, rng, spec->vocab_size, batch, seq, 0, warmup + steps, &run)) return 1;
  out->loss_first = run.loss_first;
  out->loss_last = run.loss_last;
  std::vector<double> times(run.seconds.begin() + warmup, run.seconds.end());
  std::sort(times.begin(), times.end());
  const double med = gyre::bench::MedianOf(times);
  int next_step = warmup + steps;
  if (profile_steps > 0) {
    Cuda().SetOpProfiling(true);
    gyre::bench::StepTimes prof;
    const bool ok = gyre::bench::TimeSteps(trainer, rng, spec->vocab_size, batch, seq, next_step, profile_steps, &prof);
    Cuda().SetOpProfiling(false);
    if (!ok) return 1;
    next_step += profile_steps;
    PrintProfile(Cuda().TakeOpProfile(), prof.seconds, med);
  }
  const auto print_profile = [&](const std::string&, std::vector<CudaBackend::OpTime> ops,
                                  const std::vector<double>& wall) { PrintProfile(std::move(ops), wall, med); };
  if (!gyre::bench::ProfileVariants(trainer, rng, spec->vocab_size, batch, seq, env_variants.profile,
                                    profile_steps > 0 ? profile_steps : 3, &next_step, print_profile)) {
    return 1;
  }
  // A/B variants: alternating rounds on this model (bench/step_timing.h AlternateVariants: each
  // round starts at another entry, so no entry always runs first or right after another).
  if (!gyre::bench::TimeVariants(trainer, rng, spec->vocab_size, batch, seq, preset, env_variants, &next_step)) return 1;
  const double tokens_step = static_cast<double>(batch * seq);
  // 6N + attention (+ head): ops/flops.h, the formula the workers' MFU uses too.
  const absl::StatusOr<TrainingFlops> per_token = CountTrainingFlops(*spec, seq);
  if (!per_token.ok()) {
    std::fprintf(stderr, "%s\n", std::string(per_token.status().message()).c_str());
    return 1;
  }
  const double n_dense = per_token->dense / 6.0;
  const double flops = per_token->without_head() * tokens_step;
  const double flops_head = per_token->total() * tokens_step;
  out->preset = preset;
  out->batch = batch;
  out->seq = seq;
  out->median_s = med;
  out->tokens_per_s = tokens_step / med;
  out->mfu = flops / med / (peak_tflops * 1e12);
  out->mfu_head = flops_head / med / (peak_tflops * 1e12);
  std::printf("%s batch %lld x %lld: N(no emb, no head) %.1fM, step median %.2f ms (min %.2f, max %.2f, %d steps), "
              "%.0f tokens/s, MFU %.1f%% (%.1f%% with LM head), loss %.3f -> %.3f, init %.1f s\n",
              preset.c_str(), (long long)batch, (long long)seq, n_dense / 1e6, med * 1e3, times.front() * 1e3,
              times.back() * 1e3, steps, out->tokens_per_s, 100 * out->mfu, 100 * out->mfu_head, out->loss_first,
              out->loss_last, out->init_s);
  // Full precision of the losses: two runs of one binary must print the same digits
  // (bitwise-reproducible training); the line above rounds to 3 decimals.
  std::printf("  losses first/last %.9g %.9g\n", out->loss_first, out->loss_last);
  std::fflush(stdout);
  bench_model.Release();
  if (time_attention) TimeAttention(*spec, batch, seq);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Llama training step on one GPU (ops/ CUDA backend)"};
  std::vector<std::string> presets = {"llama-125m", "llama-1.3b"};
  std::vector<int64_t> batches = {16, 8};
  int64_t seq = 2048;
  int warmup = 3, steps = 10, profile_steps = 0;
  gyre::bench::EnvVariants env_variants;
  double peak = 989.0;
  int layers = 0;
  bool time_attention = true;
  app.add_option("--presets", presets, "presets")->capture_default_str();
  app.add_option("--batches", batches, "batch per preset")->capture_default_str();
  app.add_option("--seq", seq, "context")->capture_default_str();
  app.add_option("--warmup", warmup, "warm-up steps")->capture_default_str();
  app.add_option("--steps", steps, "timed steps")->capture_default_str();
  app.add_option("--profile_steps", profile_steps, "extra steps with a per-op GPU-time breakdown")
      ->capture_default_str();
  app.add_option("--variants", env_variants.timed,
                 "NAME=VALUE environment settings to time against the default, alternating rounds on one model");
  app.add_option("--variant_rounds", env_variants.rounds, "rounds of --variants")->capture_default_str();
  app.add_option("--variant_steps", env_variants.steps, "steps per entry and round of --variants")
      ->capture_default_str();
  app.add_option("--profile_variants", env_variants.profile,
                 "NAME=VALUE environment settings to profile per op after the main run (in-step A/B)");
  app.add_option("--peak-tflops", peak, "peak dense bf16 TFLOP/s for MFU")->capture_default_str();
  app.add_option("--layers", layers, "keep only the first N layers of each preset (0: all)")->capture_default_str();
  app.add_option("--time_attention", time_attention, "time the attention alone after each preset")
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  if (CudaBackendOrNull() == nullptr) {
    std::fprintf(stderr, "built without CUDA\n");
    return 1;
  }
  if (batches.size() != presets.size()) {
    std::fprintf(stderr, "--batches needs one value per preset\n");
    return 2;
  }
  SetNumThreads(0);  // host-side initialisation draws in parallel (ops/module.cc InitNormal)
  std::printf("device: %s\n", Cuda().DeviceDescription().c_str());
  std::vector<Result> results;
  for (size_t i = 0; i < presets.size(); ++i) {
    Result r;
    if (Run(presets[i], batches[i], seq, warmup, steps, profile_steps, env_variants, peak, layers, time_attention,
            &r) != 0) {
      return 1;
    }
    Cuda().ReleaseCachedMemory();  // the next preset starts from an empty cache (recurrent_step_bench)
    results.push_back(r);
  }
  std::printf("\n| model | batch x ctx | step ms | tokens/s | MFU (no head) | MFU (with head) |\n|---|---|---|---|---|---|\n");
  for (const Result& r : results) {
    std::printf("| %s | %lld x %lld | %.1f | %.0f | %.1f%% | %.1f%% |\n", r.preset.c_str(), (long long)r.batch,
                (long long)r.seq, r.median_s * 1e3, r.tokens_per_s, 100 * r.mfu, 100 * r.mfu_head);
  }
  return 0;
}
