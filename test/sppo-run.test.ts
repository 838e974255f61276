// The SPPO run end to end on the embedded task: learning is real (held-out win rate against
// π_0 above ½ by more than its confidence interval, duality gap down), and a run killed in any
// stage resumes to exactly the results of an uninterrupted run.
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';

import { parseConfig } from '../lib/config/load.js';
import { demoConfigInput, demoSetup, runDemo } from '../lib/demo/demo.js';
import { runSppo, type StageName } from '../lib/sppo/run.js';
import { RunDir } from '../lib/sppo/run-dir.js';

const root = mkdtempSync(path.join(tmpdir(), 'sppo-run-'));
afterAll(() => rmSync(root, { recursive: true, force: true }));

describe('the embedded SPPO demo', () => {
  it('beats the base policy on held-out prompts and closes the duality gap', async () => {
    const dir = path.join(root, 'demo');
    const { metrics } = await runDemo({ dir, quick: true, iterations: 2 });
    expect(metrics.map((m) => m.iteration)).toEqual([0, 1, 2]);
    const last = metrics[metrics.length - 1];
    // Win rate against π_0 above ½ by more than its 95% interval's half-width.
    expect(last.winRateVsBase.low).toBeGreaterThan(0.5);
    const gap = (i: number) => (metrics[i].task as { dualityGap: number }).dualityGap;
    expect(gap(2)).toBeLessThan(gap(0));
    // Every stage's output is in the run directory.
    const rows = readFileSync(path.join(dir, 'metrics.jsonl'), 'utf8').trim().split('\n');
    expect(rows).toHaveLength(3);
    // every checkpoint brings the character tokenizer, as tokenizer.json
    for (const t of [0, 1, 2]) expect(existsSync(path.join(RunDir.at(dir).policy(t), 'tokenizer.json')), `π_${t}`).toBe(true);
    console.log(
      metrics
        .map(
          (m) =>
            `iter ${m.iteration}: win ${m.winRateVsBase.mean.toFixed(3)} [${m.winRateVsBase.low.toFixed(3)}, ${m.winRateVsBase.high.toFixed(3)}] gap ${gap(m.iteration).toFixed(3)}`,
        )
        .join('\n'),
    );
  }, 300_000);
});

describe('resume', () => {
  // A small run: a few prompts, short supervised training, one iteration.
  const input = (dir: string) => {
    const c = demoConfigInput({ dir, quick: true, iterations: 1 });
    return { ...c, data: { ...c.data, words: 120, evalSize: 40 }, sft: { ...c.sft, steps: 40 } };
  };
  const metricsOf = (dir: string) =>
    readFileSync(path.join(dir, 'metrics.jsonl'), 'utf8')
      .trim()
      .split('\n')
      .map((l) => {
        const m = JSON.parse(l);
        delete m.seconds;
        return m;
      });

  /** Starts the run in `dir` and aborts it once the victim stage has started: it is killed mid-way. */
  const killedIn = async (dir: string, victim: StageName) => {
    const first = demoSetup(parseConfig(input(dir)));
    const ac = new AbortController();
    await expect(
      runSppo(first.setup, {
        signal: ac.signal,
        onStage: (e) => {
          if (e.stage === victim && e.status === 'start') queueMicrotask(() => ac.abort(new Error(`killed in ${victim}`)));
        },
      }),
    ).rejects.toThrow();
    await first.setup.model.dispose();
  };

  it('a run killed in each stage and restarted ends as an uninterrupted one', async () => {
    const reference = path.join(root, 'whole');
    const whole = demoSetup(parseConfig(input(reference)));
    await runSppo(whole.setup);
    await whole.setup.model.dispose();
    const expected = metricsOf(reference);

    const stages: StageName[] = ['base', 'base-eval', 'generate', 'judge', 'dataset', 'train', 'evaluate'];
    for (const victim of stages) {
      const dir = path.join(root, `killed-${victim}`);
      await killedIn(dir, victim);
      const second = demoSetup(parseConfig(input(dir)));
      await runSppo(second.setup);
      await second.setup.model.dispose();
      expect(metricsOf(dir), `killed in ${victim}`).toEqual(expected);
    }
  }, 600_000);

  it('an iteration with fewer micro-batches than gradAccumSteps still takes an optimizer step', async () => {
    const dir = path.join(root, 'accumulate');
    const c = input(dir);
    const { setup } = demoSetup(parseConfig({ ...c, training: { ...c.training, gradAccumSteps: 10_000 } }));
    await runSppo(setup);
    await setup.model.dispose();
    const train = JSON.parse(readFileSync(path.join(dir, 'iter-1', 'train.json'), 'utf8'));
    expect(train.value.steps.length).toBe(1);
    expect(train.value.steps[0].gradNorm).toBeGreaterThan(0);
  });

  it('a run stopped before training resumes with a changed training field, doing only the stages still to do', async () => {
    const dir = path.join(root, 'retrain');
    await killedIn(dir, 'train');
    const c = input(dir);
    const second = demoSetup(parseConfig({ ...c, training: { ...c.training, eta: 3 } }));
    const stages: string[] = [];
    const notices: string[] = [];
    await runSppo(second.setup, {
      onStage: (e) => stages.push(`${e.iteration} ${e.stage} ${e.status}`),
      onNotice: (m) => notices.push(m),
    });
    await second.setup.model.dispose();
    expect(notices).toEqual([expect.stringMatching(/^changed since the run started: training\.eta: 5 → 3; .* train \(iteration 1\)$/)]);
    expect(stages.filter((s) => !s.endsWith('start'))).toEqual([
      '0 base skipped',
      '0 base-eval skipped',
      '1 generate skipped',
      '1 judge skipped',
      '1 dataset skipped',
      '1 train done',
      '1 evaluate done',
    ]);
    const record = JSON.parse(readFileSync(path.join(dir, 'run.json'), 'utf8')) as { config: { training: { eta: number } } };
    expect(record.config.training.eta).toBe(3);
  });

  it('refuses to resume with a changed configuration, naming what changed', async () => {
    const dir = path.join(root, 'whole');
    const c = input(dir);
    const changed = demoSetup(parseConfig({ ...c, training: { ...c.training, eta: 3 } }));
    await expect(runSppo(changed.setup)).rejects.toThrow(`training.eta: ${c.training!.eta} → 3 (used by the finished stage iter-1 train)`);
    await changed.setup.model.dispose();
  });
});
