// Worker plumbing: session, heartbeats, data, generations, checkpoints. The step loop itself is
// in train_loop.cc.
#include "worker/worker.h"

#include <unistd.h>

#include <random>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "worker/coordinator_store.h"
#include "worker/gpu_runtime.h"

namespace gyre {

Worker::Worker(ClusterClient* client, Env* env, Clock* clock, WorkerOptions options)
    : client_(client), env_(env), clock_(clock), started_micros_(clock->NowMicros()), options_(std::move(options)) {
  char host[256] = {0};
  ::gethostname(host, sizeof(host) - 1);
  id_.set_host(host);
  id_.set_device(options_.device);
  id_.set_pid(static_cast<uint32_t>(::getpid()));
  std::random_device rd;
  id_.set_nonce((static_cast<uint64_t>(rd()) << 32) | rd());
}

Worker::~Worker() {
  stopping_.store(true);
  if (heartbeat_.joinable()) heartbeat_.join();
}

absl::Status Worker::RegisterSession() {
  gyre::v1::RegisterRequest request;
  *request.mutable_worker() = id_;
  request.set_previous_session(session_.load());
  request.set_last_applied_step(applied_steps_.load());
  request.set_collective(on_cuda() ? "nccl" : "gloo");
  request.set_device_count(1);
  request.set_replaces_pid(options_.replaces_pid);
  ASSIGN_OR_RETURN(gyre::v1::RegisterResponse response, client_->Register(request));
  session_.store(response.session());
  session_lost_.store(false);
  if (response.heartbeat_interval_ms() > 0) heartbeat_interval_ms_ = response.heartbeat_interval_ms();
  if (!replica_ && !config_received_) {
    config_received_ = true;
    config_ = response.config();
    absl::StatusOr<CheckpointStreamOptions> restore = StreamOptionsFromConfig(config_.checkpoint(), options_.restore);
    if (!restore.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("the run config from the coordinator: ", restore.status().message()));
    }
    options_.restore = *std::move(restore);
    if (config_.cluster().collective_timeout_ms() > 0) {
      options_.gloo.op_timeout_ms = config_.cluster().collective_timeout_ms();
      options_.gloo.connect_timeout_ms = config_.cluster().collective_timeout_ms();
      options_.nccl_timeout_ms = config_.cluster().collective_timeout_ms();
    }
  }
  return absl::OkStatus();
}

absl::Status Worker::EnsureReplica() {
  // Built after the heartbeat thread started: a large model (or a CUDA context) can take longer
  // to set up than the coordinator's heartbeat timeout, and a silent worker is declared dead.
  if (replica_) return absl::OkStatus();
  const int64_t start = clock_->NowMicros();
  ASSIGN_OR_RETURN(replica_, ModelReplica::Create(config_, on_cuda() ? ops::Device::kCuda : ops::Device::kCpu));
  // Start-up phases are logged with their cost: at 1.3B they take most of a short run's first minute.
  std::fprintf(stderr, "worker: replica built in %.1f s (%lld parameters, %s)\n", (clock_->NowMicros() - start) / 1e6,
               static_cast<long long>(replica_->NumParameters()), on_cuda() ? "cuda" : "cpu");
  // Kept across replica rebuilds (JoinGeneration): a pinned buffer is worth keeping.
  staging_ = std::make_unique<SnapshotStaging>(on_cuda());
  return OpenData(config_);
}

void Worker::HeartbeatLoop() {
  while (!stopping_.load()) {
    gyre::v1::HeartbeatRequest request;
    request.set_session(session_.load());
    request.set_generation(generation_.load());
    request.set_step(applied_steps_.load());
    absl::StatusOr<gyre::v1::HeartbeatResponse> response = client_->Heartbeat(request);
    if ((response.ok() && !response->known()) || absl::IsNotFound(response.status())) session_lost_.store(true);
    // NCCL cannot see a peer that died on this node (ELASTIC.md section 5): a wait on it would
    // last until its deadline. When the coordinator already moved to a newer generation, this
    // communicator is stale: abort it so the training thread fails over now.
    if (response.ok() && on_cuda()) {
      std::lock_guard<std::mutex> lock(collective_mu_);
      if (collective_ && response->current_generation() > collective_->generation()) collective_->Abort();
    }
    // Sleep in small slices so shutdown is prompt.
    for (uint32_t slept = 0; slept < heartbeat_interval_ms_ && !stopping_.load(); slept += 50) {
      clock_->SleepMicros(50 * 1000);
    }
  }
}

absl::Status Worker::OpenData(const gyre::v1::RunConfig& config) {
  const gyre::v1::DataConfig& data = config.data();
  if (data.index_dir().empty()) return absl::InvalidArgumentError("data.index_dir is empty in the run config");
  ASSIGN_OR_RETURN(index_, data::TokenIndex::Open(data.index_dir(), data::TokenIndex::Mode::kReadOnly));
  data::SamplerOptions options;
  options.seq_len = data.seq_len() == 0 ? 2048 : data.seq_len();
  options.seed = config.seed();
  if (data.mix_block() != 0) options.mix_block = data.mix_block();
  for (const gyre::v1::SourceWeight& w : data.weights()) options.weights[w.source()] = w.weight();
  ASSIGN_OR_RETURN(sampler_, data::Sampler::Open(env_, *index_, options, data::Sampler::OpenOptions()));
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<RendezvousStore>> Worker::StoreFor(const gyre::v1::Rendezvous& rendezvous) {
  // "dir:<path>": a directory every member can reach (one host, or a shared file system).
  if (absl::StartsWith(rendezvous.store_address(), "dir:")) {
    return std::unique_ptr<RendezvousStore>(
        std::make_unique<DirectoryStore>(env_, clock_, rendezvous.store_address().substr(4)));
  }
  // "coordinator": the coordinator's own key-value store (multi-host, no shared file system).
  if (rendezvous.store_address() == CoordinatorStore::kAddress) {
    return std::unique_ptr<RendezvousStore>(std::make_unique<CoordinatorStore>(client_, clock_, session_.load()));
  }
  return absl::UnimplementedError(absl::StrCat("rendezvous store '", rendezvous.store_address(),
                                               "': this worker supports \"coordinator\" and dir:<path> stores"));
}

void Worker::DropCollective() {
  std::lock_guard<std::mutex> lock(collective_mu_);
  if (collective_) collective_->Abort();
  collective_.reset();
}

void Worker::InstallCollective(std::unique_ptr<Collective> collective) {
  std::lock_guard<std::mutex> lock(collective_mu_);
  collective_ = std::move(collective);
}

absl::Status Worker::JoinGeneration(const gyre::v1::StepLease& lease) {
  DropCollective();
  replica_->DropGradients();
  const gyre::v1::Generation& g = lease.generation();
  rank_ = -1;
  for (const gyre::v1::Member& m : g.members()) {
    if (m.session() == session_.load()) rank_ = static_cast<int>(m.rank());
  }
  if (rank_ < 0) return absl::FailedPreconditionError(absl::StrCat("generation ", g.id(), " does not list this worker"));
  ASSIGN_OR_RETURN(store_, StoreFor(g.rendezvous()));
  const int64_t join_start = clock_->NowMicros();
  if (on_cuda()) {
    // NCCL: rank 0 publishes a fresh unique id under the generation's prefix (gpu_runtime.h).
    GpuRuntime* gpu = GpuRuntimeOrNull();
    if (gpu == nullptr) return absl::FailedPreconditionError("cuda worker in a binary without the GPU runtime");
    ASSIGN_OR_RETURN(std::unique_ptr<Collective> nccl,
                     gpu->Connect(store_.get(), absl::StrCat(g.rendezvous().store_prefix(), "/nccl-id"), g.id(), rank_,
                                  g.members_size(), options_.nccl_timeout_ms));
    InstallCollective(std::move(nccl));
  } else {
    ASSIGN_OR_RETURN(std::unique_ptr<GlooCollective> gloo,
                     GlooCollective::Connect(store_.get(), g.id(), rank_, g.members_size(), options_.gloo,
                                             g.rendezvous().store_prefix()));
    InstallCollective(std::move(gloo));
  }
  generation_.store(g.id());
  const int64_t connected = clock_->NowMicros();

  // State: from the checkpoint the coordinator names, else from a member that has it, else
  // (nobody has it and no checkpoint: a fresh run) everyone's identical seeded initialisation.
  const bool i_need_state = std::find(g.needs_state().begin(), g.needs_state().end(), uint32_t(rank_)) != g.needs_state().end();
  const bool everyone_needs = g.needs_state_size() == g.members_size();
  if (replica_->partially_restored() && !i_need_state) {
    // A restore failed part-way and this generation would keep these parameters: train on them,
    // or send them to the members that need state (this rank the state source). Every rank that
    // needs no state is one of those. The coordinator trusts no claim of state after a restore
    // (core.cc), so this is not expected; exit rather than spread the mix. Aborting the
    // communicator first fails the other members' broadcast at once instead of at its timeout.
    DropCollective();
    return absl::InternalError(absl::StrCat(
        "generation ", g.id(), " ",
        g.needs_state_size() > 0 && g.state_source_rank() == uint32_t(rank_) ? "names this worker the state source"
                                                                              : "keeps this worker's parameters",
        ", but they hold a partially restored checkpoint; exiting rather than training on them or sending them"));
  }
  if (!lease.checkpoint_dir().empty() && i_need_state) {
    RETURN_IF_ERROR(RestoreCheckpoint(lease));
  } else if (everyone_needs && lease.checkpoint_dir().empty()) {
    // A fresh run. A replica that is still its seeded initialisation is already that state;
    // rebuilding it would cost the initialisation again (about a minute at 1.3B) and, with the old
    // one alive meanwhile, twice the model's memory (two 1.3B replicas do not fit an 80 GB GPU).
    if (!replica_->at_initial_state()) {
      replica_.reset();
      ASSIGN_OR_RETURN(replica_, ModelReplica::Create(config_, on_cuda() ? ops::Device::kCuda : ops::Device::kCpu));
    }
  } else if (g.needs_state_size() > 0) {
    RETURN_IF_ERROR(replica_->BroadcastState(collective_.get(), static_cast<int>(g.state_source_rank())));
  }
  applied_steps_.store(g.start_step());
  // Rank 0 writes the checkpoints: their staging buffer is pinned now, in the background, so the
  // first checkpoint does not stall training for it (16 GB: 8.5 s on an H100 host).
  if (rank_ == 0 && config_.checkpoint().every_steps() > 0) staging_->Prepare(replica_->SnapshotBytes());
  std::fprintf(stderr, "worker: generation %llu: rank %d of %d, communicator in %.1f s, state in %.1f s\n",
               static_cast<unsigned long long>(g.id()), rank_, g.members_size(), (connected - join_start) / 1e6,
               (clock_->NowMicros() - connected) / 1e6);
  return absl::OkStatus();
}

absl::Status Worker::RestoreCheckpoint(const gyre::v1::StepLease& lease) {
  const std::string dir = JoinPath(options_.run_dir, lease.checkpoint_dir());
  // Streamed: read in chunks through a few (pinned) buffers, checksummed while read, each chunk
  // copied to the device while the next ones are read. A failure found part-way leaves the
  // replica partially_restored(): it is never trained, checkpointed or used as a state source
  // (ModelReplica refuses, RunStep and JoinGeneration check), only restored again or rebuilt.
  const int64_t start = clock_->NowMicros();
  absl::StatusOr<ModelReplica::RestoreStats> stats = replica_->RestoreFrom(env_, clock_, dir, lease.step(), options_.restore);
  if (stats.ok()) {
    last_restore_ = *stats;
    const CheckpointStreamStats& s = stats->stream;
    const double gb = s.bytes / 1e9;
    const double total_s = (clock_->NowMicros() - start) / 1e6;
    auto rate = [&](double seconds) { return seconds > 0 ? gb / seconds : 0.0; };
    // Where the time went (the busy seconds of the reader threads add up over threads).
    std::fprintf(stderr,
                 "worker: restored step %llu from %s: %.2f GB in %.1f s (%.2f GB/s): read %.1f s (%.2f GB/s a thread, "
                 "%d threads, %d buffers of %.1f MiB), verify %.1f s, to %s %.1f s (%.2f GB/s), waiting for reads "
                 "%.1f s, buffers %.2f s, install %.2f s\n",
                 static_cast<unsigned long long>(lease.step()), dir.c_str(), gb, total_s, rate(total_s), s.read_s,
                 rate(s.read_s), s.reader_threads, s.buffers, s.chunk_bytes / 1048576.0, s.verify_s,
                 on_cuda() ? "device" : "host", s.sink_s, rate(s.sink_s), s.sink_wait_s, stats->alloc_s,
                 stats->finish_s);
    return absl::OkStatus();
  }
  const absl::Status restored = stats.status();
  if (!absl::IsDataLoss(restored)) {
    // Not the files' fault (no host memory for the read buffers): reporting the checkpoint bad
    // would lose it for good.
    return absl::Status(restored.code(), absl::StrCat("restoring ", dir, ": ", restored.message()));
  }
  // Corrupt or torn (a file missing, a checksum that fails, a manifest that does not parse): tell
  // the coordinator, which marks it bad and names the previous one; then ask again.
  std::fprintf(stderr, "worker: cannot restore %s: %s; reporting it to the coordinator\n", dir.c_str(),
               std::string(restored.message()).c_str());
  gyre::v1::ReportBadCheckpointRequest report;
  report.set_session(session_.load());
  report.set_generation(lease.generation().id());
  report.set_step(lease.step());
  report.set_path(lease.checkpoint_dir());
  report.set_error(std::string(restored.message()));
  RETURN_IF_ERROR(client_->ReportBadCheckpoint(report));
  return absl::AbortedError(absl::StrCat("checkpoint ", lease.checkpoint_dir(), " failed verification (reported): ",
                                         restored.message()));
}

void Worker::StartCheckpoint(const gyre::v1::StepLease& lease) {
  // Replicas are identical: rank 0 writes, the others go on.
  if (rank_ != 0) return;
  if (!checkpoints_) {
    const uint32_t keep = config_.checkpoint().keep_last() == 0 ? 3 : config_.checkpoint().keep_last();
    checkpoints_ = std::make_unique<CheckpointWriter>(
        env_, JoinPath(options_.run_dir, "checkpoints"), keep, [this](uint64_t step, absl::StatusOr<std::string> dir) {
          std::string relative;
          {
            std::lock_guard<std::mutex> lock(checkpoint_dirs_mu_);
            auto it = checkpoint_dirs_.find(step);
            if (it != checkpoint_dirs_.end()) {
              relative = std::move(it->second);
              checkpoint_dirs_.erase(it);
            }
          }
          gyre::v1::ReportCheckpointRequest report;
          report.set_session(session_.load());
          report.set_step(step);
          if (dir.ok()) {
            relative = dir->substr(options_.run_dir.size() + (options_.run_dir.empty() ? 0 : 1));
          } else {
            // The run goes on from the previous checkpoint; the coordinator shows the failure
            // (gyrectl status, dashboard, gyre_checkpoint_failures_total) and never restores it.
            std::fprintf(stderr, "worker: checkpoint of step %llu failed: %s; reporting it to the coordinator\n",
                         (unsigned long long)step, std::string(dir.status().message()).c_str());
            report.set_error(std::string(dir.status().message()));
          }
          if (relative.empty()) relative = JoinPath("checkpoints", CheckpointDirName(step));  // not expected
          report.set_path(relative);
          absl::Status s = client_->ReportCheckpoint(report);
          if (!s.ok()) {
            std::fprintf(stderr, "worker: ReportCheckpoint: %s\n", std::string(s.message()).c_str());
          } else if (dir.ok()) {
            // The step a restart can restore from: worth a line when reading a failure's log.
            std::fprintf(stderr, "worker: checkpoint of step %llu committed (%s)\n", (unsigned long long)step,
                         relative.c_str());
          }
        });
  }
  // Wait for the previous write first: its snapshot holds the replica's staging buffer, which
  // this one then reuses instead of pinning another (Submit would wait for it anyway).
  checkpoints_->Flush();
  const int64_t start_us = clock_->NowMicros();
  absl::StatusOr<std::vector<TensorSnapshot>> tensors = replica_->Snapshot(staging_.get());  // written while training goes on
  if (!tensors.ok()) {
    std::fprintf(stderr, "worker: checkpoint of step %llu skipped: %s\n", (unsigned long long)lease.step(),
                 std::string(tensors.status().message()).c_str());
    return;
  }
  CheckpointState state;
  state.step = lease.step();
  state.generation = generation_.load();
  state.config = config_;
  state.tensors = *std::move(tensors);
  uint64_t bytes = 0;
  for (const TensorSnapshot& t : state.tensors) bytes += t.data().size();
  // The training thread's share of a checkpoint: worth a line next to the step times.
  std::fprintf(stderr, "worker: checkpoint of step %llu: snapshot of %.2f GB in %.2f s, writing in the background\n",
               (unsigned long long)lease.step(), bytes / 1e9, (clock_->NowMicros() - start_us) / 1e6);
  {
    std::lock_guard<std::mutex> lock(checkpoint_dirs_mu_);
    checkpoint_dirs_[lease.step()] = lease.checkpoint_dir();
  }
  checkpoints_->Submit(std::move(state), JoinPath(options_.run_dir, lease.checkpoint_dir()));
}

}  // namespace gyre
