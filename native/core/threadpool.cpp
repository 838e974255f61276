#include "threadpool.h"

#include <algorithm>
#include <memory>
#include <stdexcept>

namespace sppo {

namespace {
thread_local bool in_task = false;
thread_local int current_thread = 0;  // this thread's index in the pool running it
}  // namespace

ThreadPool::ThreadPool(int n_threads) {
  if (n_threads <= 0) n_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  n_threads_ = n_threads;
  for (int t = 1; t < n_threads_; ++t) workers_.emplace_back([this, t] { worker_loop(t); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  wake_.notify_all();
  for (auto& w : workers_) w.join();
}

namespace {
// Waking a sleeping thread through a condition variable costs tens of microseconds, as much
// as a small op; a worker therefore spins this many pauses (~50-100 us) before sleeping.
constexpr int kSpinIterations = 20000;
inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}
}  // namespace

void ThreadPool::drain(int thread, uint32_t generation) {
  in_task = true;
  current_thread = thread;
  for (;;) {
    uint64_t s = state_.load(std::memory_order_acquire);
    // Another run already, this one closed, or every task taken: nothing left here. An
    // n_tasks_ read as a newer run starts can only pass a state the CAS no longer matches.
    const int64_t n = n_tasks_.load(std::memory_order_relaxed);
    if (uint32_t(s >> 32) != generation || int64_t(s & 0xFFFFFFFFu) >= n) break;
    if (!state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel)) continue;
    // Task (s & 0xFFFFFFFF) of this run is ours; run() waits for it, so job_ and n_tasks_ stay
    // this run's until it is done.
    try {
      (*job_.load(std::memory_order_relaxed))(int64_t(s & 0xFFFFFFFFu), thread);
    } catch (...) {
      // Kept for run() to rethrow on the caller's thread; the remaining tasks still drain.
      std::lock_guard<std::mutex> lock(error_mutex_);
      if (!error_) error_ = std::current_exception();
    }
    if (done_.fetch_add(1, std::memory_order_acq_rel) + 1 == n) {
      std::lock_guard<std::mutex> lock(mutex_);
      done_cv_.notify_one();
    }
  }
  in_task = false;
}

void ThreadPool::worker_loop(int thread) {
  uint32_t seen = 0;
  for (;;) {
    auto current = [&] { return uint32_t(state_.load(std::memory_order_acquire) >> 32); };
    for (int i = 0; i < kSpinIterations && current() == seen; ++i) cpu_relax();
    uint32_t generation = current();
    if (generation == seen) {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      generation = generation_;
    }
    drain(thread, generation);
    seen = generation;
  }
}

void ThreadPool::run(int64_t n_tasks, FnRef<void(int64_t, int)> fn) {
  if (n_tasks <= 0) return;
  if (in_task || n_threads_ == 1 || n_tasks == 1) {
    // Nested calls keep the caller's thread index, so per-thread scratch stays private.
    int thread = in_task ? current_thread : 0;
    for (int64_t i = 0; i < n_tasks; ++i) fn(i, thread);
    return;
  }
  if (n_tasks >= int64_t(0xFFFFFFFFu)) throw std::length_error("ThreadPool::run: 2^32 - 1 tasks or more");
  std::lock_guard<std::mutex> run_lock(run_mutex_);
  uint32_t generation;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    job_.store(&fn, std::memory_order_relaxed);
    n_tasks_.store(n_tasks, std::memory_order_relaxed);
    error_ = nullptr;
    done_.store(0, std::memory_order_relaxed);
    // Run numbers wrap after 2^32 runs (hours of small ops); 0 means "no run yet".
    if (++generation_ == 0) ++generation_;
    generation = generation_;
    // Publishes job_, n_tasks_ and done_ with the run's number (release).
    state_.store(uint64_t(generation) << 32, std::memory_order_release);
  }
  wake_.notify_all();
  drain(0, generation);
  for (int i = 0; i < kSpinIterations && done_.load(std::memory_order_acquire) != n_tasks; ++i) cpu_relax();
  {
    std::unique_lock<std::mutex> lock(mutex_);
    done_cv_.wait(lock, [&] { return done_.load(std::memory_order_acquire) == n_tasks; });
  }
  // Closed: a worker still holding this run's state can no longer claim a task (its CAS fails),
  // whatever the next run writes to n_tasks_ and job_.
  state_.store((uint64_t(generation) << 32) | 0xFFFFFFFFu, std::memory_order_release);
  if (error_) std::rethrow_exception(error_);
}

void ThreadPool::parallel_for(int64_t n, int64_t grain, FnRef<void(int64_t, int64_t)> fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  // A few chunks per thread so that uneven chunks still balance.
  int64_t chunks = std::min<int64_t>((n + grain - 1) / grain, static_cast<int64_t>(n_threads_) * 4);
  chunks = std::max<int64_t>(1, chunks);
  int64_t per = (n + chunks - 1) / chunks;
  run((n + per - 1) / per, [&](int64_t c, int) {
    int64_t b = c * per;
    fn(b, std::min(n, b + per));
  });
}

namespace {
std::unique_ptr<ThreadPool>& pool_slot() {
  static std::unique_ptr<ThreadPool> pool = std::make_unique<ThreadPool>(0);
  return pool;
}
}  // namespace

ThreadPool& cpu_pool() { return *pool_slot(); }

void set_num_threads(int n) { pool_slot() = std::make_unique<ThreadPool>(n); }

int num_threads() { return cpu_pool().size(); }

}  // namespace sppo
