// The reward-model judge on the engine, with a tiny random Llama sequence classifier in the
// Hugging Face layout (backbone `model.*` + `score.weight`, no lm_head, config architectures
// LlamaForSequenceClassification, num_labels 1) over the real Mistral-7B tokenizer: the matrix
// is valid and equals σ((r_i − r_j)/τ) from rewards computed by hand (each conversation alone
// through forward, hidden · score in float64), rewards do not depend on the batch's padding,
// reordering the responses reorders the matrix, τ scales, and broken checkpoints are named.
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { writeMistralTokenizer } from './fixtures/mistral-tokenizer.js';
import { parseConfig } from '../lib/config/index.js';
import { Model, savePretrained, setupFromConfig, type Tokenizer } from '../lib/index.js';
import { writeSafetensors, type TensorSource } from '../lib/io/safetensors.js';
import {
  assertPreferenceMatrix,
  loadRewardModel,
  loadRewardModelWeights,
  rewardModelJudge,
  type RewardModelJudge,
} from '../lib/preference/index.js';

const tmp = mkdtempSync(path.join(tmpdir(), 'sppo-judge-reward-'));
const dir = path.join(tmp, 'rm');
const HIDDEN = 32;

let backbone: TensorSource[];
let scoreRow: Float32Array;
let model: Model;
let tokenizer: Tokenizer;
let score: Float32Array;
let judge: RewardModelJudge;

/** A seq-cls checkpoint directory: `config` patched, `tensors` as its weights, the tokenizer copied. */
function writeCheckpoint(to: string, configPatch: Record<string, unknown>, tensors: TensorSource[]): Promise<void> {
  mkdirSync(to, { recursive: true });
  const cfg = JSON.parse(readFileSync(path.join(dir, 'config.json'), 'utf8'));
  writeFileSync(path.join(to, 'config.json'), JSON.stringify({ ...cfg, ...configPatch }));
  for (const name of ['tokenizer.json', 'tokenizer_config.json', 'chat_template.jinja'])
    copyFileSync(path.join(dir, name), path.join(to, name));
  return writeSafetensors(path.join(to, 'model.safetensors'), tensors);
}

beforeAll(async () => {
  const random = Model.create(
    {
      vocab_size: 32000,
      hidden_size: HIDDEN,
      num_hidden_layers: 2,
      num_attention_heads: 4,
      num_key_value_heads: 2,
      intermediate_size: 64,
      max_position_embeddings: 256,
      tie_word_embeddings: true,
      seed: 7,
    },
    { maxBatch: 1, maxSeq: 8 },
  );
  try {
    // peaked attention, so that the last position's state depends visibly on the whole text
    const scale = (name: string, by: number): void =>
      random.setParam(
        name,
        random.getParam(name).map((v) => v * by),
      );
    for (const l of [0, 1]) for (const w of ['q_proj', 'k_proj']) scale(`model.layers.${l}.self_attn.${w}.weight`, 20);
    for (const l of [0, 1]) for (const w of ['v_proj', 'o_proj']) scale(`model.layers.${l}.self_attn.${w}.weight`, 6);
    await savePretrained(random, dir);
    backbone = random.params().map((p) => ({ name: p.name, shape: p.shape, data: Float32Array.from(random.getParam(p.name)) }));
  } finally {
    await random.dispose();
  }
  let s = 12345;
  scoreRow = Float32Array.from({ length: HIDDEN }, () => ((s = (s * 1103515245 + 12345) % 2 ** 31) / 2 ** 31 - 0.5) * 2);
  writeMistralTokenizer(dir);
  const cfg = JSON.parse(readFileSync(path.join(dir, 'config.json'), 'utf8'));
  delete cfg.tie_word_embeddings;
  writeFileSync(
    path.join(dir, 'config.json'),
    JSON.stringify({
      ...cfg,
      architectures: ['LlamaForSequenceClassification'],
      num_labels: 1,
      bos_token_id: 1,
      eos_token_id: 2,
      pad_token_id: 0,
      id2label: { 0: 'LABEL_0' },
      label2id: { LABEL_0: 0 },
    }),
  );
  await writeSafetensors(path.join(dir, 'model.safetensors'), [...backbone, { name: 'score.weight', shape: [1, HIDDEN], data: scoreRow }]);
  ({ model, tokenizer, score } = await loadRewardModelWeights(dir, { maxBatch: 4, maxSeq: 256 }));
  judge = rewardModelJudge(model, tokenizer, score, { batchSize: 4, maxSeq: 256 });
}, 120_000);
afterAll(async () => {
  await judge?.dispose();
  await model?.dispose();
  rmSync(tmp, { recursive: true, force: true });
});

/** r the slow way: the conversation alone through forward, hidden · score in float64. */
async function directReward(prompt: string, response: string): Promise<number> {
  const ids = tokenizer.encodeChat(
    [
      { role: 'user', content: prompt },
      { role: 'assistant', content: response },
    ],
    { addGenerationPrompt: false },
  );
  const { hidden } = await model.forward([ids], { output: 'hidden' });
  const at = (ids.length - 1) * HIDDEN;
  let r = 0;
  for (let d = 0; d < HIDDEN; d++) r += hidden![at + d] * scoreRow[d];
  return r;
}

const sigmoid = (x: number): number => 1 / (1 + Math.exp(-x));
const PROMPT = 'Name a colour of the sky.';
const RESPONSES = ['Blue.', 'The sky is usually blue during the day.', 'Green', 'Grey when it rains, blue otherwise.'];

describe('rewardModelJudge', () => {
  it('loads the checkpoint exactly (backbone tensors and score row)', () => {
    expect(Array.from(score)).toEqual(Array.from(scoreRow));
    expect(model.config.tie_word_embeddings).toBe(true);
    for (const t of backbone)
      expect(Array.from(model.getParam(t.name)).slice(0, 50)).toEqual(Array.from(t.data as Float32Array).slice(0, 50));
  });

  it('gives a valid matrix equal to σ((r_i − r_j)/τ) from rewards computed by hand', async () => {
    const P = await judge.compare(PROMPT, RESPONSES);
    assertPreferenceMatrix(P, { size: 4 });
    expect(judge.stats).toMatchObject({ scored: 4, forwards: 1, truncated: 0 });
    const r = await Promise.all(RESPONSES.map((y) => directReward(PROMPT, y)));
    expect(new Set(r.map((v) => v.toFixed(4))).size).toBe(4); // the random model tells them apart
    for (let i = 0; i < 4; i++) {
      expect(P[i][i]).toBe(0.5);
      for (let j = 0; j < 4; j++) {
        if (i === j) continue;
        expect(P[i][j]).toBeCloseTo(sigmoid(r[i] - r[j]), 5);
        expect(P[i][j] + P[j][i]).toBe(1);
      }
    }
    expect(Math.max(...P.flat().map((v) => Math.abs(v - 0.5)))).toBeGreaterThan(0.01);
  });

  it('a response’s reward is the same alone and in a padded batch', async () => {
    const batched = await judge.rewards(PROMPT, RESPONSES);
    for (let i = 0; i < RESPONSES.length; i++) {
      const alone = await directReward(PROMPT, RESPONSES[i]);
      expect(batched[i]).toBeCloseTo(alone, 4);
      const two = await judge.rewards(PROMPT, [RESPONSES[i], RESPONSES[(i + 1) % 4] + ' and a much longer tail of extra words to pad']);
      expect(two[0]).toBeCloseTo(alone, 4);
    }
  });

  it('swapping the responses permutes the matrix', async () => {
    const [a, b, c] = RESPONSES;
    const P = await judge.compare(PROMPT, [a, b, c]);
    const S = await judge.compare(PROMPT, [c, a, b]);
    const perm = [2, 0, 1];
    for (let x = 0; x < 3; x++) for (let y = 0; y < 3; y++) expect(S[x][y]).toBeCloseTo(P[perm[x]][perm[y]], 6);
  });

  it('τ scales the reward differences', async () => {
    const r = await judge.rewards(PROMPT, RESPONSES);
    const hot = rewardModelJudge(model, tokenizer, score, { temperature: 2.5, batchSize: 4, maxSeq: 256 });
    expect(hot.id).toContain('τ=2.5');
    const P = await hot.compare(PROMPT, RESPONSES);
    for (let i = 0; i < 4; i++) for (let j = 0; j < 4; j++) if (i !== j) expect(P[i][j]).toBeCloseTo(sigmoid((r[i] - r[j]) / 2.5), 5);
    expect(() => rewardModelJudge(model, tokenizer, score, { temperature: 0 })).toThrow(/temperature must be .* > 0/);
  });

  it('batches prompts together, scoring each distinct response once', async () => {
    const items = [
      { prompt: PROMPT, responses: [...RESPONSES.slice(0, 3), RESPONSES[0]] },
      { prompt: 'Say hello.', responses: ['Hello!', 'Hi there, how can I help?'] },
    ];
    const before = { ...judge.stats };
    const batched = await judge.compareBatch(items);
    expect(judge.stats.scored - before.scored).toBe(5);
    expect(judge.stats.forwards - before.forwards).toBe(2);
    expect(batched[0][0][3]).toBe(0.5);
    for (let n = 0; n < items.length; n++) {
      const alone = await judge.compare(items[n].prompt, items[n].responses);
      alone.forEach((row, i) => row.forEach((v, j) => expect(batched[n][i][j]).toBeCloseTo(v, 5)));
    }
  });

  it('scores `concurrency` prompts at a time, their rows sharing forward passes', async () => {
    const items = [
      { prompt: PROMPT, responses: RESPONSES.slice(0, 2) },
      { prompt: 'Say hello.', responses: ['Hello!', 'Hi there, how can I help?'] },
    ];
    const run = async (concurrency?: number) => {
      const j = rewardModelJudge(model, tokenizer, score, { batchSize: 4, maxSeq: 256, concurrency });
      const progress: number[] = [];
      const out = await j.compareBatch(items, { onProgress: (done) => progress.push(done) });
      return { out, progress, forwards: j.stats.forwards };
    };
    const pooled = await run(); // the default: both prompts' 4 rows in one pass
    expect(pooled).toMatchObject({ progress: [2], forwards: 1 });
    const single = await run(1);
    expect(single).toMatchObject({ progress: [1, 2], forwards: 2 });
    single.out.forEach((P, n) => P.forEach((row, i) => row.forEach((v, k) => expect(v).toBeCloseTo(pooled.out[n][i][k], 5))));
  });

  it('a non-finite reward is an unusable verdict: its pairs score ½, it is counted, and past maxUnusableFraction the call fails', async () => {
    const infinite = Float32Array.from(score);
    infinite[0] = Infinity; // every reward becomes ±∞ or NaN
    const bad = rewardModelJudge(model, tokenizer, infinite, { batchSize: 4, maxSeq: 256 });
    const responses = ['Blue.', 'Green', 'Blue.']; // the duplicate is scored (and counted) once
    const err = await bad.compare('Name a colour.', responses).catch((e: unknown) => e);
    expect(err).toMatchObject({ name: 'UnusableVerdictsError', unusable: 2, verdicts: 2 });
    expect((err as Error).message).toMatch(/e\.g\. response 0: a non-finite reward \((-?Infinity|NaN)\); response 1: a non-finite reward/);
    const batch = await bad.judgeBatch([{ prompt: 'Name a colour.', responses }], { maxUnusableFraction: 1 });
    expect(batch).toMatchObject({ verdicts: 2, unusable: 2 });
    expect(batch.matrices[0].flat().every((p) => p === 0.5)).toBe(true);
  });

  it('cuts long conversations to maxSeq, keeping BOS and the end', () => {
    const short = rewardModelJudge(model, tokenizer, score, { batchSize: 4, maxSeq: 16 });
    const full = judge.conversationIds(PROMPT, RESPONSES[1]);
    const cut = short.conversationIds(PROMPT, RESPONSES[1]);
    expect(cut).toHaveLength(16);
    expect(cut[0]).toBe(1);
    expect(cut.slice(1)).toEqual(full.slice(full.length - 15));
    expect(full[full.length - 1]).toBe(2); // the conversation ends with the assistant's EOS
  });
});

describe('loadRewardModel', () => {
  it('loads from a directory and disposes its own model', async () => {
    const own = await loadRewardModel(dir, { batchSize: 2, maxSeq: 256, temperature: 0.5 });
    expect(own.id).toBe(`reward-model(${dir},τ=0.5)`);
    const r = await judge.rewards(PROMPT, RESPONSES.slice(0, 2));
    expect((await own.compare(PROMPT, RESPONSES.slice(0, 2)))[0][1]).toBeCloseTo(sigmoid((r[0] - r[1]) / 0.5), 5);
    await own.dispose();
    await expect(own.compare(PROMPT, RESPONSES)).rejects.toThrow(/disposed/);
  });

  it('refuses num_labels ≠ 1, causal architectures, and missing or unexpected tensors by name', async () => {
    const small = { batchSize: 2, maxSeq: 64 };
    const score1 = { name: 'score.weight', shape: [1, HIDDEN], data: scoreRow };
    const two = path.join(tmp, 'two');
    await writeCheckpoint(two, { num_labels: 2 }, [
      ...backbone,
      { name: 'score.weight', shape: [2, HIDDEN], data: new Float32Array(2 * HIDDEN) },
    ]);
    await expect(loadRewardModel(two, small)).rejects.toThrow(/num_labels must be 1 .* got 2/);
    const labels = path.join(tmp, 'labels');
    const { num_labels: _, ...noNum } = JSON.parse(readFileSync(path.join(dir, 'config.json'), 'utf8'));
    await writeCheckpoint(labels, {}, [...backbone, score1]);
    writeFileSync(path.join(labels, 'config.json'), JSON.stringify({ ...noNum, id2label: { 0: 'bad', 1: 'good' } }));
    await expect(loadRewardModel(labels, small)).rejects.toThrow(/num_labels must be 1 .* got 2/);
    const causal = path.join(tmp, 'causal');
    await writeCheckpoint(causal, { architectures: ['LlamaForCausalLM'] }, [...backbone, score1]);
    await expect(loadRewardModel(causal, small)).rejects.toThrow(/LlamaForSequenceClassification/);
    const noScore = path.join(tmp, 'no-score');
    await writeCheckpoint(noScore, {}, backbone);
    await expect(loadRewardModel(noScore, small)).rejects.toThrow(/lacks 1 tensor\(s\) .*'score\.weight'/);
    const noNorm = path.join(tmp, 'no-norm');
    await writeCheckpoint(noNorm, {}, [...backbone.filter((t) => t.name !== 'model.norm.weight'), score1]);
    await expect(loadRewardModel(noNorm, small)).rejects.toThrow(/'model\.norm\.weight'/);
    const head = path.join(tmp, 'head');
    await writeCheckpoint(head, {}, [
      ...backbone,
      score1,
      { name: 'lm_head.weight', shape: [32000, HIDDEN], data: new Float32Array(32000 * HIDDEN) },
    ]);
    await expect(loadRewardModel(head, small)).rejects.toThrow(/does not: 'lm_head\.weight'/);
    const wide = path.join(tmp, 'wide');
    await writeCheckpoint(wide, {}, [...backbone, { name: 'score.weight', shape: [1, HIDDEN + 1], data: new Float32Array(HIDDEN + 1) }]);
    await expect(loadRewardModel(wide, small)).rejects.toThrow(/'score\.weight' has shape \[1, 33\]/);
  });
});

describe("sppo run setup builds kind 'reward-model'", () => {
  it('from the config, with its temperature', async () => {
    writeFileSync(path.join(tmp, 'prompts.jsonl'), ['a', 'b', 'c', 'd'].map((p) => JSON.stringify({ prompt: `Say ${p}.` })).join('\n'));
    const policy = path.join(tmp, 'policy');
    const random = Model.create(
      {
        vocab_size: 32000,
        hidden_size: 16,
        num_hidden_layers: 1,
        num_attention_heads: 2,
        intermediate_size: 32,
        max_position_embeddings: 128,
      },
      { maxBatch: 1, maxSeq: 8 },
    );
    await savePretrained(random, policy);
    await random.dispose();
    for (const name of ['tokenizer.json', 'tokenizer_config.json', 'chat_template.jinja'])
      copyFileSync(path.join(dir, name), path.join(policy, name));
    const config = parseConfig({
      model: { path: policy },
      data: { prompts: path.join(tmp, 'prompts.jsonl'), evalSize: 1, maxPromptTokens: 32 },
      generation: { maxNewTokens: 8 },
      training: { maxLength: 64, batchSize: 1 },
      run: { dir: path.join(tmp, 'run'), iterations: 1 },
      preference: { kind: 'reward-model', path: dir, temperature: 2, maxSeq: 4096, batchSize: 2 },
    });
    expect(config.preference).toMatchObject({ kind: 'reward-model', temperature: 2, concurrency: 4 });
    const setup = await setupFromConfig(config);
    try {
      expect(setup.preference.id).toBe(`reward-model(${dir},τ=2)`);
      const r = await judge.rewards(PROMPT, RESPONSES.slice(0, 2));
      expect((await setup.preference.compare(PROMPT, RESPONSES.slice(0, 2)))[0][1]).toBeCloseTo(sigmoid((r[0] - r[1]) / 2), 5);
    } finally {
      await setup.preference.dispose();
      await setup.model.dispose();
    }
  });
});
