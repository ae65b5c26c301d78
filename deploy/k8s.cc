#include "deploy/k8s.h"

#include "absl/strings/str_cat.h"
#include "cli/run_config.h"
#include "deploy/command_runner.h"

namespace gyre::deploy {
namespace {

using nlohmann::json;

// Object names are <base>-<suffix> with suffixes up to 12 characters, and StatefulSet pods add
// "-<ordinal>" and a revision-hash label: 40 characters of run name keep all under 63.
constexpr size_t kMaxRunNameChars = 40;

bool IsDnsLabel(const std::string& s) {
  if (s.empty() || s.size() > 63) return false;
  for (char c : s) {
    if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-')) return false;
  }
  return s.front() != '-' && s.back() != '-';
}

json Labels(const std::string& run_name, const std::string& component) {
  return {{"app.kubernetes.io/name", "gyre"},
          {"app.kubernetes.io/instance", run_name},
          {"app.kubernetes.io/component", component}};
}

json Metadata(const std::string& name, const K8sOptions& o, const std::string& run_name, const std::string& component) {
  return {{"name", name}, {"namespace", o.namespace_name}, {"labels", Labels(run_name, component)}};
}

}  // namespace

std::string K8sBaseName(const std::string& run_name) { return "gyre-" + run_name; }
std::string K8sRunDir(const std::string& run_name) { return "/runs/" + run_name; }

absl::Status ValidateK8sOptions(const K8sOptions& o, const std::string& run_name) {
  if (o.image.empty()) return absl::InvalidArgumentError("--image: the container image holding gyre is required");
  if (run_name.size() > kMaxRunNameChars || !IsDnsLabel(run_name)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--run '", run_name, "': Kubernetes object names need a run name of lowercase letters, digits and '-' (",
        kMaxRunNameChars, " characters at most, not starting or ending with '-')"));
  }
  if (!IsDnsLabel(o.namespace_name)) {
    return absl::InvalidArgumentError(absl::StrCat("--namespace '", o.namespace_name, "': not a DNS-1123 label"));
  }
  if (o.gpus_per_worker < 0 || o.gpus_per_worker > 1) {
    return absl::InvalidArgumentError(absl::StrCat("--gpus-per-worker ", o.gpus_per_worker,
                                                   ": 1 (one GPU per worker pod) or 0 (CPU workers); a worker drives "
                                                   "one GPU, so more workers means more replicas, not more GPUs each"));
  }
  if (!o.claim.empty() && !o.storage_class.empty()) {
    return absl::InvalidArgumentError("--claim and --storage-class: an existing claim already has its storage class");
  }
  if (!o.claim.empty() && !IsDnsLabel(o.claim) && o.claim.find('.') == std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat("--claim '", o.claim, "': not a valid claim name"));
  }
  if (o.storage_size.empty()) return absl::InvalidArgumentError("--storage: the run volume needs a size, e.g. 100Gi");
  for (int port : {o.grpc_port, o.http_port}) {
    if (port < 1 || port > 65535) return absl::InvalidArgumentError(absl::StrCat("port ", port, ": not a TCP port"));
  }
  return absl::OkStatus();
}

absl::StatusOr<json> K8sManifests(const gyre::v1::RunConfig& resolved, const K8sOptions& o) {
  const std::string& name = resolved.name();
  if (absl::Status s = ValidateK8sOptions(o, name); !s.ok()) return s;
  const std::string base = K8sBaseName(name);
  const std::string run_dir = K8sRunDir(name);
  const std::string statefulset = base + "-worker";
  const std::string coordinator_service = base + "-coordinator";
  const std::string claim = o.claim.empty() ? base + "-runs" : o.claim;
  const std::string provisioner = base + "-provisioner";

  // The pods' copy of the config listens on all interfaces at the Service's ports.
  gyre::v1::RunConfig config = resolved;
  config.mutable_control()->set_listen(absl::StrCat("0.0.0.0:", o.grpc_port));
  config.mutable_control()->set_http_listen(absl::StrCat("0.0.0.0:", o.http_port));
  const int replicas = static_cast<int>(config.cluster().desired_workers());

  json items = json::array();
  items.push_back({{"apiVersion", "v1"},
                   {"kind", "ConfigMap"},
                   {"metadata", Metadata(base + "-config", o, name, "config")},
                   {"data", {{"config.json", cli::RunConfigToJson(config)}}}});
  if (o.claim.empty()) {
    json spec = {{"accessModes", json::array({"ReadWriteMany"})}, {"resources", {{"requests", {{"storage", o.storage_size}}}}}};
    if (!o.storage_class.empty()) spec["storageClassName"] = o.storage_class;
    items.push_back({{"apiVersion", "v1"},
                     {"kind", "PersistentVolumeClaim"},
                     {"metadata", Metadata(claim, o, name, "run-dir")},
                     {"spec", spec}});
  }
  items.push_back({{"apiVersion", "v1"},
                   {"kind", "ServiceAccount"},
                   {"metadata", Metadata(provisioner, o, name, "provisioner")}});
  items.push_back({{"apiVersion", "rbac.authorization.k8s.io/v1"},
                   {"kind", "Role"},
                   {"metadata", Metadata(provisioner, o, name, "provisioner")},
                   {"rules",
                    {{{"apiGroups", json::array({"apps"})},
                      {"resources", json::array({"statefulsets"})},
                      {"resourceNames", json::array({statefulset})},
                      {"verbs", json::array({"get", "list", "watch"})}},
                     {{"apiGroups", json::array({"apps"})},
                      {"resources", json::array({"statefulsets/scale"})},
                      {"resourceNames", json::array({statefulset})},
                      {"verbs", json::array({"get", "update", "patch"})}}}}});
  items.push_back({{"apiVersion", "rbac.authorization.k8s.io/v1"},
                   {"kind", "RoleBinding"},
                   {"metadata", Metadata(provisioner, o, name, "provisioner")},
                   {"roleRef", {{"apiGroup", "rbac.authorization.k8s.io"}, {"kind", "Role"}, {"name", provisioner}}},
                   {"subjects", json::array({{{"kind", "ServiceAccount"}, {"name", provisioner}, {"namespace", o.namespace_name}}})}});

  const json run_volume = {{"name", "runs"}, {"persistentVolumeClaim", {{"claimName", claim}}}};
  const json run_mount = {{"name", "runs"}, {"mountPath", "/runs"}};
  json data_volumes = json::array(), data_mounts = json::array();
  if (!o.data_claim.empty()) {
    data_volumes.push_back({{"name", "data"}, {"persistentVolumeClaim", {{"claimName", o.data_claim}, {"readOnly", true}}}});
    data_mounts.push_back({{"name", "data"}, {"mountPath", "/data"}, {"readOnly", true}});
  }

  // Coordinator pod: the coordinator + the provisioner sidecar.
  json coordinator_mounts = json::array({run_mount, {{"name", "config"}, {"mountPath", "/etc/gyre"}, {"readOnly", true}}});
  for (const json& m : data_mounts) coordinator_mounts.push_back(m);
  json coordinator_volumes = json::array({run_volume, {{"name", "config"}, {"configMap", {{"name", base + "-config"}}}}});
  for (const json& v : data_volumes) coordinator_volumes.push_back(v);
  json coordinator_container = {
      {"name", "coordinator"},
      {"image", o.image},
      {"imagePullPolicy", o.image_pull_policy},
      {"command",
       {o.gyre_path, "coordinator", "--config", "/etc/gyre/config.json", "--runs-dir", "/runs", "--listen",
        absl::StrCat("0.0.0.0:", o.grpc_port)}},
      {"ports",
       {{{"name", "grpc"}, {"containerPort", o.grpc_port}}, {{"name", "http"}, {"containerPort", o.http_port}}}},
      {"readinessProbe", {{"tcpSocket", {{"port", "grpc"}}}, {"periodSeconds", 5}}},
      {"volumeMounts", coordinator_mounts}};
  json provisioner_container = {
      {"name", "provisioner"},
      {"image", o.image},
      {"imagePullPolicy", o.image_pull_policy},
      {"command",
       {o.gyre_path, "provision", "--k8s", "--statefulset", statefulset, "--namespace", o.namespace_name, "--run-dir",
        run_dir, "--coordinator", absl::StrCat("127.0.0.1:", o.grpc_port), "--kubectl", o.kubectl_path, "--linger"}},
      {"volumeMounts", json::array({run_mount})}};
  const json coordinator_selector = Labels(name, "coordinator");
  items.push_back(
      {{"apiVersion", "apps/v1"},
       {"kind", "Deployment"},
       {"metadata", Metadata(base + "-coordinator", o, name, "coordinator")},
       {"spec",
        {{"replicas", 1},
         {"strategy", {{"type", "Recreate"}}},  // never two journal writers
         {"selector", {{"matchLabels", coordinator_selector}}},
         {"template",
          {{"metadata", {{"labels", coordinator_selector}}},
           {"spec",
            {{"serviceAccountName", provisioner},
             {"containers", json::array({coordinator_container, provisioner_container})},
             {"volumes", coordinator_volumes}}}}}}}});
  items.push_back({{"apiVersion", "v1"},
                   {"kind", "Service"},
                   {"metadata", Metadata(coordinator_service, o, name, "coordinator")},
                   {"spec",
                    {{"selector", coordinator_selector},
                     {"ports",
                      {{{"name", "grpc"}, {"port", o.grpc_port}, {"targetPort", "grpc"}},
                       {{"name", "http"}, {"port", o.http_port}, {"targetPort", "http"}}}}}}});

  // Workers.
  const json worker_selector = Labels(name, "worker");
  const std::string device = o.gpus_per_worker > 0 ? "cuda:0" : "cpu";
  // Wait for the token (the coordinator creates it on the shared volume), then become the worker.
  const std::string worker_script = absl::StrCat(
      "until [ -s ", ShellQuote(run_dir + "/token"), " ]; do echo 'waiting for the coordinator to create ", run_dir,
      "/token'; sleep 2; done; exec ", ShellQuote(o.gyre_path), " worker --run-dir ", ShellQuote(run_dir),
      " --coordinator ", ShellQuote(absl::StrCat(coordinator_service, ":", o.grpc_port)), " --device ", device,
      " --hostname \"$POD_IP\"");
  json worker_container = {{"name", "worker"},
                           {"image", o.image},
                           {"imagePullPolicy", o.image_pull_policy},
                           {"command", {"/bin/sh", "-c", worker_script}},
                           {"env", json::array({{{"name", "POD_IP"}, {"valueFrom", {{"fieldRef", {{"fieldPath", "status.podIP"}}}}}}})},
                           {"volumeMounts", json::array({run_mount})}};
  for (const json& m : data_mounts) worker_container["volumeMounts"].push_back(m);
  if (o.gpus_per_worker > 0) {
    worker_container["resources"] = {{"limits", {{"nvidia.com/gpu", std::to_string(o.gpus_per_worker)}}}};
  }
  json worker_volumes = json::array({run_volume});
  for (const json& v : data_volumes) worker_volumes.push_back(v);
  items.push_back({{"apiVersion", "v1"},
                   {"kind", "Service"},
                   {"metadata", Metadata(base + "-workers", o, name, "worker")},
                   {"spec", {{"clusterIP", "None"}, {"selector", worker_selector}}}});
  items.push_back({{"apiVersion", "apps/v1"},
                   {"kind", "StatefulSet"},
                   {"metadata", Metadata(statefulset, o, name, "worker")},
                   {"spec",
                    {{"replicas", replicas},
                     {"serviceName", base + "-workers"},
                     {"podManagementPolicy", "Parallel"},
                     {"selector", {{"matchLabels", worker_selector}}},
                     {"template",
                      {{"metadata", {{"labels", worker_selector}}},
                       {"spec", {{"containers", json::array({worker_container})}, {"volumes", worker_volumes}}}}}}}});
  return json{{"apiVersion", "v1"}, {"kind", "List"}, {"items", items}};
}

}  // namespace gyre::deploy
