// The SPPO family of preference losses and the DPO / IPO baselines, on per-sequence log-probs
// (formulas in docs/algorithm.md). Host-side double math over a handful of sequences, so
// every backend shares this one definition.
#pragma once
#include <cstdint>
#include <string>

namespace sppo {

enum class PreferenceLoss { Sppo, SppoPair, SppoSingle, SppoHard, Dpo, Ipo };
// Every loss, in the order the addon exports their names (lib/engine/losses.ts lists the same).
inline constexpr PreferenceLoss kPreferenceLosses[] = {PreferenceLoss::Sppo,       PreferenceLoss::SppoPair,
                                                       PreferenceLoss::SppoSingle, PreferenceLoss::SppoHard,
                                                       PreferenceLoss::Dpo,        PreferenceLoss::Ipo};

// The loss named preference_loss_name(loss); throws sppo::Error naming the known ones otherwise.
PreferenceLoss parse_preference_loss(const std::string& name);
const char* preference_loss_name(PreferenceLoss loss);
// Every loss but `sppo` works on (chosen, rejected) pairs: sequences 2k and 2k+1.
bool is_pair_loss(PreferenceLoss loss);

// TRL's metric set. rewards = β·Δ with Δ = logp − ref_logp and β = 1/η; for pair losses the
// chosen / rejected fields average over pairs, for `sppo` they are NaN (there are no pairs).
struct PreferenceMetrics {
  double loss = 0;
  double rewards_chosen = 0, rewards_rejected = 0, rewards_margins = 0, rewards_accuracies = 0;
  double logps_chosen = 0, logps_rejected = 0;
  double rewards_mean = 0, logps_mean = 0;  // over all sequences
  int64_t sequences = 0, pairs = 0;
};

// Inputs per sequence s: policy log-prob logp[s], reference log-prob ref_logp[s] (π_t), and
// target[s] = P̂(y_s ≻ π_t | x) for sppo and sppo-pair; for sppo-single target[2k] is
// q = P(y_w ≻ y_l | x) (target[2k+1] is not read); sppo-hard, dpo and ipo read no targets.
// Returns the batch loss (mean over sequences for sppo, over pairs otherwise) and writes
// grad[s] = dloss/dlogp[s]. Throws sppo::Error naming the sequence on invalid input.
double preference_loss(PreferenceLoss loss, double eta, int64_t n_seq, const double* logp, const double* ref_logp,
                       const double* target, double* grad, PreferenceMetrics* metrics);

}  // namespace sppo
