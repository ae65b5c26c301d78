// Deterministic simulation of the coordinator core (STYLE.md section 4; FoundationDB, TigerBeetle
// VOPR). One seed fixes everything: the run's shape, the fault rates, and every delay, loss,
// kill, restart and operator command. The real CoordinatorCore runs against fake workers that
// follow the worker protocol of DESIGN.md section 4, an in-memory journal (MemJournal behind a
// fault-injecting wrapper), a simulated clock and a (time, sequence) event queue, all on one
// thread.
//
// A schedule has a safety phase with faults, then a liveness phase with faults off in which the
// run must reach max_steps (or, if the operator stopped it, every worker must stop) within a
// simulated-time budget. The invariants of DESIGN.md section 4 are checked after every event;
// see Checker in simulator.cc for the full list.
#pragma once

#include <cstdint>
#include <ostream>
#include <string>

namespace gyre::sim {

struct SimOptions {
  uint64_t seed = 0;
  // Shape of the run.
  uint32_t initial_workers = 2;
  uint32_t desired_workers = 2;
  uint32_t min_workers = 1;
  uint64_t max_steps = 20;
  uint32_t global_batch = 8;
  uint32_t checkpoint_every = 0;
  uint32_t keep_last = 2;
  bool pipeline = false;  // workers ask for the lease of t+1 with CompleteStep(t)
  // Fault rates (drawn from the seed by FromSeed).
  double message_loss = 0;          // probability per message
  double long_delay = 0;            // probability a message takes 20-400 ms
  double kill_per_s = 0;            // worker kills per simulated second
  double kill_after_complete = 0;   // probability a worker dies right after sending CompleteStep
  double join_per_s = 0;            // extra worker processes started per second
  double coordinator_crash_per_s = 0;
  double partition_per_s = 0;       // a worker cut off from the coordinator for 50-800 ms
  double journal_failure = 0;       // probability per journal write (then the coordinator dies)
  double control_per_s = 0;         // operator commands per second
  // Probability that a restore finds the checkpoint it was named corrupt (it then reports it;
  // the core must mark it bad and never name it again).
  double corrupt_checkpoint = 0;
  bool stop_allowed = false;        // the operator may Stop the run
  int64_t fault_phase_micros = 2'000'000;
  int64_t liveness_budget_micros = 60'000'000;
  // Deliberate bugs, to show that the checker catches them (tests only): a worker that applies
  // the optimizer on ABORT too, or a journal that loses its newest committed step on reload.
  enum class Sabotage { kNone, kApplyOnAbort, kLoseNewestStepOnReload };
  Sabotage sabotage = Sabotage::kNone;

  // Everything derived from `seed`.
  static SimOptions FromSeed(uint64_t seed);
  std::string ToString() const;
};

struct SimResult {
  bool ok = true;
  std::string failure;  // the violated invariant, with the time and the last events
  uint64_t events = 0;
  uint64_t committed = 0;
  uint64_t generations = 0;
  uint64_t restores = 0;  // generations that fell back to a checkpoint
  uint64_t bad_checkpoints = 0;  // checkpoints a restore found corrupt and the core marked bad
  uint64_t coordinator_restarts = 0;
  uint64_t kills = 0;
  uint64_t aborts = 0;
  uint64_t applied_steps = 0;  // COMMITs applied by workers, all together
  bool stopped = false;        // ended by an operator Stop
  int64_t end_micros = 0;
};

// Runs one schedule. With `verbose` non-null, prints the options and one line per event there.
SimResult RunSimulation(const SimOptions& options, std::ostream* verbose);

}  // namespace gyre::sim
