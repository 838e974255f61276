// A judge that is any ranker served over HTTP (a Python PairRM, a reward model, a tournament):
// each prompt is one POST of {prompt, responses}, answered by a K×K matrix of P(i ≻ j) or by a
// list of per-pair probabilities. The transport is the HTTP judge's (request concurrency,
// timeouts, retries with backoff, the body cap, the API key, the disk cache), and so is the rule
// for unusable verdicts: an answer that is not a matrix or pair list of this K is retried and
// then an error naming the problem; an entry that is not a probability in [0, 1] (null, NaN,
// Infinity, 1.2) is retried, then scored ½ and counted.
import { createHash } from 'node:crypto';
import { excerpt, jsonCache, judgeTransport, type JudgeTransportOptions, type ReadAnswer } from './http-transport.js';
import { assertPreferenceMatrix } from './matrix.js';
import { definePreferenceModel, type PreferenceModel } from './model.js';
import { baseUrlProblem } from './options/http.js';

export interface PairwiseHttpJudgeOptions extends JudgeTransportOptions {
  /** where {prompt, responses} is POSTed */
  url: string;
  /** one JSON file per prompt whose answer was fully usable; none: no disk cache */
  cacheDir?: string;
  /** prompts compared at once by compareBatch; default DEFAULT_JUDGE_CONCURRENCY */
  concurrency?: number;
  /** the fraction of a call's verdicts (ordered comparisons) that may be unusable; default DEFAULT_MAX_UNUSABLE_FRACTION */
  maxUnusableFraction?: number;
}

export interface PairwiseHttpJudgeStats {
  /** HTTP requests sent, retries included */
  requests: number;
  /** attempts that failed (or gave an answer with unusable entries) and were tried again */
  retries: number;
  /** prompts answered from the disk cache */
  cacheHits: number;
  /** prompts answered by the endpoint */
  answers: number;
  /** ordered comparisons still unusable after every retry: scored ½ */
  unusable: number;
}

export interface PairwiseHttpJudge extends PreferenceModel {
  readonly stats: PairwiseHttpJudgeStats;
}

/** One answer read: every ordered comparison the ranker gave, usable or not. */
export interface PairwiseAnswer {
  /** q[i][j] = the ranker's P(i ≻ j), undefined where it gave none or an unusable one */
  q: (number | undefined)[][];
  /** ordered comparisons the answer holds */
  verdicts: number;
  /** why each unusable entry was unusable */
  unusable: string[];
}

/**
 * JSON as Python's json.dumps writes it by default: NaN, Infinity and -Infinity (outside strings)
 * become the strings "NaN", "Infinity" and "-Infinity", so such an entry is an unusable verdict
 * that names its value rather than a body that is not JSON.
 */
export function parsePythonJson(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch (err) {
    const patched = text.replace(/"(?:[^"\\]|\\.)*"|(-?Infinity|NaN)/g, (m, bare: string | undefined) => (bare ? `"${bare}"` : m));
    if (patched === text) throw err;
    return JSON.parse(patched);
  }
}

const describeValue = (v: unknown): string => (typeof v === 'string' ? v : v === undefined ? 'nothing' : JSON.stringify(v));

const isIndex = (v: unknown, K: number): v is number => Number.isInteger(v) && (v as number) >= 0 && (v as number) < K;

/**
 * A ranker's answer for K responses: `{matrix}` (or a bare K×K array), M[i][j] = P(i ≻ j), the
 * diagonal ignored; or `{pairs: [{i, j, p}, …]}`, p = P(i ≻ j), covering every pair {i, j} in at
 * least one order and no ordered pair twice. Anything else is `malformed` (naming what is wrong);
 * an entry that is not a number in [0, 1] is an unusable verdict.
 */
export function readPairwiseAnswer(json: unknown, K: number): ReadAnswer<PairwiseAnswer> {
  const q: (number | undefined)[][] = Array.from({ length: K }, () => new Array<number | undefined>(K));
  const unusable: string[] = [];
  const given = new Set<string>(); // ordered pairs (i, j) the answer holds, usable or not
  const take = (i: number, j: number, v: unknown): void => {
    given.add(`${i},${j}`);
    if (typeof v === 'number' && v >= 0 && v <= 1) q[i][j] = v;
    else unusable.push(`P(${i} ≻ ${j}) = ${describeValue(v)} is not a probability in [0, 1]`);
  };
  const obj = json !== null && typeof json === 'object' && !Array.isArray(json) ? (json as Record<string, unknown>) : undefined;
  const matrix = Array.isArray(json) ? json : obj?.matrix;
  let verdicts: number;
  if (matrix !== undefined) {
    if (!Array.isArray(matrix)) return { malformed: `a "matrix" that is not an array of rows` };
    if (matrix.length !== K) return { malformed: `a matrix of ${matrix.length} rows for ${K} responses` };
    for (let i = 0; i < K; i++) {
      const row: unknown = matrix[i];
      if (!Array.isArray(row) || row.length !== K)
        return {
          malformed: `a matrix whose row ${i} ${Array.isArray(row) ? `has ${row.length} entries` : 'is not an array'}, expected ${K}`,
        };
      for (let j = 0; j < K; j++) if (i !== j) take(i, j, row[j]);
    }
    verdicts = K * (K - 1);
  } else if (obj?.pairs !== undefined) {
    if (!Array.isArray(obj.pairs)) return { malformed: `"pairs" that is not an array` };
    for (const [n, pair] of (obj.pairs as unknown[]).entries()) {
      const { i, j, p } = (pair ?? {}) as { i?: unknown; j?: unknown; p?: unknown };
      if (!isIndex(i, K) || !isIndex(j, K) || i === j)
        return {
          malformed: `pairs[${n}] whose i and j (${describeValue(i)}, ${describeValue(j)}) are not two different indices in [0, ${K})`,
        };
      if (given.has(`${i},${j}`)) return { malformed: `pairs[${n}]: the pair (${i}, ${j}) given twice` };
      take(i, j, p);
    }
    for (let i = 0; i < K; i++)
      for (let j = i + 1; j < K; j++)
        if (!given.has(`${i},${j}`) && !given.has(`${j},${i}`)) return { malformed: `pairs that leave out the pair (${i}, ${j})` };
    verdicts = obj.pairs.length;
  } else return { malformed: 'a body with neither "matrix" nor "pairs"' };
  const value = { q, verdicts, unusable };
  return unusable.length > 0 ? { value, unusable: unusable.slice(0, 3).join('; ') } : { value };
}

/**
 * P from an answer: P_ij = ½(q_ij + 1 − q_ji) where both orders are usable (averaging out a
 * ranker's position bias, so P_ij + P_ji = 1), the one that is where only one is, ½ where none is.
 */
export function matrixFromAnswer(K: number, q: readonly (readonly (number | undefined)[])[]): number[][] {
  const P = Array.from({ length: K }, () => new Array<number>(K).fill(0.5));
  for (let i = 0; i < K; i++)
    for (let j = i + 1; j < K; j++) {
      const a = q[i][j];
      const b = q[j][i];
      const p = a !== undefined && b !== undefined ? (a + 1 - b) / 2 : a !== undefined ? a : b !== undefined ? 1 - b : 0.5;
      P[i][j] = p;
      P[j][i] = 1 - p;
    }
  return P;
}

export function pairwiseHttpJudge(options: PairwiseHttpJudgeOptions): PairwiseHttpJudge {
  const url = options.url;
  if (!url) throw new TypeError('pairwiseHttpJudge: url is required (where {prompt, responses} is POSTed)');
  const urlProblem = baseUrlProblem(url); // never echo the URL: it may hold a secret
  if (urlProblem) throw new TypeError(`pairwiseHttpJudge: url ${urlProblem}`);
  const transport = judgeTransport({ who: 'pairwise HTTP judge', api: 'pairwiseHttpJudge', url, parse: parsePythonJson }, options);
  const identityHash = createHash('sha256')
    .update(JSON.stringify({ kind: 'pairwise-http', url }))
    .digest('hex');
  const { origin, pathname } = new URL(url);
  const id = `pairwise-http(${origin}${pathname},${identityHash.slice(0, 12)})`;

  // only fully usable answers are cached: a matrix and the count of verdicts behind it
  const cache = jsonCache(options.cacheDir, (json) => {
    const c = json as { P?: unknown; verdicts?: unknown } | null;
    return Array.isArray(c?.P) && Number.isInteger(c.verdicts) ? { P: c.P as unknown, verdicts: c.verdicts as number } : undefined;
  });
  const stats: PairwiseHttpJudgeStats = transport.withStats({ cacheHits: 0, answers: 0, unusable: 0 });

  const model = definePreferenceModel({
    id,
    concurrency: options.concurrency,
    maxUnusableFraction: options.maxUnusableFraction,
    async compare(prompt, responses, { signal }) {
      const K = responses.length;
      const key = createHash('sha256')
        .update(JSON.stringify([identityHash, prompt, responses]))
        .digest('hex');
      const cached = await cache.read(key);
      if (cached) {
        try {
          assertPreferenceMatrix(cached.P, { size: K });
          stats.cacheHits++;
          return { P: cached.P, verdicts: cached.verdicts, unusable: [] };
        } catch {
          // a damaged file is asked again (and overwritten)
        }
      }
      const { value } = await transport.post<PairwiseAnswer>(
        JSON.stringify({ prompt, responses }),
        (json) => readPairwiseAnswer(json, K),
        signal,
      );
      stats.answers++;
      stats.unusable += value.unusable.length;
      const P = matrixFromAnswer(K, value.q);
      if (value.unusable.length === 0) await cache.write(key, { P, verdicts: value.verdicts });
      return { P, verdicts: value.verdicts, unusable: value.unusable.map(excerpt) };
    },
  });
  return Object.assign(model, { stats });
}
