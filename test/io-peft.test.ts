// PEFT adapter directories: tensor names and shapes in PEFT's layout, a bitwise save → load round
// trip, every refusal naming its problem, saves that SIGKILL at any moment (an exact rename
// included) never leaves a directory that loads a mix of two saves, and the merge into
// a full checkpoint checked against W + (alpha/r)·B·A computed here in float64 from the files.
import { execFileSync, spawn } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { LORA_TARGETS, loraTensorName, PEFT_TENSOR_PREFIX, type LoraOptions } from '../lib/engine/lora.js';
import { Model, loadPretrained, readSafetensors, savePretrained, writeSafetensors, type ResolvedModelConfig } from '../lib/index.js';
import {
  ADAPTER_CONFIG_NAME,
  ADAPTER_SAVE_JOURNAL,
  ADAPTER_WEIGHTS_NAME,
  AdapterError,
  adapterBaseDir,
  loadAdapter,
  loraTensorShapes,
  mergeAdapter,
  saveAdapter,
  type LoadedAdapter,
  type LoraModelShape,
} from '../lib/io/peft.js';
import { bitsEqual, errorOf, tinyConfig } from './fixtures/engine-helpers.js';
import { writeTinyMistralPolicy } from './fixtures/mistral-tokenizer.js';
import { SAVER_SHAPE, SAVER_VERSIONS, randomAdapter } from './fixtures/peft-adapters.js';

const root = mkdtempSync(path.join(tmpdir(), 'sppo-peft-'));
afterAll(() => rmSync(root, { recursive: true, force: true }));
let counter = 0;
const newDir = (name: string) => path.join(root, `${name}-${counter++}`);

const LLAMA3_8B: LoraModelShape = {
  num_hidden_layers: 32,
  hidden_size: 4096,
  intermediate_size: 14336,
  num_attention_heads: 32,
  num_key_value_heads: 8,
  head_dim: 128,
};
const QWEN2_05B: LoraModelShape = {
  num_hidden_layers: 24,
  hidden_size: 896,
  intermediate_size: 4864,
  num_attention_heads: 14,
  num_key_value_heads: 2,
  head_dim: 64,
};
const SMALL: LoraModelShape = {
  num_hidden_layers: 2,
  hidden_size: 8,
  intermediate_size: 12,
  num_attention_heads: 2,
  num_key_value_heads: 1,
  head_dim: 4,
};
const ALL: LoraOptions = { rank: 4, alpha: 8, targets: LORA_TARGETS };

describe('loraTensorShapes', () => {
  it("follows PEFT's layout for Llama-3-8B (GQA 32/8) and Qwen2-0.5B (14/2, head_dim 64)", () => {
    for (const [config, kv, q] of [
      [LLAMA3_8B, 1024, 4096],
      [QWEN2_05B, 128, 896],
    ] as const) {
      const shapes = loraTensorShapes(config, { rank: 16, alpha: 32, targets: LORA_TARGETS });
      expect(shapes.length).toBe(config.num_hidden_layers * 7 * 2);
      const h = config.hidden_size;
      const f = config.intermediate_size;
      const last = config.num_hidden_layers - 1;
      expect(shapes.slice(0, 14)).toEqual([
        { name: 'model.layers.0.self_attn.q_proj.lora_A.weight', shape: [16, h] },
        { name: 'model.layers.0.self_attn.q_proj.lora_B.weight', shape: [q, 16] },
        { name: 'model.layers.0.self_attn.k_proj.lora_A.weight', shape: [16, h] },
        { name: 'model.layers.0.self_attn.k_proj.lora_B.weight', shape: [kv, 16] },
        { name: 'model.layers.0.self_attn.v_proj.lora_A.weight', shape: [16, h] },
        { name: 'model.layers.0.self_attn.v_proj.lora_B.weight', shape: [kv, 16] },
        { name: 'model.layers.0.self_attn.o_proj.lora_A.weight', shape: [16, q] },
        { name: 'model.layers.0.self_attn.o_proj.lora_B.weight', shape: [h, 16] },
        { name: 'model.layers.0.mlp.gate_proj.lora_A.weight', shape: [16, h] },
        { name: 'model.layers.0.mlp.gate_proj.lora_B.weight', shape: [f, 16] },
        { name: 'model.layers.0.mlp.up_proj.lora_A.weight', shape: [16, h] },
        { name: 'model.layers.0.mlp.up_proj.lora_B.weight', shape: [f, 16] },
        { name: 'model.layers.0.mlp.down_proj.lora_A.weight', shape: [16, f] },
        { name: 'model.layers.0.mlp.down_proj.lora_B.weight', shape: [h, 16] },
      ]);
      expect(shapes.at(-1)).toEqual({ name: `model.layers.${last}.mlp.down_proj.lora_B.weight`, shape: [h, 16] });
    }
  });

  it('lists only the chosen targets, in LORA_TARGETS order whatever order they are given in', () => {
    const names = loraTensorShapes(SMALL, { rank: 2, alpha: 2, targets: ['v_proj', 'q_proj'] }).map((t) => t.name);
    expect(names).toEqual(
      [0, 1].flatMap((l) =>
        ['q_proj', 'v_proj'].flatMap((t) => ['A', 'B'].map((f) => `model.layers.${l}.self_attn.${t}.lora_${f}.weight`)),
      ),
    );
  });

  it('refuses bad LoRA options, naming the field', async () => {
    const cases: [Partial<LoraOptions>, RegExp][] = [
      [{ rank: 0 }, /lora\.rank must be a positive integer, got 0/],
      [{ rank: 1.5 }, /lora\.rank must be a positive integer/],
      [{ alpha: Infinity }, /lora\.alpha must be a positive finite number, got Infinity/],
      [{ alpha: -1 }, /lora\.alpha must be a positive finite number/],
      [{ targets: [] }, /lora\.targets must be a non-empty list/],
      [{ targets: ['q_proj', 'lm_head' as never] }, /lora\.targets: unknown target "lm_head"/],
      [{ targets: ['q_proj', 'q_proj'] }, /lora\.targets lists a target twice/],
    ];
    for (const [over, message] of cases)
      expect((await errorOf(() => loraTensorShapes(SMALL, { ...ALL, ...over }))).message).toMatch(message);
  });
});

describe('saveAdapter / loadAdapter', () => {
  it('writes PEFT names in float32 and an adapter_config.json PEFT and vLLM read, and loads back bitwise', async () => {
    const dir = newDir('roundtrip');
    const lora: LoraOptions = { rank: 4, alpha: 6, targets: ['q_proj', 'k_proj', 'down_proj'] };
    const tensors = randomAdapter(SMALL, lora, 5);
    const written = await saveAdapter(dir, { lora, modelConfig: SMALL, tensors, baseModel: 'org/base-model' });
    expect(written.map((f) => path.basename(f)).sort()).toEqual([ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME]);
    expect(readdirSync(dir).sort()).toEqual([ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME]);

    const file = await readSafetensors(path.join(dir, ADAPTER_WEIGHTS_NAME));
    expect([...file.tensors.keys()]).toEqual(loraTensorShapes(SMALL, lora).map((t) => PEFT_TENSOR_PREFIX + t.name));
    expect(file.tensors.has('base_model.model.model.layers.1.mlp.down_proj.lora_B.weight')).toBe(true);
    for (const t of file.tensors.values()) expect(t.dtype).toBe('F32');

    const config = JSON.parse(readFileSync(path.join(dir, ADAPTER_CONFIG_NAME), 'utf8')) as Record<string, unknown>;
    expect(config).toMatchObject({
      peft_type: 'LORA',
      task_type: 'CAUSAL_LM',
      r: 4,
      lora_alpha: 6,
      target_modules: ['q_proj', 'k_proj', 'down_proj'],
      lora_dropout: 0,
      bias: 'none',
      fan_in_fan_out: false,
      use_rslora: false,
      use_dora: false,
      init_lora_weights: true,
      inference_mode: true,
      base_model_name_or_path: 'org/base-model',
      modules_to_save: null,
      layers_to_transform: null,
      rank_pattern: {},
      alpha_pattern: {},
    });
    expect(Object.keys(config)).toEqual(Object.keys(config).sort()); // as PEFT's save_pretrained (sort_keys)

    const loaded = await loadAdapter(dir, SMALL);
    expect(loaded.lora).toEqual({ rank: 4, alpha: 6, targets: ['q_proj', 'k_proj', 'down_proj'] });
    expect([...loaded.tensors.keys()]).toEqual([...tensors.keys()]);
    for (const [name, data] of tensors) expect(bitsEqual(loaded.tensors.get(name)!, data), name).toBe(true);
  });

  it('refuses missing, extra, wrongly sized and non-finite tensors by name, writing nothing', async () => {
    const base = randomAdapter(SMALL, ALL, 1);
    const A0 = 'model.layers.0.self_attn.q_proj.lora_A.weight';
    const withChange = (f: (m: Map<string, Float32Array>) => void) => {
      const m = new Map(base);
      f(m);
      return m;
    };
    const cases: [Map<string, Float32Array>, RegExp][] = [
      [withChange((m) => m.delete(A0)), /1 adapter tensor\(s\) are missing: 'model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight'/],
      [
        withChange((m) => m.set('model.layers.2.self_attn.q_proj.lora_A.weight', new Float32Array(32))),
        /not adapter tensors .*'model\.layers\.2\.self_attn\.q_proj\.lora_A\.weight'/,
      ],
      [
        withChange((m) => m.set(A0, new Float32Array(31))),
        /tensor 'model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight' has 31 values but its shape \[4, 8\] needs 32/,
      ],
      [
        withChange((m) =>
          m.set(
            A0,
            Float32Array.from(base.get(A0)!, (v, i) => (i === 7 ? NaN : v)),
          ),
        ),
        /tensor 'model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight' is not finite at element 7/,
      ],
    ];
    for (const [tensors, message] of cases) {
      const dir = newDir('refused');
      expect((await errorOf(() => saveAdapter(dir, { lora: ALL, modelConfig: SMALL, tensors }))).message).toMatch(message);
      expect(existsSync(dir)).toBe(false);
    }
  });

  it('accepts BF16 and F16 tensors, a regular-expression or all-linear target_modules, and a training dropout', async () => {
    const dir = newDir('forms');
    const lora: LoraOptions = { rank: 2, alpha: 4, targets: ['q_proj', 'v_proj'] };
    const tensors = randomAdapter(SMALL, lora, 3);
    await saveAdapter(dir, { lora, modelConfig: SMALL, tensors });
    const stored = [...tensors].map(([name, data]) => ({ name: PEFT_TENSOR_PREFIX + name, data }));
    await writeSafetensors(
      path.join(dir, ADAPTER_WEIGHTS_NAME),
      stored.map((t, i) => ({ ...t, shape: loraTensorShapes(SMALL, lora)[i].shape })),
      { dtype: 'BF16' },
    );
    const bf16 = await loadAdapter(dir, SMALL);
    for (const [name, data] of tensors) {
      const got = bf16.tensors.get(name)!;
      for (let i = 0; i < data.length; i++) expect(Math.abs(got[i] - data[i])).toBeLessThanOrEqual(Math.abs(data[i]) * 2 ** -8);
    }
    // F16: 0.5 and -0.25 are exact in half precision
    const shapes = loraTensorShapes(SMALL, lora);
    writeRawSafetensors(
      path.join(dir, ADAPTER_WEIGHTS_NAME),
      shapes.map((s) => ({ name: PEFT_TENSOR_PREFIX + s.name, dtype: 'F16', shape: s.shape, fill: [0x3800, 0xb400] })),
    );
    const f16 = await loadAdapter(dir, SMALL);
    expect([...f16.tensors.get(shapes[0].name)!.slice(0, 2)]).toEqual([0.5, -0.25]);

    await saveAdapter(dir, { lora, modelConfig: SMALL, tensors });
    for (const target_modules of [
      '.*\\.(q_proj|v_proj)',
      'model\\.layers\\.\\d+\\.self_attn\\.[qv]_proj',
      ['self_attn.q_proj', 'v_proj'],
    ]) {
      editConfig(dir, { target_modules, lora_dropout: 0.05 });
      expect((await loadAdapter(dir, SMALL)).lora.targets).toEqual(['q_proj', 'v_proj']);
    }
    const all = newDir('all-linear');
    await saveAdapter(all, { lora: ALL, modelConfig: SMALL, tensors: randomAdapter(SMALL, ALL, 4) });
    editConfig(all, { target_modules: 'all-linear' });
    expect((await loadAdapter(all, SMALL)).lora.targets).toEqual([...LORA_TARGETS]);
  });

  it('refuses every option the engine does not compute, naming the field', async () => {
    const dir = newDir('options');
    const lora: LoraOptions = { rank: 2, alpha: 4, targets: ['q_proj', 'v_proj'] };
    await saveAdapter(dir, { lora, modelConfig: SMALL, tensors: randomAdapter(SMALL, lora, 3) });
    const original = readFileSync(path.join(dir, ADAPTER_CONFIG_NAME), 'utf8');
    const cases: [Record<string, unknown>, RegExp][] = [
      [{ peft_type: 'IA3' }, /peft_type must be "LORA", got "IA3"/],
      [{ task_type: 'SEQ_CLS' }, /task_type "SEQ_CLS" is not supported/],
      [{ use_rslora: true }, /use_rslora true: rank-stabilised scaling/],
      [{ use_dora: true }, /use_dora true: DoRA/],
      [{ fan_in_fan_out: true }, /fan_in_fan_out true: transposed/],
      [{ bias: 'lora_only' }, /bias "lora_only": only bias 'none'/],
      [{ layers_to_transform: [0] }, /layers_to_transform \[0\]: adapters on a subset of layers/],
      [{ rank_pattern: { q_proj: 8 } }, /rank_pattern \{"q_proj":8\}: per-module ranks/],
      [{ alpha_pattern: { q_proj: 8 } }, /alpha_pattern \{"q_proj":8\}: per-module alphas/],
      [{ modules_to_save: ['lm_head'] }, /modules_to_save \["lm_head"\]: fully trained extra modules/],
      [{ r: 0 }, /r must be a positive integer, got 0/],
      [{ lora_alpha: 'x' }, /lora_alpha must be a positive number, got "x"/],
      [{ lora_dropout: 1 }, /lora_dropout must be a number in \[0, 1\), got 1/],
      [{ target_modules: ['q_proj', 'embed_tokens'] }, /target_modules entry 'embed_tokens' is none of the projections/],
      [{ target_modules: [] }, /target_modules must be a non-empty list/],
      [{ target_modules: 'model\\.layers\\.0\\.self_attn\\.q_proj' }, /adapts q_proj in some layers but not others/],
      [{ target_modules: '(' }, /target_modules "\(" is not a regular expression/],
      [{ target_modules: '.*lm_head' }, /matches none of the projections/],
      [
        { r: 3 },
        /tensor 'base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight' has shape \[2, 8\] but the model needs \[3, 8\]/,
      ],
      [{ target_modules: ['q_proj'] }, /4 tensor\(s\) that are not adapter tensors of the model .*v_proj/],
      [{ target_modules: ['q_proj', 'v_proj', 'k_proj'] }, /4 adapter tensor\(s\) are missing: .*k_proj/],
    ];
    for (const [over, message] of cases) {
      writeFileSync(path.join(dir, ADAPTER_CONFIG_NAME), original);
      editConfig(dir, over);
      const err = await errorOf(() => loadAdapter(dir, SMALL));
      expect(err.message, JSON.stringify(over)).toMatch(message);
      expect(err.message).toContain(dir);
    }
    writeFileSync(path.join(dir, ADAPTER_CONFIG_NAME), '{"peft_type": "LORA",\n  "r": 2,,}');
    expect((await errorOf(() => loadAdapter(dir, SMALL))).message).toMatch(/line 2/);
    expect((await errorOf(() => loadAdapter(newDir('empty'), SMALL))).message).toMatch(
      /no adapter_config\.json \(not a PEFT adapter directory\)/,
    );
  });

  it('refuses tensors of another dtype or not finite, naming the tensor', async () => {
    const dir = newDir('dtypes');
    const lora: LoraOptions = { rank: 1, alpha: 1, targets: ['q_proj'] };
    await saveAdapter(dir, { lora, modelConfig: SMALL, tensors: randomAdapter(SMALL, lora, 3) });
    const shapes = loraTensorShapes(SMALL, lora);
    const file = path.join(dir, ADAPTER_WEIGHTS_NAME);
    writeRawSafetensors(
      file,
      shapes.map((s, i) => ({ name: PEFT_TENSOR_PREFIX + s.name, dtype: i === 1 ? 'F64' : 'F16', shape: s.shape, fill: [0, 0, 0, 0] })),
    );
    expect((await errorOf(() => loadAdapter(dir, SMALL))).message).toMatch(
      /tensor 'base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_B\.weight' has dtype F64 \(supported: F32, BF16, F16\)/,
    );
    writeRawSafetensors(
      file,
      shapes.map((s, i) => ({
        name: PEFT_TENSOR_PREFIX + s.name,
        dtype: 'F16',
        shape: s.shape,
        fill: i === 2 ? [0x3c00, 0x7c00] : [0x3c00],
      })),
    );
    expect((await errorOf(() => loadAdapter(dir, SMALL))).message).toMatch(
      /tensor 'base_model\.model\.model\.layers\.1\.self_attn\.q_proj\.lora_A\.weight' is not finite at element 1 \(Infinity\)/,
    );
  });

  it('a directory where adapter_config.json goes: the error names the file and nothing temporary is left', async () => {
    const dir = newDir('eisdir');
    mkdirSync(path.join(dir, ADAPTER_CONFIG_NAME, 'x'), { recursive: true });
    const err = await errorOf(() => saveAdapter(dir, { lora: ALL, modelConfig: SMALL, tensors: randomAdapter(SMALL, ALL, 1) }));
    expect(err.message).toMatch(new RegExp(`cannot write ${path.join(dir, ADAPTER_CONFIG_NAME)} \\(the LoRA adapter in ${dir}\\)`));
    expect(readdirSync(dir).filter((f) => f.includes('.tmp-'))).toEqual([]);
    // refused before any rename: the tensors did not go in without their config
    expect(readdirSync(dir).sort()).toEqual([ADAPTER_CONFIG_NAME]);
  });

  it('a save killed at any moment leaves the previous adapter or the new one, whole, or a directory that is refused', async () => {
    const dir = newDir('killed');
    let interrupted = 0;
    for (let round = 0; round < 5; round++) {
      const child = saver([dir]);
      // killed after its first complete save plus a varying delay, so the kill lands inside later saves
      await new Promise<void>((resolve, reject) => {
        child.stdout.on('data', () => resolve());
        child.on('exit', (code) => reject(new Error(`the saver exited with ${code}`)));
      });
      await new Promise((r) => setTimeout(r, 20 + 37 * round));
      const exited = new Promise((r) => child.on('exit', r));
      child.kill('SIGKILL');
      await exited;
      if (readdirSync(dir).some((f) => f.includes('.tmp-'))) interrupted++;
      // the versions' configs differ (alpha, base), so a config with the other's tensors would show
      expectWholeOrRefused(dir, await loadAdapter(dir, SAVER_SHAPE).catch((e: unknown) => e as Error));
    }
    // a temporary left behind shows that a kill landed inside a save (2 to 5 of 5 rounds here)
    expect(interrupted).toBeGreaterThan(0);
  }, 120_000);

  // The renames take microseconds, so a kill timed from outside seldom lands between them: here
  // the child is killed at an exact rename by an LD_PRELOAD library (fixtures/kill-at-rename.c).
  describe.runIf(process.platform === 'linux')('a save killed at each of its renames', () => {
    let preload = '';
    beforeAll(() => {
      preload = path.join(newDir('preload'), 'kill-at-rename.so');
      mkdirSync(path.dirname(preload));
      const source = fileURLToPath(new URL('./fixtures/kill-at-rename.c', import.meta.url));
      execFileSync(process.env.CC ?? 'cc', ['-shared', '-fPIC', '-O2', '-o', preload, source, '-ldl']);
    });

    /** `dir` holding version 0, then a save of version 1 killed at the rename onto `target` (a name in `dir`). */
    async function killedSave(target: string): Promise<string> {
      const dir = newDir('killed-at');
      await saveAdapter(dir, { ...SAVER_VERSIONS[0], modelConfig: SAVER_SHAPE });
      const child = saver([dir, '1'], { LD_PRELOAD: preload, KILL_AT_RENAME: `${path.sep}${target}` });
      const [code, signal] = await new Promise<[number | null, NodeJS.Signals | null]>((r) => child.on('exit', (c, s) => r([c, s])));
      expect([code, signal]).toEqual([null, 'SIGKILL']);
      return dir;
    }

    it('between the tensors and the config: refused by name, and the renames it names finish the save', async () => {
      const dir = await killedSave(ADAPTER_CONFIG_NAME);
      // the new tensors are in place beside the old config (the new one still a temporary): refused
      const err = await loadAdapter(dir, SAVER_SHAPE).catch((e: unknown) => e as Error);
      expectWholeOrRefused(dir, err);
      if (!(err instanceof AdapterError))
        return expect.fail(err instanceof Error ? err.message : 'loaded a directory that mixes two saves');
      expect(
        readdirSync(dir)
          .filter((f) => !f.includes('.tmp-'))
          .sort(),
      ).toEqual([ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, ADAPTER_SAVE_JOURNAL]);
      const journal = path.join(dir, ADAPTER_SAVE_JOURNAL);
      expect(err.message).toContain(`${dir}: a save by process `);
      expect(err.message).toContain(`stopped (or is still running) between renaming ${ADAPTER_WEIGHTS_NAME} and ${ADAPTER_CONFIG_NAME}`);
      // mergeAdapter and sppo's base lookup read the config through the same check
      expect((await errorOf(() => adapterBaseDir(dir))).message).toBe(err.message);
      const renames = [...err.message.matchAll(/rename (\S+) to (\S+?),/g)].map((m) => [m[1], m[2]]);
      expect(renames).toEqual([[expect.stringMatching(/adapter_config\.json\.tmp-\d+-[0-9a-f]+$/), path.join(dir, ADAPTER_CONFIG_NAME)]]);
      expect(err.message).toContain(`and delete ${journal}`);
      // doing what it says gives the new adapter, whole: nothing the killed save wrote is lost
      for (const [from, to] of renames) renameSync(from, to);
      rmSync(journal);
      expect(whichVersion(await loadAdapter(dir, SAVER_SHAPE))).toBe(1);
    });

    it('before any rename: the previous adapter loads, and the next save replaces it', async () => {
      for (const target of [ADAPTER_SAVE_JOURNAL, ADAPTER_WEIGHTS_NAME]) {
        const dir = await killedSave(target);
        // killed at the journal's rename there is none; at the tensors', it lists temporaries all still there
        expect(existsSync(path.join(dir, ADAPTER_SAVE_JOURNAL)), target).toBe(target === ADAPTER_WEIGHTS_NAME);
        expect(whichVersion(await loadAdapter(dir, SAVER_SHAPE)), target).toBe(0);
        expect(readdirSync(dir).filter((f) => f.includes('.tmp-')).length, target).toBeGreaterThan(0);
        await saveAdapter(dir, { ...SAVER_VERSIONS[1], modelConfig: SAVER_SHAPE });
        // no journal, and the killed save's temporaries gone with it
        expect(readdirSync(dir).sort()).toEqual([ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME]);
        expect(whichVersion(await loadAdapter(dir, SAVER_SHAPE)), target).toBe(1);
      }
    });
  });
});

/** The saver child (fixtures/peft-saver.mts) with `args`, and `env` added to this process's. */
function saver(args: string[], env: Record<string, string> = {}) {
  const script = fileURLToPath(new URL('./fixtures/peft-saver.mts', import.meta.url));
  return spawn(process.execPath, ['--import', 'tsx', script, ...args], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, ...env },
  });
}

/** Which of SAVER_VERSIONS `loaded` is, config and tensors alike; -1 for neither (a mix). */
function whichVersion(loaded: LoadedAdapter): number {
  return SAVER_VERSIONS.findIndex(
    (v) => v.lora.alpha === loaded.lora.alpha && [...v.tensors].every(([name, data]) => bitsEqual(loaded.tensors.get(name)!, data)),
  );
}

/** A load of a saver's directory either gave one version whole, or refused because a save was interrupted. */
function expectWholeOrRefused(dir: string, loaded: LoadedAdapter | Error): void {
  if (loaded instanceof Error) expect(loaded.message).toMatch(new RegExp(`stopped \\(or is still running\\) between renaming`));
  else expect(whichVersion(loaded), `${dir}: a config with another save's tensors`).toBeGreaterThanOrEqual(0);
}

/** Edits adapter_config.json in place. */
function editConfig(dir: string, fields: Record<string, unknown>): void {
  const file = path.join(dir, ADAPTER_CONFIG_NAME);
  writeFileSync(file, JSON.stringify({ ...(JSON.parse(readFileSync(file, 'utf8')) as object), ...fields }));
}

/** A safetensors file of 16- or 64-bit tensors, each element a repeat of `fill` (16-bit words), which the package's writer cannot make. */
function writeRawSafetensors(file: string, tensors: { name: string; dtype: 'F16' | 'F64'; shape: number[]; fill: number[] }[]): void {
  const header: Record<string, unknown> = {};
  const parts: Uint16Array[] = [];
  let offset = 0;
  for (const t of tensors) {
    const words = t.shape.reduce((a, d) => a * d, 1) * (t.dtype === 'F64' ? 4 : 1);
    const data = Uint16Array.from({ length: words }, (_, i) => t.fill[i % t.fill.length]);
    header[t.name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + data.byteLength] };
    offset += data.byteLength;
    parts.push(data);
  }
  const json = Buffer.from(JSON.stringify(header));
  const length = Buffer.alloc(8);
  length.writeBigUInt64LE(BigInt(json.length));
  writeFileSync(file, Buffer.concat([length, json, ...parts.map((p) => Buffer.from(p.buffer))]));
}

// ------------------------------------------------------------------------------------------------
// Merging

/** A base checkpoint of a tiny GQA model with q/k/v biases or not, and its resolved config. */
async function writeBase(
  dir: string,
  options: { dtype?: 'float32' | 'bfloat16'; maxShardBytes?: number; mistral?: boolean },
): Promise<ResolvedModelConfig> {
  if (options.mistral) {
    await writeTinyMistralPolicy(dir);
    const { model } = await loadPretrained(dir, { maxBatch: 1, maxSeq: 8 });
    try {
      return model.config;
    } finally {
      await model.dispose();
    }
  }
  const model = Model.create(tinyConfig({ seed: 7, attention_bias: true }), { maxBatch: 1, maxSeq: 8 });
  try {
    await savePretrained(model, dir, { dtype: options.dtype, maxShardBytes: options.maxShardBytes });
    return model.config;
  } finally {
    await model.dispose();
  }
}

/** Every tensor of a checkpoint directory, read straight from its safetensors files. */
async function readCheckpoint(dir: string): Promise<Map<string, { dtype: string; shape: number[]; data: Float32Array }>> {
  const out = new Map<string, { dtype: string; shape: number[]; data: Float32Array }>();
  for (const f of readdirSync(dir).filter((n) => n.endsWith('.safetensors')))
    for (const [name, t] of (await readSafetensors(path.join(dir, f))).tensors) out.set(name, t);
  return out;
}

/** W + (alpha/r)·B·A in float64 for every adapted weight, from the base and adapter files. */
async function expectedMerge(baseDir: string, adapterDir: string): Promise<Map<string, Float64Array>> {
  const config = JSON.parse(readFileSync(path.join(adapterDir, ADAPTER_CONFIG_NAME), 'utf8')) as { r: number; lora_alpha: number };
  const adapter = (await readSafetensors(path.join(adapterDir, ADAPTER_WEIGHTS_NAME))).tensors;
  const base = await readCheckpoint(baseDir);
  const out = new Map<string, Float64Array>();
  for (const [name, a] of adapter) {
    if (!name.endsWith('.lora_A.weight')) continue;
    const module = name.slice(PEFT_TENSOR_PREFIX.length, -'.lora_A.weight'.length);
    const b = adapter.get(`${PEFT_TENSOR_PREFIX}${module}.lora_B.weight`)!;
    const w = base.get(`${module}.weight`)!;
    const [rows, cols] = w.shape;
    const r = config.r;
    const merged = new Float64Array(rows * cols);
    for (let i = 0; i < rows; i++)
      for (let j = 0; j < cols; j++) {
        let s = 0;
        for (let k = 0; k < r; k++) s += b.data[i * r + k] * a.data[k * cols + j];
        merged[i * cols + j] = w.data[i * cols + j] + (config.lora_alpha / r) * s;
      }
    out.set(`${module}.weight`, merged);
  }
  return out;
}

/** Whether `got` is a bfloat16 nearest to `x` (the neighbours one bfloat16 step either side are no closer). */
function nearestBf16(got: number, x: number): boolean {
  const bits = new Uint32Array(Float32Array.of(got).buffer)[0];
  const step = (d: number) => new Float32Array(Uint32Array.of(bits + d * 0x10000).buffer)[0];
  return Math.abs(got - x) <= Math.abs(step(1) - x) && Math.abs(got - x) <= Math.abs(step(-1) - x);
}

describe('mergeAdapter', () => {
  it('writes W + (alpha/r)·B·A (float64, rounded once) into each adapted weight, every other tensor bitwise, config and tokenizer copied; loadPretrained reads it', async () => {
    const baseDir = newDir('base');
    const config = await writeBase(baseDir, { mistral: true });
    const lora: LoraOptions = { rank: 3, alpha: 5, targets: ['q_proj', 'v_proj', 'o_proj', 'down_proj'] };
    const adapterDir = newDir('adapter');
    await saveAdapter(adapterDir, { lora, modelConfig: config, tensors: randomAdapter(config, lora, 11) });
    const outDir = newDir('merged');
    await mergeAdapter(baseDir, adapterDir, outDir);

    const expected = await expectedMerge(baseDir, adapterDir);
    expect(expected.size).toBe(config.num_hidden_layers * 4);
    const base = await readCheckpoint(baseDir);
    const merged = await readCheckpoint(outDir);
    expect([...merged.keys()].sort()).toEqual([...base.keys()].sort());
    for (const [name, t] of merged) {
      expect(t.dtype).toBe('F32');
      const want = expected.get(name);
      if (!want) expect(bitsEqual(t.data, base.get(name)!.data), name).toBe(true);
      else {
        // the same sums in the same order as the merge, so exact
        expect(bitsEqual(t.data, Float32Array.from(want)), name).toBe(true);
        expect(bitsEqual(t.data, base.get(name)!.data), `${name} changed`).toBe(false);
      }
    }
    for (const f of ['config.json', 'generation_config.json', 'tokenizer.json', 'tokenizer_config.json', 'chat_template.jinja'])
      expect(readFileSync(path.join(outDir, f)).equals(readFileSync(path.join(baseDir, f))), f).toBe(true);

    const { model, tokenizer } = await loadPretrained(outDir, { maxBatch: 1, maxSeq: 8 });
    try {
      expect(tokenizer).toBeDefined();
      for (const p of model.params()) expect(bitsEqual(model.getParam(p.name), merged.get(p.name)!.data), p.name).toBe(true);
    } finally {
      await model.dispose();
    }
  });

  it('merges a sharded bfloat16 base into sharded bfloat16, each merged value a nearest bfloat16 to the float64 result', async () => {
    const baseDir = newDir('sharded-base');
    const config = await writeBase(baseDir, { dtype: 'bfloat16', maxShardBytes: 4000 });
    expect(existsSync(path.join(baseDir, 'model.safetensors.index.json'))).toBe(true);
    const adapterDir = newDir('sharded-adapter');
    await saveAdapter(adapterDir, { lora: ALL, modelConfig: config, tensors: randomAdapter(config, ALL, 12) });
    const outDir = newDir('sharded-merged');
    const written = await mergeAdapter(baseDir, adapterDir, outDir, { maxShardBytes: 4000 });
    expect(written.map((f) => path.basename(f))).toContain('model.safetensors.index.json');
    expect(written.filter((f) => /model-\d{5}-of-\d{5}\.safetensors$/.test(f)).length).toBeGreaterThan(1);

    const expected = await expectedMerge(baseDir, adapterDir);
    expect(expected.size).toBe(config.num_hidden_layers * 7);
    const base = await readCheckpoint(baseDir);
    for (const [name, t] of await readCheckpoint(outDir)) {
      expect(t.dtype).toBe('BF16');
      const want = expected.get(name);
      if (!want) expect(bitsEqual(t.data, base.get(name)!.data), name).toBe(true);
      else
        for (let i = 0; i < want.length; i++)
          if (!nearestBf16(t.data[i], want[i])) expect.fail(`${name}[${i}]: ${t.data[i]} is not a nearest bfloat16 to ${want[i]}`);
    }
    const { model } = await loadPretrained(outDir, { maxBatch: 1, maxSeq: 8 });
    await model.dispose();

    // float32 on request, with config.json's dtype following
    const f32 = newDir('sharded-f32');
    await mergeAdapter(baseDir, adapterDir, f32, { dtype: 'float32' });
    expect((JSON.parse(readFileSync(path.join(f32, 'config.json'), 'utf8')) as { torch_dtype: string }).torch_dtype).toBe('float32');
    for (const [name, t] of await readCheckpoint(f32)) {
      const want = expected.get(name);
      if (want) expect(bitsEqual(t.data, Float32Array.from(want)), name).toBe(true);
    }
  });

  it('refuses a merge whose value overflows bfloat16 though it fits float32, naming the tensor and element', async () => {
    const baseDir = newDir('overflow-base');
    const config = await writeBase(baseDir, { dtype: 'bfloat16' });
    const tensors = randomAdapter(config, ALL, 1);
    // (alpha / rank)·B[0,0]·A[0,0] = 3.40e38: above bfloat16's overflow point (3.3962e38), below float32's max
    const big = Math.sqrt(3.4e38 / (ALL.alpha / ALL.rank));
    tensors.get(loraTensorName(0, 'q_proj', 'A'))![0] = big;
    tensors.get(loraTensorName(0, 'q_proj', 'B'))![0] = big;
    const adapterDir = newDir('overflow-adapter');
    await saveAdapter(adapterDir, { lora: ALL, modelConfig: config, tensors });
    const outDir = newDir('overflow-out');
    expect((await errorOf(() => mergeAdapter(baseDir, adapterDir, outDir))).message).toMatch(
      /merging into 'model\.layers\.0\.self_attn\.q_proj\.weight' overflows bfloat16 at \[0, 0\]/,
    );
    expect(existsSync(path.join(outDir, 'config.json'))).toBe(false);
    await mergeAdapter(baseDir, adapterDir, outDir, { dtype: 'float32' });
  });

  it('refuses an adapter that does not fit the base, and an output directory that is an input', async () => {
    const baseDir = newDir('fit-base');
    const config = await writeBase(baseDir, {});
    const other: LoraModelShape = { ...config, hidden_size: config.hidden_size * 2 };
    const adapterDir = newDir('fit-adapter');
    await saveAdapter(adapterDir, { lora: ALL, modelConfig: other, tensors: randomAdapter(other, ALL, 1) });
    const outDir = newDir('fit-out');
    expect((await errorOf(() => mergeAdapter(baseDir, adapterDir, outDir))).message).toMatch(
      new RegExp(
        `tensor 'base_model\\.model\\.model\\.layers\\.0\\.self_attn\\.q_proj\\.lora_A\\.weight' has shape \\[4, 64\\] but the base model in ${baseDir} needs \\[4, 32\\]`,
      ),
    );
    expect(existsSync(outDir)).toBe(false);
    expect((await errorOf(() => mergeAdapter(baseDir, adapterDir, baseDir))).message).toMatch(/the output directory is the base directory/);
  });
});
