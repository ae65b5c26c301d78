// An in-memory Env for fast, hermetic tests: files and directories live in a map; everything is
// "durable" immediately. Combine with FaultInjectionEnv to model crashes.
#pragma once

#include <memory>

#include "base/env.h"

namespace gyre {

std::unique_ptr<Env> NewMemEnv();

}  // namespace gyre
