// The reducer's contract with a recording collective: buckets in reverse parameter order, each
// launched as soon as its gradients are final (before Finish: that is the overlap), in bucket
// order whatever order groups became ready in, and SUM semantics preserved.
#include "worker/grad_reducer.h"

#include <chrono>
#include <mutex>
#include <thread>

#include "gtest/gtest.h"

namespace gyre {
namespace {

// World of two where the other rank holds the same values: the sum doubles them. Records the
// sizes of the all-reduces in the order they ran.
class DoublingCollective final : public Collective {
 public:
  int rank() const override { return 0; }
  int world_size() const override { return 2; }
  uint64_t generation() const override { return 1; }
  absl::Status AllReduceSum(float* data, size_t count) override {
    if (fail_) return absl::AbortedError("peer lost");
    for (size_t i = 0; i < count; ++i) data[i] *= 2;
    std::lock_guard<std::mutex> lock(mu_);
    sizes_.push_back(count);
    return absl::OkStatus();
  }
  absl::Status AllReduceSum(double*, size_t) override { return absl::OkStatus(); }
  absl::Status Broadcast(void*, size_t, int) override { return absl::OkStatus(); }
  void Abort() override {}
  std::vector<size_t> sizes() {
    std::lock_guard<std::mutex> lock(mu_);
    return sizes_;
  }
  bool fail_ = false;

 private:
  std::mutex mu_;
  std::vector<size_t> sizes_;
};

struct Params {
  std::vector<ops::Parameter> storage;
  std::vector<ops::Parameter*> ptrs;
  Params() {
    // Creation order: embedding, blocks.0, blocks.1, lm_head (like a model).
    const std::vector<std::pair<std::string, int64_t>> spec = {
        {"embedding.weight", 400}, {"blocks.0.w", 100}, {"blocks.0.b", 10}, {"blocks.1.w", 100}, {"lm_head.weight", 300}};
    storage.reserve(spec.size());
    for (const auto& [name, n] : spec) {
      ops::Parameter p{name, ops::ParamKind::kWeight, ops::Tensor::Zeros({n}, ops::DType::kF32),
                       ops::Tensor::Zeros({n}, ops::DType::kF32)};
      for (int64_t i = 0; i < n; ++i) p.grad.data<float>()[i] = static_cast<float>(i + 1);
      storage.push_back(std::move(p));
    }
    for (auto& p : storage) ptrs.push_back(&p);
  }
};

bool WaitForCalls(DoublingCollective* c, size_t n) {
  for (int i = 0; i < 2000 && c->sizes().size() < n; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  return c->sizes().size() >= n;
}

TEST(GradientReducerTest, LaunchesEachBucketAsSoonAsItsGradientsAreFinal) {
  Params params;
  // 400 floats per bucket: [lm_head 300, blocks.1.w 100], [blocks.0.b 10, blocks.0.w 100],
  // [embedding 400].
  GradientReducer reducer(params.ptrs, 400 * sizeof(float));
  ASSERT_EQ(reducer.num_buckets(), 3u);
  DoublingCollective c;
  reducer.Begin(&c);
  reducer.GroupReady("blocks.1");  // bucket 0 still waits for lm_head
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_TRUE(c.sizes().empty());
  reducer.GroupReady("blocks.0");  // bucket 1 is complete but must wait for bucket 0
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_TRUE(c.sizes().empty());
  reducer.GroupReady("lm_head");   // buckets 0 and 1 go out now, during "backward"
  ASSERT_TRUE(WaitForCalls(&c, 2));
  EXPECT_EQ(c.sizes(), (std::vector<size_t>{400, 110}));
  ASSERT_TRUE(reducer.Finish().ok());  // embedding never reported: reduced at Finish
  EXPECT_EQ(c.sizes(), (std::vector<size_t>{400, 110, 400}));
  for (const auto& p : params.storage) {
    for (int64_t i = 0; i < p.grad.numel(); ++i) ASSERT_EQ(p.grad.data<float>()[i], 2.0f * (i + 1)) << p.name;
  }
  // The next step reuses the buckets.
  reducer.Begin(&c);
  for (const char* g : {"lm_head", "blocks.1", "blocks.0", "embedding"}) reducer.GroupReady(g);
  ASSERT_TRUE(WaitForCalls(&c, 6));
  ASSERT_TRUE(reducer.Finish().ok());
  EXPECT_EQ(params.storage[0].grad.data<float>()[0], 4.0f);
}

TEST(GradientReducerTest, ReduceAfterBackwardUsesTheSameBucketsAndErrorsSurface) {
  Params params;
  GradientReducer reducer(params.ptrs, 400 * sizeof(float));
  DoublingCollective c;
  ASSERT_TRUE(reducer.Reduce(&c).ok());
  EXPECT_EQ(c.sizes(), (std::vector<size_t>{400, 110, 400}));
  c.fail_ = true;
  EXPECT_TRUE(absl::IsAborted(reducer.Reduce(&c)));
  reducer.Begin(&c);
  reducer.GroupReady("lm_head");
  reducer.GroupReady("blocks.1");
  EXPECT_TRUE(absl::IsAborted(reducer.Finish()));
}

}  // namespace
}  // namespace gyre
