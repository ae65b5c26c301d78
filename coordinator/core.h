// CoordinatorCore: the coordinator's whole decision logic (DESIGN.md section 4) as a
// single-threaded state machine. It is fed events (worker RPCs, control commands, timer ticks)
// together with the current monotonic time, and answers with a list of actions for its host to
// carry out in order: journal writes, replies to specific requests, timers to arm, notices.
//
// It never reads a clock, draws a random number, touches RocksDB or a socket: session ids come
// in with the Register event, time comes in with every event, rendezvous data comes from the
// RendezvousProvider, and persistence is the host's job. That is what lets tests/sim drive it
// through thousands of seeded fault schedules deterministically.
//
// Contract with the host (the gRPC server, or the simulator):
//   * Execute the returned actions in order. A JournalWrite with sync=true must be durable
//     before any later action of the same list is executed (a COMMIT reply follows the journal
//     write of its CommittedStep).
//   * If a journal write fails, execute none of the remaining actions; drop the core and build
//     a new one with Restore() from what the journal holds (fail-stop). Workers retry.
//   * Deliver a TickEvent no later than the time of the latest ArmTimer (earlier is harmless).
//
// Semantics in short (details at each decision in core.cc):
//   * A lease decision for (generation G, step t) is made once and every member of G asking for
//     t gets it (RUN / CHECKPOINT / STOP are fixed; PAUSE and STANDBY mean "ask again").
//   * Step t commits when every member of G reported CompleteStep(G, t); the CommittedStep is
//     journaled (synced) before any COMMIT is answered. A retried CompleteStep of a committed
//     step is answered COMMIT if the reporter's generation committed it, ABORT otherwise.
//   * Membership changes (join, scale, drain) wait for a step boundary; a lost member creates
//     G+1 at once and the uncommitted step is redone there on the same samples.
//   * STOP (max_steps reached or operator Stop) carries checkpoint_dir when the state at that
//     boundary is not checkpointed yet: rank 0 writes it there, reports it, then leaves. The
//     first member to Leave dissolves the generation into an empty one, reason "stop" (reason
//     "failure" if a member timed out instead of leaving).
//   * Pause, like every decision, takes effect at a step boundary: steps already leased may
//     still commit, no step is leased while paused.
//   * If no member holding the state of the last committed step survives, the next generation
//     restores from the latest completed checkpoint (GenerationRecord reason "restore"); the
//     steps after it are erased from the journal and redone on the same samples.
//
// The worker side of the protocol, as the core expects it (tests/sim/simulator.cc follows it):
//   1. Register (worker id, last_applied_step = steps applied to its parameters). Retrying a
//      lost Register returns the same session; after a coordinator restart a worker may keep
//      using its session (or Register with previous_session to re-attach).
//   2. Heartbeat every heartbeat_interval_ms. known=false, or NOT_FOUND from any call: the
//      session was declared dead; Register again (keeping its parameters).
//   3. Loop: AcquireStep(G, t = steps applied) and obey:
//      RUN t: compute the slice [rank_begin, rank_end) with the schedule values, reduce, then
//        CompleteStep(G, t). COMMIT: apply the optimizer (t+1 steps applied). ABORT: drop the
//        gradients and AcquireStep(G, t) again (it will say RECONFIGURE). Retry CompleteStep
//        with the same (G, t) on timeouts; never give up a pending CompleteStep.
//      CHECKPOINT t: rank 0 saves the state after t steps at checkpoint_dir (asynchronously),
//        ReportCheckpoint when it is complete, or with `error` set when the write failed (counted
//        in RunStatus.checkpoint_failures, never recorded); every rank then runs t as for RUN.
//      PAUSE / STANDBY: ask again after retry_after_ms.
//      RECONFIGURE: join `generation` (abort the old communicator). If every rank is in
//        needs_state, load checkpoint_dir (empty: the initial parameters) at step `step`;
//        else if this rank is in needs_state, receive the state from state_source_rank over the
//        new communicator; else keep the parameters (they are those of start_step). Then
//        AcquireStep(new G, start_step).
//      STOP: if checkpoint_dir is set, rank 0 saves the state there and reports it; then Leave.
//   4. A checkpoint named for a restore that fails verification: ReportBadCheckpoint, then
//      AcquireStep again. The core marks it bad in the journal (CheckpointRecord.invalid_reason,
//      never used again) and, if the current generation restores from it, forms the next
//      generation from the previous valid checkpoint (or from step 0 when none is left).
//
// Thread-safety: none; one thread owns a core.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <functional>
#include <optional>
#include <set>
#include <string>
#include <variant>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "coordinator/journal_types.h"
#include "gyre/v1/cluster.pb.h"
#include "gyre/v1/config.pb.h"
#include "gyre/v1/control.pb.h"
#include "gyre/v1/journal.pb.h"

namespace gyre::coordinator {

// Host-chosen id of one request; replies name it.
using RequestId = uint64_t;

// ---- Events ----

struct RegisterEvent {
  RequestId id = 0;
  gyre::v1::RegisterRequest request;
  // Random session id drawn by the host for a new session (non-zero). Unused on re-attach.
  uint64_t fresh_session = 0;
};
// One worker call as the core sees it: the host's request id and the request itself. Each
// alias is its own type, so `Event`'s alternatives stay distinct.
template <typename Request>
struct RequestEvent {
  RequestId id = 0;
  Request request;
};
using HeartbeatEvent = RequestEvent<gyre::v1::HeartbeatRequest>;
using AcquireStepEvent = RequestEvent<gyre::v1::AcquireStepRequest>;
using CompleteStepEvent = RequestEvent<gyre::v1::CompleteStepRequest>;
using ReportCheckpointEvent = RequestEvent<gyre::v1::ReportCheckpointRequest>;
using ReportBadCheckpointEvent = RequestEvent<gyre::v1::ReportBadCheckpointRequest>;
using LeaveEvent = RequestEvent<gyre::v1::LeaveRequest>;
// Timers: checks heartbeat deadlines.
struct TickEvent {};

using ControlRequest =
    std::variant<gyre::v1::GetStatusRequest, gyre::v1::ListWorkersRequest, gyre::v1::PauseRequest,
                 gyre::v1::ResumeRequest, gyre::v1::ScaleRequest, gyre::v1::DrainRequest,
                 gyre::v1::CheckpointRequest, gyre::v1::StopRequest>;
struct ControlEvent {
  RequestId id = 0;
  ControlRequest request;
};

using Event = std::variant<RegisterEvent, HeartbeatEvent, AcquireStepEvent, CompleteStepEvent,
                           ReportCheckpointEvent, LeaveEvent, TickEvent, ControlEvent,
                           ReportBadCheckpointEvent>;

// ---- Actions ----

using ReplyBody =
    std::variant<std::monostate, gyre::v1::RegisterResponse, gyre::v1::HeartbeatResponse,
                 gyre::v1::StepLease, gyre::v1::CompleteStepResponse,
                 gyre::v1::ReportCheckpointResponse, gyre::v1::LeaveResponse, gyre::v1::RunStatus,
                 gyre::v1::ListWorkersResponse, gyre::v1::ReportBadCheckpointResponse>;

// The answer to request `id`. When `status` is not OK, `body` is monostate. Status codes follow
// STYLE.md section 5: NOT_FOUND unknown session/worker, INVALID_ARGUMENT impossible request,
// FAILED_PRECONDITION out-of-protocol request (e.g. resume after stop).
struct Reply {
  RequestId id = 0;
  absl::Status status;
  ReplyBody body;
};
struct JournalWrite {
  JournalBatch batch;
};
// Deliver a TickEvent at (or before) this monotonic time. Only the latest one counts.
struct ArmTimer {
  int64_t at_micros = 0;
};
// A new generation exists (already journaled by an earlier action of the same list).
struct GenerationCreated {
  gyre::v1::GenerationRecord record;
};
// Keep-last-K: this checkpoint's files may be deleted (its record is gone from the journal).
struct DeleteCheckpoint {
  uint64_t step = 0;
  std::string path;
};

// A step was committed (already journaled by an earlier action): metrics for watchers.
struct StepCommitted {
  gyre::v1::CommittedStep record;
};

using Action = std::variant<Reply, JournalWrite, ArmTimer, GenerationCreated, DeleteCheckpoint,
                            StepCommitted>;

// Supplies the collective rendezvous of a new generation: the Gloo store prefix, or the NCCL
// unique id bytes (ncclGetUniqueId run by the host). Must be deterministic in tests.
class RendezvousProvider {
 public:
  virtual ~RendezvousProvider() = default;
  virtual gyre::v1::Rendezvous ForGeneration(uint64_t generation_id) = 0;
};

// Gloo: one TCP store at `store_address`, a key prefix per generation.
class GlooRendezvous final : public RendezvousProvider {
 public:
  GlooRendezvous(std::string store_address, std::string run_name)
      : store_address_(std::move(store_address)), run_name_(std::move(run_name)) {}
  gyre::v1::Rendezvous ForGeneration(uint64_t generation_id) override;

 private:
  std::string store_address_;
  std::string run_name_;
};

// Validates the parts of `config` the coordinator relies on; names the field path.
absl::Status ValidateCoordinatorConfig(const gyre::v1::RunConfig& config);

// A run's config is fixed when it starts (its journal holds it, and a resumed coordinator runs by
// that one): a coordinator started on an existing run with a `given` config that differs from the
// `journaled` one, apart from `control` (listen address, TLS: a restart may move them), fails
// with the differing fields named instead of silently ignoring them.
absl::Status CheckResumedRunConfig(const gyre::v1::RunConfig& journaled, const gyre::v1::RunConfig& given);

// Learning rate at step t: linear warm-up over warmup_steps to optimizer.lr, then cosine decay to
// final_lr_fraction * lr at total_steps (default max_steps), flat after.
double LearningRateAt(const gyre::v1::RunConfig& config, uint64_t step);

// Rank r's contiguous slice of the `global` samples of a step across `world` ranks: remainders go
// to the first ranks. Returns [begin, end) offsets relative to the step's first sample.
std::pair<uint64_t, uint64_t> RankSlice(uint64_t global, uint32_t world, uint32_t rank);

struct CoreOptions {
  gyre::v1::RunConfig config;             // resolved run config
  RendezvousProvider* rendezvous = nullptr;  // not owned; outlives the core
  // Wall-clock anchor: `unix_ms` is the wall time at monotonic `micros` (journal timestamps).
  int64_t anchor_micros = 0;
  int64_t anchor_unix_ms = 0;
};

class CoordinatorCore {
 public:
  // A fresh run. `initial` receives the journal writes (config, control state) to execute first.
  static absl::StatusOr<std::unique_ptr<CoordinatorCore>> Create(const CoreOptions& options,
                                                                 std::vector<Action>* initial);
  // A restarted coordinator: rebuilds state from the journal. options.config is ignored (the
  // journaled config wins). Members of the last generation keep their sessions and get one
  // heartbeat timeout from `now_micros` to show up again.
  static absl::StatusOr<std::unique_ptr<CoordinatorCore>> Restore(const CoreOptions& options,
                                                                  const JournalContents& journal,
                                                                  int64_t now_micros,
                                                                  std::vector<Action>* initial);

  std::vector<Action> Handle(const Event& event, int64_t now_micros);

  // ---- Read-only views (status, tests, the simulator's invariant checks) ----
  uint64_t committed_steps() const { return committed_; }
  const gyre::v1::Generation& generation() const { return generation_; }
  bool paused() const { return paused_; }
  bool stopped() const { return stopped_; }
  bool finished() const { return committed_ >= max_steps_; }
  // Highest step with a fixed RUN/CHECKPOINT decision in the current generation, if any.
  std::optional<uint64_t> last_leased_step() const;
  // The committed count this core can reach without granting any new lease (steps already leased,
  // by it or, for the generation restored from the journal, by its previous incarnation).
  uint64_t commit_horizon() const;
  gyre::v1::RunStatus Status() const;
  const gyre::v1::RunConfig& config() const { return config_; }

 private:
  struct Worker {
    uint64_t session = 0;
    gyre::v1::WorkerId id;
    int64_t last_seen_micros = 0;
    int64_t last_seen_unix_ms = 0;
    uint64_t reported_step = 0;
    // Holds (or is about to hold, once its COMMIT arrives) the parameters after `committed_`
    // steps, so it can be a state source.
    bool has_state = false;
    bool draining = false;
    uint64_t join_order = 0;  // standbys join in this order
    // Has asked for a step lease, i.e. holds a built replica and is ready to join. While a
    // generation with members runs, a standby that is still building its replica is not picked:
    // the members would wait for it (5-7 s at 1.3B parameters) instead of training on.
    bool ready = false;
  };
  struct PendingComplete {
    RequestId id;
    uint64_t session;
    bool want_next_lease;
  };
  struct Context;  // per-Handle scratch: actions, now

  explicit CoordinatorCore(const CoreOptions& options);

  void OnRegister(const RegisterEvent& e, Context& ctx);
  void OnHeartbeat(const HeartbeatEvent& e, Context& ctx);
  void OnAcquireStep(const AcquireStepEvent& e, Context& ctx);
  void OnCompleteStep(const CompleteStepEvent& e, Context& ctx);
  void OnReportCheckpoint(const ReportCheckpointEvent& e, Context& ctx);
  void OnReportBadCheckpoint(const ReportBadCheckpointEvent& e, Context& ctx);
  // A committed step carried an in-run evaluation: keep it for status and update the saturation
  // watch of each source.
  void RecordEval(const gyre::v1::EvalResult& eval);
  void OnLeave(const LeaveEvent& e, Context& ctx);
  void OnTick(Context& ctx);
  // Declares dead the workers `dead` selects (heartbeat timeout, or replaced by a new process): a
  // member among them makes the next generation a failure.
  void DropWorkersIf(const std::function<bool(const Worker&)>& dead);
  void OnControl(const ControlEvent& e, Context& ctx);

  // Lease for (generation, step) asked by `session`; fixes the decision when it is final.
  gyre::v1::StepLease Lease(uint64_t session, uint64_t generation, uint64_t step,
                            absl::Status* error);
  gyre::v1::StepLease MakeRunLease(uint64_t step, gyre::v1::StepDecision decision) const;
  void FillRankSlice(uint64_t session, gyre::v1::StepLease* lease) const;
  void Commit(Context& ctx);
  // Creates the next generation when membership must change (now for failures, at a step
  // boundary for joins, scale and drain).
  void Reconcile(Context& ctx);
  std::vector<uint64_t> TargetMembers() const;
  // `batch` may carry records that must land atomically with the generation's.
  void CreateGeneration(const std::vector<uint64_t>& sessions, const std::string& reason,
                        Context& ctx, JournalBatch batch = JournalBatch());
  void AbortPendingCompletes(Context& ctx);
  void JournalControl(Context& ctx);
  bool IsMember(uint64_t session) const;
  std::optional<uint32_t> RankOf(uint64_t session) const;
  bool StepInFlight() const;
  bool MemberLost() const;
  std::optional<uint64_t> GenerationThatCommitted(uint64_t step) const;
  bool WasMember(uint64_t generation, uint64_t session) const;
  int64_t UnixMs(int64_t micros) const;
  void ArmNextTimer(Context& ctx) const;
  // The live worker of `session`, marked seen now; nullptr (request `id` answered NotFound:
  // the worker must register again) when the session is unknown.
  Worker* SeenWorker(uint64_t session, RequestId id, Context& ctx);

  gyre::v1::RunConfig config_;
  RendezvousProvider* rendezvous_;
  int64_t anchor_micros_;
  int64_t anchor_unix_ms_;
  int64_t started_unix_ms_ = 0;
  uint64_t global_batch_;
  uint64_t global_tokens_;
  uint64_t max_steps_;
  uint32_t min_workers_;
  int64_t heartbeat_interval_micros_;
  int64_t heartbeat_timeout_micros_;

  std::map<uint64_t, Worker> workers_;  // live sessions
  uint64_t next_join_order_ = 0;

  gyre::v1::Generation generation_;  // current; id 0 = none yet
  // Every generation's member sessions (retried CompleteStep of an old step is answered from it).
  std::map<uint64_t, std::set<uint64_t>> generation_members_;
  // Runs of committed steps by generation: first step -> generation id (ascending).
  std::map<uint64_t, uint64_t> committed_by_;
  // The generation restored from the journal: its in-flight step may have been leased by the
  // previous coordinator, so a CompleteStep without a recorded lease is accepted there.
  uint64_t restored_generation_ = 0;
  uint64_t restored_committed_ = 0;  // committed steps at Restore
  // Latest generation that restored from a checkpoint (0: none). State claims from before it
  // are not trusted: the redone steps need not reproduce the lost ones bit for bit.
  uint64_t last_restore_generation_ = 0;
  // Set while the current generation restores from this checkpoint (nobody held the state).
  std::optional<std::string> restore_checkpoint_path_;

  uint64_t committed_ = 0;
  // Fixed decisions of the current generation, by step.
  std::map<uint64_t, gyre::v1::StepLease> decisions_;
  // CompleteStep reports of step `committed_` in the current generation.
  std::map<uint64_t, gyre::v1::StepMetrics> reports_;
  std::vector<PendingComplete> pending_completes_;

  bool paused_ = false;
  bool stopped_ = false;
  uint32_t desired_workers_;
  bool checkpoint_requested_ = false;
  bool scale_changed_ = false;  // the next generation's reason is "scale"
  // A member of the current generation was declared dead (heartbeat timeout, or a replacement
  // registered for its pid), not a Leave:
  // dissolving a finished or stopped run's generation is then a "failure", not a "stop".
  bool member_timed_out_ = false;
  // The STOP decision at the committed boundary where the run ends (with the final checkpoint's
  // directory). Kept past the generation it was made in: that generation dissolves when its first
  // member leaves, and the others still ask for it.
  std::optional<gyre::v1::StepLease> final_stop_;
  std::map<uint64_t, gyre::v1::CheckpointRecord> checkpoints_;
  // Checkpoint writes reported as failed (ReportCheckpointRequest.error). Not journaled, kept
  // simple on purpose: a failure changes no run state (the run goes on from the older checkpoint),
  // so a restarted coordinator counts from 0 and the next failure shows again.
  struct FailedCheckpoint {
    uint64_t session = 0;
    uint64_t step = 0;
    std::string error;
    bool operator==(const FailedCheckpoint&) const = default;
  };
  uint64_t checkpoint_failures_ = 0;
  std::optional<FailedCheckpoint> last_checkpoint_failure_;
  gyre::v1::StepMetrics last_metrics_;
  // In-run evaluation (not journaled here: the committed steps carry it). The saturation watch
  // starts over after a coordinator restart.
  std::optional<gyre::v1::EvalResult> last_eval_;
  struct Saturation {
    double min = 0, last = 0;
    int64_t min_step = -1;
    uint32_t above = 0;  // consecutive evaluations above min + saturation_delta
  };
  std::map<std::string, Saturation> saturation_;
};

}  // namespace gyre::coordinator
