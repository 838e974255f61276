// A judge that is a scalar reward model on the engine: a Llama-family sequence classifier in the
// Hugging Face layout (LlamaForSequenceClassification / MistralForSequenceClassification /
// Qwen2ForSequenceClassification with num_labels 1: the backbone `model.*` and `score.weight`
// of shape (1, hidden), no lm_head). A response's reward is r = score · h, h the final hidden
// state (after the last RMSNorm) at the last token of the conversation [user: prompt,
// assistant: response] formatted by the tokenizer's chat template; P_ij = σ((r_i − r_j)/τ),
// P_ii = ½. Each distinct response is scored once per prompt (K rows, not K² questions); the
// rows of `concurrency` prompts at a time are sorted by length and right-padded: a causal
// model's last real position never sees padding. A non-finite reward is an unusable verdict:
// every pair with that response scores ½, and it counts against maxUnusableFraction.
import { existsSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { Model, type Device } from '../engine/model.js';
import type { ModelConfig } from '../engine/types.js';
import { ConfigError, engineConfigFromHf, type HfConfig } from '../io/hf-config.js';
import { ReadScratch } from '../io/safetensors.js';
import { Tokenizer } from '../io/tokenizer.js';
import { CheckpointWeights } from '../io/weights.js';
import { judgeInGroups, projectLastTokens, type EngineJudgeOptions } from './last-token.js';
import { fromUpperTriangle } from './matrix.js';
import { checkTimeout, definePreferenceModel, type CompareItem, type Judgment, type PreferenceModel } from './model.js';
import { DEFAULT_JUDGE_CONCURRENCY, ENGINE_JUDGE_DEFAULTS } from './options/common.js';
import { REWARD_MODEL_DEFAULTS } from './options/reward-model.js';

export class RewardModelError extends Error {
  override name = 'RewardModelError';
}

/** id default: `reward-model(<label>,τ=<temperature>)`. */
export interface RewardModelOptions extends EngineJudgeOptions {
  /** τ of P_ij = σ((r_i − r_j)/τ); default REWARD_MODEL_DEFAULTS.temperature */
  temperature?: number;
}

export interface RewardModelStats {
  /** (prompt, response) rows scored */
  scored: number;
  /** forward passes run */
  forwards: number;
  /** conversations cut to maxSeq tokens */
  truncated: number;
}

export interface RewardModelJudge extends PreferenceModel {
  readonly stats: RewardModelStats;
  readonly temperature: number;
  /** The token ids of the conversation [user: prompt, assistant: response] (after truncation). */
  conversationIds(prompt: string, response: string): number[];
  /** The reward of each response to the prompt (batched like compare). */
  rewards(prompt: string, responses: readonly string[], options?: { signal?: AbortSignal }): Promise<number[]>;
}

/** σ(x) = 1 / (1 + e^−x), without overflow. */
function sigmoid(x: number): number {
  if (x >= 0) return 1 / (1 + Math.exp(-x));
  const e = Math.exp(x);
  return e / (1 + e);
}

/** The judge over a backbone model, its tokenizer and the score row already loaded. */
export function rewardModelJudge(
  model: Model,
  tokenizer: Tokenizer,
  score: ArrayLike<number>,
  options: RewardModelOptions = {},
): RewardModelJudge {
  const tau = options.temperature ?? REWARD_MODEL_DEFAULTS.temperature;
  if (!(typeof tau === 'number' && Number.isFinite(tau) && tau > 0))
    throw new RangeError(`reward-model: temperature must be a finite number > 0, got ${tau}`);
  const batchSize = options.batchSize ?? REWARD_MODEL_DEFAULTS.batchSize;
  const maxSeq = options.maxSeq ?? REWARD_MODEL_DEFAULTS.maxSeq;
  for (const [v, what] of [
    [batchSize, 'batchSize'],
    [maxSeq, 'maxSeq'],
  ] as const)
    if (!Number.isInteger(v) || v < 2) throw new RangeError(`reward-model: ${what} must be an integer ≥ 2, got ${v}`);
  if (tokenizer.chatTemplates.size === 0)
    throw new RangeError('reward-model: the tokenizer has no chat template (the conversation cannot be formatted)');
  const hidden = model.config.hidden_size;
  if (score.length !== hidden)
    throw new RangeError(`reward-model: the score row has ${score.length} values, the model's hidden size is ${hidden}`);
  const w = Float64Array.from(score);

  const id = options.id ?? `reward-model(${options.label ?? 'model'},τ=${tau})`;
  const concurrency = options.concurrency ?? DEFAULT_JUDGE_CONCURRENCY;
  const timeoutMs = checkTimeout(options.callTimeoutMs ?? ENGINE_JUDGE_DEFAULTS.callTimeoutMs, 'reward-model: callTimeoutMs');
  const stats: RewardModelStats = { scored: 0, forwards: 0, truncated: 0 };
  const bos = tokenizer.bosTokenId;

  function conversationIds(prompt: string, response: string): number[] {
    const ids = tokenizer.encodeChat(
      [
        { role: 'user', content: prompt },
        { role: 'assistant', content: response },
      ],
      { addGenerationPrompt: false },
    );
    if (ids.length <= maxSeq) return ids;
    stats.truncated++;
    const keepFirst = bos !== undefined && ids[0] === bos ? 1 : 0;
    return [...ids.slice(0, keepFirst), ...ids.slice(ids.length - (maxSeq - keepFirst))];
  }

  /** Every item's rewards, each distinct response scored once. */
  async function score_(items: readonly CompareItem[], signal?: AbortSignal): Promise<number[][]> {
    const rows: { ids: number[] }[] = [];
    const rowOf = items.map(({ prompt, responses }) => {
      const seen = new Map<string, number>();
      return responses.map((r) => {
        let n = seen.get(r);
        if (n === undefined) {
          n = rows.length;
          rows.push({ ids: conversationIds(prompt, r) });
          seen.set(r, n);
        }
        return n;
      });
    });
    const reward = (
      await projectLastTokens(
        model,
        rows.map((r) => r.ids),
        [w],
        batchSize,
        { signal, onForward: () => stats.forwards++, judgeId: id, timeoutMs },
      )
    ).map((x) => x[0]);
    stats.scored += rows.length;
    return rowOf.map((ns) => ns.map((n) => reward[n]));
  }

  /** P from one prompt's rewards; a non-finite reward is an unusable verdict, and each of its pairs ½. */
  const judgment = (r: readonly number[], responses: readonly string[]): Judgment => {
    const bad = r.map((x) => !Number.isFinite(x));
    const unusable: string[] = [];
    const scored = new Set<string>();
    responses.forEach((text, i) => {
      if (scored.has(text)) return; // a duplicate was scored once, with its first copy
      scored.add(text);
      if (bad[i]) unusable.push(`response ${i}: a non-finite reward (${r[i]})`);
    });
    const P = fromUpperTriangle(r.length, (i, j) => (bad[i] || bad[j] || r[i] === r[j] ? undefined : sigmoid((r[i] - r[j]) / tau)));
    return { P, verdicts: scored.size, unusable };
  };

  const pm = definePreferenceModel({
    id,
    concurrency,
    maxUnusableFraction: options.maxUnusableFraction,
    async compare(prompt, responses, { signal }) {
      return judgment((await score_([{ prompt, responses }], signal))[0], responses);
    },
    compareBatch: (items, batchOptions) =>
      judgeInGroups(items, concurrency, batchOptions, async (group, signal) =>
        (await score_(group, signal)).map((r, n) => judgment(r, group[n].responses)),
      ),
    async dispose() {
      if (options.ownsModel) await model.dispose();
    },
  });
  async function rewards(prompt: string, responses: readonly string[], opts: { signal?: AbortSignal } = {}): Promise<number[]> {
    if (pm.disposed) throw new Error('reward-model: the judge has been disposed');
    return (await score_([{ prompt, responses }], opts.signal))[0];
  }
  return Object.assign(pm, { stats, temperature: tau, conversationIds, rewards });
}

const CAUSAL: Record<string, string> = {
  LlamaForSequenceClassification: 'LlamaForCausalLM',
  MistralForSequenceClassification: 'MistralForCausalLM',
  Qwen2ForSequenceClassification: 'Qwen2ForCausalLM',
};
const IGNORED_TENSOR = /(^|\.)rotary_emb\.inv_freq$/;
const SCORE = 'score.weight';

/**
 * A sequence-classification config.json → the config of its causal backbone (architecture
 * renamed, the classification fields checked and dropped), or a RewardModelError naming what
 * does not fit. num_labels is config.json's, else the size of id2label, else transformers'
 * default (2).
 */
export function backboneConfigFromSeqCls(hf: HfConfig, label = 'config.json'): HfConfig {
  const fail = (m: string): never => {
    throw new RewardModelError(`${label}: ${m}`);
  };
  if (typeof hf !== 'object' || hf === null || Array.isArray(hf)) fail('must be a JSON object');
  const list = hf.architectures;
  if (!Array.isArray(list) || list.length !== 1 || typeof list[0] !== 'string' || !(list[0] in CAUSAL))
    fail(`architectures must be one of ${Object.keys(CAUSAL).join(', ')} (a reward model), got ${JSON.stringify(list)}`);
  const arch = (list as string[])[0];
  const id2label = hf.id2label;
  const fromLabels = typeof id2label === 'object' && id2label !== null ? Object.keys(id2label).length : undefined;
  const numLabels = hf.num_labels ?? fromLabels ?? 2;
  if (numLabels !== 1) fail(`num_labels must be 1 (a scalar reward), got ${JSON.stringify(numLabels)}`);
  const { num_labels: _n, id2label: _i, label2id: _l, problem_type: _p, ...rest } = hf;
  return { ...rest, architectures: [CAUSAL[arch]] };
}

export interface LoadedRewardModel {
  model: Model;
  tokenizer: Tokenizer;
  /** score.weight's one row (hidden values) */
  score: Float32Array;
}

/** Reads a sequence-classification directory: the backbone into a new engine model, and score.weight. */
export async function loadRewardModelWeights(
  dir: string,
  plan: { maxBatch: number; maxSeq: number },
  device?: Device,
): Promise<LoadedRewardModel> {
  const configFile = path.join(dir, 'config.json');
  if (!existsSync(configFile)) throw new RewardModelError(`${dir}: no config.json`);
  let hf: HfConfig;
  try {
    hf = JSON.parse(await readFile(configFile, 'utf8')) as HfConfig;
  } catch (e) {
    throw new RewardModelError(`${configFile}: not valid JSON (${(e as Error).message})`);
  }
  const backbone = backboneConfigFromSeqCls(hf, configFile);
  let config: ModelConfig;
  try {
    ({ config } = engineConfigFromHf(backbone, { maxSeq: plan.maxSeq, training: false, label: configFile }));
  } catch (e) {
    if (e instanceof ConfigError) throw new RewardModelError(e.message);
    throw e;
  }
  // Tied: the engine then has no lm_head of its own (logits are never read, only hidden states).
  config.tie_word_embeddings = true;
  if (!existsSync(path.join(dir, 'tokenizer.json'))) throw new RewardModelError(`${dir}: no tokenizer.json`);
  const tokenizer = await Tokenizer.fromDirectory(dir);
  const weights = await CheckpointWeights.open(dir);
  let model: Model | undefined;
  try {
    model = Model.create(config, plan, { initialize: false, device });
    const expected = new Map(model.params().map((p) => [p.name, p.shape]));
    const missing = [...expected.keys(), SCORE].filter((n) => !weights.tensors.has(n));
    if (missing.length > 0)
      throw new RewardModelError(
        `${dir}: the checkpoint lacks ${missing.length} tensor(s) a reward model needs: ${missing.map((n) => `'${n}'`).join(', ')}`,
      );
    const unexpected = [...weights.tensors.keys()].filter((n) => !expected.has(n) && n !== SCORE && !IGNORED_TENSOR.test(n));
    if (unexpected.length > 0)
      throw new RewardModelError(
        `${dir}: the checkpoint has ${unexpected.length} tensor(s) a reward model does not: ${unexpected.map((n) => `'${n}'`).join(', ')}`,
      );
    for (const [name, shape] of [...expected, [SCORE, [1, config.hidden_size]] as const]) {
      const t = weights.tensor(name);
      if (t.shape.length !== shape.length || t.shape.some((d, i) => d !== shape[i]))
        throw new RewardModelError(
          `${t.file.path}: tensor '${name}' has shape [${t.shape.join(', ')}] but the config gives [${shape.join(', ')}]`,
        );
    }
    const scratch = new ReadScratch();
    for (const name of expected.keys()) model.setParam(name, await weights.readFloat32(name, scratch));
    const score = Float32Array.from(await weights.readFloat32(SCORE));
    return { model, tokenizer, score };
  } catch (e) {
    await model?.dispose();
    throw e;
  } finally {
    await weights.close();
  }
}

/** Loads a Hugging Face sequence-classification directory (with tokenizer.json) as a judge that owns its model. */
export async function loadRewardModel(
  dir: string,
  { device, ...options }: Omit<RewardModelOptions, 'ownsModel'> & { device?: Device } = {},
): Promise<RewardModelJudge> {
  const batchSize = options.batchSize ?? REWARD_MODEL_DEFAULTS.batchSize;
  const maxSeq = options.maxSeq ?? REWARD_MODEL_DEFAULTS.maxSeq;
  const { model, tokenizer, score } = await loadRewardModelWeights(dir, { maxBatch: batchSize, maxSeq }, device);
  try {
    return rewardModelJudge(model, tokenizer, score, { label: dir, ...options, batchSize, maxSeq, ownsModel: true });
  } catch (err) {
    await model.dispose();
    throw err;
  }
}
