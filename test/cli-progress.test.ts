// Stage progress: one plain line per finished stage when the output is not a terminal (logs, CI),
// and a bar with ETA on a terminal; both from the scheduler's hooks.
import { Writable } from 'node:stream';
import { describe, expect, it } from 'vitest';
import { Progress, runProgressHooks } from '../lib/cli/progress.js';
import type { IterationMetrics } from '../lib/sppo/run.js';

function sink(isTTY: boolean): Writable & { text: string; isTTY: boolean; columns: number } {
  const w = new Writable({
    write(chunk: Buffer, _enc, done) {
      w.text += chunk.toString();
      done();
    },
  }) as Writable & { text: string; isTTY: boolean; columns: number };
  w.text = '';
  w.isTTY = isTTY;
  w.columns = 120;
  return w;
}

const row: IterationMetrics = {
  iteration: 1,
  winRateVsBase: { mean: 0.6, low: 0.55, high: 0.65, n: 100 },
  winRateVsPrevious: { mean: 0.52, low: 0.5, high: 0.54, n: 100 },
  meanResponseLength: 7,
  seconds: {},
};

/** What the scheduler reports for π_0 (resumed) and one iteration. */
function simulateRun(hooks: ReturnType<typeof runProgressHooks>): void {
  hooks.onStage({ iteration: 0, stage: 'base', status: 'skipped' });
  hooks.onStage({ iteration: 0, stage: 'base-eval', status: 'skipped' });
  hooks.onStage({ iteration: 1, stage: 'generate', status: 'start' });
  for (let done = 1; done <= 50; done++) hooks.onProgress({ iteration: 1, stage: 'generate', done, total: 100 });
  hooks.onStage({ iteration: 1, stage: 'generate', status: 'done', seconds: 2.345 });
  hooks.onStage({ iteration: 1, stage: 'train', status: 'start' });
  hooks.onProgress({ iteration: 1, stage: 'train', done: 3, total: 8 });
  hooks.onStage({ iteration: 1, stage: 'train', status: 'done', seconds: 10 });
  hooks.onMetrics(row);
}

describe('progress', () => {
  it('prints one line per stage, and one per evaluated iteration, when not a TTY', () => {
    const out = sink(false);
    const progress = new Progress(out);
    expect(progress.tty).toBe(false);
    simulateRun(runProgressHooks(progress));
    progress.stop();
    expect(out.text.split('\n')).toEqual([
      'base policy π_0: already in the run directory, skipped',
      'evaluate π_0: already in the run directory, skipped',
      'iteration 1 generate: done in 2.3 s',
      'iteration 1 train: done in 10.0 s',
      'iteration 1: win rate vs base 0.600 ± 0.050, vs previous 0.520 ± 0.020',
      '',
    ]);
  });

  it('draws a bar with ETA on a TTY and leaves the same record of finished stages', () => {
    const out = sink(true);
    const progress = new Progress(out);
    const hooks = runProgressHooks(progress);
    hooks.onStage({ iteration: 1, stage: 'generate', status: 'start' });
    hooks.onProgress({ iteration: 1, stage: 'generate', done: 25, total: 100 });
    // cli-progress redraws on a timer; stopping draws the final state synchronously.
    progress.stop();
    expect(out.text).toMatch(/iteration 1 generate \[.*\] 25% \| ETA \S+ \| 25\/100/);
    hooks.onStage({ iteration: 1, stage: 'generate', status: 'done', seconds: 1 });
    expect(out.text).toContain('iteration 1 generate: done in 1.0 s\n');
  });
});
