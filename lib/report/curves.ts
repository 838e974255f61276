// The run's curves per iteration: win rate against π_0 with its 95% band, and for the
// styled-reversal task the mean quality and the duality gap of the last iterate and of the
// average policy (the paper's guarantee is about the average). A vega-lite spec is compiled to
// vega, drawn headless to SVG, and rasterised by resvg, so no browser or canvas is needed.
import { Resvg } from '@resvg/resvg-js';
import * as vega from 'vega';
import * as vegaLite from 'vega-lite';
import type { IterationMetrics } from '../sppo/run.js';
import { taskMetrics } from './columns.js';

const FONT = 'Helvetica, Arial, sans-serif';
// resvg falls back to its default family (not to the generic sans-serif) when no listed family
// is installed, as on most Linux machines; DejaVu Sans is the sans-serif font they usually have.
const FALLBACK_FONT = 'DejaVu Sans';
const PANEL = { width: 260, height: 200 };
/** PNG pixels per SVG unit: crisp on high-density screens and in slides. */
export const PNG_SCALE = 2;

type Spec = Record<string, unknown>;

const iterationAxis = { field: 'iteration', type: 'quantitative', title: 'iteration', axis: { tickMinStep: 1, format: 'd' } };

function panel(title: string, layers: Spec[]): Spec {
  return { title, ...PANEL, layer: layers };
}

function line(field: string, title: string, extra: Spec = {}): Spec {
  return {
    mark: { type: 'line', point: true },
    encoding: { x: iterationAxis, y: { field, type: 'quantitative', title, scale: { zero: false } }, ...extra },
  };
}

/** The vega-lite spec of the curves (exported so the report and tests read the same spec). */
export function curvesSpec(rows: readonly IterationMetrics[]): Spec {
  const data = rows.map((r) => {
    const t = taskMetrics(r);
    return {
      iteration: r.iteration,
      winRate: r.winRateVsBase.mean,
      low: r.winRateVsBase.low,
      high: r.winRateVsBase.high,
      meanQuality: t.meanQuality,
      'last iterate': t.dualityGap,
      'average policy': t.dualityGapAverage,
    };
  });
  const panels: Spec[] = [
    panel('Win rate vs base (95% CI)', [
      {
        mark: { type: 'area', opacity: 0.25 },
        encoding: { x: iterationAxis, y: { field: 'low', type: 'quantitative' }, y2: { field: 'high' } },
      },
      line('winRate', 'P(π_t ≻ π_0)'),
      { mark: { type: 'rule', strokeDash: [4, 4], color: 'gray' }, encoding: { y: { datum: 0.5 } } },
    ]),
  ];
  if (data.some((d) => d.meanQuality !== undefined)) panels.push(panel('Mean quality', [line('meanQuality', 'E q(y)')]));
  if (data.some((d) => d['last iterate'] !== undefined))
    panels.push({
      title: 'Duality gap',
      ...PANEL,
      transform: [{ fold: ['last iterate', 'average policy'], as: ['policy', 'gap'] }, { filter: 'isValid(datum.gap)' }],
      ...line('gap', 'duality gap', { color: { field: 'policy', type: 'nominal', title: null } }),
    });
  return {
    $schema: 'https://vega.github.io/schema/vega-lite/v6.json',
    data: { values: data },
    hconcat: panels,
    config: { font: FONT, background: 'white' },
  };
}

/** The curves as a standalone SVG document. */
export async function renderCurvesSvg(rows: readonly IterationMetrics[]): Promise<string> {
  const { spec } = vegaLite.compile(curvesSpec(rows) as unknown as vegaLite.TopLevelSpec);
  const view = new vega.View(vega.parse(spec), { renderer: 'none' });
  try {
    return await view.toSVG();
  } finally {
    view.finalize();
  }
}

/** Rasterises an SVG at PNG_SCALE with the system's fonts. */
export function svgToPng(svg: string): Buffer {
  const resvg = new Resvg(svg, {
    fitTo: { mode: 'zoom', value: PNG_SCALE },
    font: { loadSystemFonts: true, defaultFontFamily: FALLBACK_FONT },
  });
  return resvg.render().asPng();
}
