// The exact update SPPO approximates, for a policy small enough to write down as a table:
//   π_{t+1}(y) = π_t(y) · exp(η · P(y ≻ π_t)) / Z,   P(y ≻ π_t) = Σ_{y'} π_t(y') P(y ≻ y').
// Used to check the game-theoretic claims (the average policy's duality gap → 0) on the
// synthetic oracle, and as the target the learned update is compared with.

export interface MultiplicativeWeightsStep {
  /** π_{t+1} */
  policy: number[];
  /** P(y ≻ π_t) for every y, exact (expectation over π_t) */
  winRates: number[];
  /** log Z_{π_t} = log Σ_y π_t(y) exp(η P(y ≻ π_t)) */
  logPartition: number;
}

/**
 * One multiplicative-weights (Hedge) step. `preference[i][j]` = P(y_i ≻ y_j) over the table's
 * entries; `policy` a distribution over them.
 */
export function multiplicativeWeightsStep(
  policy: readonly number[],
  preference: readonly (readonly number[])[],
  eta: number,
): MultiplicativeWeightsStep {
  const n = policy.length;
  if (n === 0) throw new RangeError('the policy is empty');
  if (!Number.isFinite(eta) || eta <= 0) throw new RangeError(`eta must be a finite number > 0, got ${eta}`);
  const total = policy.reduce((s, p) => s + p, 0);
  if (policy.some((p) => !Number.isFinite(p) || p < 0) || Math.abs(total - 1) > 1e-9)
    throw new RangeError(`the policy must be a probability distribution (entries ≥ 0 summing to 1), got [${policy.join(', ')}]`);
  if (preference.length !== n || preference.some((row) => row.length !== n))
    throw new RangeError(`the preference table must be ${n}×${n} (one row and column per policy entry)`);
  const winRates = preference.map((row) => row.reduce((s, p, j) => s + p * policy[j], 0));
  // log-sum-exp over the support, shifted by the largest exponent
  const logits = policy.map((p, i) => (p > 0 ? Math.log(p) + eta * winRates[i] : -Infinity));
  const m = Math.max(...logits);
  const z = logits.reduce((s, l) => s + Math.exp(l - m), 0);
  const logPartition = m + Math.log(z);
  return { policy: logits.map((l) => Math.exp(l - logPartition)), winRates, logPartition };
}
