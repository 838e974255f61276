// Model.plan: the bytes by category before anything is allocated. On the CPU backend they must
// equal what the model and its generator then allocate, category by category; for 'cuda' they
// must come out on a machine without a GPU; and Model.create must refuse a plan that does not fit
// with a message that says what would.
import { describe, expect, it } from 'vitest';
import { formatMemoryPlan, MEMORY_CATEGORIES, Model, type LoraOptions, type ModelConfig, type PlanOptions } from '../lib/index.js';
import { tinyConfig } from './fixtures/engine-helpers.js';

const plan = { maxBatch: 3, maxSeq: 16 };
const config = tinyConfig({ num_hidden_layers: 3, attention_bias: true });

// Llama-3-8B's shape (config.json of meta-llama/Meta-Llama-3-8B).
const llama3_8b: ModelConfig = {
  vocab_size: 128256,
  hidden_size: 4096,
  num_hidden_layers: 32,
  num_attention_heads: 32,
  num_key_value_heads: 8,
  intermediate_size: 14336,
  max_position_embeddings: 8192,
  rope_theta: 500000,
  rope_scaling: { rope_type: 'llama3', factor: 8, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 8192 },
};

describe('Model.plan', () => {
  it("counts a CPU generator's packed weights, and packWeights: false leaves them out", async () => {
    const model = Model.create(config, plan);
    try {
      for (const packWeights of [true, false]) {
        const generator = { maxBatch: 4, maxContext: 24, packWeights };
        const gen = model.createGenerator(generator);
        expect([packWeights, Model.plan(config, plan, { generator }).kvCache]).toEqual([packWeights, gen.memory()]);
        await gen.dispose();
      }
      const packed = Model.plan(config, plan, { generator: { maxBatch: 4, maxContext: 24 } }).kvCache;
      const plain = Model.plan(config, plan, { generator: { maxBatch: 4, maxContext: 24, packWeights: false } }).kvCache;
      // The copy holds at least every projection and the LM head (4 bytes each on the CPU).
      const { hidden_size: C, intermediate_size: F, num_hidden_layers: L, vocab_size: V } = config;
      const heads = config.num_attention_heads,
        kv = config.num_key_value_heads ?? heads,
        D = C / heads;
      const weights = L * ((heads + 2 * kv) * D * C + C * heads * D + 2 * F * C + C * F) + V * C;
      expect(packed - plain).toBeGreaterThanOrEqual(4 * weights);
    } finally {
      await model.dispose();
    }
  });

  for (const [activationCheckpointing, gradientPrecision] of [
    [false, 'fp32'],
    [true, 'fp32'],
    [false, 'bf16'],
    [true, 'bf16'],
  ] as const)
    for (const kind of ['adamw', 'rmsprop'] as const)
      it(`equals what the CPU backend allocates, category by category (checkpointing ${activationCheckpointing}, ${gradientPrecision} gradients, ${kind})`, async () => {
        const generator = { maxBatch: 4, maxContext: 24 };
        const options: PlanOptions = { activationCheckpointing, gradientPrecision, optimizer: { kind }, generator };
        const planned = Model.plan(config, plan, options);
        const model = Model.create(config, plan, options);
        try {
          expect(model.activationCheckpointing).toBe(activationCheckpointing);
          expect(model.gradientPrecision).toBe(gradientPrecision);
          model.setOptimizer({ kind });
          const gen = model.createGenerator(generator);
          const real = { ...model.memory(), kvCache: gen.memory() };
          for (const [key] of MEMORY_CATEGORIES) expect([key, planned[key]]).toEqual([key, real[key]]);
          expect(planned.total).toBe(real.total + real.kvCache);
          expect(planned.kvCache).toBeGreaterThan(0);
          await gen.dispose();
        } finally {
          await model.dispose();
        }
      });

  it('counts no optimizer state and no KV cache unless asked to', () => {
    const r = Model.plan(config, plan, { activationCheckpointing: false });
    expect(r.optimizer).toBe(0);
    expect(r.kvCache).toBe(0);
    const rms = Model.plan(config, plan, { activationCheckpointing: false, optimizer: { kind: 'rmsprop' } });
    const adam = Model.plan(config, plan, { activationCheckpointing: false, optimizer: { kind: 'adamw' } });
    expect(adam.optimizer).toBe(2 * rms.optimizer); // two moments against one square average
    expect(rms.optimizer).toBe(rms.grads); // one float32 per parameter, as the gradients
  });

  it("plans the Llama-3-8B shape on 'cuda' without a GPU: bf16 weights over float32 master, gradients and state", () => {
    // Every tensor of this shape is a multiple of the arena's 16-element alignment, so the
    // bytes are exact multiples of the parameter count (8,030,261,248: the published figure).
    const { vocab_size: V, hidden_size: C, intermediate_size: F, num_hidden_layers: L } = llama3_8b;
    const kv = (C / 32) * 8;
    const n = 2 * V * C + L * (C * C + 2 * kv * C + C * C + 3 * F * C + 2 * C) + C;
    expect(n).toBe(8_030_261_248);
    const r = Model.plan(
      llama3_8b,
      { maxBatch: 2, maxSeq: 1024 },
      { device: 'cuda', activationCheckpointing: true, optimizer: { kind: 'rmsprop' } },
    );
    expect(r.device).toBe('cuda');
    expect([r.params, r.master, r.grads, r.optimizer]).toEqual([2 * n, 4 * n, 4 * n, 4 * n]);
    const full = Model.plan(llama3_8b, { maxBatch: 2, maxSeq: 1024 }, { device: 'cuda', activationCheckpointing: false });
    // Checkpointing keeps one (N, C) bf16 input per layer, plus one layer's full set.
    expect(full.activations).toBeGreaterThan(8 * r.activations);
    expect(r.activations).toBeGreaterThan(L * 2 * 1024 * C * 2);
    // The goal of issue 13: full fine-tuning with RMSprop within an H200's 141 GB.
    expect(r.total).toBeLessThan(141e9);
    // bf16 gradients: two bytes a parameter, and a float32 stage for the LM head's V × C (the
    // largest gradient made at once) under scratch. AdamW then fits as well.
    const half = Model.plan(
      llama3_8b,
      { maxBatch: 2, maxSeq: 1024 },
      { device: 'cuda', activationCheckpointing: true, gradientPrecision: 'bf16', optimizer: { kind: 'rmsprop' } },
    );
    expect(half.gradientPrecision).toBe('bf16');
    expect(half.grads).toBe(2 * n);
    expect(half.scratch - r.scratch).toBe(4 * V * C);
    const adam = Model.plan(
      llama3_8b,
      { maxBatch: 2, maxSeq: 1024 },
      { device: 'cuda', activationCheckpointing: true, gradientPrecision: 'bf16', optimizer: { kind: 'adamw' } },
    );
    expect(adam.total).toBeLessThan(141e9 - 8 * 2 ** 30); // 8 GiB left for the CUDA context, cuBLASLt and the allocator
  });

  it("resolves 'auto' gradient precision after checkpointing, and never to bf16 with LoRA", () => {
    const options = { optimizer: { kind: 'adamw' } } as const;
    const at = (available: number, extra: PlanOptions = {}) =>
      Model.plan(config, plan, { ...options, ...extra, gradientPrecision: 'auto', available });
    const fp32 = Model.plan(config, plan, { ...options, activationCheckpointing: true });
    const bf16 = Model.plan(config, plan, { ...options, activationCheckpointing: true, gradientPrecision: 'bf16' });
    expect(bf16.grads * 2).toBe(fp32.grads);
    expect(bf16.total).toBeLessThan(fp32.total);
    expect(at(fp32.total)).toMatchObject({ activationCheckpointing: true, gradientPrecision: 'fp32' });
    expect(at(fp32.total - 1)).toMatchObject({ gradientPrecision: 'bf16' });
    expect(Model.plan(config, plan, options).gradientPrecision).toBe('fp32'); // the default
    const lora: LoraOptions = { rank: 2, alpha: 4, targets: ['q_proj', 'v_proj'] };
    expect(at(1000, { lora }).gradientPrecision).toBe('fp32');
    // Where the bf16 stage (vocabulary × hidden, float32) outweighs what the gradients save, 'auto'
    // keeps float32 and the refusal does not suggest bf16; asked for, bf16 is still given.
    const wide = tinyConfig({ vocab_size: 4096, tie_word_embeddings: true });
    expect(Model.plan(wide, plan, { gradientPrecision: 'bf16' }).total).toBeGreaterThan(Model.plan(wide, plan).total);
    expect(Model.plan(wide, plan, { gradientPrecision: 'auto', available: 1000 }).gradientPrecision).toBe('fp32');
    let refusal = '';
    try {
      Model.create(wide, plan, { available: 1000 });
    } catch (err) {
      refusal = (err as Error).message;
    }
    expect(refusal).toMatch(/^Model\.create: needs/);
    expect(refusal).not.toContain('gradientPrecision');
    expect(() => Model.plan(config, plan, { gradientPrecision: 'bf16', lora })).toThrow(
      /bf16 gradients are for full fine-tuning: LoRA adapters keep float32 gradients/,
    );
  });

  it("resolves 'auto' checkpointing against the memory available", () => {
    const off = Model.plan(config, plan, { activationCheckpointing: false });
    const on = Model.plan(config, plan, { activationCheckpointing: true });
    expect(on.activations).toBeLessThan(off.activations);
    expect(Model.plan(config, plan, { available: off.total }).activationCheckpointing).toBe(false);
    expect(Model.plan(config, plan, { available: off.total - 1 }).activationCheckpointing).toBe(true);
    expect(Model.plan(config, plan).activationCheckpointing).toBe(false); // a tiny model fits this host
  });

  it('prints as a table of the categories it holds', () => {
    const text = formatMemoryPlan(Model.plan(config, plan, { optimizer: { kind: 'adamw' }, available: 1e12 }));
    expect(text).toMatch(/^memory plan on cpu \(activation checkpointing off, 931\.3 GiB available\):\n/);
    expect(text).toMatch(/\n {2}parameters +0\.\d{3} GiB\n {2}gradients +0\.\d{3} GiB\n {2}optimizer state/);
    expect(text).not.toMatch(/master weights|KV cache/); // none on the CPU, no generator asked for
    expect(text).toMatch(/\n {2}total +0\.\d{3} GiB$/);
  });

  it('refuses bad options by name', () => {
    expect(() => Model.plan(config, plan, { activationCheckpointing: 'yes' as never })).toThrow(
      /options\.activationCheckpointing must be true, false or 'auto', got a string/,
    );
    expect(() => Model.plan(config, plan, { optimizer: { kind: 'sgd' as never } })).toThrow(
      /options\.optimizer\.kind must be 'adamw' or 'rmsprop', got 'sgd'/,
    );
    expect(() => Model.plan(config, plan, { generator: { maxBatch: 1.5, maxContext: 8 } })).toThrow(/options\.generator\.maxBatch/);
    expect(() => Model.plan(config, plan, { generator: { maxBatch: 0, maxContext: 8 } })).toThrow(
      /generator plan\.maxBatch must be at least 1/,
    );
    expect(() => Model.plan(config, plan, { available: -1 })).toThrow(/options\.available must be a number of bytes >= 0, got -1/);
    expect(() => Model.plan(config, plan, { lora: {} } as never)).toThrow(/options.*lora/);
    expect(() => Model.plan(config, plan, { gradientPrecision: 'fp16' as never })).toThrow(/options\.gradientPrecision must be/);
    expect(() => Model.plan(config, { maxBatch: 0, maxSeq: 8 })).toThrow(/maxBatch/);
  });
});

describe('Model.create', () => {
  it('refuses a plan that does not fit, with the table and what would fit', () => {
    const options: PlanOptions = {
      activationCheckpointing: false,
      optimizer: { kind: 'adamw' },
      generator: { maxBatch: 4, maxContext: 24 },
    };
    const need = Model.plan(config, plan, options);
    let message = '';
    try {
      Model.create(config, plan, { ...options, available: need.total - 1 });
    } catch (err) {
      message = (err as Error).message;
    }
    expect(message).toMatch(/^Model\.create: needs 0\.\d{3} GiB on cpu \(0\.\d{3} GiB free\): parameters 0\.\d{3}, gradients/);
    expect(message).toMatch(/ — activationCheckpointing: true brings activations to 0\.\d{3} \(total 0\.\d{3} GiB, fits\)/);
    expect(message).toMatch(/; gradientPrecision: 'bf16' brings gradients to 0\.\d{3} \(total 0\.\d{3} GiB, fits\)/);
    expect(message).toMatch(/; optimizer: \{kind: 'rmsprop'\} brings optimizer state to 0\.\d{3} \(total 0\.\d{3} GiB, fits\)/);
    expect(message).toMatch(/; plan\.maxBatch: 1 brings activations and scratch to/);
    expect(message).toMatch(/; generator\.packWeights: false brings generator KV cache to 0\.\d{3} \(total/);
    expect(message).toMatch(/; generator\.maxBatch: 2 brings generator KV cache to/);
    expect(message).toContain(formatMemoryPlan({ ...need, available: need.total - 1 }));
    // Asked for bf16 gradients, the LoRA suggestion says it takes float32 ones.
    expect(() => Model.create(config, plan, { ...options, gradientPrecision: 'bf16', available: 1000 })).toThrow(
      /lora: \{rank: \d+\} \(all seven projections\) with gradientPrecision: 'fp32' brings/,
    );
    // With almost nothing free, no change fits alone: the message adds them all up.
    expect(() => Model.create(config, plan, { ...options, available: 1000 })).toThrow(
      /; all of these together bring the total to 0\.\d{3} GiB\n/,
    );
  });

  it('suggests halving a KV-cache pool sized in bytes, since halving maxBatch would not shrink it', async () => {
    const pool = { maxBatch: 4, maxContext: 24 };
    const options: PlanOptions = { activationCheckpointing: true, generator: { ...pool, kvCacheBytes: 1 << 20 } };
    const need = Model.plan(config, plan, options);
    const half = Model.plan(config, plan, { ...options, generator: { ...pool, kvCacheBytes: 1 << 19 } });
    expect(half.kvCache).toBeLessThan(need.kvCache);
    expect(() => Model.create(config, plan, { ...options, available: need.total - 1 })).toThrow(
      `generator.kvCacheBytes: ${1 << 19} brings generator KV cache to ${(half.kvCache / 2 ** 30).toFixed(3)}`,
    );
    expect(() => Model.create(config, plan, { ...options, available: need.total - 1 })).not.toThrow(/generator\.maxBatch/);
    // A pool of one block has no half to suggest: the refusal says the rest.
    const model = Model.create(config, plan);
    const { blockBytes } = model.createGenerator({ ...pool, kvCacheBytes: 1 << 20 }).kvCache();
    await model.dispose();
    const oneBlock = { activationCheckpointing: true, generator: { ...pool, kvCacheBytes: blockBytes } };
    const tight = Model.plan(config, plan, oneBlock).total - 1;
    expect(() => Model.create(config, plan, { ...oneBlock, available: tight })).toThrow(/^Model\.create: needs .* GiB on cpu/);
    expect(() => Model.create(config, plan, { ...oneBlock, available: tight })).not.toThrow(/kvCacheBytes/);
  });

  it("turns checkpointing on by itself ('auto', the default) where that makes the plan fit", async () => {
    const off = Model.plan(config, plan, { activationCheckpointing: false });
    const model = Model.create(config, plan, { available: off.total - 1 });
    try {
      expect(model.activationCheckpointing).toBe(true);
      expect(model.memory().activations).toBe(Model.plan(config, plan, { activationCheckpointing: true }).activations);
    } finally {
      await model.dispose();
    }
  });
});
