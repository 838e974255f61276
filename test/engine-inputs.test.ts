// Bad batches and bad parameter values: each is refused with a message that says what is
// wrong, and the model is left exactly as it was (same parameters, same loss, same step).
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { Model, type BatchInput } from '../lib/index.js';
import { bitsEqual, changedParams, errorOf, prng, randomRows, snapshot, tinyConfig } from './fixtures/engine-helpers.js';

const cfg = tinyConfig({ vocab_size: 20 });
const plan = { maxBatch: 2, maxSeq: 8 };
const good = randomRows(prng(7), 2, 8, cfg.vocab_size);

let model: Model;
let lossBefore: number;
let paramsBefore: Map<string, Float32Array>;
let stepBefore: number;

beforeAll(async () => {
  model = Model.create(cfg, plan);
  model.setOptimizer({ lr: 1e-2 });
  await model.trainStep(good); // a non-trivial state: one optimizer step taken
});
afterAll(async () => {
  await model.dispose();
});
beforeEach(async () => {
  lossBefore = (await model.evalLoss(good)).loss;
  paramsBefore = snapshot(model);
  stepBefore = model.step;
});

async function expectUnchanged(): Promise<void> {
  expect(changedParams(paramsBefore, snapshot(model))).toEqual([]);
  expect(model.step).toBe(stepBefore);
  expect((await model.evalLoss(good)).loss).toBe(lossBefore);
}

function withToken(r: number, t: number, id: number): number[][] {
  const rows = good.map((row) => [...row]);
  rows[r][t] = id;
  return rows;
}

type Call = 'evalLoss' | 'trainStep' | 'forward';
const calls: Call[] = ['evalLoss', 'trainStep', 'forward'];
function call(kind: Call, input: unknown): unknown {
  return model[kind](input as BatchInput);
}

describe('bad batches are refused with a clear error and leave the model usable', () => {
  const cases: [string, () => unknown, RegExp][] = [
    ['a token id >= vocab_size', () => withToken(1, 3, cfg.vocab_size), /token id 20 at sequence 1, position 3 is out of range \[0, 20\)/],
    ['a negative token id', () => withToken(0, 5, -4), /token id -4 at sequence 0, position 5 is out of range/],
    ['an empty batch', () => [], /batch is empty/],
    ['ragged rows', () => [good[0], good[1].slice(0, 5)], /ragged batch: sequence 1 has 5 tokens but sequence 0 has 8/],
    ['a sequence longer than plan.maxSeq', () => [[...good[0], 1]], /sequence length 9 exceeds the planned maximum 8 \(plan\.maxSeq\)/],
    [
      'more sequences than plan.maxBatch',
      () => [good[0], good[1], good[0]],
      /batch has 3 sequences; the model was planned for at most 2 \(plan\.maxBatch\)/,
    ],
    ['a non-integer token id', () => withToken(0, 2, 1.5), /token at sequence 0, position 2 is not an integer id: 1\.5/],
    ['a string token id', () => withToken(1, 0, '3' as unknown as number), /token at sequence 1, position 0 is not an integer id/],
    ['a row that is not an array', () => [good[0], 5], /batch row 1 is not an array/],
    [
      'a typed batch whose size does not match batch x seq',
      () => ({ tokens: new Int32Array(15), batch: 2, seq: 8 }),
      /batch\.tokens has 15 elements but batch x seq = 2 x 8/,
    ],
    [
      'a typed batch with a plain-array tokens field',
      () => ({ tokens: good.flat(), batch: 2, seq: 8 }),
      /batch\.tokens must be an Int32Array/,
    ],
  ];
  for (const kind of calls)
    for (const [what, input, msg] of cases) {
      it(`${kind}: ${what}`, async () => {
        const err = await errorOf(() => call(kind, input()));
        expect(err.message).toMatch(msg);
        await expectUnchanged();
      });
    }
});

describe('bad target masks are refused with a clear error and leave the model usable', () => {
  const tokens = Int32Array.from(good.flat());
  const cases: [string, () => unknown, RegExp][] = [
    [
      'a typed mask of the wrong length',
      () => ({ tokens, batch: 2, seq: 8, targetMask: new Uint8Array(15) }),
      /targetMask has 15 elements, batch\.tokens has 16/,
    ],
    [
      'a typed mask that is not a Uint8Array',
      () => ({ tokens, batch: 2, seq: 8, targetMask: new Array(16).fill(1) }),
      /batch\.targetMask must be a Uint8Array/,
    ],
    ['a row mask with too few rows', () => ({ rows: good, targetMask: [good[0].map(() => 1)] }), /targetMask has 1 rows, the batch has 2/],
    [
      'a row mask with a short row',
      () => ({ rows: good, targetMask: [good[0].map(() => 1), [1, 1]] }),
      /targetMask row 1 has 2 entries, sequences have 8/,
    ],
    [
      'a row mask with a value other than 0/1',
      () => ({ rows: good, targetMask: good.map((r) => r.map(() => 2)) }),
      /targetMask at sequence 0, position 0 must be 0 or 1, got 2/,
    ],
    [
      // position 0 is never a target, so a mask that only sets position 0 selects nothing
      'a mask selecting no targets',
      () => ({ rows: good, targetMask: good.map((r) => r.map((_, t) => (t === 0 ? 1 : 0))) }),
      /target mask selects no tokens to predict/,
    ],
  ];
  for (const kind of ['evalLoss', 'trainStep'] as const)
    for (const [what, input, msg] of cases) {
      it(`${kind}: ${what}`, async () => {
        const err = await errorOf(() => call(kind, input()));
        expect(err.message).toMatch(msg);
        await expectUnchanged();
      });
    }
});

describe('bad parameter values are refused and leave the parameter unchanged', () => {
  it('setParam with a NaN names the index and changes nothing', async () => {
    const v = Float32Array.from(model.getParam('model.norm.weight'), (x) => x * 0.5);
    v[3] = NaN;
    expect(() => model.setParam('model.norm.weight', v)).toThrow(/parameter 'model\.norm\.weight' value at index 3 is not finite/);
    const w = Array.from(model.getParam('model.layers.1.mlp.up_proj.weight'));
    w[w.length - 1] = Infinity;
    expect(() => model.setParam('model.layers.1.mlp.up_proj.weight', w)).toThrow(/value at index 2047 is not finite/);
    await expectUnchanged();
  });

  it('setParam with the wrong length names both sizes and changes nothing', async () => {
    expect(() => model.setParam('model.norm.weight', new Float32Array(5))).toThrow(
      /parameter 'model\.norm\.weight' has 32 elements, got 5/,
    );
    expect(() => model.setParam('model.norm.weight', new Float32Array(33))).toThrow(/has 32 elements, got 33/);
    await expectUnchanged();
  });

  it('getParam/setParam of an unknown name say which name', async () => {
    expect(() => model.getParam('model.nope')).toThrow(/no parameter named 'model\.nope'/);
    expect(() => model.setParam('model.layers.9.mlp.up_proj.weight', new Float32Array(1))).toThrow(
      /no parameter named 'model\.layers\.9\.mlp\.up_proj\.weight'/,
    );
    await expectUnchanged();
  });
});

describe('a failed training step discards its gradients', () => {
  it('a non-finite loss rejects, leaves parameters unchanged and drops the pending micro-batch', async () => {
    const make = () => {
      const m = Model.create(cfg, plan);
      m.setOptimizer({ lr: 1e-2, gradAccumSteps: 2 });
      return m;
    };
    const [a, b] = [make(), make()];
    const other = randomRows(prng(8), 2, 8, cfg.vocab_size);
    // a: one micro-batch accumulated, then a step whose loss overflows to a non-finite value
    expect((await a.trainStep(good)).stepped).toBe(false);
    const head = a.getParam('lm_head.weight');
    a.setParam(
      'lm_head.weight',
      head.map((_, i) => (i % 2 ? 3e38 : -3e38)),
    );
    const before = snapshot(a);
    const err = await errorOf(() => a.trainStep(other));
    expect(err.message).toMatch(/training loss is not finite/);
    expect(changedParams(before, snapshot(a))).toEqual([]);
    a.setParam('lm_head.weight', head);
    // The discarded micro-batch must not leak into the next optimizer step: a and b now take
    // the same two micro-batches from the same weights and must agree bit for bit.
    for (const m of [a, b]) {
      expect((await m.trainStep(good)).stepped).toBe(false);
      const r = await m.trainStep(other);
      expect(r).toMatchObject({ stepped: true, step: 1 });
    }
    const [sa, sb] = [snapshot(a), snapshot(b)];
    for (const [name, v] of sa) expect(bitsEqual(v, sb.get(name)!), name).toBe(true);
    await Promise.all([a.dispose(), b.dispose()]);
  });
});

// One test per case: the call throws (or rejects with) a TypeError whose message matches, and
// the model is left as it was.
function refusesWithTypeErrors(cases: [string, () => unknown, RegExp][]): void {
  for (const [what, call, msg] of cases)
    it(`refuses ${what}`, async () => {
      const err = await errorOf(call);
      expect(err).toBeInstanceOf(TypeError);
      expect(err.message).toMatch(msg);
      await expectUnchanged();
    });
}

// The addon trusts its arguments' types: these are checked in lib/engine before any call.
describe('argument types are checked before the addon and leave the model usable', () => {
  const items = [{ prompt: [1, 2], response: [3, 4] }];
  const examples = [{ prompt: [1, 2], response: [3, 4], refLogp: -3, target: 0.5 }];
  const cases: [string, () => unknown, RegExp][] = [
    ['a numeric parameter name for getParam', () => model.getParam(3 as never), /parameter name must be a string, got a number/],
    [
      'a numeric parameter name for setParam',
      () => model.setParam(3 as never, new Float32Array(32)),
      /parameter name must be a string, got a number/,
    ],
    ['a non-boolean perToken', () => model.sequenceLogprobs(items, { perToken: 1 as never }), /perToken must be a boolean, got a number/],
    [
      'a string eta',
      () => model.evalPreference({ examples }, { loss: 'sppo', eta: '1000' as never }),
      /eta must be a number, got a string/,
    ],
    ['a missing eta', () => model.preferenceStep({ examples }, { loss: 'sppo' } as never), /eta must be a number, got undefined/],
  ];
  refusesWithTypeErrors(cases);
});

// A misspelt or unknown option would otherwise take its default silently (preferenceStep with a
// `beta` trained at β = 1/η regardless): every call's options and every field of its inputs are
// checked against the fields it takes, and the error names the field and the known ones.
describe('unknown and mistyped fields are refused, naming the field and the known ones', () => {
  const items = [{ prompt: [1, 2], response: [3, 4] }];
  const examples = [{ prompt: [1, 2], response: [3, 4], refLogp: -3, target: 0.5 }];
  const pairs = [{ prompt: [1, 2], chosen: { response: [3], refLogp: -1 }, rejected: { response: [4], refLogp: -2 } }];
  const tokens = Int32Array.from(good.flat());
  const cases: [string, () => unknown, RegExp][] = [
    [
      'preferenceStep with a beta',
      () => model.preferenceStep({ examples }, { loss: 'sppo', eta: 1000, beta: 0.1 } as never),
      /^options has an unknown field 'beta' \(did you mean 'eta'\?\); the known fields are signal, loss, eta$/,
    ],
    [
      'evalPreference with a misspelt eta',
      () => model.evalPreference({ pairs }, { loss: 'dpo', eta: 10, Eta: 5 } as never),
      /^options has an unknown field 'Eta' \(did you mean 'eta'\?\); the known fields are signal, loss, eta$/,
    ],
    [
      'forward with a misspelt output',
      () => model.forward(good, { outputs: 'hidden' } as never),
      /^options has an unknown field 'outputs' \(did you mean 'output'\?\); the known fields are signal, output$/,
    ],
    [
      'forward with an unknown output',
      () => model.forward(good, { output: 'logit' } as never),
      /^options\.output must be 'logits', 'hidden' or 'both', got 'logit'$/,
    ],
    [
      'evalLoss with an unknown option',
      () => model.evalLoss(good, { signall: undefined } as never),
      /^options has an unknown field 'signall'/,
    ],
    [
      'trainStep with a non-signal signal',
      () => model.trainStep(good, { signal: 'stop' } as never),
      /^options\.signal must be an AbortSignal, got a string$/,
    ],
    [
      'train with a misspelt onProgress',
      () => model.train([good], { onprogress: () => undefined } as never),
      /^options has an unknown field 'onprogress' \(did you mean 'onProgress'\?\)/,
    ],
    [
      'train with a non-function onProgress',
      () => model.train([good], { onProgress: true } as never),
      /^options\.onProgress must be a function, got a boolean$/,
    ],
    [
      'sequenceLogprobs with a misspelt perToken',
      () => model.sequenceLogprobs(items, { pertoken: true } as never),
      /^options has an unknown field 'pertoken' \(did you mean 'perToken'\?\)/,
    ],
    ['an options object that is not an object', () => model.evalLoss(good, 5 as never), /^options must be an object$/],
    [
      'a rows batch with a misspelt targetMask',
      () => model.trainStep({ rows: good, targetmask: good.map((r) => r.map(() => 1)) } as never),
      /^batch has an unknown field 'targetmask' \(did you mean 'targetMask'\?\); the known fields are rows, targetMask$/,
    ],
    [
      'a typed batch with an unknown field',
      () => model.evalLoss({ tokens, batch: 2, seq: 8, mask: new Uint8Array(16) } as never),
      /^batch has an unknown field 'mask'; the known fields are tokens, batch, seq, targetMask$/,
    ],
    [
      'rows that are not an array',
      () => model.evalLoss({ rows: 'abc' } as never),
      /^batch\.rows must be an array of token id rows, got a string$/,
    ],
    ['a batch that is a number', () => model.forward(3 as never), /^batch must be rows of token ids, .* got a number$/],
    [
      'a sequence with an unknown field',
      () => model.sequenceLogprobs([{ ...items[0], weight: 2 }] as never),
      /^items\[0\] has an unknown field 'weight'; the known fields are prompt, response$/,
    ],
    [
      'an example with a misspelt refLogp',
      () => model.preferenceStep({ examples: [{ ...examples[0], reflogp: -3 }] } as never, { loss: 'sppo', eta: 1000 }),
      /^examples\[0\] has an unknown field 'reflogp' \(did you mean 'refLogp'\?\); the known fields are prompt, response, refLogp, target$/,
    ],
    [
      'a pair response with an unknown field',
      () =>
        model.preferenceStep({ pairs: [{ ...pairs[0], rejected: { response: [4], refLogp: -2, score: 1 } }] } as never, {
          loss: 'dpo',
          eta: 10,
        }),
      /^pairs\[0\]\.rejected has an unknown field 'score'; the known fields are response, refLogp, target$/,
    ],
    [
      'a pair with an unknown field',
      () => model.evalPreference({ pairs: [{ ...pairs[0], margin: 1 }] } as never, { loss: 'ipo', eta: 10 }),
      /^pairs\[0\] has an unknown field 'margin'; the known fields are prompt, chosen, rejected, q$/,
    ],
    [
      'a preference batch with both examples and pairs',
      () => model.preferenceStep({ examples, pairs }, { loss: 'sppo', eta: 1000 }),
      /^the preference batch has an unknown field 'pairs'; the known fields are examples$/,
    ],
    [
      'pairs that are not an array',
      () => model.evalPreference({ pairs: {} } as never, { loss: 'dpo', eta: 1 }),
      /^pairs must be an array of/,
    ],
  ];
  refusesWithTypeErrors(cases);
});

describe('setParam takes numbers only', () => {
  const name = 'model.norm.weight';
  const cases: [string, unknown, RegExp][] = [
    [
      'a string (once coerced digit by digit)',
      '1'.repeat(32),
      /^values of parameter 'model\.norm\.weight' must be a Float32Array or an array of numbers, got a string$/,
    ],
    [
      'an array of numeric strings',
      Array.from({ length: 32 }, () => '0.5'),
      /^parameter 'model\.norm\.weight' value at index 0 must be a number, got a string$/,
    ],
    ['an object with a length', { length: 32 }, /must be a Float32Array or an array of numbers, got an object$/],
    ['a number', 32, /must be a Float32Array or an array of numbers, got a number$/],
    ['an array with a null', [...Array.from({ length: 31 }, () => 1), null], /value at index 31 must be a number, got null$/],
    ['a value beyond float32', [...Array.from({ length: 31 }, () => 1), 1e39], /value at index 31 \(1e\+39\) is beyond float32's range$/],
    ['a NaN in a Float64Array', Float64Array.from({ length: 32 }, (_, i) => (i === 5 ? NaN : 1)), /value at index 5 is not finite$/],
  ];
  for (const [what, values, msg] of cases)
    it(`refuses ${what}, leaving the parameter unchanged`, async () => {
      const err = await errorOf(() => model.setParam(name, values as never));
      expect(err.message).toMatch(msg);
      await expectUnchanged();
    });

  it('takes a Float32Array, an array of numbers and other numeric typed arrays', async () => {
    const before = model.getParam(name);
    for (const values of [Float32Array.from(before), Array.from(before), Float64Array.from(before)]) {
      model.setParam(name, values);
      expect(bitsEqual(model.getParam(name), before)).toBe(true);
    }
    await expectUnchanged();
  });
});
