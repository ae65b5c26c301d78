// Needs a GPU: fused linear + cross-entropy against a float64 reference that materialises all
// logits, at the odd vocabularies 50257 and 50277 (and 60013, past the shared-memory row
// kernel), several chunks with a ragged tail, ignored targets, a dW that accumulates onto
// nonzero values, and the loss-only mode.
#include "kernels/cuda/cross_entropy.h"

#include <cmath>
#include <string>

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

TEST(CrossEntropyGpuTest, MatchesMaterialisedFloat64Reference) {
  std::mt19937_64 rng(11);
  // The first three take the shared-memory row kernel; V = 60013 (240 KB rows) the two-read one.
  for (const Case& c : {Case{300, 96, 50257, 128}, Case{130, 77, 50277, 1024}, Case{67, 256, 50304, 32},
                        Case{41, 64, 60013, 16}}) {
    DeviceAllocator alloc;
    std::unique_ptr<GemmContext> gemm;
    CUDA_OK_OR_DIE(GemmContext::Create(&alloc, &gemm));
    const std::string shape = "N=" + std::to_string(c.tokens) + " d=" + std::to_string(c.dim) +
                              " V=" + std::to_string(c.vocab) + " chunk=" + std::to_string(c.chunk);
    const auto h = RandomBf16Values(rng, c.tokens * c.dim);
    const auto w = RandomBf16Values(rng, c.vocab * c.dim, 3.f / std::sqrt(float(c.dim)));
    const auto dw0 = RandomFloats(rng, c.vocab * c.dim, 1e-3f);
    std::vector<int32_t> targets(c.tokens);
    int64_t counted = 0;
    for (int64_t r = 0; r < c.tokens; ++r) {
      targets[r] = (r % 11 == 5) ? -1 : static_cast<int32_t>(rng() % c.vocab);
      if (r == 1) targets[r] = static_cast<int32_t>(c.vocab - 1);  // last column
      counted += targets[r] >= 0;
    }
    const float loss_scale = 1.f / static_cast<float>(counted);
    DeviceArray<bf16> d_h(&alloc, h.size()), d_w(&alloc, w.size()), d_dh(&alloc, h.size());
    DeviceArray<float> d_dw(&alloc, dw0.size()), d_tl(&alloc, c.tokens);
    DeviceArray<int32_t> d_t(&alloc, c.tokens);
    DeviceArray<double> d_loss(&alloc, 1);
    d_h.Upload(h);
    d_w.Upload(w);
    d_dw.Upload(dw0);
    d_t.Upload(std::vector<float>(targets.begin(), targets.end()));
    d_dh.Poison();
    d_tl.Poison();
    d_loss.Poison();
    LinearCrossEntropyArgs a;
    a.tokens = c.tokens;
    a.dim = c.dim;
    a.vocab = c.vocab;
    a.h = d_h.get();
    a.w = d_w.get();
    a.targets = d_t.get();
    a.loss_scale = loss_scale;
    a.token_loss = d_tl.get();
    a.loss_sum = d_loss.get();
    a.dh = d_dh.get();
    a.dw = d_dw.get();
    a.chunk_tokens = c.chunk;
    CudaResult r = LinearCrossEntropy(gemm.get(), &alloc, a, nullptr);
    ASSERT_TRUE(r.ok()) << r.message;
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);

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
    const auto got_dw = d_dw.Download();
    std::vector<float> got_inc(got_dw.size());
    for (size_t i = 0; i < got_dw.size(); ++i) got_inc[i] = static_cast<float>(double(got_dw[i]) - dw0[i]);
    const double got_loss = d_loss.Download()[0];
    EXPECT_TRUE(Report("linear+CE loss", shape, std::fabs(got_loss - loss) / std::fabs(loss), testing::kTolF32Accum));
    EXPECT_TRUE(Report("linear+CE token losses", shape, RelError(d_tl.Download(), tl), testing::kTolF32Accum));
    EXPECT_TRUE(Report("linear+CE dh (bf16 G)", shape, RelError(d_dh.Download(), dh), testing::kTolBf16));
    EXPECT_TRUE(Report("linear+CE dW increment (bf16 G)", shape, RelError(got_inc, dw_inc), testing::kTolBf16));

    // Loss only: same loss, dh/dW untouched.
    LinearCrossEntropyArgs lo = a;
    lo.dh = nullptr;
    lo.dw = nullptr;
    d_loss.Poison();
    r = LinearCrossEntropy(gemm.get(), &alloc, lo, nullptr);
    ASSERT_TRUE(r.ok()) << r.message;
    const double got_loss2 = d_loss.Download()[0];
    EXPECT_TRUE(Report("linear+CE loss-only mode", shape, std::fabs(got_loss2 - loss) / std::fabs(loss),
                       testing::kTolF32Accum));
  }
}

}  // namespace
}  // namespace gyre::cuda
