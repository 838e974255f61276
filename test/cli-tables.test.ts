// Terminal tables: the report's columns, aligned (P̂'s combining hat takes no column), and the
// side-by-side comparison of `sppo demo --compare` with each run's name over its columns.
import { describe, expect, it } from 'vitest';
import { compareTable, metricsTable, textTable } from '../lib/cli/table.js';
import type { IterationMetrics } from '../lib/sppo/run.js';

const row = (iteration: number, mean: number, quality: number): IterationMetrics => ({
  iteration,
  winRateVsBase: { mean, low: mean - 0.01, high: mean + 0.01, n: 10 },
  meanResponseLength: 5,
  task: { meanQuality: quality, styles: { R: 1, P: 0, S: 0, none: 0 }, dualityGap: 0.5, dualityGapAverage: 0.25 },
  seconds: { train: 2 },
});

describe('tables', () => {
  it('aligns every column to its widest cell', () => {
    const lines = textTable(
      ['a', 'P̂ x'],
      [
        ['1', '22'],
        ['333', '4'],
      ],
    ).split('\n');
    expect(lines).toEqual(['  a  P̂ x', '───  ───', '  1   22', '333    4']);
  });

  it('metricsTable has one row per iteration with the report columns', () => {
    const lines = metricsTable([row(0, 0.5, 0.8), row(1, 0.625, 0.9)]).split('\n');
    expect(lines).toHaveLength(4);
    expect(lines[0]).toMatch(/^iteration\s+win rate vs base\s+vs previous\s+mean quality/);
    expect(lines[3].trim().split(/\s{2,}/)).toEqual([
      '1',
      '0.625 ± 0.010',
      '–',
      '0.900',
      '1.00/0.00/0.00/0.00',
      '0.500 / 0.250',
      '–',
      '5.0',
      '–',
      '2.0',
    ]);
  });

  it('compareTable puts the runs side by side, a missing iteration as a dash', () => {
    const lines = compareTable([
      { name: 'sppo-pair', metrics: [row(0, 0.5, 0.8), row(1, 0.6, 0.9)] },
      { name: 'dpo', metrics: [row(0, 0.5, 0.8)] },
    ]).split('\n');
    expect(lines[0]).toMatch(/^\s+sppo-pair\s+dpo$/);
    expect(lines[0].indexOf('dpo')).toBe(lines[1].indexOf('win rate vs base', lines[1].indexOf('last / avg')));
    expect(lines[4].trim().split(/\s{2,}/)).toEqual(['1', '0.600 ± 0.010', '0.900', '0.500 / 0.250', '–', '–', '–']);
  });
});
