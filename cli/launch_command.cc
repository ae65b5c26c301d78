// `gyre launch --local`: coordinator + N workers on this machine (deploy/local_launcher.h).
#include <cstdio>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "worker/gpu_runtime.h"
#include "base/env.h"
#include "base/run_dir.h"
#include "cli/commands.h"
#include "cli/run_config.h"
#include "deploy/gpu_slots.h"
#include "deploy/local_launcher.h"

namespace gyre::cli {

int RunLaunch(int argc, char** argv) {
  CLI::App app{"gyre launch: start a run (coordinator + workers)"};
  bool local = false;
  int workers = 1;
  std::string config_path, preset, index_dir, name, runs_dir = "runs";
  uint64_t steps = 0, seed = 0;
  uint32_t seq_len = 0, batch = 0;
  double lr = 0;
  app.add_flag("--local", local, "processes on this machine (the only launcher in this build)");
  app.add_option("--workers", workers, "worker processes to start (the desired count)")->capture_default_str();
  app.add_option("--config", config_path, "run config (protobuf text or .json); flags below override it");
  app.add_option("--preset", preset, "model preset (e.g. xlstm-tiny, llama-125m)");
  app.add_option("--index", index_dir, "token index written by `gyre prepare`");
  app.add_option("--run", name, "run name: the run directory is <runs-dir>/<run> (default: the config's name)");
  app.add_option("--runs-dir", runs_dir, "where run directories live")->capture_default_str();
  app.add_option("--steps", steps, "train.max_steps");
  app.add_option("--seq-len", seq_len, "data.seq_len");
  app.add_option("--batch", batch, "data.global_batch (sequences per step, all workers together)");
  app.add_option("--lr", lr, "optimizer.lr (peak)");
  app.add_option("--seed", seed, "run seed");
  std::string device = "auto";
  app.add_option("--device", device,
                 "workers' device: auto (one GPU worker per visible GPU in a CUDA build, else CPU), cuda, cpu")
      ->capture_default_str();
  std::vector<std::string> worker_args;
  app.add_option("--worker-arg", worker_args, "an extra argument for every `gyre worker` (repeatable)");
  std::string tls_cert, tls_key;
  app.add_option("--tls-cert", tls_cert, "PEM certificate: the coordinator serves TLS (control.tls_cert)");
  app.add_option("--tls-key", tls_key, "PEM private key of --tls-cert (control.tls_key)");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  if (!local) {
    std::fprintf(stderr, "gyre launch: only --local exists in this build (Slurm and Kubernetes launchers are not written yet)\n");
    return 2;
  }
  gyre::v1::RunConfig config;
  if (!config_path.empty()) {
    absl::StatusOr<gyre::v1::RunConfig> loaded = LoadRunConfig(config_path);
    if (!loaded.ok()) {
      std::fprintf(stderr, "gyre launch: %s\n", std::string(loaded.status().message()).c_str());
      return 2;
    }
    config = *loaded;
  }
  if (!name.empty()) config.set_name(name);
  if (!preset.empty()) config.mutable_model()->set_preset(preset);
  if (!index_dir.empty()) config.mutable_data()->set_index_dir(index_dir);
  if (steps) config.mutable_train()->set_max_steps(steps);
  if (seq_len) config.mutable_data()->set_seq_len(seq_len);
  if (batch) config.mutable_data()->set_global_batch(batch);
  if (lr > 0) config.mutable_optimizer()->set_lr(lr);
  if (seed) config.set_seed(seed);
  if (!tls_cert.empty()) config.mutable_control()->set_tls_cert(tls_cert);
  if (!tls_key.empty()) config.mutable_control()->set_tls_key(tls_key);
  config.mutable_cluster()->set_desired_workers(workers);
  ApplyDefaults(&config);
  if (absl::Status s = ValidateRunConfig(config); !s.ok()) {
    std::fprintf(stderr, "gyre launch: invalid config: %s\n", std::string(s.message()).c_str());
    return 2;
  }
  RunDir dir(JoinPath(runs_dir, config.name()));
  Env* env = Env::Default();
  if (absl::Status s = env->CreateDirs(dir.root()); !s.ok()) {
    std::fprintf(stderr, "gyre launch: %s\n", std::string(s.message()).c_str());
    return 3;
  }
  if (absl::Status s = WriteFileAtomically(env, dir.config_path(), RunConfigToJson(config)); !s.ok()) {
    std::fprintf(stderr, "gyre launch: %s\n", std::string(s.message()).c_str());
    return 3;
  }
  deploy::LaunchOptions options;
  options.run_dir = dir.root();
  options.config_path = dir.config_path();
  options.workers = workers;
  options.worker_args = worker_args;
  if (device != "cpu") {
    GpuRuntime* gpu = GpuRuntimeOrNull();
    const int gpus = gpu != nullptr ? gpu->DeviceCount() : 0;
    if (device == "cuda" && gpus == 0) {
      std::fprintf(stderr, "gyre launch: --device cuda: %s\n",
                   gpu == nullptr ? "this binary was built without CUDA" : "no GPU is visible");
      return 2;
    }
    if (device != "cuda" && device != "auto") {
      std::fprintf(stderr, "gyre launch: --device %s: expected auto, cuda or cpu\n", device.c_str());
      return 2;
    }
    options.gpus = gpus;
    if (absl::Status s = deploy::CheckGpuCapacity(static_cast<int>(config.cluster().min_workers()), gpus); !s.ok()) {
      std::fprintf(stderr, "gyre launch: %s\n", std::string(s.message()).c_str());
      return 2;
    }
    if (gpus > 0) {
      std::fprintf(stderr, "gyre launch: %d GPU(s) visible: GPU workers (NCCL), one GPU each\n", gpus);
    }
  }
  absl::Status s = deploy::RunLocal(options);
  if (!s.ok()) {
    std::fprintf(stderr, "gyre launch: %s\n", std::string(s.message()).c_str());
    return 1;
  }
  return 0;
}

}  // namespace gyre::cli
