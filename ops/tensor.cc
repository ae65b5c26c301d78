#include "ops/tensor.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "ops/allocator.h"
#include "ops/cuda_backend.h"
#include "ops/parallel.h"

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
      t.storage_ = Cuda().Allocate(t.nbytes());
      break;
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

Tensor Tensor::Slice(int64_t offset, Shape shape) const {
  const int64_t n = NumElements(shape);
  GYRE_CHECK(offset >= 0 && offset + n <= numel_, "slice [%ld, %ld) of %ld elements", (long)offset,
             (long)(offset + n), (long)numel_);
  Tensor t = *this;
  t.shape_ = std::move(shape);
  t.numel_ = n;
  t.offset_bytes_ += static_cast<size_t>(offset) * DTypeSize(dtype_);
  return t;
}

void Tensor::CopyFrom(const Tensor& src) {
  GYRE_CHECK(src.numel_ == numel_ && src.dtype_ == dtype_, "copy %s %s -> %s %s",
             ShapeString(src.shape_).c_str(), DTypeName(src.dtype_), ShapeString(shape_).c_str(),
             DTypeName(dtype_));
  if (numel_ == 0) return;
  if (device_ == Device::kCuda || src.device_ == Device::kCuda) {
    GYRE_CHECK(device_ != Device::kMeta && src.device_ != Device::kMeta, "copy with a meta tensor");
    Cuda().CopyBytes(raw(), device_, src.raw(), src.device_, nbytes());
    return;
  }
  CheckCpu(*this, "copy");
  std::memcpy(raw(), src.raw(), nbytes());
}

void Tensor::SetZero() {
  if (device_ == Device::kCuda) {
    if (numel_ > 0) Cuda().Memset0(raw(), nbytes());
    return;
  }
  CheckCpu(*this, "zero");
  if (numel_ <= 0) return;
  // Large host buffers are zeroed in parallel: a fresh one is bound by page faults on first
  // touch (~2 GB/s a thread), and a model's parameters are gigabytes (a worker's start-up).
  constexpr size_t kPiece = size_t{8} << 20;
  const size_t bytes = nbytes();
  char* base = static_cast<char*>(raw());
  if (bytes < 4 * kPiece || NumThreads() <= 1) {
    std::memset(base, 0, bytes);
    return;
  }
  ParallelFor(static_cast<int64_t>((bytes + kPiece - 1) / kPiece), [&](int64_t i) {
    const size_t begin = static_cast<size_t>(i) * kPiece;
    std::memset(base + begin, 0, std::min(kPiece, bytes - begin));
  });
}

void Tensor::Fill(double value) {
  if (device_ == Device::kCuda) {
    Tensor host = Full(shape_, dtype_, value, Device::kCpu);
    CopyFrom(host);
    return;
  }
  CheckCpu(*this, "fill");
  switch (dtype_) {
    case DType::kF32: { float* p = data<float>(); for (int64_t i = 0; i < numel_; ++i) p[i] = static_cast<float>(value); break; }
    case DType::kF64: { double* p = data<double>(); for (int64_t i = 0; i < numel_; ++i) p[i] = value; break; }
    case DType::kI32: { int32_t* p = data<int32_t>(); for (int64_t i = 0; i < numel_; ++i) p[i] = static_cast<int32_t>(value); break; }
    case DType::kBF16: {
      uint16_t* p = static_cast<uint16_t*>(raw());
      const uint16_t b = FloatToBf16(static_cast<float>(value));
      for (int64_t i = 0; i < numel_; ++i) p[i] = b;
      break;
    }
  }
}

double Tensor::At(int64_t i) const {
  GYRE_CHECK(i >= 0 && i < numel_, "index %ld of %ld", (long)i, (long)numel_);
  if (device_ == Device::kCuda) return Slice(i, {1}).ToDevice(Device::kCpu).At(0);
  switch (dtype_) {
    case DType::kF32: return data<float>()[i];
    case DType::kF64: return data<double>()[i];
    case DType::kI32: return data<int32_t>()[i];
    case DType::kBF16: return Bf16ToFloat(static_cast<const uint16_t*>(raw())[i]);
  }
  return 0;
}

void Tensor::Set(int64_t i, double value) {
  GYRE_CHECK(i >= 0 && i < numel_, "index %ld of %ld", (long)i, (long)numel_);
  if (device_ == Device::kCuda) {
    Tensor one = Empty({1}, dtype_, Device::kCpu);
    one.Set(0, value);
    Slice(i, {1}).CopyFrom(one);
    return;
  }
  switch (dtype_) {
    case DType::kF32: data<float>()[i] = static_cast<float>(value); break;
    case DType::kF64: data<double>()[i] = value; break;
    case DType::kI32: data<int32_t>()[i] = static_cast<int32_t>(value); break;
    case DType::kBF16: static_cast<uint16_t*>(raw())[i] = FloatToBf16(static_cast<float>(value)); break;
  }
}

Tensor Tensor::To(DType dtype) const {
  if (dtype == dtype_) return Clone();
  Tensor t = Empty(shape_, dtype, device_);
  if (device_ == Device::kCuda) {
    const bool f32_bf16 = (dtype_ == DType::kF32 && dtype == DType::kBF16) || (dtype_ == DType::kBF16 && dtype == DType::kF32);
    if (f32_bf16) {
      if (numel_ > 0) Cuda().Convert(raw(), dtype_, t.raw(), dtype, numel_);
    } else {
      t.CopyFrom(ToDevice(Device::kCpu).To(dtype));
    }
    return t;
  }
  CheckCpu(*this, "to");
  if (dtype_ == DType::kF32 && dtype == DType::kF64) {
    const float* s = data<float>(); double* d = t.data<double>();
    for (int64_t i = 0; i < numel_; ++i) d[i] = s[i];
  } else if (dtype_ == DType::kF64 && dtype == DType::kF32) {
    const double* s = data<double>(); float* d = t.data<float>();
    for (int64_t i = 0; i < numel_; ++i) d[i] = static_cast<float>(s[i]);
  } else if (dtype_ == DType::kBF16 || dtype == DType::kBF16) {
    GYRE_CHECK(dtype_ != DType::kI32 && dtype != DType::kI32, "conversion %s -> %s", DTypeName(dtype_), DTypeName(dtype));
    for (int64_t i = 0; i < numel_; ++i) t.Set(i, At(i));
  } else {
    GYRE_CHECK(false, "conversion %s -> %s", DTypeName(dtype_), DTypeName(dtype));
  }
  return t;
}

Tensor Tensor::ToDevice(Device device) const {
  GYRE_CHECK(device != Device::kMeta && device_ != Device::kMeta, "ToDevice with a meta tensor");
  Tensor t = Empty(shape_, dtype_, device);
  t.CopyFrom(*this);
  return t;
}

float Bf16ToFloat(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t FloatToBf16(float value) {
  uint32_t u;
  std::memcpy(&u, &value, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

}  // namespace gyre::ops
