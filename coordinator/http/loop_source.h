// LoopSource: the DashboardSource of a running coordinator — status through the CoreLoop, and
// the metrics of committed steps kept from a WatchMetrics subscription (bounded history).
// Thread-safe.
#pragma once

#include <deque>
#include <mutex>

#include "coordinator/core_loop.h"
#include "coordinator/http/http_server.h"

namespace gyre::coordinator {

class LoopSource final : public DashboardSource {
 public:
  // `loop` must outlive this object.
  explicit LoopSource(CoreLoop* loop, size_t max_history = CoreLoop::kMetricsHistory);
  ~LoopSource() override;
  gyre::v1::RunStatus Status() override { return loop_->Status(); }
  std::vector<gyre::v1::StepMetrics> MetricsSince(uint64_t since_step, size_t limit) override;

 private:
  CoreLoop* loop_;
  const size_t max_history_;
  uint64_t subscription_ = 0;
  std::mutex mu_;
  std::deque<gyre::v1::StepMetrics> history_;  // ascending step
};

}  // namespace gyre::coordinator
