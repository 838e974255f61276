// `sppo demo`: the embedded default run. A small policy learns styled reversal by supervised
// fine-tuning (an exploitable style mix, imperfect reversals), then SPPO iterations against the
// styled-reversal oracle, whose Nash equilibrium is known, so the duality gap is exact.
import { parseConfig } from '../config/load.js';
import type { RunConfig, RunConfigInput } from '../config/schema.js';
import { Model, type Device } from '../engine/model.js';
import type { PreferenceLossName } from '../engine/types.js';
import {
  dualityGap,
  randomWords,
  resolveStyledReversal,
  styledReversalOracle,
  summarizeAnswers,
  type PolicySummary,
} from '../preference/styled-reversal.js';
import { checkPrompts, splitForConfig } from '../sppo/prompt-checks.js';
import { runSppo, type RunHooks, type RunResult, type RunSetup, type Sample } from '../sppo/run.js';
import { CharTokenizer, DEMO_CONTEXT, demoModelConfig, supervisedExamples, supervisedFineTune } from './task.js';

export interface DemoOptions {
  dir?: string;
  loss?: PreferenceLossName;
  iterations?: number;
  /** a smaller, faster run (CI): fewer prompts, fewer SFT steps */
  quick?: boolean;
  seed?: number;
  /** where the policy runs (default 'cpu') */
  device?: Device;
  /** called with the policy once it exists (the CLI prints where it runs) */
  onModel?: (model: Model) => void;
}

/** The demo's run configuration (a config file with the same content runs it through `sppo run`). */
export function demoConfigInput(o: DemoOptions = {}): RunConfigInput {
  const quick = o.quick ?? false;
  return {
    model: { preset: 'demo', seed: o.seed ?? 1 },
    data: { words: quick ? 1400 : 3000, evalSize: quick ? 400 : 600, maxPromptTokens: 16 },
    generation: { samplesPerPrompt: 5, temperature: 1, topP: 1, maxNewTokens: 12, maxBatch: 64 },
    preference: { kind: 'styled-reversal' },
    training: {
      loss: o.loss ?? 'sppo-pair',
      // The task's log-ratios are a few nats: η = 5 moves the style mix by a visible step per
      // iteration without overshooting the equilibrium in one (η = 1000 suits 1000-token answers).
      eta: 5,
      optimizer: { kind: 'rmsprop', lr: 2e-4, maxGradNorm: 10 },
      epochsPerIteration: 2,
      batchSize: 16,
      gradAccumSteps: 1,
      maxLength: 24,
    },
    sft: { steps: quick ? 250 : 400, batchSize: 64, lr: 3e-3, examples: 4000 },
    run: { dir: o.dir ?? 'sppo-demo', iterations: o.iterations ?? 3, seed: o.seed ?? 42 },
  };
}

/**
 * Builds the run for a resolved config whose model is the 'demo' preset. The split and the
 * prompts' lengths against the policy's context are checked before the policy is made, as a
 * SetupError naming the field (data.evalSize, generation.maxNewTokens …).
 */
export function demoSetup(
  config: RunConfig,
  options: { device?: Device; activationCheckpointing?: boolean | 'auto' } = {},
): { setup: RunSetup; tokenizer: CharTokenizer } {
  if (config.model.preset !== 'demo' || config.data.words === undefined || config.preference.kind !== 'styled-reversal')
    throw new RangeError("demoSetup needs model.preset 'demo', data.words and preference.kind 'styled-reversal'");
  const { kind, concurrency, ...params } = config.preference;
  const oracle = resolveStyledReversal(params);
  const tokenizer = new CharTokenizer(oracle.alphabet);
  const words = randomWords(config.data.words, config.run.seed, oracle);
  const split = splitForConfig(words, config, `data.words = ${config.data.words} generated words`);
  checkPrompts(split, tokenizer, config, {
    vocabSize: tokenizer.vocabSize,
    context: DEMO_CONTEXT,
    contextSource: "the demo policy's context",
    textField: ['data', 'words'],
    truncates: false,
  });
  const sft = config.sft;
  const maxBatch = Math.max(2 * config.training.batchSize, sft?.batchSize ?? 1);
  const model = Model.create(
    demoModelConfig(tokenizer, config.model.seed ?? 1),
    { maxBatch, maxSeq: DEMO_CONTEXT },
    // with training.lora the supervised base trains the adapters too: the seeded base stays frozen
    {
      device: options.device,
      activationCheckpointing: options.activationCheckpointing,
      ...(config.training.gradientPrecision && { gradientPrecision: config.training.gradientPrecision }),
      ...(config.training.lora && { lora: config.training.lora }),
    },
  );
  const summaries = (history: readonly Sample[][]): PolicySummary[] => history.map((s) => summarizeAnswers(s));
  const setup: RunSetup = {
    config,
    model,
    text: tokenizer,
    tokenizer: tokenizer.files(),
    preference: styledReversalOracle(oracle),
    split,
    makeBase: sft
      ? async (m: Model, hooks: RunHooks) => {
          const rows = supervisedExamples(
            randomWords(sft.examples, config.run.seed + 1, oracle),
            sft,
            oracle.alphabet,
            config.run.seed + 2,
            tokenizer,
          );
          const results = await supervisedFineTune(m, rows, {
            steps: sft.steps,
            batchSize: sft.batchSize,
            lr: sft.lr,
            seed: config.run.seed + 3,
            signal: hooks.signal,
            onProgress: (done, total) => hooks.onProgress?.({ iteration: 0, stage: 'base', done, total }),
          });
          return { sftSteps: results.length, sftFinalLoss: results[results.length - 1].loss };
        }
      : undefined,
    taskMetrics: (history) => {
      const s = summaries(history);
      const last = s[s.length - 1];
      // The average policy (1/t)·Σ π_k over the trained iterates π_1..π_t: a mixture, so its
      // style distribution and mean quality are the averages of theirs.
      const iterates = s.length > 1 ? s.slice(1) : s;
      const avg: PolicySummary = {
        styleDistribution: {
          R: mean(iterates.map((x) => x.styleDistribution.R)),
          P: mean(iterates.map((x) => x.styleDistribution.P)),
          S: mean(iterates.map((x) => x.styleDistribution.S)),
          none: mean(iterates.map((x) => x.styleDistribution.none ?? 0)),
        },
        meanQuality: mean(iterates.map((x) => x.meanQuality)),
      };
      return {
        meanQuality: last.meanQuality,
        styles: last.styleDistribution,
        dualityGap: dualityGap(normalised(last), oracle),
        dualityGapAverage: dualityGap(normalised(avg), oracle),
      };
    },
  };
  return { setup, tokenizer };
}

function mean(xs: readonly number[]): number {
  return xs.reduce((a, b) => a + b, 0) / xs.length;
}

// Averages of frequencies can miss 1 by rounding; dualityGap checks the sum to 1e-9.
function normalised(s: PolicySummary): PolicySummary {
  const d = s.styleDistribution;
  const total = d.R + d.P + d.S + (d.none ?? 0);
  return { meanQuality: s.meanQuality, styleDistribution: { R: d.R / total, P: d.P / total, S: d.S / total, none: (d.none ?? 0) / total } };
}

/** Runs (or resumes) the demo. */
export async function runDemo(o: DemoOptions = {}, hooks: RunHooks = {}): Promise<RunResult & { config: RunConfig }> {
  const config = parseConfig(demoConfigInput(o), { baseDir: process.cwd(), source: 'demo' });
  const { setup } = demoSetup(config, { device: o.device });
  o.onModel?.(setup.model);
  try {
    return { ...(await runSppo(setup, hooks)), config };
  } finally {
    await setup.model.dispose();
  }
}
