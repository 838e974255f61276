// The CPU sampler: one row of logits to one token under SamplingOptions (greedy, temperature,
// top-k, top-p), the CPU backend's Ops::sample (cpu_ops.cpp) and the reference the CUDA sampler
// (cuda/cuda_head.cu) and the tests check against.
#pragma once
#include <cstdint>
#include <utility>
#include <vector>

#include "sppo/generate.h"

namespace sppo::cpu {

// Per-thread scratch of the sampler, grown to the vocabulary on first use.
template <class T>
struct SamplerScratch {
  std::vector<T> weights;                          // (V) softmax numerators
  std::vector<std::pair<double, int32_t>> ranked;  // (V) candidates in sampling order
};

// The sampler on one row of logits (V). Returns the token and writes log softmax(logits)[token]
// to *raw_logprob. `u` in (0,1) is the draw (unused when greedy).
template <class T>
int32_t sample_token(const T* logits, int64_t V, const SamplingOptions& o, double u, double* raw_logprob,
                     SamplerScratch<T>& scratch);

}  // namespace sppo::cpu
