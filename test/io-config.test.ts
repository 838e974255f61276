// config.json ↔ engine ModelConfig: real Llama 3.1 / Mistral / Qwen2 configs in the
// transformers 4.x and 5.x forms map to what the engine builds (and back, losslessly), and
// every field or value the engine cannot honour exactly is refused by name.
import { describe, expect, it } from 'vitest';
import { ConfigError, engineConfigFromHf, hfConfigFromEngine, Model, type HfConfig } from '../lib/index.js';

// The published config.json files of these models (as transformers 4.4x wrote them).
const llama31: HfConfig = {
  architectures: ['LlamaForCausalLM'],
  attention_bias: false,
  attention_dropout: 0.0,
  bos_token_id: 128000,
  eos_token_id: [128001, 128008, 128009],
  hidden_act: 'silu',
  hidden_size: 4096,
  initializer_range: 0.02,
  intermediate_size: 14336,
  max_position_embeddings: 131072,
  mlp_bias: false,
  model_type: 'llama',
  num_attention_heads: 32,
  num_hidden_layers: 32,
  num_key_value_heads: 8,
  pretraining_tp: 1,
  rms_norm_eps: 1e-5,
  rope_scaling: { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8192, rope_type: 'llama3' },
  rope_theta: 500000.0,
  tie_word_embeddings: false,
  torch_dtype: 'bfloat16',
  transformers_version: '4.43.0.dev0',
  use_cache: true,
  vocab_size: 128256,
};
const mistral: HfConfig = {
  architectures: ['MistralForCausalLM'],
  bos_token_id: 1,
  eos_token_id: 2,
  hidden_act: 'silu',
  hidden_size: 4096,
  initializer_range: 0.02,
  intermediate_size: 14336,
  max_position_embeddings: 32768,
  model_type: 'mistral',
  num_attention_heads: 32,
  num_hidden_layers: 32,
  num_key_value_heads: 8,
  rms_norm_eps: 1e-5,
  rope_theta: 10000.0,
  sliding_window: 4096,
  tie_word_embeddings: false,
  torch_dtype: 'bfloat16',
  transformers_version: '4.34.0.dev0',
  use_cache: true,
  vocab_size: 32000,
};
const qwen2: HfConfig = {
  architectures: ['Qwen2ForCausalLM'],
  attention_dropout: 0.0,
  bos_token_id: 151643,
  eos_token_id: 151643,
  hidden_act: 'silu',
  hidden_size: 896,
  initializer_range: 0.02,
  intermediate_size: 4864,
  max_position_embeddings: 32768,
  max_window_layers: 24,
  model_type: 'qwen2',
  num_attention_heads: 14,
  num_hidden_layers: 24,
  num_key_value_heads: 2,
  rms_norm_eps: 1e-6,
  rope_theta: 1000000.0,
  sliding_window: 32768,
  tie_word_embeddings: true,
  torch_dtype: 'bfloat16',
  transformers_version: '4.40.1',
  use_cache: true,
  use_sliding_window: false,
  vocab_size: 151936,
};
/** The same Llama 3.1 config as transformers 5 writes it: rope_parameters and dtype. */
function v5(c: HfConfig): HfConfig {
  const { rope_theta, rope_scaling, torch_dtype, ...rest } = c;
  return { ...rest, dtype: torch_dtype, rope_parameters: { ...(rope_scaling ?? { rope_type: 'default' }), rope_theta } };
}

const refuse = (c: HfConfig, message: RegExp, options = {}) => {
  let err: unknown;
  try {
    engineConfigFromHf(c, { maxSeq: 2048, ...options });
  } catch (e) {
    err = e;
  }
  expect(err).toBeInstanceOf(ConfigError);
  expect((err as Error).message).toMatch(message);
};

describe('config.json → engine', () => {
  it('maps Llama 3.1 with llama3 rope scaling', () => {
    const { config, architecture } = engineConfigFromHf(llama31, { maxSeq: 4096 });
    expect(architecture).toBe('LlamaForCausalLM');
    expect(config).toEqual({
      vocab_size: 128256,
      hidden_size: 4096,
      num_hidden_layers: 32,
      num_attention_heads: 32,
      num_key_value_heads: 8,
      intermediate_size: 14336,
      max_position_embeddings: 131072,
      rms_norm_eps: 1e-5,
      rope_theta: 500000,
      rope_scaling: { rope_type: 'llama3', factor: 8, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 8192 },
      attention_bias: false,
      tie_word_embeddings: false,
      initializer_range: 0.02,
    });
  });

  it('reads the transformers 5 form (rope_parameters, dtype) to the same engine config', () => {
    expect(engineConfigFromHf(v5(llama31))).toEqual(engineConfigFromHf(llama31));
    expect(engineConfigFromHf(v5(qwen2))).toEqual(engineConfigFromHf(qwen2));
    // 4.x 'type' spelling of rope_type
    const typeSpelling = { ...llama31, rope_scaling: { type: 'linear', factor: 2 } };
    expect(engineConfigFromHf(typeSpelling).config.rope_scaling).toEqual({ rope_type: 'linear', factor: 2 });
  });

  it('maps Qwen2 with its implied q/k/v biases and tied embeddings', () => {
    const { config, architecture } = engineConfigFromHf(qwen2);
    expect(architecture).toBe('Qwen2ForCausalLM');
    expect(config).toMatchObject({
      attention_bias: true,
      tie_word_embeddings: true,
      rope_theta: 1e6,
      rope_scaling: null,
      num_key_value_heads: 2,
    });
  });

  it('accepts Mistral only while the planned sequences fit in its sliding window', () => {
    expect(engineConfigFromHf(mistral, { maxSeq: 4096 }).config.attention_bias).toBe(false);
    refuse(mistral, /sliding_window 4096 is smaller than the longest sequence planned \(4097\).*plan maxSeq <= 4096/, { maxSeq: 4097 });
    // without a plan the bound is max_position_embeddings
    expect(() => engineConfigFromHf(mistral)).toThrow(/sliding_window 4096 is smaller than the longest sequence planned \(32768\)/);
    expect(engineConfigFromHf({ ...mistral, sliding_window: null }).architecture).toBe('MistralForCausalLM');
  });

  it("fills transformers' class defaults for omitted fields", () => {
    const bare = {
      hidden_size: 64,
      intermediate_size: 128,
      num_attention_heads: 4,
      num_hidden_layers: 1,
      vocab_size: 10,
      max_position_embeddings: 32,
    };
    expect(engineConfigFromHf(bare).config).toMatchObject({
      num_key_value_heads: 4,
      rms_norm_eps: 1e-6,
      rope_theta: 10000,
      tie_word_embeddings: false,
    });
    expect(engineConfigFromHf({ ...bare, model_type: 'mistral', num_attention_heads: 16 }).config.num_key_value_heads).toBe(8);
  });

  it('gives configs the engine builds', async () => {
    const small = {
      hidden_size: 32,
      intermediate_size: 64,
      num_hidden_layers: 1,
      num_attention_heads: 4,
      num_key_value_heads: 2,
      vocab_size: 40,
      max_position_embeddings: 64,
    };
    for (const c of [
      { ...llama31, ...small },
      { ...v5(qwen2), ...small },
      { ...mistral, ...small, sliding_window: 64 },
    ]) {
      const m = Model.create(engineConfigFromHf(c).config, { maxBatch: 1, maxSeq: 8 });
      await m.dispose();
    }
  });
});

describe('refusals name the field', () => {
  const cases: [string, HfConfig, RegExp][] = [
    [
      'another architecture',
      { ...llama31, architectures: ['GemmaForCausalLM'], model_type: undefined },
      /architecture 'GemmaForCausalLM' is not supported \(supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM\)/,
    ],
    ['an unknown model_type', { ...llama31, architectures: undefined, model_type: 'phi3' }, /model_type 'phi3' is not supported/],
    [
      'model_type against architecture',
      { ...llama31, model_type: 'qwen2' },
      /model_type 'qwen2' does not match architecture 'LlamaForCausalLM'/,
    ],
    ['two architectures', { ...llama31, architectures: ['LlamaForCausalLM', 'X'] }, /architectures must list one architecture/],
    ['hidden_act gelu', { ...llama31, hidden_act: 'gelu' }, /hidden_act 'gelu' is not supported/],
    ['mlp_bias', { ...llama31, mlp_bias: true }, /mlp_bias must be false/],
    [
      'Llama attention_bias (adds an o_proj bias)',
      { ...llama31, attention_bias: true },
      /attention_bias must be false for LlamaForCausalLM \(its o_proj bias is not supported\)/,
    ],
    [
      'Mistral attention_bias',
      { ...mistral, sliding_window: null, attention_bias: true },
      /attention_bias must be false for MistralForCausalLM/,
    ],
    ['attention_dropout when training', { ...qwen2, attention_dropout: 0.1 }, /attention_dropout 0.1 is not supported for training/],
    ['Qwen2 use_sliding_window', { ...qwen2, use_sliding_window: true }, /use_sliding_window must be false/],
    [
      'Qwen2 sliding layer_types',
      { ...qwen2, layer_types: ['full_attention', 'sliding_attention'] },
      /layer_types must all be 'full_attention'/,
    ],
    ['sliding_window on Llama', { ...llama31, sliding_window: 4096 }, /field 'sliding_window' is not a LlamaForCausalLM field/],
    [
      'yarn rope',
      { ...llama31, rope_scaling: { rope_type: 'yarn', factor: 4 } },
      /rope_scaling.rope_type 'yarn' is not supported \(supported: default, linear, llama3\)/,
    ],
    [
      'dynamic rope (5.x form)',
      { ...v5(llama31), rope_parameters: { rope_type: 'dynamic', factor: 2, rope_theta: 1e4 } },
      /rope_parameters.rope_type 'dynamic' is not supported/,
    ],
    [
      'a rope field of another kind',
      { ...llama31, rope_scaling: { rope_type: 'linear', factor: 2, beta_fast: 32 } },
      /rope_scaling.beta_fast is not supported with rope_type 'linear'/,
    ],
    [
      'a missing llama3 factor',
      { ...llama31, rope_scaling: { rope_type: 'llama3', factor: 8 } },
      /rope_scaling.low_freq_factor must be a number for rope_type 'llama3'/,
    ],
    [
      'rope_theta disagreement',
      { ...v5(llama31), rope_theta: 10000 },
      /rope_theta \(10000\) and rope_parameters.rope_theta \(500000\) disagree/,
    ],
    [
      'both rope forms',
      { ...v5(llama31), rope_scaling: { rope_type: 'linear', factor: 2 } },
      /rope_parameters and rope_scaling are both set/,
    ],
    ['an unknown field', { ...llama31, partial_rotary_factor: 0.5 }, /field 'partial_rotary_factor' is not supported by the engine/],
    ['quantized weights', { ...llama31, quantization_config: { quant_method: 'gptq' } }, /quantization_config/],
    ['a missing size', { ...llama31, vocab_size: undefined }, /field 'vocab_size' is required/],
    ['a non-object', [] as unknown as HfConfig, /must be a JSON object/],
  ];
  for (const [what, config, message] of cases) it(`refuses ${what}`, () => refuse(config, message));

  it('accepts attention_dropout for inference only', () => {
    expect(engineConfigFromHf({ ...qwen2, attention_dropout: 0.1 }, { training: false }).architecture).toBe('Qwen2ForCausalLM');
  });
});

describe('engine → config.json', () => {
  const resolve = (c: HfConfig) => {
    const m = Model.create(
      {
        ...engineConfigFromHf(c).config,
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 1,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        vocab_size: 40,
      },
      { maxBatch: 1, maxSeq: 8 },
    );
    const cfg = m.config;
    void m.dispose();
    return cfg;
  };

  it("writes a config that maps back to the same engine config, in the source's form", () => {
    for (const source of [llama31, v5(llama31), qwen2, v5(qwen2), { ...mistral, sliding_window: null }]) {
      const engine = resolve(source);
      const out = hfConfigFromEngine(engine, { source, dtype: 'bfloat16' });
      expect(out.architectures).toEqual(source.architectures);
      expect(out.bos_token_id).toEqual(source.bos_token_id);
      expect(out.eos_token_id).toEqual(source.eos_token_id);
      expect('rope_parameters' in out).toBe('rope_parameters' in source);
      expect(out[source.dtype ? 'dtype' : 'torch_dtype']).toBe('bfloat16');
      const { seed: _, ...back } = resolve(out);
      const { seed: __, ...engineNoSeed } = engine;
      expect(back).toEqual(engineNoSeed);
    }
  });

  it('picks Qwen2 for q/k/v biases and Llama otherwise, and refuses a mismatch', () => {
    const llama = resolve(llama31);
    expect(hfConfigFromEngine(llama).architectures).toEqual(['LlamaForCausalLM']);
    expect(hfConfigFromEngine(resolve(qwen2)).architectures).toEqual(['Qwen2ForCausalLM']);
    expect(() => hfConfigFromEngine(llama, { architecture: 'Qwen2ForCausalLM' })).toThrow(
      /Qwen2ForCausalLM has q\/k\/v biases, but the model has none/,
    );
    expect(() => hfConfigFromEngine(resolve(qwen2), { architecture: 'MistralForCausalLM' })).toThrow(
      /MistralForCausalLM has no q\/k\/v biases.*save as Qwen2ForCausalLM/,
    );
  });
});
