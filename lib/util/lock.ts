// An exclusive lock held as a file: `<file>` holds the holder's pid, host and a random token.
// It is created whole or not at all (written to a temporary, then hard-linked into place, which
// fails if the file exists), so a reader never sees half a lock. A lock whose holder is gone (a
// killed process on this host) is stale and taken over; a lock held from another host cannot be
// checked and is refused, with the holder named so the user can judge.
import { randomBytes } from 'node:crypto';
import { readFileSync, unlinkSync } from 'node:fs';
import { link, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { hostname } from 'node:os';
import { temporaryPath } from './atomic-write.js';

/** What a lock file holds. */
export interface LockHolder {
  pid: number;
  host: string;
  /** when the lock was taken (ISO) */
  since: string;
  /** Linux: the boot's id and the process's start time, so that a reused pid is not taken for the holder */
  boot?: string;
  start?: string;
  /** tells this lock from another taken later by the same pid */
  token: string;
}

/** The lock is held by a live process (or one on another host, which cannot be checked). */
export class LockedError extends Error {
  override name = 'LockedError';
  constructor(
    readonly file: string,
    readonly holder: LockHolder,
    message: string,
  ) {
    super(message);
  }
}

/** Whether a process with this pid runs on this host (EPERM: it runs, as another user). */
export function isProcessAlive(pid: number): boolean {
  if (pid === process.pid) return true;
  if (!Number.isSafeInteger(pid) || pid <= 0) return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

function readProc(file: string): string | undefined {
  try {
    return readFileSync(file, 'utf8');
  } catch {
    return undefined;
  }
}

/** Linux: this boot's id; undefined elsewhere. */
function bootId(): string | undefined {
  return readProc('/proc/sys/kernel/random/boot_id')?.trim();
}

/** Linux: the process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat); undefined elsewhere. */
function processStart(pid: number): string | undefined {
  const stat = readProc(`/proc/${pid}/stat`);
  // the command name (field 2) is in parentheses and may hold spaces: count from the last ')'
  return stat?.slice(stat.lastIndexOf(')') + 2).split(' ')[19];
}

/**
 * Whether the holder may still hold the lock: true for a live process on this host, and for any
 * process on another host (which cannot be checked from here).
 */
export function holderMayBeAlive(holder: LockHolder): boolean {
  if (holder.host !== hostname()) return true;
  const boot = bootId();
  if (holder.boot !== undefined && boot !== undefined && holder.boot !== boot) return false; // rebooted since
  if (!isProcessAlive(holder.pid)) return false;
  const start = processStart(holder.pid);
  return holder.start === undefined || start === undefined || holder.start === start; // else the pid was reused
}

function isHolder(v: unknown): v is LockHolder {
  const h = v as Partial<LockHolder> | null;
  return typeof h?.pid === 'number' && typeof h.host === 'string' && typeof h.token === 'string';
}

/** The holder recorded in `file`; undefined if there is no such file. */
export async function readLock(file: string): Promise<LockHolder | undefined> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw e;
  }
  let holder: unknown;
  try {
    holder = JSON.parse(text);
  } catch {
    holder = undefined;
  }
  if (!isHolder(holder))
    throw new Error(`${file}: not a lock file (expected JSON with pid, host and token); delete it if no process uses the directory`);
  return holder;
}

export interface Lock {
  readonly file: string;
  readonly holder: LockHolder;
  /** the stale lock this one took over, if any */
  readonly tookOver?: LockHolder;
  /** Removes the lock file if it is still this lock's. */
  release(): Promise<void>;
}

/**
 * Takes the lock `file`, taking over a stale one; throws LockedError if a live process (or one on
 * another host) holds it.
 */
export async function acquireLock(file: string): Promise<Lock> {
  const holder: LockHolder = {
    pid: process.pid,
    host: hostname(),
    since: new Date().toISOString(),
    boot: bootId(),
    start: processStart(process.pid),
    token: randomBytes(8).toString('hex'),
  };
  const tmp = temporaryPath(file);
  await writeFile(tmp, JSON.stringify(holder), { flag: 'wx' });
  let tookOver: LockHolder | undefined;
  try {
    // A takeover race (two processes finding the same stale lock) ends after a few rounds.
    for (let round = 0; round < 8; round++) {
      try {
        await link(tmp, file);
        // a process that exits without releasing (process.exit, a second Ctrl-C) still leaves no lock
        const onExit = () => releaseLockSync(file, holder.token);
        process.on('exit', onExit);
        const release = async () => {
          process.off('exit', onExit);
          await releaseLock(file, holder.token);
        };
        return { file, holder, tookOver, release };
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
      }
      const current = await readLock(file);
      if (current === undefined) continue; // released meanwhile
      if (holderMayBeAlive(current))
        throw new LockedError(file, current, `${file} is held by process ${current.pid} on ${current.host} (since ${current.since})`);
      await takeOver(file, current);
      tookOver = current;
    }
    throw new Error(`${file}: could not take the lock (other processes keep taking it)`);
  } finally {
    await rm(tmp, { force: true });
  }
}

/** Removes the stale lock `stale` from `file`, unless another process replaced it meanwhile. */
async function takeOver(file: string, stale: LockHolder): Promise<void> {
  // Renamed away first, then checked: unlinking what was read could remove a lock that another
  // process took over in between.
  const away = temporaryPath(file);
  try {
    await rename(file, away);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw e;
  }
  const moved = await readLock(away).catch(() => undefined);
  if (moved && moved.token !== stale.token) await link(away, file).catch(() => undefined); // a live lock: put it back
  await rm(away, { force: true });
}

function releaseLockSync(file: string, token: string): void {
  try {
    if ((JSON.parse(readFileSync(file, 'utf8')) as Partial<LockHolder>).token === token) unlinkSync(file);
  } catch {
    // gone or unreadable: nothing of ours to remove
  }
}

async function releaseLock(file: string, token: string): Promise<void> {
  const current = await readLock(file).catch(() => undefined);
  if (current?.token === token) await rm(file, { force: true });
}
