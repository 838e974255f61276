// Parameters by Hugging Face name: names and shapes follow the config, get/set round-trip
// exactly, the fused q/k/v and gate/up storage keeps each named tensor separate, and the
// output head really is hidden · Wᵀ (with W = embed_tokens when tied).
import { afterEach, describe, expect, it } from 'vitest';
import { Model, type ModelConfig } from '../lib/index.js';
import { bitsEqual, changedParams, prng, product, randomRows, snapshot, tinyConfig } from './fixtures/engine-helpers.js';

const live: Model[] = [];
function create(cfg: ModelConfig, plan = { maxBatch: 2, maxSeq: 8 }): Model {
  const m = Model.create(cfg, plan);
  live.push(m);
  return m;
}
afterEach(async () => {
  await Promise.all(live.splice(0).map((m) => m.dispose()));
});

/** The Hugging Face parameter table of a Llama/Qwen2 model, derived from its config alone. */
function expectedParams(c: ModelConfig): Map<string, number[]> {
  const C = c.hidden_size;
  const H = c.num_attention_heads;
  const KV = c.num_key_value_heads ?? H;
  const D = c.head_dim ?? C / H;
  const F = c.intermediate_size;
  const V = c.vocab_size;
  const out = new Map<string, number[]>([['model.embed_tokens.weight', [V, C]]]);
  for (let l = 0; l < c.num_hidden_layers; l++) {
    const p = `model.layers.${l}.`;
    out.set(p + 'self_attn.q_proj.weight', [H * D, C]);
    out.set(p + 'self_attn.k_proj.weight', [KV * D, C]);
    out.set(p + 'self_attn.v_proj.weight', [KV * D, C]);
    out.set(p + 'self_attn.o_proj.weight', [C, H * D]);
    if (c.attention_bias) {
      out.set(p + 'self_attn.q_proj.bias', [H * D]);
      out.set(p + 'self_attn.k_proj.bias', [KV * D]);
      out.set(p + 'self_attn.v_proj.bias', [KV * D]);
    }
    out.set(p + 'mlp.gate_proj.weight', [F, C]);
    out.set(p + 'mlp.up_proj.weight', [F, C]);
    out.set(p + 'mlp.down_proj.weight', [C, F]);
    out.set(p + 'input_layernorm.weight', [C]);
    out.set(p + 'post_attention_layernorm.weight', [C]);
  }
  out.set('model.norm.weight', [C]);
  if (!c.tie_word_embeddings) out.set('lm_head.weight', [V, C]);
  return out;
}

function asMap(m: Model): Map<string, number[]> {
  const list = m.params();
  const map = new Map(list.map((p) => [p.name, p.shape]));
  expect(map.size).toBe(list.length); // no duplicate names
  return map;
}

const biasUntied = tinyConfig({ attention_bias: true, tie_word_embeddings: false, num_hidden_layers: 3 });
// head_dim != hidden/heads, GQA with 4:1 sharing, tied output embedding
const oddHeads = tinyConfig({ hidden_size: 24, num_attention_heads: 4, num_key_value_heads: 1, head_dim: 10, tie_word_embeddings: true });

describe('params(): Hugging Face names and shapes', () => {
  it('lists every tensor of a bias + untied GQA config with shapes from the config', () => {
    const m = create(biasUntied);
    expect(asMap(m)).toEqual(expectedParams(biasUntied));
    // GQA: k/v rows are kv_heads * head_dim, not hidden_size
    expect(asMap(m).get('model.layers.2.self_attn.k_proj.weight')).toEqual([2 * 8, 32]);
    expect(asMap(m).get('model.layers.0.self_attn.q_proj.bias')).toEqual([4 * 8]);
  });

  it('handles head_dim != hidden/heads and a tied head (no lm_head.weight)', () => {
    const m = create(oddHeads);
    const map = asMap(m);
    expect(map).toEqual(expectedParams(oddHeads));
    expect(map.get('model.layers.0.self_attn.q_proj.weight')).toEqual([40, 24]);
    expect(map.get('model.layers.0.self_attn.k_proj.weight')).toEqual([10, 24]);
    expect(map.get('model.layers.0.self_attn.o_proj.weight')).toEqual([24, 40]);
    expect(map.has('lm_head.weight')).toBe(false);
    expect(() => m.getParam('lm_head.weight')).toThrow(/no parameter named 'lm_head\.weight'.*tied/);
    expect(() => m.setParam('lm_head.weight', new Float32Array(32 * 24))).toThrow(/tied/);
  });

  it('getParam returns as many values as the shape says, initialised as documented', () => {
    const m = create(biasUntied);
    for (const p of m.params()) {
      const v = m.getParam(p.name);
      expect(v.length, p.name).toBe(product(p.shape));
      if (p.name.endsWith('norm.weight'))
        expect(
          v.every((x) => x === 1),
          p.name,
        ).toBe(true);
      else if (p.name.endsWith('.bias'))
        expect(
          v.every((x) => x === 0),
          p.name,
        ).toBe(true);
    }
    // matrices ~ N(0, initializer_range): check the sample std of the largest one
    const e = m.getParam('model.embed_tokens.weight');
    const mean = e.reduce((s, x) => s + x, 0) / e.length;
    const std = Math.sqrt(e.reduce((s, x) => s + (x - mean) ** 2, 0) / e.length);
    expect(Math.abs(std - 0.02) / 0.02).toBeLessThan(0.1); // 1024 samples: ~2% sampling error
    expect(Math.abs(mean)).toBeLessThan(0.004);
  });

  it('getParam returns a copy, not a view of the weights', () => {
    const m = create(biasUntied);
    const v = m.getParam('model.norm.weight');
    v.fill(7);
    expect(m.getParam('model.norm.weight').every((x) => x === 1)).toBe(true);
  });
});

describe('memory()', () => {
  it('accounts for every parameter and grows with the plan', () => {
    const small = create(biasUntied, { maxBatch: 1, maxSeq: 8 });
    const large = create(biasUntied, { maxBatch: 4, maxSeq: 16 });
    const r = small.memory();
    expect(r.total).toBe(r.params + r.master + r.grads + r.optimizer + r.activations + r.scratch + r.kvCache);
    expect(r.master).toBe(0); // the CPU has no separate master weights
    const n = small.params().reduce((s, p) => s + product(p.shape), 0);
    expect(r.params).toBeGreaterThanOrEqual(4 * n); // float32 weights
    expect(r.grads).toBeGreaterThanOrEqual(4 * n);
    expect(r.optimizer).toBe(0); // no optimizer yet
    small.setOptimizer({ kind: 'adamw' });
    expect(small.memory().optimizer).toBeGreaterThanOrEqual(2 * 4 * n); // two moments
    expect(large.memory().activations).toBeGreaterThan(r.activations);
  });
});

describe('setParam / getParam', () => {
  it('round-trips every tensor exactly and touches no other tensor', () => {
    const m = create(biasUntied);
    const rand = prng(3);
    for (const p of m.params()) {
      const before = snapshot(m);
      // values with all 32 bits in play, including -0 and subnormals
      const v = Float32Array.from({ length: product(p.shape) }, () => (rand() - 0.5) * 2 ** Math.floor(rand() * 40 - 20));
      v[0] = -0;
      if (v.length > 1) v[1] = 1e-41;
      m.setParam(p.name, v);
      expect(bitsEqual(m.getParam(p.name), v), p.name).toBe(true);
      // q/k/v (and gate/up, and the biases) are stored fused: writing one must not spill over
      expect(changedParams(before, snapshot(m)), p.name).toEqual([p.name]);
    }
  });

  it('accepts a plain number array', () => {
    const m = create(biasUntied);
    const v = Array.from({ length: 32 }, (_, i) => i / 8);
    m.setParam('model.norm.weight', v);
    expect(Array.from(m.getParam('model.norm.weight'))).toEqual(v);
  });

  it('setParam changes forward(): scaling model.norm.weight by 2 doubles hidden and logits exactly', async () => {
    const m = create(biasUntied);
    const rows = randomRows(prng(4), 2, 8, biasUntied.vocab_size);
    const a = await m.forward(rows, { output: 'both' });
    m.setParam(
      'model.norm.weight',
      m.getParam('model.norm.weight').map((x) => 2 * x),
    );
    const b = await m.forward(rows, { output: 'both' });
    // a power-of-two scale commutes with float rounding, so the doubling is exact
    expect(
      bitsEqual(
        b.hidden!,
        a.hidden!.map((x) => 2 * x),
      ),
    ).toBe(true);
    expect(
      bitsEqual(
        b.logits!,
        a.logits!.map((x) => 2 * x),
      ),
    ).toBe(true);
  });

  it('setParam on an attention weight changes the logits of later positions only', async () => {
    const m = create(biasUntied);
    const rows = randomRows(prng(5), 1, 8, biasUntied.vocab_size);
    const a = (await m.forward(rows)).logits!;
    const name = 'model.layers.1.self_attn.v_proj.weight';
    m.setParam(
      name,
      m.getParam(name).map((x, i) => x + (i % 3) * 0.05),
    );
    const b = (await m.forward(rows)).logits!;
    const V = biasUntied.vocab_size;
    const diff = (t: number) => Math.max(...Array.from({ length: V }, (_, j) => Math.abs(a[t * V + j] - b[t * V + j])));
    // every position attends to itself, so every position's output moves
    for (let t = 0; t < 8; t++) expect(diff(t), `position ${t}`).toBeGreaterThan(1e-6);
  });
});

/** logits[n, j] = sum_i hidden[n, i] * W[j, i], in float64, with a per-entry error bound. */
function checkHead(hidden: Float32Array, W: Float32Array, logits: Float32Array, C: number, V: number): void {
  const N = hidden.length / C;
  expect(logits.length).toBe(N * V);
  let worst = 0;
  for (let n = 0; n < N; n++)
    for (let j = 0; j < V; j++) {
      let s = 0;
      let abs = 0;
      for (let i = 0; i < C; i++) {
        const p = hidden[n * C + i] * W[j * C + i];
        s += p;
        abs += Math.abs(p);
      }
      // float32 accumulation of C products: error <= ~C * 2^-24 * sum|p|; allow 4x that
      const tol = 4 * C * 2 ** -24 * abs + 1e-30;
      worst = Math.max(worst, Math.abs(logits[n * V + j] - s) / tol);
    }
  expect(worst).toBeLessThanOrEqual(1);
}

describe('the output head', () => {
  it('untied: logits = hidden · lm_headᵀ', async () => {
    const m = create(biasUntied);
    const rows = randomRows(prng(6), 2, 8, biasUntied.vocab_size);
    const { hidden, logits } = await m.forward(rows, { output: 'both' });
    checkHead(hidden!, m.getParam('lm_head.weight'), logits!, 32, biasUntied.vocab_size);
  });

  it('tied: logits = hidden · Eᵀ, and setting embed_tokens changes the head with it', async () => {
    const m = create(oddHeads);
    const V = oddHeads.vocab_size;
    const C = oddHeads.hidden_size;
    const rows = randomRows(prng(9), 2, 8, V);
    const a = await m.forward(rows, { output: 'both' });
    checkHead(a.hidden!, m.getParam('model.embed_tokens.weight'), a.logits!, C, V);

    const rand = prng(10);
    const E = Float32Array.from({ length: V * C }, () => rand() - 0.5);
    m.setParam('model.embed_tokens.weight', E);
    const b = await m.forward(rows, { output: 'both' });
    checkHead(b.hidden!, E, b.logits!, C, V);
    expect(bitsEqual(a.logits!, b.logits!)).toBe(false);
  });

  it('forward output modes return the requested arrays with (batch, seq, ·) sizes', async () => {
    const m = create(biasUntied);
    const rows = randomRows(prng(11), 2, 5, biasUntied.vocab_size);
    const l = await m.forward(rows);
    expect(l.hidden).toBeUndefined();
    expect(l.logits!.length).toBe(2 * 5 * biasUntied.vocab_size);
    const h = await m.forward(rows, { output: 'hidden' });
    expect(h.logits).toBeUndefined();
    expect(h.hidden!.length).toBe(2 * 5 * 32);
    const both = await m.forward(rows, { output: 'both' });
    expect(bitsEqual(both.logits!, l.logits!)).toBe(true);
    expect(bitsEqual(both.hidden!, h.hidden!)).toBe(true);
  });

  it("causal: a row's outputs depend only on earlier tokens, and rows are independent", async () => {
    const m = create(biasUntied);
    const V = biasUntied.vocab_size;
    const rows = randomRows(prng(12), 2, 8, V);
    const a = (await m.forward(rows)).logits!;
    const changed = rows.map((r) => [...r]);
    changed[0][5] = (changed[0][5] + 1) % V;
    const b = (await m.forward(changed)).logits!;
    const same = (from: number, to: number) => bitsEqual(a.subarray(from * V, to * V), b.subarray(from * V, to * V));
    expect(same(0, 5)).toBe(true); // row 0, positions 0..4
    expect(same(5, 6)).toBe(false); // row 0, position 5 sees the change
    expect(same(8, 16)).toBe(true); // row 1
  });
});

describe('Model.create({ initialize: false })', () => {
  it('leaves every parameter zero for a loader to fill, and the seeded draw is the default', async () => {
    const blank = Model.create(tinyConfig(), { maxBatch: 1, maxSeq: 8 }, { initialize: false });
    const drawn = Model.create(tinyConfig(), { maxBatch: 1, maxSeq: 8 });
    for (const { name } of blank.params()) {
      expect(
        blank.getParam(name).every((v) => v === 0),
        name,
      ).toBe(true);
      expect(
        drawn.getParam(name).some((v) => v !== 0),
        name,
      ).toBe(true);
    }
    expect(() => Model.create(tinyConfig(), { maxBatch: 1, maxSeq: 8 }, { initialise: false } as never)).toThrow(
      /options has an unknown field 'initialise'/,
    );
    await blank.dispose();
    await drawn.dispose();
  });
});
