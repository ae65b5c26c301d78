// Shared by cluster_service.cc and control_service.cc: authenticate, validate, post, answer.
#pragma once

#include <string>
#include <utility>

#include "coordinator/core_loop.h"
#include "base/grpc_status.h"
#include "grpcpp/server_context.h"

namespace gyre::coordinator::internal {

inline std::string Authorization(const grpc::CallbackServerContext& ctx) {
  const auto& metadata = ctx.client_metadata();
  auto it = metadata.find("authorization");
  if (it == metadata.end()) return "";
  return std::string(it->second.data(), it->second.size());
}

// Finishes the call with the core's reply to `event`, after the token check (when `token` is
// non-empty) and the handler's own validation.
template <typename Response>
grpc::ServerUnaryReactor* Dispatch(grpc::CallbackServerContext* ctx, CoreLoop* loop,
                                   const std::string& token, const absl::Status& validation,
                                   Event event, Response* response) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  if (!token.empty()) {
    if (absl::Status s = CheckBearerToken(token, Authorization(*ctx)); !s.ok()) {
      reactor->Finish(ToGrpcStatus(s));
      return reactor;
    }
  }
  if (!validation.ok()) {
    reactor->Finish(ToGrpcStatus(validation));
    return reactor;
  }
  loop->Post(std::move(event), [reactor, response](const Reply& reply) {
    if (!reply.status.ok()) {
      reactor->Finish(ToGrpcStatus(reply.status));
      return;
    }
    if (const auto* body = std::get_if<Response>(&reply.body)) {
      *response = *body;
      reactor->Finish(grpc::Status::OK);
    } else {
      reactor->Finish(grpc::Status(grpc::StatusCode::INTERNAL, "core answered another message"));
    }
  });
  return reactor;
}

}  // namespace gyre::coordinator::internal
