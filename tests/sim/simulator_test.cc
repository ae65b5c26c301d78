// Fixed seeds of the coordinator simulation (the long random runs use coordinator_sim).
#include "tests/sim/simulator.h"

#include <cstdint>
#include <sstream>

#include "gtest/gtest.h"

namespace gyre::sim {
namespace {

constexpr uint64_t kFirstSeed = 1;
constexpr uint64_t kSchedules = 2000;

TEST(CoordinatorSimulation, FixedSeedsKeepEveryInvariant) {
  uint64_t commits = 0, kills = 0, restarts = 0, restores = 0, aborts = 0, stopped = 0, bad = 0;
  for (uint64_t seed = kFirstSeed; seed < kFirstSeed + kSchedules; ++seed) {
    const SimOptions options = SimOptions::FromSeed(seed);
    const SimResult r = RunSimulation(options, nullptr);
    ASSERT_TRUE(r.ok) << "seed " << seed << "\n  options: " << options.ToString() << "\n"
                      << r.failure
                      << "\nreproduce: bazel run //tests/sim:coordinator_sim -- --seed " << seed
                      << " --schedules 1 --verbose";
    commits += r.committed;
    kills += r.kills;
    restarts += r.coordinator_restarts;
    restores += r.restores;
    bad += r.bad_checkpoints;
    aborts += r.aborts;
    stopped += r.stopped;
  }
  // The schedules must actually exercise the fault paths, or passing means little.
  EXPECT_GT(kills, kSchedules / 2);
  EXPECT_GT(restarts, kSchedules / 4);
  EXPECT_GT(aborts, kSchedules / 4);
  EXPECT_GT(restores, 10u);
  EXPECT_GT(bad, 5u);
  EXPECT_GT(stopped, 10u);
  EXPECT_GT(commits, kSchedules * 10);
  std::cout << kSchedules << " schedules: " << commits << " commits, " << kills << " kills, "
            << restarts << " coordinator restarts, " << aborts << " aborts, " << restores
            << " checkpoint restores (" << bad << " checkpoints found corrupt), " << stopped
            << " stopped by the operator\n";
}

TEST(CoordinatorSimulation, SameSeedSameRun) {
  const SimOptions options = SimOptions::FromSeed(424242);
  std::ostringstream a, b;
  const SimResult ra = RunSimulation(options, &a);
  const SimResult rb = RunSimulation(options, &b);
  EXPECT_TRUE(ra.ok) << ra.failure;
  EXPECT_EQ(a.str(), b.str());
  EXPECT_EQ(ra.events, rb.events);
  EXPECT_GT(ra.events, 100u);
}

// The checker has teeth: deliberate bugs are caught on most faulty schedules.
int CaughtOutOf(SimOptions::Sabotage sabotage, int schedules) {
  int caught = 0;
  for (int seed = 1; seed <= schedules; ++seed) {
    SimOptions options = SimOptions::FromSeed(seed);
    options.sabotage = sabotage;
    options.kill_per_s = std::max(options.kill_per_s, 2.0);
    options.coordinator_crash_per_s = std::max(options.coordinator_crash_per_s, 2.0);
    options.fault_phase_micros = std::max<int64_t>(options.fault_phase_micros, 1'500'000);
    caught += RunSimulation(options, nullptr).ok ? 0 : 1;
  }
  return caught;
}

TEST(CoordinatorSimulation, CatchesApplyOnAbort) {
  // Every schedule in which an ABORT reaches a worker must fail; the others had no chance.
  int caught = 0;
  for (int seed = 1; seed <= 40; ++seed) {
    SimOptions options = SimOptions::FromSeed(seed);
    options.sabotage = SimOptions::Sabotage::kApplyOnAbort;
    options.kill_per_s = std::max(options.kill_per_s, 2.0);
    const SimResult r = RunSimulation(options, nullptr);
    if (r.ok) {
      EXPECT_EQ(r.aborts, 0u) << "seed " << seed << ": a worker applied an aborted step unnoticed";
    } else {
      ++caught;
    }
  }
  EXPECT_GE(caught, 5);
}

TEST(CoordinatorSimulation, CatchesLostCommittedStep) {
  EXPECT_GE(CaughtOutOf(SimOptions::Sabotage::kLoseNewestStepOnReload, 40), 20);
}

}  // namespace
}  // namespace gyre::sim
