// A user-supplied JavaScript judge `(prompt, a, b) => P(a ≻ b | prompt)` as a PreferenceModel:
// each unordered pair is asked once (i < j) and P_ji = 1 − P_ij, P_ii = ½. A value that is not
// a number in [0, 1] is an unusable verdict (scored ½, counted against maxUnusableFraction), and
// a call that has not settled within callTimeoutMs fails naming the judge.
import { fromUpperTriangle } from './matrix.js';
import {
  checkTimeout,
  definePreferenceModel,
  JudgeTimeoutError,
  mapWithConcurrency,
  withJudgeTimeout,
  type PreferenceModel,
} from './model.js';
import { FUNCTION_JUDGE_DEFAULTS } from './options/function.js';

export type PreferenceFunction = (prompt: string, a: string, b: string) => number | Promise<number>;

export interface FunctionPreferenceOptions {
  /** default `function:<fn.name>`; give one that changes whenever the function's behaviour does */
  id?: string;
  /** pair calls in flight at once within one compare (for async judges); default 1 */
  pairConcurrency?: number;
  /** prompts compared at once by compareBatch; default DEFAULT_JUDGE_CONCURRENCY */
  concurrency?: number;
  /** time limit of one call of the function in ms; default FUNCTION_JUDGE_DEFAULTS */
  callTimeoutMs?: number;
  /** the fraction of a call's verdicts (pairs) that may be unusable; default DEFAULT_MAX_UNUSABLE_FRACTION */
  maxUnusableFraction?: number;
}

/** A returned value for a message: a number as itself, anything else as its type and a short excerpt. */
function shown(v: unknown): string {
  if (typeof v === 'number') return String(v);
  let text: string;
  try {
    text = JSON.stringify(v) ?? String(v);
  } catch {
    text = Object.prototype.toString.call(v);
  }
  return `${typeof v} ${text.length > 80 ? `${text.slice(0, 80)}…` : text}`;
}

export function functionPreference(fn: PreferenceFunction, options: FunctionPreferenceOptions = {}): PreferenceModel {
  if (typeof fn !== 'function') throw new TypeError('functionPreference takes a function (prompt, a, b) => P(a ≻ b)');
  const id = options.id ?? `function:${fn.name || 'anonymous'}`;
  const pairConcurrency = options.pairConcurrency ?? 1;
  const timeoutMs = checkTimeout(options.callTimeoutMs ?? FUNCTION_JUDGE_DEFAULTS.callTimeoutMs, 'functionPreference: callTimeoutMs');
  return definePreferenceModel({
    id,
    concurrency: options.concurrency,
    maxUnusableFraction: options.maxUnusableFraction,
    async compare(prompt, responses, { signal }) {
      const K = responses.length;
      const pairs: [number, number][] = [];
      for (let i = 0; i < K; i++) for (let j = i + 1; j < K; j++) pairs.push([i, j]);
      const upper = new Map<string, number>();
      const unusable: string[] = [];
      await mapWithConcurrency(
        pairs,
        pairConcurrency,
        async ([i, j]) => {
          let v: unknown;
          try {
            v = await withJudgeTimeout(
              id,
              `the call for responses ${i} and ${j}`,
              timeoutMs,
              () => fn(prompt, responses[i], responses[j]),
              signal,
            );
          } catch (err) {
            if (err instanceof JudgeTimeoutError || signal?.aborted) throw err;
            throw new Error(`responses ${i} and ${j}: the preference function threw: ${(err as Error)?.message ?? err}`, { cause: err });
          }
          if (typeof v !== 'number' || Number.isNaN(v) || v < 0 || v > 1)
            unusable.push(
              `responses ${i} and ${j}: the preference function returned ${shown(v)}; ` + 'it must return P(a ≻ b), a number in [0, 1]',
            );
          else upper.set(`${i},${j}`, v);
        },
        signal,
      );
      // an unusable pair stays at ½
      return { P: fromUpperTriangle(K, (i, j) => upper.get(`${i},${j}`)), verdicts: pairs.length, unusable };
    },
  });
}
