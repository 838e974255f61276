// Stage progress for a terminal: a bar with ETA per stage when the output is a TTY, and one line
// per finished stage otherwise (logs and CI keep a readable record without control characters).
import cliProgress from 'cli-progress';
import { formatInterval } from '../report/columns.js';
import type { RunHooks, StageName } from '../sppo/run.js';

export type Output = NodeJS.WritableStream & { isTTY?: boolean };

export class Progress {
  readonly tty: boolean;
  #out: Output;
  #bar: cliProgress.SingleBar | undefined;

  constructor(out: Output, tty = out.isTTY === true) {
    this.#out = out;
    this.tty = tty;
  }

  start(label: string): void {
    this.#stopBar();
    if (!this.tty) return;
    this.#bar = new cliProgress.SingleBar(
      {
        stream: this.#out,
        format: '{label} [{bar}] {percentage}% | ETA {eta_formatted} | {value}/{total}',
        hideCursor: true,
        clearOnComplete: true,
        // Token-level updates arrive in bursts; a longer window keeps the ETA from jumping.
        etaBuffer: 200,
      },
      cliProgress.Presets.shades_classic,
    );
    this.#bar.start(1, 0, { label });
  }

  update(done: number, total: number): void {
    if (!this.#bar) return;
    if (total !== this.#bar.getTotal()) this.#bar.setTotal(total);
    this.#bar.update(done);
  }

  finish(label: string, seconds: number): void {
    this.#stopBar();
    this.log(`${label}: done in ${seconds.toFixed(1)} s`);
  }

  skip(label: string): void {
    this.#stopBar();
    this.log(`${label}: already in the run directory, skipped`);
  }

  log(line: string): void {
    this.#out.write(`${line}\n`);
  }

  /** Clears a running bar (before an error or interruption message). */
  stop(): void {
    this.#stopBar();
  }

  #stopBar(): void {
    this.#bar?.stop();
    this.#bar = undefined;
  }
}

const STAGE_LABELS: Record<StageName, string> = {
  base: 'base policy π_0',
  'base-eval': 'evaluate π_0',
  generate: 'generate',
  judge: 'judge',
  dataset: 'training set',
  train: 'train',
  evaluate: 'evaluate',
};

export function stageLabel(iteration: number, stage: StageName): string {
  return iteration === 0 ? STAGE_LABELS[stage] : `iteration ${iteration} ${STAGE_LABELS[stage]}`;
}

/** The scheduler's hooks, drawn on `progress`. */
export function runProgressHooks(progress: Progress): Required<Pick<RunHooks, 'onStage' | 'onProgress' | 'onMetrics' | 'onJudged'>> {
  return {
    onStage: ({ iteration, stage, status, seconds }) => {
      const label = stageLabel(iteration, stage);
      if (status === 'start') progress.start(label);
      else if (status === 'skipped') progress.skip(label);
      else progress.finish(label, seconds ?? 0);
    },
    onProgress: ({ done, total }) => progress.update(done, total),
    onJudged: ({ iteration, total, unusable }) =>
      progress.log(`${stageLabel(iteration, 'judge')}: ${unusable} of ${total} verdicts unusable${unusable > 0 ? ' (scored ½)' : ''}`),
    onMetrics: (row) => {
      const previous = row.winRateVsPrevious ? `, vs previous ${formatInterval(row.winRateVsPrevious)}` : '';
      progress.log(`iteration ${row.iteration}: win rate vs base ${formatInterval(row.winRateVsBase)}${previous}`);
    },
  };
}
