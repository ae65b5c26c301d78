#include "eval/passkey.h"

#include "dataloader/tokenizer/test_paths.h"
#include "eval/test_models.h"
#include "gtest/gtest.h"

namespace gyre::eval {
namespace {

class PasskeyTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto t = Tokenizer::Load(tokenizer_testing::Gpt2Dir());
    ASSERT_TRUE(t.ok()) << t.status();
    tokenizer_ = t->release();
  }
  static void TearDownTestSuite() { delete tokenizer_; }

  std::string Text(const std::vector<int32_t>& ids, size_t begin = 0, size_t end = std::string::npos) {
    std::vector<uint32_t> u(ids.begin() + begin, end == std::string::npos ? ids.end() : ids.begin() + end);
    return *tokenizer_->Decode(u);
  }
  static Tokenizer* tokenizer_;
};
Tokenizer* PasskeyTest::tokenizer_ = nullptr;

TEST_F(PasskeyTest, PromptHasTheExactLengthAndTheKeyAtTheDepth) {
  for (int64_t length : {120, 333}) {
    for (double depth : {0.0, 0.5, 1.0}) {
      absl::StatusOr<PasskeyPrompt> p = BuildPasskeyPrompt(*tokenizer_, length, depth, "40719");
      ASSERT_TRUE(p.ok()) << p.status();
      EXPECT_EQ(static_cast<int64_t>(p->tokens.size()), length);
      const std::string text = Text(p->tokens);
      EXPECT_EQ(text.rfind("There is an important info hidden", 0), 0u) << text;
      EXPECT_NE(text.find("The pass key is 40719. Remember it. 40719 is the pass key."), std::string::npos);
      EXPECT_EQ(text.find("40719"), text.rfind("40719") - std::string(". Remember it. ").size() - 5);
      EXPECT_TRUE(text.ends_with(" What is the pass key? The pass key is")) << text;
      EXPECT_NEAR(p->depth, depth, 0.2);
      // What follows the info sentence.
      const std::string after = Text(p->tokens, p->info_offset);
      EXPECT_EQ(after.rfind(" The pass key is 40719.", 0), 0u) << after;
      if (depth == 0.0) {
        EXPECT_EQ(Text(p->tokens, 0, p->info_offset).find("grass"), std::string::npos);
      }
      if (depth == 1.0) {
        EXPECT_EQ(after.find("grass"), std::string::npos) << after;
        EXPECT_EQ(p->depth, 1.0);
      }
    }
  }
  // Depths are monotone in the info position.
  auto a = BuildPasskeyPrompt(*tokenizer_, 400, 0.25, "1"), b = BuildPasskeyPrompt(*tokenizer_, 400, 0.75, "1");
  EXPECT_LT(a->info_offset, b->info_offset);
}

TEST_F(PasskeyTest, BadRequestsAreRefused) {
  auto short_prompt = BuildPasskeyPrompt(*tokenizer_, 20, 0.5, "12345");
  ASSERT_FALSE(short_prompt.ok());
  EXPECT_NE(short_prompt.status().message().find("passkey length 20 is too short"), std::string::npos);
  EXPECT_FALSE(BuildPasskeyPrompt(*tokenizer_, 200, 1.5, "1").ok());
  auto small = ops::LanguageModel::Create(testing::TinySpec("llama", 1, 100), ops::DType::kF32, ops::Device::kCpu, 1);
  ASSERT_TRUE(small.ok());
  auto report = RunPasskey(small->get(), *tokenizer_, {});
  ASSERT_FALSE(report.ok());
  EXPECT_NE(report.status().message().find("vocabulary"), std::string::npos) << report.status();
}

TEST(PasskeyMatchesTest, ExactMatchOfTheFirstNumber) {
  EXPECT_TRUE(PasskeyMatches(" 12345.", "12345"));
  EXPECT_TRUE(PasskeyMatches("12345", "12345"));
  EXPECT_TRUE(PasskeyMatches(" is 12345 and 999", "12345"));
  EXPECT_FALSE(PasskeyMatches(" 123456", "12345"));
  EXPECT_FALSE(PasskeyMatches(" 1234", "12345"));
  EXPECT_FALSE(PasskeyMatches(" 999 12345", "12345"));
  EXPECT_FALSE(PasskeyMatches(" none", "12345"));
}

TEST_F(PasskeyTest, SelfExtendWithAWindowCoveringThePromptEqualsPlainAttention) {
  auto model = ops::LanguageModel::Create(testing::TinySpec("llama", 1, tokenizer_->vocab_size()), ops::DType::kF32,
                                          ops::Device::kCpu, 6);
  ASSERT_TRUE(model.ok());
  ops::LanguageModel* m = model->get();
  PasskeyOptions options;
  options.lengths = {96};
  options.depths = {0.0, 1.0};
  options.trials = 2;
  options.seed = 1;
  auto plain = RunPasskey(m, *tokenizer_, options);
  ASSERT_TRUE(plain.ok()) << plain.status();
  ASSERT_EQ(plain->cells.size(), 2u);
  EXPECT_EQ(plain->trials, 4);
  EXPECT_EQ(plain->cells[0].answers.size(), 2u);

  auto prompt = BuildPasskeyPrompt(*tokenizer_, 96, 0.5, "55555");
  ASSERT_TRUE(prompt.ok());
  ops::Tensor base = m->Logits(prompt->tokens, 1, 96);
  m->SetSelfExtend(4, 128);  // W >= length: every key is a neighbour
  ops::Tensor wide = m->Logits(prompt->tokens, 1, 96);
  auto extended = RunPasskey(m, *tokenizer_, options);
  m->SetSelfExtend(4, 16);   // grouped positions beyond 16 tokens: different logits
  ops::Tensor narrow = m->Logits(prompt->tokens, 1, 96);
  m->SetSelfExtend(0, 0);
  ASSERT_TRUE(extended.ok()) << extended.status();
  double wide_diff = 0, narrow_diff = 0;
  for (int64_t i = 0; i < base.numel(); ++i) {
    wide_diff = std::max(wide_diff, std::abs(base.At(i) - wide.At(i)));
    narrow_diff = std::max(narrow_diff, std::abs(base.At(i) - narrow.At(i)));
  }
  EXPECT_EQ(wide_diff, 0.0);
  EXPECT_GT(narrow_diff, 1e-6);
  for (size_t c = 0; c < plain->cells.size(); ++c) EXPECT_EQ(plain->cells[c].answers, extended->cells[c].answers);
  EXPECT_EQ(plain->correct, extended->correct);
}

}  // namespace
}  // namespace gyre::eval
