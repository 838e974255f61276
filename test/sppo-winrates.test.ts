// Win rates P̂(y_i ≻ π_t) from hand-written matrices (expected values worked out by hand in the
// comments), both diagonal conventions, and every way a matrix can be malformed.
import { describe, expect, it } from 'vitest';
import { winRates } from '../lib/sppo/winrates.js';

// K = 3:  y0 beats y1 (0.8) and y2 (0.6); y1 beats y2 (0.9).
const P3 = [
  [0.5, 0.8, 0.6],
  [0.2, 0.5, 0.9],
  [0.4, 0.1, 0.5],
];

describe('winRates', () => {
  it('includes the diagonal by default: (1/K) Σ_j P_ij', () => {
    // row sums 1.9, 1.6, 1.0 → /3
    const r = winRates(P3);
    expect(r[0]).toBeCloseTo(1.9 / 3, 15);
    expect(r[1]).toBeCloseTo(1.6 / 3, 15);
    expect(r[2]).toBeCloseTo(1.0 / 3, 15);
    // they average to 1/2: Σ_ij P_ij = K²/2 for any valid matrix
    expect((r[0] + r[1] + r[2]) / 3).toBeCloseTo(0.5, 15);
  });

  it('excludes it on request: (1/(K−1)) Σ_{j≠i} P_ij', () => {
    // (0.8 + 0.6)/2, (0.2 + 0.9)/2, (0.4 + 0.1)/2
    const r = winRates(P3, { diagonal: 'exclude' });
    expect(r[0]).toBeCloseTo(0.7, 15);
    expect(r[1]).toBeCloseTo(0.55, 15);
    expect(r[2]).toBeCloseTo(0.25, 15);
  });

  it('K = 2: the diagonal pulls P̂ halfway to 1/2', () => {
    // include: (0.5 + 0.9)/2 = 0.7, (0.1 + 0.5)/2 = 0.3; exclude: 0.9, 0.1
    const P = [
      [0.5, 0.9],
      [0.1, 0.5],
    ];
    expect(winRates(P).map((v) => +v.toFixed(12))).toEqual([0.7, 0.3]);
    expect(winRates(P, { diagonal: 'exclude' })).toEqual([0.9, 0.1]);
  });

  it('gives every response 1/2 in a balanced cycle (rock-paper-scissors)', () => {
    // each row: 0.5 + 0.7 + 0.3 = 1.5 → 0.5
    const cycle = [
      [0.5, 0.7, 0.3],
      [0.3, 0.5, 0.7],
      [0.7, 0.3, 0.5],
    ];
    for (const v of winRates(cycle)) expect(v).toBeCloseTo(0.5, 15);
  });

  it.each([
    [[[0.5, 0.5], [0.5]], /P is not square: row 1 has 1 entries, expected 2/],
    [[[0.5]], /needs K ≥ 2 responses, got K = 1/],
    [[], /needs K ≥ 2 responses, got K = 0/],
    [
      [
        [0.5, 1.2],
        [-0.2, 0.5],
      ],
      /P\[0\]\[1\] = 1\.2 is not a probability in \[0, 1\]/,
    ],
    [
      [
        [0.5, Number.NaN],
        [0.5, 0.5],
      ],
      /P\[0\]\[1\] = NaN is not a probability/,
    ],
    [
      [
        [0.5, 0.6],
        [0.6, 0.5],
      ],
      /P\[0\]\[1\] \+ P\[1\]\[0\] = 0\.6 \+ 0\.6 = 1\.2, must be 1 \(within 0\.000001\)/,
    ],
    [
      [
        [0.4, 0.5],
        [0.5, 0.5],
      ],
      /P\[0\]\[0\] = 0\.4: the diagonal must be 1\/2/,
    ],
    ['not a matrix', /must be an array of rows/],
    [[[0.5, 0.5], 'row'], /P\[1\] must be an array/],
  ])('refuses a malformed matrix %#', (P, message) => {
    expect(() => winRates(P as number[][])).toThrow(message);
  });

  it('tolerates rounding within 1e-6 in P_ij + P_ji', () => {
    expect(() =>
      winRates([
        [0.5, 0.3 + 5e-7],
        [0.7, 0.5],
      ]),
    ).not.toThrow();
    expect(() =>
      winRates([
        [0.5, 0.3 + 2e-6],
        [0.7, 0.5],
      ]),
    ).toThrow(/must be 1/);
  });

  it('refuses an unknown diagonal mode', () => {
    expect(() => winRates(P3, { diagonal: 'skip' as 'include' })).toThrow(/diagonal must be 'include' or 'exclude'/);
  });
});
