// What each stage file of the run directory holds, as zod schemas: a resumed run reads every
// stage file back through its schema, so a file of the wrong shape is refused with its path and
// the field at fault, never used half-way (`ev.samples.map is not a function`). Objects are
// loose: a field a newer version adds passes through.
import { z } from 'zod';
import { formatFieldPath } from '../config/errors.js';
import type { PreferenceExample, PreferencePair } from '../engine/types.js';
import type { TrainingSet } from './dataset.js';

export type StageName = 'base' | 'base-eval' | 'generate' | 'judge' | 'dataset' | 'train' | 'evaluate';

/** Every stage in the order a run does them: π_0's two, then each iteration's five. */
export const BASE_STAGES: readonly StageName[] = ['base', 'base-eval'];
export const ITERATION_STAGES: readonly StageName[] = ['generate', 'judge', 'dataset', 'train', 'evaluate'];

/** A stage's output and how long it took: what a stage file holds. */
export interface StageOutput<T> {
  value: T;
  seconds: number;
}

export interface Sample {
  prompt: string;
  answer: string;
  tokens: number[];
}

export interface Interval {
  mean: number;
  /** 95% normal-approximation confidence interval */
  low: number;
  high: number;
  n: number;
}

/** base-eval and evaluate: the held-out samples and their win rates. */
export interface EvalFile {
  samples: Sample[];
  winRateVsBase: Interval;
  winRateVsPrevious?: Interval;
}

/** generate: the iteration's prompts and K responses per prompt. */
export interface Generations {
  prompts: { text: string; ids: number[] }[];
  /** prompt-major, K per prompt */
  responses: { tokens: number[]; logprobs: number[]; text: string; stopReason: string }[][];
}

/** judge: the judge's K×K matrix per prompt. */
export interface Judgments {
  preference: number[][][];
  /** the verdicts behind them, and how many were unusable (scored ½); absent in files of older versions */
  verdicts?: number;
  unusable?: number;
}

/** train: the optimizer steps taken. */
export interface TrainFile {
  steps: { step: number; loss: number; lr?: number; gradNorm?: number; metrics: Record<string, number> }[];
}

/** The value of each stage's file. */
export interface StageValues {
  /** what makeBase returned (e.g. supervised fine-tuning's steps and loss) */
  base: Record<string, unknown>;
  'base-eval': EvalFile;
  generate: Generations;
  judge: Judgments;
  dataset: TrainingSet;
  train: TrainFile;
  evaluate: EvalFile;
}

const int = z.number().int();
const ints = z.array(int);
const numbers = z.array(z.number());
const matrix = z.array(numbers);

const interval = z.looseObject({ mean: z.number(), low: z.number(), high: z.number(), n: z.number() });
const evalFile: z.ZodType<EvalFile> = z.looseObject({
  samples: z.array(z.looseObject({ prompt: z.string(), answer: z.string(), tokens: ints })),
  winRateVsBase: interval,
  winRateVsPrevious: interval.optional(),
});
const generations: z.ZodType<Generations> = z.looseObject({
  prompts: z.array(z.looseObject({ text: z.string(), ids: ints })),
  responses: z.array(z.array(z.looseObject({ tokens: ints, logprobs: numbers, text: z.string(), stopReason: z.string() }))),
});
const response = { response: ints, refLogp: z.number(), target: z.number().optional() };
const pair: z.ZodType<PreferencePair> = z.looseObject({
  prompt: ints,
  chosen: z.looseObject(response),
  rejected: z.looseObject(response),
  q: z.number().optional(),
});
const example: z.ZodType<PreferenceExample> = z.looseObject({ prompt: ints, ...response });
const stats = z.looseObject({
  prompts: int,
  skippedTies: int,
  meanChosenWinRate: z.number().optional(),
  meanRejectedWinRate: z.number().optional(),
  meanResponseTokens: z.number(),
});
const trainingSet: z.ZodType<TrainingSet> = z.discriminatedUnion('mode', [
  z.looseObject({
    mode: z.literal('pair'),
    pairs: z.array(pair),
    sources: z.array(z.looseObject({ prompt: int, chosen: int, rejected: int })),
    skipped: ints,
    winRates: matrix,
    stats,
  }),
  z.looseObject({ mode: z.literal('all'), examples: z.array(example), winRates: matrix, stats }),
]);

/** The schema of each stage file's value. */
export const STAGE_VALUE_SCHEMAS: { [S in StageName]: z.ZodType<StageValues[S]> } = {
  base: z.record(z.string(), z.unknown()),
  'base-eval': evalFile,
  generate: generations,
  judge: z.looseObject({ preference: z.array(matrix), verdicts: int.nonnegative().optional(), unusable: int.nonnegative().optional() }),
  dataset: trainingSet,
  train: z.looseObject({
    steps: z.array(
      z.looseObject({
        step: int,
        loss: z.number(),
        lr: z.number().optional(),
        gradNorm: z.number().optional(),
        metrics: z.record(z.string(), z.number()),
      }),
    ),
  }),
  evaluate: evalFile,
};

/** The first problem zod found, as `value.samples[3].tokens: expected array, got string` (and how many more). */
export function describeIssues(error: z.ZodError, prefix: readonly PropertyKey[] = []): string {
  const [first] = error.issues;
  const at = formatFieldPath([...prefix, ...first.path]);
  const detail = first.message.replace(/^Invalid input: /, '').replace('received', 'got');
  const more = error.issues.length > 1 ? ` (and ${error.issues.length - 1} more)` : '';
  return `${at}: ${detail}${more}`;
}
