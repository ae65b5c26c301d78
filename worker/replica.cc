#include "worker/replica.h"

#include <xxhash.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <map>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "ops/cuda_backend.h"
#include "ops/elementwise.h"
#include "ops/grad_clip.h"
#include "ops/model_config.h"

namespace gyre {
namespace {

gyre::v1::DType ToProtoDType(ops::DType d) {
  switch (d) {
    case ops::DType::kF32: return gyre::v1::DTYPE_F32;
    case ops::DType::kF64: return gyre::v1::DTYPE_F64;
    case ops::DType::kBF16: return gyre::v1::DTYPE_BF16;
    case ops::DType::kI32: return gyre::v1::DTYPE_I32;
  }
  return gyre::v1::DTYPE_UNSPECIFIED;
}

absl::Status CheckFits(const std::string& name, uint64_t bytes, gyre::v1::DType dtype, const ops::Tensor& t) {
  if (bytes != t.nbytes() || dtype != ToProtoDType(t.dtype())) {
    return absl::DataLossError(absl::StrCat("checkpoint tensor ", name, " has ", bytes, " bytes of dtype ", dtype,
                                            "; the model expects ", t.nbytes(), " bytes of dtype ",
                                            ToProtoDType(t.dtype())));
  }
  return absl::OkStatus();
}

// Host bytes into [offset, offset + bytes.size()) of `t`. On CUDA the copy is synchronous (the
// host buffer may be reused when it returns); from pinned memory it runs at link speed.
void CopyInto(std::string_view bytes, ops::Tensor* t, uint64_t offset = 0) {
  if (bytes.empty()) return;
  char* dst = static_cast<char*>(t->raw()) + offset;
  if (t->device() == ops::Device::kCpu) {
    std::memcpy(dst, bytes.data(), bytes.size());
  } else {
    ops::Cuda().CopyBytes(dst, ops::Device::kCuda, bytes.data(), ops::Device::kCpu, bytes.size());
  }
}

constexpr char kParamPrefix[] = "param.";

}  // namespace

absl::StatusOr<std::unique_ptr<ModelReplica>> ModelReplica::Create(const gyre::v1::RunConfig& config,
                                                                   ops::Device device) {
  if (device != ops::Device::kCpu && device != ops::Device::kCuda) {
    return absl::InvalidArgumentError("a replica runs on the CPU or on CUDA");
  }
  if (device == ops::Device::kCuda && GpuRuntimeOrNull() == nullptr) {
    return absl::FailedPreconditionError("CUDA replica: this binary was built without the GPU runtime "
                                         "(build with --config=cuda)");
  }
  ASSIGN_OR_RETURN(ops::ModelSpec spec, ops::ResolveModelConfig(config.model()));
  spec.deterministic = config.train().deterministic();
  ASSIGN_OR_RETURN(ops::TrainOptions options, ops::TrainOptionsFromConfig(config.optimizer(), config.schedule()));
  ASSIGN_OR_RETURN(std::unique_ptr<ops::LanguageModel> model,
                   ops::LanguageModel::Create(spec, ops::DType::kF32, device, config.seed()));
  auto replica = std::unique_ptr<ModelReplica>(
      new ModelReplica(std::move(model), options, device, static_cast<int64_t>(config.train().micro_batch())));
  ASSIGN_OR_RETURN(replica->flops_, ops::CountTrainingFlops(spec, std::max<int64_t>(1, config.data().seq_len())));
  if (device == ops::Device::kCuda && replica->SyncFor(kBucketBytes) == nullptr) return replica->grad_sync_status_;
  return replica;
}

ModelReplica::ModelReplica(std::unique_ptr<ops::LanguageModel> model, ops::TrainOptions options, ops::Device device,
                           int64_t micro_batch)
    : model_(std::move(model)),
      trainer_(std::make_unique<ops::Trainer>(model_.get(), options)),
      device_(device),
      micro_batch_(micro_batch) {
  model_->grad_ready_hook = [this](const std::string& group) { OnGradReady(group); };
}

DeviceGradSync* ModelReplica::SyncFor(size_t bucket_bytes) {
  if (!grad_sync_ || grad_sync_bucket_bytes_ != bucket_bytes) {
    grad_sync_.reset();
    absl::StatusOr<std::unique_ptr<DeviceGradSync>> sync =
        GpuRuntimeOrNull()->NewGradSync(&model_->params(), bucket_bytes);
    grad_sync_status_ = sync.status();
    if (!sync.ok()) return nullptr;
    grad_sync_ = std::move(*sync);
    grad_sync_bucket_bytes_ = bucket_bytes;
  }
  return grad_sync_.get();
}

void ModelReplica::OnGradReady(const std::string& group) {
  if (group.empty()) {
    backward_start_micros_ = clock_->NowMicros();
    if (grad_sync_) grad_sync_->BackwardStart();
    return;
  }
  // Earlier micro-batches leave partial sums: nothing may be reduced before the last one.
  if (!in_last_micro_batch_) return;
  if (grad_sync_) grad_sync_->GroupReady(group);
  if (reducer_ && reducer_->active()) reducer_->GroupReady(group);
}

GradientReducer* ModelReplica::ReducerFor(size_t bucket_bytes) {
  if (!reducer_ || reducer_bucket_bytes_ != bucket_bytes) {
    reducer_ = std::make_unique<GradientReducer>(model_->params().All(), bucket_bytes);
    reducer_bucket_bytes_ = bucket_bytes;
  }
  return reducer_.get();
}

void ModelReplica::BeginOverlappedReduce(Collective* collective, size_t bucket_bytes) {
  if (on_cuda()) {
    if (DeviceGradSync* sync = SyncFor(bucket_bytes)) sync->Begin(collective);
    return;
  }
  ReducerFor(bucket_bytes)->Begin(collective);
}

ReplicaLoss ModelReplica::ComputeGradients(std::span<const int32_t> tokens, int64_t batch, int64_t seq,
                                           uint64_t global_tokens) {
  ReplicaLoss out;
  pass_times_ = PassTimes();
  if (batch == 0) {
    if (grad_sync_) grad_sync_->PassStart(/*first_pass=*/true);
    model_->params().ZeroGrad();
    return out;
  }
  // Every micro-batch is scaled by the global token count, so accumulating the passes' gradients
  // gives the step's gradient. Host times: each pass's forward/backward split is summed (the
  // hook's "" call marks it; on CUDA the device events of every pass replace them later).
  const int64_t rows = micro_batch_ > 0 ? std::min(micro_batch_, batch) : batch;
  // No memset of the whole buffer: the first micro-batch's writers overwrite, the later ones add
  // (ops/module.h, deferred zeroing).
  model_->params().DeferZeroGrad();
  for (int64_t r0 = 0; r0 < batch; r0 += rows) {
    const int64_t n = std::min(rows, batch - r0);
    in_last_micro_batch_ = r0 + n == batch;
    if (grad_sync_) grad_sync_->PassStart(/*first_pass=*/r0 == 0);
    const int64_t start = clock_->NowMicros();
    backward_start_micros_ = 0;
    ops::LossResult r = model_->ForwardBackward(tokens.subspan(static_cast<size_t>(r0 * (seq + 1)),
                                                               static_cast<size_t>(n * (seq + 1))),
                                                n, seq, 1.0 / static_cast<double>(global_tokens));
    const int64_t end = clock_->NowMicros();
    const int64_t split = backward_start_micros_ != 0 ? backward_start_micros_ : end;
    pass_times_.forward_ms += (split - start) / 1e3;
    pass_times_.backward_ms += (end - split) / 1e3;
    out.loss += r.loss;
    out.tokens += static_cast<double>(r.tokens);
  }
  in_last_micro_batch_ = true;
  return out;
}

absl::Status ModelReplica::ReduceGradients(Collective* collective, ReplicaLoss* loss, size_t bucket_bytes) {
  // Buckets in reverse parameter order: the order backward finishes them (DDP's choice).
  if (on_cuda()) {
    if (!collective->device_buffers()) {
      return absl::InvalidArgumentError("a CUDA replica needs a collective over device memory (NCCL)");
    }
    DeviceGradSync* sync = grad_sync_ ? grad_sync_.get() : SyncFor(bucket_bytes);
    if (sync == nullptr) return grad_sync_status_;
    RETURN_IF_ERROR(sync->Finish(collective));
    const DeviceStepTimes t = sync->LastTimes();
    pass_times_.forward_ms = t.forward_ms;
    pass_times_.backward_ms = t.backward_ms;
    pass_times_.exposed_comm_ms = t.exposed_comm_ms;
    pass_times_.comm_ms = t.comm_ms;
  } else {
    GradientReducer* reducer = ReducerFor(bucket_bytes);
    if (reducer->active()) {
      RETURN_IF_ERROR(reducer->Finish());
    } else {
      RETURN_IF_ERROR(reducer->Reduce(collective));
    }
  }
  double totals[2] = {loss->loss, loss->tokens};
  RETURN_IF_ERROR(AllReduceHost(collective, totals, 2));
  loss->loss = totals[0];
  loss->tokens = totals[1];
  return absl::OkStatus();
}

absl::StatusOr<ops::UpdateStats> ModelReplica::ApplyUpdate(uint64_t step) {
  if (partially_restored_) {
    return absl::FailedPreconditionError("the replica holds a partially restored checkpoint: no update on it");
  }
  // A rejected update (non-finite norm) changes nothing; a failed one may have changed some tensors.
  absl::StatusOr<ops::UpdateStats> stats = trainer_->ApplyUpdate(step);
  if (!absl::IsDataLoss(stats.status())) at_initial_state_ = false;
  return stats;
}

void ModelReplica::DropGradients() { model_->params().ZeroGrad(); }

double ModelReplica::GradNorm() {
  // CUDA: one pass over the flat gradient buffer (its padding is zero).
  if (on_cuda()) return std::sqrt(ops::SumSquares(model_->params().FlatGrad()));
  return ops::GlobalGradNorm(&model_->params());
}

absl::Status ModelReplica::AllReduceHost(Collective* collective, double* data, size_t count) {
  if (!collective->device_buffers()) return collective->AllReduceSum(data, count);
  ops::Tensor host = ops::Tensor::Empty({static_cast<int64_t>(count)}, ops::DType::kF64, ops::Device::kCpu);
  std::memcpy(host.raw(), data, count * sizeof(double));
  ops::Tensor device = host.ToDevice(ops::Device::kCuda);  // synchronises the compute stream
  RETURN_IF_ERROR(collective->AllReduceSum(device.data<double>(), count));
  host.CopyFrom(device);
  std::memcpy(data, host.raw(), count * sizeof(double));
  return absl::OkStatus();
}

absl::Status ModelReplica::BroadcastTensor(Collective* collective, ops::Tensor* t, int root) {
  const bool staged = collective->device_buffers() != (t->device() == ops::Device::kCuda);
  if (!staged) return collective->Broadcast(t->raw(), t->nbytes(), root);
  ops::Tensor other = t->ToDevice(collective->device_buffers() ? ops::Device::kCuda : ops::Device::kCpu);
  RETURN_IF_ERROR(collective->Broadcast(other.raw(), other.nbytes(), root));
  t->CopyFrom(other);
  return absl::OkStatus();
}

absl::Status ModelReplica::BroadcastState(Collective* collective, int root) {
  if (collective->rank() == root && partially_restored_) {
    return absl::FailedPreconditionError("the replica holds a partially restored checkpoint: it cannot be the state source");
  }
  at_initial_state_ = false;
  // A receiver holds a mix until every tensor has arrived.
  if (collective->rank() != root) partially_restored_ = true;
  // The root's last update must have landed before NCCL (another stream) reads its buffers.
  if (on_cuda()) ops::Cuda().Synchronize();
  for (ops::Parameter* p : model_->params().All()) RETURN_IF_ERROR(BroadcastTensor(collective, &p->value, root));
  // The optimizer's tensors: m and v share storage with the optimizer, "adam.step" is a copy;
  // LoadState afterwards installs all of them (including the step count) consistently.
  std::vector<ops::NamedTensor> state = trainer_->optimizer().State();
  for (ops::NamedTensor& t : state) RETURN_IF_ERROR(BroadcastTensor(collective, &t.tensor, root));
  RETURN_IF_ERROR(trainer_->optimizer().LoadState(state));
  model_->params().SyncCompute();  // the bf16 copies the kernels read (no-op on the CPU)
  partially_restored_ = false;
  return absl::OkStatus();
}

namespace {
constexpr size_t kSnapshotAlign = 256;  // each tensor's slot in the staging buffer
size_t SlotBytes(size_t n) { return (n + kSnapshotAlign - 1) / kSnapshotAlign * kSnapshotAlign; }
size_t StagingBytes(const std::vector<ops::NamedTensor>& tensors) {
  size_t total = 0;
  for (const ops::NamedTensor& t : tensors) total += SlotBytes(t.tensor.nbytes());
  return total;
}
}  // namespace

std::vector<ops::NamedTensor> ModelReplica::SnapshotTensors() const {
  std::vector<ops::NamedTensor> tensors;
  for (ops::Parameter* p : model_->params().All()) tensors.push_back({kParamPrefix + p->name, p->value});
  for (ops::NamedTensor& t : trainer_->optimizer().State()) tensors.push_back(std::move(t));
  return tensors;
}

size_t ModelReplica::SnapshotBytes() const { return StagingBytes(SnapshotTensors()); }

absl::StatusOr<std::vector<TensorSnapshot>> ModelReplica::Snapshot(SnapshotStaging* staging) const {
  // The training thread waits only for the device-to-host copies into the staging buffer (pinned:
  // link speed); the writer thread reads the buffer while training goes on.
  if (partially_restored_) {
    return absl::FailedPreconditionError("the replica holds a partially restored checkpoint: no snapshot of it");
  }
  const std::vector<ops::NamedTensor> tensors = SnapshotTensors();
  const size_t total = StagingBytes(tensors);
  const std::shared_ptr<void> buffer = staging->Acquire(total);
  if (buffer == nullptr) {
    return absl::ResourceExhaustedError(absl::StrCat("checkpoint snapshot: cannot allocate ", total, " bytes of host memory"));
  }
  char* base = static_cast<char*>(buffer.get());
  std::vector<TensorSnapshot> out;
  size_t offset = 0;
  for (const ops::NamedTensor& t : tensors) {
    TensorSnapshot s;
    s.name = t.name;
    s.dtype = ToProtoDType(t.tensor.dtype());
    for (int64_t d : t.tensor.shape()) s.shape.push_back(static_cast<uint64_t>(d));
    const size_t n = t.tensor.nbytes();
    if (n > 0) {
      if (t.tensor.device() == ops::Device::kCuda) {
        ops::Cuda().CopyBytes(base + offset, ops::Device::kCpu, t.tensor.raw(), ops::Device::kCuda, n);
      } else {
        std::memcpy(base + offset, t.tensor.raw(), n);
      }
    }
    s.staging = buffer;
    s.staged = base + offset;
    s.staged_size = n;
    out.push_back(std::move(s));
    offset += SlotBytes(n);
  }
  return out;
}

absl::StatusOr<ModelReplica::RestoreStats> ModelReplica::RestoreFrom(Env* env, Clock* clock, const std::string& dir,
                                                                     uint64_t expected_step,
                                                                     CheckpointStreamOptions options) {
  ASSIGN_OR_RETURN(const gyre::v1::CheckpointManifest manifest, ReadCheckpointManifest(env, dir));
  if (manifest.step() != expected_step) {
    return absl::DataLossError(absl::StrCat("checkpoint ", dir, " holds step ", manifest.step(), ", expected step ",
                                            expected_step));
  }
  // Where each manifest tensor goes (null: a tensor this replica does not have, skipped), all
  // checked before the first byte is written.
  std::map<std::string, int> by_name;
  for (int i = 0; i < manifest.tensors_size(); ++i) by_name[manifest.tensors(i).name()] = i;
  std::vector<ops::Tensor*> destination(manifest.tensors_size(), nullptr);
  std::vector<ops::NamedTensor> state = trainer_->optimizer().State();
  auto route = [&](const std::string& name, ops::Tensor* t, const char* what) -> absl::Status {
    auto it = by_name.find(name);
    if (it == by_name.end()) return absl::DataLossError(absl::StrCat("checkpoint ", dir, " lacks ", what, " ", name));
    const gyre::v1::TensorEntry& e = manifest.tensors(it->second);
    RETURN_IF_ERROR(CheckFits(e.name(), e.bytes(), e.dtype(), *t));
    destination[it->second] = t;
    return absl::OkStatus();
  };
  for (ops::Parameter* p : model_->params().All()) RETURN_IF_ERROR(route(kParamPrefix + p->name, &p->value, "parameter"));
  for (ops::NamedTensor& t : state) RETURN_IF_ERROR(route(t.name, &t.tensor, "optimizer tensor"));

  RestoreStats stats;
  if (!options.allocate) {
    const bool pinned = on_cuda();
    options.allocate = [pinned, clock, &stats](size_t bytes) {
      const int64_t t0 = clock->NowMicros();
      std::shared_ptr<void> p = AllocateHostBuffer(bytes, pinned);
      stats.alloc_s += (clock->NowMicros() - t0) / 1e6;
      return p;
    };
  }
  // From the first byte written until the last one, the replica is a mix of old and new state.
  bool writing = false;
  absl::StatusOr<CheckpointStreamStats> streamed = StreamCheckpoint(
      env, clock, dir, manifest, options, [&](int tensor, uint64_t offset, std::string_view bytes) -> absl::Status {
        ops::Tensor* t = destination[tensor];
        if (t == nullptr) return absl::OkStatus();
        if (!writing) {
          writing = true;
          partially_restored_ = true;
          at_initial_state_ = false;
        }
        CopyInto(bytes, t, offset);
        return absl::OkStatus();
      });
  if (!streamed.ok()) return streamed.status();
  stats.stream = *streamed;
  const int64_t t0 = clock->NowMicros();
  at_initial_state_ = false;
  RETURN_IF_ERROR(trainer_->optimizer().LoadState(state));
  model_->params().SyncCompute();
  stats.finish_s = (clock->NowMicros() - t0) / 1e6;
  partially_restored_ = false;
  return stats;
}

uint64_t ModelReplica::ParameterFingerprint() const {
  XXH64_state_t* state = XXH64_createState();
  XXH64_reset(state, 0);
  for (ops::Parameter* p : model_->params().All()) {
    if (p->value.device() == ops::Device::kCpu) {
      XXH64_update(state, p->value.raw(), p->value.nbytes());
    } else {
      const ops::Tensor host = p->value.ToDevice(ops::Device::kCpu);
      XXH64_update(state, host.raw(), host.nbytes());
    }
  }
  uint64_t h = XXH64_digest(state);
  XXH64_freeState(state);
  return h;
}

}  // namespace gyre
