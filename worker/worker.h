// The worker actor (DESIGN.md section 4): one process per GPU, or per CPU process without one.
// It registers with the coordinator, heartbeats, and then follows step leases:
//
//   RUN          read its slice of the step's global sample range, forward + backward with the
//                SUM all-reduce of gradient buckets overlapped (GradientReducer), CompleteStep
//                with the step-time breakdown; apply the optimizer only on COMMIT
//   CHECKPOINT   snapshot the state of this boundary (rank 0 writes it in the background and
//                reports it, or the write's error, with ReportCheckpoint), then run the step
//   RECONFIGURE  drop the old communicator, join generation G+1, receive state if it lacks it
//                (broadcast from a member, or the checkpoint the coordinator names; one that
//                fails verification is reported with ReportBadCheckpoint; one that failed
//                part-way leaves the replica partially restored: no step or checkpoint comes of
//                it, a generation that would keep or send it makes the worker exit, and only a
//                later restore or a received state clears it). Gloo rendezvous keys
//                and the NCCL unique id (rank 0 publishes it; GPU workers, worker/gpu_runtime.h)
//                go through the coordinator's store ("coordinator") or a directory ("dir:")
//   PAUSE / STANDBY  wait and ask again;  STOP  leave
//
// Decisions take effect only at step boundaries. A collective that fails mid-step (a peer died,
// a timeout) is aborted, the gradients dropped, and the worker keeps asking for the same step
// until the coordinator moves everyone to the next generation: nothing uncommitted is applied,
// nothing is applied twice. Not thread-safe (Run owns it; one heartbeat thread inside).
#pragma once

#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

#include "absl/status/status.h"
#include "base/clock.h"
#include "base/env.h"
#include "dataloader/sampler.h"
#include "worker/checkpoint.h"
#include "worker/cluster_client.h"
#include "worker/collective.h"
#include "worker/gloo_collective.h"
#include "worker/replica.h"
#include "worker/snapshot_staging.h"

namespace gyre {

struct WorkerOptions {
  std::string run_dir;             // checkpoints are written under it (paths in leases are relative)
  std::string hostname = "127.0.0.1";  // address peers use to reach this worker's collectives
  // "cpu": Gloo over TCP; "cuda": the model on this process's CUDA device 0 (the launcher gives
  // each worker one GPU through CUDA_VISIBLE_DEVICES) and NCCL through the GPU runtime.
  std::string device = "cpu";
  int64_t nccl_timeout_ms = 60000;  // NCCL init and each wait (config cluster.collective_timeout_ms)
  GlooOptions gloo;
  int64_t broken_collective_wait_ms = 200;  // between lease polls after a failed collective
  bool log_steps = true;           // one line per committed step on stderr
  // All-reduce gradient buckets during backward (false: all of them after backward).
  bool overlap_grad_reduce = true;
  size_t grad_bucket_bytes = ModelReplica::kBucketBytes;  // all-reduce bucket cap
  // How a restore streams checkpoint files (chunk size, reader threads; tests use small chunks).
  // The run config's checkpoint.restore_* fields, where set, replace these when the worker
  // receives it (StreamOptionsFromConfig; an invalid one makes Run fail naming the field).
  CheckpointStreamOptions restore;
  // The pid of the worker process on this host that this one replaces (its launcher saw it
  // exit); 0 if none. Sent with the first registration so the coordinator need not wait out
  // that worker's heartbeat timeout.
  uint32_t replaces_pid = 0;
};

class Worker {
 public:
  Worker(ClusterClient* client, Env* env, Clock* clock, WorkerOptions options);
  ~Worker();

  // Runs until the coordinator says STOP (OK) or something unrecoverable happens.
  absl::Status Run();

  uint64_t applied_steps() const { return applied_steps_; }
  // The stream statistics of the last successful checkpoint restore (also logged); nullopt
  // before one. Read after Run returned.
  const std::optional<ModelReplica::RestoreStats>& last_restore() const { return last_restore_; }

 private:
  absl::Status RegisterSession();
  absl::Status EnsureReplica();
  void HeartbeatLoop();
  absl::Status OpenData(const gyre::v1::RunConfig& config);
  absl::Status JoinGeneration(const gyre::v1::StepLease& lease);
  absl::Status RunStep(const gyre::v1::StepLease& lease);
  void StartCheckpoint(const gyre::v1::StepLease& lease);
  // Loads the checkpoint a restoring RECONFIGURE names; on a verification failure reports it
  // (ReportBadCheckpoint) and returns Aborted, so the worker asks the coordinator again.
  absl::Status RestoreCheckpoint(const gyre::v1::StepLease& lease);
  absl::StatusOr<std::unique_ptr<RendezvousStore>> StoreFor(const gyre::v1::Rendezvous& rendezvous);
  bool on_cuda() const { return options_.device == "cuda"; }
  // The training thread replaces the communicator only through these (the heartbeat thread
  // aborts a stale NCCL communicator under the same lock, see HeartbeatLoop).
  void DropCollective();
  void InstallCollective(std::unique_ptr<Collective> collective);

  ClusterClient* client_;
  Env* env_;
  Clock* clock_;
  int64_t started_micros_ = 0;  // when this worker was constructed (the step log's "at" is relative to it)
  WorkerOptions options_;

  gyre::v1::WorkerId id_;
  gyre::v1::RunConfig config_;
  bool config_received_ = false;
  std::atomic<uint64_t> session_{0};
  std::atomic<uint64_t> generation_{0};
  std::atomic<bool> session_lost_{false};
  std::atomic<bool> stopping_{false};
  uint32_t heartbeat_interval_ms_ = 1000;
  std::thread heartbeat_;

  std::unique_ptr<ModelReplica> replica_;
  std::unique_ptr<data::TokenIndex> index_;
  std::unique_ptr<data::Sampler> sampler_;
  std::unique_ptr<RendezvousStore> store_;
  std::mutex collective_mu_;
  std::unique_ptr<Collective> collective_;  // written by the training thread under collective_mu_
  // The lease's checkpoint_dir (relative) of each write in flight, by step: a failed write's
  // report names it (the writer's on_done only has the step). Written by the training thread,
  // taken by the writer thread.
  std::mutex checkpoint_dirs_mu_;
  std::map<uint64_t, std::string> checkpoint_dirs_;
  std::unique_ptr<CheckpointWriter> checkpoints_;  // declared after what its on_done uses
  std::unique_ptr<SnapshotStaging> staging_;  // the checkpoint snapshots' host buffer; made with the first replica
  int rank_ = -1;
  std::atomic<uint64_t> applied_steps_{0};
  // Step-time bookkeeping of the training loop (its thread only).
  double last_optimizer_ms_ = 0;
  // In-run evaluation (worker/in_run_eval.h), rank 0: the result for step eval_.step() is reused
  // when that step is redone in another generation (same parameters); off after a failure.
  std::optional<gyre::v1::EvalResult> eval_;
  double eval_ms_ = 0;
  bool eval_disabled_ = false;
  std::optional<ModelReplica::RestoreStats> last_restore_;
};

}  // namespace gyre
