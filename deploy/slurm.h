// Slurm launch files for one run (`gyre launch --slurm`), DESIGN.md section 2 and 5.
//
// run.sbatch (the job): the batch script runs on the first node of the allocation, so that node
// hosts the coordinator (listening on 0.0.0.0; workers reach it as <first node's name>:<port>,
// never 127.0.0.1) and the Slurm provisioner (`gyre provision --slurm`). `srun` starts
// workers_per_node worker tasks on every node (worker-task.sh): each is a `gyre provision
// --supervise-worker` that restarts its worker after a crash or kill unless the run is over
// (a crash loop gives up, like the local launcher). The job ends when the run is over.
//
// Scaling: `gyrectl scale N` with N <= the allocation's workers leaves the extra workers as
// standbys inside the allocation; N above it makes the provisioner submit worker-only jobs
// (workers-<k>.sbatch, `gyre launch --slurm --add-workers K`) that join the same coordinator.
//
// The run directory must be on a file system every node mounts at the same path (token,
// coordinator endpoint, checkpoints, logs).
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace gyre::deploy {

struct SlurmOptions {
  std::string run_name;
  std::string gyre_bin;     // absolute path of the gyre binary, the same on every node
  std::string run_dir;      // absolute; on a shared file system
  std::string runs_dir;     // absolute; the run dir's parent (`gyre coordinator --runs-dir`)
  std::string config_path;  // absolute; the resolved config (<run_dir>/config.json)
  int nodes = 1;
  int gpus_per_node = 0;      // 0: CPU workers (`--device cpu`); > 0: one worker per GPU
  int workers_per_node = 1;   // worker tasks per node; equals gpus_per_node for GPU runs
  std::string partition;      // empty: the cluster's default
  std::string account;
  std::string time_limit;     // sbatch --time, e.g. "24:00:00"; empty: the partition default
  int port = 0;               // coordinator gRPC port on the first node; 0: a free one (kept across restarts)
  std::vector<std::string> worker_args;  // appended to every `gyre worker`
  std::vector<std::string> sbatch_args;  // extra `#SBATCH` options, e.g. "--qos=high"
};

// Checks the options; InvalidArgument naming the flag (--nodes, --gpus-per-node, ...).
absl::Status ValidateSlurmOptions(const SlurmOptions& options);

// <run_dir>/slurm/ file names.
std::string SlurmDir(const std::string& run_dir);
std::string SlurmBatchPath(const std::string& run_dir);       // run.sbatch
std::string SlurmWorkerTaskPath(const std::string& run_dir);  // worker-task.sh
std::string SlurmEndpointPath(const std::string& run_dir);    // coordinator.endpoint: host:port
std::string SlurmLaunchPath(const std::string& run_dir);      // launch.json: these options
std::string SlurmWorkersBatchPath(const std::string& run_dir, int sequence);  // workers-<sequence>.sbatch

// The texts of the files (bash). Deterministic for given options.
std::string SlurmBatchScript(const SlurmOptions& options);
std::string SlurmWorkerTaskScript(const SlurmOptions& options);
// A worker-only job of `workers` tasks that joins the run's coordinator (the endpoint file).
std::string SlurmWorkersBatchScript(const SlurmOptions& options, int workers);

// launch.json round trip, so `gyre provision --slurm` and `--add-workers` reuse the launch's options.
std::string SlurmOptionsToJson(const SlurmOptions& options);
absl::StatusOr<SlurmOptions> SlurmOptionsFromJson(const std::string& json, const std::string& path_for_errors);

// Writes run.sbatch + worker-task.sh (executable) + launch.json under <run_dir>/slurm/.
absl::Status WriteSlurmFiles(const SlurmOptions& options);

// The job id of sbatch's "Submitted batch job 123" (or --parsable's "123[;cluster]").
absl::StatusOr<std::string> ParseSbatchJobId(const std::string& sbatch_output);

}  // namespace gyre::deploy
