// BucketPlan: gradient buckets as ranges of a FLAT gradient buffer (the CUDA model's
// ParamStore::FlatGrad: every gradient in creation order, each padded), and the bookkeeping of
// which buckets backward has finalized. The GPU reducer all-reduces bucket b as the byte range
// [offset, offset + count) floats of the flat buffer as soon as PopReady returns it.
//
// Buckets are built like GradientReducer's (DDP's rule): parameters in reverse creation order,
// the first bucket at most `first_bucket_bytes`, the others at most `bucket_bytes` (a larger
// parameter gets a bucket of its own). A bucket's range runs from its first parameter's offset to
// the next parameter's offset (the end of the buffer for the last), so padding travels with it
// and the buckets tile the buffer exactly. Launch order = bucket order on every rank, whatever
// order groups became ready in, so the collective calls match across ranks.
//
// Pure bookkeeping (no CUDA): unit-tested on the CPU. Not thread-safe.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace gyre {

struct FlatParam {
  std::string name;    // "blocks.3.attn.q_proj.weight"
  size_t offset = 0;   // in floats, into the flat buffer
  size_t count = 0;    // elements (without padding)
};

struct FlatBucket {
  size_t first = 0, end = 0;     // parameter indices [first, end), creation order
  size_t offset = 0, count = 0;  // floats of the flat buffer
};

class BucketPlan {
 public:
  // `params` in creation order with increasing offsets; `total` = the flat buffer's length.
  static absl::StatusOr<BucketPlan> Create(std::vector<FlatParam> params, size_t total, size_t bucket_bytes,
                                           size_t first_bucket_bytes);

  const std::vector<FlatBucket>& buckets() const { return buckets_; }
  // Starts a step: nothing ready, nothing launched.
  void Reset();
  // Marks every parameter named "<prefix>.*" final; returns the buckets that may go out now, in
  // launch order (each at most once per step).
  std::vector<size_t> GroupReady(const std::string& prefix);
  // Every bucket not returned yet this step (backward is over), in launch order.
  std::vector<size_t> TakeRest();
  size_t launched() const { return next_launch_; }

 private:
  std::vector<size_t> PopReady();

  std::vector<FlatParam> params_;
  std::vector<FlatBucket> buckets_;  // launch order (reverse parameter order)
  std::vector<size_t> bucket_of_;
  std::vector<size_t> missing_;
  std::vector<bool> ready_;
  size_t next_launch_ = 0;
};

}  // namespace gyre
