// Fused LM-head linear + cross-entropy (kernels/cuda/cross_entropy.h) at the 125m/130m presets'
// shape (32768 tokens = B16 x 2048, d 768, V 50304; --tokens / --dim / --vocab for others, e.g.
// the 1.3B presets' 16384 x 2048 x 50288 / 50304), variants side by side in one process: the
// vocabulary split (unsplit / split where the rounded plan is rejected / split always: bits, whole
// call; each GEMM whole, split and its tail alone; --rows the row pass; --candidates logs the
// timings of cuBLASLt's top-8 candidates per GEMM), chunk size, dW overwrite on the first chunk, GEMM autotune, loss only; the GEMMs alone (fp32
// and bf16 logits out); and the loss / gradient error of the bf16 logits against a float64
// reference at V = 50304 with realistic logit scales. (Session 6's first call also timed fp32
// logits and a two-stream overlapped schedule, since removed: bench/RESULTS.md, lce6.)
//
// Timing: CUDA events, median of --reps after 3 warm-ups (no L2 flush: each call moves GBs).
// FLOPs: 3 · 2·N·V·d (loss only: 1).
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "bench/gpu_timing.h"
#include "kernels/cuda/cross_entropy.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/device_allocator.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/random_fill.h"

namespace gyre::cuda {
namespace {

using bf16 = __nv_bfloat16;

void ParallelFor(int64_t n, const std::function<void(int64_t)>& f) {
  const int threads = std::max(1u, std::min(32u, std::thread::hardware_concurrency()));
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&, t]() {
      for (int64_t i = t; i < n; i += threads) f(i);
    });
  for (auto& th : pool) th.join();
}

float Bf16ToFloat(bf16 x) {
  uint16_t u;
  std::memcpy(&u, &x, 2);
  const uint32_t v = static_cast<uint32_t>(u) << 16;
  float f;
  std::memcpy(&f, &v, 4);
  return f;
}

// Error of bf16 vs fp32 logits against float64, `tokens` rows: h ~ N(0, 1), W ~ N(0, σ²/d) so
// the logits have standard deviation ~σ; `confident` rows take the argmax logit as target (a
// trained model's typical case: large target logit, small loss).
void AccuracyCase(GemmContext* gemm, DeviceAllocator* alloc, int64_t tokens, int64_t d, int64_t V,
                  float sigma, bool confident, uint64_t seed) {
  DeviceBuffer dh_buf, dw_buf, h_buf, w_buf, t_buf, tl_buf, loss_buf;
  CUDA_OK_OR_DIE(alloc->Allocate(sizeof(bf16) * tokens * d, &h_buf));
  CUDA_OK_OR_DIE(alloc->Allocate(sizeof(bf16) * V * d, &w_buf));
  CUDA_OK_OR_DIE(alloc->Allocate(sizeof(bf16) * tokens * d, &dh_buf));
  CUDA_OK_OR_DIE(alloc->Allocate(sizeof(float) * V * d, &dw_buf));
  CUDA_OK_OR_DIE(alloc->Allocate(sizeof(int32_t) * tokens, &t_buf));
  CUDA_OK_OR_DIE(alloc->Allocate(sizeof(float) * tokens, &tl_buf));
  CUDA_OK_OR_DIE(alloc->Allocate(sizeof(double), &loss_buf));
  CUDA_OK_OR_DIE(FillRandomBf16(h_buf.as<bf16>(), tokens * d, 0.f, 1.f, seed, nullptr));
  CUDA_OK_OR_DIE(FillRandomBf16(w_buf.as<bf16>(), V * d, 0.f, sigma / std::sqrt(float(d)), seed + 1, nullptr));
  std::vector<bf16> hb(tokens * d), wb(V * d);
  CUDA_CHECK_OR_DIE(cudaMemcpy(hb.data(), h_buf.get(), sizeof(bf16) * hb.size(), cudaMemcpyDeviceToHost));
  CUDA_CHECK_OR_DIE(cudaMemcpy(wb.data(), w_buf.get(), sizeof(bf16) * wb.size(), cudaMemcpyDeviceToHost));
  std::vector<double> h(hb.size()), w(wb.size());
  for (size_t i = 0; i < hb.size(); ++i) h[i] = Bf16ToFloat(hb[i]);
  for (size_t i = 0; i < wb.size(); ++i) w[i] = Bf16ToFloat(wb[i]);
  // float64 logits, lse.
  std::vector<double> logits(tokens * V), lse(tokens);
  std::vector<int32_t> targets(tokens);
  std::mt19937_64 rng(seed);
  for (int64_t t = 0; t < tokens; ++t) targets[t] = static_cast<int32_t>(rng() % V);
  double absmax = 0;
  ParallelFor(tokens, [&](int64_t t) {
    double* l = &logits[t * V];
    for (int64_t v = 0; v < V; ++v) {
      double acc = 0;
      for (int64_t k = 0; k < d; ++k) acc += h[t * d + k] * w[v * d + k];
      l[v] = acc;
    }
    const double mx = *std::max_element(l, l + V);
    double s = 0;
    for (int64_t v = 0; v < V; ++v) s += std::exp(l[v] - mx);
    lse[t] = mx + std::log(s);
    if (confident && t % 2 == 0) targets[t] = static_cast<int32_t>(std::max_element(l, l + V) - l);
  });
  for (double x : logits) absmax = std::max(absmax, std::fabs(x));
  const double scale = 1.0 / tokens;
  std::vector<double> tl(tokens), dh(tokens * d, 0.0), dw(V * d, 0.0);
  double loss = 0;
  for (int64_t t = 0; t < tokens; ++t) {
    tl[t] = lse[t] - logits[t * V + targets[t]];
    loss += scale * tl[t];
  }
  auto g = [&](int64_t t, int64_t v) {
    return scale * (std::exp(logits[t * V + v] - lse[t]) - (v == targets[t] ? 1.0 : 0.0));
  };
  ParallelFor(tokens, [&](int64_t t) {
    for (int64_t v = 0; v < V; ++v) {
      const double gv = g(t, v);
      for (int64_t k = 0; k < d; ++k) dh[t * d + k] += gv * w[v * d + k];
    }
  });
  ParallelFor(V, [&](int64_t v) {
    for (int64_t t = 0; t < tokens; ++t) {
      const double gv = g(t, v);
      for (int64_t k = 0; k < d; ++k) dw[v * d + k] += gv * h[t * d + k];
    }
  });
  CUDA_CHECK_OR_DIE(cudaMemcpy(t_buf.get(), targets.data(), sizeof(int32_t) * tokens, cudaMemcpyHostToDevice));
  auto rel = [](const std::vector<double>& got, const std::vector<double>& ref) {
    double num = 0, den = 0;
    for (size_t i = 0; i < ref.size(); ++i) {
      num += (got[i] - ref[i]) * (got[i] - ref[i]);
      den += ref[i] * ref[i];
    }
    return std::sqrt(num / den);
  };
  double mean_tl = 0;
  for (double x : tl) mean_tl += x / tokens;
  {
    LinearCrossEntropyArgs a;
    a.tokens = tokens;
    a.dim = d;
    a.vocab = V;
    a.h = h_buf.as<bf16>();
    a.w = w_buf.as<bf16>();
    a.targets = t_buf.as<int32_t>();
    a.loss_scale = static_cast<float>(scale);
    a.token_loss = tl_buf.as<float>();
    a.loss_sum = loss_buf.as<double>();
    a.dh = dh_buf.as<bf16>();
    a.dw = dw_buf.as<float>();
    a.overwrite_dw = true;
    a.chunk_tokens = 8192;
    CUDA_OK_OR_DIE(LinearCrossEntropy(gemm, alloc, a, nullptr));
    CUDA_CHECK_OR_DIE(cudaDeviceSynchronize());
    std::vector<float> tlf(tokens), dwf(V * d);
    std::vector<bf16> dhb(tokens * d);
    double got_loss = 0;
    CUDA_CHECK_OR_DIE(cudaMemcpy(tlf.data(), tl_buf.get(), sizeof(float) * tokens, cudaMemcpyDeviceToHost));
    CUDA_CHECK_OR_DIE(cudaMemcpy(dwf.data(), dw_buf.get(), sizeof(float) * V * d, cudaMemcpyDeviceToHost));
    CUDA_CHECK_OR_DIE(cudaMemcpy(dhb.data(), dh_buf.get(), sizeof(bf16) * tokens * d, cudaMemcpyDeviceToHost));
    CUDA_CHECK_OR_DIE(cudaMemcpy(&got_loss, loss_buf.get(), sizeof(double), cudaMemcpyDeviceToHost));
    double tl_max = 0, tl_rms = 0;
    for (int64_t t = 0; t < tokens; ++t) {
      tl_max = std::max(tl_max, std::fabs(tlf[t] - tl[t]));
      tl_rms += (tlf[t] - tl[t]) * (tlf[t] - tl[t]) / tokens;
    }
    std::vector<double> dhd(dhb.size()), dwd(dwf.begin(), dwf.end());
    for (size_t i = 0; i < dhb.size(); ++i) dhd[i] = Bf16ToFloat(dhb[i]);
    std::printf("accuracy bf16 logits | N=%ld d=%ld V=%ld sigma=%.1f %s |logit|max=%.1f mean loss=%.4f | "
                "loss rel %.2e | token loss abs max %.2e rms %.2e | dh rel %.2e | dW rel %.2e\n",
                (long)tokens, (long)d, (long)V, sigma,
                confident ? "half argmax targets" : "random targets", absmax, mean_tl,
                std::fabs(got_loss - loss) / std::fabs(loss), tl_max, std::sqrt(tl_rms), rel(dhd, dh), rel(dwd, dw));
    std::fflush(stdout);
  }
}

// The three GEMMs of one chunk of LinearCrossEntropy, `rows` tokens, logits (or G) of row stride
// `ld`: logits = h W^T (out in `out`), dh = G W (bf16), dW = G^T h + beta dW (fp32).
GemmArgs LogitsGemm(int64_t rows, int64_t d, int64_t V, const void* h, const void* w, void* logits, int64_t ld,
                    DType out) {
  GemmArgs g;
  g.trans_b = true;
  g.m = rows;
  g.n = V;
  g.k = d;
  g.a = h;
  g.lda = d;
  g.b = w;
  g.ldb = d;
  g.c = logits;
  g.ldc = ld;
  g.c_dtype = out;
  return g;
}
GemmArgs DhGemm(int64_t rows, int64_t d, int64_t V, const void* logits, int64_t ld, const void* w, void* dh) {
  GemmArgs g;
  g.m = rows;
  g.n = d;
  g.k = V;
  g.a = logits;
  g.lda = ld;
  g.b = w;
  g.ldb = d;
  g.c = dh;
  g.ldc = d;
  g.c_dtype = DType::kBf16;
  return g;
}
GemmArgs DwGemm(int64_t rows, int64_t d, int64_t V, const void* logits, int64_t ld, const void* h, void* dw,
                float beta) {
  GemmArgs g;
  g.trans_a = true;
  g.m = V;
  g.n = d;
  g.k = rows;
  g.a = logits;
  g.lda = ld;
  g.b = h;
  g.ldb = d;
  g.c = dw;
  g.ldc = d;
  g.c_dtype = DType::kF32;
  g.beta = beta;
  return g;
}

// LinearCrossEntropy's arguments at N tokens with loss scale 1 / N (chunk and dW overwrite left
// to the caller; dh, dw null for loss only).
LinearCrossEntropyArgs LceArgs(int64_t N, int64_t d, int64_t V, const bf16* h, const bf16* w, const int32_t* targets,
                               float* tl, double* loss, bf16* dh, float* dw) {
  LinearCrossEntropyArgs a;
  a.tokens = N;
  a.dim = d;
  a.vocab = V;
  a.h = h;
  a.w = w;
  a.targets = targets;
  a.loss_scale = 1.f / N;
  a.token_loss = tl;
  a.loss_sum = loss;
  a.dh = dh;
  a.dw = dw;
  return a;
}

// The row pass alone (CrossEntropyRows over `rows` = min(16384, N) rows of one logits fill; values
// change after the first pass — G over G — which costs the same: no data-dependent branch but the
// target's group), modes alternating within each of `rounds` rounds, G in place then loss only,
// each mode reading the buffer with its own row stride; one line per mode and kind, "<label> | ...".
void TimeRowPasses(const char* label, GemmContext* gemm, DeviceAllocator* alloc, Timer& timer, int64_t N, int64_t d,
                   int64_t V, const bf16* h, const bf16* w, int modes, const char* const* names,
                   const std::function<LinearCrossEntropyArgs(int)>& args_for, int rounds) {
  const int64_t rows = std::min<int64_t>(16384, N), ld = (V + 7) / 8 * 8;  // the fill's stride
  int64_t widest = ld;
  for (int i = 0; i < modes; ++i) widest = std::max(widest, LogitsRowStride(args_for(i)));
  DeviceBuffer lg;
  CUDA_OK_OR_DIE(alloc->Allocate(sizeof(bf16) * rows * widest, &lg));
  CUDA_OK_OR_DIE(gemm->Gemm(LogitsGemm(rows, d, V, h, w, lg.get(), ld, DType::kBf16), nullptr));
  std::vector<std::vector<double>> ms[2];
  for (auto& m : ms) m.resize(modes);
  for (int r = 0; r < rounds; ++r) {
    for (int grad = 1; grad >= 0; --grad) {
      for (int i = 0; i < modes; ++i) {
        const LinearCrossEntropyArgs a = args_for(i);
        const int64_t ld_i = LogitsRowStride(a);
        ms[grad][i].push_back(
            TimeMs(timer, [&]() { return CrossEntropyRows(lg.as<bf16>(), ld_i, rows, a, grad == 1, nullptr); }));
      }
    }
  }
  const double bytes_grad = 4.0 * rows * V, bytes_loss = 2.0 * rows * V;
  for (int grad = 1; grad >= 0; --grad) {
    for (int i = 0; i < modes; ++i) {
      std::vector<double> v = ms[grad][i];
      std::sort(v.begin(), v.end());
      std::string rounds_s;
      for (double x : ms[grad][i]) rounds_s += " " + std::to_string(x).substr(0, 6);
      const double med = v[v.size() / 2];
      std::printf("%s | %-17s | %ld rows, %s | median %7.4f ms | min %7.4f | %5.2f TB/s | rounds:%s\n", label,
                  names[i], (long)rows, grad ? "G in place" : "loss only ", med, v.front(),
                  (grad ? bytes_grad : bytes_loss) / med * 1e-9, rounds_s.c_str());
    }
  }
  std::fflush(stdout);
}

// The whole LinearCrossEntropy call, modes alternating within each of `rounds` rounds (each a
// median of timer.reps); one line per mode, "<label> | ... whole call".
void TimeWholeCalls(const char* label, GemmContext* gemm, DeviceAllocator* alloc, Timer& timer, int64_t N, int64_t d,
                    int64_t V, int modes, const char* const* names,
                    const std::function<LinearCrossEntropyArgs(int)>& args_for, int rounds) {
  std::vector<std::vector<double>> ms(modes);
  for (int r = 0; r < rounds; ++r) {
    for (int i = 0; i < modes; ++i) {
      const LinearCrossEntropyArgs a = args_for(i);
      ms[i].push_back(TimeMs(timer, [&]() { return LinearCrossEntropy(gemm, alloc, a, nullptr); }));
    }
  }
  const double flops = 3 * 2.0 * N * V * d;
  for (int i = 0; i < modes; ++i) {
    std::vector<double> v = ms[i];
    std::sort(v.begin(), v.end());
    std::string rounds_s;
    for (double x : ms[i]) rounds_s += " " + std::to_string(x).substr(0, 6);
    std::printf("%s | N=%ld d=%ld V=%ld | whole call, %-16s | median %7.3f ms | min %7.3f | %6.1f TFLOP/s | rounds:%s\n",
                label, (long)N, (long)d, (long)V, names[i], v[v.size() / 2], v.front(), flops / v[v.size() / 2] * 1e-9,
                rounds_s.c_str());
  }
  std::fflush(stdout);
}

// The vocabulary split (LinearCrossEntropyArgs::vocab_split, kernels/cuda/cross_entropy_notes.md
// session 20) at the model's call (chunk 16384, overwrite dW, the default padded stride and
// rounded plans): unsplit (the default before session 20), split where the rounded plan is
// rejected, split always. 1. bytewise outputs against unsplit; 2. with `rows`, the row pass alone
// over 16384 rows (unchanged by the split: a check that the modes' buffers are the same);
// 3. the whole call, modes alternating within each of `rounds` rounds (each a median of
// timer.reps). (Session 19 compared the row strides ld 8 / ld 128 here, session 18 the row kernels.)
void RowsAb(GemmContext* gemm, DeviceAllocator* alloc, Timer& timer, int64_t N, int64_t d, int64_t V, const bf16* h,
            const bf16* w, const int32_t* targets, float* tl, double* loss, bf16* dh, float* dw, int rounds,
            bool rows_pass) {
  using Split = LinearCrossEntropyArgs::VocabSplit;
  const char* names[3] = {"unsplit", "split rejected", "split always"};
  constexpr int kModes = 3;
  const Split splits[kModes] = {Split::kOff, Split::kWhereRejected, Split::kAlways};
  auto args_for = [&](int mode) {
    LinearCrossEntropyArgs a = LceArgs(N, d, V, h, w, targets, tl, loss, dh, dw);
    a.chunk_tokens = 16384;
    a.overwrite_dw = true;
    a.ld_align = 128;
    a.plan_as_padded = true;
    a.vocab_split = splits[mode];
    return a;
  };
  struct Out {
    std::vector<float> tl, dw;
    std::vector<uint16_t> dh;
    double loss = 0;
  };
  Out outs[kModes];
  for (int i = 0; i < kModes; ++i) {
    CUDA_CHECK_OR_DIE(cudaMemset(dh, 0xFF, sizeof(bf16) * N * d));
    CUDA_CHECK_OR_DIE(cudaMemset(dw, 0xFF, sizeof(float) * V * d));
    CUDA_CHECK_OR_DIE(cudaMemset(tl, 0xFF, sizeof(float) * N));
    CUDA_OK_OR_DIE(LinearCrossEntropy(gemm, alloc, args_for(i), nullptr));
    CUDA_CHECK_OR_DIE(cudaDeviceSynchronize());
    Out& o = outs[i];
    o.tl.resize(N);
    o.dh.resize(N * d);
    o.dw.resize(V * d);
    CUDA_CHECK_OR_DIE(cudaMemcpy(o.tl.data(), tl, sizeof(float) * N, cudaMemcpyDeviceToHost));
    CUDA_CHECK_OR_DIE(cudaMemcpy(o.dh.data(), dh, sizeof(bf16) * N * d, cudaMemcpyDeviceToHost));
    CUDA_CHECK_OR_DIE(cudaMemcpy(o.dw.data(), dw, sizeof(float) * V * d, cudaMemcpyDeviceToHost));
    CUDA_CHECK_OR_DIE(cudaMemcpy(&o.loss, loss, sizeof(double), cudaMemcpyDeviceToHost));
  }
  auto differ = [](const auto& x, const auto& y) {
    int64_t n = 0;
    for (size_t i = 0; i < x.size(); ++i) n += std::memcmp(&x[i], &y[i], sizeof(x[i])) != 0;
    return static_cast<long>(n);
  };
  auto rel = [](const auto& x, const auto& y, auto to_double) {
    double num = 0, den = 0;
    for (size_t i = 0; i < x.size(); ++i) {
      const double a = to_double(x[i]), b = to_double(y[i]);
      num += (a - b) * (a - b);
      den += b * b;
    }
    return std::sqrt(num / den);
  };
  auto f = [](float v) { return double(v); };
  auto b16 = [](uint16_t v) {
    const uint32_t u = static_cast<uint32_t>(v) << 16;
    float x;
    std::memcpy(&x, &u, 4);
    return double(x);
  };
  for (int i = 1; i < kModes; ++i) {
    std::printf("bits | %s vs unsplit, N=%ld chunk 16384 | token loss %ld / %ld differ (rel %.2e) | dh %ld / %ld (rel %.2e) | "
                "dW %ld / %ld (rel %.2e) | loss %s (%.9f vs %.9f)\n",
                names[i], (long)N, differ(outs[i].tl, outs[0].tl), (long)N, rel(outs[i].tl, outs[0].tl, f),
                differ(outs[i].dh, outs[0].dh), (long)(N * d), rel(outs[i].dh, outs[0].dh, b16),
                differ(outs[i].dw, outs[0].dw), (long)(V * d), rel(outs[i].dw, outs[0].dw, f),
                std::memcmp(&outs[i].loss, &outs[0].loss, sizeof(double)) == 0 ? "same bits" : "DIFFERS", outs[i].loss,
                outs[0].loss);
  }
  std::fflush(stdout);
  for (Out& o : outs) o = Out();
  // 2. The row pass alone; 3. the whole call.
  if (rows_pass) TimeRowPasses("rows", gemm, alloc, timer, N, d, V, h, w, kModes, names, args_for, rounds);
  TimeWholeCalls("ab", gemm, alloc, timer, N, d, V, kModes, names, args_for, rounds);
}

// The three GEMMs of the model's call (first chunk: chunk = min(N, 16384) rows, dW overwritten at
// beta 0, later chunks beta 1) on the padded stride with the rounded plans, each whole (unsplit)
// and split at V128 = 128·⌊V/128⌋ as LinearCrossEntropy's VocabProduct splits it (logits and dW
// along V, dh's reduction: the tail first, the body onto it), alternating within `rounds` rounds;
// each product's line says whether its rounded plan is rejected (the product split under
// GYRE_LCE_SPLIT=1). With `candidates`, cuBLASLt's top-8 candidates of the unsplit products are
// timed and logged first (GYRE_GEMM_AUTOTUNE=1 GYRE_GEMM_LOG=1: "gemm-cand" lines on stderr).
void GemmsAb(GemmContext* gemm, DeviceAllocator* alloc, Timer& timer, int64_t N, int64_t d, int64_t V, const bf16* h,
             const bf16* w, bf16* dh, float* dw, int rounds, bool candidates) {
  const int64_t chunk = std::min<int64_t>(N, 16384);
  const int64_t ld = (V + 127) / 128 * 128, body = V / 128 * 128;
  const bool can_split = body > 0 && body < V;
  DeviceBuffer lg;
  CUDA_OK_OR_DIE(alloc->Allocate(sizeof(bf16) * chunk * ld, &lg));
  CUDA_OK_OR_DIE(FillRandomBf16(lg.as<bf16>(), chunk * ld, 0.f, 1e-4f, 7, nullptr));
  const auto at = [](const void* p, int64_t bytes) { return static_cast<void*>(static_cast<char*>(const_cast<void*>(p)) + bytes); };
  struct Product {
    std::string name;
    GemmArgs whole;
    std::vector<GemmArgs> pieces;  // in launch order
  };
  std::vector<Product> products;
  {
    GemmArgs g1 = LogitsGemm(chunk, d, V, h, w, lg.get(), ld, DType::kBf16);
    g1.plan_round = 128;
    GemmArgs head = g1, tail = g1;
    head.n = body;
    tail.n = V - body;
    tail.b = at(w, body * d * 2);
    tail.c = at(lg.get(), body * 2);
    products.push_back({"logits", g1, {head, tail}});
    GemmArgs g2 = DhGemm(chunk, d, V, lg.get(), ld, w, dh);
    g2.plan_round = 128;
    head = g2;
    tail = g2;
    tail.k = V - body;
    tail.a = at(lg.get(), body * 2);
    tail.b = at(w, body * d * 2);
    head.k = body;
    head.beta = 1.f;
    products.push_back({"dh = G W", g2, {tail, head}});
    for (float beta : {0.f, 1.f}) {
      if (beta == 1.f && N <= chunk) break;
      GemmArgs g3 = DwGemm(chunk, d, V, lg.get(), ld, h, dw, beta);
      g3.plan_round = 128;
      head = g3;
      tail = g3;
      head.m = body;
      tail.m = V - body;
      tail.a = at(lg.get(), body * 2);
      tail.c = at(dw, body * d * 4);
      products.push_back({beta == 0.f ? "dW = G^T h (beta 0)" : "dW += G^T h (beta 1)", g3, {head, tail}});
    }
  }
  if (candidates) {
    setenv("GYRE_GEMM_AUTOTUNE", "1", 1);
    setenv("GYRE_GEMM_LOG", "1", 1);
    for (const Product& p : products) {
      std::fprintf(stderr, "gemm-cand-of N=%ld d=%ld V=%ld ld=%ld %s\n", (long)N, (long)d, (long)V, (long)ld,
                   p.name.c_str());
      CUDA_OK_OR_DIE(gemm->Gemm(p.whole, nullptr));
    }
    CUDA_CHECK_OR_DIE(cudaDeviceSynchronize());
    unsetenv("GYRE_GEMM_AUTOTUNE");
    unsetenv("GYRE_GEMM_LOG");
  }
  const int modes = can_split ? 3 : 1;  // whole, split (body + tail), the tail alone
  std::vector<std::vector<double>> ms(products.size() * 3);
  for (int r = 0; r < rounds; ++r) {
    for (size_t j = 0; j < products.size(); ++j) {
      for (int mode = 0; mode < modes; ++mode) {
        const Product& p = products[j];
        ms[j * 3 + mode].push_back(TimeMs(timer, [&]() -> CudaResult {
          if (mode == 0) return gemm->Gemm(p.whole, nullptr);
          if (mode == 2) return gemm->Gemm(p.name == "dh = G W" ? p.pieces[0] : p.pieces[1], nullptr);
          for (const GemmArgs& g : p.pieces) CUDA_RETURN_IF_NOT_OK(gemm->Gemm(g, nullptr));
          return {};
        }));
      }
    }
  }
  const double flops = 2.0 * chunk * V * d;
  const char* mode_names[3] = {"unsplit", "split", "tail alone"};
  for (size_t j = 0; j < products.size(); ++j) {
    bool rejected = false;
    CUDA_OK_OR_DIE(gemm->RoundedPlanRejected(products[j].whole, nullptr, &rejected));
    for (int mode = 0; mode < modes; ++mode) {
      std::vector<double> v = ms[j * 3 + mode];
      std::sort(v.begin(), v.end());
      std::printf("gemm | N=%ld d=%ld V=%ld chunk %ld ld %5ld | %-20s | %-10s | rounded plan %-8s | median %7.4f ms | "
                  "min %7.4f | %6.1f TFLOP/s\n",
                  (long)N, (long)d, (long)V, (long)chunk, (long)ld, products[j].name.c_str(), mode_names[mode],
                  rejected ? "REJECTED" : "accepted", v[v.size() / 2], v.front(), flops / v[v.size() / 2] * 1e-9);
    }
  }
  std::fflush(stdout);
}

// The soft-capped loss (--cap c: xLSTM Large's c = 30; cross_entropy_notes.md session 21) at the
// model's call (chunk 16384, overwrite dW) beside the uncapped one: the row pass alone over 16384
// rows (G in place; loss only) and the whole call, alternating in `rounds` rounds. (capce21's call
// also ran the deleted three-pass global kernel and the fp32-u variant here.)
void CappedAb(GemmContext* gemm, DeviceAllocator* alloc, Timer& timer, int64_t N, int64_t d, int64_t V, float cap,
              const bf16* h, const bf16* w, const int32_t* targets, float* tl, double* loss, bf16* dh, float* dw,
              int rounds) {
  constexpr int kModes = 2;
  const char* names[kModes] = {"uncapped (lean)", "capped"};
  auto args_for = [&](int mode) {
    LinearCrossEntropyArgs a = LceArgs(N, d, V, h, w, targets, tl, loss, dh, dw);
    a.chunk_tokens = 16384;
    a.overwrite_dw = true;
    a.logit_soft_cap = mode == 0 ? 0.f : cap;
    return a;
  };
  TimeRowPasses("capped rows", gemm, alloc, timer, N, d, V, h, w, kModes, names, args_for, rounds);
  TimeWholeCalls("capped ab", gemm, alloc, timer, N, d, V, kModes, names, args_for, rounds);
}

int Main(int argc, char** argv) {
  int64_t N = 32768, d = 768, V = 50304;
  int reps = 20;
  bool accuracy = true;
  int ab_rounds = 5;
  bool only_ab = false;
  bool candidates = false;
  bool rows_pass = false;
  float cap = 0.f;
  for (int i = 1; i < argc; ++i) {
    const std::string s = argv[i];
    if (s == "--tokens" && i + 1 < argc) N = std::atoll(argv[++i]);
    else if (s == "--dim" && i + 1 < argc) d = std::atoll(argv[++i]);
    else if (s == "--vocab" && i + 1 < argc) V = std::atoll(argv[++i]);
    else if (s == "--reps" && i + 1 < argc) reps = std::atoi(argv[++i]);
    else if (s == "--no_accuracy") accuracy = false;
    else if (s == "--ab_rounds" && i + 1 < argc) ab_rounds = std::atoi(argv[++i]);
    else if (s == "--only_ab") only_ab = true;
    else if (s == "--candidates") candidates = true;
    else if (s == "--rows") rows_pass = true;
    else if (s == "--cap" && i + 1 < argc) cap = std::atof(argv[++i]);
    else {
      std::fprintf(stderr,
                   "usage: lce_bench [--tokens N] [--dim d] [--vocab V] [--reps n] [--no_accuracy] [--ab_rounds n] "
                   "[--only_ab] [--candidates] [--rows] [--cap c]\n");
      return 2;
    }
  }
  DeviceAllocator alloc;
  std::unique_ptr<GemmContext> gemm;
  CUDA_OK_OR_DIE(GemmContext::Create(&alloc, &gemm));
  cudaDeviceProp prop{};
  CUDA_CHECK_OR_DIE(cudaGetDeviceProperties(&prop, 0));
  std::printf("device %s, N=%ld d=%ld V=%ld\n", prop.name, (long)N, (long)d, (long)V);
  DeviceBuffer h, w, dh, dw, tl, loss, targets;
  CUDA_OK_OR_DIE(alloc.Allocate(sizeof(bf16) * N * d, &h));
  CUDA_OK_OR_DIE(alloc.Allocate(sizeof(bf16) * V * d, &w));
  CUDA_OK_OR_DIE(alloc.Allocate(sizeof(bf16) * N * d, &dh));
  CUDA_OK_OR_DIE(alloc.Allocate(sizeof(float) * V * d, &dw));
  CUDA_OK_OR_DIE(alloc.Allocate(sizeof(float) * N, &tl));
  CUDA_OK_OR_DIE(alloc.Allocate(sizeof(double), &loss));
  CUDA_OK_OR_DIE(alloc.Allocate(sizeof(int32_t) * N, &targets));
  CUDA_OK_OR_DIE(FillRandomBf16(h.as<bf16>(), N * d, 0.f, 1.f, 1, nullptr));
  CUDA_OK_OR_DIE(FillRandomBf16(w.as<bf16>(), V * d, 0.f, 2.f / std::sqrt(float(d)), 2, nullptr));
  CUDA_OK_OR_DIE(FillRandomF32(dw.as<float>(), V * d, 0.f, 1e-3f, 3, nullptr));
  CUDA_OK_OR_DIE(FillRandomInt32(targets.as<int32_t>(), N, static_cast<int32_t>(V), 4, nullptr));
  Timer timer;
  timer.Init(&alloc);
  timer.reps = reps;
  timer.warmup = 3;
  auto time = [&](const std::function<CudaResult()>& op) {
    // No flush: TimeMs flushes 256 MiB first, which is outside the events; it costs wall time only.
    return TimeMs(timer, op);
  };
  const double gemm_flops = 2.0 * N * V * d;
  if (cap > 0.f) {  // the capped A/B alone
    CappedAb(gemm.get(), &alloc, timer, N, d, V, cap, h.as<bf16>(), w.as<bf16>(), targets.as<int32_t>(),
             tl.as<float>(), loss.as<double>(), dh.as<bf16>(), dw.as<float>(), ab_rounds);
    return 0;
  }
  RowsAb(gemm.get(), &alloc, timer, N, d, V, h.as<bf16>(), w.as<bf16>(), targets.as<int32_t>(), tl.as<float>(),
         loss.as<double>(), dh.as<bf16>(), dw.as<float>(), ab_rounds, rows_pass);
  GemmsAb(gemm.get(), &alloc, timer, N, d, V, h.as<bf16>(), w.as<bf16>(), dh.as<bf16>(), dw.as<float>(), ab_rounds,
          candidates);
  if (only_ab) return 0;
  struct Variant {
    const char* name;
    int64_t chunk;
    bool overwrite, autotune, loss_only;
  };
  const Variant variants[] = {
      {"chunk 16384, overwrite dW (the model's call)", 16384, true, false, false},
      {"chunk 16384", 16384, false, false, false},
      {"chunk 8192, overwrite dW", 8192, true, false, false},
      {"chunk 32768, overwrite dW", 32768, true, false, false},
      {"chunk 16384, overwrite dW, GEMM autotune", 16384, true, true, false},
      {"loss only, chunk 16384", 16384, false, false, true},
      {"chunk 16384, overwrite dW (again)", 16384, true, false, false},
  };
  for (const Variant& v : variants) {
    if (v.autotune) setenv("GYRE_GEMM_AUTOTUNE", "1", 1);
    else unsetenv("GYRE_GEMM_AUTOTUNE");
    LinearCrossEntropyArgs a =
        LceArgs(N, d, V, h.as<bf16>(), w.as<bf16>(), targets.as<int32_t>(), tl.as<float>(), loss.as<double>(),
                v.loss_only ? nullptr : dh.as<bf16>(), v.loss_only ? nullptr : dw.as<float>());
    a.chunk_tokens = v.chunk;
    a.overwrite_dw = v.overwrite;
    const double ms = time([&]() { return LinearCrossEntropy(gemm.get(), &alloc, a, nullptr); });
    const double flops = (v.loss_only ? 1 : 3) * gemm_flops;
    std::printf("lce | %-46s | %8.3f ms | %6.1f TFLOP/s\n", v.name, ms, flops / ms * 1e-9);
    std::fflush(stdout);
  }
  unsetenv("GYRE_GEMM_AUTOTUNE");
  // The GEMMs alone (heuristic plans), per chunk size, summed over the N / chunk chunks.
  {
    DeviceBuffer lg;
    CUDA_OK_OR_DIE(alloc.Allocate(sizeof(float) * 16384 * V, &lg));
    for (int64_t chunk : {8192, 16384}) {
      const int64_t chunks = N / chunk;
      for (bool f32 : {true, false}) {
        const GemmArgs g1 =
            LogitsGemm(chunk, d, V, h.get(), w.get(), lg.get(), (V + 7) / 8 * 8, f32 ? DType::kF32 : DType::kBf16);
        const double ms = chunks * time([&]() { return gemm->Gemm(g1, nullptr); });
        std::printf("gemm | logits %s out, chunk %ld (x%ld) | %8.3f ms | %6.1f TFLOP/s\n", f32 ? "fp32" : "bf16",
                    (long)chunk, (long)chunks, ms, gemm_flops / ms * 1e-9);
      }
      const GemmArgs g2 = DhGemm(chunk, d, V, lg.get(), (V + 7) / 8 * 8, w.get(), dh.get());
      double ms = chunks * time([&]() { return gemm->Gemm(g2, nullptr); });
      std::printf("gemm | dh = G W, chunk %ld (x%ld) | %8.3f ms | %6.1f TFLOP/s\n", (long)chunk, (long)chunks, ms,
                  gemm_flops / ms * 1e-9);
      for (float beta : {1.f, 0.f}) {
        const GemmArgs g3 = DwGemm(chunk, d, V, lg.get(), (V + 7) / 8 * 8, h.get(), dw.get(), beta);
        ms = chunks * time([&]() { return gemm->Gemm(g3, nullptr); });
        std::printf("gemm | dW += G^T h (beta %.0f), chunk %ld (x%ld) | %8.3f ms | %6.1f TFLOP/s\n", beta,
                    (long)chunk, (long)chunks, ms, gemm_flops / ms * 1e-9);
      }
      std::fflush(stdout);
    }
  }
  if (accuracy) {
    AccuracyCase(gemm.get(), &alloc, 64, 768, 50304, 1.f, false, 21);
    AccuracyCase(gemm.get(), &alloc, 64, 768, 50304, 3.f, true, 22);
    AccuracyCase(gemm.get(), &alloc, 64, 768, 50304, 6.f, true, 23);
  }
  return 0;
}

}  // namespace
}  // namespace gyre::cuda

int main(int argc, char** argv) { return gyre::cuda::Main(argc, argv); }
