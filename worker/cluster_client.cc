#include "worker/cluster_client.h"

#include <chrono>

#include "absl/strings/str_cat.h"
#include "base/grpc_status.h"
#include "grpcpp/grpcpp.h"

namespace gyre {

ClusterClient::ClusterClient(ClusterClientOptions options, Clock* clock) : options_(std::move(options)), clock_(clock) {
  grpc::ChannelArguments args;
  // Reconnect quickly after a coordinator restart instead of gRPC's default (up to 120 s).
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, static_cast<int>(options_.backoff_max_ms));
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, static_cast<int>(options_.backoff_initial_ms));
  std::shared_ptr<grpc::ChannelCredentials> credentials = grpc::InsecureChannelCredentials();
  if (!options_.tls_ca_pem.empty()) {
    grpc::SslCredentialsOptions ssl;
    ssl.pem_root_certs = options_.tls_ca_pem;
    credentials = grpc::SslCredentials(ssl);
  }
  stub_ = gyre::v1::Cluster::NewStub(grpc::CreateCustomChannel(options_.address, credentials, args));
}

template <typename Response, typename Call>
absl::StatusOr<Response> ClusterClient::WithRetry(const char* what, int64_t deadline_ms, Call call) {
  const int64_t give_up = clock_->NowMicros() + options_.retry_budget_ms * 1000;
  int64_t backoff_ms = options_.backoff_initial_ms;
  while (true) {
    grpc::ClientContext ctx;
    ctx.AddMetadata("authorization", "Bearer " + options_.token);
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(deadline_ms));
    Response response;
    grpc::Status status = call(&ctx, &response);
    if (status.ok()) return response;
    const bool transient = status.error_code() == grpc::StatusCode::UNAVAILABLE ||
                           status.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED;
    if (!transient || clock_->NowMicros() >= give_up) {
      absl::Status s = FromGrpcStatus(status);
      return absl::Status(s.code(), absl::StrCat(what, " to coordinator ", options_.address, ": ", s.message()));
    }
    clock_->SleepMicros(backoff_ms * 1000);
    backoff_ms = std::min(backoff_ms * 2, options_.backoff_max_ms);
  }
}

absl::StatusOr<gyre::v1::RegisterResponse> ClusterClient::Register(const gyre::v1::RegisterRequest& request) {
  return WithRetry<gyre::v1::RegisterResponse>("Register", options_.call_deadline_ms, [&](auto* ctx, auto* resp) {
    return stub_->Register(ctx, request, resp);
  });
}

absl::StatusOr<gyre::v1::HeartbeatResponse> ClusterClient::Heartbeat(const gyre::v1::HeartbeatRequest& request) {
  return WithRetry<gyre::v1::HeartbeatResponse>("Heartbeat", options_.call_deadline_ms, [&](auto* ctx, auto* resp) {
    return stub_->Heartbeat(ctx, request, resp);
  });
}

absl::StatusOr<gyre::v1::StepLease> ClusterClient::AcquireStep(const gyre::v1::AcquireStepRequest& request) {
  return WithRetry<gyre::v1::StepLease>("AcquireStep", options_.call_deadline_ms, [&](auto* ctx, auto* resp) {
    return stub_->AcquireStep(ctx, request, resp);
  });
}

absl::StatusOr<gyre::v1::CompleteStepResponse> ClusterClient::CompleteStep(
    const gyre::v1::CompleteStepRequest& request) {
  return WithRetry<gyre::v1::CompleteStepResponse>("CompleteStep", options_.complete_deadline_ms,
                                                   [&](auto* ctx, auto* resp) {
                                                     return stub_->CompleteStep(ctx, request, resp);
                                                   });
}

absl::Status ClusterClient::ReportCheckpoint(const gyre::v1::ReportCheckpointRequest& request) {
  return WithRetry<gyre::v1::ReportCheckpointResponse>("ReportCheckpoint", options_.call_deadline_ms,
                                                       [&](auto* ctx, auto* resp) {
                                                         return stub_->ReportCheckpoint(ctx, request, resp);
                                                       })
      .status();
}

absl::Status ClusterClient::ReportBadCheckpoint(const gyre::v1::ReportBadCheckpointRequest& request) {
  return WithRetry<gyre::v1::ReportBadCheckpointResponse>("ReportBadCheckpoint", options_.call_deadline_ms,
                                                          [&](auto* ctx, auto* resp) {
                                                            return stub_->ReportBadCheckpoint(ctx, request, resp);
                                                          })
      .status();
}

absl::Status ClusterClient::Leave(const gyre::v1::LeaveRequest& request) {
  return WithRetry<gyre::v1::LeaveResponse>("Leave", options_.call_deadline_ms, [&](auto* ctx, auto* resp) {
    return stub_->Leave(ctx, request, resp);
  }).status();
}

absl::Status ClusterClient::StoreSet(const gyre::v1::StoreSetRequest& request) {
  return WithRetry<gyre::v1::StoreSetResponse>("StoreSet", options_.call_deadline_ms, [&](auto* ctx, auto* resp) {
    return stub_->StoreSet(ctx, request, resp);
  }).status();
}

absl::StatusOr<gyre::v1::StoreGetResponse> ClusterClient::StoreGet(const gyre::v1::StoreGetRequest& request) {
  return WithRetry<gyre::v1::StoreGetResponse>("StoreGet", options_.call_deadline_ms, [&](auto* ctx, auto* resp) {
    return stub_->StoreGet(ctx, request, resp);
  });
}

}  // namespace gyre
