#include "coordinator/journal_types.h"

#include <algorithm>

namespace gyre::coordinator {

void ApplyBatch(const JournalBatch& batch, JournalContents* contents) {
  if (batch.config.has_value()) contents->config = batch.config;
  if (batch.control.has_value()) contents->control = batch.control;
  for (const auto& g : batch.generations) {
    auto it = std::find_if(
        contents->generations.begin(), contents->generations.end(),
        [&](const auto& r) { return r.generation().id() >= g.generation().id(); });
    if (it != contents->generations.end() && it->generation().id() == g.generation().id()) {
      *it = g;
    } else {
      contents->generations.insert(it, g);
    }
  }
  if (batch.erase_steps_from.has_value()) {
    auto& steps = contents->steps;
    steps.erase(std::remove_if(steps.begin(), steps.end(),
                               [&](const auto& s) { return s.step() >= *batch.erase_steps_from; }),
                steps.end());
  }
  for (const auto& s : batch.steps) {
    if (contents->steps.empty() || contents->steps.back().step() < s.step()) {
      contents->steps.push_back(s);
      continue;
    }
    auto it = std::find_if(contents->steps.begin(), contents->steps.end(),
                           [&](const auto& r) { return r.step() >= s.step(); });
    if (it != contents->steps.end() && it->step() == s.step()) {
      *it = s;
    } else {
      contents->steps.insert(it, s);
    }
  }
  for (const auto& cp : batch.checkpoints) {
    auto it = std::find_if(contents->checkpoints.begin(), contents->checkpoints.end(),
                           [&](const auto& r) { return r.step() >= cp.step(); });
    if (it != contents->checkpoints.end() && it->step() == cp.step()) {
      *it = cp;
    } else {
      contents->checkpoints.insert(it, cp);
    }
  }
  // After the puts: a batch may add a checkpoint and drop it at once (keep-last-K).
  for (uint64_t step : batch.erased_checkpoints) {
    auto& c = contents->checkpoints;
    c.erase(std::remove_if(c.begin(), c.end(), [&](const auto& r) { return r.step() == step; }),
            c.end());
  }
}

}  // namespace gyre::coordinator
