#include "worker/worker_device.h"

#include <gtest/gtest.h>

namespace gyre {
namespace {

class FakeGpus final : public GpuRuntime {
 public:
  explicit FakeGpus(int n) : n_(n) {}
  int DeviceCount() override { return n_; }
  double PeakFlops() override { return 0; }
  absl::StatusOr<std::unique_ptr<Collective>> Connect(RendezvousStore*, const std::string&, uint64_t, int, int,
                                                      int64_t) override {
    return absl::UnimplementedError("test");
  }
  absl::StatusOr<std::unique_ptr<DeviceGradSync>> NewGradSync(ops::ParamStore*, size_t) override {
    return absl::UnimplementedError("test");
  }

 private:
  int n_;
};

TEST(WorkerDeviceTest, AutoPicksCudaOnlyWithAGpu) {
  FakeGpus none(0), two(2);
  EXPECT_EQ(*ResolveWorkerDevice("auto", nullptr), "cpu");
  EXPECT_EQ(*ResolveWorkerDevice("auto", &none), "cpu");
  EXPECT_EQ(*ResolveWorkerDevice("auto", &two), "cuda");
  EXPECT_EQ(*ResolveWorkerDevice("cpu", &two), "cpu");
}

TEST(WorkerDeviceTest, CudaNeedsABuildAndADevice) {
  FakeGpus none(0);
  EXPECT_EQ(ResolveWorkerDevice("cuda", nullptr).status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(ResolveWorkerDevice("cuda", &none).status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(ResolveWorkerDevice("gpu", &none).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ResolveWorkerDevice("cuda:x", &none).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(WorkerDeviceTest, IndexNarrowsVisibleDevices) {
  FakeGpus two(2);
  ::setenv("CUDA_VISIBLE_DEVICES", "4,5", 1);
  ASSERT_EQ(*ResolveWorkerDevice("cuda:1", &two), "cuda");
  EXPECT_STREQ(std::getenv("CUDA_VISIBLE_DEVICES"), "5");
  ::unsetenv("CUDA_VISIBLE_DEVICES");
  ASSERT_EQ(*ResolveWorkerDevice("cuda:1", &two), "cuda");
  EXPECT_STREQ(std::getenv("CUDA_VISIBLE_DEVICES"), "1");
  EXPECT_EQ(*NarrowVisibleDevices("0, 2,3", 1), "2");
  EXPECT_FALSE(NarrowVisibleDevices("0,1", 2).ok());
  EXPECT_FALSE(NarrowVisibleDevices("", -1).ok());
}

}  // namespace
}  // namespace gyre
