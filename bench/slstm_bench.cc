// sLSTM persistent kernels (kernels/cuda/slstm.h) at the xLSTM presets' cell shapes, S 2048:
//   1.3B  d 2048, 4 heads × 512, B 8   (the anchor's shape in PERFORMANCE.md)
//   125M  d 768,  4 heads × 192, B 8 and B 16 (PERFORMANCE.md's anchor uses B 16)
// For each, through each selected algorithm: forward (saving for backward), backward
// recurrent kernel alone, backward with the dR product, and forward + backward. Median of `reps`
// runs after warm-ups, CUDA events around the op only, dense random inputs (never zeros). Per line:
// ms, µs per time step, FLOPs of the recurrent products (forward 2·B·4d·dh per step; backward twice
// that: dG R and dR), the minimal bytes (each input read once, each output written once) and the
// achieved rates. The sequential recurrence is latency-bound: µs per step is the number that
// matters.
//
// Also the DSMEM exchange alone (SlstmExchangeProbe). --trace: also runs the kClusterAsyncFast
// kernels once with SlstmForwardArgs::debug_trace and prints where a step's cycles go (slstm.h,
// kSlstmTraceSteps).
//
//   slstm_bench [--reps=N] [--csv=path] [--alg=cluster|flags|async|fast|next|all] [--trace]
// (default: fast, cluster and flags; fast = SlstmAlgorithm::kClusterAsyncFast, what kAuto runs;
// async = kClusterAsync; next = the experimental kClusterAsyncFastNext). --trace traces the fast
// kernels, and the next ones too when they are selected.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "bench/gpu_timing.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/device_allocator.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/random_fill.h"
#include "kernels/cuda/slstm.h"

namespace gyre::cuda {
namespace {

using bf16 = __nv_bfloat16;

struct Config {
  const char* name;
  int64_t batch, seq_len, num_heads, head_dim;
};

int Run(int argc, char** argv) {
  int reps = 20, warmup = 3;
  bool trace = false;
  FILE* csv = nullptr;
  std::vector<SlstmAlgorithm> algorithms = {SlstmAlgorithm::kClusterAsyncFast,
                                            SlstmAlgorithm::kCluster, SlstmAlgorithm::kFlags};
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--alg=flags") == 0) algorithms = {SlstmAlgorithm::kFlags};
    if (std::strcmp(argv[i], "--alg=cluster") == 0) algorithms = {SlstmAlgorithm::kCluster};
    if (std::strcmp(argv[i], "--alg=async") == 0) algorithms = {SlstmAlgorithm::kClusterAsync};
    if (std::strcmp(argv[i], "--alg=fast") == 0) algorithms = {SlstmAlgorithm::kClusterAsyncFast};
    if (std::strcmp(argv[i], "--alg=next") == 0) {
      algorithms = {SlstmAlgorithm::kClusterAsyncFastNext};
    }
    if (std::strcmp(argv[i], "--alg=all") == 0) {
      algorithms = {SlstmAlgorithm::kCluster, SlstmAlgorithm::kFlags, SlstmAlgorithm::kClusterAsync,
                    SlstmAlgorithm::kClusterAsyncFast, SlstmAlgorithm::kClusterAsyncFastNext};
    }
    if (std::strcmp(argv[i], "--trace") == 0) trace = true;
    if (std::strncmp(argv[i], "--reps=", 7) == 0) reps = std::max(1, std::atoi(argv[i] + 7));
    if (std::strncmp(argv[i], "--csv=", 6) == 0) csv = std::fopen(argv[i] + 6, "w");
  }
  cudaDeviceProp prop;
  CUDA_CHECK_OR_DIE(cudaGetDeviceProperties(&prop, 0));
  std::printf("slstm_bench on %s (%d SMs), reps %d (median), warm-up %d\n", prop.name,
              prop.multiProcessorCount, reps, warmup);
  if (csv) std::fprintf(csv, "config,op,ms,us_per_step,gflop,gbytes\n");

  DeviceAllocator alloc;
  std::unique_ptr<GemmContext> gemm;
  CUDA_OK_OR_DIE(GemmContext::Create(&alloc, &gemm));
  cudaStream_t stream;
  CUDA_CHECK_OR_DIE(cudaStreamCreate(&stream));
  cudaEvent_t start, stop;
  CUDA_CHECK_OR_DIE(cudaEventCreate(&start));
  CUDA_CHECK_OR_DIE(cudaEventCreate(&stop));

  // The DSMEM exchange alone (SlstmExchangeProbe), at the kernels' per-destination sizes:
  // 512 B = the forward's h slice (8 rows × 32 units bf16), 1 KB = kClusterAsyncFast's backward
  // partials (32 units × 8 rows fp32), 2 KB = kCluster's backward dG slice (8 × 4 × 32 bf16);
  // 16 B = one chunk (latency).
  for (const int cluster : {16, 6}) {
    for (const int bytes : {16, 512, 1024, 2048}) {
      float ms_barrier = 0, ms_async = 0;
      bool ok = true;
      for (int rep = 0; rep < 2 && ok; ++rep) {  // the first is a warm-up
        ok = SlstmExchangeProbe(cluster, 4, bytes, 2048, true, stream, &ms_barrier).ok() &&
             SlstmExchangeProbe(cluster, 4, bytes, 2048, false, stream, &ms_async).ok();
      }
      if (!ok) {
        std::printf("exchange probe cluster %d, %d B: failed\n", cluster, bytes);
        continue;
      }
      std::printf(
          "exchange probe: 4 clusters of %2d, %4d B a destination (%5d B in per CTA): "
          "barrier %.3f us/step, async %.3f us/step\n",
          cluster, bytes, cluster * bytes, ms_barrier * 1e3 / 2048, ms_async * 1e3 / 2048);
    }
  }

  const Config configs[] = {
      {"1.3B d2048 NH4 B8", 8, 2048, 4, 512},
      {"125M d768 NH4 B8", 8, 2048, 4, 192},
      {"125M d768 NH4 B16", 16, 2048, 4, 192},
  };
  std::printf("%-20s %-20s %9s %9s %9s %9s %9s\n", "config", "op", "ms", "us/step", "GFLOP",
              "TFLOP/s", "GB/s");
  for (const Config& c : configs) {
    const SlstmShape s{c.batch, c.seq_len, c.num_heads, c.head_dim};
    const int64_t B = c.batch, S = c.seq_len, d = c.num_heads * c.head_dim;
    DeviceBuffer gx, r, h, dh, dgx, dr, saved;
    CUDA_OK_OR_DIE(alloc.Allocate(sizeof(bf16) * B * S * 4 * d, &gx));
    CUDA_OK_OR_DIE(alloc.Allocate(sizeof(bf16) * 4 * d * c.head_dim, &r));
    CUDA_OK_OR_DIE(alloc.Allocate(sizeof(bf16) * B * S * d, &h));
    CUDA_OK_OR_DIE(alloc.Allocate(sizeof(bf16) * B * S * d, &dh));
    CUDA_OK_OR_DIE(alloc.Allocate(sizeof(bf16) * B * S * 4 * d, &dgx));
    CUDA_OK_OR_DIE(alloc.Allocate(sizeof(float) * 4 * d * c.head_dim, &dr));
    CUDA_OK_OR_DIE(alloc.Allocate(SlstmSavedBytes(s), &saved));
    CUDA_OK_OR_DIE(FillRandomBf16(gx.as<bf16>(), B * S * 4 * d, 0.f, 1.f, 1, stream));
    CUDA_OK_OR_DIE(FillRandomBf16(r.as<bf16>(), 4 * d * c.head_dim, 0.f,
                                  1.f / std::sqrt(float(c.head_dim)), 2, stream));
    CUDA_OK_OR_DIE(FillRandomBf16(dh.as<bf16>(), B * S * d, 0.f, 1.f, 3, stream));
    CUDA_OK_OR_DIE(FillRandomF32(dr.as<float>(), 4 * d * c.head_dim, 0.f, 1.f, 4, stream));

    SlstmForwardArgs fa;
    fa.shape = s;
    fa.gx = gx.as<bf16>();
    fa.r = r.as<bf16>();
    fa.h = h.as<bf16>();
    fa.saved = saved.get();
    SlstmBackwardArgs ba;
    ba.shape = s;
    ba.r = fa.r;
    ba.h = fa.h;
    ba.saved = saved.get();
    ba.dh = dh.as<bf16>();
    ba.d_gx = dgx.as<bf16>();
    ba.dr = dr.as<float>();
    SlstmBackwardArgs ba_nodr = ba;
    ba_nodr.dr = nullptr;

    const double step_flop = 2.0 * B * 4 * d * c.head_dim;
    const double tok = static_cast<double>(B * S);
    const double fwd_bytes = tok * d * (2 * 4 + 2 + 28);      // gx, h, saved
    const double bwd_rec_bytes = tok * d * (28 + 2 + 2 * 4);  // saved, dh, d_gx
    const double dr_bytes = tok * d * (2 * 4 + 2);            // re-read d_gx, h
    struct Op {
      std::string name;
      std::function<CudaResult()> fn;
      double flop, bytes;
    };
    std::vector<Op> ops;
    for (SlstmAlgorithm alg : algorithms) {
      const std::string tag = alg == SlstmAlgorithm::kCluster                ? " [cluster]"
                              : alg == SlstmAlgorithm::kClusterAsync         ? " [async]"
                              : alg == SlstmAlgorithm::kClusterAsyncFast     ? " [fast]"
                              : alg == SlstmAlgorithm::kClusterAsyncFastNext ? " [next]"
                                                                             : " [flags]";
      SlstmForwardArgs f = fa;
      SlstmBackwardArgs bk = ba, bk_nodr = ba_nodr;
      f.algorithm = bk.algorithm = bk_nodr.algorithm = alg;
      ops.push_back({"fwd" + tag, [&, f] { return SlstmForward(f, &alloc, stream); }, step_flop * S,
                     fwd_bytes});
      SlstmForwardArgs f_nosave = f;
      f_nosave.saved = nullptr;
      ops.push_back({"fwd nosave" + tag,
                     [&, f_nosave] { return SlstmForward(f_nosave, &alloc, stream); },
                     step_flop * S, tok * d * (2 * 4 + 2)});
      ops.push_back({"bwd rec" + tag,
                     [&, bk_nodr] { return SlstmBackward(bk_nodr, gemm.get(), &alloc, stream); },
                     step_flop * S, bwd_rec_bytes});
      ops.push_back({"bwd+dR" + tag,
                     [&, bk] { return SlstmBackward(bk, gemm.get(), &alloc, stream); },
                     2 * step_flop * S, bwd_rec_bytes + dr_bytes});
      ops.push_back({"fwd+bwd" + tag,
                     [&, f, bk] {
                       CUDA_RETURN_IF_NOT_OK(SlstmForward(f, &alloc, stream));
                       return SlstmBackward(bk, gemm.get(), &alloc, stream);
                     },
                     3 * step_flop * S, fwd_bytes + bwd_rec_bytes + dr_bytes});
    }
    // The forward fills `saved` and `h` once so the backward-only ops read real values.
    CUDA_OK_OR_DIE(SlstmForward(fa, &alloc, stream));
    for (const Op& op : ops) {
      bool ok = true;
      for (int i = 0; i < warmup && ok; ++i) {
        const CudaResult r = op.fn();
        if (!r.ok()) {
          std::printf("%-20s %-20s unavailable: %s\n", c.name, op.name.c_str(), r.message.c_str());
          ok = false;
        }
      }
      if (!ok) continue;
      CUDA_CHECK_OR_DIE(cudaStreamSynchronize(stream));
      std::vector<float> ms;
      for (int i = 0; i < reps; ++i) {
        CUDA_CHECK_OR_DIE(cudaEventRecord(start, stream));
        CUDA_OK_OR_DIE(op.fn());
        CUDA_CHECK_OR_DIE(cudaEventRecord(stop, stream));
        CUDA_CHECK_OR_DIE(cudaEventSynchronize(stop));
        float t = 0;
        CUDA_CHECK_OR_DIE(cudaEventElapsedTime(&t, start, stop));
        ms.push_back(t);
      }
      const double med = Median(ms);
      std::printf("%-20s %-20s %9.3f %9.2f %9.1f %9.2f %9.1f\n", c.name, op.name.c_str(), med,
                  med * 1e3 / S, op.flop * 1e-9, op.flop / (med * 1e-3) * 1e-12,
                  op.bytes / (med * 1e-3) * 1e-9);
      if (csv) {
        std::fprintf(csv, "%s,%s,%.4f,%.3f,%.2f,%.3f\n", c.name, op.name.c_str(), med,
                     med * 1e3 / S, op.flop * 1e-9, op.bytes * 1e-9);
      }
    }
    if (trace) {
      int khz = 0;
      (void)cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, 0);
      const int64_t n = SlstmTraceLongs(s);
      DeviceBuffer tb;
      CUDA_OK_OR_DIE(alloc.Allocate(sizeof(long long) * n, &tb));
      std::vector<SlstmAlgorithm> traced = {SlstmAlgorithm::kClusterAsyncFast};
      if (std::find(algorithms.begin(), algorithms.end(), SlstmAlgorithm::kClusterAsyncFastNext) !=
          algorithms.end()) {
        traced.push_back(SlstmAlgorithm::kClusterAsyncFastNext);
      }
      for (int job = 0; job < 2 * static_cast<int>(traced.size()); ++job) {
        const int dir = job % 2;
        const SlstmAlgorithm alg = traced[job / 2];
        const char* tag = alg == SlstmAlgorithm::kClusterAsyncFast ? "[fast]" : "[next]";
        CUDA_CHECK_OR_DIE(cudaMemsetAsync(tb.get(), 0, sizeof(long long) * n, stream));
        CudaResult r;
        if (dir == 0) {
          SlstmForwardArgs f = fa;
          f.algorithm = alg;
          f.debug_trace = tb.as<long long>();
          r = SlstmForward(f, &alloc, stream);
        } else {
          SlstmBackwardArgs bk = ba_nodr;
          bk.algorithm = alg;
          bk.debug_trace = tb.as<long long>();
          r = SlstmBackward(bk, gemm.get(), &alloc, stream);
        }
        if (!r.ok()) {
          std::printf("trace: %s\n", r.message.c_str());
          continue;
        }
        std::vector<long long> host(n);
        CUDA_CHECK_OR_DIE(cudaMemcpyAsync(host.data(), tb.get(), sizeof(long long) * n,
                                          cudaMemcpyDeviceToHost, stream));
        CUDA_CHECK_OR_DIE(cudaStreamSynchronize(stream));
        // Per CTA: mean cycles of each phase over steps 16..254 (phase 3 ends at the next start).
        const int first = 16, last = std::min<int>(kSlstmTraceSteps - 1, S - 2);
        double sum[4] = {0, 0, 0, 0}, worst[4] = {0, 0, 0, 0};
        int ctas = 0;
        for (int cta = 0; cta < 16; ++cta) {
          const long long* t0 = host.data() + int64_t{cta} * kSlstmTraceSteps * kSlstmTracePoints;
          if (t0[first * kSlstmTracePoints] == 0) continue;  // no such CTA
          ++ctas;
          for (int ph = 0; ph < 4; ++ph) {
            double acc = 0;
            for (int st = first; st < last; ++st) {
              const long long* q = t0 + st * kSlstmTracePoints;
              const long long end = ph < 3 ? q[ph + 1] : q[kSlstmTracePoints];
              acc += static_cast<double>(end - q[ph]);
            }
            const double mean = acc / (last - first);
            sum[ph] += mean;
            worst[ph] = std::max(worst[ph], mean);
          }
        }
        if (ctas == 0) continue;
        static const char* kNames[2][4] = {
            {"wait h", "MMA+reduce", "pointwise", "DSMEM stores"},
            {"wait+sum partials", "pointwise+barrier", "MMA+send", "loop"}};
        std::printf("trace %s %s %s (%d CTAs, clock %d kHz), cycles/step mean (max CTA):", c.name,
                    dir == 0 ? "fwd" : "bwd rec", tag, ctas, khz);
        double total = 0;
        for (int ph = 0; ph < 4; ++ph) {
          std::printf("  %s %.0f (%.0f)", kNames[dir][ph], sum[ph] / ctas, worst[ph]);
          total += sum[ph] / ctas;
        }
        std::printf("  = %.0f cycles", total);
        if (khz > 0) std::printf(" = %.2f us", total / khz * 1e3);
        std::printf("\n");
      }
    }
  }
  if (csv) std::fclose(csv);
  return 0;
}

}  // namespace
}  // namespace gyre::cuda

int main(int argc, char** argv) { return gyre::cuda::Run(argc, argv); }
