// Needs a GPU: the CUDA causal depthwise conv1d (+ SiLU) forward and backward
// (kernels/cuda/conv1d.h) against the CPU float64 reference (kernels/cpu/conv1d.h) on the same
// bf16-representable random inputs: y, the final state, dx, d initial state, and the accumulated
// dw, dbias increments (or, in overwrite mode, dw, dbias themselves over NaN-poisoned buffers). Widths 1..4, odd lengths (S = 1, 2, 37, 300), S < K−1, with and without
// SiLU / bias / states. Outputs NaN-poisoned first.
#include "kernels/cuda/conv1d.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cpu/conv1d.h"
#include "kernels/cuda/gpu_test_util.h"

namespace gyre::cuda {
namespace {

using testing::DeviceArray;
using testing::RandomBf16Values;
using testing::RandomFloats;
using testing::RelError;
using testing::Report;
using bf16 = __nv_bfloat16;

struct Case {
  int64_t B, S, C, K;
  bool silu, bias, states;
  bool overwrite = false;  // dw, dbias overwritten (NaN-poisoned before) instead of accumulated
  // dx rows of ldx elements (Conv1dBackwardArgs::dx_row_stride; 0 = C): dx is the first C
  // columns of a NaN-poisoned [B·S, ldx] buffer whose other columns must stay poisoned.
  int64_t ldx = 0;
};

std::vector<double> ToDouble(const std::vector<float>& v) { return {v.begin(), v.end()}; }

bool RunCase(const Case& k, uint64_t seed) {
  std::mt19937_64 rng(seed);
  DeviceAllocator alloc;
  const int64_t n = k.B * k.S * k.C, ns = k.B * std::max<int64_t>(k.K - 1, 1) * k.C;
  const auto x = RandomBf16Values(rng, n);
  const auto w = RandomFloats(rng, k.C * k.K, 0.5f);
  const auto bias = RandomFloats(rng, k.C, 0.5f);
  const auto init = RandomBf16Values(rng, ns);
  const auto dy = RandomBf16Values(rng, n);
  const auto dfin = RandomBf16Values(rng, ns);
  const auto dw0 = RandomFloats(rng, k.C * k.K), db0 = RandomFloats(rng, k.C);

  cpu::Conv1dShape cs{k.B, k.S, k.C, k.K};
  cpu::Conv1dOptions co;
  co.silu = k.silu;
  const auto xd = ToDouble(x), wd = ToDouble(w), bd = ToDouble(bias), id = ToDouble(init),
             dyd = ToDouble(dy), dfd = ToDouble(dfin);
  const bool has_state = k.states && k.K > 1;
  std::vector<double> y_ref(n), fin_ref(ns, 0.0), dx_ref(n), dw_ref(k.C * k.K, 0.0),
      db_ref(k.C, 0.0), di_ref(ns, 0.0);
  cpu::conv1d_fwd_ref<double>(cs, co, xd.data(), wd.data(), k.bias ? bd.data() : nullptr,
                              has_state ? id.data() : nullptr, y_ref.data(),
                              k.K > 1 ? fin_ref.data() : nullptr);
  cpu::conv1d_bwd_ref<double>(cs, co, xd.data(), wd.data(), k.bias ? bd.data() : nullptr,
                              has_state ? id.data() : nullptr, dyd.data(),
                              has_state ? dfd.data() : nullptr, dx_ref.data(), dw_ref.data(),
                              k.bias ? db_ref.data() : nullptr, k.K > 1 ? di_ref.data() : nullptr);

  DeviceArray<bf16> d_x(&alloc, n), d_y(&alloc, n), d_init(&alloc, ns), d_fin(&alloc, ns),
      d_dy(&alloc, n), d_dfin(&alloc, ns), d_dx(&alloc, k.ldx > 0 ? k.B * k.S * k.ldx : n), d_di(&alloc, ns);
  DeviceArray<float> d_w(&alloc, k.C * k.K), d_b(&alloc, k.C), d_dw(&alloc, k.C * k.K),
      d_db(&alloc, k.C);
  d_x.Upload(x);
  d_w.Upload(w);
  d_b.Upload(bias);
  d_init.Upload(init);
  d_dy.Upload(dy);
  d_dfin.Upload(dfin);
  if (k.overwrite) {
    d_dw.Poison();
    d_db.Poison();
  } else {
    d_dw.Upload(dw0);
    d_db.Upload(db0);
  }
  d_y.Poison();
  d_fin.Poison();
  d_dx.Poison();
  d_di.Poison();

  Conv1dShape s{k.B, k.S, k.C, k.K};
  Conv1dForwardArgs f;
  f.shape = s;
  f.options.silu = k.silu;
  f.x = d_x.get();
  f.w = d_w.get();
  f.bias = k.bias ? d_b.get() : nullptr;
  f.initial_state = has_state ? d_init.get() : nullptr;
  f.y = d_y.get();
  f.final_state = k.K > 1 ? d_fin.get() : nullptr;
  CudaResult r = Conv1dForward(f, nullptr);
  EXPECT_TRUE(r.ok()) << r.message;
  if (!r.ok()) return false;
  Conv1dBackwardArgs g;
  g.shape = s;
  g.options.silu = k.silu;
  g.x = f.x;
  g.w = f.w;
  g.bias = f.bias;
  g.initial_state = f.initial_state;
  g.dy = d_dy.get();
  g.d_final_state = has_state ? d_dfin.get() : nullptr;
  g.dx = d_dx.get();
  g.dx_row_stride = k.ldx;
  g.dw = d_dw.get();
  g.dbias = k.bias ? d_db.get() : nullptr;
  g.d_initial_state = k.K > 1 ? d_di.get() : nullptr;
  g.overwrite_dparams = k.overwrite;
  r = Conv1dBackward(g, &alloc, nullptr);
  EXPECT_TRUE(r.ok()) << r.message;
  if (!r.ok()) return false;
  CUDA_CHECK_OR_DIE(cudaDeviceSynchronize());

  // The backward's variant in this process (conv1d.cu: GYRE_CONV_BWD, read once; K = 4 with
  // 4-channel vectors only), for the result lines.
  const char* variant = std::getenv("GYRE_CONV_BWD");  // unset = split since session 8
  const std::string name = std::string("conv1d") + "[" + (variant != nullptr ? variant : "split") + "]" +
                           (k.silu ? "+silu" : "") +
                           (k.bias ? "+bias" : "") + (has_state ? "+state" : "") + (k.overwrite ? "+overwrite" : "") +
                           (k.ldx > 0 ? "+ldx" + std::to_string(k.ldx) : "");
  const std::string shape = "B" + std::to_string(k.B) + " S" + std::to_string(k.S) + " C" +
                            std::to_string(k.C) + " K" + std::to_string(k.K);
  bool ok = true;
  // Outputs rounded to bf16 (one rounding); dw/dbias are fp32 sums of fp32 products of exact
  // bf16 inputs, but du itself is computed in fp32 from a float SiLU: 1e-4.
  ok &= Report(name + " fwd y", shape, RelError(d_y.Download(), y_ref), testing::kTolBf16);
  if (k.K > 1) {
    // Copies of bf16 inputs: exact.
    ok &= Report(name + " fwd final_state", shape, RelError(d_fin.Download(), fin_ref), 1e-7);
  }
  std::vector<float> dx = d_dx.Download();
  if (k.ldx > 0) {
    std::vector<float> packed(n);
    int64_t touched = 0;  // columns >= C that are not the poison any more
    for (int64_t r = 0; r < k.B * k.S; ++r) {
      for (int64_t c = 0; c < k.ldx; ++c) {
        const float v = dx[r * k.ldx + c];
        if (c < k.C) packed[r * k.C + c] = v;
        else touched += !std::isnan(v);
      }
    }
    ok &= Report(name + " bwd dx columns >= C untouched", shape, static_cast<double>(touched), 0.0);
    dx = std::move(packed);
  }
  ok &= Report(name + " bwd dx", shape, RelError(dx, dx_ref), testing::kTolBf16);
  if (k.K > 1) {
    ok &= Report(name + " bwd d_initial", shape, RelError(d_di.Download(), di_ref),
                 testing::kTolBf16);
  }
  {
    const auto after = d_dw.Download();
    std::vector<float> inc(after.size());
    for (size_t i = 0; i < inc.size(); ++i) inc[i] = after[i] - (k.overwrite ? 0.f : dw0[i]);
    ok &= Report(name + " bwd dw (accum)", shape, RelError(inc, dw_ref), testing::kTolF32Accum);
  }
  if (k.bias) {
    const auto after = d_db.Download();
    std::vector<float> inc(after.size());
    for (size_t i = 0; i < inc.size(); ++i) inc[i] = after[i] - (k.overwrite ? 0.f : db0[i]);
    ok &= Report(name + " bwd dbias (accum)", shape, RelError(inc, db_ref), testing::kTolF32Accum);
  }
  return ok;
}

TEST(Conv1dGpu, MatchesCpuReference) {
  const std::vector<Case> cases = {
      {2, 1, 130, 4, true, true, true},    {2, 2, 64, 4, true, true, true},
      {3, 37, 200, 4, true, true, true},   {2, 300, 96, 4, false, true, false},
      {2, 300, 257, 3, true, false, true}, {1, 65, 33, 2, true, true, true},
      {2, 129, 48, 1, true, true, false},  {4, 1000, 512, 4, true, true, true},
      {3, 37, 200, 4, true, true, true, true}, {2, 300, 257, 3, true, false, true, true},
      {4, 1000, 512, 4, true, true, true, true},
      // The cp.async rings' interior runs with 2 channels per thread (130 = 2 mod 4) and with
      // 64-thread blocks (1792 channels, Mamba-2 130m's conv width).
      {2, 300, 130, 4, true, true, true}, {2, 200, 1792, 4, true, false, true},
      // S a multiple of 64 and 128 (the step presets' 2048): the last run is only the K−1
      // final-state tokens; run 0 and it are where GYRE_CONV_BWD=split / r128 differ.
      {2, 256, 96, 4, true, true, true, true}, {1, 2048, 64, 4, true, true, true},
      // dx rows wider than C (the Mamba-2 fused in_proj backward's dxBC columns, d_inner + 2GN of
      // d_inner + conv + heads): the split kernel's twin (K 4, 4 channels a thread, and 64-thread
      // blocks at 1792), 2 and 1 channels a thread (ldx 130 + 6, 33 + 3), K 3.
      {2, 300, 192, 4, true, true, false, true, 324}, {2, 200, 1792, 4, true, false, false, true, 3352},
      {2, 300, 130, 4, true, true, true, false, 136}, {1, 65, 33, 2, true, true, true, false, 36},
      {2, 300, 257, 3, true, false, true, true, 300},
  };
  uint64_t seed = 99;
  int failed = 0;
  for (const Case& k : cases) failed += RunCase(k, seed++) ? 0 : 1;
  std::printf("conv1d_gpu_test: %zu cases, %d failed\n", cases.size(), failed);
  EXPECT_EQ(failed, 0);
}

// The backward under GYRE_CONV_BWD=value in this process: prints its error and exits 0 if it
// was rejected, 1 if it was accepted. The variant is checked before any pointer is touched or
// kernel launched, so the (host) pointers here are never dereferenced.
[[noreturn]] void ExitWithBackwardVariantResult(const char* value) {
  setenv("GYRE_CONV_BWD", value, /*overwrite=*/1);
  DeviceAllocator alloc;
  static bf16 xb[4];
  static float wf[4];
  Conv1dBackwardArgs g;
  g.shape = {1, 1, 4, 4};
  g.x = g.dy = xb;
  g.dx = xb;
  g.w = wf;
  g.dw = wf;
  const CudaResult r = Conv1dBackward(g, &alloc, nullptr);
  std::fprintf(stderr, "%s\n", r.message.c_str());
  std::exit(r.ok() ? 1 : 0);
}

// GYRE_CONV_BWD is read once a process, so each value is tried in a fresh one (a death test in
// the "threadsafe" style re-executes this binary). The deleted variants' names (minb4, a16,
// split5: slower than split on an H100, session 8; default, the (kBlock, 5) kernel at K = 4 with
// 4-channel vectors: slower than split in the 2026-11-27 confirmation) and a misspelling are
// errors naming the accepted values.
TEST(Conv1dGpuDeathTest, UnknownBackwardVariantIsAnError) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  for (const char* value : {"minb4", "a16", "split5", "default", "Split"}) {
    EXPECT_EXIT(ExitWithBackwardVariantResult(value), ::testing::ExitedWithCode(0),
                std::string("GYRE_CONV_BWD must be split or r128, got '") + value + "'");
  }
}

TEST(Conv1dGpu, RejectsBadWidth) {
  EXPECT_FALSE(Conv1dCheck({1, 10, 8, 5}).ok());
  EXPECT_FALSE(Conv1dCheck({1, 10, 8, 0}).ok());
  EXPECT_TRUE(Conv1dCheck({1, 10, 8, 4}).ok());
}

}  // namespace
}  // namespace gyre::cuda
