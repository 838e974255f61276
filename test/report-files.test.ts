// The run report from a hand-written run directory: the HTML table holds the metrics as the
// terminal shows them, the config and the curves inline; curves.svg is well-formed SVG and
// curves.png a PNG of the SVG's size at PNG_SCALE; everything is rewritten atomically.
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Resvg } from '@resvg/resvg-js';
import { afterAll, describe, expect, it } from 'vitest';
import { parseConfig } from '../lib/config/load.js';
import { demoConfigInput } from '../lib/demo/demo.js';
import { curvesSpec, PNG_SCALE } from '../lib/report/curves.js';
import { readMetrics, writeReport } from '../lib/report/report.js';
import type { IterationMetrics } from '../lib/sppo/run.js';

const root = mkdtempSync(join(tmpdir(), 'sppo-report-'));
afterAll(() => rmSync(root, { recursive: true, force: true }));

const interval = (mean: number, half: number) => ({ mean, low: mean - half, high: mean + half, n: 200 });
const task = (q: number, styles: number[], gap: number, avg: number) => ({
  meanQuality: q,
  styles: { R: styles[0], P: styles[1], S: styles[2], none: styles[3] },
  dualityGap: gap,
  dualityGapAverage: avg,
});
const demoRows: IterationMetrics[] = [
  {
    iteration: 0,
    winRateVsBase: interval(0.5, 0),
    meanResponseLength: 7.2,
    task: task(0.61, [0.6, 0.3, 0.1, 0], 0.31, 0.31),
    seconds: { 'base-eval': 1.5 },
  },
  {
    iteration: 1,
    winRateVsBase: interval(0.58, 0.03),
    winRateVsPrevious: interval(0.58, 0.03),
    meanResponseLength: 7.4,
    meanChosenWinRate: 0.71,
    meanRejectedWinRate: 0.33,
    task: task(0.68, [0.45, 0.35, 0.2, 0], 0.21, 0.21),
    verdicts: { total: 2400, unusable: 0 },
    seconds: { generate: 2, judge: 0.5, train: 5, evaluate: 1 },
  },
  {
    iteration: 2,
    winRateVsBase: interval(0.6384, 0.0312),
    winRateVsPrevious: interval(0.54, 0.03),
    meanResponseLength: 7.36,
    meanChosenWinRate: 0.69,
    meanRejectedWinRate: 0.35,
    task: task(0.74, [0.38, 0.22, 0.4, 0], 0.12, 0.15),
    verdicts: { total: 2400, unusable: 17 },
    seconds: { generate: 2, judge: 0.5, train: 5, evaluate: 1.25 },
  },
];

function runDir(name: string, rows: readonly IterationMetrics[], withConfig = true): string {
  const dir = join(root, name);
  mkdirSync(dir, { recursive: true });
  writeFileSync(join(dir, 'metrics.jsonl'), rows.map((r) => JSON.stringify(r)).join('\n') + '\n');
  if (withConfig)
    writeFileSync(join(dir, 'run.json'), JSON.stringify({ hash: 'h', config: parseConfig(demoConfigInput({ dir, quick: true })) }));
  return dir;
}

/** Width and height from a PNG's IHDR chunk. */
function pngSize(png: Buffer): { width: number; height: number } {
  return { width: png.readUInt32BE(16), height: png.readUInt32BE(20) };
}

function svgSize(svg: string): { width: number; height: number } {
  const m = /^<svg[^>]*\swidth="(\d+(?:\.\d+)?)"[^>]*\sheight="(\d+(?:\.\d+)?)"/.exec(svg);
  if (!m) throw new Error('the SVG has no width and height');
  return { width: Number(m[1]), height: Number(m[2]) };
}

describe('writeReport', () => {
  it('writes the table, config and curves of a demo run', async () => {
    const dir = runDir('demo', demoRows);
    const files = await writeReport(dir);
    expect(files).toEqual({ html: join(dir, 'report.html'), svg: join(dir, 'curves.svg'), png: join(dir, 'curves.png') });
    expect(readdirSync(dir).sort()).toEqual(['curves.png', 'curves.svg', 'metrics.jsonl', 'report.html', 'run.json']);

    const html = readFileSync(files.html, 'utf8');
    const cells = [...html.matchAll(/<tr>(.*?)<\/tr>/g)].map((m) => [...m[1].matchAll(/<t[hd]>(.*?)<\/t[hd]>/g)].map((c) => c[1]));
    expect(cells[0]).toEqual([
      'iteration',
      'win rate vs base',
      'vs previous',
      'mean quality',
      'styles R/P/S/none',
      'duality gap last / avg',
      'P̂ chosen / rejected',
      'response length',
      'unusable verdicts',
      'seconds',
    ]);
    expect(cells.slice(1)).toEqual([
      ['0', '0.500 ± 0.000', '–', '0.610', '0.60/0.30/0.10/0.00', '0.310 / 0.310', '–', '7.2', '–', '1.5'],
      ['1', '0.580 ± 0.030', '0.580 ± 0.030', '0.680', '0.45/0.35/0.20/0.00', '0.210 / 0.210', '0.710 / 0.330', '7.4', '0 / 2400', '8.5'],
      ['2', '0.638 ± 0.031', '0.540 ± 0.030', '0.740', '0.38/0.22/0.40/0.00', '0.120 / 0.150', '0.690 / 0.350', '7.4', '17 / 2400', '8.8'],
    ]);
    // The config section is the run.json config, HTML-escaped; nothing is fetched from elsewhere.
    expect(html).toContain('&quot;loss&quot;: &quot;sppo-pair&quot;');
    expect(html).not.toMatch(/<(script|link|img)\b/);
    expect(html).not.toMatch(/https?:\/\/(?!www\.w3\.org)/);

    const svg = readFileSync(files.svg, 'utf8');
    expect(html).toContain(svg.slice(0, 200));
    // resvg parses with a strict XML parser: it throws on a malformed document.
    const parsed = new Resvg(svg);
    const size = svgSize(svg);
    expect({ width: parsed.width, height: parsed.height }).toEqual(size);
    for (const title of ['Win rate vs base (95% CI)', 'Mean quality', 'Duality gap', 'average policy', 'last iterate'])
      expect(svg).toContain(title);

    const png = readFileSync(files.png);
    expect(png.subarray(0, 8)).toEqual(Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]));
    expect(pngSize(png)).toEqual({ width: Math.round(size.width * PNG_SCALE), height: Math.round(size.height * PNG_SCALE) });
  });

  it('a run without task metrics or run.json gets the win-rate panel and dashes', async () => {
    const rows = demoRows.map(({ task, ...r }) => r);
    const dir = runDir('plain', rows, false);
    const files = await writeReport(dir);
    expect(curvesSpec(rows).hconcat).toHaveLength(1);
    const html = readFileSync(files.html, 'utf8');
    expect(html).toContain('No run.json');
    expect(html).toContain('<td>0.580 ± 0.030</td><td>0.580 ± 0.030</td><td>–</td><td>–</td><td>–</td>');
    expect(readFileSync(files.svg, 'utf8')).not.toContain('Duality gap');
  });

  it('rewrites an existing report in place, leaving no temporary files', async () => {
    const dir = runDir('rewrite', demoRows.slice(0, 2));
    await writeReport(dir);
    writeFileSync(join(dir, 'metrics.jsonl'), demoRows.map((r) => JSON.stringify(r)).join('\n'));
    await writeReport(dir);
    expect(readFileSync(join(dir, 'report.html'), 'utf8')).toContain('0.638 ± 0.031');
    expect(readdirSync(dir).filter((f) => f.includes('.tmp'))).toEqual([]);
  });
});

describe('readMetrics', () => {
  it('names what is wrong with the run directory', async () => {
    await expect(readMetrics(join(root, 'nothing'))).rejects.toThrow(/has no metrics\.jsonl/);
    mkdirSync(join(root, 'bad'));
    writeFileSync(join(root, 'bad', 'metrics.jsonl'), `${JSON.stringify(demoRows[0])}\n{oops\n`);
    await expect(readMetrics(join(root, 'bad'))).rejects.toThrow(/line 2 is not valid JSON/);
    writeFileSync(join(root, 'bad', 'metrics.jsonl'), '\n');
    await expect(readMetrics(join(root, 'bad'))).rejects.toThrow(/is empty/);
  });
});
