#include <chrono>

#include "absl/strings/str_cat.h"
#include "coordinator/services.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server_builder.h"

namespace gyre::coordinator {

CoordinatorServer::CoordinatorServer(CoreLoop* loop, const ServerOptions& options)
    : cluster_(loop, options.authenticate_workers ? options.token : std::string()),
      control_(loop, options.token) {}

absl::StatusOr<std::unique_ptr<CoordinatorServer>> CoordinatorServer::Start(
    CoreLoop* loop, const ServerOptions& options) {
  if (options.token.empty()) {
    return absl::InvalidArgumentError("the control service needs the run's bearer token");
  }
  std::unique_ptr<CoordinatorServer> server(new CoordinatorServer(loop, options));
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  if (options.tls_cert_pem.empty() != options.tls_key_pem.empty()) {
    return absl::InvalidArgumentError("TLS needs both a certificate and its private key");
  }
  std::shared_ptr<grpc::ServerCredentials> credentials = grpc::InsecureServerCredentials();
  if (!options.tls_cert_pem.empty()) {
    grpc::SslServerCredentialsOptions ssl;
    ssl.pem_key_cert_pairs.push_back({options.tls_key_pem, options.tls_cert_pem});
    credentials = grpc::SslServerCredentials(ssl);
  }
  builder.AddListeningPort(options.listen, credentials, &server->port_);
  builder.RegisterService(&server->cluster_);
  builder.RegisterService(&server->control_);
  server->server_ = builder.BuildAndStart();
  if (server->server_ == nullptr || server->port_ == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", options.listen));
  }
  return server;
}

CoordinatorServer::~CoordinatorServer() {
  // Bounded: calls still waiting for the core are cancelled after a second.
  if (server_ != nullptr) {
    server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
  }
}

}  // namespace gyre::coordinator
