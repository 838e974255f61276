// PEFT LoRA adapter directories in and out — adapter_config.json and adapter_model.safetensors as
// PEFT's save_pretrained writes them, the layout that transformers + PEFT and vLLM's LoRA loader
// read — and the merge of an adapter into a full Hugging Face checkpoint.
//
// Adapter tensors travel as a Map keyed by lib/engine/lora.ts's loraTensorName names; on disk
// each name carries PEFT_TENSOR_PREFIX. Only what the engine computes is accepted: plain LoRA with
// scale alpha / r on whole projections of every layer. A PEFT option that changes the function
// (rsLoRA, DoRA, biases, per-layer ranks, layer subsets, extra trained modules) is refused by
// field name rather than silently loaded as something else.
import { existsSync, statSync } from 'node:fs';
import { mkdir, readdir, readFile, rm } from 'node:fs/promises';
import path from 'node:path';
import { LORA_TARGET_MODULE, LORA_TARGETS, loraTensorName, PEFT_TENSOR_PREFIX, type LoraOptions, type LoraTarget } from '../engine/lora.js';
import type { ResolvedModelConfig } from '../engine/types.js';
import { listed, readHfConfig } from './checkpoint.js';
import { engineConfigFromHf } from './hf-config.js';
import { ReadScratch, SafetensorsFile, writeSafetensorsTemp, type TensorSource } from './safetensors.js';
import { StagedFiles } from './staging.js';
import { TOKENIZER_FILES } from './tokenizer.js';
import { CheckpointWeights, removeStaleWeights, stageWeights } from './weights.js';
import { fileWriteError, isTemporaryOf, readCommitJournal, temporaryOwner } from '../util/atomic-write.js';
import { isProcessAlive } from '../util/lock.js';
import { parseJsonObject } from '../util/json.js';

export const ADAPTER_CONFIG_NAME = 'adapter_config.json';
export const ADAPTER_WEIGHTS_NAME = 'adapter_model.safetensors';
/**
 * saveAdapter's journal (commitTemporaries' CommitOptions): present only while the two files are
 * renamed into place, so one that remains says they may come from different saves.
 */
export const ADAPTER_SAVE_JOURNAL = 'adapter_save_incomplete.json';

export class AdapterError extends Error {
  override name = 'AdapterError';
}

/** The model sizes that fix every adapter tensor's shape. */
export type LoraModelShape = Pick<
  ResolvedModelConfig,
  'num_hidden_layers' | 'hidden_size' | 'intermediate_size' | 'num_attention_heads' | 'num_key_value_heads' | 'head_dim'
>;

export interface AdapterTensorShape {
  name: string;
  /** [rank, in] for lora_A, [out, rank] for lora_B */
  shape: [number, number];
}

/** [out, in] of a projection's weight, as Hugging Face stores it. */
function projectionShape(config: LoraModelShape, target: LoraTarget): [number, number] {
  const q = config.num_attention_heads * config.head_dim;
  const kv = config.num_key_value_heads * config.head_dim;
  switch (target) {
    case 'q_proj':
      return [q, config.hidden_size];
    case 'k_proj':
    case 'v_proj':
      return [kv, config.hidden_size];
    case 'o_proj':
      return [config.hidden_size, q];
    case 'gate_proj':
    case 'up_proj':
      return [config.intermediate_size, config.hidden_size];
    case 'down_proj':
      return [config.hidden_size, config.intermediate_size];
  }
}

/** Every adapter tensor, in order (layer, then LORA_TARGETS order, A then B), from each projection's [out, in]. */
function adapterShapes(
  layers: number,
  lora: Pick<LoraOptions, 'rank' | 'targets'>,
  projection: (layer: number, target: LoraTarget) => [number, number],
): AdapterTensorShape[] {
  const out: AdapterTensorShape[] = [];
  const targets = LORA_TARGETS.filter((t) => lora.targets.includes(t));
  for (let layer = 0; layer < layers; layer++) {
    for (const target of targets) {
      const [rows, cols] = projection(layer, target);
      out.push({ name: loraTensorName(layer, target, 'A'), shape: [lora.rank, cols] });
      out.push({ name: loraTensorName(layer, target, 'B'), shape: [rows, lora.rank] });
    }
  }
  return out;
}

/** Every adapter tensor the model has under `lora`, with its shape, in a fixed order: layer, target (LORA_TARGETS order), A then B. */
export function loraTensorShapes(config: LoraModelShape, lora: LoraOptions): AdapterTensorShape[] {
  checkLoraOptions(lora);
  return adapterShapes(config.num_hidden_layers, lora, (_, target) => projectionShape(config, target));
}

function checkLoraOptions(lora: LoraOptions): void {
  const fail = (msg: string): never => {
    throw new AdapterError(`lora.${msg}`);
  };
  if (typeof lora !== 'object' || lora === null) throw new AdapterError('lora must be an object {rank, alpha, targets}');
  if (!(Number.isSafeInteger(lora.rank) && lora.rank > 0)) fail(`rank must be a positive integer, got ${JSON.stringify(lora.rank)}`);
  if (!(typeof lora.alpha === 'number' && Number.isFinite(lora.alpha) && lora.alpha > 0))
    fail(`alpha must be a positive finite number, got ${String(lora.alpha)}`);
  if (!Array.isArray(lora.targets) || lora.targets.length === 0) fail(`targets must be a non-empty list of ${LORA_TARGETS.join(', ')}`);
  for (const t of lora.targets) {
    if (!(LORA_TARGETS as readonly unknown[]).includes(t))
      fail(`targets: unknown target ${JSON.stringify(t)} (known: ${LORA_TARGETS.join(', ')})`);
  }
  if (new Set(lora.targets).size !== lora.targets.length) fail(`targets lists a target twice: ${lora.targets.join(', ')}`);
}

/** The smallest float32 that bfloat16's round-to-nearest-even takes to infinity (bits 0x7f7f8000). */
const BF16_OVERFLOW = new Float32Array(new Uint32Array([0x7f7f8000]).buffer)[0];

function elements(shape: readonly number[]): number {
  return shape.reduce((a, d) => a * d, 1);
}

/**
 * adapter_config.json as PEFT writes it (sorted keys, as its save_pretrained), with the fields
 * of LoraConfig that PEFT ≥ 0.9 knows: older and newer PEFT and vLLM read them all (PEFT before
 * 0.11 refuses fields it does not know, so later additions are left out, at their defaults).
 */
function adapterConfigJson(lora: LoraOptions, baseModel: string | undefined): string {
  const config: Record<string, unknown> = {
    alpha_pattern: {},
    auto_mapping: null,
    base_model_name_or_path: baseModel ?? null,
    bias: 'none',
    fan_in_fan_out: false,
    inference_mode: true,
    init_lora_weights: true,
    layers_pattern: null,
    layers_to_transform: null,
    loftq_config: {},
    lora_alpha: lora.alpha,
    lora_dropout: 0.0,
    megatron_config: null,
    megatron_core: 'megatron.core',
    modules_to_save: null,
    peft_type: 'LORA',
    r: lora.rank,
    rank_pattern: {},
    revision: null,
    target_modules: LORA_TARGETS.filter((t) => lora.targets.includes(t)),
    task_type: 'CAUSAL_LM',
    use_dora: false,
    use_rslora: false,
  };
  return JSON.stringify(config, null, 2) + '\n';
}

export interface SaveAdapterOptions {
  lora: LoraOptions;
  /** the adapted model's sizes (a Model's config) */
  modelConfig: LoraModelShape;
  /** every adapter tensor, by loraTensorName name */
  tensors: ReadonlyMap<string, Float32Array>;
  /** base_model_name_or_path: the base model's hub id or directory (relative: from the loader's working directory, as PEFT reads it) */
  baseModel?: string;
}

/**
 * Writes a PEFT adapter directory: adapter_model.safetensors (float32, PEFT's tensor names) and
 * adapter_config.json. Every tensor is checked first (none missing or extra, each of its shape's
 * size and finite); both files are written in full under temporary names and renamed into place
 * only when both are complete, so a failure leaves an earlier adapter in `dir` intact. The two
 * renames cannot be one: ADAPTER_SAVE_JOURNAL records them while they run, so that a process
 * killed between them leaves a directory that loadAdapter refuses (naming the renames that finish
 * the save) rather than one that loads a config with tensors of another save. (A reader that
 * runs during a live save can still meet the two files mid-change: one process at a time.)
 * `baseModel` is written as given: a relative path means relative to the working directory of
 * whoever loads it, as PEFT reads it (see adapterBaseDir). Returns the files written.
 */
export async function saveAdapter(dir: string, options: SaveAdapterOptions): Promise<string[]> {
  const { lora, modelConfig, tensors, baseModel } = options;
  const expected = loraTensorShapes(modelConfig, lora);
  if (baseModel !== undefined && typeof baseModel !== 'string')
    throw new AdapterError(`baseModel must be a string, got ${typeof baseModel}`);
  const known = new Set(expected.map((t) => t.name));
  const extra = [...tensors.keys()].filter((n) => !known.has(n));
  if (extra.length > 0)
    throw new AdapterError(`${extra.length} tensor(s) are not adapter tensors of this model and LoRA: ${listed(extra)}`);
  const missing = expected.filter((t) => !tensors.has(t.name)).map((t) => t.name);
  if (missing.length > 0) throw new AdapterError(`${missing.length} adapter tensor(s) are missing: ${listed(missing)}`);
  const sources: TensorSource[] = [];
  for (const { name, shape } of expected) {
    const data = tensors.get(name);
    if (!(data instanceof Float32Array)) throw new AdapterError(`tensor '${name}' must be a Float32Array`);
    if (data.length !== elements(shape))
      throw new AdapterError(`tensor '${name}' has ${data.length} values but its shape [${shape.join(', ')}] needs ${elements(shape)}`);
    const bad = data.findIndex((v) => !Number.isFinite(v));
    if (bad >= 0) throw new AdapterError(`tensor '${name}' is not finite at element ${bad} (${data[bad]})`);
    sources.push({ name: PEFT_TENSOR_PREFIX + name, shape, data });
  }

  const what = `the LoRA adapter in ${dir}`;
  try {
    await mkdir(dir, { recursive: true });
  } catch (e) {
    throw fileWriteError(e, dir, 'the adapter folder');
  }
  const staging = new StagedFiles(what);
  try {
    const weights = path.join(dir, ADAPTER_WEIGHTS_NAME);
    await staging.stage(weights, () => writeSafetensorsTemp(weights, sources, { dtype: 'F32' }));
    // Staged last, so it is renamed into place only after the tensors it describes.
    await staging.writeText(path.join(dir, ADAPTER_CONFIG_NAME), adapterConfigJson(lora, baseModel));
    const written = staging.targets;
    await removeDeadSaves(dir);
    await staging.commit({ journal: path.join(dir, ADAPTER_SAVE_JOURNAL) });
    return written;
  } catch (e) {
    await staging.abort();
    throw e;
  }
}

/**
 * Removes the temporaries that saves killed in `dir` left (of processes that no longer run): the
 * save about to commit replaces what they were for, an interrupted save's pending renames included.
 */
async function removeDeadSaves(dir: string): Promise<void> {
  const targets = [ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME, ADAPTER_SAVE_JOURNAL];
  for (const name of await readdir(dir)) {
    const owner = temporaryOwner(name);
    if (owner !== undefined && !isProcessAlive(owner) && targets.some((t) => isTemporaryOf(name, t)))
      await rm(path.join(dir, name), { force: true });
  }
}

/**
 * adapter_config.json's JSON object, refused (naming the files and what finishes the save) while
 * a save's journal says the directory may mix two saves' files.
 */
async function readAdapterConfigObject(dir: string): Promise<{ file: string; config: Record<string, unknown> }> {
  const file = path.join(dir, ADAPTER_CONFIG_NAME);
  if (!existsSync(file)) throw new AdapterError(`${dir}: no ${ADAPTER_CONFIG_NAME} (not a PEFT adapter directory)`);
  const interrupted = await readCommitJournal(path.join(dir, ADAPTER_SAVE_JOURNAL));
  if (interrupted) {
    const { journal, writer, pending } = interrupted;
    const by = writer ? ` by process ${writer.pid} on ${writer.host}` : '';
    const finish =
      pending.length > 0
        ? `, or finish that save: ${pending.map((f) => `rename ${f.tmp} to ${f.target}`).join(', then ')}, and delete ${journal}`
        : '';
    throw new AdapterError(
      `${dir}: a save${by} stopped (or is still running) between renaming ${ADAPTER_WEIGHTS_NAME} and ${ADAPTER_CONFIG_NAME} into place ` +
        `(its journal ${journal} remains), so the two may come from different saves and neither is read; save the adapter again${finish}`,
    );
  }
  return { file, config: parseJsonObject(await readFile(file, 'utf8'), file, AdapterError) };
}

/**
 * The base model directory `adapterDir` names (base_model_name_or_path), or an AdapterError
 * saying why there is none here. A relative path is resolved against the process's working
 * directory, as PEFT does (AutoPeftModel hands the string to from_pretrained as is, and PeftModel
 * records the base's name_or_path as the user gave it), so that the engine and PEFT find the same
 * base; sppo run writes absolute paths, which both find from any working directory.
 */
export async function adapterBaseDir(adapterDir: string): Promise<string> {
  const { file, config } = await readAdapterConfigObject(adapterDir);
  const name = config.base_model_name_or_path;
  if (name === undefined || name === null || name === '')
    throw new AdapterError(`${adapterDir} is a LoRA adapter directory that names no base model (base_model_name_or_path)`);
  if (typeof name !== 'string') throw new AdapterError(`${file}: base_model_name_or_path must be a string, got ${JSON.stringify(name)}`);
  const dir = path.resolve(name);
  if (!existsSync(path.join(dir, 'config.json'))) {
    const resolved = path.isAbsolute(name) ? '' : ` (${dir}: a relative path is resolved against the working directory, as PEFT does)`;
    throw new AdapterError(`${adapterDir} is a LoRA adapter over ${name}, which is not a model directory here${resolved}`);
  }
  return dir;
}

/** An adapter directory's adapter_config.json, checked: the LoRA it describes. */
interface AdapterConfig {
  lora: LoraOptions;
}

const isEmpty = (v: unknown): boolean =>
  v === undefined ||
  v === null ||
  (Array.isArray(v) && v.length === 0) ||
  (typeof v === 'object' && v !== null && Object.keys(v).length === 0);

/**
 * PEFT options that change what the adapter computes, with the value that means "off" and why
 * each other value is refused. Fields not listed (init_lora_weights, inference_mode, revision,
 * base_model_name_or_path, layers_pattern without layers_to_transform, loftq_config, …) do not
 * change a loaded adapter's function; lora_dropout acts only in training.
 */
const UNSUPPORTED: readonly { field: string; off: (v: unknown) => boolean; why: string }[] = [
  {
    field: 'use_rslora',
    off: (v) => v === undefined || v === false,
    why: 'rank-stabilised scaling alpha/sqrt(r) is not supported (the engine scales by alpha/r)',
  },
  { field: 'use_dora', off: (v) => v === undefined || v === false, why: 'DoRA (weight-decomposed LoRA) is not supported' },
  { field: 'use_qalora', off: (v) => v === undefined || v === false, why: 'QA-LoRA is not supported' },
  {
    field: 'fan_in_fan_out',
    off: (v) => v === undefined || v === false,
    why: 'transposed (Conv1D) weights are not supported; Llama-family projections are nn.Linear',
  },
  { field: 'bias', off: (v) => v === undefined || v === 'none', why: "only bias 'none' is supported (the adapter trains no biases)" },
  { field: 'lora_bias', off: (v) => v === undefined || v === false, why: 'a bias on lora_B is not supported' },
  { field: 'layers_to_transform', off: isEmpty, why: 'adapters on a subset of layers are not supported (every layer is adapted)' },
  { field: 'rank_pattern', off: isEmpty, why: 'per-module ranks are not supported (one rank r for every projection)' },
  { field: 'alpha_pattern', off: isEmpty, why: 'per-module alphas are not supported (one lora_alpha for every projection)' },
  { field: 'modules_to_save', off: isEmpty, why: 'fully trained extra modules are not supported (only LoRA tensors are read)' },
  { field: 'exclude_modules', off: isEmpty, why: 'excluded modules are not supported (every layer is adapted)' },
  { field: 'layer_replication', off: isEmpty, why: 'layer replication is not supported' },
  { field: 'target_parameters', off: isEmpty, why: 'adapters on parameters (rather than modules) are not supported' },
  { field: 'trainable_token_indices', off: isEmpty, why: 'trainable token embeddings are not supported' },
  { field: 'alora_invocation_tokens', off: isEmpty, why: 'activated LoRA (aLoRA) is not supported' },
];

/** The projections `target_modules` selects, the same in every layer, or a refusal naming the problem. */
function resolveTargets(raw: unknown, layers: number, fail: (msg: string) => never): LoraTarget[] {
  // PEFT matches target_modules against each module's path in the CausalLM: a list entry matches a
  // path it equals or ends with after a dot; a string is a regular expression for the whole path,
  // except 'all-linear' (every linear layer but the output head: here the seven projections).
  const modulePath = (layer: number, t: LoraTarget) => `model.layers.${layer}.${LORA_TARGET_MODULE[t]}.${t}`;
  let matches: (p: string) => boolean;
  if (raw === 'all-linear') return [...LORA_TARGETS];
  if (typeof raw === 'string') {
    let re: RegExp;
    try {
      re = new RegExp(`^(?:${raw})$`);
    } catch (e) {
      return fail(
        `target_modules ${JSON.stringify(raw)} is not a regular expression this reader understands (${(e as Error).message}); list the modules instead`,
      );
    }
    matches = (p) => re.test(p);
  } else if (Array.isArray(raw) && raw.length > 0 && raw.every((t) => typeof t === 'string' && t.length > 0)) {
    const entries = raw as string[];
    for (const entry of entries) {
      if (
        !LORA_TARGETS.some((t) => {
          const p = modulePath(0, t);
          return p === entry || p.endsWith(`.${entry}`);
        })
      )
        fail(`target_modules entry '${entry}' is none of the projections the engine adapts (${LORA_TARGETS.join(', ')})`);
    }
    matches = (p) => entries.some((e) => p === e || p.endsWith(`.${e}`));
  } else {
    return fail(`target_modules must be a non-empty list of module names or a string, got ${JSON.stringify(raw)}`);
  }
  const targets = LORA_TARGETS.filter((t) => matches(modulePath(0, t)));
  for (const t of LORA_TARGETS) {
    for (let layer = 1; layer < layers; layer++) {
      if (matches(modulePath(layer, t)) !== targets.includes(t))
        fail(
          `target_modules ${JSON.stringify(raw)} adapts ${t} in some layers but not others (layers 0 and ${layer} differ); every layer must be adapted alike`,
        );
    }
  }
  if (targets.length === 0)
    fail(`target_modules ${JSON.stringify(raw)} matches none of the projections the engine adapts (${LORA_TARGETS.join(', ')})`);
  return targets;
}

async function readAdapterConfig(dir: string, layers: number): Promise<AdapterConfig> {
  const { file, config: c } = await readAdapterConfigObject(dir);
  const fail = (msg: string): never => {
    throw new AdapterError(`${file}: ${msg}`);
  };
  if (c.peft_type !== 'LORA') fail(`peft_type must be "LORA", got ${JSON.stringify(c.peft_type)} (only LoRA adapters are read)`);
  if (c.task_type !== undefined && c.task_type !== null && c.task_type !== 'CAUSAL_LM')
    fail(`task_type ${JSON.stringify(c.task_type)} is not supported (a causal language model's adapter has task_type "CAUSAL_LM")`);
  for (const { field, off, why } of UNSUPPORTED) if (!off(c[field])) fail(`${field} ${JSON.stringify(c[field])}: ${why}`);
  const r = c.r;
  if (!(typeof r === 'number' && Number.isSafeInteger(r) && r > 0)) fail(`r must be a positive integer, got ${JSON.stringify(r)}`);
  const alpha = c.lora_alpha;
  if (!(typeof alpha === 'number' && Number.isFinite(alpha) && alpha > 0))
    fail(`lora_alpha must be a positive number, got ${JSON.stringify(alpha)}`);
  const dropout = c.lora_dropout ?? 0;
  // Any dropout is accepted: it acts only while training, so the saved tensors mean the same with or without it.
  if (!(typeof dropout === 'number' && dropout >= 0 && dropout < 1))
    fail(`lora_dropout must be a number in [0, 1), got ${JSON.stringify(dropout)}`);
  const targets = resolveTargets(c.target_modules, layers, fail);
  return { lora: { rank: r as number, alpha: alpha as number, targets } };
}

/** The adapter tensors of adapter_model.safetensors by engine name, checked against `expected` (`against` names where the shapes come from). */
async function readAdapterTensors(
  dir: string,
  expected: readonly AdapterTensorShape[],
  against: string,
): Promise<Map<string, Float32Array>> {
  const file = path.join(dir, ADAPTER_WEIGHTS_NAME);
  if (!existsSync(file)) {
    const bin = existsSync(path.join(dir, 'adapter_model.bin'));
    throw new AdapterError(
      `${dir}: no ${ADAPTER_WEIGHTS_NAME}${bin ? ' (adapter_model.bin, a pickle, is not read: save the adapter with safe_serialization=True)' : ''}`,
    );
  }
  const f = await SafetensorsFile.open(file);
  try {
    const fail = (msg: string): never => {
      throw new AdapterError(`${file}: ${msg}`);
    };
    const wanted = new Map(expected.map((t) => [PEFT_TENSOR_PREFIX + t.name, t]));
    const extra = [...f.tensors.keys()].filter((n) => !wanted.has(n));
    if (extra.length > 0)
      fail(`${extra.length} tensor(s) that are not adapter tensors of ${against} under its adapter_config.json: ${listed(extra)}`);
    const present = [...wanted].flatMap(([stored, want]) => {
      const t = f.tensors.get(stored);
      return t ? [{ stored, ...want, t }] : [];
    });
    const missing = [...wanted.keys()].filter((n) => !f.tensors.has(n));
    if (missing.length > 0) fail(`${missing.length} adapter tensor(s) are missing: ${listed(missing)}`);
    const out = new Map<string, Float32Array>();
    for (const { stored, name, shape, t } of present) {
      if (t.shape.length !== 2 || t.shape[0] !== shape[0] || t.shape[1] !== shape[1])
        fail(`tensor '${stored}' has shape [${t.shape.join(', ')}] but ${against} needs [${shape.join(', ')}]`);
      if (t.dtype !== 'F32' && t.dtype !== 'BF16' && t.dtype !== 'F16')
        fail(`tensor '${stored}' has dtype ${t.dtype} (supported: F32, BF16, F16)`);
      const data = await f.readFloat32(stored);
      const bad = data.findIndex((v) => !Number.isFinite(v));
      if (bad >= 0) fail(`tensor '${stored}' is not finite at element ${bad} (${data[bad]})`);
      out.set(name, data);
    }
    return out;
  } finally {
    await f.close();
  }
}

export interface LoadedAdapter {
  lora: LoraOptions;
  /** every adapter tensor as float32, by loraTensorName name */
  tensors: Map<string, Float32Array>;
}

/**
 * Reads a PEFT LoRA adapter directory for a model of `modelConfig`'s sizes. Refuses, naming the
 * field or tensor: another PEFT method, options the engine does not compute (see UNSUPPORTED),
 * target modules other than the seven projections or not alike in every layer, and any tensor
 * missing, extra, of the wrong shape, of a dtype other than F32/BF16/F16, or not finite.
 */
export async function loadAdapter(dir: string, modelConfig: LoraModelShape): Promise<LoadedAdapter> {
  const { lora } = await readAdapterConfig(dir, modelConfig.num_hidden_layers);
  const tensors = await readAdapterTensors(dir, loraTensorShapes(modelConfig, lora), 'the model');
  return { lora, tensors };
}

export interface MergeOptions {
  /** the merged weights' dtype on disk; default bfloat16 when every base weight is BF16, else float32 */
  dtype?: 'float32' | 'bfloat16';
  /** shard above this many bytes of tensors (default 5 GB, as transformers) */
  maxShardBytes?: number;
}

const sameFile = (a: string, b: string): boolean => {
  if (path.resolve(a) === path.resolve(b)) return true;
  const [x, y] = [statSync(a, { throwIfNoEntry: false }), statSync(b, { throwIfNoEntry: false })];
  return x !== undefined && y !== undefined && x.dev === y.dev && x.ino === y.ino;
};

/**
 * float64 → the float32 nearest by round-to-odd: the float32 that then rounds to bfloat16 (round
 * to nearest even) as the float64 itself would, which rounding to nearest float32 first does not
 * always (a double rounding). Exact when x is a float32.
 */
function roundToOddFloat32(x: number, bits: Uint32Array, view: Float32Array): void {
  view[0] = x;
  if (view[0] !== x && (bits[0] & 1) === 0) {
    // The two float32s around x differ by one in their bits, and one is odd: move to it.
    bits[0] += Math.abs(view[0]) > Math.abs(x) ? -1 : 1;
  }
}

/**
 * Merges a LoRA adapter into a base Hugging Face checkpoint and writes a full checkpoint to
 * `outDir`: every base tensor, with W' = W + (alpha/r)·B·A for each adapted projection (computed
 * in float64, rounded once to the output dtype), the base's config.json (its dtype field set to
 * the output's), generation_config.json and tokenizer files. Sharded bases are read tensor by
 * tensor and written through stageWeights, one tensor in memory at a time (see below). All files
 * are staged and renamed into place together. Returns the files written.
 */
export async function mergeAdapter(baseDir: string, adapterDir: string, outDir: string, options: MergeOptions = {}): Promise<string[]> {
  if (options.dtype !== undefined && options.dtype !== 'float32' && options.dtype !== 'bfloat16')
    throw new RangeError(`dtype must be 'float32' or 'bfloat16', got '${String(options.dtype)}'`);
  for (const [dir, what] of [
    [baseDir, 'base'],
    [adapterDir, 'adapter'],
  ] as const) {
    if (sameFile(outDir, dir))
      throw new AdapterError(
        `the output directory is the ${what} directory (${path.resolve(dir)}); merging there would replace what it reads`,
      );
  }
  const configFile = path.join(baseDir, 'config.json');
  const hf = await readHfConfig(configFile);
  // Checked as the engine would load it (maxSeq 1: a merge plans no sequences), so that the merged checkpoint loads too.
  const { config } = engineConfigFromHf(hf, { maxSeq: 1, training: false, label: configFile });
  const layers = config.num_hidden_layers;
  const { lora } = await readAdapterConfig(adapterDir, layers);

  const weights = await CheckpointWeights.open(baseDir);
  try {
    const baseName = (layer: number, t: LoraTarget) => `model.layers.${layer}.${LORA_TARGET_MODULE[t]}.${t}.weight`;
    const expected = adapterShapes(layers, lora, (layer, t) => {
      const w = weights.tensor(baseName(layer, t));
      if (w.shape.length !== 2)
        throw new AdapterError(`${w.file.path}: '${baseName(layer, t)}' has shape [${w.shape.join(', ')}], not a matrix`);
      return [w.shape[0], w.shape[1]];
    });
    const adapter = await readAdapterTensors(adapterDir, expected, `the base model in ${baseDir}`);
    const scale = lora.alpha / lora.rank;
    const factor = (layer: number, t: LoraTarget, which: 'A' | 'B'): Float64Array => {
      const data = adapter.get(loraTensorName(layer, t, which));
      if (!data) throw new Error(`${loraTensorName(layer, t, which)} was checked but not read`);
      return Float64Array.from(data);
    };
    const adapted = new Map<string, { a: Float64Array; b: Float64Array }>();
    for (let layer = 0; layer < layers; layer++) {
      for (const t of lora.targets) {
        adapted.set(baseName(layer, t), { a: factor(layer, t, 'A'), b: factor(layer, t, 'B') });
      }
    }
    adapter.clear();

    const allBf16 = [...weights.tensors.values()].every((t) => t.dtype === 'BF16');
    const dtype = options.dtype ?? (allBf16 ? 'bfloat16' : 'float32');
    const bits = new Uint32Array(1);
    const one = new Float32Array(bits.buffer);
    // One scratch serves every tensor: the writer writes each tensor before asking for the next.
    const scratch = new ReadScratch();
    const tensors: TensorSource[] = [...weights.tensors].map(([name, t]) => ({
      name,
      shape: t.shape,
      data: async () => {
        const w = await weights.readFloat32(name, scratch);
        const ab = adapted.get(name);
        if (!ab) return w;
        const [rows, cols] = t.shape;
        const r = lora.rank;
        const delta = new Float64Array(cols);
        for (let i = 0; i < rows; i++) {
          delta.fill(0);
          for (let k = 0; k < r; k++) {
            const bik = ab.b[i * r + k];
            const aRow = k * cols;
            for (let j = 0; j < cols; j++) delta[j] += bik * ab.a[aRow + j];
          }
          for (let j = 0; j < cols; j++) {
            const x = w[i * cols + j] + scale * delta[j];
            if (!Number.isFinite(x) || Math.abs(x) > 3.4028234663852886e38)
              throw new AdapterError(
                `merging into '${name}' overflows at [${i}, ${j}] (${x}); the adapter or the base has values too large`,
              );
            if (dtype === 'bfloat16') roundToOddFloat32(x, bits, one);
            else one[0] = x;
            if (dtype === 'bfloat16' && Math.abs(one[0]) >= BF16_OVERFLOW)
              throw new AdapterError(
                `merging into '${name}' overflows bfloat16 at [${i}, ${j}] (${x}); the adapter or the base has values too large`,
              );
            w[i * cols + j] = one[0];
          }
        }
        return w;
      },
    }));

    try {
      await mkdir(outDir, { recursive: true });
    } catch (e) {
      throw fileWriteError(e, outDir, 'the merged checkpoint folder');
    }
    const staging = new StagedFiles(`the merged checkpoint in ${outDir}`);
    try {
      const weightFiles = await stageWeights(
        outDir,
        tensors,
        { maxShardBytes: options.maxShardBytes, dtype: dtype === 'bfloat16' ? 'BF16' : 'F32' },
        staging,
      );
      const dtypeKey = hf.dtype !== undefined ? 'dtype' : 'torch_dtype';
      if (hf[dtypeKey] === dtype) await staging.copy(configFile, path.join(outDir, 'config.json'));
      else await staging.writeText(path.join(outDir, 'config.json'), JSON.stringify({ ...hf, [dtypeKey]: dtype }, null, 2) + '\n');
      for (const name of ['generation_config.json', ...TOKENIZER_FILES]) {
        const from = path.join(baseDir, name);
        if (existsSync(from)) await staging.copy(from, path.join(outDir, name));
      }
      const written = staging.targets;
      await staging.commit();
      await removeStaleWeights(outDir, weightFiles);
      return written;
    } catch (e) {
      await staging.abort();
      throw e;
    }
  } finally {
    await weights.close();
  }
}
