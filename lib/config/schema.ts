// The run configuration: one zod schema with the reference's defaults (uclaml/SPPO on
// Mistral-7B-Instruct: RMSprop, lr 5e-7, linear schedule with 10% warm-up, η = 1000, K = 5,
// temperature 0.7, top-p 0.9, 3 iterations, global batch 64 = 8 × 8, one epoch per iteration,
// seed 42). Unknown fields are refused everywhere; errors name the field's path.
import { z } from 'zod';
import { datasetModeForLoss, PREFERENCE_LOSSES } from '../engine/losses.js';
import { missingPlaceholders } from '../preference/options/http.js';
import { resolveStyledReversal } from '../preference/options/styled-reversal.js';

const positive = () => z.number({ error: 'must be a number' }).gt(0, { error: 'must be > 0' });
const nonNegative = () => z.number({ error: 'must be a number' }).min(0, { error: 'must be ≥ 0' });
const positiveInt = () => z.int({ error: 'must be an integer' }).min(1, { error: 'must be an integer ≥ 1' });
const nonNegativeInt = () => z.int({ error: 'must be an integer' }).min(0, { error: 'must be an integer ≥ 0' });
const probability = () => nonNegative().max(1, { error: 'must be ≤ 1' });
const path = () => z.string({ error: 'must be a path (a string)' }).min(1, { error: 'must not be empty' });

const modelSchema = z
  .strictObject({
    /**
     * a built-in model with random weights: 'demo' (the embedded styled-reversal policy with
     * its character tokenizer), or the engine's 'tiny' / 'small' sizes
     */
    preset: z.enum(['demo', 'tiny', 'small']).optional(),
    /** a Hugging Face model directory (config.json, *.safetensors, tokenizer.json) */
    path: path().optional(),
    /** seed of a preset's random initialisation */
    seed: nonNegativeInt().optional(),
  })
  .refine((m) => (m.preset === undefined) !== (m.path === undefined), {
    error: 'give exactly one of preset and path',
  });

const dataSchema = z
  .strictObject({
    /** a JSONL or Parquet prompt file */
    prompts: path().optional(),
    /** instead of a file: this many generated styled-reversal words (the synthetic task) */
    words: positiveInt().optional(),
    column: z.string().min(1, { error: 'must not be empty' }).default('prompt'),
    format: z.enum(['jsonl', 'parquet']).optional(),
    /** held-out prompts for evaluation against the base policy */
    evalSize: nonNegativeInt().default(100),
    /** default: all remaining prompts, split evenly over the iterations */
    promptsPerIteration: positiveInt().optional(),
    /** prompt tokens kept (truncated from the left), as the reference's max_prompt_length */
    maxPromptTokens: positiveInt().default(512),
  })
  .refine((d) => (d.prompts === undefined) !== (d.words === undefined), {
    error: 'give exactly one of prompts (a file) and words (generated styled-reversal prompts)',
  });

const generationSchema = z.strictObject({
  /** K */
  samplesPerPrompt: z.int({ error: 'must be an integer' }).min(2, { error: 'must be an integer ≥ 2 (a pair needs two responses)' }).default(5),
  temperature: nonNegative().default(0.7),
  topP: positive().max(1, { error: 'must be ≤ 1' }).default(0.9),
  /** 0 keeps every token */
  topK: nonNegativeInt().default(0),
  /** the reference samples up to 2048 new tokens (training then truncates to training.maxLength) */
  maxNewTokens: positiveInt().default(2048),
  /** sequences decoded together */
  maxBatch: positiveInt().default(16),
});

const styleMatrix = z
  .array(z.array(z.number({ error: 'must be a number' })).length(3, { error: 'must be a row of 3 numbers' }), { error: 'must be a 3×3 matrix' })
  .length(3, { error: 'must be a 3×3 matrix over the styles (R, P, S)' });

const preferenceCommon = {
  /** prompts judged at once */
  concurrency: positiveInt().default(4),
};

/** a judge prompt: the user's prompt and the two responses go where {prompt}, {a} and {b} stand */
const judgeTemplate = () =>
  z.string({ error: 'must be a string' }).refine((t) => missingPlaceholders(t).length === 0, { error: 'must contain {prompt}, {a} and {b}' });

const preferenceSchema = z.discriminatedUnion(
  'kind',
  [
    z.strictObject({
      kind: z.literal('styled-reversal'),
      a: nonNegative().default(0.25),
      b: nonNegative().default(0.25),
      A: styleMatrix.optional(),
      noneAdvantage: nonNegative().default(1),
      alphabet: z.string().min(1, { error: 'must not be empty' }).default('abcdefgh'),
      minLength: positiveInt().default(3),
      maxLength: positiveInt().default(6),
      ...preferenceCommon,
    }),
    z.strictObject({
      kind: z.literal('function'),
      /** a JS module whose export is (prompt, a, b) => P(a ≻ b); programmatic runs pass the function */
      module: path().optional(),
      export: z.string().min(1).default('default'),
      /** change it whenever the function's behaviour changes: it is part of the config hash */
      id: z.string().min(1).optional(),
      ...preferenceCommon,
    }),
    z.strictObject({
      kind: z.literal('http'),
      /** an OpenAI-compatible API root; requests go to <baseUrl>/chat/completions */
      baseUrl: z.url({ protocol: /^https?$/, error: 'must be an http(s) URL' }),
      model: z.string().min(1, { error: 'must not be empty' }),
      /** the environment variable that holds the API key (the key itself never goes in a config) */
      apiKeyEnv: z.string().min(1, { error: 'must not be empty' }).optional(),
      /** default: lib/preference/http.ts DEFAULT_JUDGE_TEMPLATE */
      template: judgeTemplate().optional(),
      system: z.string().optional(),
      /** HTTP requests in flight at once */
      requestConcurrency: positiveInt().default(8),
      timeoutMs: positiveInt().default(60_000),
      maxRetries: nonNegativeInt().default(5),
      /** one file per answered comparison; default <run.dir>/judge-cache */
      cacheDir: path().optional(),
      ...preferenceCommon,
    }),
    z.strictObject({
      kind: z.literal('lm-judge'),
      /** a Hugging Face causal LM directory with tokenizer.json (and a chat template unless chatTemplate is false) */
      path: path(),
      /** default: lib/preference/http.ts DEFAULT_JUDGE_TEMPLATE */
      template: judgeTemplate().optional(),
      /** the next tokens read as 'first is better' and 'second is better' */
      answerTokens: z.tuple([z.string().min(1), z.string().min(1)]).default(['A', 'B']),
      /** format the question through the judge tokenizer's chat template */
      chatTemplate: z.boolean().default(true),
      /** judge rows per forward pass */
      batchSize: positiveInt().default(8),
      /** judge tokens per row; longer questions keep their last tokens */
      maxSeq: positiveInt().default(2048),
      ...preferenceCommon,
    }),
    z.strictObject({
      kind: z.literal('reward-model'),
      /** a Hugging Face sequence-classification directory (num_labels 1) with tokenizer.json and a chat template */
      path: path(),
      /** τ of P_ij = σ((r_i − r_j)/τ) */
      temperature: positive().default(1),
      /** reward-model rows per forward pass */
      batchSize: positiveInt().default(8),
      /** reward-model tokens per row; longer conversations keep their last tokens */
      maxSeq: positiveInt().default(2048),
      ...preferenceCommon,
    }),
  ],
  { error: "unknown kind (known: 'styled-reversal', 'function', 'http', 'lm-judge', 'reward-model')" },
);

const trainingSchema = z
  .strictObject({
    loss: z.enum(PREFERENCE_LOSSES, { error: `must be one of ${PREFERENCE_LOSSES.join(', ')}` }).default('sppo-pair'),
    /** η of the multiplicative-weights update; β = 1/η (reference β = 0.001) */
    eta: positive().default(1000),
    /** 'pair' (one pair per prompt) or 'all' (every response); default: what the loss reads */
    mode: z.enum(['pair', 'all']).optional(),
    /** P̂ with the diagonal's ½ included (reference) or excluded */
    winRateDiagonal: z.enum(['include', 'exclude']).default('include'),
    optimizer: z
      .strictObject({
        kind: z.enum(['rmsprop', 'adamw']).default('rmsprop'),
        lr: positive().default(5e-7),
        weightDecay: nonNegative().default(0),
        /** global-norm clipping (Hugging Face Trainer's default 1.0); 0 disables */
        maxGradNorm: nonNegative().default(1),
        alpha: probability().optional(),
        beta1: probability().optional(),
        beta2: probability().optional(),
        eps: positive().optional(),
      })
      .prefault({}),
    schedule: z
      .strictObject({
        kind: z.enum(['linear', 'cosine', 'constant']).default('linear'),
        /** warm-up steps as a fraction of the iteration's steps */
        warmupRatio: probability().default(0.1),
      })
      .prefault({}),
    epochsPerIteration: positiveInt().default(1),
    /** pairs (or examples) per micro-batch */
    batchSize: positiveInt().default(8),
    /** micro-batches per optimizer step: 8 × 8 = the reference's global batch of 64 */
    gradAccumSteps: positiveInt().default(8),
    /** prompt + response tokens per training row */
    maxLength: positiveInt().default(1024),
  })
  .superRefine((t, ctx) => {
    if (t.mode !== undefined && t.mode !== datasetModeForLoss(t.loss))
      ctx.addIssue({
        code: 'custom',
        path: ['mode'],
        message: `loss '${t.loss}' needs mode '${datasetModeForLoss(t.loss)}'`,
      });
  })
  .transform((t) => ({ ...t, mode: t.mode ?? datasetModeForLoss(t.loss) }));

/** Supervised fine-tuning that makes π_0 before the first iteration (the demo's base policy). */
const sftSchema = z.strictObject({
  steps: positiveInt().default(400),
  batchSize: positiveInt().default(64),
  lr: positive().default(3e-3),
  /** supervised (prompt, answer) rows drawn for it */
  examples: positiveInt().default(4000),
  /** style mix of the supervised answers: clearly exploitable, as the base policy should be */
  styles: z.strictObject({ R: nonNegative(), P: nonNegative(), S: nonNegative() }).default({ R: 0.6, P: 0.3, S: 0.1 }),
  /** probability that a supervised answer's reversal has one wrong letter */
  corruption: probability().default(0.4),
});

const runSchema = z.strictObject({
  /** where every stage's output and the checkpoints go */
  dir: path().default('sppo-run'),
  iterations: positiveInt().default(3),
  seed: nonNegativeInt().default(42),
});

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
    if (c.model.preset === 'demo' && c.data.words === undefined)
      ctx.addIssue({ code: 'custom', path: ['model', 'preset'], message: "the 'demo' policy reads generated styled-reversal words (data.words)" });
    if (c.sft !== undefined && c.preference.kind !== 'styled-reversal')
      ctx.addIssue({ code: 'custom', path: ['sft'], message: "supervised fine-tuning data comes from the styled-reversal task (preference.kind 'styled-reversal')" });
    if (c.data.words !== undefined && c.preference.kind !== 'styled-reversal')
      ctx.addIssue({ code: 'custom', path: ['data', 'words'], message: "generated words go with preference.kind 'styled-reversal'" });
    // (only on a preference section that parsed cleanly: a malformed A is reported once, by its own path)
    const preferenceOk = !ctx.issues.some((i) => i.path?.[0] === 'preference');
    if (c.preference.kind === 'styled-reversal' && preferenceOk) {
      const { kind, concurrency, ...params } = c.preference;
      try {
        resolveStyledReversal(params);
      } catch (err) {
        ctx.addIssue({ code: 'custom', path: ['preference'], message: (err as Error).message.replace(/^styled reversal: /, '') });
      }
    }
  });

/** What a config file holds (defaults may be left out). */
export type RunConfigInput = z.input<typeof runConfigSchema>;
/** Every field filled in: what a run uses and hashes. */
export type RunConfig = z.output<typeof runConfigSchema>;
