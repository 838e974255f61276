// A minimal registry for the C++ tests and kernel benchmarks (no Node, no external framework),
// so kernels can be checked and timed on machines that have only a compiler.
#pragma once
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <functional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace sppo::harness {

struct Case {
  std::string name;
  std::function<void()> fn;
};

inline std::vector<Case>& tests() {
  static std::vector<Case> v;
  return v;
}
inline std::vector<Case>& benches() {
  static std::vector<Case> v;
  return v;
}

// A command line's filter: a comma-separated list of name fragments; a case runs when its name
// contains any of them.
inline bool name_matches(const std::string& name, const std::string& filter) {
  size_t at = 0;
  while (at <= filter.size()) {
    const size_t end = std::min(filter.find(',', at), filter.size());
    if (end > at && name.find(filter.substr(at, end - at)) != std::string::npos) return true;
    at = end + 1;
  }
  return false;
}

struct Register {
  Register(std::vector<Case>& list, const char* name, std::function<void()> fn) {
    list.push_back({name, std::move(fn)});
  }
};

struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// Thrown by a test that cannot run here (e.g. a CUDA test without a GPU): reported as skipped
// with its reason, counted neither as passed nor as failed.
struct Skipped : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Benchmarks: the median wall-clock seconds of `reps` calls after one warm-up call (which takes
// the first-touch page faults and one-time scratch growth).
template <class F>
double median_seconds(int reps, F&& f) {
  f();
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    f();
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

}  // namespace sppo::harness

#define SPPO_CAT2(a, b) a##b
#define SPPO_CAT(a, b) SPPO_CAT2(a, b)
// SPPO_TEST(name) { ... }  registers a test case; SPPO_BENCH likewise for the benchmark binary.
#define SPPO_TEST(name)                                                                         \
  static void name();                                                                           \
  static ::sppo::harness::Register SPPO_CAT(reg_, name)(::sppo::harness::tests(), #name, name); \
  static void name()
#define SPPO_BENCH(name)                                                                           \
  static void name();                                                                              \
  static ::sppo::harness::Register SPPO_CAT(regb_, name)(::sppo::harness::benches(), #name, name); \
  static void name()

// EXPECT(cond) << "message"-style checks are overkill here: a failed check throws with the
// file, line and a formatted explanation.
#define EXPECT_TRUE(cond, ...)                                                                  \
  do {                                                                                          \
    if (!(cond)) {                                                                              \
      std::ostringstream os_;                                                                   \
      os_ << __FILE__ << ":" << __LINE__ << ": expected " #cond " " __VA_OPT__(<< __VA_ARGS__); \
      throw ::sppo::harness::Failure(os_.str());                                                \
    }                                                                                           \
  } while (0)
#define EXPECT_NEAR(a, b, tol)                                                                                      \
  do {                                                                                                              \
    double a_ = (a), b_ = (b);                                                                                      \
    if (!(std::fabs(a_ - b_) <= (tol))) {                                                                           \
      std::ostringstream os_;                                                                                       \
      os_ << __FILE__ << ":" << __LINE__ << ": " #a " = " << a_ << " vs " #b " = " << b_ << " (tolerance " << (tol) \
          << ")";                                                                                                   \
      throw ::sppo::harness::Failure(os_.str());                                                                    \
    }                                                                                                               \
  } while (0)
// Expects `stmt` to throw an exception whose message contains `fragment`.
#define EXPECT_THROWS_WITH(stmt, fragment)                                                                \
  do {                                                                                                    \
    bool threw_ = false;                                                                                  \
    try {                                                                                                 \
      stmt;                                                                                               \
    } catch (const std::exception& e_) {                                                                  \
      threw_ = true;                                                                                      \
      if (std::string(e_.what()).find(fragment) == std::string::npos) {                                   \
        std::ostringstream os_;                                                                           \
        os_ << __FILE__ << ":" << __LINE__ << ": error '" << e_.what() << "' lacks '" << fragment << "'"; \
        throw ::sppo::harness::Failure(os_.str());                                                        \
      }                                                                                                   \
    }                                                                                                     \
    if (!threw_) throw ::sppo::harness::Failure(std::string(__FILE__) + ": " #stmt " did not throw");     \
  } while (0)
