// Preference losses and the fused LM head: every loss type against formulas written out
// independently here, the fused head against an unfused float64 reference that materialises
// all logits, finite differences through the whole model, and the closed forms at θ = θ_t.
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

#include "core/rng.h"
#include "cpu/cpu_ops.h"
#include "sppo/model.h"
#include "sppo/preference.h"
#include "tests/harness.h"
#include "tests/model_configs.h"

using namespace sppo;

namespace {

const PreferenceLoss kAllLosses[] = {PreferenceLoss::Sppo,     PreferenceLoss::SppoPair, PreferenceLoss::SppoSingle,
                                     PreferenceLoss::SppoHard, PreferenceLoss::Dpo,      PreferenceLoss::Ipo};

// The loss table of docs/algorithm.md, example by example (Δ = logp − ref, β = 1/η).
double reference_loss(PreferenceLoss loss, double eta, const std::vector<double>& logp, const std::vector<double>& ref,
                      const std::vector<double>& target) {
  const double beta = 1 / eta;
  const size_t n = logp.size();
  double sum = 0;
  if (loss == PreferenceLoss::Sppo) {
    for (size_t s = 0; s < n; ++s) sum += std::pow(logp[s] - ref[s] - eta * (target[s] - 0.5), 2);
    return sum / double(n);
  }
  for (size_t k = 0; k < n / 2; ++k) {
    const double dw = logp[2 * k] - ref[2 * k], dl = logp[2 * k + 1] - ref[2 * k + 1];
    const double pw = target[2 * k], pl = target[2 * k + 1], q = target[2 * k];
    switch (loss) {
      case PreferenceLoss::SppoPair:
        sum += 0.5 * (std::pow(dw - eta * (pw - 0.5), 2) + std::pow(dl - eta * (pl - 0.5), 2));
        break;
      case PreferenceLoss::SppoSingle:
        sum += 0.5 * (std::pow(dw - eta * (q - 0.5), 2) + std::pow(dl + eta * (q - 0.5), 2));
        break;
      case PreferenceLoss::SppoHard:
        sum += std::pow(dw - eta / 2, 2) + std::pow(dl + eta / 2, 2);
        break;
      case PreferenceLoss::Dpo:
        sum += -std::log(1 / (1 + std::exp(-beta * (dw - dl))));
        break;
      case PreferenceLoss::Ipo:
        sum += std::pow(dw - dl - 1 / (2 * beta), 2);
        break;
      default:
        break;
    }
  }
  return sum / double(n / 2);
}

std::vector<double> randn(int64_t n, uint64_t seed, double scale = 1) {
  std::vector<double> v(n);
  for (int64_t i = 0; i < n; ++i) v[i] = scale * standard_normal(seed, 0, i);
  return v;
}

ModelConfig small_config() {
  ModelConfig c;
  c.vocab_size = 29, c.hidden_size = 16, c.num_hidden_layers = 2, c.num_attention_heads = 4;
  c.num_key_value_heads = 2, c.intermediate_size = 24, c.max_position_embeddings = 64;
  c.attention_bias = true, c.initializer_range = 0.3, c.seed = 3;
  return c;
}

// Four sequences of mixed prompt / response lengths, right-padded to 9 tokens.
struct Example {
  std::vector<int32_t> tokens;
  std::vector<uint8_t> mask;
  int B = 4, T = 9;
};
Example mixed_batch(int vocab) {
  Example e;
  const int prompt[4] = {2, 4, 1, 3}, response[4] = {5, 3, 8, 6};
  e.tokens.resize(e.B * e.T);
  e.mask.assign(e.B * e.T, 0);
  for (int b = 0; b < e.B; ++b)
    for (int t = 0; t < e.T; ++t) {
      e.tokens[b * e.T + t] = int32_t(uniform01(5, b, t) * vocab);
      e.mask[b * e.T + t] = t >= prompt[b] && t < prompt[b] + response[b];
    }
  return e;
}

}  // namespace

SPPO_TEST(preference_losses_match_the_formulas_and_their_derivatives) {
  const int n = 6;
  for (PreferenceLoss loss : kAllLosses) {
    for (double eta : {1.0, 1000.0}) {
      auto logp = randn(n, 1, 30), ref = randn(n, 2, 30);
      for (int s = 0; s < n; ++s) logp[s] -= 200, ref[s] = -std::fabs(ref[s]) - 200;
      std::vector<double> target(n), grad(n);
      for (int s = 0; s < n; ++s) target[s] = uniform01(3, 0, s);
      PreferenceMetrics m;
      const double value = preference_loss(loss, eta, n, logp.data(), ref.data(), target.data(), grad.data(), &m);
      const double expect = reference_loss(loss, eta, logp, ref, target);
      EXPECT_NEAR(value, expect, 1e-12 * std::max(1.0, std::fabs(expect)));
      EXPECT_NEAR(m.loss, value, 0);
      for (int s = 0; s < n; ++s) {
        // Central differences of the independent formula; h relative to the log-prob's size.
        const double h = 1e-4;
        auto up = logp, down = logp;
        up[s] += h, down[s] -= h;
        const double fd =
            (reference_loss(loss, eta, up, ref, target) - reference_loss(loss, eta, down, ref, target)) / (2 * h);
        EXPECT_TRUE(std::fabs(fd - grad[s]) <= 1e-6 * std::max(1.0, std::fabs(fd)),
                    preference_loss_name(loss)
                        << " eta " << eta << " seq " << s << ": grad " << grad[s] << " vs fd " << fd);
      }
      if (is_pair_loss(loss)) {
        double chosen = 0;
        for (int k = 0; k < n / 2; ++k) chosen += (logp[2 * k] - ref[2 * k]) / eta / (n / 2);
        EXPECT_NEAR(m.rewards_chosen, chosen, 1e-12);
        EXPECT_NEAR(m.rewards_margins, m.rewards_chosen - m.rewards_rejected, 1e-15);
      } else {
        EXPECT_TRUE(std::isnan(m.rewards_chosen) && m.pairs == 0);
      }
    }
  }
}

SPPO_TEST(preference_losses_stay_finite_at_extreme_valid_values) {
  // η = 1000 with log-probs of thousands of nats and targets at the ends of [0, 1].
  const int n = 4;
  std::vector<double> logp = {-8000.5, -12.25, -4000.0, -1e-9}, ref = {-1.0, -9000.0, -4000.0, -7000.0};
  std::vector<double> target = {1.0, 0.0, 0.5, 1.0}, grad(n);
  for (PreferenceLoss loss : kAllLosses) {
    const double v = preference_loss(loss, 1000, n, logp.data(), ref.data(), target.data(), grad.data(), nullptr);
    EXPECT_TRUE(std::isfinite(v), preference_loss_name(loss) << " loss " << v);
    for (double g : grad) EXPECT_TRUE(std::isfinite(g), preference_loss_name(loss) << " grad " << g);
  }
  // DPO far into saturation: -log σ(z) for z = -1e4 is 1e4, not inf; its gradient is -β.
  std::vector<double> lp = {-1e7, 0 - 1.0}, rf = {-1.0, -1e7};
  const double v =
      preference_loss(PreferenceLoss::Dpo, 1000, 2, lp.data(), rf.data(), target.data(), grad.data(), nullptr);
  EXPECT_NEAR(v, 1e-3 * (1e7 - 1 + 1e7 - 1), 1e-6 * v);
  EXPECT_NEAR(grad[0], -1e-3, 1e-15);
}

SPPO_TEST(preference_losses_reject_bad_values) {
  std::vector<double> logp = {-3, -4}, ref = {-2, -5}, target = {0.7, 0.2}, grad(2);
  auto call = [&](PreferenceLoss loss, double eta, int n) {
    return preference_loss(loss, eta, n, logp.data(), ref.data(), target.data(), grad.data(), nullptr);
  };
  EXPECT_THROWS_WITH(call(PreferenceLoss::SppoPair, 1, 1), "needs (chosen, rejected) pairs: got 1 sequences");
  EXPECT_THROWS_WITH(call(PreferenceLoss::Sppo, 0, 2), "eta must be a finite number > 0");
  EXPECT_THROWS_WITH(call(PreferenceLoss::Sppo, NAN, 2), "eta must be");
  ref[1] = NAN;
  EXPECT_THROWS_WITH(call(PreferenceLoss::Dpo, 1, 2),
                     "sequence 1: the reference log-prob must be a finite number <= 0");
  ref[1] = -5, target[0] = 1.5;
  EXPECT_THROWS_WITH(call(PreferenceLoss::Sppo, 1, 2),
                     "sequence 0: the target win probability must be in [0, 1], got 1.5");
  EXPECT_TRUE(std::isfinite(call(PreferenceLoss::Dpo, 1, 2)));  // dpo reads no target, so 1.5 is not an error there
  logp[0] = INFINITY;
  EXPECT_THROWS_WITH(call(PreferenceLoss::Ipo, 1, 2), "sequence 0: the policy log-prob is not finite");
  EXPECT_THROWS_WITH(parse_preference_loss("kto"), "unknown loss 'kto'");
}

SPPO_TEST(fused_head_matches_unfused_float64_reference) {
  // n rows spanning several chunks; gradients with per-row coefficients as a sequence loss gives.
  const int64_t n = 37, C = 24, V = 601, chunk = 9 * 256;  // 9-row tiles of 256 words: edges in both directions
  auto Hd = randn(n * C, 4), Wd = randn(V * C, 5, 0.5);
  std::vector<int32_t> targets(n);
  std::vector<double> coef(n);
  for (int64_t i = 0; i < n; ++i) targets[i] = int32_t(uniform01(6, 0, i) * V), coef[i] = standard_normal(7, 0, i);
  // Unfused: all n x V logits at once.
  std::vector<double> logits(n * V), ref_logp(n), dlog(n * V), ref_dH(n * C, 0), ref_dW(V * C, 0);
  for (int64_t i = 0; i < n; ++i) {
    double mx = -1e300;
    for (int64_t v = 0; v < V; ++v) {
      double z = 0;
      for (int64_t k = 0; k < C; ++k) z += Hd[i * C + k] * Wd[v * C + k];
      logits[i * V + v] = z, mx = std::max(mx, z);
    }
    double sum = 0;
    for (int64_t v = 0; v < V; ++v) sum += std::exp(logits[i * V + v] - mx);
    const double lse = mx + std::log(sum);
    ref_logp[i] = logits[i * V + targets[i]] - lse;
    for (int64_t v = 0; v < V; ++v) dlog[i * V + v] = coef[i] * ((v == targets[i]) - std::exp(logits[i * V + v] - lse));
  }
  for (int64_t i = 0; i < n; ++i)
    for (int64_t v = 0; v < V; ++v)
      for (int64_t k = 0; k < C; ++k)
        ref_dH[i * C + k] += dlog[i * V + v] * Wd[v * C + k], ref_dW[v * C + k] += dlog[i * V + v] * Hd[i * C + k];
  auto check = [&](auto tag, double tol) {
    using T = decltype(tag);
    std::vector<T> H(Hd.begin(), Hd.end()), W(Wd.begin(), Wd.end()), scratch(chunk), dH(n * C, T(NAN)), dW(V * C, T(0));
    std::vector<double> logp(n), lse(n);
    cpu::CpuOps<T> ops;
    ops.head_logprobs(logp.data(), lse.data(), H.data(), W.data(), targets.data(), n, C, V, scratch.data(), chunk);
    ops.head_logprobs_backward(dH.data(), dW.data(), H.data(), W.data(), targets.data(), lse.data(), coef.data(), n, C,
                               V, scratch.data(), chunk);
    double e1 = 0, e2 = 0, e3 = 0, m2 = 0, m3 = 0;
    for (int64_t i = 0; i < n; ++i) e1 = std::max(e1, std::fabs(logp[i] - ref_logp[i]));
    for (int64_t i = 0; i < n * C; ++i)
      e2 = std::max(e2, std::fabs(dH[i] - ref_dH[i])), m2 = std::max(m2, std::fabs(ref_dH[i]));
    for (int64_t i = 0; i < V * C; ++i)
      e3 = std::max(e3, std::fabs(dW[i] - ref_dW[i])), m3 = std::max(m3, std::fabs(ref_dW[i]));
    EXPECT_TRUE(e1 <= tol * 10 && e2 <= tol * m2 && e3 <= tol * m3, sizeof(T) * 8 << "-bit: logp err " << e1
                                                                                  << ", dH err " << e2 << "/" << m2
                                                                                  << ", dW err " << e3 << "/" << m3);
  };
  check(double(0), 1e-12);
  check(float(0), 2e-5);  // float logits of magnitude ~10 carry ~1e-6 absolute error
}

SPPO_TEST(preference_gradients_match_finite_differences_through_the_model) {
  ModelConfig c = small_config();
  Example e = mixed_batch(c.vocab_size);
  for (PreferenceLoss loss : kAllLosses) {
    Model<double> m(c, MemoryPlan{e.B, e.T}, std::make_unique<cpu::CpuOps<double>>());
    std::vector<double> ref = {-40, -38.5, -61, -47}, target = {0.8, 0.3, 0.6, 0.45}, seq(e.B);
    const double eta = loss == PreferenceLoss::Dpo ? 0.5 : 3.0;  // keep every term away from saturation
    PreferenceBatch pb{{e.tokens.data(), e.mask.data(), e.B, e.T}, ref.data(), target.data(), loss, eta};
    m.zero_grad();
    m.accumulate_preference_gradients(pb, 1.0, seq.data());
    std::vector<double> grad(m.grad_data(), m.grad_data() + m.num_params());
    int checked = 0;
    for (size_t k = 0; k < m.params().size(); k += 3) {  // every third tensor, two elements each
      const ParamInfo& p = m.params()[k];
      for (int s = 0; s < 2; ++s) {
        const int64_t i = int64_t(uniform01(8, k, s) * p.size);
        const double fd = testutil::central_difference(m.param_data() + p.offset + i, 1e-5,
                                                       [&] { return m.eval_preference(pb, seq.data()).loss; });
        const double an = grad[p.offset + i];
        EXPECT_TRUE(std::fabs(fd - an) <= 1e-6 * std::max(1.0, std::fabs(fd)),
                    preference_loss_name(loss) << " " << p.name << "[" << i << "]: " << an << " vs fd " << fd);
        ++checked;
      }
    }
    EXPECT_TRUE(checked >= 10);
  }
}

SPPO_TEST(at_the_start_of_an_iteration_gradients_take_their_closed_form) {
  // θ = θ_t and ref = log π_t(y|x) from the same model, so Δ = 0 for every sequence.
  ModelConfig c = small_config();
  Example e = mixed_batch(c.vocab_size);
  Batch b{e.tokens.data(), e.mask.data(), e.B, e.T};
  Model<double> m(c, MemoryPlan{e.B, e.T}, std::make_unique<cpu::CpuOps<double>>());
  std::vector<double> ref(e.B), seq(e.B);
  m.sequence_logprobs(b, ref.data(), nullptr);
  // Cross-entropy gradient of the same tokens: -(1/n_tokens) Σ_s ∇logp_s.
  int64_t n_tokens = 0;
  m.zero_grad();
  m.accumulate_gradients(b, 1.0, &n_tokens);
  std::vector<double> ce(m.grad_data(), m.grad_data() + m.num_params());
  // sppo with one P̂ for all: dL/dlogp_s = 2(0 − η(P̂ − ½))/S, so the gradient is
  // (2η(P̂ − ½)·n_tokens/S) times the cross-entropy gradient.
  const double eta = 10, p = 0.8;
  std::vector<double> target(e.B, p);
  PreferenceBatch pb{b, ref.data(), target.data(), PreferenceLoss::Sppo, eta};
  m.zero_grad();
  PreferenceMetrics met = m.accumulate_preference_gradients(pb, 1.0, seq.data());
  for (int s = 0; s < e.B; ++s) EXPECT_NEAR(seq[s], ref[s], 1e-12);
  EXPECT_NEAR(met.loss, std::pow(eta * (p - 0.5), 2), 1e-9);
  const double k = 2 * eta * (p - 0.5) * double(n_tokens) / e.B;
  double worst = 0, scale = 0;
  for (int64_t i = 0; i < m.num_params(); ++i)
    worst = std::max(worst, std::fabs(m.grad_data()[i] - k * ce[i])), scale = std::max(scale, std::fabs(k * ce[i]));
  EXPECT_TRUE(worst <= 1e-10 * scale,
              "sppo gradient differs from its closed form by " << worst << " (scale " << scale << ")");
  // Pair losses on pairs whose chosen and rejected responses are the same sequence: the
  // symmetric ones (dpo, ipo, sppo-hard, and sppo-single at q = ½) have exactly zero gradient.
  std::vector<int32_t> twin(e.tokens);
  std::vector<uint8_t> twin_mask(e.mask);
  for (int t = 0; t < e.T; ++t) twin[1 * e.T + t] = twin[0 * e.T + t], twin_mask[1 * e.T + t] = twin_mask[0 * e.T + t];
  for (int t = 0; t < e.T; ++t) twin[3 * e.T + t] = twin[2 * e.T + t], twin_mask[3 * e.T + t] = twin_mask[2 * e.T + t];
  Batch tb{twin.data(), twin_mask.data(), e.B, e.T};
  m.sequence_logprobs(tb, ref.data(), nullptr);
  std::vector<double> half(e.B, 0.5);
  for (PreferenceLoss loss :
       {PreferenceLoss::Dpo, PreferenceLoss::Ipo, PreferenceLoss::SppoHard, PreferenceLoss::SppoSingle}) {
    PreferenceBatch tp{tb, ref.data(), half.data(), loss, eta};
    m.zero_grad();
    m.accumulate_preference_gradients(tp, 1.0, seq.data());
    double g = 0;
    for (int64_t i = 0; i < m.num_params(); ++i) g = std::max(g, std::fabs(m.grad_data()[i]));
    EXPECT_TRUE(g <= 1e-10 * std::max(1.0, scale), preference_loss_name(loss)
                                                       << " gradient on identical pairs is " << g);
  }
}

SPPO_TEST(sequence_logprobs_sum_the_masked_tokens) {
  ModelConfig c = small_config();
  Example e = mixed_batch(c.vocab_size);
  Model<double> m(c, MemoryPlan{e.B, e.T}, std::make_unique<cpu::CpuOps<double>>());
  std::vector<double> seq(e.B), tok(e.B * e.T), logits(e.B * e.T * c.vocab_size);
  m.sequence_logprobs({e.tokens.data(), e.mask.data(), e.B, e.T}, seq.data(), tok.data());
  m.forward(e.tokens.data(), e.B, e.T, nullptr, logits.data());
  for (int b = 0; b < e.B; ++b) {
    double sum = 0;
    for (int t = 1; t < e.T; ++t) {
      const double* row = &logits[(b * e.T + t - 1) * c.vocab_size];
      double mx = -1e300, z = 0;
      for (int v = 0; v < c.vocab_size; ++v) mx = std::max(mx, row[v]);
      for (int v = 0; v < c.vocab_size; ++v) z += std::exp(row[v] - mx);
      const double lp = row[e.tokens[b * e.T + t]] - mx - std::log(z);
      EXPECT_NEAR(tok[b * e.T + t], e.mask[b * e.T + t] ? lp : 0.0, 1e-12);
      if (e.mask[b * e.T + t]) sum += lp;
    }
    EXPECT_NEAR(seq[b], sum, 1e-12);
    EXPECT_TRUE(seq[b] < 0);
  }
}
