// The worker's step loop: DESIGN.md section 4, decision by decision.
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "base/status_macros.h"
#include "worker/in_run_eval.h"
#include "worker/worker.h"

namespace gyre {

namespace {

// Answers that mean "your view of the run is out of date" (a coordinator restart, a generation
// that moved on, a session declared dead): the worker re-attaches and lets the coordinator
// decide, keeping its parameters. Anything else is a real error.
bool NeedsResync(const absl::Status& s) {
  return absl::IsNotFound(s) || absl::IsFailedPrecondition(s) || absl::IsAborted(s);
}

constexpr int kMaxResyncsInARow = 50;

}  // namespace

absl::Status Worker::Run() {
  RETURN_IF_ERROR(RegisterSession());
  heartbeat_ = std::thread([this] { HeartbeatLoop(); });
  RETURN_IF_ERROR(EnsureReplica());
  int resyncs = 0;
  auto resync = [&](const absl::Status& why) -> absl::Status {
    if (++resyncs > kMaxResyncsInARow) return why;
    std::fprintf(stderr, "worker: %s; re-attaching to the coordinator\n", std::string(why.message()).c_str());
    DropCollective();
    replica_->DropGradients();
    session_lost_.store(true);
    clock_->SleepMicros(options_.broken_collective_wait_ms * 1000);
    return absl::OkStatus();
  };
  while (true) {
    if (session_lost_.load()) RETURN_IF_ERROR(RegisterSession());  // coordinator forgot us
    gyre::v1::AcquireStepRequest request;
    request.set_session(session_.load());
    request.set_generation(generation_.load());
    request.set_step(applied_steps_.load());
    absl::StatusOr<gyre::v1::StepLease> lease = client_->AcquireStep(request);
    if (NeedsResync(lease.status())) {
      RETURN_IF_ERROR(resync(lease.status()));
      continue;
    }
    if (!lease.ok()) return lease.status();
    switch (lease->decision()) {
      case gyre::v1::STEP_DECISION_PAUSE:
      case gyre::v1::STEP_DECISION_STANDBY:
        clock_->SleepMicros(std::max<int64_t>(lease->retry_after_ms(), 10) * 1000);
        continue;
      case gyre::v1::STEP_DECISION_STOP: {
        // The coordinator may ask for a final checkpoint of the last committed state.
        if (!lease->checkpoint_dir().empty() && collective_) StartCheckpoint(*lease);
        if (checkpoints_) checkpoints_->Flush();
        gyre::v1::LeaveRequest leave;
        leave.set_session(session_.load());
        leave.set_reason("stop");
        client_->Leave(leave).IgnoreError();
        return absl::OkStatus();
      }
      case gyre::v1::STEP_DECISION_RECONFIGURE:
        if (absl::Status s = JoinGeneration(*lease); !s.ok()) {
          // Not a member of any generation until the coordinator says again (asking with the
          // failed one could be answered RUN on state this worker never received).
          generation_.store(0);
          // A member that never showed up (or died) while the communicator formed: the
          // coordinator will form another generation. Bad checkpoints or configs are fatal.
          const bool transient = NeedsResync(s) || absl::IsDeadlineExceeded(s) || absl::IsUnavailable(s);
          if (!transient) return s;
          RETURN_IF_ERROR(resync(s));
        }
        continue;
      case gyre::v1::STEP_DECISION_CHECKPOINT:
        StartCheckpoint(*lease);
        [[fallthrough]];
      case gyre::v1::STEP_DECISION_RUN:
        if (absl::Status s = RunStep(*lease); !s.ok()) {
          if (!NeedsResync(s)) return s;
          RETURN_IF_ERROR(resync(s));
          continue;
        }
        resyncs = 0;
        continue;
      default:
        return absl::InternalError(absl::StrCat("unknown lease decision ", lease->decision()));
    }
  }
}

absl::Status Worker::RunStep(const gyre::v1::StepLease& lease) {
  if (!collective_) {  // our communicator failed this step: wait for the next generation
    clock_->SleepMicros(options_.broken_collective_wait_ms * 1000);
    return absl::OkStatus();
  }
  if (replica_->partially_restored()) {  // JoinGeneration refuses this; never produce a step from it
    return absl::InternalError("step on a partially restored replica refused");
  }
  // In-run evaluation of the parameters after lease.step() steps, before this step runs (its time
  // is reported apart: StepTimes.eval_ms). Only rank 0; the others wait in the step's collective.
  const bool eval_due = rank_ == 0 && !eval_disabled_ && EvalDueBefore(config_.train(), lease.step());
  if (eval_due && (!eval_.has_value() || eval_->step() != lease.step())) {
    const int64_t e0 = clock_->NowMicros();
    absl::StatusOr<gyre::v1::EvalResult> result =
        RunInRunEval(env_, *index_, replica_->model(), config_, lease.step());
    eval_ms_ = (clock_->NowMicros() - e0) / 1e3;
    if (result.ok()) {
      eval_ = std::move(*result);
      std::fprintf(stderr, "eval   %6llu  held-out loss %.4f over %llu tokens, LM head effective rank %.1f  (%.0f ms)\n",
                   (unsigned long long)lease.step(), eval_->loss(), (unsigned long long)eval_->tokens(),
                   eval_->head().effective_rank(), eval_ms_);
    } else {
      eval_disabled_ = true;
      eval_.reset();
      std::fprintf(stderr, "worker: in-run evaluation off for this run: %s\n", std::string(result.status().message()).c_str());
    }
  }
  const int64_t t0 = clock_->NowMicros();
  const uint32_t seq = sampler_->schedule().seq_len();
  const uint64_t first = lease.samples().rank_begin(), count = lease.samples().rank_end() - first;
  std::vector<uint32_t> window(seq + 1);
  std::vector<int32_t> tokens(count * (seq + 1));
  for (uint64_t i = 0; i < count; ++i) {
    RETURN_IF_ERROR(sampler_->Read(first + i, window));
    std::copy(window.begin(), window.end(), tokens.begin() + i * (seq + 1));
  }
  const uint64_t global_batch = lease.samples().end() - lease.samples().begin();
  const uint64_t global_tokens = lease.schedule().global_tokens() ? lease.schedule().global_tokens() : global_batch * seq;
  const int64_t t1 = clock_->NowMicros();
  // Gradient buckets go out on the collective while backward still runs (ReduceGradients then
  // waits only for what backward did not hide).
  if (options_.overlap_grad_reduce) replica_->BeginOverlappedReduce(collective_.get(), options_.grad_bucket_bytes);
  ReplicaLoss loss = replica_->ComputeGradients(tokens, static_cast<int64_t>(count), seq, global_tokens);
  // StepMetrics.loss is this rank's share (the coordinator sums over ranks); `loss` becomes the
  // global value after the reduction, which is what this worker logs.
  const double local_loss = loss.loss;
  const int64_t t2 = clock_->NowMicros();
  if (absl::Status s = replica_->ReduceGradients(collective_.get(), &loss, options_.grad_bucket_bytes); !s.ok()) {
    std::fprintf(stderr, "worker: step %llu: %s; waiting for the next generation\n",
                 (unsigned long long)lease.step(), std::string(s.message()).c_str());
    DropCollective();
    replica_->DropGradients();
    return absl::OkStatus();
  }
  const int64_t t3 = clock_->NowMicros();

  gyre::v1::CompleteStepRequest complete;
  complete.set_session(session_.load());
  complete.set_generation(generation_.load());
  complete.set_step(lease.step());
  gyre::v1::StepMetrics* m = complete.mutable_metrics();
  m->set_step(lease.step());
  m->set_loss(local_loss);
  m->set_grad_norm(replica_->GradNorm());
  m->set_tokens(count * seq);
  m->set_rank(static_cast<uint32_t>(rank_));
  m->set_generation(generation_.load());
  if (eval_due && eval_.has_value() && eval_->step() == lease.step()) {
    *m->mutable_eval() = *eval_;
    m->mutable_times()->set_eval_ms(eval_ms_);
  }
  // The step-time breakdown (issue 5): data wait, forward, backward, exposed communication (the
  // wait for the gradient all-reduce after backward), optimizer. The optimizer runs only after
  // COMMIT, i.e. after these metrics are sent: optimizer_ms is that of the previous step this
  // worker applied (AdamW's cost does not change from step to step). total_ms is their sum: the
  // step's time on this worker without the commit round trip.
  const ModelReplica::PassTimes& pass = replica_->last_pass_times();
  // CUDA: the host ran ahead of the device, so the wait after ComputeGradients also covers the
  // rest of backward; the replica measured the exposed part with CUDA events instead.
  const double exposed_comm_ms = pass.exposed_comm_ms >= 0 ? pass.exposed_comm_ms : (t3 - t2) / 1e3;
  const double total_ms = (t3 - t0) / 1e3 + last_optimizer_ms_;
  gyre::v1::StepTimes* times = m->mutable_times();
  times->set_data_wait_ms((t1 - t0) / 1e3);
  times->set_forward_ms(pass.forward_ms);
  times->set_backward_ms(pass.backward_ms);
  times->set_exposed_comm_ms(exposed_comm_ms);
  times->set_optimizer_ms(last_optimizer_ms_);
  times->set_total_ms(total_ms);
  m->set_tokens_per_s(count * seq / std::max(total_ms / 1e3, 1e-9));
  m->set_model_flops_per_s(replica_->training_flops().total() * count * seq / std::max(total_ms / 1e3, 1e-9));
  if (replica_->device() == ops::Device::kCuda && GpuRuntimeOrNull() != nullptr) {
    m->set_peak_flops_per_s(GpuRuntimeOrNull()->PeakFlops());
  }
  ASSIGN_OR_RETURN(gyre::v1::CompleteStepResponse verdict, client_->CompleteStep(complete));
  if (verdict.verdict() != gyre::v1::COMMIT_VERDICT_COMMIT) {  // ABORT: redo in the next generation
    replica_->DropGradients();
    return absl::OkStatus();
  }
  const int64_t t4 = clock_->NowMicros();
  ASSIGN_OR_RETURN(ops::UpdateStats update, replica_->ApplyUpdate(lease.step()));
  const int64_t t5 = clock_->NowMicros();
  last_optimizer_ms_ = (t5 - t4) / 1e3;
  applied_steps_.store(lease.step() + 1);
  if (options_.log_steps && rank_ == 0) {
    const double seconds = (t5 - t0) / 1e6;
    // MFU of this rank over its whole step (commit round trip and optimizer included).
    std::string mfu;
    if (m->peak_flops_per_s() > 0) {
      mfu = absl::StrFormat("  mfu %.1f%%", 100 * replica_->training_flops().total() * count * seq / seconds /
                                                m->peak_flops_per_s());
    }
    std::fprintf(stderr,
                 "step %6llu  loss %.4f  grad_norm %.3f  lr %.3g  world %d  %.0f tok/s%s  (data %.1f ms, fwd %.1f ms, "
                 "bwd %.1f ms, comm %.1f ms exposed, commit %.1f ms, opt %.1f ms)  at %.3f s\n",
                 (unsigned long long)lease.step(), loss.loss, update.grad_norm, update.lr, collective_->world_size(),
                 global_batch * seq / seconds, mfu.c_str(), (t1 - t0) / 1e3, pass.forward_ms, pass.backward_ms,
                 exposed_comm_ms, (t4 - t3) / 1e3, (t5 - t4) / 1e3, (t5 - started_micros_) / 1e6);
  }
  return absl::OkStatus();
}

}  // namespace gyre
