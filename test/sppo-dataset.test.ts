// One iteration's training set: the (winner, loser) pair per prompt with p_w, p_l and q (the
// reference), every response with its P̂ (Algorithm 1), tie-breaking, skipped prompts, and which
// mode goes with which loss. Matrices are written by hand with P̂ worked out in the comments.
import { describe, expect, it } from 'vitest';
import { datasetModeForLoss, PREFERENCE_LOSSES } from '../lib/engine/losses.js';
import { buildTrainingSet, checkLossMode, selectPair, type JudgedPrompt } from '../lib/sppo/dataset.js';

function judged(prompt: number[], P: number[][], seed = 0): JudgedPrompt {
  return {
    prompt,
    responses: P.map((_, i) => ({
      tokens: Array.from({ length: i + 1 }, (_, t) => seed + 10 * i + t + 1),
      refLogp: -(i + 1.5) - seed,
      text: `y${i}`,
    })),
    preference: P,
  };
}

// P̂ (diagonal included) = row sums / 3 = 1.9/3, 1.6/3, 1.0/3 → winner 0, loser 2, q = P[0][2] = 0.6
const A = [
  [0.5, 0.8, 0.6],
  [0.2, 0.5, 0.9],
  [0.4, 0.1, 0.5],
];
// the winner is not response 0: rows 0.5+0.3+0.2+0.2 = 1.2, 0.7+0.5+0.4+0.4 = 2.0,
// 0.8+0.6+0.5+0.2 = 2.1, 0.8+0.6+0.8+0.5 = 2.7 → P̂ = 0.3, 0.5, 0.525, 0.675
// → winner 3, loser 0, q = P[3][0] = 0.8
const B = [
  [0.5, 0.3, 0.2, 0.2],
  [0.7, 0.5, 0.4, 0.4],
  [0.8, 0.6, 0.5, 0.2],
  [0.8, 0.6, 0.8, 0.5],
];
// ties: P̂ = 2.8/4, 2.8/4, 1.2/4, 1.2/4 = 0.7, 0.7, 0.3, 0.3 → winner 0 (lowest), loser 2 (lowest), q = 0.9
const TIED = [
  [0.5, 0.5, 0.9, 0.9],
  [0.5, 0.5, 0.9, 0.9],
  [0.1, 0.1, 0.5, 0.5],
  [0.1, 0.1, 0.5, 0.5],
];
// a balanced cycle: every P̂ = 1.5/3 = 0.5 → no pair
const CYCLE = [
  [0.5, 0.7, 0.3],
  [0.3, 0.5, 0.7],
  [0.7, 0.3, 0.5],
];
// a 4-cycle whose P̂ are all exactly 1/2, but floating-point row sums differ in the last bit
// (0.5, 0.49999999999999994, 0.49999999999999994, 0.5): still a tie
const ROUNDED_CYCLE = [
  [0.5, 0.16, 0.5, 0.84],
  [0.84, 0.5, 0.16, 0.5],
  [0.5, 0.84, 0.5, 0.16],
  [0.16, 0.5, 0.84, 0.5],
];

describe("buildTrainingSet, mode 'pair'", () => {
  it('picks winner = argmax P̂ and loser = argmin P̂ with p_w, p_l and q = P_wl', () => {
    const items = [judged([1, 2], A), judged([3], B, 100)];
    const set = buildTrainingSet(items, { mode: 'pair' });
    if (set.mode !== 'pair') throw new Error('mode');
    expect(set.sources).toEqual([
      { prompt: 0, chosen: 0, rejected: 2 },
      { prompt: 1, chosen: 3, rejected: 0 },
    ]);
    const [p0, p1] = set.pairs;
    expect(p0.prompt).toEqual([1, 2]);
    expect(p0.chosen.response).toEqual(items[0].responses[0].tokens);
    expect(p0.rejected.response).toEqual(items[0].responses[2].tokens);
    expect(p0.chosen.refLogp).toBe(-1.5);
    expect(p0.rejected.refLogp).toBe(-3.5);
    expect(p0.chosen.target).toBeCloseTo(1.9 / 3, 15);
    expect(p0.rejected.target).toBeCloseTo(1.0 / 3, 15);
    expect(p0.q).toBe(0.6);
    expect(p1.chosen.target).toBeCloseTo(0.675, 15);
    expect(p1.rejected.target).toBeCloseTo(0.3, 15);
    expect(p1.q).toBe(0.8);
    expect(p1.chosen.refLogp).toBe(-104.5);
    expect(set.stats).toMatchObject({ prompts: 2, skippedTies: 0 });
    expect(set.stats.meanChosenWinRate).toBeCloseTo((1.9 / 3 + 0.675) / 2, 15);
    expect(set.stats.meanRejectedWinRate).toBeCloseTo((1 / 3 + 0.3) / 2, 15);
    // 3 responses of 1..3 tokens and 4 of 1..4 tokens: (6 + 10) / 7
    expect(set.stats.meanResponseTokens).toBeCloseTo(16 / 7, 15);
  });

  it('with the diagonal excluded picks the same pair (P̂ is an increasing map of it) but other targets', () => {
    const set = buildTrainingSet([judged([1], A)], { mode: 'pair', diagonal: 'exclude' });
    if (set.mode !== 'pair') throw new Error('mode');
    expect(set.sources[0]).toEqual({ prompt: 0, chosen: 0, rejected: 2 });
    // (0.8 + 0.6)/2 and (0.4 + 0.1)/2
    expect(set.pairs[0].chosen.target).toBeCloseTo(0.7, 15);
    expect(set.pairs[0].rejected.target).toBeCloseTo(0.25, 15);
  });

  it('breaks ties toward the lowest index for both winner and loser', () => {
    const set = buildTrainingSet([judged([1], TIED)], { mode: 'pair' });
    if (set.mode !== 'pair') throw new Error('mode');
    expect(set.sources[0]).toEqual({ prompt: 0, chosen: 0, rejected: 2 });
    expect(set.pairs[0].q).toBe(0.9);
    expect(selectPair([0.2, 0.9, 0.9, 0.2])).toEqual({ chosen: 1, rejected: 0 });
  });

  it('skips prompts whose P̂ are all equal, and counts them', () => {
    const items = [
      judged([1], CYCLE),
      judged([2], A),
      judged([3], ROUNDED_CYCLE),
      judged(
        [4],
        [
          [0.5, 0.5],
          [0.5, 0.5],
        ],
      ),
    ];
    const set = buildTrainingSet(items, { mode: 'pair' });
    if (set.mode !== 'pair') throw new Error('mode');
    expect(set.pairs).toHaveLength(1);
    expect(set.sources).toEqual([{ prompt: 1, chosen: 0, rejected: 2 }]);
    expect(set.skipped).toEqual([0, 2, 3]);
    expect(set.stats.skippedTies).toBe(3);
    // with exact comparison, the rounding in the 4-cycle's sums would pick a pair
    const exact = buildTrainingSet([judged([3], ROUNDED_CYCLE)], { mode: 'pair', tieTolerance: 0 });
    if (exact.mode !== 'pair') throw new Error('mode');
    expect(exact.pairs).toHaveLength(1);
  });

  it('gives no mean win rates when every prompt is skipped', () => {
    const set = buildTrainingSet([judged([1], CYCLE)], { mode: 'pair' });
    expect(set.stats.meanChosenWinRate).toBeUndefined();
    expect(set.stats.skippedTies).toBe(1);
  });
});

describe("buildTrainingSet, mode 'all'", () => {
  it('gives every response its own P̂ as the target', () => {
    const items = [judged([1, 2], A), judged([3], CYCLE, 50)];
    const set = buildTrainingSet(items, { mode: 'all' });
    if (set.mode !== 'all') throw new Error('mode');
    expect(set.examples).toHaveLength(6);
    const expected = [1.9 / 3, 1.6 / 3, 1.0 / 3, 0.5, 0.5, 0.5];
    set.examples.forEach((e, k) => {
      const n = k < 3 ? 0 : 1;
      const i = k % 3;
      expect(e.prompt).toEqual(items[n].prompt);
      expect(e.response).toEqual(items[n].responses[i].tokens);
      expect(e.refLogp).toBe(items[n].responses[i].refLogp);
      expect(e.target).toBeCloseTo(expected[k], 15);
    });
    expect(set.stats.skippedTies).toBe(0);
  });
});

describe('bad input', () => {
  it('names the prompt (and response) that is wrong', () => {
    const bad = judged([1], A);
    expect(() =>
      buildTrainingSet(
        [
          judged([1], A),
          {
            ...bad,
            preference: [
              [0.5, 0.8, 0.6],
              [0.2, 0.5, 0.9],
              [0.4, 0.2, 0.5],
            ],
          },
        ],
        { mode: 'pair' },
      ),
    ).toThrow(/^prompt 1: P\[1\]\[2\] \+ P\[2\]\[1\] = 0\.9 \+ 0\.2 = 1\.1, must be 1/);
    expect(() => buildTrainingSet([{ ...bad, preference: A.slice(0, 2) }], { mode: 'pair' })).toThrow(
      /prompt 0: the preference matrix has 2 rows for 3 responses/,
    );
    const nanRef = { ...bad, responses: bad.responses.map((r, i) => (i === 1 ? { ...r, refLogp: Number.NaN } : r)) };
    expect(() => buildTrainingSet([nanRef], { mode: 'all' })).toThrow(
      /prompt 0, response 1: refLogp must be a finite log-probability ≤ 0, got NaN/,
    );
    const emptyResponse = { ...bad, responses: bad.responses.map((r, i) => (i === 2 ? { ...r, tokens: [] } : r)) };
    expect(() => buildTrainingSet([emptyResponse], { mode: 'pair' })).toThrow(
      /prompt 0, response 2: the response token ids are missing or empty/,
    );
    expect(() => buildTrainingSet([{ ...bad, prompt: [] }], { mode: 'pair' })).toThrow(
      /prompt 0: the prompt token ids are missing or empty/,
    );
    expect(() => buildTrainingSet([bad], { mode: 'both' as 'all' })).toThrow(/mode must be 'pair' or 'all'/);
  });
});

describe('losses and modes', () => {
  it("sppo reads 'all'; every other loss reads 'pair'", () => {
    expect(Object.fromEntries(PREFERENCE_LOSSES.map((l) => [l, datasetModeForLoss(l)]))).toEqual({
      sppo: 'all',
      'sppo-pair': 'pair',
      'sppo-single': 'pair',
      'sppo-hard': 'pair',
      dpo: 'pair',
      ipo: 'pair',
    });
  });

  it('refuses a mismatch, and an unknown loss', () => {
    expect(() => checkLossMode('sppo', 'pair')).toThrow(
      /loss 'sppo' trains on every response with its own P̂: it needs mode 'all', not 'pair'/,
    );
    expect(() => checkLossMode('dpo', 'all')).toThrow(/loss 'dpo' trains on \(chosen, rejected\) pairs: it needs mode 'pair', not 'all'/);
    expect(() => checkLossMode('sppo-single', 'pair')).not.toThrow();
    expect(() => datasetModeForLoss('kto' as 'dpo')).toThrow(/unknown loss 'kto'/);
  });
});
