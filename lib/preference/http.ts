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
import { readFile, stat } from 'node:fs/promises';
import path from 'node:path';
import { abortError, throwIfAborted } from '../util/abort.js';
import { writeJsonAtomic } from '../util/atomic-write.js';
import { fromUpperTriangle } from './matrix.js';
import { definePreferenceModel, type PreferenceModel } from './model.js';
import { baseUrlProblem, DEFAULT_JUDGE_TEMPLATE, HTTP_JUDGE_DEFAULTS, missingPlaceholders } from './options/http.js';

export interface HttpJudgeOptions {
  /** the API root, e.g. `https://api.openai.com/v1`; requests go to `<baseUrl>/chat/completions` */
  baseUrl: string;
  /** the `model` field of each request */
  model: string;
  /** name of the environment variable holding the API key (sent as `Authorization: Bearer`); none: no header */
  apiKeyEnv?: string;
  /** the user message, with {prompt}, {a} (the response shown first) and {b}; default DEFAULT_JUDGE_TEMPLATE */
  template?: string;
  /** an optional system message */
  system?: string;
  /** HTTP requests in flight at once, over all prompts; default HTTP_JUDGE_DEFAULTS */
  requestConcurrency?: number;
  /** per-attempt limit in ms, body included; default HTTP_JUDGE_DEFAULTS */
  timeoutMs?: number;
  /** retries after the first attempt; default HTTP_JUDGE_DEFAULTS */
  maxRetries?: number;
  /** first backoff in ms (doubled per retry, jittered, capped at maxBackoffMs); default 500 */
  backoffMs?: number;
  /** default 30 000 (a server's Retry-After is waited in full, up to 10 minutes) */
  maxBackoffMs?: number;
  /** one JSON file per answered comparison; none: no disk cache */
  cacheDir?: string;
  /** prompts compared at once by compareBatch; default DEFAULT_JUDGE_CONCURRENCY */
  concurrency?: number;
  /** a response body longer than this many bytes fails the request (read as a stream, never buffered whole); default HTTP_JUDGE_DEFAULTS */
  maxResponseBytes?: number;
  /** the fraction of a call's verdicts (ordered comparisons) that may be unusable; default DEFAULT_MAX_UNUSABLE_FRACTION */
  maxUnusableFraction?: number;
  /** where apiKeyEnv is looked up; default process.env */
  env?: Record<string, string | undefined>;
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

/** The most characters of an answer kept (in a verdict, the cache, an error). */
const EXCERPT_CHARS = 200;

const REQUEST_PARAMS = { max_tokens: 1, temperature: 0, logprobs: true, top_logprobs: 5 } as const;

/** A cache file larger than this is not a verdict this version wrote. */
const MAX_CACHE_FILE_BYTES = 16 * 1024;

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

/** A counting semaphore: at most `limit` holders at once, waiters served in order. */
class Semaphore {
  private held = 0;
  private readonly waiting: (() => void)[] = [];
  constructor(private readonly limit: number) {}
  async acquire(): Promise<void> {
    if (this.held < this.limit) {
      this.held++;
      return;
    }
    await new Promise<void>((resolve) => this.waiting.push(resolve));
  }
  release(): void {
    const next = this.waiting.shift();
    if (next)
      next(); // the slot passes straight to the next waiter
    else this.held--;
  }
}

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) {
      reject(abortError(signal));
      return;
    }
    const onAbort = (): void => {
      clearTimeout(timer);
      if (signal) reject(abortError(signal)); // only ever added to signal
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

/** Retry-After (seconds or an HTTP date) or retry-after-ms, in ms; undefined when absent. */
function retryAfterMs(headers: Headers): number | undefined {
  const ms = Number(headers.get('retry-after-ms'));
  if (headers.has('retry-after-ms') && Number.isFinite(ms) && ms >= 0) return ms;
  const ra = headers.get('retry-after');
  if (ra === null) return undefined;
  const s = Number(ra);
  if (Number.isFinite(s) && s >= 0) return s * 1000;
  const date = Date.parse(ra);
  return Number.isNaN(date) ? undefined : Math.max(0, date - Date.now());
}

function excerpt(s: string): string {
  // cut before collapsing the spaces, so a huge text is never copied whole
  const one = s
    .slice(0, 4 * EXCERPT_CHARS)
    .replace(/\s+/g, ' ')
    .trim();
  return one.length > EXCERPT_CHARS ? `${one.slice(0, EXCERPT_CHARS)}…` : one;
}

/**
 * A response's body as text, read as a stream up to `cap` bytes: a longer one (by its
 * content-length, or by what arrives) is cancelled and fails the attempt, so an endless or huge
 * body never holds more than `cap` bytes in memory.
 */
async function readBodyCapped(res: Response, cap: number): Promise<string> {
  const tooLong = (): AttemptError =>
    new AttemptError(`the response body is longer than maxResponseBytes (${cap} bytes); the request was cancelled`, false);
  if (!res.body) return '';
  if (Number(res.headers.get('content-length')) > cap) {
    await res.body.cancel();
    throw tooLong();
  }
  const reader = res.body.getReader();
  const chunks: Uint8Array[] = [];
  let bytes = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    bytes += value.byteLength;
    if (bytes > cap) {
      await reader.cancel();
      throw tooLong();
    }
    chunks.push(value);
  }
  return Buffer.concat(chunks).toString('utf8');
}

/** A failed attempt: `retry` says whether another may succeed; `waitMs` is the server's Retry-After. */
class AttemptError extends Error {
  constructor(
    message: string,
    readonly retry: boolean,
    readonly waitMs?: number,
  ) {
    super(message);
  }
}

function positiveInteger(v: number, what: string): number {
  if (!Number.isInteger(v) || v < 1) throw new RangeError(`httpJudge: ${what} must be an integer ≥ 1, got ${v}`);
  return v;
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
  const env = options.env ?? process.env;
  let apiKey: string | undefined;
  if (options.apiKeyEnv !== undefined) {
    apiKey = env[options.apiKeyEnv];
    if (!apiKey) throw new Error(`httpJudge: the environment variable ${options.apiKeyEnv} (apiKeyEnv) is not set`);
    // checked here, since fetch's own error would quote the header, key included
    if (!/^[\x21-\x7e]+$/.test(apiKey))
      throw new Error(
        `httpJudge: the environment variable ${options.apiKeyEnv} (apiKeyEnv) holds characters an HTTP header cannot carry (spaces, line breaks, non-ASCII)`,
      );
  }
  /** A message with the API key (if it ever appears, say in a server's error body) blotted out. */
  const redact = (message: string): string => (apiKey ? message.split(apiKey).join('[API key]') : message);
  const maxResponseBytes = positiveInteger(options.maxResponseBytes ?? HTTP_JUDGE_DEFAULTS.maxResponseBytes, 'maxResponseBytes');
  const timeoutMs = positiveInteger(options.timeoutMs ?? HTTP_JUDGE_DEFAULTS.timeoutMs, 'timeoutMs');
  const maxRetries = options.maxRetries ?? HTTP_JUDGE_DEFAULTS.maxRetries;
  if (!Number.isInteger(maxRetries) || maxRetries < 0)
    throw new RangeError(`httpJudge: maxRetries must be an integer ≥ 0, got ${maxRetries}`);
  const backoffMs = options.backoffMs ?? 500;
  const maxBackoffMs = options.maxBackoffMs ?? 30_000;
  const semaphore = new Semaphore(
    positiveInteger(options.requestConcurrency ?? HTTP_JUDGE_DEFAULTS.requestConcurrency, 'requestConcurrency'),
  );
  const cacheDir = options.cacheDir;

  // Everything that changes an answer, and nothing secret: the key's hash and the judge's id.
  const identity = { url, model: options.model, template, system: options.system ?? null, ...REQUEST_PARAMS };
  const identityHash = createHash('sha256').update(JSON.stringify(identity)).digest('hex');
  const id = `http(${options.model}@${baseUrl},${identityHash.slice(0, 12)})`;

  const stats: HttpJudgeStats = { requests: 0, retries: 0, cacheHits: 0, answers: 0, fromLogprobs: 0, fromText: 0, unparseable: 0 };
  // the same ordered comparison asked twice at once (duplicate responses) is one request
  const pending = new Map<string, Promise<Verdict>>();

  const cacheKey = (prompt: string, first: string, second: string): string =>
    createHash('sha256')
      .update(JSON.stringify([identityHash, prompt, first, second]))
      .digest('hex');
  const cacheFile = (dir: string, key: string): string => path.join(dir, key.slice(0, 2), `${key}.json`);

  async function readCached(key: string): Promise<Verdict | undefined> {
    if (!cacheDir) return undefined;
    let raw: string;
    try {
      const file = cacheFile(cacheDir, key);
      // a verdict is a few hundred bytes; a bigger file (an older version cached whole answers) is asked again
      if ((await stat(file)).size > MAX_CACHE_FILE_BYTES) return undefined;
      raw = await readFile(file, 'utf8');
    } catch {
      return undefined;
    }
    try {
      const v = JSON.parse(raw) as Partial<Verdict> | null;
      // an unparseable verdict (which older versions cached) is asked again
      if (typeof v?.p === 'number' && v.p >= 0 && v.p <= 1 && (v.source === 'logprobs' || v.source === 'text'))
        return { p: v.p, source: v.source, text: typeof v.text === 'string' ? excerpt(v.text) : '' };
    } catch {
      // a file that does not parse is asked again (and overwritten)
    }
    return undefined;
  }

  async function writeCached(key: string, v: Verdict): Promise<void> {
    if (!cacheDir || v.source === 'unparseable') return; // never cached: asked again next time
    // a file that exists is complete; it holds the verdict and a bounded excerpt of the answer
    await writeJsonAtomic(
      cacheFile(cacheDir, key),
      { p: v.p, source: v.source, text: excerpt(v.text), model: options.model },
      { createParents: true },
    );
  }

  async function attempt(body: string, signal?: AbortSignal): Promise<Verdict> {
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(new AttemptError(`timed out after ${timeoutMs} ms`, true)), timeoutMs);
    const onAbort = (): void => controller.abort(signal?.reason); // only ever added to signal
    if (signal?.aborted) onAbort();
    else signal?.addEventListener('abort', onAbort, { once: true });
    const headers: Record<string, string> = { 'content-type': 'application/json' };
    if (apiKey) headers.authorization = `Bearer ${apiKey}`;
    stats.requests++;
    try {
      let res: Response;
      let text: string;
      try {
        res = await fetch(url, { method: 'POST', headers, body, signal: controller.signal });
        text = await readBodyCapped(res, maxResponseBytes);
      } catch (err) {
        if (err instanceof AttemptError) throw err;
        throwIfAborted(signal);
        if (controller.signal.reason instanceof AttemptError) throw controller.signal.reason;
        const cause = (err as Error & { cause?: Error })?.cause;
        throw new AttemptError(`network error: ${(err as Error)?.message ?? err}${cause?.message ? ` (${cause.message})` : ''}`, true);
      }
      if (!res.ok) {
        const retry = res.status === 408 || res.status === 429 || res.status >= 500;
        throw new AttemptError(`HTTP ${res.status}: ${excerpt(text)}`, retry, retry ? retryAfterMs(res.headers) : undefined);
      }
      let json: unknown;
      try {
        json = JSON.parse(text);
      } catch {
        throw new AttemptError(`HTTP ${res.status} with a body that is not JSON: ${excerpt(text)}`, true);
      }
      const verdict = verdictFromCompletion(json);
      if (!verdict)
        throw new AttemptError(
          `HTTP ${res.status} with a body that is not a chat completion (no choices[0].message.content or logprobs): ${excerpt(text)}`,
          true,
        );
      return verdict;
    } finally {
      clearTimeout(timer);
      signal?.removeEventListener('abort', onAbort);
    }
  }

  async function ask(prompt: string, first: string, second: string, signal?: AbortSignal): Promise<Verdict> {
    const messages = [
      ...(options.system !== undefined ? [{ role: 'system', content: options.system }] : []),
      { role: 'user', content: renderJudgeTemplate(template, prompt, first, second) },
    ];
    const body = JSON.stringify({ model: options.model, messages, ...REQUEST_PARAMS });
    for (let n = 0; ; n++) {
      throwIfAborted(signal);
      let failure: AttemptError;
      await semaphore.acquire();
      try {
        throwIfAborted(signal); // aborted while waiting for a slot
        const verdict = await attempt(body, signal);
        // an unreadable answer is asked again like a malformed body; the last one is an unusable verdict
        if (verdict.source !== 'unparseable' || n >= maxRetries) return verdict;
        failure = new AttemptError(`unparseable answer: ${verdict.reason}`, true);
      } catch (err) {
        if (!(err instanceof AttemptError)) throw err;
        failure = err;
      } finally {
        semaphore.release();
      }
      if (!failure.retry || n >= maxRetries)
        throw new Error(redact(`HTTP judge: POST ${url} failed${n > 0 ? ` after ${n + 1} attempts` : ''}: ${failure.message}`));
      stats.retries++;
      const backoff = Math.min(maxBackoffMs, backoffMs * 2 ** n);
      const wait = failure.waitMs !== undefined ? Math.min(failure.waitMs, 600_000) : backoff / 2 + (Math.random() * backoff) / 2;
      await sleep(wait, signal);
    }
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
      const cached = await readCached(key);
      if (cached) {
        stats.cacheHits++;
        return tally(cached);
      }
      const v = await ask(prompt, first, second, signal);
      stats.answers++;
      await writeCached(key, v);
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
