// Clock: the only way Gyre code reads time or sleeps, so the coordinator core, timeouts,
// retries and backoff can run on simulated time in tests (ManualClock).
//
// Thread-safety: all methods are thread-safe.
#pragma once

#include <atomic>
#include <cstdint>

namespace gyre {

class Clock {
 public:
  virtual ~Clock() = default;
  // The process-wide real clock (steady for intervals, system for wall time). Not owned.
  static Clock* Real();

  // Monotonic time for deadlines and intervals.
  virtual int64_t NowMicros() = 0;
  // Wall-clock Unix time in milliseconds (journal records, dashboards).
  virtual int64_t UnixMillis() = 0;
  virtual void SleepMicros(int64_t micros) = 0;
};

// Simulated time: starts at `start_micros`; SleepMicros advances it instead of blocking.
class ManualClock final : public Clock {
 public:
  explicit ManualClock(int64_t start_micros = 0) : now_(start_micros) {}
  int64_t NowMicros() override { return now_.load(); }
  int64_t UnixMillis() override { return kUnixEpochOffsetMillis + now_.load() / 1000; }
  void SleepMicros(int64_t micros) override { Advance(micros); }
  void Advance(int64_t micros) { now_.fetch_add(micros > 0 ? micros : 0); }

  // 2026-01-01T00:00:00Z: simulated wall time looks plausible in logs.
  static constexpr int64_t kUnixEpochOffsetMillis = 1767225600000;

 private:
  std::atomic<int64_t> now_;
};

}  // namespace gyre
