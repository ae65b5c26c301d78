#include "worker/bucket_plan.h"

#include <algorithm>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace gyre {

absl::StatusOr<BucketPlan> BucketPlan::Create(std::vector<FlatParam> params, size_t total, size_t bucket_bytes,
                                              size_t first_bucket_bytes) {
  if (params.empty()) return absl::InvalidArgumentError("bucket plan: no parameters");
  for (size_t i = 0; i < params.size(); ++i) {
    const size_t next = i + 1 < params.size() ? params[i + 1].offset : total;
    if (params[i].offset + params[i].count > next) {
      return absl::InvalidArgumentError(absl::StrCat("bucket plan: parameter ", params[i].name, " at offset ",
                                                     params[i].offset, " with ", params[i].count,
                                                     " elements overlaps the next one (at ", next, ")"));
    }
  }
  if (params[0].offset != 0) {
    return absl::InvalidArgumentError(absl::StrCat("bucket plan: the first parameter starts at ", params[0].offset));
  }
  BucketPlan plan;
  const size_t first_floats = std::max<size_t>(std::min(bucket_bytes, first_bucket_bytes) / sizeof(float), 1);
  const size_t bucket_floats = std::max<size_t>(bucket_bytes / sizeof(float), 1);
  plan.bucket_of_.resize(params.size());
  size_t i = params.size();
  while (i > 0) {
    FlatBucket b;
    b.end = i;
    const size_t cap = plan.buckets_.empty() ? first_floats : bucket_floats;
    size_t floats = 0;
    while (i > 0 && (floats == 0 || floats + params[i - 1].count <= cap)) floats += params[--i].count;
    b.first = i;
    b.offset = params[b.first].offset;
    const size_t stop = b.end < params.size() ? params[b.end].offset : total;
    b.count = stop - b.offset;
    for (size_t p = b.first; p < b.end; ++p) plan.bucket_of_[p] = plan.buckets_.size();
    plan.buckets_.push_back(b);
  }
  plan.params_ = std::move(params);
  plan.Reset();
  return plan;
}

void BucketPlan::Reset() {
  ready_.assign(params_.size(), false);
  missing_.clear();
  for (const FlatBucket& b : buckets_) missing_.push_back(b.end - b.first);
  next_launch_ = 0;
}

std::vector<size_t> BucketPlan::PopReady() {
  std::vector<size_t> out;
  while (next_launch_ < buckets_.size() && missing_[next_launch_] == 0) out.push_back(next_launch_++);
  return out;
}

std::vector<size_t> BucketPlan::GroupReady(const std::string& prefix) {
  if (prefix.empty()) return {};
  const std::string dotted = prefix + ".";
  for (size_t p = 0; p < params_.size(); ++p) {
    if (ready_[p] || !absl::StartsWith(params_[p].name, dotted)) continue;
    ready_[p] = true;
    --missing_[bucket_of_[p]];
  }
  return PopReady();
}

std::vector<size_t> BucketPlan::TakeRest() {
  std::vector<size_t> out;
  while (next_launch_ < buckets_.size()) out.push_back(next_launch_++);
  return out;
}

}  // namespace gyre
