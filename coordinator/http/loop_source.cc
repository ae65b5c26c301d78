#include "coordinator/http/loop_source.h"

namespace gyre::coordinator {

LoopSource::LoopSource(CoreLoop* loop, size_t max_history) : loop_(loop), max_history_(max_history) {
  subscription_ = loop_->Subscribe(0, [this](const gyre::v1::MetricsUpdate& update) {
    std::lock_guard<std::mutex> lock(mu_);
    // A step redone after a restore from checkpoint replaces the later history.
    while (!history_.empty() && history_.back().step() >= update.metrics().step()) history_.pop_back();
    history_.push_back(update.metrics());
    if (history_.size() > max_history_) history_.pop_front();
  });
}

LoopSource::~LoopSource() { loop_->Unsubscribe(subscription_); }

std::vector<gyre::v1::StepMetrics> LoopSource::MetricsSince(uint64_t since_step, size_t limit) {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<gyre::v1::StepMetrics> out;
  for (const auto& m : history_) {
    if (m.step() < since_step) continue;
    if (out.size() >= limit) break;
    out.push_back(m);
  }
  return out;
}

}  // namespace gyre::coordinator
