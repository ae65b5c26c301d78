// Needs a GPU: checks the device round trip against the host checksum on random data.
#include "kernels/cuda/device_info.h"

#include <random>

#include "gtest/gtest.h"

namespace gyre::cuda {
namespace {

TEST(DeviceInfoGpuTest, ListsAtLeastOneHopperDevice) {
  std::vector<DeviceInfo> devices;
  CudaResult r = ListDevices(&devices);
  ASSERT_TRUE(r.ok()) << r.message;
  ASSERT_FALSE(devices.empty()) << "no CUDA device visible";
  EXPECT_GE(devices[0].sm_major, 9) << devices[0].name;
  EXPECT_GT(devices[0].global_memory_bytes, uint64_t{1} << 30);
}

TEST(DeviceInfoGpuTest, ChecksumMatchesHostOnOddSizes) {
  std::mt19937 rng(7);
  std::normal_distribution<float> dist(0.f, 3.f);
  for (size_t n : {1u, 255u, 257u, 1000003u}) {
    std::vector<float> values(n);
    for (float& v : values) v = dist(rng);
    BufferChecksum device;
    CudaResult r = ChecksumOnDevice(0, values, &device);
    ASSERT_TRUE(r.ok()) << r.message;
    BufferChecksum host = ChecksumOnHost(values);
    EXPECT_EQ(device.weighted_bits, host.weighted_bits) << "n=" << n;
    EXPECT_NEAR(device.sum, host.sum, 1e-9 * n * 3.0) << "n=" << n;
  }
}

}  // namespace
}  // namespace gyre::cuda
