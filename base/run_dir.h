// The run directory, runs/<name>/ (DESIGN.md section 7): one place that names its files, shared
// by the coordinator (writes), the workers, gyrectl and the launcher (read).
//
//   config.json      resolved gyre.v1.RunConfig (protobuf JSON)
//   journal/         the coordinator's RocksDB journal
//   checkpoints/     step-<t>/ directories
//   logs/            one log per process
//   token            control bearer token, mode 0600
//   coordinator.addr host:port of the coordinator's gRPC server (written once it listens)
//   http.addr        host:port of the dashboard / metrics HTTP server
//   tls-ca.pem       when the coordinator serves TLS: the CA certificate(s) its clients trust
//                    (workers, gyrectl and the launcher use TLS exactly when this file exists)
//   tb/              TensorBoard event files
//   slurm/           `gyre launch --slurm`: run.sbatch, worker-task.sh, launch.json,
//                    coordinator.endpoint, workers-<k>.sbatch (provisioner), job-<id>.out
//   k8s/             `gyre launch --k8s`: manifests.json (a v1 List)
#pragma once

#include <string>

#include "absl/status/statusor.h"

namespace gyre {

class RunDir {
 public:
  explicit RunDir(std::string root) : root_(std::move(root)) {}
  const std::string& root() const { return root_; }
  std::string config_path() const { return root_ + "/config.json"; }
  std::string journal_dir() const { return root_ + "/journal"; }
  std::string checkpoints_dir() const { return root_ + "/checkpoints"; }
  std::string logs_dir() const { return root_ + "/logs"; }
  std::string token_path() const { return root_ + "/token"; }
  std::string control_address_path() const { return root_ + "/coordinator.addr"; }
  std::string http_address_path() const { return root_ + "/http.addr"; }
  std::string tls_ca_path() const { return root_ + "/tls-ca.pem"; }
  std::string tensorboard_dir() const { return root_ + "/tb"; }

 private:
  std::string root_;
};

// Creates a fresh random bearer token (256 bits from /dev/urandom, hex) at `path`, mode 0600,
// unless one already exists there (a restarted coordinator keeps its token). Returns the token.
absl::StatusOr<std::string> CreateOrReadToken(const std::string& path);

// Reads a token file. Refuses (PermissionDenied) a file that group or others can read: a
// leaked token grants full control of the run.
absl::StatusOr<std::string> ReadToken(const std::string& path);

}  // namespace gyre
