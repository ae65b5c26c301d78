#include "tests/sim/simulator.h"

#include <algorithm>
#include <cmath>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <queue>
#include <set>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "coordinator/core.h"
#include "coordinator/journal.h"

namespace gyre::sim {
namespace {

using coordinator::Action;
using coordinator::CoordinatorCore;
using coordinator::Event;
using coordinator::RequestId;
using gyre::v1::StepLease;

constexpr int64_t kMs = 1000;
constexpr int64_t kHeartbeatIntervalMs = 50;
constexpr int64_t kHeartbeatTimeoutMs = 300;
constexpr uint32_t kMaxProcesses = 7;
constexpr uint64_t kMaxEvents = 3'000'000;

// splitmix64: small, fast, and the same on every platform (std distributions are not).
class Rng {
 public:
  explicit Rng(uint64_t seed) : state_(seed) {}
  uint64_t Next() {
    uint64_t z = (state_ += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  }
  double Real() { return static_cast<double>(Next() >> 11) * 0x1.0p-53; }
  uint64_t Below(uint64_t n) { return n == 0 ? 0 : Next() % n; }
  int64_t Range(int64_t lo, int64_t hi) { return lo + static_cast<int64_t>(Below(hi - lo + 1)); }
  bool Chance(double p) { return Real() < p; }
  // Exponential inter-arrival time for `per_s` events per second, in micros.
  int64_t Exponential(double per_s) {
    if (per_s <= 0) return INT64_MAX / 4;
    return static_cast<int64_t>(-std::log(1.0 - Real()) / per_s * 1e6) + 1;
  }

 private:
  uint64_t state_;
};

uint64_t Mix(uint64_t h, uint64_t a, uint64_t b, uint64_t c) {
  Rng r(h ^ (a * 0x9E3779B97F4A7C15ULL) ^ (b << 17) ^ (c * 0xC2B2AE3D27D4EB4FULL));
  return r.Next();
}

const char* DecisionName(gyre::v1::StepDecision d) {
  switch (d) {
    case gyre::v1::STEP_DECISION_RUN: return "RUN";
    case gyre::v1::STEP_DECISION_PAUSE: return "PAUSE";
    case gyre::v1::STEP_DECISION_RECONFIGURE: return "RECONFIGURE";
    case gyre::v1::STEP_DECISION_CHECKPOINT: return "CHECKPOINT";
    case gyre::v1::STEP_DECISION_STOP: return "STOP";
    case gyre::v1::STEP_DECISION_STANDBY: return "STANDBY";
    default: return "UNSPECIFIED";
  }
}

class Rendezvous final : public coordinator::RendezvousProvider {
 public:
  gyre::v1::Rendezvous ForGeneration(uint64_t id) override {
    gyre::v1::Rendezvous r;
    r.set_store_address("sim:0");
    r.set_store_prefix(absl::StrCat("sim/gen-", id, "/"));
    return r;
  }
};

struct Worker {
  enum class Phase { kRegister, kAcquire, kAwaitState, kCompute, kComplete, kStopped };
  int index = 0;
  bool alive = true;
  uint64_t incarnation = 0;  // unique per process: stale timers and replies are dropped
  gyre::v1::WorkerId id;
  uint64_t session = 0;
  Phase phase = Phase::kRegister;
  // The training state: parameters after `applied` steps, summarised by a hash chain.
  uint64_t applied = 0;
  uint64_t hash = 0;
  uint64_t lineage = 0;  // bumped by checkpoint restores; see Checker
  gyre::v1::Generation gen;
  StepLease lease;  // the RUN lease of the step being computed / completed
  RequestId awaiting = 0;
  Event last_request;
  int attempt = 0;
  uint64_t heartbeat_generation = 0;
  int64_t await_since = 0;
  int64_t last_await_poll = 0;
  uint64_t await_token = 0;  // one polling chain per wait
  int64_t partitioned_until = 0;
};

class Simulation {
 public:
  Simulation(const SimOptions& options, std::ostream* log)
      : o_(options), rng_(options.seed * 0x2545F4914F6CDD1DULL + 1), log_(log) {
    config_.set_name("sim");
    config_.set_seed(options.seed);
    config_.mutable_data()->set_global_batch(options.global_batch);
    config_.mutable_data()->set_seq_len(32);
    config_.mutable_optimizer()->set_lr(0.001f);
    config_.mutable_schedule()->set_warmup_steps(options.max_steps / 4);
    config_.mutable_train()->set_max_steps(options.max_steps);
    config_.mutable_checkpoint()->set_every_steps(options.checkpoint_every);
    config_.mutable_checkpoint()->set_keep_last(options.keep_last);
    config_.mutable_cluster()->set_desired_workers(options.desired_workers);
    config_.mutable_cluster()->set_min_workers(options.min_workers);
    config_.mutable_cluster()->set_heartbeat_interval_ms(kHeartbeatIntervalMs);
    config_.mutable_cluster()->set_heartbeat_timeout_ms(kHeartbeatTimeoutMs);
    canonical_.push_back(Mix(options.seed, 0, 0, 0));
    for (uint64_t t = 0; t < options.max_steps; ++t) {
      canonical_.push_back(Mix(canonical_.back(), t, t * options.global_batch,
                               (t + 1) * options.global_batch));
    }
    journal_ = coordinator::NewMemJournal();
  }

  SimResult Run();

 private:
  // ---- event queue ----
  struct Item {
    int64_t time;
    uint64_t seq;
    std::function<void()> fn;
  };
  struct Later {
    bool operator()(const Item& a, const Item& b) const {
      return a.time != b.time ? a.time > b.time : a.seq > b.seq;
    }
  };
  void At(int64_t time, std::function<void()> fn) {
    queue_.push(Item{std::max(time, now_), ++seq_, std::move(fn)});
  }
  void After(int64_t delay, std::function<void()> fn) { At(now_ + delay, std::move(fn)); }

  template <typename... Args>
  void Log(const absl::FormatSpec<Args...>& format, const Args&... args) {
    if (log_ == nullptr && !failed_) {
      // Keep a short tail for failure reports even when quiet.
      recent_.push_back(absl::StrFormat("%9.3f ms  ", now_ / 1000.0) +
                        absl::StrFormat(format, args...));
      if (recent_.size() > 40) recent_.pop_front();
      return;
    }
    if (log_ != nullptr) {
      *log_ << absl::StrFormat("%9.3f ms  ", now_ / 1000.0) << absl::StrFormat(format, args...)
            << "\n";
    }
  }
  void Fail(const std::string& what) {
    if (failed_) return;
    failed_ = true;
    std::string tail;
    for (const auto& line : recent_) absl::StrAppend(&tail, "    ", line, "\n");
    result_.failure = absl::StrFormat("invariant violated at %.3f ms: %s\n  last events:\n%s",
                                      now_ / 1000.0, what, tail);
  }

  // ---- network ----
  int64_t Delay() {
    if (faults_ && rng_.Chance(o_.long_delay)) return rng_.Range(20 * kMs, 400 * kMs);
    return rng_.Range(100, 2 * kMs);
  }
  bool Lost() { return faults_ && rng_.Chance(o_.message_loss); }

  // ---- coordinator ----
  void StartCoordinator();
  void CrashCoordinator(const std::string& why);
  void RestartCoordinator();
  void Deliver(Event event);
  void Execute(std::vector<Action> actions);
  void OnJournalBatch(const coordinator::JournalBatch& batch);

  // ---- workers ----
  Worker& Spawn(const std::string& why);
  void Kill(Worker& w, const std::string& why);
  void Send(Worker& w, Event event, bool awaited);
  void Request(Worker& w, Event event) { Send(w, std::move(event), true); }
  void Register(Worker& w);
  void Acquire(Worker& w, uint64_t step);
  void Complete(Worker& w);
  void Heartbeat(Worker& w);
  void OnReply(Worker& w, const coordinator::Reply& reply);
  void OnLease(Worker& w, const StepLease& lease);
  void OnCommitVerdict(Worker& w, const gyre::v1::CompleteStepResponse& response);
  void PollState(Worker& w);
  void ApplyCommit(Worker& w);
  void ScheduleHeartbeat(Worker& w);
  bool Current(const Worker& w, uint64_t incarnation) const {
    return w.alive && w.incarnation == incarnation;
  }

  // ---- faults and the operator ----
  void ScheduleFaults();
  void OperatorAction();
  absl::Status Control(coordinator::ControlRequest request, gyre::v1::RunStatus* status);
  void Heal();
  void Provision();

  // ---- invariants ----
  void CheckAfterEvent();
  void CheckLease(const Worker& w, const StepLease& lease);
  bool Done() const;
  void FinalChecks();

  SimOptions o_;
  Rng rng_;
  std::ostream* log_;
  std::deque<std::string> recent_;
  gyre::v1::RunConfig config_;
  std::priority_queue<Item, std::vector<Item>, Later> queue_;
  uint64_t seq_ = 0;
  int64_t now_ = 0;
  bool faults_ = true;
  bool failed_ = false;
  SimResult result_;

  Rendezvous rendezvous_;
  std::unique_ptr<CoordinatorCore> core_;
  uint64_t coordinator_incarnation_ = 0;
  std::unique_ptr<coordinator::Journal> journal_;
  int64_t tick_at_ = INT64_MAX;
  RequestId next_request_ = 0;
  // Where replies go: request id -> worker index (absent: the operator).
  std::map<RequestId, int> routes_;
  std::map<RequestId, uint64_t> heartbeat_session_;  // heartbeat id -> session it was sent for

  std::vector<std::unique_ptr<Worker>> workers_;
  uint64_t next_incarnation_ = 0;
  uint32_t next_pid_ = 100;

  // Checker state, all derived from what the journal really holds.
  std::vector<uint64_t> canonical_;          // hash of the parameters after t steps
  uint64_t ledger_ = 0;                      // committed steps in the journal
  std::vector<uint64_t> committed_by_;       // generation of each committed step
  std::set<std::pair<uint64_t, uint64_t>> ever_committed_;  // (generation, step), rollbacks too
  uint64_t journal_generation_ = 0;          // latest journaled generation id
  uint32_t journal_world_ = 0;               // its member count
  uint64_t announced_generation_ = 0;        // latest GenerationCreated id
  std::map<uint64_t, uint64_t> journal_checkpoints_;  // step -> (unused)
  std::map<uint64_t, uint64_t> disk_checkpoints_;     // step -> state hash ("checkpoints/")
  std::set<uint64_t> corrupted_;                      // steps whose checkpoint a restore found corrupt
  uint64_t lineage_ = 0;
  std::optional<uint64_t> pause_horizon_;    // while paused, the ledger may not pass this
  // The fixed RUN/CHECKPOINT decision of (generation, step), as first seen by any member.
  // (With the coordinator incarnation that granted it: leases are not journaled, so after a
  // restart RUN and CHECKPOINT may differ; samples and schedule may not.)
  std::map<std::pair<uint64_t, uint64_t>, std::pair<StepLease, uint64_t>> leases_;
  bool stop_requested_ = false;
  uint64_t reply_incarnation_ = 0;  // coordinator incarnation that sent the reply being handled
};

// ------------------------------------------------------------------------------------------
// Coordinator side

void Simulation::StartCoordinator() {
  coordinator::CoreOptions options;
  options.config = config_;
  options.rendezvous = &rendezvous_;
  options.anchor_micros = 0;
  options.anchor_unix_ms = 1767225600000;
  std::vector<Action> initial;
  auto core = CoordinatorCore::Create(options, &initial);
  if (!core.ok()) {
    Fail(absl::StrCat("CoordinatorCore::Create: ", core.status().ToString()));
    return;
  }
  core_ = std::move(*core);
  Log("coordinator started");
  Execute(std::move(initial));
}

void Simulation::CrashCoordinator(const std::string& why) {
  if (core_ == nullptr) return;
  core_.reset();
  ++coordinator_incarnation_;
  tick_at_ = INT64_MAX;
  ++result_.coordinator_restarts;
  Log("coordinator CRASH (%s)", why);
  After(rng_.Range(5 * kMs, 300 * kMs), [this] { RestartCoordinator(); });
}

void Simulation::RestartCoordinator() {
  if (core_ != nullptr) return;  // already restarted (the liveness phase does it at once)
  auto contents = journal_->Load();
  if (!contents.ok()) {
    Fail(absl::StrCat("journal Load: ", contents.status().ToString()));
    return;
  }
  if (o_.sabotage == SimOptions::Sabotage::kLoseNewestStepOnReload && !contents->steps.empty()) {
    contents->steps.pop_back();
  }
  if (!contents->config.has_value()) {
    // Died before the run's config reached the journal: the host starts the run afresh.
    StartCoordinator();
    return;
  }
  coordinator::CoreOptions options;
  options.rendezvous = &rendezvous_;
  options.anchor_micros = 0;
  options.anchor_unix_ms = 1767225600000;
  std::vector<Action> initial;
  auto core = CoordinatorCore::Restore(options, *contents, now_, &initial);
  if (!core.ok()) {
    Fail(absl::StrCat("CoordinatorCore::Restore: ", core.status().ToString()));
    return;
  }
  core_ = std::move(*core);
  Log("coordinator RESTARTED from journal: committed=%d generation=%d paused=%d",
      core_->committed_steps(), core_->generation().id(), core_->paused());
  if (core_->committed_steps() != ledger_) {
    Fail(absl::StrFormat("restored core has %d committed steps, journal holds %d",
                         core_->committed_steps(), ledger_));
  }
  Execute(std::move(initial));
}

std::string Describe(const Event& event) {
  return std::visit(
      [](const auto& e) -> std::string {
        using T = std::decay_t<decltype(e)>;
        if constexpr (std::is_same_v<T, coordinator::RegisterEvent>) {
          return absl::StrFormat("Register(pid=%d prev=%x applied=%d)", e.request.worker().pid(),
                                 e.request.previous_session(), e.request.last_applied_step());
        } else if constexpr (std::is_same_v<T, coordinator::HeartbeatEvent>) {
          return absl::StrFormat("Heartbeat(s=%x g=%d)", e.request.session(),
                                 e.request.generation());
        } else if constexpr (std::is_same_v<T, coordinator::AcquireStepEvent>) {
          return absl::StrFormat("AcquireStep(s=%x g=%d t=%d)", e.request.session(),
                                 e.request.generation(), e.request.step());
        } else if constexpr (std::is_same_v<T, coordinator::CompleteStepEvent>) {
          return absl::StrFormat("CompleteStep(s=%x g=%d t=%d next=%d)", e.request.session(),
                                 e.request.generation(), e.request.step(),
                                 e.request.want_next_lease());
        } else if constexpr (std::is_same_v<T, coordinator::ReportCheckpointEvent>) {
          return absl::StrFormat("ReportCheckpoint(s=%x t=%d)", e.request.session(),
                                 e.request.step());
        } else if constexpr (std::is_same_v<T, coordinator::LeaveEvent>) {
          return absl::StrFormat("Leave(s=%x)", e.request.session());
        } else if constexpr (std::is_same_v<T, coordinator::ReportBadCheckpointEvent>) {
          return absl::StrFormat("ReportBadCheckpoint(s=%x t=%d)", e.request.session(),
                                 e.request.step());
        } else if constexpr (std::is_same_v<T, coordinator::TickEvent>) {
          return "Tick";
        } else {
          return "Control";
        }
      },
      event);
}

void Simulation::Deliver(Event event) {
  if (core_ == nullptr) return;
  ++result_.events;
  Log("coord <- %s", Describe(event));
  Execute(core_->Handle(event, now_));
}

void Simulation::Execute(std::vector<Action> actions) {
  const uint64_t incarnation = coordinator_incarnation_;
  for (auto& action : actions) {
    if (core_ == nullptr || incarnation != coordinator_incarnation_) return;
    if (auto* write = std::get_if<coordinator::JournalWrite>(&action)) {
      if (faults_ && rng_.Chance(o_.journal_failure)) {
        const bool applied = rng_.Chance(0.5);
        if (applied) {
          (void)journal_->Write(write->batch);
          OnJournalBatch(write->batch);
        }
        CrashCoordinator(applied ? "journal write failed after it reached the disk"
                                 : "journal write failed");
        return;
      }
      absl::Status s = journal_->Write(write->batch);
      if (!s.ok()) {
        Fail(absl::StrCat("MemJournal write: ", s.ToString()));
        return;
      }
      OnJournalBatch(write->batch);
    } else if (auto* reply = std::get_if<coordinator::Reply>(&action)) {
      auto route = routes_.find(reply->id);
      if (route == routes_.end()) continue;  // the operator's, handled by Control()
      const int index = route->second;
      routes_.erase(route);
      Worker& w = *workers_[index];
      if (Lost()) {
        Log("reply %d to w%d LOST", reply->id, index);
        continue;
      }
      const uint64_t inc = w.incarnation;
      At(now_ + Delay(), [this, index, inc, incarnation, r = std::move(*reply)] {
        Worker& target = *workers_[index];
        if (!Current(target, inc)) return;
        if (now_ < target.partitioned_until) {
          Log("reply to w%d LOST (partitioned)", index);
          return;
        }
        ++result_.events;
        reply_incarnation_ = incarnation;
        OnReply(target, r);
      });
    } else if (auto* timer = std::get_if<coordinator::ArmTimer>(&action)) {
      if (timer->at_micros < tick_at_ || tick_at_ < now_) {
        tick_at_ = timer->at_micros;
        const uint64_t ci = coordinator_incarnation_;
        At(timer->at_micros, [this, ci] {
          if (ci != coordinator_incarnation_ || core_ == nullptr) return;
          tick_at_ = INT64_MAX;
          Deliver(coordinator::TickEvent{});
        });
      }
    } else if (auto* created = std::get_if<coordinator::GenerationCreated>(&action)) {
      const auto& g = created->record.generation();
      std::string members;
      for (const auto& m : g.members()) absl::StrAppend(&members, absl::Hex(m.session()), " ");
      std::string needs;
      for (uint32_t r : g.needs_state()) absl::StrAppend(&needs, r, " ");
      Log("GENERATION %d (%s) start=%d members=[%s] source=%d needs_state=[%s]", g.id(),
          created->record.reason(), g.start_step(), members, g.state_source_rank(), needs);
      // "stop" only dissolves a run that is over (its members leaving after STOP); it never
      // names a generation that would go on training.
      if (created->record.reason() == "stop" &&
          (g.members_size() != 0 || !(core_->stopped() || core_->finished()))) {
        Fail(absl::StrFormat("generation %d (stop) with %d members while the run is not over",
                             g.id(), g.members_size()));
      }
      if (g.id() <= announced_generation_) {
        Fail(absl::StrFormat("generation %d announced after %d", g.id(), announced_generation_));
      }
      announced_generation_ = g.id();
      ++result_.generations;
    } else if (auto* deletion = std::get_if<coordinator::DeleteCheckpoint>(&action)) {
      Log("delete checkpoint step %d", deletion->step);
      disk_checkpoints_.erase(deletion->step);
    }
  }
}

// Journal-level invariants: the ledger only grows by one contiguous step at a time, each with the
// range [tB,(t+1)B) and the current generation; generations strictly increase; the only way back
// is a "restore" generation to the latest journaled checkpoint.
void Simulation::OnJournalBatch(const coordinator::JournalBatch& batch) {
  const uint64_t b = o_.global_batch;
  bool restore = false;
  // Checkpoints marked bad: only ones a restore really found corrupt; gone before the batch's
  // restore generation picks the previous one.
  for (const auto& c : batch.checkpoints) {
    if (c.invalid_reason().empty()) continue;
    if (corrupted_.count(c.step()) == 0) {
      Fail(absl::StrFormat("checkpoint of step %d marked bad, but no restore found it corrupt", c.step()));
    }
    journal_checkpoints_.erase(c.step());
    ++result_.bad_checkpoints;
    Log("checkpoint step %d marked bad in the journal", c.step());
  }
  for (const auto& record : batch.generations) {
    const auto& g = record.generation();
    if (g.id() <= journal_generation_) {
      Fail(absl::StrFormat("journaled generation %d after %d", g.id(), journal_generation_));
    }
    journal_generation_ = g.id();
    journal_world_ = static_cast<uint32_t>(g.members_size());
    if (record.reason() == "restore") {
      restore = true;
      const uint64_t expected =
          journal_checkpoints_.empty() ? 0 : journal_checkpoints_.rbegin()->first;
      if (g.start_step() != expected) {
        Fail(absl::StrFormat("restore generation %d starts at %d, latest checkpoint is %d", g.id(),
                             g.start_step(), expected));
      }
      if (g.needs_state_size() != g.members_size()) {
        Fail("restore generation where some rank keeps its state");
      }
      ++lineage_;
      ++result_.restores;
      for (const auto& w : workers_) {
        if (w->alive && w->applied == ledger_ && ledger_ > g.start_step()) {
          Log("note: restore while w%d (session %x, phase %d) holds the state of step %d",
              w->index, w->session, static_cast<int>(w->phase), ledger_);
        }
      }
    } else if (g.start_step() != ledger_) {
      Fail(absl::StrFormat("generation %d starts at %d but %d steps are committed", g.id(),
                           g.start_step(), ledger_));
    }
  }
  if (batch.erase_steps_from.has_value()) {
    if (!restore) Fail("committed steps erased outside a restore");
    Log("LEDGER rolled back from %d to %d (restore)", ledger_, *batch.erase_steps_from);
    ledger_ = std::min(ledger_, *batch.erase_steps_from);
    committed_by_.resize(ledger_);
  }
  for (const auto& step : batch.steps) {
    const uint64_t t = step.step();
    if (t != ledger_) {
      Fail(absl::StrFormat("step %d committed while the ledger holds %d steps (lost or repeated)",
                           t, ledger_));
      return;
    }
    if (step.sample_begin() != t * b || step.sample_end() != (t + 1) * b) {
      Fail(absl::StrFormat("step %d committed with range [%d,%d), expected [%d,%d)", t,
                           step.sample_begin(), step.sample_end(), t * b, (t + 1) * b));
    }
    if (step.generation() != journal_generation_ || step.world_size() != journal_world_) {
      Fail(absl::StrFormat("step %d committed by generation %d (world %d); current is %d (%d)", t,
                           step.generation(), step.world_size(), journal_generation_,
                           journal_world_));
    }
    if (t >= o_.max_steps) Fail(absl::StrFormat("step %d committed beyond max_steps", t));
    ++ledger_;
    committed_by_.push_back(step.generation());
    ever_committed_.insert({step.generation(), t});
    ++result_.committed;
    Log("COMMIT step %d in generation %d (world %d)", t, step.generation(), step.world_size());
  }
  for (const auto& c : batch.checkpoints) {
    if (!c.invalid_reason().empty()) continue;
    auto disk = disk_checkpoints_.find(c.step());
    if (disk == disk_checkpoints_.end() || disk->second != canonical_[c.step()]) {
      Fail(absl::StrFormat("checkpoint of step %d journaled but not complete on disk", c.step()));
    }
    journal_checkpoints_[c.step()] = 0;
  }
  for (uint64_t step : batch.erased_checkpoints) journal_checkpoints_.erase(step);
}

// ------------------------------------------------------------------------------------------
// Workers

Worker& Simulation::Spawn(const std::string& why) {
  auto w = std::make_unique<Worker>();
  w->index = static_cast<int>(workers_.size());
  w->incarnation = ++next_incarnation_;
  w->id.set_host(absl::StrCat("host", w->index % 3));
  w->id.set_device("cpu");
  w->id.set_pid(next_pid_++);
  w->id.set_nonce(rng_.Next());
  w->hash = canonical_[0];  // the seeded initial parameters
  w->lineage = lineage_;
  workers_.push_back(std::move(w));
  Worker& worker = *workers_.back();
  Log("w%d STARTS (%s)", worker.index, why);
  Register(worker);
  ScheduleHeartbeat(worker);
  return worker;
}

void Simulation::Kill(Worker& w, const std::string& why) {
  if (!w.alive) return;
  w.alive = false;
  ++result_.kills;
  Log("w%d KILLED (%s) applied=%d phase=%d", w.index, why, w.applied, static_cast<int>(w.phase));
  // The provisioner replaces most dead workers.
  if (rng_.Chance(0.7)) After(rng_.Range(20 * kMs, 500 * kMs), [this] {
      uint32_t alive = 0;
      for (const auto& x : workers_) alive += x->alive && x->phase != Worker::Phase::kStopped;
      if (alive < kMaxProcesses && !Done()) Spawn("replacement");
    });
}

void Simulation::Send(Worker& w, Event event, bool awaited) {
  const RequestId id = ++next_request_;
  std::visit(
      [&](auto& e) {
        if constexpr (!std::is_same_v<std::decay_t<decltype(e)>, coordinator::TickEvent>) e.id = id;
      },
      event);
  routes_[id] = w.index;
  if (awaited) {
    w.awaiting = id;
    w.last_request = event;
    const uint64_t inc = w.incarnation;
    const int64_t timeout = 60 * kMs * (1LL << std::min(w.attempt, 3)) + rng_.Range(0, 20 * kMs);
    After(timeout, [this, index = w.index, inc, id] {
      Worker& target = *workers_[index];
      if (!Current(target, inc) || target.awaiting != id) return;
      ++target.attempt;
      Log("w%d timeout on request %d; retry %d", index, id, target.attempt);
      if (target.attempt >= 2 && target.phase == Worker::Phase::kAcquire &&
          target.session != 0 && rng_.Chance(0.5)) {
        // The coordinator may have restarted: re-attach to the session (RegisterRequest with
        // previous_session), then carry on.
        Log("w%d re-attaches to session %x", index, target.session);
        Register(target);
        return;
      }
      if (auto* r = std::get_if<coordinator::RegisterEvent>(&target.last_request)) {
        r->fresh_session = rng_.Next() | 1;
      }
      Request(target, target.last_request);
    });
  }
  if (Lost() || now_ < w.partitioned_until) {
    Log("w%d -> %s LOST", w.index, Describe(event));
    return;
  }
  const uint64_t ci = coordinator_incarnation_;
  At(now_ + Delay(), [this, ci, e = std::move(event)] {
    if (ci != coordinator_incarnation_) return;  // the connection died with the coordinator
    Deliver(e);
  });
}

void Simulation::Register(Worker& w) {
  w.phase = Worker::Phase::kRegister;
  w.attempt = 0;
  coordinator::RegisterEvent e;
  *e.request.mutable_worker() = w.id;
  e.request.set_previous_session(w.session);
  e.request.set_last_applied_step(w.applied);
  e.request.set_collective("gloo");
  e.fresh_session = rng_.Next() | 1;
  Request(w, e);
}

void Simulation::Acquire(Worker& w, uint64_t step) {
  if (w.phase != Worker::Phase::kAwaitState) w.phase = Worker::Phase::kAcquire;
  w.attempt = 0;
  coordinator::AcquireStepEvent e;
  e.request.set_session(w.session);
  e.request.set_generation(w.gen.id());
  e.request.set_step(step);
  Request(w, e);
}

void Simulation::Complete(Worker& w) {
  w.phase = Worker::Phase::kComplete;
  w.attempt = 0;
  coordinator::CompleteStepEvent e;
  e.request.set_session(w.session);
  e.request.set_generation(w.gen.id());
  e.request.set_step(w.lease.step());
  e.request.set_want_next_lease(o_.pipeline);
  auto* m = e.request.mutable_metrics();
  m->set_step(w.lease.step());
  m->set_loss(1.0 / (1.0 + w.lease.step()));
  m->set_tokens(w.lease.samples().rank_end() - w.lease.samples().rank_begin());
  Request(w, e);
  if (faults_ && rng_.Chance(o_.kill_after_complete)) Kill(w, "between CompleteStep and COMMIT");
}

void Simulation::Heartbeat(Worker& w) {
  coordinator::HeartbeatEvent e;
  e.request.set_session(w.session);
  e.request.set_generation(w.gen.id());
  e.request.set_step(w.applied);
  heartbeat_session_[next_request_ + 1] = w.session;  // the id Send assigns
  Send(w, e, /*awaited=*/false);
}

void Simulation::ScheduleHeartbeat(Worker& w) {
  const uint64_t inc = w.incarnation;
  After(kHeartbeatIntervalMs * kMs, [this, index = w.index, inc] {
    Worker& target = *workers_[index];
    if (!Current(target, inc) || target.phase == Worker::Phase::kStopped) return;
    if (target.session != 0 && target.phase != Worker::Phase::kRegister) Heartbeat(target);
    ScheduleHeartbeat(target);
  });
}

void Simulation::OnReply(Worker& w, const coordinator::Reply& reply) {
  if (auto* hb = std::get_if<gyre::v1::HeartbeatResponse>(&reply.body)) {
    w.heartbeat_generation = std::max(w.heartbeat_generation, hb->current_generation());
    auto sent = heartbeat_session_.find(reply.id);
    const bool about_current_session = sent != heartbeat_session_.end() &&
                                       sent->second == w.session;
    if (sent != heartbeat_session_.end()) heartbeat_session_.erase(sent);
    if (!hb->known() && about_current_session && w.phase != Worker::Phase::kRegister &&
        w.phase != Worker::Phase::kStopped) {
      Log("w%d: session %x unknown (declared dead); re-registering", w.index, w.session);
      Register(w);
    }
    return;
  }
  if (reply.id != w.awaiting) return;  // a late answer to a request already retried
  w.awaiting = 0;
  w.attempt = 0;
  if (w.phase == Worker::Phase::kStopped) return;
  if (!reply.status.ok()) {
    Log("w%d <- error %s", w.index, reply.status.ToString());
    if (reply.status.code() == absl::StatusCode::kNotFound) {
      Register(w);
    } else if (w.phase == Worker::Phase::kRegister) {
      After(10 * kMs, [this, index = w.index, inc = w.incarnation] {
        Worker& t = *workers_[index];
        if (Current(t, inc) && t.awaiting == 0 && t.phase == Worker::Phase::kRegister) {
          Register(t);
        }
      });
    } else if (std::holds_alternative<coordinator::LeaveEvent>(w.last_request) ||
               std::holds_alternative<coordinator::ReportCheckpointEvent>(w.last_request)) {
      // Nothing to redo.
    } else {
      // A refused CompleteStep is final: drop the gradients and ask for a lease again.
      if (w.phase == Worker::Phase::kComplete) w.phase = Worker::Phase::kAcquire;
      After(20 * kMs, [this, index = w.index, inc = w.incarnation] {
        Worker& t = *workers_[index];
        // Only if nothing else happened meanwhile (a late retry must not abandon a step).
        if (!Current(t, inc) || t.awaiting != 0) return;
        if (t.phase == Worker::Phase::kAcquire) Acquire(t, t.applied);
        if (t.phase == Worker::Phase::kAwaitState) Acquire(t, t.gen.start_step());
      });
    }
    return;
  }
  if (auto* r = std::get_if<gyre::v1::RegisterResponse>(&reply.body)) {
    Log("w%d <- registered session=%x", w.index, r->session());
    w.session = r->session();
    Acquire(w, w.applied);
  } else if (auto* lease = std::get_if<StepLease>(&reply.body)) {
    OnLease(w, *lease);
  } else if (auto* verdict = std::get_if<gyre::v1::CompleteStepResponse>(&reply.body)) {
    OnCommitVerdict(w, *verdict);
  }
}

void Simulation::OnLease(Worker& w, const StepLease& lease) {
  Log("w%d <- %s g=%d t=%d", w.index, DecisionName(lease.decision()), lease.generation().id(),
      lease.step());
  const uint64_t inc = w.incarnation;
  const int index = w.index;
  switch (lease.decision()) {
    case gyre::v1::STEP_DECISION_RUN:
    case gyre::v1::STEP_DECISION_CHECKPOINT: {
      if (w.phase == Worker::Phase::kAwaitState) {
        // The state has not arrived over the new communicator; a real worker is blocked in
        // communicator set-up. Keep waiting.
        return;
      }
      CheckLease(w, lease);
      if (failed_) return;
      w.lease = lease;
      w.phase = Worker::Phase::kCompute;
      if (lease.decision() == gyre::v1::STEP_DECISION_CHECKPOINT) {
        uint32_t rank = 0;
        for (const auto& m : w.gen.members()) {
          if (m.session() == w.session) rank = m.rank();
        }
        if (rank == 0) {
          // Written asynchronously; complete (and reported) only if the writer survives.
          const uint64_t step = w.applied;
          const uint64_t hash = w.hash;
          After(rng_.Range(5 * kMs, 80 * kMs), [this, index, inc, step, hash, lease] {
            Worker& t = *workers_[index];
            if (!Current(t, inc)) return;
            disk_checkpoints_[step] = hash;
            corrupted_.erase(step);
            coordinator::ReportCheckpointEvent e;
            e.request.set_session(t.session);
            e.request.set_step(step);
            e.request.set_path(lease.checkpoint_dir());
            e.request.set_manifest_checksum(hash);
            for (int copy = 0; copy < 2; ++copy) Send(t, e, /*awaited=*/false);
          });
        }
      }
      After(rng_.Range(2 * kMs, 12 * kMs), [this, index, inc, step = lease.step()] {
        Worker& t = *workers_[index];
        if (!Current(t, inc) || t.phase != Worker::Phase::kCompute || t.lease.step() != step) {
          return;
        }
        Complete(t);
      });
      return;
    }
    case gyre::v1::STEP_DECISION_PAUSE:
    case gyre::v1::STEP_DECISION_STANDBY: {
      const int64_t wait = std::min<int64_t>(lease.retry_after_ms(), 100) * kMs;
      After(std::max<int64_t>(wait, kMs), [this, index, inc] {
        Worker& t = *workers_[index];
        if (Current(t, inc) && t.awaiting == 0 && t.phase == Worker::Phase::kAcquire) {
          Acquire(t, t.applied);
        }
      });
      return;
    }
    case gyre::v1::STEP_DECISION_RECONFIGURE: {
      const auto& g = lease.generation();
      std::optional<uint32_t> rank;
      for (const auto& m : g.members()) {
        if (m.session() == w.session) rank = m.rank();
      }
      if (!rank.has_value()) {
        Fail(absl::StrFormat("w%d told to RECONFIGURE into generation %d it is not a member of",
                             w.index, g.id()));
        return;
      }
      w.gen = g;
      const bool needs = std::count(g.needs_state().begin(), g.needs_state().end(), *rank) > 0;
      if (needs && g.needs_state_size() == g.members_size()) {
        // Nobody holds the state: restore from the checkpoint (or the initial parameters).
        if (lease.checkpoint_dir().empty()) {
          if (lease.step() != 0) {
            Fail(absl::StrFormat("restore to step %d without a checkpoint", lease.step()));
            return;
          }
          w.applied = 0;
          w.hash = canonical_[0];
        } else {
          if (corrupted_.count(lease.step()) == 0 && disk_checkpoints_.count(lease.step()) != 0 &&
              faults_ && rng_.Chance(o_.corrupt_checkpoint)) {
            Log("checkpoint step %d is corrupt on disk", lease.step());
            corrupted_.insert(lease.step());
            disk_checkpoints_.erase(lease.step());
          }
          if (corrupted_.count(lease.step()) != 0) {
            // Verification fails: report it, then ask again (a lost report means the same lease
            // and another report).
            Log("w%d: checkpoint step %d fails verification; reporting it", w.index, lease.step());
            coordinator::ReportBadCheckpointEvent e;
            e.request.set_session(w.session);
            e.request.set_generation(g.id());
            e.request.set_step(lease.step());
            e.request.set_path(lease.checkpoint_dir());
            e.request.set_error("checksum mismatch (simulated)");
            Send(w, e, /*awaited=*/false);
            // Not in any generation now (as the real worker): ask with generation 0 and the
            // steps really applied, so the answer is a RECONFIGURE, never a RUN on stale state.
            w.gen = gyre::v1::Generation();
            w.phase = Worker::Phase::kAcquire;
            After(20 * kMs, [this, index = w.index, inc = w.incarnation] {
              Worker& t = *workers_[index];
              if (Current(t, inc) && t.awaiting == 0 && t.phase == Worker::Phase::kAcquire) Acquire(t, t.applied);
            });
            return;
          }
          auto disk = disk_checkpoints_.find(lease.step());
          if (disk == disk_checkpoints_.end()) {
            Fail(absl::StrFormat("restore from checkpoint of step %d, which is not on disk",
                                 lease.step()));
            return;
          }
          w.applied = lease.step();
          w.hash = disk->second;
        }
        w.lineage = lineage_;
        Log("w%d restored state of step %d", w.index, w.applied);
        w.phase = Worker::Phase::kAcquire;
        Acquire(w, w.applied);
      } else if (needs) {
        w.phase = Worker::Phase::kAwaitState;
        w.await_since = now_;
        w.last_await_poll = now_;
        ++w.await_token;
        PollState(w);
      } else {
        if (w.applied != g.start_step() || w.hash != canonical_[w.applied]) {
          Fail(absl::StrFormat(
              "w%d keeps its state into generation %d (start %d) but has applied %d steps",
              w.index, g.id(), g.start_step(), w.applied));
          return;
        }
        w.phase = Worker::Phase::kAcquire;
        Acquire(w, w.applied);
      }
      return;
    }
    case gyre::v1::STEP_DECISION_STOP: {
      Log("w%d stops at applied=%d", w.index, w.applied);
      w.phase = Worker::Phase::kStopped;
      uint32_t rank = 1;
      for (const auto& m : w.gen.members()) {
        if (m.session() == w.session) rank = m.rank();
      }
      if (!lease.checkpoint_dir().empty() && rank == 0 && w.gen.id() == lease.generation().id()) {
        if (w.applied != lease.step()) {
          Fail(absl::StrFormat("w%d asked to save step %d at STOP with %d steps applied", w.index,
                               lease.step(), w.applied));
          return;
        }
        // The final checkpoint, written and reported before leaving.
        disk_checkpoints_[w.applied] = w.hash;
        corrupted_.erase(w.applied);
        coordinator::ReportCheckpointEvent report;
        report.request.set_session(w.session);
        report.request.set_step(w.applied);
        report.request.set_path(lease.checkpoint_dir());
        report.request.set_manifest_checksum(w.hash);
        Send(w, report, /*awaited=*/false);
      }
      coordinator::LeaveEvent e;
      e.request.set_session(w.session);
      e.request.set_reason("stop");
      Send(w, e, /*awaited=*/false);
      return;
    }
    default:
      Fail("lease without a decision");
  }
}

// Live hand-over: the new member receives parameters from the state source once that member
// has joined the same generation (in a real worker: a broadcast over the new communicator).
void Simulation::PollState(Worker& w) {
  if (w.phase != Worker::Phase::kAwaitState) return;
  const auto& g = w.gen;
  const uint64_t source_session = g.members(g.state_source_rank()).session();
  for (const auto& other : workers_) {
    if (!other->alive || other->session != source_session || other.get() == &w) continue;
    if (other->gen.id() == g.id() && other->phase != Worker::Phase::kAwaitState &&
        other->applied == g.start_step()) {
      w.applied = other->applied;
      w.hash = other->hash;
      w.lineage = other->lineage;
      Log("w%d received state of step %d from w%d", w.index, w.applied, other->index);
      w.phase = Worker::Phase::kAcquire;
      Acquire(w, w.applied);
      return;
    }
  }
  // Not yet: ask the coordinator now and then (it may have moved on, or the run may be over).
  if ((w.heartbeat_generation > g.id() || now_ - w.last_await_poll > 500 * kMs) &&
      w.awaiting == 0) {
    w.last_await_poll = now_;
    Acquire(w, g.start_step());
  }
  After(5 * kMs, [this, index = w.index, inc = w.incarnation, token = w.await_token] {
    Worker& t = *workers_[index];
    if (Current(t, inc) && t.await_token == token) PollState(t);
  });
}

void Simulation::OnCommitVerdict(Worker& w, const gyre::v1::CompleteStepResponse& response) {
  if (w.phase != Worker::Phase::kComplete) return;
  if (response.verdict() == gyre::v1::COMMIT_VERDICT_COMMIT) {
    ApplyCommit(w);
    if (failed_) return;
    if (response.has_next_lease()) {
      w.phase = Worker::Phase::kAcquire;
      OnLease(w, response.next_lease());
    } else {
      Acquire(w, w.applied);
    }
  } else {
    ++result_.aborts;
    Log("w%d <- ABORT step %d; redo", w.index, w.lease.step());
    if (o_.sabotage == SimOptions::Sabotage::kApplyOnAbort) {
      ApplyCommit(w);
      if (failed_) return;
    }
    Acquire(w, w.applied);
  }
}

// Worker-level invariants: a step is applied only after it is committed, by the generation that
// committed it, exactly once and in order; the result matches the canonical history.
void Simulation::ApplyCommit(Worker& w) {
  const uint64_t t = w.lease.step();
  if (t != w.applied) {
    Fail(absl::StrFormat("w%d COMMIT of step %d but it has applied %d steps", w.index, t,
                         w.applied));
    return;
  }
  // The COMMIT may have been sent before a restore rolled the ledger back (the worker's state
  // then belongs to the abandoned history), so check against every commit ever journaled.
  if (ever_committed_.count({w.gen.id(), t}) == 0) {
    Fail(absl::StrFormat("w%d applies step %d of generation %d, which that generation never "
                         "committed (ledger %d)", w.index, t, w.gen.id(), ledger_));
    return;
  }
  w.hash = Mix(w.hash, t, w.lease.samples().begin(), w.lease.samples().end());
  ++w.applied;
  ++result_.applied_steps;
  if (w.hash != canonical_[w.applied]) {
    Fail(absl::StrFormat("w%d parameters after %d steps differ from the canonical history",
                         w.index, w.applied));
  }
  Log("w%d APPLIES step %d", w.index, t);
}

void Simulation::CheckLease(const Worker& w, const StepLease& lease) {
  const uint64_t t = lease.step();
  const auto& g = lease.generation();
  if (g.id() != w.gen.id()) {
    Fail(absl::StrFormat("w%d got RUN for generation %d while in %d", w.index, g.id(),
                         w.gen.id()));
    return;
  }
  if (t != w.applied) {
    Fail(absl::StrFormat("w%d got RUN for step %d with %d steps applied", w.index, t, w.applied));
    return;
  }
  const uint64_t b = o_.global_batch;
  if (lease.samples().begin() != t * b || lease.samples().end() != (t + 1) * b) {
    Fail(absl::StrFormat("lease of step %d has range [%d,%d)", t, lease.samples().begin(),
                         lease.samples().end()));
    return;
  }
  uint32_t rank = 0;
  for (const auto& m : g.members()) {
    if (m.session() == w.session) rank = m.rank();
  }
  const auto [rb, re] = coordinator::RankSlice(b, static_cast<uint32_t>(g.members_size()), rank);
  if (lease.samples().rank_begin() != t * b + rb || lease.samples().rank_end() != t * b + re) {
    Fail(absl::StrFormat("rank %d of %d got slice [%d,%d) of step %d", rank, g.members_size(),
                         lease.samples().rank_begin(), lease.samples().rank_end(), t));
    return;
  }
  auto [it, inserted] =
      leases_.try_emplace({g.id(), t}, std::make_pair(lease, reply_incarnation_));
  if (!inserted) {
    const StepLease& first = it->second.first;
    const bool same_coordinator = it->second.second == reply_incarnation_;
    if ((same_coordinator && first.decision() != lease.decision()) ||
        first.schedule().lr() != lease.schedule().lr() ||
        first.schedule().global_tokens() != lease.schedule().global_tokens() ||
        (same_coordinator && first.checkpoint_dir() != lease.checkpoint_dir())) {
      Fail(absl::StrFormat("members of generation %d got different decisions for step %d", g.id(),
                           t));
    }
  }
}

// ------------------------------------------------------------------------------------------
// Faults and the operator

void Simulation::ScheduleFaults() {
  auto repeat = [this](double per_s, std::function<void()> fn, auto&& self) -> void {
    const int64_t when = now_ + rng_.Exponential(per_s);
    if (when > o_.fault_phase_micros) return;
    At(when, [this, per_s, fn, self] {
      if (!faults_ || failed_) return;
      fn();
      self(per_s, fn, self);
    });
  };
  repeat(o_.kill_per_s, [this] {
    std::vector<Worker*> alive;
    for (auto& w : workers_) {
      if (w->alive) alive.push_back(w.get());
    }
    if (!alive.empty()) Kill(*alive[rng_.Below(alive.size())], "random kill");
  }, repeat);
  repeat(o_.join_per_s, [this] {
    uint32_t alive = 0;
    for (const auto& w : workers_) alive += w->alive;
    if (alive < kMaxProcesses) Spawn("join");
  }, repeat);
  repeat(o_.coordinator_crash_per_s, [this] { CrashCoordinator("random crash"); }, repeat);
  repeat(o_.partition_per_s, [this] {
    std::vector<Worker*> alive;
    for (auto& w : workers_) {
      if (w->alive) alive.push_back(w.get());
    }
    if (alive.empty()) return;
    Worker& w = *alive[rng_.Below(alive.size())];
    w.partitioned_until = now_ + rng_.Range(50 * kMs, 800 * kMs);
    Log("w%d PARTITIONED until %.3f ms", w.index, w.partitioned_until / 1000.0);
  }, repeat);
  repeat(o_.control_per_s, [this] { OperatorAction(); }, repeat);
}

absl::Status Simulation::Control(coordinator::ControlRequest request,
                                 gyre::v1::RunStatus* status) {
  if (core_ == nullptr) return absl::UnavailableError("coordinator restarting");
  const RequestId id = ++next_request_;
  ++result_.events;
  auto actions = core_->Handle(coordinator::ControlEvent{id, std::move(request)}, now_);
  absl::Status result = absl::UnavailableError("no reply");
  for (const auto& a : actions) {
    if (auto* r = std::get_if<coordinator::Reply>(&a); r != nullptr && r->id == id) {
      result = r->status;
      if (auto* s = std::get_if<gyre::v1::RunStatus>(&r->body); s && status) *status = *s;
    }
  }
  const uint64_t incarnation = coordinator_incarnation_;
  Execute(std::move(actions));
  if (incarnation != coordinator_incarnation_) {
    return absl::UnavailableError("coordinator crashed before answering");
  }
  return result;
}

void Simulation::OperatorAction() {
  if (core_ == nullptr) return;
  const uint64_t choice = rng_.Below(100);
  if (choice < 20) {
    absl::Status s = Control(gyre::v1::PauseRequest(), nullptr);
    Log("operator: Pause -> %s", s.ToString());
  } else if (choice < 40) {
    absl::Status s = Control(gyre::v1::ResumeRequest(), nullptr);
    Log("operator: Resume -> %s", s.ToString());
    if (stop_requested_ && s.code() != absl::StatusCode::kFailedPrecondition &&
        s.code() != absl::StatusCode::kUnavailable) {
      Fail("Resume after Stop was not FAILED_PRECONDITION");
    }
  } else if (choice < 60) {
    const uint32_t target = static_cast<uint32_t>(rng_.Below(6));
    gyre::v1::ScaleRequest scale;
    scale.set_target(target);
    absl::Status s = Control(scale, nullptr);
    Log("operator: Scale(%d) -> %s", target, s.ToString());
    if (target == 0 && s.code() != absl::StatusCode::kInvalidArgument) {
      Fail("Scale(0) was not INVALID_ARGUMENT");
    }
    if (target >= o_.min_workers && !stop_requested_ && !s.ok() &&
        s.code() != absl::StatusCode::kUnavailable && !(core_ && core_->stopped())) {
      Fail(absl::StrCat("Scale(", target, ") failed: ", s.ToString()));
    }
    // The provisioner starts processes to match.
    if (s.ok()) {
      uint32_t alive = 0;
      for (const auto& w : workers_) alive += w->alive && w->phase != Worker::Phase::kStopped;
      for (uint32_t i = alive; i < std::min(target, kMaxProcesses); ++i) Spawn("provisioner");
    }
  } else if (choice < 75) {
    absl::Status s = Control(gyre::v1::CheckpointRequest(), nullptr);
    Log("operator: Checkpoint -> %s", s.ToString());
  } else if (choice < 95) {
    gyre::v1::DrainRequest drain;
    std::vector<Worker*> alive;
    for (auto& w : workers_) {
      if (w->alive && w->session != 0) alive.push_back(w.get());
    }
    const bool bogus = alive.empty() || rng_.Chance(0.3);
    drain.set_session(bogus ? 0xBAD0000000000000ULL + rng_.Below(1000)
                            : alive[rng_.Below(alive.size())]->session);
    absl::Status s = Control(drain, nullptr);
    Log("operator: Drain(%x) -> %s", drain.session(), s.ToString());
    if (bogus && s.code() != absl::StatusCode::kNotFound &&
        s.code() != absl::StatusCode::kUnavailable) Fail("Drain(unknown) was not NOT_FOUND");
  } else if (o_.stop_allowed) {
    absl::Status s = Control(gyre::v1::StopRequest(), nullptr);
    Log("operator: Stop -> %s", s.ToString());
    if (s.ok()) stop_requested_ = true;
  }
}

void Simulation::Heal() {
  faults_ = false;
  Log("---- liveness phase: faults off ----");
  for (auto& w : workers_) w->partitioned_until = 0;
  if (core_ == nullptr) RestartCoordinator();
  if (failed_) return;
  if (!core_->stopped()) (void)Control(gyre::v1::ResumeRequest(), nullptr);
  Provision();
}

// The provisioner of DESIGN.md section 5: keeps as many worker processes as the coordinator
// wants (drained and stopped ones are replaced).
void Simulation::Provision() {
  if (failed_ || Done()) return;
  if (core_ != nullptr && !core_->stopped() && !core_->finished()) {
    gyre::v1::RunStatus status;
    (void)Control(gyre::v1::GetStatusRequest(), &status);
    gyre::v1::ListWorkersResponse list;
    if (core_ != nullptr) {
      for (auto& a : core_->Handle(coordinator::ControlEvent{0, gyre::v1::ListWorkersRequest()},
                                   now_)) {
        if (auto* r = std::get_if<coordinator::Reply>(&a)) {
          if (auto* l = std::get_if<gyre::v1::ListWorkersResponse>(&r->body)) list = *l;
        }
      }
    }
    uint32_t known = 0;  // not draining
    for (const auto& info : list.workers()) {
      known += info.state() != gyre::v1::WORKER_STATE_DRAINING;
    }
    uint32_t alive = 0;
    for (const auto& w : workers_) alive += w->alive && w->phase != Worker::Phase::kStopped;
    const uint32_t want = std::max(status.desired_workers(), o_.min_workers);
    if ((alive < want || known < want) && alive < kMaxProcesses) Spawn("provisioner");
  }
  After(200 * kMs, [this] { Provision(); });
}

// ------------------------------------------------------------------------------------------
// Invariants

void Simulation::CheckAfterEvent() {
  if (failed_) return;
  if (core_ != nullptr && core_->committed_steps() != ledger_) {
    Fail(absl::StrFormat("core reports %d committed steps, journal holds %d",
                         core_->committed_steps(), ledger_));
    return;
  }
  // "Pause really stops commits": from the moment the core is paused, only steps already leased
  // may still commit.
  if (core_ != nullptr) {
    if (!core_->paused()) {
      pause_horizon_.reset();
    } else if (!pause_horizon_.has_value()) {
      pause_horizon_ = core_->commit_horizon();
      Log("paused: commits may reach %d (leased before the pause)", *pause_horizon_);
    }
  }
  if (pause_horizon_.has_value() && ledger_ > *pause_horizon_) {
    Fail(absl::StrFormat("step %d committed while paused (horizon at pause: %d)", ledger_ - 1,
                         *pause_horizon_));
    return;
  }
  for (auto& w : workers_) {
    if (!w->alive) continue;
    // A worker from before a restore whose state is no further than the redone ledger counts as
    // current again (unless a COMMIT of the old history may still reach it).
    if (w->lineage < lineage_ && w->applied <= ledger_ && w->phase != Worker::Phase::kComplete) {
      w->lineage = lineage_;
    }
    if (w->lineage == lineage_ && w->applied > ledger_) {
      Fail(absl::StrFormat("w%d has applied %d steps but only %d are committed", w->index,
                           w->applied, ledger_));
      return;
    }
    if (w->hash != canonical_[w->applied]) {
      Fail(absl::StrFormat("w%d parameters after %d steps are not the canonical ones", w->index,
                           w->applied));
      return;
    }
  }
}

bool Simulation::Done() const {
  if (core_ == nullptr || faults_) return false;
  if (!core_->finished() && !core_->stopped()) return false;
  for (const auto& w : workers_) {
    if (w->alive && w->phase != Worker::Phase::kStopped) return false;
  }
  return true;
}

void Simulation::FinalChecks() {
  if (failed_) return;
  if (!Done()) {
    uint32_t alive = 0, stopped = 0;
    for (const auto& w : workers_) {
      alive += w->alive;
      stopped += w->alive && w->phase == Worker::Phase::kStopped;
    }
    Fail(absl::StrFormat(
        "liveness: run did not finish within the budget: committed %d of %d, coordinator %s, "
        "generation %d, %d live workers (%d stopped)",
        ledger_, o_.max_steps, core_ ? "up" : "down", core_ ? core_->generation().id() : 0, alive,
        stopped));
    return;
  }
  result_.stopped = core_->stopped();
  if (!result_.stopped) {
    if (ledger_ != o_.max_steps) {
      Fail(absl::StrFormat("finished with %d of %d steps in the ledger", ledger_, o_.max_steps));
      return;
    }
    // Every member of the final generation applied every step.
    // Every live member of the final generation (by session: a worker declared dead and
    // re-registered is not one) applied every step.
    std::set<uint64_t> members;
    for (const auto& m : core_->generation().members()) members.insert(m.session());
    for (const auto& w : workers_) {
      if (!w->alive || members.count(w->session) == 0) continue;
      if (w->applied != o_.max_steps) {
        Fail(absl::StrFormat("w%d of the final generation stopped at %d of %d steps", w->index,
                             w->applied, o_.max_steps));
        return;
      }
    }
  }
}

SimResult Simulation::Run() {
  if (log_ != nullptr) *log_ << "sim options: " << o_.ToString() << "\n";
  StartCoordinator();
  for (uint32_t i = 0; i < o_.initial_workers; ++i) Spawn("initial");
  ScheduleFaults();
  At(o_.fault_phase_micros, [this] { Heal(); });
  const int64_t deadline = o_.fault_phase_micros + o_.liveness_budget_micros;
  while (!queue_.empty() && !failed_) {
    Item item = queue_.top();
    queue_.pop();
    if (item.time > deadline) break;
    now_ = item.time;
    item.fn();
    CheckAfterEvent();
    if (Done()) break;
    if (result_.events > kMaxEvents) {
      Fail("event budget exhausted (runaway schedule)");
      break;
    }
  }
  FinalChecks();
  result_.ok = !failed_;
  result_.end_micros = now_;
  return result_;
}

}  // namespace

SimOptions SimOptions::FromSeed(uint64_t seed) {
  Rng rng(seed ^ 0x5EEDF00DCAFEULL);
  SimOptions o;
  o.seed = seed;
  o.desired_workers = static_cast<uint32_t>(rng.Range(1, 4));
  o.min_workers = static_cast<uint32_t>(rng.Range(1, o.desired_workers));
  o.initial_workers = static_cast<uint32_t>(rng.Range(1, 5));
  o.max_steps = static_cast<uint64_t>(rng.Range(3, 40));
  o.global_batch = static_cast<uint32_t>(rng.Range(1, 37));
  o.checkpoint_every = rng.Chance(0.5) ? static_cast<uint32_t>(rng.Range(2, 7)) : 0;
  o.keep_last = static_cast<uint32_t>(rng.Range(1, 3));
  o.pipeline = rng.Chance(0.5);
  // Fault rates: each fault kind is on with some probability, at a rate drawn from the seed
  // (FoundationDB's buggify: on per run with one probability, firing with another).
  auto maybe = [&](double p_on, double lo, double hi) {
    return rng.Chance(p_on) ? lo + (hi - lo) * rng.Real() : 0.0;
  };
  o.message_loss = maybe(0.5, 0.001, 0.08);
  o.long_delay = maybe(0.4, 0.001, 0.03);
  o.kill_per_s = maybe(0.6, 0.2, 4.0);
  o.kill_after_complete = maybe(0.3, 0.005, 0.05);
  o.join_per_s = maybe(0.6, 0.5, 4.0);
  o.coordinator_crash_per_s = maybe(0.4, 0.2, 3.0);
  o.partition_per_s = maybe(0.3, 0.2, 3.0);
  o.journal_failure = maybe(0.3, 0.002, 0.03);
  o.control_per_s = maybe(0.7, 1.0, 10.0);
  o.stop_allowed = rng.Chance(0.1);
  o.fault_phase_micros = rng.Range(300, 2500) * kMs;
  o.liveness_budget_micros = 60'000 * kMs;
  o.corrupt_checkpoint = maybe(0.4, 0.1, 0.7);  // drawn last: earlier options keep their seeds
  return o;
}

std::string SimOptions::ToString() const {
  return absl::StrFormat(
      "seed=%d workers(initial=%d desired=%d min=%d) max_steps=%d global_batch=%d "
      "checkpoint_every=%d keep_last=%d pipeline=%d loss=%.4f long_delay=%.4f kill/s=%.2f "
      "kill_after_complete=%.3f join/s=%.2f coordinator_crash/s=%.2f partition/s=%.2f "
      "journal_failure=%.4f corrupt_checkpoint=%.2f "
      "control/s=%.2f stop_allowed=%d fault_phase_ms=%d liveness_budget_ms=%d",
      seed, initial_workers, desired_workers, min_workers, max_steps, global_batch,
      checkpoint_every, keep_last, pipeline, message_loss, long_delay, kill_per_s,
      kill_after_complete, join_per_s, coordinator_crash_per_s, partition_per_s, journal_failure,
      corrupt_checkpoint, control_per_s,
      stop_allowed, fault_phase_micros / 1000, liveness_budget_micros / 1000);
}

SimResult RunSimulation(const SimOptions& options, std::ostream* verbose) {
  Simulation sim(options, verbose);
  return sim.Run();
}

}  // namespace gyre::sim
