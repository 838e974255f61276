// Training steps: gradient accumulation, global-norm clipping, and the AdamW / RMSprop updates
// with the learning-rate schedule (OptimizerConfig::lr_at).
#include <cmath>

#include "core/error.h"
#include "sppo/model.h"

namespace sppo {

template <class T>
void Model<T>::set_optimizer(const OptimizerConfig& oc) {
  oc.validate();
  // State is allocated here, once, never in the step loop.
  if (!opt_m_) opt_m_ = alloc_tracked<Master>(n_params_, &mem_.optimizer);
  if (oc.kind == OptimizerConfig::Kind::AdamW && !opt_v_) opt_v_ = alloc_tracked<Master>(n_params_, &mem_.optimizer);
  ops_->zero_bytes(opt_m_, size_t(n_params_) * sizeof(Master));
  if (opt_v_) ops_->zero_bytes(opt_v_, size_t(n_params_) * sizeof(Master));
  opt_ = oc;
  step_ = 0;
  micro_ = 0;
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
  const double norm = std::sqrt(ops_->sum_squares(grads_arena_, n_params_));
  if (!std::isfinite(norm)) {
    zero_grad();
    throw Error("the gradient norm is not finite; the optimizer step was skipped and parameters are unchanged");
  }
  const double clip = opt_.max_grad_norm > 0 && norm > opt_.max_grad_norm ? opt_.max_grad_norm / (norm + 1e-6) : 1.0;
  const double lr = opt_.lr_at(step_);
  ++step_;
  // Two calls cover the arena: the region of matrices (weight decay) and that of norms and biases
  // (build_param_table lays them out so); alignment padding between tensors stays zero (its
  // gradient and state are zero, and decay keeps zero at zero).
  const int64_t region_at[2] = {0, decay_elems_}, region_n[2] = {decay_elems_, n_params_ - decay_elems_};
  for (int r = 0; r < 2; ++r) {
    const int64_t at = region_at[r], n = region_n[r];
    const double decay = r == 0 ? lr * opt_.weight_decay : 0.0;
    T* w = params_arena_ + at;
    Master* mw = master_ ? master_ + at : nullptr;
    const Master* g = grads_arena_ + at;
    if (opt_.kind == OptimizerConfig::Kind::AdamW)
      ops_->adamw_update(w, mw, g, opt_m_ + at, opt_v_ + at, n, lr, opt_.beta1, opt_.beta2, opt_.eps, decay, clip,
                         step_);
    else
      ops_->rmsprop_update(w, mw, g, opt_m_ + at, n, lr, opt_.alpha, opt_.eps, decay, clip);
  }
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
