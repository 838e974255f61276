// Resuming with changed inputs or a changed config, on real files: run.json fingerprints every
// input file (prompts, judge module, the model directory's config, tokenizer, chat template and
// weight headers); a change that a finished stage used is refused, naming the file or the field
// and the stage; a change only the stages still to do use is accepted, and the run says which.
import { mkdirSync, mkdtempSync, readFileSync, rmSync, utimesSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { parseConfig } from '../lib/config/load.js';
import type { RunConfig, RunConfigInput } from '../lib/config/schema.js';
import { demoConfigInput } from '../lib/demo/demo.js';
import { stageHashes } from '../lib/sppo/resume.js';
import { RunDir, type StageName } from '../lib/sppo/run-dir.js';

const root = mkdtempSync(path.join(tmpdir(), 'sppo-run-resume-'));
afterAll(() => rmSync(root, { recursive: true, force: true }));

/** A safetensors file with one tensor: its 8-byte header length, the JSON header, the data. */
function safetensors(shape: number[], data: Buffer): Buffer {
  const header = Buffer.from(JSON.stringify({ w: { dtype: 'F32', shape, data_offsets: [0, data.length] } }));
  const length = Buffer.alloc(8);
  length.writeBigUInt64LE(BigInt(header.length));
  return Buffer.concat([length, header, data]);
}

/** A run over a model directory, a prompt file and a function judge (only their files matter here). */
function inputsRun(name: string) {
  const dir = path.join(root, name);
  const files = {
    prompts: path.join(dir, 'prompts.jsonl'),
    judge: path.join(dir, 'judge.mjs'),
    model: path.join(dir, 'model'),
  };
  mkdirSync(files.model, { recursive: true });
  writeFileSync(files.prompts, '{"prompt": "a"}\n{"prompt": "b"}\n');
  writeFileSync(files.judge, 'export default () => 0.5;\n');
  writeFileSync(path.join(files.model, 'config.json'), '{}');
  writeFileSync(path.join(files.model, 'tokenizer.json'), '{}');
  writeFileSync(path.join(files.model, 'model.safetensors'), safetensors([2], Buffer.alloc(8)));
  const config = (over: Partial<RunConfigInput> = {}): RunConfig =>
    parseConfig(
      {
        model: { path: 'model' },
        data: { prompts: 'prompts.jsonl' },
        preference: { kind: 'function', module: 'judge.mjs', id: 'half' },
        run: { dir: 'run', iterations: 2 },
        ...over,
      },
      { baseDir: dir },
    );
  return { dir, files, config, runDir: path.join(dir, 'run') };
}

async function opened(dir: string, config: RunConfig): Promise<{ run: RunDir; notices: string[] }> {
  const notices: string[] = [];
  const run = await RunDir.open(dir, config, { onNotice: (m) => notices.push(m) });
  return { run, notices };
}

/** Opening refuses, with a message holding each fragment. */
async function refused(dir: string, config: RunConfig, ...fragments: string[]): Promise<void> {
  const err = await RunDir.open(dir, config).then(
    async (run) => {
      await run.close();
      return new Error('opened');
    },
    (e: unknown) => e as Error,
  );
  for (const f of fragments) expect(err.message).toContain(f);
}

async function finish(run: RunDir, ...stages: [number, StageName][]): Promise<void> {
  for (const [t, stage] of stages) await run.writeStage(t, stage, { value: {}, seconds: 1 });
}

describe('input files', () => {
  it('run.json records a fingerprint of each: whole-file sha256, and header, size and time for weights', async () => {
    const { runDir, config } = inputsRun('record');
    const { run } = await opened(runDir, config());
    const inputs = (await run.readRun())?.inputs ?? {};
    await run.close();
    expect(inputs['data.prompts']).toMatch(/^sha256:[0-9a-f]{64}$/);
    expect(inputs['preference.module']).toMatch(/^sha256:/);
    expect(inputs['model.path/config.json']).toMatch(/^sha256:/);
    expect(inputs['model.path/tokenizer.json']).toMatch(/^sha256:/);
    expect(inputs['model.path/chat_template.jinja']).toBe('absent');
    expect(inputs['model.path/model.safetensors']).toMatch(/^header-sha256:[0-9a-f]{64} bytes:\d+ modified:\S+$/);
  });

  it('a changed prompt file is refused on resume, naming it and the finished stage that read it', async () => {
    const { runDir, files, config } = inputsRun('prompts');
    const { run } = await opened(runDir, config());
    await finish(run, [0, 'base'], [0, 'base-eval']);
    await run.close();
    const original = readFileSync(files.prompts);
    writeFileSync(files.prompts, '{"prompt": "a"}\n{"prompt": "c"}\n');
    await refused(
      runDir,
      config(),
      `the input data.prompts (${files.prompts}) changed content (used by the finished stage base)`,
      'restore',
    );
    writeFileSync(files.prompts, original);
    await (await RunDir.open(runDir, config())).close();
  });

  it("the model's files: a weight shard by header, size or time, a new chat template, the tokenizer", async () => {
    const { runDir, files, config } = inputsRun('model');
    const { run } = await opened(runDir, config());
    await finish(run, [0, 'base']);
    await run.close();
    const weights = path.join(files.model, 'model.safetensors');
    const original = readFileSync(weights);
    // same header and size, new bytes: only the time tells (and is named)
    writeFileSync(weights, safetensors([2], Buffer.alloc(8, 1)));
    utimesSync(weights, new Date(2001, 1, 1), new Date(2001, 1, 1));
    await refused(runDir, config(), 'the input model.path/model.safetensors', 'changed (modification time differs)');
    writeFileSync(weights, safetensors([1], Buffer.alloc(4)));
    await refused(runDir, config(), 'changed (header, size, modification time differ)');
    writeFileSync(weights, original);
    await refused(runDir, config(), 'changed (modification time differs)');
    // the time put back as it was recorded: accepted again
    const recorded = /modified:(\S+)/.exec(
      JSON.parse(readFileSync(path.join(runDir, 'run.json'), 'utf8')).inputs['model.path/model.safetensors'],
    )![1];
    utimesSync(weights, new Date(recorded), new Date(recorded));
    await (await RunDir.open(runDir, config())).close();

    writeFileSync(path.join(files.model, 'chat_template.jinja'), '{{ messages }}');
    await refused(runDir, config(), 'the input model.path/chat_template.jinja', 'appeared');
    rmSync(path.join(files.model, 'chat_template.jinja'));
    writeFileSync(path.join(files.model, 'tokenizer.json'), '{"changed": true}');
    await refused(runDir, config(), 'the input model.path/tokenizer.json', 'changed content', 'used by the finished stage base');
  });

  it('a changed judge module is accepted while no judging is finished, and refused once it is', async () => {
    const { runDir, files, config } = inputsRun('judge');
    let { run } = await opened(runDir, config());
    await finish(run, [0, 'base'], [0, 'base-eval'], [1, 'generate']);
    await run.close();
    writeFileSync(files.judge, 'export default () => 0.25;\n');
    const reopened = await opened(runDir, config());
    run = reopened.run;
    const { notices } = reopened;
    expect(notices).toEqual([
      expect.stringContaining(`the input preference.module (${files.judge}) changed content; no finished stage used them`) as string,
    ]);
    expect(notices[0]).toContain('the stages still to do use the new values: judge (iterations 1–2), evaluate (iterations 1–2)');
    expect(readFileSync(run.logFile, 'utf8')).toContain(notices[0]);
    await finish(run, [1, 'judge']);
    await run.close();
    await (await RunDir.open(runDir, config())).close(); // recorded: no change any more
    writeFileSync(files.judge, 'export default () => 0.75;\n');
    await refused(runDir, config(), 'the input preference.module', 'used by the finished stage iter-1 judge');
  });
});

describe('per-stage config hashes', () => {
  const demo = (dir: string, training: Partial<NonNullable<RunConfigInput['training']>> = {}, generation = {}) => {
    const c = demoConfigInput({ dir, iterations: 3, quick: true });
    return parseConfig({ ...c, training: { ...c.training, ...training }, generation: { ...c.generation, ...generation } });
  };

  it('a field changes the hash of the stages that use it and no other', () => {
    const dir = path.join(root, 'hashes');
    const before = stageHashes(demo(dir), {}, []);
    const changed = (c: RunConfig) => {
      const after = stageHashes(c, {}, []);
      return (Object.keys(before) as StageName[]).filter((s) => before[s] !== after[s]);
    };
    expect(changed(demo(dir, { eta: 3 }))).toEqual(['train']);
    expect(changed(demo(dir, { maxLength: 20 }))).toEqual(['dataset', 'train']);
    expect(changed(demo(dir, {}, { temperature: 0.5 }))).toEqual(['base-eval', 'generate', 'evaluate']);
    expect(changed(demo(path.join(root, 'elsewhere')))).toEqual([]);
    expect(changed({ ...demo(dir), run: { ...demo(dir).run, seed: 1 } })).toHaveLength(7);
    // LoRA decides what every checkpoint is, π_0's included
    expect(changed(demo(dir, { lora: { rank: 8 } }))).toHaveLength(7);
    // the gradients' precision: the demo's supervised base trains with it too
    expect(changed(demo(dir, { gradientPrecision: 'bf16' }))).toEqual(['base', 'train']);
  });

  it('a training field is accepted while no train stage is finished, and the run says which stages use it', async () => {
    const dir = path.join(root, 'training');
    let { run, notices } = await opened(dir, demo(dir));
    await finish(run, [0, 'base'], [0, 'base-eval'], [1, 'generate'], [1, 'judge'], [1, 'dataset']);
    await run.close();

    ({ run, notices } = await opened(dir, demo(dir, { eta: 3, optimizer: { kind: 'rmsprop', lr: 1e-4, maxGradNorm: 10 } })));
    expect(notices).toEqual([
      'changed since the run started: training.eta: 5 → 3; training.optimizer.lr: 0.0002 → 0.0001; no finished stage used them, ' +
        'so the stages still to do use the new values: train (iterations 1–3)',
    ]);
    expect((await run.readRun())?.config.training.eta).toBe(3);
    await run.close();
    // the record now holds the new values: the same config again is no change
    ({ run, notices } = await opened(dir, demo(dir, { eta: 3, optimizer: { kind: 'rmsprop', lr: 1e-4, maxGradNorm: 10 } })));
    expect(notices).toEqual([]);
    await run.close();

    // fields a finished stage used: refused, naming the field and the stage
    const now = { eta: 3, optimizer: { kind: 'rmsprop' as const, lr: 1e-4, maxGradNorm: 10 } };
    await refused(dir, demo(dir, { ...now, maxLength: 20 }), 'training.maxLength: 24 → 20 (used by the finished stage iter-1 dataset)');
    await refused(dir, demo(dir, now, { temperature: 0.5 }), 'generation.temperature: 1 → 0.5 (used by the finished stage base-eval)');
    await refused(dir, demo(dir, { ...now, eta: 4 }, { temperature: 0.5 }), 'generation.temperature', 'restore them, or use a new run.dir');
    expect(JSON.parse(readFileSync(path.join(dir, 'run.json'), 'utf8')).config.training.eta).toBe(3);
  });
});
