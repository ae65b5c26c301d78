// The run's control bearer token (DESIGN.md section 5): created at run start, stored in
// runs/<name>/token with mode 0600, read back by a restarted coordinator and by gyrectl.
#pragma once

#include <string>

#include "absl/status/statusor.h"

namespace gyre::coordinator {

// Returns the token in `path`, creating it (64 hex characters from the OS random source, file
// mode 0600, synced) when the file does not exist. FailedPrecondition when an existing file is
// readable by group or others, InvalidArgument when it does not hold a token.
absl::StatusOr<std::string> LoadOrCreateRunToken(const std::string& path);

}  // namespace gyre::coordinator
