// The CUDA + NCCL implementation of worker/gpu_runtime.h, registered at static initialisation
// (alwayslink; GPU builds only).
#include <cuda_runtime.h>

#include <algorithm>
#include <string>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "ops/cuda_backend.h"
#include "worker/bucket_plan.h"
#include "worker/gpu_peak.h"
#include "worker/gpu_runtime.h"
#include "worker/grad_reducer.h"
#include "worker/nccl_collective.h"

namespace gyre {
namespace {

absl::Status CudaStatus(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, ": ", cudaGetErrorString(e)));
}

float ElapsedMs(cudaEvent_t from, cudaEvent_t to) {
  float ms = 0;
  if (cudaEventElapsedTime(&ms, from, to) != cudaSuccess) {
    cudaGetLastError();  // an event never recorded this step: report 0
    return 0;
  }
  return ms;
}

class NcclGradSync final : public DeviceGradSync {
 public:
  NcclGradSync(BucketPlan plan, float* flat_grad, cudaStream_t compute)
      : plan_(std::move(plan)), flat_grad_(flat_grad), compute_(compute) {
    ready_.resize(plan_.buckets().size());
    for (cudaEvent_t& e : ready_) cudaEventCreateWithFlags(&e, cudaEventDisableTiming);
    for (cudaEvent_t* e : {&backward_end_, &comm_start_, &comm_end_}) cudaEventCreate(e);
  }
  ~NcclGradSync() override {
    for (cudaEvent_t e : ready_) cudaEventDestroy(e);
    for (PassEvents& p : passes_) {
      cudaEventDestroy(p.start);
      cudaEventDestroy(p.backward_start);
    }
    for (cudaEvent_t e : {backward_end_, comm_start_, comm_end_}) cudaEventDestroy(e);
  }

  size_t num_buckets() const override { return plan_.buckets().size(); }

  // One pair of events per micro-batch pass, created on first use and reused by later steps.
  void PassStart(bool first_pass) override {
    if (first_pass) num_passes_ = 0;
    if (num_passes_ == passes_.size()) {
      PassEvents p;
      cudaEventCreate(&p.start);
      cudaEventCreate(&p.backward_start);
      passes_.push_back(p);
    }
    PassEvents& p = passes_[num_passes_++];
    p.backward_started = false;
    cudaEventRecord(p.start, compute_);
  }
  void BackwardStart() override {
    if (num_passes_ == 0) return;
    PassEvents& p = passes_[num_passes_ - 1];
    cudaEventRecord(p.backward_start, compute_);
    p.backward_started = true;
  }

  void Begin(Collective* collective) override {
    plan_.Reset();
    nccl_ = dynamic_cast<NcclCollective*>(collective);
    status_ = nccl_ != nullptr ? absl::OkStatus()
                               : absl::InvalidArgumentError("GPU gradient sync needs an NCCL collective");
    launched_any_ = false;
    active_ = true;
  }

  void GroupReady(const std::string& prefix) override {
    if (!active_) return;
    for (size_t b : plan_.GroupReady(prefix)) Launch(b);
  }

  absl::Status Finish(Collective* collective) override {
    if (!active_) Begin(collective);
    if (nccl_ != collective) {
      active_ = false;
      return absl::InvalidArgumentError("GPU gradient sync: Finish with another collective than Begin");
    }
    cudaEventRecord(backward_end_, compute_);
    for (size_t b : plan_.TakeRest()) Launch(b);
    active_ = false;
    if (!status_.ok()) return status_;
    if (absl::Status s = CudaStatus(cudaEventRecord(comm_end_, nccl_->stream()), "cudaEventRecord"); !s.ok()) return s;
    // The optimizer (and the loss reduction) run after this: the host waits for every bucket,
    // polling the NCCL error state against the deadline (never a stream synchronisation).
    if (absl::Status s = nccl_->Wait(); !s.ok()) return s;
    cudaEventSynchronize(backward_end_);
    times_ = DeviceStepTimes();
    // A pass ends where the next one starts (the last one at backward_end_); a pass whose hook
    // never fired counts as forward only.
    for (size_t i = 0; i < num_passes_; ++i) {
      const PassEvents& p = passes_[i];
      cudaEvent_t end = i + 1 < num_passes_ ? passes_[i + 1].start : backward_end_;
      if (p.backward_started) {
        times_.forward_ms += ElapsedMs(p.start, p.backward_start);
        times_.backward_ms += ElapsedMs(p.backward_start, end);
      } else {
        times_.forward_ms += ElapsedMs(p.start, end);
      }
    }
    times_.exposed_comm_ms = std::max(0.f, ElapsedMs(backward_end_, comm_end_));
    times_.comm_ms = launched_any_ ? std::max(0.f, ElapsedMs(comm_start_, comm_end_)) : 0;
    return absl::OkStatus();
  }

  DeviceStepTimes LastTimes() override { return times_; }

 private:
  void Launch(size_t bucket) {
    if (!status_.ok()) return;  // after an error the remaining buckets are skipped
    const FlatBucket& b = plan_.buckets()[bucket];
    // Completion, not enqueue: the NCCL stream waits for the compute stream's work up to now.
    status_ = CudaStatus(cudaEventRecord(ready_[bucket], compute_), "cudaEventRecord");
    if (status_.ok()) status_ = CudaStatus(cudaStreamWaitEvent(nccl_->stream(), ready_[bucket], 0), "cudaStreamWaitEvent");
    if (status_.ok() && !launched_any_) {
      status_ = CudaStatus(cudaEventRecord(comm_start_, nccl_->stream()), "cudaEventRecord");
      launched_any_ = true;
    }
    if (status_.ok()) status_ = nccl_->AllReduceSumAsync(flat_grad_ + b.offset, b.count, nullptr);
  }

  BucketPlan plan_;
  float* flat_grad_;
  cudaStream_t compute_;
  std::vector<cudaEvent_t> ready_;
  struct PassEvents {
    cudaEvent_t start = nullptr, backward_start = nullptr;
    bool backward_started = false;
  };
  std::vector<PassEvents> passes_;
  size_t num_passes_ = 0;
  cudaEvent_t backward_end_ = nullptr, comm_start_ = nullptr, comm_end_ = nullptr;
  NcclCollective* nccl_ = nullptr;
  absl::Status status_;
  bool active_ = false, launched_any_ = false;
  DeviceStepTimes times_;
};

class CudaGpuRuntime final : public GpuRuntime {
 public:
  int DeviceCount() override {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
      cudaGetLastError();
      return 0;
    }
    return n;
  }

  double PeakFlops() override {
    int device = 0;
    cudaDeviceProp prop;
    if (cudaGetDevice(&device) != cudaSuccess || cudaGetDeviceProperties(&prop, device) != cudaSuccess) {
      cudaGetLastError();
      return 0;
    }
    return PeakDenseBf16Flops(prop.name);
  }

  absl::StatusOr<std::unique_ptr<Collective>> Connect(RendezvousStore* store, const std::string& key,
                                                      uint64_t generation, int rank, int world_size,
                                                      int64_t timeout_ms) override {
    std::string id;
    if (rank == 0) {
      // Rank 0 hosts NCCL's bootstrap root for this generation (a fresh id every time).
      absl::StatusOr<std::string> fresh = NcclCollective::NewUniqueId();
      if (!fresh.ok()) return fresh.status();
      id = *fresh;
      if (absl::Status s = store->Set(key, absl::BytesToHexString(id)); !s.ok()) return s;
    } else {
      absl::StatusOr<std::string> hex = store->Get(key, timeout_ms);
      if (!hex.ok()) return hex.status();
      id = absl::HexStringToBytes(*hex);
    }
    NcclOptions options;
    options.init_timeout_ms = timeout_ms;
    options.op_timeout_ms = timeout_ms;
    // Ops' CUDA backend runs on device 0 of what CUDA_VISIBLE_DEVICES shows (one GPU a worker).
    absl::StatusOr<std::unique_ptr<NcclCollective>> nccl =
        NcclCollective::Connect(id, generation, rank, world_size, /*device=*/0, options);
    if (!nccl.ok()) return nccl.status();
    return std::unique_ptr<Collective>(std::move(*nccl));
  }

  absl::StatusOr<std::unique_ptr<DeviceGradSync>> NewGradSync(ops::ParamStore* params, size_t bucket_bytes) override {
    const ops::Tensor& flat = params->FlatGrad();
    if (!flat.defined() || flat.device() != ops::Device::kCuda) {
      return absl::FailedPreconditionError("GPU gradient sync needs a CUDA model with flat gradients");
    }
    const float* base = static_cast<const float*>(flat.raw());
    std::vector<FlatParam> flat_params;
    for (ops::Parameter* p : params->All()) {
      const float* g = static_cast<const float*>(p->grad.raw());
      flat_params.push_back({p->name, static_cast<size_t>(g - base), static_cast<size_t>(p->grad.numel())});
    }
    absl::StatusOr<BucketPlan> plan = BucketPlan::Create(std::move(flat_params), static_cast<size_t>(flat.numel()),
                                                         bucket_bytes, GradientReducer::kFirstBucketBytes);
    if (!plan.ok()) return plan.status();
    auto* compute = static_cast<cudaStream_t>(ops::Cuda().ComputeStream());
    return std::unique_ptr<DeviceGradSync>(
        std::make_unique<NcclGradSync>(std::move(*plan), static_cast<float*>(flat.raw()), compute));
  }
};

const bool kRegistered = [] {
  static CudaGpuRuntime runtime;
  RegisterGpuRuntime(&runtime);
  return true;
}();

}  // namespace
}  // namespace gyre
