// `gyre eval` on a real run: a 1-worker `gyre launch --local` trains a tiny Llama with two MTP
// heads for 8 steps, checkpointing every 4; then each mode runs against the run directory as a
// user would run it, and its JSON is checked (checkpoint choice, shapes, consistency between
// modes and with the unit-tested invariants: speculative == greedy, SelfExtend with a window that
// covers the prompt == plain attention). Bad input must exit non-zero.
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include "dataloader/tokenizer/test_paths.h"
#include "gtest/gtest.h"
#include "tests/e2e/e2e_util.h"

namespace gyre::e2e {
namespace {

namespace fs = std::filesystem;

nlohmann::json EvalJson(const std::string& run_dir, const std::vector<std::string>& mode_args, int* code = nullptr) {
  std::vector<std::string> args = {Bin("gyre"), "eval", "--run_dir", run_dir, "--json"};
  args.insert(args.end(), mode_args.begin(), mode_args.end());
  CommandResult r = RunCommand(args);
  if (code != nullptr) *code = r.code;
  if (r.code != 0) return nlohmann::json();
  return nlohmann::json::parse(r.out, nullptr, /*allow_exceptions=*/false);
}

TEST(EvalTest, EveryModeOnATrainedRun) {
  const std::string root = TestTmp() + "/eval";
  const std::string index = root + "/index";
  ASSERT_TRUE(PrepareGoldenIndex(index));
  const std::string gpt2 = tokenizer_testing::Gpt2Dir();
  // A validation source for the in-run evaluation (the split comes from the "val" file name).
  fs::create_directories(root + "/val");
  fs::copy_file(tokenizer_testing::Runfile("tools/golden/corpus.jsonl.zst"), root + "/val/val.jsonl.zst",
                fs::copy_options::overwrite_existing);
  ASSERT_EQ(RunCommand({Bin("gyre"), "prepare", "--tokenizer", gpt2, "--out", index, "--source", "golden",
                        "--threads", "2", root + "/val/val.jsonl.zst"})
                .code,
            0);
  LocalRun run(root, "evalrun",
               "seed: 5\n"
               "model { preset: \"llama-tiny\" vocab_size: 50257 mtp_heads: 2 }\n"
               "data { index_dir: \"@INDEX@\" seq_len: 32 global_batch: 4 tokenizer: \"" + gpt2 + "\" }\n"
               "optimizer { lr: 0.003 }\n"
               "schedule { warmup_steps: 2 total_steps: 8 }\n"
               "train { max_steps: 8 eval_every_steps: 4 eval_samples_per_source: 2 }\n"
               "checkpoint { every_steps: 4 keep_last: 3 }\n"
               "cluster { desired_workers: 1 heartbeat_interval_ms: 200 heartbeat_timeout_ms: 5000 }\n");
  ASSERT_TRUE(run.Launch(1));
  int code = -1;
  const bool finished = run.WaitForExit(240, &code);
  if (!finished) run.DumpLogs();
  ASSERT_TRUE(finished) << "launcher exit code " << code;

  // In-run evaluation (train.eval_every_steps 4): before step 4 only, journaled with that step.
  Ledger ledger = run.ReadLedger();
  ASSERT_EQ(ledger.steps.size(), 8u) << ledger.summary;
  for (const LedgerStep& s : ledger.steps) {
    if (s.step == 4) {
      EXPECT_TRUE(std::isfinite(s.eval_loss) && s.eval_loss > 0 && s.eval_loss < 12) << s.eval_loss;
    } else {
      EXPECT_EQ(s.eval_loss, -1) << "step " << s.step;
    }
  }

  // Perplexity (naming the training source is allowed and reported).
  nlohmann::json ppl = EvalJson(run.run_dir(), {"perplexity", "--sources", "golden", "--samples", "4"});
  ASSERT_TRUE(ppl.is_object()) << "gyre eval perplexity failed";
  EXPECT_EQ(ppl["step"], 8);
  EXPECT_EQ(ppl["seq_len"], 32);
  ASSERT_EQ(ppl["sources"].size(), 1u);
  EXPECT_EQ(ppl["sources"][0]["split"], "train");
  EXPECT_EQ(ppl["sources"][0]["tokens"], 4 * 32);
  const double loss8 = ppl["overall"]["loss"];
  EXPECT_TRUE(std::isfinite(loss8) && loss8 > 0 && loss8 < 12) << loss8;
  EXPECT_NEAR(double(ppl["overall"]["perplexity"]), std::exp(loss8), 1e-6 * std::exp(loss8));
  nlohmann::json ppl4 = EvalJson(run.run_dir(), {"--step", "4", "perplexity", "--sources", "golden", "--samples", "4"});
  ASSERT_TRUE(ppl4.is_object());
  EXPECT_EQ(ppl4["step"], 4);
  EXPECT_NE(double(ppl4["overall"]["loss"]), loss8);  // other parameters, same windows

  // Generation: speculative (2 heads) equals greedy; sampling with a seed is reproducible.
  nlohmann::json spec = EvalJson(run.run_dir(), {"generate", "--prompt", "The kernel", "--max_new_tokens", "10",
                                                 "--speculative", "--compare_greedy"});
  ASSERT_TRUE(spec.is_object()) << "speculative generation failed or differed from greedy";
  EXPECT_EQ(spec["equals_greedy"], true);
  EXPECT_EQ(spec["tokens"].size(), 10u);
  EXPECT_GE(double(spec["tokens_per_forward"]), 1.0);
  std::vector<std::string> sample = {"generate", "--prompt", "The kernel", "--max_new_tokens", "6",
                                     "--temperature", "0.8", "--top_p", "0.9", "--seed", "3"};
  nlohmann::json s1 = EvalJson(run.run_dir(), sample), s2 = EvalJson(run.run_dir(), sample);
  ASSERT_TRUE(s1.is_object() && s2.is_object());
  EXPECT_EQ(s1["tokens"], s2["tokens"]);

  // Spectrum of the 50257 x 64 head, anisotropy on 2 windows of the index.
  nlohmann::json sp = EvalJson(run.run_dir(), {"spectrum", "--sources", "golden", "--anisotropy_batch", "2",
                                               "--anisotropy_seq", "32", "--ranks", "1,16,64"});
  ASSERT_TRUE(sp.is_object()) << "gyre eval spectrum failed";
  const int64_t d = sp["d_model"];
  EXPECT_EQ(sp["singular_values"].size(), static_cast<size_t>(d));
  EXPECT_EQ(sp["vocab"], 50304);  // 50257 padded to a multiple of 64
  EXPECT_LE(double(sp["effective_rank"]), double(d));
  EXPECT_GE(double(sp["stable_rank"]), 1.0);
  EXPECT_NEAR(double(sp["w_error"][std::to_string(d)]), 0.0, 1e-6);
  const double aniso = sp["anisotropy"]["value"];
  EXPECT_TRUE(aniso >= -1 && aniso <= 1) << aniso;
  const double residual = sp["anisotropy_residual"];  // llama: final RMSNorm, recoverable
  EXPECT_TRUE(residual >= -1 && residual <= 1) << residual;

  std::fprintf(stderr, "step 8 loss %.4f (step 4: %.4f); speculative %.2f tokens/forward; effective rank %.2f of %ld, "
               "anisotropy %.4f\n", loss8, double(ppl4["overall"]["loss"]), double(spec["tokens_per_forward"]),
               double(sp["effective_rank"]), static_cast<long>(d), aniso);

  // The spectrum over training: checkpoints 4 and 8 in order, the last one equal to the above.
  nlohmann::json over = EvalJson(run.run_dir(), {"spectrum", "--all_checkpoints", "--sources", "golden",
                                                 "--anisotropy_batch", "2", "--anisotropy_seq", "32", "--ranks", "1,16,64"});
  ASSERT_TRUE(over.is_object()) << "gyre eval spectrum --all_checkpoints failed";
  ASSERT_EQ(over["checkpoints"].size(), 2u);
  EXPECT_EQ(over["checkpoints"][0]["step"], 4);
  EXPECT_EQ(over["checkpoints"][1]["step"], 8);
  EXPECT_EQ(over["checkpoints"][1]["singular_values"], sp["singular_values"]);
  EXPECT_EQ(over["checkpoints"][1]["anisotropy"]["value"], sp["anisotropy"]["value"]);
  EXPECT_NE(over["checkpoints"][0]["singular_values"], sp["singular_values"]);

  // Passkey: mechanics only (a tiny model will not retrieve); SelfExtend with W >= length is plain.
  const std::vector<std::string> pk = {"passkey", "--lengths", "96", "--depths", "0,1", "--trials", "1"};
  nlohmann::json plain = EvalJson(run.run_dir(), pk);
  std::vector<std::string> pk_se = pk;
  pk_se.insert(pk_se.end(), {"--self_extend", "4,128"});
  nlohmann::json extended = EvalJson(run.run_dir(), pk_se);
  ASSERT_TRUE(plain.is_object() && extended.is_object()) << "gyre eval passkey failed";
  ASSERT_EQ(plain["cells"].size(), 2u);
  for (size_t i = 0; i < 2; ++i) EXPECT_EQ(plain["cells"][i]["answers"], extended["cells"][i]["answers"]);
  EXPECT_EQ(plain["supported_length"], 32);                  // data.seq_len
  EXPECT_EQ(extended["supported_length"], 32);               // W = 128 >= L: no extension
  pk_se.back() = "4,8";
  nlohmann::json grouped = EvalJson(run.run_dir(), pk_se);
  ASSERT_TRUE(grouped.is_object());
  EXPECT_EQ(grouped["supported_length"], (32 - 8) * 4 + 8);  // (L - W) G + W

  // Export: safetensors + config.json of the next-token model (the MTP head 2 is left out).
  CommandResult exported = RunCommand({Bin("gyre"), "export", "--run_dir", run.run_dir(), "--out", root + "/hf"});
  EXPECT_EQ(exported.code, 0);
  EXPECT_NE(exported.out.find("exported step 8"), std::string::npos) << exported.out;
  EXPECT_NE(exported.out.find("left out"), std::string::npos) << exported.out;

  // Bad input: missing run, missing step, bad flag value, prompt longer than data.seq_len.
  int rc = 0;
  EvalJson(root + "/no-such-run", {"spectrum"}, &rc);
  EXPECT_EQ(rc, 1);
  EvalJson(run.run_dir(), {"--step", "5", "spectrum"}, &rc);
  EXPECT_EQ(rc, 1);
  EvalJson(run.run_dir(), {"passkey", "--lengths", "12x"}, &rc);
  EXPECT_EQ(rc, 1);
  EvalJson(run.run_dir(), {"generate", "--prompt_ids", "1,2,3", "--max_new_tokens", "40"}, &rc);
  EXPECT_EQ(rc, 1);
  EvalJson(run.run_dir(), {"generate", "--no_such_flag"}, &rc);
  EXPECT_NE(rc, 0);

  // --all_checkpoints passes over a checkpoint whose parameters do not verify (one byte flipped
  // in every tensor file of step 4; its MANIFEST still parses) and measures the rest.
  int flipped = 0;
  for (const auto& f : fs::directory_iterator(run.run_dir() + "/checkpoints/step-4")) {
    if (f.path().filename() == "MANIFEST" || fs::file_size(f.path()) == 0) continue;
    std::fstream io(f.path(), std::ios::in | std::ios::out | std::ios::binary);
    char c = 0;
    io.get(c);
    io.seekp(0);
    io.put(static_cast<char>(c ^ 0x5a));
    ++flipped;
  }
  ASSERT_GT(flipped, 0);
  nlohmann::json rest = EvalJson(run.run_dir(), {"spectrum", "--all_checkpoints", "--sources", "golden",
                                                 "--anisotropy_batch", "2", "--anisotropy_seq", "32", "--ranks", "1,16,64"});
  ASSERT_TRUE(rest.is_object()) << "gyre eval spectrum --all_checkpoints with step 4 corrupt failed";
  ASSERT_EQ(rest["checkpoints"].size(), 1u);
  EXPECT_EQ(rest["checkpoints"][0]["step"], 8);
  EXPECT_EQ(rest["checkpoints"][0]["singular_values"], sp["singular_values"]);
}

}  // namespace
}  // namespace gyre::e2e
