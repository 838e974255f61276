// LoRA: adapter gradients against float64 central differences through a preference step, the
// frozen base (no gradients, no update, no decay), the adapters' table and initialisation, bad
// options, and generation sampling from base + adapters.
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

#include "core/rng.h"
#include "cpu/cpu_ops.h"
#include "sppo/generate.h"
#include "sppo/model.h"
#include "tests/harness.h"
#include "tests/model_configs.h"

using namespace sppo;

namespace {

LoraConfig lora_config(int rank, double alpha, std::initializer_list<const char*> targets) {
  LoraConfig l;
  l.rank = rank, l.alpha = alpha;
  for (const char* t : targets) l.add_target(t);
  return l;
}

LoraConfig all_seven(int rank, double alpha) {
  return lora_config(rank, alpha, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"});
}

using testutil::featureful_config;
using testutil::plain_config;

template <class T>
std::unique_ptr<Model<T>> make_model(const ModelConfig& c, int B, int Tn, const LoraConfig& lora) {
  return std::make_unique<Model<T>>(c, MemoryPlan{B, Tn}, std::make_unique<cpu::CpuOps<T>>(), true, lora);
}

// Every parameter off its initial value: norms off 1, biases off 0, and B nonzero (PEFT starts
// it at 0, where A's gradient vanishes and the check would show nothing).
template <class T>
void perturb(Model<T>& m, uint64_t seed) {
  for (size_t k = 0; k < m.params().size(); ++k) {
    const ParamInfo& p = m.params()[k];
    T* w = m.param_data() + p.offset;
    const double scale = p.adapter ? 0.3 : 0.1;
    for (int64_t i = 0; i < p.size; ++i) w[i] += T(scale * standard_normal(seed, k, i));
  }
}

// Four sequences of 9 tokens, two pairs: prompts of 2-4 tokens, responses, right padding.
struct PairBatch {
  std::vector<int32_t> tokens;
  std::vector<uint8_t> mask;
  std::vector<double> ref = {-40, -38.5, -41, -37}, target = {0.8, 0.3, 0.35, 0.6};
  int B = 4, T = 9;
  explicit PairBatch(int vocab) {
    const int prompt[4] = {2, 4, 3, 2}, response[4] = {5, 4, 6, 7};
    tokens.resize(B * T);
    mask.assign(B * T, 0);
    for (int b = 0; b < B; ++b)
      for (int t = 0; t < T; ++t) {
        tokens[b * T + t] = int32_t(uniform01(9, b, t) * vocab);
        mask[b * T + t] = t >= prompt[b] && t < prompt[b] + response[b];
      }
  }
  PreferenceBatch view(double eta) const {
    return {{tokens.data(), mask.data(), B, T}, ref.data(), target.data(), PreferenceLoss::SppoPair, eta};
  }
};

void check_lora_gradients(const ModelConfig& c, const LoraConfig& lora, bool checkpoint) {
  PairBatch e(c.vocab_size);
  MemoryPlan plan{e.B, e.T};
  plan.checkpoint_activations = checkpoint;
  Model<double> m(c, plan, std::make_unique<cpu::CpuOps<double>>(), true, lora);
  perturb(m, 31);
  const PreferenceBatch pb = e.view(3.0);
  std::vector<double> seq(e.B);
  m.zero_grad();
  m.accumulate_preference_gradients(pb, 1.0, seq.data());
  int checked = 0;
  for (size_t k = 0; k < m.params().size(); ++k) {
    const ParamInfo& p = m.params()[k];
    EXPECT_TRUE(p.trainable == p.adapter, p.name << ": trainable " << p.trainable << ", adapter " << p.adapter);
    if (!p.adapter) {
      EXPECT_TRUE(m.param_grad(p) == nullptr, p.name << " is frozen but has a gradient");
      continue;
    }
    const std::vector<double> grad(m.param_grad(p), m.param_grad(p) + p.size);
    for (int s = 0; s < 3; ++s) {
      const int64_t i = int64_t(uniform01(12, k, s) * p.size);
      const double fd = testutil::central_difference(m.param_data() + p.offset + i, 1e-5,
                                                     [&] { return m.eval_preference(pb, seq.data()).loss; });
      const double an = grad[i];
      // As the full-model checks: central differences in float64 are good to ~1e-9 here.
      EXPECT_TRUE(std::fabs(fd - an) <= 1e-6 * std::max(1.0, std::fabs(fd)),
                  p.name << "[" << i << "]: analytic " << an << " vs finite difference " << fd);
      EXPECT_TRUE(std::fabs(an) > 1e-8, p.name << "[" << i << "]: gradient " << an << " shows nothing");
      ++checked;
    }
  }
  EXPECT_TRUE(checked == 3 * 2 * int(lora.targets.size()) * c.num_hidden_layers,
              checked << " adapter elements checked");
}

}  // namespace

SPPO_TEST(lora_gradients_match_finite_differences_all_seven_targets) {
  check_lora_gradients(featureful_config(), all_seven(2, 3.0), false);
}

SPPO_TEST(lora_gradients_match_finite_differences_some_targets_checkpointed) {
  check_lora_gradients(plain_config(), lora_config(3, 5.0, {"v_proj", "q_proj", "up_proj", "down_proj"}), true);
}

SPPO_TEST(lora_table_names_shapes_and_frozen_base) {
  const ModelConfig c = featureful_config();
  const LoraConfig lora = lora_config(2, 4.0, {"k_proj", "o_proj", "gate_proj"});
  auto m = make_model<float>(c, 2, 8, lora);
  auto base = make_model<float>(c, 2, 8, {});
  // The base's tensors come first, as without LoRA; then per layer the adapters, A then B.
  const size_t n_base = base->params().size();
  EXPECT_TRUE(m->params().size() == n_base + 2 * 3 * size_t(c.num_hidden_layers));
  for (size_t k = 0; k < n_base; ++k)
    EXPECT_TRUE(m->params()[k].name == base->params()[k].name && !m->params()[k].trainable);
  const ParamInfo& a = m->param("model.layers.1.self_attn.k_proj.lora_A.weight");
  const ParamInfo& b = m->param("model.layers.1.self_attn.k_proj.lora_B.weight");
  const ParamInfo& g = m->param("model.layers.0.mlp.gate_proj.lora_B.weight");
  EXPECT_TRUE(a.shape == std::vector<int64_t>({2, c.hidden_size}) && a.adapter && a.trainable && a.decay);
  EXPECT_TRUE(b.shape == std::vector<int64_t>({c.num_key_value_heads * c.head_dim, 2}));
  EXPECT_TRUE(g.shape == std::vector<int64_t>({c.intermediate_size, 2}));
  EXPECT_THROWS_WITH(m->param("model.layers.0.self_attn.q_proj.lora_A.weight"), "no parameter named");
  // Memory: gradients, master weights (none in float) and optimizer state cover the adapters alone.
  EXPECT_TRUE(m->memory().grads == size_t(m->num_trainable()) * sizeof(float));
  EXPECT_TRUE(m->num_params() - m->num_trainable() == base->num_params());
  int64_t adapter_elems = 0;
  for (const ParamInfo& p : m->params()) adapter_elems += p.adapter ? p.size : 0;
  EXPECT_TRUE(m->num_trainable() >= adapter_elems && m->num_trainable() < adapter_elems + 16 * 6 * 2,
              m->num_trainable() << " trainable elements for " << adapter_elems << " adapter elements");
  // PEFT's initialisation: A ~ U(−1/√in, 1/√in), B = 0; so the model is still the base, bitwise.
  std::vector<float> va(size_t(a.size)), vb(size_t(b.size));
  m->get_param(a.name, va.data());
  m->get_param(b.name, vb.data());
  double lo = 0, hi = 0;
  for (float x : va) lo = std::min(lo, double(x)), hi = std::max(hi, double(x));
  const double bound = 1 / std::sqrt(double(c.hidden_size));
  EXPECT_TRUE(lo >= -bound && hi <= bound && hi - lo > bound, "A spans [" << lo << ", " << hi << "]");
  for (float x : vb) EXPECT_TRUE(x == 0);
  std::vector<int32_t> tokens(16);
  for (int i = 0; i < 16; ++i) tokens[i] = int32_t(uniform01(4, 0, i) * c.vocab_size);
  std::vector<float> with(16 * c.vocab_size), without(with.size());
  m->forward(tokens.data(), 2, 8, nullptr, with.data());
  base->forward(tokens.data(), 2, 8, nullptr, without.data());
  EXPECT_TRUE(std::memcmp(with.data(), without.data(), with.size() * sizeof(float)) == 0,
              "fresh adapters changed the logits");
  // set_param / get_param reach the adapters; a nonzero B changes the logits.
  for (size_t i = 0; i < vb.size(); ++i) vb[i] = float(0.5 * standard_normal(6, 0, i));
  m->set_param(b.name, vb.data(), int64_t(vb.size()));
  std::vector<float> back(vb.size());
  m->get_param(b.name, back.data());
  EXPECT_TRUE(back == vb);
  m->forward(tokens.data(), 2, 8, nullptr, with.data());
  EXPECT_TRUE(std::memcmp(with.data(), without.data(), with.size() * sizeof(float)) != 0, "B had no effect");
  // initialize_adapters draws A again (same seed: same values) and zeroes B.
  m->initialize_adapters();
  m->get_param(b.name, back.data());
  for (float x : back) EXPECT_TRUE(x == 0);
  std::vector<float> va2(va.size());
  m->get_param(a.name, va2.data());
  EXPECT_TRUE(va2 == va);
}

SPPO_TEST(lora_steps_update_the_adapters_alone) {
  const ModelConfig c = plain_config();
  PairBatch e(c.vocab_size);
  for (auto kind : {OptimizerConfig::Kind::AdamW, OptimizerConfig::Kind::RMSprop}) {
    const char* what = kind == OptimizerConfig::Kind::AdamW ? "adamw" : "rmsprop";
    const LoraConfig lora = all_seven(2, 4.0);
    auto m = make_model<float>(c, e.B, e.T, lora);
    auto twin = make_model<float>(c, e.B, e.T, lora);
    OptimizerConfig oc;
    oc.kind = kind;
    oc.lr = 1e-2, oc.weight_decay = 0.1, oc.max_grad_norm = 0.05;
    m->set_optimizer(oc);
    EXPECT_TRUE(m->memory().optimizer ==
                    size_t(kind == OptimizerConfig::Kind::AdamW ? 2 : 1) * size_t(m->num_trainable()) * sizeof(float),
                what << ": optimizer state " << m->memory().optimizer);
    const int64_t n_base = m->num_params() - m->num_trainable();
    const std::vector<float> before(m->param_data(), m->param_data() + m->num_params());
    // The global norm clipping divides by is the adapters' gradient norm.
    twin->zero_grad();
    twin->accumulate_preference_gradients(e.view(3.0), 1.0, nullptr);
    double sq = 0;
    for (int64_t i = 0; i < twin->num_trainable(); ++i) sq += double(twin->grad_data()[i]) * twin->grad_data()[i];
    PreferenceStepResult r = m->preference_step(e.view(3.0));
    EXPECT_TRUE(r.step.stepped);
    EXPECT_NEAR(r.step.grad_norm, std::sqrt(sq), 1e-6 * std::sqrt(sq));
    EXPECT_TRUE(r.step.grad_norm > oc.max_grad_norm, what << ": the norm " << r.step.grad_norm << " is not clipped");
    for (int s = 0; s < 2; ++s) m->preference_step(e.view(3.0));
    EXPECT_TRUE(std::memcmp(before.data(), m->param_data(), size_t(n_base) * sizeof(float)) == 0,
                what << ": the frozen base changed");
    for (const ParamInfo& p : m->params()) {
      if (!p.adapter) continue;
      int64_t moved = 0;
      for (int64_t i = 0; i < p.size; ++i) moved += before[p.offset + i] != m->param_data()[p.offset + i];
      EXPECT_TRUE(moved == p.size, what << ": " << p.name << " moved in " << moved << " of " << p.size << " elements");
    }
  }
}

SPPO_TEST(lora_options_are_validated) {
  const ModelConfig c = plain_config();  // q, k, v, o: 12 x 12; gate, up: 14 x 12; down: 12 x 14
  auto make = [&](LoraConfig l) { return make_model<float>(c, 1, 4, l); };
  LoraConfig l;
  EXPECT_THROWS_WITH(l.add_target("qkv_proj"), "unknown target 'qkv_proj' (known: q_proj, k_proj, v_proj, o_proj");
  l.add_target("v_proj");
  EXPECT_THROWS_WITH(l.add_target("v_proj"), "lists 'v_proj' twice");
  EXPECT_THROWS_WITH(make(lora_config(0, 8, {"q_proj"})), "lora.rank must be an integer >= 1, got 0");
  EXPECT_THROWS_WITH(make(lora_config(-2, 8, {"q_proj"})), "lora.rank must be an integer >= 1, got -2");
  EXPECT_THROWS_WITH(make(lora_config(13, 8, {"up_proj", "down_proj"})),
                     "lora.rank (13) exceeds min(in, out) = 12 of up_proj (12 in, 14 out)");
  EXPECT_THROWS_WITH(make(lora_config(4, NAN, {"q_proj"})), "lora.alpha must be a finite number > 0, got nan");
  EXPECT_THROWS_WITH(make(lora_config(4, 0, {"q_proj"})), "lora.alpha must be a finite number > 0, got 0");
  EXPECT_THROWS_WITH(make(lora_config(4, 8, {})), "lora.targets is empty");
  EXPECT_TRUE(make(lora_config(12, 8, {"down_proj"}))->lora().enabled());  // rank = min(in, out) is allowed
}

SPPO_TEST(lora_generation_samples_from_base_plus_adapters) {
  // The generator's log-probs of what it sampled equal sequence_logprobs of the same model (float64),
  // and differ from the base's: the decode path applies the adapters.
  const ModelConfig c = testutil::gqa_llama3_config(37, 21);
  const LoraConfig lora = all_seven(3, 6.0);
  auto m = make_model<double>(c, 1, 40, lora);
  perturb(*m, 57);
  Generator<double> gen(*m, GeneratorPlan{3, 40}, std::make_unique<cpu::CpuOps<double>>());
  std::vector<std::vector<int32_t>> prompts;
  std::vector<SequenceRequest> reqs;
  for (int p = 0; p < 3; ++p) {
    prompts.push_back(std::vector<int32_t>(size_t(3 + 5 * p)));
    for (size_t i = 0; i < prompts[p].size(); ++i) prompts[p][i] = int32_t(uniform01(70, p, i) * c.vocab_size);
  }
  for (int p = 0; p < 3; ++p) reqs.push_back({prompts[p].data(), int64_t(prompts[p].size()), uint64_t(5 + p), 0});
  SamplingOptions o;
  o.max_new_tokens = 12, o.temperature = 1.3, o.top_k = 6;
  const auto res = gen.generate(reqs, o);
  auto base_model = make_model<double>(c, 1, 40, {});
  for (int64_t i = 0; i < base_model->num_params(); ++i) base_model->param_data()[i] = m->param_data()[i];
  double differs = 0;
  for (int p = 0; p < 3; ++p) {
    std::vector<int32_t> all = prompts[p];
    all.insert(all.end(), res[p].tokens.begin(), res[p].tokens.end());
    std::vector<uint8_t> mask(all.size(), 0);
    for (size_t t = prompts[p].size(); t < all.size(); ++t) mask[t] = 1;
    const int64_t n = int64_t(all.size());
    std::vector<double> sum(1), per(static_cast<size_t>(n)), base_per(static_cast<size_t>(n));
    m->sequence_logprobs({all.data(), mask.data(), 1, n}, sum.data(), per.data());
    base_model->sequence_logprobs({all.data(), mask.data(), 1, n}, sum.data(), base_per.data());
    for (size_t t = 0; t < res[p].tokens.size(); ++t) {
      const size_t at = prompts[p].size() + t;
      EXPECT_NEAR(res[p].logprobs[t], per[at], 1e-10);
      differs = std::max(differs, std::fabs(res[p].logprobs[t] - base_per[at]));
    }
  }
  EXPECT_TRUE(differs > 1e-2, "the adapters moved no log-prob by more than " << differs);
}
