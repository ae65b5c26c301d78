// The wire conventions of Gyre's gRPC services, in one place: the mapping between absl::Status
// and grpc::Status (STYLE.md section 5; codes map 1:1, both follow google.rpc.Code, the message
// travels unchanged) and the bearer-token check every service call passes.
//   stale generation -> ABORTED, coordinator restarting -> UNAVAILABLE, scale to 0 ->
//   INVALID_ARGUMENT, unknown worker -> NOT_FOUND, bad token -> UNAUTHENTICATED,
//   resume after stop -> FAILED_PRECONDITION.
#pragma once

#include <string>

#include "absl/status/status.h"
#include "grpcpp/support/status.h"

namespace gyre {

grpc::Status ToGrpcStatus(const absl::Status& status);
absl::Status FromGrpcStatus(const grpc::Status& status);

// Checks "authorization: Bearer <token>" metadata against the run's token, in constant time for
// a given token length (no early exit). UNAUTHENTICATED with the reason otherwise.
absl::Status CheckBearerToken(const std::string& expected, const std::string& authorization);

}  // namespace gyre
