#include "ops/flops.h"

#include "gtest/gtest.h"

namespace gyre::ops {
namespace {

// llama-125m against the closed form of MODELS.md §8: layer = 4d² + 3df + 2d, N = L·layer + d
// (final norm), attention 6·L·d·T, head 6·V·d.
TEST(FlopsTest, LlamaMatchesTheClosedForm) {
  absl::StatusOr<ModelSpec> spec = PresetSpec("llama-125m");
  ASSERT_TRUE(spec.ok()) << spec.status();
  const double d = 768, f = 2048, L = 12, V = static_cast<double>(spec->vocab_size), T = 2048;
  ASSERT_EQ(spec->d_model, 768);
  ASSERT_EQ(spec->ffn_dim, 2048);
  absl::StatusOr<TrainingFlops> flops = CountTrainingFlops(*spec, 2048);
  ASSERT_TRUE(flops.ok()) << flops.status();
  EXPECT_DOUBLE_EQ(flops->dense, 6 * (L * (4 * d * d + 3 * d * f + 2 * d) + d));
  EXPECT_DOUBLE_EQ(flops->mixer, 6 * L * d * T);
  EXPECT_DOUBLE_EQ(flops->head, 6 * V * d);
  EXPECT_DOUBLE_EQ(flops->total(), flops->without_head() + flops->head);
}

TEST(FlopsTest, MixerTermsOfRecurrentModelsAndMtpHeads) {
  absl::StatusOr<ModelSpec> mamba = PresetSpec("mamba2-130m");
  ASSERT_TRUE(mamba.ok()) << mamba.status();
  absl::StatusOr<TrainingFlops> m = CountTrainingFlops(*mamba, 2048);
  ASSERT_TRUE(m.ok());
  const double H = 2.0 * mamba->d_model / 64, Q = 256, N = 128, P = 64;
  EXPECT_DOUBLE_EQ(m->mixer, 3 * mamba->n_layers() * H * (Q * (N + P) + 4 * N * P));
  // The SSD term does not depend on the context; attention's does.
  EXPECT_DOUBLE_EQ(CountTrainingFlops(*mamba, 8192)->mixer, m->mixer);

  absl::StatusOr<ModelSpec> llama = PresetSpec("llama-125m");
  ASSERT_TRUE(llama.ok());
  ModelSpec mtp = *llama;
  mtp.mtp_heads = 3;
  mtp.blocks.push_back(BlockType::kAttention);
  mtp.blocks.push_back(BlockType::kAttention);
  absl::StatusOr<TrainingFlops> one = CountTrainingFlops(*llama, 1024), three = CountTrainingFlops(mtp, 1024);
  ASSERT_TRUE(one.ok() && three.ok());
  EXPECT_DOUBLE_EQ(three->head, 3 * one->head);
  EXPECT_GT(three->dense, one->dense);  // two more blocks
  EXPECT_DOUBLE_EQ(three->mixer, one->mixer * 14 / 12);
}

}  // namespace
}  // namespace gyre::ops
