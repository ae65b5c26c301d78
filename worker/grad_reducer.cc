#include "worker/grad_reducer.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/match.h"

namespace gyre {

GradientReducer::GradientReducer(std::vector<ops::Parameter*> params, size_t bucket_bytes)
    : params_(std::move(params)) {
  // The first bucket is small (DDP's choice): it goes out as soon as the last layers' gradients
  // are final instead of waiting for bucket_bytes of them.
  const size_t first_floats = std::max<size_t>(std::min(bucket_bytes, kFirstBucketBytes) / sizeof(float), 1);
  const size_t bucket_floats = std::max<size_t>(bucket_bytes / sizeof(float), 1);
  bucket_of_.resize(params_.size());
  size_t i = params_.size();
  while (i > 0) {
    Bucket b;
    b.end = i;
    const size_t cap = buckets_.empty() ? first_floats : bucket_floats;
    while (i > 0 && (b.floats == 0 || b.floats + params_[i - 1]->grad.numel() <= cap)) {
      b.floats += params_[--i]->grad.numel();
    }
    b.first = i;
    for (size_t p = b.first; p < b.end; ++p) bucket_of_[p] = buckets_.size();
    buckets_.push_back(b);
  }
  thread_ = std::thread([this] { CommLoop(); });
}

GradientReducer::~GradientReducer() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

absl::Status GradientReducer::ReduceBucket(Collective* collective, size_t bucket, std::vector<float>* buffer) {
  const Bucket& b = buckets_[bucket];
  buffer->resize(b.floats);
  size_t offset = 0;
  for (size_t p = b.first; p < b.end; ++p) {
    const ops::Tensor& g = params_[p]->grad;
    std::memcpy(buffer->data() + offset, g.data<float>(), g.nbytes());
    offset += g.numel();
  }
  if (absl::Status s = collective->AllReduceSum(buffer->data(), buffer->size()); !s.ok()) return s;
  offset = 0;
  for (size_t p = b.first; p < b.end; ++p) {
    ops::Tensor& g = params_[p]->grad;
    std::memcpy(g.data<float>(), buffer->data() + offset, g.nbytes());
    offset += g.numel();
  }
  return absl::OkStatus();
}

absl::Status GradientReducer::Reduce(Collective* collective) {
  for (size_t b = 0; b < buckets_.size(); ++b) {
    if (absl::Status s = ReduceBucket(collective, b, &buffer_); !s.ok()) return s;
  }
  return absl::OkStatus();
}

void GradientReducer::Begin(Collective* collective) {
  if (active_) Finish().IgnoreError();  // an abandoned step: drain it before reusing the buffers
  active_ = true;
  next_launch_ = 0;
  ready_.assign(params_.size(), false);
  missing_.assign(buckets_.size(), 0);
  for (const Bucket& b : buckets_) missing_[&b - buckets_.data()] = b.end - b.first;
  std::lock_guard<std::mutex> lock(mu_);
  collective_ = collective;
  queue_.clear();
  done_ = 0;
  status_ = absl::OkStatus();
}

void GradientReducer::GroupReady(const std::string& prefix) {
  if (!active_ || prefix.empty()) return;
  const std::string dotted = prefix + ".";
  for (size_t p = 0; p < params_.size(); ++p) {
    if (ready_[p] || !absl::StartsWith(params_[p]->name, dotted)) continue;
    ready_[p] = true;
    --missing_[bucket_of_[p]];
  }
  LaunchReadyBuckets();
}

void GradientReducer::LaunchReadyBuckets() {
  // In bucket order only: every rank issues the same collectives in the same order.
  while (next_launch_ < buckets_.size() && missing_[next_launch_] == 0) Enqueue(next_launch_++);
}

void GradientReducer::Enqueue(size_t bucket) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    queue_.push_back(bucket);
  }
  cv_.notify_all();
}

absl::Status GradientReducer::Finish() {
  if (!active_) return absl::FailedPreconditionError("GradientReducer::Finish without Begin");
  // Parameters no group named (or a rank that ran no backward): reduce them now.
  while (next_launch_ < buckets_.size()) Enqueue(next_launch_++);
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [&] { return done_ == buckets_.size(); });
  active_ = false;
  collective_ = nullptr;  // the communication thread is idle: every bucket is done
  return status_;
}

void GradientReducer::CommLoop() {
  while (true) {
    size_t bucket = 0;
    Collective* collective = nullptr;
    bool skip = false;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping with nothing left
      bucket = queue_.front();
      queue_.pop_front();
      collective = collective_;
      skip = !status_.ok();
    }
    absl::Status s = skip ? absl::OkStatus() : ReduceBucket(collective, bucket, &comm_buffer_);
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!s.ok() && status_.ok()) status_ = s;
      ++done_;
    }
    cv_.notify_all();
  }
}

}  // namespace gyre
