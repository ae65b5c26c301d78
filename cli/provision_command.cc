// `gyre provision`: the cluster provisioners and the worker supervisor (deploy/provisioner.h,
// deploy/worker_supervisor.h). Started by the launch files `gyre launch --slurm / --k8s` write:
//   --k8s --statefulset NAME --run-dir DIR   scale the workers' StatefulSet to desired_workers
//   --slurm --run-dir DIR --allocation-workers M   submit worker-only jobs beyond the allocation
//   --supervise-worker --run-dir DIR [-- WORKER ARGS]   keep one `gyre worker` alive
// The coordinator is found as gyrectl finds it: --coordinator / --token-file, else the run dir.
#include <csignal>
#include <cstdio>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/strings/str_cat.h"
#include "base/clock.h"
#include "base/env.h"
#include "cli/commands.h"
#include "cli/control_client.h"
#include "deploy/command_runner.h"
#include "deploy/provisioner.h"
#include "deploy/slurm.h"
#include "deploy/worker_supervisor.h"

namespace gyre::cli {
namespace {

volatile std::sig_atomic_t g_provision_stop = 0;
void OnProvisionStop(int) { g_provision_stop = 1; }

}  // namespace

int RunProvision(int argc, char** argv) {
  CLI::App app{"gyre provision: match a cluster's worker processes to the run's desired worker count"};
  bool k8s = false, slurm = false, supervise = false, linger = false;
  std::string run_dir, coordinator, token_file, tls_ca;
  deploy::K8sProvisionerOptions k8s_options;
  int allocation_workers = -1;
  std::string sbatch = "sbatch";
  int64_t poll_ms = 2000;
  std::vector<std::string> worker_args;
  app.add_flag("--k8s", k8s, "scale a Kubernetes StatefulSet of workers with kubectl");
  app.add_flag("--slurm", slurm, "submit worker-only Slurm jobs beyond the run's allocation");
  app.add_flag("--supervise-worker", supervise, "run one `gyre worker` and restart it after a crash or kill");
  app.add_option("--run-dir", run_dir, "the run directory (token; coordinator.addr; slurm/launch.json)")->required();
  app.add_option("--coordinator", coordinator, "coordinator host:port (default: <run-dir>/coordinator.addr)");
  app.add_option("--token-file", token_file, "bearer token file (default: <run-dir>/token)");
  app.add_option("--tls-ca", tls_ca, "PEM CA file to trust (default: <run-dir>/tls-ca.pem if present)");
  app.add_option("--statefulset", k8s_options.statefulset, "--k8s: the workers' StatefulSet");
  app.add_option("--namespace", k8s_options.namespace_name, "--k8s: its namespace (default: kubectl's)");
  app.add_option("--kubectl", k8s_options.kubectl, "--k8s: the kubectl program")->capture_default_str();
  app.add_flag("--linger", linger, "after the run is over, stay up until a signal (a sidecar container)");
  app.add_option("--allocation-workers", allocation_workers, "--slurm: worker tasks inside the run's own job");
  app.add_option("--sbatch", sbatch, "--slurm: the sbatch program")->capture_default_str();
  app.add_option("--poll-ms", poll_ms, "how often to read the coordinator's status")->capture_default_str();
  app.add_option("worker_args", worker_args, "--supervise-worker: after `--`, extra `gyre worker` arguments");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  if (static_cast<int>(k8s) + static_cast<int>(slurm) + static_cast<int>(supervise) != 1) {
    std::fprintf(stderr, "gyre provision: pick one of --k8s, --slurm or --supervise-worker\n");
    return 2;
  }
  if (!supervise && !worker_args.empty()) {
    std::fprintf(stderr, "gyre provision: unexpected argument '%s' (worker arguments go with --supervise-worker)\n",
                 worker_args.front().c_str());
    return 2;
  }
  if (poll_ms < 10) {
    std::fprintf(stderr, "gyre provision: --poll-ms %lld: at least 10\n", static_cast<long long>(poll_ms));
    return 2;
  }
  deploy::StatusSource status = [&]() -> absl::StatusOr<gyre::v1::RunStatus> {
    absl::StatusOr<ControlTarget> target = ResolveControlTarget(run_dir, coordinator, token_file, tls_ca);
    if (!target.ok()) return target.status();
    return ControlClient(*target, 5000).GetStatus();
  };
  auto report = [](const absl::Status& s) {
    if (s.ok()) return 0;
    std::fprintf(stderr, "gyre provision: %s\n", std::string(s.message()).c_str());
    return absl::IsCancelled(s) ? 0 : 1;
  };

  if (supervise) {
    deploy::SuperviseOptions options;
    options.worker_args = {"--run-dir", run_dir};
    if (!coordinator.empty()) options.worker_args.insert(options.worker_args.end(), {"--coordinator", coordinator});
    if (!token_file.empty()) options.worker_args.insert(options.worker_args.end(), {"--token-file", token_file});
    if (!tls_ca.empty()) options.worker_args.insert(options.worker_args.end(), {"--tls-ca", tls_ca});
    options.worker_args.insert(options.worker_args.end(), worker_args.begin(), worker_args.end());
    return report(deploy::SuperviseWorker(options, status));
  }

  std::signal(SIGTERM, OnProvisionStop);
  std::signal(SIGINT, OnProvisionStop);
  deploy::StopRequested stop = [] { return g_provision_stop != 0; };
  std::unique_ptr<deploy::CommandRunner> runner = deploy::NewSubprocessRunner();
  absl::Status result;
  if (k8s) {
    if (k8s_options.statefulset.empty()) {
      std::fprintf(stderr, "gyre provision: --k8s needs --statefulset NAME (the workers' StatefulSet)\n");
      return 2;
    }
    k8s_options.poll_ms = poll_ms;
    result = deploy::RunK8sProvisioner(k8s_options, status, runner.get(), Clock::Real(), stop);
  } else {
    if (allocation_workers < 0) {
      std::fprintf(stderr, "gyre provision: --slurm needs --allocation-workers M (worker tasks in the run's job)\n");
      return 2;
    }
    const std::string launch = deploy::SlurmLaunchPath(run_dir);
    absl::StatusOr<std::string> json = Env::Default()->ReadFile(launch);
    if (!json.ok()) return report(json.status());
    absl::StatusOr<deploy::SlurmOptions> slurm_options = deploy::SlurmOptionsFromJson(*json, launch);
    if (!slurm_options.ok()) return report(slurm_options.status());
    deploy::SlurmProvisionerOptions options;
    options.slurm = *slurm_options;
    options.allocation_workers = allocation_workers;
    options.sbatch = sbatch;
    options.poll_ms = poll_ms;
    result = deploy::RunSlurmProvisioner(options, status, runner.get(), Clock::Real(), stop);
  }
  if (result.ok() && linger) {
    std::fprintf(stderr, "gyre provision: lingering until a signal\n");
    while (!stop()) Clock::Real()->SleepMicros(200 * 1000);
  }
  return report(result);
}

}  // namespace gyre::cli
