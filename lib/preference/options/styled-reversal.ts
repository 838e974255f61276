// The styled-reversal oracle's parameters: their defaults, the check that keeps every P(y ≻ y')
// in [0, 1], and its options in a run configuration (preference.kind 'styled-reversal'). A leaf
// (zod and the config's field helpers only), so lib/config can compose it.
import { z } from 'zod';
import { nonEmpty, nonNegative, positiveInt } from '../../config/fields.js';
import { judgeConcurrency } from './common.js';

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
  A: Object.freeze([Object.freeze([0, -1, 1 / 3]), Object.freeze([1, 0, -2 / 3]), Object.freeze([-1 / 3, 2 / 3, 0])]),
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
  const A: unknown = p.A; // JavaScript callers may pass anything
  if (!Array.isArray(A) || A.length !== 3 || A.some((r) => !Array.isArray(r) || r.length !== 3))
    throw new RangeError('styled reversal: A must be a 3×3 matrix over the styles (R, P, S)');
  let maxA = p.noneAdvantage;
  for (let i = 0; i < 3; i++)
    for (let j = 0; j < 3; j++) {
      finite(p.A[i][j], `A[${STYLES[i]}][${STYLES[j]}]`);
      if (Math.abs(p.A[i][j] + p.A[j][i]) > 1e-12)
        throw new RangeError(
          `styled reversal: A must be antisymmetric, but A[${STYLES[i]}][${STYLES[j]}] = ${p.A[i][j]} and A[${STYLES[j]}][${STYLES[i]}] = ${p.A[j][i]}`,
        );
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

const styleMatrix = z
  .array(z.array(z.number({ error: 'must be a number' })).length(3, { error: 'must be a row of 3 numbers' }), {
    error: 'must be a 3×3 matrix',
  })
  .length(3, { error: 'must be a 3×3 matrix over the styles (R, P, S)' });

const d = DEFAULT_STYLED_REVERSAL;

export const styledReversalOptionsSchema = z
  .strictObject({
    kind: z
      .literal('styled-reversal')
      .describe('the synthetic oracle P(y ≻ y′) = ½ + a·(q(y) − q(y′)) + b·A[s(y), s(y′)], with a known Nash equilibrium'),
    a: nonNegative().default(d.a).describe('weight of the quality difference q(y) − q(y′)'),
    b: nonNegative().default(d.b).describe('weight of the style game A'),
    A: styleMatrix
      .optional()
      .describe(
        'the style game over (R, P, S), antisymmetric: A[i][j] = how much style i beats style j; default R beats S by 1/3, S beats P by 2/3, P beats R by 1',
      ),
    noneAdvantage: nonNegative().default(d.noneAdvantage).describe('how much any style beats an answer without one (A[c, none])'),
    alphabet: nonEmpty().default(d.alphabet).describe("the prompt words' letters (distinct)"),
    minLength: positiveInt().default(d.minLength).describe('shortest prompt word'),
    maxLength: positiveInt().default(d.maxLength).describe('longest prompt word'),
    concurrency: judgeConcurrency(),
  })
  .superRefine(({ kind, concurrency, ...params }, ctx) => {
    if (ctx.issues.length > 0) return; // a malformed field is reported once, by its own path
    try {
      resolveStyledReversal(params);
    } catch (err) {
      ctx.addIssue({ code: 'custom', message: (err as Error).message.replace(/^styled reversal: /, '') });
    }
  })
  .describe('the styled-reversal oracle');
