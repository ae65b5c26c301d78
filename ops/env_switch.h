// Process-wide GYRE_* environment switches of ops/ (fast paths and their fallbacks). Each owner
// reads its switch once (a function-local static) through EnvChoice, so every switch accepts and
// rejects values the same way.
#pragma once

#include <initializer_list>
#include <string>

namespace gyre::ops {

// The value of environment variable `name`, or `fallback` when it is unset. Any other value than
// those in `accepted` stops the process with "NAME must be a, b or c, got 'x'" (a misspelt switch
// must not silently run another path).
std::string EnvChoice(const char* name, std::initializer_list<const char*> accepted, const char* fallback);

}  // namespace gyre::ops
