#include "ops/tensor.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "ops/allocator.h"

namespace gyre::ops {

size_t DTypeSize(DType dtype) {
  switch (dtype) {
    case DType::kF32: return 4;
    case DType::kF64: return 8;
    case DType::kBF16: return 2;
    case DType::kI32: return 4;
  }
  return 0;
}

const char* DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kF32: return "f32";
    case DType::kF64: return "f64";
    case DType::kBF16: return "bf16";
    case DType::kI32: return "i32";
  }
  return "?";
}

const char* DeviceName(Device device) {
  switch (device) {
    case Device::kCpu: return "cpu";
    case Device::kCuda: return "cuda";
    case Device::kMeta: return "meta";
  }
  return "?";
}

std::string ShapeString(const Shape& shape) { return absl::StrCat("[", absl::StrJoin(shape, ", "), "]"); }

int64_t NumElements(const Shape& shape) {
  int64_t n = 1;
  for (int64_t d : shape) {
    GYRE_CHECK(d >= 0, "negative dimension in %s", ShapeString(shape).c_str());
    n *= d;
  }
  return n;
}

Tensor Tensor::Empty(Shape shape, DType dtype, Device device) {
  Tensor t;
  t.defined_ = true;
  t.numel_ = NumElements(shape);
  t.shape_ = std::move(shape);
  t.dtype_ = dtype;
  t.device_ = device;
  switch (device) {
    case Device::kCpu:
      t.storage_ = HostAllocator::Global().Allocate(t.nbytes());
      break;
    case Device::kMeta:
      break;
    case Device::kCuda:
      GYRE_CHECK(false, "CUDA tensors are not built into this binary yet");
  }
  return t;
}

Tensor Tensor::Zeros(Shape shape, DType dtype, Device device) {
  Tensor t = Empty(std::move(shape), dtype, device);
  if (device != Device::kMeta) t.SetZero();
  return t;
}

Tensor Tensor::Full(Shape shape, DType dtype, double value, Device device) {
  Tensor t = Empty(std::move(shape), dtype, device);
  if (device != Device::kMeta) t.Fill(value);
  return t;
}

Tensor Tensor::Reshape(Shape shape) const {
  GYRE_CHECK(NumElements(shape) == numel_, "reshape %s -> %s", ShapeString(shape_).c_str(),
             ShapeString(shape).c_str());
  Tensor t = *this;
  t.shape_ = std::move(shape);
  return t;
}

Tensor Tensor::Rows(int64_t begin, int64_t end) const {
  GYRE_CHECK(0 <= begin && begin <= end && end <= rows(), "rows [%ld, %ld) of %ld", (long)begin,
             (long)end, (long)rows());
  Tensor t = *this;
  t.shape_ = {end - begin, cols()};
  t.numel_ = (end - begin) * cols();
  t.offset_bytes_ += static_cast<size_t>(begin * cols()) * DTypeSize(dtype_);
  return t;
}

Tensor Tensor::Clone() const {
  Tensor t = Empty(shape_, dtype_, device_);
  if (device_ != Device::kMeta) t.CopyFrom(*this);
  return t;
}

void Tensor::CopyFrom(const Tensor& src) {
  GYRE_CHECK(src.numel_ == numel_ && src.dtype_ == dtype_, "copy %s %s -> %s %s",
             ShapeString(src.shape_).c_str(), DTypeName(src.dtype_), ShapeString(shape_).c_str(),
             DTypeName(dtype_));
  CheckCpu(*this, "copy");
  if (numel_ > 0) std::memcpy(raw(), src.raw(), nbytes());
}

void Tensor::SetZero() {
  CheckCpu(*this, "zero");
  if (numel_ > 0) std::memset(raw(), 0, nbytes());
}

void Tensor::Fill(double value) {
  CheckCpu(*this, "fill");
  switch (dtype_) {
    case DType::kF32: { float* p = data<float>(); for (int64_t i = 0; i < numel_; ++i) p[i] = static_cast<float>(value); break; }
    case DType::kF64: { double* p = data<double>(); for (int64_t i = 0; i < numel_; ++i) p[i] = value; break; }
    case DType::kI32: { int32_t* p = data<int32_t>(); for (int64_t i = 0; i < numel_; ++i) p[i] = static_cast<int32_t>(value); break; }
    default: GYRE_CHECK(false, "fill on %s", DTypeName(dtype_));
  }
}

double Tensor::At(int64_t i) const {
  GYRE_CHECK(i >= 0 && i < numel_, "index %ld of %ld", (long)i, (long)numel_);
  switch (dtype_) {
    case DType::kF32: return data<float>()[i];
    case DType::kF64: return data<double>()[i];
    case DType::kI32: return data<int32_t>()[i];
    default: GYRE_CHECK(false, "At on %s", DTypeName(dtype_));
  }
  return 0;
}

void Tensor::Set(int64_t i, double value) {
  GYRE_CHECK(i >= 0 && i < numel_, "index %ld of %ld", (long)i, (long)numel_);
  switch (dtype_) {
    case DType::kF32: data<float>()[i] = static_cast<float>(value); break;
    case DType::kF64: data<double>()[i] = value; break;
    case DType::kI32: data<int32_t>()[i] = static_cast<int32_t>(value); break;
    default: GYRE_CHECK(false, "Set on %s", DTypeName(dtype_));
  }
}

Tensor Tensor::To(DType dtype) const {
  if (dtype == dtype_) return Clone();
  Tensor t = Empty(shape_, dtype, device_);
  CheckCpu(*this, "to");
  if (dtype_ == DType::kF32 && dtype == DType::kF64) {
    const float* s = data<float>(); double* d = t.data<double>();
    for (int64_t i = 0; i < numel_; ++i) d[i] = s[i];
  } else if (dtype_ == DType::kF64 && dtype == DType::kF32) {
    const double* s = data<double>(); float* d = t.data<float>();
    for (int64_t i = 0; i < numel_; ++i) d[i] = static_cast<float>(s[i]);
  } else {
    GYRE_CHECK(false, "conversion %s -> %s", DTypeName(dtype_), DTypeName(dtype));
  }
  return t;
}

}  // namespace gyre::ops
