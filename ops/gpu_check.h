// Helpers shared by the ops/ GPU tests (llama_gpu_test, recurrent_gpu_test, decode_gpu_test): compare a CUDA
// result with a float64 CPU reference and print one `[PASS|FAIL] name shape rel_err tol` line
// (the format of kernels/cuda/gpu_test_util.h), and make bf16-representable random inputs so the
// same numbers feed both backends; and the bitwise-repeat runs (a few AdamW steps on a fresh
// model, every loss, gradient norm, parameter and gradient kept as bytes, two runs compared).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "gtest/gtest.h"

#include "ops/elementwise.h"
#include "ops/model.h"
#include "ops/module.h"
#include "ops/recurrent_blocks.h"  // Mamba2GradTerms, SumAbsTerms, CheckSumOfTerms
#include "ops/rng.h"
#include "ops/tensor.h"
#include "ops/train_step.h"

namespace gyre::ops {

// Relative error of `got` (any device/dtype) against `want`; a non-finite value fails.
inline bool Check(const std::string& name, const Tensor& got, const Tensor& want, double tol) {
  const Tensor g = got.ToDevice(Device::kCpu).To(DType::kF64);
  const Tensor w = want.ToDevice(Device::kCpu).To(DType::kF64);
  bool finite = true;
  for (int64_t i = 0; i < g.numel(); ++i) finite = finite && std::isfinite(g.At(i));
  const double err = finite ? RelativeError(g, w) : INFINITY;
  const bool ok = err <= tol;
  std::printf("[%s] %s %s rel_err %.3e tol %.0e\n", ok ? "PASS" : "FAIL", name.c_str(),
              ShapeString(got.shape()).c_str(), err, tol);
  return ok;
}

// Random bf16-representable values as a float64 CPU tensor.
inline Tensor RandomBf16Host(Shape shape, double scale, Rng* rng) {
  Tensor t = Tensor::Empty(std::move(shape), DType::kF64, Device::kCpu);
  for (int64_t i = 0; i < t.numel(); ++i) t.Set(i, Bf16ToFloat(FloatToBf16(static_cast<float>(scale * rng->Normal()))));
  return t;
}

inline Tensor ToCudaBf16(const Tensor& host_f64) {
  return host_f64.To(DType::kF32).ToDevice(Device::kCuda).To(DType::kBF16);
}

// value := bf16(value) on a CUDA store, so masters and compute copies hold the same numbers.
inline void RoundMastersToBf16(ParamStore& store) {
  for (Parameter* p : store.All()) p->value.CopyFrom(p->compute.To(DType::kF32));
}

// The masters of a GPU store as float64 CPU tensors (to load into the CPU reference).
inline std::vector<NamedTensor> AsF64State(const ParamStore& gpu) {
  std::vector<NamedTensor> state;
  for (const Parameter* p : gpu.All()) state.push_back({p->name, p->value.ToDevice(Device::kCpu).To(DType::kF64)});
  return state;
}

// Every gradient of the GPU store against the CPU store's parameter of the same name.
inline bool CheckGrads(const ParamStore& gpu, ParamStore& cpu, const std::string& prefix, double tol) {
  bool ok = true;
  for (const Parameter* g : gpu.All()) ok &= Check(prefix + " d" + g->name, g->grad, cpu.Find(g->name)->grad, tol);
  return ok;
}

// Every gradient against the float64 reference (CheckGrads), except the parameters whose gradients
// are sums over tokens of recorded terms (Mamba-2's dt_bias, A_log, D; the xLSTM Large gate biases:
// SetXlstmLargeGateTermRecording), which pass at rel_err <= tol OR terms_err = ||g - w|| /
// ||sum_tokens |term||| <= 1e-2 (ops/DT_BIAS_CHECK.md: where the sum cancels, bf16 inputs alone
// exceed a relative 5e-2; each term is right to ~1/2 bf16 ulp). Their line prints both measures
// and the cancellation ||w|| / ||sum |terms|||.
inline bool CheckGradsWithTerms(const ParamStore& gpu, ParamStore& cpu, const std::string& prefix, double tol,
                                const std::vector<Mamba2GradTerms>& terms) {
  bool ok = true;
  for (const Parameter* g : gpu.All()) {
    const std::vector<double> abs_sums = SumAbsTerms(terms, g->name);
    if (abs_sums.empty()) {
      ok &= Check(prefix + " d" + g->name, g->grad, cpu.Find(g->name)->grad, tol);
      continue;
    }
    const SumOfTermsCheck c = CheckSumOfTerms(g->grad, cpu.Find(g->name)->grad, abs_sums, tol, 1e-2);
    std::printf("[%s] %s d%s %s rel_err %.3e tol %.0e | terms_err %.3e tol 1e-02 (sum/sum|terms| %.3f)\n",
                c.pass ? "PASS" : "FAIL", prefix.c_str(), g->name.c_str(), ShapeString(g->grad.shape()).c_str(),
                c.rel_err, tol, c.terms_err, c.cancel);
    ok &= c.pass;
  }
  return ok;
}

// Deferred zeroing (ops/module.h) on the device: after a step, every gradient of a model of `spec`
// skips the memset and is poisoned with NaN; two micro-batches must then give the gradients of a
// fresh, eagerly zeroed model (every first write overwrites or zeroes what is stale).
inline bool DeferredZeroMatchesZeroed(const ModelSpec& spec, const std::string& label) {
  const int64_t B = 4, T = 64;
  auto fresh = LanguageModel::Create(spec, DType::kF32, Device::kCuda, 6);
  auto reused = LanguageModel::Create(spec, DType::kF32, Device::kCuda, 6);
  if (!fresh.ok() || !reused.ok()) {
    std::printf("[FAIL] %s: model: %s\n", label.c_str(),
                std::string((fresh.ok() ? reused : fresh).status().message()).c_str());
    return false;
  }
  const auto earlier = RandomTokens(B * (T + 1), spec.vocab_size, 7);
  const auto tokens = RandomTokens(B * (T + 1), spec.vocab_size, 8);
  const double scale = 1.0 / (B * T);
  auto two_passes = [&](LanguageModel& m) {
    const std::span<const int32_t> all(tokens);
    m.ForwardBackward(all.first(2 * (T + 1)), 2, T, scale);
    m.ForwardBackward(all.subspan(2 * (T + 1)), 2, T, scale);
  };
  (*reused)->params().ZeroGrad();
  (*reused)->ForwardBackward(earlier, B, T, scale);
  (*reused)->params().DeferZeroGrad();
  size_t stale = 0;
  for (Parameter* p : (*reused)->params().All()) {
    if (!p->grad_stale) continue;
    ++stale;
    p->grad.Fill(std::nan(""));
  }
  const size_t params = (*reused)->params().All().size();
  bool ok = stale == params;
  if (!ok) std::printf("[FAIL] %s: %zu of %zu gradients skip the memset\n", label.c_str(), stale, params);
  two_passes(**reused);
  (*fresh)->params().ZeroGrad();
  two_passes(**fresh);
  return CheckGrads((*reused)->params(), (*fresh)->params(), label, 1e-5) && ok;
}

// ---------------------------------------------------------------- bitwise repeatability

// What one training run leaves, bit for bit: each step's loss and gradient norm, and every
// parameter's value and gradient as bytes (in the store's order).
struct TrainBits {
  std::vector<double> losses, grad_norms;
  std::vector<std::string> names;
  std::vector<std::vector<char>> values, grads;
};

inline std::vector<char> HostBytes(const Tensor& t) {
  const Tensor h = t.ToDevice(Device::kCpu);
  std::vector<char> bytes(h.nbytes());
  if (!bytes.empty()) std::memcpy(bytes.data(), h.raw(), bytes.size());
  return bytes;
}

// `steps` AdamW steps (peak lr 3e-3, warm-up 1, clip 1.0; the deferred-zero step path of
// Trainer) from a fresh CUDA model of seed 11, step s on RandomTokens(B * (T + 1), vocab, 100 + s).
// A failure is a gtest failure and returns what was collected so far. `auto_kept` (optional): the
// model's auto_kept_layers() after the last step. `split_step`: each step as ComputeGradients
// (the loss read back at the end of the pass) + ApplyUpdate instead of Trainer::Step (the loss
// fetched by the optimizer's read-back), the same arithmetic.
inline TrainBits TrainStepsForBits(const ModelSpec& spec, int64_t B, int64_t T, int steps = 3,
                                   int64_t* auto_kept = nullptr, bool split_step = false) {
  TrainBits out;
  auto m = LanguageModel::Create(spec, DType::kF32, Device::kCuda, 11);
  EXPECT_TRUE(m.ok()) << m.status();
  if (!m.ok()) return out;
  TrainOptions opt;
  opt.schedule.peak_lr = 3e-3;
  opt.schedule.warmup_steps = 1;
  opt.grad_clip = 1.0;
  Trainer trainer(m->get(), opt);
  for (int step = 0; step < steps; ++step) {
    const auto tokens = RandomTokens(B * (T + 1), spec.vocab_size, 100 + step);
    absl::StatusOr<StepStats> st;
    if (split_step) {
      StepStats s;
      s.loss = trainer.ComputeGradients(tokens, B, T, 1.0 / static_cast<double>(B * T));
      const absl::StatusOr<UpdateStats> u = trainer.ApplyUpdate(step);
      if (u.ok()) s.update = *u;
      st = u.ok() ? absl::StatusOr<StepStats>(s) : absl::StatusOr<StepStats>(u.status());
    } else {
      st = trainer.Step(tokens, B, T, step);
    }
    EXPECT_TRUE(st.ok()) << st.status();
    if (!st.ok()) return out;
    out.losses.push_back(st->loss.loss);
    out.grad_norms.push_back(st->update.grad_norm);
  }
  if (auto_kept != nullptr) *auto_kept = (*m)->auto_kept_layers();
  for (const Parameter* p : (*m)->params().All()) {
    out.names.push_back(p->name);
    out.values.push_back(HostBytes(p->value));
    out.grads.push_back(HostBytes(p->grad));
  }
  return out;
}

// How two runs differ bit for bit (over the steps and parameters both have).
struct BitsDiff {
  int losses = 0;  // steps whose loss differs
  int steps = 0;   // steps whose loss or gradient norm differs
  int values = 0, grads = 0;
  size_t params = 0;
  std::vector<std::pair<std::string, bool>> differing;  // (parameter, its gradient differs)

  bool Same() const { return steps == 0 && values == 0 && grads == 0; }
  // " name name ..." (tagged: " name(grad)" / " name(value)"), appended while shorter than `limit`.
  std::string Names(size_t limit, bool tagged) const {
    std::string out;
    for (const auto& [name, grad] : differing) {
      if (out.size() >= limit) break;
      out += " " + name + (tagged ? (grad ? "(grad)" : "(value)") : "");
    }
    return out;
  }
};

inline bool SameBits(double x, double y) { return std::memcmp(&x, &y, sizeof(double)) == 0; }

inline BitsDiff CompareBits(const TrainBits& a, const TrainBits& b) {
  BitsDiff d;
  for (size_t i = 0; i < std::min(a.losses.size(), b.losses.size()); ++i) {
    const bool loss = !SameBits(a.losses[i], b.losses[i]);
    d.losses += loss;
    d.steps += loss || !SameBits(a.grad_norms[i], b.grad_norms[i]);
  }
  d.params = std::min(a.names.size(), b.names.size());
  for (size_t i = 0; i < d.params; ++i) {
    const bool v = a.values[i] != b.values[i], g = a.grads[i] != b.grads[i];
    d.values += v;
    d.grads += g;
    if (v || g) d.differing.emplace_back(a.names[i], g);
  }
  return d;
}

}  // namespace gyre::ops
