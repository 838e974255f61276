// What a run's prompts must satisfy before any model is built, for the demo policy and Hugging
// Face directories alike: the split fits the prompt set, every prompt becomes token ids the
// model knows (its chat template renders it), and the longest prompt leaves room for
// generation.maxNewTokens in the model's context. Each failure is a SetupError naming the field to
// change and the numbers, instead of a stage failing after π_0 is built.
import { SetupError, type FieldPath } from '../config/errors.js';
import type { RunConfig } from '../config/schema.js';
import { SplitError, splitPrompts, type PromptSplit } from '../data/prompts.js';
import type { PolicyText } from './run.js';

/** The config field each split option comes from. */
const SPLIT_FIELDS: Record<SplitError['option'], FieldPath> = {
  prompts: ['data'],
  iterations: ['run', 'iterations'],
  evalSize: ['data', 'evalSize'],
  promptsPerIteration: ['data', 'promptsPerIteration'],
  seed: ['run', 'seed'],
};

/**
 * The config's split of `prompts` (data.evalSize held out, then run.iterations parts), or a
 * SetupError naming the field that does not fit; `source` says where the prompts came from
 * ("data.words = 600 generated words", "the 103 prompts of prompts.jsonl").
 */
export function splitForConfig(prompts: readonly string[], config: RunConfig, source: string): PromptSplit<string> {
  const { data, run } = config;
  try {
    return splitPrompts(prompts, {
      iterations: run.iterations,
      evalSize: data.evalSize,
      seed: run.seed,
      promptsPerIteration: data.promptsPerIteration,
    });
  } catch (err) {
    if (!(err instanceof SplitError)) throw err;
    const per = data.promptsPerIteration === undefined ? '' : `, data.promptsPerIteration ${data.promptsPerIteration}`;
    throw new SetupError(
      SPLIT_FIELDS[err.option],
      `${err.message} (the prompts: ${source}; data.evalSize ${data.evalSize}, run.iterations ${run.iterations}${per})`,
      { cause: err },
    );
  }
}

export interface PromptLimits {
  /** the model's vocabulary size */
  vocabSize: number;
  /** the model's context in tokens (max_position_embeddings) */
  context: number;
  /** where the context comes from, for messages: "max_position_embeddings in /m/config.json" */
  contextSource: string;
  /** the field a prompt the tokenizer or chat template cannot handle points to (model.path) */
  textField: FieldPath;
  /** whether `text` cuts prompts to their last data.maxPromptTokens tokens (a chat model's does; the demo's words are short) */
  truncates: boolean;
}

/**
 * Every prompt of `split` through `text.promptIds` (for a chat model: the chat template, then
 * left truncation to data.maxPromptTokens, the defined behaviour for long prompts): each must
 * render, give ids below the vocabulary size, and the longest must leave room for
 * generation.maxNewTokens in the context, as the generate stage requires.
 */
export function checkPrompts(split: PromptSplit<string>, text: PolicyText, config: RunConfig, limits: PromptLimits): void {
  const { vocabSize, context, contextSource, textField, truncates } = limits;
  let longest = { tokens: 0, prompt: '' };
  for (const prompt of [...split.iterations.flat(), ...split.evaluation]) {
    let ids: number[];
    try {
      ids = text.promptIds(prompt);
    } catch (err) {
      throw new SetupError(textField, `the prompt ${excerpt(prompt)} cannot be turned into tokens: ${(err as Error).message}`, {
        cause: err,
      });
    }
    const id = ids.find((i) => i >= vocabSize);
    if (id !== undefined)
      throw new SetupError(
        textField,
        `the tokenizer turns the prompt ${excerpt(prompt)} into token id ${id}, but the model's vocab_size is ${vocabSize} (a tokenizer of another model?)`,
      );
    if (ids.length > longest.tokens) longest = { tokens: ids.length, prompt };
  }
  const { maxNewTokens } = config.generation;
  if (longest.tokens + maxNewTokens > context) {
    const room = context - longest.tokens;
    const fixes = [
      ...(room >= 1 ? [`lower generation.maxNewTokens to ${room} or less`] : []),
      ...(truncates ? ['lower data.maxPromptTokens (prompts are cut to their last data.maxPromptTokens tokens)'] : []),
    ];
    const cut = truncates ? ` (data.maxPromptTokens ${config.data.maxPromptTokens})` : '';
    throw new SetupError(
      ['generation', 'maxNewTokens'],
      `the longest prompt (${excerpt(longest.prompt)}) takes ${longest.tokens} tokens${cut} and generation.maxNewTokens is ${maxNewTokens}: ${longest.tokens + maxNewTokens} tokens exceed the model's context of ${context} (${contextSource}); ${fixes.join(', or ')}`,
    );
  }
}

function excerpt(prompt: string): string {
  return JSON.stringify(prompt.length > 40 ? `${prompt.slice(0, 40)}…` : prompt);
}
