// What the judges' options share, written once: how many prompts a judge takes at once, and the
// batch and row sizes of the judges that run on the engine (lm-judge, reward-model).
import { positiveInt } from '../../config/fields.js';

/** prompts a judge takes at once (PreferenceModel.compareBatch's default concurrency) */
export const DEFAULT_JUDGE_CONCURRENCY = 4;

export const ENGINE_JUDGE_DEFAULTS = Object.freeze({
  /** rows per forward pass */
  batchSize: 8,
  /** tokens per row */
  maxSeq: 2048,
});

export const judgeConcurrency = () =>
  positiveInt()
    .default(DEFAULT_JUDGE_CONCURRENCY)
    .describe('prompts judged at once; an engine judge (lm-judge, reward-model) pools their rows into shared forward passes');

export const engineJudgeBatchSize = (what: string) =>
  positiveInt().default(ENGINE_JUDGE_DEFAULTS.batchSize).describe(`${what} rows per forward pass`);

export const engineJudgeMaxSeq = (what: string, cut: string) =>
  positiveInt()
    .default(ENGINE_JUDGE_DEFAULTS.maxSeq)
    .describe(`${what} tokens per row, at most the judge model's max_position_embeddings; ${cut}`);
