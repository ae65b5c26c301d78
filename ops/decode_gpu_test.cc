// Needs a GPU: what the CUDA backend adds for the hybrids and for inference, against the CPU
// backend in float64 on the same (bf16-rounded) weights, each check printing
// `[PASS|FAIL] name shape rel_err tol`:
//   qkv:      the mLSTM decode step's q, k, v maps + gates in one launch against the two
//             launches (every bit) and float64, 1..16 rows;
//   layers:   Linear with bias, grouped 1+w LayerNorm with bias (output, dx, every gradient);
//   hybrid:   Mamba-2 + the attention mixer block (qkv conv, no MLP, partial rotary) — loss and
//             every gradient;
//   SelfExtend: logits of a Llama model on a 300-token prompt with G 4, W 32 (the grouped
//             branch carries most pairs), GPU vs CPU;
//   decode:   32 DecodeStep calls (batch 3, 2 MTP heads) for Llama (KV cache on the device;
//             whole-head, partial rotary and SelfExtend variants), xLSTM (mLSTM + sLSTM steps),
//             Mamba-2 (conv window + SSD state) and the mixer hybrid — every step's logits of
//             every head vs the CPU decode, and the GPU decode vs the GPU full forward.
//   bitwise:  speculative decoding's head-1 logits (DecodeChunk of k = 2..5, Rewind, batch 1)
//             against greedy decoding's DecodeStep calls, every bit, for every family and the
//             125m presets (ops/cuda_infer.h RowInvariantDecode);
//   graphs:   DecodeGraph replays (ops/decode_graph.h) against eager DecodeStep calls, every bit,
//             batch 1 / 3 / 20, small models and the 125m presets; attention models (Llama
//             whole-head, partial rotary, SelfExtend, the mixer hybrid) over 140 steps that grow
//             the KV cache twice; the device-position RoPE / append / attention launches against
//             the host-position ones (every byte); its refusals (a full KV cache, a cold state),
//             an injected capture failure and the eager fallback; Generate with and without the
//             graph and GenerateSpeculative give the same tokens;
//   speculative graphs: SpeculativeGraph rounds (ops/decode_graph.h; Round + the in-place
//             Commit) against eager rounds (DecodeChunk + Rewind + DraftLogits), every head-1 and
//             every draft logits row bitwise, every keep, for every family and the 125m presets,
//             the attention caches grown at 64 and 128 keys; CopySpans (the commit's one launch)
//             exact; GenerateSpeculative with the graph == without == greedy, same rounds;
//   rope+append: the attention step's appends + RoPE in one launch (GYRE_DECODE_ROPE_APPEND)
//             against the separate launches, every byte (steps at B1 / B3, chunks of 4, host and
//             device position, partial rotary, GQA, SelfExtend; the packed-qkv entry too), and
//             graph replays with it against eager steps without it (llama variants, the mixer);
//   chunk:    DecodeChunk (multi-token step; the recurrent cells step all k positions in one
//             launch) in chunks of every k in 1..5 at batch 3 and 1 vs the CPU's float64 steps,
//             and Rewind to every keep of chunks of 2..5 vs a fresh CPU run over the kept prefix,
//             for Llama, xLSTM, Mamba-2 and the mixer hybrid;
//   xLSTM Large (session 20): steps, chunks and rewinds vs the CPU (steps at 5e-2: the block's
//             bf16 full forward is itself 1.7e-2 from float64) and vs the full CUDA forward over a
//             prompt in uneven chunks (3e-2); Rewind leaves every state bit of decoding only the
//             kept tokens; speculative == greedy bitwise; the Generate tests include it.
// Bands: METHOD.md's bf16 ones (activations rounded to bf16 at every layer boundary; fp32
// accumulation): 1e-2 for a layer output, 3e-2 for logits after several layers, 5e-2 for
// gradients (as recurrent_gpu_test).
// DecodeThroughput (only with GYRE_DECODE_BENCH=1): decode tokens/s of llama-125m at batch 1
// and 8 (random weights; 16 warm-up steps, median step time of 64); ChunkVersusStepCost: one
// speculative round's DecodeChunk + Rewind + DraftLogits (k = 2..5) against one greedy step, and
// the speculative / greedy ratio those costs predict at 25 % and 50 % per-head acceptance.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "eval/generate.h"
#include "gtest/gtest.h"
#include "ops/attention.h"
#include "ops/cuda_backend.h"
#include "ops/cuda_infer.h"
#include "ops/cuda_infer_kernels.h"
#include "ops/decode_graph.h"
#include "ops/elementwise.h"
#include "ops/gpu_check.h"
#include "ops/layers.h"
#include "ops/model.h"

namespace gyre::ops {
namespace {

// Random non-trivial values for every parameter (biases and norm scales start constant).
void Randomise(ParamStore& gpu, uint64_t seed) {
  Rng rng(seed);
  for (Parameter* p : gpu.All()) {
    if (p->kind == ParamKind::kNorm || p->kind == ParamKind::kBias)
      p->value.CopyFrom(RandomBf16Host(p->value.shape(), 0.3, &rng).To(DType::kF32));
  }
  gpu.SyncCompute();
  RoundMastersToBf16(gpu);
}

class DecodeGpuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (CudaBackendOrNull() == nullptr) GTEST_SKIP() << "built without CUDA";
    std::printf("device: %s\n", Cuda().DeviceDescription().c_str());
  }
};

// ---------------------------------------------------------------- layers

template <typename Layer, typename Make>
void CheckLayer(const std::string& name, int64_t in, int64_t out, Make make) {
  ParamStore gpu_store(DType::kF32, Device::kCpu), cpu_store(DType::kF64, Device::kCpu);
  Rng r1(3), r2(3);
  Layer gpu = make(BuildContext{&gpu_store, &r1, "l"});
  Layer cpu = make(BuildContext{&cpu_store, &r2, "l"});
  gpu_store.MoveToDevice(Device::kCuda);
  Randomise(gpu_store, 11);
  ASSERT_TRUE(cpu_store.LoadState(AsF64State(gpu_store)).ok());
  Rng rng(12);
  const int64_t rows = 37;
  const Tensor x = RandomBf16Host({rows, in}, 1.0, &rng), dy = RandomBf16Host({rows, out}, 1.0, &rng);
  const Tensor y_ref = cpu.Forward(x), dx_ref = cpu.Backward(dy);
  const Tensor y = gpu.Forward(ToCudaBf16(x)), dx = gpu.Backward(ToCudaBf16(dy));
  EXPECT_TRUE(Check(name + " y", y, y_ref, 1e-2));
  EXPECT_TRUE(Check(name + " dx", dx, dx_ref, 1e-2));
  EXPECT_TRUE(CheckGrads(gpu_store, cpu_store, name, 1e-2));
}

// ArgmaxFirstRows (speculative decoding's drafts: one read-back for all heads) against the CPU
// argmax of the same bf16 values, row 0 of each tensor; tensors of 1 and 3 rows, vocab 50277
// (not a multiple of any block width), and a planted maximum in the last column and a tie (the
// lowest index wins) so an off-by-one in the tail or the tie rule fails.
TEST_F(DecodeGpuTest, ArgmaxFirstRowsMatchesTheCpu) {
  Rng rng(31);
  std::vector<Tensor> host, dev;
  for (int64_t i = 0; i < 5; ++i) {
    Tensor t = RandomBf16Host({i % 2 == 0 ? 1 : 3, 50277}, 1.0, &rng);
    if (i == 1) t.Set(50276, 64.0);                      // maximum in the last column
    if (i == 2) { t.Set(1000, 64.0); t.Set(40000, 64.0); }  // tie: 1000 wins
    host.push_back(t);
    dev.push_back(ToCudaBf16(t));
  }
  const std::vector<int32_t> got = ArgmaxFirstRows(dev), want = ArgmaxFirstRows(host);
  ASSERT_EQ(got.size(), 5u);
  for (size_t i = 0; i < got.size(); ++i) EXPECT_EQ(got[i], want[i]) << "tensor " << i;
  EXPECT_EQ(want[1], 50276);
  EXPECT_EQ(want[2], 1000);
  std::printf("[%s] ArgmaxFirstRows 5 tensors vocab 50277: %d %d %d %d %d\n",
              got == want ? "PASS" : "FAIL", got[0], got[1], got[2], got[3], got[4]);
}

// cuda_infer::GemmRows (the row-invariant decode product) against float64: m = 1..16 rows (the
// exact instantiations and the padded 12 / 16), k not a multiple of 8 (the scalar tail) and an
// odd row stride (the unaligned loads), bf16 and fp32 C, alpha / beta with a separate c_in and
// in place; and its contract: every row's bits are the same whatever m is (each row alone).
TEST_F(DecodeGpuTest, GemmRowsMatchesFloat64AndIsRowInvariant) {
  Rng rng(41);
  struct Shape {
    int64_t m, n, k, lda;
    bool c_f32;
    float alpha, beta;
    bool separate_cin;
  };
  const Shape shapes[] = {{1, 37, 768, 768, false, 1.f, 0.f, false},     {5, 301, 770, 770, false, 1.f, 0.f, false},
                          {8, 64, 13, 13, true, 0.5f, 1.f, true},         {11, 130, 1000, 1003, true, 1.f, 1.f, false},
                          {16, 50277 / 97, 2048, 2048, false, 1.f, 1.f, true}, {3, 96, 257, 264, false, -2.f, 0.5f, false}};
  cudaStream_t stream = static_cast<cudaStream_t>(Cuda().ComputeStream());
  // 1 warp a column (the default) and the split kernel's 2 and 4 (GYRE_GEMM_ROWS_WARPS).
  for (int warps : {1, 2, 4})
  for (const Shape& sh : shapes) {
    const Tensor a = RandomBf16Host({sh.m, sh.lda}, 1.0, &rng), b = RandomBf16Host({sh.n, sh.k}, 1.0, &rng);
    const Tensor cin = RandomBf16Host({sh.m, sh.n}, 1.0, &rng);
    const DType cdt = sh.c_f32 ? DType::kF32 : DType::kBF16;
    const Tensor a_dev = ToCudaBf16(a), b_dev = ToCudaBf16(b);
    const Tensor cin_dev = cin.To(DType::kF32).ToDevice(Device::kCuda).To(cdt);
    // One launch over all m rows, then each row alone (m = 1) from the same inputs.
    auto run = [&](int64_t row0, int64_t rows) {
      Tensor c = sh.separate_cin ? Tensor::Empty({rows, sh.n}, cdt, Device::kCuda) : cin_dev.Rows(row0, row0 + rows).Clone();
      if (sh.separate_cin) c.Fill(std::nan(""));
      gyre::cuda::GemmArgs g;
      g.trans_b = true;
      g.m = rows;
      g.n = sh.n;
      g.k = sh.k;
      g.a = static_cast<const char*>(a_dev.raw()) + row0 * sh.lda * 2;
      g.lda = sh.lda;
      g.b = b_dev.raw();
      g.ldb = sh.k;
      g.c = c.raw();
      g.ldc = sh.n;
      g.c_dtype = sh.c_f32 ? gyre::cuda::DType::kF32 : gyre::cuda::DType::kBf16;
      g.alpha = sh.alpha;
      g.beta = sh.beta;
      if (sh.separate_cin) g.c_in = static_cast<const char*>(cin_dev.raw()) + row0 * sh.n * (sh.c_f32 ? 4 : 2);
      EXPECT_TRUE(cuda_infer::GemmRows(g, stream, warps).ok());
      return c.To(DType::kF32).ToDevice(Device::kCpu);
    };
    const Tensor all = run(0, sh.m);
    Tensor ref = Tensor::Empty({sh.m, sh.n}, DType::kF64, Device::kCpu);
    for (int64_t r = 0; r < sh.m; ++r)
      for (int64_t j = 0; j < sh.n; ++j) {
        double dot = 0;
        for (int64_t i = 0; i < sh.k; ++i) dot += a.At(r * sh.lda + i) * b.At(j * sh.k + i);
        ref.Set(r * sh.n + j, sh.alpha * dot + (sh.beta != 0 ? sh.beta * cin.At(r * sh.n + j) : 0.0));
      }
    const std::string name = "gemm_rows w" + std::to_string(warps) + " m" + std::to_string(sh.m) + " n" + std::to_string(sh.n) + " k" +
                             std::to_string(sh.k) + (sh.c_f32 ? " f32" : " bf16") + (sh.beta != 0 ? " beta" : "");
    EXPECT_TRUE(Check(name, all, ref, sh.c_f32 ? 1e-5 : 1e-2));
    int64_t differ = 0;
    for (int64_t r = 0; r < sh.m; ++r) {
      const Tensor one = run(r, 1);
      for (int64_t j = 0; j < sh.n; ++j) {
        const float x = all.data<float>()[r * sh.n + j], y = one.data<float>()[j];
        differ += std::memcmp(&x, &y, sizeof(float)) != 0;
      }
    }
    EXPECT_EQ(differ, 0);
    std::printf("[%s] %s: rows alone vs together, %ld of %ld values differ\n", differ == 0 ? "PASS" : "FAIL",
                name.c_str(), static_cast<long>(differ), static_cast<long>(sh.m * sh.n));
  }  // Only C = alpha A Bᵀ + beta C_in: another form is refused, not computed wrongly.
  gyre::cuda::GemmArgs other;
  other.m = other.n = other.k = other.lda = other.ldb = other.ldc = 8;
  EXPECT_FALSE(cuda_infer::GemmRows(other, stream).ok());  // trans_b false
  other.trans_b = true;
  other.epilogue = gyre::cuda::GemmEpilogue::kBias;
  EXPECT_FALSE(cuda_infer::GemmRows(other, stream).ok());
  other.epilogue = gyre::cuda::GemmEpilogue::kNone;
  EXPECT_FALSE(cuda_infer::GemmRows(other, stream, 3).ok());  // 1, 2 or 4 warps a column
}

// The mLSTM decode step's q, k, v maps with the gates in one launch (Cuda().BlockDiagQkv,
// ops/recurrent_cuda.h BlockDiagQkvRowsForward) against the two BlockDiagForward launches, every
// bit of q, k, v, ig and fg, and against float64: rows 1..16 (one and two row tiles), 4 heads
// (8 gates; 12 column blocks: the one-lane reduction), 8 heads with 528 4x4 blocks (16 gates;
// 17 column blocks, the last one partial: the 8-lane reduction), 2 heads, and p = 4096 with 8
// heads (at 9..16 rows the partials do not fit the shared-memory staging: the direct path); outputs poisoned
// before every run; and the shapes it refuses (17 rows) take the two launches.
TEST_F(DecodeGpuTest, QkvGatesOneLaunchBitwiseEqualsTwoLaunchesAndFloat64) {
  Rng rng(57);
  struct Shape {
    int64_t p, heads;
  };
  const bool saved = DecodeQkvOneLaunch();
  for (const Shape sh : {Shape{1536, 4}, Shape{2112, 8}, Shape{384, 2}, Shape{4096, 8}}) {
    const int64_t p = sh.p, H = sh.heads, blocks = p / 4;
    const Tensor wq = RandomBf16Host({blocks, 4, 4}, 0.5, &rng), wk = RandomBf16Host({blocks, 4, 4}, 0.5, &rng),
                 wv = RandomBf16Host({blocks, 4, 4}, 0.5, &rng);
    const Tensor wi = RandomBf16Host({H, 3 * p}, 0.05, &rng), wf = RandomBf16Host({H, 3 * p}, 0.05, &rng);
    const Tensor bi = RandomBf16Host({H}, 1.0, &rng), bf = RandomBf16Host({H}, 1.0, &rng);
    auto dev32 = [](const Tensor& t) { return t.To(DType::kF32).ToDevice(Device::kCuda); };
    const Tensor wq_d = dev32(wq), wk_d = dev32(wk), wv_d = dev32(wv), wi_d = dev32(wi), wf_d = dev32(wf),
                 bi_d = dev32(bi), bf_d = dev32(bf);
    for (int64_t rows : {1, 2, 3, 5, 8, 9, 16, 17}) {
      const Tensor xc = RandomBf16Host({rows, p}, 1.0, &rng), xm = RandomBf16Host({rows, p}, 1.0, &rng);
      const Tensor xc_d = ToCudaBf16(xc), xm_d = ToCudaBf16(xm);
      // One run: outputs poisoned first; returns q, k, v, ig, fg on the host and whether one launch ran.
      auto run = [&](bool one, std::vector<Tensor>* out) {
        SetDecodeQkvOneLaunch(one);
        Tensor q = Tensor::Empty({rows, p}, DType::kBF16, Device::kCuda), k = Tensor::Empty({rows, p}, DType::kBF16, Device::kCuda),
               v = Tensor::Empty({rows, p}, DType::kBF16, Device::kCuda);
        Tensor ig = Tensor::Empty({rows, H}, DType::kF32, Device::kCuda), fg = Tensor::Empty({rows, H}, DType::kF32, Device::kCuda);
        for (Tensor* t : {&q, &k, &v, &ig, &fg}) t->Fill(std::nan(""));
        MlstmGateArgs g;
        g.rows = rows; g.inner = p; g.heads = H;
        g.wi = wi_d.data<float>(); g.wf = wf_d.data<float>();
        g.ig = ig.data<float>(); g.fg = fg.data<float>();
        MlstmGateArgs g_bias = g;
        g_bias.bi = bi_d.data<float>(); g_bias.bf = bf_d.data<float>();
        BlockDiagArgs qk, va;
        qk.rows = va.rows = rows;
        qk.blocks = va.blocks = blocks;
        qk.block_in = qk.block_out = va.block_in = va.block_out = 4;
        qk.x = xc_d.raw(); va.x = xm_d.raw();
        qk.ldx = qk.ldy = va.ldx = va.ldy = p;
        qk.w = wq_d.data<float>(); qk.w2 = wk_d.data<float>(); va.w = wv_d.data<float>();
        qk.y = q.raw(); qk.y2 = k.raw(); va.y = v.raw();
        qk.gates = &g_bias; qk.gate_col = 0; qk.gate_col2 = p;
        va.gates = &g; va.gate_col = 2 * p;
        const bool ran = Cuda().BlockDiagQkv(qk, va);
        out->clear();
        for (Tensor* t : {&q, &k, &v, &ig, &fg}) out->push_back(t->ToDevice(Device::kCpu));
        return ran;
      };
      std::vector<Tensor> two, one;
      const bool ran_two = run(false, &two), ran_one = run(true, &one);
      EXPECT_FALSE(ran_two);
      EXPECT_EQ(ran_one, rows <= 16) << "rows " << rows;
      int64_t differ = 0, total = 0;
      for (size_t i = 0; i < two.size(); ++i) {
        const std::vector<char> a = HostBytes(two[i]), b = HostBytes(one[i]);
        const int64_t es = static_cast<int64_t>(DTypeSize(two[i].dtype()));
        for (size_t e = 0; e < a.size(); e += es) differ += std::memcmp(&a[e], &b[e], es) != 0;
        total += static_cast<int64_t>(a.size()) / es;
      }
      EXPECT_EQ(differ, 0);
      const std::string name = "qkv gates p" + std::to_string(p) + " heads" + std::to_string(H) + " rows" + std::to_string(rows);
      std::printf("[%s] %s: one launch (%s) vs two, %ld of %ld values differ\n", differ == 0 ? "PASS" : "FAIL",
                  name.c_str(), ran_one ? "ran" : "refused: two launches", (long)differ, (long)total);
      // float64: y = the 4x4 maps of the bf16 inputs; the gates = bias + Σ w · (the kernel's bf16 y),
      // so the gate check sees the sums' own error, not the y rounding the design accepts.
      const Tensor* ws[3] = {&wq, &wk, &wv};
      const Tensor* xs[3] = {&xc, &xc, &xm};
      const char* yn[3] = {" q", " k", " v"};
      for (int m = 0; m < 3; ++m) {
        Tensor ref = Tensor::Empty({rows, p}, DType::kF64, Device::kCpu);
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t b = 0; b < blocks; ++b)
            for (int o = 0; o < 4; ++o) {
              double s = 0;
              for (int i = 0; i < 4; ++i) s += ws[m]->At(b * 16 + o * 4 + i) * xs[m]->At(r * p + b * 4 + i);
              ref.Set(r * p + b * 4 + o, s);
            }
        EXPECT_TRUE(Check(name + yn[m], one[m], ref, 1e-2));
      }
      const Tensor q64 = one[0].To(DType::kF64), k64 = one[1].To(DType::kF64), v64 = one[2].To(DType::kF64);
      const Tensor* ys[3] = {&q64, &k64, &v64};
      for (int f = 0; f < 2; ++f) {
        const Tensor& w = f == 0 ? wi : wf;
        const Tensor& bias = f == 0 ? bi : bf;
        Tensor ref = Tensor::Empty({rows, H}, DType::kF64, Device::kCpu);
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t h = 0; h < H; ++h) {
            double s = bias.At(h);
            for (int m = 0; m < 3; ++m)
              for (int64_t c = 0; c < p; ++c) s += w.At(h * 3 * p + m * p + c) * ys[m]->At(r * p + c);
            ref.Set(r * H + h, s);
          }
        EXPECT_TRUE(Check(name + (f == 0 ? " ig" : " fg"), one[3 + f], ref, 1e-5));
      }
    }
  }
  SetDecodeQkvOneLaunch(saved);
}

TEST_F(DecodeGpuTest, LinearWithBias) {
  CheckLayer<Linear>("linear+bias", 96, 80, [](const BuildContext& c) { return Linear(c, 96, 80, true); });
}

TEST_F(DecodeGpuTest, GroupedOnePlusWLayerNormWithBias) {
  NormOptions o{NormOptions::kLayer, 4, 1e-5, true, 1.0, true};
  CheckLayer<Norm>("groupnorm+bias", 128, 128, [&](const BuildContext& c) { return Norm(c, 128, o); });
}

// ---------------------------------------------------------------- models

ModelSpec SmallLlama() {
  ModelSpec s = *PresetSpec("llama-tiny");
  s.preset = "llama-decode-gpu-test";
  s.d_model = 128;
  s.attn_heads = 2;
  s.attn_kv_heads = 1;  // GQA
  s.attn_head_dim = 64;
  s.ffn_dim = 256;
  s.blocks = {BlockType::kAttention, BlockType::kAttention, BlockType::kAttention};
  s.vocab_size = 512;
  return s;
}

ModelSpec SmallMixerHybrid() {
  ModelSpec s = *PresetSpec("mamba2-attention-tiny");
  s.preset = "mixer-hybrid-gpu-test";
  s.d_model = 128;  // di 256: 8 SSD heads of 32
  s.ssm_head_dim = 32;
  s.ssm_state = 32;
  s.ssm_chunk = 64;
  s.attn_heads = 2;
  s.attn_kv_heads = 2;
  s.attn_head_dim = 64;
  s.attn_rotary_dim = 32;  // partial rotary
  s.attn_qkv_conv = 4;
  s.attn_mlp = false;
  s.blocks = {BlockType::kMamba2, BlockType::kAttention, BlockType::kMamba2};
  s.vocab_size = 512;
  return s;
}

struct Pair {
  std::unique_ptr<LanguageModel> gpu, cpu;
};

// Multiplies the q and k projections by `factor` (sharper attention, so positions matter).
void SharpenAttention(ParamStore& gpu, double factor) {
  for (Parameter* p : gpu.All()) {
    if (p->name.find("q_proj") == std::string::npos && p->name.find("k_proj") == std::string::npos) continue;
    Tensor host = p->value.ToDevice(Device::kCpu);
    for (int64_t i = 0; i < host.numel(); ++i) host.Set(i, factor * host.At(i));
    p->value.CopyFrom(host);
  }
  gpu.SyncCompute();
  RoundMastersToBf16(gpu);
}

using StoreTweak = void (*)(ParamStore&);

Pair MakePair(const ModelSpec& spec, uint64_t seed, double sharpen = 1.0, StoreTweak tweak = nullptr) {
  Pair p;
  auto gpu = LanguageModel::Create(spec, DType::kF32, Device::kCuda, seed);
  EXPECT_TRUE(gpu.ok()) << gpu.status();
  auto cpu = LanguageModel::Create(spec, DType::kF64, Device::kCpu, seed);
  EXPECT_TRUE(cpu.ok()) << cpu.status();
  if (!gpu.ok() || !cpu.ok()) return p;
  p.gpu = std::move(*gpu);
  p.cpu = std::move(*cpu);
  Randomise(p.gpu->params(), seed + 100);
  if (sharpen != 1.0) SharpenAttention(p.gpu->params(), sharpen);
  if (tweak != nullptr) tweak(p.gpu->params());
  EXPECT_TRUE(p.cpu->params().LoadState(AsF64State(p.gpu->params())).ok());
  return p;
}

TEST_F(DecodeGpuTest, MixerHybridLossAndEveryGradient) {
  const ModelSpec spec = SmallMixerHybrid();
  Pair m = MakePair(spec, 3);
  ASSERT_TRUE(m.gpu && m.cpu);
  const int64_t B = 2, T = 100;
  const auto tokens = RandomTokens(B * (T + 1), spec.vocab_size, 5);
  const double scale = 1.0 / (B * T);
  m.gpu->params().ZeroGrad();
  m.cpu->params().ZeroGrad();
  const LossResult lg = m.gpu->ForwardBackward(tokens, B, T, scale);
  const LossResult lc = m.cpu->ForwardBackward(tokens, B, T, scale);
  const double loss_err = std::fabs(lg.loss - lc.loss) / lc.loss;
  std::printf("[%s] %s loss gpu %.6f cpu(f64) %.6f rel_err %.3e tol 2e-3\n", loss_err <= 2e-3 ? "PASS" : "FAIL",
              spec.preset.c_str(), lg.loss, lc.loss, loss_err);
  EXPECT_LE(loss_err, 2e-3);
  EXPECT_TRUE(CheckGrads(m.gpu->params(), m.cpu->params(), spec.preset, 5e-2));
}

TEST_F(DecodeGpuTest, SelfExtendLogitsOnALongPrompt) {
  const ModelSpec spec = SmallLlama();
  Pair m = MakePair(spec, 4, /*sharpen=*/8.0);
  ASSERT_TRUE(m.gpu && m.cpu);
  const int64_t B = 2, T = 300;
  const auto inputs = RandomTokens(B * T, spec.vocab_size, 6);
  const Tensor plain_cpu = m.cpu->Logits(inputs, B, T);
  m.gpu->SetSelfExtend(4, 32);
  m.cpu->SetSelfExtend(4, 32);
  const Tensor se_cpu = m.cpu->Logits(inputs, B, T);
  const Tensor se_gpu = m.gpu->Logits(inputs, B, T);
  EXPECT_TRUE(Check("selfextend logits G4 W32 T300", se_gpu, se_cpu, 3e-2));
  // The check can fail: the GPU's SelfExtend logits must lie closer to the CPU's SelfExtend
  // logits than to the CPU's plain ones (a GPU that ignored SelfExtend would not). On an H200
  // (2026-11-26): SelfExtend moves the CPU logits by 1.14e-2, the GPU error is 4.64e-3.
  const Tensor g = se_gpu.ToDevice(Device::kCpu).To(DType::kF64);
  const double to_se = RelativeError(g, se_cpu), to_plain = RelativeError(g, plain_cpu);
  std::printf("SelfExtend vs plain logits (CPU) rel diff %.3e; GPU SelfExtend logits: to CPU SelfExtend %.3e, "
              "to CPU plain %.3e\n", RelativeError(plain_cpu, se_cpu), to_se, to_plain);
  EXPECT_LT(to_se, to_plain);
}

// 32 decode steps on both devices; every head's logits compared at every step.
void CheckDecode(const std::string& name, ModelSpec spec, int64_t se_group, int64_t se_window,
                 StoreTweak tweak = nullptr, double cpu_tol = 3e-2) {
  spec.mtp_heads = 2;
  Pair m = MakePair(spec, 8, 1.0, tweak);
  ASSERT_TRUE(m.gpu && m.cpu);
  if (se_group > 0) {
    m.gpu->SetSelfExtend(se_group, se_window);
    m.cpu->SetSelfExtend(se_group, se_window);
  }
  const int64_t B = 3, T = 32, V = spec.vocab_size;
  const auto inputs = RandomTokens(B * T, V, 9);
  const Tensor full_gpu = m.gpu->Logits(inputs, B, T).ToDevice(Device::kCpu).To(DType::kF64);  // [B*T, V]
  auto sg = m.gpu->NewDecodeState(B);
  auto sc = m.cpu->NewDecodeState(B);
  double worst = 0, worst_full = 0;
  bool finite = true;
  for (int64_t t = 0; t < T; ++t) {
    std::vector<int32_t> step(B);
    for (int64_t b = 0; b < B; ++b) step[b] = inputs[b * T + t];
    const std::vector<Tensor> lg = m.gpu->DecodeStep(step, sg.get());
    const std::vector<Tensor> lc = m.cpu->DecodeStep(step, sc.get());
    ASSERT_EQ(lg.size(), 2u);
    for (size_t k = 0; k < lg.size(); ++k) {
      const Tensor g = lg[k].ToDevice(Device::kCpu).To(DType::kF64);
      for (int64_t i = 0; i < g.numel(); ++i) finite = finite && std::isfinite(g.At(i));
      worst = std::max(worst, RelativeError(g, lc[k]));
    }
    Tensor rows = Tensor::Empty({B, V}, DType::kF64);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t v = 0; v < V; ++v) rows.Set(b * V + v, full_gpu.At((b * T + t) * V + v));
    worst_full = std::max(worst_full, RelativeError(lg[0].ToDevice(Device::kCpu).To(DType::kF64), rows));
  }
  const bool ok = finite && worst <= cpu_tol && worst_full <= 3e-2;
  // For scale (not a criterion): the GPU full forward (the training path) against the CPU's
  // float64 full forward over all B·T rows.
  const double full_vs_cpu = RelativeError(full_gpu, m.cpu->Logits(inputs, B, T));
  std::printf("[%s] %s decode 32 steps B3 2 heads: worst step rel_err vs CPU decode %.3e tol %.0e, GPU decode vs "
              "GPU full forward %.3e tol 3e-2 (GPU full forward vs CPU f64 full forward %.3e)\n", ok ? "PASS" : "FAIL",
              name.c_str(), worst, cpu_tol, worst_full, full_vs_cpu);
  EXPECT_TRUE(ok);
}

TEST_F(DecodeGpuTest, LlamaDecodeStepsMatchTheCpu) { CheckDecode("llama", SmallLlama(), 0, 0); }

TEST_F(DecodeGpuTest, PartialRotaryDecodeStepsMatchTheCpu) {
  ModelSpec s = SmallLlama();
  s.attn_rotary_dim = 32;
  CheckDecode("llama partial-rotary 32/64", s, 0, 0);
}

TEST_F(DecodeGpuTest, SelfExtendDecodeStepsMatchTheCpu) { CheckDecode("llama SelfExtend G4 W8", SmallLlama(), 4, 8); }

ModelSpec SmallXlstm() {
  ModelSpec s = *PresetSpec("xlstm-tiny");
  s.preset = "xlstm-decode-gpu-test";
  s.d_model = 128;
  s.mlstm_heads = 4;
  s.mlstm_inner = 256;  // 4 heads x 64
  s.slstm_heads = 4;    // 4 x 32
  s.slstm_ffn = 192;
  s.mlstm_chunk = 32;
  s.blocks = {BlockType::kMlstm, BlockType::kSlstm, BlockType::kMlstm};
  s.vocab_size = 512;
  return s;
}

TEST_F(DecodeGpuTest, XlstmDecodeStepsMatchTheCpu) { CheckDecode("xlstm mLSTM+sLSTM", SmallXlstm(), 0, 0); }

// xLSTM Large blocks (ops/xlstm_large_block.h) with dk 64 != dv 128 (CUDA takes head dims that are
// multiples of 64 and NH a multiple of 4), gate cap 15 and logit cap 30 as the presets.
ModelSpec SmallXlstmLarge() {
  ModelSpec s = *PresetSpec("xlstm-large-tiny");
  s.preset = "xlstm-large-decode-gpu-test";
  s.d_model = 512;
  s.xl_heads = 4;
  s.xl_qk_dim = 256;  // dk 64
  s.xl_v_dim = 512;   // dv 128
  s.ffn_dim = 1408;   // 64 * ceil(2.667 * 512 / 64)
  s.mlstm_chunk = 64;
  s.gate_soft_cap = 15.0;
  s.logit_soft_cap = 30.0;
  s.blocks.assign(3, BlockType::kXlstmLarge);
  s.vocab_size = 512;
  return s;
}

// The xlstm-large-125m preset's block shape: d 768, 4 heads, dk 96 (the training forward pads q / k
// to 128 for the chunkwise cell; the step kernel takes 96 as it is), dv 192, FFN 2048 (the preset's); 2 blocks.
ModelSpec SmallXlstmLargeDk96() {
  ModelSpec s = SmallXlstmLarge();
  s.preset = "xlstm-large-decode-gpu-test-dk96";
  s.d_model = 768;
  s.xl_qk_dim = 384;  // dk 96
  s.xl_v_dim = 768;   // dv 192
  s.ffn_dim = 2048;   // transformers' round-up of 2.667 * 768 = 2048.256 (ops/model_config.cc)
  s.blocks.assign(2, BlockType::kXlstmLarge);
  return s;
}

// After Randomise: gate weights N(0, 0.03) (the model's init has 0: every token's gates equal),
// input-gate biases N(0, 1), forget-gate biases 4 + N(0, 1) (varying, well-conditioned gates, as
// xlstm_large_gpu_test), and the LM head N(0, 1.25²): logits up to ~±35 before the cap (the CPU's
// capped logits reach 25.5 = 30·tanh(35/30) in the full-forward test), where 30·tanh(l/30) bends them.
void XlstmLargeTweak(ParamStore& gpu) {
  Rng rng(4242);
  for (Parameter* p : gpu.All()) {
    const bool gate = p->name.find("igate_preact") != std::string::npos || p->name.find("fgate_preact") != std::string::npos;
    const bool head = p->name == "lm_head.weight";
    if (!gate && !head) continue;
    Tensor v = RandomBf16Host(p->value.shape(), 1.0, &rng);
    for (int64_t i = 0; i < v.numel(); ++i) {
      double x = v.At(i);
      if (head) x *= 1.25;
      else if (p->kind == ParamKind::kWeight) x *= 0.03;
      else if (p->name.find("fgate") != std::string::npos) x += 4.0;
      v.Set(i, x);
    }
    p->value.CopyFrom(v.To(DType::kF32).ToDevice(Device::kCuda));
  }
  gpu.SyncCompute();
  RoundMastersToBf16(gpu);
}

// The step-vs-CPU band is 5e-2 here, not 3e-2: the block's bf16 forward is itself further from
// float64 than the other families' (the GPU full forward, the training path, vs the CPU: 1.74e-2
// over all rows, against 5.4e-3 for the v1 xLSTM), so the decode steps' worst single row measured
// 3.6e-2 against the CPU (session 20), while they stay within 3e-2 (9.0e-3 measured) of that full
// forward: the check of the decode path itself (ops/XLSTM_LARGE.md, session 20). Why (session 21,
// ops/XLSTM_LARGE.md "precision"): no defect; a float64 emulation of exactly the CUDA path's bf16
// roundings lands as far from float64 (2.1e-2), and this model amplifies relative perturbations
// 3.3-6.2x (the other families' test models 0.7-1.5x); transformers' own bf16 xLSTM Large forward
// at this shape is 1.6-2.9e-2 from float64, its Llama 2.6-5.1e-3.
TEST_F(DecodeGpuTest, XlstmLargeDecodeStepsMatchTheCpu) {
  CheckDecode("xlstm-large", SmallXlstmLarge(), 0, 0, XlstmLargeTweak, 5e-2);
}
TEST_F(DecodeGpuTest, XlstmLargeDk96DecodeStepsMatchTheCpu) {
  CheckDecode("xlstm-large dk96", SmallXlstmLargeDk96(), 0, 0, XlstmLargeTweak, 5e-2);
}

TEST_F(DecodeGpuTest, Mamba2DecodeStepsMatchTheCpu) {
  ModelSpec s = SmallMixerHybrid();
  s.blocks = {BlockType::kMamba2, BlockType::kMamba2, BlockType::kMamba2};
  CheckDecode("mamba2", s, 0, 0);
}

TEST_F(DecodeGpuTest, MixerHybridDecodeStepsMatchTheCpu) { CheckDecode("mamba2+mixer", SmallMixerHybrid(), 0, 0); }

// ---------------------------------------------------------------- multi-token decode (DecodeChunk)

// Position-major tokens [n, B] of positions t0..t0+n-1 from per-sequence streams [B, T].
std::vector<int32_t> Columns(const std::vector<int32_t>& seqs, int64_t B, int64_t T, int64_t t0, int64_t n) {
  std::vector<int32_t> out;
  for (int64_t j = 0; j < n; ++j)
    for (int64_t b = 0; b < B; ++b) out.push_back(seqs[b * T + t0 + j]);
  return out;
}

// 44 tokens (batch 3 unless given, 3 heads) fed to the GPU in chunks {1, 4, 3, 5, 2, 4, 5, 20}
// (every k in 1..5, and 20: a prefill-sized chunk past the SSD kernel's 16-position window; odd
// ones rewindable), every head's logits at every position against the CPU's
// float64 DecodeStep; then Rewind on the device: prefix of 5, a rewindable chunk of k = 2..5,
// Rewind(keep) for every keep in 1..k, 3 more steps, against a fresh CPU run over prefix + kept +
// the same 3 tokens. Band 3e-2 (bf16, as CheckDecode) unless `cpu_band` says otherwise (xLSTM Large:
// 5e-2, see XlstmLargeDecodeStepsMatchTheCpu).
void CheckDecodeChunk(const std::string& name, ModelSpec spec, int64_t B = 3, int64_t se_group = 0,
                      int64_t se_window = 0, StoreTweak tweak = nullptr, double cpu_band = 3e-2) {
  spec.mtp_heads = 3;
  Pair m = MakePair(spec, 8, 1.0, tweak);
  ASSERT_TRUE(m.gpu && m.cpu);
  if (se_group > 0) {
    m.gpu->SetSelfExtend(se_group, se_window);
    m.cpu->SetSelfExtend(se_group, se_window);
  }
  const int64_t T = 44, H = 3, V = spec.vocab_size;
  const auto seqs = RandomTokens(B * T, V, 19);
  std::vector<std::vector<Tensor>> ref;
  auto sc = m.cpu->NewDecodeState(B);
  for (int64_t t = 0; t < T; ++t) ref.push_back(m.cpu->DecodeStep(Columns(seqs, B, T, t, 1), sc.get()));
  auto sg = m.gpu->NewDecodeState(B);
  double worst = 0;
  int64_t t = 0, i = 0;
  for (int64_t chunk : {1, 4, 3, 5, 2, 4, 5, 20}) {
    LanguageModel::DecodeOptions o;
    o.rewindable = (i++ % 2) == 1;
    const std::vector<Tensor> lg = m.gpu->DecodeChunk(Columns(seqs, B, T, t, chunk), chunk, sg.get(), o);
    ASSERT_EQ(static_cast<int64_t>(lg.size()), H);
    for (int64_t k = 0; k < H; ++k) {
      const Tensor g = lg[k].ToDevice(Device::kCpu).To(DType::kF64);
      for (int64_t j = 0; j < chunk; ++j) worst = std::max(worst, RelativeError(g.Rows(j * B, (j + 1) * B), ref[t + j][k]));
    }
    t += chunk;
  }
  const bool chunks_ok = std::isfinite(worst) && worst <= cpu_band;
  std::printf("[%s] %s DecodeChunk 44 tokens B%ld 3 heads chunks 1,4,3,5,2,4,5,20: worst rel_err vs CPU f64 steps %.3e "
              "tol %.0e\n", chunks_ok ? "PASS" : "FAIL", name.c_str(), (long)B, worst, cpu_band);
  EXPECT_TRUE(chunks_ok);
  const int64_t prefix = 5, after = 3;
  const auto cont = RandomTokens(B * after, V, 20);
  double worst_rewind = 0;
  for (int64_t chunk = 2; chunk <= 5; ++chunk) {
    for (int64_t keep = 1; keep <= chunk; ++keep) {
      auto rc = m.cpu->NewDecodeState(B);
      for (int64_t u = 0; u < prefix + keep; ++u) m.cpu->DecodeStep(Columns(seqs, B, T, u, 1), rc.get());
      auto rg = m.gpu->NewDecodeState(B);
      m.gpu->DecodeChunk(Columns(seqs, B, T, 0, prefix), prefix, rg.get(), {});
      LanguageModel::DecodeOptions o;
      o.rewindable = true;
      m.gpu->DecodeChunk(Columns(seqs, B, T, prefix, chunk), chunk, rg.get(), o);
      ASSERT_TRUE(m.gpu->Rewind(rg.get(), keep).ok());
      for (int64_t j = 0; j < after; ++j) {
        const std::vector<int32_t> tok = Columns(cont, B, after, j, 1);
        const std::vector<Tensor> lc = m.cpu->DecodeStep(tok, rc.get());
        const std::vector<Tensor> lg = m.gpu->DecodeStep(tok, rg.get());
        for (int64_t k = 0; k < H; ++k)
          worst_rewind = std::max(worst_rewind, RelativeError(lg[k].ToDevice(Device::kCpu).To(DType::kF64), lc[k]));
      }
    }
  }
  const bool rewind_ok = std::isfinite(worst_rewind) && worst_rewind <= cpu_band;
  std::printf("[%s] %s B%ld Rewind(every keep) of chunks of 2..5 then 3 steps: worst rel_err vs fresh CPU f64 run "
              "%.3e tol %.0e\n", rewind_ok ? "PASS" : "FAIL", name.c_str(), (long)B, worst_rewind, cpu_band);
  EXPECT_TRUE(rewind_ok);
}

TEST_F(DecodeGpuTest, LlamaDecodeChunkAndRewindMatchTheCpu) { CheckDecodeChunk("llama", SmallLlama()); }
// Batch 1 takes the one-launch chunk attention (ops/attention.cc DecodeChunkCuda).
TEST_F(DecodeGpuTest, LlamaBatch1ChunkAttentionMatchesTheCpu) { CheckDecodeChunk("llama", SmallLlama(), 1); }
TEST_F(DecodeGpuTest, PartialRotarySelfExtendBatch1ChunkAttentionMatchesTheCpu) {
  ModelSpec s = SmallLlama();
  s.attn_rotary_dim = 32;
  CheckDecodeChunk("llama partial-rotary SelfExtend G4 W8", s, 1, 4, 8);
}
TEST_F(DecodeGpuTest, MixerHybridBatch1ChunkAttentionMatchesTheCpu) {
  CheckDecodeChunk("mamba2+mixer", SmallMixerHybrid(), 1);
}
TEST_F(DecodeGpuTest, XlstmDecodeChunkAndRewindMatchTheCpu) { CheckDecodeChunk("xlstm mLSTM+sLSTM", SmallXlstm()); }
TEST_F(DecodeGpuTest, XlstmBatch1DecodeChunkAndRewindMatchTheCpu) {
  CheckDecodeChunk("xlstm mLSTM+sLSTM", SmallXlstm(), 1);
}
// The CPU band 5e-2 as XlstmLargeDecodeStepsMatchTheCpu's (the block's bf16 forward; the decode path's
// own check, against the full GPU forward at 3e-2, is XlstmLargeDecodeChunkEqualsTheFullForward). At
// the merge of the fused norm + gate kernel (session 20) the B3 chunk check measured 3.4e-2.
TEST_F(DecodeGpuTest, XlstmLargeDecodeChunkAndRewindMatchTheCpu) {
  CheckDecodeChunk("xlstm-large", SmallXlstmLarge(), 3, 0, 0, XlstmLargeTweak, 5e-2);
}
TEST_F(DecodeGpuTest, XlstmLargeBatch1DecodeChunkAndRewindMatchTheCpu) {
  CheckDecodeChunk("xlstm-large", SmallXlstmLarge(), 1, 0, 0, XlstmLargeTweak, 5e-2);
}
TEST_F(DecodeGpuTest, XlstmLargeDk96DecodeChunkAndRewindMatchTheCpu) {
  CheckDecodeChunk("xlstm-large dk96", SmallXlstmLargeDk96(), 3, 0, 0, XlstmLargeTweak, 5e-2);
}
TEST_F(DecodeGpuTest, Mamba2DecodeChunkAndRewindMatchTheCpu) {
  ModelSpec s = SmallMixerHybrid();
  s.blocks = {BlockType::kMamba2, BlockType::kMamba2, BlockType::kMamba2};
  CheckDecodeChunk("mamba2", s);
}
TEST_F(DecodeGpuTest, Mamba2Batch1DecodeChunkAndRewindMatchTheCpu) {
  ModelSpec s = SmallMixerHybrid();
  s.blocks = {BlockType::kMamba2, BlockType::kMamba2, BlockType::kMamba2};
  CheckDecodeChunk("mamba2", s, 1);
}
TEST_F(DecodeGpuTest, MixerHybridDecodeChunkAndRewindMatchTheCpu) { CheckDecodeChunk("mamba2+mixer", SmallMixerHybrid()); }

// The full CUDA forward (chunkwise cell, chunk 64: positions 0..63 and a partial chunk 64..99)
// against DecodeChunk over the same prompt in uneven chunks (3, 7, 1, 5, 16, 12, 40, 16: every
// chunk size class: one token, the GemmRows rows <= 16, cuBLASLt past 16 rows at B 2), both
// against the CPU's float64 full forward; logits capped (the tweak puts most rows past the cap).
void CheckXlstmLargeChunksEqualTheFullForward(const std::string& label, ModelSpec spec) {
  spec.mtp_heads = 2;
  Pair m = MakePair(spec, 8, 1.0, XlstmLargeTweak);
  ASSERT_TRUE(m.gpu && m.cpu);
  const int64_t B = 2, T = 100, V = spec.vocab_size;
  const auto seqs = RandomTokens(B * T, V, 31);
  const Tensor full_gpu = m.gpu->Logits(seqs, B, T).ToDevice(Device::kCpu).To(DType::kF64);  // [B*T, V] b-major
  const Tensor full_cpu = m.cpu->Logits(seqs, B, T);
  auto sg = m.gpu->NewDecodeState(B);
  Tensor chunked = Tensor::Empty({B * T, V}, DType::kF64);  // b-major, as the full forward
  int64_t t = 0, i = 0;
  for (int64_t chunk : {3, 7, 1, 5, 16, 12, 40, 16}) {
    LanguageModel::DecodeOptions o;
    o.rewindable = (i++ % 2) == 1;
    const Tensor g = m.gpu->DecodeChunk(Columns(seqs, B, T, t, chunk), chunk, sg.get(), o)[0].ToDevice(Device::kCpu);
    for (int64_t j = 0; j < chunk; ++j)
      for (int64_t b = 0; b < B; ++b)
        for (int64_t v = 0; v < V; ++v) chunked.Set(((b * T) + t + j) * V + v, g.At((j * B + b) * V + v));
    t += chunk;
  }
  ASSERT_EQ(t, T);
  double max_abs = 0;
  int64_t past = 0;
  for (int64_t e = 0; e < full_cpu.numel(); ++e) {
    max_abs = std::max(max_abs, std::fabs(full_cpu.At(e)));
    past += std::fabs(full_cpu.At(e)) > 24.0;  // 30·tanh(l/30) > 24 <=> |l| > 33
  }
  const double chunk_full = RelativeError(chunked, full_gpu), full_ref = RelativeError(full_gpu, full_cpu),
               chunk_ref = RelativeError(chunked, full_cpu);
  bool finite = true;
  for (int64_t e = 0; e < chunked.numel(); ++e) finite = finite && std::isfinite(chunked.At(e));
  const bool ok = finite && chunk_full <= 3e-2 && full_ref <= 3e-2 && chunk_ref <= 3e-2 && max_abs <= 30.0 && past > 0;
  std::printf("[%s] %s B2 T100 DecodeChunk (3,7,1,5,16,12,40,16) vs full CUDA forward rel_err %.3e, full "
              "CUDA vs CPU f64 %.3e, chunks vs CPU f64 %.3e tol 3e-2; CPU capped logits max |l| %.3f (<= 30), %ld of "
              "%ld past 24 (uncapped past 33)\n",
              ok ? "PASS" : "FAIL", label.c_str(), chunk_full, full_ref, chunk_ref, max_abs, (long)past,
              (long)full_cpu.numel());
  EXPECT_TRUE(ok);
}
TEST_F(DecodeGpuTest, XlstmLargeDecodeChunkEqualsTheFullForward) {
  CheckXlstmLargeChunksEqualTheFullForward("xlstm-large", SmallXlstmLarge());
}
// dk 96: the padded chunkwise cell of the full forward against the step kernel at dk 96.
TEST_F(DecodeGpuTest, XlstmLargeDk96DecodeChunkEqualsTheFullForward) {
  CheckXlstmLargeChunksEqualTheFullForward("xlstm-large dk96", SmallXlstmLargeDk96());
}

// Rewind after a rejected draft restores the state exactly: after a prefix of 5 and a
// rewindable chunk of 5, Rewind(keep) leaves every state tensor of every block (trunk and MTP
// heads: C, n, m) with the bits of a state that decoded only the prefix and the kept `keep`
// tokens (a chunk of `keep`), for every keep in 1..5; one more step then gives both the same
// logits bitwise. B 1 (speculative decoding's batch) and B 3.
TEST_F(DecodeGpuTest, XlstmLargeRewindRestoresTheStateExactly) {
  ModelSpec spec = SmallXlstmLarge();
  spec.mtp_heads = 3;
  auto made = LanguageModel::Create(spec, DType::kF32, Device::kCuda, 8);
  ASSERT_TRUE(made.ok()) << made.status();
  LanguageModel* m = made->get();
  Randomise(m->params(), 108);
  XlstmLargeTweak(m->params());
  const int64_t V = spec.vocab_size, prefix = 5, k = 5;
  int64_t tensors = 0, differing = 0, logit_rows_differing = 0;
  for (int64_t B : {1, 3}) {
    const auto seqs = RandomTokens(B * (prefix + k + 1), V, 51);
    const int64_t T = prefix + k + 1;
    for (int64_t keep = 1; keep <= k; ++keep) {
      auto a = m->NewDecodeState(B), b = m->NewDecodeState(B);
      m->DecodeChunk(Columns(seqs, B, T, 0, prefix), prefix, a.get(), {});
      m->DecodeChunk(Columns(seqs, B, T, 0, prefix), prefix, b.get(), {});
      LanguageModel::DecodeOptions o;
      o.rewindable = true;
      m->DecodeChunk(Columns(seqs, B, T, prefix, k), k, a.get(), o);
      ASSERT_TRUE(m->Rewind(a.get(), keep).ok());
      m->DecodeChunk(Columns(seqs, B, T, prefix, keep), keep, b.get(), {});
      std::vector<BlockState*> sa, sb;
      for (size_t i = 0; i < a->trunk.size(); ++i) { sa.push_back(a->trunk[i].get()); sb.push_back(b->trunk[i].get()); }
      for (size_t i = 0; i < a->heads.size(); ++i) { sa.push_back(a->heads[i].get()); sb.push_back(b->heads[i].get()); }
      for (size_t i = 0; i < sa.size(); ++i) {
        const auto ta = sa[i]->StepTensors(), tb = sb[i]->StepTensors();
        ASSERT_EQ(ta.size(), tb.size());
        for (size_t j = 0; j < ta.size(); ++j) {
          ++tensors;
          const Tensor x = ta[j]->ToDevice(Device::kCpu), y = tb[j]->ToDevice(Device::kCpu);
          bool same = x.numel() == y.numel();
          for (int64_t e = 0; same && e < x.numel(); ++e) same = x.At(e) == y.At(e);
          differing += !same;
        }
      }
      const auto next = Columns(seqs, B, T, T - 1, 1);
      const Tensor la = m->DecodeStep(next, a.get())[0].ToDevice(Device::kCpu);
      const Tensor lb = m->DecodeStep(next, b.get())[0].ToDevice(Device::kCpu);
      for (int64_t r = 0; r < B; ++r) {
        bool same = true;
        for (int64_t v = 0; v < V; ++v) same = same && la.At(r * V + v) == lb.At(r * V + v);
        logit_rows_differing += !same;
      }
    }
  }
  std::printf("[%s] xlstm-large Rewind(keep 1..5) of a chunk of 5 (B1, B3) vs decoding only the kept tokens: %ld "
              "state tensors (C, n, m of 5 blocks), %ld differ in any bit; next step's logits rows differing %ld\n",
              differing == 0 && logit_rows_differing == 0 ? "PASS" : "FAIL", (long)tensors, (long)differing,
              (long)logit_rows_differing);
  EXPECT_EQ(differing, 0);
  EXPECT_EQ(logit_rows_differing, 0);
}

// ---------------------------------------------------------------- speculative = greedy, bitwise

// Speculative decoding (eval/generate.cc GenerateSpeculative) is lossless only if head 1's logits
// of a DecodeChunk over k positions carry the same bits as k DecodeStep calls (the greedy path):
// one bf16 step of difference flips a near-tie argmax. Batch 1, as speculative decoding runs. Two
// states walk the same tokens: S as GenerateSpeculative (prefill with all heads, then rounds of a
// rewindable DecodeChunk with deferred draft logits, Rewind(keep), DraftLogits), G as Generate
// (prefill with head 1 only, then one DecodeStep per token, head 1). Rounds of k = 2..5; a round
// keeps all k (every row compared) or rewinds to keep < k (the kept rows compared; G steps only
// those, so later rounds also check that the rewound state equals the stepped one). Every
// element of head 1's logits must be equal (bf16 values compared exactly).
void CheckChunkBitwiseEqualsSteps(const std::string& name, ModelSpec spec, bool randomise) {
  spec.mtp_heads = 5;
  auto made = LanguageModel::Create(spec, DType::kF32, Device::kCuda, 8);
  ASSERT_TRUE(made.ok()) << made.status();
  std::unique_ptr<LanguageModel> m = std::move(*made);
  if (randomise) Randomise(m->params(), 108);
  const int64_t V = spec.vocab_size, heads = 5, prompt_len = 7;
  const auto prompt = RandomTokens(prompt_len, V, 41);
  const auto stream = RandomTokens(64, V, 42);
  auto spec_state = m->NewDecodeState(1), greedy_state = m->NewDecodeState(1);
  LanguageModel::DecodeOptions prefill;
  prefill.last_position_only = true;
  prefill.heads = heads;
  const Tensor s0 = m->DecodeChunk(prompt, prompt_len, spec_state.get(), prefill)[0].ToDevice(Device::kCpu);
  prefill.heads = 1;
  const Tensor g0 = m->DecodeChunk(prompt, prompt_len, greedy_state.get(), prefill)[0].ToDevice(Device::kCpu);
  int64_t rows = 0, differing = 0, elements = 0;
  double worst = 0;
  std::string first;
  auto compare = [&](const Tensor& a, const Tensor& b, const std::string& where) {
    ++rows;
    bool same = true;
    for (int64_t i = 0; i < V; ++i) {
      const double x = a.At(i), y = b.At(i);
      if (x != y) {
        same = false;
        ++elements;
        worst = std::max(worst, std::fabs(x - y));
      }
    }
    if (!same) {
      ++differing;
      if (first.empty()) first = where;
    }
  };
  compare(s0, g0, "prefill (heads 5 vs 1)");
  int64_t used = 0, round = 0;
  for (int64_t k : {2, 3, 4, 5, 5, 4, 3, 2, 5, 3}) {
    const int64_t keep = round % 2 == 0 ? k : 1 + round % (k - 1);
    std::vector<int32_t> chunk(stream.begin() + used, stream.begin() + used + k);
    LanguageModel::DecodeOptions o;
    o.heads = heads;
    o.rewindable = true;
    o.defer_draft_logits = true;
    const Tensor s = m->DecodeChunk(chunk, k, spec_state.get(), o)[0].ToDevice(Device::kCpu);
    ASSERT_TRUE(m->Rewind(spec_state.get(), keep).ok());
    m->DraftLogits(*spec_state, keep - 1);
    for (int64_t j = 0; j < keep; ++j) {
      const Tensor g = m->DecodeStep(std::span<const int32_t>(&chunk[j], 1), greedy_state.get(), 1)[0];
      compare(s.Rows(j, j + 1), g.ToDevice(Device::kCpu),
              "round " + std::to_string(round) + " (k " + std::to_string(k) + ") position " + std::to_string(j));
    }
    used += keep;
    ++round;
  }
  std::printf("[%s] %s speculative chunk vs greedy steps B1 head-1 logits bitwise: %ld rows, %ld differ (%ld "
              "elements, max |diff| %.4g)%s%s\n", differing == 0 ? "PASS" : "FAIL", name.c_str(), (long)rows,
              (long)differing, (long)elements, worst, first.empty() ? "" : "; first: ", first.c_str());
  EXPECT_EQ(differing, 0) << name << " first differing row: " << first;
}

TEST_F(DecodeGpuTest, SpeculativeChunkBitwiseEqualsGreedySteps) {
  CheckChunkBitwiseEqualsSteps("llama GQA", SmallLlama(), true);
  ModelSpec partial = SmallLlama();
  partial.attn_rotary_dim = 32;
  CheckChunkBitwiseEqualsSteps("llama partial-rotary 32/64", partial, true);
  CheckChunkBitwiseEqualsSteps("xlstm mLSTM+sLSTM", SmallXlstm(), true);
  CheckChunkBitwiseEqualsSteps("xlstm-large", SmallXlstmLarge(), true);
  ModelSpec mamba = SmallMixerHybrid();
  mamba.blocks = {BlockType::kMamba2, BlockType::kMamba2, BlockType::kMamba2};
  CheckChunkBitwiseEqualsSteps("mamba2", mamba, true);
  CheckChunkBitwiseEqualsSteps("mamba2+mixer", SmallMixerHybrid(), true);
  // The benchmark's sizes (their own initialisation): the products' shapes of generate_bench.
  for (const char* preset : {"llama-125m", "mamba2-130m", "xlstm[1:0]-125m"})
    CheckChunkBitwiseEqualsSteps(preset, *PresetSpec(preset), false);
}

// Cost of one speculative round against one greedy step (batch 1, random weights, 4 MTP heads),
// median of 64 after 16 warm-up, host-timed with a device sync on each side (decode at batch 1 is
// bound by launches, so the host clock is the honest one). The round is generate.cc's: one
// DecodeChunk of k tokens (heads 1..k, rewindable, deferred draft logits), Rewind(keep), then
// DraftLogits at the last kept position; timed at keep = 1 (every draft rejected: the common
// case at 25 % acceptance) and keep = k (all accepted, no rewind). The predicted
// speculative / greedy tokens/s at a per-head acceptance a (drafts independent, a round stops at
// the first rejection): tokens per round E = 1 + a + ... + a^(k-1), ratio = E · step / round,
// with the round at keep 1 (the rewinding round; the cost is the same within noise at keep k).
// Only with GYRE_DECODE_BENCH=1; GYRE_DECODE_BENCH_PRESETS (comma-separated) picks the models.
TEST_F(DecodeGpuTest, ChunkVersusStepCost) {
  const char* on = std::getenv("GYRE_DECODE_BENCH");
  if (on == nullptr || std::string(on) != "1") GTEST_SKIP() << "set GYRE_DECODE_BENCH=1";
  std::vector<std::string> presets = {"llama-125m", "mamba2-130m", "xlstm[1:0]-125m"};
  if (const char* p = std::getenv("GYRE_DECODE_BENCH_PRESETS"); p != nullptr && *p != 0) {
    presets.clear();
    std::string all = p;
    for (size_t b = 0; b <= all.size();) {
      const size_t e = std::min(all.find(',', b), all.size());
      if (e > b) presets.push_back(all.substr(b, e - b));
      b = e + 1;
    }
  }
  for (const std::string& preset : presets) {
    ModelSpec spec = *PresetSpec(preset);
    spec.mtp_heads = 5;
    auto m = LanguageModel::Create(spec, DType::kF32, Device::kCuda, 1);
    if (!m.ok()) {
      std::printf("chunk bench %s: %s\n", preset.c_str(), m.status().ToString().c_str());
      continue;
    }
    auto time_ms = [&](auto&& fn) {
      std::vector<double> ms;
      for (int i = 0; i < 16 + 64; ++i) {
        Cuda().Synchronize();
        const auto t0 = std::chrono::steady_clock::now();
        fn();
        Cuda().Synchronize();
        if (i >= 16) ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
      }
      std::sort(ms.begin(), ms.end());
      return ms[ms.size() / 2];
    };
    auto greedy_state = (*m)->NewDecodeState(1);
    const std::vector<int32_t> one = {1};
    const double step = time_ms([&] { (*m)->DecodeStep(one, greedy_state.get(), 1); });
    for (int64_t k = 2; k <= 5; ++k) {
      double round[2] = {0, 0};
      for (int which = 0; which < 2; ++which) {
        const int64_t keep = which == 0 ? 1 : k;
        auto st = (*m)->NewDecodeState(1);
        std::vector<int32_t> tok(k, 1);
        LanguageModel::DecodeOptions o;
        o.heads = k;
        o.rewindable = true;
        o.defer_draft_logits = true;
        round[which] = time_ms([&] {
          (*m)->DecodeChunk(tok, k, st.get(), o);
          GYRE_CHECK((*m)->Rewind(st.get(), keep).ok(), "rewind");
          (*m)->DraftLogits(*st, keep - 1);
        });
      }
      auto ratio = [&](double a) {
        double e = 0, p = 1;
        for (int64_t i = 0; i < k; ++i, p *= a) e += p;
        return e * step / round[0];
      };
      std::printf("chunk bench %s B1: greedy step (head 1) %.3f ms; round k=%ld (chunk + rewind + draft logits) "
                  "keep 1 %.3f ms, keep %ld %.3f ms (%.2f steps); ceiling x%.2f; predicted speculative/greedy at "
                  "acceptance 0.25 x%.2f, 0.50 x%.2f\n",
                  preset.c_str(), step, (long)k, round[0], (long)k, round[1], round[0] / step, k * step / round[1],
                  ratio(0.25), ratio(0.5));
    }
  }
}

// ---------------------------------------------------------------- decode graphs (ops/decode_graph.h)

// Whether two bf16 tensors (any device) carry the same bits; counts differing rows.
int64_t DifferingRows(const Tensor& a, const Tensor& b) {
  const Tensor x = a.ToDevice(Device::kCpu), y = b.ToDevice(Device::kCpu);
  EXPECT_EQ(x.numel(), y.numel());
  const int64_t rows = x.rows(), bytes = x.cols() * static_cast<int64_t>(DTypeSize(x.dtype()));
  int64_t differ = 0;
  for (int64_t r = 0; r < rows; ++r)
    differ += std::memcmp(static_cast<const char*>(x.raw()) + r * bytes, static_cast<const char*>(y.raw()) + r * bytes,
                          static_cast<size_t>(bytes)) != 0;
  return differ;
}

// Two states walk the same prompt and tokens: E steps eagerly (DecodeStep, head 1), G replays a
// DecodeGraph captured after one eager warm-up step. Steps interleave (E, then G), so a block of
// the graph's pool handed to E's tensors (or the other way round) would corrupt one of them.
// Every step's head-1 logits must be equal bit for bit, the graph's device argmax must equal
// ArgmaxRows of E's logits, and after the graph is destroyed the allocator holds what it held
// before the (last) capture (the pool's blocks went back). Attention models: when a KV cache is
// full (MustGrow) G steps eagerly once (the cache doubles) and captures again, as Generate does;
// `se_group` > 0 switches SelfExtend on (grouped positions past the window).
// `rope_append_graph`: the graph (and the graphed state's eager growth steps) run the attention
// appends and RoPE in one launch (ops/cuda_infer.h DecodeRopeAppendOneLaunch), the eager state
// the separate launches: the fused launch under the graph against the separate ones, every bit.
void CheckGraphBitwiseEqualsEager(const std::string& name, ModelSpec spec, int64_t B, bool randomise,
                                  int64_t steps = 32, int64_t se_group = 0, int64_t se_window = 0,
                                  bool rope_append_graph = false) {
  const bool saved_rope_append = DecodeRopeAppendOneLaunch();
  // The eager state's launches, and the graphed state's (the capture and its eager growth steps).
  const auto eager_side = [&] { if (rope_append_graph) SetDecodeRopeAppendOneLaunch(false); };
  const auto graph_side = [&] { if (rope_append_graph) SetDecodeRopeAppendOneLaunch(true); };
  spec.mtp_heads = 2;
  auto made = LanguageModel::Create(spec, DType::kF32, Device::kCuda, 8);
  ASSERT_TRUE(made.ok()) << made.status();
  std::unique_ptr<LanguageModel> m = std::move(*made);
  if (randomise) Randomise(m->params(), 108);
  if (se_group > 0) m->SetSelfExtend(se_group, se_window);
  const int64_t V = spec.vocab_size, prompt_len = 5;
  const auto prompt = RandomTokens(prompt_len * B, V, 51);  // position-major
  const auto stream = RandomTokens((steps + 1) * B, V, 52);
  auto eager = m->NewDecodeState(B), graphed = m->NewDecodeState(B);
  LanguageModel::DecodeOptions prefill;
  prefill.heads = 1;
  prefill.last_position_only = true;
  eager_side();
  m->DecodeChunk(prompt, prompt_len, eager.get(), prefill);
  const std::span<const int32_t> first(stream.data(), static_cast<size_t>(B));
  m->DecodeStep(first, eager.get(), 1);
  graph_side();
  m->DecodeChunk(prompt, prompt_len, graphed.get(), prefill);
  m->DecodeStep(first, graphed.get(), 1);  // the warm-up
  Cuda().Synchronize();
  uint64_t in_use_before = Cuda().Memory().bytes_in_use;
  int64_t differing = 0, argmax_differ = 0, nodes = 0, captures = 0, replays = 0, grown = 0;
  bool final_grows = false;
  {
    absl::StatusOr<std::unique_ptr<DecodeGraph>> graph = DecodeGraph::Capture(m.get(), graphed.get());
    ASSERT_TRUE(graph.ok()) << name << ": " << graph.status();
    ++captures;
    nodes = (*graph)->nodes();
    for (int64_t t = 1; t <= steps; ++t) {
      const std::span<const int32_t> tok(stream.data() + t * B, static_cast<size_t>(B));
      eager_side();
      Tensor e = m->DecodeStep(tok, eager.get(), 1)[0];
      graph_side();
      if ((*graph)->MustGrow()) {
        // The replay refuses a step that grows the cache; the eager step grows it, then a new capture.
        const auto refused = (*graph)->Step(tok);
        EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition) << refused.status();
        graph->reset();
        differing += DifferingRows(e, m->DecodeStep(tok, graphed.get(), 1)[0]);
        ++grown;
        // Both steps' logits go back before the count (device call 1 counted them: 2·B·V·2
        // bytes more before the capture than after the graph died, a bookkeeping miss only).
        e = Tensor();
        Cuda().Synchronize();
        in_use_before = Cuda().Memory().bytes_in_use;
        graph = DecodeGraph::Capture(m.get(), graphed.get());
        ASSERT_TRUE(graph.ok()) << name << ": " << graph.status();
        ++captures;
        continue;
      }
      absl::StatusOr<std::span<const int32_t>> ids = (*graph)->Step(tok);
      ASSERT_TRUE(ids.ok()) << ids.status();
      ++replays;
      const std::vector<int32_t> want = ArgmaxRows(e);
      argmax_differ += !std::equal(want.begin(), want.end(), ids->begin(), ids->end());
      differing += DifferingRows(e, (*graph)->logits());
    }
    EXPECT_EQ(graphed->position, eager->position);
    // An eager step on the graph's state: the next replay refuses.
    final_grows = DecodeGraph::KvCacheFull(graphed.get());
    m->DecodeStep(first, graphed.get(), 1);
    const auto refused = (*graph)->Step(first);
    EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition) << refused.status();
  }
  Cuda().Synchronize();
  const uint64_t in_use_after = Cuda().Memory().bytes_in_use;
  // (Unless the eager step after the loop grew a cache: new bytes held by the state.)
  const bool memory_ok = in_use_after == in_use_before || final_grows;
  const bool ok = differing == 0 && argmax_differ == 0 && memory_ok && replays > 0;
  std::printf("[%s] %s decode graph vs eager steps B%ld, %ld steps (%ld replays, %ld captures, %ld eager growth "
              "steps), %ld nodes: %ld logits rows differ, %ld argmax differ; bytes in use before the last capture "
              "%lu, after the graph died %lu\n",
              ok ? "PASS" : "FAIL", name.c_str(), (long)B, (long)steps, (long)replays, (long)captures, (long)grown,
              (long)nodes, (long)differing, (long)argmax_differ, (unsigned long)in_use_before,
              (unsigned long)in_use_after);
  EXPECT_TRUE(ok) << name;
  SetDecodeRopeAppendOneLaunch(saved_rope_append);
}

ModelSpec SmallMamba2() {
  ModelSpec s = SmallMixerHybrid();
  s.blocks = {BlockType::kMamba2, BlockType::kMamba2, BlockType::kMamba2};
  return s;
}

TEST_F(DecodeGpuTest, DecodeGraphBitwiseEqualsEagerSteps) {
  for (int64_t B : {1, 3, 20}) {  // 20: past GemmRows' 16 rows, cuBLASLt products in the graph
    CheckGraphBitwiseEqualsEager("xlstm mLSTM+sLSTM", SmallXlstm(), B, true);
    CheckGraphBitwiseEqualsEager("mamba2", SmallMamba2(), B, true);
  }
  for (const char* preset : {"xlstm[1:0]-125m", "mamba2-130m", "xlstm[7:1]-125m"})
    CheckGraphBitwiseEqualsEager(preset, *PresetSpec(preset), 1, false);
}

// Attention models under the graph: the KV length and RoPE position come from a device int32,
// so one graph replays every length below the cache's capacity; 140 steps from a 5-token prompt
// cross the capacities 64 and 128 (two eager growth steps, three captures) and the decode
// kernel's 128-key thread tile. Llama whole-head (GQA), partial rotary, SelfExtend (grouped
// positions past the window) and the Mamba-2 + attention mixer hybrid (qkv conv, partial
// rotary), at batch 1 and 3.
TEST_F(DecodeGpuTest, DecodeGraphWithAttentionBitwiseEqualsEagerSteps) {
  ModelSpec partial = SmallLlama();
  partial.attn_rotary_dim = 32;
  for (int64_t B : {1, 3}) {
    CheckGraphBitwiseEqualsEager("llama", SmallLlama(), B, true, 140);
    CheckGraphBitwiseEqualsEager("llama partial-rotary 32/64", partial, B, true, 140);
    CheckGraphBitwiseEqualsEager("llama SelfExtend G4 W8", SmallLlama(), B, true, 140, 4, 8);
    CheckGraphBitwiseEqualsEager("mamba2+mixer", SmallMixerHybrid(), B, true, 140);
  }
  CheckGraphBitwiseEqualsEager("llama-125m", *PresetSpec("llama-125m"), 1, false, 70);
}

// The attention decode step's appends and RoPE in one launch (ops/cuda_infer_kernels.h
// RopeAppend, GYRE_DECODE_ROPE_APPEND=1) against the separate launches (append k, RoPE k in the
// cache, append v, clone q, RoPE q; SelfExtend: the grouped k and q too), every byte:
// (1) the op: CausalAttentionDecode (batch 1 and 3) and CausalAttentionDecodeChunk (4 rows,
//     batch 1: the speculative round's shape), and CausalAttentionDecodeChunkPacked (q, k, v as
//     column blocks of one tensor), on triplet caches, one per path, with the position
//     from the host (eager) and from a device int32 (the graph's kernels, launched eagerly here),
//     70 steps / 18 chunks from an empty cache (growth at 64): every output and every cache row
//     below the length (k, v, the grouped k), whole-head and partial rotary, GQA, SelfExtend;
// (2) the models: DecodeGraph replays with the fused launch (and Llama's one q/k/v product over
//     the adjacent weights, the mixer's qkv read in place) against eager steps with the separate
//     launches and products (CheckGraphBitwiseEqualsEager), llama variants and the mixer hybrid.
TEST_F(DecodeGpuTest, RopeAppendOneLaunchBitwiseEqualsSeparateLaunches) {
  const bool saved = DecodeRopeAppendOneLaunch();
  Tensor pos = Tensor::Empty({1}, DType::kI32, Device::kCuda);
  std::mt19937_64 rng(91);
  std::normal_distribution<double> normal(0.0, 1.0);
  const auto random_dev = [&](int64_t rows, int64_t cols) {
    Tensor x = Tensor::Empty({rows, cols}, DType::kF32);
    for (int64_t i = 0; i < x.numel(); ++i) x.Set(i, normal(rng));
    return x.To(DType::kBF16).ToDevice(Device::kCuda);
  };
  const auto same = [](const Tensor& a, const Tensor& b) {
    const Tensor x = a.ToDevice(Device::kCpu), y = b.ToDevice(Device::kCpu);
    return x.numel() == y.numel() &&
           std::memcmp(x.raw(), y.raw(), static_cast<size_t>(x.numel() * DTypeSize(x.dtype()))) == 0;
  };
  // The first `length` rows of every sequence of a cache [B, capacity, kvd].
  const auto rows_equal = [](const Tensor& a, const Tensor& b, int64_t length) {
    if (!a.defined() || !b.defined()) return a.defined() == b.defined();
    const Tensor x = a.ToDevice(Device::kCpu), y = b.ToDevice(Device::kCpu);
    if (x.shape() != y.shape()) return false;
    const int64_t B = x.dim(0), cap = x.dim(1), cols = x.dim(2);
    for (int64_t b = 0; b < B; ++b)
      if (std::memcmp(static_cast<const char*>(x.raw()) + b * cap * cols * 2,
                      static_cast<const char*>(y.raw()) + b * cap * cols * 2, static_cast<size_t>(length * cols * 2)))
        return false;
    return true;
  };
  struct Case {
    const char* name;
    int64_t heads, kv_heads, rotary, group, window;
  };
  const Case cases[] = {{"whole-head GQA 4/2", 4, 2, 0, 0, 0},
                        {"partial rotary 32/64 GQA 4/2", 4, 2, 32, 0, 0},
                        {"SelfExtend G4 W8 GQA 4/2", 4, 2, 0, 4, 8},
                        {"partial rotary 32/64 SelfExtend G4 W8 MHA 4/4", 4, 4, 32, 4, 8}};
  int64_t differ = 0, checks = 0;
  for (const Case& c : cases) {
    AttentionOptions o;
    o.heads = c.heads; o.kv_heads = c.kv_heads; o.head_dim = 64; o.rotary_dim = c.rotary;
    o.self_extend_group = c.group; o.self_extend_window = c.window;
    const int64_t qd = o.heads * o.head_dim, kvd = o.kv_heads * o.head_dim;
    for (int64_t B : {1, 3, 0}) {  // 0: chunks of 4 rows at batch 1
      const int64_t chunk = B == 0 ? 4 : 1, rows = B == 0 ? 4 : B, calls = B == 0 ? 18 : 70;
      for (bool device_position : {false, true}) {
        int64_t case_differ = 0;
        KvCache separate, fused, packed;
        for (int64_t call = 0; call < calls; ++call) {
          const Tensor q = random_dev(rows, qd), k = random_dev(rows, kvd), v = random_dev(rows, kvd);
          Tensor out[3];
          for (int path = 0; path < 3; ++path) {  // separate launches, one launch, one launch on packed qkv
            KvCache* cache = path == 0 ? &separate : path == 1 ? &fused : &packed;
            SetDecodeRopeAppendOneLaunch(path >= 1);
            const int64_t t = cache->cuda_length;
            // The device position needs a cache with room (a graph never records a Grow).
            const bool room = cache->cuda_k.defined() && t + chunk <= cache->cuda_k.dim(1);
            if (device_position && room) {
              const int32_t t32 = static_cast<int32_t>(t);
              Cuda().CopyBytes(pos.raw(), Device::kCuda, &t32, Device::kCpu, sizeof(int32_t));
              cache->graph_position = pos.data<int32_t>();
            }
            if (path == 2) {
              out[path] = CausalAttentionDecodeChunkPacked(ConcatColumns({q, k, v}), chunk, o, cache);
            } else {
              out[path] = B == 0 ? CausalAttentionDecodeChunk(q, k, v, chunk, o, cache)
                                 : CausalAttentionDecode(q, k, v, o, cache);
            }
            cache->graph_position = nullptr;
          }
          const int64_t length = separate.cuda_length;
          bool ok = true;
          for (int path = 1; path < 3; ++path) {
            const KvCache& c2 = path == 1 ? fused : packed;
            ok = ok && c2.cuda_length == length && same(out[0], out[path]) &&
                 rows_equal(separate.cuda_k, c2.cuda_k, length) && rows_equal(separate.cuda_v, c2.cuda_v, length) &&
                 rows_equal(separate.cuda_k_grouped, c2.cuda_k_grouped, length);
          }
          case_differ += !ok;
          ++checks;
        }
        differ += case_differ;
        std::printf("[%s] rope+append one launch (three tensors; packed qkv) vs separate: %s, %s, %s position: %ld "
                    "of %ld calls differ (outputs, k / v / grouped-k cache rows)\n", case_differ == 0 ? "PASS" : "FAIL", c.name,
                    B == 0 ? "chunks of 4 at B1" : (B == 1 ? "steps at B1" : "steps at B3"),
                    device_position ? "device" : "host", (long)case_differ, (long)calls);
      }
    }
  }
  SetDecodeRopeAppendOneLaunch(saved);
  EXPECT_EQ(differ, 0) << checks << " calls";
  // Under the graph: replays with the fused launch against eager steps with the separate ones.
  ModelSpec partial = SmallLlama();
  partial.attn_rotary_dim = 32;
  for (int64_t B : {1, 3}) {
    CheckGraphBitwiseEqualsEager("rope+append graph vs separate eager: llama", SmallLlama(), B, true, 70, 0, 0, true);
    CheckGraphBitwiseEqualsEager("rope+append graph vs separate eager: llama partial-rotary 32/64", partial, B, true,
                                 70, 0, 0, true);
    CheckGraphBitwiseEqualsEager("rope+append graph vs separate eager: llama SelfExtend G4 W8", SmallLlama(), B, true,
                                 70, 4, 8, true);
    CheckGraphBitwiseEqualsEager("rope+append graph vs separate eager: mamba2+mixer", SmallMixerHybrid(), B, true, 70,
                                 0, 0, true);
  }
  CheckGraphBitwiseEqualsEager("rope+append graph vs separate eager: llama-125m", *PresetSpec("llama-125m"), 1, false,
                               70, 0, 0, true);
}

// The split decode attention kernel (GYRE_DECODE_ATTN=split, ops/cuda_infer_kernels.h) and the
// serial one against the CPU's float64 decode (the same bf16-valued q, k, v) at caches up to
// 1,088 keys (one case to 2,048): chunks of rows (DecodeChunk, causal inside the chunk: every
// length 1..T_max is some row's key count), MHA and GQA, whole-head and partial rotary, SelfExtend
// (window 64, so most keys are grouped at long T), head_dim 64, 96 (12 of 16 lanes of a key's
// group active) and 128; the error of each chunk's rows (||gpu - ref|| / ||ref||) must stay
// under 1e-2 for both kernels. Row invariance of the split kernel: the same rows fed as single
// steps to another cache give every output bit of the chunk (greedy == speculative), and so
// does the device-position (graph) launch, checked for the split kernel at every chunk.
TEST_F(DecodeGpuTest, SplitDecodeAttentionMatchesFloat64AndIsRowInvariant) {
  const bool saved = DecodeAttnSplit(), saved_cluster = DecodeAttnCluster();
  Tensor pos = Tensor::Empty({1}, DType::kI32, Device::kCuda);
  const auto same = [](const Tensor& a, const Tensor& b) {
    const Tensor x = a.ToDevice(Device::kCpu), y = b.ToDevice(Device::kCpu);
    return x.numel() == y.numel() &&
           std::memcmp(x.raw(), y.raw(), static_cast<size_t>(x.numel() * DTypeSize(x.dtype()))) == 0;
  };
  struct Case {
    const char* name;
    int64_t heads, kv_heads, head_dim, rotary, group, window, chunk, max_length;
  };
  const Case cases[] = {{"MHA 4/4 D64 whole-head", 4, 4, 64, 0, 0, 0, 64, 1088},
                        {"GQA 4/2 D64 partial rotary 32", 4, 2, 64, 32, 0, 0, 64, 1088},
                        {"GQA 4/2 D64 SelfExtend G4 W64", 4, 2, 64, 0, 4, 64, 64, 1088},
                        {"GQA 4/2 D96 partial rotary 48", 4, 2, 96, 48, 0, 0, 64, 576},
                        {"MHA 2/2 D128 whole-head", 2, 2, 128, 0, 0, 0, 64, 576},
                        {"GQA 2/1 D64 whole-head to 2048", 2, 1, 64, 0, 0, 0, 256, 2048}};
  int64_t failures = 0;
  Rng rng(123);
  // The graph's launch: the length from a device int32 (needs a cache with room).
  const auto device_position = [&](KvCache* cache, int64_t n) {
    const int64_t tg = cache->cuda_length;
    if (cache->cuda_k.defined() && tg + n <= cache->cuda_k.dim(1)) {
      const int32_t t32 = static_cast<int32_t>(tg);
      Cuda().CopyBytes(pos.raw(), Device::kCuda, &t32, Device::kCpu, sizeof(int32_t));
      cache->graph_position = pos.data<int32_t>();
    }
  };
  for (const Case& c : cases) {
    AttentionOptions o;
    o.heads = c.heads; o.kv_heads = c.kv_heads; o.head_dim = c.head_dim; o.rotary_dim = c.rotary;
    o.self_extend_group = c.group; o.self_extend_window = c.window;
    const int64_t qd = o.heads * o.head_dim, kvd = o.kv_heads * o.head_dim;
    // [0] split, [1] cluster (GYRE_DECODE_ATTN=cluster).
    KvCache cpu, serial, fast[2], fast_steps[2], fast_graph[2];
    double worst[3] = {0, 0, 0};
    int64_t step_differ[2] = {0, 0}, graph_differ[2] = {0, 0}, short_differ = 0, short_checks = 0, chunks = 0;
    for (int64_t t = 0; t < c.max_length; t += c.chunk, ++chunks) {
      const int64_t n = c.chunk;
      const Tensor q = RandomBf16Host({n, qd}, 1.0, &rng), k = RandomBf16Host({n, kvd}, 1.0, &rng),
                   v = RandomBf16Host({n, kvd}, 1.0, &rng);
      const Tensor ref = CausalAttentionDecodeChunk(q, k, v, n, o, &cpu);
      const Tensor qd_ = ToCudaBf16(q), kd = ToCudaBf16(k), vd = ToCudaBf16(v);
      SetDecodeAttnSplit(false);
      const Tensor out_serial = CausalAttentionDecodeChunk(qd_, kd, vd, n, o, &serial);
      Tensor out_fast[2], out_graph[2];
      for (int f = 0; f < 2; ++f) {
        SetDecodeAttnCluster(f == 1);
        out_fast[f] = CausalAttentionDecodeChunk(qd_, kd, vd, n, o, &fast[f]);
        // The same rows one step at a time (the greedy path).
        Tensor out_steps = Tensor::Empty({n, qd}, DType::kBF16, Device::kCuda);
        for (int64_t r = 0; r < n; ++r)
          out_steps.Rows(r, r + 1).CopyFrom(
              CausalAttentionDecode(qd_.Rows(r, r + 1), kd.Rows(r, r + 1), vd.Rows(r, r + 1), o, &fast_steps[f]));
        step_differ[f] += !same(out_fast[f], out_steps);
        device_position(&fast_graph[f], n);
        out_graph[f] = CausalAttentionDecodeChunk(qd_, kd, vd, n, o, &fast_graph[f]);
        fast_graph[f].graph_position = nullptr;
        graph_differ[f] += !same(out_fast[f], out_graph[f]);
      }
      // Rows of <= 128 keys: one working rank, the split kernel's bits (the graph launch always
      // takes the cluster kernel).
      if (t + n <= 128) {
        short_differ += !same(out_fast[0], out_graph[1]);
        ++short_checks;
      }
      const Tensor want = ref.To(DType::kF64);
      for (int s = 0; s < 3; ++s) {
        const Tensor got = (s == 0 ? out_serial : out_fast[s - 1]).ToDevice(Device::kCpu).To(DType::kF64);
        worst[s] = std::max(worst[s], RelativeError(got, want));
      }
    }
    const bool ok = worst[0] <= 1e-2 && worst[1] <= 1e-2 && worst[2] <= 1e-2 && step_differ[0] == 0 &&
                    graph_differ[0] == 0 && step_differ[1] == 0 && graph_differ[1] == 0 && short_differ == 0;
    failures += !ok;
    std::printf("[%s] decode attention %s, chunks of %ld to %ld keys: rel_err vs float64 serial %.3e, split %.3e, "
                "cluster %.3e (tol 1e-2); chunk vs single steps: split %ld, cluster %ld of %ld chunks differ, vs "
                "device position: split %ld, cluster %ld differ; cluster vs split at <= 128 keys: %ld of %ld differ\n",
                ok ? "PASS" : "FAIL", c.name, (long)c.chunk, (long)c.max_length, worst[0], worst[1], worst[2],
                (long)step_differ[0], (long)step_differ[1], (long)chunks, (long)graph_differ[0],
                (long)graph_differ[1], (long)short_differ, (long)short_checks);
  }
  SetDecodeAttnSplit(saved);
  if (saved) SetDecodeAttnCluster(saved_cluster);
  EXPECT_EQ(failures, 0);
  // The models under the split and the cluster kernels: graph replays against eager steps, every bit.
  for (int f = 0; f < 2; ++f) {
    SetDecodeAttnCluster(f == 1);
    const std::string name = f == 1 ? "cluster attention: " : "split attention: ";
    CheckGraphBitwiseEqualsEager(name + "llama", SmallLlama(), 1, true, 300);
    CheckGraphBitwiseEqualsEager(name + "llama SelfExtend G4 W8", SmallLlama(), 3, true, 300, 4, 8);
  }
  SetDecodeAttnSplit(saved);
  if (saved) SetDecodeAttnCluster(saved_cluster);
}

// The device-position launches of RoPE and the decode attention kernel give the bytes of the
// host-argument launches (the eager path) at the same t, for a cache of capacity 256 at lengths
// that cross the kernel's 128-key tile, with and without SelfExtend's grouped keys.
TEST_F(DecodeGpuTest, DevicePositionKernelsEqualHostPositionKernels) {
  const int64_t B = 2, H = 4, Hk = 2, D = 64, cap = 256, kvd = Hk * D, qd = H * D;
  Tensor k_cache = Tensor::Empty({B, cap, kvd}, DType::kF32);
  Tensor kg_cache = Tensor::Empty({B, cap, kvd}, DType::kF32);
  Tensor v_cache = Tensor::Empty({B, cap, kvd}, DType::kF32);
  Tensor q = Tensor::Empty({B, qd}, DType::kF32), qg = Tensor::Empty({B, qd}, DType::kF32);
  Tensor k_row = Tensor::Empty({B, kvd}, DType::kF32);
  std::mt19937_64 rng(77);
  std::normal_distribution<double> normal(0.0, 1.0);
  for (Tensor* x : {&k_cache, &kg_cache, &v_cache, &q, &qg, &k_row})
    for (int64_t i = 0; i < x->numel(); ++i) x->Set(i, normal(rng));
  const auto dev = [](const Tensor& x) { return x.To(DType::kBF16).ToDevice(Device::kCuda); };
  const auto same = [](const Tensor& a, const Tensor& b) {
    const Tensor x = a.ToDevice(Device::kCpu), y = b.ToDevice(Device::kCpu);
    return std::memcmp(x.raw(), y.raw(), static_cast<size_t>(x.numel() * DTypeSize(x.dtype()))) == 0;
  };
  Tensor pos = Tensor::Empty({1}, DType::kI32, Device::kCuda);
  int64_t differ = 0, cases = 0;
  for (int64_t t : {0, 1, 63, 127, 128, 129, 200, 255}) {
    const int32_t t32 = static_cast<int32_t>(t);
    Cuda().CopyBytes(pos.raw(), Device::kCuda, &t32, Device::kCpu, sizeof(int32_t));
    for (int64_t rotary : {D, int64_t{32}}) {
      for (int64_t group : {int64_t{0}, int64_t{4}}) {
        // RoPE of cache row t: host offset (address + t) vs device position (base + t * stride).
        Tensor a = dev(k_cache), b = dev(k_cache);
        CudaRopeArgs r;
        r.rows = B; r.seq = 1; r.heads = Hk; r.head_dim = D; r.rotary_dim = rotary; r.row_stride = cap * kvd;
        r.group = group; r.shift = group > 0 ? 3 : 0;
        r.x = static_cast<char*>(a.raw()) + t * kvd * 2; r.offset = t;
        CudaInfer().Rope(r);
        r.x = b.raw(); r.offset = -12345; r.position_dev = pos.data<int32_t>(); r.position_stride = kvd;
        CudaInfer().Rope(r);
        differ += !same(a, b);
        ++cases;
      }
    }
    // Append: Copy2D at row t vs AppendRows at the device position.
    Tensor a = dev(k_cache), b = dev(k_cache), src = dev(k_row);
    Cuda().Copy2D(static_cast<char*>(a.raw()) + t * kvd * 2, cap * kvd * 2, src.raw(), kvd * 2, kvd * 2, B);
    CudaInfer().AppendRows(b.raw(), cap * kvd, src.raw(), B, kvd, pos.data<int32_t>());
    differ += !same(a, b);
    ++cases;
    for (int64_t window : {int64_t{0}, int64_t{8}}) {
      Tensor kd = dev(k_cache), kgd = dev(kg_cache), vd = dev(v_cache), qd_ = dev(q), qgd = dev(qg);
      Tensor o1 = Tensor::Empty({B, qd}, DType::kBF16, Device::kCuda);
      Tensor o2 = Tensor::Empty({B, qd}, DType::kBF16, Device::kCuda);
      CudaAttentionDecodeArgs at;
      at.batch = B; at.heads = H; at.kv_heads = Hk; at.head_dim = D;
      at.q = qd_.raw(); at.k = kd.raw(); at.v = vd.raw(); at.cache_batch_stride = cap * kvd; at.window = window;
      if (window > 0) { at.q_grouped = qgd.raw(); at.k_grouped = kgd.raw(); }
      at.length = t + 1; at.out = o1.raw();
      CudaInfer().AttentionDecode(at);
      at.length = cap; at.position_dev = pos.data<int32_t>(); at.out = o2.raw();
      CudaInfer().AttentionDecode(at);
      differ += !same(o1, o2);
      ++cases;
    }
  }
  std::printf("[%s] device-position RoPE / append / decode attention vs host-position launches: %ld of %ld cases "
              "differ\n", differ == 0 ? "PASS" : "FAIL", (long)differ, (long)cases);
  EXPECT_EQ(differ, 0);
}

TEST_F(DecodeGpuTest, DecodeGraphRefusesAFullCacheAndFailsCleanly) {
  // A KV cache at its capacity: the capture is refused (the step would grow it) until one eager
  // step has grown it; then the capture works.
  {
    ModelSpec spec = SmallLlama();
    spec.mtp_heads = 2;
    auto m = LanguageModel::Create(spec, DType::kF32, Device::kCuda, 8);
    ASSERT_TRUE(m.ok());
    auto st = (*m)->NewDecodeState(1);
    const auto tokens = RandomTokens(65, spec.vocab_size, 63);
    for (int i = 0; i < 64; ++i) (*m)->DecodeStep(std::span<const int32_t>(&tokens[i], 1), st.get(), 1);
    const auto full = DecodeGraph::Capture(m->get(), st.get());
    const bool refused = full.status().code() == absl::StatusCode::kFailedPrecondition &&
                         DecodeGraph::KvCacheFull(st.get());
    (*m)->DecodeStep(std::span<const int32_t>(&tokens[64], 1), st.get(), 1);
    const auto grown = DecodeGraph::Capture(m->get(), st.get());
    std::printf("[%s] capture at a full KV cache (64 of 64): %s; after one eager step: %s\n",
                refused && grown.ok() ? "PASS" : "FAIL", full.status().ToString().c_str(),
                grown.ok() ? "captured" : grown.status().ToString().c_str());
    EXPECT_TRUE(refused);
    EXPECT_TRUE(grown.ok()) << grown.status();
  }
  // An unwarmed state is refused; an injected host synchronisation inside the capture fails it
  // with the driver's reason, and the state steps on eagerly, unharmed.
  auto made = LanguageModel::Create(SmallXlstm(), DType::kF32, Device::kCuda, 8);
  ASSERT_TRUE(made.ok());
  LanguageModel* m = made->get();
  auto cold = m->NewDecodeState(1);
  EXPECT_EQ(DecodeGraph::Capture(m, cold.get()).status().code(), absl::StatusCode::kFailedPrecondition);
  auto a = m->NewDecodeState(1), b = m->NewDecodeState(1);
  const auto tokens = RandomTokens(8, SmallXlstm().vocab_size, 61);
  for (int i = 0; i < 2; ++i) {
    m->DecodeStep(std::span<const int32_t>(&tokens[i], 1), a.get(), 1);
    m->DecodeStep(std::span<const int32_t>(&tokens[i], 1), b.get(), 1);
  }
  DecodeGraphOptions inject;
  inject.inject_host_sync = true;
  const auto failed = DecodeGraph::Capture(m, b.get(), inject);
  const bool named = !failed.ok() && absl::StrContains(failed.status().message(), "Synchronize");
  std::printf("[%s] injected host sync inside the capture: %s\n", named ? "PASS" : "FAIL",
              failed.status().ToString().c_str());
  EXPECT_TRUE(named);
  int64_t differ = 0;
  for (int i = 2; i < 8; ++i) {
    differ += DifferingRows(m->DecodeStep(std::span<const int32_t>(&tokens[i], 1), a.get(), 1)[0],
                            m->DecodeStep(std::span<const int32_t>(&tokens[i], 1), b.get(), 1)[0]);
  }
  std::printf("[%s] eager steps after the failed capture: %ld rows differ from an untouched state\n",
              differ == 0 ? "PASS" : "FAIL", (long)differ);
  EXPECT_EQ(differ, 0);
  // The failed capture's pool is gone: a fresh capture on the same state works.
  EXPECT_TRUE(DecodeGraph::Capture(m, b.get()).ok());
  // A capture whose warm-up left too few free blocks (every cached 256-byte block taken) misses
  // the cache, is retried once with the missed sizes cached, and replays bitwise like eager.
  {
    std::vector<Tensor> hog;
    for (int i = 0; i < 4000; ++i) hog.push_back(Tensor::Empty({64}, DType::kF32, Device::kCuda));
    auto retried = DecodeGraph::Capture(m, b.get());
    hog.clear();
    int64_t rows = 0;
    if (retried.ok()) {
      for (int i = 0; i < 4; ++i) {
        const int32_t t = tokens[i];
        const Tensor e = m->DecodeStep(std::span<const int32_t>(&t, 1), a.get(), 1)[0];
        ASSERT_TRUE((*retried)->Step(std::span<const int32_t>(&t, 1)).ok());
        rows += DifferingRows(e, (*retried)->logits());
      }
    }
    const bool ok = retried.ok() && rows == 0;
    std::printf("[%s] capture with the small blocks taken: %s, %ld rows differ from eager\n", ok ? "PASS" : "FAIL",
                retried.ok() ? "captured (after a retry)" : retried.status().ToString().c_str(), (long)rows);
    EXPECT_TRUE(ok);
  }
}

// Speculative rounds under a SpeculativeGraph (ops/decode_graph.h) against GenerateSpeculative's
// eager rounds, every bit (batch 1, k = 4 heads). Two
// states walk the same prompt and chunks: E runs the eager round (rewindable DecodeChunk of k
// with deferred draft logits, Rewind(keep), DraftLogits at keep - 1), G replays the graph
// (Round, Commit(keep)) captured after one eager round (the warm-up) and again after every eager
// round that grows a KV cache (MustGrow: Round refuses it). Rounds interleave (E, then G), so a
// block of the graph's pool handed to E (or the other way round) would corrupt one of them.
// Compared every round: head 1's logits at all k positions, heads 2..k's logits at the last kept
// position (the next round's drafts, gathered on the device at the forced keep), and the graph's
// device argmaxes and keep against ArgmaxRows / ArgmaxFirstRows of E's. Keeps cycle k, 1, k, 2, k, 3, ... so the in-place commit of every
// keep is checked by the logits of the rounds after it. Attention models run long enough to grow
// their caches at 64 and 128 keys. At the end an eager round on G's state makes the next Round
// refuse (its position moved outside the graph).
void CheckSpeculativeGraph(const std::string& name, ModelSpec spec, bool randomise, int64_t rounds,
                           int64_t se_group = 0, int64_t se_window = 0, int64_t k = 4) {
  // k < 4: the model keeps 4 MTP heads and heads k + 1..4 fall behind (GenerateSpeculative at
  // draft_heads = k): the graph must pin, run and commit heads 1..k only.
  spec.mtp_heads = 4;
  auto made = LanguageModel::Create(spec, DType::kF32, Device::kCuda, 8);
  ASSERT_TRUE(made.ok()) << made.status();
  std::unique_ptr<LanguageModel> m = std::move(*made);
  if (randomise) Randomise(m->params(), 108);
  if (se_group > 0) m->SetSelfExtend(se_group, se_window);
  const int64_t V = spec.vocab_size, prompt_len = 7;
  const auto prompt = RandomTokens(prompt_len, V, 61);
  const auto stream = RandomTokens((rounds + 2) * k, V, 62);
  auto eager = m->NewDecodeState(1), graphed = m->NewDecodeState(1);
  LanguageModel::DecodeOptions prefill;
  prefill.heads = k;
  prefill.last_position_only = true;
  m->DecodeChunk(prompt, prompt_len, eager.get(), prefill);
  m->DecodeChunk(prompt, prompt_len, graphed.get(), prefill);
  // The eager round; returns head 1's logits [k, V] and heads 2..k's at keep - 1.
  const auto eager_round = [&](LanguageModel::DecodeState* st, std::span<const int32_t> chunk, int64_t keep,
                               std::vector<Tensor>* drafts) {
    LanguageModel::DecodeOptions o;
    o.heads = k;
    o.rewindable = true;
    o.defer_draft_logits = true;
    Tensor head1 = m->DecodeChunk(chunk, k, st, o)[0];
    EXPECT_TRUE(m->Rewind(st, keep).ok());
    *drafts = m->DraftLogits(*st, keep - 1);
    return head1;
  };
  int64_t used = 0, differing = 0, draft_differing = 0, argmax_differ = 0, replays = 0, captures = 0, grown = 0;
  int64_t nodes = 0, commit_bytes = 0;
  std::unique_ptr<SpeculativeGraph> graph;
  for (int64_t r = 0; r < rounds; ++r) {
    const int64_t keep = r % 2 == 0 ? k : 1 + (r / 2) % (k - 1);
    const std::span<const int32_t> chunk(stream.data() + used, static_cast<size_t>(k));
    std::vector<Tensor> e_drafts;
    const Tensor e = eager_round(eager.get(), chunk, keep, &e_drafts);
    if (graph == nullptr || graph->MustGrow()) {
      if (graph != nullptr) {
        const auto refused = graph->Round(chunk);
        EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition) << refused.status();
        graph.reset();
        ++grown;
      }
      // The warm-up / growth round runs eagerly on G too, then the capture.
      std::vector<Tensor> g_drafts;
      differing += DifferingRows(e, eager_round(graphed.get(), chunk, keep, &g_drafts));
      for (int64_t h = 0; h + 1 < k; ++h) draft_differing += DifferingRows(e_drafts[h], g_drafts[h]);
      absl::StatusOr<std::unique_ptr<SpeculativeGraph>> made_graph = SpeculativeGraph::Capture(m.get(), graphed.get(), k);
      ASSERT_TRUE(made_graph.ok()) << name << ": " << made_graph.status();
      graph = std::move(*made_graph);
      EXPECT_EQ(graph->all_draft_rows(), k == 2 && SpecDraftRowsAll()) << name;
      ++captures;
      nodes = graph->nodes();
      commit_bytes = graph->commit_bytes();
      used += keep;
      continue;
    }
    // The keep is forced (random chunks would keep 1 almost always); GenerateSpeculative's test
    // below runs the device's acceptance rule against the host's.
    absl::StatusOr<std::span<const int32_t>> ids = graph->Round(chunk, keep);
    ASSERT_TRUE(ids.ok()) << ids.status();
    ++replays;
    differing += DifferingRows(e, graph->logits()[0]);
    const std::vector<int32_t> want_head1 = ArgmaxRows(e), want_drafts = ArgmaxFirstRows(e_drafts);
    argmax_differ += !std::equal(want_head1.begin(), want_head1.end(), ids->begin(), ids->begin() + k);
    argmax_differ += (*ids)[2 * k - 1] != keep;
    for (int64_t h = 1; h < k; ++h) {
      draft_differing += DifferingRows(e_drafts[h - 1], graph->logits()[1].Rows(h - 1, h));
      argmax_differ += want_drafts[h - 1] != (*ids)[k + h - 1];
    }
    ASSERT_TRUE(graph->Commit(keep).ok());
    used += keep;
  }
  EXPECT_EQ(graphed->position, eager->position);
  bool refuses = false;
  if (graph != nullptr) {
    std::vector<Tensor> unused;
    eager_round(graphed.get(), std::span<const int32_t>(stream.data(), static_cast<size_t>(k)), k, &unused);
    refuses = graph->Round(std::span<const int32_t>(stream.data(), static_cast<size_t>(k))).status().code() ==
              absl::StatusCode::kFailedPrecondition;
  }
  const bool ok = differing == 0 && draft_differing == 0 && argmax_differ == 0 && replays > 0 && refuses;
  std::printf("[%s] %s speculative graph vs eager rounds B1 k%ld, %ld rounds (%ld replays, %ld captures, %ld eager "
              "growth rounds), %ld nodes, commit %.1f MB: %ld head-1 rows differ, %ld draft rows differ, %ld argmax "
              "differ; refuses after an eager round %s\n",
              ok ? "PASS" : "FAIL", name.c_str(), (long)k, (long)rounds, (long)replays, (long)captures, (long)grown,
              (long)nodes, commit_bytes / 1e6, (long)differing, (long)draft_differing, (long)argmax_differ,
              refuses ? "yes" : "NO");
  EXPECT_TRUE(ok) << name;
}

TEST_F(DecodeGpuTest, SpeculativeGraphBitwiseEqualsEagerRounds) {
  ModelSpec partial = SmallLlama();
  partial.attn_rotary_dim = 32;
  CheckSpeculativeGraph("xlstm mLSTM+sLSTM", SmallXlstm(), true, 40);
  CheckSpeculativeGraph("mamba2", SmallMamba2(), true, 40);
  CheckSpeculativeGraph("llama", SmallLlama(), true, 60);
  CheckSpeculativeGraph("llama partial-rotary 32/64", partial, true, 60);
  CheckSpeculativeGraph("llama SelfExtend G4 W8", SmallLlama(), true, 60, 4, 8);
  CheckSpeculativeGraph("mamba2+mixer", SmallMixerHybrid(), true, 60);
  for (const char* preset : {"xlstm[1:0]-125m", "mamba2-130m", "llama-125m"})
    CheckSpeculativeGraph(preset, *PresetSpec(preset), false, 30);
}

// The same at k = 2 and 3 draft heads of 4 (session 18: fewer heads where acceptance is low), and
// at k = 2 with the drafts of both positions from head 1's LM-head product (GYRE_SPEC_DRAFT_ROWS=all).
TEST_F(DecodeGpuTest, SpeculativeGraphAtFewerDraftHeadsBitwiseEqualsEagerRounds) {
  const bool was = SpecDraftRowsAll();
  for (auto [k, all_rows] : {std::pair{int64_t{2}, false}, std::pair{int64_t{2}, true}, std::pair{int64_t{3}, false}}) {
    SetSpecDraftRowsAll(all_rows);
    const std::string mode = all_rows ? " (all draft rows)" : "";
    CheckSpeculativeGraph("xlstm mLSTM+sLSTM" + mode, SmallXlstm(), true, 30, 0, 0, k);
    CheckSpeculativeGraph("mamba2" + mode, SmallMamba2(), true, 30, 0, 0, k);
    CheckSpeculativeGraph("llama" + mode, SmallLlama(), true, 60, 0, 0, k);
    CheckSpeculativeGraph("mamba2+mixer" + mode, SmallMixerHybrid(), true, 60, 0, 0, k);
    for (const char* preset : {"xlstm[1:0]-125m", "mamba2-130m"})
      CheckSpeculativeGraph(preset + mode, *PresetSpec(preset), false, 20, 0, 0, k);
  }
  SetSpecDraftRowsAll(was);
}

// The one-launch commit copies every span exactly (16-byte and 4-byte word paths, spans of
// different sizes in one launch), and leaves the bytes around each span alone.
TEST_F(DecodeGpuTest, CopySpansCopiesEverySpanExactly) {
  const std::vector<int64_t> words = {1, 3, 4, 17, 1000, 70001};  // 4-byte words a span
  int64_t total = 0;
  for (int64_t w : words) total += w + 8;
  Tensor src = Tensor::Empty({total}, DType::kI32), dst = Tensor::Empty({total}, DType::kI32);
  for (int64_t i = 0; i < total; ++i) {
    src.data<int32_t>()[i] = static_cast<int32_t>(i * 2654435761u);
    dst.data<int32_t>()[i] = -1;
  }
  const Tensor src_d = src.ToDevice(Device::kCuda), dst_d = dst.ToDevice(Device::kCuda);
  std::vector<CudaCopySpan> spans;
  int64_t at = 0, max_bytes = 0;
  for (int64_t w : words) {
    // Offsets 1 word apart from 16-byte alignment for odd spans: both word paths run.
    const int64_t off = at + (w % 2);
    spans.push_back({static_cast<char*>(dst_d.raw()) + off * 4, static_cast<const char*>(src_d.raw()) + off * 4, w * 4});
    max_bytes = std::max(max_bytes, w * 4);
    at += w + 8;
  }
  Tensor table = Tensor::Empty({static_cast<int64_t>(spans.size() * sizeof(CudaCopySpan) / 4)}, DType::kI32, Device::kCuda);
  Cuda().CopyBytes(table.raw(), Device::kCuda, spans.data(), Device::kCpu, spans.size() * sizeof(CudaCopySpan));
  CudaInfer().CopySpans(table.raw(), static_cast<int64_t>(spans.size()), max_bytes);
  const Tensor out = dst_d.ToDevice(Device::kCpu);
  int64_t wrong = 0;
  at = 0;
  for (int64_t w : words) {
    const int64_t off = at + (w % 2);
    for (int64_t i = at; i < at + w + 8; ++i) {
      const bool inside = i >= off && i < off + w;
      wrong += out.data<int32_t>()[i] != (inside ? src.data<int32_t>()[i] : -1);
    }
    at += w + 8;
  }
  std::printf("[%s] CopySpans %zu spans of 1..70001 words: %ld words wrong\n", wrong == 0 ? "PASS" : "FAIL",
              spans.size(), (long)wrong);
  EXPECT_EQ(wrong, 0);
}

// The models the Generate tests decode: every family small, and three 125M presets.
struct GenerateCase {
  std::string name;
  ModelSpec spec;
};
std::vector<GenerateCase> GenerateCases() {
  std::vector<GenerateCase> cases = {{"xlstm mLSTM+sLSTM", SmallXlstm()},
                                     {"mamba2", SmallMamba2()},
                                     {"llama", SmallLlama()},
                                     {"mamba2+mixer", SmallMixerHybrid()},
                                     {"xlstm-large", SmallXlstmLarge()}};
  for (const char* preset : {"xlstm[1:0]-125m", "mamba2-130m", "llama-125m"}) cases.push_back({preset, *PresetSpec(preset)});
  return cases;
}

// Greedy Generate with and without the graph gives the same tokens, and so does speculative
// decoding with the graph switched on; an injected capture failure falls back to the eager step
// with the reason in GenerateResult::decode_graph. Attention models replay too (their steps that
// grow a KV cache run eagerly, then the graph is captured again).
TEST_F(DecodeGpuTest, GenerateWithDecodeGraphEqualsEager) {
  std::vector<GenerateCase> cases = GenerateCases();
  const bool was = DecodeGraphEnabled(), spec_was = SpeculativeGraphEnabled();
  for (GenerateCase& c : cases) {
    c.spec.mtp_heads = 4;
    auto made = LanguageModel::Create(c.spec, DType::kF32, Device::kCuda, 8);
    ASSERT_TRUE(made.ok());
    LanguageModel* m = made->get();
    const auto prompt = RandomTokens(9, c.spec.vocab_size, 71);
    eval::GenerateOptions o;
    o.max_new_tokens = 80;  // 9 + 80 tokens: the attention models' caches grow at 64 (an eager step, a recapture)
    SetDecodeGraph(false);
    const auto eager = eval::Generate(m, prompt, o);
    SetDecodeGraph(true);
    const auto graphed = eval::Generate(m, prompt, o);
    SetSpeculativeGraph(false);
    const auto spec_dec = eval::GenerateSpeculative(m, prompt, o);
    SetSpeculativeGraph(true);  // speculative rounds replayed (ops/decode_graph.h SpeculativeGraph)
    const auto spec_graph = eval::GenerateSpeculative(m, prompt, o);
    InjectDecodeGraphFailure(true);
    const auto fallback = eval::Generate(m, prompt, o);
    const auto spec_fallback = eval::GenerateSpeculative(m, prompt, o);
    InjectDecodeGraphFailure(false);
    SetSpeculativeGraph(spec_was);
    ASSERT_TRUE(eager.ok() && graphed.ok() && spec_dec.ok() && fallback.ok() && spec_graph.ok() && spec_fallback.ok());
    const bool mode_ok = graphed->decode_graph == "graph" && spec_graph->decode_graph == "graph";
    const bool fallback_ok = absl::StartsWith(fallback->decode_graph, "eager: ") &&
                             absl::StartsWith(spec_fallback->decode_graph, "eager: ");
    // The graph's rounds see the same drafts as the eager ones: the same counts too.
    const bool same_rounds = spec_graph->forwards == spec_dec->forwards && spec_graph->accepted == spec_dec->accepted &&
                             spec_graph->drafted == spec_dec->drafted && spec_graph->proposed == spec_dec->proposed;
    const bool ok = eager->tokens == graphed->tokens && spec_dec->tokens == graphed->tokens &&
                    spec_graph->tokens == graphed->tokens && spec_fallback->tokens == graphed->tokens &&
                    fallback->tokens == eager->tokens && mode_ok && fallback_ok && same_rounds &&
                    eager->decode_graph == "eager" && spec_dec->decode_graph == "eager";
    std::printf("[%s] %s Generate 80 tokens: eager == graph %s, speculative == graph %s, speculative graph == graph "
                "%s (same rounds %s, %.2f tokens a forward), fallback == eager %s; with graph: '%s' / '%s'; injected "
                "failure: '%s' / '%s'\n",
                ok ? "PASS" : "FAIL", c.name.c_str(), eager->tokens == graphed->tokens ? "yes" : "NO",
                spec_dec->tokens == graphed->tokens ? "yes" : "NO", spec_graph->tokens == graphed->tokens ? "yes" : "NO",
                same_rounds ? "yes" : "NO", spec_graph->tokens_per_forward(),
                fallback->tokens == eager->tokens ? "yes" : "NO", graphed->decode_graph.c_str(),
                spec_graph->decode_graph.c_str(), fallback->decode_graph.c_str(), spec_fallback->decode_graph.c_str());
    EXPECT_TRUE(ok) << c.name;
  }
  SetDecodeGraph(was);
}

// GenerateSpeculative at draft_heads k = 2, 3 (of 4 MTP heads) and auto, eager rounds and graph
// rounds, gives greedy decoding's tokens, and the graph's rounds the eager ones' counts (per draft
// head too, and auto's pick).
TEST_F(DecodeGpuTest, GenerateSpeculativeAtEveryKEqualsGreedy) {
  std::vector<GenerateCase> cases = GenerateCases();
  const bool was = DecodeGraphEnabled(), spec_was = SpeculativeGraphEnabled(), rows_was = SpecDraftRowsAll();
  for (GenerateCase& c : cases) {
    c.spec.mtp_heads = 4;
    auto made = LanguageModel::Create(c.spec, DType::kF32, Device::kCuda, 8);
    ASSERT_TRUE(made.ok());
    LanguageModel* m = made->get();
    const auto prompt = RandomTokens(9, c.spec.vocab_size, 72);
    eval::GenerateOptions o;
    o.max_new_tokens = 80;
    SetDecodeGraph(true);
    const auto greedy = eval::Generate(m, prompt, o);
    ASSERT_TRUE(greedy.ok());
    // k = -1: auto (all-heads eager rounds until AutoDraftHeads settles k; the graph is captured at the pick
    // right after the deciding round: random models pick 2 after one round).
    for (auto [k, all_rows] : {std::pair{int64_t{2}, false}, std::pair{int64_t{2}, true}, std::pair{int64_t{3}, false},
                               std::pair{eval::kAutoDraftHeads, true}}) {
      o.draft_heads = k;
      o.auto_rounds = 4;
      SetSpeculativeGraph(false);
      const auto eager = eval::GenerateSpeculative(m, prompt, o);
      SetSpeculativeGraph(true);
      SetSpecDraftRowsAll(all_rows);
      const auto graphed = eval::GenerateSpeculative(m, prompt, o);
      SetSpecDraftRowsAll(rows_was);
      ASSERT_TRUE(eager.ok() && graphed.ok());
      const bool same_rounds = graphed->forwards == eager->forwards && graphed->accepted == eager->accepted &&
                               graphed->head_checked == eager->head_checked &&
                               graphed->head_accepted == eager->head_accepted &&
                               graphed->head_hits == eager->head_hits && graphed->draft_heads == eager->draft_heads;
      const bool ok = eager->tokens == greedy->tokens && graphed->tokens == greedy->tokens && same_rounds &&
                      graphed->decode_graph == "graph";
      std::printf("[%s] %s GenerateSpeculative k=%ld%s, 80 tokens: eager rounds == greedy %s, graph rounds == greedy "
                  "%s ('%s'), same rounds %s (%ld rounds, %.2f tokens a forward, ended at k %ld)\n",
                  ok ? "PASS" : "FAIL", c.name.c_str(), (long)k, all_rows ? " (all draft rows)" : "",
                  eager->tokens == greedy->tokens ? "yes" : "NO",
                  graphed->tokens == greedy->tokens ? "yes" : "NO", graphed->decode_graph.c_str(),
                  same_rounds ? "yes" : "NO", (long)graphed->forwards, graphed->tokens_per_forward(),
                  (long)graphed->draft_heads);
      EXPECT_TRUE(ok) << c.name << " k " << k;
    }
  }
  SetSpeculativeGraph(spec_was);
  SetDecodeGraph(was);
}

// ---------------------------------------------------------------- throughput

TEST_F(DecodeGpuTest, DecodeThroughput) {
  const char* on = std::getenv("GYRE_DECODE_BENCH");
  if (on == nullptr || std::string(on) != "1") GTEST_SKIP() << "set GYRE_DECODE_BENCH=1";
  for (const char* preset : {"llama-125m", "xlstm-125m", "mamba2-130m"}) {
    ModelSpec spec = *PresetSpec(preset);
    auto m = LanguageModel::Create(spec, DType::kF32, Device::kCuda, 1);
    if (!m.ok()) {
      std::printf("decode %s: %s\n", preset, m.status().ToString().c_str());
      continue;
    }
    for (int64_t B : {1, 8}) {
      auto st = (*m)->NewDecodeState(B);
      std::vector<int32_t> tok(B, 1);
      std::vector<double> ms;
      for (int i = 0; i < 16 + 64; ++i) {
        Cuda().Synchronize();
        const auto t0 = std::chrono::steady_clock::now();
        (*m)->DecodeStep(tok, st.get());
        Cuda().Synchronize();
        const double dt = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
        if (i >= 16) ms.push_back(dt);
      }
      std::sort(ms.begin(), ms.end());
      const double med = ms[ms.size() / 2];
      std::printf("decode %s batch %ld: median step %.3f ms (positions 16..80), %.1f tokens/s\n", preset, (long)B,
                  med, B * 1000.0 / med);
    }
  }
}

}  // namespace
}  // namespace gyre::ops
