// Independent references for the samplers' tests (generate_test for sample_token on the CPU,
// cuda_head_test for the device sampler): the truncated softmax distribution a sampler must draw
// from, and a chi-square goodness of fit of counted draws against it. Plain C++: no backend.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace sppo::testutil {

// log softmax(x)[j] over V logits, in double.
inline double log_softmax_at(const float* x, int64_t V, int64_t j) {
  double mx = x[0];
  for (int64_t i = 1; i < V; ++i) mx = std::max(mx, double(x[i]));
  double s = 0;
  for (int64_t i = 0; i < V; ++i) s += std::exp(double(x[i]) - mx);
  return double(x[j]) - mx - std::log(s);
}

// The distribution sampling at temperature t > 0 with top-k k (0: off) and top-p p must give:
// order ids by logit (descending, ties by id), keep the top k (and every id tied with the k-th),
// softmax at t over those, keep the smallest prefix whose mass reaches p, renormalise.
// Ids outside the set get 0.
inline std::vector<double> truncated_distribution(const std::vector<float>& logits, double t, int64_t k, double p) {
  const int64_t V = int64_t(logits.size());
  std::vector<int> order(static_cast<size_t>(V));
  for (int i = 0; i < V; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return logits[a] > logits[b]; });
  int64_t keep = V;
  if (k > 0) {
    keep = std::min(k, V);
    while (keep < V && logits[order[keep]] == logits[order[k - 1]]) ++keep;
  }
  std::vector<double> w(static_cast<size_t>(V), 0.0);
  double z = 0;
  for (int64_t i = 0; i < keep; ++i) z += w[order[i]] = std::exp(logits[order[i]] / t);
  double cum = 0;
  int64_t m = 0;
  while (m < keep && cum < p * z) cum += w[order[m++]];
  std::vector<double> expect(static_cast<size_t>(V), 0.0);
  for (int64_t i = 0; i < m; ++i) expect[order[i]] = w[order[i]] / cum;
  return expect;
}

// Pearson's chi-square of `count` (draws per id, `draws` in all) against the probabilities
// `expect`, over the ids with expect > 0 (df: their number less one), with its Wilson–Hilferty
// normal approximation z (0 when df is 0): z < 3.719 is p > 1e-4. `stray` is the first id drawn
// although its probability is 0 (-1 when there is none).
struct ChiSquare {
  double chi2 = 0;
  int df = -1;
  double z = 0;
  int64_t stray = -1;
};
inline ChiSquare chi_square(const std::vector<double>& expect, const std::vector<int64_t>& count, double draws) {
  ChiSquare r;
  for (size_t j = 0; j < expect.size(); ++j) {
    if (expect[j] == 0) {
      if (count[j] != 0 && r.stray < 0) r.stray = int64_t(j);
      continue;
    }
    const double e = expect[j] * draws;
    r.chi2 += (double(count[j]) - e) * (double(count[j]) - e) / e;
    ++r.df;
  }
  if (r.df > 0) {
    const double a = 2.0 / (9.0 * r.df);
    r.z = (std::cbrt(r.chi2 / r.df) - (1 - a)) / std::sqrt(a);
  }
  return r;
}

}  // namespace sppo::testutil
