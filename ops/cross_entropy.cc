#include "ops/cross_entropy.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "ops/cuda_backend.h"
#include "ops/cuda_infer.h"
#include "ops/elementwise.h"
#include "ops/gemm.h"
#include "ops/layers.h"
#include "ops/parallel.h"

namespace gyre::ops {
namespace {

void CheckArgs(const Tensor& h, const Tensor& w, std::span<const int32_t> targets) {
  if (!IsCuda(h)) CheckCpu(h, "lm_head_cross_entropy");
  GYRE_CHECK(w.rank() == 2 && h.cols() == w.dim(1) && h.dtype() == w.dtype() && h.device() == w.device(),
             "cross entropy: h %s, W %s", ShapeString(h.shape()).c_str(), ShapeString(w.shape()).c_str());
  GYRE_CHECK(static_cast<int64_t>(targets.size()) == h.rows(), "cross entropy: %zu targets for %ld rows",
             targets.size(), (long)h.rows());
  for (int32_t t : targets) GYRE_CHECK(t < w.dim(0), "target %d outside vocabulary %ld", t, (long)w.dim(0));
}

template <typename T>
CrossEntropyResult FusedCpu(const Tensor& h, const Tensor& w, std::span<const int32_t> targets,
                            double loss_scale, const CrossEntropyOptions& opt, Tensor* dh, Tensor* dw) {
  const int64_t N = h.rows(), d = h.cols(), V = w.dim(0);
  const int64_t vc = std::min(opt.vocab_chunk, V), rb = std::min(opt.row_block, std::max<int64_t>(N, 1));
  const T* hp = h.data<T>();
  const T* wp = w.data<T>();
  std::vector<T> logits(static_cast<size_t>(rb * vc));
  std::vector<double> m(rb), s(rb), target_logit(rb);
  CrossEntropyResult result;
  const bool backward = dh != nullptr || dw != nullptr;
  const double cap = opt.logit_soft_cap;
  if (dh != nullptr) *dh = Tensor::Zeros(h.shape(), h.dtype());
  if (dw != nullptr && opt.overwrite_dw) dw->SetZero();  // in place: dw may be a view
  for (int64_t r0 = 0; r0 < N; r0 += rb) {
    const int64_t rows = std::min(rb, N - r0);
    std::fill(m.begin(), m.end(), -std::numeric_limits<double>::infinity());
    std::fill(s.begin(), s.end(), 0.0);
    std::fill(target_logit.begin(), target_logit.end(), 0.0);
    // Pass 1: online log-sum-exp over vocabulary chunks.
    for (int64_t v0 = 0; v0 < V; v0 += vc) {
      const int64_t cols = std::min(vc, V - v0);
      Gemm<T>(false, true, rows, cols, d, T(1), hp + r0 * d, d, wp + v0 * d, d, T(0), logits.data(), cols);
      ParallelFor(rows, [&](int64_t r) {
        T* l = logits.data() + r * cols;
        if (cap > 0)
          for (int64_t c = 0; c < cols; ++c) l[c] = static_cast<T>(SoftCapValue(l[c], cap));
        double cmax = -std::numeric_limits<double>::infinity();
        for (int64_t c = 0; c < cols; ++c) cmax = std::max(cmax, static_cast<double>(l[c]));
        const double new_m = std::max(m[r], cmax);
        double sum = 0;
        for (int64_t c = 0; c < cols; ++c) sum += std::exp(static_cast<double>(l[c]) - new_m);
        s[r] = s[r] * std::exp(m[r] - new_m) + sum;
        m[r] = new_m;
        const int32_t t = targets[r0 + r];
        if (t >= v0 && t < v0 + cols) target_logit[r] = l[t - v0];
      });
    }
    for (int64_t r = 0; r < rows; ++r) {
      if (targets[r0 + r] < 0) continue;
      result.loss += loss_scale * (m[r] + std::log(s[r]) - target_logit[r]);
      result.tokens++;
    }
    if (!backward) continue;
    // Pass 2: recompute logits, G = scale * (softmax - onehot), accumulate dh and dW.
    for (int64_t v0 = 0; v0 < V; v0 += vc) {
      const int64_t cols = std::min(vc, V - v0);
      // With a single vocabulary chunk the buffer still holds pass 1's logits (capped ones: the
      // cap's slope needs the raw logits, so those are recomputed).
      if (vc < V || cap > 0) {
        Gemm<T>(false, true, rows, cols, d, T(1), hp + r0 * d, d, wp + v0 * d, d, T(0), logits.data(), cols);
      }
      ParallelFor(rows, [&](int64_t r) {
        T* l = logits.data() + r * cols;
        const int32_t t = targets[r0 + r];
        if (t < 0) {
          std::fill(l, l + cols, T(0));
          return;
        }
        const double lse = m[r] + std::log(s[r]);
        for (int64_t c = 0; c < cols; ++c) {
          const double raw = static_cast<double>(l[c]);
          double g = std::exp((cap > 0 ? SoftCapValue(raw, cap) : raw) - lse);
          if (v0 + c == t) g -= 1.0;
          if (cap > 0) g *= SoftCapSlope(raw, cap);
          l[c] = static_cast<T>(loss_scale * g);
        }
      });
      if (dh != nullptr) {
        Gemm<T>(false, false, rows, d, cols, T(1), logits.data(), cols, wp + v0 * d, d, T(1),
                dh->data<T>() + r0 * d, d);
      }
      if (dw != nullptr) {
        Gemm<T>(true, false, cols, d, rows, T(1), logits.data(), cols, hp + r0 * d, d, T(1),
                dw->data<T>() + v0 * d, d);
      }
    }
  }
  return result;
}

template <typename T>
CrossEntropyResult NaiveCpu(const Tensor& h, const Tensor& w, std::span<const int32_t> targets,
                            double loss_scale, Tensor* dh, Tensor* dw, double cap) {
  const int64_t N = h.rows(), d = h.cols(), V = w.dim(0);
  std::vector<T> logits(static_cast<size_t>(N * V));
  Gemm<T>(false, true, N, V, d, T(1), h.data<T>(), d, w.data<T>(), d, T(0), logits.data(), V);
  std::vector<T> slope;  // the cap's d l / d raw, per logit
  if (cap > 0) {
    slope.resize(logits.size());
    for (size_t i = 0; i < logits.size(); ++i) {
      slope[i] = static_cast<T>(SoftCapSlope(logits[i], cap));
      logits[i] = static_cast<T>(SoftCapValue(logits[i], cap));
    }
  }
  CrossEntropyResult result;
  for (int64_t r = 0; r < N; ++r) {
    T* l = logits.data() + r * V;
    const int32_t t = targets[r];
    if (t < 0) {
      std::fill(l, l + V, T(0));
      continue;
    }
    double mx = -std::numeric_limits<double>::infinity();
    for (int64_t c = 0; c < V; ++c) mx = std::max(mx, static_cast<double>(l[c]));
    double sum = 0;
    for (int64_t c = 0; c < V; ++c) sum += std::exp(l[c] - mx);
    const double lse = mx + std::log(sum);
    result.loss += loss_scale * (lse - l[t]);
    result.tokens++;
    for (int64_t c = 0; c < V; ++c) {
      const double g = loss_scale * (std::exp(l[c] - lse) - (c == t ? 1.0 : 0.0));
      l[c] = static_cast<T>(cap > 0 ? g * slope[r * V + c] : g);
    }
  }
  if (dh != nullptr) {
    *dh = Tensor::Empty(h.shape(), h.dtype());
    Gemm<T>(false, false, N, d, V, T(1), logits.data(), V, w.data<T>(), d, T(0), dh->data<T>(), d);
  }
  if (dw != nullptr) Gemm<T>(true, false, V, d, N, T(1), logits.data(), V, h.data<T>(), d, T(1), dw->data<T>(), d);
  return result;
}

}  // namespace

CrossEntropyResult FusedLmHeadCrossEntropy(const Tensor& h, const Tensor& w,
                                           std::span<const int32_t> targets, double loss_scale,
                                           const CrossEntropyOptions& options, Tensor* dh, Tensor* dw) {
  CheckArgs(h, w, targets);
  GYRE_CHECK(options.vocab_chunk > 0 && options.row_block > 0, "cross entropy chunk sizes");
  if (IsCuda(h)) {
    // bf16 h and W (the head's compute copy), fp32 dW; the kernel bounds its logits buffer itself.
    GYRE_CHECK(h.dtype() == DType::kBF16, "CUDA cross entropy needs bf16 h and W");
    CrossEntropyResult result;
    for (int32_t t : targets) result.tokens += t >= 0 ? 1 : 0;
    if (dh != nullptr) *dh = Tensor::Empty(h.shape(), DType::kBF16, Device::kCuda);
    if (dw != nullptr) GYRE_CHECK(IsCuda(*dw) && dw->dtype() == DType::kF32, "CUDA cross entropy dW must be f32");
    const bool overwrite = dw != nullptr && options.overwrite_dw;
    if (h.rows() == 0) {
      if (overwrite) dw->SetZero();
      return result;
    }
    void* dh_raw = dh != nullptr ? dh->raw() : nullptr;
    float* dw_raw = dw != nullptr ? dw->data<float>() : nullptr;
    const auto cap = static_cast<float>(options.logit_soft_cap);
    if (options.defer_loss) {
      result.loss = std::numeric_limits<double>::quiet_NaN();
      result.deferred_index = Cuda().LinearCrossEntropyDeferred(h.raw(), w.raw(), h.rows(), h.cols(), w.dim(0),
                                                                targets.data(), loss_scale, dh_raw, dw_raw, overwrite,
                                                                cap);
      return result;
    }
    result.loss = Cuda().LinearCrossEntropy(h.raw(), w.raw(), h.rows(), h.cols(), w.dim(0), targets.data(), loss_scale,
                                            dh_raw, dw_raw, overwrite, cap);
    return result;
  }
  return DispatchFloat(h.dtype(), [&]<typename T>() {
    return FusedCpu<T>(h, w, targets, loss_scale, options, dh, dw);
  });
}

CrossEntropyResult NaiveLmHeadCrossEntropy(const Tensor& h, const Tensor& w,
                                           std::span<const int32_t> targets, double loss_scale,
                                           Tensor* dh, Tensor* dw, double logit_soft_cap) {
  CheckArgs(h, w, targets);
  CheckCpu(h, "naive_lm_head_cross_entropy");
  GYRE_CHECK(logit_soft_cap >= 0, "logit soft cap %g", logit_soft_cap);
  return DispatchFloat(h.dtype(),
                       [&]<typename T>() { return NaiveCpu<T>(h, w, targets, loss_scale, dh, dw, logit_soft_cap); });
}

Tensor LmHeadLogits(const Tensor& h, const Tensor& w, double logit_soft_cap) {
  Tensor logits = LinearForward(h, w);
  if (logit_soft_cap == 0.0) return logits;
  if (!IsCuda(logits)) return SoftCap(logits, logit_soft_cap);
  // CUDA (bf16 logits): capped in place by one elementwise launch, fp32 math, one rounding.
  GYRE_CHECK(logits.dtype() == DType::kBF16, "LM head: CUDA logits of dtype %s", DTypeName(logits.dtype()));
  CudaInfer().SoftCap(logits.raw(), logits.numel(), static_cast<float>(logit_soft_cap));
  return logits;
}

}  // namespace gyre::ops
