// Public types of the engine API. Model configs use Hugging Face config.json field names so a
// checkpoint's config can be passed as it is; Model.create checks their fields and types
// (MODEL_CONFIG_FIELDS in model.ts), the engine their values.
import type { PreferenceLossName } from './losses.js';

export type { PreferenceLossName };

export interface RopeScalingConfig {
  rope_type?: 'default' | 'linear' | 'llama3';
  /** transformers 4.x spelling of rope_type */
  type?: 'default' | 'linear' | 'llama3';
  factor?: number;
  low_freq_factor?: number;
  high_freq_factor?: number;
  original_max_position_embeddings?: number;
}

export interface ModelConfig {
  vocab_size: number;
  hidden_size: number;
  num_hidden_layers: number;
  num_attention_heads: number;
  /** defaults to num_attention_heads (multi-head attention) */
  num_key_value_heads?: number;
  /** defaults to hidden_size / num_attention_heads */
  head_dim?: number;
  intermediate_size: number;
  max_position_embeddings: number;
  rms_norm_eps?: number;
  rope_theta?: number;
  rope_scaling?: RopeScalingConfig | null;
  /** q/k/v projection biases (Qwen2) */
  attention_bias?: boolean;
  tie_word_embeddings?: boolean;
  /** standard deviation of the seeded normal initialisation */
  initializer_range?: number;
  /** initialisation seed: the same seed gives the same weights */
  seed?: number;
}

export type ResolvedModelConfig = Required<Omit<ModelConfig, 'rope_scaling'>> & { rope_scaling: RopeScalingConfig | null };

/** What memory is planned for, up front: every buffer holds maxBatch x maxSeq tokens. */
export interface MemoryPlan {
  maxBatch: number;
  maxSeq: number;
}

export interface ScheduleConfig {
  kind?: 'constant' | 'linear' | 'cosine';
  warmupSteps?: number;
  /** required for linear and cosine */
  totalSteps?: number;
  /** cosine floor as a fraction of lr */
  minLrRatio?: number;
}

export interface OptimizerConfig {
  kind?: 'adamw' | 'rmsprop';
  lr?: number;
  beta1?: number;
  beta2?: number;
  /** RMSprop smoothing constant (PyTorch's alpha) */
  alpha?: number;
  eps?: number;
  /** decoupled weight decay, applied to matrices (not norms or biases) */
  weightDecay?: number;
  /** global-norm gradient clipping; 0 disables */
  maxGradNorm?: number;
  /** micro-batches per optimizer step */
  gradAccumSteps?: number;
  schedule?: ScheduleConfig;
}

/**
 * A rectangular batch of token sequences. Token t of a row is a prediction target (from
 * position t-1) when targetMask[row * seq + t] is 1; without a mask every token after the
 * first is. Pad shorter sequences at the end and mask the padding out.
 */
export interface TokenBatch {
  tokens: Int32Array;
  batch: number;
  seq: number;
  targetMask?: Uint8Array;
}

/** Rows of token ids (all the same length), with an optional per-token target mask. */
export interface TokenRows {
  rows: number[][];
  targetMask?: number[][];
}

export type BatchInput = TokenBatch | TokenRows | number[][];

export interface StepResult {
  /** mean next-token cross-entropy over this micro-batch's targets */
  loss: number;
  targetTokens: number;
  /** whether the optimizer ran (gradient accumulation complete) */
  stepped: boolean;
  /** optimizer steps taken so far */
  step: number;
  /** learning rate of the step, when stepped */
  lr?: number;
  /** global gradient norm before clipping, when stepped */
  gradNorm?: number;
}

export interface ParamInfo {
  name: string;
  shape: number[];
  /** has gradients and optimizer state: every parameter without LoRA, the adapters alone with it */
  trainable: boolean;
  /** a LoRA factor, named as lib/engine/lora.ts's loraTensorName names it */
  adapter: boolean;
}

/** Bytes by what they hold, as the engine's allocating code counts them. */
export interface MemoryReport {
  /** the working parameters: float32 on the CPU, bf16 on CUDA */
  params: number;
  /** float32 master weights, where the parameters are narrower (CUDA) */
  master: number;
  /** gradients (float32) */
  grads: number;
  /** optimizer state (float32; AdamW two tensors, RMSprop one), from setOptimizer on */
  optimizer: number;
  /** what the forward pass keeps for the backward */
  activations: number;
  /** work buffers reused by every layer, the LM head's logits tile, index arrays, rotary tables */
  scratch: number;
  /** a generator's KV cache and step buffers (Model.plan with a generator; 0 in model.memory()) */
  kvCache: number;
  total: number;
}

export interface CallOptions {
  signal?: AbortSignal;
}

export interface ForwardOptions extends CallOptions {
  /** what to return: 'logits' (default), 'hidden' (the final hidden states) or 'both' */
  output?: 'logits' | 'hidden' | 'both';
}

export interface SequenceLogprobsOptions extends CallOptions {
  /** also return each response token's log-prob */
  perToken?: boolean;
}

export interface TrainProgress {
  /** index of the micro-batch just finished (0-based) and how many there are, if known */
  index: number;
  total?: number;
  result: StepResult;
}

export interface TrainOptions extends CallOptions {
  onProgress?: (p: TrainProgress) => void;
}

/** A prompt and a response, as token ids; log-probs are taken over the response only. */
export interface SequenceInput {
  prompt: number[];
  response: number[];
}

export interface PreferenceResponse {
  response: number[];
  /** log π_t(response | prompt) under the iteration's reference policy */
  refLogp: number;
  /** P̂(response ≻ π_t | prompt): read by sppo and sppo-pair */
  target?: number;
}

export interface PreferenceExample extends PreferenceResponse {
  prompt: number[];
}

export interface PreferencePair {
  prompt: number[];
  chosen: PreferenceResponse;
  rejected: PreferenceResponse;
  /** P(chosen ≻ rejected | prompt): read by sppo-single */
  q?: number;
}

/** `examples` for the sppo loss (every response with its own target), `pairs` for the others. */
export type PreferenceBatchInput = { examples: PreferenceExample[] } | { pairs: PreferencePair[] };

export interface PreferenceOptions extends CallOptions {
  loss: PreferenceLossName;
  /** η of the multiplicative-weights update (β = 1/η); the reference uses 1000 */
  eta: number;
}

/** TRL's metric names; the chosen / rejected entries exist for pair losses. */
export interface PreferenceMetrics {
  loss: number;
  'rewards/chosen'?: number;
  'rewards/rejected'?: number;
  'rewards/margins'?: number;
  'rewards/accuracies'?: number;
  'logps/chosen'?: number;
  'logps/rejected'?: number;
  'rewards/mean': number;
  'logps/mean': number;
}

export interface PreferenceEvalResult {
  metrics: PreferenceMetrics;
  /** log π_θ(response | prompt) per packed row (pairs: chosen, rejected, chosen, ...) */
  logps: Float64Array;
}

export interface PreferenceStepResult extends StepResult, PreferenceEvalResult {}

export interface SequenceLogprobs {
  /** Σ over response tokens of log π(token | prefix), one per sequence */
  sum: Float64Array;
  /** each response token's log-prob, when asked for */
  perToken?: Float64Array[];
}
