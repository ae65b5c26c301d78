// RMSNorm (+ residual) backward against its own dx-only form, the forward and a copy of the same
// bytes (kernels/cuda/norm.cu, norm_notes.md), in one process, rounds alternating. Helper
// normbwd22 (session 22) measured its GYRE_NORM_BWD variants with it; the winner (strided rows,
// PDL reduce) became the only path and the switch is gone.
//
// Per shape (rows x d: the Llama and Mamba-2 widths at 16K / 32K tokens):
//   1. checks: dx poisoned with NaN before each run is finite everywhere after it, and dw from the
//      same dw0 has the same bits in two runs (the float64 bands are norm_gpu_test's);
//   2. timings: --rounds rounds, each timing every entry (median of --reps CUDA-event runs, L2
//      flushed before each) in a rotated order; the table gives the median over rounds.
// Entries: the backward, the backward without dw ("dx only": no partials, no shared sums, no
// reduce), the RMSNorm+residual forward on the same shape (its bytes are the same 8 per element)
// and a device-to-device copy of the same byte count (read + written).
// Bytes per element of the backward: dy, s, dresidual read, dx written = 8 (+ 4 per row rstd).
//
//   norm_bwd_bench [--rounds=N] [--reps=N]
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "bench/gpu_timing.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/device_allocator.h"
#include "kernels/cuda/norm.h"
#include "kernels/cuda/random_fill.h"

namespace gyre::cuda {
namespace {

using bf16 = __nv_bfloat16;

struct Shape {
  int64_t rows, dim;
  const char* what;
};

struct Entry {
  std::string name;
  enum Kind { kBwd, kBwdDxOnly, kFwd, kCopy } kind;
};

template <typename T>
std::vector<T> Download(const T* p, int64_t n) {
  std::vector<T> h(n);
  CUDA_CHECK_OR_DIE(cudaMemcpy(h.data(), p, sizeof(T) * n, cudaMemcpyDeviceToHost));
  return h;
}

int Run(int rounds, int reps) {
  DeviceAllocator alloc;
  Timer t;
  t.reps = reps;
  t.Init(&alloc);
  const std::vector<Shape> shapes = {{16384, 768, "llama-125m / mamba2-130m, 16K tok"},
                                     {32768, 768, "llama-125m B16 step, 32K tok"},
                                     {16384, 1024, "mamba2-370m"},
                                     {16384, 1536, "mamba2-780m"},
                                     {16384, 2048, "llama-1.3b / mamba2-1.3b, 16K tok"}};
  const std::vector<Entry> entries = {{"backward", Entry::kBwd},
                                      {"backward dx only", Entry::kBwdDxOnly},
                                      {"forward (ref)", Entry::kFwd},
                                      {"copy 8 B/elem", Entry::kCopy}};
  int failures = 0;
  std::string table;
  uint64_t seed = 1;
  for (const Shape& sh : shapes) {
    const int64_t n = sh.rows * sh.dim;
    DeviceBuffer x, res, s, y, dy, dres, dx, w, rstd, dw, dw0, cp_src, cp_dst;
    for (DeviceBuffer* b : {&x, &res, &s, &y, &dy, &dres, &dx}) CUDA_OK_OR_DIE(alloc.Allocate(2 * n, b));
    CUDA_OK_OR_DIE(alloc.Allocate(2 * sh.dim, &w));
    CUDA_OK_OR_DIE(alloc.Allocate(4 * sh.rows, &rstd));
    CUDA_OK_OR_DIE(alloc.Allocate(4 * sh.dim, &dw));
    CUDA_OK_OR_DIE(alloc.Allocate(4 * sh.dim, &dw0));
    CUDA_OK_OR_DIE(alloc.Allocate(4 * n, &cp_src));
    CUDA_OK_OR_DIE(alloc.Allocate(4 * n, &cp_dst));
    CUDA_OK_OR_DIE(FillRandomBf16(x.as<bf16>(), n, 0.f, 1.f, seed++, nullptr));
    CUDA_OK_OR_DIE(FillRandomBf16(res.as<bf16>(), n, 0.f, 1.f, seed++, nullptr));
    CUDA_OK_OR_DIE(FillRandomBf16(dy.as<bf16>(), n, 0.f, 1.f, seed++, nullptr));
    CUDA_OK_OR_DIE(FillRandomBf16(dres.as<bf16>(), n, 0.f, 1.f, seed++, nullptr));
    CUDA_OK_OR_DIE(FillRandomBf16(w.as<bf16>(), sh.dim, 1.f, 0.2f, seed++, nullptr));
    CUDA_OK_OR_DIE(FillRandomF32(dw0.as<float>(), sh.dim, 0.f, 1.f, seed++, nullptr));
    CUDA_OK_OR_DIE(FillRandomF32(cp_src.as<float>(), n, 0.f, 1.f, seed++, nullptr));
    NormForwardArgs f;
    f.rows = sh.rows;
    f.dim = sh.dim;
    f.x = x.as<bf16>();
    f.residual = res.as<bf16>();
    f.residual_out = s.as<bf16>();
    f.weight = w.as<bf16>();
    f.y = y.as<bf16>();
    f.rstd = rstd.as<float>();
    CUDA_OK_OR_DIE(NormForward(f, nullptr));
    NormBackwardArgs g;
    g.rows = sh.rows;
    g.dim = sh.dim;
    g.dy = dy.as<bf16>();
    g.s = s.as<bf16>();
    g.weight = w.as<bf16>();
    g.rstd = rstd.as<float>();
    g.dresidual = dres.as<bf16>();
    g.dx = dx.as<bf16>();
    g.dweight = dw.as<float>();
    g.accumulate = true;
    NormBackwardArgs g_dx_only = g;
    g_dx_only.dweight = nullptr;

    // 1. Checks: every dx element written (NaN poison gone), dw bits the same run to run.
    const auto run_bwd = [&] {
      CUDA_CHECK_OR_DIE(cudaMemcpy(dw.get(), dw0.get(), 4 * sh.dim, cudaMemcpyDeviceToDevice));
      CUDA_CHECK_OR_DIE(cudaMemset(dx.get(), 0xff, 2 * n));  // NaN poison
      CUDA_OK_OR_DIE(NormBackward(g, &alloc, nullptr));
      CUDA_CHECK_OR_DIE(cudaDeviceSynchronize());
    };
    run_bwd();
    const std::vector<float> dw_first = Download(dw.as<float>(), sh.dim);
    run_bwd();
    const std::vector<float> dw_second = Download(dw.as<float>(), sh.dim);
    const std::vector<bf16> dx_h = Download(dx.as<bf16>(), n);
    int64_t not_finite = 0;
    for (int64_t i = 0; i < n; ++i) not_finite += !std::isfinite(__bfloat162float(dx_h[i]));
    for (float v : dw_second) not_finite += !std::isfinite(v);
    const bool repro = std::memcmp(dw_first.data(), dw_second.data(), 4 * sh.dim) == 0;
    const bool pass = not_finite == 0 && repro;
    failures += !pass;
    std::printf("== %lld x %lld (%s): [%s] dx and dw finite (%lld not), dw bits reproducible %s\n",
                static_cast<long long>(sh.rows), static_cast<long long>(sh.dim), sh.what, pass ? "PASS" : "FAIL",
                static_cast<long long>(not_finite), repro ? "yes" : "NO");

    // 2. Timings, rounds rotating the entry order.
    std::vector<std::vector<double>> ms(entries.size());
    for (int round = 0; round < rounds; ++round) {
      for (size_t k = 0; k < entries.size(); ++k) {
        const size_t i = (k + round) % entries.size();
        const Entry& e = entries[i];
        double m = 0;
        switch (e.kind) {
          case Entry::kBwd: m = TimeMs(t, [&] { return NormBackward(g, &alloc, nullptr); }); break;
          case Entry::kBwdDxOnly: m = TimeMs(t, [&] { return NormBackward(g_dx_only, &alloc, nullptr); }); break;
          case Entry::kFwd: m = TimeMs(t, [&] { return NormForward(f, nullptr); }); break;
          case Entry::kCopy:
            m = TimeMs(t, [&]() -> CudaResult {
              CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(cp_dst.get(), cp_src.get(), 4 * n, cudaMemcpyDeviceToDevice, nullptr));
              return {};
            });
            break;
        }
        ms[i].push_back(m);
      }
    }
    const double bytes = 8.0 * n + 4.0 * sh.rows;
    const double ref = Median(std::vector<float>(ms[0].begin(), ms[0].end()));
    const double copy = Median(std::vector<float>(ms.back().begin(), ms.back().end()));
    char line[256];
    for (size_t i = 0; i < entries.size(); ++i) {
      const double m = Median(std::vector<float>(ms[i].begin(), ms[i].end()));
      std::string all;
      for (double r : ms[i]) {
        char b[16];
        std::snprintf(b, sizeof(b), "%s%.4f", all.empty() ? "" : " ", r);
        all += b;
      }
      std::snprintf(line, sizeof(line), "| %lld x %lld | %s | %.4f | %.0f | %.0f%% | %.3f | %s |\n",
                    static_cast<long long>(sh.rows), static_cast<long long>(sh.dim), entries[i].name.c_str(), m,
                    bytes / (m * 1e-3) / 1e9, 100.0 * copy / m, m / ref, all.c_str());
      table += line;
    }
  }
  std::printf("\n| shape | entry | ms (median of rounds) | GB/s (8 B/elem) | of copy | / backward | rounds |\n|---|---|---|---|---|---|---|\n%s",
              table.c_str());
  std::printf("%s: %d check failures\n", failures ? "FAIL" : "PASS", failures);
  return failures ? 1 : 0;
}

}  // namespace
}  // namespace gyre::cuda

int main(int argc, char** argv) {
  int rounds = 5, reps = 20;
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], "--rounds=", 9) == 0) rounds = std::atoi(argv[i] + 9);
    if (std::strncmp(argv[i], "--reps=", 7) == 0) reps = std::atoi(argv[i] + 7);
  }
  return gyre::cuda::Run(rounds, reps);
}
