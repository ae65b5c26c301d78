// Causal attention benchmark (kernels/cuda/attention; issue 7 item 3).
//
// Shapes (bf16, packed q/k/v, H = Hk): B8 S2048 H16 D128, B2 S8192 H16 D128 (the issue's
// anchors), B8 S2048 H12 D64 (llama-125m's heads). Per shape: forward, backward, forward +
// backward, and the SelfExtend forward (G 8, W 1024; random grouped q/k) next to the plain one.
// Median of `reps` CUDA-event timings after warm-up, dense random inputs (never zeros), no L2
// flush (the same as bench/torch_anchor_attention.py, the torch SDPA anchor run in the same
// call). "fwd rope" / "bwd rope": the same with the fused RoPE (R = D). FLOPs: forward
// 4·B·H·T²·D/2 (causal), backward 2.5x that; bytes: each input read once, each output written
// once.
//
//   attention_bench [--reps=N] [--shapes=K] [--from_shape=F] [--fwd_only] [--bwd_only=B,S,H,D]
//                   [--step_layout=B,S,H,D [--sustain=N] [--once]]
//   (K: only the first K shapes, F: start at shape F (1-based), e.g. for ncu; --fwd_only: the
//   plain and SelfExtend forwards; --bwd_only: the plain and the fused-RoPE backward alone at
//   that one shape (H = Hk), 3 rounds each, then whether two more backwards give bitwise the
//   same dq / dk / dv, for A/B runs of GYRE_ATTN_DETERMINISTIC; --step_layout: the llama
//   step's call layout against the packed one, see RunStepLayout)
// The kernels are the library defaults; GYRE_ATTN_FWD / GYRE_ATTN_SE_FWD ∈ {ws, mma} and
// GYRE_ATTN_BWD ∈ {ws, mma} select the others, GYRE_ATTN_DETERMINISTIC=1 the backward with dQ
// added in a fixed order (attention_bwd_det{,_presum}.cu) (read once per process).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "kernels/cuda/attention.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/device_allocator.h"
#include "kernels/cuda/random_fill.h"

namespace gyre::cuda {
namespace {

using bf16 = __nv_bfloat16;

double Median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
}

double TimeMs(cudaStream_t stream, int reps, const std::function<CudaResult()>& op) {
  cudaEvent_t start, stop;
  CUDA_CHECK_OR_DIE(cudaEventCreate(&start));
  CUDA_CHECK_OR_DIE(cudaEventCreate(&stop));
  for (int i = 0; i < 3; ++i) CUDA_OK_OR_DIE(op());
  CUDA_CHECK_OR_DIE(cudaStreamSynchronize(stream));
  std::vector<float> ms;
  for (int i = 0; i < reps; ++i) {
    CUDA_CHECK_OR_DIE(cudaEventRecord(start, stream));
    CUDA_OK_OR_DIE(op());
    CUDA_CHECK_OR_DIE(cudaEventRecord(stop, stream));
    CUDA_CHECK_OR_DIE(cudaEventSynchronize(stop));
    float t = 0;
    CUDA_CHECK_OR_DIE(cudaEventElapsedTime(&t, start, stop));
    ms.push_back(t);
  }
  CUDA_CHECK_OR_DIE(cudaGetLastError());
  CUDA_CHECK_OR_DIE(cudaEventDestroy(start));
  CUDA_CHECK_OR_DIE(cudaEventDestroy(stop));
  return Median(ms);
}

struct Shape {
  int64_t batch, seq, heads, dim;
};

void Print(const char* what, const Shape& s, double ms, double flops, double bytes) {
  std::printf("ours %-16s B%-2lld S%-5lld H%-3lld D%-4lld %9.4f ms %7.1f TFLOP/s %7.0f GB/s\n",
              what, static_cast<long long>(s.batch), static_cast<long long>(s.seq),
              static_cast<long long>(s.heads), static_cast<long long>(s.dim), ms,
              flops / (ms * 1e-3) / 1e12, bytes / (ms * 1e-3) / 1e9);
  std::fflush(stdout);
}

// Number of differing 16-bit patterns between two bf16 device arrays of `count` elements.
int64_t BitDiffs(const bf16* a, const bf16* b, int64_t count) {
  std::vector<uint16_t> ha(count), hb(count);
  CUDA_CHECK_OR_DIE(cudaMemcpy(ha.data(), a, count * 2, cudaMemcpyDeviceToHost));
  CUDA_CHECK_OR_DIE(cudaMemcpy(hb.data(), b, count * 2, cudaMemcpyDeviceToHost));
  int64_t diffs = 0;
  for (int64_t i = 0; i < count; ++i) diffs += ha[i] != hb[i];
  return diffs;
}

void Run(DeviceAllocator& alloc, cudaStream_t stream, const Shape& s, int reps, bool fwd_only,
         bool bwd_only = false) {
  const int64_t n = s.batch * s.seq * s.heads * s.dim;
  std::vector<DeviceBuffer> keep;
  uint64_t seed = 1;
  auto rb = [&](int64_t count) {
    keep.emplace_back();
    CUDA_OK_OR_DIE(alloc.Allocate(count * sizeof(bf16), &keep.back()));
    CUDA_OK_OR_DIE(FillRandomBf16(keep.back().as<bf16>(), count, 0.f, 1.f, seed++, stream));
    return keep.back().as<bf16>();
  };
  bf16 *q = rb(n), *k = rb(n), *v = rb(n), *qg = rb(n), *kg = rb(n), *out = rb(n), *dout = rb(n);
  bf16 *dq = rb(n), *dk = rb(n), *dv = rb(n);
  DeviceBuffer lse_buf;
  CUDA_OK_OR_DIE(alloc.Allocate(s.batch * s.heads * s.seq * sizeof(float), &lse_buf));
  float* lse = lse_buf.as<float>();

  AttentionForwardArgs fa;
  fa.shape = {s.batch, s.seq, s.heads, s.heads, s.dim};
  fa.q = q;
  fa.k = k;
  fa.v = v;
  fa.out = out;
  fa.lse = lse;
  AttentionBackwardArgs ba;
  ba.shape = fa.shape;
  ba.q = q;
  ba.k = k;
  ba.v = v;
  ba.out = out;
  ba.dout = dout;
  ba.lse = lse;
  ba.dq = dq;
  ba.dk = dk;
  ba.dv = dv;
  AttentionForwardArgs se = fa;
  se.self_extend_group = 8;
  se.self_extend_window = 1024;
  se.q_grouped = qg;
  se.k_grouped = kg;

  const double pairs = static_cast<double>(s.seq) * s.seq / 2;
  const double fwd_flops = 4.0 * s.batch * s.heads * pairs * s.dim;
  const double bwd_flops = 2.5 * fwd_flops;
  const double fwd_bytes = 4.0 * n * 2 + s.batch * s.heads * s.seq * 4.0;
  const double bwd_bytes = (5.0 * n + 3.0 * n) * 2 + s.batch * s.heads * s.seq * 4.0;

  CUDA_OK_OR_DIE(AttentionForward(fa, stream));  // lse for the backward timings
  if (bwd_only) {
    const char* det = std::getenv("GYRE_ATTN_DETERMINISTIC");
    RopeTable table;
    CUDA_OK_OR_DIE(BuildRopeTable(s.seq, s.dim, 10000.0, &alloc, &table));
    AttentionBackwardArgs ba_rope = ba;
    ba_rope.rope = &table;
    for (const AttentionBackwardArgs* args : {&ba, &ba_rope}) {
      std::vector<float> ms;
      for (int round = 0; round < 3; ++round) {
        ms.push_back(TimeMs(stream, reps, [&] { return AttentionBackward(&alloc, *args, stream); }));
      }
      const double med = Median(ms);
      std::printf("ours bwd%s (GYRE_ATTN_DETERMINISTIC=%s) B%lld S%lld H%lld D%lld: %.4f ms "
                  "%.1f TFLOP/s (median of 3 rounds of %d; min %.4f max %.4f)\n",
                  args == &ba ? "" : " rope", det != nullptr ? det : "unset",
                  static_cast<long long>(s.batch), static_cast<long long>(s.seq),
                  static_cast<long long>(s.heads), static_cast<long long>(s.dim), med,
                  bwd_flops / (med * 1e-3) / 1e12, reps,
                  *std::min_element(ms.begin(), ms.end()), *std::max_element(ms.begin(), ms.end()));
    }
    // Reproducibility at this shape: the fused-RoPE backward twice, outputs compared bitwise
    // (the first run's outputs copied aside into q_grouped / k_grouped / out-sized buffers).
    bf16 *dq2 = qg, *dk2 = kg, *dv2 = rb(n);
    CUDA_OK_OR_DIE(AttentionBackward(&alloc, ba_rope, stream));
    CUDA_CHECK_OR_DIE(cudaMemcpyAsync(dq2, dq, n * 2, cudaMemcpyDeviceToDevice, stream));
    CUDA_CHECK_OR_DIE(cudaMemcpyAsync(dk2, dk, n * 2, cudaMemcpyDeviceToDevice, stream));
    CUDA_CHECK_OR_DIE(cudaMemcpyAsync(dv2, dv, n * 2, cudaMemcpyDeviceToDevice, stream));
    CUDA_OK_OR_DIE(AttentionBackward(&alloc, ba_rope, stream));
    CUDA_CHECK_OR_DIE(cudaStreamSynchronize(stream));
    std::printf("ours bwd rope repeat (GYRE_ATTN_DETERMINISTIC=%s) B%lld S%lld H%lld D%lld: "
                "differing bf16 values of %lld: dq %lld dk %lld dv %lld\n",
                det != nullptr ? det : "unset", static_cast<long long>(s.batch),
                static_cast<long long>(s.seq), static_cast<long long>(s.heads),
                static_cast<long long>(s.dim), static_cast<long long>(n),
                static_cast<long long>(BitDiffs(dq, dq2, n)),
                static_cast<long long>(BitDiffs(dk, dk2, n)),
                static_cast<long long>(BitDiffs(dv, dv2, n)));
    std::fflush(stdout);
    return;
  }
  const double fwd = TimeMs(stream, reps, [&] { return AttentionForward(fa, stream); });
  Print("fwd", s, fwd, fwd_flops, fwd_bytes);
  // The same with the fused RoPE of q (AttentionForwardArgs::rope, R = D; rotated rows into a
  // separate buffer, so every repetition rotates the same input): its cost against the plain
  // forward (the separate RopeForward pass over q it replaces read and wrote q once more).
  RopeTable table;
  CUDA_OK_OR_DIE(BuildRopeTable(s.seq, s.dim, 10000.0, &alloc, &table));
  AttentionForwardArgs fa_rope = fa;
  fa_rope.rope = &table;
  fa_rope.q_rotated = qg;
  const double fwd_rope = TimeMs(stream, reps, [&] { return AttentionForward(fa_rope, stream); });
  Print("fwd rope", s, fwd_rope, fwd_flops, fwd_bytes + n * 2.0);
  if (!fwd_only) {
    const double bwd =
        TimeMs(stream, reps, [&] { return AttentionBackward(&alloc, ba, stream); });
    Print("bwd", s, bwd, bwd_flops, bwd_bytes);
    // The same with the fused inverse RoPE (AttentionBackwardArgs::rope, R = D): the cost of
    // the fusion against the plain backward above (the separate RopeBackward pass it replaces
    // read and wrote dq and dk once more: 4 bytes per element of each).
    AttentionBackwardArgs ba_rope = ba;
    ba_rope.rope = &table;
    const double bwd_rope =
        TimeMs(stream, reps, [&] { return AttentionBackward(&alloc, ba_rope, stream); });
    Print("bwd rope", s, bwd_rope, bwd_flops, bwd_bytes);
    const double both = TimeMs(stream, reps, [&]() -> CudaResult {
      CUDA_RETURN_IF_NOT_OK(AttentionForward(fa, stream));
      return AttentionBackward(&alloc, ba, stream);
    });
    Print("fwd+bwd", s, both, fwd_flops + bwd_flops, fwd_bytes + bwd_bytes);
  }
  const double sef = TimeMs(stream, reps, [&] { return AttentionForward(se, stream); });
  Print("selfextend fwd", s, sef, fwd_flops, fwd_bytes + 2.0 * n * 2);
  std::printf("ours selfextend/plain fwd B%lld S%lld D%lld: %.3f\n",
              static_cast<long long>(s.batch), static_cast<long long>(s.seq),
              static_cast<long long>(s.dim), sef / fwd);
  // The same ratio from plain and SelfExtend timings taken alternately (5 rounds, medians):
  // the two single timings above lie seconds apart, and the card's clock drifts between them
  // with what ran before (session 6: the single ratio moved by up to 10% between runs).
  std::vector<float> plain_ms, se_ms, ratios;
  for (int round = 0; round < 5; ++round) {
    plain_ms.push_back(TimeMs(stream, reps, [&] { return AttentionForward(fa, stream); }));
    se_ms.push_back(TimeMs(stream, reps, [&] { return AttentionForward(se, stream); }));
    ratios.push_back(se_ms.back() / plain_ms.back());
  }
  std::printf(
      "ours selfextend/plain fwd alternating B%lld S%lld D%lld: plain %.4f ms selfextend %.4f "
      "ms ratio %.3f (median of 5 rounds; min %.3f max %.3f)\n",
      static_cast<long long>(s.batch), static_cast<long long>(s.seq),
      static_cast<long long>(s.dim), Median(plain_ms), Median(se_ms), Median(ratios),
      *std::min_element(ratios.begin(), ratios.end()),
      *std::max_element(ratios.begin(), ratios.end()));
  std::fflush(stdout);
}

// --step_layout=B,S,H,D (H = Hk): the llama training step's exact calls (ops/attention.cc,
// SelfAttention::ForwardCuda / BackwardCuda; issue 7, attention_notes.md session 12) next to the
// packed layout of --bwd_only. "step": q|k|v are views of one fused [B·S, 3·H·D] buffer (row
// stride 3·H·D, k at +H·D, v at +2·H·D: the fused qkv GEMM's output), the forward rotates q in
// place (q_rotated = q) with the fused RoPE, out and dout are packed, dq|dk|dv are views of a
// second fused buffer of the same layout, the backward has the fused inverse RoPE. "packed": the
// same calls on separate packed q, k, v, dq, dk, dv arrays (q rotated in place too).
// Timings: (1) burst: forward and backward alone, the two layouts alternating, 3 rounds each
// (median of `reps` CUDA-event timings per round, a host sync after each; --bwd_only's method);
// (2) sustained: `sustain` forward + backward pairs queued back to back without a host sync (as
// in the step, the device never waits), the layouts alternating pair by pair, events around
// every op, medians of the second half. With GYRE_ATTN_PHASES=1 the library also prints each
// call's per-kernel times to stderr. --once: one forward + backward per layout and exit (for ncu:
// the backward main kernel's launches 1 and 2 are packed, then step).
void RunStepLayout(DeviceAllocator& alloc, cudaStream_t stream, const Shape& s, int reps,
                   int sustain, bool once) {
  const int64_t rows = s.batch * s.seq, hd = s.heads * s.dim, width = 3 * hd;
  const int64_t n = rows * hd;
  std::vector<DeviceBuffer> keep;
  uint64_t seed = 101;
  auto rb = [&](int64_t count) {
    keep.emplace_back();
    CUDA_OK_OR_DIE(alloc.Allocate(count * sizeof(bf16), &keep.back()));
    CUDA_OK_OR_DIE(FillRandomBf16(keep.back().as<bf16>(), count, 0.f, 1.f, seed++, stream));
    return keep.back().as<bf16>();
  };
  bf16 *qkv = rb(rows * width), *dqkv = rb(rows * width);
  bf16 *q = rb(n), *k = rb(n), *v = rb(n), *dq = rb(n), *dk = rb(n), *dv = rb(n);
  bf16 *out = rb(n), *dout = rb(n);
  DeviceBuffer lse_buf;
  CUDA_OK_OR_DIE(alloc.Allocate(s.batch * s.heads * s.seq * sizeof(float), &lse_buf));
  RopeTable table;
  CUDA_OK_OR_DIE(BuildRopeTable(s.seq, s.dim, 10000.0, &alloc, &table));
  const AttentionShape shape{s.batch, s.seq, s.heads, s.heads, s.dim};

  struct Layout {
    const char* name;
    AttentionForwardArgs fa;
    AttentionBackwardArgs ba;
  };
  Layout layouts[2];
  for (int i = 0; i < 2; ++i) {
    const bool step = i == 1;
    AttentionForwardArgs& fa = layouts[i].fa;
    AttentionBackwardArgs& ba = layouts[i].ba;
    layouts[i].name = step ? "step" : "packed";
    fa.shape = ba.shape = shape;
    fa.q = ba.q = step ? qkv : q;
    fa.k = ba.k = step ? qkv + hd : k;
    fa.v = ba.v = step ? qkv + 2 * hd : v;
    fa.q_row_stride = fa.kv_row_stride = ba.q_row_stride = ba.kv_row_stride = step ? width : 0;
    fa.out = out;
    fa.lse = lse_buf.as<float>();
    fa.rope = &table;
    fa.q_rotated = const_cast<bf16*>(fa.q);  // in place, as the step (the backward reads it)
    ba.out = out;
    ba.dout = dout;
    ba.lse = lse_buf.as<float>();
    ba.dq = step ? dqkv : dq;
    ba.dk = step ? dqkv + hd : dk;
    ba.dv = step ? dqkv + 2 * hd : dv;
    ba.rope = &table;
  }
  const double pairs = static_cast<double>(s.seq) * s.seq / 2;
  const double fwd_flops = 4.0 * s.batch * s.heads * pairs * s.dim, bwd_flops = 2.5 * fwd_flops;
  std::printf("step_layout B%lld S%lld H%lld D%lld: row stride packed %lld, step %lld elements\n",
              static_cast<long long>(s.batch), static_cast<long long>(s.seq),
              static_cast<long long>(s.heads), static_cast<long long>(s.dim),
              static_cast<long long>(hd), static_cast<long long>(width));
  if (once) {
    for (const Layout& l : layouts) {
      CUDA_OK_OR_DIE(AttentionForward(l.fa, stream));
      CUDA_OK_OR_DIE(AttentionBackward(&alloc, l.ba, stream));
    }
    CUDA_CHECK_OR_DIE(cudaStreamSynchronize(stream));
    std::printf("step_layout once: packed then step, one forward + backward each\n");
    return;
  }
  // (1) burst, alternating.
  std::vector<float> ms[2][2];  // [layout][fwd, bwd]
  for (int round = 0; round < 3; ++round) {
    for (int i = 0; i < 2; ++i) {
      const Layout& l = layouts[i];
      CUDA_OK_OR_DIE(AttentionForward(l.fa, stream));  // this layout's lse, rotated q
      ms[i][0].push_back(TimeMs(stream, reps, [&] { return AttentionForward(l.fa, stream); }));
      ms[i][1].push_back(
          TimeMs(stream, reps, [&] { return AttentionBackward(&alloc, l.ba, stream); }));
    }
  }
  double burst[2][2];
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) burst[i][j] = Median(ms[i][j]);
  for (int j = 0; j < 2; ++j) {
    std::printf("step_layout burst %s: packed %.4f ms (%.1f TFLOP/s; rounds %.4f %.4f %.4f), step "
                "%.4f ms (rounds %.4f %.4f %.4f), step/packed %.3f\n",
                j == 0 ? "fwd" : "bwd", burst[0][j],
                (j == 0 ? fwd_flops : bwd_flops) / (burst[0][j] * 1e-3) / 1e12, ms[0][j][0],
                ms[0][j][1], ms[0][j][2], burst[1][j], ms[1][j][0], ms[1][j][1], ms[1][j][2],
                burst[1][j] / burst[0][j]);
  }
  // (2) sustained: pairs queued back to back, events around every op, one sync at the end.
  if (sustain < 4) return;
  std::vector<cudaEvent_t> ev(3 * sustain);
  for (cudaEvent_t& e : ev) CUDA_CHECK_OR_DIE(cudaEventCreate(&e));
  for (int it = 0; it < sustain; ++it) {
    const Layout& l = layouts[it % 2];
    CUDA_CHECK_OR_DIE(cudaEventRecord(ev[3 * it], stream));
    CUDA_OK_OR_DIE(AttentionForward(l.fa, stream));
    CUDA_CHECK_OR_DIE(cudaEventRecord(ev[3 * it + 1], stream));
    CUDA_OK_OR_DIE(AttentionBackward(&alloc, l.ba, stream));
    CUDA_CHECK_OR_DIE(cudaEventRecord(ev[3 * it + 2], stream));
  }
  CUDA_CHECK_OR_DIE(cudaStreamSynchronize(stream));
  std::vector<float> sus[2][2];
  float all_ms = 0.f;
  for (int it = sustain / 2; it < sustain; ++it) {
    float f = 0.f, b = 0.f;
    CUDA_CHECK_OR_DIE(cudaEventElapsedTime(&f, ev[3 * it], ev[3 * it + 1]));
    CUDA_CHECK_OR_DIE(cudaEventElapsedTime(&b, ev[3 * it + 1], ev[3 * it + 2]));
    sus[it % 2][0].push_back(f);
    sus[it % 2][1].push_back(b);
  }
  CUDA_CHECK_OR_DIE(cudaEventElapsedTime(&all_ms, ev[0], ev[3 * sustain - 1]));
  for (int j = 0; j < 2; ++j) {
    std::printf("step_layout sustained %s: packed %.4f ms, step %.4f ms, step/packed %.3f "
                "(medians of %d pairs each after %d; %.1f ms of work in all)\n",
                j == 0 ? "fwd" : "bwd", Median(sus[0][j]), Median(sus[1][j]),
                Median(sus[1][j]) / Median(sus[0][j]), static_cast<int>(sus[0][j].size()),
                sustain / 2, all_ms);
  }
  std::printf("step_layout sustained/burst bwd: packed %.3f step %.3f\n",
              Median(sus[0][1]) / burst[0][1], Median(sus[1][1]) / burst[1][1]);
  for (cudaEvent_t e : ev) CUDA_CHECK_OR_DIE(cudaEventDestroy(e));
  std::fflush(stdout);
}

int Main(int argc, char** argv) {
  int reps = 30, shapes = 3, from_shape = 1;
  bool fwd_only = false, once = false;
  int sustain = 200;
  Shape bwd_shape{0, 0, 0, 0}, step_shape{0, 0, 0, 0};
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], "--reps=", 7) == 0) reps = std::max(1, std::atoi(argv[i] + 7));
    if (std::strncmp(argv[i], "--shapes=", 9) == 0) shapes = std::atoi(argv[i] + 9);
    if (std::strncmp(argv[i], "--from_shape=", 13) == 0) from_shape = std::atoi(argv[i] + 13);
    if (std::strcmp(argv[i], "--fwd_only") == 0) fwd_only = true;
    if (std::strcmp(argv[i], "--once") == 0) once = true;
    if (std::strncmp(argv[i], "--sustain=", 10) == 0) sustain = std::atoi(argv[i] + 10);
    if (std::strncmp(argv[i], "--step_layout=", 14) == 0) {
      long long b = 0, t = 0, h = 0, d = 0;
      if (std::sscanf(argv[i] + 14, "%lld,%lld,%lld,%lld", &b, &t, &h, &d) != 4 || b <= 0 ||
          t <= 0 || h <= 0 || (d != 64 && d != 128)) {
        std::fprintf(stderr, "--step_layout wants B,S,H,D with D 64 or 128, got '%s'\n",
                     argv[i] + 14);
        return 2;
      }
      step_shape = {b, t, h, d};
    }
    if (std::strncmp(argv[i], "--bwd_only=", 11) == 0) {
      long long b = 0, t = 0, h = 0, d = 0;
      if (std::sscanf(argv[i] + 11, "%lld,%lld,%lld,%lld", &b, &t, &h, &d) != 4 || b <= 0 ||
          t <= 0 || h <= 0 || (d != 64 && d != 128)) {
        std::fprintf(stderr, "--bwd_only wants B,S,H,D with D 64 or 128, got '%s'\n", argv[i] + 11);
        return 2;
      }
      bwd_shape = {b, t, h, d};
    }
  }
  cudaDeviceProp prop{};
  CUDA_CHECK_OR_DIE(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d SMs\n", prop.name, prop.multiProcessorCount);
  DeviceAllocator alloc;
  cudaStream_t stream;
  CUDA_CHECK_OR_DIE(cudaStreamCreate(&stream));
  if (step_shape.batch > 0) {
    RunStepLayout(alloc, stream, step_shape, reps, sustain, once);
    CUDA_CHECK_OR_DIE(cudaStreamDestroy(stream));
    return 0;
  }
  if (bwd_shape.batch > 0) {
    Run(alloc, stream, bwd_shape, reps, false, /*bwd_only=*/true);
    CUDA_CHECK_OR_DIE(cudaStreamDestroy(stream));
    return 0;
  }
  const Shape all[] = {{8, 2048, 16, 128}, {2, 8192, 16, 128}, {8, 2048, 12, 64}};
  for (int i = std::max(from_shape, 1) - 1; i < std::min(shapes, 3); ++i) Run(alloc, stream, all[i], reps, fwd_only);
  CUDA_CHECK_OR_DIE(cudaStreamDestroy(stream));
  return 0;
}

}  // namespace
}  // namespace gyre::cuda

int main(int argc, char** argv) { return gyre::cuda::Main(argc, argv); }
