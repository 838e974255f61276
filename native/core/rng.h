// Counter-based random numbers: value i of stream s depends only on (seed, s, i), so parallel
// initialisation and sampling give the same numbers whatever the thread count.
#pragma once
#include <cstdint>

namespace sppo {

uint64_t mix64(uint64_t x);
// A uniform double in (0, 1) for (seed, stream, index).
double uniform01(uint64_t seed, uint64_t stream, uint64_t index);
// A standard normal for (seed, stream, index) (Box–Muller on two uniforms).
double standard_normal(uint64_t seed, uint64_t stream, uint64_t index);

}  // namespace sppo
