// coordinator_sim: runs seeded schedules of the coordinator simulation (tests/sim/simulator.h).
//   coordinator_sim --seed N --schedules M [--verbose]
// Schedule i uses seed N+i. Without --seed a seed is drawn from the time and printed, so a long
// random run can always be reproduced. Exits 1 on the first violated invariant.
#include <chrono>
#include <cstdint>
#include <iostream>

#include "CLI/CLI.hpp"
#include "tests/sim/simulator.h"

int main(int argc, char** argv) {
  CLI::App app{"Deterministic simulation of the Gyre coordinator core"};
  uint64_t seed = 0;
  uint64_t schedules = 1;
  bool verbose = false;
  bool seed_given = false;
  app.add_option("--seed", seed, "first seed (default: drawn from the clock, and printed)");
  app.add_option("--schedules", schedules, "number of schedules (seeds seed .. seed+M-1)");
  app.add_flag("--verbose", verbose, "print the options and one line per event");
  CLI11_PARSE(app, argc, argv);
  seed_given = app.count("--seed") > 0;
  if (!seed_given) {
    seed = static_cast<uint64_t>(
        std::chrono::system_clock::now().time_since_epoch().count() & 0xFFFFFFFFFFFFULL);
  }
  std::cout << "coordinator_sim: seed=" << seed << " schedules=" << schedules << std::endl;
  uint64_t commits = 0, restarts = 0, kills = 0, restores = 0, generations = 0, events = 0;
  for (uint64_t i = 0; i < schedules; ++i) {
    const gyre::sim::SimOptions options = gyre::sim::SimOptions::FromSeed(seed + i);
    const gyre::sim::SimResult r =
        gyre::sim::RunSimulation(options, verbose ? &std::cout : nullptr);
    commits += r.committed;
    restarts += r.coordinator_restarts;
    kills += r.kills;
    restores += r.restores;
    generations += r.generations;
    events += r.events;
    if (!r.ok) {
      std::cout << "FAILED seed=" << seed + i << "\n  options: " << options.ToString() << "\n"
                << r.failure << "\nreproduce: bazel run //tests/sim:coordinator_sim -- --seed "
                << seed + i << " --schedules 1 --verbose\n";
      return 1;
    }
    if (verbose) std::cout << "seed " << seed + i << " ok\n";
  }
  std::cout << "ok: " << schedules << " schedules, " << events << " events, " << commits
            << " commits, " << generations << " generations, " << kills << " worker kills, "
            << restarts << " coordinator restarts, " << restores << " checkpoint restores\n";
  return 0;
}
