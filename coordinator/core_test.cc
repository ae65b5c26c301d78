#include "coordinator/core.h"

#include <map>

#include "gtest/gtest.h"

namespace gyre::coordinator {
namespace {

using gyre::v1::StepLease;

class FixedRendezvous : public RendezvousProvider {
 public:
  gyre::v1::Rendezvous ForGeneration(uint64_t id) override {
    gyre::v1::Rendezvous r;
    r.set_store_prefix("test/gen-" + std::to_string(id));
    return r;
  }
};

gyre::v1::RunConfig TestConfig(uint32_t desired = 2) {
  gyre::v1::RunConfig c;
  c.set_name("test");
  c.mutable_data()->set_global_batch(10);
  c.mutable_data()->set_seq_len(16);
  c.mutable_train()->set_max_steps(5);
  c.mutable_optimizer()->set_lr(1.0f);
  c.mutable_schedule()->set_warmup_steps(2);
  c.mutable_cluster()->set_desired_workers(desired);
  c.mutable_cluster()->set_heartbeat_interval_ms(100);
  c.mutable_cluster()->set_heartbeat_timeout_ms(1000);
  c.mutable_checkpoint()->set_keep_last(2);
  return c;
}

// Drives a core the way a host does: journal writes applied in order, replies collected by id.
class Harness {
 public:
  explicit Harness(gyre::v1::RunConfig config) {
    CoreOptions options;
    options.config = std::move(config);
    options.rendezvous = &rendezvous_;
    std::vector<Action> initial;
    auto core = CoordinatorCore::Create(options, &initial);
    EXPECT_TRUE(core.ok()) << core.status();
    core_ = std::move(*core);
    Apply(initial);
  }

  void Restart() {
    CoreOptions options;
    options.rendezvous = &rendezvous_;
    std::vector<Action> initial;
    auto core = CoordinatorCore::Restore(options, journal_, now_, &initial);
    ASSERT_TRUE(core.ok()) << core.status();
    core_ = std::move(*core);
    Apply(initial);
  }

  void Send(Event e) { Apply(core_->Handle(e, now_)); }

  uint64_t Register(uint64_t session, uint32_t pid, uint64_t applied = 0, uint32_t replaces_pid = 0) {
    RegisterEvent e;
    e.id = ++next_id_;
    e.request.mutable_worker()->set_host("h");
    e.request.mutable_worker()->set_pid(pid);
    e.request.set_last_applied_step(applied);
    e.request.set_replaces_pid(replaces_pid);
    e.fresh_session = session;
    Send(e);
    return std::get<gyre::v1::RegisterResponse>(replies_.at(e.id).body).session();
  }
  // Workers 11 (pid 1) and 22 (pid 2) register and both lease step 0; returns their generation.
  uint64_t TwoMembersLeaseStepZero() {
    Register(11, 1);
    Register(22, 2);
    const uint64_t g = core_->generation().id();
    Acquire(11, g, 0);
    Acquire(22, g, 0);
    return g;
  }
  StepLease Acquire(uint64_t session, uint64_t generation, uint64_t step) {
    AcquireStepEvent e;
    e.id = ++next_id_;
    e.request.set_session(session);
    e.request.set_generation(generation);
    e.request.set_step(step);
    Send(e);
    EXPECT_TRUE(replies_.at(e.id).status.ok()) << replies_.at(e.id).status;
    return std::get<StepLease>(replies_.at(e.id).body);
  }
  RequestId Complete(uint64_t session, uint64_t generation, uint64_t step) {
    CompleteStepEvent e;
    e.id = ++next_id_;
    e.request.set_session(session);
    e.request.set_generation(generation);
    e.request.set_step(step);
    e.request.mutable_metrics()->set_loss(0.5);
    e.request.mutable_metrics()->set_tokens(80);
    Send(e);
    return e.id;
  }
  // A ReportCheckpoint of `step` written at `path` (default checkpoints/step-<step>); a non-empty
  // `error` reports a failed write.
  RequestId ReportCheckpoint(uint64_t session, uint64_t step, const std::string& path = "",
                             const std::string& error = "") {
    ReportCheckpointEvent e;
    e.id = ++next_id_;
    e.request.set_session(session);
    e.request.set_step(step);
    e.request.set_path(path.empty() ? "checkpoints/step-" + std::to_string(step) : path);
    e.request.set_error(error);
    Send(e);
    return e.id;
  }
  absl::Status Control(ControlRequest r) {
    ControlEvent e;
    e.id = ++next_id_;
    e.request = std::move(r);
    Send(e);
    return replies_.at(e.id).status;
  }
  std::optional<gyre::v1::CommitVerdict> Verdict(RequestId id) {
    auto it = replies_.find(id);
    if (it == replies_.end()) return std::nullopt;
    return std::get<gyre::v1::CompleteStepResponse>(it->second.body).verdict();
  }

  void Apply(const std::vector<Action>& actions) {
    for (const auto& a : actions) {
      if (auto* w = std::get_if<JournalWrite>(&a)) {
        ApplyBatch(w->batch, &journal_);
        log_.push_back("journal");
      } else if (auto* r = std::get_if<Reply>(&a)) {
        replies_[r->id] = *r;
        log_.push_back("reply " + std::to_string(r->id));
      } else if (auto* g = std::get_if<GenerationCreated>(&a)) {
        generations_.push_back(g->record);
      } else if (auto* d = std::get_if<DeleteCheckpoint>(&a)) {
        deleted_.push_back(d->step);
      }
    }
  }

  FixedRendezvous rendezvous_;
  std::unique_ptr<CoordinatorCore> core_;
  JournalContents journal_;
  std::map<RequestId, Reply> replies_;
  std::vector<std::string> log_;
  std::vector<gyre::v1::GenerationRecord> generations_;
  std::vector<uint64_t> deleted_;
  int64_t now_ = 0;
  RequestId next_id_ = 0;
};

TEST(ScheduleTest, WarmupThenCosineToFinalFraction) {
  gyre::v1::RunConfig c;
  c.mutable_optimizer()->set_lr(2.0f);
  c.mutable_schedule()->set_warmup_steps(4);
  c.mutable_schedule()->set_total_steps(14);
  c.mutable_schedule()->set_final_lr_fraction(0.25f);
  EXPECT_DOUBLE_EQ(LearningRateAt(c, 0), 0.5);
  EXPECT_DOUBLE_EQ(LearningRateAt(c, 3), 2.0);
  EXPECT_DOUBLE_EQ(LearningRateAt(c, 4), 2.0);                              // cosine starts at peak
  EXPECT_NEAR(LearningRateAt(c, 9), 2.0 * (0.25 + 0.75 * 0.5), 1e-12);     // halfway
  EXPECT_NEAR(LearningRateAt(c, 14), 0.5, 1e-12);
  EXPECT_NEAR(LearningRateAt(c, 100), 0.5, 1e-12);  // flat after total_steps
}

TEST(RankSliceTest, ContiguousWithRemaindersOnFirstRanks) {
  // 10 over 4: 3,3,2,2.
  EXPECT_EQ(RankSlice(10, 4, 0), (std::pair<uint64_t, uint64_t>{0, 3}));
  EXPECT_EQ(RankSlice(10, 4, 1), (std::pair<uint64_t, uint64_t>{3, 6}));
  EXPECT_EQ(RankSlice(10, 4, 2), (std::pair<uint64_t, uint64_t>{6, 8}));
  EXPECT_EQ(RankSlice(10, 4, 3), (std::pair<uint64_t, uint64_t>{8, 10}));
  for (uint32_t w = 1; w < 9; ++w) {
    uint64_t next = 0;
    for (uint32_t r = 0; r < w; ++r) {
      auto [b, e] = RankSlice(7, w, r);
      EXPECT_EQ(b, next);
      next = e;
    }
    EXPECT_EQ(next, 7u);
  }
}

TEST(ValidateTest, NamesTheField) {
  gyre::v1::RunConfig c = TestConfig();
  c.mutable_data()->set_global_batch(0);
  EXPECT_NE(ValidateCoordinatorConfig(c).message().find("data.global_batch"), std::string::npos);
  c = TestConfig();
  c.mutable_cluster()->set_min_workers(3);
  EXPECT_NE(ValidateCoordinatorConfig(c).message().find("cluster.min_workers"), std::string::npos);
}

TEST(CoreTest, SameLeaseForEveryMemberAndCommitAfterJournal) {
  Harness h(TestConfig());
  h.Register(11, 1);
  EXPECT_EQ(h.core_->generation().id(), 1u);  // one worker is a generation already
  h.Register(22, 2);
  // The second one joins at the first step boundary (nothing in flight): generation 2.
  ASSERT_EQ(h.core_->generation().id(), 2u);
  ASSERT_EQ(h.core_->generation().members_size(), 2);
  StepLease a = h.Acquire(11, 2, 0);
  StepLease b = h.Acquire(22, 2, 0);
  ASSERT_EQ(a.decision(), gyre::v1::STEP_DECISION_RUN);
  ASSERT_EQ(b.decision(), gyre::v1::STEP_DECISION_RUN);
  EXPECT_EQ(a.samples().begin(), 0u);
  EXPECT_EQ(a.samples().end(), 10u);
  EXPECT_EQ(a.samples().rank_begin(), 0u);
  EXPECT_EQ(a.samples().rank_end(), 5u);
  EXPECT_EQ(b.samples().rank_begin(), 5u);
  EXPECT_EQ(b.samples().rank_end(), 10u);
  EXPECT_EQ(a.schedule().global_tokens(), 160u);
  EXPECT_DOUBLE_EQ(a.schedule().lr(), b.schedule().lr());

  RequestId first = h.Complete(11, 2, 0);
  EXPECT_FALSE(h.Verdict(first).has_value());  // waits for every member
  const size_t log_before = h.log_.size();
  RequestId second = h.Complete(22, 2, 0);
  EXPECT_EQ(h.Verdict(first), gyre::v1::COMMIT_VERDICT_COMMIT);
  EXPECT_EQ(h.Verdict(second), gyre::v1::COMMIT_VERDICT_COMMIT);
  ASSERT_GT(h.log_.size(), log_before);
  EXPECT_EQ(h.log_[log_before], "journal");  // the commit is journaled before any reply
  ASSERT_EQ(h.journal_.steps.size(), 1u);
  EXPECT_EQ(h.journal_.steps[0].sample_end(), 10u);
  EXPECT_DOUBLE_EQ(h.journal_.steps[0].metrics().loss(), 1.0);

  // A retry (lost reply) is answered from the ledger.
  EXPECT_EQ(h.Verdict(h.Complete(22, 2, 0)), gyre::v1::COMMIT_VERDICT_COMMIT);
  // A report of the same step from another generation is not.
  EXPECT_EQ(h.Verdict(h.Complete(22, 1, 0)), gyre::v1::COMMIT_VERDICT_ABORT);
}

// In-run evaluation rides on a step's metrics: journaled with the step, shown in status, and a
// source whose held-out loss stays above its minimum by more than saturation_delta for
// saturation_patience evaluations raises the saturation alarm (and a new minimum clears it).
TEST(CoreTest, EvalIsJournaledAndSaturationRaisesAnAlarm) {
  gyre::v1::RunConfig config = TestConfig(1);
  config.mutable_train()->set_max_steps(6);
  config.mutable_train()->set_saturation_delta(0.02);
  config.mutable_train()->set_saturation_patience(3);
  Harness h(config);
  h.Register(11, 1);
  const double losses[] = {3.0, 2.9, 2.95, 2.95, 2.95, 2.5};
  bool alarm_before_last = false;
  for (uint64_t step = 0; step < 6; ++step) {
    h.Acquire(11, 1, step);
    CompleteStepEvent e;
    e.id = ++h.next_id_;
    e.request.set_session(11);
    e.request.set_generation(1);
    e.request.set_step(step);
    e.request.mutable_metrics()->set_tokens(160);
    gyre::v1::EvalResult* eval = e.request.mutable_metrics()->mutable_eval();
    eval->set_step(step);
    gyre::v1::SourceLoss* source = eval->add_sources();
    source->set_source("wiki-val");
    source->set_loss(losses[step]);
    h.Send(e);
    ASSERT_EQ(h.Verdict(e.id), gyre::v1::COMMIT_VERDICT_COMMIT);
    ASSERT_TRUE(h.Control(gyre::v1::GetStatusRequest()).ok());
    const auto& status = std::get<gyre::v1::RunStatus>(h.replies_.at(h.next_id_).body);
    EXPECT_EQ(status.last_eval().step(), step);
    // Above the minimum 2.9 (+0.02) at steps 2, 3, 4: the alarm from the third one on.
    EXPECT_EQ(status.alarms_size(), step == 4 ? 1 : 0) << "step " << step;
    if (step == 4 && status.alarms_size() == 1) {
      alarm_before_last = true;
      EXPECT_NE(status.alarms(0).find("wiki-val"), std::string::npos) << status.alarms(0);
      EXPECT_NE(status.alarms(0).find("2.9000 (step 1)"), std::string::npos) << status.alarms(0);
    }
  }
  EXPECT_TRUE(alarm_before_last);
  ASSERT_EQ(h.journal_.steps.size(), 6u);
  EXPECT_DOUBLE_EQ(h.journal_.steps[3].metrics().eval().sources(0).loss(), 2.95);
}

TEST(CoreTest, FailureAbortsAndRedoesStepInNextGeneration) {
  Harness h(TestConfig());
  const uint64_t g = h.TwoMembersLeaseStepZero();
  RequestId pending = h.Complete(11, g, 0);
  // Worker 22 goes silent; 11 heartbeats.
  h.now_ = 600'000;
  gyre::v1::HeartbeatRequest hb;
  hb.set_session(11);
  h.Send(HeartbeatEvent{++h.next_id_, hb});
  h.now_ = 1'100'000;
  h.Send(TickEvent{});
  EXPECT_EQ(h.Verdict(pending), gyre::v1::COMMIT_VERDICT_ABORT);
  EXPECT_EQ(h.core_->generation().id(), g + 1);
  EXPECT_EQ(h.generations_.back().reason(), "failure");
  EXPECT_EQ(h.core_->committed_steps(), 0u);
  StepLease r = h.Acquire(11, g, 0);
  EXPECT_EQ(r.decision(), gyre::v1::STEP_DECISION_RECONFIGURE);
  StepLease run = h.Acquire(11, g + 1, 0);
  EXPECT_EQ(run.decision(), gyre::v1::STEP_DECISION_RUN);
  EXPECT_EQ(run.samples().rank_begin(), 0u);
  EXPECT_EQ(run.samples().rank_end(), 10u);  // same samples, one rank
}

// A replacement that names the exited process ends that member's generation at once (no
// heartbeat timeout), and the survivor trains on alone while the replacement builds its replica;
// the replacement joins at the first step boundary after it asked for a lease.
TEST(CoreTest, AReplacementEndsTheExitedMembersGenerationAndJoinsOnceReady) {
  Harness h(TestConfig());
  h.Register(11, 1);
  h.Register(22, 2);
  const uint64_t g = h.core_->generation().id();
  ASSERT_EQ(h.core_->generation().members_size(), 2);
  h.Acquire(11, g, 0);
  h.Acquire(22, g, 0);
  h.Complete(11, g, 0);
  h.Complete(22, g, 0);
  ASSERT_EQ(h.core_->committed_steps(), 1u);
  h.Acquire(11, g, 1);
  h.Acquire(22, g, 1);
  const RequestId pending = h.Complete(11, g, 1);
  // Worker 22 (pid 2) is killed; its launcher starts pid 3 in its place. No time passes: well
  // inside the 1 s heartbeat timeout.
  h.Register(33, 3, /*applied=*/0, /*replaces_pid=*/2);
  EXPECT_EQ(h.Verdict(pending), gyre::v1::COMMIT_VERDICT_ABORT);
  ASSERT_EQ(h.core_->generation().id(), g + 1);
  EXPECT_EQ(h.generations_.back().reason(), "failure");
  ASSERT_EQ(h.core_->generation().members_size(), 1);  // 33 is still building: not waited for
  EXPECT_EQ(h.core_->generation().members(0).session(), 11u);
  EXPECT_EQ(h.Acquire(11, g, 1).decision(), gyre::v1::STEP_DECISION_RECONFIGURE);
  StepLease run = h.Acquire(11, g + 1, 1);
  ASSERT_EQ(run.decision(), gyre::v1::STEP_DECISION_RUN);
  EXPECT_EQ(run.samples().rank_end() - run.samples().rank_begin(), 10u);  // the whole batch
  // 33 is ready while step 1 is in flight: a standby until the boundary.
  EXPECT_EQ(h.Acquire(33, 0, 0).decision(), gyre::v1::STEP_DECISION_STANDBY);
  EXPECT_EQ(h.core_->generation().id(), g + 1);
  h.Complete(11, g + 1, 1);
  EXPECT_EQ(h.core_->committed_steps(), 2u);
  ASSERT_EQ(h.core_->generation().id(), g + 2);
  EXPECT_EQ(h.generations_.back().reason(), "join");
  ASSERT_EQ(h.core_->generation().members_size(), 2);
  ASSERT_EQ(h.core_->generation().needs_state_size(), 1);  // 33 gets step 2's state from 11
  EXPECT_EQ(h.core_->generation().members(h.core_->generation().needs_state(0)).session(), 33u);
}

// A worker that registers while the members train is listed as starting, and is not waited for;
// a worker on another host with the replaced pid is not declared dead.
TEST(CoreTest, StartingWorkersAreNotWaitedForAndReplacesPidIsPerHost) {
  Harness h(TestConfig(3));
  h.Register(11, 1);
  const uint64_t g = h.core_->generation().id();
  h.Acquire(11, g, 0);  // 11 trains alone (desired 3)
  {
    RegisterEvent e;
    e.id = ++h.next_id_;
    e.request.mutable_worker()->set_host("other");
    e.request.mutable_worker()->set_pid(5);
    e.request.set_replaces_pid(1);  // pid 1 on "other", not 11 (pid 1 on "h")
    e.fresh_session = 22;
    h.Send(e);
  }
  EXPECT_EQ(h.core_->generation().id(), g);
  gyre::v1::ListWorkersRequest list;
  ControlEvent ce;
  ce.id = ++h.next_id_;
  ce.request = list;
  h.Send(ce);
  const auto& workers = std::get<gyre::v1::ListWorkersResponse>(h.replies_.at(ce.id).body).workers();
  ASSERT_EQ(workers.size(), 2);
  for (const auto& w : workers) {
    EXPECT_EQ(w.state(), w.session() == 11 ? gyre::v1::WORKER_STATE_ACTIVE : gyre::v1::WORKER_STATE_STARTING);
  }
  h.Complete(11, g, 0);
  EXPECT_EQ(h.core_->generation().id(), g);  // 22 never asked for a lease: 11 goes on
  EXPECT_EQ(h.Acquire(11, g, 1).decision(), gyre::v1::STEP_DECISION_RUN);
}

TEST(CoreTest, PauseHoldsLeasesAndResumeAfterStopFails) {
  Harness h(TestConfig(1));
  h.Register(11, 1);
  ASSERT_TRUE(h.Control(gyre::v1::PauseRequest()).ok());
  EXPECT_EQ(h.Acquire(11, 1, 0).decision(), gyre::v1::STEP_DECISION_PAUSE);
  ASSERT_TRUE(h.Control(gyre::v1::ResumeRequest()).ok());
  EXPECT_EQ(h.Acquire(11, 1, 0).decision(), gyre::v1::STEP_DECISION_RUN);
  ASSERT_TRUE(h.Control(gyre::v1::StopRequest()).ok());
  EXPECT_EQ(h.Control(gyre::v1::ResumeRequest()).code(), absl::StatusCode::kFailedPrecondition);
  h.Complete(11, 1, 0);  // the leased step still commits
  StepLease stop = h.Acquire(11, 1, 1);
  EXPECT_EQ(stop.decision(), gyre::v1::STEP_DECISION_STOP);
  EXPECT_EQ(stop.checkpoint_dir(), "checkpoints/step-1");  // saved before leaving
}

// The final STOP carries the final checkpoint's directory to every member, including one that
// asks after another member left and dissolved the generation (rank 0 writes the checkpoint).
TEST(CoreTest, TheFinalCheckpointReachesAMemberThatAsksAfterAnotherLeft) {
  gyre::v1::RunConfig config = TestConfig(2);
  config.mutable_train()->set_max_steps(1);
  config.mutable_schedule()->set_warmup_steps(0);
  Harness h(config);
  const uint64_t g = h.TwoMembersLeaseStepZero();
  h.Complete(11, g, 0);
  h.Complete(22, g, 0);
  ASSERT_EQ(h.core_->committed_steps(), 1u);
  StepLease first = h.Acquire(22, g, 1);
  EXPECT_EQ(first.decision(), gyre::v1::STEP_DECISION_STOP);
  EXPECT_EQ(first.checkpoint_dir(), "checkpoints/step-1");
  LeaveEvent leave;
  leave.id = ++h.next_id_;
  leave.request.set_session(22);
  leave.request.set_reason("stop");
  h.Send(leave);
  ASSERT_EQ(h.core_->generation().members_size(), 0);  // dissolved
  StepLease late = h.Acquire(11, g, 1);
  EXPECT_EQ(late.decision(), gyre::v1::STEP_DECISION_STOP);
  EXPECT_EQ(late.checkpoint_dir(), "checkpoints/step-1");
  // A worker that was never a member gets a plain STOP.
  h.Register(33, 3);
  EXPECT_EQ(h.Acquire(33, 0, 1).checkpoint_dir(), "");
}

// Members leaving a stopped run dissolve its generation: a clean end, journaled as "stop".
TEST(CoreTest, MembersLeavingAfterStopEndTheRunAsStopNotFailure) {
  Harness h(TestConfig(2));
  const uint64_t g = h.TwoMembersLeaseStepZero();
  h.Complete(11, g, 0);
  h.Complete(22, g, 0);
  ASSERT_TRUE(h.Control(gyre::v1::StopRequest()).ok());
  ASSERT_EQ(h.Acquire(11, g, 1).decision(), gyre::v1::STEP_DECISION_STOP);
  ASSERT_EQ(h.Acquire(22, g, 1).decision(), gyre::v1::STEP_DECISION_STOP);
  const size_t generations_before = h.generations_.size();
  for (uint64_t session : {22, 11}) {
    gyre::v1::LeaveRequest leave;
    leave.set_session(session);
    leave.set_reason("stop");
    h.Send(LeaveEvent{++h.next_id_, leave});
  }
  // One empty generation (so a restarted coordinator does not wait for the members), not two.
  ASSERT_EQ(h.generations_.size(), generations_before + 1);
  EXPECT_EQ(h.generations_.back().reason(), "stop");
  EXPECT_EQ(h.generations_.back().generation().members_size(), 0);
  ASSERT_FALSE(h.journal_.generations.empty());
  EXPECT_EQ(h.journal_.generations.back().reason(), "stop");
  for (const auto& record : h.generations_) EXPECT_NE(record.reason(), "failure");
  EXPECT_EQ(h.core_->Status().state(), gyre::v1::RUN_STATE_STOPPED);
  h.Restart();
  EXPECT_EQ(h.core_->Status().state(), gyre::v1::RUN_STATE_STOPPED);
}

TEST(CoreTest, LeavingAfterMaxStepsIsStopButTimingOutIsFailure) {
  for (const bool leave : {true, false}) {
    SCOPED_TRACE(leave ? "leave" : "time out");
    Harness h(TestConfig(1));  // max_steps 5
    h.Register(11, 1);
    const uint64_t g = h.core_->generation().id();
    for (uint64_t step = 0; step < 5; ++step) {
      ASSERT_EQ(h.Acquire(11, g, step).decision(), gyre::v1::STEP_DECISION_RUN);
      h.Complete(11, g, step);
    }
    ASSERT_TRUE(h.core_->finished());
    ASSERT_EQ(h.Acquire(11, g, 5).decision(), gyre::v1::STEP_DECISION_STOP);
    if (leave) {
      gyre::v1::LeaveRequest request;
      request.set_session(11);
      h.Send(LeaveEvent{++h.next_id_, request});
    } else {
      // Died (e.g. while writing the final checkpoint) without leaving: a real failure.
      h.now_ = 2'000'000;
      h.Send(TickEvent{});
    }
    ASSERT_EQ(h.core_->generation().id(), g + 1);
    EXPECT_EQ(h.generations_.back().generation().members_size(), 0);
    EXPECT_EQ(h.generations_.back().reason(), leave ? "stop" : "failure");
  }
}

// A member that leaves a run that is not over is still lost: "failure".
TEST(CoreTest, LeavingARunningGenerationIsAFailure) {
  Harness h(TestConfig(2));
  h.Register(11, 1);
  h.Register(22, 2);
  const uint64_t g = h.core_->generation().id();
  gyre::v1::LeaveRequest leave;
  leave.set_session(22);
  h.Send(LeaveEvent{++h.next_id_, leave});
  ASSERT_EQ(h.core_->generation().id(), g + 1);
  EXPECT_EQ(h.generations_.back().reason(), "failure");
  EXPECT_EQ(h.generations_.back().generation().members_size(), 1);
}

TEST(CoreTest, ControlErrors) {
  Harness h(TestConfig());
  gyre::v1::ScaleRequest zero;
  EXPECT_EQ(h.Control(zero).code(), absl::StatusCode::kInvalidArgument);
  gyre::v1::DrainRequest drain;
  drain.set_session(99);
  EXPECT_EQ(h.Control(drain).code(), absl::StatusCode::kNotFound);
  AcquireStepEvent e;
  e.id = 1000;
  e.request.set_session(77);
  h.Send(e);
  EXPECT_EQ(h.replies_.at(1000).status.code(), absl::StatusCode::kNotFound);
}

TEST(CoreTest, ScaleDownAtBoundaryMakesStandbyAndNewMemberNeedsState) {
  Harness h(TestConfig(2));
  h.Register(11, 1);
  h.Register(22, 2);
  uint64_t g = h.core_->generation().id();
  h.Acquire(11, g, 0);
  h.Acquire(22, g, 0);
  gyre::v1::ScaleRequest one;
  one.set_target(1);
  ASSERT_TRUE(h.Control(one).ok());
  EXPECT_EQ(h.core_->generation().id(), g);  // step 0 is in flight: wait for the boundary
  h.Complete(11, g, 0);
  h.Complete(22, g, 0);
  EXPECT_EQ(h.core_->committed_steps(), 1u);
  ASSERT_EQ(h.core_->generation().id(), g + 1);
  EXPECT_EQ(h.generations_.back().reason(), "scale");
  EXPECT_EQ(h.Acquire(22, g, 1).decision(), gyre::v1::STEP_DECISION_STANDBY);
  // Scale up again: the standby (which missed nothing yet) comes back; then a fresh worker.
  h.Acquire(11, g + 1, 1);
  h.Complete(11, g + 1, 1);
  gyre::v1::ScaleRequest two;
  two.set_target(2);
  ASSERT_TRUE(h.Control(two).ok());
  const auto& gen = h.core_->generation();
  ASSERT_EQ(gen.members_size(), 2);
  EXPECT_EQ(gen.start_step(), 2u);
  EXPECT_EQ(gen.state_source_rank(), 0u);
  ASSERT_EQ(gen.needs_state_size(), 1);  // 22 lacks step 1
  EXPECT_EQ(gen.needs_state(0), 1u);
}

TEST(CoreTest, RestartResumesAndAnswersRetriedCommitFromJournal) {
  Harness h(TestConfig(2));
  h.Register(11, 1);
  h.Register(22, 2);
  uint64_t g = h.core_->generation().id();
  h.Acquire(11, g, 0);
  h.Acquire(22, g, 0);
  h.Complete(11, g, 0);
  h.Complete(22, g, 0);
  h.Acquire(11, g, 1);
  h.Acquire(22, g, 1);
  h.Complete(11, g, 1);  // lost with the coordinator
  h.Restart();
  EXPECT_EQ(h.core_->committed_steps(), 1u);
  EXPECT_EQ(h.core_->generation().id(), g);
  EXPECT_EQ(h.Verdict(h.Complete(22, g, 0)), gyre::v1::COMMIT_VERDICT_COMMIT);
  RequestId a = h.Complete(11, g, 1);
  RequestId b = h.Complete(22, g, 1);
  EXPECT_EQ(h.Verdict(a), gyre::v1::COMMIT_VERDICT_COMMIT);
  EXPECT_EQ(h.Verdict(b), gyre::v1::COMMIT_VERDICT_COMMIT);
  EXPECT_EQ(h.core_->committed_steps(), 2u);
}

TEST(CoreTest, CheckpointDecisionAndKeepLast) {
  gyre::v1::RunConfig config = TestConfig(1);
  config.mutable_train()->set_max_steps(20);
  config.mutable_checkpoint()->set_every_steps(2);
  Harness h(config);
  h.Register(11, 1);
  for (uint64_t t = 0; t < 8; ++t) {
    StepLease lease = h.Acquire(11, 1, t);
    const bool due = t > 0 && t % 2 == 0;
    EXPECT_EQ(lease.decision(), due ? gyre::v1::STEP_DECISION_CHECKPOINT
                                    : gyre::v1::STEP_DECISION_RUN)
        << t;
    if (due) h.ReportCheckpoint(11, t, lease.checkpoint_dir());
    h.Complete(11, 1, t);
  }
  ASSERT_EQ(h.journal_.checkpoints.size(), 2u);  // keep_last = 2 of steps 2, 4, 6
  EXPECT_EQ(h.journal_.checkpoints[0].step(), 4u);
  EXPECT_EQ(h.deleted_, std::vector<uint64_t>{2});
}

TEST(CoreTest, LosingEveryStateHolderRestoresFromCheckpoint) {
  gyre::v1::RunConfig config = TestConfig(1);
  config.mutable_train()->set_max_steps(20);
  Harness h(config);
  h.Register(11, 1);
  for (uint64_t t = 0; t < 3; ++t) {
    h.Acquire(11, 1, t);
    h.Complete(11, 1, t);
  }
  h.ReportCheckpoint(11, 2);
  h.Register(33, 3);  // a standby without state
  h.Send(LeaveEvent{++h.next_id_, [] {
                      gyre::v1::LeaveRequest l;
                      l.set_session(11);
                      return l;
                    }()});
  EXPECT_EQ(h.generations_.back().reason(), "restore");
  EXPECT_EQ(h.core_->committed_steps(), 2u);
  EXPECT_EQ(h.journal_.steps.size(), 2u);
  StepLease lease = h.Acquire(33, 1, 0);
  EXPECT_EQ(lease.decision(), gyre::v1::STEP_DECISION_RECONFIGURE);
  EXPECT_EQ(lease.step(), 2u);
  EXPECT_EQ(lease.checkpoint_dir(), "checkpoints/step-2");
}

}  // namespace
}  // namespace gyre::coordinator

namespace gyre::coordinator {
namespace {

// A restore names the newest checkpoint; the worker finds it corrupt and reports it: the core
// marks it bad in the journal and moves to the previous one, then (that one torn too) to step 0.
// A restarted core never offers a checkpoint marked bad.
TEST(CoreTest, BadCheckpointFallsBackToThePreviousOneThenToStepZero) {
  gyre::v1::RunConfig config = TestConfig(1);
  config.mutable_train()->set_max_steps(20);
  config.mutable_checkpoint()->set_keep_last(3);
  Harness h(config);
  h.Register(11, 1);
  for (uint64_t t = 0; t < 5; ++t) {
    h.Acquire(11, 1, t);
    if (t == 2 || t == 4) h.ReportCheckpoint(11, t);
    h.Complete(11, 1, t);
  }
  h.Register(33, 3);  // no state
  h.Send(LeaveEvent{++h.next_id_, [] {
                      gyre::v1::LeaveRequest l;
                      l.set_session(11);
                      return l;
                    }()});
  uint64_t g = h.core_->generation().id();
  StepLease lease = h.Acquire(33, 0, 0);
  ASSERT_EQ(lease.decision(), gyre::v1::STEP_DECISION_RECONFIGURE);
  EXPECT_EQ(lease.checkpoint_dir(), "checkpoints/step-4");
  EXPECT_EQ(h.core_->committed_steps(), 4u);

  auto report_bad = [&](uint64_t generation, uint64_t step, const std::string& error) {
    gyre::v1::ReportBadCheckpointRequest r;
    r.set_session(33);
    r.set_generation(generation);
    r.set_step(step);
    r.set_path("checkpoints/step-" + std::to_string(step));
    r.set_error(error);
    ReportBadCheckpointEvent e{++h.next_id_, r};
    h.Send(e);
    EXPECT_TRUE(h.replies_.at(e.id).status.ok());
  };
  report_bad(g, 4, "checkpoint file step-4/state-0.bin fails its checksum");
  EXPECT_EQ(h.generations_.back().reason(), "restore");
  EXPECT_EQ(h.core_->generation().id(), g + 1);
  EXPECT_EQ(h.core_->committed_steps(), 2u);  // steps 2, 3 erased: they are redone
  EXPECT_EQ(h.journal_.steps.size(), 2u);
  ASSERT_EQ(h.journal_.checkpoints.size(), 2u);
  EXPECT_EQ(h.journal_.checkpoints[1].step(), 4u);
  EXPECT_EQ(h.journal_.checkpoints[1].invalid_reason(), "checkpoint file step-4/state-0.bin fails its checksum");
  lease = h.Acquire(33, g, 4);
  ASSERT_EQ(lease.decision(), gyre::v1::STEP_DECISION_RECONFIGURE);
  EXPECT_EQ(lease.step(), 2u);
  EXPECT_EQ(lease.checkpoint_dir(), "checkpoints/step-2");

  // A second report of the same checkpoint (another member) changes nothing.
  report_bad(g, 4, "again");
  EXPECT_EQ(h.core_->generation().id(), g + 1);

  // A coordinator restart keeps the mark.
  h.Restart();
  EXPECT_EQ(h.core_->Status().last_checkpoint_step(), 2u);
  lease = h.Acquire(33, g, 4);
  EXPECT_EQ(lease.checkpoint_dir(), "checkpoints/step-2");

  report_bad(g + 1, 2, "checkpoint file step-2/state-0.bin: not found");
  EXPECT_EQ(h.core_->generation().id(), g + 2);
  EXPECT_EQ(h.core_->committed_steps(), 0u);
  lease = h.Acquire(33, g + 1, 2);
  ASSERT_EQ(lease.decision(), gyre::v1::STEP_DECISION_RECONFIGURE);
  EXPECT_EQ(lease.step(), 0u);
  EXPECT_EQ(lease.checkpoint_dir(), "");
  EXPECT_EQ(h.core_->Status().last_checkpoint(), "");  // no valid checkpoint is left
  // Redoing step 0 from the initial state works, and a checkpoint at step 2 is written again.
  lease = h.Acquire(33, g + 2, 0);
  EXPECT_EQ(lease.decision(), gyre::v1::STEP_DECISION_RUN);
}

}  // namespace
}  // namespace gyre::coordinator

namespace gyre::coordinator {
namespace {

// A late bad-checkpoint report about an earlier write of the same step (from a generation not
// newer than the checkpoint's record) must not condemn the files written since.
TEST(CoreTest, StaleBadCheckpointReportIsIgnored) {
  gyre::v1::RunConfig config = TestConfig(1);
  config.mutable_train()->set_max_steps(20);
  Harness h(config);
  h.Register(11, 1);
  for (uint64_t t = 0; t < 3; ++t) {
    h.Acquire(11, 1, t);
    h.Complete(11, 1, t);
  }
  h.ReportCheckpoint(11, 2);
  ASSERT_EQ(h.journal_.checkpoints.size(), 1u);
  EXPECT_EQ(h.journal_.checkpoints[0].recorded_generation(), 1u);
  gyre::v1::ReportBadCheckpointRequest bad;
  bad.set_session(11);
  bad.set_generation(1);  // not newer than the record
  bad.set_step(2);
  bad.set_path("checkpoints/step-2");
  h.Send(ReportBadCheckpointEvent{++h.next_id_, bad});
  EXPECT_EQ(h.journal_.checkpoints[0].invalid_reason(), "");
  EXPECT_EQ(h.core_->Status().last_checkpoint_step(), 2u);
  EXPECT_EQ(h.core_->generation().id(), 1u);
}

}  // namespace
}  // namespace gyre::coordinator

namespace gyre::coordinator {
namespace {

// A failed checkpoint write (ReportCheckpointRequest.error) is counted and shown, never recorded:
// the restore after losing every state holder still names the older checkpoint.
TEST(CoreTest, FailedCheckpointWriteIsCountedButNeverRestored) {
  gyre::v1::RunConfig config = TestConfig(1);
  config.mutable_train()->set_max_steps(20);
  Harness h(config);
  h.Register(11, 1);
  auto report = [&](uint64_t step, const std::string& error) {
    const RequestId id = h.ReportCheckpoint(11, step, "", error);
    EXPECT_TRUE(h.replies_.at(id).status.ok()) << h.replies_.at(id).status;
  };
  for (uint64_t t = 0; t < 7; ++t) {
    h.Acquire(11, 1, t);
    h.Complete(11, 1, t);
  }
  EXPECT_EQ(h.core_->Status().checkpoint_failures(), 0u);
  EXPECT_EQ(h.core_->Status().last_checkpoint_error(), "");
  report(2, "");  // a plain report works as before
  ASSERT_EQ(h.journal_.checkpoints.size(), 1u);
  EXPECT_EQ(h.core_->Status().last_checkpoint_step(), 2u);

  const std::string enospc = "write /run/checkpoints/step-4/state-3.bin: No space left on device";
  report(4, enospc);
  gyre::v1::RunStatus status = h.core_->Status();
  EXPECT_EQ(status.checkpoint_failures(), 1u);
  EXPECT_EQ(status.last_checkpoint_error(), "step 4: " + enospc);
  EXPECT_EQ(status.last_checkpoint(), "checkpoints/step-2");
  EXPECT_EQ(status.last_checkpoint_step(), 2u);
  EXPECT_EQ(h.journal_.checkpoints.size(), 1u);  // nothing journaled for the failure
  EXPECT_TRUE(h.deleted_.empty());

  report(4, enospc);  // the client's retry of the same report
  EXPECT_EQ(h.core_->Status().checkpoint_failures(), 1u);
  report(6, "rename /run/checkpoints/step-6.tmp: Input/output error");
  status = h.core_->Status();
  EXPECT_EQ(status.checkpoint_failures(), 2u);
  EXPECT_EQ(status.last_checkpoint_error(), "step 6: rename /run/checkpoints/step-6.tmp: Input/output error");
  EXPECT_EQ(status.last_checkpoint_step(), 2u);

  // Every state holder lost: the restore names step 2, not a failed write.
  h.Register(33, 3);
  h.Send(LeaveEvent{++h.next_id_, [] {
                      gyre::v1::LeaveRequest l;
                      l.set_session(11);
                      return l;
                    }()});
  EXPECT_EQ(h.generations_.back().reason(), "restore");
  EXPECT_EQ(h.core_->committed_steps(), 2u);
  StepLease lease = h.Acquire(33, 1, 0);
  ASSERT_EQ(lease.decision(), gyre::v1::STEP_DECISION_RECONFIGURE);
  EXPECT_EQ(lease.step(), 2u);
  EXPECT_EQ(lease.checkpoint_dir(), "checkpoints/step-2");

  // Not journaled (core.h says why): a restarted coordinator counts from 0.
  h.Restart();
  EXPECT_EQ(h.core_->Status().checkpoint_failures(), 0u);
  EXPECT_EQ(h.core_->Status().last_checkpoint_step(), 2u);
}

}  // namespace
}  // namespace gyre::coordinator
