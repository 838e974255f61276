// The run configuration's schema as a document: every field, at every depth and in every judge's
// options, says what it is for (z.toJSONSchema carries it into the configuration reference), and
// the judges' defaults in a resolved config are the ones the judges use at run time.
import { describe, expect, it } from 'vitest';
import { z } from 'zod';
import { parseConfig, runConfigSchema } from '../lib/config/index.js';
import {
  DEFAULT_JUDGE_CONCURRENCY,
  DEFAULT_MAX_UNUSABLE_FRACTION,
  DEFAULT_STYLED_REVERSAL,
  FUNCTION_JUDGE_DEFAULTS,
  HTTP_JUDGE_DEFAULTS,
  LM_JUDGE_DEFAULTS,
  REWARD_MODEL_DEFAULTS,
} from '../lib/preference/index.js';

interface JsonSchema {
  description?: string;
  properties?: Record<string, JsonSchema>;
  anyOf?: JsonSchema[];
  oneOf?: JsonSchema[];
  items?: JsonSchema | JsonSchema[];
  prefixItems?: JsonSchema[];
}

/** Paths of the properties without a description (a union's options are walked under their kind). */
function undescribed(node: JsonSchema, at: string): string[] {
  const out: string[] = [];
  for (const option of [...(node.anyOf ?? []), ...(node.oneOf ?? [])]) {
    const kind = (option.properties?.kind as { const?: string } | undefined)?.const;
    out.push(...undescribed(option, kind ? `${at}[kind=${kind}]` : at));
  }
  for (const [name, child] of Object.entries(node.properties ?? {})) {
    const field = at ? `${at}.${name}` : name;
    if (!child.description) out.push(field);
    out.push(...undescribed(child, field));
  }
  return out;
}

describe('the schema as a document', () => {
  const json = z.toJSONSchema(runConfigSchema, { io: 'input', unrepresentable: 'any' }) as JsonSchema;

  it('describes every field', () => {
    expect(json.description).toBeTruthy();
    expect(Object.keys(json.properties!)).toEqual(['model', 'data', 'generation', 'preference', 'training', 'run', 'sft']);
    expect(undescribed(json, '')).toEqual([]);
  });

  it('walks every judge and every nested section', () => {
    const fields = (node: JsonSchema, at: string): string[] => [
      ...[...(node.anyOf ?? []), ...(node.oneOf ?? [])].flatMap((o) =>
        fields(o, `${at}[${(o.properties?.kind as { const?: string })?.const}]`),
      ),
      ...Object.entries(node.properties ?? {}).flatMap(([k, c]) => [`${at}.${k}`, ...fields(c, `${at}.${k}`)]),
    ];
    const all = fields(json, '');
    for (const f of [
      '.preference[lm-judge].answerTokens',
      '.preference[http].timeoutMs',
      '.preference[styled-reversal].A',
      '.preference[function].module',
      '.preference[reward-model].temperature',
      '.training.optimizer.lr',
      '.training.schedule.warmupRatio',
      '.sft.styles.R',
    ])
      expect(all).toContain(f);
  });
});

describe("the judges' defaults are written once", () => {
  const base = { model: { path: 'm' }, data: { prompts: 'p.jsonl' } };
  const preference = (p: Record<string, unknown>) => parseConfig({ ...base, preference: p }).preference;

  it('a resolved config holds the runtime defaults', () => {
    expect(preference({ kind: 'lm-judge', path: 'j' })).toEqual({
      kind: 'lm-judge',
      path: 'j',
      answerTokens: [...LM_JUDGE_DEFAULTS.answerTokens],
      chatTemplate: LM_JUDGE_DEFAULTS.chatTemplate,
      batchSize: LM_JUDGE_DEFAULTS.batchSize,
      maxSeq: LM_JUDGE_DEFAULTS.maxSeq,
      callTimeoutMs: LM_JUDGE_DEFAULTS.callTimeoutMs,
      concurrency: DEFAULT_JUDGE_CONCURRENCY,
      maxUnusableFraction: DEFAULT_MAX_UNUSABLE_FRACTION,
    });
    expect(preference({ kind: 'reward-model', path: 'r' })).toEqual({
      kind: 'reward-model',
      path: 'r',
      ...REWARD_MODEL_DEFAULTS,
      concurrency: DEFAULT_JUDGE_CONCURRENCY,
      maxUnusableFraction: DEFAULT_MAX_UNUSABLE_FRACTION,
    });
    expect(preference({ kind: 'http', baseUrl: 'http://x/v1', model: 'm' })).toEqual({
      kind: 'http',
      baseUrl: 'http://x/v1',
      model: 'm',
      ...HTTP_JUDGE_DEFAULTS,
      concurrency: DEFAULT_JUDGE_CONCURRENCY,
      maxUnusableFraction: DEFAULT_MAX_UNUSABLE_FRACTION,
    });
    expect(preference({ kind: 'function', module: 'j.mjs' })).toEqual({
      kind: 'function',
      module: 'j.mjs',
      export: 'default',
      ...FUNCTION_JUDGE_DEFAULTS,
      concurrency: DEFAULT_JUDGE_CONCURRENCY,
      maxUnusableFraction: DEFAULT_MAX_UNUSABLE_FRACTION,
    });
    const { A, ...params } = DEFAULT_STYLED_REVERSAL;
    expect(preference({ kind: 'styled-reversal' })).toEqual({ kind: 'styled-reversal', ...params, concurrency: DEFAULT_JUDGE_CONCURRENCY });
  });
});
