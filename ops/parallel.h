// Host parallelism for ops: one process-wide pool of worker threads plus the OpenBLAS thread
// count. `ParallelFor(n, fn)` runs fn(i) for i in [0, n) on the pool and the calling thread and
// returns when all are done. Work inside `fn` must not call ParallelFor again (nested calls run
// serially) and should not call BLAS (OpenBLAS threads are for the big GEMMs issued from the
// calling thread). Thread-safe: ParallelFor may be called from one thread at a time per pool
// (the trainer's step thread); a second concurrent caller runs its loop serially.
#pragma once

#include <cstdint>
#include <functional>

namespace gyre::ops {

// Sets the worker count used by ParallelFor and by OpenBLAS. 0 = hardware concurrency.
void SetNumThreads(int threads);
int NumThreads();

void ParallelFor(int64_t n, const std::function<void(int64_t)>& fn);

}  // namespace gyre::ops
