// `sppo generate`: samples responses to a prompt file from a checkpoint — a Hugging Face model
// directory (prompts through its chat template), a PEFT LoRA adapter directory over one (a LoRA
// run's policy: base + adapter, unmerged), or a policy of a demo run (the character tokenizer
// saved with it) — and writes one JSON line per response.
import { existsSync } from 'node:fs';
import path from 'node:path';
import { loadPrompts } from '../../data/prompts.js';
import { promptSeeds, SEED_PURPOSE } from '../../data/random.js';
import { demoPolicyText } from '../../demo/task.js';
import type { GeneratedSequence } from '../../engine/generate.js';
import { resolveConfig } from '../../engine/model.js';
import { loadPretrained, readHfConfig } from '../../io/checkpoint.js';
import { engineConfigFromHf } from '../../io/hf-config.js';
import { ADAPTER_CONFIG_NAME, AdapterError, adapterBaseDir, loadAdapter, type LoadedAdapter } from '../../io/peft.js';
import { Tokenizer } from '../../io/tokenizer.js';
import { contextLimit } from '../../preference/from-config.js';
import { RunDir } from '../../sppo/run-dir.js';
import { chatPolicyText, requireChatTokenizer } from '../../sppo/setup.js';
import { writeFileAtomic } from '../../util/atomic-write.js';
import {
  deviceLine,
  deviceOption,
  existingPathOption,
  integerOption,
  numberOption,
  outputOption,
  parseOptions,
  requireOption,
  UsageError,
  type Command,
} from '../args.js';
import { Progress } from '../progress.js';

const help = `Usage: sppo generate (--model DIR | --demo-run RUN_DIR [--iteration T]) --prompts FILE [options]

Samples responses from a checkpoint and writes JSON lines {prompt, response, logprob, stopReason}
(logprob: the response's summed token log-probabilities under the policy), prompt-major.

  --model DIR            a Hugging Face model directory with a tokenizer and a chat template
                         (also a run's checkpoint: <run.dir>/iter-T/policy), or a PEFT LoRA
                         adapter directory over one: the model directory its
                         base_model_name_or_path names (a relative path from the working
                         directory, as PEFT reads it), or --base
  --base DIR             with an adapter directory for --model: its base model directory
                         (an adapter moved away from the base it names)
  --demo-run RUN_DIR     a \`sppo demo\` run: samples from RUN_DIR/iter-T/policy (a LoRA
                         run's adapter over RUN_DIR/base/frozen, wherever the run has moved)
  --iteration T          with --demo-run: which policy (0 = base; default the latest)
  --prompts FILE         JSONL or Parquet prompts (required)
  --column NAME          the prompt column (default prompt)
  --samples K            responses per prompt (default 1)
  --temperature X        default 0.7 (--demo-run: the run's)
  --top-p X              default 0.9 (--demo-run: the run's)
  --max-new-tokens N     default 256 (--demo-run: the run's)
  --seed N               default 0; prompt i samples from streams of its own, derived from
                         (N, i) as \`sppo run\` derives its prompts' seeds
  --out FILE.jsonl       write here (atomically) instead of to stdout
  --device DEV           cpu | cuda | auto (default cpu)
  -h, --help             this text`;

/** Sequences decoded together for --model (a demo run uses its own generation.maxBatch). */
const MODEL_MAX_BATCH = 16;

interface Source {
  /** the checkpoint */
  dir: string;
  /** where the checkpoint is a LoRA adapter directory: its base model directory, when known other than from the adapter */
  base?: string;
  /** a demo run's policy: prompts are words, framed by its character tokenizer rather than a chat template */
  demo: boolean;
  sampling: { temperature: number; topP: number; topK: number; maxNewTokens: number; maxBatch: number };
}

async function demoRunSource(runDir: string, iteration: number | undefined): Promise<Source> {
  const run = RunDir.at(runDir);
  const record = await run.readRun();
  if (!record) throw new UsageError(`--demo-run: ${runDir} has no run.json (not a run directory)`);
  const { config } = record;
  const newest = await run.newestPolicy();
  if (config.model.preset !== 'demo' || config.preference.kind !== 'styled-reversal')
    throw new UsageError(
      `--demo-run: ${runDir} is not a demo run; ${newest === undefined ? 'once it has a checkpoint, sample it with --model DIR' : `sample with --model ${run.policy(newest)}`}`,
    );
  const t = iteration ?? newest;
  if (t === undefined) throw new UsageError(`--demo-run: ${runDir} has no finished checkpoint yet`);
  if (!run.hasPolicy(t)) throw new UsageError(`--iteration: ${runDir} has no checkpoint of iteration ${t} yet`);
  const g = config.generation;
  return {
    dir: run.policy(t),
    // A LoRA demo run's adapters are over its own copy of the seeded base: the one in this run
    // directory (the absolute path they record is stale once the run directory has moved).
    base: run.frozenBase,
    demo: true,
    sampling: { temperature: g.temperature, topP: g.topP, topK: g.topK, maxNewTokens: g.maxNewTokens, maxBatch: g.maxBatch },
  };
}

export const generateCommand: Command = {
  name: 'generate',
  summary: 'sample responses to a prompt file from a checkpoint',
  help,
  async run(argv, io) {
    const v = parseOptions('generate', argv, {
      model: { type: 'string' },
      base: { type: 'string' },
      'demo-run': { type: 'string' },
      iteration: { type: 'string' },
      prompts: { type: 'string' },
      column: { type: 'string' },
      samples: { type: 'string' },
      temperature: { type: 'string' },
      'top-p': { type: 'string' },
      'max-new-tokens': { type: 'string' },
      seed: { type: 'string' },
      out: { type: 'string' },
      device: { type: 'string' },
    });
    const device = deviceOption(v.device);
    if ((v.model === undefined) === (v['demo-run'] === undefined))
      throw new UsageError('give exactly one of --model DIR and --demo-run RUN_DIR');
    if (v.iteration !== undefined && v.model !== undefined)
      throw new UsageError('--iteration goes with --demo-run (for --model, name the checkpoint directory)');
    if (v.base !== undefined && v.model === undefined)
      throw new UsageError('--base goes with --model ADAPTER_DIR (a demo run names its own base)');
    const promptFile = requireOption(v.prompts, 'prompts', 'generate');
    const outFile = outputOption(v.out, promptFile, 'prompts');
    const samples = integerOption(v.samples, 'samples', 1) ?? 1;
    const seed = integerOption(v.seed, 'seed', 0) ?? 0;
    const source: Source =
      v.model !== undefined
        ? {
            dir: path.resolve(v.model),
            ...(v.base !== undefined && { base: existingPathOption(v.base, 'base', 'generate') }),
            demo: false,
            sampling: { temperature: 0.7, topP: 0.9, topK: 0, maxNewTokens: 256, maxBatch: MODEL_MAX_BATCH },
          }
        : await demoRunSource(
            path.resolve(requireOption(v['demo-run'], 'demo-run', 'generate')),
            integerOption(v.iteration, 'iteration', 0),
          );
    const sampling = {
      ...source.sampling,
      temperature: numberOption(v.temperature, 'temperature', { min: 0 }) ?? source.sampling.temperature,
      topP: numberOption(v['top-p'], 'top-p', { min: Number.MIN_VALUE, max: 1 }) ?? source.sampling.topP,
      maxNewTokens: integerOption(v['max-new-tokens'], 'max-new-tokens', 1) ?? source.sampling.maxNewTokens,
    };
    const { maxBatch, ...options } = sampling;
    let prompts: string[];
    try {
      prompts = await loadPrompts(path.resolve(promptFile), { column: v.column });
    } catch (err) {
      throw new UsageError(`--prompts: ${(err as Error).message}`);
    }
    const field = v.model !== undefined ? '--model' : '--demo-run';
    const adapterDir = existsSync(path.join(source.dir, ADAPTER_CONFIG_NAME)) ? source.dir : undefined;
    if (adapterDir) source.dir = source.base ?? (await namedBase(adapterDir));
    else if (v.base !== undefined)
      throw new UsageError(`--base: ${source.dir} is not a LoRA adapter directory (no ${ADAPTER_CONFIG_NAME})`);
    const limit = await contextLimit(source.dir, field);
    const tokenizer = await readTokenizer(source.dir);
    const text = source.demo
      ? demoPolicyText(requireDemoTokenizer(tokenizer, source.dir))
      : chatPolicyText(requireChatTokenizer(tokenizer, source.dir), Infinity);
    let ids: number[][];
    try {
      ids = prompts.map((p) => text.promptIds(p));
    } catch (err) {
      throw new UsageError(`--prompts: ${(err as Error).message}`);
    }
    // A sequence that reaches the context limit stops with stopReason 'contextFull'.
    const maxSeq = Math.min(limit, Math.max(...ids.map((p) => p.length)) + sampling.maxNewTokens);
    // Generation only: the model's own batch plan is minimal, the generator plans the KV cache.
    const adapter = adapterDir === undefined ? undefined : await readAdapter(adapterDir, source.dir, maxSeq);
    const { model } = await loadPretrained(
      source.dir,
      { maxBatch: 1, maxSeq },
      { training: false, device, ...(adapter && { lora: adapter.lora }) },
    );
    if (adapter) model.setAdapterTensors(adapter.tensors);
    // stdout may be the JSONL output: say where the model runs on stderr.
    io.stderr.write(deviceLine(model, device));
    const progress = outFile !== undefined ? new Progress(io.stdout) : undefined;
    let out: GeneratedSequence[];
    try {
      const generator = model.createGenerator({
        maxBatch: Math.min(maxBatch, ids.length * samples),
        maxContext: maxSeq,
      });
      try {
        const total = ids.length * samples * sampling.maxNewTokens;
        let done = 0;
        progress?.start('generate');
        const t0 = performance.now();
        out = await generator.generate(ids, {
          ...options,
          stopTokens: text.stopTokens,
          samplesPerPrompt: samples,
          // a seed of its own per prompt: prompt i's samples depend on (seed, i) only
          seed: promptSeeds(seed, 0, SEED_PURPOSE.generate, ids.length),
          onToken: progress && (() => progress.update(++done, total)),
        });
        progress?.finish(`generate ${out.length} responses`, (performance.now() - t0) / 1000);
      } finally {
        await generator.dispose();
      }
    } finally {
      progress?.stop();
      await model.dispose();
    }
    const jsonl = out
      .map(
        (s) =>
          JSON.stringify({
            prompt: prompts[s.prompt],
            response: text.decode(s.tokens),
            logprob: s.logprobs.reduce((a, b) => a + b, 0),
            stopReason: s.stopReason,
          }) + '\n',
      )
      .join('');
    if (outFile === undefined) io.stdout.write(jsonl);
    else {
      await writeFileAtomic(path.resolve(outFile), jsonl, { createParents: true });
      io.stdout.write(`wrote ${out.length} responses to ${path.resolve(outFile)}\n`);
    }
    return 0;
  },
};

async function readTokenizer(dir: string): Promise<Tokenizer | undefined> {
  return existsSync(path.join(dir, 'tokenizer.json')) ? Tokenizer.fromDirectory(dir) : undefined;
}

/** A demo checkpoint's tokenizer; checkpoints of runs made before they saved one have none. */
function requireDemoTokenizer(tokenizer: Tokenizer | undefined, dir: string): Tokenizer {
  if (!tokenizer)
    throw new UsageError(
      `--demo-run: ${dir} has no tokenizer.json (its run was made before demo checkpoints saved their tokenizer); run the demo again into a new directory (sppo demo --dir NEW_DIR) and sample that`,
    );
  return tokenizer;
}

/** The model directory a LoRA adapter directory names as its base (adapterBaseDir), or a UsageError saying how to sample it otherwise. */
async function namedBase(adapterDir: string): Promise<string> {
  try {
    return await adapterBaseDir(adapterDir);
  } catch (err) {
    if (!(err instanceof AdapterError)) throw err;
    throw new UsageError(
      `--model: ${err.message}; give its base with --base DIR, or merge it into its base (sppo merge-adapter --base DIR --adapter ${adapterDir} --out OUT) and sample OUT with --model`,
    );
  }
}

/** The adapter of `adapterDir` for the base in `baseDir`, checked against the base's shapes. */
async function readAdapter(adapterDir: string, baseDir: string, maxSeq: number): Promise<LoadedAdapter> {
  const configFile = path.join(baseDir, 'config.json');
  const { config } = engineConfigFromHf(await readHfConfig(configFile), { maxSeq, training: false, label: configFile });
  return loadAdapter(adapterDir, resolveConfig(config));
}
