// What the judges' options share, written once: how many prompts a judge takes at once, how many
// unusable verdicts a stage accepts, the time limit of one call into a judge, and the batch and
// row sizes of the judges that run on the engine (lm-judge, reward-model).
import { positiveInt, probability } from '../../config/fields.js';

/** prompts a judge takes at once (PreferenceModel.compareBatch's default concurrency) */
export const DEFAULT_JUDGE_CONCURRENCY = 4;

/** the fraction of a call's verdicts that may be unusable (PreferenceModel.maxUnusableFraction's default) */
export const DEFAULT_MAX_UNUSABLE_FRACTION = 0.05;

export const maxUnusableFraction = () =>
  probability()
    .default(DEFAULT_MAX_UNUSABLE_FRACTION)
    .describe(
      'the largest fraction of a stage’s verdicts that may be unusable (an answer that names neither response, a non-finite logprob or reward, a function value outside [0, 1]); each is scored ½ and counted, and a stage with more fails',
    );

/** A call into a judge that has not settled by then fails, naming the judge: `what` says what one call is. */
export const callTimeoutMs = (defaultMs: number, what: string) =>
  positiveInt()
    .default(defaultMs)
    .describe(`time limit in milliseconds of ${what}; a call that has not settled by then fails the stage with an error naming the judge`);

export const ENGINE_JUDGE_DEFAULTS = Object.freeze({
  /** rows per forward pass */
  batchSize: 8,
  /** tokens per row */
  maxSeq: 2048,
  /** one forward pass, in ms: a guard against a pass that never ends, not a speed limit (a large judge on a CPU is slow) */
  callTimeoutMs: 30 * 60_000,
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

/** The fields every engine judge (lm-judge, reward-model) has: `what` names its rows, `cut` says how a long one is cut. */
export const engineJudgeFields = (what: string, cut: string) => ({
  batchSize: engineJudgeBatchSize(what),
  maxSeq: engineJudgeMaxSeq(what, cut),
  concurrency: judgeConcurrency(),
  callTimeoutMs: callTimeoutMs(ENGINE_JUDGE_DEFAULTS.callTimeoutMs, 'one forward pass of the judge model'),
  maxUnusableFraction: maxUnusableFraction(),
});
