#include "coordinator/kv_store.h"

#include "absl/strings/str_cat.h"

namespace gyre::coordinator {

absl::Status RendezvousKv::Set(const std::string& key, const std::string& value) {
  if (key.empty()) return absl::InvalidArgumentError("StoreSetRequest.key is required");
  if (value.size() > options_.max_value_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("StoreSetRequest.value of key '", key, "' has ", value.size(),
                                                   " bytes; at most ", options_.max_value_bytes));
  }
  absl::MutexLock lock(&mu_);
  auto [it, inserted] = values_.emplace(key, value);
  if (!inserted) {
    if (it->second != value) {
      return absl::FailedPreconditionError(absl::StrCat("rendezvous key '", key, "' already set to a different value"));
    }
    return absl::OkStatus();
  }
  order_.push_back(key);
  while (order_.size() > options_.max_entries) {
    values_.erase(order_.front());
    order_.pop_front();
  }
  return absl::OkStatus();
}

std::optional<std::string> RendezvousKv::Get(const std::string& key) const {
  absl::MutexLock lock(&mu_);
  auto it = values_.find(key);
  if (it == values_.end()) return std::nullopt;
  return it->second;
}

size_t RendezvousKv::size() const {
  absl::MutexLock lock(&mu_);
  return values_.size();
}

}  // namespace gyre::coordinator
