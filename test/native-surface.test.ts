// The addon's own lists agree with the TypeScript layer's (one source of truth each side
// checks), and a bad call straight at the addon, past every TypeScript check, is refused with
// an error instead of reading out of bounds or misreading an object.
import { afterAll, describe, expect, it } from 'vitest';
import { LORA_TARGETS } from '../lib/engine/lora.js';
import { PREFERENCE_LOSSES } from '../lib/engine/losses.js';
import { MODEL_CONFIG_FIELDS } from '../lib/engine/model.js';
import { ABI_VERSION, native, type NativeModelHandle } from '../lib/engine/native.js';
import { tinyConfig } from './fixtures/engine-helpers.js';

describe('the addon exports the lists lib/engine checks against', () => {
  it('its preference losses are PREFERENCE_LOSSES, in order', () => {
    expect(native().preferenceLosses).toEqual([...PREFERENCE_LOSSES]);
  });

  it('its model config fields are MODEL_CONFIG_FIELDS, in order', () => {
    expect(native().modelConfigFields).toEqual(Object.keys(MODEL_CONFIG_FIELDS));
  });

  it('its LoRA targets are LORA_TARGETS, in order', () => {
    expect(native().loraTargets).toEqual([...LORA_TARGETS]);
  });

  it('its ABI version is ABI_VERSION', () => {
    expect(native().abiVersion).toBe(ABI_VERSION);
  });

  it('a resolved config has exactly the exported fields', () => {
    expect(Object.keys(native().presetConfig('tiny'))).toEqual(native().modelConfigFields);
  });
});

describe('the addon refuses calls that would read memory wrongly', () => {
  const addon = native();
  const handle: NativeModelHandle = new addon.NativeModel(tinyConfig(), { maxBatch: 2, maxSeq: 8 });
  afterAll(() => handle.dispose());
  const tokens = new Int32Array(16);

  it('a typed array of another type than the one read', () => {
    expect(() => handle.evalLoss(new Uint8Array(16) as never, 2, 8, null)).toThrow(new TypeError('tokens must be an Int32Array'));
    expect(() => handle.evalLoss(tokens, 2, 8, new Int32Array(16) as never)).toThrow(new TypeError('targetMask must be a Uint8Array'));
    expect(() => handle.setParam('model.norm.weight', new Float64Array(32) as never)).toThrow(
      new TypeError('parameter values must be a Float32Array'),
    );
  });

  it('lengths that disagree with the shape the engine indexes by', () => {
    expect(() => handle.trainStep(new Int32Array(15), 2, 8, null)).toThrow(
      new RangeError('tokens has 15 elements but batch x seq = 2 x 8'),
    );
    expect(() => handle.forward(tokens, 4, 8, 'logits')).toThrow(/tokens has 16 elements but batch x seq = 4 x 8/);
    expect(() => handle.evalLoss(tokens, -2, -8, null)).toThrow(/batch and seq must be 32-bit integers >= 0/);
    expect(() => handle.sequenceLogprobs(tokens, 2, 8, new Uint8Array(15), false)).toThrow(
      /targetMask has 15 elements but batch x seq = 2 x 8/,
    );
    const f64 = (n: number) => new Float64Array(n);
    expect(() => handle.evalPreference(tokens, 2, 8, null, f64(1), f64(2), 'dpo', 1)).toThrow(
      /refLogp has 1 elements but the batch has 2 sequences/,
    );
    expect(() => handle.preferenceStep(tokens, 2, 8, null, f64(2), f64(3), 'dpo', 1)).toThrow(
      /target has 3 elements but the batch has 2 sequences/,
    );
  });

  it('token ids out of range, found by the engine before it reads an embedding', async () => {
    await expect(
      handle.evalLoss(
        Int32Array.from({ length: 16 }, (_, i) => (i === 5 ? 32 : 1)),
        2,
        8,
        null,
      ),
    ).rejects.toThrow(/token id 32 at sequence 0, position 5 is out of range \[0, 32\)/);
  });

  it('generate: prompt lengths, seeds and prompt tokens that disagree', () => {
    const gen = new addon.NativeGenerator(handle, { maxBatch: 2, maxContext: 16 });
    const opts = { stopTokens: new Int32Array(0) };
    const one = Float64Array.of(0);
    expect(() => gen.generate(Int32Array.of(1, 2), Int32Array.of(3), one, 1, opts, null)).toThrow(
      /prompt lengths do not match the 2 prompt tokens/,
    );
    expect(() => gen.generate(Int32Array.of(1, 2), Int32Array.of(-1), one, 1, opts, null)).toThrow(/prompt lengths do not match/);
    expect(() => gen.generate(Int32Array.of(1, 2), Int32Array.of(1, 1), one, 1, opts, null)).toThrow(
      /seeds has 1 elements but there are 2 prompts/,
    );
    expect(() => gen.generate(Int32Array.of(1), Int32Array.of(1), Float64Array.of(-1), 1, opts, null)).toThrow(
      /seed of prompt 0 must be a non-negative safe integer/,
    );
    expect(() => gen.generate(Int32Array.of(1), Int32Array.of(1), one, 1, { stopTokens: [1] as never }, null)).toThrow(
      /options\.stopTokens must be an Int32Array/,
    );
    expect(() => gen.generate(Int32Array.of(99), Int32Array.of(1), one, 1, opts, null)).toThrow(/token id 99 .* out of range/);
    gen.dispose();
  });

  it('a generator is made only from a NativeModel', () => {
    const gen = new addon.NativeGenerator(handle, { maxBatch: 1, maxContext: 8 });
    for (const notAModel of [{}, gen, new Int32Array(4)])
      expect(() => new addon.NativeGenerator(notAModel as never, { maxBatch: 1, maxContext: 8 })).toThrow(
        new TypeError('a generator needs the model it samples from'),
      );
    gen.dispose();
  });

  it('a value of the wrong JS type is an error, not a crash', () => {
    expect(() => handle.getParam(3 as never)).toThrow();
    expect(() => handle.evalLoss(tokens, '2' as never, 8, null)).toThrow();
    expect(() => new addon.NativeModel({ ...tinyConfig(), vocab_size: 'many' }, { maxBatch: 1, maxSeq: 8 })).toThrow();
  });
});
