// Mamba-2's gated RMSNorm (ops/recurrent_cuda.h, NormMode::kGatedInput, RMS, one group per SSM
// group) at the presets' training shapes: the default kernels (GroupNormForward / Backward with
// GYRE_GATED_NORM unset: warp per (row, group)) against the CTA-per-row kernels
// (GatedNormRowForward / Backward, what GYRE_GATED_NORM=row routes groups wider than 1536 to;
// ops/MAMBA2_NORM.md), in one process.
//
// 1. Checks (print [PASS|FAIL], exit 1 on any failure), both paths on the same random inputs,
//    outputs poisoned (NaN) before every run:
//    - band against the old kernel: y, dx, dz (bf16) ||new - old|| / ||old|| <= 2e-3 and no
//      element more than 2 bf16 ulps (of its magnitude; Band) apart; rstd (fp32) <= 1e-5, dweight
//      (fp32 sums over the rows) <= 1e-4 (the float64 test's band). Not
//      bitwise: the row sums and dweight are added in another order (fixed, but not the old one).
//      The backward runs on the old forward's rstd, so only its own sums differ.
//    - deterministic: the row kernels twice on the same inputs give the same bits (y, rstd, dx,
//      dz, dweight).
//    Shapes: 4096-wide rows with 1 group (mamba2-1.3b, dz in rows of its in_proj width 8512) and
//    with 8 groups of 512; odd row counts (a partial last block of 32 rows); 2 groups of 2056 (a
//    partial second chunk); the 130m width 1536; 5120 must not be covered (above 4096).
// 2. Timings (CUDA events, median of reps, L2 flushed before each): forward and backward (+ the
//    dweight reduce) a layer, old and new alternating, 3 rounds, at mamba2-1.3b B8 (16384 x 4096)
//    and mamba2-130m B16 (32768 x 1536: not routed by the switch; the row kernels at 1536 are
//    timed for information), with GB/s counted as 6 B (forward) / 10 B (backward) an element.
//
//   gated_norm_bench [--reps=N] [--no_timing]
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "bench/gpu_timing.h"
#include "bench/norm_bench_util.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/device_allocator.h"
#include "kernels/cuda/random_fill.h"
#include "ops/recurrent_cuda.h"

namespace gyre::cuda {
namespace {

using bf16 = __nv_bfloat16;
using ops::GroupNormArgs;
using ops::NormMode;
namespace co = ops::cuda_ops;
using norm_bench::Band;
using norm_bench::HostBf16;
using norm_bench::HostBytes;
using norm_bench::HostF32;

// A gated-norm problem on the device: inputs random, outputs of one run.
struct Problem {
  int64_t rows = 0, dim = 0, groups = 1, lddz = 0;
  DeviceBuffer x, z, w, dy, y, rstd, dx, dz, dw;

  void Init(DeviceAllocator& alloc, int64_t r, int64_t d, int64_t g, int64_t ld_dz, uint64_t seed) {
    rows = r; dim = d; groups = g; lddz = ld_dz;
    const int64_t n = rows * dim, nz = rows * (lddz > 0 ? lddz : dim);
    CUDA_OK_OR_DIE(alloc.Allocate(n * 2, &x));
    CUDA_OK_OR_DIE(alloc.Allocate(n * 2, &z));
    CUDA_OK_OR_DIE(alloc.Allocate(n * 2, &dy));
    CUDA_OK_OR_DIE(alloc.Allocate(n * 2, &y));
    CUDA_OK_OR_DIE(alloc.Allocate(n * 2, &dx));
    CUDA_OK_OR_DIE(alloc.Allocate(nz * 2, &dz));
    CUDA_OK_OR_DIE(alloc.Allocate(dim * 4, &w));
    CUDA_OK_OR_DIE(alloc.Allocate(dim * 4, &dw));
    CUDA_OK_OR_DIE(alloc.Allocate(rows * groups * 4, &rstd));
    CUDA_OK_OR_DIE(FillRandomBf16(x.as<bf16>(), n, 0.f, 1.f, seed, nullptr));
    CUDA_OK_OR_DIE(FillRandomBf16(z.as<bf16>(), n, 0.f, 1.f, seed + 1, nullptr));
    CUDA_OK_OR_DIE(FillRandomBf16(dy.as<bf16>(), n, 0.f, 1.f, seed + 2, nullptr));
    CUDA_OK_OR_DIE(FillRandomF32(w.as<float>(), dim, 1.f, 0.3f, seed + 3, nullptr));
  }
  // Mamba2Block's arguments (RMS, weight, packed z, dz rows of lddz, dweight overwritten).
  GroupNormArgs Args() const {
    GroupNormArgs n;
    n.mode = NormMode::kGatedInput;
    n.layer = false;
    n.rows = rows; n.dim = dim; n.groups = groups;
    n.eps = 1e-5f;
    n.x = x.get(); n.weight = w.as<float>(); n.z = z.get(); n.ldz = dim;
    n.y = y.get(); n.rstd = rstd.as<float>();
    n.dy = dy.get(); n.dx = dx.get(); n.dz = dz.get(); n.lddz = static_cast<int32_t>(lddz);
    n.dweight = dw.as<float>();
    n.overwrite_dparams = true;
    return n;
  }
  void Poison(bool forward) {
    auto nan = [](DeviceBuffer& b) { CUDA_CHECK_OR_DIE(cudaMemset(b.get(), 0xff, b.bytes())); };  // NaN in bf16 and fp32
    if (forward) { nan(y); nan(rstd); } else { nan(dx); nan(dz); nan(dw); }
  }
};

// dz's first dim columns of each row of lddz.
std::vector<double> HostDz(const Problem& p) {
  const int64_t ld = p.lddz > 0 ? p.lddz : p.dim;
  const std::vector<double> wide = HostBf16(p.dz, p.rows * ld);
  std::vector<double> out(p.rows * p.dim);
  for (int64_t r = 0; r < p.rows; ++r)
    for (int64_t c = 0; c < p.dim; ++c) out[r * p.dim + c] = wide[r * ld + c];
  return out;
}

int failures = 0;

void Check(DeviceAllocator& alloc, int64_t rows, int64_t groups, int64_t gs, int64_t lddz, uint64_t seed) {
  Problem p;
  p.Init(alloc, rows, groups * gs, groups, lddz, seed);
  const std::string name = "gated norm rows " + std::to_string(rows) + " groups " + std::to_string(groups) + " gs " +
                           std::to_string(gs) + (lddz > 0 ? " lddz " + std::to_string(lddz) : "");
  const GroupNormArgs a = p.Args();
  if (!co::GatedNormRowCovers(a, false) || !co::GatedNormRowCovers(a, true)) {
    std::printf("[FAIL] %s: not covered by the row kernels\n", name.c_str());
    ++failures;
    return;
  }
  const int64_t n = rows * p.dim, ns = rows * groups;
  // Old forward, then the old and new backward on its rstd.
  p.Poison(true);
  CUDA_OK_OR_DIE(co::GroupNormForward(a, nullptr));
  const std::vector<double> y_old = HostBf16(p.y, n), rstd_old = HostF32(p.rstd, ns);
  p.Poison(false);
  CUDA_OK_OR_DIE(co::GroupNormBackward(a, &alloc, nullptr));
  const std::vector<double> dx_old = HostBf16(p.dx, n), dz_old = HostDz(p), dw_old = HostF32(p.dw, p.dim);
  std::vector<unsigned char> bwd_bits[2];
  for (int run = 0; run < 2; ++run) {
    p.Poison(false);
    CUDA_OK_OR_DIE(co::GatedNormRowBackward(a, &alloc, nullptr));
    bwd_bits[run] = HostBytes(p.dx);
    for (const DeviceBuffer* b : {&p.dz, &p.dw}) {
      const std::vector<unsigned char> h = HostBytes(*b);
      bwd_bits[run].insert(bwd_bits[run].end(), h.begin(), h.end());
    }
  }
  failures += !Band(name + " dx", HostBf16(p.dx, n), dx_old, 2e-3, 2, false);
  failures += !Band(name + " dz", HostDz(p), dz_old, 2e-3, 2, false);
  failures += !Band(name + " dweight", HostF32(p.dw, p.dim), dw_old, 1e-4, 0, false);
  std::vector<unsigned char> fwd_bits[2];
  for (int run = 0; run < 2; ++run) {
    p.Poison(true);
    CUDA_OK_OR_DIE(co::GatedNormRowForward(a, nullptr));
    fwd_bits[run] = HostBytes(p.y);
    const std::vector<unsigned char> h = HostBytes(p.rstd);
    fwd_bits[run].insert(fwd_bits[run].end(), h.begin(), h.end());
  }
  failures += !Band(name + " y", HostBf16(p.y, n), y_old, 2e-3, 2, false);
  failures += !Band(name + " rstd", HostF32(p.rstd, ns), rstd_old, 1e-5, 0, false);
  const bool same = fwd_bits[0] == fwd_bits[1] && bwd_bits[0] == bwd_bits[1];
  failures += !same;
  std::printf("[%s] %s: row kernels twice, the same bits (y, rstd, dx, dz with its other columns, dweight) %d\n",
              same ? "PASS" : "FAIL", name.c_str(), same);
}

void Time(Timer& t, DeviceAllocator& alloc, const char* preset, int64_t rows, int64_t dim, int64_t lddz) {
  Problem p;
  p.Init(alloc, rows, dim, 1, lddz, 11);
  const GroupNormArgs a = p.Args();
  CUDA_OK_OR_DIE(co::GroupNormForward(a, nullptr));  // rstd for the backward
  const double n = static_cast<double>(rows * dim);
  double ms[4][3];
  for (int round = 0; round < 3; ++round) {
    ms[0][round] = TimeMs(t, [&] { return co::GroupNormForward(a, nullptr); });
    ms[1][round] = TimeMs(t, [&] { return co::GatedNormRowForward(a, nullptr); });
    ms[2][round] = TimeMs(t, [&] { return co::GroupNormBackward(a, &alloc, nullptr); });
    ms[3][round] = TimeMs(t, [&] { return co::GatedNormRowBackward(a, &alloc, nullptr); });
  }
  const char* what[4] = {"forward  old (warp)", "forward  new (row) ", "backward old (warp)", "backward new (row) "};
  for (int k = 0; k < 4; ++k) {
    std::vector<float> v(ms[k], ms[k] + 3);
    const double med = Median(v), bytes = (k < 2 ? 6.0 : 10.0) * n;
    std::printf("TIME %-12s %lld x %lld %s: %.4f %.4f %.4f ms, median %.4f ms, %.2f TB/s of the %s floor\n", preset,
                (long long)rows, (long long)dim, what[k], ms[k][0], ms[k][1], ms[k][2], med, bytes / med / 1e9,
                k < 2 ? "6 B" : "10 B");
  }
}

}  // namespace
}  // namespace gyre::cuda

int main(int argc, char** argv) {
  using namespace gyre::cuda;
  int reps = 30;
  bool timing = true;
  if (!norm_bench::ParseArgs(argc, argv, "gated_norm_bench", &reps, &timing)) return 2;
  if (std::getenv("GYRE_GATED_NORM") != nullptr) {
    std::fprintf(stderr, "gated_norm_bench: unset GYRE_GATED_NORM (the old path is GroupNormForward's default)\n");
    return 2;
  }
  norm_bench::PrintDevice();
  DeviceAllocator alloc;
  Check(alloc, 16384, 1, 4096, 8512, 1);  // mamba2-1.3b B8: in_proj width 4096 + 4352 + 64
  Check(alloc, 301, 1, 4096, 8512, 2);
  Check(alloc, 301, 1, 4096, 0, 3);
  Check(alloc, 37, 8, 512, 0, 4);
  Check(alloc, 37, 2, 2056, 4112 + 24, 5);
  {  // above the row kernels' 4096 columns (mamba2-2.7b's 5120 keeps the warp kernels)
    Problem p;
    p.Init(alloc, 5, 5120, 1, 0, 6);
    const bool covered = co::GatedNormRowCovers(p.Args(), false) || co::GatedNormRowCovers(p.Args(), true);
    failures += covered;
    std::printf("[%s] gated norm gs 5120: not covered by the row kernels (covered %d)\n", covered ? "FAIL" : "PASS",
                covered);
  }
  Check(alloc, 1001, 1, 1536, 3352, 7);  // the 130m width (not routed by the switch)
  if (timing) {
    Timer t;
    t.reps = reps;
    t.Init(&alloc);
    Time(t, alloc, "mamba2-1.3b", 16384, 4096, 8512);
    Time(t, alloc, "mamba2-130m", 32768, 1536, 3352);
  }
  std::printf("gated_norm_bench: %d check failures\n", failures);
  return failures == 0 ? 0 : 1;
}
