// Thin gRPC front ends of the coordinator (STYLE.md section 5): each handler checks the bearer
// token, validates the request's shape, posts one event to the CoreLoop and finishes its reactor
// when the core's reply arrives. No decisions here.
//
// cluster_service.cc: gyre.v1.Cluster (workers). control_service.cc: gyre.v1.Control (gyrectl,
// dashboard).
//
// Thread-safety: handlers run on gRPC threads; the CoreLoop serialises everything.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "coordinator/core_loop.h"
#include "coordinator/kv_store.h"
#include "gyre/v1/cluster.grpc.pb.h"
#include "gyre/v1/control.grpc.pb.h"
#include "grpcpp/server.h"

namespace gyre::coordinator {

class ClusterService final : public gyre::v1::Cluster::CallbackService {
 public:
  // `token` empty: no authentication of workers. `loop` is not owned.
  ClusterService(CoreLoop* loop, std::string token) : loop_(loop), token_(std::move(token)) {}

  grpc::ServerUnaryReactor* Register(grpc::CallbackServerContext* ctx,
                                     const gyre::v1::RegisterRequest* request,
                                     gyre::v1::RegisterResponse* response) override;
  grpc::ServerUnaryReactor* Heartbeat(grpc::CallbackServerContext* ctx,
                                      const gyre::v1::HeartbeatRequest* request,
                                      gyre::v1::HeartbeatResponse* response) override;
  grpc::ServerUnaryReactor* AcquireStep(grpc::CallbackServerContext* ctx,
                                        const gyre::v1::AcquireStepRequest* request,
                                        gyre::v1::StepLease* response) override;
  grpc::ServerUnaryReactor* CompleteStep(grpc::CallbackServerContext* ctx,
                                         const gyre::v1::CompleteStepRequest* request,
                                         gyre::v1::CompleteStepResponse* response) override;
  grpc::ServerUnaryReactor* ReportCheckpoint(grpc::CallbackServerContext* ctx,
                                             const gyre::v1::ReportCheckpointRequest* request,
                                             gyre::v1::ReportCheckpointResponse* response) override;
  grpc::ServerUnaryReactor* ReportBadCheckpoint(
      grpc::CallbackServerContext* ctx, const gyre::v1::ReportBadCheckpointRequest* request,
      gyre::v1::ReportBadCheckpointResponse* response) override;
  grpc::ServerUnaryReactor* Leave(grpc::CallbackServerContext* ctx,
                                  const gyre::v1::LeaveRequest* request,
                                  gyre::v1::LeaveResponse* response) override;
  // The rendezvous store: answered here, not by the core (it decides nothing).
  grpc::ServerUnaryReactor* StoreSet(grpc::CallbackServerContext* ctx,
                                     const gyre::v1::StoreSetRequest* request,
                                     gyre::v1::StoreSetResponse* response) override;
  grpc::ServerUnaryReactor* StoreGet(grpc::CallbackServerContext* ctx,
                                     const gyre::v1::StoreGetRequest* request,
                                     gyre::v1::StoreGetResponse* response) override;

 private:
  CoreLoop* loop_;
  std::string token_;
  RendezvousKv kv_;
};

class ControlService final : public gyre::v1::Control::CallbackService {
 public:
  // `token` must be non-empty (every control call is authenticated). `loop` is not owned.
  ControlService(CoreLoop* loop, std::string token) : loop_(loop), token_(std::move(token)) {}

  grpc::ServerUnaryReactor* GetStatus(grpc::CallbackServerContext* ctx,
                                      const gyre::v1::GetStatusRequest* request,
                                      gyre::v1::RunStatus* response) override;
  grpc::ServerUnaryReactor* ListWorkers(grpc::CallbackServerContext* ctx,
                                        const gyre::v1::ListWorkersRequest* request,
                                        gyre::v1::ListWorkersResponse* response) override;
  grpc::ServerUnaryReactor* Pause(grpc::CallbackServerContext* ctx,
                                  const gyre::v1::PauseRequest* request,
                                  gyre::v1::RunStatus* response) override;
  grpc::ServerUnaryReactor* Resume(grpc::CallbackServerContext* ctx,
                                   const gyre::v1::ResumeRequest* request,
                                   gyre::v1::RunStatus* response) override;
  grpc::ServerUnaryReactor* Scale(grpc::CallbackServerContext* ctx,
                                  const gyre::v1::ScaleRequest* request,
                                  gyre::v1::RunStatus* response) override;
  grpc::ServerUnaryReactor* Drain(grpc::CallbackServerContext* ctx,
                                  const gyre::v1::DrainRequest* request,
                                  gyre::v1::RunStatus* response) override;
  grpc::ServerUnaryReactor* Checkpoint(grpc::CallbackServerContext* ctx,
                                       const gyre::v1::CheckpointRequest* request,
                                       gyre::v1::RunStatus* response) override;
  grpc::ServerUnaryReactor* Stop(grpc::CallbackServerContext* ctx,
                                 const gyre::v1::StopRequest* request,
                                 gyre::v1::RunStatus* response) override;
  // Streams every committed step's aggregated metrics from since_step on (the last
  // CoreLoop::kMetricsHistory steps are replayed) until the client cancels.
  grpc::ServerWriteReactor<gyre::v1::MetricsUpdate>* WatchMetrics(
      grpc::CallbackServerContext* ctx, const gyre::v1::WatchMetricsRequest* request) override;

 private:
  CoreLoop* loop_;
  std::string token_;
};

struct ServerOptions {
  std::string listen = "127.0.0.1:0";  // host:port; port 0 picks a free one
  std::string token;                   // the run's bearer token; required
  bool authenticate_workers = true;    // Cluster calls carry the token too
  // TLS (both set): PEM certificate chain and private key; plaintext connections are refused.
  // Empty: plaintext (loopback / trusted networks). The bearer token is required either way.
  std::string tls_cert_pem;
  std::string tls_key_pem;
};

// The coordinator's gRPC server: both services plus server reflection (grpcurl).
class CoordinatorServer {
 public:
  static absl::StatusOr<std::unique_ptr<CoordinatorServer>> Start(CoreLoop* loop,
                                                                  const ServerOptions& options);
  ~CoordinatorServer();
  int port() const { return port_; }

 private:
  CoordinatorServer(CoreLoop* loop, const ServerOptions& options);
  ClusterService cluster_;
  ControlService control_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
};

}  // namespace gyre::coordinator
