// A pairwise judge that is a causal LM on the engine: the judge template (the HTTP judge's, by
// default) through the judge tokenizer's chat template, and P(first ≻ second) read from the
// next-token distribution as the two answer tokens' probabilities renormalised,
// p = exp(l_A) / (exp(l_A) + exp(l_B)). Both orders are averaged as in the HTTP judge,
// P_ij = ½(q(i, j) + 1 − q(j, i)), and every ordered pair of `concurrency` prompts at a time
// goes through Model.forward in batches of rows sorted by length (right padding: a causal
// model's last real position never sees it). Only the final hidden states are taken from the engine; the two
// answer tokens' logits are their dot products with those tokens' output-head rows, so a batch
// costs (batch, seq, hidden) floats rather than (batch, seq, vocab). A question whose two
// logits are not finite is an unusable verdict (scored ½, counted against maxUnusableFraction).
import { createHash } from 'node:crypto';
import type { Device, Model } from '../engine/model.js';
import { loadPretrained } from '../io/checkpoint.js';
import type { Tokenizer } from '../io/tokenizer.js';
import { renderJudgeTemplate } from './http.js';
import { judgeInGroups, projectLastTokens, type EngineJudgeOptions } from './last-token.js';
import { fromUpperTriangle } from './matrix.js';
import { checkTimeout, definePreferenceModel, type CompareItem, type Judgment, type PreferenceModel } from './model.js';
import { DEFAULT_JUDGE_CONCURRENCY, ENGINE_JUDGE_DEFAULTS } from './options/common.js';
import { DEFAULT_JUDGE_TEMPLATE, missingPlaceholders } from './options/http.js';
import { LM_JUDGE_DEFAULTS } from './options/lm-judge.js';

/** id default: `lm-judge(<label>,<hash of template and answer tokens>)`. */
export interface LmJudgeOptions extends EngineJudgeOptions {
  /** the user message, with {prompt}, {a} (shown first) and {b}; default DEFAULT_JUDGE_TEMPLATE */
  template?: string;
  /** next tokens meaning 'first is better' and 'second is better'; default LM_JUDGE_DEFAULTS.answerTokens */
  answerTokens?: readonly [string, string];
  /** format the question through the tokenizer's chat template (with the generation prompt); default LM_JUDGE_DEFAULTS.chatTemplate */
  chatTemplate?: boolean;
}

export interface LmJudgeStats {
  /** ordered comparisons scored */
  comparisons: number;
  /** forward passes run */
  forwards: number;
  /** questions cut to maxSeq tokens */
  truncated: number;
}

export interface LmJudge extends PreferenceModel {
  readonly stats: LmJudgeStats;
  /** the token ids read as 'first is better' and 'second is better' */
  readonly answerIds: readonly [number, number];
  /** The token ids of the question that asks whether `first` beats `second` (after truncation). */
  questionIds(prompt: string, first: string, second: string): number[];
}

/** A vocabulary entry as given, else text that encodes (without special tokens) to exactly one id. */
function answerId(tokenizer: Tokenizer, token: string): number {
  const direct = tokenizer.tokenId(token);
  if (direct !== undefined) return direct;
  const ids = tokenizer.encode(token, { addSpecialTokens: false });
  if (ids.length !== 1)
    throw new RangeError(
      `lm-judge: the answer token ${JSON.stringify(token)} is not one token of the judge's vocabulary (it encodes to ${ids.length} tokens)`,
    );
  return ids[0];
}

/** p = exp(a) / (exp(a) + exp(b)), computed without overflow. */
export function twoWaySoftmax(a: number, b: number): number {
  return 1 / (1 + Math.exp(b - a));
}

/** The judge over a model and tokenizer already loaded. */
export function lmJudge(model: Model, tokenizer: Tokenizer, options: LmJudgeOptions = {}): LmJudge {
  const template = options.template ?? DEFAULT_JUDGE_TEMPLATE;
  const missing = missingPlaceholders(template);
  if (missing.length > 0) throw new RangeError(`lm-judge: the template lacks ${missing.join(', ')}`);
  const useChat = options.chatTemplate ?? LM_JUDGE_DEFAULTS.chatTemplate;
  if (useChat && tokenizer.chatTemplates.size === 0)
    throw new RangeError('lm-judge: the judge tokenizer has no chat template (add one, or set chatTemplate: false)');
  const [tokA, tokB] = options.answerTokens ?? LM_JUDGE_DEFAULTS.answerTokens;
  const answerIds: [number, number] = [answerId(tokenizer, tokA), answerId(tokenizer, tokB)];
  if (answerIds[0] === answerIds[1]) throw new RangeError(`lm-judge: both answer tokens are token ${answerIds[0]}`);
  const batchSize = options.batchSize ?? LM_JUDGE_DEFAULTS.batchSize;
  const maxSeq = options.maxSeq ?? LM_JUDGE_DEFAULTS.maxSeq;
  for (const [v, what] of [
    [batchSize, 'batchSize'],
    [maxSeq, 'maxSeq'],
  ] as const)
    if (!Number.isInteger(v) || v < 2) throw new RangeError(`lm-judge: ${what} must be an integer ≥ 2, got ${v}`);

  const { vocab_size: vocab, hidden_size: hidden } = model.config;
  for (const id of answerIds)
    if (id >= vocab)
      throw new RangeError(`lm-judge: answer token id ${id} is outside the model's vocabulary (${vocab}): a tokenizer of another model?`);
  // The output head's rows for the two answer tokens (the embedding when tied), in float64.
  const head = model.getParam(model.config.tie_word_embeddings ? 'model.embed_tokens.weight' : 'lm_head.weight');
  const rows = answerIds.map((id) => Float64Array.from(head.subarray(id * hidden, (id + 1) * hidden)));

  const hash = createHash('sha256')
    .update(JSON.stringify([template, answerIds, useChat]))
    .digest('hex')
    .slice(0, 12);
  const id = options.id ?? `lm-judge(${options.label ?? 'model'},${hash})`;
  const concurrency = options.concurrency ?? DEFAULT_JUDGE_CONCURRENCY;
  const timeoutMs = checkTimeout(options.callTimeoutMs ?? ENGINE_JUDGE_DEFAULTS.callTimeoutMs, 'lm-judge: callTimeoutMs');
  const stats: LmJudgeStats = { comparisons: 0, forwards: 0, truncated: 0 };
  const bos = tokenizer.bosTokenId;

  function questionIds(prompt: string, first: string, second: string): number[] {
    const content = renderJudgeTemplate(template, prompt, first, second);
    const ids = useChat ? tokenizer.encodeChat([{ role: 'user', content }], { addGenerationPrompt: true }) : tokenizer.encode(content);
    if (ids.length <= maxSeq) return ids;
    stats.truncated++;
    const keepFirst = bos !== undefined && ids[0] === bos ? 1 : 0;
    return [...ids.slice(0, keepFirst), ...ids.slice(ids.length - (maxSeq - keepFirst))];
  }

  /** q for every ordered pair of every item: the items' matrices. */
  async function judge(items: readonly CompareItem[], signal?: AbortSignal): Promise<Judgment[]> {
    const questions: { item: number; i: number; j: number; ids: number[] }[] = [];
    items.forEach(({ prompt, responses }, item) => {
      for (let i = 0; i < responses.length; i++)
        for (let j = 0; j < responses.length; j++)
          if (i !== j && responses[i] !== responses[j])
            questions.push({ item, i, j, ids: questionIds(prompt, responses[i], responses[j]) });
    });
    const logits = await projectLastTokens(
      model,
      questions.map((x) => x.ids),
      rows,
      batchSize,
      { signal, onForward: () => stats.forwards++, judgeId: id, timeoutMs },
    );
    stats.comparisons += questions.length;
    // qOf[item][i][j]: the answer to "is i better than j?", asked in that order (½ when unusable)
    const qOf = items.map(({ responses }) => responses.map(() => new Array<number>(responses.length).fill(NaN)));
    const unusable = items.map((): string[] => []);
    const asked = items.map(() => 0);
    questions.forEach((x, n) => {
      asked[x.item]++;
      const [la, lb] = logits[n];
      const usable = Number.isFinite(la) && Number.isFinite(lb);
      qOf[x.item][x.i][x.j] = usable ? twoWaySoftmax(la, lb) : 0.5;
      if (!usable) unusable[x.item].push(`responses ${x.i} and ${x.j} (${x.i} shown first): non-finite answer-token logits (${la}, ${lb})`);
    });
    return items.map(({ responses }, item) => ({
      P: fromUpperTriangle(responses.length, (i, j) =>
        responses[i] === responses[j] ? undefined : (qOf[item][i][j] + 1 - qOf[item][j][i]) / 2,
      ),
      verdicts: asked[item],
      unusable: unusable[item],
    }));
  }

  const pm = definePreferenceModel({
    id,
    concurrency,
    maxUnusableFraction: options.maxUnusableFraction,
    async compare(prompt, responses, { signal }) {
      return (await judge([{ prompt, responses }], signal))[0];
    },
    compareBatch: (items, batchOptions) => judgeInGroups(items, concurrency, batchOptions, judge),
    async dispose() {
      if (options.ownsModel) await model.dispose();
    },
  });
  return Object.assign(pm, { stats, answerIds, questionIds });
}

/** Loads a Hugging Face causal LM directory (with tokenizer.json) as a judge that owns its model. */
export async function loadLmJudge(
  dir: string,
  { device, ...options }: Omit<LmJudgeOptions, 'ownsModel'> & { device?: Device } = {},
): Promise<LmJudge> {
  const batchSize = options.batchSize ?? LM_JUDGE_DEFAULTS.batchSize;
  const maxSeq = options.maxSeq ?? LM_JUDGE_DEFAULTS.maxSeq;
  const { model, tokenizer } = await loadPretrained(dir, { maxBatch: batchSize, maxSeq }, { training: false, device });
  try {
    if (!tokenizer) throw new RangeError(`lm-judge: ${dir} has no tokenizer.json`);
    return lmJudge(model, tokenizer, { label: dir, ...options, batchSize, maxSeq, ownsModel: true });
  } catch (err) {
    await model.dispose();
    throw err;
  }
}
