// Training steps: gradient accumulation, global-norm clipping, and the AdamW / RMSprop updates
// with the learning-rate schedule (OptimizerConfig::lr_at).
#include <algorithm>
#include <cmath>
#include <limits>

#include "core/error.h"
#include "sppo/model.h"
#include "sppo/optimizer_bound.h"

namespace sppo {

// ---- The update bound (sppo/optimizer_bound.h) ----
//
// Both updates write w' = w·keep − Δ per element, with g the clipped gradient (|g| ≤ P =
// grad_peak) and the constants rounded to M as the kernels round them:
//   AdamW:   m' = b1·m + (1−b1)·g,  v' = b2·v + (1−b2)·g²,  Δ = s·m' / (c·√v' + e),
//            s = lr / (1 − β1^t),  c = 1 / √(1 − β2^t);
//   RMSprop: sq' = a·sq + (1−a)·g²,  Δ = s·g / (√sq' + e),  s = lr,  c = 1.
// K bounds |numerator| / √(second moment):
//   RMSprop: sq' ≥ (1−a)·g², so |g| / √sq' ≤ 1/√(1−a) =: K.
//   AdamW: from m = v = 0 at set_optimizer, m_t = Σ_k (1−b1)·b1^(t−k)·g_k and
//     v_t = Σ_k (1−b2)·b2^(t−k)·g_k². Splitting b1^(t−k) = (b1/√b2)^(t−k) · √b2^(t−k), Cauchy–Schwarz gives
//     |m_t| ≤ (1−b1)·√S_t·√(v_t / (1−b2)),  S_t = Σ_{j<t} γ^j,  γ = b1²/b2,
//     so K := (1−b1)·√(S_t / (1−b2)), S_t = (γ^t − 1)/(γ − 1) → 1/(1−γ) for γ < 1 (for γ ≥ 1 it
//     still holds, growing with t). b2 = 0 leaves K = 1 when b1 = 0 and no bound otherwise.
//   Then |Δ| ≤ s·K/c: lr at t = 1, about 7.3·lr in the long run for the default betas.
// Float arithmetic. Rounding (ε = 2^-24 a product) acts in the recursions like b1 → b1·(1+ε)²,
// b2 → b2·(1−ε)²: γ is taken 8ε larger. Underflow loses at most
// 2^-126 an operation (flush-to-zero included), four a step; with b1, b2 ≤ 1 − 2^-17 the
// recursions contract, so m and v carry at most U = 2^-106 of it. Where v' ≥ 2^-90, that is a
// relative 2^-17 on √v' and at most 2^-61/c on |m'| / (c·√v'); where v' < 2^-90, |m'| ≤
// K·2^-44 + U while the denominator is at least e. With the rounding of Δ's own operations,
//   |Δ| ≤ (1 + 2^-16)·s·[K/c + 2^-61/c + (K·2^-44 + 2^-106)/e].
// The moments are also convex combinations of the gradients, |m'| ≤ 1.05·P + U (RMSprop's
// numerator is g itself), which gives |Δ| ≤ s·(1.06·P + 2^-105)/e; delta is the smaller bound.
// Both are bounds on the exact value of the float expression: one beyond FLT_MAX allows it to
// overflow.
//
// Finite: P ≤ 1e15 keeps g², v and sq below 1.1e30; s·(1.06·P + 1) ≤ 1e30 keeps s and s·m'
// finite; decay ≤ 2 keeps |keep| ≤ 1, so |w·keep| ≤ |w|; |Δ| ≤ 1e30, below half an ulp of FLT_MAX
// (2^103 ≈ 1.0e31), cannot take a finite w·keep past FLT_MAX; e > 0 rules out 0/0. Where any of
// these fails, the step's dry run decides. (A bf16 parameter overflows from |w'| > 3.39e38, which
// a finite master weight reaches only by starting within 1e30 of that.)
template <class M>
UpdateBound optimizer_update_bound(const OptimizerConfig& oc, double lr, double decay, double grad_peak, int64_t step) {
  constexpr double kInf = std::numeric_limits<double>::infinity();
  constexpr double kLimit = 1e30;
  constexpr double kEps = 0x1p-24;
  const auto rounded = [](double x) { return double(M(x)); };
  const double t = double(step), P = grad_peak, e = rounded(oc.eps);
  const bool adam = oc.kind == OptimizerConfig::Kind::AdamW;
  double s, c = 1, K;
  bool contracting = true;  // the recursions' underflow stays below U
  if (adam) {
    const double b1 = rounded(oc.beta1), b2 = rounded(oc.beta2);
    s = rounded(lr / (1.0 - std::pow(oc.beta1, t)));
    c = rounded(1.0 / std::sqrt(1.0 - std::pow(oc.beta2, t)));
    contracting = b1 <= 1 - 0x1p-17 && b2 <= 1 - 0x1p-17;
    if (b1 == 1) {
      K = 0;  // 1 − b1 = 0: m never leaves 0
    } else if (b2 == 0) {
      K = b1 == 0 ? 1 : kInf;
    } else {
      const double gamma = b1 * b1 / b2 * (1 + 8 * kEps);
      const double S = gamma == 1 ? t : std::expm1(t * std::log(gamma)) / (gamma - 1);  // Σ_{j<t} γ^j
      K = (1 - b1) * std::sqrt(S / (1 - b2));
    }
  } else {
    s = rounded(lr);
    const double a = rounded(oc.alpha);
    K = 1 / std::sqrt(1 - a);
  }
  const double cs = (1 + 0x1p-16) * s * (K / c + 0x1p-61 / c + (K * 0x1p-44 + 0x1p-106) / e);
  const double convex = s * (1.06 * P + 0x1p-105) / e;
  UpdateBound b;
  b.delta = contracting ? std::min(std::isnan(cs) ? kInf : cs, std::isnan(convex) ? kInf : convex) : kInf;
  b.finite = contracting && e > 0 && P <= 1e15 && s * (1.06 * P + 1) <= kLimit && b.delta <= kLimit && decay >= 0 &&
             decay <= 2;
  return b;
}

template UpdateBound optimizer_update_bound<float>(const OptimizerConfig&, double, double, double, int64_t);
template UpdateBound optimizer_update_bound<double>(const OptimizerConfig&, double, double, double, int64_t);

template <class T>
void Model<T>::set_optimizer(const OptimizerConfig& oc) {
  oc.validate();
  // State is allocated here, once, never in the step loop, for the trainable region alone.
  const int64_t n = num_trainable();
  if (!opt_m_) opt_m_ = alloc_tracked<Master>(n, &mem_.optimizer);
  if (oc.kind == OptimizerConfig::Kind::AdamW && !opt_v_) opt_v_ = alloc_tracked<Master>(n, &mem_.optimizer);
  ops_->zero_bytes(opt_m_, size_t(n) * sizeof(Master));
  if (opt_v_) ops_->zero_bytes(opt_v_, size_t(n) * sizeof(Master));
  opt_ = oc;
  step_ = 0;
  micro_ = 0;
  grad_peak_ = 0;
  zero_grad();
}

template <class T>
template <class Accumulate>
StepResult Model<T>::micro_step(Accumulate&& accumulate) {
  SPPO_REQUIRE(opt_m_ != nullptr, "no optimizer: call setOptimizer before training");
  StepResult r;
  try {
    r.loss = accumulate(1.0 / opt_.grad_accum_steps, &r.target_tokens);
    SPPO_REQUIRE(std::isfinite(r.loss), "the training loss is not finite (", r.loss,
                 "); accumulated gradients were discarded and parameters are unchanged");
  } catch (...) {
    // A failed micro-batch must not leave half-accumulated gradients behind.
    zero_grad();
    micro_ = 0;
    throw;
  }
  if (++micro_ == opt_.grad_accum_steps) {
    StepResult s = optimizer_step();
    r.stepped = true;
    r.lr = s.lr;
    r.grad_norm = s.grad_norm;
  }
  r.step = step_;
  return r;
}

template <class T>
StepResult Model<T>::train_step(const Batch& b) {
  return micro_step([&](double scale, int64_t* tokens) { return accumulate_gradients(b, scale, tokens); });
}

template <class T>
PreferenceStepResult Model<T>::preference_step(const PreferenceBatch& pb, double* seq_logp) {
  PreferenceStepResult out;
  out.step = micro_step([&](double scale, int64_t* tokens) {
    out.metrics = accumulate_preference_gradients(pb, scale, seq_logp);
    *tokens = 0;
    const Batch& b = pb.seqs;
    for (int64_t i = 0; i < b.batch * b.seq; ++i) *tokens += (i % b.seq > 0) && (!b.target_mask || b.target_mask[i]);
    return out.metrics.loss;
  });
  return out;
}

template <class T>
StepResult Model<T>::optimizer_step() {
  StepResult r;
  micro_ = 0;
  // The global norm of the trainable parameters' gradients: with LoRA, the adapters' alone.
  const double norm = std::sqrt(grads16_ ? ops_->sum_squares(grads16_, num_trainable())
                                         : ops_->sum_squares(grads_arena_, num_trainable()));
  if (!std::isfinite(norm)) {
    zero_grad();
    throw Error("the gradient norm is not finite; the optimizer step was skipped and parameters are unchanged");
  }
  const double clip = opt_.max_grad_norm > 0 && norm > opt_.max_grad_norm ? opt_.max_grad_norm / (norm + 1e-6) : 1.0;
  const double lr = opt_.lr_at(step_);
  const int64_t step = step_ + 1;  // 1-based, as the bias correction counts
  const bool adam = opt_.kind == OptimizerConfig::Kind::AdamW;
  // Two calls cover the trainable region: its matrices (weight decay) and its norms and biases
  // (build_param_table lays them out so; with LoRA the second is empty); alignment padding
  // between tensors stays zero (its gradient and state are zero, and decay keeps zero at zero).
  // Offsets below are into the trainable region, where master weights, gradients and state live.
  const int64_t region_at[2] = {0, decay_end_ - train_off_},
                region_n[2] = {decay_end_ - train_off_, n_params_ - decay_end_};
  const double region_decay[2] = {lr * opt_.weight_decay, 0.0};
  // |g·clip| ≤ norm·clip for every element (rounding of the clip factor aside, 1e-6 covers it).
  const double peak = std::max(grad_peak_, norm * clip * (1 + 1e-6));
  // The same passes over either gradient buffer (G: Master, or bf16).
  const auto dry_run = [&](const auto* grads) {
    for (int r = 0; r < 2; ++r) {
      const int64_t at = region_at[r], n = region_n[r];
      if (n == 0) continue;
      const T* w = params_arena_ + train_off_ + at;
      const Master* mw = master_ ? master_ + at : nullptr;
      const auto* g = grads + at;
      const bool finite =
          adam ? ops_->adamw_update_finite(w, mw, g, opt_m_ + at, opt_v_ + at, n, lr, opt_.beta1, opt_.beta2, opt_.eps,
                                           region_decay[r], clip, step)
               : ops_->rmsprop_update_finite(w, mw, g, opt_m_ + at, n, lr, opt_.alpha, opt_.eps, region_decay[r], clip);
      if (!finite) {
        zero_grad();
        throw Error(detail::concat("the optimizer step would write non-finite parameters or optimizer state (its ",
                                   "update with lr ", lr, " and gradient norm ", norm, " overflows); the step was ",
                                   "skipped and parameters, optimizer state and step count are unchanged"));
      }
    }
  };
  const auto update = [&](const auto* grads) {
    for (int r = 0; r < 2; ++r) {
      const int64_t at = region_at[r], n = region_n[r];
      if (n == 0) continue;
      T* w = params_arena_ + train_off_ + at;
      Master* mw = master_ ? master_ + at : nullptr;
      const auto* g = grads + at;
      if (adam)
        ops_->adamw_update(w, mw, g, opt_m_ + at, opt_v_ + at, n, lr, opt_.beta1, opt_.beta2, opt_.eps, region_decay[r],
                           clip, step);
      else
        ops_->rmsprop_update(w, mw, g, opt_m_ + at, n, lr, opt_.alpha, opt_.eps, region_decay[r], clip);
    }
  };
  // The scalars cannot rule overflow out: a dry run over every element decides, before anything
  // is written.
  const bool bounded = optimizer_update_bound<Master>(opt_, lr, region_decay[0], peak, step).finite;
  if (grads16_) {
    if (!bounded) dry_run(static_cast<const bf16*>(grads16_));
    update(static_cast<const bf16*>(grads16_));
  } else {
    if (!bounded) dry_run(static_cast<const Master*>(grads_arena_));
    update(static_cast<const Master*>(grads_arena_));
  }
  step_ = step;
  grad_peak_ = peak;
  zero_grad();
  ops_->synchronize();  // a generator (its own op set) may read the weights next
  r.stepped = true;
  r.step = step_;
  r.lr = lr;
  r.grad_norm = norm;
  return r;
}

// The class itself is instantiated in model.cpp; these are the members defined here.
#define SPPO_INSTANTIATE(T)                                                                 \
  template void Model<T>::set_optimizer(const OptimizerConfig&);                            \
  template StepResult Model<T>::train_step(const Batch&);                                   \
  template PreferenceStepResult Model<T>::preference_step(const PreferenceBatch&, double*); \
  template StepResult Model<T>::optimizer_step();
SPPO_INSTANTIATE(float)
SPPO_INSTANTIATE(double)
SPPO_INSTANTIATE(bf16)
#undef SPPO_INSTANTIATE

}  // namespace sppo
