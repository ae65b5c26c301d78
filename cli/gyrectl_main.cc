// gyrectl: steer a running Gyre run (DESIGN.md section 5).
//
//   gyrectl [--run-dir runs/NAME] [--tls-ca FILE] status|workers|pause|resume|scale N|drain WORKER|checkpoint|stop|metrics
//
// The coordinator address and bearer token come from the run directory (coordinator.addr, token)
// unless --coordinator / --token-file say otherwise. --json prints the protobuf JSON of the
// answer. Exit codes: 0 ok, 1 the coordinator refused or failed the request, 2 usage error,
// 3 cannot reach the coordinator or read the run directory, 4 authentication failed.
#include <cmath>
#include <cstdio>
#include <string>

#include "CLI/CLI.hpp"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "cli/control_client.h"
#include "cli/status_text.h"
#include "google/protobuf/util/json_util.h"

namespace gyre::cli {
namespace {

std::string Json(const google::protobuf::Message& m) {
  std::string out;
  google::protobuf::util::JsonPrintOptions options;
  options.add_whitespace = true;
  options.preserve_proto_field_names = true;
  if (!google::protobuf::util::MessageToJsonString(m, &out, options).ok()) return "{}";
  return out;
}

const char* WorkerStateName(gyre::v1::WorkerState s) {
  switch (s) {
    case gyre::v1::WORKER_STATE_ACTIVE: return "active";
    case gyre::v1::WORKER_STATE_STANDBY: return "standby";
    case gyre::v1::WORKER_STATE_DRAINING: return "draining";
    case gyre::v1::WORKER_STATE_DEAD: return "dead";
    case gyre::v1::WORKER_STATE_STARTING: return "starting";
    default: return "unknown";
  }
}


int ExitCodeFor(const absl::Status& s) {
  switch (s.code()) {
    case absl::StatusCode::kUnavailable:
    case absl::StatusCode::kDeadlineExceeded:
    case absl::StatusCode::kNotFound:
      // NotFound from ResolveControlTarget means no run dir files; from the server, an unknown
      // worker. Both are "look again at what you pointed me at".
      return s.message().find("coordinator") != std::string_view::npos ||
                     s.message().find("token file") != std::string_view::npos
                 ? 3
                 : 1;
    case absl::StatusCode::kUnauthenticated:
    case absl::StatusCode::kPermissionDenied:
      return 4;
    default:
      return 1;
  }
}

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "gyrectl: %s\n", std::string(s.message()).c_str());
  return ExitCodeFor(s);
}

}  // namespace

int GyrectlMain(int argc, char** argv) {
  CLI::App app{"gyrectl: steer a running Gyre run"};
  app.require_subcommand(1);
  std::string run_dir = "runs/default", address, token_file;
  bool json = false;
  int64_t timeout_ms = 10000;
  app.add_option("--run-dir", run_dir, "the run directory (holds coordinator.addr and token)")->capture_default_str();
  app.add_option("--coordinator", address, "host:port of the coordinator (overrides coordinator.addr)");
  app.add_option("--token-file", token_file, "bearer token file (overrides <run-dir>/token)");
  std::string tls_ca;
  app.add_option("--tls-ca", tls_ca, "PEM CA file to trust over TLS (default: <run-dir>/tls-ca.pem if present)");
  app.add_option("--timeout-ms", timeout_ms, "deadline of each call")->capture_default_str();
  app.add_flag("--json", json, "print the answer as JSON");

  auto* status_cmd = app.add_subcommand("status", "run state, progress, last metrics");
  auto* workers_cmd = app.add_subcommand("workers", "list workers with their state and rank");
  auto* pause_cmd = app.add_subcommand("pause", "stop leasing new steps (at a step boundary)");
  auto* resume_cmd = app.add_subcommand("resume", "lease steps again");
  auto* scale_cmd = app.add_subcommand("scale", "set the desired number of workers");
  uint32_t scale_target = 0;
  scale_cmd->add_option("N", scale_target, "desired workers (>= 1)")->required();
  auto* drain_cmd = app.add_subcommand("drain", "remove one worker at the next step boundary");
  std::string drain_spec;
  drain_cmd->add_option("WORKER", drain_spec, "session id (hex, from `gyrectl workers`), host:pid, or host")->required();
  auto* checkpoint_cmd = app.add_subcommand("checkpoint", "checkpoint at the next step boundary");
  auto* stop_cmd = app.add_subcommand("stop", "stop the run at the next step boundary");
  auto* metrics_cmd = app.add_subcommand("metrics", "stream per-step metrics");
  uint64_t since = 0, count = 0;
  metrics_cmd->add_option("--since", since, "first step to show");
  metrics_cmd->add_option("--count", count, "stop after this many updates (0 = follow)");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }

  absl::StatusOr<ControlTarget> target = ResolveControlTarget(run_dir, address, token_file, tls_ca);
  if (!target.ok()) return Fail(target.status());
  ControlClient client(*target, timeout_ms);

  auto show = [&](const absl::StatusOr<gyre::v1::RunStatus>& s) {
    if (!s.ok()) return Fail(s.status());
    if (json) {
      std::printf("%s\n", Json(*s).c_str());
    } else {
      std::fputs(RunStatusText(*s).c_str(), stdout);
    }
    return 0;
  };

  if (*status_cmd) return show(client.GetStatus());
  if (*pause_cmd) return show(client.Pause());
  if (*resume_cmd) return show(client.Resume());
  if (*scale_cmd) return show(client.Scale(scale_target));
  if (*checkpoint_cmd) return show(client.Checkpoint());
  if (*stop_cmd) return show(client.Stop());
  if (*drain_cmd) {
    absl::StatusOr<uint64_t> session = client.ResolveWorker(drain_spec);
    if (!session.ok()) return Fail(session.status());
    return show(client.Drain(*session));
  }
  if (*workers_cmd) {
    absl::StatusOr<gyre::v1::ListWorkersResponse> workers = client.ListWorkers();
    if (!workers.ok()) return Fail(workers.status());
    if (json) {
      std::printf("%s\n", Json(*workers).c_str());
      return 0;
    }
    std::printf("%-16s %-9s %4s %8s  %s\n", "SESSION", "STATE", "RANK", "STEP", "WORKER");
    for (const auto& w : workers->workers()) {
      std::printf("%016llx %-9s %4u %8llu  %s:%u %s\n", (unsigned long long)w.session(), WorkerStateName(w.state()),
                  w.rank(), (unsigned long long)w.step(), w.worker().host().c_str(), w.worker().pid(),
                  w.worker().device().c_str());
    }
    return 0;
  }
  if (*metrics_cmd) {
    absl::Status s = client.WatchMetrics(since, count, [&](const gyre::v1::MetricsUpdate& u) {
      if (json) {
        std::printf("%s\n", Json(u).c_str());
      } else {
        const auto& m = u.metrics();
        const auto& t = m.times();
        std::printf("step %6llu  loss %.4f  grad_norm %.3f  lr %.3g  tok/s %.0f  ms: data %.1f fwd %.1f bwd %.1f comm %.1f opt %.1f\n",
                    (unsigned long long)m.step(), m.loss(), m.grad_norm(), m.lr(), m.tokens_per_s(), t.data_wait_ms(),
                    t.forward_ms(), t.backward_ms(), t.exposed_comm_ms(), t.optimizer_ms());
      }
      std::fflush(stdout);
      return true;
    });
    if (!s.ok()) return Fail(s);
    return 0;
  }
  return 2;
}

}  // namespace gyre::cli

int main(int argc, char** argv) { return gyre::cli::GyrectlMain(argc, argv); }
