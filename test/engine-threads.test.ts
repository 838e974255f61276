// setNumThreads while a model is training, run in a child process so that a hang or crash
// fails this test instead of the whole suite.
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { numThreads, setNumThreads } from '../lib/index.js';

const child = fileURLToPath(new URL('./fixtures/engine-threads-child.mts', import.meta.url));

function runChild(
  args: string[],
  timeoutMs: number,
): Promise<{ code: number | null; signal: string | null; stdout: string; stderr: string; timedOut: boolean }> {
  return new Promise((resolve) => {
    const p = spawn(process.execPath, ['--import', 'tsx', child, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    p.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    p.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    let timedOut = false;
    const t = setTimeout(() => {
      timedOut = true;
      p.kill('SIGKILL');
    }, timeoutMs);
    p.on('close', (code, signal) => {
      clearTimeout(t);
      resolve({ code, signal, stdout, stderr, timedOut });
    });
  });
}

describe('thread count', () => {
  it('setNumThreads validates its argument and numThreads reports it', () => {
    const saved = numThreads();
    try {
      expect(() => setNumThreads(-1)).toThrow(/between 0 \(all cores\) and 1024/);
      expect(() => setNumThreads('2' as unknown as number)).toThrow(/must be a number/);
      setNumThreads(1);
      expect(numThreads()).toBe(1);
    } finally {
      setNumThreads(saved);
    }
    expect(numThreads()).toBe(saved);
  });

  it('the child harness completes when the thread count is left alone (control)', async () => {
    const r = await runChild(['50', 'control'], 20_000);
    expect(r.timedOut, r.stderr).toBe(false);
    expect(r.code, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout.trim().split('\n').at(-1)!)).toMatchObject({ settled: 50, fulfilled: 50, errors: [] });
  });

  it('setNumThreads while training never hangs or crashes the process: it is refused or applied safely', async () => {
    // A healthy run takes well under a second; 15 s leaves room for a slow, loaded machine.
    const r = await runChild(['50'], 15_000);
    expect(r.timedOut, 'the process hung (killed after 15 s)').toBe(false);
    expect(r.signal, r.stderr).toBeNull();
    expect(r.code, r.stderr).toBe(0);
    const summary = JSON.parse(r.stdout.trim().split('\n').at(-1)!);
    // every training call settles, and since the count stays within the planned 2 threads, succeeds
    expect(summary).toMatchObject({ settled: 50, fulfilled: 50, errors: [] });
    // a refusal is fine if it says why
    for (const msg of summary.setErrors) expect(msg).toMatch(/busy|running|training|await/i);
  });
});
