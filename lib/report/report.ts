// The run report, rebuilt from the run directory alone (metrics.jsonl, and run.json for the
// config): report.html (self-contained: the per-iteration table, the curves as inline SVG, the
// config), curves.svg and curves.png. Every file is written under a temporary name and renamed,
// so a reader never sees half a report.
import path from 'node:path';
import type { RunConfig } from '../config/schema.js';
import type { IterationMetrics } from '../sppo/run.js';
import { RunDir } from '../sppo/run-dir.js';
import { writeFileAtomic } from '../util/atomic-write.js';
import { ITERATION_COLUMNS } from './columns.js';
import { renderCurvesSvg, svgToPng } from './curves.js';

/** The rows of `<dir>/metrics.jsonl`, π_0 first. */
export async function readMetrics(dir: string): Promise<IterationMetrics[]> {
  return RunDir.at(dir).readMetrics();
}

const HTML_ESCAPES: Record<string, string> = { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' };
const escapeHtml = (s: string) => s.replace(/[&<>"']/g, (c) => HTML_ESCAPES[c]);

export interface ReportContent {
  title: string;
  rows: readonly IterationMetrics[];
  config?: RunConfig;
  curvesSvg: string;
}

export function reportHtml({ title, rows, config, curvesSvg }: ReportContent): string {
  const head = ITERATION_COLUMNS.map((c) => `<th>${escapeHtml(c.header)}</th>`).join('');
  const body = rows.map((r) => `<tr>${ITERATION_COLUMNS.map((c) => `<td>${escapeHtml(c.cell(r))}</td>`).join('')}</tr>`).join('\n');
  const configSection = config
    ? `<h2>Configuration</h2>\n<pre>${escapeHtml(JSON.stringify(config, null, 2))}</pre>`
    : '<p>No run.json: the configuration is unknown.</p>';
  return `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>${escapeHtml(title)}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { border-bottom: 1px solid #ddd; padding: 0.3em 0.8em; text-align: right; }
th { background: #f4f4f4; }
pre { background: #f7f7f7; padding: 1em; overflow-x: auto; }
</style>
</head>
<body>
<h1>${escapeHtml(title)}</h1>
<p>Iteration 0 is the base policy π_0. Win rates are P(π_t ≻ π) on held-out prompts with a 95% confidence interval;
P̂ chosen / rejected are the mean estimated win rates of the training pairs' responses against π_{t−1}.
Unusable verdicts are the judge's answers of iteration t that could not be read (scored ½), out of all it gave.</p>
<h2>Per iteration</h2>
<table>
<thead><tr>${head}</tr></thead>
<tbody>
${body}
</tbody>
</table>
<h2>Curves</h2>
${curvesSvg.replace(/^<\?xml[^>]*>\s*/, '')}
${configSection}
</body>
</html>
`;
}

export interface ReportFiles {
  html: string;
  svg: string;
  png: string;
}

/** (Re)writes the report of the run in `dir` from its files; returns the paths written. */
export async function writeReport(dir: string): Promise<ReportFiles> {
  const run = RunDir.at(dir);
  const rows = await run.readMetrics();
  const config = (await run.readRun())?.config;
  const curvesSvg = await renderCurvesSvg(rows);
  const files: ReportFiles = run.reportFiles;
  await writeFileAtomic(files.svg, curvesSvg);
  await writeFileAtomic(files.png, svgToPng(curvesSvg));
  await writeFileAtomic(files.html, reportHtml({ title: `SPPO run ${path.basename(run.root)}`, rows, config, curvesSvg }));
  return files;
}
