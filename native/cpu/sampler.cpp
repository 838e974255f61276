// The CPU sampler (cpu/sampler.h).
#include "cpu/sampler.h"

#include <algorithm>
#include <cmath>
#include <functional>

#include "cpu/vecmath.h"

namespace sppo::cpu {

namespace {

// Buckets of max - logit for the truncated draw: enough that a bucket holds a few of V = 8k-150k
// candidates, few enough that clearing and scanning them costs little beside one pass over V.
constexpr int kBuckets = 2048;

// Truncated sampling without a sort (see sampler.h for the rule). A selection asks for the first
// candidate, in (logit desc, id asc) order, whose running fixed-point sum exceeds a threshold.
// The candidates are histogrammed by bucket of max - logit, a monotone function of the logit, so
// every candidate of an earlier bucket comes before every one of a later bucket: a scan of the
// buckets' masses finds the bucket where the sum crosses, and only that bucket is sorted. The sums
// are exact integers, so they equal the running sums of a full sort's walk.
template <class T>
int32_t draw_truncated(const T* x, int64_t V, T mx, const SamplingOptions& o, double u, SamplerScratch<T>& s) {
  const std::vector<T>& w = s.weights;
  int id_bits = 1;
  while ((int64_t(1) << id_bits) < V) ++id_bits;
  const T unit = std::ldexp(T(1), 63 - id_bits);  // a weight of 1 in fixed point
  // Top-k keeps every logit >= the k-th largest (ties included, as Hugging Face's TopKLogitsWarper).
  const bool top_k = o.top_k > 0 && o.top_k < V;
  T kth = mx;
  if (top_k) {
    s.values.assign(x, x + V);
    std::nth_element(s.values.begin(), s.values.begin() + (o.top_k - 1), s.values.end(), std::greater<T>());
    kth = s.values[size_t(o.top_k - 1)];
  }
  // The candidates: kept by top-k and of nonzero fixed-point weight (a running sum only crosses a
  // threshold below the total at a candidate that adds to it). The max is one (weight 1).
  s.ids.resize(size_t(V));
  s.fixed.resize(size_t(V));
  int64_t n = 0;
  uint64_t z = 0;
  T lo = mx;
  for (int64_t j = 0; j < V; ++j) {
    const uint64_t q = uint64_t(w[j] * unit);  // w <= 1: an exact scaling, then truncated
    if (q == 0 || (top_k && !(x[j] >= kth))) continue;
    s.ids[n] = int32_t(j), s.fixed[n] = q, ++n;
    z += q;
    lo = std::min(lo, x[j]);
  }
  const T scale = mx > lo ? T(kBuckets) / (mx - lo) : T(0);  // 0: one bucket (all logits equal)
  s.bucket.resize(size_t(n));
  s.mass.assign(kBuckets, 0);
  for (int64_t c = 0; c < n; ++c) {
    const T f = (mx - x[s.ids[c]]) * scale;  // rounding keeps it monotone in the logit
    const int b = f < T(kBuckets) ? int(f) : kBuckets - 1;
    s.bucket[c] = uint16_t(b);
    s.mass[b] += s.fixed[c];
  }
  // The first candidate whose running sum exceeds th (< z); returns its index and that sum.
  auto select = [&](uint64_t th) {
    uint64_t cum = 0;
    int b = 0;
    while (cum + s.mass[b] <= th) cum += s.mass[b++];
    s.in_bucket.clear();
    for (int64_t c = 0; c < n; ++c)
      if (s.bucket[c] == b) s.in_bucket.push_back(int32_t(c));
    std::sort(s.in_bucket.begin(), s.in_bucket.end(), [&](int32_t a, int32_t c) {
      const T xa = x[s.ids[a]], xc = x[s.ids[c]];
      return xa > xc || (xa == xc && s.ids[a] < s.ids[c]);
    });
    for (int32_t c : s.in_bucket)
      if ((cum += s.fixed[c]) > th) return std::pair<int32_t, uint64_t>(c, cum);
    return std::pair<int32_t, uint64_t>(s.in_bucket.back(), cum);  // unreachable: the bucket's mass crosses th
  };
  uint64_t kept = z;
  if (o.top_p < 1) {
    // cum >= top_p·z  <=>  cum > ceil(top_p·z) - 1, for an integer cum.
    const uint64_t reach = std::min(uint64_t(std::ceil(o.top_p * double(z))) - 1, z - 1);
    kept = select(reach).second;
  }
  // The draw runs over all candidates with the nucleus's total: a threshold below that total
  // crosses within the nucleus. The last candidate if rounding puts u·z' at z'.
  const uint64_t th = std::min(uint64_t(u * double(kept)), kept - 1);
  return s.ids[size_t(select(th).first)];
}

}  // namespace

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
      token = draw_truncated(x, V, mx, o, u, scratch);
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
