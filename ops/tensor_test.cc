// Tensor pieces the CUDA backend relies on that run on the CPU too: element views (Slice), the
// host bf16 conversions (round to nearest even, NaN kept) and bf16 storage through At/Set/To, and
// the seam's behaviour in a binary without CUDA.
#include "ops/tensor.h"

#include <cmath>
#include <cstring>
#include <limits>

#include "gtest/gtest.h"
#include "ops/cuda_backend.h"
#include "ops/model.h"

namespace gyre::ops {
namespace {

TEST(TensorTest, SliceIsABoundsCheckedViewOfTheSameStorage) {
  Tensor t = Tensor::Empty({4, 6}, DType::kF32);
  for (int64_t i = 0; i < t.numel(); ++i) t.Set(i, i);
  Tensor s = t.Slice(7, {2, 5});
  EXPECT_EQ(s.shape(), (Shape{2, 5}));
  EXPECT_EQ(s.At(0), 7);
  EXPECT_EQ(s.At(9), 16);
  s.Set(1, -1);
  EXPECT_EQ(t.At(8), -1);  // shares storage
  EXPECT_DEATH(t.Slice(20, {5}), "slice");
}

TEST(TensorTest, Bf16RoundsToNearestEvenAndKeepsNaN) {
  EXPECT_EQ(Bf16ToFloat(FloatToBf16(1.0f)), 1.0f);
  // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1).
  EXPECT_EQ(Bf16ToFloat(FloatToBf16(1.0f + std::ldexp(1.0f, -8))), 1.0f);
  // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: even is 1 + 2^-6.
  EXPECT_EQ(Bf16ToFloat(FloatToBf16(1.0f + 3 * std::ldexp(1.0f, -8))), 1.0f + std::ldexp(1.0f, -6));
  EXPECT_EQ(Bf16ToFloat(FloatToBf16(-3.140625f)), -3.140625f);  // exactly representable
  EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(std::numeric_limits<float>::quiet_NaN()))));
  EXPECT_TRUE(std::isinf(Bf16ToFloat(FloatToBf16(std::numeric_limits<float>::infinity()))));
}

TEST(TensorTest, Bf16StorageOnTheHostThroughAtSetAndTo) {
  Tensor f = Tensor::Empty({5}, DType::kF32);
  const float vals[] = {0.1f, -2.5f, 1000.3f, 1e-3f, 7.0f};
  for (int i = 0; i < 5; ++i) f.Set(i, vals[i]);
  Tensor b = f.To(DType::kBF16);
  EXPECT_EQ(b.dtype(), DType::kBF16);
  EXPECT_EQ(b.nbytes(), 10u);
  Tensor back = b.To(DType::kF64);
  for (int i = 0; i < 5; ++i) {
    EXPECT_EQ(back.At(i), Bf16ToFloat(FloatToBf16(vals[i])));
    EXPECT_NEAR(back.At(i), vals[i], std::fabs(vals[i]) * 4e-3);
  }
  b.Fill(2.0);
  EXPECT_EQ(b.At(3), 2.0);
}

TEST(TensorTest, WithoutTheCudaBackendCudaModelsAreAClearError) {
  if (CudaBackendOrNull() != nullptr) GTEST_SKIP() << "this binary has the CUDA backend";
  auto m = LanguageModel::Create(*PresetSpec("llama-tiny"), DType::kF32, Device::kCuda, 1);
  ASSERT_FALSE(m.ok());
  EXPECT_NE(std::string(m.status().message()).find("without CUDA"), std::string::npos) << m.status();
  EXPECT_DEATH(Tensor::Empty({3}, DType::kF32, Device::kCuda), "built without CUDA");
}

}  // namespace
}  // namespace gyre::ops
