#include "rng.h"

#include <cmath>

namespace sppo {

uint64_t mix64(uint64_t x) {  // splitmix64 finaliser: a bijection with full avalanche
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

static uint64_t draw(uint64_t seed, uint64_t stream, uint64_t index) {
  return mix64(mix64(mix64(seed) ^ stream) ^ index);
}

double uniform01(uint64_t seed, uint64_t stream, uint64_t index) {
  // 53 random bits, shifted by half a step so the result is never exactly 0 or 1.
  return (static_cast<double>(draw(seed, stream, index) >> 11) + 0.5) * 0x1.0p-53;
}

double standard_normal(uint64_t seed, uint64_t stream, uint64_t index) {
  double u1 = uniform01(seed, stream, 2 * index);
  double u2 = uniform01(seed, stream, 2 * index + 1);
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
}

}  // namespace sppo
