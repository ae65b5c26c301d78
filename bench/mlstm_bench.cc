// mLSTM chunkwise forward and forward+backward on the GPU (kernels/cuda/mlstm.h), at the shapes
// of bench/anchor_mlstm.py (NX-AI/mlstm_kernels TFLA `chunkwise--triton_xl_chunk`, run in the same
// device call):
//   xlstm-1.3b-like: B8 S2048 NH4 dk256 dv512 chunk 128 (16,384 tokens)
//   xLSTM-7B heads:  B1 S8192 NH8 dk256 dv512 chunk 128 (8,192 tokens, MODELS.md §1.5 layout;
//                    the same number of head-tokens as the first shape)
//   xlstm-125m cell: B16 S2048 NH4 dk384 dv384, chunk 64 (the ops/ presets' default) and 128
//   chunk 256 (opt-in, session 15) beside 128 at the 125m cell, the 1.3b-like layout and the ops/
//   xlstm[1:0]-1.3b cell B4 S2048 NH4 dk = dv = 1024 ("xlstm-1.3b-cell"; no TFLA anchor)
// Inputs: q, k, v, dh bf16 N(0, 1); ĩ N(0, 1), f̃ N(3, 1) fp32 (TFLA's benchmark draws randn for
// all; a positive forget bias is the realistic regime and does not change the work). Each line:
// median of `reps` CUDA-event timings after warm-up, FLOPs (the causal half of the intra-chunk
// products counted), minimal bytes (inputs read once, outputs written once, saved states written
// and read once), TFLOP/s and GB/s.
//
// --compare_dir=DIR: reads the small-shape inputs and TFLA outputs/gradients written there by
// anchor_mlstm.py (raw little-endian float32, TFLA layout [B, NH, S, D]), runs ours with both
// gradient conventions and prints the relative differences (which convention TFLA computes).
//
// Then the generation step (MlstmStepForward) at B1 / B8 of the 7B heads: µs per step and the
// bandwidth of its state stream (RunStep).
//
// --only=SUBSTR[,SUBSTR...]: only the problems whose "name Lchunk [variant]" label contains one
// of the SUBSTRs (and no step lines). --once: one forward + backward per selected problem, no timing (for ncu).
// --states: also time the states-only recomputation (MlstmChunkwiseCopyTokens after the forward +
// MlstmChunkwiseRecomputeStates, helper mem12; ops GYRE_MLSTM_RECOMPUTE=states) against the
// forward it replaces in the backward (line "STATES name Lchunk variant fwd_ms= states_ms=").
//
// --dram: first the plain DRAM streams the state kernels' traffic is measured against (session
// 17, helper state17): cudaMemsetAsync of 661 MiB (~ state_fwd's C_k writes at the 125m cell) and
// a device-to-device cudaMemcpyAsync of 430 MiB (1:1; state_fwd writes 77% of its 0.86 GB),
// "DRAM memset ... TB/s" / "DRAM memcpy ... TB/s" lines (MB = 10^6 bytes there). H100 (session 17):
// 3.18-3.20 TB/s write only, 2.96-2.97 TB/s copy; the state kernels reach ~2.35-2.45.
//
// --store_probe: mlstm_state_fwd_ws_tail's stores (and K / V loads) at the 125m cell without its
// math (bench/mlstm_store_probe.cu; session 17, helper stateio17): "PROBE name ms TB/s" lines,
// bytes counted exactly (writes: C_k hi + lo for k = 0..NC, the fp32 last state, n_k; reads: K and
// V once), and how many 16-byte output words a launch left unwritten (must be 0).
//
//   mlstm_bench [--reps=N] [--compare_dir=DIR] [--only=SUBSTR] [--once] [--states] [--dram]
//               [--store_probe]
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
#include "bench/mlstm_store_probe.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/device_allocator.h"
#include "kernels/cuda/mlstm.h"
#include "kernels/cuda/random_fill.h"

namespace gyre::cuda {
namespace {

using bf16 = __nv_bfloat16;

double TimeMs(const std::function<void()>& op, int reps, cudaStream_t stream) {
  cudaEvent_t a, b;
  CUDA_CHECK_OR_DIE(cudaEventCreate(&a));
  CUDA_CHECK_OR_DIE(cudaEventCreate(&b));
  for (int i = 0; i < 5; ++i) op();
  CUDA_CHECK_OR_DIE(cudaStreamSynchronize(stream));
  std::vector<float> ms;
  for (int i = 0; i < reps; ++i) {
    CUDA_CHECK_OR_DIE(cudaEventRecord(a, stream));
    op();
    CUDA_CHECK_OR_DIE(cudaEventRecord(b, stream));
    CUDA_CHECK_OR_DIE(cudaEventSynchronize(b));
    float t = 0;
    CUDA_CHECK_OR_DIE(cudaEventElapsedTime(&t, a, b));
    ms.push_back(t);
  }
  CUDA_CHECK_OR_DIE(cudaEventDestroy(a));
  CUDA_CHECK_OR_DIE(cudaEventDestroy(b));
  return Median(ms);
}

// Per-kernel breakdown through MlstmSetLaunchHook: an event after every launch.
struct HookEvents {
  std::vector<cudaEvent_t> pool;
  std::vector<std::pair<const char*, cudaEvent_t>> seen;
};
HookEvents* g_events = nullptr;
void RecordLaunch(const char* name, cudaStream_t stream) {
  HookEvents& h = *g_events;
  if (h.seen.size() == h.pool.size()) {
    cudaEvent_t e;
    CUDA_CHECK_OR_DIE(cudaEventCreate(&e));
    h.pool.push_back(e);
  }
  cudaEvent_t e = h.pool[h.seen.size()];
  CUDA_CHECK_OR_DIE(cudaEventRecord(e, stream));
  h.seen.push_back({name, e});
}

void Breakdown(const std::function<void()>& op, int reps, cudaStream_t stream) {
  HookEvents h;
  g_events = &h;
  MlstmSetLaunchHook(&RecordLaunch);
  cudaEvent_t start;
  CUDA_CHECK_OR_DIE(cudaEventCreate(&start));
  std::vector<std::string> names;
  std::vector<std::vector<float>> times;
  for (int r = 0; r < reps + 3; ++r) {
    h.seen.clear();
    CUDA_CHECK_OR_DIE(cudaEventRecord(start, stream));
    op();
    CUDA_CHECK_OR_DIE(cudaStreamSynchronize(stream));
    if (r < 3) continue;  // warm-up
    cudaEvent_t prev = start;
    for (size_t i = 0; i < h.seen.size(); ++i) {
      float t = 0;
      CUDA_CHECK_OR_DIE(cudaEventElapsedTime(&t, prev, h.seen[i].second));
      prev = h.seen[i].second;
      if (names.size() <= i) {
        names.push_back(h.seen[i].first);
        times.emplace_back();
      }
      times[i].push_back(t);
    }
  }
  MlstmSetLaunchHook(nullptr);
  g_events = nullptr;
  std::printf("  per kernel (median ms):");
  for (size_t i = 0; i < names.size(); ++i) {
    std::printf(" %s %.3f", names[i].c_str() + 6, Median(times[i]));  // drop "mlstm_"
  }
  std::printf("\n");
  CUDA_CHECK_OR_DIE(cudaEventDestroy(start));
  for (cudaEvent_t e : h.pool) CUDA_CHECK_OR_DIE(cudaEventDestroy(e));
}

// A kernel path (MlstmOptions knobs): "v2" = the defaults (split precision, chunk-parallel gate
// scans, automatic state tile); "v1" = the first version's knobs (bf16 states, sequential gate
// scans, 64×64 state tiles; with this version's store paths); the others fix one knob.
struct Variant {
  const char* name;
  MlstmStatePrecision precision;
  MlstmGateSchedule gates;
  int64_t state_tile;
  MlstmStateWeights weights = MlstmStateWeights::kAuto;
  int64_t io_slab = 0;
  MlstmBwdDvKernel bwd_dv = MlstmBwdDvKernel::kAuto;  // kAuto: GYRE_MLSTM_BWD_DV (unset: wgf)
  MlstmPersist persist = MlstmPersist::kOff;          // chunk 128's fwd_out on a persistent grid
  MlstmRingRelease ring = MlstmRingRelease::kAuto;    // kAuto: GYRE_MLSTM_RING (unset: eager)
};

struct Problem {
  const char* name;
  MlstmShape shape;
  int64_t chunk;
  Variant variant;
};

std::string Label(const Problem& pr) {
  return std::string(pr.name) + " L" + std::to_string(pr.chunk) + " [" + pr.variant.name + "]";
}

bool g_time_states = false;  // --states

void RunShape(const Problem& pr, int reps, bool once, cudaStream_t stream) {
  DeviceAllocator alloc;
  const MlstmShape& s = pr.shape;
  MlstmOptions opt;
  opt.chunk_size = pr.chunk;
  opt.state_precision = pr.variant.precision;
  opt.gate_schedule = pr.variant.gates;
  opt.state_tile = pr.variant.state_tile;
  opt.state_weights = pr.variant.weights;
  opt.io_slab = pr.variant.io_slab;
  opt.bwd_dv = pr.variant.bwd_dv;
  opt.persist = pr.variant.persist;
  opt.ring = pr.variant.ring;
  const int64_t T = s.batch * s.seq_len * s.num_heads;
  DeviceBuffer q, k, v, h, dh, dq, dk, dv, ig, fg, dig, dfg, saved, scratch;
  CUDA_OK_OR_DIE(alloc.Allocate(T * s.dk * 2, &q));
  CUDA_OK_OR_DIE(alloc.Allocate(T * s.dk * 2, &k));
  CUDA_OK_OR_DIE(alloc.Allocate(T * s.dv * 2, &v));
  CUDA_OK_OR_DIE(alloc.Allocate(T * s.dv * 2, &h));
  CUDA_OK_OR_DIE(alloc.Allocate(T * s.dv * 2, &dh));
  CUDA_OK_OR_DIE(alloc.Allocate(T * s.dk * 2, &dq));
  CUDA_OK_OR_DIE(alloc.Allocate(T * s.dk * 2, &dk));
  CUDA_OK_OR_DIE(alloc.Allocate(T * s.dv * 2, &dv));
  CUDA_OK_OR_DIE(alloc.Allocate(T * 4, &ig));
  CUDA_OK_OR_DIE(alloc.Allocate(T * 4, &fg));
  CUDA_OK_OR_DIE(alloc.Allocate(T * 4, &dig));
  CUDA_OK_OR_DIE(alloc.Allocate(T * 4, &dfg));
  CUDA_OK_OR_DIE(alloc.Allocate(MlstmChunkwiseSavedBytes(s, opt), &saved));
  CUDA_OK_OR_DIE(alloc.Allocate(MlstmChunkwiseBackwardScratchBytes(s, opt), &scratch));
  CUDA_OK_OR_DIE(FillRandomBf16(q.as<bf16>(), T * s.dk, 0.f, 1.f, 1, stream));
  CUDA_OK_OR_DIE(FillRandomBf16(k.as<bf16>(), T * s.dk, 0.f, 1.f, 2, stream));
  CUDA_OK_OR_DIE(FillRandomBf16(v.as<bf16>(), T * s.dv, 0.f, 1.f, 3, stream));
  CUDA_OK_OR_DIE(FillRandomBf16(dh.as<bf16>(), T * s.dv, 0.f, 1.f, 4, stream));
  CUDA_OK_OR_DIE(FillRandomF32(ig.as<float>(), T, 0.f, 1.f, 5, stream));
  CUDA_OK_OR_DIE(FillRandomF32(fg.as<float>(), T, 3.f, 1.f, 6, stream));
  MlstmDeviceInputs in{q.as<bf16>(), k.as<bf16>(), v.as<bf16>(), ig.as<float>(), fg.as<float>()};
  auto fwd = [&] {
    CUDA_OK_OR_DIE(MlstmChunkwiseForward(s, opt, in, {}, h.as<bf16>(), saved.get(), {}, stream));
  };
  auto bwd = [&] {
    CUDA_OK_OR_DIE(MlstmChunkwiseBackward(
        s, opt, in, {}, h.as<bf16>(), saved.get(), dh.as<bf16>(), {},
        {dq.as<bf16>(), dk.as<bf16>(), dv.as<bf16>(), dig.as<float>(), dfg.as<float>()}, {},
        scratch.get(), stream));
  };
  if (once) {
    fwd();
    bwd();
    CUDA_CHECK_OR_DIE(cudaStreamSynchronize(stream));
    std::printf("once: %s\n", Label(pr).c_str());
    return;
  }
  const double fwd_ms = TimeMs(fwd, reps, stream);
  const double fb_ms = TimeMs([&] { fwd(); bwd(); }, reps, stream);
  const double bwd_ms = TimeMs(bwd, reps, stream);
  opt.stop_normaliser_gradient = true;
  const double fb_tfla_ms = TimeMs([&] { fwd(); bwd(); }, reps, stream);

  // FLOPs (2 per MAC), per head-chunk of length L (causal half of L×L products):
  const double L = pr.chunk, DK = s.dk, DV = s.dv;
  const double heads_chunks = double(s.batch * s.num_heads) * std::ceil(double(s.seq_len) / L);
  const double fwd_mac = L * DK * DV            // state recurrence
                         + L * L / 2 * DK         // Q Kᵀ (causal half; ours recomputes per DVT slab)
                         + L * L / 2 * DV         // P V
                         + L * DK * DV;           // Q̂ C_k
  const double bwd_mac = L * DK * DV              // dC recurrence
                         + 2 * L * L / 2 * DK     // Sᵀ (dv kernel), dQ intra, dK intra -> ~3 halves
                         + L * L / 2 * DK
                         + 2 * L * L / 2 * DV     // Pᵀ dH, dH Vᵀ
                         + 3 * L * DK * DV;       // K dC, dH C_kᵀ, V dCᵀ
  const double fwd_flop = 2 * fwd_mac * heads_chunks, bwd_flop = 2 * bwd_mac * heads_chunks;
  const double nc1 = std::ceil(double(s.seq_len) / L) + 1;
  const double state_bytes = opt.state_precision == MlstmStatePrecision::kBf16 ? 2 : 4;  // hi (+lo)
  const double states = double(s.batch * s.num_heads) * nc1 * DK * DV * state_bytes;  // C_k
  const double qkv = double(T) * (2 * DK + DV) * 2, hbytes = double(T) * DV * 2;
  const double fwd_bytes = qkv + hbytes + states;
  const double bwd_bytes = qkv + 2 * hbytes /*h, dh*/ + qkv /*dq dk dv*/ + 2 * states /*C, dC*/;
  std::printf("%-16s [%s] B%lld S%lld NH%lld dk%lld dv%lld L%lld\n", pr.name, pr.variant.name,
              static_cast<long long>(s.batch), static_cast<long long>(s.seq_len),
              static_cast<long long>(s.num_heads), static_cast<long long>(s.dk),
              static_cast<long long>(s.dv), static_cast<long long>(pr.chunk));
  std::printf("  ours fwd          %8.3f ms  %6.1f TFLOP/s  %6.0f GB/s (min bytes)\n", fwd_ms,
              fwd_flop / fwd_ms / 1e9, fwd_bytes / fwd_ms / 1e6);
  std::printf("  ours bwd          %8.3f ms  %6.1f TFLOP/s  %6.0f GB/s\n", bwd_ms,
              bwd_flop / bwd_ms / 1e9, bwd_bytes / bwd_ms / 1e6);
  std::printf("  ours fwd+bwd      %8.3f ms  (true gradient)\n", fb_ms);
  std::printf("  ours fwd+bwd      %8.3f ms  (stop_normaliser_gradient, TFLA's convention)\n",
              fb_tfla_ms);
  opt.stop_normaliser_gradient = false;
  if (g_time_states) {
    DeviceBuffer tokens, saved2;
    CUDA_OK_OR_DIE(alloc.Allocate(MlstmChunkwiseTokenBytes(s, opt), &tokens));
    CUDA_OK_OR_DIE(alloc.Allocate(MlstmChunkwiseSavedBytes(s, opt), &saved2));
    fwd();
    const double copy_ms = TimeMs(
        [&] { CUDA_OK_OR_DIE(MlstmChunkwiseCopyTokens(s, opt, saved.get(), tokens.get(), stream)); }, reps, stream);
    const double states_ms = TimeMs(
        [&] { CUDA_OK_OR_DIE(MlstmChunkwiseRecomputeStates(s, opt, in, {}, tokens.get(), saved2.get(), stream)); },
        reps, stream);
    const double state_flop = 2 * L * DK * DV * heads_chunks;
    std::printf("  states only       %8.3f ms  %6.1f TFLOP/s (gate scan + state_fwd + token copy in; copy out "
                "%.3f ms; saved %.1f MiB, tokens %.1f MiB)\n",
                states_ms, state_flop / states_ms / 1e9, copy_ms, MlstmChunkwiseSavedBytes(s, opt) / 1048576.0,
                MlstmChunkwiseTokenBytes(s, opt) / 1048576.0);
    std::printf("STATES %s L%lld %s fwd_ms=%.4f states_ms=%.4f copy_out_ms=%.4f\n", pr.name,
                static_cast<long long>(pr.chunk), pr.variant.name, fwd_ms, states_ms, copy_ms);
  }
  Breakdown([&] { fwd(); bwd(); }, reps, stream);
  std::printf("RESULT %s L%lld %s fwd_ms=%.4f fwdbwd_ms=%.4f fwdbwd_tfla_ms=%.4f\n", pr.name,
              static_cast<long long>(pr.chunk), pr.variant.name, fwd_ms, fb_ms, fb_tfla_ms);
  std::fflush(stdout);
}

// ---- generation step (MlstmStepForward) ----

// µs per step: `single` = one launch between two events (what a latency-bound decode loop pays
// per layer, launch included), `loop` = 200 back-to-back steps / 200. Bytes: the fp32 state C
// read and written (n, q, k, v, h are < 1% of it): the memory floor is bytes / peak bandwidth.
void RunStep(const char* name, const MlstmShape& s, int reps, cudaStream_t stream) {
  DeviceAllocator alloc;
  const int64_t bh = s.batch * s.num_heads;
  DeviceBuffer q, k, v, h, ig, fg, c, n, m;
  CUDA_OK_OR_DIE(alloc.Allocate(bh * s.dk * 2, &q));
  CUDA_OK_OR_DIE(alloc.Allocate(bh * s.dk * 2, &k));
  CUDA_OK_OR_DIE(alloc.Allocate(bh * s.dv * 2, &v));
  CUDA_OK_OR_DIE(alloc.Allocate(bh * s.dv * 2, &h));
  CUDA_OK_OR_DIE(alloc.Allocate(bh * 4, &ig));
  CUDA_OK_OR_DIE(alloc.Allocate(bh * 4, &fg));
  CUDA_OK_OR_DIE(alloc.Allocate(bh * s.dk * s.dv * 4, &c));
  CUDA_OK_OR_DIE(alloc.Allocate(bh * s.dk * 4, &n));
  CUDA_OK_OR_DIE(alloc.Allocate(bh * 4, &m));
  CUDA_OK_OR_DIE(FillRandomBf16(q.as<bf16>(), bh * s.dk, 0.f, 1.f, 11, stream));
  CUDA_OK_OR_DIE(FillRandomBf16(k.as<bf16>(), bh * s.dk, 0.f, 1.f, 12, stream));
  CUDA_OK_OR_DIE(FillRandomBf16(v.as<bf16>(), bh * s.dv, 0.f, 1.f, 13, stream));
  CUDA_OK_OR_DIE(FillRandomF32(ig.as<float>(), bh, 0.f, 1.f, 14, stream));
  CUDA_OK_OR_DIE(FillRandomF32(fg.as<float>(), bh, 3.f, 1.f, 15, stream));
  CUDA_OK_OR_DIE(FillRandomF32(c.as<float>(), bh * s.dk * s.dv, 0.f, 0.5f, 16, stream));
  CUDA_OK_OR_DIE(FillRandomF32(n.as<float>(), bh * s.dk, 0.f, 0.5f, 17, stream));
  CUDA_OK_OR_DIE(FillRandomF32(m.as<float>(), bh, 0.f, 1.f, 18, stream));
  MlstmOptions opt;
  auto step = [&] {
    CUDA_OK_OR_DIE(MlstmStepForward(s, opt, q.as<bf16>(), k.as<bf16>(), v.as<bf16>(),
                                    ig.as<float>(), fg.as<float>(),
                                    {c.as<float>(), n.as<float>(), m.as<float>()}, h.as<bf16>(),
                                    stream));
  };
  const double single_us = 1e3 * TimeMs(step, std::max(reps, 50), stream);
  constexpr int kLoop = 200;
  const double loop_us = 1e3 * TimeMs([&] { for (int i = 0; i < kLoop; ++i) step(); }, reps, stream) / kLoop;
  const double bytes = double(bh) * s.dk * s.dv * 4 * 2;
  std::printf("step %-14s B%lld NH%lld dk%lld dv%lld: single %7.2f us, loop %7.2f us/step, "
              "%6.0f GB/s (C read + write %.2f MB)\n",
              name, static_cast<long long>(s.batch), static_cast<long long>(s.num_heads),
              static_cast<long long>(s.dk), static_cast<long long>(s.dv), single_us, loop_us,
              bytes / loop_us / 1e3, bytes / 1e6);
  std::printf("RESULT step %s B%lld single_us=%.3f loop_us=%.3f bytes=%.0f\n", name,
              static_cast<long long>(s.batch), single_us, loop_us, bytes);
  std::fflush(stdout);
}

// ---- comparison with TFLA's outputs (files from anchor_mlstm.py) ----

std::vector<float> ReadF32(const std::string& path, size_t n) {
  std::vector<float> v(n);
  FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr || std::fread(v.data(), 4, n, f) != n) {
    std::fprintf(stderr, "cannot read %zu floats from %s\n", n, path.c_str());
    std::exit(1);
  }
  std::fclose(f);
  return v;
}

// [B, NH, S, D] -> [B, S, NH, D] and back.
std::vector<float> ToTokenMajor(const std::vector<float>& x, int64_t B, int64_t NH, int64_t S,
                                int64_t D) {
  std::vector<float> y(x.size());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < NH; ++h)
      for (int64_t t = 0; t < S; ++t)
        for (int64_t d = 0; d < D; ++d)
          y[((b * S + t) * NH + h) * D + d] = x[((b * NH + h) * S + t) * D + d];
  return y;
}

double Rel(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += double(a[i] - b[i]) * (a[i] - b[i]);
    den += double(b[i]) * b[i];
  }
  return std::sqrt(num) / std::max(std::sqrt(den), 1e-300);
}

template <typename T>
void Upload(DeviceBuffer& buf, const std::vector<float>& x) {
  std::vector<T> tmp(x.size());
  for (size_t i = 0; i < x.size(); ++i) tmp[i] = static_cast<T>(x[i]);
  CUDA_CHECK_OR_DIE(cudaMemcpy(buf.get(), tmp.data(), tmp.size() * sizeof(T), cudaMemcpyHostToDevice));
}
template <typename T>
std::vector<float> Download(const DeviceBuffer& buf, size_t n) {
  std::vector<T> tmp(n);
  CUDA_CHECK_OR_DIE(cudaMemcpy(tmp.data(), buf.get(), n * sizeof(T), cudaMemcpyDeviceToHost));
  std::vector<float> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = static_cast<float>(tmp[i]);
  return out;
}

void CompareWithTfla(const std::string& dir) {
  std::vector<float> dims = ReadF32(dir + "/dims.f32", 5);
  const int64_t B = dims[0], NH = dims[1], S = dims[2], DK = dims[3], DV = dims[4];
  const int64_t T = B * NH * S;
  auto rd = [&](const char* name, int64_t D) {
    return ToTokenMajor(ReadF32(dir + "/" + name + ".f32", T * D), B, NH, S, D);
  };
  const auto q = rd("q", DK), k = rd("k", DK), v = rd("v", DV), ig = rd("i", 1), fg = rd("f", 1),
             dh = rd("dh", DV), th = rd("h", DV), tdq = rd("dq", DK), tdk = rd("dk", DK),
             tdv = rd("dv", DV), tdi = rd("di", 1), tdf = rd("df", 1);
  DeviceAllocator alloc;
  MlstmShape s{B, S, NH, DK, DV};
  MlstmOptions opt;
  opt.chunk_size = 64;
  DeviceBuffer gq, gk, gv, gh, gdh, gdq, gdk, gdv, gig, gfg, gdi, gdf, saved, scratch;
  for (auto* b : {&gq, &gk, &gdq, &gdk}) CUDA_OK_OR_DIE(alloc.Allocate(T * DK * 2, b));
  for (auto* b : {&gv, &gh, &gdh, &gdv}) CUDA_OK_OR_DIE(alloc.Allocate(T * DV * 2, b));
  for (auto* b : {&gig, &gfg, &gdi, &gdf}) CUDA_OK_OR_DIE(alloc.Allocate(T * 4, b));
  CUDA_OK_OR_DIE(alloc.Allocate(MlstmChunkwiseSavedBytes(s, opt), &saved));
  CUDA_OK_OR_DIE(alloc.Allocate(MlstmChunkwiseBackwardScratchBytes(s, opt), &scratch));
  Upload<bf16>(gq, q);
  Upload<bf16>(gk, k);
  Upload<bf16>(gv, v);
  Upload<bf16>(gdh, dh);
  Upload<float>(gig, ig);
  Upload<float>(gfg, fg);
  MlstmDeviceInputs in{gq.as<bf16>(), gk.as<bf16>(), gv.as<bf16>(), gig.as<float>(),
                       gfg.as<float>()};
  CUDA_OK_OR_DIE(MlstmChunkwiseForward(s, opt, in, {}, gh.as<bf16>(), saved.get(), {}, nullptr));
  CUDA_CHECK_OR_DIE(cudaDeviceSynchronize());
  std::printf("compare with TFLA (B%lld NH%lld S%lld dk%lld dv%lld): h rel diff %.3e\n",
              (long long)B, (long long)NH, (long long)S, (long long)DK, (long long)DV,
              Rel(Download<bf16>(gh, T * DV), th));
  for (const bool stop : {false, true}) {
    opt.stop_normaliser_gradient = stop;
    CUDA_OK_OR_DIE(MlstmChunkwiseBackward(
        s, opt, in, {}, gh.as<bf16>(), saved.get(), gdh.as<bf16>(), {},
        {gdq.as<bf16>(), gdk.as<bf16>(), gdv.as<bf16>(), gdi.as<float>(), gdf.as<float>()}, {},
        scratch.get(), nullptr));
    CUDA_CHECK_OR_DIE(cudaDeviceSynchronize());
    std::printf("  ours[%s] vs TFLA: dq %.3e  dk %.3e  dv %.3e  di %.3e  df %.3e\n",
                stop ? "stop_normaliser_gradient" : "true gradient          ",
                Rel(Download<bf16>(gdq, T * DK), tdq), Rel(Download<bf16>(gdk, T * DK), tdk),
                Rel(Download<bf16>(gdv, T * DV), tdv), Rel(Download<float>(gdi, T), tdi),
                Rel(Download<float>(gdf, T), tdf));
  }
  std::fflush(stdout);
}

// --dram: the write-only and the 1:1 copy stream of the state kernels' size (medians of `reps`).
void RunDram(int reps, cudaStream_t stream) {
  const size_t write_bytes = 661ull << 20, copy_bytes = 430ull << 20;
  DeviceAllocator alloc;
  DeviceBuffer dst, src;
  CUDA_OK_OR_DIE(alloc.Allocate(write_bytes, &dst));
  CUDA_OK_OR_DIE(alloc.Allocate(copy_bytes, &src));
  CUDA_CHECK_OR_DIE(cudaMemsetAsync(src.get(), 1, copy_bytes, stream));
  int i = 0;
  const double set_ms = TimeMs([&] { CUDA_CHECK_OR_DIE(cudaMemsetAsync(dst.get(), ++i & 0xff, write_bytes, stream)); },
                               reps, stream);
  const double copy_ms = TimeMs(
      [&] { CUDA_CHECK_OR_DIE(cudaMemcpyAsync(dst.get(), src.get(), copy_bytes, cudaMemcpyDeviceToDevice, stream)); },
      reps, stream);
  std::printf("DRAM memset %.0f MB: %.4f ms, %.2f TB/s (write only)\n", write_bytes / 1e6, set_ms,
              write_bytes / set_ms / 1e9);
  std::printf("DRAM memcpy %.0f MB: %.4f ms, %.2f TB/s (read + write, 1:1)\n", copy_bytes / 1e6, copy_ms,
              2.0 * copy_bytes / copy_ms / 1e9);
  std::fflush(stdout);
}

// --store_probe at the 125m cell (B16 S2048 NH4 dk = dv = 384, chunk 128).
void RunStoreProbe(int reps, cudaStream_t stream) {
  const StoreProbeShape s{16, 2048, 4, 384, 384};
  const StoreProbeSizes z = StoreProbeBytes(s);
  DeviceAllocator alloc;
  DeviceBuffer k, v, c, c_lo, c_last, sn;
  CUDA_OK_OR_DIE(alloc.Allocate(z.tokens_k, &k));
  CUDA_OK_OR_DIE(alloc.Allocate(z.tokens_v, &v));
  CUDA_OK_OR_DIE(alloc.Allocate(z.plane, &c));
  CUDA_OK_OR_DIE(alloc.Allocate(z.plane, &c_lo));
  CUDA_OK_OR_DIE(alloc.Allocate(z.c_last, &c_last));
  CUDA_OK_OR_DIE(alloc.Allocate(z.sn, &sn));
  CUDA_OK_OR_DIE(FillRandomBf16(k.as<bf16>(), z.tokens_k / 2, 0.f, 1.f, 21, stream));
  CUDA_OK_OR_DIE(FillRandomBf16(v.as<bf16>(), z.tokens_v / 2, 0.f, 1.f, 22, stream));
  std::vector<StoreProbeLine> lines;
  CUDA_OK_OR_DIE(RunMlstmStoreProbe(s, {k.as<bf16>(), v.as<bf16>(), c.as<bf16>(), c_lo.as<bf16>(),
                                        c_last.as<float>(), sn.as<float>()},
                                    reps, stream, &lines));
  std::printf("store probe, xlstm-125m-cell L128 (state_fwd_tail's grid, no math): writes %.0f B "
              "(C_k hi+lo 2 x %zu, last state %zu, n %zu), reads K+V %zu B\n",
              double(2 * z.plane + z.c_last + z.sn), z.plane, z.c_last, z.sn, z.tokens_k + z.tokens_v);
  for (const StoreProbeLine& l : lines) {
    std::printf("PROBE %-40s %8.4f ms  %5.2f TB/s  (writes %.3f GB, reads %.3f GB; unwritten words %llu)\n",
                l.name.c_str(), l.ms, (l.write_bytes + l.read_bytes) / l.ms / 1e9, l.write_bytes / 1e9,
                l.read_bytes / 1e9, l.unwritten_words);
  }
  std::fflush(stdout);
}

}  // namespace
}  // namespace gyre::cuda

int main(int argc, char** argv) {
  int reps = 30;
  bool once = false, dram = false, store_probe = false;
  std::string compare_dir, only;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a.rfind("--reps=", 0) == 0) reps = std::max(1, std::atoi(a.c_str() + 7));
    if (a.rfind("--compare_dir=", 0) == 0) compare_dir = a.substr(14);
    if (a.rfind("--only=", 0) == 0) only = a.substr(7);
    if (a == "--once") once = true;
    if (a == "--states") gyre::cuda::g_time_states = true;
    if (a == "--dram") dram = true;
    if (a == "--store_probe") store_probe = true;
  }
  if (!compare_dir.empty()) gyre::cuda::CompareWithTfla(compare_dir);
  cudaStream_t stream;
  CUDA_CHECK_OR_DIE(cudaStreamCreate(&stream));
  if (dram) gyre::cuda::RunDram(reps, stream);
  if (store_probe) gyre::cuda::RunStoreProbe(reps, stream);
  using gyre::cuda::MlstmGateSchedule;
  using gyre::cuda::MlstmStatePrecision;
  using gyre::cuda::MlstmStateWeights;
  using gyre::cuda::MlstmBwdDvKernel;
  using gyre::cuda::MlstmPersist;
  const gyre::cuda::Variant v2{"v2", MlstmStatePrecision::kAuto, MlstmGateSchedule::kAuto, 0};
  // The previous session's defaults: one block per head in gates_bwd.
  const gyre::cuda::Variant v2_gpar{"v2-gates-par", MlstmStatePrecision::kAuto,
                                    MlstmGateSchedule::kChunkParallel, 0};
  // io slab forced (auto picks by resident warps; 128 at chunk 64 was the previous behaviour).
  const gyre::cuda::Variant v2_io128{"v2-io128", MlstmStatePrecision::kAuto, MlstmGateSchedule::kAuto,
                                     0, MlstmStateWeights::kAuto, 128};
  const gyre::cuda::Variant v2_io64{"v2-io64", MlstmStatePrecision::kAuto, MlstmGateSchedule::kAuto,
                                    0, MlstmStateWeights::kAuto, 64};
  const gyre::cuda::Variant v2_t64{"v2-tile64", MlstmStatePrecision::kAuto, MlstmGateSchedule::kAuto, 64};
  const gyre::cuda::Variant v2_t128{"v2-tile128", MlstmStatePrecision::kAuto, MlstmGateSchedule::kAuto, 128};
  // Single bf16 states (what dropping the lo planes would gain; its true gradient leaves the
  // test bands at ill-conditioned tokens, mlstm.h) and hi-only state-update weights.
  const gyre::cuda::Variant v2_bf16{"bf16-states", MlstmStatePrecision::kBf16, MlstmGateSchedule::kAuto, 0};
  const gyre::cuda::Variant v2_whi{"weights-hi", MlstmStatePrecision::kAuto, MlstmGateSchedule::kAuto,
                                   0, MlstmStateWeights::kBf16};
  // bwd_dv forced (chunk 128 with 128-column dv slabs, else = v2): the warpgroup-MMA kernel (one
  // block per head-chunk for all slabs, "dv-wgf", helper mlstm8) or mma.sync ("dv-mma"),
  // whatever the env says.
  const auto dv_variant = [&](const char* name, MlstmBwdDvKernel kernel) {
    return gyre::cuda::Variant{name, MlstmStatePrecision::kAuto, MlstmGateSchedule::kAuto, 0,
                               MlstmStateWeights::kAuto, 0, kernel};
  };
  const gyre::cuda::Variant dv_wgf = dv_variant("dv-wgf", MlstmBwdDvKernel::kWgmmaFused);
  const gyre::cuda::Variant dv_mma = dv_variant("dv-mma", MlstmBwdDvKernel::kMmaSync);
  // fwd_out on a persistent grid (session 17, helper persist17; GYRE_MLSTM_PERSIST=fwd_out in ops):
  // "[v2]" and "[v2-persist]" in one process give the old and the new fwd_out side by side.
  // (Session 17's "[v2-persist-dyn]" is this one now; the static tile order was deleted.)
  const gyre::cuda::Variant v2_persist{"v2-persist", MlstmStatePrecision::kAuto, MlstmGateSchedule::kAuto, 0,
                                       MlstmStateWeights::kAuto, 0, MlstmBwdDvKernel::kAuto,
                                       MlstmPersist::kFwdOut};
  // bwd_dqk on a persistent grid (helper persistdqk17; GYRE_MLSTM_PERSIST=dqk / both in ops).
  const gyre::cuda::Variant v2_persist_dqk{"v2-persist-dqk", MlstmStatePrecision::kAuto, MlstmGateSchedule::kAuto,
                                           0, MlstmStateWeights::kAuto, 0, MlstmBwdDvKernel::kAuto,
                                           MlstmPersist::kDqk};
  const gyre::cuda::Variant v2_persist_both{"v2-persist-both", MlstmStatePrecision::kAuto, MlstmGateSchedule::kAuto,
                                            0, MlstmStateWeights::kAuto, 0, MlstmBwdDvKernel::kAuto,
                                            MlstmPersist::kBoth};
  // Chunk 256's fwd_out (the off-diagonal block inside since session 18) with the lag stage release
  // ("[v2-lag]"; v2 follows GYRE_MLSTM_RING, unset: eager). Session 18's "[v2-offpass]",
  // "[v2-offfused]", "[v2-offfused-lag]", "[v2-offb-pass]", "[v2-offb-fused]" selected the separate
  // off-diagonal passes or the fused forms; the passes were deleted (helper offclean18), and v2 runs
  // what v2-offb-fused ran.
  gyre::cuda::Variant v2_lag = v2;
  v2_lag.name = "v2-lag";
  v2_lag.ring = gyre::cuda::MlstmRingRelease::kLag;
  // xlstm-1.3b-like, xLSTM-7B heads, and the xlstm-125m cell (B16 S2048, 4 heads of 384, the
  // model path's shape: ops/ runs the presets' chunk 64).
  const gyre::cuda::MlstmShape s13{8, 2048, 4, 256, 512}, s7{1, 8192, 8, 256, 512},
      s125{16, 2048, 4, 384, 384};
  const gyre::cuda::Problem problems[] = {
      {"xlstm-1.3b-like", s13, 128, v2},       {"xlstm-7b-heads", s7, 128, v2},
      {"xlstm-1.3b-like", s13, 128, v2_gpar},  {"xlstm-7b-heads", s7, 128, v2_gpar},
      {"xlstm-125m-cell", s125, 64, v2},       {"xlstm-125m-cell", s125, 64, v2_io128},
      {"xlstm-125m-cell", s125, 128, v2},      {"xlstm-125m-cell", s125, 128, v2_io64},
      {"xlstm-125m-cell", s125, 64, v2_t64},   {"xlstm-1.3b-like", s13, 64, v2},
      {"xlstm-125m-cell", s125, 128, v2_t64},  {"xlstm-125m-cell", s125, 128, v2_bf16},
      {"xlstm-125m-cell", s125, 128, v2_whi},
      {"xlstm-125m-cell", s125, 128, dv_mma},  {"xlstm-125m-cell", s125, 128, dv_wgf},
      {"xlstm-1.3b-like", s13, 128, dv_wgf},   {"xlstm-7b-heads", s7, 128, dv_wgf},
      // The ops/ xlstm[1:0]-1.3b cell (4 heads of 1024, B4): only with --states (helper mem12).
      {"xlstm-1.3b-model", {4, 2048, 4, 1024, 1024}, 128, v2},
      // Chunk 256 beside 128 (session 15, helper mlstm256): the 125m cell, the 1.3b-like layout
      // and the ops/ 1.3b cell (4 heads of 1024, B4; without --states, unlike xlstm-1.3b-model).
      {"xlstm-125m-cell", s125, 256, v2},      {"xlstm-1.3b-like", s13, 256, v2},
      {"xlstm-1.3b-cell", {4, 2048, 4, 1024, 1024}, 128, v2},
      {"xlstm-1.3b-cell", {4, 2048, 4, 1024, 1024}, 256, v2},
      // The 125m cell at B11 (session 16, helper state16): 3·3·44 = 396 state tiles = exactly 3
      // waves on 132 SMs, against B16's 576 = 4.36: per-kernel time / B tells what the partial
      // last wave costs (GYRE_MLSTM_STATE_TAIL=split is the attempt to recover it).
      {"xlstm-125m-b11", {11, 2048, 4, 384, 384}, 128, v2},
      // ... and at B1 with 128×128 state tiles forced (auto picks 64×64 below 128 tiles): 36 tiles,
      // every block alone on its SM (the isolated per-block time; split: 72 halves).
      {"xlstm-125m-b1", {1, 2048, 4, 384, 384}, 128, v2_t128},
      // Session 16 (helper dqk16): the 125m cell's blocks alone and in whole waves. B1 S1024:
      // fwd_out / bwd_dv / bwd_dqk 96 blocks (3 slabs x 8 chunks x 4 heads < 132 SMs: every
      // block alone on its SM); B11 S2048 (above): 2112 blocks = exactly 16 waves of 132.
      {"xlstm-125m-b1s1k", {1, 1024, 4, 384, 384}, 128, v2},
      {"xlstm-125m-cell", s125, 128, v2_persist},
      {"xlstm-1.3b-cell", {4, 2048, 4, 1024, 1024}, 128, v2_persist},
      {"xlstm-125m-b1s1k", {1, 1024, 4, 384, 384}, 128, v2_persist},
      {"xlstm-125m-cell", s125, 128, v2_persist_dqk},
      {"xlstm-1.3b-cell", {4, 2048, 4, 1024, 1024}, 128, v2_persist_dqk},
      {"xlstm-125m-cell", s125, 128, v2_persist_both},
      {"xlstm-1.3b-cell", {4, 2048, 4, 1024, 1024}, 128, v2_persist_both},
      {"xlstm-125m-cell", s125, 256, v2_lag},
      {"xlstm-1.3b-cell", {4, 2048, 4, 1024, 1024}, 256, v2_lag},
      // The ops/ xlstm-large-125m cell (session 21, helper cell125): transformers' xLSTM Large at
      // d 768, 4 heads of dk 96 zero-padded to 128 (ops/xlstm_large_block.cc), dv 192, B16; chunk
      // 64 (the preset, transformers' choice) and 128; dv 192 is not a multiple of 128: 64 × 64
      // state tiles, and at chunk 64 fwd_out / bwd_dv on 96- / 192-column slabs (mlstm.cu
      // UseWideSlabs; GYRE_MLSTM_WIDE_SLABS=off: 64 columns, the kernels before session 21).
      {"xlstm-large-125m", {16, 2048, 4, 128, 192}, 64, v2},
      {"xlstm-large-125m", {16, 2048, 4, 128, 192}, 128, v2},
      {"xlstm-large-125m", {16, 2048, 4, 128, 192}, 64, v2_io64},
      {"xlstm-large-125m", {16, 2048, 4, 128, 192}, 64, v2_io128},
      {"xlstm-large-125m", {16, 2048, 4, 128, 192}, 128, v2_io64},
  };
  if (only.empty() && !once) {
    gyre::cuda::RunStep("xlstm-7b-heads", {1, 1, 8, 256, 512}, reps, stream);
    gyre::cuda::RunStep("xlstm-7b-heads", {8, 1, 8, 256, 512}, reps, stream);
    gyre::cuda::RunStep("xlstm-1.3b-like", {8, 1, 4, 256, 512}, reps, stream);
  }
  // --only: comma-separated substrings, any of which selects a problem.
  std::vector<std::string> only_any;
  for (size_t pos = 0; !only.empty() && pos <= only.size();) {
    const size_t comma = std::min(only.find(',', pos), only.size());
    only_any.push_back(only.substr(pos, comma - pos));
    pos = comma + 1;
  }
  for (const auto& p : problems) {
    const std::string label = gyre::cuda::Label(p);
    if (!gyre::cuda::g_time_states && std::string(p.name) == "xlstm-1.3b-model") continue;
    if (!only_any.empty() &&
        std::none_of(only_any.begin(), only_any.end(),
                     [&](const std::string& o) { return label.find(o) != std::string::npos; })) {
      continue;
    }
    gyre::cuda::RunShape(p, reps, once, stream);
  }
  CUDA_CHECK_OR_DIE(cudaStreamDestroy(stream));
  return 0;
}
