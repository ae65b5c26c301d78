// Causal depthwise conv1d + SiLU forward and forward+backward timings (kernels/cuda/conv1d.h).
//
// Shape: the Mamba-2 block's conv over xBC at B8 S2048 (d_inner 4096 + 2·G·N = 256 → 4352
// channels), width 4, SiLU, with bias; and 2·S for B2 S8192. Dense random inputs on the device;
// median of `reps` runs (CUDA events), 256 MiB memset before each run (L2 flush), warm-up first.
// Bytes: forward reads x, writes y (4 B per element); backward reads x, dy, writes dx (6 B per
// element); the weights and the dw partials are small. Anchor: bench/anchor_ssd.py (torch
// depthwise conv1d + SiLU, the Mamba2 module's fallback path; the causal_conv1d CUDA package is
// not installed on the device).
//
// --shapes=step: only the training-step presets' convs at B16 S2048 (xlstm[1:0]-125m: 1536
// channels; mamba2-130m: 1792), with the backward alone timed too (forward run once before, not
// timed). The backward's variant is the environment's GYRE_CONV_BWD (conv1d.cu: split when
// unset, or r128; any other value is an error), read once a process: A/B runs alternate
// it on one binary.
//
//   conv1d_bench [--reps=N] [--shapes=step]
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "kernels/cuda/conv1d.h"
#include "bench/gpu_timing.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/device_allocator.h"
#include "kernels/cuda/random_fill.h"

namespace gyre::cuda {
namespace {

using bf16 = __nv_bfloat16;

void Run(Timer& t, DeviceAllocator& alloc, int64_t batch, int64_t seq, int64_t channels, bool bwd_alone = false) {
  Conv1dShape s{batch, seq, channels, 4};
  const int64_t n = batch * seq * channels;
  DeviceBuffer x, w, bias, y, dy, dx, dw, db;
  CUDA_OK_OR_DIE(alloc.Allocate(n * 2, &x));
  CUDA_OK_OR_DIE(alloc.Allocate(n * 2, &y));
  CUDA_OK_OR_DIE(alloc.Allocate(n * 2, &dy));
  CUDA_OK_OR_DIE(alloc.Allocate(n * 2, &dx));
  CUDA_OK_OR_DIE(alloc.Allocate(channels * 4 * 4, &w));
  CUDA_OK_OR_DIE(alloc.Allocate(channels * 4 * 4, &dw));
  CUDA_OK_OR_DIE(alloc.Allocate(channels * 4, &bias));
  CUDA_OK_OR_DIE(alloc.Allocate(channels * 4, &db));
  CUDA_OK_OR_DIE(FillRandomBf16(x.as<bf16>(), n, 0.f, 1.f, 1, nullptr));
  CUDA_OK_OR_DIE(FillRandomBf16(dy.as<bf16>(), n, 0.f, 1.f, 2, nullptr));
  CUDA_OK_OR_DIE(FillRandomF32(w.as<float>(), channels * 4, 0.f, 0.5f, 3, nullptr));
  CUDA_OK_OR_DIE(FillRandomF32(bias.as<float>(), channels, 0.f, 0.5f, 4, nullptr));
  CUDA_CHECK_OR_DIE(cudaMemset(dw.get(), 0, channels * 16));
  CUDA_CHECK_OR_DIE(cudaMemset(db.get(), 0, channels * 4));
  Conv1dForwardArgs f;
  f.shape = s;
  f.options.silu = true;
  f.x = x.as<bf16>();
  f.w = w.as<float>();
  f.bias = bias.as<float>();
  f.y = y.as<bf16>();
  Conv1dBackwardArgs g;
  g.shape = s;
  g.options.silu = true;
  g.x = f.x;
  g.w = f.w;
  g.bias = f.bias;
  g.dy = dy.as<bf16>();
  g.dx = dx.as<bf16>();
  g.dw = dw.as<float>();
  g.dbias = db.as<float>();
  const double fwd = TimeMs(t, [&] { return Conv1dForward(f, nullptr); });
  const double fb = TimeMs(t, [&] {
    CUDA_RETURN_IF_NOT_OK(Conv1dForward(f, nullptr));
    return Conv1dBackward(g, &alloc, nullptr);
  });
  const std::string shape = "B" + std::to_string(batch) + " S" + std::to_string(seq) + " C" +
                            std::to_string(channels) + " K4 silu";
  const double fb_bytes = 4.0 * n, fbb_bytes = 10.0 * n;
  if (bwd_alone) {
    CUDA_OK_OR_DIE(Conv1dForward(f, nullptr));
    const double bwd = TimeMs(t, [&] { return Conv1dBackward(g, &alloc, nullptr); });
    std::printf("conv1d bwd     %-28s %8.3f ms  %7.1f MB %7.1f GB/s\n", shape.c_str(), bwd, 6.0 * n / 1e6,
                6.0 * n / (bwd * 1e-3) / 1e9);
  }
  std::printf("conv1d fwd     %-28s %8.3f ms  %7.1f MB %7.1f GB/s\n", shape.c_str(), fwd,
              fb_bytes / 1e6, fb_bytes / (fwd * 1e-3) / 1e9);
  std::printf("conv1d fwd+bwd %-28s %8.3f ms  %7.1f MB %7.1f GB/s\n", shape.c_str(), fb,
              fbb_bytes / 1e6, fbb_bytes / (fb * 1e-3) / 1e9);
  std::fflush(stdout);
}

}  // namespace
}  // namespace gyre::cuda

int main(int argc, char** argv) {
  using namespace gyre::cuda;
  Timer t;
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], "--reps=", 7) == 0) t.reps = std::max(1, std::atoi(argv[i] + 7));
  }
  bool step_shapes = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--shapes=step") == 0) step_shapes = true;
  }
  if (const char* v = std::getenv("GYRE_CONV_BWD")) std::printf("variant: GYRE_CONV_BWD=%s\n", v);
  DeviceAllocator alloc;
  t.Init(&alloc);
  if (step_shapes) {
    Run(t, alloc, 16, 2048, 1536, /*bwd_alone=*/true);
    Run(t, alloc, 16, 2048, 1792, /*bwd_alone=*/true);
    return 0;
  }
  Run(t, alloc, 8, 2048, 4352);
  Run(t, alloc, 2, 8192, 4352);
  return 0;
}
