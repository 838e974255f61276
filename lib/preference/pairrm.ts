// PairRM (llm-blender/PairRM), the SPPO paper's judge, on the engine's DeBERTa-v3 encoder
// (native/include/sppo/encoder.h). One comparison is one row
//   [CLS] <|source|> x [SEP] [CLS] <|candidate1|> y1 [SEP] [CLS] <|candidate2|> y2 [SEP]
// (each segment cut at the right: the source to sourceMaxTokens, each candidate to
// (maxSeq − source tokens) // 2, as llm-blender's tokenize_pair), and f(x, y1, y2) =
// g([e_s; e_1]) − g([e_s; e_2]) from the final hidden states at the three prefix tokens. Every
// ordered pair i ≠ j of every prompt is a row, C[i,j] = f(x, y_i, y_j); rows are sorted by length
// and batched across prompts. P̂ is the reference's (aggregation 'sppo'): s_i = (1/K)·Σ_j
// (C[i,j] − C[j,i]), P̂[i,j] = σ(s_i − s_j). The source x is the prompt after the policy's chat
// template (sourceText). A non-finite C[i,j] is an unusable verdict, counted as 0. The encoder
// runs on the run's device: on the CPU in float32, on CUDA in the `precision` asked for
// (pairrmPlacement: 'fp32', or 'bf16' storage with fp32 math; 'auto' is fp32 on the CPU, bf16 on
// CUDA). The CPU has no bf16 encoder: bf16 storage there would only emulate the GPU's rounding,
// slower than float32 on the CPU's float GEMMs, so 'bf16' on the CPU is refused by name.
import { existsSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import type { Device } from '../engine/model.js';
import { resolveDevice } from '../engine/memory.js';
import { native, type NativeEncoderConfig, type NativeEncoderHandle } from '../engine/native.js';
import { ReadScratch } from '../io/safetensors.js';
import { Tokenizer } from '../io/tokenizer.js';
import { CheckpointWeights } from '../io/weights.js';
import { throwIfAborted } from '../util/abort.js';
import { judgeInGroups } from './last-token.js';
import { checkTimeout, definePreferenceModel, withJudgeTimeout, type CompareItem, type Judgment, type PreferenceModel } from './model.js';
import { DEFAULT_JUDGE_CONCURRENCY } from './options/common.js';
import { PAIRRM_AGGREGATIONS, PAIRRM_DEFAULTS, PAIRRM_PRECISIONS, type PairRMAggregation, type PairRMPrecision } from './options/pairrm.js';

export class PairRMError extends Error {
  override name = 'PairRMError';
}

/** A precision the device cannot run (a run config reports it at preference.precision). */
export class PairRMPrecisionError extends PairRMError {
  override name = 'PairRMPrecisionError';
}

/** Where the encoder runs and what it stores, 'auto' resolved. */
export interface PairRMPlacement {
  device: 'cpu' | 'cuda';
  precision: 'fp32' | 'bf16';
}

/**
 * The device ('auto': CUDA when usable) and the precision ('auto': fp32 on the CPU, bf16 on
 * CUDA); 'bf16' on the CPU is a PairRMPrecisionError saying what works.
 */
export function pairrmPlacement(device: Device = 'cpu', precision: PairRMPrecision = PAIRRM_DEFAULTS.precision): PairRMPlacement {
  if (!PAIRRM_PRECISIONS.includes(precision))
    throw new RangeError(`pairrm: precision must be one of ${PAIRRM_PRECISIONS.join(', ')}, got ${precision as string}`);
  const where = resolveDevice(device);
  if (precision === 'auto') return { device: where, precision: where === 'cuda' ? 'bf16' : 'fp32' };
  if (precision === 'bf16' && where === 'cpu')
    throw new PairRMPrecisionError(
      `precision 'bf16' needs the encoder on CUDA, but it runs on the CPU (device '${device}'${
        device === 'auto' ? ', and no GPU is usable' : ''
      }), whose encoder stores float32 only: use precision 'fp32' or 'auto' there`,
    );
  return { device: where, precision };
}

/** The special tokens PairRM's input is built from (tokenizer.json's added tokens). */
export const PAIRRM_TOKENS = Object.freeze({
  cls: '[CLS]',
  sep: '[SEP]',
  source: '<|source|>',
  candidate1: '<|candidate1|>',
  candidate2: '<|candidate2|>',
});
/** Prefix strings a text must not turn into tokens (they would add pooling positions). */
const PREFIX_STRINGS = [PAIRRM_TOKENS.source, PAIRRM_TOKENS.candidate1, PAIRRM_TOKENS.candidate2, '<|candidate|>'];
const PREFIX_PATTERN = new RegExp(PREFIX_STRINGS.map((t) => t.replace(/\|/g, '\\|')).join('|'), 'g');

export interface PairRMOptions {
  /** ordered comparisons per forward pass; default PAIRRM_DEFAULTS */
  batchSize?: number;
  /** tokens of one comparison; default PAIRRM_DEFAULTS */
  maxSeq?: number;
  /** tokens of the source, its three special tokens included; default PAIRRM_DEFAULTS */
  sourceMaxTokens?: number;
  /** where the encoder runs: 'cpu', 'cuda' or 'auto' (CUDA when usable); default 'cpu' */
  device?: Device;
  /** the encoder's storage: 'fp32', 'bf16' (CUDA only) or 'auto' (fp32 on the CPU, bf16 on CUDA); default 'auto' */
  precision?: PairRMPrecision;
  /** default 'sppo' */
  aggregation?: PairRMAggregation;
  /** the source text of a prompt: the prompt after the policy's chat template; default the prompt itself */
  sourceText?: (prompt: string) => string;
  /** prompts judged at once, their rows pooled into shared passes; default DEFAULT_JUDGE_CONCURRENCY */
  concurrency?: number;
  callTimeoutMs?: number;
  maxUnusableFraction?: number;
  /** default `pairrm(<dir>,<aggregation>)` */
  id?: string;
}

export interface PairRMStats {
  /** ordered comparisons run */
  comparisons: number;
  forwards: number;
  /** segments (sources or candidates) cut to their budget */
  truncated: number;
}

export interface PairRMJudge extends PreferenceModel {
  readonly stats: PairRMStats;
  /** the storage type the native encoder was made with ('auto' resolved) */
  readonly precision: 'fp32' | 'bf16';
  /** One comparison's token ids and the positions of its three prefix tokens. */
  comparisonIds(source: string, candidate1: string, candidate2: string): { ids: number[]; pool: [number, number, number] };
  /** C[i,j] = f(x, y_i, y_j) for every ordered pair of one prompt (C[i,i] = 0), x = sourceText(prompt). */
  comparisons(prompt: string, responses: readonly string[], options?: { signal?: AbortSignal }): Promise<number[][]>;
  /** C of each item, the rows of all items sorted by length and batched together (as compareBatch runs them). */
  comparisonsBatch(items: readonly CompareItem[], options?: { signal?: AbortSignal }): Promise<number[][][]>;
}

/** σ(x) = 1 / (1 + e^−x), without overflow. */
function sigmoid(x: number): number {
  if (x >= 0) return 1 / (1 + Math.exp(-x));
  const e = Math.exp(x);
  return e / (1 + e);
}

/**
 * P̂ from the comparison matrix C (C[i,i] ignored). 'sppo' (the reference): s_i = (1/K)·Σ_j
 * (C[i,j] − C[j,i]), P̂[i,j] = σ(s_i − s_j), diagonal ½. 'pair': P[i,j] = ½(σ(C[i,j]) +
 * σ(−C[j,i])), each pair from its two orders alone.
 */
export function pairrmMatrix(C: readonly (readonly number[])[], aggregation: PairRMAggregation = 'sppo'): number[][] {
  const K = C.length;
  if (aggregation === 'pair') return C.map((row, i) => row.map((_, j) => (i === j ? 0.5 : (sigmoid(C[i][j]) + sigmoid(-C[j][i])) / 2)));
  const s = C.map((row, i) => row.reduce((acc, c, j) => (i === j ? acc : acc + c - C[j][i]), 0) / K);
  return s.map((si, i) => s.map((sj, j) => (i === j ? 0.5 : sigmoid(si - sj))));
}

/** The judge over an encoder (with its head) and PairRM's tokenizer. */
export function pairrmJudge(
  encoder: NativeEncoderHandle,
  tokenizer: Tokenizer,
  options: PairRMOptions & { label?: string } = {},
): PairRMJudge {
  const batchSize = options.batchSize ?? PAIRRM_DEFAULTS.batchSize;
  const maxSeq = options.maxSeq ?? PAIRRM_DEFAULTS.maxSeq;
  const sourceMax = options.sourceMaxTokens ?? PAIRRM_DEFAULTS.sourceMaxTokens;
  const aggregation = options.aggregation ?? PAIRRM_DEFAULTS.aggregation;
  if (!PAIRRM_AGGREGATIONS.includes(aggregation))
    throw new RangeError(`pairrm: aggregation must be one of ${PAIRRM_AGGREGATIONS.join(', ')}, got ${aggregation as string}`);
  for (const [v, what, min] of [
    [batchSize, 'batchSize', 1],
    [maxSeq, 'maxSeq', 16],
    [sourceMax, 'sourceMaxTokens', 3],
  ] as const)
    if (!Number.isInteger(v) || v < min) throw new RangeError(`pairrm: ${what} must be an integer ≥ ${min}, got ${v}`);
  if (sourceMax > maxSeq - 6)
    throw new RangeError(`pairrm: sourceMaxTokens (${sourceMax}) leaves no room in maxSeq (${maxSeq}) for two candidates`);
  const id = (name: string): number => {
    const n = tokenizer.tokenId(name);
    if (n === undefined) throw new PairRMError(`pairrm: the tokenizer has no token ${name} (not a PairRM tokenizer)`);
    return n;
  };
  const CLS = id(PAIRRM_TOKENS.cls);
  const SEP = id(PAIRRM_TOKENS.sep);
  const prefixIds = [id(PAIRRM_TOKENS.source), id(PAIRRM_TOKENS.candidate1), id(PAIRRM_TOKENS.candidate2)];
  const sourceText = options.sourceText ?? ((p: string) => p);
  const judgeId = options.id ?? `pairrm(${options.label ?? 'model'},${aggregation})`;
  const concurrency = options.concurrency ?? DEFAULT_JUDGE_CONCURRENCY;
  const timeoutMs = checkTimeout(options.callTimeoutMs ?? PAIRRM_DEFAULTS.callTimeoutMs, 'pairrm: callTimeoutMs');
  const stats: PairRMStats = { comparisons: 0, forwards: 0, truncated: 0 };

  /**
   * `prefix text` as llm-blender encodes it (the prefix string and the text in one call, so the
   * text's first piece is tokenized exactly as there), except that a prefix string inside the
   * text is split at its last character and so stays ordinary text, never a pooling token.
   */
  function segmentIds(prefix: string, text: string): number[] {
    if (!PREFIX_STRINGS.some((t) => text.includes(t))) return tokenizer.encode(prefix + text, { addSpecialTokens: false });
    const ids: number[] = [];
    let rest = prefix;
    let last = 0;
    for (const m of text.matchAll(PREFIX_PATTERN)) {
      rest += text.slice(last, m.index) + m[0].slice(0, -1);
      ids.push(...tokenizer.encode(rest, { addSpecialTokens: false }));
      rest = m[0].slice(-1);
      last = m.index + m[0].length;
    }
    ids.push(...tokenizer.encode(rest + text.slice(last), { addSpecialTokens: false }));
    return ids;
  }

  /** [CLS] prefix text [SEP] cut to `budget` tokens (the text at its right end). */
  function segment(prefix: string, text: string, budget: number): number[] {
    const body = segmentIds(prefix, text);
    if (body.length + 2 > budget) stats.truncated++;
    return [CLS, ...body.slice(0, budget - 2), SEP];
  }

  function comparisonIds(source: string, candidate1: string, candidate2: string): { ids: number[]; pool: [number, number, number] } {
    const s = segment(PAIRRM_TOKENS.source, source, sourceMax);
    const budget = Math.floor((maxSeq - s.length) / 2);
    const c1 = segment(PAIRRM_TOKENS.candidate1, candidate1, budget);
    const c2 = segment(PAIRRM_TOKENS.candidate2, candidate2, budget);
    const ids = [...s, ...c1, ...c2];
    // the prefix is the second token of each segment (cut segments keep it: budgets are ≥ 3)
    const pool: [number, number, number] = [1, s.length + 1, s.length + c1.length + 1];
    pool.forEach((at, k) => {
      if (ids[at] !== prefixIds[k] || ids.filter((t) => t === prefixIds[k]).length !== 1)
        throw new PairRMError(`pairrm: internal: pooling token ${k} is not where the layout puts it`);
    });
    return { ids, pool };
  }

  /** Settles when the encoder is free: the last pass started has settled (a timed-out one included). */
  let encoderFree: Promise<void> = Promise.resolve();
  /**
   * One forward pass, after the previous one has settled: concurrent compare() or comparisons()
   * calls take turns on the encoder, whose busy flag would refuse the overlap. The time limit
   * counts the pass, not the wait for its turn.
   */
  async function forwardPass(ids: Int32Array, lengths: Int32Array, pool: Int32Array, batch: number, seq: number, signal?: AbortSignal) {
    const turn = encoderFree;
    let release!: () => void;
    encoderFree = new Promise<void>((resolve) => (release = resolve));
    let running: Promise<unknown> | undefined;
    try {
      await turn;
      return await withJudgeTimeout(
        judgeId,
        'one forward pass',
        timeoutMs,
        () => (running = encoder.pairrm(ids, lengths, pool, batch, seq, false)),
        signal,
      );
    } finally {
      if (running) void running.then(release, release);
      else release();
    }
  }

  /** C for every item: all ordered pairs of all prompts, sorted by length and batched. */
  async function comparisonMatrices(items: readonly CompareItem[], signal?: AbortSignal): Promise<number[][][]> {
    const rows: { ids: number[]; pool: [number, number, number]; item: number; i: number; j: number }[] = [];
    items.forEach(({ prompt, responses }, item) => {
      const x = sourceText(prompt);
      for (let i = 0; i < responses.length; i++)
        for (let j = 0; j < responses.length; j++) if (i !== j) rows.push({ ...comparisonIds(x, responses[i], responses[j]), item, i, j });
    });
    const C = items.map(({ responses }) => responses.map(() => new Array<number>(responses.length).fill(0)));
    const order = rows.map((_, n) => n).sort((a, b) => rows[a].ids.length - rows[b].ids.length);
    for (let start = 0; start < order.length; start += batchSize) {
      throwIfAborted(signal);
      const group = order.slice(start, start + batchSize).map((n) => rows[n]);
      const seq = Math.max(...group.map((r) => r.ids.length));
      const ids = new Int32Array(group.length * seq); // padding is id 0 ([PAD]), masked by the lengths
      const lengths = new Int32Array(group.length);
      const pool = new Int32Array(group.length * 3);
      group.forEach((r, b) => {
        ids.set(r.ids, b * seq);
        lengths[b] = r.ids.length;
        pool.set(r.pool, b * 3);
      });
      const { logits } = await forwardPass(ids, lengths, pool, group.length, seq, signal);
      stats.forwards++;
      group.forEach((r, b) => (C[r.item][r.i][r.j] = logits[b]));
    }
    stats.comparisons += rows.length;
    return C;
  }

  const judgment = (C: number[][]): Judgment => {
    const unusable: string[] = [];
    const clean = C.map((row, i) =>
      row.map((c, j) => {
        if (Number.isFinite(c)) return c;
        unusable.push(`responses ${i} and ${j} (${i} as candidate 1): a non-finite logit (${c})`);
        return 0;
      }),
    );
    const K = C.length;
    return { P: pairrmMatrix(clean, aggregation), verdicts: K * (K - 1), unusable };
  };

  let disposed = false;
  const pm = definePreferenceModel({
    id: judgeId,
    concurrency,
    maxUnusableFraction: options.maxUnusableFraction,
    async compare(prompt, responses, { signal }) {
      return judgment((await comparisonMatrices([{ prompt, responses }], signal))[0]);
    },
    compareBatch: (items, batchOptions) =>
      judgeInGroups(items, concurrency, batchOptions, async (group, signal) => (await comparisonMatrices(group, signal)).map(judgment)),
    dispose() {
      disposed = true;
      encoder.dispose();
    },
  });
  async function comparisonsBatch(items: readonly CompareItem[], opts: { signal?: AbortSignal } = {}): Promise<number[][][]> {
    if (disposed) throw new Error('pairrm: the judge has been disposed');
    return comparisonMatrices(items, opts.signal);
  }
  const comparisons = async (prompt: string, responses: readonly string[], opts: { signal?: AbortSignal } = {}): Promise<number[][]> =>
    (await comparisonsBatch([{ prompt, responses }], opts))[0];
  return Object.assign(pm, { stats, comparisonIds, comparisons, comparisonsBatch, precision: encoder.precision() });
}

/** tensors a checkpoint may hold that the encoder does not read (buffers, not weights) */
const IGNORED_TENSOR = /(^|\.)position_ids$/;

/** config.json's architecture fields, checked against what the engine's encoder implements. */
export function encoderConfigFromHf(hf: Record<string, unknown>, headHidden: number, label = 'config.json'): NativeEncoderConfig {
  const fail = (m: string): never => {
    throw new PairRMError(`${label}: ${m}`);
  };
  const int = (key: string, fallback?: number): number => {
    const v = hf[key] ?? fallback;
    if (typeof v !== 'number' || !Number.isInteger(v)) fail(`${key} must be an integer, got ${JSON.stringify(v)}`);
    return v as number;
  };
  const expect = (key: string, ok: (v: unknown) => boolean, want: string, fallback?: unknown): void => {
    const v = hf[key] ?? fallback;
    if (!ok(v)) fail(`${key} is ${JSON.stringify(v)}, but the engine's DeBERTa-v3 encoder implements ${want}`);
  };
  if (hf.model_type !== undefined && hf.model_type !== 'deberta-v2')
    fail(`model_type must be 'deberta-v2', got ${JSON.stringify(hf.model_type)}`);
  expect('relative_attention', (v) => v === true, 'true');
  expect('pos_att_type', (v) => Array.isArray(v) && v.length === 2 && v.includes('p2c') && v.includes('c2p'), '["p2c", "c2p"]');
  expect('share_att_key', (v) => v === true, 'true');
  expect(
    'norm_rel_ebd',
    (v) =>
      typeof v === 'string' &&
      v
        .split('|')
        .map((s) => s.trim())
        .includes('layer_norm'),
    "'layer_norm'",
  );
  expect('position_biased_input', (v) => v === false, 'false');
  expect('type_vocab_size', (v) => v === 0, '0', 0);
  expect('hidden_act', (v) => v === 'gelu', "'gelu' (the exact erf GELU)", 'gelu');
  const hidden = int('hidden_size');
  expect('embedding_size', (v) => v === hidden, `the hidden size (${hidden})`, hidden);
  const maxRel = int('max_relative_positions', -1);
  const buckets = int('position_buckets', -1);
  if (buckets < 2) fail(`position_buckets must be ≥ 2 (log buckets), got ${buckets}`);
  return {
    vocabSize: int('vocab_size'),
    hiddenSize: hidden,
    numLayers: int('num_hidden_layers'),
    numHeads: int('num_attention_heads'),
    intermediateSize: int('intermediate_size'),
    positionBuckets: buckets,
    // transformers: below 1 means max_position_embeddings
    maxRelativePositions: maxRel < 1 ? int('max_position_embeddings', 512) : maxRel,
    layerNormEps: typeof hf.layer_norm_eps === 'number' ? hf.layer_norm_eps : 1e-7,
    headHidden,
  };
}

export interface LoadedPairRM {
  encoder: NativeEncoderHandle;
  tokenizer: Tokenizer;
  config: NativeEncoderConfig;
}

/**
 * Reads a PairRM directory (config.json, model.safetensors, tokenizer.json) into a new encoder
 * planned for `plan`: every tensor the encoder needs present with its shape, none it does not
 * know (but position_ids buffers), each mismatch a PairRMError naming the tensor.
 */
export async function loadPairRMEncoder(
  dir: string,
  plan: { maxBatch: number; maxSeq: number },
  device: Device = 'cpu',
  precision: PairRMPrecision = PAIRRM_DEFAULTS.precision,
): Promise<LoadedPairRM> {
  const where = pairrmPlacement(device, precision);
  const configFile = path.join(dir, 'config.json');
  if (!existsSync(configFile)) throw new PairRMError(`${dir}: no config.json`);
  if (!existsSync(path.join(dir, 'tokenizer.json'))) throw new PairRMError(`${dir}: no tokenizer.json`);
  let hf: Record<string, unknown>;
  try {
    hf = JSON.parse(await readFile(configFile, 'utf8')) as Record<string, unknown>;
  } catch (e) {
    throw new PairRMError(`${configFile}: not valid JSON (${(e as Error).message})`);
  }
  const tokenizer = await Tokenizer.fromDirectory(dir);
  const weights = await CheckpointWeights.open(dir);
  let encoder: NativeEncoderHandle | undefined;
  try {
    const head = weights.tensors.get('head_layer.1.weight');
    if (!head) throw new PairRMError(`${dir}: the checkpoint lacks 'head_layer.1.weight' (PairRM's head)`);
    const config = encoderConfigFromHf(hf, head.shape[0], configFile);
    try {
      encoder = new (native().NativeEncoder)(config, plan, where.device, where.precision);
    } catch (e) {
      throw new PairRMError(`${dir}: cannot make the ${where.precision} encoder on '${where.device}': ${(e as Error).message}`);
    }
    const expected = new Map(encoder.parameters().map((p) => [p.name, p.shape]));
    const missing = [...expected.keys()].filter((n) => !weights.tensors.has(n));
    if (missing.length > 0)
      throw new PairRMError(
        `${dir}: the checkpoint lacks ${missing.length} tensor(s) PairRM needs: ${missing.map((n) => `'${n}'`).join(', ')}`,
      );
    const unexpected = [...weights.tensors.keys()].filter((n) => !expected.has(n) && !IGNORED_TENSOR.test(n));
    if (unexpected.length > 0)
      throw new PairRMError(
        `${dir}: the checkpoint has ${unexpected.length} tensor(s) PairRM does not: ${unexpected.map((n) => `'${n}'`).join(', ')}`,
      );
    for (const [name, shape] of expected) {
      const t = weights.tensor(name);
      if (t.shape.length !== shape.length || t.shape.some((d, i) => d !== shape[i]))
        throw new PairRMError(
          `${t.file.path}: tensor '${name}' has shape [${t.shape.join(', ')}] but the config gives [${shape.join(', ')}]`,
        );
    }
    if (tokenizer.vocabSize > config.vocabSize)
      throw new PairRMError(
        `${dir}: the tokenizer has ${tokenizer.vocabSize} tokens, more than the model's vocab_size ${config.vocabSize}`,
      );
    const scratch = new ReadScratch();
    for (const name of expected.keys()) encoder.setParameter(name, await weights.readFloat32(name, scratch));
    return { encoder, tokenizer, config };
  } catch (e) {
    encoder?.dispose();
    throw e;
  } finally {
    await weights.close();
  }
}

/** Loads a PairRM directory as a judge that owns its encoder. */
export async function loadPairRM(dir: string, options: PairRMOptions = {}): Promise<PairRMJudge> {
  const plan = { maxBatch: options.batchSize ?? PAIRRM_DEFAULTS.batchSize, maxSeq: options.maxSeq ?? PAIRRM_DEFAULTS.maxSeq };
  const { encoder, tokenizer } = await loadPairRMEncoder(dir, plan, options.device, options.precision);
  try {
    return pairrmJudge(encoder, tokenizer, { label: dir, ...options });
  } catch (e) {
    encoder.dispose();
    throw e;
  }
}
