#include "base/grpc_status.h"

#include "gtest/gtest.h"

namespace gyre {
namespace {

TEST(GrpcStatusTest, EveryCodeRoundTripsWithItsMessage) {
  for (int code = 0; code <= 16; ++code) {
    absl::Status s(static_cast<absl::StatusCode>(code), code == 0 ? "" : "why " + std::to_string(code));
    grpc::Status g = ToGrpcStatus(s);
    EXPECT_EQ(static_cast<int>(g.error_code()), code);
    EXPECT_EQ(FromGrpcStatus(g), s);
  }
  EXPECT_EQ(ToGrpcStatus(absl::UnauthenticatedError("bad token")).error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(ToGrpcStatus(absl::AbortedError("stale generation")).error_code(), grpc::StatusCode::ABORTED);
}

TEST(GrpcStatusTest, UnknownGrpcCodesBecomeUnknown) {
  EXPECT_EQ(FromGrpcStatus(grpc::Status(static_cast<grpc::StatusCode>(99), "x")).code(), absl::StatusCode::kUnknown);
}

TEST(GrpcStatusTest, BearerToken) {
  EXPECT_TRUE(CheckBearerToken("abc", "Bearer abc").ok());
  EXPECT_TRUE(absl::IsUnauthenticated(CheckBearerToken("abc", "")));
  EXPECT_TRUE(absl::IsUnauthenticated(CheckBearerToken("abc", "Basic abc")));
  EXPECT_TRUE(absl::IsUnauthenticated(CheckBearerToken("abc", "Bearer abd")));
  EXPECT_TRUE(absl::IsUnauthenticated(CheckBearerToken("abc", "Bearer ab")));
  EXPECT_TRUE(absl::IsUnauthenticated(CheckBearerToken("abc", "Bearer abcd")));
}

}  // namespace
}  // namespace gyre
