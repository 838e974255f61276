// The styled-reversal oracle's parameters: their defaults and the check that keeps every
// P(y ≻ y') in [0, 1]. A leaf (no imports), so the run configuration can validate them.

export const STYLES = ['R', 'P', 'S'] as const;
export type Style = (typeof STYLES)[number];

export interface StyledReversalParams {
  /** weight of the quality difference */
  a: number;
  /** weight of the style game */
  b: number;
  /** the style game over (R, P, S), antisymmetric: A[i][j] = how much style i beats style j */
  A: readonly (readonly number[])[];
  /** A[c, none] for every style c (so A[none, c] = −noneAdvantage) */
  noneAdvantage: number;
  /** prompt letters */
  alphabet: string;
  minLength: number;
  maxLength: number;
}

export const DEFAULT_STYLED_REVERSAL: Readonly<StyledReversalParams> = Object.freeze({
  a: 1 / 4,
  b: 1 / 4,
  // rows and columns in STYLES order (R, P, S)
  A: Object.freeze([
    Object.freeze([0, -1, 1 / 3]),
    Object.freeze([1, 0, -2 / 3]),
    Object.freeze([-1 / 3, 2 / 3, 0]),
  ]),
  noneAdvantage: 1,
  alphabet: 'abcdefgh',
  minLength: 3,
  maxLength: 6,
});

/** Fills in defaults and checks the parameters keep every P in [0, 1]. */
export function resolveStyledReversal(params: Partial<StyledReversalParams> = {}): StyledReversalParams {
  const p: StyledReversalParams = { ...DEFAULT_STYLED_REVERSAL, ...params };
  const finite = (v: number, name: string): void => {
    if (typeof v !== 'number' || !Number.isFinite(v)) throw new RangeError(`styled reversal: ${name} must be a finite number, got ${v}`);
  };
  finite(p.a, 'a');
  finite(p.b, 'b');
  finite(p.noneAdvantage, 'noneAdvantage');
  if (p.a < 0 || p.b < 0) throw new RangeError(`styled reversal: a and b must be ≥ 0, got a = ${p.a}, b = ${p.b}`);
  if (p.noneAdvantage < 0) throw new RangeError(`styled reversal: noneAdvantage must be ≥ 0, got ${p.noneAdvantage}`);
  if (!Array.isArray(p.A) || p.A.length !== 3 || p.A.some((r) => !Array.isArray(r) || r.length !== 3))
    throw new RangeError('styled reversal: A must be a 3×3 matrix over the styles (R, P, S)');
  let maxA = p.noneAdvantage;
  for (let i = 0; i < 3; i++)
    for (let j = 0; j < 3; j++) {
      finite(p.A[i][j], `A[${STYLES[i]}][${STYLES[j]}]`);
      if (Math.abs(p.A[i][j] + p.A[j][i]) > 1e-12)
        throw new RangeError(`styled reversal: A must be antisymmetric, but A[${STYLES[i]}][${STYLES[j]}] = ${p.A[i][j]} and A[${STYLES[j]}][${STYLES[i]}] = ${p.A[j][i]}`);
      maxA = Math.max(maxA, Math.abs(p.A[i][j]));
    }
  // |P − ½| ≤ a·1 + b·max|A| must stay ≤ ½
  if (p.a + p.b * maxA > 0.5 + 1e-12)
    throw new RangeError(`styled reversal: a + b·max|A| = ${p.a + p.b * maxA} exceeds 1/2, so P(y ≻ y') could leave [0, 1]`);
  if (typeof p.alphabet !== 'string' || p.alphabet.length === 0 || new Set(p.alphabet).size !== p.alphabet.length)
    throw new RangeError(`styled reversal: alphabet must be a non-empty string of distinct letters, got ${JSON.stringify(p.alphabet)}`);
  if (!Number.isInteger(p.minLength) || !Number.isInteger(p.maxLength) || p.minLength < 1 || p.maxLength < p.minLength)
    throw new RangeError(`styled reversal: need integers 1 ≤ minLength ≤ maxLength, got ${p.minLength}..${p.maxLength}`);
  return p;
}
