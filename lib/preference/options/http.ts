// The HTTP judge's options in a run configuration (preference.kind 'http'), its defaults, and
// the judge prompt it shares with the LM judge: the default text and the placeholders it must
// hold. A leaf (zod and the config's field helpers only), so lib/config can compose it.
import { z } from 'zod';
import { filePath, nonEmpty, nonNegativeInt, positiveInt } from '../../config/fields.js';
import { judgeConcurrency } from './common.js';

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
});

export const httpJudgeOptionsSchema = z
  .strictObject({
    kind: z
      .literal('http')
      .describe('a judge behind an OpenAI-compatible chat-completions endpoint (both orders asked, answers cached on disk)'),
    baseUrl: z
      .url({ protocol: /^https?$/, error: 'must be an http(s) URL' })
      .describe('the API root, e.g. https://api.openai.com/v1; requests go to <baseUrl>/chat/completions'),
    model: nonEmpty().describe('the model field of each request'),
    apiKeyEnv: nonEmpty()
      .optional()
      .describe('the environment variable that holds the API key, sent as Authorization: Bearer (the key itself never goes in a config)'),
    template: judgeTemplate().optional(),
    system: z.string().optional().describe('a system message sent before the judge prompt'),
    requestConcurrency: positiveInt()
      .default(HTTP_JUDGE_DEFAULTS.requestConcurrency)
      .describe('HTTP requests in flight at once, over all prompts'),
    timeoutMs: positiveInt().default(HTTP_JUDGE_DEFAULTS.timeoutMs).describe('time limit of one attempt in milliseconds, body included'),
    maxRetries: nonNegativeInt()
      .default(HTTP_JUDGE_DEFAULTS.maxRetries)
      .describe('retries after the first attempt (on 408, 429, 5xx, network errors and bodies that are not a completion)'),
    cacheDir: filePath().optional().describe('one file per answered comparison; default <run.dir>/judge-cache'),
    concurrency: judgeConcurrency(),
  })
  .describe('the HTTP judge');
