// The styled-reversal oracle: a synthetic task with a known, non-transitive preference, so the
// pipeline can be checked against an exact Nash equilibrium and duality gap.
//
// Prompt: a word of 3–6 letters from a–h. Ideal answer: a style letter R, P or S, a colon, the
// word reversed (prompt `cabd` → `S:dbac`), then end of sequence.
// Quality q(y) ∈ [0, 1]: the fraction of the max(len(body), len(reversed word)) positions where
// the body (the text after "X:") matches the reversed word; q = 0 and style "none" when the
// answer does not start with a style letter and a colon. No trimming: the text is the decoded
// response without special tokens, and anything after the answer counts against it.
//   P(y ≻ y' | x) = 1/2 + a·(q(y) − q(y')) + b·A[s(y), s(y')]
// with a = b = 1/4 and A antisymmetric over R, P, S: A[R,S] = 1/3, A[S,P] = 2/3, A[P,R] = 1
// (R beats S, S beats P, P beats R, with different strengths) and A[c, none] = 1 for each style.
// Its Nash equilibrium: q = 1 with styles (R, P, S) = (1/3, 1/6, 1/2).
import { seededRng } from '../data/random.js';
import { definePreferenceModel, type PreferenceModel } from './model.js';
import {
  DEFAULT_STYLED_REVERSAL,
  resolveStyledReversal,
  STYLES,
  type Style,
  type StyledReversalParams,
} from './options/styled-reversal.js';

export { DEFAULT_STYLED_REVERSAL, resolveStyledReversal, STYLES, type Style, type StyledReversalParams };

export type StyleOrNone = Style | 'none';

export type StyleDistribution = Record<Style, number> & { none?: number };

function reverse(s: string): string {
  return [...s].reverse().join('');
}

/** The style letter an answer opens with, or 'none' without a style letter and a colon. */
export function styleOf(answer: string): StyleOrNone {
  const c = answer[0];
  return (c === 'R' || c === 'P' || c === 'S') && answer[1] === ':' ? c : 'none';
}

/** q(y): the fraction of positions where the answer's body matches the reversed prompt word. */
export function styledReversalQuality(prompt: string, answer: string): number {
  if (styleOf(answer) === 'none') return 0;
  const body = [...answer.slice(2)];
  const target = [...reverse(prompt)];
  const n = Math.max(body.length, target.length);
  if (n === 0) return 1;
  let match = 0;
  for (let i = 0; i < Math.min(body.length, target.length); i++) if (body[i] === target[i]) match++;
  return match / n;
}

function styleIndex(s: StyleOrNone): number {
  return s === 'none' ? 3 : STYLES.indexOf(s);
}

/** A over (R, P, S, none). */
function extendedA(p: StyledReversalParams): number[][] {
  const n = p.noneAdvantage;
  return [
    [...p.A[0], n],
    [...p.A[1], n],
    [...p.A[2], n],
    [-n, -n, -n, 0],
  ];
}

/** A[s, s'] for styles including 'none'. */
export function styleAdvantage(s: StyleOrNone, t: StyleOrNone, params: Partial<StyledReversalParams> = {}): number {
  return extendedA(resolveStyledReversal(params))[styleIndex(s)][styleIndex(t)];
}

/** P(y ≻ y' | prompt) = 1/2 + a·(q(y) − q(y')) + b·A[s(y), s(y')]. */
export function oraclePreference(prompt: string, y: string, y2: string, params: Partial<StyledReversalParams> = {}): number {
  const p = resolveStyledReversal(params);
  return preferenceWith(p, extendedA(p), prompt, y, y2);
}

function preferenceWith(p: StyledReversalParams, A: number[][], prompt: string, y: string, y2: string): number {
  const dq = styledReversalQuality(prompt, y) - styledReversalQuality(prompt, y2);
  return 0.5 + p.a * dq + p.b * A[styleIndex(styleOf(y))][styleIndex(styleOf(y2))];
}

/** The ideal answer in a given style: `S:dbac` for `cabd`. */
export function idealAnswer(word: string, style: Style): string {
  if (!STYLES.includes(style)) throw new RangeError(`style must be one of ${STYLES.join(', ')}, got ${JSON.stringify(style)}`);
  return `${style}:${reverse(word)}`;
}

/** n prompt words, lengths uniform in [minLength, maxLength], letters uniform over the alphabet. */
export function randomWords(n: number, seed: number, params: Partial<StyledReversalParams> = {}): string[] {
  if (!Number.isInteger(n) || n < 0) throw new RangeError(`randomWords: n must be an integer ≥ 0, got ${n}`);
  const p = resolveStyledReversal(params);
  const rng = seededRng(seed);
  const letters = [...p.alphabet];
  return Array.from({ length: n }, () => {
    const len = p.minLength + rng.int(p.maxLength - p.minLength + 1);
    return Array.from({ length: len }, () => letters[rng.int(letters.length)]).join('');
  });
}

/**
 * The symmetric style game's equilibrium p over (R, P, S): (A p)_c ≤ 0 for every style c, so no
 * style wins against it. Found by support enumeration — for each support S, solve A_SS p_S = 0
 * with Σ p_S = 1 — smallest support first; throws if none exists (cannot happen for a valid A).
 */
export function nashStyles(params: Partial<StyledReversalParams> = {}): Record<Style, number> {
  const { A } = resolveStyledReversal(params);
  const n = STYLES.length;
  const supports: number[][] = [];
  for (let mask = 1; mask < 1 << n; mask++) supports.push([...Array(n).keys()].filter((i) => mask & (1 << i)));
  supports.sort((x, y) => x.length - y.length);
  for (const S of supports) {
    const pS = solveSupport(A, S);
    if (!pS) continue;
    const p = new Array<number>(n).fill(0);
    S.forEach((i, k) => (p[i] = pS[k]));
    if (p.some((v) => v < -1e-12)) continue;
    const payoff = A.map((row) => row.reduce((s, a, j) => s + a * p[j], 0));
    if (payoff.every((v) => v <= 1e-12)) return { R: Math.max(0, p[0]), P: Math.max(0, p[1]), S: Math.max(0, p[2]) };
  }
  throw new Error('the style game has no equilibrium (A is not antisymmetric?)');
}

/** Least squares on [A_SS; 1ᵀ] p = [0; 1] by normal equations; null if singular or inexact. */
function solveSupport(A: readonly (readonly number[])[], S: number[]): number[] | null {
  const m = S.length;
  const rows = S.map((i) => S.map((j) => A[i][j]));
  rows.push(new Array<number>(m).fill(1));
  const rhs = [...new Array<number>(m).fill(0), 1];
  // M = RᵀR, v = Rᵀ rhs
  const M = Array.from({ length: m }, (_, a) => Array.from({ length: m }, (_, b) => rows.reduce((s, r) => s + r[a] * r[b], 0)));
  const v = Array.from({ length: m }, (_, a) => rows.reduce((s, r, k) => s + r[a] * rhs[k], 0));
  const x = gaussSolve(M, v);
  if (!x) return null;
  const residual = rows.reduce((s, r, k) => s + (r.reduce((t, c, j) => t + c * x[j], 0) - rhs[k]) ** 2, 0);
  return residual < 1e-18 ? x : null;
}

function gaussSolve(M: number[][], v: number[]): number[] | null {
  const n = v.length;
  const a = M.map((r, i) => [...r, v[i]]);
  for (let c = 0; c < n; c++) {
    let piv = c;
    for (let r = c + 1; r < n; r++) if (Math.abs(a[r][c]) > Math.abs(a[piv][c])) piv = r;
    if (Math.abs(a[piv][c]) < 1e-12) return null;
    [a[c], a[piv]] = [a[piv], a[c]];
    for (let r = 0; r < n; r++) {
      if (r === c) continue;
      const f = a[r][c] / a[c][c];
      for (let k = c; k <= n; k++) a[r][k] -= f * a[c][k];
    }
  }
  return a.map((r, i) => r[n] / r[i]);
}

export interface PolicySummary {
  /** the policy's style distribution, with the mass on 'none' (answers without a style) */
  styleDistribution: StyleDistribution;
  /** E q(y) over the policy (answers without a style count as q = 0) */
  meanQuality: number;
}

/**
 * Duality gap of a policy: 2·(max_y P(y ≻ π) − ½), where the best response y is the perfect
 * answer in the best style: 2·(a·(1 − E q) + b·max_c Σ_c' A[c,c'] p(c')). (The answer without a
 * style is a candidate too; it never wins with the default A.) 0 exactly at the equilibrium.
 */
export function dualityGap(summary: PolicySummary, params: Partial<StyledReversalParams> = {}): number {
  const p = resolveStyledReversal(params);
  const dist = summary.styleDistribution;
  const mass = [dist.R, dist.P, dist.S, dist.none ?? 0];
  mass.forEach((m, i) => {
    if (typeof m !== 'number' || !Number.isFinite(m) || m < 0)
      throw new RangeError(`dualityGap: the mass on style ${[...STYLES, 'none'][i]} must be a number ≥ 0, got ${m}`);
  });
  const total = mass.reduce((s, m) => s + m, 0);
  if (Math.abs(total - 1) > 1e-9) throw new RangeError(`dualityGap: the style distribution must sum to 1, got ${+total.toPrecision(12)}`);
  const q = summary.meanQuality;
  if (typeof q !== 'number' || !(q >= 0 && q <= 1)) throw new RangeError(`dualityGap: meanQuality must be in [0, 1], got ${q}`);
  const A = extendedA(p);
  const styleGain = (c: number): number => A[c].reduce((s, a, j) => s + a * mass[j], 0);
  const best = Math.max(...[0, 1, 2].map((c) => p.a * (1 - q) + p.b * styleGain(c)), p.a * (0 - q) + p.b * styleGain(3));
  return 2 * best;
}

/** The style distribution and mean quality of sampled answers (for the duality gap of a policy). */
export function summarizeAnswers(samples: readonly { prompt: string; answer: string }[]): PolicySummary {
  if (samples.length === 0) throw new RangeError('summarizeAnswers: no samples');
  const counts = { R: 0, P: 0, S: 0, none: 0 };
  let q = 0;
  for (const { prompt, answer } of samples) {
    counts[styleOf(answer)]++;
    q += styledReversalQuality(prompt, answer);
  }
  const n = samples.length;
  return {
    styleDistribution: { R: counts.R / n, P: counts.P / n, S: counts.S / n, none: counts.none / n },
    meanQuality: q / n,
  };
}

/** The oracle as a PreferenceModel; its id carries every parameter that changes P. */
export function styledReversalOracle(params: Partial<StyledReversalParams> = {}): PreferenceModel {
  const p = resolveStyledReversal(params);
  const A = extendedA(p);
  const id = `styled-reversal(a=${p.a},b=${p.b},A=${JSON.stringify(p.A)},none=${p.noneAdvantage})`;
  return definePreferenceModel({
    id,
    compare(prompt, responses) {
      return responses.map((y, i) => responses.map((y2, j) => (i === j ? 0.5 : preferenceWith(p, A, prompt, y, y2))));
    },
  });
}
