// bfloat16 as a storage type on the host side: the CUDA backend keeps parameters and activations
// in it, while host code only moves and converts it. Conversions round to nearest even, the
// rounding PyTorch and CUDA's __float2bfloat16 use, so a value converted here or on the device
// gets the same bits.
#pragma once
#include <cstdint>
#include <cstring>

namespace sppo {

struct bf16 {
  uint16_t bits = 0;
  bf16() = default;
  explicit bf16(float f) : bits(from_float(f)) {}
  explicit bf16(double d) : bf16(float(d)) {}
  explicit operator float() const {
    const uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
  explicit operator double() const { return double(float(*this)); }

  static uint16_t from_float(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu))  // NaN: keep it a (quiet) NaN
      return uint16_t((u >> 16) | 0x0040u);
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
    return uint16_t(u >> 16);
  }
};
static_assert(sizeof(bf16) == 2, "bf16 must be two bytes");

// The precision a backend keeps master weights, gradients, optimizer state, normalisation
// statistics and log-sum-exps in: the storage type itself for float and double, float for bf16.
template <class T>
struct MasterOf {
  using type = T;
};
template <>
struct MasterOf<bf16> {
  using type = float;
};
template <class T>
using master_t = typename MasterOf<T>::type;

}  // namespace sppo
