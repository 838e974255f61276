// The one engine pass judges need: token rows run in length-sorted, right-padded batches, and
// the final hidden state at each row's own last token projected onto a few vectors (answer-token
// head rows, a reward head) in float64 — never (batch, seq, vocab) logits — each forward pass
// under the judge's time limit. Also how an engine judge takes a batch of prompts: `concurrency`
// of them at a time, their rows sharing batches.
import type { Model } from '../engine/model.js';
import { throwIfAborted } from '../util/abort.js';
import { withJudgeTimeout, type CompareBatchOptions, type CompareItem, type Judgment } from './model.js';

/** Options every judge that runs on the engine takes. */
export interface EngineJudgeOptions {
  /** rows per forward pass; default ENGINE_JUDGE_DEFAULTS (at most the model's memory plan's maxBatch) */
  batchSize?: number;
  /** tokens per row; a longer row keeps its first token (BOS) and its last tokens; default ENGINE_JUDGE_DEFAULTS */
  maxSeq?: number;
  /** prompts compareBatch judges at once, their rows pooled into shared forward passes; default DEFAULT_JUDGE_CONCURRENCY */
  concurrency?: number;
  /** the judge's id (cache keys, config hashes); each judge documents its default */
  id?: string;
  /** names the judge model in the default id (e.g. its directory) */
  label?: string;
  /** dispose the model with the judge; default false (true for the load* functions) */
  ownsModel?: boolean;
  /** time limit of one forward pass in ms; default ENGINE_JUDGE_DEFAULTS */
  callTimeoutMs?: number;
  /** the fraction of a call's verdicts that may be unusable (non-finite logits or rewards); default DEFAULT_MAX_UNUSABLE_FRACTION */
  maxUnusableFraction?: number;
}

export interface ProjectOptions {
  signal?: AbortSignal;
  /** called after each forward pass */
  onForward?: () => void;
  /** the judge, named by a forward pass that runs past timeoutMs */
  judgeId?: string;
  /** time limit of one forward pass in ms; none: no limit */
  timeoutMs?: number;
}

/**
 * out[n][k] = h_n · vectors[k], h_n the final hidden state at the last token of rows[n].
 * Padding follows each row, so causal attention keeps it from touching the row's own positions.
 */
export async function projectLastTokens(
  model: Model,
  rows: readonly (readonly number[])[],
  vectors: readonly ArrayLike<number>[],
  batchSize: number,
  { signal, onForward, judgeId = 'engine judge', timeoutMs }: ProjectOptions = {},
): Promise<Float64Array[]> {
  const hidden = model.config.hidden_size;
  const out = rows.map(() => new Float64Array(vectors.length));
  const order = rows.map((_, n) => n).sort((x, y) => rows[x].length - rows[y].length);
  for (let start = 0; start < order.length; start += batchSize) {
    throwIfAborted(signal);
    const chunk = order.slice(start, start + batchSize);
    const seq = rows[chunk[chunk.length - 1]].length;
    const padId = rows[chunk[0]][0];
    const batch = chunk.map((n) =>
      rows[n].length === seq ? [...rows[n]] : [...rows[n], ...new Array<number>(seq - rows[n].length).fill(padId)],
    );
    const { hidden: h } = await withJudgeTimeout(
      judgeId,
      `a forward pass of ${batch.length} rows × ${seq} tokens`,
      timeoutMs,
      (s) => model.forward(batch, { output: 'hidden', signal: s }),
      signal,
    );
    if (!h) throw new Error('the engine returned no hidden states for output: hidden');
    onForward?.();
    chunk.forEach((n, r) => {
      const at = (r * seq + rows[n].length - 1) * hidden;
      vectors.forEach((v, k) => {
        let s = 0;
        for (let d = 0; d < hidden; d++) s += h[at + d] * v[d];
        out[n][k] = s;
      });
    });
  }
  return out;
}

/**
 * An engine judge's compareBatch: the items in groups of `concurrency` prompts (the call's
 * option, else the judge's), each group's rows judged together by `judgeGroup`, progress after
 * each group. More prompts at once fill the batches better; fewer report progress sooner and
 * hold fewer rows.
 */
export async function judgeInGroups(
  items: readonly CompareItem[],
  concurrency: number,
  options: CompareBatchOptions,
  judgeGroup: (group: readonly CompareItem[], signal?: AbortSignal) => Promise<Judgment[]>,
): Promise<Judgment[]> {
  const n = options.concurrency ?? concurrency;
  if (!Number.isInteger(n) || n < 1) throw new RangeError(`compareBatch concurrency must be an integer ≥ 1, got ${n}`);
  const out: Judgment[] = [];
  for (let start = 0; start < items.length; start += n) {
    throwIfAborted(options.signal);
    out.push(...(await judgeGroup(items.slice(start, start + n), options.signal)));
    options.onProgress?.(out.length, items.length);
  }
  return out;
}
