// Each recurrent block's backward against float64 finite differences, at ordinary and at
// extreme gate pre-activations (huge input gates, saturated forget gates, large dt), where the
// stabilisers of the cells are doing the work.
#include "ops/recurrent_blocks.h"

#include <functional>

#include "gtest/gtest.h"
#include "ops/gradcheck.h"

namespace gyre::ops {
namespace {

using testing::CheckGradient;
using testing::Inner;
using testing::RandomTensor;

ModelSpec Spec() {
  ModelSpec s;
  s.d_model = 8;
  s.mlstm_heads = 2;
  s.mlstm_inner = 16;
  s.qkv_block_size = 4;
  s.conv_kernel = 3;
  s.mlstm_chunk = 3;
  s.slstm_heads = 2;
  s.slstm_ffn = 12;
  s.ssm_state = 4;
  s.ssm_conv = 4;
  s.ssm_expand = 2;
  s.ssm_head_dim = 4;
  s.ssm_groups = 2;
  s.ssm_chunk = 3;
  return s;
}

void Perturb(ParamStore* store, Rng* rng, double scale) {
  for (Parameter* p : store->All())
    for (int64_t i = 0; i < p->value.numel(); ++i) p->value.Set(i, p->value.At(i) + scale * rng->Normal());
}

void SetParam(ParamStore* store, const std::string& name, const std::function<double(int64_t)>& value) {
  Parameter* p = store->Find(name);
  GYRE_CHECK(p != nullptr, "no parameter %s", name.c_str());
  for (int64_t i = 0; i < p->value.numel(); ++i) p->value.Set(i, value(i));
}

// floor: see CheckGradient. Extreme-gate cases use 0.1: parameters behind a saturated gate have
// true gradient norms of 1e-7 .. 1e-22, where central differences (h = 1e-6, double) are pure
// round-off, measured ~1e-8 in norm (the error falls 100x when h grows 100x); so those are
// checked to an absolute 1e-7, while every parameter with gradient norm above 0.1 is still
// checked to a relative 1e-6.
void CheckBlock(Block* block, ParamStore* store, Rng* rng, int64_t batch, int64_t seq, int64_t d, double floor = 0.0) {
  const double tol = 1e-6;
  Tensor x = RandomTensor({batch, seq, d}, rng);
  Tensor y = block->Forward(x, batch, seq);
  for (int64_t i = 0; i < y.numel(); ++i) ASSERT_TRUE(std::isfinite(y.At(i)));
  Tensor dy = RandomTensor(y.shape(), rng);
  store->ZeroGrad();
  Tensor dx = block->Backward(dy);
  auto loss = [&] { return Inner(block->Forward(x, batch, seq), dy); };
  EXPECT_LT(CheckGradient(loss, &x, dx, 200, 1e-6, floor), tol) << "input";
  for (Parameter* p : store->All()) {
    Tensor analytic = p->grad.Clone();
    EXPECT_LT(CheckGradient(loss, &p->value, analytic, 60, 1e-6, floor), tol) << p->name;
  }
}

TEST(MlstmBlockTest, BackwardMatchesFiniteDifferences) {
  Rng rng(1);
  ParamStore store(DType::kF64, Device::kCpu);
  MlstmBlock block({&store, &rng, "m"}, Spec(), 2);
  Perturb(&store, &rng, 0.3);
  CheckBlock(&block, &store, &rng, 2, 7, 8);
}

TEST(MlstmBlockTest, ExtremeGates) {
  for (double ib : {25.0, -25.0}) {
    for (double fb : {30.0, -30.0}) {
      Rng rng(2);
      ParamStore store(DType::kF64, Device::kCpu);
      MlstmBlock block({&store, &rng, "m"}, Spec(), 2);
      Perturb(&store, &rng, 0.3);
      SetParam(&store, "m.igate.bias", [&](int64_t i) { return ib + i; });
      SetParam(&store, "m.fgate.bias", [&](int64_t i) { return fb - i; });
      CheckBlock(&block, &store, &rng, 1, 7, 8, 0.1);
    }
  }
}

TEST(SlstmBlockTest, BackwardMatchesFiniteDifferences) {
  Rng rng(3);
  ParamStore store(DType::kF64, Device::kCpu);
  SlstmBlock block({&store, &rng, "s"}, Spec(), 1, 3);
  Perturb(&store, &rng, 0.3);
  CheckBlock(&block, &store, &rng, 2, 6, 8);
}

TEST(SlstmBlockTest, ExtremeGates) {
  Rng rng(4);
  ParamStore store(DType::kF64, Device::kCpu);
  SlstmBlock block({&store, &rng, "s"}, Spec(), 0, 3);
  Perturb(&store, &rng, 0.3);
  // i gate +-20, f gate +-25 alternating per unit.
  SetParam(&store, "s.cell.bias", [](int64_t i) {
    const int64_t gate = i / 8, unit = i % 8;
    if (gate == 0) return unit % 2 ? 20.0 : -20.0;
    if (gate == 1) return unit % 3 ? 25.0 : -25.0;
    return 0.1 * unit;
  });
  CheckBlock(&block, &store, &rng, 1, 6, 8, 0.1);
}

TEST(Mamba2BlockTest, BackwardMatchesFiniteDifferences) {
  Rng rng(5);
  ParamStore store(DType::kF64, Device::kCpu);
  Mamba2Block block({&store, &rng, "m"}, Spec(), 2);
  Perturb(&store, &rng, 0.3);
  CheckBlock(&block, &store, &rng, 2, 8, 8);
}

TEST(Mamba2BlockTest, LargeDtAndDecay) {
  Rng rng(6);
  ParamStore store(DType::kF64, Device::kCpu);
  Mamba2Block block({&store, &rng, "m"}, Spec(), 2);
  Perturb(&store, &rng, 0.3);
  SetParam(&store, "m.dt_bias", [](int64_t i) { return i % 2 ? 8.0 : -12.0; });  // dt ~ 8 and ~ 6e-6
  SetParam(&store, "m.A_log", [](int64_t i) { return i % 2 ? 3.0 : -5.0; });
  CheckBlock(&block, &store, &rng, 1, 7, 8, 0.1);
}

TEST(CausalConv1dTest, BackwardMatchesFiniteDifferences) {
  Rng rng(7);
  ParamStore store(DType::kF64, Device::kCpu);
  CausalConv1d conv({&store, &rng, "c"}, 5, 4, true);
  Tensor x = RandomTensor({2, 6, 5}, &rng);
  Tensor y = conv.Forward(x, 2, 6);
  Tensor dy = RandomTensor(y.shape(), &rng);
  Tensor dx = conv.Backward(dy);
  auto loss = [&] { return Inner(conv.Forward(x, 2, 6), dy); };
  EXPECT_LT(CheckGradient(loss, &x, dx), 1e-6);
  for (Parameter* p : store.All()) EXPECT_LT(CheckGradient(loss, &p->value, p->grad.Clone()), 1e-6) << p->name;
  // Causality: changing the last input changes only the last output.
  Tensor y0 = conv.Forward(x, 2, 6);
  x.Set(5 * 5 + 2, x.At(5 * 5 + 2) + 1.0);
  Tensor y1 = conv.Forward(x, 2, 6);
  for (int64_t i = 0; i < 5 * 5; ++i) EXPECT_EQ(y0.At(i), y1.At(i));
  EXPECT_NE(y0.At(5 * 5 + 2), y1.At(5 * 5 + 2));
}

}  // namespace
}  // namespace gyre::ops
