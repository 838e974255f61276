// Batched sampling benchmark without Node: decode tokens/s for the `tiny` and `small` presets as
// ../shared/anchors/pytorch_cpu_baseline.py measures it (32-token prompt, 64 new tokens, T=0.7,
// whole call timed, prefill included), and the time of one decode step at several positions.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <vector>

#include "core/rng.h"
#include "core/threadpool.h"
#include "cpu/cpu_ops.h"
#include "cpu/gemm.h"
#include "sppo/generate.h"
#include "sppo/model.h"
#include "tests/harness.h"

using namespace sppo;

namespace {

std::vector<int32_t> prompt_tokens(int64_t n, int vocab, uint64_t seed) {
  std::vector<int32_t> p(n);
  for (int64_t i = 0; i < n; ++i) p[i] = int32_t(uniform01(seed, 0, i) * vocab);
  return p;
}

void bench_decode(const char* preset) {
  const ModelConfig c = preset_config(preset);
  Model<float> m(c, MemoryPlan{1, 16}, std::make_unique<cpu::CpuOps<float>>());
  const int P = 32, N = 64;
  SamplingOptions o;
  o.max_new_tokens = N, o.temperature = 0.7;
  for (int B : {1, 16, 64}) {
    Generator<float> g(m, GeneratorPlan{B, P + N}, std::make_unique<cpu::CpuOps<float>>());
    std::vector<std::vector<int32_t>> prompts;
    std::vector<SequenceRequest> req;
    for (int b = 0; b < B; ++b) prompts.push_back(prompt_tokens(P, c.vocab_size, b));
    for (int b = 0; b < B; ++b) req.push_back({prompts[b].data(), P, uint64_t(b), 0});
    const double t = harness::median_seconds(3, [&] { g.generate(req, o); });
    std::printf("decode %-6s batch %-3d %8.0f tok/s  (%.3f s for %d x %d new tokens after a %d-token prompt)\n", preset,
                B, B * N / t, t, B, N, P);
    std::fflush(stdout);
  }
}

// One sequence, batch 1: (time to generate 1 + k tokens − time to generate 1) / k after a
// prompt of `pos` tokens, i.e. the cost of a decode step at about that position.
void bench_step_at_positions(const char* preset) {
  const ModelConfig c = preset_config(preset);
  Model<float> m(c, MemoryPlan{1, 16}, std::make_unique<cpu::CpuOps<float>>());
  const int k = 32;
  Generator<float> g(m, GeneratorPlan{1, 1024 + k + 1}, std::make_unique<cpu::CpuOps<float>>());
  for (int pos : {16, 256, 1024}) {
    auto prompt = prompt_tokens(pos, c.vocab_size, 7);
    std::vector<SequenceRequest> req = {{prompt.data(), pos, 1, 0}};
    SamplingOptions o;
    o.temperature = 0.7;
    o.max_new_tokens = 1;
    const double t1 = harness::median_seconds(7, [&] { g.generate(req, o); });
    o.max_new_tokens = 1 + k;
    const double tk = harness::median_seconds(7, [&] { g.generate(req, o); });
    std::printf("decode %-6s batch 1 position %-5d %8.3f ms/token\n", preset, pos, (tk - t1) / k * 1e3);
    std::fflush(stdout);
  }
}

}  // namespace

SPPO_BENCH(generate_decode) {
  std::printf("threads %d, gemm kernel %s\n", num_threads(), cpu::gemm_kernel_name());
  for (const char* p : {"tiny", "small"}) bench_decode(p);
  for (const char* p : {"tiny", "small"}) bench_step_at_positions(p);
}
