// The run configuration: the reference's defaults, YAML and JSON files, errors that name the
// field, relative paths, the stable hash, and the diff used to refuse a changed config on resume.
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { RunConfigError, configHash, diffConfigs, loadConfig, parseConfig } from '../lib/config/index.js';
import { canonicalJson } from '../lib/config/load.js';
import { LORA_TARGETS } from '../lib/engine/lora.js';

const dir = mkdtempSync(join(tmpdir(), 'sppo-config-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const minimal = { model: { path: 'model' }, data: { prompts: 'prompts.jsonl' }, preference: { kind: 'styled-reversal' } };

function problems(raw: unknown): string[] {
  try {
    parseConfig(raw);
  } catch (err) {
    if (err instanceof RunConfigError) return err.problems;
    throw err;
  }
  throw new Error('the config was accepted');
}

describe('defaults', () => {
  it("fills in the reference's settings", () => {
    const c = parseConfig(minimal);
    expect(c.training).toEqual({
      loss: 'sppo-pair',
      eta: 1000,
      mode: 'pair',
      winRateDiagonal: 'include',
      optimizer: { kind: 'rmsprop', lr: 5e-7, weightDecay: 0, maxGradNorm: 1 },
      schedule: { kind: 'linear', warmupRatio: 0.1 },
      epochsPerIteration: 1,
      batchSize: 8,
      gradAccumSteps: 8,
      maxLength: 1024,
    });
    expect(c.generation).toEqual({ samplesPerPrompt: 5, temperature: 0.7, topP: 0.9, topK: 0, maxNewTokens: 2048, maxBatch: 16 });
    expect(c.run).toEqual({ dir: 'sppo-run', iterations: 3, seed: 42 });
    expect(c.data).toMatchObject({ prompts: 'prompts.jsonl', column: 'prompt', evalSize: 100, maxPromptTokens: 512 });
    expect(c.preference).toMatchObject({
      kind: 'styled-reversal',
      a: 0.25,
      b: 0.25,
      noneAdvantage: 1,
      alphabet: 'abcdefgh',
      minLength: 3,
      maxLength: 6,
    });
  });

  it("derives the training set's mode from the loss", () => {
    expect(parseConfig({ ...minimal, training: { loss: 'sppo' } }).training.mode).toBe('all');
    expect(parseConfig({ ...minimal, training: { loss: 'dpo' } }).training.mode).toBe('pair');
  });
});

describe('errors name the field', () => {
  it('bad values', () => {
    expect(problems({ ...minimal, training: { eta: 0 } })).toEqual(['training.eta: must be > 0']);
    expect(problems({ ...minimal, training: { optimizer: { lr: '5e-7' } } })).toEqual(['training.optimizer.lr: must be a number']);
    expect(problems({ ...minimal, generation: { samplesPerPrompt: 1, topP: 1.5 } })).toEqual([
      'generation.samplesPerPrompt: must be an integer ≥ 2 (a pair needs two responses)',
      'generation.topP: must be ≤ 1',
    ]);
    expect(problems({ ...minimal, run: { iterations: 2.5 } })).toEqual(['run.iterations: must be an integer']);
    expect(problems({ ...minimal, training: { loss: 'kto' } })).toEqual([
      'training.loss: must be one of sppo, sppo-pair, sppo-single, sppo-hard, dpo, ipo',
    ]);
    expect(problems({ ...minimal, model: { preset: 'huge' } })).toEqual(['model.preset: must be one of "demo", "tiny", "small"']);
  });

  it('unknown fields, at any depth', () => {
    expect(problems({ ...minimal, training: { etaa: 1000, optimizer: { momentum: 0.9 } }, extra: true })).toEqual([
      'training.optimizer.momentum: unknown field',
      'training.etaa: unknown field',
      'extra: unknown field',
    ]);
  });

  it('missing sections and either-or fields', () => {
    expect(problems({ data: minimal.data, preference: minimal.preference })).toEqual(['model: required']);
    expect(problems({ ...minimal, model: { preset: 'tiny', path: '/m' } })).toEqual(['model: give exactly one of preset and path']);
    expect(problems({ ...minimal, data: {} })).toEqual([
      'data: give exactly one of prompts (a file) and words (generated styled-reversal prompts)',
    ]);
    expect(problems({ ...minimal, preference: { kind: 'oracle' } })).toEqual([
      "preference.kind: unknown kind (known: 'styled-reversal', 'function', 'http', 'pairwise-http', 'lm-judge', 'reward-model', 'pairrm')",
    ]);
    expect(problems({ ...minimal, preference: { kind: 'pairrm' } })).toEqual(['preference.path: must be a path (a string)']);
    expect(problems({ ...minimal, data: { words: 100 }, preference: { kind: 'function', id: 'j' } })).toEqual([
      "data.words: generated words go with preference.kind 'styled-reversal'",
    ]);
  });

  it('counts held in memory are bounded, so 1e9 is refused here and not a V8 abort later', () => {
    const demo = { model: { preset: 'demo' }, preference: { kind: 'styled-reversal' } };
    expect(problems({ ...demo, data: { words: 1e9 } })).toEqual([
      'data.words: must be ≤ 1,000,000 (the words are generated and held in memory)',
    ]);
    expect(problems({ ...demo, data: { words: 100 }, sft: { examples: 1e9 } })).toEqual([
      'sft.examples: must be ≤ 100,000 (the rows are held in memory)',
    ]);
    expect(parseConfig({ ...demo, data: { words: 1_000_000 }, sft: { examples: 100_000 } }).sft?.examples).toBe(100_000);
  });

  it("optimizer constants the engine refuses at the first step: decay rates of 1, ε outside float32's range", () => {
    const optimizer = (o: object) => problems({ ...minimal, training: { optimizer: o } });
    expect(optimizer({ alpha: 1, beta1: 1, beta2: 1.5 })).toEqual([
      'training.optimizer.alpha: must be < 1 (a moving average that never forgets never moves)',
      'training.optimizer.beta1: must be < 1 (a moving average that never forgets never moves)',
      'training.optimizer.beta2: must be < 1 (a moving average that never forgets never moves)',
    ]);
    expect(optimizer({ alpha: -0.1 })).toEqual(['training.optimizer.alpha: must be ≥ 0']);
    expect(optimizer({ eps: 1e-50 })).toEqual([
      'training.optimizer.eps: must be ≥ 1.1754943508222875e-38 (smaller is 0 or denormal in float32)',
    ]);
    expect(optimizer({ eps: 1e39 })).toEqual(['training.optimizer.eps: must be ≤ 3.4028234663852886e+38 (larger is infinite in float32)']);
    expect(optimizer({ eps: 0 })[0]).toMatch(/^training\.optimizer\.eps: must be ≥/);
    expect(
      parseConfig({ ...minimal, training: { optimizer: { alpha: 0.99, beta1: 0, beta2: 0.999, eps: 1e-8 } } }).training.optimizer,
    ).toMatchObject({
      alpha: 0.99,
      beta1: 0,
      beta2: 0.999,
      eps: 1e-8,
    });
  });

  it('training.lora: absent is full fine-tuning, {} takes rank 16, alpha 32 and all seven projections, and bad values are named', () => {
    expect(parseConfig(minimal).training.lora).toBeUndefined();
    expect(parseConfig({ ...minimal, training: { lora: {} } }).training.lora).toEqual({ rank: 16, alpha: 32, targets: [...LORA_TARGETS] });
    expect(parseConfig({ ...minimal, training: { lora: { rank: 8, alpha: 0.5, targets: ['v_proj', 'q_proj'] } } }).training.lora).toEqual({
      rank: 8,
      alpha: 0.5,
      targets: ['v_proj', 'q_proj'],
    });
    const lora = (l: object) => problems({ ...minimal, training: { lora: l } });
    expect(lora({ rank: 0, alpha: 0 })).toEqual(['training.lora.rank: must be an integer ≥ 1', 'training.lora.alpha: must be > 0']);
    expect(lora({ rank: 2.5, alpha: Infinity })).toEqual([
      'training.lora.rank: must be an integer',
      'training.lora.alpha: must be a finite number',
    ]);
    expect(lora({ targets: [] })).toEqual(['training.lora.targets: must list at least one projection']);
    expect(lora({ targets: ['q_proj', 'q_proj'] })).toEqual(['training.lora.targets: lists a projection twice']);
    expect(lora({ targets: ['q_proj', 'lm_head'] })).toEqual([`training.lora.targets[1]: must be one of ${LORA_TARGETS.join(', ')}`]);
    expect(lora({ dropout: 0.1 })).toEqual(['training.lora.dropout: unknown field']);
  });

  it('training.gradientPrecision: absent is float32 (and hashes as before), bf16 is for full fine-tuning only', () => {
    expect(parseConfig(minimal).training.gradientPrecision).toBeUndefined();
    // absent, it is left out of the hashed JSON, so runs started before the field existed resume
    expect(canonicalJson(parseConfig(minimal))).not.toContain('gradientPrecision');
    // and the defaults spelt out hash as left out
    expect(configHash(parseConfig({ ...minimal, training: { gradientPrecision: 'fp32' }, generation: { packWeights: true } }))).toBe(
      configHash(parseConfig(minimal)),
    );
    expect(parseConfig({ ...minimal, training: { gradientPrecision: 'bf16' } }).training.gradientPrecision).toBe('bf16');
    expect(problems({ ...minimal, training: { gradientPrecision: 'fp16' } })).toEqual([
      "training.gradientPrecision: must be 'fp32' or 'bf16'",
    ]);
    expect(problems({ ...minimal, training: { gradientPrecision: 'bf16', lora: {} } })).toEqual([
      "training.gradientPrecision: 'bf16' is for full fine-tuning: LoRA adapters keep float32 gradients (they are small)",
    ]);
  });

  it('a loss with the wrong mode, and oracle parameters that leave [0, 1]', () => {
    expect(problems({ ...minimal, training: { loss: 'sppo', mode: 'pair' } })).toEqual(["training.mode: loss 'sppo' needs mode 'all'"]);
    expect(problems({ ...minimal, training: { loss: 'ipo', mode: 'all' } })).toEqual(["training.mode: loss 'ipo' needs mode 'pair'"]);
    expect(problems({ ...minimal, preference: { kind: 'styled-reversal', a: 0.4 } })).toEqual([
      "preference: a + b·max|A| = 0.65 exceeds 1/2, so P(y ≻ y') could leave [0, 1]",
    ]);
    expect(
      problems({
        ...minimal,
        preference: {
          kind: 'styled-reversal',
          A: [
            [0, 1, 0],
            [0, 0, 0],
            [0, 0, 0],
          ],
        },
      })[0],
    ).toMatch(/^preference: A must be antisymmetric/);
    expect(
      problems({
        ...minimal,
        preference: {
          kind: 'styled-reversal',
          A: [
            [0, 1],
            [0, 0],
            [0, 0],
          ],
        },
      }),
    ).toEqual([
      'preference.A[0]: must be a row of 3 numbers',
      'preference.A[1]: must be a row of 3 numbers',
      'preference.A[2]: must be a row of 3 numbers',
    ]);
    expect(problems({ ...minimal, preference: { kind: 'styled-reversal', A: [[0, 0, 0]] } })).toEqual([
      'preference.A: must be a 3×3 matrix over the styles (R, P, S)',
    ]);
  });
});

describe('files', () => {
  it('loads YAML, resolving relative paths against its folder', async () => {
    const path = join(dir, 'run.yaml');
    writeFileSync(
      path,
      [
        'model: { path: ./models/llama }',
        'data:',
        '  prompts: data/uf.parquet',
        '  evalSize: 50',
        'preference: { kind: function, module: ./judge.mjs, id: judge-v1 }',
        'training:',
        '  loss: sppo',
        '  eta: 500',
        'run: { dir: /abs/run, iterations: 5 }',
      ].join('\n'),
    );
    const c = await loadConfig(path);
    expect(c.model.path).toBe(join(dir, 'models/llama'));
    expect(c.data.prompts).toBe(join(dir, 'data/uf.parquet'));
    expect(c.preference).toMatchObject({ kind: 'function', module: join(dir, 'judge.mjs'), export: 'default', id: 'judge-v1' });
    expect(c.training).toMatchObject({ loss: 'sppo', eta: 500, mode: 'all' });
    expect(c.run).toEqual({ dir: '/abs/run', iterations: 5, seed: 42 });
  });

  it('loads JSON; names the file and the field in errors', async () => {
    const good = join(dir, 'run.json');
    writeFileSync(good, JSON.stringify({ ...minimal, data: { words: 500 } }));
    expect((await loadConfig(good)).data.words).toBe(500);
    const bad = join(dir, 'bad.json');
    writeFileSync(bad, JSON.stringify({ ...minimal, training: { eta: -1 } }));
    await expect(loadConfig(bad)).rejects.toThrow(/bad\.json: invalid configuration:\n {2}training\.eta: must be > 0/);
  });

  it('reports YAML syntax errors with a line, duplicate keys, and unknown extensions', async () => {
    const broken = join(dir, 'broken.yaml');
    writeFileSync(broken, 'model:\n  preset: tiny\ndata: [unclosed\n');
    await expect(loadConfig(broken)).rejects.toThrow(/broken\.yaml: not valid YAML at line \d+, column \d+/);
    const dup = join(dir, 'dup.yml');
    writeFileSync(dup, 'model: { preset: tiny }\nmodel: { preset: small }\n');
    await expect(loadConfig(dup)).rejects.toThrow(/dup\.yml: not valid YAML/);
    const toml = join(dir, 'run.toml');
    writeFileSync(toml, '');
    await expect(loadConfig(toml)).rejects.toThrow(/must be \.yaml, \.yml or \.json, got '\.toml'/);
  });
});

describe('hash and diff', () => {
  it('hashes resolved configs stably: same content, same hash, whatever the key order or spelled-out defaults', () => {
    const a = parseConfig(minimal);
    const b = parseConfig({
      preference: { kind: 'styled-reversal', b: 0.25 },
      data: { prompts: 'prompts.jsonl' },
      model: { path: 'model' },
      training: { eta: 1000 },
    });
    expect(configHash(a)).toMatch(/^[0-9a-f]{64}$/);
    expect(configHash(b)).toBe(configHash(a));
    expect(configHash(parseConfig({ ...minimal, training: { eta: 999 } }))).not.toBe(configHash(a));
  });

  it('lists the changed fields', () => {
    const a = parseConfig(minimal);
    const b = parseConfig({
      ...minimal,
      training: { eta: 100, optimizer: { lr: 1e-6 } },
      preference: {
        kind: 'styled-reversal',
        A: [
          [0, -1, 1],
          [1, 0, -1],
          [-1, 1, 0],
        ],
      },
    });
    expect(diffConfigs(a, a)).toEqual([]);
    expect(diffConfigs(a, b)).toEqual([
      {
        path: 'preference.A',
        before: undefined,
        after: [
          [0, -1, 1],
          [1, 0, -1],
          [-1, 1, 0],
        ],
      },
      { path: 'training.eta', before: 1000, after: 100 },
      { path: 'training.optimizer.lr', before: 5e-7, after: 1e-6 },
    ]);
    const c = parseConfig({
      ...minimal,
      training: { eta: 100, optimizer: { lr: 1e-6 } },
      preference: {
        kind: 'styled-reversal',
        A: [
          [0, -1, 1],
          [1, 0, -0.5],
          [-1, 0.5, 0],
        ],
      },
    });
    expect(diffConfigs(b, c).map((d) => d.path)).toEqual(['preference.A[1][2]', 'preference.A[2][1]']);
    const d = parseConfig({ ...minimal, preference: { kind: 'function', id: 'j' } });
    expect(diffConfigs(a, d).map((x) => x.path)).toEqual([
      'preference.a',
      'preference.alphabet',
      'preference.b',
      'preference.callTimeoutMs',
      'preference.export',
      'preference.id',
      'preference.kind',
      'preference.maxLength',
      'preference.maxUnusableFraction',
      'preference.minLength',
      'preference.noneAdvantage',
    ]);
  });
});
