// The run directory: every stage's output is written whole under a temporary name and renamed
// into place, so a file that exists is complete, and a killed run resumes from the files it finds.
import { readFile, rename, rm } from 'node:fs/promises';
import path from 'node:path';
import { syncDirectory } from '../util/atomic-write.js';

export async function readJson<T>(file: string): Promise<T> {
  return JSON.parse(await readFile(file, 'utf8')) as T;
}

/** Moves a fully written directory into place (replacing a stale partial one). */
export async function commitDirectory(tmp: string, final: string): Promise<void> {
  await rm(final, { recursive: true, force: true });
  await rename(tmp, final);
  await syncDirectory(path.dirname(final));
}
