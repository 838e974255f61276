// Atomic file writes: a reader, or a run restarted after a crash, sees the old file or the
// complete new one, never a part of it. The data goes to a temporary sibling of the target
// (same directory, so the rename cannot cross filesystems), is fsynced, renamed over the target,
// and the directory is fsynced so that the rename itself survives a power loss.
import { randomBytes } from 'node:crypto';
import { existsSync, constants as fsConstants } from 'node:fs';
import { copyFile, lstat, mkdir, open, readFile, rename, rm, type FileHandle } from 'node:fs/promises';
import { hostname } from 'node:os';
import path from 'node:path';
import { z } from 'zod';

/** The package's one temporary-name scheme: `<target>.tmp-<pid>-<random>`. */
export function temporaryPath(target: string): string {
  return `${target}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`;
}

const TEMPORARY = /\.tmp-([1-9]\d*)-[0-9a-f]+$/;

/**
 * Whether the directory entry `name` is a temporary of a target named `targetName`: of any
 * process, or only of the process `pid` when given (a process removes only its own).
 */
export function isTemporaryOf(name: string, targetName: string, pid?: number): boolean {
  if (!name.startsWith(`${targetName}.tmp-`)) return false;
  return pid === undefined || temporaryOwner(name) === pid;
}

/** The pid of the process that made the temporary `name` (a file or directory name), or undefined if it is none. */
export function temporaryOwner(name: string): number | undefined {
  const m = TEMPORARY.exec(name);
  return m ? Number(m[1]) : undefined;
}

/**
 * Creates a temporary sibling of `target`, lets `write` fill it, fsyncs it and returns its path,
 * for commitTemporaries to rename; if anything fails the temporary is removed.
 */
export async function writeTemporary(target: string, write: (file: FileHandle) => Promise<void>): Promise<string> {
  const tmp = temporaryPath(target);
  const file = await open(tmp, 'wx');
  try {
    await write(file);
    await file.sync();
    await file.close();
    return tmp;
  } catch (e) {
    await file.close().catch(() => undefined);
    await rm(tmp, { force: true });
    throw e;
  }
}

/** Copies `source` to a temporary sibling of `target`, fsynced; returns its path. */
export async function copyToTemporary(source: string, target: string): Promise<string> {
  const tmp = temporaryPath(target);
  try {
    await copyFile(source, tmp, fsConstants.COPYFILE_EXCL);
    const file = await open(tmp, 'r');
    try {
      await file.sync();
    } finally {
      await file.close();
    }
    return tmp;
  } catch (e) {
    await rm(tmp, { force: true });
    throw e;
  }
}

export interface CommitOptions {
  /**
   * A journal of the commit, for targets that must change together (the two files of an adapter):
   * written whole before the first rename and removed after the last, so that while it exists
   * the targets may be a mix of new and old files, which readCommitJournal tells. A commit that
   * fails after some renames leaves it in place, with the temporaries not yet renamed; one that
   * fails before any removes it.
   */
  journal?: string;
}

/** A journal's record: the process that committed, and each temporary and target relative to the journal's directory. */
const journalSchema = z.object({
  pid: z.number(),
  host: z.string(),
  files: z.array(z.object({ tmp: z.string(), target: z.string() })),
});

/**
 * Renames finished temporaries over their targets in the order given, then fsyncs each target
 * directory once. A target that is a directory (a rename over it would fail midway, leaving a
 * mix of new and old files) is refused before anything is renamed. If a rename fails, the
 * temporaries not yet renamed are removed (kept with a journal that stays). Renames one after
 * another cannot be atomic together: options.journal records the commit while they run.
 */
export async function commitTemporaries(staged: readonly { tmp: string; target: string }[], options: CommitOptions = {}): Promise<void> {
  const { journal } = options;
  const blocked = await firstDirectory(staged.map((s) => s.target));
  if (blocked !== undefined) {
    await Promise.all(staged.map((s) => rm(s.tmp, { force: true })));
    throw Object.assign(new Error(`EISDIR: a directory is in the way of a file, ${blocked}`), { code: 'EISDIR', dest: blocked });
  }
  if (journal !== undefined) {
    const at = (p: string) => path.relative(path.dirname(journal), p);
    const record = { pid: process.pid, host: hostname(), files: staged.map((s) => ({ tmp: at(s.tmp), target: at(s.target) })) };
    try {
      await writeFileAtomic(journal, JSON.stringify(record, null, 2) + '\n');
    } catch (e) {
      await Promise.all(staged.map((s) => rm(s.tmp, { force: true })));
      throw e;
    }
  }
  for (let i = 0; i < staged.length; i++) {
    try {
      await rename(staged[i].tmp, staged[i].target);
    } catch (e) {
      // With nothing renamed every target is as it was. Else a journal stays, to say that they may
      // be mixed, with the temporaries that finish the commit (readCommitJournal names them).
      if (journal === undefined || i === 0) await Promise.all(staged.slice(i).map((s) => rm(s.tmp, { force: true })));
      if (journal !== undefined && i === 0) await rm(journal, { force: true });
      throw e;
    }
  }
  for (const dir of new Set(staged.map((s) => path.dirname(s.target)))) await syncDirectory(dir);
  if (journal !== undefined) {
    await rm(journal);
    await syncDirectory(path.dirname(journal));
  }
}

/** A commit that may have left its targets mixed (readCommitJournal). */
export interface InterruptedCommit {
  journal: string;
  /** the process that committed, as the journal records it; undefined when the journal cannot be read */
  writer?: { pid: number; host: string };
  /** renames not done whose temporaries remain (absolute paths): renaming each in turn finishes the commit */
  pending: { tmp: string; target: string }[];
}

/**
 * What `journal` (CommitOptions) says about its targets: undefined when it does not exist, or when
 * every temporary it lists is still there (no rename happened, so every target is as before);
 * otherwise the commit was stopped between its renames (or is running now) and the targets may be
 * a mix of new and old files. A journal that cannot be read as one counts as such a commit.
 */
export async function readCommitJournal(journal: string): Promise<InterruptedCommit | undefined> {
  let text: string;
  try {
    text = await readFile(journal, 'utf8');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    return { journal, pending: [] };
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch {
    return { journal, pending: [] };
  }
  const record = journalSchema.safeParse(parsed);
  if (!record.success) return { journal, pending: [] };
  const { pid, host, files } = record.data;
  const dir = path.dirname(journal);
  const absolute = files.map((f) => ({ tmp: path.resolve(dir, f.tmp), target: path.resolve(dir, f.target) }));
  const pending = absolute.filter((f) => existsSync(f.tmp));
  if (pending.length === absolute.length) return undefined;
  return { journal, writer: { pid, host }, pending };
}

async function firstDirectory(paths: readonly string[]): Promise<string | undefined> {
  for (const p of paths) if ((await lstat(p).catch(() => undefined))?.isDirectory()) return p;
  return undefined;
}

/** Makes the renames in `dir` durable. (Windows cannot open a directory; NTFS journals renames.) */
export async function syncDirectory(dir: string): Promise<void> {
  if (process.platform === 'win32') return;
  const handle = await open(dir, 'r');
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}

export interface AtomicWriteOptions {
  /** create the target's missing parent directories first (default false) */
  createParents?: boolean;
}

/** Replaces `file` with `data` (text is written as UTF-8) atomically and durably. */
export async function writeFileAtomic(file: string, data: string | Uint8Array, options: AtomicWriteOptions = {}): Promise<void> {
  try {
    if (options.createParents) await mkdir(path.dirname(file), { recursive: true });
    const tmp = await writeTemporary(file, (handle) => handle.writeFile(data));
    await commitTemporaries([{ tmp, target: file }]);
  } catch (e) {
    throw fileWriteError(e, file);
  }
}

/** Replaces `file` with `JSON.stringify(value)` atomically and durably. */
export async function writeJsonAtomic(file: string, value: unknown, options: AtomicWriteOptions = {}): Promise<void> {
  await writeFileAtomic(file, JSON.stringify(value), options);
}

/** What a filesystem error code means for a write, in words. */
const WRITE_FAILURES: Record<string, string> = {
  ENOSPC: 'no space left on the device',
  EDQUOT: 'the disk quota is exceeded',
  EROFS: 'the filesystem is read-only',
  EISDIR: 'a directory is in the way',
  ENOTDIR: 'a part of the path is a file, not a directory',
  EACCES: 'permission denied',
  EPERM: 'operation not permitted',
  ENOENT: 'its folder does not exist',
  ENAMETOOLONG: 'the name is too long',
  EMFILE: 'too many open files',
};

/** A filesystem error met while writing a file: names the file (never its temporary) and what it holds, and keeps the code. */
export class FileWriteError extends Error {
  override name = 'FileWriteError';
  constructor(
    message: string,
    readonly code: string,
    readonly path: string,
    options?: ErrorOptions,
  ) {
    super(message, options);
  }
}

/**
 * `err`, met while writing `target`, as a FileWriteError: "cannot write <target> (<what>): no
 * space left on the device (ENOSPC: …)". A rename names its destination (err.dest) rather than
 * `target`. Errors without a filesystem code, and ones already named, are returned unchanged.
 */
export function fileWriteError(err: unknown, target: string, what?: string): unknown {
  const e = err as NodeJS.ErrnoException | undefined;
  if (err instanceof FileWriteError || !(err instanceof Error) || typeof e?.code !== 'string') return err;
  const file = (e as { dest?: unknown }).dest;
  const at = typeof file === 'string' ? file : target;
  const cause = WRITE_FAILURES[e.code] ?? e.code;
  return new FileWriteError(`cannot write ${at}${what ? ` (${what})` : ''}: ${cause} (${err.message})`, e.code, at, { cause: err });
}
