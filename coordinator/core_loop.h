// CoreLoop: the one thread that owns a CoordinatorCore (DESIGN.md section 4, "core as a state
// machine"). gRPC handlers Post() events; the loop feeds them to the core with the time of its
// Clock, executes the core's actions in order (journal writes through the Journal, replies via
// the callbacks given to Post, timers, checkpoint deletions) and sleeps until the next event or
// timer.
//
// Fail-stop: when a journal write fails, the remaining actions of that event are dropped, every
// waiting request is answered UNAVAILABLE ("coordinator restarting"), and the core is rebuilt
// from what the journal holds (CoordinatorCore::Restore), exactly as after a process restart.
//
// Thread-safety: Post() is thread-safe. Callbacks run on the loop thread and must not block.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "base/clock.h"
#include "coordinator/core.h"
#include "coordinator/journal.h"

namespace gyre::coordinator {

class CoreLoop {
 public:
  struct Options {
    gyre::v1::RunConfig config;                // used when the journal is empty (a new run)
    Journal* journal = nullptr;                // not owned
    Clock* clock = nullptr;                    // not owned; Clock::Real() when null
    RendezvousProvider* rendezvous = nullptr;  // not owned
    size_t max_queued_events = 4096;           // Post beyond this answers UNAVAILABLE
    // Called on the loop thread when keep-last-K drops a checkpoint (delete its files).
    std::function<void(const DeleteCheckpoint&)> on_delete_checkpoint;
    // Called on the loop thread for every new generation (logging).
    std::function<void(const gyre::v1::GenerationRecord&)> on_generation;
  };
  using Callback = std::function<void(const Reply&)>;

  // Loads the journal: resumes the run it holds, or starts the run of options.config.
  static absl::StatusOr<std::unique_ptr<CoreLoop>> Start(Options options);
  ~CoreLoop();  // Stop()

  // Answers every queued and waiting request UNAVAILABLE, joins the loop thread; later Posts are
  // answered UNAVAILABLE at once. Call before shutting down the gRPC server (its Shutdown waits
  // for the calls the loop still owes an answer).
  void Stop();

  // Queues `event` (its request id is assigned here). `done` runs exactly once, on the loop
  // thread, with the core's reply (deferred replies such as CompleteStep may come much later).
  void Post(Event event, Callback done);

  // A snapshot of the run's status, through the loop (blocks until the loop answers).
  gyre::v1::RunStatus Status();

  // Metrics watchers (Control.WatchMetrics). `on_update` runs on the loop thread for every
  // committed step from `since_step` on: first the ones still in memory (the last
  // kMetricsHistory), then each new commit. Must not block. Returns an id for Unsubscribe;
  // after Unsubscribe returns, `on_update` is not running and will not run again.
  using MetricsCallback = std::function<void(const gyre::v1::MetricsUpdate&)>;
  uint64_t Subscribe(uint64_t since_step, MetricsCallback on_update);
  void Unsubscribe(uint64_t id);
  static constexpr size_t kMetricsHistory = 10000;

 private:
  explicit CoreLoop(Options options);
  absl::Status Boot();
  void Run();
  void Handle(Event event, Callback done);
  // Returns false when a journal write failed (the core was rebuilt).
  bool Execute(std::vector<Action> actions);
  void FailAllPending(const absl::Status& status);

  Options options_;
  Clock* clock_;

  std::mutex mu_;
  std::condition_variable wake_;
  std::deque<std::pair<Event, Callback>> queue_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::optional<int64_t> timer_at_micros_ ABSL_GUARDED_BY(mu_);

  // Watchers: guarded by their own mutex, held while callbacks run (Unsubscribe waits).
  std::mutex watchers_mu_;
  std::map<uint64_t, MetricsCallback> watchers_ ABSL_GUARDED_BY(watchers_mu_);
  std::deque<gyre::v1::MetricsUpdate> history_ ABSL_GUARDED_BY(watchers_mu_);
  uint64_t next_watcher_ ABSL_GUARDED_BY(watchers_mu_) = 0;

  // Loop thread only.
  std::unique_ptr<CoordinatorCore> core_;
  std::map<RequestId, Callback> pending_;
  RequestId next_request_ = 0;
  std::mt19937_64 session_ids_;

  std::thread thread_;
};

}  // namespace gyre::coordinator
