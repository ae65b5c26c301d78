// RETURN_IF_ERROR / ASSIGN_OR_RETURN: the abseil in Debian 12 (20220623) ships neither.
#pragma once

#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define GYRE_STATUS_CONCAT_INNER_(a, b) a##b
#define GYRE_STATUS_CONCAT_(a, b) GYRE_STATUS_CONCAT_INNER_(a, b)

// Returns the status of `expr` from the enclosing function when it is not OK.
#define RETURN_IF_ERROR(expr)                         \
  do {                                                \
    ::absl::Status gyre_status_ = (expr);             \
    if (!gyre_status_.ok()) return gyre_status_;      \
  } while (0)

// `lhs` = value of the StatusOr `rexpr`, or return its status. `lhs` may declare a variable:
//   ASSIGN_OR_RETURN(auto file, env->NewWritableFile(path));
#define ASSIGN_OR_RETURN(lhs, rexpr) \
  GYRE_ASSIGN_OR_RETURN_IMPL_(GYRE_STATUS_CONCAT_(gyre_statusor_, __LINE__), lhs, rexpr)

#define GYRE_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, rexpr) \
  auto statusor = (rexpr);                                \
  if (!statusor.ok()) return std::move(statusor).status(); \
  lhs = std::move(statusor).value()
