// Runs every SPPO_TEST (or those whose name contains one of the comma-separated fragments of argv[1]) and prints a summary line
// "N passed, N failed" that CI reads.
#include <chrono>
#include <cstring>

#include "harness.h"

int main(int argc, char** argv) {
  const char* filter = argc > 1 ? argv[1] : nullptr;
  int passed = 0, failed = 0, skipped = 0;
  for (auto& c : sppo::harness::tests()) {
    if (filter && !sppo::harness::name_matches(c.name, filter)) continue;
    auto t0 = std::chrono::steady_clock::now();
    try {
      c.fn();
      ++passed;
      double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      std::printf("ok    %s (%.0f ms)\n", c.name.c_str(), ms);
    } catch (const sppo::harness::Skipped& e) {
      ++skipped;
      std::printf("skip  %s (%s)\n", c.name.c_str(), e.what());
    } catch (const std::exception& e) {
      ++failed;
      std::printf("FAIL  %s\n      %s\n", c.name.c_str(), e.what());
    }
    std::fflush(stdout);
  }
  if (skipped) std::printf("%d skipped\n", skipped);
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed ? 1 : 0;
}
