#include "ops/elementwise.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "ops/cuda_backend.h"

namespace gyre::ops {
namespace {

void CheckSame(const Tensor& a, const Tensor& b, const char* op) {
  CheckCpu(a, op);
  GYRE_CHECK(a.numel() == b.numel() && a.dtype() == b.dtype(), "%s: %s %s vs %s %s", op,
             ShapeString(a.shape()).c_str(), DTypeName(a.dtype()), ShapeString(b.shape()).c_str(),
             DTypeName(b.dtype()));
}

template <typename T>
T ActF(Activation act, T x) {
  switch (act) {
    case Activation::kSilu: return x / (T(1) + std::exp(-x));
    case Activation::kGelu: return T(0.5) * x * (T(1) + std::erf(x * T(0.70710678118654752440)));
    case Activation::kSigmoid: return T(1) / (T(1) + std::exp(-x));
  }
  return x;
}

template <typename T>
T ActGrad(Activation act, T x) {
  switch (act) {
    case Activation::kSilu: {
      const T s = T(1) / (T(1) + std::exp(-x));
      return s * (T(1) + x * (T(1) - s));
    }
    case Activation::kGelu: {
      const T cdf = T(0.5) * (T(1) + std::erf(x * T(0.70710678118654752440)));
      const T pdf = std::exp(T(-0.5) * x * x) * T(0.39894228040143267794);
      return cdf + x * pdf;
    }
    case Activation::kSigmoid: {
      const T s = T(1) / (T(1) + std::exp(-x));
      return s * (T(1) - s);
    }
  }
  return T(1);
}

}  // namespace

Tensor Add(const Tensor& a, const Tensor& b) {
  if (IsCuda(a)) {
    GYRE_CHECK(IsCuda(b) && a.numel() == b.numel() && a.dtype() == b.dtype(), "add: %s %s vs %s %s",
               ShapeString(a.shape()).c_str(), DTypeName(a.dtype()), ShapeString(b.shape()).c_str(),
               DTypeName(b.dtype()));
    Tensor out = Tensor::EmptyLike(a);
    if (a.numel() > 0) Cuda().Add(out.raw(), a.raw(), b.raw(), a.dtype(), a.numel());
    return out;
  }
  Tensor out = a.Clone();
  AddInPlace(&out, b);
  return out;
}

void AddInPlace(Tensor* acc, const Tensor& b) { AxpyInPlace(acc, 1.0, b); }

void AxpyInPlace(Tensor* acc, double alpha, const Tensor& b) {
  if (IsCuda(*acc)) {
    GYRE_CHECK(IsCuda(b) && acc->numel() == b.numel() && acc->dtype() == b.dtype(), "axpy: %s %s vs %s %s",
               ShapeString(acc->shape()).c_str(), DTypeName(acc->dtype()), ShapeString(b.shape()).c_str(),
               DTypeName(b.dtype()));
    if (b.numel() > 0) Cuda().Axpy(acc->raw(), b.raw(), b.dtype(), alpha, b.numel());
    return;
  }
  CheckSame(*acc, b, "axpy");
  DispatchFloat(b.dtype(), [&]<typename T>() {
    T* y = acc->data<T>();
    const T* x = b.data<T>();
    const T al = static_cast<T>(alpha);
    for (int64_t i = 0; i < b.numel(); ++i) y[i] += al * x[i];
  });
}

Tensor Mul(const Tensor& a, const Tensor& b) {
  CheckSame(a, b, "mul");
  Tensor out = Tensor::EmptyLike(a);
  DispatchFloat(a.dtype(), [&]<typename T>() {
    const T* x = a.data<T>();
    const T* y = b.data<T>();
    T* o = out.data<T>();
    for (int64_t i = 0; i < a.numel(); ++i) o[i] = x[i] * y[i];
  });
  return out;
}

Tensor Scale(const Tensor& a, double s) {
  CheckCpu(a, "scale");
  Tensor out = Tensor::EmptyLike(a);
  DispatchFloat(a.dtype(), [&]<typename T>() {
    const T* x = a.data<T>();
    T* o = out.data<T>();
    for (int64_t i = 0; i < a.numel(); ++i) o[i] = static_cast<T>(s) * x[i];
  });
  return out;
}

Tensor Activate(Activation act, const Tensor& x) {
  CheckCpu(x, "activate");
  Tensor out = Tensor::EmptyLike(x);
  DispatchFloat(x.dtype(), [&]<typename T>() {
    const T* in = x.data<T>();
    T* o = out.data<T>();
    for (int64_t i = 0; i < x.numel(); ++i) o[i] = ActF<T>(act, in[i]);
  });
  return out;
}

Tensor ActivateBackward(Activation act, const Tensor& x, const Tensor& dy) {
  CheckSame(x, dy, "activate_backward");
  Tensor out = Tensor::EmptyLike(x);
  DispatchFloat(x.dtype(), [&]<typename T>() {
    const T* in = x.data<T>();
    const T* g = dy.data<T>();
    T* o = out.data<T>();
    for (int64_t i = 0; i < x.numel(); ++i) o[i] = g[i] * ActGrad<T>(act, in[i]);
  });
  return out;
}

double SoftCapValue(double x, double cap) { return cap * std::tanh(x / cap); }

double SoftCapSlope(double x, double cap) {
  const double a = std::fabs(x / cap);
  if (a > 350.0) return 0.0;  // e^{2a} overflows; sech² < 1e-300
  const double e = std::exp(-a);  // sech² = 4 e^{-2a} / (1 + e^{-2a})², no cancellation
  return 4.0 * e * e / ((1.0 + e * e) * (1.0 + e * e));
}

Tensor SoftCap(const Tensor& x, double cap) {
  CheckCpu(x, "soft_cap");
  GYRE_CHECK(cap > 0, "soft cap %g must be positive", cap);
  Tensor out = Tensor::EmptyLike(x);
  DispatchFloat(x.dtype(), [&]<typename T>() {
    const T* in = x.data<T>();
    T* o = out.data<T>();
    for (int64_t i = 0; i < x.numel(); ++i) o[i] = static_cast<T>(SoftCapValue(in[i], cap));
  });
  return out;
}

Tensor SoftCapBackward(const Tensor& x, const Tensor& dy, double cap) {
  CheckSame(x, dy, "soft_cap_backward");
  Tensor out = Tensor::EmptyLike(x);
  DispatchFloat(x.dtype(), [&]<typename T>() {
    const T* in = x.data<T>();
    const T* g = dy.data<T>();
    T* o = out.data<T>();
    for (int64_t i = 0; i < x.numel(); ++i) o[i] = static_cast<T>(g[i] * SoftCapSlope(in[i], cap));
  });
  return out;
}

Tensor SliceColumns(const Tensor& x, int64_t begin, int64_t end) {
  const int64_t rows = x.rows(), cols = x.cols(), w = end - begin;
  GYRE_CHECK(0 <= begin && begin <= end && end <= cols, "columns [%ld, %ld) of %ld", (long)begin, (long)end, (long)cols);
  Shape shape = x.shape();
  shape.back() = w;
  Tensor out = Tensor::Empty(shape, x.dtype(), x.device());
  const size_t es = DTypeSize(x.dtype());
  if (IsCuda(x)) {
    if (rows > 0 && w > 0)
      Cuda().Copy2D(out.raw(), w * es, static_cast<const char*>(x.raw()) + begin * es, cols * es, w * es, rows);
    return out;
  }
  CheckCpu(x, "slice_columns");
  const char* src = static_cast<const char*>(x.raw());
  char* dst = static_cast<char*>(out.raw());
  for (int64_t r = 0; r < rows; ++r) std::memcpy(dst + r * w * es, src + (r * cols + begin) * es, w * es);
  return out;
}

Tensor ConcatColumns(const std::vector<Tensor>& parts) {
  GYRE_CHECK(!parts.empty(), "concat of nothing");
  const int64_t rows = parts[0].rows();
  int64_t cols = 0;
  for (const Tensor& p : parts) {
    if (!IsCuda(parts[0])) CheckCpu(p, "concat_columns");
    GYRE_CHECK(p.device() == parts[0].device(), "concat across devices");
    GYRE_CHECK(p.rows() == rows && p.dtype() == parts[0].dtype(), "concat: rows %ld vs %ld", (long)p.rows(), (long)rows);
    cols += p.cols();
  }
  Shape shape = parts[0].shape();
  shape.back() = cols;
  Tensor out = Tensor::Empty(shape, parts[0].dtype(), parts[0].device());
  const size_t es = DTypeSize(out.dtype());
  char* dst = static_cast<char*>(out.raw());
  int64_t off = 0;
  for (const Tensor& p : parts) {
    const char* src = static_cast<const char*>(p.raw());
    const int64_t w = p.cols();
    if (IsCuda(p)) {
      if (rows > 0 && w > 0) Cuda().Copy2D(dst + off * es, cols * es, src, w * es, w * es, rows);
      off += w;
      continue;
    }
    for (int64_t r = 0; r < rows; ++r) std::memcpy(dst + (r * cols + off) * es, src + r * w * es, w * es);
    off += w;
  }
  return out;
}

double SumSquares(const Tensor& t) {
  if (IsCuda(t)) return t.numel() == 0 ? 0.0 : Cuda().SumSquares(t.raw(), t.dtype(), t.numel());
  CheckCpu(t, "sum_squares");
  double s = 0;
  DispatchFloat(t.dtype(), [&]<typename T>() {
    const T* p = t.data<T>();
    for (int64_t i = 0; i < t.numel(); ++i) s += static_cast<double>(p[i]) * p[i];
  });
  return s;
}

double MaxAbsDiff(const Tensor& a, const Tensor& b) {
  if (IsCuda(a)) return MaxAbsDiff(a.ToDevice(Device::kCpu), b);
  if (IsCuda(b)) return MaxAbsDiff(a, b.ToDevice(Device::kCpu));
  GYRE_CHECK(a.numel() == b.numel(), "numel %ld vs %ld", (long)a.numel(), (long)b.numel());
  double m = 0;
  for (int64_t i = 0; i < a.numel(); ++i) m = std::max(m, std::fabs(a.At(i) - b.At(i)));
  return m;
}

double RelativeError(const Tensor& a, const Tensor& b) {
  if (IsCuda(a)) return RelativeError(a.ToDevice(Device::kCpu), b);
  if (IsCuda(b)) return RelativeError(a, b.ToDevice(Device::kCpu));
  GYRE_CHECK(a.numel() == b.numel(), "numel %ld vs %ld", (long)a.numel(), (long)b.numel());
  double diff = 0, na = 0, nb = 0;
  for (int64_t i = 0; i < a.numel(); ++i) {
    const double x = a.At(i), y = b.At(i);
    diff += (x - y) * (x - y);
    na += x * x;
    nb += y * y;
  }
  return std::sqrt(diff) / std::max({std::sqrt(na), std::sqrt(nb), 1e-300});
}

}  // namespace gyre::ops
