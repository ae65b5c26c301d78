// gyre.v1.Control: operator calls (gyrectl, dashboard), translated into core control events.
#include "coordinator/service_dispatch.h"
#include "coordinator/services.h"

namespace gyre::coordinator {
namespace {

template <typename Request, typename Response>
grpc::ServerUnaryReactor* Forward(grpc::CallbackServerContext* ctx, CoreLoop* loop,
                                  const std::string& token, const absl::Status& validation,
                                  const Request& request, Response* response) {
  ControlEvent event;
  event.request = request;
  return internal::Dispatch(ctx, loop, token, validation, event, response);
}

}  // namespace

grpc::ServerUnaryReactor* ControlService::GetStatus(grpc::CallbackServerContext* ctx,
                                                    const gyre::v1::GetStatusRequest* request,
                                                    gyre::v1::RunStatus* response) {
  return Forward(ctx, loop_, token_, absl::OkStatus(), *request, response);
}

grpc::ServerUnaryReactor* ControlService::ListWorkers(grpc::CallbackServerContext* ctx,
                                                      const gyre::v1::ListWorkersRequest* request,
                                                      gyre::v1::ListWorkersResponse* response) {
  return Forward(ctx, loop_, token_, absl::OkStatus(), *request, response);
}

grpc::ServerUnaryReactor* ControlService::Pause(grpc::CallbackServerContext* ctx,
                                                const gyre::v1::PauseRequest* request,
                                                gyre::v1::RunStatus* response) {
  return Forward(ctx, loop_, token_, absl::OkStatus(), *request, response);
}

grpc::ServerUnaryReactor* ControlService::Resume(grpc::CallbackServerContext* ctx,
                                                 const gyre::v1::ResumeRequest* request,
                                                 gyre::v1::RunStatus* response) {
  return Forward(ctx, loop_, token_, absl::OkStatus(), *request, response);
}

grpc::ServerUnaryReactor* ControlService::Scale(grpc::CallbackServerContext* ctx,
                                                const gyre::v1::ScaleRequest* request,
                                                gyre::v1::RunStatus* response) {
  const absl::Status validation =
      request->target() == 0
          ? absl::InvalidArgumentError("ScaleRequest.target must be at least 1")
          : absl::OkStatus();
  return Forward(ctx, loop_, token_, validation, *request, response);
}

grpc::ServerUnaryReactor* ControlService::Drain(grpc::CallbackServerContext* ctx,
                                                const gyre::v1::DrainRequest* request,
                                                gyre::v1::RunStatus* response) {
  const absl::Status validation =
      request->session() == 0 ? absl::InvalidArgumentError("DrainRequest.session is required")
                              : absl::OkStatus();
  return Forward(ctx, loop_, token_, validation, *request, response);
}

grpc::ServerUnaryReactor* ControlService::Checkpoint(grpc::CallbackServerContext* ctx,
                                                     const gyre::v1::CheckpointRequest* request,
                                                     gyre::v1::RunStatus* response) {
  return Forward(ctx, loop_, token_, absl::OkStatus(), *request, response);
}

grpc::ServerUnaryReactor* ControlService::Stop(grpc::CallbackServerContext* ctx,
                                               const gyre::v1::StopRequest* request,
                                               gyre::v1::RunStatus* response) {
  return Forward(ctx, loop_, token_, absl::OkStatus(), *request, response);
}

}  // namespace gyre::coordinator
