// The Kubernetes manifests, parsed back as JSON: the kinds, replicas = desired workers, GPU
// limits, the shared run volume, the address workers get, the provisioner's rights and command.
#include "deploy/k8s.h"

#include <map>

#include "gtest/gtest.h"

namespace gyre::deploy {
namespace {

using nlohmann::json;

gyre::v1::RunConfig Config(uint32_t desired) {
  gyre::v1::RunConfig c;
  c.set_name("demo");
  c.mutable_model()->set_preset("llama-125m");
  c.mutable_data()->set_index_dir("/data/index");
  c.mutable_data()->set_global_batch(16);
  c.mutable_cluster()->set_desired_workers(desired);
  return c;
}

K8sOptions Options() {
  K8sOptions o;
  o.image = "registry.example/gyre:1";
  o.namespace_name = "ml";
  o.storage_class = "nfs";
  return o;
}

// Parses the text kubectl would read, so the test sees exactly what is written.
json Emit(const gyre::v1::RunConfig& c, const K8sOptions& o) {
  absl::StatusOr<json> m = K8sManifests(c, o);
  EXPECT_TRUE(m.ok()) << m.status();
  if (!m.ok()) return json();
  return json::parse(m->dump(2));
}

const json& Find(const json& list, const std::string& kind, const std::string& name) {
  for (const json& item : list["items"]) {
    if (item["kind"] == kind && item["metadata"]["name"] == name) return item;
  }
  static const json kNull;
  ADD_FAILURE() << "no " << kind << " " << name;
  return kNull;
}

TEST(K8sManifestsTest, IsAListOfTheExpectedObjects) {
  const json m = Emit(Config(4), Options());
  ASSERT_TRUE(m.is_object());
  EXPECT_EQ(m["apiVersion"], "v1");
  EXPECT_EQ(m["kind"], "List");
  std::multimap<std::string, std::string> objects;
  for (const json& item : m["items"]) {
    objects.emplace(item["kind"].get<std::string>(), item["metadata"]["name"].get<std::string>());
    EXPECT_EQ(item["metadata"]["namespace"], "ml");
    EXPECT_EQ(item["metadata"]["labels"]["app.kubernetes.io/instance"], "demo");
  }
  const std::multimap<std::string, std::string> expected = {
      {"ConfigMap", "gyre-demo-config"},          {"PersistentVolumeClaim", "gyre-demo-runs"},
      {"ServiceAccount", "gyre-demo-provisioner"}, {"Role", "gyre-demo-provisioner"},
      {"RoleBinding", "gyre-demo-provisioner"},   {"Deployment", "gyre-demo-coordinator"},
      {"Service", "gyre-demo-coordinator"},       {"Service", "gyre-demo-workers"},
      {"StatefulSet", "gyre-demo-worker"}};
  EXPECT_EQ(objects, expected);
  const json& pvc = Find(m, "PersistentVolumeClaim", "gyre-demo-runs");
  EXPECT_EQ(pvc["spec"]["accessModes"], json::array({"ReadWriteMany"}));
  EXPECT_EQ(pvc["spec"]["storageClassName"], "nfs");
  EXPECT_EQ(pvc["spec"]["resources"]["requests"]["storage"], "100Gi");
}

TEST(K8sManifestsTest, WorkersMatchTheDesiredCountWithAGpuEachAndReachTheService) {
  const json m = Emit(Config(4), Options());
  const json& sts = Find(m, "StatefulSet", "gyre-demo-worker");
  EXPECT_EQ(sts["spec"]["replicas"], 4);
  EXPECT_EQ(sts["spec"]["serviceName"], "gyre-demo-workers");
  EXPECT_EQ(sts["spec"]["podManagementPolicy"], "Parallel");
  EXPECT_EQ(sts["spec"]["selector"]["matchLabels"], sts["spec"]["template"]["metadata"]["labels"]);
  const json& worker = sts["spec"]["template"]["spec"]["containers"][0];
  EXPECT_EQ(worker["image"], "registry.example/gyre:1");
  EXPECT_EQ(worker["resources"]["limits"]["nvidia.com/gpu"], "1");
  const std::string script = worker["command"][2];
  EXPECT_NE(script.find("exec gyre worker --run-dir /runs/demo --coordinator gyre-demo-coordinator:50051 --device "
                        "cuda:0 --hostname \"$POD_IP\""),
            std::string::npos)
      << script;
  EXPECT_NE(script.find("until [ -s /runs/demo/token ]"), std::string::npos) << script;
  EXPECT_EQ(worker["env"][0]["valueFrom"]["fieldRef"]["fieldPath"], "status.podIP");
  EXPECT_EQ(worker["volumeMounts"][0]["mountPath"], "/runs");
  EXPECT_EQ(sts["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"], "gyre-demo-runs");
  // The Service the workers dial selects the coordinator pod and carries both ports.
  const json& svc = Find(m, "Service", "gyre-demo-coordinator");
  const json& dep = Find(m, "Deployment", "gyre-demo-coordinator");
  EXPECT_EQ(svc["spec"]["selector"], dep["spec"]["template"]["metadata"]["labels"]);
  EXPECT_EQ(svc["spec"]["ports"][0]["port"], 50051);
  EXPECT_EQ(svc["spec"]["ports"][1]["port"], 8080);
  EXPECT_EQ(Find(m, "Service", "gyre-demo-workers")["spec"]["clusterIP"], "None");

  K8sOptions cpu = Options();
  cpu.gpus_per_worker = 0;
  const json c = Emit(Config(2), cpu);
  const json& cw = Find(c, "StatefulSet", "gyre-demo-worker");
  EXPECT_EQ(cw["spec"]["replicas"], 2);
  EXPECT_FALSE(cw["spec"]["template"]["spec"]["containers"][0].contains("resources"));
  EXPECT_NE(cw["spec"]["template"]["spec"]["containers"][0]["command"][2].get<std::string>().find("--device cpu"),
            std::string::npos);
}

TEST(K8sManifestsTest, CoordinatorListensOnThePodsPortsAndTheSidecarScalesTheWorkers) {
  const json m = Emit(Config(3), Options());
  const json& dep = Find(m, "Deployment", "gyre-demo-coordinator");
  EXPECT_EQ(dep["spec"]["replicas"], 1);
  EXPECT_EQ(dep["spec"]["strategy"]["type"], "Recreate");
  const json& pod = dep["spec"]["template"]["spec"];
  EXPECT_EQ(pod["serviceAccountName"], "gyre-demo-provisioner");
  ASSERT_EQ(pod["containers"].size(), 2u);
  const json& coordinator = pod["containers"][0];
  EXPECT_EQ(coordinator["command"], json::array({"gyre", "coordinator", "--config", "/etc/gyre/config.json",
                                                 "--runs-dir", "/runs", "--listen", "0.0.0.0:50051"}));
  const json& provisioner = pod["containers"][1];
  EXPECT_EQ(provisioner["command"],
            json::array({"gyre", "provision", "--k8s", "--statefulset", "gyre-demo-worker", "--namespace", "ml",
                          "--run-dir", "/runs/demo", "--coordinator", "127.0.0.1:50051", "--kubectl", "kubectl",
                          "--linger"}));
  // The config the pods read: the run's own, listening on all interfaces.
  const json config = json::parse(Find(m, "ConfigMap", "gyre-demo-config")["data"]["config.json"].get<std::string>());
  EXPECT_EQ(config["name"], "demo");
  EXPECT_EQ(config["control"]["listen"], "0.0.0.0:50051");
  EXPECT_EQ(config["control"]["http_listen"], "0.0.0.0:8080");
  EXPECT_EQ(config["cluster"]["desired_workers"], 3);
  // The provisioner may scale exactly this StatefulSet.
  const json& role = Find(m, "Role", "gyre-demo-provisioner");
  bool may_scale = false;
  for (const json& rule : role["rules"]) {
    if (rule["resources"] == json::array({"statefulsets/scale"})) {
      may_scale = rule["resourceNames"] == json::array({"gyre-demo-worker"}) &&
                  rule["verbs"].dump().find("patch") != std::string::npos;
    }
  }
  EXPECT_TRUE(may_scale) << role.dump(2);
  const json& binding = Find(m, "RoleBinding", "gyre-demo-provisioner");
  EXPECT_EQ(binding["subjects"][0]["name"], "gyre-demo-provisioner");
  EXPECT_EQ(binding["roleRef"]["name"], "gyre-demo-provisioner");
}

TEST(K8sManifestsTest, AnExistingClaimReplacesTheCreatedOne) {
  K8sOptions o = Options();
  o.storage_class.clear();
  o.claim = "shared-runs";
  o.data_claim = "corpora";
  const json m = Emit(Config(1), o);
  for (const json& item : m["items"]) EXPECT_NE(item["kind"], "PersistentVolumeClaim");
  const json& pod = Find(m, "StatefulSet", "gyre-demo-worker")["spec"]["template"]["spec"];
  EXPECT_EQ(pod["volumes"][0]["persistentVolumeClaim"]["claimName"], "shared-runs");
  EXPECT_EQ(pod["volumes"][1]["persistentVolumeClaim"]["claimName"], "corpora");
  EXPECT_EQ(pod["containers"][0]["volumeMounts"][1]["mountPath"], "/data");
  EXPECT_EQ(pod["containers"][0]["volumeMounts"][1]["readOnly"], true);
}

TEST(K8sOptionsTest, ErrorsNameTheFlag) {
  auto error_of = [](auto mutate, const std::string& run = "demo") {
    K8sOptions o = Options();
    mutate(o);
    return std::string(ValidateK8sOptions(o, run).message());
  };
  auto has = [](const std::string& text, const std::string& needle) { return text.find(needle) != std::string::npos; };
  EXPECT_TRUE(ValidateK8sOptions(Options(), "demo").ok());
  EXPECT_TRUE(has(error_of([](K8sOptions& o) { o.image.clear(); }), "--image"));
  EXPECT_TRUE(has(error_of([](K8sOptions& o) { o.gpus_per_worker = 2; }), "--gpus-per-worker 2"));
  EXPECT_TRUE(has(error_of([](K8sOptions& o) { o.namespace_name = "ML"; }), "--namespace 'ML'"));
  EXPECT_TRUE(has(error_of([](K8sOptions& o) { o.claim = "x"; }), "--claim and --storage-class"));
  EXPECT_TRUE(has(error_of([](K8sOptions&) {}, "My_Run"), "--run 'My_Run'"));
  EXPECT_FALSE(K8sManifests(Config(1), K8sOptions{}).ok());  // no image
}

}  // namespace
}  // namespace gyre::deploy
