// One iteration's training set from judged samples: per prompt, K responses with their raw
// reference log-probs and the judge's matrix P → win rates P̂ → either one (winner, loser) pair
// per prompt (the reference code) or every response with its own P̂ (the paper's Algorithm 1).
import { datasetModeForLoss, type DatasetMode, type PreferenceLossName } from '../engine/losses.js';
import type { PreferenceExample, PreferencePair } from '../engine/types.js';
import { winRates, type WinRateDiagonal } from './winrates.js';

/** Throws unless `mode` is what `loss` reads. */
export function checkLossMode(loss: PreferenceLossName, mode: DatasetMode): void {
  const want = datasetModeForLoss(loss);
  if (mode !== want)
    throw new RangeError(
      want === 'all'
        ? `loss '${loss}' trains on every response with its own P̂: it needs mode 'all', not '${mode}'`
        : `loss '${loss}' trains on (chosen, rejected) pairs: it needs mode 'pair', not '${mode}'`,
    );
}

export interface SampledResponse {
  /** response token ids (what the loss scores) */
  tokens: readonly number[];
  /** log π_t(response | prompt): the sum of the raw-policy per-token log-probs from sampling */
  refLogp: number;
  /** the decoded text the judge saw */
  text?: string;
}

export interface JudgedPrompt {
  /** prompt token ids (chat template applied) */
  prompt: readonly number[];
  responses: readonly SampledResponse[];
  /** the judge's K×K matrix, P[i][j] ≈ P(y_i ≻ y_j | x) */
  preference: readonly (readonly number[])[];
}

export interface DatasetOptions {
  mode: DatasetMode;
  /** how P̂ treats P_ii (default 'include', as the reference) */
  diagonal?: WinRateDiagonal;
  /**
   * Win rates closer than this count as equal (default 1e-12: rounding in the row sums must not
   * pick a winner). Ties go to the LOWEST index for both the winner and the loser (numpy's
   * argmax / argmin, as the reference code); all K equal → the prompt gives no pair.
   */
  tieTolerance?: number;
}

/** Which responses of which prompt a pair was built from. */
export interface PairSource {
  prompt: number;
  chosen: number;
  rejected: number;
}

export interface DatasetStats {
  prompts: number;
  /** prompts whose K win rates were all equal (no winner): no pair was made ('pair' mode only) */
  skippedTies: number;
  /** mean P̂ of the chosen / rejected responses ('pair' mode) */
  meanChosenWinRate?: number;
  meanRejectedWinRate?: number;
  /** mean response length in tokens, over every sampled response */
  meanResponseTokens: number;
}

export type TrainingSet =
  | { mode: 'pair'; pairs: PreferencePair[]; sources: PairSource[]; skipped: number[]; winRates: number[][]; stats: DatasetStats }
  | { mode: 'all'; examples: PreferenceExample[]; winRates: number[][]; stats: DatasetStats };

/** Winner and loser indices of a P̂ vector, or null when all are equal within `tolerance`. */
export function selectPair(rates: readonly number[], tolerance = 1e-12): { chosen: number; rejected: number } | null {
  if (rates.length < 2) throw new RangeError(`selecting a pair needs at least 2 win rates, got ${rates.length}`);
  const max = Math.max(...rates);
  const min = Math.min(...rates);
  if (max - min <= tolerance) return null;
  return { chosen: rates.findIndex((r) => r >= max - tolerance), rejected: rates.findIndex((r) => r <= min + tolerance) };
}

function checkPrompt(item: JudgedPrompt, n: number): void {
  const where = `prompt ${n}`;
  if (!item || !Array.isArray(item.prompt) || item.prompt.length === 0)
    throw new RangeError(`${where}: the prompt token ids are missing or empty`);
  if (!Array.isArray(item.responses) || item.responses.length < 2)
    throw new RangeError(`${where}: needs at least 2 responses, got ${Array.isArray(item.responses) ? item.responses.length : 'none'}`);
  if (!Array.isArray(item.preference) || item.preference.length !== item.responses.length)
    throw new RangeError(
      `${where}: the preference matrix has ${Array.isArray(item.preference) ? item.preference.length : 'no'} rows for ${item.responses.length} responses`,
    );
  item.responses.forEach((r: SampledResponse, i) => {
    if (!Array.isArray(r.tokens) || r.tokens.length === 0)
      throw new RangeError(`${where}, response ${i}: the response token ids are missing or empty`);
    if (typeof r.refLogp !== 'number' || !Number.isFinite(r.refLogp) || r.refLogp > 1e-6)
      throw new RangeError(`${where}, response ${i}: refLogp must be a finite log-probability ≤ 0, got ${r.refLogp}`);
  });
}

export function buildTrainingSet(items: readonly JudgedPrompt[], options: DatasetOptions): TrainingSet {
  const { mode } = options;
  if (mode !== 'pair' && mode !== 'all') throw new RangeError(`mode must be 'pair' or 'all', got ${JSON.stringify(mode)}`);
  const tolerance = options.tieTolerance ?? 1e-12;
  if (!(tolerance >= 0)) throw new RangeError(`tieTolerance must be ≥ 0, got ${tolerance}`);
  const allRates: number[][] = [];
  let tokens = 0;
  let responses = 0;
  items.forEach((item, n) => {
    checkPrompt(item, n);
    try {
      allRates.push(winRates(item.preference, { diagonal: options.diagonal }));
    } catch (err) {
      throw new RangeError(`prompt ${n}: ${(err as Error).message}`, { cause: err });
    }
    for (const r of item.responses) tokens += r.tokens.length;
    responses += item.responses.length;
  });
  const baseStats = { prompts: items.length, meanResponseTokens: responses ? tokens / responses : 0 };

  if (mode === 'all') {
    const examples: PreferenceExample[] = [];
    items.forEach((item, n) =>
      item.responses.forEach((r, i) =>
        examples.push({ prompt: [...item.prompt], response: [...r.tokens], refLogp: r.refLogp, target: allRates[n][i] }),
      ),
    );
    return { mode, examples, winRates: allRates, stats: { ...baseStats, skippedTies: 0 } };
  }

  const pairs: PreferencePair[] = [];
  const sources: PairSource[] = [];
  const skipped: number[] = [];
  let chosenSum = 0;
  let rejectedSum = 0;
  items.forEach((item, n) => {
    const rates = allRates[n];
    const sel = selectPair(rates, tolerance);
    if (!sel) {
      skipped.push(n);
      return;
    }
    const w = item.responses[sel.chosen];
    const l = item.responses[sel.rejected];
    pairs.push({
      prompt: [...item.prompt],
      chosen: { response: [...w.tokens], refLogp: w.refLogp, target: rates[sel.chosen] },
      rejected: { response: [...l.tokens], refLogp: l.refLogp, target: rates[sel.rejected] },
      q: item.preference[sel.chosen][sel.rejected],
    });
    sources.push({ prompt: n, ...sel });
    chosenSum += rates[sel.chosen];
    rejectedSum += rates[sel.rejected];
  });
  return {
    mode,
    pairs,
    sources,
    skipped,
    winRates: allRates,
    stats: {
      ...baseStats,
      skippedTies: skipped.length,
      meanChosenWinRate: pairs.length ? chosenSum / pairs.length : undefined,
      meanRejectedWinRate: pairs.length ? rejectedSum / pairs.length : undefined,
    },
  };
}
