// ClusterClient: the worker's side of gyre.v1.Cluster (DESIGN.md section 4). Every call carries
// the run's bearer token and a deadline. UNAVAILABLE / DEADLINE_EXCEEDED (a coordinator that is
// restarting or briefly unreachable) are retried with capped exponential backoff for up to
// `retry_budget_ms`, so a coordinator restart costs workers nothing but the wait: they keep their
// weights and resume (every Cluster call is safe to repeat; CompleteStep repeats are answered
// from the journal). Other errors are returned at once.
//
// Thread-safety: thread-safe (the heartbeat thread and the training loop share one client).
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "base/clock.h"
#include "gyre/v1/cluster.grpc.pb.h"

namespace gyre {

struct ClusterClientOptions {
  std::string address;               // coordinator host:port
  std::string token;                 // run bearer token
  std::string tls_ca_pem;            // non-empty: TLS trusting these CA certificates
  int64_t call_deadline_ms = 10000;  // Register, Heartbeat, AcquireStep, ReportCheckpoint, Leave
  // CompleteStep waits on the server until every member reported (or the generation changed):
  // allow a collective timeout plus a heartbeat timeout.
  int64_t complete_deadline_ms = 180000;
  int64_t retry_budget_ms = 600000;  // how long to keep retrying an unreachable coordinator
  int64_t backoff_initial_ms = 100;
  // Kept under typical heartbeat timeouts, so a restarted coordinator sees its members return
  // before it declares them lost.
  int64_t backoff_max_ms = 1000;
};

class ClusterClient {
 public:
  ClusterClient(ClusterClientOptions options, Clock* clock);

  absl::StatusOr<gyre::v1::RegisterResponse> Register(const gyre::v1::RegisterRequest& request);
  absl::StatusOr<gyre::v1::HeartbeatResponse> Heartbeat(const gyre::v1::HeartbeatRequest& request);
  absl::StatusOr<gyre::v1::StepLease> AcquireStep(const gyre::v1::AcquireStepRequest& request);
  absl::StatusOr<gyre::v1::CompleteStepResponse> CompleteStep(const gyre::v1::CompleteStepRequest& request);
  absl::Status ReportCheckpoint(const gyre::v1::ReportCheckpointRequest& request);
  absl::Status ReportBadCheckpoint(const gyre::v1::ReportBadCheckpointRequest& request);
  absl::Status Leave(const gyre::v1::LeaveRequest& request);
  absl::Status StoreSet(const gyre::v1::StoreSetRequest& request);
  absl::StatusOr<gyre::v1::StoreGetResponse> StoreGet(const gyre::v1::StoreGetRequest& request);

 private:
  template <typename Response, typename Call>
  absl::StatusOr<Response> WithRetry(const char* what, int64_t deadline_ms, Call call);

  ClusterClientOptions options_;
  Clock* clock_;
  std::unique_ptr<gyre::v1::Cluster::Stub> stub_;
};

}  // namespace gyre
