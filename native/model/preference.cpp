// The preference losses, each written once. Everything is double: at the reference settings
// (η = 1000, log-probs in the thousands of nats) the squared residuals reach ~1e6 and the
// differences of large log-probs must not lose their low digits.
#include "sppo/preference.h"

#include <cmath>
#include <limits>

#include "core/error.h"

namespace sppo {

PreferenceLoss parse_preference_loss(const std::string& name) {
  std::string known;
  for (PreferenceLoss loss : kPreferenceLosses) {
    if (name == preference_loss_name(loss)) return loss;
    known += (known.empty() ? "" : ", ") + std::string(preference_loss_name(loss));
  }
  throw Error("unknown loss '" + name + "' (known: " + known + ")");
}

const char* preference_loss_name(PreferenceLoss loss) {
  switch (loss) {
    case PreferenceLoss::Sppo:
      return "sppo";
    case PreferenceLoss::SppoPair:
      return "sppo-pair";
    case PreferenceLoss::SppoSingle:
      return "sppo-single";
    case PreferenceLoss::SppoHard:
      return "sppo-hard";
    case PreferenceLoss::Dpo:
      return "dpo";
    case PreferenceLoss::Ipo:
      return "ipo";
  }
  return "?";
}

bool is_pair_loss(PreferenceLoss loss) { return loss != PreferenceLoss::Sppo; }

namespace {

// The SPPO regression residual: Δ should equal η(P − ½), the log-ratio of the
// multiplicative-weights update with log Z replaced by η/2.
double residual(double delta, double eta, double p) { return delta - eta * (p - 0.5); }

// -log σ(z) and its derivative, stable for any z.
double neg_log_sigmoid(double z) { return z > 0 ? std::log1p(std::exp(-z)) : -z + std::log1p(std::exp(z)); }
double sigmoid(double z) { return z >= 0 ? 1 / (1 + std::exp(-z)) : std::exp(z) / (1 + std::exp(z)); }

}  // namespace

double preference_loss(PreferenceLoss loss, double eta, int64_t n, const double* logp, const double* ref_logp,
                       const double* target, double* grad, PreferenceMetrics* m) {
  SPPO_REQUIRE(std::isfinite(eta) && eta > 0, "eta must be a finite number > 0 (beta = 1/eta), got ", eta);
  SPPO_REQUIRE(n > 0, "the preference batch is empty");
  const bool pairs = is_pair_loss(loss);
  SPPO_REQUIRE(!pairs || n % 2 == 0, "loss '", preference_loss_name(loss), "' needs (chosen, rejected) pairs: got ", n,
               " sequences, an odd number");
  const bool reads_target =
      loss == PreferenceLoss::Sppo || loss == PreferenceLoss::SppoPair || loss == PreferenceLoss::SppoSingle;
  for (int64_t s = 0; s < n; ++s) {
    SPPO_REQUIRE(std::isfinite(logp[s]), "sequence ", s, ": the policy log-prob is not finite (", logp[s], ")");
    SPPO_REQUIRE(std::isfinite(ref_logp[s]) && ref_logp[s] <= 0, "sequence ", s,
                 ": the reference log-prob must be a finite number <= 0, got ", ref_logp[s]);
    const bool read = reads_target && (loss != PreferenceLoss::SppoSingle || s % 2 == 0);
    if (read)
      SPPO_REQUIRE(std::isfinite(target[s]) && target[s] >= 0 && target[s] <= 1, "sequence ", s,
                   ": the target win probability must be in [0, 1], got ", target[s]);
  }
  const double beta = 1 / eta;
  double total = 0;
  if (!pairs) {
    for (int64_t s = 0; s < n; ++s) {
      const double r = residual(logp[s] - ref_logp[s], eta, target[s]);
      total += r * r;
      grad[s] = 2 * r / double(n);
    }
  } else {
    const int64_t P = n / 2;
    for (int64_t k = 0; k < P; ++k) {
      const int64_t w = 2 * k, l = 2 * k + 1;
      const double dw = logp[w] - ref_logp[w], dl = logp[l] - ref_logp[l];
      double term = 0, gw = 0, gl = 0;
      switch (loss) {
        case PreferenceLoss::SppoPair:
        case PreferenceLoss::SppoSingle: {
          // sppo-single targets the pair's own q for the winner and 1 − q for the loser.
          const double pw = target[w], pl = loss == PreferenceLoss::SppoPair ? target[l] : 1 - target[w];
          const double rw = residual(dw, eta, pw), rl = residual(dl, eta, pl);
          term = 0.5 * (rw * rw + rl * rl), gw = rw, gl = rl;
          break;
        }
        case PreferenceLoss::SppoHard: {
          const double rw = residual(dw, eta, 1.0), rl = residual(dl, eta, 0.0);
          term = rw * rw + rl * rl, gw = 2 * rw, gl = 2 * rl;
          break;
        }
        case PreferenceLoss::Dpo: {
          const double z = beta * (dw - dl);
          term = neg_log_sigmoid(z);
          gw = -beta * sigmoid(-z), gl = -gw;
          break;
        }
        case PreferenceLoss::Ipo: {
          const double r = dw - dl - 1 / (2 * beta);
          term = r * r, gw = 2 * r, gl = -2 * r;
          break;
        }
        case PreferenceLoss::Sppo:
          break;
      }
      total += term;
      grad[w] = gw / double(P);
      grad[l] = gl / double(P);
    }
  }
  const double value = total / double(pairs ? n / 2 : n);
  if (m) {
    *m = PreferenceMetrics{};
    m->loss = value;
    m->sequences = n;
    for (int64_t s = 0; s < n; ++s) {
      m->rewards_mean += beta * (logp[s] - ref_logp[s]) / double(n);
      m->logps_mean += logp[s] / double(n);
    }
    if (pairs) {
      const int64_t P = n / 2;
      m->pairs = P;
      for (int64_t k = 0; k < P; ++k) {
        const double rc = beta * (logp[2 * k] - ref_logp[2 * k]), rr = beta * (logp[2 * k + 1] - ref_logp[2 * k + 1]);
        m->rewards_chosen += rc / double(P);
        m->rewards_rejected += rr / double(P);
        m->rewards_accuracies += (rc > rr ? 1.0 : 0.0) / double(P);
        m->logps_chosen += logp[2 * k] / double(P);
        m->logps_rejected += logp[2 * k + 1] / double(P);
      }
      m->rewards_margins = m->rewards_chosen - m->rewards_rejected;
    } else {
      const double nan = std::numeric_limits<double>::quiet_NaN();
      m->rewards_chosen = m->rewards_rejected = m->rewards_margins = m->rewards_accuracies = nan;
      m->logps_chosen = m->logps_rejected = nan;
    }
  }
  return value;
}

}  // namespace sppo
