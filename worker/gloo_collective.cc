#include "worker/gloo_collective.h"

#include <signal.h>

#include <chrono>
#include <exception>
#include <map>
#include <mutex>

#include "absl/strings/str_cat.h"
#include "gloo/allreduce.h"
#include "gloo/broadcast.h"
#include "gloo/common/error.h"
#include "gloo/math.h"
#include "gloo/rendezvous/context.h"
#include "gloo/rendezvous/store.h"
#include "gloo/transport/tcp/device.h"

namespace gyre {
namespace {

// Adapts RendezvousStore to Gloo's Store: generation-scoped keys, blocking get with a deadline
// (connectFullMesh calls get() without waiting first), errors thrown as Gloo expects.
class StoreAdapter final : public gloo::rendezvous::Store {
 public:
  StoreAdapter(RendezvousStore* store, std::string prefix, int64_t timeout_ms)
      : store_(store), prefix_(std::move(prefix)), timeout_ms_(timeout_ms) {}

  void set(const std::string& key, const std::vector<char>& data) override {
    absl::Status s = store_->Set(prefix_ + key, std::string(data.begin(), data.end()));
    if (!s.ok()) throw gloo::IoException(std::string(s.message()));
  }
  std::vector<char> get(const std::string& key) override {
    absl::StatusOr<std::string> v = store_->Get(prefix_ + key, timeout_ms_);
    if (!v.ok()) throw gloo::IoException(std::string(v.status().message()));
    return std::vector<char>(v->begin(), v->end());
  }
  void wait(const std::vector<std::string>& keys) override { wait(keys, std::chrono::milliseconds(timeout_ms_)); }
  void wait(const std::vector<std::string>& keys, const std::chrono::milliseconds& timeout) override {
    for (const std::string& key : keys) {
      absl::StatusOr<std::string> v = store_->Get(prefix_ + key, timeout.count());
      if (!v.ok()) throw gloo::IoException(std::string(v.status().message()));
    }
  }

 private:
  RendezvousStore* store_;
  std::string prefix_;
  int64_t timeout_ms_;
};

// One TCP device per (process, hostname): a device serves many contexts.
std::shared_ptr<gloo::transport::Device> DeviceFor(const std::string& hostname) {
  static std::mutex mu;
  static std::map<std::string, std::shared_ptr<gloo::transport::Device>>* devices =
      new std::map<std::string, std::shared_ptr<gloo::transport::Device>>();  // lives until exit
  std::lock_guard<std::mutex> lock(mu);
  auto& device = (*devices)[hostname];
  if (!device) {
    gloo::transport::tcp::attr attr;
    attr.hostname = hostname;
    device = gloo::transport::tcp::CreateDevice(attr);
  }
  return device;
}

void IgnoreSigpipeOnce() {
  static std::once_flag once;
  std::call_once(once, [] { ::signal(SIGPIPE, SIG_IGN); });
}

absl::Status FromException(const std::exception& e, std::string_view what, uint64_t generation) {
  std::string msg = absl::StrCat(std::string(what), " failed in generation ", generation, ": ", e.what());
  if (std::string(e.what()).find("imed out") != std::string::npos) return absl::DeadlineExceededError(msg);
  return absl::AbortedError(msg);
}

}  // namespace

absl::StatusOr<std::unique_ptr<GlooCollective>> GlooCollective::Connect(RendezvousStore* store, uint64_t generation,
                                                                       int rank, int world_size,
                                                                       const GlooOptions& options,
                                                                       const std::string& key_prefix) {
  if (world_size < 1 || rank < 0 || rank >= world_size) {
    return absl::InvalidArgumentError(absl::StrCat("gloo: rank ", rank, " of world ", world_size));
  }
  IgnoreSigpipeOnce();
  try {
    auto device = DeviceFor(options.hostname);
    auto context = std::make_shared<gloo::rendezvous::Context>(rank, world_size);
    context->setTimeout(std::chrono::milliseconds(options.connect_timeout_ms));
    StoreAdapter adapter(store, key_prefix.empty() ? absl::StrCat("g", generation, "/") : key_prefix,
                         options.connect_timeout_ms);
    context->connectFullMesh(adapter, device);
    context->setTimeout(std::chrono::milliseconds(options.op_timeout_ms));
    return std::unique_ptr<GlooCollective>(new GlooCollective(std::move(context), generation, rank, world_size, options));
  } catch (const gloo::IoException& e) {
    // A rendezvous key that never appeared is a missing member: a timeout, not a crash.
    std::string msg = absl::StrCat("gloo connect (rank ", rank, "/", world_size, ", generation ", generation, "): ", e.what());
    if (msg.find("not set within") != std::string::npos || msg.find("imed out") != std::string::npos) {
      return absl::DeadlineExceededError(msg);
    }
    return absl::UnavailableError(msg);
  } catch (const std::exception& e) {
    return absl::UnavailableError(absl::StrCat("gloo connect (rank ", rank, "/", world_size, ", generation ", generation, "): ", e.what()));
  }
}

GlooCollective::GlooCollective(std::shared_ptr<gloo::Context> context, uint64_t generation, int rank, int world_size,
                               const GlooOptions& options)
    : context_(std::move(context)), generation_(generation), rank_(rank), world_size_(world_size), options_(options) {}

GlooCollective::~GlooCollective() = default;

template <typename T>
absl::Status GlooCollective::AllReduceImpl(T* data, size_t count) {
  if (aborted_.load()) return absl::AbortedError(absl::StrCat("gloo: generation ", generation_, " was aborted"));
  if (world_size_ == 1 || count == 0) return absl::OkStatus();
  try {
    gloo::AllreduceOptions opts(context_);
    opts.setOutput(data, count);
    opts.setReduceFunction(static_cast<void (*)(void*, const void*, const void*, size_t)>(&gloo::sum<T>));
    opts.setTag(next_tag_++);
    opts.setTimeout(std::chrono::milliseconds(options_.op_timeout_ms));
    gloo::allreduce(opts);
    return absl::OkStatus();
  } catch (const std::exception& e) {
    aborted_.store(true);
    return FromException(e, "gloo all-reduce", generation_);
  }
}

absl::Status GlooCollective::AllReduceSum(float* data, size_t count) { return AllReduceImpl(data, count); }
absl::Status GlooCollective::AllReduceSum(double* data, size_t count) { return AllReduceImpl(data, count); }

absl::Status GlooCollective::Broadcast(void* data, size_t bytes, int root) {
  if (aborted_.load()) return absl::AbortedError(absl::StrCat("gloo: generation ", generation_, " was aborted"));
  if (root < 0 || root >= world_size_) return absl::InvalidArgumentError(absl::StrCat("gloo broadcast root ", root));
  if (world_size_ == 1 || bytes == 0) return absl::OkStatus();
  try {
    gloo::BroadcastOptions opts(context_);
    opts.setOutput(static_cast<uint8_t*>(data), bytes);
    opts.setRoot(root);
    opts.setTag(next_tag_++);
    opts.setTimeout(std::chrono::milliseconds(options_.op_timeout_ms));
    gloo::broadcast(opts);
    return absl::OkStatus();
  } catch (const std::exception& e) {
    aborted_.store(true);
    return FromException(e, "gloo broadcast", generation_);
  }
}

void GlooCollective::Abort() {
  if (aborted_.exchange(true)) return;
  try {
    context_->closeConnections();
  } catch (const std::exception&) {
    // Best effort: peers fall back on their own timeouts.
  }
}

}  // namespace gyre
