// The mLSTM block's output norm backward (ops/recurrent_cuda.h, NormMode::kMlstmOutput: LayerNorm
// per head, + skip ⊙ x_c, ⊙ SiLU(z)) at the xLSTM 1.3B's heads of 1024: the default kernel
// before session 19 (GroupNormBackward with GYRE_MLSTM_OUT_NORM=warp, which the bench sets:
// group_norm_bwd_vec<2, 32>, a warp per (row, head)) against the CTA-per-(32 rows, head) kernel (MlstmOutNormRowBackward, what
// GYRE_MLSTM_OUT_NORM=row routes heads of 512..1024 to; ops/XLSTM_GLUE.md "Session 19"), with and
// without the cell's dots, in one process.
//
// 1. Checks (print [PASS|FAIL], exit 1 on any failure), both kernels on the same random inputs
//    and the same statistics (the default forward's), outputs poisoned (NaN) before every run:
//    - band against the old kernel: dx (bf16) ||new - old|| / ||old|| <= 2e-3 and no element more
//      than 2 bf16 ulps apart (Band); dweight, dskip (fp32 sums over the rows) <= 1e-4. Not
//      bitwise: the row sums and the column sums are added in another (fixed) order. dz and dx_c
//      do not use the row sums: the same arithmetic, checked with the same band and reported
//      bitwise or not.
//    - the dots call: every other output bitwise the plain call's (the same kernel body).
//    - deterministic: the dots call twice gives the same bits (dx, dz, dxc, dweight, dskip, dots).
//    Shapes: 8192 x 4 x 1024 (xlstm[1:0]-1.3b B4), odd rows (37, 301: a partial last CTA), one
//    head; 2 x 512, 3 x 768 (350m / 760m widths); 384 (125m) must not be covered.
// 2. Timings (CUDA events, median of reps, L2 flushed before each; the dweight / dskip reduce
//    included): backward old, new, new + dots, alternating, 3 rounds, at xlstm[1:0]-1.3b B4
//    (8192 x 4096, 4 heads) — GB/s counted as 14 B an element (x, z, x_c, dy in; dx, dz, dx_c
//    out), 16 with the dots (+ h lo); and the old forward (8 B) for reference.
//
//   mlstm_out_norm_bench [--reps=N] [--no_timing]
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

// An mLSTM out-norm problem on the device: inputs random, outputs of one run.
struct Problem {
  int64_t rows = 0, dim = 0, groups = 1;
  DeviceBuffer x, z, xc, lo, w, skip, dy, y, mean, rstd, dx, dz, dxc, dw, ds, dots;

  void Init(DeviceAllocator& alloc, int64_t r, int64_t d, int64_t g, uint64_t seed) {
    rows = r; dim = d; groups = g;
    const int64_t n = rows * dim;
    for (DeviceBuffer* b : {&x, &z, &xc, &lo, &dy, &y, &dx, &dz, &dxc}) CUDA_OK_OR_DIE(alloc.Allocate(n * 2, b));
    for (DeviceBuffer* b : {&w, &skip, &dw, &ds}) CUDA_OK_OR_DIE(alloc.Allocate(dim * 4, b));
    for (DeviceBuffer* b : {&mean, &rstd, &dots}) CUDA_OK_OR_DIE(alloc.Allocate(rows * groups * 4, b));
    CUDA_OK_OR_DIE(FillRandomBf16(x.as<bf16>(), n, 0.f, 1.f, seed, nullptr));
    CUDA_OK_OR_DIE(FillRandomBf16(z.as<bf16>(), n, 0.f, 1.f, seed + 1, nullptr));
    CUDA_OK_OR_DIE(FillRandomBf16(xc.as<bf16>(), n, 0.f, 1.f, seed + 2, nullptr));
    CUDA_OK_OR_DIE(FillRandomBf16(dy.as<bf16>(), n, 0.f, 1.f, seed + 3, nullptr));
    CUDA_OK_OR_DIE(FillRandomBf16(lo.as<bf16>(), n, 0.f, 0.004f, seed + 4, nullptr));
    CUDA_OK_OR_DIE(FillRandomF32(w.as<float>(), dim, 0.f, 0.3f, seed + 5, nullptr));
    CUDA_OK_OR_DIE(FillRandomF32(skip.as<float>(), dim, 1.f, 0.5f, seed + 6, nullptr));
  }
  // MlstmBlock::OutputNormArgs and BackwardCuda's (LayerNorm, 1 + w, packed z, overwritten dparams).
  GroupNormArgs Args() const {
    GroupNormArgs n;
    n.mode = NormMode::kMlstmOutput;
    n.layer = true;
    n.rows = rows; n.dim = dim; n.groups = groups;
    n.eps = 1e-5f;
    n.weight_offset = 1.f;
    n.x = x.get(); n.weight = w.as<float>(); n.z = z.get(); n.ldz = dim; n.skip = skip.as<float>(); n.xc = xc.get();
    n.y = y.get(); n.mean = mean.as<float>(); n.rstd = rstd.as<float>();
    n.dy = dy.get(); n.dx = dx.get(); n.dz = dz.get(); n.dxc = dxc.get();
    n.dweight = dw.as<float>(); n.dskip = ds.as<float>();
    n.overwrite_dparams = true;
    return n;
  }
  void PoisonBackward() {
    for (DeviceBuffer* b : {&dx, &dz, &dxc, &dw, &ds, &dots})
      CUDA_CHECK_OR_DIE(cudaMemset(b->get(), 0xff, b->bytes()));  // NaN in bf16 and fp32
  }
  std::vector<unsigned char> BackwardBits(bool with_dots) const;
};

std::vector<unsigned char> Problem::BackwardBits(bool with_dots) const {
  std::vector<unsigned char> all;
  for (const DeviceBuffer* b : {&dx, &dz, &dxc, &dw, &ds}) {
    const std::vector<unsigned char> h = HostBytes(*b);
    all.insert(all.end(), h.begin(), h.end());
  }
  if (with_dots) {
    const std::vector<unsigned char> h = HostBytes(dots);
    all.insert(all.end(), h.begin(), h.end());
  }
  return all;
}

int failures = 0;

void Check(DeviceAllocator& alloc, int64_t rows, int64_t groups, int64_t gs, uint64_t seed) {
  Problem p;
  p.Init(alloc, rows, groups * gs, groups, seed);
  const std::string name = "mlstm out-norm rows " + std::to_string(rows) + " heads " + std::to_string(groups) +
                           " gs " + std::to_string(gs);
  const GroupNormArgs a = p.Args();
  if (!co::MlstmOutNormRowCovers(a, p.lo.get())) {
    std::printf("[FAIL] %s: not covered by the row kernel\n", name.c_str());
    ++failures;
    return;
  }
  const int64_t n = rows * p.dim;
  CUDA_OK_OR_DIE(co::GroupNormForward(a, nullptr));  // the statistics both backwards use
  p.PoisonBackward();
  CUDA_OK_OR_DIE(co::GroupNormBackward(a, &alloc, nullptr));
  const std::vector<double> dx_old = HostBf16(p.dx, n), dz_old = HostBf16(p.dz, n), dxc_old = HostBf16(p.dxc, n),
                            dw_old = HostF32(p.dw, p.dim), ds_old = HostF32(p.ds, p.dim);
  p.PoisonBackward();
  CUDA_OK_OR_DIE(co::MlstmOutNormRowBackward(a, p.lo.get(), nullptr, &alloc, nullptr));
  const std::vector<unsigned char> plain = p.BackwardBits(false);
  failures += !Band(name + " dx", HostBf16(p.dx, n), dx_old, 2e-3, 2, true);
  failures += !Band(name + " dz", HostBf16(p.dz, n), dz_old, 2e-3, 2, true);
  failures += !Band(name + " dxc", HostBf16(p.dxc, n), dxc_old, 2e-3, 2, true);
  failures += !Band(name + " dweight", HostF32(p.dw, p.dim), dw_old, 1e-4, 0, true);
  failures += !Band(name + " dskip", HostF32(p.ds, p.dim), ds_old, 1e-4, 0, true);
  std::vector<unsigned char> with_dots[2];
  for (int run = 0; run < 2; ++run) {
    p.PoisonBackward();
    CUDA_OK_OR_DIE(co::MlstmOutNormRowBackward(a, p.lo.get(), p.dots.as<float>(), &alloc, nullptr));
    with_dots[run] = p.BackwardBits(true);
  }
  const bool same_as_plain = std::equal(plain.begin(), plain.end(), with_dots[0].begin());
  const bool repeat = with_dots[0] == with_dots[1];
  p.PoisonBackward();
  CUDA_OK_OR_DIE(co::MlstmOutNormRowBackward(a, p.lo.get(), p.dots.as<float>(), &alloc, nullptr));
  const std::vector<double> dots = HostF32(p.dots, rows * groups);
  bool finite = true;
  for (double d : dots) finite = finite && std::isfinite(d);
  const bool ok = same_as_plain && repeat && finite;
  failures += !ok;
  std::printf("[%s] %s: dots call bitwise the plain call's other outputs %d, twice the same bits %d, dots finite %d\n",
              ok ? "PASS" : "FAIL", name.c_str(), same_as_plain, repeat, finite);
}

void Time(Timer& t, DeviceAllocator& alloc, const char* preset, int64_t rows, int64_t groups, int64_t gs) {
  Problem p;
  p.Init(alloc, rows, groups * gs, groups, 11);
  const GroupNormArgs a = p.Args();
  CUDA_OK_OR_DIE(co::GroupNormForward(a, nullptr));
  const double n = static_cast<double>(rows * groups * gs);
  double ms[4][3];
  for (int round = 0; round < 3; ++round) {
    ms[0][round] = TimeMs(t, [&] { return co::GroupNormBackward(a, &alloc, nullptr); });
    ms[1][round] = TimeMs(t, [&] { return co::MlstmOutNormRowBackward(a, p.lo.get(), nullptr, &alloc, nullptr); });
    ms[2][round] =
        TimeMs(t, [&] { return co::MlstmOutNormRowBackward(a, p.lo.get(), p.dots.as<float>(), &alloc, nullptr); });
    ms[3][round] = TimeMs(t, [&] { return co::GroupNormForward(a, nullptr); });
  }
  const char* what[4] = {"backward old (warp)     ", "backward new (row)      ", "backward new (row+dots) ",
                         "forward  (unchanged)    "};
  const double bytes_per[4] = {14, 14, 16, 8};
  for (int k = 0; k < 4; ++k) {
    std::vector<float> v(ms[k], ms[k] + 3);
    const double med = Median(v);
    std::printf("TIME %-16s %lld x %lld x %lld %s: %.4f %.4f %.4f ms, median %.4f ms, %.2f TB/s of the %.0f B floor\n",
                preset, (long long)rows, (long long)groups, (long long)gs, what[k], ms[k][0], ms[k][1], ms[k][2], med,
                bytes_per[k] * n / med / 1e9, bytes_per[k]);
  }
}

}  // namespace
}  // namespace gyre::cuda

int main(int argc, char** argv) {
  using namespace gyre::cuda;
  int reps = 30;
  bool timing = true;
  if (!norm_bench::ParseArgs(argc, argv, "mlstm_out_norm_bench", &reps, &timing)) return 2;
  // The old path is GroupNormBackward under GYRE_MLSTM_OUT_NORM=warp (the default was warp until
  // session 19); the switch is read once, so it is set before the first norm call.
  if (const char* e = std::getenv("GYRE_MLSTM_OUT_NORM"); e != nullptr && std::string(e) != "warp") {
    std::fprintf(stderr, "mlstm_out_norm_bench: GYRE_MLSTM_OUT_NORM must be unset or warp here (the old path)\n");
    return 2;
  }
  setenv("GYRE_MLSTM_OUT_NORM", "warp", /*overwrite=*/1);
  norm_bench::PrintDevice();
  DeviceAllocator alloc;
  Check(alloc, 8192, 4, 1024, 1);  // xlstm[1:0]-1.3b B4
  Check(alloc, 301, 4, 1024, 2);
  Check(alloc, 37, 1, 1024, 3);
  Check(alloc, 67, 2, 512, 4);
  Check(alloc, 45, 3, 768, 5);
  {  // the 125m heads (384) keep the prefetch kernels
    Problem p;
    p.Init(alloc, 5, 4 * 384, 4, 6);
    const bool covered = co::MlstmOutNormRowCovers(p.Args(), p.lo.get());
    failures += covered;
    std::printf("[%s] mlstm out-norm gs 384: not covered by the row kernel (covered %d)\n", covered ? "FAIL" : "PASS",
                covered);
  }
  if (timing) {
    Timer t;
    t.reps = reps;
    t.Init(&alloc);
    Time(t, alloc, "xlstm[1:0]-1.3b", 8192, 4, 1024);
  }
  std::printf("mlstm_out_norm_bench: %d check failures\n", failures);
  return failures == 0 ? 0 : 1;
}
