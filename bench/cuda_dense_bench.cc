// Dense CUDA kernel benchmark for the Llama presets (kernels/cuda; issue 7 part 1).
//
// What it measures, in order:
//   0. the two ceilings of this card (METHOD.md): a 1 GiB device-to-device copy (bytes read +
//      written) and a bf16 8192^3 GEMM through our cuBLASLt path;
//   1. per model (llama-125m: d 768, ffn 2048, 12 heads x 64; llama-1.3b: d 2048, ffn 5504,
//      16 heads x 128; vocab 50304; 16,384 tokens = 8 x 2048): the Linear GEMMs of one block
//      (qkv, o, fused gate+up, down; forward, dX, dW), RMSNorm+residual fwd/bwd, SwiGLU fwd/bwd,
//      RoPE on q and k, embedding fwd/bwd, fused linear+cross-entropy (loss only, and loss +
//      dh + dW), and one fused AdamW step over the whole model's parameters.
// Each line: median time over `reps` runs (CUDA events around the op only; L2 flushed by a
// 256 MiB memset before every run; warm-up runs first; inputs are dense random data, never
// zeros), the FLOP and minimal byte counts (each input read once, each output written once),
// and the achieved TFLOP/s and GB/s. Compare GB/s with the copy ceiling and TFLOP/s with the
// GEMM ceiling printed first, on the same card in the same run.
//
//   cuda_dense_bench [--model=125m|1.3b|all] [--reps=N] [--csv=path]
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "kernels/cuda/activations.h"
#include "kernels/cuda/adamw.h"
#include "kernels/cuda/cross_entropy.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/device_allocator.h"
#include "kernels/cuda/embedding.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/norm.h"
#include "kernels/cuda/random_fill.h"
#include "kernels/cuda/rope.h"

namespace gyre::cuda {
namespace {

using bf16 = __nv_bfloat16;

struct Bench {
  cudaStream_t stream = nullptr;
  cudaEvent_t start = nullptr, stop = nullptr;
  DeviceBuffer flush;
  int reps = 20;
  int warmup = 3;
  FILE* csv = nullptr;
};

double Median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
}

// Times op (which enqueues work on b.stream and returns CudaResult); prints one line.
void Time(Bench& b, const std::string& name, const std::string& shape, double flops, double bytes,
          const std::function<CudaResult()>& op, int reps_override = 0) {
  const int reps = reps_override > 0 ? reps_override : b.reps;
  for (int i = 0; i < b.warmup; ++i) CUDA_OK_OR_DIE(op());
  CUDA_CHECK_OR_DIE(cudaStreamSynchronize(b.stream));
  std::vector<float> ms;
  for (int i = 0; i < reps; ++i) {
    CUDA_CHECK_OR_DIE(cudaMemsetAsync(b.flush.get(), i & 0xff, b.flush.bytes(), b.stream));
    CUDA_CHECK_OR_DIE(cudaEventRecord(b.start, b.stream));
    CUDA_OK_OR_DIE(op());
    CUDA_CHECK_OR_DIE(cudaEventRecord(b.stop, b.stream));
    CUDA_CHECK_OR_DIE(cudaEventSynchronize(b.stop));
    float t = 0;
    CUDA_CHECK_OR_DIE(cudaEventElapsedTime(&t, b.start, b.stop));
    ms.push_back(t);
  }
  const double med = Median(ms);
  const double lo = *std::min_element(ms.begin(), ms.end());
  const double hi = *std::max_element(ms.begin(), ms.end());
  const double tflops = flops > 0 ? flops / (med * 1e-3) / 1e12 : 0;
  const double gbs = bytes > 0 ? bytes / (med * 1e-3) / 1e9 : 0;
  std::printf("%-30s %-34s %9.4f ms [%8.4f..%8.4f] %9.3g FLOP %9.3g B %7.1f TFLOP/s %7.0f GB/s\n",
              name.c_str(), shape.c_str(), med, lo, hi, flops, bytes, tflops, gbs);
  std::fflush(stdout);
  if (b.csv) {
    std::fprintf(b.csv, "%s,%s,%.6f,%.6f,%.6f,%.6g,%.6g,%.3f,%.1f\n", name.c_str(), shape.c_str(),
                 med, lo, hi, flops, bytes, tflops, gbs);
  }
}

struct Model {
  const char* name;
  int64_t d, ffn, heads, head_dim, layers, vocab;
};

template <typename T>
T* Alloc(DeviceAllocator& alloc, std::vector<DeviceBuffer>& keep, int64_t n) {
  keep.emplace_back();
  CUDA_OK_OR_DIE(alloc.Allocate(sizeof(T) * n, &keep.back()));
  return keep.back().as<T>();
}

void Ceilings(Bench& b, DeviceAllocator& alloc, GemmContext* gemm) {
  std::vector<DeviceBuffer> keep;
  const int64_t bytes = int64_t{1} << 30;
  char* src = Alloc<char>(alloc, keep, bytes);
  char* dst = Alloc<char>(alloc, keep, bytes);
  CUDA_OK_OR_DIE(FillRandomF32(reinterpret_cast<float*>(src), bytes / 4, 0.f, 1.f, 1, b.stream));
  Time(b, "ceiling: d2d copy", "1 GiB", 0, 2.0 * bytes, [&]() -> CudaResult {
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, b.stream));
    return {};
  });
  const int64_t n = 8192;
  bf16* a = Alloc<bf16>(alloc, keep, n * n);
  bf16* w = Alloc<bf16>(alloc, keep, n * n);
  bf16* c = Alloc<bf16>(alloc, keep, n * n);
  CUDA_OK_OR_DIE(FillRandomBf16(a, n * n, 0.f, 1.f, 2, b.stream));
  CUDA_OK_OR_DIE(FillRandomBf16(w, n * n, 0.f, 1.f, 3, b.stream));
  Time(b, "ceiling: gemm bf16 (cuBLASLt)", "8192^3", 2.0 * n * n * n, 3.0 * 2 * n * n, [&]() {
    return LinearForward(gemm, a, w, c, DType::kBf16, n, n, n, b.stream);
  });
}

void RunModel(Bench& b, DeviceAllocator& alloc, GemmContext* gemm, const Model& m) {
  std::vector<DeviceBuffer> keep;
  const int64_t N = 16384, d = m.d, ffn = m.ffn, V = m.vocab;
  const std::string tag = std::string(m.name) + " ";
  auto sh = [&](const std::string& s) { return "N=16384 " + s; };
  uint64_t seed = 100;
  auto rb = [&](int64_t n, float sd) {
    bf16* p = Alloc<bf16>(alloc, keep, n);
    CUDA_OK_OR_DIE(FillRandomBf16(p, n, 0.f, sd, seed++, b.stream));
    return p;
  };
  auto rf = [&](int64_t n, float sd) {
    float* p = Alloc<float>(alloc, keep, n);
    CUDA_OK_OR_DIE(FillRandomF32(p, n, 0.f, sd, seed++, b.stream));
    return p;
  };
  // ---- GEMMs of one block.
  {
    const int64_t max_out = std::max<int64_t>(3 * d, 2 * ffn);
    const int64_t max_in = std::max(d, ffn);
    bf16* x = rb(N * max_in, 1.f);
    bf16* y = rb(N * max_out, 1.f);
    bf16* dy = rb(N * max_out, 1.f);
    bf16* dx = rb(N * max_in, 1.f);
    bf16* w = rb(max_out * max_in, 0.02f);
    float* dw = rf(max_out * max_in, 1e-3f);
    struct L { const char* name; int64_t in, out; };
    for (const L& l : {L{"qkv", d, 3 * d}, L{"o", d, d}, L{"gate_up", d, 2 * ffn}, L{"down", ffn, d}}) {
      const double flops = 2.0 * N * l.in * l.out;
      const std::string s = sh("in=" + std::to_string(l.in) + " out=" + std::to_string(l.out));
      const double act_bytes = 2.0 * N * (l.in + l.out) + 2.0 * l.in * l.out;
      Time(b, tag + "gemm fwd " + l.name, s, flops, act_bytes, [&]() {
        return LinearForward(gemm, x, w, y, DType::kBf16, N, l.in, l.out, b.stream);
      });
      Time(b, tag + "gemm bwd dX " + l.name, s, flops, act_bytes, [&]() {
        return LinearBackwardInput(gemm, dy, w, dx, DType::kBf16, N, l.in, l.out, b.stream);
      });
      Time(b, tag + "gemm bwd dW " + l.name, s, flops, 2.0 * N * (l.in + l.out) + 8.0 * l.in * l.out, [&]() {
        return LinearBackwardWeight(gemm, dy, x, dw, N, l.in, l.out, b.stream);
      });
    }
  }
  keep.clear();
  // ---- RMSNorm + residual.
  {
    bf16* x = rb(N * d, 1.f);
    bf16* res = rb(N * d, 1.f);
    bf16* s = rb(N * d, 1.f);
    bf16* y = rb(N * d, 1.f);
    bf16* dy = rb(N * d, 1.f);
    bf16* dres = rb(N * d, 1.f);
    bf16* dx = rb(N * d, 1.f);
    bf16* w = rb(d, 1.f);
    float* rstd = rf(N, 1.f);
    float* dw = rf(d, 1.f);
    NormForwardArgs f;
    f.rows = N;
    f.dim = d;
    f.x = x;
    f.residual = res;
    f.residual_out = s;
    f.weight = w;
    f.y = y;
    f.rstd = rstd;
    Time(b, tag + "rmsnorm+residual fwd", sh("d=" + std::to_string(d)), 0, 8.0 * N * d + 4.0 * N,
         [&]() { return NormForward(f, b.stream); });
    NormBackwardArgs g;
    g.rows = N;
    g.dim = d;
    g.dy = dy;
    g.s = s;
    g.weight = w;
    g.rstd = rstd;
    g.dresidual = dres;
    g.dx = dx;
    g.dweight = dw;
    Time(b, tag + "rmsnorm+residual bwd (+dw)", sh("d=" + std::to_string(d)), 0, 8.0 * N * d + 4.0 * N,
         [&]() { return NormBackward(g, &alloc, b.stream); });
  }
  keep.clear();
  // ---- SwiGLU on a fused gate/up buffer.
  {
    bf16* gu = rb(N * 2 * ffn, 1.f);
    bf16* h = rb(N * ffn, 1.f);
    bf16* dh = rb(N * ffn, 1.f);
    bf16* dgu = rb(N * 2 * ffn, 1.f);
    GatedArgs a;
    a.rows = N;
    a.cols = ffn;
    a.g = gu;
    a.u = gu + ffn;
    a.ld_in = 2 * ffn;
    a.h = h;
    a.dh = dh;
    a.dg = dgu;
    a.du = dgu + ffn;
    a.ld_out = ffn;
    Time(b, tag + "swiglu fwd", sh("ffn=" + std::to_string(ffn)), 0, 6.0 * N * ffn,
         [&]() { return GatedForward(a, b.stream); });
    Time(b, tag + "swiglu bwd", sh("ffn=" + std::to_string(ffn)), 0, 10.0 * N * ffn,
         [&]() { return GatedBackward(a, b.stream); });
  }
  keep.clear();
  // ---- RoPE on q and k inside a fused qkv buffer (q and k are adjacent: 2·heads heads).
  {
    bf16* qkv = rb(N * 3 * d, 1.f);
    RopeTable table;
    CUDA_OK_OR_DIE(BuildRopeTable(2048, m.head_dim, 10000.0, &alloc, &table));
    RopeArgs a;
    a.x = qkv;
    a.y = qkv;
    a.rows = N;
    a.seq = 2048;
    a.heads = 2 * m.heads;
    a.row_stride = 3 * d;
    const std::string s = sh("q,k " + std::to_string(m.heads) + "x" + std::to_string(m.head_dim));
    Time(b, tag + "rope fwd (in place)", s, 0, 8.0 * N * d, [&]() { return RopeForward(table, a, b.stream); });
    Time(b, tag + "rope bwd (in place)", s, 0, 8.0 * N * d, [&]() { return RopeBackward(table, a, b.stream); });
  }
  keep.clear();
  // ---- Embedding.
  {
    bf16* table = rb(V * d, 1.f);
    bf16* out = rb(N * d, 1.f);
    bf16* dy = rb(N * d, 1.f);
    float* dw = rf(V * d, 1e-3f);
    int32_t* ids = Alloc<int32_t>(alloc, keep, N);
    CUDA_OK_OR_DIE(FillRandomInt32(ids, N, static_cast<int32_t>(V), 7, b.stream));
    std::vector<int32_t> host_ids(N);
    // The fill ran on b.stream (non-blocking): wait for it before the default-stream copy.
    CUDA_CHECK_OR_DIE(cudaStreamSynchronize(b.stream));
    CUDA_CHECK_OR_DIE(cudaMemcpy(host_ids.data(), ids, sizeof(int32_t) * N, cudaMemcpyDeviceToHost));
    EmbeddingBackwardPlan plan;
    CUDA_OK_OR_DIE(plan.Build(host_ids.data(), N, V, &alloc, b.stream));
    const std::string s = sh("V=" + std::to_string(V) + " d=" + std::to_string(d));
    Time(b, tag + "embedding fwd", s, 0, 4.0 * N * d + 4.0 * N,
         [&]() { return EmbeddingForward(ids, table, out, N, V, d, nullptr, b.stream); });
    Time(b, tag + "embedding bwd (det.)", s, 0, 2.0 * N * d + 8.0 * plan.distinct() * d,
         [&]() { return EmbeddingBackward(plan, dy, dw, d, /*overwrite=*/false, b.stream); });
  }
  keep.clear();
  // ---- Fused linear + cross-entropy.
  {
    bf16* h = rb(N * d, 1.f);
    bf16* w = rb(V * d, 0.02f);
    bf16* dh = rb(N * d, 1.f);
    float* dw = rf(V * d, 1e-3f);
    float* tl = rf(N, 1.f);
    double* loss = Alloc<double>(alloc, keep, 1);
    int32_t* targets = Alloc<int32_t>(alloc, keep, N);
    CUDA_OK_OR_DIE(FillRandomInt32(targets, N, static_cast<int32_t>(V), 8, b.stream));
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
    a.chunk_tokens = 1024;
    const std::string s = sh("V=" + std::to_string(V) + " d=" + std::to_string(d) + " chunk=1024");
    const double gemm_flops = 2.0 * N * V * d;
    Time(b, tag + "linear+CE loss only", s, gemm_flops, 2.0 * (N + V) * d,
         [&]() { return LinearCrossEntropy(gemm, &alloc, a, b.stream); }, 10);
    a.dh = dh;
    a.dw = dw;
    // Chunk size trades GEMM efficiency (large chunks) against logits traffic staying in L2
    // (small chunks: 256 x 50304 x 2 B bf16 logits = 26 MB, inside the L2).
    for (int64_t chunk : {256, 1024, 4096}) {
      a.chunk_tokens = chunk;
      const std::string sc = sh("V=" + std::to_string(V) + " d=" + std::to_string(d) +
                                " chunk=" + std::to_string(chunk));
      Time(b, tag + "linear+CE loss+dh+dW", sc, 3 * gemm_flops, 4.0 * (N + V) * d + 8.0 * V * d,
           [&]() { return LinearCrossEntropy(gemm, &alloc, a, b.stream); }, 10);
    }
  }
  keep.clear();
  // ---- AdamW over the model's parameters (tensor list as the model has it).
  {
    std::vector<int64_t> sizes = {V * d, V * d, d};  // embedding, LM head, final norm
    for (int64_t l = 0; l < m.layers; ++l) {
      for (int64_t n : {d, 3 * d * d, d * d, d, 2 * ffn * d, d * ffn}) sizes.push_back(n);
    }
    std::vector<AdamWTensor> tensors;
    int64_t total = 0;
    for (int64_t n : sizes) {
      AdamWTensor t;
      t.master = rf(n, 0.02f);
      t.grad = rf(n, 1e-4f);
      t.m = rf(n, 1e-5f);
      t.v = rf(n, 1e-5f);  // refilled below with positive values
      t.compute = rb(n, 1.f);
      t.numel = n;
      t.decay = n != d;
      tensors.push_back(t);
      total += n;
    }
    // v must be >= 0 (sqrt in the update): mean 1e-4, spread 1e-6.
    for (AdamWTensor& t : tensors) CUDA_OK_OR_DIE(FillRandomF32(t.v, t.numel, 1e-4f, 1e-6f, seed++, b.stream));
    FusedAdamW opt;
    CUDA_OK_OR_DIE(opt.Init(tensors, AdamWHyper(), &alloc, b.stream));
    const std::string s = "params=" + std::to_string(total) + " tensors=" + std::to_string(sizes.size());
    Time(b, tag + "adamw step (clip, bf16 copy)", s, 0, 34.0 * total,
         [&]() { return opt.Step(1e-4, 1.0, b.stream); }, 10);
  }
  keep.clear();
  CUDA_OK_OR_DIE(alloc.ReleaseCached());
}

int Main(int argc, char** argv) {
  std::string which = "all", csv_path;
  Bench b;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg.rfind("--model=", 0) == 0) which = arg.substr(8);
    else if (arg.rfind("--reps=", 0) == 0) b.reps = std::max(1, std::atoi(arg.c_str() + 7));
    else if (arg.rfind("--csv=", 0) == 0) csv_path = arg.substr(6);
    else {
      std::fprintf(stderr, "usage: %s [--model=125m|1.3b|all] [--reps=N] [--csv=path]\n", argv[0]);
      return 2;
    }
  }
  cudaDeviceProp prop;
  CUDA_CHECK_OR_DIE(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d SMs, L2 %d MB, %.1f GB\n", prop.name, prop.multiProcessorCount,
              prop.l2CacheSize >> 20, prop.totalGlobalMem / 1e9);
  if (!csv_path.empty()) {
    b.csv = std::fopen(csv_path.c_str(), "w");
    if (!b.csv) {
      std::fprintf(stderr, "cannot write %s\n", csv_path.c_str());
      return 2;
    }
    std::fprintf(b.csv, "name,shape,median_ms,min_ms,max_ms,flops,bytes,tflops,gbs\n");
  }
  DeviceAllocator alloc;
  CUDA_CHECK_OR_DIE(cudaStreamCreateWithFlags(&b.stream, cudaStreamNonBlocking));
  CUDA_CHECK_OR_DIE(cudaEventCreate(&b.start));
  CUDA_CHECK_OR_DIE(cudaEventCreate(&b.stop));
  CUDA_OK_OR_DIE(alloc.Allocate(size_t{256} << 20, &b.flush));
  std::unique_ptr<GemmContext> gemm;
  CUDA_OK_OR_DIE(GemmContext::Create(&alloc, &gemm));
  Ceilings(b, alloc, gemm.get());
  const Model models[] = {{"llama-125m", 768, 2048, 12, 64, 12, 50304},
                          {"llama-1.3b", 2048, 5504, 16, 128, 24, 50304}};
  for (const Model& m : models) {
    if (which == "all" || which == std::string(m.name).substr(6)) RunModel(b, alloc, gemm.get(), m);
  }
  const AllocatorStats st = alloc.stats();
  std::printf("allocator: %lu allocations, %lu cache hits, %lu cudaMalloc, peak %.2f GB in use\n",
              (unsigned long)st.allocations, (unsigned long)st.cache_hits,
              (unsigned long)st.device_mallocs, st.peak_bytes_in_use / 1e9);
  if (b.csv) std::fclose(b.csv);
  // Everything allocated from `alloc` goes back before it is destroyed.
  gemm.reset();
  b.flush.reset();
  return 0;
}

}  // namespace
}  // namespace gyre::cuda

int main(int argc, char** argv) { return gyre::cuda::Main(argc, argv); }
