// The per-iteration metrics shown to people: one column list shared by the terminal tables and
// the HTML report, so both always show the same numbers formatted the same way.
import type { Interval, IterationMetrics } from '../sppo/run.js';

/** The styled-reversal task's metrics (IterationMetrics.task of the demo); absent for other runs. */
export interface TaskMetrics {
  meanQuality?: number;
  styles?: { R: number; P: number; S: number; none?: number };
  dualityGap?: number;
  dualityGapAverage?: number;
}

/** IterationMetrics.task is free-form: take the known fields only when they have the right type. */
export function taskMetrics(row: IterationMetrics): TaskMetrics {
  const t = row.task ?? {};
  const num = (v: unknown) => (typeof v === 'number' && Number.isFinite(v) ? v : undefined);
  const s = t.styles as Record<string, unknown> | undefined;
  const styles =
    s && typeof s === 'object' && [s.R, s.P, s.S].every((v) => typeof v === 'number')
      ? { R: s.R as number, P: s.P as number, S: s.S as number, none: num(s.none) }
      : undefined;
  return { meanQuality: num(t.meanQuality), styles, dualityGap: num(t.dualityGap), dualityGapAverage: num(t.dualityGapAverage) };
}

export const MISSING = '–';

const fixed = (v: number | undefined) => (v === undefined ? MISSING : v.toFixed(3));

/** `0.623 ± 0.041` (the 95% interval's half width). */
export function formatInterval(i: Interval | undefined): string {
  return i ? `${i.mean.toFixed(3)} ± ${((i.high - i.low) / 2).toFixed(3)}` : MISSING;
}

const pair = (a: number | undefined, b: number | undefined) => (a === undefined && b === undefined ? MISSING : `${fixed(a)} / ${fixed(b)}`);

export function totalSeconds(row: IterationMetrics): number {
  return Object.values(row.seconds).reduce((a: number, b) => a + (b ?? 0), 0);
}

export interface Column {
  header: string;
  cell(row: IterationMetrics): string;
}

export const COLUMNS = {
  iteration: { header: 'iteration', cell: (r) => String(r.iteration) },
  winRateVsBase: { header: 'win rate vs base', cell: (r) => formatInterval(r.winRateVsBase) },
  winRateVsPrevious: { header: 'vs previous', cell: (r) => formatInterval(r.winRateVsPrevious) },
  meanQuality: { header: 'mean quality', cell: (r) => fixed(taskMetrics(r).meanQuality) },
  styles: {
    header: 'styles R/P/S/none',
    cell: (r) => {
      const s = taskMetrics(r).styles;
      return s ? [s.R, s.P, s.S, s.none ?? 0].map((v) => v.toFixed(2)).join('/') : MISSING;
    },
  },
  dualityGap: { header: 'duality gap last / avg', cell: (r) => pair(taskMetrics(r).dualityGap, taskMetrics(r).dualityGapAverage) },
  chosenRejected: { header: 'P̂ chosen / rejected', cell: (r) => pair(r.meanChosenWinRate, r.meanRejectedWinRate) },
  responseLength: { header: 'response length', cell: (r) => r.meanResponseLength.toFixed(1) },
  unusableVerdicts: { header: 'unusable verdicts', cell: (r) => (r.verdicts ? `${r.verdicts.unusable} / ${r.verdicts.total}` : MISSING) },
  seconds: { header: 'seconds', cell: (r) => totalSeconds(r).toFixed(1) },
} satisfies Record<string, Column>;

/** Every column, in table order. */
export const ITERATION_COLUMNS: readonly Column[] = Object.values(COLUMNS);
