// Multi-token decoding (LanguageModel::DecodeChunk) and Rewind, for every block family on the CPU:
//  - a sequence fed in chunks of several lengths gives the same logits, every head and every
//    position, as one DecodeStep per token (float64: 1e-10 relative; float32: 1e-5);
//  - after a rewindable chunk, Rewind(keep) leaves a state that continues exactly like a fresh
//    state fed only the kept prefix (all heads' logits over the following tokens, both fed
//    again as a chunk and as single steps), for every keep in 1..chunk;
//  - last_position_only returns the last position's rows, DraftLogits the deferred heads' rows;
//    misuse of Rewind is an error.
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "ops/model.h"
#include "ops/rng.h"

namespace gyre::ops {
namespace {

// Small specs of every family with 3 MTP heads; xLSTM with an sLSTM block, hybrids with the
// attention mixer (qkv conv, partial rotary) and with Llama blocks.
ModelSpec SmallSpec(const std::string& preset) {
  gyre::v1::ModelConfig c;
  c.set_preset(preset);
  c.set_d_model(8);
  c.set_vocab_size(13);
  c.set_pad_vocab_to(1);
  c.set_mtp_heads(3);
  c.set_n_layers(3);
  if (preset == "xlstm-tiny") {
    c.add_slstm_at(1);
    c.mutable_xlstm()->set_chunk_size(2);
    c.mutable_xlstm()->set_slstm_heads(2);
  }
  if (preset == "mamba2-tiny" || preset == "hybrid-tiny" || preset == "mamba2-attention-tiny") {
    c.mutable_mamba2()->set_head_dim(4);
    c.mutable_mamba2()->set_d_state(4);
    c.mutable_mamba2()->set_n_groups(2);
    c.mutable_mamba2()->set_chunk_size(2);
    c.mutable_attention()->set_num_heads(2);
    c.mutable_attention()->set_head_dim(preset == "mamba2-attention-tiny" ? 8 : 4);
    c.mutable_attention()->set_ffn_dim(12);
    if (preset != "mamba2-tiny") c.add_attention_at(1);
  }
  if (preset == "llama-tiny") {
    c.mutable_attention()->set_num_heads(4);
    c.mutable_attention()->set_num_kv_heads(2);
    c.mutable_attention()->set_head_dim(4);
    c.mutable_attention()->set_ffn_dim(12);
  }
  auto spec = ResolveModelConfig(c);
  GYRE_CHECK(spec.ok(), "%s", std::string(spec.status().message()).c_str());
  if (preset == "mamba2-attention-tiny") spec->attn_rotary_dim = 4;
  return *spec;
}

std::unique_ptr<LanguageModel> MakeModel(const ModelSpec& spec, DType dtype) {
  auto model = LanguageModel::Create(spec, dtype, Device::kCpu, 31);
  GYRE_CHECK(model.ok(), "%s", std::string(model.status().message()).c_str());
  Rng rng(32);  // away from the (often exactly 0 or 1) initial values, so every path matters
  for (Parameter* p : (*model)->params().All())
    for (int64_t i = 0; i < p->value.numel(); ++i) p->value.Set(i, p->value.At(i) + 0.3 * rng.Normal());
  return std::move(*model);
}

// Relative L2 distance between rows [r0, r0 + n) of a and rows [s0, s0 + n) of b.
double RelDiff(const Tensor& a, int64_t r0, const Tensor& b, int64_t s0, int64_t n) {
  const int64_t V = a.cols();
  double diff = 0, norm = 0;
  for (int64_t i = 0; i < n * V; ++i) {
    const double e = a.At(r0 * V + i), g = b.At(s0 * V + i);
    diff += (e - g) * (e - g);
    norm += e * e;
  }
  return std::sqrt(diff / std::max(norm, 1e-300));
}

// Tokens of position t for every sequence (position-major), from per-sequence streams [B, T].
std::vector<int32_t> Column(const std::vector<int32_t>& seqs, int64_t B, int64_t T, int64_t t0, int64_t n) {
  std::vector<int32_t> out;
  for (int64_t j = 0; j < n; ++j)
    for (int64_t b = 0; b < B; ++b) out.push_back(seqs[b * T + t0 + j]);
  return out;
}

class DecodeChunkTest : public ::testing::TestWithParam<std::string> {};

void ExpectChunksMatchSteps(const ModelSpec& spec, DType dtype, double tol) {
  auto model = MakeModel(spec, dtype);
  const int64_t B = 2, T = 11, H = spec.mtp_heads;
  const std::vector<int32_t> seqs = RandomTokens(B * T, spec.vocab_size, 33);
  std::vector<std::vector<Tensor>> steps;  // [t][head] -> [B, V]
  auto ref = model->NewDecodeState(B);
  for (int64_t t = 0; t < T; ++t) {
    std::vector<Tensor> l = model->DecodeStep(Column(seqs, B, T, t, 1), ref.get());
    for (Tensor& x : l) x = x.Clone();
    steps.push_back(l);
  }
  auto st = model->NewDecodeState(B);
  int64_t t = 0;
  for (int64_t chunk : {1, 3, 4, 2, 1}) {
    LanguageModel::DecodeOptions options;
    options.rewindable = chunk % 2 == 0;  // both paths: histories must not change the numbers
    std::vector<Tensor> l = model->DecodeChunk(Column(seqs, B, T, t, chunk), chunk, st.get(), options);
    ASSERT_EQ(static_cast<int64_t>(l.size()), H);
    for (int64_t k = 0; k < H; ++k) {
      ASSERT_EQ(l[k].rows(), chunk * B);
      for (int64_t j = 0; j < chunk; ++j)
        EXPECT_LT(RelDiff(steps[t + j][k], 0, l[k], j * B, B), tol) << "t=" << t + j << " head " << k + 1;
    }
    t += chunk;
  }
  ASSERT_EQ(t, T);
  EXPECT_EQ(st->position, T);
}

TEST_P(DecodeChunkTest, ChunksEqualStepsFloat64) { ExpectChunksMatchSteps(SmallSpec(GetParam()), DType::kF64, 1e-10); }
TEST_P(DecodeChunkTest, ChunksEqualStepsFloat32) { ExpectChunksMatchSteps(SmallSpec(GetParam()), DType::kF32, 1e-5); }

TEST_P(DecodeChunkTest, RewindEqualsFreshRunOverKeptPrefix) {
  const ModelSpec spec = SmallSpec(GetParam());
  auto model = MakeModel(spec, DType::kF64);
  const int64_t B = 2, H = spec.mtp_heads, prefix = 3, chunk = 4, after = 3;
  const int64_t T = prefix + chunk + after;
  const std::vector<int32_t> seqs = RandomTokens(B * T, spec.vocab_size, 34);
  // The continuation fed after the kept prefix (other tokens than the rejected ones).
  const std::vector<int32_t> cont = RandomTokens(B * after, spec.vocab_size, 35);
  for (int64_t keep = 1; keep <= chunk; ++keep) {
    // Fresh reference: prefix + kept tokens, then the continuation one step at a time.
    auto ref = model->NewDecodeState(B);
    for (int64_t t = 0; t < prefix + keep; ++t) model->DecodeStep(Column(seqs, B, T, t, 1), ref.get());
    std::vector<std::vector<Tensor>> expect;
    for (int64_t j = 0; j < after; ++j) {
      std::vector<int32_t> tok = {cont[j], cont[after + j]};
      std::vector<Tensor> l = model->DecodeStep(tok, ref.get());
      for (Tensor& x : l) x = x.Clone();
      expect.push_back(l);
    }
    // Speculative path: prefix, a rewindable chunk of `chunk` tokens, Rewind(keep), continuation.
    for (bool continue_as_chunk : {false, true}) {
      auto st = model->NewDecodeState(B);
      model->DecodeChunk(Column(seqs, B, T, 0, prefix), prefix, st.get(), {});
      LanguageModel::DecodeOptions options;
      options.rewindable = true;
      model->DecodeChunk(Column(seqs, B, T, prefix, chunk), chunk, st.get(), options);
      ASSERT_TRUE(model->Rewind(st.get(), keep).ok());
      EXPECT_EQ(st->position, prefix + keep);
      std::vector<int32_t> tok;
      for (int64_t j = 0; j < after; ++j)
        for (int64_t b = 0; b < B; ++b) tok.push_back(cont[b * after + j]);
      if (continue_as_chunk) {
        std::vector<Tensor> l = model->DecodeChunk(tok, after, st.get(), options);
        for (int64_t j = 0; j < after; ++j)
          for (int64_t k = 0; k < H; ++k)
            EXPECT_LT(RelDiff(expect[j][k], 0, l[k], j * B, B), 1e-10) << "keep " << keep << " j " << j << " head " << k + 1;
      } else {
        for (int64_t j = 0; j < after; ++j) {
          std::vector<int32_t> one(tok.begin() + j * B, tok.begin() + (j + 1) * B);
          std::vector<Tensor> l = model->DecodeStep(one, st.get());
          for (int64_t k = 0; k < H; ++k)
            EXPECT_LT(RelDiff(expect[j][k], 0, l[k], 0, B), 1e-10) << "keep " << keep << " j " << j << " head " << k + 1;
        }
      }
    }
  }
}

// Each MTP head, decoded, predicts what training taught it: head k's logits at decode position t
// score target t + k exactly as the training forward does (LanguageModel::Evaluate's per-head
// loss, float64). A draft row read at the wrong position (the state before or after the token, a
// head a position behind the trunk, a stale head state after a rewind) or a head paired with
// another head's target would move the sums. Decoded three ways: one step a token; chunks; and
// speculative-style rewindable chunks of 4 rewound to keep 1..4 between them.
TEST_P(DecodeChunkTest, EveryHeadScoresItsTrainingTargetsWhenDecoded) {
  const ModelSpec spec = SmallSpec(GetParam());
  auto model = MakeModel(spec, DType::kF64);
  const int64_t B = 2, T = 12, H = spec.mtp_heads;
  const std::vector<int32_t> tokens = RandomTokens(B * (T + 1), spec.vocab_size, 37);  // [B, T + 1]
  const LossResult trained = model->Evaluate(tokens, B, T, 1.0);
  ASSERT_EQ(static_cast<int64_t>(trained.head_losses.size()), H);
  // Cross-entropy sum of head k's logits rows (rows j*B + b = position t0 + j of sequence b).
  const auto add_losses = [&](const std::vector<Tensor>& logits, int64_t t0, int64_t rows_per_head,
                              std::vector<double>* sums) {
    const int64_t V = spec.vocab_size;
    for (int64_t k = 0; k < H; ++k) {
      for (int64_t r = 0; r < rows_per_head; ++r) {
        const int64_t t = t0 + r / B, b = r % B;
        if (t + k + 1 > T) continue;  // no target (training ignores it too)
        const int32_t target = tokens[b * (T + 1) + t + k + 1];
        double mx = -1e300;
        for (int64_t v = 0; v < V; ++v) mx = std::max(mx, logits[k].At(r * V + v));
        double z = 0;
        for (int64_t v = 0; v < V; ++v) z += std::exp(logits[k].At(r * V + v) - mx);
        (*sums)[k] += mx + std::log(z) - logits[k].At(r * V + target);
      }
    }
  };
  std::vector<int32_t> seqs(B * T);  // the inputs [B, T]
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) seqs[b * T + t] = tokens[b * (T + 1) + t];
  const auto expect_equal = [&](const std::vector<double>& decoded, const char* how) {
    for (int64_t k = 0; k < H; ++k) {
      EXPECT_NEAR(decoded[k], trained.head_losses[k], 1e-9 * std::abs(trained.head_losses[k]))
          << how << ": head " << k + 1;
    }
  };
  {
    std::vector<double> sums(H, 0.0);
    auto st = model->NewDecodeState(B);
    for (int64_t t = 0; t < T; ++t) add_losses(model->DecodeStep(Column(seqs, B, T, t, 1), st.get()), t, B, &sums);
    expect_equal(sums, "steps");
  }
  {
    std::vector<double> sums(H, 0.0);
    auto st = model->NewDecodeState(B);
    int64_t t = 0;
    for (int64_t chunk : {3, 1, 4, 4}) {
      add_losses(model->DecodeChunk(Column(seqs, B, T, t, chunk), chunk, st.get(), {}), t, chunk * B, &sums);
      t += chunk;
    }
    ASSERT_EQ(t, T);
    expect_equal(sums, "chunks");
  }
  {
    // Rounds as GenerateSpeculative runs them: a rewindable chunk of 4 (its rejected suffix holds
    // other tokens), Rewind(keep), the kept positions scored, the next round from there.
    std::vector<double> sums(H, 0.0);
    auto st = model->NewDecodeState(B);
    const std::vector<int32_t> junk = RandomTokens(B * 4, spec.vocab_size, 38);
    LanguageModel::DecodeOptions round;
    round.rewindable = true;
    int64_t t = 0, r = 0;
    while (t < T) {
      const int64_t chunk = std::min<int64_t>(4, T - t), keep = std::min<int64_t>(1 + r++ % 4, chunk);
      std::vector<int32_t> fed = Column(seqs, B, T, t, keep);
      for (int64_t j = keep; j < chunk; ++j)
        for (int64_t b = 0; b < B; ++b) fed.push_back(junk[j * B + b]);
      std::vector<Tensor> logits = model->DecodeChunk(fed, chunk, st.get(), round);
      for (Tensor& l : logits) l = l.Rows(0, keep * B);
      add_losses(logits, t, keep * B, &sums);
      ASSERT_TRUE(model->Rewind(st.get(), keep).ok());
      t += keep;
    }
    expect_equal(sums, "rewound rounds");
  }
}

INSTANTIATE_TEST_SUITE_P(Families, DecodeChunkTest,
                         ::testing::Values("llama-tiny", "xlstm-tiny", "mamba2-tiny", "hybrid-tiny",
                                           "mamba2-attention-tiny"),
                         [](const auto& info) {
                           std::string n = info.param;
                           for (char& ch : n) if (ch == '-') ch = '_';
                           return n;
                         });

TEST(DecodeChunkApiTest, LastPositionOnlyAndHeadSubset) {
  const ModelSpec spec = SmallSpec("xlstm-tiny");
  auto model = MakeModel(spec, DType::kF64);
  const int64_t B = 2, T = 5;
  const std::vector<int32_t> seqs = RandomTokens(B * T, spec.vocab_size, 36);
  auto a = model->NewDecodeState(B);
  auto b = model->NewDecodeState(B);
  std::vector<Tensor> full = model->DecodeChunk(Column(seqs, B, T, 0, T), T, a.get(), {});
  LanguageModel::DecodeOptions last;
  last.last_position_only = true;
  last.heads = 2;
  std::vector<Tensor> tail = model->DecodeChunk(Column(seqs, B, T, 0, T), T, b.get(), last);
  ASSERT_EQ(tail.size(), 2u);
  for (int k = 0; k < 2; ++k) {
    ASSERT_EQ(tail[k].rows(), B);
    EXPECT_LT(RelDiff(full[k], (T - 1) * B, tail[k], 0, B), 1e-12);
  }
  EXPECT_EQ(b->live_heads, 2);
  // Deferred draft logits: head 1 for every position, heads 2..3 at one chosen position.
  auto c = model->NewDecodeState(B);
  LanguageModel::DecodeOptions defer;
  defer.defer_draft_logits = true;
  std::vector<Tensor> head1 = model->DecodeChunk(Column(seqs, B, T, 0, T), T, c.get(), defer);
  ASSERT_EQ(head1.size(), 1u);
  EXPECT_LT(RelDiff(full[0], 0, head1[0], 0, T * B), 1e-12);
  for (int64_t pos : {0, 2, 4}) {
    std::vector<Tensor> drafts = model->DraftLogits(*c, pos);
    ASSERT_EQ(drafts.size(), 2u);
    for (int k = 0; k < 2; ++k) EXPECT_LT(RelDiff(full[k + 1], pos * B, drafts[k], 0, B), 1e-12) << pos;
  }
}

TEST(DecodeChunkApiTest, RewindMisuseIsAnError) {
  const ModelSpec spec = SmallSpec("mamba2-tiny");
  auto model = MakeModel(spec, DType::kF64);
  auto st = model->NewDecodeState(1);
  const std::vector<int32_t> tok = {1, 2, 3};
  model->DecodeChunk(tok, 3, st.get(), {});
  EXPECT_EQ(model->Rewind(st.get(), 1).code(), absl::StatusCode::kFailedPrecondition);
  LanguageModel::DecodeOptions options;
  options.rewindable = true;
  model->DecodeChunk(tok, 3, st.get(), options);
  EXPECT_EQ(model->Rewind(st.get(), 0).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(model->Rewind(st.get(), 4).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(model->Rewind(st.get(), 2).ok());
  EXPECT_EQ(st->position, 5);
  EXPECT_EQ(model->Rewind(st.get(), 1).code(), absl::StatusCode::kFailedPrecondition);  // once only
}

}  // namespace
}  // namespace gyre::ops
