// `gyre ledger --run-dir DIR [--json]`: the run's data ledger — every committed step with its
// generation, world size, global sample range and loss — read from the coordinator's journal
// (read-only; works while the coordinator runs). It also checks the ledger's invariants (DESIGN
// section 4): steps 0..n-1 each exactly once, step t covering [t*B, (t+1)*B). Exit 1 on a gap,
// duplicate or wrong range.
#include <cstdio>
#include <memory>
#include <string>

#include "CLI/CLI.hpp"
#include "absl/strings/str_format.h"
#include "base/run_dir.h"
#include "cli/commands.h"
#include "gyre/v1/journal.pb.h"
#include "rocksdb/db.h"

namespace gyre::cli {

int RunLedger(int argc, char** argv) {
  CLI::App app{"gyre ledger: the committed steps of a run, checked"};
  std::string run_dir;
  bool json = false, quiet = false;
  app.add_option("--run-dir", run_dir, "the run directory")->required();
  app.add_flag("--json", json, "one JSON object per step");
  app.add_flag("--quiet", quiet, "print only the summary line");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  RunDir dir(run_dir);
  rocksdb::Options options;
  rocksdb::DB* raw = nullptr;
  // Secondary instance: reads a journal that a live coordinator holds open.
  const std::string secondary = "/tmp/gyre-ledger-" + std::to_string(::getpid());
  rocksdb::Status s = rocksdb::DB::OpenAsSecondary(options, dir.journal_dir(), secondary, &raw);
  if (!s.ok()) {
    std::fprintf(stderr, "gyre ledger: cannot open the journal %s: %s\n", dir.journal_dir().c_str(), s.ToString().c_str());
    return 3;
  }
  std::unique_ptr<rocksdb::DB> db(raw);
  std::unique_ptr<rocksdb::Iterator> it(db->NewIterator(rocksdb::ReadOptions()));
  uint64_t expected = 0, problems = 0, global_batch = 0;
  for (it->Seek("step/"); it->Valid() && it->key().starts_with("step/"); it->Next()) {
    gyre::v1::CommittedStep step;
    if (!step.ParseFromArray(it->value().data(), static_cast<int>(it->value().size()))) {
      std::fprintf(stderr, "gyre ledger: journal record %s does not parse\n", it->key().ToString(true).c_str());
      return 1;
    }
    if (global_batch == 0) global_batch = step.sample_end() - step.sample_begin();
    std::string problem;
    if (step.step() != expected) problem = "gap or duplicate: expected step " + std::to_string(expected);
    if (step.sample_begin() != step.step() * global_batch || step.sample_end() != (step.step() + 1) * global_batch) {
      problem += (problem.empty() ? "" : "; ") + std::string("sample range is not [t*B, (t+1)*B)");
    }
    if (!problem.empty()) ++problems;
    if (json) {
      // Commit time and the ranks' aggregate metrics (sums; the slowest rank's phase times) let
      // scripts compute throughput, MFU and what an event cost without the worker logs.
      const gyre::v1::StepMetrics& m = step.metrics();
      std::printf("{\"step\":%llu,\"generation\":%llu,\"world\":%u,\"samples\":[%llu,%llu],\"loss\":%.17g,"
                  "\"committed_unix_ms\":%lld,\"tokens\":%llu,\"model_flops_per_s\":%.6g,\"peak_flops_per_s\":%.6g,"
                  "\"total_ms\":%.3f,\"exposed_comm_ms\":%.3f%s%s}\n",
                  (unsigned long long)step.step(), (unsigned long long)step.generation(), step.world_size(),
                  (unsigned long long)step.sample_begin(), (unsigned long long)step.sample_end(), m.loss(),
                  (long long)step.committed_unix_ms(), (unsigned long long)m.tokens(), m.model_flops_per_s(),
                  m.peak_flops_per_s(), m.times().total_ms(), m.times().exposed_comm_ms(),
                  m.has_eval() ? absl::StrFormat(",\"eval_loss\":%.17g,\"head_effective_rank\":%.6g", m.eval().loss(),
                                                 m.eval().head().effective_rank()).c_str()
                               : "",
                  problem.empty() ? "" : (",\"problem\":\"" + problem + "\"").c_str());
    } else if (!quiet || !problem.empty()) {
      std::printf("step %6llu  generation %4llu  world %2u  samples [%llu, %llu)  loss %.4f%s%s\n",
                  (unsigned long long)step.step(), (unsigned long long)step.generation(), step.world_size(),
                  (unsigned long long)step.sample_begin(), (unsigned long long)step.sample_end(), step.metrics().loss(),
                  problem.empty() ? "" : "  <-- ", problem.c_str());
    }
    expected = step.step() + 1;
  }
  // Checkpoints the journal holds, with those a restore found corrupt or torn (kept, never used).
  for (it->Seek("checkpoint/"); !json && it->Valid() && it->key().starts_with("checkpoint/"); it->Next()) {
    gyre::v1::CheckpointRecord record;
    if (!record.ParseFromArray(it->value().data(), static_cast<int>(it->value().size()))) continue;
    if (quiet && record.invalid_reason().empty()) continue;
    std::printf("checkpoint %6llu  %s%s%s\n", (unsigned long long)record.step(), record.path().c_str(),
                record.invalid_reason().empty() ? "" : "  BAD: ", record.invalid_reason().c_str());
  }
  if (!json) {
    std::printf("ledger: %llu committed steps, global batch %llu, %llu problem(s)\n", (unsigned long long)expected,
                (unsigned long long)global_batch, (unsigned long long)problems);
  }
  return problems == 0 ? 0 : 1;
}

}  // namespace gyre::cli
