// The one mapping between absl::Status and grpc::Status (STYLE.md section 5). The codes are the
// same numbers on both sides; the table of which case gets which code lives with the code that
// decides (core.h): stale generation ABORTED, coordinator restarting UNAVAILABLE, scale to 0
// INVALID_ARGUMENT, unknown worker NOT_FOUND, bad token UNAUTHENTICATED, resume after stop
// FAILED_PRECONDITION.
#pragma once

#include <string>

#include "absl/status/status.h"
#include "grpcpp/support/status.h"

namespace gyre::coordinator {

grpc::Status ToGrpcStatus(const absl::Status& status);
absl::Status FromGrpcStatus(const grpc::Status& status);

// Bearer-token check for "authorization: Bearer <token>" metadata, in constant time for a given
// token length. An empty expected token is refused at construction time by the server.
absl::Status CheckBearerToken(const std::string& expected, const std::string& authorization);

}  // namespace gyre::coordinator
