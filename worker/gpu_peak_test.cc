#include "worker/gpu_peak.h"

#include "gtest/gtest.h"

namespace gyre {
namespace {

TEST(GpuPeakTest, KnownCardsAndUnknownOnes) {
  EXPECT_EQ(PeakDenseBf16Flops("NVIDIA H100 80GB HBM3"), 989e12);  // the device machine's H100
  EXPECT_EQ(PeakDenseBf16Flops("NVIDIA H200"), 989e12);
  EXPECT_EQ(PeakDenseBf16Flops("NVIDIA H100 PCIe"), 756e12);
  EXPECT_EQ(PeakDenseBf16Flops("NVIDIA A100-SXM4-80GB"), 312e12);
  EXPECT_EQ(PeakDenseBf16Flops("NVIDIA GeForce GTX 1080"), 0);
  EXPECT_EQ(PeakDenseBf16Flops(""), 0);
}

}  // namespace
}  // namespace gyre
