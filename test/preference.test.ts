// The preference API: sequence log-probs, the fused head + SPPO / DPO / IPO losses through the
// TypeScript layer, their TRL metrics, learning in the expected direction, and bad input.
import { describe, expect, it } from 'vitest';
import { Model, PREFERENCE_LOSSES, type ModelConfig, type PreferencePair } from '../lib/index.js';

const config: ModelConfig = {
  vocab_size: 37,
  hidden_size: 32,
  num_hidden_layers: 2,
  num_attention_heads: 4,
  num_key_value_heads: 2,
  intermediate_size: 48,
  max_position_embeddings: 64,
  initializer_range: 0.1,
  seed: 7,
};
const plan = { maxBatch: 8, maxSeq: 24 };

// A deterministic token stream (a fixed LCG), so the tests need no fixtures.
function tokens(n: number, seed: number): number[] {
  let x = seed;
  return Array.from({ length: n }, () => {
    x = (x * 1103515245 + 12345) % 2147483648;
    return x % config.vocab_size;
  });
}

function logSoftmaxAt(row: Float32Array, index: number): number {
  let mx = -Infinity;
  for (const v of row) mx = Math.max(mx, v);
  let z = 0;
  for (const v of row) z += Math.exp(v - mx);
  return row[index] - mx - Math.log(z);
}

const items = [
  { prompt: tokens(3, 1), response: tokens(5, 2) },
  { prompt: tokens(6, 3), response: tokens(2, 4) },
  { prompt: tokens(1, 5), response: tokens(9, 6) },
];

describe('sequenceLogprobs', () => {
  it('sums log-softmax of the forward logits over response tokens only', async () => {
    const model = Model.create(config, plan);
    const r = await model.sequenceLogprobs(items, { perToken: true });
    for (const [i, it] of items.entries()) {
      const row = [...it.prompt, ...it.response];
      const { logits } = await model.forward([row]);
      const V = config.vocab_size;
      let sum = 0;
      it.response.forEach((tok, j) => {
        const pos = it.prompt.length + j - 1; // the position that predicts this token
        const lp = logSoftmaxAt(logits!.subarray(pos * V, (pos + 1) * V), tok);
        // float32 logits of magnitude ~1: log-softmax agrees to ~1e-6 absolute
        expect(Math.abs(r.perToken![i][j] - lp)).toBeLessThan(2e-6);
        sum += lp;
      });
      expect(r.perToken![i].length).toBe(it.response.length);
      expect(Math.abs(r.sum[i] - sum)).toBeLessThan(1e-5);
    }
    await model.dispose();
  });

  it('does not depend on what else is in the batch (padding never leaks)', async () => {
    const model = Model.create(config, plan);
    const together = await model.sequenceLogprobs(items);
    for (const [i, it] of items.entries()) {
      const alone = await model.sequenceLogprobs([it]);
      expect(Math.abs(alone.sum[0] - together.sum[i])).toBeLessThan(1e-9 * Math.abs(alone.sum[0]) + 1e-9);
    }
    await model.dispose();
  });

  it('rejects empty prompts and responses with the sequence index', async () => {
    const model = Model.create(config, plan);
    await expect(model.sequenceLogprobs([items[0], { prompt: [], response: [1] }])).rejects.toThrow(/sequence 1: the prompt is empty/);
    await expect(model.sequenceLogprobs([{ prompt: [1], response: [] }])).rejects.toThrow(/sequence 0: the response is empty/);
    await expect(model.sequenceLogprobs([{ prompt: [1], response: [99] }])).rejects.toThrow(/token id 99 .* out of range/);
    await model.dispose();
  });
});

async function pairsAtReference(model: Model): Promise<PreferencePair[]> {
  const raw = [
    { prompt: tokens(4, 11), chosen: tokens(6, 12), rejected: tokens(3, 13) },
    { prompt: tokens(2, 14), chosen: tokens(4, 15), rejected: tokens(7, 16) },
  ];
  const lp = await model.sequenceLogprobs(
    raw.flatMap((p) => [
      { prompt: p.prompt, response: p.chosen },
      { prompt: p.prompt, response: p.rejected },
    ]),
  );
  return raw.map((p, k) => ({
    prompt: p.prompt,
    chosen: { response: p.chosen, refLogp: lp.sum[2 * k], target: 0.75 - 0.1 * k },
    rejected: { response: p.rejected, refLogp: lp.sum[2 * k + 1], target: 0.3 },
    q: 0.7,
  }));
}

describe('preference losses through the model', () => {
  it('at θ = θ_t every Δ is ~0 and each loss takes its closed-form value', async () => {
    const model = Model.create(config, plan);
    const pairs = await pairsAtReference(model);
    const eta = 1000;
    for (const loss of PREFERENCE_LOSSES) {
      const input =
        loss === 'sppo'
          ? {
              examples: pairs.flatMap((p) => [
                { prompt: p.prompt, ...p.chosen },
                { prompt: p.prompt, ...p.rejected },
              ]),
            }
          : { pairs };
      const { metrics, logps } = await model.evalPreference(input, { loss, eta });
      const refs = pairs.flatMap((p) => [p.chosen.refLogp, p.rejected.refLogp]);
      logps.forEach((lp, i) => expect(Math.abs(lp - refs[i])).toBeLessThan(1e-9));
      const half = (t: number) => eta * (t - 0.5);
      const closed: Record<string, number> = {
        sppo: pairs.reduce((s, p) => s + half(p.chosen.target!) ** 2 + half(p.rejected.target!) ** 2, 0) / 4,
        'sppo-pair': pairs.reduce((s, p) => s + 0.5 * (half(p.chosen.target!) ** 2 + half(p.rejected.target!) ** 2), 0) / 2,
        'sppo-single': half(0.7) ** 2,
        'sppo-hard': 2 * (eta / 2) ** 2,
        dpo: Math.log(2),
        ipo: (eta / 2) ** 2,
      };
      expect(Math.abs(metrics.loss - closed[loss])).toBeLessThan(1e-9 * closed[loss]);
      expect(Math.abs(metrics['rewards/mean'])).toBeLessThan(1e-12);
      if (loss !== 'sppo') {
        expect(metrics['rewards/margins']).toBeCloseTo(metrics['rewards/chosen']! - metrics['rewards/rejected']!, 15);
        expect(metrics['logps/chosen']).toBeCloseTo((refs[0] + refs[2]) / 2, 9);
      } else {
        expect(metrics['rewards/chosen']).toBeUndefined();
      }
    }
    await model.dispose();
  });

  it('SPPO steps raise the chosen log-likelihood and lower the rejected one', async () => {
    const model = Model.create(config, plan);
    model.setOptimizer({ kind: 'rmsprop', lr: 3e-3 });
    const pairs = await pairsAtReference(model);
    // Targets far from ½ ask for large moves: chosen up, rejected down.
    for (const p of pairs) {
      p.chosen.target = 0.9;
      p.rejected.target = 0.1;
    }
    const eta = 20;
    const first = await model.preferenceStep({ pairs }, { loss: 'sppo-pair', eta });
    let last = first;
    for (let i = 0; i < 15; i++) last = await model.preferenceStep({ pairs }, { loss: 'sppo-pair', eta });
    const after = await model.evalPreference({ pairs }, { loss: 'sppo-pair', eta });
    expect(last.stepped).toBe(true);
    expect(last.step).toBe(16);
    expect(last.gradNorm).toBeGreaterThan(0);
    expect(after.metrics['rewards/chosen']).toBeGreaterThan(0);
    expect(after.metrics['rewards/rejected']).toBeLessThan(0);
    expect(after.metrics['rewards/accuracies']).toBe(1);
    expect(after.metrics.loss).toBeLessThan(first.metrics.loss * 0.5);
    await model.dispose();
  });

  it('refuses malformed preference input with the field named, leaving the model unchanged', async () => {
    const model = Model.create(config, plan);
    model.setOptimizer({ lr: 1e-2 });
    const pairs = await pairsAtReference(model);
    const before = model.getParam('model.layers.0.self_attn.q_proj.weight');
    const bad = (f: (p: PreferencePair[]) => void) => {
      const copy: PreferencePair[] = JSON.parse(JSON.stringify(pairs));
      f(copy);
      return { pairs: copy };
    };
    await expect(model.preferenceStep({ pairs }, { loss: 'kto' as never, eta: 1 })).rejects.toThrow(/unknown loss 'kto'/);
    await expect(model.preferenceStep({ pairs }, { loss: 'sppo', eta: 1 })).rejects.toThrow(/takes \{ examples/);
    await expect(
      model.preferenceStep(
        bad((p) => delete p[1].rejected.target),
        { loss: 'sppo-pair', eta: 1 },
      ),
    ).rejects.toThrow(/pairs\[1\]\.rejected\.target must be a finite number/);
    await expect(
      model.preferenceStep(
        bad((p) => delete p[0].q),
        { loss: 'sppo-single', eta: 1 },
      ),
    ).rejects.toThrow(/pairs\[0\]\.q/);
    await expect(
      model.preferenceStep(
        bad((p) => (p[0].chosen.refLogp = NaN)),
        { loss: 'dpo', eta: 1 },
      ),
    ).rejects.toThrow(/pairs\[0\]\.chosen\.refLogp/);
    await expect(
      model.preferenceStep(
        bad((p) => (p[1].chosen.target = 1.5)),
        { loss: 'sppo-pair', eta: 1 },
      ),
    ).rejects.toThrow(/sequence 2: the target win probability must be in \[0, 1\]/);
    await expect(
      model.preferenceStep(
        bad((p) => (p[0].rejected.refLogp = 3)),
        { loss: 'ipo', eta: 1 },
      ),
    ).rejects.toThrow(/sequence 1: the reference log-prob must be a finite number <= 0/);
    await expect(model.preferenceStep({ pairs }, { loss: 'dpo', eta: 0 })).rejects.toThrow(/eta must be a finite number > 0/);
    await expect(
      model.preferenceStep(
        bad((p) => (p[0].chosen.response = [])),
        { loss: 'dpo', eta: 1 },
      ),
    ).rejects.toThrow(/sequence 0: the response is empty/);
    expect(model.getParam('model.layers.0.self_attn.q_proj.weight')).toEqual(before);
    expect(model.step).toBe(0);
    const ok = await model.preferenceStep({ pairs }, { loss: 'dpo', eta: 10 });
    expect(ok.stepped).toBe(true);
    await model.dispose();
  });
});
