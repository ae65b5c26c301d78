// `gyre launch`: start a run.
//   --local  coordinator + N workers on this machine (deploy/local_launcher.h)
//   --slurm  writes <run-dir>/slurm/run.sbatch (+ worker-task.sh); --submit runs sbatch
//            (deploy/slurm.h); with --add-workers K --run-dir DIR: a worker-only job for a run
//   --k8s    writes <run-dir>/k8s/manifests.json for `kubectl apply -f` (deploy/k8s.h)
#include <unistd.h>

#include <climits>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/strings/str_cat.h"
#include "base/env.h"
#include "base/run_dir.h"
#include "cli/commands.h"
#include "cli/run_config.h"
#include "deploy/command_runner.h"
#include "deploy/gpu_slots.h"
#include "deploy/k8s.h"
#include "deploy/local_launcher.h"
#include "deploy/provisioner.h"
#include "deploy/slurm.h"
#include "worker/gpu_runtime.h"

namespace gyre::cli {
namespace {

std::string Absolute(const std::string& path) {
  if (path.empty()) return path;
  std::error_code ec;
  std::filesystem::path p = std::filesystem::absolute(path, ec);
  return ec ? path : p.lexically_normal().string();
}

std::string SelfExe() {
  char buf[PATH_MAX];
  const ssize_t n = ::readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  return n > 0 ? std::string(buf, static_cast<size_t>(n)) : std::string();
}

int Fail(int code, const absl::Status& s) {
  std::fprintf(stderr, "gyre launch: %s\n", std::string(s.message()).c_str());
  return code;
}

// `--add-workers K --run-dir DIR`: a worker-only Slurm job for a run launched with --slurm.
int AddSlurmWorkers(int workers, const std::string& run_dir, bool submit, const std::string& sbatch) {
  if (run_dir.empty()) return Fail(2, absl::InvalidArgumentError("--add-workers needs --run-dir (the run's directory)"));
  const std::string launch = deploy::SlurmLaunchPath(Absolute(run_dir));
  absl::StatusOr<std::string> json = Env::Default()->ReadFile(launch);
  if (!json.ok()) {
    return Fail(2, absl::NotFoundError(absl::StrCat("--run-dir ", run_dir, ": no ", launch,
                                                    " (was the run launched with `gyre launch --slurm`?)")));
  }
  absl::StatusOr<deploy::SlurmOptions> options = deploy::SlurmOptionsFromJson(*json, launch);
  if (!options.ok()) return Fail(2, options.status());
  std::unique_ptr<deploy::CommandRunner> runner = deploy::NewSubprocessRunner();
  absl::StatusOr<std::string> result =
      deploy::WriteAndSubmitSlurmWorkers(*options, workers, submit, sbatch, runner.get());
  if (!result.ok()) return Fail(submit ? 1 : 3, result.status());
  if (submit) {
    std::printf("submitted job %s: %d more worker(s) for run '%s'\n", result->c_str(), workers,
                options->run_name.c_str());
  } else {
    std::printf("%s %s\n", sbatch.c_str(), result->c_str());
  }
  return 0;
}

}  // namespace

int RunLaunch(int argc, char** argv) {
  CLI::App app{"gyre launch: start a run (coordinator + workers) here, on Slurm or on Kubernetes"};
  bool local = false, slurm = false, k8s = false;
  int workers = 1;
  std::string config_path, preset, index_dir, name, runs_dir = "runs";
  uint64_t steps = 0, seed = 0;
  uint32_t seq_len = 0, batch = 0;
  double lr = 0;
  app.add_flag("--local", local, "processes on this machine");
  app.add_flag("--slurm", slurm, "write a Slurm batch script (<run-dir>/slurm/run.sbatch); --submit submits it");
  app.add_flag("--k8s", k8s, "write Kubernetes manifests (<run-dir>/k8s/manifests.json)");
  app.add_option("--workers", workers,
                 "desired worker count (--local, --k8s: default 1; --slurm: default nodes x workers per node)")
      ->capture_default_str();
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
                 "workers' device: auto (--local: one GPU worker per visible GPU in a CUDA build, else CPU; "
                 "--slurm: cuda with --gpus-per-node, else cpu), cuda, cpu")
      ->capture_default_str();
  std::vector<std::string> worker_args;
  app.add_option("--worker-arg", worker_args, "an extra argument for every `gyre worker` (repeatable)");
  std::string tls_cert, tls_key;
  app.add_option("--tls-cert", tls_cert, "PEM certificate: the coordinator serves TLS (control.tls_cert)");
  app.add_option("--tls-key", tls_key, "PEM private key of --tls-cert (control.tls_key)");
  // Slurm.
  deploy::SlurmOptions so;
  bool submit = false;
  int add_workers = 0;
  std::string add_run_dir, sbatch = "sbatch";
  int gpus_per_node = -1, workers_per_node = 0;
  app.add_option("--nodes", so.nodes, "--slurm: nodes in the allocation")->capture_default_str();
  app.add_option("--gpus-per-node", gpus_per_node, "--slurm: GPUs per node, one worker each (0: CPU workers)");
  app.add_option("--workers-per-node", workers_per_node, "--slurm with CPU workers: worker tasks per node (default 1)");
  app.add_option("--partition", so.partition, "--slurm: sbatch --partition");
  app.add_option("--account", so.account, "--slurm: sbatch --account");
  app.add_option("--time", so.time_limit, "--slurm: sbatch --time (e.g. 24:00:00)");
  app.add_option("--port", so.port, "--slurm: the coordinator's gRPC port on the first node (0: any free one)")
      ->capture_default_str();
  app.add_option("--sbatch-arg", so.sbatch_args, "--slurm: one more #SBATCH option, e.g. --qos=high (repeatable)");
  app.add_option("--gyre-bin", so.gyre_bin, "--slurm: absolute path of gyre on the nodes (default: this binary)");
  app.add_flag("--submit", submit, "--slurm: run sbatch and print the job id");
  app.add_option("--sbatch", sbatch, "--slurm: the sbatch program")->capture_default_str();
  app.add_option("--add-workers", add_workers,
                 "--slurm: write (and with --submit, submit) a job of this many more workers for the run in --run-dir");
  app.add_option("--run-dir", add_run_dir, "--slurm --add-workers: the run directory");
  // Kubernetes.
  deploy::K8sOptions ko;
  app.add_option("--image", ko.image, "--k8s: container image holding gyre (and kubectl, for the provisioner)");
  app.add_option("--namespace", ko.namespace_name, "--k8s: namespace")->capture_default_str();
  app.add_option("--gpus-per-worker", ko.gpus_per_worker, "--k8s: 1 (a GPU per worker pod) or 0 (CPU workers)")
      ->capture_default_str();
  app.add_option("--claim", ko.claim, "--k8s: an existing ReadWriteMany PersistentVolumeClaim for /runs");
  app.add_option("--storage-class", ko.storage_class, "--k8s: storage class of the run volume claim it creates");
  app.add_option("--storage", ko.storage_size, "--k8s: size of the run volume claim it creates")->capture_default_str();
  app.add_option("--data-claim", ko.data_claim, "--k8s: a claim mounted read-only at /data (for data.index_dir)");
  app.add_option("--gyre-path", ko.gyre_path, "--k8s: gyre inside the image")->capture_default_str();
  app.add_option("--kubectl-path", ko.kubectl_path, "--k8s: kubectl inside the image")->capture_default_str();
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  if (static_cast<int>(local) + static_cast<int>(slurm) + static_cast<int>(k8s) != 1) {
    std::fprintf(stderr, "gyre launch: pick one of --local, --slurm or --k8s\n");
    return 2;
  }
  if (!slurm) {
    for (const char* flag : {"--nodes", "--gpus-per-node", "--workers-per-node", "--partition", "--account", "--time",
                             "--port", "--sbatch-arg", "--gyre-bin", "--submit", "--add-workers", "--run-dir"}) {
      if (app.count(flag) > 0) {
        std::fprintf(stderr, "gyre launch: %s belongs to --slurm\n", flag);
        return 2;
      }
    }
  }
  if (!k8s) {
    for (const char* flag : {"--image", "--namespace", "--gpus-per-worker", "--claim", "--storage-class", "--storage",
                             "--data-claim", "--gyre-path", "--kubectl-path"}) {
      if (app.count(flag) > 0) {
        std::fprintf(stderr, "gyre launch: %s belongs to --k8s\n", flag);
        return 2;
      }
    }
  }
  if (slurm && app.count("--add-workers") > 0) return AddSlurmWorkers(add_workers, add_run_dir, submit, sbatch);
  if (slurm && app.count("--run-dir") > 0) {
    std::fprintf(stderr, "gyre launch: --run-dir goes with --add-workers (a new run's directory is <runs-dir>/<run>)\n");
    return 2;
  }

  gyre::v1::RunConfig config;
  if (!config_path.empty()) {
    absl::StatusOr<gyre::v1::RunConfig> loaded = LoadRunConfig(config_path);
    if (!loaded.ok()) return Fail(2, loaded.status());
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

  if (slurm) {
    // The device decides the worker tasks: one per GPU, or --workers-per-node CPU workers.
    if (device == "auto") device = gpus_per_node > 0 ? "cuda" : "cpu";
    if (device == "cuda") {
      if (gpus_per_node < 1) {
        return Fail(2, absl::InvalidArgumentError("--device cuda: give --gpus-per-node G (one worker per GPU)"));
      }
      if (workers_per_node != 0 && workers_per_node != gpus_per_node) {
        return Fail(2, absl::InvalidArgumentError(absl::StrCat(
                           "--workers-per-node ", workers_per_node, ": GPU runs have one worker per GPU (--gpus-per-node ",
                           gpus_per_node, ")")));
      }
      so.gpus_per_node = gpus_per_node;
      so.workers_per_node = gpus_per_node;
    } else if (device == "cpu") {
      if (gpus_per_node > 0) {
        return Fail(2, absl::InvalidArgumentError(
                           absl::StrCat("--gpus-per-node ", gpus_per_node, " with --device cpu: CPU workers use no GPU")));
      }
      so.gpus_per_node = 0;
      so.workers_per_node = workers_per_node > 0 ? workers_per_node : 1;
    } else {
      return Fail(2, absl::InvalidArgumentError(absl::StrCat("--device ", device, ": expected auto, cuda or cpu")));
    }
    if (so.nodes < 1) return Fail(2, absl::InvalidArgumentError(absl::StrCat("--nodes ", so.nodes, ": need at least 1")));
    config.mutable_cluster()->set_desired_workers(app.count("--workers") > 0 ? workers
                                                                             : so.nodes * so.workers_per_node);
    // Jobs run from another directory on other nodes: every path they read must be absolute.
    if (!config.data().index_dir().empty()) config.mutable_data()->set_index_dir(Absolute(config.data().index_dir()));
  } else {
    config.mutable_cluster()->set_desired_workers(workers);
  }
  ApplyDefaults(&config);
  if (absl::Status s = ValidateRunConfig(config); !s.ok()) {
    std::fprintf(stderr, "gyre launch: invalid config: %s\n", std::string(s.message()).c_str());
    return 2;
  }
  if (k8s) {
    absl::StatusOr<nlohmann::json> manifests = deploy::K8sManifests(config, ko);
    if (!manifests.ok()) return Fail(2, manifests.status());
    const std::string dir = JoinPath(JoinPath(runs_dir, config.name()), "k8s");
    const std::string path = JoinPath(dir, "manifests.json");
    Env* env = Env::Default();
    if (absl::Status s = env->CreateDirs(dir); !s.ok()) return Fail(3, s);
    if (absl::Status s = WriteFileAtomically(env, path, manifests->dump(2) + "\n"); !s.ok()) return Fail(3, s);
    std::printf("kubectl apply -f %s\n", path.c_str());
    std::fprintf(stderr,
                 "gyre launch: wrote %s: run '%s' in namespace %s, %u worker pod(s)%s; data.index_dir %s must be a "
                 "path inside the pods%s\n",
                 path.c_str(), config.name().c_str(), ko.namespace_name.c_str(), config.cluster().desired_workers(),
                 ko.gpus_per_worker > 0 ? " with one GPU each" : " (CPU)", config.data().index_dir().c_str(),
                 ko.data_claim.empty() ? "" : " (--data-claim is mounted at /data)");
    return 0;
  }

  RunDir dir(JoinPath(slurm ? Absolute(runs_dir) : runs_dir, config.name()));
  Env* env = Env::Default();
  if (absl::Status s = env->CreateDirs(dir.root()); !s.ok()) return Fail(3, s);
  if (absl::Status s = WriteFileAtomically(env, dir.config_path(), RunConfigToJson(config)); !s.ok()) return Fail(3, s);

  if (slurm) {
    so.run_name = config.name();
    so.run_dir = dir.root();
    so.runs_dir = Absolute(runs_dir);
    so.config_path = dir.config_path();
    so.worker_args = worker_args;
    if (so.gyre_bin.empty()) so.gyre_bin = SelfExe();
    so.gyre_bin = Absolute(so.gyre_bin);
    if (absl::Status s = deploy::WriteSlurmFiles(so); !s.ok()) return Fail(s.code() == absl::StatusCode::kInvalidArgument ? 2 : 3, s);
    const std::string script = deploy::SlurmBatchPath(dir.root());
    std::fprintf(stderr,
                 "gyre launch: wrote %s: %d node(s) x %d %s worker(s), %u desired; the run dir must be on a file "
                 "system every node mounts\n",
                 script.c_str(), so.nodes, so.workers_per_node, so.gpus_per_node > 0 ? "GPU" : "CPU",
                 config.cluster().desired_workers());
    if (!submit) {
      std::printf("%s %s\n", sbatch.c_str(), script.c_str());
      return 0;
    }
    std::unique_ptr<deploy::CommandRunner> runner = deploy::NewSubprocessRunner();
    absl::StatusOr<deploy::CommandOutput> out = runner->Run({sbatch, script}, 60000);
    if (!out.ok()) return Fail(1, out.status());
    if (out->exit_code != 0) {
      std::fprintf(stderr, "gyre launch: `%s %s` failed (exit %d):\n%s", sbatch.c_str(), script.c_str(), out->exit_code,
                   out->output.c_str());
      return 1;
    }
    absl::StatusOr<std::string> job = deploy::ParseSbatchJobId(out->output);
    if (!job.ok()) return Fail(1, job.status());
    std::printf("submitted job %s (run '%s'; status: gyrectl --run-dir %s --coordinator $(cat %s) status)\n",
                job->c_str(), config.name().c_str(), dir.root().c_str(),
                deploy::SlurmEndpointPath(dir.root()).c_str());
    return 0;
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
      return Fail(2, s);
    }
    if (gpus > 0) {
      std::fprintf(stderr, "gyre launch: %d GPU(s) visible: GPU workers (NCCL), one GPU each\n", gpus);
    }
  }
  absl::Status s = deploy::RunLocal(options);
  if (!s.ok()) return Fail(1, s);
  return 0;
}

}  // namespace gyre::cli
