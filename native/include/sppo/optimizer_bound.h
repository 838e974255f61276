// What one optimizer step can do to any element, known from its scalars alone: the guard that lets
// Model::optimizer_step skip the dry run (Ops::adamw_update_finite / rmsprop_update_finite) on
// every ordinary step and run it only where overflow cannot be ruled out.
#pragma once
#include <cstdint>

#include "sppo/config.h"

namespace sppo {

struct UpdateBound {
  // |Δ| ≤ delta for every element, where the update writes w' = w·keep − Δ (Δ the step_size · m /
  // (√v̂ + eps) of AdamW, lr · g / (√sq + eps) of RMSprop), in the backend's arithmetic; +inf
  // where no bound is known.
  double delta = 0;
  // True when the step provably writes only finite values (moments, master weights, parameters);
  // false means "not known", never "will overflow": the caller runs the dry run then.
  bool finite = false;
};

// The bound for the optimizer step number `step` (1-based: the step about to be taken) of `oc`'s
// kind and constants, with learning rate `lr`, weight-decay factor `decay` (lr · weight_decay, the
// larger of the two regions') and `grad_peak` ≥ every |g·gscale| this step and every earlier
// step since set_optimizer fed to the optimizer state. `M` is the precision the update computes
// in (Master: float for the float and bf16 backends, double for the double one): its constants
// are rounded to M as the kernels round them. The derivation is at its definition
// (model/optimizer.cpp); native/tests/optimizer_test.cpp checks it on random and adversarial
// gradient sequences.
template <class M>
UpdateBound optimizer_update_bound(const OptimizerConfig& oc, double lr, double decay, double grad_peak, int64_t step);

}  // namespace sppo
