#include "dataloader/prepare.h"

#include <glob.h>

#include <algorithm>
#include <cstring>
#include <condition_variable>
#include <filesystem>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "base/status_macros.h"
#include "dataloader/json_line.h"
#include "dataloader/line_reader.h"
#include "dataloader/shard.h"
#include "dataloader/token_index.h"
#include "xxhash.h"

namespace gyre::data {
namespace {

namespace fs = std::filesystem;

constexpr size_t kExamplesPerInput = 5;
constexpr size_t kExamplesTotal = 20;
constexpr size_t kMaxSourceNameBytes = 256;

bool IsCorpusFileName(const std::string& name) {
  return absl::EndsWith(name, ".jsonl") || absl::EndsWith(name, ".jsonl.zst") ||
         absl::EndsWith(name, ".json") || absl::EndsWith(name, ".json.zst");
}

// A source name as a directory name: [A-Za-z0-9._-] kept, the rest '_', plus a hash suffix
// when anything changed (so "a b" and "a_b" never share a folder).
std::string PathSafe(const std::string& source) {
  // A name that is empty or starts with '.' (".", "..", hidden) gets a leading '_'.
  bool changed = source.empty() || source[0] == '.';
  std::string out = changed ? "_" : "";
  for (char c : source) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '.' || c == '_' || c == '-';
    out.push_back(ok ? c : '_');
    changed |= !ok;
  }
  if (changed) absl::StrAppendFormat(&out, "-%08x", static_cast<uint32_t>(XXH64(source.data(), source.size(), 0)));
  return out;
}

struct InputResult {
  TokenIndex::InputCommit commit;
  uint64_t lines = 0;
  uint64_t bad = 0;
  uint64_t lone_surrogates = 0;
  std::map<std::string, uint64_t> skipped;
  std::vector<std::string> examples;
  std::map<std::string, PrepareReport::Added> added;
};

class InputTask {
 public:
  InputTask(const DocumentEncoder& encoder, const PrepareOptions& options, uint32_t dtype_bytes,
            PrepareProgress* progress, const std::atomic<bool>* cancel,
            const std::atomic<bool>* abort)
      : encoder_(encoder), options_(options), dtype_bytes_(dtype_bytes), progress_(progress),
        cancel_(cancel), abort_(abort) {}

  absl::StatusOr<InputResult> Run(const std::string& path) {
    InputResult result;
    result.commit.input.set_path(path);
    const std::string split = SplitOfPath(path);
    const uint64_t input_key = XXH64(path.data(), path.size(), 0);
    ASSIGN_OR_RETURN(auto reader, LineReader::Open(options_.env, path));
    result.commit.input.set_bytes(reader->file_bytes());
    JsonLineParser parser(options_.source_field);
    ParsedLine parsed;
    std::vector<uint32_t> ids;
    std::map<std::string, OpenShard> open;  // by full source name
    uint64_t reported_bytes = 0;
    std::string_view line;

    auto skip = [&](const std::string& reason, const std::string& detail, bool bad) {
      result.skipped[reason]++;
      if (bad) result.bad++;
      if (result.examples.size() < kExamplesPerInput) {
        result.examples.push_back(absl::StrCat(path, ":", reader->line_number(), ": ", reason,
                                               detail.empty() ? "" : ": ", detail));
      }
    };

    while (true) {
      if ((cancel_ != nullptr && cancel_->load(std::memory_order_relaxed)) ||
          abort_->load(std::memory_order_relaxed)) {
        return absl::CancelledError("interrupted");
      }
      ASSIGN_OR_RETURN(bool more, reader->Next(&line));
      if (!more) break;
      if (progress_ != nullptr && (reader->line_number() & 255) == 0) {
        const uint64_t now = reader->bytes_consumed();
        progress_->bytes_done.fetch_add(now - reported_bytes, std::memory_order_relaxed);
        reported_bytes = now;
      }
      // Blank lines (e.g. a trailing empty line) are not documents and not errors.
      if (line.find_first_not_of(" \t") == std::string_view::npos) continue;
      result.lines++;
      if (line.size() > options_.max_document_bytes) {
        skip("document_too_large", absl::StrCat(line.size(), " bytes > ", options_.max_document_bytes),
             true);
        continue;
      }
      const LineVerdict verdict = parser.Parse(line, &parsed);
      if (verdict != LineVerdict::kOk) {
        skip(LineVerdictName(verdict), parsed.error, true);
        continue;
      }
      result.lone_surrogates += parsed.lone_surrogates;
      if (parsed.text.empty()) {
        skip("empty_document", "", false);
        continue;
      }
      std::string source = !options_.fixed_source.empty() ? options_.fixed_source
                           : !parsed.source.empty()       ? parsed.source
                                                          : std::string("default");
      if (source.size() > kMaxSourceNameBytes || source.find('\0') != std::string::npos) {
        skip("bad_source", absl::StrCat("source name of ", source.size(),
                                        " bytes (at most 256, no NUL)"), true);
        continue;
      }
      if (split != "train") absl::StrAppend(&source, "/", split);

      ids.clear();
      encoder_.Encode(parsed.text, &ids);
      ids.push_back(encoder_.eos_id());
      auto it = open.find(source);
      if (it == open.end()) it = open.emplace(source, OpenShard()).first;
      OpenShard& shard = it->second;
      if (!shard.writer) {
        const std::string rel = absl::StrFormat("shards/%s/%016x-%d.tok", PathSafe(source),
                                                input_key, shard.next_piece++);
        ASSIGN_OR_RETURN(shard.writer,
                         ShardWriter::Create(options_.env, JoinPath(options_.out_dir, rel),
                                             dtype_bytes_, encoder_.fingerprint()));
        shard.rel_path = rel;
        shard.docs.clear();
      }
      const bool want_docs = options_.doc_index == DocIndexMode::kAll ||
                             (options_.doc_index == DocIndexMode::kValidation && split != "train");
      if (want_docs) {
        gyre::v1::DocRecord doc;
        doc.set_offset(shard.writer->tokens());
        doc.set_length(ids.size() - 1);
        shard.docs.push_back(doc);
      }
      RETURN_IF_ERROR(shard.writer->AppendDocument(ids));
      auto& added = result.added[source];
      added.documents++;
      added.tokens += ids.size();
      if (progress_ != nullptr) {
        progress_->documents.fetch_add(1, std::memory_order_relaxed);
        progress_->tokens.fetch_add(ids.size(), std::memory_order_relaxed);
      }
      if (shard.writer->tokens() >= options_.max_shard_tokens) {
        RETURN_IF_ERROR(Close(source, split, shard, &result));
      }
    }
    if (progress_ != nullptr) progress_->bytes_done.fetch_add(reader->bytes_consumed() - reported_bytes);
    for (auto& [source, shard] : open) {
      if (shard.writer) RETURN_IF_ERROR(Close(source, split, shard, &result));
    }
    uint64_t documents = 0;
    for (const auto& [s, a] : result.added) documents += a.documents;
    result.commit.input.set_documents(documents);
    result.commit.input.set_skipped_lines(result.bad);
    return result;
  }

 private:
  struct OpenShard {
    std::unique_ptr<ShardWriter> writer;
    std::string rel_path;
    int next_piece = 0;
    std::vector<gyre::v1::DocRecord> docs;
  };

  absl::Status Close(const std::string& source, const std::string& split, OpenShard& shard,
                     InputResult* result) {
    ASSIGN_OR_RETURN(ShardHeader header, shard.writer->Finish());
    TokenIndex::NewShard s;
    s.source = source;
    s.split = split;
    s.path = shard.rel_path;
    s.tokens = header.tokens;
    s.documents = header.documents;
    s.payload_checksum = header.payload_checksum;
    s.dtype_bytes = header.dtype_bytes;
    s.docs = std::move(shard.docs);
    shard.docs.clear();
    result->commit.shards.push_back(std::move(s));
    result->added[source].shards++;
    shard.writer.reset();
    return absl::OkStatus();
  }

  const DocumentEncoder& encoder_;
  const PrepareOptions& options_;
  const uint32_t dtype_bytes_;
  PrepareProgress* progress_;
  const std::atomic<bool>* cancel_;
  const std::atomic<bool>* abort_;
};

// Deletes shard files (and temp files) under <dir>/shards that no index record references.
absl::StatusOr<uint64_t> RemoveOrphans(Env* env, const TokenIndex& index) {
  std::set<std::string> referenced;
  ASSIGN_OR_RETURN(auto sources, index.ListSources());
  for (const auto& s : sources) {
    ASSIGN_OR_RETURN(auto shards, index.ListShards(s.name()));
    for (const auto& sh : shards) referenced.insert(sh.path());
  }
  const std::string root = IndexShardsDir(index.dir());
  if (!env->Exists(root)) return 0;
  uint64_t removed = 0;
  ASSIGN_OR_RETURN(auto dirs, env->ListDir(root));
  for (const std::string& d : dirs) {
    auto files = env->ListDir(JoinPath(root, d));
    if (!files.ok()) continue;  // not a directory
    for (const std::string& f : *files) {
      const std::string rel = absl::StrCat("shards/", d, "/", f);
      if (referenced.count(rel)) continue;
      RETURN_IF_ERROR(env->RemoveFile(JoinPath(index.dir(), rel)));
      ++removed;
    }
  }
  return removed;
}

}  // namespace

std::string SplitOfPath(std::string_view path) {
  const fs::path p{std::string(path)};
  std::string stem = p.filename().string();
  for (const char* ext : {".zst", ".jsonl", ".json"}) {
    if (absl::EndsWith(stem, ext)) stem.resize(stem.size() - std::strlen(ext));
  }
  if (stem == "val" || stem == "valid" || stem == "validation") return "validation";
  if (stem == "test") return "test";
  // The closest of the file's folder and its parent that names a split decides (SlimPajama:
  // validation/chunk1/file); folders higher up (e.g. a user's ~/test/) do not count.
  fs::path dir = p.parent_path();
  for (int level = 0; level < 2 && !dir.empty(); ++level, dir = dir.parent_path()) {
    const std::string name = dir.filename().string();
    if (name == "train" || name == "training") return "train";
    if (name == "validation" || name == "valid" || name == "val" || name == "holdout") {
      return "validation";
    }
    if (name == "test") return "test";
  }
  return "train";
}

absl::StatusOr<std::vector<std::string>> ExpandInputs(const std::vector<std::string>& inputs) {
  std::set<std::string> out;
  auto add_path = [&](const fs::path& path) -> absl::Status {
    std::error_code ec;
    if (fs::is_directory(path, ec)) {
      for (auto it = fs::recursive_directory_iterator(path, ec); !ec && it != fs::end(it);
           it.increment(ec)) {
        if (it->is_regular_file(ec) && IsCorpusFileName(it->path().filename().string())) {
          out.insert(fs::absolute(it->path()).lexically_normal().string());
        }
      }
      if (ec) return absl::UnavailableError(absl::StrCat("listing ", path.string(), ": ", ec.message()));
      return absl::OkStatus();
    }
    if (!fs::exists(path, ec)) {
      return absl::NotFoundError(absl::StrCat("input ", path.string(), ": no such file or directory"));
    }
    out.insert(fs::absolute(path).lexically_normal().string());
    return absl::OkStatus();
  };
  for (const std::string& in : inputs) {
    if (in.find_first_of("*?[") != std::string::npos) {
      glob_t g{};
      const int rc = ::glob(in.c_str(), 0, nullptr, &g);
      if (rc == GLOB_NOMATCH || (rc == 0 && g.gl_pathc == 0)) {
        globfree(&g);
        return absl::NotFoundError(absl::StrCat("input pattern ", in, " matched no files"));
      }
      if (rc != 0) {
        globfree(&g);
        return absl::InvalidArgumentError(absl::StrCat("input pattern ", in, ": glob failed"));
      }
      absl::Status st;
      for (size_t i = 0; i < g.gl_pathc && st.ok(); ++i) st = add_path(g.gl_pathv[i]);
      globfree(&g);
      RETURN_IF_ERROR(st);
    } else {
      RETURN_IF_ERROR(add_path(in));
    }
  }
  return std::vector<std::string>(out.begin(), out.end());
}

absl::StatusOr<PrepareReport> RunPrepare(const DocumentEncoder& encoder,
                                         const PrepareOptions& options, PrepareProgress* progress,
                                         const std::atomic<bool>* cancel) {
  if (options.out_dir.empty()) return absl::InvalidArgumentError("--out: no index directory given");
  if (options.inputs.empty()) return absl::InvalidArgumentError("no input files given");
  if (!(options.max_bad_fraction >= 0 && options.max_bad_fraction <= 1)) {
    return absl::InvalidArgumentError("--max-bad-fraction must be in [0, 1]");
  }
  if (options.threads < 1) return absl::InvalidArgumentError("--threads must be at least 1");
  if (!options.source_field.empty() && !options.fixed_source.empty()) {
    return absl::InvalidArgumentError("--source-field and --source exclude each other");
  }
  ASSIGN_OR_RETURN(std::vector<std::string> inputs, ExpandInputs(options.inputs));
  if (inputs.empty()) return absl::NotFoundError("the inputs name no .jsonl / .jsonl.zst files");

  ASSIGN_OR_RETURN(auto index, TokenIndex::Open(options.out_dir, TokenIndex::Mode::kReadWrite));
  ASSIGN_OR_RETURN(auto meta, index->ReadMeta());
  if (meta.has_value()) {
    if (meta->tokenizer_fingerprint() != encoder.fingerprint()) {
      return absl::FailedPreconditionError(absl::StrFormat(
          "index %s was written with tokenizer '%s' (fingerprint %016x); the requested tokenizer "
          "'%s' has fingerprint %016x. Use the same tokenizer or a new --out directory.",
          options.out_dir, meta->tokenizer_name(), meta->tokenizer_fingerprint(), encoder.name(),
          encoder.fingerprint()));
    }
  } else {
    gyre::v1::IndexMeta m;
    m.set_format_version(kIndexFormatVersion);
    m.set_tokenizer_name(encoder.name());
    m.set_tokenizer_fingerprint(encoder.fingerprint());
    m.set_vocab_size(encoder.vocab_size());
    m.set_eos_id(encoder.eos_id());
    m.set_created_unix_s(options.clock->UnixMillis() / 1000);
    m.set_created_by("gyre prepare");
    RETURN_IF_ERROR(index->WriteMeta(m));
  }
  const uint32_t vocab = meta.has_value() ? meta->vocab_size() : encoder.vocab_size();
  const uint32_t dtype_bytes = DtypeBytesForVocab(vocab);

  PrepareReport report;
  ASSIGN_OR_RETURN(report.orphans_removed, RemoveOrphans(options.env, *index));

  std::vector<std::string> todo;
  for (const std::string& path : inputs) {
    ASSIGN_OR_RETURN(auto done, index->GetInput(path));
    if (done.has_value()) {
      auto size = options.env->FileSize(path);
      if (size.ok() && *size != done->bytes()) {
        return absl::FailedPreconditionError(absl::StrCat(
            "input ", path, " was ingested with ", done->bytes(), " bytes but now has ", *size,
            "; it changed after it was prepared. Re-create the index or leave the file out."));
      }
      report.inputs_already_done++;
      continue;
    }
    todo.push_back(path);
  }
  PrepareProgress local_progress;
  if (progress == nullptr) progress = &local_progress;
  for (const std::string& path : todo) {
    auto size = options.env->FileSize(path);
    if (size.ok()) progress->bytes_total += *size;
  }
  progress->inputs_total = todo.size();

  // Workers fill results[i]; this thread registers them in order.
  std::mutex mu;
  std::condition_variable ready;
  std::vector<std::optional<absl::StatusOr<InputResult>>> results(todo.size());
  std::atomic<size_t> next_task{0};
  std::atomic<bool> stop{false};
  auto worker = [&] {
    InputTask task(encoder, options, dtype_bytes, progress, cancel, &stop);
    while (!stop.load()) {
      const size_t i = next_task.fetch_add(1);
      if (i >= todo.size()) break;
      absl::StatusOr<InputResult> r = task.Run(todo[i]);
      std::lock_guard<std::mutex> lock(mu);
      results[i] = std::move(r);
      ready.notify_all();
    }
  };
  std::vector<std::thread> threads;
  const int n_threads = std::min<int>(options.threads, std::max<size_t>(todo.size(), 1));
  for (int t = 0; t < n_threads; ++t) threads.emplace_back(worker);

  absl::Status fatal;
  auto wait_for = [&](size_t i) {
    std::unique_lock<std::mutex> lock(mu);
    ready.wait(lock, [&] { return results[i].has_value(); });
    absl::StatusOr<InputResult> r = std::move(*results[i]);
    results[i].reset();
    return r;
  };
  for (size_t i = 0; i < todo.size(); ++i) {
    absl::StatusOr<InputResult> r = wait_for(i);
    if (!r.ok()) {
      if (absl::IsCancelled(r.status())) {
        stop = true;
        fatal = absl::CancelledError(absl::StrCat(
            "interrupted after registering ", report.inputs_committed, " of ", todo.size(),
            " inputs; run the same command again to finish (nothing half-written is kept)"));
        break;
      }
      report.failed_inputs.emplace_back(todo[i], r.status());
      continue;
    }
    InputResult& res = *r;
    report.lines += res.lines;
    report.bad_lines += res.bad;
    report.lone_surrogates += res.lone_surrogates;
    for (const auto& [reason, n] : res.skipped) report.skipped[reason] += n;
    for (auto& e : res.examples) {
      if (report.skip_examples.size() < kExamplesTotal) report.skip_examples.push_back(e);
    }
    if (res.lines > 0 && static_cast<double>(res.bad) > options.max_bad_fraction * res.lines) {
      report.failed_inputs.emplace_back(
          todo[i], absl::DataLossError(absl::StrFormat(
                       "%d of %d lines bad (%.2f%%) > --max-bad-fraction %.4g; first: %s", res.bad,
                       res.lines, 100.0 * res.bad / res.lines, options.max_bad_fraction,
                       res.examples.empty() ? "" : res.examples[0])));
      continue;  // its shards stay unregistered and are removed as orphans next time
    }
    absl::Status st = index->CommitInput(res.commit);
    if (!st.ok()) {
      fatal = st;
      stop = true;
      break;
    }
    report.inputs_committed++;
    progress->inputs_done++;
    for (const auto& [source, a] : res.added) {
      auto& dst = report.added[source];
      dst.documents += a.documents;
      dst.tokens += a.tokens;
      dst.shards += a.shards;
    }
  }
  stop = true;
  for (auto& t : threads) t.join();
  RETURN_IF_ERROR(fatal);
  ASSIGN_OR_RETURN(report.totals, index->ListSources());
  return report;
}

}  // namespace gyre::data
