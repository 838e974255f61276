// The one engine pass judges need: token rows run in length-sorted, right-padded batches, and
// the final hidden state at each row's own last token projected onto a few vectors (answer-token
// head rows, a reward head) in float64 — never (batch, seq, vocab) logits.
import type { Model } from '../engine/model.js';
import { throwIfAborted } from '../util/abort.js';

/** Options every judge that runs on the engine takes. */
export interface EngineJudgeOptions {
  /** rows per forward pass; default ENGINE_JUDGE_DEFAULTS (at most the model's memory plan's maxBatch) */
  batchSize?: number;
  /** tokens per row; a longer row keeps its first token (BOS) and its last tokens; default ENGINE_JUDGE_DEFAULTS */
  maxSeq?: number;
  /** prompts compared at once by compareBatch (each its own forward passes); default 1 */
  concurrency?: number;
  /** the judge's id (cache keys, config hashes); each judge documents its default */
  id?: string;
  /** names the judge model in the default id (e.g. its directory) */
  label?: string;
  /** dispose the model with the judge; default false (true for the load* functions) */
  ownsModel?: boolean;
}

/**
 * out[n][k] = h_n · vectors[k], h_n the final hidden state at the last token of rows[n].
 * Padding follows each row, so causal attention keeps it from touching the row's own positions.
 */
export async function projectLastTokens(model: Model, rows: readonly (readonly number[])[], vectors: readonly ArrayLike<number>[],
                                        batchSize: number, signal?: AbortSignal, onForward?: () => void): Promise<Float64Array[]> {
  const hidden = model.config.hidden_size;
  const out = rows.map(() => new Float64Array(vectors.length));
  const order = rows.map((_, n) => n).sort((x, y) => rows[x].length - rows[y].length);
  for (let start = 0; start < order.length; start += batchSize) {
    throwIfAborted(signal);
    const chunk = order.slice(start, start + batchSize);
    const seq = rows[chunk[chunk.length - 1]].length;
    const padId = rows[chunk[0]][0];
    const batch = chunk.map((n) => (rows[n].length === seq ? [...rows[n]] : [...rows[n], ...new Array<number>(seq - rows[n].length).fill(padId)]));
    const { hidden: h } = await model.forward(batch, { output: 'hidden', signal });
    onForward?.();
    chunk.forEach((n, r) => {
      const at = (r * seq + rows[n].length - 1) * hidden;
      vectors.forEach((v, k) => {
        let s = 0;
        for (let d = 0; d < hidden; d++) s += h![at + d] * v[d];
        out[n][k] = s;
      });
    });
  }
  return out;
}
