// The PreferenceModel interface every judge implements (a JS function, the synthetic oracle; later
// an LM judge, a reward model, an HTTP judge), and `definePreferenceModel`, which turns a bare
// `compare` into a full model: input and output checks, AbortSignal, disposal, and a batched
// `compareBatch` with bounded concurrency whose errors name the prompt they came from.
import { throwIfAborted } from '../util/abort.js';
import { assertPreferenceMatrix } from './matrix.js';
import { DEFAULT_JUDGE_CONCURRENCY } from './options/common.js';

export interface CompareOptions {
  signal?: AbortSignal;
}

export interface CompareItem {
  prompt: string;
  responses: readonly string[];
}

export interface CompareBatchOptions extends CompareOptions {
  /** prompts compared at once; default: the model's own (DEFAULT_JUDGE_CONCURRENCY unless it says otherwise) */
  concurrency?: number;
  /** called after each prompt's matrix is ready */
  onProgress?: (done: number, total: number) => void;
}

export interface PreferenceModel {
  /**
   * Identifies the judge and its parameters (e.g. `styled-reversal(a=0.25,...)`): part of cache
   * keys and run-config hashes, so two judges that can disagree never share an id.
   */
  readonly id: string;
  /**
   * The K×K matrix P with P_ij ≈ P(y_i ≻ y_j | prompt), P_ij + P_ji = 1, P_ii = ½, K ≥ 2.
   * `prompt` is the user's prompt text (before any chat template).
   */
  compare(prompt: string, responses: readonly string[], options?: CompareOptions): Promise<number[][]>;
  /** One matrix per item, in order. */
  compareBatch(items: readonly CompareItem[], options?: CompareBatchOptions): Promise<number[][][]>;
  /** Frees what the judge holds (a model, a connection); later calls are refused. */
  dispose(): Promise<void>;
  readonly disposed: boolean;
}

/** What a judge must provide; `definePreferenceModel` adds the rest. */
export interface PreferenceModelSpec {
  id: string;
  /** Called with validated input (a string prompt, K ≥ 2 string responses); its matrix is checked. */
  compare(prompt: string, responses: readonly string[], options: CompareOptions): Promise<number[][]> | number[][];
  /** A native batched path (e.g. one forward pass over many prompts); default: compare per item. */
  compareBatch?(items: readonly CompareItem[], options: CompareBatchOptions): Promise<number[][][]>;
  /** default concurrency of the per-item compareBatch */
  concurrency?: number;
  dispose?(): Promise<void> | void;
}

/** Thrown by compareBatch: which prompt failed, with the judge's own error as `cause`. */
export class PreferenceError extends Error {
  readonly promptIndex: number;
  constructor(promptIndex: number, cause: unknown) {
    super(`prompt ${promptIndex}: ${cause instanceof Error ? cause.message : String(cause)}`, { cause });
    this.name = 'PreferenceError';
    this.promptIndex = promptIndex;
  }
}

function checkConcurrency(n: number, what: string): number {
  if (!Number.isInteger(n) || n < 1) throw new RangeError(`${what} must be an integer ≥ 1, got ${n}`);
  return n;
}

function checkItem(prompt: unknown, responses: unknown): void {
  if (typeof prompt !== 'string') throw new TypeError(`the prompt must be a string, got ${typeof prompt}`);
  if (!Array.isArray(responses)) throw new TypeError('responses must be an array of strings');
  if (responses.length < 2) throw new RangeError(`comparing needs at least 2 responses, got ${responses.length}`);
  responses.forEach((r, i) => {
    if (typeof r !== 'string') throw new TypeError(`response ${i} must be a string, got ${typeof r}`);
  });
}

/**
 * Runs `fn` over `items` with at most `concurrency` calls in flight, results in input order.
 * Stops starting new calls after the first failure or an abort, and rejects with that error.
 */
export async function mapWithConcurrency<T, R>(
  items: readonly T[],
  concurrency: number,
  fn: (item: T, index: number) => Promise<R>,
  signal?: AbortSignal,
): Promise<R[]> {
  checkConcurrency(concurrency, 'concurrency');
  const results = new Array<R>(items.length);
  let next = 0;
  let failed = false;
  const worker = async (): Promise<void> => {
    while (!failed && next < items.length) {
      throwIfAborted(signal);
      const i = next++;
      try {
        results[i] = await fn(items[i], i);
      } catch (err) {
        failed = true;
        throw err;
      }
    }
  };
  const workers = Array.from({ length: Math.min(concurrency, items.length) }, worker);
  // allSettled first, so no worker is left running (or rejecting unobserved) after we return
  const settled = await Promise.allSettled(workers);
  const rejected = settled.find((s): s is PromiseRejectedResult => s.status === 'rejected');
  if (rejected) throw rejected.reason;
  throwIfAborted(signal);
  return results;
}

export function definePreferenceModel(spec: PreferenceModelSpec): PreferenceModel {
  if (typeof spec.id !== 'string' || spec.id.length === 0) throw new TypeError('a preference model needs a non-empty string id');
  const defaultConcurrency = checkConcurrency(spec.concurrency ?? DEFAULT_JUDGE_CONCURRENCY, `preference model '${spec.id}': concurrency`);
  let disposed = false;
  const live = (): void => {
    if (disposed) throw new Error(`preference model '${spec.id}' is disposed`);
  };

  const compare = async (prompt: string, responses: readonly string[], options: CompareOptions = {}): Promise<number[][]> => {
    live();
    checkItem(prompt, responses);
    throwIfAborted(options.signal);
    const P = await spec.compare(prompt, responses, options);
    try {
      assertPreferenceMatrix(P, { size: responses.length });
    } catch (err) {
      throw new RangeError(`preference model '${spec.id}' returned a bad matrix: ${(err as Error).message}`, { cause: err });
    }
    return P;
  };

  const compareBatch = async (items: readonly CompareItem[], options: CompareBatchOptions = {}): Promise<number[][][]> => {
    live();
    const given: unknown = items; // JavaScript callers may pass anything
    if (!Array.isArray(given)) throw new TypeError('compareBatch takes an array of { prompt, responses }');
    items.forEach((it, i) => {
      try {
        checkItem(it?.prompt, it?.responses);
      } catch (err) {
        throw new PreferenceError(i, err);
      }
    });
    throwIfAborted(options.signal);
    if (spec.compareBatch) {
      const out = await spec.compareBatch(items, options);
      if (!Array.isArray(out) || out.length !== items.length)
        throw new RangeError(
          `preference model '${spec.id}': compareBatch returned ${Array.isArray(out) ? out.length : 'no'} matrices for ${items.length} prompts`,
        );
      out.forEach((P, i) => {
        try {
          assertPreferenceMatrix(P, { size: items[i].responses.length });
        } catch (err) {
          throw new PreferenceError(i, new RangeError(`preference model '${spec.id}' returned a bad matrix: ${(err as Error).message}`));
        }
      });
      return out;
    }
    const concurrency = checkConcurrency(options.concurrency ?? defaultConcurrency, 'compareBatch concurrency');
    let done = 0;
    return mapWithConcurrency(
      items,
      concurrency,
      async (it, i) => {
        try {
          const P = await compare(it.prompt, it.responses, { signal: options.signal });
          options.onProgress?.(++done, items.length);
          return P;
        } catch (err) {
          if ((err as Error)?.name === 'AbortError' || (options.signal?.aborted && err === options.signal.reason)) throw err;
          throw new PreferenceError(i, err);
        }
      },
      options.signal,
    );
  };

  return {
    id: spec.id,
    compare,
    compareBatch,
    async dispose() {
      if (disposed) return;
      disposed = true;
      await spec.dispose?.();
    },
    get disposed() {
      return disposed;
    },
  };
}
