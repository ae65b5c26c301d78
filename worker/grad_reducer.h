// GradientReducer: the SUM all-reduce of a replica's gradients in buckets (DESIGN.md section 4),
// either all after backward (Reduce) or overlapped with backward (Begin / GroupReady / Finish):
// a bucket is launched on a communication thread as soon as backward has finalized every gradient
// in it, so its transfer hides under the rest of backward (PyTorch DDP's reducer, by hand).
//
// Buckets are fixed once: parameters in reverse creation order (the order backward finishes them),
// the first bucket at most kFirstBucketBytes, the others at most `bucket_bytes` (a larger tensor
// gets one of its own). Every rank builds the
// same buckets from the same model and launches them in bucket order, whatever order its groups
// became ready in, so the collective calls match across ranks. Gradients of a launched bucket are
// not touched by backward again (they are final), so copying them on the other thread is safe.
//
// Thread-safety: Begin / GroupReady / Finish / Reduce from one thread (the training loop); the
// communication thread is internal. The collective is used only by that thread between Begin and
// the end of Finish.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "ops/module.h"
#include "worker/collective.h"

namespace gyre {

class GradientReducer {
 public:
  // `params` (not owned) in creation order; they outlive the reducer.
  GradientReducer(std::vector<ops::Parameter*> params, size_t bucket_bytes);
  static constexpr size_t kFirstBucketBytes = size_t{1} << 20;
  ~GradientReducer();  // waits for the bucket in flight, joins the thread

  size_t num_buckets() const { return buckets_.size(); }

  // All buckets after backward, on the calling thread.
  absl::Status Reduce(Collective* collective);

  // Overlapped: Begin before backward; GroupReady(prefix) each time backward finalizes the
  // gradients of the parameters named "<prefix>.*" (ops::LanguageModel::grad_ready_hook);
  // Finish launches what is left, waits for every bucket and returns the first error (after an
  // error the remaining buckets are skipped; the gradients are then undefined).
  void Begin(Collective* collective);
  void GroupReady(const std::string& prefix);
  absl::Status Finish();
  bool active() const { return active_; }

 private:
  struct Bucket {
    size_t first = 0, end = 0;  // parameter indices [first, end) (creation order)
    size_t floats = 0;
  };
  void LaunchReadyBuckets();
  void Enqueue(size_t bucket);
  absl::Status ReduceBucket(Collective* collective, size_t bucket, std::vector<float>* buffer);
  void CommLoop();

  std::vector<ops::Parameter*> params_;
  std::vector<Bucket> buckets_;      // in launch order (reverse parameter order)
  std::vector<size_t> bucket_of_;    // parameter index -> bucket
  std::vector<size_t> missing_;      // per bucket: parameters not final yet
  std::vector<bool> ready_;          // per parameter
  std::vector<float> buffer_;        // Reduce's staging buffer
  size_t next_launch_ = 0;
  bool active_ = false;

  std::mutex mu_;
  Collective* collective_ = nullptr;  // guarded by mu_
  std::condition_variable cv_;
  std::deque<size_t> queue_;         // guarded by mu_
  size_t done_ = 0;                  // buckets finished this step; guarded by mu_
  absl::Status status_;              // first error this step; guarded by mu_
  bool stop_ = false;                // guarded by mu_
  std::vector<float> comm_buffer_;   // the communication thread's staging buffer
  std::thread thread_;
};

}  // namespace gyre
