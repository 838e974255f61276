// Runs every SPPO_BENCH (or those whose name contains one of the comma-separated fragments of argv[1]); each prints its own table.
#include "tests/harness.h"

int main(int argc, char** argv) {
  const char* filter = argc > 1 ? argv[1] : nullptr;
  for (auto& c : sppo::harness::benches()) {
    if (filter && !sppo::harness::name_matches(c.name, filter)) continue;
    std::printf("== %s\n", c.name.c_str());
    std::fflush(stdout);
    c.fn();
  }
  return 0;
}
