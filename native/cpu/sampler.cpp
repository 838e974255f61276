// The CPU sampler (cpu/sampler.h).
#include "cpu/sampler.h"

#include <algorithm>
#include <cmath>

#include "cpu/vecmath.h"

namespace sppo::cpu {

template <class T>
int32_t sample_token(const T* x, int64_t V, const SamplingOptions& o, double u, double* raw_logprob,
                     SamplerScratch<T>& scratch) {
  int64_t argmax = 0;
  for (int64_t j = 1; j < V; ++j)
    if (x[j] > x[argmax]) argmax = j;  // strict: ties go to the lowest id
  const T mx = x[argmax];
  // w = exp(x - max): the raw policy's softmax numerators; the recorded log-prob is always
  // log softmax of the unmodified logits, whatever temperature and truncation do to the draw.
  std::vector<T>& w = scratch.weights;
  w.resize(size_t(V));
  const double raw_sum = exp_shifted_sum(x, w.data(), V, mx);
  const double lse = double(mx) + std::log(raw_sum);

  int64_t token = argmax;
  if (o.temperature > 0) {
    double z = raw_sum;
    if (o.temperature != 1) {  // w = exp((x - max) / T)
      const T inv_t = T(1.0 / o.temperature);
      for (int64_t j = 0; j < V; ++j) w[j] = (x[j] - mx) * inv_t;
      z = exp_shifted_sum(w.data(), w.data(), V, T(0));
    }
    if ((o.top_k == 0 || o.top_k >= V) && o.top_p >= 1) {
      // Untruncated: inverse CDF over the ids in order, no sort needed.
      const double target = u * z;
      double cum = 0;
      token = V - 1;  // if rounding leaves target past the last sum
      for (int64_t j = 0; j < V; ++j) {
        cum += double(w[j]);
        if (target < cum) {
          token = j;
          break;
        }
      }
    } else {
      // Candidates in a total order: higher logit first, then lower id, so truncation and the
      // draw are the same on every run.
      auto& ranked = scratch.ranked;
      ranked.resize(size_t(V));
      for (int64_t j = 0; j < V; ++j) ranked[j] = {double(x[j]), int32_t(j)};
      auto before = [](const std::pair<double, int32_t>& a, const std::pair<double, int32_t>& b) {
        return a.first > b.first || (a.first == b.first && a.second < b.second);
      };
      int64_t kept = V;
      if (o.top_k > 0 && o.top_k < V) {
        std::nth_element(ranked.begin(), ranked.begin() + (o.top_k - 1), ranked.end(), before);
        const double kth = ranked[o.top_k - 1].first;
        // Keep every logit >= the k-th (ties included, as Hugging Face's TopKLogitsWarper does).
        kept = std::partition(ranked.begin(), ranked.end(), [&](const auto& c) { return c.first >= kth; }) -
               ranked.begin();
      }
      std::sort(ranked.begin(), ranked.begin() + kept, before);
      // From here .first is the candidate's weight at temperature T.
      z = 0;
      for (int64_t i = 0; i < kept; ++i) z += ranked[i].first = double(w[ranked[i].second]);
      if (o.top_p < 1) {
        // Nucleus: the smallest prefix whose probability reaches top_p (at least one token).
        double cum = 0;
        int64_t m = 0;
        while (m < kept) {
          cum += ranked[m++].first;
          if (cum >= o.top_p * z) break;
        }
        kept = m;
        z = cum;
      }
      const double target = u * z;
      double cum = 0;
      token = ranked[kept - 1].second;
      for (int64_t i = 0; i < kept; ++i) {
        cum += ranked[i].first;
        if (target < cum) {
          token = ranked[i].second;
          break;
        }
      }
    }
  }
  *raw_logprob = double(x[token]) - lse;
  return int32_t(token);
}
template int32_t sample_token<float>(const float*, int64_t, const SamplingOptions&, double, double*,
                                     SamplerScratch<float>&);
template int32_t sample_token<double>(const double*, int64_t, const SamplingOptions&, double, double*,
                                      SamplerScratch<double>&);

}  // namespace sppo::cpu
