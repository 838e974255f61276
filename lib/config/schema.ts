// The run configuration: one zod schema with the reference's defaults (uclaml/SPPO on
// Mistral-7B-Instruct: RMSprop, lr 5e-7, linear schedule with 10% warm-up, η = 1000, K = 5,
// temperature 0.7, top-p 0.9, 3 iterations, global batch 64 = 8 × 8, one epoch per iteration,
// seed 42). Unknown fields are refused everywhere; errors name the field's path; every field says
// what it is for (.describe, for z.toJSONSchema). Each judge's section is that judge's own options
// schema (lib/preference/options). A leaf: nothing here imports a pipeline module
// (test/import-graph.test.ts), so a config can be checked without the engine.
import { z } from 'zod';
import { datasetModeForLoss, PREFERENCE_LOSSES } from '../engine/losses.js';
import { LORA_TARGETS } from '../engine/lora.js';
import { functionJudgeOptionsSchema } from '../preference/options/function.js';
import { httpJudgeOptionsSchema } from '../preference/options/http.js';
import { lmJudgeOptionsSchema } from '../preference/options/lm-judge.js';
import { pairrmOptionsSchema } from '../preference/options/pairrm.js';
import { pairwiseHttpOptionsSchema } from '../preference/options/pairwise-http.js';
import { rewardModelOptionsSchema } from '../preference/options/reward-model.js';
import { styledReversalOptionsSchema } from '../preference/options/styled-reversal.js';
import { filePath, nonEmpty, nonNegative, nonNegativeInt, positive, positiveInt, probability } from './fields.js';

/**
 * Counts of things a run holds in memory at once, bounded so that a typo (1e9) is refused here
 * rather than aborting V8 later. data.words: a million generated words take about 30 MB and two
 * seconds (the demo uses 3000; UltraFeedback has 60k prompts). sft.examples: each supervised row
 * takes about 0.5 KB as token arrays, so 100k rows are about 50 MB (the demo uses 4000).
 */
export const MAX_WORDS = 1_000_000;
export const MAX_SFT_EXAMPLES = 100_000;

/** float32's largest finite value and smallest normal one: the engine keeps optimizer constants in float32. */
const FLOAT32_MAX = 3.4028234663852886e38;
const FLOAT32_MIN_NORMAL = 1.1754943508222875e-38;

/** A decay rate of a moving average (RMSprop's α, AdamW's β): in [0, 1), as the engine requires. */
const decayRate = () => nonNegative().lt(1, { error: 'must be < 1 (a moving average that never forgets never moves)' });

const modelSchema = z
  .strictObject({
    preset: z
      .enum(['demo', 'tiny', 'small'])
      .optional()
      .describe(
        "a built-in model with random weights: 'demo', the embedded styled-reversal policy with its character tokenizer (the engine's 'tiny' and 'small' sizes have no tokenizer, so a run refuses them)",
      ),
    path: filePath().optional().describe('a Hugging Face model directory (config.json, *.safetensors, tokenizer.json and a chat template)'),
    seed: nonNegativeInt().optional().describe("seed of a preset's random initialisation"),
  })
  .refine((m) => (m.preset === undefined) !== (m.path === undefined), {
    error: 'give exactly one of preset and path',
  })
  .describe('the policy: give exactly one of preset and path');

const dataSchema = z
  .strictObject({
    prompts: filePath().optional().describe('a JSONL or Parquet prompt file'),
    words: positiveInt()
      .max(MAX_WORDS, { error: `must be ≤ ${MAX_WORDS.toLocaleString('en')} (the words are generated and held in memory)` })
      .optional()
      .describe(`instead of a file: this many generated styled-reversal words (the synthetic task), at most ${MAX_WORDS}`),
    column: nonEmpty().default('prompt').describe('the prompt column (a JSONL field or a Parquet column)'),
    format: z.enum(['jsonl', 'parquet']).optional().describe("the prompt file's format; default: from its extension"),
    evalSize: nonNegativeInt().default(100).describe('held-out prompts for evaluation against the base policy'),
    promptsPerIteration: positiveInt()
      .optional()
      .describe('prompts per iteration; default: all remaining prompts, split evenly over the iterations'),
    maxPromptTokens: positiveInt()
      .default(512)
      .describe("prompt tokens kept (truncated from the left), as the reference's max_prompt_length"),
  })
  .refine((d) => (d.prompts === undefined) !== (d.words === undefined), {
    error: 'give exactly one of prompts (a file) and words (generated styled-reversal prompts)',
  })
  .describe('the prompts: give exactly one of prompts and words');

const generationSchema = z
  .strictObject({
    samplesPerPrompt: z
      .int({ error: 'must be an integer' })
      .min(2, { error: 'must be an integer ≥ 2 (a pair needs two responses)' })
      .default(5)
      .describe('K: responses sampled per prompt'),
    temperature: nonNegative().default(0.7).describe('sampling temperature; 0 is greedy'),
    topP: positive()
      .max(1, { error: 'must be ≤ 1' })
      .default(0.9)
      .describe('nucleus sampling: the smallest set of tokens with this much probability'),
    topK: nonNegativeInt().default(0).describe('sample among the K most likely tokens; 0 keeps every token'),
    maxNewTokens: positiveInt()
      .default(2048)
      .describe('tokens generated per response at most (the reference samples up to 2048; training then truncates to training.maxLength)'),
    maxBatch: positiveInt().default(16).describe('sequences decoded together'),
    kvCacheBytes: positiveInt()
      .optional()
      .describe(
        "bytes of the generator's paged KV-cache pool (rounded down to whole blocks of 16 positions); default room for maxBatch sequences of the model's context. The sequences in flight adapt to the pool: when it is full they wait, and only a sequence that alone needs more than the pool is refused",
      ),
    packWeights: z
      .boolean({ error: 'must be true or false' })
      .optional()
      .describe(
        "on the CPU, keep a copy of the policy's weights in the GEMM's packed layout for the decode steps (the weights' size again; decoding is faster, results identical); default true, false saves the memory",
      ),
  })
  // packWeights: true spelt out is the default left out, so both hash alike
  .transform((g) => ({ ...g, packWeights: g.packWeights === true ? undefined : g.packWeights }))
  .describe('sampling the responses');

const preferenceSchema = z
  .discriminatedUnion(
    'kind',
    [
      styledReversalOptionsSchema,
      functionJudgeOptionsSchema,
      httpJudgeOptionsSchema,
      pairwiseHttpOptionsSchema,
      lmJudgeOptionsSchema,
      rewardModelOptionsSchema,
      pairrmOptionsSchema,
    ],
    { error: "unknown kind (known: 'styled-reversal', 'function', 'http', 'pairwise-http', 'lm-judge', 'reward-model', 'pairrm')" },
  )
  .describe('the judge P(y ≻ y′ | x), by kind');

/** LoRA: frozen base weights, trained low-rank adapters (lib/engine/lora.ts's targets and scaling). */
const loraSchema = z
  .strictObject({
    rank: positiveInt().default(16).describe("r: the adapters' rank"),
    alpha: z
      .number({ error: 'must be a finite number' })
      .gt(0, { error: 'must be > 0' })
      .default(32)
      .describe('the adapters are scaled by alpha / rank'),
    targets: z
      .array(z.enum(LORA_TARGETS, { error: `must be one of ${LORA_TARGETS.join(', ')}` }))
      .min(1, { error: 'must list at least one projection' })
      .refine((t) => new Set(t).size === t.length, { error: 'lists a projection twice' })
      .default([...LORA_TARGETS])
      .describe('the projections of every layer that get an adapter'),
  })
  .describe('train low-rank adapters (LoRA) on a frozen base instead of every weight; absent: full fine-tuning');

const trainingSchema = z
  .strictObject({
    loss: z
      .enum(PREFERENCE_LOSSES, { error: `must be one of ${PREFERENCE_LOSSES.join(', ')}` })
      .default('sppo-pair')
      .describe(
        'the preference loss: SPPO (sppo: every response; sppo-pair, sppo-single, sppo-hard: one pair per prompt) or the DPO / IPO baselines',
      ),
    eta: positive().default(1000).describe('η of the multiplicative-weights update; β = 1/η (reference β = 0.001)'),
    mode: z
      .enum(['pair', 'all'])
      .optional()
      .describe("'pair' (one pair per prompt) or 'all' (every response); default: what the loss reads"),
    winRateDiagonal: z.enum(['include', 'exclude']).default('include').describe('P̂ with the diagonal’s ½ included (reference) or excluded'),
    optimizer: z
      .strictObject({
        kind: z.enum(['rmsprop', 'adamw']).default('rmsprop').describe('the optimizer (the reference uses RMSprop)'),
        lr: positive().default(5e-7).describe('peak learning rate'),
        weightDecay: nonNegative().default(0).describe('decoupled weight decay'),
        maxGradNorm: nonNegative().default(1).describe("global-norm gradient clipping (Hugging Face Trainer's default 1.0); 0 disables"),
        alpha: decayRate().optional().describe("RMSprop's smoothing constant, in [0, 1); default the engine's"),
        beta1: decayRate().optional().describe("AdamW's β1, in [0, 1); default the engine's"),
        beta2: decayRate().optional().describe("AdamW's β2, in [0, 1); default the engine's"),
        eps: z
          .number({ error: 'must be a number' })
          .min(FLOAT32_MIN_NORMAL, { error: `must be ≥ ${FLOAT32_MIN_NORMAL} (smaller is 0 or denormal in float32)` })
          .max(FLOAT32_MAX, { error: `must be ≤ ${FLOAT32_MAX} (larger is infinite in float32)` })
          .optional()
          .describe("the optimizer's ε, within float32's normal range; default the engine's"),
      })
      .prefault({})
      .describe('the optimizer'),
    schedule: z
      .strictObject({
        kind: z.enum(['linear', 'cosine', 'constant']).default('linear').describe('learning-rate schedule after the warm-up'),
        warmupRatio: probability().default(0.1).describe("warm-up steps as a fraction of the iteration's steps"),
      })
      .prefault({})
      .describe('the learning-rate schedule, restarted each iteration'),
    epochsPerIteration: positiveInt().default(1).describe("passes over each iteration's training set"),
    batchSize: positiveInt().default(8).describe('pairs (or examples) per micro-batch'),
    gradAccumSteps: positiveInt().default(8).describe("micro-batches per optimizer step: 8 × 8 = the reference's global batch of 64"),
    maxLength: positiveInt().default(1024).describe('prompt + response tokens per training row'),
    gradientPrecision: z
      .enum(['fp32', 'bf16'], { error: "must be 'fp32' or 'bf16'" })
      .optional()
      .describe(
        "what the gradients accumulate in over a step's micro-batches: 'bf16' halves their memory (full fine-tuning of 7-8B models on one GPU) at one rounding per micro-batch, and clipping stays exact for the stored values (docs/memory.md); default fp32",
      ),
    lora: loraSchema.optional(),
  })
  .superRefine((t, ctx) => {
    if (t.gradientPrecision === 'bf16' && t.lora)
      ctx.addIssue({
        code: 'custom',
        path: ['gradientPrecision'],
        message: "'bf16' is for full fine-tuning: LoRA adapters keep float32 gradients (they are small)",
      });
    if (t.mode !== undefined && t.mode !== datasetModeForLoss(t.loss))
      ctx.addIssue({
        code: 'custom',
        path: ['mode'],
        message: `loss '${t.loss}' needs mode '${datasetModeForLoss(t.loss)}'`,
      });
  })
  // 'fp32' spelt out is the default left out, so both hash alike (a resume sees no change)
  .transform((t) => ({
    ...t,
    mode: t.mode ?? datasetModeForLoss(t.loss),
    gradientPrecision: t.gradientPrecision === 'fp32' ? undefined : t.gradientPrecision,
  }))
  .describe('training each iteration on the judged samples');

const sftSchema = z
  .strictObject({
    steps: positiveInt().default(400).describe('optimizer steps'),
    batchSize: positiveInt().default(64).describe('supervised rows per step'),
    lr: positive().default(3e-3).describe('learning rate'),
    examples: positiveInt()
      .max(MAX_SFT_EXAMPLES, { error: `must be ≤ ${MAX_SFT_EXAMPLES.toLocaleString('en')} (the rows are held in memory)` })
      .default(4000)
      .describe(`supervised (prompt, answer) rows drawn for it, at most ${MAX_SFT_EXAMPLES}`),
    styles: z
      .strictObject({
        R: nonNegative().describe('weight of style R'),
        P: nonNegative().describe('weight of style P'),
        S: nonNegative().describe('weight of style S'),
      })
      .default({ R: 0.6, P: 0.3, S: 0.1 })
      .describe('style mix of the supervised answers: clearly exploitable, as the base policy should be'),
    corruption: probability().default(0.4).describe("probability that a supervised answer's reversal has one wrong letter"),
  })
  .describe("supervised fine-tuning that makes π_0 before the first iteration (model.preset 'demo' only)");

const runSchema = z
  .strictObject({
    dir: filePath().default('sppo-run').describe("where every stage's output and the checkpoints go; a run resumes from it"),
    iterations: positiveInt().default(3).describe('SPPO iterations'),
    seed: nonNegativeInt().default(42).describe('seed of the prompt split, sampling and training order'),
  })
  .describe('the run');

export const runConfigSchema = z
  .strictObject({
    model: modelSchema,
    data: dataSchema,
    generation: generationSchema.prefault({}),
    preference: preferenceSchema,
    training: trainingSchema.prefault({}),
    run: runSchema.prefault({}),
    sft: sftSchema.optional(),
  })
  .superRefine((c, ctx) => {
    const { preset } = c.model;
    if ((preset === 'tiny' || preset === 'small') && c.model.path === undefined)
      ctx.addIssue({
        code: 'custom',
        path: ['model', 'preset'],
        message: `model.preset '${preset}' has random weights and no tokenizer, so it cannot read prompts; use model.path (a Hugging Face directory) or model.preset 'demo'`,
      });
    if (preset === 'demo' && c.data.words === undefined)
      ctx.addIssue({
        code: 'custom',
        path: ['model', 'preset'],
        message: "the 'demo' policy reads generated styled-reversal words (data.words)",
      });
    if (c.sft !== undefined && preset !== 'demo')
      ctx.addIssue({
        code: 'custom',
        path: ['sft'],
        message: "supervised fine-tuning of the base policy is only available with model.preset 'demo'",
      });
    else if (c.sft !== undefined && c.preference.kind !== 'styled-reversal')
      ctx.addIssue({
        code: 'custom',
        path: ['sft'],
        message: "supervised fine-tuning data comes from the styled-reversal task (preference.kind 'styled-reversal')",
      });
    if (c.data.words !== undefined && c.preference.kind !== 'styled-reversal')
      ctx.addIssue({ code: 'custom', path: ['data', 'words'], message: "generated words go with preference.kind 'styled-reversal'" });
  })
  .describe('an SPPO run: the policy, its prompts, sampling, the judge, training and the run directory');

/** What a config file holds (defaults may be left out). */
export type RunConfigInput = z.input<typeof runConfigSchema>;
/** Every field filled in: what a run uses and hashes. */
export type RunConfig = z.output<typeof runConfigSchema>;
/** A resolved config's judge, by kind. */
export type PreferenceConfig = RunConfig['preference'];
