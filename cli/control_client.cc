#include "cli/control_client.h"

#include <chrono>
#include <fstream>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "base/grpc_status.h"
#include "base/run_dir.h"
#include "grpcpp/grpcpp.h"

namespace gyre::cli {

absl::StatusOr<ControlTarget> ResolveControlTarget(const std::string& run_dir, const std::string& address_flag,
                                                   const std::string& token_file_flag, const std::string& tls_ca_flag) {
  RunDir dir(run_dir);
  ControlTarget target;
  target.address = address_flag;
  if (target.address.empty()) {
    std::ifstream in(dir.control_address_path());
    if (!in) {
      return absl::NotFoundError(absl::StrCat("no coordinator address: ", dir.control_address_path(),
                                              " does not exist (is the run started? pass --run-dir or --coordinator)"));
    }
    std::getline(in, target.address);
    absl::StripAsciiWhitespace(&target.address);
    if (target.address.empty()) {
      return absl::DataLossError(absl::StrCat(dir.control_address_path(), " is empty"));
    }
  }
  target.token_path = token_file_flag.empty() ? dir.token_path() : token_file_flag;
  absl::StatusOr<std::string> token = ReadToken(target.token_path);
  if (!token.ok()) return token.status();
  target.token = *token;
  const std::string ca_path = tls_ca_flag.empty() ? dir.tls_ca_path() : tls_ca_flag;
  std::ifstream ca(ca_path, std::ios::binary);
  if (ca) {
    std::stringstream pem;
    pem << ca.rdbuf();
    target.tls_ca_pem = pem.str();
    if (target.tls_ca_pem.empty()) return absl::DataLossError(absl::StrCat("TLS CA file ", ca_path, " is empty"));
  } else if (!tls_ca_flag.empty()) {
    return absl::NotFoundError(absl::StrCat("TLS CA file ", tls_ca_flag, " cannot be read"));
  }
  return target;
}

ControlClient::ControlClient(ControlTarget target, int64_t deadline_ms)
    : target_(std::move(target)), deadline_ms_(deadline_ms) {
  std::shared_ptr<grpc::ChannelCredentials> credentials = grpc::InsecureChannelCredentials();
  if (!target_.tls_ca_pem.empty()) {
    grpc::SslCredentialsOptions ssl;
    ssl.pem_root_certs = target_.tls_ca_pem;
    credentials = grpc::SslCredentials(ssl);
  }
  stub_ = gyre::v1::Control::NewStub(grpc::CreateChannel(target_.address, credentials));
}

void ControlClient::Prepare(grpc::ClientContext* ctx, bool with_deadline) const {
  ctx->AddMetadata("authorization", "Bearer " + target_.token);
  if (with_deadline) ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(deadline_ms_));
}

absl::Status ControlClient::Explain(const grpc::Status& status) const {
  absl::Status s = FromGrpcStatus(status);
  switch (s.code()) {
    case absl::StatusCode::kUnavailable:
    case absl::StatusCode::kDeadlineExceeded:
      return absl::Status(s.code(), absl::StrCat("cannot reach the coordinator at ", target_.address, ": ",
                                                 s.message(), " (is the run up? is this the right --run-dir?)"));
    case absl::StatusCode::kUnauthenticated:
      return absl::UnauthenticatedError(
          absl::StrCat("the coordinator rejected the token from ", target_.token_path, ": ", s.message()));
    default:
      return s;
  }
}

#define GYRE_UNARY_CALL(Method, Request, Response, request_value) \
  {                                                              \
    grpc::ClientContext ctx;                                     \
    Prepare(&ctx);                                               \
    Response response;                                           \
    grpc::Status status = stub_->Method(&ctx, request_value, &response); \
    if (!status.ok()) return Explain(status);                    \
    return response;                                             \
  }

absl::StatusOr<gyre::v1::RunStatus> ControlClient::GetStatus() {
  GYRE_UNARY_CALL(GetStatus, gyre::v1::GetStatusRequest, gyre::v1::RunStatus, gyre::v1::GetStatusRequest());
}
absl::StatusOr<gyre::v1::ListWorkersResponse> ControlClient::ListWorkers() {
  GYRE_UNARY_CALL(ListWorkers, gyre::v1::ListWorkersRequest, gyre::v1::ListWorkersResponse, gyre::v1::ListWorkersRequest());
}
absl::StatusOr<gyre::v1::RunStatus> ControlClient::Pause() {
  GYRE_UNARY_CALL(Pause, gyre::v1::PauseRequest, gyre::v1::RunStatus, gyre::v1::PauseRequest());
}
absl::StatusOr<gyre::v1::RunStatus> ControlClient::Resume() {
  GYRE_UNARY_CALL(Resume, gyre::v1::ResumeRequest, gyre::v1::RunStatus, gyre::v1::ResumeRequest());
}
absl::StatusOr<gyre::v1::RunStatus> ControlClient::Scale(uint32_t target) {
  gyre::v1::ScaleRequest request;
  request.set_target(target);
  GYRE_UNARY_CALL(Scale, gyre::v1::ScaleRequest, gyre::v1::RunStatus, request);
}
absl::StatusOr<gyre::v1::RunStatus> ControlClient::Drain(uint64_t session) {
  gyre::v1::DrainRequest request;
  request.set_session(session);
  GYRE_UNARY_CALL(Drain, gyre::v1::DrainRequest, gyre::v1::RunStatus, request);
}
absl::StatusOr<gyre::v1::RunStatus> ControlClient::Checkpoint() {
  GYRE_UNARY_CALL(Checkpoint, gyre::v1::CheckpointRequest, gyre::v1::RunStatus, gyre::v1::CheckpointRequest());
}
absl::StatusOr<gyre::v1::RunStatus> ControlClient::Stop() {
  GYRE_UNARY_CALL(Stop, gyre::v1::StopRequest, gyre::v1::RunStatus, gyre::v1::StopRequest());
}

#undef GYRE_UNARY_CALL

absl::Status ControlClient::WatchMetrics(uint64_t since_step, uint64_t max_updates,
                                         const std::function<bool(const gyre::v1::MetricsUpdate&)>& on_update) {
  grpc::ClientContext ctx;
  Prepare(&ctx, /*with_deadline=*/false);
  gyre::v1::WatchMetricsRequest request;
  request.set_since_step(since_step);
  std::unique_ptr<grpc::ClientReader<gyre::v1::MetricsUpdate>> reader = stub_->WatchMetrics(&ctx, request);
  gyre::v1::MetricsUpdate update;
  uint64_t count = 0;
  while (reader->Read(&update)) {
    ++count;
    if (!on_update(update) || (max_updates > 0 && count >= max_updates)) {
      ctx.TryCancel();
      reader->Finish().IgnoreError();
      return absl::OkStatus();
    }
  }
  grpc::Status status = reader->Finish();
  if (!status.ok()) return Explain(status);
  return absl::OkStatus();
}

absl::StatusOr<uint64_t> ControlClient::ResolveWorker(const std::string& spec) {
  absl::StatusOr<gyre::v1::ListWorkersResponse> workers = ListWorkers();
  if (!workers.ok()) return workers.status();
  std::vector<uint64_t> matches;
  uint64_t as_hex = 0;
  bool is_hex = absl::SimpleHexAtoi(spec, &as_hex);
  for (const gyre::v1::WorkerInfo& w : workers->workers()) {
    const std::string host_pid = absl::StrCat(w.worker().host(), ":", w.worker().pid());
    if ((is_hex && w.session() == as_hex) || spec == host_pid || spec == w.worker().host()) {
      matches.push_back(w.session());
    }
  }
  if (matches.empty()) {
    return absl::NotFoundError(absl::StrCat("no worker matches '", spec,
                                            "' (give a session id from `gyrectl workers`, host:pid, or a host)"));
  }
  if (matches.size() > 1) {
    return absl::InvalidArgumentError(absl::StrCat("'", spec, "' matches ", matches.size(),
                                                   " workers; give a session id or host:pid"));
  }
  return matches[0];
}

}  // namespace gyre::cli
