// The run directory, and the only code that knows its layout:
//
//   run.lock                 the running process's pid and host: one writer at a time (RunDir.open)
//   run.json                 the resolved config, its hash, each stage's config hash and the input
//                            files' fingerprints: what a resumed run is checked against
//   run.log                  a line when the run started, per accepted config change, per lock taken over
//   metrics.jsonl            one IterationMetrics row per evaluated policy, π_0 first
//   base/base.json           π_0's stage files ({value, seconds}), and its checkpoint
//   base/eval.json
//   base/policy/
//   base/frozen/             a LoRA run's frozen base weights, written once, where no model
//                            directory holds them (the demo's seeded base): the adapters' base
//   iter-t/generations.json  iteration t's stage files, and π_t's checkpoint
//   iter-t/judgments.json
//   iter-t/dataset.json
//   iter-t/train.json
//   iter-t/eval.json
//   iter-t/policy/
//   judge-cache/             an http judge's answers
//   report.html  curves.svg  curves.png
//
// Every file is written whole under a temporary name (`<name>.tmp-<pid>-<random>`) and renamed
// into place, and a checkpoint directory replaces the previous one by renames that never leave
// the policy missing, so whatever exists is complete and a killed run resumes from the files it
// finds. A process removes only its own temporaries; those of dead processes go when the
// directory is next opened.
import { existsSync } from 'node:fs';
import { appendFile, mkdir, readdir, readFile, rename, rm } from 'node:fs/promises';
import path from 'node:path';
import { z } from 'zod';
import { canonicalJson, configHash } from '../config/load.js';
import type { RunConfig } from '../config/schema.js';
import { isTemporaryOf, syncDirectory, temporaryOwner, temporaryPath, writeFileAtomic, writeJsonAtomic } from '../util/atomic-write.js';
import { acquireLock, isProcessAlive, LockedError, type Lock } from '../util/lock.js';
import type { IterationMetrics } from './run.js';
import { fingerprintInputs, inputFiles, type InputFingerprints } from './inputs.js';
import { changesSince, resumeDecision, stageHashes, type StageRef } from './resume.js';
import {
  BASE_STAGES,
  ITERATION_STAGES,
  describeIssues,
  STAGE_VALUE_SCHEMAS,
  type StageName,
  type StageOutput,
  type StageValues,
} from './stage-files.js';

export type { StageName, StageOutput, StageValues } from './stage-files.js';

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

/** Where a checkpoint being replaced waits until its successor is in place. */
const asidePath = (target: string) => `${target}.aside`;

/** run.json */
export interface RunRecord {
  hash: string;
  config: RunConfig;
  /** the input files' fingerprints (lib/sppo/inputs.ts); absent in a run recorded before there were any */
  inputs?: InputFingerprints;
  /** per stage, a hash of the config fields and input files that determine it (lib/sppo/resume.ts) */
  stages?: Partial<Record<StageName, string>>;
}

const runRecordSchema = z.looseObject({
  hash: z.string(),
  config: z.record(z.string(), z.unknown()),
  inputs: z.record(z.string(), z.string()).optional(),
  stages: z.record(z.string(), z.string()).optional(),
});

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

/**
 * The parsed JSON of `file`, or a RunDirError naming it and saying what it should hold
 * (`expected`) and what to do about it (`remedy`).
 */
async function readRunFile(file: string, expected: string, remedy: string): Promise<unknown> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (e) {
    throw new RunDirError(file, `${file}: cannot be read (${(e as Error).message}); expected ${expected}`);
  }
  if (text.trim() === '') throw new RunDirError(file, `${file}: empty; expected ${expected}; ${remedy}`);
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new RunDirError(file, `${file}: not valid JSON (${(e as Error).message}); expected ${expected}; ${remedy}`);
  }
}

/** Removes the temporaries of dead processes in `dir` and, `depth` levels down, its subdirectories. */
async function removeDeadTemporaries(dir: string, depth: number): Promise<void> {
  for (const entry of await readdir(dir, { withFileTypes: true })) {
    const file = path.join(dir, entry.name);
    const owner = temporaryOwner(entry.name);
    if (owner !== undefined) {
      if (!isProcessAlive(owner)) await rm(file, { recursive: true, force: true });
    } else if (depth > 0 && entry.isDirectory()) await removeDeadTemporaries(file, depth - 1);
  }
}

const isObject = (v: unknown): v is Record<string, unknown> => typeof v === 'object' && v !== null && !Array.isArray(v);

export interface OpenOptions {
  /** told what a resume with a changed config or input will do differently (also written to run.log) */
  onNotice?: (message: string) => void;
}

export class RunDir {
  readonly root: string;
  #lock: Lock | undefined;

  private constructor(dir: string) {
    this.root = path.resolve(dir);
  }

  /** The run directory at `dir`, for reading (a report, `sppo generate`): creates and holds nothing. */
  static at(dir: string): RunDir {
    return new RunDir(dir);
  }

  /**
   * Opens `dir` for the run of `config`, the one writer of the directory until close(): creates
   * it, takes its lock (refusing a directory another live process holds, naming it), finishes a
   * checkpoint replacement a killed process left half-done, removes dead processes' temporaries,
   * records run.json on the first open, and refuses a directory holding a run of another
   * configuration, naming the fields that differ.
   */
  static async open(dir: string, config: RunConfig, options: OpenOptions = {}): Promise<RunDir> {
    const run = new RunDir(dir);
    await mkdir(run.root, { recursive: true });
    run.#lock = await run.#acquireLock();
    try {
      await run.#recover();
      await run.#checkConfig(config, options.onNotice);
    } catch (e) {
      await run.close();
      throw e;
    }
    return run;
  }

  /** Releases the directory (its lock); the object can still read it. */
  async close(): Promise<void> {
    const lock = this.#lock;
    this.#lock = undefined;
    await lock?.release();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  #requireOpen(): void {
    if (!this.#lock) throw new Error(`${this.root}: the run directory is not open for writing (RunDir.open)`);
  }

  /** Held by the process that has the directory open: its pid, host and start. */
  get lockFile(): string {
    return path.join(this.root, 'run.lock');
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

  /**
   * The stage's output if it finished, else undefined; a file that is not the stage's output
   * (empty, not JSON, of the wrong shape) is a RunDirError naming it and the field at fault.
   */
  async readStage<S extends StageName>(t: number, stage: S): Promise<StageOutput<StageValues[S]> | undefined> {
    const file = this.stageFile(t, stage);
    if (!existsSync(file)) return undefined;
    const expected = `the ${stage} stage's output, JSON {value, seconds}`;
    const remedy = 'delete it to rerun the stage';
    const saved = await readRunFile(file, expected, remedy);
    if (!isObject(saved) || !('value' in saved) || typeof saved.seconds !== 'number')
      throw new RunDirError(file, `${file}: not a stage file (needs value and seconds); expected ${expected}; ${remedy}`);
    const value = STAGE_VALUE_SCHEMAS[stage].safeParse(saved.value);
    if (!value.success)
      throw new RunDirError(file, `${file}: not the ${stage} stage's output: ${describeIssues(value.error, ['value'])}; ${remedy}`);
    return { value: value.data, seconds: saved.seconds };
  }

  async writeStage<S extends StageName>(t: number, stage: S, output: StageOutput<StageValues[S]>): Promise<void> {
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
    return (await this.#iterations()).find((t) => this.hasPolicy(t));
  }

  /** The t of every iteration directory, newest first, then 0 (π_0's). */
  async #iterations(): Promise<number[]> {
    const names = existsSync(this.root) ? await readdir(this.root) : [];
    const iterations = names
      .flatMap((n) => ITERATION_DIR.exec(n)?.[1] ?? [])
      .map(Number)
      .sort((a, b) => b - a);
    return [...iterations, 0];
  }

  /** A LoRA run's frozen base, where no model directory holds it: a Hugging Face model directory. */
  get frozenBase(): string {
    return path.join(this.#iterationDir(0), 'frozen');
  }

  /**
   * Saves π_t: `write` fills a new directory (a whole checkpoint), which then replaces policy(t)
   * by renames (see #commit), so a reader or a resumed run never sees a partial checkpoint.
   */
  async savePolicy(t: number, write: (dir: string) => Promise<unknown>): Promise<void> {
    await this.#saveDirectory(this.policy(t), write);
  }

  /** Saves the frozen base as savePolicy saves a policy. */
  async saveFrozenBase(write: (dir: string) => Promise<unknown>): Promise<void> {
    await this.#saveDirectory(this.frozenBase, write);
  }

  async #saveDirectory(target: string, write: (dir: string) => Promise<unknown>): Promise<void> {
    this.#requireOpen();
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

  /**
   * Clears this process's temporary copies of `target` that failed saves left (each a full-size
   * checkpoint); another process's are its own (and a dead one's go at open: #recover).
   */
  async #removeTemporaries(target: string): Promise<void> {
    const parent = path.dirname(target);
    for (const name of await readdir(parent))
      if (isTemporaryOf(name, path.basename(target), process.pid)) await rm(path.join(parent, name), { recursive: true, force: true });
  }

  /**
   * Moves a fully written checkpoint directory into place, replacing the previous one so that a
   * complete policy exists at every moment: the old one is renamed aside, the new one renamed
   * in, then the old one deleted. A process killed between the renames leaves the old one aside
   * and no policy: #recover renames it back.
   */
  async #commit(tmp: string, target: string): Promise<void> {
    const aside = asidePath(target);
    await this.#recoverAside(target);
    const replacing = existsSync(target);
    if (replacing) await rename(target, aside);
    try {
      await rename(tmp, target);
    } catch (e) {
      if (replacing) await rename(aside, target);
      throw e;
    }
    await syncDirectory(path.dirname(target));
    if (replacing) await rm(aside, { recursive: true, force: true });
  }

  /** A checkpoint left aside by a killed commit: back into place if none replaced it, else deleted. */
  async #recoverAside(target: string): Promise<void> {
    const aside = asidePath(target);
    if (!existsSync(aside)) return;
    if (existsSync(target)) await rm(aside, { recursive: true, force: true });
    else await rename(aside, target);
  }

  /** The lock, or a RunDirError naming the process that holds it. */
  async #acquireLock(): Promise<Lock> {
    const file = this.lockFile;
    try {
      const lock = await acquireLock(file);
      const gone = lock.tookOver;
      if (gone)
        await appendFile(
          this.logFile,
          `${new Date().toISOString()} took over the lock of process ${gone.pid} on ${gone.host}, which is gone\n`,
        );
      return lock;
    } catch (e) {
      if (!(e instanceof LockedError)) throw new RunDirError(file, `cannot take the lock of ${this.root}: ${(e as Error).message}`);
      const h = e.holder;
      throw new RunDirError(
        file,
        `${this.root} is in use by process ${h.pid} on ${h.host} (since ${h.since}): one run at a time writes a run directory; ` +
          `wait for it or stop it (if no process ${h.pid} runs on ${h.host}, delete ${file})`,
      );
    }
  }

  /**
   * Undoes what killed processes left: a checkpoint replacement stopped between its renames, and
   * temporaries (`*.tmp-<pid>-*`) of processes that no longer run on this host. (A temporary of
   * a live process, such as a concurrent `sppo eval` rewriting the report, is left alone.)
   */
  async #recover(): Promise<void> {
    for (const t of await this.#iterations()) if (existsSync(this.#iterationDir(t))) await this.#recoverAside(this.policy(t));
    await removeDeadTemporaries(this.root, 2);
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
    const remedy = 'restore it, or use a new run.dir';
    const saved = await readRunFile(file, 'the run record, JSON {hash, config} written when the run started', remedy);
    const record = runRecordSchema.safeParse(saved);
    if (!record.success)
      throw new RunDirError(file, `${file}: not a run record (needs hash and config): ${describeIssues(record.error)}; ${remedy}`);
    // the config was resolved when it was recorded; it is compared field by field, never run
    return record.data as unknown as RunRecord;
  }

  /**
   * Records run.json on the first open. On a resume, compares the config and the input files
   * with the record: a change that a finished stage used is refused, naming the field (or file)
   * and the stage; a change only the stages still to do use is accepted, logged and told to
   * `onNotice`, and the record updated.
   */
  async #checkConfig(config: RunConfig, onNotice?: (message: string) => void): Promise<void> {
    const files = await inputFiles(config);
    const inputs = await fingerprintInputs(files);
    const record: RunRecord = { hash: configHash(config), config, inputs, stages: stageHashes(config, inputs, files) };
    const saved = await this.readRun();
    if (!saved) {
      await writeJsonAtomic(this.runFile, record);
      await appendFile(this.logFile, `${new Date().toISOString()} started, config ${record.hash}\n`);
      return;
    }
    const changes = changesSince(saved, config, inputs, files);
    if (changes.length > 0) {
      const decision = resumeDecision(changes, await this.#finishedStages(), config.run.iterations);
      if (decision.refused) throw new Error(`${this.root} ${decision.message}`);
      await appendFile(this.logFile, `${new Date().toISOString()} ${decision.message}\n`);
      onNotice?.(decision.message);
    }
    // also brings a record of an older version up to date (input fingerprints, stage hashes)
    if (canonicalJson(saved) !== canonicalJson(record)) await writeJsonAtomic(this.runFile, record);
  }

  /** Every stage whose file exists, in the order a run does them. */
  async #finishedStages(): Promise<StageRef[]> {
    const iterations = (await this.#iterations()).reverse();
    return iterations.flatMap((t) =>
      (t === 0 ? BASE_STAGES : ITERATION_STAGES).filter((stage) => existsSync(this.stageFile(t, stage))).map((stage) => ({ t, stage })),
    );
  }
}
