// The run directory on real temporary directories: its layout, stage files, metrics.jsonl and
// run.json read back (or refused with a RunDirError naming the file), the newest complete policy
// when a newer one is unfinished, checkpoints committed whole, and the demo's character tokenizer
// saved with a checkpoint and loaded back through tokenizer.json.
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { parseConfig } from '../lib/config/load.js';
import { seededRng } from '../lib/data/random.js';
import { demoConfigInput, demoSetup } from '../lib/demo/demo.js';
import { CharTokenizer, demoPolicyText } from '../lib/demo/task.js';
import { loadPretrained, savePretrained } from '../lib/io/checkpoint.js';
import { Tokenizer } from '../lib/io/tokenizer.js';
import type { IterationMetrics } from '../lib/sppo/run.js';
import { RunDir, RunDirError, type StageName } from '../lib/sppo/run-dir.js';

const root = mkdtempSync(path.join(tmpdir(), 'sppo-run-dir-'));
afterAll(() => rmSync(root, { recursive: true, force: true }));

const configOf = (dir: string, iterations = 3) => parseConfig(demoConfigInput({ dir, iterations, quick: true }));

const row = (iteration: number, mean: number): IterationMetrics => ({
  iteration,
  winRateVsBase: { mean, low: mean - 0.05, high: mean + 0.05, n: 10 },
  meanResponseLength: 7,
  seconds: { evaluate: 1 },
});

/** A checkpoint directory written by `savePolicy`'s callback. */
const checkpoint = (text: string) => (dir: string) => {
  mkdirSync(dir, { recursive: true });
  writeFileSync(path.join(dir, 'config.json'), text);
  return Promise.resolve();
};

/** A RunDirError about `file` whose message says each fragment. */
async function expectRunDirError(promise: Promise<unknown>, file: string, ...fragments: string[]): Promise<void> {
  const err = await promise.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(RunDirError);
  expect((err as RunDirError).path).toBe(file);
  for (const f of fragments) expect((err as Error).message).toContain(f);
}

describe('RunDir layout', () => {
  it('names every file of the run directory', async () => {
    const dir = path.join(root, 'layout');
    const run = await RunDir.open(dir, configOf(dir));
    expect(run.root).toBe(dir);
    expect(run.policy(0)).toBe(path.join(dir, 'base', 'policy'));
    expect(run.policy(3)).toBe(path.join(dir, 'iter-3', 'policy'));
    expect(run.stageFile(0, 'base')).toBe(path.join(dir, 'base', 'base.json'));
    expect(run.stageFile(0, 'base-eval')).toBe(path.join(dir, 'base', 'eval.json'));
    expect(['generate', 'judge', 'dataset', 'train', 'evaluate'].map((s) => run.stageFile(2, s as never))).toEqual(
      ['generations', 'judgments', 'dataset', 'train', 'eval'].map((f) => path.join(dir, 'iter-2', `${f}.json`)),
    );
    expect(run.metricsFile).toBe(path.join(dir, 'metrics.jsonl'));
    expect(run.judgeCache).toBe(path.join(dir, 'judge-cache'));
    expect(run.reportFiles).toEqual({
      html: path.join(dir, 'report.html'),
      svg: path.join(dir, 'curves.svg'),
      png: path.join(dir, 'curves.png'),
    });
    expect(() => run.stageFile(0, 'train')).toThrow("stage 'train' belongs to an iteration t ≥ 1");
    expect(() => run.stageFile(1, 'base')).toThrow("stage 'base' belongs to π_0");
    expect(() => run.policy(-1)).toThrow(RangeError);
    expect(() => run.policy(1.5)).toThrow(RangeError);
    expect(run.lockFile).toBe(path.join(dir, 'run.lock'));
    // opening takes the lock and records the config and the start
    expect(readdirSync(dir).sort()).toEqual(['run.json', 'run.lock', 'run.log']);
    expect((await run.readRun())?.config).toEqual(configOf(dir));
    await run.close();
  });

  it('a view for reading creates nothing and refuses to write', async () => {
    const dir = path.join(root, 'view');
    const view = RunDir.at(dir);
    expect(await view.readRun()).toBeUndefined();
    expect(await view.newestPolicy()).toBeUndefined();
    await expect(view.writeStage(0, 'base', { value: {}, seconds: 0 })).rejects.toThrow('not open for writing');
    await expect(view.savePolicy(0, checkpoint('{}'))).rejects.toThrow('not open for writing');
    await expect(view.appendMetrics(row(0, 0.5))).rejects.toThrow('not open for writing');
    expect(existsSync(dir)).toBe(false);
  });

  it('refuses to open a run of another configuration that a finished stage used, naming the field and the stage', async () => {
    const dir = path.join(root, 'changed');
    const run = await RunDir.open(dir, configOf(dir));
    await run.writeStage(0, 'base', { value: {}, seconds: 1 });
    await run.close();
    await (await RunDir.open(dir, configOf(dir))).close();
    await expect(RunDir.open(dir, configOf(dir, 4))).rejects.toThrow('run.iterations: 3 → 4 (used by the finished stage base)');
    expect(readFileSync(path.join(dir, 'run.log'), 'utf8').trimEnd().split('\n')).toHaveLength(1);
  });
});

describe('stage files', () => {
  it('round-trip, and a malformed one is a RunDirError naming it', async () => {
    const dir = path.join(root, 'stages');
    const run = await RunDir.open(dir, configOf(dir));
    expect(await run.readStage(1, 'judge')).toBeUndefined();
    await run.writeStage(1, 'judge', { value: { preference: [[[0.5]]] }, seconds: 2.5 });
    expect(await run.readStage(1, 'judge')).toEqual({ value: { preference: [[[0.5]]] }, seconds: 2.5 });
    const file = run.stageFile(1, 'judge');
    writeFileSync(file, '{"value": [1, 2');
    await expectRunDirError(run.readStage(1, 'judge'), file, file, 'not valid JSON');
    writeFileSync(file, '{"value": 1}');
    await expectRunDirError(run.readStage(1, 'judge'), file, file, 'not a stage file', 'delete it');
    writeFileSync(file, '');
    await expectRunDirError(run.readStage(1, 'judge'), file, `${file}: empty; expected the judge stage's output, JSON {value, seconds}`);
    await run.close();
  });

  it('are read through their schema: a wrong shape names the file and the field', async () => {
    const dir = path.join(root, 'shapes');
    const run = await RunDir.open(dir, configOf(dir));
    const interval = { mean: 0.5, low: 0.4, high: 0.6, n: 2 };
    const sample = { prompt: 'ab', answer: 'S:ba', tokens: [1, 2] };
    await run.writeStage(1, 'evaluate', { value: { samples: [sample], winRateVsBase: interval }, seconds: 1 });
    expect((await run.readStage(1, 'evaluate'))?.value.samples).toEqual([sample]);
    const wrong = async (stage: StageName, value: unknown, ...fragments: string[]) => {
      const file = run.stageFile(stage === 'base' || stage === 'base-eval' ? 0 : 1, stage);
      writeFileSync(file, JSON.stringify({ value, seconds: 1 }));
      await expectRunDirError(
        run.readStage(stage === 'base' || stage === 'base-eval' ? 0 : 1, stage),
        file,
        file,
        ...fragments,
        'delete it',
      );
    };
    mkdirSync(path.join(dir, 'base'));
    // what once failed as `ev.samples.map is not a function`
    await wrong(
      'evaluate',
      { samples: 5, winRateVsBase: interval },
      "not the evaluate stage's output",
      'value.samples: expected array, got number',
    );
    await wrong(
      'base-eval',
      { samples: [{ ...sample, tokens: 'ab' }], winRateVsBase: interval },
      'value.samples[0].tokens: expected array',
    );
    await wrong(
      'generate',
      { prompts: [], responses: [[{ tokens: [1], logprobs: [null], text: 'x', stopReason: 'eos' }]] },
      'value.responses[0][0].logprobs[0]',
    );
    await wrong('judge', { preference: [[['0.5']]] }, 'value.preference[0][0][0]: expected number');
    await wrong('dataset', { mode: 'pairs' }, 'value.mode');
    await wrong('train', { steps: [{ step: 1, loss: 0.5 }] }, 'value.steps[0].metrics');
    await wrong('base', [], 'value: expected record');
    await run.close();
  });
});

describe('policies', () => {
  it('the newest complete policy skips a newer one that is unfinished', async () => {
    const dir = path.join(root, 'newest');
    const run = await RunDir.open(dir, configOf(dir));
    expect(await run.newestPolicy()).toBeUndefined();
    await run.savePolicy(0, checkpoint('{"t":0}'));
    expect(run.hasPolicy(0)).toBe(false); // base.json not written yet: the stage may still fail
    await run.writeStage(0, 'base', { value: {}, seconds: 1 });
    expect(await run.newestPolicy()).toBe(0);
    await run.savePolicy(1, checkpoint('{"t":1}'));
    await run.writeStage(1, 'train', { value: { steps: [] }, seconds: 1 });
    // π_2 committed but its train.json missing (killed between the two), π_3 only a temporary
    await run.savePolicy(2, checkpoint('{"t":2}'));
    mkdirSync(path.join(dir, 'iter-3', 'policy.tmp-1-abcdef01'), { recursive: true });
    mkdirSync(path.join(dir, 'iter-10'));
    expect(run.hasPolicy(2)).toBe(false);
    expect(await run.newestPolicy()).toBe(1);
    expect(await RunDir.at(dir).newestPolicy()).toBe(1);
    await run.close();
  });

  it('savePolicy replaces a checkpoint whole and leaves no temporary', async () => {
    const dir = path.join(root, 'save');
    const run = await RunDir.open(dir, configOf(dir));
    await run.savePolicy(1, checkpoint('old'));
    // a killed save's leftover, from another process
    mkdirSync(path.join(dir, 'iter-1', 'policy.tmp-99999-0badc0de'));
    writeFileSync(path.join(run.policy(1), 'stale.safetensors'), 'x');
    await run.savePolicy(1, checkpoint('new'));
    // another process's temporary stays (a dead one's goes at the next open)
    expect(readdirSync(path.join(dir, 'iter-1')).sort()).toEqual(['policy', 'policy.tmp-99999-0badc0de']);
    rmSync(path.join(dir, 'iter-1', 'policy.tmp-99999-0badc0de'), { recursive: true });
    expect(readdirSync(run.policy(1))).toEqual(['config.json']);
    expect(readFileSync(path.join(run.policy(1), 'config.json'), 'utf8')).toBe('new');
    // a save that fails leaves the previous checkpoint and no temporary
    await expect(
      run.savePolicy(1, async (tmp) => {
        await checkpoint('half')(tmp);
        throw new Error('disk full');
      }),
    ).rejects.toThrow('disk full');
    expect(readdirSync(path.join(dir, 'iter-1'))).toEqual(['policy']);
    expect(readFileSync(path.join(run.policy(1), 'config.json'), 'utf8')).toBe('new');
    await run.close();
  });
});

describe('metrics.jsonl', () => {
  it('appends rows, and an iteration appended again replaces itself and what followed', async () => {
    const dir = path.join(root, 'metrics');
    const run = await RunDir.open(dir, configOf(dir));
    await expectRunDirError(run.readMetrics(), run.metricsFile, `${dir} has no metrics.jsonl`);
    for (const [t, mean] of [
      [0, 0.5],
      [1, 0.6],
      [2, 0.7],
    ])
      await run.appendMetrics(row(t, mean));
    expect(await run.readMetrics()).toEqual([row(0, 0.5), row(1, 0.6), row(2, 0.7)]);
    await run.appendMetrics(row(1, 0.65)); // a resumed run records iteration 1 again
    expect(await RunDir.at(dir).readMetrics()).toEqual([row(0, 0.5), row(1, 0.65)]);
    await run.appendMetrics(row(0, 0.5));
    expect(readFileSync(run.metricsFile, 'utf8')).toBe(`${JSON.stringify(row(0, 0.5))}\n`);
    await run.close();
  });

  it('a malformed file is a RunDirError naming it and the line', async () => {
    const dir = path.join(root, 'bad-metrics');
    mkdirSync(dir);
    const file = path.join(dir, 'metrics.jsonl');
    writeFileSync(file, `${JSON.stringify(row(0, 0.5))}\n{oops\n`);
    await expectRunDirError(RunDir.at(dir).readMetrics(), file, file, 'line 2 is not valid JSON');
    writeFileSync(file, `${JSON.stringify(row(0, 0.5))}\n{"iteration": 1}\n`);
    await expectRunDirError(RunDir.at(dir).readMetrics(), file, file, "line 2 is not an iteration's metrics");
    writeFileSync(file, '\n');
    await expectRunDirError(RunDir.at(dir).readMetrics(), file, file, 'is empty');
    // missing seconds read as none
    writeFileSync(file, JSON.stringify({ ...row(0, 0.5), seconds: undefined }));
    expect((await RunDir.at(dir).readMetrics())[0].seconds).toEqual({});
  });
});

describe('run.json', () => {
  it('a malformed one is a RunDirError naming it, for readers and for open', async () => {
    const dir = path.join(root, 'bad-run');
    mkdirSync(dir);
    const file = path.join(dir, 'run.json');
    writeFileSync(file, '{"hash": "h", "config": ');
    await expectRunDirError(RunDir.at(dir).readRun(), file, file, 'not valid JSON');
    await expectRunDirError(RunDir.open(dir, configOf(dir)), file, file, 'not valid JSON');
    writeFileSync(file, '{"hash": "h"}');
    await expectRunDirError(RunDir.at(dir).readRun(), file, file, 'not a run record', 'config');
    writeFileSync(file, '[]');
    await expectRunDirError(RunDir.at(dir).readRun(), file, file, 'not a run record');
    // what once failed as `Unexpected end of JSON input`
    writeFileSync(file, '');
    await expectRunDirError(RunDir.open(dir, configOf(dir)), file, `${file}: empty; expected the run record`);
  });
});

describe('the demo tokenizer saved with a checkpoint', () => {
  it('loads back through tokenizer.json with the same ids, stop tokens, errors and text as the in-memory one', async () => {
    const dir = path.join(root, 'demo-tokenizer');
    const config = configOf(dir);
    const { setup, tokenizer } = demoSetup(config);
    const run = await RunDir.open(dir, config);
    try {
      await run.savePolicy(0, (policy) => savePretrained(setup.model, policy, { tokenizer: setup.tokenizer }));
    } finally {
      await setup.model.dispose();
      await run.close();
    }
    expect(readdirSync(run.policy(0))).toEqual(expect.arrayContaining(['tokenizer.json', 'tokenizer_config.json']));
    const loaded = await Tokenizer.fromDirectory(run.policy(0));
    const saved = demoPolicyText(loaded);
    expect(loaded.vocabSize).toBe(tokenizer.vocabSize);
    expect(saved.stopTokens).toEqual(tokenizer.stopTokens);

    const prompts = [...setup.split.evaluation, ...setup.split.iterations.flat(), tokenizer.chars, '', '>>S:'];
    for (const p of prompts) expect(saved.promptIds(p), p).toEqual(tokenizer.promptIds(p));
    // the chat template gives the same prompt, so `--model` and transformers read it alike
    for (const p of prompts.slice(0, 20)) expect(loaded.encodeChat([{ role: 'user', content: p }])).toEqual(tokenizer.promptIds(p));
    const refusal = (f: () => unknown) => {
      try {
        f();
      } catch (e) {
        return (e as Error).message;
      }
      return 'no error';
    };
    for (const bad of ['abz', 'a b', 'a<s>', 'A'])
      expect(refusal(() => saved.promptIds(bad))).toBe(refusal(() => tokenizer.promptIds(bad)));

    // answers as generated: any ids (<pad> and <s> included), with or without an <eos>
    const rng = seededRng(5);
    const answers = Array.from({ length: 500 }, () => Array.from({ length: rng.int(16) }, () => rng.int(tokenizer.vocabSize)));
    answers.push([], [CharTokenizer.EOS], [CharTokenizer.PAD, CharTokenizer.BOS, 5, CharTokenizer.EOS, 6], tokenizer.encode('S:cba'));
    for (const ids of answers) expect(saved.decode(Int32Array.from(ids)), ids.join(' ')).toBe(tokenizer.decode(ids));
    expect(saved.decode([...tokenizer.encode('P:dcba'), CharTokenizer.EOS])).toBe('P:dcba');

    // the checkpoint is a whole model directory that brings its tokenizer
    const { model, tokenizer: withModel } = await loadPretrained(run.policy(0), { maxBatch: 1, maxSeq: 32 }, { training: false });
    await model.dispose();
    expect(withModel?.encode('abc')).toEqual(tokenizer.promptIds('abc'));
  });
});
