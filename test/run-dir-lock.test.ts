// One writer per run directory, with real processes: a second process is refused while the first
// holds the directory, naming its pid and host; a lock left by a killed process is taken over.
// Checkpoint replacement never leaves a moment without a complete policy (a commit killed between
// its renames is repaired at open), and a process removes only its own temporaries plus those of
// dead processes.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { hostname, tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { parseConfig } from '../lib/config/load.js';
import { demoConfigInput } from '../lib/demo/demo.js';
import { RunDir, RunDirError } from '../lib/sppo/run-dir.js';
import { isTemporaryOf, temporaryOwner, temporaryPath } from '../lib/util/atomic-write.js';

const root = mkdtempSync(path.join(tmpdir(), 'sppo-run-dir-lock-'));
afterAll(() => rmSync(root, { recursive: true, force: true }));
const holderScript = fileURLToPath(new URL('./fixtures/run-dir-holder.mts', import.meta.url));
const configOf = (dir: string) => parseConfig(demoConfigInput({ dir, iterations: 3, quick: true }));

/** A checkpoint directory written by `savePolicy`'s callback. */
const checkpoint = (text: string) => (dir: string) => {
  mkdirSync(dir, { recursive: true });
  writeFileSync(path.join(dir, 'config.json'), text);
  return Promise.resolve();
};

const children: ChildProcess[] = [];
afterEach(() => {
  for (const c of children.splice(0)) c.kill('SIGKILL');
});

/** A child process that holds `dir` open; resolves once it has the lock. */
function holder(dir: string): Promise<ChildProcess> {
  const child = spawn(process.execPath, ['--import', 'tsx', holderScript, dir], { stdio: ['ignore', 'pipe', 'pipe'] });
  children.push(child);
  return new Promise((resolve, reject) => {
    let out = '';
    let err = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => {
      out += d;
      if (out.includes(`open ${child.pid}\n`)) resolve(child);
    });
    child.stderr.setEncoding('utf8').on('data', (d: string) => (err += d));
    child.on('exit', (code) => reject(new Error(`the holder exited with ${code}: ${err}`)));
  });
}

function killed(child: ChildProcess): Promise<void> {
  return new Promise((resolve) => {
    child.on('exit', () => resolve());
    child.kill('SIGKILL');
  });
}

async function openError(dir: string): Promise<RunDirError> {
  const err = await RunDir.open(dir, configOf(dir)).then(
    async (run) => {
      await run.close();
      return undefined;
    },
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(RunDirError);
  return err as RunDirError;
}

/** The `sppo` command as a process of its own. */
function sppoProcess(...argv: string[]): Promise<{ code: number | null; stderr: string }> {
  const cli = fileURLToPath(new URL('../lib/cli/main.ts', import.meta.url));
  const child = spawn(process.execPath, ['--import', 'tsx', cli, ...argv], { stdio: ['ignore', 'ignore', 'pipe'] });
  children.push(child);
  let stderr = '';
  child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  return new Promise((resolve) => child.on('exit', (code) => resolve({ code, stderr })));
}

describe('the run directory lock', () => {
  it('a second process is refused while a live one holds the directory, naming its pid and host', async () => {
    const dir = path.join(root, 'two');
    const child = await holder(dir);
    const lock = JSON.parse(readFileSync(path.join(dir, 'run.lock'), 'utf8')) as { pid: number; host: string };
    expect(lock).toMatchObject({ pid: child.pid, host: hostname() });

    const err = await openError(dir);
    expect(err.path).toBe(path.join(dir, 'run.lock'));
    expect(err.message).toContain(`in use by process ${child.pid} on ${hostname()}`);

    // the command line, a third process: exit 1, the holder named, and nothing of the holder's touched
    const cli = await sppoProcess('demo', '--dir', dir, '--quick', '--iterations', '3');
    expect(cli.code, cli.stderr).toBe(1);
    expect(cli.stderr).toContain(`in use by process ${child.pid}`);
    expect(JSON.parse(readFileSync(path.join(dir, 'run.lock'), 'utf8'))).toEqual(lock);
    expect(readdirSync(dir).sort()).toEqual(['run.json', 'run.lock', 'run.log']);

    // killed, its lock is stale: the next open takes it over and says so in run.log
    await killed(child);
    const run = await RunDir.open(dir, configOf(dir));
    expect(JSON.parse(readFileSync(run.lockFile, 'utf8'))).toMatchObject({ pid: process.pid });
    expect(readFileSync(run.logFile, 'utf8')).toContain(`took over the lock of process ${child.pid}`);
    await run.close();
    expect(existsSync(run.lockFile)).toBe(false);
  }, 60_000);

  it('a process that exits without closing (process.exit) leaves no lock', () => {
    const dir = path.join(root, 'exit');
    const r = spawnSync(process.execPath, ['--import', 'tsx', holderScript, dir, 'exit'], { encoding: 'utf8', timeout: 60_000 });
    expect(r.stdout, r.stderr).toMatch(/^open \d+\n$/);
    expect(readdirSync(dir).sort()).toEqual(['run.json', 'run.log']);
  }, 60_000);

  it('is held until close, also against the same process, and released on a failed open', async () => {
    const dir = path.join(root, 'same');
    const run = await RunDir.open(dir, configOf(dir));
    expect((await openError(dir)).message).toContain(`in use by process ${process.pid}`);
    await run.close();
    const again = await RunDir.open(dir, configOf(dir));
    await again.writeStage(0, 'base', { value: {}, seconds: 1 });
    await again.close();
    // a run of another config is refused, and the lock goes with the refusal
    await expect(RunDir.open(dir, parseConfig(demoConfigInput({ dir, iterations: 4, quick: true })))).rejects.toThrow('run.iterations');
    expect(existsSync(path.join(dir, 'run.lock'))).toBe(false);
  });

  it("a lock from another host is refused (its process cannot be checked); a dead process's is taken over", async () => {
    const dir = path.join(root, 'hosts');
    mkdirSync(dir);
    const file = path.join(dir, 'run.lock');
    writeFileSync(file, JSON.stringify({ pid: 4242, host: 'elsewhere.example', since: '2024-01-01T00:00:00.000Z', token: 'a' }));
    const err = await openError(dir);
    expect(err.message).toContain('in use by process 4242 on elsewhere.example');
    expect(err.message).toContain(`delete ${file}`);
    // a pid that no longer runs on this host: a process that has exited
    const child = await holder(path.join(root, 'scratch'));
    await killed(child);
    writeFileSync(file, JSON.stringify({ pid: child.pid, host: hostname(), since: '2024-01-01T00:00:00.000Z', token: 'b' }));
    await (await RunDir.open(dir, configOf(dir))).close();
    // a lock file that is not one names itself
    writeFileSync(file, 'garbage');
    expect((await openError(dir).catch((e: unknown) => e as Error)).message).toContain('not a lock file');
  }, 60_000);
});

describe('checkpoint replacement', () => {
  it('a commit killed between its two renames leaves a complete policy after recovery', async () => {
    const dir = path.join(root, 'aside');
    let run = await RunDir.open(dir, configOf(dir));
    await run.savePolicy(1, checkpoint('old'));
    await run.writeStage(1, 'train', { value: { steps: [] }, seconds: 1 });
    await run.savePolicy(1, checkpoint('new'));
    expect(readdirSync(path.join(dir, 'iter-1')).sort()).toEqual(['policy', 'train.json']);
    await run.close();

    // killed after renaming the old policy aside, before renaming the new one in
    const policy = run.policy(1);
    const rename = (from: string, to: string) => {
      mkdirSync(to);
      for (const f of readdirSync(from)) writeFileSync(path.join(to, f), readFileSync(path.join(from, f)));
      rmSync(from, { recursive: true });
    };
    rename(policy, `${policy}.aside`);
    mkdirSync(`${policy}.tmp-999999-00c0ffee`);
    expect(RunDir.at(dir).hasPolicy(1)).toBe(false);
    run = await RunDir.open(dir, configOf(dir));
    expect(run.hasPolicy(1)).toBe(true);
    expect(readFileSync(path.join(policy, 'config.json'), 'utf8')).toBe('new');
    expect(readdirSync(path.join(dir, 'iter-1')).sort()).toEqual(['policy', 'train.json']);
    await run.close();

    // killed after renaming the new one in, before deleting the old one
    mkdirSync(`${policy}.aside`);
    writeFileSync(path.join(`${policy}.aside`, 'config.json'), 'old');
    run = await RunDir.open(dir, configOf(dir));
    expect(readFileSync(path.join(policy, 'config.json'), 'utf8')).toBe('new');
    expect(readdirSync(path.join(dir, 'iter-1')).sort()).toEqual(['policy', 'train.json']);
    await run.close();
  });
});

describe('temporaries', () => {
  it('the pid in a temporary name says whose it is', () => {
    const tmp = path.basename(temporaryPath('/x/policy'));
    expect(temporaryOwner(tmp)).toBe(process.pid);
    expect(isTemporaryOf(tmp, 'policy', process.pid)).toBe(true);
    expect(isTemporaryOf(tmp, 'policy', process.pid + 1)).toBe(false);
    expect(temporaryOwner('policy')).toBeUndefined();
    expect(temporaryOwner('policy.tmp-x-1')).toBeUndefined();
  });

  it("a process removes only its own; a dead process's go at open, a live one's stay", async () => {
    const dir = path.join(root, 'temps');
    const live = await holder(path.join(root, 'live-holder'));
    const dead = await holder(path.join(root, 'dead-holder'));
    await killed(dead);
    const tmp = (pid: number | undefined, ...parts: string[]) => path.join(dir, ...parts) + `.tmp-${pid}-0badc0de`;
    const files = {
      deadRoot: tmp(dead.pid, 'metrics.jsonl'),
      deadPolicy: tmp(dead.pid, 'iter-1', 'policy'),
      deadCache: tmp(dead.pid, 'judge-cache', 'ab', 'abcdef.json'),
      liveRoot: tmp(live.pid, 'report.html'),
      livePolicy: tmp(live.pid, 'iter-1', 'policy'),
    };
    for (const f of Object.values(files)) {
      mkdirSync(path.dirname(f), { recursive: true });
      if (f.includes('policy')) mkdirSync(f);
      else writeFileSync(f, 'x');
    }
    const run = await RunDir.open(dir, configOf(dir));
    for (const [name, f] of Object.entries(files)) expect(existsSync(f), name).toBe(name.startsWith('live'));
    // a save removes its own leftovers, never another process's
    const own = temporaryPath(run.policy(1));
    mkdirSync(own);
    await run.savePolicy(1, checkpoint('p'));
    expect(existsSync(own)).toBe(false);
    expect(existsSync(files.livePolicy)).toBe(true);
    await run.close();
  }, 60_000);
});
