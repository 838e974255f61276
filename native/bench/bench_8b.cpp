// The Llama-3-8B shape on one GPU (issue 13, docs/memory.md), with random weights:
//   the memory plan (plan_memory over the meta op set) against cudaMemGetInfo around creation,
//   the optimizer state, the first steps and the generator;
//   full fine-tuning: SPPO preference micro-batches of 2 x 1024 tokens (one pair: a 256-token
//   prompt, 768-token responses) with RMSprop and activation checkpointing, gradient
//   accumulation to the reference's global batch of 64 sequences; tokens/s and MFU (6·params +
//   6·layers·d·T FLOPs per token against 790 TFLOP/s, bench_cuda.cpp's convention; the
//   checkpointed recompute is not counted as useful work);
//   generation at batch 64 (256-token prompts, 256 new tokens, T 0.7, top-p 0.9);
//   full fine-tuning with AdamW over bf16 gradients (big8b_full_ft_bf16_adamw: what AdamW needs
//   at this size, docs/memory.md), the same step and generation;
//   the same with LoRA r16 on all seven projections over the frozen bf16 base (big8b_lora_: the
//   plan and its measurement, a preference step's tokens/s and MFU at 4·params + 6·layers·d·T
//   FLOPs per token, generation through the unmerged adapters), the goal being all of it within
//   40 GiB.
// Not among the cuda_ benchmarks: it needs ~110 GiB and minutes. bench/gpu/run.sh's "big"
// section runs it (sppo_bench big8b_) beside the PyTorch peers (bench/gpu/peers.py train8B lora8B).
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <vector>

#include "core/rng.h"
#include "cuda/cuda_backend.h"
#include "sppo/generate.h"
#include "sppo/model.h"
#include "tests/harness.h"

using namespace sppo;

namespace {

constexpr double kGiB = 1073741824.0;

ModelConfig llama3_8b() {
  ModelConfig c;
  c.vocab_size = 128256, c.hidden_size = 4096, c.num_hidden_layers = 32, c.num_attention_heads = 32;
  c.num_key_value_heads = 8, c.intermediate_size = 14336, c.max_position_embeddings = 8192;
  c.rope_theta = 500000;
  c.rope_scaling.kind = RopeScaling::Kind::Llama3;
  c.rope_scaling.factor = 8, c.rope_scaling.low_freq_factor = 1, c.rope_scaling.high_freq_factor = 4;
  c.rope_scaling.original_max_position_embeddings = 8192;
  c.resolve_and_validate();
  return c;
}

size_t device_used() {
  cudaDeviceSynchronize();
  size_t free = 0, total = 0;
  cudaMemGetInfo(&free, &total);
  return total - free;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Random weights without drawing 8 billion normals on the host: one block of N(0, 0.02) values
// tiled through every matrix (offset per tensor), norms 1.
void random_weights(Model<bf16>& m) {
  constexpr int64_t kBlock = int64_t(1) << 22;
  std::vector<float> block(kBlock), host;
  for (int64_t i = 0; i < kBlock; ++i) block[size_t(i)] = float(0.02 * standard_normal(3, 0, uint64_t(i)));
  for (size_t k = 0; k < m.params().size(); ++k) {
    const ParamInfo& p = m.params()[k];
    host.resize(size_t(p.size));
    const bool norm = p.name.find("norm") != std::string::npos;
    for (int64_t i = 0; i < p.size; ++i) host[size_t(i)] = norm ? 1.0f : block[size_t((i + 7919 * k) % kBlock)];
    m.set_param(p.name, host.data(), p.size);
  }
}

void print_against(const char* what, size_t planned, size_t measured) {
  std::printf("  %-34s planned %7.2f GiB  cudaMemGetInfo %7.2f GiB  unplanned %+7.3f GiB\n", what, planned / kGiB,
              measured / kGiB, (double(measured) - double(planned)) / kGiB);
}

// One pair: rows 0 / 1 share a 256-token prompt; the 768-token responses are the masked targets.
struct PairBatch {
  std::vector<int32_t> tokens;
  std::vector<uint8_t> mask;
  std::vector<double> ref, target = {0.7, 0.3};
  PreferenceBatch pb;
  PairBatch(Model<bf16>& m, int B, int Tn, int prompt) : tokens(size_t(B) * Tn), mask(tokens.size()), ref(B) {
    for (size_t i = 0; i < tokens.size(); ++i) {
      const int64_t t = int64_t(i) % Tn;
      tokens[i] = int32_t(uniform01(5, t < prompt ? 0 : 1 + i / Tn, uint64_t(t)) * m.config().vocab_size);
      mask[i] = t >= prompt;
    }
    const Batch seqs{tokens.data(), mask.data(), B, Tn};
    m.sequence_logprobs(seqs, ref.data(), nullptr);
    pb = {seqs, ref.data(), target.data(), PreferenceLoss::SppoPair, 1000};
  }
};

// A whole optimizer step (grad_accum_steps micro-batches), timed call by call (the last one
// steps); prints tokens/s and MFU (useful work: 6·params + 6·layers·d·T FLOPs per token for full
// fine-tuning, 4·params + … for LoRA, whose frozen base has no weight-gradient GEMMs).
void time_step(Model<bf16>& m, const PreferenceBatch& pb, const char* what) {
  const int accum = m.optimizer_config().grad_accum_steps;
  const int64_t B = pb.seqs.batch, Tn = pb.seqs.seq;
  std::vector<double> micro;
  double step_call = 0;
  for (int i = 0; i < accum; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    const PreferenceStepResult r = m.preference_step(pb);
    const double s = seconds_since(t0);
    if (r.step.stepped)
      step_call = s;
    else if (i > 0)
      micro.push_back(s);  // the first call warms up
  }
  std::sort(micro.begin(), micro.end());
  const double t_micro = micro[micro.size() / 2];
  const double t_global = (accum - 1) * t_micro + step_call;
  const double tok = double(accum) * B * Tn / t_global;
  const ModelConfig& c = m.config();
  const double weights = m.lora().enabled() ? 4.0 : 6.0;
  const double flops_per_token = weights * double(m.num_params()) + 6.0 * c.num_hidden_layers * c.hidden_size * Tn;
  std::printf(
      "train 8B SPPO %s B%lld T%lld x%d  %8.0f tok/s  micro-batch %.1f ms, with the optimizer step %.1f ms  MFU "
      "%.1f%%\n",
      what, (long long)B, (long long)Tn, accum, tok, 1e3 * t_micro, 1e3 * step_call,
      100 * tok * flops_per_token / 790e12);
}

// Generation at batch 64 (256-token prompts, 256 new tokens, T 0.7, top-p 0.9): the best of two
// runs after a warm-up that records the decode graphs.
void time_generation(GeneratorApi& g, const ModelConfig& c, const char* what) {
  std::vector<std::vector<int32_t>> prompts(64);
  std::vector<SequenceRequest> req;
  for (int i = 0; i < 64; ++i) {
    prompts[size_t(i)].resize(256);
    for (int t = 0; t < 256; ++t) prompts[size_t(i)][size_t(t)] = int32_t(uniform01(9, i, t) * c.vocab_size);
    req.push_back({prompts[size_t(i)].data(), 256, 7, uint64_t(i)});
  }
  SamplingOptions so;
  so.max_new_tokens = 256, so.temperature = 0.7, so.top_p = 0.9;
  g.generate(req, so);
  std::vector<double> t;
  int64_t produced = 0;
  for (int r = 0; r < 2; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    const auto res = g.generate(req, so);
    t.push_back(seconds_since(t0));
    produced = 0;
    for (const auto& x : res) produced += int64_t(x.tokens.size());
  }
  const double best = *std::min_element(t.begin(), t.end());
  std::printf("generate 8B %s batch 64, prompt 256, 256 new: %8.0f new tok/s (%.2f s)\n", what, produced / best, best);
  std::fflush(stdout);
}

// Creates the model of `plan` and `lora` over random weights, measures it against the plan, takes
// one optimizer step of 32 micro-batches of 2 x 1024 (the global batch of 64) with RMSprop at
// `lr` (or AdamW with `adamw`), then generates at batch 64.
void run_8b(const MemoryPlan& plan, const LoraConfig& lora, double lr, const char* what, bool adamw = false) {
  const cuda::DeviceInfo d = cuda::probe();
  if (!d.available) {
    std::printf("skipped: %s\n", d.why_not.c_str());
    return;
  }
  const ModelConfig c = llama3_8b();
  const int prompt = 256, accum = 32;
  const OptimizerConfig::Kind kind = adamw ? OptimizerConfig::Kind::AdamW : OptimizerConfig::Kind::RMSprop;
  const GeneratorPlan gen{64, 512};
  const MemoryReport planned = plan_memory<bf16>(c, plan, lora, cuda::footprint(), &kind, &gen);
  std::printf(
      "device %s, %.1f GiB; Llama-3-8B shape, %s, plan B%d T%d, %s, activation checkpointing %s, %s gradients\n",
      d.name.c_str(), d.total_memory / kGiB, what, plan.max_batch, plan.max_seq, adamw ? "AdamW" : "RMSprop",
      plan.checkpoint_activations ? "on" : "off", plan.bf16_gradients ? "bf16" : "fp32");
  std::printf(
      "  plan: params %.2f, master %.3f, grads %.3f, optimizer %.3f, activations %.2f, scratch %.2f, KV cache "
      "%.2f; total %.2f GiB\n",
      planned.params / kGiB, planned.master / kGiB, planned.grads / kGiB, planned.optimizer / kGiB,
      planned.activations / kGiB, planned.scratch / kGiB, planned.kv_cache / kGiB, planned.total() / kGiB);

  // The op set first: its CUDA context and cuBLASLt handle are not the model's.
  std::unique_ptr<Ops<bf16>> ops = cuda::make_ops(0);
  const size_t base = device_used();
  auto t0 = std::chrono::steady_clock::now();
  Model<bf16> m(c, plan, std::move(ops), /*initialize=*/false, lora);
  const size_t created = device_used();
  random_weights(m);
  std::printf("  created and filled in %.1f s\n", seconds_since(t0));
  print_against("model (params, master, grads, acts)", planned.total() - planned.optimizer - planned.kv_cache,
                created - base);

  OptimizerConfig oc;
  oc.kind = kind, oc.lr = lr, oc.max_grad_norm = 1.0, oc.grad_accum_steps = accum;
  m.set_optimizer(oc);
  const size_t with_state = device_used();
  print_against("optimizer state", planned.optimizer, with_state - created);

  PairBatch batch(m, plan.max_batch, plan.max_seq, prompt);
  time_step(m, batch.pb, what);
  const size_t trained = device_used();
  print_against("everything but the generator", planned.total() - planned.kv_cache, trained - base);

  std::unique_ptr<GeneratorApi> g = m.make_generator(gen);
  const size_t with_gen = device_used();
  print_against("generator (KV cache, step buffers)", planned.kv_cache, with_gen - trained);
  std::printf("  peak use %.2f GiB of %.1f GiB\n", with_gen / kGiB, d.total_memory / kGiB);
  time_generation(*g, c, what);
}

}  // namespace

// LoRA r16 (alpha 32) on all seven projections over a frozen bf16 base, the goal of issue 13:
// preference steps and generation within 40 GiB ("peak use"). No checkpointing: at micro-batches
// of 2 the activations fit. Runs before the full fine-tuning benchmark, so that a card too small
// for that one (an 80 GB H100) still measures this one.
SPPO_BENCH(big8b_lora_step_and_generate) {
  LoraConfig lora;
  lora.rank = 16, lora.alpha = 32;
  for (const char* t : kLoraTargetNames) lora.add_target(t);
  run_8b(MemoryPlan{2, 1024}, lora, 1e-5, "LoRA r16 all seven");
}

SPPO_BENCH(big8b_full_ft_and_generate) {
  MemoryPlan plan{2, 1024};
  plan.checkpoint_activations = true;
  run_8b(plan, {}, 1e-7, "full FT");
}

// AdamW's two moments at 8B (59.8 GiB) fit beside everything else once the gradients are bf16
// (plan ~123 GiB); the step also shows what the staging (a zero and an add-and-round of each
// layer's, the head's and the embedding's gradient per micro-batch) costs against the fp32 one.
SPPO_BENCH(big8b_full_ft_bf16_adamw_and_generate) {
  MemoryPlan plan{2, 1024};
  plan.checkpoint_activations = true;
  plan.bf16_gradients = true;
  run_8b(plan, {}, 1e-7, "full FT", /*adamw=*/true);
}
