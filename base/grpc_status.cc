#include "base/grpc_status.h"

#include <string>

namespace gyre {

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

absl::Status FromGrpcStatus(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  const int code = static_cast<int>(status.error_code());
  const absl::StatusCode absl_code =
      (code >= 1 && code <= 16) ? static_cast<absl::StatusCode>(code) : absl::StatusCode::kUnknown;
  return absl::Status(absl_code, status.error_message());
}

absl::Status CheckBearerToken(const std::string& expected, const std::string& authorization) {
  static constexpr char kPrefix[] = "Bearer ";
  constexpr size_t kPrefixLength = sizeof(kPrefix) - 1;
  if (authorization.empty()) {
    return absl::UnauthenticatedError("missing \"authorization: Bearer <token>\" metadata");
  }
  if (authorization.compare(0, kPrefixLength, kPrefix) != 0) {
    return absl::UnauthenticatedError("authorization metadata is not a Bearer token");
  }
  const char* presented = authorization.data() + kPrefixLength;
  const size_t presented_length = authorization.size() - kPrefixLength;
  // Constant time in the expected length: every byte is compared, no early exit.
  uint8_t difference = presented_length == expected.size() ? 0 : 1;
  for (size_t i = 0; i < expected.size(); ++i) {
    const char c = i < presented_length ? presented[i] : 0;
    difference |= static_cast<uint8_t>(c ^ expected[i]);
  }
  if (difference != 0) return absl::UnauthenticatedError("bad bearer token");
  return absl::OkStatus();
}

}  // namespace gyre
