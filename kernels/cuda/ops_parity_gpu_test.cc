// Needs a GPU: the CUDA kernels against the project's own CPU reference implementations in ops/
// (run in float64 on the same bf16-rounded inputs), so the GPU path computes the functions the
// CPU backend trains with — not just what each kernel's own test thinks they are:
//   ops::Norm (RMS, Layer+bias)       <-> NormForward / NormBackward
//   ops::Activate / ActivateBackward  <-> ActivationForward / ActivationBackward
//   ops::ApplyRope (and inverse)      <-> RopeForward / RopeBackward
//   ops::Embedding                    <-> EmbeddingForward / EmbeddingBackward
//   ops::FusedLmHeadCrossEntropy      <-> LinearCrossEntropy
//   ops::ClipGradNorm + ops::AdamW    <-> FusedAdamW
//   ops::CausalAttentionForward/Backward (RoPE inside; GQA; SelfExtend)
//                                     <-> RopeForward + AttentionForward / AttentionBackward
//                                         + RopeBackward
#include <cmath>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cuda/activations.h"
#include "kernels/cuda/adamw.h"
#include "kernels/cuda/attention.h"
#include "kernels/cuda/cross_entropy.h"
#include "kernels/cuda/embedding.h"
#include "kernels/cuda/gpu_test_util.h"
#include "kernels/cuda/norm.h"
#include "kernels/cuda/rope.h"
#include "ops/adamw.h"
#include "ops/attention.h"
#include "ops/cross_entropy.h"
#include "ops/elementwise.h"
#include "ops/grad_clip.h"
#include "ops/layers.h"
#include "ops/module.h"
#include "ops/rng.h"

namespace gyre::cuda {
namespace {

using testing::DeviceArray;
using testing::RandomBf16Values;
using testing::RandomFloats;
using testing::RelError;
using testing::Report;
using bf16 = __nv_bfloat16;

ops::Tensor F64(const ops::Shape& shape, const std::vector<float>& v) {
  ops::Tensor t = ops::Tensor::Empty(shape, ops::DType::kF64);
  for (int64_t i = 0; i < t.numel(); ++i) t.Set(i, v[i]);
  return t;
}
std::vector<double> Vec(const ops::Tensor& t) {
  std::vector<double> v(t.numel());
  for (int64_t i = 0; i < t.numel(); ++i) v[i] = t.At(i);
  return v;
}

TEST(OpsParityGpuTest, Norm) {
  std::mt19937_64 rng(21);
  for (bool layer : {false, true}) {
    const int64_t rows = 301, d = 776;
    DeviceAllocator alloc;
    ops::ParamStore store(ops::DType::kF64, ops::Device::kCpu);
    ops::Rng orng(1);
    ops::NormOptions opt;
    opt.kind = layer ? ops::NormOptions::kLayer : ops::NormOptions::kRms;
    opt.bias = layer;
    opt.eps = 1e-5;
    ops::Norm norm({&store, &orng, "n"}, d, opt);
    const auto x = RandomBf16Values(rng, rows * d, 1.f, 0.2f);
    const auto w = RandomBf16Values(rng, d, 0.2f, 1.f);
    const auto b = RandomBf16Values(rng, d, 0.2f);
    const auto dy = RandomBf16Values(rng, rows * d);
    norm.weight()->value = F64({d}, w);
    if (layer) store.Find("n.bias")->value = F64({d}, b);
    const ops::Tensor y_ref = norm.Forward(F64({rows, d}, x));
    const ops::Tensor dx_ref = norm.Backward(F64({rows, d}, dy));

    DeviceArray<bf16> d_x(&alloc, rows * d), d_w(&alloc, d), d_b(&alloc, d), d_y(&alloc, rows * d),
        d_dy(&alloc, rows * d), d_dx(&alloc, rows * d);
    DeviceArray<float> d_mean(&alloc, rows), d_rstd(&alloc, rows), d_dw(&alloc, d), d_db(&alloc, d);
    d_x.Upload(x);
    d_w.Upload(w);
    d_b.Upload(b);
    d_dy.Upload(dy);
    d_dw.Upload(std::vector<float>(d, 0.f));
    d_db.Upload(std::vector<float>(d, 0.f));
    d_y.Poison();
    d_dx.Poison();
    NormForwardArgs f;
    f.kind = layer ? NormKind::kLayer : NormKind::kRms;
    f.rows = rows;
    f.dim = d;
    f.eps = 1e-5f;
    f.x = d_x.get();
    f.weight = d_w.get();
    f.bias = layer ? d_b.get() : nullptr;
    f.y = d_y.get();
    f.mean = layer ? d_mean.get() : nullptr;
    f.rstd = d_rstd.get();
    ASSERT_TRUE(NormForward(f, nullptr).ok());
    NormBackwardArgs g;
    g.kind = f.kind;
    g.rows = rows;
    g.dim = d;
    g.dy = d_dy.get();
    g.s = d_x.get();
    g.weight = d_w.get();
    g.mean = f.mean;
    g.rstd = d_rstd.get();
    g.dx = d_dx.get();
    g.dweight = d_dw.get();
    g.dbias = layer ? d_db.get() : nullptr;
    ASSERT_TRUE(NormBackward(g, &alloc, nullptr).ok());
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const std::string name = layer ? "ops::Norm layer+bias" : "ops::Norm rms";
    const std::string shape = "rows=301 d=776";
    EXPECT_TRUE(Report(name + " y", shape, RelError(d_y.Download(), Vec(y_ref)), testing::kTolBf16));
    EXPECT_TRUE(Report(name + " dx", shape, RelError(d_dx.Download(), Vec(dx_ref)), testing::kTolBf16));
    EXPECT_TRUE(Report(name + " dw", shape, RelError(d_dw.Download(), Vec(norm.weight()->grad)), testing::kTolF32Accum));
    if (layer) {
      EXPECT_TRUE(Report(name + " db", shape, RelError(d_db.Download(), Vec(store.Find("n.bias")->grad)),
                         testing::kTolF32Accum));
    }
  }
}

TEST(OpsParityGpuTest, Activations) {
  std::mt19937_64 rng(22);
  const int64_t n = 100003;
  for (auto [ga, oa, name] : {std::tuple{ActKind::kSilu, ops::Activation::kSilu, "silu"},
                              std::tuple{ActKind::kGelu, ops::Activation::kGelu, "gelu"}}) {
    DeviceAllocator alloc;
    const auto x = RandomBf16Values(rng, n, 2.f);
    const auto dy = RandomBf16Values(rng, n);
    const ops::Tensor y_ref = ops::Activate(oa, F64({n}, x));
    const ops::Tensor dx_ref = ops::ActivateBackward(oa, F64({n}, x), F64({n}, dy));
    DeviceArray<bf16> d_x(&alloc, n), d_dy(&alloc, n), d_y(&alloc, n), d_dx(&alloc, n);
    d_x.Upload(x);
    d_dy.Upload(dy);
    d_y.Poison();
    d_dx.Poison();
    ASSERT_TRUE(ActivationForward(ga, d_x.get(), d_y.get(), n, nullptr).ok());
    ASSERT_TRUE(ActivationBackward(ga, d_x.get(), d_dy.get(), d_dx.get(), n, nullptr).ok());
    EXPECT_TRUE(Report(std::string("ops::Activate ") + name, "n=100003", RelError(d_y.Download(), Vec(y_ref)),
                       testing::kTolBf16));
    EXPECT_TRUE(Report(std::string("ops::ActivateBackward ") + name, "n=100003",
                       RelError(d_dx.Download(), Vec(dx_ref)), testing::kTolBf16));
  }
}

TEST(OpsParityGpuTest, Rope) {
  std::mt19937_64 rng(23);
  DeviceAllocator alloc;
  const int64_t batch = 2, seq = 129, heads = 3, hd = 64, rows = batch * seq;
  std::vector<int64_t> pos(seq);
  for (int64_t t = 0; t < seq; ++t) pos[t] = t;
  const auto x = RandomBf16Values(rng, rows * heads * hd);
  const ops::Tensor y_ref = ops::ApplyRope(F64({rows, heads * hd}, x), seq, heads, hd, 10000.0, pos, false);
  const ops::Tensor inv_ref = ops::ApplyRope(F64({rows, heads * hd}, x), seq, heads, hd, 10000.0, pos, true);
  RopeTable table;
  ASSERT_TRUE(BuildRopeTable(seq, hd, 10000.0, &alloc, &table).ok());
  DeviceArray<bf16> d_x(&alloc, x.size()), d_y(&alloc, x.size()), d_inv(&alloc, x.size());
  d_x.Upload(x);
  d_y.Poison();
  d_inv.Poison();
  RopeArgs a;
  a.x = d_x.get();
  a.y = d_y.get();
  a.rows = rows;
  a.seq = seq;
  a.heads = heads;
  a.row_stride = heads * hd;
  ASSERT_TRUE(RopeForward(table, a, nullptr).ok());
  a.y = d_inv.get();
  ASSERT_TRUE(RopeBackward(table, a, nullptr).ok());
  EXPECT_TRUE(Report("ops::ApplyRope", "B=2 T=129 H=3 D=64", RelError(d_y.Download(), Vec(y_ref)), testing::kTolBf16));
  EXPECT_TRUE(Report("ops::ApplyRope inverse (= bwd)", "B=2 T=129 H=3 D=64",
                     RelError(d_inv.Download(), Vec(inv_ref)), testing::kTolBf16));
}

TEST(OpsParityGpuTest, Embedding) {
  std::mt19937_64 rng(24);
  DeviceAllocator alloc;
  const int64_t vocab = 50257, d = 128, rows = 777;
  ops::ParamStore store(ops::DType::kF64, ops::Device::kCpu);
  ops::Rng orng(2);
  ops::Embedding emb({&store, &orng, "emb"}, vocab, d);
  const auto table = RandomBf16Values(rng, vocab * d);
  emb.weight()->value = F64({vocab, d}, table);
  std::vector<int32_t> ids(rows);
  for (auto& id : ids) id = static_cast<int32_t>(rng() % 50);  // many repeats
  const auto dy = RandomBf16Values(rng, rows * d);
  const ops::Tensor y_ref = emb.Forward(ids);
  emb.Backward(F64({rows, d}, dy));
  DeviceArray<bf16> d_table(&alloc, table.size()), d_y(&alloc, rows * d), d_dy(&alloc, rows * d);
  DeviceArray<float> d_dw(&alloc, vocab * d);
  DeviceArray<int32_t> d_ids(&alloc, rows);
  d_table.Upload(table);
  d_dy.Upload(dy);
  d_ids.Upload(std::vector<float>(ids.begin(), ids.end()));
  ASSERT_EQ(cudaMemset(d_dw.get(), 0, sizeof(float) * vocab * d), cudaSuccess);
  d_y.Poison();
  ASSERT_TRUE(EmbeddingForward(d_ids.get(), d_table.get(), d_y.get(), rows, vocab, d, nullptr, nullptr).ok());
  EmbeddingBackwardPlan plan;
  ASSERT_TRUE(plan.Build(ids.data(), rows, vocab, &alloc, nullptr).ok());
  ASSERT_TRUE(EmbeddingBackward(plan, d_dy.get(), d_dw.get(), d, /*overwrite=*/false, nullptr).ok());
  EXPECT_TRUE(Report("ops::Embedding fwd", "V=50257 d=128 rows=777", RelError(d_y.Download(), Vec(y_ref)), 0.0));
  EXPECT_TRUE(Report("ops::Embedding bwd", "V=50257 d=128 rows=777",
                     RelError(d_dw.Download(), Vec(emb.weight()->grad)), testing::kTolF32));
}

TEST(OpsParityGpuTest, FusedLmHeadCrossEntropy) {
  std::mt19937_64 rng(25);
  DeviceAllocator alloc;
  std::unique_ptr<GemmContext> gemm;
  CUDA_OK_OR_DIE(GemmContext::Create(&alloc, &gemm));
  const int64_t N = 97, d = 64, V = 50277;
  const auto h = RandomBf16Values(rng, N * d);
  const auto w = RandomBf16Values(rng, V * d, 0.3f);
  std::vector<int32_t> targets(N);
  for (int64_t r = 0; r < N; ++r) targets[r] = (r % 7 == 3) ? -1 : static_cast<int32_t>(rng() % V);
  const double loss_scale = 1.0 / 80.0;
  ops::Tensor dh_ref, dw_ref = ops::Tensor::Zeros({V, d}, ops::DType::kF64);
  ops::CrossEntropyOptions copt;
  copt.vocab_chunk = 4096;
  copt.row_block = 32;
  const ops::CrossEntropyResult res = ops::FusedLmHeadCrossEntropy(
      F64({N, d}, h), F64({V, d}, w), targets, loss_scale, copt, &dh_ref, &dw_ref);
  DeviceArray<bf16> d_h(&alloc, h.size()), d_w(&alloc, w.size()), d_dh(&alloc, h.size());
  DeviceArray<float> d_dw(&alloc, V * d), d_tl(&alloc, N);
  DeviceArray<int32_t> d_t(&alloc, N);
  DeviceArray<double> d_loss(&alloc, 1);
  d_h.Upload(h);
  d_w.Upload(w);
  d_t.Upload(std::vector<float>(targets.begin(), targets.end()));
  ASSERT_EQ(cudaMemset(d_dw.get(), 0, sizeof(float) * V * d), cudaSuccess);
  d_dh.Poison();
  d_loss.Poison();
  LinearCrossEntropyArgs a;
  a.tokens = N;
  a.dim = d;
  a.vocab = V;
  a.h = d_h.get();
  a.w = d_w.get();
  a.targets = d_t.get();
  a.loss_scale = static_cast<float>(loss_scale);
  a.token_loss = d_tl.get();
  a.loss_sum = d_loss.get();
  a.dh = d_dh.get();
  a.dw = d_dw.get();
  a.chunk_tokens = 40;
  ASSERT_TRUE(LinearCrossEntropy(gemm.get(), &alloc, a, nullptr).ok());
  double loss = 0;
  ASSERT_EQ(cudaMemcpy(&loss, d_loss.get(), sizeof(double), cudaMemcpyDeviceToHost), cudaSuccess);
  const std::string shape = "N=97 d=64 V=50277";
  EXPECT_TRUE(Report("ops::FusedLmHeadCE loss", shape, std::fabs(loss - res.loss) / std::fabs(res.loss),
                     testing::kTolF32Accum));
  EXPECT_TRUE(Report("ops::FusedLmHeadCE dh", shape, RelError(d_dh.Download(), Vec(dh_ref)), testing::kTolBf16));
  EXPECT_TRUE(Report("ops::FusedLmHeadCE dW", shape, RelError(d_dw.Download(), Vec(dw_ref)), testing::kTolBf16));
}

TEST(OpsParityGpuTest, ClipAndAdamW) {
  std::mt19937_64 rng(26);
  DeviceAllocator alloc;
  ops::ParamStore store(ops::DType::kF64, ops::Device::kCpu);
  struct P { const char* name; int64_t n; ops::ParamKind kind; };
  const P ps[] = {{"w", 70001, ops::ParamKind::kWeight}, {"norm", 777, ops::ParamKind::kNorm},
                  {"emb", 131073, ops::ParamKind::kEmbedding}};
  std::vector<std::unique_ptr<DeviceArray<float>>> bufs;
  std::vector<std::unique_ptr<DeviceArray<bf16>>> copies;
  std::vector<AdamWTensor> tensors;
  std::vector<ops::Parameter*> params;
  for (const P& p : ps) {
    ops::Parameter* param = store.Create(p.name, {p.n}, p.kind);
    const auto w0 = RandomFloats(rng, p.n, 0.5f);
    param->value = F64({p.n}, w0);
    params.push_back(param);
    for (int k = 0; k < 4; ++k) bufs.push_back(std::make_unique<DeviceArray<float>>(&alloc, p.n));
    const size_t base = bufs.size() - 4;
    bufs[base]->Upload(w0);
    bufs[base + 2]->Upload(std::vector<float>(p.n, 0.f));  // m = 0 (ops::AdamW starts at zero)
    bufs[base + 3]->Upload(std::vector<float>(p.n, 0.f));  // v = 0
    copies.push_back(std::make_unique<DeviceArray<bf16>>(&alloc, p.n));
    copies.back()->Poison();
    tensors.push_back({bufs[base]->get(), bufs[base + 1]->get(), bufs[base + 2]->get(), bufs[base + 3]->get(),
                       copies.back()->get(), p.n, p.kind == ops::ParamKind::kWeight});
  }
  ops::AdamWOptions oopt;
  ops::AdamW cpu(&store, oopt);
  AdamWHyper hyper;
  hyper.beta1 = oopt.beta1;
  hyper.beta2 = oopt.beta2;
  hyper.eps = oopt.eps;
  hyper.weight_decay = oopt.weight_decay;
  FusedAdamW gpu;
  ASSERT_TRUE(gpu.Init(tensors, hyper, &alloc, nullptr).ok());
  const double lr = 3e-3, max_norm = 1.0;
  for (int step = 1; step <= 3; ++step) {
    for (size_t i = 0; i < params.size(); ++i) {
      const auto g = RandomFloats(rng, params[i]->value.numel(), 0.01f);
      params[i]->grad = F64({params[i]->value.numel()}, g);
      bufs[4 * i + 1]->Upload(g);
    }
    const double norm = ops::ClipGradNorm(&store, max_norm);
    cpu.Step(lr);
    ASSERT_TRUE(gpu.Step(lr, max_norm, nullptr).ok());
    AdamWStepState st;
    ASSERT_EQ(cudaMemcpy(&st, gpu.device_state(), sizeof(st), cudaMemcpyDeviceToHost), cudaSuccess);
    std::vector<double> ref;
    std::vector<float> got;
    for (size_t i = 0; i < params.size(); ++i) {
      const auto r = Vec(params[i]->value);
      const auto gdev = bufs[4 * i]->Download();
      ref.insert(ref.end(), r.begin(), r.end());
      got.insert(got.end(), gdev.begin(), gdev.end());
    }
    const std::string shape = "step=" + std::to_string(step) + " norm=" + std::to_string(norm);
    EXPECT_TRUE(Report("ops::ClipGradNorm norm", shape, std::fabs(st.grad_norm - norm) / norm, testing::kTolF32));
    EXPECT_TRUE(Report("ops::AdamW weights", shape, RelError(got, ref), testing::kTolF32));
  }
}

// The ops/ op takes un-rotated q, k and applies RoPE itself (SelfExtend: at the grouped
// positions too); the GPU path is RopeForward (device positions) + AttentionForward, and for
// the gradients AttentionBackward + RopeBackward (dq, dk w.r.t. the un-rotated inputs).
TEST(OpsParityGpuTest, CausalAttention) {
  std::mt19937_64 rng(27);
  struct Case {
    int64_t batch, seq, heads, kv_heads, dim, group, window;
  };
  for (const Case& c : {Case{2, 150, 4, 2, 64, 0, 0}, Case{1, 133, 4, 4, 128, 0, 0},
                        Case{2, 150, 4, 2, 64, 4, 32}, Case{1, 200, 2, 1, 128, 8, 64}}) {
    DeviceAllocator alloc;
    const int64_t rows = c.batch * c.seq, H = c.heads, Hk = c.kv_heads, D = c.dim;
    const std::string shape = "B" + std::to_string(c.batch) + " T" + std::to_string(c.seq) + " H" +
                              std::to_string(H) + "/" + std::to_string(Hk) + " D" +
                              std::to_string(D) +
                              (c.group ? " SE" + std::to_string(c.group) + "," +
                                             std::to_string(c.window)
                                       : "");
    const auto q = RandomBf16Values(rng, rows * H * D);
    const auto k = RandomBf16Values(rng, rows * Hk * D);
    const auto v = RandomBf16Values(rng, rows * Hk * D);
    const auto dout = RandomBf16Values(rng, rows * H * D);
    ops::AttentionOptions opt;
    opt.heads = H;
    opt.kv_heads = Hk;
    opt.head_dim = D;
    opt.rope_theta = 10000.0;
    opt.self_extend_group = c.group;
    opt.self_extend_window = c.window;
    ops::AttentionSaved saved;
    const ops::Tensor out_ref = ops::CausalAttentionForward(
        F64({rows, H * D}, q), F64({rows, Hk * D}, k), F64({rows, Hk * D}, v), c.batch, c.seq, opt,
        &saved);

    RopeTable table;
    ASSERT_TRUE(BuildRopeTable(c.seq + c.window + 1, D, 10000.0, &alloc, &table).ok());
    DeviceArray<bf16> d_q(&alloc, q.size()), d_k(&alloc, k.size()), d_v(&alloc, v.size());
    DeviceArray<bf16> d_qr(&alloc, q.size()), d_kr(&alloc, k.size()), d_out(&alloc, q.size());
    DeviceArray<bf16> d_qg(&alloc, q.size()), d_kg(&alloc, k.size());
    DeviceArray<float> d_lse(&alloc, c.batch * H * c.seq);
    d_q.Upload(q);
    d_k.Upload(k);
    d_v.Upload(v);
    d_out.Poison();
    auto rope = [&](const bf16* x, bf16* y, int64_t heads, const int32_t* positions) {
      RopeArgs a;
      a.x = x;
      a.y = y;
      a.rows = rows;
      a.seq = c.seq;
      a.heads = heads;
      a.row_stride = heads * D;
      a.positions = positions;
      return RopeForward(table, a, nullptr);
    };
    ASSERT_TRUE(rope(d_q.get(), d_qr.get(), H, nullptr).ok());
    ASSERT_TRUE(rope(d_k.get(), d_kr.get(), Hk, nullptr).ok());
    AttentionForwardArgs fa;
    fa.shape = {c.batch, c.seq, H, Hk, D};
    fa.q = d_qr.get();
    fa.k = d_kr.get();
    fa.v = d_v.get();
    fa.out = d_out.get();
    fa.lse = d_lse.get();
    DeviceArray<int32_t> pos_q(&alloc, c.seq), pos_k(&alloc, c.seq);
    if (c.group > 0) {
      std::vector<float> pq(c.seq), pk(c.seq);
      for (int64_t t = 0; t < c.seq; ++t) {
        pq[t] = static_cast<float>(t / c.group + c.window - c.window / c.group);
        pk[t] = static_cast<float>(t / c.group);
      }
      pos_q.Upload(pq);
      pos_k.Upload(pk);
      ASSERT_TRUE(rope(d_q.get(), d_qg.get(), H, pos_q.get()).ok());
      ASSERT_TRUE(rope(d_k.get(), d_kg.get(), Hk, pos_k.get()).ok());
      fa.self_extend_group = c.group;
      fa.self_extend_window = c.window;
      fa.q_grouped = d_qg.get();
      fa.k_grouped = d_kg.get();
    }
    ASSERT_TRUE(AttentionForward(fa, nullptr).ok());
    EXPECT_TRUE(Report("ops::CausalAttentionForward", shape, RelError(d_out.Download(), Vec(out_ref)),
                       testing::kTolBf16));
    if (c.group > 0) continue;  // SelfExtend is inference-only: no GPU backward

    ops::Tensor dq_ref, dk_ref, dv_ref;
    ops::CausalAttentionBackward(saved, F64({rows, H * D}, dout), opt, &dq_ref, &dk_ref, &dv_ref);
    DeviceArray<bf16> d_dout(&alloc, q.size()), d_dqr(&alloc, q.size()), d_dkr(&alloc, k.size());
    DeviceArray<bf16> d_dq(&alloc, q.size()), d_dk(&alloc, k.size()), d_dv(&alloc, v.size());
    d_dout.Upload(dout);
    d_dq.Poison();
    d_dk.Poison();
    d_dv.Poison();
    AttentionBackwardArgs ba;
    ba.shape = fa.shape;
    ba.q = fa.q;
    ba.k = fa.k;
    ba.v = fa.v;
    ba.out = d_out.get();
    ba.dout = d_dout.get();
    ba.lse = d_lse.get();
    ba.dq = d_dqr.get();
    ba.dk = d_dkr.get();
    ba.dv = d_dv.get();
    ASSERT_TRUE(AttentionBackward(&alloc, ba, nullptr).ok());
    RopeArgs rb;
    rb.rows = rows;
    rb.seq = c.seq;
    rb.x = d_dqr.get();
    rb.y = d_dq.get();
    rb.heads = H;
    rb.row_stride = H * D;
    ASSERT_TRUE(RopeBackward(table, rb, nullptr).ok());
    rb.x = d_dkr.get();
    rb.y = d_dk.get();
    rb.heads = Hk;
    rb.row_stride = Hk * D;
    ASSERT_TRUE(RopeBackward(table, rb, nullptr).ok());
    EXPECT_TRUE(Report("ops::CausalAttentionBackward dq", shape,
                       RelError(d_dq.Download(), Vec(dq_ref)), testing::kTolBf16));
    EXPECT_TRUE(Report("ops::CausalAttentionBackward dk", shape,
                       RelError(d_dk.Download(), Vec(dk_ref)), testing::kTolBf16));
    EXPECT_TRUE(Report("ops::CausalAttentionBackward dv", shape,
                       RelError(d_dv.Download(), Vec(dv_ref)), testing::kTolBf16));
  }
}

}  // namespace
}  // namespace gyre::cuda
