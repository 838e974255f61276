// The shared thread pool: every task of every run runs exactly once, on a valid thread index,
// runs follow each other without a late worker touching a finished run, and a task's exception
// reaches the caller without losing the other tasks.
#include <atomic>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/threadpool.h"
#include "tests/harness.h"

SPPO_TEST(threadpool_runs_each_task_exactly_once_over_many_short_runs) {
  // Short runs back to back are where a worker that wakes late could claim a task of a run
  // that is over (or of the next one before it is set up): any such task shows as a miscount.
  for (int threads : {2, 3}) {
    sppo::ThreadPool pool(threads);
    for (int r = 0; r < 20000; ++r) {
      const int64_t n = 2 + r % 11;
      auto hits = std::make_unique<std::atomic<int>[]>(n);
      for (int64_t t = 0; t < n; ++t) hits[t].store(0);
      std::atomic<int> bad_thread{0};
      pool.run(n, [&](int64_t t, int thread) {
        if (thread < 0 || thread >= threads) bad_thread.fetch_add(1);
        hits[t].fetch_add(1);
      });
      EXPECT_TRUE(bad_thread.load() == 0, "run " << r << ": a task saw a thread index outside [0, " << threads << ")");
      for (int64_t t = 0; t < n; ++t)
        EXPECT_TRUE(hits[t].load() == 1, "run " << r << " task " << t << " ran " << hits[t].load() << " times");
    }
  }
}

SPPO_TEST(threadpool_rethrows_a_task_error_and_keeps_working) {
  sppo::ThreadPool pool(2);
  std::atomic<int> ran{0};
  bool threw = false;
  try {
    pool.run(16, [&](int64_t t, int) {
      ran.fetch_add(1);
      if (t == 5) throw std::runtime_error("task 5 failed");
    });
  } catch (const std::runtime_error& e) {
    threw = std::string(e.what()) == "task 5 failed";
  }
  EXPECT_TRUE(threw, "the task's exception did not reach the caller");
  EXPECT_TRUE(ran.load() == 16, "the other tasks still run: " << ran.load() << " of 16 ran");
  std::atomic<int> after{0};
  pool.run(8, [&](int64_t, int) { after.fetch_add(1); });
  EXPECT_TRUE(after.load() == 8, "the next run after a failed one ran " << after.load() << " of 8 tasks");
}
