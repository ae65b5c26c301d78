// The Kubernetes provisioner against a real coordinator and a fake `kubectl` (tests/e2e/fake_k8s/)
// that records its argv: `gyre launch --k8s` writes the manifests, the provisioner sidecar's
// command is taken from them as written (only the in-pod run dir and coordinator address are
// mapped to this machine's), and `gyrectl scale` must turn into `kubectl scale statefulset`:
// once per change, retried when kubectl fails, and to 0 when the run is over.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/e2e/e2e_util.h"

namespace gyre::e2e {
namespace {

namespace fs = std::filesystem;

std::vector<std::string> Lines(const std::string& path) {
  std::vector<std::string> out;
  std::istringstream in(ReadFileOrEmpty(path));
  for (std::string line; std::getline(in, line);) out.push_back(line);
  return out;
}

// fork + exec with output appended to `log`; the process is killed at scope exit if still there.
class Process {
 public:
  Process(const std::vector<std::string>& args, const std::string& log) {
    pid_ = ::fork();
    if (pid_ == 0) {
      std::freopen(log.c_str(), "a", stdout);
      std::freopen(log.c_str(), "a", stderr);
      std::vector<std::string> copy = args;
      std::vector<char*> argv;
      for (std::string& a : copy) argv.push_back(a.data());
      argv.push_back(nullptr);
      ::execv(argv[0], argv.data());
      ::_exit(127);
    }
  }
  ~Process() {
    if (pid_ > 0 && !exited_) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
  }
  pid_t pid() const { return pid_; }
  // Exit code once it exited within `seconds`; -1 otherwise.
  int Wait(int seconds) {
    int status = 0;
    if (!exited_ && !WaitFor([&] { return ::waitpid(pid_, &status, WNOHANG) == pid_; }, seconds, 50)) return -1;
    if (!exited_) code_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    exited_ = true;
    return code_;
  }

 private:
  pid_t pid_ = -1;
  bool exited_ = false;
  int code_ = -1;
};

TEST(K8sProvisionTest, GyrectlScaleBecomesKubectlScaleOfTheWorkerStatefulSet) {
  const std::string root = TestTmp() + "/k8s";
  ASSERT_TRUE(PrepareGoldenIndex(root + "/index"));
  const std::string kubectl_log = root + "/kubectl.log";
  const std::string fake_bin = std::string(std::getenv("TEST_SRCDIR")) + "/gyre/tests/e2e/fake_k8s";
  ::setenv("PATH", (fake_bin + ":" + std::getenv("PATH")).c_str(), 1);
  ::setenv("FAKE_KUBECTL_LOG", kubectl_log.c_str(), 1);

  // The manifests, as users get them.
  LocalRun run(root, "k8s",
               "seed: 1\n"
               "model { preset: \"llama-tiny\" vocab_size: 50257 }\n"
               "data { index_dir: \"@INDEX@\" seq_len: 32 global_batch: 6 }\n"
               "optimizer { lr: 0.003 }\n"
               "train { max_steps: 1000 }\n");
  CommandResult emitted = RunCommand({Bin("gyre"), "launch", "--k8s", "--image", "example/gyre:test", "--namespace", "ml",
                                      "--workers", "2", "--config", root + "/k8s.textproto", "--runs-dir",
                                      root + "/runs"});
  ASSERT_EQ(emitted.code, 0) << emitted.out;
  const std::string manifests_path = run.run_dir() + "/k8s/manifests.json";
  EXPECT_NE(emitted.out.find("kubectl apply -f " + manifests_path), std::string::npos) << emitted.out;
  nlohmann::json manifests = nlohmann::json::parse(ReadFileOrEmpty(manifests_path), nullptr, false);
  ASSERT_TRUE(manifests.is_object()) << ReadFileOrEmpty(manifests_path);
  std::vector<std::string> sidecar;
  std::string pod_config;
  for (const auto& item : manifests["items"]) {
    if (item["kind"] == "ConfigMap") pod_config = item["data"]["config.json"].get<std::string>();
    if (item["kind"] == "StatefulSet") {
      EXPECT_EQ(item["spec"]["replicas"], 2);
    }
    if (item["kind"] != "Deployment") continue;
    for (const auto& c : item["spec"]["template"]["spec"]["containers"]) {
      if (c["name"] == "provisioner") sidecar = c["command"].get<std::vector<std::string>>();
    }
  }
  ASSERT_FALSE(sidecar.empty()) << "no provisioner sidecar in the coordinator's Deployment";

  ASSERT_FALSE(pod_config.empty()) << "no config.json in the ConfigMap";
  std::ofstream(root + "/pod-config.json") << pod_config;

  // A real coordinator for the run on the ConfigMap's config (no workers needed: the provisioner
  // only reads the status), on a free loopback port instead of the pod's 0.0.0.0:50051.
  Process coordinator({Bin("gyre"), "coordinator", "--config", root + "/pod-config.json", "--runs-dir",
                       root + "/runs", "--listen", "127.0.0.1:0"},
                      root + "/coordinator.log");
  ASSERT_TRUE(WaitFor([&] { return fs::exists(run.run_dir() + "/coordinator.addr") || coordinator.Wait(0) >= 0; }, 60));
  ASSERT_TRUE(fs::exists(run.run_dir() + "/coordinator.addr")) << ReadFileOrEmpty(root + "/coordinator.log");
  std::string address = ReadFileOrEmpty(run.run_dir() + "/coordinator.addr");
  address = address.substr(0, address.find('\n'));

  // The sidecar's command, mapped from the pod to this machine.
  for (size_t i = 0; i < sidecar.size(); ++i) {
    if (i == 0) sidecar[i] = Bin("gyre");
    if (i > 0 && sidecar[i - 1] == "--run-dir") sidecar[i] = run.run_dir();
    if (i > 0 && sidecar[i - 1] == "--coordinator") sidecar[i] = address;
  }
  sidecar.insert(sidecar.end(), {"--poll-ms", "100"});
  Process provisioner(sidecar, root + "/provision.log");
  auto dump = [&] {
    std::fprintf(stderr, "---- kubectl.log\n%s---- provision.log\n%s---- coordinator.log\n%s\n",
                 ReadFileOrEmpty(kubectl_log).c_str(), ReadFileOrEmpty(root + "/provision.log").c_str(),
                 ReadFileOrEmpty(root + "/coordinator.log").c_str());
    return "";
  };
  auto scaled_to = [&](int n) {
    const std::string want = "--namespace ml scale statefulset gyre-k8s-worker --replicas=" + std::to_string(n);
    int count = 0;
    for (const std::string& line : Lines(kubectl_log)) count += line == want;
    return count;
  };

  // The launch's desired count is applied once.
  ASSERT_TRUE(WaitFor([&] { return scaled_to(2) == 1; }, 30)) << dump();
  // gyrectl scale 3 -> kubectl scale ... --replicas=3.
  ASSERT_FALSE(run.Ctl({"scale", "3"}).is_null()) << dump();
  ASSERT_TRUE(WaitFor([&] { return scaled_to(3) == 1; }, 30)) << dump();
  // A refused kubectl is retried at the next poll.
  std::ofstream(kubectl_log + ".fail-once") << "";
  ASSERT_FALSE(run.Ctl({"scale", "1"}).is_null()) << dump();
  ASSERT_TRUE(WaitFor([&] { return scaled_to(1) == 1; }, 30)) << dump();
  EXPECT_EQ(ReadFileOrEmpty(kubectl_log).find("FAILED --namespace ml scale statefulset gyre-k8s-worker --replicas=1") !=
                std::string::npos,
            true)
      << dump();
  // Nothing more while the desired count stays put.
  std::this_thread::sleep_for(std::chrono::milliseconds(1000));
  EXPECT_EQ(Lines(kubectl_log).size(), 4u) << dump();

  // The run is over: workers scaled to 0; the sidecar lingers until Kubernetes stops the pod.
  ASSERT_FALSE(run.Ctl({"stop"}).is_null()) << dump();
  ASSERT_TRUE(WaitFor([&] { return scaled_to(0) == 1; }, 30)) << dump();
  EXPECT_EQ(provisioner.Wait(1), -1) << dump() << "--linger: the sidecar should stay up";
  ::kill(provisioner.pid(), SIGTERM);
  EXPECT_EQ(provisioner.Wait(10), 0) << dump();
  EXPECT_EQ(Lines(kubectl_log).size(), 5u) << dump();
}

}  // namespace
}  // namespace gyre::e2e
