#include "cli/status_text.h"

#include <cmath>

#include "absl/strings/str_format.h"

namespace gyre::cli {
namespace {

const char* StateName(gyre::v1::RunState s) {
  switch (s) {
    case gyre::v1::RUN_STATE_WAITING:
      return "waiting for workers";
    case gyre::v1::RUN_STATE_RUNNING:
      return "running";
    case gyre::v1::RUN_STATE_PAUSED:
      return "paused";
    case gyre::v1::RUN_STATE_RECONFIGURING:
      return "reconfiguring";
    case gyre::v1::RUN_STATE_STOPPING:
      return "stopping";
    case gyre::v1::RUN_STATE_STOPPED:
      return "stopped";
    case gyre::v1::RUN_STATE_FINISHED:
      return "finished";
    default:
      return "unknown";
  }
}

}  // namespace

std::string RunStatusText(const gyre::v1::RunStatus& s) {
  std::string out;
  absl::StrAppendFormat(&out, "run          %s\n", s.run_name());
  absl::StrAppendFormat(&out, "state        %s\n", StateName(s.state()));
  absl::StrAppendFormat(&out, "steps        %d / %d committed\n", s.committed_steps(), s.max_steps());
  absl::StrAppendFormat(&out, "generation   %d\n", s.generation());
  absl::StrAppendFormat(&out, "workers      %u active, %u standby, %u desired\n", s.workers_active(),
                        s.workers_standby(), s.desired_workers());
  if (s.has_last_metrics()) {
    const auto& m = s.last_metrics();
    absl::StrAppendFormat(&out, "last step    %d: loss %.4f, grad norm %.3f, lr %.3g\n", m.step(), m.loss(),
                          m.grad_norm(), m.lr());
  }
  if (s.has_last_metrics() && s.last_metrics().has_times()) {
    // Slowest rank per phase (the coordinator's aggregate); optimizer: the previous step's.
    const auto& t = s.last_metrics().times();
    absl::StrAppendFormat(
        &out, "step time    %.1f ms: data %.1f, forward %.1f, backward %.1f, exposed comm %.1f, optimizer %.1f\n",
        t.total_ms(), t.data_wait_ms(), t.forward_ms(), t.backward_ms(), t.exposed_comm_ms(), t.optimizer_ms());
  }
  if (s.tokens_per_s() > 0) absl::StrAppendFormat(&out, "throughput   %.0f tokens/s\n", s.tokens_per_s());
  if (s.has_last_metrics() && s.last_metrics().model_flops_per_s() > 0) {
    const auto& m = s.last_metrics();
    absl::StrAppendFormat(&out, "model FLOPs  %.1f TFLOP/s", m.model_flops_per_s() / 1e12);
    if (m.peak_flops_per_s() > 0)
      absl::StrAppendFormat(&out, " (MFU %.1f%%)", 100 * m.model_flops_per_s() / m.peak_flops_per_s());
    absl::StrAppendFormat(&out, "\n");
  }
  if (s.has_last_eval()) {
    const auto& e = s.last_eval();
    absl::StrAppendFormat(&out, "eval         after step %d: held-out loss %.4f over %d tokens\n", e.step(), e.loss(),
                          e.tokens());
    for (const auto& src : e.sources()) {
      absl::StrAppendFormat(&out, "               %-24s %.4f (ppl %.2f, %d tokens)\n", src.source(), src.loss(),
                            std::exp(src.loss()), src.tokens());
    }
    if (e.has_head()) {
      absl::StrAppendFormat(&out, "LM head      d %u: effective rank %.1f, stable rank %.2f, W-error(%u) %.4f\n",
                            e.head().dim(), e.head().effective_rank(), e.head().stable_rank(), e.head().w_error_rank(),
                            e.head().w_error());
    }
  }
  for (const auto& alarm : s.alarms()) absl::StrAppendFormat(&out, "ALARM        %s\n", alarm);
  if (!s.last_checkpoint().empty()) {
    absl::StrAppendFormat(&out, "checkpoint   step %d at %s\n", s.last_checkpoint_step(), s.last_checkpoint());
  }
  if (s.checkpoint_failures() > 0) {
    // The run goes on from the checkpoint above; these writes did not happen (disk full?).
    absl::StrAppendFormat(&out, "CKPT FAILED  %d write%s since the coordinator started; last: %s\n",
                          s.checkpoint_failures(), s.checkpoint_failures() == 1 ? "" : "s", s.last_checkpoint_error());
  }
  return out;
}

}  // namespace gyre::cli
