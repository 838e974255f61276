// Plain-text tables for the terminal, with the report's columns (lib/report/columns.ts).
import { COLUMNS, ITERATION_COLUMNS, MISSING, type Column } from '../report/columns.js';
import type { IterationMetrics } from '../sppo/run.js';

// Combining marks (the hat of P̂) take no column of their own.
const displayWidth = (s: string) => [...s.replace(/\p{M}/gu, '')].length;

/** A label over `span` adjacent columns. */
export interface ColumnGroup {
  label: string;
  span: number;
}

/** Columns padded to their widest cell, right-aligned (numbers read best so); optional group labels above. */
export function textTable(headers: readonly string[], rows: readonly (readonly string[])[], groups: readonly ColumnGroup[] = []): string {
  const widths = headers.map((h, i) => Math.max(displayWidth(h), ...rows.map((r) => displayWidth(r[i]))));
  const line = (cells: readonly string[]) => cells.map((c, i) => ' '.repeat(widths[i] - displayWidth(c)) + c).join('  ');
  let at = 0;
  const groupLine = groups.map(({ label, span }) => {
    const width = widths.slice(at, (at += span)).reduce((a, w) => a + w + 2, -2);
    return label.padEnd(width);
  });
  return [
    ...(groups.length ? [groupLine.join('  ').trimEnd()] : []),
    line(headers),
    widths.map((w) => '─'.repeat(w)).join('  '),
    ...rows.map(line),
  ].join('\n');
}

export function metricsTable(rows: readonly IterationMetrics[]): string {
  return textTable(
    ITERATION_COLUMNS.map((c) => c.header),
    rows.map((r) => ITERATION_COLUMNS.map((c) => c.cell(r))),
  );
}

/** One row per iteration, the runs side by side under their names (`sppo demo --compare`). */
export function compareTable(runs: readonly { name: string; metrics: readonly IterationMetrics[] }[]): string {
  const shown: Column[] = [COLUMNS.winRateVsBase, COLUMNS.meanQuality, COLUMNS.dualityGap];
  const iterations = [...new Set(runs.flatMap((r) => r.metrics.map((m) => m.iteration)))].sort((a, b) => a - b);
  const headers = ['iteration', ...runs.flatMap(() => shown.map((c) => c.header))];
  const rows = iterations.map((t) => [
    String(t),
    ...runs.flatMap((r) => {
      const row = r.metrics.find((m) => m.iteration === t);
      return shown.map((c) => (row ? c.cell(row) : MISSING));
    }),
  ]);
  return textTable(headers, rows, [{ label: '', span: 1 }, ...runs.map((r) => ({ label: r.name, span: shown.length }))]);
}
