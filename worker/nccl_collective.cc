#include "worker/nccl_collective.h"

#include <chrono>
#include <cstring>
#include <thread>

#include "absl/strings/str_cat.h"

namespace gyre {
namespace {

int64_t NowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

absl::Status CudaError(cudaError_t err, const char* what) {
  return absl::InternalError(absl::StrCat(what, ": ", cudaGetErrorString(err)));
}

// Polls the communicator until it leaves ncclInProgress, or the deadline passes.
ncclResult_t PollComm(ncclComm_t comm, int64_t deadline_ms) {
  ncclResult_t state = ncclInProgress;
  while (true) {
    ncclResult_t r = ncclCommGetAsyncError(comm, &state);
    if (r != ncclSuccess) return r;
    if (state != ncclInProgress) return state;
    if (NowMs() > deadline_ms) return ncclInProgress;
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
}

}  // namespace

absl::StatusOr<std::string> NcclCollective::NewUniqueId() {
  ncclUniqueId id;
  ncclResult_t r = ncclGetUniqueId(&id);
  if (r != ncclSuccess) return absl::UnavailableError(absl::StrCat("ncclGetUniqueId: ", ncclGetErrorString(r)));
  return std::string(id.internal, sizeof(id.internal));
}

absl::StatusOr<std::unique_ptr<NcclCollective>> NcclCollective::Connect(const std::string& unique_id,
                                                                       uint64_t generation, int rank, int world_size,
                                                                       int device, const NcclOptions& options) {
  if (world_size < 1 || rank < 0 || rank >= world_size) {
    return absl::InvalidArgumentError(absl::StrCat("nccl: rank ", rank, " of world ", world_size));
  }
  ncclUniqueId id;
  if (unique_id.size() != sizeof(id.internal)) {
    return absl::InvalidArgumentError(absl::StrCat("nccl: unique id has ", unique_id.size(), " bytes, expected ", sizeof(id.internal)));
  }
  std::memcpy(id.internal, unique_id.data(), sizeof(id.internal));
  if (cudaError_t e = cudaSetDevice(device); e != cudaSuccess) return CudaError(e, "cudaSetDevice");

  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  std::string name = absl::StrCat("gyre-g", generation);
  config.commName = name.c_str();
  ncclComm_t comm = nullptr;
  ncclResult_t r = ncclCommInitRankConfig(&comm, world_size, id, rank, &config);
  if (r == ncclInProgress || r == ncclSuccess) {
    r = PollComm(comm, NowMs() + options.init_timeout_ms);
  }
  if (r != ncclSuccess) {
    if (comm != nullptr) ncclCommAbort(comm);
    std::string msg = absl::StrCat("nccl communicator init (rank ", rank, "/", world_size, ", generation ",
                                   generation, "): ", r == ncclInProgress ? "timed out" : ncclGetErrorString(r));
    return r == ncclInProgress ? absl::DeadlineExceededError(msg) : absl::UnavailableError(msg);
  }
  cudaStream_t stream = nullptr;
  cudaEvent_t done = nullptr;
  if (cudaError_t e = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking); e != cudaSuccess) {
    ncclCommAbort(comm);
    return CudaError(e, "cudaStreamCreate");
  }
  if (cudaError_t e = cudaEventCreateWithFlags(&done, cudaEventDisableTiming); e != cudaSuccess) {
    cudaStreamDestroy(stream);
    ncclCommAbort(comm);
    return CudaError(e, "cudaEventCreate");
  }
  auto collective = std::unique_ptr<NcclCollective>(
      new NcclCollective(comm, stream, done, generation, rank, world_size, device, options));
  // Warm-up: surfaces lazy-connect errors now rather than in the first gradient bucket.
  float* one = nullptr;
  if (cudaError_t e = cudaMalloc(&one, sizeof(float)); e != cudaSuccess) return CudaError(e, "cudaMalloc");
  absl::Status warm = collective->AllReduceSum(one, 1);
  cudaFree(one);
  if (!warm.ok()) return warm;
  return collective;
}

NcclCollective::NcclCollective(ncclComm_t comm, cudaStream_t stream, cudaEvent_t done, uint64_t generation, int rank,
                               int world_size, int device, const NcclOptions& options)
    : comm_(comm), stream_(stream), done_(done), generation_(generation), rank_(rank), world_size_(world_size),
      device_(device), options_(options) {}

NcclCollective::~NcclCollective() {
  std::lock_guard<std::mutex> lock(mu_);
  cudaSetDevice(device_);
  if (comm_ != nullptr) {
    if (failed_ || aborted_.load()) {
      ncclCommAbort(comm_);
    } else {
      // Healthy teardown: finalize (may be in progress on a non-blocking comm), then destroy.
      ncclResult_t r = ncclCommFinalize(comm_);
      if (r == ncclInProgress || r == ncclSuccess) r = PollComm(comm_, NowMs() + options_.op_timeout_ms);
      if (r == ncclSuccess) {
        ncclCommDestroy(comm_);
      } else {
        ncclCommAbort(comm_);
      }
    }
    comm_ = nullptr;
  }
  cudaEventDestroy(done_);
  cudaStreamDestroy(stream_);
}

absl::Status NcclCollective::AbortWith(absl::Status why) {
  failed_ = true;
  aborted_.store(true);
  if (comm_ != nullptr) {
    ncclCommAbort(comm_);
    comm_ = nullptr;
  }
  return why;
}

absl::Status NcclCollective::AwaitIssued(ncclResult_t result, const char* what) {
  if (result == ncclInProgress) result = PollComm(comm_, NowMs() + options_.op_timeout_ms);
  if (result == ncclSuccess) return absl::OkStatus();
  std::string msg = absl::StrCat(what, " (generation ", generation_, ", rank ", rank_, "): ",
                                 result == ncclInProgress ? "timed out issuing" : ncclGetErrorString(result));
  return AbortWith(result == ncclInProgress ? absl::DeadlineExceededError(msg) : absl::AbortedError(msg));
}

absl::Status NcclCollective::AllReduceSumAsync(float* data, size_t count, cudaEvent_t ready) {
  std::lock_guard<std::mutex> lock(mu_);
  if (aborted_.load() || comm_ == nullptr) {
    return absl::AbortedError(absl::StrCat("nccl: generation ", generation_, " was aborted"));
  }
  cudaSetDevice(device_);
  if (ready != nullptr) {
    if (cudaError_t e = cudaStreamWaitEvent(stream_, ready, 0); e != cudaSuccess) return CudaError(e, "cudaStreamWaitEvent");
  }
  return AwaitIssued(ncclAllReduce(data, data, count, ncclFloat32, ncclSum, comm_, stream_), "ncclAllReduce");
}

absl::Status NcclCollective::Wait() {
  std::lock_guard<std::mutex> lock(mu_);
  if (aborted_.load() || comm_ == nullptr) {
    return absl::AbortedError(absl::StrCat("nccl: generation ", generation_, " was aborted"));
  }
  cudaSetDevice(device_);
  if (cudaError_t e = cudaEventRecord(done_, stream_); e != cudaSuccess) return CudaError(e, "cudaEventRecord");
  const int64_t deadline = NowMs() + options_.op_timeout_ms;
  // Never cudaStreamSynchronize on the communication stream: a dead peer would hang it forever.
  while (true) {
    cudaError_t q = cudaEventQuery(done_);
    if (q == cudaSuccess) return absl::OkStatus();
    if (q != cudaErrorNotReady) return AbortWith(CudaError(q, "nccl wait"));
    ncclResult_t state = ncclSuccess;
    ncclCommGetAsyncError(comm_, &state);
    if (state != ncclSuccess && state != ncclInProgress) {
      return AbortWith(absl::AbortedError(absl::StrCat("nccl (generation ", generation_, ", rank ", rank_,
                                                       "): ", ncclGetErrorString(state))));
    }
    if (aborted_.load()) return AbortWith(absl::AbortedError("nccl: aborted while waiting"));
    if (NowMs() > deadline) {
      return AbortWith(absl::DeadlineExceededError(absl::StrCat("nccl (generation ", generation_, ", rank ", rank_,
                                                                "): operation did not finish within ",
                                                                options_.op_timeout_ms, " ms")));
    }
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}

absl::Status NcclCollective::AllReduceSum(float* data, size_t count) {
  if (absl::Status s = AllReduceSumAsync(data, count, nullptr); !s.ok()) return s;
  return Wait();
}

absl::Status NcclCollective::AllReduceSum(double* data, size_t count) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (aborted_.load() || comm_ == nullptr) {
      return absl::AbortedError(absl::StrCat("nccl: generation ", generation_, " was aborted"));
    }
    cudaSetDevice(device_);
    if (absl::Status s = AwaitIssued(ncclAllReduce(data, data, count, ncclFloat64, ncclSum, comm_, stream_), "ncclAllReduce");
        !s.ok()) {
      return s;
    }
  }
  return Wait();
}

absl::Status NcclCollective::Broadcast(void* data, size_t bytes, int root) {
  if (root < 0 || root >= world_size_) return absl::InvalidArgumentError(absl::StrCat("nccl broadcast root ", root));
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (aborted_.load() || comm_ == nullptr) {
      return absl::AbortedError(absl::StrCat("nccl: generation ", generation_, " was aborted"));
    }
    cudaSetDevice(device_);
    if (absl::Status s = AwaitIssued(ncclBroadcast(data, data, bytes, ncclUint8, root, comm_, stream_), "ncclBroadcast");
        !s.ok()) {
      return s;
    }
  }
  return Wait();
}

void NcclCollective::Abort() {
  // Flag first so a waiter in Wait() (which holds mu_) notices and aborts itself; if nobody is
  // waiting, abort here.
  aborted_.store(true);
  std::unique_lock<std::mutex> lock(mu_, std::try_to_lock);
  if (lock.owns_lock() && comm_ != nullptr) {
    failed_ = true;
    ncclCommAbort(comm_);
    comm_ = nullptr;
  }
}

}  // namespace gyre
