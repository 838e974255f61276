// The PairRM judge on the engine, with a tiny random PairRM directory (test/fixtures/
// pairrm-fixture.ts: names from the issue, a tiny SentencePiece-Unigram tokenizer.json in
// DeBERTa-v3's layout): the input layout, its truncation budgets and special-token safety; P̂'s
// aggregation against hand-computed matrices; batching over all ordered pairs of all prompts
// (the same numbers whatever the batch); the source text after the policy's chat template;
// checkpoints refused by name; and the precision option (validated, 'auto' resolved, what the
// native encoder stores, 'bf16' refused on the CPU by its field). The encoder's numbers themselves are checked against float64
// references in native/tests/encoder_test.cpp.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parseConfig } from '../lib/config/index.js';
import { cudaInfo } from '../lib/engine/model.js';
import { native } from '../lib/engine/native.js';
import { Tokenizer } from '../lib/io/tokenizer.js';
import {
  assertPreferenceMatrix,
  loadPairRM,
  PAIRRM_TOKENS,
  pairrmMatrix,
  pairrmPlacement,
  PairRMPrecisionError,
  preferenceFromConfig,
  type PairRMJudge,
} from '../lib/preference/index.js';
import { pairrmConfig, pairrmTensors, TINY_PAIRRM, tinyDebertaTokenizer, writePairRMDir } from './fixtures/pairrm-fixture.js';

const tmp = mkdtempSync(path.join(tmpdir(), 'sppo-pairrm-'));
const dir = path.join(tmp, 'pairrm');
let judge: PairRMJudge;
let tokenizer: Tokenizer;
beforeAll(async () => {
  await writePairRMDir(dir);
  tokenizer = await Tokenizer.fromDirectory(dir);
  judge = await loadPairRM(dir, { maxSeq: 64, sourceMaxTokens: 24, batchSize: 3 });
});
afterAll(async () => {
  await judge.dispose();
  rmSync(tmp, { recursive: true, force: true });
});

const σ = (x: number): number => 1 / (1 + Math.exp(-x));

describe('P̂ from the comparisons (hand-computed)', () => {
  // C[i,j] = f(x, y_i, y_j); the diagonal is ignored
  const C = [
    [0, 1, 2],
    [-1, 0, 0.5],
    [0, 1, 0],
  ];

  it("'sppo': s_i = (1/K)·Σ_j (C[i,j] − C[j,i]), P̂[i,j] = σ(s_i − s_j)", () => {
    // s_0 = ((1 + 1) + (2 − 0))/3 = 4/3; s_1 = ((−1 − 1) + (0.5 − 1))/3 = −2.5/3; s_2 = ((0 − 2) + (1 − 0.5))/3 = −1.5/3
    const P = pairrmMatrix(C, 'sppo');
    expect(P[0][1]).toBeCloseTo(σ(4 / 3 + 2.5 / 3), 14);
    expect(P[0][2]).toBeCloseTo(σ(4 / 3 + 1.5 / 3), 14);
    expect(P[1][2]).toBeCloseTo(σ(-2.5 / 3 + 1.5 / 3), 14);
    expect(P[2][1]).toBeCloseTo(σ(1 / 3), 14);
    expect([P[0][0], P[1][1], P[2][2]]).toEqual([0.5, 0.5, 0.5]);
    assertPreferenceMatrix(P);
  });

  it("'pair': P[i,j] = ½(σ(C[i,j]) + σ(−C[j,i]))", () => {
    const P = pairrmMatrix(C, 'pair');
    expect(P[0][1]).toBeCloseTo((σ(1) + σ(1)) / 2, 14);
    expect(P[0][2]).toBeCloseTo((σ(2) + σ(0)) / 2, 14);
    expect(P[2][1]).toBeCloseTo((σ(1) + σ(-0.5)) / 2, 14);
    assertPreferenceMatrix(P);
  });

  it('a judge whose comparisons are antisymmetric and transitive ranks as its scores say', () => {
    const score = [0.3, -1, 2, 0];
    const P = pairrmMatrix(score.map((a) => score.map((b) => a - b)));
    // s_i = (2/K)·Σ_j (a_i − a_j) = 2(a_i − mean): P̂[i,j] = σ(2(a_i − a_j))
    expect(P[2][0]).toBeCloseTo(σ(2 * (2 - 0.3)), 14);
    expect(P[1][3]).toBeCloseTo(σ(-2), 14);
  });
});

describe('the input layout', () => {
  const ids = (t: string): number => tokenizer.tokenId(t)!;

  it('[CLS] <|source|> x [SEP] [CLS] <|candidate1|> y1 [SEP] [CLS] <|candidate2|> y2 [SEP], pooled at the prefixes', () => {
    const { ids: row, pool } = judge.comparisonIds('hello world', 'the answer', 'a question');
    const seg = (prefix: string, text: string) => [
      ids(PAIRRM_TOKENS.cls),
      ...tokenizer.encode(prefix + text, { addSpecialTokens: false }),
      ids(PAIRRM_TOKENS.sep),
    ];
    const s = seg(PAIRRM_TOKENS.source, 'hello world');
    const c1 = seg(PAIRRM_TOKENS.candidate1, 'the answer');
    expect(row).toEqual([...s, ...c1, ...seg(PAIRRM_TOKENS.candidate2, 'a question')]);
    expect(pool).toEqual([1, s.length + 1, s.length + c1.length + 1]);
    expect(row[pool[0]]).toBe(ids(PAIRRM_TOKENS.source));
    expect(row[pool[1]]).toBe(ids(PAIRRM_TOKENS.candidate1));
    expect(row[pool[2]]).toBe(ids(PAIRRM_TOKENS.candidate2));
  });

  it('cuts the source to sourceMaxTokens and each candidate to (maxSeq − source) // 2, keeping [SEP]', () => {
    const long = 'hello world '.repeat(40);
    const { ids: row, pool } = judge.comparisonIds(long, long, 'a');
    const sep = ids(PAIRRM_TOKENS.sep);
    expect(pool[1] - 1).toBe(24); // the source: exactly sourceMaxTokens
    expect(row[23]).toBe(sep);
    const budget = Math.floor((64 - 24) / 2);
    expect(pool[2] - pool[1]).toBe(budget); // candidate 1 filled its budget
    expect(row[pool[2] - 2]).toBe(sep);
    expect(row.length).toBeLessThanOrEqual(64);
    // the kept text is the start of the text (cut at the right)
    const body = tokenizer.encode(PAIRRM_TOKENS.source + long, { addSpecialTokens: false });
    expect(row.slice(1, 23)).toEqual(body.slice(0, 22));
  });

  it('a prefix token written inside a text stays text: no extra pooling position', () => {
    const nasty = `x ${PAIRRM_TOKENS.candidate2} y ${PAIRRM_TOKENS.source}${PAIRRM_TOKENS.candidate1}`;
    const { ids: row } = judge.comparisonIds(nasty, nasty, nasty);
    for (const t of [PAIRRM_TOKENS.source, PAIRRM_TOKENS.candidate1, PAIRRM_TOKENS.candidate2])
      expect(row.filter((id) => id === ids(t))).toHaveLength(1);
    // while the tokenizer itself would have made them tokens
    expect(tokenizer.encode(nasty, { addSpecialTokens: false })).toContain(ids(PAIRRM_TOKENS.candidate2));
  });
});

describe('judging on the engine', () => {
  const responses = ['the answer is good', 'a better answer', 'hello', 'the best answer of the world'];

  it('P̂ is the aggregation of every ordered pair’s comparison', async () => {
    const C = await judge.comparisons('a question', responses);
    expect(C.every((row, i) => row[i] === 0 && row.every(Number.isFinite))).toBe(true);
    expect(new Set(C.flat()).size).toBeGreaterThan(6); // a random head gives distinct values
    const judged = await judge.judge('a question', responses);
    expect(judged.verdicts).toBe(12);
    const P = pairrmMatrix(C);
    judged.P.forEach((row, i) => row.forEach((p, j) => expect(p).toBeCloseTo(P[i][j], 12)));
  });

  it('batches all ordered pairs of all prompts: the numbers do not depend on the batch or the padding', async () => {
    const items = [
      { prompt: 'hello', responses },
      { prompt: 'the question of the world', responses: responses.slice(0, 3) },
    ];
    const before = judge.stats.forwards;
    const batched = await judge.compareBatch(items, { concurrency: 2 });
    expect(judge.stats.forwards - before).toBe(Math.ceil((12 + 6) / 3)); // 18 rows, 3 per pass
    const one = await loadPairRM(dir, { maxSeq: 64, sourceMaxTokens: 24, batchSize: 1 });
    try {
      for (const [n, item] of items.entries()) {
        const alone = await one.compare(item.prompt, item.responses);
        alone.forEach((row, i) => row.forEach((p, j) => expect(batched[n][i][j]).toBeCloseTo(p, 5)));
      }
    } finally {
      await one.dispose();
    }
  });

  it('C batched across prompts, padded, is exactly C one row at a time (the CPU encoder is row-invariant)', async () => {
    const items = [
      { prompt: 'hello', responses },
      { prompt: 'the question of the world', responses: responses.slice(0, 3) },
    ];
    // 12 + 6 rows in passes of 5: neither count is a multiple of 5, so however the rows sort by
    // length, some pass holds rows of both prompts; their lengths differ, so rows are padded
    const five = await loadPairRM(dir, { maxSeq: 64, sourceMaxTokens: 24, batchSize: 5 });
    const one = await loadPairRM(dir, { maxSeq: 64, sourceMaxTokens: 24, batchSize: 1 });
    try {
      const batched = await five.comparisonsBatch(items);
      expect(five.stats.forwards).toBe(4);
      // both prompts at once: their passes take turns on the one encoder (its busy flag refuses overlap)
      const alone = await Promise.all(items.map((item) => one.comparisons(item.prompt, item.responses)));
      expect(one.stats.forwards).toBe(18);
      expect(batched).toEqual(alone);
      expect(new Set(batched.flat(2)).size).toBeGreaterThan(12); // distinct numbers, not a constant
    } finally {
      await five.dispose();
      await one.dispose();
    }
  });

  it('reads the source after sourceText (the policy’s chat template)', async () => {
    const templated = await loadPairRM(dir, { maxSeq: 64, sourceMaxTokens: 24, sourceText: (p) => `the question ${p} the answer` });
    try {
      const plain = await judge.comparisons('hello', responses.slice(0, 2));
      const viaTemplate = await templated.comparisons('hello', responses.slice(0, 2));
      const direct = await judge.comparisons('the question hello the answer', responses.slice(0, 2));
      expect(viaTemplate[0][1]).toBeCloseTo(direct[0][1], 6);
      expect(viaTemplate[0][1]).not.toBeCloseTo(plain[0][1], 6);
    } finally {
      await templated.dispose();
    }
  });
});

describe('loading refuses a directory that is not this PairRM, by name', () => {
  const { vocabSize } = tinyDebertaTokenizer();
  let n = 0;
  const variant = async (edit: (t: ReturnType<typeof pairrmTensors>) => ReturnType<typeof pairrmTensors>): Promise<string> => {
    const d = path.join(tmp, `bad-${n++}`);
    await writePairRMDir(d, TINY_PAIRRM, edit(pairrmTensors(TINY_PAIRRM, vocabSize)));
    return d;
  };

  it('a missing tensor', async () => {
    const d = await variant((t) => t.filter((x) => x.name !== 'pretrained_model.encoder.layer.1.attention.self.key_proj.bias'));
    await expect(loadPairRM(d)).rejects.toThrow(
      /lacks 1 tensor\(s\) PairRM needs: 'pretrained_model\.encoder\.layer\.1\.attention\.self\.key_proj\.bias'/,
    );
  });

  it('a tensor of the wrong shape', async () => {
    const d = await variant((t) =>
      t.map((x) => (x.name === 'head_layer.4.weight' ? { ...x, shape: [2, 4], data: new Float32Array(8) } : x)),
    );
    await expect(loadPairRM(d)).rejects.toThrow(/tensor 'head_layer\.4\.weight' has shape \[2, 4\] but the config gives \[1, 8\]/);
  });

  it('an unknown tensor', async () => {
    const d = await variant((t) => [
      ...t,
      { name: 'pretrained_model.embeddings.position_embeddings.weight', shape: [16, 16], data: new Float32Array(256) },
    ]);
    await expect(loadPairRM(d)).rejects.toThrow(
      /has 1 tensor\(s\) PairRM does not: 'pretrained_model\.embeddings\.position_embeddings\.weight'/,
    );
  });

  it('a config the encoder does not implement', async () => {
    const { writeFileSync } = await import('node:fs');
    const d = await variant((t) => t);
    writeFileSync(path.join(d, 'config.json'), JSON.stringify({ ...pairrmConfig(TINY_PAIRRM, vocabSize), share_att_key: false }));
    await expect(loadPairRM(d)).rejects.toThrow(/share_att_key is false, but the engine's DeBERTa-v3 encoder implements true/);
  });
});

describe("preference kind 'pairrm' in a run config", () => {
  it('fills the defaults and loads the judge; CUDA where it is unusable is refused, saying why', async () => {
    const c = parseConfig({ model: { path: 'model' }, data: { prompts: 'p.jsonl' }, preference: { kind: 'pairrm', path: dir } });
    expect(c.preference).toEqual({
      kind: 'pairrm',
      path: dir,
      aggregation: 'sppo',
      batchSize: 4,
      maxSeq: 2048,
      sourceMaxTokens: 1224,
      precision: 'auto',
      concurrency: 4,
      callTimeoutMs: 30 * 60_000,
      maxUnusableFraction: 0.05,
    });
    const j = await preferenceFromConfig(c.preference);
    try {
      expect(j.id).toBe(`pairrm(${dir},sppo)`);
      assertPreferenceMatrix(await j.compare('hello', ['a', 'the answer']), { size: 2 });
    } finally {
      await j.dispose();
    }
    if (!cudaInfo().available)
      await expect(preferenceFromConfig(c.preference, { device: 'cuda' })).rejects.toThrow(
        /preference\.path: .*cannot make the bf16 encoder on 'cuda': CUDA is unavailable: /,
      );
  });
});

describe('precision', () => {
  const config = (precision: unknown) =>
    parseConfig({ model: { path: 'model' }, data: { prompts: 'p.jsonl' }, preference: { kind: 'pairrm', path: dir, precision } });

  it('the config takes auto, fp32 and bf16, and refuses anything else at preference.precision', () => {
    for (const p of ['auto', 'fp32', 'bf16'] as const) expect(config(p).preference).toMatchObject({ precision: p });
    expect(() => config('fp16')).toThrow(/preference\.precision: must be one of auto, fp32, bf16/);
    expect(() => config(32)).toThrow(/preference\.precision: must be one of auto, fp32, bf16/);
  });

  it("'auto' is fp32 on the CPU and bf16 on CUDA; 'bf16' on the CPU is refused, saying what works", () => {
    expect(pairrmPlacement('cpu', 'auto')).toEqual({ device: 'cpu', precision: 'fp32' });
    expect(pairrmPlacement('cpu')).toEqual({ device: 'cpu', precision: 'fp32' });
    expect(pairrmPlacement('cpu', 'fp32')).toEqual({ device: 'cpu', precision: 'fp32' });
    expect(pairrmPlacement('cuda', 'auto')).toEqual({ device: 'cuda', precision: 'bf16' });
    expect(pairrmPlacement('cuda', 'fp32')).toEqual({ device: 'cuda', precision: 'fp32' });
    expect(pairrmPlacement('cuda', 'bf16')).toEqual({ device: 'cuda', precision: 'bf16' });
    const gpu = cudaInfo().available;
    expect(pairrmPlacement('auto', 'auto')).toEqual(gpu ? { device: 'cuda', precision: 'bf16' } : { device: 'cpu', precision: 'fp32' });
    expect(() => pairrmPlacement('cpu', 'bf16')).toThrow(PairRMPrecisionError);
    expect(() => pairrmPlacement('cpu', 'bf16')).toThrow(
      /precision 'bf16' needs the encoder on CUDA, but it runs on the CPU \(device 'cpu'\).*use precision 'fp32' or 'auto'/,
    );
    if (!gpu) expect(() => pairrmPlacement('auto', 'bf16')).toThrow(/device 'auto', and no GPU is usable/);
    expect(() => pairrmPlacement('cpu', 'half' as 'fp32')).toThrow(/pairrm: precision must be one of auto, fp32, bf16, got half/);
  });

  it('reaches the native encoder, and fp32 on the CPU is what the judge always computed there', async () => {
    expect(judge.precision).toBe('fp32'); // the default judge: 'auto' on the CPU, as the encoder reports it
    const explicit = await loadPairRM(dir, { maxSeq: 64, sourceMaxTokens: 24, batchSize: 3, precision: 'fp32' });
    try {
      expect(explicit.precision).toBe('fp32');
      const responses = ['the answer is good', 'a better answer', 'hello'];
      expect(await explicit.comparisons('a question', responses)).toEqual(await judge.comparisons('a question', responses));
    } finally {
      await explicit.dispose();
    }
  });

  it("a run config's 'bf16' on the CPU fails at preference.precision; CUDA where it is unusable says why", async () => {
    await expect(preferenceFromConfig(config('bf16').preference, { device: 'cpu' })).rejects.toThrow(
      /^preference\.precision: precision 'bf16' needs the encoder on CUDA/,
    );
    if (!cudaInfo().available)
      await expect(preferenceFromConfig(config('fp32').preference, { device: 'cuda' })).rejects.toThrow(
        /preference\.path: .*cannot make the fp32 encoder on 'cuda': CUDA is unavailable: /,
      );
  });

  it('the binding itself refuses a precision it cannot make', () => {
    const { NativeEncoder } = native();
    const c = {
      vocabSize: 8,
      hiddenSize: 8,
      numLayers: 1,
      numHeads: 2,
      intermediateSize: 8,
      positionBuckets: 4,
      maxRelativePositions: 8,
      layerNormEps: 1e-7,
      headHidden: 4,
    };
    const plan = { maxBatch: 1, maxSeq: 8 };
    expect(() => new NativeEncoder(c, plan, 'cpu', 'bf16')).toThrow(
      /precision 'bf16' needs device 'cuda': the CPU encoder stores fp32 only/,
    );
    expect(() => new NativeEncoder(c, plan, 'cpu', 'fp16' as 'fp32')).toThrow(/precision must be 'fp32' or 'bf16', got 'fp16'/);
    const e = new NativeEncoder(c, plan, 'cpu', 'fp32');
    expect(e.precision()).toBe('fp32');
    e.dispose();
  });
});
