// The fused LM head + sequence log-prob (forward and backward) against the unfused way that
// materialises all N x V logits, at the shapes: N = 4096 tokens, d = 512 / 1024, V = 32000.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <vector>

#include "core/rng.h"
#include "core/threadpool.h"
#include "cpu/cpu_ops.h"
#include "cpu/gemm.h"
#include "cpu/vecmath.h"
#include "tests/harness.h"

using namespace sppo;

namespace {

// The unfused path as a framework runs it: all logits, log-softmax, gather, then the backward
// from the full (N, V) gradient (computed in place, so this is already its frugal form).
void unfused(std::vector<float>& logits, const std::vector<float>& H, const std::vector<float>& W,
             const std::vector<int32_t>& targets, const std::vector<double>& coef, std::vector<float>& dH,
             std::vector<float>& dW, int64_t N, int64_t C, int64_t V) {
  cpu::gemm(false, true, N, V, C, 1.0f, H.data(), C, W.data(), C, 0.0f, logits.data(), V);
  cpu_pool().parallel_for(N, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      float* x = logits.data() + i * V;
      float mx = *std::max_element(x, x + V);
      const double sum = cpu::exp_shifted_sum(x, x, V, mx);
      const float k = float(-coef[i] / sum);
      for (int64_t j = 0; j < V; ++j) x[j] *= k;
      x[targets[i]] += float(coef[i]);
    }
  });
  cpu::gemm(false, false, N, C, V, 1.0f, logits.data(), V, W.data(), C, 0.0f, dH.data(), C);
  cpu::gemm(true, false, V, C, N, 1.0f, logits.data(), V, H.data(), C, 1.0f, dW.data(), C);
}

}  // namespace

SPPO_BENCH(fused_head) {
  const int64_t N = 4096, V = 32000;
  std::printf("threads %d; N %lld, V %lld; median of 3 fwd+bwd\n", num_threads(), (long long)N, (long long)V);
  std::printf("%-6s %-10s %10s %14s\n", "d", "path", "ms", "extra MiB");
  for (int64_t C : {512, 1024}) {
    std::vector<float> H(N * C), W(V * C), dH(N * C), dW(V * C);
    for (int64_t i = 0; i < N * C; ++i) H[i] = float(standard_normal(1, 0, i));
    for (int64_t i = 0; i < V * C; ++i) W[i] = float(0.05 * standard_normal(2, 0, i));
    std::vector<int32_t> targets(N);
    std::vector<double> coef(N, -1.0 / N), logp(N), lse(N);
    for (int64_t i = 0; i < N; ++i) targets[i] = int32_t(uniform01(3, 0, i) * V);
    // The tile budget the model gives the CPU head (Ops::head_scratch_elems, 16 MiB of logits).
    cpu::CpuOps<float> ops;
    const int64_t chunk = ops.head_scratch_elems();
    std::vector<float> scratch(chunk);
    const double fused = harness::median_seconds(3, [&] {
      ops.head_logprobs(logp.data(), lse.data(), H.data(), W.data(), targets.data(), N, C, V, scratch.data(), chunk);
      ops.head_logprobs_backward(dH.data(), dW.data(), H.data(), W.data(), targets.data(), lse.data(), coef.data(), N,
                                 C, V, scratch.data(), chunk);
    });
    const double fused_extra = (scratch.size() * sizeof(float) + 2.0 * N * sizeof(double)) / 1048576.0;
    std::vector<float> logits(N * V);
    const double plain = harness::median_seconds(3, [&] { unfused(logits, H, W, targets, coef, dH, dW, N, C, V); });
    const double plain_extra = logits.size() * sizeof(float) / 1048576.0;
    std::printf("%-6lld %-10s %10.1f %14.1f\n", (long long)C, "fused", fused * 1e3, fused_extra);
    std::printf("%-6lld %-10s %10.1f %14.1f\n", (long long)C, "unfused", plain * 1e3, plain_extra);
    std::printf("d %lld: fused/unfused time %.2f, extra memory %.3f\n", (long long)C, fused / plain,
                fused_extra / plain_extra);
    std::fflush(stdout);
  }
}
