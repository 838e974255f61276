// What the HTTP judges (kind 'http', one chat completion per ordered pair; kind 'pairwise-http',
// one ranker call per prompt) share, written once: JSON POSTs bounded by a semaphore, timed out,
// their bodies read as a stream up to a byte cap, retried with exponential backoff (Retry-After
// respected) on 408, 429, 5xx, network errors and bodies the judge cannot read; an answer read
// but unusable is asked again and, after the last retry, returned for the judge to score ½ and
// count; the API key taken from an environment variable and blotted out of every error; and a
// disk cache of one small JSON file per answer, written atomically the moment it arrives.
import { readFile, stat } from 'node:fs/promises';
import path from 'node:path';
import { abortError, throwIfAborted } from '../util/abort.js';
import { writeJsonAtomic } from '../util/atomic-write.js';
import { HTTP_BACKOFF_DEFAULTS, HTTP_JUDGE_DEFAULTS } from './options/http.js';

/** The most characters of an answer kept (in a verdict, the cache, an error). */
const EXCERPT_CHARS = 200;

/** A server's Retry-After is waited in full, up to this. */
const MAX_RETRY_AFTER_MS = 600_000;

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

/** A text on one line, cut to EXCERPT_CHARS: for verdicts, cache files and errors. */
export function excerpt(s: string): string {
  // cut before collapsing the spaces, so a huge text is never copied whole
  const one = s
    .slice(0, 4 * EXCERPT_CHARS)
    .replace(/\s+/g, ' ')
    .trim();
  return one.length > EXCERPT_CHARS ? `${one.slice(0, EXCERPT_CHARS)}…` : one;
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

/**
 * What a judge made of one answer's JSON: a value (with `unusable`, why it could not be fully
 * read: asked again, and after the last retry returned as it is), or `malformed`, why the body is
 * not an answer of this protocol at all (asked again, and after the last retry an error).
 */
export type ReadAnswer<T> = { value: T; unusable?: string } | { malformed: string };

export interface HttpTransportOptions {
  /** the judge's name in errors of its requests, e.g. `HTTP judge` */
  who: string;
  /** the name errors in these options go by, e.g. `httpJudge` */
  api: string;
  url: string;
  /** sent as `Authorization: Bearer`; blotted out of every error */
  apiKey?: string;
  requestConcurrency: number;
  timeoutMs: number;
  maxRetries: number;
  backoffMs: number;
  maxBackoffMs: number;
  maxResponseBytes: number;
  /** how a body's text becomes JSON (a SyntaxError: not JSON); default JSON.parse */
  parse?: (text: string) => unknown;
}

export interface HttpTransportStats {
  /** HTTP requests sent, retries included */
  requests: number;
  /** attempts that failed (or gave an unusable answer) and were tried again */
  retries: number;
}

export interface HttpAnswer<T> {
  value: T;
  /** why the last attempt's answer was unusable (after every retry); absent when it was usable */
  unusable?: string;
}

export interface HttpTransport {
  readonly stats: HttpTransportStats;
  /** POSTs `body` (JSON text) until `read` makes an answer of it, or the retries run out (an Error). */
  post<T>(body: string, read: (json: unknown, text: string) => ReadAnswer<T>, signal?: AbortSignal): Promise<HttpAnswer<T>>;
}

function positiveInteger(v: number, who: string, what: string): number {
  if (!Number.isInteger(v) || v < 1) throw new RangeError(`${who}: ${what} must be an integer ≥ 1, got ${v}`);
  return v;
}

/** The limits of a judge's options, checked: a RangeError naming the option. */
function checkTransportLimits(
  who: string,
  o: Pick<HttpTransportOptions, 'requestConcurrency' | 'timeoutMs' | 'maxRetries' | 'maxResponseBytes'>,
): void {
  positiveInteger(o.requestConcurrency, who, 'requestConcurrency');
  positiveInteger(o.timeoutMs, who, 'timeoutMs');
  positiveInteger(o.maxResponseBytes, who, 'maxResponseBytes');
  if (!Number.isInteger(o.maxRetries) || o.maxRetries < 0)
    throw new RangeError(`${who}: maxRetries must be an integer ≥ 0, got ${o.maxRetries}`);
}

/**
 * The API key held by the environment variable `apiKeyEnv` (undefined when none is named): a
 * variable that is unset, or holds what an HTTP header cannot carry, is an error naming it
 * (checked here, since fetch's own error would quote the header, key included).
 */
function apiKeyFrom(who: string, apiKeyEnv: string | undefined, env: Record<string, string | undefined>): string | undefined {
  if (apiKeyEnv === undefined) return undefined;
  const apiKey = env[apiKeyEnv];
  if (!apiKey) throw new Error(`${who}: the environment variable ${apiKeyEnv} (apiKeyEnv) is not set`);
  if (!/^[\x21-\x7e]+$/.test(apiKey))
    throw new Error(
      `${who}: the environment variable ${apiKeyEnv} (apiKeyEnv) holds characters an HTTP header cannot carry (spaces, line breaks, non-ASCII)`,
    );
  return apiKey;
}

export function httpTransport(options: HttpTransportOptions): HttpTransport {
  const { who, url, apiKey, timeoutMs, maxRetries, backoffMs, maxBackoffMs, maxResponseBytes } = options;
  checkTransportLimits(options.api, options);
  const semaphore = new Semaphore(options.requestConcurrency);
  const parse = options.parse ?? JSON.parse;
  const stats: HttpTransportStats = { requests: 0, retries: 0 };
  /** A message with the API key (if it ever appears, say in a server's error body) blotted out. */
  const redact = (message: string): string => (apiKey ? message.split(apiKey).join('[API key]') : message);

  async function attempt<T>(
    body: string,
    read: (json: unknown, text: string) => ReadAnswer<T>,
    signal?: AbortSignal,
  ): Promise<HttpAnswer<T>> {
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
        json = parse(text);
      } catch {
        throw new AttemptError(`HTTP ${res.status} with a body that is not JSON: ${excerpt(text)}`, true);
      }
      const answer = read(json, text);
      if ('malformed' in answer) throw new AttemptError(`HTTP ${res.status} with ${answer.malformed}: ${excerpt(text)}`, true);
      return answer;
    } finally {
      clearTimeout(timer);
      signal?.removeEventListener('abort', onAbort);
    }
  }

  async function post<T>(body: string, read: (json: unknown, text: string) => ReadAnswer<T>, signal?: AbortSignal): Promise<HttpAnswer<T>> {
    for (let n = 0; ; n++) {
      throwIfAborted(signal);
      let failure: AttemptError;
      await semaphore.acquire();
      try {
        throwIfAborted(signal); // aborted while waiting for a slot
        const answer = await attempt(body, read, signal);
        // an unusable answer is asked again like a malformed body; the last one is returned as it is
        if (answer.unusable === undefined || n >= maxRetries) return answer;
        failure = new AttemptError(`unparseable answer: ${answer.unusable}`, true);
      } catch (err) {
        if (!(err instanceof AttemptError)) throw err;
        failure = err;
      } finally {
        semaphore.release();
      }
      if (!failure.retry || n >= maxRetries)
        throw new Error(redact(`${who}: POST ${url} failed${n > 0 ? ` after ${n + 1} attempts` : ''}: ${failure.message}`));
      stats.retries++;
      const backoff = Math.min(maxBackoffMs, backoffMs * 2 ** n);
      const wait =
        failure.waitMs !== undefined ? Math.min(failure.waitMs, MAX_RETRY_AFTER_MS) : backoff / 2 + (Math.random() * backoff) / 2;
      await sleep(wait, signal);
    }
  }

  return { stats, post };
}

/** The transport options a judge's own options share (each optional, its default HTTP_JUDGE_DEFAULTS / HTTP_BACKOFF_DEFAULTS). */
export interface JudgeTransportOptions {
  /** name of the environment variable holding the API key (sent as `Authorization: Bearer`); none: no header */
  apiKeyEnv?: string;
  /** HTTP requests in flight at once, over all prompts */
  requestConcurrency?: number;
  /** per-attempt limit in ms, body included */
  timeoutMs?: number;
  /** retries after the first attempt */
  maxRetries?: number;
  /** first backoff in ms (doubled per retry, jittered, capped at maxBackoffMs) */
  backoffMs?: number;
  /** the longest backoff in ms (a server's Retry-After is waited in full, up to 10 minutes) */
  maxBackoffMs?: number;
  /** a response body longer than this many bytes fails the request (read as a stream, never buffered whole) */
  maxResponseBytes?: number;
  /** where apiKeyEnv is looked up; default process.env */
  env?: Record<string, string | undefined>;
}

/** A judge's transport from its options, the defaults filled in; `stats` joins the judge's own counts to the transport's. */
export function judgeTransport(
  names: Pick<HttpTransportOptions, 'who' | 'api' | 'url' | 'parse'>,
  o: JudgeTransportOptions,
): HttpTransport & { withStats<S extends object>(counts: S): S & HttpTransportStats } {
  const transport = httpTransport({
    ...names,
    apiKey: apiKeyFrom(names.api, o.apiKeyEnv, o.env ?? process.env),
    requestConcurrency: o.requestConcurrency ?? HTTP_JUDGE_DEFAULTS.requestConcurrency,
    timeoutMs: o.timeoutMs ?? HTTP_JUDGE_DEFAULTS.timeoutMs,
    maxRetries: o.maxRetries ?? HTTP_JUDGE_DEFAULTS.maxRetries,
    backoffMs: o.backoffMs ?? HTTP_BACKOFF_DEFAULTS.backoffMs,
    maxBackoffMs: o.maxBackoffMs ?? HTTP_BACKOFF_DEFAULTS.maxBackoffMs,
    maxResponseBytes: o.maxResponseBytes ?? HTTP_JUDGE_DEFAULTS.maxResponseBytes,
  });
  const withStats = <S extends object>(counts: S): S & HttpTransportStats =>
    Object.defineProperties(counts as S & HttpTransportStats, {
      requests: { get: () => transport.stats.requests, enumerable: true },
      retries: { get: () => transport.stats.retries, enumerable: true },
    });
  return { ...transport, withStats };
}

/** A cache file larger than this is not an answer this version wrote. */
const MAX_CACHE_FILE_BYTES = 64 * 1024;

/**
 * One JSON file per answer under `dir` (none: no disk cache), named by a hex key: `read` returns
 * what `accept` makes of a file (undefined: missing, too big, not JSON or not accepted, so asked
 * again and overwritten); `write` replaces it atomically, so a file that exists is complete.
 */
export function jsonCache<T>(dir: string | undefined, accept: (json: unknown) => T | undefined) {
  const file = (d: string, key: string): string => path.join(d, key.slice(0, 2), `${key}.json`);
  return {
    async read(key: string): Promise<T | undefined> {
      if (!dir) return undefined;
      let raw: string;
      try {
        const f = file(dir, key);
        if ((await stat(f)).size > MAX_CACHE_FILE_BYTES) return undefined;
        raw = await readFile(f, 'utf8');
      } catch {
        return undefined;
      }
      try {
        return accept(JSON.parse(raw));
      } catch {
        return undefined; // a file that does not parse is asked again (and overwritten)
      }
    },
    async write(key: string, value: unknown): Promise<void> {
      if (dir) await writeJsonAtomic(file(dir, key), value, { createParents: true });
    },
  };
}
