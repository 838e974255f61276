// The SPPO iteration scheduler (Algorithm 1 of the paper, the reference pipeline's stages):
// for t = 1..T: sample K responses per prompt from π_t, judge every pair, estimate win rates,
// build the training set, train π_{t+1} from π_t with reference log-probs from π_t, evaluate
// against π_0 and π_t, checkpoint. Every stage's output lands atomically in the run directory
// before the next starts, so a killed run resumes where it stopped and loses nothing.
//
// With training.lora the policy is a frozen base plus adapters: π_t's checkpoint is a PEFT
// adapter directory (its base_model_name_or_path the model directory the run loaded, or the
// run's copy of the demo's seeded weights: RunDir.frozenBase), the base is whatever setup loads
// and nothing in the run changes it, and moving between policies loads adapters alone. The
// iteration's reference policy is then base + the adapters it starts from, whose log-probs the
// generate stage recorded.
import { existsSync } from 'node:fs';
import path from 'node:path';
import type { RunConfig } from '../config/schema.js';
import { promptSeeds, seededShuffle, SEED_PURPOSE } from '../data/random.js';
import type { LoraOptions } from '../engine/lora.js';
import type { Model } from '../engine/model.js';
import type { GeneratorPlan } from '../engine/generate.js';
import type {
  MemoryPlan,
  ModelConfig,
  PreferenceBatchInput,
  PreferenceExample,
  PreferencePair,
  PreferenceStepResult,
} from '../engine/types.js';
import { savePretrained } from '../io/checkpoint.js';
import { AdapterError, loadAdapter, saveAdapter } from '../io/peft.js';
import type { TokenizerFiles } from '../io/tokenizer.js';
import { CheckpointWeights } from '../io/weights.js';
import { UnusableVerdictsError, type PreferenceModel } from '../preference/model.js';
import { throwIfAborted } from '../util/abort.js';
import { buildTrainingSet, type JudgedPrompt, type TrainingSet } from './dataset.js';
import { RunDir } from './run-dir.js';
import type { EvalFile, Generations, Interval, Judgments, Sample, StageName, StageValues, TrainFile } from './stage-files.js';

export type { Interval, Sample, StageName } from './stage-files.js';

/** How a run turns prompt text into the policy's tokens and generated tokens back into text. */
export interface PolicyText {
  promptIds(prompt: string): number[];
  decode(ids: ArrayLike<number>): string;
  stopTokens: readonly number[];
}

export interface RunSetup {
  config: RunConfig;
  /** the policy (with LoRA: the base with its adapters); its weights are π_0 unless `makeBase` produces them */
  model: Model;
  text: PolicyText;
  preference: PreferenceModel;
  /** prompts of each iteration, and the held-out evaluation prompts */
  split: { iterations: string[][]; evaluation: string[] };
  /**
   * The Hugging Face directory the model came from: checkpoints copy its tokenizer, chat
   * template, token ids and architecture, so each is a complete model directory.
   */
  sourceDir?: string;
  /** the tokenizer saved with every checkpoint when there is no sourceDir to copy it from (the demo's) */
  tokenizer?: TokenizerFiles;
  /** turns the loaded model into π_0 (e.g. supervised fine-tuning); its return value is logged */
  makeBase?: (model: Model, hooks: RunHooks) => Promise<Record<string, unknown>>;
  /** task metrics from the evaluation samples of every policy so far (π_0 first, newest last) */
  taskMetrics?: (history: readonly Sample[][]) => Record<string, unknown>;
}

export interface RunHooks {
  signal?: AbortSignal;
  onStage?: (e: { iteration: number; stage: StageName; status: 'start' | 'done' | 'skipped'; seconds?: number }) => void;
  onProgress?: (e: { iteration: number; stage: StageName; done: number; total: number }) => void;
  onMetrics?: (row: IterationMetrics) => void;
  /** what a resume with a changed config or input file does differently: the stages that will use the new values */
  onNotice?: (message: string) => void;
  /** after an iteration's judge stage (done or skipped): its verdicts and how many were unusable (scored ½) */
  onJudged?: (e: { iteration: number } & JudgeVerdicts) => void;
}

export interface JudgeVerdicts {
  /** the verdicts behind an iteration's matrices (what one is depends on the judge) */
  total: number;
  /** how many of them were unusable, each scored ½ */
  unusable: number;
}

export interface IterationMetrics {
  iteration: number;
  /** P(π_t's answer ≻ π_0's answer) over held-out prompts; 0.5 exactly for π_0 itself */
  winRateVsBase: Interval;
  /** against the previous iterate (absent for π_0) */
  winRateVsPrevious?: Interval;
  meanResponseLength: number;
  meanChosenWinRate?: number;
  meanRejectedWinRate?: number;
  /** TRL-style metrics of the iteration's training: first and last optimizer step */
  train?: { steps: number; first: Record<string, number>; last: Record<string, number> };
  task?: Record<string, unknown>;
  /** the judge stage's verdicts (absent for π_0, and for a judge stage of an older version) */
  verdicts?: JudgeVerdicts;
  seconds: Partial<Record<StageName, number>>;
}

function interval(xs: readonly number[]): Interval {
  const n = xs.length;
  const mean = xs.reduce((a, b) => a + b, 0) / n;
  const sd = n > 1 ? Math.sqrt(xs.reduce((a, x) => a + (x - mean) ** 2, 0) / (n - 1)) : 0;
  const half = (1.96 * sd) / Math.sqrt(n);
  return { mean, low: mean - half, high: mean + half, n };
}

const sameLora = (a: LoraOptions, b: LoraOptions) =>
  a.rank === b.rank && a.alpha === b.alpha && a.targets.length === b.targets.length && a.targets.every((t) => b.targets.includes(t));

/** Loads a checkpoint's weights into the run's model (same architecture by construction): with LoRA, its adapters. */
async function loadWeights(model: Model, dir: string): Promise<void> {
  if (model.lora) {
    const { lora, tensors } = await loadAdapter(dir, model.config);
    // The config hash refuses a changed training.lora on resume; a hand-edited checkpoint is caught here.
    if (!sameLora(lora, model.lora))
      throw new AdapterError(
        `${dir}: the adapter has rank ${lora.rank}, alpha ${lora.alpha} on ${lora.targets.join(', ')}; the run's training.lora ` +
          `is rank ${model.lora.rank}, alpha ${model.lora.alpha} on ${model.lora.targets.join(', ')}`,
      );
    model.setAdapterTensors(tensors);
    return;
  }
  const weights = await CheckpointWeights.open(dir);
  try {
    for (const { name } of model.params()) model.setParam(name, await weights.readFloat32(name));
  } finally {
    await weights.close();
  }
}

export interface RunResult {
  dir: string;
  metrics: IterationMetrics[];
}

/**
 * The KV cache a run's generator plans: generation.maxBatch sequences of the model's context (its
 * plan's maxSeq at most), in a pool of generation.kvCacheBytes when given.
 */
export function generatorPlanFor(config: RunConfig, model: Pick<ModelConfig, 'max_position_embeddings'>, plan: MemoryPlan): GeneratorPlan {
  const { maxBatch, kvCacheBytes, packWeights } = config.generation;
  return {
    maxBatch,
    maxContext: Math.min(model.max_position_embeddings, plan.maxSeq),
    ...(kvCacheBytes !== undefined && { kvCacheBytes }),
    ...(packWeights !== undefined && { packWeights }),
  };
}

/** Runs (or resumes) an SPPO run; returns every iteration's metrics, π_0 first. */
export async function runSppo(setup: RunSetup, hooks: RunHooks = {}): Promise<RunResult> {
  const run = await RunDir.open(setup.config.run.dir, setup.config, { onNotice: hooks.onNotice });
  try {
    return await runIn(run, setup, hooks);
  } finally {
    await run.close();
  }
}

async function runIn(run: RunDir, setup: RunSetup, hooks: RunHooks): Promise<RunResult> {
  const { config, model, text, preference } = setup;
  const { signal } = hooks;
  const unusableLimit = 'maxUnusableFraction' in config.preference ? config.preference.maxUnusableFraction : undefined;
  const g = config.generation;
  const generator = model.createGenerator(generatorPlanFor(config, model.config, model.plan));
  let holds = -1; // which policy's weights the model holds: t for π_t, -1 unknown
  const ensure = async (t: number) => {
    if (holds === t) return;
    holds = -1; // a load that fails half-way leaves mixed weights
    await loadWeights(model, run.policy(t));
    holds = t;
  };
  // A stage file holds the stage's output and how long it took, so a resumed run still
  // reports the time of stages it skips.
  const timed = async <S extends StageName>(iteration: number, name: S, fn: () => StageValues[S] | Promise<StageValues[S]>) => {
    const saved = await run.readStage(iteration, name);
    if (saved) {
      hooks.onStage?.({ iteration, stage: name, status: 'skipped' });
      return saved;
    }
    throwIfAborted(signal);
    hooks.onStage?.({ iteration, stage: name, status: 'start' });
    const t0 = performance.now();
    const value = await fn();
    const seconds = (performance.now() - t0) / 1000;
    await run.writeStage(iteration, name, { value, seconds });
    hooks.onStage?.({ iteration, stage: name, status: 'done', seconds });
    return { value, seconds };
  };

  const lora = model.lora;
  // The adapters' base: the model directory loaded, or, for weights no directory holds (the
  // demo's seeded base), the run's own copy, so every adapter checkpoint names a base that
  // `sppo generate` and PEFT can load. The path is absolute: PEFT resolves a relative one against
  // the working directory of whoever loads it, which no path written here can know (a moved run
  // samples with `sppo generate --demo-run`, or --base). The copy is rewritten with π_0's
  // checkpoint (the base stage reruns whenever a field it used, such as model.seed, changed),
  // never reused across it.
  const adapterBase = async (t: number): Promise<string> => {
    if (setup.sourceDir !== undefined) return path.resolve(setup.sourceDir);
    if (t === 0 || !existsSync(run.frozenBase))
      await run.saveFrozenBase((dir) => savePretrained(model, dir, { tokenizer: setup.tokenizer, frozenBase: true }));
    return path.resolve(run.frozenBase);
  };
  const save = async (t: number) => {
    if (!lora) return run.savePolicy(t, (dir) => savePretrained(model, dir, { sourceDir: setup.sourceDir, tokenizer: setup.tokenizer }));
    const baseModel = await adapterBase(t);
    await run.savePolicy(t, (dir) => saveAdapter(dir, { lora, modelConfig: model.config, tensors: model.adapterTensors(), baseModel }));
  };

  try {
    // π_0: the given model, or what makeBase makes of it; checkpointed once.
    const base = await timed(0, 'base', async () => {
      const info = setup.makeBase ? await setup.makeBase(model, hooks) : {};
      await save(0);
      holds = 0;
      return info;
    });
    const generate = async (t: number, prompts: readonly number[][], purpose: number, samplesPerPrompt: number, onToken?: () => void) => {
      await ensure(t);
      const out = await generator.generate(prompts, {
        maxNewTokens: g.maxNewTokens,
        temperature: g.temperature,
        topP: g.topP,
        topK: g.topK,
        stopTokens: text.stopTokens,
        samplesPerPrompt,
        seed: promptSeeds(config.run.seed, t, purpose, prompts.length),
        signal,
        onToken,
      });
      // An aborted generation returns what it has: never let a truncated sample become a stage's output.
      if (out.some((s) => s.stopReason === 'aborted')) throw signal?.reason ?? new Error('generation aborted');
      return out;
    };
    const sample = async (t: number, purpose: number): Promise<Sample[]> => {
      const prompts = setup.split.evaluation;
      const out = await generate(
        t,
        prompts.map((p) => text.promptIds(p)),
        purpose,
        1,
      );
      return out.map((s) => ({ prompt: prompts[s.prompt], answer: text.decode(s.tokens), tokens: Array.from(s.tokens) }));
    };
    const versus = async (a: Sample[], b: Sample[]): Promise<Interval> => {
      const P = await preference.compareBatch(
        a.map((s, i) => ({ prompt: s.prompt, responses: [s.answer, b[i].answer] })),
        { signal },
      );
      return interval(P.map((m) => m[0][1]));
    };
    const baseEval = await timed(0, 'base-eval', async (): Promise<EvalFile> => {
      const samples = await sample(0, SEED_PURPOSE.evaluation);
      return { samples, winRateVsBase: { mean: 0.5, low: 0.5, high: 0.5, n: samples.length } };
    });
    const evals: EvalFile[] = [baseEval.value];
    const metrics: IterationMetrics[] = [];
    const record = async (row: IterationMetrics) => {
      metrics.push(row);
      hooks.onMetrics?.(row);
      await run.appendMetrics(row);
    };
    await record(
      iterationMetrics(0, baseEval.value, undefined, undefined, setup, evals, { base: base.seconds, 'base-eval': baseEval.seconds }),
    );

    for (let t = 1; t <= config.run.iterations; t++) {
      const prompts = setup.split.iterations[t - 1];
      if (!prompts || prompts.length === 0)
        throw new RangeError(`iteration ${t} has no prompts (check data.promptsPerIteration and the prompt count)`);
      const seconds: Partial<Record<StageName, number>> = {};

      const gen = await timed(t, 'generate', async (): Promise<Generations> => {
        const ids = prompts.map((p) => text.promptIds(p));
        const K = g.samplesPerPrompt;
        let done = 0;
        // The total is an upper bound (sequences may stop early), so the ETA errs long.
        const out = await generate(t - 1, ids, SEED_PURPOSE.training, K, () =>
          hooks.onProgress?.({ iteration: t, stage: 'generate', done: ++done, total: ids.length * K * g.maxNewTokens }),
        );
        const responses = prompts.map((_, i) =>
          out.slice(i * K, (i + 1) * K).map((s) => ({
            tokens: Array.from(s.tokens),
            logprobs: Array.from(s.logprobs),
            text: text.decode(s.tokens),
            stopReason: s.stopReason,
          })),
        );
        return { prompts: prompts.map((p, i) => ({ text: p, ids: ids[i] })), responses };
      });
      seconds.generate = gen.seconds;

      // Unusable verdicts (scored ½) are counted in the stage file; more than the config allows fail the stage.
      const judged = await timed(t, 'judge', async (): Promise<Judgments> => {
        const j = await preference
          .judgeBatch(
            gen.value.prompts.map((p, i) => ({ prompt: p.text, responses: gen.value.responses[i].map((r) => r.text) })),
            {
              signal,
              maxUnusableFraction: unusableLimit,
              onProgress: (done, total) => hooks.onProgress?.({ iteration: t, stage: 'judge', done, total }),
            },
          )
          .catch((err: unknown) => {
            if (err instanceof UnusableVerdictsError)
              throw new UnusableVerdictsError(err.judgeId, err.unusable, err.verdicts, err.maxUnusableFraction, err.examples, {
                field: 'preference.maxUnusableFraction',
                stage: `iteration ${t} judge`,
              });
            throw err;
          });
        return { preference: j.matrices, verdicts: j.verdicts, unusable: j.unusable };
      });
      seconds.judge = judged.seconds;
      const verdicts: JudgeVerdicts | undefined =
        judged.value.verdicts === undefined ? undefined : { total: judged.value.verdicts, unusable: judged.value.unusable ?? 0 };
      if (verdicts) hooks.onJudged?.({ iteration: t, ...verdicts });

      const data = await timed(t, 'dataset', () => {
        const items: JudgedPrompt[] = gen.value.prompts.map((p, i) => ({
          prompt: truncatePrompt(p.ids, config.training.maxLength, config.data.maxPromptTokens),
          responses: gen.value.responses[i].map((r) => {
            // Training keeps at most maxLength tokens of prompt + response; the reference
            // log-prob covers exactly the kept response tokens.
            const keep = Math.max(1, config.training.maxLength - Math.min(p.ids.length, config.data.maxPromptTokens));
            const tokens = r.tokens.slice(0, keep);
            return { tokens, refLogp: r.logprobs.slice(0, keep).reduce((a, b) => a + b, 0), text: r.text };
          }),
          preference: judged.value.preference[i],
        }));
        return buildTrainingSet(items, { mode: config.training.mode, diagonal: config.training.winRateDiagonal });
      });
      seconds.dataset = data.seconds;

      // The checkpoint is committed before train.json (written by `timed`), so a kill between
      // the two retrains from π_{t-1} rather than trusting a half-written policy: keep the order.
      const train = await timed(t, 'train', async (): Promise<TrainFile> => {
        await ensure(t - 1);
        holds = -1; // from here on the weights are moving
        const steps = await trainIteration(model, config, data.value, t, hooks);
        await save(t);
        holds = t;
        return { steps };
      });
      seconds.train = train.seconds;

      const ev = await timed(t, 'evaluate', async (): Promise<EvalFile> => {
        const samples = await sample(t, SEED_PURPOSE.evaluation);
        return {
          samples,
          winRateVsBase: await versus(samples, evals[0].samples),
          winRateVsPrevious: await versus(samples, evals[t - 1].samples),
        };
      });
      seconds.evaluate = ev.seconds;
      evals.push(ev.value);
      await record({ ...iterationMetrics(t, ev.value, data.value, train.value, setup, evals, seconds), ...(verdicts && { verdicts }) });
    }
    return { dir: run.root, metrics };
  } finally {
    await generator.dispose();
  }
}

function truncatePrompt(ids: readonly number[], maxLength: number, maxPrompt: number): number[] {
  // Left truncation keeps the end of the prompt, next to the response (as the reference).
  const keep = Math.min(maxPrompt, maxLength - 1);
  return ids.length > keep ? ids.slice(ids.length - keep) : [...ids];
}

function iterationMetrics(
  t: number,
  ev: EvalFile,
  data: TrainingSet | undefined,
  train: TrainFile | undefined,
  setup: RunSetup,
  evals: readonly EvalFile[],
  seconds: Partial<Record<StageName, number>>,
): IterationMetrics {
  const lengths = ev.samples.map((s) => s.tokens.length);
  const row: IterationMetrics = {
    iteration: t,
    winRateVsBase: ev.winRateVsBase,
    winRateVsPrevious: ev.winRateVsPrevious,
    meanResponseLength: lengths.reduce((a, b) => a + b, 0) / lengths.length,
    meanChosenWinRate: data?.stats.meanChosenWinRate,
    meanRejectedWinRate: data?.stats.meanRejectedWinRate,
    seconds,
  };
  if (train && train.steps.length > 0) {
    const view = (s: TrainFile['steps'][number]) => ({ loss: s.loss, learning_rate: s.lr ?? 0, grad_norm: s.gradNorm ?? 0, ...s.metrics });
    row.train = { steps: train.steps.length, first: view(train.steps[0]), last: view(train.steps[train.steps.length - 1]) };
  }
  if (setup.taskMetrics) row.task = setup.taskMetrics(evals.map((e) => e.samples));
  return row;
}

async function trainIteration(model: Model, config: RunConfig, data: TrainingSet, t: number, hooks: RunHooks): Promise<TrainFile['steps']> {
  const tr = config.training;
  const items: (PreferencePair | PreferenceExample)[] = data.mode === 'pair' ? data.pairs : data.examples;
  if (items.length === 0) return [];
  const micro = Math.ceil(items.length / tr.batchSize);
  // An iteration with fewer micro-batches than gradAccumSteps accumulates them all into one
  // step instead of silently training nothing; a partial accumulation at the end is dropped.
  const accum = Math.min(tr.gradAccumSteps, micro * tr.epochsPerIteration);
  const total = Math.floor((micro * tr.epochsPerIteration) / accum);
  // A fresh optimizer per iteration, as the reference builds a new trainer from π_t each time.
  model.setOptimizer({
    kind: tr.optimizer.kind,
    lr: tr.optimizer.lr,
    weightDecay: tr.optimizer.weightDecay,
    maxGradNorm: tr.optimizer.maxGradNorm,
    gradAccumSteps: accum,
    ...(tr.optimizer.alpha !== undefined && { alpha: tr.optimizer.alpha }),
    ...(tr.optimizer.beta1 !== undefined && { beta1: tr.optimizer.beta1 }),
    ...(tr.optimizer.beta2 !== undefined && { beta2: tr.optimizer.beta2 }),
    ...(tr.optimizer.eps !== undefined && { eps: tr.optimizer.eps }),
    schedule: { kind: tr.schedule.kind, warmupSteps: Math.floor(tr.schedule.warmupRatio * total), totalSteps: total },
  });
  const steps: TrainFile['steps'] = [];
  let done = 0;
  for (let epoch = 0; epoch < tr.epochsPerIteration; epoch++) {
    const order = seededShuffle(items, config.run.seed * 7919 + t * 131 + epoch);
    for (let b = 0; b < order.length; b += tr.batchSize) {
      if (steps.length >= total && done % accum === 0) break;
      const batch = order.slice(b, b + tr.batchSize);
      const input: PreferenceBatchInput =
        data.mode === 'pair' ? { pairs: batch as PreferencePair[] } : { examples: batch as PreferenceExample[] };
      const r: PreferenceStepResult = await model.preferenceStep(input, { loss: tr.loss, eta: tr.eta, signal: hooks.signal });
      done++;
      hooks.onProgress?.({ iteration: t, stage: 'train', done, total: total * accum });
      if (r.stepped)
        steps.push({ step: r.step, loss: r.loss, lr: r.lr, gradNorm: r.gradNorm, metrics: r.metrics as unknown as Record<string, number> });
    }
  }
  return steps;
}
