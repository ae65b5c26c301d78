// Loading and validating the one run config (protos/gyre/v1/config.proto): protobuf text format
// (.textproto / .pbtxt / .txt) or JSON (.json), parsed by protobuf itself. Validate() checks every
// component's part before anything starts and names the field path of the first problem.
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "gyre/v1/config.pb.h"

namespace gyre::cli {

absl::StatusOr<gyre::v1::RunConfig> LoadRunConfig(const std::string& path);
// Fills documented defaults that other components read without defaulting themselves.
void ApplyDefaults(gyre::v1::RunConfig* config);
absl::Status ValidateRunConfig(const gyre::v1::RunConfig& config);
// Protobuf JSON of the resolved config (what the run directory keeps as config.json).
std::string RunConfigToJson(const gyre::v1::RunConfig& config);

}  // namespace gyre::cli
