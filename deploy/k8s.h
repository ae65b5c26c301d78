// Kubernetes manifests for one run (`gyre launch --k8s`), DESIGN.md sections 2 and 5.
//
// One v1 List (JSON: kubectl applies it, and JSON is valid YAML) holding:
//   ConfigMap   <base>-config        the resolved run config (config.json)
//   PersistentVolumeClaim <base>-runs  ReadWriteMany, mounted at /runs by every pod: token,
//                                   journal, checkpoints, logs (left out with an existing claim)
//   ServiceAccount / Role / RoleBinding <base>-provisioner  may get and scale the worker StatefulSet
//   Deployment  <base>-coordinator   1 replica, Recreate (one journal writer); a restart resumes
//                                   from the journal. Sidecar `provisioner`: `gyre provision --k8s`
//                                   scales the worker StatefulSet to RunStatus.desired_workers
//                                   (needs kubectl in the image).
//   Service     <base>-coordinator   gRPC 50051 + HTTP 8080 (dashboard, /metrics)
//   Service     <base>-workers       headless, the StatefulSet's governing service
//   StatefulSet <base>-worker        replicas = desired workers, one GPU each (nvidia.com/gpu),
//                                   Parallel pod management; Kubernetes restarts a dead worker
// where <base> = gyre-<run name>. Workers reach the coordinator by its Service DNS name and are
// reached by peers at their pod IP (--hostname from the downward API).
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "gyre/v1/config.pb.h"
#include "nlohmann/json.hpp"

namespace gyre::deploy {

struct K8sOptions {
  std::string image;                // container image holding `gyre` (and kubectl for the provisioner)
  std::string namespace_name = "default";
  int gpus_per_worker = 1;          // 0: CPU workers; 1: one GPU per worker pod (never more: a worker drives one GPU)
  std::string claim;                // an existing ReadWriteMany claim for /runs; empty: create <base>-runs
  std::string storage_class;        // for the created claim; empty: the cluster's default
  std::string storage_size = "100Gi";
  std::string data_claim;           // optional claim mounted read-only at /data (point data.index_dir there)
  std::string gyre_path = "gyre";   // the binary inside the image
  std::string kubectl_path = "kubectl";
  std::string image_pull_policy = "IfNotPresent";
  int grpc_port = 50051;
  int http_port = 8080;
};

// Checks the options and the run name (a DNS-1123 label once prefixed); InvalidArgument naming
// the flag.
absl::Status ValidateK8sOptions(const K8sOptions& options, const std::string& run_name);

// "gyre-<run name>", the prefix of every object's name.
std::string K8sBaseName(const std::string& run_name);
// Path of the run directory inside the pods: /runs/<run name>.
std::string K8sRunDir(const std::string& run_name);

// The manifests. `config` is the resolved config; its control.listen / http_listen are set to the
// pods' ports in the ConfigMap copy.
absl::StatusOr<nlohmann::json> K8sManifests(const gyre::v1::RunConfig& config, const K8sOptions& options);

}  // namespace gyre::deploy
