// An SPPO run with training.lora on a tiny Hugging Face-layout model (random Llama weights over a
// character tokenizer with a chat template) under a function judge that prefers answers with
// more 'a's: every checkpoint is a PEFT adapter directory over the model directory, the policy
// learns (held-out win rate against π_0 above ½), the base never moves, a run killed mid-way
// resumes to exactly the uninterrupted run's results, and the merge of an iteration's adapter
// into the base computes the logits of base + adapter.
import { cpSync, existsSync, mkdtempSync, readdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { Writable } from 'node:stream';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { main } from '../lib/cli/cli.js';
import { CharTokenizer, demoModelConfig } from '../lib/demo/task.js';
import { loadAdapter, mergeAdapter } from '../lib/io/peft.js';
import {
  demoConfigInput,
  LORA_TARGETS,
  loadPretrained,
  Model,
  parseConfig,
  runSppo,
  savePretrained,
  setupFromConfig,
  type RunConfigInput,
  type StageName,
} from '../lib/index.js';
import { RunDir } from '../lib/sppo/run-dir.js';
import { bitsEqual, prng, tinyConfig } from './fixtures/engine-helpers.js';

const tmp = mkdtempSync(path.join(tmpdir(), 'sppo-lora-run-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));
const modelDir = path.join(tmp, 'model');
const promptFile = path.join(tmp, 'prompts.jsonl');

const tokenizer = new CharTokenizer('abcdefgh');
const countA = (s: string) => [...s].filter((c) => c === 'a').length;
// P(a ≻ b): more 'a's wins, smoothly.
const judge = (_prompt: string, a: string, b: string) => 1 / (1 + Math.exp(-(countA(a) - countA(b))));

const lora = { rank: 4, alpha: 8, targets: ['q_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'] as const };

function input(dir: string, iterations = 2): RunConfigInput {
  return {
    model: { path: modelDir },
    data: { prompts: promptFile, evalSize: 64, promptsPerIteration: 48, maxPromptTokens: 12 },
    generation: { samplesPerPrompt: 4, maxNewTokens: 8, maxBatch: 64, temperature: 1, topP: 1 },
    preference: { kind: 'function', id: 'more-a-v1' },
    training: {
      loss: 'sppo-pair',
      eta: 8,
      optimizer: { kind: 'adamw', lr: 2e-2, maxGradNorm: 10 },
      schedule: { kind: 'constant', warmupRatio: 0 },
      epochsPerIteration: 3,
      batchSize: 8,
      gradAccumSteps: 1,
      maxLength: 24,
      lora: { ...lora, targets: [...lora.targets] },
    },
    run: { dir, iterations, seed: 5 },
  };
}

async function setup(dir: string, iterations?: number) {
  return setupFromConfig(parseConfig(input(dir, iterations)), { judgeFunction: judge });
}

/** The CLI run in-process: its exit code and what it wrote. */
async function cli(...argv: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  let stdout = '';
  let stderr = '';
  const sink = (add: (s: string) => void) =>
    new Writable({
      write(chunk: Buffer, _enc, done) {
        add(chunk.toString());
        done();
      },
    });
  const code = await main(argv, { stdout: sink((t) => (stdout += t)), stderr: sink((t) => (stderr += t)) });
  return { code, stdout, stderr };
}

const metricsOf = (dir: string) =>
  readFileSync(path.join(dir, 'metrics.jsonl'), 'utf8')
    .trim()
    .split('\n')
    .map((l) => {
      const m = JSON.parse(l) as Record<string, unknown>;
      delete m.seconds;
      return m;
    });

beforeAll(async () => {
  const model = Model.create(tinyConfig({ vocab_size: tokenizer.vocabSize, initializer_range: 0.1, seed: 11 }), {
    maxBatch: 1,
    maxSeq: 8,
  });
  try {
    await savePretrained(model, modelDir, { tokenizer: tokenizer.files() });
  } finally {
    await model.dispose();
  }
  // 64 + 2 × 48 distinct prompts over the alphabet but 'a'
  const rand = prng(3);
  const words = new Set<string>();
  while (words.size < 160) words.add(Array.from({ length: 3 + Math.floor(rand() * 4) }, () => 'bcdefgh'[Math.floor(rand() * 7)]).join(''));
  writeFileSync(promptFile, [...words].map((prompt) => JSON.stringify({ prompt })).join('\n') + '\n');
}, 60_000);

describe('sppo run with training.lora', () => {
  const whole = path.join(tmp, 'whole');

  it('learns, saving every policy as a PEFT adapter directory over the untouched base', async () => {
    const s = await setup(whole);
    expect(s.model.lora).toEqual(lora);
    const base = new Map(s.model.params().flatMap((p) => (p.adapter ? [] : [[p.name, s.model.getParam(p.name)] as const])));
    let metrics;
    try {
      ({ metrics } = await runSppo(s));
      // the base weights are the model directory's, bitwise, after two iterations of training
      for (const [name, v] of base) expect(bitsEqual(s.model.getParam(name), v), name).toBe(true);
    } finally {
      await s.model.dispose();
      await s.preference.dispose();
    }
    const run = RunDir.at(whole);
    for (const t of [0, 1, 2]) {
      expect(readdirSync(run.policy(t)).sort(), `π_${t}`).toEqual(['adapter_config.json', 'adapter_model.safetensors']);
      const config = JSON.parse(readFileSync(path.join(run.policy(t), 'adapter_config.json'), 'utf8')) as Record<string, unknown>;
      expect(config.base_model_name_or_path).toBe(modelDir);
    }
    // π_0's adapters are PEFT's initialisation (B = 0); training moved them
    const a0 = await loadAdapter(run.policy(0), s.model.config);
    const a2 = await loadAdapter(run.policy(2), s.model.config);
    for (const [name, v] of a0.tensors) if (name.includes('lora_B')) expect(v.every((x) => x === 0)).toBe(true);
    expect([...a2.tensors].filter(([name, v]) => !bitsEqual(v, a0.tensors.get(name)!)).length).toBe(a2.tensors.size);
    const last = metrics[metrics.length - 1];
    console.log(
      metrics
        .map(
          (m) =>
            `iter ${m.iteration}: win vs base ${m.winRateVsBase.mean.toFixed(3)} [${m.winRateVsBase.low.toFixed(3)}, ${m.winRateVsBase.high.toFixed(3)}]`,
        )
        .join('\n'),
    );
    // each iterate's held-out answers beat π_0's by more than the 95% interval's half-width, π_2 more than π_1
    expect(metrics[1].winRateVsBase.low).toBeGreaterThan(0.5);
    expect(last.winRateVsBase.low).toBeGreaterThan(0.5);
    expect(last.winRateVsBase.mean).toBeGreaterThan(metrics[1].winRateVsBase.mean);
  }, 300_000);

  it('a run killed in a stage of the second iteration resumes to the uninterrupted results', async () => {
    const expected = metricsOf(whole);
    for (const victim of ['generate', 'train'] as StageName[]) {
      const dir = path.join(tmp, `killed-${victim}`);
      const first = await setup(dir);
      const ac = new AbortController();
      await expect(
        runSppo(first, {
          signal: ac.signal,
          onStage: (e) => {
            if (e.iteration === 2 && e.stage === victim && e.status === 'start')
              queueMicrotask(() => ac.abort(new Error(`killed in ${victim}`)));
          },
        }),
      ).rejects.toThrow(`killed in ${victim}`);
      await first.model.dispose();
      await first.preference.dispose();
      const second = await setup(dir);
      try {
        await runSppo(second);
      } finally {
        await second.model.dispose();
        await second.preference.dispose();
      }
      expect(metricsOf(dir), `killed in ${victim}`).toEqual(expected);
      for (const t of [1, 2]) {
        const [a, b] = [
          await loadAdapter(RunDir.at(dir).policy(t), second.model.config),
          await loadAdapter(RunDir.at(whole).policy(t), second.model.config),
        ];
        for (const [name, v] of a.tensors) expect(bitsEqual(v, b.tensors.get(name)!), `${victim}: π_${t} ${name}`).toBe(true);
      }
    }
  }, 300_000);

  it("an iteration's merged checkpoint computes the logits of base + its adapter", async () => {
    const adapterDir = RunDir.at(whole).policy(2);
    const merged = path.join(tmp, 'merged');
    await mergeAdapter(modelDir, adapterDir, merged);
    const plan = { maxBatch: 2, maxSeq: 16 };
    const { model: plain } = await loadPretrained(merged, plan);
    const { model: adapted } = await loadPretrained(modelDir, plan, { lora: { ...lora, targets: [...lora.targets] } });
    try {
      expect(plain.lora).toBeUndefined();
      adapted.setAdapterTensors((await loadAdapter(adapterDir, adapted.config)).tensors);
      const rand = prng(8);
      const tokens = Array.from({ length: 2 }, () => Array.from({ length: 16 }, () => Math.floor(rand() * tokenizer.vocabSize)));
      const want = (await adapted.forward(tokens)).logits!;
      const got = (await plain.forward(tokens)).logits!;
      // The merge adds (alpha/r)·B·A to W in float64 and rounds once; the adapted model adds
      // (alpha/r)·(x·Aᵀ)·Bᵀ in float32: equal up to float32 rounding of logits of size ~1.
      let worst = 0;
      for (let i = 0; i < want.length; i++) worst = Math.max(worst, Math.abs(want[i] - got[i]));
      const { model: baseModel } = await loadPretrained(modelDir, plan);
      const base = (await baseModel.forward(tokens)).logits!;
      await baseModel.dispose();
      let moved = 0;
      for (let i = 0; i < want.length; i++) moved = Math.max(moved, Math.abs(want[i] - base[i]));
      expect(worst).toBeLessThan(2e-5);
      expect(moved).toBeGreaterThan(1e-2); // the adapter matters, so the comparison shows something
    } finally {
      await plain.dispose();
      await adapted.dispose();
    }
    expect(existsSync(path.join(merged, 'config.json'))).toBe(true);
  });

  it('sppo generate samples an adapter directory as base + adapter: the merged checkpoint gives the same answers', async () => {
    const args = ['--prompts', promptFile, '--max-new-tokens', '6', '--seed', '3', '--temperature', '1'];
    const adapter = await cli('generate', '--model', RunDir.at(whole).policy(2), ...args);
    const merged = await cli('generate', '--model', path.join(tmp, 'merged'), ...args);
    const base = await cli('generate', '--model', modelDir, ...args);
    expect([adapter.code, merged.code, base.code], adapter.stderr + merged.stderr).toEqual([0, 0, 0]);
    const rows = (r: { stdout: string }) =>
      r.stdout
        .trim()
        .split('\n')
        .map((l) => JSON.parse(l) as { response: string; logprob: number });
    const [a, m, b] = [rows(adapter), rows(merged), rows(base)];
    expect(a.map((r) => r.response)).toEqual(m.map((r) => r.response));
    a.forEach((r, i) => expect(r.logprob).toBeCloseTo(m[i].logprob, 3));
    expect(a.map((r) => r.response)).not.toEqual(b.map((r) => r.response));
    // an adapter whose base is not on this machine: a usage error saying how to sample it
    const moved = path.join(tmp, 'moved-adapter');
    cpSync(RunDir.at(whole).policy(2), moved, { recursive: true });
    const config = path.join(moved, 'adapter_config.json');
    writeFileSync(config, JSON.stringify({ ...JSON.parse(readFileSync(config, 'utf8')), base_model_name_or_path: '/nowhere/model' }));
    const refused = await cli('generate', '--model', moved, ...args);
    expect(refused.code).toBe(2);
    expect(refused.stderr).toContain(`--model: ${moved} is a LoRA adapter over /nowhere/model, which is not a model directory here`);
  });

  it('a demo run with LoRA saves its seeded base once, and sppo generate --demo-run samples base + adapter', async () => {
    const dir = path.join(tmp, 'demo-lora');
    const demo = demoConfigInput({ dir, iterations: 1, quick: true });
    const config = parseConfig({
      ...demo,
      data: { ...demo.data, words: 300, evalSize: 60 },
      // all seven targets: the merge below checks each one's slice of the fused blocks (k at column q_dim)
      training: { ...demo.training, lora: { rank: 2, alpha: 4, targets: [...LORA_TARGETS] } },
      sft: { ...demo.sft, steps: 5 },
    });
    const run = RunDir.at(dir);
    const tokenizer = new CharTokenizer('abcdefgh'); // the styled-reversal task's default alphabet
    const seed = config.model.seed ?? 1;
    // a base of another seed left by a run killed before its base stage finished: not reused
    const stale = Model.create(demoModelConfig(tokenizer, seed + 1), { maxBatch: 1, maxSeq: 8 });
    try {
      await savePretrained(stale, run.frozenBase, { tokenizer: tokenizer.files() });
    } finally {
      await stale.dispose();
    }
    await runSppo(await setupFromConfig(config));
    // every adapter checkpoint names the run's copy of the base, which is the seeded demo base
    for (const t of [0, 1])
      expect(JSON.parse(readFileSync(path.join(run.policy(t), 'adapter_config.json'), 'utf8'))).toMatchObject({
        base_model_name_or_path: path.resolve(run.frozenBase),
      });
    const seeded = Model.create(demoModelConfig(tokenizer, seed), { maxBatch: 1, maxSeq: 8 });
    const { model: frozen } = await loadPretrained(run.frozenBase, { maxBatch: 1, maxSeq: 8 }, { training: false });
    try {
      expect(frozen.params().map((p) => p.name)).toEqual(seeded.params().map((p) => p.name));
      for (const p of seeded.params()) expect(bitsEqual(frozen.getParam(p.name), seeded.getParam(p.name)), p.name).toBe(true);
    } finally {
      await seeded.dispose();
      await frozen.dispose();
    }

    const words = path.join(tmp, 'demo-words.jsonl');
    writeFileSync(words, '{"prompt":"abc"}\n{"prompt":"hgfe"}\n{"prompt":"dca"}\n');
    const merged = path.join(tmp, 'demo-merged');
    await mergeAdapter(run.frozenBase, run.policy(1), merged);
    const sampled = await cli('generate', '--demo-run', dir, '--prompts', words, '--seed', '4');
    // the demo run's sampling settings given to --model
    const viaMerge = await cli(
      'generate',
      '--model',
      merged,
      '--prompts',
      words,
      '--seed',
      '4',
      '--temperature',
      '1',
      '--top-p',
      '1',
      '--max-new-tokens',
      '12',
    );
    expect([sampled.code, viaMerge.code], sampled.stderr + viaMerge.stderr).toEqual([0, 0]);
    const rows = (text: string) =>
      text
        .trim()
        .split('\n')
        .map((l) => JSON.parse(l) as { response: string; logprob: number });
    const [a, m] = [rows(sampled.stdout), rows(viaMerge.stdout)];
    // the chat text leaves the special tokens out where the demo's shows '�'
    expect(a.map((r) => r.response.replaceAll('�', ''))).toEqual(m.map((r) => r.response));
    a.forEach((r, i) => expect(r.logprob).toBeCloseTo(m[i].logprob, 3));

    // the run directory moved: its adapters' recorded (absolute) base is gone, and --demo-run
    // samples over the run's own base/frozen, as before the move
    const moved = path.join(tmp, 'demo-lora-moved');
    renameSync(dir, moved);
    expect(existsSync(path.resolve(run.frozenBase))).toBe(false);
    const again = await cli('generate', '--demo-run', moved, '--prompts', words, '--seed', '4');
    expect(again.code, again.stderr).toBe(0);
    expect(again.stdout).toBe(sampled.stdout);
  }, 120_000);
});
