// The run directory, and the only code that knows its layout:
//
//   run.json                 the resolved config and its hash; a resumed run must match it
//   run.log                  a line per start
//   metrics.jsonl            one IterationMetrics row per evaluated policy, π_0 first
//   base/base.json           π_0's stage files ({value, seconds}), and its checkpoint
//   base/eval.json
//   base/policy/
//   iter-t/generations.json  iteration t's stage files, and π_t's checkpoint
//   iter-t/judgments.json
//   iter-t/dataset.json
//   iter-t/train.json
//   iter-t/eval.json
//   iter-t/policy/
//   judge-cache/             an http judge's answers
//   report.html  curves.svg  curves.png
//
// Every file is written whole under a temporary name and renamed into place, and a checkpoint
// directory is committed by one rename, so whatever exists is complete and a killed run resumes
// from the files it finds.
import { existsSync } from 'node:fs';
import { appendFile, mkdir, readdir, readFile, rename, rm } from 'node:fs/promises';
import path from 'node:path';
import { configHash, diffConfigs } from '../config/load.js';
import type { RunConfig } from '../config/schema.js';
import { isTemporaryOf, syncDirectory, temporaryPath, writeFileAtomic, writeJsonAtomic } from '../util/atomic-write.js';
import type { IterationMetrics } from './run.js';

export type StageName = 'base' | 'base-eval' | 'generate' | 'judge' | 'dataset' | 'train' | 'evaluate';

/** π_0's stages; every other stage belongs to an iteration t ≥ 1. */
const BASE_STAGES: readonly StageName[] = ['base', 'base-eval'];
const STAGE_FILES: Record<StageName, string> = {
  base: 'base.json',
  'base-eval': 'eval.json',
  generate: 'generations.json',
  judge: 'judgments.json',
  dataset: 'dataset.json',
  train: 'train.json',
  evaluate: 'eval.json',
};
const ITERATION_DIR = /^iter-([1-9]\d*)$/;

/** What a stage file holds: the stage's output and how long it took. */
export interface StageOutput<T> {
  value: T;
  seconds: number;
}

/** run.json */
export interface RunRecord {
  hash: string;
  config: RunConfig;
}

/** A file of the run directory that is missing or malformed; the message names it. */
export class RunDirError extends Error {
  override name = 'RunDirError';

  constructor(
    /** the file (or directory) at fault */
    readonly path: string,
    message: string,
  ) {
    super(message);
  }
}

/** A metrics.jsonl row: at least the fields every iteration's metrics have. */
function isMetricsRow(v: unknown): v is IterationMetrics {
  const row = v as Partial<IterationMetrics> | null | undefined;
  return typeof row?.iteration === 'number' && typeof row.winRateVsBase?.mean === 'number' && typeof row.meanResponseLength === 'number';
}

/** The parsed JSON of `file`, or a RunDirError naming it. */
async function readRunFile(file: string): Promise<unknown> {
  try {
    return JSON.parse(await readFile(file, 'utf8'));
  } catch (e) {
    throw new RunDirError(file, `${file}: ${e instanceof SyntaxError ? 'not valid JSON' : 'cannot be read'} (${(e as Error).message})`);
  }
}

const isObject = (v: unknown): v is Record<string, unknown> => typeof v === 'object' && v !== null && !Array.isArray(v);

export class RunDir {
  readonly root: string;
  #open = false;

  private constructor(dir: string) {
    this.root = path.resolve(dir);
  }

  /** The run directory at `dir`, for reading (a report, `sppo generate`): creates and holds nothing. */
  static at(dir: string): RunDir {
    return new RunDir(dir);
  }

  /**
   * Opens `dir` for the run of `config`, the one writer of the directory until close(): creates
   * it, records run.json on the first open, and refuses a directory holding a run of another
   * configuration, naming the fields that differ.
   */
  static async open(dir: string, config: RunConfig): Promise<RunDir> {
    const run = new RunDir(dir);
    await mkdir(run.root, { recursive: true });
    await run.#checkConfig(config);
    run.#open = true;
    return run;
  }

  close(): Promise<void> {
    this.#open = false;
    return Promise.resolve();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  #requireOpen(): void {
    if (!this.#open) throw new Error(`${this.root}: the run directory is not open for writing (RunDir.open)`);
  }

  get runFile(): string {
    return path.join(this.root, 'run.json');
  }

  get logFile(): string {
    return path.join(this.root, 'run.log');
  }

  get metricsFile(): string {
    return path.join(this.root, 'metrics.jsonl');
  }

  /** Where an http judge caches its answers unless the config names another place. */
  get judgeCache(): string {
    return path.join(this.root, 'judge-cache');
  }

  get reportFiles(): { html: string; svg: string; png: string } {
    return { html: path.join(this.root, 'report.html'), svg: path.join(this.root, 'curves.svg'), png: path.join(this.root, 'curves.png') };
  }

  /** π_t's files: base/ for π_0, iter-t/ for the policy iteration t trains. */
  #iterationDir(t: number): string {
    if (!Number.isSafeInteger(t) || t < 0) throw new RangeError(`iteration must be an integer ≥ 0, got ${t}`);
    return path.join(this.root, t === 0 ? 'base' : `iter-${t}`);
  }

  /** π_t's checkpoint: a Hugging Face model directory. */
  policy(t: number): string {
    return path.join(this.#iterationDir(t), 'policy');
  }

  stageFile(t: number, stage: StageName): string {
    if (BASE_STAGES.includes(stage) !== (t === 0))
      throw new RangeError(
        t === 0 ? `stage '${stage}' belongs to an iteration t ≥ 1` : `stage '${stage}' belongs to π_0 (iteration 0), not iteration ${t}`,
      );
    return path.join(this.#iterationDir(t), STAGE_FILES[stage]);
  }

  /** The stage's output if it finished, else undefined. */
  async readStage<T>(t: number, stage: StageName): Promise<StageOutput<T> | undefined> {
    const file = this.stageFile(t, stage);
    if (!existsSync(file)) return undefined;
    const saved = await readRunFile(file);
    if (!isObject(saved) || !('value' in saved) || typeof saved.seconds !== 'number')
      throw new RunDirError(file, `${file}: not a stage file (needs value and seconds); delete it to rerun the stage`);
    return saved as unknown as StageOutput<T>;
  }

  async writeStage<T>(t: number, stage: StageName, output: StageOutput<T>): Promise<void> {
    this.#requireOpen();
    await writeJsonAtomic(this.stageFile(t, stage), output, { createParents: true });
  }

  /** Whether π_t is complete: its checkpoint committed and the stage that made it recorded as done. */
  hasPolicy(t: number): boolean {
    // A run killed between the two retrains π_t (see runSppo), so the checkpoint alone is not π_t.
    return existsSync(this.policy(t)) && existsSync(this.stageFile(t, t === 0 ? 'base' : 'train'));
  }

  /** The newest complete policy's t, or undefined if even π_0 is not complete. */
  async newestPolicy(): Promise<number | undefined> {
    const names = existsSync(this.root) ? await readdir(this.root) : [];
    const iterations = names
      .flatMap((n) => ITERATION_DIR.exec(n)?.[1] ?? [])
      .map(Number)
      .sort((a, b) => b - a);
    return [...iterations, 0].find((t) => this.hasPolicy(t));
  }

  /**
   * Saves π_t: `write` fills a new directory (a whole checkpoint), which then replaces policy(t)
   * in one rename, so a reader or a resumed run never sees a partial checkpoint.
   */
  async savePolicy(t: number, write: (dir: string) => Promise<unknown>): Promise<void> {
    this.#requireOpen();
    const target = this.policy(t);
    await mkdir(path.dirname(target), { recursive: true });
    await this.#removeTemporaries(target);
    const tmp = temporaryPath(target);
    try {
      await write(tmp);
    } catch (e) {
      await rm(tmp, { recursive: true, force: true });
      throw e;
    }
    await this.#commit(tmp, target);
  }

  /** Clears the temporary copies of `target` that killed saves left (each a full-size checkpoint). */
  async #removeTemporaries(target: string): Promise<void> {
    const parent = path.dirname(target);
    for (const name of await readdir(parent))
      if (isTemporaryOf(name, path.basename(target))) await rm(path.join(parent, name), { recursive: true, force: true });
  }

  /** Moves a fully written checkpoint directory into place, replacing the previous one. */
  async #commit(tmp: string, target: string): Promise<void> {
    await rm(target, { recursive: true, force: true });
    await rename(tmp, target);
    await syncDirectory(path.dirname(target));
  }

  /** The rows of metrics.jsonl, π_0 first. */
  async readMetrics(): Promise<IterationMetrics[]> {
    const file = this.metricsFile;
    if (!existsSync(file))
      throw new RunDirError(file, `${this.root} has no metrics.jsonl (not a run directory, or the run has not evaluated π_0 yet)`);
    const rows = await this.#metricsRows();
    if (rows.length === 0) throw new RunDirError(file, `${file} is empty`);
    return rows;
  }

  async #metricsRows(): Promise<IterationMetrics[]> {
    const file = this.metricsFile;
    return (await readFile(file, 'utf8')).split('\n').flatMap((line, i) => {
      if (line.trim() === '') return [];
      let row: unknown;
      try {
        row = JSON.parse(line);
      } catch (err) {
        throw new RunDirError(file, `${file}: line ${i + 1} is not valid JSON (${(err as Error).message})`);
      }
      if (!isMetricsRow(row))
        throw new RunDirError(
          file,
          `${file}: line ${i + 1} is not an iteration's metrics (needs iteration, winRateVsBase, meanResponseLength)`,
        );
      return [{ ...row, seconds: row.seconds ?? {} }];
    });
  }

  /**
   * Appends an iteration's row to metrics.jsonl, replacing the rows of that iteration and later
   * ones: a resumed run records its iterations again and never duplicates a row.
   */
  async appendMetrics(row: IterationMetrics): Promise<void> {
    this.#requireOpen();
    const earlier =
      row.iteration > 0 && existsSync(this.metricsFile) ? (await this.#metricsRows()).filter((r) => r.iteration < row.iteration) : [];
    await writeFileAtomic(this.metricsFile, [...earlier, row].map((r) => JSON.stringify(r) + '\n').join(''));
  }

  /** run.json, or undefined if the directory has none. */
  async readRun(): Promise<RunRecord | undefined> {
    const file = this.runFile;
    if (!existsSync(file)) return undefined;
    const saved = await readRunFile(file);
    if (!isObject(saved) || typeof saved.hash !== 'string' || !isObject(saved.config))
      throw new RunDirError(file, `${file}: not a run record (needs hash and config)`);
    return saved as unknown as RunRecord;
  }

  async #checkConfig(config: RunConfig): Promise<void> {
    const hash = configHash(config);
    const saved = await this.readRun();
    if (saved) {
      if (saved.hash === hash) return;
      const changes = diffConfigs(saved.config, config).filter((c) => c.path !== 'run.dir');
      if (changes.length > 0) {
        const list = changes
          .slice(0, 10)
          .map((c) => `${c.path}: ${JSON.stringify(c.before)} → ${JSON.stringify(c.after)}`)
          .join('; ');
        throw new Error(`${this.root} holds a run with a different configuration (${list}); use a new run.dir or restore the config`);
      }
      return;
    }
    await writeJsonAtomic(this.runFile, { hash, config } satisfies RunRecord);
    await appendFile(this.logFile, `${new Date().toISOString()} started, config ${hash}\n`);
  }
}
