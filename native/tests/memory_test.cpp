// Memory: the plan (plan_memory over the meta op set) against what the CPU backend really
// allocates, and activation checkpointing against the full activations, with and without LoRA.
#include <cstring>
#include <memory>
#include <vector>

#include "core/rng.h"
#include "cpu/cpu_ops.h"
#include "cuda/cuda_backend.h"
#include "sppo/generate.h"
#include "sppo/model.h"
#include "tests/grad16_checks.h"
#include "tests/harness.h"
#include "tests/model_configs.h"

using namespace sppo;

namespace {

// Three layers, so that checkpointed layers share one set of activation buffers.
ModelConfig three_layer_config() {
  ModelConfig c = testutil::gqa_llama3_config(29, 17);
  c.num_hidden_layers = 3;
  return c;
}

std::vector<int32_t> random_tokens(int64_t n, int vocab, uint64_t seed) {
  std::vector<int32_t> t(n);
  for (int64_t i = 0; i < n; ++i) t[i] = int32_t(uniform01(seed, 2, i) * vocab);
  return t;
}

// Adapters on five of the seven projections (the fused q|k|v and gate|up blocks partly adapted).
LoraConfig some_lora() {
  LoraConfig l;
  l.rank = 2, l.alpha = 4;
  for (const char* t : {"q_proj", "v_proj", "o_proj", "up_proj", "down_proj"}) l.add_target(t);
  return l;
}

void expect_same_report(const MemoryReport& plan, const MemoryReport& real, const char* what) {
  EXPECT_TRUE(plan.params == real.params, what << ": params planned " << plan.params << ", allocated " << real.params);
  EXPECT_TRUE(plan.master == real.master, what << ": master planned " << plan.master << ", allocated " << real.master);
  EXPECT_TRUE(plan.grads == real.grads, what << ": grads planned " << plan.grads << ", allocated " << real.grads);
  EXPECT_TRUE(plan.optimizer == real.optimizer,
              what << ": optimizer planned " << plan.optimizer << ", allocated " << real.optimizer);
  EXPECT_TRUE(plan.activations == real.activations,
              what << ": activations planned " << plan.activations << ", allocated " << real.activations);
  EXPECT_TRUE(plan.scratch == real.scratch,
              what << ": scratch planned " << plan.scratch << ", allocated " << real.scratch);
  EXPECT_TRUE(plan.kv_cache == real.kv_cache,
              what << ": KV cache planned " << plan.kv_cache << ", allocated " << real.kv_cache);
}

}  // namespace

SPPO_TEST(plan_equals_what_the_cpu_backend_allocates) {
  const ModelConfig c = three_layer_config();
  const GeneratorPlan gen{3, 40};
  for (int variant = 0; variant < 3; ++variant)  // full fine-tuning, with bf16 gradients, LoRA
    for (bool checkpoint : {false, true})
      for (int opt = 0; opt < 3; ++opt) {
        const bool with_lora = variant == 2;
        MemoryPlan plan{4, 24};
        plan.checkpoint_activations = checkpoint;
        plan.bf16_gradients = variant == 1;
        const LoraConfig lora = with_lora ? some_lora() : LoraConfig{};
        const OptimizerConfig::Kind kinds[2] = {OptimizerConfig::Kind::AdamW, OptimizerConfig::Kind::RMSprop};
        const OptimizerConfig::Kind* kind = opt < 2 ? &kinds[opt] : nullptr;
        const std::string what = std::string(with_lora ? "lora, " : "") +
                                 (plan.bf16_gradients ? "bf16 gradients, " : "") +
                                 (checkpoint ? "checkpointed" : "full") + ", optimizer " +
                                 (opt == 0   ? "adamw"
                                  : opt == 1 ? "rmsprop"
                                             : "none");
        const size_t live_before = cpu::live_bytes();
        const MemoryReport planned = plan_memory<float>(c, plan, lora, cpu::CpuOps<float>::footprint(), kind, &gen);
        EXPECT_TRUE(cpu::live_bytes() == live_before,
                    "planning allocated " << cpu::live_bytes() - live_before << " bytes");
        {
          Model<float> m(c, plan, std::make_unique<cpu::CpuOps<float>>(), true, lora);
          if (kind) {
            OptimizerConfig oc;
            oc.kind = *kind;
            m.set_optimizer(oc);
          }
          auto g = m.make_generator(gen);
          MemoryReport real = m.memory();
          real.kv_cache = g->memory_bytes();
          expect_same_report(planned, real, what.c_str());
          // The backend's own count of what it holds, independent of the model's counters.
          EXPECT_TRUE(cpu::live_bytes() - live_before == planned.total(),
                      what << ": the backend holds " << cpu::live_bytes() - live_before << " bytes, the plan says "
                           << planned.total());
        }
        EXPECT_TRUE(cpu::live_bytes() == live_before,
                    what << ": the model and generator left " << cpu::live_bytes() - live_before << " bytes behind");
      }
}

SPPO_TEST(plan_of_a_cuda_model_needs_no_gpu) {
  // bf16 parameters with fp32 master weights, gradients and state; the CUDA head tile.
  ModelConfig c = three_layer_config();
  const OptimizerConfig::Kind rms = OptimizerConfig::Kind::RMSprop;
  const MemoryReport r = plan_memory<bf16>(c, MemoryPlan{2, 16}, {}, cuda::footprint(), &rms, nullptr);
  const MemoryReport cpu = plan_memory<float>(c, MemoryPlan{2, 16}, {}, cpu::CpuOps<float>::footprint(), &rms, nullptr);
  EXPECT_TRUE(r.master == cpu.params, "fp32 master weights take what the CPU's fp32 parameters take");
  EXPECT_TRUE(2 * r.params == cpu.params, "bf16 parameters take half");
  EXPECT_TRUE(r.grads == cpu.grads && r.optimizer == cpu.optimizer);
  EXPECT_TRUE(cpu.master == 0 && r.kv_cache == 0);
  // With LoRA: a bf16 base without master weights; fp32 master weights, gradients and RMSprop
  // state for the adapters alone.
  const MemoryReport lr = plan_memory<bf16>(c, MemoryPlan{2, 16}, some_lora(), cuda::footprint(), &rms, nullptr);
  const MemoryReport lc =
      plan_memory<float>(c, MemoryPlan{2, 16}, some_lora(), cpu::CpuOps<float>::footprint(), &rms, nullptr);
  EXPECT_TRUE(2 * lr.params == lc.params && lc.params > cpu.params);
  EXPECT_TRUE(lr.master == lc.grads && lr.grads == lc.grads && lr.optimizer == lc.optimizer);
  EXPECT_TRUE(lc.grads < cpu.grads / 4, "adapter gradients " << lc.grads << " vs full " << cpu.grads);
  EXPECT_TRUE(lc.grads == (lc.params - cpu.params), "gradients cover exactly the adapters' part of the arena");
}

SPPO_TEST(checkpointing_shrinks_activations) {
  const ModelConfig c = three_layer_config();
  MemoryPlan full{4, 24}, ckpt{4, 24};
  ckpt.checkpoint_activations = true;
  const auto fp = cpu::CpuOps<float>::footprint();
  const MemoryReport a = plan_memory<float>(c, full, {}, fp, nullptr, nullptr);
  const MemoryReport b = plan_memory<float>(c, ckpt, {}, fp, nullptr, nullptr);
  // Per layer beyond the first, everything but the (N, C) input is shared.
  const size_t N = 4 * 24, C = c.hidden_size;
  const size_t per_layer = (a.activations - b.activations) / (c.num_hidden_layers - 1);
  EXPECT_TRUE(b.activations < a.activations && per_layer > N * C * sizeof(float),
              "full " << a.activations << ", checkpointed " << b.activations);
  EXPECT_TRUE(a.params == b.params && a.scratch == b.scratch);
}

namespace {

// One model trained with and without checkpointing on the same batches: every gradient, loss
// and parameter after the optimizer steps must be bitwise equal.
template <class Step>
void expect_checkpointing_bitwise(const char* what, const LoraConfig& lora, Step&& step) {
  const ModelConfig c = three_layer_config();
  std::vector<std::vector<float>> grads, params;
  std::vector<double> losses;
  for (bool checkpoint : {false, true}) {
    MemoryPlan plan{4, 24};
    plan.checkpoint_activations = checkpoint;
    Model<float> m(c, plan, std::make_unique<cpu::CpuOps<float>>(), true, lora);
    OptimizerConfig oc;
    oc.kind = OptimizerConfig::Kind::RMSprop;
    oc.lr = 1e-2, oc.max_grad_norm = 1.0;
    m.set_optimizer(oc);
    losses.push_back(step(m, 0));  // a step: the next batch runs on updated weights
    m.zero_grad();
    losses.push_back(step(m, 1));
    grads.emplace_back(m.grad_data(), m.grad_data() + m.num_trainable());
    params.emplace_back(m.param_data(), m.param_data() + m.num_params());
  }
  EXPECT_TRUE(losses[0] == losses[2] && losses[1] == losses[3], what << ": losses differ");
  EXPECT_TRUE(std::memcmp(grads[0].data(), grads[1].data(), grads[0].size() * sizeof(float)) == 0,
              what << ": gradients differ with checkpointing");
  EXPECT_TRUE(std::memcmp(params[0].data(), params[1].data(), params[0].size() * sizeof(float)) == 0,
              what << ": parameters differ with checkpointing");
  bool nonzero = false;
  for (float g : grads[0]) nonzero |= g != 0;
  EXPECT_TRUE(nonzero, what << ": the gradients are all zero, so the comparison shows nothing");
}

}  // namespace

SPPO_TEST(checkpointing_gives_bitwise_equal_gradients_next_token) {
  const ModelConfig c = three_layer_config();
  expect_checkpointing_bitwise("next-token loss", {}, [&](Model<float>& m, int round) {
    auto tokens = random_tokens(4 * 24, c.vocab_size, 30 + round);
    const Batch b{tokens.data(), nullptr, 4, 24};
    if (round == 0) return m.train_step(b).loss;
    return m.accumulate_gradients(b, 1.0);
  });
}

namespace {

// Round 0 a preference step, round 1 gradients alone (on the stepped weights).
double preference_round(Model<float>& m, int round) {
  // Two pairs of 20 tokens: a 5-token prompt, then response tokens.
  auto tokens = random_tokens(4 * 20, m.config().vocab_size, 40 + round);
  std::vector<uint8_t> mask(4 * 20);
  for (int i = 0; i < 4 * 20; ++i) mask[i] = i % 20 >= 5;
  const std::vector<double> ref = {-40, -42, -39, -41}, target = {0.7, 0.3, 0.4, 0.6};
  const PreferenceBatch pb{
      {tokens.data(), mask.data(), 4, 20}, ref.data(), target.data(), PreferenceLoss::SppoPair, 1000};
  if (round == 0) return m.preference_step(pb).step.loss;
  return m.accumulate_preference_gradients(pb, 1.0, nullptr).loss;
}

}  // namespace

SPPO_TEST(checkpointing_gives_bitwise_equal_gradients_preference) {
  expect_checkpointing_bitwise("sppo-pair loss", {}, preference_round);
}

SPPO_TEST(checkpointing_gives_bitwise_equal_gradients_lora) {
  // The adapters' gradients (B starts at 0: round 0's step makes it nonzero, so round 1 has
  // gradients for A and B alike), and the parameters after a step, frozen base included.
  expect_checkpointing_bitwise("sppo-pair loss with lora", some_lora(), preference_round);
}

namespace {

// The three-layer model (q/k/v bias, untied head) with or without bf16 gradients, its width 17
// so that the arena has alignment padding between tensors (o_proj's 17 × 24, gate|up's, down's),
// and its vocabulary large enough that the LM head's V × C gradient, staged first, covers a
// layer's whole stage (padding included).
std::function<std::unique_ptr<Model<float>>(bool)> cpu_maker(bool checkpoint) {
  return [checkpoint](bool half) {
    MemoryPlan plan{4, 24};
    plan.checkpoint_activations = checkpoint;
    plan.bf16_gradients = half;
    ModelConfig c = three_layer_config();
    c.hidden_size = 17, c.vocab_size = 211;
    return std::make_unique<Model<float>>(c, plan, std::make_unique<cpu::CpuOps<float>>());
  };
}

}  // namespace

SPPO_TEST(bf16_gradients_are_the_rounded_master_gradients) {
  for (bool checkpoint : {false, true}) {
    const std::string how = checkpoint ? " (checkpointed)" : "";
    testutil::check_bf16_gradients<float>(
        "next-token loss" + how, cpu_maker(checkpoint),
        [](Model<float>& m, const int32_t* tokens, const uint8_t* mask) {
          m.accumulate_gradients(Batch{tokens, mask, 4, 24}, 0.25);
        },
        4, 24, 3);
    testutil::check_bf16_gradients<float>(
        "sppo-pair loss" + how, cpu_maker(checkpoint),
        [](Model<float>& m, const int32_t* tokens, const uint8_t* mask) {
          const std::vector<double> ref = {-40, -42, -39, -41}, target = {0.7, 0.3, 0.4, 0.6};
          const PreferenceBatch pb{{tokens, mask, 4, 24}, ref.data(), target.data(), PreferenceLoss::SppoPair, 1000};
          m.accumulate_preference_gradients(pb, 0.25, nullptr);
        },
        4, 24, 3);
  }
}

SPPO_TEST(bf16_gradients_halve_the_gradient_buffer_and_train) {
  // The plan: two bytes a trainable parameter, plus a Master stage for the largest gradient made
  // at once (here the LM head's V × C, larger than a layer) under scratch.
  ModelConfig c = testutil::featureful_config();  // tied embeddings: the head and the embedding share a tensor
  c.vocab_size = 211;                             // V × C (3376) above a layer's 2192 elements
  MemoryPlan plan{2, 20}, half = plan;
  half.bf16_gradients = true;
  const auto fp = cpu::CpuOps<float>::footprint();
  const MemoryReport a = plan_memory<float>(c, plan, {}, fp, nullptr, nullptr);
  const MemoryReport b = plan_memory<float>(c, half, {}, fp, nullptr, nullptr);
  EXPECT_TRUE(2 * b.grads == a.grads, "bf16 gradients " << b.grads << " bytes, float " << a.grads);
  EXPECT_TRUE(b.scratch - a.scratch == size_t(c.vocab_size * c.hidden_size) * sizeof(float),
              "the stage takes " << b.scratch - a.scratch << " bytes");
  // Training with a tied tensor (two roundings per micro-batch on it) follows float training.
  std::vector<double> losses[2];
  for (bool bf : {false, true}) {
    Model<float> m(c, bf ? half : plan, std::make_unique<cpu::CpuOps<float>>());
    OptimizerConfig oc;
    oc.kind = OptimizerConfig::Kind::AdamW, oc.lr = 3e-3, oc.grad_accum_steps = 2;
    m.set_optimizer(oc);
    for (int step = 0; step < 12; ++step) {
      auto tokens = random_tokens(2 * 20, c.vocab_size, 500 + step % 4);
      losses[bf].push_back(m.train_step(Batch{tokens.data(), nullptr, 2, 20}).loss);
    }
  }
  for (size_t i = 0; i < losses[0].size(); ++i)
    EXPECT_TRUE(
        std::fabs(losses[1][i] - losses[0][i]) <= 1e-2 * std::fabs(losses[0][i]),
        "micro-batch " << i << ": loss " << losses[1][i] << " with bf16 gradients, " << losses[0][i] << " with float");
  EXPECT_TRUE(losses[0].back() < losses[0][3] - 0.05,
              "training did not lower the loss, so the comparison shows little");
}

SPPO_TEST(bf16_gradients_with_lora_are_refused) {
  MemoryPlan plan{2, 16};
  plan.bf16_gradients = true;
  EXPECT_THROWS_WITH(
      Model<float>(three_layer_config(), plan, std::make_unique<cpu::CpuOps<float>>(), true, some_lora()),
      "LoRA adapters keep float32 gradients");
}
