// Needs a GPU (the device machine): a CUDA replica on a one-rank NCCL communicator. Checks that
// the device-side step breakdown is per pass with gradient accumulation: every micro-batch's
// backward counts as backward, so the backward share of the step is about the same with one pass
// or four (when the events of only one pass were kept, the earlier passes counted as forward and
// the share fell from ~2/3 to under 1/4).
#include <cmath>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "worker/nccl_collective.h"
#include "worker/replica.h"

namespace gyre {
namespace {

gyre::v1::RunConfig SmallConfig(int64_t micro_batch) {
  gyre::v1::RunConfig c;
  c.set_seed(11);
  c.mutable_model()->set_preset("llama-tiny");
  c.mutable_optimizer()->set_lr(1e-3);
  c.mutable_schedule()->set_warmup_steps(2);
  c.mutable_schedule()->set_total_steps(100);
  c.mutable_train()->set_micro_batch(micro_batch);
  return c;
}

struct Shares {
  double forward_ms = 0, backward_ms = 0;
};

Shares RunSteps(int64_t micro_batch, NcclCollective* nccl) {
  constexpr int64_t kBatch = 8, kSeq = 256;
  auto replica = ModelReplica::Create(SmallConfig(micro_batch), ops::Device::kCuda);
  EXPECT_TRUE(replica.ok()) << replica.status();
  if (!replica.ok()) return {};
  const int vocab = static_cast<int>((*replica)->spec().vocab_size);
  std::mt19937 rng(3);
  std::vector<int32_t> tokens(kBatch * (kSeq + 1));
  for (int32_t& t : tokens) t = static_cast<int32_t>(rng() % vocab);
  Shares sum;
  for (int step = 0; step < 6; ++step) {
    (*replica)->BeginOverlappedReduce(nccl);
    ReplicaLoss loss = (*replica)->ComputeGradients(tokens, kBatch, kSeq, kBatch * kSeq);
    absl::Status s = (*replica)->ReduceGradients(nccl, &loss);
    EXPECT_TRUE(s.ok()) << s;
    EXPECT_TRUE((*replica)->ApplyUpdate(step).ok());
    if (step < 2) continue;  // warm-up: allocator, cuBLAS plans
    sum.forward_ms += (*replica)->last_pass_times().forward_ms;
    sum.backward_ms += (*replica)->last_pass_times().backward_ms;
  }
  return sum;
}

TEST(ReplicaGpuTest, MicroBatchStepBreakdownCountsEveryPassBackward) {
  auto id = NcclCollective::NewUniqueId();
  ASSERT_TRUE(id.ok()) << id.status();
  NcclOptions options;
  options.init_timeout_ms = 60000;
  options.op_timeout_ms = 10000;
  auto nccl = NcclCollective::Connect(*id, 1, 0, 1, 0, options);
  ASSERT_TRUE(nccl.ok()) << nccl.status();
  const Shares one = RunSteps(0, nccl->get());
  const Shares four = RunSteps(2, nccl->get());
  ASSERT_GT(one.forward_ms, 0);
  ASSERT_GT(one.backward_ms, 0);
  ASSERT_GT(four.backward_ms, 0);
  const double share_one = one.backward_ms / (one.forward_ms + one.backward_ms);
  const double share_four = four.backward_ms / (four.forward_ms + four.backward_ms);
  std::printf("[INFO] one pass fwd %.3f bwd %.3f ms (bwd share %.3f); 4 micro-batches fwd %.3f bwd %.3f (%.3f)\n",
              one.forward_ms, one.backward_ms, share_one, four.forward_ms, four.backward_ms, share_four);
  EXPECT_GT(share_one, 0.4);
  EXPECT_NEAR(share_four, share_one, 0.15);
  // Four passes do the same arithmetic in smaller pieces: the summed device time stays within 3x.
  EXPECT_LT(four.forward_ms + four.backward_ms, 3 * (one.forward_ms + one.backward_ms));
}

}  // namespace
}  // namespace gyre
