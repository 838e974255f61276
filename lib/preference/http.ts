// A pairwise judge behind any OpenAI-compatible chat-completions endpoint: each ordered pair of
// responses is one request (1 token, temperature 0, top-5 logprobs), both orders are averaged to
// remove position bias, and every verdict is cached on disk the moment it arrives, so a killed run
// never pays twice for the same comparison. Requests are bounded by a semaphore, timed out, their
// bodies read up to maxResponseBytes, and retried with exponential backoff (Retry-After
// respected) on 429, 5xx, network errors, bodies that are not a chat completion and answers that
// cannot be read (naming neither A nor B, or a non-finite logprob). An answer still unreadable
// after the last retry is an unusable verdict: scored ½, counted, never cached. No secret (the
// API key) appears in an error, and a baseUrl with credentials is refused.
import { createHash } from 'node:crypto';
import { excerpt, jsonCache, judgeTransport, type JudgeTransportOptions } from './http-transport.js';
import { fromUpperTriangle } from './matrix.js';
import { definePreferenceModel, type PreferenceModel } from './model.js';
import { baseUrlProblem, DEFAULT_JUDGE_TEMPLATE, missingPlaceholders } from './options/http.js';

export interface HttpJudgeOptions extends JudgeTransportOptions {
  /** the API root, e.g. `https://api.openai.com/v1`; requests go to `<baseUrl>/chat/completions` */
  baseUrl: string;
  /** the `model` field of each request */
  model: string;
  /** the user message, with {prompt}, {a} (the response shown first) and {b}; default DEFAULT_JUDGE_TEMPLATE */
  template?: string;
  /** an optional system message */
  system?: string;
  /** one JSON file per answered comparison; none: no disk cache */
  cacheDir?: string;
  /** prompts compared at once by compareBatch; default DEFAULT_JUDGE_CONCURRENCY */
  concurrency?: number;
  /** the fraction of a call's verdicts (ordered comparisons) that may be unusable; default DEFAULT_MAX_UNUSABLE_FRACTION */
  maxUnusableFraction?: number;
}

/** Counts since the judge was made. */
export interface HttpJudgeStats {
  /** HTTP requests sent, retries included */
  requests: number;
  /** attempts that failed (or gave an unreadable answer) and were tried again */
  retries: number;
  /** comparisons answered from the disk cache */
  cacheHits: number;
  /** comparisons answered by the endpoint (cached unless unparseable) */
  answers: number;
  /** answers read from the first token's top logprobs */
  fromLogprobs: number;
  /** answers read from the text */
  fromText: number;
  /** answers still unreadable after every retry (naming neither A nor B, or a non-finite logprob): scored ½, never cached */
  unparseable: number;
}

export interface HttpJudge extends PreferenceModel {
  readonly stats: HttpJudgeStats;
}

/** One ordered comparison's result: P(first ≻ second) and how it was read. */
interface Verdict {
  p: number;
  source: 'logprobs' | 'text' | 'unparseable';
  /** an excerpt of the answer's text (1 token, unless the server ignores max_tokens), for inspection */
  text: string;
  /** why an unparseable answer could not be read */
  reason?: string;
}

const REQUEST_PARAMS = { max_tokens: 1, temperature: 0, logprobs: true, top_logprobs: 5 } as const;

/** Fills {prompt}, {a}, {b} in one pass, so a response that contains "{b}" is left alone. */
export function renderJudgeTemplate(template: string, prompt: string, a: string, b: string): string {
  const values: Record<string, string> = { prompt, a, b };
  return template.replace(/\{(prompt|a|b)\}/g, (_, k: string) => values[k]);
}

/** Removes the leading spaces (and SentencePiece / byte-BPE space markers) from a token's text. */
function letterOf(token: string): string {
  return token.replace(/^[\s\u2581\u0120]+/, '');
}

/**
 * P(first ≻ second) from one chat completion's first choice:
 * - logprobs: the first token's `top_logprobs`, probability mass of tokens that read 'A' (after
 *   leading spaces) against those that read 'B', renormalised over the two — used when either
 *   letter is among them;
 * - else the text: a first word that is the letter 'A' → 1 or 'B' → 0 ('A', ' B.', 'A is
 *   better'), anything else ('Both are good', prose, nothing) → ½, an unparseable answer.
 * Returns undefined for a body that is not a chat completion (no choices, no message, no text
 * and no logprobs): the caller retries it.
 */
export function verdictFromCompletion(body: unknown): Verdict | undefined {
  const choice = (body as { choices?: unknown[] } | null)?.choices?.[0] as
    | { message?: { content?: unknown }; logprobs?: { content?: { top_logprobs?: { token?: unknown; logprob?: unknown }[] }[] } | null }
    | undefined;
  if (!choice || typeof choice !== 'object') return undefined;
  const content = choice.message?.content;
  const text = typeof content === 'string' ? excerpt(content) : '';
  const top = choice.logprobs?.content?.[0]?.top_logprobs;
  if (Array.isArray(top)) {
    let a = 0;
    let b = 0;
    for (const t of top) {
      if (typeof t?.token !== 'string') continue;
      const letter = letterOf(t.token);
      if (letter !== 'A' && letter !== 'B') continue;
      // -Infinity is a probability of 0; NaN, +Infinity or a missing number is no probability at all
      if (typeof t.logprob !== 'number' || Number.isNaN(t.logprob) || t.logprob === Infinity)
        return { p: 0.5, source: 'unparseable', text, reason: `a non-finite logprob (${String(t.logprob)}) for '${letter}'` };
      if (letter === 'A') a += Math.exp(t.logprob);
      else b += Math.exp(t.logprob);
    }
    if (!Number.isFinite(a + b))
      return { p: 0.5, source: 'unparseable', text, reason: 'logprobs for A and B whose probabilities overflow' };
    if (a + b > 0) return { p: a / (a + b), source: 'logprobs', text };
  }
  if (typeof content !== 'string') return undefined;
  // the letter alone, not the first letter of a word ('Both', 'As an AI')
  const first = /^\s*([AB])(?![\p{L}\p{N}])/u.exec(content)?.[1];
  if (first === 'A') return { p: 1, source: 'text', text };
  if (first === 'B') return { p: 0, source: 'text', text };
  return {
    p: 0.5,
    source: 'unparseable',
    text,
    reason: content.trim() === '' ? 'an empty answer' : `the answer ${JSON.stringify(text)} names neither A nor B`,
  };
}

/**
 * The HTTP judge. P_ij = ½(q(i, j) + 1 − q(j, i)) where q(x, y) = P(x ≻ y) with x shown as A,
 * so P_ij + P_ji = 1 and a judge that always answers 'A' scores every pair ½. Identical
 * responses are scored ½ without a request.
 */
export function httpJudge(options: HttpJudgeOptions): HttpJudge {
  const baseUrl = options.baseUrl?.replace(/\/+$/, '');
  if (!baseUrl) throw new TypeError('httpJudge: baseUrl is required (e.g. https://api.openai.com/v1)');
  // never echo the URL: it may hold a secret
  const urlProblem = baseUrlProblem(baseUrl);
  if (urlProblem) throw new TypeError(`httpJudge: baseUrl ${urlProblem}`);
  if (!options.model) throw new TypeError('httpJudge: model is required');
  const url = `${baseUrl}/chat/completions`;
  const template = options.template ?? DEFAULT_JUDGE_TEMPLATE;
  const missing = missingPlaceholders(template);
  if (missing.length > 0) throw new RangeError(`httpJudge: the template lacks ${missing.join(', ')}`);
  const transport = judgeTransport({ who: 'HTTP judge', api: 'httpJudge', url }, options);
  // a verdict is a few hundred bytes; an unparseable one (which older versions cached) is asked again
  const cache = jsonCache(options.cacheDir, (json): Verdict | undefined => {
    const v = json as Partial<Verdict> | null;
    if (typeof v?.p === 'number' && v.p >= 0 && v.p <= 1 && (v.source === 'logprobs' || v.source === 'text'))
      return { p: v.p, source: v.source, text: typeof v.text === 'string' ? excerpt(v.text) : '' };
    return undefined;
  });

  // Everything that changes an answer, and nothing secret: the key's hash and the judge's id.
  const identity = { url, model: options.model, template, system: options.system ?? null, ...REQUEST_PARAMS };
  const identityHash = createHash('sha256').update(JSON.stringify(identity)).digest('hex');
  const id = `http(${options.model}@${baseUrl},${identityHash.slice(0, 12)})`;

  const stats: HttpJudgeStats = transport.withStats({ cacheHits: 0, answers: 0, fromLogprobs: 0, fromText: 0, unparseable: 0 });
  // the same ordered comparison asked twice at once (duplicate responses) is one request
  const pending = new Map<string, Promise<Verdict>>();

  const cacheKey = (prompt: string, first: string, second: string): string =>
    createHash('sha256')
      .update(JSON.stringify([identityHash, prompt, first, second]))
      .digest('hex');

  async function ask(prompt: string, first: string, second: string, signal?: AbortSignal): Promise<Verdict> {
    const messages = [
      ...(options.system !== undefined ? [{ role: 'system', content: options.system }] : []),
      { role: 'user', content: renderJudgeTemplate(template, prompt, first, second) },
    ];
    const body = JSON.stringify({ model: options.model, messages, ...REQUEST_PARAMS });
    const { value } = await transport.post<Verdict>(
      body,
      (json) => {
        const verdict = verdictFromCompletion(json);
        if (!verdict) return { malformed: 'a body that is not a chat completion (no choices[0].message.content or logprobs)' };
        return verdict.source === 'unparseable' ? { value: verdict, unusable: verdict.reason ?? 'unreadable' } : { value: verdict };
      },
      signal,
    );
    return value;
  }

  function tally(v: Verdict): Verdict {
    if (v.source === 'logprobs') stats.fromLogprobs++;
    else if (v.source === 'text') stats.fromText++;
    else stats.unparseable++;
    return v;
  }

  /** q(first, second): from the cache, a request already in flight, or a new request. */
  function judgeOrdered(prompt: string, first: string, second: string, signal?: AbortSignal): Promise<Verdict> {
    const key = cacheKey(prompt, first, second);
    const inFlight = pending.get(key);
    if (inFlight) return inFlight;
    const work = (async () => {
      const cached = await cache.read(key);
      if (cached) {
        stats.cacheHits++;
        return tally(cached);
      }
      const v = await ask(prompt, first, second, signal);
      stats.answers++;
      // an unparseable verdict is never cached: asked again next time; the file holds a bounded excerpt of the answer
      if (v.source !== 'unparseable') await cache.write(key, { p: v.p, source: v.source, text: excerpt(v.text), model: options.model });
      return tally(v);
    })().finally(() => pending.delete(key));
    pending.set(key, work);
    return work;
  }

  const model = definePreferenceModel({
    id,
    concurrency: options.concurrency,
    maxUnusableFraction: options.maxUnusableFraction,
    async compare(prompt, responses, { signal }) {
      const K = responses.length;
      const pairs: [number, number][] = [];
      for (let i = 0; i < K; i++) for (let j = i + 1; j < K; j++) if (responses[i] !== responses[j]) pairs.push([i, j]);
      const asks = pairs.flatMap(([i, j]) => [
        judgeOrdered(prompt, responses[i], responses[j], signal),
        judgeOrdered(prompt, responses[j], responses[i], signal),
      ]);
      // settle every request (each is cached as it lands) before reporting the first failure
      const settled = await Promise.allSettled(asks);
      const failed = settled.find((s): s is PromiseRejectedResult => s.status === 'rejected');
      if (failed) throw failed.reason;
      const verdicts = settled.map((s) => (s as PromiseFulfilledResult<Verdict>).value);
      const q = verdicts.map((v) => v.p); // ½ for an unparseable one
      const upper = new Map(pairs.map(([i, j], n) => [`${i},${j}`, (q[2 * n] + 1 - q[2 * n + 1]) / 2]));
      const unusable = verdicts.flatMap((v, n) => {
        if (v.source !== 'unparseable') return [];
        const [i, j] = n % 2 === 0 ? pairs[n >> 1] : [pairs[n >> 1][1], pairs[n >> 1][0]];
        return [`responses ${i} and ${j} (${i} shown as A): ${v.reason}`];
      });
      return { P: fromUpperTriangle(K, (i, j) => upper.get(`${i},${j}`)), verdicts: verdicts.length, unusable };
    },
  });
  return Object.assign(model, { stats });
}
