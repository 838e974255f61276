// The styled-reversal oracle: quality and style of answers, P is a valid preference matrix, the
// Nash equilibrium computed from A, duality gaps worked out by hand, and the exact
// multiplicative-weights update on the tabular style game — whose AVERAGE policy's duality gap
// falls toward 0 while the last iterate keeps cycling.
import { describe, expect, it } from 'vitest';
import { assertPreferenceMatrix } from '../lib/preference/matrix.js';
import {
  DEFAULT_STYLED_REVERSAL,
  STYLES,
  dualityGap,
  idealAnswer,
  nashStyles,
  oraclePreference,
  randomWords,
  resolveStyledReversal,
  styleAdvantage,
  styleOf,
  styledReversalQuality,
  summarizeAnswers,
} from '../lib/preference/styled-reversal.js';
import { seededRng } from '../lib/data/random.js';
import { multiplicativeWeightsStep } from '../lib/sppo/multiplicative-weights.js';

describe('answers: style and quality', () => {
  it('reads the style letter and colon', () => {
    expect(styleOf('S:dbac')).toBe('S');
    expect(styleOf('R:')).toBe('R');
    expect(styleOf('P:xyz')).toBe('P');
    for (const bad of ['dbac', 's:dbac', 'R-dbac', 'R', '', ' S:dbac', 'Q:dbac']) expect(styleOf(bad)).toBe('none');
  });

  it('scores matching positions over max(len(body), len(reversed word))', () => {
    // prompt cabd → reversed dbac
    expect(styledReversalQuality('cabd', 'S:dbac')).toBe(1);
    expect(styledReversalQuality('cabd', 'S:dbca')).toBe(2 / 4); // d b match, c a do not
    expect(styledReversalQuality('cabd', 'R:dba')).toBe(3 / 4); // short: 3 of 4 positions
    expect(styledReversalQuality('cabd', 'P:dbacxx')).toBe(4 / 6); // long: 4 of 6 positions
    expect(styledReversalQuality('cabd', 'S:dbac\n')).toBe(4 / 5); // nothing may follow the answer
    expect(styledReversalQuality('cabd', 'R:')).toBe(0);
    expect(styledReversalQuality('cabd', 'dbac')).toBe(0); // no style → q = 0
    expect(styledReversalQuality('cabd', 'S:acdb')).toBe(0); // no position matches dbac
  });

  it('builds the ideal answer', () => {
    expect(idealAnswer('cabd', 'S')).toBe('S:dbac');
    expect(styledReversalQuality('hefgab', idealAnswer('hefgab', 'R'))).toBe(1);
    expect(() => idealAnswer('cabd', 'X' as 'R')).toThrow(/style must be one of R, P, S/);
  });
});

describe('the preference P(y ≻ y′ | x)', () => {
  it('matches the formula on hand-worked cases', () => {
    // R (q 1) vs S (q 1/2): 1/2 + (1/4)(1/2) + (1/4)(1/3) = 17/24
    expect(oraclePreference('cabd', 'R:dbac', 'S:dbca')).toBeCloseTo(17 / 24, 15);
    // P vs R, both perfect: 1/2 + (1/4)·A[P,R] = 1/2 + 1/4
    expect(oraclePreference('cabd', 'P:dbac', 'R:dbac')).toBe(0.75);
    // S vs P, both perfect: 1/2 + (1/4)(2/3) = 2/3
    expect(oraclePreference('cabd', 'S:dbac', 'P:dbac')).toBeCloseTo(2 / 3, 15);
    // a perfect styled answer vs one without a style: 1/2 + 1/4 + 1/4 = 1, and back 0
    expect(oraclePreference('cabd', 'S:dbac', 'dbac')).toBe(1);
    expect(oraclePreference('cabd', 'dbac', 'S:dbac')).toBe(0);
    // two unstyled answers tie
    expect(oraclePreference('cabd', 'dbac', 'hello')).toBe(0.5);
  });

  it('gives a valid preference matrix on random answers, extremes included', () => {
    const rng = seededRng(11);
    const letters = 'abcdefgh';
    for (const word of randomWords(40, 3)) {
      const answers = Array.from({ length: 7 }, () => {
        const style = ['R:', 'P:', 'S:', '', 'x'][rng.int(5)];
        const body =
          rng.next() < 0.4 ? Array.from(word).reverse().join('') : Array.from({ length: rng.int(8) }, () => letters[rng.int(8)]).join('');
        return style + body;
      });
      answers.push(idealAnswer(word, 'P'), 'none at all');
      const P = answers.map((y) => answers.map((y2) => oraclePreference(word, y, y2)));
      assertPreferenceMatrix(P, { tolerance: 1e-15 });
    }
  });

  it('A is antisymmetric with A[c, none] = 1', () => {
    for (const c of [...STYLES, 'none'] as const)
      for (const d of [...STYLES, 'none'] as const) expect(styleAdvantage(c, d) + styleAdvantage(d, c)).toBe(0);
    for (const c of STYLES) expect(styleAdvantage(c, 'none')).toBe(1);
    expect(styleAdvantage('R', 'S')).toBeCloseTo(1 / 3, 15);
    expect(styleAdvantage('S', 'P')).toBeCloseTo(2 / 3, 15);
    expect(styleAdvantage('P', 'R')).toBe(1);
  });
});

/** (A p)_c for each style c, with A read through the public styleAdvantage. */
function stylePayoffs(p: Record<'R' | 'P' | 'S', number>, params = {}): number[] {
  return STYLES.map((c) => STYLES.reduce((s, d) => s + styleAdvantage(c, d, params) * p[d], 0));
}

describe('the Nash equilibrium and the duality gap', () => {
  it('solves A p = 0: (R, P, S) = (1/3, 1/6, 1/2)', () => {
    const p = nashStyles();
    for (const v of stylePayoffs(p)) expect(Math.abs(v)).toBeLessThan(1e-12);
    expect(p.R + p.P + p.S).toBeCloseTo(1, 12);
    expect(p.R).toBeCloseTo(1 / 3, 12);
    expect(p.P).toBeCloseTo(1 / 6, 12);
    expect(p.S).toBeCloseTo(1 / 2, 12);
  });

  it('has duality gap 0 at the equilibrium with q = 1, and only there', () => {
    const nash = nashStyles();
    expect(dualityGap({ styleDistribution: nash, meanQuality: 1 })).toBeLessThan(1e-12);
    // imperfect quality alone: 2·a·(1 − 0.9) = 0.05
    expect(dualityGap({ styleDistribution: nash, meanQuality: 0.9 })).toBeCloseTo(0.05, 12);
    // pure styles are exploitable: R loses to P by A[P,R] = 1 → gap 2·(1/4)·1 = 1/2
    expect(dualityGap({ styleDistribution: { R: 1, P: 0, S: 0 }, meanQuality: 1 })).toBeCloseTo(0.5, 12);
    // nearby mixtures have a positive gap
    const rng = seededRng(5);
    for (let k = 0; k < 50; k++) {
      const e = [rng.next() - 0.5, rng.next() - 0.5];
      const p = { R: nash.R + 0.01 * e[0], P: nash.P + 0.01 * e[1], S: nash.S - 0.01 * (e[0] + e[1]) };
      expect(dualityGap({ styleDistribution: p, meanQuality: 1 })).toBeGreaterThan(0);
    }
  });

  it('is positive for the SFT-like policy (R 0.6, P 0.3, S 0.1, q 0.8)', () => {
    // Σ_c' A[c,c'] p(c'): R −0.3 + 0.1/3 = −0.2667, P 0.6 − 0.2/3 = 0.5333, S −0.2 + 0.2 = 0
    // gap = 2·(1/4·(1 − 0.8) + 1/4·0.5333) = 11/30
    const gap = dualityGap({ styleDistribution: { R: 0.6, P: 0.3, S: 0.1 }, meanQuality: 0.8 });
    expect(gap).toBeCloseTo(11 / 30, 12);
  });

  it("counts the mass on answers without a style ('none')", () => {
    // p = (R .3, P .2, S .3, none .2), q .6: gains R −.2 + .1 + .2 = .1, P .3 − .2 + .2 = .3,
    // S −.1 + .4/3 + .2 = .2333 → gap = 2·(.25·.4 + .25·.3) = .35
    const gap = dualityGap({ styleDistribution: { R: 0.3, P: 0.2, S: 0.3, none: 0.2 }, meanQuality: 0.6 });
    expect(gap).toBeCloseTo(0.35, 12);
    expect(() => dualityGap({ styleDistribution: { R: 0.5, P: 0.2, S: 0.2 }, meanQuality: 1 })).toThrow(/must sum to 1, got 0\.9/);
    expect(() => dualityGap({ styleDistribution: { R: 1, P: 0, S: 0 }, meanQuality: 1.5 })).toThrow(/meanQuality must be in \[0, 1\]/);
  });

  it('summarizes sampled answers into style shares and mean quality', () => {
    const s = summarizeAnswers([
      { prompt: 'cabd', answer: 'S:dbac' },
      { prompt: 'cabd', answer: 'S:dbca' },
      { prompt: 'abc', answer: 'R:cba' },
      { prompt: 'abc', answer: 'cba' },
    ]);
    expect(s.styleDistribution).toEqual({ R: 0.25, P: 0, S: 0.5, none: 0.25 });
    expect(s.meanQuality).toBeCloseTo((1 + 0.5 + 1 + 0) / 4, 15);
  });

  it('solves other style games: classic rock-paper-scissors, and one with a dominant style', () => {
    const rps = {
      A: [
        [0, -1, 1],
        [1, 0, -1],
        [-1, 1, 0],
      ],
    };
    const u = nashStyles(rps);
    for (const c of STYLES) expect(u[c]).toBeCloseTo(1 / 3, 12);
    // R beats both P and S: the equilibrium is pure R
    const dominant = {
      A: [
        [0, 1, 1],
        [-1, 0, 0.5],
        [-1, -0.5, 0],
      ],
    };
    expect(nashStyles(dominant)).toEqual({ R: 1, P: 0, S: 0 });
    expect(dualityGap({ styleDistribution: nashStyles(dominant), meanQuality: 1 }, dominant)).toBe(0);
  });
});

describe('parameters and prompts', () => {
  it('refuses parameters that break the oracle', () => {
    expect(() =>
      resolveStyledReversal({
        A: [
          [0, 1, 0],
          [0, 0, 0],
          [0, 0, 0],
        ],
      }),
    ).toThrow(/A must be antisymmetric, but A\[R\]\[P\] = 1 and A\[P\]\[R\] = 0/);
    expect(() => resolveStyledReversal({ a: 0.3 })).toThrow(/a \+ b·max\|A\| = 0\.55 exceeds 1\/2/);
    expect(() => resolveStyledReversal({ a: -0.1 })).toThrow(/a and b must be ≥ 0/);
    expect(() => resolveStyledReversal({ alphabet: 'aab' })).toThrow(/distinct letters/);
    expect(() => resolveStyledReversal({ minLength: 5, maxLength: 4 })).toThrow(/1 ≤ minLength ≤ maxLength/);
    expect(() =>
      resolveStyledReversal({
        A: [
          [0, 1],
          [-1, 0],
        ],
      }),
    ).toThrow(/3×3/);
    expect(resolveStyledReversal()).toEqual({ ...DEFAULT_STYLED_REVERSAL });
  });

  it('generates seeded words of 3–6 letters from a–h', () => {
    const words = randomWords(2000, 42);
    expect(randomWords(2000, 42)).toEqual(words);
    expect(randomWords(2000, 43)).not.toEqual(words);
    for (const w of words) expect(w).toMatch(/^[a-h]{3,6}$/);
    expect(new Set(words.map((w) => w.length))).toEqual(new Set([3, 4, 5, 6]));
    expect(new Set(words.join(''))).toEqual(new Set('abcdefgh'));
    const custom = randomWords(100, 1, { alphabet: 'xy', minLength: 2, maxLength: 2 });
    for (const w of custom) expect(w).toMatch(/^[xy]{2}$/);
    expect(randomWords(0, 1)).toEqual([]);
  });
});

describe('multiplicative weights on the tabular style game (q = 1)', () => {
  const word = 'cabd';
  // P(c ≻ c′) between the ideal answers in styles c, c′: 1/2 + (1/4)·A[c, c′]
  const table = STYLES.map((c) => STYLES.map((d) => oraclePreference(word, idealAnswer(word, c), idealAnswer(word, d))));
  const asStyles = (p: number[]) => ({ R: p[0], P: p[1], S: p[2] });

  it('one step reproduces the closed form π′(y) ∝ π(y)·exp(η P(y ≻ π))', () => {
    const pi = [0.6, 0.3, 0.1];
    const eta = 2;
    // P(R ≻ π) = .6·1/2 + .3·1/4 + .1·7/12 = 13/30
    // P(P ≻ π) = .6·3/4 + .3·1/2 + .1·1/3 = 19/30
    // P(S ≻ π) = .6·5/12 + .3·2/3 + .1·1/2 = 1/2
    const winRates = [13 / 30, 19 / 30, 1 / 2];
    const step = multiplicativeWeightsStep(pi, table, eta);
    step.winRates.forEach((w, i) => expect(w).toBeCloseTo(winRates[i], 14));
    const unnormalized = pi.map((p, i) => p * Math.exp(eta * winRates[i]));
    const Z = unnormalized.reduce((s, v) => s + v, 0);
    step.policy.forEach((p, i) => expect(p).toBeCloseTo(unnormalized[i] / Z, 14));
    expect(step.logPartition).toBeCloseTo(Math.log(Z), 14);
    // E_π P(y ≻ π) = 1/2, so SPPO's regression target holds with a constant offset η/2 − log Z:
    // log(π′/π) = η(P(y ≻ π) − 1/2) + (η/2 − log Z)
    expect(pi.reduce((s, p, i) => s + p * step.winRates[i], 0)).toBeCloseTo(0.5, 15);
    pi.forEach((p, i) =>
      expect(Math.log(step.policy[i] / p) - eta * (step.winRates[i] - 0.5)).toBeCloseTo(eta / 2 - step.logPartition, 13),
    );
    // the style P, which beats the policy most, gains the most mass
    expect(step.policy[1] / pi[1]).toBeGreaterThan(step.policy[0] / pi[0]);
  });

  it.each([0.5, 1, 5])("drives the AVERAGE policy's duality gap toward 0 (η = %s); the last iterate keeps cycling", (eta) => {
    let pi = [0.6, 0.3, 0.1];
    const sum = [0, 0, 0];
    const averageGaps: number[] = [];
    let lastGapMax = 0;
    const T = 10_000;
    for (let t = 1; t <= T; t++) {
      pi.forEach((p, i) => (sum[i] += p));
      if ([10, 100, 1000, T].includes(t))
        averageGaps.push(dualityGap({ styleDistribution: asStyles(sum.map((s) => s / t)), meanQuality: 1 }));
      if (t > T - 1000) lastGapMax = Math.max(lastGapMax, dualityGap({ styleDistribution: asStyles(pi), meanQuality: 1 }));
      pi = multiplicativeWeightsStep(pi, table, eta).policy;
    }
    const start = dualityGap({ styleDistribution: { R: 0.6, P: 0.3, S: 0.1 }, meanQuality: 1 });
    for (let k = 1; k < averageGaps.length; k++) expect(averageGaps[k]).toBeLessThan(averageGaps[k - 1]);
    expect(averageGaps.at(-1)!).toBeLessThan(start / 50);
    expect(averageGaps.at(-1)!).toBeLessThan(0.005);
    // no guarantee for the last iterate: it orbits the equilibrium at a distance
    expect(lastGapMax).toBeGreaterThan(0.05);
  });

  it('refuses a policy that is not a distribution, or a bad η', () => {
    expect(() => multiplicativeWeightsStep([0.5, 0.4, 0.2], table, 1)).toThrow(/probability distribution/);
    expect(() => multiplicativeWeightsStep([0.5, 0.5], table, 1)).toThrow(/must be 2×2/);
    expect(() => multiplicativeWeightsStep([1, 0, 0], table, 0)).toThrow(/eta must be a finite number > 0/);
    // mass 0 stays 0
    expect(multiplicativeWeightsStep([1, 0, 0], table, 3).policy).toEqual([1, 0, 0]);
  });
});
