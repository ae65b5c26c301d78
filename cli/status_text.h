// The text `gyrectl status` prints for a RunStatus (one "key  value" line per item; lines in
// capitals are things the operator should act on).
#pragma once

#include <string>

#include "gyre/v1/control.pb.h"

namespace gyre::cli {

std::string RunStatusText(const gyre::v1::RunStatus& status);

}  // namespace gyre::cli
