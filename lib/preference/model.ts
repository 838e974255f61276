// The PreferenceModel interface every judge implements (a JS function, the synthetic oracle, an
// LM judge, a reward model, an HTTP judge), and `definePreferenceModel`, which turns a bare
// `compare` into a full model: input and output checks, AbortSignal, disposal, a batched
// `compareBatch` with bounded concurrency whose errors name the prompt they came from, and one
// rule for unusable verdicts: a judge reports them (an answer that names neither response, a
// non-finite logprob or reward, a value outside [0, 1]), they are scored ½, counted, and a call
// with more of them than its maxUnusableFraction fails. Also the time limit of one call into a
// judge (`withJudgeTimeout`), so a call that never settles fails with the judge's name.
import { abortError, throwIfAborted } from '../util/abort.js';
import { assertPreferenceMatrix } from './matrix.js';
import { DEFAULT_JUDGE_CONCURRENCY, DEFAULT_MAX_UNUSABLE_FRACTION } from './options/common.js';

export interface CompareOptions {
  signal?: AbortSignal;
  /**
   * A call whose unusable verdicts are more than this fraction of its verdicts fails with an
   * UnusableVerdictsError (0: none allowed, 1: never fails); default the model's own.
   */
  maxUnusableFraction?: number;
}

/** One prompt's matrix and the verdicts behind it. */
export interface Judgment {
  /** the K×K matrix; an unusable verdict counts as ½ in it */
  P: number[][];
  /** the verdicts behind P; what one is, is the judge's: an ordered comparison (http, lm-judge), a pair (function), a response's reward (reward-model) */
  verdicts: number;
  /** why each unusable verdict was unusable, one short line each (empty when every verdict was usable) */
  unusable: string[];
}

/** A batch's matrices, one per item in order, and the verdicts behind them over the whole batch. */
export interface BatchJudgment {
  matrices: number[][][];
  verdicts: number;
  /** how many of them were unusable (each scored ½) */
  unusable: number;
  /** the first few unusable verdicts' reasons, each naming its prompt */
  examples: string[];
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
  /** compare's matrix with the verdicts behind it. */
  judge(prompt: string, responses: readonly string[], options?: CompareOptions): Promise<Judgment>;
  /** compareBatch's matrices with the verdicts behind them, counted over the batch. */
  judgeBatch(items: readonly CompareItem[], options?: CompareBatchOptions): Promise<BatchJudgment>;
  /** the fraction of unusable verdicts a call accepts when its options give none */
  readonly maxUnusableFraction: number;
  /** Frees what the judge holds (a model, a connection); later calls are refused. */
  dispose(): Promise<void>;
  readonly disposed: boolean;
}

/** What a judge must provide; `definePreferenceModel` adds the rest. */
export interface PreferenceModelSpec {
  id: string;
  /**
   * Called with validated input (a string prompt, K ≥ 2 string responses); its matrix is
   * checked. A judge that can give unusable verdicts returns a Judgment naming them (a bare
   * matrix counts as K(K − 1)/2 usable verdicts).
   */
  compare(prompt: string, responses: readonly string[], options: CompareOptions): Promise<number[][] | Judgment> | number[][] | Judgment;
  /** A native batched path (e.g. one forward pass over many prompts); default: compare per item. */
  compareBatch?(items: readonly CompareItem[], options: CompareBatchOptions): Promise<(number[][] | Judgment)[]>;
  /** default concurrency of the per-item compareBatch */
  concurrency?: number;
  /** the default of CompareOptions.maxUnusableFraction; default DEFAULT_MAX_UNUSABLE_FRACTION */
  maxUnusableFraction?: number;
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

/** A call got more unusable verdicts than its maxUnusableFraction allows; the message gives the count and examples. */
export class UnusableVerdictsError extends Error {
  override name = 'UnusableVerdictsError';

  constructor(
    readonly judgeId: string,
    readonly unusable: number,
    readonly verdicts: number,
    readonly maxUnusableFraction: number,
    readonly examples: readonly string[],
    /** where it happened (e.g. a run's stage) and the setting's name there (e.g. a config field) */
    context: { stage?: string; field?: string } = {},
  ) {
    const field = context.field ?? 'maxUnusableFraction';
    super(
      `${context.stage ? `${context.stage}: ` : ''}preference model '${judgeId}': ${unusable} of ${verdicts} verdicts ` +
        `(${percent(unusable / verdicts)}) were unusable, more than ${field} = ${percent(maxUnusableFraction)} allows; ` +
        `e.g. ${examples.join('; ')}. An unusable verdict (an answer that names neither response, a non-finite logprob ` +
        `or reward, a value outside [0, 1]) would be scored ½: check the judge (its endpoint, model, template or function), or raise ${field}`,
    );
  }
}

const percent = (x: number): string => `${Number((100 * x).toPrecision(3))}%`;

/** A call into a judge (a function call, a forward pass) did not settle within its time limit. */
export class JudgeTimeoutError extends Error {
  override name = 'JudgeTimeoutError';
}

/**
 * Runs one call into the judge `judgeId` with a time limit: past `timeoutMs` (none: no limit)
 * the call's signal aborts and the returned promise rejects with a JudgeTimeoutError naming the
 * judge, `what` and the limit, whether or not the call itself ever settles. The pending timer
 * keeps the process alive, so a call that never settles fails with that error instead of Node
 * exiting silently (code 13) with nothing left to run. An abort of `signal` rejects at once.
 */
export function withJudgeTimeout<T>(
  judgeId: string,
  what: string,
  timeoutMs: number | undefined,
  call: (signal: AbortSignal) => T | Promise<T>,
  signal?: AbortSignal,
): Promise<T> {
  throwIfAborted(signal);
  const controller = new AbortController();
  return new Promise<T>((resolve, reject) => {
    let timer: NodeJS.Timeout | undefined;
    const settle = (): void => {
      clearTimeout(timer);
      signal?.removeEventListener('abort', onAbort);
    };
    const fail = (err: Error): void => {
      settle();
      controller.abort(err);
      reject(err);
    };
    const onAbort = (): void => {
      if (signal) fail(abortError(signal)); // only ever added to signal
    };
    if (timeoutMs !== undefined)
      timer = setTimeout(
        () => fail(new JudgeTimeoutError(`preference model '${judgeId}': ${what} did not settle within ${timeoutMs} ms (callTimeoutMs)`)),
        timeoutMs,
      );
    signal?.addEventListener('abort', onAbort, { once: true });
    Promise.resolve()
      .then(() => call(controller.signal))
      .then(
        (v) => {
          settle();
          resolve(v);
        },
        (err: unknown) => {
          settle();
          reject(err instanceof Error ? err : new Error(String(err)));
        },
      );
  });
}

/** A time limit in ms: an integer ≥ 1, or undefined for none. */
export function checkTimeout(ms: number | undefined, what: string): number | undefined {
  if (ms !== undefined && !(Number.isInteger(ms) && ms >= 1)) throw new RangeError(`${what} must be an integer ≥ 1 (ms), got ${ms}`);
  return ms;
}

function checkFraction(x: number, what: string): number {
  if (typeof x !== 'number' || !(x >= 0 && x <= 1)) throw new RangeError(`${what} must be a number in [0, 1], got ${x}`);
  return x;
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

/** How many examples of unusable verdicts an error or a BatchJudgment carries. */
const EXAMPLES = 3;

/** A spec's output as a Judgment, its matrix checked against K responses (a RangeError naming what is wrong). */
function toJudgment(out: number[][] | Judgment, K: number): Judgment {
  const judgment: Judgment = Array.isArray(out) ? { P: out, verdicts: (K * (K - 1)) / 2, unusable: [] } : out;
  const { P, verdicts, unusable } = (judgment ?? {}) as Partial<Judgment>;
  assertPreferenceMatrix(P, { size: K });
  if (!Number.isInteger(verdicts) || (verdicts as number) < 0 || !Array.isArray(unusable) || unusable.length > (verdicts as number))
    throw new RangeError(
      `a judgment needs a verdict count ≥ 0 and at most that many unusable reasons, got ${verdicts} and ${describeList(unusable)}`,
    );
  return judgment;
}

const describeList = (v: unknown): string => (Array.isArray(v) ? `${v.length}` : typeof v);

export function definePreferenceModel(spec: PreferenceModelSpec): PreferenceModel {
  if (typeof spec.id !== 'string' || spec.id.length === 0) throw new TypeError('a preference model needs a non-empty string id');
  const defaultConcurrency = checkConcurrency(spec.concurrency ?? DEFAULT_JUDGE_CONCURRENCY, `preference model '${spec.id}': concurrency`);
  const defaultMaxUnusable = checkFraction(
    spec.maxUnusableFraction ?? DEFAULT_MAX_UNUSABLE_FRACTION,
    `preference model '${spec.id}': maxUnusableFraction`,
  );
  let disposed = false;
  const live = (): void => {
    if (disposed) throw new Error(`preference model '${spec.id}' is disposed`);
  };
  const badMatrix = (err: unknown): RangeError =>
    new RangeError(`preference model '${spec.id}' returned a bad matrix: ${(err as Error).message}`, { cause: err });

  /** Throws an UnusableVerdictsError when the batch's unusable verdicts are more than the call allows. */
  const enforce = (b: BatchJudgment, options: CompareOptions): BatchJudgment => {
    const max = checkFraction(options.maxUnusableFraction ?? defaultMaxUnusable, 'maxUnusableFraction');
    if (b.unusable > max * b.verdicts) throw new UnusableVerdictsError(spec.id, b.unusable, b.verdicts, max, b.examples);
    return b;
  };

  /** The judgments of a batch summed up; examples name their prompt when there is more than one. */
  const total = (judgments: readonly Judgment[]): BatchJudgment => {
    const examples: string[] = [];
    judgments.forEach((j, i) => {
      for (const why of j.unusable) if (examples.length < EXAMPLES) examples.push(judgments.length > 1 ? `prompt ${i}: ${why}` : why);
    });
    return {
      matrices: judgments.map((j) => j.P),
      verdicts: judgments.reduce((a, j) => a + j.verdicts, 0),
      unusable: judgments.reduce((a, j) => a + j.unusable.length, 0),
      examples,
    };
  };

  /** One prompt, checked, without the unusable-verdict limit (the caller applies it). */
  const judgeOne = async (prompt: string, responses: readonly string[], signal: AbortSignal | undefined): Promise<Judgment> => {
    live();
    checkItem(prompt, responses);
    throwIfAborted(signal);
    const out = await spec.compare(prompt, responses, { signal });
    try {
      return toJudgment(out, responses.length);
    } catch (err) {
      throw badMatrix(err);
    }
  };

  const judge = async (prompt: string, responses: readonly string[], options: CompareOptions = {}): Promise<Judgment> => {
    const j = await judgeOne(prompt, responses, options.signal);
    enforce(total([j]), options);
    return j;
  };

  const judgeBatch = async (items: readonly CompareItem[], options: CompareBatchOptions = {}): Promise<BatchJudgment> => {
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
      const judgments = out.map((o, i) => {
        try {
          return toJudgment(o, items[i].responses.length);
        } catch (err) {
          throw new PreferenceError(i, badMatrix(err));
        }
      });
      return enforce(total(judgments), options);
    }
    const concurrency = checkConcurrency(options.concurrency ?? defaultConcurrency, 'compareBatch concurrency');
    let done = 0;
    const judgments = await mapWithConcurrency(
      items,
      concurrency,
      async (it, i) => {
        try {
          const j = await judgeOne(it.prompt, it.responses, options.signal);
          options.onProgress?.(++done, items.length);
          return j;
        } catch (err) {
          if ((err as Error)?.name === 'AbortError' || (options.signal?.aborted && err === options.signal.reason)) throw err;
          throw new PreferenceError(i, err);
        }
      },
      options.signal,
    );
    return enforce(total(judgments), options);
  };

  return {
    id: spec.id,
    maxUnusableFraction: defaultMaxUnusable,
    compare: async (prompt, responses, options) => (await judge(prompt, responses, options)).P,
    compareBatch: async (items, options) => (await judgeBatch(items, options)).matrices,
    judge,
    judgeBatch,
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
