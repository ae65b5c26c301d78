#include "worker/coordinator_store.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace gyre {

absl::Status CoordinatorStore::Set(const std::string& key, const std::string& value) {
  gyre::v1::StoreSetRequest request;
  request.set_session(session_);
  request.set_key(key);
  request.set_value(value);
  return client_->StoreSet(request);
}

absl::StatusOr<std::string> CoordinatorStore::Get(const std::string& key, int64_t timeout_ms) {
  gyre::v1::StoreGetRequest request;
  request.set_session(session_);
  request.set_key(key);
  const int64_t deadline = clock_->NowMicros() + timeout_ms * 1000;
  int64_t backoff_us = 1000;
  while (true) {
    absl::StatusOr<gyre::v1::StoreGetResponse> response = client_->StoreGet(request);
    if (!response.ok()) return response.status();
    if (response->found()) return response->value();
    if (clock_->NowMicros() >= deadline) {
      return absl::DeadlineExceededError(
          absl::StrCat("rendezvous key '", key, "' not set within ", timeout_ms, " ms (coordinator store)"));
    }
    clock_->SleepMicros(backoff_us);
    backoff_us = std::min<int64_t>(backoff_us * 2, 50000);
  }
}

}  // namespace gyre
