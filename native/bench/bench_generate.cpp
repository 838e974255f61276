// Batched sampling benchmark without Node: decode tokens/s for the `tiny` and `small` presets as
// ../shared/anchors/pytorch_cpu_baseline.py measures it (32-token prompt, 64 new tokens, T=0.7,
// whole call timed, prefill included), and the time of one decode step at several positions;
// and SPPO's sampling workload (K samples of every prompt) with prefix sharing against the
// generator without it (`sppo_bench shared_prompts`).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <string>
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

// SPPO's generation step on the CPU (issue 14): `small`, 16 prompts of 256 tokens, K = 5 samples
// each, 128 new tokens (no stop token), T 0.7, top-p 0.9, whole call timed. Engine: the paged
// cache with prefix sharing, 80 sequences in flight at most, in a pool of the bytes the peer's
// cache takes. Peer, "today's generator": no sharing, a slot per sequence of maxContext
// positions (the pool maxBatch x maxContext), maxBatch 16 as `sppo run` plans it by default.
// Also sharing on and off in two identical plans, the peer's (maxBatch 16: engine16 / today) and
// one that holds every sequence at once (maxBatch 80, 5x the peer's memory: engine80 / today80),
// to separate what sharing saves from what a larger batch gains. Prints
// "shared_prompts <label> <seconds> s <tok/s> tok/s ..." per case, then "shared_prompts ratio".
SPPO_BENCH(shared_prompts) {
  const ModelConfig c = preset_config("small");
  Model<float> m(c, MemoryPlan{1, 16}, std::make_unique<cpu::CpuOps<float>>());
  // SPPO_BENCH_NEW=1 times the prefill (and first draw) alone: the rest of a case is its decode.
  const int N = std::getenv("SPPO_BENCH_NEW") ? std::atoi(std::getenv("SPPO_BENCH_NEW")) : 128;
  const int n_prompts = 16, P = 256, K = 5, ctx = P + 128;
  std::vector<std::vector<int32_t>> prompts;
  for (int p = 0; p < n_prompts; ++p) prompts.push_back(prompt_tokens(P, c.vocab_size, 100 + p));
  std::vector<SequenceRequest> req;
  for (int p = 0; p < n_prompts; ++p)
    for (int k = 0; k < K; ++k) req.push_back({prompts[p].data(), P, uint64_t(p), uint64_t(k)});
  SamplingOptions o;
  o.max_new_tokens = N, o.temperature = 0.7, o.top_p = 0.9;
  const int reps = std::getenv("SPPO_BENCH_REPS") ? std::atoi(std::getenv("SPPO_BENCH_REPS")) : 1;
  const int64_t today_bytes = int64_t(16) * ((ctx + kKvBlockSize - 1) / kKvBlockSize) * 2 * c.num_hidden_layers *
                              c.num_key_value_heads * kKvBlockSize * c.head_dim * int64_t(sizeof(float));
  std::printf("threads %d, gemm kernel %s; %d prompts x %d tokens, K = %d, %d new tokens, %d rep(s)\n", num_threads(),
              cpu::gemm_kernel_name(), n_prompts, P, K, N, reps);
  // This VM's 2 cores are shared: besides wall time, the process's CPU time (both threads; the
  // pool's workers spin ~50-100 us before sleeping), which other processes' load skews less.
  auto cpu_seconds = [] {
    timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
  };
  // SPPO_BENCH_CASES=engine,today runs a subset.
  std::vector<std::string> only;
  if (const char* cases = std::getenv("SPPO_BENCH_CASES"))
    for (std::string rest = cases; !rest.empty();) {
      const size_t comma = std::min(rest.find(','), rest.size());
      only.push_back(rest.substr(0, comma));
      rest.erase(0, comma + 1);
    }
  struct Time {
    double wall = 0, cpu = 0;
  };
  auto run = [&](const char* label, GeneratorPlan plan) {
    Time best;
    if (!only.empty() && std::find(only.begin(), only.end(), label) == only.end()) return best;
    Generator<float> g(m, plan, std::make_unique<cpu::CpuOps<float>>());
    std::vector<double> cpu;
    best.wall = harness::median_seconds(reps, [&] {
      const double c0 = cpu_seconds();
      g.generate(req, o);
      cpu.push_back(cpu_seconds() - c0);
    });
    std::sort(cpu.begin(), cpu.end());
    best.cpu = cpu[cpu.size() / 2];
    const GenerateStats& st = g.last_stats();
    std::printf(
        "shared_prompts %-8s %8.2f s %7.0f tok/s  (cpu %.2f s; maxBatch %d, sharing %s, pool %lld blocks = %lld MiB, "
        "peak %lld blocks, %lld in flight; %lld prompt rows, %lld steps)\n",
        label, best.wall, double(req.size()) * N / best.wall, best.cpu, plan.max_batch,
        plan.share_prefixes ? "on" : "off", (long long)g.kv_blocks(), (long long)(g.plan().kv_cache_bytes >> 20),
        (long long)st.peak_blocks, (long long)st.peak_sequences, (long long)st.prompt_rows, (long long)st.steps);
    std::fflush(stdout);
    return best;
  };
  const Time engine = run("engine", GeneratorPlan{n_prompts * K, ctx, today_bytes, true});
  const Time today = run("today", GeneratorPlan{16, ctx, 0, false});
  run("engine16", GeneratorPlan{16, ctx, 0, true});
  run("engine80", GeneratorPlan{n_prompts * K, ctx, 0, true});
  run("today80", GeneratorPlan{n_prompts * K, ctx, 0, false});
  if (engine.wall > 0 && today.wall > 0)
    std::printf("shared_prompts ratio %.2fx wall, %.2fx cpu (today / engine, the same KV-cache bytes; target >= 2.5)\n",
                today.wall / engine.wall, today.cpu / engine.cpu);
}

SPPO_BENCH(generate_decode) {
  std::printf("threads %d, gemm kernel %s\n", num_threads(), cpu::gemm_kernel_name());
  for (const char* p : {"tiny", "small"}) bench_decode(p);
  for (const char* p : {"tiny", "small"}) bench_step_at_positions(p);
}
