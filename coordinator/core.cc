#include "coordinator/core.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <numbers>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "google/protobuf/util/message_differencer.h"

namespace gyre::coordinator {
namespace {

using gyre::v1::StepDecision;
using gyre::v1::StepLease;

constexpr uint32_t kDefaultHeartbeatIntervalMs = 1000;
constexpr uint32_t kDefaultHeartbeatTimeoutMs = 10000;
constexpr uint32_t kDefaultKeepLast = 3;
constexpr uint32_t kDefaultSeqLen = 2048;
constexpr double kDefaultFinalLrFraction = 0.1;
constexpr double kDefaultWeightDecay = 0.1;
// Bound on deferred CompleteStep replies kept per session (a worker's retries).
constexpr size_t kMaxPendingPerSession = 4;

bool SameWorker(const gyre::v1::WorkerId& a, const gyre::v1::WorkerId& b) {
  return a.host() == b.host() && a.device() == b.device() && a.pid() == b.pid() &&
         a.nonce() == b.nonce();
}

bool IsRunLike(const StepLease& lease) {
  return lease.decision() == gyre::v1::STEP_DECISION_RUN ||
         lease.decision() == gyre::v1::STEP_DECISION_CHECKPOINT;
}

std::string CheckpointDir(uint64_t step) { return absl::StrCat("checkpoints/step-", step); }

}  // namespace

struct CoordinatorCore::Context {
  int64_t now = 0;
  std::vector<Action> actions;

  void Send(RequestId id, ReplyBody body) {
    actions.push_back(Reply{id, absl::OkStatus(), std::move(body)});
  }
  void Fail(RequestId id, absl::Status status) {
    actions.push_back(Reply{id, std::move(status), std::monostate{}});
  }
};

// ---------------------------------------------------------------------------------------------
// Free functions

gyre::v1::Rendezvous GlooRendezvous::ForGeneration(uint64_t generation_id) {
  gyre::v1::Rendezvous r;
  r.set_store_address(store_address_);
  r.set_store_prefix(absl::StrCat(run_name_, "/gen-", generation_id, "/"));
  return r;
}

absl::Status CheckResumedRunConfig(const gyre::v1::RunConfig& journaled, const gyre::v1::RunConfig& given) {
  std::string report;
  google::protobuf::util::MessageDifferencer differ;
  differ.ReportDifferencesToString(&report);
  differ.IgnoreField(gyre::v1::RunConfig::descriptor()->FindFieldByName("control"));
  if (differ.Compare(journaled, given)) return absl::OkStatus();
  // One line per difference ("modified: train.max_steps: 30 -> 40"), joined for one message.
  while (!report.empty() && report.back() == '\n') report.pop_back();
  for (char& c : report) {
    if (c == '\n') c = ';';
  }
  return absl::FailedPreconditionError(absl::StrCat(
      "run '", journaled.name(), "' already exists and was started with another config (", report,
      "). A run's config is fixed at its start: resume it with the config it started with (its "
      "run directory's config.textproto), or start a new run under another name"));
}

absl::Status ValidateCoordinatorConfig(const gyre::v1::RunConfig& config) {
  if (config.data().global_batch() == 0) {
    return absl::InvalidArgumentError("data.global_batch must be > 0 (sequences per step)");
  }
  if (config.train().max_steps() == 0) {
    return absl::InvalidArgumentError("train.max_steps must be > 0");
  }
  if (!(config.optimizer().lr() >= 0.0f) || !std::isfinite(config.optimizer().lr())) {
    return absl::InvalidArgumentError("optimizer.lr must be a finite number >= 0");
  }
  const float final_fraction = config.schedule().final_lr_fraction();
  if (!(final_fraction >= 0.0f && final_fraction <= 1.0f)) {
    return absl::InvalidArgumentError("schedule.final_lr_fraction must be in [0, 1]");
  }
  const auto& cluster = config.cluster();
  const uint32_t desired = cluster.desired_workers() ? cluster.desired_workers() : 1;
  const uint32_t min_workers = cluster.min_workers() ? cluster.min_workers() : 1;
  if (min_workers > desired) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "cluster.min_workers (%d) exceeds cluster.desired_workers (%d)", min_workers, desired));
  }
  const uint32_t interval =
      cluster.heartbeat_interval_ms() ? cluster.heartbeat_interval_ms()
                                      : kDefaultHeartbeatIntervalMs;
  const uint32_t timeout =
      cluster.heartbeat_timeout_ms() ? cluster.heartbeat_timeout_ms() : kDefaultHeartbeatTimeoutMs;
  if (timeout <= interval) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "cluster.heartbeat_timeout_ms (%d) must exceed cluster.heartbeat_interval_ms (%d)",
        timeout, interval));
  }
  return absl::OkStatus();
}

double LearningRateAt(const gyre::v1::RunConfig& config, uint64_t step) {
  const double peak = config.optimizer().lr();
  const uint64_t warmup = config.schedule().warmup_steps();
  const uint64_t total =
      config.schedule().total_steps() ? config.schedule().total_steps()
                                      : config.train().max_steps();
  const double final_fraction = config.schedule().final_lr_fraction() > 0
                                    ? config.schedule().final_lr_fraction()
                                    : kDefaultFinalLrFraction;
  if (step < warmup) return peak * static_cast<double>(step + 1) / static_cast<double>(warmup);
  double progress = 1.0;
  if (total > warmup) {
    progress = std::min(1.0, static_cast<double>(step - warmup) /
                                 static_cast<double>(total - warmup));
  }
  const double cosine = 0.5 * (1.0 + std::cos(std::numbers::pi * progress));
  return peak * (final_fraction + (1.0 - final_fraction) * cosine);
}

std::pair<uint64_t, uint64_t> RankSlice(uint64_t global, uint32_t world, uint32_t rank) {
  if (world == 0 || rank >= world) return {0, 0};
  const uint64_t base = global / world;
  const uint64_t extra = global % world;
  const uint64_t begin = rank * base + std::min<uint64_t>(rank, extra);
  const uint64_t size = base + (rank < extra ? 1 : 0);
  return {begin, begin + size};
}

// ---------------------------------------------------------------------------------------------
// Construction

CoordinatorCore::CoordinatorCore(const CoreOptions& options)
    : config_(options.config),
      rendezvous_(options.rendezvous),
      anchor_micros_(options.anchor_micros),
      anchor_unix_ms_(options.anchor_unix_ms) {
  const auto& cluster = config_.cluster();
  global_batch_ = config_.data().global_batch();
  const uint64_t seq_len = config_.data().seq_len() ? config_.data().seq_len() : kDefaultSeqLen;
  global_tokens_ = global_batch_ * seq_len;
  max_steps_ = config_.train().max_steps();
  min_workers_ = cluster.min_workers() ? cluster.min_workers() : 1;
  desired_workers_ = cluster.desired_workers() ? cluster.desired_workers() : 1;
  heartbeat_interval_micros_ = 1000LL * (cluster.heartbeat_interval_ms()
                                             ? cluster.heartbeat_interval_ms()
                                             : kDefaultHeartbeatIntervalMs);
  heartbeat_timeout_micros_ = 1000LL * (cluster.heartbeat_timeout_ms()
                                            ? cluster.heartbeat_timeout_ms()
                                            : kDefaultHeartbeatTimeoutMs);
}

absl::StatusOr<std::unique_ptr<CoordinatorCore>> CoordinatorCore::Create(
    const CoreOptions& options, std::vector<Action>* initial) {
  if (options.rendezvous == nullptr) {
    return absl::InvalidArgumentError("CoreOptions.rendezvous is required");
  }
  if (absl::Status s = ValidateCoordinatorConfig(options.config); !s.ok()) return s;
  std::unique_ptr<CoordinatorCore> core(new CoordinatorCore(options));
  core->started_unix_ms_ = options.anchor_unix_ms;
  JournalBatch batch;
  gyre::v1::JournalConfig journal_config;
  *journal_config.mutable_config() = core->config_;
  journal_config.set_started_unix_ms(core->started_unix_ms_);
  batch.config = std::move(journal_config);
  gyre::v1::ControlState control;
  control.set_desired_workers(core->desired_workers_);
  batch.control = std::move(control);
  initial->push_back(JournalWrite{std::move(batch)});
  return core;
}

absl::StatusOr<std::unique_ptr<CoordinatorCore>> CoordinatorCore::Restore(
    const CoreOptions& options, const JournalContents& journal, int64_t now_micros,
    std::vector<Action>* initial) {
  if (options.rendezvous == nullptr) {
    return absl::InvalidArgumentError("CoreOptions.rendezvous is required");
  }
  if (!journal.config.has_value()) {
    return absl::DataLossError("journal has no \"config\" record; cannot resume this run");
  }
  CoreOptions restored_options = options;
  restored_options.config = journal.config->config();
  if (absl::Status s = ValidateCoordinatorConfig(restored_options.config); !s.ok()) {
    return absl::DataLossError(absl::StrCat("journaled config is invalid: ", s.message()));
  }
  std::unique_ptr<CoordinatorCore> core(new CoordinatorCore(restored_options));
  core->started_unix_ms_ = journal.config->started_unix_ms();
  if (journal.control.has_value()) {
    core->paused_ = journal.control->paused();
    core->stopped_ = journal.control->stopped();
    if (journal.control->desired_workers() > 0) {
      core->desired_workers_ = journal.control->desired_workers();
    }
  }
  uint64_t previous_id = 0;
  for (const auto& record : journal.generations) {
    const auto& g = record.generation();
    if (g.id() <= previous_id) {
      return absl::DataLossError(absl::StrFormat(
          "journal generation records not strictly increasing: %d after %d", g.id(), previous_id));
    }
    previous_id = g.id();
    if (record.reason() == "restore") core->last_restore_generation_ = g.id();
    auto& members = core->generation_members_[g.id()];
    for (const auto& m : g.members()) members.insert(m.session());
  }
  for (size_t i = 0; i < journal.steps.size(); ++i) {
    const auto& step = journal.steps[i];
    if (step.step() != i) {
      return absl::DataLossError(absl::StrFormat(
          "journal committed steps have a gap: record %d holds step %d", i, step.step()));
    }
    if (core->committed_by_.empty() || std::prev(core->committed_by_.end())->second !=
                                           step.generation()) {
      core->committed_by_[step.step()] = step.generation();
    }
    if (i + 1 == journal.steps.size()) core->last_metrics_ = step.metrics();
  }
  core->committed_ = journal.steps.size();
  core->restored_committed_ = core->committed_;
  for (const auto& c : journal.checkpoints) {
    if (c.invalid_reason().empty()) core->checkpoints_[c.step()] = c;
  }

  if (!journal.generations.empty()) {
    const auto& last = journal.generations.back();
    core->generation_ = last.generation();
    core->restored_generation_ = core->generation_.id();
    if (last.reason() == "restore" && core->generation_.start_step() > 0 &&
        core->committed_ == core->generation_.start_step()) {
      auto c = core->checkpoints_.find(core->generation_.start_step());
      if (c == core->checkpoints_.end()) {
        return absl::DataLossError(absl::StrFormat(
            "generation %d restores from the checkpoint of step %d, which the journal lacks",
            core->generation_.id(), core->generation_.start_step()));
      }
      core->restore_checkpoint_path_ = c->second.path();
    }
    if (core->generation_.start_step() > core->committed_) {
      return absl::DataLossError(absl::StrFormat(
          "generation %d starts at step %d but only %d steps are committed",
          core->generation_.id(), core->generation_.start_step(), core->committed_));
    }
    std::set<uint32_t> needs_state(core->generation_.needs_state().begin(),
                                   core->generation_.needs_state().end());
    for (const auto& m : core->generation_.members()) {
      Worker w;
      w.session = m.session();
      w.id = m.worker();
      w.last_seen_micros = now_micros;
      w.last_seen_unix_ms = core->UnixMs(now_micros);
      w.has_state = core->committed_ > core->generation_.start_step() ||
                    needs_state.count(m.rank()) == 0;
      w.join_order = core->next_join_order_++;
      core->workers_[w.session] = w;
    }
  }
  Context ctx;
  ctx.now = now_micros;
  core->ArmNextTimer(ctx);
  for (auto& a : ctx.actions) initial->push_back(std::move(a));
  return core;
}

// ---------------------------------------------------------------------------------------------
// Dispatch

std::vector<Action> CoordinatorCore::Handle(const Event& event, int64_t now_micros) {
  Context ctx;
  ctx.now = now_micros;
  std::visit(
      [&](const auto& e) {
        using T = std::decay_t<decltype(e)>;
        if constexpr (std::is_same_v<T, RegisterEvent>) OnRegister(e, ctx);
        if constexpr (std::is_same_v<T, HeartbeatEvent>) OnHeartbeat(e, ctx);
        if constexpr (std::is_same_v<T, AcquireStepEvent>) OnAcquireStep(e, ctx);
        if constexpr (std::is_same_v<T, CompleteStepEvent>) OnCompleteStep(e, ctx);
        if constexpr (std::is_same_v<T, ReportCheckpointEvent>) OnReportCheckpoint(e, ctx);
        if constexpr (std::is_same_v<T, LeaveEvent>) OnLeave(e, ctx);
        if constexpr (std::is_same_v<T, TickEvent>) OnTick(ctx);
        if constexpr (std::is_same_v<T, ControlEvent>) OnControl(e, ctx);
        if constexpr (std::is_same_v<T, ReportBadCheckpointEvent>) OnReportBadCheckpoint(e, ctx);
      },
      event);
  ArmNextTimer(ctx);
  return std::move(ctx.actions);
}

// ---------------------------------------------------------------------------------------------
// Worker events

void CoordinatorCore::OnRegister(const RegisterEvent& e, Context& ctx) {
  const auto& req = e.request;
  if (!req.has_worker() || req.worker().host().empty()) {
    ctx.Fail(e.id, absl::InvalidArgumentError("RegisterRequest.worker.host is required"));
    return;
  }
  Worker* found = nullptr;
  if (req.previous_session() != 0) {
    auto it = workers_.find(req.previous_session());
    if (it != workers_.end() && SameWorker(it->second.id, req.worker())) found = &it->second;
  }
  if (found == nullptr) {
    // A retried Register whose reply was lost: same process, same session.
    for (auto& [session, w] : workers_) {
      if (SameWorker(w.id, req.worker())) {
        found = &w;
        break;
      }
    }
  }
  gyre::v1::RegisterResponse response;
  *response.mutable_config() = config_;
  response.set_heartbeat_interval_ms(static_cast<uint32_t>(heartbeat_interval_micros_ / 1000));
  if (found != nullptr) {
    found->last_seen_micros = ctx.now;
    found->last_seen_unix_ms = UnixMs(ctx.now);
    found->reported_step = req.last_applied_step();
    if (req.last_applied_step() == committed_ && !IsMember(found->session) &&
        last_restore_generation_ == 0) {
      found->has_state = true;
    }
    response.set_session(found->session);
    ctx.Send(e.id, std::move(response));
    return;
  }
  if (e.fresh_session == 0 || workers_.count(e.fresh_session) != 0 ||
      std::any_of(generation_members_.begin(), generation_members_.end(),
                  [&](const auto& g) { return g.second.count(e.fresh_session) != 0; })) {
    ctx.Fail(e.id, absl::UnavailableError("session id collision; retry"));
    return;
  }
  if (req.replaces_pid() != 0) {
    // The launcher saw that process exit: it will never heartbeat again, so waiting out its
    // heartbeat timeout would only stall the survivors.
    DropWorkersIf([&](const Worker& w) {
      return w.id.host() == req.worker().host() && w.id.pid() == req.replaces_pid();
    });
  }
  Worker w;
  w.session = e.fresh_session;
  w.id = req.worker();
  w.last_seen_micros = ctx.now;
  w.last_seen_unix_ms = UnixMs(ctx.now);
  w.reported_step = req.last_applied_step();
  // The claim is trusted only while no restore has rolled the run back: before one, parameters
  // after t steps are the same whatever generation produced them.
  w.has_state = req.last_applied_step() == committed_ && last_restore_generation_ == 0;
  w.join_order = next_join_order_++;
  workers_[w.session] = w;
  response.set_session(w.session);
  ctx.Send(e.id, std::move(response));
  Reconcile(ctx);
}

void CoordinatorCore::OnHeartbeat(const HeartbeatEvent& e, Context& ctx) {
  gyre::v1::HeartbeatResponse response;
  response.set_current_generation(generation_.id());
  auto it = workers_.find(e.request.session());
  if (it == workers_.end()) {
    response.set_known(false);
  } else {
    it->second.last_seen_micros = ctx.now;
    it->second.last_seen_unix_ms = UnixMs(ctx.now);
    it->second.reported_step = e.request.step();
    response.set_known(true);
  }
  ctx.Send(e.id, std::move(response));
}

void CoordinatorCore::OnAcquireStep(const AcquireStepEvent& e, Context& ctx) {
  Worker* worker = SeenWorker(e.request.session(), e.id, ctx);
  if (worker == nullptr) return;
  if (!worker->ready) {
    // A standby that finished building its replica: it may now be picked (at a step boundary).
    worker->ready = true;
    Reconcile(ctx);
  }
  absl::Status error;
  StepLease lease = Lease(e.request.session(), e.request.generation(), e.request.step(), &error);
  if (!error.ok()) {
    ctx.Fail(e.id, std::move(error));
    return;
  }
  ctx.Send(e.id, std::move(lease));
}

StepLease CoordinatorCore::Lease(uint64_t session, uint64_t generation, uint64_t step,
                                 absl::Status* error) {
  const Worker& w = workers_.at(session);
  StepLease lease;
  lease.set_step(step);
  *lease.mutable_generation() = generation_;
  const uint32_t retry_ms = static_cast<uint32_t>(heartbeat_interval_micros_ / 1000);
  auto ask_again = [&](StepDecision decision) {
    lease.set_decision(decision);
    lease.set_retry_after_ms(retry_ms);
    return lease;
  };
  if (!IsMember(session)) {
    if (w.draining || stopped_ || finished()) {
      // The first member to leave after the final STOP dissolves the generation; a member of it
      // that asks later (rank 0 among them) gets the same decision, final checkpoint included.
      if (final_stop_.has_value() && final_stop_->step() == step &&
          WasMember(final_stop_->generation().id(), session)) {
        return *final_stop_;
      }
      lease.set_decision(gyre::v1::STEP_DECISION_STOP);
      return lease;
    }
    return ask_again(gyre::v1::STEP_DECISION_STANDBY);
  }
  if (generation != generation_.id() || step < generation_.start_step()) {
    // A member that has not joined the current generation yet, or one behind its first step
    // (it re-registered and lost track): it joins, getting the state first if it lacks it.
    // Nothing has committed in this generation without it, so the generation starts at
    // start_step.
    lease.set_decision(gyre::v1::STEP_DECISION_RECONFIGURE);
    lease.set_step(generation_.start_step());
    if (restore_checkpoint_path_.has_value()) lease.set_checkpoint_dir(*restore_checkpoint_path_);
    return lease;
  }
  if (auto it = decisions_.find(step); it != decisions_.end()) {
    lease = it->second;
    FillRankSlice(session, &lease);
    return lease;
  }
  if (step < committed_) {
    *error = absl::FailedPreconditionError(
        absl::StrFormat("step %d is already committed (committed steps: %d)", step, committed_));
    return lease;
  }
  if (step > committed_ + 1) {
    *error = absl::FailedPreconditionError(absl::StrFormat(
        "step %d is beyond the next step %d (committed steps: %d)", step, committed_, committed_));
    return lease;
  }
  if (step == committed_ + 1) {
    // Pipelined request for t+1 while t computes: decide only behind a RUN of t.
    auto prev = decisions_.find(committed_);
    if (prev == decisions_.end() || !IsRunLike(prev->second)) {
      return ask_again(gyre::v1::STEP_DECISION_PAUSE);
    }
  }
  if (step >= max_steps_ || stopped_) {
    // At the boundary where the run ends, the state is saved once more (unless it already is):
    // rank 0 writes the checkpoint at checkpoint_dir and reports it before it leaves.
    lease = StepLease();
    lease.set_decision(gyre::v1::STEP_DECISION_STOP);
    lease.set_step(step);
    *lease.mutable_generation() = generation_;
    if (step == committed_ && step > 0 && checkpoints_.count(step) == 0) {
      lease.set_checkpoint_dir(CheckpointDir(step));
    }
    decisions_[step] = lease;
    if (step == committed_) final_stop_ = lease;
    return lease;
  }
  if (paused_) return ask_again(gyre::v1::STEP_DECISION_PAUSE);
  std::vector<uint64_t> current;
  for (const auto& m : generation_.members()) current.push_back(m.session());
  // A membership change waits for this boundary; Reconcile makes it once nothing is in flight.
  if (TargetMembers() != current) return ask_again(gyre::v1::STEP_DECISION_PAUSE);
  if (static_cast<uint32_t>(generation_.members_size()) < min_workers_) {
    return ask_again(gyre::v1::STEP_DECISION_PAUSE);
  }
  const uint64_t every = config_.checkpoint().every_steps();
  const bool checkpoint_due =
      step > 0 && checkpoints_.count(step) == 0 &&
      (checkpoint_requested_ || (every > 0 && step % every == 0));
  StepDecision decision = gyre::v1::STEP_DECISION_RUN;
  if (checkpoint_due) {
    decision = gyre::v1::STEP_DECISION_CHECKPOINT;
    checkpoint_requested_ = false;
  }
  decisions_[step] = MakeRunLease(step, decision);
  lease = decisions_[step];
  FillRankSlice(session, &lease);
  return lease;
}

StepLease CoordinatorCore::MakeRunLease(uint64_t step, StepDecision decision) const {
  StepLease lease;
  lease.set_decision(decision);
  lease.set_step(step);
  *lease.mutable_generation() = generation_;
  lease.mutable_samples()->set_begin(step * global_batch_);
  lease.mutable_samples()->set_end((step + 1) * global_batch_);
  auto* schedule = lease.mutable_schedule();
  schedule->set_lr(LearningRateAt(config_, step));
  schedule->set_weight_decay(config_.optimizer().weight_decay() > 0
                                 ? config_.optimizer().weight_decay()
                                 : kDefaultWeightDecay);
  schedule->set_global_tokens(global_tokens_);
  if (decision == gyre::v1::STEP_DECISION_CHECKPOINT) lease.set_checkpoint_dir(CheckpointDir(step));
  return lease;
}

void CoordinatorCore::FillRankSlice(uint64_t session, StepLease* lease) const {
  if (!IsRunLike(*lease)) return;
  const auto rank = RankOf(session);
  if (!rank.has_value()) return;
  const auto [begin, end] =
      RankSlice(global_batch_, static_cast<uint32_t>(generation_.members_size()), *rank);
  lease->mutable_samples()->set_rank_begin(lease->samples().begin() + begin);
  lease->mutable_samples()->set_rank_end(lease->samples().begin() + end);
}

void CoordinatorCore::OnCompleteStep(const CompleteStepEvent& e, Context& ctx) {
  const auto& req = e.request;
  Worker* worker = SeenWorker(req.session(), e.id, ctx);
  if (worker == nullptr) return;
  const uint64_t step = req.step();
  gyre::v1::CompleteStepResponse response;
  if (step == committed_ && req.generation() >= last_restore_generation_) {
    // It computed step t, so it holds the parameters after t steps (a member that needed state
    // received it), whatever the verdict: it can be the next generation's state source.
    worker->has_state = true;
  }

  if (step < committed_) {
    // A retry after a lost reply (or a coordinator restart): answer from the ledger.
    const auto by = GenerationThatCommitted(step);
    const bool ours = by.has_value() && *by == req.generation() &&
                      WasMember(req.generation(), req.session());
    response.set_verdict(ours ? gyre::v1::COMMIT_VERDICT_COMMIT : gyre::v1::COMMIT_VERDICT_ABORT);
    if (ours && req.want_next_lease() && req.generation() == generation_.id() &&
        step + 1 >= committed_) {
      absl::Status error;
      StepLease next = Lease(req.session(), req.generation(), step + 1, &error);
      if (error.ok()) *response.mutable_next_lease() = std::move(next);
    }
    ctx.Send(e.id, std::move(response));
    return;
  }
  if (req.generation() != generation_.id() || generation_.members_size() == 0) {
    if (req.generation() > generation_.id()) {
      ctx.Fail(e.id, absl::FailedPreconditionError(absl::StrFormat(
                         "generation %d does not exist (current %d)", req.generation(),
                         generation_.id())));
      return;
    }
    // The generation changed before every member reported: redo the step.
    response.set_verdict(gyre::v1::COMMIT_VERDICT_ABORT);
    ctx.Send(e.id, std::move(response));
    return;
  }
  if (!IsMember(req.session())) {
    ctx.Fail(e.id, absl::FailedPreconditionError(absl::StrFormat(
                       "session %016x is not a member of generation %d", req.session(),
                       generation_.id())));
    return;
  }
  if (step > committed_) {
    ctx.Fail(e.id, absl::FailedPreconditionError(absl::StrFormat(
                       "step %d cannot complete before step %d commits", step, committed_)));
    return;
  }
  auto decision = decisions_.find(step);
  if (decision == decisions_.end() && generation_.id() == restored_generation_ &&
      step <= restored_committed_ + 1) {
    // Leased by the coordinator before its restart (it leased at most one step ahead of what it
    // had committed); the lease is a pure function of (G, t).
    decisions_[step] = MakeRunLease(step, gyre::v1::STEP_DECISION_RUN);
    decision = decisions_.find(step);
  }
  if (decision == decisions_.end() || !IsRunLike(decision->second)) {
    // Computed under a lease this core does not hold (its previous incarnation granted RUN; it
    // decided STOP or nothing since): the step cannot commit here. Drop it and ask again.
    response.set_verdict(gyre::v1::COMMIT_VERDICT_ABORT);
    ctx.Send(e.id, std::move(response));
    return;
  }
  reports_[req.session()] = req.metrics();
  size_t same_session = 0;
  for (const auto& p : pending_completes_) same_session += p.session == req.session();
  if (same_session >= kMaxPendingPerSession) {
    auto oldest =
        std::find_if(pending_completes_.begin(), pending_completes_.end(),
                     [&](const PendingComplete& p) { return p.session == req.session(); });
    ctx.Fail(oldest->id, absl::UnavailableError("superseded by a retry"));
    pending_completes_.erase(oldest);
  }
  pending_completes_.push_back({e.id, req.session(), req.want_next_lease()});
  if (reports_.size() == static_cast<size_t>(generation_.members_size())) Commit(ctx);
}

void CoordinatorCore::Commit(Context& ctx) {
  const uint64_t step = committed_;
  const StepLease& lease = decisions_.at(step);
  gyre::v1::CommittedStep record;
  record.set_step(step);
  record.set_generation(generation_.id());
  record.set_sample_begin(lease.samples().begin());
  record.set_sample_end(lease.samples().end());
  record.set_world_size(static_cast<uint32_t>(generation_.members_size()));
  record.set_committed_unix_ms(UnixMs(ctx.now));
  // Aggregate over ranks: sums for additive quantities, the slowest rank for times.
  gyre::v1::StepMetrics* agg = record.mutable_metrics();
  agg->set_step(step);
  agg->set_generation(generation_.id());
  agg->set_lr(lease.schedule().lr());
  for (const auto& [session, m] : reports_) {
    agg->set_loss(agg->loss() + m.loss());
    agg->set_grad_norm(std::max(agg->grad_norm(), m.grad_norm()));
    agg->set_tokens(agg->tokens() + m.tokens());
    agg->set_tokens_per_s(agg->tokens_per_s() + m.tokens_per_s());
    agg->set_model_flops_per_s(agg->model_flops_per_s() + m.model_flops_per_s());
    agg->set_peak_flops_per_s(agg->peak_flops_per_s() + m.peak_flops_per_s());
    if (m.has_eval()) *agg->mutable_eval() = m.eval();
    auto* t = agg->mutable_times();
    t->set_data_wait_ms(std::max(t->data_wait_ms(), m.times().data_wait_ms()));
    t->set_forward_ms(std::max(t->forward_ms(), m.times().forward_ms()));
    t->set_backward_ms(std::max(t->backward_ms(), m.times().backward_ms()));
    t->set_exposed_comm_ms(std::max(t->exposed_comm_ms(), m.times().exposed_comm_ms()));
    t->set_optimizer_ms(std::max(t->optimizer_ms(), m.times().optimizer_ms()));
    t->set_total_ms(std::max(t->total_ms(), m.times().total_ms()));
  }
  last_metrics_ = *agg;
  if (agg->has_eval()) RecordEval(agg->eval());
  JournalBatch batch;
  batch.steps.push_back(record);
  batch.sync = true;
  ctx.actions.push_back(JournalWrite{std::move(batch)});
  ctx.actions.push_back(StepCommitted{record});

  ++committed_;
  restore_checkpoint_path_.reset();  // every member holds the state now
  if (committed_by_.empty() || std::prev(committed_by_.end())->second != generation_.id()) {
    committed_by_[step] = generation_.id();
  }
  for (auto& [session, w] : workers_) w.has_state = IsMember(session);
  reports_.clear();
  decisions_.erase(decisions_.begin(), decisions_.lower_bound(step));
  const uint64_t committed_generation = generation_.id();
  std::vector<PendingComplete> pending = std::move(pending_completes_);
  pending_completes_.clear();
  Reconcile(ctx);  // a step boundary: membership changes happen here
  for (const auto& p : pending) {
    gyre::v1::CompleteStepResponse response;
    response.set_verdict(gyre::v1::COMMIT_VERDICT_COMMIT);
    if (p.want_next_lease && workers_.count(p.session) != 0) {
      absl::Status error;
      StepLease next = Lease(p.session, committed_generation, step + 1, &error);
      if (error.ok()) *response.mutable_next_lease() = std::move(next);
    }
    ctx.Send(p.id, std::move(response));
  }
}

void CoordinatorCore::OnReportCheckpoint(const ReportCheckpointEvent& e, Context& ctx) {
  const auto& req = e.request;
  Worker* worker = SeenWorker(req.session(), e.id, ctx);
  if (worker == nullptr) return;
  if (req.path().empty()) {
    ctx.Fail(e.id, absl::InvalidArgumentError("ReportCheckpointRequest.path is empty"));
    return;
  }
  if (req.step() > committed_) {
    ctx.Fail(e.id, absl::FailedPreconditionError(absl::StrFormat(
                       "checkpoint of step %d reported but only %d steps are committed",
                       req.step(), committed_)));
    return;
  }
  if (!req.error().empty()) {
    // A failed write: counted and shown, never recorded (no restore may name it). A retry of the
    // same report (the response was lost) is counted once.
    const FailedCheckpoint failure{req.session(), req.step(), req.error()};
    if (!last_checkpoint_failure_.has_value() || !(*last_checkpoint_failure_ == failure)) {
      ++checkpoint_failures_;
      last_checkpoint_failure_ = failure;
    }
    ctx.Send(e.id, gyre::v1::ReportCheckpointResponse());
    return;
  }
  if (checkpoints_.count(req.step()) != 0 ||
      (!checkpoints_.empty() && req.step() < checkpoints_.rbegin()->first)) {
    // A retry, or a late report of a checkpoint older than the newest one (keep-last-K may
    // already have deleted it): nothing to record.
    ctx.Send(e.id, gyre::v1::ReportCheckpointResponse());
    return;
  }
  gyre::v1::CheckpointRecord record;
  record.set_step(req.step());
  record.set_path(req.path());
  record.set_manifest_checksum(req.manifest_checksum());
  record.set_completed_unix_ms(UnixMs(ctx.now));
  record.set_recorded_generation(generation_.id());
  checkpoints_[req.step()] = record;
  JournalBatch batch;
  batch.checkpoints.push_back(record);
  const uint32_t keep = config_.checkpoint().keep_last() ? config_.checkpoint().keep_last()
                                                         : kDefaultKeepLast;
  std::vector<DeleteCheckpoint> deletions;
  while (checkpoints_.size() > keep) {
    auto oldest = checkpoints_.begin();
    batch.erased_checkpoints.push_back(oldest->first);
    deletions.push_back({oldest->first, oldest->second.path()});
    checkpoints_.erase(oldest);
  }
  batch.sync = true;
  ctx.actions.push_back(JournalWrite{std::move(batch)});
  for (auto& d : deletions) ctx.actions.push_back(std::move(d));
  ctx.Send(e.id, gyre::v1::ReportCheckpointResponse());
}

void CoordinatorCore::RecordEval(const gyre::v1::EvalResult& eval) {
  last_eval_ = eval;
  for (const gyre::v1::SourceLoss& s : eval.sources()) {
    Saturation& sat = saturation_[s.source()];
    sat.last = s.loss();
    if (sat.min_step < 0 || s.loss() < sat.min) {
      sat.min = s.loss();
      sat.min_step = static_cast<int64_t>(eval.step());
    }
    sat.above = s.loss() > sat.min + config_.train().saturation_delta() ? sat.above + 1 : 0;
  }
}

void CoordinatorCore::OnReportBadCheckpoint(const ReportBadCheckpointEvent& e, Context& ctx) {
  const auto& req = e.request;
  Worker* worker = SeenWorker(req.session(), e.id, ctx);
  if (worker == nullptr) return;
  auto bad = checkpoints_.find(req.step());
  if (bad == checkpoints_.end() || bad->second.path() != req.path() ||
      req.generation() <= bad->second.recorded_generation()) {
    // Already marked (every member that read it reports it), not one this core restores from, or
    // a late report about an earlier write of this step (a restore generation that named the
    // current files is newer than their record).
    ctx.Send(e.id, gyre::v1::ReportBadCheckpointResponse());
    return;
  }
  // The files are what failed, not the reporter: mark the record whichever generation asked.
  gyre::v1::CheckpointRecord record = bad->second;
  record.set_invalid_reason(req.error().empty() ? "failed verification" : req.error());
  checkpoints_.erase(bad);
  JournalBatch batch;
  batch.checkpoints.push_back(record);
  batch.sync = true;
  if (restore_checkpoint_path_.has_value() && *restore_checkpoint_path_ == req.path()) {
    // The current generation restores from it: the next one restores from the previous valid
    // checkpoint (or step 0), in the same journal batch so a restart never finds a generation
    // that restores from a checkpoint marked bad.
    std::vector<uint64_t> members;
    for (const auto& m : generation_.members()) {
      if (workers_.count(m.session()) != 0) members.push_back(m.session());
    }
    // Reason "restore" once more unless a member already holds the state (it restored before
    // the others found the files bad): then the others get it from that member.
    CreateGeneration(members, members.empty() ? "failure" : "bad-checkpoint", ctx, std::move(batch));
  } else {
    ctx.actions.push_back(JournalWrite{std::move(batch)});
  }
  ctx.Send(e.id, gyre::v1::ReportBadCheckpointResponse());
}

void CoordinatorCore::OnLeave(const LeaveEvent& e, Context& ctx) {
  workers_.erase(e.request.session());
  Reconcile(ctx);
  ctx.Send(e.id, gyre::v1::LeaveResponse());
}

void CoordinatorCore::OnTick(Context& ctx) {
  DropWorkersIf([&](const Worker& w) { return w.last_seen_micros + heartbeat_timeout_micros_ <= ctx.now; });
  Reconcile(ctx);
}

void CoordinatorCore::DropWorkersIf(const std::function<bool(const Worker&)>& dead) {
  for (auto it = workers_.begin(); it != workers_.end();) {
    if (dead(it->second)) {
      if (IsMember(it->first)) member_timed_out_ = true;
      it = workers_.erase(it);
    } else {
      ++it;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Control

void CoordinatorCore::OnControl(const ControlEvent& e, Context& ctx) {
  std::visit(
      [&](const auto& r) {
        using T = std::decay_t<decltype(r)>;
        if constexpr (std::is_same_v<T, gyre::v1::GetStatusRequest>) {
          ctx.Send(e.id, Status());
        } else if constexpr (std::is_same_v<T, gyre::v1::ListWorkersRequest>) {
          gyre::v1::ListWorkersResponse response;
          for (const auto& [session, w] : workers_) {
            auto* info = response.add_workers();
            info->set_session(session);
            *info->mutable_worker() = w.id;
            const auto rank = RankOf(session);
            info->set_state(w.draining      ? gyre::v1::WORKER_STATE_DRAINING
                            : rank.has_value() ? gyre::v1::WORKER_STATE_ACTIVE
                            : w.ready          ? gyre::v1::WORKER_STATE_STANDBY
                                               : gyre::v1::WORKER_STATE_STARTING);
            info->set_rank(rank.value_or(0));
            info->set_step(w.reported_step);
            info->set_last_heartbeat_unix_ms(w.last_seen_unix_ms);
          }
          ctx.Send(e.id, std::move(response));
        } else if constexpr (std::is_same_v<T, gyre::v1::PauseRequest>) {
          if (stopped_) {
            ctx.Fail(e.id, absl::FailedPreconditionError("the run is stopped"));
            return;
          }
          if (!paused_) {
            paused_ = true;
            JournalControl(ctx);
          }
          ctx.Send(e.id, Status());
        } else if constexpr (std::is_same_v<T, gyre::v1::ResumeRequest>) {
          if (stopped_) {
            ctx.Fail(e.id, absl::FailedPreconditionError("cannot resume a stopped run"));
            return;
          }
          if (paused_) {
            paused_ = false;
            JournalControl(ctx);
          }
          Reconcile(ctx);
          ctx.Send(e.id, Status());
        } else if constexpr (std::is_same_v<T, gyre::v1::ScaleRequest>) {
          if (r.target() == 0) {
            ctx.Fail(e.id, absl::InvalidArgumentError("scale target must be at least 1"));
            return;
          }
          if (r.target() < min_workers_) {
            ctx.Fail(e.id, absl::InvalidArgumentError(absl::StrFormat(
                               "scale target %d is below cluster.min_workers %d", r.target(),
                               min_workers_)));
            return;
          }
          if (stopped_) {
            ctx.Fail(e.id, absl::FailedPreconditionError("the run is stopped"));
            return;
          }
          if (desired_workers_ != r.target()) {
            desired_workers_ = r.target();
            scale_changed_ = true;
            JournalControl(ctx);
            Reconcile(ctx);
          }
          ctx.Send(e.id, Status());
        } else if constexpr (std::is_same_v<T, gyre::v1::DrainRequest>) {
          auto it = workers_.find(r.session());
          if (it == workers_.end()) {
            ctx.Fail(e.id, absl::NotFoundError(
                               absl::StrFormat("no live worker with session %016x", r.session())));
            return;
          }
          it->second.draining = true;
          Reconcile(ctx);
          ctx.Send(e.id, Status());
        } else if constexpr (std::is_same_v<T, gyre::v1::CheckpointRequest>) {
          if (stopped_) {
            ctx.Fail(e.id, absl::FailedPreconditionError("the run is stopped"));
            return;
          }
          checkpoint_requested_ = true;
          ctx.Send(e.id, Status());
        } else if constexpr (std::is_same_v<T, gyre::v1::StopRequest>) {
          if (!stopped_) {
            stopped_ = true;
            JournalControl(ctx);
          }
          ctx.Send(e.id, Status());
        }
      },
      e.request);
}

void CoordinatorCore::JournalControl(Context& ctx) {
  JournalBatch batch;
  gyre::v1::ControlState control;
  control.set_paused(paused_);
  control.set_stopped(stopped_);
  control.set_desired_workers(desired_workers_);
  batch.control = std::move(control);
  batch.sync = true;
  ctx.actions.push_back(JournalWrite{std::move(batch)});
}

gyre::v1::RunStatus CoordinatorCore::Status() const {
  gyre::v1::RunStatus status;
  status.set_run_name(config_.name());
  std::vector<uint64_t> current;
  for (const auto& m : generation_.members()) current.push_back(m.session());
  const bool member_lost = MemberLost();
  gyre::v1::RunState state;
  if (stopped_) {
    state = workers_.empty() ? gyre::v1::RUN_STATE_STOPPED : gyre::v1::RUN_STATE_STOPPING;
  } else if (finished()) {
    state = gyre::v1::RUN_STATE_FINISHED;
  } else if (paused_) {
    state = gyre::v1::RUN_STATE_PAUSED;
  } else if (static_cast<uint32_t>(generation_.members_size()) < min_workers_) {
    state = gyre::v1::RUN_STATE_WAITING;
  } else if (member_lost || TargetMembers() != current) {
    state = gyre::v1::RUN_STATE_RECONFIGURING;
  } else {
    state = gyre::v1::RUN_STATE_RUNNING;
  }
  status.set_state(state);
  status.set_committed_steps(committed_);
  status.set_max_steps(max_steps_);
  status.set_generation(generation_.id());
  uint32_t active = 0;
  for (const auto& [session, w] : workers_) active += IsMember(session) ? 1 : 0;
  status.set_workers_active(active);
  status.set_workers_standby(static_cast<uint32_t>(workers_.size()) - active);
  status.set_desired_workers(desired_workers_);
  if (!checkpoints_.empty()) {
    status.set_last_checkpoint(checkpoints_.rbegin()->second.path());
    status.set_last_checkpoint_step(checkpoints_.rbegin()->first);
  }
  status.set_checkpoint_failures(checkpoint_failures_);
  if (last_checkpoint_failure_.has_value()) {
    status.set_last_checkpoint_error(
        absl::StrFormat("step %d: %s", last_checkpoint_failure_->step, last_checkpoint_failure_->error));
  }
  *status.mutable_last_metrics() = last_metrics_;
  status.set_tokens_per_s(last_metrics_.tokens_per_s());
  status.set_started_unix_ms(started_unix_ms_);
  if (last_eval_.has_value()) *status.mutable_last_eval() = *last_eval_;
  const uint32_t patience = std::max<uint32_t>(1, config_.train().saturation_patience());
  for (const auto& [source, s] : saturation_) {
    if (s.above >= patience) {
      status.add_alarms(absl::StrFormat(
          "saturation: %s held-out loss %.4f has stayed more than %.3g above its minimum %.4f (step %d) for %d "
          "evaluations",
          source, s.last, config_.train().saturation_delta(), s.min, s.min_step, s.above));
    }
  }
  return status;
}

// ---------------------------------------------------------------------------------------------
// Membership and generations

bool CoordinatorCore::IsMember(uint64_t session) const { return RankOf(session).has_value(); }

std::optional<uint32_t> CoordinatorCore::RankOf(uint64_t session) const {
  for (const auto& m : generation_.members()) {
    if (m.session() == session) return m.rank();
  }
  return std::nullopt;
}

bool CoordinatorCore::MemberLost() const {
  for (const auto& m : generation_.members()) {
    if (workers_.count(m.session()) == 0) return true;
  }
  return false;
}

bool CoordinatorCore::StepInFlight() const {
  for (auto it = decisions_.lower_bound(committed_); it != decisions_.end(); ++it) {
    if (IsRunLike(it->second)) return true;
  }
  return false;
}

std::optional<uint64_t> CoordinatorCore::last_leased_step() const {
  std::optional<uint64_t> last;
  for (const auto& [step, lease] : decisions_) {
    if (IsRunLike(lease)) last = step;
  }
  return last;
}

uint64_t CoordinatorCore::commit_horizon() const {
  uint64_t horizon = committed_;
  if (auto last = last_leased_step(); last.has_value()) horizon = std::max(horizon, *last + 1);
  if (generation_.id() == restored_generation_ && generation_.members_size() > 0) {
    horizon = std::max(horizon, restored_committed_ + 2);
  }
  return horizon;
}

std::optional<uint64_t> CoordinatorCore::GenerationThatCommitted(uint64_t step) const {
  if (step >= committed_) return std::nullopt;
  auto it = committed_by_.upper_bound(step);
  if (it == committed_by_.begin()) return std::nullopt;
  return std::prev(it)->second;
}

bool CoordinatorCore::WasMember(uint64_t generation, uint64_t session) const {
  auto it = generation_members_.find(generation);
  return it != generation_members_.end() && it->second.count(session) != 0;
}

std::vector<uint64_t> CoordinatorCore::TargetMembers() const {
  // A drained member leaves only if the run keeps min_workers without it; otherwise it stays
  // until a replacement arrives (the provisioner starts one).
  size_t staying = 0, training = 0;
  for (const auto& m : generation_.members()) {
    auto it = workers_.find(m.session());
    const bool stays = it != workers_.end() && !it->second.draining;
    staying += stays;
    training += stays && it->second.ready;
  }
  // While enough members train on, a standby joins only once it is ready (has its replica):
  // otherwise they would all wait for it. Where they could not train anyway (the first
  // generation, whose members are still building too, or too few left), every standby counts.
  const bool members_train_on = training >= std::max<size_t>(1, min_workers_);
  std::vector<const Worker*> standbys;
  for (const auto& [session, w] : workers_) {
    if (!w.draining && !IsMember(session) && (w.ready || !members_train_on)) standbys.push_back(&w);
  }
  const size_t available = std::min<size_t>(staying + standbys.size(), desired_workers_);
  size_t keep_draining = available < min_workers_ ? min_workers_ - available : 0;
  std::vector<uint64_t> target;
  for (const auto& m : generation_.members()) {
    auto it = workers_.find(m.session());
    if (it == workers_.end()) continue;
    if (it->second.draining) {
      if (keep_draining == 0) continue;
      --keep_draining;
    }
    target.push_back(m.session());
  }
  // State holders first (they can hand state over), then in order of arrival.
  std::sort(standbys.begin(), standbys.end(), [](const Worker* a, const Worker* b) {
    if (a->has_state != b->has_state) return a->has_state;
    return a->join_order < b->join_order;
  });
  if (target.size() > desired_workers_) target.resize(desired_workers_);
  size_t next = 0;
  while (target.size() < desired_workers_ && next < standbys.size()) {
    target.push_back(standbys[next++]->session);
  }
  // Never form a generation without a state holder while one is alive: a draining or surplus
  // holder stays (as the state source) until the others hold the state, i.e. one more step.
  const bool any_holder = std::any_of(target.begin(), target.end(),
                                      [&](uint64_t s) { return workers_.at(s).has_state; });
  if (!any_holder) {
    std::optional<uint64_t> holder;
    for (const auto& m : generation_.members()) {
      auto it = workers_.find(m.session());
      if (it != workers_.end() && it->second.has_state) {
        holder = m.session();
        break;
      }
    }
    if (!holder.has_value()) {
      // Any live holder, a draining one included: losing the state costs a restore.
      const Worker* best = nullptr;
      for (const auto& [session, w] : workers_) {
        if (w.has_state && !IsMember(session) &&
            (best == nullptr || w.join_order < best->join_order)) {
          best = &w;
        }
      }
      if (best != nullptr) holder = best->session;
    }
    if (holder.has_value()) {
      if (target.size() < desired_workers_) {
        target.insert(target.begin(), *holder);
      } else if (!target.empty()) {
        target.back() = *holder;
      }
    }
  }
  return target;
}

void CoordinatorCore::Reconcile(Context& ctx) {
  const bool lost = MemberLost();
  const bool over = stopped_ || finished();
  if (!lost) {
    if (over) return;
    if (StepInFlight()) return;  // decisions take effect at step boundaries
  }
  std::vector<uint64_t> current;
  for (const auto& m : generation_.members()) current.push_back(m.session());
  // Once the run is over nothing is reformed (members leaving after STOP must not trigger a
  // restore); the generation is only dissolved so that pending reports are answered.
  const std::vector<uint64_t> target = over ? std::vector<uint64_t>() : TargetMembers();
  if (!lost && target == current) return;
  if (target.empty()) {
    // Every member is gone and nobody can replace them: the generation can never commit. An
    // empty generation is journaled so that a restarted coordinator does not bring it back
    // (its members would get a heartbeat timeout to show up again) and pending reports are
    // answered. That is also how a run that is over ends: its members leave after STOP, and
    // the first Leave dissolves the generation. That is a clean end, reason "stop", not a
    // failure; only a member that vanished (heartbeat timeout) without leaving makes it one,
    // even after the run is over (e.g. rank 0 died writing the final checkpoint).
    if (lost && generation_.members_size() > 0) {
      CreateGeneration({}, over && !member_timed_out_ ? "stop" : "failure", ctx);
    }
    return;
  }
  std::string reason;
  const bool drained = std::any_of(current.begin(), current.end(), [&](uint64_t s) {
    auto it = workers_.find(s);
    return it != workers_.end() && it->second.draining;
  });
  if (lost) {
    reason = "failure";
  } else if (drained) {
    reason = "drain";
  } else if (scale_changed_) {
    reason = "scale";
  } else {
    reason = "join";
  }
  CreateGeneration(target, reason, ctx);
}

void CoordinatorCore::CreateGeneration(const std::vector<uint64_t>& sessions,
                                       const std::string& reason, Context& ctx,
                                       JournalBatch batch) {
  gyre::v1::Generation g;
  g.set_id(generation_.id() + 1);
  for (size_t rank = 0; rank < sessions.size(); ++rank) {
    auto* m = g.add_members();
    m->set_session(sessions[rank]);
    *m->mutable_worker() = workers_.at(sessions[rank]).id;
    m->set_rank(static_cast<uint32_t>(rank));
  }
  *g.mutable_rendezvous() = rendezvous_->ForGeneration(g.id());
  std::optional<uint32_t> source;
  for (size_t rank = 0; rank < sessions.size(); ++rank) {
    if (workers_.at(sessions[rank]).has_state) {
      source = static_cast<uint32_t>(rank);
      break;
    }
  }
  gyre::v1::GenerationRecord record;
  restore_checkpoint_path_.reset();
  if (sessions.empty()) {
    g.set_start_step(committed_);
    record.set_reason(reason);
  } else if (source.has_value()) {
    g.set_start_step(committed_);
    g.set_state_source_rank(*source);
    for (size_t rank = 0; rank < sessions.size(); ++rank) {
      if (!workers_.at(sessions[rank]).has_state) g.add_needs_state(static_cast<uint32_t>(rank));
    }
    record.set_reason(reason);
  } else {
    // Nobody holds the state of step `committed_`: fall back to the latest checkpoint (or the
    // initial state) and redo the steps after it on the same samples.
    const uint64_t restart_step = checkpoints_.empty() ? 0 : checkpoints_.rbegin()->first;
    if (!checkpoints_.empty()) restore_checkpoint_path_ = checkpoints_.rbegin()->second.path();
    g.set_start_step(restart_step);
    g.set_state_source_rank(0);
    for (size_t rank = 0; rank < sessions.size(); ++rank) {
      g.add_needs_state(static_cast<uint32_t>(rank));
    }
    if (restart_step < committed_) {
      batch.erase_steps_from = restart_step;
      committed_ = restart_step;
      committed_by_.erase(committed_by_.lower_bound(restart_step), committed_by_.end());
    }
    for (auto& [session, w] : workers_) w.has_state = false;
    last_restore_generation_ = g.id();
    record.set_reason("restore");
  }
  generation_ = g;
  generation_members_[g.id()] = std::set<uint64_t>(sessions.begin(), sessions.end());
  decisions_.clear();
  reports_.clear();
  scale_changed_ = false;
  member_timed_out_ = false;
  *record.mutable_generation() = g;
  record.set_created_unix_ms(UnixMs(ctx.now));
  batch.generations.push_back(record);
  batch.sync = true;
  ctx.actions.push_back(JournalWrite{std::move(batch)});
  ctx.actions.push_back(GenerationCreated{record});
  // CompleteStep reports of the old generation can never commit now.
  for (const auto& p : pending_completes_) {
    gyre::v1::CompleteStepResponse response;
    response.set_verdict(gyre::v1::COMMIT_VERDICT_ABORT);
    ctx.Send(p.id, std::move(response));
  }
  pending_completes_.clear();
}

int64_t CoordinatorCore::UnixMs(int64_t micros) const {
  return anchor_unix_ms_ + (micros - anchor_micros_) / 1000;
}

CoordinatorCore::Worker* CoordinatorCore::SeenWorker(uint64_t session, RequestId id, Context& ctx) {
  auto it = workers_.find(session);
  if (it == workers_.end()) {
    ctx.Fail(id, absl::NotFoundError(absl::StrFormat("unknown session %016x; register again", session)));
    return nullptr;
  }
  it->second.last_seen_micros = ctx.now;
  it->second.last_seen_unix_ms = UnixMs(ctx.now);
  return &it->second;
}

void CoordinatorCore::ArmNextTimer(Context& ctx) const {
  std::optional<int64_t> earliest;
  for (const auto& [session, w] : workers_) {
    const int64_t deadline = w.last_seen_micros + heartbeat_timeout_micros_;
    if (!earliest.has_value() || deadline < *earliest) earliest = deadline;
  }
  if (earliest.has_value()) ctx.actions.push_back(ArmTimer{std::max(*earliest, ctx.now)});
}

}  // namespace gyre::coordinator
