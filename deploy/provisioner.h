// Provisioners (DESIGN.md section 5): loops that read the coordinator's RunStatus.desired_workers
// and make the cluster manager start or stop worker processes to match. The local one lives in
// local_launcher.h; these drive Kubernetes (`kubectl scale statefulset`) and Slurm (worker-only
// jobs through `sbatch`). External programs run through a CommandRunner, the coordinator is read
// through a StatusSource and time passes through a Clock, so the loops are testable as they are.
//
// Thread-safety: each call runs on the caller's thread and owns nothing shared.
#pragma once

#include <functional>
#include <string>

#include "absl/status/statusor.h"
#include "base/clock.h"
#include "deploy/command_runner.h"
#include "deploy/slurm.h"
#include "gyre/v1/control.pb.h"

namespace gyre::deploy {

// One GetStatus of the run's coordinator (cli::ControlClient in production).
using StatusSource = std::function<absl::StatusOr<gyre::v1::RunStatus>()>;
// Polled between steps of a loop; true ends it with Cancelled (SIGTERM in `gyre provision`).
using StopRequested = std::function<bool()>;

// STOPPED or FINISHED: no worker is needed any more.
bool RunIsOver(const gyre::v1::RunStatus& status);

struct K8sProvisionerOptions {
  std::string statefulset;               // the workers' StatefulSet
  std::string namespace_name;            // empty: kubectl's current namespace
  std::string kubectl = "kubectl";
  int64_t poll_ms = 2000;
  int64_t command_timeout_ms = 60000;
  // After the run is over, workers may still be leaving (rank 0 writes the final checkpoint and
  // reports it): the StatefulSet goes to 0 once no worker is active or standby, or after this.
  int64_t leave_grace_ms = 120000;
};

// `kubectl [-n NS] scale statefulset NAME --replicas=N` whenever desired_workers differs from what
// was last applied (the first status applies it once). A failed kubectl is reported and retried
// at the next poll; an unreachable coordinator (restarting) is waited for. When the run is over
// and its workers have left (or leave_grace_ms passed) it scales the StatefulSet to 0 and
// returns OK.
absl::Status RunK8sProvisioner(const K8sProvisionerOptions& options, const StatusSource& status, CommandRunner* runner,
                               Clock* clock, const StopRequested& stop);

struct SlurmProvisionerOptions {
  SlurmOptions slurm;           // the run's launch options (launch.json)
  int allocation_workers = 0;   // worker tasks inside the run's own job
  std::string sbatch = "sbatch";
  int64_t poll_ms = 2000;
  int64_t retry_ms = 30000;     // after a failed sbatch
  int64_t command_timeout_ms = 60000;
};

// While desired_workers exceeds the allocation plus the workers of jobs already submitted, writes
// a workers-<k>.sbatch for the difference and submits it. Fewer desired workers: nothing (the
// extra workers wait as standbys; their jobs end with the run). Returns OK when the run is over.
absl::Status RunSlurmProvisioner(const SlurmProvisionerOptions& options, const StatusSource& status,
                                 CommandRunner* runner, Clock* clock, const StopRequested& stop);

// Writes <run_dir>/slurm/workers-<next>.sbatch for `workers` extra workers and, when `submit`,
// runs `<sbatch> <file>`. Returns the job id (submitted) or the file's path (not submitted).
absl::StatusOr<std::string> WriteAndSubmitSlurmWorkers(const SlurmOptions& options, int workers, bool submit,
                                                       const std::string& sbatch, CommandRunner* runner,
                                                       int64_t timeout_ms = 60000);

}  // namespace gyre::deploy
