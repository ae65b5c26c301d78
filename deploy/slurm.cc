#include "deploy/slurm.h"

#include <sys/stat.h>

#include <algorithm>
#include <cctype>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/env.h"
#include "deploy/command_runner.h"
#include "nlohmann/json.hpp"

namespace gyre::deploy {
namespace {

bool IsAbsolute(const std::string& path) { return !path.empty() && path[0] == '/'; }

// `#SBATCH` lines shared by the run's job and worker-only jobs.
std::string CommonDirectives(const SlurmOptions& o) {
  std::string out;
  if (o.gpus_per_node > 0) absl::StrAppend(&out, "#SBATCH --gpus-per-node=", o.gpus_per_node, "\n");
  if (!o.partition.empty()) absl::StrAppend(&out, "#SBATCH --partition=", o.partition, "\n");
  if (!o.account.empty()) absl::StrAppend(&out, "#SBATCH --account=", o.account, "\n");
  if (!o.time_limit.empty()) absl::StrAppend(&out, "#SBATCH --time=", o.time_limit, "\n");
  for (const std::string& extra : o.sbatch_args) absl::StrAppend(&out, "#SBATCH ", extra, "\n");
  return out;
}

// A name Slurm shows in squeue: the run name with anything odd replaced.
std::string JobName(const std::string& run_name) {
  std::string out = "gyre-";
  for (char c : run_name) out += (std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.') ? c : '_';
  return out;
}

}  // namespace

absl::Status ValidateSlurmOptions(const SlurmOptions& o) {
  if (o.run_name.empty()) return absl::InvalidArgumentError("--run: the run needs a name");
  if (o.nodes < 1) return absl::InvalidArgumentError(absl::StrCat("--nodes ", o.nodes, ": need at least 1 node"));
  if (o.gpus_per_node < 0) {
    return absl::InvalidArgumentError(absl::StrCat("--gpus-per-node ", o.gpus_per_node, ": must be >= 0"));
  }
  if (o.workers_per_node < 1) {
    return absl::InvalidArgumentError(absl::StrCat("--workers-per-node ", o.workers_per_node, ": need at least 1"));
  }
  if (o.gpus_per_node > 0 && o.workers_per_node != o.gpus_per_node) {
    return absl::InvalidArgumentError(absl::StrCat("--workers-per-node ", o.workers_per_node, " with --gpus-per-node ",
                                                   o.gpus_per_node,
                                                   ": GPU runs have one worker per GPU (leave --workers-per-node out)"));
  }
  if (o.port < 0 || o.port > 65535) return absl::InvalidArgumentError(absl::StrCat("--port ", o.port, ": not a TCP port"));
  for (const auto& [flag, path] : {std::pair<const char*, const std::string*>{"--gyre-bin", &o.gyre_bin},
                                   {"--runs-dir", &o.runs_dir},
                                   {"--run-dir", &o.run_dir},
                                   {"--config", &o.config_path}}) {
    if (!IsAbsolute(*path)) {
      return absl::InvalidArgumentError(absl::StrCat(flag, " '", *path,
                                                     "': Slurm jobs run elsewhere; the path must be absolute"));
    }
  }
  for (const std::string& extra : o.sbatch_args) {
    if (extra.rfind("--", 0) != 0 || extra.find('\n') != std::string::npos) {
      return absl::InvalidArgumentError(absl::StrCat("--sbatch-arg '", extra, "': expected one option like --qos=high"));
    }
  }
  for (const auto& [flag, value] : {std::pair<const char*, const std::string*>{"--partition", &o.partition},
                                    {"--account", &o.account},
                                    {"--time", &o.time_limit}}) {
    if (value->find_first_of(" \t\n'\"$`\\") != std::string::npos) {
      return absl::InvalidArgumentError(absl::StrCat(flag, " '", *value, "': no spaces or shell characters"));
    }
  }
  return absl::OkStatus();
}

std::string SlurmDir(const std::string& run_dir) { return JoinPath(run_dir, "slurm"); }
std::string SlurmBatchPath(const std::string& run_dir) { return JoinPath(SlurmDir(run_dir), "run.sbatch"); }
std::string SlurmWorkerTaskPath(const std::string& run_dir) { return JoinPath(SlurmDir(run_dir), "worker-task.sh"); }
std::string SlurmEndpointPath(const std::string& run_dir) {
  return JoinPath(SlurmDir(run_dir), "coordinator.endpoint");
}
std::string SlurmLaunchPath(const std::string& run_dir) { return JoinPath(SlurmDir(run_dir), "launch.json"); }
std::string SlurmWorkersBatchPath(const std::string& run_dir, int sequence) {
  return JoinPath(SlurmDir(run_dir), absl::StrCat("workers-", sequence, ".sbatch"));
}

std::string SlurmBatchScript(const SlurmOptions& o) {
  const std::string q_run_dir = ShellQuote(o.run_dir);
  std::string s;
  absl::StrAppend(&s, "#!/bin/bash\n",
                  "# Gyre run '", o.run_name, "' on Slurm, written by `gyre launch --slurm` (deploy/slurm.h).\n",
                  "# Submit with: sbatch ", SlurmBatchPath(o.run_dir), "\n",
                  "#\n",
                  "# This script runs on the first node of the allocation. That node hosts the coordinator (gRPC\n",
                  "# on 0.0.0.0; workers reach it as <first node's name>:<port>, never 127.0.0.1) and the\n",
                  "# provisioner. srun starts ", o.workers_per_node,
                  " worker task(s) per node (worker-task.sh), each a `gyre worker`\n",
                  "# supervised by `gyre provision --supervise-worker` (restarted after a crash or kill unless the\n",
                  "# run is over; a crash loop gives up). The job ends when the run is over.\n",
                  "# RUN_DIR must be on a file system every node mounts at the same path: workers read the token\n",
                  "# and the coordinator endpoint there, and checkpoints and logs are written there.\n");
  absl::StrAppend(&s, "#SBATCH --job-name=", JobName(o.run_name), "\n", "#SBATCH --nodes=", o.nodes, "\n",
                  "#SBATCH --ntasks-per-node=", o.workers_per_node, "\n", CommonDirectives(o),
                  "#SBATCH --output=", o.run_dir, "/slurm/job-%j.out\n");
  absl::StrAppend(&s, "set -u\n",
                  "GYRE=", ShellQuote(o.gyre_bin), "\n",
                  "RUN_DIR=", q_run_dir, "\n",
                  "RUNS_DIR=", ShellQuote(o.runs_dir), "\n",
                  "CONFIG=", ShellQuote(o.config_path), "\n",
                  "PORT=", o.port, "\n",
                  "WORKERS_PER_NODE=", o.workers_per_node, "\n");
  s += R"SH(LOGS="$RUN_DIR/logs"
STATE="$RUN_DIR/slurm"
mkdir -p "$LOGS" "$STATE"
log() { echo "gyre-slurm [$(date -u +%H:%M:%S)] $*" >&2; }

# The coordinator's node, by the name the other nodes reach it at.
HEAD_HOST="${GYRE_HEAD_HOST:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}"
if [ -z "$HEAD_HOST" ]; then log "cannot tell this node's name (scontrol show hostnames \$SLURM_JOB_NODELIST)"; exit 1; fi
WORKERS_IN_ALLOCATION=$(( ${SLURM_JOB_NUM_NODES:-1} * WORKERS_PER_NODE ))

# 1. The coordinator; after a crash it restarts from its journal on the same port (at most 5 times).
rm -f "$RUN_DIR/coordinator.addr" "$STATE/coordinator.endpoint" "$STATE/coordinator.pid" "$STATE/run-over"
run_coordinator() {
  local listen="0.0.0.0:$PORT" restarts=0 code
  while :; do
    "$GYRE" coordinator --runs-dir "$RUNS_DIR" --config "$CONFIG" --listen "$listen" >>"$LOGS/coordinator.log" 2>&1 &
    echo $! >"$STATE/coordinator.pid"
    wait $!
    code=$?
    if [ "$code" -eq 0 ] || [ -e "$STATE/run-over" ]; then return 0; fi
    restarts=$((restarts + 1))
    if [ "$restarts" -gt 5 ]; then log "the coordinator failed $restarts times; giving up"; return 1; fi
    if [ -s "$RUN_DIR/coordinator.addr" ]; then listen="$(cat "$RUN_DIR/coordinator.addr")"; fi
    rm -f "$RUN_DIR/coordinator.addr"
    log "the coordinator exited with status $code; restarting it from its journal on $listen"
    sleep 1
  done
}
run_coordinator &
COORDINATOR_LOOP=$!
for i in $(seq 1 600); do
  if [ -s "$RUN_DIR/coordinator.addr" ] && [ -s "$RUN_DIR/token" ]; then break; fi
  if ! kill -0 "$COORDINATOR_LOOP" 2>/dev/null; then log "the coordinator did not start; see $LOGS/coordinator.log"; exit 1; fi
  sleep 0.2
done
if [ ! -s "$RUN_DIR/coordinator.addr" ]; then log "the coordinator did not listen within 120 s; see $LOGS/coordinator.log"; exit 1; fi
ADDR="$(cat "$RUN_DIR/coordinator.addr")"
PORT="${ADDR##*:}"
ENDPOINT="$HEAD_HOST:$PORT"
echo "$ENDPOINT" >"$STATE/coordinator.endpoint.tmp" && mv "$STATE/coordinator.endpoint.tmp" "$STATE/coordinator.endpoint"
log "coordinator at $ENDPOINT (run dir $RUN_DIR); $WORKERS_IN_ALLOCATION worker(s) in this allocation"

# 2. Workers: WORKERS_PER_NODE supervised tasks on every node of the allocation.
srun --ntasks-per-node="$WORKERS_PER_NODE" --kill-on-bad-exit=0 --output="$LOGS/worker-%j-%t.log" "$STATE/worker-task.sh" &
WORKERS=$!

# 3. The provisioner: submits worker-only jobs when `gyrectl scale` asks for more workers than this
# allocation holds (fewer: the extra workers wait as standbys). It returns 0 when the run is over.
"$GYRE" provision --slurm --run-dir "$RUN_DIR" --coordinator "127.0.0.1:$PORT" \
    --allocation-workers "$WORKERS_IN_ALLOCATION" >>"$LOGS/provision.log" 2>&1 &
PROVISIONER=$!

while kill -0 "$PROVISIONER" 2>/dev/null && kill -0 "$WORKERS" 2>/dev/null && kill -0 "$COORDINATOR_LOOP" 2>/dev/null; do
  sleep 1
done
kill -0 "$WORKERS" 2>/dev/null || log "the worker tasks have ended"
kill -0 "$COORDINATOR_LOOP" 2>/dev/null || log "the coordinator is gone"
# Workers leave as the run ends, a moment before the provisioner sees it over.
for i in $(seq 1 30); do kill -0 "$PROVISIONER" 2>/dev/null || break; sleep 1; done
kill "$PROVISIONER" 2>/dev/null
wait "$PROVISIONER"
PROVISION_CODE=$?
log "the provisioner exited with status $PROVISION_CODE (0: the run is over)"
# The run is over, but rank 0 may still be writing the final checkpoint, which it reports to the
# coordinator: the coordinator stays up until the worker tasks have left (at most 120 s).
if [ "$PROVISION_CODE" -eq 0 ]; then
  for i in $(seq 1 120); do kill -0 "$WORKERS" 2>/dev/null || break; sleep 1; done
fi

# Stop the coordinator; worker tasks still there get SIGTERM through srun (their supervisors pass
# it on), then SIGKILL.
touch "$STATE/run-over"
if [ -s "$STATE/coordinator.pid" ]; then kill -TERM "$(cat "$STATE/coordinator.pid")" 2>/dev/null; fi
wait "$COORDINATOR_LOOP"
log "the coordinator has stopped"
if kill -0 "$WORKERS" 2>/dev/null; then
  log "worker tasks still running; sending them SIGTERM"
  kill -TERM "$WORKERS" 2>/dev/null
  for i in $(seq 1 30); do kill -0 "$WORKERS" 2>/dev/null || break; sleep 1; done
  kill -KILL "$WORKERS" 2>/dev/null
fi
wait "$WORKERS" 2>/dev/null
if [ "$PROVISION_CODE" -eq 0 ]; then log "the run is over"; exit 0; fi
log "the run did not finish (provisioner status $PROVISION_CODE); logs in $LOGS/"
exit 1
)SH";
  return s;
}

std::string SlurmWorkerTaskScript(const SlurmOptions& o) {
  std::string s;
  absl::StrAppend(&s, "#!/bin/bash\n",
                  "# One worker task of Gyre run '", o.run_name,
                  "' (srun starts it on every node; deploy/slurm.h). It waits for\n",
                  "# the coordinator's endpoint in the shared run dir, then supervises one `gyre worker`.\n",
                  "set -u\n",
                  "GYRE=", ShellQuote(o.gyre_bin), "\n",
                  "RUN_DIR=", ShellQuote(o.run_dir), "\n");
  s += R"SH(ENDPOINT_FILE="$RUN_DIR/slurm/coordinator.endpoint"
for i in $(seq 1 300); do [ -s "$ENDPOINT_FILE" ] && break; sleep 1; done
if [ ! -s "$ENDPOINT_FILE" ]; then echo "gyre worker task: no coordinator endpoint in $ENDPOINT_FILE after 300 s" >&2; exit 1; fi
ENDPOINT="$(cat "$ENDPOINT_FILE")"
)SH";
  if (o.gpus_per_node > 0) {
    s += R"SH(# One GPU per task: cuda:0 where Slurm binds one GPU per task, else the task's local id.
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ] && [ "${CUDA_VISIBLE_DEVICES#*,}" = "$CUDA_VISIBLE_DEVICES" ]; then
  DEVICE=cuda:0
else
  DEVICE="cuda:${SLURM_LOCALID:-0}"
fi
)SH";
  } else {
    s += "DEVICE=cpu\n";
  }
  s += R"SH(# Peers (Gloo / NCCL bootstrap) reach this worker by its node's name.
WORKER_HOST="${GYRE_WORKER_HOST:-${SLURMD_NODENAME:-$(hostname)}}"
exec "$GYRE" provision --supervise-worker --run-dir "$RUN_DIR" --coordinator "$ENDPOINT" -- \
    --device "$DEVICE" --hostname "$WORKER_HOST")SH";
  for (const std::string& a : o.worker_args) absl::StrAppend(&s, " ", ShellQuote(a));
  s += "\n";
  return s;
}

std::string SlurmWorkersBatchScript(const SlurmOptions& o, int workers) {
  const int per_node = std::min(o.workers_per_node, workers);
  const int nodes = (workers + o.workers_per_node - 1) / o.workers_per_node;
  std::string s;
  absl::StrAppend(&s, "#!/bin/bash\n",
                  "# ", workers, " extra worker(s) for Gyre run '", o.run_name,
                  "' (written by `gyre launch --slurm --add-workers` or the\n",
                  "# Slurm provisioner; deploy/slurm.h). They join the coordinator of the run's own job.\n",
                  "#SBATCH --job-name=", JobName(o.run_name), "-workers\n", "#SBATCH --nodes=", nodes, "\n",
                  "#SBATCH --ntasks=", workers, "\n", "#SBATCH --ntasks-per-node=", per_node, "\n",
                  CommonDirectives(o), "#SBATCH --output=", o.run_dir, "/slurm/workers-job-%j.out\n", "set -u\n",
                  "RUN_DIR=", ShellQuote(o.run_dir), "\n");
  s += R"SH(if [ ! -s "$RUN_DIR/slurm/coordinator.endpoint" ]; then
  echo "gyre: no coordinator endpoint in $RUN_DIR/slurm/; is the run's own job (run.sbatch) running?" >&2
  exit 1
fi
exec srun --kill-on-bad-exit=0 --output="$RUN_DIR/logs/worker-%j-%t.log" "$RUN_DIR/slurm/worker-task.sh"
)SH";
  return s;
}

std::string SlurmOptionsToJson(const SlurmOptions& o) {
  nlohmann::json j = {{"run_name", o.run_name},       {"gyre_bin", o.gyre_bin},
                      {"run_dir", o.run_dir},         {"runs_dir", o.runs_dir},
                      {"config_path", o.config_path}, {"nodes", o.nodes},
                      {"gpus_per_node", o.gpus_per_node}, {"workers_per_node", o.workers_per_node},
                      {"partition", o.partition},     {"account", o.account},
                      {"time_limit", o.time_limit},   {"port", o.port},
                      {"worker_args", o.worker_args}, {"sbatch_args", o.sbatch_args}};
  return j.dump(2) + "\n";
}

absl::StatusOr<SlurmOptions> SlurmOptionsFromJson(const std::string& json, const std::string& path_for_errors) {
  nlohmann::json j = nlohmann::json::parse(json, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object()) return absl::InvalidArgumentError(absl::StrCat(path_for_errors, ": not a JSON object"));
  SlurmOptions o;
  auto get_string = [&](const char* key, std::string* out) -> absl::Status {
    if (!j.contains(key) || !j[key].is_string()) {
      return absl::InvalidArgumentError(absl::StrCat(path_for_errors, ": field '", key, "' missing or not a string"));
    }
    *out = j[key].get<std::string>();
    return absl::OkStatus();
  };
  auto get_int = [&](const char* key, int* out) -> absl::Status {
    if (!j.contains(key) || !j[key].is_number_integer()) {
      return absl::InvalidArgumentError(absl::StrCat(path_for_errors, ": field '", key, "' missing or not an integer"));
    }
    *out = j[key].get<int>();
    return absl::OkStatus();
  };
  auto get_list = [&](const char* key, std::vector<std::string>* out) -> absl::Status {
    if (!j.contains(key) || !j[key].is_array()) {
      return absl::InvalidArgumentError(absl::StrCat(path_for_errors, ": field '", key, "' missing or not a list"));
    }
    for (const auto& v : j[key]) {
      if (!v.is_string()) return absl::InvalidArgumentError(absl::StrCat(path_for_errors, ": '", key, "' holds a non-string"));
      out->push_back(v.get<std::string>());
    }
    return absl::OkStatus();
  };
  for (absl::Status s : {get_string("run_name", &o.run_name), get_string("gyre_bin", &o.gyre_bin),
                         get_string("run_dir", &o.run_dir), get_string("runs_dir", &o.runs_dir),
                         get_string("config_path", &o.config_path), get_int("nodes", &o.nodes),
                         get_int("gpus_per_node", &o.gpus_per_node), get_int("workers_per_node", &o.workers_per_node),
                         get_string("partition", &o.partition), get_string("account", &o.account),
                         get_string("time_limit", &o.time_limit), get_int("port", &o.port),
                         get_list("worker_args", &o.worker_args), get_list("sbatch_args", &o.sbatch_args)}) {
    if (!s.ok()) return s;
  }
  if (absl::Status s = ValidateSlurmOptions(o); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(path_for_errors, ": ", s.message()));
  }
  return o;
}

absl::Status WriteSlurmFiles(const SlurmOptions& options) {
  if (absl::Status s = ValidateSlurmOptions(options); !s.ok()) return s;
  Env* env = Env::Default();
  const std::string dir = SlurmDir(options.run_dir);
  if (absl::Status s = env->CreateDirs(dir); !s.ok()) return s;
  if (absl::Status s = env->CreateDirs(JoinPath(options.run_dir, "logs")); !s.ok()) return s;
  if (absl::Status s = WriteFileAtomically(env, SlurmBatchPath(options.run_dir), SlurmBatchScript(options)); !s.ok()) {
    return s;
  }
  const std::string task = SlurmWorkerTaskPath(options.run_dir);
  if (absl::Status s = WriteFileAtomically(env, task, SlurmWorkerTaskScript(options)); !s.ok()) return s;
  if (::chmod(task.c_str(), 0755) != 0) {
    return absl::PermissionDeniedError(absl::StrCat(task, ": cannot make it executable"));
  }
  return WriteFileAtomically(env, SlurmLaunchPath(options.run_dir), SlurmOptionsToJson(options));
}

absl::StatusOr<std::string> ParseSbatchJobId(const std::string& out) {
  // "Submitted batch job 123" or, with --parsable, "123" / "123;cluster".
  std::string text = out;
  const std::string kPrefix = "Submitted batch job ";
  if (size_t at = text.find(kPrefix); at != std::string::npos) text = text.substr(at + kPrefix.size());
  size_t end = 0;
  while (end < text.size() && std::isdigit(static_cast<unsigned char>(text[end]))) ++end;
  if (end == 0) return absl::InvalidArgumentError(absl::StrCat("no job id in sbatch's answer: '", out, "'"));
  return text.substr(0, end);
}

}  // namespace gyre::deploy
