// The whole model on the CUDA backend (bf16 storage, fp32 master precision) against the CPU
// backend (float32) from identical weights: a training step's loss, every gradient and the
// parameters after AdamW and RMSprop steps; a preference step; a KV-cache decode step; and the
// generator end to end. Skipped, with the reason, where no GPU is usable.
//
// Tolerances (stated once, used below): bf16 keeps 8 significant bits, so a value recomputed
// through a few layers of bf16 activations differs from float32 by ~1e-2 of its scale.
//   loss: 1e-2 relative; gradients: 5e-2 of each tensor's largest |gradient| (the smallest
//   gradients of a tensor carry the bf16 noise of the larger ones); logits: 2e-2 of the
//   largest |logit|; parameter updates after a step: 5e-2 of the largest update.
#include <cmath>
#include <memory>
#include <vector>

#include "core/rng.h"
#include "cpu/cpu_ops.h"
#include "cuda/cuda_backend.h"
#include "sppo/generate.h"
#include "sppo/model.h"
#include "tests/cuda_test_util.h"
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
};
Twins make_twins(const ModelConfig& c, MemoryPlan plan) {
  Twins t{std::make_unique<Model<float>>(c, plan, std::make_unique<cpu::CpuOps<float>>()),
          std::make_unique<Model<bf16>>(c, plan, cuda::make_ops(0), false)};
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

SPPO_TEST(cuda_training_step_matches_cpu_loss_gradients_and_updates) {
  require_cuda();
  const ModelConfig c = test_config();
  for (const auto kind : {OptimizerConfig::Kind::AdamW, OptimizerConfig::Kind::RMSprop}) {
    Twins t = make_twins(c, {4, 65});
    OptimizerConfig oc;
    oc.kind = kind, oc.lr = 1e-3, oc.weight_decay = 0.01, oc.grad_accum_steps = 2;
    t.cpu->set_optimizer(oc);
    t.gpu->set_optimizer(oc);
    const std::vector<int32_t> tok = random_ids(4 * 65, c.vocab_size, 2);
    std::vector<uint8_t> mask(tok.size(), 1);
    for (size_t i = 0; i < mask.size(); i += 3) mask[i] = 0;
    const Batch b{tok.data(), mask.data(), 4, 65};
    // First micro-batch: gradients accumulate, no step yet.
    const StepResult ra = t.cpu->train_step(b), rb = t.gpu->train_step(b);
    EXPECT_NEAR(rb.loss, ra.loss, 1e-2 * ra.loss);
    EXPECT_TRUE(!ra.stepped && !rb.stepped);
    expect_grads_close(*t.cpu, *t.gpu, 5e-2);
    std::vector<std::vector<float>> before;
    for (const ParamInfo& p : t.cpu->params()) {
      before.emplace_back(p.size);
      t.cpu->get_param(p.name, before.back().data());
    }
    const StepResult sa = t.cpu->train_step(b), sb = t.gpu->train_step(b);
    EXPECT_TRUE(sa.stepped && sb.stepped);
    EXPECT_NEAR(sb.grad_norm, sa.grad_norm, 3e-2 * sa.grad_norm);
    for (size_t k = 0; k < t.cpu->params().size(); ++k) {
      const ParamInfo& p = t.cpu->params()[k];
      std::vector<float> wa(p.size), wb(p.size), da(p.size), db(p.size);
      t.cpu->get_param(p.name, wa.data());
      t.gpu->get_param(p.name, wb.data());  // fp32 master weights
      for (int64_t i = 0; i < p.size; ++i) da[i] = wa[i] - before[k][i], db[i] = wb[i] - before[k][i];
      const double e = max_rel_error(db.data(), da.data(), p.size);
      EXPECT_TRUE(e <= 5e-2, p.name << " update: relative error " << e);
    }
  }
}

SPPO_TEST(cuda_preference_step_matches_cpu) {
  require_cuda();
  const ModelConfig c = test_config();
  Twins t = make_twins(c, {4, 40});
  OptimizerConfig oc;
  oc.kind = OptimizerConfig::Kind::RMSprop, oc.lr = 1e-4;
  t.cpu->set_optimizer(oc);
  t.gpu->set_optimizer(oc);
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
    for (int p = 0; p < lens[s]; ++p) slots.push_back(s), pos.push_back(p), tok.push_back(int32_t((s * 31 + p * 7) % c.vocab_size));
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

SPPO_TEST(cuda_out_of_memory_is_a_clear_error) {
  require_cuda();
  ModelConfig c = test_config();
  c.vocab_size = 1 << 20, c.hidden_size = 1 << 14;  // ~290 billion parameters: beyond any GPU
  c.num_attention_heads = 128, c.num_key_value_heads = 128, c.intermediate_size = 1 << 16, c.num_hidden_layers = 64;
  c.resolve_and_validate();
  EXPECT_THROWS_WITH((Model<bf16>(c, {1, 8}, cuda::make_ops(0), false)), "cannot allocate the model's parameters");
}
