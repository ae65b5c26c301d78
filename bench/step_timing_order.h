// The order in which bench/step_timing.h AlternateVariants runs its entries in one round: round r
// starts at entry r mod n and goes on cyclically (r = 0: 0, 1, .., n-1; r = 1: 1, .., n-1, 0).
// With every entry first in the same number of rounds (rounds a multiple of n), no entry gains
// from its position in the round: helper xlperf20 (session 20) saw the later entries of a
// default-first order come out ~1 ms faster on xlstm steps. Each entry still follows the same
// neighbour within a round (a cyclic order); the per-round medians the bench prints show drift.
// Pure (no GPU), so bench/step_timing_order_test checks it on the CPU.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

namespace gyre::bench {

// Entry indices of round `round` (>= 0) among `entries` entries.
inline std::vector<size_t> RoundOrder(int round, size_t entries) {
  std::vector<size_t> order;
  if (entries == 0) return order;
  const size_t start = static_cast<size_t>(round < 0 ? 0 : round) % entries;
  for (size_t i = 0; i < entries; ++i) order.push_back((start + i) % entries);
  return order;
}

// "round 1: A, B, default" with names[i] for entry i.
inline std::string DescribeRoundOrder(int round, const std::vector<size_t>& order, const std::vector<std::string>& names) {
  std::string out = "round " + std::to_string(round) + ":";
  for (size_t i = 0; i < order.size(); ++i) out += (i ? ", " : " ") + names[order[i]];
  return out;
}

}  // namespace gyre::bench
