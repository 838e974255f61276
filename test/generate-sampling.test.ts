// Batched sampling through the public API: raw-policy log-probs against the model's own
// scoring, greedy against the forward pass, batch-composition invariance and seeds, stop
// conditions, streaming, abort, and every bad input with its message; the paged KV cache:
// prefix sharing changes nothing, tight pools, the pool empty after every call, its plan.
import { afterEach, describe, expect, it } from 'vitest';
import { Model, type GenerateOptions, type GeneratedSequence, type Generator } from '../lib/index.js';
import { errorOf, prng, randomRows, tinyConfig } from './fixtures/engine-helpers.js';

const cfg = tinyConfig({ seed: 9, attention_bias: true });
const live: Model[] = [];
function model(): Model {
  const m = Model.create(cfg, { maxBatch: 8, maxSeq: 48 });
  live.push(m);
  return m;
}
afterEach(async () => {
  await Promise.all(live.splice(0).map((m) => m.dispose()));
});

const rand = prng(3);
// Mixed lengths: 5, 17, 1 and 9 tokens.
const prompts = [5, 17, 1, 9].map((n) => randomRows(rand, 1, n, cfg.vocab_size)[0]);
const sampling: GenerateOptions = { maxNewTokens: 16, temperature: 0.9, topK: 20, topP: 0.95, seed: [11, 12, 13, 14] };

function logSoftmaxAt(logits: Float32Array, offset: number, V: number, j: number): number {
  let mx = -Infinity;
  for (let i = 0; i < V; i++) mx = Math.max(mx, logits[offset + i]);
  let s = 0;
  for (let i = 0; i < V; i++) s += Math.exp(logits[offset + i] - mx);
  return logits[offset + j] - mx - Math.log(s);
}

function same(a: GeneratedSequence, b: GeneratedSequence): void {
  expect(Array.from(a.tokens)).toEqual(Array.from(b.tokens));
  expect(Array.from(a.logprobs)).toEqual(Array.from(b.logprobs)); // bitwise: same doubles
  expect(a.stopReason).toBe(b.stopReason);
}

describe('generate', () => {
  it('records raw-policy log-probs equal to the model scoring the same responses', async () => {
    const m = model();
    const gen = m.createGenerator({ maxBatch: 4, maxContext: 48 });
    // Temperature and truncation change the draw, never the recorded log-prob.
    const out = await gen.generate(prompts, { ...sampling, temperature: 1.6, topK: 5 });
    expect(out.map((s) => [s.prompt, s.sample])).toEqual([
      [0, 0],
      [1, 0],
      [2, 0],
      [3, 0],
    ]);
    const scored = await m.sequenceLogprobs(
      out.map((s) => ({ prompt: prompts[s.prompt], response: Array.from(s.tokens) })),
      { perToken: true },
    );
    out.forEach((s, i) => {
      expect(s.tokens.length).toBe(16);
      s.logprobs.forEach((lp, t) => expect(lp).toBeCloseTo(scored.perToken![i][t], 4));
      expect(s.logprobs.reduce((a, b) => a + b, 0)).toBeCloseTo(scored.sum[i], 3);
    });
  });

  it('greedy decoding follows the argmax of the full forward pass', async () => {
    const m = model();
    const gen = m.createGenerator({ maxBatch: 2, maxContext: 40 });
    const [s] = await gen.generate([prompts[1]], { maxNewTokens: 8, temperature: 0 });
    const all = [...prompts[1], ...s.tokens];
    const { logits } = await m.forward([all]);
    const V = cfg.vocab_size;
    s.tokens.forEach((tok, t) => {
      const at = (prompts[1].length - 1 + t) * V;
      const row = Array.from(logits!.subarray(at, at + V));
      expect(tok).toBe(row.indexOf(Math.max(...row)));
      expect(s.logprobs[t]).toBeCloseTo(logSoftmaxAt(logits!, at, V, tok), 4);
    });
  });

  it('gives a sequence the same tokens alone, in a mixed batch, or split over calls and waves', async () => {
    const m = model();
    const big = m.createGenerator({ maxBatch: 24, maxContext: 48 });
    const small = m.createGenerator({ maxBatch: 3, maxContext: 48 });
    const alone = await big.generate([prompts[1]], { ...sampling, seed: 12 });
    // 4 prompts x 5 samples: decode steps of 20 rows (past the GEMM's small-M path).
    const mixed = await big.generate(prompts, { ...sampling, samplesPerPrompt: 5 });
    const part1 = await small.generate([prompts[3], prompts[0]], { ...sampling, seed: [14, 11], samplesPerPrompt: 2 });
    const part2 = await small.generate([prompts[2], prompts[1]], { ...sampling, seed: [13, 12], samplesPerPrompt: 2 });
    same(alone[0], mixed[5]);
    same(alone[0], part2[2]);
    same(mixed[0], part1[2]);
    same(mixed[16], part1[1]);
    // Reproducible; samples of one prompt and different seeds differ.
    const again = await big.generate(prompts, { ...sampling, samplesPerPrompt: 5 });
    mixed.forEach((s, i) => same(s, again[i]));
    expect(Array.from(mixed[5].tokens)).not.toEqual(Array.from(mixed[6].tokens));
    const otherSeed = await big.generate([prompts[1]], { ...sampling, seed: 999 });
    expect(Array.from(otherSeed[0].tokens)).not.toEqual(Array.from(alone[0].tokens));
  });

  it('stops on any of several stop tokens, at maxNewTokens, or when the context is full', async () => {
    const m = model();
    const gen = m.createGenerator({ maxBatch: 4, maxContext: 24 });
    const [free] = await gen.generate([prompts[0]], { ...sampling, seed: 11, maxNewTokens: 15 });
    expect(free.stopReason).toBe('maxTokens');
    expect(free.tokens.length).toBe(15);
    const stopTokens = [free.tokens[6], free.tokens[3]];
    const first = Array.from(free.tokens).findIndex((t) => stopTokens.includes(t));
    const [stopped] = await gen.generate([prompts[0]], { ...sampling, seed: 11, maxNewTokens: 15, stopTokens });
    expect(stopped.stopReason).toBe('stop');
    expect(Array.from(stopped.tokens)).toEqual(Array.from(free.tokens.subarray(0, first + 1)));
    const full = await gen.generate([prompts[1], prompts[2]], { ...sampling, seed: [12, 13], maxNewTokens: undefined });
    expect(full.map((s) => [s.stopReason, s.tokens.length])).toEqual([
      ['contextFull', 24 - 17],
      ['contextFull', 24 - 1],
    ]);
  });

  it('streams every token to onToken, in order, before the promise settles', async () => {
    const m = model();
    const gen = m.createGenerator({ maxBatch: 2, maxContext: 48 });
    const seen: number[][] = prompts.map(() => []);
    const out = await gen.generate(prompts, {
      ...sampling,
      onToken: ({ sequence, token, logprob }) => {
        seen[sequence].push(token);
        expect(logprob).toBeLessThanOrEqual(0);
      },
    });
    out.forEach((s, i) => expect(seen[i]).toEqual(Array.from(s.tokens)));
  });

  it('stops cleanly on abort and returns what was generated so far', async () => {
    const m = model();
    const gen = m.createGenerator({ maxBatch: 2, maxContext: 48 });
    const whole = await gen.generate(prompts, sampling);
    const ac = new AbortController();
    let count = 0;
    const out = await gen.generate(prompts, {
      ...sampling,
      signal: ac.signal,
      onToken: () => {
        if (++count === 5) ac.abort();
      },
    });
    // Two slots: steps of 2 tokens, so the 5th token arrives in step 3 and nothing runs after it.
    expect(out.map((s) => [s.stopReason, s.tokens.length])).toEqual([
      ['aborted', 3],
      ['aborted', 3],
      ['aborted', 0],
      ['aborted', 0],
    ]);
    out.forEach((s, i) => expect(Array.from(s.tokens)).toEqual(Array.from(whole[i].tokens.subarray(0, s.tokens.length))));
    // Already aborted: rejects before starting, and the model stays usable.
    const err = await errorOf(() => gen.generate(prompts, { ...sampling, signal: AbortSignal.abort() }));
    expect(err.name).toBe('AbortError');
    expect((await gen.generate([prompts[0]], { maxNewTokens: 2 }))[0].tokens.length).toBe(2);
  });

  it('a throwing onToken aborts the call and rejects with its error', async () => {
    const m = model();
    const gen = m.createGenerator({ maxBatch: 2, maxContext: 48 });
    const err = await errorOf(() =>
      gen.generate(prompts, {
        ...sampling,
        onToken: () => {
          throw new Error('listener failed');
        },
      }),
    );
    expect(err.message).toBe('listener failed');
    expect((await gen.generate([prompts[0]], { maxNewTokens: 3 }))[0].tokens.length).toBe(3);
  });

  it('queues behind the model’s other calls and keeps the weights fixed while it runs', async () => {
    const m = model();
    m.setOptimizer({ lr: 1e-2 });
    const gen = m.createGenerator({ maxBatch: 4, maxContext: 48 });
    const before = await gen.generate(prompts, sampling);
    const batch = randomRows(rand, 2, 8, cfg.vocab_size);
    const [during, step] = await Promise.all([gen.generate(prompts, sampling), m.trainStep(batch)]);
    expect(step.stepped).toBe(true);
    during.forEach((s, i) => same(s, before[i])); // generated before the step changed the weights
    const after = await gen.generate(prompts, sampling);
    expect(after.some((s, i) => s.logprobs[0] !== before[i].logprobs[0])).toBe(true);
    await gen.dispose();
    expect(gen.disposed).toBe(true);
    expect((await errorOf(() => gen.generate(prompts, sampling))).message).toBe('the generator has been disposed');
  });

  it('rejects bad inputs with messages that name the problem', async () => {
    const m = model();
    const gen: Generator = m.createGenerator({ maxBatch: 2, maxContext: 24 });
    const msg = async (p: unknown[], o: GenerateOptions) => (await errorOf(() => gen.generate(p as number[][], o))).message;
    expect(await msg(prompts, { temperature: -0.5 })).toBe('temperature must be a finite number >= 0, got -0.5');
    expect(await msg(prompts, { topP: 0 })).toBe('topP must be in (0, 1], got 0');
    expect(await msg(prompts, { topP: 1.5 })).toBe('topP must be in (0, 1], got 1.5');
    expect(await msg(prompts, { topK: -1 })).toBe('topK must be >= 0 (0 turns it off), got -1');
    expect(await msg(prompts, { maxNewTokens: 0 })).toBe('maxNewTokens must be at least 1, got 0');
    expect(await msg(prompts, { maxNewTokens: 8 })).toBe(
      "sequence 1: prompt of 17 tokens + maxNewTokens 8 exceeds the generator's maxContext 24",
    );
    expect(await msg([[1, 2, 40]], { maxNewTokens: 2 })).toBe('token id 40 at sequence 0, position 2 is out of range [0, 32)');
    expect(await msg([[1], []], { maxNewTokens: 2 })).toBe('prompt of sequence 1 is empty (generation needs at least one token)');
    expect(await msg([], {})).toBe('no prompts to generate from');
    expect(await msg([[1, 2.5]], {})).toBe('token at prompt 0, position 1 is not an integer id: 2.5');
    expect(await msg([[1]], { stopTokens: [3, 32] })).toBe('stop token 32 (stopTokens[1]) is out of range [0, 32)');
    expect(await msg([[1]], { samplesPerPrompt: 0 })).toBe('options.samplesPerPrompt must be a positive integer, got 0');
    expect(await msg([[1], [2]], { seed: [1] })).toBe('options.seed has 1 entries for 2 prompts (give one number, or one per prompt)');
    expect(await msg([[1]], { seed: -3 })).toBe('options.seed must be a non-negative safe integer, got -3');
    expect(() => m.createGenerator({ maxBatch: 2, maxContext: 100 })).toThrow(
      "generator plan.maxContext (100) exceeds the model's max_position_embeddings (64)",
    );
    expect(() => m.createGenerator({ maxBatch: 0, maxContext: 10 })).toThrow('generator plan.maxBatch must be at least 1, got 0');
  });
});

describe('the paged KV cache', () => {
  const empty = (gen: Generator) => {
    const c = gen.kvCache();
    expect([c.freeBlocks, c.reservedBlocks]).toEqual([c.blocks, 0]);
  };

  it('packs the weights for its decode steps without changing a token or a log-prob', async () => {
    const m = model();
    const opts: GenerateOptions = { ...sampling, samplesPerPrompt: 5 };
    const plain = m.createGenerator({ maxBatch: 20, maxContext: 48, packWeights: false });
    const packed = m.createGenerator({ maxBatch: 20, maxContext: 48 });
    expect([plain.plan.packWeights, packed.plan.packWeights]).toEqual([false, true]);
    const ref = await plain.generate(prompts, opts);
    (await packed.generate(prompts, opts)).forEach((s, i) => same(s, ref[i]));
    expect(packed.memory()).toBeGreaterThan(plain.memory());
    expect(() => m.createGenerator({ maxBatch: 1, maxContext: 8, packWeights: 1 } as never)).toThrow(
      new TypeError('plan.packWeights must be a boolean, got a number'),
    );
  });

  it('shares a prompt between its samples without changing a token or a log-prob, in any pool', async () => {
    const m = model();
    const opts: GenerateOptions = { ...sampling, samplesPerPrompt: 5 };
    const unshared = m.createGenerator({ maxBatch: 20, maxContext: 48, sharePrefixes: false });
    const ref = await unshared.generate(prompts, opts);
    const refStats = unshared.lastStats();
    expect(refStats).toMatchObject({ promptRows: 5 * (5 + 17 + 1 + 9), sharedPrompts: 0, copiedBlocks: 0 });
    const blockBytes = unshared.kvCache().blockBytes;
    // The default pool (20 x 3 blocks), and pools so small that sequences wait for blocks (a
    // sample of the 17-token prompt caches 32 positions: 2 blocks).
    for (const blocks of [undefined, 8, 3]) {
      const gen = m.createGenerator({ maxBatch: 20, maxContext: 48, ...(blocks && { kvCacheBytes: blocks * blockBytes + 5 }) });
      expect(gen.plan).toEqual({
        maxBatch: 20,
        maxContext: 48,
        kvCacheBytes: (blocks ?? 60) * blockBytes,
        sharePrefixes: true,
        packWeights: true,
      });
      const out = await gen.generate(prompts, opts);
      out.forEach((s, i) => same(s, ref[i]));
      const st = gen.lastStats();
      // Prompts of 5, 17 and 9 tokens share prompt_len - 1 positions; the 1-token prompt has none.
      expect(st.sharedPrompts).toBe(3);
      expect(st.promptRows).toBe(4 + 16 + 8 + 3 * 5 + 5);
      expect(st.peakBlocks).toBeLessThanOrEqual(blocks ?? 60);
      // Every sequence in flight holds or has the promise of a block of its own.
      expect(st.peakSequences).toBe(blocks === undefined ? 20 : Math.min(st.peakSequences, blocks));
      empty(gen);
      await gen.dispose();
    }
  });

  it('returns every block after aborted and failed calls', async () => {
    const m = model();
    const gen = m.createGenerator({ maxBatch: 6, maxContext: 48 });
    const ac = new AbortController();
    let count = 0;
    const out = await gen.generate(prompts, {
      ...sampling,
      samplesPerPrompt: 5,
      signal: ac.signal,
      onToken: () => {
        if (++count === 4) ac.abort();
      },
    });
    expect(out.every((s) => s.stopReason === 'aborted')).toBe(true);
    empty(gen);
    const err = await errorOf(() =>
      gen.generate(prompts, {
        ...sampling,
        samplesPerPrompt: 5,
        onToken: () => {
          throw new Error('listener failed');
        },
      }),
    );
    expect(err.message).toBe('listener failed');
    empty(gen);
    // A bad token id in the middle of the prompts: refused before anything runs.
    const bad = [prompts[0], [1, 2, 99, 3], prompts[2]];
    expect((await errorOf(() => gen.generate(bad, { ...sampling, seed: 1, samplesPerPrompt: 5 }))).message).toBe(
      'token id 99 at sequence 1, position 2 is out of range [0, 32)',
    );
    empty(gen);
  });

  it('refuses a sequence that alone needs more than the pool, and plans of the wrong types', async () => {
    const m = model();
    const probe = m.createGenerator({ maxBatch: 1, maxContext: 48 });
    const blockBytes = probe.kvCache().blockBytes;
    const gen = m.createGenerator({ maxBatch: 4, maxContext: 48, kvCacheBytes: blockBytes });
    expect(gen.kvCache()).toMatchObject({ blocks: 1, blockSize: 16 });
    expect((await errorOf(() => gen.generate(prompts, { ...sampling, maxNewTokens: 4 }))).message).toBe(
      `sequence 1: prompt of 17 tokens + maxNewTokens 4 needs 2 KV-cache blocks of 16 positions, more than the whole pool holds (1 blocks = ${blockBytes} bytes, the generator's plan.kvCacheBytes)`,
    );
    expect((await gen.generate([prompts[0]], { maxNewTokens: 4, samplesPerPrompt: 3 })).map((s) => s.tokens.length)).toEqual([4, 4, 4]);
    expect(() => m.createGenerator({ maxBatch: 1, maxContext: 8, kvCacheBytes: 10 })).toThrow(
      `generator plan.kvCacheBytes (10) is less than one KV-cache block of 16 positions (${blockBytes} bytes)`,
    );
    expect(() => m.createGenerator({ maxBatch: 1, maxContext: 8, kvCacheBytes: -1 })).toThrow(
      new TypeError('plan.kvCacheBytes must be a non-negative integer, got -1'),
    );
    expect(() => m.createGenerator({ maxBatch: 1, maxContext: 8, sharePrefixes: 'yes' } as never)).toThrow(
      new TypeError('plan.sharePrefixes must be a boolean, got a string'),
    );
    expect(() => m.createGenerator({ maxBatch: 1, maxContext: 8, share: true } as never)).toThrow(
      new TypeError(
        "plan has an unknown field 'share'; the known fields are maxBatch, maxContext, kvCacheBytes, sharePrefixes, packWeights",
      ),
    );
  });
});

describe('Generator construction and argument types', () => {
  it('a Generator comes from model.createGenerator only', async () => {
    const m = model();
    const gen = m.createGenerator({ maxBatch: 1, maxContext: 8 });
    const Ctor = gen.constructor as new (...args: unknown[]) => Generator;
    expect(() => new Ctor(Symbol('Generator'), {}, { maxBatch: 1, maxContext: 8 }, () => Promise.resolve())).toThrow(
      new TypeError('a Generator comes from model.createGenerator(plan); it has no public constructor'),
    );
    expect(() => new Ctor({}, { maxBatch: 1, maxContext: 8 })).toThrow(/has no public constructor/);
    await gen.dispose();
  });

  it('refuses plans and sampling options of the wrong types with TypeErrors naming the field', async () => {
    const m = model();
    expect(() => m.createGenerator({ maxBatch: 1, maxContext: 8, maxSeq: 8 } as never)).toThrow(
      new TypeError(
        "plan has an unknown field 'maxSeq'; the known fields are maxBatch, maxContext, kvCacheBytes, sharePrefixes, packWeights",
      ),
    );
    expect(() => m.createGenerator({ maxBatch: 1.5, maxContext: 8 })).toThrow(new TypeError('plan.maxBatch must be an integer, got 1.5'));
    const gen = m.createGenerator({ maxBatch: 2, maxContext: 24 });
    const err = async (o: GenerateOptions) => errorOf(() => gen.generate([[1, 2]], o));
    for (const [o, msg] of [
      [{ temperature: 'hot' }, 'options.temperature must be a number, got a string'],
      [{ topK: 2.5 }, 'options.topK must be an integer, got 2.5'],
      [{ topP: NaN }, 'options.topP must be finite, got NaN'],
      [{ maxNewTokens: '4' }, 'options.maxNewTokens must be a number, got a string'],
      [{ samplesPerPrompt: 1.5 }, 'options.samplesPerPrompt must be an integer, got 1.5'],
      [{ seed: '7' }, 'options.seed must be a number or an array of numbers (one per prompt), got a string'],
      [{ seed: ['7'] }, 'options.seed[0] must be a number, got a string'],
      [{ stopTokens: 3 }, 'options.stopTokens must be an array of token ids, got a number'],
      [{ onToken: 'log' }, 'options.onToken must be a function, got a string'],
      [{ signal: {} }, 'options.signal must be an AbortSignal, got an object'],
      [
        { temprature: 0.5 },
        "options has an unknown field 'temprature' (did you mean 'temperature'?); the known fields are signal, maxNewTokens, temperature, topK, topP, stopTokens, seed, samplesPerPrompt, onToken",
      ],
      [{ top_p: 0.5 }, /^options has an unknown field 'top_p' \(did you mean 'topP'\?\)/],
    ] as const) {
      const e = await err(o as never);
      expect(e).toBeInstanceOf(TypeError);
      if (typeof msg === 'string') expect(e.message).toBe(msg);
      else expect(e.message).toMatch(msg);
    }
    expect((await err({ maxNewTokens: -1 })).message).toBe('maxNewTokens must be at least 1, got -1');
    expect((await gen.generate([[1, 2]], { maxNewTokens: 2 }))[0].tokens.length).toBe(2); // still usable
    await gen.dispose();
  });
});
