// Mamba-2 SSD chunked forward and forward+backward timings (kernels/cuda/ssd.h; issue 8).
//
// Shapes (the anchor's, bench/anchor_ssd.py): H64 P64 N128 G1 chunk 256, B8 S2048 and B2 S8192;
// and mamba2-130m's training step (B16 S2048 H24, the same P, N, G, chunk; --shapes=4 or 5);
// dt_softplus with dt_bias, D skip, no initial state (as mamba_chunk_scan_combined is called in
// the anchor). Inputs are dense random data on the device (never zeros). Each line: median of
// `reps` runs timed with CUDA events, a 256 MiB memset before each run to flush L2 (the anchor's
// triton.testing.do_bench does the same), warm-up first; the FLOPs the kernels execute (causal
// tile pairs only) and the fewest bytes the contract allows (each input read once, each output
// written once, the saved buffer written once by the forward and read once by the backward).
//
//   ssd_bench [--reps=N] [--warmup=N] [--only=MASK] [--default_only] [--shapes=1|2|3]
//             [--path=TEXT] [--shape=B,S,H]
// MASK: the kSsdReg* bits of the variants to run (for per-kernel profiles); default all.
// --default_only: only the default path ("[v3 all]"; bench/anchor_ssd.py --alternate runs it
// between anchor timings). --shapes: 1 B8 S2048, 2 both, 3 only B2 S8192, 4 only B16 S2048 H24
// (mamba2-130m's step), 5 B8 S2048 and B16 S2048 H24. --shape=B,S,H: only that one shape
// (P64 N128 G1 Q256; e.g. B1 S512 H24 puts every block of the big four on its own SM, for the
// block-alone times of helper ssdpersist17's turnover diagnosis). --path: only the variants whose name
// contains TEXT (e.g. "un]" for one ncu profile of that variant). "[v3 all so]": the default
// kernels with GYRE_SSD_SIDE_STREAM=off (one stream), forced by SsdSetSideStreamForTesting
// whatever the environment; the others run the environment's form (hi by default: the backward's
// dCB → dB/dC chain on a second stream, helper ssd12). The v3 forward scan and dB/dC at these
// shapes (P64 N128) are helper ssdf13's wgmma kernels (ssd_fwd_wgmma.cu; session 13), dCB helper
// ssdc13's (ssd_dcb_wgmma.cuh; session 13).
// "[v3 all one]": the general one-head fused state kernel (GYRE_SSD_STATE=one, forced by
// SsdSetStateFormForTesting) instead of the default ct1 (helper ssdr13's compile-time form, the
// default at these shapes since helper cssdr13's call; mh2 / mh4 / ct2 / co are gone).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "bench/gpu_timing.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/device_allocator.h"
#include "kernels/cuda/random_fill.h"
#include "kernels/cuda/ssd.h"

namespace gyre::cuda {
namespace {

using bf16 = __nv_bfloat16;

struct Counts {
  double fwd_flops, bwd_flops, fwd_bytes, bwd_bytes;
};

// See the cost section at the top of kernels/cuda/ssd.cu.
Counts Count(const SsdShape& s, const SsdOptions& o) {
  const double B = s.batch, S = s.seq_len, H = s.num_heads, P = s.head_dim, N = s.state_dim,
               G = s.num_groups, Q = o.chunk_size;
  const double NC = std::ceil(S / Q), T = Q / 64, frac = (T * (T + 1) / 2) / (T * T);
  const double blocks = B * NC * H;
  const double qqn = 2 * Q * Q * N * frac, qqp = 2 * Q * Q * P * frac, qpn = 2 * Q * P * N;
  Counts c;
  c.fwd_flops = blocks * (qqn + qqp + 2 * qpn);
  c.bwd_flops = blocks * (qpn + qqn + 2 * qqp + 2 * qpn + 2 * (qqp + qpn)) +
                B * NC * G * 2 * (2 * Q * Q * N * frac);
  const double act = B * S * H * P * 2, bc = B * S * G * N * 2, dt = B * S * H * 4;
  const double saved = B * H * (NC + 1) * P * N * 4 + dt + B * H * NC * Q * 4;
  c.fwd_bytes = act + 2 * bc + dt + act + saved;
  c.bwd_bytes = act + 2 * bc + dt + saved + act /*dy*/ + act /*dx*/ + 2 * bc /*dB, dC*/ + dt;
  return c;
}

void Run(Timer& t, DeviceAllocator& alloc, int64_t batch, int64_t seq, int64_t heads,
         int only_mask, bool default_only, const std::string& path_filter) {
  SsdShape s{batch, seq, heads, 64, 1, 128};
  SsdOptions o;
  o.chunk_size = 256;
  const int64_t nx = s.batch * s.seq_len * s.num_heads * s.head_dim;
  const int64_t ndt = s.batch * s.seq_len * s.num_heads;
  const int64_t nbc = s.batch * s.seq_len * s.num_groups * s.state_dim;
  DeviceBuffer x, dt, alog, bias, bm, cm, dsk, y, saved, dy, dx, ddt, db, dc, da, ddb, dd;
  CUDA_OK_OR_DIE(alloc.Allocate(nx * 2, &x));
  CUDA_OK_OR_DIE(alloc.Allocate(ndt * 4, &dt));
  CUDA_OK_OR_DIE(alloc.Allocate(s.num_heads * 4, &alog));
  CUDA_OK_OR_DIE(alloc.Allocate(s.num_heads * 4, &bias));
  CUDA_OK_OR_DIE(alloc.Allocate(nbc * 2, &bm));
  CUDA_OK_OR_DIE(alloc.Allocate(nbc * 2, &cm));
  CUDA_OK_OR_DIE(alloc.Allocate(s.num_heads * 4, &dsk));
  CUDA_OK_OR_DIE(alloc.Allocate(nx * 2, &y));
  CUDA_OK_OR_DIE(alloc.Allocate(SsdSavedBytes(s, o), &saved));
  CUDA_OK_OR_DIE(alloc.Allocate(nx * 2, &dy));
  CUDA_OK_OR_DIE(alloc.Allocate(nx * 2, &dx));
  CUDA_OK_OR_DIE(alloc.Allocate(ndt * 4, &ddt));
  CUDA_OK_OR_DIE(alloc.Allocate(nbc * 2, &db));
  CUDA_OK_OR_DIE(alloc.Allocate(nbc * 2, &dc));
  CUDA_OK_OR_DIE(alloc.Allocate(s.num_heads * 4, &da));
  CUDA_OK_OR_DIE(alloc.Allocate(s.num_heads * 4, &ddb));
  CUDA_OK_OR_DIE(alloc.Allocate(s.num_heads * 4, &dd));
  // Mamba-2-like values: dt = softplus(raw + bias) ~ 0.01..0.1, A = −exp(A_log) in ~[−16, −1].
  CUDA_OK_OR_DIE(FillRandomBf16(x.as<bf16>(), nx, 0.f, 1.f, 1, nullptr));
  CUDA_OK_OR_DIE(FillRandomF32(dt.as<float>(), ndt, 0.f, 1.f, 2, nullptr));
  CUDA_OK_OR_DIE(FillRandomF32(alog.as<float>(), s.num_heads, 1.4f, 0.6f, 3, nullptr));
  CUDA_OK_OR_DIE(FillRandomF32(bias.as<float>(), s.num_heads, -3.f, 0.5f, 4, nullptr));
  CUDA_OK_OR_DIE(FillRandomBf16(bm.as<bf16>(), nbc, 0.f, 1.f, 5, nullptr));
  CUDA_OK_OR_DIE(FillRandomBf16(cm.as<bf16>(), nbc, 0.f, 1.f, 6, nullptr));
  CUDA_OK_OR_DIE(FillRandomF32(dsk.as<float>(), s.num_heads, 1.f, 0.2f, 7, nullptr));
  CUDA_OK_OR_DIE(FillRandomBf16(dy.as<bf16>(), nx, 0.f, 1.f, 8, nullptr));
  CUDA_CHECK_OR_DIE(cudaMemset(da.get(), 0, s.num_heads * 4));
  CUDA_CHECK_OR_DIE(cudaMemset(ddb.get(), 0, s.num_heads * 4));
  CUDA_CHECK_OR_DIE(cudaMemset(dd.get(), 0, s.num_heads * 4));

  SsdForwardArgs f;
  f.shape = s;
  f.options = o;
  f.x = x.as<bf16>();
  f.dt = dt.as<float>();
  f.a_log = alog.as<float>();
  f.dt_bias = bias.as<float>();
  f.b = bm.as<bf16>();
  f.c = cm.as<bf16>();
  f.d = dsk.as<float>();
  f.y = y.as<bf16>();
  f.saved = saved.get();
  SsdBackwardArgs g;
  g.shape = s;
  g.options = o;
  g.x = f.x;
  g.dt = f.dt;
  g.a_log = f.a_log;
  g.dt_bias = f.dt_bias;
  g.b = f.b;
  g.c = f.c;
  g.d = f.d;
  g.saved = saved.get();
  g.dy = dy.as<bf16>();
  g.dx = dx.as<bf16>();
  g.ddt = ddt.as<float>();
  g.db = db.as<bf16>();
  g.dc = dc.as<bf16>();
  g.da_log = da.as<float>();
  g.ddt_bias = ddb.as<float>();
  g.dd = dd.as<float>();

  const Counts c = Count(s, o);
  const std::string shape = "B" + std::to_string(batch) + " S" + std::to_string(seq) + " H" +
                            std::to_string(heads) + " P64 N128 G1 Q256";
  // Every kernel variant, each timed alone (so that a slower v3 kernel still leaves the best
  // combination measured): v2 mma.sync, then each v3 kernel on its own, then all v3 kernels.
  struct Path {
    const char* name;
    int mask;
    int fused_state = 0;  // SsdSetFusedStatePassForTesting
    int dcb_split = 0;  // SsdSetDcbSplitForTesting
    int side = 0;       // SsdSetSideStreamForTesting (0: the environment's form)
    int state_form = 0;   // SsdSetStateFormForTesting (0: the environment's GYRE_SSD_STATE)
  };
  const Path paths[] = {{"[v2 mma] ", 0},
                        {"[v3 fwd] ", kSsdRegScanFwd},
                        {"[v3 dbc] ", kSsdRegDbc},
                        {"[v3 state]", kSsdRegState},
                        {"[v3 dx+dbc]", kSsdRegDx | kSsdRegDbc},  // (dx implies dbc: ssd.h)
                        {"[v3 all] ", kSsdRegAll},
                        {"[v3 all fu]", kSsdRegAll, 1},    // fused state pass
                        {"[v3 all un]", kSsdRegAll, 2},      // unfused
                        {"[v3 all s2]", kSsdRegAll, 0, 2},   // dCB head split 2
                        {"[v3 all s8]", kSsdRegAll, 0, 8},   // 8
                        {"[v3 all so]", kSsdRegAll, 0, 0, 1},  // side stream off
                        // the general one-head fused state kernel (the default is helper
                        // ssdr13's ct1 where P 64 / slice 128; GYRE_SSD_STATE=one)
                        {"[v3 all one]", kSsdRegAll, 0, 0, 0, 2}};
  const int saved_mask = SsdRegisterPath();
  for (const Path& p : paths) {
    if (only_mask >= 0 && p.mask != only_mask) continue;
    if (!path_filter.empty() && std::string(p.name).find(path_filter) == std::string::npos) {
      continue;
    }
    if (default_only && (p.mask != kSsdRegAll || p.fused_state != 0 || p.dcb_split != 0 ||
                         p.side != 0 || p.state_form != 0)) {
      continue;
    }
    SsdSetRegisterPathForTesting(p.mask);
    SsdSetFusedStatePassForTesting(p.fused_state);
    SsdSetDcbSplitForTesting(p.dcb_split);
    SsdSetSideStreamForTesting(p.side);
    SsdSetStateFormForTesting(p.state_form);
    const double fwd = TimeMs(t, [&] { return SsdForward(f, nullptr); });
    const double fb = TimeMs(t, [&] {
      CUDA_RETURN_IF_NOT_OK(SsdForward(f, nullptr));
      return SsdBackward(g, &alloc, nullptr);
    });
    std::printf("ssd%-12s fwd      %-28s %8.3f ms  %7.1f GFLOP %7.1f TFLOP/s  %7.1f MB "
                "%7.1f GB/s\n",
                p.name, shape.c_str(), fwd, c.fwd_flops / 1e9, c.fwd_flops / (fwd * 1e-3) / 1e12,
                c.fwd_bytes / 1e6, c.fwd_bytes / (fwd * 1e-3) / 1e9);
    const double fl = c.fwd_flops + c.bwd_flops, by = c.fwd_bytes + c.bwd_bytes;
    std::printf("ssd%-12s fwd+bwd  %-28s %8.3f ms  %7.1f GFLOP %7.1f TFLOP/s  %7.1f MB "
                "%7.1f GB/s\n",
                p.name, shape.c_str(), fb, fl / 1e9, fl / (fb * 1e-3) / 1e12, by / 1e6,
                by / (fb * 1e-3) / 1e9);
    std::fflush(stdout);
  }
  SsdSetRegisterPathForTesting(saved_mask);
  SsdSetFusedStatePassForTesting(0);
  SsdSetDcbSplitForTesting(0);
  SsdSetSideStreamForTesting(0);
  SsdSetStateFormForTesting(0);
}

}  // namespace
}  // namespace gyre::cuda

int main(int argc, char** argv) {
  using namespace gyre::cuda;
  Timer t;
  int only_mask = -1, shapes = 2;
  bool default_only = false;
  std::string path_filter;
  int64_t one_b = 0, one_s = 0, one_h = 0;
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], "--reps=", 7) == 0) t.reps = std::max(1, std::atoi(argv[i] + 7));
    if (std::strncmp(argv[i], "--warmup=", 9) == 0) t.warmup = std::max(0, std::atoi(argv[i] + 9));
    if (std::strncmp(argv[i], "--only=", 7) == 0) only_mask = std::atoi(argv[i] + 7);
    if (std::strncmp(argv[i], "--shapes=", 9) == 0) shapes = std::atoi(argv[i] + 9);
    if (std::strcmp(argv[i], "--default_only") == 0) default_only = true;
    if (std::strncmp(argv[i], "--path=", 7) == 0) path_filter = argv[i] + 7;
    if (std::strncmp(argv[i], "--shape=", 8) == 0) {
      long long b = 0, s = 0, h = 0;
      if (std::sscanf(argv[i] + 8, "%lld,%lld,%lld", &b, &s, &h) != 3 || b < 1 || s < 1 || h < 1) {
        std::fprintf(stderr, "ssd_bench: --shape wants B,S,H (positive), got %s\n", argv[i] + 8);
        return 1;
      }
      one_b = b, one_s = s, one_h = h;
    }
  }
  std::printf("ssd_bench: default v3 mask %d\n", SsdRegisterPath());
  DeviceAllocator alloc;
  t.Init(&alloc);
  if (one_b > 0) {
    Run(t, alloc, one_b, one_s, one_h, only_mask, default_only, path_filter);
    return 0;
  }
  if (shapes == 1 || shapes == 2 || shapes == 5) {
    Run(t, alloc, 8, 2048, 64, only_mask, default_only, path_filter);
  }
  if (shapes == 2 || shapes == 3) Run(t, alloc, 2, 8192, 64, only_mask, default_only, path_filter);
  if (shapes == 4 || shapes == 5) Run(t, alloc, 16, 2048, 24, only_mask, default_only, path_filter);
  return 0;
}
