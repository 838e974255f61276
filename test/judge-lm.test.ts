// The pairwise LM judge on the engine, with a tiny random Llama-shaped judge over the real
// Mistral-7B tokenizer (as test/cli-run-hf.test.ts builds its policy): the matrix is valid, each
// entry equals the computation done by hand from the same model's full logits (one row per
// question, no batching, no padding), reordering the responses reorders the matrix, a batch of
// prompts equals prompts one by one, and long questions are cut to maxSeq keeping BOS.
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeMistralChatModel } from './fixtures/mistral-tokenizer.js';
import { parseConfig } from '../lib/config/index.js';
import { loadPretrained, Model, savePretrained, setupFromConfig, type Tokenizer } from '../lib/index.js';
import {
  assertPreferenceMatrix,
  DEFAULT_JUDGE_TEMPLATE,
  lmJudge,
  loadLmJudge,
  renderJudgeTemplate,
  twoWaySoftmax,
  type LmJudge,
} from '../lib/preference/index.js';

const tmp = mkdtempSync(path.join(tmpdir(), 'sppo-judge-lm-'));
const dir = path.join(tmp, 'judge');

let model: Model;
let tokenizer: Tokenizer;
let judge: LmJudge;

beforeAll(async () => {
  const random = Model.create(
    {
      vocab_size: 32000,
      hidden_size: 32,
      num_hidden_layers: 2,
      num_attention_heads: 4,
      num_key_value_heads: 2,
      intermediate_size: 64,
      max_position_embeddings: 256,
      seed: 5,
    },
    { maxBatch: 1, maxSeq: 8 },
  );
  try {
    // Sharpen the random model so that its answers depend visibly on the responses' order: a
    // larger output head and peaked attention (near-uniform attention is blind to order, and
    // a judge blind to order scores every pair ½ once both orders are averaged).
    const scale = (name: string, by: number): void =>
      random.setParam(
        name,
        random.getParam(name).map((v) => v * by),
      );
    scale('lm_head.weight', 200);
    for (const l of [0, 1]) for (const w of ['q_proj', 'k_proj']) scale(`model.layers.${l}.self_attn.${w}.weight`, 20);
    for (const l of [0, 1]) for (const w of ['v_proj', 'o_proj']) scale(`model.layers.${l}.self_attn.${w}.weight`, 6);
    await savePretrained(random, dir);
  } finally {
    await random.dispose();
  }
  makeMistralChatModel(dir);
  ({ model, tokenizer } = (await loadPretrained(dir, { maxBatch: 4, maxSeq: 256 }, { training: false })) as {
    model: Model;
    tokenizer: Tokenizer;
  });
  judge = lmJudge(model, tokenizer, { batchSize: 4, maxSeq: 256 });
}, 120_000);
afterAll(async () => {
  await judge?.dispose();
  await model?.dispose();
  rmSync(tmp, { recursive: true, force: true });
});

/** q(first, second) the slow way: the question alone through forward, softmax over the two answer logits. */
async function directQ(prompt: string, first: string, second: string): Promise<number> {
  const content = renderJudgeTemplate(DEFAULT_JUDGE_TEMPLATE, prompt, first, second);
  const ids = tokenizer.encodeChat([{ role: 'user', content }], { addGenerationPrompt: true });
  const { logits } = await model.forward([ids], { output: 'logits' });
  const last = (ids.length - 1) * 32000;
  const [a, b] = [tokenizer.tokenId('A')!, tokenizer.tokenId('B')!];
  return twoWaySoftmax(logits![last + a], logits![last + b]);
}

const PROMPT = 'Name a colour of the sky.';
const RESPONSES = ['Blue.', 'The sky is usually blue during the day.', 'Green', 'Grey when it rains, blue otherwise.'];

describe('lmJudge', () => {
  it('gives a valid matrix equal to the hand computation from the model’s logits', async () => {
    expect(judge.answerIds).toEqual([tokenizer.tokenId('A'), tokenizer.tokenId('B')]);
    const P = await judge.compare(PROMPT, RESPONSES);
    assertPreferenceMatrix(P, { size: 4 });
    expect(judge.stats).toMatchObject({ comparisons: 12, forwards: 3, truncated: 0 });
    for (let i = 0; i < 4; i++)
      for (let j = 0; j < 4; j++) {
        if (i === j) continue;
        const expected =
          ((await directQ(PROMPT, RESPONSES[i], RESPONSES[j])) + 1 - (await directQ(PROMPT, RESPONSES[j], RESPONSES[i]))) / 2;
        expect(P[i][j]).toBeCloseTo(expected, 5);
        expect(P[i][j] + P[j][i]).toBe(1);
      }
    // the sharpened random judge has opinions (an order-blind one would score every pair ½)
    expect(Math.max(...P.flat().map((v) => Math.abs(v - 0.5)))).toBeGreaterThan(0.01);
  });

  it('swapping the responses swaps the result', async () => {
    const [a, b, c] = RESPONSES;
    const P = await judge.compare(PROMPT, [a, b, c]);
    const S = await judge.compare(PROMPT, [c, a, b]); // S[x][y] = P[perm x][perm y]
    const perm = [2, 0, 1];
    for (let x = 0; x < 3; x++) for (let y = 0; y < 3; y++) expect(S[x][y]).toBeCloseTo(P[perm[x]][perm[y]], 6);
    const [pab] = [(await judge.compare(PROMPT, [a, b]))[0][1]];
    expect((await judge.compare(PROMPT, [b, a]))[0][1]).toBeCloseTo(1 - pab, 6);
  });

  it('batches prompts together with the same result as one at a time', async () => {
    const items = [
      { prompt: PROMPT, responses: RESPONSES.slice(0, 3) },
      { prompt: 'Say hello.', responses: ['Hello!', 'Hi there, how can I help?'] },
    ];
    const batched = await judge.compareBatch(items);
    for (let n = 0; n < items.length; n++) {
      const alone = await judge.compare(items[n].prompt, items[n].responses);
      alone.forEach((row, i) => row.forEach((v, j) => expect(batched[n][i][j]).toBeCloseTo(v, 6)));
    }
  });

  it('judges `concurrency` prompts at a time, their questions sharing forward passes', async () => {
    const items = [
      { prompt: PROMPT, responses: RESPONSES.slice(0, 2) },
      { prompt: 'Say hello.', responses: ['Hello!', 'Hi there, how can I help?'] },
      { prompt: 'Say bye.', responses: ['Bye.', 'Goodbye!'] },
    ];
    const run = async (concurrency: number | undefined, callOption?: number) => {
      const j = lmJudge(model, tokenizer, { batchSize: 4, maxSeq: 256, concurrency });
      const progress: number[] = [];
      const out = await j.compareBatch(items, { concurrency: callOption, onProgress: (done) => progress.push(done) });
      return { out, progress, forwards: j.stats.forwards };
    };
    const pooled = await run(undefined); // the default: the three prompts' 6 questions in batches of 4
    expect(pooled).toMatchObject({ progress: [3], forwards: 2 });
    const single = await run(1);
    expect(single).toMatchObject({ progress: [1, 2, 3], forwards: 3 });
    expect(await run(1, 2)).toMatchObject({ progress: [2, 3], forwards: 2 });
    single.out.forEach((P, n) => P.forEach((row, i) => row.forEach((v, k) => expect(v).toBeCloseTo(pooled.out[n][i][k], 6))));
    expect(() => lmJudge(model, tokenizer, { concurrency: 0 })).toThrow(/concurrency must be an integer ≥ 1, got 0/);
  });

  it('scores identical responses ½ without asking', async () => {
    const before = judge.stats.comparisons;
    const P = await judge.compare(PROMPT, ['same', 'same']);
    expect(P).toEqual([
      [0.5, 0.5],
      [0.5, 0.5],
    ]);
    expect(judge.stats.comparisons).toBe(before);
  });

  it('cuts long questions to maxSeq, keeping BOS and the end', async () => {
    const short = lmJudge(model, tokenizer, { batchSize: 4, maxSeq: 24 });
    const full = judge.questionIds(PROMPT, RESPONSES[0], RESPONSES[1]);
    const cut = short.questionIds(PROMPT, RESPONSES[0], RESPONSES[1]);
    expect(cut).toHaveLength(24);
    expect(cut[0]).toBe(1);
    expect(cut.slice(1)).toEqual(full.slice(full.length - 23));
    assertPreferenceMatrix(await short.compare(PROMPT, RESPONSES.slice(0, 2)));
    expect(short.stats.truncated).toBeGreaterThan(0);
  });

  it('non-finite answer-token logits are unusable verdicts: scored ½, counted, past maxUnusableFraction the call fails', async () => {
    // the same model, but its output head's row for 'A' is infinite, so every question's logit for A is ±∞ or NaN
    const idA = tokenizer.tokenId('A')!;
    const poisoned = new Proxy(model, {
      get(target, key) {
        if (key === 'getParam')
          return (name: string) => {
            const p = target.getParam(name);
            return name === 'lm_head.weight' ? p.fill(Infinity, idA * 32, (idA + 1) * 32) : p;
          };
        const v: unknown = Reflect.get(target, key, target);
        return typeof v === 'function' ? (v as (...a: unknown[]) => unknown).bind(target) : v;
      },
    });
    const bad = lmJudge(poisoned, tokenizer, { batchSize: 4, maxSeq: 256 });
    const responses = RESPONSES.slice(0, 3);
    const err = await bad.compare(PROMPT, responses).catch((e: unknown) => e);
    expect(err).toMatchObject({ name: 'UnusableVerdictsError', unusable: 6, verdicts: 6 });
    expect((err as Error).message).toMatch(
      /e\.g\. responses 0 and 1 \(0 shown first\): non-finite answer-token logits \((-?Infinity|NaN), /,
    );
    const judged = await bad.judge(PROMPT, responses, { maxUnusableFraction: 1 });
    expect(judged.P.flat().every((p) => p === 0.5)).toBe(true);
    expect(judged.unusable).toHaveLength(6);
  });

  it('refuses answer tokens that are not one token, and templates without placeholders', () => {
    expect(() => lmJudge(model, tokenizer, { answerTokens: ['Response A', 'B'] })).toThrow(/not one token .* encodes to \d+ tokens/);
    expect(() => lmJudge(model, tokenizer, { template: 'Which is better? {a} {b}' })).toThrow(/lacks \{prompt\}/);
  });

  it('loads from a directory and disposes its own model', async () => {
    const own = await loadLmJudge(dir, { batchSize: 2, maxSeq: 256 });
    expect(own.id).toContain(dir);
    const P = await own.compare(PROMPT, RESPONSES.slice(0, 2));
    const Q = await judge.compare(PROMPT, RESPONSES.slice(0, 2));
    expect(P[0][1]).toBeCloseTo(Q[0][1], 6);
    await own.dispose();
    await expect(own.compare(PROMPT, RESPONSES)).rejects.toThrow(/disposed/);
  });
});

describe('sppo run setup builds the judges from the config', () => {
  const config = (preference: unknown) => {
    writeFileSync(path.join(tmp, 'prompts.jsonl'), ['a', 'b', 'c', 'd'].map((p) => JSON.stringify({ prompt: `Say ${p}.` })).join('\n'));
    return parseConfig({
      model: { path: dir },
      data: { prompts: path.join(tmp, 'prompts.jsonl'), evalSize: 1, maxPromptTokens: 32 },
      generation: { maxNewTokens: 8 },
      training: { maxLength: 64, batchSize: 1 },
      run: { dir: path.join(tmp, 'run'), iterations: 1 },
      preference,
    });
  };

  it("kind 'lm-judge'", async () => {
    const setup = await setupFromConfig(config({ kind: 'lm-judge', path: dir, maxSeq: 4096, batchSize: 2 }));
    try {
      expect(setup.preference.id).toMatch(/^lm-judge\(/);
      const P = await setup.preference.compare(PROMPT, RESPONSES.slice(0, 2));
      expect(P[0][1]).toBeCloseTo((await judge.compare(PROMPT, RESPONSES.slice(0, 2)))[0][1], 6);
    } finally {
      await setup.preference.dispose();
      await setup.model.dispose();
    }
  });

  it("kind 'http' (a missing API key is the user's to fix)", async () => {
    delete process.env.SPPO_TEST_JUDGE_KEY;
    await expect(
      setupFromConfig(config({ kind: 'http', baseUrl: 'http://127.0.0.1:9/v1', model: 'm', apiKeyEnv: 'SPPO_TEST_JUDGE_KEY' })),
    ).rejects.toMatchObject({
      name: 'SetupError',
      path: ['preference', 'apiKeyEnv'],
      message: expect.stringMatching(/SPPO_TEST_JUDGE_KEY \(apiKeyEnv\) is not set/),
    });
    process.env.SPPO_TEST_JUDGE_KEY = 'k';
    const setup = await setupFromConfig(
      config({ kind: 'http', baseUrl: 'http://127.0.0.1:9/v1', model: 'm', apiKeyEnv: 'SPPO_TEST_JUDGE_KEY' }),
    );
    delete process.env.SPPO_TEST_JUDGE_KEY;
    expect(setup.preference.id).toMatch(/^http\(m@http:\/\/127\.0\.0\.1:9\/v1,/);
    await setup.preference.dispose();
    await setup.model.dispose();
  });
});
