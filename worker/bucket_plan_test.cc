#include "worker/bucket_plan.h"

#include <gtest/gtest.h>

namespace gyre {
namespace {

// Three blocks of two parameters, padded to 8 elements like ParamStore's flat buffers.
std::vector<FlatParam> Params() {
  std::vector<FlatParam> p;
  size_t offset = 0;
  auto add = [&](std::string name, size_t count) {
    p.push_back({std::move(name), offset, count});
    offset += (count + 7) / 8 * 8;
  };
  add("embedding.weight", 100);
  add("blocks.0.a", 30);
  add("blocks.0.b", 30);
  add("blocks.1.a", 30);
  add("blocks.1.b", 30);
  add("final_norm.weight", 10);
  return p;
}
constexpr size_t kTotal = 104 + 4 * 32 + 16;

TEST(BucketPlanTest, BucketsTileTheFlatBufferInReverseOrder) {
  // 64 floats per bucket, a first bucket of 16 floats.
  auto plan = BucketPlan::Create(Params(), kTotal, 64 * 4, 16 * 4);
  ASSERT_TRUE(plan.ok()) << plan.status();
  const auto& b = plan->buckets();
  ASSERT_EQ(b.size(), 4u);
  EXPECT_EQ(b[0].first, 5u);  // final_norm alone (first bucket cap)
  EXPECT_EQ(b[0].offset, 232u);
  EXPECT_EQ(b[0].count, 16u);  // padding included, up to the end
  EXPECT_EQ(b[1].first, 3u);   // blocks.1.a + blocks.1.b = 60 <= 64
  EXPECT_EQ(b[1].end, 5u);
  EXPECT_EQ(b[1].offset, 168u);
  EXPECT_EQ(b[1].count, 64u);
  EXPECT_EQ(b[2].first, 1u);  // blocks.0.*
  EXPECT_EQ(b[2].end, 3u);
  EXPECT_EQ(b[3].first, 0u);  // the embedding (100 > 64) gets its own
  EXPECT_EQ(b[3].count, 104u);
  // Tiling: every float of the buffer in exactly one bucket.
  size_t covered = 0;
  for (const FlatBucket& x : b) covered += x.count;
  EXPECT_EQ(covered, kTotal);
  for (size_t i = 1; i < b.size(); ++i) EXPECT_EQ(b[i].offset + b[i].count, b[i - 1].offset);
}

TEST(BucketPlanTest, LaunchesInBucketOrderWhateverTheReadyOrder) {
  auto plan = BucketPlan::Create(Params(), kTotal, 64 * 4, 16 * 4);
  ASSERT_TRUE(plan.ok());
  // blocks.0 first: its bucket must wait for the buckets before it.
  EXPECT_TRUE(plan->GroupReady("blocks.0").empty());
  EXPECT_TRUE(plan->GroupReady("blocks.1").empty());  // final_norm's bucket (0) is not ready
  EXPECT_EQ(plan->GroupReady("final_norm"), (std::vector<size_t>{0, 1, 2}));
  EXPECT_EQ(plan->launched(), 3u);
  EXPECT_EQ(plan->TakeRest(), (std::vector<size_t>{3}));
  EXPECT_TRUE(plan->TakeRest().empty());
  plan->Reset();
  EXPECT_EQ(plan->GroupReady("final_norm"), (std::vector<size_t>{0}));
  EXPECT_EQ(plan->GroupReady("blocks.1"), (std::vector<size_t>{1}));
  EXPECT_EQ(plan->GroupReady("blocks.0"), (std::vector<size_t>{2}));
  EXPECT_TRUE(plan->GroupReady("blocks.0").empty());  // idempotent
  EXPECT_EQ(plan->GroupReady("embedding"), (std::vector<size_t>{3}));
}

TEST(BucketPlanTest, PrefixMatchesWholeComponents) {
  std::vector<FlatParam> p = {{"blocks.1.w", 0, 8}, {"blocks.10.w", 8, 8}};
  auto plan = BucketPlan::Create(p, 16, 4, 4);
  ASSERT_TRUE(plan.ok());
  ASSERT_EQ(plan->buckets().size(), 2u);
  EXPECT_EQ(plan->GroupReady("blocks.1"), (std::vector<size_t>{}));  // bucket 0 is blocks.10
  EXPECT_EQ(plan->GroupReady("blocks.10"), (std::vector<size_t>{0, 1}));
}

TEST(BucketPlanTest, RejectsOverlapsAndOffsets) {
  std::vector<FlatParam> overlap = {{"a", 0, 10}, {"b", 8, 8}};
  EXPECT_FALSE(BucketPlan::Create(overlap, 16, 64, 64).ok());
  std::vector<FlatParam> late = {{"a", 8, 8}};
  EXPECT_FALSE(BucketPlan::Create(late, 16, 64, 64).ok());
  EXPECT_FALSE(BucketPlan::Create({}, 0, 64, 64).ok());
  std::vector<FlatParam> past_end = {{"a", 0, 20}};
  EXPECT_FALSE(BucketPlan::Create(past_end, 16, 64, 64).ok());
}

}  // namespace
}  // namespace gyre
