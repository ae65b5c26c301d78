#include "deploy/gpu_slots.h"

#include <optional>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace gyre::deploy {
namespace {

TEST(GpuSlotsTest, MinWorkersAboveGpuCountIsRefused) {
  EXPECT_TRUE(CheckGpuCapacity(2, 2).ok());
  EXPECT_TRUE(CheckGpuCapacity(8, 0).ok());  // CPU workers
  absl::Status s = CheckGpuCapacity(3, 2);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(std::string(s.message()).find("cluster.min_workers is 3"), std::string::npos) << s;
}

TEST(GpuSlotsTest, OneWorkerPerGpuAtMost) {
  EXPECT_EQ(WorkersToRun(3, 2), 2);
  EXPECT_EQ(WorkersToRun(2, 2), 2);
  EXPECT_EQ(WorkersToRun(1, 4), 1);
  EXPECT_EQ(WorkersToRun(5, 0), 5);  // CPU workers: no cap
}

TEST(GpuSlotsTest, EveryGpuWorkerGetsItsOwnSlot) {
  // Start workers one at a time as the launcher does: slots 0..gpus-1, then none is left.
  const int gpus = 3;
  std::vector<int> held;
  for (int i = 0; i < 5; ++i) {
    std::optional<int> slot = FreeGpuSlot(gpus, held);
    if (i < gpus) {
      ASSERT_TRUE(slot.has_value()) << "worker " << i;
      EXPECT_EQ(*slot, i);
      held.push_back(*slot);
    } else {
      EXPECT_FALSE(slot.has_value()) << "worker " << i << " would share GPU " << slot.value_or(-1);
    }
  }
  EXPECT_EQ(FreeGpuSlot(0, {}), std::nullopt);
}

TEST(GpuSlotsTest, ReplacementTakesTheFreedSlot) {
  // The worker on GPU 1 of 3 died: its successor gets GPU 1, not a busy one.
  EXPECT_EQ(FreeGpuSlot(3, {0, 2}), 1);
  EXPECT_EQ(FreeGpuSlot(2, {1}), 0);
  EXPECT_EQ(FreeGpuSlot(2, {1, 0}), std::nullopt);
}

TEST(GpuSlotsTest, NoticeOnlyWhenMoreWorkersThanGpus) {
  EXPECT_EQ(GpuCapNotice(3, 2), "3 workers desired, 2 GPUs: running 2; the rest would share a GPU");
  EXPECT_EQ(GpuCapNotice(2, 2), "");
  EXPECT_EQ(GpuCapNotice(4, 0), "");  // CPU workers
}

}  // namespace
}  // namespace gyre::deploy
