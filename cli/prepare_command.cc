// `gyre prepare --tokenizer PATH --out DIR [inputs/globs/dirs...] [--source-field F | --source S]
//               [--threads N] [--max-bad-fraction X] [--max-shard-tokens N]
//               [--doc-index none|validation|all]`
//
// Tokenizes corpus files into token shards + the RocksDB index (dataloader/prepare.h says how).
// Progress on stderr (input MB/s, docs/s, tokens/s, ETA); a per-source summary at the end.
// Ctrl-C stops at the next line: registered inputs stay, the rest is redone by re-running the
// same command (a second Ctrl-C kills at once, which is just as safe, only less tidy).
// Exit status: 0 all inputs registered, 1 some input failed or the job failed, 2 bad flags,
// 130 interrupted.
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/strings/str_format.h"
#include "base/clock.h"
#include "base/env.h"
#include "cli/commands.h"
#include "dataloader/prepare.h"
#include "dataloader/tokenizer/tokenizer.h"

namespace gyre::cli {
namespace {

std::atomic<bool> g_interrupted{false};

void OnSigint(int) {
  g_interrupted.store(true);
  ::signal(SIGINT, SIG_DFL);  // a second Ctrl-C ends the process
}

class TokenizerEncoder final : public data::DocumentEncoder {
 public:
  explicit TokenizerEncoder(std::unique_ptr<Tokenizer> t) : t_(std::move(t)) {}
  void Encode(std::string_view text, std::vector<uint32_t>* ids) const override {
    t_->Encode(text, ids);
  }
  uint32_t eos_id() const override { return t_->eos_id(); }
  uint32_t vocab_size() const override { return t_->vocab_size(); }
  uint64_t fingerprint() const override { return t_->fingerprint(); }
  std::string name() const override { return t_->name(); }

 private:
  std::unique_ptr<Tokenizer> t_;
};

std::string Human(double v) {
  if (v >= 1e9) return absl::StrFormat("%.2fG", v / 1e9);
  if (v >= 1e6) return absl::StrFormat("%.2fM", v / 1e6);
  if (v >= 1e3) return absl::StrFormat("%.1fk", v / 1e3);
  return absl::StrFormat("%.0f", v);
}

std::string Duration(double s) {
  if (!(s >= 0) || s > 1e7) return "?";
  const int64_t t = static_cast<int64_t>(s);
  if (t >= 3600) return absl::StrFormat("%dh%02dm", t / 3600, t / 60 % 60);
  if (t >= 60) return absl::StrFormat("%dm%02ds", t / 60, t % 60);
  return absl::StrFormat("%ds", t);
}

// Draws the progress line until `done`. On a terminal: one line redrawn 4 times a second;
// otherwise (logs): a line every 10 seconds.
class ProgressBar {
 public:
  ProgressBar(const data::PrepareProgress& p, Clock* clock)
      : p_(p), clock_(clock), tty_(::isatty(STDERR_FILENO)), start_us_(clock->NowMicros()),
        thread_([this] { Loop(); }) {}
  ~ProgressBar() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      done_ = true;
    }
    cv_.notify_all();
    thread_.join();
    Draw(true);
    if (tty_) std::fprintf(stderr, "\n");
  }

 private:
  void Loop() {
    std::unique_lock<std::mutex> lock(mu_);
    while (!cv_.wait_for(lock, std::chrono::milliseconds(tty_ ? 250 : 10000),
                         [this] { return done_; })) {
      Draw(false);
    }
  }
  void Draw(bool final) {
    const double secs = std::max(1e-3, (clock_->NowMicros() - start_us_) / 1e6);
    const double total = static_cast<double>(p_.bytes_total.load());
    const double done = static_cast<double>(p_.bytes_done.load());
    const double frac = total > 0 ? std::min(1.0, done / total) : 1.0;
    const double rate = done / secs;
    constexpr int kWidth = 24;
    std::string bar(static_cast<size_t>(frac * kWidth), '#');
    bar.resize(kWidth, '.');
    const std::string line = absl::StrFormat(
        "[%s] %5.1f%%  %llu/%llu files  %s MB/s  %s docs/s  %s tok/s  %s tokens  %s %s", bar,
        100 * frac, static_cast<unsigned long long>(p_.inputs_done.load()),
        static_cast<unsigned long long>(p_.inputs_total.load()), Human(rate / 1e6),
        Human(p_.documents.load() / secs), Human(p_.tokens.load() / secs),
        Human(static_cast<double>(p_.tokens.load())), final ? "elapsed" : "ETA",
        Duration(final ? secs : (rate > 0 ? (total - done) / rate : -1)));
    std::fprintf(stderr, tty_ ? "\r%s\033[K" : "%s\n", line.c_str());
    std::fflush(stderr);
  }

  const data::PrepareProgress& p_;
  Clock* clock_;
  const bool tty_;
  const int64_t start_us_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
  std::thread thread_;
};

}  // namespace

int RunPrepare(int argc, char** argv) {
  CLI::App app("tokenize jsonl / jsonl.zst files into token shards + a RocksDB index", argv[0]);
  std::string tokenizer_path, doc_index = "validation";
  data::PrepareOptions options;
  options.threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  app.add_option("--tokenizer", tokenizer_path, "tokenizer.json, or a folder with vocab.json + merges.txt")
      ->required();
  app.add_option("--out", options.out_dir, "index directory (created; appended to when it exists)")
      ->required();
  app.add_option("inputs", options.inputs, "files, directories (searched for *.jsonl[.zst]) or globs")
      ->required();
  app.add_option("--source-field", options.source_field,
                 "dotted path of the source name (default: meta.redpajama_set_name / meta.pile_set_name)");
  app.add_option("--source", options.fixed_source, "one source name for every document");
  app.add_option("--threads", options.threads, "parallel input files (default: all cores)");
  app.add_option("--max-bad-fraction", options.max_bad_fraction,
                 "fail an input file when more than this fraction of its lines is bad");
  app.add_option("--max-shard-tokens", options.max_shard_tokens, "close a shard at this many tokens");
  app.add_option("--doc-index", doc_index, "write per-document records: none, validation, all")
      ->check(CLI::IsMember({"none", "validation", "all"}));
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  options.doc_index = doc_index == "none"  ? data::DocIndexMode::kNone
                      : doc_index == "all" ? data::DocIndexMode::kAll
                                           : data::DocIndexMode::kValidation;
  auto tokenizer = Tokenizer::Load(tokenizer_path);
  if (!tokenizer.ok()) {
    std::fprintf(stderr, "gyre prepare: --tokenizer: %s\n", tokenizer.status().ToString().c_str());
    return 2;
  }
  TokenizerEncoder encoder(std::move(*tokenizer));
  std::fprintf(stderr, "gyre prepare: tokenizer %s (fingerprint %016llx, vocab %u, eos %u), %d threads\n",
               encoder.name().c_str(), static_cast<unsigned long long>(encoder.fingerprint()),
               encoder.vocab_size(), encoder.eos_id(), options.threads);

  ::signal(SIGINT, OnSigint);
  data::PrepareProgress progress;
  absl::StatusOr<data::PrepareReport> report = absl::UnknownError("not run");
  {
    ProgressBar bar(progress, Clock::Real());
    report = data::RunPrepare(encoder, options, &progress, &g_interrupted);
  }
  ::signal(SIGINT, SIG_DFL);
  if (!report.ok()) {
    std::fprintf(stderr, "gyre prepare: %s\n", report.status().ToString().c_str());
    return absl::IsCancelled(report.status()) ? 130
           : absl::IsInvalidArgument(report.status()) || absl::IsNotFound(report.status()) ? 2
                                                                                            : 1;
  }
  const data::PrepareReport& r = *report;
  std::fprintf(stderr, "\n%llu inputs registered, %llu already in the index, %llu failed; %llu lines read\n",
               static_cast<unsigned long long>(r.inputs_committed),
               static_cast<unsigned long long>(r.inputs_already_done),
               static_cast<unsigned long long>(r.failed_inputs.size()),
               static_cast<unsigned long long>(r.lines));
  std::fprintf(stderr, "%-32s %-10s %12s %14s %7s   (this run: docs / tokens)\n", "source", "split",
               "documents", "tokens", "shards");
  for (const auto& s : r.totals) {
    auto it = r.added.find(s.name());
    std::fprintf(stderr, "%-32s %-10s %12llu %14llu %7u   +%llu / +%llu\n", s.name().c_str(),
                 s.split().c_str(), static_cast<unsigned long long>(s.documents()),
                 static_cast<unsigned long long>(s.tokens()), s.shards(),
                 static_cast<unsigned long long>(it == r.added.end() ? 0 : it->second.documents),
                 static_cast<unsigned long long>(it == r.added.end() ? 0 : it->second.tokens));
  }
  if (!r.skipped.empty() || r.lone_surrogates > 0) {
    std::fprintf(stderr, "skipped lines:%s", r.skipped.empty() ? " none" : "");
    for (const auto& [reason, n] : r.skipped) {
      std::fprintf(stderr, " %s=%llu", reason.c_str(), static_cast<unsigned long long>(n));
    }
    std::fprintf(stderr, "; lone surrogate escapes replaced by U+FFFD: %llu\n",
                 static_cast<unsigned long long>(r.lone_surrogates));
    for (const auto& e : r.skip_examples) std::fprintf(stderr, "  %s\n", e.c_str());
  }
  if (r.orphans_removed > 0) {
    std::fprintf(stderr, "removed %llu unregistered shard files left by an interrupted run\n",
                 static_cast<unsigned long long>(r.orphans_removed));
  }
  for (const auto& [path, st] : r.failed_inputs) {
    std::fprintf(stderr, "FAILED %s: %s\n", path.c_str(), st.ToString().c_str());
  }
  if (!r.failed_inputs.empty()) {
    std::fprintf(stderr, "gyre prepare: %zu inputs failed and are not in the index; fix them and "
                 "re-run the same command (registered inputs are skipped)\n",
                 r.failed_inputs.size());
    return 1;
  }
  return 0;
}

}  // namespace gyre::cli
