// Times the float gemm on the model's linear-layer shapes (compare with bench/gemm_openblas.py).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "core/threadpool.h"
#include "cpu/gemm.h"
#include "tests/harness.h"

namespace {

struct Shape {
  const char* name;
  int64_t M, N, K;
  bool tA, tB;
  float beta;
};

// The shapes of bench/gemm_openblas.py, in the same order. fwd: y = x W^T; bwd_dx: dx = dy W;
// bwd_dw: dW += dy^T x (beta 1); decode: a few rows through a forward layer; head: the LM head.
std::vector<Shape> model_shapes() {
  std::vector<Shape> v;
  const int64_t T = 4096;
  const int64_t nk[][2] = {{512, 512}, {256, 512}, {1376, 512}, {512, 1376}, {8192, 512},
                           {256, 256}, {688, 256}, {256, 688},  {512, 256}};
  for (auto& s : nk) v.push_back({"fwd", T, s[0], s[1], false, true, 0.0f});
  for (auto& s : nk) v.push_back({"bwd_dx", T, s[1], s[0], false, false, 0.0f});
  for (auto& s : nk) v.push_back({"bwd_dw", s[0], s[1], T, true, false, 1.0f});
  for (const char* name : {"decode", "decode+p"})
    for (int64_t m : {1, 2, 4, 16, 64}) {
      v.push_back({name, m, 1376, 512, false, true, 0.0f});
      v.push_back({name, m, 512, 1376, false, true, 0.0f});
    }
  // The `small` preset's LM head at batch 1 and 4 (16 MiB of weights: streamed from memory).
  for (const char* name : {"head", "head+p"})
    for (int64_t m : {1, 4}) v.push_back({name, m, 8192, 512, false, true, 0.0f});
  return v;
}

}  // namespace

SPPO_BENCH(gemm_model_shapes) {
  std::printf("kernel %s, %d threads\n", sppo::cpu::gemm_kernel_name(), sppo::num_threads());
  std::printf("%-8s %6s %6s %6s %5s %10s %9s\n", "case", "M", "N", "K", "trans", "ms", "GFLOP/s");
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  for (const Shape& s : model_shapes()) {
    // Stored shapes: A is (M,K) or (K,M) when transposed; B is (K,N) or (N,K).
    std::vector<float> A(s.M * s.K), B(s.K * s.N), C(s.M * s.N, 0.0f);
    for (auto& x : A) x = dist(rng);
    for (auto& x : B) x = dist(rng);
    const int64_t lda = s.tA ? s.M : s.K, ldb = s.tB ? s.K : s.N;
    const double flop = 2.0 * s.M * s.N * s.K;
    // Enough repetitions for ~0.3 s of work (at least 5) after two warm-up calls.
    int reps = std::clamp(static_cast<int>(0.3 * 200e9 / flop), 5, 200);
    // "decode" and "head" rows also run over the weights packed once (a generator's decode steps).
    const bool packed = s.name == std::string("decode+p") || s.name == std::string("head+p");
    // The copy must be 64-byte aligned: 16 floats of slack, and the first aligned one.
    std::vector<float> Wp(packed ? sppo::cpu::packed_weight_floats(s.N, s.K) + 16 : 0);
    float* wp = packed ? Wp.data() + (16 - (reinterpret_cast<uintptr_t>(Wp.data()) / 4) % 16) % 16 : nullptr;
    if (packed) sppo::cpu::pack_weight(B.data(), ldb, s.N, s.K, wp);
    auto call = [&] {
      if (packed)
        sppo::cpu::gemm_packed_weight(s.M, s.N, s.K, 1.0f, A.data(), lda, B.data(), ldb, wp, s.beta, C.data(), s.N);
      else
        sppo::cpu::gemm(s.tA, s.tB, s.M, s.N, s.K, 1.0f, A.data(), lda, B.data(), ldb, s.beta, C.data(), s.N);
    };
    call();
    call();
    std::vector<double> ms;
    for (int r = 0; r < reps; ++r) {
      auto t0 = std::chrono::steady_clock::now();
      call();
      ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
    std::sort(ms.begin(), ms.end());
    double med = ms[ms.size() / 2];
    std::string tr = std::string(s.tA ? "T" : "N") + (s.tB ? "T" : "N");
    std::printf("%-8s %6lld %6lld %6lld %5s %10.4f %9.1f\n", s.name, (long long)s.M, (long long)s.N, (long long)s.K,
                tr.c_str(), med, flop / med * 1e-6);
    std::fflush(stdout);
  }
}
