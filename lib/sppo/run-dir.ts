// The run directory: every stage's output is written whole under a temporary name and renamed
// into place, so a file that exists is complete, and a killed run resumes from the files it finds.
import { existsSync } from 'node:fs';
import { appendFile, readdir, readFile, rename, rm } from 'node:fs/promises';
import path from 'node:path';
import { configHash, diffConfigs } from '../config/load.js';
import type { RunConfig } from '../config/schema.js';
import type { Model } from '../engine/model.js';
import { savePretrained } from '../io/checkpoint.js';
import { isTemporaryOf, syncDirectory, temporaryPath, writeJsonAtomic } from '../util/atomic-write.js';

export const BASE = 'base';
export const iterDir = (dir: string, t: number) => path.join(dir, `iter-${t}`);
export const policyDir = (dir: string, t: number) => (t === 0 ? path.join(dir, BASE, 'policy') : path.join(iterDir(dir, t), 'policy'));
export const evalFile = (dir: string, t: number) => (t === 0 ? path.join(dir, BASE, 'eval.json') : path.join(iterDir(dir, t), 'eval.json'));

export async function readJson<T>(file: string): Promise<T> {
  return JSON.parse(await readFile(file, 'utf8')) as T;
}

/** Moves a fully written directory into place (replacing a stale partial one). */
export async function commitDirectory(tmp: string, final: string): Promise<void> {
  await rm(final, { recursive: true, force: true });
  await rename(tmp, final);
  await syncDirectory(path.dirname(final));
}

export async function saveCheckpoint(model: Model, dir: string, sourceDir: string | undefined): Promise<void> {
  // A killed save leaves a full-size temporary copy (of another pid): clear them all.
  const parent = path.dirname(dir);
  for (const name of existsSync(parent) ? await readdir(parent) : [])
    if (isTemporaryOf(name, path.basename(dir))) await rm(path.join(parent, name), { recursive: true, force: true });
  const tmp = temporaryPath(dir);
  await savePretrained(model, tmp, { sourceDir });
  await commitDirectory(tmp, dir);
}

/** Refuses to resume a run whose configuration changed, naming the fields. */
export async function checkRunConfig(dir: string, config: RunConfig): Promise<void> {
  const file = path.join(dir, 'run.json');
  const hash = configHash(config);
  if (existsSync(file)) {
    const saved = await readJson<{ hash: string; config: RunConfig }>(file);
    if (saved.hash !== hash) {
      const changes = diffConfigs(saved.config, config).filter((c) => c.path !== 'run.dir');
      if (changes.length > 0) {
        const list = changes.slice(0, 10).map((c) => `${c.path}: ${JSON.stringify(c.before)} → ${JSON.stringify(c.after)}`).join('; ');
        throw new Error(`${dir} holds a run with a different configuration (${list}); use a new run.dir or restore the config`);
      }
    }
    return;
  }
  await writeJsonAtomic(file, { hash, config }, { createParents: true });
  await appendFile(path.join(dir, 'run.log'), `${new Date().toISOString()} started, config ${hash}\n`);
}
