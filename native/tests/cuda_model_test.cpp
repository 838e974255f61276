// The whole model on the CUDA backend (bf16 storage, fp32 master precision) against the CPU
// backend (float32) from identical weights: a training step's loss, every gradient and the
// parameters after AdamW and RMSprop steps; a preference step; a KV-cache decode step; and the
// generator end to end; the same with LoRA adapters (gradients, a step that leaves the frozen
// base as it was, generation). Skipped, with the reason, where no GPU is usable.
//
// Tolerances (stated once, used below): bf16 keeps 8 significant bits, so a value recomputed
// through a few layers of bf16 activations differs from float32 by ~1e-2 of its scale.
//   loss: 1e-2 relative; gradients: 5e-2 of each tensor's largest |gradient| (the smallest
//   gradients of a tensor carry the bf16 noise of the larger ones); logits: 2e-2 of the
//   largest |logit|; parameter updates after a step: 5e-2 of the largest update.
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

#include "core/rng.h"
#include "cpu/cpu_ops.h"
#include "cuda/cuda_backend.h"
#include "sppo/generate.h"
#include "sppo/model.h"
#include "tests/cuda_test_util.h"
#include "tests/grad16_checks.h"
#include "tests/harness.h"

using namespace sppo;
using namespace sppo::testutil;

namespace {

// GQA, q/k/v bias, untied head, llama3 rope: every code path of the decoder.
ModelConfig test_config() {
  ModelConfig c;
  c.vocab_size = 301, c.hidden_size = 128, c.num_hidden_layers = 2, c.num_attention_heads = 4;
  c.num_key_value_heads = 2, c.intermediate_size = 200, c.max_position_embeddings = 128;
  c.attention_bias = true;
  c.rope_scaling.kind = RopeScaling::Kind::Llama3;
  c.rope_scaling.factor = 8, c.rope_scaling.low_freq_factor = 1, c.rope_scaling.high_freq_factor = 4;
  c.rope_scaling.original_max_position_embeddings = 32;
  c.initializer_range = 0.08, c.seed = 5;
  c.resolve_and_validate();
  return c;
}

// A float CPU model and a bf16 CUDA model holding the same (bf16-representable) weights; norms
// and biases perturbed away from 1 and 0 so that every weight matters.
struct Twins {
  std::unique_ptr<Model<float>> cpu;
  std::unique_ptr<Model<bf16>> gpu;
  void set_optimizer(const OptimizerConfig& oc) {
    cpu->set_optimizer(oc);
    gpu->set_optimizer(oc);
  }
};
// With `lora`, the adapters' B factors get the same perturbation and so start nonzero.
Twins make_twins(const ModelConfig& c, MemoryPlan plan, const LoraConfig& lora = {}) {
  Twins t{std::make_unique<Model<float>>(c, plan, std::make_unique<cpu::CpuOps<float>>(), true, lora),
          std::make_unique<Model<bf16>>(c, plan, cuda::make_ops(0), false, lora)};
  for (size_t k = 0; k < t.cpu->params().size(); ++k) {
    const ParamInfo& p = t.cpu->params()[k];
    std::vector<float> w(p.size);
    t.cpu->get_param(p.name, w.data());
    for (int64_t i = 0; i < p.size; ++i) w[i] = round_bf16(w[i] + float(0.05 * standard_normal(91, k, i)));
    t.cpu->set_param(p.name, w.data(), p.size);
    t.gpu->set_param(p.name, w.data(), p.size);
  }
  return t;
}
// The twins with `oc` set on both.
Twins make_twins(const ModelConfig& c, MemoryPlan plan, const OptimizerConfig& oc) {
  Twins t = make_twins(c, plan);
  t.set_optimizer(oc);
  return t;
}
// `kind` at learning rate `lr`, every other setting its default.
OptimizerConfig optimizer_config(OptimizerConfig::Kind kind, double lr) {
  OptimizerConfig oc;
  oc.kind = kind, oc.lr = lr;
  return oc;
}

std::vector<float> grads_of(Model<float>& m) {
  return std::vector<float>(m.grad_data(), m.grad_data() + m.num_params());
}
std::vector<float> grads_of(Model<bf16>& m) {
  std::vector<float> g(m.num_params());
  m.ops().download_bytes(g.data(), m.grad_data(), g.size() * sizeof(float));
  return g;
}

void expect_grads_close(Model<float>& cpu, Model<bf16>& gpu, double tol) {
  const std::vector<float> a = grads_of(cpu), b = grads_of(gpu);
  double worst = 0;
  for (const ParamInfo& p : cpu.params())
    worst = std::max(worst, max_rel_error(b.data() + p.offset, a.data() + p.offset, p.size));
  std::printf("      largest gradient relative error %.2e\n", worst);
  for (const ParamInfo& p : cpu.params()) {
    const double e = max_rel_error(b.data() + p.offset, a.data() + p.offset, p.size);
    EXPECT_TRUE(e <= tol, "gradient of " << p.name << ": relative error " << e << " > " << tol);
  }
}

}  // namespace

SPPO_TEST(cuda_model_forward_logits_match_cpu) {
  require_cuda();
  const ModelConfig c = test_config();
  Twins t = make_twins(c, {3, 70});
  const std::vector<int32_t> tok = random_ids(3 * 70, c.vocab_size, 1);
  std::vector<float> la(3 * 70 * c.vocab_size, NAN), lb(la.size(), NAN), ha(3 * 70 * c.hidden_size), hb(ha.size());
  t.cpu->forward(tok.data(), 3, 70, ha.data(), la.data());
  t.gpu->forward(tok.data(), 3, 70, hb.data(), lb.data());
  const double el = max_rel_error(lb.data(), la.data(), int64_t(la.size())),
               eh = max_rel_error(hb.data(), ha.data(), int64_t(ha.size()));
  std::printf("      logits rel err %.2e, hidden %.2e\n", el, eh);
  EXPECT_TRUE(el <= 2e-2, "logits relative error " << el);
  EXPECT_TRUE(eh <= 2e-2, "hidden relative error " << eh);
}

namespace {

// Parameter updates. Adam's first step is lr·g/(|g| + ε) ≈ lr·sign(g), and RMSprop's is
// lr·g/(sqrt(1 − α)|g| + ε): both are the sign of the gradient, so an element whose gradient is
// at the bf16 noise level of its tensor moves the opposite way on the GPU as often as not, and a
// whole-tensor comparison of updates measures that noise, not the optimizer (the first GPU job
// failed so, on model.embed_tokens.weight: relative error 1.99). So the updates are checked
// three ways, each of which a real update bug fails:
//   - on identical gradients (the GPU's, copied into the CPU model), the optimizers must agree
//     to float rounding over several steps, with clipping, weight decay and the bf16 working copy;
//   - end to end, where an update is linear in the gradient (ε far above |g|), updates carry
//     the gradients' tolerance;
//   - end to end with the usual ε, on the elements whose gradient is clearly above the noise
//     (kSignMargin times the tensor's largest CPU/GPU gradient difference).
constexpr double kSignMargin = 4;

const char* kind_name(OptimizerConfig::Kind k) { return k == OptimizerConfig::Kind::AdamW ? "AdamW" : "RMSprop"; }

std::vector<std::vector<float>> params_of(ModelApi<float>& m) {
  std::vector<std::vector<float>> r;
  for (const ParamInfo& p : m.params()) {
    r.emplace_back(p.size);
    m.get_param(p.name, r.back().data());
  }
  return r;
}

// The update of each tensor since `before`, in master precision.
std::vector<std::vector<float>> updates_since(ModelApi<float>& m, const std::vector<std::vector<float>>& before) {
  std::vector<std::vector<float>> r = params_of(m);
  for (size_t k = 0; k < r.size(); ++k)
    for (size_t i = 0; i < r[k].size(); ++i) r[k][i] -= before[k][i];
  return r;
}

// The GPU's bf16 working weights must be the rounding of its fp32 master weights after every step
// (the forward pass and the generator read the working copy).
void expect_working_copy_is_rounded_master(Model<bf16>& gpu) {
  std::vector<bf16> w(gpu.num_params());
  gpu.ops().download_bytes(w.data(), gpu.param_data(), w.size() * sizeof(bf16));
  for (const ParamInfo& p : gpu.params()) {
    std::vector<float> master(p.size);
    gpu.get_param(p.name, master.data());
    for (int64_t i = 0; i < p.size; ++i)
      EXPECT_TRUE(float(w[p.offset + i]) == round_bf16(master[i]),
                  p.name << "[" << i << "]: bf16 working copy " << float(w[p.offset + i]) << " is not bf16(master "
                         << master[i] << ")");
  }
}

}  // namespace

SPPO_TEST(cuda_training_step_matches_cpu_loss_gradients_and_updates) {
  require_cuda();
  const ModelConfig c = test_config();
  for (const auto kind : {OptimizerConfig::Kind::AdamW, OptimizerConfig::Kind::RMSprop}) {
    OptimizerConfig oc = optimizer_config(kind, 1e-3);
    oc.weight_decay = 0.01, oc.grad_accum_steps = 2;
    Twins t = make_twins(c, {4, 65}, oc);
    const std::vector<int32_t> tok = random_ids(4 * 65, c.vocab_size, 2);
    std::vector<uint8_t> mask(tok.size(), 1);
    for (size_t i = 0; i < mask.size(); i += 3) mask[i] = 0;
    const Batch b{tok.data(), mask.data(), 4, 65};
    // First micro-batch: gradients accumulate, no step yet.
    const StepResult ra = t.cpu->train_step(b), rb = t.gpu->train_step(b);
    EXPECT_NEAR(rb.loss, ra.loss, 1e-2 * ra.loss);
    EXPECT_TRUE(!ra.stepped && !rb.stepped);
    expect_grads_close(*t.cpu, *t.gpu, 5e-2);
    // Both micro-batches are the same batch, so the step's gradient is twice these.
    const std::vector<float> ga = grads_of(*t.cpu), gb = grads_of(*t.gpu);
    const std::vector<std::vector<float>> before = params_of(*t.cpu);
    const StepResult sa = t.cpu->train_step(b), sb = t.gpu->train_step(b);
    EXPECT_TRUE(sa.stepped && sb.stepped);
    EXPECT_NEAR(sb.grad_norm, sa.grad_norm, 3e-2 * sa.grad_norm);
    const auto ua = updates_since(*t.cpu, before), ub = updates_since(*t.gpu, before);
    int64_t selected = 0;
    double worst_selected = 0;
    for (size_t k = 0; k < t.cpu->params().size(); ++k) {
      const ParamInfo& p = t.cpu->params()[k];
      double noise = 0;
      for (int64_t i = 0; i < p.size; ++i)
        noise = std::max(noise, std::fabs(double(gb[p.offset + i]) - ga[p.offset + i]));
      std::vector<float> sel_a, sel_b;
      double worst = 0;
      for (int64_t i = 0; i < p.size; ++i) {
        if (std::fabs(ga[p.offset + i]) > kSignMargin * noise) sel_a.push_back(ua[k][i]), sel_b.push_back(ub[k][i]);
        // No element may move further from the CPU's update than a sign flip of a full step.
        worst = std::max(worst, std::fabs(double(ub[k][i]) - ua[k][i]));
      }
      const double full_step = kind == OptimizerConfig::Kind::AdamW ? oc.lr : oc.lr / std::sqrt(1 - oc.alpha);
      EXPECT_TRUE(worst <= 2.02 * full_step,
                  p.name << ": an element's update differs by " << worst << " > 2 steps of " << full_step);
      EXPECT_TRUE(sel_a.size() >= size_t(p.size) / 100 + 1,
                  p.name << ": only " << sel_a.size() << " of " << p.size << " gradients above the noise " << noise);
      const double e = max_rel_error(sel_b.data(), sel_a.data(), int64_t(sel_a.size()));
      selected += int64_t(sel_a.size());
      worst_selected = std::max(worst_selected, e);
      EXPECT_TRUE(e <= 1e-2, p.name << " update where |g| > " << kSignMargin << " x noise (" << sel_a.size() << " of "
                                    << p.size << " elements): relative error " << e);
    }
    std::printf("      %s: %.0f%% of elements have |g| > %g x noise; their largest relative update error %.2e\n",
                kind_name(kind), 100.0 * selected / t.cpu->num_params(), kSignMargin, worst_selected);
    expect_working_copy_is_rounded_master(*t.gpu);
  }
}

// bf16 gradient accumulation on the GPU against the same GPU model's fp32 gradients: exact, as
// on the CPU (tests/grad16_checks.h), with and without checkpointing; 8 micro-batches, as a
// step of the paper's batch takes 32.
SPPO_TEST(cuda_bf16_gradients_are_the_rounded_master_gradients) {
  require_cuda();
  for (bool checkpoint : {false, true}) {
    const auto make = [checkpoint](bool half) {
      MemoryPlan plan{4, 40};
      plan.checkpoint_activations = checkpoint;
      plan.bf16_gradients = half;
      return std::make_unique<Model<bf16>>(test_config(), plan, cuda::make_ops(0));
    };
    check_bf16_gradients<bf16>(
        checkpoint ? "cuda, checkpointed" : "cuda", make,
        [](Model<bf16>& m, const int32_t* tokens, const uint8_t* mask) {
          const std::vector<double> ref = {-40, -42, -39, -41}, target = {0.7, 0.3, 0.4, 0.6};
          const PreferenceBatch pb{{tokens, mask, 4, 40}, ref.data(), target.data(), PreferenceLoss::SppoPair, 1000};
          m.accumulate_preference_gradients(pb, 0.125, nullptr);
        },
        4, 40, 8);
  }
}

// A token absent from the batch must get exactly zero embedding gradient on both backends, and
// its row must then change by weight decay alone, identically (w·(1 − lr·wd) in fp32).
SPPO_TEST(cuda_embedding_rows_of_absent_tokens_get_zero_gradient_and_decay_only) {
  require_cuda();
  const ModelConfig c = test_config();
  OptimizerConfig oc = optimizer_config(OptimizerConfig::Kind::AdamW, 1e-3);
  oc.weight_decay = 0.1;
  Twins t = make_twins(c, {4, 65}, oc);
  // Only ids below 150 occur: rows 150..300 are absent (and ids 0..149 mostly present).
  const std::vector<int32_t> tok = random_ids(4 * 65, 150, 4);
  std::vector<bool> present(size_t(c.vocab_size), false);
  for (int32_t id : tok) present[size_t(id)] = true;
  const Batch b{tok.data(), nullptr, 4, 65};
  t.cpu->accumulate_gradients(b, 1.0);
  t.gpu->accumulate_gradients(b, 1.0);
  const ParamInfo& e = t.cpu->param("model.embed_tokens.weight");
  const std::vector<float> ga = grads_of(*t.cpu), gb = grads_of(*t.gpu);
  const int64_t C = c.hidden_size;
  int64_t absent = 0, nonzero_present = 0;
  for (int64_t v = 0; v < c.vocab_size; ++v) {
    bool any = false;
    for (int64_t j = 0; j < C; ++j) {
      const float a = ga[e.offset + v * C + j], g = gb[e.offset + v * C + j];
      if (!present[size_t(v)]) {
        EXPECT_TRUE(a == 0 && g == 0, "absent token " << v << ": embedding gradient [" << j << "] is " << a
                                                      << " on the CPU and " << g << " on the GPU, not 0");
      }
      any = any || (a != 0 && g != 0);
    }
    absent += !present[size_t(v)];
    nonzero_present += present[size_t(v)] && any;
  }
  std::printf("      absent tokens: %lld of %lld embedding rows, their gradient exactly 0 on both backends\n",
              (long long)absent, (long long)c.vocab_size);
  EXPECT_TRUE(absent >= 150, "only " << absent << " absent tokens");
  EXPECT_TRUE(nonzero_present >= 100, "only " << nonzero_present << " present tokens have a nonzero gradient");
  std::vector<float> w0(e.size), wa(e.size), wb(e.size);
  t.cpu->get_param(e.name, w0.data());
  t.cpu->optimizer_step();
  t.gpu->optimizer_step();
  t.cpu->get_param(e.name, wa.data());
  t.gpu->get_param(e.name, wb.data());
  const float keep = float(1.0 - oc.lr * oc.weight_decay);
  for (int64_t v = 0; v < c.vocab_size; ++v) {
    if (present[size_t(v)]) continue;
    for (int64_t j = 0; j < C; ++j) {
      const int64_t i = v * C + j;
      EXPECT_TRUE(wa[i] == w0[i] * keep && wb[i] == w0[i] * keep,
                  "absent token " << v << " [" << j << "]: " << w0[i] << " became " << wa[i] << " (CPU) and " << wb[i]
                                  << " (GPU), not " << w0[i] * keep << " (decay alone)");
    }
  }
}

// The optimizers themselves: the CPU model is given the GPU's gradients at every step, so both
// apply the same update formula to the same numbers from the same master weights, and must agree
// to float rounding, over several steps (the moments carry over), with the global-norm clip
// active, weight decay on matrices only, a warm-up schedule, and the bf16 working copy rounded
// from the master after each step.
SPPO_TEST(cuda_optimizer_matches_cpu_on_identical_gradients) {
  require_cuda();
  const ModelConfig c = test_config();
  for (const auto kind : {OptimizerConfig::Kind::AdamW, OptimizerConfig::Kind::RMSprop}) {
    OptimizerConfig oc = optimizer_config(kind, 1e-3);
    oc.weight_decay = 0.05, oc.max_grad_norm = 0.05;
    oc.schedule.kind = ScheduleConfig::Kind::Linear, oc.schedule.warmup_steps = 2, oc.schedule.total_steps = 10;
    Twins t = make_twins(c, {4, 40}, oc);
    const std::vector<std::vector<float>> start = params_of(*t.cpu);
    double worst = 0;
    for (int step = 0; step < 4; ++step) {
      const std::vector<int32_t> tok = random_ids(4 * 40, c.vocab_size, 20 + step);
      const Batch b{tok.data(), nullptr, 4, 40};
      t.cpu->zero_grad();
      t.gpu->zero_grad();
      t.gpu->accumulate_gradients(b, 1.0);
      const std::vector<float> g = grads_of(*t.gpu);
      std::copy(g.begin(), g.end(), t.cpu->grad_data());
      const StepResult sa = t.cpu->optimizer_step(), sb = t.gpu->optimizer_step();
      EXPECT_NEAR(sb.grad_norm, sa.grad_norm, 1e-6 * sa.grad_norm);
      EXPECT_TRUE(sa.grad_norm > oc.max_grad_norm, "the clip is not exercised: norm " << sa.grad_norm);
      EXPECT_NEAR(sb.lr, sa.lr, 1e-12);
      const auto ua = updates_since(*t.cpu, start), ub = updates_since(*t.gpu, start);
      for (size_t k = 0; k < ua.size(); ++k) {
        const ParamInfo& p = t.cpu->params()[k];
        const double e = max_rel_error(ub[k].data(), ua[k].data(), p.size);
        worst = std::max(worst, e);
        // fp32 weights of ~0.1 round at ~1e-8, against updates of ~lr·step = 1e-3 or more.
        EXPECT_TRUE(e <= 1e-4, kind_name(kind)
                                   << " step " << step + 1 << ", " << p.name
                                   << ": update differs from the CPU's on identical gradients, relative error " << e);
      }
      expect_working_copy_is_rounded_master(*t.gpu);
    }
    std::printf("      %s on identical gradients, 4 steps: largest relative update error %.2e\n", kind_name(kind),
                worst);
  }
}

// End to end with the update linear in the gradient (ε = 1e3, far above every |g|; lr scaled so
// the step stays ~1e-4): over several steps, AdamW's and RMSprop's updates must agree with the
// CPU's within the gradients' own tolerance (5e-2 of each tensor's largest update).
SPPO_TEST(cuda_linear_updates_match_cpu_over_several_steps) {
  require_cuda();
  const ModelConfig c = test_config();
  for (const auto kind : {OptimizerConfig::Kind::AdamW, OptimizerConfig::Kind::RMSprop}) {
    OptimizerConfig oc = optimizer_config(kind, 10);
    oc.eps = 1e3, oc.weight_decay = 0;
    Twins t = make_twins(c, {4, 40}, oc);
    const std::vector<std::vector<float>> start = params_of(*t.cpu);
    double largest_g = 0;
    for (int step = 0; step < 3; ++step) {
      const std::vector<int32_t> tok = random_ids(4 * 40, c.vocab_size, 30 + step);
      const Batch b{tok.data(), nullptr, 4, 40};
      t.cpu->accumulate_gradients(b, 1.0);
      t.gpu->accumulate_gradients(b, 1.0);
      for (float g : grads_of(*t.cpu)) largest_g = std::max(largest_g, double(std::fabs(g)));
      const StepResult sa = t.cpu->optimizer_step(), sb = t.gpu->optimizer_step();
      EXPECT_NEAR(sb.grad_norm, sa.grad_norm, 3e-2 * sa.grad_norm);
    }
    EXPECT_TRUE(largest_g < 1e-2 * oc.eps, "the update is not linear: |g| reaches " << largest_g);
    const auto ua = updates_since(*t.cpu, start), ub = updates_since(*t.gpu, start);
    double worst = 0;
    for (size_t k = 0; k < ua.size(); ++k)
      worst = std::max(worst, max_rel_error(ub[k].data(), ua[k].data(), ua[k].size()));
    std::printf("      %s: largest relative update error %.2e\n", kind_name(kind), worst);
    for (size_t k = 0; k < ua.size(); ++k) {
      const ParamInfo& p = t.cpu->params()[k];
      const double e = max_rel_error(ub[k].data(), ua[k].data(), p.size);
      EXPECT_TRUE(e <= 5e-2, kind_name(kind)
                                 << ", " << p.name << ": update after 3 linear steps, relative error " << e);
    }
  }
}

// RMSprop, the reference optimizer, over several steps with its usual ε: the two backends' losses
// and gradient norms stay together step after step.
SPPO_TEST(cuda_rmsprop_training_tracks_cpu_over_several_steps) {
  require_cuda();
  const ModelConfig c = test_config();
  Twins t = make_twins(c, {4, 40}, optimizer_config(OptimizerConfig::Kind::RMSprop, 1e-4));
  const std::vector<int32_t> tok = random_ids(4 * 40, c.vocab_size, 40);
  const Batch b{tok.data(), nullptr, 4, 40};
  double first = 0;
  for (int step = 0; step < 6; ++step) {
    const StepResult sa = t.cpu->train_step(b), sb = t.gpu->train_step(b);
    if (step == 0) first = sa.loss;
    std::printf("      step %d: loss %.5f / %.5f, gradient norm %.5f / %.5f (CPU / GPU)\n", step + 1, sa.loss, sb.loss,
                sa.grad_norm, sb.grad_norm);
    // 1e-2 at the first step as everywhere; the trajectories may then part by a little more.
    EXPECT_NEAR(sb.loss, sa.loss, (step == 0 ? 1e-2 : 2e-2) * sa.loss);
    EXPECT_NEAR(sb.grad_norm, sa.grad_norm, 5e-2 * sa.grad_norm);
  }
  // The same batch six times: training must have lowered its loss (so the steps were real).
  EXPECT_TRUE(t.cpu->eval_loss(b) < first - 0.05, "loss " << first << " -> " << t.cpu->eval_loss(b));
}

SPPO_TEST(cuda_preference_step_matches_cpu) {
  require_cuda();
  const ModelConfig c = test_config();
  Twins t = make_twins(c, {4, 40}, optimizer_config(OptimizerConfig::Kind::RMSprop, 1e-4));
  const std::vector<int32_t> tok = random_ids(4 * 40, c.vocab_size, 3);
  std::vector<uint8_t> mask(tok.size(), 0);
  for (int r = 0; r < 4; ++r)
    for (int i = 12 + r; i < 40 - r; ++i) mask[r * 40 + i] = 1;  // responses of different lengths
  std::vector<double> ref(4), target = {0.8, 0.2, 0.35, 0.65}, la(4), lb(4);
  PreferenceBatch pb{{tok.data(), mask.data(), 4, 40}, nullptr, target.data(), PreferenceLoss::SppoPair, 1000};
  t.cpu->sequence_logprobs(pb.seqs, ref.data(), nullptr);
  for (double& r : ref) r += 0.01;  // θ ≠ θ_t: a non-trivial loss
  pb.ref_logp = ref.data();
  const PreferenceStepResult a = t.cpu->preference_step(pb, la.data()), b = t.gpu->preference_step(pb, lb.data());
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(lb[i], la[i], 1e-2 * std::fabs(la[i]));
  EXPECT_NEAR(b.metrics.loss, a.metrics.loss, 5e-2 * std::fabs(a.metrics.loss) + 1e-3);
  EXPECT_NEAR(b.step.grad_norm, a.step.grad_norm, 5e-2 * a.step.grad_norm);
}

SPPO_TEST(cuda_decode_step_matches_cpu) {
  require_cuda();
  const ModelConfig c = test_config();
  Twins t = make_twins(c, {1, 8});
  Generator<float> ga(*t.cpu, {3, 48}, std::make_unique<cpu::CpuOps<float>>());
  Generator<bf16> gb(*t.gpu, {3, 48}, cuda::make_ops(0));
  // Prefill three slots to different lengths in one step, then decode one row per slot.
  std::vector<int32_t> slots, pos, tok;
  const int lens[3] = {5, 17, 1};
  for (int s = 0; s < 3; ++s)
    for (int p = 0; p < lens[s]; ++p)
      slots.push_back(s), pos.push_back(p), tok.push_back(int32_t((s * 31 + p * 7) % c.vocab_size));
  const int64_t n = int64_t(tok.size()), V = c.vocab_size;
  std::vector<float> la(n * V, NAN), lb(n * V, NAN);
  ga.extend_for_test(slots.data(), pos.data(), tok.data(), n, la.data());
  gb.extend_for_test(slots.data(), pos.data(), tok.data(), n, lb.data());
  EXPECT_TRUE(max_rel_error(lb.data(), la.data(), n * V) <= 2e-2,
              "prefill logits: " << max_rel_error(lb.data(), la.data(), n * V));
  const int32_t ds[3] = {0, 1, 2}, dp[3] = {5, 17, 1}, dt[3] = {3, 4, 5};
  std::vector<float> da(3 * V, NAN), db(3 * V, NAN);
  ga.extend_for_test(ds, dp, dt, 3, da.data());
  gb.extend_for_test(ds, dp, dt, 3, db.data());
  const double e = max_rel_error(db.data(), da.data(), 3 * V);
  std::printf("      decode logits rel err %.2e\n", e);
  EXPECT_TRUE(e <= 2e-2, "decode logits: " << e);
}

SPPO_TEST(cuda_generate_reproducible_and_logprobs_consistent) {
  require_cuda();
  const ModelConfig c = test_config();
  Twins t = make_twins(c, {4, 64});
  std::unique_ptr<GeneratorApi> g = t.gpu->make_generator({4, 64});
  std::vector<std::vector<int32_t>> prompts = {random_ids(7, c.vocab_size, 9), random_ids(3, c.vocab_size, 10),
                                               random_ids(12, c.vocab_size, 11)};
  std::vector<SequenceRequest> req;
  for (size_t i = 0; i < prompts.size(); ++i) req.push_back({prompts[i].data(), int64_t(prompts[i].size()), 42, i});
  SamplingOptions o;
  o.max_new_tokens = 20, o.temperature = 0.9, o.top_p = 0.95;
  const auto r1 = g->generate(req, o), r2 = g->generate(req, o);
  for (size_t i = 0; i < req.size(); ++i) {
    EXPECT_TRUE(r1[i].tokens == r2[i].tokens, "sequence " << i << " differs between two identical runs");
    // Each recorded log-prob is the policy's own: compare with a full forward over the sequence.
    std::vector<int32_t> seq = prompts[i];
    seq.insert(seq.end(), r1[i].tokens.begin(), r1[i].tokens.end());
    std::vector<double> sum(1), per(seq.size());
    std::vector<uint8_t> mask(seq.size(), 0);
    for (size_t j = prompts[i].size(); j < seq.size(); ++j) mask[j] = 1;
    t.gpu->sequence_logprobs({seq.data(), mask.data(), 1, int64_t(seq.size())}, sum.data(), per.data());
    for (size_t j = 0; j < r1[i].tokens.size(); ++j)
      EXPECT_NEAR(r1[i].logprobs[j], per[prompts[i].size() + j], 5e-2 + 2e-2 * std::fabs(per[prompts[i].size() + j]));
  }
}

// Decode steps replayed from recorded CUDA graphs must give exactly what the same steps give when
// launched one kernel at a time: the same tokens and bit-identical log-probs, for batches that
// shrink as sequences stop at different steps (several recorded step sizes), on a generator's
// first run (each size's first step eager, its second recorded) and on its next (all replayed).
SPPO_TEST(cuda_recorded_decode_steps_match_eager_ones) {
  require_cuda();
  const ModelConfig c = test_config();
  Twins t = make_twins(c, {1, 8});
  Generator<bf16> eager(*t.gpu, {6, 64}, cuda::make_ops(0, false));
  Generator<bf16> recorded(*t.gpu, {6, 64}, cuda::make_ops(0, true));
  std::vector<std::vector<int32_t>> prompts;
  std::vector<SequenceRequest> req;
  for (int i = 0; i < 6; ++i) prompts.push_back(random_ids(1 + 3 * i, c.vocab_size, 50 + i));
  for (int i = 0; i < 6; ++i) req.push_back({prompts[i].data(), int64_t(prompts[i].size()), 77, uint64_t(i)});
  SamplingOptions o;
  o.max_new_tokens = 40, o.temperature = 1.0, o.top_p = 0.95;
  o.stop_tokens = {7, 11, 13, 17, 19, 23, 29, 31};  // ~3% of the vocabulary: sequences end at different steps
  const auto want = eager.generate(req, o);
  size_t lengths_differ = 0;
  for (const auto& r : want) lengths_differ += r.tokens.size() != want[0].tokens.size();
  EXPECT_TRUE(lengths_differ > 0, "every sequence has the same length: the batch never shrank");
  for (int run = 0; run < 2; ++run) {
    const auto got = recorded.generate(req, o);
    for (size_t i = 0; i < req.size(); ++i) {
      EXPECT_TRUE(got[i].tokens == want[i].tokens,
                  "run " << run + 1 << ", sequence " << i << ": recorded decode steps sampled other tokens");
      for (size_t j = 0; j < want[i].logprobs.size(); ++j)
        EXPECT_TRUE(got[i].logprobs[j] == want[i].logprobs[j],
                    "run " << run + 1 << ", sequence " << i << ", token " << j << ": log-prob " << got[i].logprobs[j]
                           << " recorded, " << want[i].logprobs[j] << " eager");
    }
  }
}

// The samples of a prompt forked from one prefill on the GPU: prompts whose prefix ends inside a
// block (each sample copies it before its first write), in a pool small enough that the second
// prompt's samples wait for the first's blocks. Recorded decode graphs (block tables and copies
// changing between replays) give the eager steps' bits; each sample's log-probs are its own
// sequence's under a full forward (a sample that read another's keys would not match); the pool
// empties.
SPPO_TEST(cuda_shared_prompts_fork_with_copy_on_write) {
  require_cuda();
  const ModelConfig c = test_config();
  Twins t = make_twins(c, {1, 8});
  const int64_t block_bytes =
      2 * c.num_hidden_layers * c.num_key_value_heads * kKvBlockSize * c.head_dim * int64_t(sizeof(bf16));
  // Prompt 0 (21 tokens + 24 new): its prefix takes 2 blocks, each sample 2 more: 10 of the 12.
  const GeneratorPlan plan{8, 64, 12 * block_bytes, true};
  Generator<bf16> eager(*t.gpu, plan, cuda::make_ops(0, false));
  Generator<bf16> recorded(*t.gpu, plan, cuda::make_ops(0, true));
  const std::vector<std::vector<int32_t>> prompts = {random_ids(21, c.vocab_size, 61), random_ids(9, c.vocab_size, 62)};
  std::vector<SequenceRequest> req;
  for (size_t p = 0; p < prompts.size(); ++p)
    for (int k = 0; k < 4; ++k) req.push_back({prompts[p].data(), int64_t(prompts[p].size()), 5 + p, uint64_t(k)});
  SamplingOptions o;
  o.max_new_tokens = 24, o.temperature = 1.0, o.top_p = 0.95;
  const auto want = eager.generate(req, o);
  const GenerateStats st = eager.last_stats();
  EXPECT_TRUE(st.shared_prompts == 2 && st.copied_blocks >= 3 && st.peak_sequences < 8,
              "shared " << st.shared_prompts << ", copies " << st.copied_blocks << ", in flight " << st.peak_sequences);
  for (int run = 0; run < 2; ++run) {
    const auto got = recorded.generate(req, o);
    for (size_t i = 0; i < req.size(); ++i) {
      EXPECT_TRUE(got[i].tokens == want[i].tokens, "run " << run + 1 << ", sequence " << i << ": other tokens");
      EXPECT_TRUE(got[i].logprobs == want[i].logprobs, "run " << run + 1 << ", sequence " << i << ": other log-probs");
    }
  }
  for (size_t i = 0; i < req.size(); ++i) {
    const std::vector<int32_t>& prompt = prompts[i / 4];
    std::vector<int32_t> seq = prompt;
    seq.insert(seq.end(), want[i].tokens.begin(), want[i].tokens.end());
    std::vector<double> sum(1), per(seq.size());
    std::vector<uint8_t> mask(seq.size(), 0);
    for (size_t j = prompt.size(); j < seq.size(); ++j) mask[j] = 1;
    t.gpu->sequence_logprobs({seq.data(), mask.data(), 1, int64_t(seq.size())}, sum.data(), per.data());
    for (size_t j = 0; j < want[i].tokens.size(); ++j)
      EXPECT_NEAR(want[i].logprobs[j], per[prompt.size() + j], 5e-2 + 2e-2 * std::fabs(per[prompt.size() + j]));
  }
  for (const Generator<bf16>* g : {&eager, &recorded}) {
    const KvPoolState pool = g->pool_state();
    EXPECT_TRUE(pool.free == pool.blocks && pool.reserved == 0, pool.blocks - pool.free << " blocks still in use");
  }
}

SPPO_TEST(cuda_out_of_memory_is_a_clear_error) {
  require_cuda();
  ModelConfig c = test_config();
  c.vocab_size = 1 << 20, c.hidden_size = 1 << 14;  // ~290 billion parameters: beyond any GPU
  c.num_attention_heads = 128, c.num_key_value_heads = 128, c.intermediate_size = 1 << 16, c.num_hidden_layers = 64;
  c.resolve_and_validate();
  EXPECT_THROWS_WITH((Model<bf16>(c, {1, 8}, cuda::make_ops(0), false)), "cannot allocate the model's parameters");
}

namespace {

// r8 on all seven projections of test_config (alpha 16: scale 2).
LoraConfig lora_all_seven() {
  LoraConfig l;
  l.rank = 8, l.alpha = 16;
  for (const char* name : kLoraTargetNames) l.add_target(name);
  return l;
}

// The adapters' gradients of a model, by tensor (host copies).
std::vector<std::vector<float>> adapter_grads(Model<float>& m) {
  std::vector<std::vector<float>> r;
  for (const ParamInfo& p : m.params())
    if (p.adapter) r.emplace_back(m.param_grad(p), m.param_grad(p) + p.size);
  return r;
}
std::vector<std::vector<float>> adapter_grads(Model<bf16>& m) {
  std::vector<std::vector<float>> r;
  for (const ParamInfo& p : m.params())
    if (p.adapter) {
      r.emplace_back(p.size);
      m.ops().download_bytes(r.back().data(), m.param_grad(p), size_t(p.size) * sizeof(float));
    }
  return r;
}

std::vector<bf16> base_weights(Model<bf16>& m) {
  std::vector<bf16> w(size_t(m.num_params() - m.num_trainable()));
  m.ops().download_bytes(w.data(), m.param_data(), w.size() * sizeof(bf16));
  return w;
}

}  // namespace

// Tolerances as above: gradients 5e-2 of each tensor's largest, loss and log-probs 1e-2, the
// grad norm 5e-2; the frozen bf16 base exactly as it was.
SPPO_TEST(cuda_lora_preference_step_matches_cpu) {
  require_cuda();
  const ModelConfig c = test_config();
  OptimizerConfig oc = optimizer_config(OptimizerConfig::Kind::AdamW, 1e-3);
  oc.weight_decay = 0.01, oc.grad_accum_steps = 2;
  Twins t = make_twins(c, {4, 40}, lora_all_seven());
  t.set_optimizer(oc);
  EXPECT_TRUE(t.gpu->memory().master == size_t(t.gpu->num_trainable()) * sizeof(float) &&
                  t.gpu->memory().grads == t.gpu->memory().master,
              "master weights and gradients cover the adapters alone");
  const std::vector<int32_t> tok = random_ids(4 * 40, c.vocab_size, 13);
  std::vector<uint8_t> mask(tok.size(), 0);
  for (int r = 0; r < 4; ++r)
    for (int i = 10 + r; i < 40 - r; ++i) mask[r * 40 + i] = 1;
  std::vector<double> ref(4), target = {0.8, 0.2, 0.35, 0.65}, la(4), lb(4);
  PreferenceBatch pb{{tok.data(), mask.data(), 4, 40}, nullptr, target.data(), PreferenceLoss::SppoPair, 1000};
  t.cpu->sequence_logprobs(pb.seqs, ref.data(), nullptr);
  for (double& r : ref) r += 0.01;
  pb.ref_logp = ref.data();
  const std::vector<bf16> base_before = base_weights(*t.gpu);
  const PreferenceStepResult a = t.cpu->preference_step(pb, la.data()), b = t.gpu->preference_step(pb, lb.data());
  EXPECT_TRUE(!a.step.stepped && !b.step.stepped);
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(lb[i], la[i], 1e-2 * std::fabs(la[i]));
  const auto ga = adapter_grads(*t.cpu), gb = adapter_grads(*t.gpu);
  double worst = 0;
  size_t k = 0;
  for (const ParamInfo& p : t.cpu->params()) {
    if (!p.adapter) continue;
    const double e = max_rel_error(gb[k].data(), ga[k].data(), p.size);
    worst = std::max(worst, e);
    EXPECT_TRUE(e <= 5e-2, "gradient of " << p.name << ": relative error " << e);
    ++k;
  }
  std::printf("      %zu adapter tensors, largest gradient relative error %.2e\n", k, worst);
  const PreferenceStepResult a2 = t.cpu->preference_step(pb, la.data()), b2 = t.gpu->preference_step(pb, lb.data());
  EXPECT_TRUE(a2.step.stepped && b2.step.stepped);
  EXPECT_NEAR(b2.step.grad_norm, a2.step.grad_norm, 5e-2 * a2.step.grad_norm);
  const std::vector<bf16> base_after = base_weights(*t.gpu);
  EXPECT_TRUE(std::memcmp(base_before.data(), base_after.data(), base_after.size() * sizeof(bf16)) == 0,
              "the frozen base changed on the GPU");
  expect_working_copy_is_rounded_master(*t.gpu);
  // The step moved the adapters: their forward now differs from the CPU twin's by bf16 noise only.
  std::vector<double> sa(4), sb(4);
  t.cpu->sequence_logprobs(pb.seqs, sa.data(), nullptr);
  t.gpu->sequence_logprobs(pb.seqs, sb.data(), nullptr);
  for (int i = 0; i < 4; ++i) {
    EXPECT_NEAR(sb[i], sa[i], 1e-2 * std::fabs(sa[i]));
    EXPECT_TRUE(sa[i] != la[i], "sequence " << i << ": the step did not change its log-prob");
  }
}

// The generator's decode path applies the adapters: its log-probs are the model's own (bf16
// tolerance as cuda_generate_reproducible_and_logprobs_consistent).
SPPO_TEST(cuda_lora_generate_logprobs_are_the_models) {
  require_cuda();
  const ModelConfig c = test_config();
  Twins t = make_twins(c, {1, 64}, lora_all_seven());
  std::unique_ptr<GeneratorApi> g = t.gpu->make_generator({3, 64});
  std::vector<std::vector<int32_t>> prompts = {random_ids(5, c.vocab_size, 21), random_ids(9, c.vocab_size, 22)};
  std::vector<SequenceRequest> req;
  for (size_t i = 0; i < prompts.size(); ++i) req.push_back({prompts[i].data(), int64_t(prompts[i].size()), 7, i});
  SamplingOptions o;
  o.max_new_tokens = 16, o.temperature = 1.0;
  const auto r = g->generate(req, o);
  for (size_t i = 0; i < req.size(); ++i) {
    std::vector<int32_t> seq = prompts[i];
    seq.insert(seq.end(), r[i].tokens.begin(), r[i].tokens.end());
    std::vector<double> sum(1), per(seq.size()), cpu_per(seq.size());
    std::vector<uint8_t> mask(seq.size(), 0);
    for (size_t j = prompts[i].size(); j < seq.size(); ++j) mask[j] = 1;
    const Batch b{seq.data(), mask.data(), 1, int64_t(seq.size())};
    t.gpu->sequence_logprobs(b, sum.data(), per.data());
    t.cpu->sequence_logprobs(b, sum.data(), cpu_per.data());
    for (size_t j = 0; j < r[i].tokens.size(); ++j) {
      const size_t at = prompts[i].size() + j;
      EXPECT_NEAR(r[i].logprobs[j], per[at], 5e-2 + 2e-2 * std::fabs(per[at]));
      EXPECT_NEAR(per[at], cpu_per[at], 5e-2 + 2e-2 * std::fabs(cpu_per[at]));
    }
  }
}
