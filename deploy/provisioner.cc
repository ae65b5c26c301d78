#include "deploy/provisioner.h"

#include <cstdio>
#include <optional>

#include "absl/strings/str_cat.h"
#include "base/env.h"

namespace gyre::deploy {
namespace {

// Sleeps `ms` in slices so a stop request is seen within ~100 ms.
void SleepUnlessStopped(Clock* clock, int64_t ms, const StopRequested& stop) {
  for (int64_t left = ms; left > 0 && !stop(); left -= 100) clock->SleepMicros(std::min<int64_t>(left, 100) * 1000);
}

std::string Trimmed(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ' || s.back() == '\r')) s.pop_back();
  return s;
}

// One poll of the coordinator. While it is unreachable (starting or restarting: the workers stay
// as they are) the reason is logged once per change, not every poll.
std::optional<gyre::v1::RunStatus> PollRunStatus(const StatusSource& status, std::string* last_error) {
  absl::StatusOr<gyre::v1::RunStatus> run = status();
  if (run.ok()) {
    last_error->clear();
    return *std::move(run);
  }
  const std::string why(run.status().message());
  if (why != *last_error) std::fprintf(stderr, "gyre provision: coordinator not reachable (%s); waiting\n", why.c_str());
  *last_error = why;
  return std::nullopt;
}

}  // namespace

bool RunIsOver(const gyre::v1::RunStatus& status) {
  return status.state() == gyre::v1::RUN_STATE_STOPPED || status.state() == gyre::v1::RUN_STATE_FINISHED;
}

absl::Status RunK8sProvisioner(const K8sProvisionerOptions& options, const StatusSource& status, CommandRunner* runner,
                               Clock* clock, const StopRequested& stop) {
  int64_t applied = -1;  // replicas last set successfully; -1: none yet
  int64_t over_since_us = -1;  // when the run was first seen over
  std::string last_error;
  auto scale = [&](int64_t replicas) -> bool {
    std::vector<std::string> argv = {options.kubectl};
    if (!options.namespace_name.empty()) argv.insert(argv.end(), {"--namespace", options.namespace_name});
    argv.insert(argv.end(), {"scale", "statefulset", options.statefulset, absl::StrCat("--replicas=", replicas)});
    absl::StatusOr<CommandOutput> out = runner->Run(argv, options.command_timeout_ms);
    if (out.ok() && out->exit_code == 0) {
      std::fprintf(stderr, "gyre provision: statefulset %s scaled to %lld\n", options.statefulset.c_str(),
                   static_cast<long long>(replicas));
      applied = replicas;
      return true;
    }
    std::fprintf(stderr, "gyre provision: `%s` failed: %s\n", ShellJoin(argv).c_str(),
                 out.ok() ? absl::StrCat("exit ", out->exit_code, ": ", Trimmed(out->output)).c_str()
                          : std::string(out.status().message()).c_str());
    return false;
  };
  while (!stop()) {
    if (std::optional<gyre::v1::RunStatus> run = PollRunStatus(status, &last_error)) {
      if (RunIsOver(*run)) {
        if (over_since_us < 0) over_since_us = clock->NowMicros();
        const bool workers_left = run->workers_active() + run->workers_standby() == 0;
        const bool grace_over = clock->NowMicros() - over_since_us >= options.leave_grace_ms * 1000;
        if ((workers_left || grace_over) && (applied == 0 || scale(0))) {
          std::fprintf(stderr, "gyre provision: the run is over\n");
          return absl::OkStatus();
        }
      } else if (run->state() != gyre::v1::RUN_STATE_STOPPING && run->desired_workers() != applied) {
        scale(run->desired_workers());
      }
    }
    SleepUnlessStopped(clock, options.poll_ms, stop);
  }
  return absl::CancelledError("stop requested");
}

absl::StatusOr<std::string> WriteAndSubmitSlurmWorkers(const SlurmOptions& options, int workers, bool submit,
                                                       const std::string& sbatch, CommandRunner* runner,
                                                       int64_t timeout_ms) {
  if (workers < 1) return absl::InvalidArgumentError(absl::StrCat("--add-workers ", workers, ": need at least 1"));
  if (absl::Status s = ValidateSlurmOptions(options); !s.ok()) return s;
  Env* env = Env::Default();
  if (absl::Status s = env->CreateDirs(SlurmDir(options.run_dir)); !s.ok()) return s;
  int sequence = 1;
  while (env->Exists(SlurmWorkersBatchPath(options.run_dir, sequence))) ++sequence;
  const std::string path = SlurmWorkersBatchPath(options.run_dir, sequence);
  if (absl::Status s = WriteFileAtomically(env, path, SlurmWorkersBatchScript(options, workers)); !s.ok()) return s;
  if (!submit) return path;
  absl::StatusOr<CommandOutput> out = runner->Run({sbatch, path}, timeout_ms);
  if (!out.ok()) return out.status();
  if (out->exit_code != 0) {
    return absl::UnavailableError(
        absl::StrCat("`", sbatch, " ", path, "` failed (exit ", out->exit_code, "): ", Trimmed(out->output)));
  }
  return ParseSbatchJobId(out->output);
}

absl::Status RunSlurmProvisioner(const SlurmProvisionerOptions& options, const StatusSource& status,
                                 CommandRunner* runner, Clock* clock, const StopRequested& stop) {
  int64_t capacity = options.allocation_workers;
  std::string last_error;
  while (!stop()) {
    int64_t wait_ms = options.poll_ms;
    if (std::optional<gyre::v1::RunStatus> run = PollRunStatus(status, &last_error)) {
      if (RunIsOver(*run)) {
        std::fprintf(stderr, "gyre provision: the run is over\n");
        return absl::OkStatus();
      }
      const int64_t desired = run->desired_workers();
      if (run->state() != gyre::v1::RUN_STATE_STOPPING && desired > capacity) {
        const int extra = static_cast<int>(desired - capacity);
        absl::StatusOr<std::string> job =
            WriteAndSubmitSlurmWorkers(options.slurm, extra, /*submit=*/true, options.sbatch, runner,
                                       options.command_timeout_ms);
        if (job.ok()) {
          std::fprintf(stderr, "gyre provision: %lld worker(s) desired, %lld provisioned: submitted job %s with %d more\n",
                       static_cast<long long>(desired), static_cast<long long>(capacity), job->c_str(), extra);
          capacity += extra;
        } else {
          std::fprintf(stderr, "gyre provision: could not submit %d more worker(s): %s (retrying in %lld s)\n", extra,
                       std::string(job.status().message()).c_str(),
                       static_cast<long long>(options.retry_ms / 1000));
          wait_ms = options.retry_ms;
        }
      }
    }
    SleepUnlessStopped(clock, wait_ms, stop);
  }
  return absl::CancelledError("stop requested");
}

}  // namespace gyre::deploy
