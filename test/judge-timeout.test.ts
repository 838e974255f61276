// Every call into a judge has a time limit: a function judge whose promise never settles fails
// with an error naming the judge and the limit (callTimeoutMs) instead of the process exiting
// silently with code 13 — in process, and through a spawned `sppo run` whose config names a
// judge module that never answers; an engine judge's forward pass is bounded the same way.
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { stringify as toYaml } from 'yaml';
import { writeTinyMistralPolicy } from './fixtures/mistral-tokenizer.js';
import type { Model as EngineModel } from '../lib/engine/model.js';
import { projectLastTokens } from '../lib/preference/last-token.js';
import { functionPreference, JudgeTimeoutError, PreferenceError, withJudgeTimeout } from '../lib/preference/index.js';

const root = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..');
const tmp = mkdtempSync(path.join(tmpdir(), 'sppo-judge-timeout-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

const never = (): Promise<number> => new Promise<number>(() => undefined);

describe('a function judge that never settles', () => {
  it('fails after callTimeoutMs, naming the judge, the pair and the limit', async () => {
    const judge = functionPreference(never, { id: 'hanging-judge-v1', callTimeoutMs: 100 });
    const t0 = performance.now();
    const err = await judge.compare('p', ['a', 'b', 'c']).catch((e: unknown) => e);
    expect(performance.now() - t0).toBeGreaterThanOrEqual(95);
    // without the limit the call never returns; the margin over 100 ms is for a loaded 2-core machine
    expect(performance.now() - t0).toBeLessThan(4000);
    expect(err).toBeInstanceOf(JudgeTimeoutError);
    expect((err as Error).message).toBe(
      "preference model 'hanging-judge-v1': the call for responses 0 and 1 did not settle within 100 ms (callTimeoutMs)",
    );
    const batch = await judge.compareBatch([{ prompt: 'p', responses: ['a', 'b'] }]).catch((e: unknown) => e);
    expect(batch).toBeInstanceOf(PreferenceError);
    expect((batch as Error).message).toMatch(
      /^prompt 0: preference model 'hanging-judge-v1': the call for responses 0 and 1 did not settle/,
    );
  });

  it('a judge that answers in time is not affected; an abort still wins over the limit', async () => {
    const slow = functionPreference(async () => new Promise<number>((r) => setTimeout(() => r(0.75), 20)), { callTimeoutMs: 1000 });
    expect((await slow.compare('p', ['a', 'b']))[0][1]).toBe(0.75);
    const ac = new AbortController();
    setTimeout(() => ac.abort(new Error('stop now')), 20);
    await expect(functionPreference(never, { callTimeoutMs: 60_000 }).compare('p', ['a', 'b'], { signal: ac.signal })).rejects.toThrow(
      'stop now',
    );
    expect(() => functionPreference(never, { callTimeoutMs: 0 })).toThrow(/callTimeoutMs must be an integer ≥ 1 \(ms\), got 0/);
  });

  it('withJudgeTimeout aborts the call’s own signal at the limit', async () => {
    let seen: AbortSignal | undefined;
    const err = await withJudgeTimeout('j', 'a call', 30, (signal) => {
      seen = signal;
      return never();
    }).catch((e: unknown) => e);
    expect((err as Error).message).toBe("preference model 'j': a call did not settle within 30 ms (callTimeoutMs)");
    expect(seen?.aborted).toBe(true);
    expect(seen?.reason).toBe(err);
  });

  it('an engine judge’s forward pass is bounded the same way, naming the judge', async () => {
    let signal: AbortSignal | undefined;
    const stuck = {
      config: { hidden_size: 2 },
      forward: (_rows: number[][], o: { signal?: AbortSignal }) => {
        signal = o.signal;
        return new Promise(() => undefined);
      },
    } as unknown as EngineModel;
    await expect(projectLastTokens(stuck, [[1, 2, 3]], [[1, 1]], 4, { judgeId: 'lm-judge(tiny,abc)', timeoutMs: 50 })).rejects.toThrow(
      "preference model 'lm-judge(tiny,abc)': a forward pass of 1 rows × 3 tokens did not settle within 50 ms (callTimeoutMs)",
    );
    expect(signal?.aborted).toBe(true);
  });
});

describe('sppo run with a judge module that never answers', () => {
  it('exits 1 with an error naming the judge and the timeout, not 13 with nothing said', async () => {
    const policy = path.join(tmp, 'policy');
    await writeTinyMistralPolicy(policy);
    writeFileSync(
      path.join(tmp, 'prompts.jsonl'),
      ['one', 'two', 'three', 'four'].map((w) => JSON.stringify({ prompt: `Say ${w}.` })).join('\n'),
    );
    writeFileSync(path.join(tmp, 'judge.mjs'), 'export default function hang() {\n  return new Promise(() => {});\n}\n');
    const config = path.join(tmp, 'sppo.yaml');
    writeFileSync(
      config,
      toYaml({
        model: { path: './policy' },
        data: { prompts: './prompts.jsonl', evalSize: 2, maxPromptTokens: 32 },
        generation: { samplesPerPrompt: 2, maxNewTokens: 3, maxBatch: 4 },
        preference: { kind: 'function', module: './judge.mjs', id: 'hanging-judge-v1', callTimeoutMs: 300 },
        training: { batchSize: 2, maxLength: 48 },
        run: { dir: './run', iterations: 1 },
      }),
    );
    const r = spawnSync(process.execPath, ['--import', 'tsx', path.join(root, 'lib/cli/main.ts'), 'run', '--config', config], {
      cwd: root,
      encoding: 'utf8',
      timeout: 100_000,
    });
    expect(r.status, `${r.stdout}\n${r.stderr}`).toBe(1);
    expect(r.stderr).toMatch(
      /preference model 'hanging-judge-v1': the call for responses 0 and 1 did not settle within 300 ms \(callTimeoutMs\)/,
    );
  });
});
