// The one mapping between absl::Status and grpc::Status (STYLE.md section 5). Codes map 1:1
// (both follow google.rpc.Code); the message travels unchanged.
//   stale generation -> ABORTED, coordinator restarting -> UNAVAILABLE, scale to 0 ->
//   INVALID_ARGUMENT, unknown worker -> NOT_FOUND, bad token -> UNAUTHENTICATED,
//   resume after stop -> FAILED_PRECONDITION.
#pragma once

#include "absl/status/status.h"
#include "grpcpp/support/status.h"

namespace gyre {

grpc::Status ToGrpcStatus(const absl::Status& status);
absl::Status FromGrpcStatus(const grpc::Status& status);

}  // namespace gyre
