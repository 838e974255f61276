// The typed model: every slow call is a Promise that runs off the JavaScript thread, calls on
// one model run one at a time in the order they were made, AbortSignals are honoured before
// each call and between the steps of `train`, and `dispose` frees the native memory.
import { throwIfAborted } from '../util/abort.js';
import { CALL_FIELDS, checkFields, checkKind, describeValue, oneOf, toTokenBatch, type FieldCheck, type FieldKind } from './batch.js';
import { GENERATOR_PLAN_FIELDS, openGenerator, type Generator, type GeneratorPlan } from './generate.js';
import type { LoraOptions } from './lora.js';
import { planMemory, refusalMessage, type GradientPrecision, type MemoryPlanReport, type PlanOptions } from './memory.js';
import { native, type CudaInfo, type NativeModelHandle } from './native.js';
import { packPreferenceBatch, packSequences } from './preference.js';
import type {
  BatchInput,
  CallOptions,
  MemoryPlan,
  MemoryReport,
  ModelConfig,
  OptimizerConfig,
  RopeScalingConfig,
  ScheduleConfig,
  ParamInfo,
  PreferenceBatchInput,
  PreferenceEvalResult,
  PreferenceMetrics,
  PreferenceOptions,
  PreferenceStepResult,
  ForwardOptions,
  ResolvedModelConfig,
  SequenceInput,
  SequenceLogprobs,
  SequenceLogprobsOptions,
  StepResult,
  TrainOptions,
} from './types.js';

export type PresetName = 'tiny' | 'small';

/**
 * The model config's fields in config.json order, each with the kind of value it takes: the one
 * list of them in TypeScript (ModelConfig must have exactly these fields). The addon exports its
 * own list, `modelConfigFields`, which test/native-surface.test.ts checks against this one.
 */
export const MODEL_CONFIG_FIELDS = {
  vocab_size: 'int32',
  hidden_size: 'int32',
  num_hidden_layers: 'int32',
  num_attention_heads: 'int32',
  num_key_value_heads: 'int32',
  head_dim: 'int32',
  intermediate_size: 'int32',
  max_position_embeddings: 'int32',
  rms_norm_eps: 'number',
  rope_theta: 'number',
  rope_scaling: 'object',
  attention_bias: 'boolean',
  tie_word_embeddings: 'boolean',
  initializer_range: 'number',
  seed: 'uint53',
} as const satisfies Record<keyof ModelConfig, FieldKind>;

const ROPE_SCALING_FIELDS: Record<keyof RopeScalingConfig, FieldKind> = {
  rope_type: 'string',
  type: 'string',
  factor: 'number',
  low_freq_factor: 'number',
  high_freq_factor: 'number',
  original_max_position_embeddings: 'int32',
};
const MEMORY_PLAN_FIELDS: Record<keyof MemoryPlan, FieldKind> = { maxBatch: 'int32', maxSeq: 'int32' };
// Every field is required (there is no default rank); the values (rank within the projections'
// sizes, alpha > 0, known targets named once) are the engine's to check.
const LORA_FIELDS = {
  rank: 'int32',
  alpha: 'number',
  targets: (v, name) => {
    if (!Array.isArray(v) || v.some((t) => typeof t !== 'string'))
      throw new TypeError(`${name} must be an array of projection names (q_proj, k_proj, …), got ${describeValue(v)}`);
  },
} satisfies Record<keyof LoraOptions, FieldKind | FieldCheck>;

function checkLora(v: unknown, name: string): void {
  const fields = checkFields(v, name, LORA_FIELDS);
  for (const key of Object.keys(LORA_FIELDS))
    if (fields[key] === undefined || fields[key] === null) throw new TypeError(`${name}.${key} is required`);
}

const PLAN_OPTIONS_FIELDS = {
  device: 'string', // its value is the engine's to check, as for Model.create
  activationCheckpointing: (v, name) => {
    if (typeof v !== 'boolean' && v !== 'auto') throw new TypeError(`${name} must be true, false or 'auto', got ${describeValue(v)}`);
  },
  gradientPrecision: oneOf(['fp32', 'bf16', 'auto']),
  lora: checkLora,
  optimizer: 'object',
  generator: 'object',
  available: 'number',
} satisfies Record<keyof PlanOptions, FieldKind | FieldCheck>;
const CREATE_OPTIONS_FIELDS = { ...PLAN_OPTIONS_FIELDS, initialize: 'boolean' } satisfies Record<
  keyof CreateOptions,
  FieldKind | FieldCheck
>;
const OPTIMIZER_FIELDS: Record<keyof OptimizerConfig, FieldKind> = {
  kind: 'string',
  lr: 'number',
  beta1: 'number',
  beta2: 'number',
  alpha: 'number',
  eps: 'number',
  weightDecay: 'number',
  maxGradNorm: 'number',
  gradAccumSteps: 'int32',
  schedule: 'object',
};
const SCHEDULE_FIELDS: Record<keyof ScheduleConfig, FieldKind> = {
  kind: 'string',
  warmupSteps: 'int53',
  totalSteps: 'int53',
  minLrRatio: 'number',
};

// Each call's options: unknown fields are refused (a misspelt option would silently take its default).
const FORWARD_FIELDS = { ...CALL_FIELDS, output: oneOf(['logits', 'hidden', 'both']) } satisfies Record<
  keyof ForwardOptions,
  FieldKind | FieldCheck
>;
const TRAIN_FIELDS = { ...CALL_FIELDS, onProgress: 'function' } satisfies Record<keyof TrainOptions, FieldKind>;
const LOGPROBS_FIELDS = { ...CALL_FIELDS, perToken: 'boolean' } satisfies Record<keyof SequenceLogprobsOptions, FieldKind>;
// (loss names are checked with the batch, against PREFERENCE_LOSSES)
const PREFERENCE_FIELDS = { ...CALL_FIELDS, loss: 'string', eta: 'number' } satisfies Record<keyof PreferenceOptions, FieldKind>;

// The addon reads these objects trusting their fields' types; their values are the engine's to check.
function checkModelConfig(config: unknown): void {
  const fields = checkFields(config, 'config', MODEL_CONFIG_FIELDS);
  if (fields.rope_scaling != null) checkFields(fields.rope_scaling, 'config.rope_scaling', ROPE_SCALING_FIELDS);
}

function checkOptimizer(config: unknown): void {
  const fields = checkFields(config, 'optimizer', OPTIMIZER_FIELDS);
  if (fields.schedule != null) checkFields(fields.schedule, 'optimizer.schedule', SCHEDULE_FIELDS);
}

// A parameter's new values as float32: a Float32Array as it is, or an array (or typed array) of
// numbers that float32 holds finitely. Anything else (a string, an object with a length) is refused
// rather than coerced.
function float32Values(values: unknown, name: string): Float32Array {
  if (values instanceof Float32Array) return values;
  const numeric =
    Array.isArray(values) ||
    (ArrayBuffer.isView(values) &&
      !(values instanceof DataView) &&
      !(values instanceof BigInt64Array) &&
      !(values instanceof BigUint64Array));
  if (!numeric)
    throw new TypeError(`values of parameter '${name}' must be a Float32Array or an array of numbers, got ${describeValue(values)}`);
  const list = values as ArrayLike<unknown>;
  const out = new Float32Array(list.length);
  for (let i = 0; i < list.length; i++) {
    const x = list[i];
    if (typeof x !== 'number') throw new TypeError(`parameter '${name}' value at index ${i} must be a number, got ${describeValue(x)}`);
    if (!Number.isFinite(x)) throw new RangeError(`parameter '${name}' value at index ${i} is not finite`);
    out[i] = x;
    if (!Number.isFinite(out[i])) throw new RangeError(`parameter '${name}' value at index ${i} (${x}) is beyond float32's range`);
  }
  return out;
}

/** The engine's built-in sizes (the PyTorch CPU baseline's `tiny` and `small`). */
export function presetConfig(name: PresetName): ResolvedModelConfig {
  checkKind(name, 'string', 'preset name');
  return native().presetConfig(name) as unknown as ResolvedModelConfig;
}

/**
 * A config as the engine resolves it (num_key_value_heads and head_dim filled in), validated as
 * Model.create validates it: the sizes a model of this config has, without making one.
 */
export function resolveConfig(config: ModelConfig): ResolvedModelConfig {
  checkModelConfig(config);
  return native().resolveConfig(config) as unknown as ResolvedModelConfig;
}

/** Threads of the CPU backend (0 = one per core); refused while any model call is running. */
export function setNumThreads(n: number): void {
  checkKind(n, 'int32', 'threads');
  native().setNumThreads(n);
}

export function numThreads(): number {
  return native().numThreads();
}

/** The CUDA backend's status here: built into the addon, a usable GPU, and why not. */
export function cudaInfo(): CudaInfo {
  return native().cudaInfo();
}

export type { Device, GradientPrecision, MemoryPlanReport, PlanOptions } from './memory.js';

/**
 * Model.plan's options, which Model.create also checks its plan against (counting the optimizer
 * and generator given, which setOptimizer and createGenerator allocate later).
 */
export interface CreateOptions extends PlanOptions {
  /** false leaves every parameter zero, for callers that set all of them (loading a checkpoint) */
  initialize?: boolean;
}

// The options' fields are checked by kind above; these are the nested objects' own.
function checkPlanOptions(options: unknown, fields: Record<string, FieldKind | FieldCheck>): PlanOptions {
  const o = checkFields(options, 'options', fields) as PlanOptions;
  if (o.optimizer != null) checkFields(o.optimizer, 'options.optimizer', { kind: oneOf(['adamw', 'rmsprop']) });
  if (o.generator != null) checkFields(o.generator, 'options.generator', GENERATOR_PLAN_FIELDS);
  if (o.available !== undefined && !(o.available >= 0))
    throw new RangeError(`options.available must be a number of bytes >= 0, got ${o.available}`);
  return o;
}

export class Model {
  readonly config: ResolvedModelConfig;
  readonly plan: MemoryPlan;
  /** The backend the model lives on ('auto' resolved): 'cpu' (float32) or 'cuda' (bf16, fp32 master weights). */
  readonly device: 'cpu' | 'cuda';
  #handle: NativeModelHandle | undefined;
  #tail: Promise<unknown> = Promise.resolve();
  #pending = 0;

  /** Whether the backward recomputes each layer from its saved input ('auto' resolved). */
  readonly activationCheckpointing: boolean;
  /** What the gradients accumulate in ('auto' resolved). */
  readonly gradientPrecision: GradientPrecision;
  /** The adapters, when the model has them (its base is then frozen); undefined without LoRA. */
  readonly lora: LoraOptions | undefined;

  private constructor(handle: NativeModelHandle, plan: MemoryPlan, planned: MemoryPlanReport, lora: LoraOptions | undefined) {
    this.#handle = handle;
    this.config = handle.config() as unknown as ResolvedModelConfig;
    this.plan = { ...plan };
    this.device = handle.state().device ?? 'cpu';
    this.activationCheckpointing = planned.activationCheckpointing;
    this.gradientPrecision = planned.gradientPrecision;
    this.lora = lora && Object.freeze({ rank: lora.rank, alpha: lora.alpha, targets: Object.freeze([...lora.targets]) });
  }

  /**
   * Creates a model with seeded random weights. `config` is a Hugging Face-style config or a
   * preset name; `plan` fixes the largest batch the model will see, and all memory with it.
   * `initialize: false` leaves every parameter zero, for callers that set all of them (loading
   * a checkpoint), which skips drawing a random value per parameter. `device` picks the backend
   * (default 'cpu'; 'auto' takes the GPU when one is usable and says which in `model.device`).
   * `lora` adds low-rank adapters (PEFT's initialisation: the model starts as its base, also with
   * `initialize: false`) and freezes the base: training then updates the adapters alone.
   */
  static create(config: ModelConfig | PresetName, plan: MemoryPlan, options: CreateOptions = {}): Model {
    const cfg = typeof config === 'string' ? presetConfig(config) : config;
    checkModelConfig(cfg);
    checkFields(plan, 'plan', MEMORY_PLAN_FIELDS);
    checkPlanOptions(options, CREATE_OPTIONS_FIELDS);
    const planned = planMemory(cfg, plan, options);
    if (planned.available !== undefined && planned.total > planned.available)
      throw new RangeError(`Model.create: ${refusalMessage(cfg, plan, options, planned)}`);
    const handle = new (native().NativeModel)(cfg, plan, {
      device: planned.device,
      activationCheckpointing: planned.activationCheckpointing,
      bf16Gradients: planned.gradientPrecision === 'bf16',
      ...(options.lora && { lora: options.lora }),
      ...(options.initialize !== undefined && { initialize: options.initialize }),
    });
    return new Model(handle, plan, planned, options.lora);
  }

  /**
   * The bytes a model of this config and plan would take, by category (parameters, master
   * weights, gradients, optimizer state, activations, scratch, a generator's KV cache) and in
   * total, without allocating anything: the engine's own allocating code counts them over a
   * meta op set. Works for any device on any machine ('cuda' plans bf16 storage without a GPU);
   * 'auto' checkpointing is resolved against `available` as Model.create resolves it.
   */
  static plan(config: ModelConfig | PresetName, plan: MemoryPlan, options: PlanOptions = {}): MemoryPlanReport {
    const cfg = typeof config === 'string' ? presetConfig(config) : config;
    checkModelConfig(cfg);
    checkFields(plan, 'plan', MEMORY_PLAN_FIELDS);
    checkPlanOptions(options, PLAN_OPTIONS_FIELDS);
    return planMemory(cfg, plan, options);
  }

  get disposed(): boolean {
    return this.#handle === undefined;
  }

  /** Optimizer steps taken since setOptimizer. */
  get step(): number {
    return this.#live().state().step ?? 0;
  }

  #live(): NativeModelHandle {
    if (!this.#handle) throw new Error('the model has been disposed');
    return this.#handle;
  }

  // Runs `fn` after every earlier call on this model has settled.
  #enqueue<T>(fn: (h: NativeModelHandle) => Promise<T>, signal?: AbortSignal): Promise<T> {
    this.#pending++;
    const run = this.#tail.then(() => {
      throwIfAborted(signal);
      return fn(this.#live());
    });
    const settled = run.finally(() => this.#pending--);
    this.#tail = settled.catch(() => undefined);
    return settled;
  }

  #idle(): NativeModelHandle {
    const h = this.#live();
    if (this.#pending > 0) throw new Error('the model is busy with another call; await it before starting the next');
    return h;
  }

  /** Final hidden states (after the last RMSNorm) and/or logits, row-major (batch, seq, ·). */
  async forward(input: BatchInput, options: ForwardOptions = {}): Promise<{ logits?: Float32Array; hidden?: Float32Array }> {
    checkFields(options, 'options', FORWARD_FIELDS);
    const b = toTokenBatch(input);
    return this.#enqueue((h) => h.forward(b.tokens, b.batch, b.seq, options.output ?? 'logits'), options.signal);
  }

  /** Mean next-token cross-entropy over the batch's targets, without touching gradients. */
  async evalLoss(input: BatchInput, options: CallOptions = {}): Promise<{ loss: number; targetTokens: number }> {
    checkFields(options, 'options', CALL_FIELDS);
    const b = toTokenBatch(input);
    return this.#enqueue((h) => h.evalLoss(b.tokens, b.batch, b.seq, b.targetMask ?? null), options.signal);
  }

  /** Sets (or resets) the optimizer, its schedule and its state. */
  setOptimizer(config: OptimizerConfig): void {
    const h = this.#idle();
    checkOptimizer(config);
    h.setOptimizer(config);
  }

  /**
   * Forward and backward on one micro-batch; the optimizer steps once every gradAccumSteps
   * calls. A failed step (bad tokens, non-finite loss) discards the accumulated gradients and
   * leaves the parameters unchanged.
   */
  async trainStep(input: BatchInput, options: CallOptions = {}): Promise<StepResult> {
    checkFields(options, 'options', CALL_FIELDS);
    const b = toTokenBatch(input);
    return this.#enqueue((h) => h.trainStep(b.tokens, b.batch, b.seq, b.targetMask ?? null), options.signal);
  }

  /**
   * log π(response | prompt) for each sequence, summed over the response tokens in float64
   * (and each token's value with perToken), batched with the prompts masked out.
   */
  async sequenceLogprobs(items: readonly SequenceInput[], options: SequenceLogprobsOptions = {}): Promise<SequenceLogprobs> {
    checkFields(options, 'options', LOGPROBS_FIELDS);
    const b = packSequences(items, 'items');
    const r = await this.#enqueue(
      (h) => h.sequenceLogprobs(b.tokens, b.batch, b.seq, b.targetMask, options.perToken ?? false),
      options.signal,
    );
    const perTokenAll = r.perToken;
    if (!perTokenAll) return { sum: r.sum };
    const perToken = items.map((it, i) => {
      const start = i * b.seq + it.prompt.length;
      return perTokenAll.slice(start, start + it.response.length);
    });
    return { sum: r.sum, perToken };
  }

  /** The preference loss and TRL metrics of a batch, without touching gradients. */
  async evalPreference(input: PreferenceBatchInput, options: PreferenceOptions): Promise<PreferenceEvalResult> {
    const { metrics, logps } = await this.#preference('evalPreference', input, options);
    return { metrics, logps };
  }

  /**
   * One preference-optimisation micro-batch (SPPO, DPO, IPO …): forward, the fused LM head +
   * loss, backward, and the optimizer step when gradient accumulation completes.
   */
  async preferenceStep(input: PreferenceBatchInput, options: PreferenceOptions): Promise<PreferenceStepResult> {
    return this.#preference('preferenceStep', input, options);
  }

  async #preference(call: 'evalPreference' | 'preferenceStep', input: PreferenceBatchInput, options: PreferenceOptions) {
    checkFields(options, 'options', PREFERENCE_FIELDS);
    checkKind(options.eta, 'number', 'options.eta');
    const p = packPreferenceBatch(input, options.loss);
    const b = p.batch;
    // evalPreference's result has only metrics and logps; preferenceStep's adds the step fields.
    const r = (await this.#enqueue(
      (h) => h[call](b.tokens, b.batch, b.seq, b.targetMask, p.refLogp, p.target, options.loss, options.eta),
      options.signal,
    )) as StepResult & { metrics: Record<string, number>; logps: Float64Array };
    return { ...r, metrics: r.metrics as unknown as PreferenceMetrics };
  }

  /**
   * Trains on each batch in turn. The signal is checked between steps: on abort the promise
   * rejects with the signal's reason after the running step completes (its update is kept).
   */
  async train(batches: Iterable<BatchInput> | AsyncIterable<BatchInput>, options: TrainOptions = {}): Promise<StepResult[]> {
    checkFields(options, 'options', TRAIN_FIELDS);
    const results: StepResult[] = [];
    const total = Array.isArray(batches) ? batches.length : undefined;
    let index = 0;
    for await (const batch of batches) {
      throwIfAborted(options.signal);
      const result = await this.trainStep(batch, { signal: options.signal });
      results.push(result);
      options.onProgress?.({ index, total, result });
      index++;
    }
    return results;
  }

  /**
   * A sampler over this model's weights with its own paged KV cache, planned now: plan.maxBatch
   * sequences in flight at most, of up to plan.maxContext tokens, in a pool of plan.kvCacheBytes
   * (default: maxBatch × maxContext positions). Its calls queue with this model's other calls,
   * so it always samples from the weights as they are when the call starts.
   */
  createGenerator(plan: GeneratorPlan): Generator {
    return openGenerator(this.#live(), plan, (fn, signal) => this.#enqueue(() => fn(), signal));
  }

  /** Every parameter with its Hugging Face name (PEFT's module path for an adapter) and shape. */
  params(): ParamInfo[] {
    return this.#live().params();
  }

  /** The adapters' tensors by name (loraTensorName's), copied; empty without LoRA. */
  adapterTensors(): Map<string, Float32Array> {
    const h = this.#idle();
    return new Map(h.params().flatMap((p) => (p.adapter ? [[p.name, h.getParam(p.name)] as const] : [])));
  }

  /**
   * Overwrites every adapter tensor: `tensors` must hold each of the model's adapters (by
   * loraTensorName's name) with its size, and nothing else. All are checked before any is
   * written, so a bad map leaves the model unchanged.
   */
  setAdapterTensors(tensors: ReadonlyMap<string, Float32Array | ArrayLike<number>>): void {
    const h = this.#idle();
    if (!((tensors as unknown) instanceof Map))
      throw new TypeError(`adapter tensors must be a Map from tensor names to values, got ${describeValue(tensors)}`);
    const adapters = h.params().filter((p) => p.adapter);
    if (adapters.length === 0) throw new Error('the model has no adapters (create it with options.lora)');
    const known = new Set(adapters.map((p) => p.name));
    for (const name of tensors.keys())
      if (!known.has(name)) throw new RangeError(`'${name}' is not one of the model's adapter tensors (e.g. ${adapters[0].name})`);
    const values = adapters.map((p) => {
      const given = tensors.get(p.name);
      if (given === undefined) throw new RangeError(`adapter tensor '${p.name}' is missing`);
      const v = float32Values(given, p.name);
      const size = p.shape.reduce((a, b) => a * b, 1);
      if (v.length !== size)
        throw new RangeError(`adapter tensor '${p.name}' has ${v.length} values; its shape [${p.shape.join(', ')}] holds ${size}`);
      // (the engine checks too, but tensor by tensor: the earlier ones would be written already)
      const bad = v.findIndex((x) => !Number.isFinite(x));
      if (bad >= 0) throw new RangeError(`adapter tensor '${p.name}' value at index ${bad} is not finite`);
      return [p.name, v] as const;
    });
    for (const [name, v] of values) h.setParam(name, v);
  }

  /** A copy of one parameter, by Hugging Face name (e.g. model.layers.0.self_attn.q_proj.weight). */
  getParam(name: string): Float32Array {
    const h = this.#idle();
    checkKind(name, 'string', 'parameter name');
    return h.getParam(name);
  }

  /**
   * Overwrites one parameter from a Float32Array or an array of numbers; wrong sizes, values that are
   * not numbers and values float32 cannot hold finitely are refused, leaving it unchanged.
   */
  setParam(name: string, values: Float32Array | ArrayLike<number>): void {
    const h = this.#idle();
    checkKind(name, 'string', 'parameter name');
    h.setParam(name, float32Values(values, name));
  }

  /** Bytes allocated for parameters, master weights, gradients, optimizer state, activations and scratch. */
  memory(): MemoryReport {
    return this.#live().memory();
  }

  /** Waits for pending calls, then frees the native memory. Safe to call twice. */
  async dispose(): Promise<void> {
    await this.#tail;
    this.#handle?.dispose();
    this.#handle = undefined;
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.dispose();
  }
}
