#include "ops/layers.h"

#include <cmath>

#include "ops/cuda_backend.h"
#include "ops/gemm.h"
#include "ops/parallel.h"

namespace gyre::ops {
namespace {

void CheckCudaBf16(const Tensor& t, const char* what) {
  GYRE_CHECK(IsCuda(t) && t.dtype() == DType::kBF16, "%s must be a CUDA bf16 tensor (is %s %s)", what,
             DeviceName(t.device()), DTypeName(t.dtype()));
}

int CudaAct(Activation act) {
  GYRE_CHECK(act == Activation::kSilu || act == Activation::kGelu, "no CUDA gated kernel for this activation");
  return act == Activation::kSilu ? 0 : 1;
}

const void* At(const Tensor& t, int64_t elements) {
  return static_cast<const char*>(t.raw()) + elements * static_cast<int64_t>(DTypeSize(t.dtype()));
}
void* MutAt(const Tensor& t, int64_t elements) {
  return static_cast<char*>(t.raw()) + elements * static_cast<int64_t>(DTypeSize(t.dtype()));
}

}  // namespace

// ---------------------------------------------------------------- Embedding

Embedding::Embedding(const BuildContext& ctx, int64_t vocab, int64_t dim)
    : weight_(ctx.store->Create(ctx.Name("weight"), {vocab, dim}, ParamKind::kEmbedding)) {}

Tensor Embedding::Forward(std::span<const int32_t> ids) {
  const Tensor& w = weight_->value;
  const int64_t vocab = w.dim(0), dim = w.dim(1);
  ids_.assign(ids.begin(), ids.end());
  if (IsCuda(w)) {
    for (int32_t id : ids) GYRE_CHECK(id >= 0 && id < vocab, "token id %d outside vocabulary %ld", id, (long)vocab);
    Tensor y = Tensor::Empty({static_cast<int64_t>(ids.size()), dim}, DType::kBF16, Device::kCuda);
    if (!ids.empty()) Cuda().EmbeddingForward(ids.data(), ids.size(), weight_->compute.raw(), vocab, dim, y.raw());
    return y;
  }
  CheckCpu(w, "embedding");
  Tensor y = Tensor::Empty({static_cast<int64_t>(ids.size()), dim}, w.dtype());
  DispatchFloat(w.dtype(), [&]<typename T>() {
    const T* table = w.data<T>();
    T* out = y.data<T>();
    for (size_t r = 0; r < ids.size(); ++r) {
      GYRE_CHECK(ids[r] >= 0 && ids[r] < vocab, "token id %d outside vocabulary %ld", ids[r], (long)vocab);
      std::copy(table + ids[r] * dim, table + (ids[r] + 1) * dim, out + r * dim);
    }
  });
  return y;
}

void Embedding::Backward(const Tensor& dy) {
  Tensor& gw = weight_->grad;
  const int64_t dim = gw.dim(1);
  GYRE_CHECK(dy.rows() == static_cast<int64_t>(ids_.size()) && dy.cols() == dim, "embedding backward shape");
  if (IsCuda(gw)) {
    CheckCudaBf16(dy, "embedding dy");
    // A stale gradient is overwritten: the kernel writes every row (unseen tokens' rows as 0).
    const bool overwrite = FirstGradWrite(weight_);
    if (!ids_.empty()) {
      Cuda().EmbeddingBackward(ids_.data(), ids_.size(), dy.raw(), gw.data<float>(), gw.dim(0), dim, overwrite);
    } else if (overwrite) {
      gw.SetZero();
    }
    return;
  }
  ZeroGradIfStale(weight_);  // the CPU scatter-add: rows of unseen tokens are not written
  DispatchFloat(gw.dtype(), [&]<typename T>() {
    T* g = gw.data<T>();
    const T* d = dy.data<T>();
    for (size_t r = 0; r < ids_.size(); ++r) {
      T* row = g + ids_[r] * dim;
      for (int64_t c = 0; c < dim; ++c) row[c] += d[r * dim + c];
    }
  });
}

// ---------------------------------------------------------------- Linear

Tensor LinearForwardAdd(const Tensor& x, const Tensor& w, const Tensor& residual) {
  const int64_t in = w.dim(1), out = w.dim(0);
  if (!IsCuda(x)) return Add(residual, LinearForward(x, w));
  CheckCudaBf16(x, "linear x");
  CheckCudaBf16(w, "linear W (the compute copy)");
  CheckCudaBf16(residual, "linear residual");
  GYRE_CHECK(x.cols() == in && residual.rows() == x.rows() && residual.cols() == out,
             "linear+residual: x %s W %s residual %s", ShapeString(x.shape()).c_str(),
             ShapeString(w.shape()).c_str(), ShapeString(residual.shape()).c_str());
  Tensor y = Tensor::Empty(residual.shape(), DType::kBF16, Device::kCuda);
  if (x.rows() == 0) return y;
  CudaGemm g;  // Y = X Wᵀ + residual: the add rides in the GEMM's store (beta = 1, C = residual)
  g.trans_b = true;
  g.m = x.rows(); g.n = out; g.k = in;
  g.a = x.raw(); g.lda = in;
  g.b = w.raw(); g.ldb = in;
  g.c = y.raw(); g.ldc = out;
  g.beta = 1.f; g.c_in = residual.raw();
  Cuda().Gemm(g);
  return y;
}

Tensor LinearForward(const Tensor& x, const Tensor& w) {
  const int64_t in = w.dim(1), out = w.dim(0);
  if (IsCuda(x)) {
    CheckCudaBf16(x, "linear x");
    CheckCudaBf16(w, "linear W (the compute copy)");
    GYRE_CHECK(x.cols() == in, "linear: x %s vs W %s", ShapeString(x.shape()).c_str(), ShapeString(w.shape()).c_str());
    Shape shape = x.shape();
    shape.back() = out;
    Tensor y = Tensor::Empty(shape, DType::kBF16, Device::kCuda);
    if (x.rows() == 0) return y;
    CudaGemm g;
    g.trans_b = true;
    g.m = x.rows(); g.n = out; g.k = in;
    g.a = x.raw(); g.lda = in;
    g.b = w.raw(); g.ldb = in;
    g.c = y.raw(); g.ldc = out;
    Cuda().Gemm(g);
    return y;
  }
  CheckCpu(x, "linear");
  GYRE_CHECK(x.cols() == in && x.dtype() == w.dtype(), "linear: x %s vs W %s",
             ShapeString(x.shape()).c_str(), ShapeString(w.shape()).c_str());
  Shape shape = x.shape();
  shape.back() = out;
  Tensor y = Tensor::Empty(shape, x.dtype());
  DispatchFloat(x.dtype(), [&]<typename T>() {
    Gemm<T>(false, true, x.rows(), out, in, T(1), x.data<T>(), in, w.data<T>(), in, T(0), y.data<T>(), out);
  });
  return y;
}

Tensor LinearBackward(const Tensor& x, const Tensor& w, const Tensor& dy, Tensor* dw, bool dw_overwrite) {
  const int64_t in = w.dim(1), out = w.dim(0), rows = x.rows();
  GYRE_CHECK(dy.rows() == rows && dy.cols() == out, "linear backward: dy %s", ShapeString(dy.shape()).c_str());
  if (rows == 0 && dw != nullptr && dw_overwrite) dw->SetZero();  // the empty sum
  if (IsCuda(x)) {
    CheckCudaBf16(dy, "linear dy");
    CheckCudaBf16(w, "linear W");
    Tensor dx = Tensor::Empty(x.shape(), DType::kBF16, Device::kCuda);
    if (rows == 0) return dx;
    if (dw != nullptr) {
      GYRE_CHECK(IsCuda(*dw) && dw->dtype() == DType::kF32, "linear dW must be CUDA f32");
      CudaGemm g;  // dW [out, in] = (or +=) dYᵀ X
      g.trans_a = true;
      g.m = out; g.n = in; g.k = rows;
      g.a = dy.raw(); g.lda = out;
      g.b = x.raw(); g.ldb = in;
      g.c = dw->raw(); g.ldc = in; g.c_f32 = true; g.beta = dw_overwrite ? 0.f : 1.f;
      Cuda().Gemm(g);
    }
    CudaGemm g;  // dX [rows, in] = dY W
    g.m = rows; g.n = in; g.k = out;
    g.a = dy.raw(); g.lda = out;
    g.b = w.raw(); g.ldb = in;
    g.c = dx.raw(); g.ldc = in;
    Cuda().Gemm(g);
    return dx;
  }
  Tensor dx = Tensor::Empty(x.shape(), x.dtype());
  DispatchFloat(x.dtype(), [&]<typename T>() {
    if (dw != nullptr && rows > 0) {
      Gemm<T>(true, false, out, in, rows, T(1), dy.data<T>(), out, x.data<T>(), in, T(dw_overwrite ? 0 : 1),
              dw->data<T>(), in);
    }
    Gemm<T>(false, false, rows, in, out, T(1), dy.data<T>(), out, w.data<T>(), in, T(0), dx.data<T>(), in);
  });
  return dx;
}

Linear::Linear(const BuildContext& ctx, int64_t in, int64_t out, bool bias)
    : in_(in), out_(out), weight_(ctx.store->Create(ctx.Name("weight"), {out, in}, ParamKind::kWeight)) {
  if (bias) bias_ = ctx.store->Create(ctx.Name("bias"), {out}, ParamKind::kBias);
  // PyTorch's default (kaiming-uniform with a = sqrt(5)): U(-1/sqrt(in), 1/sqrt(in)); blocks
  // re-initialise per the papers where they differ.
  const double bound = 1.0 / std::sqrt(static_cast<double>(in));
  InitUniform(&weight_->value, -bound, bound, ctx.rng);
}

Tensor Linear::Forward(const Tensor& x) {
  x_ = x;
  if (IsCuda(x)) {
    Tensor y = LinearForward(x, weight_->compute);
    // The fp32 master bias added in the bf16 output's rounding (ops/recurrent_cuda.h).
    if (bias_ != nullptr && y.rows() > 0) Cuda().AddColumnBias(y.raw(), y.rows(), out_, out_, bias_->value.data<float>());
    return y;
  }
  Tensor y = LinearForward(x, weight_->value);
  if (bias_ != nullptr) {
    DispatchFloat(y.dtype(), [&]<typename T>() {
      T* p = y.data<T>();
      const T* b = bias_->value.data<T>();
      for (int64_t r = 0; r < y.rows(); ++r)
        for (int64_t c = 0; c < out_; ++c) p[r * out_ + c] += b[c];
    });
  }
  return y;
}

Tensor Linear::ForwardAdd(const Tensor& x, const Tensor& residual) {
  if (!IsCuda(x) || bias_ != nullptr) return Add(residual, Forward(x));
  x_ = x;
  return LinearForwardAdd(x, weight_->compute, residual);
}

Tensor Linear::Backward(const Tensor& dy) {
  GYRE_CHECK(x_.defined(), "Linear::Backward without Forward");
  if (IsCuda(x_)) {
    if (bias_ != nullptr) ZeroGradIfStale(bias_);  // ColumnSum adds
    if (bias_ != nullptr && dy.rows() > 0) {
      CheckCudaBf16(dy, "linear dy");
      Cuda().ColumnSum(dy.raw(), dy.rows(), out_, out_, bias_->grad.data<float>());
    }
    Tensor dx = LinearBackward(x_, weight_->compute, dy, &weight_->grad, FirstGradWrite(weight_));
    x_ = Tensor();
    return dx;
  }
  if (bias_ != nullptr) {
    ZeroGradIfStale(bias_);
    DispatchFloat(dy.dtype(), [&]<typename T>() {
      const T* d = dy.data<T>();
      T* gb = bias_->grad.data<T>();
      for (int64_t r = 0; r < dy.rows(); ++r)
        for (int64_t c = 0; c < out_; ++c) gb[c] += d[r * out_ + c];
    });
  }
  Tensor dx = LinearBackward(x_, weight_->value, dy, &weight_->grad, FirstGradWrite(weight_));
  x_ = Tensor();
  return dx;
}

// ---------------------------------------------------------------- BlockDiagonalLinear

BlockDiagonalLinear::BlockDiagonalLinear(const BuildContext& ctx, int64_t blocks, int64_t block_in,
                                         int64_t block_out)
    : blocks_(blocks), block_in_(block_in), block_out_(block_out),
      weight_(ctx.store->Create(ctx.Name("weight"), {blocks, block_out, block_in}, ParamKind::kWeight)) {
  const double bound = 1.0 / std::sqrt(static_cast<double>(block_in));
  InitUniform(&weight_->value, -bound, bound, ctx.rng);
}

Tensor BlockDiagonalLinear::Forward(const Tensor& x) {
  CheckCpu(x, "block_diagonal_linear");
  const int64_t in = blocks_ * block_in_, out = blocks_ * block_out_;
  GYRE_CHECK(x.cols() == in, "block-diagonal linear: x %s, expected %ld features", ShapeString(x.shape()).c_str(), (long)in);
  x_ = x;
  Shape shape = x.shape();
  shape.back() = out;
  Tensor y = Tensor::Empty(shape, x.dtype());
  DispatchFloat(x.dtype(), [&]<typename T>() {
    const T* w = weight_->value.data<T>();
    for (int64_t b = 0; b < blocks_; ++b) {
      Gemm<T>(false, true, x.rows(), block_out_, block_in_, T(1), x.data<T>() + b * block_in_, in,
              w + b * block_out_ * block_in_, block_in_, T(0), y.data<T>() + b * block_out_, out);
    }
  });
  return y;
}

Tensor BlockDiagonalLinear::Backward(const Tensor& dy) {
  GYRE_CHECK(x_.defined(), "BlockDiagonalLinear::Backward without Forward");
  const int64_t in = blocks_ * block_in_, out = blocks_ * block_out_, rows = x_.rows();
  Tensor dx = Tensor::Empty(x_.shape(), x_.dtype());
  if (rows == 0) ZeroGradIfStale(weight_);
  const bool overwrite = FirstGradWrite(weight_);  // each block's GEMM sets its whole slice
  DispatchFloat(x_.dtype(), [&]<typename T>() {
    const T* w = weight_->value.data<T>();
    T* gw = weight_->grad.data<T>();
    for (int64_t b = 0; b < blocks_; ++b) {
      Gemm<T>(true, false, block_out_, block_in_, rows, T(1), dy.data<T>() + b * block_out_, out,
              x_.data<T>() + b * block_in_, in, T(overwrite ? 0 : 1), gw + b * block_out_ * block_in_, block_in_);
      Gemm<T>(false, false, rows, block_in_, block_out_, T(1), dy.data<T>() + b * block_out_, out,
              w + b * block_out_ * block_in_, block_in_, T(0), dx.data<T>() + b * block_in_, in);
    }
  });
  x_ = Tensor();
  return dx;
}

// ---------------------------------------------------------------- Norm

Norm::Norm(const BuildContext& ctx, int64_t dim, NormOptions options) : dim_(dim), opt_(options) {
  GYRE_CHECK(dim % opt_.groups == 0, "norm dim %ld not divisible into %ld groups", (long)dim, (long)opt_.groups);
  if (opt_.weight) {
    weight_ = ctx.store->Create(ctx.Name("weight"), {dim}, ParamKind::kNorm);
    InitConstant(&weight_->value, opt_.weight_offset != 0.0 ? 0.0 : 1.0);
  }
  if (opt_.bias) bias_ = ctx.store->Create(ctx.Name("bias"), {dim}, ParamKind::kBias);
}

Tensor Norm::Forward(const Tensor& x) {
  GYRE_CHECK(x.cols() == dim_, "norm: x %s, dim %ld", ShapeString(x.shape()).c_str(), (long)dim_);
  const int64_t rows = x.rows(), groups = opt_.groups, gs = dim_ / groups;
  x_ = x;
  if (IsCuda(x)) {
    CheckCudaBf16(x, "norm x");
    const bool layer = opt_.kind == NormOptions::kLayer;
    if (groups != 1 || opt_.weight_offset != 0.0) return ForwardGroupedCuda(x);
    rstd_ = Tensor::Empty({rows}, DType::kF32, Device::kCuda);
    if (layer) mean_ = Tensor::Empty({rows}, DType::kF32, Device::kCuda);
    Tensor y = Tensor::Empty(x.shape(), DType::kBF16, Device::kCuda);
    if (rows > 0) {
      Cuda().NormForward(layer, rows, dim_, opt_.eps, x.raw(), nullptr, nullptr,
                         weight_ ? weight_->compute.raw() : nullptr, bias_ ? bias_->compute.raw() : nullptr, y.raw(),
                         layer ? mean_.data<float>() : nullptr, rstd_.data<float>());
    }
    return y;
  }
  rstd_ = Tensor::Empty({rows, groups}, DType::kF64);
  Tensor y = Tensor::EmptyLike(x);
  const bool layer = opt_.kind == NormOptions::kLayer;
  DispatchFloat(x.dtype(), [&]<typename T>() {
    const T* in = x.data<T>();
    T* out = y.data<T>();
    double* rs = rstd_.data<double>();
    const T* w = weight_ ? weight_->value.data<T>() : nullptr;
    const T* b = bias_ ? bias_->value.data<T>() : nullptr;
    ParallelFor(rows, [&](int64_t r) {
      for (int64_t g = 0; g < groups; ++g) {
        const T* xr = in + r * dim_ + g * gs;
        T* yr = out + r * dim_ + g * gs;
        double mean = 0;
        if (layer) {
          for (int64_t i = 0; i < gs; ++i) mean += xr[i];
          mean /= gs;
        }
        double var = 0;
        for (int64_t i = 0; i < gs; ++i) var += (xr[i] - mean) * (xr[i] - mean);
        var /= gs;
        const double rstd = 1.0 / std::sqrt(var + opt_.eps);
        rs[r * groups + g] = rstd;
        for (int64_t i = 0; i < gs; ++i) {
          const int64_t c = g * gs + i;
          double v = (xr[i] - mean) * rstd;
          if (w) v *= static_cast<double>(w[c]) + opt_.weight_offset;
          if (b) v += b[c];
          yr[i] = static_cast<T>(v);
        }
      }
    });
  });
  return y;
}

Tensor Norm::Backward(const Tensor& dy) {
  GYRE_CHECK(x_.defined(), "Norm::Backward without Forward");
  const int64_t rows = x_.rows(), groups = opt_.groups, gs = dim_ / groups;
  const bool layer = opt_.kind == NormOptions::kLayer;
  if (IsCuda(x_)) {
    CheckCudaBf16(dy, "norm dy");
    if (groups != 1 || opt_.weight_offset != 0.0) return BackwardGroupedCuda(dy);
    Tensor dx = Tensor::Empty(x_.shape(), DType::kBF16, Device::kCuda);
    if (rows == 0) ZeroStaleParamGrads();
    if (rows > 0) {
      Cuda().NormBackward(layer, rows, dim_, dy.raw(), x_.raw(), weight_ ? weight_->compute.raw() : nullptr,
                          layer ? mean_.data<float>() : nullptr, rstd_.data<float>(), nullptr, dx.raw(),
                          weight_ ? weight_->grad.data<float>() : nullptr, bias_ ? bias_->grad.data<float>() : nullptr,
                          FirstParamGradWrite());
    }
    x_ = rstd_ = mean_ = Tensor();
    return dx;
  }
  Tensor dx = Tensor::EmptyLike(x_);
  ZeroStaleParamGrads();  // the loops below add row by row
  DispatchFloat(x_.dtype(), [&]<typename T>() {
    const T* in = x_.data<T>();
    const T* d = dy.data<T>();
    T* out = dx.data<T>();
    const double* rs = rstd_.data<double>();
    const T* w = weight_ ? weight_->value.data<T>() : nullptr;
    ParallelFor(rows, [&](int64_t r) {
      for (int64_t g = 0; g < groups; ++g) {
        const T* xr = in + r * dim_ + g * gs;
        const T* dr = d + r * dim_ + g * gs;
        T* o = out + r * dim_ + g * gs;
        const double rstd = rs[r * groups + g];
        double mean = 0;
        if (layer) {
          for (int64_t i = 0; i < gs; ++i) mean += xr[i];
          mean /= gs;
        }
        // dxhat = dy * scale; dx = rstd * (dxhat - mean(dxhat) [layer] - xhat * mean(dxhat * xhat))
        double sum_dxhat = 0, sum_dxhat_xhat = 0;
        for (int64_t i = 0; i < gs; ++i) {
          const int64_t c = g * gs + i;
          const double scale = w ? static_cast<double>(w[c]) + opt_.weight_offset : 1.0;
          const double dxhat = dr[i] * scale;
          const double xhat = (xr[i] - mean) * rstd;
          sum_dxhat += dxhat;
          sum_dxhat_xhat += dxhat * xhat;
        }
        const double m1 = layer ? sum_dxhat / gs : 0.0, m2 = sum_dxhat_xhat / gs;
        for (int64_t i = 0; i < gs; ++i) {
          const int64_t c = g * gs + i;
          const double scale = w ? static_cast<double>(w[c]) + opt_.weight_offset : 1.0;
          const double xhat = (xr[i] - mean) * rstd;
          o[i] = static_cast<T>(rstd * (dr[i] * scale - m1 - xhat * m2));
        }
      }
    });
    if (weight_ != nullptr || bias_ != nullptr) {
      T* gw = weight_ ? weight_->grad.data<T>() : nullptr;
      T* gb = bias_ ? bias_->grad.data<T>() : nullptr;
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t g = 0; g < groups; ++g) {
          const T* xr = in + r * dim_ + g * gs;
          const T* dr = d + r * dim_ + g * gs;
          double mean = 0;
          if (layer) {
            for (int64_t i = 0; i < gs; ++i) mean += xr[i];
            mean /= gs;
          }
          const double rstd = rs[r * groups + g];
          for (int64_t i = 0; i < gs; ++i) {
            if (gw) gw[g * gs + i] += static_cast<T>(dr[i] * (xr[i] - mean) * rstd);
            if (gb) gb[g * gs + i] += dr[i];
          }
        }
      }
    }
  });
  x_ = Tensor();
  rstd_ = Tensor();
  return dx;
}

Tensor Norm::ForwardAdd(const Tensor& x, const Tensor& residual, Tensor* sum) {
  if (!IsCuda(x) || opt_.groups != 1 || opt_.weight_offset != 0.0) {
    *sum = Add(x, residual);
    return Forward(*sum);
  }
  CheckCudaBf16(x, "norm x");
  CheckCudaBf16(residual, "norm residual");
  GYRE_CHECK(x.cols() == dim_ && residual.numel() == x.numel(), "norm: x %s, residual %s, dim %ld",
             ShapeString(x.shape()).c_str(), ShapeString(residual.shape()).c_str(), (long)dim_);
  const int64_t rows = x.rows();
  const bool layer = opt_.kind == NormOptions::kLayer;
  *sum = Tensor::Empty(x.shape(), DType::kBF16, Device::kCuda);
  x_ = *sum;
  rstd_ = Tensor::Empty({rows}, DType::kF32, Device::kCuda);
  if (layer) mean_ = Tensor::Empty({rows}, DType::kF32, Device::kCuda);
  Tensor y = Tensor::Empty(x.shape(), DType::kBF16, Device::kCuda);
  if (rows > 0) {
    Cuda().NormForward(layer, rows, dim_, opt_.eps, x.raw(), residual.raw(), sum->raw(),
                       weight_ ? weight_->compute.raw() : nullptr, bias_ ? bias_->compute.raw() : nullptr, y.raw(),
                       layer ? mean_.data<float>() : nullptr, rstd_.data<float>());
  }
  return y;
}

Tensor Norm::BackwardAdd(const Tensor& dy, const Tensor& dresidual) {
  if (IsCuda(dy) && (opt_.groups != 1 || opt_.weight_offset != 0.0)) {
    GYRE_CHECK(x_.defined(), "Norm::BackwardAdd without Forward");
    CheckCudaBf16(dy, "norm dy");
    CheckCudaBf16(dresidual, "norm dresidual");
    GYRE_CHECK(dresidual.numel() == x_.numel(), "norm: dresidual %s, x %s", ShapeString(dresidual.shape()).c_str(),
               ShapeString(x_.shape()).c_str());
    return BackwardGroupedCuda(dy, &dresidual);  // the grouped kernel adds it (no separate pass)
  }
  if (!IsCuda(dy) || opt_.groups != 1 || opt_.weight_offset != 0.0) return Add(Backward(dy), dresidual);
  GYRE_CHECK(x_.defined(), "Norm::BackwardAdd without Forward");
  CheckCudaBf16(dy, "norm dy");
  CheckCudaBf16(dresidual, "norm dresidual");
  const int64_t rows = x_.rows();
  const bool layer = opt_.kind == NormOptions::kLayer;
  Tensor dx = Tensor::Empty(x_.shape(), DType::kBF16, Device::kCuda);
  if (rows == 0) ZeroStaleParamGrads();
  if (rows > 0) {
    Cuda().NormBackward(layer, rows, dim_, dy.raw(), x_.raw(), weight_ ? weight_->compute.raw() : nullptr,
                        layer ? mean_.data<float>() : nullptr, rstd_.data<float>(), dresidual.raw(), dx.raw(),
                        weight_ ? weight_->grad.data<float>() : nullptr, bias_ ? bias_->grad.data<float>() : nullptr,
                        FirstParamGradWrite());
  }
  x_ = rstd_ = mean_ = Tensor();
  return dx;
}

// Grouped and 1+w norms on CUDA (ops/recurrent_cuda.h): fp32 statistics [rows, groups], the
// scale read from the fp32 master weight.
// A bias is one more pass: y += b (fp32 master) after the kernel, db += Σ_rows dy before.
Tensor Norm::ForwardGroupedCuda(const Tensor& x) {
  const int64_t rows = x.rows();
  const bool layer = opt_.kind == NormOptions::kLayer;
  rstd_ = Tensor::Empty({rows * opt_.groups}, DType::kF32, Device::kCuda);
  if (layer) mean_ = Tensor::Empty({rows * opt_.groups}, DType::kF32, Device::kCuda);
  Tensor y = Tensor::Empty(x.shape(), DType::kBF16, Device::kCuda);
  GroupNormArgs a;
  a.layer = layer;
  a.rows = rows;
  a.dim = dim_;
  a.groups = opt_.groups;
  a.eps = static_cast<float>(opt_.eps);
  a.weight_offset = static_cast<float>(opt_.weight_offset);
  a.x = x.raw();
  a.weight = weight_ ? weight_->value.data<float>() : nullptr;
  a.y = y.raw();
  a.mean = layer ? mean_.data<float>() : nullptr;
  a.rstd = rstd_.data<float>();
  if (rows > 0) Cuda().GroupNorm(false, a);
  if (bias_ != nullptr && rows > 0) Cuda().AddColumnBias(y.raw(), rows, dim_, dim_, bias_->value.data<float>());
  return y;
}

bool Norm::FirstParamGradWrite() {
  if (weight_ != nullptr && bias_ != nullptr) return FirstGradWrite({weight_, bias_});
  if (weight_ != nullptr) return FirstGradWrite(weight_);
  return bias_ != nullptr && FirstGradWrite(bias_);
}

void Norm::ZeroStaleParamGrads() {
  if (weight_ != nullptr) ZeroGradIfStale(weight_);
  if (bias_ != nullptr) ZeroGradIfStale(bias_);
}

Tensor Norm::BackwardGroupedCuda(const Tensor& dy, const Tensor* dresidual) {
  const int64_t rows = x_.rows();
  if (rows == 0) ZeroStaleParamGrads();
  // The grouped kernel sets every element of dweight when asked (fixed-order column sums,
  // ops/cuda_recurrent.h); ColumnSum only adds into dbias.
  if (bias_ != nullptr) ZeroGradIfStale(bias_);
  const bool layer = opt_.kind == NormOptions::kLayer;
  Tensor dx = Tensor::Empty(x_.shape(), DType::kBF16, Device::kCuda);
  GroupNormArgs a;
  a.layer = layer;
  a.rows = rows;
  a.dim = dim_;
  a.groups = opt_.groups;
  a.eps = static_cast<float>(opt_.eps);
  a.weight_offset = static_cast<float>(opt_.weight_offset);
  a.x = x_.raw();
  a.weight = weight_ ? weight_->value.data<float>() : nullptr;
  a.mean = layer ? mean_.data<float>() : nullptr;
  a.rstd = rstd_.data<float>();
  a.dy = dy.raw();
  a.dx = dx.raw();
  a.dresidual = dresidual != nullptr ? dresidual->raw() : nullptr;
  a.dweight = weight_ ? weight_->grad.data<float>() : nullptr;
  a.overwrite_dparams = weight_ != nullptr && rows > 0 && FirstGradWrite(weight_);
  if (rows > 0) Cuda().GroupNorm(true, a);
  if (bias_ != nullptr && rows > 0) Cuda().ColumnSum(dy.raw(), rows, dim_, dim_, bias_->grad.data<float>());
  x_ = rstd_ = mean_ = Tensor();
  return dx;
}

// ---------------------------------------------------------------- GatedMlp

GatedMlp::GatedMlp(const BuildContext& ctx, int64_t dim, int64_t hidden, Activation act)
    : act_(act),
      store_(ctx.store),
      gate_(ctx.Sub("gate_proj"), dim, hidden, false),
      up_(ctx.Sub("up_proj"), dim, hidden, false),
      down_(ctx.Sub("down_proj"), hidden, dim, false) {}

Tensor GatedMlp::Forward(const Tensor& x) { return ForwardImpl(x, nullptr); }

Tensor GatedMlp::ForwardAdd(const Tensor& x, const Tensor& residual) { return ForwardImpl(x, &residual); }

Tensor GatedMlp::ForwardImpl(const Tensor& x, const Tensor* residual) {
  if (IsCuda(x)) {
    const int64_t rows = x.rows(), hidden = gate_.out();
    Shape hshape = x.shape();
    hshape.back() = hidden;
    Tensor h = Tensor::Empty(hshape, DType::kBF16, Device::kCuda);
    Tensor w, gw;
    if (store_->AdjacentSpan({gate_.weight(), up_.weight()}, &w, &gw)) {
      // gate and up are one [2 hidden, dim] matrix: one GEMM into [rows, 2 hidden].
      x_ = x;
      g_ = LinearForward(x, w);
      u_ = Tensor();
      if (rows > 0) Cuda().GatedForward(CudaAct(act_), rows, hidden, g_.raw(), At(g_, hidden), 2 * hidden, h.raw(), hidden);
    } else {
      g_ = gate_.Forward(x);
      u_ = up_.Forward(x);
      if (rows > 0) Cuda().GatedForward(CudaAct(act_), rows, hidden, g_.raw(), u_.raw(), hidden, h.raw(), hidden);
    }
    return residual ? down_.ForwardAdd(h, *residual) : down_.Forward(h);
  }
  g_ = gate_.Forward(x);
  u_ = up_.Forward(x);
  a_ = Activate(act_, g_);
  Tensor y = down_.Forward(Mul(a_, u_));
  return residual ? Add(*residual, y) : y;
}

Tensor GatedMlp::Backward(const Tensor& dy) {
  if (IsCuda(dy)) {
    Tensor dh = down_.Backward(dy);
    const int64_t rows = dh.rows(), hidden = gate_.out();
    Tensor dx;
    if (x_.defined()) {
      Tensor w, gw;
      GYRE_CHECK(store_->AdjacentSpan({gate_.weight(), up_.weight()}, &w, &gw), "gate/up no longer adjacent");
      Tensor dgu = Tensor::Empty(g_.shape(), DType::kBF16, Device::kCuda);
      if (rows > 0)
        Cuda().GatedBackward(CudaAct(act_), rows, hidden, g_.raw(), At(g_, hidden), 2 * hidden, dh.raw(), hidden,
                             dgu.raw(), MutAt(dgu, hidden));
      dx = LinearBackward(x_, w, dgu, &gw, FirstGradWrite({gate_.weight(), up_.weight()}));
    } else {
      Tensor dg = Tensor::Empty(g_.shape(), DType::kBF16, Device::kCuda);
      Tensor du = Tensor::Empty(u_.shape(), DType::kBF16, Device::kCuda);
      if (rows > 0)
        Cuda().GatedBackward(CudaAct(act_), rows, hidden, g_.raw(), u_.raw(), hidden, dh.raw(), hidden, dg.raw(),
                             du.raw());
      dx = gate_.Backward(dg);
      AddInPlace(&dx, up_.Backward(du));
    }
    ReleaseActivations();
    return dx;
  }
  Tensor dh = down_.Backward(dy);
  Tensor du = Mul(dh, a_);
  Tensor dg = ActivateBackward(act_, g_, Mul(dh, u_));
  Tensor dx = gate_.Backward(dg);
  AddInPlace(&dx, up_.Backward(du));
  ReleaseActivations();
  return dx;
}

void GatedMlp::ReleaseActivations() {
  g_ = u_ = a_ = x_ = Tensor();
  gate_.ReleaseActivations();
  up_.ReleaseActivations();
  down_.ReleaseActivations();
}

}  // namespace gyre::ops
