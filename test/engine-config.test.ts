// Config, plan and optimizer validation as seen from JavaScript: every error names the field
// that is wrong, and a rejected optimizer config leaves the previous optimizer in place.
import { afterEach, describe, expect, it } from 'vitest';
import { Model, presetConfig, type ModelConfig } from '../lib/index.js';
import { errorOf, tinyConfig, product } from './fixtures/engine-helpers.js';

const PLAN = { maxBatch: 2, maxSeq: 8 };
const live: Model[] = [];
function create(cfg: ModelConfig, plan = PLAN): Model {
  const m = Model.create(cfg, plan);
  live.push(m);
  return m;
}
afterEach(async () => {
  await Promise.all(live.splice(0).map((m) => m.dispose()));
});

function createError(cfg: unknown, plan: unknown = PLAN): Error {
  try {
    const m = Model.create(cfg as ModelConfig, plan as { maxBatch: number; maxSeq: number });
    live.push(m);
  } catch (e) {
    return e as Error;
  }
  throw new Error('expected Model.create to throw');
}

describe('model config validation', () => {
  it('accepts the baseline config and reports the resolved defaults', () => {
    const m = create(tinyConfig());
    expect(m.config.num_key_value_heads).toBe(2);
    expect(m.config.head_dim).toBe(32 / 4);
    expect(m.config.tie_word_embeddings).toBe(false);
    expect(m.config.rope_scaling).toBeNull();
    // num_key_value_heads defaults to num_attention_heads
    const mha = create(tinyConfig({ num_key_value_heads: undefined }));
    expect(mha.config.num_key_value_heads).toBe(4);
  });

  it('rejects an unknown key, naming it', () => {
    const e = createError({ ...tinyConfig(), hidden_sizes: 32 });
    expect(e).toBeInstanceOf(TypeError);
    expect(e.message).toMatch(/unknown field 'hidden_sizes'/);
  });

  it('rejects a string hidden_size, naming the field and the type', () => {
    const e = createError({ ...tinyConfig(), hidden_size: '32' });
    expect(e).toBeInstanceOf(TypeError);
    expect(e.message).toContain('config.hidden_size');
    expect(e.message).toMatch(/must be a number, got a string/);
  });

  it('rejects non-integer sizes', () => {
    const e = createError({ ...tinyConfig(), num_hidden_layers: 2.5 });
    expect(e.message).toContain('config.num_hidden_layers');
    expect(e.message).toMatch(/must be an integer/);
    const e2 = createError({ ...tinyConfig(), intermediate_size: NaN });
    expect(e2.message).toContain('config.intermediate_size');
  });

  it('rejects a missing required field and a non-positive size', () => {
    const { vocab_size: _, ...noVocab } = tinyConfig();
    expect(createError(noVocab).message).toMatch(/config\.vocab_size must be a positive integer/);
    expect(createError({ ...tinyConfig(), num_hidden_layers: 0 }).message).toMatch(
      /config\.num_hidden_layers must be a positive integer, got 0/,
    );
    expect(createError({ ...tinyConfig(), seed: -3 }).message).toContain('config.seed');
  });

  it('rejects num_key_value_heads that does not divide num_attention_heads', () => {
    const e = createError(tinyConfig({ num_attention_heads: 4, num_key_value_heads: 3 }));
    expect(e).toBeInstanceOf(RangeError);
    expect(e.message).toContain('config.num_key_value_heads (3) must divide config.num_attention_heads (4)');
  });

  it('rejects heads that do not divide hidden_size, but accepts it with an explicit head_dim', () => {
    const e = createError(tinyConfig({ hidden_size: 30, num_attention_heads: 4 }));
    expect(e).toBeInstanceOf(RangeError);
    expect(e.message).toContain('config.num_attention_heads (4) must divide config.hidden_size (30)');
    expect(e.message).toContain('head_dim');

    const m = create(tinyConfig({ hidden_size: 30, num_attention_heads: 4, num_key_value_heads: 2, head_dim: 6 }));
    expect(m.config.head_dim).toBe(6);
    const shapes = new Map(m.params().map((p) => [p.name, p.shape]));
    expect(shapes.get('model.layers.0.self_attn.q_proj.weight')).toEqual([4 * 6, 30]);
    expect(shapes.get('model.layers.0.self_attn.k_proj.weight')).toEqual([2 * 6, 30]);
    expect(shapes.get('model.layers.0.self_attn.o_proj.weight')).toEqual([30, 4 * 6]);
  });

  it('rejects an odd head_dim (rotary pairs)', () => {
    const e = createError(tinyConfig({ head_dim: 7 }));
    expect(e.message).toMatch(/config\.head_dim must be a positive even integer/);
  });

  it('rejects an unsupported rope_scaling type under either spelling', () => {
    const e = createError({ ...tinyConfig(), rope_scaling: { rope_type: 'yarn', factor: 2 } });
    expect(e.message).toContain("config.rope_scaling.rope_type 'yarn' is not supported");
    const e2 = createError({ ...tinyConfig(), rope_scaling: { type: 'dynamic', factor: 2 } });
    expect(e2.message).toContain("'dynamic' is not supported");
    const e3 = createError({ ...tinyConfig(), rope_scaling: { rope_type: 'linear', factor: 2, beta: 1 } });
    expect(e3.message).toMatch(/config\.rope_scaling has an unknown field 'beta'/);
    const e4 = createError({ ...tinyConfig(), rope_scaling: { rope_type: 'linear', factor: 0.5 } });
    expect(e4.message).toMatch(/config\.rope_scaling\.factor must be >= 1/);
  });

  it('accepts supported rope_scaling kinds and reports them back', () => {
    const lin = create({ ...tinyConfig(), rope_scaling: { type: 'linear', factor: 2 } });
    expect(lin.config.rope_scaling).toEqual({ rope_type: 'linear', factor: 2 });
    const l3 = create({
      ...tinyConfig(),
      rope_scaling: { rope_type: 'llama3', factor: 8, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 32 },
    });
    expect(l3.config.rope_scaling).toMatchObject({ rope_type: 'llama3', factor: 8, original_max_position_embeddings: 32 });
    // null means "no scaling", as in Hugging Face configs
    expect(create({ ...tinyConfig(), rope_scaling: null }).config.rope_scaling).toBeNull();
  });

  it('accepts a preset name and the preset has the documented shape', () => {
    const m = create('tiny' as unknown as ModelConfig, { maxBatch: 1, maxSeq: 4 });
    expect(m.config.vocab_size).toBe(512);
    expect(m.config.hidden_size).toBe(256);
    const n = m.params().reduce((s, p) => s + product(p.shape), 0);
    expect(n).toBeGreaterThan(0);
  });
});

describe('presets', () => {
  it('presetConfig returns resolved configs and rejects unknown names', async () => {
    const { presetConfig } = await import('../lib/index.js');
    const tiny = presetConfig('tiny');
    expect(tiny).toMatchObject({ vocab_size: 512, hidden_size: 256, head_dim: 64, num_key_value_heads: 4 });
    expect(presetConfig('small').num_key_value_heads).toBe(4);
    expect(() => presetConfig('huge' as never)).toThrow(/unknown model preset 'huge'/);
  });
});

describe('memory plan validation', () => {
  it('rejects maxSeq beyond max_position_embeddings', () => {
    const e = createError(tinyConfig({ max_position_embeddings: 16 }), { maxBatch: 1, maxSeq: 17 });
    expect(e).toBeInstanceOf(RangeError);
    expect(e.message).toContain('plan.maxSeq (17) exceeds config.max_position_embeddings (16)');
    // exactly max_position_embeddings is fine
    create(tinyConfig({ max_position_embeddings: 16 }), { maxBatch: 1, maxSeq: 16 });
  });

  it('rejects maxBatch 0, a missing field and an unknown plan field', () => {
    expect(createError(tinyConfig(), { maxBatch: 0, maxSeq: 8 }).message).toContain('plan.maxBatch must be a positive integer, got 0');
    expect(createError(tinyConfig(), { maxBatch: 1 }).message).toContain('plan.maxSeq must be a positive integer');
    expect(createError(tinyConfig(), { maxBatch: 1, maxSeq: 8, maxTokens: 8 }).message).toMatch(/plan has an unknown field 'maxTokens'/);
    expect(createError(tinyConfig(), { maxBatch: 1.5, maxSeq: 8 }).message).toMatch(/plan\.maxBatch must be an integer/);
  });
});

describe('optimizer validation', () => {
  const cases: [string, object, RegExp][] = [
    ["kind 'sgd'", { kind: 'sgd' }, /optimizer\.kind must be 'adamw' or 'rmsprop', got 'sgd'/],
    ['negative lr', { lr: -0.1 }, /optimizer\.lr must be a finite number >= 0, got -0\.1/],
    [
      'linear schedule without totalSteps',
      { schedule: { kind: 'linear', warmupSteps: 2 } },
      /optimizer\.schedule\.totalSteps must be a positive integer/,
    ],
    ['unknown optimizer key', { lr: 1e-3, momentum: 0.9 }, /optimizer has an unknown field 'momentum'/],
    ['unknown schedule key', { schedule: { kind: 'cosine', totalSteps: 5, decay: 1 } }, /optimizer\.schedule has an unknown field 'decay'/],
    [
      'warmup longer than the schedule',
      { schedule: { kind: 'linear', warmupSteps: 9, totalSteps: 5 } },
      /warmupSteps \(9\) exceeds totalSteps \(5\)/,
    ],
    ['gradAccumSteps 0', { gradAccumSteps: 0 }, /optimizer\.gradAccumSteps must be an integer >= 1/],
    ['beta1 = 1', { beta1: 1 }, /optimizer\.beta1 must be in \[0, 1\)/],
    ['string lr', { lr: '0.1' }, /optimizer\.lr must be a number, got a string/],
  ];
  for (const [what, cfg, msg] of cases) {
    it(`rejects ${what}`, () => {
      const m = create(tinyConfig());
      expect(() => m.setOptimizer(cfg as never)).toThrow(msg);
    });
  }

  it('a rejected optimizer config keeps the previous optimizer and its step count', async () => {
    const m = create(tinyConfig());
    const batch = [[1, 2, 3, 4, 5, 6, 7, 8]];
    m.setOptimizer({ lr: 1e-2 });
    expect((await m.trainStep(batch)).step).toBe(1);
    const err = await errorOf(() => m.setOptimizer({ lr: -1 }));
    expect(err.message).toContain('optimizer.lr');
    expect(m.step).toBe(1);
    const r = await m.trainStep(batch);
    expect(r.step).toBe(2);
    expect(r.lr).toBe(1e-2);
  });

  it('trainStep without an optimizer is refused with a hint', async () => {
    const m = create(tinyConfig());
    const err = await errorOf(() => m.trainStep([[1, 2, 3]]));
    expect(err.message).toMatch(/setOptimizer/);
  });
});

// The addon trusts its arguments' types: these are checked in lib/engine before any call.
describe('type checks made in TypeScript before the addon', () => {
  const cases: [string, () => unknown, RegExp][] = [
    ['a config that is not an object', () => Model.create(7 as never, PLAN), /^config must be an object$/],
    [
      'a size beyond 32 bits',
      () => Model.create({ ...tinyConfig(), vocab_size: 2 ** 31 }, PLAN),
      /config\.vocab_size is out of range \(a 32-bit integer\), got 2147483648/,
    ],
    [
      'a string boolean',
      () => Model.create({ ...tinyConfig(), attention_bias: 'yes' as never }, PLAN),
      /config\.attention_bias must be a boolean, got a string/,
    ],
    ['a fractional seed', () => Model.create({ ...tinyConfig(), seed: 1.5 }, PLAN), /config\.seed must be an integer, got 1\.5/],
    [
      'rope_scaling that is not an object',
      () => Model.create({ ...tinyConfig(), rope_scaling: 'linear' as never }, PLAN),
      /config\.rope_scaling must be an object, got a string/,
    ],
    [
      'a numeric rope_type',
      () => Model.create({ ...tinyConfig(), rope_scaling: { rope_type: 3 as never } }, PLAN),
      /config\.rope_scaling\.rope_type must be a string, got a number/,
    ],
    ['a plan that is not an object', () => Model.create(tinyConfig(), null as never), /^plan must be an object$/],
    [
      'a string maxSeq',
      () => Model.create(tinyConfig(), { maxBatch: 1, maxSeq: '8' as never }),
      /plan\.maxSeq must be a number, got a string/,
    ],
    ['a numeric device', () => Model.create(tinyConfig(), PLAN, { device: 0 as never }), /options\.device must be a string, got a number/],
    [
      'a string initialize',
      () => Model.create(tinyConfig(), PLAN, { initialize: 'no' as never }),
      /options\.initialize must be a boolean, got a string/,
    ],
    ['a numeric preset name', () => presetConfigOf(3), /preset name must be a string, got a number/],
  ];
  for (const [what, call, msg] of cases)
    it(`refuses ${what} with a TypeError`, () => {
      let err: unknown;
      try {
        live.push(call() as Model);
      } catch (e) {
        err = e;
      }
      expect(err).toBeInstanceOf(TypeError);
      expect((err as Error).message).toMatch(msg);
    });

  const optimizerCases: [string, object, RegExp][] = [
    ['an optimizer that is an array', [] as never, /^optimizer must be an object$/],
    ['a fractional gradAccumSteps', { gradAccumSteps: 1.5 }, /optimizer\.gradAccumSteps must be an integer, got 1\.5/],
    ['a string schedule', { schedule: 'cosine' }, /optimizer\.schedule must be an object, got a string/],
    [
      'a string totalSteps',
      { schedule: { kind: 'linear', totalSteps: '5' } },
      /optimizer\.schedule\.totalSteps must be a number, got a string/,
    ],
    ['an infinite weightDecay', { weightDecay: Infinity }, /optimizer\.weightDecay must be finite, got Infinity/],
  ];
  for (const [what, cfg, msg] of optimizerCases)
    it(`setOptimizer refuses ${what} with a TypeError`, () => {
      const m = create(tinyConfig());
      expect(() => m.setOptimizer(cfg as never)).toThrow(TypeError);
      expect(() => m.setOptimizer(cfg as never)).toThrow(msg);
    });
});

function presetConfigOf(name: unknown): unknown {
  return presetConfig(name as never);
}
