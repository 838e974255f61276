// The CUDA backend's benchmarks at the shapes of ../shared/anchors/README.md (the H100 PyTorch
// anchors), so each line compares with the PyTorch numbers measured in the same GPU job:
//   train 134M (d768 L12 h12 ffn2048 V32000, B16 T1024) and 1.1B (d2048 L16 h32 kv8 ffn8192,
//   B8 T1024): fwd + bwd + AdamW tokens/s and MFU (6·params + 6·layers·d·T FLOPs per token
//   against 790 TFLOP/s, the anchors' convention);
//   generate 134M at batch 64 and 256 (64-token prompts, 128 new tokens, T 0.7, top-p 0.9);
//   the fused LM head + loss backward at B8 T1024 H4096 V128256: time and extra device memory;
//   the sampler alone (one call: draws up, tokens and log-probs down) at batch 1, 64 and 256.
// Prints "skipped" where no GPU is usable. Times are medians after a warm-up; every timed call
// ends with a device -> host copy, so host time is device time. cuda_breakdown prints where the
// time of a training step and of a decode step goes (bench/cuda_profile.h), against the card's
// bf16 GEMM and copy ceilings measured in the same process.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <vector>

#include "core/rng.h"
#include "cuda/cuda_backend.h"
#include "cuda/cuda_ops.cuh"
#include "sppo/generate.h"
#include "sppo/model.h"
#include "bench/cuda_profile.h"
#include "tests/harness.h"

using namespace sppo;

namespace {

bool gpu_or_skip() {
  const cuda::DeviceInfo d = cuda::probe();
  if (!d.available) {
    std::printf("skipped: %s\n", d.why_not.c_str());
    return false;
  }
  std::printf("device %s (sm_%d%d), %.1f GiB\n", d.name.c_str(), d.sm_major, d.sm_minor, d.total_memory / 1073741824.0);
  return true;
}

ModelConfig llama(int64_t d, int layers, int heads, int kv, int64_t ffn, int64_t vocab) {
  ModelConfig c;
  c.vocab_size = vocab, c.hidden_size = d, c.num_hidden_layers = layers, c.num_attention_heads = heads;
  c.num_key_value_heads = kv, c.intermediate_size = ffn, c.max_position_embeddings = 2048;
  c.resolve_and_validate();
  return c;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

size_t device_used() {
  size_t free = 0, total = 0;
  cudaMemGetInfo(&free, &total);
  return total - free;
}

// The training benchmarks' setup: AdamW as the anchors run it, and a batch of random tokens.
std::vector<int32_t> prepare_training(Model<bf16>& m, int B, int Tn) {
  OptimizerConfig oc;
  oc.kind = OptimizerConfig::Kind::AdamW, oc.lr = 1e-4, oc.weight_decay = 0.1;
  m.set_optimizer(oc);
  std::vector<int32_t> tokens(size_t(B) * Tn);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = int32_t(uniform01(1, 0, i) * m.config().vocab_size);
  return tokens;
}

// The generation benchmarks' workload: `batch` random prompts, T 0.7, top-p 0.9 (the anchors').
struct Workload {
  std::vector<std::vector<int32_t>> prompts;
  std::vector<SequenceRequest> requests;
  SamplingOptions options;
  Workload(const ModelConfig& c, int batch, int prompt, int new_tokens) : prompts(size_t(batch)) {
    for (int i = 0; i < batch; ++i) {
      prompts[size_t(i)].resize(size_t(prompt));
      for (int t = 0; t < prompt; ++t) prompts[size_t(i)][size_t(t)] = int32_t(uniform01(2, i, t) * c.vocab_size);
      requests.push_back({prompts[size_t(i)].data(), prompt, 7, uint64_t(i)});
    }
    options.max_new_tokens = new_tokens, options.temperature = 0.7, options.top_p = 0.9;
  }
};

void bench_train(const char* name, const ModelConfig& c, int B, int Tn, int reps) {
  Model<bf16> m(c, {B, Tn}, cuda::make_ops(0));
  const std::vector<int32_t> tokens = prepare_training(m, B, Tn);
  const Batch batch{tokens.data(), nullptr, B, Tn};
  m.train_step(batch);
  m.train_step(batch);
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    m.train_step(batch);
    t.push_back(seconds_since(t0));
  }
  std::sort(t.begin(), t.end());
  const double s = t[t.size() / 2], tok = double(B) * Tn / s;
  // Parameters without the tied/untied distinction the anchors ignore: count the arena.
  const double flops_per_token = 6.0 * double(m.num_params()) + 6.0 * c.num_hidden_layers * c.hidden_size * Tn;
  const MemoryReport mem = m.memory();
  std::printf(
      "train %-5s B%d T%d  %9.0f tok/s  %.1f ms/step  MFU %.1f%%  memory %.1f GiB (params+master %.1f, grads %.1f, "
      "optimizer %.1f, activations %.1f, scratch %.1f)\n",
      name, B, Tn, tok, 1e3 * s, 100 * tok * flops_per_token / 790e12, mem.total() / 1073741824.0,
      (mem.params + mem.master) / 1073741824.0, mem.grads / 1073741824.0, mem.optimizer / 1073741824.0,
      mem.activations / 1073741824.0, mem.scratch / 1073741824.0);
  std::fflush(stdout);
}

// record_graphs = false launches every decode step kernel by kernel (the line says "eager").
void bench_generate(const ModelConfig& c, int batch, int prompt, int new_tokens, bool record_graphs = true) {
  Model<bf16> m(c, {1, 8}, cuda::make_ops(0, record_graphs));
  std::unique_ptr<GeneratorApi> g = m.make_generator({batch, prompt + new_tokens});
  const Workload w(c, batch, prompt, new_tokens);
  const std::vector<SequenceRequest>& req = w.requests;
  const SamplingOptions& o = w.options;
  g->generate(req, o);  // warm-up
  std::vector<double> t;
  int64_t produced = 0;
  for (int r = 0; r < 3; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    const auto res = g->generate(req, o);
    t.push_back(seconds_since(t0));
    produced = 0;
    for (const auto& x : res) produced += int64_t(x.tokens.size());
  }
  std::sort(t.begin(), t.end());
  std::printf("generate 134M batch %d%s, prompt %d, %d new: %9.0f new tok/s (%.2f s, KV cache %.2f GiB)\n", batch,
              record_graphs ? "" : " eager", prompt, new_tokens, produced / t[1], t[1],
              g->memory_bytes() / 1073741824.0);
  std::fflush(stdout);
}

// The card's ceilings, measured once per process: bf16 GEMM TFLOP/s (8192³ through the backend's
// own cuBLASLt path) and device-to-device copy TB/s (bytes read + written), each the best of 20
// runs after 5 warm-ups (the clock ramps: a median of 7 read 671 and 883 TFLOP/s in one job).
template <class F>
double best_seconds(int reps, F&& f) {
  for (int w = 0; w < 5; ++w) f();
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    best = std::min(best, seconds_since(t0));
  }
  return best;
}

struct Ceilings {
  double tflops, tbs;
};
const Ceilings& ceilings() {
  static const Ceilings c = [] {
    std::unique_ptr<Ops<bf16>> ops = cuda::make_ops(0);
    const int64_t n = 8192;
    auto* a = static_cast<bf16*>(ops->alloc_bytes(n * n * sizeof(bf16)));
    auto* b = static_cast<bf16*>(ops->alloc_bytes(n * n * sizeof(bf16)));
    auto* d = static_cast<bf16*>(ops->alloc_bytes(n * n * sizeof(bf16)));
    ops->fill(a, 0.01, n * n);
    ops->fill(b, 0.01, n * n);
    const double g = best_seconds(20, [&] {
      ops->gemm(false, true, n, n, n, 1, a, n, b, n, 0, d, n);
      ops->synchronize();
    });
    const size_t bytes = size_t(1) << 30;
    void* src = ops->alloc_bytes(bytes);
    void* dst = ops->alloc_bytes(bytes);
    auto* stream = static_cast<cuda::CudaOps&>(*ops).stream();
    const double m = best_seconds(20, [&] {
      cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream);
      ops->synchronize();
    });
    for (void* p : {(void*)a, (void*)b, (void*)d, src, dst}) ops->free_bytes(p);
    Ceilings r{2.0 * n * n * n / g / 1e12, 2.0 * bytes / m / 1e12};
    std::printf("ceilings: bf16 GEMM 8192^3 %.0f TFLOP/s, device copy %.2f TB/s (read + write)\n", r.tflops, r.tbs);
    return r;
  }();
  return c;
}

// The training step's breakdown: `steps` profiled steps after a warm-up.
void breakdown_train(const char* name, const ModelConfig& c, int B, int Tn, int steps) {
  auto profile = std::make_shared<bench::OpProfile>();
  Model<bf16> m(c, {B, Tn}, bench::make_profiled_ops(0, c, profile));
  profile->embedding_table = m.embedding();
  const std::vector<int32_t> tokens = prepare_training(m, B, Tn);
  const Batch batch{tokens.data(), nullptr, B, Tn};
  m.train_step(batch);
  m.train_step(batch);
  profile->reset();
  const auto t0 = std::chrono::steady_clock::now();
  for (int s = 0; s < steps; ++s) m.train_step(batch);
  const double wall = 1e3 * seconds_since(t0) / steps;
  profile->collect();
  char title[128];
  std::snprintf(title, sizeof title, "train %s B%d T%d, fwd+bwd+AdamW, %d steps", name, B, Tn, steps);
  bench::print_breakdown(title, *profile, steps, wall, ceilings().tflops, ceilings().tbs);
}

// One decode step's breakdown: a whole generate() (prefill included, ~2% of it) divided by its
// number of decode steps.
void breakdown_decode(const ModelConfig& c, int batch, int prompt, int new_tokens) {
  auto profile = std::make_shared<bench::OpProfile>();
  Model<bf16> m(c, {1, 8}, bench::make_profiled_ops(0, c, profile));
  profile->embedding_table = m.embedding();
  std::unique_ptr<GeneratorApi> g = m.make_generator({batch, prompt + new_tokens});
  const Workload w(c, batch, prompt, new_tokens);
  const std::vector<SequenceRequest>& req = w.requests;
  const SamplingOptions& o = w.options;
  g->generate(req, o);  // warm-up
  profile->reset();
  const auto t0 = std::chrono::steady_clock::now();
  g->generate(req, o);
  const double wall = 1e3 * seconds_since(t0) / new_tokens;
  profile->collect();
  char title[128];
  std::snprintf(title, sizeof title, "decode step, 134M batch %d (prompt %d, %d new, T 0.7 top-p 0.9)", batch, prompt,
                new_tokens);
  bench::print_breakdown(title, *profile, new_tokens, wall, ceilings().tflops, ceilings().tbs);
}

// One sampler call per timing at decode shapes (`logits`: n rows of V on the device), host time
// of the whole call: draws up, kernels, tokens and log-probs down.
void bench_sampler(Ops<bf16>& ops, const float* logits, int64_t n, int64_t V, const char* rows, const char* what,
                   double t, int64_t k, double p) {
  SamplingOptions o;
  o.temperature = t, o.top_k = k, o.top_p = p;
  std::vector<double> u(n), lp(n);
  std::vector<int32_t> tok(n);
  std::vector<double> times;
  for (int r = 0; r < 25; ++r) {
    for (int64_t i = 0; i < n; ++i) u[i] = uniform01(4, r, i);
    const auto t0 = std::chrono::steady_clock::now();
    ops.sample(tok.data(), lp.data(), logits, n, V, o, u.data());
    if (r >= 5) times.push_back(seconds_since(t0));
  }
  std::sort(times.begin(), times.end());
  std::printf("sampler batch %-3lld V %-6lld %-12s %-20s %8.1f us/call\n", (long long)n, (long long)V, rows, what,
              1e6 * times[times.size() / 2]);
  std::fflush(stdout);
}

}  // namespace

SPPO_BENCH(cuda_train_step) {
  if (!gpu_or_skip()) return;
  bench_train("134M", llama(768, 12, 12, 12, 2048, 32000), 16, 1024, 10);
  bench_train("1.1B", llama(2048, 16, 32, 8, 8192, 32000), 8, 1024, 5);
}

SPPO_BENCH(cuda_generate) {
  if (!gpu_or_skip()) return;
  const ModelConfig c = llama(768, 12, 12, 12, 2048, 32000);
  for (const bool graphs : {true, false}) {
    bench_generate(c, 64, 64, 128, graphs);
    bench_generate(c, 256, 64, 128, graphs);
  }
}

SPPO_BENCH(cuda_fused_head) {
  if (!gpu_or_skip()) return;
  const int64_t n = 8 * 1024, C = 4096, V = 128256;
  std::unique_ptr<Ops<bf16>> ops = cuda::make_ops(0);
  const size_t base = device_used();
  auto* H = static_cast<bf16*>(ops->alloc_bytes(n * C * sizeof(bf16)));
  auto* W = static_cast<bf16*>(ops->alloc_bytes(V * C * sizeof(bf16)));
  auto* dH = static_cast<bf16*>(ops->alloc_bytes(n * C * sizeof(bf16)));
  auto* dW = static_cast<float*>(ops->alloc_bytes(V * C * sizeof(float)));
  auto* tg = static_cast<int32_t*>(ops->alloc_bytes(n * sizeof(int32_t)));
  auto* logp = static_cast<double*>(ops->alloc_bytes(n * sizeof(double)));
  auto* lse = static_cast<double*>(ops->alloc_bytes(n * sizeof(double)));
  auto* coef = static_cast<double*>(ops->alloc_bytes(n * sizeof(double)));
  const int64_t scratch_elems = ops->head_scratch_elems();  // the model's tile on this backend
  auto* scratch = static_cast<float*>(ops->alloc_bytes(scratch_elems * sizeof(float)));
  {
    std::vector<float> h(size_t(V) * C);
    for (size_t i = 0; i < h.size(); ++i) h[i] = float(0.02 * standard_normal(3, 0, i));
    ops->upload(W, h.data(), V * C);
    h.resize(size_t(n) * C);
    for (size_t i = 0; i < h.size(); ++i) h[i] = float(standard_normal(3, 1, i));
    ops->upload(H, h.data(), n * C);
    std::vector<int32_t> t(n);
    std::vector<double> cf(n);
    for (int64_t i = 0; i < n; ++i) t[i] = int32_t(uniform01(3, 2, i) * V), cf[i] = -1.0 / n;
    ops->upload_bytes(tg, t.data(), n * sizeof(int32_t));
    ops->upload_bytes(coef, cf.data(), n * sizeof(double));
  }
  const size_t inputs = device_used() - base;
  std::vector<double> l(n);
  auto step = [&] {
    ops->head_logprobs(logp, lse, H, W, tg, n, C, V, scratch, scratch_elems);
    ops->head_logprobs_backward(dH, dW, H, W, tg, lse, coef, n, C, V, scratch, scratch_elems);
    ops->download_bytes(l.data(), logp, n * sizeof(double));
  };
  const double s = harness::median_seconds(5, step);
  // Extra = everything beyond the inputs and the outputs PyTorch also holds (H, W, dH, dW):
  // the logits tile, the per-row arrays and whatever state the head ops keep.
  const size_t io = size_t(n * C + V * C + n * C) * sizeof(bf16) + size_t(V) * C * sizeof(float);
  const double extra = double(device_used() - base) - double(io);
  std::printf(
      "fused head fwd+bwd B8 T1024 H4096 V128256: %.1f ms, extra device memory %.2f GiB (inputs+outputs %.2f GiB)\n",
      1e3 * s, extra / 1073741824.0, inputs / 1073741824.0);
  for (void* p :
       {(void*)H, (void*)W, (void*)dH, (void*)dW, (void*)tg, (void*)logp, (void*)lse, (void*)coef, (void*)scratch})
    ops->free_bytes(p);
}

// Each attention path's forward and backward at the training shapes (134M: 12 heads of 64;
// 1.1B: 32 heads over 8 kv heads of 64; 16 heads of 128), B·T = 8–16k tokens of T 1024. Causal
// FLOPs: forward 2·B·H·T²·D (two products over half the square), backward 2.5 times that.
SPPO_BENCH(cuda_attention) {
  if (!gpu_or_skip()) return;
  struct Case {
    const char* name;
    int64_t B, T, H, KV, D;
  };
  for (const Case& c :
       {Case{"134M", 16, 1024, 12, 12, 64}, Case{"1.1B", 8, 1024, 32, 8, 64}, Case{"d128", 8, 1024, 16, 16, 128}}) {
    const int64_t N = c.B * c.T, QD = c.H * c.D, KD = c.KV * c.D, QKV = QD + 2 * KD;
    const AttentionShape s{c.B, c.T, c.H, c.KV, c.D, QKV, 0, QD, QD + KD, QD, 1.0 / std::sqrt(double(c.D))};
    const double fwd_flops = 2.0 * c.B * c.H * double(c.T) * c.T * c.D, bwd_flops = 2.5 * fwd_flops;
    for (const char* path : {"wmma", "mma", "fma"}) {
      setenv("SPPO_CUDA_ATTENTION", path, 1);  // read by an op set at its first attention call
      std::unique_ptr<Ops<bf16>> ops = cuda::make_ops(0);
      auto* qkv = static_cast<bf16*>(ops->alloc_bytes(N * QKV * sizeof(bf16)));
      auto* dqkv = static_cast<bf16*>(ops->alloc_bytes(N * QKV * sizeof(bf16)));
      auto* out = static_cast<bf16*>(ops->alloc_bytes(N * QD * sizeof(bf16)));
      auto* dout = static_cast<bf16*>(ops->alloc_bytes(N * QD * sizeof(bf16)));
      auto* lse = static_cast<float*>(ops->alloc_bytes(c.B * c.H * c.T * sizeof(float)));
      {
        std::vector<float> h(size_t(N * QKV));
        for (size_t i = 0; i < h.size(); ++i) h[i] = float(standard_normal(5, 0, i));
        ops->upload(qkv, h.data(), N * QKV);
        h.resize(size_t(N * QD));
        ops->upload(dout, h.data(), N * QD);
      }
      const double f = harness::median_seconds(10, [&] {
        ops->attention_forward(out, lse, qkv, s);
        ops->synchronize();
      });
      const double b = harness::median_seconds(10, [&] {
        ops->attention_backward(dqkv, dout, qkv, out, lse, s);
        ops->synchronize();
      });
      std::printf(
          "attention %-4s B%ld T%ld %ld/%ld x %ld  %-4s  forward %7.3f ms %6.1f TFLOP/s  "
          "backward %7.3f ms %6.1f TFLOP/s\n",
          c.name, long(c.B), long(c.T), long(c.H), long(c.KV), long(c.D), path, 1e3 * f, fwd_flops / f / 1e12, 1e3 * b,
          bwd_flops / b / 1e12);
      std::fflush(stdout);
      for (void* p : {(void*)qkv, (void*)dqkv, (void*)out, (void*)dout, (void*)lse}) ops->free_bytes(p);
    }
  }
  unsetenv("SPPO_CUDA_ATTENTION");
}

// Near-uniform rows (a random-weight model: top-p 0.9 keeps ~90% of the vocabulary) and peaked
// ones (standard deviation 4); every row of a batch the same (the work does not depend on which).
SPPO_BENCH(cuda_sampler) {
  if (!gpu_or_skip()) return;
  std::unique_ptr<Ops<bf16>> ops = cuda::make_ops(0);
  for (int64_t V : {int64_t(32000), int64_t(151936)})
    for (double sigma : {0.02, 4.0}) {
      std::vector<float> row(V);
      for (int64_t j = 0; j < V; ++j) row[j] = float(sigma * standard_normal(3, 0, j));
      for (int64_t n : {int64_t(1), int64_t(64), int64_t(256)}) {
        std::vector<float> x;
        for (int64_t i = 0; i < n; ++i) x.insert(x.end(), row.begin(), row.end());
        auto* d = static_cast<float*>(ops->alloc_bytes(x.size() * sizeof(float)));
        ops->upload_bytes(d, x.data(), x.size() * sizeof(float));
        const char* rows = sigma < 0.1 ? "near-uniform" : "peaked";
        bench_sampler(*ops, d, n, V, rows, "T 0.7 untruncated", 0.7, 0, 1);
        bench_sampler(*ops, d, n, V, rows, "T 0.7 top-p 0.9", 0.7, 0, 0.9);
        bench_sampler(*ops, d, n, V, rows, "top-k 50 top-p 0.9", 0.7, 50, 0.9);
        ops->free_bytes(d);
      }
    }
}

SPPO_BENCH(cuda_breakdown) {
  if (!gpu_or_skip()) return;
  ceilings();
  breakdown_train("134M", llama(768, 12, 12, 12, 2048, 32000), 16, 1024, 3);
  breakdown_train("1.1B", llama(2048, 16, 32, 8, 8192, 32000), 8, 1024, 2);
  const ModelConfig c = llama(768, 12, 12, 12, 2048, 32000);
  breakdown_decode(c, 64, 64, 128);
  breakdown_decode(c, 256, 64, 128);
}
