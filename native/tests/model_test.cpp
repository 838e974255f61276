// Model tests: analytic gradients against float64 central differences for every parameter
// kind, float against double, learning, determinism, accumulation, and bad inputs.
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

#include "core/rng.h"
#include "core/threadpool.h"
#include "cpu/cpu_ops.h"
#include "sppo/model.h"
#include "tests/harness.h"
#include "tests/model_configs.h"

using namespace sppo;

namespace {

template <class T>
std::unique_ptr<Model<T>> make_model(ModelConfig c, int max_batch, int max_seq) {
  return std::make_unique<Model<T>>(c, MemoryPlan{max_batch, max_seq}, std::make_unique<cpu::CpuOps<T>>());
}

using testutil::featureful_config;
using testutil::plain_config;

std::vector<int32_t> random_tokens(int64_t n, int vocab, uint64_t seed) {
  std::vector<int32_t> t(n);
  for (int64_t i = 0; i < n; ++i) t[i] = int32_t(uniform01(seed, 1, i) * vocab);
  return t;
}

// Norm weights start at exactly 1 and biases at 0; perturb them so their gradients are generic.
template <class T>
void perturb_all(Model<T>& m, uint64_t seed) {
  for (size_t k = 0; k < m.params().size(); ++k) {
    const ParamInfo& p = m.params()[k];
    T* w = m.param_data() + p.offset;
    for (int64_t i = 0; i < p.size; ++i) w[i] += T(0.1 * standard_normal(seed, k, i));
  }
}

void check_gradients(ModelConfig c, int B, int Tn, bool with_mask) {
  auto m = make_model<double>(c, B, Tn);
  perturb_all(*m, 99);
  auto tokens = random_tokens(int64_t(B) * Tn, c.vocab_size, 3);
  std::vector<uint8_t> mask(size_t(B) * Tn, 1);
  if (with_mask)  // a prompt of 2 tokens in every row, and padding at the end of row 0
    for (int b = 0; b < B; ++b)
      for (int t = 0; t < Tn; ++t) mask[b * Tn + t] = t >= 2 && !(b == 0 && t >= Tn - 2);
  Batch batch{tokens.data(), with_mask ? mask.data() : nullptr, B, Tn};
  m->zero_grad();
  m->accumulate_gradients(batch, 1.0);
  std::vector<double> grad(m->grad_data(), m->grad_data() + m->num_params());
  const double h = 1e-5;
  int checked = 0;
  for (size_t k = 0; k < m->params().size(); ++k) {
    const ParamInfo& p = m->params()[k];
    // Several elements of every tensor, spread by a fixed pseudo-random choice.
    const int picks = int(std::min<int64_t>(p.size, 6));
    for (int s = 0; s < picks; ++s) {
      const int64_t i = p.size <= 6 ? s : int64_t(uniform01(7, k, s) * p.size);
      const double fd =
          testutil::central_difference(m->param_data() + p.offset + i, h, [&] { return m->eval_loss(batch); });
      const double an = grad[p.offset + i];
      // Central differences in float64 are good to ~1e-9 here; 1e-6 relative leaves margin
      // while still catching any real mistake (which shows up at 1e-2 or worse).
      EXPECT_TRUE(std::fabs(fd - an) <= 1e-6 * std::max(1.0, std::fabs(fd)),
                  p.name << "[" << i << "]: analytic " << an << " vs finite difference " << fd);
      ++checked;
    }
  }
  EXPECT_TRUE(checked > 20);
}

}  // namespace

SPPO_TEST(gradients_match_finite_differences_gqa_bias_tied_llama3) { check_gradients(featureful_config(), 2, 7, true); }

SPPO_TEST(gradients_match_finite_differences_plain_untied) { check_gradients(plain_config(), 2, 6, false); }

SPPO_TEST(gradients_match_finite_differences_across_attention_tiles) {
  // 70 positions span two 64-row attention tiles, exercising tile edges and the causal mask.
  ModelConfig c = featureful_config();
  c.num_hidden_layers = 1;
  check_gradients(c, 1, 70, true);
}

SPPO_TEST(float_model_matches_double_model) {
  ModelConfig c = featureful_config();
  const int B = 2, Tn = 9;
  auto md = make_model<double>(c, B, Tn);
  auto mf = make_model<float>(c, B, Tn);
  perturb_all(*md, 4);
  for (int64_t i = 0; i < md->num_params(); ++i) mf->param_data()[i] = float(md->param_data()[i]);
  auto tokens = random_tokens(B * Tn, c.vocab_size, 8);
  std::vector<double> ld(B * Tn * c.vocab_size);
  std::vector<float> lf(ld.size());
  md->forward(tokens.data(), B, Tn, nullptr, ld.data());
  mf->forward(tokens.data(), B, Tn, nullptr, lf.data());
  double err = 0, ref = 0;
  for (size_t i = 0; i < ld.size(); ++i)
    err = std::max(err, std::fabs(ld[i] - lf[i])), ref = std::max(ref, std::fabs(ld[i]));
  EXPECT_TRUE(err <= 1e-5 * ref, "max |logit error| " << err << " vs max |logit| " << ref);
  Batch batch{tokens.data(), nullptr, B, Tn};
  md->zero_grad();
  mf->zero_grad();
  double lossd = md->accumulate_gradients(batch, 1.0), lossf = mf->accumulate_gradients(batch, 1.0);
  EXPECT_NEAR(lossf, lossd, 1e-5 * std::fabs(lossd));
  double gerr = 0, gref = 0;
  for (int64_t i = 0; i < md->num_params(); ++i) {
    gerr = std::max(gerr, std::fabs(md->grad_data()[i] - mf->grad_data()[i]));
    gref = std::max(gref, std::fabs(md->grad_data()[i]));
  }
  EXPECT_TRUE(gerr <= 1e-4 * gref, "max |grad error| " << gerr << " vs max |grad| " << gref);
}

SPPO_TEST(overfits_a_tiny_batch) {
  ModelConfig c = plain_config();
  c.initializer_range = 0.02;
  auto m = make_model<float>(c, 2, 12);
  OptimizerConfig oc;
  oc.lr = 1e-2;
  m->set_optimizer(oc);
  auto tokens = random_tokens(24, c.vocab_size, 21);
  Batch batch{tokens.data(), nullptr, 2, 12};
  const double first = m->eval_loss(batch);
  double last = first;
  for (int s = 0; s < 300; ++s) last = m->train_step(batch).loss;
  last = m->eval_loss(batch);
  EXPECT_TRUE(first > 2.5, "initial loss " << first << " should be near log(19) = 2.94");
  EXPECT_TRUE(last < 0.05, "loss after 300 AdamW steps is " << last << " (started at " << first << ")");
}

SPPO_TEST(training_is_bit_reproducible) {
  ModelConfig c = featureful_config();
  auto tokens = random_tokens(3 * 10, c.vocab_size, 2);
  Batch batch{tokens.data(), nullptr, 3, 10};
  std::vector<std::vector<float>> runs;
  for (int run = 0; run < 2; ++run) {
    auto m = make_model<float>(c, 3, 10);
    OptimizerConfig oc;
    oc.kind = OptimizerConfig::Kind::RMSprop;
    oc.lr = 3e-3;
    oc.max_grad_norm = 0.5;
    m->set_optimizer(oc);
    for (int s = 0; s < 4; ++s) m->train_step(batch);
    runs.emplace_back(m->param_data(), m->param_data() + m->num_params());
  }
  EXPECT_TRUE(std::memcmp(runs[0].data(), runs[1].data(), runs[0].size() * sizeof(float)) == 0,
              "two identical runs ended with different parameters");
  auto fresh = make_model<float>(c, 3, 10);
  EXPECT_TRUE(std::memcmp(fresh->param_data(), runs[0].data(), runs[0].size() * sizeof(float)) != 0,
              "training changed nothing");
}

SPPO_TEST(gradient_accumulation_equals_one_big_batch) {
  ModelConfig c = plain_config();
  auto tokens = random_tokens(4 * 8, c.vocab_size, 17);
  OptimizerConfig oc;
  oc.kind = OptimizerConfig::Kind::RMSprop;
  oc.lr = 1e-2;
  auto whole = make_model<double>(c, 4, 8);
  whole->set_optimizer(oc);
  whole->train_step({tokens.data(), nullptr, 4, 8});
  oc.grad_accum_steps = 2;
  auto parts = make_model<double>(c, 4, 8);
  parts->set_optimizer(oc);
  StepResult r1 = parts->train_step({tokens.data(), nullptr, 2, 8});
  EXPECT_TRUE(!r1.stepped && parts->optimizer_steps() == 0, "stepped before accumulation finished");
  StepResult r2 = parts->train_step({tokens.data() + 16, nullptr, 2, 8});
  EXPECT_TRUE(r2.stepped && parts->optimizer_steps() == 1);
  double diff = 0;
  for (int64_t i = 0; i < whole->num_params(); ++i)
    diff = std::max(diff, std::fabs(whole->param_data()[i] - parts->param_data()[i]));
  EXPECT_TRUE(diff < 1e-12, "accumulated step differs from the big-batch step by " << diff);
  auto fresh = make_model<double>(c, 4, 8);
  double moved = 0;
  for (int64_t i = 0; i < whole->num_params(); ++i)
    moved = std::max(moved, std::fabs(whole->param_data()[i] - fresh->param_data()[i]));
  EXPECT_TRUE(moved > 1e-4, "the step did not move the parameters");
}

SPPO_TEST(clipping_scales_gradients_to_max_norm) {
  // RMSprop with alpha = 0 and eps = 1 makes the first update p -= lr * g'/(|g'| + 1) with
  // g' = clip * g: unlike Adam's, it depends on the gradient's scale, so clipping is visible.
  ModelConfig c = plain_config();
  auto tokens = random_tokens(2 * 6, c.vocab_size, 4);
  Batch batch{tokens.data(), nullptr, 2, 6};
  auto m = make_model<double>(c, 2, 6);
  m->zero_grad();
  m->accumulate_gradients(batch, 1.0);
  std::vector<double> g(m->grad_data(), m->grad_data() + m->num_params());
  std::vector<double> p0(m->param_data(), m->param_data() + m->num_params());
  double norm2 = 0;
  for (double x : g) norm2 += x * x;
  const double norm = std::sqrt(norm2), max_norm = 0.25 * norm;
  OptimizerConfig oc;
  oc.kind = OptimizerConfig::Kind::RMSprop;
  oc.alpha = 0, oc.eps = 1, oc.lr = 0.5, oc.max_grad_norm = max_norm;
  m->set_optimizer(oc);
  StepResult r = m->train_step(batch);
  EXPECT_NEAR(r.grad_norm, norm, 1e-12 * norm);
  const double clip = max_norm / (norm + 1e-6);
  double worst = 0;
  for (int64_t i = 0; i < m->num_params(); ++i) {
    const double gi = clip * g[i];
    worst = std::max(worst, std::fabs(m->param_data()[i] - (p0[i] - 0.5 * gi / (std::fabs(gi) + 1))));
  }
  EXPECT_TRUE(worst < 1e-12, "update differs from the clipped RMSprop formula by " << worst);
}

SPPO_TEST(learning_rate_schedules) {
  OptimizerConfig oc;
  oc.lr = 2.0;
  oc.schedule.kind = ScheduleConfig::Kind::Linear;
  oc.schedule.warmup_steps = 10;
  oc.schedule.total_steps = 110;
  EXPECT_NEAR(oc.lr_at(0), 0.0, 0);
  EXPECT_NEAR(oc.lr_at(5), 1.0, 1e-15);
  EXPECT_NEAR(oc.lr_at(10), 2.0, 1e-15);
  EXPECT_NEAR(oc.lr_at(60), 1.0, 1e-15);
  EXPECT_NEAR(oc.lr_at(110), 0.0, 0);
  EXPECT_NEAR(oc.lr_at(500), 0.0, 0);
  oc.schedule.kind = ScheduleConfig::Kind::Cosine;
  oc.schedule.min_lr_ratio = 0.1;
  EXPECT_NEAR(oc.lr_at(10), 2.0, 1e-15);
  EXPECT_NEAR(oc.lr_at(60), 2.0 * (0.1 + 0.9 * 0.5), 1e-12);  // halfway down the cosine
  EXPECT_NEAR(oc.lr_at(110), 0.2, 1e-12);
  oc.schedule.kind = ScheduleConfig::Kind::Constant;
  EXPECT_NEAR(oc.lr_at(3), 0.6, 1e-15);  // still warming up
  EXPECT_NEAR(oc.lr_at(1000), 2.0, 0);
}

SPPO_TEST(bad_inputs_give_clear_errors_and_leave_the_model_usable) {
  ModelConfig c = plain_config();
  auto m = make_model<float>(c, 2, 8);
  auto tokens = random_tokens(16, c.vocab_size, 1);
  Batch ok{tokens.data(), nullptr, 2, 8};
  const double before = m->eval_loss(ok);
  auto bad = tokens;
  bad[11] = c.vocab_size;
  EXPECT_THROWS_WITH(m->eval_loss({bad.data(), nullptr, 2, 8}),
                     "token id 19 at sequence 1, position 3 is out of range");
  bad[11] = -4;
  EXPECT_THROWS_WITH(m->eval_loss({bad.data(), nullptr, 2, 8}), "token id -4");
  EXPECT_THROWS_WITH(m->eval_loss({tokens.data(), nullptr, 0, 8}), "batch is empty");
  EXPECT_THROWS_WITH(m->eval_loss({tokens.data(), nullptr, 3, 5}), "planned for at most 2");
  EXPECT_THROWS_WITH(m->eval_loss({tokens.data(), nullptr, 1, 9}), "exceeds the planned maximum 8");
  std::vector<uint8_t> none(16, 0);
  EXPECT_THROWS_WITH(m->eval_loss({tokens.data(), none.data(), 2, 8}), "selects no tokens");
  std::vector<float> w(c.hidden_size, 1.0f);
  w[3] = NAN;
  EXPECT_THROWS_WITH(m->set_param("model.norm.weight", w.data(), w.size()), "index 3 is not finite");
  EXPECT_THROWS_WITH(m->set_param("model.norm.weight", w.data(), 5), "has 12 elements, got 5");
  EXPECT_THROWS_WITH(m->get_param("model.nope", w.data()), "no parameter named 'model.nope'");
  EXPECT_NEAR(m->eval_loss(ok), before, 0);
  ModelConfig bad_cfg = c;
  bad_cfg.num_key_value_heads = 2;
  EXPECT_THROWS_WITH(make_model<float>(bad_cfg, 1, 4),
                     "num_key_value_heads (2) must divide config.num_attention_heads (3)");
  bad_cfg = c;
  bad_cfg.hidden_size = 13;
  EXPECT_THROWS_WITH(make_model<float>(bad_cfg, 1, 4), "must divide config.hidden_size (13)");
  EXPECT_THROWS_WITH(make_model<float>(c, 1, 129), "exceeds config.max_position_embeddings");
}

SPPO_TEST(results_do_not_depend_on_thread_count) {
  ModelConfig c = featureful_config();
  auto tokens = random_tokens(2 * 70, c.vocab_size, 6);
  Batch batch{tokens.data(), nullptr, 2, 70};
  std::vector<std::vector<float>> grads;
  const int saved = num_threads();
  for (int threads : {1, 3}) {
    set_num_threads(threads);
    auto m = make_model<float>(c, 2, 70);
    m->accumulate_gradients(batch, 1.0);
    grads.emplace_back(m->grad_data(), m->grad_data() + m->num_params());
  }
  set_num_threads(saved);
  EXPECT_TRUE(std::memcmp(grads[0].data(), grads[1].data(), grads[0].size() * sizeof(float)) == 0,
              "gradients differ between 1 and 3 threads");
}
