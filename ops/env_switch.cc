#include "ops/env_switch.h"

#include <cstdlib>

#include "ops/check.h"

namespace gyre::ops {

std::string EnvChoice(const char* name, std::initializer_list<const char*> accepted, const char* fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr) return fallback;
  const std::string s = v;
  std::string list;
  size_t i = 0;
  for (const char* a : accepted) {
    if (s == a) return s;
    list += (i == 0 ? "" : i + 1 == accepted.size() ? " or " : ", ");
    list += a;
    ++i;
  }
  GYRE_CHECK(false, "%s must be %s, got '%s'", name, list.c_str(), s.c_str());
  return fallback;  // not reached
}

}  // namespace gyre::ops
