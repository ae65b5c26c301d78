// Tensor: a device, a dtype, a shape and contiguous storage (DESIGN.md section 6).
//
// Storage is reference counted and comes from the pooled allocator (allocator.h); copying a
// Tensor shares its storage (like a handle), `Clone` copies the data. `Reshape` and `Rows` are
// views on the same storage. There are no strided views: every tensor is contiguous, so kernels
// get raw pointers plus sizes.
//
// Devices: kCpu (the reference and CPU-training backend), kCuda (storage from the CUDA backend's
// caching allocator, ops/cuda_backend.h; only in binaries linked with //ops:cuda_backend), kMeta
// (shape only, no storage; used to count parameters of large presets without allocating them).
// DTypes: kF32 (training; fp32 masters and gradients on CUDA), kF64 (finite-difference tests),
// kBF16 (CUDA activations and compute weights; on the CPU only storage, At/Set and To), kI32
// (token ids).
// CUDA tensors: CopyFrom/ToDevice move data between devices; At/Set/Fill work through host
// copies (slow; tests and initialisation only).
//
// Thread-safety: a Tensor is a value; concurrent reads are fine, concurrent writes to the same
// storage are the caller's business.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "ops/check.h"

namespace gyre::ops {

enum class Device : uint8_t { kCpu, kCuda, kMeta };
enum class DType : uint8_t { kF32, kF64, kBF16, kI32 };

size_t DTypeSize(DType dtype);
const char* DTypeName(DType dtype);
const char* DeviceName(Device device);

template <typename T>
constexpr DType DTypeOf() {
  if constexpr (std::is_same_v<T, float>) return DType::kF32;
  else if constexpr (std::is_same_v<T, double>) return DType::kF64;
  else if constexpr (std::is_same_v<T, int32_t>) return DType::kI32;
  else static_assert(sizeof(T) == 0, "no DType for this type");
}

using Shape = std::vector<int64_t>;
std::string ShapeString(const Shape& shape);
int64_t NumElements(const Shape& shape);

class Tensor {
 public:
  Tensor() = default;  // undefined tensor

  static Tensor Empty(Shape shape, DType dtype, Device device = Device::kCpu);
  static Tensor Zeros(Shape shape, DType dtype, Device device = Device::kCpu);
  static Tensor Full(Shape shape, DType dtype, double value, Device device = Device::kCpu);
  // Same shape/dtype/device as `like`.
  static Tensor EmptyLike(const Tensor& like) { return Empty(like.shape_, like.dtype_, like.device_); }
  static Tensor ZerosLike(const Tensor& like) { return Zeros(like.shape_, like.dtype_, like.device_); }

  bool defined() const { return defined_; }
  const Shape& shape() const { return shape_; }
  int rank() const { return static_cast<int>(shape_.size()); }
  int64_t dim(int i) const { return shape_[i < 0 ? i + rank() : i]; }
  int64_t numel() const { return numel_; }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }
  size_t nbytes() const { return static_cast<size_t>(numel_) * DTypeSize(dtype_); }
  // Rows when viewed as a matrix [numel / last_dim, last_dim].
  int64_t rows() const { return shape_.empty() ? 1 : numel_ / shape_.back(); }
  int64_t cols() const { return shape_.empty() ? 1 : shape_.back(); }

  template <typename T>
  T* data() {
    GYRE_CHECK(dtype_ == DTypeOf<T>(), "tensor is %s", DTypeName(dtype_));
    return static_cast<T*>(raw());
  }
  template <typename T>
  const T* data() const {
    GYRE_CHECK(dtype_ == DTypeOf<T>(), "tensor is %s", DTypeName(dtype_));
    return static_cast<const T*>(raw());
  }
  void* raw() const {
    GYRE_CHECK(storage_ != nullptr, "tensor has no storage (device %s)", DeviceName(device_));
    return static_cast<char*>(storage_.get()) + offset_bytes_;
  }

  // A view with a new shape of the same element count.
  Tensor Reshape(Shape shape) const;
  // Rows [begin, end) of the tensor viewed as [rows(), cols()] (a view, shape [end-begin, cols]).
  Tensor Rows(int64_t begin, int64_t end) const;
  // Deep copy.
  Tensor Clone() const;
  // Copies `src`'s elements (same numel and dtype) into this tensor's storage.
  void CopyFrom(const Tensor& src);
  void SetZero();
  void Fill(double value);
  // Element i as double (tests, debugging; slow).
  double At(int64_t i) const;
  void Set(int64_t i, double value);
  // Converts to another floating dtype (f32 <-> f64 on the CPU; f32 <-> bf16 anywhere; other
  // pairs through the host).
  Tensor To(DType dtype) const;
  // A copy on `device` (same dtype and shape).
  Tensor ToDevice(Device device) const;
  // A view of NumElements(shape) elements starting at element `offset` of this tensor's storage
  // (bounds-checked against this tensor).
  Tensor Slice(int64_t offset, Shape shape) const;

 private:
  bool defined_ = false;
  Shape shape_;
  int64_t numel_ = 0;
  DType dtype_ = DType::kF32;
  Device device_ = Device::kCpu;
  std::shared_ptr<void> storage_;
  size_t offset_bytes_ = 0;
};

inline bool IsCuda(const Tensor& t) { return t.device() == Device::kCuda; }

// bf16 <-> float on the host (round to nearest even; NaN stays NaN).
float Bf16ToFloat(uint16_t bits);
uint16_t FloatToBf16(float value);

// Calls `fn.template operator()<T>()` with T = float or double according to `dtype`.
// Usage: DispatchFloat(x.dtype(), [&]<typename T>() { Kernel<T>(x.data<T>(), ...); });
template <typename Fn>
decltype(auto) DispatchFloat(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kF32:
      return fn.template operator()<float>();
    case DType::kF64:
      return fn.template operator()<double>();
    default:
      GYRE_CHECK(false, "no CPU kernel for dtype %s", DTypeName(dtype));
  }
  return fn.template operator()<float>();  // unreachable
}

// Device dispatch point: every op calls this first (after its CUDA branch, where it has one).
inline void CheckCpu(const Tensor& t, const char* op) {
  GYRE_CHECK(t.device() != Device::kCuda, "op %s has no CUDA kernel yet", op);
  GYRE_CHECK(t.device() == Device::kCpu, "op %s has no %s kernel yet", op, DeviceName(t.device()));
}

}  // namespace gyre::ops
