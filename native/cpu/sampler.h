// The CPU sampler: one row of logits to one token under SamplingOptions (greedy, temperature,
// top-k, top-p), the CPU backend's Ops::sample (cpu_ops.cpp) and the reference the CUDA sampler
// (cuda/cuda_head.cu) and the tests check against.
#pragma once
#include <cstdint>
#include <vector>

#include "sppo/generate.h"

namespace sppo::cpu {

// Per-thread scratch of the sampler, grown to the vocabulary on first use.
template <class T>
struct SamplerScratch {
  std::vector<T> weights;          // (V) softmax numerators at temperature T
  std::vector<T> values;           // (V) top-k: the logits, partially ordered to find the k-th
  std::vector<int32_t> ids;        // truncated: the candidates (nonzero weight, inside top-k), by id
  std::vector<uint64_t> fixed;     // their weights in fixed point
  std::vector<uint16_t> bucket;    // their bucket of max - logit
  std::vector<uint64_t> mass;      // fixed-point weight per bucket
  std::vector<int32_t> in_bucket;  // one bucket's candidates (indices into ids), sorted
};

// The sampler on one row of logits (V). Returns the token and writes log softmax(logits)[token]
// to *raw_logprob. `u` in (0,1) is the draw (unused when greedy).
//
// Truncated sampling (top-k and/or top-p < 1) follows the CUDA sampler's rule exactly (same
// order, same fixed-point sums, same thresholds), so the two differ only by their exp roundings:
// candidates are ordered by logit descending, then id ascending; weights w = exp((x - max)/T)
// are summed exactly as integers in units of 2^-S, S = 63 - id_bits (2^id_bits >= V), truncated;
// top-k keeps every logit >= the k-th's; the nucleus ends at the first candidate whose running sum
// reaches top_p of the kept total (cum > ceil(top_p·z) - 1); the token is the first whose running
// sum exceeds min(floor(u·z'), z' - 1), z' the nucleus's total. Exact sums make the running sum at
// a candidate independent of the order the others were added in, so no sort is needed: see
// sampler.cpp.
template <class T>
int32_t sample_token(const T* logits, int64_t V, const SamplingOptions& o, double u, double* raw_logprob,
                     SamplerScratch<T>& scratch);

}  // namespace sppo::cpu
