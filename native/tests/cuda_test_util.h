// Helpers shared by the CUDA tests (cuda_ops_test, cuda_attention_test, cuda_head_test,
// cuda_model_test). No CUDA header is included: the tests are built, and skip, where the backend
// is not (cuda/cuda_backend.h exists in every build; its probe then says why not).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/rng.h"
#include "cuda/cuda_backend.h"
#include "ops/ops.h"
#include "tests/harness.h"

namespace sppo::testutil {

// Skips the calling test (harness::Skipped, with the probe's reason) where no CUDA device is usable.
inline void require_cuda() {
  const cuda::DeviceInfo info = cuda::probe();
  if (!info.available) throw harness::Skipped(info.why_not.empty() ? std::string("no CUDA device") : info.why_not);
}

// The bf16 op set on device 0, or a skip as require_cuda.
inline std::unique_ptr<Ops<bf16>> cuda_or_skip() {
  require_cuda();
  return cuda::make_ops(0);
}

// Backend memory for `count` elements of T, allocated (zeroed) and freed through an op set that
// must outlive it. At least one element is allocated, so an empty array still has a valid
// pointer. put / get copy bytes, without conversion (bf16 travels as bf16). Movable (so
// upload() can return one), not copyable. O is the op set's type: the bf16 op set, or an
// EncoderOps alone (cuda_encoder_test's fp32 encoder op set).
template <class T, class O = Ops<bf16>>
class DeviceArray {
 public:
  DeviceArray(O& ops, int64_t count)
      : ops_(&ops), p_(static_cast<T*>(ops.alloc_bytes(size_t(std::max<int64_t>(count, 1)) * sizeof(T)))), n_(count) {}
  DeviceArray(DeviceArray&& o) noexcept : ops_(o.ops_), p_(std::exchange(o.p_, nullptr)), n_(o.n_) {}
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  DeviceArray& operator=(DeviceArray&&) = delete;
  ~DeviceArray() {
    if (p_) ops_->free_bytes(p_);
  }

  T* data() const { return p_; }
  int64_t size() const { return n_; }
  O& ops() const { return *ops_; }

  // All size() elements from the host.
  void put(const std::vector<T>& host) {
    EXPECT_TRUE(int64_t(host.size()) == n_, "put: " << host.size() << " values into an array of " << n_);
    ops_->upload_bytes(p_, host.data(), host.size() * sizeof(T));
  }
  // The first `count` elements (waits for the backend's work so far), or all of them.
  std::vector<T> get(int64_t count) const {
    std::vector<T> host(static_cast<size_t>(count));
    ops_->download_bytes(host.data(), p_, host.size() * sizeof(T));
    return host;
  }
  std::vector<T> get() const { return get(n_); }

 private:
  O* ops_;
  T* p_;
  int64_t n_;
};

// A new array holding `host`.
template <class T, class O>
DeviceArray<T, O> upload(O& ops, const std::vector<T>& host) {
  DeviceArray<T, O> d(ops, int64_t(host.size()));
  d.put(host);
  return d;
}

inline constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

inline float round_bf16(float x) { return float(bf16(x)); }

inline std::vector<bf16> to_bf16(const std::vector<float>& v) {
  std::vector<bf16> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) r[i] = bf16(v[i]);
  return r;
}
inline std::vector<float> to_float(const std::vector<bf16>& v) {
  std::vector<float> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) r[i] = float(v[i]);
  return r;
}

// scale * N(0,1), rounded to bf16 (so the CPU and the GPU see the same values): value i is
// standard_normal(seed, stream, i). Any stream will do for a new test; the tests that came with
// their own stream (cuda_attention_test 7, cuda_head_test 0) pass it so their inputs stay the same.
inline std::vector<float> randn_bf16(int64_t n, uint64_t seed, double scale = 1.0, uint64_t stream = 1) {
  std::vector<float> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) v[size_t(i)] = round_bf16(float(scale * standard_normal(seed, stream, uint64_t(i))));
  return v;
}

// n ids uniform in [0, bound) (stream 3 of `seed`).
inline std::vector<int32_t> random_ids(int64_t n, int32_t bound, uint64_t seed) {
  std::vector<int32_t> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) v[size_t(i)] = int32_t(uniform01(seed, 3, uint64_t(i)) * bound) % bound;
  return v;
}

// max |a - b| / max |b| (max |a - b| where b is all zero); infinity when a or b holds a NaN, so
// outputs poisoned with NaN and never written fail. The tests' other error measures differ on purpose and stay
// with their tests: cuda_attention_test's max_rel_error_floored (NaN -> infinity, denominator
// floored, masked) and the L2 measures of cuda_ops_test (compare) and cuda_head_test (l2_rel_error).
inline double max_rel_error(const float* a, const float* b, int64_t n) {
  double num = 0, den = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double d = std::fabs(double(a[i]) - double(b[i]));
    if (std::isnan(d)) return std::numeric_limits<double>::infinity();
    num = std::max(num, d);
    den = std::max(den, std::fabs(double(b[i])));
  }
  return den > 0 ? num / den : num;
}

}  // namespace sppo::testutil
