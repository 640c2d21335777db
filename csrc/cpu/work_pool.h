// The CPU kernels' parallel loop: work that adapts when a thread falls behind.
//
// at::parallel_for (OpenMP) splits a range statically, one share per thread, and returns
// only when every thread has finished its share. On a machine whose cores are shared with
// other work (the serving processes, another job), the thread that lost its core holds up
// every parallel region of the step until the scheduler gives it back: a decode step runs
// hundreds of regions, and each waits for the slowest thread.
//
// Here the range is cut into a few chunks per thread, and the threads (the caller and the
// pool's workers) claim chunks from one shared counter. The caller waits only for chunks a
// worker has claimed and not finished: a worker that is not running when a region starts
// claims nothing, and the caller (and any worker that is running) does its share instead.
// Every chunk runs exactly once on one thread, so results are identical to at::parallel_for's
// for kernels whose outputs do not depend on how the range is split (ours: each output row
// or unit is computed whole by one call).
//
// Calls from inside a region run inline; a second caller while the pool is busy (another
// Python thread) and PROTOSERVE_WORK_POOL=0 fall back to at::parallel_for.
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>
#include <utility>

namespace protoserve::work_pool {

using RangeFn = void (*)(const void* context, int64_t begin, int64_t end);

// Runs fn(context, b, e) over disjoint chunks [b, e) covering [begin, end), each chunk at
// least `grain` long (but the last), and returns when all have run. Rethrows the first
// exception a chunk threw.
void run_range(int64_t begin, int64_t end, int64_t grain, RangeFn fn, const void* context);

// Whether regions go through the pool (false: at::parallel_for); tests switch it.
bool enabled();
void set_enabled(bool on);
bool swap_enabled(bool on);  // set_enabled, returning the previous setting

// (regions run on the pool, chunks its workers ran) since the process started.
std::pair<int64_t, int64_t> stats();

// Drop-in replacement for at::parallel_for(begin, end, grain, f).
template <typename F>
inline void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  if (begin >= end) return;
  run_range(
      begin, end, grain,
      [](const void* context, int64_t b, int64_t e) { (*static_cast<const F*>(context))(b, e); },
      &f);
}

}  // namespace protoserve::work_pool
