// Hugging Face model directories in and out: config.json + safetensors weights (+ tokenizer)
// → an engine Model, and an engine Model → a directory that transformers and vLLM load.
import { existsSync } from 'node:fs';
import { mkdir, readFile } from 'node:fs/promises';
import path from 'node:path';
import { Model, type PlanOptions } from '../engine/model.js';
import type { MemoryPlan, ParamInfo } from '../engine/types.js';
import { ConfigError, engineConfigFromHf, hfConfigFromEngine, type Architecture, type HfConfig } from './hf-config.js';
import { ReadScratch, type TensorSource } from './safetensors.js';
import { StagedFiles } from './staging.js';
import { Tokenizer, TOKENIZER_FILES, tokenizerFileTexts, type TokenizerFiles } from './tokenizer.js';
import { CheckpointWeights, removeStaleWeights, stageWeights } from './weights.js';
import { fileWriteError } from '../util/atomic-write.js';
import { parseJsonObject } from '../util/json.js';

export class CheckpointError extends Error {
  override name = 'CheckpointError';
}

/** Model.create's options for the new model (device, activation checkpointing, what its plan counts), and the load's own. */
export interface LoadOptions extends PlanOptions {
  /** refuse configs whose training behaviour the engine cannot match (dropout); default true */
  training?: boolean;
  /** the directory's tokenizer, already read (Tokenizer.fromDirectory), so that it is not read twice */
  tokenizer?: Tokenizer;
}

export interface Pretrained {
  model: Model;
  /** config.json as read */
  config: HfConfig;
  architecture: Architecture;
  /** present when the directory has a tokenizer.json */
  tokenizer?: Tokenizer;
}

// Derived buffers some exporters include; transformers recomputes and ignores them too.
const IGNORED_TENSOR = /(^|\.)rotary_emb\.inv_freq$/;
const TIED_HEAD = 'lm_head.weight';
const EMBEDDING = 'model.embed_tokens.weight';

/**
 * A model directory's config.json as a JSON object; a syntax error names the file, the line
 * and the column, and anything but an object is refused.
 */
export async function readHfConfig(file: string): Promise<HfConfig> {
  if (!existsSync(file)) throw new CheckpointError(`${file}: not found`);
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (e) {
    throw new CheckpointError(`${file}: cannot be read (${(e as Error).message})`, { cause: e });
  }
  return parseJsonObject(text, file, ConfigError);
}

/** Up to eight names, quoted, and how many more. */
export function listed(names: readonly string[]): string {
  const shown = names
    .slice(0, 8)
    .map((n) => `'${n}'`)
    .join(', ');
  return names.length > 8 ? `${shown} and ${names.length - 8} more` : shown;
}

/** The model's parameters a Hugging Face checkpoint holds: all but LoRA adapters (a PEFT adapter directory's, lib/io/peft.ts). */
function checkpointParams(model: Model): ParamInfo[] {
  return model.params().filter((p) => !p.adapter);
}

/** Checks the checkpoint's tensor names and shapes against the model's before any is read. */
function checkTensorTable(weights: CheckpointWeights, model: Model): void {
  const expected = new Map(checkpointParams(model).map((p) => [p.name, p.shape]));
  const tied = model.config.tie_word_embeddings;
  const missing = [...expected.keys()].filter((n) => !weights.tensors.has(n));
  const unexpected = [...weights.tensors.keys()].filter((n) => !expected.has(n) && !IGNORED_TENSOR.test(n) && !(tied && n === TIED_HEAD));
  if (!tied && missing.includes(TIED_HEAD)) {
    throw new CheckpointError(
      `${weights.dir}: '${TIED_HEAD}' is missing and tie_word_embeddings is false (an untied model needs its own output head)`,
    );
  }
  if (missing.length > 0)
    throw new CheckpointError(`${weights.dir}: the checkpoint lacks ${missing.length} tensor(s) the model needs: ${listed(missing)}`);
  if (unexpected.length > 0)
    throw new CheckpointError(
      `${weights.dir}: the checkpoint has ${unexpected.length} tensor(s) the model does not: ${listed(unexpected)}`,
    );
  for (const [name, shape] of expected) {
    const t = weights.tensor(name);
    if (t.shape.length !== shape.length || t.shape.some((d, i) => d !== shape[i])) {
      throw new CheckpointError(
        `${t.file.path}: tensor '${name}' has shape [${t.shape.join(', ')}] but the config gives [${shape.join(', ')}]`,
      );
    }
  }
  if (tied && weights.tensors.has(TIED_HEAD)) {
    const t = weights.tensor(TIED_HEAD);
    const e = weights.tensor(EMBEDDING).shape; // checked against the config's in the loop above
    if (t.shape.join() !== e.join())
      throw new CheckpointError(`${t.file.path}: tied '${TIED_HEAD}' has shape [${t.shape.join(', ')}], the embedding [${e.join(', ')}]`);
  }
}

/**
 * Loads a Hugging Face model directory (config.json, model.safetensors or sharded with
 * model.safetensors.index.json, and tokenizer files when present) into a new engine model
 * planned for `plan`. Weights are read one tensor at a time. With options.lora the checkpoint is
 * the frozen base, and the adapters start as PEFT initialises them (the model computes the base).
 */
export async function loadPretrained(dir: string, plan: MemoryPlan, options: LoadOptions = {}): Promise<Pretrained> {
  const configFile = path.join(dir, 'config.json');
  const hf = await readHfConfig(configFile);
  const { config, architecture } = engineConfigFromHf(hf, { maxSeq: plan.maxSeq, training: options.training, label: configFile });
  const tokenizer = options.tokenizer ?? (existsSync(path.join(dir, 'tokenizer.json')) ? await Tokenizer.fromDirectory(dir) : undefined);
  const weights = await CheckpointWeights.open(dir);
  let model: Model | undefined;
  try {
    const { training: _training, tokenizer: _tokenizer, ...create } = options;
    model = Model.create(config, plan, { ...create, initialize: false }); // every parameter is read below
    checkTensorTable(weights, model);
    // setParam copies into the engine, so one pair of buffers serves every tensor.
    const scratch = new ReadScratch();
    for (const { name } of checkpointParams(model)) {
      const data = await weights.readFloat32(name, scratch);
      try {
        model.setParam(name, data);
      } catch (e) {
        throw new CheckpointError(`${weights.tensor(name).file.path}: tensor '${name}': ${(e as Error).message}`);
      }
    }
    if (model.config.tie_word_embeddings && weights.tensors.has(TIED_HEAD)) {
      // transformers would silently use the embedding; a different head means a broken export.
      const head = await weights.readFloat32(TIED_HEAD);
      const embedding = model.getParam(EMBEDDING);
      const i = head.findIndex((v, k) => v !== embedding[k]);
      if (i >= 0)
        throw new CheckpointError(
          `${weights.tensor(TIED_HEAD).file.path}: tie_word_embeddings is true but '${TIED_HEAD}' differs from '${EMBEDDING}' (first at element ${i})`,
        );
    }
    return { model, config: hf, architecture, tokenizer };
  } catch (e) {
    await model?.dispose();
    throw e;
  } finally {
    await weights.close();
  }
}

export interface SaveOptions {
  /** the model's source directory: its config.json is the template (architecture, token ids) and its tokenizer and generation config are copied */
  sourceDir?: string;
  /** a tokenizer to save with the model, in place of the source directory's tokenizer files */
  tokenizer?: TokenizerFiles;
  /** default: the source's architecture, else Qwen2ForCausalLM with q/k/v biases, else LlamaForCausalLM */
  architecture?: Architecture;
  /** shard above this many bytes of tensors (default 5 GB, as transformers) */
  maxShardBytes?: number;
  /**
   * with a LoRA model, write its frozen base (the weights its adapters sit on; the adapters are
   * saveAdapter's); without it a LoRA model is refused
   */
  frozenBase?: boolean;
  /** weight dtype on disk (default float32); bfloat16 rounds to nearest even */
  dtype?: 'float32' | 'bfloat16';
}

/**
 * Writes a complete model directory: config.json, generation_config.json, the weights
 * (model.safetensors, or shards and their index) and the tokenizer files (options.tokenizer's,
 * else the source's). Every file is written in full under a temporary name first and renamed
 * into place only when all are written, so a failure leaves an earlier save in `dir` intact.
 * Returns the files written. A model with LoRA adapters is refused (saved alone, its base would
 * drop them) unless options.frozenBase asks for that base: save the adapters with saveAdapter,
 * and merge with mergeAdapter (lib/io/peft.ts).
 */
export async function savePretrained(model: Model, dir: string, options: SaveOptions = {}): Promise<string[]> {
  if (model.lora && !options.frozenBase)
    throw new CheckpointError(
      `the model has LoRA adapters, which a Hugging Face checkpoint of its weights would drop: save them with saveAdapter ` +
        `(a PEFT adapter directory over the base; frozenBase: true saves that base), or merge them into the base checkpoint with mergeAdapter`,
    );
  const dtype = options.dtype ?? 'float32';
  if (dtype !== 'float32' && dtype !== 'bfloat16') throw new RangeError(`dtype must be 'float32' or 'bfloat16', got '${String(dtype)}'`);
  const source = options.sourceDir ? await readHfConfig(path.join(options.sourceDir, 'config.json')) : undefined;
  const hf = hfConfigFromEngine(model.config, { source, architecture: options.architecture, dtype });
  const what = `the checkpoint in ${dir}`;
  try {
    await mkdir(dir, { recursive: true });
  } catch (e) {
    throw fileWriteError(e, dir, 'the checkpoint folder');
  }

  const staging = new StagedFiles(what);
  try {
    const tensors: TensorSource[] = checkpointParams(model).map((p) => ({
      name: p.name,
      shape: p.shape,
      data: () => model.getParam(p.name),
    }));
    const weightFiles = await stageWeights(
      dir,
      tensors,
      { maxShardBytes: options.maxShardBytes, dtype: dtype === 'bfloat16' ? 'BF16' : 'F32' },
      staging,
    );
    await staging.writeText(path.join(dir, 'config.json'), JSON.stringify(hf, null, 2) + '\n');

    const sourceFile = (name: string) => (options.sourceDir ? path.join(options.sourceDir, name) : undefined);
    const generation = sourceFile('generation_config.json');
    if (generation && existsSync(generation)) await staging.copy(generation, path.join(dir, 'generation_config.json'));
    else {
      const ids = Object.fromEntries(
        ['bos_token_id', 'eos_token_id', 'pad_token_id'].filter((k) => hf[k] !== undefined).map((k) => [k, hf[k]]),
      );
      await staging.writeText(
        path.join(dir, 'generation_config.json'),
        JSON.stringify({ _from_model_config: true, ...ids }, null, 2) + '\n',
      );
    }
    if (options.tokenizer) {
      for (const [name, text] of tokenizerFileTexts(options.tokenizer)) await staging.writeText(path.join(dir, name), text);
    } else {
      for (const name of TOKENIZER_FILES) {
        const from = sourceFile(name);
        if (from && existsSync(from)) await staging.copy(from, path.join(dir, name));
      }
    }
    const written = staging.targets;
    await staging.commit();
    await removeStaleWeights(dir, weightFiles);
    return written;
  } catch (e) {
    await staging.abort();
    throw e;
  }
}
