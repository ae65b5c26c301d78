// conv1d: forward vs a naive loop written here, step loop vs forward, backward vs float64
// central finite differences.
#include "kernels/cpu/conv1d.h"

#include <cmath>
#include <functional>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cpu/cell_test_util.h"

namespace gyre::cpu {
namespace {

using testing::NumericGradient;
using testing::RandomVector;
using testing::RelativeError;


template <typename To>
std::vector<To> Cast(const std::vector<double>& v) {
  return std::vector<To>(v.begin(), v.end());
}



// Written independently of conv1d.cc: direct index arithmetic, PyTorch's definition.
std::vector<double> NaiveConv(const Conv1dShape& s, bool silu, const std::vector<double>& x,
                              const std::vector<double>& w, const std::vector<double>& bias,
                              const std::vector<double>* init) {
  const int64_t B = s.batch, S = s.seq_len, C = s.channels, K = s.width;
  std::vector<double> y(B * S * C);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < S; ++t) {
      for (int64_t c = 0; c < C; ++c) {
        double u = bias[c];
        for (int64_t j = 0; j < K; ++j) {
          const int64_t tau = t - (K - 1) + j;
          double xv = 0;
          if (tau >= 0) {
            xv = x[(b * S + tau) * C + c];
          } else if (init != nullptr) {
            xv = (*init)[(b * (K - 1) + tau + K - 1) * C + c];
          }
          u += w[c * K + j] * xv;
        }
        y[(b * S + t) * C + c] = silu ? u / (1 + std::exp(-u)) : u;
      }
    }
  }
  return y;
}

struct ConvCase {
  Conv1dShape shape;
  bool silu;
  bool with_state;
};

class Conv1dTest : public ::testing::TestWithParam<ConvCase> {};

TEST_P(Conv1dTest, ForwardMatchesNaiveAndStepLoop) {
  const ConvCase tc = GetParam();
  const Conv1dShape s = tc.shape;
  ASSERT_TRUE(conv1d_check(s).ok());
  const int64_t B = s.batch, S = s.seq_len, C = s.channels, K = s.width;
  std::mt19937_64 rng(7);
  const auto x = RandomVector(B * S * C, rng), w = RandomVector(C * K, rng),
             bias = RandomVector(C, rng), init = RandomVector(B * (K - 1) * C, rng);
  const std::vector<double>* init_ptr = tc.with_state ? &init : nullptr;
  const std::vector<double> expected = NaiveConv(s, tc.silu, x, w, bias, init_ptr);

  const Conv1dOptions opt{.silu = tc.silu};
  std::vector<double> y(B * S * C, std::nan("")), final_state(B * (K - 1) * C, std::nan(""));
  conv1d_fwd_ref<double>(s, opt, x.data(), w.data(), bias.data(),
                         tc.with_state ? init.data() : nullptr, y.data(), final_state.data());
  EXPECT_LT(RelativeError(y, expected), 1e-14);

  // float path against the same double reference.
  const auto xf = Cast<float>(x), wf = Cast<float>(w), bf = Cast<float>(bias),
             initf = Cast<float>(init);
  std::vector<float> yf(B * S * C);
  conv1d_fwd_ref<float>(s, opt, xf.data(), wf.data(), bf.data(),
                        tc.with_state ? initf.data() : nullptr, yf.data(), nullptr);
  EXPECT_LT(RelativeError(std::vector<double>(yf.begin(), yf.end()), expected), 1e-6);

  // Step loop: same outputs and the same final state.
  std::vector<double> state = tc.with_state ? init : std::vector<double>(B * (K - 1) * C, 0.0);
  std::vector<double> xt(B * C), yt(B * C), y_step(B * S * C);
  for (int64_t t = 0; t < S; ++t) {
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t c = 0; c < C; ++c) xt[b * C + c] = x[(b * S + t) * C + c];
    }
    conv1d_step_fwd_ref<double>(s, opt, xt.data(), w.data(), bias.data(), state.data(), yt.data());
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t c = 0; c < C; ++c) y_step[(b * S + t) * C + c] = yt[b * C + c];
    }
  }
  EXPECT_LT(RelativeError(y_step, expected), 1e-14);
  if (K > 1) {
    EXPECT_LT(RelativeError(state, final_state), 1e-15);
  }
}

TEST_P(Conv1dTest, BackwardMatchesFiniteDifferences) {
  const ConvCase tc = GetParam();
  const Conv1dShape s = tc.shape;
  const int64_t B = s.batch, S = s.seq_len, C = s.channels, K = s.width;
  std::mt19937_64 rng(11);
  auto x = RandomVector(B * S * C, rng), w = RandomVector(C * K, rng), bias = RandomVector(C, rng),
       init = RandomVector(B * (K - 1) * C, rng);
  const auto dy = RandomVector(B * S * C, rng), dfinal = RandomVector(B * (K - 1) * C, rng);
  const Conv1dOptions opt{.silu = tc.silu};
  auto loss = [&]() {
    std::vector<double> y(B * S * C), fs(B * (K - 1) * C);
    conv1d_fwd_ref<double>(s, opt, x.data(), w.data(), bias.data(),
                           tc.with_state ? init.data() : nullptr, y.data(), fs.data());
    double l = 0;
    for (size_t i = 0; i < y.size(); ++i) l += dy[i] * y[i];
    for (size_t i = 0; i < fs.size(); ++i) l += dfinal[i] * fs[i];
    return l;
  };
  std::vector<double> dx(B * S * C, std::nan("")), dinit(B * (K - 1) * C, std::nan(""));
  // Parameter gradients accumulate: start from a known offset and subtract it.
  std::vector<double> dw(C * K, 1.0), dbias(C, 1.0);
  conv1d_bwd_ref<double>(s, opt, x.data(), w.data(), bias.data(),
                         tc.with_state ? init.data() : nullptr, dy.data(), dfinal.data(), dx.data(),
                         dw.data(), dbias.data(), dinit.data());
  for (double& e : dw) e -= 1.0;
  for (double& e : dbias) e -= 1.0;
  EXPECT_LT(RelativeError(dx, NumericGradient(x, loss)), 1e-8);
  EXPECT_LT(RelativeError(dw, NumericGradient(w, loss)), 1e-8);
  EXPECT_LT(RelativeError(dbias, NumericGradient(bias, loss)), 1e-8);
  if (tc.with_state && K > 1) {
    EXPECT_LT(RelativeError(dinit, NumericGradient(init, loss)), 1e-8);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, Conv1dTest,
    ::testing::Values(ConvCase{{2, 9, 5, 4}, false, false}, ConvCase{{2, 9, 5, 4}, true, false},
                      ConvCase{{2, 9, 5, 4}, true, true}, ConvCase{{1, 2, 3, 4}, true, true},
                      ConvCase{{3, 7, 4, 1}, false, false}, ConvCase{{1, 6, 3, 2}, true, true}));

}  // namespace
}  // namespace gyre::cpu
