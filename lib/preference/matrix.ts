// The one check of a preference matrix P (P_ij ≈ P(y_i ≻ y_j | x)): every judge's output and
// every win-rate estimate goes through it, so a bad matrix is caught where it was made.

/**
 * The K×K preference matrix with P_ii = ½, P_ij = upper(i, j) for i < j and P_ji = 1 − P_ij, so
 * P_ij + P_ji = 1 holds exactly. `upper` returns undefined for a pair that stays at ½ (identical
 * responses, which no judge is asked about).
 */
export function fromUpperTriangle(K: number, upper: (i: number, j: number) => number | undefined): number[][] {
  const P = Array.from({ length: K }, () => new Array<number>(K).fill(0.5));
  for (let i = 0; i < K; i++)
    for (let j = i + 1; j < K; j++) {
      const p = upper(i, j);
      if (p === undefined) continue;
      P[i][j] = p;
      P[j][i] = 1 - p;
    }
  return P;
}

/** P_ij + P_ji = 1 and P_ii = ½ are checked to within this (judges compute in floating point). */
export const PREFERENCE_TOLERANCE = 1e-6;

export interface PreferenceMatrixCheck {
  /** the number of responses K the matrix must cover */
  size?: number;
  /** default PREFERENCE_TOLERANCE */
  tolerance?: number;
}

/**
 * Throws a RangeError naming the first problem: not a square array of arrays, K < 2, an entry
 * that is not a number in [0, 1], a diagonal entry other than ½, or P_ij + P_ji ≠ 1.
 */
export function assertPreferenceMatrix(P: unknown, check: PreferenceMatrixCheck = {}): asserts P is number[][] {
  const tol = check.tolerance ?? PREFERENCE_TOLERANCE;
  if (!Array.isArray(P)) throw new TypeError(`the preference matrix must be an array of rows, got ${describe(P)}`);
  const K = P.length;
  if (check.size !== undefined && K !== check.size)
    throw new RangeError(`the preference matrix has ${K} rows, expected ${check.size} (one per response)`);
  if (K < 2) throw new RangeError(`a preference matrix needs K ≥ 2 responses, got K = ${K}`);
  P.forEach((row, i) => {
    if (!Array.isArray(row)) throw new TypeError(`P[${i}] must be an array, got ${describe(row)}`);
    if (row.length !== K) throw new RangeError(`P is not square: row ${i} has ${row.length} entries, expected ${K}`);
    row.forEach((v, j) => {
      if (typeof v !== 'number' || Number.isNaN(v) || v < 0 || v > 1)
        throw new RangeError(`P[${i}][${j}] = ${describe(v)} is not a probability in [0, 1]`);
    });
  });
  const M = P as number[][]; // every entry is a number (checked above)
  for (let i = 0; i < K; i++) {
    if (Math.abs(M[i][i] - 0.5) > tol)
      throw new RangeError(`P[${i}][${i}] = ${M[i][i]}: the diagonal must be 1/2 (a response ties with itself)`);
    for (let j = i + 1; j < K; j++) {
      const s = M[i][j] + M[j][i];
      if (Math.abs(s - 1) > tol)
        throw new RangeError(`P[${i}][${j}] + P[${j}][${i}] = ${M[i][j]} + ${M[j][i]} = ${s}, must be 1 (within ${tol})`);
    }
  }
}

function describe(v: unknown): string {
  if (Array.isArray(v)) return 'an array';
  if (typeof v === 'string') return JSON.stringify(v);
  return typeof v === 'object' && v !== null ? 'an object' : String(v);
}
