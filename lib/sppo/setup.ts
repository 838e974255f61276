// `sppo run` for a Hugging Face model directory: the config's pieces turned into a RunSetup —
// the checkpoint and its tokenizer (prompts through the chat template), the prompt split, and
// the judge. Problems the user can fix in the config are UsageErrors (exit 2) naming the field.
import { existsSync } from 'node:fs';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { UsageError } from '../cli/args.js';
import type { RunConfig } from '../config/schema.js';
import { loadPrompts, splitPrompts } from '../data/prompts.js';
import type { Device } from '../engine/model.js';
import type { MemoryPlan } from '../engine/types.js';
import { loadPretrained } from '../io/checkpoint.js';
import type { Tokenizer } from '../io/tokenizer.js';
import { functionPreference, type PreferenceFunction } from '../preference/function.js';
import { httpJudge } from '../preference/http.js';
import { loadLmJudge } from '../preference/lm-judge.js';
import type { PreferenceModel } from '../preference/model.js';
import { loadRewardModel } from '../preference/reward-model.js';
import { randomWords, resolveStyledReversal, styledReversalOracle } from '../preference/styled-reversal.js';
import type { PolicyText, RunSetup } from './run.js';
import { readJson } from './run-dir.js';

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

/** The tokenizer a chat policy needs, or a UsageError saying what the directory lacks. */
export function requireChatTokenizer(tokenizer: Tokenizer | undefined, dir: string): Tokenizer {
  if (!tokenizer) throw new UsageError(`${dir} has no tokenizer.json, so prompts cannot be turned into tokens`);
  if (tokenizer.chatTemplates.size === 0)
    throw new UsageError(`${dir} has no chat template (chat_template.jinja or tokenizer_config.json chat_template), so prompts cannot be formatted`);
  return tokenizer;
}

/**
 * The context length of a model directory (config.json's max_position_embeddings), which a
 * memory plan must not exceed; a UsageError naming `what` if the directory has no config.json.
 */
export async function contextLimit(dir: string, what: string): Promise<number> {
  const file = path.join(dir, 'config.json');
  if (!existsSync(file)) throw new UsageError(`${what}: ${dir} is not a model directory (no config.json)`);
  const { max_position_embeddings: n } = await readJson<{ max_position_embeddings?: unknown }>(file);
  return typeof n === 'number' ? n : Infinity;
}

async function loadPromptSet(config: RunConfig): Promise<string[]> {
  const { data, preference } = config;
  if (data.words !== undefined && preference.kind === 'styled-reversal') {
    const { kind, concurrency, ...params } = preference;
    return randomWords(data.words, config.run.seed, params);
  }
  try {
    return await loadPrompts(data.prompts!, { column: data.column, format: data.format });
  } catch (err) {
    throw new UsageError(`data.prompts: ${(err as Error).message}`);
  }
}

/** The run's judge; engine judges (lm-judge, reward-model) run on the policy's device. */
async function loadPreference(config: RunConfig, device: Device | undefined): Promise<PreferenceModel> {
  const p = config.preference;
  if (p.kind === 'styled-reversal') {
    const { kind, concurrency, ...params } = p;
    return styledReversalOracle(resolveStyledReversal(params));
  }
  if (p.kind === 'http') {
    const { kind, cacheDir, ...options } = p;
    try {
      return httpJudge({ ...options, cacheDir: cacheDir ?? path.join(config.run.dir, 'judge-cache') });
    } catch (err) {
      throw new UsageError(`preference: ${(err as Error).message.replace(/^httpJudge: /, '')}`);
    }
  }
  if (p.kind === 'lm-judge') {
    const { kind, path: dir, maxSeq, ...options } = p;
    try {
      return await loadLmJudge(dir, { ...options, device, maxSeq: Math.min(maxSeq, await contextLimit(dir, 'preference.path')) });
    } catch (err) {
      if (err instanceof UsageError) throw err;
      throw new UsageError(`preference.path: ${(err as Error).message.replace(/^lm-judge: /, '')}`);
    }
  }
  if (p.kind === 'reward-model') {
    const { kind, path: dir, maxSeq, ...options } = p;
    try {
      return await loadRewardModel(dir, { ...options, device, maxSeq: Math.min(maxSeq, await contextLimit(dir, 'preference.path')) });
    } catch (err) {
      if (err instanceof UsageError) throw err;
      throw new UsageError(`preference.path: ${(err as Error).message.replace(/^reward-model: /, '')}`);
    }
  }
  if (p.module === undefined) throw new UsageError("preference.module: required for `sppo run` (a JS module exporting (prompt, a, b) => P(a ≻ b))");
  let mod: Record<string, unknown>;
  try {
    mod = await import(pathToFileURL(p.module).href);
  } catch (err) {
    throw new UsageError(`preference.module: cannot import ${p.module}: ${(err as Error).message}`);
  }
  const fn = mod[p.export];
  if (typeof fn !== 'function')
    throw new UsageError(`preference.export: ${p.module} has no function export '${p.export}' (exports: ${Object.keys(mod).join(', ') || 'none'})`);
  return functionPreference(fn as PreferenceFunction, { id: p.id, concurrency: p.concurrency });
}

/** The RunSetup of a config whose model is a Hugging Face directory (model.path). */
export async function pretrainedSetup(config: RunConfig, options: { device?: Device } = {}): Promise<RunSetup> {
  const { model: m, data, generation, training } = config;
  if (m.path === undefined)
    throw new UsageError(`model.preset '${m.preset}' has random weights and no tokenizer, so it cannot read prompts; use model.path (a Hugging Face directory) or model.preset 'demo'`);
  if (config.sft !== undefined) throw new UsageError("sft: supervised fine-tuning of the base policy is only available with model.preset 'demo'");
  const prompts = await loadPromptSet(config);
  let split: RunSetup['split'];
  try {
    split = splitPrompts(prompts, {
      iterations: config.run.iterations, evalSize: data.evalSize, seed: config.run.seed, promptsPerIteration: data.promptsPerIteration,
    });
  } catch (err) {
    throw new UsageError(`data: ${(err as Error).message}`);
  }
  const preference = await loadPreference(config, options.device);
  let model: RunSetup['model'] | undefined;
  try {
    // A preference step holds a pair's two responses per row; generation's KV cache is separate.
    const longest = Math.max(training.maxLength, data.maxPromptTokens + generation.maxNewTokens);
    const plan: MemoryPlan = { maxBatch: 2 * training.batchSize, maxSeq: Math.min(longest, await contextLimit(m.path, 'model.path')) };
    const loaded = await loadPretrained(m.path, plan, { device: options.device });
    model = loaded.model;
    const tokenizer = loaded.tokenizer;
    const text = chatPolicyText(requireChatTokenizer(tokenizer, m.path), data.maxPromptTokens);
    // A tokenizer that does not fit the model would otherwise fail only once generation starts,
    // after the run directory and π_0 are written, as an out-of-range token id.
    const vocab = model.config.vocab_size;
    for (const prompt of [...split.iterations.flat(), ...split.evaluation]) {
      const id = text.promptIds(prompt).find((i) => i >= vocab);
      if (id !== undefined)
        throw new UsageError(`model.path: the tokenizer turns the prompt ${JSON.stringify(prompt.slice(0, 40))} into token id ${id}, but the model's vocab_size is ${vocab} (a tokenizer of another model?)`);
    }
    return { config, model, text, preference, split, sourceDir: config.model.path };
  } catch (err) {
    // Neither the policy nor an engine judge (a model of its own) may outlive a failed setup.
    await model?.dispose();
    await preference.dispose();
    throw err;
  }
}
