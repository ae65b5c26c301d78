// gyre.v1.Cluster: workers' calls, translated one-to-one into core events (services.h).
#include "absl/strings/str_cat.h"
#include "coordinator/service_dispatch.h"
#include "coordinator/services.h"

namespace gyre::coordinator {
namespace {

absl::Status NeedSession(uint64_t session, const char* message) {
  if (session != 0) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(message, ".session is required"));
}

// The checkpoint reports also need the checkpoint's path.
absl::Status NeedSessionAndPath(uint64_t session, const std::string& path, const char* message) {
  absl::Status s = NeedSession(session, message);
  if (s.ok() && path.empty()) s = absl::InvalidArgumentError(absl::StrCat(message, ".path is required"));
  return s;
}

// The core event of one worker call: the request, copied.
template <typename Request>
RequestEvent<Request> EventOf(const Request& request) {
  RequestEvent<Request> event;
  event.request = request;
  return event;
}

}  // namespace

grpc::ServerUnaryReactor* ClusterService::Register(grpc::CallbackServerContext* ctx,
                                                   const gyre::v1::RegisterRequest* request,
                                                   gyre::v1::RegisterResponse* response) {
  absl::Status validation;
  if (!request->has_worker() || request->worker().host().empty()) {
    validation = absl::InvalidArgumentError("RegisterRequest.worker.host is required");
  }
  RegisterEvent event;
  event.request = *request;
  return internal::Dispatch(ctx, loop_, token_, validation, event, response);
}

grpc::ServerUnaryReactor* ClusterService::Heartbeat(grpc::CallbackServerContext* ctx,
                                                    const gyre::v1::HeartbeatRequest* request,
                                                    gyre::v1::HeartbeatResponse* response) {
  return internal::Dispatch(ctx, loop_, token_, NeedSession(request->session(), "HeartbeatRequest"),
                            EventOf(*request), response);
}

grpc::ServerUnaryReactor* ClusterService::AcquireStep(grpc::CallbackServerContext* ctx,
                                                      const gyre::v1::AcquireStepRequest* request,
                                                      gyre::v1::StepLease* response) {
  return internal::Dispatch(ctx, loop_, token_, NeedSession(request->session(), "AcquireStepRequest"),
                            EventOf(*request), response);
}

grpc::ServerUnaryReactor* ClusterService::CompleteStep(
    grpc::CallbackServerContext* ctx, const gyre::v1::CompleteStepRequest* request,
    gyre::v1::CompleteStepResponse* response) {
  return internal::Dispatch(ctx, loop_, token_, NeedSession(request->session(), "CompleteStepRequest"),
                            EventOf(*request), response);
}

grpc::ServerUnaryReactor* ClusterService::ReportCheckpoint(
    grpc::CallbackServerContext* ctx, const gyre::v1::ReportCheckpointRequest* request,
    gyre::v1::ReportCheckpointResponse* response) {
  return internal::Dispatch(ctx, loop_, token_,
                            NeedSessionAndPath(request->session(), request->path(), "ReportCheckpointRequest"),
                            EventOf(*request), response);
}

grpc::ServerUnaryReactor* ClusterService::ReportBadCheckpoint(
    grpc::CallbackServerContext* ctx, const gyre::v1::ReportBadCheckpointRequest* request,
    gyre::v1::ReportBadCheckpointResponse* response) {
  return internal::Dispatch(ctx, loop_, token_,
                            NeedSessionAndPath(request->session(), request->path(), "ReportBadCheckpointRequest"),
                            EventOf(*request), response);
}

grpc::ServerUnaryReactor* ClusterService::Leave(grpc::CallbackServerContext* ctx,
                                                const gyre::v1::LeaveRequest* request,
                                                gyre::v1::LeaveResponse* response) {
  return internal::Dispatch(ctx, loop_, token_, NeedSession(request->session(), "LeaveRequest"),
                            EventOf(*request), response);
}

grpc::ServerUnaryReactor* ClusterService::StoreSet(grpc::CallbackServerContext* ctx,
                                                   const gyre::v1::StoreSetRequest* request,
                                                   gyre::v1::StoreSetResponse* /*response*/) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  absl::Status s = token_.empty() ? absl::OkStatus() : CheckBearerToken(token_, internal::Authorization(*ctx));
  if (s.ok()) s = kv_.Set(request->key(), request->value());
  reactor->Finish(ToGrpcStatus(s));
  return reactor;
}

grpc::ServerUnaryReactor* ClusterService::StoreGet(grpc::CallbackServerContext* ctx,
                                                   const gyre::v1::StoreGetRequest* request,
                                                   gyre::v1::StoreGetResponse* response) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  absl::Status s = token_.empty() ? absl::OkStatus() : CheckBearerToken(token_, internal::Authorization(*ctx));
  if (s.ok() && request->key().empty()) s = absl::InvalidArgumentError("StoreGetRequest.key is required");
  if (s.ok()) {
    if (std::optional<std::string> value = kv_.Get(request->key())) {
      response->set_found(true);
      response->set_value(*value);
    }
  }
  reactor->Finish(ToGrpcStatus(s));
  return reactor;
}

}  // namespace gyre::coordinator
