// Win rates against the current policy from a judged K×K matrix: P̂(y_i ≻ π_t | x), the
// Monte-Carlo estimate of E_{y'~π_t} P(y_i ≻ y' | x) from the K samples themselves.
import { assertPreferenceMatrix } from '../preference/matrix.js';

/**
 * 'include' (the reference code, default): (1/K) Σ_j P_ij, the diagonal's ½ counted.
 * 'exclude': (1/(K−1)) Σ_{j≠i} P_ij, only the other samples.
 */
export type WinRateDiagonal = 'include' | 'exclude';

export interface WinRateOptions {
  diagonal?: WinRateDiagonal;
}

/** P̂ per response; P is checked first (square, K ≥ 2, entries in [0,1], P_ij + P_ji = 1, P_ii = ½). */
export function winRates(P: readonly (readonly number[])[], options: WinRateOptions = {}): number[] {
  const diagonal = options.diagonal ?? 'include';
  if (diagonal !== 'include' && diagonal !== 'exclude')
    throw new RangeError(`diagonal must be 'include' or 'exclude', got ${JSON.stringify(diagonal)}`);
  assertPreferenceMatrix(P);
  const K = P.length;
  return P.map((row, i) => {
    let s = 0;
    for (let j = 0; j < K; j++) if (diagonal === 'include' || j !== i) s += row[j];
    return diagonal === 'include' ? s / K : s / (K - 1);
  });
}
