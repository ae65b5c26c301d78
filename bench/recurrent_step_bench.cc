// One-GPU training step of the recurrent models (xLSTM, Mamba-2, hybrids) through ops/ on CUDA:
// the same Trainer `gyre train --device cuda` and the worker run (forward + backward + global-norm
// clip + AdamW), random tokens, context 2048. Prints tokens/s and MFU per preset.
//
// FLOPs per step (stated, as PERFORMANCE.md asks; computed by ops/flops.h):
//   dense   6 · N · tokens     N = parameters of the blocks + final norm (no embedding, no LM
//                              head): every weight (projections, block-diagonal q/k/v and gate
//                              weights, conv taps, the sLSTM recurrent matrix R) is used once
//                              per token, so 6N counts the sLSTM recurrence too.
//   cells (the matmul work of the recurrences, as the attention term of a Transformer), per
//   token and layer, forward; training = 3x forward:
//     mLSTM chunkwise (chunk L, heads NH, dk = dv): NH · (L(dk + dv) + 4 dk dv)
//                     causal intra-chunk QKᵀ and SV (L/2 keys on average) + q·C and the
//                     state update kᵀv
//     SSD (chunk Q, heads H, P, N):                 H · (Q(N + P) + 4 N P)   (same structure)
//     attention (hybrid layers):                    2 · heads · head_dim · T (causal QKᵀ + PV)
//   MFU = (dense + cells) / step time / peak, peak = 989 TFLOP/s (H100/H200 SXM dense bf16, the
//   figure PERFORMANCE.md's anchors use); "with head" adds 6 · V · d · tokens.
// Timing: host wall clock per step (each step ends with device-to-host reads of the loss and the
// gradient norm, so the stream is drained); warm-up steps first; median of the rest.
// mLSTM recomputation (ops/recurrent_blocks.h MlstmRecompute, helper mem11): --mlstm_recompute
// sets the mode per preset ("none", "cell", "glue", "block", "states", optionally ":N" = keep_last N;
// empty = GYRE_MLSTM_RECOMPUTE / _KEEP); --alternate glue@8 block@8 glue:16@4 runs each preset's
// steps on ONE model (one initialisation) cycling through the entries (mode[:keep][@batch];
// warm-up per entry first, then timed steps round-robin) and prints the median per entry, the
// ratio to the first entry of the same batch, and the allocator's peak after each entry's
// warm-up (the first entry's peak is its own; later ones are the running maximum).
// --profile_variants NAME=VALUE ... prints a per-op profile under each environment setting after
// the timed steps, one process (bench/step_timing.h ProfileVariants; "NAME=" profiles the default):
// the in-step A/B of GYRE_GEMM_PICK candidates (kernels/cuda/gemm.cu, gemm_notes.md).
// --variants NAME=VALUE ... times --variant_rounds rounds of --variant_steps steps per entry (the
// default = variables unset, then each setting), alternating on one model, round r starting at
// entry r mod n (printed; bench/step_timing_order.h), and prints each entry's median and its
// per-round medians (e.g. GYRE_GEMM_TABLE=llama-only: the plan table without the recurrent entries).
#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

#include "CLI/CLI.hpp"
#include "bench/step_timing.h"
#include "ops/cuda_backend.h"
#include "ops/flops.h"
#include "ops/parallel.h"
#include "ops/recurrent_blocks.h"
#include "ops/train_step.h"

namespace {

using namespace gyre::ops;

struct Result {
  std::string preset;
  int64_t batch = 0, seq = 0;
  bool recompute = false;
  double median_s = 0, tokens_per_s = 0, mfu = 0, mfu_head = 0, init_s = 0, cell_share = 0;
  double loss_first = 0, loss_last = 0;
  std::string mlstm_mode;
};


// Per-op GPU time of the --op_profile_steps steps (CudaBackend::SetOpProfiling: CUDA events
// around every backend op, no synchronisation inside the step). Busy = Σ op times; idle = wall −
// busy (the device waiting for the host).
void PrintOpProfile(std::vector<CudaBackend::OpTime> ops, const std::vector<double>& wall) {
  const double n = static_cast<double>(wall.size());
  double wall_sum = 0, busy = 0;
  for (double w : wall) wall_sum += w;
  for (const auto& o : ops) busy += o.seconds;
  std::printf("  per-op profile (%d steps; wall %.2f ms/step; device busy %.2f ms/step, idle %.2f ms/step):\n",
              static_cast<int>(n), 1e3 * wall_sum / n, 1e3 * busy / n, 1e3 * (wall_sum - busy) / n);
  gyre::bench::PrintOpTable(std::move(ops), n, busy);
}

// "none" | "cell" | "glue" | "block" | "states", optionally ":N" (keep_last); false on anything else.
bool ParseRecompute(const std::string& text, MlstmRecomputeConfig* out) {
  const size_t colon = text.find(':');
  const std::string mode = text.substr(0, colon);
  MlstmRecomputeConfig c;
  if (mode == "cell") c.mode = MlstmRecompute::kCell;
  else if (mode == "glue") c.mode = MlstmRecompute::kGlue;
  else if (mode == "block") c.mode = MlstmRecompute::kBlock;
  else if (mode == "states") c.mode = MlstmRecompute::kStates;
  else if (mode != "none") return false;
  if (colon != std::string::npos) {
    char* end = nullptr;
    const std::string n = text.substr(colon + 1);
    c.keep_last = std::strtoll(n.c_str(), &end, 10);
    if (n.empty() || *end != '\0' || c.keep_last < 0) return false;
  }
  *out = c;
  return true;
}

std::string RecomputeLabel(const MlstmRecomputeConfig& c) {
  std::string s = MlstmRecomputeName(c.mode);
  if (c.keep_last > 0) s += ":" + std::to_string(c.keep_last);
  return s;
}

double GiB(uint64_t b) { return static_cast<double>(b) / (1u << 30); }

// One --alternate entry: a recomputation mode and the batch its steps use.
struct AltEntry {
  MlstmRecomputeConfig mode;
  int64_t batch = 0;  // 0: the preset's
  std::string label;
};

// --alternate: warm-up per entry (in the order given), then `steps` rounds of one step per entry;
// prints per-entry medians and the ratio to the first entry of the same batch.
// With op_profile_steps > 0, then that many steps per entry under the per-op profile.
int RunAlternating(Trainer& trainer, Rng& rng, const ModelSpec& spec, int64_t seq, int warmup, int steps,
                   const std::vector<AltEntry>& entries, double flops_token, double peak_tflops,
                   int op_profile_steps) {
  int step = 0;
  for (const AltEntry& e : entries) {
    SetMlstmRecompute(e.mode);
    gyre::bench::StepTimes w;
    if (!gyre::bench::TimeSteps(trainer, rng, spec.vocab_size, e.batch, seq, step, warmup, &w)) return 1;
    step += warmup;
    const CudaBackend::MemoryStats mem = Cuda().Memory();
    std::printf("  mode %s B%lld warm-up %d steps (last %.2f ms, loss %.4f); allocator peak in use %.2f GiB (running "
                "max), in use now %.2f GiB, cached %.2f GiB\n",
                e.label.c_str(), (long long)e.batch, warmup, w.seconds.empty() ? 0.0 : 1e3 * w.seconds.back(),
                w.loss_last, GiB(mem.peak_bytes_in_use), GiB(mem.bytes_in_use), GiB(mem.bytes_cached));
    std::fflush(stdout);
  }
  std::vector<std::vector<double>> times(entries.size());
  for (int r = 0; r < steps; ++r) {
    for (size_t i = 0; i < entries.size(); ++i) {
      SetMlstmRecompute(entries[i].mode);
      gyre::bench::StepTimes t;
      if (!gyre::bench::TimeSteps(trainer, rng, spec.vocab_size, entries[i].batch, seq, step++, 1, &t)) return 1;
      times[i].push_back(t.seconds[0]);
      std::printf("  round %d mode %s B%lld %.2f ms loss %.4f\n", r, entries[i].label.c_str(),
                  (long long)entries[i].batch, 1e3 * t.seconds[0], t.loss_last);
      std::fflush(stdout);
    }
  }
  for (size_t i = 0; i < entries.size(); ++i) {
    size_t ref = 0;
    while (entries[ref].batch != entries[i].batch) ++ref;
    const double med = gyre::bench::MedianOf(times[i]);
    const double tokens = static_cast<double>(entries[i].batch * seq);
    std::printf("ALT %s B%lld x %lld mode %s: median %.2f ms (%d steps), %.0f tokens/s, MFU %.1f%%, ratio to %s "
                "%.3f\n",
                spec.preset.c_str(), (long long)entries[i].batch, (long long)seq, entries[i].label.c_str(), 1e3 * med,
                static_cast<int>(times[i].size()), tokens / med,
                100 * flops_token * tokens / med / (peak_tflops * 1e12),
                entries[ref].label.c_str(), med / gyre::bench::MedianOf(times[ref]));
  }
  std::fflush(stdout);
  for (size_t i = 0; op_profile_steps > 0 && i < entries.size(); ++i) {
    SetMlstmRecompute(entries[i].mode);
    Cuda().SetOpProfiling(true);
    gyre::bench::StepTimes prof;
    const bool ok = gyre::bench::TimeSteps(trainer, rng, spec.vocab_size, entries[i].batch, seq, step, op_profile_steps,
                                           &prof);
    Cuda().SetOpProfiling(false);
    if (!ok) return 1;
    step += op_profile_steps;
    std::printf("  mode %s B%lld:\n", entries[i].label.c_str(), (long long)entries[i].batch);
    PrintOpProfile(Cuda().TakeOpProfile(), prof.seconds);
  }
  SetMlstmRecompute(entries[0].mode);
  return 0;
}

// `auto_mode` (e.g. "states"; "" = off): the model's own setting model.xlstm.mlstm_recompute =
// auto_mode with keep_last -1 (auto), the process-wide setting none. `explicit_mode`: a
// --mlstm_recompute MODE[:N] was given (the process-wide setting): the preset's default is cleared.
// Neither: the preset's own setting (the 1.3B xLSTM presets: states, auto).
int Run(const std::string& preset, int64_t batch, bool recompute, int64_t seq, int warmup, int steps,
        int profile_steps, int op_profile_steps, int64_t mlstm_chunk, double peak_tflops,
        std::vector<AltEntry> alternate, const std::string& auto_mode, bool explicit_mode,
        const gyre::bench::EnvVariants& env_variants, Result* out) {
  auto spec = PresetSpec(preset);
  if (!spec.ok()) {
    std::fprintf(stderr, "%s\n", std::string(spec.status().message()).c_str());
    return 1;
  }
  spec->recompute_blocks = recompute;
  if (mlstm_chunk > 0) spec->mlstm_chunk = mlstm_chunk;
  if (recompute || explicit_mode) {
    // --recompute or --mlstm_recompute MODE[:N] replace the preset's own memory default (the 1.3B
    // xLSTM presets: states, auto), so "states" still means every layer rebuilds.
    spec->mlstm_recompute = "none";
    spec->mlstm_recompute_keep_last = 0;
  }
  if (!auto_mode.empty()) {
    spec->mlstm_recompute = auto_mode;
    spec->mlstm_recompute_keep_last = -1;
  }
  gyre::bench::BenchModel bench_model;
  if (!gyre::bench::CreateBenchModel(*spec, &bench_model)) return 1;
  out->init_s = bench_model.init_s;
  Trainer& trainer = *bench_model.trainer;
  Rng rng(2);
  if (!alternate.empty()) {
    const absl::StatusOr<TrainingFlops> per_token = CountTrainingFlops(*spec, seq);
    if (!per_token.ok()) return 1;
    for (AltEntry& e : alternate) {
      if (e.batch == 0) e.batch = batch;
    }
    const int rc = RunAlternating(trainer, rng, *spec, seq, warmup, steps, alternate, per_token->without_head(),
                                  peak_tflops, op_profile_steps);
    bench_model.Release();
    return rc == 0 ? 2 : 1;  // 2: done, no Result row
  }
  gyre::bench::StepTimes run;
  if (!gyre::bench::TimeSteps(trainer, rng, spec->vocab_size, batch, seq, 0, warmup + steps, &run)) return 1;
  out->loss_first = run.loss_first;
  out->loss_last = run.loss_last;
  std::vector<double> times(run.seconds.begin() + warmup, run.seconds.end());
  std::vector<int32_t> tokens(batch * (seq + 1));
  int next_step = warmup + steps;
  if (op_profile_steps > 0) {
    Cuda().SetOpProfiling(true);
    gyre::bench::StepTimes prof;
    const bool ok = gyre::bench::TimeSteps(trainer, rng, spec->vocab_size, batch, seq, next_step, op_profile_steps, &prof);
    Cuda().SetOpProfiling(false);
    if (!ok) return 1;
    next_step += op_profile_steps;
    PrintOpProfile(Cuda().TakeOpProfile(), prof.seconds);
  }
  const auto print_profile = [](const std::string&, std::vector<CudaBackend::OpTime> ops,
                                const std::vector<double>& wall) { PrintOpProfile(std::move(ops), wall); };
  if (!gyre::bench::ProfileVariants(trainer, rng, spec->vocab_size, batch, seq, env_variants.profile,
                                    op_profile_steps > 0 ? op_profile_steps : 2, &next_step, print_profile)) {
    return 1;
  }
  if (!gyre::bench::TimeVariants(trainer, rng, spec->vocab_size, batch, seq, preset, env_variants, &next_step)) {
    return 1;
  }
  // Phase breakdown of the recurrent blocks (each phase synchronised: these steps are slower and
  // are not part of the median above).
  if (profile_steps > 0) {
    SetRecurrentProfiling(true);
    double total = 0;
    for (int s = 0; s < profile_steps; ++s) {
      for (auto& t : tokens) t = static_cast<int32_t>(rng.Below(spec->vocab_size));
      const auto a = std::chrono::steady_clock::now();
      auto st = trainer.Step(tokens, batch, seq, next_step + s);
      total += std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count();
      if (!st.ok()) return 1;
    }
    SetRecurrentProfiling(false);
    auto phases = TakeRecurrentProfile();
    std::sort(phases.begin(), phases.end(), [](const auto& x, const auto& y) { return x.second > y.second; });
    double in_blocks = 0;
    for (const auto& [name, sec] : phases) in_blocks += sec;
    std::printf("  profile (%d synchronised steps, %.1f ms/step; recurrent-block phases %.1f ms, rest of the step "
                "(embedding, attention blocks, final norm, LM head + CE, clip + AdamW) %.1f ms):\n",
                profile_steps, 1e3 * total / profile_steps, 1e3 * in_blocks / profile_steps,
                1e3 * (total - in_blocks) / profile_steps);
    for (const auto& [name, sec] : phases)
      std::printf("    %-32s %8.2f ms/step  %5.1f%%\n", name.c_str(), 1e3 * sec / profile_steps, 100 * sec / total);
  }
  std::sort(times.begin(), times.end());
  const double med = times[times.size() / 2];
  const double tokens_step = static_cast<double>(batch * seq);
  // The header's formula is ops/flops.h's (shared with the workers' MFU).
  const absl::StatusOr<TrainingFlops> per_token = CountTrainingFlops(*spec, seq);
  if (!per_token.ok()) {
    std::fprintf(stderr, "%s\n", std::string(per_token.status().message()).c_str());
    return 1;
  }
  const double n_dense = per_token->dense / 6.0;
  const double flops = per_token->without_head() * tokens_step;
  const double flops_head = per_token->total() * tokens_step;
  out->cell_share = per_token->mixer / per_token->without_head();
  out->preset = mlstm_chunk > 0 ? preset + " (mLSTM chunk " + std::to_string(mlstm_chunk) + ")" : preset;
  out->batch = batch;
  out->seq = seq;
  out->median_s = med;
  out->tokens_per_s = tokens_step / med;
  out->mfu = flops / med / (peak_tflops * 1e12);
  out->mfu_head = flops_head / med / (peak_tflops * 1e12);
  out->recompute = recompute;
  // The model's own setting (auto_mode, or the preset's default) or the process-wide one.
  const bool model_setting = !explicit_mode && spec->mlstm_recompute != "none";
  out->mlstm_mode = !model_setting ? RecomputeLabel(GetMlstmRecompute())
                    : spec->mlstm_recompute_keep_last == -1
                        ? spec->mlstm_recompute + ":auto(" + std::to_string(bench_model.model->auto_kept_layers()) + ")"
                        : spec->mlstm_recompute + ":" + std::to_string(spec->mlstm_recompute_keep_last);
  const CudaBackend::MemoryStats mem = Cuda().Memory();
  std::printf("%s batch %lld x %lld%s (mLSTM recompute %s): N(no emb, no head) %.1fM, step median %.2f ms (min %.2f, "
              "max %.2f, %d steps), %.0f tokens/s, MFU %.1f%% (%.1f%% with LM head; cell terms %.0f%% of the FLOPs), "
              "loss %.3f -> %.3f, init %.1f s, allocator peak in use %.2f GiB\n",
              out->preset.c_str(), (long long)batch, (long long)seq, recompute ? " (recompute)" : "",
              out->mlstm_mode.c_str(), n_dense / 1e6, med * 1e3, times.front() * 1e3, times.back() * 1e3, steps,
              out->tokens_per_s, 100 * out->mfu, 100 * out->mfu_head, 100 * out->cell_share, out->loss_first,
              out->loss_last, out->init_s, GiB(mem.peak_bytes_in_use));
  std::fflush(stdout);
  bench_model.Release();
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Recurrent-model training step on one GPU (ops/ CUDA backend)"};
  std::vector<std::string> presets = {"xlstm[1:0]-125m", "xlstm[7:1]-125m", "mamba2-130m", "xlstm[7:1]-1.3b",
                                      "mamba2-1.3b"};
  std::vector<int64_t> batches = {16, 16, 16, 8, 8};
  std::vector<int> recompute = {0, 0, 0, 0, 0};
  int64_t seq = 2048;
  int warmup = 3, steps = 10, profile_steps = 0, op_profile_steps = 0;
  int64_t mlstm_chunk = 0;
  double peak = 989.0;
  app.add_option("--presets", presets, "presets")->capture_default_str();
  app.add_option("--batches", batches, "batch per preset")->capture_default_str();
  app.add_option("--recompute", recompute, "1: recompute block activations in backward, per preset")->capture_default_str();
  app.add_option("--seq", seq, "context")->capture_default_str();
  app.add_option("--warmup", warmup, "warm-up steps")->capture_default_str();
  app.add_option("--steps", steps, "timed steps")->capture_default_str();
  app.add_option("--profile_steps", profile_steps, "extra synchronised steps for a per-phase breakdown")
      ->capture_default_str();
  app.add_option("--op_profile_steps", op_profile_steps,
                 "extra steps with a per-op GPU-time breakdown (CUDA events, no synchronisation)")
      ->capture_default_str();
  gyre::bench::EnvVariants env_variants;
  app.add_option("--profile_variants", env_variants.profile,
                 "NAME=VALUE environment settings to profile per op after the timed steps (in-step A/B; "
                 "NAME= profiles the default)");
  app.add_option("--variants", env_variants.timed,
                 "NAME=VALUE environment settings to time against the default, alternating rounds on one model");
  app.add_option("--variant_rounds", env_variants.rounds, "rounds of --variants")->capture_default_str();
  app.add_option("--variant_steps", env_variants.steps, "steps per entry and round of --variants")
      ->capture_default_str();
  app.add_option("--mlstm_chunk", mlstm_chunk, "override the presets' mLSTM chunk (0: keep)")->capture_default_str();
  app.add_option("--peak-tflops", peak, "peak dense bf16 TFLOP/s for MFU")->capture_default_str();
  std::vector<std::string> mlstm_recompute;
  std::vector<std::string> alternate_text;
  app.add_option("--mlstm_recompute", mlstm_recompute,
                 "mLSTM recomputation per preset: none|cell|glue|block|states[:keep_last], or states|glue|cell:auto "
                 "(the model's keep_last -1) (empty: GYRE_MLSTM_RECOMPUTE)");
  app.add_option("--alternate", alternate_text,
                 "mode[:keep][@batch] entries to cycle through on one model per preset, e.g. "
                 "glue@8 block@8 glue:16@4");
  CLI11_PARSE(app, argc, argv);
  if (!mlstm_recompute.empty() && mlstm_recompute.size() != presets.size()) {
    std::fprintf(stderr, "--mlstm_recompute needs one value per preset\n");
    return 2;
  }
  std::vector<AltEntry> alternate;
  for (const std::string& t : alternate_text) {
    AltEntry e;
    const size_t at = t.find('@');
    char* end = nullptr;
    if (at != std::string::npos) e.batch = std::strtoll(t.c_str() + at + 1, &end, 10);
    const std::string mode = t.substr(0, at);
    e.label = mode;
    if (!ParseRecompute(mode, &e.mode) || (at != std::string::npos && (*end != '\0' || e.batch <= 0))) {
      std::fprintf(stderr, "--alternate: bad entry '%s' (none|cell|glue|block|states[:N][@batch])\n",
                   t.c_str());
      return 2;
    }
    alternate.push_back(e);
  }
  if (CudaBackendOrNull() == nullptr) {
    std::fprintf(stderr, "built without CUDA\n");
    return 1;
  }
  if (batches.size() != presets.size() || recompute.size() != presets.size()) {
    std::fprintf(stderr, "--batches and --recompute need one value per preset\n");
    return 2;
  }
  SetNumThreads(0);  // host-side initialisation draws in parallel (ops/module.cc InitNormal)
  std::printf("device: %s\n", Cuda().DeviceDescription().c_str());
  // The opt-in kernel variants (environment switches read once by the kernels' host code), so a
  // log says which path it timed: A/B runs alternate them on one binary.
  for (const char* name :
       {"GYRE_CONV_BWD", "GYRE_NORM_BWD", "GYRE_NORM_FWD", "GYRE_MAMBA_IN_BWD", "GYRE_MLSTM_CONV_QKV",
        "GYRE_MLSTM_CONV_V_BWD", "GYRE_MLSTM_QK_BWD", "GYRE_MLSTM_UP"}) {
    if (const char* v = std::getenv(name)) std::printf("variant: %s=%s\n", name, v);
  }
  std::vector<Result> results;
  int rc = 0;
  for (size_t i = 0; i < presets.size(); ++i) {
    Result r;
    std::string auto_mode;
    if (!mlstm_recompute.empty() && !mlstm_recompute[i].empty()) {
      MlstmRecomputeConfig c;
      const std::string& text = mlstm_recompute[i];
      const size_t colon = text.find(':');
      if (colon != std::string::npos && text.substr(colon + 1) == "auto") {
        auto_mode = text.substr(0, colon);  // the model's setting with keep_last -1
        if (auto_mode == "none" || !ParseRecompute(auto_mode, &c) || c.mode == MlstmRecompute::kBlock) {
          std::fprintf(stderr, "--mlstm_recompute: bad mode '%s' (states|glue|cell:auto)\n", text.c_str());
          return 2;
        }
        c = MlstmRecomputeConfig{};
      } else if (!ParseRecompute(mlstm_recompute[i], &c)) {
        std::fprintf(stderr, "--mlstm_recompute: bad mode '%s' (none|cell|glue|block|states[:N])\n",
                     mlstm_recompute[i].c_str());
        return 2;
      }
      SetMlstmRecompute(c);
    }
    // A preset that fails (e.g. out of memory is an abort, a config error is not) does not stop
    // the others.
    const int run = Run(presets[i], batches[i], recompute[i] != 0, seq, warmup, steps, profile_steps, op_profile_steps,
                        mlstm_chunk, peak, alternate, auto_mode,
                        !mlstm_recompute.empty() && !mlstm_recompute[i].empty() && auto_mode.empty(), env_variants,
                        &r);
    // The next preset starts from an empty cache: the caching allocator would otherwise keep this
    // model's blocks and the next model would run slower (session 20: 136 vs 122 ms).
    Cuda().ReleaseCachedMemory();
    if (run == 2) continue;
    if (run != 0) {
      rc = 1;
      continue;
    }
    results.push_back(r);
  }
  std::printf("\n| model | batch x ctx | step ms | tokens/s | MFU (6N + cells) | MFU with head |\n|---|---|---|---|---|---|\n");
  for (const Result& r : results) {
    const std::string mode = r.mlstm_mode == "none" ? "" : " (mLSTM recompute " + r.mlstm_mode + ")";
    std::printf("| %s%s%s | %lld x %lld | %.1f | %.0f | %.1f%% | %.1f%% |\n", r.preset.c_str(),
                r.recompute ? " (recompute)" : "", mode.c_str(), (long long)r.batch, (long long)r.seq,
                r.median_s * 1e3, r.tokens_per_s, 100 * r.mfu, 100 * r.mfu_head);
  }
  return rc;
}
