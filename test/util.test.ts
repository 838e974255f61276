// The shared utilities on real files and signals: an atomic write replaces its target whole and
// leaves no temporary behind, and a failed one leaves the old content; a multi-file commit's
// journal tells a commit stopped between its renames; one abort error; one
// int32 token-id check.
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { hostname, tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { abortError, throwIfAborted } from '../lib/util/abort.js';
import {
  commitTemporaries,
  isTemporaryOf,
  readCommitJournal,
  temporaryPath,
  writeFileAtomic,
  writeJsonAtomic,
  writeTemporary,
} from '../lib/util/atomic-write.js';
import { INT32_MAX, INT32_MIN, isInt32, tokenIdError } from '../lib/util/int32.js';

const root = mkdtempSync(path.join(tmpdir(), 'sppo-util-'));
afterAll(() => rmSync(root, { recursive: true, force: true }));
let n = 0;
const freshDir = (): string => {
  const dir = path.join(root, `case-${n++}`);
  mkdirSync(dir);
  return dir;
};
const temporaries = (dir: string): string[] => readdirSync(dir).filter((f) => f.includes('.tmp-'));

describe('atomic writes', () => {
  it('replace the target and leave no temporary behind', async () => {
    const dir = freshDir();
    const file = path.join(dir, 'out.json');
    writeFileSync(file, 'old');
    await writeJsonAtomic(file, { a: 1 });
    expect(JSON.parse(readFileSync(file, 'utf8'))).toEqual({ a: 1 });
    await writeFileAtomic(file, 'text é');
    expect(readFileSync(file, 'utf8')).toBe('text é');
    await writeFileAtomic(file, new Uint8Array([0, 255, 7]));
    expect([...readFileSync(file)]).toEqual([0, 255, 7]);
    expect(readdirSync(dir)).toEqual(['out.json']);
  });

  it('create missing parents only when asked', async () => {
    const dir = freshDir();
    const nested = path.join(dir, 'a', 'b', 'c.txt');
    await expect(writeFileAtomic(nested, 'x')).rejects.toThrow(/ENOENT/);
    expect(readdirSync(dir)).toEqual([]);
    await writeFileAtomic(nested, 'x', { createParents: true });
    expect(readFileSync(nested, 'utf8')).toBe('x');
  });

  it('keep the old content when the writer fails, and remove the temporary', async () => {
    const dir = freshDir();
    const file = path.join(dir, 'out.bin');
    writeFileSync(file, 'old');
    await expect(
      writeTemporary(file, async (fh) => {
        await fh.writeFile('half of it');
        throw new Error('disk full');
      }),
    ).rejects.toThrow('disk full');
    expect(readFileSync(file, 'utf8')).toBe('old');
    expect(temporaries(dir)).toEqual([]);
  });

  it('remove the temporary when the rename fails (the target is a non-empty directory)', async () => {
    const dir = freshDir();
    const target = path.join(dir, 'taken');
    mkdirSync(target);
    writeFileSync(path.join(target, 'inside'), 'kept');
    await expect(writeFileAtomic(target, 'x')).rejects.toThrow();
    expect(readFileSync(path.join(target, 'inside'), 'utf8')).toBe('kept');
    expect(temporaries(dir)).toEqual([]);
  });

  // root ignores directory permissions, so this case only means something for other users
  it.skipIf(process.getuid?.() === 0 || process.platform === 'win32')('keep the old content in a read-only directory', async () => {
    const dir = freshDir();
    const file = path.join(dir, 'out.txt');
    writeFileSync(file, 'old');
    chmodSync(dir, 0o555);
    try {
      await expect(writeFileAtomic(file, 'new')).rejects.toThrow(/EACCES|EPERM/);
    } finally {
      chmodSync(dir, 0o755);
    }
    expect(readFileSync(file, 'utf8')).toBe('old');
    expect(temporaries(dir)).toEqual([]);
  });

  it('commit staged temporaries in order, refuse a directory in the way before any rename, and remove the rest when one rename fails', async () => {
    const dir = freshDir();
    const a = path.join(dir, 'a');
    const b = path.join(dir, 'b');
    const blocked = path.join(dir, 'blocked');
    mkdirSync(blocked);
    writeFileSync(path.join(blocked, 'inside'), '');
    const staged = await Promise.all(
      [a, blocked, b].map(async (target) => ({
        tmp: await writeTemporary(target, (fh) => fh.writeFile(path.basename(target))),
        target,
      })),
    );
    expect(temporaries(dir)).toHaveLength(3);
    // a directory in the way is refused before any rename: no mix of new and old files
    await expect(commitTemporaries(staged)).rejects.toThrow(`a directory is in the way of a file, ${blocked}`);
    expect(readdirSync(dir).sort()).toEqual(['blocked']);
    // a rename that fails midway (its folder is gone): the earlier ones stand, the rest are removed
    const gone = path.join(dir, 'gone', 'c');
    const midway = [
      { tmp: await writeTemporary(a, (fh) => fh.writeFile('a')), target: a },
      { tmp: await writeTemporary(b, (fh) => fh.writeFile('c')), target: gone },
      { tmp: await writeTemporary(b, (fh) => fh.writeFile('b')), target: b },
    ];
    await expect(commitTemporaries(midway)).rejects.toThrow(/ENOENT/);
    expect(readFileSync(a, 'utf8')).toBe('a');
    expect(readdirSync(dir).sort()).toEqual(['a', 'blocked']);
  });

  it('with a journal: none after a commit; a rename failing midway leaves it, naming the renames that finish the commit; one failing first leaves none', async () => {
    const dir = freshDir();
    const [a, b] = [path.join(dir, 'a'), path.join(dir, 'b')];
    const journal = path.join(dir, 'commit.json');
    const stage = (target: string, text: string) => writeTemporary(target, (fh) => fh.writeFile(text)).then((tmp) => ({ tmp, target }));
    await commitTemporaries([await stage(a, 'a1'), await stage(b, 'b1')], { journal });
    expect(readdirSync(dir).sort()).toEqual(['a', 'b']);
    expect(await readCommitJournal(journal)).toBeUndefined();

    // the second rename fails for real (its folder is gone): a holds the new text, b the old
    const gone = path.join(dir, 'gone', 'b');
    const midway = [await stage(a, 'a2'), { ...(await stage(b, 'b2')), target: gone }];
    await expect(commitTemporaries(midway, { journal })).rejects.toThrow(/ENOENT/);
    expect([readFileSync(a, 'utf8'), readFileSync(b, 'utf8')]).toEqual(['a2', 'b1']);
    expect(await readCommitJournal(journal)).toEqual({
      journal,
      writer: { pid: process.pid, host: hostname() },
      pending: [{ tmp: midway[1].tmp, target: gone }],
    });
    // its temporary is kept for that rename (whose folder, back now, lets it finish)
    expect(readFileSync(midway[1].tmp, 'utf8')).toBe('b2');
    rmSync(midway[1].tmp);
    expect((await readCommitJournal(journal))?.pending).toEqual([]); // a temporary gone: still mixed, nothing to finish with

    // a journal listing temporaries that are all still there: no rename happened, every target is as before
    rmSync(journal);
    const staged = [await stage(a, 'a3'), await stage(b, 'b3')];
    writeFileSync(
      journal,
      JSON.stringify({ pid: 1, host: 'h', files: staged.map((f) => ({ tmp: path.basename(f.tmp), target: path.basename(f.target) })) }),
    );
    expect(await readCommitJournal(journal)).toBeUndefined();
    writeFileSync(journal, '{"pid": 1,');
    expect(await readCommitJournal(journal)).toEqual({ journal, pending: [] });

    // the first rename fails: nothing renamed, so no journal and no temporary stays
    rmSync(journal);
    const first = [{ ...(await stage(a, 'a4')), target: gone }, await stage(b, 'b4')];
    await expect(commitTemporaries(first, { journal })).rejects.toThrow(/ENOENT/);
    expect(existsSync(journal)).toBe(false);
    expect(existsSync(first[0].tmp) || existsSync(first[1].tmp)).toBe(false);
    expect([readFileSync(a, 'utf8'), readFileSync(b, 'utf8')]).toEqual(['a2', 'b1']);
  });

  it('name temporaries <target>.tmp-<pid>-<random>, and recognise them', () => {
    const target = path.join(root, 'policy-1');
    const tmp = temporaryPath(target);
    expect(path.dirname(tmp)).toBe(root);
    expect(path.basename(tmp)).toMatch(new RegExp(`^policy-1\\.tmp-${process.pid}-[0-9a-f]{8}$`));
    expect(temporaryPath(target)).not.toBe(tmp);
    expect(isTemporaryOf(path.basename(tmp), 'policy-1')).toBe(true);
    expect(isTemporaryOf(path.basename(tmp), 'policy-10')).toBe(false);
    expect(isTemporaryOf('policy-1', 'policy-1')).toBe(false);
  });
});

describe('abort', () => {
  it('passes nothing when the signal is absent or not aborted', () => {
    expect(() => throwIfAborted(undefined)).not.toThrow();
    expect(() => throwIfAborted(new AbortController().signal)).not.toThrow();
  });

  it('throws the reason when it is an Error, else an AbortError', () => {
    const reason = new Error('stop now');
    expect(() => throwIfAborted(AbortSignal.abort(reason))).toThrow(reason);
    const byDefault = abortError(AbortSignal.abort());
    expect(byDefault.name).toBe('AbortError');
    const byString = abortError(AbortSignal.abort('user cancelled'));
    expect(byString.name).toBe('AbortError');
    expect(byString.message).toBe('user cancelled');
    const byObject = abortError(AbortSignal.abort({ code: 3 }));
    expect(byObject.name).toBe('AbortError');
    expect(byObject.message).toBe('The operation was aborted');
  });
});

describe('int32 token ids', () => {
  it('accept integers in [−2^31, 2^31 − 1]', () => {
    for (const v of [0, 1, -1, INT32_MAX, INT32_MIN, 2 ** 31 - 1]) expect(isInt32(v)).toBe(true);
  });

  it('refuse 2^31, −2^31 − 1, NaN, infinities, fractions and non-numbers', () => {
    for (const v of [2 ** 31, -(2 ** 31) - 1, NaN, Infinity, -Infinity, 1.5, -0.5, '3', null, undefined, 3n])
      expect(isInt32(v)).toBe(false);
  });

  it("name the bad id in the caller's terms", () => {
    const err = tokenIdError('token at sequence 1, position 2', 1.5);
    expect(err).toBeInstanceOf(TypeError);
    expect(err.message).toBe('token at sequence 1, position 2 is not an integer id: 1.5');
  });
});
