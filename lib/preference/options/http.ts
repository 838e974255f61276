// The HTTP judge's options in a run configuration (preference.kind 'http'), its defaults, the
// check of its baseUrl, and the judge prompt it shares with the LM judge: the default text and
// the placeholders it must hold. A leaf (zod and the config's field helpers only), so lib/config
// can compose it.
import { z } from 'zod';
import { filePath, nonEmpty, nonNegativeInt, positiveInt } from '../../config/fields.js';
import { judgeConcurrency, maxUnusableFraction } from './common.js';

export const DEFAULT_JUDGE_TEMPLATE = `Two AI assistants answered the same user prompt. Decide which response is better: more helpful, correct, and clear.

[Prompt]
{prompt}

[Response A]
{a}

[Response B]
{b}

Which response is better? Answer with a single letter: A or B.`;

/** The placeholders a judge template lacks. */
export function missingPlaceholders(template: string): string[] {
  return ['{prompt}', '{a}', '{b}'].filter((p) => !template.includes(p));
}

/** A judge prompt: the user's prompt and the two responses go where {prompt}, {a} and {b} stand. */
export const judgeTemplate = () =>
  z
    .string({ error: 'must be a string' })
    .refine((t) => missingPlaceholders(t).length === 0, { error: 'must contain {prompt}, {a} and {b}' })
    .describe(
      'the judge prompt: {prompt}, {a} (the response shown first) and {b} are filled in; default: DEFAULT_JUDGE_TEMPLATE (A or B, which is better?)',
    );

export const HTTP_JUDGE_DEFAULTS = Object.freeze({
  requestConcurrency: 8,
  timeoutMs: 60_000,
  maxRetries: 5,
  /** 1 MiB: a one-token completion is a few hundred bytes */
  maxResponseBytes: 1024 * 1024,
});

/** Backoff between retries (not config fields: a test shortens them). */
export const HTTP_BACKOFF_DEFAULTS = Object.freeze({
  /** the first backoff in ms, doubled per retry (jittered) */
  backoffMs: 500,
  /** the longest backoff in ms (a server's Retry-After is waited in full, up to 10 minutes) */
  maxBackoffMs: 30_000,
});

const CREDENTIALS =
  'must not contain credentials (user:password@): give the API key through apiKeyEnv, the environment variable that holds it';

/** The URL, or null for what does not parse as one (URL.parse, which Node 20.0 lacks). */
function parseUrl(text: string): URL | null {
  try {
    return new URL(text);
  } catch {
    return null;
  }
}

/** Whether a URL carries credentials (user:password@); false for what does not parse as a URL. */
const hasCredentials = (baseUrl: string): boolean => {
  const url = parseUrl(baseUrl);
  return url !== null && (url.username !== '' || url.password !== '');
};

/**
 * What is wrong with an HTTP judge's baseUrl, or undefined: not a URL, not http(s), or with
 * credentials (user:password@). The answer never quotes the URL, which may hold a secret.
 */
export function baseUrlProblem(baseUrl: string): string | undefined {
  const url = parseUrl(baseUrl);
  if (url === null) return 'is not a valid URL (e.g. https://api.openai.com/v1)';
  if (url.protocol !== 'http:' && url.protocol !== 'https:') return 'must be an http(s) URL';
  return hasCredentials(baseUrl) ? CREDENTIALS : undefined;
}

/** An http(s) URL without credentials. */
export const httpUrl = () =>
  z.url({ protocol: /^https?$/, error: 'must be an http(s) URL' }).refine((u) => !hasCredentials(u), { error: CREDENTIALS });

/**
 * The fields of an HTTP judge's transport (http, pairwise-http), written once: the API key's
 * variable, the request limits and the disk cache. `unreadable` says what answers are retried,
 * `cached` what one cache file holds.
 */
export const httpTransportFields = (unreadable: string, cached: string) => ({
  apiKeyEnv: nonEmpty()
    .optional()
    .describe('the environment variable that holds the API key, sent as Authorization: Bearer (the key itself never goes in a config)'),
  requestConcurrency: positiveInt()
    .default(HTTP_JUDGE_DEFAULTS.requestConcurrency)
    .describe('HTTP requests in flight at once, over all prompts'),
  timeoutMs: positiveInt().default(HTTP_JUDGE_DEFAULTS.timeoutMs).describe('time limit of one attempt in milliseconds, body included'),
  maxRetries: nonNegativeInt()
    .default(HTTP_JUDGE_DEFAULTS.maxRetries)
    .describe(`retries after the first attempt (on 408, 429, 5xx, network errors, bodies that are not ${unreadable})`),
  maxResponseBytes: positiveInt()
    .default(HTTP_JUDGE_DEFAULTS.maxResponseBytes)
    .describe('a response body longer than this many bytes fails the request (read as a stream and cancelled past it)'),
  cacheDir: filePath().optional().describe(`one file per ${cached}; default <run.dir>/judge-cache`),
});

export const httpJudgeOptionsSchema = z
  .strictObject({
    kind: z
      .literal('http')
      .describe('a judge behind an OpenAI-compatible chat-completions endpoint (both orders asked, answers cached on disk)'),
    baseUrl: httpUrl().describe(
      'the API root, e.g. https://api.openai.com/v1; requests go to <baseUrl>/chat/completions; no credentials (user:password@) in it',
    ),
    model: nonEmpty().describe('the model field of each request'),
    template: judgeTemplate().optional(),
    system: z.string().optional().describe('a system message sent before the judge prompt'),
    ...httpTransportFields(
      'a completion, and answers that name neither A nor B or carry a non-finite logprob',
      'answered comparison (its verdict and an excerpt of the answer)',
    ),
    concurrency: judgeConcurrency(),
    maxUnusableFraction: maxUnusableFraction(),
  })
  .describe('the HTTP judge');
