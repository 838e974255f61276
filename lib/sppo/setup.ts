// A resolved run configuration turned into a RunSetup, for the demo policy and Hugging Face model
// directories alike: the prompt split, the judge (lib/preference/from-config.ts) and the policy
// with its text (a checkpoint's tokenizer, prompts through its chat template). What the schema
// cannot check — files, directories, tokenizers — fails here as a SetupError naming the field,
// and what only the prompts can tell (the split, the chat template, prompt + maxNewTokens against
// the context) is checked before the judge or the policy's weights are loaded.
import { existsSync } from 'node:fs';
import path from 'node:path';
import { SetupError } from '../config/errors.js';
import type { RunConfig } from '../config/schema.js';
import { loadPrompts } from '../data/prompts.js';
import { demoSetup } from '../demo/demo.js';
import { Model, type Device, type MemoryPlanReport, type PlanOptions } from '../engine/model.js';
import type { MemoryPlan, ModelConfig } from '../engine/types.js';
import { CheckpointError, loadPretrained, readHfConfig } from '../io/checkpoint.js';
import { ConfigError, engineConfigFromHf } from '../io/hf-config.js';
import { SafetensorsError } from '../io/safetensors.js';
import { Tokenizer, TokenizerError } from '../io/tokenizer.js';
import { preferenceFromConfig, refuseMisplacedJudgeFunction } from '../preference/from-config.js';
import type { PreferenceFunction } from '../preference/function.js';
import type { PreferenceModel } from '../preference/model.js';
import { randomWords } from '../preference/styled-reversal.js';
import { checkPrompts, splitForConfig } from './prompt-checks.js';
import { generatorPlanFor, type PolicyText, type RunSetup } from './run.js';
import { RunDir } from './run-dir.js';

export interface SetupOptions {
  /** where the policy trains and generates, and where an lm-judge or reward-model judge runs; default 'cpu' */
  device?: Device;
  /**
   * The policy's activation checkpointing (Model.create's option; default 'auto': on when the
   * plan, counting the run's optimizer and generator, does not fit). Not part of the config: it
   * changes memory and time, never results, so a run may resume with another setting.
   */
  activationCheckpointing?: boolean | 'auto';
  /**
   * The judge of a preference.kind 'function' config given in code, for a tool that embeds the
   * engine with its own scorer: (prompt, a, b) => P(a ≻ b). Set preference.id so that a change
   * of the function changes the config hash.
   */
  judgeFunction?: PreferenceFunction;
}

/**
 * A chat model's view of prompt text: the user turn through the chat template with the
 * generation prompt, kept to its last `maxPromptTokens` tokens (the reference truncates prompts
 * from the left); responses decoded without special tokens; generation stops at any EOS id.
 */
export function chatPolicyText(tokenizer: Tokenizer, maxPromptTokens: number): PolicyText {
  return {
    promptIds(prompt) {
      const ids = tokenizer.encodeChat([{ role: 'user', content: prompt }], { addGenerationPrompt: true });
      return ids.length > maxPromptTokens ? ids.slice(ids.length - maxPromptTokens) : ids;
    },
    decode: (ids) => tokenizer.decode(Array.from(ids), { skipSpecialTokens: true }),
    stopTokens: tokenizer.eosTokenIds,
  };
}

/** The tokenizer a chat policy needs, or a SetupError (naming `field` when given) saying what the directory lacks. */
export function requireChatTokenizer(tokenizer: Tokenizer | undefined, dir: string, field?: string): Tokenizer {
  const at = field?.split('.') ?? [];
  if (!tokenizer) throw new SetupError(at, `${dir} has no tokenizer.json, so prompts cannot be turned into tokens`);
  if (tokenizer.chatTemplates.size === 0)
    throw new SetupError(
      at,
      `${dir} has no chat template (chat_template.jinja or tokenizer_config.json chat_template), so prompts cannot be formatted`,
    );
  return tokenizer;
}

/** The config's prompts: generated styled-reversal words, or its prompt file. */
async function promptSet(config: RunConfig): Promise<string[]> {
  const { data, preference } = config;
  if (data.words !== undefined && preference.kind === 'styled-reversal') {
    const { kind, concurrency, ...params } = preference;
    return randomWords(data.words, config.run.seed, params);
  }
  // parseConfig requires one of words and prompts; a config built by hand may lack both
  if (data.prompts === undefined)
    throw new SetupError(['data', 'prompts'], 'give exactly one of prompts (a file) and words (generated styled-reversal prompts)');
  try {
    return await loadPrompts(data.prompts, { column: data.column, format: data.format });
  } catch (err) {
    throw new SetupError(['data', 'prompts'], (err as Error).message, { cause: err });
  }
}

/** What a checkpoint directory that cannot be loaded throws: the user's to fix by pointing model.path elsewhere. */
const CHECKPOINT_ERRORS = [CheckpointError, ConfigError, SafetensorsError, TokenizerError];

/** `load()`, with a checkpoint directory's errors as SetupErrors naming model.path. */
async function fromModelPath<T>(load: () => Promise<T> | T): Promise<T> {
  try {
    return await load();
  } catch (err) {
    if (CHECKPOINT_ERRORS.some((E) => err instanceof E)) throw new SetupError(['model', 'path'], (err as Error).message, { cause: err });
    throw err;
  }
}

/**
 * The RunSetup of a config whose model is a Hugging Face directory (model.path). The cheap
 * checks come first — prompts and their split, config.json, the tokenizer and its chat template
 * on every prompt, prompt + maxNewTokens against the context — then the judge, then the weights.
 */
async function pretrainedSetup(config: RunConfig, dir: string, options: SetupOptions): Promise<RunSetup> {
  const { data, generation, training } = config;
  const prompts = await promptSet(config);
  const split = splitForConfig(
    prompts,
    config,
    data.words !== undefined ? `data.words = ${data.words} generated words` : `the ${prompts.length} prompts of ${data.prompts}`,
  );

  const configFile = path.join(dir, 'config.json');
  if (!existsSync(configFile)) throw new SetupError(['model', 'path'], `${dir} is not a model directory (no config.json)`);
  const hf = await fromModelPath(() => readHfConfig(configFile));
  const context = typeof hf.max_position_embeddings === 'number' ? hf.max_position_embeddings : Infinity;
  // A preference step holds a pair's two responses per row; generation's KV cache is separate.
  const longest = Math.max(training.maxLength, data.maxPromptTokens + generation.maxNewTokens);
  const plan: MemoryPlan = { maxBatch: 2 * training.batchSize, maxSeq: Math.min(longest, context) };
  const engineConfig = await fromModelPath(() => engineConfigFromHf(hf, { maxSeq: plan.maxSeq, label: configFile }).config);
  const tokenizer = existsSync(path.join(dir, 'tokenizer.json')) ? await fromModelPath(() => Tokenizer.fromDirectory(dir)) : undefined;
  const chat = requireChatTokenizer(tokenizer, dir, 'model.path');
  const text = chatPolicyText(chat, data.maxPromptTokens);
  // A tokenizer that does not fit the model, a chat template that fails on a prompt, or a prompt
  // too long for the context would otherwise fail only once generation starts, after the run
  // directory and π_0 are written.
  checkPrompts(split, text, config, {
    vocabSize: engineConfig.vocab_size,
    context,
    contextSource: `max_position_embeddings in ${configFile}`,
    textField: ['model', 'path'],
    truncates: true,
  });

  const preference: PreferenceModel = await preferenceFromConfig(config.preference, {
    device: options.device,
    judgeCacheDir: RunDir.at(config.run.dir).judgeCache,
    judgeFunction: options.judgeFunction,
    // PairRM reads the prompt as the policy saw it, after its chat template (as the reference's rank.py)
    sourceText: (prompt) => chat.applyChatTemplate([{ role: 'user', content: prompt }], { addGenerationPrompt: true }),
  });
  try {
    const { model } = await fromModelPath(() =>
      loadPretrained(dir, plan, { ...policyPlanOptions(config, engineConfig, plan, options), tokenizer }),
    );
    return { config, model, text, preference, split, sourceDir: dir };
  } catch (err) {
    // An engine judge (a model of its own) may not outlive a failed setup.
    await preference.dispose();
    throw err;
  }
}

/** Model.create's options for a run's policy: the device, checkpointing, LoRA, and the optimizer and generator the run will add. */
export function policyPlanOptions(config: RunConfig, model: ModelConfig, plan: MemoryPlan, options: SetupOptions): PlanOptions {
  return {
    device: options.device,
    activationCheckpointing: options.activationCheckpointing,
    ...(config.training.gradientPrecision && { gradientPrecision: config.training.gradientPrecision }),
    ...(config.training.lora && { lora: config.training.lora }),
    optimizer: { kind: config.training.optimizer.kind },
    generator: generatorPlanFor(config, model, plan),
  };
}

/** The memory plan of a run's policy as set up: what `sppo run` prints before it starts. */
export function runMemoryPlan(setup: RunSetup): MemoryPlanReport {
  const { config, model } = setup;
  const asCreated = { device: model.device, activationCheckpointing: model.activationCheckpointing };
  return Model.plan(model.config, model.plan, policyPlanOptions(config, model.config, model.plan, asCreated));
}

/**
 * The RunSetup a resolved config (parseConfig, loadConfig) describes: model.preset 'demo' is the
 * embedded styled-reversal policy (lib/demo), model.path a Hugging Face model directory with a
 * tokenizer and a chat template. The caller disposes setup.model and setup.preference.
 */
export async function setupFromConfig(config: RunConfig, options: SetupOptions = {}): Promise<RunSetup> {
  const { preset, path: dir } = config.model;
  refuseMisplacedJudgeFunction(config.preference, options.judgeFunction);
  if (preset === 'demo')
    return demoSetup(config, { device: options.device, activationCheckpointing: options.activationCheckpointing }).setup;
  // parseConfig refuses the other presets; a config built by hand may still hold one
  if (dir === undefined)
    throw new SetupError(
      ['model', 'preset'],
      `'${String(preset)}' has random weights and no tokenizer; use model.path or model.preset 'demo'`,
    );
  return pretrainedSetup(config, dir, options);
}
