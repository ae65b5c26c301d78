// Internal invariant checks for ops/. A failed GYRE_CHECK is a programming bug (wrong shapes or
// dtypes passed between layers), never bad user input: user input (configs, token files) is
// validated with absl::Status before any layer runs (STYLE.md: asserts for bugs, Status for the
// world). Checks stay on in optimised builds; they guard O(1) facts, never inner loops.
#pragma once

#include <cstdio>
#include <cstdlib>

#define GYRE_CHECK(cond, ...)                                                         \
  do {                                                                                \
    if (!(cond)) {                                                                    \
      std::fprintf(stderr, "%s:%d: GYRE_CHECK(%s) failed: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, "" __VA_ARGS__);                                            \
      std::fprintf(stderr, "\n");                                                      \
      std::abort();                                                                   \
    }                                                                                 \
  } while (0)
