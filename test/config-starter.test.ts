// starterConfigText (sppo init's file): whatever it is given — arrays, matrices, nested sections,
// every judge kind — the YAML it writes parses to exactly what parseConfig makes of the input.
import { parse } from 'yaml';
import { describe, expect, it } from 'vitest';
import { starterConfigText } from '../lib/config/starter.js';
import { demoConfigInput, parseConfig, type RunConfigInput } from '../lib/index.js';

const hf = { model: { path: 'models/m' }, data: { prompts: 'p.jsonl', evalSize: 3 } } as const;
const INPUTS: RunConfigInput[] = [
  demoConfigInput(),
  {
    ...demoConfigInput(),
    preference: {
      kind: 'styled-reversal',
      A: [
        [0, 1, -1],
        [-1, 0, 1],
        [1, -1, 0],
      ],
      alphabet: 'xyz: "#',
    },
  },
  { ...hf, preference: { kind: 'http', baseUrl: 'http://h:1/v1', model: 'j', system: 'Be fair.\nReally.', template: '{prompt} {a} {b}' } },
  { ...hf, preference: { kind: 'lm-judge', path: 'judge', answerTokens: [',', 'x: y'], chatTemplate: false } },
  { ...hf, preference: { kind: 'reward-model', path: 'rm', temperature: 0.5 } },
  {
    ...hf,
    preference: { kind: 'function', module: 'j.mjs', id: 'v2' },
    training: { loss: 'dpo', optimizer: { kind: 'adamw', beta1: 0.8, eps: 1e-6 }, schedule: { kind: 'cosine' } },
    run: { seed: 7 },
  },
];

describe('starterConfigText', () => {
  it.each(INPUTS.map((input, i) => [i, input] as const))('input %i comes back through YAML and the schema unchanged', (_, input) => {
    const text = starterConfigText(input, ['a header']);
    expect(text.startsWith('# a header\n')).toBe(true);
    expect(parseConfig(parse(text))).toEqual(parseConfig(input));
  });

  it('refuses an input the schema refuses', () => {
    expect(() => starterConfigText({ ...hf, preference: { kind: 'http', baseUrl: 'ftp://x', model: 'j' } })).toThrow();
  });
});
