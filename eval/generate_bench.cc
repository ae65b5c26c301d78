// Greedy vs MTP self-speculative decoding, wall clock, on a model trained here for a few hundred
// steps (random weights would accept almost no drafts). Trains `--preset` with `--mtp_heads` on
// a flat uint16 token file (the first 90 %), then decodes `--prompts` prompts of
// `--prompt_len` tokens taken from the last 10 % (held out): greedy (head 1 only, the ordinary
// model's cost) and speculative (one DecodeChunk of k tokens per round + Rewind), checks that
// the outputs are equal, and prints tokens/s of both, the speed-up, tokens per forward and the
// acceptance rate. Every prompt is decoded `--repeats` times per mode; the median time counts.
// Where the outputs part, it prints the position and head 1's logit gap there (ReportDivergence).
//
//   generate_bench --tokens data/english_neox.u16 --preset llama-tiny --mtp_heads 4 --train_steps 300 --device cpu
//
// data/english_neox.u16: the golden corpus' English subset (moby-dick, python-doc, perl-doc,
// c-headers) tokenized with gpt-neox-20b, as uint16 (bench/RESULTS.md, session 3, says how).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <span>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "eval/generate.h"
#include "ops/blas_env.h"
#include "ops/cuda_backend.h"
#include "ops/cuda_infer.h"
#include "ops/decode_graph.h"
#include "ops/model.h"
#include "ops/parallel.h"
#include "ops/rng.h"
#include "ops/train_step.h"

namespace gyre::eval {
namespace {

// Where greedy and speculative outputs part: the first differing position, the two tokens, and
// head 1's logits for both at that position, recomputed over the common context in one chunked
// forward (bf16 logits, as both modes compare them). Speculative decoding verifies with a chunked
// forward and greedy decoding steps one token at a time; their bf16 activations can differ in
// the last bit (another GEMM shape, another summation order), so where the two best logits are
// within a rounding step of each other the argmax may differ. This line says whether that is the
// case (a gap of <= 2 bf16 ulps at that magnitude) or the paths really disagree.
void ReportDivergence(ops::LanguageModel* model, const std::vector<int32_t>& prompt, const std::vector<int32_t>& greedy,
                      const std::vector<int32_t>& speculative) {
  size_t i = 0;
  while (i < greedy.size() && i < speculative.size() && greedy[i] == speculative[i]) ++i;
  if (i == greedy.size() || i == speculative.size()) {
    std::printf("  diverged: lengths %zu vs %zu (one output is a prefix of the other)\n", greedy.size(), speculative.size());
    return;
  }
  std::vector<int32_t> context(prompt);
  context.insert(context.end(), greedy.begin(), greedy.begin() + static_cast<std::ptrdiff_t>(i));
  auto state = model->NewDecodeState(1);
  ops::LanguageModel::DecodeOptions options;
  options.heads = 1;
  const std::vector<ops::Tensor> logits =
      model->DecodeChunk(context, static_cast<int64_t>(context.size()), state.get(), options);
  const int64_t rows = logits[0].rows();
  const ops::Tensor row = logits[0].Rows(rows - 1, rows).To(ops::DType::kF32).ToDevice(ops::Device::kCpu);
  const float* v = row.data<float>();
  const int64_t vocab = row.cols();
  const int32_t best = Argmax(std::span<const float>(v, static_cast<size_t>(vocab)));
  const float lg = v[greedy[i]], ls = v[speculative[i]];
  // bf16 keeps 8 significant bits: one step at |x| is 2^(floor(log2|x|) - 7).
  const float ulp = std::ldexp(1.0f, std::ilogb(std::max(std::fabs(lg), 1e-30f)) - 7);
  std::printf("  diverged at new token %zu: greedy %d (logit %.4f), speculative %d (logit %.4f), best %ld (%.4f); "
              "gap %.4f = %.1f bf16 steps at that magnitude: %s\n",
              i, greedy[i], lg, speculative[i], ls, static_cast<long>(best), v[best], std::fabs(lg - ls),
              std::fabs(lg - ls) / ulp, std::fabs(lg - ls) <= 2 * ulp ? "a near-tie" : "NOT a near-tie");
}

int Main(int argc, char** argv) {
  CLI::App app{"greedy vs MTP self-speculative decoding tokens/s on a briefly trained model"};
  std::string tokens_path, preset = "llama-tiny", device = "cpu";
  int64_t mtp_heads = 4, train_steps = 300, batch = 8, seq = 128, prompts = 4, prompt_len = 32, new_tokens = 64;
  int64_t repeats = 3, d_model = 0, n_layers = 0, threads = 0, top_vocab = 0;
  double lr = 3e-3;
  app.add_option("--tokens", tokens_path, "flat little-endian uint16 token file")->required();
  app.add_option("--preset", preset, "model preset");
  app.add_option("--d_model", d_model, "override d_model (0: preset)");
  app.add_option("--n_layers", n_layers, "override n_layers (0: preset)");
  app.add_option("--mtp_heads", mtp_heads, "MTP heads (>= 2)");
  app.add_option("--train_steps", train_steps, "training steps before decoding");
  app.add_option("--batch", batch, "training batch");
  app.add_option("--seq", seq, "training sequence length");
  app.add_option("--lr", lr, "peak learning rate");
  app.add_option("--prompts", prompts, "held-out prompts");
  app.add_option("--prompt_len", prompt_len, "tokens per prompt");
  app.add_option("--new_tokens", new_tokens, "tokens generated per prompt");
  app.add_option("--repeats", repeats, "timed repeats per prompt and mode (median)");
  app.add_option("--top_vocab", top_vocab,
                 "0: the file's ids as they are (model vocab 50304); N: the N-1 most frequent training ids "
                 "keep their rank, every other id becomes N-1 (a small LM head for CPU runs)");
  app.add_option("--threads", threads, "CPU threads (0: all)");
  app.add_option("--device", device, "cpu or cuda")->check(CLI::IsMember({"cpu", "cuda"}));
  std::string decode_graph = "off";
  int64_t op_profile = 0, profile_graph_steps = 0;
  app.add_option("--profile_graph_steps", profile_graph_steps,
                 "CUDA: N > 0 brackets N more graph replays with cudaProfilerStart / Stop (run under "
                 "ncu --profile-from-start off for each node's kernel time)");
  app.add_option("--op_profile", op_profile,
                 "CUDA: N > 0 profiles N eager greedy steps per op (GPU time of each op, CudaBackend::SetOpProfiling) "
                 "and prints the busiest ops");
  app.add_option("--decode_graph", decode_graph,
                 "CUDA greedy decoding: off (eager steps), on (ops/decode_graph.h replays), both (eager and graph "
                 "alternating in every repeat, outputs compared)")
      ->check(CLI::IsMember({"off", "on", "both"}));
  std::string decode_qkv = "env";
  app.add_option("--decode_qkv", decode_qkv,
                 "CUDA: the mLSTM decode step's q, k, v maps + gates: env (GYRE_DECODE_QKV), 1 (one launch), 0 "
                 "(two launches), both (graph steps and graph greedy runs alternate 0 / 1, outputs compared)")
      ->check(CLI::IsMember({"env", "0", "1", "both"}));
  std::string spec_graph = "off";
  app.add_option("--spec_graph", spec_graph,
                 "CUDA speculative decoding: off (eager rounds), both (eager rounds and SpeculativeGraph replays, "
                 "ops/decode_graph.h, alternating in every repeat, outputs compared; a COST_SPEC_GRAPH line)")
      ->check(CLI::IsMember({"off", "both"}));
  std::string decode_rope_append = "env";
  app.add_option("--decode_rope_append", decode_rope_append,
                 "CUDA: the attention decode step's KV appends + RoPE: env (GYRE_DECODE_ROPE_APPEND), 1 (one "
                 "launch), 0 (separate launches), both (eager steps, graph steps, speculative graph rounds and the "
                 "graph Generate runs alternate 0 / 1, outputs compared: COST_ROPE_APPEND, SUMMARY_ROPE_APPEND)")
      ->check(CLI::IsMember({"env", "0", "1", "both"}));
  std::string decode_attn = "env";
  app.add_option("--decode_attn", decode_attn,
                 "CUDA: the decode attention kernel: env (GYRE_DECODE_ATTN), serial, split, cluster, both (graph steps "
                 "at the --attn_lengths cache lengths alternate serial / split on fresh states: COST_DECODE_ATTN; the "
                 "graph Generate runs too: SUMMARY_DECODE_ATTN, tokens compared but not required equal: the split "
                 "kernel sums in another order), split_cluster (the same A/B with split before and cluster after)")
      ->check(CLI::IsMember({"env", "serial", "split", "cluster", "both", "split_cluster"}));
  std::string draft_heads_list;
  app.add_option("--draft_heads", draft_heads_list,
                 "speculative decoding at other draft heads too: comma-separated k in [2, mtp_heads] or auto "
                 "(GenerateSpeculative's kAutoDraftHeads; e.g. 2,3,auto); "
                 "each k's rounds are timed (COST_SPEC_K, the graph round on CUDA) and its GenerateSpeculative runs "
                 "(graph rounds on CUDA) alternate with the others in every repeat, outputs compared with greedy "
                 "(SUMMARY_K, HEADS per-head acceptance, PICK: the k the k = mtp_heads run's acceptance and the "
                 "timed rounds predict)");
  std::string spec_draft_rows = "env";
  app.add_option("--spec_draft_rows", spec_draft_rows,
                 "--draft_heads 2's graph rounds: env (GYRE_SPEC_DRAFT_ROWS), gather, all (ops/decode_graph.h "
                 "SpecDraftRowsAll), both (the two as separate variants, alternating)")
      ->check(CLI::IsMember({"env", "gather", "all", "both"}));
  std::string attn_lengths = "64,256,1024,4096";
  app.add_option("--attn_lengths", attn_lengths, "--decode_attn both: the cache lengths timed, comma-separated");
  CLI11_PARSE(app, argc, argv);
  if (decode_attn == "serial" || decode_attn == "split") ops::SetDecodeAttnSplit(decode_attn == "split");
  if (decode_attn == "cluster") ops::SetDecodeAttnCluster(true);
  const bool attn_ab = decode_attn == "both" || decode_attn == "split_cluster";
  // The attention A/B's settings: before (false) serial or split, after (true) split or cluster.
  const bool attn_cluster_ab = decode_attn == "split_cluster";
  const auto set_attn = [&](bool after) {
    if (attn_cluster_ab) {
      ops::SetDecodeAttnCluster(after);
    } else {
      ops::SetDecodeAttnSplit(after);
    }
  };
  const char* attn_names[2] = {attn_cluster_ab ? "split" : "serial", attn_cluster_ab ? "cluster" : "split"};
  if (attn_ab && (decode_qkv == "both" || decode_rope_append == "both")) {
    std::fprintf(stderr, "--decode_attn both with another A/B: one A/B a run\n");
    return 2;
  }
  if (attn_ab) set_attn(true);  // the "after" setting; the A/B runs switch to the "before" one
  if (decode_qkv == "0" || decode_qkv == "1") ops::SetDecodeQkvOneLaunch(decode_qkv == "1");
  const bool qkv_ab = decode_qkv == "both";
  if (decode_rope_append == "0" || decode_rope_append == "1")
    ops::SetDecodeRopeAppendOneLaunch(decode_rope_append == "1");
  const bool rope_ab = decode_rope_append == "both";
  if (qkv_ab && rope_ab) {
    std::fprintf(stderr, "--decode_qkv both and --decode_rope_append both: one A/B a run\n");
    return 2;
  }
  // The A/B switch of the Generate loop's second graph run (the "before" setting: false).
  const auto set_ab = [&](bool on) {
    if (qkv_ab) ops::SetDecodeQkvOneLaunch(on);
    if (rope_ab) ops::SetDecodeRopeAppendOneLaunch(on);
    if (attn_ab) set_attn(on);
  };

  // --draft_heads (and at k = 2 --spec_draft_rows): the speculative variants run besides k = mtp_heads.
  struct Variant {
    int64_t k = 0;
    bool all_rows = false;  // GYRE_SPEC_DRAFT_ROWS=all (k = 2 graph rounds)
    std::string name;
    double round_ms = std::nan("");
  };
  const bool env_draft_rows_all = ops::SpecDraftRowsAll();
  std::vector<Variant> variants;
  for (size_t at = 0; at < draft_heads_list.size();) {
    const size_t comma = std::min(draft_heads_list.find(',', at), draft_heads_list.size());
    if (draft_heads_list.substr(at, comma - at) == "auto") {  // GenerateSpeculative picks k (kAutoDraftHeads)
      variants.push_back({kAutoDraftHeads, false, " (auto)"});
      at = comma + 1;
      continue;
    }
    const int64_t k = std::stoll(draft_heads_list.substr(at, comma - at));
    if (k < 2 || k > mtp_heads) {
      std::fprintf(stderr, "--draft_heads %ld: outside [2, mtp_heads = %ld]\n", (long)k, (long)mtp_heads);
      return 2;
    }
    const bool all = spec_draft_rows == "all" || (spec_draft_rows == "env" && env_draft_rows_all);
    if (k == 2 && spec_draft_rows == "both") {
      variants.push_back({k, false, " (drafts gathered)"});
      variants.push_back({k, true, " (drafts: all rows)"});
    } else {
      variants.push_back({k, k == 2 && all, k == 2 && all ? " (drafts: all rows)" : ""});
    }
    at = comma + 1;
  }

  std::ifstream in(tokens_path, std::ios::binary);
  const std::string raw((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (raw.empty()) {
    std::fprintf(stderr, "%s: cannot read\n", tokens_path.c_str());
    return 2;
  }
  std::vector<int32_t> data(raw.size() / 2);
  for (size_t i = 0; i < data.size(); ++i)
    data[i] = static_cast<uint8_t>(raw[2 * i]) | (static_cast<uint8_t>(raw[2 * i + 1]) << 8);
  const size_t split = data.size() * 9 / 10;
  if (top_vocab > 1) {
    std::vector<int64_t> count(65536, 0);
    for (size_t i = 0; i < split; ++i) ++count[data[i]];
    std::vector<int32_t> order(65536);
    for (int32_t i = 0; i < 65536; ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return count[a] > count[b]; });
    std::vector<int32_t> rank(65536, static_cast<int32_t>(top_vocab - 1));
    for (int64_t r = 0; r + 1 < top_vocab; ++r) rank[order[r]] = static_cast<int32_t>(r);
    int64_t other = 0;
    for (int32_t& t : data) other += (t = rank[t]) == top_vocab - 1;
    std::printf("vocabulary: %ld most frequent ids + one for the rest (%.1f %% of tokens)\n", (long)top_vocab - 1,
                100.0 * other / data.size());
  }

  gyre::v1::ModelConfig config;
  config.set_preset(preset);
  config.set_mtp_heads(mtp_heads);
  if (d_model > 0) config.set_d_model(d_model);
  if (n_layers > 0) config.set_n_layers(n_layers);
  config.set_vocab_size(top_vocab > 1 ? top_vocab : 50277);  // GPT-NeoX-20B's 50277 ids, padded to 50304
  config.set_pad_vocab_to(top_vocab > 1 ? 1 : 64);
  auto spec = ops::ResolveModelConfig(config);
  if (!spec.ok()) {
    std::fprintf(stderr, "%s\n", spec.status().ToString().c_str());
    return 2;
  }
  for (int32_t t : data)
    if (t >= spec->vocab_size) {
      std::fprintf(stderr, "token %d outside the vocabulary %ld\n", t, (long)spec->vocab_size);
      return 2;
    }
  ops::SetNumThreads(static_cast<int>(threads));
  const bool cuda = device == "cuda";
  auto model = ops::LanguageModel::Create(*spec, ops::DType::kF32, cuda ? ops::Device::kCuda : ops::Device::kCpu, 1);
  if (!model.ok()) {
    std::fprintf(stderr, "%s\n", model.status().ToString().c_str());
    return 2;
  }
  std::printf("%s, %ld parameters, mtp_heads %ld, device %s\n", preset.c_str(), (long)(*model)->NumParameters(),
              (long)mtp_heads,
              cuda ? ops::Cuda().DeviceDescription().c_str()
                   : ("cpu, " + std::to_string(ops::NumThreads()) + " threads, OpenBLAS " + ops::BlasCoreName()).c_str());

  // Training: random windows of the first 90 %.
  gyre::v1::OptimizerConfig opt;
  opt.set_lr(lr);
  gyre::v1::ScheduleConfig schedule;
  schedule.set_warmup_steps(std::min<int64_t>(50, train_steps / 5));
  schedule.set_total_steps(std::max<int64_t>(train_steps, 1));
  auto options = ops::TrainOptionsFromConfig(opt, schedule);
  if (!options.ok()) return 2;
  ops::Trainer trainer(model->get(), *options);
  ops::Rng rng(7);
  std::vector<int32_t> window(batch * (seq + 1));
  const auto t_train = std::chrono::steady_clock::now();
  for (int64_t step = 0; step < train_steps; ++step) {
    for (int64_t b = 0; b < batch; ++b) {
      const size_t off = rng.Below(split - seq - 1);
      std::copy(data.begin() + off, data.begin() + off + seq + 1, window.begin() + b * (seq + 1));
    }
    auto s = trainer.Step(window, batch, seq, step);
    if (!s.ok()) {
      std::fprintf(stderr, "step %ld: %s\n", (long)step, s.status().ToString().c_str());
      return 1;
    }
    if (step % 50 == 0 || step + 1 == train_steps) {
      std::printf("step %4ld loss %.3f heads", (long)step, s->loss.loss);
      for (double h : s->loss.head_losses) std::printf(" %.3f", h);
      std::printf("\n");
      std::fflush(stdout);
    }
  }
  std::printf("trained %ld steps in %.1f s\n", (long)train_steps,
              std::chrono::duration<double>(std::chrono::steady_clock::now() - t_train).count());

  double greedy_graph_step_ms = std::nan(""), greedy_step_ms = std::nan("");
  std::vector<double> round_k_ms(static_cast<size_t>(mtp_heads + 1), std::nan(""));  // by k: keep-k round
  // Cost of one speculative round (DecodeChunk of k = mtp_heads tokens, rewindable, deferred
  // draft logits, Rewind to all k, DraftLogits) against one greedy DecodeStep (head 1 only), at
  // positions 32.. of a fresh state: k * step / round is the speed-up full acceptance would give.
  {
    const int64_t k = mtp_heads, reps = 16;
    auto median_ms = [](std::vector<double> v) {
      if (v.empty()) return std::nan("");  // no sample (a loop cut short by a full KV cache)
      std::sort(v.begin(), v.end());
      return v[v.size() / 2];
    };
    auto sync = [&] { if (cuda) ops::Cuda().Synchronize(); };
    auto now = [] { return std::chrono::steady_clock::now(); };
    const std::vector<int32_t> warm(data.begin() + split, data.begin() + split + 32);
    ops::LanguageModel::DecodeOptions warm_options;
    auto gs = (*model)->NewDecodeState(1);
    warm_options.heads = 1;
    (*model)->DecodeChunk(warm, 32, gs.get(), warm_options);
    std::vector<double> step_ms, round_ms;
    for (int64_t r = 0; r < reps + 2; ++r) {
      const int32_t tok = data[split + 32 + r];
      sync();
      const auto t0 = now();
      (*model)->DecodeStep(std::span<const int32_t>(&tok, 1), gs.get(), 1);
      sync();
      if (r >= 2) step_ms.push_back(std::chrono::duration<double, std::milli>(now() - t0).count());
    }
    auto ss = (*model)->NewDecodeState(1);
    warm_options.heads = 0;
    (*model)->DecodeChunk(warm, 32, ss.get(), warm_options);
    ops::LanguageModel::DecodeOptions round;
    round.rewindable = true;
    round.defer_draft_logits = true;
    // A batch-1 state prefilled with the 32 warm tokens at `heads` heads (the fewer-heads rounds).
    auto prefilled = [&](int64_t heads) {
      auto st = (*model)->NewDecodeState(1);
      ops::LanguageModel::DecodeOptions pre;
      pre.heads = heads;
      pre.last_position_only = true;
      (*model)->DecodeChunk(warm, 32, st.get(), pre);
      return st;
    };
    for (int64_t r = 0; r < reps + 2; ++r) {
      const std::vector<int32_t> chunk(data.begin() + split + 32 + r * k, data.begin() + split + 32 + (r + 1) * k);
      sync();
      const auto t0 = now();
      (*model)->DecodeChunk(chunk, k, ss.get(), round);
      if (!(*model)->Rewind(ss.get(), k).ok()) return 1;
      (*model)->DraftLogits(*ss, k - 1);
      sync();
      if (r >= 2) round_ms.push_back(std::chrono::duration<double, std::milli>(now() - t0).count());
    }
    const double step = median_ms(step_ms), rnd = median_ms(round_ms);
    greedy_step_ms = step;
    round_k_ms[static_cast<size_t>(k)] = rnd;
    std::printf("COST %s: greedy step %.3f ms, speculative round of k=%ld %.3f ms (= %.2f steps); full-acceptance "
                "ceiling x%.2f\n", preset.c_str(), step, (long)k, rnd, rnd / step, k * step / rnd);
    if (cuda && spec_graph == "both") {
      // The same round replayed from a SpeculativeGraph captured on ss (the last eager round above
      // was its warm-up): Round + Commit(k) (all accepted) and Round + Commit(1) (every draft
      // rejected: the in-place commit copies the state after position 0), alternating.
      auto graph = ops::SpeculativeGraph::Capture(model->get(), ss.get(), k);
      if (!graph.ok()) {
        std::printf("COST_SPEC_GRAPH %s: %s\n", preset.c_str(), graph.status().ToString().c_str());
      } else {
        std::vector<double> keep_all_ms, keep_one_ms, eager_one_ms;
        int64_t recaptures = 0;
        for (int64_t r = 0; r < 2 * reps + 4; ++r) {
          const size_t at = split + 32 + (reps + 2) * k + r * k;
          const std::vector<int32_t> chunk(data.begin() + at, data.begin() + at + k);
          const int64_t keep = r % 2 == 0 ? k : 1;
          if ((*graph)->MustGrow()) {  // attention: an eager round grows the caches (untimed), recapture
            graph->reset();
            (*model)->DecodeChunk(chunk, k, ss.get(), round);
            if (!(*model)->Rewind(ss.get(), keep).ok()) return 1;
            (*model)->DraftLogits(*ss, keep - 1);
            graph = ops::SpeculativeGraph::Capture(model->get(), ss.get(), k);
            if (!graph.ok()) {
              std::printf("COST_SPEC_GRAPH %s: recapture: %s\n", preset.c_str(), graph.status().ToString().c_str());
              return 1;
            }
            ++recaptures;
            continue;
          }
          sync();
          const auto t0 = now();
          if (!(*graph)->Round(chunk, keep).ok() || !(*graph)->Commit(keep).ok()) return 1;
          sync();
          if (r >= 4) (keep == k ? keep_all_ms : keep_one_ms).push_back(
              std::chrono::duration<double, std::milli>(now() - t0).count());
        }
        const double all = median_ms(keep_all_ms), one = median_ms(keep_one_ms);
        round_k_ms[static_cast<size_t>(k)] = all;
        std::printf("COST_SPEC_GRAPH %s: speculative round of k=%ld %.3f ms eager (keep k), graph %.3f ms keep k, "
                    "%.3f ms keep 1 (commit %.1f MB), %ld nodes, %ld recaptures, x%.2f; full-acceptance ceiling "
                    "x%.2f\n", preset.c_str(), (long)k, rnd, all, one, (*graph)->commit_bytes() / 1e6,
                    (long)(*graph)->nodes(), (long)recaptures, rnd / all, k * step / all);
      }
    }
    if (cuda && op_profile > 0) {
      // Where a greedy step's GPU time goes (eager; events around every op): the sum is the time
      // a graph replay cannot go below (less the gaps between kernels).
      ops::Cuda().SetOpProfiling(true);
      for (int64_t r = 0; r < op_profile; ++r) {
        const int32_t tok = data[split + 100 + r];
        (*model)->DecodeStep(std::span<const int32_t>(&tok, 1), gs.get(), 1);
      }
      std::vector<ops::CudaBackend::OpTime> prof = ops::Cuda().TakeOpProfile();
      ops::Cuda().SetOpProfiling(false);
      std::sort(prof.begin(), prof.end(), [](const auto& a, const auto& b) { return a.seconds > b.seconds; });
      double busy = 0;
      int64_t calls = 0;
      for (const auto& o : prof) busy += o.seconds, calls += o.calls;
      std::printf("OPS %s: %ld eager greedy steps: GPU busy %.1f us a step in %.1f ops a step\n", preset.c_str(),
                  (long)op_profile, busy * 1e6 / op_profile, double(calls) / op_profile);
      for (size_t i = 0; i < prof.size() && i < 14; ++i) {
        std::printf("OPS   %-44s %6.1f calls  %7.1f us a step  (%5.2f us a call)\n", prof[i].label.c_str(),
                    double(prof[i].calls) / op_profile, prof[i].seconds * 1e6 / op_profile,
                    prof[i].seconds * 1e6 / std::max<int64_t>(prof[i].calls, 1));
      }
      // The profiled steps moved gs; one more eager step is the graph's warm-up.
      const int32_t tok = data[split + 99];
      (*model)->DecodeStep(std::span<const int32_t>(&tok, 1), gs.get(), 1);
    }
    if (cuda && decode_graph != "off" && qkv_ab) {
      // Graph steps with the q, k, v maps in two launches (0) and in one (1): a fresh capture on
      // gs for each, alternating three times; the medians of each setting's replays.
      std::vector<double> ms[2], eager_ms[2];
      for (int round = 0; round < 3; ++round)  // eager steps first: two launches / one, alternating
        for (int one = 0; one < 2; ++one) {
          ops::SetDecodeQkvOneLaunch(one == 1);
          for (int64_t r = 0; r < reps / 2 + 1; ++r) {
            const int32_t tok = data[split + 400 + r];
            sync();
            const auto t0 = now();
            (*model)->DecodeStep(std::span<const int32_t>(&tok, 1), gs.get(), 1);
            sync();
            if (r >= 1) eager_ms[one].push_back(std::chrono::duration<double, std::milli>(now() - t0).count());
          }
        }
      std::printf("COST_EAGER_QKV %s: eager greedy step %.3f ms with q, k, v in two launches, %.3f ms in one, x%.3f\n",
                  preset.c_str(), median_ms(eager_ms[0]), median_ms(eager_ms[1]),
                  median_ms(eager_ms[0]) / median_ms(eager_ms[1]));
      int64_t nodes[2] = {0, 0};
      bool ok = true;
      for (int round = 0; round < 3 && ok; ++round)
        for (int one = 0; one < 2 && ok; ++one) {
          ops::SetDecodeQkvOneLaunch(one == 1);
          auto graph = ops::DecodeGraph::Capture(model->get(), gs.get());
          if (!graph.ok()) {
            std::printf("COST_GRAPH_QKV %s: %s\n", preset.c_str(), graph.status().ToString().c_str());
            ok = false;
            break;
          }
          nodes[one] = (*graph)->nodes();
          for (int64_t r = 0; r < reps + 2; ++r) {
            const int32_t tok = data[split + 300 + r];
            if ((*graph)->MustGrow()) break;  // an attention model's full KV cache: fewer samples
            const auto t0 = now();
            if (!(*graph)->Step(std::span<const int32_t>(&tok, 1)).ok()) return 1;
            if (r >= 2) ms[one].push_back(std::chrono::duration<double, std::milli>(now() - t0).count());
          }
        }
      ops::SetDecodeQkvOneLaunch(true);
      if (ok) {
        std::printf("COST_GRAPH_QKV %s: graph step %.3f ms with q, k, v in two launches (%ld nodes), %.3f ms in one "
                    "(%ld nodes), x%.3f\n", preset.c_str(), median_ms(ms[0]), (long)nodes[0], median_ms(ms[1]),
                    (long)nodes[1], median_ms(ms[0]) / median_ms(ms[1]));
      }
    }
    if (cuda && rope_ab) {
      // The attention decode appends + RoPE in separate launches (0) and in one (1), alternating
      // three times, each setting on FRESH states at the same positions and tokens (the attention
      // kernel's cost grows with the cache length, so a shared state would time the later setting
      // at longer caches): a greedy state prefilled with the 32 warm tokens, eager steps, then a
      // capture and graph replays (positions 41..58, no growth); a speculative state prefilled the
      // same way, one eager round (the warm-up), a SpeculativeGraph and rounds at keep k until its
      // cache would grow. Medians.
      std::vector<double> eager_ms[2], graph_ms[2], round_ms[2];
      int64_t nodes[2] = {0, 0}, round_nodes[2] = {0, 0};
      for (int turn = 0; turn < 3; ++turn)
        for (int one = 0; one < 2; ++one) {
          ops::SetDecodeRopeAppendOneLaunch(one == 1);
          size_t at = split + 1000 + static_cast<size_t>(turn) * 200;
          auto st = (*model)->NewDecodeState(1);
          warm_options.heads = 1;
          (*model)->DecodeChunk(warm, 32, st.get(), warm_options);
          for (int64_t r = 0; r < reps / 2 + 1; ++r) {
            const int32_t tok = data[at++];
            sync();
            const auto t0 = now();
            (*model)->DecodeStep(std::span<const int32_t>(&tok, 1), st.get(), 1);
            sync();
            if (r >= 1) eager_ms[one].push_back(std::chrono::duration<double, std::milli>(now() - t0).count());
          }
          {
            auto graph = ops::DecodeGraph::Capture(model->get(), st.get());
            if (!graph.ok()) {
              std::printf("COST_ROPE_APPEND %s: %s\n", preset.c_str(), graph.status().ToString().c_str());
              return 1;
            }
            nodes[one] = (*graph)->nodes();
            for (int64_t r = 0; r < reps + 2 && !(*graph)->MustGrow(); ++r) {
              const int32_t tok = data[at++];
              const auto t0 = now();
              if (!(*graph)->Step(std::span<const int32_t>(&tok, 1)).ok()) return 1;
              if (r >= 2) graph_ms[one].push_back(std::chrono::duration<double, std::milli>(now() - t0).count());
            }
          }
          if (spec_graph != "both") continue;
          auto sst = (*model)->NewDecodeState(1);
          warm_options.heads = 0;
          (*model)->DecodeChunk(warm, 32, sst.get(), warm_options);
          {
            const std::vector<int32_t> chunk(data.begin() + at, data.begin() + at + k);
            at += k;
            (*model)->DecodeChunk(chunk, k, sst.get(), round);
            if (!(*model)->Rewind(sst.get(), k).ok()) return 1;
            (*model)->DraftLogits(*sst, k - 1);
          }
          auto sgraph = ops::SpeculativeGraph::Capture(model->get(), sst.get(), k);
          if (!sgraph.ok()) {
            std::printf("COST_ROPE_APPEND %s: speculative graph: %s\n", preset.c_str(),
                        sgraph.status().ToString().c_str());
            return 1;
          }
          round_nodes[one] = (*sgraph)->nodes();
          for (int64_t r = 0; r < reps + 2 && !(*sgraph)->MustGrow(); ++r) {
            const std::vector<int32_t> chunk(data.begin() + at, data.begin() + at + k);
            at += k;
            sync();
            const auto t0 = now();
            if (!(*sgraph)->Round(chunk, k).ok() || !(*sgraph)->Commit(k).ok()) return 1;
            sync();
            if (r >= 1) round_ms[one].push_back(std::chrono::duration<double, std::milli>(now() - t0).count());
          }
        }
      ops::SetDecodeRopeAppendOneLaunch(true);  // the Generate loop's graph runs: 1; its A/B run: 0
      std::printf("COST_ROPE_APPEND %s: eager greedy step %.3f ms separate, %.3f ms one launch (x%.3f); graph step "
                  "%.3f ms (%ld nodes, %zu samples), %.3f ms (%ld nodes, %zu samples) (x%.3f); speculative graph "
                  "round k=%ld keep k %.3f ms (%ld nodes, %zu samples), %.3f ms (%ld nodes, %zu samples) (x%.3f)\n",
                  preset.c_str(), median_ms(eager_ms[0]), median_ms(eager_ms[1]),
                  median_ms(eager_ms[0]) / median_ms(eager_ms[1]), median_ms(graph_ms[0]), (long)nodes[0],
                  graph_ms[0].size(), median_ms(graph_ms[1]), (long)nodes[1], graph_ms[1].size(),
                  median_ms(graph_ms[0]) / median_ms(graph_ms[1]), (long)k, median_ms(round_ms[0]),
                  (long)round_nodes[0], round_ms[0].size(), median_ms(round_ms[1]), (long)round_nodes[1],
                  round_ms[1].size(), median_ms(round_ms[0]) / median_ms(round_ms[1]));
    }
    if (cuda && attn_ab) {
      // The decode attention kernel, serial (0) vs split (1), at several cache lengths L: three
      // turns alternating the settings, each on a FRESH state prefilled to L in chunks of 64
      // (untimed, always under the split kernel: only the cache's size matters for the timing),
      // then a DecodeGraph captured with the setting under test and 20 replays timed (the
      // positions L+2 .. L+21, no growth). Medians per (L, setting).
      std::vector<int64_t> lengths;
      for (size_t b = 0; b < attn_lengths.size();) {
        size_t e = attn_lengths.find(',', b);
        if (e == std::string::npos) e = attn_lengths.size();
        lengths.push_back(std::stoll(attn_lengths.substr(b, e - b)));
        b = e + 1;
      }
      for (const int64_t L : lengths) {
        std::vector<double> graph_ms[2];
        for (int turn = 0; turn < 3; ++turn)
          for (int one = 0; one < 2; ++one) {
            size_t at = split + 2000 + static_cast<size_t>(turn) * 64;
            auto st = (*model)->NewDecodeState(1);
            ops::SetDecodeAttnSplit(true);
            warm_options.heads = 1;
            for (int64_t t = 0; t < L; t += 64) {
              const int64_t n = std::min<int64_t>(64, L - t);
              const std::vector<int32_t> chunk(data.begin() + at, data.begin() + at + n);
              at += n;
              (*model)->DecodeChunk(chunk, n, st.get(), warm_options);
            }
            set_attn(one == 1);
            // One eager step (a full cache grows here, untimed), then the capture.
            const int32_t first = data[at++];
            (*model)->DecodeStep(std::span<const int32_t>(&first, 1), st.get(), 1);
            auto graph = ops::DecodeGraph::Capture(model->get(), st.get());
            if (!graph.ok()) {
              std::printf("COST_DECODE_ATTN %s: %s\n", preset.c_str(), graph.status().ToString().c_str());
              return 1;
            }
            for (int64_t r = 0; r < 22 && !(*graph)->MustGrow(); ++r) {
              const int32_t tok = data[at++];
              const auto t0 = now();
              if (!(*graph)->Step(std::span<const int32_t>(&tok, 1)).ok()) return 1;
              if (r >= 2) graph_ms[one].push_back(std::chrono::duration<double, std::milli>(now() - t0).count());
            }
          }
        std::printf("COST_DECODE_ATTN %s L=%ld: graph step %.3f ms %s (%zu samples), %.3f ms %s (%zu samples), "
                    "x%.3f\n", preset.c_str(), (long)L, median_ms(graph_ms[0]), attn_names[0], graph_ms[0].size(),
                    median_ms(graph_ms[1]), attn_names[1], graph_ms[1].size(),
                    median_ms(graph_ms[0]) / median_ms(graph_ms[1]));
      }
      set_attn(true);  // the Generate loop's graph runs: the "after" kernel; its A/B runs: the "before" one
    }
    if (cuda && decode_graph != "off") {
      // The same greedy step replayed from a graph captured on the warmed state gs (the last
      // eager step above was its warm-up).
      auto graph = ops::DecodeGraph::Capture(model->get(), gs.get());
      int64_t recaptures = 0;
      if (!graph.ok()) {
        std::printf("COST_GRAPH %s: %s\n", preset.c_str(), graph.status().ToString().c_str());
      } else {
        std::vector<double> graph_ms;
        for (int64_t r = 0; r < reps + 2; ++r) {
          const int32_t tok = data[split + 32 + reps + 2 + r];
          if ((*graph)->MustGrow()) {
            // Attention models: a full KV cache grows in an eager step (untimed), then a new
            // capture (as Generate does).
            graph->reset();
            (*model)->DecodeStep(std::span<const int32_t>(&tok, 1), gs.get(), 1);
            graph = ops::DecodeGraph::Capture(model->get(), gs.get());
            if (!graph.ok()) {
              std::printf("COST_GRAPH %s: recapture: %s\n", preset.c_str(), graph.status().ToString().c_str());
              return 1;
            }
            ++recaptures;
            continue;
          }
          const auto t0 = now();
          if (!(*graph)->Step(std::span<const int32_t>(&tok, 1)).ok()) return 1;
          if (r >= 2) graph_ms.push_back(std::chrono::duration<double, std::milli>(now() - t0).count());
        }
        if (profile_graph_steps > 0) {
          ops::Cuda().Synchronize();
          ops::Cuda().ProfilerRange(true);
          for (int64_t r = 0; r < profile_graph_steps; ++r) {
            const int32_t tok = data[split + 200 + r];
            if ((*graph)->MustGrow()) break;  // an attention model's full KV cache
            if (!(*graph)->Step(std::span<const int32_t>(&tok, 1)).ok()) return 1;
          }
          ops::Cuda().ProfilerRange(false);
        }
        const double g = median_ms(graph_ms);
        greedy_graph_step_ms = g;
        std::printf("COST_GRAPH %s: greedy step %.3f ms eager, %.3f ms graph (%ld nodes, %ld recaptures), x%.2f\n",
                    preset.c_str(), step, g, (long)(*graph)->nodes(), (long)recaptures, step / g);
      }
    }
    // Rounds at fewer draft heads (--draft_heads): each variant on a fresh state prefilled with
    // heads 1..k (the others fall behind, as GenerateSpeculative's at that k), eager rounds (the
    // first two warm up), then on CUDA the round replayed from its SpeculativeGraph, keep k and
    // keep 1 alternating. The same positions and tokens for every variant; with an A/B
    // (--spec_draft_rows both) the variants alternate over two turns.
    const int turns = spec_draft_rows == "both" ? 2 : 1;
    std::vector<std::vector<double>> v_eager(variants.size()), v_all(variants.size()), v_one(variants.size());
    std::vector<std::string> v_graph(variants.size());
    for (int turn = 0; turn < turns; ++turn) {
      for (size_t vi = 0; vi < variants.size(); ++vi) {
        const int64_t kk = variants[vi].k;
        if (kk < 2) continue;  // auto: no fixed round to time
        ops::SetSpecDraftRowsAll(variants[vi].all_rows);
        auto st = prefilled(kk);
        ops::LanguageModel::DecodeOptions rk = round;
        rk.heads = kk;
        size_t at = split + 32;
        for (int64_t r = 0; r < reps / 2 + 2; ++r) {
          const std::vector<int32_t> chunk(data.begin() + at, data.begin() + at + kk);
          at += kk;
          sync();
          const auto t0 = now();
          (*model)->DecodeChunk(chunk, kk, st.get(), rk);
          if (!(*model)->Rewind(st.get(), kk).ok()) return 1;
          (*model)->DraftLogits(*st, kk - 1);
          sync();
          if (r >= 2) v_eager[vi].push_back(std::chrono::duration<double, std::milli>(now() - t0).count());
        }
        if (!(cuda && spec_graph == "both")) continue;
        auto graph = ops::SpeculativeGraph::Capture(model->get(), st.get(), kk);
        if (!graph.ok()) {
          v_graph[vi] = absl::StrCat("; graph: ", graph.status().ToString());
          continue;
        }
        for (int64_t r = 0; r < 2 * reps + 4 && !(*graph)->MustGrow(); ++r) {
          const std::vector<int32_t> chunk(data.begin() + at, data.begin() + at + kk);
          at += kk;
          const int64_t keep = r % 2 == 0 ? kk : 1;
          sync();
          const auto t0 = now();
          if (!(*graph)->Round(chunk, keep).ok() || !(*graph)->Commit(keep).ok()) return 1;
          sync();
          if (r >= 4) (keep == kk ? v_all : v_one)[vi].push_back(
              std::chrono::duration<double, std::milli>(now() - t0).count());
        }
        v_graph[vi] = absl::StrFormat(", graph %%s ms keep k, %%s ms keep 1 (commit %.1f MB, %ld nodes, drafts %s)",
                                      (*graph)->commit_bytes() / 1e6, (long)(*graph)->nodes(),
                                      (*graph)->all_draft_rows() ? "all rows" : "gathered");
      }
    }
    ops::SetSpecDraftRowsAll(env_draft_rows_all);
    for (size_t vi = 0; vi < variants.size(); ++vi) {
      const int64_t kk = variants[vi].k;
      if (kk < 2) continue;
      const bool graphed = !v_all[vi].empty();
      const double rnd_k = graphed ? median_ms(v_all[vi]) : median_ms(v_eager[vi]);
      variants[vi].round_ms = rnd_k;
      if (std::isnan(round_k_ms[static_cast<size_t>(kk)])) round_k_ms[static_cast<size_t>(kk)] = rnd_k;  // the first
      std::string line = absl::StrFormat("COST_SPEC_K %s k=%ld%s: eager round %.3f ms", preset.c_str(), (long)kk,
                                         variants[vi].name.c_str(), median_ms(v_eager[vi]));
      std::string g = v_graph[vi];
      if (graphed) {
        const size_t a = g.find("%s"), b = g.find("%s", a + 2);
        g = g.substr(0, a) + absl::StrFormat("%.3f", median_ms(v_all[vi])) + g.substr(a + 2, b - a - 2) +
            absl::StrFormat("%.3f", median_ms(v_one[vi])) + g.substr(b + 2);
      }
      line += g;
      const double base = std::isnan(greedy_graph_step_ms) ? greedy_step_ms : greedy_graph_step_ms;
      line += absl::StrFormat(" = %.2f greedy %s steps (%.3f ms)", rnd_k / base,
                              std::isnan(greedy_graph_step_ms) ? "eager" : "graph", base);
      std::printf("%s\n", line.c_str());
    }
    if (cuda && op_profile > 0) {
      // Where an eager round's GPU time goes, per k (events around every op, the decode kernels
      // included): against the greedy step's OPS lines above.
      std::vector<int64_t> ks = {mtp_heads};
      for (const Variant& v : variants)
        if (v.k >= 2 && std::find(ks.begin(), ks.end(), v.k) == ks.end()) ks.push_back(v.k);
      for (const int64_t kk : ks) {
        auto st = prefilled(kk);
        ops::LanguageModel::DecodeOptions rk = round;
        rk.heads = kk;
        size_t at = split + 500;
        for (int64_t r = 0; r < op_profile + 1; ++r) {
          if (r == 1) ops::Cuda().SetOpProfiling(true);
          const std::vector<int32_t> chunk(data.begin() + at, data.begin() + at + kk);
          at += kk;
          (*model)->DecodeChunk(chunk, kk, st.get(), rk);
          if (!(*model)->Rewind(st.get(), 1).ok()) return 1;  // keep 1: the commonest round
          (*model)->DraftLogits(*st, 0);
        }
        std::vector<ops::CudaBackend::OpTime> prof = ops::Cuda().TakeOpProfile();
        ops::Cuda().SetOpProfiling(false);
        std::sort(prof.begin(), prof.end(), [](const auto& a, const auto& b) { return a.seconds > b.seconds; });
        double busy = 0;
        int64_t calls = 0;
        for (const auto& o : prof) busy += o.seconds, calls += o.calls;
        std::printf("OPS_ROUND %s k=%ld: %ld eager rounds (keep 1): GPU busy %.1f us a round in %.1f ops a round\n",
                    preset.c_str(), (long)kk, (long)op_profile, busy * 1e6 / op_profile, double(calls) / op_profile);
        for (size_t i = 0; i < prof.size() && i < 18; ++i) {
          std::printf("OPS_ROUND   k=%ld %-44s %6.1f calls  %7.1f us a round  (%5.2f us a call)\n", (long)kk,
                      prof[i].label.c_str(), double(prof[i].calls) / op_profile,
                      prof[i].seconds * 1e6 / op_profile, prof[i].seconds * 1e6 / std::max<int64_t>(prof[i].calls, 1));
        }
      }
    }
  }

  // Decoding on held-out prompts.
  GenerateOptions gen;
  gen.max_new_tokens = new_tokens;
  double greedy_s = 0, spec_s = 0, graph_s = 0, graph_two_s = 0, spec_graph_s = 0, spec_graph_two_s = 0;
  const bool spec_graph_runs = cuda && spec_graph == "both";
  bool spec_graph_equal = true;
  std::string spec_graph_mode;
  bool qkv_equal = true, attn_equal = true;
  const bool eager_runs = !cuda || decode_graph != "on", graph_runs = cuda && decode_graph != "off";
  int64_t tokens = 0, forwards = 0, accepted = 0, drafted = 0, proposed = 0;
  bool all_equal = true;
  // Per k (mtp_heads first, then --draft_heads): seconds (median a prompt, summed), tokens, rounds,
  // per-draft-head counts summed over the prompts, outputs equal to greedy.
  struct KRuns {
    int64_t k = 0;
    double seconds = 0;
    int64_t tokens = 0, forwards = 0;
    std::vector<int64_t> checked, accepted, hits, guesses, repeats;
    bool equal = true;
    std::string mode, name;
    std::vector<int64_t> ended_k;  // per prompt: the k its rounds ended with (auto's pick)
    void Add(const GenerateResult& r, double s) {
      seconds += s;
      ended_k.push_back(r.draft_heads);
      tokens += static_cast<int64_t>(r.tokens.size());
      forwards += r.forwards;
      for (auto [sum, part] : {std::pair{&checked, &r.head_checked}, std::pair{&accepted, &r.head_accepted},
                               std::pair{&hits, &r.head_hits}, std::pair{&guesses, &r.head_guesses},
                               std::pair{&repeats, &r.head_repeats}}) {
        sum->resize(part->size(), 0);
        for (size_t i = 0; i < part->size(); ++i) (*sum)[i] += (*part)[i];
      }
      mode = r.decode_graph;
    }
  };
  std::vector<KRuns> k_runs(1 + variants.size());
  k_runs[0].k = mtp_heads;
  for (size_t i = 0; i < variants.size(); ++i) k_runs[i + 1].k = variants[i].k, k_runs[i + 1].name = variants[i].name;
  // Distinct 4-grams of the greedy outputs over all 4-grams (1: no repeated phrase; a model that
  // loops on a phrase scores low, and its heads guess the loop).
  int64_t grams = 0, distinct_grams = 0;
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  for (int64_t p = 0; p < prompts; ++p) {
    const size_t off = split + static_cast<size_t>(p) * (data.size() - split - prompt_len) / std::max<int64_t>(prompts, 1);
    std::vector<int32_t> prompt(data.begin() + off, data.begin() + off + prompt_len);
    std::vector<double> tg, ts, tgg, tgg_two, tsg, tsg_two;
    GenerateResult g, s, gg, gg_two, sg, sg_two;
    std::vector<std::vector<double>> tk(variants.size());
    std::vector<GenerateResult> sk(variants.size());
    // One run of a mode: false (the error printed, prefixed by `what`) when it failed; the repeats
    // after the first (the warm-up) keep their seconds.
    auto keep = [](const absl::StatusOr<GenerateResult>& made, int64_t r, std::vector<double>* seconds,
                   GenerateResult* out, const std::string& what) {
      if (!made.ok()) {
        std::fprintf(stderr, "%s%s\n", what.c_str(), made.status().ToString().c_str());
        return false;
      }
      if (r > 0) seconds->push_back(made->seconds);
      *out = *made;
      return true;
    };
    for (int64_t r = 0; r < repeats + 1; ++r) {  // the first run of each mode warms up
      // Eager greedy, graph greedy (ops/decode_graph.h), speculative: alternating in each repeat.
      if (eager_runs) {
        ops::SetDecodeGraph(false);
        auto gr = Generate(model->get(), prompt, gen);
        if (!keep(gr, r, &tg, &g, "")) return 1;
      }
      if (graph_runs && (qkv_ab || rope_ab || attn_ab)) {  // graph greedy with the A/B switch's "before" setting
        ops::SetDecodeGraph(true);
        set_ab(false);
        auto gr = Generate(model->get(), prompt, gen);
        set_ab(true);
        ops::SetDecodeGraph(false);
        if (!keep(gr, r, &tgg_two, &gg_two, "")) return 1;
      }
      if (graph_runs) {
        ops::SetDecodeGraph(true);
        auto gr = Generate(model->get(), prompt, gen);
        ops::SetDecodeGraph(false);
        if (!keep(gr, r, &tgg, &gg, "")) return 1;
        if (!eager_runs) g = gg, tg = tgg;
      }
      if (spec_graph_runs) ops::SetSpeculativeGraph(false);
      auto sr = GenerateSpeculative(model->get(), prompt, gen);
      if (!keep(sr, r, &ts, &s, "")) return 1;
      if (spec_graph_runs) {  // speculative rounds replayed (ops/decode_graph.h SpeculativeGraph)
        ops::SetSpeculativeGraph(true);
        auto sgr = GenerateSpeculative(model->get(), prompt, gen);
        ops::SetSpeculativeGraph(false);
        if (!keep(sgr, r, &tsg, &sg, "")) return 1;
      }
      for (size_t i = 0; i < variants.size(); ++i) {  // fewer draft heads (graph rounds on CUDA)
        if (spec_graph_runs) ops::SetSpeculativeGraph(true);
        ops::SetSpecDraftRowsAll(variants[i].all_rows);
        GenerateOptions at_k = gen;
        at_k.draft_heads = variants[i].k;
        auto kr = GenerateSpeculative(model->get(), prompt, at_k);
        ops::SetSpecDraftRowsAll(env_draft_rows_all);
        if (spec_graph_runs) ops::SetSpeculativeGraph(false);
        if (!keep(kr, r, &tk[i], &sk[i], "k=" + std::to_string(variants[i].k) + ": ")) return 1;
      }
      if (spec_graph_runs && (rope_ab || attn_ab)) {  // speculative graph, the A/B's "before" setting
        ops::SetSpeculativeGraph(true);
        set_ab(false);
        auto sgr = GenerateSpeculative(model->get(), prompt, gen);
        set_ab(true);
        ops::SetSpeculativeGraph(false);
        if (!keep(sgr, r, &tsg_two, &sg_two, "")) return 1;
      }
    }
    bool equal = g.tokens == s.tokens;
    if (graph_runs) {
      const double mgg = median(tgg);
      const bool graph_equal = gg.tokens == g.tokens;
      std::printf("prompt %ld: greedy with decode graph (%s) %.1f tok/s, equal to eager %s\n", (long)p,
                  gg.decode_graph.c_str(), gg.tokens.size() / mgg, graph_equal ? "yes" : "NO");
      equal &= graph_equal;
      graph_s += mgg;
      if (rope_ab) {
        const bool same = gg_two.tokens == gg.tokens;
        std::printf("prompt %ld: greedy graph with rope+append separate %.1f tok/s, in one launch %.1f tok/s, tokens "
                    "equal %s\n", (long)p, gg_two.tokens.size() / median(tgg_two), gg.tokens.size() / mgg,
                    same ? "yes" : "NO");
        qkv_equal &= same;
        equal &= same;
        graph_two_s += median(tgg_two);
      }
      if (attn_ab) {  // another summation order: equality reported, not required
        std::printf("prompt %ld: greedy graph with the serial attention kernel %.1f tok/s, split %.1f tok/s, tokens "
                    "equal %s\n", (long)p, gg_two.tokens.size() / median(tgg_two), gg.tokens.size() / mgg,
                    gg_two.tokens == gg.tokens ? "yes" : "no");
        attn_equal &= gg_two.tokens == gg.tokens;
        graph_two_s += median(tgg_two);
      }
      if (qkv_ab) {
        const bool same = gg_two.tokens == gg.tokens;
        std::printf("prompt %ld: greedy graph with q, k, v in two launches %.1f tok/s, in one %.1f tok/s, tokens "
                    "equal %s\n", (long)p, gg_two.tokens.size() / median(tgg_two), gg.tokens.size() / mgg,
                    same ? "yes" : "NO");
        qkv_equal &= same;
        equal &= same;
        graph_two_s += median(tgg_two);
      }
    }
    if (spec_graph_runs) {
      const bool same = sg.tokens == s.tokens && sg.accepted == s.accepted && sg.forwards == s.forwards;
      std::printf("prompt %ld: speculative eager %.1f tok/s, speculative graph (%s) %.1f tok/s (x%.2f), tokens and "
                  "rounds equal %s\n", (long)p, s.tokens.size() / median(ts), sg.decode_graph.c_str(),
                  sg.tokens.size() / median(tsg), median(ts) / median(tsg), same ? "yes" : "NO");
      spec_graph_equal &= same;
      equal &= same;
      spec_graph_s += median(tsg);
      if (rope_ab) {
        const bool same_two = sg_two.tokens == sg.tokens && sg_two.accepted == sg.accepted &&
                              sg_two.forwards == sg.forwards;
        std::printf("prompt %ld: speculative graph with rope+append separate %.1f tok/s, in one launch %.1f tok/s, "
                    "tokens and rounds equal %s\n", (long)p, sg_two.tokens.size() / median(tsg_two),
                    sg.tokens.size() / median(tsg), same_two ? "yes" : "NO");
        qkv_equal &= same_two;
        equal &= same_two;
        spec_graph_two_s += median(tsg_two);
      }
      if (attn_ab) {
        std::printf("prompt %ld: speculative graph with the serial attention kernel %.1f tok/s, split %.1f tok/s, "
                    "tokens equal %s\n", (long)p, sg_two.tokens.size() / median(tsg_two),
                    sg.tokens.size() / median(tsg), sg_two.tokens == sg.tokens ? "yes" : "no");
        attn_equal &= sg_two.tokens == sg.tokens;
        spec_graph_two_s += median(tsg_two);
      }
      spec_graph_mode = sg.decode_graph;
    }
    // The k = mtp_heads rounds: the graph's when it ran (its counts equal the eager rounds'), else eager.
    k_runs[0].Add(spec_graph_runs ? sg : s, spec_graph_runs ? median(tsg) : median(ts));
    for (size_t i = 0; i < variants.size(); ++i) {
      const bool same = sk[i].tokens == g.tokens;
      k_runs[i + 1].Add(sk[i], median(tk[i]));
      k_runs[i + 1].equal &= same;
      equal &= same;
      std::printf("prompt %ld: speculative k=%ld%s (%s) %.1f tok/s, %.2f tokens/forward, equal to greedy %s\n", (long)p,
                  (long)sk[i].draft_heads, variants[i].name.c_str(), sk[i].decode_graph.c_str(),
                  sk[i].tokens.size() / median(tk[i]), sk[i].tokens_per_forward(), same ? "yes" : "NO");
    }
    {
      std::vector<std::vector<int32_t>> seen;
      for (size_t i = 0; i + 4 <= g.tokens.size(); ++i) {
        std::vector<int32_t> gram(g.tokens.begin() + i, g.tokens.begin() + i + 4);
        ++grams;
        if (std::find(seen.begin(), seen.end(), gram) == seen.end()) {
          seen.push_back(gram);
          ++distinct_grams;
        }
      }
    }
    all_equal &= equal;
    const double mg = median(tg), ms = median(ts);
    std::printf("prompt %ld: greedy %.1f tok/s, speculative %.1f tok/s (x%.2f), %.2f tokens/forward, accepted %ld of "
                "%ld checked / %ld proposed, equal %s\n",
                (long)p, g.tokens.size() / mg, s.tokens.size() / ms, mg / ms, s.tokens_per_forward(), (long)s.accepted,
                (long)s.drafted, (long)s.proposed, equal ? "yes" : "NO");
    if (!equal) ReportDivergence(model->get(), prompt, g.tokens, s.tokens);
    greedy_s += mg;
    spec_s += ms;
    tokens += static_cast<int64_t>(s.tokens.size());
    forwards += s.forwards;
    accepted += s.accepted;
    drafted += s.drafted;
    proposed += s.proposed;
  }
  std::printf("SUMMARY %s mtp%ld %s: greedy %.1f tok/s, speculative %.1f tok/s, speed-up x%.2f, %.2f tokens/forward, "
              "acceptance %.2f of checked, %.2f of proposed, outputs equal: %s\n",
              preset.c_str(), (long)mtp_heads, device.c_str(), tokens / greedy_s, tokens / spec_s, greedy_s / spec_s,
              double(tokens) / forwards, drafted ? double(accepted) / drafted : 0.0,
              proposed ? double(accepted) / proposed : 0.0, all_equal ? "yes" : "NO");
  if (graph_runs) {
    std::printf("SUMMARY_GRAPH %s mtp%ld: greedy eager %.1f tok/s, greedy graph %.1f tok/s (x%.2f), speculative "
                "%.1f tok/s, outputs equal: %s\n", preset.c_str(), (long)mtp_heads, tokens / greedy_s, tokens / graph_s,
                greedy_s / graph_s, tokens / spec_s, all_equal ? "yes" : "NO");
  }
  if (spec_graph_runs) {
    std::printf("SUMMARY_SPEC_GRAPH %s mtp%ld: speculative eager %.1f tok/s, speculative graph %.1f tok/s (x%.2f, "
                "'%s'), greedy %.1f tok/s%s, %.2f tokens/forward, tokens equal: %s\n", preset.c_str(), (long)mtp_heads,
                tokens / spec_s, tokens / spec_graph_s, spec_s / spec_graph_s, spec_graph_mode.c_str(),
                tokens / (graph_runs ? graph_s : greedy_s), graph_runs ? " (graph)" : " (eager)",
                double(tokens) / forwards, spec_graph_equal ? "yes" : "NO");
  }
  if (graph_runs && qkv_ab) {
    std::printf("SUMMARY_QKV %s: greedy graph %.1f tok/s with q, k, v in two launches, %.1f tok/s in one (x%.3f), "
                "tokens equal: %s\n", preset.c_str(), tokens / graph_two_s, tokens / graph_s, graph_two_s / graph_s,
                qkv_equal ? "yes" : "NO");
  }
  if (graph_runs && rope_ab) {
    std::printf("SUMMARY_ROPE_APPEND %s: greedy graph %.1f tok/s with rope+append separate, %.1f tok/s in one launch "
                "(x%.3f)", preset.c_str(), tokens / graph_two_s, tokens / graph_s, graph_two_s / graph_s);
    if (spec_graph_runs) {
      std::printf("; speculative graph %.1f tok/s separate, %.1f tok/s one launch (x%.3f)", tokens / spec_graph_two_s,
                  tokens / spec_graph_s, spec_graph_two_s / spec_graph_s);
    }
    std::printf("; tokens equal: %s\n", qkv_equal ? "yes" : "NO");
  }
  if (graph_runs && attn_ab) {
    std::printf("SUMMARY_DECODE_ATTN %s: greedy graph %.1f tok/s %s, %.1f tok/s %s (x%.3f)", preset.c_str(),
                tokens / graph_two_s, attn_names[0], tokens / graph_s, attn_names[1], graph_two_s / graph_s);
    if (spec_graph_runs) {
      std::printf("; speculative graph %.1f tok/s %s, %.1f tok/s %s (x%.3f)", tokens / spec_graph_two_s, attn_names[0],
                  tokens / spec_graph_s, attn_names[1], spec_graph_two_s / spec_graph_s);
    }
    std::printf("; %s and %s tokens equal: %s (not required)\n", attn_names[0], attn_names[1],
                attn_equal ? "yes" : "no");
  }
  // Per k: tok/s against greedy (graph greedy on CUDA when it ran), tokens a round, and each draft
  // head's acceptance given the heads before it (accepted / checked) and its hit rate on its own.
  const double greedy_tok_s = tokens / (graph_runs ? graph_s : greedy_s);
  std::printf("HEADS %s: greedy outputs' distinct 4-grams %.2f (%ld of %ld)\n", preset.c_str(),
              grams ? double(distinct_grams) / grams : 0.0, (long)distinct_grams, (long)grams);
  for (const KRuns& kr : k_runs) {
    std::string heads;
    for (size_t i = 0; i < kr.checked.size(); ++i) {
      heads += absl::StrFormat("; head %ld: accepted %ld of %ld checked (%.2f), hits %ld of %ld (%.2f)", (long)i + 2,
                               (long)kr.accepted[i], (long)kr.checked[i],
                               kr.checked[i] ? double(kr.accepted[i]) / kr.checked[i] : 0.0, (long)kr.hits[i],
                               (long)kr.guesses[i], kr.guesses[i] ? double(kr.hits[i]) / kr.guesses[i] : 0.0);
      if (i > 0) heads += absl::StrFormat(", = head %ld's draft %ld times", (long)i + 1, (long)kr.repeats[i]);
    }
    std::string ended;
    if (kr.k < 2) {
      ended = " (picked k:";
      for (int64_t e : kr.ended_k) ended += absl::StrCat(" ", e);
      ended += ")";
    }
    std::printf("SUMMARY_K %s k=%s%s%s (%s): %.1f tok/s, x%.3f of greedy%s %.1f, %.3f tokens/forward%s; outputs equal "
                "to greedy: %s\n", preset.c_str(), kr.k < 2 ? "auto" : std::to_string(kr.k).c_str(), kr.name.c_str(),
                ended.c_str(), kr.mode.c_str(), kr.tokens / kr.seconds,
                (kr.tokens / kr.seconds) / greedy_tok_s, graph_runs ? " graph" : "", greedy_tok_s,
                double(kr.tokens) / std::max<int64_t>(kr.forwards, 1), heads.c_str(), kr.equal ? "yes" : "NO");
  }
  if (!variants.empty()) {
    // The prediction from the k = mtp_heads run alone: tokens a round at k from its heads'
    // conditional acceptances a_i, E(k) = 1 + a_2 + a_2 a_3 + ..., over the timed round of each
    // variant (the graph's on CUDA), against the greedy step; the measured ratio beside it.
    const KRuns& full = k_runs[0];
    const double base = std::isnan(greedy_graph_step_ms) ? greedy_step_ms : greedy_graph_step_ms;
    std::string line = absl::StrCat("PICK ", preset, ":");
    std::string best;
    double best_ratio = 0;
    for (size_t i = 0; i < k_runs.size(); ++i) {
      const int64_t kk = k_runs[i].k;
      if (kk < 2) continue;  // auto
      const double rnd = i == 0 ? round_k_ms[static_cast<size_t>(kk)] : variants[i - 1].round_ms;
      if (std::isnan(rnd)) continue;
      double expect = 1, run = 1;
      for (int64_t h = 0; h + 1 < kk; ++h) {
        run *= full.checked[h] ? double(full.accepted[h]) / full.checked[h] : 0.0;
        expect += run;
      }
      const double ratio = expect * base / rnd;
      const std::string name = absl::StrCat("k=", kk, k_runs[i].name);
      if (ratio > best_ratio) best_ratio = ratio, best = name;
      line += absl::StrFormat(" %s: E %.3f tokens a round / %.3f ms round = predicted x%.3f of greedy, measured x%.3f;",
                              name.c_str(), expect, rnd, ratio, (k_runs[i].tokens / k_runs[i].seconds) / greedy_tok_s);
    }
    std::printf("%s predicted best %s\n", line.c_str(), best.c_str());
  }
  return all_equal ? 0 : 3;
}

}  // namespace
}  // namespace gyre::eval

int main(int argc, char** argv) {
  gyre::ops::ReexecWithBestBlasCore(argv);  // OpenBLAS's AVX2/AVX-512 kernels (ops/blas_env.h)
  return gyre::eval::Main(argc, argv);
}
