#include "ops/parallel.h"

#include <cblas.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

namespace gyre::ops {
namespace {

class Pool {
 public:
  void Resize(int threads) {
    Stop();
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = false;
    for (int i = 0; i + 1 < threads; ++i) workers_.emplace_back([this] { WorkerLoop(); });
    size_ = threads;
  }
  int size() const { return size_; }

  void Run(int64_t n, const std::function<void(int64_t)>& fn) {
    std::unique_lock<std::mutex> busy(run_mu_, std::try_to_lock);
    if (!busy.owns_lock() || size_ <= 1 || n <= 1 || in_task_) {
      for (int64_t i = 0; i < n; ++i) fn(i);
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      fn_ = &fn;
      n_ = n;
      next_.store(0);
      active_ = static_cast<int>(workers_.size());
      ++epoch_;
    }
    cv_.notify_all();
    Work();
    std::unique_lock<std::mutex> lock(mu_);
    done_cv_.wait(lock, [this] { return active_ == 0; });
    fn_ = nullptr;
  }

  ~Pool() { Stop(); }

 private:
  void Work() {
    in_task_ = true;
    for (int64_t i = next_.fetch_add(1); i < n_; i = next_.fetch_add(1)) (*fn_)(i);
    in_task_ = false;
  }
  void WorkerLoop() {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return stop_ || epoch_ != seen; });
        if (stop_) return;
        seen = epoch_;
      }
      Work();
      std::lock_guard<std::mutex> lock(mu_);
      if (--active_ == 0) done_cv_.notify_all();
    }
  }
  void Stop() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
  }

  std::mutex run_mu_;
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  std::vector<std::thread> workers_;
  const std::function<void(int64_t)>* fn_ = nullptr;
  int64_t n_ = 0;
  std::atomic<int64_t> next_{0};
  int active_ = 0;
  uint64_t epoch_ = 0;
  bool stop_ = false;
  int size_ = 1;
  static thread_local bool in_task_;
};

thread_local bool Pool::in_task_ = false;

Pool& GlobalPool() {
  static Pool* pool = [] {
    auto* p = new Pool();
    p->Resize(1);
    return p;
  }();
  return *pool;
}

}  // namespace

void SetNumThreads(int threads) {
  if (threads <= 0) threads = std::max(1u, std::thread::hardware_concurrency());
  GlobalPool().Resize(threads);
  openblas_set_num_threads(threads);
}

int NumThreads() { return GlobalPool().size(); }

void ParallelFor(int64_t n, const std::function<void(int64_t)>& fn) { GlobalPool().Run(n, fn); }

}  // namespace gyre::ops
