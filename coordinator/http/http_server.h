// The coordinator's HTTP face (DESIGN.md section 5): "/" the dashboard page, "/api/status" and
// "/api/metrics?since=N" (JSON, protobuf field names), "/metrics" (Prometheus text format).
// Read-only; it listens on control.http_listen (127.0.0.1 by default) and takes its data from a
// DashboardSource the coordinator host implements over its core.
//
// Thread-safety: the server answers on its own threads; DashboardSource must be thread-safe.
#pragma once

#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "gyre/v1/control.pb.h"

namespace httplib {
class Server;
}  // namespace httplib

namespace gyre::coordinator {

class DashboardSource {
 public:
  virtual ~DashboardSource() = default;
  virtual gyre::v1::RunStatus Status() = 0;
  // Aggregated metrics of committed steps >= `since_step`, oldest first, at most `limit`.
  virtual std::vector<gyre::v1::StepMetrics> MetricsSince(uint64_t since_step, size_t limit) = 0;
};

// Prometheus exposition of a status (exposed for tests).
std::string PrometheusText(const gyre::v1::RunStatus& status);

class HttpServer {
 public:
  // Binds `listen` ("host:port", port 0 = any) and starts serving. `source` must outlive it.
  static absl::StatusOr<std::unique_ptr<HttpServer>> Start(const std::string& listen, DashboardSource* source);
  ~HttpServer();  // stops and joins
  // "host:port" actually bound.
  const std::string& address() const { return address_; }

 private:
  HttpServer() = default;
  std::unique_ptr<httplib::Server> server_;
  std::thread thread_;
  std::string address_;
};

}  // namespace gyre::coordinator
