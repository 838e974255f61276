// The run directory: every stage's output is written whole under a temporary name and renamed
// into place, so a file that exists is complete, and a killed run resumes from the files it finds.
import { mkdir, open, readFile, rename, rm } from 'node:fs/promises';
import path from 'node:path';

export async function writeJsonAtomic(file: string, value: unknown): Promise<void> {
  await writeTextAtomic(file, JSON.stringify(value));
}

export async function writeTextAtomic(file: string, text: string | Uint8Array): Promise<void> {
  await mkdir(path.dirname(file), { recursive: true });
  const tmp = `${file}.tmp-${process.pid}`;
  // Synced before the rename: after a crash a stage file is whole or absent, never empty.
  const handle = await open(tmp, 'w');
  try {
    await handle.writeFile(text);
    await handle.sync();
  } finally {
    await handle.close();
  }
  await rename(tmp, file);
}

export async function readJson<T>(file: string): Promise<T> {
  return JSON.parse(await readFile(file, 'utf8')) as T;
}

/** Moves a fully written directory into place (replacing a stale partial one). */
export async function commitDirectory(tmp: string, final: string): Promise<void> {
  await rm(final, { recursive: true, force: true });
  await rename(tmp, final);
}
