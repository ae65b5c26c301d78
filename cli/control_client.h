// ControlClient: the client side of gyre.v1.Control (DESIGN.md section 5), used by gyrectl and
// the launcher. Every call carries the run's bearer token and a deadline; errors come back as
// absl::Status with a message that says what to do (unreachable coordinator, bad token, ...).
//
// Thread-safety: a ControlClient may be used from several threads.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "gyre/v1/control.grpc.pb.h"

namespace gyre::cli {

struct ControlTarget {
  std::string address;     // host:port
  std::string token;
  std::string token_path;  // for error messages
  std::string tls_ca_pem;  // non-empty: TLS, trusting these CA certificates; empty: plaintext
};

// Where to find the coordinator: explicit flags win; otherwise <run_dir>/coordinator.addr and
// <run_dir>/token. NotFound naming the missing file when the run dir has none. TLS: the CA file
// of `tls_ca_flag`, else <run_dir>/tls-ca.pem when the coordinator published one, else plaintext.
absl::StatusOr<ControlTarget> ResolveControlTarget(const std::string& run_dir, const std::string& address_flag,
                                                   const std::string& token_file_flag,
                                                   const std::string& tls_ca_flag = "");

class ControlClient {
 public:
  ControlClient(ControlTarget target, int64_t deadline_ms);

  absl::StatusOr<gyre::v1::RunStatus> GetStatus();
  absl::StatusOr<gyre::v1::ListWorkersResponse> ListWorkers();
  absl::StatusOr<gyre::v1::RunStatus> Pause();
  absl::StatusOr<gyre::v1::RunStatus> Resume();
  absl::StatusOr<gyre::v1::RunStatus> Scale(uint32_t target);
  absl::StatusOr<gyre::v1::RunStatus> Drain(uint64_t session);
  absl::StatusOr<gyre::v1::RunStatus> Checkpoint();
  absl::StatusOr<gyre::v1::RunStatus> Stop();
  // Streams metric updates from `since_step` until the server ends the stream, `on_update`
  // returns false, or `max_updates` (0 = no limit) arrived. No deadline on the stream itself.
  absl::Status WatchMetrics(uint64_t since_step, uint64_t max_updates,
                            const std::function<bool(const gyre::v1::MetricsUpdate&)>& on_update);

  // Resolves what an operator typed to a worker session: a session id in hex (as `gyrectl
  // workers` prints it), "host:pid", or a unique host name. NotFound / InvalidArgument otherwise.
  absl::StatusOr<uint64_t> ResolveWorker(const std::string& spec);

 private:
  void Prepare(grpc::ClientContext* ctx, bool with_deadline = true) const;
  absl::Status Explain(const grpc::Status& status) const;

  ControlTarget target_;
  int64_t deadline_ms_;
  std::unique_ptr<gyre::v1::Control::Stub> stub_;
};

}  // namespace gyre::cli
