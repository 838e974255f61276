// Optimizer steps that would overflow: the scalar bound that lets ordinary steps skip the dry run
// (sppo/optimizer_bound.h) checked against the CPU updates on random and adversarial gradient
// sequences, the dry runs against the updates, and the model refusing an overflowing step with
// its parameters, master weights, optimizer state and step count unchanged.
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "core/rng.h"
#include "cpu/cpu_ops.h"
#include "sppo/model.h"
#include "sppo/optimizer_bound.h"
#include "tests/cuda_test_util.h"
#include "tests/harness.h"

using namespace sppo;

namespace {

OptimizerConfig adamw(double beta1, double beta2, double eps) {
  OptimizerConfig oc;
  oc.kind = OptimizerConfig::Kind::AdamW;
  oc.lr = 1, oc.beta1 = beta1, oc.beta2 = beta2, oc.eps = eps;
  return oc;
}

OptimizerConfig rmsprop(double alpha, double eps) {
  OptimizerConfig oc;
  oc.kind = OptimizerConfig::Kind::RMSprop;
  oc.lr = 1, oc.alpha = alpha, oc.eps = eps;
  return oc;
}

std::string describe(const OptimizerConfig& oc) {
  std::ostringstream os;
  if (oc.kind == OptimizerConfig::Kind::AdamW)
    os << "adamw beta1 " << oc.beta1 << " beta2 " << oc.beta2;
  else
    os << "rmsprop alpha " << oc.alpha;
  os << " eps " << oc.eps;
  return os.str();
}

// The gradient of element i at step t (1-based), before the clip factor.
using GradientSequence = std::function<double(int64_t t, int64_t i)>;

struct BoundCheck {
  double worst_ratio = 0;  // the largest |Δ| / delta seen
};

// `steps` updates of `oc` (lr 1, no decay) on n elements, as Model::optimizer_step makes them: at
// every step, each written weight (from w = 0, so it is −Δ exactly) stays within the bound's
// delta, and a step the bound calls finite writes only finite values.
template <class T>
BoundCheck check_bound(const OptimizerConfig& oc, int64_t steps, int64_t n, const GradientSequence& grad,
                       const std::string& what) {
  cpu::CpuOps<T> ops;
  std::vector<T> w(n), m(n, T(0)), v(n, T(0)), g(n);
  double peak = 0;
  BoundCheck out;
  for (int64_t t = 1; t <= steps; ++t) {
    // (the sequence that attains Cauchy–Schwarz keeps it only unclipped)
    const double clip = what == "cauchy-schwarz" ? 1.0 : 0.25 + 0.75 * uniform01(7, uint64_t(t), 0);
    for (int64_t i = 0; i < n; ++i) {
      g[i] = T(grad(t, i));
      peak = std::max(peak, std::fabs(double(g[i])) * clip * (1 + 1e-6));
    }
    const UpdateBound b = optimizer_update_bound<T>(oc, oc.lr, 0.0, peak, t);
    std::fill(w.begin(), w.end(), T(0));
    if (oc.kind == OptimizerConfig::Kind::AdamW)
      ops.adamw_update(w.data(), nullptr, g.data(), m.data(), v.data(), n, oc.lr, oc.beta1, oc.beta2, oc.eps, 0.0, clip,
                       t);
    else
      ops.rmsprop_update(w.data(), nullptr, g.data(), m.data(), n, oc.lr, oc.alpha, oc.eps, 0.0, clip);
    for (int64_t i = 0; i < n; ++i) {
      const double delta = std::fabs(double(w[i]));
      // (a bound beyond the float range allows the float result to overflow)
      EXPECT_TRUE(delta <= b.delta || b.delta >= double(std::numeric_limits<T>::max()),
                  describe(oc) << ", " << what << ": step " << t << " element " << i << " moved by " << delta
                               << ", beyond the bound " << b.delta);
      if (b.finite)
        EXPECT_TRUE(std::isfinite(double(w[i])) && std::isfinite(double(m[i])) && std::isfinite(double(v[i])),
                    describe(oc) << ", " << what << ": step " << t << " wrote a non-finite value the bound ruled out");
      if (b.delta > 0 && std::isfinite(b.delta)) out.worst_ratio = std::max(out.worst_ratio, delta / b.delta);
    }
  }
  return out;
}

// Gradient sequences: ordinary, wildly scaled (underflow to 1e-40 and up to 1e12), a spike then
// silence, alternating signs, and for AdamW the sequence that makes Cauchy–Schwarz an equality
// (|g_k| growing as (b2/b1)^k), where the bound must be nearly reached.
std::vector<std::pair<std::string, GradientSequence>> sequences(const OptimizerConfig& oc) {
  std::vector<std::pair<std::string, GradientSequence>> s;
  s.push_back({"normal", [](int64_t t, int64_t i) { return standard_normal(11, uint64_t(t), uint64_t(i)); }});
  s.push_back({"scaled", [](int64_t t, int64_t i) {
                 const double scale = std::pow(10.0, -40 + 52 * uniform01(12, uint64_t(t), 0));
                 return scale * standard_normal(13, uint64_t(t), uint64_t(i)) * (i % 7 == 0 ? 0.0 : 1.0);
               }});
  s.push_back({"per-element scales", [](int64_t t, int64_t i) {
                 return std::pow(10.0, -45 + 50 * uniform01(14, uint64_t(i), 0)) *
                        standard_normal(15, uint64_t(t), uint64_t(i));
               }});
  s.push_back({"spike then tiny", [](int64_t t, int64_t i) { return (t == 1 ? 1e6 : 1e-30) * (i % 2 ? 1 : -1); }});
  s.push_back({"alternating", [](int64_t t, int64_t i) { return (t % 2 ? 1.0 : -1.0) * (1 + 0.01 * double(i)); }});
  if (oc.kind == OptimizerConfig::Kind::AdamW && oc.beta1 > 0 && oc.beta2 > 0) {
    const double ratio = double(float(oc.beta2)) / double(float(oc.beta1));
    s.push_back({"cauchy-schwarz",
                 [ratio](int64_t t, int64_t i) { return std::pow(ratio, double(t) - 60) * (1 + 1e-3 * double(i)); }});
  }
  return s;
}

template <class T>
std::unique_ptr<Model<T>> make_model(int max_batch, int max_seq) {
  ModelConfig c;
  c.vocab_size = 19, c.hidden_size = 12, c.num_hidden_layers = 2, c.num_attention_heads = 3;
  c.intermediate_size = 14, c.max_position_embeddings = 64;
  c.initializer_range = 0.3, c.seed = 5;
  return std::make_unique<Model<T>>(c, MemoryPlan{max_batch, max_seq}, std::make_unique<cpu::CpuOps<T>>());
}

std::vector<int32_t> tokens(int64_t n, uint64_t seed) {
  std::vector<int32_t> t(n);
  for (int64_t i = 0; i < n; ++i) t[i] = int32_t(uniform01(seed, 1, uint64_t(i)) * 19);
  return t;
}

template <class T>
std::vector<T> params_of(Model<T>& m) {
  return std::vector<T>(m.param_data(), m.param_data() + m.num_params());
}

}  // namespace

SPPO_TEST(optimizer_bound_holds_on_random_and_adversarial_gradients) {
  std::vector<OptimizerConfig> configs;
  for (double eps : {1e-8, 1e-30, 1.0}) {
    for (double b1 : {0.0, 0.5, 0.9, 0.99})
      for (double b2 : {0.0, 0.5, 0.9, 0.999, 0.99999}) configs.push_back(adamw(b1, b2, eps));
    for (double a : {0.0, 0.5, 0.9, 0.99, 0.9999}) configs.push_back(rmsprop(a, eps));
  }
  for (const OptimizerConfig& oc : configs)
    for (const auto& [what, grad] : sequences(oc)) {
      const BoundCheck r = check_bound<float>(oc, 60, 64, grad, what);
      // Where the sequence attains Cauchy–Schwarz, the bound is close to the truth.
      if (what == "cauchy-schwarz" && oc.eps == 1e-8 && oc.beta2 >= 0.9)
        EXPECT_TRUE(r.worst_ratio > 0.9, describe(oc) << ": the largest step reached only " << r.worst_ratio
                                                      << " of the bound on the sequence that attains it");
    }
  // The double backend's own rounding.
  for (const OptimizerConfig& oc : {adamw(0.9, 0.999, 1e-8), rmsprop(0.99, 1e-8), adamw(0.5, 0.9, 1e-30)})
    for (const auto& [what, grad] : sequences(oc)) check_bound<double>(oc, 60, 16, grad, what);
  // A long run of the default AdamW: the bound settles at (1−β1)/√((1−β2)(1−β1²/β2)) ≈ 7.3.
  check_bound<float>(
      adamw(0.9, 0.999, 1e-8), 3000, 8,
      [](int64_t t, int64_t i) { return standard_normal(21, uint64_t(t), uint64_t(i)); }, "long run");
}

SPPO_TEST(optimizer_bound_clears_ordinary_steps_and_refers_extreme_ones_to_the_dry_run) {
  const OptimizerConfig adam = adamw(0.9, 0.999, 1e-8), rms = rmsprop(0.99, 1e-8);
  // Ordinary steps never need the dry run.
  for (int64_t t : {1, 2, 10, 1000, 1000000})
    for (double lr : {1e-6, 1e-3, 1.0})
      for (double peak : {0.0, 1e-3, 1.0, 1e6}) {
        EXPECT_TRUE((optimizer_update_bound<float>(adam, lr, lr * 0.01, peak, t).finite), "adamw t " << t);
        EXPECT_TRUE((optimizer_update_bound<float>(rms, lr, lr * 0.01, peak, t).finite), "rmsprop t " << t);
      }
  // AdamW's first step moves each weight by lr at most; later ones by ≈ 7.3·lr at most.
  EXPECT_TRUE((optimizer_update_bound<float>(adam, 1.0, 0.0, 1.0, 1).delta < 1.001));
  const double settled = 0.1 / std::sqrt(0.001 * (1 - 0.81 / 0.999));
  EXPECT_NEAR((optimizer_update_bound<float>(adam, 1.0, 0.0, 1.0, 1000000).delta), settled, 1e-3 * settled);
  EXPECT_NEAR((optimizer_update_bound<float>(rms, 1.0, 0.0, 1.0, 5).delta), 10.0, 1e-3);
  // Overflowing learning rates, huge gradients, growing decay and float-rounded betas of 1 are not
  // cleared: the dry run decides.
  EXPECT_TRUE(!(optimizer_update_bound<float>(adam, 3e38, 0.0, 1.0, 1).finite));
  EXPECT_TRUE(!(optimizer_update_bound<float>(rms, 3e38, 0.0, 1.0, 1).finite));
  EXPECT_TRUE(!(optimizer_update_bound<float>(adam, 1e-3, 0.0, 1e20, 1).finite));
  EXPECT_TRUE(!(optimizer_update_bound<float>(adam, 1e-3, 2.5, 1.0, 1).finite));
  EXPECT_TRUE(!(optimizer_update_bound<float>(adamw(0.9, 0.999999999, 1e-8), 1e-3, 0.0, 1.0, 3).finite));
  EXPECT_TRUE(!(optimizer_update_bound<float>(adamw(0.9, 0.999, 1e-50), 1e-3, 0.0, 1.0, 3).finite));
}

// The dry runs read and write nothing but say exactly whether the update writes a non-finite value.
SPPO_TEST(optimizer_dry_runs_agree_with_the_updates_and_write_nothing) {
  cpu::CpuOps<float> ops;
  const int64_t n = 40000;  // several parallel chunks
  std::vector<float> w0(n), g(n), m0(n), v0(n);
  for (int64_t i = 0; i < n; ++i) {
    w0[i] = float(standard_normal(31, 0, uint64_t(i)));
    g[i] = float(standard_normal(32, 0, uint64_t(i)));
    m0[i] = float(0.1 * standard_normal(33, 0, uint64_t(i)));
    v0[i] = float(0.01 * uniform01(34, 0, uint64_t(i)));
  }
  g[size_t(n - 1)] = 1e4f;  // one large gradient decides the borderline learning rates
  for (bool adam : {true, false})
    for (bool with_master : {true, false})
      for (double lr : {1e-3, 1e30, 1e33, 3e38, 1e39}) {
        std::vector<float> w = w0, master = w0, m = m0, v = v0;
        float* mw = with_master ? master.data() : nullptr;
        const bool said =
            adam ? ops.adamw_update_finite(w.data(), mw, g.data(), m.data(), v.data(), n, lr, 0.9, 0.999, 1e-8,
                                           lr * 1e-40, 0.5, 3)
                 : ops.rmsprop_update_finite(w.data(), mw, g.data(), v.data(), n, lr, 0.99, 1e-8, lr * 1e-40, 0.5);
        EXPECT_TRUE(w == w0 && master == w0 && m == m0 && v == v0, "the dry run wrote");
        if (adam)
          ops.adamw_update(w.data(), mw, g.data(), m.data(), v.data(), n, lr, 0.9, 0.999, 1e-8, lr * 1e-40, 0.5, 3);
        else
          ops.rmsprop_update(w.data(), mw, g.data(), v.data(), n, lr, 0.99, 1e-8, lr * 1e-40, 0.5);  // sq ≥ 0
        bool finite = true;
        for (int64_t i = 0; i < n; ++i)
          finite &= std::isfinite(w[i]) && std::isfinite(master[i]) && std::isfinite(m[i]) && std::isfinite(v[i]);
        EXPECT_TRUE(said == finite, (adam ? "adamw" : "rmsprop")
                                        << " lr " << lr << ": the dry run said " << (said ? "finite" : "non-finite"));
        if (lr == 1e-3) EXPECT_TRUE(said, (adam ? "adamw" : "rmsprop") << ": an ordinary step");
        if (lr >= 3e38) EXPECT_TRUE(!said, "lr " << lr << " overflows");
      }
}

// lr = 3e38 is a finite double and float, but the update overflows float32: the step must fail
// with the model exactly as it was, for both optimizers; a normal lr afterwards trains as usual.
SPPO_TEST(an_lr_that_overflows_float32_fails_the_step_and_changes_nothing) {
  const auto t = tokens(2 * 8, 3);
  const Batch batch{t.data(), nullptr, 2, 8};
  for (auto kind : {OptimizerConfig::Kind::AdamW, OptimizerConfig::Kind::RMSprop}) {
    auto m = make_model<float>(2, 8);
    OptimizerConfig oc;
    oc.kind = kind;
    oc.lr = 3e38;
    oc.weight_decay = 0.01;
    oc.grad_accum_steps = 2;
    m->set_optimizer(oc);
    const auto before = params_of(*m);
    EXPECT_TRUE(!m->train_step(batch).stepped);  // the first micro-batch only accumulates
    EXPECT_THROWS_WITH(m->train_step(batch), "the optimizer step would write non-finite parameters");
    EXPECT_TRUE(params_of(*m) == before, "a refused step changed the parameters");
    EXPECT_TRUE(m->optimizer_steps() == 0 && m->pending_micro_batches() == 0);
    for (int64_t i = 0; i < m->num_params(); ++i) EXPECT_TRUE(m->grad_data()[i] == 0.0f, "gradients were kept");
    oc.lr = 1e-2;
    m->set_optimizer(oc);
    m->train_step(batch);
    const StepResult r = m->train_step(batch);
    EXPECT_TRUE(r.stepped && r.step == 1);
    EXPECT_TRUE(params_of(*m) != before, "the normal step did not train");
  }
}

// The optimizer state is untouched by a refused step: a model whose second step is refused (its
// gradients overflow float32 when squared) continues exactly like one that never saw that step.
SPPO_TEST(a_refused_step_leaves_the_optimizer_state_as_it_was) {
  const auto t1 = tokens(2 * 8, 4), t2 = tokens(2 * 8, 5);
  const Batch b1{t1.data(), nullptr, 2, 8}, b2{t2.data(), nullptr, 2, 8};
  for (auto kind : {OptimizerConfig::Kind::AdamW, OptimizerConfig::Kind::RMSprop}) {
    OptimizerConfig oc;
    oc.kind = kind;
    oc.lr = 1e-2;
    oc.weight_decay = 0.1;
    auto refused = make_model<float>(2, 8), plain = make_model<float>(2, 8);
    refused->set_optimizer(oc);
    plain->set_optimizer(oc);
    refused->train_step(b1);
    plain->train_step(b1);
    const auto after_one = params_of(*refused);
    for (int64_t i = 0; i < refused->num_params(); ++i) refused->grad_data()[i] = i % 3 ? 1e25f : -1e25f;
    EXPECT_THROWS_WITH(refused->optimizer_step(), "the optimizer step would write non-finite");
    EXPECT_TRUE(params_of(*refused) == after_one && refused->optimizer_steps() == 1);
    refused->train_step(b2);
    plain->train_step(b2);
    EXPECT_TRUE(params_of(*refused) == params_of(*plain),
                "after a refused step the model trains differently: its optimizer state changed");
  }
}

// The CUDA dry runs against the CUDA updates (bf16 parameters, with and without float master
// weights): the same verdict, nothing written.
SPPO_TEST(cuda_optimizer_dry_runs_agree_with_the_updates_and_write_nothing) {
  using namespace sppo::testutil;
  auto ops = cuda_or_skip();
  const int64_t n = 100003;
  const auto p0 = randn_bf16(n, 41);
  std::vector<float> g(n), m0(n), v0(n);
  for (int64_t i = 0; i < n; ++i) {
    g[i] = float(standard_normal(42, 0, uint64_t(i)));
    m0[i] = float(0.1 * standard_normal(43, 0, uint64_t(i)));
    v0[i] = float(0.01 * uniform01(44, 0, uint64_t(i)));
  }
  g[n - 1] = 1e4f;
  DeviceArray<bf16> d_p(*ops, n);
  DeviceArray<float> d_master(*ops, n), d_g(*ops, n), d_m(*ops, n), d_v(*ops, n);
  d_g.put(g);
  const auto bits = [](const DeviceArray<bf16>& d) {
    std::vector<uint16_t> b(size_t(d.size()));
    d.ops().download_bytes(b.data(), d.data(), b.size() * sizeof(uint16_t));
    return b;
  };
  for (bool adam : {true, false})
    for (bool with_master : {true, false})
      for (double lr : {1e-3, 1e30, 1e33, 3e38, 1e39}) {
        d_p.ops().upload(d_p.data(), p0.data(), n);
        d_master.put(p0);
        d_m.put(m0);
        d_v.put(v0);
        const auto p_before = bits(d_p);
        float* mw = with_master ? d_master.data() : nullptr;
        const bool said = adam ? ops->adamw_update_finite(d_p.data(), mw, d_g.data(), d_m.data(), d_v.data(), n, lr,
                                                          0.9, 0.999, 1e-8, lr * 1e-40, 0.5, 3)
                               : ops->rmsprop_update_finite(d_p.data(), mw, d_g.data(), d_v.data(), n, lr, 0.99, 1e-8,
                                                            lr * 1e-40, 0.5);
        EXPECT_TRUE(bits(d_p) == p_before && d_master.get() == p0 && d_m.get() == m0 && d_v.get() == v0,
                    "the dry run wrote");
        if (adam)
          ops->adamw_update(d_p.data(), mw, d_g.data(), d_m.data(), d_v.data(), n, lr, 0.9, 0.999, 1e-8, lr * 1e-40,
                            0.5, 3);
        else
          ops->rmsprop_update(d_p.data(), mw, d_g.data(), d_v.data(), n, lr, 0.99, 1e-8, lr * 1e-40, 0.5);
        std::vector<float> p(n);
        ops->download(p.data(), d_p.data(), n);
        const auto master = d_master.get(), m = d_m.get(), v = d_v.get();
        bool finite = true;
        for (int64_t i = 0; i < n; ++i)
          finite &= std::isfinite(p[i]) && std::isfinite(master[i]) && std::isfinite(m[i]) && std::isfinite(v[i]);
        EXPECT_TRUE(said == finite, (adam ? "adamw" : "rmsprop")
                                        << " lr " << lr << ": the dry run said " << (said ? "finite" : "non-finite"));
        if (lr == 1e-3) EXPECT_TRUE(said, (adam ? "adamw" : "rmsprop") << ": an ordinary step");
        if (lr >= 3e38) EXPECT_TRUE(!said, "lr " << lr << " overflows");
      }
}
