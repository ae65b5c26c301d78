// `gyre train`: one-process training on the CPU (or one GPU with --device cuda, in a binary
// built with --config=cuda) with synthetic tokens or a flat uint16 token file (a stand-in until
// the data sampler lands). Prints loss, gradient norm, learning rate and tokens/s every step.
// The compute core is ops::Trainer (ops/train_step.h), the same library the distributed worker
// calls; on CUDA it runs the mixed-precision path (fp32 masters, bf16 compute).
#include <chrono>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "cli/train_flags.h"
#include "ops/blas_env.h"
#include "ops/cuda_backend.h"
#include "ops/parallel.h"
#include "ops/train_step.h"

namespace gyre::cli {
namespace {

// Deterministic synthetic text: a random sparse Markov chain (each token has 4 equally likely
// successors), so a model can learn it down to ln 4 = 1.386 nats. Batch of step t depends only
// on (seed, t).
class SyntheticTokens {
 public:
  SyntheticTokens(int64_t vocab, uint64_t seed) : vocab_(std::min<int64_t>(vocab, 4096)), seed_(seed) {
    ops::Rng rng(seed ^ 0x5eed);
    next_.resize(vocab_ * 4);
    for (auto& n : next_) n = static_cast<int32_t>(rng.Below(vocab_));
  }
  void Fill(uint64_t step, std::vector<int32_t>* out) {
    ops::Rng rng(seed_ * 1000003 + step);
    int32_t t = static_cast<int32_t>(rng.Below(vocab_));
    for (auto& x : *out) {
      x = t;
      t = next_[t * 4 + rng.Below(4)];
    }
  }

 private:
  int64_t vocab_;
  uint64_t seed_;
  std::vector<int32_t> next_;
};

// A flat little-endian uint16 token file; random windows of seq+1 tokens per sequence.
class FileTokens {
 public:
  static absl::StatusOr<FileTokens> Open(const std::string& path, int64_t vocab, int64_t seq, uint64_t seed) {
    std::ifstream in(path, std::ios::binary | std::ios::ate);
    if (!in) return absl::NotFoundError(absl::StrCat("--tokens ", path, ": cannot open"));
    const std::streamsize bytes = in.tellg();
    if (bytes % 2 != 0) return absl::InvalidArgumentError(absl::StrCat(path, ": ", bytes, " bytes is not a whole number of uint16 tokens"));
    FileTokens f;
    f.tokens_.resize(bytes / 2);
    in.seekg(0);
    if (!in.read(reinterpret_cast<char*>(f.tokens_.data()), bytes)) return absl::DataLossError(absl::StrCat(path, ": short read"));
    if (static_cast<int64_t>(f.tokens_.size()) < seq + 2)
      return absl::InvalidArgumentError(absl::StrCat(path, ": ", f.tokens_.size(), " tokens, need more than seq_len + 1 = ", seq + 1));
    for (size_t i = 0; i < f.tokens_.size(); ++i) {
      if (f.tokens_[i] >= vocab)
        return absl::InvalidArgumentError(absl::StrCat(path, ": token ", i, " = ", f.tokens_[i], " is outside the model's vocabulary of ", vocab));
    }
    f.seq_ = seq;
    f.seed_ = seed;
    return f;
  }
  void Fill(uint64_t step, int64_t batch, std::vector<int32_t>* out) {
    ops::Rng rng(seed_ * 1000003 + step);
    for (int64_t b = 0; b < batch; ++b) {
      const size_t off = rng.Below(tokens_.size() - seq_ - 1);
      for (int64_t t = 0; t <= seq_; ++t) (*out)[b * (seq_ + 1) + t] = tokens_[off + t];
    }
  }
  size_t size() const { return tokens_.size(); }

 private:
  std::vector<uint16_t> tokens_;
  int64_t seq_ = 0;
  uint64_t seed_ = 0;
};

}  // namespace

int RunTrain(int argc, char** argv) {
  // Re-execute once with a usable OpenBLAS core (ops/blas_env.h); argv here is shifted by the
  // multi-call front-end, so rebuild the original command line.
  {
    std::vector<char*> full;
    static char kGyre[] = "gyre", kTrain[] = "train";
    full.push_back(kGyre);
    full.push_back(kTrain);
    for (int i = 1; i < argc; ++i) full.push_back(argv[i]);
    full.push_back(nullptr);
    ops::ReexecWithBestBlasCore(full.data());
  }
  CLI::App app{"Train a model from a preset on this CPU or one GPU (synthetic tokens or a uint16 token file)", "gyre train"};
  TrainFlags flags;
  std::string tokens_path, device = "cpu";
  uint64_t seed = 0;
  int64_t seq = 128, batch = 8;
  int threads = 0;
  AddTrainFlags(&app, &flags);
  app.add_option("--seq-len", seq, "tokens per sequence")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--batch", batch, "sequences per step")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--threads", threads, "CPU threads (0 = all cores)")->capture_default_str();
  app.add_option("--tokens", tokens_path, "flat little-endian uint16 token file (default: synthetic tokens)");
  app.add_option("--seed", seed, "initialisation and data seed")->capture_default_str();
  app.add_option("--device", device, "cpu or cuda (needs a --config=cuda build)")
      ->capture_default_str()
      ->check(CLI::IsMember({"cpu", "cuda"}));
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }

  // The flags become the run-config messages a config file would hold, resolved by the same
  // functions as the launch path (cli/train_flags.h), so their errors are the config's.
  auto resolved = ResolveTrainConfig(TrainFlagsToConfig(flags));
  if (!resolved.ok()) {
    std::fprintf(stderr, "gyre train: %s\n", std::string(resolved.status().message()).c_str());
    return 2;
  }
  const ops::ModelSpec& spec = resolved->spec;
  const ops::TrainOptions& options = resolved->options;
  const uint64_t steps = flags.steps;
  ops::SetNumThreads(threads);
  const bool cuda = device == "cuda";
  auto model = ops::LanguageModel::Create(spec, ops::DType::kF32, cuda ? ops::Device::kCuda : ops::Device::kCpu, seed);
  if (!model.ok()) {
    std::fprintf(stderr, "gyre train: %s\n", std::string(model.status().message()).c_str());
    return 2;
  }
  if (cuda) {
    std::printf("%s\n%lld parameters, device %s (fp32 masters, bf16 compute), batch %lld x %lld tokens\n",
                ops::DescribeSpec(spec).c_str(), (long long)(*model)->NumParameters(),
                ops::Cuda().DeviceDescription().c_str(), (long long)batch, (long long)seq);
  } else {
    std::printf("%s\n%lld parameters, %d threads, OpenBLAS core %s, batch %lld x %lld tokens\n",
                ops::DescribeSpec(spec).c_str(), (long long)(*model)->NumParameters(), ops::NumThreads(),
                ops::BlasCoreName().c_str(), (long long)batch, (long long)seq);
  }

  std::vector<int32_t> tokens(batch * (seq + 1));
  SyntheticTokens synthetic(spec.vocab_size, seed);
  std::unique_ptr<FileTokens> file;
  if (!tokens_path.empty()) {
    auto f = FileTokens::Open(tokens_path, spec.vocab_size, seq, seed);
    if (!f.ok()) {
      std::fprintf(stderr, "gyre train: %s\n", std::string(f.status().message()).c_str());
      return 2;
    }
    file = std::make_unique<FileTokens>(std::move(*f));
    std::printf("tokens: %s (%zu tokens)\n", tokens_path.c_str(), file->size());
  } else {
    std::printf("tokens: synthetic Markov chain (learnable down to ln 4 = 1.386 nats)\n");
  }

  ops::Trainer trainer(model->get(), options);
  const auto start = std::chrono::steady_clock::now();
  for (uint64_t step = 0; step < steps; ++step) {
    if (file) file->Fill(step, batch, &tokens);
    else synthetic.Fill(step, &tokens);
    const auto t0 = std::chrono::steady_clock::now();
    auto s = trainer.Step(tokens, batch, seq, step);
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (!s.ok()) {
      std::fprintf(stderr, "gyre train: %s\n", std::string(s.status().message()).c_str());
      return 1;
    }
    std::printf("step %5llu  loss %.4f  grad_norm %.3f  lr %.3e  %.0f tokens/s\n", (unsigned long long)step,
                s->loss.loss, s->update.grad_norm, s->update.lr, batch * seq / dt);
    std::fflush(stdout);
  }
  const double total = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("done: %llu steps in %.1f s, %.0f tokens/s\n", (unsigned long long)steps, total,
              steps * batch * seq / std::max(total, 1e-9));
  return 0;
}

}  // namespace gyre::cli
