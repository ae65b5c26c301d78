// Needs a GPU: fused linear + cross-entropy against a float64 reference that materialises all
// logits, at the odd vocabularies 50257 and 50277, 50304, 60013 (and 120011, past the
// shared-memory row kernel), Mamba-2's 50288 at d 2048, 301 and 257, with the logits row stride
// padded to 128 beside the default, several chunks with a ragged tail, ignored targets, dW accumulated
// onto nonzero values or overwritten (NaN-poisoned before), and the loss-only mode.
#include "kernels/cuda/cross_entropy.h"

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "gtest/gtest.h"
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
  int64_t tokens, dim, vocab, chunk;
};

// One case's device buffers for LinearCrossEntropy (inputs uploaded by the test). Args poisons the
// outputs (dW: uploads `dw0` to accumulate onto, or poisons it when the call overwrites) and returns
// the call's arguments over the buffers.
struct LceBuffers {
  LceBuffers(DeviceAllocator* alloc, const Case& c)
      : h(alloc, c.tokens * c.dim), w(alloc, c.vocab * c.dim), dh(alloc, c.tokens * c.dim),
        dw(alloc, c.vocab * c.dim), tl(alloc, c.tokens), t(alloc, c.tokens), loss(alloc, 1) {}
  LinearCrossEntropyArgs Args(const Case& c, const std::vector<float>& dw0, float loss_scale, bool overwrite_dw,
                              bool lean_rows, int64_t ld_align = 8) {
    if (overwrite_dw) {
      dw.Poison();
    } else {
      dw.Upload(dw0);
    }
    dh.Poison();
    tl.Poison();
    loss.Poison();
    LinearCrossEntropyArgs a;
    a.tokens = c.tokens;
    a.dim = c.dim;
    a.vocab = c.vocab;
    a.h = h.get();
    a.w = w.get();
    a.targets = t.get();
    a.loss_scale = loss_scale;
    a.token_loss = tl.get();
    a.loss_sum = loss.get();
    a.dh = dh.get();
    a.dw = dw.get();
    a.chunk_tokens = c.chunk;
    a.overwrite_dw = overwrite_dw;
    a.lean_rows = lean_rows;
    a.ld_align = ld_align;
    return a;
  }
  DeviceArray<bf16> h, w, dh;
  DeviceArray<float> dw, tl;
  DeviceArray<int32_t> t;
  DeviceArray<double> loss;
};

// A bitwise case's random inputs, drawn from `rng` in this order: h, W (logits of standard
// deviation ~3), dW to accumulate onto, targets (every 7th row from 3 ignored; row 1 the last
// column).
struct BitwiseInputs {
  std::vector<float> h, w, dw0, targets;
};
BitwiseInputs RandomBitwiseInputs(std::mt19937_64& rng, const Case& c) {
  BitwiseInputs in;
  in.h = RandomBf16Values(rng, c.tokens * c.dim);
  in.w = RandomBf16Values(rng, c.vocab * c.dim, 3.f / std::sqrt(float(c.dim)));
  in.dw0 = RandomFloats(rng, c.vocab * c.dim, 1e-3f);
  in.targets.resize(c.tokens);
  for (int64_t r = 0; r < c.tokens; ++r) in.targets[r] = (r % 7 == 3) ? -1.f : static_cast<float>(rng() % c.vocab);
  in.targets[1] = static_cast<float>(c.vocab - 1);  // the last column (the tail when V % 8 != 0)
  return in;
}

// One LinearCrossEntropy call over `b` and its outputs, downloaded.
struct LceOutputs {
  std::vector<float> tl, dh, dw;
  double loss = 0;
};
LceOutputs RunLce(GemmContext* gemm, DeviceAllocator* alloc, LceBuffers& b, const LinearCrossEntropyArgs& a) {
  const CudaResult r = LinearCrossEntropy(gemm, alloc, a, nullptr);
  EXPECT_TRUE(r.ok()) << r.message;
  LceOutputs o;
  o.tl = b.tl.Download();
  o.dh = b.dh.Download();
  o.dw = b.dw.Download();
  o.loss = b.loss.Download()[0];
  return o;
}

// Expects x's outputs bit for bit y's: reports how many token losses, dh and dW elements differ,
// and whether the loss does ("<what>: dh differing" ...).
void ExpectSameBits(const std::string& what, const std::string& tag, const LceOutputs& x, const LceOutputs& y) {
  auto differing = [](const std::vector<float>& u, const std::vector<float>& v) {
    int64_t n = 0;
    for (size_t i = 0; i < u.size(); ++i) n += std::memcmp(&u[i], &v[i], sizeof(float)) != 0;
    return static_cast<double>(n);
  };
  EXPECT_TRUE(Report(what + ": token losses differing", tag, differing(x.tl, y.tl), 0.0));
  EXPECT_TRUE(Report(what + ": dh differing", tag, differing(x.dh, y.dh), 0.0));
  EXPECT_TRUE(Report(what + ": dW differing", tag, differing(x.dw, y.dw), 0.0));
  EXPECT_TRUE(Report(what + ": loss differs", tag, std::memcmp(&x.loss, &y.loss, sizeof(double)) != 0 ? 1.0 : 0.0,
                     0.0));
}

TEST(CrossEntropyGpuTest, MatchesMaterialisedFloat64Reference) {
  std::mt19937_64 rng(11);
  // All but the last take the shared-memory row kernel; V = 120011 (240 KB rows) the other one.
  // V 50288 at d 2048 is the mamba2-1.3b head (session 19: the padded row stride); 301 and 257 are
  // small odd vocabularies (ld 304 / 264, padded 384).
  for (const Case& c : {Case{300, 96, 50257, 128}, Case{130, 77, 50277, 1024}, Case{67, 256, 50304, 32},
                        Case{37, 768, 50304, 16}, Case{41, 64, 60013, 16}, Case{23, 40, 120011, 8},
                        Case{24, 2048, 50288, 16}, Case{50, 64, 301, 16}, Case{33, 128, 257, 8}}) {
    DeviceAllocator alloc;
    std::unique_ptr<GemmContext> gemm;
    CUDA_OK_OR_DIE(GemmContext::Create(&alloc, &gemm));
    const std::string shape = "N=" + std::to_string(c.tokens) + " d=" + std::to_string(c.dim) +
                              " V=" + std::to_string(c.vocab) + " chunk=" + std::to_string(c.chunk);
    const auto h = RandomBf16Values(rng, c.tokens * c.dim);
    const auto w = RandomBf16Values(rng, c.vocab * c.dim, 3.f / std::sqrt(float(c.dim)));  // logits' std: 3
    const auto dw0 = RandomFloats(rng, c.vocab * c.dim, 1e-3f);
    std::vector<int32_t> targets(c.tokens);
    int64_t counted = 0;
    for (int64_t r = 0; r < c.tokens; ++r) {
      targets[r] = (r % 11 == 5) ? -1 : static_cast<int32_t>(rng() % c.vocab);
      if (r == 1) targets[r] = static_cast<int32_t>(c.vocab - 1);  // last column
      counted += targets[r] >= 0;
    }
    const float loss_scale = 1.f / static_cast<float>(counted);
    LceBuffers b(&alloc, c);
    b.h.Upload(h);
    b.w.Upload(w);
    b.t.Upload(std::vector<float>(targets.begin(), targets.end()));
    // float64 reference with all logits materialised.
    std::vector<double> tl(c.tokens, 0.0), dh(c.tokens * c.dim, 0.0), dw_inc(c.vocab * c.dim, 0.0);
    std::vector<double> logits(c.vocab);
    double loss = 0;
    for (int64_t t = 0; t < c.tokens; ++t) {
      double mx = -1e300;
      for (int64_t v = 0; v < c.vocab; ++v) {
        double acc = 0;
        for (int64_t k = 0; k < c.dim; ++k) acc += double(h[t * c.dim + k]) * w[v * c.dim + k];
        logits[v] = acc;
        mx = std::max(mx, acc);
      }
      double sum = 0;
      for (int64_t v = 0; v < c.vocab; ++v) sum += std::exp(logits[v] - mx);
      const double lse = mx + std::log(sum);
      if (targets[t] < 0) continue;
      tl[t] = lse - logits[targets[t]];
      loss += tl[t];
      for (int64_t v = 0; v < c.vocab; ++v) {
        const double g = loss_scale * (std::exp(logits[v] - lse) - (v == targets[t] ? 1.0 : 0.0));
        for (int64_t k = 0; k < c.dim; ++k) {
          dh[t * c.dim + k] += g * w[v * c.dim + k];
          dw_inc[v * c.dim + k] += g * h[t * c.dim + k];
        }
      }
    }
    loss *= loss_scale;
    // rows 1: ce_row_kernel2_lean (the default), 0: ce_row_kernel2 (V 50257 / 50277 / 50304 /
    // 60013; 120011 keeps ce_row_kernel1); rows 2: the lean kernel over the logits buffer with its
    // row stride padded to a multiple of 128 (ld_align 128).
    for (const int rows_mode : {0, 1, 2})
    for (const bool overwrite_dw : {false, true}) {
      const std::string tag = shape + (overwrite_dw ? " dW overwrite" : " dW accumulate") +
                              (rows_mode == 0 ? " staged" : rows_mode == 1 ? " lean" : " lean ld128");
      LinearCrossEntropyArgs a = b.Args(c, dw0, loss_scale, overwrite_dw, rows_mode != 0, rows_mode == 2 ? 128 : 8);
      CudaResult r = LinearCrossEntropy(gemm.get(), &alloc, a, nullptr);
      ASSERT_TRUE(r.ok()) << r.message;
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      // bf16 logits: each logit moves by <= 2^-9 of its size (~0.02 at 3 standard deviations),
      // so token losses (~15 here) carry ~3e-4 relative error; the bound leaves 6x room.
      const double loss_tol = 2e-3;
      const auto got_dw = b.dw.Download();
      std::vector<float> got_inc(got_dw.size());
      for (size_t i = 0; i < got_dw.size(); ++i) {
        got_inc[i] = overwrite_dw ? got_dw[i] : static_cast<float>(double(got_dw[i]) - dw0[i]);
      }
      const double got_loss = b.loss.Download()[0];
      EXPECT_TRUE(Report("linear+CE loss", tag, std::fabs(got_loss - loss) / std::fabs(loss), loss_tol));
      EXPECT_TRUE(Report("linear+CE token losses", tag, RelError(b.tl.Download(), tl), loss_tol));
      EXPECT_TRUE(Report("linear+CE dh (bf16 G)", tag, RelError(b.dh.Download(), dh), testing::kTolBf16));
      EXPECT_TRUE(Report(overwrite_dw ? "linear+CE dW (bf16 G)" : "linear+CE dW increment (bf16 G)", tag,
                         RelError(got_inc, dw_inc), testing::kTolBf16));

      // Loss only: same loss, dh/dW untouched.
      LinearCrossEntropyArgs lo = a;
      lo.dh = nullptr;
      lo.dw = nullptr;
      b.loss.Poison();
      r = LinearCrossEntropy(gemm.get(), &alloc, lo, nullptr);
      ASSERT_TRUE(r.ok()) << r.message;
      const double got_loss2 = b.loss.Download()[0];
      EXPECT_TRUE(Report("linear+CE loss-only mode", tag, std::fabs(got_loss2 - loss) / std::fabs(loss), loss_tol));
    }
  }
}

// ce_row_kernel2_lean computes ce_row_kernel2's values in the same order: loss, token losses, dh
// and dW bit for bit equal to the default row kernel's (the GEMMs are the same plans), over
// ignored targets, the last column as target, a target in the ragged tail (V % 8 != 0) and
// several chunks. Also checked on an H100 at the 125m shape by bench/lce_bench.cc.
TEST(CrossEntropyGpuTest, LeanRowKernelEqualsDefaultBitwise) {
  std::mt19937_64 rng(31);
  for (const Case& c : {Case{301, 96, 50257, 128}, Case{200, 128, 50304, 64}, Case{90, 64, 60013, 32}}) {
    DeviceAllocator alloc;
    std::unique_ptr<GemmContext> gemm;
    CUDA_OK_OR_DIE(GemmContext::Create(&alloc, &gemm));
    BitwiseInputs in = RandomBitwiseInputs(rng, c);
    in.targets[2] = static_cast<float>(8 * (c.vocab / 8) - 1);  // the last full 16-byte group
    in.targets[4] = 0.f;
    LceBuffers b(&alloc, c);
    b.h.Upload(in.h);
    b.w.Upload(in.w);
    b.t.Upload(in.targets);
    auto run = [&](bool lean_rows, bool overwrite_dw) {
      const LinearCrossEntropyArgs a = b.Args(c, in.dw0, 1.f / static_cast<float>(c.tokens), overwrite_dw, lean_rows);
      return RunLce(gemm.get(), &alloc, b, a);
    };
    for (const bool overwrite_dw : {false, true}) {
      const LceOutputs plain = run(false, overwrite_dw);
      const LceOutputs lean = run(true, overwrite_dw);
      const std::string tag = "N=" + std::to_string(c.tokens) + " V=" + std::to_string(c.vocab) + " chunk " +
                              std::to_string(c.chunk) + (overwrite_dw ? " dW overwrite" : " dW accumulate");
      ExpectSameBits("lean vs default rows", tag, lean, plain);
    }
  }
}

// The padded row stride (ld_align 128) repeats bit for bit run to run (the GEMM plans are fixed
// per shape and stride), and equals the default where the padded stride is the default's (V a
// multiple of 128: the same buffer layout, the same plans). Several chunks, ignored targets, the
// last column as target, dW accumulated and overwritten.
TEST(CrossEntropyGpuTest, PaddedStrideRepeatsBitwise) {
  std::mt19937_64 rng(47);
  for (const Case& c : {Case{301, 2048, 50288, 128}, Case{200, 96, 50277, 64}, Case{64, 2048, 50304, 32},
                        Case{70, 64, 301, 16}}) {
    DeviceAllocator alloc;
    std::unique_ptr<GemmContext> gemm;
    CUDA_OK_OR_DIE(GemmContext::Create(&alloc, &gemm));
    const BitwiseInputs in = RandomBitwiseInputs(rng, c);
    LceBuffers b(&alloc, c);
    b.h.Upload(in.h);
    b.w.Upload(in.w);
    b.t.Upload(in.targets);
    auto run = [&](int64_t ld_align, bool overwrite_dw) {
      const LinearCrossEntropyArgs a =
          b.Args(c, in.dw0, 1.f / static_cast<float>(c.tokens), overwrite_dw, /*lean_rows=*/true, ld_align);
      return RunLce(gemm.get(), &alloc, b, a);
    };
    for (const bool overwrite_dw : {false, true}) {
      const std::string tag = "N=" + std::to_string(c.tokens) + " d=" + std::to_string(c.dim) + " V=" +
                              std::to_string(c.vocab) + " chunk " + std::to_string(c.chunk) +
                              (overwrite_dw ? " dW overwrite" : " dW accumulate");
      const LceOutputs first = run(128, overwrite_dw);
      const LceOutputs second = run(128, overwrite_dw);
      ExpectSameBits("ld128 run twice", tag, first, second);
      if (c.vocab % 128 == 0) ExpectSameBits("ld128 vs ld8 (same stride)", tag, first, run(8, overwrite_dw));
    }
  }
}

// No tokens: an overwritten dW comes back zero (the deferred-zero rule: nothing else zeroes it).
TEST(CrossEntropyGpuTest, OverwriteWithNoTokensZeroesDw) {
  DeviceAllocator alloc;
  std::unique_ptr<GemmContext> gemm;
  CUDA_OK_OR_DIE(GemmContext::Create(&alloc, &gemm));
  std::mt19937_64 rng(3);
  const int64_t d = 40, V = 1001;
  DeviceArray<bf16> d_h(&alloc, 8 * d), d_w(&alloc, V * d);
  DeviceArray<float> d_dw(&alloc, V * d), d_tl(&alloc, 1);
  DeviceArray<int32_t> d_t(&alloc, 1);
  DeviceArray<double> d_loss(&alloc, 1);
  d_h.Upload(RandomBf16Values(rng, 8 * d));
  d_w.Upload(RandomBf16Values(rng, V * d));
  d_dw.Poison();
  LinearCrossEntropyArgs a;
  a.tokens = 0;
  a.dim = d;
  a.vocab = V;
  a.h = d_h.get();
  a.w = d_w.get();
  a.targets = d_t.get();
  a.token_loss = d_tl.get();
  a.loss_sum = d_loss.get();
  a.dw = d_dw.get();
  a.overwrite_dw = true;
  CudaResult r = LinearCrossEntropy(gemm.get(), &alloc, a, nullptr);
  ASSERT_TRUE(r.ok()) << r.message;
  const auto dw = d_dw.Download();
  double worst = 0;
  for (float x : dw) worst = std::isfinite(x) ? std::max(worst, double(std::fabs(x))) : 1e30;
  EXPECT_TRUE(Report("linear+CE no tokens: dW zeroed", "V=1001 d=40", worst, 0.0));
  EXPECT_EQ(d_loss.Download()[0], 0.0);
}

}  // namespace
}  // namespace gyre::cuda
