// Whole-model benchmark without Node: train-step tokens/s for the `tiny` and `small` presets at
// the PyTorch CPU baseline's batch shapes, and the planned memory of each; a LoRA step (r16 on
// all seven projections), and a step over bf16 gradients, each beside the full fp32 step of the
// same model, in the same run.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <vector>

#include "core/rng.h"
#include "core/threadpool.h"
#include "cpu/cpu_ops.h"
#include "cpu/gemm.h"
#include "sppo/model.h"
#include "tests/harness.h"

using namespace sppo;

namespace {
double bench_train(const char* preset, int B, int Tn, int reps, const LoraConfig& lora = {}, bool bf16_grads = false) {
  ModelConfig c = preset_config(preset);
  MemoryPlan plan{B, Tn};
  plan.bf16_gradients = bf16_grads;
  Model<float> m(c, plan, std::make_unique<cpu::CpuOps<float>>(), true, lora);
  OptimizerConfig oc;
  oc.lr = 1e-4;
  m.set_optimizer(oc);
  std::vector<int32_t> tokens(size_t(B) * Tn);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = int32_t(uniform01(1, 0, i) * c.vocab_size);
  Batch batch{tokens.data(), nullptr, B, Tn};
  m.train_step(batch);  // warm-up
  std::vector<double> times;
  for (int r = 0; r < reps; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    m.train_step(batch);
    times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(times.begin(), times.end());
  const double t = times[times.size() / 2];
  MemoryReport mem = m.memory();
  std::printf(
      "train %-6s%s%s B%-3d T%-4d %8.0f tok/s  (%.3f s/step, median of %d)  memory %.0f MiB "
      "(params %.0f, grads %.0f, optimizer %.0f, activations %.0f, scratch %.0f)\n",
      preset, lora.enabled() ? " lora" : "", bf16_grads ? " bf16 grads" : "", B, Tn, B * Tn / t, t, reps,
      mem.total() / 1048576.0, mem.params / 1048576.0, mem.grads / 1048576.0, mem.optimizer / 1048576.0,
      mem.activations / 1048576.0, mem.scratch / 1048576.0);
  std::fflush(stdout);
  return B * Tn / t;
}
}  // namespace

SPPO_BENCH(train_step) {
  std::printf("threads %d, gemm kernel %s\n", num_threads(), cpu::gemm_kernel_name());
  bench_train("tiny", 16, 256, 5);
  bench_train("small", 8, 512, 3);
}

// The LoRA step skips every base-weight gradient GEMM (a third of a full step's GEMM work) and
// adds the adapters' rank-16 GEMMs; the ratio says what that buys on this machine.
SPPO_BENCH(lora_train_step) {
  std::printf("threads %d, gemm kernel %s\n", num_threads(), cpu::gemm_kernel_name());
  LoraConfig lora;
  lora.rank = 16, lora.alpha = 32;
  for (const char* t : kLoraTargetNames) lora.add_target(t);
  const double full = bench_train("small", 8, 512, 3);
  const double adapted = bench_train("small", 8, 512, 3, lora);
  std::printf("LoRA r16 (all seven) step / full step: %.2fx the tokens/s\n", adapted / full);
}

// bf16 gradients stage each layer's (and the head's and embedding's) gradient in float and add it
// into the bf16 buffer: a zero and an add-and-round per element and micro-batch, against fp32
// accumulation's GEMMs writing the buffer directly. Every step here is one micro-batch and an
// optimizer step, the worst case for the staging's share.
SPPO_BENCH(grad16_train_step) {
  std::printf("threads %d, gemm kernel %s\n", num_threads(), cpu::gemm_kernel_name());
  const double full = bench_train("small", 8, 512, 3);
  const double half = bench_train("small", 8, 512, 3, {}, true);
  std::printf("bf16-gradient step / fp32-gradient step: %.3fx the tokens/s\n", half / full);
}
