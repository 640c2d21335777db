// See work_pool.h for why the kernels' parallel loop is not at::parallel_for's static split.
//
// One region at a time: the caller publishes a job and a ticket, an atomic word holding
//   [ generation : 16 | number of chunks : 24 | next chunk : 24 ]
// and every participant (the caller and each worker) claims chunks with fetch_add on it
// until `next` passes the number of chunks. Because a claim and the job's identity are one
// atomic word, a worker that wakes late can only claim a chunk of the job being run now,
// never one of a finished job, and the caller can reuse the job slot as soon as every chunk
// it handed out is done. Idle workers spin briefly (a decode step's regions come back to
// back), then sleep on a condition variable; the caller wakes them only when some sleep.
#include "work_pool.h"

#include <immintrin.h>
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <new>
#include <thread>
#include <utility>
#include <vector>

namespace protoserve::work_pool {
namespace {

// Chunks per participant: enough that a thread which falls behind leaves little for the
// others to wait on, few enough that claiming (one atomic add) stays negligible.
constexpr int64_t kChunksPerThread = 4;
constexpr uint64_t kFieldBits = 24;
constexpr uint64_t kFieldMask = (uint64_t{1} << kFieldBits) - 1;
constexpr int64_t kMaxChunks = int64_t{1} << 22;  // leaves room for over-claims in `next`
// ~100 us of pause instructions before an idle worker sleeps.
constexpr int kIdleSpins = 1 << 12;
// The caller spins this long on chunks still running elsewhere, then yields its core (the
// thread it waits for may be queued behind it).
constexpr int kWaitSpins = 1 << 10;

inline uint64_t generation_of(uint64_t ticket) { return ticket >> (2 * kFieldBits); }
inline uint64_t chunks_of(uint64_t ticket) { return (ticket >> kFieldBits) & kFieldMask; }
inline uint64_t next_of(uint64_t ticket) { return ticket & kFieldMask; }

thread_local bool tls_inside_region = false;

// Regions run on the pool, and chunks its workers ran: how tests see the pool at work.
std::atomic<int64_t> g_pool_regions{0};
std::atomic<int64_t> g_worker_chunks{0};

struct Job {
  RangeFn fn = nullptr;
  const void* context = nullptr;
  int64_t begin = 0;
  int64_t end = 0;
  int64_t chunk = 1;
  std::atomic<bool> failed{false};
  std::exception_ptr error;  // written by the one chunk that set `failed`
};

class Pool {
 public:
  explicit Pool(int num_workers) {
    threads_.reserve(num_workers);
    for (int i = 0; i < num_workers; ++i) threads_.emplace_back([this] { worker_loop(); });
  }

  ~Pool() {
    stop_.store(true);
    {
      std::lock_guard<std::mutex> lock(sleep_mutex_);
    }
    wake_.notify_all();
    for (auto& thread : threads_) thread.join();
  }

  int num_workers() const { return static_cast<int>(threads_.size()); }

  // The caller holds the pool's run lock (one region at a time).
  void run(int64_t begin, int64_t end, int64_t chunk, int64_t num_chunks, RangeFn fn,
           const void* context) {
    job_.fn = fn;
    job_.context = context;
    job_.begin = begin;
    job_.end = end;
    job_.chunk = chunk;
    job_.failed.store(false, std::memory_order_relaxed);
    job_.error = nullptr;
    done_.store(0, std::memory_order_relaxed);
    generation_ = (generation_ + 1) & 0xffff;
    if (generation_ == 0) generation_ = 1;  // 0 is the idle ticket's generation
    // seq_cst with the load of `sleepers_` below and the sleepers' increment-then-check, so
    // either the caller sees a sleeper and wakes it, or the sleeper sees this ticket.
    ticket_.store((generation_ << (2 * kFieldBits)) |
                  (static_cast<uint64_t>(num_chunks) << kFieldBits));
    if (sleepers_.load() > 0) {
      { std::lock_guard<std::mutex> lock(sleep_mutex_); }
      wake_.notify_all();
    }
    claim_chunks(true);
    // Chunks other threads claimed and still run: the only waiting left.
    int spins = 0;
    while (done_.load(std::memory_order_acquire) < num_chunks) {
      if (++spins < kWaitSpins) {
        _mm_pause();
      } else {
        std::this_thread::yield();
      }
    }
    if (job_.failed.load(std::memory_order_relaxed)) std::rethrow_exception(job_.error);
  }

 private:
  // Claims and runs chunks of the current job until none is left; returns its generation.
  uint64_t claim_chunks(bool is_caller) {
    const bool was_inside = tls_inside_region;
    tls_inside_region = true;
    uint64_t claimed;
    for (;;) {
      claimed = ticket_.fetch_add(1, std::memory_order_acq_rel);
      const uint64_t index = next_of(claimed);
      if (index >= chunks_of(claimed)) break;
      // The job slot is this generation's: the caller rewrites it only after every chunk
      // handed out (this one included) is counted done.
      const int64_t b = job_.begin + static_cast<int64_t>(index) * job_.chunk;
      const int64_t e = std::min(job_.end, b + job_.chunk);
      try {
        job_.fn(job_.context, b, e);
      } catch (...) {
        if (!job_.failed.exchange(true)) job_.error = std::current_exception();
      }
      done_.fetch_add(1, std::memory_order_release);
      if (!is_caller) g_worker_chunks.fetch_add(1, std::memory_order_relaxed);
    }
    tls_inside_region = was_inside;
    return generation_of(claimed);
  }

  void worker_loop() {
    uint64_t seen = 0;
    for (;;) {
      int spins = 0;
      uint64_t ticket = ticket_.load(std::memory_order_acquire);
      while (generation_of(ticket) == seen) {
        if (stop_.load(std::memory_order_relaxed)) return;
        if (++spins < kIdleSpins) {
          _mm_pause();
        } else {
          std::unique_lock<std::mutex> lock(sleep_mutex_);
          sleepers_.fetch_add(1);
          wake_.wait(lock, [&] { return stop_.load() || generation_of(ticket_.load()) != seen; });
          sleepers_.fetch_sub(1);
          spins = 0;
        }
        ticket = ticket_.load(std::memory_order_acquire);
      }
      seen = claim_chunks(false);
    }
  }

  std::atomic<uint64_t> ticket_{0};
  std::atomic<int64_t> done_{0};
  Job job_;
  uint64_t generation_ = 0;  // the caller's, under the run lock
  std::mutex sleep_mutex_;
  std::condition_variable wake_;
  std::atomic<int> sleepers_{0};
  std::atomic<bool> stop_{false};
  std::vector<std::thread> threads_;
};

// The pool and the lock that admits one region at a time. Both are rebuilt in a forked child
// (its copy of the pool has no threads; the lock may have been held by a parent thread) and
// never destroyed at exit (joining threads during static destruction can hang).
Pool* g_pool = nullptr;
std::mutex* g_run_lock = new std::mutex();
std::once_flag g_atfork_once;

void reset_after_fork() {
  g_pool = nullptr;  // leaked: its threads exist only in the parent
  g_run_lock = new std::mutex();
}

int read_enabled_from_env() {
  const char* value = std::getenv("PROTOSERVE_WORK_POOL");
  return (value != nullptr && std::strcmp(value, "0") == 0) ? 0 : 1;
}

std::atomic<int> g_enabled{read_enabled_from_env()};

void run_with_at_parallel_for(int64_t begin, int64_t end, int64_t grain, RangeFn fn,
                              const void* context) {
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) { fn(context, b, e); });
}

}  // namespace

bool enabled() { return g_enabled.load(std::memory_order_relaxed) != 0; }

void set_enabled(bool on) { g_enabled.store(on ? 1 : 0); }

bool swap_enabled(bool on) { return g_enabled.exchange(on ? 1 : 0) != 0; }

void run_range(int64_t begin, int64_t end, int64_t grain, RangeFn fn, const void* context) {
  if (begin >= end) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t range = end - begin;
  const int64_t num_threads = tls_inside_region ? 1 : at::get_num_threads();
  if (num_threads <= 1 || range <= grain) {
    fn(context, begin, end);
    return;
  }
  if (!enabled()) {
    run_with_at_parallel_for(begin, end, grain, fn, context);
    return;
  }
  const int64_t wanted = num_threads * kChunksPerThread;
  const int64_t chunk = std::max(grain, (range + wanted - 1) / wanted);
  const int64_t num_chunks = (range + chunk - 1) / chunk;
  if (num_chunks <= 1 || num_chunks > kMaxChunks) {
    if (num_chunks <= 1) {
      fn(context, begin, end);
    } else {
      run_with_at_parallel_for(begin, end, grain, fn, context);
    }
    return;
  }
  std::call_once(g_atfork_once, [] { pthread_atfork(nullptr, nullptr, reset_after_fork); });
  std::unique_lock<std::mutex> lock(*g_run_lock, std::try_to_lock);
  if (!lock.owns_lock()) {
    // Another thread's region is running on the pool: this one keeps to OpenMP's threads
    // rather than queueing behind it.
    run_with_at_parallel_for(begin, end, grain, fn, context);
    return;
  }
  const int num_workers = static_cast<int>(num_threads - 1);
  if (g_pool == nullptr || g_pool->num_workers() != num_workers) {
    delete g_pool;  // torch.set_num_threads changed the thread count
    g_pool = new Pool(num_workers);
  }
  g_pool_regions.fetch_add(1, std::memory_order_relaxed);
  g_pool->run(begin, end, chunk, num_chunks, fn, context);
}

std::pair<int64_t, int64_t> stats() {
  return {g_pool_regions.load(std::memory_order_relaxed),
          g_worker_chunks.load(std::memory_order_relaxed)};
}

}  // namespace protoserve::work_pool
