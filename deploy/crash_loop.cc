#include "deploy/crash_loop.h"

#include "absl/strings/str_cat.h"

namespace gyre::deploy {

bool CrashLoop::Failed(const Start& start, int64_t now_ms, int64_t committed_steps) {
  const int64_t lived_ms = now_ms - start.at_ms;
  const bool quick = lived_ms < options_.quick_exit_ms;
  const bool no_progress =
      start.committed_steps >= 0 && committed_steps >= 0 && committed_steps <= start.committed_steps;
  if (!quick && !no_progress) {
    failures_in_a_row_ = 0;
    return false;
  }
  ++failures_in_a_row_;
  last_reason_ = quick ? absl::StrCat("failed ", lived_ms, " ms after starting")
                       : absl::StrCat("failed after ", lived_ms / 1000, " s with no step committed since it started (",
                                      committed_steps, " committed)");
  return failures_in_a_row_ >= options_.max_failures_in_a_row;
}

}  // namespace gyre::deploy
