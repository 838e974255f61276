// Op-level tests of the CPU backend against naive float64 references.
#include <cmath>
#include <cstring>
#include <vector>

#include "core/rng.h"
#include "core/threadpool.h"
#include "cpu/cpu_ops.h"
#include "cpu/vecmath.h"
#include "tests/harness.h"

using namespace sppo;

namespace {
std::vector<double> randn(int64_t n, uint64_t seed) {
  std::vector<double> v(n);
  for (int64_t i = 0; i < n; ++i) v[i] = standard_normal(seed, 0, i);
  return v;
}
}  // namespace

SPPO_TEST(attention_forward_matches_naive_causal_gqa) {
  const int64_t B = 2, Tn = 131, H = 4, KV = 2, D = 8;  // 131 rows: three tiles, the last partial
  const int64_t QKV = (H + 2 * KV) * D, QD = H * D;
  AttentionShape s{B, Tn, H, KV, D, QKV, 0, QD, QD + KV * D, QD, 1.0 / std::sqrt(double(D))};
  auto qkv_d = randn(B * Tn * QKV, 1);
  std::vector<float> qkv(qkv_d.begin(), qkv_d.end());
  std::vector<float> out(B * Tn * QD, NAN), lse(B * H * Tn, NAN);
  cpu::CpuOps<float> ops;
  ops.plan_scratch(Tn, D);
  ops.attention_forward(out.data(), lse.data(), qkv.data(), s);
  double worst = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t t = 0; t < Tn; ++t) {
        const int64_t kvh = h / (H / KV);
        std::vector<double> sc(t + 1);
        double mx = -1e300;
        for (int64_t j = 0; j <= t; ++j) {
          double dot = 0;
          for (int64_t k = 0; k < D; ++k)
            dot += qkv_d[(b * Tn + t) * QKV + h * D + k] * qkv_d[(b * Tn + j) * QKV + QD + kvh * D + k];
          sc[j] = dot * s.scale;
          mx = std::max(mx, sc[j]);
        }
        double sum = 0;
        for (double& x : sc) sum += (x = std::exp(x - mx));
        EXPECT_NEAR(lse[(b * H + h) * Tn + t], mx + std::log(sum), 1e-5);
        for (int64_t k = 0; k < D; ++k) {
          double o = 0;
          for (int64_t j = 0; j <= t; ++j) o += sc[j] / sum * qkv_d[(b * Tn + j) * QKV + QD + KV * D + kvh * D + k];
          worst = std::max(worst, std::fabs(o - out[(b * Tn + t) * QD + h * D + k]));
        }
      }
  EXPECT_TRUE(worst < 1e-5, "attention output differs from the naive reference by " << worst);
}

SPPO_TEST(rope_inverse_undoes_rope) {
  const int64_t N = 5, heads = 3, D = 8, half = D / 2;
  auto x = randn(N * heads * D, 2);
  std::vector<double> y = x, cos(16 * half), sin(16 * half);
  for (int64_t p = 0; p < 16; ++p)
    for (int64_t i = 0; i < half; ++i)
      cos[p * half + i] = std::cos(0.3 * p * (i + 1)), sin[p * half + i] = std::sin(0.3 * p * (i + 1));
  std::vector<int32_t> pos = {0, 3, 7, 15, 2};
  cpu::CpuOps<double> ops;
  ops.rope(y.data(), N, heads * D, 0, heads, D, pos.data(), cos.data(), sin.data(), false);
  // Position 0 is the identity; others rotate pairs (j, j + half) — check one pair by hand.
  EXPECT_NEAR(y[0], x[0], 1e-15);
  const int64_t r = 1 * heads * D, j = 1;
  EXPECT_NEAR(y[r + j], x[r + j] * cos[3 * half + j] - x[r + j + half] * sin[3 * half + j], 1e-14);
  ops.rope(y.data(), N, heads * D, 0, heads, D, pos.data(), cos.data(), sin.data(), true);
  for (size_t i = 0; i < x.size(); ++i) EXPECT_NEAR(y[i], x[i], 1e-14);
}

SPPO_TEST(reductions_are_identical_for_any_thread_count) {
  auto xd = randn(300001, 3);
  std::vector<float> x(xd.begin(), xd.end());
  cpu::CpuOps<float> ops;
  const int saved = num_threads();
  set_num_threads(1);
  double one = ops.sum_squares(x.data(), x.size());
  set_num_threads(4);
  double four = ops.sum_squares(x.data(), x.size());
  set_num_threads(saved);
  EXPECT_TRUE(one == four, one << " vs " << four);
  double ref = 0;
  for (double v : x) ref += v * v;
  EXPECT_NEAR(one, ref, 1e-9 * ref);
  x[123456] = INFINITY;
  EXPECT_TRUE(!ops.all_finite(x.data(), x.size()));
  x[123456] = 3e38f;  // finite, though its square overflows float
  EXPECT_TRUE(ops.all_finite(x.data(), x.size()));
}

SPPO_TEST(vectorised_exp_and_swiglu_match_float64) {
  // Arguments across the whole useful range, including the underflow tail and exact zero.
  const int64_t n = 1003;  // not a multiple of 16: exercises the masked tail
  std::vector<float> x(n), y(n), g(n), u(n), d(n), out(n), dg(n), du(n);
  for (int64_t i = 0; i < n; ++i) {
    x[i] = float(-110.0 + 120.0 * i / (n - 1));
    g[i] = float(6 * standard_normal(9, 0, i)), u[i] = float(standard_normal(9, 1, i)),
    d[i] = float(standard_normal(9, 2, i));
  }
  x[500] = 0.0f;
  const float shift = 3.5f;
  const double sum = cpu::exp_shifted_sum(x.data(), y.data(), n, shift);
  double ref_sum = 0, worst = 0;
  for (int64_t i = 0; i < n; ++i) {
    // The argument is rounded to float first, as any float kernel must (that alone costs up
    // to |x| * 2^-24 relative); the check is on the exponential itself.
    const double e = std::exp(double(x[i] - shift));
    ref_sum += e;
    // Relative error within a few float ulps where the result is a normal float.
    if (e > 1e-37)
      worst = std::max(worst, std::fabs(y[i] - e) / e);
    else
      EXPECT_TRUE(y[i] >= 0 && y[i] < 1e-37f, "exp(" << x[i] << ") = " << y[i]);
  }
  EXPECT_TRUE(worst < 4e-7, "worst relative exp error " << worst);
  EXPECT_NEAR(sum, ref_sum, 1e-6 * ref_sum);
  cpu::swiglu_rows(g.data(), u.data(), out.data(), n);
  cpu::swiglu_grad_rows(g.data(), u.data(), d.data(), dg.data(), du.data(), n);
  for (int64_t i = 0; i < n; ++i) {
    const double gd = g[i], s = 1 / (1 + std::exp(-gd));
    EXPECT_NEAR(out[i], gd * s * u[i], 1e-6 * (1 + std::fabs(gd * s * u[i])));
    EXPECT_NEAR(du[i], d[i] * gd * s, 1e-6 * (1 + std::fabs(d[i] * gd * s)));
    const double dgr = d[i] * u[i] * s * (1 + gd * (1 - s));
    EXPECT_NEAR(dg[i], dgr, 1e-6 * (1 + std::fabs(dgr)));
  }
}

// Decode attention over block tables against a float64 reference: rows of different lengths
// whose table rows point at shuffled blocks, rows sharing a table row (prefill rows of one
// sequence) and table rows sharing their first blocks (a forked prompt: one gemm for the rows'
// scores against a shared block), query-head groups of 1-8 (the AVX-512 weighted sum takes four
// heads of a group per pass) and a head dim that is not a multiple of 16.
SPPO_TEST(attention_decode_matches_naive_over_block_tables) {
  struct Case {
    int64_t H, KV, D;
  };
  uint64_t seed = 40;
  for (const Case c : {Case{4, 4, 64}, Case{8, 4, 64}, Case{6, 2, 40}, Case{10, 2, 24}, Case{8, 1, 64}}) {
    const int64_t bs = 16, max_blocks = 5, rows_cap = 3, ctx = bs * max_blocks, n_blocks = rows_cap * max_blocks;
    const int64_t QKV = (c.H + 2 * c.KV) * c.D, QD = c.H * c.D;
    AttentionShape s{rows_cap, ctx, c.H, c.KV, c.D, QKV, 0, QD, QD + c.KV * c.D, QD, 1.0 / std::sqrt(double(c.D))};
    std::vector<int32_t> tables(static_cast<size_t>(rows_cap * max_blocks), 0);
    for (int64_t i = 0; i < rows_cap * max_blocks; ++i) tables[i] = int32_t((i * 7 + 3) % n_blocks);  // a permutation
    tables[max_blocks] = tables[0], tables[max_blocks + 1] = tables[1];  // table rows 0 and 1 share two blocks
    const KvBlocks kv{tables.data(), n_blocks, bs, max_blocks};
    const auto kd = randn(n_blocks * c.KV * bs * c.D, ++seed), vd = randn(n_blocks * c.KV * bs * c.D, ++seed);
    std::vector<float> kc(kd.begin(), kd.end()), vc(vd.begin(), vd.end());
    const std::vector<int32_t> slots = {0, 2, 2, 1, 0}, positions = {0, 17, 79, 50, 33};
    const int64_t n = int64_t(slots.size());
    const auto qd = randn(n * QKV, ++seed);
    const std::vector<float> qkv(qd.begin(), qd.end());
    std::vector<float> out(static_cast<size_t>(n * QD), NAN);
    cpu::CpuOps<float> ops;
    ops.plan_scratch(ctx, c.D);
    ops.attention_decode(out.data(), qkv.data(), kc.data(), vc.data(), slots.data(), positions.data(), n, s, kv);
    double worst = 0;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t h = 0; h < c.H; ++h) {
        const int64_t kvh = h / (c.H / c.KV), len = positions[i] + 1;
        auto at = [&](int64_t p) {  // offset of position p's head-kvh row in the pool
          return ((int64_t(tables[slots[i] * max_blocks + p / bs]) * c.KV + kvh) * bs + p % bs) * c.D;
        };
        std::vector<double> w(static_cast<size_t>(len), 0.0);
        double mx = -1e300, z = 0;
        for (int64_t p = 0; p < len; ++p) {
          double dot = 0;
          for (int64_t d = 0; d < c.D; ++d) dot += double(qkv[i * QKV + h * c.D + d]) * double(kc[at(p) + d]);
          w[p] = dot * s.scale, mx = std::max(mx, w[p]);
        }
        for (double& x : w) z += x = std::exp(x - mx);
        for (int64_t d = 0; d < c.D; ++d) {
          double o = 0;
          for (int64_t p = 0; p < len; ++p) o += w[p] / z * double(vc[at(p) + d]);
          const double err = std::fabs(o - double(out[i * QD + h * c.D + d]));
          worst = std::max(worst, std::isnan(err) ? INFINITY : err);  // an output never written is NaN
        }
      }
    EXPECT_TRUE(worst < 1e-5, "H " << c.H << " KV " << c.KV << " D " << c.D << ": max |error| " << worst);
    // A row alone gets the same bits as in the batch (batch-invariant sampling rests on it).
    for (int64_t i = 0; i < n; ++i) {
      std::vector<float> alone(static_cast<size_t>(QD), NAN);
      ops.attention_decode(alone.data(), qkv.data() + i * QKV, kc.data(), vc.data(), &slots[i], &positions[i], 1, s,
                           kv);
      EXPECT_TRUE(std::memcmp(alone.data(), out.data() + i * QD, QD * sizeof(float)) == 0,
                  "H " << c.H << " KV " << c.KV << " D " << c.D << ": row " << i << " alone differs from the batch");
    }
  }
}
