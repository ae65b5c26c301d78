// Needs a GPU: the one-token step kernels of kernels/cuda/ssm_step.h against the kernels/cpu
// step references in float64, on random bf16-representable inputs (outputs NaN-poisoned first),
// several steps in a row so the carried state is checked too. Odd sizes where the kernels allow.
// Chunks (conv1d, SSD, sLSTM, mLSTM): chunks of k = 1..5 positions in one launch (and 37: a prefill
// chunk; the SSD stages 16 positions at a time, so 16, 17 and 37 cross its windows), one after
// another on the same state, against k CPU steps: every position's output, the final state, and
// the history (state after positions 0..k-2) the kernel writes for Rewind.
// Bands: outputs are bf16 (kTolBf16); states are fp32 arithmetic on exact inputs (1e-4).
#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cpu/conv1d.h"
#include "kernels/cpu/mlstm.h"
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

// A chunk kernel's history (the state after each position but the last: `values` = (k - 1) x
// the state's size, at the front of a buffer that may be longer) against the CPU's.
bool ReportHistory(const std::string& name, const std::string& shape, const DeviceArray<float>& history,
                   int64_t values, const std::vector<double>& ref, double tol) {
  std::vector<float> got = history.Download();
  got.resize(values);
  return Report(name, shape, RelError(got, ref), tol);
}

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

// Chunks of k = 1..5 and 37 positions (B 3, C 37, K 4, silu): y at every position, the window after the
// chunk and the windows after positions 0..k-2 (history).
TEST(SsmStepGpuTest, Conv1dChunkMatchesCpuSteps) {
  std::mt19937_64 rng(11);
  DeviceAllocator alloc;
  const int64_t B = 3, C = 37, K = 4, S = B * (K - 1) * C;
  const auto w = RandomBf16Values(rng, C * K, 0.5f), bias = RandomBf16Values(rng, C, 0.5f);
  DeviceArray<float> dw(&alloc, C * K), dbias(&alloc, C), dstate(&alloc, S);
  dw.Upload(w);
  dbias.Upload(bias);
  dstate.Upload(std::vector<float>(S, 0.f));
  std::vector<double> state(S, 0.0), wd = D(w), bd = D(bias);
  bool ok = true;
  for (int64_t k : {1, 2, 3, 4, 5, 37}) {
    const auto x = RandomBf16Values(rng, k * B * C);
    DeviceArray<bf16> dx(&alloc, k * B * C), dy(&alloc, k * B * C);
    DeviceArray<float> dhist(&alloc, std::max<int64_t>(1, (k - 1) * S));
    dx.Upload(x);
    dy.Poison();
    Conv1dStepArgs a;
    a.batch = B; a.channels = C; a.width = K; a.silu = true;
    a.x = dx.get(); a.w = dw.get(); a.bias = dbias.get(); a.state = dstate.get(); a.y = dy.get();
    a.positions = k;
    a.history = k > 1 ? dhist.get() : nullptr;
    ASSERT_TRUE(Conv1dStep(a, nullptr).ok());
    std::vector<double> y(k * B * C), hist, xd = D(x);
    for (int64_t j = 0; j < k; ++j) {
      cpu::conv1d_step_fwd_ref<double>({B, 1, C, K}, {true}, xd.data() + j * B * C, wd.data(), bd.data(), state.data(),
                                       y.data() + j * B * C);
      if (j + 1 < k) hist.insert(hist.end(), state.begin(), state.end());
    }
    const std::string shape = "B3 C37 K4 chunk " + std::to_string(k);
    ok &= Report("conv1d_chunk y", shape, RelError(dy.Download(), y), testing::kTolBf16);
    ok &= Report("conv1d_chunk state", shape, RelError(dstate.Download(), state), 1e-6);
    if (k > 1) ok &= ReportHistory("conv1d_chunk history", shape, dhist, (k - 1) * S, hist, 1e-6);
  }
  EXPECT_TRUE(ok);
}

// Chunks of k = 1..5, 16, 17, 37 (B 3, H 6, P 44 — a partial block of rows —, G 2, N 40), x/B/C strided views.
TEST(SsdStepGpuTest, SsdChunkMatchesCpuSteps) {
  std::mt19937_64 rng(12);
  DeviceAllocator alloc;
  const int64_t B = 3, H = 6, P = 44, G = 2, N = 40, ld = H * P + 2 * G * N, S = B * H * P * N;
  const auto a_log = RandomBf16Values(rng, H, 0.5f), dt_bias = RandomBf16Values(rng, H, 0.5f),
             dskip = RandomBf16Values(rng, H, 1.f);
  DeviceArray<float> da(&alloc, H), ddb(&alloc, H), dd(&alloc, H), dstate(&alloc, S);
  da.Upload(a_log);
  ddb.Upload(dt_bias);
  dd.Upload(dskip);
  dstate.Upload(std::vector<float>(S, 0.f));
  std::vector<double> state(S, 0.0);
  const std::vector<double> ad = D(a_log), dbd = D(dt_bias), sd = D(dskip);
  bool ok = true;
  for (int64_t k : {1, 2, 3, 4, 5, 16, 17, 37}) {
    const auto xbc = RandomBf16Values(rng, k * B * ld), dt = RandomBf16Values(rng, k * B * H);
    DeviceArray<bf16> dxbc(&alloc, k * B * ld), dy(&alloc, k * B * H * P);
    DeviceArray<float> ddt(&alloc, k * B * H), dhist(&alloc, std::max<int64_t>(1, (k - 1) * S));
    dxbc.Upload(xbc);
    ddt.Upload(dt);
    dy.Poison();
    SsdStepArgs a;
    a.batch = B; a.heads = H; a.head_dim = P; a.groups = G; a.state_dim = N;
    a.x = dxbc.get(); a.b = dxbc.get() + H * P; a.c = dxbc.get() + H * P + G * N; a.ld_xbc = ld;
    a.dt = ddt.get(); a.a_log = da.get(); a.dt_bias = ddb.get(); a.d = dd.get(); a.state = dstate.get(); a.y = dy.get();
    a.positions = k;
    a.history = k > 1 ? dhist.get() : nullptr;
    ASSERT_TRUE(SsdStep(a, nullptr).ok());
    std::vector<double> y(k * B * H * P), hist;
    for (int64_t j = 0; j < k; ++j) {
      std::vector<double> x(B * H * P), bb(B * G * N), cc(B * G * N);
      for (int64_t b = 0; b < B; ++b) {
        const int64_t r = (j * B + b) * ld;
        for (int64_t i = 0; i < H * P; ++i) x[b * H * P + i] = xbc[r + i];
        for (int64_t i = 0; i < G * N; ++i) {
          bb[b * G * N + i] = xbc[r + H * P + i];
          cc[b * G * N + i] = xbc[r + H * P + G * N + i];
        }
      }
      const std::vector<double> dtd(dt.begin() + j * B * H, dt.begin() + (j + 1) * B * H);
      cpu::ssd_step_fwd_ref<double>({B, 1, H, P, G, N}, {}, x.data(), dtd.data(), ad.data(), dbd.data(), bb.data(),
                                    cc.data(), sd.data(), state.data(), y.data() + j * B * H * P);
      if (j + 1 < k) hist.insert(hist.end(), state.begin(), state.end());
    }
    const std::string shape = "B3 H6 P44 G2 N40 chunk " + std::to_string(k);
    ok &= Report("ssd_chunk y", shape, RelError(dy.Download(), y), testing::kTolBf16);
    ok &= Report("ssd_chunk state", shape, RelError(dstate.Download(), state), 1e-4);
    if (k > 1) ok &= ReportHistory("ssd_chunk history", shape, dhist, (k - 1) * S, hist, 1e-4);
  }
  EXPECT_TRUE(ok);
}

// Chunks of k = 1..5 and 37 positions (B 3, NH 3, dh 40) on the same state: h at every position,
// (h, c, n, m) after the chunk, and the four histories.
TEST(SlstmStepGpuTest, SlstmChunkMatchesCpuSteps) {
  std::mt19937_64 rng(14);
  DeviceAllocator alloc;
  const int64_t B = 3, NH = 3, dh = 40, d = NH * dh, S = B * d;
  const auto r = RandomBf16Values(rng, NH * 4 * dh * dh, 0.1f);
  DeviceArray<bf16> dr(&alloc, r.size());
  dr.Upload(r);
  DeviceArray<float> dhs(&alloc, S), dc(&alloc, S), dn(&alloc, S), dm(&alloc, S);
  for (auto* t : {&dhs, &dc, &dn, &dm}) t->Upload(std::vector<float>(S, 0.f));
  std::vector<double> h(S, 0.0), c(S, 0.0), n(S, 0.0), m(S, 0.0), rd = D(r);
  bool ok = true;
  for (int64_t k : {1, 2, 3, 4, 5, 37}) {
    const auto gx = RandomBf16Values(rng, k * B * 4 * d);
    DeviceArray<bf16> dgx(&alloc, gx.size()), dout(&alloc, k * S);
    const int64_t hs = std::max<int64_t>(1, (k - 1) * S);
    DeviceArray<float> hh(&alloc, hs), hc(&alloc, hs), hn(&alloc, hs), hm(&alloc, hs);
    dgx.Upload(gx);
    dout.Poison();
    SlstmStepArgs a;
    a.batch = B; a.heads = NH; a.head_dim = dh;
    a.gx = dgx.get(); a.r = dr.get(); a.h = dhs.get(); a.c = dc.get(); a.n = dn.get(); a.m = dm.get();
    a.h_out = dout.get();
    a.positions = k;
    if (k > 1) {
      a.h_history = hh.get(); a.c_history = hc.get(); a.n_history = hn.get(); a.m_history = hm.get();
    }
    ASSERT_TRUE(SlstmStep(a, nullptr).ok());
    std::vector<double> out(k * S), h1, c1, n1, m1, gxd = D(gx);
    for (int64_t j = 0; j < k; ++j) {
      cpu::slstm_step_fwd_ref<double>({B, 1, NH, dh}, gxd.data() + j * B * 4 * d, rd.data(),
                                      {h.data(), c.data(), n.data(), m.data()}, out.data() + j * S);
      if (j + 1 < k) {
        h1.insert(h1.end(), h.begin(), h.end());
        c1.insert(c1.end(), c.begin(), c.end());
        n1.insert(n1.end(), n.begin(), n.end());
        m1.insert(m1.end(), m.begin(), m.end());
      }
    }
    const std::string shape = "B3 NH3 dh40 chunk " + std::to_string(k);
    ok &= Report("slstm_chunk h", shape, RelError(dout.Download(), out), testing::kTolBf16);
    ok &= Report("slstm_chunk c", shape, RelError(dc.Download(), c), 1e-4);
    ok &= Report("slstm_chunk n", shape, RelError(dn.Download(), n), 1e-4);
    ok &= Report("slstm_chunk m", shape, RelError(dm.Download(), m), 1e-4);
    if (k > 1) {
      for (auto [dev, ref, name] : {std::tuple{&hh, &h1, "h"}, std::tuple{&hc, &c1, "c"}, std::tuple{&hn, &n1, "n"},
                                    std::tuple{&hm, &m1, "m"}}) {
        ok &= ReportHistory(std::string("slstm_chunk history ") + name, shape, *dev, (k - 1) * S, *ref, 1e-4);
      }
    }
  }
  EXPECT_TRUE(ok);
}

// Chunks of k = 1..5 and 37 on the same state for two shapes (the first takes 8-column slices, the second
// 32) and both forget gates: h at every position, (C, n, m) after the chunk, and the history.
TEST(MlstmStepGpuTest, MlstmChunkMatchesCpuSteps) {
  struct Case {
    int64_t B, NH, dk, dv;
    bool sigmoid;
  };
  for (const Case& cs : {Case{3, 3, 48, 40, true}, Case{5, 4, 64, 256, false}}) {
    std::mt19937_64 rng(13);
    DeviceAllocator alloc;
    const int64_t B = cs.B, NH = cs.NH, dk = cs.dk, dv = cs.dv, SC = B * NH * dk * dv, SN = B * NH * dk, SM = B * NH;
    // n, m ping-pong between two buffers (the kernel writes them out of place).
    DeviceArray<float> dc(&alloc, SC), dn0(&alloc, SN), dm0(&alloc, SM), dn1(&alloc, SN), dm1(&alloc, SM);
    DeviceArray<float>*dn = &dn0, *dm = &dm0, *dn_out = &dn1, *dm_out = &dm1;
    dc.Upload(std::vector<float>(SC, 0.f));
    dn0.Upload(std::vector<float>(SN, 0.f));
    dm0.Upload(std::vector<float>(SM, 0.f));
    std::vector<double> c(SC, 0.0), n(SN, 0.0), m(SM, 0.0);
    const cpu::MlstmOptions options{16, cs.sigmoid ? cpu::MlstmForgetGate::kSigmoid : cpu::MlstmForgetGate::kExponential,
                                    1e-6};
    bool ok = true;
    const std::string name = "B" + std::to_string(B) + " NH" + std::to_string(NH) + " dk" + std::to_string(dk) + " dv" +
                             std::to_string(dv) + (cs.sigmoid ? " sigmoid" : " exp");
    for (int64_t k : {1, 2, 3, 4, 5, 37}) {
      const auto q = RandomBf16Values(rng, k * B * NH * dk), kk = RandomBf16Values(rng, k * B * NH * dk),
                 v = RandomBf16Values(rng, k * B * NH * dv), ig = RandomBf16Values(rng, k * B * NH, 2.f);
      auto fg = RandomBf16Values(rng, k * B * NH, 1.f);
      if (!cs.sigmoid) {
        for (float& f : fg) f = -std::fabs(f) * 0.25f;  // exponential gate: log f <= 0
      }
      DeviceArray<bf16> dq(&alloc, q.size()), dkk(&alloc, kk.size()), dvv(&alloc, v.size()), dh(&alloc, k * B * NH * dv);
      DeviceArray<float> dig(&alloc, ig.size()), dfg(&alloc, fg.size());
      DeviceArray<float> hc(&alloc, std::max<int64_t>(1, (k - 1) * SC)), hn(&alloc, std::max<int64_t>(1, (k - 1) * SN)),
          hm(&alloc, std::max<int64_t>(1, (k - 1) * SM));
      dq.Upload(q);
      dkk.Upload(kk);
      dvv.Upload(v);
      dig.Upload(ig);
      dfg.Upload(fg);
      dh.Poison();
      MlstmStepChunkArgs a;
      a.batch = B; a.heads = NH; a.dk = dk; a.dv = dv; a.positions = k; a.sigmoid_forget = cs.sigmoid;
      a.q = dq.get(); a.k = dkk.get(); a.v = dvv.get(); a.ig = dig.get(); a.fg = dfg.get();
      a.c = dc.get(); a.n = dn->get(); a.m = dm->get(); a.n_out = dn_out->get(); a.m_out = dm_out->get();
      a.h = dh.get();
      if (k > 1) {
        a.c_history = hc.get(); a.n_history = hn.get(); a.m_history = hm.get();
      }
      ASSERT_TRUE(MlstmStepChunk(a, nullptr).ok());
      std::swap(dn, dn_out);
      std::swap(dm, dm_out);
      std::vector<double> h(k * B * NH * dv), histc, histn, histm;
      const std::vector<double> qd = D(q), kd = D(kk), vd = D(v), igd = D(ig), fgd = D(fg);
      for (int64_t j = 0; j < k; ++j) {
        cpu::mlstm_step_fwd_ref<double>({B, 1, NH, dk, dv}, options, qd.data() + j * B * NH * dk,
                                        kd.data() + j * B * NH * dk, vd.data() + j * B * NH * dv, igd.data() + j * B * NH,
                                        fgd.data() + j * B * NH, {c.data(), n.data(), m.data()},
                                        h.data() + j * B * NH * dv);
        if (j + 1 < k) {
          histc.insert(histc.end(), c.begin(), c.end());
          histn.insert(histn.end(), n.begin(), n.end());
          histm.insert(histm.end(), m.begin(), m.end());
        }
      }
      const std::string shape = name + " chunk " + std::to_string(k);
      ok &= Report("mlstm_chunk h", shape, RelError(dh.Download(), h), testing::kTolBf16);
      ok &= Report("mlstm_chunk C", shape, RelError(dc.Download(), c), 1e-4);
      ok &= Report("mlstm_chunk n", shape, RelError(dn->Download(), n), 1e-4);
      ok &= Report("mlstm_chunk m", shape, RelError(dm->Download(), m), 1e-5);
      if (k > 1) {
        ok &= ReportHistory("mlstm_chunk history C", shape, hc, (k - 1) * SC, histc, 1e-4);
        ok &= ReportHistory("mlstm_chunk history n", shape, hn, (k - 1) * SN, histn, 1e-4);
        ok &= ReportHistory("mlstm_chunk history m", shape, hm, (k - 1) * SM, histm, 1e-5);
      }
    }
    EXPECT_TRUE(ok) << name;
  }
}

}  // namespace
}  // namespace gyre::cuda
