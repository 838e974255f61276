// LoRA through the TypeScript engine: the adapters' names and shapes (lib/engine/lora.ts's
// loraTensorName), PEFT's initialisation (the model starts as its base), adapterTensors /
// setAdapterTensors, training that moves the adapters alone, generation from base + adapters, the
// plan, and bad options named.
import { existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { Model, savePretrained, type ModelConfig, type PlanOptions } from '../lib/index.js';
import { LORA_TARGET_MODULE, LORA_TARGETS, loraTensorName, type LoraOptions, type LoraTarget } from '../lib/engine/lora.js';
import { bitsEqual, changedParams, prng, snapshot, tinyConfig } from './fixtures/engine-helpers.js';

const config: ModelConfig = tinyConfig({ attention_bias: true });
const plan = { maxBatch: 4, maxSeq: 12 };
const lora: LoraOptions = { rank: 4, alpha: 8, targets: ['q_proj', 'v_proj', 'o_proj', 'up_proj', 'down_proj'] };

const live: Model[] = [];
function create(options: Parameters<typeof Model.create>[2] = {}): Model {
  const m = Model.create(config, plan, options);
  live.push(m);
  return m;
}
afterEach(async () => {
  await Promise.all(live.splice(0).map((m) => m.dispose()));
});

// in and out of each projection of `config` (hidden 32, 4 heads of 8 on 2 kv heads, ffn 64).
const SIZES: Record<LoraTarget, [number, number]> = {
  q_proj: [32, 32],
  k_proj: [32, 16],
  v_proj: [32, 16],
  o_proj: [32, 32],
  gate_proj: [32, 64],
  up_proj: [32, 64],
  down_proj: [64, 32],
};

function randomAdapters(model: Model, seed: number): Map<string, Float32Array> {
  const rand = prng(seed);
  const out = new Map<string, Float32Array>();
  for (const [name, v] of model.adapterTensors())
    out.set(
      name,
      v.map(() => (rand() - 0.5) * 0.4),
    );
  return out;
}

const prompts = [
  { prompt: [1, 2, 3], response: [4, 5, 6, 7] },
  { prompt: [9, 8], response: [7, 6, 5, 4, 3] },
];

describe('Model.create with lora', () => {
  it("names each adapter as loraTensorName does, with PEFT's shapes, and freezes the base", () => {
    const model = create({ lora });
    expect(model.lora).toEqual(lora);
    const adapters = model.params().filter((p) => p.adapter);
    const expected = Array.from({ length: config.num_hidden_layers }, (_, layer) =>
      LORA_TARGETS.filter((t) => lora.targets.includes(t)).flatMap((t) => [
        [loraTensorName(layer, t, 'A'), [lora.rank, SIZES[t][0]]],
        [loraTensorName(layer, t, 'B'), [SIZES[t][1], lora.rank]],
      ]),
    ).flat();
    expect(new Map(adapters.map((p) => [p.name, p.shape]))).toEqual(new Map(expected as [string, number[]][]));
    expect(adapters.every((p) => p.trainable)).toBe(true);
    expect(
      model
        .params()
        .filter((p) => !p.adapter)
        .every((p) => !p.trainable),
    ).toBe(true);
    expect(loraTensorName(1, 'up_proj', 'A')).toBe(`model.layers.1.${LORA_TARGET_MODULE.up_proj}.up_proj.lora_A.weight`);
    const plain = create();
    expect(plain.lora).toBeUndefined();
    expect(plain.params().every((p) => p.trainable && !p.adapter)).toBe(true);
    expect(plain.adapterTensors().size).toBe(0);
  });

  it('starts as its base (B = 0), with initialize: false too, and setAdapterTensors changes the logits', async () => {
    const base = create();
    const model = create({ lora });
    const loaded = create({ lora, initialize: false });
    for (const p of base.params()) loaded.setParam(p.name, base.getParam(p.name));
    const tokens = [[1, 2, 3, 4, 5, 6]];
    const want = (await base.forward(tokens)).logits!;
    expect(bitsEqual((await model.forward(tokens)).logits!, want)).toBe(true);
    expect(bitsEqual((await loaded.forward(tokens)).logits!, want)).toBe(true);
    // initialize: false still draws the adapters' A (B is zero either way)
    for (const [name, v] of loaded.adapterTensors()) expect(v.some((x) => x !== 0)).toBe(name.includes('lora_A'));
    const tensors = randomAdapters(model, 3);
    model.setAdapterTensors(tensors);
    const back = model.adapterTensors();
    for (const [name, v] of tensors) expect(bitsEqual(back.get(name)!, v)).toBe(true);
    expect(bitsEqual((await model.forward(tokens)).logits!, want)).toBe(false);
  });

  it('setAdapterTensors refuses a map that is not exactly the adapters, leaving them unchanged', () => {
    const model = create({ lora });
    const before = model.adapterTensors();
    const good = randomAdapters(model, 5);
    const first = [...good.keys()][0];
    const missing = new Map(good);
    missing.delete(first);
    expect(() => model.setAdapterTensors(missing)).toThrow(`adapter tensor '${first}' is missing`);
    expect(() =>
      model.setAdapterTensors(new Map([...good, ['model.layers.0.self_attn.k_proj.lora_A.weight', new Float32Array(128)]])),
    ).toThrow(/'model\.layers\.0\.self_attn\.k_proj\.lora_A\.weight' is not one of the model's adapter tensors/);
    const short = new Map(good).set(first, new Float32Array(3));
    expect(() => model.setAdapterTensors(short)).toThrow(/has 3 values; its shape \[4, 32\] holds 128/);
    const nan = new Map(good).set([...good.keys()][5], new Float32Array(good.get([...good.keys()][5])!.length).fill(Number.NaN));
    expect(() => model.setAdapterTensors(nan)).toThrow(/not finite/);
    for (const [name, v] of model.adapterTensors()) expect(bitsEqual(v, before.get(name)!)).toBe(true);
    expect(() => create().setAdapterTensors(good)).toThrow('the model has no adapters (create it with options.lora)');
  });

  it('training moves the adapters and leaves every base weight bitwise as it was', async () => {
    const model = create({ lora, activationCheckpointing: true });
    model.setOptimizer({ kind: 'adamw', lr: 1e-2, weightDecay: 0.1 });
    const before = snapshot(model);
    const examples = prompts.map((p, i) => ({ ...p, refLogp: -20 - i, target: i === 0 ? 0.8 : 0.2 }));
    for (let s = 0; s < 3; s++) await model.preferenceStep({ examples }, { loss: 'sppo', eta: 10 });
    const changed = new Set(changedParams(before, snapshot(model)));
    for (const p of model.params()) expect([p.name, changed.has(p.name)]).toEqual([p.name, p.adapter]);
  });

  it('savePretrained refuses it before writing anything: its adapters go to saveAdapter', async () => {
    const dir = path.join(tmpdir(), `sppo-lora-refused-${process.pid}`);
    await expect(savePretrained(create({ lora }), dir)).rejects.toThrow(/the model has LoRA adapters, .* save them with saveAdapter/);
    expect(existsSync(dir)).toBe(false);
  });

  it('generates from base + adapters: the log-probs it reports are sequenceLogprobs of the same model', async () => {
    const model = create({ lora });
    model.setAdapterTensors(randomAdapters(model, 9));
    const gen = model.createGenerator({ maxBatch: 2, maxContext: 12 });
    const out = await gen.generate(
      [
        [1, 2, 3],
        [4, 5],
      ],
      { maxNewTokens: 6, seed: 4 },
    );
    const items = out.map((s, i) => ({
      prompt: [
        [1, 2, 3],
        [4, 5],
      ][i],
      response: [...s.tokens],
    }));
    const { perToken } = await model.sequenceLogprobs(items, { perToken: true });
    out.forEach((s, i) => s.logprobs.forEach((lp, t) => expect(lp).toBeCloseTo(perToken![i][t], 4)));
    await gen.dispose();
  });
});

describe('Model.plan with lora', () => {
  it('equals what the CPU backend allocates, and counts gradients and state for the adapters alone', async () => {
    const options: PlanOptions = {
      lora,
      activationCheckpointing: false,
      optimizer: { kind: 'adamw' },
      generator: { maxBatch: 2, maxContext: 12 },
    };
    const planned = Model.plan(config, plan, options);
    const model = create(options);
    model.setOptimizer({ kind: 'adamw' });
    const gen = model.createGenerator({ maxBatch: 2, maxContext: 12 });
    expect({ ...model.memory(), kvCache: gen.memory(), total: planned.total }).toEqual({
      params: planned.params,
      master: planned.master,
      grads: planned.grads,
      optimizer: planned.optimizer,
      activations: planned.activations,
      scratch: planned.scratch,
      kvCache: planned.kvCache,
      total: model.memory().total + gen.memory(),
    });
    await gen.dispose();
    const full = Model.plan(config, plan, { ...options, lora: undefined });
    const adapterBytes = 4 * [...model.adapterTensors().values()].reduce((n, v) => n + v.length, 0);
    expect(planned.grads).toBeGreaterThanOrEqual(adapterBytes);
    expect(planned.grads).toBeLessThan(adapterBytes + 4 * 16 * 20); // 20 aligned blocks' padding at most
    expect(planned.optimizer).toBe(2 * planned.grads);
    expect(planned.params).toBe(full.params + planned.grads);
    const cuda = Model.plan(config, plan, { ...options, device: 'cuda' });
    expect([cuda.params, cuda.master, cuda.grads]).toEqual([planned.params / 2, planned.grads, planned.grads]);
  });

  it('a refusal suggests LoRA, with what it brings the weight-shaped state to', () => {
    const options: PlanOptions = { activationCheckpointing: true, optimizer: { kind: 'rmsprop' }, device: 'cuda' };
    const need = Model.plan(config, plan, options);
    const withLora = Model.plan(config, plan, { ...options, lora: { rank: 16, alpha: 32, targets: LORA_TARGETS } });
    expect(() => Model.create(config, plan, { ...options, available: need.total - 1 })).toThrow(
      `lora: {rank: 16} (all seven projections) brings master weights and gradients and optimizer state to ${(
        (withLora.master + withLora.grads + withLora.optimizer) /
        1024 ** 3
      ).toFixed(3)} (total`,
    );
  });

  it('refuses bad lora options by name', () => {
    const bad = (l: unknown) => () => Model.plan(config, plan, { lora: l as LoraOptions });
    expect(bad({ rank: 4, alpha: 8 })).toThrow('options.lora.targets is required');
    expect(bad({ rank: 4, targets: ['q_proj'] })).toThrow('options.lora.alpha is required');
    expect(bad({ rank: 4.5, alpha: 8, targets: ['q_proj'] })).toThrow('options.lora.rank must be an integer, got 4.5');
    expect(bad({ rank: 4, alpha: 8, targets: 'q_proj' })).toThrow(/options\.lora\.targets must be an array of projection names/);
    expect(bad({ rank: 4, alpha: 8, targets: ['q_proj'], dropout: 0.1 })).toThrow(/options\.lora has an unknown field 'dropout'/);
    expect(bad({ rank: 4, alpha: 8, targets: ['qproj'] })).toThrow(/lora\.targets: unknown target 'qproj' \(known: q_proj, k_proj/);
    expect(bad({ rank: 4, alpha: 8, targets: ['q_proj', 'q_proj'] })).toThrow("lora.targets lists 'q_proj' twice");
    expect(bad({ rank: 4, alpha: 8, targets: [] })).toThrow('lora.targets is empty');
    expect(bad({ rank: 0, alpha: 8, targets: ['q_proj'] })).toThrow('lora.rank must be an integer >= 1, got 0');
    expect(bad({ rank: 17, alpha: 8, targets: ['k_proj'] })).toThrow('lora.rank (17) exceeds min(in, out) = 16 of k_proj (32 in, 16 out)');
    expect(bad({ rank: 4, alpha: -1, targets: ['q_proj'] })).toThrow('lora.alpha must be a finite number > 0, got -1');
    expect(() => Model.create(config, plan, { lora: { rank: 4, alpha: 8, targets: ['x'] as never } })).toThrow(/unknown target 'x'/);
  });
});
