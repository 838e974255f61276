// A fixed pool of worker threads that every CPU kernel shares.
//
// Work is split into tasks that are handed out through an atomic counter, so uneven tasks
// (causal attention rows) balance themselves. Kernels keep results deterministic by making
// each task write its own outputs; reductions go through fixed task partitions that do not
// depend on the thread count, summed in task order by the caller.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

namespace sppo {

// A non-owning reference to a callable: unlike std::function it never allocates, so handing
// work to the pool costs nothing on the heap inside the training loop.
template <class Sig>
class FnRef;
template <class R, class... Args>
class FnRef<R(Args...)> {
 public:
  template <class F, class = std::enable_if_t<!std::is_same_v<std::decay_t<F>, FnRef>>>
  FnRef(F&& f)  // NOLINT: implicit by design, like std::function
      : obj_(const_cast<void*>(static_cast<const void*>(&f))),
        call_([](void* o, Args... a) -> R { return (*static_cast<std::remove_reference_t<F>*>(o))(a...); }) {}
  R operator()(Args... a) const { return call_(obj_, a...); }

 private:
  void* obj_;
  R (*call_)(void*, Args...);
};

class ThreadPool {
 public:
  // n_threads counts the calling thread too; 0 means one per hardware thread.
  explicit ThreadPool(int n_threads = 0);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return n_threads_; }

  // Calls fn(task, thread) for every task in [0, n_tasks); `thread` is in [0, size()) and lets
  // a kernel use per-thread scratch. Returns when all tasks are done, rethrowing the first
  // exception a task threw. Called from inside a task, it runs the tasks inline on the
  // current thread (no nested fan-out).
  void run(int64_t n_tasks, FnRef<void(int64_t task, int thread)> fn);

  // Splits [0, n) into contiguous chunks of at least `grain` items and calls fn(begin, end).
  void parallel_for(int64_t n, int64_t grain, FnRef<void(int64_t, int64_t)> fn);

 private:
  void worker_loop(int thread);
  void drain(int thread, uint32_t generation);

  int n_threads_;
  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable done_cv_;
  std::mutex run_mutex_;     // one run() at a time per pool
  uint32_t generation_ = 0;  // the current run's number (never 0), under mutex_: what sleeping workers wait on
  bool stop_ = false;
  // The current run: its number (high 32 bits) and next unclaimed task (low 32 bits; all ones
  // once the run is over), so a worker claims a task of the run it woke for or of none. run()
  // waits for the tasks, never for the workers: one that a busy machine has not scheduled yet
  // simply takes no task.
  std::atomic<uint64_t> state_{0};
  std::atomic<const FnRef<void(int64_t, int)>*> job_{nullptr};
  std::atomic<int64_t> n_tasks_{0};
  std::atomic<int64_t> done_{0};  // tasks of the current run finished
  std::mutex error_mutex_;
  std::exception_ptr error_;  // the first exception a task threw in the current run
};

// The process-wide pool the CPU backend uses. set_num_threads rebuilds it (not during a run).
ThreadPool& cpu_pool();
void set_num_threads(int n);
int num_threads();

}  // namespace sppo
