// `gyre worker`: one worker actor (DESIGN.md section 2). Usually started by `gyre launch`.
#include <cstdio>
#include <string>

#include "CLI/CLI.hpp"
#include "base/clock.h"
#include "base/env.h"
#include "base/run_dir.h"
#include "cli/commands.h"
#include "ops/parallel.h"
#include "worker/gpu_runtime.h"
#include "worker/worker_device.h"
#include "worker/worker.h"

namespace gyre::cli {

int RunWorker(int argc, char** argv) {
  CLI::App app{"gyre worker: one training worker; joins the coordinator of a run"};
  std::string coordinator, run_dir, token_file, device = "auto", hostname = "127.0.0.1";
  app.add_option("--coordinator", coordinator, "coordinator host:port (default: <run-dir>/coordinator.addr)");
  app.add_option("--run-dir", run_dir, "the run directory (token, checkpoints)")->required();
  app.add_option("--token-file", token_file, "bearer token file (default: <run-dir>/token)");
  std::string tls_ca;
  app.add_option("--tls-ca", tls_ca, "PEM CA file to trust: TLS to the coordinator (default: <run-dir>/tls-ca.pem if present)");
  app.add_option("--device", device,
                 "cpu (Gloo), cuda or cuda:<index> (one GPU, NCCL; the index is among the visible GPUs), "
                 "auto: cuda when a GPU is visible to a CUDA build, else cpu")
      ->capture_default_str();
  app.add_option("--hostname", hostname, "address peers use to reach this worker")->capture_default_str();
  int threads = 0;
  app.add_option("--threads", threads,
                 "host threads for the model's math on a cpu worker and for initialisation and checkpoint "
                 "conversion on either (0 = auto: all cores on a cuda worker; a cpu worker keeps one pool "
                 "thread, since launchers start several per host)")
      ->capture_default_str();
  bool overlap = true;
  double bucket_mb = 25;
  app.add_option("--grad-bucket-mb", bucket_mb, "gradient all-reduce bucket cap in MiB")->capture_default_str();
  app.add_flag("--overlap-grad-reduce,!--no-overlap-grad-reduce", overlap,
               "all-reduce gradient buckets during backward (default) or all after it");
  uint32_t replaces_pid = 0;
  app.add_option("--replaces-pid", replaces_pid,
                 "pid of the exited worker on this host that this one replaces (set by launchers): the "
                 "coordinator declares it dead at once instead of after its heartbeat timeout");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  absl::StatusOr<std::string> resolved = ResolveWorkerDevice(device, GpuRuntimeOrNull());
  if (!resolved.ok()) {
    std::fprintf(stderr, "gyre worker: %s\n", std::string(resolved.status().message()).c_str());
    return 2;
  }
  device = *resolved;
  if (threads < 0) {
    std::fprintf(stderr, "gyre worker: --threads must be >= 0\n");
    return 2;
  }
  // A GPU worker's host threads only build its replica (weights drawn on the host: ~1.3B values
  // at 1.3B parameters) and convert checkpoints, and every replacement worker pays that before
  // it can rejoin a run.
  if (threads > 0 || device.rfind("cuda", 0) == 0) ops::SetNumThreads(threads);
  RunDir dir(run_dir);
  if (coordinator.empty()) {
    absl::StatusOr<std::string> addr = Env::Default()->ReadFile(dir.control_address_path());
    if (!addr.ok()) {
      std::fprintf(stderr, "gyre worker: %s\n", std::string(addr.status().message()).c_str());
      return 3;
    }
    coordinator = std::string(*addr);
    while (!coordinator.empty() && (coordinator.back() == '\n' || coordinator.back() == ' ')) coordinator.pop_back();
  }
  absl::StatusOr<std::string> token = ReadToken(token_file.empty() ? dir.token_path() : token_file);
  if (!token.ok()) {
    std::fprintf(stderr, "gyre worker: %s\n", std::string(token.status().message()).c_str());
    return 4;
  }
  ClusterClientOptions client_options;
  client_options.address = coordinator;
  client_options.token = *token;
  if (!tls_ca.empty() || Env::Default()->Exists(dir.tls_ca_path())) {
    absl::StatusOr<std::string> pem = Env::Default()->ReadFile(tls_ca.empty() ? dir.tls_ca_path() : tls_ca);
    if (!pem.ok()) {
      std::fprintf(stderr, "gyre worker: TLS CA: %s\n", std::string(pem.status().message()).c_str());
      return 4;
    }
    client_options.tls_ca_pem = *pem;
  }
  ClusterClient client(client_options, Clock::Real());
  WorkerOptions options;
  options.run_dir = run_dir;
  options.hostname = hostname;
  options.device = device;
  options.overlap_grad_reduce = overlap;
  options.replaces_pid = replaces_pid;
  if (!(bucket_mb > 0)) {
    std::fprintf(stderr, "gyre worker: --grad-bucket-mb must be > 0\n");
    return 2;
  }
  options.grad_bucket_bytes = static_cast<size_t>(bucket_mb * (1 << 20));
  Worker worker(&client, Env::Default(), Clock::Real(), options);
  absl::Status s = worker.Run();
  if (!s.ok()) {
    std::fprintf(stderr, "gyre worker: %s\n", std::string(s.message()).c_str());
    return 1;
  }
  return 0;
}

}  // namespace gyre::cli
