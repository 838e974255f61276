// The CUDA LM head and sampler against the CPU backend: the fused head's target log-probs and
// its backward on fresh random bf16 inputs at sizes that cross tile edges both ways, its extra
// memory at the Llama-3-8B training shape, and the sampler token for token against sample_token
// plus a chi-square test of its draws. Every test skips where no CUDA device is usable.
//
// Tolerances. Both backends get the same bf16 values and accumulate the logits in fp32, so the
// logits agree to about C·2^-24·Σ|h·w| (≈ 1e-6 here) and the log-sum-exps as well; the target
// logit is a double dot product on both. logp and lse: |gpu − cpu| <= 1e-4 absolute (>= 10x the
// accumulation error at C <= 256, logits of standard deviation 2). The backward rounds dlogits to
// bf16 for its GEMMs (relative rms rounding error ≈ 1.6e-3 per element, uncorrelated) and dH to
// bf16 at the end, so dH and the dW increment are checked as ‖gpu − cpu‖ / ‖cpu‖ <= 1e-2 (expected
// ≈ 2e-3 to 4e-3; GPU.md's bf16 band). NaN never passes: outputs start poisoned with NaN.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#if defined(SPPO_WITH_CUDA) && __has_include(<cuda_runtime_api.h>)
#include <cuda_runtime_api.h>
#define SPPO_HEAD_TEST_MEMINFO 1
#endif

#include "core/rng.h"
#include "cpu/cpu_ops.h"
#include "cpu/sampler.h"
#include "cuda/cuda_backend.h"
#include "sppo/generate.h"
#include "tests/cuda_test_util.h"
#include "tests/harness.h"
#include "tests/sampling_reference.h"

using namespace sppo;
using namespace sppo::testutil;

namespace {

constexpr uint64_t kInputStream = 0;  // the rng stream of this file's bf16 inputs

// ‖a − b‖ / ‖ref‖ in double (NaN anywhere makes it NaN). Unlike cuda_ops_test's compare(), the
// norm is that of a separate reference (the dW increment), with no fallback when it is zero.
template <class A, class B, class R>
double l2_rel_error(const A& a, const B& b, const R& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double d = double(a[i]) - double(b[i]);
    num += d * d;
    den += double(ref[i]) * double(ref[i]);
  }
  return std::sqrt(num / den);
}

double device_free_bytes() {
#ifdef SPPO_HEAD_TEST_MEMINFO
  size_t free_b = 0, total_b = 0;
  if (cudaMemGetInfo(&free_b, &total_b) == cudaSuccess) return double(free_b);
#endif
  return std::numeric_limits<double>::quiet_NaN();
}

struct HeadCase {
  int64_t n, C, V, scratch_elems;
};

void check_head(Ops<bf16>& gpu, const HeadCase& hc, uint64_t seed) {
  const int64_t n = hc.n, C = hc.C, V = hc.V, elems = hc.scratch_elems;
  const std::vector<float> H = randn_bf16(n * C, seed, 1.0, kInputStream),
                           W = randn_bf16(V * C, seed + 1, 2.0 / std::sqrt(double(C)), kInputStream);
  std::vector<int32_t> targets(n);
  for (int64_t i = 0; i < n; ++i) targets[i] = int32_t(uniform01(seed + 2, 0, i) * double(V));
  // Targets on vocabulary-tile edges (tiles are multiples of 64 wide), then random ones.
  const int64_t edges[] = {0, V - 1, 255, 256, 63, 64, 511, 512, 257, V - 2, V / 2};
  for (int64_t e = 0; e < std::min<int64_t>(n, 11); ++e) targets[e] = int32_t(std::clamp<int64_t>(edges[e], 0, V - 1));
  std::vector<double> coef(n);
  for (int64_t i = 0; i < n; ++i) coef[i] = standard_normal(seed + 3, 0, i);
  std::vector<float> dW0(V * C);
  for (int64_t i = 0; i < V * C; ++i) dW0[i] = float(1e-3 * standard_normal(seed + 4, 0, i));

  // The CPU reference on the same (bf16-valued) inputs.
  cpu::CpuOps<float> cpu;
  std::vector<float> cpu_scratch(elems), dH_cpu(n * C), dW_cpu = dW0;
  std::vector<double> logp_cpu(n), lse_cpu(n);
  cpu.head_logprobs(logp_cpu.data(), lse_cpu.data(), H.data(), W.data(), targets.data(), n, C, V, cpu_scratch.data(),
                    elems);
  cpu.head_logprobs_backward(dH_cpu.data(), dW_cpu.data(), H.data(), W.data(), targets.data(), lse_cpu.data(),
                             coef.data(), n, C, V, cpu_scratch.data(), elems);

  const double nan = std::numeric_limits<double>::quiet_NaN();
  DeviceArray<bf16> dH(gpu, n * C), dHin(gpu, n * C), dWin(gpu, V * C);
  DeviceArray<float> dW(gpu, V * C), dscratch(gpu, elems);
  DeviceArray<int32_t> dtargets(gpu, n);
  DeviceArray<double> dcoef(gpu, n), dlogp(gpu, n), dlse(gpu, n);
  dHin.put(to_bf16(H));
  dWin.put(to_bf16(W));
  dtargets.put(targets);
  dcoef.put(coef);
  dlogp.put(std::vector<double>(n, nan));
  dlse.put(std::vector<double>(n, nan));
  dscratch.put(std::vector<float>(elems, float(nan)));
  dH.put(std::vector<bf16>(n * C, bf16(float(nan))));
  dW.put(dW0);

  gpu.head_logprobs(dlogp.data(), dlse.data(), dHin.data(), dWin.data(), dtargets.data(), n, C, V, dscratch.data(),
                    elems);
  const std::vector<double> logp = dlogp.get(), lse = dlse.get();
  double logp_err = 0, lse_err = 0;
  for (int64_t i = 0; i < n; ++i) {
    EXPECT_TRUE(std::fabs(logp[i] - logp_cpu[i]) <= 1e-4, "n " << n << " C " << C << " V " << V << " row " << i
                                                               << ": logp " << logp[i] << " vs cpu " << logp_cpu[i]);
    EXPECT_TRUE(std::fabs(lse[i] - lse_cpu[i]) <= 1e-4, "n " << n << " C " << C << " V " << V << " row " << i
                                                             << ": lse " << lse[i] << " vs cpu " << lse_cpu[i]);
    logp_err = std::max(logp_err, std::fabs(logp[i] - logp_cpu[i]));
    lse_err = std::max(lse_err, std::fabs(lse[i] - lse_cpu[i]));
  }

  gpu.head_logprobs_backward(dH.data(), dW.data(), dHin.data(), dWin.data(), dtargets.data(), dlse.data(), dcoef.data(),
                             n, C, V, dscratch.data(), elems);
  const std::vector<float> dH_gpu = to_float(dH.get());
  const std::vector<float> dW_gpu = dW.get();
  std::vector<double> dW_inc(V * C);
  for (int64_t i = 0; i < V * C; ++i) dW_inc[i] = double(dW_cpu[i]) - double(dW0[i]);
  const double dH_err = l2_rel_error(dH_gpu, dH_cpu, dH_cpu), dW_err = l2_rel_error(dW_gpu, dW_cpu, dW_inc);
  std::printf(
      "      head n %lld C %lld V %lld scratch %lld: |logp| err %.2e, |lse| err %.2e, dH rel %.2e, dW rel %.2e\n",
      (long long)n, (long long)C, (long long)V, (long long)elems, logp_err, lse_err, dH_err, dW_err);
  EXPECT_TRUE(dH_err <= 1e-2, "n " << n << " C " << C << " V " << V << ": dH relative error " << dH_err);
  EXPECT_TRUE(dW_err <= 1e-2, "n " << n << " C " << C << " V " << V << ": dW relative error " << dW_err);
}

// rows × V logits: rows 0 and 1 continuous, rows 2 and up quantised to quarters (many ties, at the
// k-th logit too); the last row has its maximum twice (ids 3 and V − 3).
std::vector<float> sampler_logits(int64_t rows, int64_t V, uint64_t seed) {
  std::vector<float> x(rows * V);
  for (int64_t r = 0; r < rows; ++r) {
    float* row = x.data() + r * V;
    for (int64_t j = 0; j < V; ++j) {
      const double g = standard_normal(seed, r, j);
      row[j] = r < 2 ? float(2.5 * g) : float(std::round(8 * g) / 4);
    }
  }
  float* last = x.data() + (rows - 1) * V;
  const float top = *std::max_element(last, last + V) + 0.5f;
  last[3] = last[V - 3] = top;
  return x;
}

// The truncated sampler's hard rows, by kind: continuous; near-uniform (a random-weight model:
// top-p 0.9 keeps ~90% of the vocabulary); quarters and whole numbers (ties at every cutoff);
// peaked and very peaked; a constant row; ±0 ties; −inf and −3e38 / −1e30 logits among normal ones.
constexpr const char* kHardKinds[] = {"continuous",  "near-uniform", "quarters",     "integers", "peaked",
                                      "very peaked", "constant",     "signed zeros", "-inf",     "-huge"};
std::vector<float> hard_row(int kind, int64_t V, uint64_t seed) {
  std::vector<float> r(V);
  for (int64_t j = 0; j < V; ++j) {
    const double g = standard_normal(seed, kind, j);
    switch (kind) {
      case 0:
        r[j] = float(2.5 * g);
        break;
      case 1:
        r[j] = float(0.02 * g);
        break;
      case 2:
        r[j] = float(std::round(8 * g) / 4);
        break;
      case 3:
        r[j] = float(std::round(g));
        break;
      case 4:
        r[j] = float(2 * g + (j % 997 == 5 ? 12 : 0));
        break;
      case 5:
        r[j] = float(30 * g);
        break;
      case 6:
        r[j] = 1.25f;
        break;
      case 7:
        r[j] = j % 3 == 0 ? 0.0f : j % 3 == 1 ? -0.0f : float(std::round(g) / 2);
        break;
      case 8:
        r[j] = j % 4 == 1 ? -std::numeric_limits<float>::infinity() : float(1.5 * g);
        break;
      default:
        r[j] = j % 5 == 2 ? -3e38f : j % 5 == 3 ? -1e30f : float(g);
        break;
    }
  }
  return r;
}

// How close sample_token's thresholds came to a cumulative boundary of its walk, relative to the
// kept total: the smallest |cum − top_p·z| / z over the kept candidates and |cum − u·z| / z over
// the nucleus, from the weights sample_token left in `work`. The last sum of each walk is no
// boundary: top_p·z and u·z stay below it, and both samplers take the last candidate there.
double cpu_boundary_gap(const float* x, int64_t V, const SamplingOptions& o, double u,
                        const cpu::SamplerScratch<float>& work) {
  std::vector<int32_t> ids(V);
  for (int64_t j = 0; j < V; ++j) ids[j] = int32_t(j);
  std::sort(ids.begin(), ids.end(), [&](int32_t a, int32_t b) { return x[a] > x[b] || (x[a] == x[b] && a < b); });
  int64_t kept = V;
  if (o.top_k > 0 && o.top_k < V) {
    kept = o.top_k;
    while (kept < V && x[ids[kept]] >= x[ids[o.top_k - 1]]) ++kept;
  }
  const std::vector<float>& w = work.weights;
  double z = 0, gap = std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < kept; ++i) z += double(w[ids[i]]);
  auto closest = [&](double target, int64_t n) {
    double cum = 0;
    for (int64_t i = 0; i + 1 < n; ++i) cum += double(w[ids[i]]), gap = std::min(gap, std::fabs(cum - target) / z);
  };
  if (o.top_p < 1) {
    closest(o.top_p * z, kept);
    double cum = 0;
    int64_t m = 0;
    while (m < kept) {
      cum += double(w[ids[m++]]);
      if (cum >= o.top_p * z) break;
    }
    kept = m, z = cum;
  }
  closest(u * z, kept);
  return gap;
}
}  // namespace

SPPO_TEST(cuda_head_logprobs_and_backward_match_cpu) {
  auto gpu = cuda_or_skip();
  // Scratch sizes force row tiles (of 1, 7, 16, 19 and 256 rows) and vocabulary tiles of 256
  // with a ragged last one; n 300 at V 997 is one tile with a padded row stride.
  const HeadCase cases[] = {{1, 64, 1000, 300},     {37, 128, 1000, 4096},   {37, 96, 32000, 5000},
                            {300, 128, 1000, 2000}, {300, 64, 997, 1 << 20}, {300, 256, 32000, 1 << 16}};
  uint64_t seed = 100;
  for (const HeadCase& hc : cases) check_head(*gpu, hc, seed += 10);
}

// The memory target: B 8 × T 1024 rows, hidden 4096, vocabulary 128256 (Llama 3 8B),
// with the model's 2^22-element logits scratch; the head may use at most 1 GiB beyond its inputs,
// outputs and scratch. Constant inputs (powers of two) make every logit exactly 4, so
// logp = −log V exactly; the backward must stay finite.
SPPO_TEST(cuda_head_extra_memory_at_llama3_8b_shape) {
  auto gpu = cuda_or_skip();
  const int64_t n = 8192, C = 4096, V = 128256, elems = int64_t(1) << 22;
  DeviceArray<bf16> H(*gpu, n * C), W(*gpu, V * C), dH(*gpu, n * C);
  DeviceArray<float> dW(*gpu, V * C), scratch(*gpu, elems);
  DeviceArray<int32_t> targets(*gpu, n);
  DeviceArray<double> coef(*gpu, n), logp(*gpu, n), lse(*gpu, n);
  gpu->fill(H.data(), 0.0625, n * C);
  gpu->fill(W.data(), 1.0 / 64, V * C);
  gpu->zero_bytes(dW.data(), V * C * sizeof(float));
  std::vector<int32_t> t(n);
  for (int64_t i = 0; i < n; ++i) t[i] = int32_t(uniform01(7, 0, i) * double(V));
  targets.put(t);
  coef.put(std::vector<double>(n, -1.0 / double(n)));
  // Warm-up on 8 rows: whatever the GEMM path allocates once is not the head's.
  gpu->head_logprobs(logp.data(), lse.data(), H.data(), W.data(), targets.data(), 8, C, V, scratch.data(), elems);
  (void)logp.get(1);

  auto step = [&] {
    gpu->head_logprobs(logp.data(), lse.data(), H.data(), W.data(), targets.data(), n, C, V, scratch.data(), elems);
    gpu->head_logprobs_backward(dH.data(), dW.data(), H.data(), W.data(), targets.data(), lse.data(), coef.data(), n, C,
                                V, scratch.data(), elems);
    (void)logp.get(1);  // waits for the stream
  };
  const double free_before = device_free_bytes();
  step();
  const double extra = free_before - device_free_bytes();
  const auto t0 = std::chrono::steady_clock::now();
  step();
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const double flops = 4 * 2.0 * double(n) * double(V) * double(C);  // logits twice, dH, dW
  std::printf(
      "      n %lld C %lld V %lld: extra device memory %.1f MiB (ΔcudaMemGetInfo), fwd+bwd %.2f ms = %.0f "
      "TFLOP/s\n",
      (long long)n, (long long)C, (long long)V, extra / (1 << 20), 1e3 * s, flops / s * 1e-12);
  EXPECT_TRUE(std::isnan(extra) || extra <= double(1 << 30), "the head used " << extra / (1 << 20) << " MiB extra");

  const std::vector<double> lp = logp.get();
  for (int64_t i = 0; i < n; ++i) EXPECT_NEAR(lp[i], -std::log(double(V)), 1e-9);
  EXPECT_TRUE(gpu->all_finite(dW.data(), V * C));
  const std::vector<bf16> dh = dH.get();
  for (int64_t i = 0; i < n * C; ++i) EXPECT_TRUE(std::isfinite(float(dh[i])), "dH[" << i << "] = " << float(dh[i]));
}

SPPO_TEST(cuda_sampler_greedy_ties_and_tiny_rows) {
  auto gpu = cuda_or_skip();
  // Ties at the top (ids 1 and 3): greedy takes id 1; top-k 1 keeps both, id 1 first.
  const std::vector<float> x = {0.5f, 3.0f, -1.0f, 3.0f, 2.9f};
  const DeviceArray<float> d = upload(*gpu, x);
  cpu::SamplerScratch<float> work;
  struct Opt {
    double t;
    int64_t k;
    double p;
  };
  for (Opt c : {Opt{0, 0, 1}, Opt{1, 1, 1}, Opt{1, 2, 1}, Opt{0.5, 0, 0.5}, Opt{2, 3, 0.7}, Opt{1, 0, 1}}) {
    SamplingOptions o;
    o.temperature = c.t, o.top_k = c.k, o.top_p = c.p;
    for (double u : {0.01, 0.25, 0.49, 0.51, 0.75, 0.99}) {
      int32_t tok = -1;
      double lp = 0, cpu_lp = 0;
      gpu->sample(&tok, &lp, d.data(), 1, 5, o, &u);
      const int32_t cpu_tok = cpu::sample_token(x.data(), 5, o, u, &cpu_lp, work);
      EXPECT_TRUE(tok == cpu_tok, "T " << c.t << " k " << c.k << " p " << c.p << " u " << u << ": token " << tok
                                       << " vs cpu " << cpu_tok);
      EXPECT_NEAR(lp, cpu_lp, 1e-6);
    }
  }
  // A one-token vocabulary: always token 0 with log-prob 0.
  const std::vector<float> one = {1.5f};
  const DeviceArray<float> d1 = upload(*gpu, one);
  for (double t : {0.0, 1.0}) {
    SamplingOptions o;
    o.temperature = t, o.top_p = 0.5;
    int32_t tok = -1;
    double lp = 1, u = 0.7;
    gpu->sample(&tok, &lp, d1.data(), 1, 1, o, &u);
    EXPECT_TRUE(tok == 0);
    EXPECT_NEAR(lp, 0.0, 1e-12);
  }
}

// The same u gives the same token as sample_token on the same logits, except where float exps
// and double sums taken in another order put u·z on the other side of a cumulative boundary
// (probability ~1e-7 per boundary near the draw): at most 0.1% of draws may differ (greedy: none).
SPPO_TEST(cuda_sampler_matches_cpu_sample_token) {
  auto gpu = cuda_or_skip();
  struct Setting {
    const char* name;
    double t;
    int64_t k;
    double p;
  };
  const Setting settings[] = {{"greedy", 0, 0, 1},      {"T 1", 1, 0, 1},
                              {"T 0.7", 0.7, 0, 1},     {"top-k 5", 1, 5, 1},
                              {"top-p 0.8", 1, 0, 0.8}, {"top-k 20, top-p 0.9, T 1.3", 1.3, 20, 0.9}};
  for (int64_t V : {int64_t(1000), int64_t(32003)}) {
    const int64_t rows = 4, calls = V < 5000 ? 500 : 250;  // 2000 and 1000 draws per setting
    const std::vector<float> x = sampler_logits(rows, V, 31 + V);
    const DeviceArray<float> d = upload(*gpu, x);
    cpu::SamplerScratch<float> work;
    for (size_t s = 0; s < std::size(settings); ++s) {
      SamplingOptions o;
      o.temperature = settings[s].t, o.top_k = settings[s].k, o.top_p = settings[s].p;
      int64_t mismatches = 0;
      double lp_err = 0;
      std::vector<double> u(rows), lp(rows);
      std::vector<int32_t> tok(rows);
      for (int64_t c = 0; c < calls; ++c) {
        for (int64_t i = 0; i < rows; ++i) u[i] = uniform01(99, s, uint64_t(c * rows + i));
        gpu->sample(tok.data(), lp.data(), d.data(), rows, V, o, u.data());
        for (int64_t i = 0; i < rows; ++i) {
          double cpu_lp = 0;
          const int32_t cpu_tok = cpu::sample_token(x.data() + i * V, V, o, u[i], &cpu_lp, work);
          EXPECT_TRUE(tok[i] >= 0 && tok[i] < V, settings[s].name << ": token " << tok[i]);
          if (tok[i] != cpu_tok) {
            ++mismatches;
            continue;
          }
          lp_err = std::max(lp_err, std::fabs(lp[i] - cpu_lp));
          EXPECT_NEAR(lp[i], log_softmax_at(x.data() + i * V, V, tok[i]), 1e-5);
        }
      }
      const int64_t draws = calls * rows, allowed = settings[s].t > 0 ? draws / 1000 : 0;
      std::printf("      sampler V %lld %-28s %lld of %lld draws differ from the CPU; raw log-prob err %.1e\n",
                  (long long)V, settings[s].name, (long long)mismatches, (long long)draws, lp_err);
      EXPECT_TRUE(mismatches <= allowed, settings[s].name << " at V " << V << ": " << mismatches << " of " << draws
                                                          << " draws differ from sample_token");
      EXPECT_TRUE(lp_err <= 1e-5, settings[s].name << " at V " << V << ": raw log-prob error " << lp_err);
    }
  }
}

// The truncated sampler (radix selection on the candidate order) on every hard kind of row, all
// kinds in one batch, at V 1000, 32000 (Llama 2) and 151936 (Qwen2), with ties across the top-k
// and top-p cutoffs, top_p tiny (one token) and just below 1, top_k 1, top_k >= V, both together,
// and u near 0 and 1: the same token as sample_token for the same u except where top_p·z or u·z
// lies within 1e-6·z of a cumulative boundary of the CPU's walk (both sum exact fixed-point copies
// of their float weights, but of expf's and the CPU's own exp: ~1e-7 apart); the same
// raw log-prob; the same bits on a second call; the same result for a row sampled alone.
SPPO_TEST(cuda_sampler_truncated_hard_cases) {
  auto gpu = cuda_or_skip();
  struct Setting {
    double t;
    int64_t k;  // −1: V − 1, −2: V, −3: V + 7
    double p;
  };
  const Setting settings[] = {{1, 0, 0.9},   {0.7, 0, 0.9},    {1.3, 0, 0.5},   {1, 0, 1e-6},   {1, 0, 0.999999},
                              {1, 1, 1},     {0.7, 50, 1},     {1, 5, 0.8},     {1.3, 20, 0.9}, {1, -1, 1},
                              {1, -2, 0.95}, {1, -3, 0.3},     {0.05, 0, 0.99}, {1, 4096, 0.9}, {2, 5000, 0.999},
                              {1, 1, 0.5},   {0.7, 1000, 0.97}};
  const int kinds = int(std::size(kHardKinds));
  for (int64_t V : {int64_t(1000), int64_t(32000), int64_t(151936)}) {
    const int per_kind = V > 100000 ? 1 : 3;
    const int64_t rows = int64_t(kinds) * per_kind;
    std::vector<float> x;
    for (int64_t r = 0; r < rows; ++r) {
      const std::vector<float> row = hard_row(int(r % kinds), V, 500 + uint64_t(r) + uint64_t(V));
      x.insert(x.end(), row.begin(), row.end());
    }
    const DeviceArray<float> d = upload(*gpu, x);
    cpu::SamplerScratch<float> work;
    int64_t boundary = 0, draws = 0;
    double lp_err = 0;
    for (size_t s = 0; s < std::size(settings); ++s) {
      SamplingOptions o;
      o.temperature = settings[s].t, o.top_p = settings[s].p;
      o.top_k = settings[s].k >= 0 ? settings[s].k : settings[s].k == -1 ? V - 1 : settings[s].k == -2 ? V : V + 7;
      std::vector<double> u(rows), lp(rows), lp2(rows);
      std::vector<int32_t> tok(rows), tok2(rows);
      for (int64_t i = 0; i < rows; ++i)
        u[i] = i < kinds ? uniform01(77, s, uint64_t(i)) : i < 2 * kinds ? 1e-12 : 1 - 1e-12;
      gpu->sample(tok.data(), lp.data(), d.data(), rows, V, o, u.data());
      gpu->sample(tok2.data(), lp2.data(), d.data(), rows, V, o, u.data());
      for (int64_t i = 0; i < rows; ++i) {
        const char* kind = kHardKinds[i % kinds];
        const float* xi = x.data() + i * V;
        EXPECT_TRUE(tok2[i] == tok[i] && std::memcmp(&lp2[i], &lp[i], sizeof(double)) == 0,
                    "V " << V << " " << kind << " setting " << s << ": a second call gave token " << tok2[i] << " vs "
                         << tok[i]);
        double cpu_lp = 0;
        const int32_t cpu_tok = cpu::sample_token(xi, V, o, u[i], &cpu_lp, work);
        ++draws;
        if (tok[i] != cpu_tok) {
          const double gap = cpu_boundary_gap(xi, V, o, u[i], work);
          EXPECT_TRUE(gap < 1e-6, "V " << V << " " << kind << " T " << o.temperature << " k " << o.top_k << " p "
                                       << o.top_p << " u " << u[i] << ": token " << tok[i] << " vs cpu " << cpu_tok
                                       << ", thresholds " << gap << "·z from a boundary");
          ++boundary;
          continue;
        }
        lp_err = std::max(lp_err, std::fabs(lp[i] - cpu_lp));
        EXPECT_NEAR(lp[i], cpu_lp, 1e-6);
      }
      for (int64_t i = 0; i < 2; ++i) {  // a row's result does not depend on the other rows
        int32_t t1 = -1;
        double l1 = 0;
        const int64_t r = i == 0 ? 1 : rows - 1;
        gpu->sample(&t1, &l1, d.data() + r * V, 1, V, o, &u[r]);
        EXPECT_TRUE(t1 == tok[r] && std::memcmp(&l1, &lp[r], sizeof(double)) == 0,
                    "V " << V << " setting " << s << " row " << r << " alone: token " << t1 << " vs " << tok[r]);
      }
    }
    std::printf(
        "      truncated sampler V %lld: %lld of %lld draws differ from sample_token (all at a boundary); "
        "raw log-prob err %.1e\n",
        (long long)V, (long long)boundary, (long long)draws, lp_err);
  }
}

// A decode batch larger than one wave of blocks (300 rows at V 32000, the kinds in turn) at the
// benchmark's settings: every row as sample_token draws it, boundary cases aside.
SPPO_TEST(cuda_sampler_truncated_large_batch) {
  auto gpu = cuda_or_skip();
  const int64_t V = 32000, rows = 300, kinds = int64_t(std::size(kHardKinds));
  std::vector<float> x;
  for (int64_t r = 0; r < rows; ++r) {
    const std::vector<float> row = hard_row(int(r % kinds), V, 900 + uint64_t(r));
    x.insert(x.end(), row.begin(), row.end());
  }
  const DeviceArray<float> d = upload(*gpu, x);
  cpu::SamplerScratch<float> work;
  for (int64_t k : {int64_t(0), int64_t(50)}) {
    SamplingOptions o;
    o.temperature = 0.7, o.top_k = k, o.top_p = 0.9;
    std::vector<double> u(rows), lp(rows);
    std::vector<int32_t> tok(rows);
    for (int64_t i = 0; i < rows; ++i) u[i] = uniform01(78, uint64_t(k), uint64_t(i));
    gpu->sample(tok.data(), lp.data(), d.data(), rows, V, o, u.data());
    int64_t boundary = 0;
    for (int64_t i = 0; i < rows; ++i) {
      double cpu_lp = 0;
      const float* xi = x.data() + i * V;
      const int32_t cpu_tok = cpu::sample_token(xi, V, o, u[i], &cpu_lp, work);
      if (tok[i] != cpu_tok) {
        const double gap = cpu_boundary_gap(xi, V, o, u[i], work);
        EXPECT_TRUE(gap < 1e-6, "row " << i << " (" << kHardKinds[i % kinds] << ") k " << k << ": token " << tok[i]
                                       << " vs cpu " << cpu_tok << ", thresholds " << gap << "·z from a boundary");
        ++boundary;
        continue;
      }
      EXPECT_NEAR(lp[i], cpu_lp, 1e-6);
    }
    std::printf("      truncated sampler, %lld rows, T 0.7 top-k %lld top-p 0.9: %lld differ (at a boundary)\n",
                (long long)rows, (long long)k, (long long)boundary);
  }
}

// Chi-square goodness of fit of 100k GPU draws on a fixed logit vector (with ties, also at the
// top-k boundary) against softmax(logits/T) restricted to the top-k / top-p set, computed here
// independently (sampling_reference.h), as generate_test.cpp does for the CPU sampler.
SPPO_TEST(cuda_sampler_matches_truncated_softmax_distribution) {
  auto gpu = cuda_or_skip();
  std::vector<float> logits = {1.2f, -0.3f, 2.5f, 0.0f, 2.5f, -1.7f, 0.9f, 1.8f, -0.5f, 0.4f, 3.1f, -2.2f};
  for (int j = 0; j < 28; ++j) logits.push_back(float(std::round(4 * standard_normal(55, 0, j)) / 4));
  const int64_t V = int64_t(logits.size()), rows = 1000, calls = 100;
  std::vector<float> x(rows * V);
  for (int64_t r = 0; r < rows; ++r) std::copy(logits.begin(), logits.end(), x.begin() + r * V);
  const DeviceArray<float> d = upload(*gpu, x);
  struct Cfg {
    double t;
    int64_t k;
    double p;
  };
  const Cfg cfgs[] = {{1.0, 0, 1.0}, {0.7, 0, 1.0}, {1.0, 5, 1.0}, {1.0, 0, 0.8}, {1.3, 20, 0.9}};
  for (size_t ci = 0; ci < std::size(cfgs); ++ci) {
    const Cfg cfg = cfgs[ci];
    const std::vector<double> expect = truncated_distribution(logits, cfg.t, cfg.k, cfg.p);

    SamplingOptions o;
    o.temperature = cfg.t, o.top_k = cfg.k, o.top_p = cfg.p;
    std::vector<int64_t> count(V, 0);
    std::vector<double> u(rows), lp(rows);
    std::vector<int32_t> tok(rows);
    for (int64_t c = 0; c < calls; ++c) {
      for (int64_t i = 0; i < rows; ++i) u[i] = uniform01(4321, ci, uint64_t(c * rows + i));
      gpu->sample(tok.data(), lp.data(), d.data(), rows, V, o, u.data());
      for (int64_t i = 0; i < rows; ++i) {
        EXPECT_TRUE(tok[i] >= 0 && tok[i] < V, "token " << tok[i]);
        ++count[tok[i]];
      }
    }
    const ChiSquare fit = chi_square(expect, count, double(rows * calls));
    EXPECT_TRUE(fit.stray < 0, "token " << fit.stray << " is outside the top-k/top-p set but was drawn "
                                        << count[fit.stray] << " times (T=" << cfg.t << " k=" << cfg.k << " p=" << cfg.p
                                        << ")");
    std::printf("      sampler T %.1f k %lld p %.1f: chi2 %.1f on %d df\n", cfg.t, (long long)cfg.k, cfg.p, fit.chi2,
                fit.df);
    // p > 1e-4 via the Wilson–Hilferty normal approximation: z < 3.719.
    EXPECT_TRUE(fit.z < 3.719, "chi2 " << fit.chi2 << " on " << fit.df << " df (T=" << cfg.t << " k=" << cfg.k
                                       << " p=" << cfg.p << ")");
  }
}
