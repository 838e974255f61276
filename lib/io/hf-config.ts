// The one mapping between a Hugging Face config.json and the engine's ModelConfig, both ways.
//
// The engine implements one decoder (RMSNorm, rotate-half RoPE, GQA, SwiGLU, optional q/k/v
// bias, tied or untied head). A config is accepted only when transformers would build exactly
// that network from it: every field is either mapped, checked to hold a value the engine
// matches, or known not to affect the math (token ids, dtype, cache flags …). Anything else is
// refused with the field's name rather than silently giving a different model.
import { MODEL_CONFIG_FIELDS } from '../engine/model.js';
import type { ModelConfig, ResolvedModelConfig, RopeScalingConfig } from '../engine/types.js';

export type Architecture = 'LlamaForCausalLM' | 'MistralForCausalLM' | 'Qwen2ForCausalLM';
/** A parsed config.json. */
export type HfConfig = Record<string, unknown>;

export class ConfigError extends Error {
  override name = 'ConfigError';
}

const MODEL_TYPE: Record<Architecture, string> = {
  LlamaForCausalLM: 'llama',
  MistralForCausalLM: 'mistral',
  Qwen2ForCausalLM: 'qwen2',
};

/** transformers' class defaults for fields a config may omit. */
const DEFAULTS: Record<Architecture, { num_key_value_heads?: number; rms_norm_eps: number; rope_theta: number }> = {
  LlamaForCausalLM: { rms_norm_eps: 1e-6, rope_theta: 10000 }, // kv heads default to attention heads
  MistralForCausalLM: { num_key_value_heads: 8, rms_norm_eps: 1e-6, rope_theta: 10000 },
  Qwen2ForCausalLM: { num_key_value_heads: 32, rms_norm_eps: 1e-6, rope_theta: 10000 },
};

/** Fields with no effect on the network's math (ids, bookkeeping, inference flags). */
const HARMLESS = new Set([
  '_name_or_path',
  'transformers_version',
  'torch_dtype',
  'dtype',
  'use_cache',
  'bos_token_id',
  'eos_token_id',
  'pad_token_id',
  'pretraining_tp',
  'output_attentions',
  'output_hidden_states',
  'return_dict',
  'tokenizer_class',
  'id2label',
  'label2id',
  'problem_type',
  'torchscript',
  'chunk_size_feed_forward',
]);

/**
 * Fields this module reads and checks itself: the engine's model config (config.json spells
 * them the same; `seed` is the engine's own) and the Hugging Face fields that decide whether the
 * engine can run the architecture.
 */
const HANDLED = new Set<string>([
  ...Object.keys(MODEL_CONFIG_FIELDS).filter((k) => k !== 'seed'),
  'architectures',
  'model_type',
  'rope_parameters',
  'hidden_act',
  'mlp_bias',
  'attention_dropout',
  'sliding_window',
  'use_sliding_window',
  'max_window_layers',
  'layer_types',
]);

const REQUIRED = [
  'vocab_size',
  'hidden_size',
  'num_hidden_layers',
  'num_attention_heads',
  'intermediate_size',
  'max_position_embeddings',
] as const;

const ROPE_FIELDS: Record<string, string[]> = {
  default: [],
  linear: ['factor'],
  llama3: ['factor', 'low_freq_factor', 'high_freq_factor', 'original_max_position_embeddings'],
};

export interface FromHfOptions {
  /** the longest sequence the model will see (plan.maxSeq); bounds Mistral's sliding window */
  maxSeq?: number;
  /** refuse attention_dropout ≠ 0, which the engine does not implement (default true) */
  training?: boolean;
  /** names the source in errors, e.g. the config.json path */
  label?: string;
}

/** A config value in a message: objects and arrays as JSON, anything else as String() writes it. */
function shown(v: unknown): string {
  return typeof v === 'object' && v !== null ? JSON.stringify(v) : String(v);
}

function architectureOf(hf: HfConfig, fail: (m: string) => never): Architecture {
  const known = Object.keys(MODEL_TYPE) as Architecture[];
  let arch: Architecture | undefined;
  if (hf.architectures !== undefined && hf.architectures !== null) {
    const list = hf.architectures;
    if (!Array.isArray(list) || list.length !== 1 || typeof list[0] !== 'string') {
      fail(`architectures must list one architecture, got ${JSON.stringify(list)}`);
    }
    if (!known.includes((list as string[])[0] as Architecture)) {
      fail(`architecture '${(list as string[])[0]}' is not supported (supported: ${known.join(', ')})`);
    }
    arch = (list as string[])[0] as Architecture;
  }
  if (hf.model_type !== undefined) {
    const fromType = known.find((a) => MODEL_TYPE[a] === hf.model_type);
    if (!fromType) fail(`model_type '${shown(hf.model_type)}' is not supported (supported: ${Object.values(MODEL_TYPE).join(', ')})`);
    if (arch && arch !== fromType) fail(`model_type '${MODEL_TYPE[fromType]}' does not match architecture '${arch}'`);
    arch = fromType;
  }
  // A config naming neither is a bare Llama config (the engine's own family).
  return arch ?? 'LlamaForCausalLM';
}

/** rope_theta and scaling from either form: 4.x (rope_theta + rope_scaling) or 5.x (rope_parameters). */
function ropeOf(hf: HfConfig, arch: Architecture, fail: (m: string) => never): { theta: number; scaling: RopeScalingConfig | null } {
  let theta = hf.rope_theta;
  let scaling = hf.rope_scaling ?? null;
  let field = 'rope_scaling';
  if (hf.rope_parameters !== undefined && hf.rope_parameters !== null) {
    if (scaling !== null) fail('rope_parameters and rope_scaling are both set; give one');
    const rp = hf.rope_parameters;
    if (typeof rp !== 'object' || Array.isArray(rp)) fail('rope_parameters must be an object');
    const { rope_theta, ...rest } = rp as Record<string, unknown>;
    if (rope_theta !== undefined && theta !== undefined && rope_theta !== theta) {
      fail(`rope_theta (${shown(theta)}) and rope_parameters.rope_theta (${shown(rope_theta)}) disagree`);
    }
    theta = rope_theta ?? theta;
    scaling = rest;
    field = 'rope_parameters';
  }
  theta ??= DEFAULTS[arch].rope_theta;
  if (typeof theta !== 'number' || !(theta > 0)) fail(`rope_theta must be a positive number, got ${JSON.stringify(theta)}`);
  if (scaling === null) return { theta, scaling: null };
  if (typeof scaling !== 'object' || Array.isArray(scaling)) fail(`${field} must be an object or null`);
  const s = scaling as Record<string, unknown>;
  if (s.rope_type !== undefined && s.type !== undefined && s.rope_type !== s.type) fail(`${field}.rope_type and ${field}.type disagree`);
  const kind = s.rope_type ?? s.type ?? 'default';
  if (typeof kind !== 'string' || !(kind in ROPE_FIELDS)) {
    fail(`${field}.rope_type '${shown(kind)}' is not supported (supported: ${Object.keys(ROPE_FIELDS).join(', ')})`);
  }
  const allowed = ROPE_FIELDS[kind];
  const extra = Object.keys(s).filter((k) => k !== 'rope_type' && k !== 'type' && !allowed.includes(k));
  if (extra.length > 0) fail(`${field}.${extra[0]} is not supported with rope_type '${kind}'`);
  if (kind === 'default') return { theta, scaling: null };
  const out: Record<string, unknown> = { rope_type: kind };
  for (const k of allowed) {
    if (typeof s[k] !== 'number') fail(`${field}.${k} must be a number for rope_type '${kind}', got ${JSON.stringify(s[k])}`);
    out[k] = s[k];
  }
  return { theta, scaling: out };
}

/**
 * config.json → the engine's ModelConfig. Throws ConfigError naming the first field the engine
 * cannot honour exactly.
 */
export function engineConfigFromHf(hf: HfConfig, options: FromHfOptions = {}): { config: ModelConfig; architecture: Architecture } {
  const label = options.label ?? 'config.json';
  // typed on the name, so that TypeScript narrows after each `… fail(…)`
  const fail: (msg: string) => never = (msg) => {
    throw new ConfigError(`${label}: ${msg}`);
  };
  if (typeof hf !== 'object' || hf === null || Array.isArray(hf)) fail('must be a JSON object');
  const arch = architectureOf(hf, fail);

  for (const k of Object.keys(hf)) {
    if (k === 'quantization_config') fail('quantized checkpoints (quantization_config) are not supported; load the unquantized weights');
    if (!HARMLESS.has(k) && !HANDLED.has(k)) fail(`field '${k}' is not supported by the engine (it may change the ${arch} architecture)`);
  }
  for (const k of REQUIRED) if (hf[k] === undefined || hf[k] === null) fail(`field '${k}' is required`);

  const act = hf.hidden_act ?? 'silu';
  if (act !== 'silu') fail(`hidden_act '${shown(act)}' is not supported (the engine's MLP is SwiGLU: silu)`);
  if (hf.mlp_bias !== undefined && hf.mlp_bias !== false) fail('mlp_bias must be false (the engine has no MLP biases)');

  // Which attention biases exist is fixed per architecture in transformers: Qwen2 always has
  // q/k/v biases (and ignores attention_bias); Llama's attention_bias also adds an o_proj bias,
  // which the engine does not have; Mistral has none.
  const attentionBias = arch === 'Qwen2ForCausalLM';
  if (arch !== 'Qwen2ForCausalLM' && hf.attention_bias !== undefined && hf.attention_bias !== false) {
    fail(`attention_bias must be false for ${arch} (its o_proj bias is not supported)`);
  }

  const dropout = hf.attention_dropout ?? 0;
  if (typeof dropout !== 'number' || dropout < 0 || dropout >= 1)
    fail(`attention_dropout must be a number in [0, 1), got ${JSON.stringify(dropout)}`);
  if (dropout !== 0 && (options.training ?? true)) {
    fail(
      `attention_dropout ${String(dropout)} is not supported for training (the engine has no dropout); set it to 0 or load with training: false`,
    );
  }

  const maxPositions = hf.max_position_embeddings as number;
  const maxSeq = options.maxSeq ?? maxPositions;
  if (arch === 'MistralForCausalLM') {
    const w = hf.sliding_window ?? null;
    if (w !== null && !(typeof w === 'number' && Number.isSafeInteger(w) && w > 0))
      fail(`sliding_window must be a positive integer or null, got ${JSON.stringify(w)}`);
    // Within the window, sliding-window attention is ordinary causal attention.
    if (w !== null && maxSeq > w) {
      fail(
        `sliding_window ${w} is smaller than the longest sequence planned (${maxSeq}); the engine has no sliding-window attention, so plan maxSeq <= ${w}`,
      );
    }
  } else if (arch === 'Qwen2ForCausalLM') {
    if (hf.use_sliding_window !== undefined && hf.use_sliding_window !== false)
      fail('use_sliding_window must be false (the engine has no sliding-window attention)');
    const layerTypes = hf.layer_types;
    if (layerTypes !== undefined && layerTypes !== null) {
      if (!Array.isArray(layerTypes) || layerTypes.some((t) => t !== 'full_attention'))
        fail(`layer_types must all be 'full_attention', got ${JSON.stringify(layerTypes)}`);
    }
  } else {
    for (const k of ['sliding_window', 'use_sliding_window', 'max_window_layers', 'layer_types']) {
      if (hf[k] !== undefined && hf[k] !== null) fail(`field '${k}' is not a ${arch} field`);
    }
  }

  const tie = hf.tie_word_embeddings ?? false;
  if (typeof tie !== 'boolean') fail(`tie_word_embeddings must be a boolean, got ${JSON.stringify(tie)}`);
  const { theta, scaling } = ropeOf(hf, arch, fail);

  const config: ModelConfig = {
    vocab_size: hf.vocab_size as number,
    hidden_size: hf.hidden_size as number,
    num_hidden_layers: hf.num_hidden_layers as number,
    num_attention_heads: hf.num_attention_heads as number,
    num_key_value_heads: (hf.num_key_value_heads ?? DEFAULTS[arch].num_key_value_heads ?? hf.num_attention_heads) as number,
    intermediate_size: hf.intermediate_size as number,
    max_position_embeddings: maxPositions,
    rms_norm_eps: (hf.rms_norm_eps ?? DEFAULTS[arch].rms_norm_eps) as number,
    rope_theta: theta,
    rope_scaling: scaling,
    attention_bias: attentionBias,
    tie_word_embeddings: tie,
  };
  if (hf.head_dim !== undefined && hf.head_dim !== null) config.head_dim = hf.head_dim as number;
  if (typeof hf.initializer_range === 'number') config.initializer_range = hf.initializer_range;
  return { config, architecture: arch };
}

export interface ToHfOptions {
  /** the source config.json: its architecture, token ids and form (4.x or 5.x) are kept */
  source?: HfConfig;
  /** default: the source's, else Qwen2ForCausalLM for q/k/v biases, else LlamaForCausalLM */
  architecture?: Architecture;
  /** the dtype the weights are saved in */
  dtype?: 'float32' | 'bfloat16';
}

/** Kept from the source config: they describe the checkpoint, not the network. */
const CARRIED = ['bos_token_id', 'eos_token_id', 'pad_token_id', 'use_cache', 'initializer_range', 'attention_dropout', 'pretraining_tp'];

/** The engine's resolved config → a config.json that transformers and vLLM build the same network from. */
export function hfConfigFromEngine(engine: ResolvedModelConfig, options: ToHfOptions = {}): HfConfig {
  const source = options.source;
  const sourceArch = source
    ? architectureOf(source, (m) => {
        throw new ConfigError(`source config: ${m}`);
      })
    : undefined;
  const arch = options.architecture ?? sourceArch ?? (engine.attention_bias ? 'Qwen2ForCausalLM' : 'LlamaForCausalLM');
  if (arch === 'Qwen2ForCausalLM' && !engine.attention_bias)
    throw new ConfigError('Qwen2ForCausalLM has q/k/v biases, but the model has none (attention_bias false)');
  if (arch !== 'Qwen2ForCausalLM' && engine.attention_bias)
    throw new ConfigError(`${arch} has no q/k/v biases, but the model has them: save as Qwen2ForCausalLM`);

  const out: HfConfig = { architectures: [arch], model_type: MODEL_TYPE[arch] };
  for (const k of CARRIED) if (source?.[k] !== undefined) out[k] = source[k];
  Object.assign(out, {
    vocab_size: engine.vocab_size,
    hidden_size: engine.hidden_size,
    intermediate_size: engine.intermediate_size,
    num_hidden_layers: engine.num_hidden_layers,
    num_attention_heads: engine.num_attention_heads,
    num_key_value_heads: engine.num_key_value_heads,
    head_dim: engine.head_dim,
    max_position_embeddings: engine.max_position_embeddings,
    hidden_act: 'silu',
    rms_norm_eps: engine.rms_norm_eps,
    tie_word_embeddings: engine.tie_word_embeddings,
  });
  out.initializer_range ??= engine.initializer_range;
  out.attention_dropout ??= 0;
  if (arch === 'LlamaForCausalLM') Object.assign(out, { attention_bias: false, mlp_bias: false });
  if (arch === 'MistralForCausalLM') out.sliding_window = source?.sliding_window ?? null;
  if (arch === 'Qwen2ForCausalLM') {
    Object.assign(out, {
      use_sliding_window: false,
      sliding_window: null,
      max_window_layers: source?.max_window_layers ?? engine.num_hidden_layers,
    });
  }

  const scaling = engine.rope_scaling ? { ...engine.rope_scaling } : null;
  if (scaling) delete scaling.type;
  if (source?.rope_parameters !== undefined) {
    out.rope_parameters = { rope_type: 'default', ...scaling, rope_theta: engine.rope_theta };
  } else {
    out.rope_theta = engine.rope_theta;
    out.rope_scaling = scaling;
  }
  out[source?.dtype !== undefined ? 'dtype' : 'torch_dtype'] = options.dtype ?? 'float32';
  return out;
}
