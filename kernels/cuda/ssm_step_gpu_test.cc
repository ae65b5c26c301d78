// Needs a GPU: the one-token step kernels of kernels/cuda/ssm_step.h against the kernels/cpu
// step references in float64, on random bf16-representable inputs (outputs NaN-poisoned first),
// several steps in a row so the carried state is checked too. Odd sizes where the kernels allow.
// Bands: outputs are bf16 (kTolBf16); states are fp32 arithmetic on exact inputs (1e-4).
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cpu/conv1d.h"
#include "kernels/cpu/slstm.h"
#include "kernels/cpu/ssd.h"
#include "kernels/cuda/gpu_test_util.h"
#include "kernels/cuda/ssm_step.h"

namespace gyre::cuda {
namespace {

using testing::DeviceArray;
using testing::RandomBf16Values;
using testing::RelError;
using testing::Report;
using bf16 = __nv_bfloat16;

std::vector<double> D(const std::vector<float>& v) { return {v.begin(), v.end()}; }

TEST(SsmStepGpuTest, Conv1dStepMatchesCpu) {
  std::mt19937_64 rng(1);
  DeviceAllocator alloc;
  for (bool silu : {false, true}) {
    const int64_t B = 3, C = 37, K = 4, steps = 6;
    const auto w = RandomBf16Values(rng, C * K, 0.5f), bias = RandomBf16Values(rng, C, 0.5f);
    DeviceArray<float> dw(&alloc, C * K), dbias(&alloc, C), dstate(&alloc, B * (K - 1) * C);
    dw.Upload(w);
    dbias.Upload(bias);
    dstate.Upload(std::vector<float>(B * (K - 1) * C, 0.f));
    std::vector<double> state(B * (K - 1) * C, 0.0), wd = D(w), bd = D(bias);
    bool ok = true;
    for (int s = 0; s < steps; ++s) {
      const auto x = RandomBf16Values(rng, B * C);
      DeviceArray<bf16> dx(&alloc, B * C), dy(&alloc, B * C);
      dx.Upload(x);
      dy.Poison();
      Conv1dStepArgs a;
      a.batch = B; a.channels = C; a.width = K; a.silu = silu;
      a.x = dx.get(); a.w = dw.get(); a.bias = dbias.get(); a.state = dstate.get(); a.y = dy.get();
      ASSERT_TRUE(Conv1dStep(a, nullptr).ok());
      std::vector<double> y(B * C), xd = D(x);
      cpu::conv1d_step_fwd_ref<double>({B, 1, C, K}, {silu}, xd.data(), wd.data(), bd.data(), state.data(), y.data());
      ok &= Report("conv1d_step y" + std::string(silu ? " silu" : ""), "B3 C37 K4 step " + std::to_string(s),
                   RelError(dy.Download(), y), testing::kTolBf16);
      ok &= Report("conv1d_step state", "B3 C37 K4", RelError(dstate.Download(), state), 1e-6);
    }
    EXPECT_TRUE(ok);
  }
}

TEST(SsdStepGpuTest, SsdStepMatchesCpu) {
  std::mt19937_64 rng(2);
  DeviceAllocator alloc;
  const int64_t B = 2, H = 6, P = 48, G = 2, N = 40, steps = 5, ld = H * P + 2 * G * N;
  const auto a_log = RandomBf16Values(rng, H, 0.5f), dt_bias = RandomBf16Values(rng, H, 0.5f),
             dskip = RandomBf16Values(rng, H, 1.f);
  DeviceArray<float> da(&alloc, H), ddb(&alloc, H), dd(&alloc, H), dstate(&alloc, B * H * P * N);
  da.Upload(a_log);
  ddb.Upload(dt_bias);
  dd.Upload(dskip);
  dstate.Upload(std::vector<float>(B * H * P * N, 0.f));
  std::vector<double> state(B * H * P * N, 0.0);
  bool ok = true;
  for (int s = 0; s < steps; ++s) {
    const auto xbc = RandomBf16Values(rng, B * ld), dt = RandomBf16Values(rng, B * H);
    DeviceArray<bf16> dxbc(&alloc, B * ld), dy(&alloc, B * H * P);
    DeviceArray<float> ddt(&alloc, B * H);
    dxbc.Upload(xbc);
    ddt.Upload(dt);
    dy.Poison();
    SsdStepArgs a;
    a.batch = B; a.heads = H; a.head_dim = P; a.groups = G; a.state_dim = N;
    a.x = dxbc.get(); a.b = dxbc.get() + H * P; a.c = dxbc.get() + H * P + G * N; a.ld_xbc = ld;
    a.dt = ddt.get(); a.a_log = da.get(); a.dt_bias = ddb.get(); a.d = dd.get(); a.state = dstate.get(); a.y = dy.get();
    ASSERT_TRUE(SsdStep(a, nullptr).ok());
    // Packed host copies of the strided views.
    std::vector<double> x(B * H * P), bb(B * G * N), cc(B * G * N), y(B * H * P);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t i = 0; i < H * P; ++i) x[b * H * P + i] = xbc[b * ld + i];
      for (int64_t i = 0; i < G * N; ++i) {
        bb[b * G * N + i] = xbc[b * ld + H * P + i];
        cc[b * G * N + i] = xbc[b * ld + H * P + G * N + i];
      }
    }
    const std::vector<double> dtd = D(dt), ad = D(a_log), dbd = D(dt_bias), sd = D(dskip);
    cpu::ssd_step_fwd_ref<double>({B, 1, H, P, G, N}, {}, x.data(), dtd.data(), ad.data(), dbd.data(), bb.data(),
                                  cc.data(), sd.data(), state.data(), y.data());
    ok &= Report("ssd_step y", "B2 H6 P48 G2 N40 step " + std::to_string(s), RelError(dy.Download(), y),
                 testing::kTolBf16);
    ok &= Report("ssd_step state", "B2 H6 P48 G2 N40", RelError(dstate.Download(), state), 1e-4);
  }
  EXPECT_TRUE(ok);
}

TEST(SlstmStepGpuTest, SlstmStepMatchesCpu) {
  std::mt19937_64 rng(3);
  DeviceAllocator alloc;
  const int64_t B = 3, NH = 3, dh = 40, d = NH * dh, steps = 6;
  const auto r = RandomBf16Values(rng, NH * 4 * dh * dh, 0.1f);
  DeviceArray<bf16> dr(&alloc, r.size());
  dr.Upload(r);
  DeviceArray<float> dhs(&alloc, B * d), dc(&alloc, B * d), dn(&alloc, B * d), dm(&alloc, B * d);
  for (auto* t : {&dhs, &dc, &dn, &dm}) t->Upload(std::vector<float>(B * d, 0.f));
  std::vector<double> h(B * d, 0.0), c(B * d, 0.0), n(B * d, 0.0), m(B * d, 0.0), rd = D(r);
  bool ok = true;
  for (int s = 0; s < steps; ++s) {
    const auto gx = RandomBf16Values(rng, B * 4 * d);
    DeviceArray<bf16> dgx(&alloc, gx.size()), dout(&alloc, B * d);
    dgx.Upload(gx);
    dout.Poison();
    SlstmStepArgs a;
    a.batch = B; a.heads = NH; a.head_dim = dh;
    a.gx = dgx.get(); a.r = dr.get(); a.h = dhs.get(); a.c = dc.get(); a.n = dn.get(); a.m = dm.get();
    a.h_out = dout.get();
    ASSERT_TRUE(SlstmStep(a, nullptr).ok());
    std::vector<double> out(B * d), gxd = D(gx);
    cpu::slstm_step_fwd_ref<double>({B, 1, NH, dh}, gxd.data(), rd.data(), {h.data(), c.data(), n.data(), m.data()},
                                    out.data());
    ok &= Report("slstm_step h", "B3 NH3 dh40 step " + std::to_string(s), RelError(dout.Download(), out),
                 testing::kTolBf16);
    ok &= Report("slstm_step c", "B3 NH3 dh40", RelError(dc.Download(), c), 1e-4);
    ok &= Report("slstm_step n", "B3 NH3 dh40", RelError(dn.Download(), n), 1e-4);
  }
  EXPECT_TRUE(ok);
}

}  // namespace
}  // namespace gyre::cuda
