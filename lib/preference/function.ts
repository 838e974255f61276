// A user-supplied JavaScript judge `(prompt, a, b) => P(a ≻ b | prompt)` as a PreferenceModel:
// each unordered pair is asked once (i < j) and P_ji = 1 − P_ij, P_ii = ½.
import { throwIfAborted } from '../util/abort.js';
import { fromUpperTriangle } from './matrix.js';
import { definePreferenceModel, mapWithConcurrency, type PreferenceModel } from './model.js';

export type PreferenceFunction = (prompt: string, a: string, b: string) => number | Promise<number>;

export interface FunctionPreferenceOptions {
  /** default `function:<fn.name>`; give one that changes whenever the function's behaviour does */
  id?: string;
  /** pair calls in flight at once within one compare (for async judges); default 1 */
  pairConcurrency?: number;
  /** prompts compared at once by compareBatch; default DEFAULT_JUDGE_CONCURRENCY */
  concurrency?: number;
}

export function functionPreference(fn: PreferenceFunction, options: FunctionPreferenceOptions = {}): PreferenceModel {
  if (typeof fn !== 'function') throw new TypeError('functionPreference takes a function (prompt, a, b) => P(a ≻ b)');
  const id = options.id ?? `function:${fn.name || 'anonymous'}`;
  const pairConcurrency = options.pairConcurrency ?? 1;
  return definePreferenceModel({
    id,
    concurrency: options.concurrency,
    async compare(prompt, responses, { signal }) {
      const K = responses.length;
      const pairs: [number, number][] = [];
      for (let i = 0; i < K; i++) for (let j = i + 1; j < K; j++) pairs.push([i, j]);
      const upper = new Map<string, number>();
      await mapWithConcurrency(
        pairs,
        pairConcurrency,
        async ([i, j]) => {
          throwIfAborted(signal);
          let v: unknown;
          try {
            v = await fn(prompt, responses[i], responses[j]);
          } catch (err) {
            throw new Error(`responses ${i} and ${j}: the preference function threw: ${(err as Error)?.message ?? err}`, { cause: err });
          }
          if (typeof v !== 'number' || Number.isNaN(v) || v < 0 || v > 1)
            throw new RangeError(
              `responses ${i} and ${j}: the preference function returned ${typeof v === 'number' ? v : `${typeof v} ${JSON.stringify(v)}`}; ` +
                'it must return P(a ≻ b), a number in [0, 1]',
            );
          upper.set(`${i},${j}`, v);
        },
        signal,
      );
      return fromUpperTriangle(K, (i, j) => upper.get(`${i},${j}`));
    },
  });
}
